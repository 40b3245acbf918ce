//! A black-box fuzz test of the HTTP API against a real 3-node cluster:
//! seeded random requests (every route and unknown ones, any method, broken
//! and huge parameters, junk headers, random bodies) sent to random nodes,
//! interleaved with ordinary writes. Nothing may answer 500, no node may
//! exit or panic, every acknowledged write must read back on every node, and
//! the replicas must end with equal state.
//!
//! `RAFTWASM_FUZZ_SEED` replays a run (the seed is printed when it fails);
//! `RAFTWASM_FUZZ_REQUESTS` sends that many requests, without the default
//! run's time bound.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use guest_kv::command::Command;
use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Requests sent by default; the run also stops after [`TIME_BUDGET`].
const REQUESTS: usize = 4000;
/// The longest the fuzzing phase may take, so the test stays CI-sized.
const TIME_BUDGET: Duration = Duration::from_secs(20);
/// How long one request may take before the node counts as hung. The
/// longest legitimate wait is a write's or a read's 5 s timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// One byte over the API's body limit (a 1 MiB value plus 64 KiB).
const OVERSIZED_BODY: usize = (1 << 20) + 64 * 1024 + 1;

/// The 5xx answers the API gives on purpose (see `ApiError`): 503 when the
/// node cannot serve now (no leader yet, cannot reach the leader, cannot
/// load a module now) and 504 when a write's outcome is unknown or a wait
/// timed out. 500 (a fault on the node) and 502 are bugs.
const DELIBERATE_5XX: [u16; 2] = [503, 504];

/// Every route of the API, with a method it answers.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/set"),
    ("POST", "/set"),
    ("GET", "/get"),
    ("POST", "/get"),
    ("GET", "/delete"),
    ("GET", "/cas"),
    ("POST", "/cas"),
    ("POST", "/apply"),
    ("POST", "/query"),
    ("POST", "/join"),
    ("POST", "/remove"),
    ("GET", "/status"),
    ("GET", "/cluster"),
    ("GET", "/"),
    ("GET", "/metrics"),
    ("GET", "/read_index"),
    ("GET", "/guest"),
    ("POST", "/guest"),
];

/// Paths that are not routes, or are routes in disguise.
const UNKNOWN_PATHS: &[&str] = &[
    "/dashboard/",
    "/dashboard/app.jsx",
    "/nope",
    "/set/",
    "/SET",
    "//get",
    "/get/extra",
    "/%2e%2e/status",
    "/guest/x",
    "/st%61tus",
    "*",
];

/// Methods for a route, whether it answers them or not.
const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "PURGE", "FOO",
];

const PARAM_NAMES: &[&str] = &[
    "key",
    "key",
    "value",
    "expected",
    "ttl",
    "ttl_ms",
    "consistency",
    "id",
    "force",
    "state_hash",
    "unknown",
    "",
    "k%65y",
    "key%",
];

/// A small xorshift64* generator: reproducible from its seed, no
/// dependency.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `1 / n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Random bytes of a [`Rng::len`] length.
    fn some_bytes(&mut self) -> Vec<u8> {
        let len = self.len();
        self.bytes(len)
    }

    /// A length that is usually small and sometimes not.
    fn len(&mut self) -> usize {
        match self.below(10) {
            0 => 0,
            1..=6 => self.below(16),
            7 | 8 => self.below(512),
            _ => self.below(4096),
        }
    }
}

/// Percent-encodes every byte that is not alphanumeric.
fn escape(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A key for a random write: anything but the `fz-` keys whose values the
/// test checks.
fn random_key(rng: &mut Rng) -> Vec<u8> {
    let mut key = match rng.below(4) {
        0 => b"k".to_vec(),
        1 => {
            let len = 1 + rng.below(8);
            rng.bytes(len)
        }
        2 => vec![b'a' + rng.below(26) as u8; 1 + rng.below(3)],
        _ => rng.some_bytes(),
    };
    if key.starts_with(b"fz-") {
        key.insert(0, b'x');
    }
    key
}

/// A parameter value as it appears in the query string.
fn random_value(rng: &mut Rng, members: &BTreeSet<u64>) -> String {
    match rng.below(14) {
        0 => String::new(),
        1 => escape(&random_key(rng)),
        2 => escape(&rng.some_bytes()),
        3 => rng
            .pick(&["%", "%G1", "%2", "%+1", "a%zz", "%%", "%%41", "%e9%"])
            .to_string(),
        4 => rng
            .pick(&["linearizable", "lease", "stale", "strong", "STALE", ""])
            .to_string(),
        5 => rng
            .pick(&[
                "0",
                "1",
                "-1",
                "18446744073709551615",
                "18446744073709551616",
                "1e3",
                " 1",
            ])
            .to_string(),
        6 => {
            // Never a member's id: /remove must not shrink the cluster.
            let id = rng.next();
            let id = if members.contains(&id) { 0 } else { id };
            id.to_string()
        }
        7 => rng.pick(&["true", "false", "1", "yes"]).to_string(),
        8 => "k".repeat(1025),
        9 => "v".repeat(rng.below(64 * 1024)),
        10 => "+".repeat(rng.below(8)),
        11 => (0..rng.len())
            .map(|_| char::from(b'!' + rng.below(94) as u8))
            .filter(|c| !"#%".contains(*c))
            .collect(),
        _ => escape(format!("{}", rng.next() % 1000).as_bytes()),
    }
}

/// A query string (with its `?`), or nothing.
fn random_query(rng: &mut Rng, members: &BTreeSet<u64>) -> String {
    if rng.one_in(6) {
        return String::new();
    }
    let mut params = Vec::new();
    for _ in 0..rng.below(6) {
        let name = *rng.pick(PARAM_NAMES);
        let value = random_value(rng, members);
        params.push(match rng.below(8) {
            0 => name.to_owned(),
            1 => String::new(),
            _ => format!("{name}={value}"),
        });
    }
    format!("?{}", params.join(if rng.one_in(10) { "&&" } else { "&" }))
}

/// A guest-kv command with random fields, encoded as `/apply` carries it.
fn random_command(rng: &mut Rng) -> Vec<u8> {
    let key = random_key(rng);
    let value = rng.some_bytes();
    let len = rng.below(4);
    let expected = rng.bytes(len);
    let ttl_ms = match rng.below(3) {
        0 => 0,
        1 => rng.next(),
        _ => rng.next() % 2000,
    };
    let command = match rng.below(4) {
        0 => Command::Set {
            key: &key,
            value: &value,
            ttl_ms,
        },
        1 => Command::Get { key: &key },
        2 => Command::Delete { key: &key },
        _ => Command::CompareAndSet {
            key: &key,
            expected: (!rng.one_in(2)).then_some(&expected[..]),
            value: &value,
            ttl_ms,
        },
    };
    let mut bytes = command.encode();
    if rng.one_in(3) && !bytes.is_empty() {
        // A near miss: one byte changed, or the message cut short.
        let at = rng.below(bytes.len());
        if rng.one_in(2) {
            bytes[at] = rng.next() as u8;
        } else {
            bytes.truncate(at);
        }
    }
    bytes
}

/// A `/join` body: junk, or JSON that names a member's addresses (so a
/// valid one is refused at once instead of adding a learner that never
/// answers).
fn random_join(rng: &mut Rng, cluster: &TestCluster) -> Vec<u8> {
    let node = rng.pick(&cluster.nodes);
    let id = rng.next();
    match rng.below(6) {
        0 => format!(
            r#"{{"id":{id},"http":"{}","raft":"{}"}}"#,
            node.http, node.raft
        ),
        1 => format!(
            r#"{{"id":{id},"http":"{}","raft":"127.0.0.1:1"}}"#,
            node.http
        ),
        2 => format!(r#"{{"id":"{id}","http":1}}"#),
        3 => r#"{"id":1,"#.to_owned(),
        4 => "null".into(),
        _ => return rng.some_bytes(),
    }
    .into_bytes()
}

/// A request body for `path`.
fn random_body(rng: &mut Rng, path: &str, cluster: &TestCluster) -> Vec<u8> {
    if rng.one_in(3) {
        return Vec::new();
    }
    if rng.one_in(150) {
        return vec![b'x'; OVERSIZED_BODY];
    }
    match (path, rng.below(3)) {
        ("/apply" | "/query", 0 | 1) => random_command(rng),
        ("/join", 0 | 1) => random_join(rng, cluster),
        ("/guest", 0) => {
            let mut module = b"\0asm\x01\0\0\0".to_vec();
            module.extend(rng.some_bytes());
            module
        }
        _ => rng.some_bytes(),
    }
}

/// Junk and real values for the headers a browser or a client sends.
fn random_headers(rng: &mut Rng, own: &str) -> Vec<(&'static str, String)> {
    let mut headers = Vec::new();
    if rng.one_in(4) {
        let own = format!("http://{own}");
        let origins = [own.as_str(), "http://evil.example", "null", "", "\u{1}x"];
        let origin = rng.pick(&origins);
        headers.push(("Origin", (*origin).to_owned()));
    }
    if rng.one_in(4) {
        let accept = rng.pick(&["application/json", "*/*", "text/html;q=0.1", "junk/"]);
        headers.push(("Accept", (*accept).to_owned()));
    }
    if rng.one_in(5) {
        let auth = rng.pick(&[
            "Bearer ",
            "Bearer junk",
            "Basic Zm9vOmJhcg==",
            "Bearer",
            "x",
        ]);
        headers.push(("Authorization", (*auth).to_owned()));
    }
    if rng.one_in(6) {
        let forward = rng.pick(&["true", "TRUE", "false", ""]);
        headers.push(("X-Raft-Forward", (*forward).to_owned()));
    }
    if rng.one_in(4) {
        let kind = rng.pick(&[
            "text/plain",
            "application/json",
            "application/wasm",
            "a/b; c=",
        ]);
        headers.push(("Content-Type", (*kind).to_owned()));
    }
    headers
}

/// Sends one request on a connection of its own, written byte for byte (no
/// client library normalises the target), and returns the status code.
async fn send_raw(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> anyhow::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let (mut reader, mut writer) = stream.split();
    let write = async {
        // The node may answer and close before it reads a refused body; a
        // failed write then shows as a missing answer below.
        if writer.write_all(head.as_bytes()).await.is_ok() {
            let _ = writer.write_all(body).await;
        }
    };
    let mut answer = Vec::new();
    let read = reader.read_to_end(&mut answer);
    let ((), read) = tokio::join!(write, read);
    // The body may be any bytes; only the status line must be text.
    let status = answer
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| std::str::from_utf8(code).ok())
        .and_then(|code| code.parse().ok());
    match (status, read) {
        (Some(status), _) => Ok(status),
        (None, Err(e)) => raftwasm_tests::bail!("no answer: {e}"),
        (None, Ok(_)) => {
            raftwasm_tests::bail!("no status line in {:?}", String::from_utf8_lossy(&answer))
        }
    }
}

/// The ids of the cluster's members, from node 0's `/status`.
async fn member_ids(cluster: &TestCluster) -> anyhow::Result<BTreeSet<u64>> {
    let status = cluster.status(0).await?;
    let members = status["members"].as_array().cloned().unwrap_or_default();
    Ok(members.iter().filter_map(|m| m["id"].as_u64()).collect())
}

fn seed() -> u64 {
    std::env::var("RAFTWASM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

#[tokio::test]
async fn random_requests_never_break_a_cluster_or_lose_a_write() -> TestResult {
    let seed = seed();
    // A count asked for explicitly is sent whole; the default run is also
    // bounded in time.
    let (requests, budget) = match std::env::var("RAFTWASM_FUZZ_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(requests) => (requests, Duration::MAX),
        None => (REQUESTS, TIME_BUDGET),
    };
    // Printed with the test's output when it fails.
    eprintln!("http fuzz seed: {seed} (replay with RAFTWASM_FUZZ_SEED={seed})");
    let mut rng = Rng::new(seed);
    let mut cluster = TestCluster::start(3, &[]).await?;
    let members = member_ids(&cluster).await?;
    raftwasm_tests::ensure!(members.len() == 3, "members {members:?}");

    let started = Instant::now();
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut sent = 0;
    while sent < requests && started.elapsed() < budget {
        sent += 1;
        let i = rng.below(cluster.nodes.len());
        if rng.one_in(4) {
            let key = format!("fz-{sent}");
            let value: String = (0..1 + rng.below(24))
                .map(|_| char::from(b' ' + rng.below(95) as u8))
                .collect();
            let path = format!("/set?key={key}&value={}", escape(value.as_bytes()));
            let (code, body) = cluster.get(i, &path).await?;
            raftwasm_tests::ensure!(
                code < 500 || DELIBERATE_5XX.contains(&code),
                "seed {seed}: {path} on node {i} answered {code} {body:?}"
            );
            if code == 200 && body == "ok" {
                acknowledged.push((key, value));
            }
            continue;
        }
        let (mut method, mut path) = *rng.pick(ROUTES);
        if rng.one_in(6) {
            path = *rng.pick(UNKNOWN_PATHS);
        }
        if rng.one_in(5) {
            method = *rng.pick(METHODS);
        }
        let target = format!("{path}{}", random_query(&mut rng, &members));
        let headers = random_headers(&mut rng, &cluster.nodes[i].http);
        let body = random_body(&mut rng, path, &cluster);
        let shown = format!(
            "seed {seed}, request {sent}: {method} {} with {headers:?} and a {}-byte body to node {i}",
            &target[..target.len().min(200)],
            body.len()
        );
        let answer = tokio::time::timeout(
            REQUEST_TIMEOUT,
            send_raw(&cluster.nodes[i].http, method, &target, &headers, &body),
        )
        .await
        .map_err(|_| anyhow::anyhow!("{shown}: no answer within {REQUEST_TIMEOUT:?}"))?;
        let code = match answer {
            Ok(code) => code,
            // A node may refuse an oversized body by closing the
            // connection before the client has finished sending it.
            Err(_) if body.len() >= OVERSIZED_BODY => continue,
            Err(e) => raftwasm_tests::bail!("{shown}: {e:#}"),
        };
        *statuses.entry(code).or_default() += 1;
        raftwasm_tests::ensure!(
            code < 500 || DELIBERATE_5XX.contains(&code),
            "{shown}: answered {code}"
        );
        if sent % 100 == 0 {
            let exited = cluster.exited()?;
            raftwasm_tests::ensure!(exited.is_empty(), "seed {seed}: nodes exited: {exited:?}");
        }
    }
    eprintln!(
        "sent {sent} requests in {:?}, {} acknowledged writes; statuses {statuses:?}",
        started.elapsed(),
        acknowledged.len()
    );
    // Guard against a run that tested nothing.
    raftwasm_tests::ensure!(sent >= 200, "seed {seed}: only {sent} requests were sent");
    raftwasm_tests::ensure!(
        !acknowledged.is_empty(),
        "seed {seed}: no write was acknowledged"
    );

    let exited = cluster.exited()?;
    raftwasm_tests::ensure!(exited.is_empty(), "seed {seed}: nodes exited: {exited:?}");
    cluster.wait_for_same_state().await?;
    cluster
        .wait_for("every acknowledged write on every node", || async {
            for (key, value) in &acknowledged {
                for i in 0..cluster.nodes.len() {
                    let path = format!("/get?key={key}&consistency=stale");
                    let (code, body) = cluster.get(i, &path).await?;
                    raftwasm_tests::ensure!(
                        code == 200 && body == *value,
                        "node {i} answers {code} {body:?} for {key}, acknowledged as {value:?}"
                    );
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("seed {seed}: {e:#}"))?;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let log = node.log_text();
        let panic = log.lines().find(|line| line.contains("panicked"));
        raftwasm_tests::ensure!(panic.is_none(), "seed {seed}: node {i} logged {panic:?}");
    }
    Ok(())
}
