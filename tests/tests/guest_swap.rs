//! Hot-swapping the guest of a live three-node cluster: every node switches
//! at the same log index, old data is still served, the new behaviour is
//! live, and writes during the swap are not lost.

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use raftwasm_tests::{KV_NEXT_GUEST, LEDGER_GUEST};

const INCR: u8 = 0x10;

/// `incr KEY` for guest-kv 0.2.0.
fn incr(key: &str) -> Vec<u8> {
    [&[INCR][..], key.as_bytes()].concat()
}

async fn hashes_and_guests(
    cluster: &TestCluster,
) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let mut out = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        if node.is_running() {
            let status = cluster.status(i).await?;
            out.push((
                status["state_hash"].as_str().unwrap_or_default().to_owned(),
                status["guest"].clone(),
            ));
        }
    }
    Ok(out)
}

/// Deploys `module` through node `i`; the swap record and the new hash.
async fn deploy(
    cluster: &TestCluster,
    i: usize,
    module: &[u8],
) -> anyhow::Result<(serde_json::Value, String)> {
    let response = cluster.post(i, "/guest", module.to_vec()).await?;
    raftwasm_tests::ensure!(
        response.status().as_u16() == 200,
        "deploy answered {}",
        response.status()
    );
    let record: serde_json::Value = response.json().await?;
    let hash = record["hash"].as_str().unwrap_or_default().to_owned();
    Ok((record, hash))
}

/// Waits until every running node runs `hash` and holds the same state.
async fn wait_for_guest_everywhere(cluster: &TestCluster, hash: &str) -> anyhow::Result<()> {
    cluster
        .wait_for(
            &format!("guest {hash} with equal state on every node"),
            || async {
                let seen = hashes_and_guests(cluster).await?;
                raftwasm_tests::ensure!(
                    seen.iter().all(|(_, g)| g["hash"] == hash),
                    "guests: {seen:?}"
                );
                raftwasm_tests::ensure!(
                    seen.windows(2).all(|w| w[0] == w[1]),
                    "state differs: {seen:?}"
                );
                Ok(())
            },
        )
        .await
}

#[tokio::test]
async fn guest_swap_switches_every_node_at_one_index() -> TestResult {
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    let follower = (leader + 1) % 3;
    assert_eq!(
        cluster.get(leader, "/set?key=abc&value=efg").await?,
        (200, "ok".into())
    );
    let before = cluster.status(leader).await?["guest"].clone();

    let refused = cluster.post(leader, "/apply", incr("hits")).await?;
    assert_eq!(refused.status().as_u16(), 422, "the old guest has no incr");

    // Deployed through a follower, which passes it to the leader.
    let (record, hash) = deploy(&cluster, follower, KV_NEXT_GUEST).await?;
    assert_eq!(record["name"], "guest-kv");
    assert_eq!(record["version"], "0.2.0");
    assert_ne!(before["hash"], hash.as_str(), "the guest really changed");

    wait_for_guest_everywhere(&cluster, &hash).await?;
    for (_, guest) in hashes_and_guests(&cluster).await? {
        assert_eq!(
            guest["since"], record["index"],
            "every node switched at the same index"
        );
    }

    // Old data is still served; the migration ran; the new command works.
    for i in 0..3 {
        assert_eq!(cluster.get(i, "/get?key=abc").await?, (200, "efg".into()));
        assert_eq!(
            cluster.get(i, "/get?key=migrated-from").await?,
            (200, "0.1.1".into())
        );
    }
    let first = cluster.post(leader, "/apply", incr("hits")).await?;
    assert_eq!(
        (first.status().as_u16(), first.text().await?),
        (200, "1".into())
    );
    let second = cluster.post(leader, "/apply", incr("hits")).await?;
    assert_eq!(second.text().await?, "2");
    cluster.wait_for_value("hits", "2").await?;

    let (code, body) = cluster.get(follower, "/guest").await?;
    assert_eq!(code, 200);
    let guests: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(guests["active"]["hash"], hash.as_str());
    assert_eq!(
        guests["history"].as_array().map(Vec::len),
        Some(2),
        "{guests}"
    );
    let (_, metrics) = cluster.get(follower, "/metrics").await?;
    assert!(
        metrics.contains(&format!("hash=\"{hash}\"")),
        "metrics name the guest"
    );
    Ok(())
}

#[tokio::test]
async fn writes_during_a_swap_are_acknowledged_and_kept() -> TestResult {
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    let base = format!("http://{}", cluster.nodes[leader].http);
    let client = reqwest::Client::new();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let client = client.clone();
            let base = base.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0..60 {
                    let key = format!("w{w}-{n}");
                    let url = format!("{base}/set?key={key}&value={n}");
                    match client.get(&url).send().await {
                        Ok(r) if r.status().is_success() => acked.push(key),
                        // A clear refusal is allowed; a lost write is not.
                        Ok(r) => {
                            assert!(r.status().is_client_error() || r.status().is_server_error())
                        }
                        Err(e) => panic!("write {key} got no answer: {e}"),
                    }
                }
                acked
            })
        })
        .collect();
    let response = cluster
        .post(leader, "/guest", KV_NEXT_GUEST.to_vec())
        .await?;
    assert_eq!(response.status().as_u16(), 200);
    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(writer.await?);
    }
    assert!(
        acked.len() >= 200,
        "only {} writes were acknowledged",
        acked.len()
    );
    for key in &acked {
        let n = key.rsplit('-').next().expect("n");
        cluster.wait_for_value(key, n).await?;
    }
    Ok(())
}

#[tokio::test]
async fn guest_swap_reaches_node_that_was_down() -> TestResult {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    let down = (leader + 1) % 3;
    cluster.get(leader, "/set?key=before&value=1").await?;
    cluster.wait_for_value("before", "1").await?;
    cluster.kill(down);

    let (record, hash) = deploy(&cluster, leader, KV_NEXT_GUEST).await?;
    let counted = cluster.post(leader, "/apply", incr("after")).await?;
    assert_eq!(counted.text().await?, "1");

    cluster.spawn(down, &[])?;
    wait_for_guest_everywhere(&cluster, &hash).await?;
    let status = cluster.status(down).await?;
    assert_eq!(status["guest"]["since"], record["index"]);
    assert_eq!(
        cluster
            .get(down, "/get?key=after&consistency=stale")
            .await?,
        (200, "1".into())
    );
    Ok(())
}

#[tokio::test]
async fn custom_guest_serves_its_own_commands() -> TestResult {
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    // Another name than guest-kv: the swap must be forced.
    let refused = cluster
        .post(leader, "/guest", LEDGER_GUEST.to_vec())
        .await?;
    assert_eq!(refused.status().as_u16(), 409);
    let response = cluster
        .post(leader, "/guest?force=true", LEDGER_GUEST.to_vec())
        .await?;
    assert_eq!(response.status().as_u16(), 200);

    for command in ["open alice 100", "open bob 0", "transfer alice bob 30"] {
        let r = cluster.post(leader, "/apply", command.into()).await?;
        assert_eq!(r.status().as_u16(), 200, "{command}");
    }
    let overdraw = cluster
        .post(leader, "/apply", "transfer bob alice 100".into())
        .await?;
    assert_eq!(overdraw.status().as_u16(), 422);
    assert_eq!(overdraw.text().await?, "bob has 30, cannot send 100");

    let follower = (leader + 1) % 3;
    let balance = cluster
        .post(follower, "/query", "balance bob".into())
        .await?;
    assert_eq!(balance.text().await?, "30");
    let accounts = cluster
        .post(follower, "/query?consistency=stale", "accounts".into())
        .await?;
    assert_eq!(accounts.text().await?, "alice 70\nbob 30\n");
    Ok(())
}

#[tokio::test]
async fn guest_swap_reaches_node_that_catches_up_by_snapshot() -> TestResult {
    let mut cluster = TestCluster::start(3, &["--snapshot-entries=20", "--keep-entries=5"]).await?;
    let leader = cluster.leader().await?;
    let down = (leader + 1) % 3;
    let last_index = cluster.status(down).await?["last_log_index"]
        .as_u64()
        .unwrap_or(0);
    cluster.kill(down);

    let (record, hash) = deploy(&cluster, leader, KV_NEXT_GUEST).await?;
    // Enough single-entry writes that the log the node misses is purged.
    for n in 0..60 {
        let answer = cluster.post(leader, "/apply", incr("counter")).await?;
        assert_eq!(answer.text().await?, (n + 1).to_string());
    }
    cluster
        .wait_for(
            "the leader to purge what the stopped node misses",
            || async {
                let purged = cluster.status(leader).await?["purged"].as_u64();
                raftwasm_tests::ensure!(
                    purged.is_some_and(|p| p > last_index),
                    "purged up to {purged:?}"
                );
                Ok(())
            },
        )
        .await?;

    cluster.spawn(down, &[])?;
    wait_for_guest_everywhere(&cluster, &hash).await?;
    let status = cluster.status(down).await?;
    assert!(
        status["snapshot"].as_u64().is_some_and(|s| s > last_index),
        "the node caught up by snapshot: {status}"
    );
    assert_eq!(status["guest"]["since"], record["index"]);
    assert_eq!(
        cluster
            .get(down, "/get?key=counter&consistency=stale")
            .await?,
        (200, "60".into())
    );
    // It applies new entries with the new guest.
    let next = cluster.post(leader, "/apply", incr("counter")).await?;
    assert_eq!(next.text().await?, "61");
    cluster.wait_for_value("counter", "61").await?;
    Ok(())
}

#[tokio::test]
async fn bootstrap_installs_the_guest_given_with_the_guest_flag() -> TestResult {
    let mut cluster = TestCluster::new();
    cluster.add_node(&[]);
    let file = cluster.nodes[0].dir.with_extension("ledger.wasm");
    std::fs::write(&file, LEDGER_GUEST)?;
    let guest = format!("--guest={}", file.display());
    cluster.spawn(0, &["--bootstrap", &guest])?;
    cluster.wait_for_guest(0).await?;
    assert_eq!(cluster.status(0).await?["guest"]["name"], "ledger");
    let opened = cluster.post(0, "/apply", "open carol 5".into()).await?;
    assert_eq!(opened.text().await?, "opened carol");
    Ok(())
}
