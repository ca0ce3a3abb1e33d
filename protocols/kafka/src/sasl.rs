//! SASL PLAIN (SaslHandshake v1, then SaslAuthenticate): the user name is
//! the device id, the password its token, checked by the node's one
//! authenticator with the same login delay after failures as every other
//! protocol. The user name `admin` with the node's `auth.admin_token` logs
//! in as the admin (what HTTP's bearer admin token is): Kafka's admin tools
//! may then delete and change topics; a wrong admin token counts against
//! the source like any failed login. A failed login is answered
//! `SASL_AUTHENTICATION_FAILED` and the connection closes, as in Apache
//! Kafka.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::PoisonError;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use tributary_devices::auth::{self, Credentials, Identity, ADMIN};

use crate::conn::Session;
use crate::Refusal;

/// The one mechanism served.
const PLAIN: &str = "PLAIN";

pub(crate) fn handshake(
    s: &Session,
    req: SaslHandshakeRequest,
    version: i16,
) -> SaslHandshakeResponse {
    let answer =
        SaslHandshakeResponse::default().with_mechanisms(vec![StrBytes::from_static_str(PLAIN)]);
    if req.mechanism.as_str() == PLAIN {
        s.plain.store(true, Relaxed);
        // v0: the token follows as a bare frame (Kafka before SaslAuthenticate).
        s.bare_token.store(version == 0, Relaxed);
        answer
    } else {
        answer.with_error_code(ResponseError::UnsupportedSaslMechanism.code())
    }
}

/// `[authzid] NUL user NUL password` (RFC 4616); an authzid other than the
/// user is not served.
fn plain_fields(bytes: &[u8]) -> Option<(&str, &str)> {
    let mut parts = bytes.split(|&b| b == 0);
    let authzid = std::str::from_utf8(parts.next()?).ok()?;
    let user = std::str::from_utf8(parts.next()?).ok()?;
    let password = std::str::from_utf8(parts.next()?).ok()?;
    if parts.next().is_some() || user.is_empty() || !(authzid.is_empty() || authzid == user) {
        return None;
    }
    Some((user, password))
}

/// The bare PLAIN token after a v0 handshake: an empty frame when it logs
/// in; a failure closes the connection unanswered, as Kafka does.
pub(crate) async fn bare_token(s: &Session, frame: &[u8]) -> Result<BytesMut, Refusal> {
    let answer = authenticate(
        s,
        SaslAuthenticateRequest::default().with_auth_bytes(Bytes::copy_from_slice(frame)),
    )
    .await;
    if answer.error_code != 0 {
        return Err(Refusal::Counted);
    }
    let mut out = BytesMut::with_capacity(4);
    out.put_i32(0);
    Ok(out)
}

pub(crate) async fn authenticate(
    s: &Session,
    req: SaslAuthenticateRequest,
) -> SaslAuthenticateResponse {
    let failed = |e: ResponseError, message: &'static str| {
        s.closing.store(true, Relaxed);
        s.server.metrics.refuse(Refusal::NotAuthorized);
        SaslAuthenticateResponse::default()
            .with_error_code(e.code())
            .with_error_message(Some(StrBytes::from_static_str(message)))
            .with_auth_bytes(Bytes::new())
    };
    if !s.plain.load(Relaxed) {
        return failed(
            ResponseError::IllegalSaslState,
            "SaslHandshake with PLAIN comes first",
        );
    }
    let Some((user, password)) = plain_fields(&req.auth_bytes) else {
        return failed(
            ResponseError::SaslAuthenticationFailed,
            "malformed PLAIN credentials",
        );
    };
    if let (ADMIN, Some(registry)) = (user, &s.server.cx.devices) {
        let ok = registry.is_admin(password);
        if !ok {
            registry.admin_failure(s.peer);
        }
        let delay = registry.admin_delay(s.peer, ok);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if !ok {
            return failed(
                ResponseError::SaslAuthenticationFailed,
                "authentication failed: wrong admin token",
            );
        }
        *s.who.lock().unwrap_or_else(PoisonError::into_inner) = Some(Identity::new(ADMIN));
        return SaslAuthenticateResponse::default().with_auth_bytes(Bytes::new());
    }
    let creds = Credentials {
        protocol: "kafka",
        username: Some(user),
        password: Some(password),
        peer: s.peer,
        ..Credentials::default()
    };
    match auth::login(&*s.server.cx.auth, &creds).await {
        Ok(who) => {
            *s.who.lock().unwrap_or_else(PoisonError::into_inner) = Some(who);
            SaslAuthenticateResponse::default().with_auth_bytes(Bytes::new())
        }
        Err(_) => failed(
            ResponseError::SaslAuthenticationFailed,
            "authentication failed: unknown device or wrong token",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::plain_fields;

    #[test]
    fn plain_credentials_parse_as_rfc_4616_says() {
        assert_eq!(plain_fields(b"\0dev\0tok"), Some(("dev", "tok")));
        assert_eq!(plain_fields(b"dev\0dev\0tok"), Some(("dev", "tok")));
        assert_eq!(plain_fields(b"other\0dev\0tok"), None);
        assert_eq!(plain_fields(b"\0\0tok"), None);
        assert_eq!(plain_fields(b"dev\0tok"), None);
        assert_eq!(plain_fields(b"\0dev\0tok\0more"), None);
        assert_eq!(plain_fields(b"\0d\xffv\0tok"), None);
    }
}
