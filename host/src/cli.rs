//! The client subcommands `raftwasm kv` (including `kv watch`), `raftwasm status` and
//! `raftwasm member`: thin layers over [`Client`] that read values from
//! arguments or stdin, print results, and exit with documented codes.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::client::{Cas, Client, ClientError, Consistency};
use crate::proto::{JoinRequest, NodeId, Status};
use crate::watch::sse::ChangeEvent;

/// The exit codes, as every subcommand's `--help` shows them (a macro, so
/// that `concat!` can append them to each subcommand's examples).
macro_rules! exit_codes {
    () => {
        "\n\nExit codes:
  0  success
  1  the key does not exist (get, delete) or a cas found another value
  2  usage error, or the cluster refused the request (a 4xx answer: bad input,
     a wrong token, an unknown member)
  3  the cluster could not serve it: no endpoint reachable, no leader within --timeout,
     a 5xx answer, or a write whose outcome is unknown"
    };
}

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES: &str = exit_codes!();

/// Where the cluster is and how to talk to it; every client subcommand
/// takes these.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// HTTP addresses of cluster members, comma-separated; the leader is
    /// found among them (and through the leader they name).
    #[arg(
        long,
        env = "RAFTWASM_CLUSTER",
        value_delimiter = ',',
        default_value = "127.0.0.1:6000"
    )]
    pub cluster: Vec<String>,
    /// The cluster token, if the cluster has one.
    #[arg(long, env = "RAFTWASM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA bundle (PEM) of a TLS cluster: talk HTTPS, trusting only it.
    #[arg(long, env = "RAFTWASM_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// How long to look for a leader and wait for the answer, seconds.
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    pub timeout: f64,
}

fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!(
            "`{text}` is not a number of seconds between 0 and 86400"
        )),
    }
}

impl ClusterArgs {
    /// A client of the cluster these arguments name.
    ///
    /// # Errors
    /// [`ClientError::Setup`] for an empty endpoint list or a bad CA file.
    pub fn client(&self) -> Result<Client, ClientError> {
        Client::new(
            &self.cluster,
            self.token.clone(),
            self.tls_ca.as_deref(),
            Duration::from_secs_f64(self.timeout),
        )
    }
}

/// `raftwasm kv …`: the bundled guest-kv cache's commands.
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Print the value of KEY (raw bytes, no newline added).
    #[command(after_help = concat!("Examples:
  raftwasm kv get user:1
  raftwasm kv get user:1 --consistency=stale --cluster=10.0.0.1:6000,10.0.0.2:6000
  raftwasm kv get photo > photo.jpg", exit_codes!()))]
    Get {
        /// The key.
        key: String,
        /// linearizable (default) sees every acknowledged write; lease is
        /// cheaper on the leader; stale reads one node's state.
        #[arg(long, value_enum, default_value_t)]
        consistency: Consistency,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Store VALUE under KEY.
    #[command(after_help = concat!("Examples:
  raftwasm kv set user:1 alice
  raftwasm kv set session:9 token --ttl=30
  raftwasm kv set photo - < photo.jpg      (or no VALUE: reads stdin)", exit_codes!()))]
    Set {
        /// The key.
        key: String,
        /// The value; `-` or none reads it from stdin, byte for byte.
        value: Option<String>,
        /// Expire the key after this many seconds.
        #[arg(long, value_parser = seconds)]
        ttl: Option<f64>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Delete KEY; exits 1 when it did not exist.
    #[command(after_help = concat!("Examples:
  raftwasm kv delete user:1
  raftwasm kv delete user:1 || echo \"there was no user:1\"", exit_codes!()))]
    Delete {
        /// The key.
        key: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Store VALUE under KEY only if its value is --expected (or, without
    /// it, only if KEY is absent); exits 1 and prints the current value
    /// when it is not.
    #[command(after_help = concat!("Examples:
  raftwasm kv cas lock:job1 worker-7                    (take the lock if free)
  raftwasm kv cas counter 2 --expected=1
  printf new | raftwasm kv cas config - --expected=old", exit_codes!()))]
    Cas {
        /// The key.
        key: String,
        /// The new value; `-` or none reads it from stdin, byte for byte.
        value: Option<String>,
        /// The value KEY must hold now; without it, KEY must be absent.
        #[arg(long)]
        expected: Option<String>,
        /// Expire the key after this many seconds.
        #[arg(long, value_parser = seconds)]
        ttl: Option<f64>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Print every change under PREFIX as it is applied, one line each
    /// (`INDEX put KEY VALUE` or `INDEX delete KEY`), until interrupted.
    /// Follows the cluster through node failures, resuming where it was.
    /// Keys and values that are not UTF-8 are printed as `base64:…`.
    #[command(after_help = concat!("Examples:
  raftwasm kv watch user:                 (changes from now on)
  raftwasm kv watch user: --from=120      (replay from log index 120, then follow)
  raftwasm kv watch '' --json | jq .key   (every key, one JSON object a line)", exit_codes!()))]
    Watch {
        /// The key prefix; empty watches every key.
        prefix: String,
        /// Replay the changes of entries from this log index on first
        /// (nodes keep a bounded window of recent ones).
        #[arg(long)]
        from: Option<u64>,
        /// Print each change as the JSON object of the HTTP stream.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// `raftwasm status`: the members and how far each has come.
#[derive(Debug, Args)]
#[command(after_help = concat!("Examples:
  raftwasm status
  raftwasm status --cluster=10.0.0.1:6000,10.0.0.2:6000,10.0.0.3:6000
  raftwasm status --json | jq .leader_http", exit_codes!()))]
pub struct StatusArgs {
    /// Print the leader's /status as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `raftwasm member …`: membership changes, through the leader.
#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Add a running node (started without --join) as a voter: it first
    /// catches up as a learner.
    #[command(after_help = concat!("Examples:
  raftwasm member add 4 --http=10.0.0.4:6000 --raft=10.0.0.4:7000", exit_codes!()))]
    Add {
        /// The node's id (its --id).
        id: NodeId,
        /// The node's HTTP address.
        #[arg(long)]
        http: String,
        /// The node's peer address.
        #[arg(long)]
        raft: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Remove a member (voter or learner).
    #[command(after_help = concat!("Examples:
  raftwasm member remove 4", exit_codes!()))]
    Remove {
        /// The member's id, as `raftwasm status` shows it.
        id: NodeId,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// A failure the CLI reports: a message for stderr and an exit code.
#[derive(Debug)]
pub struct Failure {
    /// The exit code (see [`EXIT_CODES`]).
    pub code: u8,
    /// What to print, if anything.
    pub message: Option<String>,
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        Self {
            code: error.exit_code(),
            message: Some(error.to_string()),
        }
    }
}

impl Failure {
    fn quiet(code: u8) -> Self {
        Self {
            code,
            message: None,
        }
    }

    fn usage(message: String) -> Self {
        Self {
            code: 2,
            message: Some(message),
        }
    }
}

/// The value from the argument, or from stdin for `-` or none.
fn value_bytes(value: Option<String>) -> Result<Vec<u8>, Failure> {
    match value.as_deref() {
        Some("-") | None => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .map_err(|e| Failure::usage(format!("cannot read the value from stdin: {e}")))?;
            Ok(bytes)
        }
        Some(value) => Ok(value.as_bytes().to_vec()),
    }
}

fn ttl(seconds: Option<f64>) -> Option<Duration> {
    seconds.map(Duration::from_secs_f64)
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Failure::usage(format!("cannot write to stdout: {e}")))
}

/// Runs a `kv` subcommand.
///
/// # Errors
/// A [`Failure`] with the exit code the outcome maps to.
pub async fn kv(command: KvCommand) -> Result<(), Failure> {
    match command {
        KvCommand::Get {
            key,
            consistency,
            cluster,
        } => match cluster.client()?.get(key.as_bytes(), consistency).await? {
            Some(value) => write_stdout(&value),
            None => Err(Failure {
                code: 1,
                message: Some(format!("key `{key}` does not exist")),
            }),
        },
        KvCommand::Set {
            key,
            value,
            ttl: seconds,
            cluster,
        } => {
            let client = cluster.client()?;
            let value = value_bytes(value)?;
            client.set(key.as_bytes(), &value, ttl(seconds)).await?;
            Ok(())
        }
        KvCommand::Delete { key, cluster } => {
            if cluster.client()?.delete(key.as_bytes()).await? {
                Ok(())
            } else {
                Err(Failure {
                    code: 1,
                    message: Some(format!("key `{key}` does not exist")),
                })
            }
        }
        KvCommand::Cas {
            key,
            value,
            expected,
            ttl: seconds,
            cluster,
        } => {
            let client = cluster.client()?;
            let value = value_bytes(value)?;
            let expected = expected.as_ref().map(String::as_bytes);
            match client
                .cas(key.as_bytes(), expected, &value, ttl(seconds))
                .await?
            {
                Cas::Swapped => Ok(()),
                Cas::Mismatch(current) => {
                    write_stdout(&current)?;
                    Err(Failure::quiet(1))
                }
            }
        }
        KvCommand::Watch {
            prefix,
            from,
            json,
            cluster,
        } => {
            let client = cluster.client()?;
            client
                .watch(prefix.as_bytes(), from, |change| {
                    let line = watch_line(change, json);
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{line}")
                        .and_then(|()| out.flush())
                        .map_err(|e| ClientError::Setup(format!("cannot write to stdout: {e}")))
                })
                .await?;
            Ok(())
        }
    }
}

/// How `kv watch` prints one change.
fn watch_line(change: &ChangeEvent<'_>, json: bool) -> String {
    if json {
        return serde_json::to_string(change).unwrap_or_default();
    }
    let shown = |text: &str| {
        if change.base64 {
            format!("base64:{text}")
        } else {
            text.to_owned()
        }
    };
    match &change.value {
        Some(value) => format!(
            "{} put {} {}",
            change.index,
            shown(&change.key),
            shown(value)
        ),
        None => format!("{} delete {}", change.index, shown(&change.key)),
    }
}

/// Runs `status`: the leader's view, and each member's own.
///
/// # Errors
/// A [`Failure`] when no leader answers.
pub async fn status(args: StatusArgs) -> Result<(), Failure> {
    let client = args.cluster.client()?;
    let leader = client.status().await?;
    if args.json {
        let text = serde_json::to_string_pretty(&leader)
            .map_err(|e| Failure::usage(format!("cannot print the status: {e}")))?;
        return write_stdout(format!("{text}\n").as_bytes());
    }
    let mut rows = Vec::new();
    for member in &leader.members {
        let own = if member.id == leader.id {
            Ok(leader.clone())
        } else {
            client.node_status(&member.http).await
        };
        rows.push(row(&leader, member.id, own));
    }
    write_stdout(table(&leader, &rows).as_bytes())
}

/// One member's table row.
fn row(leader: &Status, id: NodeId, own: Result<Status, ClientError>) -> [String; 8] {
    let member = leader.member(id);
    let http = member.map(|m| m.http.clone()).unwrap_or_default();
    let raft = member.map(|m| m.raft.clone()).unwrap_or_default();
    let dash = || "-".to_owned();
    match own {
        Ok(own) => {
            let role = match member {
                Some(m) if !m.voter => "learner".to_owned(),
                _ => own.role.to_string(),
            };
            let lag = match (leader.last_log_index, own.applied) {
                (Some(last), applied) => last.saturating_sub(applied.unwrap_or(0)).to_string(),
                (None, _) => dash(),
            };
            let guest = own
                .guest
                .map_or_else(dash, |g| format!("{} {}", g.name, g.version));
            [
                id.to_string(),
                role,
                own.term.to_string(),
                http,
                raft,
                own.applied.map_or_else(dash, |a| a.to_string()),
                lag,
                guest,
            ]
        }
        Err(_) => [
            id.to_string(),
            "unreachable".to_owned(),
            dash(),
            http,
            raft,
            dash(),
            dash(),
            dash(),
        ],
    }
}

fn table(leader: &Status, rows: &[[String; 8]]) -> String {
    let header = [
        "ID", "ROLE", "TERM", "HTTP", "RAFT", "APPLIED", "LAG", "GUEST",
    ];
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut out = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&header);
    for row in rows {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    if leader.membership_changing {
        out.push_str("a membership change is in progress\n");
    }
    out
}

/// Runs a `member` subcommand.
///
/// # Errors
/// A [`Failure`] with the exit code the outcome maps to.
pub async fn member(command: MemberCommand) -> Result<(), Failure> {
    match command {
        MemberCommand::Add {
            id,
            http,
            raft,
            cluster,
        } => {
            let request = JoinRequest { id, http, raft };
            cluster.client()?.join(&request).await?;
            println!("node {id} is a voter");
            Ok(())
        }
        MemberCommand::Remove { id, cluster } => {
            if cluster.client()?.remove(id).await? {
                println!("node {id} removed");
                Ok(())
            } else {
                Err(Failure::usage(format!(
                    "node {id} is not a member; `raftwasm status` lists the members"
                )))
            }
        }
    }
}
