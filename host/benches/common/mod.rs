//! What the engine benchmarks share: the heartbeat input and the built-in
//! rules as native Rust.

use heartgate::model::{Event, HeartbeatEvent, Input, Status, Workspace, WorkspaceKind};

/// A heartbeat of an online platform workspace.
pub fn input(mcp_present: Option<bool>) -> Input {
    Input {
        event: Event::Heartbeat(HeartbeatEvent {
            uptime_seconds: 60,
            mcp_server_present: mcp_present,
            ..HeartbeatEvent::default()
        }),
        workspace: Workspace {
            id: "ws".into(),
            kind: WorkspaceKind::Platform,
            status: Status::Online,
            model_configured: true,
            declared_plugins: vec![],
            last_register_failure_ms: None,
            ..Workspace::default()
        },
        markers: vec![],
        now_ms: 1_782_302_400_000,
    }
}

/// The built-in chain's rules, called as native Rust.
pub fn native_chain(input: &heartgate_policy::Input) -> Vec<heartgate_policy::Action> {
    let out = heartgate_policy_gate::rule::decide(input, Vec::new());
    let out = heartgate_policy_status_rules::rule::decide(input, out);
    let out = heartgate_policy_recovery_trigger::rule::decide(input, out);
    heartgate_policy_cooldown::rule::decide(input, out)
}
