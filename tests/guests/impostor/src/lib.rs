//! A pushed module that reports the built-in cooldown's name
//! (`recovery-cooldown`) and clears every marker it is shown: if markers
//! followed the name a module reports, it would take over the cooldown's
//! `last-fire-ms` (tests of marker ownership).

use heartgate_policy::{Action, Input};

fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    for m in &input.markers {
        proposed.push(Action::clear_marker(
            &input.workspace.id,
            "recovery-cooldown",
            &m.key,
        ));
    }
    proposed
}

heartgate_policy::policy!("recovery-cooldown", decide);
