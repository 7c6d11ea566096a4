//! What a platform team runs the service with (issue 8): the configuration
//! check, readiness, and the metrics, on the real binary or the real service
//! on loopback with a temp SQLite file.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

#[path = "cli.rs"]
mod cli;
mod common;

use std::path::Path;
use std::process::Command;

use hyper::StatusCode;
use serde_json::json;

use common::{Service, T0_MS};
use heartgate::clock::ManualClock;

const HEARTGATE: &str = env!("CARGO_BIN_EXE_heartgate");

fn config_check(file: &Path) -> (bool, String) {
    let out = Command::new(HEARTGATE)
        .args(["config", "check"])
        .arg(file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn config_check_passes_the_example_and_names_the_key_and_line_of_a_broken_file() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/heartgate.example.toml");
    let (ok, text) = config_check(&example);
    assert!(ok, "{text}");
    assert!(text.starts_with("ok: "), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("heartgate.toml");
    for (body, want) in [
        // A misspelt key.
        (
            "listen = \"127.0.0.1:8080\"\n\n[reconcile]\nconcurency = 2\n",
            &["line 4", "concurency"][..],
        ),
        // A value out of range.
        (
            "# ours\n[reconcile]\nconcurrency = 2\ndeadline_secs = 0\n",
            &["line 4", "`reconcile.deadline_secs` must be 1-86400, not 0"][..],
        ),
        // A wrong type.
        (
            "max_body_bytes = \"big\"\n",
            &["line 1", "max_body_bytes"][..],
        ),
        // An environment variable name that is not one.
        (
            "\n[gitea]\ntoken_env = \"my token\"\n",
            &["line 3", "`gitea.token_env`"][..],
        ),
        // Not TOML.
        ("listen = \n", &["line 1"][..]),
        // A chain whose module is missing: named by its slot.
        (
            "[[chain.slot]]\nname = \"gate\"\nmodule = \"missing.wasm\"\n",
            &["slot `gate`", "missing.wasm"][..],
        ),
    ] {
        std::fs::write(&file, body).unwrap();
        let (ok, text) = config_check(&file);
        assert!(!ok, "accepted:\n{body}");
        for w in want {
            assert!(text.contains(w), "`{w}` missing for\n{body}\n{text}");
        }
    }
}

/// Make `path` read-only for every process: `chattr +i` where the file
/// system allows it (root, as on the CI machines, ignores permission bits),
/// else the permission bits. Undone by the guard's drop.
struct ReadOnly<'a>(&'a Path, bool);

impl<'a> ReadOnly<'a> {
    fn make(path: &'a Path) -> ReadOnly<'a> {
        let immutable = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        if !immutable {
            let mut perms = std::fs::metadata(path).unwrap().permissions();
            perms.set_readonly(true);
            std::fs::set_permissions(path, perms).unwrap();
        }
        ReadOnly(path, immutable)
    }
}

impl Drop for ReadOnly<'_> {
    fn drop(&mut self) {
        if self.1 {
            let _ = Command::new("chattr").arg("-i").arg(self.0).status();
        } else if let Ok(meta) = std::fs::metadata(self.0) {
            let mut perms = meta.permissions();
            #[allow(
                clippy::permissions_set_readonly_false,
                reason = "undoing the test's own change"
            )]
            perms.set_readonly(false);
            let _ = std::fs::set_permissions(self.0, perms);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_when_the_database_is_made_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let svc = Service::start(&db, ManualClock::at(T0_MS)).await;
    // Ready once the reconcile worker runs: a moment after the start on a
    // busy machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = svc.get("/readyz").await.unwrap();
        if status == StatusCode::OK || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["database"], json!({"ok": true}));
    assert_eq!(body["checks"]["chain"]["ok"], true);
    assert!(body["checks"]["chain"]["version"].is_string(), "{body}");
    assert_eq!(body["checks"]["reconcile_worker"], json!({"ok": true}));

    {
        let _read_only = ReadOnly::make(&db);
        let (status, body) = svc.get("/readyz").await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["status"], "unready");
        assert_eq!(body["checks"]["database"]["ok"], false);
        assert!(
            body["checks"]["database"]["error"]
                .as_str()
                .unwrap()
                .contains("read-only"),
            "{body}"
        );
        // Only the database failed, and the service is still alive.
        assert_eq!(body["checks"]["chain"]["ok"], true);
        assert_eq!(body["checks"]["reconcile_worker"]["ok"], true);
        let (status, _) = svc.get("/healthz").await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = svc.get("/readyz").await.unwrap();
    assert_eq!(status, StatusCode::OK, "ready again once writable: {body}");
    svc.stop().await;
}

/// The value of the sample `name{labels}` in a Prometheus text scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_deadlock_scenario() {
    use heartgate::model::WorkspaceKind::{Platform, Workspace};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let clock = ManualClock::at(T0_MS);
    let svc = Service::start(&db, clock.clone()).await;
    let concierge = svc.provision("concierge", Platform, true);
    svc.force_status("concierge", "online");
    let worker = svc.provision("worker", Workspace, true);
    let missing =
        json!({"workspace_id": "concierge", "uptime_seconds": 60, "mcp_server_present": false});
    let healthy = json!({"workspace_id": "worker", "uptime_seconds": 60});

    // The platform workspace loses its MCP: failed by the gate, recovery
    // queued; a minute later, still missing: the cooldown holds.
    assert_eq!(
        svc.heartbeat(&concierge, missing.clone()).await.0,
        StatusCode::OK
    );
    clock.advance(common::MINUTE_MS);
    assert_eq!(
        svc.heartbeat(&concierge, missing.clone()).await.0,
        StatusCode::OK
    );
    // An ordinary workspace comes online, then heartbeats.
    assert_eq!(
        svc.heartbeat(&worker, healthy.clone()).await.0,
        StatusCode::OK
    );
    assert_eq!(
        svc.heartbeat(&worker, healthy.clone()).await.0,
        StatusCode::OK
    );
    // A bad token and an unknown route.
    assert_eq!(
        svc.heartbeat("nope", healthy.clone()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(svc.get("/nowhere").await.unwrap().0, StatusCode::NOT_FOUND);
    svc.wait_reconciles_done().await;
    // The worker counts a run once it is recorded.
    let mut text = String::new();
    for _ in 0..100 {
        text = svc.get_text("/metrics").await.1;
        if sample(
            &text,
            r#"heartgate_reconcile_runs_total{trigger="mcp-recovery",outcome="succeeded"}"#,
        )
        .is_some()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let want = [
        (
            r#"heartgate_http_requests_total{route="/registry/heartbeat",status="200"}"#,
            4.0,
        ),
        (
            r#"heartgate_http_requests_total{route="/registry/heartbeat",status="401"}"#,
            1.0,
        ),
        (
            r#"heartgate_http_requests_total{route="other",status="404"}"#,
            1.0,
        ),
        (
            r#"heartgate_evaluations_total{event="heartbeat",outcome="applied"}"#,
            4.0,
        ),
        (
            r#"heartgate_slot_evaluation_seconds_count{slot="gate"}"#,
            4.0,
        ),
        (
            r#"heartgate_slot_evaluation_seconds_count{slot="cooldown"}"#,
            4.0,
        ),
        (
            r#"heartgate_status_transitions_total{from="online",to="failed"}"#,
            1.0,
        ),
        (
            r#"heartgate_status_transitions_total{from="provisioning",to="online"}"#,
            1.0,
        ),
        (
            r#"heartgate_reconcile_runs_total{trigger="mcp-recovery",outcome="succeeded"}"#,
            1.0,
        ),
        (
            r#"heartgate_cooldown_suppressions_total{slot="cooldown",trigger="mcp-recovery"}"#,
            1.0,
        ),
    ];
    for (series, value) in want {
        assert_eq!(sample(&text, series), Some(value), "{series}\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("heartgate_active_chain{version=") && l.ends_with(" 1")),
        "{text}"
    );
    assert!(
        sample(&text, "heartgate_db_commit_seconds_count").unwrap() >= 1.0,
        "{text}"
    );
    // Re-asserting `failed` (what lets the trigger fire again) is no change.
    assert!(!text.contains(r#"from="failed",to="failed""#), "{text}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_routes() {
    use std::collections::BTreeSet;
    const ADMIN: &str = "admin-secret";
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let svc = Service::start_with(&db, ManualClock::at(T0_MS), "127.0.0.1:0", |o| {
        o.admin_token = Some(heartgate::deliverer::Secret::Value(ADMIN.into()));
    })
    .await;

    // Served as checked in.
    let (status, served) = svc.get("/openapi.json").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let checked_in: serde_json::Value =
        serde_json::from_str(heartgate::http::OPENAPI).expect("openapi.json is JSON");
    assert_eq!(served, checked_in);
    assert_eq!(served["openapi"], "3.1.0");

    // The same routes as the router's list.
    let documented: BTreeSet<(String, String)> = served["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = heartgate::http::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, routed);

    // And the router answers each of them (with the admin token; ids that
    // exist or not): never with its own "not found" or 405.
    let is_router_miss = |status: StatusCode, body: &serde_json::Value| {
        status == StatusCode::METHOD_NOT_ALLOWED
            || (status == StatusCode::NOT_FOUND && body == &json!({"error": "not found"}))
    };
    for (method, template) in &routed {
        let path = template.replace("{id}", "1");
        let (status, body) = svc.post_raw(method, &path, Some(ADMIN), "{}").await;
        assert!(
            !is_router_miss(status, &body),
            "{method} {path}: {status} {body}"
        );
    }
    // What the check would catch.
    for (method, path) in [
        ("GET", "/admin/nowhere"),
        ("POST", "/admin/chain"),
        ("GET", "/registry/heartbeat"),
        ("GET", "/nowhere"),
    ] {
        let (status, body) = svc.post_raw(method, path, Some(ADMIN), "").await;
        assert!(
            is_router_miss(status, &body),
            "{method} {path}: {status} {body}"
        );
    }
    svc.stop().await;
}

/// The real binary with JSON logs: one span per request, carrying the
/// workspace id, the chain version and the verdict.
#[test]
fn json_logs_carry_one_span_per_request_with_workspace_chain_and_verdict() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let cli = |args: &[&str]| {
        let out = Command::new(HEARTGATE)
            .arg("--db")
            .arg(&db)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&["workspace", "add", "logged", "--model-configured"]);
    let token = cli(&["token", "issue", "logged"]).trim().to_string();
    let mut serve = Command::new(HEARTGATE)
        .current_dir(dir.path())
        .arg("--db")
        .arg(&db)
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info,heartgate=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit("http://").next().unwrap().to_string();
    let body = r#"{"workspace_id":"logged","uptime_seconds":5}"#;
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /registry/heartbeat HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // SIGTERM: the service drains and exits, and its log ends.
    Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    let mut logs = String::new();
    serve
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(serve.wait().unwrap().success(), "{logs}");

    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let done: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "request done")
        .collect();
    assert_eq!(done.len(), 1, "{logs}");
    let span = &done[0]["span"];
    assert_eq!(span["name"], "request", "{logs}");
    assert_eq!(span["path"], "/registry/heartbeat");
    assert_eq!(span["workspace_id"], "logged");
    assert_eq!(span["verdict"], "provisioning->online,reconcile:online");
    assert_eq!(span["status"], 200);
    let chain = lines
        .iter()
        .find(|l| l["fields"]["message"] == "chain loaded")
        .expect("the chain is logged at start");
    assert_eq!(
        span["chain_version"], chain["fields"]["chain_version"],
        "{logs}"
    );
}
