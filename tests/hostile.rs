//! The hostile guest corpus, each case in the chain of the running service:
//! a policy that loops forever, grows memory without bound, traps, exhausts
//! its stack, returns its own error, returns a huge action list or a huge
//! string, acts on another workspace or another policy's markers, or adds an
//! action its slot is not granted; and a module that imports WASI.
//!
//! Each case checks: a bounded response time, the outcome recorded in the
//! decision log and counted in `/metrics` as its own kind, nothing else written (the database before
//! and after, row by row), the workspace not promoted, and the next request
//! served normally. Run the group with `cargo test --release hostile_`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{Service, T0_MS, hostile_guest, slot};
use heartgate::chain::ChainSpec;
use heartgate::clock::ManualClock;
use heartgate::model::WorkspaceKind::Workspace;
use hyper::StatusCode;
use serde_json::json;

const ADMIN: &str = "admin-s3cret";

/// A bound far above the 100 ms slot deadline, far below a hang.
const BOUNDED: Duration = Duration::from_secs(5);

/// The built-in chain with the hostile guest between the status rules and the
/// recovery trigger.
async fn hostile_service(dir: &tempfile::TempDir) -> Service {
    let chain = ChainSpec {
        slot: vec![
            slot("gate", "builtin:gate"),
            slot("status-rules", "builtin:status-rules"),
            slot("hostile", &hostile_guest()),
            slot("recovery-trigger", "builtin:recovery-trigger"),
            slot("cooldown", "builtin:cooldown"),
        ],
    };
    Service::start_with_chain(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        Some(chain),
    )
    .await
}

/// A workspace `id` degraded by the status rules' error-rate condition (the
/// hostile guest reads its behaviour from the id's prefix) heartbeats
/// healthily: the status rules propose clearing their condition (after which
/// the host would bring it online), the hostile slot misbehaves, and the
/// evaluation must fail closed with `outcome`, writing only the decision row
/// and the liveness fields.
async fn check_fails_closed(id: &str, outcome: &str) {
    let dir = tempfile::tempdir().unwrap();
    let svc = hostile_service(&dir).await;
    let token = svc.provision(id, Workspace, false);
    svc.force_degraded_by_error_rate(id);
    let bystander = svc.provision("bystander", Workspace, false);
    svc.force_status("bystander", "offline");
    let before = svc.quiet_dump().await;

    // The hostile heartbeat, and a bystander's heartbeat sent while it runs.
    let started = Instant::now();
    let beat = json!({"workspace_id": id, "sample_error": "still here"});
    let hostile = svc.heartbeat(&token, beat);
    let other = async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t = Instant::now();
        let r = svc
            .heartbeat(&bystander, json!({"workspace_id": "bystander"}))
            .await;
        (r, t.elapsed())
    };
    let ((status, body), ((other_status, _), other_took)) = tokio::join!(hostile, other);
    let took = started.elapsed();
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &json!("ok")),
        "{id}"
    );
    assert!(took < BOUNDED, "{id}: the heartbeat took {took:?}");
    assert_eq!(other_status, StatusCode::OK, "{id}: the bystander");
    assert!(
        other_took < BOUNDED,
        "{id}: the bystander took {other_took:?}"
    );

    // The outcome is recorded as its own kind, with the failing slot.
    let decision = svc.store.decisions(id, 1).unwrap().pop().unwrap();
    assert_eq!(decision.outcome, outcome, "{id}");
    assert_eq!(decision.final_actions["failure"]["slot"], "hostile", "{id}");
    // ... and counted under its own kind in the metrics.
    let kind = outcome.trim_start_matches("failed:");
    let (status, metrics) = svc.get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        format!(r#"heartgate_evaluations_total{{event="heartbeat",outcome="{kind}"}} 1"#),
        format!(r#"heartgate_policy_failures_total{{slot="hostile",kind="{kind}"}} 1"#),
    ] {
        assert!(metrics.contains(&line), "{id}: no `{line}` in\n{metrics}");
    }

    // Nothing but that decision row and the liveness fields was written:
    // no status change, no event, no marker, no reconcile.
    let after = svc.quiet_dump().await;
    let row_of = format!("workspaces|Text(\"{id}\")");
    let unrelated = |rows: &[String]| -> Vec<String> {
        rows.iter()
            .filter(|r| !r.starts_with("decisions|") && !r.starts_with(&row_of))
            .filter(|r| !r.contains("bystander"))
            .cloned()
            .collect()
    };
    common::assert_unchanged(&unrelated(&before), &unrelated(&after));
    let ws = svc.workspace(id);
    assert_eq!(ws["status"], "degraded", "{id} must not be promoted");
    assert_eq!(
        ws["conditions"][0]["name"], "error-rate",
        "{id}: the condition kept"
    );
    assert_eq!(ws["last_sample_error"], "still here", "{id}: liveness kept");

    // The bystander was promoted as usual, and the next request is served.
    assert_eq!(svc.status("bystander"), "online", "{id}");
    let (status, _) = svc
        .heartbeat(
            &bystander,
            json!({"workspace_id": "bystander", "runtime_state": "wedged"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(svc.status("bystander"), "degraded", "after {id}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_infinite_loop_is_stopped_by_the_deadline() {
    check_fails_closed("loop-1", "failed:timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_unbounded_memory_growth_hits_the_cap() {
    check_fails_closed("oom-1", "failed:out_of_memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_panic_is_a_trap() {
    check_fails_closed("trap-1", "failed:trap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_stack_exhaustion_is_a_trap() {
    check_fails_closed("stack-1", "failed:trap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_policy_error_is_its_own_outcome() {
    check_fails_closed("error-1", "failed:policy_error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_huge_action_list_is_invalid_output() {
    check_fails_closed("flood-1", "failed:invalid_output").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_huge_string_is_invalid_output() {
    check_fails_closed("longstr-1", "failed:invalid_output").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_action_on_another_workspace_is_invalid_output() {
    check_fails_closed("foreign-1", "failed:invalid_output").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_write_to_another_policys_marker_is_invalid_output() {
    check_fails_closed("steal-1", "failed:invalid_output").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ungranted_action_is_its_own_outcome() {
    check_fails_closed("event-1", "failed:ungranted_action").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ungranted_drop_is_its_own_outcome() {
    check_fails_closed("drop-1", "failed:ungranted_action").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_loops_in_parallel_do_not_starve_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let svc = hostile_service(&dir).await;
    let mut tokens = Vec::new();
    for i in 0..8 {
        let id = format!("loop-{i}");
        tokens.push((svc.provision(&id, Workspace, false), id));
    }
    let healthy = svc.provision("healthy", Workspace, false);
    let started = Instant::now();
    let loops = futures_util::future::join_all(
        tokens
            .iter()
            .map(|(t, id)| svc.heartbeat(t, json!({"workspace_id": id}))),
    );
    let beat = async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        svc.heartbeat(&healthy, json!({"workspace_id": "healthy"}))
            .await
    };
    let (results, (status, _)) = tokio::join!(loops, beat);
    assert!(results.iter().all(|(s, _)| *s == StatusCode::OK));
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < BOUNDED, "{:?}", started.elapsed());
    for (_, id) in &tokens {
        let d = svc.store.decisions(id, 1).unwrap().pop().unwrap();
        assert_eq!(d.outcome, "failed:timeout", "{id}");
    }
    assert_eq!(svc.status("healthy"), "online");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_wasi_import_is_refused_and_the_chain_keeps_serving() {
    let wasi = format!("{}/wasi_user.wasm", env!("HEARTGATE_TEST_GUESTS_DIR"));

    // At start: a chain naming it does not start, and says why.
    let dir = tempfile::tempdir().unwrap();
    let opts_chain = ChainSpec {
        slot: vec![slot("gate", "builtin:gate"), slot("wasi", &wasi)],
    };
    let engine = heartgate::engine::Engine::new().unwrap();
    let err = heartgate::chain::Chain::from_spec(
        &engine,
        &opts_chain,
        std::path::Path::new("/"),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("imports `wasi:"), "{err}");

    // Pushed to a running service: 422 with the reason, the active chain
    // untouched, heartbeats served as before.
    let svc = Service::start_with(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        "127.0.0.1:0",
        |o| o.admin_token = Some(heartgate::deliverer::Secret::Value(ADMIN.into())),
    )
    .await;
    let token = svc.provision("ws", Workspace, false);
    let before = svc.quiet_dump().await;
    let (status, body) = svc
        .post_raw(
            "POST",
            "/admin/modules",
            Some(ADMIN),
            std::fs::read(&wasi).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("imports `wasi:"),
        "{body}"
    );
    common::assert_unchanged(&before, &svc.quiet_dump().await);
    let (status, _) = svc.heartbeat(&token, json!({"workspace_id": "ws"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(svc.status("ws"), "online");
    svc.stop().await;
}
