//! A candidate policy that never returns (tests of validation before activation).

use heartgate_policy::{Action, Input};

fn decide(input: &Input, _proposed: Vec<Action>) -> Vec<Action> {
    let mut n = input.now_ms;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

heartgate_policy::policy!("always-loop", decide);
