//! Shadow mode: a stored chain evaluated beside the active one on live
//! traffic, without effects; the differences in the final actions are
//! counted, logged and kept (the last 100).

use std::sync::Arc;

use serde::Serialize;

use super::Executor;
use crate::chain::{Chain, ChainOutcome};
use crate::model::Input;

/// One difference between the active chain and a shadow chain.
#[derive(Clone, Debug, Serialize)]
pub struct ShadowDiff {
    pub workspace_id: String,
    pub event_kind: String,
    pub at_ms: i64,
    pub active: serde_json::Value,
    pub shadow: serde_json::Value,
}

/// What a shadow chain has seen so far.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ShadowStats {
    /// Requests evaluated by both chains.
    pub evaluated: u64,
    /// Requests whose final actions differed.
    pub differed: u64,
    /// The most recent differences, oldest first (at most 100).
    pub recent: Vec<ShadowDiff>,
}

/// A staged chain running beside the active one, without effects.
pub struct Shadow {
    pub chain_id: i64,
    pub chain: Chain,
    stats: std::sync::Mutex<ShadowStats>,
}

impl Shadow {
    pub fn new(chain_id: i64, chain: Chain) -> Shadow {
        Shadow {
            chain_id,
            chain,
            stats: std::sync::Mutex::new(ShadowStats::default()),
        }
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> ShadowStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// What a chain finally decided, for comparing two chains.
fn final_view(outcome: &ChainOutcome) -> serde_json::Value {
    match &outcome.result {
        Ok(actions) => serde_json::to_value(actions).unwrap_or_default(),
        Err(f) => serde_json::json!({"failed": f.failure.kind.as_str()}),
    }
}

impl Executor {
    /// Run `shadow` beside the active chain (or stop, with `None`); returns
    /// the shadow that was running.
    pub fn set_shadow(&self, shadow: Option<Shadow>) -> Option<Arc<Shadow>> {
        self.shadow.swap(shadow.map(Arc::new))
    }

    /// The shadow chain running, if any.
    pub fn shadow(&self) -> Option<Arc<Shadow>> {
        self.shadow.load_full()
    }

    /// Evaluate the shadow chain, if any, on the input the active chain just
    /// decided, and count and log a difference in the final actions.
    pub(super) fn compare_with_shadow(&self, input: &Input, active: &ChainOutcome) {
        crate::engine::block_on(self.compare_with_shadow_async(input, active));
    }

    /// [`Executor::compare_with_shadow`] on an async worker.
    pub(super) async fn compare_with_shadow_async(&self, input: &Input, active: &ChainOutcome) {
        let Some(shadow) = self.shadow.load_full() else {
            return;
        };
        let theirs = final_view(&shadow.chain.evaluate_async(input).await);
        let ours = final_view(active);
        let Ok(mut stats) = shadow.stats.lock() else {
            return;
        };
        stats.evaluated += 1;
        if theirs != ours {
            stats.differed += 1;
            tracing::info!(
                target: "heartgate::shadow",
                workspace_id = %input.workspace.id,
                shadow_chain = shadow.chain_id,
                active = %ours,
                shadow = %theirs,
                "the shadow chain decided differently"
            );
            if stats.recent.len() == 100 {
                stats.recent.remove(0);
            }
            stats.recent.push(ShadowDiff {
                workspace_id: input.workspace.id.clone(),
                event_kind: input.event.kind().to_string(),
                at_ms: input.now_ms,
                active: ours,
                shadow: theirs,
            });
        }
    }
}
