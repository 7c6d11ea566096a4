//! Silence noticed by the running service: the heartbeat TTL and the
//! provision timeout, decided by the built-in `liveness` policy and applied
//! like any verdict; a heartbeat racing the sweep wins; a restart gives the
//! fleet one TTL; and the real binary with short deadlines.
//!
//! A module of the `service` test binary (one binary less to link in CI):
//! `cargo test --release --test service liveness::`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::binary::{self, Serve, cli, wait_until, write_config};
use crate::common::{MINUTE_MS, Service, T0_MS};
use heartgate::clock::ManualClock;
use heartgate::liveness::LivenessConfig;
use heartgate::model::WorkspaceKind::Workspace;
use heartgate::store::NewWorkspace;
use hyper::StatusCode;
use serde_json::{Value, json};

const TTL_MS: i64 = 180_000;

/// The defaults, swept every 20 ms of real time.
fn liveness() -> LivenessConfig {
    LivenessConfig {
        sweep_interval: Duration::from_millis(20),
        ..LivenessConfig::default()
    }
}

/// A fresh service at [`T0_MS`] with `config`, and its directory.
async fn started(config: LivenessConfig) -> (tempfile::TempDir, Service) {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir.path().join("hg.db"), ManualClock::at(T0_MS), config).await;
    (dir, svc)
}

/// `heartgate_silence_transitions_total{kind,to}`.
async fn silence_transitions(svc: &Service, kind: &str, to: &str) -> u64 {
    let (_, text) = svc.get_text("/metrics").await;
    let series = format!("heartgate_silence_transitions_total{{kind=\"{kind}\",to=\"{to}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Start the service and wait for its first sweep, which records when the
/// service came up (before it, a moved clock would look like an outage).
async fn start(db: &Path, clock: ManualClock, config: LivenessConfig) -> Service {
    let svc = Service::start_with(db, clock, "127.0.0.1:0", move |o| o.liveness = config).await;
    sweeps_reach(&svc, 1).await;
    svc
}

/// Sweeps finished so far, from `/metrics`.
async fn sweeps(svc: &Service) -> u64 {
    let (status, text) = svc.get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    text.lines()
        .find_map(|l| l.strip_prefix("heartgate_silence_sweep_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Wait until `n` sweeps have finished; panics after 20 s.
async fn sweeps_reach(svc: &Service, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while sweeps(svc).await < n {
        assert!(Instant::now() < deadline, "no sweep ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until a sweep that began after this call has finished.
async fn next_sweep(svc: &Service) {
    let seen = sweeps(svc).await;
    sweeps_reach(svc, seen + 2).await;
}

/// Let `ms` pass on the manual clock as time passes: in steps of 30 s, a
/// sweep after each.
async fn pass(svc: &Service, ms: i64) {
    let mut left = ms;
    while left > 0 {
        let step = left.min(30_000);
        svc.clock.advance(step);
        next_sweep(svc).await;
        left -= step;
    }
}

fn add(svc: &Service, id: &str, runtime: &str) -> String {
    use heartgate::clock::Clock;
    svc.store
        .add_workspace(
            &NewWorkspace {
                id: id.into(),
                name: id.into(),
                kind: Workspace,
                model_configured: true,
                runtime: runtime.into(),
            },
            svc.clock.now_ms(),
        )
        .unwrap();
    svc.issue_token(id)
}

fn register_body(id: &str) -> Value {
    json!({"id": id, "url": "http://127.0.0.1:9001", "agent_card": {"name": id}})
}

fn beat(id: &str) -> Value {
    json!({"workspace_id": id, "error_rate": 0.0, "sample_error": "", "active_tasks": 0,
           "uptime_seconds": 60})
}

async fn register(svc: &Service, id: &str, token: &str) -> Value {
    let (status, body) = svc.register(Some(token), register_body(id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn heartbeat(svc: &Service, id: &str, token: &str) {
    let (status, body) = svc.heartbeat(token, beat(id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

fn explain(svc: &Service, id: &str) -> String {
    let h = heartgate::history::history(svc.store.as_ref(), id, 50)
        .unwrap()
        .unwrap();
    heartgate::history::explain(&h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_workspace_goes_offline_and_comes_back() {
    let (_dir, svc) = started(liveness()).await;
    let token = add(&svc, "ws-1", "");
    register(&svc, "ws-1", &token).await;
    heartbeat(&svc, "ws-1", &token).await;
    assert_eq!(svc.status("ws-1"), "online");
    let online_runs = svc.runs("ws-1", "online");

    // Just short of the TTL: nothing.
    pass(&svc, TTL_MS - 1_000).await;
    assert_eq!(svc.status("ws-1"), "online");
    assert!(svc.events("ws-1", "WORKSPACE_OFFLINE").is_empty());

    pass(&svc, 2_000).await;
    svc.wait_for("ws-1 offline", 10, |s| s.status("ws-1") == "offline")
        .await;
    let offline = svc.events("ws-1", "WORKSPACE_OFFLINE");
    assert_eq!(offline.len(), 1, "{offline:?}");
    assert_eq!(offline[0]["last_heartbeat_ms"], json!(T0_MS));
    let silent_for = offline[0]["silent_for_ms"].as_i64().unwrap();
    assert!(
        (TTL_MS..TTL_MS + 60_000).contains(&silent_for),
        "{silent_for}"
    );
    let ws = svc.workspace("ws-1");
    let conditions = ws["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1, "{conditions:?}");
    assert_eq!(conditions[0]["name"], "silent");
    assert_eq!(conditions[0]["owner"], "liveness");
    let story = explain(&svc, "ws-1");
    assert!(
        story.contains("no heartbeat for 3m0") && story.contains(": online -> offline"),
        "{story}"
    );

    // Later sweeps leave it alone: the deadline was evaluated once.
    pass(&svc, 60_000).await;
    assert_eq!(svc.events("ws-1", "WORKSPACE_OFFLINE").len(), 1);

    heartbeat(&svc, "ws-1", &token).await;
    assert_eq!(svc.status("ws-1"), "online");
    let online = svc.events("ws-1", "WORKSPACE_ONLINE");
    assert_eq!(
        online.last().unwrap()["recovered_from"],
        "offline",
        "{online:?}"
    );
    assert_eq!(svc.runs("ws-1", "online"), online_runs + 1);
    assert!(
        svc.workspace("ws-1")["conditions"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    assert_eq!(
        silence_transitions(&svc, "heartbeat_expired", "offline").await,
        1
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_runtime_goes_awaiting_agent() {
    let (_dir, svc) = started(liveness()).await;
    let token = add(&svc, "agent-1", "external");
    // An agent outside the platform polls unless it says otherwise.
    assert_eq!(svc.workspace("agent-1")["delivery_mode"], "poll");
    let (status, body) = svc
        .register(
            Some(&token),
            json!({"id": "agent-1", "agent_card": {"name": "agent-1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["delivery_mode"], "poll");
    heartbeat(&svc, "agent-1", &token).await;
    assert_eq!(svc.status("agent-1"), "online");

    pass(&svc, TTL_MS + 1_000).await;
    svc.wait_for("agent-1 awaiting its agent", 10, |s| {
        s.status("agent-1") == "awaiting_agent"
    })
    .await;
    let noticed = svc.events("agent-1", "WORKSPACE_OFFLINE");
    assert_eq!(noticed.len(), 1, "{noticed:?}");
    assert_eq!(noticed[0]["awaiting_agent"], true);

    heartbeat(&svc, "agent-1", &token).await;
    assert_eq!(svc.status("agent-1"), "online");
    let online = svc.events("agent-1", "WORKSPACE_ONLINE");
    assert_eq!(online.last().unwrap()["recovered_from"], "awaiting_agent");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_times_out_to_failed_and_late_heartbeat_recovers() {
    let mut config = liveness();
    config
        .runtime_provision_timeout
        .insert("quick".into(), Duration::from_secs(5 * 60));
    let (_dir, svc) = started(config).await;
    let plain = add(&svc, "plain", "");
    add(&svc, "quick", "quick");
    add(&svc, "hermes", "hermes");

    // The configured override: 5 minutes.
    pass(&svc, 5 * MINUTE_MS + 1_000).await;
    svc.wait_for("quick failed", 10, |s| s.status("quick") == "failed")
        .await;
    assert_eq!(svc.status("plain"), "provisioning");
    // The default: 12 minutes.
    pass(&svc, 7 * MINUTE_MS).await;
    svc.wait_for("plain failed", 10, |s| s.status("plain") == "failed")
        .await;
    assert_eq!(svc.status("hermes"), "provisioning");
    let failed = svc.events("plain", "WORKSPACE_PROVISION_FAILED");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["code"], "PROVISION_TIMEOUT");
    let silent_for = failed[0]["silent_for_ms"].as_i64().unwrap();
    assert!(silent_for >= 12 * MINUTE_MS, "{silent_for}");
    assert!(
        svc.workspace("plain")["last_sample_error"]
            .as_str()
            .unwrap()
            .contains("provisioning did not finish"),
        "{}",
        svc.workspace("plain")
    );
    assert!(
        explain(&svc, "plain").contains("still provisioning after 12m"),
        "{}",
        explain(&svc, "plain")
    );
    // The built-in `hermes` override: 30 minutes.
    pass(&svc, 18 * MINUTE_MS).await;
    svc.wait_for("hermes failed", 10, |s| s.status("hermes") == "failed")
        .await;

    // The late heartbeat after a provision timeout brings it online.
    let online_runs = svc.runs("plain", "online");
    heartbeat(&svc, "plain", &plain).await;
    assert_eq!(svc.status("plain"), "online");
    let online = svc.events("plain", "WORKSPACE_ONLINE");
    assert_eq!(online.last().unwrap()["recovered_from"], "failed");
    assert_eq!(svc.runs("plain", "online"), online_runs + 1);
    assert_eq!(
        silence_transitions(&svc, "provision_timeout", "failed").await,
        3
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_workspaces_are_never_swept() {
    let (_dir, svc) = started(liveness()).await;
    for status in ["paused", "hibernated", "hibernating", "removed"] {
        let token = add(&svc, status, "");
        register(&svc, status, &token).await;
        heartbeat(&svc, status, &token).await;
        svc.force_status(status, status);
    }
    add(&svc, "paused-provisioning", "");
    svc.force_status("paused-provisioning", "paused");
    pass(&svc, 13 * MINUTE_MS).await;
    for status in ["paused", "hibernated", "hibernating", "removed"] {
        assert_eq!(svc.status(status), status);
        assert!(svc.events(status, "WORKSPACE_OFFLINE").is_empty());
    }
    assert_eq!(svc.status("paused-provisioning"), "paused");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_racing_the_sweep_wins() {
    const WORKSPACES: usize = 24;
    const ROUNDS: usize = 12;
    let (_dir, svc) = started(liveness()).await;
    let ids: Vec<String> = (0..WORKSPACES).map(|i| format!("race-{i}")).collect();
    let mut tokens = Vec::new();
    for id in &ids {
        let token = add(&svc, id, "");
        register(&svc, id, &token).await;
        tokens.push(token);
    }
    let svc = std::sync::Arc::new(svc);
    for round in 0..ROUNDS {
        for (id, token) in ids.iter().zip(&tokens) {
            heartbeat(&svc, id, token).await;
        }
        // Up to just short of the deadline, then past it while every
        // workspace heartbeats at once, racing the sweeps.
        pass(&svc, TTL_MS - 500).await;
        svc.clock.advance(500 + (round as i64 % 3) * 10);
        let mut beats = tokio::task::JoinSet::new();
        for (id, token) in ids.iter().zip(&tokens) {
            let (svc, id, token) = (svc.clone(), id.clone(), token.clone());
            beats.spawn(async move {
                let (status, body) = svc.heartbeat(&token, beat(&id)).await;
                assert_eq!(status, StatusCode::OK, "{body}");
            });
        }
        while let Some(done) = beats.join_next().await {
            done.unwrap();
        }
        // Every heartbeat was acknowledged after the deadline's evaluation
        // may have begun: a sweep that committed first is undone by the
        // heartbeat's own evaluation (again, on fresh state, if it had been
        // acknowledged before its commit); none may stay offline.
        next_sweep(&svc).await;
        svc.wait_for(&format!("round {round}: every workspace online"), 10, |s| {
            ids.iter().all(|id| s.status(id) == "online")
        })
        .await;
    }
    // At most one transition per deadline: each offline came back once.
    for id in &ids {
        let offline = svc.events(id, "WORKSPACE_OFFLINE").len();
        let recovered = svc
            .events(id, "WORKSPACE_ONLINE")
            .iter()
            .filter(|e| e["recovered_from"] == "offline")
            .count();
        assert_eq!(offline, recovered, "{id}");
        assert!(offline <= ROUNDS, "{id}: {offline}");
    }
    std::sync::Arc::into_inner(svc).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_sweep_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hg.db");
    let clock = ManualClock::at(T0_MS);
    let svc = start(&db, clock.clone(), liveness()).await;
    let healthy = add(&svc, "healthy", "");
    let gone = add(&svc, "gone", "");
    for (id, token) in [("healthy", &healthy), ("gone", &gone)] {
        register(&svc, id, token).await;
        heartbeat(&svc, id, token).await;
    }
    next_sweep(&svc).await;
    svc.stop().await;

    // Down for ten minutes, much longer than the TTL.
    clock.advance(10 * MINUTE_MS);
    let svc = start(&db, clock.clone(), liveness()).await;
    next_sweep(&svc).await;
    next_sweep(&svc).await;
    assert_eq!(svc.status("healthy"), "online");
    assert_eq!(svc.status("gone"), "online");

    // The healthy one reaches the service again within the TTL; the other
    // stays silent and is noticed one TTL after the service came back.
    heartbeat(&svc, "healthy", &healthy).await;
    for _ in 0..6 {
        pass(&svc, 30_000).await;
        heartbeat(&svc, "healthy", &healthy).await;
    }
    pass(&svc, 2_000).await;
    svc.wait_for("gone offline", 10, |s| s.status("gone") == "offline")
        .await;
    assert_eq!(svc.status("healthy"), "online");
    let offline = svc.events("gone", "WORKSPACE_OFFLINE");
    assert_eq!(offline.len(), 1);
    // Counted from its last heartbeat, before the outage.
    assert!(offline[0]["silent_for_ms"].as_i64().unwrap() > 10 * MINUTE_MS);
    assert!(svc.events("healthy", "WORKSPACE_OFFLINE").is_empty());
    svc.stop().await;
}

/// The real binary, with the issue's short deadlines: a workspace that
/// heartbeats once is `offline` within 3 s and `online` again after one
/// heartbeat; a provisioned workspace that never registers is `failed`
/// within 4 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_notices_silence_within_its_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hg.db");
    let config = write_config(
        dir.path(),
        "[liveness]\nheartbeat_ttl = \"2s\"\nprovision_timeout = \"3s\"\nsweep_interval = \"200ms\"\n",
    );
    cli(&db, &["config", "check", config.to_str().unwrap()]);
    let token = binary::provision(&db, "beats-once", false);
    let serve = Serve::start_ready(&db, &config, &dir.path().join("serve.log")).await;
    cli(&db, &["workspace", "add", "never-registers"]);
    let provisioned = Instant::now();
    let client = binary::http_client();
    let base = serve.url();
    // Its first sweep records when it came up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = binary::request(&client, "GET", &format!("{base}/metrics"), None, Vec::new())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        if !text.contains("heartgate_silence_sweep_seconds_count 0") {
            break;
        }
        assert!(Instant::now() < deadline, "no first sweep");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = |id: &str| -> String {
        let out = cli(&db, &["--json", "workspace", "show", id]);
        serde_json::from_str::<Value>(&out).unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let answer = binary::post_heartbeat(&client, &base, &token, &beat("beats-once"))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let beat_at = Instant::now();
    assert_eq!(status("beats-once"), "online");
    wait_until("beats-once offline", Duration::from_secs(5), || {
        status("beats-once") == "offline"
    })
    .await;
    assert!(
        beat_at.elapsed() < Duration::from_secs(3),
        "offline after {:?}",
        beat_at.elapsed()
    );
    let answer = binary::post_heartbeat(&client, &base, &token, &beat("beats-once"))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(status("beats-once"), "online");

    wait_until("never-registers failed", Duration::from_secs(6), || {
        status("never-registers") == "failed"
    })
    .await;
    assert!(
        provisioned.elapsed() < Duration::from_secs(4),
        "failed after {:?}",
        provisioned.elapsed()
    );
    drop(serve);
}
