//! Wire parity with the original registry: what real runtimes read and send
//! beyond register and heartbeat's status (the platform inbound secret,
//! `runtime_metadata`, the heartbeat's agent-card backfill, update-card, the
//! agent URL rules, reading a workspace back, and the diagnostics of a
//! refused request), against the running service.
//!
//! A module of the `service` test binary (one binary less to link in CI):
//! `cargo test --release --test service wire::`.

use std::time::Duration;

use crate::common::binary::{Serve, cli, http_client, request, write_config};
use crate::common::{ADMIN, Service, T0_MS};
use heartgate::agent_url::{AgentUrlMode, AgentUrlPolicy};
use heartgate::clock::ManualClock;
use heartgate::model::WorkspaceKind::{Platform, Workspace};
use hyper::StatusCode;
use serde_json::{Value, json};

async fn start() -> (tempfile::TempDir, Service) {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_admin(&dir.path().join("hg.db"), ManualClock::at(T0_MS)).await;
    (dir, svc)
}

fn beat(id: &str) -> Value {
    json!({"workspace_id": id, "error_rate": 0.0, "sample_error": "", "active_tasks": 0,
           "uptime_seconds": 60})
}

fn register_body(id: &str) -> Value {
    json!({"id": id, "url": "http://localhost:8000/agent", "agent_card": {"name": id}})
}

/// Run `sql` on the service's database from another connection (what an
/// operator's `sqlite3` would do): a trigger that makes one write fail.
fn sql(svc: &Service, sql: &str) {
    let conn = rusqlite::Connection::open(&svc.db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch(sql).unwrap();
}

fn stored_secret(svc: &Service, id: &str) -> Option<String> {
    let conn = rusqlite::Connection::open(&svc.db).unwrap();
    conn.query_row(
        "SELECT platform_inbound_secret FROM workspaces WHERE id = ?1",
        [id],
        |r| r.get(0),
    )
    .unwrap()
}

/// Test list item 29 of the original, for register and heartbeat: a stored
/// secret is returned, a missing one is minted (once, then always the same),
/// and a failed mint answers 200 without the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_secret_returned_minted_and_omitted_on_failure() {
    let (_dir, svc) = start().await;

    // Stored: the operator rotated one in, with the CLI in another process
    // (which never prints it).
    let token = svc.provision("stored", Workspace, false);
    let said = cli(&svc.db, &["workspace", "rotate-inbound-secret", "stored"]);
    let secret = stored_secret(&svc, "stored").unwrap();
    assert_eq!(secret.len(), 43);
    assert!(
        !said.contains(&secret),
        "the CLI printed the secret: {said}"
    );
    let (status, body) = svc.register(Some(&token), register_body("stored")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["platform_inbound_secret"], secret.as_str());
    let (status, body) = svc.heartbeat(&token, beat("stored")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["platform_inbound_secret"], secret.as_str());
    let refused = crate::common::binary::cli_output(
        &svc.db,
        &["workspace", "rotate-inbound-secret", "nobody"],
    );
    assert!(!refused.status.success());

    // None stored: minted by the register, then the same everywhere.
    let token = svc.provision("minted", Workspace, false);
    assert_eq!(stored_secret(&svc, "minted"), None);
    let (_, body) = svc.register(Some(&token), register_body("minted")).await;
    let minted = body["platform_inbound_secret"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(minted.len(), 43, "32 random bytes, base64url: {minted}");
    assert_eq!(
        stored_secret(&svc, "minted").as_deref(),
        Some(minted.as_str())
    );
    for _ in 0..3 {
        let (_, body) = svc.heartbeat(&token, beat("minted")).await;
        assert_eq!(body["platform_inbound_secret"], minted.as_str());
    }
    // Minted by a heartbeat (a runtime that never registered here).
    let token = svc.provision("by-beat", Workspace, false);
    let (status, body) = svc.heartbeat(&token, beat("by-beat")).await;
    assert_eq!(status, StatusCode::OK);
    let by_beat = body["platform_inbound_secret"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(by_beat, minted);
    let (_, body) = svc.register(Some(&token), register_body("by-beat")).await;
    assert_eq!(body["platform_inbound_secret"], by_beat.as_str());

    // Rotated: the next answers carry the new one.
    let rotated = heartgate::auth::InboundSecret::mint().unwrap();
    svc.store
        .rotate_inbound_secret("by-beat", &rotated, T0_MS)
        .unwrap();
    let (_, body) = svc.heartbeat(&token, beat("by-beat")).await;
    assert_eq!(body["platform_inbound_secret"], rotated.expose());

    // The mint fails (the database refuses the write): 200 without it.
    sql(
        &svc,
        "CREATE TRIGGER no_secrets BEFORE UPDATE OF platform_inbound_secret ON workspaces
         BEGIN SELECT RAISE(ABORT, 'secrets refused'); END;",
    );
    let token = svc.provision("refused", Workspace, false);
    let (status, body) = svc.register(Some(&token), register_body("refused")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "registered");
    assert!(body.get("platform_inbound_secret").is_none(), "{body}");
    let (status, body) = svc.heartbeat(&token, beat("refused")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"status": "ok"}));
    assert_eq!(stored_secret(&svc, "refused"), None);
    // Once the database takes it again, the next heartbeat mints it.
    sql(&svc, "DROP TRIGGER no_secrets;");
    let (_, body) = svc.heartbeat(&token, beat("refused")).await;
    assert!(body["platform_inbound_secret"].is_string(), "{body}");
    svc.stop().await;
}

/// `runtime_metadata.capabilities.status_mgmt` (section 3.3 steps 5, 6 and
/// 8): the runtime manages its own status, so its error rate neither
/// degrades it nor holds it degraded; a wedge still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_mgmt_runtime_is_not_degraded_by_error_rate() {
    let (_dir, svc) = start().await;
    let native = |id: &str, rate: f64, on: bool| {
        json!({"workspace_id": id, "error_rate": rate, "sample_error": "rate limited",
               "active_tasks": 0, "uptime_seconds": 60,
               "runtime_metadata": {"capabilities": {"status_mgmt": on}, "idle_timeout_seconds": 600}})
    };
    for id in ["native", "plain"] {
        let token = svc.provision(id, Workspace, false);
        svc.register(Some(&token), register_body(id)).await;
        let on = id == "native";
        let (status, _) = svc.heartbeat(&token, native(id, 0.8, on)).await;
        assert_eq!(status, StatusCode::OK);
        let expected = if on { "online" } else { "degraded" };
        assert_eq!(svc.status(id), expected, "{id} at error_rate 0.8");
        // Stored and shown.
        let shown = svc.workspace(id);
        assert_eq!(shown["idle_timeout_seconds"], 600);
        let caps = if on {
            json!(["status_mgmt"])
        } else {
            json!([])
        };
        assert_eq!(shown["capabilities"], caps);
        // The wedge is not the runtime's to hide.
        let mut wedged = native(id, 0.8, on);
        wedged["runtime_state"] = json!("wedged");
        if on {
            svc.heartbeat(&token, wedged).await;
            assert_eq!(svc.status(id), "degraded", "wedged native runtime");
            // Not wedged any more: back online at any error rate.
            svc.heartbeat(&token, native(id, 0.8, on)).await;
            assert_eq!(svc.status(id), "online");
        }
    }
    // A runtime that stops declaring it is judged again (absent clears it,
    // as in the original).
    let token = svc.issue_token("native");
    let mut plain = native("native", 0.8, true);
    plain.as_object_mut().unwrap().remove("runtime_metadata");
    svc.heartbeat(&token, plain).await;
    assert_eq!(svc.status("native"), "degraded");
    assert_eq!(svc.workspace("native")["capabilities"], json!([]));
    assert_eq!(svc.workspace("native")["idle_timeout_seconds"], Value::Null);
    svc.stop().await;
}

/// Section 1.5 step 7 and test list item 26: a heartbeat's card fills a
/// workspace whose register failed (no card stored) and clears the
/// register-failure stamp, in time for this heartbeat's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_backfills_agent_card_and_clears_register_failure() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);
    svc.register(Some(&token), register_body("ws")).await;
    let card = json!({"name": "Echo", "skills": [{"id": "echo"}]});

    // The runtime's register fails (push without a URL): stamped, and its
    // next plain heartbeat is degraded by the register failure.
    let (status, body) = svc
        .register(
            Some(&token),
            json!({"id": "ws", "agent_card": {}, "delivery_mode": "push"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    sql(
        &svc,
        "UPDATE workspaces SET agent_card = NULL WHERE id = 'ws'",
    );
    assert!(svc.workspace("ws")["last_register_failure_ms"].is_i64());
    svc.heartbeat(&token, beat("ws")).await;
    assert_eq!(svc.status("ws"), "degraded");

    // A heartbeat with its card: stored, stamp cleared, online at once.
    let mut with_card = beat("ws");
    with_card["agent_card"] = card.clone();
    let (status, body) = svc.heartbeat(&token, with_card).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, shown) = svc.get_as("/workspaces/ws", Some(&token)).await.unwrap();
    assert_eq!(shown["agent_card"], card);
    assert_eq!(svc.workspace("ws")["last_register_failure_ms"], Value::Null);
    assert_eq!(svc.status("ws"), "online");

    // Only a missing card is filled: a later one does not replace it, and
    // a heartbeat that changes nothing by its card stays liveness-only
    // (acknowledged once queued: the fast path).
    let mut other = beat("ws");
    other["agent_card"] = json!({"name": "Other"});
    let (status, durability) = svc.heartbeat_durability(&token, other).await;
    assert_eq!((status, durability.as_str()), (StatusCode::OK, "queued"));
    let (_, shown) = svc.get_as("/workspaces/ws", Some(&token)).await.unwrap();
    assert_eq!(shown["agent_card"], card);
    svc.stop().await;
}

async fn update_card(svc: &Service, token: Option<&str>, body: &Value) -> (StatusCode, Value) {
    svc.post("/registry/update-card", token, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_card_success_stores_it_with_an_event() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);
    svc.register(Some(&token), register_body("ws")).await;
    let card = json!({"name": "Echo v2", "url": "http://localhost:8001/a2a"});
    let (status, body) = update_card(
        &svc,
        Some(&token),
        &json!({"workspace_id": "ws", "agent_card": card}),
    )
    .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"status": "updated"}))
    );
    let (_, shown) = svc.get_as("/workspaces/ws", Some(&token)).await.unwrap();
    assert_eq!(shown["agent_card"], card);
    let events = svc.events("ws", "AGENT_CARD_UPDATED");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["agent_card"], card);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_card_bad_body_is_400_and_writes_nothing() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);
    svc.register(Some(&token), register_body("ws")).await;
    let before = svc.quiet_dump().await;
    for body in [
        "not json",
        r#"{"agent_card":{"name":"x"}}"#,
        r#"{"workspace_id":"ws"}"#,
        r#"{"workspace_id":"","agent_card":{}}"#,
        r#"{"workspace_id":"ws","agent_card":"a string"}"#,
        r#"{"workspace_id":"ws","agent_card":[1,2]}"#,
        r#"{"workspace_id":7,"agent_card":{}}"#,
    ] {
        let (status, answer) = svc
            .post_raw(
                "POST",
                "/registry/update-card",
                Some(&token),
                body.to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{body}: {answer}");
    }
    let (status, answer) = svc
        .post_raw(
            "POST",
            "/registry/update-card",
            Some(&token),
            br#"{"workspace_id":"ws"}"#.to_vec(),
        )
        .await;
    assert_eq!(
        (status, answer),
        (
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid request body"})
        )
    );
    crate::common::assert_unchanged(&before, &svc.quiet_dump().await);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_card_bad_token_is_401_and_writes_nothing() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);
    let other = svc.provision("other", Workspace, false);
    let before = svc.quiet_dump().await;
    let body = json!({"workspace_id": "ws", "agent_card": {"name": "x"}});
    assert_eq!(
        update_card(&svc, None, &body).await,
        (
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing workspace auth token"})
        )
    );
    for bad in [other.as_str(), "not-a-token"] {
        assert_eq!(
            update_card(&svc, Some(bad), &body).await,
            (
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid workspace auth token"})
            )
        );
    }
    let unknown = json!({"workspace_id": "nobody", "agent_card": {}});
    assert_eq!(
        update_card(&svc, Some(&token), &unknown).await.0,
        StatusCode::NOT_FOUND
    );
    crate::common::assert_unchanged(&before, &svc.quiet_dump().await);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_card_unsafe_url_is_400_and_writes_nothing() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);
    let before = svc.quiet_dump().await;
    for url in [
        "http://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
        "http://[::ffff:169.254.169.254]/",
        "gopher://localhost/",
    ] {
        let body = json!({"workspace_id": "ws", "agent_card": {"url": url}});
        assert_eq!(
            update_card(&svc, Some(&token), &body).await,
            (
                StatusCode::BAD_REQUEST,
                json!({"error": "workspace URL not allowed"})
            ),
            "{url}"
        );
    }
    crate::common::assert_unchanged(&before, &svc.quiet_dump().await);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_card_write_failure_is_500_without_database_text() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);
    sql(
        &svc,
        "CREATE TRIGGER no_cards BEFORE UPDATE OF agent_card ON workspaces
         BEGIN SELECT RAISE(ABORT, 'sqlite says no'); END;",
    );
    let body = json!({"workspace_id": "ws", "agent_card": {"name": "x"}});
    assert_eq!(
        update_card(&svc, Some(&token), &body).await,
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "failed to update card"})
        )
    );
    assert!(svc.events("ws", "AGENT_CARD_UPDATED").is_empty());
    sql(&svc, "DROP TRIGGER no_cards;");
    assert_eq!(
        update_card(&svc, Some(&token), &body).await.0,
        StatusCode::OK
    );
    svc.stop().await;
}

/// Test list item 27 of the original, through the service's register in
/// each mode: every range, by address; `localhost` by name; names that do
/// not resolve (`.invalid`, RFC 6761); the SaaS `ws-*` names. (Names that
/// resolve are covered by the module's tests with a fixed resolver: this
/// machine has no DNS.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_url_validation_table() {
    use AgentUrlMode::{Dev, Saas, Strict};
    // (url, allowed in strict, saas, dev)
    let table: &[(&str, [bool; 3])] = &[
        ("http://93.184.215.14/agent", [true, true, true]),
        (
            "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]:8443/",
            [true, true, true],
        ),
        ("http://localhost:8000/agent", [true, true, true]),
        ("http://LOCALHOST.:8000/agent", [true, true, true]),
        ("http://127.0.0.1:8000/", [false, false, true]),
        ("http://127.8.9.10/", [false, false, true]),
        ("http://[::1]:8000/", [false, false, true]),
        ("http://10.1.2.3/", [false, true, true]),
        ("http://172.16.0.9/", [false, true, true]),
        ("http://172.31.255.255/", [false, true, true]),
        ("http://192.168.1.10/", [false, true, true]),
        ("http://[fd12:3456::1]/", [false, true, true]),
        (
            "http://169.254.169.254/latest/meta-data",
            [false, false, false],
        ),
        ("http://[::ffff:169.254.169.254]/", [false, false, false]),
        ("http://[fe80::1]/", [false, false, false]),
        ("http://[fc00::1]/", [false, false, false]),
        ("http://192.0.2.1/", [false, false, false]),
        ("http://198.51.100.7/", [false, false, false]),
        ("http://203.0.113.5/", [false, false, false]),
        ("http://[2001:db8::1]/", [false, false, false]),
        ("http://100.64.0.1/", [false, false, false]),
        ("http://224.0.0.1/", [false, false, false]),
        ("http://[ff02::1]/", [false, false, false]),
        ("http://0.0.0.0/", [false, false, false]),
        ("file:///etc/passwd", [false, false, false]),
        ("ftp://93.184.215.14/", [false, false, false]),
        ("http://user:pass@93.184.215.14/", [false, false, false]),
        ("http://agent.invalid:8000/", [false, false, true]),
        ("http://ws-abc123.apps.example.test/", [false, true, true]),
        ("http://WS-ABC123.Apps.Example.Test./", [false, true, true]),
        ("http://ws-.apps.example.test/", [false, false, true]),
        ("http://xws-abc.apps.example.test/", [false, false, true]),
        ("http://ws-abc.other.example.test/", [false, false, true]),
    ];
    for (column, mode) in [Strict, Saas, Dev].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let svc = Service::start_with(
            &dir.path().join("hg.db"),
            ManualClock::at(T0_MS),
            "127.0.0.1:0",
            |o| {
                o.agent_urls = AgentUrlPolicy::new(mode, Some("apps.example.test".into()))
                    .with_timeout(Duration::from_millis(500));
            },
        )
        .await;
        let token = svc.provision("ws", Workspace, false);
        let poll = svc.provision("poll", Workspace, false);
        for (url, allowed) in table {
            let allowed = allowed[column];
            let (status, body) = svc
                .register(
                    Some(&token),
                    json!({"id": "ws", "url": url, "agent_card": {}, "delivery_mode": "push"}),
                )
                .await;
            assert_eq!(
                status == StatusCode::OK,
                allowed,
                "{} {url}: {status} {body}",
                mode.as_str()
            );
            if !allowed {
                let error = body["error"].as_str().unwrap();
                assert!(!error.contains(url), "the answer echoes the url: {error}");
            }
            // The card's URL is checked the same way, with the original's
            // answer.
            let (status, body) = svc
                .register(
                    Some(&token),
                    json!({"id": "ws", "url": "http://localhost:1/", "agent_card": {"url": url}}),
                )
                .await;
            if allowed {
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "{} card {url}: {body}",
                    mode.as_str()
                );
            } else {
                assert_eq!(
                    (status, body),
                    (
                        StatusCode::BAD_REQUEST,
                        json!({"error": "workspace agent_card URL not allowed"})
                    ),
                    "{} card {url}",
                    mode.as_str()
                );
            }
            // Poll mode is never called back: its URL is not checked.
            let (status, body) = svc
                .register(
                    Some(&poll),
                    json!({"id": "poll", "url": url, "agent_card": {}, "delivery_mode": "poll"}),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "poll {url}: {body}");
        }
        // A refused register stores nothing of it.
        let (status, _) = svc
            .register(
                Some(&token),
                json!({"id": "ws", "url": "http://169.254.169.254/", "agent_card": {}}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_ne!(
            svc.workspace("ws")["url"].as_str(),
            Some("http://169.254.169.254/")
        );
        svc.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_read_route_answers_its_own_token_and_the_admin() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);
    svc.register(
        Some(&token),
        json!({"id": "ws", "url": "https://localhost/echo-agent",
               "agent_card": {"name": "Echo Agent v2"}}),
    )
    .await;
    svc.heartbeat(
        &token,
        json!({"workspace_id": "ws", "error_rate": 0.2, "sample_error": "slow",
               "active_tasks": 2, "current_task": "demo task", "uptime_seconds": 120}),
    )
    .await;
    for bearer in [token.as_str(), ADMIN] {
        let (status, body) = svc.get_as("/workspaces/ws", Some(bearer)).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["id"], "ws");
        assert_eq!(body["status"], "online");
        assert_eq!(body["kind"], "workspace");
        assert_eq!(body["url"], "https://localhost/echo-agent");
        assert_eq!(body["delivery_mode"], "push");
        assert_eq!(body["agent_card"], json!({"name": "Echo Agent v2"}));
        assert_eq!(body["active_tasks"], 2);
        assert_eq!(body["current_task"], "demo task");
        assert_eq!(body["uptime_seconds"], 120);
        assert_eq!(body["last_error_rate"], 0.2);
        assert_eq!(body["last_sample_error"], "slow");
        assert_eq!(body["last_heartbeat_ms"], T0_MS);
        assert_eq!(body["last_heartbeat_at"], "2026-06-24T12:00:00.000Z");
        let text = body.to_string();
        assert!(!text.contains(&token), "a token in {text}");
    }
    // `heartgate workspace show` prints the same fields (and more for the
    // operator), from another process.
    let (_, route) = svc.get_as("/workspaces/ws", Some(&token)).await.unwrap();
    let shown: Value =
        serde_json::from_str(&cli(&svc.db, &["--json", "workspace", "show", "ws"])).unwrap();
    for (field, value) in route.as_object().unwrap() {
        assert_eq!(&shown[field], value, "`workspace show` field {field}");
    }
    assert!(
        shown["conditions"].is_array() && shown["live_tokens"].is_i64(),
        "{shown}"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_read_route_refuses_other_callers() {
    let (_dir, svc) = start().await;
    let token = svc.provision("ws", Workspace, false);
    let other = svc.provision("other", Platform, true);
    let cases: &[(Option<&str>, &str, StatusCode)] = &[
        (None, "/workspaces/ws", StatusCode::UNAUTHORIZED),
        (Some(&other), "/workspaces/ws", StatusCode::UNAUTHORIZED),
        (
            Some("not-a-token"),
            "/workspaces/ws",
            StatusCode::UNAUTHORIZED,
        ),
        (Some(ADMIN), "/workspaces/nobody", StatusCode::NOT_FOUND),
        (Some(&token), "/workspaces/nobody", StatusCode::NOT_FOUND),
    ];
    for (bearer, path, expected) in cases {
        let (status, body) = svc.get_as(path, *bearer).await.unwrap();
        assert_eq!(status, *expected, "{bearer:?} {path}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    // A removed workspace is gone for its own token, shown to the admin.
    svc.force_status("ws", "removed");
    assert_eq!(
        svc.get_as("/workspaces/ws", Some(&token)).await.unwrap().0,
        StatusCode::NOT_FOUND
    );
    let (status, body) = svc.get_as("/workspaces/ws", Some(ADMIN)).await.unwrap();
    assert_eq!(
        (status, body["status"].clone()),
        (StatusCode::OK, json!("removed"))
    );
    let (status, _) = svc
        .post_raw("DELETE", "/workspaces/ws", Some(ADMIN), Vec::new())
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    svc.stop().await;
}

/// Routes of the original that other subsystems serve answer a JSON 404
/// naming the service meant to serve them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_subsystems_routes_say_who_serves_them() {
    let (_dir, svc) = start().await;
    for (method, path, service) in [
        ("GET", "/registry/discover/ws", "discovery"),
        ("GET", "/registry/ws/peers", "discovery"),
        ("POST", "/registry/check-access", "discovery"),
        ("POST", "/workspaces/ws/a2a", "A2A proxy"),
        ("POST", "/workspaces/ws/delegate", "delegation"),
        ("GET", "/workspaces/ws/activity", "activity"),
        ("POST", "/workspaces/ws/notify", "notification"),
    ] {
        let (status, body) = svc.post_raw(method, path, None, Vec::new()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(service), "{path}: {error}");
    }
    svc.stop().await;
}

/// `heartgate_registry_rejections_total{route,reason}` after the refusals.
fn rejections(metrics: &str, route: &str, reason: &str) -> u64 {
    let series =
        format!("heartgate_registry_rejections_total{{route=\"{route}\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A refused request: route, bearer, body, status, reason key, and the
/// workspace id its log line names.
type Refusal<'a> = (&'a str, Option<&'a str>, String, u16, &'a str, &'a str);

/// The real binary at its default log level: each refused registry request
/// is one line with its reason key, status and the workspace id its body
/// named, never the token, the URL or the secret; and counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_rejections_are_logged_with_reason() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hg.db");
    let token = crate::common::binary::provision(&db, "knocker", false);
    let concierge = crate::common::binary::provision(&db, "concierge", true);
    let config = write_config(dir.path(), "[registry]\nagent_url_mode = \"strict\"\n");
    let mut serve = Serve::start_ready(&db, &config, &dir.path().join("serve.log")).await;
    let client = http_client();
    let post = |path: &str, bearer: Option<&str>, body: &str| {
        let url = format!("{}{path}", serve.url());
        let bearer = bearer.map(str::to_string);
        let body = body.as_bytes().to_vec();
        let client = client.clone();
        async move {
            request(&client, "POST", &url, bearer.as_deref(), body)
                .await
                .unwrap()
                .status
        }
    };
    let secret_url = "http://169.254.169.254/latest/meta-data/iam/s3cret-path";
    let cases: Vec<Refusal> = vec![
        (
            "/registry/register",
            None,
            "{not json".into(),
            400,
            "invalid_json",
            "",
        ),
        (
            "/registry/register",
            None,
            r#"{"id":"knocker","agent_card":{},"delivery_mode":"webhook"}"#.into(),
            400,
            "bad_delivery_mode",
            "knocker",
        ),
        (
            "/registry/register",
            None,
            r#"{"id":"knocker","agent_card":{},"kind":"bogus"}"#.into(),
            400,
            "bad_kind",
            "knocker",
        ),
        (
            "/registry/heartbeat",
            Some(token.as_str()),
            r#"{"workspace_id":"no-such-ws"}"#.into(),
            404,
            "unknown_workspace",
            "no-such-ws",
        ),
        (
            "/registry/heartbeat",
            None,
            r#"{"workspace_id":"knocker"}"#.into(),
            401,
            "auth_missing",
            "knocker",
        ),
        (
            "/registry/heartbeat",
            Some("wrong-token-value"),
            r#"{"workspace_id":"knocker"}"#.into(),
            401,
            "auth_invalid",
            "knocker",
        ),
        (
            "/registry/register",
            Some(token.as_str()),
            json!({"id": "knocker", "url": secret_url, "agent_card": {}}).to_string(),
            400,
            "url_not_allowed",
            "knocker",
        ),
        (
            "/registry/register",
            Some(concierge.as_str()),
            json!({"id": "concierge", "url": "http://localhost:1/", "agent_card": {},
                   "kind": "platform", "mcp_server_present": false})
            .to_string(),
            400,
            "identity_gate",
            "concierge",
        ),
        (
            "/registry/update-card",
            Some(token.as_str()),
            json!({"workspace_id": "knocker", "agent_card": {"url": "file:///etc/passwd"}})
                .to_string(),
            400,
            "card_url_not_allowed",
            "knocker",
        ),
    ];
    for (path, bearer, body, status, _, _) in &cases {
        assert_eq!(post(path, *bearer, body).await, *status, "{path} {body}");
    }
    let (_, metrics) = {
        let answer = request(
            &client,
            "GET",
            &format!("{}/metrics", serve.url()),
            None,
            Vec::new(),
        )
        .await
        .unwrap();
        (
            answer.status,
            String::from_utf8_lossy(&answer.body).into_owned(),
        )
    };
    serve.stop().await;
    let log = serve.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("registry request refused"))
        .collect();
    for (path, _, _, status, reason, workspace) in &cases {
        let matching: Vec<&&str> = lines
            .iter()
            .filter(|l| {
                l.contains(&format!("reason=\"{reason}\""))
                    || l.contains(&format!("reason={reason}"))
            })
            .collect();
        assert_eq!(matching.len(), 1, "{reason}: once, in\n{log}");
        let line = matching[0];
        assert!(line.contains(" INFO "), "{reason} at info: {line}");
        assert!(line.contains(&format!("status={status}")), "{line}");
        if !workspace.is_empty() {
            assert!(
                line.contains(&format!("workspace_id={workspace}"))
                    || line.contains(&format!("workspace_id=\"{workspace}\"")),
                "{line}"
            );
        }
        assert_eq!(
            rejections(&metrics, path, reason),
            1,
            "{reason} counted:\n{metrics}"
        );
    }
    for secret in [
        token.as_str(),
        concierge.as_str(),
        "wrong-token-value",
        "s3cret-path",
        "/etc/passwd",
    ] {
        assert!(!log.contains(secret), "`{secret}` reached the log:\n{log}");
    }
}
