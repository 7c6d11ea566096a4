//! A candidate policy that records an event on every evaluation: it needs the
//! `record_event` grant (tests of grants and validation).

use heartgate_policy::{Action, Input};

fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    proposed.push(Action::record_event(
        &input.workspace.id,
        "NOISE",
        "{}".to_string(),
    ));
    proposed
}

heartgate_policy::policy!("noisy", decide);
