//! The admin API, behind the admin bearer token: reconcile runs, a
//! workspace's plugins and history, and the policy set (the active chain,
//! modules, staged chains, activation, rollback, evaluation without
//! effects, shadow mode). Reads are `GET /admin/...`; writes are `POST` and
//! `DELETE`, recorded with the operator the `X-Heartgate-Operator` header
//! names.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{
    ApiError, App, MAX_ADMIN_BODY_BYTES, blocking, json_response, parse_json, read_body_limited,
};
use crate::auth;
use crate::policy_set::{PolicySetError, SlotFixtures};

pub(super) fn check_admin(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
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

pub(super) async fn admin(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
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
        ["chains"] => {
            let limit = match query.split('&').find_map(|kv| kv.strip_prefix("limit=")) {
                None => 50,
                Some(n) => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_HISTORY).contains(n))
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            format!("limit must be 1-{MAX_HISTORY}"),
                        )
                    })?,
            };
            let history = blocking(&app, move || admin.policies().history(limit)).await??;
            serde_json::to_value(history).unwrap_or_default()
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

/// The most chains and activations `GET /admin/chains` answers at once.
const MAX_HISTORY: usize = 1000;

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

pub(super) async fn admin_write(
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
            let view = blocking(&app, move || admin.policies().shadow(shadow.chain, &by)).await??;
            (
                StatusCode::OK,
                serde_json::to_value(view).unwrap_or_default(),
            )
        }
        (Method::DELETE, ["shadow"]) => {
            let view = blocking(&app, move || admin.policies().clear_shadow(&by)).await??;
            (
                StatusCode::OK,
                serde_json::to_value(view).unwrap_or_default(),
            )
        }
        _ => return Err(ApiError::new(StatusCode::NOT_FOUND, "not found")),
    };
    Ok(json_response(status, &value))
}
