//! Liveness: what silence means (contract 0.2.0).
//!
//! The host keeps the deadlines: when a workspace has sent no register or
//! heartbeat for one TTL, or is still `provisioning` past its provision
//! timeout, it evaluates the chain with a `silence` event. The host only
//! notices; this policy decides what the silence means, so the judgement is
//! a policy like any other (replayable, testable from fixtures, replaceable)
//! instead of a rule buried in a sweeper.
//!
//! It judges through conditions of its own rather than by writing the
//! status, so it composes with the rest of the chain: a late heartbeat clears
//! the silence and nothing else, and every reason another policy states
//! (the gate's failed identity, a degrade of the status rules) still holds
//! the workspace back afterwards. The host derives the status from all the
//! conditions in force.
//!
//! - `silence` of kind `heartbeat-expired`: unless the status is frozen
//!   (`removed`, `paused`, `hibernated`, `hibernating`), already `offline`
//!   or `awaiting_agent`, or `provisioning` (a workspace never heard from has
//!   the provision timeout instead), the condition [`SILENT`] is put in force
//!   with severity `offline` (`awaiting-agent` for an `external` runtime,
//!   an agent outside the platform that is simply not connected), reason
//!   [`HEARTBEAT_EXPIRED`], and `WORKSPACE_OFFLINE` is recorded with
//!   `{"silent_for_ms":N,"last_heartbeat_ms":N|null}` (and
//!   `"awaiting_agent":true` for an external runtime).
//! - `silence` of kind `provision-timeout`: a workspace still `provisioning`
//!   gets the condition [`PROVISION_TIMEOUT`] with severity `failed`, reason
//!   [`PROVISION_TIMEOUT_REASON`], and `WORKSPACE_PROVISION_FAILED` is
//!   recorded with `{"code":"PROVISION_TIMEOUT","error":"...","silent_for_ms":N}`.
//!   Any other status is left alone.
//! - A silence whose condition is already in force adds nothing at all: the
//!   event is recorded once, when the condition comes into force.
//! - `register` or `heartbeat`: the runtime spoke, so whichever of the two
//!   conditions is in force is cleared, whatever the status (a frozen
//!   status stays frozen: the host leaves it alone). Nothing else is
//!   proposed; with no condition left the host brings the workspace online
//!   (with `WORKSPACE_ONLINE` and the online reconcile).
//!
//! Actions proposed before this policy are handed on unchanged; its own are
//! appended.

use heartgate_policy::{Action, Input, Severity, SilenceEvent, SilenceKind, Status, json_string};

/// The policy's name; its conditions are kept under it.
pub const NAME: &str = "liveness";

/// The condition of a workspace not heard from for a TTL.
pub const SILENT: &str = "silent";
/// The condition of a workspace that never came up in time.
pub const PROVISION_TIMEOUT: &str = "provision-timeout";
/// Every condition of this policy.
pub const CONDITIONS: [&str; 2] = [SILENT, PROVISION_TIMEOUT];

/// Reason code of [`SILENT`].
pub const HEARTBEAT_EXPIRED: &str = "heartbeat_expired";
/// Reason code of [`PROVISION_TIMEOUT`].
pub const PROVISION_TIMEOUT_REASON: &str = "provision_timeout";

/// The runtime name of an agent that runs outside the platform.
pub const EXTERNAL_RUNTIME: &str = "external";

/// The event recorded when [`SILENT`] comes into force.
pub const OFFLINE_EVENT: &str = "WORKSPACE_OFFLINE";
/// The event recorded when [`PROVISION_TIMEOUT`] comes into force.
pub const PROVISION_FAILED_EVENT: &str = "WORKSPACE_PROVISION_FAILED";
/// The `code` of that event.
pub const PROVISION_TIMEOUT_CODE: &str = "PROVISION_TIMEOUT";

/// Evaluate the policy.
pub fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    match input.silence() {
        Some(silence) => match silence.kind {
            SilenceKind::HeartbeatExpired => heartbeat_expired(input, silence, &mut proposed),
            SilenceKind::ProvisionTimeout => provision_timeout(input, silence, &mut proposed),
        },
        // A register or heartbeat: the runtime spoke.
        None => clear_own(input, &mut proposed),
    }
    proposed
}

fn heartbeat_expired(input: &Input, silence: &SilenceEvent, out: &mut Vec<Action>) {
    let ws = &input.workspace;
    let judged_elsewhere = ws.status.is_frozen()
        || matches!(
            ws.status,
            Status::Offline | Status::AwaitingAgent | Status::Provisioning
        );
    if judged_elsewhere || input.condition(NAME, SILENT).is_some() {
        return;
    }
    let external = ws.runtime == EXTERNAL_RUNTIME;
    let severity = if external {
        Severity::AwaitingAgent
    } else {
        Severity::Offline
    };
    let message = format!("no heartbeat for {}", duration(silence.silent_for_ms));
    out.push(Action::set_condition(
        &ws.id,
        NAME,
        SILENT,
        severity,
        HEARTBEAT_EXPIRED,
        &message,
    ));
    let last = silence
        .last_heartbeat_ms
        .map_or_else(|| "null".to_string(), |ms| ms.to_string());
    let awaiting = if external {
        ",\"awaiting_agent\":true"
    } else {
        ""
    };
    out.push(Action::record_event(
        &ws.id,
        OFFLINE_EVENT,
        format!(
            "{{\"silent_for_ms\":{},\"last_heartbeat_ms\":{last}{awaiting}}}",
            silence.silent_for_ms
        ),
    ));
}

fn provision_timeout(input: &Input, silence: &SilenceEvent, out: &mut Vec<Action>) {
    let ws = &input.workspace;
    if ws.status != Status::Provisioning || input.condition(NAME, PROVISION_TIMEOUT).is_some() {
        return;
    }
    let message = format!(
        "provisioning did not finish in {}",
        duration(silence.silent_for_ms)
    );
    out.push(Action::set_condition(
        &ws.id,
        NAME,
        PROVISION_TIMEOUT,
        Severity::Failed,
        PROVISION_TIMEOUT_REASON,
        &message,
    ));
    out.push(Action::record_event(
        &ws.id,
        PROVISION_FAILED_EVENT,
        format!(
            "{{\"code\":\"{PROVISION_TIMEOUT_CODE}\",\"error\":{},\"silent_for_ms\":{}}}",
            json_string(&message),
            silence.silent_for_ms
        ),
    ));
}

/// Clear every condition of this policy that is in force.
fn clear_own(input: &Input, out: &mut Vec<Action>) {
    for name in CONDITIONS {
        if input.condition(NAME, name).is_some() {
            out.push(Action::clear_condition(&input.workspace.id, NAME, name));
        }
    }
}

/// A duration for people, truncated to its unit: `0.8s` under a second
/// (`0s` under a tenth, or for a negative one), `45s` under a minute,
/// `3m02s` under an hour, `1h05m` beyond.
pub fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    match ms {
        0..100 => "0s".to_string(),
        100..1000 => format!("0.{}s", ms / 100),
        1000..60_000 => format!("{s}s"),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use heartgate_policy::testing::{
        T0_MS, assert_clears_condition, assert_leaves_condition, assert_no_event,
        assert_records_event, assert_sets_condition, carry, heartbeat, register, silence,
    };

    const TTL_MS: i64 = 182_000;

    fn expired() -> Input {
        silence("ws", SilenceKind::HeartbeatExpired, TTL_MS)
    }

    fn timed_out() -> Input {
        silence("ws", SilenceKind::ProvisionTimeout, 12 * 60 * 1000)
    }

    fn in_force(input: Input, name: &str, severity: Severity, reason: &str) -> Input {
        input.with_condition(NAME, name, severity, reason)
    }

    #[test]
    fn a_live_workspace_gone_silent_goes_offline_with_one_event() {
        for from in [Status::Online, Status::Degraded, Status::Failed] {
            let out = decide(&expired().with_status(from), vec![]);
            assert_eq!(out.len(), 2, "{from:?}: {out:?}");
            let c = assert_sets_condition(&out, SILENT, Severity::Offline);
            assert_eq!(c.owner, NAME);
            assert_eq!(c.reason, HEARTBEAT_EXPIRED);
            assert_eq!(c.message, "no heartbeat for 3m02s");
            assert_eq!(
                assert_records_event(&out, OFFLINE_EVENT),
                format!(
                    "{{\"silent_for_ms\":{TTL_MS},\"last_heartbeat_ms\":{}}}",
                    T0_MS - TTL_MS
                )
            );
        }
    }

    #[test]
    fn a_silence_never_heard_from_reports_a_null_last_heartbeat() {
        let mut input = expired();
        if let heartgate_policy::Event::Silence(s) = &mut input.event {
            s.last_heartbeat_ms = None;
        }
        let out = decide(&input, vec![]);
        assert_eq!(
            assert_records_event(&out, OFFLINE_EVENT),
            format!("{{\"silent_for_ms\":{TTL_MS},\"last_heartbeat_ms\":null}}")
        );
    }

    #[test]
    fn an_external_agent_gone_silent_is_awaited_not_offline() {
        let out = decide(&expired().runtime(EXTERNAL_RUNTIME), vec![]);
        let c = assert_sets_condition(&out, SILENT, Severity::AwaitingAgent);
        assert_eq!(c.reason, HEARTBEAT_EXPIRED);
        assert_eq!(
            assert_records_event(&out, OFFLINE_EVENT),
            format!(
                "{{\"silent_for_ms\":{TTL_MS},\"last_heartbeat_ms\":{},\"awaiting_agent\":true}}",
                T0_MS - TTL_MS
            )
        );
        // Any other runtime name is an ordinary one.
        let hermes = decide(&expired().runtime("hermes"), vec![]);
        assert_sets_condition(&hermes, SILENT, Severity::Offline);
    }

    #[test]
    fn frozen_statuses_are_never_touched() {
        for frozen in [
            Status::Removed,
            Status::Paused,
            Status::Hibernated,
            Status::Hibernating,
        ] {
            assert!(
                decide(&expired().with_status(frozen), vec![]).is_empty(),
                "{frozen:?}"
            );
            assert!(
                decide(&timed_out().with_status(frozen), vec![]).is_empty(),
                "{frozen:?}"
            );
        }
    }

    #[test]
    fn already_offline_awaiting_or_provisioning_is_left_alone() {
        for from in [Status::Offline, Status::AwaitingAgent, Status::Provisioning] {
            let out = decide(&expired().with_status(from), vec![]);
            assert!(out.is_empty(), "{from:?}: {out:?}");
        }
    }

    #[test]
    fn silent_already_in_force_adds_nothing() {
        // Whatever the stored status says, the reason is already stated.
        let input = in_force(expired(), SILENT, Severity::Offline, HEARTBEAT_EXPIRED);
        assert!(decide(&input, vec![]).is_empty());
    }

    #[test]
    fn provisioning_past_its_timeout_fails_with_one_event() {
        let out = decide(&timed_out(), vec![]);
        assert_eq!(out.len(), 2, "{out:?}");
        let c = assert_sets_condition(&out, PROVISION_TIMEOUT, Severity::Failed);
        assert_eq!(c.reason, PROVISION_TIMEOUT_REASON);
        assert_eq!(c.message, "provisioning did not finish in 12m00s");
        assert_eq!(
            assert_records_event(&out, PROVISION_FAILED_EVENT),
            "{\"code\":\"PROVISION_TIMEOUT\",\"error\":\"provisioning did not finish in 12m00s\",\"silent_for_ms\":720000}"
        );
        assert_no_event(&out, OFFLINE_EVENT);
    }

    #[test]
    fn provision_timeout_of_any_other_status_or_in_force_adds_nothing() {
        for from in [
            Status::Online,
            Status::Offline,
            Status::Degraded,
            Status::Failed,
            Status::AwaitingAgent,
        ] {
            let out = decide(&timed_out().with_status(from), vec![]);
            assert!(out.is_empty(), "{from:?}: {out:?}");
        }
        let again = in_force(
            timed_out(),
            PROVISION_TIMEOUT,
            Severity::Failed,
            PROVISION_TIMEOUT_REASON,
        );
        assert!(decide(&again, vec![]).is_empty());
    }

    #[test]
    fn the_runtime_speaking_clears_exactly_the_conditions_in_force() {
        for spoke in [heartbeat("ws"), register("ws")] {
            assert!(decide(&spoke, vec![]).is_empty());

            let silent = in_force(spoke.clone(), SILENT, Severity::Offline, HEARTBEAT_EXPIRED)
                .with_status(Status::Offline);
            let out = decide(&silent, vec![]);
            assert_eq!(out, vec![Action::clear_condition("ws", NAME, SILENT)]);

            let timed = in_force(
                spoke.clone(),
                PROVISION_TIMEOUT,
                Severity::Failed,
                PROVISION_TIMEOUT_REASON,
            )
            .with_status(Status::Failed);
            let out = decide(&timed, vec![]);
            assert_eq!(
                out,
                vec![Action::clear_condition("ws", NAME, PROVISION_TIMEOUT)]
            );

            let both = in_force(timed, SILENT, Severity::Offline, HEARTBEAT_EXPIRED)
                .with_status(Status::Offline);
            let out = decide(&both, vec![]);
            assert_eq!(out.len(), 2, "{out:?}");
            assert_clears_condition(&out, SILENT);
            assert_clears_condition(&out, PROVISION_TIMEOUT);
        }
    }

    #[test]
    fn another_policy_s_silent_condition_is_not_ours_to_clear() {
        let input = heartbeat("ws").with_status(Status::Offline).with_condition(
            "other",
            SILENT,
            Severity::Offline,
            HEARTBEAT_EXPIRED,
        );
        assert!(decide(&input, vec![]).is_empty());
        // And does not stop ours from coming into force.
        let expired = expired().with_condition("other", SILENT, Severity::Offline, "x");
        assert_sets_condition(&decide(&expired, vec![]), SILENT, Severity::Offline);
    }

    #[test]
    fn proposed_actions_are_handed_on_unchanged() {
        let gate = vec![Action::set_condition(
            "ws",
            "rca2970-gate",
            "identity",
            Severity::Failed,
            "mcp_server_missing",
            "m",
        )];
        let out = decide(&expired(), gate.clone());
        assert_eq!(out[..1], gate[..]);
        assert_eq!(out.len(), 3, "{out:?}");
        let quiet = heartbeat("ws");
        assert_eq!(decide(&quiet, gate.clone()), gate);
        let silent = in_force(quiet, SILENT, Severity::Offline, HEARTBEAT_EXPIRED);
        let out = decide(&silent, gate.clone());
        assert_eq!(out[..1], gate[..]);
        assert_leaves_condition(&out[..1], SILENT);
        assert_clears_condition(&out, SILENT);
    }

    #[test]
    fn silence_sets_once_and_a_late_heartbeat_clears_it() {
        let first = expired();
        let out = decide(&first, vec![]);
        assert_sets_condition(&out, SILENT, Severity::Offline);
        assert_records_event(&out, OFFLINE_EVENT);

        // The deadline is noticed again: already in force, nothing new.
        let second = carry(&first, NAME, &out, T0_MS + 30_000).with_status(Status::Offline);
        assert!(second.condition(NAME, SILENT).is_some());
        let out = decide(&second, vec![]);
        assert!(out.is_empty(), "{out:?}");

        // The runtime comes back.
        let mut back = carry(&second, NAME, &out, T0_MS + 60_000);
        back.event = heartbeat("ws").event;
        let out = decide(&back, vec![]);
        assert_eq!(out, vec![Action::clear_condition("ws", NAME, SILENT)]);
        let after = carry(&back, NAME, &out, T0_MS + 90_000);
        assert!(after.conditions().is_empty());
        assert!(decide(&after, vec![]).is_empty());
    }

    #[test]
    fn durations_read_in_their_largest_units() {
        for (ms, text) in [
            (-5, "0s"),
            (0, "0s"),
            (99, "0s"),
            (800, "0.8s"),
            (999, "0.9s"),
            (1000, "1s"),
            (2_500, "2s"),
            (45_000, "45s"),
            (59_999, "59s"),
            (60_000, "1m00s"),
            (182_000, "3m02s"),
            (720_000, "12m00s"),
            (3_599_999, "59m59s"),
            (3_600_000, "1h00m"),
            (3_900_000, "1h05m"),
            (30 * 3_600_000 + 59_000, "30h00m"),
        ] {
            assert_eq!(duration(ms), text, "{ms}");
        }
    }
}
