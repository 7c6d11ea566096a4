//! The routes runtimes call, as the original control plane serves them:
//! `POST /registry/register`, `POST /registry/heartbeat`,
//! `POST /registry/update-card`, and `GET /workspaces/{id}` (a workspace's
//! public state, for its own token or the admin token). Here are the
//! request decoders (no I/O: also the fuzz targets' entry points), the
//! responses, and the diagnostics of a refusal: its reason key and the
//! workspace id its body named, which `handle` logs once and counts.
//!
//! Routes of the original that other subsystems serve (discovery, peers,
//! access checks, A2A, delegation, activity, notifications) are answered
//! with a JSON 404 that names the service meant to serve them
//! ([`other_subsystem`]).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{
    ApiError, App, DURABILITY, InputLimits, MAX_AGENT_CARD_BYTES, MAX_TOOL_NAME_BYTES, MAX_TOOLS,
    MAX_URL_BYTES, blocking, bounded, json_response, parse_json, read_body,
};
use crate::auth;
use crate::executor::{HeartbeatRequest, RegisterRequest, RegistryError};
use crate::model::{HeartbeatEvent, RuntimeMetadata, WorkspaceKind, valid_workspace_id};
use crate::store::Read;

/// The workspace id a body names in `field`, if it is a valid id: for the
/// diagnostics of a body refused before it was decoded (never anything else
/// from the body). Parsed again only on that error path.
fn named_workspace(body: &[u8], field: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Named {
        id: Option<serde_json::Value>,
        workspace_id: Option<serde_json::Value>,
    }
    let named: Named = serde_json::from_slice(body).ok()?;
    let value = if field == "id" {
        named.id
    } else {
        named.workspace_id
    };
    match value? {
        serde_json::Value::String(id) => logged_id(&id),
        _ => None,
    }
}

/// A decoded request's workspace id, for the diagnostics, if it is a valid
/// id (an unknown one may be anything the client sent).
fn logged_id(id: &str) -> Option<String> {
    valid_workspace_id(id).then(|| id.to_string())
}

/// The register body. Unknown fields are ignored.
#[derive(Deserialize)]
struct RegisterBody {
    id: Option<String>,
    url: Option<String>,
    agent_card: Option<serde_json::Value>,
    delivery_mode: Option<String>,
    kind: Option<String>,
    mcp_server_present: Option<bool>,
    loaded_mcp_tools: Option<Vec<String>>,
    runtime_metadata: Option<serde_json::Value>,
}

pub(super) async fn register(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (bearer, body) = read_body(&app, req).await?;
    let request = decode_register(bearer, &body)
        .map_err(|e| e.for_workspace(named_workspace(&body, "id")))?;
    tracing::Span::current().record("workspace_id", request.id.as_str());
    let named = logged_id(&request.id);
    let executor = app.executor.clone();
    let registered = blocking(&app, move || executor.register(&request))
        .await?
        .map_err(|e| ApiError::from(e).for_workspace(named))?;
    tracing::Span::current().record("verdict", registered.verdict.as_str());
    tracing::Span::current().record("chain_version", registered.chain_version.as_str());
    let mut out = json!({"status": "registered", "delivery_mode": registered.delivery_mode});
    if let Some(token) = registered.auth_token {
        out["auth_token"] = json!(token);
    }
    if let Some(secret) = registered.inbound_secret {
        out["platform_inbound_secret"] = json!(secret.expose());
    }
    Ok(json_response(StatusCode::OK, &out))
}

/// The heartbeat body. Unknown fields are ignored; `null` reads as absent.
#[derive(Deserialize)]
struct HeartbeatBody {
    workspace_id: Option<String>,
    error_rate: Option<f64>,
    sample_error: Option<String>,
    active_tasks: Option<i64>,
    current_task: Option<String>,
    uptime_seconds: Option<i64>,
    runtime_state: Option<String>,
    mcp_server_present: Option<bool>,
    loaded_mcp_tools: Option<Vec<String>>,
    runtime_metadata: Option<serde_json::Value>,
    agent_card: Option<serde_json::Value>,
}

pub(super) async fn heartbeat(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (bearer, body) = read_body(&app, req).await?;
    let request = decode_heartbeat(bearer, &body, &app.config.input)
        .map_err(|e| e.for_workspace(named_workspace(&body, "workspace_id")))?;
    tracing::Span::current().record("workspace_id", request.workspace_id.as_str());
    // Evaluated on this worker (the chain yields at every epoch tick, so a
    // slow policy cannot hold it), and the commit is awaited here unless the
    // verdict records only liveness: no hand-off to another thread and no
    // thread waiting for the writer.
    let ack = app
        .executor
        .heartbeat_acknowledged(&request)
        .await
        .map_err(|e| ApiError::from(e).for_workspace(logged_id(&request.workspace_id)))?;
    tracing::Span::current().record("verdict", ack.verdict.as_str());
    tracing::Span::current().record("chain_version", ack.chain_version.as_str());
    // Minted once per workspace (then it comes with the snapshot), on a
    // blocking thread: it is a write.
    let secret = match ack.inbound_secret {
        Some(secret) => Some(secret),
        None if ack.removed => None,
        None => {
            let executor = app.executor.clone();
            let id = request.workspace_id.clone();
            blocking(&app, move || executor.inbound_secret(&id))
                .await
                .ok()
                .flatten()
        }
    };
    let mut out = json!({"status": "ok"});
    if let Some(secret) = secret {
        out["platform_inbound_secret"] = json!(secret.expose());
    }
    let mut resp = json_response(StatusCode::OK, &out);
    // Runtimes read only the body; this says whether the verdict was
    // committed before the answer or (liveness only) queued for the writer.
    resp.headers_mut().insert(
        DURABILITY,
        HeaderValue::from_static(if ack.committed { "committed" } else { "queued" }),
    );
    Ok(resp)
}

/// The update-card body.
#[derive(Deserialize)]
struct UpdateCardBody {
    workspace_id: Option<String>,
    agent_card: Option<serde_json::Value>,
}

/// `POST /registry/update-card` (section 1.6 of the original's notes).
pub(super) async fn update_card(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (bearer, body) = read_body(&app, req).await?;
    let named = || named_workspace(&body, "workspace_id");
    let decoded: UpdateCardBody = parse_json(&body).map_err(|e| e.for_workspace(named()))?;
    let (Some(id), Some(card)) = (
        decoded.workspace_id.filter(|id| !id.is_empty()),
        decoded.agent_card,
    ) else {
        return Err(ApiError::invalid_body().for_workspace(named()));
    };
    let named = logged_id(&id);
    let card = decode_card(card).map_err(|e| e.for_workspace(named.clone()))?;
    tracing::Span::current().record("workspace_id", id.as_str());
    let executor = app.executor.clone();
    blocking(&app, move || {
        executor.update_card(&id, bearer.as_deref(), &card.text, card.url.as_deref())
    })
    .await?
    .map_err(|e| match e {
        RegistryError::CardUrlNotAllowed(why) => {
            ApiError::new(StatusCode::BAD_REQUEST, "workspace URL not allowed")
                .because("card_url_not_allowed")
                .with_detail(why)
        }
        RegistryError::CardUpdateFailed(detail) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "failed to update card")
                .because("update_card_failed")
                .with_detail(detail)
        }
        other => ApiError::from(other),
    })
    .map_err(|e| e.for_workspace(named))?;
    Ok(json_response(StatusCode::OK, &json!({"status": "updated"})))
}

/// `GET /workspaces/{id}`: the workspace's public state, for a live token
/// of that workspace or the admin token (a removed workspace only for the
/// admin), including the heartbeats acknowledged before this request.
pub(super) async fn workspace(
    app: Arc<App>,
    req: Request<Incoming>,
    id: String,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let Some(bearer) = auth::bearer(req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes))
        .map(str::to_string)
    else {
        return Err(ApiError::from(RegistryError::MissingToken));
    };
    let admin = app
        .admin
        .token_hash()
        .is_some_and(|h| auth::check(Some(&bearer), &[h], false) == auth::AuthCheck::Token);
    let store = app.executor.store().clone();
    let read = blocking(&app, move || {
        if !admin {
            let snap = store
                .load(&id, Read::Cached)
                .map_err(RegistryError::AuthUnavailable)?
                .filter(|s| s.workspace.status != crate::model::Status::Removed)
                .ok_or(RegistryError::UnknownWorkspace)?;
            if auth::check(Some(&bearer), &snap.live_token_hashes, false) != auth::AuthCheck::Token
            {
                return Err(RegistryError::InvalidToken);
            }
        }
        // A heartbeat acknowledged a moment ago may still be held by the
        // writer (liveness only): what the caller just sent is shown.
        store.flush();
        store
            .workspace(&id)
            .map_err(|e| RegistryError::StateUnavailable {
                what: "the workspace",
                error: e,
            })?
            .ok_or(RegistryError::UnknownWorkspace)
    })
    .await??;
    Ok(json_response(
        StatusCode::OK,
        &crate::admin::workspace_view(&read),
    ))
}

/// A route of the original control plane that another subsystem serves:
/// the service meant to serve it, for a clear 404.
pub(super) fn other_subsystem(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["registry", "discover", _] | ["registry", _, "peers"] | ["registry", "check-access"] => {
            Some("the discovery service (agent discovery and access checks)")
        }
        ["workspaces", _, "a2a", ..] => Some("the A2A proxy"),
        ["workspaces", _, "delegate" | "delegations", ..] => Some("the delegation service"),
        ["workspaces", _, "activity" | "session-search"] => Some("the activity log"),
        ["workspaces", _, "notify"] => Some("the notification service"),
        _ => None,
    }
}

/// The JSON 404 of [`other_subsystem`].
pub(super) fn not_served_here(service: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("not served by heartgate (the liveness registry): this route belongs to {service}"),
    )
    .because("not_served_here")
}

/// An agent card: its JSON text within [`MAX_AGENT_CARD_BYTES`] and its `url`.
struct Card {
    text: String,
    url: Option<String>,
}

fn decode_card(card: serde_json::Value) -> Result<Card, ApiError> {
    if !card.is_object() {
        return Err(
            ApiError::new(StatusCode::BAD_REQUEST, "agent_card must be an object")
                .because("bad_agent_card"),
        );
    }
    let text = card.to_string();
    if text.len() > MAX_AGENT_CARD_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("agent_card larger than {MAX_AGENT_CARD_BYTES} bytes"),
        )
        .because("agent_card_too_large"));
    }
    let url = match card.get("url") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(u)) if u.len() <= MAX_URL_BYTES => Some(u.clone()),
        Some(serde_json::Value::String(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("agent_card.url longer than {MAX_URL_BYTES} bytes"),
            )
            .because("url_too_long"));
        }
        // Not a URL: never used as one (nor as the push-mode fallback).
        Some(_) => None,
    };
    Ok(Card { text, url })
}

/// Decode and validate a register body (the request decoder; no I/O).
pub fn decode_register(bearer: Option<String>, body: &[u8]) -> Result<RegisterRequest, ApiError> {
    let body: RegisterBody = parse_json(body)?;
    let id = body
        .id
        .filter(|id| !id.is_empty())
        .ok_or_else(ApiError::invalid_body)?;
    let agent_card = match body.agent_card {
        Some(card @ serde_json::Value::Object(_)) => card,
        _ => return Err(ApiError::invalid_body()),
    };
    let delivery_mode = body.delivery_mode.filter(|m| !m.is_empty());
    if let Some(mode) = &delivery_mode
        && mode != "push"
        && mode != "poll"
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "delivery_mode must be 'push' or 'poll'",
        )
        .because("bad_delivery_mode"));
    }
    let kind = match body.kind.as_deref() {
        None | Some("") => None,
        Some(k) => Some(WorkspaceKind::parse(k).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "kind must be 'workspace' or 'platform'",
            )
            .because("bad_kind")
        })?),
    };
    if body.url.as_ref().is_some_and(|u| u.len() > MAX_URL_BYTES) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("url longer than {MAX_URL_BYTES} bytes"),
        )
        .because("url_too_long"));
    }
    let card = decode_card(agent_card)?;
    check_tools(body.loaded_mcp_tools.as_deref())?;
    let runtime = decode_runtime_metadata(body.runtime_metadata.as_ref())?;
    Ok(RegisterRequest {
        id,
        bearer,
        url: body.url,
        agent_card_url: card.url,
        agent_card: card.text,
        delivery_mode,
        kind,
        mcp_server_present: body.mcp_server_present,
        loaded_mcp_tools: body.loaded_mcp_tools,
        runtime,
    })
}

/// The most capabilities a runtime may declare, and their names' length.
pub const MAX_CAPABILITIES: usize = 64;
pub const MAX_CAPABILITY_NAME_BYTES: usize = 64;
/// The longest idle timeout a runtime may declare (a year), in seconds.
pub const MAX_IDLE_TIMEOUT_SECONDS: i64 = 366 * 86_400;

/// What `runtime_metadata` declares: the capabilities set to `true`,
/// sorted, and the idle timeout; nothing when it is absent (a request
/// without it clears them, as the original registry does).
fn decode_runtime_metadata(meta: Option<&serde_json::Value>) -> Result<RuntimeMetadata, ApiError> {
    let bad = |what: &str| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("runtime_metadata{what}"))
            .because("bad_runtime_metadata")
    };
    let meta = match meta {
        None | Some(serde_json::Value::Null) => return Ok(RuntimeMetadata::default()),
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => return Err(bad(" must be an object")),
    };
    let idle_timeout_seconds = match meta.get("idle_timeout_seconds") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(n) if (0..=MAX_IDLE_TIMEOUT_SECONDS).contains(&n) => Some(n),
            _ => {
                return Err(bad(&format!(
                    ".idle_timeout_seconds must be a non-negative integer of at most {MAX_IDLE_TIMEOUT_SECONDS}"
                )));
            }
        },
    };
    let caps = match meta.get("capabilities") {
        None | Some(serde_json::Value::Null) => {
            return Ok(RuntimeMetadata {
                capabilities: Vec::new(),
                idle_timeout_seconds,
            });
        }
        Some(serde_json::Value::Object(c)) => c,
        Some(_) => return Err(bad(".capabilities must be an object of booleans")),
    };
    if caps.len() > MAX_CAPABILITIES {
        return Err(bad(&format!(
            ".capabilities has more than {MAX_CAPABILITIES} entries"
        )));
    }
    let mut on = Vec::new();
    for (name, value) in caps {
        if name.is_empty() || name.len() > MAX_CAPABILITY_NAME_BYTES {
            return Err(bad(&format!(
                ".capabilities names are 1-{MAX_CAPABILITY_NAME_BYTES} bytes"
            )));
        }
        match value {
            serde_json::Value::Bool(true) => on.push(name.clone()),
            serde_json::Value::Bool(false) => {}
            _ => return Err(bad(".capabilities must be an object of booleans")),
        }
    }
    on.sort();
    Ok(RuntimeMetadata {
        capabilities: on,
        idle_timeout_seconds,
    })
}

/// `loaded_mcp_tools` within [`MAX_TOOLS`] names of [`MAX_TOOL_NAME_BYTES`].
fn check_tools(tools: Option<&[String]>) -> Result<(), ApiError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS || tools.iter().any(|t| t.len() > MAX_TOOL_NAME_BYTES) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "loaded_mcp_tools: at most {MAX_TOOLS} names of at most {MAX_TOOL_NAME_BYTES} bytes"
            ),
        )
        .because("bad_loaded_mcp_tools"));
    }
    Ok(())
}

/// Decode and validate a heartbeat body (the request decoder; no I/O).
/// Texts longer than `limits` allow are cut, never stored whole.
pub fn decode_heartbeat(
    bearer: Option<String>,
    body: &[u8],
    limits: &InputLimits,
) -> Result<HeartbeatRequest, ApiError> {
    let body: HeartbeatBody = parse_json(body)?;
    let workspace_id = body
        .workspace_id
        .filter(|id| !id.is_empty())
        .ok_or_else(ApiError::invalid_body)?;
    let error_rate = body.error_rate.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&error_rate) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "error_rate must be between 0 and 1",
        )
        .because("bad_error_rate"));
    }
    let active_tasks = non_negative("active_tasks", body.active_tasks)?;
    let uptime_seconds = non_negative("uptime_seconds", body.uptime_seconds)?;
    check_tools(body.loaded_mcp_tools.as_deref())?;
    let runtime = decode_runtime_metadata(body.runtime_metadata.as_ref())?;
    let agent_card = match body.agent_card {
        None | Some(serde_json::Value::Null) => None,
        Some(card) => Some(decode_card(card)?.text),
    };
    let text = |t: String| bounded(t, limits.max_text_bytes);
    Ok(HeartbeatRequest {
        workspace_id,
        bearer,
        event: HeartbeatEvent {
            error_rate,
            sample_error: text(body.sample_error.unwrap_or_default()),
            active_tasks,
            current_task: body.current_task.map(text),
            uptime_seconds,
            runtime_state: text(body.runtime_state.unwrap_or_default()),
            mcp_server_present: body.mcp_server_present,
            loaded_mcp_tools: body.loaded_mcp_tools,
        },
        runtime,
        agent_card,
    })
}

/// A count or a duration of a heartbeat: absent is 0, negative is refused.
fn non_negative(field: &str, value: Option<i64>) -> Result<i64, ApiError> {
    match value.unwrap_or(0) {
        n if n < 0 => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{field} must not be negative"),
        )
        .because("negative_count")),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::{named_workspace, other_subsystem};

    #[test]
    fn only_a_valid_id_is_named_in_diagnostics() {
        assert_eq!(
            named_workspace(br#"{"id":"ws-1","url":"x"}"#, "id").as_deref(),
            Some("ws-1")
        );
        assert_eq!(named_workspace(br#"{"id":"a b/../c"}"#, "id"), None);
        assert_eq!(named_workspace(br#"{"id":7}"#, "id"), None);
        assert_eq!(named_workspace(b"not json", "id"), None);
        assert_eq!(
            named_workspace(br#"{"workspace_id":"ws-2"}"#, "workspace_id").as_deref(),
            Some("ws-2")
        );
    }

    #[test]
    fn routes_of_other_subsystems_are_named() {
        for path in [
            "/registry/discover/ws-1",
            "/registry/ws-1/peers",
            "/registry/check-access",
            "/workspaces/ws-1/a2a",
            "/workspaces/ws-1/delegate",
            "/workspaces/ws-1/delegations/d-1/update",
            "/workspaces/ws-1/activity",
            "/workspaces/ws-1/notify",
        ] {
            assert!(other_subsystem(path).is_some(), "{path}");
        }
        assert_eq!(other_subsystem("/workspaces/ws-1"), None);
        assert_eq!(other_subsystem("/registry/heartbeat"), None);
    }
}
