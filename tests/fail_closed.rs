//! A policy that traps, loops, exhausts its memory or stack, returns an error
//! or returns actions it may not return never crashes the service and never
//! promotes the workspace: the evaluation fails closed, the heartbeat is still
//! acknowledged, the failure is recorded, and the next request is served.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{Service, T0_MS, hostile_guest, slot};
use heartgate::chain::{ChainSpec, Grant, OnFailure};
use heartgate::clock::ManualClock;
use heartgate::model::WorkspaceKind::Workspace;
use hyper::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_policy_fails_closed_and_the_service_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let chain = ChainSpec {
        slot: vec![
            slot("gate", "builtin:gate"),
            slot("status-rules", "builtin:status-rules"),
            slot("hostile", &hostile_guest()),
            slot("recovery-trigger", "builtin:recovery-trigger"),
            slot("cooldown", "builtin:cooldown"),
        ],
    };
    let svc = Service::start_with_chain(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        Some(chain),
    )
    .await;
    let healthy = svc.provision("healthy", Workspace, false);

    let cases = [
        ("trap-1", "failed:trap"),
        ("loop-1", "failed:timeout"),
        ("oom-1", "failed:out_of_memory"),
        ("stack-1", "failed:trap"),
        ("error-1", "failed:policy_error"),
        ("foreign-1", "failed:invalid_output"),
        ("steal-1", "failed:invalid_output"),
        ("flood-1", "failed:invalid_output"),
        ("event-1", "failed:ungranted_action"),
        ("drop-1", "failed:ungranted_action"),
    ];
    for (id, outcome) in cases {
        let token = svc.provision(id, Workspace, false);
        svc.force_status(id, "failed");
        let started = Instant::now();
        let (status, body) = svc
            .heartbeat(
                &token,
                json!({"workspace_id": id, "error_rate": 0.0, "sample_error": "still here"}),
            )
            .await;
        let took = started.elapsed();
        assert_eq!(
            (status, body),
            (StatusCode::OK, json!({"status": "ok"})),
            "{id}"
        );
        assert!(took < Duration::from_secs(5), "{id} took {took:?}");

        let ws = svc.workspace(id);
        assert_eq!(ws["status"], "failed", "{id} must not be promoted");
        assert_eq!(
            ws["last_sample_error"], "still here",
            "{id}: liveness is still stored"
        );
        assert_eq!(svc.store.reconcile_runs(Some(id)).unwrap().len(), 0, "{id}");
        assert!(
            svc.store.events(id).unwrap().is_empty(),
            "{id}: nothing partially written"
        );
        let decisions = svc.store.decisions(id, 1).unwrap();
        assert_eq!(decisions[0].outcome, outcome, "{id}");

        // The next request, for another workspace, is served normally.
        svc.force_status("healthy", "offline");
        let (status, _) = svc
            .heartbeat(&healthy, json!({"workspace_id": "healthy"}))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(svc.status("healthy"), "online", "after {id}");
    }
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_register_evaluation_is_an_opaque_500_and_promotes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let chain = ChainSpec {
        slot: vec![
            slot("hostile", &hostile_guest()),
            slot("status-rules", "builtin:status-rules"),
        ],
    };
    let svc = Service::start_with_chain(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        Some(chain),
    )
    .await;
    let token = svc.provision("trap-reg", Workspace, false);
    let (status, body) = svc
        .register(
            Some(&token),
            json!({"id": "trap-reg", "url": "http://a", "agent_card": {}}),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "registration failed"})
        )
    );
    assert_eq!(svc.status("trap-reg"), "provisioning");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_actions_pass_and_ungranted_ones_fail_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let mut hostile = slot("hostile", &hostile_guest());
    hostile.grants = Some(vec![Grant::RecordEvent]);
    let chain = ChainSpec {
        slot: vec![slot("status-rules", "builtin:status-rules"), hostile],
    };
    let svc = Service::start_with_chain(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        Some(chain),
    )
    .await;

    // Granted: the event is recorded with the rest of the verdict.
    let token = svc.provision("event-2", Workspace, false);
    svc.force_status("event-2", "offline");
    svc.heartbeat(&token, json!({"workspace_id": "event-2"}))
        .await;
    assert_eq!(svc.status("event-2"), "online");
    assert_eq!(svc.events("event-2", "HOSTILE_NOTE").len(), 1);

    // Not granted `drop`: dropping the promotion fails the slot, closed.
    let token = svc.provision("drop-2", Workspace, false);
    svc.force_status("drop-2", "offline");
    svc.heartbeat(&token, json!({"workspace_id": "drop-2"}))
        .await;
    assert_eq!(svc.status("drop-2"), "offline");
    let decision = &svc.store.decisions("drop-2", 1).unwrap()[0];
    assert_eq!(decision.outcome, "failed:ungranted_action");
    assert!(
        decision
            .final_actions
            .to_string()
            .contains("not granted `drop`"),
        "{}",
        decision.final_actions
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_set_to_skip_fails_open_and_the_rest_of_the_chain_decides() {
    let dir = tempfile::tempdir().unwrap();
    let mut hostile = slot("hostile", &hostile_guest());
    hostile.on_failure = Some(OnFailure::Skip);
    let chain = ChainSpec {
        slot: vec![slot("status-rules", "builtin:status-rules"), hostile],
    };
    let svc = Service::start_with_chain(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        Some(chain),
    )
    .await;
    let token = svc.provision("trap-3", Workspace, false);
    svc.force_status("trap-3", "offline");
    svc.heartbeat(&token, json!({"workspace_id": "trap-3"}))
        .await;
    assert_eq!(
        svc.status("trap-3"),
        "online",
        "the skipped slot did not block the status rules"
    );
    let decision = &svc.store.decisions("trap-3", 1).unwrap()[0];
    assert_eq!(decision.outcome, "applied");
    assert_eq!(decision.steps[1]["failure"]["kind"], "trap");
    svc.stop().await;
}
