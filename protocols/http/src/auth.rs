//! Who is calling: every `/v1` request passes through [`authenticate`], which
//! turns `Authorization: Bearer TOKEN`, `Authorization: Basic` (device id and
//! token) or `?token=` (browsers cannot set headers on a WebSocket) into an
//! [`Identity`] through the one auth hook. Plain requests are refused here
//! (401, or 403 for a disabled device); WebSocket upgrades carry the refusal
//! to their handler, which closes with 1008 so a browser can see why.
//! `/v1/devices` takes the admin token only.

use std::net::SocketAddr;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use super::{ApiError, ApiResult, AppState};
use tributary_devices::auth::{self, Action, Authenticator, Credentials, Identity, Refusal, ADMIN};
use tributary_ingest::mapping::all_publish_subjects;
use tributary_storage::Event;

/// The caller of a request, or why it was refused (WebSocket upgrades only).
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub Result<Identity, Refusal>);

impl Caller {
    /// The identity, or the HTTP refusal.
    pub(crate) fn identity(&self) -> ApiResult<&Identity> {
        self.0.as_ref().map_err(|r| refusal(*r))
    }
}

/// Routes anyone may call: the dashboard page (it asks for a token itself),
/// health, the API description, and MQTT over WebSockets (the MQTT CONNECT
/// carries its own credentials). `/metrics` names every topic: with device
/// auth it takes the admin token.
fn public(path: &str, enforcing: bool) -> bool {
    matches!(path, "/" | "/health" | "/openapi.json" | "/mqtt")
        || (path == "/metrics" && !enforcing)
}

/// The WebSocket routes, which answer a refused login with close 1008.
fn websocket_route(path: &str) -> bool {
    path.strip_prefix("/v1/topics/")
        .is_some_and(|rest| rest.ends_with("/live") || rest.ends_with("/publish"))
}

/// The ACL subject of a consumer group: `$groups/<name>`. `$` names are
/// not covered by leading wildcards, so `#` grants no group: devices need
/// an explicit `$groups/...` subscribe pattern.
pub(crate) fn group_subject(group: &str) -> String {
    tributary_ingest::mapping::group_subject(group)
}

fn refusal(r: Refusal) -> ApiError {
    match r {
        Refusal::BadCredentials => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong credentials: send Authorization: Bearer TOKEN (or Basic with the device id and token)",
        ),
        Refusal::NotAuthorized => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this device may not connect (disabled)",
        ),
    }
}

/// A 403 naming what was refused.
pub(crate) fn forbidden(who: &Identity, action: Action, subject: &str) -> ApiError {
    let verb = match action {
        Action::Publish => "publish to",
        Action::Subscribe => "read",
    };
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("device `{}` may not {verb} `{subject}`", who.id),
    )
}

/// Checks an ACL for a request.
pub(crate) fn allow(
    state: &AppState,
    who: &Identity,
    action: Action,
    subject: &str,
) -> ApiResult<()> {
    if state.cx.auth.authorize(who, action, subject).allowed() {
        Ok(())
    } else {
        Err(forbidden(who, action, subject))
    }
}

/// May `who` publish `event` to `topic`? The answer is a decision, not an
/// error: `None` when it may, else the first subject refused (see
/// [`all_publish_subjects`]: every `mqtt.topic` occurrence is checked,
/// although a record repeating it is refused as malformed before this).
pub(crate) fn refused_publish(
    auth: &dyn Authenticator,
    who: &Identity,
    topic: &str,
    event: &Event,
) -> Option<String> {
    all_publish_subjects(topic, event.key.as_deref(), &event.headers)
        .into_iter()
        .find(|subject| !auth.authorize(who, Action::Publish, subject).allowed())
}

/// The filter that stands for reading a whole topic.
pub(crate) fn whole_topic(topic: &str) -> String {
    format!("{topic}/#")
}

/// 429 with `Retry-After` when a device's rate limit is spent; `None`: go on.
pub(crate) fn over_limit(state: &AppState, who: &Identity, events: usize) -> Option<Response> {
    let wait = state
        .cx
        .auth
        .admit(who, u32::try_from(events).unwrap_or(u32::MAX));
    if wait.is_zero() {
        return None;
    }
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut resp = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "device `{}` is over its rate limit; retry in {secs} s",
            who.id
        ),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    Some(resp)
}

enum Presented {
    Nothing,
    Token(String),
    Basic(String, String),
}

fn presented(req: &Request) -> Result<Presented, ()> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| ())?.trim();
        let (scheme, rest) = value.split_once(' ').ok_or(())?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return Ok(Presented::Token(rest.to_owned()));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| ())?;
            let text = String::from_utf8(decoded).map_err(|_| ())?;
            let (user, pass) = text.split_once(':').ok_or(())?;
            return Ok(Presented::Basic(user.to_owned(), pass.to_owned()));
        }
        return Err(());
    }
    Ok(query_token(req.uri()).map_or(Presented::Nothing, Presented::Token))
}

fn query_token(uri: &Uri) -> Option<String> {
    let q = uri.query()?;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| percent_decode(v))
}

/// The query without `token=` (handlers' parameter parsing refuses unknown keys).
fn strip_token(uri: &Uri) -> Option<Uri> {
    let q = uri.query()?;
    if !q.split('&').any(|kv| kv.split('=').next() == Some("token")) {
        return None;
    }
    let rest: Vec<&str> = q
        .split('&')
        .filter(|kv| kv.split('=').next() != Some("token"))
        .collect();
    let pq = if rest.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{}", uri.path(), rest.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    Uri::from_parts(parts).ok()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn peer_of(req: &Request) -> (Option<SocketAddr>, Option<String>) {
    match req
        .extensions()
        .get::<ConnectInfo<tributary_frontend::Peer>>()
    {
        Some(ConnectInfo(p)) => (p.addr, p.certificate.clone()),
        None => (None, None),
    }
}

fn is_upgrade(req: &Request) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The middleware (see the module comment).
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    if public(&path, state.cx.auth.enforcing()) {
        return next.run(req).await;
    }
    let presented = presented(&req);
    if let Some(uri) = strip_token(req.uri()) {
        *req.uri_mut() = uri;
    }
    let admin = match (&presented, &state.cx.devices) {
        (Ok(Presented::Token(t)), Some(reg)) => reg.is_admin(t),
        _ => false,
    };
    let enforcing = state.cx.auth.enforcing();
    // Connectors send topics out of the node, pipelines read and write any
    // topic: with device auth, admin only.
    let admin_route = path == "/v1/devices"
        || path.starts_with("/v1/devices/")
        || (enforcing
            && (path == "/metrics"
                || path == "/v1/connectors"
                || path.starts_with("/v1/connectors/")
                || path == "/v1/pipelines"
                || path.starts_with("/v1/pipelines/")
                || path.starts_with("/v1/cluster/")));
    if let (true, Some(reg)) = (admin || admin_route, &state.cx.devices) {
        // Admin-token checks are slowed like logins: a source that guessed
        // wrong waits before any answer, right or wrong.
        let (addr, _) = peer_of(&req);
        if !admin && matches!(presented, Ok(Presented::Token(_) | Presented::Basic(..))) {
            reg.admin_failure(addr);
        }
        let delay = reg.admin_delay(addr, admin);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
    if admin_route {
        let configured = state
            .cx
            .devices
            .as_ref()
            .is_some_and(|r| r.admin_configured());
        if !configured {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "the device admin API is off: set auth.admin_token (TRIBUTARY_AUTH__ADMIN_TOKEN)",
            )
            .into_response();
        }
        if !admin {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the device admin API and, with device auth, /metrics, /v1/connectors, /v1/pipelines and /v1/cluster/nodes take the admin token: Authorization: Bearer ADMIN_TOKEN",
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tributary\""),
            );
            return resp;
        }
    }
    // Only the WebSocket routes take a refused login through (to close 1008).
    let upgrade = is_upgrade(&req) && websocket_route(&path);
    let caller = if admin {
        Ok(Identity::new(ADMIN))
    } else if !state.cx.auth.enforcing() {
        Ok(Identity::anonymous())
    } else {
        let (addr, certificate) = peer_of(&req);
        let (username, password) = match &presented {
            Ok(Presented::Token(t)) => (None, Some(t.as_str())),
            Ok(Presented::Basic(u, p)) => (Some(u.as_str()), Some(p.as_str())),
            Ok(Presented::Nothing) | Err(()) => (None, None),
        };
        let creds = Credentials {
            protocol: if upgrade { "ws" } else { "http" },
            username,
            password,
            client_id: None,
            peer: addr,
            certificate: certificate.as_deref(),
        };
        auth::login(&*state.cx.auth, &creds).await
    };
    match caller {
        Err(r) if !upgrade => {
            let mut resp = refusal(r).into_response();
            if r == Refusal::BadCredentials {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tributary\""),
                );
            }
            resp
        }
        caller => {
            req.extensions_mut().insert(Caller(caller));
            next.run(req).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_tokens_are_found_and_stripped() {
        let uri: Uri = "/v1/topics/t/live?from=earliest&token=trb_a%2Bb"
            .parse()
            .unwrap_or_default();
        assert_eq!(query_token(&uri).as_deref(), Some("trb_a+b"));
        let stripped = strip_token(&uri).map(|u| u.to_string());
        assert_eq!(stripped.as_deref(), Some("/v1/topics/t/live?from=earliest"));
        let only: Uri = "/v1/stats?token=x".parse().unwrap_or_default();
        assert_eq!(
            strip_token(&only).map(|u| u.to_string()).as_deref(),
            Some("/v1/stats")
        );
        let none: Uri = "/v1/stats?from=1".parse().unwrap_or_default();
        assert!(strip_token(&none).is_none());
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn subjects() {
        assert_eq!(whole_topic("t"), "t/#");
    }
}
