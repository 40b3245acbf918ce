//! A follower that was down while the leader snapshotted and purged the log
//! entries it misses catches up by installing the leader's snapshot.
//!
//! The snapshot pieces are made tiny (`--snapshot-chunk-bytes`): the
//! snapshot (the guest module alone is over 20 KiB) crosses in dozens of
//! pieces, so the follower installs it from a file assembled piece by piece.

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;

/// Keys written while the follower is down, each in its own log entry.
const KEYS: usize = 200;

/// A `/status` field as a log index.
fn index(status: &serde_json::Value, field: &str) -> Option<u64> {
    status[field].as_u64()
}

#[tokio::test]
async fn follower_behind_purged_log_installs_a_snapshot() -> TestResult {
    let mut cluster = TestCluster::start(
        3,
        &[
            "--snapshot-entries=20",
            "--keep-entries=5",
            "--snapshot-chunk-bytes=1024",
        ],
    )
    .await?;
    let leader = cluster.leader().await?;
    let follower = (leader + 1) % 3;

    // Everything the follower has when it goes down.
    let before = cluster.status(follower).await?;
    let last_index = index(&before, "last_log_index").unwrap_or(0);
    let old_pid = cluster.nodes[follower].pid();
    cluster.kill(follower);

    // Sequential writes: each is its own entry, so the leader passes the
    // snapshot threshold many times over.
    for n in 0..KEYS {
        let answer = cluster
            .get(leader, &format!("/set?key=key-{n}&value=value-{n}"))
            .await?;
        raftwasm_tests::ensure!(answer == (200, "ok".into()), "set key-{n}: {answer:?}");
    }
    cluster
        .wait_for(
            "the leader to purge entries the follower misses",
            || async {
                let status = cluster.status(leader).await?;
                let purged = index(&status, "purged");
                raftwasm_tests::ensure!(
                    purged.is_some_and(|p| p > last_index),
                    "the leader purged up to {purged:?}; the follower has up to {last_index}"
                );
                Ok(())
            },
        )
        .await?;

    // The follower can only catch up from a snapshot now.
    cluster.spawn(follower, &[])?;
    assert!(
        cluster.nodes[follower]
            .pid()
            .is_some_and(|p| Some(p) != old_pid)
    );
    cluster
        .wait_for("every key on the restarted follower", || async {
            for n in 0..KEYS {
                let answer = cluster
                    .get(follower, &format!("/get?key=key-{n}&consistency=stale"))
                    .await?;
                raftwasm_tests::ensure!(
                    answer == (200, format!("value-{n}")),
                    "key-{n} reads {answer:?}"
                );
            }
            Ok(())
        })
        .await?;
    let log = cluster.nodes[follower].log_text();
    let pieces = log
        .lines()
        .filter(|line| line.contains("received a snapshot"))
        .filter_map(|line| {
            line.split("pieces=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max();
    assert!(
        pieces.is_some_and(|p| p > 10),
        "the follower received its snapshot in {pieces:?} pieces"
    );
    let after = cluster.status(follower).await?;
    let snapshot = index(&after, "snapshot");
    assert!(
        snapshot.is_some_and(|s| s > last_index),
        "the follower shows snapshot {snapshot:?}, but it went down at index {last_index}"
    );

    cluster.wait_for_same_state().await?;

    // The installed snapshot is durable: killed again, the follower comes
    // back with every key, and then follows the log as usual.
    cluster.kill(follower);
    cluster.spawn(follower, &[])?;
    assert_eq!(
        cluster.get(leader, "/set?key=after&value=snapshot").await?,
        (200, "ok".into())
    );
    cluster.wait_for_value("after", "snapshot").await?;
    for n in 0..KEYS {
        let answer = cluster
            .get(follower, &format!("/get?key=key-{n}&consistency=stale"))
            .await?;
        assert_eq!(answer, (200, format!("value-{n}")), "key-{n}");
    }
    Ok(cluster.wait_for_same_state().await?)
}
