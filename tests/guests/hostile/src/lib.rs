//! A hostile policy for tests. For a workspace id starting with
//! - `trap-`: panics (a trap);
//! - `loop-`: loops forever;
//! - `oom-`: grows memory without bound;
//! - `stack-`: recurses until the stack is exhausted;
//! - `error-`: returns a policy error;
//! - `foreign-`: returns an action for another workspace;
//! - `steal-`: writes another policy's marker;
//! - `flood-`: returns ten thousand actions;
//! - `longstr-`: returns a status change whose message is a mebibyte long;
//! - `event-`: adds a well-formed event (fails unless the slot is granted
//!   `record_event`);
//! - `drop-`: drops every proposed action (fails unless granted `drop`);
//!
//! and otherwise passes the proposed actions through unchanged.

use heartgate_policy::{Action, Guest, Input, PolicyError, ReconcileTrigger};

/// The component's export.
pub struct Hostile;

fn recurse(depth: u64, input: &Input) -> u64 {
    let local = [depth; 64];
    if input.now_ms == i64::MIN {
        return local[0];
    }
    recurse(depth + 1, input) + std::hint::black_box(local)[7]
}

impl Guest for Hostile {
    fn metadata() -> heartgate_policy::Metadata {
        heartgate_policy::Metadata {
            name: "hostile".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    fn evaluate(input: Input, proposed: Vec<Action>) -> Result<Vec<Action>, PolicyError> {
        let id = input.workspace.id.as_str();
        if id.starts_with("trap-") {
            panic!("hostile policy panics");
        }
        if id.starts_with("loop-") {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if id.starts_with("oom-") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        if id.starts_with("stack-") {
            std::hint::black_box(recurse(0, &input));
        }
        if id.starts_with("error-") {
            return Err(PolicyError {
                code: "hostile".into(),
                message: "this policy refuses".into(),
            });
        }
        if id.starts_with("foreign-") {
            let mut out = proposed;
            out.push(Action::request_reconcile(
                "someone-else",
                ReconcileTrigger::Online,
            ));
            return Ok(out);
        }
        if id.starts_with("steal-") {
            let mut out = proposed;
            out.push(Action::set_marker(
                id,
                "recovery-cooldown",
                "last-fire-ms",
                "0".into(),
            ));
            return Ok(out);
        }
        if id.starts_with("flood-") {
            return Ok((0..10_000)
                .map(|_| Action::request_reconcile(id, ReconcileTrigger::Online))
                .collect());
        }
        if id.starts_with("longstr-") {
            let mut out = proposed;
            out.push(Action::set_status(
                id,
                heartgate_policy::Status::Failed,
                heartgate_policy::Status::Online,
                "hostile",
                Some(&"x".repeat(1 << 20)),
            ));
            return Ok(out);
        }
        if id.starts_with("event-") {
            let mut out = proposed;
            out.push(Action::record_event(id, "HOSTILE_NOTE", "{}".to_string()));
            return Ok(out);
        }
        if id.starts_with("drop-") {
            return Ok(Vec::new());
        }
        Ok(proposed)
    }
}

#[cfg(target_arch = "wasm32")]
heartgate_policy::export_policy!(Hostile);
