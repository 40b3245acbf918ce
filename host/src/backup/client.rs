//! `raftwasm backup`: saves a running cluster's state to a file;
//! `raftwasm restore`: seeds a new data directory from one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::AsyncWriteExt as _;

use super::BackupHeader;
use crate::client::ClientError;
use crate::runtime::{GuestRuntime, Limits};

/// `raftwasm backup`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  raftwasm backup -o cluster.backup
  raftwasm backup --cluster=10.0.0.1:6000,10.0.0.2:6000 --token=$TOKEN -o cluster.backup")]
pub struct BackupArgs {
    /// Where the cluster is; the leader serves the backup.
    #[command(flatten)]
    pub cluster: crate::cli::ClusterArgs,
    /// The file to write (replaced only once the new backup is whole and
    /// checked).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
}

/// `raftwasm restore`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  raftwasm restore cluster.backup --node=./node0
  raftwasm --http=127.0.0.1:6000 --raft=127.0.0.1:7000 --node=./node0 --bootstrap")]
pub struct RestoreArgs {
    /// The backup file, from `raftwasm backup`.
    pub file: PathBuf,
    /// The new node's data directory: must be missing or empty. Start the
    /// node on it with `--bootstrap` afterwards.
    #[arg(long, value_name = "DIR")]
    pub node: PathBuf,
}

/// Prints what a backup holds.
fn describe(header: &BackupHeader) -> String {
    format!(
        "log index {} ({} entries), state hash {}, guest {}",
        header.index(),
        header.entries,
        header.state_hash,
        header.guest_hash.as_deref().unwrap_or("none"),
    )
}

/// How long a whole backup download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// Downloads the leader's backup to `part`, synced. Returns the URL it came
/// from.
async fn download(args: &BackupArgs, part: &Path) -> anyhow::Result<String> {
    let client = args.cluster.client()?;
    let mut out = tokio::fs::File::create(part)
        .await
        .with_context(|| format!("cannot create {}", part.display()))?;
    let url = client
        .download("/backup", DOWNLOAD_TIMEOUT, &mut out)
        .await
        .map_err(|error| match error {
            ClientError::Refused { status, .. } if status == reqwest::StatusCode::UNAUTHORIZED => {
                anyhow::anyhow!("{error}; pass the cluster's --token")
            }
            other => anyhow::anyhow!("no backup: {other}"),
        })?;
    out.flush().await?;
    out.sync_all()
        .await
        .with_context(|| format!("cannot sync {}", part.display()))?;
    Ok(url)
}

/// Runs `raftwasm backup`: streams the leader's backup to `FILE.part`,
/// syncs it, checks it whole, and renames it to `FILE`.
///
/// # Errors
/// When no member serves a backup, or what arrived is not a whole backup.
pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut part = args.output.clone().into_os_string();
    part.push(".part");
    let part = PathBuf::from(part);
    let result = async {
        let url = download(&args, &part).await?;
        let checked = {
            let part = part.clone();
            tokio::task::spawn_blocking(move || {
                let runtime = GuestRuntime::new(Limits::default(), None)?;
                anyhow::Ok(super::verify(&part, &runtime))
            })
            .await??
        };
        let header = checked.map_err(|e| {
            anyhow::anyhow!("the backup from {url} is not whole ({e}); take it again")
        })?;
        tokio::fs::rename(&part, &args.output)
            .await
            .with_context(|| format!("cannot move the backup to {}", args.output.display()))?;
        anyhow::Ok((url, header))
    }
    .await;
    let (url, header) = match result {
        Ok(done) => done,
        Err(error) => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(error);
        }
    };
    let size = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    println!(
        "backup of {url} written to {}: {}; {size} bytes in {:.0} ms",
        args.output.display(),
        describe(&header),
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Runs `raftwasm restore`: checks the whole file, then seeds the data
/// directory.
///
/// # Errors
/// When the directory is in use or the file is not a usable backup; nothing
/// is written then.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let (file, node) = (args.file.clone(), args.node.clone());
    let header =
        tokio::task::spawn_blocking(move || super::restore::restore(&file, &node)).await??;
    println!(
        "restored {} into {}: {}\nstart it with: raftwasm --node {} --bootstrap --http HOST:PORT --raft HOST:PORT",
        args.file.display(),
        args.node.display(),
        describe(&header),
        args.node.display(),
    );
    Ok(())
}
