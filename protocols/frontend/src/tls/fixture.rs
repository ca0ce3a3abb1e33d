//! Test fixtures shared by the TLS unit tests: a CA that signs server and
//! client certificates, the files on disk, and handshakes over an in-memory
//! pipe.

use std::io;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

use super::config::provider;
use super::{certificate_identity, Tls, TlsFiles, TlsStream};

pub(super) type ServerSide<S> = io::Result<(TlsStream<S>, Option<String>)>;
pub(super) type ClientSide<S> = io::Result<tokio_rustls::client::TlsStream<S>>;

/// A certificate and its key, as PEM.
pub(super) struct Leaf {
    pub(super) cert: String,
    pub(super) key: String,
}

impl Leaf {
    pub(super) fn chain(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("leaf PEM")
    }

    pub(super) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key.as_bytes()).expect("key PEM")
    }
}

pub(super) struct Ca(CertifiedIssuer<'static, KeyPair>);

pub(super) fn days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

pub(super) fn params(cn: &str, sans: &[&str]) -> CertificateParams {
    let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let mut p = CertificateParams::new(sans).expect("SANs");
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = OffsetDateTime::now_utc() - days(1);
    p.not_after = OffsetDateTime::now_utc() + days(30);
    p
}

impl Ca {
    pub(super) fn new(cn: &str) -> Ca {
        let mut p = params(cn, &[]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Ca(CertifiedIssuer::self_signed(p, key).expect("CA cert"))
    }

    pub(super) fn pem(&self) -> String {
        self.0.pem()
    }

    pub(super) fn sign(&self, p: CertificateParams) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.0).expect("sign");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    pub(super) fn server(&self, cn: &str) -> Leaf {
        let mut p = params(cn, &["localhost"]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(p)
    }

    pub(super) fn client(&self, cn: &str) -> Leaf {
        let mut p = params(cn, &[]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(p)
    }
}

/// A CA, a server certificate from it on disk, and the files pointing there.
pub(super) struct Fixture {
    pub(super) dir: tempfile::TempDir,
    pub(super) ca: Ca,
    pub(super) files: TlsFiles,
}

impl Fixture {
    pub(super) fn new(client_ca: bool, require_client_cert: bool) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("test CA");
        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server-key.pem"),
            client_ca: client_ca.then(|| dir.path().join("ca.pem")),
            require_client_cert,
        };
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        let f = Fixture { dir, ca, files };
        f.write_server(&f.ca.server("server-1"));
        f
    }

    pub(super) fn write_server(&self, leaf: &Leaf) {
        std::fs::write(&self.files.cert, &leaf.cert).expect("write cert");
        std::fs::write(&self.files.key, &leaf.key).expect("write key");
    }

    pub(super) fn tls(&self) -> Tls {
        Tls::load(self.files.clone()).expect("load")
    }

    pub(super) fn client(&self, cert: Option<&Leaf>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca.pem().as_bytes()) {
            roots.add(c.expect("CA PEM")).expect("root");
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        Arc::new(match cert {
            Some(leaf) => builder
                .with_client_auth_cert(leaf.chain(), leaf.private_key())
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        })
    }
}

pub(super) fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("server name")
}

/// Server and client handshakes over an in-memory pipe, side by side.
pub(super) async fn handshake(
    tls: &Tls,
    client: Arc<ClientConfig>,
) -> (ServerSide<DuplexStream>, ClientSide<DuplexStream>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let connector = tokio_rustls::TlsConnector::from(client);
    tokio::join!(tls.accept(s), connector.connect(localhost(), c))
}

/// The identity of the certificate the server presented to `client`.
pub(super) fn server_identity<S>(client: &tokio_rustls::client::TlsStream<S>) -> Option<String> {
    client
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(certificate_identity)
}

pub(super) async fn round_trip<S, C>(server: &mut TlsStream<S>, client: &mut C)
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: AsyncRead + AsyncWrite + Unpin,
{
    client.write_all(b"ping").await.expect("client write");
    client.flush().await.expect("client flush");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.expect("server read");
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.expect("server write");
    server.flush().await.expect("server flush");
    client.read_exact(&mut buf).await.expect("client read");
    assert_eq!(&buf, b"pong");
}
