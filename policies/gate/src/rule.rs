//! The RCA#2970 identity gate (spec section 4).
//!
//! A platform workspace must have a `MODEL` secret configured and its
//! management MCP server present. The model is checked first: when both are
//! missing the model branch wins, so no recovery is requested. On failure the
//! gate fails closed: it puts its condition `identity` in force (severity
//! `failed`, with the exact message of the original registry, which the
//! host stores as the workspace's last error), records an event, refuses a
//! register with 400, and drops any explicit status change proposed before
//! it. Once the identity is complete again it clears the condition.

use heartgate_policy::{Action, Input, Severity, WorkspaceKind, json_string};

/// The policy's name; its markers and decision-log entries use it.
pub const NAME: &str = "rca2970-gate";

/// Reason code when no `MODEL` secret is configured.
pub const MODEL_MISSING: &str = "model_missing";
/// Reason code when the runtime reports `mcp_server_present=false`.
pub const MCP_SERVER_MISSING: &str = "mcp_server_missing";

const REGISTER_MODEL_MESSAGE: &str =
    "platform agent registered without a seeded MODEL secret; refusing online";
const REGISTER_MCP_MESSAGE: &str = "platform agent registered without its management MCP server (mcp_server_present=false); refusing online";
const HEARTBEAT_MODEL_MESSAGE: &str = "platform agent heartbeat denied: no seeded MODEL workspace_secret; refusing to mark online (RCA #2970 FAIL-CLOSED)";
const HEARTBEAT_MCP_MESSAGE: &str = "platform agent heartbeat denied: management MCP server absent (mcp_server_present=false); refusing to mark online (RCA #2970 FAIL-CLOSED)";

/// The gate's one condition.
pub const CONDITION: &str = "identity";

/// The body of the 400 a failing register gets.
pub const REJECT_MESSAGE: &str = "platform agent identity incomplete";

/// Evaluate the gate.
pub fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    let ws = &input.workspace;
    if ws.kind != WorkspaceKind::Platform || ws.status.is_frozen() || input.silence().is_some() {
        return proposed;
    }
    let register = input.register().is_some();
    let (reason, message) = if !ws.model_configured {
        let message = if register {
            REGISTER_MODEL_MESSAGE
        } else {
            HEARTBEAT_MODEL_MESSAGE
        };
        (MODEL_MISSING, message)
    } else if input.mcp_server_present() == Some(false) {
        let message = if register {
            REGISTER_MCP_MESSAGE
        } else {
            HEARTBEAT_MCP_MESSAGE
        };
        (MCP_SERVER_MISSING, message)
    } else {
        // Absent `mcp_server_present` is a legacy runtime: not blocked.
        if input.condition(NAME, CONDITION).is_some() {
            proposed.push(Action::clear_condition(&ws.id, NAME, CONDITION));
        }
        return proposed;
    };

    proposed.retain(|a| a.as_status_change().is_none());
    proposed.push(Action::set_condition(
        &ws.id,
        NAME,
        CONDITION,
        Severity::Failed,
        reason,
        message,
    ));
    proposed.push(Action::record_event(
        &ws.id,
        "WORKSPACE_PROVISION_FAILED",
        format!(
            "{{\"error\":{},\"code\":\"PLATFORM_AGENT_IDENTITY_GATE\",\"reason\":{}}}",
            json_string(message),
            json_string(reason)
        ),
    ));
    if register {
        proposed.push(Action::reject(&ws.id, 400, REJECT_MESSAGE));
    }
    proposed
}

#[cfg(test)]
mod tests {
    use super::*;
    use heartgate_policy::testing::{assert_clears_condition, heartbeat, register};
    use heartgate_policy::{Effect, ReconcileTrigger, Status};

    fn failed_with(actions: &[Action]) -> Option<(String, Option<String>)> {
        actions
            .iter()
            .find_map(|a| a.as_condition_set())
            .filter(|c| c.severity == Severity::Failed && c.name == CONDITION)
            .map(|c| (c.reason.clone(), Some(c.message.clone())))
    }

    #[test]
    fn mcp_missing_heartbeat_fails_closed_with_exact_message() {
        let input = heartbeat("ws-mcp-fail").platform().mcp_present(Some(false));
        let out = decide(&input, vec![]);
        let (reason, message) = failed_with(&out).expect("a failed status write");
        assert_eq!(reason, MCP_SERVER_MISSING);
        assert_eq!(message.as_deref(), Some(HEARTBEAT_MCP_MESSAGE));
        assert!(out.iter().any(|a| matches!(&a.effect,
            Effect::RecordEvent(e) if e.event_type == "WORKSPACE_PROVISION_FAILED"
                && e.payload_json.contains("\"reason\":\"mcp_server_missing\"")
                && e.payload_json.contains("PLATFORM_AGENT_IDENTITY_GATE"))));
        assert!(!out.iter().any(|a| matches!(a.effect, Effect::Reject(_))));
    }

    #[test]
    fn model_missing_wins_over_mcp_missing() {
        let input = heartbeat("ws")
            .platform()
            .with_model(false)
            .mcp_present(Some(false));
        let (reason, message) = failed_with(&decide(&input, vec![])).expect("failed");
        assert_eq!(reason, MODEL_MISSING);
        assert_eq!(message.as_deref(), Some(HEARTBEAT_MODEL_MESSAGE));
    }

    #[test]
    fn register_gate_failure_rejects_with_400() {
        let input = register("ws").platform().mcp_present(Some(false));
        let out = decide(&input, vec![]);
        let (reason, message) = failed_with(&out).expect("failed");
        assert_eq!(reason, MCP_SERVER_MISSING);
        assert_eq!(message.as_deref(), Some(REGISTER_MCP_MESSAGE));
        assert!(out.iter().any(|a| matches!(&a.effect,
            Effect::Reject(r) if r.http_status == 400 && r.message == REJECT_MESSAGE)));

        let no_model = register("ws").platform().with_model(false);
        let (reason, message) = failed_with(&decide(&no_model, vec![])).expect("failed");
        assert_eq!(reason, MODEL_MISSING);
        assert_eq!(message.as_deref(), Some(REGISTER_MODEL_MESSAGE));
    }

    #[test]
    fn a_complete_identity_clears_the_condition() {
        let input = heartbeat("ws")
            .platform()
            .with_status(Status::Failed)
            .with_condition(NAME, CONDITION, Severity::Failed, MCP_SERVER_MISSING)
            .mcp_present(Some(true));
        let out = decide(&input, vec![]);
        assert_clears_condition(&out, CONDITION);
        assert_eq!(out.len(), 1, "{out:?}");
    }

    #[test]
    fn legacy_runtime_and_present_mcp_pass() {
        for present in [None, Some(true)] {
            let input = heartbeat("ws").platform().mcp_present(present);
            assert!(decide(&input, vec![]).is_empty());
        }
    }

    #[test]
    fn ordinary_and_frozen_workspaces_are_not_gated() {
        let ordinary = heartbeat("ws").with_model(false).mcp_present(Some(false));
        assert!(decide(&ordinary, vec![]).is_empty());
        for frozen in [
            Status::Removed,
            Status::Paused,
            Status::Hibernated,
            Status::Hibernating,
        ] {
            let input = heartbeat("ws")
                .platform()
                .with_status(frozen)
                .mcp_present(Some(false));
            assert!(decide(&input, vec![]).is_empty(), "{frozen:?}");
        }
    }

    #[test]
    fn failure_drops_earlier_status_changes_and_keeps_other_actions() {
        let input = heartbeat("ws").platform().mcp_present(Some(false));
        let earlier = vec![
            Action::set_status("ws", Status::Online, Status::Degraded, "x", None),
            Action::request_reconcile("ws", ReconcileTrigger::Online),
        ];
        let out = decide(&input, earlier);
        assert!(
            out.iter().all(|a| a.as_status_change().is_none()),
            "{out:?}"
        );
        assert!(failed_with(&out).is_some());
        assert!(out.iter().any(|a| a.is_reconcile(ReconcileTrigger::Online)));
    }
}
