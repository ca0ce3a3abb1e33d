//! `tributary bench connect`: how many MQTT clients a broker logs in per
//! second. Each worker loops: TCP connect, optionally a TLS handshake (rustls,
//! the CA given), MQTT 3.1.1 CONNECT (with a user name and password when
//! given), CONNACK, DISCONNECT, close. Counts accepted logins; a refused
//! CONNACK or a failed handshake counts as an error. Drives any MQTT broker,
//! so auth on vs off, TLS vs plain and mosquitto are measured the same way.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tributary_storage::util::lock;

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Connect;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{proc_sample, Report, Samples};
use crate::cli::ConnectBenchArgs;

/// Runs `bench connect`.
pub async fn run(args: ConnectBenchArgs) -> anyhow::Result<()> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let addr: SocketAddr = tokio::net::lookup_host(&args.addr)
        .await
        .with_context(|| format!("cannot resolve {}", args.addr))?
        .next()
        .with_context(|| format!("no address for {}", args.addr))?;
    let tls = match &args.tls_ca {
        Some(ca) => Some(connector(ca)?),
        None => None,
    };
    let server_name = ServerName::try_from(args.server_name.clone())
        .with_context(|| format!("bad --server-name {}", args.server_name))?;
    // Every login has a client id of its own: logins of one id would take
    // each other's sessions over, which is not what this measures.
    let login = Arc::new((args.user.clone(), args.password.clone()));
    let connect_packet = move |id: &str| -> anyhow::Result<bytes::Bytes> {
        let mut connect = Connect::new(id);
        connect.keep_alive = 30;
        if let Some(u) = &login.0 {
            connect.set_login(u.clone(), login.1.clone().unwrap_or_default());
        }
        let mut packet = BytesMut::new();
        connect.write(&mut packet).context("encode CONNECT")?;
        Ok(packet.freeze())
    };
    let packet = connect_packet("bench-connect-first")?;

    // One login first: wrong credentials should fail loudly, not count as 0/s.
    one(addr, tls.as_ref(), &server_name, &packet)
        .await
        .context("the first login failed")?;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let before = args.server_pid.map(proc_sample).transpose()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..args.connections {
        let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
        let connect_packet = connect_packet.clone();
        let first_error = first_error.clone();
        let (tls, name) = (tls.clone(), server_name.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                n += 1;
                let Ok(packet) = connect_packet(&format!("bench-{worker}-{n}")) else {
                    break;
                };
                let t = Instant::now();
                match one(addr, tls.as_ref(), &name, &packet).await {
                    Ok(()) => {
                        samples.record(t.elapsed());
                        done.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Relaxed);
                        lock(&first_error).get_or_insert_with(|| format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            samples
        }));
    }
    tokio::time::sleep(args.duration).await;
    stop.store(true, Relaxed);
    let elapsed = started.elapsed();
    let after = args.server_pid.map(proc_sample).transpose()?;
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await?.micros);
    }
    latencies.sort_unstable();
    let logins = done.load(Relaxed);
    if let Some(e) = lock(&first_error).take() {
        println!("first error: {e}");
    }
    Report {
        target: if tls.is_some() {
            "connect-tls"
        } else {
            "connect"
        },
        counted: "logins",
        events: logins,
        requests: logins,
        errors: errors.load(Relaxed),
        payload_bytes: 0,
        elapsed,
        latencies,
        server: before.zip(after),
        generator: None,
        extra: Vec::new(),
    }
    .print();
    Ok(())
}

fn connector(ca: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("bad certificate in {}", ca.display()))?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// One whole login: connect, (TLS,) CONNECT, CONNACK 0, DISCONNECT.
async fn one(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
    name: &ServerName<'static>,
    connect: &[u8],
) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let timeout = Duration::from_secs(10);
    match tls {
        Some(c) => {
            let s = tokio::time::timeout(timeout, c.connect(name.clone(), tcp)).await??;
            login(s, connect, timeout).await
        }
        None => login(tcp, connect, timeout).await,
    }
}

async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    connect: &[u8],
    timeout: Duration,
) -> anyhow::Result<()> {
    s.write_all(connect).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(timeout, s.read_exact(&mut ack)).await??;
    if ack[0] != 0x20 || ack[3] != 0 {
        bail!("refused: CONNACK {ack:?}");
    }
    s.write_all(&[0xE0, 0x00]).await?;
    let _ = s.shutdown().await;
    Ok(())
}
