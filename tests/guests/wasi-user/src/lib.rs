//! A candidate policy built for `wasm32-wasip2`: it reads an environment
//! variable, so its component imports WASI interfaces, which the host refuses
//! (tests of validation before activation).

use heartgate_policy::{Action, Input};

fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    if std::env::var("HEARTGATE_WASI_USER").is_ok() {
        proposed.push(Action::record_event(
            &input.workspace.id,
            "WASI",
            "{}".to_string(),
        ));
    }
    proposed
}

heartgate_policy::policy!("wasi-user", decide);
