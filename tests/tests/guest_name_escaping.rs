//! A guest's name reaches operators through `/metrics` (Prometheus text) and
//! JSON (`/status`, `GET /guest`, the deploy answer). A name with quotes and
//! backslashes must come out escaped and read back unchanged; a name with a
//! control character is refused at upload.

use std::collections::BTreeMap;

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use raftwasm_tests::{ODD_NAME, ODD_NAME_GUEST, odd_name_guest_with_newline};

/// One sample line of the text exposition format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
}

/// Parses a whole `/metrics` answer strictly: every line is `# HELP name
/// text`, `# TYPE name type`, or `name{label="value",...} number`, and every
/// label value unescapes cleanly (`\\`, `\"` and `\n` are the only escapes).
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let body = text.strip_suffix('\n').ok_or("no final newline")?;
    let mut samples = Vec::new();
    for (n, line) in body.split('\n').enumerate() {
        let fail = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name.ok_or_else(|| fail("comment without a metric name"))?;
            if !is_metric_name(name) {
                return Err(fail("bad metric name in a comment"));
            }
            match (kind, rest) {
                (Some("HELP"), Some(_)) => {}
                (Some("TYPE"), Some("counter" | "gauge" | "histogram" | "summary" | "untyped")) => {
                }
                _ => return Err(fail("not a HELP or TYPE comment")),
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| fail("no value"))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(fail("bad metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(inner) = rest.strip_prefix('{') {
            rest = inner;
            loop {
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let eq = rest.find("=\"").ok_or_else(|| fail("label without =\""))?;
                let label = &rest[..eq];
                if !is_label_name(label) {
                    return Err(fail("bad label name"));
                }
                let (value, after) =
                    unescape_label_value(&rest[eq + 2..]).map_err(|why| fail(&why))?;
                if labels.insert(label.to_owned(), value).is_some() {
                    return Err(fail("repeated label"));
                }
                rest = after.strip_prefix(',').unwrap_or(after);
                if !after.starts_with([',', '}']) {
                    return Err(fail("label not followed by , or }"));
                }
            }
        }
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| fail("no space before the value"))?;
        if !matches!(value, "+Inf" | "-Inf" | "NaN") && value.parse::<f64>().is_err() {
            return Err(fail("the value is not a number"));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
        });
    }
    Ok(samples)
}

/// The unescaped label value at the start of `text` (just after its opening
/// quote), and the text after its closing quote.
fn unescape_label_value(text: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                other => return Err(format!("bad escape \\{:?}", other.map(|(_, c)| c))),
            },
            c => value.push(c),
        }
    }
    Err("unterminated label value".into())
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[tokio::test]
async fn guest_name_with_quotes_and_backslashes_reads_back_everywhere() -> TestResult {
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.leader().await?;
    let response = cluster
        .post(leader, "/guest?force=true", ODD_NAME_GUEST.to_vec())
        .await?;
    let status = response.status().as_u16();
    let answer = response.text().await?;
    assert_eq!(status, 200, "deploy answered {answer}");
    let record: serde_json::Value = serde_json::from_str(&answer)?;
    assert_eq!(record["name"], ODD_NAME, "the deploy answer");
    let hash = record["hash"].as_str().unwrap_or_default().to_owned();
    assert_eq!(hash.len(), 64, "a hash in {record}");

    for i in 0..cluster.nodes.len() {
        cluster
            .wait_for(&format!("node {i} running the guest"), || async {
                let status = cluster.status(i).await?;
                raftwasm_tests::ensure!(status["guest"]["hash"] == hash, "{}", status["guest"]);
                Ok(())
            })
            .await?;
        let status = cluster.status(i).await?;
        assert_eq!(status["guest"]["name"], ODD_NAME, "/status of node {i}");

        let (code, body) = cluster.get(i, "/guest").await?;
        assert_eq!(code, 200, "{body}");
        let guest: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(guest["active"]["name"], ODD_NAME, "GET /guest of node {i}");
        let last = guest["history"].as_array().and_then(|h| h.last()).cloned();
        assert_eq!(
            last.as_ref().map(|r| &r["name"]),
            Some(&serde_json::json!(ODD_NAME)),
            "the history of node {i}: {body}"
        );

        let (code, text) = cluster.get(i, "/metrics").await?;
        assert_eq!(code, 200);
        let samples = parse_exposition(&text)
            .unwrap_or_else(|e| panic!("node {i}'s /metrics does not parse: {e}"));
        let info: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == "raftwasm_guest_info")
            .collect();
        assert_eq!(info.len(), 1, "one raftwasm_guest_info on node {i}");
        let labels = &info[0].labels;
        assert_eq!(labels["name"], ODD_NAME);
        assert_eq!(labels["version"], "0.1.0");
        assert_eq!(labels["hash"], hash);
    }
    Ok(())
}

#[tokio::test]
async fn guest_name_with_a_newline_is_refused_at_upload() -> TestResult {
    let cluster = TestCluster::start(1, &[]).await?;
    let before = cluster.status(0).await?["guest"].clone();
    let response = cluster
        .post(0, "/guest?force=true", odd_name_guest_with_newline())
        .await?;
    let status = response.status().as_u16();
    let message = response.text().await?;
    assert_eq!(status, 400, "answered {message}");
    assert!(
        message.contains("control character"),
        "the refusal says why: {message}"
    );
    assert_eq!(cluster.status(0).await?["guest"], before);
    let (_, text) = cluster.get(0, "/metrics").await?;
    parse_exposition(&text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}"));
    Ok(())
}
