//! The `raftwasm` binary: parses the command line, sets up logging, and runs
//! a node (or a client subcommand).

use anyhow::Context as _;
use clap::Parser as _;
use raftwasm::config::{Cli, Command, normalize_args};

/// mimalloc instead of the system allocator: a node allocates small buffers
/// on every request and entry, and glibc's malloc took about 15% of a
/// leader's CPU under write load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(normalize_args(std::env::args()));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,openraft=warn,sled=warn".into());
    if cli.command.as_ref().is_some_and(Command::is_cli) {
        // stdout carries the command's output (raw bytes for `kv get`).
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if cli.command.is_none()
        && let Some(threads) = cli.node.threads
    {
        runtime.worker_threads(threads.into());
    }
    runtime.build()?.block_on(async {
        match cli.command {
            Some(Command::Bench(config)) => raftwasm::bench::run(config).await,
            Some(Command::Guest(command)) => raftwasm::deploy::run(command).await,
            Some(Command::Kv(command)) => exit(raftwasm::cli::kv(command).await),
            Some(Command::Status(args)) => exit(raftwasm::cli::status(args).await),
            Some(Command::Member(command)) => exit(raftwasm::cli::member(command).await),
            Some(Command::Backup(args)) => raftwasm::backup::client::backup(args).await,
            Some(Command::Restore(args)) => raftwasm::backup::client::restore(args).await,
            None => {
                let listeners = raftwasm::node::Listeners::bind(&cli.node).await?;
                if let Some(path) = &cli.node.ports_file {
                    let ports = raftwasm::ports_file::PortsFile {
                        http: listeners.http.local_addr()?.to_string(),
                        raft: listeners.raft.local_addr()?.to_string(),
                    };
                    ports
                        .write(path)
                        .with_context(|| format!("cannot write --ports-file={}", path.display()))?;
                }
                let shutdown = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                raftwasm::node::run(cli.node, listeners, shutdown).await
            }
        }
    })
}

/// Ends a client subcommand with its documented exit code, its message on
/// stderr.
fn exit(outcome: Result<(), raftwasm::cli::Failure>) -> ! {
    match outcome {
        Ok(()) => std::process::exit(0),
        Err(failure) => {
            if let Some(message) = failure.message {
                eprintln!("error: {message}");
            }
            std::process::exit(failure.code.into())
        }
    }
}
