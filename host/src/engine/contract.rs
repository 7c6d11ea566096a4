//! The two versions of the policy contract a component may implement, and
//! the conversions between the host's model and each version's bindings.
//!
//! `heartgate:policy@0.2.0` (`wit/policy.wit`) is what the SDK builds;
//! `0.1.0` (`wit/v0.1.0/policy.wit`) is still accepted. A 0.1.0 policy is
//! never shown what its contract cannot express: condition actions proposed
//! before it are kept aside and passed through, and it is not evaluated for
//! a `silence` event at all (its slot passes the proposed actions on).

use crate::model;

pub(super) mod v2 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "policy",
        exports: { default: async },
    });
}

pub(super) mod v1 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "policy",
        exports: { default: async },
    });
}

/// A version of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Contract {
    #[serde(rename = "0.1.0")]
    V0_1,
    #[serde(rename = "0.2.0")]
    V0_2,
}

impl Contract {
    /// The contract's types interface: the only import a policy may have.
    pub fn types_interface(self) -> &'static str {
        match self {
            Contract::V0_1 => "heartgate:policy/types@0.1.0",
            Contract::V0_2 => "heartgate:policy/types@0.2.0",
        }
    }

    /// The version, as WIT spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Contract::V0_1 => "0.1.0",
            Contract::V0_2 => "0.2.0",
        }
    }

    /// Every version the host accepts, newest first.
    pub const ALL: [Contract; 2] = [Contract::V0_2, Contract::V0_1];
}

/// The conversions both versions share, written once: each module below
/// invokes this with its own `wit` in scope.
macro_rules! shared_conversions {
    () => {
        pub(in crate::engine) fn to_wit_status(s: model::Status) -> wit::Status {
            match s {
                model::Status::Provisioning => wit::Status::Provisioning,
                model::Status::Online => wit::Status::Online,
                model::Status::Offline => wit::Status::Offline,
                model::Status::Degraded => wit::Status::Degraded,
                model::Status::Failed => wit::Status::Failed,
                model::Status::Removed => wit::Status::Removed,
                model::Status::Paused => wit::Status::Paused,
                model::Status::Hibernated => wit::Status::Hibernated,
                model::Status::Hibernating => wit::Status::Hibernating,
                model::Status::AwaitingAgent => wit::Status::AwaitingAgent,
            }
        }

        pub(in crate::engine) fn from_wit_status(s: wit::Status) -> model::Status {
            match s {
                wit::Status::Provisioning => model::Status::Provisioning,
                wit::Status::Online => model::Status::Online,
                wit::Status::Offline => model::Status::Offline,
                wit::Status::Degraded => model::Status::Degraded,
                wit::Status::Failed => model::Status::Failed,
                wit::Status::Removed => model::Status::Removed,
                wit::Status::Paused => model::Status::Paused,
                wit::Status::Hibernated => model::Status::Hibernated,
                wit::Status::Hibernating => model::Status::Hibernating,
                wit::Status::AwaitingAgent => model::Status::AwaitingAgent,
            }
        }

        fn to_wit_kind(k: model::WorkspaceKind) -> wit::WorkspaceKind {
            match k {
                model::WorkspaceKind::Workspace => wit::WorkspaceKind::Workspace,
                model::WorkspaceKind::Platform => wit::WorkspaceKind::Platform,
            }
        }

        fn to_wit_trigger(t: model::ReconcileTrigger) -> wit::ReconcileTrigger {
            match t {
                model::ReconcileTrigger::Online => wit::ReconcileTrigger::Online,
                model::ReconcileTrigger::McpRecovery => wit::ReconcileTrigger::McpRecovery,
            }
        }

        fn from_wit_trigger(t: wit::ReconcileTrigger) -> model::ReconcileTrigger {
            match t {
                wit::ReconcileTrigger::Online => model::ReconcileTrigger::Online,
                wit::ReconcileTrigger::McpRecovery => model::ReconcileTrigger::McpRecovery,
            }
        }

        fn to_wit_register(r: &model::RegisterEvent) -> wit::RegisterEvent {
            wit::RegisterEvent {
                url: r.url.clone(),
                delivery_mode: r.delivery_mode.clone(),
                requested_kind: r.requested_kind.map(to_wit_kind),
                mcp_server_present: r.mcp_server_present,
                loaded_mcp_tools: r.loaded_mcp_tools.clone(),
            }
        }

        fn to_wit_heartbeat(h: &model::HeartbeatEvent) -> wit::HeartbeatEvent {
            wit::HeartbeatEvent {
                error_rate: h.error_rate,
                sample_error: h.sample_error.clone(),
                active_tasks: h.active_tasks,
                current_task: h.current_task.clone(),
                uptime_seconds: h.uptime_seconds,
                runtime_state: h.runtime_state.clone(),
                mcp_server_present: h.mcp_server_present,
                loaded_mcp_tools: h.loaded_mcp_tools.clone(),
            }
        }

        pub(in crate::engine) fn to_wit_marker(m: &model::Marker) -> wit::Marker {
            wit::Marker {
                owner: m.owner.clone(),
                key: m.key.clone(),
                value: m.value.clone(),
            }
        }

        /// The effects both versions have; `None` for one this version
        /// cannot express.
        fn to_wit_shared_effect(effect: &model::Effect) -> Option<wit::Effect> {
            use model::Effect as E;
            Some(match effect {
                E::SetStatus {
                    to,
                    expected,
                    reason,
                    message,
                } => wit::Effect::SetStatus(wit::StatusChange {
                    to: to_wit_status(*to),
                    expected: to_wit_status(*expected),
                    reason: reason.clone(),
                    message: message.clone(),
                }),
                E::Reject {
                    http_status,
                    message,
                } => wit::Effect::Reject(wit::Rejection {
                    http_status: *http_status,
                    message: message.clone(),
                }),
                E::RecordEvent {
                    event_type,
                    payload_json,
                } => wit::Effect::RecordEvent(wit::EventRecord {
                    event_type: event_type.clone(),
                    payload_json: payload_json.clone(),
                }),
                E::RequestReconcile { trigger } => {
                    wit::Effect::RequestReconcile(to_wit_trigger(*trigger))
                }
                E::SetMarker { owner, key, value } => wit::Effect::SetMarker(wit::Marker {
                    owner: owner.clone(),
                    key: key.clone(),
                    value: value.clone(),
                }),
                E::ClearMarker { owner, key } => wit::Effect::ClearMarker(wit::MarkerKey {
                    owner: owner.clone(),
                    key: key.clone(),
                }),
                E::SetCondition { .. } | E::ClearCondition { .. } => return None,
            })
        }

        /// The effects both versions have, in the host's model; the effect
        /// itself back for one only this version has.
        #[allow(unreachable_patterns, reason = "0.1.0 has no other effects")]
        fn from_wit_shared_effect(effect: wit::Effect) -> Result<model::Effect, wit::Effect> {
            use model::Effect as E;
            Ok(match effect {
                wit::Effect::SetStatus(c) => E::SetStatus {
                    to: from_wit_status(c.to),
                    expected: from_wit_status(c.expected),
                    reason: c.reason,
                    message: c.message,
                },
                wit::Effect::Reject(r) => E::Reject {
                    http_status: r.http_status,
                    message: r.message,
                },
                wit::Effect::RecordEvent(e) => E::RecordEvent {
                    event_type: e.event_type,
                    payload_json: e.payload_json,
                },
                wit::Effect::RequestReconcile(t) => E::RequestReconcile {
                    trigger: from_wit_trigger(t),
                },
                wit::Effect::SetMarker(m) => E::SetMarker {
                    owner: m.owner,
                    key: m.key,
                    value: m.value,
                },
                wit::Effect::ClearMarker(k) => E::ClearMarker {
                    owner: k.owner,
                    key: k.key,
                },
                other => return Err(other),
            })
        }
    };
}

/// Contract 0.1.0.
pub(super) mod to_v1 {
    use super::model;
    use super::v1::heartgate::policy::types as wit;

    shared_conversions!();

    /// `input` for a 0.1.0 guest, without markers; `None` for an event
    /// 0.1.0 cannot express (silence).
    pub(in crate::engine) fn input(input: &model::Input) -> Option<wit::Input> {
        let event = match &input.event {
            model::Event::Register(r) => wit::Event::Register(to_wit_register(r)),
            model::Event::Heartbeat(h) => wit::Event::Heartbeat(to_wit_heartbeat(h)),
            model::Event::Silence(_) => return None,
        };
        let ws = &input.workspace;
        Some(wit::Input {
            event,
            workspace: wit::Workspace {
                id: ws.id.clone(),
                kind: to_wit_kind(ws.kind),
                status: to_wit_status(ws.status),
                model_configured: ws.model_configured,
                declared_plugins: ws.declared_plugins.clone(),
                last_register_failure_ms: ws.last_register_failure_ms,
            },
            markers: Vec::new(),
            now_ms: input.now_ms,
        })
    }

    /// `action` for a 0.1.0 guest, if 0.1.0 can express it.
    pub(in crate::engine) fn action(action: &model::Action) -> Option<wit::Action> {
        Some(wit::Action {
            workspace_id: action.workspace_id.clone(),
            effect: to_wit_shared_effect(&action.effect)?,
        })
    }

    /// What a 0.1.0 guest returned, in the host's model.
    pub(in crate::engine) fn from_action(action: wit::Action) -> model::Action {
        let effect = match from_wit_shared_effect(action.effect) {
            Ok(effect) => effect,
            Err(_) => unreachable!("0.1.0 has only the shared effects"),
        };
        model::Action {
            workspace_id: action.workspace_id,
            effect,
        }
    }
}

/// Contract 0.2.0.
pub(super) mod to_v2 {
    use super::model;
    use super::v2::heartgate::policy::types as wit;

    shared_conversions!();

    fn to_wit_severity(s: model::Severity) -> wit::Severity {
        match s {
            model::Severity::Degraded => wit::Severity::Degraded,
            model::Severity::Failed => wit::Severity::Failed,
            model::Severity::AwaitingAgent => wit::Severity::AwaitingAgent,
            model::Severity::Offline => wit::Severity::Offline,
        }
    }

    fn from_wit_severity(s: wit::Severity) -> model::Severity {
        match s {
            wit::Severity::Degraded => model::Severity::Degraded,
            wit::Severity::Failed => model::Severity::Failed,
            wit::Severity::AwaitingAgent => model::Severity::AwaitingAgent,
            wit::Severity::Offline => model::Severity::Offline,
        }
    }

    /// `input` for a 0.2.0 guest, without markers.
    pub(in crate::engine) fn input(input: &model::Input) -> wit::Input {
        let event = match &input.event {
            model::Event::Register(r) => wit::Event::Register(to_wit_register(r)),
            model::Event::Heartbeat(h) => wit::Event::Heartbeat(to_wit_heartbeat(h)),
            model::Event::Silence(s) => wit::Event::Silence(wit::SilenceEvent {
                kind: match s.kind {
                    model::SilenceKind::HeartbeatExpired => wit::SilenceKind::HeartbeatExpired,
                    model::SilenceKind::ProvisionTimeout => wit::SilenceKind::ProvisionTimeout,
                },
                last_heartbeat_ms: s.last_heartbeat_ms,
                silent_for_ms: s.silent_for_ms,
            }),
        };
        let ws = &input.workspace;
        wit::Input {
            event,
            workspace: wit::Workspace {
                id: ws.id.clone(),
                kind: to_wit_kind(ws.kind),
                status: to_wit_status(ws.status),
                model_configured: ws.model_configured,
                declared_plugins: ws.declared_plugins.clone(),
                last_register_failure_ms: ws.last_register_failure_ms,
                runtime: ws.runtime.clone(),
                capabilities: ws.capabilities.clone(),
                idle_timeout_seconds: ws.idle_timeout_seconds,
                last_heartbeat_ms: ws.last_heartbeat_ms,
                status_since_ms: ws.status_since_ms,
                conditions: ws
                    .conditions
                    .iter()
                    .map(|c| wit::Condition {
                        owner: c.owner.clone(),
                        name: c.name.clone(),
                        severity: to_wit_severity(c.severity),
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                        since_ms: c.since_ms,
                    })
                    .collect(),
            },
            markers: Vec::new(),
            now_ms: input.now_ms,
        }
    }

    /// `action` for a 0.2.0 guest.
    pub(in crate::engine) fn action(action: &model::Action) -> wit::Action {
        use model::Effect as E;
        let effect = match &action.effect {
            E::SetCondition {
                owner,
                name,
                severity,
                reason,
                message,
            } => wit::Effect::SetCondition(wit::ConditionChange {
                owner: owner.clone(),
                name: name.clone(),
                severity: to_wit_severity(*severity),
                reason: reason.clone(),
                message: message.clone(),
            }),
            E::ClearCondition { owner, name } => wit::Effect::ClearCondition(wit::ConditionKey {
                owner: owner.clone(),
                name: name.clone(),
            }),
            other => match to_wit_shared_effect(other) {
                Some(effect) => effect,
                None => unreachable!("0.2.0 expresses every effect"),
            },
        };
        wit::Action {
            workspace_id: action.workspace_id.clone(),
            effect,
        }
    }

    /// What a 0.2.0 guest returned, in the host's model.
    pub(in crate::engine) fn from_action(action: wit::Action) -> model::Action {
        use model::Effect as E;
        let effect = match from_wit_shared_effect(action.effect) {
            Ok(effect) => effect,
            Err(wit::Effect::SetCondition(c)) => E::SetCondition {
                owner: c.owner,
                name: c.name,
                severity: from_wit_severity(c.severity),
                reason: c.reason,
                message: c.message,
            },
            Err(wit::Effect::ClearCondition(k)) => E::ClearCondition {
                owner: k.owner,
                name: k.name,
            },
            Err(_) => unreachable!("every shared effect was converted"),
        };
        model::Action {
            workspace_id: action.workspace_id,
            effect,
        }
    }
}
