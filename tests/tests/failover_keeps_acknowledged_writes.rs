//! Failover under load: while several clients write, the leader is killed
//! with SIGKILL; every write that was answered `ok` must survive on every
//! node, including the killed one after it restarts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use raftwasm_tests::bail;
use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;

/// Concurrent writers, each with its own keys.
const WRITERS: usize = 8;
/// The most writes one writer makes; the test stops them earlier.
const MAX_WRITES: usize = 400;
/// Attempts per write before a writer gives up.
const MAX_ATTEMPTS: usize = 200;
/// Acknowledged writes wanted before the kill, and again after it from
/// the new leader.
const ACKS_PER_PHASE: usize = 80;

/// A write that was answered `200 ok`, and the node that answered it.
#[derive(Debug, Clone)]
struct Ack {
    key: String,
    value: String,
    node: usize,
}

/// A client that writes to whichever node leads, following the cluster's
/// hints.
#[derive(Debug, Clone)]
struct Writer {
    client: reqwest::Client,
    nodes: Arc<Vec<String>>,
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    /// Writes `t<task>-<n>` keys until told to stop; returns how many
    /// attempts failed and were retried.
    async fn run(self, task: usize, mut target: usize) -> anyhow::Result<usize> {
        let mut retries = 0;
        for n in 0..MAX_WRITES {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let key = format!("t{task}-{n}");
            let value = format!("value-{task}-{n}");
            let (node, failed) = self.set(&mut target, &key, &value).await?;
            retries += failed;
            self.acks
                .lock()
                .expect("acks lock")
                .push(Ack { key, value, node });
        }
        Ok(retries)
    }

    /// Sets `key=value`, retrying on another node when `target` is not the
    /// leader or cannot be reached. Returns the node that acknowledged it
    /// and the number of failed attempts.
    async fn set(
        &self,
        target: &mut usize,
        key: &str,
        value: &str,
    ) -> anyhow::Result<(usize, usize)> {
        let mut last = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            let url = format!("http://{}/set?key={key}&value={value}", self.nodes[*target]);
            match self.client.get(&url).send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let hint = response
                        .headers()
                        .get(raftwasm::proto::LEADER_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.trim_start_matches("http://").to_owned());
                    let body = response.text().await.unwrap_or_default();
                    match status {
                        200 if body == "ok" => return Ok((*target, attempt)),
                        421 => {
                            let hinted = hint.and_then(|h| self.nodes.iter().position(|n| *n == h));
                            *target = match hinted {
                                Some(leader) if leader != *target => leader,
                                _ => (*target + 1) % self.nodes.len(),
                            };
                        }
                        // No leader yet, or an outcome the node could not
                        // confirm: the same write is retried, which is safe
                        // because it sets the same value.
                        503 | 504 => *target = (*target + 1) % self.nodes.len(),
                        _ => bail!("set {key} on node {target} answered {status} {body:?}"),
                    }
                    last = format!("{status} {body:?}");
                }
                Err(error) => {
                    // The node is down or its connection was cut by the kill.
                    last = error.to_string();
                    *target = (*target + 1) % self.nodes.len();
                }
            }
            // A pause between attempts so that an election can finish.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("set {key} failed {MAX_ATTEMPTS} times; last: {last}")
    }
}

/// Waits until every acknowledged write reads back on every running node.
async fn wait_for_acks(cluster: &TestCluster, acks: &[Ack]) -> anyhow::Result<()> {
    for (i, node) in cluster.nodes.iter().enumerate() {
        if !node.is_running() {
            continue;
        }
        cluster
            .wait_for(&format!("every acknowledged write on node {i}"), || async {
                for ack in acks {
                    let (code, body) = cluster
                        .get(i, &format!("/get?key={}&consistency=stale", ack.key))
                        .await?;
                    raftwasm_tests::ensure!(
                        code == 200 && body == ack.value,
                        "{} (acknowledged by node {}) reads {code} {body:?}",
                        ack.key,
                        ack.node
                    );
                }
                Ok(())
            })
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn acknowledged_writes_survive_killing_the_leader_mid_write() -> TestResult {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let old_leader = cluster.leader().await?;
    let writer = Writer {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?,
        nodes: Arc::new(cluster.nodes.iter().map(|n| n.http.clone()).collect()),
        acks: Arc::default(),
        stop: Arc::default(),
    };
    let tasks: Vec<_> = (0..WRITERS)
        .map(|task| tokio::spawn(writer.clone().run(task, old_leader)))
        .collect();
    let acks_from = |pred: &dyn Fn(usize) -> bool| {
        writer
            .acks
            .lock()
            .expect("acks lock")
            .iter()
            .filter(|a| pred(a.node))
            .count()
    };

    cluster
        .wait_for("writes acknowledged by the first leader", || async {
            let n = acks_from(&|node| node == old_leader);
            raftwasm_tests::ensure!(n >= ACKS_PER_PHASE, "{n} acknowledged");
            Ok(())
        })
        .await?;
    let old_pid = cluster.nodes[old_leader].pid();
    cluster.kill(old_leader);

    // The writers keep going against whichever node wins the election.
    let new_leader = cluster.leader().await?;
    assert_ne!(new_leader, old_leader);
    cluster
        .wait_for("writes acknowledged by the new leader", || async {
            let n = acks_from(&|node| node != old_leader);
            raftwasm_tests::ensure!(n >= ACKS_PER_PHASE, "{n} acknowledged");
            Ok(())
        })
        .await?;
    writer.stop.store(true, Ordering::Relaxed);
    let mut retries = 0;
    for task in tasks {
        retries += task.await.context("writer task panicked")??;
    }
    assert!(
        retries > 0,
        "no write failed, so none was in flight when the leader was killed"
    );
    let acks = writer.acks.lock().expect("acks lock").clone();

    wait_for_acks(&cluster, &acks).await?;

    // The killed node comes back on its data dir and catches up.
    cluster.spawn(old_leader, &[])?;
    assert!(
        cluster.nodes[old_leader]
            .pid()
            .is_some_and(|p| Some(p) != old_pid)
    );
    wait_for_acks(&cluster, &acks).await?;
    Ok(cluster.wait_for_same_state().await?)
}
