//! Holds a workspace degraded while it runs 50 tasks or more, until it runs
//! fewer than 10 (hysteresis), with a condition of its own: written the way
//! `heartgate policy new` writes a policy, and knowing no other policy.

use heartgate_policy::{Action, Input, Severity};

const NAME: &str = "hold-busy";
const CONDITION: &str = "busy";

fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    let Some(hb) = input.heartbeat() else {
        return proposed;
    };
    let id = &input.workspace.id;
    let held = input.condition(NAME, CONDITION).is_some();
    if hb.active_tasks >= 50 {
        if !held {
            proposed.push(Action::record_event(
                id,
                "WORKSPACE_DEGRADED",
                format!("{{\"active_tasks\":{}}}", hb.active_tasks),
            ));
        }
        proposed.push(Action::set_condition(
            id,
            NAME,
            CONDITION,
            Severity::Degraded,
            "too_many_tasks",
            "",
        ));
    } else if held && hb.active_tasks < 10 {
        proposed.push(Action::clear_condition(id, NAME, CONDITION));
    }
    proposed
}

heartgate_policy::policy!(NAME, decide);
