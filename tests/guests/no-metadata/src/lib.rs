//! A candidate policy whose metadata has no name (tests of validation).

use heartgate_policy::{Action, Input};

fn decide(_input: &Input, proposed: Vec<Action>) -> Vec<Action> {
    proposed
}

heartgate_policy::policy!("", decide);
