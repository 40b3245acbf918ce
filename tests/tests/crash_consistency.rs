//! Crash consistency of the write path: while clients increment counters,
//! nodes are killed with SIGKILL at arbitrary points of the write path
//! (before or after a log flush, in the middle of an apply) and restarted
//! on their data. Every acknowledged increment survives, none is applied
//! twice, and every replica ends with the same state.
//!
//! Each writer owns one counter and `incr` answers the new value, so an
//! increment applied twice shows up at once as a jump of two. The kills run
//! twice: with the default write pipeline (the next batch waits for the
//! previous one's outcome) and with a deeper one (it does not).
//!
//! A lone writer's entries also go to the followers early (while the
//! leader syncs them); another test checks that they do, with a follower
//! killed too, and that the replicas end equal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use raftwasm_tests::KV_NEXT_GUEST;
use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use raftwasm_tests::{bail, ensure};

/// The command tag of kv-next's `incr`.
const INCR: u8 = 0x10;
/// Concurrent writers, one counter each.
const WRITERS: usize = 4;
/// Kill-and-restart rounds; even rounds kill the leader, odd ones a follower.
const ROUNDS: usize = 8;
/// The most increments one writer makes; the test stops them earlier.
const MAX_INCREMENTS: u64 = 5_000;
/// Attempts per read or increment before a writer gives up.
const MAX_ATTEMPTS: usize = 400;

/// How one attempt at an increment ended.
enum Attempt {
    /// Acknowledged with the counter's new value.
    Acked(u64),
    /// Not acknowledged; it may or may not have been applied. `timed_out`
    /// when the node answered that the outcome is unknown (the entry may
    /// still commit later).
    Failed { timed_out: bool },
}

/// One writer: increments `c<id>` on whichever node leads.
#[derive(Debug, Clone)]
struct Writer {
    client: reqwest::Client,
    nodes: Arc<Vec<String>>,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Set when a writer returns early, with or without an error.
    ended: Arc<AtomicBool>,
}

impl Writer {
    /// Increments until told to stop; returns the counter's final value as
    /// this writer knows it.
    async fn run(self, id: usize) -> anyhow::Result<u64> {
        let result = self.increments(id).await;
        self.ended.store(true, Ordering::Relaxed);
        result
    }

    async fn increments(&self, id: usize) -> anyhow::Result<u64> {
        let key = format!("c{id}");
        let mut target = id % self.nodes.len();
        let mut value = 0;
        // An increment whose outcome the node could not confirm may still
        // be applied after the writer has read the counter.
        let mut may_land_late = false;
        while value < MAX_INCREMENTS && !self.stop.load(Ordering::Relaxed) {
            match self.increment(&mut target, &key).await {
                Attempt::Acked(next) => {
                    let late = may_land_late && next == value + 2;
                    ensure!(
                        next == value + 1 || late,
                        "{key} went from {value} to {next}: an increment was lost or applied twice"
                    );
                    value = next;
                    may_land_late = false;
                    self.acked.fetch_add(1, Ordering::Relaxed);
                }
                Attempt::Failed { timed_out } => {
                    // A linearizable read settles whether it was applied: an
                    // entry the current leader has not committed by then can
                    // never commit.
                    let now = self.read(&mut target, &key).await?;
                    ensure!(
                        now == value || now == value + 1,
                        "{key} reads {now} after {value}: an increment was applied twice"
                    );
                    may_land_late |= timed_out && now == value;
                    value = now;
                }
            }
        }
        Ok(value)
    }

    async fn increment(&self, target: &mut usize, key: &str) -> Attempt {
        let url = format!("http://{}/apply", self.nodes[*target]);
        let body = [&[INCR][..], key.as_bytes()].concat();
        let response = self.client.post(&url).body(body).send().await;
        let outcome = match response {
            Ok(response) => {
                let status = response.status().as_u16();
                self.follow(target, &response);
                let body = response.text().await.unwrap_or_default();
                match (status, body.parse()) {
                    (200, Ok(next)) => return Attempt::Acked(next),
                    (504, _) => Attempt::Failed { timed_out: true },
                    _ => Attempt::Failed { timed_out: false },
                }
            }
            Err(_) => {
                *target = (*target + 1) % self.nodes.len();
                Attempt::Failed { timed_out: false }
            }
        };
        // A pause before the next attempt, so that an election can finish.
        tokio::time::sleep(Duration::from_millis(20)).await;
        outcome
    }

    /// The counter by a linearizable read, retried until a leader answers.
    async fn read(&self, target: &mut usize, key: &str) -> anyhow::Result<u64> {
        let mut last = String::new();
        for _ in 0..MAX_ATTEMPTS {
            let url = format!("http://{}/get?key={key}", self.nodes[*target]);
            match self.client.get(&url).send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    self.follow(target, &response);
                    let body = response.text().await.unwrap_or_default();
                    match status {
                        200 => return body.parse().context("the counter is not a number"),
                        404 => return Ok(0),
                        _ => last = format!("{status} {body:?}"),
                    }
                }
                Err(error) => {
                    last = error.to_string();
                    *target = (*target + 1) % self.nodes.len();
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("reading {key} failed {MAX_ATTEMPTS} times; last: {last}")
    }

    /// Moves `target` to the leader a refusal names, or to the next node.
    fn follow(&self, target: &mut usize, response: &reqwest::Response) {
        if response.status().is_success() {
            return;
        }
        let hint = response
            .headers()
            .get(raftwasm::proto::LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_start_matches("http://"))
            .and_then(|h| self.nodes.iter().position(|n| n == h));
        *target = match hint {
            Some(leader) if leader != *target => leader,
            _ => (*target + 1) % self.nodes.len(),
        };
    }
}

/// Deploys kv-next (guest-kv plus `incr`) and waits until every node runs it.
async fn deploy_counter_guest(cluster: &TestCluster) -> anyhow::Result<()> {
    let leader = cluster.leader().await?;
    let response = cluster
        .post(leader, "/guest", KV_NEXT_GUEST.to_vec())
        .await?;
    ensure!(
        response.status() == 200,
        "deploy answered {}",
        response.status()
    );
    let record: serde_json::Value = response.json().await?;
    let hash = record["hash"].clone();
    cluster
        .wait_for("kv-next on every node", || async {
            for i in 0..cluster.nodes.len() {
                let guest = &cluster.status(i).await?["guest"];
                ensure!(guest["hash"] == hash, "node {i} runs {guest}");
            }
            Ok(())
        })
        .await
}

#[tokio::test]
async fn killed_nodes_lose_no_acknowledged_write_and_apply_none_twice() -> TestResult {
    kill_rounds(&[]).await
}

/// The same with a deeper write pipeline: the leader proposes the next
/// batch once the previous one is synced on it, before it commits.
#[tokio::test]
async fn a_deeper_pipeline_loses_no_acknowledged_write_and_applies_none_twice() -> TestResult {
    kill_rounds(&["--pipeline-depth=8"]).await
}

/// Kills the leader or a follower in turn while the writers run, and
/// checks every acknowledged increment and equal replicas at the end.
async fn kill_rounds(args: &[&str]) -> TestResult {
    let mut cluster = TestCluster::start(3, args).await?;
    deploy_counter_guest(&cluster).await?;
    let writer = Writer {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        nodes: Arc::new(cluster.nodes.iter().map(|n| n.http.clone()).collect()),
        acked: Arc::default(),
        stop: Arc::default(),
        ended: Arc::default(),
    };
    let tasks: Vec<_> = (0..WRITERS)
        .map(|id| tokio::spawn(writer.clone().run(id)))
        .collect();
    // Waits end early when a writer has stopped: its error is the finding.
    let acked_after = |more: u64| {
        let counter = writer.acked.clone();
        let ended = writer.ended.clone();
        let target = counter.load(Ordering::Relaxed) + more;
        move || {
            let acked = counter.load(Ordering::Relaxed);
            let ended = ended.load(Ordering::Relaxed);
            async move {
                ensure!(
                    acked >= target || ended,
                    "{acked} of {target} increments acknowledged"
                );
                Ok(())
            }
        }
    };

    for round in 0..ROUNDS {
        if writer.ended.load(Ordering::Relaxed) {
            break;
        }
        let leader = cluster.leader().await?;
        let victim = if round % 2 == 0 {
            leader
        } else {
            (leader + 1 + round / 2 % 2) % cluster.nodes.len()
        };
        // A different amount of load before each kill, so the kills land
        // at different points of the write path.
        let load = 10 + (round as u64 * 17) % 40;
        cluster
            .wait_for("increments before the kill", acked_after(load))
            .await?;
        let old_pid = cluster.nodes[victim].pid();
        cluster.kill(victim);
        cluster
            .wait_for("increments with a node down", acked_after(10))
            .await?;
        cluster.spawn(victim, &[])?;
        ensure!(
            cluster.nodes[victim].pid() != old_pid,
            "node {victim} did not restart"
        );
        let leader = cluster.leader().await?;
        let applied = cluster.status(leader).await?["applied"].as_u64();
        cluster
            .wait_for("the restarted node to catch up", || async {
                let caught_up = cluster.status(victim).await?["applied"].as_u64();
                ensure!(caught_up >= applied, "applied {caught_up:?} of {applied:?}");
                Ok(())
            })
            .await?;
    }

    writer.stop.store(true, Ordering::Relaxed);
    let mut finals = Vec::new();
    for task in tasks {
        finals.push(task.await.context("writer task panicked")??);
    }
    cluster.wait_for_same_state().await?;
    for (id, value) in finals.iter().enumerate() {
        cluster
            .wait_for_value(&format!("c{id}"), &value.to_string())
            .await?;
    }
    Ok(())
}

/// The leader's `raftwasm_early_appends_total`.
async fn early_appends(cluster: &TestCluster, leader: usize) -> anyhow::Result<u64> {
    let (code, text) = cluster.get(leader, "/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}: {text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("raftwasm_early_appends_total "))
        .context("no raftwasm_early_appends_total in /metrics")?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

/// Sets `key` to `value` on `leader`, which must answer `ok`.
async fn set(cluster: &TestCluster, leader: usize, key: &str, value: &str) -> TestResult {
    let (code, body) = cluster
        .get(leader, &format!("/set?key={key}&value={value}"))
        .await?;
    ensure!(code == 200, "set {key} answered {code}: {body}");
    Ok(())
}

/// A lone client's writes go to the followers while the leader syncs them
/// (early replication), also while a follower is killed; the follower
/// catches up after its restart, and every replica ends with the same
/// state.
#[tokio::test]
async fn a_lone_writers_entries_go_early_and_replicas_stay_equal() -> TestResult {
    const WRITES: u64 = 30;
    let mut cluster = TestCluster::start(3, &[]).await?;
    cluster.wait_for_voters(3).await?;
    let leader = cluster.leader().await?;
    let before = early_appends(&cluster, leader).await?;
    for n in 0..WRITES {
        set(&cluster, leader, &format!("k{n}"), &format!("v{n}")).await?;
    }
    // One request per follower per write when a connection is idle; a
    // write finds none only while the previous answers are still read.
    let early = early_appends(&cluster, leader).await? - before;
    ensure!(
        early >= WRITES,
        "{early} early append requests for {WRITES} lone writes to two followers"
    );

    let follower = (leader + 1) % cluster.nodes.len();
    cluster.kill(follower);
    let before = early_appends(&cluster, leader).await?;
    for n in 0..WRITES {
        set(&cluster, leader, &format!("down{n}"), &format!("v{n}")).await?;
    }
    let early = early_appends(&cluster, leader).await? - before;
    ensure!(
        early >= WRITES / 2,
        "{early} early append requests for {WRITES} writes with one follower left"
    );
    cluster.spawn(follower, &[])?;
    set(&cluster, leader, "last", "v").await?;
    cluster.wait_for_value("last", "v").await?;
    cluster.wait_for_value("k0", "v0").await?;
    cluster.wait_for_value("down29", "v29").await?;
    cluster.wait_for_same_state().await?;
    Ok(())
}
