//! `raftwasm guest …`: deploy a guest to a running cluster and show which
//! guest runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::client::Client;

/// Guest subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum GuestCommand {
    /// Upload a `.wasm` guest; every node switches to it at the same log index.
    #[command(after_help = "Examples:
  raftwasm guest deploy target/wasm32-unknown-unknown/release/my_guest.wasm
  raftwasm guest deploy my_guest.wasm --cluster=10.0.0.1:6000,10.0.0.2:6000 --token=$TOKEN
  raftwasm guest deploy older.wasm --force   # another name, or not a higher version")]
    Deploy {
        /// The module: a wasm32 core module built with wit-bindgen, or a component.
        file: PathBuf,
        /// HTTP addresses of cluster members, comma-separated.
        #[arg(long, default_value = "127.0.0.1:6000")]
        cluster: String,
        /// Replace a guest with another name, or with a version that is not higher.
        #[arg(long)]
        force: bool,
        /// The cluster token, if the cluster has one.
        #[arg(long, env = "RAFTWASM_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// CA bundle (PEM) of a TLS cluster: talk HTTPS, trusting only it.
        #[arg(long, env = "RAFTWASM_TLS_CA", value_name = "FILE")]
        tls_ca: Option<PathBuf>,
    },
    /// Show the active guest and the history of swaps.
    #[command(after_help = "Examples:
  raftwasm guest show
  raftwasm guest show --cluster=10.0.0.1:6000 --tls-ca=ca.pem")]
    Show {
        /// HTTP addresses of cluster members, comma-separated.
        #[arg(long, default_value = "127.0.0.1:6000")]
        cluster: String,
        /// CA bundle (PEM) of a TLS cluster: talk HTTPS, trusting only it.
        #[arg(long, env = "RAFTWASM_TLS_CA", value_name = "FILE")]
        tls_ca: Option<PathBuf>,
    },
}

impl GuestCommand {
    /// A client of the cluster this command names.
    fn client(&self) -> anyhow::Result<Client> {
        let (cluster, token, tls_ca) = match self {
            Self::Deploy {
                cluster,
                token,
                tls_ca,
                ..
            } => (cluster, token.clone(), tls_ca),
            Self::Show { cluster, tls_ca } => (cluster, None, tls_ca),
        };
        let endpoints: Vec<String> = cluster.split(',').map(str::to_owned).collect();
        Ok(Client::new(
            &endpoints,
            token,
            tls_ca.as_deref(),
            Duration::from_secs(30),
        )?)
    }
}

/// Runs a guest subcommand, printing progress and the outcome.
///
/// # Errors
/// When the cluster cannot be reached or refuses the guest (with its reason).
pub async fn run(command: GuestCommand) -> anyhow::Result<()> {
    let client = command.client()?;
    match command {
        GuestCommand::Deploy { file, force, .. } => {
            let module =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            println!(
                "uploading {} ({} bytes) to the leader",
                file.display(),
                module.len(),
            );
            let started = Instant::now();
            let record = client
                .deploy(&module, force)
                .await
                .context("the cluster did not take the guest")?;
            println!(
                "committed: {} {} (sha256 {}) is active from log index {} ({:.0} ms)",
                record.name,
                record.version,
                record.hash,
                record.index,
                started.elapsed().as_secs_f64() * 1e3
            );
            client
                .wait_for_guest(&record, Duration::from_secs(30), |member, running| {
                    if running {
                        println!(
                            "  {member}: running it ({:.0} ms)",
                            started.elapsed().as_secs_f64() * 1e3
                        );
                    } else {
                        println!(
                            "  {member}: not running it yet (down or behind); it will switch when it catches up"
                        );
                    }
                })
                .await?;
        }
        GuestCommand::Show { .. } => {
            let guests = client.guest().await.context("cannot read the guest")?;
            println!("{}", serde_json::to_string_pretty(&guests)?);
        }
    }
    Ok(())
}
