//! TLS certificate loading: the server certificate chain, its private key and
//! the client CA as PEM files hand them over (split at 0xFF bytes, which PEM
//! text never holds), and a client certificate's DER bytes as a peer presents
//! them, read for the identity it stands for. Every fault is an error, never
//! a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use tributary_frontend::tls::{self, TlsFiles};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0xFF);
    let cert = parts.next().unwrap_or_default();
    let key = parts.next().unwrap_or_default();
    let ca = parts.next();
    let require = data.len() % 2 == 0;
    let files = TlsFiles {
        cert: PathBuf::from("cert.pem"),
        key: PathBuf::from("key.pem"),
        client_ca: ca.map(|_| PathBuf::from("ca.pem")),
        require_client_cert: require,
    };
    let _ = tls::server_config(&files, cert, key, ca);
    let _ = tls::certificate_identity(&data.into());
    for part in data.split(|&b| b == 0xFF) {
        let _ = tls::certificate_identity(&part.into());
    }
});
