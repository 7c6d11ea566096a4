//! The author's guide's example before contract 0.2.0: an online workspace
//! with more than 50 active tasks is marked degraded by an explicit status
//! change. Beside rules that bring a healthy degraded workspace back
//! online, it flaps; a sequence fixture must catch that.

use heartgate_policy::{Action, Input, Status};

const NAME: &str = "busy-degrade";

fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    let ws = &input.workspace;
    let busy = input.heartbeat().is_some_and(|hb| hb.active_tasks > 50);
    if busy && ws.status == Status::Online {
        proposed.push(Action::set_status(
            &ws.id,
            Status::Online,
            Status::Degraded,
            "too_many_tasks",
            None,
        ));
    }
    proposed
}

heartgate_policy::policy!(NAME, decide);
