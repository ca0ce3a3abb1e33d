//! A raw Kafka client on the protocol crate, for the tests that drive the
//! Kafka front end request by request.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, RequestHeader, ResponseHeader, SaslAuthenticateRequest, SaslAuthenticateResponse,
    SaslHandshakeRequest, SaslHandshakeResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Message, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::InProcessNode;

/// How long a test waits for an answer.
pub const WAIT: Duration = Duration::from_secs(10);

/// A Kafka connection speaking raw requests.
pub struct Client {
    /// The connection (tests write raw bytes to it).
    pub s: TcpStream,
    /// Correlation id of the last request sent.
    pub sent: i32,
    /// Correlation id of the last answer read.
    pub answered: i32,
}

impl Client {
    pub async fn connect(node: &InProcessNode) -> Client {
        Client::at(node.kafka).await
    }

    pub async fn at(addr: std::net::SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.expect("connect"),
            sent: 0,
            answered: 0,
        }
    }

    /// Sends `req` at `version`; returns the answer's body (header stripped).
    pub async fn call<Req: Encodable + HeaderVersion + Message>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Bytes {
        self.send(key, version, req).await;
        self.answer(key, version).await.expect("an answer")
    }

    pub async fn send<Req: Encodable>(&mut self, key: ApiKey, version: i16, req: &Req) {
        self.send_as(key, version, version, req).await;
    }

    /// Sends `req` encoded at `body_version` under a header naming `version`
    /// (a version newer than the codec knows).
    pub async fn send_as<Req: Encodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        body_version: i16,
        req: &Req,
    ) {
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.sent + 1)
            .with_client_id(Some(StrBytes::from_static_str("tests")));
        let hv = key.request_header_version(version);
        let mut body = BytesMut::new();
        header.encode(&mut body, hv).expect("header");
        req.encode(&mut body, body_version).expect("body");
        // Seeds for the `kafka_request` fuzz target: every request a test
        // sends, when asked (`TRIBUTARY_KAFKA_SEEDS=dir`).
        if let Some(dir) = std::env::var_os("TRIBUTARY_KAFKA_SEEDS") {
            let path =
                std::path::Path::new(&dir).join(format!("{key:?}_v{version}_{}", body.len()));
            std::fs::write(path, &body).expect("write a seed");
        }
        let mut frame = BytesMut::new();
        frame.put_i32(body.len() as i32);
        frame.extend_from_slice(&body);
        self.s.write_all(&frame).await.expect("write");
        self.sent += 1;
    }

    /// The next answer's body; `None` when the connection closed.
    pub async fn answer(&mut self, key: ApiKey, version: i16) -> Option<Bytes> {
        let mut size = [0u8; 4];
        tokio::time::timeout(WAIT, self.s.read_exact(&mut size))
            .await
            .expect("answer in time")
            .ok()?;
        let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
        self.s.read_exact(&mut body).await.ok()?;
        let mut body = Bytes::from(body);
        let hv = if key == ApiKey::ApiVersions {
            0
        } else {
            key.response_header_version(version)
        };
        let header = ResponseHeader::decode(&mut body, hv).expect("response header");
        self.answered += 1;
        assert_eq!(
            header.correlation_id, self.answered,
            "answers come in order"
        );
        Some(body)
    }

    /// True when the server closed the connection (within the wait).
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(WAIT, self.s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

pub fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

/// SASL PLAIN as `user` with `token`: the handshake (checked), then the
/// authentication's answer.
pub async fn sasl_plain(c: &mut Client, user: &str, token: &str) -> SaslAuthenticateResponse {
    let mut b = c
        .call(
            ApiKey::SaslHandshake,
            1,
            &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")),
        )
        .await;
    let h = SaslHandshakeResponse::decode(&mut b, 1).expect("handshake");
    assert_eq!(h.error_code, 0);
    assert_eq!(h.mechanisms[0].as_str(), "PLAIN");
    let creds = Bytes::from(format!("\0{user}\0{token}"));
    let mut b = c
        .call(
            ApiKey::SaslAuthenticate,
            2,
            &SaslAuthenticateRequest::default().with_auth_bytes(creds),
        )
        .await;
    SaslAuthenticateResponse::decode(&mut b, 2).expect("authenticate")
}
