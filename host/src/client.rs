//! `Client`: a typed client of a cluster's HTTP API. It takes several
//! endpoints, finds the leader itself (following the leader a not-leader
//! answer names, trying the next endpoint when one is down) and turns every
//! answer into a [`proto`](crate::proto) type or a [`ClientError`].

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};

pub use crate::proto::Consistency;
use crate::proto::{GuestHistory, JoinRequest, LEADER_HEADER, NodeId, Role, Status, SwapRecord};
use crate::watch::sse::ChangeEvent;

/// How often a request asks again while the cluster has no leader.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// How long a watch stream may last: as long as it keeps moving.
const WATCH_STREAM_TIMEOUT: Duration = Duration::from_secs(365 * 86_400);

/// How long a watch stream may stay silent (a node sends a keep-alive
/// every 15 s) before the client takes it for dead and moves on.
const WATCH_SILENCE: Duration = Duration::from_secs(45);

/// Why a request failed. [`ClientError::exit_code`] maps each kind to the
/// CLI's documented exit codes.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The key does not exist (`get`, `delete`) or the member is unknown.
    #[error("not found")]
    NotFound,
    /// The cluster refused the request (a 4xx answer): fix it before retrying.
    #[error("{url} refused the request ({status}): {message}")]
    Refused {
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The node's explanation.
        message: String,
    },
    /// A node failed the request (a 5xx answer); a 504 on a write means its
    /// outcome is unknown.
    #[error("{url} failed the request ({status}): {message}")]
    Failed {
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The node's explanation.
        message: String,
    },
    /// No endpoint answered, or none led, before the timeout.
    #[error(
        "no leader answered within {timeout:?} (tried {endpoints}); last: {last}; check that \
         the nodes run and that --cluster names them"
    )]
    Unreachable {
        /// How long the client tried.
        timeout: Duration,
        /// The endpoints it tried.
        endpoints: String,
        /// The last failure seen.
        last: String,
    },
    /// The request was sent but its answer was lost or malformed; a write
    /// may or may not have happened.
    #[error("{url}: {message}")]
    Protocol {
        /// The URL asked.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The client could not be set up (a bad `--tls-ca`, no endpoints).
    #[error("{0}")]
    Setup(String),
}

impl ClientError {
    /// The CLI's exit code: 1 for a missing key, 2 for a refused request, 3 when the cluster could not
    /// serve it (unreachable, no leader, a 5xx, a timeout).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NotFound => 1,
            ClientError::Refused { .. } | ClientError::Setup(_) => 2,
            ClientError::Failed { .. }
            | ClientError::Unreachable { .. }
            | ClientError::Protocol { .. } => 3,
        }
    }
}

/// The outcome of a compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cas {
    /// The new value is stored.
    Swapped,
    /// Nothing changed; the current value (empty when the key is absent).
    Mismatch(Vec<u8>),
}

/// What a request carries.
#[derive(Debug, Clone, Copy)]
enum Payload<'a> {
    /// No body.
    Empty,
    /// Raw bytes: a value or a module.
    Bytes(&'a [u8]),
    /// A JSON document (`/join`).
    Json(&'a [u8]),
}

/// A raw answer: the URL asked, status, body.
struct Answer {
    url: String,
    status: StatusCode,
    body: Vec<u8>,
}

/// A client of one cluster. Cheap to share; remembers the leader it found.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    tls: bool,
    endpoints: Vec<String>,
    token: Option<String>,
    timeout: Duration,
    leader: Mutex<Option<String>>,
}

impl Client {
    /// A client of the cluster at `endpoints` (`host:port`, with or without
    /// a scheme). With `tls_ca` it talks HTTPS and trusts only that CA;
    /// `timeout` bounds each call, leader search and retries included.
    ///
    /// # Errors
    /// [`ClientError::Setup`] when there is no endpoint or the CA is unusable.
    pub fn new(
        endpoints: &[String],
        token: Option<String>,
        tls_ca: Option<&Path>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let tls = tls_ca.is_some();
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| crate::proto::base_url(e, tls))
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::Setup(
                "no cluster endpoint given; pass --cluster host:port[,host:port…] or set RAFTWASM_CLUSTER"
                    .into(),
            ));
        }
        let http = crate::tls::http_client_builder(tls_ca)
            .map_err(|e| ClientError::Setup(format!("--tls-ca: {e}")))?
            .timeout(timeout.max(Duration::from_secs(1)))
            .build()
            .map_err(|e| ClientError::Setup(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            tls,
            endpoints,
            token: token.filter(|t| !t.is_empty()),
            timeout,
            leader: Mutex::new(None),
        })
    }

    /// A client that sends through `http`, an already configured HTTP
    /// client (a node's own, for its calls to other members); `tls` picks
    /// the scheme of `endpoints` given without one.
    pub fn with_http(
        http: reqwest::Client,
        tls: bool,
        endpoints: &[String],
        token: Option<String>,
        timeout: Duration,
    ) -> Self {
        Self {
            http,
            tls,
            endpoints: endpoints
                .iter()
                .map(|e| crate::proto::base_url(e.trim(), tls))
                .collect(),
            token: token.filter(|t| !t.is_empty()),
            timeout,
            leader: Mutex::new(None),
        }
    }

    /// The base URL of `addr` with this cluster's scheme.
    pub fn base_url(&self, addr: &str) -> String {
        crate::proto::base_url(addr, self.tls)
    }

    /// The endpoints to try, the remembered leader first.
    fn candidates(&self) -> Vec<String> {
        let leader = self.leader.lock().map(|l| l.clone()).unwrap_or_default();
        leader
            .into_iter()
            .chain(self.endpoints.iter().cloned())
            .collect()
    }

    /// No leader answered within the timeout; `last` is the last failure.
    fn unreachable(&self, last: String) -> ClientError {
        ClientError::Unreachable {
            timeout: self.timeout,
            endpoints: self.endpoints.join(", "),
            last,
        }
    }

    fn remember(&self, leader: Option<String>) {
        if let Ok(mut known) = self.leader.lock() {
            *known = leader;
        }
    }

    /// Sends one request to `url` and returns the answer before its body is
    /// read, with the leader it names (if any). `timeout` replaces the
    /// client's for this request.
    async fn send(
        &self,
        method: &Method,
        url: &str,
        payload: Payload<'_>,
        timeout: Option<Duration>,
    ) -> Result<(reqwest::Response, Option<String>), reqwest::Error> {
        let mut request = self
            .http
            .request(method.clone(), url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        match payload {
            Payload::Empty => {}
            Payload::Bytes(body) => request = request.body(body.to_vec()),
            Payload::Json(body) => {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_vec());
            }
        }
        let response = request.send().await?;
        let leader = response
            .headers()
            .get(LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|v| self.base_url(v));
        Ok((response, leader))
    }

    /// [`Self::send`], with the whole body read.
    async fn send_once(
        &self,
        method: &Method,
        url: &str,
        payload: Payload<'_>,
    ) -> Result<(Answer, Option<String>), reqwest::Error> {
        let (response, leader) = self.send(method, url, payload, None).await?;
        let status = response.status();
        let body = response.bytes().await?.to_vec();
        Ok((
            Answer {
                url: url.to_owned(),
                status,
                body,
            },
            leader,
        ))
    }

    /// Sends `path_and_query` to the leader: tries the endpoints in turn,
    /// follows a not-leader answer to the leader it names, and asks again
    /// while there is no leader (503) until the timeout. A request that
    /// reached a node and failed otherwise is not repeated, so a write is
    /// never sent twice.
    async fn leader_call(
        &self,
        method: Method,
        path_and_query: &str,
        payload: Payload<'_>,
    ) -> Result<Answer, ClientError> {
        let (url, response) = self
            .leader_response(method, path_and_query, payload, None)
            .await?;
        let status = response.status();
        match response.bytes().await {
            Ok(body) => Ok(Answer {
                url,
                status,
                body: body.to_vec(),
            }),
            Err(error) => Err(ClientError::Protocol {
                url,
                message: format!(
                    "the answer broke off ({error}); a write may have happened, check before \
                     retrying"
                ),
            }),
        }
    }

    /// Streams the leader's answer to `GET path_and_query` into `out`, with
    /// `timeout` for the whole transfer. Returns the URL it came from.
    ///
    /// # Errors
    /// [`ClientError`] when no leader answers, the leader refuses, or the
    /// transfer breaks off; `out` then holds part of the answer.
    pub async fn download(
        &self,
        path_and_query: &str,
        timeout: Duration,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<String, ClientError> {
        use tokio::io::AsyncWriteExt as _;
        let (url, mut response) = self
            .leader_response(Method::GET, path_and_query, Payload::Empty, Some(timeout))
            .await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(refusal(url, status, &body));
        }
        let broke_off = |message: String| ClientError::Protocol {
            url: url.clone(),
            message,
        };
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| broke_off(format!("the answer broke off: {e}")))?
        {
            out.write_all(&chunk)
                .await
                .map_err(|e| broke_off(format!("cannot write what arrived: {e}")))?;
        }
        Ok(url)
    }

    /// Follows the changes under `prefix` (`GET /watch`) from index `from`
    /// (or from now), calling `on_change` for each, until `on_change` fails.
    /// Any member serves a watch; when a stream breaks off (its node died,
    /// or dropped a slow watcher) it resumes on the next member from the
    /// last change delivered, with no gap and no duplicate.
    ///
    /// # Errors
    /// [`ClientError::Unreachable`] when no member serves a watch within the
    /// timeout, a refusal (such as 410 for a `from` older than every
    /// member's window), or what `on_change` returned.
    pub async fn watch(
        &self,
        prefix: &[u8],
        from: Option<u64>,
        mut on_change: impl FnMut(&ChangeEvent<'_>) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        // The entry to resume from, and how many of its changes were
        // delivered already (each entry's changes come in the same order
        // from every member).
        let mut position = from.map(|index| (index, 0_usize));
        let mut deadline = Instant::now() + self.timeout;
        let mut last = String::from("nothing tried");
        let mut gone = None;
        loop {
            for base in &self.endpoints {
                let mut url = format!("{base}/watch?prefix={}", encode(prefix));
                if let Some((index, _)) = position {
                    url.push_str(&format!("&from={index}"));
                }
                let sent = self.send(
                    &Method::GET,
                    &url,
                    Payload::Empty,
                    Some(WATCH_STREAM_TIMEOUT),
                );
                let mut response = match tokio::time::timeout(self.timeout, sent).await {
                    Ok(Ok((response, _))) => response,
                    Ok(Err(error)) => {
                        last = format!("cannot watch {url}: {}", with_causes(&error));
                        continue;
                    }
                    Err(_) => {
                        last = format!("{url} did not answer within {:?}", self.timeout);
                        continue;
                    }
                };
                let status = response.status();
                if !status.is_success() {
                    let body = response.bytes().await.unwrap_or_default();
                    let error = refusal(url.clone(), status, &body);
                    last = error.to_string();
                    match status {
                        StatusCode::GONE => gone = Some(error),
                        s if s.is_server_error() => {}
                        _ => return Err(error),
                    }
                    continue;
                }
                gone = None;
                let mut skip = position;
                let mut parser = crate::watch::sse::Parser::default();
                last = loop {
                    let chunk = match tokio::time::timeout(WATCH_SILENCE, response.chunk()).await {
                        Ok(Ok(Some(chunk))) => chunk,
                        Ok(Ok(None)) => break format!("{url} ended the stream"),
                        Ok(Err(error)) => break format!("{url} broke off: {error}"),
                        Err(_) => break format!("{url} fell silent for {WATCH_SILENCE:?}"),
                    };
                    let mut dropped = None;
                    for event in parser.push(&chunk) {
                        // A watch from now learns where "now" was, so that a
                        // resume elsewhere misses nothing.
                        if position.is_none()
                            && let Some(index) = crate::watch::sse::start_index(&event.comment)
                        {
                            position = Some((index, 0));
                            skip = position;
                        }
                        if event.event == "dropped" {
                            dropped = Some(format!("{url} dropped the watch: {}", event.data));
                            break;
                        }
                        if event.event != "put" && event.event != "delete" {
                            continue;
                        }
                        let change: ChangeEvent<'_> =
                            serde_json::from_str(&event.data).map_err(|e| {
                                ClientError::Protocol {
                                    url: url.clone(),
                                    message: format!("a change event does not parse: {e}"),
                                }
                            })?;
                        if let Some((index, count)) = &mut skip
                            && *index == change.index
                            && *count > 0
                        {
                            *count -= 1;
                            continue;
                        }
                        skip = None;
                        position = match position {
                            Some((index, count)) if index == change.index => {
                                Some((index, count + 1))
                            }
                            _ => Some((change.index, 1)),
                        };
                        on_change(&change)?;
                    }
                    if let Some(reason) = dropped {
                        break reason;
                    }
                };
                deadline = Instant::now() + self.timeout;
            }
            if Instant::now() + RETRY_EVERY >= deadline {
                return Err(gone.unwrap_or_else(|| self.unreachable(last)));
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Sends `path_and_query` to the leader (see [`Self::leader_call`]) and
    /// returns its answer before the body is read.
    async fn leader_response(
        &self,
        method: Method,
        path_and_query: &str,
        payload: Payload<'_>,
        timeout: Option<Duration>,
    ) -> Result<(String, reqwest::Response), ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut last = String::from("nothing tried");
        loop {
            let mut queue = self.candidates();
            let mut hops = 0;
            while let Some(base) = (!queue.is_empty()).then(|| queue.remove(0)) {
                let url = format!("{base}{path_and_query}");
                match self.send(&method, &url, payload, timeout).await {
                    Ok((answer, leader)) if answer.status() == StatusCode::MISDIRECTED_REQUEST => {
                        last = format!("{url} is not the leader");
                        match leader {
                            Some(leader) if hops < 8 && leader != base => {
                                hops += 1;
                                queue.insert(0, leader);
                            }
                            _ => self.remember(None),
                        }
                    }
                    Ok((answer, _)) if answer.status() == StatusCode::SERVICE_UNAVAILABLE => {
                        let body = answer.bytes().await.unwrap_or_default();
                        last = format!("{url} answered 503: {}", text(&body));
                    }
                    Ok((answer, _)) => {
                        self.remember(Some(base));
                        return Ok((url, answer));
                    }
                    Err(error) if error.is_connect() => {
                        last = format!("cannot connect to {url}: {}", with_causes(&error));
                        self.remember(None);
                    }
                    Err(error) => {
                        return Err(ClientError::Protocol {
                            url,
                            message: format!(
                                "the request failed after it was sent ({error}); a write may \
                                 have happened, check before retrying"
                            ),
                        });
                    }
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
            if Instant::now() + RETRY_EVERY >= deadline {
                return Err(self.unreachable(last));
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Sends a request to exactly `base` (no leader search).
    async fn node_call(&self, base: &str, path_and_query: &str) -> Result<Answer, ClientError> {
        let url = format!("{base}{path_and_query}");
        match self.send_once(&Method::GET, &url, Payload::Empty).await {
            Ok((answer, _)) => Ok(answer),
            Err(error) => Err(ClientError::Unreachable {
                timeout: self.timeout,
                endpoints: base.to_owned(),
                last: with_causes(&error),
            }),
        }
    }

    /// The leader's `/status`: asks any endpoint, then the leader it names.
    ///
    /// # Errors
    /// [`ClientError`] when no leader answers.
    pub async fn status(&self) -> Result<Status, ClientError> {
        // Every node answers `/status`; the answer names the leader to ask.
        let deadline = Instant::now() + self.timeout;
        loop {
            let answer = self
                .leader_call(Method::GET, "/status", Payload::Empty)
                .await?;
            let status: Status = json(ok(answer)?)?;
            if status.role == Role::Leader {
                return Ok(status);
            }
            let last = match &status.leader_http {
                Some(leader) => match self.node_status(leader).await {
                    Ok(led) if led.role == Role::Leader => {
                        self.remember(Some(self.base_url(leader)));
                        return Ok(led);
                    }
                    Ok(_) => format!("{leader} no longer leads"),
                    Err(error) => error.to_string(),
                },
                None => format!("node {} knows no leader", status.id),
            };
            self.remember(None);
            if Instant::now() + RETRY_EVERY >= deadline {
                return Err(self.unreachable(last));
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// The `/status` of the node at `addr` (`host:port`), whoever leads.
    ///
    /// # Errors
    /// [`ClientError`] when that node does not answer.
    pub async fn node_status(&self, addr: &str) -> Result<Status, ClientError> {
        let answer = self.node_call(&self.base_url(addr), "/status").await?;
        json(ok(answer)?)
    }

    /// The value of `key`, `None` when it does not exist.
    ///
    /// # Errors
    /// [`ClientError`] when the read cannot be served.
    pub async fn get(
        &self,
        key: &[u8],
        consistency: Consistency,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let path = format!(
            "/get?key={}&consistency={}",
            encode(key),
            consistency.as_str()
        );
        match ok(self.leader_call(Method::GET, &path, Payload::Empty).await?) {
            Ok(body) => Ok(Some(body)),
            Err(ClientError::NotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Stores `value` under `key`, expiring after `ttl` if given.
    ///
    /// # Errors
    /// [`ClientError`] when the write is refused or its outcome is unknown.
    pub async fn set(
        &self,
        key: &[u8],
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), ClientError> {
        let path = format!("/set?key={}{}", encode(key), value_params(value, ttl));
        ok(self.leader_call(Method::POST, &path, body(value)).await?).map(drop)
    }

    /// Deletes `key`; `false` when it did not exist.
    ///
    /// # Errors
    /// [`ClientError`] when the write is refused or its outcome is unknown.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, ClientError> {
        let path = format!("/delete?key={}", encode(key));
        existed(
            self.leader_call(Method::POST, &path, Payload::Empty)
                .await?,
        )
    }

    /// Stores `value` only if the current value is `expected` (or, without
    /// it, only if the key is absent).
    ///
    /// # Errors
    /// [`ClientError`] when the write is refused or its outcome is unknown.
    pub async fn cas(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Cas, ClientError> {
        let mut path = format!("/cas?key={}{}", encode(key), value_params(value, ttl));
        if let Some(expected) = expected {
            path.push_str(&format!("&expected={}", encode(expected)));
        }
        let answer = self.leader_call(Method::POST, &path, body(value)).await?;
        if answer.status == StatusCode::CONFLICT {
            // 409 on /cas: not swapped; the body is the current value.
            return Ok(Cas::Mismatch(answer.body));
        }
        ok(answer).map(|_| Cas::Swapped)
    }

    /// Adds a node (it must run, so that it can catch up) and makes it a
    /// voter; returns once it is one.
    ///
    /// # Errors
    /// [`ClientError`] when the leader refuses it or it does not catch up.
    pub async fn join(&self, request: &JoinRequest) -> Result<(), ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Setup(e.to_string()))?;
        ok(self
            .leader_call(Method::POST, "/join", Payload::Json(&body))
            .await?)
        .map(drop)
    }

    /// Removes member `id`; `false` when it is not a member.
    ///
    /// # Errors
    /// [`ClientError`] when the leader refuses the change.
    pub async fn remove(&self, id: NodeId) -> Result<bool, ClientError> {
        let path = format!("/remove?id={id}");
        existed(
            self.leader_call(Method::POST, &path, Payload::Empty)
                .await?,
        )
    }

    /// Uploads a guest module; every node switches to it at the index of
    /// the returned record.
    ///
    /// # Errors
    /// [`ClientError`] with the cluster's reason when it refuses the module.
    pub async fn deploy(&self, module: &[u8], force: bool) -> Result<SwapRecord, ClientError> {
        let path = format!("/guest?force={force}");
        json(ok(self
            .leader_call(Method::POST, &path, Payload::Bytes(module))
            .await?)?)
    }

    /// `GET /guest`: the active guest and the history of swaps.
    ///
    /// # Errors
    /// [`ClientError`] when no node answers.
    pub async fn guest(&self) -> Result<GuestHistory, ClientError> {
        json(ok(self
            .leader_call(Method::GET, "/guest", Payload::Empty)
            .await?)?)
    }

    /// Polls every member's `/status` until it runs the guest of `record`
    /// (its hash, from its index on) or `wait` has passed; calls `report`
    /// with each member's HTTP address and whether it runs the guest.
    ///
    /// # Errors
    /// [`ClientError`] when the member list cannot be read.
    pub async fn wait_for_guest(
        &self,
        record: &SwapRecord,
        wait: Duration,
        mut report: impl FnMut(&str, bool),
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + wait;
        let members = self.status().await?.members;
        for member in members {
            let base = self.base_url(&member.http);
            loop {
                let running = match self.node_call(&base, "/status").await.and_then(ok) {
                    Ok(body) => json::<Status>(body)
                        .ok()
                        .and_then(|s| s.guest)
                        .is_some_and(|g| g.hash == record.hash && g.since >= record.index),
                    Err(_) => false,
                };
                if running || Instant::now() >= deadline {
                    report(&member.http, running);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(())
    }
}

/// The body of a successful answer, or the error its status means.
fn ok(answer: Answer) -> Result<Vec<u8>, ClientError> {
    let Answer { url, status, body } = answer;
    if status.is_success() {
        Ok(body)
    } else {
        Err(refusal(url, status, &body))
    }
}

/// Whether what a delete or remove named existed: `true` on success,
/// `false` on 404, the refusal otherwise.
fn existed(answer: Answer) -> Result<bool, ClientError> {
    match ok(answer) {
        Ok(_) => Ok(true),
        Err(ClientError::NotFound) => Ok(false),
        Err(error) => Err(error),
    }
}

/// The error an unsuccessful answer means.
fn refusal(url: String, status: StatusCode, body: &[u8]) -> ClientError {
    match status {
        StatusCode::NOT_FOUND if body.is_empty() => ClientError::NotFound,
        s if s.is_client_error() => ClientError::Refused {
            url,
            status,
            message: text(body),
        },
        _ => ClientError::Failed {
            url,
            status,
            message: text(body),
        },
    }
}

fn json<T: serde::de::DeserializeOwned>(body: Vec<u8>) -> Result<T, ClientError> {
    serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
        url: String::new(),
        message: format!("the answer is not what this client expects ({e}); is the node a raftwasm node of this version?"),
    })
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).trim().to_owned()
}

/// A value as the body; an empty one goes into the query instead (see
/// [`value_params`]).
fn body(value: &[u8]) -> Payload<'_> {
    if value.is_empty() {
        Payload::Empty
    } else {
        Payload::Bytes(value)
    }
}

/// The `value` (in the query only when empty: an empty body reads as no
/// value) and `ttl` parameters.
fn value_params(value: &[u8], ttl: Option<Duration>) -> String {
    let mut params = String::new();
    if value.is_empty() {
        params.push_str("&value=");
    }
    if let Some(ttl) = ttl {
        params.push_str(&format!("&ttl_ms={}", ttl.as_millis()));
    }
    params
}

/// Percent-encodes every byte but the unreserved ones, so that any key or
/// value, binary included, arrives as it was.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `error` followed by its causes (`error sending request: connection
/// refused`), since reqwest's own message leaves out why.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let more = inner.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_keeps_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let encoded = encode(&all);
        assert!(encoded.is_ascii());
        assert!(!encoded.contains(['&', '=', '+', ' ', '#']));
        assert_eq!(encode(b"a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        let answer = |url: &str, status: u16, body: &[u8]| Answer {
            url: url.to_owned(),
            status: StatusCode::from_u16(status).expect("a status"),
            body: body.to_vec(),
        };
        let code = |a| ok(a).err().map(|e| e.exit_code());
        assert_eq!(code(answer("/get?key=a", 404, b"")), Some(1));
        assert_eq!(code(answer("/set?key=", 400, b"the key is empty")), Some(2));
        assert_eq!(code(answer("/join", 409, b"taken")), Some(2));
        assert_eq!(code(answer("/set?key=a", 504, b"unknown")), Some(3));
        assert_eq!(code(answer("/get?key=a", 200, b"v")), None);
    }
}
