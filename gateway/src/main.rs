//! `tributary`: see the crate docs of `tributary_gateway`.

fn main() -> std::process::ExitCode {
    tributary_gateway::main_entry()
}
