//! Builders and assertions for native unit tests of a policy: start from
//! [`heartbeat`] or [`register`], adjust with the `with_*` methods, pass the
//! result to the policy's decision function, and check its actions with the
//! `assert_*` functions.

use crate::{
    Action, Event, HeartbeatEvent, Input, Marker, ReconcileTrigger, RegisterEvent, Status,
    StatusChange, Workspace, WorkspaceKind,
};

/// The clock every builder starts at: 2026-06-24T12:00:00Z in milliseconds.
pub const T0_MS: i64 = 1_782_302_400_000;

fn workspace(id: &str) -> Workspace {
    Workspace {
        id: id.to_string(),
        kind: WorkspaceKind::Workspace,
        status: Status::Online,
        model_configured: true,
        declared_plugins: Vec::new(),
        last_register_failure_ms: None,
    }
}

/// A healthy heartbeat for an online ordinary workspace `id` at [`T0_MS`].
pub fn heartbeat(id: &str) -> Input {
    Input {
        event: Event::Heartbeat(HeartbeatEvent {
            error_rate: 0.0,
            sample_error: String::new(),
            active_tasks: 0,
            current_task: None,
            uptime_seconds: 60,
            runtime_state: String::new(),
            mcp_server_present: None,
            loaded_mcp_tools: None,
        }),
        workspace: workspace(id),
        markers: Vec::new(),
        now_ms: T0_MS,
    }
}

/// A register of an ordinary workspace `id` (stored as `provisioning`) at [`T0_MS`].
pub fn register(id: &str) -> Input {
    let mut ws = workspace(id);
    ws.status = Status::Provisioning;
    Input {
        event: Event::Register(RegisterEvent {
            url: "https://example.com/agent".to_string(),
            delivery_mode: "push".to_string(),
            requested_kind: None,
            mcp_server_present: None,
            loaded_mcp_tools: None,
        }),
        workspace: ws,
        markers: Vec::new(),
        now_ms: T0_MS,
    }
}

impl Input {
    /// The workspace is stored with `status`.
    pub fn with_status(mut self, status: Status) -> Self {
        self.workspace.status = status;
        self
    }

    /// The workspace is a platform workspace.
    pub fn platform(mut self) -> Self {
        self.workspace.kind = WorkspaceKind::Platform;
        self
    }

    /// Whether a `MODEL` secret is configured.
    pub fn with_model(mut self, configured: bool) -> Self {
        self.workspace.model_configured = configured;
        self
    }

    /// Declare a plugin by name.
    pub fn declaring(mut self, plugin: &str) -> Self {
        self.workspace.declared_plugins.push(plugin.to_string());
        self.workspace.declared_plugins.sort();
        self
    }

    /// A register failed at `ms`.
    pub fn with_register_failure_at(mut self, ms: i64) -> Self {
        self.workspace.last_register_failure_ms = Some(ms);
        self
    }

    /// The host's clock reads `ms`.
    pub fn at(mut self, ms: i64) -> Self {
        self.now_ms = ms;
        self
    }

    /// The policy `owner` has marker `key` set to `value`.
    pub fn with_marker(mut self, owner: &str, key: &str, value: &str) -> Self {
        self.markers.push(Marker {
            owner: owner.to_string(),
            key: key.to_string(),
            value: value.to_string(),
        });
        self
    }

    /// Set `mcp_server_present` on the event.
    pub fn mcp_present(mut self, present: Option<bool>) -> Self {
        match &mut self.event {
            Event::Heartbeat(hb) => hb.mcp_server_present = present,
            Event::Register(reg) => reg.mcp_server_present = present,
        }
        self
    }

    /// Set `loaded_mcp_tools` on the event.
    pub fn tools(mut self, tools: Option<&[&str]>) -> Self {
        let tools = tools.map(|t| t.iter().map(|s| s.to_string()).collect());
        match &mut self.event {
            Event::Heartbeat(hb) => hb.loaded_mcp_tools = tools,
            Event::Register(reg) => reg.loaded_mcp_tools = tools,
        }
        self
    }

    /// Change the heartbeat's fields (no-op on a register).
    pub fn beat(mut self, f: impl FnOnce(&mut HeartbeatEvent)) -> Self {
        if let Event::Heartbeat(hb) = &mut self.event {
            f(hb);
        }
        self
    }
}

/// The status changes among `actions`.
pub fn status_changes(actions: &[Action]) -> Vec<&StatusChange> {
    actions
        .iter()
        .filter_map(Action::as_status_change)
        .collect()
}

/// Assert that `actions` hold exactly one status change, to `to` with reason
/// code `reason`.
#[track_caller]
pub fn assert_sets_status(actions: &[Action], to: Status, reason: &str) {
    match status_changes(actions).as_slice() {
        [change] => assert!(
            change.to == to && change.reason == reason,
            "expected a change to `{}` ({reason}), got one to `{}` ({})",
            to.as_str(),
            change.to.as_str(),
            change.reason
        ),
        other => panic!(
            "expected one status change to `{}`, got {}: {actions:?}",
            to.as_str(),
            other.len()
        ),
    }
}

/// Assert that `actions` change no status.
#[track_caller]
pub fn assert_no_status_change(actions: &[Action]) {
    let changes = status_changes(actions);
    assert!(
        changes.is_empty(),
        "expected no status change, got {changes:?}"
    );
}

/// Assert that `actions` request a reconcile with `trigger`.
#[track_caller]
pub fn assert_requests_reconcile(actions: &[Action], trigger: ReconcileTrigger) {
    assert!(
        actions.iter().any(|a| a.is_reconcile(trigger)),
        "expected a {trigger:?} reconcile request in {actions:?}"
    );
}

/// Assert that `actions` request no reconcile with `trigger`.
#[track_caller]
pub fn assert_no_reconcile(actions: &[Action], trigger: ReconcileTrigger) {
    assert!(
        !actions.iter().any(|a| a.is_reconcile(trigger)),
        "expected no {trigger:?} reconcile request in {actions:?}"
    );
}
