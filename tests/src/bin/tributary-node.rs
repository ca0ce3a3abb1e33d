//! The `tributary` binary, built inside the end-to-end test crate so that its
//! tests can start it as a child process (cargo exposes only a package's own
//! binaries to its tests). Same entry point, same code.

fn main() -> std::process::ExitCode {
    tributary_gateway::main_entry()
}
