//! The MCP recovery trigger (spec section 5, fix 2).
//!
//! When a condition stated earlier in the chain says the management MCP is
//! missing (the gate's `mcp_server_missing`, or the status rules'
//! `management_mcp_unloaded` past its grace; both are stated again on every
//! request while it holds), or a 0.1.0 policy's status change says so, ask
//! for a declared-plugin
//! reconcile of the workspace with the `mcp-recovery` trigger. The model
//! branch never triggers: no plugin can fix a missing secret. How often the
//! reconcile may really fire is the cooldown's business, later in the chain.

use heartgate_policy::{Action, Input, ReconcileTrigger};

/// The policy's name.
pub const NAME: &str = "mcp-recovery-trigger";

/// Reason codes that mean "the management MCP is missing".
pub const RECOVERABLE_REASONS: [&str; 2] = ["mcp_server_missing", "management_mcp_unloaded"];

/// Evaluate the trigger.
pub fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    let missing = proposed.iter().any(|a| {
        let reason = match (a.as_condition_set(), a.as_status_change()) {
            (Some(c), _) => &c.reason,
            (None, Some(c)) => &c.reason,
            (None, None) => return false,
        };
        RECOVERABLE_REASONS.contains(&reason.as_str())
    });
    let already = proposed
        .iter()
        .any(|a| a.is_reconcile(ReconcileTrigger::McpRecovery));
    if missing && !already && !input.workspace.id.is_empty() {
        proposed.push(Action::request_reconcile(
            &input.workspace.id,
            ReconcileTrigger::McpRecovery,
        ));
    }
    proposed
}

#[cfg(test)]
mod tests {
    use super::*;
    use heartgate_policy::testing::heartbeat;
    use heartgate_policy::{Severity, Status};

    fn failed(reason: &str) -> Vec<Action> {
        vec![Action::set_condition(
            "ws",
            "rca2970-gate",
            "identity",
            Severity::Failed,
            reason,
            "",
        )]
    }

    #[test]
    fn a_0_1_status_change_still_fires() {
        let proposed = vec![Action::set_status(
            "ws",
            Status::Online,
            Status::Failed,
            "mcp_server_missing",
            None,
        )];
        assert_eq!(recoveries(&decide(&heartbeat("ws"), proposed)), 1);
    }

    fn recoveries(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| a.is_reconcile(ReconcileTrigger::McpRecovery))
            .count()
    }

    #[test]
    fn mcp_missing_fires_recovery() {
        let out = decide(&heartbeat("ws"), failed("mcp_server_missing"));
        assert_eq!(recoveries(&out), 1);
        let out = decide(&heartbeat("ws"), failed("management_mcp_unloaded"));
        assert_eq!(recoveries(&out), 1);
    }

    #[test]
    fn model_missing_does_not_fire() {
        assert_eq!(
            recoveries(&decide(&heartbeat("ws"), failed("model_missing"))),
            0
        );
    }

    #[test]
    fn nothing_proposed_or_empty_id_is_a_no_op() {
        assert!(decide(&heartbeat("ws"), vec![]).is_empty());
        let mut input = heartbeat("ws");
        input.workspace.id.clear();
        assert_eq!(recoveries(&decide(&input, failed("mcp_server_missing"))), 0);
    }

    #[test]
    fn an_existing_request_is_not_duplicated() {
        let mut proposed = failed("mcp_server_missing");
        proposed.push(Action::request_reconcile(
            "ws",
            ReconcileTrigger::McpRecovery,
        ));
        assert_eq!(recoveries(&decide(&heartbeat("ws"), proposed)), 1);
    }
}
