//! Tokens and their hashes: new tokens (256 random bits, shown once), the
//! HMAC-SHA256 tags kept in their place, the admin token, and the credential
//! check of a login (token, by device id or alone, or a verified certificate).

use std::sync::atomic::Ordering::Relaxed;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::SecureRandom;

use super::{now_ms, Registry};
use crate::auth::{Credentials, Identity, Refusal};
use crate::Error;

/// Prefix of every token: recognisable in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "trb_";

/// The part of a token hash an [`Identity`] keeps (never 0).
pub(super) fn credential_of(tag: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(tag) {
        *d = *s;
    }
    u64::from_be_bytes(b).max(1)
}

pub(super) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Registry {
    /// Is the admin API on (an admin token configured)?
    pub fn admin_configured(&self) -> bool {
        self.admin_tag.is_some()
    }

    /// Is `token` the admin token? Constant time.
    pub fn is_admin(&self, token: &str) -> bool {
        self.admin_tag
            .as_ref()
            .is_some_and(|tag| hmac::verify(&self.key, token.as_bytes(), tag).is_ok())
    }

    pub(super) fn new_token(&self) -> Result<(String, Vec<u8>), Error> {
        let mut secret = [0u8; 32];
        self.rng
            .fill(&mut secret)
            .map_err(|_| Error::Invalid("no system randomness".into()))?;
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
        let tag = hmac::sign(&self.key, token.as_bytes()).as_ref().to_vec();
        Ok((token, tag))
    }

    pub(super) fn check(&self, creds: &Credentials<'_>) -> Result<Identity, Refusal> {
        let entry = if let Some(cn) = creds.certificate {
            // The TLS layer verified the certificate: its CN is the device.
            if creds.username.is_some_and(|u| !u.is_empty() && u != cn) {
                return Err(Refusal::BadCredentials);
            }
            self.entry(cn).ok_or(Refusal::BadCredentials)?
        } else {
            let secret = creds
                .password
                .filter(|p| !p.is_empty())
                .ok_or(Refusal::BadCredentials)?;
            let found = match creds.username.filter(|u| !u.is_empty()) {
                Some(user) => self.entry(user),
                None => {
                    let tag = hmac::sign(&self.key, secret.as_bytes());
                    let devices = self.read();
                    devices
                        .by_tag
                        .get(tag.as_ref())
                        .and_then(|id| devices.by_id.get(id))
                        .cloned()
                }
            };
            match found {
                Some(e) if hmac::verify(&self.key, secret.as_bytes(), &e.tag).is_ok() => e,
                Some(_) => return Err(Refusal::BadCredentials),
                None => {
                    // As much work as a known device: no timing tells which ids exist.
                    let _ = hmac::verify(&self.key, secret.as_bytes(), &[0u8; 32]);
                    return Err(Refusal::BadCredentials);
                }
            }
        };
        if !entry.device.enabled {
            return Err(Refusal::NotAuthorized);
        }
        entry.last_seen.store(now_ms(), Relaxed);
        Ok(Identity {
            id: entry.device.id.clone(),
            credential: if creds.certificate.is_some() {
                0
            } else {
                credential_of(&entry.tag)
            },
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::{creds, enforcing, open};
    use super::super::NewDevice;
    use super::*;
    use crate::auth::Authenticator;

    #[tokio::test]
    async fn tokens_log_in_survive_restart_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let token = {
            let (log, reg) = open(dir.path(), enforcing()).await;
            let (view, token) = reg
                .add(NewDevice {
                    id: "pump-1".into(),
                    publish: vec!["sensors/#".into()],
                    ..NewDevice::default()
                })
                .await
                .unwrap();
            assert_eq!(view.id, "pump-1");
            assert!(
                token.starts_with(TOKEN_PREFIX) && token.len() == 47,
                "{token}"
            );
            let who = reg
                .authenticate(&creds(Some("pump-1"), Some(&token)))
                .unwrap();
            assert_eq!(who.id, "pump-1");
            // Bearer style: the token alone.
            assert_eq!(
                reg.authenticate(&creds(None, Some(&token))).unwrap().id,
                "pump-1"
            );
            assert_eq!(reg.persist_last_seen().await.unwrap(), 1);
            log.close().await.unwrap();
            token
        };
        let (_log, reg) = open(dir.path(), enforcing()).await;
        assert!(reg.get("pump-1").unwrap().last_seen_ms.is_some());
        assert_eq!(
            reg.authenticate(&creds(Some("pump-1"), Some(&token)))
                .unwrap()
                .id,
            "pump-1"
        );
        let fresh = reg.rotate("pump-1").await.unwrap();
        assert_ne!(fresh, token);
        assert_eq!(
            reg.authenticate(&creds(Some("pump-1"), Some(&token))),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            reg.authenticate(&creds(None, Some(&token))),
            Err(Refusal::BadCredentials)
        );
        assert!(reg
            .authenticate(&creds(Some("pump-1"), Some(&fresh)))
            .is_ok());
    }

    #[tokio::test]
    async fn rotation_and_removal_end_old_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, reg) = open(dir.path(), enforcing()).await;
        let (_, token) = reg
            .add(NewDevice {
                id: "d".into(),
                ..NewDevice::default()
            })
            .await
            .unwrap();
        let g0 = reg.generation();
        let old = reg.authenticate(&creds(Some("d"), Some(&token))).unwrap();
        let by_cert = reg
            .authenticate(&Credentials {
                certificate: Some("d"),
                ..creds(None, None)
            })
            .unwrap();
        assert!(reg.still_valid(&old) && reg.still_valid(&by_cert));
        let fresh = reg.rotate("d").await.unwrap();
        assert!(reg.generation() > g0);
        assert!(!reg.still_valid(&old), "the old token's sessions end");
        assert!(reg.still_valid(&by_cert), "a certificate session does not");
        let new = reg.authenticate(&creds(Some("d"), Some(&fresh))).unwrap();
        assert!(reg.still_valid(&new));
        reg.remove("d").await.unwrap();
        assert!(!reg.still_valid(&new) && !reg.still_valid(&by_cert));
    }
}
