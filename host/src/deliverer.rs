//! The deliverer: the only code that will touch workspace config volumes and
//! restart hooks.
//!
//! A verdict that requests a reconcile records a `reconcile_runs` row in state
//! `queued` in the same transaction as the rest of the verdict; after the
//! commit, the executor hands the queued runs to a [`Deliverer`]. The queue is
//! the database, so a run survives a crash between commit and hand-over: a
//! worker picks up every `queued` row at start. Staging, delivery and restart
//! hooks are the next step of the project; until then [`QueueOnly`] leaves the
//! runs queued for an operator to see (`heartgate reconcile list`).

use crate::store::QueuedRun;

/// Receives reconcile runs after their verdict committed. Must not block.
pub trait Deliverer: Send + Sync + 'static {
    /// The runs were committed in state `queued`.
    fn queued(&self, runs: &[QueuedRun]);
}

/// Leaves queued runs in the database and logs them.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueOnly;

impl Deliverer for QueueOnly {
    fn queued(&self, runs: &[QueuedRun]) {
        for run in runs {
            tracing::info!(
                run = run.id,
                workspace_id = %run.workspace_id,
                trigger = run.trigger.as_str(),
                "reconcile queued"
            );
        }
    }
}
