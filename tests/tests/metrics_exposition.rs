//! `/metrics` is a Prometheus text exposition that a Prometheus text parser
//! reads whole, whatever the active guest is called: a name with quotes and
//! backslashes comes back unchanged from its label, a name with a newline
//! is refused at upload, and every metric the node has always served is
//! still there.

use prometheus_parse::{Scrape, Value};
use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use raftwasm_tests::{ODD_NAME, ODD_NAME_GUEST, odd_name_guest_with_newline};

/// Every metric name the node serves (histograms by their base name).
const METRICS: [&str; 19] = [
    "raftwasm_writes_total",
    "raftwasm_write_errors_total",
    "raftwasm_reads_total",
    "raftwasm_leader_changes_total",
    "raftwasm_early_appends_total",
    "raftwasm_batch_ops",
    "raftwasm_applied_entries_total",
    "raftwasm_applied_ops_total",
    "raftwasm_apply_nanoseconds_total",
    "raftwasm_apply_duration_seconds",
    "raftwasm_disk_flush_duration_seconds",
    "raftwasm_log_sync_duration_seconds",
    "raftwasm_guest_active_since_index",
    "raftwasm_is_leader",
    "raftwasm_term",
    "raftwasm_last_log_index",
    "raftwasm_applied_index",
    "raftwasm_log_entries",
    "raftwasm_guest_info",
];

/// A label value as the text format writes it, unescaped: `\\`, `\"` and
/// `\n` are its only escapes (the parser hands values back as written).
fn unescape(value: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some('"') => out.push('"'),
                Some('n') => out.push('\n'),
                other => raftwasm_tests::bail!("bad escape \\{other:?} in {value:?}"),
            },
            '"' => raftwasm_tests::bail!("an unescaped quote in {value:?}"),
            c => out.push(c),
        }
    }
    Ok(out)
}

#[tokio::test]
async fn metrics_parse_whole_with_a_hostile_guest_name() -> TestResult {
    let cluster = TestCluster::start(1, &[]).await?;
    cluster.wait_for_guest(0).await?;

    let refused = cluster
        .post(0, "/guest?force=true", odd_name_guest_with_newline())
        .await?;
    assert_eq!(
        refused.status().as_u16(),
        400,
        "a newline in a guest's name"
    );

    let response = cluster
        .post(0, "/guest?force=true", ODD_NAME_GUEST.to_vec())
        .await?;
    let status = response.status().as_u16();
    let answer = response.text().await?;
    assert_eq!(status, 200, "deploy answered {answer}");
    let record: serde_json::Value = serde_json::from_str(&answer)?;
    let hash = record["hash"].as_str().unwrap_or_default().to_owned();
    assert_eq!(hash.len(), 64, "a hash in {record}");

    let (code, text) = cluster.get(0, "/metrics").await?;
    assert_eq!(code, 200, "{text}");
    let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))?;

    // Every sample line became a sample (a histogram's buckets become one).
    let histograms = [
        "raftwasm_batch_ops",
        "raftwasm_apply_duration_seconds",
        "raftwasm_disk_flush_duration_seconds",
        "raftwasm_log_sync_duration_seconds",
    ];
    let lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter(|l| {
            !histograms
                .iter()
                .any(|h| l.starts_with(&format!("{h}_bucket")))
        })
        .count();
    assert_eq!(
        scrape.samples.len(),
        lines + histograms.len(),
        "samples parsed from:\n{text}"
    );
    for name in METRICS {
        assert!(
            scrape.docs.contains_key(name),
            "{name} has no HELP in:\n{text}"
        );
    }
    let sample = |name: &str| scrape.samples.iter().find(|s| s.metric == name);
    assert!(
        matches!(sample("raftwasm_applied_ops_total").map(|s| &s.value), Some(Value::Counter(n)) if *n >= 2.0),
        "both deploys' operations are counted as applied:\n{text}"
    );
    assert!(
        matches!(
            sample("raftwasm_apply_duration_seconds").map(|s| &s.value),
            Some(Value::Histogram(_))
        ),
        "apply latency is a histogram:\n{text}"
    );

    let info: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "raftwasm_guest_info")
        .collect();
    assert_eq!(info.len(), 1, "one raftwasm_guest_info in:\n{text}");
    assert!(matches!(info[0].value, Value::Gauge(v) if v == 1.0));
    let label = |name: &str| info[0].labels.get(name).map(unescape).transpose();
    assert_eq!(label("name")?.as_deref(), Some(ODD_NAME), "in:\n{text}");
    assert_eq!(label("version")?.as_deref(), Some("0.1.0"));
    assert_eq!(label("hash")?.as_deref(), Some(hash.as_str()));
    Ok(())
}
