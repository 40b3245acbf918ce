//! The expiry-sweep attack: guest-kv commands sent through `/apply` skip the
//! HTTP API's key and value limits, so guest-kv checks them itself. Sixteen
//! sets of 1.1 MB keys with a short TTL used to make every later entry's
//! expiry sweep run out of fuel, failing the first command of every entry on
//! every replica for good.

use guest_kv::command::Command;
use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;

#[tokio::test]
async fn oversized_commands_through_apply_are_refused_and_writes_keep_working() -> TestResult {
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;

    for i in 0..16u8 {
        let mut key = vec![b'k'; 1_100_000];
        key[0] = b'a' + i;
        let set = Command::Set {
            key: &key,
            value: b"v",
            ttl_ms: 1,
        };
        let response = cluster.post(leader, "/apply", set.encode()).await?;
        let code = response.status().as_u16();
        let body = response.text().await?;
        assert_eq!(code, 422, "a 1.1 MB key answered {body:?}");
        assert_eq!(body, "the key is 1100000 bytes; the limit is 1024");
    }
    let set = Command::Set {
        key: b"big",
        value: &vec![b'v'; (1 << 20) + 1],
        ttl_ms: 0,
    };
    let response = cluster.post(leader, "/apply", set.encode()).await?;
    assert_eq!(response.status().as_u16(), 422);
    assert_eq!(
        response.text().await?,
        "the value is 1048577 bytes; the limit is 1048576"
    );

    // Well past the TTL, every entry's first command still works.
    for i in 0..5 {
        let (code, body) = cluster
            .get(leader, &format!("/set?key=after&value=v{i}"))
            .await?;
        assert_eq!(
            (code, body.as_str()),
            (200, "ok"),
            "write {i} after the attack"
        );
    }
    let set = Command::Set {
        key: b"applied",
        value: b"yes",
        ttl_ms: 0,
    };
    let response = cluster.post(leader, "/apply", set.encode()).await?;
    assert_eq!(response.status().as_u16(), 200);
    cluster.wait_for_value("after", "v4").await?;
    cluster.wait_for_value("applied", "yes").await?;
    cluster.wait_for_same_state().await?;
    Ok(())
}
