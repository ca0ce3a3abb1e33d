//! The `tributary` binary: CLI, config, node lifecycle, client subcommands and
//! load generators. The only crate that uses `anyhow`.
//!
//! - [`cli`]: the command line (clap).
//! - [`config`]: TOML + environment configuration, validated in one pass.
//! - [`node`]: running an edge or core node and shutting it down gracefully.
//! - [`sync_link`]: the core's `/v1/sync` route and the sync link's metrics and stats.
//! - [`client`]: `topics`, `produce`, `tail` and `devices` over the HTTP API.
//! - [`tls_cli`]: `tributary tls`, development certificates (rcgen).
//! - [`bench`](mod@bench): `tributary bench`, load generators counting acknowledgements
//!   over HTTP, MQTT, WebSockets and AMQP, MQTT logins, and an edge's backlog
//!   drained into a core.
//!
//! The command line, configuration and the rest of the interface are
//! specified in `docs/contract.md`.

#[cfg(feature = "client")]
pub mod bench;
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
pub mod cluster_link;
pub mod config;
pub mod node;
pub mod sync_link;
pub mod tls_cli;

use std::process::ExitCode;

use clap::Parser as _;

use cli::{Cli, Command};
use config::{Config, Mode};

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRIBUTARY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // A log that cannot be written (stderr on a full disk) is dropped:
        // tracing's fallback would eprintln!, which panics when stderr fails.
        .log_internal_errors(false)
        .try_init();
}

/// glibc's malloc keeps memory freed inside its heaps: after a burst of
/// large events (each buffer above its mmap threshold raises the threshold,
/// so later large buffers come from the heap) RSS stays at the burst's peak.
/// A thread asks glibc every 10 s to give free pages back (`malloc_trim`,
/// which also releases free pages inside the heaps). Measured with
/// `scripts/bench-memory` (900 KB events) and `scripts/bench-sync` (drain): a
/// fixed 128 KiB mmap threshold returned memory too but cost the drain ~25%
/// in CPU (every large buffer an mmap and page faults); the periodic trim
/// costs nothing on the hot path.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    let spawned = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(10));
            // SAFETY: malloc_trim takes a plain integer and only returns
            // free memory to the system; it is thread-safe (it takes each
            // arena's lock) and has no memory-safety preconditions.
            unsafe {
                libc::malloc_trim(0);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the malloc-trim thread");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// Entry point of the `tributary` binary: parses the command line, runs it,
/// and maps the outcome to an exit code (errors are printed, never panicked).
pub fn main_entry() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    tributary_frontend::panics::install_hook();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(dispatch(cli.command));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Edge(args) => run_node(Mode::Edge, args).await,
        Command::Core(args) => run_node(Mode::Core, args).await,
        #[cfg(feature = "client")]
        Command::Topics { op, url } => client::topics(&url, op).await,
        #[cfg(feature = "client")]
        Command::Groups { op, url } => client::groups(&url, op).await,
        #[cfg(feature = "client")]
        Command::Produce(args) => client::produce(args).await,
        #[cfg(feature = "client")]
        Command::Tail(args) => client::tail(args).await,
        #[cfg(feature = "client")]
        Command::Devices { op, node } => client::devices(&node.url, node.admin_token, op).await,
        #[cfg(feature = "client")]
        Command::Pipelines { op, node } => client::pipelines(&node.url, node.admin_token, op).await,
        #[cfg(feature = "client")]
        Command::Connectors { op, node } => {
            client::connectors(&node.url, node.admin_token, op).await
        }
        #[cfg(feature = "client")]
        Command::Cluster { op, node } => client::cluster(&node.url, node.admin_token, op).await,
        Command::Tls { op } => tls_command(op),
        #[cfg(feature = "client")]
        Command::Bench { target } => match target {
            cli::BenchCommand::Common(target) => bench::run(target).await,
            cli::BenchCommand::Amqp(args) => bench::amqp::run(args).await,
            cli::BenchCommand::Connect(args) => bench::connect::run(args).await,
            cli::BenchCommand::Drain(args) => bench::drain::run(args).await,
            #[cfg(feature = "processing")]
            cli::BenchCommand::Pipeline(args) => bench::pipeline::run(args).await,
        },
    }
}

fn tls_command(op: cli::TlsOp) -> anyhow::Result<()> {
    let written = match op {
        cli::TlsOp::SelfSigned { out, hosts, days } => tls_cli::self_signed(&out, &hosts, days)?,
        cli::TlsOp::ClientCert {
            name,
            ca_dir,
            out,
            days,
        } => {
            let out = out.unwrap_or_else(|| ca_dir.clone());
            tls_cli::client_cert(&ca_dir, &name, &out, days)?
        }
    };
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

async fn run_node(mode: Mode, args: cli::RunArgs) -> anyhow::Result<()> {
    tune_allocator();
    let config = Config::load(args.profile, args.config.as_deref(), std::env::vars())?;
    node::run(mode, config).await
}
