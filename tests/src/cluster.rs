//! `TestCluster`: real `raftwasm` processes on 127.0.0.1 ports the OS picks
//! (each node binds port 0 and reports its ports through `--ports-file`),
//! each with its own data directory and log file, driven over HTTP (or
//! HTTPS, with certificates made for the test, after
//! [`TestCluster::with_tls`]).
//!
//! Child processes are killed on drop. A failed test keeps the temp dir and
//! prints where it is and the tail of every node's log: a panic (also one in
//! another thread or task), a harness wait that timed out, a node that
//! failed to start, or [`TestCluster::keep`] from the test's own error path.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use raftwasm::ports_file::PortsFile;
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

/// The address a new node binds: loopback, a port the OS picks when the
/// node binds it (no port is chosen in advance, so none can be taken
/// between choosing and binding).
const ANY_PORT: &str = "127.0.0.1:0";

/// Panics in this test process so far, on any thread.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Errors that reached a test function's `?` (see [`Failure`]).
static FAILURES: AtomicUsize = AtomicUsize::new(0);

/// What a cluster test returns: like `anyhow::Result`, but an error that
/// leaves the test through `?` (or [`crate::ensure!`]) is counted in
/// [`FAILURES`] before the test's cluster is dropped, so the cluster keeps
/// its data and logs for a test that fails by returning an error, not only
/// by panicking.
pub type TestResult<T = ()> = Result<T, Failure>;

/// The error of a failed [`TestResult`]; printed as `anyhow` prints it.
pub struct Failure(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        FAILURES.fetch_add(1, Ordering::SeqCst);
        Failure(error.into())
    }
}

impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

/// Counts panics in [`PANICS`] (then reports them as before), so that a
/// cluster notices a failed assertion in a spawned task or thread, not only
/// one on its own thread.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// One node: its addresses, data dir, log file and (while running) process.
#[derive(Debug)]
pub struct TestNode {
    /// `127.0.0.1:port` of the HTTP API (port 0 until the node first
    /// started and reported the port it bound; it keeps that port on
    /// restarts, as its peers know it by it).
    pub http: String,
    /// `127.0.0.1:port` of the peer port (as [`TestNode::http`]).
    pub raft: String,
    /// The data directory.
    pub dir: PathBuf,
    /// The node's log file.
    pub log: PathBuf,
    /// Where the node writes the addresses it bound (`--ports-file`).
    pub ports_file: PathBuf,
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
    /// [`PANICS`] when the cluster was made.
    panics_before: usize,
    /// [`FAILURES`] when the cluster was made.
    failures_before: usize,
    /// Set when the test failed in a way the harness saw.
    failed: AtomicBool,
}

impl TestCluster {
    /// An empty cluster in a new temp dir.
    pub fn new() -> Self {
        count_panics();
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
            panics_before: PANICS.load(Ordering::SeqCst),
            failures_before: FAILURES.load(Ordering::SeqCst),
            failed: AtomicBool::new(false),
        }
    }

    /// Keeps the node data and logs when the cluster is dropped, and prints
    /// where they are with the tail of every node's log: for a test's own
    /// error paths, which the harness cannot see.
    pub fn keep(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Whether the cluster's data will be kept on drop: the test panicked,
    /// something panicked in this process since the cluster was made (a
    /// failed assertion in a spawned task, or a parallel test of the same
    /// file: keeping too much is harmless), an error left a test through
    /// `?` into a [`TestResult`] (likewise in any test of the process), or
    /// [`TestCluster::keep`] was called, or a harness wait timed out.
    pub fn kept(&self) -> bool {
        std::thread::panicking()
            || PANICS.load(Ordering::SeqCst) > self.panics_before
            || FAILURES.load(Ordering::SeqCst) > self.failures_before
            || self.failed.load(Ordering::SeqCst)
    }

    /// Passes `result` through, keeping the cluster's data if it is an
    /// error: `cluster.check(result)?` at the end of a test keeps the logs
    /// of a test that returns `Err`.
    ///
    /// # Errors
    /// `result`'s error.
    pub fn check<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            self.keep();
        }
        result
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

    /// The temp dir holding every node's data dir, log and ports file.
    pub fn root(&self) -> &Path {
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
            http: ANY_PORT.to_owned(),
            raft: ANY_PORT.to_owned(),
            dir: self.root().join(format!("node{i}")),
            log: self.root().join(format!("node{i}.log")),
            ports_file: self.root().join(format!("node{i}.ports.json")),
            child: None,
            extra_args,
        };
        self.nodes.push(node);
        i
    }

    /// Starts node `i` with its addresses, data dir and `args`. On its first
    /// start it binds ports the OS picks; this returns once it has reported
    /// them (or has exited, e.g. refusing its flags).
    ///
    /// # Errors
    /// When the process cannot be started or does not report its ports in
    /// time; the cluster's data is then kept.
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
        let result = self.start_process(i, args, env);
        self.check(result)
    }

    fn start_process(
        &mut self,
        i: usize,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        anyhow::ensure!(node.child.is_none(), "node {i} is already running");
        match std::fs::remove_file(&node.ports_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(binary())
            .arg(format!("--http={}", node.http))
            .arg(format!("--raft={}", node.raft))
            .arg(format!("--node={}", node.dir.display()))
            .arg(format!("--ports-file={}", node.ports_file.display()))
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
        self.learn_ports(i)
    }

    /// Waits until node `i` reports the addresses it bound and records them
    /// in place of port 0. A node that exits first (refusing to start) is
    /// left for the test to inspect.
    fn learn_ports(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + DEADLINE;
        let node = &mut self.nodes[i];
        loop {
            if let Some(ports) = PortsFile::read(&node.ports_file)? {
                // A port given explicitly (a restart, or a test's choice) is
                // kept as given; only port 0 is replaced.
                if node.http.ends_with(":0") {
                    node.http = ports.http;
                }
                if node.raft.ends_with(":0") {
                    node.raft = ports.raft;
                }
                return Ok(());
            }
            let child = node.child.as_mut().context("node is not running")?;
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("node {i} did not report its ports within {DEADLINE:?}");
            }
            // Binding takes milliseconds; spawn is synchronous, so this
            // polls without a runtime.
            std::thread::sleep(Duration::from_millis(10));
        }
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
                    self.keep();
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
        if self.kept() {
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
