//! The HTTP layer: the only code that knows hyper and JSON bodies.
//!
//! Layout: this module is the server (connections, graceful shutdown), the
//! router, the error type and the body limits; `registry` is the runtimes'
//! wire protocol (`POST /registry/register|heartbeat|update-card`,
//! `GET /workspaces/{id}`); `admin` is the admin API behind the admin
//! bearer token; `connections` is the connection cap. Probes:
//! `GET /healthz`, `GET /readyz`, `GET /metrics`, `GET /openapi.json`.
//! Bodies are size-limited, unknown JSON fields are ignored, wrong types and
//! bad JSON are 400 with nothing written. Every error is one [`ApiError`]
//! rendered as `{"error": "..."}`; database text never reaches a client. A
//! heartbeat is evaluated on the async worker that read it (the policies
//! yield at every epoch tick) and awaits its commit there; registers and
//! admin work run on blocking threads, at most
//! [`ServerConfig::max_in_flight`] at once.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

mod admin;
mod connections;
mod registry;

use self::connections::{Busy, ConnSlot, Connections};
pub use self::registry::{
    MAX_CAPABILITIES, MAX_CAPABILITY_NAME_BYTES, MAX_IDLE_TIMEOUT_SECONDS, decode_heartbeat,
    decode_register,
};
use crate::admin::Admin;
use crate::auth;
use crate::executor::{Executor, RegistryError};

/// Limits of the HTTP layer.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// What a runtime's request may store.
    pub input: InputLimits,
    /// The most connections open at once; at the cap, the idle connection
    /// open longest is closed for each new one, so probes always get in.
    pub max_connections: usize,
    /// How many registers and admin requests may run on blocking threads at
    /// once; the rest wait. (Heartbeats run on the async workers.)
    pub max_in_flight: usize,
    /// How long a client may take to send its headers.
    pub header_timeout: Duration,
    /// How long a client may take to send its body once the headers are in
    /// (a client that never finishes its body must not hold a connection).
    pub body_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 256 * 1024,
            input: InputLimits::default(),
            max_connections: default_max_connections(),
            // Evaluation and the SQLite write are CPU-bound: a few blocking
            // threads per core; more only add context switches (measured with
            // heartgate-bench-load on 2 cores: 64 threads 7.9k/s, 8 threads
            // 10.9k/s, 4 threads 10.1k/s).
            max_in_flight: 4 * std::thread::available_parallelism().map_or(2, usize::from),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Bounds on what a runtime's request may store: texts are cut (on a
/// character boundary, ending with [`TRUNCATED`]); lists and the agent card,
/// which cannot be cut without changing their meaning, are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputLimits {
    /// The longest `sample_error`, `current_task` and `runtime_state` kept.
    pub max_text_bytes: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
        }
    }
}

/// The default bound of a runtime's texts (`max_text_bytes`).
pub const DEFAULT_MAX_TEXT_BYTES: usize = 4096;
/// The most names in `loaded_mcp_tools`.
pub const MAX_TOOLS: usize = 512;
/// The longest name in `loaded_mcp_tools`.
pub const MAX_TOOL_NAME_BYTES: usize = 256;
/// The longest agent URL.
pub const MAX_URL_BYTES: usize = 2048;
/// The largest agent card, as JSON text.
pub const MAX_AGENT_CARD_BYTES: usize = 64 << 10;

/// The default connection cap: 1024, but never more than half the process's
/// descriptor limit (the rest is for the database, the reconcile worker and
/// its git clones).
pub fn default_max_connections() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(1024);
    (soft / 2).clamp(16, 1024)
}

/// What the request handlers share.
pub struct App {
    executor: Arc<Executor>,
    admin: Arc<Admin>,
    permits: Semaphore,
    config: ServerConfig,
    /// The reconcile worker whose state `/readyz` reports.
    worker: Option<Arc<crate::reconcile::Worker>>,
    /// Whether this host runs reconcile runs at all.
    reconcile_enabled: bool,
    /// How many refusals were logged lately, by route and reason.
    refusals: Arc<RefusalLog>,
}

impl App {
    pub fn new(executor: Arc<Executor>, admin: Admin, config: ServerConfig) -> App {
        App {
            executor,
            admin: Arc::new(admin),
            permits: Semaphore::new(config.max_in_flight.max(1)),
            config,
            worker: None,
            reconcile_enabled: true,
            refusals: Arc::new(RefusalLog::default()),
        }
    }

    /// Report `worker`'s state in `/readyz` (without one, `/readyz` says
    /// the reconcile worker is not running).
    pub fn with_worker(mut self, worker: Arc<crate::reconcile::Worker>) -> App {
        self.worker = Some(worker);
        self
    }

    /// This host runs no reconcile runs (`[reconcile] enabled = false`):
    /// `/readyz` says so and does not wait for a worker.
    pub fn without_reconcile(mut self) -> App {
        self.reconcile_enabled = false;
        self
    }
}

/// An HTTP error, rendered as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// A short key saying why, e.g. `bad_delivery_mode`: logged and counted
    /// for the registry routes, never answered.
    reason: &'static str,
    /// The workspace the request named, when its body named a valid id.
    workspace_id: Option<String>,
    /// What went wrong inside (a 5xx's cause): logged, never answered.
    detail: Option<String>,
}

impl ApiError {
    /// The HTTP status it renders with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message it answers with.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Its reason key.
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// An error answering `message`, cut to [`MAX_ERROR_BYTES`]: a message
    /// may quote what the client sent, and never echoes it whole. Its
    /// reason key is the status's until [`ApiError::because`] names one.
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let reason = match status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::REQUEST_TIMEOUT => "body_timeout",
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "internal",
        };
        ApiError {
            status,
            message: bounded(message.into(), MAX_ERROR_BYTES),
            reason,
            workspace_id: None,
            detail: None,
        }
    }

    /// The same error under the reason key `reason`.
    fn because(mut self, reason: &'static str) -> Self {
        self.reason = reason;
        self
    }

    /// The same error, logged with `detail` (never answered).
    fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(bounded(detail.into(), MAX_ERROR_BYTES));
        self
    }

    /// The same error, logged with the workspace id the request named.
    fn for_workspace(mut self, id: Option<String>) -> Self {
        if self.workspace_id.is_none() {
            self.workspace_id = id;
        }
        self
    }

    fn invalid_body() -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid request body").because("invalid_json")
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        json_response(self.status, &json!({ "error": self.message }))
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        use RegistryError as E;
        let reason = err.reason();
        let error = match err {
            E::UnknownWorkspace => ApiError::new(StatusCode::NOT_FOUND, "unknown workspace"),
            E::MissingToken => {
                ApiError::new(StatusCode::UNAUTHORIZED, "missing workspace auth token")
            }
            E::InvalidToken => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid workspace auth token")
            }
            E::AuthUnavailable(e) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "workspace auth temporarily unavailable",
            )
            .with_detail(format!("token lookup failed: {e}")),
            E::StateUnavailable { what, error } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("workspace state temporarily unavailable: reading {what} failed"),
            )
            .with_detail(format!("reading a workspace failed: {error}")),
            E::PlatformKindRefused => ApiError::new(StatusCode::FORBIDDEN, err.to_string()),
            E::Rejected {
                http_status,
                message,
                ..
            } => ApiError::new(
                StatusCode::from_u16(http_status).unwrap_or(StatusCode::BAD_REQUEST),
                message,
            ),
            E::UrlRequired | E::BadWorkspaceId(_) | E::UrlNotAllowed(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, err.to_string())
            }
            E::CardUrlNotAllowed(why) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "workspace agent_card URL not allowed",
            )
            .with_detail(why),
            E::RegistrationFailed(detail) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "registration failed")
                    .with_detail(detail)
            }
            E::UpdateFailed(detail) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "failed to update")
                    .with_detail(detail)
            }
            E::Unavailable(detail) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is temporarily unavailable",
            )
            .with_detail(detail),
            E::CardUpdateFailed(detail) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "failed to update card")
                    .with_detail(detail)
            }
        };
        error.because(reason)
    }
}

/// The longest error message answered, in bytes.
pub const MAX_ERROR_BYTES: usize = 512;

/// What ends a text cut short by [`bounded`].
pub const TRUNCATED: &str = "…[truncated]";

/// `text` cut to at most `max` bytes on a character boundary, ending with
/// [`TRUNCATED`] if it was cut.
pub fn bounded(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(TRUNCATED.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(TRUNCATED);
    text
}

/// The response header saying how a heartbeat's verdict was acknowledged.
pub const DURABILITY: &str = "heartgate-durability";

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Serve HTTP on `listener` until `shutdown` completes, then stop accepting
/// and wait (up to the grace period) for in-flight requests.
///
/// At most [`ServerConfig::max_connections`] connections are open (closing
/// ones included): at the cap, the idle connection (no request being
/// answered) open longest is closed before the next one is accepted, so
/// connections held open without a request (or a flood of them) cannot shut
/// out the probes or the runtimes, and the process never runs out of
/// descriptors for them. Reaching the cap and failing to accept are each
/// logged once per episode and counted.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let conns = Arc::new(Connections::new(
        app.config.max_connections,
        app.executor.metrics().connections.clone(),
    ));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut accept_failing = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(e) => {
                        if !std::mem::replace(&mut accept_failing, true) {
                            tracing::warn!(error = %e, open = conns.open(),
                                "accept failed; retrying (further failures of this episode are not logged)");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if std::mem::take(&mut accept_failing) {
                    tracing::info!("accepting connections again");
                }
                let conn = conns.admit();
                tokio::spawn(serve_connection(app.clone(), conns.clone(), conn, stream, stopping.clone()));
                // Room for the next one first: at the cap, the idle
                // connection open longest is closed (a connection waits in
                // the listen queue meanwhile, never for a descriptor).
                tokio::select! {
                    () = conns.room() => {}
                    () = &mut shutdown => break,
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = stop.send(true);
    let grace = app.config.shutdown_grace;
    tokio::select! {
        () = conns.all_closed() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("in-flight requests still running after the shutdown grace period");
        }
    }
    Ok(())
}

/// One connection, until it ends, is evicted while idle, or the service
/// shuts down (then its request in flight is answered first).
async fn serve_connection(
    app: Arc<App>,
    conns: Arc<Connections>,
    slot: Arc<ConnSlot>,
    stream: tokio::net::TcpStream,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let busy = slot.clone();
    let header_timeout = app.config.header_timeout;
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let app = app.clone();
                let guard = Busy::enter(&busy);
                async move {
                    let _guard = guard;
                    handle(app, req).await
                }
            }),
        );
    tokio::pin!(conn);
    let evicted = slot.evict.notified();
    tokio::pin!(evicted);
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    tokio::pin!(stop);
    let ended = tokio::select! {
        ended = conn.as_mut() => Some(ended),
        () = &mut evicted => {
            if slot.busy.load(std::sync::atomic::Ordering::Acquire) > 0 {
                // A request began since it was chosen: answer it, then close.
                conn.as_mut().graceful_shutdown();
                Some(conn.as_mut().await)
            } else {
                None
            }
        }
        () = &mut stop => {
            conn.as_mut().graceful_shutdown();
            Some(conn.as_mut().await)
        }
    };
    if let Some(Err(e)) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    conns.close(slot.id);
}

async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        workspace_id = tracing::field::Empty,
        chain_version = tracing::field::Empty,
        verdict = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    let route_name = route_label(req.uri().path());
    let registry = req.uri().path().starts_with("/registry/");
    let metrics = app.executor.metrics().clone();
    let refusals = app.refusals.clone();
    let resp = match route(app, req).instrument(span.clone()).await {
        Ok(resp) => resp,
        Err(e) => {
            span.in_scope(|| refused(&e, route_name, registry, &refusals));
            if registry {
                metrics.registry_rejection(route_name, e.reason);
            }
            e.into_response()
        }
    };
    span.record("status", resp.status().as_u16());
    metrics.request(route_name, resp.status().as_u16());
    span.in_scope(|| tracing::debug!("request done"));
    Ok(resp)
}

/// Log a refused request once: a registry route's at `info` (4xx) or `warn`
/// (5xx) with its reason key and the workspace id its body named, so an
/// operator sees a runtime knocking with a wrong id, token or body; other
/// routes' 5xx at `warn`. Never a token, a secret or a URL: the reason key,
/// the status and the detail of a 5xx only; within the budget of `log`,
/// each line saying how many of its route and reason were not logged since
/// the last (see [`RefusalLog`]).
fn refused(e: &ApiError, route: &'static str, registry: bool, log: &RefusalLog) {
    if !(registry || e.status.is_server_error()) {
        return;
    }
    let Some(unlogged) = log.admit(route, e.reason) else {
        return;
    };
    let status = e.status.as_u16();
    let workspace_id = e.workspace_id.as_deref().unwrap_or("");
    let detail = e.detail.as_deref().unwrap_or("");
    if e.status.is_server_error() {
        tracing::warn!(
            route,
            status,
            reason = e.reason,
            workspace_id,
            detail,
            unlogged,
            "request failed"
        );
    } else {
        tracing::info!(
            route,
            status,
            reason = e.reason,
            workspace_id,
            detail,
            unlogged,
            "registry request refused"
        );
    }
}

/// The most refusals of one route and reason logged in a second: a fleet
/// knocking with a stale token must not flood the log. The rest are only
/// counted (the metric counts every one), and the next line logged says
/// how many were not.
pub const REFUSALS_LOGGED_PER_SECOND: u32 = 20;

/// Refusals logged in the current second, by route and reason (fixed
/// strings, so the map stays small).
#[derive(Default)]
struct RefusalLog {
    windows: std::sync::Mutex<std::collections::HashMap<(&'static str, &'static str), Window>>,
}

struct Window {
    start: std::time::Instant,
    logged: u32,
    unlogged: u64,
}

impl RefusalLog {
    /// Whether to log this refusal: `Some(refusals not logged since the
    /// last line)`, or `None` past the second's budget.
    fn admit(&self, route: &'static str, reason: &'static str) -> Option<u64> {
        let now = std::time::Instant::now();
        let Ok(mut windows) = self.windows.lock() else {
            return Some(0);
        };
        let w = windows.entry((route, reason)).or_insert(Window {
            start: now,
            logged: 0,
            unlogged: 0,
        });
        if now.duration_since(w.start) >= Duration::from_secs(1) {
            w.start = now;
            w.logged = 0;
        }
        if w.logged >= REFUSALS_LOGGED_PER_SECOND {
            w.unlogged += 1;
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.unlogged))
    }
}

/// The OpenAPI document of every route, served at `GET /openapi.json`
/// (`tests/operability.rs` checks it against [`ROUTES`] and the router).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Every route the router answers, as method and path template.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/registry/register"),
    ("POST", "/registry/heartbeat"),
    ("POST", "/registry/update-card"),
    ("GET", "/workspaces/{id}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/admin/reconciles"),
    ("GET", "/admin/reconciles/{id}"),
    ("GET", "/admin/workspaces/{id}/plugins"),
    ("GET", "/admin/workspaces/{id}/history"),
    ("GET", "/admin/chain"),
    ("GET", "/admin/shadow"),
    ("POST", "/admin/shadow"),
    ("DELETE", "/admin/shadow"),
    ("POST", "/admin/modules"),
    ("POST", "/admin/modules/prune"),
    ("DELETE", "/admin/modules/{id}"),
    ("GET", "/admin/chains"),
    ("POST", "/admin/chains"),
    ("POST", "/admin/chains/rollback"),
    ("POST", "/admin/chains/{id}/activate"),
    ("POST", "/admin/eval"),
];

/// The route a request is counted under: its template in [`ROUTES`] (any
/// method), so clients cannot create metric series with their paths.
fn route_label(path: &str) -> &'static str {
    let matches = |template: &str| {
        let mut want = template.split('/');
        let mut got = path.split('/');
        loop {
            match (want.next(), got.next()) {
                (None, None) => return true,
                (Some("{id}"), Some(seg)) if !seg.is_empty() => {}
                (Some(w), Some(g)) if w == g => {}
                _ => return false,
            }
        }
    };
    match ROUTES.iter().find(|(_, template)| matches(template)) {
        Some((_, template)) => template,
        None if path.starts_with("/admin/") => "/admin/other",
        None => "other",
    }
}

async fn route(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::POST, "/registry/register") => registry::register(app, req).await,
        (&Method::POST, "/registry/heartbeat") => registry::heartbeat(app, req).await,
        (&Method::POST, "/registry/update-card") => registry::update_card(app, req).await,
        (&Method::GET, p) if workspace_path(p).is_some() => {
            let id = workspace_path(p).unwrap_or_default().to_string();
            registry::workspace(app, req, id).await
        }
        (&Method::GET, "/healthz") => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        (&Method::GET, "/readyz") => readyz(app).await,
        (&Method::GET, "/openapi.json") => {
            let mut resp = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(resp)
        }
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(app.executor.metrics().render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(resp)
        }
        (&Method::GET, p) if p.starts_with("/admin/") => admin::admin(app, req).await,
        (&Method::POST | &Method::DELETE, p) if p.starts_with("/admin/") => {
            admin::admin_write(app, req).await
        }
        (_, p) if p.starts_with("/admin/") => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method `{}` not allowed on `{path}`", req.method()),
        )),
        (
            _,
            "/registry/register"
            | "/registry/heartbeat"
            | "/registry/update-card"
            | "/healthz"
            | "/readyz"
            | "/metrics"
            | "/openapi.json",
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method `{}` not allowed on `{path}`", req.method()),
        )),
        (_, p) if workspace_path(p).is_some() => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "method `{}` not allowed on `/workspaces/{{id}}`",
                req.method()
            ),
        )),
        (_, p) => Err(match registry::other_subsystem(p) {
            Some(service) => registry::not_served_here(service),
            None => ApiError::new(StatusCode::NOT_FOUND, "not found"),
        }),
    }
}

/// The id of a `/workspaces/{id}` path.
fn workspace_path(path: &str) -> Option<&str> {
    path.strip_prefix("/workspaces/")
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Ready to serve: the database takes a write transaction, a chain is
/// loaded, the reconcile worker is running. 200 or 503, with each check.
async fn readyz(app: Arc<App>) -> Result<Response<Full<Bytes>>, ApiError> {
    let store = app.executor.store().clone();
    let database = match blocking(&app, move || store.check_writable()).await? {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    let chain = app.executor.chain();
    let chain = if chain.slots.is_empty() {
        json!({"ok": false, "error": "no chain is loaded"})
    } else {
        let serving = app.admin.policies().serving();
        json!({"ok": true, "version": chain.version, "chain": serving.chain,
               "activation": serving.activation})
    };
    let worker = if !app.reconcile_enabled {
        json!({"ok": true, "enabled": false})
    } else if app.worker.as_ref().is_some_and(|w| w.is_running()) {
        json!({"ok": true})
    } else {
        json!({"ok": false, "error": "the reconcile worker is not running"})
    };
    let ready = [&database, &chain, &worker]
        .iter()
        .all(|c| c["ok"] == json!(true));
    let body = json!({
        "status": if ready { "ready" } else { "unready" },
        "checks": {"database": database, "chain": chain, "reconcile_worker": worker},
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_response(status, &body))
}

async fn read_body(app: &App, req: Request<Incoming>) -> Result<(Option<String>, Bytes), ApiError> {
    read_body_limited(req, app.config.max_body_bytes, app.config.body_timeout).await
}

/// The largest policy module or chain upload accepted by the admin API.
pub const MAX_ADMIN_BODY_BYTES: usize = 16 << 20;

async fn read_body_limited(
    req: Request<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<(Option<String>, Bytes), ApiError> {
    let bearer = auth::bearer(req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes))
        .map(str::to_string);
    let collected = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {timeout:?}"),
            )
        })?;
    match collected {
        Ok(collected) => Ok((bearer, collected.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {limit} bytes"),
        )),
        Err(_) => Err(ApiError::invalid_body()),
    }
}

/// The deepest JSON nesting accepted, ignored fields included.
pub const MAX_JSON_DEPTH: usize = 32;

/// Parse a JSON body, refusing bad JSON, wrong types and deep nesting alike.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if json_depth(body) > MAX_JSON_DEPTH {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("request body nested deeper than {MAX_JSON_DEPTH} levels"),
        )
        .because("invalid_json"));
    }
    serde_json::from_slice(body).map_err(|_| ApiError::invalid_body())
}

/// The deepest nesting of arrays and objects in `body`, outside strings.
fn json_depth(body: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Run blocking executor work on a blocking thread, at most `max_in_flight`
/// at once.
async fn blocking<T: Send + 'static>(
    app: &App,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = app
        .permits
        .acquire()
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "request worker panicked");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        })
}

#[cfg(test)]
mod tests {
    use super::{json_depth, route_label};

    #[test]
    fn refusals_are_logged_within_a_budget_and_the_rest_counted() {
        let log = super::RefusalLog::default();
        let budget = super::REFUSALS_LOGGED_PER_SECOND as usize;
        let admitted: Vec<_> = (0..budget + 5)
            .map(|_| log.admit("/registry/heartbeat", "auth_invalid"))
            .collect();
        assert!(admitted[..budget].iter().all(|a| *a == Some(0)));
        assert!(admitted[budget..].iter().all(Option::is_none));
        // Another reason has its own budget.
        assert_eq!(log.admit("/registry/heartbeat", "invalid_json"), Some(0));
    }

    #[test]
    fn json_depth_counts_nesting_outside_strings() {
        assert_eq!(json_depth(br#"{"a":1}"#), 1);
        assert_eq!(json_depth(br#"{"a":[{"b":[]}]}"#), 4);
        assert_eq!(json_depth(br#"{"a":"[[[{{{\"[["}"#), 1);
        assert_eq!(json_depth(b"[[[]]]"), 3);
    }

    #[test]
    fn requests_are_counted_under_their_route_template() {
        assert_eq!(route_label("/registry/heartbeat"), "/registry/heartbeat");
        assert_eq!(
            route_label("/admin/workspaces/ws-1/history"),
            "/admin/workspaces/{id}/history"
        );
        assert_eq!(
            route_label("/admin/chains/7/activate"),
            "/admin/chains/{id}/activate"
        );
        assert_eq!(
            route_label("/admin/chains/rollback"),
            "/admin/chains/rollback"
        );
        assert_eq!(route_label("/admin/workspaces//history"), "/admin/other");
        assert_eq!(route_label("/admin/nope"), "/admin/other");
        assert_eq!(route_label("/registry/heartbeat/x"), "other");
        assert_eq!(route_label("/"), "other");
    }
}
