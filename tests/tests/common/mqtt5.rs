//! Raw MQTT 5 packets for the tests that need what rumqttc's client does
//! not send: a will with a delay, a session expiry, a connection dropped
//! without DISCONNECT.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5 as raw5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects and sends `connect`: the socket and the first 4 bytes of the
/// answer (CONNACK's fixed header, flags and reason code).
pub async fn raw_connect(addr: std::net::SocketAddr, connect: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(connect).await.expect("write");
    let mut ack = vec![0u8; 4];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut ack))
        .await
        .expect("connack in time")
        .expect("connack");
    (s, ack)
}

/// v5 CONNECT with clean start off, a session expiry, and optionally a will
/// on `wills/<id>` with a delay.
pub fn connect_v5_session(
    id: &str,
    receive_max: u16,
    expiry: u32,
    will_delay: Option<u32>,
) -> Vec<u8> {
    let will = will_delay.map(|d| raw5::LastWill {
        topic: bytes::Bytes::from(format!("wills/{id}")),
        message: bytes::Bytes::from_static(b"gone"),
        qos: rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        retain: false,
        properties: Some(raw5::LastWillProperties {
            delay_interval: Some(d),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    });
    let mut b = BytesMut::new();
    raw5::Connect {
        keep_alive: 30,
        client_id: id.into(),
        clean_start: false,
        properties: Some(raw5::ConnectProperties {
            session_expiry_interval: Some(expiry),
            receive_maximum: Some(receive_max),
            max_packet_size: None,
            topic_alias_max: None,
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        }),
    }
    .write(&will, &None, &mut b)
    .expect("encode");
    b.to_vec()
}
