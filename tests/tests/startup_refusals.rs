//! A node refuses to start with a configuration that would let anyone in:
//! an empty token, or a non-loopback address without a token unless the
//! operator passes `--insecure` (which is logged loudly); and TLS flags that
//! are incomplete or name unusable files.

use raftwasm_tests::certs::TestCa;
use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;

/// Starts node 0 of `cluster` with `args` and `env`, and checks that it
/// exits with an error whose message contains `expected`.
async fn refuses_to_start(
    cluster: &mut TestCluster,
    args: &[&str],
    env: &[(&str, &str)],
    expected: &str,
) -> anyhow::Result<()> {
    let before = cluster.nodes[0].log_text().len();
    cluster.spawn_with_env(0, args, env)?;
    let status = cluster.wait_for_exit(0).await?;
    let log = cluster.nodes[0].log_text();
    let log = &log[before..];
    assert!(!status.success(), "{args:?} {env:?} started: {log}");
    assert!(log.contains(expected), "{args:?} {env:?} logged {log:?}");
    Ok(())
}

/// `http` with its host replaced by 0.0.0.0 (every interface).
fn everywhere(addr: &str) -> String {
    let port = addr.rsplit(':').next().expect("a port");
    format!("0.0.0.0:{port}")
}

#[tokio::test]
async fn an_empty_token_is_refused_at_startup() -> TestResult {
    let mut cluster = TestCluster::new();
    cluster.add_node(&[]);
    let expected = "the cluster token is empty";
    refuses_to_start(&mut cluster, &["--bootstrap", "--token="], &[], expected).await?;
    refuses_to_start(
        &mut cluster,
        &["--bootstrap"],
        &[("RAFTWASM_TOKEN", "")],
        expected,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_non_loopback_address_needs_a_token_or_insecure() -> TestResult {
    let mut cluster = TestCluster::new();
    cluster.add_node(&[]);
    let loopback_http = cluster.nodes[0].http.clone();
    cluster.nodes[0].http = everywhere(&loopback_http);
    refuses_to_start(
        &mut cluster,
        &["--bootstrap"],
        &[],
        "is not a loopback address and no cluster token is set",
    )
    .await?;
    cluster.nodes[0].http = loopback_http;
    let loopback_raft = cluster.nodes[0].raft.clone();
    cluster.nodes[0].raft = everywhere(&loopback_raft);
    refuses_to_start(&mut cluster, &["--bootstrap"], &[], "--insecure").await?;

    // Allowed when the operator says so, with a warning in the log.
    cluster.spawn(0, &["--bootstrap", "--insecure"])?;
    cluster.wait_for_guest(0).await?;
    let log = cluster.nodes[0].log_text();
    assert!(
        log.contains("INSECURE: --raft=0.0.0.0:"),
        "no warning in {log}"
    );
    cluster.kill(0);

    // And with a token, without a warning.
    let before = cluster.nodes[0].log_text().len();
    cluster.spawn_with_env(0, &[], &[("RAFTWASM_TOKEN", "s3cret")])?;
    cluster.wait_for_guest(0).await?;
    assert!(!cluster.nodes[0].log_text()[before..].contains("INSECURE"));
    Ok(())
}

#[tokio::test]
async fn incomplete_or_unusable_tls_flags_are_refused_at_startup() -> TestResult {
    let mut cluster = TestCluster::new();
    cluster.add_node(&[]);
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new(dir.path(), "ca")?;
    let node = ca.node_cert(dir.path(), "node")?;
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all\n")?;
    let missing = dir.path().join("missing.pem");
    let flag = |name: &str, path: &std::path::Path| format!("--tls-{name}={}", path.display());
    let (cert, key, ca) = (
        flag("cert", &node.cert),
        flag("key", &node.key),
        flag("ca", &ca.file),
    );

    let cases = [
        (
            vec![cert.clone()],
            "--tls-cert and --tls-key go together".to_owned(),
        ),
        (vec![cert.clone(), key.clone()], "need --tls-ca".to_owned()),
        (
            vec![flag("cert", &missing), key.clone(), ca.clone()],
            format!("cannot read --tls-cert {}", missing.display()),
        ),
        (
            vec![cert.clone(), flag("key", &garbage), ca.clone()],
            format!(
                "--tls-key {} holds no usable PEM private key",
                garbage.display()
            ),
        ),
        (
            vec![cert.clone(), key.clone(), flag("ca", &garbage)],
            format!(
                "--tls-ca {} holds no usable PEM certificate",
                garbage.display()
            ),
        ),
    ];
    for (flags, expected) in cases {
        let mut args = vec!["--bootstrap"];
        args.extend(flags.iter().map(String::as_str));
        refuses_to_start(&mut cluster, &args, &[], &expected).await?;
    }
    assert!(!cluster.nodes[0].log_text().contains("panicked"));
    Ok(())
}
