//! The `raftwasm kv`, `status`, `member` and `guest` subcommands, run as processes
//! against a real three-node cluster: every subcommand, leader discovery
//! with the leader killed, the documented exit codes, binary values through
//! stdin, and `status --json` as a typed `proto::Status`.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use raftwasm::proto::{Role, Status};
use raftwasm_tests::cluster::TestResult;
use raftwasm_tests::cluster::{TestCluster, binary};

/// Runs `raftwasm ARGS` with `env` and `stdin`, with none of the client
/// variables inherited from the environment of the test.
fn raftwasm(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> anyhow::Result<Output> {
    let mut child = Command::new(binary())
        .args(args)
        .env_remove("RAFTWASM_CLUSTER")
        .env_remove("RAFTWASM_TOKEN")
        .env_remove("RAFTWASM_TLS_CA")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin)?;
    }
    Ok(child.wait_with_output()?)
}

/// The exit code, stdout and stderr (as text) of an output.
fn outcome(output: &Output) -> (Option<i32>, Vec<u8>, String) {
    (
        output.status.code(),
        output.stdout.clone(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every node's HTTP address, comma-separated, with node `first` first.
fn endpoints(cluster: &TestCluster, first: usize) -> String {
    let n = cluster.nodes.len();
    (0..n)
        .map(|k| cluster.nodes[(first + k) % n].http.clone())
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test]
async fn kv_commands_find_the_leader_and_exit_with_documented_codes() -> TestResult {
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    // A follower first: the CLI must follow it to the leader.
    let follower = (leader + 1) % 3;
    let all = format!("--cluster={}", endpoints(&cluster, follower));
    let run = |args: &[&str], stdin: &[u8]| {
        let mut with_cluster = args.to_vec();
        with_cluster.push(&all);
        raftwasm(&with_cluster, &[], stdin).map(|o| outcome(&o))
    };

    let (code, _, err) = run(&["kv", "set", "colour", "blue"], b"")?;
    assert_eq!(code, Some(0), "{err}");
    cluster.wait_for_value("colour", "blue").await?;
    let (code, out, err) = run(&["kv", "get", "colour"], b"")?;
    assert_eq!((code, out.as_slice()), (Some(0), &b"blue"[..]), "{err}");
    let (code, out, _) = run(&["kv", "get", "colour", "--consistency=stale"], b"")?;
    assert_eq!((code, out.as_slice()), (Some(0), &b"blue"[..]));

    // cas: a matching expected value swaps; another one exits 1 and prints
    // the current value; without --expected it only creates.
    let (code, _, err) = run(&["kv", "cas", "colour", "green", "--expected=blue"], b"")?;
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = run(&["kv", "cas", "colour", "red", "--expected=blue"], b"")?;
    assert_eq!((code, out.as_slice()), (Some(1), &b"green"[..]));
    let (code, _, _) = run(&["kv", "cas", "colour", "red"], b"")?;
    assert_eq!(code, Some(1));
    let (code, _, err) = run(&["kv", "cas", "shape", "round"], b"")?;
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = run(&["kv", "get", "colour"], b"")?;
    assert_eq!(out, b"green");
    assert_eq!(code, Some(0));

    // delete: 0 when the key existed, 1 when it did not; get of a missing key
    // exits 1 with nothing on stdout.
    let (code, _, err) = run(&["kv", "delete", "colour"], b"")?;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run(&["kv", "delete", "colour"], b"")?;
    assert_eq!(code, Some(1));
    assert!(err.contains("colour"), "{err}");
    let (code, out, err) = run(&["kv", "get", "colour"], b"")?;
    assert_eq!((code, out.len()), (Some(1), 0), "{err}");

    // Values from stdin, with `-` or no VALUE, byte for byte.
    let every_byte: Vec<u8> = (0..=255).collect();
    for args in [
        &["kv", "set", "bytes", "-"][..],
        &["kv", "set", "bytes2"][..],
    ] {
        let (code, _, err) = run(args, &every_byte)?;
        assert_eq!(code, Some(0), "{args:?}: {err}");
        let (code, out, err) = run(&["kv", "get", args[2]], b"")?;
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out, every_byte, "{args:?} did not round-trip");
    }
    // An empty value from stdin is a value too.
    let (code, _, err) = run(&["kv", "set", "empty"], b"")?;
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = run(&["kv", "get", "empty"], b"")?;
    assert_eq!((code, out.len()), (Some(0), 0));

    // A TTL is passed on: the key expires.
    let (code, _, err) = run(&["kv", "set", "brief", "x", "--ttl=0.2"], b"")?;
    assert_eq!(code, Some(0), "{err}");
    cluster
        .wait_for("the key with a ttl to expire", || async {
            let (code, _, _) = run(&["kv", "get", "brief"], b"")?;
            raftwasm_tests::ensure!(code == Some(1), "get answers {code:?}");
            Ok(())
        })
        .await?;

    // The cluster from the environment.
    let output = raftwasm(
        &["kv", "get", "shape"],
        &[("RAFTWASM_CLUSTER", &endpoints(&cluster, leader))],
        b"",
    )?;
    assert_eq!(outcome(&output).1, b"round");

    // Usage errors and refused requests exit 2, with a message.
    let (code, _, err) = run(&["kv", "get"], b"")?;
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = run(&["kv", "set", "", "v"], b"")?;
    assert_eq!(code, Some(2));
    assert!(err.contains("the key is empty"), "{err}");
    let long_key = "k".repeat(raftwasm::api::MAX_KEY + 1);
    let (code, _, err) = run(&["kv", "get", &long_key], b"")?;
    assert_eq!(code, Some(2));
    assert!(err.contains("limit"), "{err}");
    Ok(())
}

#[tokio::test]
async fn unreachable_cluster_exits_3() -> TestResult {
    // A port nobody listens on: bound, noted, and closed again.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cluster = format!("--cluster=127.0.0.1:{port}");
    for args in [
        &["kv", "get", "k"][..],
        &["kv", "set", "k", "v"][..],
        &["status"][..],
        &["member", "remove", "7"][..],
    ] {
        let mut args = args.to_vec();
        args.extend([cluster.as_str(), "--timeout=0.5"]);
        let (code, out, err) = outcome(&raftwasm(&args, &[], b"")?);
        assert_eq!(code, Some(3), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed {out:?}");
        assert!(err.contains("no leader answered"), "{args:?}: {err}");
    }
    Ok(())
}

#[tokio::test]
async fn kv_set_reaches_the_new_leader_after_the_leader_is_killed() -> TestResult {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let old = cluster.leader().await?;
    let all = format!("--cluster={}", endpoints(&cluster, old));
    let (code, _, err) = outcome(&raftwasm(&["kv", "set", "before", "1", &all], &[], b"")?);
    assert_eq!(code, Some(0), "{err}");

    let old_pid = cluster.nodes[old].pid();
    cluster.kill(old);
    assert!(old_pid.is_some() && !cluster.nodes[old].is_running());
    let new = cluster.leader().await?;
    assert_ne!(new, old);

    // The killed leader is still first in the list.
    let (code, _, err) = outcome(&raftwasm(&["kv", "set", "after", "2", &all], &[], b"")?);
    assert_eq!(code, Some(0), "{err}");
    cluster.wait_for_value("after", "2").await?;
    let (code, out, err) = outcome(&raftwasm(&["kv", "get", "before", &all], &[], b"")?);
    assert_eq!((code, out.as_slice()), (Some(0), &b"1"[..]), "{err}");
    Ok(())
}

#[tokio::test]
async fn status_and_member_commands_manage_a_cluster() -> TestResult {
    let token = "cli-test-token";
    let mut cluster = TestCluster::start(3, &[&format!("--token={token}")]).await?;
    let leader = cluster.leader().await?;
    let all = format!("--cluster={}", endpoints(&cluster, (leader + 2) % 3));
    let with_token = [("RAFTWASM_TOKEN", token)];

    // status --json is the leader's typed status.
    let (code, out, err) = outcome(&raftwasm(&["status", "--json", &all], &[], b"")?);
    assert_eq!(code, Some(0), "{err}");
    let status: Status = serde_json::from_slice(&out)?;
    assert_eq!(status.role, Role::Leader);
    assert_eq!(status.voters(), 3);
    assert_eq!(
        status.leader_http.as_deref(),
        Some(cluster.nodes[leader].http.as_str())
    );

    // The table: a header and a row per member with its address, role and
    // guest (which a new follower shows once it has applied it).
    let table = cluster
        .wait_for("status to show every member running guest-kv", || async {
            let (code, out, err) = outcome(&raftwasm(&["status", &all], &[], b"")?);
            raftwasm_tests::ensure!(code == Some(0), "status exited {code:?}: {err}");
            let table = String::from_utf8(out)?;
            for node in &cluster.nodes {
                let row = table.lines().find(|l| l.contains(&node.http));
                raftwasm_tests::ensure!(
                    row.is_some_and(|r| r.contains(&node.raft) && r.contains("guest-kv")),
                    "no full row for {}:\n{table}",
                    node.http
                );
            }
            Ok(table)
        })
        .await?;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID"), "{table}");
    for column in ["ROLE", "TERM", "HTTP", "RAFT", "APPLIED", "LAG", "GUEST"] {
        assert!(lines[0].contains(column), "{table}");
    }
    assert_eq!(lines.len(), 4, "{table}");
    assert_eq!(
        lines.iter().filter(|l| l.contains(" leader ")).count(),
        1,
        "{table}"
    );

    // A node started on its own, added by the operator.
    let added = cluster.add_node(&[&format!("--token={token}")]);
    cluster.spawn(added, &["--id=4242"])?;
    let (http, raft) = (
        cluster.nodes[added].http.clone(),
        cluster.nodes[added].raft.clone(),
    );
    let add = [
        "member",
        "add",
        "4242",
        &format!("--http={http}"),
        &format!("--raft={raft}"),
        &all,
    ];
    // Without the token the cluster refuses it: exit 2.
    let (code, _, err) = outcome(&raftwasm(&add, &[], b"")?);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("token"), "{err}");
    // The node may still be starting: membership waits for it to catch up.
    let (code, out, err) = outcome(&raftwasm(&add, &with_token, b"")?);
    assert_eq!(code, Some(0), "{err}");
    assert!(String::from_utf8(out)?.contains("4242"));
    cluster.wait_for_voters(4).await?;

    let remove = ["member", "remove", "4242", &all];
    let (code, _, err) = outcome(&raftwasm(&remove, &with_token, b"")?);
    assert_eq!(code, Some(0), "{err}");
    cluster.kill(added);
    cluster.wait_for_voters(3).await?;
    // Removing it again: not a member, a refused request.
    let (code, _, err) = outcome(&raftwasm(&remove, &with_token, b"")?);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a member"), "{err}");
    Ok(())
}

#[tokio::test]
async fn kv_commands_speak_https_to_a_tls_cluster() -> TestResult {
    let cluster = TestCluster::new().with_tls()?.start_nodes(3, &[]).await?;
    let ca = cluster.ca().map(|ca| ca.file.display().to_string());
    let ca = format!("--tls-ca={}", ca.unwrap_or_default());
    let all = format!("--cluster={}", endpoints(&cluster, 0));
    let (code, _, err) = outcome(&raftwasm(&["kv", "set", "k", "tls", &all, &ca], &[], b"")?);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = outcome(&raftwasm(&["kv", "get", "k", &all, &ca], &[], b"")?);
    assert_eq!((code, out.as_slice()), (Some(0), &b"tls"[..]), "{err}");
    // Without the CA the client speaks clear text to HTTPS ports: no answer.
    let (code, _, err) = outcome(&raftwasm(
        &["kv", "get", "k", &all, "--timeout=0.5"],
        &[],
        b"",
    )?);
    assert_eq!(code, Some(3), "{err}");
    Ok(())
}

#[tokio::test]
async fn every_subcommand_has_help_with_examples() -> TestResult {
    let subcommands: &[&[&str]] = &[
        &["kv", "get"],
        &["kv", "set"],
        &["kv", "delete"],
        &["kv", "cas"],
        &["status"],
        &["member", "add"],
        &["member", "remove"],
        &["guest", "deploy"],
        &["guest", "show"],
        &["bench"],
        &["backup"],
        &["restore"],
    ];
    for subcommand in subcommands {
        let args: Vec<&str> = subcommand.iter().copied().chain(["--help"]).collect();
        let (code, out, err) = outcome(&raftwasm(&args, &[], b"")?);
        let help = String::from_utf8_lossy(&out);
        assert_eq!(code, Some(0), "{subcommand:?}: {err}");
        assert!(
            help.contains("Examples:") && help.contains(&format!("raftwasm {}", subcommand[0])),
            "{subcommand:?} --help has no examples:\n{help}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn guest_commands_deploy_and_show_a_guest() -> TestResult {
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    let all = format!("--cluster={}", endpoints(&cluster, (leader + 1) % 3));
    let before = cluster.typed_status(leader).await?.guest;

    let module = cluster.root().join("kv-next.wasm");
    std::fs::write(&module, raftwasm_tests::KV_NEXT_GUEST)?;
    let module = module.to_string_lossy().into_owned();
    let (code, _, err) = outcome(&raftwasm(&["guest", "deploy", &module, &all], &[], b"")?);
    assert_eq!(code, Some(0), "{err}");
    cluster
        .wait_for("kv-next on every node", || async {
            for i in 0..3 {
                let guest = cluster.typed_status(i).await?.guest;
                let version = guest.as_ref().map(|g| g.version.as_str());
                raftwasm_tests::ensure!(version == Some("0.2.0"), "node {i} runs {version:?}");
            }
            Ok(())
        })
        .await?;
    assert_ne!(before, cluster.typed_status(leader).await?.guest);

    let (code, out, err) = outcome(&raftwasm(&["guest", "show", &all], &[], b"")?);
    assert_eq!(code, Some(0), "{err}");
    let shown = String::from_utf8_lossy(&out);
    assert!(shown.contains("0.2.0"), "{shown}");

    // Not a module: refused, and the active guest stays.
    let junk = cluster.root().join("junk.wasm");
    std::fs::write(&junk, b"not wasm")?;
    let junk = junk.to_string_lossy().into_owned();
    let (code, _, err) = outcome(&raftwasm(&["guest", "deploy", &junk, &all], &[], b"")?);
    assert_ne!(code, Some(0), "a junk module was accepted: {err}");
    let guest = cluster.typed_status(leader).await?.guest;
    assert_eq!(guest.map(|g| g.version), Some("0.2.0".to_owned()));
    Ok(())
}
