//! `GET /watch` and `raftwasm kv watch` against real clusters: watchers on
//! every node see the same changes in the same order through a leader kill
//! and a guest swap, resuming with `from`; TTL expiry is a delete of the
//! user key; a `from` older than the window is 410; a slow watcher is
//! dropped while writes go on.

use std::io::{BufRead as _, Read as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftwasm::watch::sse::{ChangeEvent, Parser};
use raftwasm_tests::KV_NEXT_GUEST;
use raftwasm_tests::cluster::TestResult;
use raftwasm_tests::cluster::{TestCluster, binary};

/// One change as a watcher saw it: index, key, value (`None`: deleted).
type Seen = (u64, String, Option<String>);

/// A watch stream read in the background.
struct Watcher {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Why the stream ended, once it has.
    ended: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Watches `prefix` on node `i` from `from`, skipping the first `skip`
    /// changes (those of entry `from` seen already on another stream).
    async fn start(
        cluster: &TestCluster,
        i: usize,
        prefix: &str,
        from: u64,
        skip: usize,
    ) -> anyhow::Result<Self> {
        let url = cluster.url(i, &format!("/watch?prefix={prefix}&from={from}"));
        let mut response = reqwest::Client::new().get(&url).send().await?;
        raftwasm_tests::ensure!(response.status() == 200, "{url}: {}", response.status());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(None));
        let (seen_, ended_) = (seen.clone(), ended.clone());
        let task = tokio::spawn(async move {
            let mut parser = Parser::default();
            let mut skip = skip;
            let why = loop {
                let chunk = match response.chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break "end of stream".to_owned(),
                    Err(e) => break format!("broke off: {e}"),
                };
                for event in parser.push(&chunk) {
                    if event.event == "dropped" {
                        *ended_.lock().expect("not poisoned") =
                            Some(format!("dropped: {}", event.data));
                        return;
                    }
                    if event.event != "put" && event.event != "delete" {
                        continue;
                    }
                    let change: ChangeEvent<'_> =
                        serde_json::from_str(&event.data).expect("a change event");
                    if skip > 0 && change.index == from {
                        skip -= 1;
                        continue;
                    }
                    let value = change.value.as_ref().map(|v| v.to_string());
                    seen_.lock().expect("not poisoned").push((
                        change.index,
                        change.key.to_string(),
                        value,
                    ));
                }
            };
            *ended_.lock().expect("not poisoned") = Some(why);
        });
        Ok(Self { seen, ended, task })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }

    fn ended(&self) -> Option<String> {
        self.ended.lock().expect("not poisoned").clone()
    }

    /// Waits until a change of `key` to `value` has been seen.
    async fn wait_for(
        &self,
        cluster: &TestCluster,
        key: &str,
        value: Option<&str>,
    ) -> anyhow::Result<()> {
        cluster
            .wait_for(&format!("a watcher to see {key} = {value:?}"), || async {
                let seen = self.seen();
                raftwasm_tests::ensure!(
                    seen.iter()
                        .any(|(_, k, v)| k == key && v.as_deref() == value),
                    "seen {} changes, ended: {:?}",
                    seen.len(),
                    self.ended()
                );
                Ok(())
            })
            .await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sets `key` through whichever node leads, retrying through an election.
async fn set(cluster: &TestCluster, key: &str, value: &str) -> anyhow::Result<()> {
    cluster
        .wait_for(&format!("set {key}"), || async {
            let leader = cluster.leader().await?;
            let (status, body) = cluster
                .get(leader, &format!("/set?key={key}&value={value}"))
                .await?;
            raftwasm_tests::ensure!(status == 200, "{status}: {body}");
            Ok(())
        })
        .await
}

/// The index of the first change that differs, for a readable failure.
fn first_difference(a: &[Seen], b: &[Seen]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
}

#[tokio::test]
async fn watchers_on_every_node_see_the_same_changes_through_a_leader_kill_and_a_guest_swap()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let mut watchers = Vec::new();
    for i in 0..3 {
        watchers.push(Some(Watcher::start(&cluster, i, "w%2F", 1, 0).await?));
    }
    for n in 0..20 {
        set(&cluster, &format!("w/{n}"), &format!("v{n}")).await?;
    }
    let (status, _) = cluster
        .get(cluster.leader().await?, "/delete?key=w%2F3")
        .await?;
    assert_eq!(status, 200);

    // The leader dies; its watcher resumes on a survivor from the last
    // change it saw.
    let old = cluster.leader().await?;
    let old_pid = cluster.nodes[old].pid();
    cluster.kill(old);
    assert!(old_pid.is_some() && !cluster.nodes[old].is_running());
    for n in 20..30 {
        set(&cluster, &format!("w/{n}"), &format!("v{n}")).await?;
    }
    let killed = watchers[old].take().expect("the killed node's watcher");
    cluster
        .wait_for("the killed node's stream to end", || async {
            killed.ended().ok_or_else(|| anyhow::anyhow!("still open"))
        })
        .await?;
    let before = killed.seen();
    let (last, _, _) = before.last().cloned().expect("changes before the kill");
    let skip = before.iter().filter(|(index, _, _)| *index == last).count();
    let survivor = (old + 1) % 3;
    let resumed = Watcher::start(&cluster, survivor, "w%2F", last, skip).await?;

    // A guest swap, then writes through the new guest.
    let leader = cluster.leader().await?;
    let response = cluster
        .post(leader, "/guest", KV_NEXT_GUEST.to_vec())
        .await?;
    assert_eq!(response.status().as_u16(), 200, "deploy");
    let record: serde_json::Value = response.json().await?;
    let hash = record["hash"].as_str().unwrap_or_default().to_owned();
    cluster
        .wait_for("the new guest on the leader", || async {
            let status = cluster.status(cluster.leader().await?).await?;
            raftwasm_tests::ensure!(
                status["guest"]["hash"] == hash.as_str(),
                "{}",
                status["guest"]
            );
            Ok(())
        })
        .await?;
    for n in 30..40 {
        set(&cluster, &format!("w/{n}"), &format!("v{n}")).await?;
    }
    set(&cluster, "w/end", "done").await?;

    let live: Vec<&Watcher> = watchers.iter().flatten().collect();
    for watcher in live.iter().copied().chain([&resumed]) {
        watcher.wait_for(&cluster, "w/end", Some("done")).await?;
    }
    let reference = live[0].seen();
    // No gap: every write is there; no duplicate: each (index, key) once.
    for n in (0..40).filter(|&n| n != 3) {
        let (key, value) = (format!("w/{n}"), format!("v{n}"));
        assert!(
            reference
                .iter()
                .any(|(_, k, v)| *k == key && v.as_deref() == Some(&value)),
            "{key} missing from {reference:?}"
        );
    }
    assert!(reference.iter().any(|(_, k, v)| k == "w/3" && v.is_none()));
    let mut ids: Vec<(u64, &String)> = reference.iter().map(|(i, k, _)| (*i, k)).collect();
    assert!(ids.windows(2).all(|w| w[0].0 <= w[1].0), "indexes go back");
    ids.dedup();
    assert_eq!(ids.len(), reference.len(), "a change came twice");

    assert_eq!(
        live[1].seen(),
        reference,
        "{:?}",
        first_difference(&live[1].seen(), &reference)
    );
    let mut joined = before;
    joined.extend(resumed.seen());
    assert_eq!(
        joined,
        reference,
        "{:?}",
        first_difference(&joined, &reference)
    );
    Ok(())
}

#[tokio::test]
async fn ttl_expiry_is_a_delete_of_the_user_key_and_internal_keys_never_show() -> TestResult {
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    let watcher = Watcher::start(&cluster, (leader + 1) % 3, "", 1, 0).await?;
    let (status, _) = cluster
        .get(leader, "/set?key=short&value=lived&ttl_ms=300")
        .await?;
    assert_eq!(status, 200);
    watcher.wait_for(&cluster, "short", Some("lived")).await?;
    // Expiry is swept by the next write once the time has passed.
    cluster
        .wait_for("the expired key to be swept", || async {
            let (status, _) = cluster.get(leader, "/set?key=tick&value=1").await?;
            raftwasm_tests::ensure!(status == 200, "set answered {status}");
            raftwasm_tests::ensure!(
                watcher
                    .seen()
                    .iter()
                    .any(|(_, k, v)| k == "short" && v.is_none()),
                "no delete of `short` yet"
            );
            Ok(())
        })
        .await?;
    for (_, key, _) in watcher.seen() {
        assert!(key == "short" || key == "tick", "unexpected key {key:?}");
    }
    Ok(())
}

#[tokio::test]
async fn from_older_than_the_window_is_gone_with_the_oldest_index() -> TestResult {
    let cluster = TestCluster::start(1, &["--watch-window-entries=3"]).await?;
    for n in 0..10 {
        set(&cluster, &format!("g/{n}"), "x").await?;
    }
    let (status, body) = cluster.get(0, "/watch?from=1").await?;
    assert_eq!(status, 410, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body)?;
    let oldest = body["oldest"].as_u64().expect("the oldest index");
    assert!(oldest > 1, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains(&oldest.to_string())
    );

    // From the oldest index on, the window replays; Last-Event-ID means
    // the entry after it.
    let watcher = Watcher::start(&cluster, 0, "g%2F", oldest, 0).await?;
    watcher.wait_for(&cluster, "g/9", Some("x")).await?;
    let first = watcher.seen()[0].0;
    assert!(first >= oldest);
    let url = cluster.url(0, "/watch?prefix=g%2F");
    let mut response = reqwest::Client::new()
        .get(&url)
        .header("Last-Event-ID", first.to_string())
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let mut parser = Parser::default();
    let event = loop {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await??
            .expect("the stream goes on");
        let mut changes = parser.push(&chunk).into_iter().filter(|e| e.event == "put");
        if let Some(event) = changes.next() {
            break event;
        }
    };
    let change: ChangeEvent<'_> = serde_json::from_str(&event.data)?;
    assert!(
        change.index > first,
        "{} after Last-Event-ID {first}",
        change.index
    );

    let (status, body) = cluster.get(0, "/watch?from=abc").await?;
    assert_eq!(status, 400, "{body}");
    Ok(())
}

#[tokio::test]
async fn a_slow_watcher_is_dropped_while_writes_go_on() -> TestResult {
    let cluster =
        TestCluster::start(1, &["--watch-queue-entries=4", "--idle-timeout-ms=300000"]).await?;
    // A watcher that sends its request and then reads nothing.
    let mut slow = std::net::TcpStream::connect(&cluster.nodes[0].http)?;
    write!(slow, "GET /watch?prefix= HTTP/1.1\r\nhost: test\r\n\r\n")?;
    let value = vec![b'v'; 256 << 10];
    for n in 0..120 {
        let response = cluster
            .post(0, &format!("/set?key=big{n}"), value.clone())
            .await?;
        assert_eq!(response.status().as_u16(), 200, "write {n}");
    }
    slow.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut received = Vec::new();
    slow.read_to_end(&mut received)?;
    let text = String::from_utf8_lossy(&received);
    let dropped = text.rfind("event: dropped").expect("a dropped event");
    assert!(
        text[dropped..].contains("fell more than 4 entries behind"),
        "{}",
        &text[dropped..]
    );
    assert!(!text[dropped..].contains("event: put"));
    // The node still serves watchers and writes.
    let watcher = Watcher::start(&cluster, 0, "after", 1, 0).await?;
    set(&cluster, "after", "1").await?;
    watcher.wait_for(&cluster, "after", Some("1")).await?;
    Ok(())
}

#[tokio::test]
async fn kv_watch_prints_each_change_and_exits_3_without_a_member() -> TestResult {
    let cluster = TestCluster::start(1, &[]).await?;
    let mut child = std::process::Command::new(binary())
        .args(["kv", "watch", "p/", "--from=1"])
        .arg(format!("--cluster={}", cluster.nodes[0].http))
        .env_remove("RAFTWASM_CLUSTER")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let lines_ = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            lines_.lock().expect("not poisoned").push(line);
        }
    });
    set(&cluster, "p/a", "1").await?;
    set(&cluster, "other", "2").await?;
    let (status, _) = cluster.get(0, "/delete?key=p%2Fa").await?;
    assert_eq!(status, 200);
    let printed = cluster
        .wait_for("two lines from kv watch", || async {
            let lines = lines.lock().expect("not poisoned").clone();
            raftwasm_tests::ensure!(lines.len() >= 2, "{lines:?}");
            Ok(lines)
        })
        .await;
    let _ = child.kill();
    let _ = child.wait();
    let printed = printed?;
    let words: Vec<Vec<&str>> = printed.iter().map(|l| l.split(' ').collect()).collect();
    assert_eq!(words[0][1..], ["put", "p/a", "1"], "{printed:?}");
    assert_eq!(words[1][1..], ["delete", "p/a"], "{printed:?}");
    let put: u64 = words[0][0].parse()?;
    let delete: u64 = words[1][0].parse()?;
    assert!(put < delete, "{printed:?}");

    let output = std::process::Command::new(binary())
        .args(["kv", "watch", "p/", "--cluster=127.0.0.1:1", "--timeout=1"])
        .env_remove("RAFTWASM_CLUSTER")
        .output()?;
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    Ok(())
}
