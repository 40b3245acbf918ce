//! `TestCluster`: real `raftwasm` processes on 127.0.0.1 ports chosen at run
//! time, each with its own data directory and log file, driven over HTTP
//! (or HTTPS, with certificates made for the test, after
//! [`TestCluster::with_tls`]).
//!
//! Child processes are killed on drop. A failed test keeps the temp dir and
//! prints where it is and the tail of every node's log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use raftwasm::proto::Status;

use crate::certs::TestCa;

/// How long cluster operations may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The `raftwasm` binary built with these tests, for nodes and for client
/// subcommands.
///
/// # Panics
/// When it has not been built.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/raftwasm
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("raftwasm"))
        .expect("target dir");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --release -p raftwasm` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// A free loopback port, chosen by the OS.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One node: its addresses, data dir, log file and (while running) process.
#[derive(Debug)]
pub struct TestNode {
    /// `127.0.0.1:port` of the HTTP API.
    pub http: String,
    /// `127.0.0.1:port` of the peer port.
    pub raft: String,
    /// The data directory.
    pub dir: PathBuf,
    /// The node's log file.
    pub log: PathBuf,
    child: Option<Child>,
    extra_args: Vec<String>,
}

impl TestNode {
    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A set of nodes under test.
#[derive(Debug)]
pub struct TestCluster {
    /// The nodes, in the order they were added.
    pub nodes: Vec<TestNode>,
    dir: Option<tempfile::TempDir>,
    client: reqwest::Client,
    tls: Option<TestCa>,
}

impl TestCluster {
    /// An empty cluster in a new temp dir.
    pub fn new() -> Self {
        Self {
            nodes: Vec::new(),
            dir: Some(
                tempfile::Builder::new()
                    .prefix("raftwasm-test-")
                    .tempdir()
                    .expect("temp dir"),
            ),
            client: Self::client_builder().build().expect("http client"),
            tls: None,
        }
    }

    fn client_builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder().timeout(Duration::from_secs(10))
    }

    /// Turns on TLS for the nodes added from now on: a CA is made for this
    /// cluster, and each node gets a certificate it signs (for 127.0.0.1)
    /// and the `--tls-cert`, `--tls-key` and `--tls-ca` flags. The cluster's
    /// client then speaks HTTPS and trusts that CA only.
    ///
    /// # Errors
    /// When the CA cannot be made.
    pub fn with_tls(mut self) -> anyhow::Result<Self> {
        let ca = TestCa::new(self.root(), "cluster-ca")?;
        self.client = Self::client_builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes())?)
            .build()?;
        self.tls = Some(ca);
        Ok(self)
    }

    /// The CA of a cluster [`with_tls`](TestCluster::with_tls).
    pub fn ca(&self) -> Option<&TestCa> {
        self.tls.as_ref()
    }

    /// The cluster's HTTP client (it trusts the cluster's CA, with TLS).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The URL of `path` on node `i`, with the cluster's scheme.
    pub fn url(&self, i: usize, path: &str) -> String {
        let base = raftwasm::proto::base_url(&self.nodes[i].http, self.tls.is_some());
        format!("{base}{path}")
    }

    /// Starts a cluster of `n` nodes: the first bootstraps, the others join
    /// it, and this returns once all are voters and the guest is active.
    /// `args` are extra flags for every node.
    pub async fn start(n: usize, args: &[&str]) -> anyhow::Result<Self> {
        Self::new().start_nodes(n, args).await
    }

    /// [`TestCluster::start`] on this (empty) cluster, for one set up first,
    /// e.g. [`with_tls`](TestCluster::with_tls).
    pub async fn start_nodes(self, n: usize, args: &[&str]) -> anyhow::Result<Self> {
        let mut cluster = self;
        cluster.add_node(args);
        cluster.spawn(0, &["--bootstrap=true"])?;
        cluster.wait_for_guest(0).await?;
        for i in 1..n {
            cluster.add_node(args);
            let join = format!("--join={}", cluster.nodes[0].http);
            cluster.spawn(i, &[&join])?;
        }
        cluster.wait_for_voters(n).await?;
        Ok(cluster)
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().expect("temp dir").path()
    }

    /// Adds a node (not started) with fresh ports and data dir, and with TLS
    /// its certificate.
    ///
    /// # Panics
    /// When the node's certificate cannot be made.
    pub fn add_node(&mut self, args: &[&str]) -> usize {
        let i = self.nodes.len();
        let mut extra_args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if let Some(ca) = &self.tls {
            let cert = ca
                .node_cert(self.root(), &format!("node{i}"))
                .expect("a node certificate");
            extra_args.extend([
                format!("--tls-cert={}", cert.cert.display()),
                format!("--tls-key={}", cert.key.display()),
                format!("--tls-ca={}", ca.file.display()),
            ]);
        }
        let node = TestNode {
            http: format!("127.0.0.1:{}", free_port()),
            raft: format!("127.0.0.1:{}", free_port()),
            dir: self.root().join(format!("node{i}")),
            log: self.root().join(format!("node{i}.log")),
            child: None,
            extra_args,
        };
        self.nodes.push(node);
        i
    }

    /// Starts node `i` with its addresses, data dir and `args`.
    pub fn spawn(&mut self, i: usize, args: &[&str]) -> anyhow::Result<()> {
        self.spawn_with_env(i, args, &[])
    }

    /// [`TestCluster::spawn`] with extra environment variables for the node.
    pub fn spawn_with_env(
        &mut self,
        i: usize,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        anyhow::ensure!(node.child.is_none(), "node {i} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(binary())
            .arg(format!("--http={}", node.http))
            .arg(format!("--raft={}", node.raft))
            .arg(format!("--node={}", node.dir.display()))
            .args(&node.extra_args)
            .args(args)
            .env("RUST_LOG", "info,raftwasm=debug,openraft=warn")
            .env("NO_COLOR", "1")
            .env_remove("RAFTWASM_TOKEN")
            .env_remove("RAFTWASM_TLS_CERT")
            .env_remove("RAFTWASM_TLS_KEY")
            .env_remove("RAFTWASM_TLS_CA")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {i}"))?;
        node.child = Some(child);
        Ok(())
    }

    /// Kills node `i` with SIGKILL (no shutdown at all).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until node `i` exits on its own and returns its exit status; the
    /// node counts as stopped afterwards.
    pub async fn wait_for_exit(&mut self, i: usize) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let child = self.nodes[i]
                .child
                .as_mut()
                .with_context(|| format!("node {i} is not running"))?;
            if let Some(status) = child.try_wait()? {
                self.nodes[i].child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("node {i} still runs after {DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The nodes that were started and have exited since, with their exit
    /// status; they count as stopped afterwards. A test that expects every
    /// node to survive what it sends asserts that this is empty.
    pub fn exited(&mut self) -> anyhow::Result<Vec<(usize, std::process::ExitStatus)>> {
        let mut exited = Vec::new();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let Some(child) = node.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                node.child = None;
                exited.push((i, status));
            }
        }
        Ok(exited)
    }

    /// `GET http(s)://<node i><path>`: status and body.
    pub async fn get(&self, i: usize, path: &str) -> anyhow::Result<(u16, String)> {
        let url = self.url(i, path);
        let response = self.client.get(&url).send().await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    /// `POST http(s)://<node i><path>` with `body`, on a connection of its own.
    ///
    /// A node refuses an oversized body as soon as it sees its length and
    /// closes the connection without reading the rest; a pooled connection
    /// would then fail the next request with a broken pipe. So posts are
    /// never kept alive.
    pub async fn post(
        &self,
        i: usize,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = self.url(i, path);
        let request = self
            .client
            .post(&url)
            .header(reqwest::header::CONNECTION, "close");
        Ok(request.body(body).send().await?)
    }

    /// Node `i`'s `/status`, with its state hash.
    pub async fn status(&self, i: usize) -> anyhow::Result<serde_json::Value> {
        let (code, body) = self.get(i, "/status?state_hash=true").await?;
        anyhow::ensure!(code == 200, "status answered {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Node `i`'s `/status` as the typed [`Status`], with its state hash.
    pub async fn typed_status(&self, i: usize) -> anyhow::Result<Status> {
        let (code, body) = self.get(i, "/status?state_hash=true").await?;
        anyhow::ensure!(code == 200, "status answered {code}: {body}");
        serde_json::from_str(&body).with_context(|| format!("node {i}'s status: {body}"))
    }

    /// The members node `i` sees, as `(id, voter)`.
    pub async fn members(&self, i: usize) -> anyhow::Result<Vec<(u64, bool)>> {
        let status = self.typed_status(i).await?;
        Ok(status.members.iter().map(|m| (m.id, m.voter)).collect())
    }

    /// The index of the node that every running node agrees leads.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        self.wait_for("a leader all running nodes agree on", || async {
            let mut agreed = None;
            for (i, node) in self.nodes.iter().enumerate() {
                if !node.is_running() {
                    continue;
                }
                let status = self.typed_status(i).await?;
                let Some(leader_http) = status.leader_http else {
                    bail!("node {i} knows no leader")
                };
                if agreed.get_or_insert(leader_http.clone()) != &leader_http {
                    bail!("nodes disagree on the leader");
                }
            }
            let leader = agreed.context("no node is running")?;
            let index = self
                .nodes
                .iter()
                .position(|n| n.http == leader)
                .context("leader is not a test node")?;
            anyhow::ensure!(
                self.nodes[index].is_running(),
                "the agreed leader is not running"
            );
            Ok(index)
        })
        .await
    }

    /// Waits until node `i` reports an active guest.
    pub async fn wait_for_guest(&self, i: usize) -> anyhow::Result<()> {
        self.wait_for("the first guest to be active", || async {
            let status = self.typed_status(i).await?;
            anyhow::ensure!(status.guest.is_some(), "no guest yet");
            Ok(())
        })
        .await
    }

    /// Waits until every running node sees `n` voters and no membership
    /// change in progress.
    pub async fn wait_for_voters(&self, n: usize) -> anyhow::Result<()> {
        self.wait_for("all nodes to be voters", || async {
            for (i, node) in self.nodes.iter().enumerate() {
                if !node.is_running() {
                    continue;
                }
                let status = self.typed_status(i).await?;
                let voters = status.voters();
                anyhow::ensure!(voters == n, "node {i} sees {voters} voters");
                anyhow::ensure!(
                    !status.membership_changing,
                    "node {i} is between two memberships"
                );
            }
            Ok(())
        })
        .await
    }

    /// Waits until every running node answers `value` for `key` with a stale
    /// (local) read.
    pub async fn wait_for_value(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.wait_for(&format!("{key}={value} on every node"), || async {
            for (i, node) in self.nodes.iter().enumerate() {
                if node.is_running() {
                    let (code, body) = self
                        .get(i, &format!("/get?key={key}&consistency=stale"))
                        .await?;
                    anyhow::ensure!(
                        code == 200 && body == value,
                        "node {i} answers {code} {body:?}"
                    );
                }
            }
            Ok(())
        })
        .await
    }

    /// Waits until every running node reports the same state hash.
    pub async fn wait_for_same_state(&self) -> anyhow::Result<()> {
        self.wait_for("the same state on every node", || async {
            let mut hashes = Vec::new();
            for (i, node) in self.nodes.iter().enumerate() {
                if node.is_running() {
                    hashes.push(self.typed_status(i).await?.state_hash);
                }
            }
            anyhow::ensure!(
                hashes.iter().all(|h| h.is_some() && *h == hashes[0]),
                "state hashes {hashes:?}"
            );
            Ok(())
        })
        .await
    }

    /// Polls `check` every 50 ms until it succeeds or [`DEADLINE`] passes;
    /// the error then names what was awaited and the last failure seen.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, mut check: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match check().await {
                Ok(value) => return Ok(value),
                Err(error) if Instant::now() >= deadline => {
                    bail!("timed out after {DEADLINE:?} waiting for {what}; last: {error:#}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Default for TestCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            let dir = self.dir.take().expect("temp dir").keep();
            eprintln!("test failed; node data and logs kept in {}", dir.display());
            for (i, node) in self.nodes.iter().enumerate() {
                let log = node.log_text();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("---- node {i} ({}) log tail ----", node.http);
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}
