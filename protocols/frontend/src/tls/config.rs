//! From PEM files to a rustls server configuration ([`server_config`], and
//! [`build`] with the fingerprint that tells a reload whether anything
//! changed), and the identity a client certificate stands for
//! ([`certificate_identity`]).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::TlsFiles;
use crate::Error;

/// The identity a client certificate stands for: its subject common name, or
/// failing that its first DNS subject alternative name.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = x509
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty());
    if let Some(cn) = cn {
        return Some(cn.to_owned());
    }
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) if !dns.is_empty() => {
            Some((*dns).to_owned())
        }
        _ => None,
    })
}

pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// Reads the files and builds the server configuration and the fingerprint of
/// what was read.
pub(super) fn build(files: &TlsFiles) -> Result<(Arc<ServerConfig>, u64), Error> {
    if files.require_client_cert && files.client_ca.is_none() {
        return Err(Error::NoClientCa);
    }
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let ca_pem = match &files.client_ca {
        Some(path) => Some(read(path)?),
        None => None,
    };
    let ca = ca_pem.as_deref();
    let mut hasher = DefaultHasher::new();
    (&cert_pem, &key_pem, ca).hash(&mut hasher);
    files.require_client_cert.hash(&mut hasher);
    let fingerprint = hasher.finish();
    Ok((server_config(files, &cert_pem, &key_pem, ca)?, fingerprint))
}

/// The server configuration from the files' contents (`files` names them in
/// errors and says whether a client certificate is required). Every fault of
/// the bytes is an error naming the file.
pub fn server_config(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, Error> {
    if files.require_client_cert && client_ca_pem.is_none() {
        return Err(Error::NoClientCa);
    }
    let certs = certificates(&files.cert, cert_pem)?;
    warn_if_not_valid_now(&files.cert, &certs[0]);
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            invalid(&files.key, "no PRIVATE KEY block in the file")
        }
        e => invalid(&files.key, format!("not a valid private key: {e}")),
    })?;

    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let path = files.client_ca.as_deref().unwrap_or(Path::new("client_ca"));
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, pem)? {
                roots
                    .add(cert)
                    .map_err(|e| invalid(path, format!("not a usable CA certificate: {e}")))?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !files.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| invalid(path, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        invalid(
            &files.key,
            format!(
                "unusable with the certificate in {}: {e}",
                files.cert.display()
            ),
        )
    })?;
    Ok(Arc::new(config))
}

/// The two sides of mutual TLS between a core cluster's nodes, from the
/// `[tls]` files: each node serves and dials with its one certificate
/// (which needs both the serverAuth and clientAuth uses, and its node
/// address among its names), and trusts only `client_ca`, the CA that
/// signed every node's certificate.
pub fn node_configs(
    files: &TlsFiles,
) -> Result<(Arc<ServerConfig>, Arc<rustls::ClientConfig>), Error> {
    let Some(ca_path) = files.client_ca.as_deref() else {
        return Err(Error::NoClientCa);
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let ca_pem = read(ca_path)?;
    let required = TlsFiles {
        require_client_cert: true,
        ..files.clone()
    };
    let server = server_config(&required, &cert_pem, &key_pem, Some(&ca_pem))?;
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_path, &ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| invalid(ca_path, format!("not a usable CA certificate: {e}")))?;
    }
    let certs = certificates(&files.cert, &cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid(&files.key, format!("not a valid private key: {e}")))?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| invalid(&files.key, format!("unusable as a client certificate: {e}")))?;
    Ok((server, Arc::new(client)))
}

/// Serving an expired certificate is allowed (clients will refuse it) but worth a warning.
fn warn_if_not_valid_now(path: &Path, cert: &CertificateDer<'_>) {
    if let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
        if !x509.validity().is_valid() {
            tracing::warn!(
                cert = %path.display(),
                not_before = %x509.validity().not_before,
                not_after = %x509.validity().not_after,
                "the TLS server certificate is not valid now"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{ExtendedKeyUsagePurpose, KeyPair};
    use time::OffsetDateTime;

    use super::super::fixture::{days, handshake, params, Ca, Fixture, Leaf};
    use super::super::Tls;

    #[tokio::test]
    async fn no_client_certificate_fails_when_required_and_is_anonymous_otherwise() {
        let required = Fixture::new(true, true);
        let tls = required.tls();
        let (server, _client) = handshake(&tls, required.client(None)).await;
        assert!(server.is_err(), "a client without a certificate got in");
        assert_eq!(tls.stats().handshakes_failed, 1);

        let optional = Fixture::new(true, false);
        let (server, _client) = handshake(&optional.tls(), optional.client(None)).await;
        let (_, identity) = server.expect("server handshake");
        assert_eq!(identity, None);
    }

    #[tokio::test]
    async fn self_signed_foreign_and_expired_client_certificates_fail() {
        for require in [true, false] {
            let f = Fixture::new(true, require);
            let tls = f.tls();

            let mut p = params("device-7", &[]);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate().expect("key");
            let self_signed = Leaf {
                cert: p.self_signed(&key).expect("self-signed").pem(),
                key: key.serialize_pem(),
            };
            let foreign = Ca::new("another CA").client("device-7");
            let mut p = params("device-7", &[]);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p.not_before = OffsetDateTime::now_utc() - days(30);
            p.not_after = OffsetDateTime::now_utc() - days(1);
            let expired = f.ca.sign(p);

            for (what, leaf) in [
                ("self-signed", &self_signed),
                ("foreign CA", &foreign),
                ("expired", &expired),
            ] {
                let (server, _client) = handshake(&tls, f.client(Some(leaf))).await;
                let err = server.expect_err("the handshake failed");
                assert!(
                    err.to_string().contains("invalid peer certificate"),
                    "{what}: {err}"
                );
            }
            assert_eq!(tls.stats().handshakes_failed, 3);
        }
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let f = Fixture::new(true, true);
        let load = |files: TlsFiles| Tls::load(files).expect_err("load failed").to_string();

        let mut files = f.files.clone();
        files.key = f.dir.path().join("missing.pem");
        let err = load(files);
        assert!(
            err.starts_with("cannot read ") && err.contains("missing.pem"),
            "{err}"
        );

        let mut files = f.files.clone();
        files.key = f.files.cert.clone();
        let err = load(files);
        assert!(err.contains("no PRIVATE KEY"), "{err}");

        let empty = f.dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let mut files = f.files.clone();
        files.client_ca = Some(empty);
        let err = load(files);
        assert!(
            err.contains("empty.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );

        let mut files = f.files.clone();
        files.client_ca = None;
        assert!(matches!(Tls::load(files), Err(Error::NoClientCa)));

        // Certificate and key in one file is fine.
        let both = f.dir.path().join("both.pem");
        let pem = [
            std::fs::read_to_string(&f.files.cert).expect("cert"),
            std::fs::read_to_string(&f.files.key).expect("key"),
        ]
        .concat();
        std::fs::write(&both, pem).expect("write");
        let mut files = f.files.clone();
        files.cert = both.clone();
        files.key = both;
        Tls::load(files).expect("cert and key in one file");
    }

    #[test]
    fn identity_is_the_common_name_else_the_first_dns_name() {
        let ca = Ca::new("test CA");
        let der = |leaf: &Leaf| leaf.chain().remove(0);
        assert_eq!(
            certificate_identity(&der(&ca.client("device-7"))).as_deref(),
            Some("device-7")
        );
        let mut p = params("", &["sensor.example", "other.example"]);
        p.distinguished_name = rcgen::DistinguishedName::new();
        assert_eq!(
            certificate_identity(&der(&ca.sign(p))).as_deref(),
            Some("sensor.example")
        );
        assert_eq!(
            certificate_identity(&CertificateDer::from(vec![1, 2, 3])),
            None
        );
    }
}
