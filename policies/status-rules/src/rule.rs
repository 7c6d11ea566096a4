//! The ordinary status rules of register and heartbeat (spec section 6).
//!
//! They run after the gate: when the gate (or anything before) already failed
//! the workspace or refused the request, they add nothing, so nothing can mark
//! the workspace online on that request. Statuses `removed`, `paused`,
//! `hibernated` and `hibernating` are never changed. Every status write names
//! the status it expects.
//!
//! Heartbeat, in order:
//! - the #3082 loaded-tools check (platform, `mcp_server_present == true`, the
//!   management plugin declared): the tool `PROVISION_TOOL` must be loaded; the
//!   first miss is remembered in the marker `mcp-unloaded-since`, and after
//!   `UNLOADED_GRACE_MS` the workspace is degraded with reason
//!   `management_mcp_unloaded` (the recovery trigger reacts to it); a load
//!   clears the marker;
//! - `provisioning`, `offline`, `awaiting_agent`, `failed` -> `online`, with a
//!   `WORKSPACE_ONLINE` event (`recovered_from`) and the online reconcile;
//! - `online` -> `degraded` when wedged, `error_rate >= 0.5`, a register
//!   failure in the last five minutes, or the tools missing past the grace;
//! - `degraded` -> `online` only when `error_rate < 0.1`, not wedged, no recent
//!   register failure and the management MCP not known to be unloaded.
//!
//! Register: a workspace that is not `online` becomes `online`, with the
//! online reconcile when it was `provisioning`.

use heartgate_policy::{
    Action, Effect, HeartbeatEvent, Input, ReconcileTrigger, Status, WorkspaceKind, json_string,
};

/// The policy's name; its marker is kept under it.
pub const NAME: &str = "status-rules";
/// The privileged management plugin.
pub const MANAGEMENT_PLUGIN: &str = "molecule-ai-plugin-molecule-platform-mcp";
/// The tool a platform agent must have loaded.
pub const PROVISION_TOOL: &str = "mcp__molecule-platform__provision_workspace";
/// The marker remembering when the tool was first seen missing (ms).
pub const UNLOADED_SINCE_KEY: &str = "mcp-unloaded-since";
/// How long the tool may be missing before the workspace is degraded.
pub const UNLOADED_GRACE_MS: i64 = 180 * 1000;
/// How long a register failure counts as recent.
pub const REGISTER_FAILURE_WINDOW_MS: i64 = 5 * 60 * 1000;

/// Reason code of the #3082 degrade.
pub const MANAGEMENT_MCP_UNLOADED: &str = "management_mcp_unloaded";

const UNLOADED_MESSAGE: &str =
    "platform agent management MCP declared but not loaded; marking degraded (core#3082)";
const TOOLS_ABSENT_MESSAGE: &str = "platform agent runtime did not report loaded_mcp_tools on a mcp_server_present=true heartbeat; cannot verify provision_workspace tool is loaded — marking degraded (core#3082)";
const REGISTER_FAILURE_SAMPLE: &str =
    "Register failed — workspace auth token may be stale. Restart or reprovision to recover.";

/// Evaluate the status rules.
pub fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    let ws = &input.workspace;
    let stopped = proposed.iter().any(|a| match &a.effect {
        Effect::Reject(_) => true,
        Effect::SetStatus(c) => c.to == Status::Failed,
        _ => false,
    });
    if stopped || ws.status.is_frozen() {
        return proposed;
    }
    match input.heartbeat() {
        Some(hb) => heartbeat(input, hb, &mut proposed),
        None => register(input, &mut proposed),
    }
    proposed
}

fn register(input: &Input, out: &mut Vec<Action>) {
    let ws = &input.workspace;
    if ws.status != Status::Online {
        promote(input, "registered", out);
    }
}

/// What the #3082 check concluded on this heartbeat.
struct ToolsCheck {
    /// The tool is known to be missing (within or past the grace).
    unloaded: bool,
    /// Missing past the grace: the message to degrade with.
    past_grace: Option<&'static str>,
}

fn tools_check(input: &Input, hb: &HeartbeatEvent, out: &mut Vec<Action>) -> ToolsCheck {
    let ws = &input.workspace;
    let none = ToolsCheck {
        unloaded: false,
        past_grace: None,
    };
    let applies = ws.kind == WorkspaceKind::Platform
        && hb.mcp_server_present == Some(true)
        && ws.declared_plugins.iter().any(|p| p == MANAGEMENT_PLUGIN);
    if !applies {
        return none;
    }
    let since = input.marker_ms(UNLOADED_SINCE_KEY);
    let loaded = hb
        .loaded_mcp_tools
        .as_ref()
        .is_some_and(|tools| tools.iter().any(|t| t == PROVISION_TOOL));
    if loaded {
        if input.marker(UNLOADED_SINCE_KEY).is_some() {
            out.push(Action::clear_marker(&ws.id, NAME, UNLOADED_SINCE_KEY));
        }
        return none;
    }
    let first_seen = match since {
        Some(ms) => ms,
        None => {
            out.push(Action::set_marker(
                &ws.id,
                NAME,
                UNLOADED_SINCE_KEY,
                input.now_ms.to_string(),
            ));
            input.now_ms
        }
    };
    let message = if hb.loaded_mcp_tools.is_none() {
        TOOLS_ABSENT_MESSAGE
    } else {
        UNLOADED_MESSAGE
    };
    ToolsCheck {
        unloaded: true,
        past_grace: (input.now_ms - first_seen > UNLOADED_GRACE_MS).then_some(message),
    }
}

fn heartbeat(input: &Input, hb: &HeartbeatEvent, out: &mut Vec<Action>) {
    let ws = &input.workspace;
    let tools = tools_check(input, hb, out);
    let wedged = hb.runtime_state == "wedged";
    let recent_register_failure = ws
        .last_register_failure_ms
        .is_some_and(|at| input.now_ms - at < REGISTER_FAILURE_WINDOW_MS);

    match ws.status {
        Status::Provisioning | Status::Offline | Status::AwaitingAgent | Status::Failed => {
            promote(input, "heartbeat", out);
        }
        Status::Online => {
            if let Some(message) = tools.past_grace {
                degrade_unloaded(input, hb, message, out);
            } else if wedged {
                degrade(
                    input,
                    "runtime_wedged",
                    format!(
                        "{{\"runtime_state\":\"wedged\",\"sample_error\":{}}}",
                        json_string(&hb.sample_error)
                    ),
                    out,
                );
            } else if hb.error_rate >= 0.5 {
                degrade(
                    input,
                    "error_rate_high",
                    format!(
                        "{{\"error_rate\":{},\"sample_error\":{}}}",
                        json_number(hb.error_rate),
                        json_string(&hb.sample_error)
                    ),
                    out,
                );
            } else if recent_register_failure {
                degrade(
                    input,
                    "register_failed",
                    format!(
                        "{{\"register_failure\":true,\"sample_error\":{}}}",
                        json_string(REGISTER_FAILURE_SAMPLE)
                    ),
                    out,
                );
            }
        }
        Status::Degraded => {
            if let Some(message) = tools.past_grace {
                // Re-assert the degrade so the recovery trigger sees the reason.
                degrade_unloaded(input, hb, message, out);
            } else if hb.error_rate < 0.1 && !wedged && !recent_register_failure && !tools.unloaded
            {
                promote(input, "heartbeat", out);
            }
        }
        Status::Removed | Status::Paused | Status::Hibernated | Status::Hibernating => {}
    }
}

fn promote(input: &Input, reason: &str, out: &mut Vec<Action>) {
    let ws = &input.workspace;
    out.push(Action::set_status(
        &ws.id,
        ws.status,
        Status::Online,
        reason,
        None,
    ));
    out.push(Action::record_event(
        &ws.id,
        "WORKSPACE_ONLINE",
        format!("{{\"recovered_from\":\"{}\"}}", ws.status.as_str()),
    ));
    let reconcile = match input.heartbeat() {
        Some(_) => true,
        None => ws.status == Status::Provisioning,
    };
    if reconcile {
        out.push(Action::request_reconcile(&ws.id, ReconcileTrigger::Online));
    }
}

fn degrade(input: &Input, reason: &str, payload: String, out: &mut Vec<Action>) {
    let ws = &input.workspace;
    out.push(Action::set_status(
        &ws.id,
        ws.status,
        Status::Degraded,
        reason,
        None,
    ));
    out.push(Action::record_event(&ws.id, "WORKSPACE_DEGRADED", payload));
}

fn degrade_unloaded(input: &Input, hb: &HeartbeatEvent, message: &str, out: &mut Vec<Action>) {
    let ws = &input.workspace;
    out.push(Action::set_status(
        &ws.id,
        ws.status,
        Status::Degraded,
        MANAGEMENT_MCP_UNLOADED,
        Some(message),
    ));
    out.push(Action::record_event(
        &ws.id,
        "WORKSPACE_DEGRADED",
        format!(
            "{{\"management_mcp_missing\":true,\"loaded_mcp_tools_absent\":{},\"sample_error\":{}}}",
            hb.loaded_mcp_tools.is_none(),
            json_string(message)
        ),
    ));
}

fn json_number(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use heartgate_policy::testing::{T0_MS, heartbeat, register};

    fn transition(actions: &[Action]) -> Option<(Status, Status, String)> {
        actions
            .iter()
            .find_map(|a| a.as_status_change())
            .map(|c| (c.expected, c.to, c.reason.clone()))
    }

    fn online_reconciles(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| a.is_reconcile(ReconcileTrigger::Online))
            .count()
    }

    fn event(actions: &[Action], kind: &str) -> Option<String> {
        actions.iter().find_map(|a| match &a.effect {
            Effect::RecordEvent(e) if e.event_type == kind => Some(e.payload_json.clone()),
            _ => None,
        })
    }

    #[test]
    fn offline_failed_awaiting_and_provisioning_come_online_with_event_and_reconcile() {
        for from in [
            Status::Offline,
            Status::Failed,
            Status::AwaitingAgent,
            Status::Provisioning,
        ] {
            let out = decide(&heartbeat("ws").with_status(from), vec![]);
            assert_eq!(
                transition(&out).map(|t| (t.0, t.1)),
                Some((from, Status::Online))
            );
            let payload = event(&out, "WORKSPACE_ONLINE").expect("online event");
            assert!(payload.contains(&format!("\"recovered_from\":\"{}\"", from.as_str())));
            assert_eq!(online_reconciles(&out), 1);
        }
    }

    #[test]
    fn online_with_error_rate_below_half_stays_online() {
        let input = heartbeat("ws").beat(|hb| hb.error_rate = 0.2);
        assert!(decide(&input, vec![]).is_empty());
    }

    #[test]
    fn online_degrades_when_wedged_erroring_or_register_failed() {
        let wedged = heartbeat("ws").beat(|hb| hb.runtime_state = "wedged".into());
        let erroring = heartbeat("ws").beat(|hb| hb.error_rate = 0.5);
        let register_failed = heartbeat("ws").with_register_failure_at(T0_MS - 2 * 60 * 1000);
        for (input, reason) in [
            (wedged, "runtime_wedged"),
            (erroring, "error_rate_high"),
            (register_failed, "register_failed"),
        ] {
            let out = decide(&input, vec![]);
            assert_eq!(
                transition(&out),
                Some((Status::Online, Status::Degraded, reason.to_string()))
            );
            assert!(event(&out, "WORKSPACE_DEGRADED").is_some());
        }
        let old_failure = heartbeat("ws").with_register_failure_at(T0_MS - 5 * 60 * 1000);
        assert!(decide(&old_failure, vec![]).is_empty());
    }

    #[test]
    fn degraded_recovers_only_after_the_wedge_clears_and_errors_drop() {
        let still_wedged = heartbeat("ws")
            .with_status(Status::Degraded)
            .beat(|hb| hb.runtime_state = "wedged".into());
        assert!(decide(&still_wedged, vec![]).is_empty());
        let still_erroring = heartbeat("ws")
            .with_status(Status::Degraded)
            .beat(|hb| hb.error_rate = 0.1);
        assert!(decide(&still_erroring, vec![]).is_empty());
        let recent_failure = heartbeat("ws")
            .with_status(Status::Degraded)
            .with_register_failure_at(T0_MS - 1000);
        assert!(decide(&recent_failure, vec![]).is_empty());
        let healthy = heartbeat("ws").with_status(Status::Degraded);
        let out = decide(&healthy, vec![]);
        assert_eq!(
            transition(&out).map(|t| (t.0, t.1)),
            Some((Status::Degraded, Status::Online))
        );
        assert_eq!(online_reconciles(&out), 1);
    }

    #[test]
    fn frozen_statuses_never_change() {
        for frozen in [
            Status::Removed,
            Status::Paused,
            Status::Hibernated,
            Status::Hibernating,
        ] {
            let hb = heartbeat("ws")
                .with_status(frozen)
                .beat(|hb| hb.runtime_state = "wedged".into());
            assert!(decide(&hb, vec![]).is_empty(), "{frozen:?}");
            assert!(decide(&register("ws").with_status(frozen), vec![]).is_empty());
        }
    }

    #[test]
    fn nothing_after_the_gate_failed() {
        let input = heartbeat("ws").with_status(Status::Failed);
        let gate = vec![Action::set_status(
            "ws",
            Status::Failed,
            Status::Failed,
            "mcp_server_missing",
            None,
        )];
        assert_eq!(decide(&input, gate.clone()), gate);
    }

    fn platform_with_tools(tools: Option<&[&str]>) -> Input {
        heartbeat("ws")
            .platform()
            .declaring(MANAGEMENT_PLUGIN)
            .mcp_present(Some(true))
            .tools(tools)
    }

    #[test]
    fn tools_missing_within_grace_only_stamps() {
        let out = decide(&platform_with_tools(Some(&["a2a"])), vec![]);
        assert_eq!(
            out,
            vec![Action::set_marker(
                "ws",
                NAME,
                UNLOADED_SINCE_KEY,
                T0_MS.to_string()
            )]
        );
        let stamped = platform_with_tools(Some(&["a2a"])).with_marker(
            NAME,
            UNLOADED_SINCE_KEY,
            &(T0_MS - UNLOADED_GRACE_MS).to_string(),
        );
        assert!(decide(&stamped, vec![]).is_empty());
    }

    #[test]
    fn tools_missing_past_grace_degrades_with_the_recovery_reason() {
        let since = (T0_MS - 5 * 60 * 1000).to_string();
        let empty = platform_with_tools(Some(&[])).with_marker(NAME, UNLOADED_SINCE_KEY, &since);
        let out = decide(&empty, vec![]);
        assert_eq!(
            transition(&out),
            Some((
                Status::Online,
                Status::Degraded,
                MANAGEMENT_MCP_UNLOADED.to_string()
            ))
        );
        let message = out[0].as_status_change().and_then(|c| c.message.clone());
        assert_eq!(message.as_deref(), Some(UNLOADED_MESSAGE));

        let absent = platform_with_tools(None).with_marker(NAME, UNLOADED_SINCE_KEY, &since);
        let out = decide(&absent, vec![]);
        let message = out[0].as_status_change().and_then(|c| c.message.clone());
        assert_eq!(message.as_deref(), Some(TOOLS_ABSENT_MESSAGE));
        assert!(
            event(&out, "WORKSPACE_DEGRADED")
                .is_some_and(|p| p.contains("\"loaded_mcp_tools_absent\":true"))
        );
    }

    #[test]
    fn loaded_tool_clears_the_stamp_and_stays_online() {
        let input = platform_with_tools(Some(&[PROVISION_TOOL])).with_marker(
            NAME,
            UNLOADED_SINCE_KEY,
            &(T0_MS - 30_000).to_string(),
        );
        assert_eq!(
            decide(&input, vec![]),
            vec![Action::clear_marker("ws", NAME, UNLOADED_SINCE_KEY)]
        );
    }

    #[test]
    fn degraded_is_not_recovered_while_tools_are_unloaded() {
        let input = platform_with_tools(Some(&["a2a"]))
            .with_status(Status::Degraded)
            .with_marker(NAME, UNLOADED_SINCE_KEY, &(T0_MS - 10_000).to_string());
        assert!(decide(&input, vec![]).is_empty());
    }

    #[test]
    fn legacy_runtime_and_undeclared_plugin_skip_the_tools_check() {
        let legacy = heartbeat("ws").platform().declaring(MANAGEMENT_PLUGIN);
        assert!(decide(&legacy, vec![]).is_empty());
        let undeclared = heartbeat("ws")
            .platform()
            .mcp_present(Some(true))
            .tools(Some(&[]));
        assert!(decide(&undeclared, vec![]).is_empty());
    }

    #[test]
    fn register_brings_a_workspace_online_and_reconciles_from_provisioning() {
        let out = decide(&register("ws"), vec![]);
        assert_eq!(
            transition(&out).map(|t| (t.0, t.1)),
            Some((Status::Provisioning, Status::Online))
        );
        assert_eq!(online_reconciles(&out), 1);
        let from_failed = decide(&register("ws").with_status(Status::Failed), vec![]);
        assert_eq!(online_reconciles(&from_failed), 0);
        assert!(decide(&register("ws").with_status(Status::Online), vec![]).is_empty());
    }
}
