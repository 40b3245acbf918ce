//! Guests the cluster must refuse — junk, another world, a lower or equal
//! version, a failing migration, an oversized upload — each with a clear 4xx,
//! leaving every node on the same guest and the same state.

use raftwasm::runtime::BUNDLED_GUEST;
use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use raftwasm_tests::{CHAOS_GUEST, KV_NEXT_GUEST};

async fn snapshot_of(
    cluster: &TestCluster,
) -> anyhow::Result<Vec<(serde_json::Value, serde_json::Value)>> {
    let mut out = Vec::new();
    for i in 0..cluster.nodes.len() {
        let status = cluster.status(i).await?;
        out.push((status["guest"].clone(), status["state_hash"].clone()));
    }
    Ok(out)
}

#[tokio::test]
async fn bad_guests_are_refused_and_change_nothing() -> TestResult {
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    assert_eq!(
        cluster.get(leader, "/set?key=k&value=v").await?,
        (200, "ok".into())
    );
    let upgrade = cluster
        .post(leader, "/guest", KV_NEXT_GUEST.to_vec())
        .await?;
    assert_eq!(upgrade.status().as_u16(), 200);
    let hash = upgrade.json::<serde_json::Value>().await?["hash"].clone();
    cluster
        .wait_for("the upgrade on every node", || async {
            let seen = snapshot_of(&cluster).await?;
            raftwasm_tests::ensure!(
                seen.iter().all(|(g, _)| g["hash"] == hash)
                    && seen.windows(2).all(|w| w[0] == w[1])
            );
            Ok(())
        })
        .await?;
    let before = snapshot_of(&cluster).await?;
    let (_, history_before) = cluster.get(leader, "/guest").await?;

    let other_world = wat::parse_str("(component)")?;
    let oversized = vec![0u8; 8 * 1024 * 1024 + 1];
    let cases: [(&str, Vec<u8>, u16, &str); 6] = [
        (
            "/guest",
            b"not wasm at all".to_vec(),
            400,
            "not a WebAssembly module",
        ),
        ("/guest", other_world, 400, "does not implement"),
        (
            "/guest",
            BUNDLED_GUEST.to_vec(),
            409,
            "not higher than the active 0.2.0",
        ),
        ("/guest", KV_NEXT_GUEST.to_vec(), 409, "not higher"),
        (
            "/guest?force=true",
            CHAOS_GUEST.to_vec(),
            422,
            "migration refused on purpose",
        ),
        ("/guest", oversized, 413, ""),
    ];
    for (path, module, status, message) in cases {
        let response = cluster.post(leader, path, module).await?;
        let code = response.status().as_u16();
        let body = response.text().await?;
        assert_eq!(code, status, "{path}: {body}");
        assert!(
            body.contains(message),
            "{path}: {body:?} should say {message:?}"
        );
    }

    assert_eq!(cluster.get(leader, "/get?key=k").await?, (200, "v".into()));
    cluster
        .wait_for("every node unchanged", || async {
            let after = snapshot_of(&cluster).await?;
            raftwasm_tests::ensure!(after == before, "{after:?} != {before:?}");
            Ok(())
        })
        .await?;
    let (_, history_after) = cluster.get(leader, "/guest").await?;
    assert_eq!(history_before, history_after);
    Ok(())
}

#[tokio::test]
async fn cluster_token_guards_joins_removals_and_deploys() -> TestResult {
    let cluster = TestCluster::start(2, &["--token=s3cret"]).await?;
    let leader = cluster.leader().await?;

    let anonymous = cluster
        .post(leader, "/guest", KV_NEXT_GUEST.to_vec())
        .await?;
    assert_eq!(anonymous.status().as_u16(), 401);
    let url = format!("http://{}/remove?id=1", cluster.nodes[leader].http);
    let client = reqwest::Client::new();
    assert_eq!(client.post(&url).send().await?.status().as_u16(), 401);
    let wrong = client.post(&url).bearer_auth("guess").send().await?;
    assert_eq!(wrong.status().as_u16(), 401);

    let deploy_url = format!("http://{}/guest", cluster.nodes[leader].http);
    let deployed = client
        .post(&deploy_url)
        .bearer_auth("s3cret")
        .body(KV_NEXT_GUEST.to_vec())
        .send()
        .await?;
    assert_eq!(deployed.status().as_u16(), 200);

    // Plain reads and writes need no token.
    assert_eq!(
        cluster.get(leader, "/set?key=k&value=v").await?,
        (200, "ok".into())
    );
    Ok(())
}

#[tokio::test]
async fn node_without_the_token_cannot_join() -> TestResult {
    let mut cluster = TestCluster::start(1, &["--token=s3cret"]).await?;
    let stranger = cluster.add_node(&[]);
    let join = format!("--join={}", cluster.nodes[0].http);
    cluster.spawn(stranger, &[&join])?;
    cluster
        .wait_for("the stranger's join to be refused", || async {
            let log = cluster.nodes[stranger].log_text();
            raftwasm_tests::ensure!(log.contains("401"), "no refusal yet");
            Ok(())
        })
        .await?;
    let members = cluster.status(0).await?["members"].as_array().map(Vec::len);
    assert_eq!(members, Some(1));
    Ok(())
}
