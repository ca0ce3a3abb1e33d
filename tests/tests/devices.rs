//! Device identity on every protocol (issue: devices, ACLs, TLS). One node in
//! `auth.mode = "devices"`, devices made through the admin API, and each
//! protocol driven by a client we did not write (rumqttc v3.1.1 and v5, lapin,
//! reqwest, tokio-tungstenite) through the same cases: no credentials, wrong
//! credentials, right credentials, an ACL-denied topic, a disabled device and
//! a rotated token. Each expects the protocol's own refusal.

mod common;

use std::time::{Duration, Instant};

use common::{client, InProcessNode};
use futures_util::{SinkExt, StreamExt};
use lapin::{Connection, ConnectionProperties};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ADMIN: &str = "admin-token-for-the-tests-0123";

/// Tokens of the fleet: `good` may publish and read `sensors/#`; `off` is
/// disabled; `rot` had its token rotated (`rot_old` no longer works).
struct Fleet {
    good: String,
    off: String,
    rot_old: String,
    rot_new: String,
}

async fn node() -> InProcessNode {
    InProcessNode::start(&format!(
        r#"
[auth]
mode = "devices"
admin_token = "{ADMIN}"

[[topics]]
name = "sensors"
partitions = 1

[[topics]]
name = "private"
partitions = 1
"#
    ))
    .await
}

async fn admin(method: reqwest::Method, url: &str, body: Option<Value>) -> (u16, Value) {
    call(ADMIN, method, url, body).await
}

/// A request with `token` as bearer: (status, JSON body or null).
async fn call(
    token: &str,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = client().request(method, url).bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The `name`s of a `topics` list.
fn topic_names(v: &Value) -> Vec<&str> {
    v["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect()
}

async fn add(base: &str, id: &str) -> String {
    let (s, b) = admin(
        reqwest::Method::POST,
        &format!("{base}/v1/devices"),
        Some(json!({"id": id, "publish": ["sensors/#"], "subscribe": ["sensors/#"]})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["device"]["id"], id);
    b["token"].as_str().expect("token").to_owned()
}

/// Adds device `id` with these ACL patterns; returns its token.
async fn add_acl(base: &str, id: &str, publish: &[&str], subscribe: &[&str]) -> String {
    let (s, b) = admin(
        reqwest::Method::POST,
        &format!("{base}/v1/devices"),
        Some(json!({"id": id, "publish": publish, "subscribe": subscribe})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    b["token"].as_str().expect("token").to_owned()
}

/// Sets device `id`'s ACL patterns (`"publish"` or `"subscribe"`), asserting 200.
async fn patch_acl(base: &str, id: &str, field: &str, patterns: &[&str]) {
    let (s, b) = admin(
        reqwest::Method::PATCH,
        &format!("{base}/v1/devices/{id}"),
        Some(json!({ field: patterns })),
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

/// Waits (bounded) until `/metrics` counts `reason` among the MQTT rejections.
async fn mqtt_rejected(base: &str, reason: &str) {
    let line = format!("tributary_mqtt_rejections_total{{reason=\"{reason}\"}} ");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = common::metrics_text(base, Some(ADMIN)).await;
        if text.lines().any(|l| l.starts_with(&line)) {
            return;
        }
        assert!(Instant::now() < deadline, "no {reason} rejection counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn provision(base: &str) -> Fleet {
    let good = add(base, "good").await;
    let off = add(base, "off").await;
    let (s, b) = admin(
        reqwest::Method::PATCH,
        &format!("{base}/v1/devices/off"),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!((s, &b["enabled"]), (200, &json!(false)), "{b}");
    let rot_old = add(base, "rot").await;
    let (s, b) = admin(
        reqwest::Method::POST,
        &format!("{base}/v1/devices/rot/rotate"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let rot_new = b["token"].as_str().expect("token").to_owned();
    assert_ne!(rot_new, rot_old);
    Fleet {
        good,
        off,
        rot_old,
        rot_new,
    }
}

async fn stored(base: &str, topic: &str) -> Vec<String> {
    let (s, b) = admin(
        reqwest::Method::GET,
        &format!("{base}/v1/topics/{topic}/partitions/0/records?limit=1000"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    b["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            r["value"]
                .as_str()
                .map_or_else(|| r["value"].to_string(), str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_guards_itself_and_never_shows_hashes() {
    let node = node().await;
    let c = client();
    let url = format!("{}/v1/devices", node.url);
    assert_eq!(c.get(&url).send().await.expect("get").status(), 401);
    let wrong = c
        .get(&url)
        .bearer_auth("not-the-admin-token")
        .send()
        .await
        .expect("get");
    assert_eq!(wrong.status(), 401);
    let fleet = provision(&node.url).await;
    // A device token is not an admin token.
    let as_device = c
        .get(&url)
        .bearer_auth(&fleet.good)
        .send()
        .await
        .expect("get");
    assert_eq!(as_device.status(), 401);
    let (s, list) = admin(reqwest::Method::GET, &url, None).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = list["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["good", "off", "rot"]);
    let text = list.to_string();
    assert!(
        !text.contains("token_hash") && !text.contains(&fleet.good),
        "{text}"
    );
    // Bad input gets a clear error.
    let (s, b) = admin(reqwest::Method::POST, &url, Some(json!({"id": "good"}))).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("device_exists"))
    );
    let (s, b) = admin(
        reqwest::Method::POST,
        &url,
        Some(json!({"id": "x", "publish": ["a/#/b"]})),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    let (s, _) = admin(reqwest::Method::POST, &url, Some(json!({"id": "admin"}))).await;
    assert_eq!(s, 400);
    let (s, b) = admin(reqwest::Method::DELETE, &format!("{url}/nobody"), None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("unknown_device"))
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refusals_and_acls() {
    let node = node().await;
    let fleet = provision(&node.url).await;
    let c = client();
    let produce = |topic: &str| format!("{}/v1/topics/{topic}/records", node.url);
    let body = |v: &str| json!({"records": [{"key": "t1/temp", "value": v}]});
    let send = |req: reqwest::RequestBuilder, v: &str| req.json(&body(v)).send();

    let none = send(c.post(produce("sensors")), "none")
        .await
        .expect("send");
    assert_eq!(none.status(), 401);
    assert!(none.headers().contains_key("www-authenticate"));
    let err: Value = none.json().await.expect("json");
    assert_eq!(err["error"]["code"], "unauthorized");
    // (topic, credentials, value) → status and error code.
    let bearer = |t: &str| ("sensors", Some(("", t.to_owned())));
    let cases = [
        ("wrong", bearer("trb_wrong"), 401, Some("unauthorized")),
        ("right", bearer(&fleet.good), 200, None),
        // Basic with the device id and token works too.
        (
            "basic",
            ("sensors", Some(("good", fleet.good.clone()))),
            200,
            None,
        ),
        (
            "denied",
            ("private", Some(("", fleet.good.clone()))),
            403,
            Some("forbidden"),
        ),
        ("disabled", bearer(&fleet.off), 403, Some("forbidden")),
        ("rotated", bearer(&fleet.rot_old), 401, Some("unauthorized")),
        ("fresh", bearer(&fleet.rot_new), 200, None),
    ];
    for (value, (topic, creds), status, code) in cases {
        let mut req = c.post(produce(topic));
        req = match creds {
            Some(("", token)) => req.bearer_auth(token),
            Some((user, token)) => req.basic_auth(user, Some(token)),
            None => req,
        };
        let r = send(req, value).await.expect("send");
        assert_eq!(r.status(), status, "{value}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"].as_str(), code, "{value}: {body}");
    }
    // Reading needs the subscribe right over the whole topic.
    let read = |t: &str| format!("{}/v1/topics/{t}/partitions/0/records", node.url);
    assert_eq!(
        c.get(read("sensors"))
            .bearer_auth(&fleet.good)
            .send()
            .await
            .expect("get")
            .status(),
        200
    );
    assert_eq!(
        c.get(read("private"))
            .bearer_auth(&fleet.good)
            .send()
            .await
            .expect("get")
            .status(),
        403
    );
    assert_eq!(
        c.get(read("sensors")).send().await.expect("get").status(),
        401
    );
    // Public routes stay public.
    assert_eq!(
        c.get(format!("{}/health", node.url))
            .send()
            .await
            .expect("get")
            .status(),
        200
    );
    assert_eq!(
        stored(&node.url, "sensors").await,
        ["right", "basic", "fresh"]
    );
    assert!(stored(&node.url, "private").await.is_empty());
    node.stop().await;
}

async fn ws_connect(
    url: &str,
    bearer: Option<&str>,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = url.into_client_request().expect("request");
    if let Some(t) = bearer {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    ws
}

/// The close code the server ends with (after the upgrade).
async fn close_code<S>(ws: &mut S) -> Option<u16>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            other => {
                eprintln!("no close frame: {other:?}");
                return None;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_refusals_close_with_1008() {
    let node = node().await;
    let fleet = provision(&node.url).await;
    let ws_base = node.url.replace("http://", "ws://");
    let publish = format!("{ws_base}/v1/topics/sensors/publish");
    // Refused logins: the upgrade completes, then close 1008.
    for (token, what) in [
        (None, "none"),
        (Some("trb_wrong"), "wrong"),
        (Some(fleet.off.as_str()), "disabled"),
        (Some(fleet.rot_old.as_str()), "rotated"),
    ] {
        let mut ws = ws_connect(&publish, token).await;
        assert_eq!(close_code(&mut ws).await, Some(1008), "{what}");
    }
    // ?token= (what browsers use) works and stays out of the handler's query.
    let mut ws = ws_connect(&format!("{publish}?token={}", fleet.good), None).await;
    ws.send(Message::text(r#"{"key":"t1/temp","value":"ws-right"}"#))
        .await
        .expect("send");
    let answer = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("answer")
        .expect("message")
        .expect("ok");
    let answer: Value = serde_json::from_str(answer.to_text().expect("text")).expect("json");
    assert_eq!(answer["offset"], 0, "{answer}");
    drop(ws);
    // A record for a key outside the ACL closes with 1008.
    let (s, b) = admin(
        reqwest::Method::POST,
        &format!("{}/v1/devices", node.url),
        Some(json!({"id": "narrow", "publish": ["sensors/t1/#"]})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let narrow = b["token"].as_str().expect("token");
    let mut ws = ws_connect(&publish, Some(narrow)).await;
    ws.send(Message::text(r#"{"key":"t2/temp","value":"ws-denied"}"#))
        .await
        .expect("send");
    assert_eq!(close_code(&mut ws).await, Some(1008));
    // Live tail: header auth, and an ACL-denied topic.
    let mut live = ws_connect(
        &format!("{ws_base}/v1/topics/sensors/live?from=earliest"),
        Some(&fleet.rot_new),
    )
    .await;
    let first = tokio::time::timeout(Duration::from_secs(20), live.next())
        .await
        .expect("record")
        .expect("message")
        .expect("ok");
    assert!(
        first.to_text().expect("text").contains("ws-right"),
        "{first:?}"
    );
    let mut denied = ws_connect(
        &format!("{ws_base}/v1/topics/private/live?token={}", fleet.good),
        None,
    )
    .await;
    assert_eq!(close_code(&mut denied).await, Some(1008));
    assert_eq!(stored(&node.url, "sensors").await, ["ws-right"]);
    node.stop().await;
}

fn mqtt_v4(
    node: &InProcessNode,
    id: &str,
    user: Option<(&str, &str)>,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    mqtt_v4_with(node, id, user, |_| {})
}

/// Like [`mqtt_v4`], with more options set by `f` (a will, say).
fn mqtt_v4_with(
    node: &InProcessNode,
    id: &str,
    user: Option<(&str, &str)>,
    f: impl FnOnce(&mut rumqttc::MqttOptions),
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", node.mqtt.port());
    o.set_keep_alive(Duration::from_secs(30));
    if let Some((u, p)) = user {
        o.set_credentials(u, p);
    }
    f(&mut o);
    rumqttc::AsyncClient::new(o, 10)
}

/// Polls until CONNACK; panics if the connection ends first.
async fn connack(el: &mut rumqttc::EventLoop, what: &str) {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("answer in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return,
            Ok(_) => {}
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Polls until a PUBACK; panics with `what` if the connection ends first.
async fn puback(el: &mut rumqttc::EventLoop, what: &str) {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("answer in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return,
            Ok(_) => {}
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Polls until the connection ends; returns why.
async fn ended(el: &mut rumqttc::EventLoop) -> rumqttc::ConnectionError {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("the connection ends in time")
        {
            Ok(_) => {}
            Err(e) => return e,
        }
    }
}

/// The CONNACK outcome of a v3.1.1 login.
async fn v4_connack(
    node: &InProcessNode,
    user: Option<(&str, &str)>,
) -> Result<(), rumqttc::ConnectReturnCode> {
    let (_c, mut el) = mqtt_v4(node, "v4-login", user);
    loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("answer in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return Ok(()),
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Err(code),
            Err(e) => panic!("unexpected MQTT error: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_v311_refusals() {
    use rumqttc::ConnectReturnCode as Code;
    let node = node().await;
    let fleet = provision(&node.url).await;
    assert_eq!(
        v4_connack(&node, None).await,
        Err(Code::BadUserNamePassword)
    );
    assert_eq!(
        v4_connack(&node, Some(("good", "trb_wrong"))).await,
        Err(Code::BadUserNamePassword)
    );
    assert_eq!(
        v4_connack(&node, Some(("off", &fleet.off))).await,
        Err(Code::NotAuthorized)
    );
    assert_eq!(
        v4_connack(&node, Some(("rot", &fleet.rot_old))).await,
        Err(Code::BadUserNamePassword)
    );
    assert_eq!(
        v4_connack(&node, Some(("rot", &fleet.rot_new))).await,
        Ok(())
    );

    // Right credentials publish; an ACL-denied publish closes the connection (3.1.1 has no code).
    let (c, mut el) = mqtt_v4(&node, "v4-good", Some(("good", &fleet.good)));
    c.publish(
        "sensors/t1/temp",
        rumqttc::QoS::AtLeastOnce,
        false,
        "mqtt-right",
    )
    .await
    .expect("queue");
    let mut acked = 0;
    while acked == 0 {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("answer in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("ended before the allowed publish was acknowledged: {e}"),
        }
    }
    c.publish("private/x", rumqttc::QoS::AtLeastOnce, false, "mqtt-denied")
        .await
        .expect("queue");
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("answer in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert_eq!(
        acked, 1,
        "only the allowed publish is acknowledged ({ended})"
    );
    assert_eq!(stored(&node.url, "sensors").await, ["mqtt-right"]);
    assert!(stored(&node.url, "private").await.is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_v5_refusals() {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code, Packet, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
    let node = node().await;
    let fleet = provision(&node.url).await;
    let login = |user: Option<(String, String)>| {
        let port = node.mqtt.port();
        async move {
            let mut o = MqttOptions::new("v5-login", "127.0.0.1", port);
            if let Some((u, p)) = user {
                o.set_credentials(u, p);
            }
            let (c, mut el) = AsyncClient::new(o, 10);
            let outcome = loop {
                match tokio::time::timeout(Duration::from_secs(20), el.poll())
                    .await
                    .expect("answer in time")
                {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => break Ok(()),
                    Ok(_) => {}
                    Err(ConnectionError::ConnectionRefused(code)) => break Err(code),
                    Err(e) => panic!("unexpected MQTT error: {e}"),
                }
            };
            (c, el, outcome)
        }
    };
    let creds = |u: &str, p: &str| Some((u.to_owned(), p.to_owned()));
    assert_eq!(login(None).await.2, Err(Code::BadUserNamePassword));
    assert_eq!(
        login(creds("good", "trb_wrong")).await.2,
        Err(Code::BadUserNamePassword)
    );
    assert_eq!(
        login(creds("off", &fleet.off)).await.2,
        Err(Code::NotAuthorized)
    );
    assert_eq!(
        login(creds("rot", &fleet.rot_old)).await.2,
        Err(Code::BadUserNamePassword)
    );
    let (c, mut el, ok) = login(creds("good", &fleet.good)).await;
    assert_eq!(ok, Ok(()));
    // v5: a denied publish gets PUBACK 0x87 and the connection lives on.
    c.publish("private/x", QoS::AtLeastOnce, false, "v5-denied")
        .await
        .expect("queue");
    c.publish("sensors/t1/temp", QoS::AtLeastOnce, false, "v5-right")
        .await
        .expect("queue");
    let mut reasons = Vec::new();
    while reasons.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("answer in time")
        {
            Ok(Event::Incoming(Packet::PubAck(a))) => reasons.push(a.reason),
            Ok(_) => {}
            Err(e) => panic!("connection ended: {e}"),
        }
    }
    assert_eq!(
        reasons,
        [PubAckReason::NotAuthorized, PubAckReason::Success]
    );
    assert_eq!(stored(&node.url, "sensors").await, ["v5-right"]);
    node.stop().await;
}

async fn amqp_login(node: &InProcessNode, user: &str, pass: &str) -> Result<Connection, String> {
    let url = format!("amqp://{user}:{pass}@{}/%2f", node.amqp);
    tokio::time::timeout(
        Duration::from_secs(20),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    .expect("answer in time")
    .map_err(|e| format!("{e:?} {e}"))
}

fn is_403(text: &str) -> bool {
    text.contains("403") || text.contains("ACCESS_REFUSED") || text.contains("AccessRefused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_refusals() {
    let node = node().await;
    let fleet = provision(&node.url).await;
    for (user, pass, what) in [
        ("", "", "none"),
        ("good", "trb_wrong", "wrong"),
        ("off", fleet.off.as_str(), "disabled"),
        ("rot", fleet.rot_old.as_str(), "rotated"),
    ] {
        let err = amqp_login(&node, user, pass)
            .await
            .err()
            .unwrap_or_default();
        assert!(
            is_403(&err) || err.contains("AuthenticationFailure"),
            "{what}: {err}"
        );
    }
    assert!(amqp_login(&node, "rot", &fleet.rot_new).await.is_ok());
    let conn = amqp_login(&node, "good", &fleet.good)
        .await
        .expect("right credentials");
    let ch = common::confirm_channel(&conn).await;
    let acked = common::publish_confirmed(&ch, "sensors", "t1.temp", b"amqp-right").await;
    assert!(acked.expect("confirm"));
    // Denied: channel.close 403.
    let outcome = common::publish_confirmed(&ch, "private", "x", b"amqp-denied").await;
    let err = outcome.expect_err("denied publish");
    assert!(is_403(&format!("{err:?} {err}")), "{err}");
    assert_eq!(stored(&node.url, "sensors").await, ["amqp-right"]);
    assert!(stored(&node.url, "private").await.is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_device_cuts_its_open_session_rights_and_guessers_are_slowed() {
    let node = node().await;
    let fleet = provision(&node.url).await;
    let (c, mut el) = mqtt_v4(&node, "soon-off", Some(("good", &fleet.good)));
    c.publish("sensors/a", rumqttc::QoS::AtLeastOnce, false, "before")
        .await
        .expect("queue");
    loop {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) =
            tokio::time::timeout(Duration::from_secs(20), el.poll())
                .await
                .expect("answer")
        {
            break;
        }
    }
    let (s, _) = admin(
        reqwest::Method::PATCH,
        &format!("{}/v1/devices/good", node.url),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(s, 200);
    c.publish("sensors/a", rumqttc::QoS::AtLeastOnce, false, "after")
        .await
        .expect("queue");
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("answer")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                panic!("a disabled device was acknowledged")
            }
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(
        !matches!(ended, rumqttc::ConnectionError::ConnectionRefused(_)),
        "{ended}"
    );
    assert_eq!(stored(&node.url, "sensors").await, ["before"]);

    // Failed logins from one address are slowed down after a few.
    let c = client();
    let url = format!("{}/v1/topics", node.url);
    for _ in 0..6 {
        let r = c
            .get(&url)
            .bearer_auth("trb_guess")
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 401);
    }
    let started = Instant::now();
    let r = c
        .get(&url)
        .bearer_auth("trb_guess")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let metrics = common::metrics_text(&node.url, Some(ADMIN)).await;
    let delayed = common::metric(
        &node.url,
        "tributary_auth_delayed_logins_total",
        Some(ADMIN),
    )
    .await;
    assert!(delayed >= 3, "{delayed}");
    assert!(metrics
        .contains("tributary_auth_logins_total{protocol=\"http\",result=\"bad_credentials\"}"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_slow_streams_and_answer_429_over_http() {
    let node = node().await;
    let (s, b) = admin(
        reqwest::Method::POST,
        &format!("{}/v1/devices", node.url),
        Some(json!({"id": "slow", "publish": ["sensors/#"], "rate_limit": 20})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let token = b["token"].as_str().expect("token").to_owned();
    let c = client();
    let url = format!("{}/v1/topics/sensors/records", node.url);
    let records: Vec<Value> = (0..40).map(|i| json!({"value": i})).collect();
    // A burst over the limit passes once, then the device is in debt: 429.
    let first = c
        .post(&url)
        .bearer_auth(&token)
        .json(&json!({"records": records}))
        .send()
        .await
        .expect("post");
    assert_eq!(first.status(), 200);
    let second = c
        .post(&url)
        .bearer_auth(&token)
        .json(&json!({"records": [{"value": "x"}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(second.status(), 429);
    let retry: u64 = second.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry), "{retry}");
    // MQTT: reading pauses while the device is in debt. With at most 5
    // publishes in flight, 60 at 20/s take at least (60 - 5 - 20) / 20 s
    // (a lower bound only: a busy machine makes it longer, never shorter).
    let mut o = rumqttc::MqttOptions::new("slow-mqtt", "127.0.0.1", node.mqtt.port());
    o.set_credentials("slow", &token);
    o.set_inflight(5);
    let (mc, mut el) = rumqttc::AsyncClient::new(o, 10);
    let started = Instant::now();
    tokio::spawn(async move {
        for i in 0..60 {
            if mc
                .publish(
                    "sensors/slow",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!("{i}"),
                )
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    while acked < 60 {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) =
            tokio::time::timeout(Duration::from_secs(30), el.poll())
                .await
                .expect("answer")
        {
            acked += 1;
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_leaks_past_auth_and_devices_see_only_their_topics() {
    let node = node().await;
    let fleet = provision(&node.url).await;
    let c = client();
    // An Upgrade header does not let a plain request through unauthenticated.
    for path in [
        "/v1/stats",
        "/v1/topics",
        "/v1/topics/sensors",
        "/v1/groups/g/offsets",
        "/metrics",
    ] {
        let r = c
            .get(format!("{}{path}", node.url))
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 401, "{path}");
    }
    // `good` (sensors/#) sees sensors, not private.
    let get = |path: &str| {
        let url = format!("{}{path}", node.url);
        let token = fleet.good.clone();
        async move { call(&token, reqwest::Method::GET, &url, None).await }
    };
    let (s, b) = get("/v1/topics").await;
    assert_eq!((s, topic_names(&b)), (200, vec!["sensors"]));
    assert_eq!(get("/v1/topics/private").await.0, 403);
    let (s, b) = get("/v1/stats").await;
    assert_eq!((s, topic_names(&b)), (200, vec!["sensors"]));
    // /metrics names every topic: with device auth only the admin reads it.
    assert_eq!(get("/metrics").await.0, 401);
    let (s, _) = admin(reqwest::Method::GET, &format!("{}/metrics", node.url), None).await;
    assert_eq!(s, 200);
    // Consumer groups need an explicit `$groups/...` pattern.
    let commit = json!({"offsets": [{"topic": "sensors", "partition": 0, "offset": 0}]});
    let r = c
        .post(format!("{}/v1/groups/g1/offsets", node.url))
        .bearer_auth(&fleet.good)
        .json(&commit)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    let (s, b) = admin(
        reqwest::Method::PATCH,
        &format!("{}/v1/devices/good", node.url),
        Some(json!({"subscribe": ["sensors/#", "$groups/g1"]})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let r = c
        .post(format!("{}/v1/groups/g1/offsets", node.url))
        .bearer_auth(&fleet.good)
        .json(&commit)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{}/v1/groups/g2/offsets", node.url))
        .bearer_auth(&fleet.good)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 403);
    // A forged `mqtt.topic` header cannot aim a record at another device's topic.
    let forged = json!({"records": [{"key": "t1/temp", "value": "forged", "headers": {"mqtt.topic": "private/cmd"}}]});
    let r = c
        .post(format!("{}/v1/topics/sensors/records", node.url))
        .bearer_auth(&fleet.good)
        .json(&forged)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    assert!(stored(&node.url, "sensors").await.is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_belong_to_devices_and_disabled_devices_stop_receiving() {
    let node = node().await;
    let fleet = provision(&node.url).await;
    // `good` holds client id `shared`; `rot` logging in with the same id gets
    // its own session and does not kick `good`.
    let mut o = rumqttc::MqttOptions::new("shared", "127.0.0.1", node.mqtt.port());
    o.set_credentials("good", &fleet.good);
    o.set_clean_session(false);
    let (good, mut good_el) = rumqttc::AsyncClient::new(o, 10);
    loop {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) =
            tokio::time::timeout(Duration::from_secs(20), good_el.poll())
                .await
                .expect("connack")
        {
            break;
        }
    }
    let mut o = rumqttc::MqttOptions::new("shared", "127.0.0.1", node.mqtt.port());
    o.set_credentials("rot", &fleet.rot_new);
    o.set_clean_session(false);
    let (_rot, mut rot_el) = rumqttc::AsyncClient::new(o, 10);
    let present = loop {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) =
            tokio::time::timeout(Duration::from_secs(20), rot_el.poll())
                .await
                .expect("connack")
        {
            break a.session_present;
        }
    };
    assert!(!present, "another device's session was handed over");
    good.publish(
        "sensors/shared",
        rumqttc::QoS::AtLeastOnce,
        false,
        "still-mine",
    )
    .await
    .expect("queue");
    puback(&mut good_el, "good was kicked").await;
    // A live tail of a device that gets disabled is closed with 1008.
    let ws_base = node.url.replace("http://", "ws://");
    let mut live = ws_connect(
        &format!("{ws_base}/v1/topics/sensors/live?from=latest"),
        Some(&fleet.rot_new),
    )
    .await;
    let (s, _) = admin(
        reqwest::Method::PATCH,
        &format!("{}/v1/devices/rot", node.url),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(s, 200);
    good.publish(
        "sensors/shared",
        rumqttc::QoS::AtLeastOnce,
        false,
        "after-disable",
    )
    .await
    .expect("queue");
    // Sent and stored (the tail wakes on it), not only queued: else only
    // the tail's 20 s ping tick would notice, racing this test's 20 s wait.
    puback(&mut good_el, "after-disable").await;
    assert_eq!(close_code(&mut live).await, Some(1008));
    // A 3.1.1 QoS 0 publish to a denied topic closes the connection too.
    let (c, mut el) = mqtt_v4(&node, "qos0", Some(("good", &fleet.good)));
    c.publish("private/x", rumqttc::QoS::AtMostOnce, false, "denied-qos0")
        .await
        .expect("queue");
    let ended = ended(&mut el).await;
    assert!(
        !matches!(ended, rumqttc::ConnectionError::ConnectionRefused(_)),
        "{ended}"
    );
    assert!(stored(&node.url, "private").await.is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_or_a_disabled_device_ends_open_connections() {
    let node = node().await;
    let fleet = provision(&node.url).await;
    // MQTT with good's token; rotating it ends the connection.
    let (c, mut el) = mqtt_v4(&node, "rotating", Some(("good", &fleet.good)));
    c.publish(
        "sensors/r",
        rumqttc::QoS::AtLeastOnce,
        false,
        "before-rotate",
    )
    .await
    .expect("queue");
    puback(&mut el, "ended early").await;
    // AMQP with rot's token; disabling rot ends it (connection.close 320).
    let conn = amqp_login(&node, "rot", &fleet.rot_new)
        .await
        .expect("login");
    let ch = common::confirm_channel(&conn).await;
    let (s, b) = admin(
        reqwest::Method::POST,
        &format!("{}/v1/devices/good/rotate", node.url),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = admin(
        reqwest::Method::PATCH,
        &format!("{}/v1/devices/rot", node.url),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(s, 200);
    let ended = ended(&mut el).await;
    assert!(
        !matches!(ended, rumqttc::ConnectionError::ConnectionRefused(_)),
        "{ended}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while conn.status().connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the AMQP connection of a disabled device stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = common::publish_confirmed(&ch, "sensors", "r", b"after-disable").await;
    assert!(!matches!(after, Ok(true)), "{after:?}");
    assert_eq!(stored(&node.url, "sensors").await, ["before-rotate"]);
    node.stop().await;
}

/// Polls a v5 client until a PUBACK; returns its reason.
async fn puback5(el: &mut rumqttc::v5::EventLoop) -> rumqttc::v5::mqttbytes::v5::PubAckReason {
    use rumqttc::v5::mqttbytes::v5::Packet;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("answer in time")
        {
            Ok(rumqttc::v5::Event::Incoming(Packet::PubAck(a))) => return a.reason,
            Ok(_) => {}
            Err(e) => panic!("the publisher's connection ended: {e}"),
        }
    }
}

/// A will leaves with the connection, but it is checked against the device's
/// rights when it is published, not when it was handed over in CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_checked_against_the_acl_of_the_moment_it_is_published() {
    let node = node().await;
    let will = |topic: &str, payload: &'static str| {
        let w = rumqttc::LastWill::new(topic, payload, rumqttc::QoS::AtLeastOnce, false);
        move |o: &mut rumqttc::MqttOptions| {
            o.set_last_will(w);
        }
    };
    // dev-b may publish its will when it connects; the admin then narrows
    // its ACL past the will topic, and its socket goes away.
    let b = add_acl(&node.url, "dev-b", &["sensors/b/#"], &[]).await;
    let (b_client, mut b_el) = mqtt_v4_with(
        &node,
        "dev-b",
        Some(("dev-b", &b)),
        will("sensors/b/will", "b-will"),
    );
    connack(&mut b_el, "dev-b connects").await;
    patch_acl(&node.url, "dev-b", "publish", &["sensors/b/other"]).await;
    drop((b_client, b_el));
    mqtt_rejected(&node.url, "will_not_authorized").await;
    assert!(stored(&node.url, "sensors").await.is_empty());

    // Control: a narrowing that still covers the will topic keeps the will.
    let c = add_acl(&node.url, "dev-c", &["sensors/c/#"], &[]).await;
    let (c_client, mut c_el) = mqtt_v4_with(
        &node,
        "dev-c",
        Some(("dev-c", &c)),
        will("sensors/c/will", "c-will"),
    );
    connack(&mut c_el, "dev-c connects").await;
    patch_acl(&node.url, "dev-c", "publish", &["sensors/c/will"]).await;
    drop((c_client, c_el));
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored(&node.url, "sensors").await.is_empty() {
        assert!(Instant::now() < deadline, "the allowed will was not stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored(&node.url, "sensors").await, ["c-will"]);
    node.stop().await;
}

/// Publishes and deliveries follow the device's current ACL too: a narrowed
/// publish ACL refuses what the old one allowed, and a subscriber whose
/// subscribe ACL no longer covers its subscription gets nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_and_deliveries_follow_a_narrowed_acl() {
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, MqttOptions};
    let node = node().await;
    let pubber = add_acl(&node.url, "pubber", &["sensors/p/#"], &[]).await;
    let mut o = MqttOptions::new("pubber", "127.0.0.1", node.mqtt.port());
    o.set_credentials("pubber", &pubber);
    let (pc, mut pel) = AsyncClient::new(o, 10);
    pc.publish("sensors/p/1", QoS::AtLeastOnce, false, "before")
        .await
        .expect("queue");
    assert_eq!(puback5(&mut pel).await, PubAckReason::Success);
    patch_acl(&node.url, "pubber", "publish", &["sensors/p/other"]).await;
    pc.publish("sensors/p/1", QoS::AtLeastOnce, false, "after")
        .await
        .expect("queue");
    assert_eq!(puback5(&mut pel).await, PubAckReason::NotAuthorized);
    assert_eq!(stored(&node.url, "sensors").await, ["before"]);

    // A subscriber to sensors/#, narrowed to sensors/x/#: a record produced
    // after the change is not delivered, and the connection ends.
    let watcher = add_acl(&node.url, "watcher", &[], &["sensors/#"]).await;
    let (wc, mut wel) = mqtt_v4(&node, "watcher", Some(("watcher", &watcher)));
    wc.subscribe("sensors/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("queue");
    loop {
        match tokio::time::timeout(Duration::from_secs(20), wel.poll())
            .await
            .expect("answer in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("the subscriber's connection ended: {e}"),
        }
    }
    patch_acl(&node.url, "watcher", "subscribe", &["sensors/x/#"]).await;
    let (s, b) = admin(
        reqwest::Method::POST,
        &format!("{}/v1/topics/sensors/records", node.url),
        Some(json!({"records": [{"key": "y/1", "value": "not-for-watcher"}]})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    loop {
        match tokio::time::timeout(Duration::from_secs(20), wel.poll())
            .await
            .expect("the connection ends in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                panic!("delivered past a narrowed ACL: {p:?}")
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    node.stop().await;
}

/// A record naming `mqtt.topic` twice, an allowed topic first and a denied
/// one second, is refused as malformed (not stored with both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_mqtt_topic_header_is_refused() {
    let node = node().await;
    let fleet = provision(&node.url).await;
    let c = client();
    let twice = json!({"records": [{"key": "t1/temp", "value": "forged-twice", "headers": [
        {"key": "mqtt.topic", "value": "sensors/t1/temp"},
        {"key": "mqtt.topic", "value": "private/cmd"},
    ]}]});
    let r = c
        .post(format!("{}/v1/topics/sensors/records", node.url))
        .bearer_auth(&fleet.good)
        .json(&twice)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("mqtt.topic")),
        "{body}"
    );
    // The same refusal over a WebSocket publish: that record is answered
    // with an error and the others are stored.
    let ws_base = node.url.replace("http://", "ws://");
    let mut ws = ws_connect(
        &format!("{ws_base}/v1/topics/sensors/publish"),
        Some(&fleet.good),
    )
    .await;
    ws.send(Message::Text(twice["records"][0].to_string().into()))
        .await
        .expect("send");
    ws.send(Message::Text(
        json!({"key": "t1/temp", "value": "ws-ok", "headers": [{"key": "mqtt.topic", "value": "sensors/t1/temp"}]})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let mut answers = Vec::new();
    while answers.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("answer in time")
        {
            Some(Ok(Message::Text(t))) => {
                answers.push(serde_json::from_str::<Value>(t.as_str()).expect("json"))
            }
            Some(Ok(_)) => {}
            other => panic!("the publish socket ended: {other:?}"),
        }
    }
    assert_eq!(answers[0]["error"]["code"], "bad_request", "{answers:?}");
    assert!(answers[1]["offset"].is_u64(), "{answers:?}");
    assert_eq!(stored(&node.url, "sensors").await, ["ws-ok"]);
    node.stop().await;
}
