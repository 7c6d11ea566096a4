//! Failing closed around the chain: a failing register evaluation, grants, and
//! slots set to skip. The hostile guest corpus itself is `tests/hostile.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::{Service, T0_MS, hostile_guest, slot};
use heartgate::chain::{ChainSpec, Grant, OnFailure};
use heartgate::clock::ManualClock;
use heartgate::model::WorkspaceKind::Workspace;
use hyper::StatusCode;
use serde_json::json;

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

    // Not granted `drop`: dropping the status rules' clearing of their
    // condition (which would bring it online) fails the slot, closed.
    let token = svc.provision("drop-2", Workspace, false);
    svc.force_degraded_by_error_rate("drop-2");
    svc.heartbeat(&token, json!({"workspace_id": "drop-2"}))
        .await;
    assert_eq!(svc.status("drop-2"), "degraded");
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
