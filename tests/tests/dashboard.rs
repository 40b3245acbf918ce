//! The dashboard at `/`, in a real headless chromium against three node
//! processes: it shows the members and the leader, a set from the page
//! reaches the cluster, the rate chart moves with writes, and a killed
//! leader shows as down while the page follows the new one; admin actions
//! (remove a member, deploy a guest) need the token. Also, without
//! a browser, the `/cluster` view and the forward header the page relies on.
//!
//! Set `RAFTWASM_DASHBOARD_SCREENSHOT=docs/dashboard.png` to keep the
//! screenshot the test takes (it is the README's).

mod browser;

use browser::{Browser, Page};
use raftwasm::proto::{ClusterView, FORWARD_HEADER, GuestHistory};
use raftwasm_tests::KV_NEXT_GUEST;
use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use serde_json::Value;

/// Waits until `expression` evaluates on `page` to a value that `accept`
/// takes, and returns it; the error names the last value seen.
async fn wait_on_page(
    cluster: &TestCluster,
    page: &Page<'_>,
    what: &str,
    expression: &str,
    accept: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let accept = &accept;
    cluster
        .wait_for(what, || async move {
            let value = page.evaluate(expression).await?;
            raftwasm_tests::ensure!(accept(&value), "the page shows {value}");
            Ok(value)
        })
        .await
}

/// The `data-state` of every row of the members table, by member id.
const MEMBER_STATES: &str = "Object.fromEntries([...document.querySelectorAll('#members tbody tr')]\
     .map(r => [r.dataset.id, r.dataset.state]))";

/// The cluster token of the browser test.
const TOKEN: &str = "dashboard-secret";

/// What the admin panel says about the last action.
const ADMIN_RESULT: &str = "document.querySelector('#admin-result').textContent";

/// The id of the leader the page names (empty when none).
const PAGE_LEADER: &str = "document.querySelector('#leader').dataset.leaderId || ''";

/// Whether `value` (a member id as the page shows it) is `id`.
fn names(value: &Value, id: u64) -> bool {
    value.as_str().and_then(|s| s.parse().ok()) == Some(id)
}

/// Writes from a few concurrent clients until stopped.
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
}

impl Load {
    /// Stops the writers and returns how many writes were acknowledged.
    async fn stop(self) -> u64 {
        let _ = self.stop.send(true);
        let mut written = 0;
        for task in self.tasks {
            written += task.await.unwrap_or(0);
        }
        written
    }
}

/// Starts four writers against `base` (the leader's URL).
fn spawn_load(client: reqwest::Client, base: String) -> Load {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = (0..4)
        .map(|writer| {
            let (client, base, stopped) = (client.clone(), base.clone(), stopped.clone());
            tokio::spawn(async move {
                let mut written = 0;
                while !*stopped.borrow() {
                    let url = format!("{base}/set?key=load-{writer}-{written}&value=x");
                    match client.post(&url).send().await {
                        Ok(answer) if answer.status().is_success() => written += 1,
                        _ => break,
                    }
                }
                written
            })
        })
        .collect();
    Load { stop, tasks }
}

#[tokio::test]
async fn dashboard_shows_the_cluster_and_follows_a_failover() -> TestResult {
    // The browser first: without one the test fails here, saying how to
    // install it.
    let browser = Browser::launch().await?;
    let mut cluster = TestCluster::start(3, &[&format!("--token={TOKEN}")]).await?;
    let leader = cluster.leader().await?;
    let leader_id = cluster.typed_status(leader).await?.id;
    // A follower serves the page, so that its writes must be forwarded and
    // it survives the leader's death.
    let served = (leader + 1) % 3;
    let page = browser.open(1200, 800).await?;
    page.navigate(&cluster.url(served, "/")).await?;

    // Three members, all up, and the leader.
    let result = async {
        let states = wait_on_page(&cluster, &page, "three members up", MEMBER_STATES, |v| {
            v.as_object()
                .is_some_and(|m| m.len() == 3 && m.values().all(|s| s == "up"))
        })
        .await?;
        for i in 0..3 {
            let id = cluster.typed_status(i).await?.id.to_string();
            raftwasm_tests::ensure!(
                states.get(&id).is_some(),
                "node {id} is not listed: {states}"
            );
        }
        wait_on_page(&cluster, &page, "the leader", PAGE_LEADER, |v| {
            names(v, leader_id)
        })
        .await?;

        // A set from the page is readable with a plain GET, and from the page.
        page.evaluate(
            "document.querySelector('#kv-key').value = 'from-page'; \
             document.querySelector('#kv-value').value = 'hello browser'; \
             document.querySelector('#kv-set').click(); true",
        )
        .await?;
        wait_on_page(
            &cluster,
            &page,
            "the set's answer",
            "document.querySelector('#kv-result').textContent",
            |v| *v == "set: ok",
        )
        .await?;
        assert_eq!(
            cluster.get(leader, "/get?key=from-page").await?,
            (200, "hello browser".into())
        );
        assert_eq!(
            cluster.get(served, "/get?key=from-page").await?,
            (200, "hello browser".into())
        );
        page.evaluate("document.querySelector('#kv-get').click(); true")
            .await?;
        wait_on_page(
            &cluster,
            &page,
            "the get's answer",
            "document.querySelector('#kv-result').textContent",
            |v| *v == "hello browser",
        )
        .await?;

        // The write rate chart moves while writes go on.
        let load = spawn_load(cluster.client().clone(), cluster.url(leader, ""));
        let chart = wait_on_page(
            &cluster,
            &page,
            "the write chart to draw writes",
            "(() => { const f = document.querySelector('#chart-writes'); \
             return { points: Number(f.dataset.points), max: Number(f.dataset.max), \
             line: f.querySelector('polyline').getAttribute('points') }; })()",
            |v| {
                v["points"].as_f64().is_some_and(|p| p >= 4.0)
                    && v["max"].as_f64().is_some_and(|m| m > 0.0)
            },
        )
        .await;
        let written = load.stop().await;
        let chart = chart?;
        assert!(written > 0, "the load wrote nothing");
        let line = chart["line"].as_str().unwrap_or_default();
        assert!(line.split(' ').count() >= 4, "no line drawn: {chart}");

        let png = page.screenshot().await?;
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        if let Some(path) = std::env::var_os("RAFTWASM_DASHBOARD_SCREENSHOT") {
            std::fs::write(&path, &png)?;
        }

        // The leader dies: the page shows it down and names the new leader.
        cluster.kill(leader);
        let down = leader_id.to_string();
        wait_on_page(
            &cluster,
            &page,
            "the killed leader down",
            MEMBER_STATES,
            |v| v.get(&down).is_some_and(|s| s == "down"),
        )
        .await?;
        let new_leader = cluster.leader().await?;
        let new_id = cluster.typed_status(new_leader).await?.id;
        assert_ne!(new_id, leader_id, "the leader did not change");
        wait_on_page(&cluster, &page, "the new leader", PAGE_LEADER, |v| {
            names(v, new_id)
        })
        .await?;

        // The watch panel shows writes under its prefix live, as they are
        // applied on the node that served the page.
        page.evaluate(
            "document.querySelector('#watch-prefix').value = 'watched-'; \
             document.querySelector('#watch-start').click(); true",
        )
        .await?;
        wait_on_page(
            &cluster,
            &page,
            "the watch panel to open its stream",
            "document.querySelector('#watch-state').textContent",
            |v| v.as_str().is_some_and(|s| s.starts_with("watching")),
        )
        .await?;
        assert_eq!(
            cluster
                .get(new_leader, "/set?key=watched-a&value=seen-live")
                .await?,
            (200, "ok".into())
        );
        assert_eq!(
            cluster
                .get(new_leader, "/set?key=unwatched&value=x")
                .await?,
            (200, "ok".into())
        );
        assert_eq!(
            cluster.get(new_leader, "/delete?key=watched-a").await?,
            (200, "ok".into())
        );
        let events = wait_on_page(
            &cluster,
            &page,
            "the watched put and delete",
            "[...document.querySelectorAll('#watch-events li')].map(e => e.textContent).reverse()",
            |v| v.as_array().is_some_and(|events| events.len() >= 2),
        )
        .await?;
        let events: Vec<&str> = events
            .as_array()
            .map(|e| e.iter().filter_map(|e| e.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            events.len(),
            2,
            "only the watched key's changes: {events:?}"
        );
        assert!(
            events[0].ends_with("put watched-a = seen-live"),
            "{events:?}"
        );
        assert!(events[1].ends_with("delete watched-a"), "{events:?}");

        // Removing the dead member from the page needs the token.
        let remove = format!(
            "window.confirm = () => true; \
             document.querySelector('#remove-id').value = '{leader_id}'; \
             document.querySelector('#remove').click(); true"
        );
        page.evaluate(&remove).await?;
        wait_on_page(
            &cluster,
            &page,
            "a refusal without the token",
            ADMIN_RESULT,
            |v| v.as_str().is_some_and(|s| s.contains("401")),
        )
        .await?;
        page.evaluate(&format!(
            "document.querySelector('#token').value = '{TOKEN}'; \
             document.querySelector('#token-save').click(); true"
        ))
        .await?;
        page.evaluate(&remove).await?;
        let removed = format!("node {leader_id} removed");
        wait_on_page(&cluster, &page, "the removal", ADMIN_RESULT, |v| {
            v.as_str() == Some(removed.as_str())
        })
        .await?;
        let members = cluster.members(new_leader).await?;
        assert_eq!(members.len(), 2, "{members:?}");
        wait_on_page(&cluster, &page, "two members", MEMBER_STATES, |v| {
            v.as_object()
                .is_some_and(|m| m.len() == 2 && m.values().all(|s| s == "up"))
        })
        .await?;

        // Deploying a guest from the page: an upload the follower relays.
        let module = tempfile::Builder::new().suffix(".wasm").tempfile()?;
        std::fs::write(module.path(), KV_NEXT_GUEST)?;
        page.choose_file("#guest-file", module.path()).await?;
        page.evaluate("document.querySelector('#deploy').click(); true")
            .await?;
        wait_on_page(&cluster, &page, "the deploy", ADMIN_RESULT, |v| {
            v.as_str().is_some_and(|s| s.starts_with("deployed"))
        })
        .await?;
        let guest: GuestHistory =
            serde_json::from_str(&cluster.get(new_leader, "/guest").await?.1)?;
        let active = guest.active.expect("an active guest");
        assert_eq!(active.version, "0.2.0", "{active:?}");
        wait_on_page(
            &cluster,
            &page,
            "the new guest on the page",
            "document.querySelector('#guest-active').textContent",
            |v| v.as_str().is_some_and(|s| s.contains(&active.hash[..16])),
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("chromium's stderr:\n{}", browser.stderr_tail());
    }
    Ok(result?)
}

#[tokio::test]
async fn cluster_view_lists_a_killed_member_with_the_reason() -> TestResult {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    let follower = (leader + 1) % 3;
    let view: ClusterView = serde_json::from_str(&cluster.get(follower, "/cluster").await?.1)?;
    assert_eq!(view.node, cluster.typed_status(follower).await?.id);
    assert_eq!(view.members.len(), 3);
    assert!(view.members.iter().all(|m| m.status.is_some()), "{view:?}");
    let leader_view = view
        .members
        .iter()
        .find(|m| m.http == cluster.nodes[leader].http)
        .expect("the leader is listed");
    let counters = leader_view
        .status
        .as_ref()
        .and_then(|s| s.counters.clone())
        .expect("counters");
    assert!(counters.applied_entries > 0, "{counters:?}");

    let other = (leader + 2) % 3;
    cluster.kill(other);
    let dead = cluster.nodes[other].http.clone();
    cluster
        .wait_for("the killed member listed as down", || async {
            let view: ClusterView =
                serde_json::from_str(&cluster.get(follower, "/cluster").await?.1)?;
            let member = view
                .members
                .iter()
                .find(|m| m.http == dead)
                .ok_or_else(|| anyhow::anyhow!("not listed"))?;
            raftwasm_tests::ensure!(member.status.is_none(), "still up: {member:?}");
            // The reason names the cause, not only reqwest's "error sending
            // request": nothing listens on a killed member's port.
            let reason = member.error.as_deref().unwrap_or_default();
            raftwasm_tests::ensure!(reason.contains("refused"), "no cause given: {member:?}");
            Ok(())
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn follower_forwards_a_write_only_when_asked() -> TestResult {
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    let follower = (leader + 1) % 3;
    let url = cluster.url(follower, "/set?key=forwarded&value=yes");

    // Without the header, the walkthrough's refusal.
    let refused = cluster.client().post(&url).send().await?;
    assert_eq!(refused.status().as_u16(), 421);
    assert_eq!(refused.text().await?, "write method not allowed");

    // With it, the follower passes the write on; from the page's own
    // origin too.
    let origin = format!("http://{}", cluster.nodes[follower].http);
    let forwarded = cluster
        .client()
        .post(&url)
        .header(FORWARD_HEADER, "true")
        .header("origin", &origin)
        .send()
        .await?;
    assert_eq!(forwarded.status().as_u16(), 200);
    assert_eq!(
        cluster.get(leader, "/get?key=forwarded").await?,
        (200, "yes".into())
    );

    // A foreign origin is still refused, header or not.
    let foreign = cluster
        .client()
        .post(&url)
        .header(FORWARD_HEADER, "true")
        .header("origin", "http://evil.example")
        .send()
        .await?;
    assert_eq!(foreign.status().as_u16(), 403);

    // The page itself: HTML that may load only its own script and style.
    let page = cluster
        .client()
        .get(cluster.url(follower, "/"))
        .send()
        .await?;
    assert_eq!(page.status().as_u16(), 200);
    let policy = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(page.text().await?.contains("/dashboard/app.js"));
    Ok(())
}
