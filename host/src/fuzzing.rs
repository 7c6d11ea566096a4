//! Entry points for fuzzing: each takes arbitrary bytes, must never panic on
//! any of them, and asserts the invariants of what it exercises. The
//! cargo-fuzz targets in `fuzz/` call them under libFuzzer; the CI smoke run
//! (`tests/fuzz_smoke.rs`) calls them on mutated seeds. See `TESTING.md`.

use crate::chain::{ChainOutcome, Grant, MAX_ACTIONS, MAX_STRING_BYTES, check_output};
use crate::model::{Action, Effect, Event, Input};

/// The body of the `actions` target: `{"input": ..., "actions": [...]}`.
#[derive(serde::Deserialize)]
struct ActionsCase {
    input: Input,
    actions: Vec<Action>,
}

/// Action validation: a slot's output check, then the executor's check of a
/// chain's final actions. What passes must be what the service may apply.
pub fn actions(data: &[u8]) {
    let Ok(case) = serde_json::from_slice::<ActionsCase>(data) else {
        return;
    };
    let ws = case.input.workspace.id.as_str();
    if let Ok(out) = check_output(ws, "fuzz", &Grant::ALL, &[], case.actions.clone()) {
        assert!(
            out.len() <= MAX_ACTIONS,
            "too many actions passed the slot check"
        );
        for a in &out {
            assert_eq!(a.workspace_id, ws, "an action on another workspace passed");
            if let Some(owner) = a.marker_owner() {
                assert_eq!(owner, "fuzz", "another policy's marker passed");
            }
            let long = serde_json::to_string(a).map_or(0, |s| s.len());
            assert!(
                long <= 8 * MAX_STRING_BYTES + 512,
                "an oversized action passed the slot check"
            );
        }
    }
    let outcome = ChainOutcome {
        steps: Vec::new(),
        result: Ok(case.actions.clone()),
    };
    if crate::executor::check_verdict(&case.input, &outcome).is_ok() {
        let changes: Vec<_> = case
            .actions
            .iter()
            .filter_map(|a| match &a.effect {
                Effect::SetStatus { expected, to, .. } => Some((*expected, *to)),
                _ => None,
            })
            .collect();
        assert!(
            changes.len() <= 1,
            "two status changes passed the final check"
        );
        if let Some((expected, to)) = changes.first() {
            assert_eq!(
                *expected, case.input.workspace.status,
                "a stale status change passed"
            );
            assert!(
                !expected.is_frozen() && !to.is_frozen(),
                "a frozen status change passed"
            );
        }
        for a in &case.actions {
            assert_eq!(a.workspace_id, ws, "an action on another workspace passed");
            if let Effect::Reject { http_status, .. } = a.effect {
                assert!(
                    matches!(case.input.event, Event::Register(_)),
                    "a heartbeat was rejected"
                );
                assert!(
                    (400..=499).contains(&http_status),
                    "a non-4xx rejection passed"
                );
            }
        }
    }
}

/// The heartbeat request decoder: refusals are 4xx; what is accepted is a
/// request the executor can take as it is.
pub fn heartbeat_body(data: &[u8]) {
    match crate::http::decode_heartbeat(None, data, &crate::http::InputLimits::default()) {
        Err(e) => assert!(
            e.status().is_client_error(),
            "a decoder refusal that is not 4xx"
        ),
        Ok(req) => {
            assert!(!req.workspace_id.is_empty(), "an empty workspace id passed");
            let e = &req.event;
            assert!(
                e.error_rate.is_finite() && (0.0..=1.0).contains(&e.error_rate),
                "an error rate outside 0-1 passed"
            );
            assert!(
                e.active_tasks >= 0 && e.uptime_seconds >= 0,
                "a negative count passed"
            );
            let max = crate::http::DEFAULT_MAX_TEXT_BYTES;
            assert!(
                e.sample_error.len() <= max
                    && e.runtime_state.len() <= max
                    && e.current_task.as_ref().is_none_or(|t| t.len() <= max),
                "a text over the bound passed"
            );
        }
    }
}

/// The register request decoder: refusals are 4xx; what is accepted has an
/// id, an object agent card and a known delivery mode.
pub fn register_body(data: &[u8]) {
    match crate::http::decode_register(None, data) {
        Err(e) => assert!(
            e.status().is_client_error(),
            "a decoder refusal that is not 4xx"
        ),
        Ok(req) => {
            assert!(!req.id.is_empty(), "an empty id passed");
            let card: serde_json::Value =
                serde_json::from_str(&req.agent_card).unwrap_or(serde_json::Value::Null);
            assert!(
                card.is_object(),
                "an agent card that is not an object passed"
            );
            assert!(
                req.delivery_mode
                    .as_deref()
                    .is_none_or(|m| m == "push" || m == "poll"),
                "an unknown delivery mode passed"
            );
        }
    }
}
