//! Backup and restore: `raftwasm backup` saves a cluster's state while it
//! takes writes; `raftwasm restore` seeds a new data directory from it, and
//! a cluster founded there serves every key acknowledged before the backup,
//! with the same guest and the state hash the backup reported. Damaged,
//! truncated and foreign files are refused and write nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use raftwasm_tests::cluster::TestResult;
use raftwasm_tests::cluster::{TestCluster, binary};

const TOKEN: &str = "--token=backup-test-token";
const TOKEN_VALUE: &str = "backup-test-token";

/// Runs the `raftwasm` binary with `args`: success, stdout and stderr.
async fn raftwasm(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let output = tokio::process::Command::new(binary())
        .args(args)
        .env_remove("RAFTWASM_TOKEN")
        .env_remove("RAFTWASM_TLS_CA")
        .env("NO_COLOR", "1")
        .output()
        .await?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// `raftwasm backup` of the cluster at `hosts` to `file`.
async fn backup(hosts: &str, file: &Path) -> anyhow::Result<String> {
    let file = file.display().to_string();
    let cluster = format!("--cluster={hosts}");
    let (ok, stdout, stderr) = raftwasm(&[
        "backup",
        &cluster,
        &format!("--token={TOKEN_VALUE}"),
        "-o",
        &file,
    ])
    .await?;
    raftwasm_tests::ensure!(ok, "backup failed: {stdout}{stderr}");
    Ok(stdout)
}

/// `raftwasm restore FILE --node DIR`: success and what it printed.
async fn restore(file: &Path, dir: &Path) -> anyhow::Result<(bool, String)> {
    let (file, dir) = (file.display().to_string(), dir.display().to_string());
    let (ok, stdout, stderr) = raftwasm(&["restore", &file, "--node", &dir]).await?;
    Ok((ok, format!("{stdout}{stderr}")))
}

/// Writes `count` keys `{prefix}-N` on node `i`, each acknowledged.
async fn write_keys(
    cluster: &TestCluster,
    i: usize,
    prefix: &str,
    count: usize,
) -> anyhow::Result<()> {
    for n in 0..count {
        let answer = cluster
            .get(i, &format!("/set?key={prefix}-{n}&value=value-{n}"))
            .await?;
        raftwasm_tests::ensure!(answer == (200, "ok".into()), "set {prefix}-{n}: {answer:?}");
    }
    Ok(())
}

/// Whether `dir` holds nothing a node could start from.
fn holds_no_node(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_none())
}

#[tokio::test]
async fn restored_cluster_serves_every_key_acknowledged_before_the_backup() -> TestResult {
    const BEFORE: usize = 200;
    let mut cluster = TestCluster::start(3, &[TOKEN]).await?;
    let leader = cluster.leader().await?;
    write_keys(&cluster, leader, "before", BEFORE).await?;
    let guest_hash = cluster.status(leader).await?["guest"]["hash"].clone();
    raftwasm_tests::ensure!(guest_hash.is_string(), "no guest hash");

    // Writes go on while the backup is taken, for at most 30 s.
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, during) = (stop.clone(), during.clone());
        let client = cluster.client().clone();
        let url = cluster.url(leader, "/set");
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let answer = client
                    .get(format!("{url}?key=during-{n}&value={n}"))
                    .send()
                    .await;
                if answer.is_ok_and(|a| a.status().is_success()) {
                    during.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        })
    };
    let files = tempfile::tempdir()?;
    let file = files.path().join("cluster.backup");
    // Members in any order: a follower's hint leads the client to the leader.
    let hosts: Vec<&str> = cluster.nodes.iter().map(|n| n.http.as_str()).collect();
    let started = Instant::now();
    let printed = backup(&hosts.join(","), &file).await?;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    let header = raftwasm::backup::open(&file)?.header;
    eprintln!(
        "backup: {} bytes in {took:?}, {} writes acknowledged meanwhile; {printed}",
        std::fs::metadata(&file)?.len(),
        during.load(Ordering::Relaxed)
    );
    raftwasm_tests::ensure!(
        printed.contains(&header.state_hash),
        "the backup did not print its state hash: {printed}"
    );
    assert_eq!(
        header.guest_hash.as_deref(),
        guest_hash.as_str(),
        "the backup names another guest"
    );

    for i in 0..3 {
        cluster.kill(i);
    }
    let restored = cluster.add_node(&[TOKEN]);
    let (ok, printed) = restore(&file, &cluster.nodes[restored].dir).await?;
    raftwasm_tests::ensure!(ok, "restore failed: {printed}");
    cluster.spawn(restored, &["--bootstrap"])?;
    cluster.wait_for_guest(restored).await?;
    for _ in 0..2 {
        let i = cluster.add_node(&[TOKEN]);
        let join = format!("--join={}", cluster.nodes[restored].http);
        cluster.spawn(i, &[&join])?;
    }
    cluster.wait_for_voters(3).await?;
    cluster.wait_for_same_state().await?;

    for i in restored..cluster.nodes.len() {
        let status = cluster.status(i).await?;
        assert_eq!(
            status["guest"]["hash"], guest_hash,
            "node {i} runs another guest"
        );
        assert_eq!(
            status["state_hash"].as_str(),
            Some(header.state_hash.as_str()),
            "node {i} holds another state than the backup"
        );
        for n in 0..BEFORE {
            let answer = cluster
                .get(i, &format!("/get?key=before-{n}&consistency=stale"))
                .await?;
            assert_eq!(
                answer,
                (200, format!("value-{n}")),
                "before-{n} on node {i}"
            );
        }
    }
    // The restored cluster takes writes and replicates them.
    let leader = cluster.leader().await?;
    write_keys(&cluster, leader, "after", 5).await?;
    cluster.wait_for_value("after-4", "value-4").await?;
    Ok(())
}

/// Copies of a good backup, damaged in the ways a restore must catch.
fn damaged_copies(good: &[u8], dir: &Path) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let mut copies: Vec<(&'static str, Vec<u8>)> = vec![
        ("cut in half", good[..good.len() / 2].to_vec()),
        ("one byte short", good[..good.len() - 1].to_vec()),
        ("cut inside the header", good[..20].to_vec()),
        ("a text file", b"key=value\nthis is not a backup\n".to_vec()),
        ("empty", Vec::new()),
    ];
    for (what, at) in [
        ("a flipped byte in the state", good.len() * 2 / 3),
        ("a flipped byte in the header", 30),
        ("a flipped byte in the last digest", good.len() - 1),
    ] {
        let mut flipped = good.to_vec();
        flipped[at] ^= 0x20;
        copies.push((what, flipped));
    }
    let mut random = Vec::with_capacity(4096);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        random.push(x as u8);
    }
    copies.push(("random bytes", random));
    copies
        .into_iter()
        .enumerate()
        .map(|(n, (what, bytes))| {
            let path = dir.join(format!("damaged-{n}.backup"));
            std::fs::write(&path, bytes)?;
            Ok((what, path))
        })
        .collect()
}

#[tokio::test]
async fn damaged_truncated_and_foreign_files_are_refused() -> TestResult {
    let mut cluster = TestCluster::start(1, &[TOKEN]).await?;
    write_keys(&cluster, 0, "key", 20).await?;

    let (code, body) = cluster.get(0, "/backup").await?;
    assert_eq!(code, 401, "a backup without the token: {body}");

    let files = tempfile::tempdir()?;
    let file = files.path().join("good.backup");
    backup(&cluster.nodes[0].http, &file).await?;
    let good = std::fs::read(&file)?;

    for (what, path) in damaged_copies(&good, files.path())? {
        let target = files
            .path()
            .join(format!("node-{}", path.display().to_string().len()));
        let target = target.with_extension(what.replace(' ', "-"));
        let (ok, printed) = restore(&path, &target).await?;
        assert!(!ok, "a backup with {what} was restored: {printed}");
        assert!(
            printed.contains("cannot be restored") && printed.contains("nothing was written"),
            "unclear refusal of {what}: {printed}"
        );
        assert!(
            holds_no_node(&target),
            "{what}: the refused restore wrote to {}",
            target.display()
        );
    }

    // A directory that holds a node is never overwritten.
    let (ok, printed) = restore(&file, &cluster.nodes[0].dir).await?;
    assert!(!ok, "restored over a running node: {printed}");
    assert!(
        printed.contains("is not empty"),
        "unclear refusal: {printed}"
    );

    // A restored directory starts only as the founder of a new cluster.
    let restored = cluster.add_node(&[TOKEN]);
    std::fs::create_dir_all(&cluster.nodes[restored].dir)?;
    let (ok, printed) = restore(&file, &cluster.nodes[restored].dir).await?;
    assert!(ok, "restore into an empty directory failed: {printed}");
    let join = format!("--join={}", cluster.nodes[0].http);
    cluster.spawn(restored, &[&join])?;
    let status = cluster.wait_for_exit(restored).await?;
    assert!(
        !status.success(),
        "a restored directory joined another cluster"
    );
    let log = cluster.nodes[restored].log_text();
    assert!(
        log.contains("start it with --bootstrap"),
        "unclear refusal: {log}"
    );
    Ok(())
}
