//! `raftwasm guest …`: deploy a guest to a running cluster and show which
//! guest runs.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, bail};

/// Guest subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum GuestCommand {
    /// Upload a `.wasm` guest; every node switches to it at the same log index.
    Deploy {
        /// The module: a wasm32 core module built with wit-bindgen, or a component.
        file: PathBuf,
        /// HTTP address of any cluster member.
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
    Show {
        /// HTTP address of any cluster member.
        #[arg(long, default_value = "127.0.0.1:6000")]
        cluster: String,
        /// CA bundle (PEM) of a TLS cluster: talk HTTPS, trusting only it.
        #[arg(long, env = "RAFTWASM_TLS_CA", value_name = "FILE")]
        tls_ca: Option<PathBuf>,
    },
}

impl GuestCommand {
    fn tls_ca(&self) -> Option<&std::path::Path> {
        match self {
            Self::Deploy { tls_ca, .. } | Self::Show { tls_ca, .. } => tls_ca.as_deref(),
        }
    }
}

/// Polls every member's `/status` until it runs the guest `hash`.
async fn wait_for_every_node(
    client: &reqwest::Client,
    tls: bool,
    cluster: &str,
    hash: &str,
    started: Instant,
) -> anyhow::Result<()> {
    let base = |addr: &str| crate::tls::base_url(addr, tls);
    let status: serde_json::Value = client
        .get(format!("{}/status", base(cluster)))
        .send()
        .await?
        .json()
        .await?;
    let members: Vec<String> = status["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["http"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    for member in members {
        loop {
            let status = client.get(format!("{}/status", base(&member))).send().await;
            let current = match status {
                Ok(response) => response.json::<serde_json::Value>().await.ok(),
                Err(_) => None,
            };
            if current.as_ref().is_some_and(|s| s["guest"]["hash"] == hash) {
                println!(
                    "  {member}: running it ({:.0} ms)",
                    started.elapsed().as_secs_f64() * 1e3
                );
                break;
            }
            if Instant::now() > deadline {
                println!(
                    "  {member}: not running it yet (down or behind); it will switch when it catches up"
                );
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Runs a guest subcommand, printing progress and the outcome.
///
/// # Errors
/// When the cluster cannot be reached or refuses the guest (with its reason).
pub async fn run(command: GuestCommand) -> anyhow::Result<()> {
    let tls_ca = command.tls_ca();
    let client = crate::tls::http_client_builder(tls_ca)?.build()?;
    let tls = tls_ca.is_some();
    let base = |addr: &str| crate::tls::base_url(addr, tls);
    match command {
        GuestCommand::Deploy {
            file,
            cluster,
            force,
            token,
            ..
        } => {
            let module =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            println!(
                "uploading {} ({} bytes) to {}",
                file.display(),
                module.len(),
                base(&cluster)
            );
            let started = Instant::now();
            let mut request = client
                .post(format!("{}/guest?force={force}", base(&cluster)))
                .body(module);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.context("cannot reach the cluster")?;
            let status = response.status();
            let text = response.text().await?;
            if !status.is_success() {
                bail!("the cluster refused the guest ({status}): {text}");
            }
            let record: serde_json::Value = serde_json::from_str(&text)?;
            let hash = record["hash"].as_str().unwrap_or_default().to_owned();
            println!(
                "committed: {} {} (sha256 {hash}) is active from log index {} ({:.0} ms)",
                record["name"].as_str().unwrap_or("?"),
                record["version"].as_str().unwrap_or("?"),
                record["index"],
                started.elapsed().as_secs_f64() * 1e3
            );
            wait_for_every_node(&client, tls, &cluster, &hash, started).await?;
        }
        GuestCommand::Show { cluster, .. } => {
            let text = client
                .get(format!("{}/guest", base(&cluster)))
                .send()
                .await
                .context("cannot reach the cluster")?
                .text()
                .await?;
            let value: serde_json::Value = serde_json::from_str(&text)?;
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
    }
    Ok(())
}
