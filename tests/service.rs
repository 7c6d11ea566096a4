//! The whole service over real HTTP, with a real SQLite file and the real
//! compiled policies: the cases of spec section 8 that concern register,
//! heartbeat, the gate, the recovery trigger and the cooldown.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;
#[path = "liveness.rs"]
mod liveness;
#[path = "wire.rs"]
mod wire;

use std::sync::Arc;

use common::{MINUTE_MS, Service, T0_MS, assert_unchanged};
use heartgate::clock::ManualClock;
use heartgate::model::WorkspaceKind::{Platform, Workspace};
use heartgate::store::DecisionRow;
use hyper::StatusCode;
use serde_json::{Value, json};

const HEARTBEAT_MCP_MESSAGE: &str = "platform agent heartbeat denied: management MCP server absent (mcp_server_present=false); refusing to mark online (RCA #2970 FAIL-CLOSED)";
const HEARTBEAT_MODEL_MESSAGE: &str = "platform agent heartbeat denied: no seeded MODEL workspace_secret; refusing to mark online (RCA #2970 FAIL-CLOSED)";
const REGISTER_MCP_MESSAGE: &str = "platform agent registered without its management MCP server (mcp_server_present=false); refusing online";
const REGISTER_MODEL_MESSAGE: &str =
    "platform agent registered without a seeded MODEL secret; refusing online";
const MANAGEMENT_PLUGIN: &str = "molecule-ai-plugin-molecule-platform-mcp";

async fn start() -> (tempfile::TempDir, Service) {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(&dir.path().join("heartgate.db"), ManualClock::at(T0_MS)).await;
    (dir, svc)
}

fn mcp_missing(id: &str) -> Value {
    json!({"workspace_id": id, "error_rate": 0.0, "sample_error": "", "active_tasks": 0,
           "uptime_seconds": 60, "mcp_server_present": false})
}

fn healthy(id: &str) -> Value {
    json!({"workspace_id": id, "error_rate": 0.0, "sample_error": "", "active_tasks": 0, "uptime_seconds": 60})
}

/// An online platform workspace with a model configured.
fn online_concierge(svc: &Service, id: &str) -> String {
    let token = svc.provision(id, Platform, true);
    svc.force_status(id, "online");
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_missing_heartbeat_fails_closed_and_fires_recovery() {
    let (_dir, svc) = start().await;
    let token = online_concierge(&svc, "ws-mcp-fail");

    let (status, body) = svc.heartbeat(&token, mcp_missing("ws-mcp-fail")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    assert!(body["platform_inbound_secret"].is_string(), "{body}");

    let ws = svc.workspace("ws-mcp-fail");
    assert_eq!(ws["status"], "failed");
    assert_eq!(ws["last_sample_error"], HEARTBEAT_MCP_MESSAGE);
    let events = svc.events("ws-mcp-fail", "WORKSPACE_PROVISION_FAILED");
    assert_eq!(
        events,
        vec![
            json!({"error": HEARTBEAT_MCP_MESSAGE, "code": "PLATFORM_AGENT_IDENTITY_GATE",
                    "reason": "mcp_server_missing"})
        ]
    );
    assert_eq!(svc.runs("ws-mcp-fail", "mcp-recovery"), 1);
    // The worker takes the run (nothing is declared, so it has nothing to do).
    svc.wait_for("the run to finish", 30, |s| {
        s.store.reconcile_runs(Some("ws-mcp-fail")).unwrap()[0].state == "succeeded"
    })
    .await;
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_missing_heartbeat_fails_closed_without_recovery() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws-no-model", Platform, false);
    svc.force_status("ws-no-model", "online");

    // MCP present but no model: failed with the model message, no fire.
    let mut body = healthy("ws-no-model");
    body["mcp_server_present"] = json!(true);
    assert_eq!(svc.heartbeat(&token, body).await.0, StatusCode::OK);
    let ws = svc.workspace("ws-no-model");
    assert_eq!(ws["status"], "failed");
    assert_eq!(ws["last_sample_error"], HEARTBEAT_MODEL_MESSAGE);

    // Both missing: the model branch wins, still no fire.
    assert_eq!(
        svc.heartbeat(&token, mcp_missing("ws-no-model")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        svc.workspace("ws-no-model")["last_sample_error"],
        HEARTBEAT_MODEL_MESSAGE
    );
    assert_eq!(svc.runs("ws-no-model", "mcp-recovery"), 0);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_fires_once_per_five_minutes_then_again() {
    let (_dir, svc) = start().await;
    let token = online_concierge(&svc, "ws-x");

    svc.heartbeat(&token, mcp_missing("ws-x")).await;
    svc.heartbeat(&token, mcp_missing("ws-x")).await;
    assert_eq!(
        svc.runs("ws-x", "mcp-recovery"),
        1,
        "two immediate requests fire once"
    );

    svc.clock.advance(5 * MINUTE_MS - 1);
    svc.heartbeat(&token, mcp_missing("ws-x")).await;
    assert_eq!(
        svc.runs("ws-x", "mcp-recovery"),
        1,
        "still inside the cooldown"
    );

    svc.clock.advance(1);
    svc.heartbeat(&token, mcp_missing("ws-x")).await;
    assert_eq!(
        svc.runs("ws-x", "mcp-recovery"),
        2,
        "exactly five minutes later it fires"
    );
    assert_eq!(svc.status("ws-x"), "failed");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mcp_missing_heartbeats_queue_exactly_one_recovery() {
    let (_dir, svc) = start().await;
    let token = online_concierge(&svc, "ws-burst");
    let svc = Arc::new(svc);

    let mut tasks = Vec::new();
    for _ in 0..20 {
        let svc = svc.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            svc.heartbeat(&token, mcp_missing("ws-burst")).await
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(svc.runs("ws-burst", "mcp-recovery"), 1);
    assert_eq!(svc.status("ws-burst"), "failed");
    assert_eq!(
        svc.events("ws-burst", "WORKSPACE_PROVISION_FAILED").len(),
        20
    );
    Arc::try_unwrap(svc).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_inside_cooldown_still_suppresses_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let clock = ManualClock::at(T0_MS);
    let svc = Service::start(&db, clock.clone()).await;
    let token = online_concierge(&svc, "ws-restart");
    svc.heartbeat(&token, mcp_missing("ws-restart")).await;
    assert_eq!(svc.runs("ws-restart", "mcp-recovery"), 1);
    svc.stop().await;

    clock.advance(2 * MINUTE_MS);
    let svc = Service::start(&db, clock.clone()).await;
    svc.heartbeat(&token, mcp_missing("ws-restart")).await;
    assert_eq!(
        svc.runs("ws-restart", "mcp-recovery"),
        1,
        "the cooldown survived the restart"
    );

    clock.advance(3 * MINUTE_MS);
    svc.heartbeat(&token, mcp_missing("ws-restart")).await;
    assert_eq!(svc.runs("ws-restart", "mcp-recovery"), 2);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_and_heartbeat_share_one_cooldown() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws-shared", Platform, true);
    let (status, body) = svc
        .register(
            Some(&token),
            json!({"id": "ws-shared", "url": "http://agent", "agent_card": {"name": "c"},
                   "kind": "platform", "mcp_server_present": false}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, json!({"error": "platform agent identity incomplete"}));
    assert_eq!(svc.runs("ws-shared", "mcp-recovery"), 1);

    svc.clock.advance(MINUTE_MS);
    svc.heartbeat(&token, mcp_missing("ws-shared")).await;
    assert_eq!(svc.runs("ws-shared", "mcp-recovery"), 1);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_platform_gate_cases() {
    let (_dir, svc) = start().await;

    // No model: failed + 400, no token issued, no fire.
    svc.provision("no-model", Platform, false);
    svc.store.revoke_tokens("no-model", T0_MS, true).unwrap();
    let (status, body) = svc
        .register(None, json!({"id": "no-model", "url": "http://a", "agent_card": {}, "kind": "platform", "mcp_server_present": true}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, json!({"error": "platform agent identity incomplete"}));
    let ws = svc.workspace("no-model");
    assert_eq!(ws["status"], "failed");
    assert_eq!(ws["last_sample_error"], REGISTER_MODEL_MESSAGE);
    assert_eq!(ws["live_tokens"], 0, "a failing concierge gets no token");
    assert!(ws["last_register_failure_ms"].is_i64());
    assert_eq!(svc.runs("no-model", "mcp-recovery"), 0);

    // MCP false: failed + 400 + recovery fire.
    let token = svc.provision("no-mcp", Platform, true);
    let (status, _) = svc
        .register(Some(&token), json!({"id": "no-mcp", "url": "http://a", "agent_card": {}, "mcp_server_present": false}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        svc.workspace("no-mcp")["last_sample_error"],
        REGISTER_MCP_MESSAGE
    );
    assert_eq!(svc.runs("no-mcp", "mcp-recovery"), 1);

    // Already platform, model and MCP: 200 and stays platform.
    let token = svc.provision("good", Platform, true);
    let (status, body) = svc
        .register(Some(&token), json!({"id": "good", "url": "http://a", "agent_card": {}, "kind": "platform", "mcp_server_present": true}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ws = svc.workspace("good");
    assert_eq!(
        (ws["status"].as_str(), ws["kind"].as_str()),
        (Some("online"), Some("platform"))
    );

    // A non-platform row asking for platform: 403; an unknown id: 404.
    let token = svc.provision("plain", Workspace, true);
    let (status, body) = svc
        .register(
            Some(&token),
            json!({"id": "plain", "url": "http://a", "agent_card": {}, "kind": "platform"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body,
        json!({"error": "kind='platform' may only be assigned by the platform-agent install path"})
    );
    assert_eq!(svc.workspace("plain")["kind"], "workspace");
    let before = svc.quiet_dump().await;
    let (status, body) = svc
        .register(
            None,
            json!({"id": "fresh", "url": "http://a", "agent_card": {}, "kind": "platform"}),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({"error": "unknown workspace"}))
    );
    assert_unchanged(&before, &svc.quiet_dump().await);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_bootstrap_and_token_checks() {
    let (_dir, svc) = start().await;
    svc.provision("boot", Workspace, false);
    svc.store.revoke_tokens("boot", T0_MS, true).unwrap();
    let card = json!({"id": "boot", "url": "https://example.com/echo-agent",
                      "agent_card": {"name": "Echo Agent v2"}});

    // No live token: 200 with a token, once.
    let (status, body) = svc.register(None, card.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "registered");
    assert_eq!(body["delivery_mode"], "push");
    let token = body["auth_token"].as_str().expect("a token").to_string();
    assert_eq!(token.len(), 43);
    assert_eq!(svc.status("boot"), "online");

    // Live token and no bearer: 401, nothing written.
    let before = svc.quiet_dump().await;
    let (status, body) = svc.register(None, card.clone()).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing workspace auth token"})
        )
    );
    // Stale or other-workspace bearer: 401, nothing written.
    let (status, body) = svc.register(Some("stale-token"), card.clone()).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid workspace auth token"})
        )
    );
    let other = svc.provision("other", Workspace, false);
    let before_other = svc.quiet_dump().await;
    let (status, _) = svc.heartbeat(&other, healthy("boot")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_unchanged(&before_other, &svc.quiet_dump().await);
    assert_ne!(before, before_other);

    // The right token: 200 and no new token.
    let (status, body) = svc.register(Some(&token), card).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("auth_token").is_none());
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lookup_failure_fails_closed_with_503() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);
    let conn = rusqlite::Connection::open(&svc.db).unwrap();
    conn.execute_batch("ALTER TABLE auth_tokens RENAME TO auth_tokens_gone")
        .unwrap();
    let before = svc.quiet_dump().await;

    let (status, body) = svc.heartbeat(&token, healthy("ws")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({"error": "workspace auth temporarily unavailable"})
    );
    let (status, _) = svc
        .register(
            None,
            json!({"id": "ws", "url": "http://a", "agent_card": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_unchanged(&before, &svc.quiet_dump().await);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_status_transitions() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);

    for from in ["offline", "failed", "awaiting_agent", "provisioning"] {
        svc.force_status("ws", from);
        assert_eq!(svc.heartbeat(&token, healthy("ws")).await.0, StatusCode::OK);
        assert_eq!(svc.status("ws"), "online", "{from} -> online");
        let online = svc.events("ws", "WORKSPACE_ONLINE");
        assert_eq!(online.last().unwrap(), &json!({"recovered_from": from}));
    }
    assert_eq!(
        svc.runs("ws", "online"),
        4,
        "each recovery fires the online reconcile"
    );

    // Online with error rate 0.2 stays online.
    let mut hb = healthy("ws");
    hb["error_rate"] = json!(0.2);
    svc.heartbeat(&token, hb).await;
    assert_eq!(svc.status("ws"), "online");

    // Wedged online -> degraded; recovers only after the wedge clears and errors drop.
    let mut wedged = healthy("ws");
    wedged["runtime_state"] = json!("wedged");
    svc.heartbeat(&token, wedged.clone()).await;
    assert_eq!(svc.status("ws"), "degraded");
    svc.heartbeat(&token, wedged).await;
    assert_eq!(svc.status("ws"), "degraded");
    let mut erroring = healthy("ws");
    erroring["error_rate"] = json!(0.1);
    svc.heartbeat(&token, erroring).await;
    assert_eq!(svc.status("ws"), "degraded");
    svc.heartbeat(&token, healthy("ws")).await;
    assert_eq!(svc.status("ws"), "online");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_script_requests_degrade_and_recover() {
    let (_dir, svc) = start().await;
    svc.provision("echo", Workspace, false);
    svc.store.revoke_tokens("echo", T0_MS, true).unwrap();
    let (status, body) = svc
        .register(None, json!({"id":"echo","url":"https://example.com/echo-agent","agent_card":{"name":"Echo Agent v2","skills":[{"id":"echo","name":"Echo"},{"id":"repeat","name":"Repeat"}]}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let token = body["auth_token"].as_str().unwrap().to_string();
    let beats = [
        (
            json!({"workspace_id":"echo","error_rate":0.0,"sample_error":"","active_tasks":2,"uptime_seconds":120}),
            "online",
        ),
        (
            json!({"workspace_id":"echo","error_rate":0.8,"sample_error":"API rate limit","active_tasks":0,"uptime_seconds":130}),
            "degraded",
        ),
        (
            json!({"workspace_id":"echo","error_rate":0.0,"sample_error":"","active_tasks":0,"uptime_seconds":140}),
            "online",
        ),
    ];
    for (beat, expected) in beats {
        assert_eq!(svc.heartbeat(&token, beat).await.0, StatusCode::OK);
        assert_eq!(svc.status("echo"), expected);
    }
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_workspaces_are_never_touched() {
    let (_dir, svc) = start().await;
    let token = online_concierge(&svc, "gone");
    svc.force_status("gone", "removed");
    let before = svc.quiet_dump().await;
    let (status, _) = svc.heartbeat(&token, mcp_missing("gone")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = svc
        .register(
            Some(&token),
            json!({"id": "gone", "url": "http://a", "agent_card": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_unchanged(&before, &svc.quiet_dump().await);

    // Paused rows keep their status too.
    let token = svc.provision("paused", Workspace, false);
    svc.force_status("paused", "paused");
    let mut wedged = healthy("paused");
    wedged["runtime_state"] = json!("wedged");
    svc.heartbeat(&token, wedged).await;
    assert_eq!(svc.status("paused"), "paused");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_present_but_tools_missing_past_grace_degrades_and_fires_recovery() {
    let (_dir, svc) = start().await;
    let token = online_concierge(&svc, "ws-tools");
    svc.store
        .declare_plugin(
            "ws-tools",
            MANAGEMENT_PLUGIN,
            "local://molecule-platform-mcp",
            T0_MS,
        )
        .unwrap();
    let beat = json!({"workspace_id": "ws-tools", "error_rate": 0.0, "mcp_server_present": true,
                      "loaded_mcp_tools": []});

    svc.heartbeat(&token, beat.clone()).await;
    assert_eq!(svc.status("ws-tools"), "online", "inside the grace");
    svc.clock.advance(180_000);
    svc.heartbeat(&token, beat.clone()).await;
    assert_eq!(svc.status("ws-tools"), "online", "exactly at the grace");
    svc.clock.advance(1);
    svc.heartbeat(&token, beat).await;
    let ws = svc.workspace("ws-tools");
    assert_eq!(ws["status"], "degraded");
    assert_eq!(
        ws["last_sample_error"],
        "platform agent management MCP declared but not loaded; marking degraded (core#3082)"
    );
    assert_eq!(svc.runs("ws-tools", "mcp-recovery"), 1);

    // The tool loads: the stamp is forgotten and the workspace recovers.
    let loaded = json!({"workspace_id": "ws-tools", "mcp_server_present": true,
        "loaded_mcp_tools": ["mcp__molecule-platform__provision_workspace", "mcp__other__tool"]});
    svc.heartbeat(&token, loaded).await;
    assert_eq!(svc.status("ws-tools"), "online");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_examples_are_accepted_unmodified() {
    let (_dir, svc) = start().await;
    let id = "3f2b6c1e-0000-4000-8000-000000000001";
    let token = svc.provision(id, Workspace, false);
    let bodies = [
        (
            "/registry/heartbeat",
            r#"{"workspace_id":"3f2b6c1e-0000-4000-8000-000000000001","error_rate":0.5,"sample_error":"boom: sample error","active_tasks":1,"current_task":"demo task","uptime_seconds":0}"#,
        ),
        (
            "/registry/register",
            r#"{"id":"3f2b6c1e-0000-4000-8000-000000000001","url":"","agent_card":{"name":"Demo Agent","skills":[{"name":"research"},{"name":"code-review"}]},"delivery_mode":"poll"}"#,
        ),
        (
            "/registry/heartbeat",
            r#"{"workspace_id":"3f2b6c1e-0000-4000-8000-000000000001","error_rate":0.0,"sample_error":"","active_tasks":0,"uptime_seconds":0}"#,
        ),
        (
            "/registry/heartbeat",
            r#"{"workspace_id":"3f2b6c1e-0000-4000-8000-000000000001","error_rate":0.0,"sample_error":"","active_tasks":0,"current_task":"","uptime_seconds":42,
 "mcp_server_present":false,
 "platform_mcp_diag":{"on_platform_agent_image":false,"mcp_binary_present":false,"mcp_settings_entry":false,"mcp_command_resolved":null},
 "runtime_state":"wedged",
 "runtime_metadata":{"capabilities":{"status_mgmt":false},"idle_timeout_seconds":600}}"#,
        ),
        (
            "/registry/heartbeat",
            r#"{"workspace_id":"3f2b6c1e-0000-4000-8000-000000000001","error_rate":0.0,"loaded_mcp_tools":["mcp__molecule-platform__provision_workspace","mcp__other__tool"]}"#,
        ),
        (
            "/registry/register",
            r#"{"id":"3f2b6c1e-0000-4000-8000-000000000001","url":"http://agent:8000","agent_card":{"name":"n"},"mcp_server_present":true,"platform_mcp_diag":{},"delivery_mode":"push"}"#,
        ),
    ];
    for (path, body) in bodies {
        let (status, resp) = svc
            .post_raw("POST", path, Some(&token), body.to_string())
            .await;
        assert_eq!(status, StatusCode::OK, "{path} {body}: {resp}");
    }
    // The 0.5 heartbeat came first, from provisioning; the wedged one degraded it.
    let events = svc.events(id, "WORKSPACE_DEGRADED");
    assert!(!events.is_empty());
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400_and_write_nothing() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);
    let before = svc.quiet_dump().await;
    let invalid = json!({"error": "invalid request body"});
    let cases: Vec<(&str, &str, StatusCode, Value)> = vec![
        (
            "/registry/heartbeat",
            "{not json",
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/heartbeat",
            r#"{"error_rate":0.1}"#,
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/heartbeat",
            r#"{"workspace_id":""}"#,
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/heartbeat",
            r#"{"workspace_id":"ws","active_tasks":"3"}"#,
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/heartbeat",
            r#"{"workspace_id":"ws","mcp_server_present":"yes"}"#,
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/heartbeat",
            r#"{"workspace_id":"ws","loaded_mcp_tools":"a"}"#,
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/heartbeat",
            r#"{"workspace_id":"ws","error_rate":1e999}"#,
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/heartbeat",
            r#"{"workspace_id":"ws","error_rate":1.5}"#,
            StatusCode::BAD_REQUEST,
            json!({"error": "error_rate must be between 0 and 1"}),
        ),
        (
            "/registry/heartbeat",
            "[]",
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/register",
            r#"{"id":"ws-123"}"#,
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/register",
            r#"{"agent_card":{}}"#,
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/register",
            r#"{"id":"ws","agent_card":"card"}"#,
            StatusCode::BAD_REQUEST,
            invalid.clone(),
        ),
        (
            "/registry/register",
            r#"{"id":"ws","agent_card":{},"delivery_mode":"webhook"}"#,
            StatusCode::BAD_REQUEST,
            json!({"error": "delivery_mode must be 'push' or 'poll'"}),
        ),
        (
            "/registry/register",
            r#"{"id":"ws","agent_card":{},"kind":"bogus"}"#,
            StatusCode::BAD_REQUEST,
            json!({"error": "kind must be 'workspace' or 'platform'"}),
        ),
        (
            "/registry/heartbeat",
            r#"{"workspace_id":"nobody"}"#,
            StatusCode::NOT_FOUND,
            json!({"error": "unknown workspace"}),
        ),
    ];
    for (path, body, status, expected) in cases {
        let got = svc
            .post_raw("POST", path, Some(&token), body.to_string())
            .await;
        assert_eq!(got, (status, expected), "{path} {body}");
    }
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_body = format!(r#"{{"workspace_id":"ws","x":{deep}}}"#);
    let (status, _) = svc
        .post_raw("POST", "/registry/heartbeat", Some(&token), deep_body)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let huge = format!(
        r#"{{"workspace_id":"ws","sample_error":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let (status, _) = svc
        .post_raw("POST", "/registry/heartbeat", Some(&token), huge)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = svc
        .post_raw(
            "POST",
            "/registry/heartbeat",
            Some(&token),
            vec![0xff, 0xfe, 0x7b],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = svc
        .post_raw("GET", "/registry/heartbeat", Some(&token), "")
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = svc.post_raw("POST", "/nope", Some(&token), "{}").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Push mode without any URL: 400 after auth; it only stamps the failure.
    let (status, body) = svc
        .register(
            Some(&token),
            json!({"id": "ws", "url": "", "agent_card": {}}),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"error": "url is required for push-mode workspaces"})
        )
    );
    assert_eq!(svc.status("ws"), "provisioning");
    assert!(svc.workspace("ws")["last_register_failure_ms"].is_i64());
    let changed: Vec<_> = svc
        .quiet_dump()
        .await
        .into_iter()
        .filter(|r| !before.contains(r))
        .collect();
    assert!(
        changed
            .iter()
            .all(|r| r.starts_with("workspaces|") || r.starts_with("decisions|")),
        "{changed:?}"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_logged_with_its_chain_and_policies() {
    let (_dir, svc) = start().await;
    let token = online_concierge(&svc, "logged");
    svc.heartbeat(&token, mcp_missing("logged")).await;
    let decisions = svc.store.decisions("logged", 10).unwrap();
    assert_eq!(decisions.len(), 1);
    let d = &decisions[0];
    assert_eq!(d.outcome, "applied");
    assert_eq!(d.event_kind, "heartbeat");
    let steps = d.steps.as_array().unwrap();
    let policies: Vec<_> = steps
        .iter()
        .map(|s| s["policy"].as_str().unwrap())
        .collect();
    assert_eq!(
        policies,
        [
            "rca2970-gate",
            "status-rules",
            "liveness",
            "mcp-recovery-trigger",
            "recovery-cooldown"
        ]
    );
    assert!(
        steps
            .iter()
            .all(|s| s["digest"].as_str().unwrap().len() == 64)
    );
    let finals = d.final_actions.as_array().unwrap();
    assert!(
        finals
            .iter()
            .any(|a| a["kind"] == "request_reconcile" && a["trigger"] == "mcp-recovery")
    );
    assert_eq!(d.input["workspace"]["status"], "online");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_registration_creates_unknown_workspaces_when_turned_on() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_with(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        "127.0.0.1:0",
        |o| o.open_registration = true,
    )
    .await;
    let (status, body) = svc
        .register(
            None,
            json!({"id": "fresh-1", "url": "http://a", "agent_card": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["auth_token"].is_string());
    let ws = svc.workspace("fresh-1");
    assert_eq!(
        (ws["status"].as_str(), ws["kind"].as_str()),
        (Some("online"), Some("workspace"))
    );

    // Never platform, and never an id that cannot be a directory name.
    let (status, _) = svc
        .register(
            None,
            json!({"id": "fresh-2", "url": "http://a", "agent_card": {}, "kind": "platform"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(svc.store.workspace("fresh-2").unwrap().is_none());
    let (status, _) = svc
        .register(
            None,
            json!({"id": "../etc", "url": "http://a", "agent_card": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(svc.store.workspace("../etc").unwrap().is_none());
    assert!(svc.quiet_dump().await.iter().all(|r| !r.contains("../etc")));
    svc.stop().await;
}

/// The service keeps a cache of workspace snapshots; a change made by
/// another process (here: a second store on the same file, and raw SQL) must
/// still take effect on the very next heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_by_another_process_take_effect_on_the_next_heartbeat() {
    let (_dir, svc) = start().await;
    let old = svc.provision("cached", Workspace, true);
    let (status, _) = svc.heartbeat(&old, healthy("cached")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(svc.status("cached"), "online");

    // Rotated elsewhere: the cached snapshot still lists the old token, but
    // the verdict computed from it is refused at write, and the fresh read
    // refuses the token.
    svc.store.revoke_tokens("cached", T0_MS, false).unwrap();
    let new = svc.issue_token("cached");
    let decisions = svc.store.decisions("cached", 100).unwrap().len();
    let (status, body) = svc.heartbeat(&old, healthy("cached")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(svc.store.decisions("cached", 100).unwrap().len(), decisions);

    let (status, body) = svc.heartbeat(&new, healthy("cached")).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Issued elsewhere, so not in the cached snapshot: a refusal is never
    // answered from the cache.
    let another = svc.issue_token("cached");
    let (status, body) = svc.heartbeat(&another, healthy("cached")).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A status changed by raw SQL: the next heartbeat decides on it (the
    // cached snapshot is used only once its version is confirmed).
    svc.force_status("cached", "offline");
    let (status, _) = svc.heartbeat(&another, healthy("cached")).await;
    assert_eq!(status, StatusCode::OK);
    svc.wait_for("the heartbeat evaluated on fresh state", 30, |s| {
        s.status("cached") == "online"
    })
    .await;
    assert_eq!(svc.events("cached", "WORKSPACE_ONLINE").len(), 2);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_only_heartbeats_are_acknowledged_once_queued_and_conflicts_evaluated_again() {
    let (_dir, svc) = start().await;
    let token = svc.provision("early", Workspace, true);
    // A status change is committed before the answer.
    let (status, durability) = svc.heartbeat_durability(&token, healthy("early")).await;
    assert_eq!((status, durability.as_str()), (StatusCode::OK, "committed"));
    assert_eq!(svc.status("early"), "online");
    // Liveness only: acknowledged once queued for the writer.
    let mut beat = healthy("early");
    beat["current_task"] = json!("queued");
    let (status, durability) = svc.heartbeat_durability(&token, beat).await;
    assert_eq!((status, durability.as_str()), (StatusCode::OK, "queued"));
    // Let the writer write it before anything changes: a change made
    // meanwhile would send it to be evaluated again, and that evaluation,
    // running beside the ones below, could take their turn.
    written(&svc, "queued").await;

    // A change made elsewhere before a heartbeat is read is seen by it: the
    // heartbeat is decided on the fresh state and committed.
    svc.force_status("early", "offline");
    let (status, durability) = svc.heartbeat_durability(&token, healthy("early")).await;
    assert_eq!((status, durability.as_str()), (StatusCode::OK, "committed"));
    assert_eq!(svc.status("early"), "online");

    // Another process takes the workspace offline while an acknowledged
    // liveness-only verdict is still held by the writer (up to 250 ms): the
    // writer finds the workspace changed, and the service evaluates the
    // heartbeat again on fresh state, which brings the workspace back online
    // with no further heartbeat. (If the test thread was too slow and the
    // verdict got written first, the round is tried again.)
    let mut retried = false;
    for round in 0..10 {
        // Each round's heartbeat carries its own nonce, so its decisions are
        // told from any other round's late ones.
        let nonce = format!("round-{round}");
        let mut beat = healthy("early");
        beat["current_task"] = json!(nonce);
        let (status, durability) = svc.heartbeat_durability(&token, beat).await;
        assert_eq!((status, durability.as_str()), (StatusCode::OK, "queued"));
        svc.force_status("early", "offline");
        let decision = written(&svc, &nonce).await;
        if decision.attempts == 2 {
            assert_eq!(
                decision.input["workspace"]["status"],
                json!("offline"),
                "the re-evaluation on fresh state: {decision:?}"
            );
            svc.wait_for("the workspace back online", 10, |s| {
                s.status("early") == "online"
            })
            .await;
            retried = true;
            break;
        }
        // Written before the change: bring it back and try again.
        let (status, _) = svc.heartbeat_durability(&token, healthy("early")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(svc.status("early"), "online");
    }
    assert!(retried, "no held verdict ever met a change made elsewhere");
    svc.stop().await;
}

/// The decision row of the heartbeat of `early` whose current task is
/// `nonce`, once the writer has written it.
async fn written(svc: &Service, nonce: &str) -> DecisionRow {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let found = svc
            .store
            .decisions("early", 100)
            .unwrap()
            .into_iter()
            .find(|d| d.input["event"]["heartbeat"]["current_task"] == json!(nonce));
        if let Some(d) = found {
            return d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "heartbeat {nonce} was never written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
