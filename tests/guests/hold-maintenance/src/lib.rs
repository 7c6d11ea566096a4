//! Holds a workspace degraded while its runtime reports the task
//! `maintenance`, with a condition of its own: written the way `heartgate
//! policy new` writes a policy, and knowing no other policy.

use heartgate_policy::{Action, Input, Severity};

const NAME: &str = "hold-maintenance";
const CONDITION: &str = "maintenance";

fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    let Some(hb) = input.heartbeat() else {
        return proposed;
    };
    let id = &input.workspace.id;
    if hb.current_task.as_deref() == Some("maintenance") {
        proposed.push(Action::set_condition(
            id,
            NAME,
            CONDITION,
            Severity::Degraded,
            "in_maintenance",
            "the runtime is in maintenance",
        ));
    } else if input.condition(NAME, CONDITION).is_some() {
        proposed.push(Action::clear_condition(id, NAME, CONDITION));
    }
    proposed
}

heartgate_policy::policy!(NAME, decide);
