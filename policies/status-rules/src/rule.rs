//! The ordinary status rules of register and heartbeat (spec section 6), as
//! conditions (contract 0.2.0).
//!
//! The host derives the status from the conditions in force: none, and a
//! register or heartbeat brings the workspace `online` (the host records
//! `WORKSPACE_ONLINE` with `recovered_from` and queues the online reconcile);
//! the most severe one otherwise. So these rules only say *why* a workspace
//! is degraded, with four conditions of their own, and when that reason is
//! gone. They run after the gate: when the gate (or anything before) already
//! failed the workspace or refused the request, they add nothing. Statuses
//! `removed`, `paused`, `hibernated` and `hibernating` are never touched.
//!
//! Heartbeat, in order:
//! - the #3082 loaded-tools check (platform, `mcp_server_present == true`, the
//!   management plugin declared): the tool `PROVISION_TOOL` must be loaded; the
//!   first miss is remembered in the marker `mcp-unloaded-since`, and after
//!   `UNLOADED_GRACE_MS` the condition `mcp-tools-unloaded` (reason
//!   `management_mcp_unloaded`, which the recovery trigger reacts to) is
//!   stated on every heartbeat, with a `WORKSPACE_DEGRADED` event; a load
//!   clears the marker;
//! - `provisioning`, `offline`, `awaiting_agent`, `failed`: the runtime is
//!   back; its health is judged from the next heartbeat, so any condition of
//!   these rules is cleared (and the workspace comes online);
//! - `online`: the first of wedged (`runtime-wedged`), `error_rate >= 0.5`
//!   (`error-rate`), a register failure in the last five minutes
//!   (`register-failed`) is put in force, with a `WORKSPACE_DEGRADED` event;
//! - `degraded`: these rules' conditions are cleared only when
//!   `error_rate < 0.1`, not wedged, no recent register failure and the
//!   management MCP not known to be unloaded (the hysteresis: degrade at 0.5,
//!   recover below 0.1).
//!
//! A runtime that declares the capability `status_mgmt` manages its own
//! status (section 3.3 steps 5, 6 and 8 of the original): its error rate
//! neither degrades it nor holds it degraded. Wedged, a register failure
//! and the #3082 check still apply to it.
//!
//! Register: the runtime restarted, so these rules' conditions are cleared;
//! the workspace comes online unless another policy holds it back.

use heartgate_policy::{
    Action, Effect, HeartbeatEvent, Input, Severity, Status, WorkspaceKind, json_string,
};

/// The policy's name; its marker and conditions are kept under it.
pub const NAME: &str = "status-rules";
/// The plugin that carries the management MCP server.
pub const MANAGEMENT_PLUGIN: &str = "molecule-ai-plugin-molecule-platform-mcp";
/// The tool a loaded management MCP server provides.
pub const PROVISION_TOOL: &str = "mcp__molecule-platform__provision_workspace";
/// The marker holding when the tool was first seen missing.
pub const UNLOADED_SINCE_KEY: &str = "mcp-unloaded-since";
/// How long the tool may be missing before the workspace is degraded.
pub const UNLOADED_GRACE_MS: i64 = 180 * 1000;
/// How recent a register failure degrades an online workspace.
pub const REGISTER_FAILURE_WINDOW_MS: i64 = 5 * 60 * 1000;

/// The capability of a runtime that manages its own status.
pub const STATUS_MGMT: &str = "status_mgmt";

/// Reason code of the #3082 degrade; the recovery trigger reacts to it.
pub const MANAGEMENT_MCP_UNLOADED: &str = "management_mcp_unloaded";

/// The conditions of these rules.
pub const TOOLS_UNLOADED: &str = "mcp-tools-unloaded";
pub const WEDGED: &str = "runtime-wedged";
pub const ERROR_RATE: &str = "error-rate";
pub const REGISTER_FAILED: &str = "register-failed";
/// What the host's migration to conditions gave a workspace that was
/// already `degraded`: it recovers by these rules like any other.
pub const DEGRADED_BEFORE: &str = "degraded-before-0-2";
/// Every condition of these rules.
pub const CONDITIONS: [&str; 5] = [
    TOOLS_UNLOADED,
    WEDGED,
    ERROR_RATE,
    REGISTER_FAILED,
    DEGRADED_BEFORE,
];

const UNLOADED_MESSAGE: &str =
    "platform agent management MCP declared but not loaded; marking degraded (core#3082)";
const TOOLS_ABSENT_MESSAGE: &str = "platform agent runtime did not report loaded_mcp_tools on a mcp_server_present=true heartbeat; cannot verify provision_workspace tool is loaded — marking degraded (core#3082)";
const REGISTER_FAILURE_SAMPLE: &str =
    "Register failed — workspace auth token may be stale. Restart or reprovision to recover.";

/// Evaluate the rules.
pub fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    let ws = &input.workspace;
    let stopped = proposed.iter().any(|a| match &a.effect {
        Effect::Reject(_) => true,
        Effect::SetStatus(c) => c.to == Status::Failed,
        Effect::SetCondition(c) => c.severity == Severity::Failed,
        _ => false,
    });
    if stopped || ws.status.is_frozen() {
        return proposed;
    }
    match (&input.event, input.heartbeat()) {
        (_, Some(hb)) => heartbeat(input, hb, &mut proposed),
        (heartgate_policy::Event::Register(_), None) => clear_own(input, &mut proposed),
        // Silence is the liveness policy's to judge.
        _ => {}
    }
    proposed
}

/// Clear every condition of these rules that is in force.
fn clear_own(input: &Input, out: &mut Vec<Action>) {
    for name in CONDITIONS {
        if input.condition(NAME, name).is_some() {
            out.push(Action::clear_condition(&input.workspace.id, NAME, name));
        }
    }
}

struct ToolsCheck {
    unloaded: bool,
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
    // A runtime managing its own status is not judged by its error rate.
    let native = input.has_capability(STATUS_MGMT);
    let error_rate_high = !native && hb.error_rate >= 0.5;
    let error_rate_low = native || hb.error_rate < 0.1;
    let recent_register_failure = ws
        .last_register_failure_ms
        .is_some_and(|at| input.now_ms - at < REGISTER_FAILURE_WINDOW_MS);

    match ws.status {
        Status::Provisioning | Status::Offline | Status::AwaitingAgent | Status::Failed => {
            clear_own(input, out);
        }
        Status::Online => {
            if let Some(message) = tools.past_grace {
                degrade_unloaded(input, hb, message, out);
            } else if wedged {
                degrade(
                    input,
                    WEDGED,
                    "runtime_wedged",
                    format!(
                        "{{\"runtime_state\":\"wedged\",\"sample_error\":{}}}",
                        json_string(&hb.sample_error)
                    ),
                    out,
                );
            } else if error_rate_high {
                degrade(
                    input,
                    ERROR_RATE,
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
                    REGISTER_FAILED,
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
                degrade_unloaded(input, hb, message, out);
            } else if error_rate_low && !wedged && !recent_register_failure && !tools.unloaded {
                clear_own(input, out);
            }
        }
        Status::Removed | Status::Paused | Status::Hibernated | Status::Hibernating => {}
    }
}

fn degrade(input: &Input, condition: &str, reason: &str, payload: String, out: &mut Vec<Action>) {
    let ws = &input.workspace;
    out.push(Action::set_condition(
        &ws.id,
        NAME,
        condition,
        Severity::Degraded,
        reason,
        "",
    ));
    out.push(Action::record_event(&ws.id, "WORKSPACE_DEGRADED", payload));
}

fn degrade_unloaded(input: &Input, hb: &HeartbeatEvent, message: &str, out: &mut Vec<Action>) {
    let ws = &input.workspace;
    out.push(Action::set_condition(
        &ws.id,
        NAME,
        TOOLS_UNLOADED,
        Severity::Degraded,
        MANAGEMENT_MCP_UNLOADED,
        message,
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
    use heartgate_policy::testing::{
        T0_MS, assert_clears_condition, assert_records_event, assert_sets_condition, heartbeat,
        register,
    };

    fn degraded_by(input: Input, name: &str) -> Input {
        input
            .with_status(Status::Degraded)
            .with_condition(NAME, name, Severity::Degraded, "x")
    }

    #[test]
    fn a_runtime_managing_its_own_status_is_not_judged_by_its_error_rate() {
        let mut hb = heartbeat("ws").capability(STATUS_MGMT);
        if let heartgate_policy::Event::Heartbeat(h) = &mut hb.event {
            h.error_rate = 0.8;
        }
        assert!(decide(&hb, vec![]).is_empty());
        // Held degraded by its error rate before it declared it: recovers
        // whatever the rate.
        let out = decide(&degraded_by(hb.clone(), ERROR_RATE), vec![]);
        assert_clears_condition(&out, ERROR_RATE);
        // Wedged still degrades it.
        if let heartgate_policy::Event::Heartbeat(h) = &mut hb.event {
            h.runtime_state = "wedged".into();
        }
        let out = decide(&hb, vec![]);
        assert_sets_condition(&out, WEDGED, Severity::Degraded);
    }

    #[test]
    fn offline_failed_awaiting_and_provisioning_clear_old_reasons() {
        for from in [
            Status::Offline,
            Status::Failed,
            Status::AwaitingAgent,
            Status::Provisioning,
        ] {
            let out = decide(&heartbeat("ws").with_status(from), vec![]);
            assert!(out.is_empty(), "{from:?}: {out:?}");
            let stale = heartbeat("ws").with_status(from).with_condition(
                NAME,
                ERROR_RATE,
                Severity::Degraded,
                "error_rate_high",
            );
            let out = decide(&stale, vec![]);
            assert_clears_condition(&out, ERROR_RATE);
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
        for (input, name, reason) in [
            (wedged, WEDGED, "runtime_wedged"),
            (erroring, ERROR_RATE, "error_rate_high"),
            (register_failed, REGISTER_FAILED, "register_failed"),
        ] {
            let out = decide(&input, vec![]);
            let c = assert_sets_condition(&out, name, Severity::Degraded);
            assert_eq!(c.reason, reason);
            assert_records_event(&out, "WORKSPACE_DEGRADED");
        }
        let old_failure = heartbeat("ws").with_register_failure_at(T0_MS - 5 * 60 * 1000);
        assert!(decide(&old_failure, vec![]).is_empty());
    }

    #[test]
    fn degraded_recovers_only_after_the_wedge_clears_and_errors_drop() {
        let still_wedged =
            degraded_by(heartbeat("ws"), WEDGED).beat(|hb| hb.runtime_state = "wedged".into());
        assert!(decide(&still_wedged, vec![]).is_empty());
        let still_erroring =
            degraded_by(heartbeat("ws"), ERROR_RATE).beat(|hb| hb.error_rate = 0.1);
        assert!(decide(&still_erroring, vec![]).is_empty());
        let recent_failure =
            degraded_by(heartbeat("ws"), REGISTER_FAILED).with_register_failure_at(T0_MS - 1000);
        assert!(decide(&recent_failure, vec![]).is_empty());
        let healthy = degraded_by(heartbeat("ws"), ERROR_RATE);
        let out = decide(&healthy, vec![]);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_clears_condition(&out, ERROR_RATE);
    }

    #[test]
    fn degraded_for_another_policy_s_reason_is_left_to_it() {
        let input = heartbeat("ws")
            .with_status(Status::Degraded)
            .with_condition("busy", "busy", Severity::Degraded, "busy");
        assert!(decide(&input, vec![]).is_empty());
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
        let input = heartbeat("ws").with_status(Status::Failed).with_condition(
            NAME,
            ERROR_RATE,
            Severity::Degraded,
            "error_rate_high",
        );
        let gate = vec![Action::set_condition(
            "ws",
            "rca2970-gate",
            "identity",
            Severity::Failed,
            "mcp_server_missing",
            "",
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
        let c = assert_sets_condition(&out, TOOLS_UNLOADED, Severity::Degraded);
        assert_eq!(c.reason, MANAGEMENT_MCP_UNLOADED);
        assert_eq!(c.message, UNLOADED_MESSAGE);

        let absent = platform_with_tools(None).with_marker(NAME, UNLOADED_SINCE_KEY, &since);
        let out = decide(&absent, vec![]);
        let c = assert_sets_condition(&out, TOOLS_UNLOADED, Severity::Degraded);
        assert_eq!(c.message, TOOLS_ABSENT_MESSAGE);
        assert!(
            assert_records_event(&out, "WORKSPACE_DEGRADED")
                .contains("\"loaded_mcp_tools_absent\":true")
        );
        // Still missing once degraded: stated again, so recovery is asked again.
        let again = degraded_by(platform_with_tools(None), TOOLS_UNLOADED).with_marker(
            NAME,
            UNLOADED_SINCE_KEY,
            &since,
        );
        assert_sets_condition(&decide(&again, vec![]), TOOLS_UNLOADED, Severity::Degraded);
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
        let input = degraded_by(platform_with_tools(Some(&["a2a"])), TOOLS_UNLOADED).with_marker(
            NAME,
            UNLOADED_SINCE_KEY,
            &(T0_MS - 10_000).to_string(),
        );
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
    fn register_clears_these_rules_reasons_only() {
        assert!(decide(&register("ws"), vec![]).is_empty());
        let degraded = register("ws")
            .with_status(Status::Degraded)
            .with_condition(NAME, WEDGED, Severity::Degraded, "runtime_wedged")
            .with_condition("busy", "busy", Severity::Degraded, "busy");
        let out = decide(&degraded, vec![]);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_clears_condition(&out, WEDGED);
    }
}
