//! The command line: node flags (the walkthrough's `--http`, `--raft`,
//! `--node`, `--bootstrap`, `--join`, plus what a real node needs) and the
//! client subcommands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::raft::log_file::LogSync;

/// raftwasm: a Raft-replicated state machine whose logic is a WebAssembly
/// guest. Without a subcommand, runs a node.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub node: NodeConfig,
}

/// Client-side subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Drive a running cluster over HTTP and print throughput and latency.
    Bench(crate::bench::BenchConfig),
    /// Manage the cluster's guest.
    #[command(subcommand)]
    Guest(crate::deploy::GuestCommand),
    /// Read and write the guest-kv cache: get, set, delete, cas.
    #[command(subcommand)]
    Kv(crate::cli::KvCommand),
    /// Show the members: role, term, addresses, applied index, lag, guest.
    Status(crate::cli::StatusArgs),
    /// Add or remove members.
    #[command(subcommand)]
    Member(crate::cli::MemberCommand),
    /// Save a consistent copy of a running cluster's state to a file.
    Backup(crate::backup::client::BackupArgs),
    /// Seed a new data directory from a backup; start it with --bootstrap.
    Restore(crate::backup::client::RestoreArgs),
}

impl Command {
    /// Whether this is one of the client subcommands that print results on
    /// stdout and report through their exit code.
    pub fn is_cli(&self) -> bool {
        matches!(self, Self::Kv(_) | Self::Status(_) | Self::Member(_))
    }
}

/// Everything a node needs to run.
#[derive(Debug, Clone, Args)]
pub struct NodeConfig {
    /// Address for the client HTTP API, `host:port`.
    #[arg(long, default_value = "127.0.0.1:6000")]
    pub http: String,
    /// Address for Raft traffic between nodes, `host:port`.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub raft: String,
    /// Data directory: Raft log, state, node id and compiled guests.
    #[arg(long, default_value = "./node0")]
    pub node: PathBuf,
    /// Start a new single-node cluster if the data directory is new. A used
    /// data directory never bootstraps again.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    pub bootstrap: bool,
    /// HTTP address of a cluster member to join through, `host:port`. Ignored
    /// once this node is a member.
    #[arg(long)]
    pub join: Option<String>,
    /// Guest module (`.wasm`) a bootstrapping node installs; defaults to the
    /// bundled guest-kv cache.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Node id for a new data directory (default: random). A used directory
    /// keeps the id it was created with.
    #[arg(long)]
    pub id: Option<u64>,
    /// Cluster token: when set, joining, removing members, deploying guests
    /// and the peer port all require it. Give every node the same one. An
    /// empty token is refused.
    #[arg(long, env = "RAFTWASM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Listen on a non-loopback address (--http or --raft) without a token.
    /// Anyone who reaches such a node can then change its membership, its
    /// guest and, through the peer port, its state.
    #[arg(long)]
    pub insecure: bool,
    /// A browser origin (`scheme://host[:port]`) allowed to send
    /// state-changing requests; repeat for more. Without it, such requests
    /// with an `Origin` other than this node's own address are refused.
    #[arg(long, value_name = "ORIGIN")]
    pub allow_origin: Vec<String>,
    /// Once both ports listen, write their bound addresses to this file as
    /// JSON (`{"http": .., "raft": ..}`), atomically. With port 0 in
    /// `--http` or `--raft`, this is how a supervisor learns the ports.
    #[arg(long, value_name = "PATH")]
    pub ports_file: Option<PathBuf>,
    /// Followers forward writes to the leader instead of refusing them.
    #[arg(long)]
    pub forward_writes: bool,
    /// Raft heartbeat interval, milliseconds; also the base time an
    /// AppendEntries may take before it is retried.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// Smallest election timeout, milliseconds (the largest is twice this).
    /// A follower calls an election once it has not heard from the leader
    /// for the largest timeout (openraft's leader lease) plus its own random
    /// timeout between the two: 390–520 ms with the defaults.
    #[arg(long, default_value_t = 130)]
    pub election_timeout_ms: u64,
    /// Take a snapshot after this many log entries since the last one.
    #[arg(long, default_value_t = 5000)]
    pub snapshot_entries: u64,
    /// Log entries kept after a snapshot, for followers that lag a little.
    #[arg(long, default_value_t = 1000)]
    pub keep_entries: u64,
    /// Snapshot bytes sent to a peer per message: a snapshot of any size
    /// travels as a sequence of pieces of this size.
    #[arg(long, default_value_t = crate::raft::peer::wire::SNAPSHOT_CHUNK_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=(256 << 20)))]
    pub snapshot_chunk_bytes: usize,
    /// How long a write may wait for its commit before its outcome is
    /// reported unknown, milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub write_timeout_ms: u64,
    /// How an append to the Raft log is made durable: `range` writes the
    /// appended bytes to the disk (`sync_file_range`; survives a process or
    /// OS crash), `fdatasync` also flushes the disk's write cache (survives a
    /// power loss on a disk with a volatile cache; slower).
    #[arg(long, value_enum, default_value_t = LogSync::Range)]
    pub log_sync: LogSync,
    /// Send a new entry to the followers only after the leader has synced
    /// it (openraft's own order), not while it syncs: for comparisons.
    #[arg(long)]
    pub no_early_replication: bool,
    /// Log entries of client writes the leader keeps proposed and without an
    /// outcome yet (committed and applied, or failed). 1: the next batch
    /// waits for the previous entry's outcome and grows meanwhile, while
    /// each entry is replicated during the leader's own sync. More: the next
    /// batch is proposed once the previous one is synced on the leader;
    /// more, smaller entries in flight, which measured slower on a few
    /// shared cores but may hide long network round trips.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub pipeline_depth: usize,
    /// Worker threads of the node's async runtime (default: one per CPU).
    /// Several nodes sharing a few cores run faster with 1 or 2 each.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Time a client has to send a request's headers (also how long an idle
    /// keep-alive connection stays open), and a peer its hello, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// How long a connection may make no progress while the node waits for
    /// it: a request body or a response a client does not read (HTTP); a
    /// silent connection or a stalled frame (peer port). Milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub idle_timeout_ms: u64,
    /// HTTP connections served at once; more are answered 503 and closed.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// How long a linearizable read (or lease read without a lease) may wait
    /// for its leadership confirmation before it answers 504, milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub read_timeout_ms: u64,
    /// The most bytes of client writes waiting for their commit; a write
    /// beyond it is answered 503.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_write_queue_bytes: usize,
    /// How long a joining node has to catch up as a learner before it is
    /// removed again instead of becoming a voter, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub join_timeout_ms: u64,
    /// Peer-port connections served at once; more are closed.
    #[arg(long, default_value_t = 64)]
    pub max_peer_connections: usize,
    /// The most recent entries whose changes `GET /watch?from=` can replay
    /// (kept in memory; empty again after a restart).
    #[arg(long, default_value_t = 10_000)]
    pub watch_window_entries: usize,
    /// The most bytes of changes the watch replay window keeps.
    #[arg(long, default_value_t = 64 << 20)]
    pub watch_window_bytes: usize,
    /// How many entries a watcher may fall behind before it is dropped.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub watch_queue_entries: u32,
    /// Watchers (`GET /watch`) served at once; more are answered 503.
    #[arg(long, default_value_t = 256)]
    pub max_watchers: usize,
    /// This node's certificate chain (PEM, its own certificate first). With
    /// --tls-key and --tls-ca, turns on TLS for the HTTP API and the peer
    /// port; every node of a cluster must then use TLS.
    #[arg(long, env = "RAFTWASM_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "RAFTWASM_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that peers' certificates, both ways on the peer port,
    /// and the HTTP API of other members are verified against.
    #[arg(long, env = "RAFTWASM_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

/// Why a node refuses to start with its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--token ''` or `RAFTWASM_TOKEN=`: would read as "a token is set" and
    /// let requests without one through.
    #[error(
        "the cluster token is empty; set --token (or RAFTWASM_TOKEN) to a secret, or leave it unset"
    )]
    EmptyToken,
    /// A non-loopback listener without a token and without `--insecure`.
    #[error(
        "--{flag}={addr} is not a loopback address and no cluster token is set, so anyone who \
         reaches it could change the cluster; set --token (or RAFTWASM_TOKEN), listen on \
         127.0.0.1, or pass --insecure to allow it anyway"
    )]
    OpenWithoutToken {
        /// The flag that names the address.
        flag: &'static str,
        /// The address the node listens on.
        addr: SocketAddr,
    },
}

impl NodeConfig {
    /// The write timeout.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// How long a linearizable read may wait for its confirmation.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }

    /// How long a joining node has to catch up.
    pub fn join_timeout(&self) -> Duration {
        Duration::from_millis(self.join_timeout_ms)
    }

    /// The bounds of each HTTP connection.
    pub fn http_limits(&self) -> crate::http_server::ConnectionLimits {
        crate::http_server::ConnectionLimits {
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections.max(1),
        }
    }

    /// The bounds of the watch feed.
    pub fn watch_limits(&self) -> crate::watch::WatchLimits {
        crate::watch::WatchLimits {
            window_entries: self.watch_window_entries,
            window_bytes: self.watch_window_bytes,
            queue_entries: self.watch_queue_entries as usize,
            max_watchers: self.max_watchers,
        }
    }

    /// The bounds of each peer-port connection.
    pub fn peer_limits(&self) -> crate::raft::peer::PeerLimits {
        crate::raft::peer::PeerLimits {
            hello_timeout: Duration::from_millis(self.header_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_peer_connections.max(1),
        }
    }

    /// Whether this node serves (and calls other members) over TLS. Only
    /// meaningful once [`NodeConfig::tls`] has accepted the flags.
    pub fn tls_on(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// `addr` (another member's HTTP address) as a base URL with this
    /// cluster's scheme.
    pub fn base_url(&self, addr: &str) -> String {
        crate::proto::base_url(addr, self.tls_on())
    }

    /// Reads the TLS files: `None` without TLS flags. The certificate and
    /// key come together, and need the CA that peers are verified against.
    ///
    /// # Errors
    /// [`TlsError`](crate::tls::TlsError) naming the flag to fix.
    pub fn tls(&self) -> Result<Option<crate::tls::Tls>, crate::tls::TlsError> {
        use crate::tls::{Tls, TlsError};
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Tls::from_files(cert, key, ca).map(Some),
            (Some(_), None, _) | (None, Some(_), _) => Err(TlsError::CertWithoutKey),
            (Some(_), Some(_), None) => Err(TlsError::MissingCa),
            (None, None, Some(_)) => Err(TlsError::CaWithoutCert),
        }
    }

    /// Checks the token and the listening addresses (`http`, `raft`, as
    /// bound) before the node serves anything: a token must not be empty, and
    /// a node without one listens on loopback only, unless `--insecure`.
    /// TLS does not lift this rule: it keeps traffic private and lets peers
    /// verify each other, while the token decides who may change the cluster.
    /// Returns the non-loopback addresses `--insecure` lets through, so the
    /// caller can warn about them.
    ///
    /// # Errors
    /// [`ConfigError`] saying which flag to change.
    pub fn check_security(
        &self,
        http: SocketAddr,
        raft: SocketAddr,
    ) -> Result<Vec<(&'static str, SocketAddr)>, ConfigError> {
        match self.token.as_deref() {
            Some("") => Err(ConfigError::EmptyToken),
            Some(_) => Ok(Vec::new()),
            None => {
                let open: Vec<_> = [("http", http), ("raft", raft)]
                    .into_iter()
                    .filter(|(_, addr)| !addr.ip().to_canonical().is_loopback())
                    .collect();
                match open.first() {
                    Some(&(flag, addr)) if !self.insecure => {
                        Err(ConfigError::OpenWithoutToken { flag, addr })
                    }
                    _ => Ok(open),
                }
            }
        }
    }
}

/// Rewrites Go-style single-dash long flags (`-bootstrap=true`) into clap's
/// `--bootstrap=true`, so the walkthrough's spelling works as written.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, arg)| {
            let bytes = arg.as_bytes();
            let go_style =
                i > 0 && bytes.len() > 2 && bytes[0] == b'-' && bytes[1].is_ascii_alphabetic();
            if go_style { format!("-{arg}") } else { arg }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let args = normalize_args(args.iter().map(|s| s.to_string()));
        Cli::try_parse_from(args).expect("parses")
    }

    #[test]
    fn walkthrough_flags_parse_in_both_spellings() {
        let cli = parse(&[
            "raftwasm",
            "--http=127.0.0.1:6000",
            "--raft=127.0.0.1:7000",
            "--node=./node0",
            "-bootstrap=true",
        ]);
        assert!(cli.node.bootstrap);
        assert_eq!(cli.node.http, "127.0.0.1:6000");
        let cli = parse(&[
            "raftwasm",
            "-http=127.0.0.1:6001",
            "--join=127.0.0.1:6000",
            "--bootstrap",
        ]);
        assert!(cli.node.bootstrap);
        assert_eq!(cli.node.join.as_deref(), Some("127.0.0.1:6000"));
        let cli = parse(&["raftwasm", "--bootstrap=false"]);
        assert!(!cli.node.bootstrap);
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn an_empty_token_is_refused() {
        let cli = parse(&["raftwasm", "--token="]);
        let checked = cli
            .node
            .check_security(addr("127.0.0.1:1"), addr("127.0.0.1:2"));
        assert!(matches!(checked, Err(ConfigError::EmptyToken)));
    }

    #[test]
    fn only_loopback_is_open_without_a_token() {
        let loopback = parse(&["raftwasm"]).node;
        for (http, raft) in [
            ("127.0.0.1:1", "127.0.0.2:2"),
            ("[::1]:1", "[::ffff:127.0.0.1]:2"),
        ] {
            assert!(loopback.check_security(addr(http), addr(raft)).is_ok());
        }
        let refused = loopback.check_security(addr("127.0.0.1:1"), addr("0.0.0.0:2"));
        assert!(matches!(
            refused,
            Err(ConfigError::OpenWithoutToken { flag: "raft", .. })
        ));
        let insecure = parse(&["raftwasm", "--insecure"]).node;
        let open = insecure.check_security(addr("10.0.0.1:1"), addr("127.0.0.1:2"));
        assert_eq!(open.ok(), Some(vec![("http", addr("10.0.0.1:1"))]));
        let token = parse(&["raftwasm", "--token=s3cret"]).node;
        assert!(
            token
                .check_security(addr("0.0.0.0:1"), addr("0.0.0.0:2"))
                .is_ok()
        );
    }

    #[test]
    fn tls_flags_come_together() {
        use crate::tls::TlsError;
        let tls = |flags: &[&str]| {
            let args: Vec<&str> = std::iter::once("raftwasm")
                .chain(flags.iter().copied())
                .collect();
            parse(&args).node.tls()
        };
        assert!(matches!(tls(&[]), Ok(None)));
        let refused = tls(&["--tls-cert=c.pem"]);
        assert!(
            matches!(refused, Err(TlsError::CertWithoutKey)),
            "{refused:?}"
        );
        let refused = tls(&["--tls-key=k.pem", "--tls-ca=ca.pem"]);
        assert!(
            matches!(refused, Err(TlsError::CertWithoutKey)),
            "{refused:?}"
        );
        let refused = tls(&["--tls-cert=c.pem", "--tls-key=k.pem"]);
        assert!(matches!(refused, Err(TlsError::MissingCa)), "{refused:?}");
        let refused = tls(&["--tls-ca=ca.pem"]);
        assert!(
            matches!(refused, Err(TlsError::CaWithoutCert)),
            "{refused:?}"
        );
    }

    #[test]
    fn the_url_scheme_follows_tls() {
        let plain = parse(&["raftwasm"]).node;
        assert_eq!(plain.base_url("127.0.0.1:6001"), "http://127.0.0.1:6001");
        let tls = parse(&["raftwasm", "--tls-cert=c", "--tls-key=k", "--tls-ca=ca"]).node;
        assert_eq!(
            tls.base_url("http://127.0.0.1:6001"),
            "https://127.0.0.1:6001"
        );
    }
}
