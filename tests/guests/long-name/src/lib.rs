//! A module whose `metadata()` name is 1 MiB long: refused at load, with an
//! error that does not echo it whole (tests of bounded error messages).

use heartgate_policy::{Action, Input};

fn decide(_input: &Input, proposed: Vec<Action>) -> Vec<Action> {
    proposed
}

heartgate_policy::policy!("a".repeat(1 << 20), decide);
