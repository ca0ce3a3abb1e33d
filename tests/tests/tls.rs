//! TLS on every listener (MQTT 8883, AMQP 5671, HTTPS 8443 with WSS): rustls
//! clients with the CA `tributary tls self-signed` wrote, mTLS with the device
//! identity taken from the client certificate, a certificate swapped on disk
//! served to the next connection while an open one keeps working, and bad
//! input on the TLS ports (plaintext, garbage, a foreign client certificate).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::{client, InProcessNode};
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4 as raw4;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

const ADMIN: &str = "admin-token-for-the-tls-tests";
const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    node: InProcessNode,
    dir: tempfile::TempDir,
    /// Token of device `good` (publishes and reads `sensors/#`).
    token: String,
}

impl Setup {
    fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }
    fn addr(&self, which: &str) -> SocketAddr {
        let r = self.node.running.as_ref().expect("running");
        match which {
            "https" => r.https_addr,
            "mqtts" => r.mqtts_addr,
            _ => r.amqps_addr,
        }
        .expect("TLS listener")
    }
}

/// A node in devices mode with TLS (client certificates optional), a device
/// `good`, and client certificates for `good` and for `ghost` (no such device).
async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    tributary_gateway::tls_cli::self_signed(&tls, &[], 30).expect("self-signed");
    for name in ["good", "ghost"] {
        tributary_gateway::tls_cli::client_cert(&tls, name, &tls, 30).expect("client cert");
    }
    let node = InProcessNode::start(&format!(
        r#"
[auth]
mode = "devices"
admin_token = "{ADMIN}"

[tls]
cert = "{t}/server.pem"
key = "{t}/server-key.pem"
client_ca = "{t}/ca.pem"
reload_check_ms = 100

[http]
tls_listen = "127.0.0.1:0"
[mqtt]
tls_listen = "127.0.0.1:0"
[amqp]
tls_listen = "127.0.0.1:0"
[kafka]
tls_listen = "127.0.0.1:0"

[[topics]]
name = "sensors"
partitions = 1
"#,
        t = tls.display()
    ))
    .await;
    let r = client()
        .post(format!("{}/v1/devices", node.url))
        .bearer_auth(ADMIN)
        .json(&json!({"id": "good", "publish": ["sensors/#"], "subscribe": ["sensors/#"]}))
        .send()
        .await
        .expect("add device");
    assert_eq!(r.status(), 201);
    let b: Value = r.json().await.expect("json");
    let token = b["token"].as_str().expect("token").to_owned();
    Setup { node, dir, token }
}

fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(c.expect("ca cert")).expect("add ca");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .expect("cert file")
                .map(|c| c.expect("cert"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    let mut s = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))??;
    // Under TLS 1.3 a refused client certificate shows only when reading.
    s.flush().await?;
    Ok(s)
}

fn mqtt_connect(id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut c = raw4::Connect::new(id);
    c.keep_alive = 30;
    if let Some((u, p)) = login {
        c.set_login(u, p);
    }
    let mut b = BytesMut::new();
    c.write(&mut b).expect("encode");
    b.to_vec()
}

fn mqtt_publish(topic: &str, pkid: u16, payload: &str) -> Vec<u8> {
    let mut p = raw4::Publish::new(topic, rumqttc::QoS::AtLeastOnce, payload);
    p.pkid = pkid;
    let mut b = BytesMut::new();
    p.write(&mut b).expect("encode");
    b.to_vec()
}

/// CONNACK's return code (0 accepted), or None if the server closed first.
async fn mqtt_login<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    login: Option<(&str, &str)>,
) -> Option<u8> {
    s.write_all(&mqtt_connect("tls-client", login)).await.ok()?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut ack))
        .await
        .ok()?
        .ok()?;
    assert_eq!(ack[0], 0x20, "CONNACK expected, got {ack:?}");
    Some(ack[3])
}

/// Publishes QoS 1 and waits for the PUBACK.
async fn mqtt_pub_acked<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    pkid: u16,
    payload: &str,
) -> bool {
    if s.write_all(&mqtt_publish("sensors/tls", pkid, payload))
        .await
        .is_err()
    {
        return false;
    }
    let mut ack = [0u8; 4];
    match tokio::time::timeout(WAIT, s.read_exact(&mut ack)).await {
        Ok(Ok(_)) => ack[0] == 0x40 && u16::from_be_bytes([ack[2], ack[3]]) == pkid,
        _ => false,
    }
}

async fn stored(base: &str) -> Vec<String> {
    let b: Value = client()
        .get(format!(
            "{base}/v1/topics/sensors/partitions/0/records?limit=1000"
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("fetch")
        .json()
        .await
        .expect("json");
    b["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["value"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_tokens_and_client_certificates() {
    let s = setup().await;
    let t = s.tls_dir();
    let ca = t.join("ca.pem");
    // Token over TLS.
    let mut c = tls_connect(s.addr("mqtts"), client_config(&ca, None))
        .await
        .expect("handshake");
    assert_eq!(
        mqtt_login(&mut c, Some(("good", "trb_wrong"))).await,
        Some(4)
    );
    let mut c = tls_connect(s.addr("mqtts"), client_config(&ca, None))
        .await
        .expect("handshake");
    assert_eq!(mqtt_login(&mut c, Some(("good", &s.token))).await, Some(0));
    assert!(mqtt_pub_acked(&mut c, 1, "by-token").await);
    // mTLS: the certificate names the device; no password needed.
    let cert = client_config(&ca, Some((&t.join("good.pem"), &t.join("good-key.pem"))));
    let mut c = tls_connect(s.addr("mqtts"), cert.clone())
        .await
        .expect("handshake");
    assert_eq!(mqtt_login(&mut c, None).await, Some(0));
    assert!(mqtt_pub_acked(&mut c, 1, "by-certificate").await);
    // A valid certificate of an unknown device, or claiming another user: refused.
    let ghost = client_config(&ca, Some((&t.join("ghost.pem"), &t.join("ghost-key.pem"))));
    let mut c = tls_connect(s.addr("mqtts"), ghost)
        .await
        .expect("handshake");
    assert_eq!(mqtt_login(&mut c, None).await, Some(4));
    let mut c = tls_connect(s.addr("mqtts"), cert).await.expect("handshake");
    assert_eq!(mqtt_login(&mut c, Some(("other", "x"))).await, Some(4));
    assert_eq!(stored(&s.node.url).await, ["by-token", "by-certificate"]);
    s.node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_wss_and_amqps() {
    let s = setup().await;
    let t = s.tls_dir();
    let ca = t.join("ca.pem");
    // HTTPS with a bearer token, then with a client certificate alone.
    let request = |auth: Option<&str>| {
        let auth = auth
            .map(|a| format!("Authorization: Bearer {a}\r\n"))
            .unwrap_or_default();
        let body = r#"{"records":[{"value":"over-https"}]}"#;
        format!(
            "POST /v1/topics/sensors/records HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    for (config, auth, want) in [
        (client_config(&ca, None), Some(s.token.as_str()), "200"),
        (client_config(&ca, None), None, "401"),
        (
            client_config(&ca, Some((&t.join("good.pem"), &t.join("good-key.pem")))),
            None,
            "200",
        ),
    ] {
        let mut c = tls_connect(s.addr("https"), config)
            .await
            .expect("handshake");
        c.write_all(request(auth).as_bytes())
            .await
            .expect("request");
        let mut answer = String::new();
        tokio::time::timeout(WAIT, c.read_to_string(&mut answer))
            .await
            .expect("answer")
            .ok();
        assert!(answer.starts_with(&format!("HTTP/1.1 {want}")), "{answer}");
    }
    // WSS live tail with the certificate identity.
    let cert = client_config(&ca, Some((&t.join("good.pem"), &t.join("good-key.pem"))));
    let stream = tls_connect(s.addr("https"), cert).await.expect("handshake");
    let url = format!(
        "wss://localhost:{}/v1/topics/sensors/live?from=earliest",
        s.addr("https").port()
    );
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("wss upgrade");
    let first = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("record")
        .expect("message")
        .expect("ok");
    assert!(
        first.to_text().expect("text").contains("over-https"),
        "{first:?}"
    );
    ws.send(Message::Close(None)).await.ok();
    // AMQPS through lapin (rustls) with PLAIN credentials.
    let uri = format!(
        "amqps://good:{}@localhost:{}/%2f",
        s.token,
        s.addr("amqps").port()
    );
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: Some(std::fs::read_to_string(&ca).expect("ca")),
    };
    amqps_publish(&uri, tls, b"over-amqps").await;
    // AMQPS with a client certificate and SASL EXTERNAL: no password at all.
    let uri = format!(
        "amqps://localhost:{}/%2f?auth_mechanism=external",
        s.addr("amqps").port()
    );
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: std::fs::read(t.join("good.pem")).expect("cert"),
            key: std::fs::read(t.join("good-key.pem")).expect("key"),
        }),
        cert_chain: Some(std::fs::read_to_string(&ca).expect("ca")),
    };
    amqps_publish(&uri, tls, b"over-amqps-external").await;
    // EXTERNAL without a certificate is refused (plain AMQP port).
    let plain = format!("amqp://{}/%2f?auth_mechanism=external", s.node.amqp);
    let refused = tokio::time::timeout(
        WAIT,
        lapin::Connection::connect(&plain, lapin::ConnectionProperties::default()),
    )
    .await
    .expect("in time");
    assert!(refused.is_err());
    assert_eq!(
        stored(&s.node.url).await,
        [
            "over-https",
            "over-https",
            "over-amqps",
            "over-amqps-external"
        ]
    );
    s.node.stop().await;
}

/// Logs in over AMQPS (lapin, rustls) and publishes `body` with a confirm.
async fn amqps_publish(uri: &str, tls: lapin::tcp::OwnedTLSConfig, body: &[u8]) {
    let conn = tokio::time::timeout(
        WAIT,
        lapin::Connection::connect_with_config(
            uri,
            lapin::ConnectionProperties::default(),
            tls,
            lapin::runtime::default_runtime().expect("runtime"),
        ),
    )
    .await
    .expect("in time")
    .expect("AMQPS login");
    let ch = common::confirm_channel(&conn).await;
    let acked = common::publish_confirmed(&ch, "sensors", "tls", body).await;
    assert!(acked.expect("confirm"));
}

fn peer_certificate(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().expect("certificates")[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_reaches_new_connections_and_open_ones_keep_working() {
    let s = setup().await;
    let t = s.tls_dir();
    let ca = t.join("ca.pem");
    let mut open = tls_connect(s.addr("mqtts"), client_config(&ca, None))
        .await
        .expect("handshake");
    assert_eq!(
        mqtt_login(&mut open, Some(("good", &s.token))).await,
        Some(0)
    );
    let before = peer_certificate(&open);
    // A new server certificate from another CA, written over the old files.
    let other = s.dir.path().join("other");
    tributary_gateway::tls_cli::self_signed(&other, &[], 30).expect("second CA");
    for f in ["server.pem", "server-key.pem"] {
        std::fs::copy(other.join(f), t.join(f)).expect("swap");
    }
    let other_ca = other.join("ca.pem");
    let deadline = tokio::time::Instant::now() + WAIT;
    let after = loop {
        match tls_connect(s.addr("mqtts"), client_config(&other_ca, None)).await {
            Ok(c) => break peer_certificate(&c),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the new certificate was never served: {e}"),
        }
    };
    assert_ne!(before, after);
    // The old CA no longer verifies new connections; the open one still works.
    assert!(tls_connect(s.addr("mqtts"), client_config(&ca, None))
        .await
        .is_err());
    assert!(mqtt_pub_acked(&mut open, 7, "still-open").await);
    assert_eq!(stored(&s.node.url).await, ["still-open"]);
    s.node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_tls_ports() {
    let s = setup().await;
    let t = s.tls_dir();
    let ca = t.join("ca.pem");
    for port in ["mqtts", "amqps", "https"] {
        // Plaintext protocol bytes on a TLS port: closed, no answer in the clear.
        let mut plain = TcpStream::connect(s.addr(port)).await.expect("connect");
        let hello: &[u8] = match port {
            "mqtts" => &mqtt_connect("plain", None),
            "amqps" => b"AMQP\x00\x00\x09\x01",
            _ => b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        };
        plain.write_all(hello).await.expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, plain.read_to_end(&mut buf))
            .await
            .expect("closed in time")
            .ok();
        assert!(
            !buf.starts_with(b"HTTP") && !buf.starts_with(b"AMQP") && buf.first() != Some(&0x20),
            "{port}: {buf:?}"
        );
        // Random garbage.
        let mut junk = TcpStream::connect(s.addr(port)).await.expect("connect");
        let bytes: Vec<u8> = (0..4096).map(|_| fastrand::u8(..)).collect();
        let _ = junk.write_all(&bytes).await;
        let _ = tokio::time::timeout(WAIT, junk.read_to_end(&mut Vec::new()))
            .await
            .expect("closed in time");
    }
    // A client certificate from a CA the node does not trust: handshake refused.
    let foreign = s.dir.path().join("foreign");
    tributary_gateway::tls_cli::self_signed(&foreign, &[], 30).expect("foreign CA");
    tributary_gateway::tls_cli::client_cert(&foreign, "good", &foreign, 30).expect("foreign cert");
    let config = client_config(
        &ca,
        Some((&foreign.join("good.pem"), &foreign.join("good-key.pem"))),
    );
    let refused = match tls_connect(s.addr("mqtts"), config).await {
        Err(_) => true,
        Ok(mut c) => mqtt_login(&mut c, None).await.is_none(),
    };
    assert!(refused, "a foreign client certificate was accepted");
    // A client that trusts only itself (its own self-signed CA) cannot verify us.
    assert!(tls_connect(
        s.addr("https"),
        client_config(&foreign.join("ca.pem"), None)
    )
    .await
    .is_err());
    // The node still serves every TLS port.
    let mut c = tls_connect(s.addr("mqtts"), client_config(&ca, None))
        .await
        .expect("handshake");
    assert_eq!(mqtt_login(&mut c, Some(("good", &s.token))).await, Some(0));
    let metrics = common::metrics_text(&s.node.url, Some(ADMIN)).await;
    assert!(
        metrics.contains("tributary_tls_handshakes_total{result=\"failed\"}"),
        "{metrics}"
    );
    s.node.stop().await;
}
