//! The recovery cooldown with a one-minute window instead of five: a candidate
//! to shadow against the built-in one. Same name, so it reads the same marker.

#[path = "../../../../policies/cooldown/src/rule.rs"]
#[allow(dead_code, reason = "only `decide_with` and `NAME` are used here")]
mod rule;

use heartgate_policy::{Action, Input};

fn decide(input: &Input, proposed: Vec<Action>) -> Vec<Action> {
    rule::decide_with(input, proposed, 60 * 1000)
}

heartgate_policy::policy!(rule::NAME, decide);
