//! Shadow mode: a stored chain evaluated beside the active one on live
//! traffic, without effects; the differences in the final actions are
//! counted, logged and kept (the last 100).
//!
//! Every applied verdict (register, heartbeat, silence) hands its input and
//! the active chain's outcome to the shadow's queue; one task
//! ([`Executor::run_shadow`]) evaluates them in order, off the request path.
//! No request waits for the shadow: with the queue full an evaluation is
//! skipped (and counted), and a failing read or write of the shadow's state
//! is a logged warning.
//!
//! The shadow chain keeps markers and conditions of its own, in the store
//! ([`Store::shadow_state`]: per workspace, under the shadow chain's id, so
//! every host running the shadow shares it). It is evaluated on the
//! request's input with the workspace's markers and conditions replaced by
//! its own, and the marker and condition writes of its verdict, checked as
//! the executor checks the active chain's, are applied to its own state
//! only, as the store applies them to the real state (by slot and owner; a
//! condition keeps the time it came into force). Nothing else of its
//! verdict takes effect: no status, event, reconcile, real marker or real
//! condition. The write is a compare-and-set on the state it read, so two
//! hosts' shadows cannot both fire one cooldown: the later evaluation is
//! made again on the state the first left.
//!
//! Its state of a workspace starts as the real state in the input of its
//! first evaluation of that workspace (the markers and conditions of the
//! shadow chain's slots that the active chain saw for the same request).
//! From there each chain goes on from its own decisions, so a difference is
//! what the shadow chain would have decided had it been activated when it
//! began watching the workspace. Starting empty instead would make it fire
//! every cooldown and state every condition anew at its first look, and
//! report those as differences. The status stays the real one: the shadow
//! keeps no status of its own.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use super::{Effects, Executor, check_final};
use crate::chain::{Chain, ChainOutcome};
use crate::model::{Condition, Input, Marker, Workspace};
use crate::store::{ShadowState, ShadowWritten, Store, StoreError};

/// The most evaluations waiting for the shadow; beyond, a request's
/// evaluation is skipped.
pub const SHADOW_QUEUE: usize = 1024;
/// How many times one evaluation is made at most when the shadow on another
/// host changes the workspace's shadow state under it.
const SHADOW_ATTEMPTS: u32 = 4;

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
    /// Requests the shadow did not evaluate: its queue was full, or its
    /// state could not be read or kept changing (logged).
    pub skipped: u64,
    /// The most recent differences, oldest first (at most 100).
    pub recent: Vec<ShadowDiff>,
}

/// A staged chain running beside the active one, without effects.
pub struct Shadow {
    pub chain_id: i64,
    pub chain: Chain,
    stats: std::sync::Mutex<ShadowStats>,
    /// A skip or a failure was logged and nothing went through since: the
    /// next is not logged (one warning per episode).
    troubled: AtomicBool,
}

/// A request for the shadow chain to decide as well.
pub(super) struct Job {
    shadow: Arc<Shadow>,
    input: Arc<Input>,
    /// What the active chain decided on `input`.
    active: Arc<ChainOutcome>,
}

impl Shadow {
    pub fn new(chain_id: i64, chain: Chain) -> Shadow {
        Shadow {
            chain_id,
            chain,
            stats: std::sync::Mutex::new(ShadowStats::default()),
            troubled: AtomicBool::new(false),
        }
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> ShadowStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Count one request evaluated by both chains, and log and keep a
    /// difference in their final actions.
    fn record(&self, input: &Input, active: &ChainOutcome, shadow: &ChainOutcome) {
        let theirs = final_view(shadow);
        let ours = final_view(active);
        let Ok(mut stats) = self.stats.lock() else {
            return;
        };
        stats.evaluated += 1;
        if theirs != ours {
            stats.differed += 1;
            tracing::info!(
                target: "heartgate::shadow",
                workspace_id = %input.workspace.id,
                shadow_chain = self.chain_id,
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

    /// Count a request the shadow did not evaluate.
    fn skip(&self, workspace_id: &str, why: &str) {
        if let Ok(mut stats) = self.stats.lock() {
            stats.skipped += 1;
        }
        self.trouble(workspace_id, why);
    }

    /// Log `why` at WARN, unless the last trouble was logged and nothing
    /// went through since.
    fn trouble(&self, workspace_id: &str, why: &str) {
        if !self.troubled.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "heartgate::shadow",
                workspace_id,
                shadow_chain = self.chain_id,
                "{why} (the shadow is best effort; no more of this is logged until one goes through)"
            );
        }
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

    /// Hand the input the active chain just decided (as `active`) to the
    /// shadow chain, if one runs. Never waits: with its queue full the
    /// evaluation is skipped, and without [`Executor::run_shadow`] running
    /// nothing is evaluated.
    pub(super) fn compare_with_shadow(&self, input: &Arc<Input>, active: &Arc<ChainOutcome>) {
        let Some(shadow) = self.shadow.load_full() else {
            return;
        };
        let Some(jobs) = self.shadow_jobs.get() else {
            return;
        };
        let job = Job {
            shadow: shadow.clone(),
            input: input.clone(),
            active: active.clone(),
        };
        if jobs.try_send(job).is_err() {
            shadow.skip(
                &input.workspace.id,
                "the shadow chain's queue is full: an evaluation was skipped",
            );
        }
    }

    /// Evaluate the shadow chain on what the requests hand it, in order,
    /// until `stop` completes (what the service runs; see the module's
    /// documentation). Evaluations still queued then are dropped.
    pub fn run_shadow<S: Future<Output = ()>>(&self, stop: S) -> impl Future<Output = ()> + use<S> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(SHADOW_QUEUE);
        let set = self.shadow_jobs.set(tx).is_ok();
        let store = self.store.clone();
        async move {
            if !set {
                return;
            }
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    job = rx.recv() => match job {
                        Some(job) => evaluate(&store, job).await,
                        None => return,
                    },
                }
            }
        }
    }
}

/// Evaluate `job` with the shadow chain on its own state, keep the marker
/// and condition writes of its verdict in that state, and compare.
async fn evaluate(store: &Arc<dyn Store>, job: Job) {
    let Job {
        shadow,
        input,
        active,
    } = job;
    let (chain_id, workspace_id) = (shadow.chain_id, input.workspace.id.clone());
    for _ in 0..SHADOW_ATTEMPTS {
        let id = workspace_id.clone();
        let stored = blocking(store, move |s| s.shadow_state(chain_id, &id)).await;
        let state = match stored {
            Ok(Some(state)) => state,
            Ok(None) => seed(&shadow.chain, &input),
            Err(e) => {
                return shadow.skip(
                    &workspace_id,
                    &format!("reading the shadow chain's state failed: {e}"),
                );
            }
        };
        let theirs = Input {
            event: input.event.clone(),
            workspace: Workspace {
                conditions: state.conditions.clone(),
                ..input.workspace.clone()
            },
            markers: state.markers.clone(),
            now_ms: input.now_ms,
        };
        let outcome = shadow.chain.evaluate_async(&theirs).await;
        // A verdict that fails closed applies nothing, here as for real.
        let after = match check_final(&theirs, &outcome) {
            Ok(effects) => applied(&state, &effects, input.now_ms),
            Err(_) => state.clone(),
        };
        // A first evaluation stores its state even if it changed nothing,
        // so that the next one goes on from it, not from the real state.
        if state.version != 0 && after == state {
            shadow.troubled.store(false, Ordering::Relaxed);
            return shadow.record(&input, &active, &outcome);
        }
        let (id, now_ms) = (workspace_id.clone(), input.now_ms);
        let written = blocking(store, move |s| {
            s.write_shadow_state(chain_id, &id, &after, now_ms)
        })
        .await;
        match written {
            Ok(ShadowWritten::Stored) => {
                shadow.troubled.store(false, Ordering::Relaxed);
                return shadow.record(&input, &active, &outcome);
            }
            Ok(ShadowWritten::Conflict) => continue,
            // Stopped or replaced meanwhile, perhaps on another host.
            Ok(ShadowWritten::NotShadow) => return,
            Err(e) => {
                // Decided on the state it read; only this change is lost.
                shadow.trouble(
                    &workspace_id,
                    &format!("storing the shadow chain's state failed: {e}"),
                );
                return shadow.record(&input, &active, &outcome);
            }
        }
    }
    shadow.skip(
        &workspace_id,
        "the shadow chain's state of a workspace kept changing under its evaluation",
    );
}

/// The state a shadow chain starts from on a workspace: the markers and
/// conditions of its slots in `input`, the real ones the active chain saw.
fn seed(chain: &Chain, input: &Input) -> ShadowState {
    let mut markers = input.markers.clone();
    markers.retain(|m| {
        chain
            .slots
            .iter()
            .any(|s| m.belongs_to(&s.name, &s.module.metadata().name))
    });
    let mut conditions = input.workspace.conditions.clone();
    chain.retain_in_force(&mut conditions);
    ShadowState {
        markers,
        conditions,
        version: 0,
    }
}

/// `state` after the marker and condition writes of `effects`, made at
/// `now_ms`, as the store makes them on the real state; kept in the order
/// the store reads them in (markers by slot, owner and key; conditions by
/// owner, name and slot).
fn applied(state: &ShadowState, effects: &Effects, now_ms: i64) -> ShadowState {
    let mut next = state.clone();
    for w in &effects.markers {
        let at = next.markers.iter().position(|m| {
            m.slot.as_deref() == Some(w.slot.as_str()) && m.owner == w.owner && m.key == w.key
        });
        match (at, &w.new) {
            (Some(i), Some(value)) => next.markers[i].value.clone_from(value),
            (Some(i), None) => {
                next.markers.remove(i);
            }
            (None, Some(value)) => next.markers.push(Marker {
                slot: Some(w.slot.clone()),
                owner: w.owner.clone(),
                key: w.key.clone(),
                value: value.clone(),
            }),
            (None, None) => {}
        }
    }
    for w in &effects.conditions {
        let at = next.conditions.iter().position(|c| {
            c.slot.as_deref() == Some(w.slot.as_str()) && c.owner == w.owner && c.name == w.name
        });
        match (at, &w.new) {
            // A changed condition keeps the time it came into force.
            (Some(i), Some(new)) => {
                let c = &mut next.conditions[i];
                c.severity = new.severity;
                c.reason.clone_from(&new.reason);
                c.message.clone_from(&new.message);
            }
            (Some(i), None) => {
                next.conditions.remove(i);
            }
            (None, Some(new)) => next.conditions.push(Condition {
                slot: Some(w.slot.clone()),
                owner: w.owner.clone(),
                name: w.name.clone(),
                severity: new.severity,
                reason: new.reason.clone(),
                message: new.message.clone(),
                since_ms: now_ms,
            }),
            (None, None) => {}
        }
    }
    next.markers
        .sort_by(|a, b| (&a.slot, &a.owner, &a.key).cmp(&(&b.slot, &b.owner, &b.key)));
    next.conditions
        .sort_by(|a, b| (&a.owner, &a.name, &a.slot).cmp(&(&b.owner, &b.name, &b.slot)));
    next
}

/// Run `f` on the store on a blocking thread.
async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .unwrap_or_else(|e| Err(StoreError::Failed(format!("the store call panicked: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Severity;
    use crate::store::{ConditionState, ConditionWrite, MarkerWrite};

    fn marker(slot: &str, key: &str, value: &str) -> Marker {
        Marker {
            slot: Some(slot.into()),
            owner: "p".into(),
            key: key.into(),
            value: value.into(),
        }
    }

    fn condition(slot: &str, name: &str, severity: Severity, since_ms: i64) -> Condition {
        Condition {
            slot: Some(slot.into()),
            owner: "p".into(),
            name: name.into(),
            severity,
            reason: "r".into(),
            message: String::new(),
            since_ms,
        }
    }

    fn effects(markers: Vec<MarkerWrite>, conditions: Vec<ConditionWrite>) -> Effects {
        Effects {
            status: None,
            reject: None,
            events: Vec::new(),
            markers,
            conditions,
            reconciles: Vec::new(),
        }
    }

    fn set_marker(slot: &str, key: &str, new: Option<&str>) -> MarkerWrite {
        MarkerWrite {
            slot: slot.into(),
            owner: "p".into(),
            key: key.into(),
            seen: None,
            new: new.map(str::to_string),
        }
    }

    fn set_condition(slot: &str, name: &str, new: Option<Severity>) -> ConditionWrite {
        ConditionWrite {
            slot: slot.into(),
            owner: "p".into(),
            name: name.into(),
            new: new.map(|severity| ConditionState {
                severity,
                reason: "r".into(),
                message: String::new(),
            }),
        }
    }

    /// The shadow's own state changes as the store changes the real one:
    /// by slot, owner and key (or name); a cleared one goes; a changed
    /// condition keeps its `since_ms`, a new one gets the evaluation's time;
    /// the order is the store's.
    #[test]
    fn effects_apply_to_the_shadow_state_as_to_the_real_one() {
        let state = ShadowState {
            markers: vec![marker("a", "k", "1"), marker("b", "k", "2")],
            conditions: vec![
                condition("a", "x", Severity::Degraded, 5),
                condition("a", "y", Severity::Failed, 6),
            ],
            version: 3,
        };
        let after = applied(
            &state,
            &effects(
                vec![
                    set_marker("b", "k", Some("20")),
                    set_marker("a", "k", None),
                    set_marker("a", "j", Some("9")),
                    set_marker("c", "gone", None),
                ],
                vec![
                    set_condition("a", "y", Some(Severity::Offline)),
                    set_condition("a", "x", None),
                    set_condition("b", "w", Some(Severity::Degraded)),
                    set_condition("c", "none", None),
                ],
            ),
            100,
        );
        assert_eq!(
            after.markers,
            [marker("a", "j", "9"), marker("b", "k", "20")]
        );
        assert_eq!(
            after.conditions,
            [
                condition("b", "w", Severity::Degraded, 100),
                condition("a", "y", Severity::Offline, 6),
            ]
        );
        assert_eq!(after.version, 3, "the store bumps the version");
        assert_eq!(
            applied(&state, &effects(Vec::new(), Vec::new()), 100),
            state
        );
    }
}
