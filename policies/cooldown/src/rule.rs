//! The recovery cooldown (spec section 5, fix 3).
//!
//! At most one `mcp-recovery` reconcile per workspace per five minutes. The
//! fire time is this policy's durable marker `last-fire-ms`, written in the
//! same transaction that queues the reconcile, i.e. before it is dispatched.
//! The host applies marker writes as compare-and-set against the value this
//! policy saw, so two concurrent evaluations cannot both fire: the loser is
//! re-evaluated on fresh state and sees the new marker. Exactly five minutes
//! after a fire, a fire is allowed again (strict `<`). Only the recovery
//! trigger is cooled; the ordinary online reconcile passes untouched.

use heartgate_policy::{Action, Input, ReconcileTrigger};

/// The policy's name; its marker is kept under it.
pub const NAME: &str = "recovery-cooldown";
/// The marker holding the last fire time in milliseconds since the epoch.
pub const LAST_FIRE_KEY: &str = "last-fire-ms";
/// The cooldown window.
pub const COOLDOWN_MS: i64 = 5 * 60 * 1000;

/// Evaluate the cooldown.
pub fn decide(input: &Input, proposed: Vec<Action>) -> Vec<Action> {
    decide_with(input, proposed, COOLDOWN_MS)
}

/// Evaluate with an explicit window (for candidates with another cooldown).
pub fn decide_with(input: &Input, mut proposed: Vec<Action>, cooldown_ms: i64) -> Vec<Action> {
    let requested = proposed
        .iter()
        .any(|a| a.is_reconcile(ReconcileTrigger::McpRecovery));
    if !requested {
        return proposed;
    }
    proposed.retain(|a| !a.is_reconcile(ReconcileTrigger::McpRecovery));
    let cooling = input
        .marker_ms(LAST_FIRE_KEY)
        .is_some_and(|last| input.now_ms - last < cooldown_ms);
    if cooling || input.workspace.id.is_empty() {
        return proposed;
    }
    let id = &input.workspace.id;
    proposed.push(Action::set_marker(
        id,
        NAME,
        LAST_FIRE_KEY,
        input.now_ms.to_string(),
    ));
    proposed.push(Action::request_reconcile(id, ReconcileTrigger::McpRecovery));
    proposed
}

#[cfg(test)]
mod tests {
    use super::*;
    use heartgate_policy::testing::{T0_MS, heartbeat};
    use heartgate_policy::{Effect, Input};

    fn fires(input: &Input) -> bool {
        let proposed = vec![Action::request_reconcile(
            "ws",
            ReconcileTrigger::McpRecovery,
        )];
        decide(input, proposed)
            .iter()
            .any(|a| a.is_reconcile(ReconcileTrigger::McpRecovery))
    }

    fn after_fire_at(last: i64, now: i64) -> Input {
        heartbeat("ws")
            .with_marker(NAME, LAST_FIRE_KEY, &last.to_string())
            .at(now)
    }

    #[test]
    fn first_request_fires_and_records_the_time_before_dispatch() {
        let out = decide(
            &heartbeat("ws"),
            vec![Action::request_reconcile(
                "ws",
                ReconcileTrigger::McpRecovery,
            )],
        );
        let marker_at = out
            .iter()
            .position(|a| {
                matches!(&a.effect, Effect::SetMarker(m)
                if m.key == LAST_FIRE_KEY && m.value == T0_MS.to_string() && m.owner == NAME)
            })
            .expect("marker written");
        let fire_at = out
            .iter()
            .position(|a| a.is_reconcile(ReconcileTrigger::McpRecovery))
            .expect("fires");
        assert!(marker_at < fire_at);
    }

    #[test]
    fn two_immediate_requests_fire_once_then_again_after_the_cooldown() {
        assert!(!fires(&after_fire_at(T0_MS, T0_MS)));
        assert!(!fires(&after_fire_at(T0_MS, T0_MS + COOLDOWN_MS - 1)));
        assert!(fires(&after_fire_at(T0_MS, T0_MS + COOLDOWN_MS)));
        assert!(fires(&after_fire_at(T0_MS, T0_MS + 10 * 60 * 1000)));
    }

    #[test]
    fn online_reconcile_is_not_cooled() {
        let input = after_fire_at(T0_MS, T0_MS + 1);
        let out = decide(
            &input,
            vec![Action::request_reconcile("ws", ReconcileTrigger::Online)],
        );
        assert_eq!(out.len(), 1);
        assert!(out[0].is_reconcile(ReconcileTrigger::Online));
    }

    #[test]
    fn duplicate_requests_collapse_into_one_fire() {
        let proposed = vec![
            Action::request_reconcile("ws", ReconcileTrigger::McpRecovery),
            Action::request_reconcile("ws", ReconcileTrigger::McpRecovery),
        ];
        let out = decide(&heartbeat("ws"), proposed);
        let fires = out
            .iter()
            .filter(|a| a.is_reconcile(ReconcileTrigger::McpRecovery))
            .count();
        assert_eq!(fires, 1);
    }

    #[test]
    fn empty_workspace_id_never_fires() {
        let mut input = heartbeat("ws");
        input.workspace.id.clear();
        assert!(!fires(&input));
    }

    #[test]
    fn a_malformed_marker_reads_as_never_fired() {
        let input = heartbeat("ws").with_marker(NAME, LAST_FIRE_KEY, "garbage");
        assert!(fires(&input));
    }

    #[test]
    fn nothing_requested_is_a_no_op() {
        assert!(decide(&heartbeat("ws"), vec![]).is_empty());
    }
}
