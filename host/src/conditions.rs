//! Conditions (contract 0.2.0) and the status they decide.
//!
//! A policy states why a workspace should not be online with conditions of
//! its own; the host derives the status from all of them once the chain has
//! run ([`derive`]), so independent policies compose: a workspace is online
//! only when no policy holds it back, and two policies cannot flip it back
//! and forth, because neither writes the status itself.
//!
//! The rule, for a chain with at least one 0.2.0 slot:
//! - an explicit `set-status` in the verdict (a 0.1.0 policy, or a trusted
//!   0.2.0 one granted `set_status`) wins: nothing is derived;
//! - `removed`, `paused`, `hibernated` and `hibernating` are left alone;
//! - with conditions in force after the verdict, the status is that of the
//!   most severe (`degraded` < `failed` < `awaiting_agent` < `offline`),
//!   with its reason, and its message as the last error for `degraded` and
//!   `failed` (restated while the status stays, as the original registry
//!   rewrote it on every failing heartbeat);
//! - with none, a register or heartbeat (the runtime spoke) brings the
//!   workspace `online`: the host records `WORKSPACE_ONLINE` with
//!   `recovered_from` and queues the online reconcile (after a heartbeat, or
//!   a register from `provisioning`), the spec's promotion rule; a silence
//!   with none changes nothing.

use crate::model::{Action, Condition, Effect, Event, Input, ReconcileTrigger, Severity, Status};

/// At most this many bytes in a condition's name and reason.
pub const MAX_NAME: usize = 64;
/// At most this many bytes in a condition's message.
pub const MAX_MESSAGE: usize = 1024;

/// Whether `name` can name a condition: 1-64 lowercase letters, digits or
/// dashes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The conditions in force once `actions` are applied to `before` (keyed by
/// owner and name: a chain runs each policy name once).
pub fn after<'a>(
    before: &'a [Condition],
    actions: &'a [Action],
) -> Vec<(&'a str, Severity, &'a str, &'a str)> {
    // (owner, name) -> (severity, reason, message)
    let mut now: Vec<(&str, &str, Severity, &str, &str)> = before
        .iter()
        .map(|c| {
            (
                c.owner.as_str(),
                c.name.as_str(),
                c.severity,
                c.reason.as_str(),
                c.message.as_str(),
            )
        })
        .collect();
    for a in actions {
        match &a.effect {
            Effect::SetCondition {
                owner,
                name,
                severity,
                reason,
                message,
            } => {
                let stated = (
                    owner.as_str(),
                    name.as_str(),
                    *severity,
                    reason.as_str(),
                    message.as_str(),
                );
                match now.iter_mut().find(|c| c.0 == owner && c.1 == name) {
                    Some(c) => *c = stated,
                    None => now.push(stated),
                }
            }
            Effect::ClearCondition { owner, name } => {
                now.retain(|c| !(c.0 == owner && c.1 == name));
            }
            _ => {}
        }
    }
    now.into_iter()
        .map(|(_, name, severity, reason, message)| (name, severity, reason, message))
        .collect()
}

/// The actions the host adds to a 0.2.0 chain's verdict `actions` on
/// `input`: the derived status change and, on the way online, its event
/// and reconcile. Empty when the status stays.
pub fn derive(input: &Input, actions: &[Action]) -> Vec<Action> {
    let from = input.workspace.status;
    if from.is_frozen()
        || actions
            .iter()
            .any(|a| matches!(a.effect, Effect::SetStatus { .. }))
    {
        return Vec::new();
    }
    let in_force = after(&input.workspace.conditions, actions);
    // The most severe; among equals the first with a message, else the
    // first.
    let worst = in_force
        .iter()
        .fold(None::<&(&str, Severity, &str, &str)>, |w, c| match w {
            Some(w) if w.1 > c.1 || (w.1 == c.1 && (!w.3.is_empty() || c.3.is_empty())) => Some(w),
            _ => Some(c),
        });
    let id = &input.workspace.id;
    let on = |effect: Effect| Action {
        workspace_id: id.clone(),
        effect,
    };
    match worst {
        Some(&(_, severity, reason, message)) => {
            let to = severity.status();
            let message = (matches!(severity, Severity::Degraded | Severity::Failed)
                && !message.is_empty())
            .then(|| message.to_string());
            // Staying put, a condition's message is still the last error
            // (a heartbeat's own `sample_error` would replace it).
            if to == from && message.is_none() {
                return Vec::new();
            }
            vec![on(Effect::SetStatus {
                to,
                expected: from,
                reason: reason.to_string(),
                message,
            })]
        }
        None if input.event.is_from_runtime() && from != Status::Online => {
            let reason = match input.event {
                Event::Register(_) => "registered",
                _ => "heartbeat",
            };
            let mut out = vec![
                on(Effect::SetStatus {
                    to: Status::Online,
                    expected: from,
                    reason: reason.to_string(),
                    message: None,
                }),
                on(Effect::RecordEvent {
                    event_type: "WORKSPACE_ONLINE".to_string(),
                    payload_json: format!("{{\"recovered_from\":\"{}\"}}", from.as_str()),
                }),
            ];
            let reconcile = match input.event {
                Event::Heartbeat(_) => true,
                _ => from == Status::Provisioning,
            };
            if reconcile {
                out.push(on(Effect::RequestReconcile {
                    trigger: ReconcileTrigger::Online,
                }));
            }
            out
        }
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HeartbeatEvent, Workspace};

    fn input(status: Status, conditions: Vec<Condition>) -> Input {
        Input {
            event: Event::Heartbeat(HeartbeatEvent::default()),
            workspace: Workspace {
                id: "ws".into(),
                status,
                model_configured: true,
                conditions,
                ..Workspace::default()
            },
            markers: Vec::new(),
            now_ms: 0,
        }
    }

    fn condition(owner: &str, severity: Severity) -> Condition {
        Condition {
            slot: None,
            owner: owner.into(),
            name: "c".into(),
            severity,
            reason: format!("{owner}_reason"),
            message: String::new(),
            since_ms: 0,
        }
    }

    fn set(owner: &str, severity: Severity) -> Action {
        Action {
            workspace_id: "ws".into(),
            effect: Effect::SetCondition {
                owner: owner.into(),
                name: "c".into(),
                severity,
                reason: format!("{owner}_reason"),
                message: "why".into(),
            },
        }
    }

    fn clear(owner: &str) -> Action {
        Action {
            workspace_id: "ws".into(),
            effect: Effect::ClearCondition {
                owner: owner.into(),
                name: "c".into(),
            },
        }
    }

    fn to(actions: &[Action]) -> Option<Status> {
        actions.iter().find_map(|a| match a.effect {
            Effect::SetStatus { to, .. } => Some(to),
            _ => None,
        })
    }

    #[test]
    fn the_most_severe_condition_decides() {
        let i = input(Status::Online, vec![condition("a", Severity::Degraded)]);
        assert_eq!(to(&derive(&i, &[])), Some(Status::Degraded));
        let out = derive(&i, &[set("b", Severity::Failed)]);
        assert_eq!(to(&out), Some(Status::Failed));
        assert!(
            matches!(&out[0].effect, Effect::SetStatus { reason, message, .. }
            if reason == "b_reason" && message.as_deref() == Some("why"))
        );
        let i = input(Status::Degraded, vec![condition("a", Severity::Degraded)]);
        assert!(derive(&i, &[]).is_empty());
        // Staying degraded, a message is kept as the last error.
        let out = derive(&i, &[set("b", Severity::Degraded)]);
        assert!(matches!(
            &out[..],
            [Action {
                effect: Effect::SetStatus {
                    to: Status::Degraded,
                    expected: Status::Degraded,
                    message: Some(_),
                    ..
                },
                ..
            }]
        ));
    }

    #[test]
    fn online_only_when_no_policy_holds_it_back() {
        let both = vec![
            condition("a", Severity::Degraded),
            condition("b", Severity::Degraded),
        ];
        let i = input(Status::Degraded, both);
        assert!(derive(&i, &[clear("a")]).is_empty());
        let out = derive(&i, &[clear("a"), clear("b")]);
        assert_eq!(to(&out), Some(Status::Online));
        assert_eq!(out.len(), 3, "status, WORKSPACE_ONLINE, reconcile: {out:?}");
    }

    #[test]
    fn explicit_status_frozen_and_silence_derive_nothing() {
        let explicit = Action {
            workspace_id: "ws".into(),
            effect: Effect::SetStatus {
                to: Status::Degraded,
                expected: Status::Online,
                reason: "x".into(),
                message: None,
            },
        };
        let i = input(Status::Online, vec![condition("a", Severity::Failed)]);
        assert!(derive(&i, &[explicit]).is_empty());
        let i = input(Status::Paused, vec![condition("a", Severity::Failed)]);
        assert!(derive(&i, &[]).is_empty());
        let mut i = input(Status::Offline, vec![]);
        i.event = Event::Silence(crate::model::SilenceEvent {
            kind: crate::model::SilenceKind::HeartbeatExpired,
            last_heartbeat_ms: None,
            silent_for_ms: 1,
        });
        assert!(derive(&i, &[]).is_empty());
    }
}
