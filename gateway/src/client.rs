//! Client subcommands: `topics`, `produce` and `tail`, over a node's HTTP API.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::cli::{
    ConnectorsOp, DevicesOp, GroupsOp, Limit, PipelinesOp, ProduceArgs, TailArgs, TopicsOp,
};

/// A thin client of the HTTP API that turns API errors into readable ones.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl ApiClient {
    /// A client for the node at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(ApiClient {
            http,
            base: base.trim_end_matches('/').to_owned(),
            // A device token for nodes with `auth.mode = "devices"`.
            token: std::env::var("TRIBUTARY_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        })
    }

    /// Sends `token` as `Authorization: Bearer` on every request.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        if token.is_some() {
            self.token = token;
        }
        self
    }

    /// A request with the token, if any.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn answer(&self, what: &str, r: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = r
            .send()
            .await
            .with_context(|| format!("{what}: cannot reach {}", self.base))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let body: Value = resp
            .json()
            .await
            .with_context(|| format!("{what}: the answer is not JSON"))?;
        if status.is_success() {
            return Ok(body);
        }
        let msg = body["error"]["message"].as_str().unwrap_or("no message");
        let code = body["error"]["code"].as_str().unwrap_or("?");
        bail!("{what}: {status} {code}: {msg}")
    }

    /// GET a JSON document.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Creates `topic` with `partitions` unless it exists.
    pub async fn ensure_topic(&self, topic: &str, partitions: u32) -> anyhow::Result<()> {
        let body = serde_json::json!({"name": topic, "partitions": partitions});
        match self.post("/v1/topics", &body).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("topic_exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// POST a JSON document.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Any method, with an optional JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let what = format!("{method} {path}");
        let mut r = self.request(method, path);
        if let Some(b) = body {
            r = r.json(b);
        }
        self.answer(&what, r).await
    }
}

/// `tributary cluster …`.
pub async fn cluster(
    url: &str,
    admin_token: Option<String>,
    op: crate::cli::ClusterOp,
) -> anyhow::Result<()> {
    use crate::cli::ClusterOp;
    let api = ApiClient::new(url)?.with_token(admin_token);
    let status = match op {
        ClusterOp::Status => api.get("/v1/cluster").await?,
        ClusterOp::Add { id, address } => {
            let body = serde_json::json!({"id": id, "address": address});
            api.post("/v1/cluster/nodes", &body).await?
        }
        ClusterOp::Remove { id } => {
            api.call(
                reqwest::Method::DELETE,
                &format!("/v1/cluster/nodes/{id}"),
                None,
            )
            .await?
        }
    };
    println!(
        "node {} ({}), leader {}, term {}, applied {}",
        status["node_id"],
        status["role"].as_str().unwrap_or("?"),
        status["leader"],
        status["term"],
        status["applied_index"]
    );
    println!(
        "{:>6} {:<10} {:<28} {:>12} {:>8}",
        "NODE", "ROLE", "ADDRESS", "MATCH", "LAG"
    );
    for n in status["nodes"].as_array().into_iter().flatten() {
        let or_dash = |v: &Value| v.as_u64().map_or("-".to_owned(), |x| x.to_string());
        println!(
            "{:>6} {:<10} {:<28} {:>12} {:>8}",
            n["id"],
            n["role"].as_str().unwrap_or("?"),
            n["address"].as_str().unwrap_or("?"),
            or_dash(&n["match_index"]),
            or_dash(&n["lag"])
        );
    }
    Ok(())
}

/// `tributary devices …`.
pub async fn devices(url: &str, admin_token: Option<String>, op: DevicesOp) -> anyhow::Result<()> {
    use reqwest::Method;
    let Some(admin_token) = admin_token else {
        bail!("the device admin API needs the node's auth.admin_token: pass --admin-token or set TRIBUTARY_ADMIN_TOKEN");
    };
    let api = ApiClient::new(url)?.with_token(Some(admin_token));
    let show_token = |answer: &Value| -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(answer)?);
        eprintln!("Store the token now: the node keeps only its hash and cannot show it again.");
        Ok(())
    };
    match op {
        DevicesOp::Add {
            id,
            name,
            publish,
            subscribe,
            rate_limit,
        } => {
            let mut body = json!({ "id": id, "publish": publish, "subscribe": subscribe });
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(r) = rate_limit {
                body["rate_limit"] = json!(r);
            }
            show_token(&api.post("/v1/devices", &body).await?)?;
        }
        DevicesOp::List => {
            let all = api.get("/v1/devices").await?;
            println!(
                "{:<24} {:<8} {:<28} {:<28} {:>8} LAST SEEN (ms since epoch)",
                "DEVICE", "ENABLED", "PUBLISH", "SUBSCRIBE", "RATE/S"
            );
            for d in all["devices"].as_array().into_iter().flatten() {
                let list = |k: &str| {
                    d[k].as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default()
                };
                println!(
                    "{:<24} {:<8} {:<28} {:<28} {:>8} {}",
                    d["id"].as_str().unwrap_or("?"),
                    d["enabled"].as_bool().unwrap_or(false),
                    list("publish"),
                    list("subscribe"),
                    d["rate_limit"]
                        .as_u64()
                        .map_or("-".into(), |r| r.to_string()),
                    d["last_seen_ms"]
                        .as_u64()
                        .map_or("never".into(), |t| t.to_string()),
                );
            }
        }
        DevicesOp::Remove { id } => {
            api.call(Method::DELETE, &format!("/v1/devices/{id}"), None)
                .await?;
            eprintln!("device {id} removed");
        }
        DevicesOp::Rotate { id } => {
            show_token(
                &api.post(&format!("/v1/devices/{id}/rotate"), &json!({}))
                    .await?,
            )?;
        }
        DevicesOp::Disable { id } => {
            let d = api
                .call(
                    Method::PATCH,
                    &format!("/v1/devices/{id}"),
                    Some(&json!({"enabled": false})),
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&d)?);
        }
        DevicesOp::Enable { id } => {
            let d = api
                .call(
                    Method::PATCH,
                    &format!("/v1/devices/{id}"),
                    Some(&json!({"enabled": true})),
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&d)?);
        }
    }
    Ok(())
}

/// `tributary topics …`.
pub async fn topics(url: &str, op: TopicsOp) -> anyhow::Result<()> {
    let api = ApiClient::new(url)?;
    match op {
        TopicsOp::Create {
            name,
            partitions,
            retention_ms,
            retention_bytes,
            max_event_bytes,
            compaction,
        } => {
            let mut body = json!({ "name": name });
            compaction.fill(&mut body);
            for (k, v) in [
                ("partitions", partitions.map(u64::from)),
                ("retention_ms", retention_ms),
                ("retention_bytes", retention_bytes),
                ("max_event_bytes", max_event_bytes.map(|v| v as u64)),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            let t = api.post("/v1/topics", &body).await?;
            println!("{}", serde_json::to_string_pretty(&t)?);
        }
        TopicsOp::List => {
            let all = api.get("/v1/topics").await?;
            println!(
                "{:<40} {:>10} {:>14} {:>14}",
                "TOPIC", "PARTITIONS", "EVENTS", "BYTES"
            );
            for t in all["topics"].as_array().into_iter().flatten() {
                let parts = t["partitions"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let events: u64 = parts
                    .iter()
                    .map(|p| {
                        p["end_offset"].as_u64().unwrap_or(0)
                            - p["start_offset"].as_u64().unwrap_or(0)
                    })
                    .sum();
                let bytes: u64 = parts.iter().map(|p| p["bytes"].as_u64().unwrap_or(0)).sum();
                println!(
                    "{:<40} {:>10} {:>14} {:>14}",
                    t["name"].as_str().unwrap_or("?"),
                    parts.len(),
                    events,
                    bytes
                );
            }
        }
        TopicsOp::Describe { name } => {
            let t = api.get(&format!("/v1/topics/{}", segment(&name))).await?;
            println!("{}", serde_json::to_string_pretty(&t)?);
        }
        TopicsOp::Delete { name } => {
            let path = format!("/v1/topics/{}", segment(&name));
            api.call(reqwest::Method::DELETE, &path, None).await?;
            println!("topic {name} deleted");
        }
        TopicsOp::Alter {
            name,
            partitions,
            retention_ms,
            retention_bytes,
            max_event_bytes,
            on_full,
            compaction,
        } => {
            let mut body = json!({});
            compaction.fill(&mut body);
            if let Some(p) = partitions {
                body["partitions"] = json!(p);
            }
            if let Some(Limit(v)) = retention_ms {
                body["retention_ms"] = json!(v);
            }
            if let Some(Limit(v)) = retention_bytes {
                body["retention_bytes"] = json!(v);
            }
            if let Some(v) = max_event_bytes {
                body["max_event_bytes"] = json!(v);
            }
            if let Some(v) = on_full {
                body["on_full"] = json!(v);
            }
            if body.as_object().is_some_and(|o| o.is_empty()) {
                bail!("nothing to change: give --partitions, --retention-ms, --retention-bytes, --max-event-bytes, --on-full or a compaction setting");
            }
            let path = format!("/v1/topics/{}", segment(&name));
            let t = api.call(reqwest::Method::PATCH, &path, Some(&body)).await?;
            println!("{}", serde_json::to_string_pretty(&t)?);
        }
    }
    Ok(())
}

/// A path segment with everything but unreserved characters percent-encoded.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `tributary connectors …`.
pub async fn connectors(
    url: &str,
    admin_token: Option<String>,
    op: ConnectorsOp,
) -> anyhow::Result<()> {
    use reqwest::Method;
    let api = ApiClient::new(url)?.with_token(admin_token);
    let one = |name: &str, what: &str| {
        let base = format!("/v1/connectors/{}", segment(name));
        if what.is_empty() {
            base
        } else {
            format!("{base}/{what}")
        }
    };
    let answer = match op {
        ConnectorsOp::List => {
            let all = api.get("/v1/connectors").await?;
            println!(
                "{:<30} {:<12} {:<8} {:>12} {:>10} {:>8}  LAST ERROR",
                "CONNECTOR", "KIND", "STATE", "DELIVERED", "LAG", "DEAD"
            );
            for c in all["connectors"].as_array().into_iter().flatten() {
                println!(
                    "{:<30} {:<12} {:<8} {:>12} {:>10} {:>8}  {}",
                    c["name"].as_str().unwrap_or("?"),
                    c["kind"].as_str().unwrap_or("?"),
                    c["state"].as_str().unwrap_or("?"),
                    c["delivered_records"].as_u64().unwrap_or(0),
                    c["lag_records"].as_u64().unwrap_or(0),
                    c["dead_letters"].as_u64().unwrap_or(0),
                    c["last_error"].as_str().unwrap_or("")
                );
            }
            return Ok(());
        }
        ConnectorsOp::Create { file } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("reading stdin")?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let body: Value = serde_json::from_str(&text).context("the connector is not JSON")?;
            api.post("/v1/connectors", &body).await?
        }
        ConnectorsOp::Describe { name } => api.get(&one(&name, "")).await?,
        ConnectorsOp::Delete { name } => {
            api.call(Method::DELETE, &one(&name, ""), None).await?;
            println!("deleted {name}");
            return Ok(());
        }
        ConnectorsOp::Pause { name } => api.call(Method::POST, &one(&name, "pause"), None).await?,
        ConnectorsOp::Resume { name } => {
            api.call(Method::POST, &one(&name, "resume"), None).await?
        }
        ConnectorsOp::Restart { name } => {
            api.call(Method::POST, &one(&name, "restart"), None).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// `tributary pipelines …`.
pub async fn pipelines(
    url: &str,
    admin_token: Option<String>,
    op: PipelinesOp,
) -> anyhow::Result<()> {
    use reqwest::Method;
    let api = ApiClient::new(url)?.with_token(admin_token);
    let one = |name: &str, what: &str| {
        let base = format!("/v1/pipelines/{}", segment(name));
        if what.is_empty() {
            base
        } else {
            format!("{base}/{what}")
        }
    };
    let answer = match op {
        PipelinesOp::List => {
            let all = api.get("/v1/pipelines").await?;
            println!(
                "{:<24} {:<8} {:>12} {:>12} {:>8} {:>8} {:>10}  LAST ERROR",
                "PIPELINE", "STATE", "ROWS IN", "ROWS OUT", "LATE", "ERRORS", "LAG"
            );
            for p in all["pipelines"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:<8} {:>12} {:>12} {:>8} {:>8} {:>10}  {}",
                    p["name"].as_str().unwrap_or("?"),
                    p["state"].as_str().unwrap_or("?"),
                    p["rows_in"].as_u64().unwrap_or(0),
                    p["rows_out"].as_u64().unwrap_or(0),
                    p["late"].as_u64().unwrap_or(0),
                    p["errors"].as_u64().unwrap_or(0),
                    p["lag"].as_u64().unwrap_or(0),
                    p["last_error"].as_str().unwrap_or("")
                );
            }
            return Ok(());
        }
        PipelinesOp::Create { name, sql, paused } => {
            let sql = if sql == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("reading stdin")?;
                s
            } else {
                sql
            };
            let body = serde_json::json!({"name": name, "sql": sql, "paused": paused});
            api.post("/v1/pipelines", &body).await?
        }
        PipelinesOp::Describe { name } => api.get(&one(&name, "")).await?,
        PipelinesOp::Delete { name } => {
            api.call(Method::DELETE, &one(&name, ""), None).await?;
            println!("deleted {name}");
            return Ok(());
        }
        PipelinesOp::Pause { name } => api.call(Method::POST, &one(&name, "pause"), None).await?,
        PipelinesOp::Resume { name } => api.call(Method::POST, &one(&name, "resume"), None).await?,
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// `tributary groups …`.
pub async fn groups(url: &str, op: GroupsOp) -> anyhow::Result<()> {
    let api = ApiClient::new(url)?;
    match op {
        GroupsOp::List => {
            let all = api.get("/v1/groups").await?;
            println!(
                "{:<40} {:<20} {:>8} {:>12}",
                "GROUP", "STATE", "MEMBERS", "LAG"
            );
            for g in all["groups"].as_array().into_iter().flatten() {
                println!(
                    "{:<40} {:<20} {:>8} {:>12}",
                    g["group"].as_str().unwrap_or("?"),
                    g["state"].as_str().unwrap_or("?"),
                    g["members"].as_u64().unwrap_or(0),
                    g["lag"].as_u64().unwrap_or(0)
                );
            }
        }
        GroupsOp::Describe { name } => {
            let g = api.get(&format!("/v1/groups/{}", segment(&name))).await?;
            println!(
                "group {}  state {}  protocol {}  generation {}",
                g["group"].as_str().unwrap_or("?"),
                g["state"].as_str().unwrap_or("?"),
                g["protocol"].as_str().unwrap_or(""),
                g["generation"].as_i64().unwrap_or(0)
            );
            println!("\n{:<50} {:<24} PARTITIONS", "MEMBER", "HOST");
            for m in g["members"].as_array().into_iter().flatten() {
                let parts: Vec<String> = m["assignment"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        let ps: Vec<String> = a["partitions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|p| p.to_string())
                            .collect();
                        format!("{}[{}]", a["topic"].as_str().unwrap_or("?"), ps.join(","))
                    })
                    .collect();
                println!(
                    "{:<50} {:<24} {}",
                    m["member_id"].as_str().unwrap_or("?"),
                    m["client_host"].as_str().unwrap_or(""),
                    parts.join(" ")
                );
            }
            println!(
                "\n{:<40} {:>9} {:>14} {:>14} {:>12}",
                "TOPIC", "PARTITION", "COMMITTED", "END", "LAG"
            );
            for o in g["offsets"].as_array().into_iter().flatten() {
                println!(
                    "{:<40} {:>9} {:>14} {:>14} {:>12}",
                    o["topic"].as_str().unwrap_or("?"),
                    o["partition"].as_u64().unwrap_or(0),
                    o["offset"].as_u64().unwrap_or(0),
                    o["end"].as_u64().unwrap_or(0),
                    o["lag"].as_u64().unwrap_or(0)
                );
            }
        }
    }
    Ok(())
}

/// `tributary produce TOPIC`: each stdin line (without its newline) becomes one
/// event's value, byte for byte.
pub async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let api = ApiClient::new(&args.url)?;
    let (tx, mut rx) = mpsc::channel::<Vec<Vec<u8>>>(4);
    let batch = args.batch;
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let stdin = std::io::stdin();
        let mut lines = Vec::with_capacity(batch);
        for line in stdin.lock().split(b'\n') {
            let mut line = line.context("reading stdin")?;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            lines.push(line);
            if lines.len() == batch && tx.blocking_send(std::mem::take(&mut lines)).is_err() {
                return Ok(());
            }
        }
        if !lines.is_empty() {
            let _ = tx.blocking_send(lines);
        }
        Ok(())
    });
    let path = format!("/v1/topics/{}/records", args.topic);
    let mut total = 0usize;
    while let Some(lines) = rx.recv().await {
        let records: Vec<Value> = lines
            .iter()
            .map(|l| {
                let mut r = json!({ "value": B64.encode(l), "encoding": "base64" });
                if let Some(k) = &args.key {
                    r["key"] = json!(B64.encode(k));
                }
                if let Some(p) = args.partition {
                    r["partition"] = json!(p);
                }
                r
            })
            .collect();
        let answer = api.post(&path, &json!({ "records": records })).await?;
        total += answer["offsets"].as_array().map_or(0, Vec::len);
    }
    reader.await??;
    eprintln!("produced {total} record(s) to {}", args.topic);
    Ok(())
}

/// `tributary tail TOPIC`: records of every partition (or one) as JSON lines.
/// Without `--follow` it stops at the end offsets seen when it started.
pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
    if !matches!(args.format.as_str(), "json" | "binary") {
        bail!("--format must be json or binary");
    }
    let api = ApiClient::new(&args.url)?;
    let topic = api.get(&format!("/v1/topics/{}", args.topic)).await?;
    let parts: Vec<(u32, u64, u64)> = topic["partitions"]
        .as_array()
        .ok_or_else(|| anyhow!("unexpected topic description"))?
        .iter()
        .filter_map(|p| {
            Some((
                p["partition"].as_u64()? as u32,
                p["start_offset"].as_u64()?,
                p["end_offset"].as_u64()?,
            ))
        })
        .filter(|(p, _, _)| args.partition.is_none_or(|want| want == *p))
        .collect();
    if parts.is_empty() {
        bail!("topic {} has no partition {:?}", args.topic, args.partition);
    }
    let (tx, mut rx) = mpsc::channel::<String>(1024);
    let mut tasks = Vec::new();
    for (partition, start, end) in parts {
        let from = match args.from.as_str() {
            "earliest" => start,
            "latest" => end,
            n => n
                .parse()
                .map_err(|_| anyhow!("--from must be earliest, latest or an offset, got {n}"))?,
        };
        let (api, tx, topic, format, follow) = (
            api.clone(),
            tx.clone(),
            args.topic.clone(),
            args.format.clone(),
            args.follow,
        );
        tasks.push(tokio::spawn(async move {
            let mut offset = from;
            loop {
                if !follow && offset >= end {
                    return Ok::<_, anyhow::Error>(());
                }
                let wait = if follow { 10_000 } else { 0 };
                let page = api
                    .get(&format!(
                        "/v1/topics/{topic}/partitions/{partition}/records?offset={offset}&limit=1000&wait_ms={wait}&format={format}"
                    ))
                    .await?;
                for r in page["records"].as_array().into_iter().flatten() {
                    if !follow && r["offset"].as_u64().unwrap_or(u64::MAX) >= end {
                        return Ok(());
                    }
                    if tx.send(r.to_string()).await.is_err() {
                        return Ok(());
                    }
                }
                offset = page["next_offset"].as_u64().ok_or_else(|| anyhow!("answer without next_offset"))?;
            }
        }));
    }
    drop(tx);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    while let Some(line) = rx.recv().await {
        if writeln!(out, "{line}").is_err() {
            break; // stdout closed (e.g. piped into head)
        }
    }
    let _ = out.flush();
    drop(out);
    for t in tasks {
        t.await??;
    }
    Ok(())
}
