//! A headless chromium driven over the Chrome DevTools Protocol: just what
//! the dashboard test needs (open a page, navigate, evaluate JavaScript,
//! take a screenshot). The browser is killed on drop, also when a test fails.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// How long chromium may take to start, and a protocol call to answer.
const TIMEOUT: Duration = Duration::from_secs(30);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The chromium executable: `$CHROMIUM`, else `chromium` or
/// `chromium-browser` on the `PATH`.
fn executable() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "chromium is not installed, and this test needs a real headless browser: install it \
         with `apt-get install -y chromium` (.ci/run does), or point $CHROMIUM at one"
    )
}

/// A running headless chromium and one DevTools websocket to it.
pub struct Browser {
    child: Child,
    socket: tokio::sync::Mutex<Socket>,
    next_id: std::sync::atomic::AtomicU64,
    stderr: Arc<Mutex<Vec<String>>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromium with a fresh profile and connects to it.
    ///
    /// # Errors
    /// When chromium is missing, does not start or does not print its
    /// DevTools address in time.
    pub async fn launch() -> anyhow::Result<Self> {
        let executable = executable()?;
        let profile = tempfile::Builder::new()
            .prefix("raftwasm-chromium-")
            .tempdir()?;
        let mut child = Command::new(&executable)
            .args([
                "--headless",
                "--remote-debugging-port=0",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1200,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", executable.display()))?;
        // Chromium prints its address on stderr; the thread keeps reading
        // it afterwards so that the pipe never fills up.
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (found, address) = mpsc::channel();
        let pipe = child.stderr.take().context("chromium's stderr")?;
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(at) = line.find("ws://")
                    && line.contains("DevTools listening on")
                {
                    let _ = found.send(line[at..].trim().to_owned());
                }
                if let Ok(mut lines) = lines.lock() {
                    lines.push(line);
                }
            }
        });
        let url = match address.recv_timeout(TIMEOUT) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let seen = stderr.lock().map(|l| l.join("\n")).unwrap_or_default();
                bail!(
                    "{} printed no DevTools address within {TIMEOUT:?}; its stderr:\n{seen}",
                    executable.display()
                );
            }
        };
        let browser = |socket| Self {
            child,
            socket: tokio::sync::Mutex::new(socket),
            next_id: std::sync::atomic::AtomicU64::new(1),
            stderr,
            _profile: profile,
        };
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .with_context(|| format!("cannot connect to chromium at {url}"))?;
        Ok(browser(socket))
    }

    /// Sends `method` (to the page `session`, or to the browser) and returns
    /// its result; events that arrive meanwhile are skipped.
    ///
    /// # Errors
    /// When chromium answers with an error or not within the timeout.
    pub async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut socket = self.socket.lock().await;
        socket.send(Message::text(message.to_string())).await?;
        let answer = tokio::time::timeout(TIMEOUT, async {
            while let Some(message) = socket.next().await {
                let Message::Text(text) = message? else {
                    continue;
                };
                let value: Value = serde_json::from_str(text.as_str())?;
                if value["id"] == json!(id) {
                    return Ok(value);
                }
            }
            bail!("chromium closed the DevTools connection")
        })
        .await
        .with_context(|| format!("chromium did not answer {method} within {TIMEOUT:?}"))??;
        if let Some(error) = answer.get("error") {
            bail!("{method} failed: {error}");
        }
        Ok(answer["result"].clone())
    }

    /// Opens a new tab of `width` x `height` CSS pixels.
    ///
    /// # Errors
    /// When chromium refuses.
    pub async fn open(&self, width: u32, height: u32) -> anyhow::Result<Page<'_>> {
        let target = self
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .context("attachToTarget answered no session")?
            .to_owned();
        let page = Page {
            browser: self,
            session,
        };
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await?;
        Ok(page)
    }

    /// What chromium printed on stderr so far (for a failure message).
    pub fn stderr_tail(&self) -> String {
        let lines = self.stderr.lock().map(|l| l.clone()).unwrap_or_default();
        let start = lines.len().saturating_sub(20);
        lines[start..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One tab of a [`Browser`].
pub struct Page<'a> {
    browser: &'a Browser,
    session: String,
}

impl Page<'_> {
    async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Loads `url`.
    ///
    /// # Errors
    /// When the navigation fails (the node does not answer, say).
    pub async fn navigate(&self, url: &str) -> anyhow::Result<()> {
        let result = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = result.get("errorText") {
            bail!("navigating to {url}: {error}");
        }
        Ok(())
    }

    /// The value of the JavaScript `expression` (awaited when a promise).
    ///
    /// # Errors
    /// When it throws, naming the exception.
    pub async fn evaluate(&self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            let text = exception["exception"]["description"]
                .as_str()
                .or(exception["text"].as_str())
                .unwrap_or("an exception");
            bail!("`{expression}` threw: {text}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Chooses `path` in the file input that `selector` finds, as a user
    /// picking a file would.
    ///
    /// # Errors
    /// When there is no such element or chromium refuses.
    pub async fn choose_file(&self, selector: &str, path: &std::path::Path) -> anyhow::Result<()> {
        let document = self.call("DOM.getDocument", json!({})).await?;
        let found = self
            .call(
                "DOM.querySelector",
                json!({ "nodeId": document["root"]["nodeId"], "selector": selector }),
            )
            .await?;
        if found["nodeId"].as_u64().unwrap_or(0) == 0 {
            bail!("no element matches {selector}");
        }
        self.call(
            "DOM.setFileInputFiles",
            json!({ "nodeId": found["nodeId"], "files": [path.display().to_string()] }),
        )
        .await?;
        Ok(())
    }

    /// A PNG of what the tab shows.
    ///
    /// # Errors
    /// When chromium cannot take it.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        use base64::Engine as _;
        let result = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let data = result["data"].as_str().context("no screenshot data")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}
