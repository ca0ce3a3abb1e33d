//! The built-in dashboard (`GET /`) in a real browser: Debian's chromium,
//! headless, driven through chromedriver over the W3C WebDriver HTTP protocol.
//! It checks the empty state, a topic appearing from `/v1/stats`, the live
//! tail from a deep link (records produced before and while it runs), pause and
//! resume without a gap or a duplicate, and saves a screenshot to
//! `target/dashboard.png`. A second scenario runs an edge forwarding to a
//! core and checks the store-and-forward cards (connected, lag while the core
//! is down, the core's list of edges), saving `target/dashboard-sync.png`.
//! A third runs a core cluster of three and checks the Cluster card before
//! and after the leader is killed -9, saving `target/dashboard-cluster.png`.
//! Ignored by plain `cargo test`; `scripts/test` installs chromium and
//! chromium-driver and runs it.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::sync::{http_addr, start_core, start_edge, sync_url, wait_drained};
use common::{client, create_topic, post, ChildNode};
use serde_json::{json, Value};

/// How long any one thing may take to show up in the page.
const WAIT: Duration = Duration::from_secs(30);
/// The W3C name of the key that holds a web element's id.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The chromium binary: Debian's `/usr/bin/chromium`, else `chromium` on PATH.
fn chromium_binary() -> PathBuf {
    let debian = Path::new("/usr/bin/chromium");
    if debian.exists() {
        return debian.to_owned();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("chromium"))
                .find(|p| p.exists())
        })
        .expect("chromium is installed (scripts/test installs it: apt-get install chromium)")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// chromedriver as a child process in its own process group; dropping it ends
/// the browser session (so chromium quits) and then kills the group.
struct ChromeDriver {
    child: Child,
    port: u16,
    session: Option<String>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChromeDriver {
    fn spawn() -> ChromeDriver {
        let dir = tempfile::tempdir().expect("tempdir for chromedriver");
        let log = dir.path().join("chromedriver.log");
        let out = std::fs::File::create(&log).expect("create chromedriver.log");
        let err = out.try_clone().expect("clone log handle");
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("chromedriver is installed (scripts/test installs it: apt-get install chromium-driver)");
        ChromeDriver {
            child,
            port,
            session: None,
            log,
            _dir: dir,
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until chromedriver answers `/status` with `ready: true`.
    async fn wait_ready(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "chromedriver exited ({status}) before it was ready; its log:\n{}",
                    self.log_text()
                );
            }
            let ready = match http.get(format!("{}/status", self.base())).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .map(|v| v["value"]["ready"] == json!(true))
                    .unwrap_or(false),
                Err(_) => false,
            };
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within {WAIT:?}; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            delete_session_blocking(self.port, &id);
        }
        // The whole group: chromedriver and anything of chromium still around.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `DELETE /session/{id}` without an async runtime (it runs from `Drop`, also
/// while a failed test unwinds): chromedriver then quits chromium cleanly.
fn delete_session_blocking(port: u16, id: &str) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_ok() {
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
    }
}

/// One WebDriver session.
struct Browser {
    http: reqwest::Client,
    driver: ChromeDriver,
    session: String,
}

impl Browser {
    async fn start() -> Browser {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("http client");
        let mut driver = ChromeDriver::spawn();
        driver.wait_ready(&http).await;
        let profile = driver._dir.path().join("profile");
        std::fs::create_dir_all(&profile).expect("create the chromium profile dir");
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium_binary(),
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--no-first-run",
                            "--disable-background-networking",
                            "--disable-component-update",
                            "--disable-sync",
                            "--disable-dev-shm-usage",
                            "--window-size=1280,1000",
                            format!("--user-data-dir={}", profile.display()),
                        ],
                    },
                    "goog:loggingPrefs": {"browser": "ALL"},
                }
            }
        });
        let r = http
            .post(format!("{}/session", driver.base()))
            .json(&caps)
            .send()
            .await
            .expect("POST /session reaches chromedriver");
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let Some(session) = body["value"]["sessionId"].as_str().map(str::to_owned) else {
            panic!(
                "new session failed ({status}): {body}\nchromedriver log:\n{}",
                driver.log_text()
            );
        };
        driver.session = Some(session.clone());
        Browser {
            http,
            driver,
            session,
        }
    }

    /// One WebDriver command; `Err` carries the WebDriver error.
    async fn cmd(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!("{}/session/{}{path}", self.driver.base(), self.session);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req
            .send()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = r.status();
        let v: Value = r
            .json()
            .await
            .map_err(|e| format!("{method} {path}: answer is not JSON: {e}"))?;
        if !status.is_success() || v["value"].get("error").is_some_and(|e| !e.is_null()) {
            return Err(format!(
                "{method} {path} → {status}: {} {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    async fn navigate(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    /// Runs `script` as a function body (`arguments[0]` is `arg`).
    async fn exec(&self, script: &str, arg: Value) -> Result<Value, String> {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [arg] })),
        )
        .await
    }

    async fn body_text(&self) -> String {
        match self
            .exec(
                "return document.body ? document.body.innerText : '(no body)';",
                Value::Null,
            )
            .await
        {
            Ok(Value::String(s)) => s,
            Ok(other) => other.to_string(),
            Err(e) => format!("(could not read the page: {e})"),
        }
    }

    /// The browser's console, best effort (a chromedriver extension).
    async fn console(&self) -> Vec<Value> {
        match self
            .cmd(
                reqwest::Method::POST,
                "/se/log",
                Some(json!({"type": "browser"})),
            )
            .await
        {
            Ok(Value::Array(entries)) => entries,
            _ => Vec::new(),
        }
    }

    /// Polls `script` until it returns `true`; on timeout panics with its last
    /// answer (scripts return a diagnostic instead of `false`), the page text
    /// and the console.
    async fn wait_for(&self, what: &str, script: &str, arg: Value, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            match self.exec(script, arg.clone()).await {
                Ok(Value::Bool(true)) => return,
                Ok(v) => last = v.to_string(),
                Err(e) => last = format!("script failed: {e}"),
            }
            if Instant::now() >= deadline {
                let body = self.body_text().await;
                let console: Vec<String> =
                    self.console().await.iter().map(Value::to_string).collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nlast answer: {last}\n\
                     --- document.body.innerText ---\n{body}\n--- browser console ---\n{}\n---",
                    console.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn click(&self, css: &str) {
        let found = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        let id = found[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("find {css}: no element id in {found}"))
            .to_owned();
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self
            .cmd(reqwest::Method::GET, "/screenshot", None)
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        let b64 = v.as_str().expect("the screenshot is a base64 string");
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("the screenshot is valid base64")
    }
}

/// Produces `records` to `topic` over HTTP; returns (partition, offset) per record.
async fn produce(
    c: &reqwest::Client,
    base: &str,
    topic: &str,
    records: Vec<Value>,
) -> Vec<(u64, u64)> {
    let (s, b) = post(
        c,
        &format!("{base}/v1/topics/{topic}/records"),
        &json!({ "records": records }),
    )
    .await;
    assert_eq!(s, 200, "produce to {topic}: {b}");
    b["offsets"]
        .as_array()
        .expect("offsets in the produce answer")
        .iter()
        .map(|o| {
            (
                o["partition"].as_u64().expect("partition"),
                o["offset"].as_u64().expect("offset"),
            )
        })
        .collect()
}

fn record(partition: u32, tag: &str) -> Value {
    json!({"key": format!("key-{tag}"), "value": {"tag": tag, "temp": 21.5}, "partition": partition})
}

/// `[[partition, offset, tag], ...]` for a script argument.
fn expected(offsets: &[(u64, u64)], tags: &[String]) -> Value {
    Value::Array(
        offsets
            .iter()
            .zip(tags)
            .map(|(&(p, o), tag)| json!([p, o, tag]))
            .collect(),
    )
}

/// True once every `[partition, offset, tag]` in `arguments[0]` is a row of
/// `#tail-rows` showing the tag (in the value) and `key-<tag>` (the key);
/// otherwise the missing ones.
const ROWS_PRESENT: &str = r#"
const missing = [];
for (const [p, o, tag] of arguments[0]) {
  const row = document.querySelector(`#tail-rows .rec[data-partition="${p}"][data-offset="${o}"]`);
  if (!row) { missing.push(`p${p}@${o}: no row`); continue; }
  const text = row.innerText;
  if (!text.includes(tag)) missing.push(`p${p}@${o}: value without ${tag}: ${text}`);
  if (!text.includes('key-' + tag)) missing.push(`p${p}@${o}: key key-${tag} not shown: ${text}`);
}
return missing.length === 0 ? true : missing;
"#;

/// True when no (partition, offset) appears twice in the tail and, within a
/// partition, the newest record is on top.
const ROWS_UNIQUE_NEWEST_FIRST: &str = r#"
const seen = new Set(), last = new Map(), problems = [];
for (const r of document.querySelectorAll('#tail-rows .rec')) {
  const p = r.dataset.partition, o = Number(r.dataset.offset), id = p + '@' + o;
  if (seen.has(id)) problems.push('duplicate ' + id);
  seen.add(id);
  if (last.has(p) && last.get(p) <= o) problems.push(`p${p}: ${o} below ${last.get(p)} (newest must be on top)`);
  last.set(p, o);
}
return problems.length === 0 ? true : problems;
"#;

/// Uncaught script errors in the browser's console so far.
async fn script_errors(browser: &Browser) -> Vec<String> {
    browser
        .console()
        .await
        .into_iter()
        .filter(|e| e["level"] == json!("SEVERE"))
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .filter(|m| m.contains("Uncaught"))
        .collect()
}

/// Takes a screenshot, checks it is a PNG that is not blank, and writes it
/// to `target/<name>` (for people and for CI artifacts).
async fn save_screenshot(browser: &Browser, name: &str) -> PathBuf {
    let png = browser.screenshot().await;
    assert!(png.starts_with(PNG_MAGIC), "the screenshot is not a PNG");
    assert!(
        png.len() > 10 * 1024,
        "the screenshot is only {} bytes: a blank page?",
        png.len()
    );
    let target = target_dir();
    std::fs::create_dir_all(&target).expect("create the target dir");
    let path = target.join(name);
    std::fs::write(&path, &png).expect("write the screenshot");
    eprintln!(
        "dashboard screenshot: {} ({} bytes)",
        path.display(),
        png.len()
    );
    path
}

fn target_dir() -> PathBuf {
    // The node binary sits in target/<profile>/ (CARGO_TARGET_DIR respected).
    Path::new(common::NODE_BIN)
        .parent()
        .and_then(Path::parent)
        .map(Path::to_owned)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

#[test]
#[ignore = "needs chromium and chromium-driver (scripts/test installs them)"]
fn dashboard_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    common::runtime().block_on(drive(&node.url));
}

async fn drive(base: &str) {
    let c = client();
    let browser = Browser::start().await;

    // No topics yet: the empty state, and the node's summary.
    browser.navigate(&format!("{base}/")).await;
    browser
        .wait_for(
            "the empty state (#empty visible, no topic rows)",
            r#"const e = document.getElementById('empty');
               if (!e) return 'no #empty';
               if (e.getClientRects().length === 0) return '#empty hidden';
               if (!e.innerText.includes('No topics yet')) return '#empty says: ' + e.innerText;
               return document.querySelectorAll('#topics tr').length === 0 || 'topic rows present';"#,
            Value::Null,
            WAIT,
        )
        .await;
    browser
        .wait_for(
            "#mode = edge and an uptime",
            r#"const m = document.getElementById('mode').textContent.trim();
               const u = document.getElementById('uptime').textContent.trim();
               return (m === 'edge' && /^\d+(s|m)/.test(u)) || `mode '${m}', uptime '${u}'`;"#,
            Value::Null,
            WAIT,
        )
        .await;
    // An edge without an upstream has no `sync` stats: nothing of it shows.
    let shown = browser
        .exec(SYNC_PARTS_SHOWN, Value::Null)
        .await
        .expect("look for the sync parts");
    assert_eq!(
        shown,
        json!([]),
        "store-and-forward parts on an edge without upstream"
    );

    // A topic appears within a poll or two.
    create_topic(&c, base, "dash", 3).await;
    let before_tags: Vec<String> = (0..3).map(|i| format!("before-{i}")).collect();
    let mut before = Vec::new();
    for (i, tag) in before_tags.iter().enumerate() {
        // Partitions 0 and 1 only: partition 2 stays empty until the pause below.
        let p = (i % 2) as u32;
        before.extend(produce(&c, base, "dash", vec![record(p, tag)]).await);
    }
    browser
        .wait_for(
            "the row of topic dash with 3 events, #empty hidden",
            r#"const row = document.querySelector('#topics tr[data-topic="dash"]');
               if (!row) return 'no row for dash';
               if (document.getElementById('empty').getClientRects().length !== 0) return '#empty still visible';
               // Columns: topic, partitions, offsets, events stored, events/s, retention.
               if (row.cells[3].innerText.trim() !== '3') return 'row: ' + row.innerText;
               const opts = Array.from(document.querySelectorAll('#tail-topic option')).map(o => o.value);
               return opts.includes('dash') || 'tail select options: ' + opts.join(',');"#,
            Value::Null,
            Duration::from_secs(20),
        )
        .await;

    // The deep link starts the tail from earliest: the records so far.
    browser
        .navigate(&format!("{base}/?tail=dash&from=earliest"))
        .await;
    browser
        .wait_for(
            "the records produced before the tail",
            ROWS_PRESENT,
            expected(&before, &before_tags),
            WAIT,
        )
        .await;
    browser
        .wait_for(
            "#tail-status live",
            r#"const s = document.getElementById('tail-status');
               return s.dataset.state === 'live' || s.dataset.state + ': ' + s.innerText;"#,
            Value::Null,
            WAIT,
        )
        .await;

    // The tail's socket is counted among the node's connections.
    browser
        .wait_for(
            "#conn-ws to count the tail's WebSocket",
            r#"const n = Number(document.getElementById('conn-ws').textContent.replace(/,/g, ''));
               return n >= 1 || '#conn-ws: ' + document.getElementById('conn-ws').textContent;"#,
            Value::Null,
            WAIT,
        )
        .await;

    // Records produced while the tail runs arrive live.
    let nonce = fastrand::u64(..);
    let live_tags: Vec<String> = (0..5).map(|i| format!("live-{nonce:x}-{i}")).collect();
    let live = produce(
        &c,
        base,
        "dash",
        live_tags
            .iter()
            .enumerate()
            .map(|(i, tag)| record((i % 2) as u32, tag))
            .collect(),
    )
    .await;
    browser
        .wait_for(
            "the 5 records produced while tailing",
            ROWS_PRESENT,
            expected(&live, &live_tags),
            WAIT,
        )
        .await;

    // Pause, produce (also to partition 2, never seen by the tail), resume:
    // everything produced meanwhile arrives, nothing twice.
    browser.click("#tail-pause").await;
    browser
        .wait_for(
            "#tail-status paused",
            r#"const s = document.getElementById('tail-status');
               return s.dataset.state === 'paused' || s.dataset.state + ': ' + s.innerText;"#,
            Value::Null,
            WAIT,
        )
        .await;
    let paused_tags: Vec<String> = (0..3).map(|i| format!("paused-{nonce:x}-{i}")).collect();
    let paused = produce(
        &c,
        base,
        "dash",
        paused_tags
            .iter()
            .zip([0u32, 2, 2])
            .map(|(tag, p)| record(p, tag))
            .collect(),
    )
    .await;
    browser.click("#tail-pause").await;
    browser
        .wait_for(
            "the records produced while paused, after resume",
            ROWS_PRESENT,
            expected(&paused, &paused_tags),
            WAIT,
        )
        .await;
    browser
        .wait_for(
            "#tail-status live again",
            r#"const s = document.getElementById('tail-status');
               return s.dataset.state === 'live' || s.dataset.state + ': ' + s.innerText;"#,
            Value::Null,
            WAIT,
        )
        .await;
    browser
        .wait_for(
            "no duplicate rows, newest first per partition",
            ROWS_UNIQUE_NEWEST_FIRST,
            Value::Null,
            WAIT,
        )
        .await;
    let rows = browser
        .exec(
            "return document.querySelectorAll('#tail-rows .rec').length;",
            Value::Null,
        )
        .await
        .expect("count rows");
    assert_eq!(
        rows,
        json!(before.len() + live.len() + paused.len()),
        "one row per record; the page:\n{}",
        browser.body_text().await
    );

    // The throughput sparkline has drawn something by now.
    browser
        .wait_for(
            "a sparkline in the dash row",
            r#"const l = document.querySelector('#topics tr[data-topic="dash"] svg polyline');
               return (!!l && (l.getAttribute('points') || '').length > 0) || 'no sparkline points yet';"#,
            Value::Null,
            WAIT,
        )
        .await;

    // A connector shows up in its table, with its state and, as nothing
    // listens where it delivers, its last error.
    let (status, body) = common::post(
        &c,
        &format!("{base}/v1/connectors"),
        &json!({"name": "dash-hook", "kind": "http_sink", "topics": ["dash"],
                "url": "http://127.0.0.1:9/hook", "min_backoff_ms": 50, "max_backoff_ms": 200}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    browser
        .wait_for(
            "the connector's row: running, with its error",
            r#"const r = document.querySelector('#connector-rows tr[data-connector="dash-hook"]');
               if (!r) return 'no row for dash-hook';
               const cells = [...r.cells].map(c => c.textContent);
               return (cells[1] === 'http_sink' && cells[2] === 'running' && cells[7] !== '')
                 || 'cells: ' + JSON.stringify(cells);"#,
            Value::Null,
            WAIT,
        )
        .await;

    // A pipeline shows up with its counters, and its chart plots a chosen
    // numeric column of its output over time.
    let (status, body) = common::post(
        &c,
        &format!("{base}/v1/pipelines"),
        &json!({"name": "dash-stats", "sql": "INSERT INTO dash_stats SELECT _key AS k, COUNT(*) AS n, \
                 SUM(v) AS total, window_start FROM readings GROUP BY _key, TUMBLE(_ts, INTERVAL '1' SECOND)"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let readings: Vec<Value> = (0..400)
        .map(|i| json!({"key": "s1", "value": {"v": i % 17}, "timestamp": 1_700_000_000_000i64 + i * 100}))
        .collect();
    let (status, body) = common::post(
        &c,
        &format!("{base}/v1/topics/readings/records"),
        &json!({"records": readings}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    browser
        .wait_for(
            "the pipeline's row with rows in and out",
            r#"const r = document.querySelector('#pipeline-rows tr[data-pipeline="dash-stats"]');
               if (!r) return 'no row for dash-stats';
               const cells = [...r.cells].map(c => c.textContent);
               return (cells[1] === 'running' && cells[3] === '400' && cells[4] === '39')
                 || 'cells: ' + JSON.stringify(cells);"#,
            Value::Null,
            WAIT,
        )
        .await;
    browser
        .wait_for(
            "the pipeline chart plots its rows",
            r#"const sel = document.getElementById('pipeline-chart-column');
               const cols = [...sel.options].map(o => o.value);
               if (!cols.includes('total')) return 'columns: ' + JSON.stringify(cols);
               if (sel.value !== 'total') { sel.value = 'total'; sel.dispatchEvent(new Event('change')); return 'chose total'; }
               const pts = (document.querySelector('#pipeline-chart polyline').getAttribute('points') || '').trim().split(' ');
               const range = document.getElementById('pipeline-chart-range').textContent;
               return (pts.length === 39 && range.includes('39 rows')) || 'points ' + pts.length + ', ' + range;"#,
            Value::Null,
            WAIT,
        )
        .await;

    // No uncaught script errors on the way.
    let errors = script_errors(&browser).await;
    assert!(errors.is_empty(), "script errors in the page: {errors:#?}");

    // A screenshot for people (and for CI artifacts).
    save_screenshot(&browser, "dashboard.png").await;
}

#[test]
#[ignore = "needs chromium and chromium-driver (scripts/test installs them)"]
fn dashboard_with_device_auth_takes_a_token_from_the_page_url() {
    const ADMIN: &str = "admin-token-for-the-browser-test";
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(
        dir.path(),
        &[
            ("TRIBUTARY_AUTH__MODE", "devices"),
            ("TRIBUTARY_AUTH__ADMIN_TOKEN", ADMIN),
        ],
    );
    common::runtime().block_on(async {
        let c = client();
        let base = node.url.as_str();
        let r = c
            .post(format!("{base}/v1/devices"))
            .bearer_auth(ADMIN)
            .json(&json!({"id": "screen", "publish": ["dash/#"], "subscribe": ["dash/#"]}))
            .send()
            .await
            .expect("add device");
        assert_eq!(r.status(), 201);
        let token = r.json::<Value>().await.expect("json")["token"]
            .as_str()
            .expect("token")
            .to_owned();
        let r = c
            .post(format!("{base}/v1/topics"))
            .bearer_auth(&token)
            .json(&json!({"name": "dash", "partitions": 1}))
            .send()
            .await
            .expect("create topic");
        assert_eq!(r.status(), 201);
        let r = c
            .post(format!("{base}/v1/topics/dash/records"))
            .bearer_auth(&token)
            .json(&json!({"records": [record(0, "authed")]}))
            .send()
            .await
            .expect("produce");
        assert_eq!(r.status(), 200);
        let browser = Browser::start().await;
        // Without a token the page says how to give one.
        browser.navigate(&format!("{base}/")).await;
        browser
            .wait_for(
                "the stats status to ask for a token",
                r#"const s = document.getElementById('stats-status').innerText;
                   return s.includes('401') && s.includes('#token=') || s;"#,
                Value::Null,
                WAIT,
            )
            .await;
        // With ?token= the stats and the live tail (WebSocket ?token=) work.
        browser
            .navigate(&format!("{base}/?tail=dash&from=earliest&token={token}"))
            .await;
        browser
            .wait_for(
                "the dash topic row",
                r#"const row = document.querySelector('#topics tr[data-topic="dash"]');
                   return !!row || document.getElementById('stats-status').innerText;"#,
                Value::Null,
                WAIT,
            )
            .await;
        browser
            .wait_for(
                "the record in the tail",
                ROWS_PRESENT,
                expected(&[(0, 0)], &["authed".to_owned()]),
                WAIT,
            )
            .await;
    });
}

/// The store-and-forward parts of the page that are visible (none on a node
/// without `sync` stats).
const SYNC_PARTS_SHOWN: &str = r#"
return ['sync-upstream-card', 'sync-topics-section', 'sync-edges-card', 'sync-edges-section']
  .map(id => [id, document.getElementById(id)])
  .filter(([, e]) => !e || e.getClientRects().length > 0)
  .map(([id, e]) => e ? id : id + ' (missing)');
"#;

/// True once the edge's Upstream card reads `state` with a total lag of
/// `lag`, and `#sync-topics` has a row for `topic` with that lag and
/// `forwarded` events forwarded; otherwise what it shows.
const UPSTREAM_SHOWS: &str = r#"
const { state, lag, topic, forwarded } = arguments[0];
const text = id => { const e = document.getElementById(id); return e ? e.textContent.trim() : `(no #${id})`; };
const card = document.getElementById('sync-upstream-card');
if (!card || card.getClientRects().length === 0) return 'the Upstream card is hidden';
if (text('sync-state') !== state) return `#sync-state '${text('sync-state')}', want '${state}'`;
if (text('sync-lag') !== lag) return `#sync-lag '${text('sync-lag')}', want '${lag}'`;
const table = document.getElementById('sync-topics');
if (!table || table.getClientRects().length === 0) return '#sync-topics hidden';
const row = table.querySelector(`tr[data-topic="${topic}"]`);
if (!row) return `no row for ${topic} in #sync-topics: ${table.innerText}`;
// Columns: topic, forwarded, lag events, lag bytes, oldest unforwarded, drain rate, ETA.
const cells = Array.from(row.cells, c => c.textContent.trim());
if (cells[0] !== topic || cells[1] !== forwarded || cells[2] !== lag) return 'row: ' + cells.join(' | ');
return true;
"#;

/// The cells of `#sync-topics`'s row for `arguments[0]`, and the texts of
/// the Upstream card's parts.
const UPSTREAM_DETAILS: &str = r#"
const row = document.querySelector(`#sync-topics tr[data-topic="${arguments[0]}"]`);
const err = document.getElementById('sync-error');
return {
  cells: row ? Array.from(row.cells, c => c.textContent.trim()) : null,
  url: document.getElementById('sync-url').textContent,
  // Not `error`: Browser::cmd takes a result with an `error` key for a WebDriver error.
  shownError: err.getClientRects().length > 0 ? err.textContent : null,
  quota: document.getElementById('quota').textContent,
};
"#;

/// True once the core's Edges card counts `connected` edges and `#sync-edges`
/// lists `edge` as connected (`yes`) from a peer, seen lately, with `lag`.
const EDGES_SHOW: &str = r#"
const { connected, edge, lag } = arguments[0];
const card = document.getElementById('sync-edges-card');
if (!card || card.getClientRects().length === 0) return 'the Edges card is hidden';
const n = document.getElementById('sync-edges-connected').textContent.trim();
if (n !== connected) return `#sync-edges-connected '${n}', want '${connected}'`;
const table = document.getElementById('sync-edges');
if (!table || table.getClientRects().length === 0) return '#sync-edges hidden';
const row = table.querySelector(`tr[data-edge="${edge}"]`);
if (!row) return `no row for ${edge} in #sync-edges: ${table.innerText}`;
// Columns: edge, connected, peer, last seen, lag.
const [id, up, peer, seen, l] = Array.from(row.cells, c => c.textContent.trim());
const recent = seen === 'just now' || /^\d+(\.\d)? (ms|s) ago$/.test(seen);
if (id !== edge || up !== 'yes' || !/^127\.0\.0\.1:\d+$/.test(peer) || !recent || l !== lag)
  return 'row: ' + [id, up, peer, seen, l].join(' | ');
return true;
"#;

#[test]
#[ignore = "needs chromium and chromium-driver (scripts/test installs them)"]
fn dashboard_shows_store_and_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let core_dir = dir.path().join("core");
    // The core comes back on the same port, where the edge keeps reconnecting.
    let core_listen = format!("127.0.0.1:{}", free_port());
    let core_env = [("TRIBUTARY_HTTP__LISTEN", core_listen.as_str())];
    let mut core = start_core(&core_dir, &core_env);
    let upstream = sync_url(&http_addr(&core));
    // A disk quota, for the "lost before forwarding" count on the quota line.
    let edge = start_edge(
        &dir.path().join("edge"),
        &upstream,
        "edge-1",
        &[("TRIBUTARY_STORAGE__MAX_DISK_BYTES", "268435456")],
    );
    const T: &str = "sensors";
    common::runtime().block_on(async {
        let c = client();
        let browser = Browser::start().await;

        // (a) Connected, the topic forwarded with no lag.
        create_topic(&c, &edge.url, T, 2).await;
        let first = common::sync::produce(&c, &edge.url, T, "before", 0, 20)
            .await
            .expect("produce to the edge");
        assert_eq!(first.len(), 20);
        wait_drained(&edge.url, WAIT).await;
        browser.navigate(&format!("{}/", edge.url)).await;
        browser
            .wait_for(
                "the Upstream card connected, sensors forwarded with lag 0",
                UPSTREAM_SHOWS,
                json!({"state": "connected", "lag": "0", "topic": T, "forwarded": "20"}),
                WAIT,
            )
            .await;
        let shown = browser
            .exec(SYNC_PARTS_SHOWN, Value::Null)
            .await
            .expect("look for the sync parts");
        assert_eq!(
            shown,
            json!(["sync-upstream-card", "sync-topics-section"]),
            "an edge shows its upstream, not a core's edges"
        );
        let d = browser
            .exec(UPSTREAM_DETAILS, json!(T))
            .await
            .expect("read the card");
        assert_eq!(d["url"], json!(format!("{upstream} as edge-1")), "{d}");
        assert_eq!(d["shownError"], Value::Null, "no error before the outage: {d}");
        assert!(
            d["quota"]
                .as_str()
                .is_some_and(|q| q.ends_with("· lost before forwarding 0")),
            "the quota line: {d}"
        );
        // Nothing unforwarded: no age and no ETA.
        assert_eq!(d["cells"][4], json!("–"), "{d}");
        assert_eq!(d["cells"][6], json!("–"), "{d}");

        // (b) The core is down: the backlog shows as lag.
        core.kill9();
        let backlog = common::sync::produce(&c, &edge.url, T, "backlog", 20, 100)
            .await
            .expect("the edge takes records while the core is down");
        assert_eq!(backlog.len(), 100);
        browser
            .wait_for(
                "the Upstream card disconnected with lag 100",
                UPSTREAM_SHOWS,
                json!({"state": "disconnected", "lag": "100", "topic": T, "forwarded": "20"}),
                WAIT,
            )
            .await;
        browser
            .wait_for(
                "the error of the failed reconnects",
                r#"const e = document.getElementById('sync-error');
                   return (e.getClientRects().length > 0 && e.textContent.startsWith('error: '))
                     || 'no error shown: ' + e.textContent;"#,
                Value::Null,
                WAIT,
            )
            .await;
        let d = browser
            .exec(UPSTREAM_DETAILS, json!(T))
            .await
            .expect("read the card");
        let cells = &d["cells"];
        let age = cells[4].as_str().unwrap_or_default();
        assert!(
            age.ends_with(" d") || age.ends_with(" h") || age.ends_with(" min") || age.ends_with(" s"),
            "the oldest unforwarded event has an age: {d}"
        );
        assert!(
            cells[3].as_str().is_some_and(|b| b != "0 B" && b != "–"),
            "lag bytes: {d}"
        );
        assert_eq!(cells[6], json!("–"), "no ETA while disconnected: {d}");
        save_screenshot(&browser, "dashboard-sync.png").await;

        // (c) The core is back: the edge drains; the core lists it.
        core = start_core(&core_dir, &core_env);
        assert_eq!(sync_url(&http_addr(&core)), upstream, "the core's port");
        wait_drained(&edge.url, Duration::from_secs(60)).await;
        browser
            .wait_for(
                "the Upstream card connected again with lag 0",
                UPSTREAM_SHOWS,
                json!({"state": "connected", "lag": "0", "topic": T, "forwarded": "120"}),
                WAIT,
            )
            .await;
        browser
            .wait_for(
                "the error to read as history once connected",
                r#"const e = document.getElementById('sync-error');
                   return e.getClientRects().length === 0 || e.textContent.startsWith('last error: ')
                     || e.textContent;"#,
                Value::Null,
                WAIT,
            )
            .await;
        let edge_errors = script_errors(&browser).await;
        browser.navigate(&format!("{}/", core.url)).await;
        browser
            .wait_for(
                "the Edges card: edge-1 connected with lag 0",
                EDGES_SHOW,
                json!({"connected": "1", "edge": "edge-1", "lag": "0"}),
                WAIT,
            )
            .await;
        browser
            .wait_for(
                "#mode = core",
                r#"const m = document.getElementById('mode').textContent.trim();
                   return m === 'core' || `mode '${m}'`;"#,
                Value::Null,
                WAIT,
            )
            .await;
        let shown = browser
            .exec(SYNC_PARTS_SHOWN, Value::Null)
            .await
            .expect("look for the sync parts");
        assert_eq!(
            shown,
            json!(["sync-edges-card", "sync-edges-section"]),
            "a core shows its edges, not an upstream"
        );

        // (d) No uncaught script errors on either page.
        let mut errors = edge_errors;
        errors.extend(script_errors(&browser).await);
        assert!(errors.is_empty(), "script errors in the page: {errors:#?}");
        save_screenshot(&browser, "dashboard-sync-core.png").await;
    });
}

/// The Cluster card's role, leader, term, leader changes and nodes.
const CLUSTER_SHOWS: &str = r#"
const { leader, changes } = arguments[0];
const card = document.getElementById('cluster-card');
if (!card || card.hidden) return 'the Cluster card is hidden';
const text = id => document.getElementById(id).textContent.trim();
const nodes = text('cluster-nodes');
if (text('cluster-leader') !== String(leader)) return `leader '${text('cluster-leader')}'`;
if (Number(text('cluster-changes')) < changes) return `leader changes '${text('cluster-changes')}'`;
for (const id of [1, 2, 3]) {
  if (!new RegExp(`(^|· )${id} (leader|follower)`).test(nodes)) return `nodes '${nodes}'`;
}
if (!/^\d+$/.test(text('cluster-node'))) return `node '${text('cluster-node')}'`;
if (text('durability') !== 'majority') return `durability '${text('durability')}'`;
return /^(leader|follower)$/.test(text('cluster-role')) || `role '${text('cluster-role')}'`;
"#;

/// Three cores forming a cluster; the dashboard of one shows the Cluster
/// card (its role, the leader, the term, each node); after the leader is
/// killed -9, a survivor's dashboard shows the new leader and the change.
#[test]
#[ignore = "needs chromium and chromium-driver (scripts/test installs them)"]
fn dashboard_shows_the_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Node-to-node ports known before the nodes start, below the ephemeral
    // range (no port-0 listener can take one meanwhile).
    let ports: Vec<u16> = {
        let mut next = 20_000 + (std::process::id() % 10_000) as u16;
        let mut ports = Vec::new();
        while ports.len() < 3 {
            if TcpListener::bind(("127.0.0.1", next)).is_ok() {
                ports.push(next);
            }
            next += 1;
        }
        ports
    };
    let peers = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<Option<ChildNode>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let (dir, peers, port) =
                    (dir.path().join(format!("n{i}")), peers.clone(), ports[i]);
                s.spawn(move || common::start_cluster_node(&dir, i + 1, port, &peers, &[]))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| Some(h.join().expect("started")))
            .collect()
    });
    common::runtime().block_on(async {
        let c = client();
        let urls: Vec<String> = nodes
            .iter()
            .map(|n| n.as_ref().expect("up").url.clone())
            .collect();
        // The leader node `i` knows of.
        let leader_seen_by = |i: usize| {
            let url = urls[i].clone();
            let c = c.clone();
            async move {
                let deadline = Instant::now() + WAIT;
                loop {
                    let (_, st) = common::get(&c, &format!("{url}/v1/cluster")).await;
                    if let Some(l) = st["leader"].as_u64() {
                        return l;
                    }
                    assert!(Instant::now() < deadline, "no leader: {st}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let leader = leader_seen_by(0).await;
        let browser = Browser::start().await;
        let survivor = (leader as usize) % 3; // the node after the leader (0-based)
        let url = urls[survivor].clone();
        browser.navigate(&format!("{url}/")).await;
        browser
            .wait_for(
                "the Cluster card with three nodes and the leader",
                CLUSTER_SHOWS,
                json!({"leader": leader, "changes": 1}),
                WAIT,
            )
            .await;
        let before = common::get(&c, &format!("{url}/v1/cluster")).await.1["leader_changes"]
            .as_u64()
            .expect("leader changes");

        nodes[leader as usize - 1].as_mut().expect("up").kill9();
        let deadline = Instant::now() + WAIT;
        let next = loop {
            let l = leader_seen_by(survivor).await;
            if l != leader {
                break l;
            }
            assert!(Instant::now() < deadline, "no new leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        browser
            .wait_for(
                "the Cluster card with the new leader and one more change",
                CLUSTER_SHOWS,
                json!({"leader": next, "changes": before + 1}),
                WAIT,
            )
            .await;
        let errors = script_errors(&browser).await;
        assert!(errors.is_empty(), "script errors in the page: {errors:#?}");
        save_screenshot(&browser, "dashboard-cluster.png").await;
    });
    drop(nodes);
}
