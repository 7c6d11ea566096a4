//! The host's own copy of the policy contract's data (`wit/policy.wit`).
//!
//! These types are what the HTTP layer, the executor, the store and the
//! decision log speak; only `engine` converts them to and from the
//! wasmtime-generated bindings. Their JSON form (serde) is the format of
//! fixture files and of the decision log.

use serde::{Deserialize, Serialize};

/// The status of a workspace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Provisioning,
    Online,
    Offline,
    Degraded,
    Failed,
    Removed,
    Paused,
    Hibernated,
    Hibernating,
    AwaitingAgent,
}

impl Status {
    /// Every status, in declaration order.
    pub const ALL: [Status; 10] = [
        Status::Provisioning,
        Status::Online,
        Status::Offline,
        Status::Degraded,
        Status::Failed,
        Status::Removed,
        Status::Paused,
        Status::Hibernated,
        Status::Hibernating,
        Status::AwaitingAgent,
    ];

    /// The status as the wire and the database spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Provisioning => "provisioning",
            Status::Online => "online",
            Status::Offline => "offline",
            Status::Degraded => "degraded",
            Status::Failed => "failed",
            Status::Removed => "removed",
            Status::Paused => "paused",
            Status::Hibernated => "hibernated",
            Status::Hibernating => "hibernating",
            Status::AwaitingAgent => "awaiting_agent",
        }
    }

    /// Parse the database spelling.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Statuses that a register or heartbeat never changes.
    pub fn is_frozen(self) -> bool {
        matches!(
            self,
            Status::Removed | Status::Paused | Status::Hibernated | Status::Hibernating
        )
    }
}

/// Whether `id` can be a workspace id: 1-128 of `A-Z a-z 0-9 - _ .`, not
/// starting with `.`. Ids become directory names and restart-hook arguments,
/// so nothing else is ever stored.
pub fn valid_workspace_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        // An id becomes a restart hook's argument: never an option.
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `name` can name a runtime: 1-64 of `A-Z a-z 0-9 - _ .` (a
/// workspace's runtime may also be empty: unnamed).
pub fn valid_runtime_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The kind of a workspace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceKind {
    #[default]
    Workspace,
    Platform,
}

impl WorkspaceKind {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceKind::Workspace => "workspace",
            WorkspaceKind::Platform => "platform",
        }
    }

    /// Parse the wire and database spelling.
    pub fn parse(s: &str) -> Option<WorkspaceKind> {
        match s {
            "workspace" => Some(WorkspaceKind::Workspace),
            "platform" => Some(WorkspaceKind::Platform),
            _ => None,
        }
    }
}

/// Why a reconcile is requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReconcileTrigger {
    #[serde(rename = "online")]
    Online,
    #[serde(rename = "mcp-recovery")]
    McpRecovery,
}

impl ReconcileTrigger {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ReconcileTrigger::Online => "online",
            ReconcileTrigger::McpRecovery => "mcp-recovery",
        }
    }
}

/// A register request, as seen by policies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterEvent {
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub delivery_mode: String,
    #[serde(default)]
    pub requested_kind: Option<WorkspaceKind>,
    #[serde(default)]
    pub mcp_server_present: Option<bool>,
    #[serde(default)]
    pub loaded_mcp_tools: Option<Vec<String>>,
}

/// A heartbeat request, as seen by policies. The default is an empty healthy
/// beat, which is also what a body with no optional field means.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatEvent {
    #[serde(default)]
    pub error_rate: f64,
    #[serde(default)]
    pub sample_error: String,
    #[serde(default)]
    pub active_tasks: i64,
    #[serde(default)]
    pub current_task: Option<String>,
    #[serde(default)]
    pub uptime_seconds: i64,
    #[serde(default)]
    pub runtime_state: String,
    #[serde(default)]
    pub mcp_server_present: Option<bool>,
    #[serde(default)]
    pub loaded_mcp_tools: Option<Vec<String>>,
}

/// Why the host noticed silence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SilenceKind {
    HeartbeatExpired,
    ProvisionTimeout,
}

impl SilenceKind {
    /// The metrics' and decision log's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SilenceKind::HeartbeatExpired => "heartbeat_expired",
            SilenceKind::ProvisionTimeout => "provision_timeout",
        }
    }
}

/// A workspace silent past a deadline, as seen by policies (contract 0.2.0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceEvent {
    pub kind: SilenceKind,
    #[serde(default)]
    pub last_heartbeat_ms: Option<i64>,
    pub silent_for_ms: i64,
}

/// The request (or observation) being evaluated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Register(RegisterEvent),
    Heartbeat(HeartbeatEvent),
    Silence(SilenceEvent),
}

impl Event {
    /// `register`, `heartbeat` or `silence`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Register(_) => "register",
            Event::Heartbeat(_) => "heartbeat",
            Event::Silence(_) => "silence",
        }
    }

    /// Whether the runtime itself spoke (a register or heartbeat): the
    /// evidence that brings a workspace with no condition in force online.
    pub fn is_from_runtime(&self) -> bool {
        !matches!(self, Event::Silence(_))
    }
}

/// How far a condition holds a workspace back from `online`; the derived
/// status is that of the most severe condition in force (declaration order,
/// least severe first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Degraded,
    Failed,
    AwaitingAgent,
    Offline,
}

impl Severity {
    /// Every severity, least severe first.
    pub const ALL: [Severity; 4] = [
        Severity::Degraded,
        Severity::Failed,
        Severity::AwaitingAgent,
        Severity::Offline,
    ];

    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        self.status().as_str()
    }

    /// Parse the database spelling.
    pub fn parse(s: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The status a workspace held back by this severity has.
    pub fn status(self) -> Status {
        match self {
            Severity::Degraded => Status::Degraded,
            Severity::Failed => Status::Failed,
            Severity::AwaitingAgent => Status::AwaitingAgent,
            Severity::Offline => Status::Offline,
        }
    }
}

/// A reason, stated by one policy, why a workspace should not be online.
///
/// Like a marker it belongs to (slot, owner); policies see every condition
/// in force (read-only) but set and clear only their own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The slot it belongs to; always set on conditions the service stores,
    /// optional in an author's fixture (see [`Marker::slot`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    pub owner: String,
    pub name: String,
    pub severity: Severity,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub since_ms: i64,
}

impl Condition {
    /// Whether the policy `owner` running in slot `slot` owns this condition.
    pub fn belongs_to(&self, slot: &str, owner: &str) -> bool {
        self.owner == owner && self.slot.as_deref().is_none_or(|s| s == slot)
    }
}

/// The stored workspace, as seen by policies. The default is a
/// provisioning ordinary workspace with an empty id and nothing else known.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workspace {
    pub id: String,
    pub kind: WorkspaceKind,
    pub status: Status,
    pub model_configured: bool,
    #[serde(default)]
    pub declared_plugins: Vec<String>,
    #[serde(default)]
    pub last_register_failure_ms: Option<i64>,
    /// The runtime's name (`workspace add --runtime`), empty if unnamed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runtime: String,
    /// The capabilities the runtime declares, sorted: for a register or
    /// heartbeat those of the request (absent clears them), else the stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// The idle timeout the runtime declares, in seconds (like
    /// `capabilities`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<i64>,
    /// The last register or heartbeat before this evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_ms: Option<i64>,
    /// When the workspace entered its status, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_since_ms: Option<i64>,
    /// Every condition in force, sorted by owner and name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// What a runtime says about itself in `runtime_metadata` (register and
/// heartbeat): the capabilities it sets to true, sorted, and its idle
/// timeout. A request without it declares none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeMetadata {
    pub capabilities: Vec<String>,
    pub idle_timeout_seconds: Option<i64>,
}

/// A policy's durable key/value for one workspace.
///
/// It belongs to the pair (slot, owner): the slot of the chain, which the
/// host assigns, and the name the slot's module reports. A chain never has
/// two slots whose modules report one name, so within a chain the owner
/// names the slot. The guest sees only `owner`, `key` and `value`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    /// The slot it belongs to. Always set on markers the service stores;
    /// an author's fixture may leave it out, and then the marker is the one
    /// of whichever slot runs the policy named `owner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    pub owner: String,
    pub key: String,
    pub value: String,
}

impl Marker {
    /// Whether the policy `owner` running in slot `slot` sees this marker.
    pub fn belongs_to(&self, slot: &str, owner: &str) -> bool {
        self.owner == owner && self.slot.as_deref().is_none_or(|s| s == slot)
    }
}

/// Everything a policy may look at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub event: Event,
    pub workspace: Workspace,
    #[serde(default)]
    pub markers: Vec<Marker>,
    pub now_ms: i64,
}

/// One thing a policy wants done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Effect {
    SetStatus {
        to: Status,
        expected: Status,
        reason: String,
        #[serde(default)]
        message: Option<String>,
    },
    Reject {
        http_status: u16,
        message: String,
    },
    RecordEvent {
        event_type: String,
        payload_json: String,
    },
    RequestReconcile {
        trigger: ReconcileTrigger,
    },
    SetMarker {
        owner: String,
        key: String,
        value: String,
    },
    ClearMarker {
        owner: String,
        key: String,
    },
    SetCondition {
        owner: String,
        name: String,
        severity: Severity,
        reason: String,
        #[serde(default)]
        message: String,
    },
    ClearCondition {
        owner: String,
        name: String,
    },
}

/// An effect on one workspace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Action {
    pub workspace_id: String,
    #[serde(flatten)]
    pub effect: Effect,
}

impl Action {
    /// The owner of the marker or condition this action writes, if it
    /// writes one.
    pub fn marker_owner(&self) -> Option<&str> {
        match &self.effect {
            Effect::SetMarker { owner, .. }
            | Effect::ClearMarker { owner, .. }
            | Effect::SetCondition { owner, .. }
            | Effect::ClearCondition { owner, .. } => Some(owner),
            _ => None,
        }
    }

    /// Whether contract 0.1.0 can express this action.
    pub fn in_contract_0_1(&self) -> bool {
        !matches!(
            self.effect,
            Effect::SetCondition { .. } | Effect::ClearCondition { .. }
        )
    }
}

/// A policy's name and version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    pub version: String,
}

/// An error a policy returned instead of a verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyError {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_spellings_round_trip() {
        for st in Status::ALL {
            assert_eq!(Status::parse(st.as_str()), Some(st));
            let json = serde_json::to_string(&st).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        assert_eq!(Status::parse("bogus"), None);
    }

    #[test]
    fn workspace_ids_are_safe_as_paths_and_arguments() {
        for ok in ["ws", "3f2b6c1e-0000-4000-8000-000000000001", "a.b_c-D"] {
            assert!(valid_workspace_id(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "a;rm -rf /",
            "$(x)",
            "-x",
            "--help",
            &"a".repeat(129),
        ] {
            assert!(!valid_workspace_id(bad), "{bad}");
        }
    }

    #[test]
    fn actions_have_a_flat_tagged_json_form() {
        let action = Action {
            workspace_id: "ws".into(),
            effect: Effect::RequestReconcile {
                trigger: ReconcileTrigger::McpRecovery,
            },
        };
        let json = serde_json::to_value(&action).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!({"workspace_id":"ws","kind":"request_reconcile","trigger":"mcp-recovery"})
        );
        let back: Action = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, action);
    }
}
