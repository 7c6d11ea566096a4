//! A candidate policy that always traps (tests of validation before activation).

use heartgate_policy::{Action, Input};

fn decide(_input: &Input, _proposed: Vec<Action>) -> Vec<Action> {
    panic!("this policy always traps")
}

heartgate_policy::policy!("always-trap", decide);
