//! The HTTP layer: the only code that knows hyper and JSON bodies.
//!
//! Routes: `POST /registry/register`, `POST /registry/heartbeat`,
//! `GET /healthz`, and the admin API behind the admin bearer token:
//! `GET /admin/reconciles[?workspace=ID]`, `GET /admin/reconciles/{id}`,
//! `GET /admin/workspaces/{id}/plugins`, and the policy set:
//! `GET /admin/chain`, `POST /admin/modules` (raw component bytes),
//! `POST /admin/chains` (stage), `POST /admin/chains/{id}/activate`,
//! `POST /admin/chains/rollback`, `POST /admin/eval`, and shadow mode:
//! `POST|GET|DELETE /admin/shadow`. Bodies are size-limited, unknown JSON fields are ignored,
//! wrong types and bad JSON are 400 with nothing written. Every error is one
//! [`ApiError`] rendered as `{"error": "..."}`; database text never reaches a
//! client. A heartbeat is evaluated on the async worker that read it (the
//! policies yield at every epoch tick) and awaits its commit there; registers
//! and admin work run on blocking threads, at most
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
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

mod connections;

use self::connections::{Busy, ConnSlot, Connections};
use crate::admin::Admin;
use crate::auth;
use crate::executor::{Executor, HeartbeatRequest, RegisterRequest, RegistryError};
use crate::model::{HeartbeatEvent, WorkspaceKind};
use crate::policy_set::{PolicySetError, SlotFixtures};

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
}

impl App {
    pub fn new(executor: Arc<Executor>, admin: Admin, config: ServerConfig) -> App {
        App {
            executor,
            admin: Arc::new(admin),
            permits: Semaphore::new(config.max_in_flight.max(1)),
            config,
            worker: None,
        }
    }

    /// Report `worker`'s state in `/readyz` (without one, `/readyz` says
    /// the reconcile worker is not running).
    pub fn with_worker(mut self, worker: Arc<crate::reconcile::Worker>) -> App {
        self.worker = Some(worker);
        self
    }
}

/// An HTTP error, rendered as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// The HTTP status it renders with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// An error answering `message`, cut to [`MAX_ERROR_BYTES`]: a message
    /// may quote what the client sent, and never echoes it whole.
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: bounded(message.into(), MAX_ERROR_BYTES),
        }
    }

    fn invalid_body() -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid request body")
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        json_response(self.status, &json!({ "error": self.message }))
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        use RegistryError as E;
        match err {
            E::UnknownWorkspace => ApiError::new(StatusCode::NOT_FOUND, "unknown workspace"),
            E::MissingToken => {
                ApiError::new(StatusCode::UNAUTHORIZED, "missing workspace auth token")
            }
            E::InvalidToken => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid workspace auth token")
            }
            E::AuthUnavailable(e) => {
                tracing::error!(error = %e, "token lookup failed; refusing the request");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "workspace auth temporarily unavailable",
                )
            }
            E::StateUnavailable { what, error } => {
                tracing::error!(error = %error, "reading a workspace failed; refusing the request");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("workspace state temporarily unavailable: reading {what} failed"),
                )
            }
            E::PlatformKindRefused => ApiError::new(StatusCode::FORBIDDEN, err.to_string()),
            E::Rejected {
                http_status,
                message,
            } => ApiError::new(
                StatusCode::from_u16(http_status).unwrap_or(StatusCode::BAD_REQUEST),
                message,
            ),
            E::UrlRequired | E::BadWorkspaceId(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, err.to_string())
            }
            E::RegistrationFailed(detail) => {
                tracing::error!(detail, "registration failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "registration failed")
            }
            E::UpdateFailed(detail) => {
                tracing::error!(detail, "heartbeat update failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "failed to update")
            }
        }
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
    let metrics = app.executor.metrics().clone();
    let resp = route(app, req).instrument(span.clone()).await;
    let resp = resp.unwrap_or_else(ApiError::into_response);
    span.record("status", resp.status().as_u16());
    metrics.request(route_name, resp.status().as_u16());
    span.in_scope(|| tracing::debug!("request done"));
    Ok(resp)
}

/// The OpenAPI document of every route, served at `GET /openapi.json`
/// (`tests/operability.rs` checks it against [`ROUTES`] and the router).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Every route the router answers, as method and path template.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/registry/register"),
    ("POST", "/registry/heartbeat"),
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
        (&Method::POST, "/registry/register") => register(app, req).await,
        (&Method::POST, "/registry/heartbeat") => heartbeat(app, req).await,
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
        (&Method::GET, p) if p.starts_with("/admin/") => admin(app, req).await,
        (&Method::POST | &Method::DELETE, p) if p.starts_with("/admin/") => {
            admin_write(app, req).await
        }
        (_, p) if p.starts_with("/admin/") => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method `{}` not allowed on `{path}`", req.method()),
        )),
        (
            _,
            "/registry/register"
            | "/registry/heartbeat"
            | "/healthz"
            | "/readyz"
            | "/metrics"
            | "/openapi.json",
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method `{}` not allowed on `{path}`", req.method()),
        )),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "not found")),
    }
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
        json!({"ok": true, "version": chain.version})
    };
    let worker = if app.worker.as_ref().is_some_and(|w| w.is_running()) {
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
        ));
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

fn check_admin(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(expected) = app.admin.token_hash() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: no admin token is configured",
        ));
    };
    let presented = auth::bearer(req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes))
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing admin token"))?;
    if auth::check(Some(presented), &[expected], false) != auth::AuthCheck::Token {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid admin token",
        ));
    }
    Ok(())
}

async fn admin(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    check_admin(&app, &req)?;
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
    let store_error = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "admin read failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database could not be read",
        )
    };
    let admin = app.admin.clone();
    let body = match segments.as_slice() {
        ["reconciles"] => {
            let workspace = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("workspace="))
                .map(str::to_string);
            let runs = blocking(&app, move || admin.runs(workspace.as_deref()))
                .await?
                .map_err(store_error)?;
            json!({ "runs": runs })
        }
        ["reconciles", id] => {
            let id: i64 = id.parse().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("run id `{id}` is not a number"),
                )
            })?;
            let run = blocking(&app, move || admin.run(id))
                .await?
                .map_err(store_error)?;
            let run = run.ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, format!("no reconcile run {id}"))
            })?;
            serde_json::to_value(run).unwrap_or_default()
        }
        ["chain"] => {
            let view = blocking(&app, move || admin.policies().active()).await??;
            serde_json::to_value(view).unwrap_or_default()
        }
        ["shadow"] => serde_json::to_value(admin.policies().shadow_report()).unwrap_or_default(),
        ["workspaces", id, "history"] => {
            let limit = match query.split('&').find_map(|kv| kv.strip_prefix("limit=")) {
                None => 20,
                Some(n) => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=crate::history::MAX_DECISIONS).contains(n))
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            format!("limit must be 1-{}", crate::history::MAX_DECISIONS),
                        )
                    })?,
            };
            let id = id.to_string();
            let store = app.executor.store().clone();
            let history = blocking(&app, move || {
                // Liveness-only verdicts acknowledged before their commit
                // are part of the story.
                store.flush();
                crate::history::history(store.as_ref(), &id, limit)
            })
            .await?
            .map_err(store_error)?
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown workspace"))?;
            serde_json::to_value(history).unwrap_or_default()
        }
        ["workspaces", id, "plugins"] => {
            let id = id.to_string();
            let view = blocking(&app, move || admin.plugins(&id))
                .await?
                .map_err(store_error)?
                .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown workspace"))?;
            serde_json::to_value(view).unwrap_or_default()
        }
        _ => return Err(ApiError::new(StatusCode::NOT_FOUND, "not found")),
    };
    Ok(json_response(StatusCode::OK, &body))
}

impl From<PolicySetError> for ApiError {
    fn from(err: PolicySetError) -> Self {
        use PolicySetError as E;
        let status = match &err {
            E::Module(_) | E::Chain(_) | E::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            E::NotFound(_) => StatusCode::NOT_FOUND,
            E::NoPrevious | E::InUse(_) => StatusCode::CONFLICT,
            E::Quota(_) => StatusCode::INSUFFICIENT_STORAGE,
            E::Store(e) => {
                tracing::error!(error = %e, "policy set storage failed");
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the database could not be written",
                );
            }
        };
        ApiError::new(status, err.to_string())
    }
}

/// A stage request: the chain and, optionally, fixtures per slot.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageBody {
    slot: Vec<crate::chain::SlotSpec>,
    #[serde(default)]
    fixtures: Vec<SlotFixtures>,
}

/// An evaluation request: an input, against the active chain or chain `chain`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalBody {
    input: crate::model::Input,
    #[serde(default)]
    chain: Option<i64>,
}

/// Who is acting, for the record: the `X-Heartgate-Operator` header, else `admin`.
fn operator(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-heartgate-operator")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "admin".to_string())
}

async fn admin_write(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    check_admin(&app, &req)?;
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let by = operator(&req);
    let (_, body) = read_body_limited(req, MAX_ADMIN_BODY_BYTES, app.config.body_timeout).await?;
    let segments: Vec<String> = path
        .trim_start_matches("/admin/")
        .split('/')
        .map(str::to_string)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let admin = app.admin.clone();
    let (status, value) = match (method, segments.as_slice()) {
        (Method::POST, ["modules"]) => {
            let bytes = body.to_vec();
            let view = blocking(&app, move || admin.policies().push(bytes, &by)).await??;
            (
                StatusCode::CREATED,
                serde_json::to_value(view).unwrap_or_default(),
            )
        }
        (Method::POST, ["modules", "prune"]) => {
            let report = blocking(&app, move || admin.policies().prune()).await??;
            (
                StatusCode::OK,
                serde_json::to_value(report).unwrap_or_default(),
            )
        }
        (Method::DELETE, ["modules", module]) => {
            let module = module.to_string();
            let deleted = blocking(&app, move || admin.policies().delete_module(&module)).await??;
            (
                StatusCode::OK,
                serde_json::to_value(deleted).unwrap_or_default(),
            )
        }
        (Method::POST, ["chains"]) => {
            let stage: StageBody = parse_json(&body)?;
            let spec = crate::chain::ChainSpec { slot: stage.slot };
            let fixtures = stage.fixtures;
            let chain =
                blocking(&app, move || admin.policies().stage(spec, fixtures, &by)).await??;
            (
                StatusCode::CREATED,
                serde_json::to_value(chain).unwrap_or_default(),
            )
        }
        (Method::POST, ["chains", "rollback"]) => {
            let chain = blocking(&app, move || admin.policies().rollback(&by)).await??;
            (
                StatusCode::OK,
                serde_json::to_value(chain).unwrap_or_default(),
            )
        }
        (Method::POST, ["chains", id, "activate"]) => {
            let id: i64 = id.parse().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("chain id `{id}` is not a number"),
                )
            })?;
            let chain = blocking(&app, move || admin.policies().activate(id, &by)).await??;
            (
                StatusCode::OK,
                serde_json::to_value(chain).unwrap_or_default(),
            )
        }
        (Method::POST, ["eval"]) => {
            let eval: EvalBody = parse_json(&body)?;
            let view =
                blocking(&app, move || admin.policies().eval(&eval.input, eval.chain)).await??;
            (
                StatusCode::OK,
                serde_json::to_value(view).unwrap_or_default(),
            )
        }
        (Method::POST, ["shadow"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct ShadowBody {
                chain: i64,
            }
            let shadow: ShadowBody = parse_json(&body)?;
            let view = blocking(&app, move || admin.policies().shadow(shadow.chain)).await??;
            (
                StatusCode::OK,
                serde_json::to_value(view).unwrap_or_default(),
            )
        }
        (Method::DELETE, ["shadow"]) => {
            let view = blocking(&app, move || admin.policies().clear_shadow()).await?;
            (
                StatusCode::OK,
                serde_json::to_value(view).unwrap_or_default(),
            )
        }
        _ => return Err(ApiError::new(StatusCode::NOT_FOUND, "not found")),
    };
    Ok(json_response(status, &value))
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

async fn register(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (bearer, body) = read_body(&app, req).await?;
    let request = decode_register(bearer, &body)?;
    tracing::Span::current().record("workspace_id", request.id.as_str());
    let executor = app.executor.clone();
    let registered = blocking(&app, move || executor.register(&request)).await??;
    tracing::Span::current().record("verdict", registered.verdict.as_str());
    tracing::Span::current().record("chain_version", registered.chain_version.as_str());
    let mut out = json!({"status": "registered", "delivery_mode": registered.delivery_mode});
    if let Some(token) = registered.auth_token {
        out["auth_token"] = json!(token);
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
}

async fn heartbeat(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (bearer, body) = read_body(&app, req).await?;
    let request = decode_heartbeat(bearer, &body, &app.config.input)?;
    tracing::Span::current().record("workspace_id", request.workspace_id.as_str());
    // Evaluated on this worker (the chain yields at every epoch tick, so a
    // slow policy cannot hold it), and the commit is awaited here unless the
    // verdict records only liveness: no hand-off to another thread and no
    // thread waiting for the writer.
    let ack = app.executor.heartbeat_acknowledged(&request).await?;
    tracing::Span::current().record("verdict", ack.verdict.as_str());
    tracing::Span::current().record("chain_version", ack.chain_version.as_str());
    let mut resp = json_response(StatusCode::OK, &json!({"status": "ok"}));
    // Runtimes read only the body; this says whether the verdict was
    // committed before the answer or (liveness only) queued for the writer.
    resp.headers_mut().insert(
        DURABILITY,
        HeaderValue::from_static(if ack.committed { "committed" } else { "queued" }),
    );
    Ok(resp)
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
        ));
    }
    let kind = match body.kind.as_deref() {
        None | Some("") => None,
        Some(k) => Some(WorkspaceKind::parse(k).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "kind must be 'workspace' or 'platform'",
            )
        })?),
    };
    if body.url.as_ref().is_some_and(|u| u.len() > MAX_URL_BYTES) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("url longer than {MAX_URL_BYTES} bytes"),
        ));
    }
    let card_text = agent_card.to_string();
    if card_text.len() > MAX_AGENT_CARD_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("agent_card larger than {MAX_AGENT_CARD_BYTES} bytes"),
        ));
    }
    let card_url = agent_card
        .get("url")
        .and_then(|u| u.as_str())
        .filter(|u| u.len() <= MAX_URL_BYTES)
        .map(str::to_string);
    check_tools(body.loaded_mcp_tools.as_deref())?;
    let capabilities = decode_capabilities(body.runtime_metadata.as_ref())?;
    Ok(RegisterRequest {
        id,
        bearer,
        url: body.url,
        agent_card_url: card_url,
        agent_card: card_text,
        delivery_mode,
        kind,
        mcp_server_present: body.mcp_server_present,
        loaded_mcp_tools: body.loaded_mcp_tools,
        capabilities,
    })
}

/// The most capabilities a runtime may declare, and their names' length.
pub const MAX_CAPABILITIES: usize = 64;
pub const MAX_CAPABILITY_NAME_BYTES: usize = 64;

/// The capabilities `runtime_metadata` declares (those set to `true`),
/// sorted; none when it is absent (a register without it clears them, as
/// the original registry does). `idle_timeout_seconds`, if sent, must be a
/// non-negative integer.
fn decode_capabilities(meta: Option<&serde_json::Value>) -> Result<Vec<String>, ApiError> {
    let bad =
        |what: &str| ApiError::new(StatusCode::BAD_REQUEST, format!("runtime_metadata{what}"));
    let meta = match meta {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => return Err(bad(" must be an object")),
    };
    match meta.get("idle_timeout_seconds") {
        None | Some(serde_json::Value::Null) => {}
        Some(v) if v.as_u64().is_some() => {}
        Some(_) => return Err(bad(".idle_timeout_seconds must be a non-negative integer")),
    }
    let caps = match meta.get("capabilities") {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
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
    Ok(on)
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
        ));
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
        ));
    }
    let active_tasks = non_negative("active_tasks", body.active_tasks)?;
    let uptime_seconds = non_negative("uptime_seconds", body.uptime_seconds)?;
    check_tools(body.loaded_mcp_tools.as_deref())?;
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
    })
}

/// A count or a duration of a heartbeat: absent is 0, negative is refused.
fn non_negative(field: &str, value: Option<i64>) -> Result<i64, ApiError> {
    match value.unwrap_or(0) {
        n if n < 0 => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{field} must not be negative"),
        )),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::{json_depth, route_label};

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
