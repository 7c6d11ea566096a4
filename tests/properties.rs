//! Property tests of the status machine: random heartbeat sequences, with a
//! virtual clock, through the real built-in chain (compiled policies), the
//! real executor and a real SQLite file. After every heartbeat:
//!
//! - one verdict changes the status at most once, so a workspace is never
//!   both failed and promoted by one verdict, and a platform workspace the
//!   gate refuses is never left online;
//! - no two `mcp-recovery` reconciles of a workspace are queued less than
//!   five minutes apart;
//! - a removed, paused, hibernated or hibernating workspace never changes.
//!
//! `PROPTEST_CASES=5000 cargo test --release --test properties` runs longer.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::sync::{Arc, OnceLock};

use proptest::prelude::*;

use heartgate::chain::Chain;
use heartgate::clock::{Clock, ManualClock};
use heartgate::deliverer::Deliverer;
use heartgate::engine::Engine;
use heartgate::executor::{Executor, HeartbeatRequest};
use heartgate::model::{HeartbeatEvent, Status, WorkspaceKind};
use heartgate::store::{NewWorkspace, QueuedRun, SqliteStore, Store};

const T0_MS: i64 = 1_782_302_400_000;
const COOLDOWN_MS: i64 = 5 * 60 * 1000;
const MANAGEMENT_PLUGIN: &str = "molecule-ai-plugin-molecule-platform-mcp";
const MANAGEMENT_TOOL: &str = "mcp__molecule-platform__provision_workspace";

/// Reconciles are only counted here; nothing is delivered.
struct NoDelivery;

impl Deliverer for NoDelivery {
    fn queued(&self, _runs: &[QueuedRun]) {}
}

/// The built-in chain, compiled once for every case.
fn chain() -> Chain {
    static CHAIN: OnceLock<Chain> = OnceLock::new();
    CHAIN
        .get_or_init(|| {
            let engine = Engine::new().unwrap();
            Chain::builtin(&engine).unwrap()
        })
        .clone()
}

/// One step of a sequence: time passes, then a heartbeat arrives, or an
/// operator sets the status.
#[derive(Clone, Debug)]
enum Step {
    Beat {
        after_ms: i64,
        event: HeartbeatEvent,
    },
    Operator {
        after_ms: i64,
        status: Status,
    },
}

fn heartbeat() -> impl Strategy<Value = HeartbeatEvent> {
    (
        prop::sample::select(vec![0.0, 0.05, 0.09, 0.1, 0.2, 0.49, 0.5, 0.9, 1.0]),
        prop::sample::select(vec!["", "wedged", "idle"]),
        prop::option::of(any::<bool>()),
        prop::option::of(prop::sample::select(vec![
            vec![],
            vec![MANAGEMENT_TOOL.to_string()],
            vec!["mcp__other__tool".to_string()],
        ])),
        0i64..200,
    )
        .prop_map(
            |(error_rate, state, mcp, tools, active_tasks)| HeartbeatEvent {
                error_rate,
                runtime_state: state.to_string(),
                mcp_server_present: mcp,
                loaded_mcp_tools: tools,
                active_tasks,
                uptime_seconds: 60,
                ..HeartbeatEvent::default()
            },
        )
}

fn step() -> impl Strategy<Value = Step> {
    // Gaps around the cooldown and the tools grace (0 s .. 7 min).
    let gap = prop_oneof![
        0i64..5_000,
        170_000i64..190_000,
        290_000i64..310_000,
        0i64..420_000
    ];
    prop_oneof![
        10 => (gap.clone(), heartbeat()).prop_map(|(after_ms, event)| Step::Beat { after_ms, event }),
        1 => (gap, prop::sample::select(Status::ALL.to_vec()))
            .prop_map(|(after_ms, status)| Step::Operator { after_ms, status }),
    ]
}

/// A workspace to start from.
#[derive(Clone, Debug)]
struct Start {
    platform: bool,
    model: bool,
    declares_management: bool,
    status: Status,
}

fn start() -> impl Strategy<Value = Start> {
    (
        any::<bool>(),
        prop::bool::weighted(0.8),
        any::<bool>(),
        prop::sample::select(Status::ALL.to_vec()),
    )
        .prop_map(|(platform, model, declares_management, status)| Start {
            platform,
            model,
            declares_management: platform && declares_management,
            status,
        })
}

fn run_sequence(start: &Start, steps: &[Step]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("p.db")).unwrap());
    let clock = ManualClock::at(T0_MS);
    let id = "ws";
    store
        .add_workspace(
            &NewWorkspace {
                id: id.into(),
                name: String::new(),
                kind: if start.platform {
                    WorkspaceKind::Platform
                } else {
                    WorkspaceKind::Workspace
                },
                model_configured: start.model,
                runtime: String::new(),
            },
            T0_MS,
        )
        .unwrap();
    if start.declares_management {
        store
            .declare_plugin(id, MANAGEMENT_PLUGIN, "local://mcp", T0_MS)
            .unwrap();
    }
    store.set_status(id, start.status, T0_MS).unwrap();
    let token = heartgate::auth::mint().unwrap();
    store.issue_token(id, &token.stored, T0_MS).unwrap();
    let executor = Executor::new(
        store.clone(),
        chain(),
        Arc::new(clock.clone()),
        Arc::new(NoDelivery),
    );
    let status = || store.workspace(id).unwrap().unwrap().status;

    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Operator { after_ms, status } => {
                clock.advance(*after_ms);
                store.set_status(id, *status, clock.now_ms()).unwrap();
            }
            Step::Beat { after_ms, event } => {
                clock.advance(*after_ms);
                let before = status();
                let decisions_before = store.decisions(id, 1).unwrap().last().map(|d| d.id);
                executor
                    .heartbeat(&HeartbeatRequest::new(
                        id,
                        Some(token.plaintext.clone()),
                        event.clone(),
                    ))
                    .map_err(|e| TestCaseError::fail(format!("step {n}: {e}")))?;
                let after = status();

                // Frozen statuses never change.
                if before.is_frozen() {
                    prop_assert_eq!(after, before, "step {}: a frozen workspace changed", n);
                    continue;
                }
                // One status change per verdict at most.
                let decision = store.decisions(id, 1).unwrap().pop().unwrap();
                prop_assert_ne!(
                    Some(decision.id),
                    decisions_before,
                    "step {}: no decision",
                    n
                );
                let changes = decision
                    .final_actions
                    .as_array()
                    .map(|a| a.iter().filter(|x| x["kind"] == "set_status").count())
                    .unwrap_or(0);
                prop_assert!(changes <= 1, "step {}: {} status changes", n, changes);
                // The gate fails closed: a refused platform workspace is never online.
                let refused =
                    start.platform && (!start.model || event.mcp_server_present == Some(false));
                if refused {
                    prop_assert_eq!(
                        after,
                        Status::Failed,
                        "step {}: the gate refused, but the status is {:?}",
                        n,
                        after
                    );
                }
            }
        }
    }

    // Never two recovery reconciles inside five minutes.
    let mut fires: Vec<i64> = store
        .reconcile_runs(Some(id))
        .unwrap()
        .iter()
        .filter(|r| r.trigger == "mcp-recovery")
        .map(|r| r.requested_ms)
        .collect();
    fires.sort_unstable();
    for pair in fires.windows(2) {
        prop_assert!(
            pair[1] - pair[0] >= COOLDOWN_MS,
            "recovery fired at {} and {} ({} ms apart)",
            pair[0],
            pair[1],
            pair[1] - pair[0]
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn heartbeat_sequences_keep_the_status_machine_invariants(
        start in start(),
        steps in prop::collection::vec(step(), 1..40),
    ) {
        run_sequence(&start, &steps)?;
    }
}
