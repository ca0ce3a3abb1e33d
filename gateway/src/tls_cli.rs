//! `tributary tls`: certificates for trying TLS and mTLS without an outside CA.
//!
//! - [`self_signed`] makes a private CA and a server certificate it signs.
//! - [`client_cert`] signs a device's client certificate with that CA; its
//!   common name is the device identity the gateway sees over mTLS.
//!
//! Keys are ECDSA P-256 (ring), written with mode 0600. Existing files are
//! never overwritten: replacing a CA would orphan every certificate it signed.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

/// The CA's own validity: at least this many days, so that client certificates
/// signed later still chain to it.
const CA_MIN_DAYS: u32 = 3650;

/// Server certificate names when none are given.
const DEFAULT_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// `tributary tls self-signed --out DIR [--host NAME]... [--days N]`: writes
/// `ca.pem`, `ca-key.pem`, `server.pem` and `server-key.pem` to `out`. The
/// server certificate names `hosts` (DNS names or IP addresses; default
/// localhost, 127.0.0.1 and ::1) and is valid for `days`; the CA for at least
/// ten years. Returns the written paths.
pub fn self_signed(out: &Path, hosts: &[String], days: u32) -> anyhow::Result<Vec<PathBuf>> {
    check_days(days)?;
    let hosts: Vec<String> = if hosts.is_empty() {
        DEFAULT_HOSTS.iter().map(|h| (*h).to_owned()).collect()
    } else {
        hosts.to_vec()
    };
    for host in &hosts {
        check_host(host)?;
    }
    let names = ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"];
    let paths = prepare(out, &names)?;

    let mut ca_params = params("Tributary CA", days.max(CA_MIN_DAYS));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).context("signing the CA")?;

    let mut server_params = params(&hosts[0], days);
    server_params.subject_alt_names = CertificateParams::new(hosts.clone())
        .with_context(|| format!("invalid --host among {hosts:?}"))?
        .subject_alt_names;
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Client use too: the same certificate serves a core cluster's
    // node-to-node TLS, where each node dials the others with it.
    server_params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    server_params.use_authority_key_identifier_extension = true;
    let server_key = KeyPair::generate().context("generating the server key")?;
    let server = server_params
        .signed_by(&server_key, &ca)
        .context("signing the server certificate")?;

    write(&paths[0], &ca.pem(), false)?;
    write(&paths[1], &ca_key_pem, true)?;
    write(&paths[2], &server.pem(), false)?;
    write(&paths[3], &server_key.serialize_pem(), true)?;
    Ok(paths)
}

/// `tributary tls client-cert --ca-dir DIR --name DEVICE_ID [--out DIR] [--days N]`:
/// a client certificate with common name `name` (the device identity over
/// mTLS), signed by `ca_dir/ca.pem` and `ca_dir/ca-key.pem`, written to
/// `out/NAME.pem` and `out/NAME-key.pem`. Returns the written paths.
pub fn client_cert(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    days: u32,
) -> anyhow::Result<Vec<PathBuf>> {
    check_days(days)?;
    check_name(name)?;
    let ca_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca-key.pem");
    let ca_pem = fs::read_to_string(&ca_path)
        .with_context(|| format!("cannot read {}", ca_path.display()))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path)
        .with_context(|| format!("cannot read {}", ca_key_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{}: not a usable private key", ca_key_path.display()))?;
    let ca = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("{}: not a usable CA certificate", ca_path.display()))?;

    let names = [format!("{name}.pem"), format!("{name}-key.pem")];
    let paths = prepare(out, &names)?;
    let mut p = params(name, days);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().context("generating the client key")?;
    let cert = p.signed_by(&key, &ca).with_context(|| {
        format!(
            "signing the client certificate (does {} match {}?)",
            ca_key_path.display(),
            ca_path.display()
        )
    })?;

    write(&paths[0], &cert.pem(), false)?;
    write(&paths[1], &key.serialize_pem(), true)?;
    Ok(paths)
}

fn check_days(days: u32) -> anyhow::Result<()> {
    if days == 0 {
        bail!("--days must be at least 1");
    }
    Ok(())
}

/// An IP address, or a DNS name (`*.` allowed as the first label).
fn check_host(host: &str) -> anyhow::Result<()> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        bail!("invalid --host {host:?}: not an IP address or a DNS name");
    }
    Ok(())
}

/// Parameters with common name `cn`, valid from an hour ago (clock skew) for `days`.
fn params(cn: &str, days: u32) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
    p
}

/// A device id becomes a file name: letters, digits, `.`, `_`, `-`, and not
/// starting with `.` or `-`.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > 64
        || name.starts_with(['.', '-'])
        || !name.chars().all(ok_char)
    {
        bail!(
            "invalid --name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', \
             not starting with '.' or '-'"
        );
    }
    Ok(())
}

/// Creates `out` and returns the paths of `names` in it, refusing if any exists.
fn prepare(out: &Path, names: &[impl AsRef<str>]) -> anyhow::Result<Vec<PathBuf>> {
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let paths: Vec<PathBuf> = names.iter().map(|n| out.join(n.as_ref())).collect();
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        bail!(
            "{} exists; remove it or choose another directory",
            existing.display()
        );
    }
    Ok(paths)
}

/// Writes a new file; keys are created with mode 0600.
fn write(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use std::sync::Arc;
    use tributary_frontend::tls::{certificate_identity, Tls, TlsFiles};

    fn cert(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).expect("certificate PEM")
    }

    fn roots(dir: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(cert(&dir.join("ca.pem"))).expect("CA as a root");
        Arc::new(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn self_signed_writes_a_ca_and_a_server_certificate_for_localhost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("tls");
        let written = self_signed(&out, &[], 30).expect("self-signed");
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().and_then(|n| n.to_str()).unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"]
        );
        for key in ["ca-key.pem", "server-key.pem"] {
            PrivateKeyDer::from_pem_file(out.join(key)).expect("key PEM");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = fs::metadata(out.join(key))
                    .expect("stat")
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{key}");
            }
        }

        // The server certificate chains to the CA for every default name.
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&out), provider())
                .build()
                .expect("verifier");
        let server = cert(&out.join("server.pem"));
        for host in DEFAULT_HOSTS {
            let name = ServerName::try_from(host).expect("name");
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &server,
                &[],
                &name,
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        }

        // And the gateway loads the pair.
        Tls::load(TlsFiles {
            cert: out.join("server.pem"),
            key: out.join("server-key.pem"),
            client_ca: Some(out.join("ca.pem")),
            require_client_cert: true,
        })
        .expect("the gateway loads what was written");

        let again = self_signed(&out, &[], 30).expect_err("refused");
        assert!(again.to_string().contains("ca.pem exists"), "{again}");
    }

    #[test]
    fn client_cert_names_the_device_and_chains_to_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        self_signed(&ca_dir, &["gateway.example".to_owned()], 30).expect("self-signed");
        let out = dir.path().join("devices");
        let written = client_cert(&ca_dir, "device-7", &out, 10).expect("client cert");
        assert_eq!(
            written,
            [out.join("device-7.pem"), out.join("device-7-key.pem")]
        );
        PrivateKeyDer::from_pem_file(&written[1]).expect("key PEM");

        let client = cert(&written[0]);
        assert_eq!(certificate_identity(&client).as_deref(), Some("device-7"));
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca_dir), provider())
            .build()
            .expect("verifier");
        verifier
            .verify_client_cert(&client, &[], UnixTime::now())
            .expect("the client certificate chains to the CA");

        // A certificate from another CA does not.
        let other = dir.path().join("other");
        self_signed(&other, &[], 30).expect("self-signed");
        let foreign =
            client_cert(&other, "device-7", &dir.path().join("foreign"), 10).expect("client cert");
        assert!(verifier
            .verify_client_cert(&cert(&foreign[0]), &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn bad_input_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["", "../x", ".hidden", "a/b", "-rf", "dévice"] {
            assert!(
                client_cert(dir.path(), name, dir.path(), 1).is_err(),
                "{name:?}"
            );
        }
        let err = client_cert(dir.path(), "device-7", dir.path(), 1).expect_err("no CA");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert!(self_signed(&dir.path().join("a"), &[], 0).is_err());
        assert!(self_signed(&dir.path().join("b"), &["not a host!".to_owned()], 1).is_err());
    }
}
