//! The command line: node flags (the walkthrough's `--http`, `--raft`,
//! `--node`, `--bootstrap`, `--join`, plus what a real node needs) and the
//! client subcommands.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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
    /// and the peer port all require it. Give every node the same one.
    #[arg(long, env = "RAFTWASM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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
    /// timeout between the two: 450–600 ms with the defaults.
    #[arg(long, default_value_t = 150)]
    pub election_timeout_ms: u64,
    /// Take a snapshot after this many log entries since the last one.
    #[arg(long, default_value_t = 5000)]
    pub snapshot_entries: u64,
    /// Log entries kept after a snapshot, for followers that lag a little.
    #[arg(long, default_value_t = 1000)]
    pub keep_entries: u64,
    /// How long a write may wait for its commit before its outcome is
    /// reported unknown, milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub write_timeout_ms: u64,
    /// Worker threads of the node's async runtime (default: one per CPU).
    /// Several nodes sharing a few cores run faster with 1 or 2 each.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
}

impl NodeConfig {
    /// The write timeout.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
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
}
