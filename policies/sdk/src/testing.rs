//! Builders and assertions for native unit tests of a policy: start from
//! [`heartbeat`] or [`register`], adjust with the `with_*` methods, pass the
//! result to the policy's decision function, and check its actions with the
//! `assert_*` functions.

use crate::{
    Action, Condition, ConditionChange, Effect, Event, HeartbeatEvent, Input, Marker,
    ReconcileTrigger, RegisterEvent, Severity, SilenceEvent, SilenceKind, Status, StatusChange,
    Workspace, WorkspaceKind,
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
        runtime: String::new(),
        capabilities: Vec::new(),
        idle_timeout_seconds: None,
        last_heartbeat_ms: None,
        status_since_ms: None,
        conditions: Vec::new(),
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

/// The host noticed `kind` silence of the online ordinary workspace `id`,
/// silent for `silent_for_ms` at [`T0_MS`] (last heard from then, for a
/// heartbeat expiry; never, for a provision timeout).
pub fn silence(id: &str, kind: SilenceKind, silent_for_ms: i64) -> Input {
    let mut ws = workspace(id);
    let last_heartbeat_ms = match kind {
        SilenceKind::HeartbeatExpired => Some(T0_MS - silent_for_ms),
        SilenceKind::ProvisionTimeout => {
            ws.status = Status::Provisioning;
            None
        }
    };
    ws.last_heartbeat_ms = last_heartbeat_ms;
    Input {
        event: Event::Silence(SilenceEvent {
            kind,
            last_heartbeat_ms,
            silent_for_ms,
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

    /// The workspace runs the runtime `name` (e.g. `external`).
    pub fn runtime(mut self, name: &str) -> Self {
        self.workspace.runtime = name.to_string();
        self
    }

    /// The runtime declares the capability `name` (in this request's
    /// `runtime_metadata`).
    pub fn capability(mut self, name: &str) -> Self {
        self.workspace.capabilities.push(name.to_string());
        self.workspace.capabilities.sort();
        self
    }

    /// The workspace was last heard from at `ms`.
    pub fn last_heartbeat_at(mut self, ms: i64) -> Self {
        self.workspace.last_heartbeat_ms = Some(ms);
        self
    }

    /// The workspace entered its status at `ms`.
    pub fn status_since(mut self, ms: i64) -> Self {
        self.workspace.status_since_ms = Some(ms);
        self
    }

    /// The policy `owner` has the condition `name` in force since
    /// [`T0_MS`], with reason code `reason`.
    pub fn with_condition(
        mut self,
        owner: &str,
        name: &str,
        severity: Severity,
        reason: &str,
    ) -> Self {
        self.workspace.conditions.push(Condition {
            owner: owner.to_string(),
            name: name.to_string(),
            severity,
            reason: reason.to_string(),
            message: String::new(),
            since_ms: T0_MS,
        });
        self.workspace
            .conditions
            .sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
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
            Event::Silence(_) => {}
        }
        self
    }

    /// Set `loaded_mcp_tools` on the event.
    pub fn tools(mut self, tools: Option<&[&str]>) -> Self {
        let tools = tools.map(|t| t.iter().map(|s| s.to_string()).collect());
        match &mut self.event {
            Event::Heartbeat(hb) => hb.loaded_mcp_tools = tools,
            Event::Register(reg) => reg.loaded_mcp_tools = tools,
            Event::Silence(_) => {}
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

/// The conditions `actions` put in force.
pub fn conditions_set(actions: &[Action]) -> Vec<&ConditionChange> {
    actions
        .iter()
        .filter_map(Action::as_condition_set)
        .collect()
}

/// Assert that `actions` put the condition `name` in force at `severity`;
/// returns it for further checks (reason, message).
#[track_caller]
pub fn assert_sets_condition<'a>(
    actions: &'a [Action],
    name: &str,
    severity: Severity,
) -> &'a ConditionChange {
    match conditions_set(actions).into_iter().find(|c| c.name == name) {
        Some(c) => {
            assert!(
                c.severity == severity,
                "condition `{name}` is set at `{}`, expected `{}`",
                c.severity.as_str(),
                severity.as_str()
            );
            c
        }
        None => panic!("expected condition `{name}` to be set, in {actions:?}"),
    }
}

/// Assert that `actions` clear the condition `name`.
#[track_caller]
pub fn assert_clears_condition(actions: &[Action], name: &str) {
    assert!(
        actions
            .iter()
            .filter_map(Action::as_condition_clear)
            .any(|k| k.name == name),
        "expected condition `{name}` to be cleared, in {actions:?}"
    );
}

/// Assert that `actions` neither set nor clear the condition `name`.
#[track_caller]
pub fn assert_leaves_condition(actions: &[Action], name: &str) {
    assert!(
        !actions
            .iter()
            .any(|a| a.as_condition_set().is_some_and(|c| c.name == name)
                || a.as_condition_clear().is_some_and(|k| k.name == name)),
        "expected condition `{name}` to be left alone, in {actions:?}"
    );
}

/// Assert that `actions` set the marker `key` (to any value); returns the value.
#[track_caller]
pub fn assert_sets_marker<'a>(actions: &'a [Action], key: &str) -> &'a str {
    actions
        .iter()
        .find_map(|a| match &a.effect {
            Effect::SetMarker(m) if m.key == key => Some(m.value.as_str()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("expected marker `{key}` to be set, in {actions:?}"))
}

/// Assert that `actions` clear the marker `key`.
#[track_caller]
pub fn assert_clears_marker(actions: &[Action], key: &str) {
    assert!(
        actions
            .iter()
            .any(|a| matches!(&a.effect, Effect::ClearMarker(k) if k.key == key)),
        "expected marker `{key}` to be cleared, in {actions:?}"
    );
}

/// Assert that `actions` record one event `event_type`; returns its payload.
#[track_caller]
pub fn assert_records_event<'a>(actions: &'a [Action], event_type: &str) -> &'a str {
    let payloads: Vec<&str> = actions
        .iter()
        .filter_map(|a| match &a.effect {
            Effect::RecordEvent(e) if e.event_type == event_type => Some(e.payload_json.as_str()),
            _ => None,
        })
        .collect();
    match payloads.as_slice() {
        [one] => one,
        other => panic!(
            "expected one `{event_type}` event, got {}: {actions:?}",
            other.len()
        ),
    }
}

/// Assert that `actions` record no event `event_type`.
#[track_caller]
pub fn assert_no_event(actions: &[Action], event_type: &str) {
    assert!(
        !actions
            .iter()
            .any(|a| matches!(&a.effect, Effect::RecordEvent(e) if e.event_type == event_type)),
        "expected no `{event_type}` event in {actions:?}"
    );
}

/// The input of the next evaluation after `actions` were applied: the
/// conditions they set or clear (owned by `owner`) and the markers they
/// write carried over, the clock moved to `next_ms`, the event kept. The
/// status is not derived here (the host does that; run a sequence fixture
/// through `heartgate policy test` to see statuses).
pub fn carry(input: &Input, owner: &str, actions: &[Action], next_ms: i64) -> Input {
    let mut next = input.clone();
    next.now_ms = next_ms;
    for a in actions {
        match &a.effect {
            Effect::SetCondition(c) if c.owner == owner => {
                let since_ms = next
                    .condition(owner, &c.name)
                    .map_or(input.now_ms, |old| old.since_ms);
                next.workspace
                    .conditions
                    .retain(|o| !(o.owner == owner && o.name == c.name));
                next.workspace.conditions.push(Condition {
                    owner: owner.to_string(),
                    name: c.name.clone(),
                    severity: c.severity,
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                    since_ms,
                });
            }
            Effect::ClearCondition(k) if k.owner == owner => next
                .workspace
                .conditions
                .retain(|o| !(o.owner == owner && o.name == k.name)),
            Effect::SetMarker(m) if m.owner == owner => {
                next.markers.retain(|o| o.key != m.key);
                next.markers.push(m.clone());
            }
            Effect::ClearMarker(k) if k.owner == owner => next.markers.retain(|o| o.key != k.key),
            _ => {}
        }
    }
    next.workspace
        .conditions
        .sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
    next
}
