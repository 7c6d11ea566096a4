//! Prometheus metrics, served at `GET /metrics` in the OpenMetrics text
//! format. Names are `heartgate_<thing>_<unit>`; counters end in `_total`.
//!
//! - `heartgate_http_requests_total{route,status}` (routes are fixed templates)
//! - `heartgate_registry_rejections_total{route,reason}`: refused or failed
//!   requests of `/registry/*`, by reason key (`invalid_json`,
//!   `unknown_workspace`, `auth_invalid`, `url_not_allowed`, ...)
//! - `heartgate_evaluations_total{event,outcome}`,
//!   `heartgate_policy_failures_total{slot,kind}`
//! - `heartgate_slot_evaluation_seconds{slot}` (histogram, fresh sandbox included)
//! - `heartgate_status_transitions_total{from,to}` (committed changes)
//! - `heartgate_reconcile_runs_total{trigger,outcome}`
//! - `heartgate_cooldown_suppressions_total{slot,trigger}`: reconcile requests
//!   a slot dropped from what was proposed to it
//! - `heartgate_active_chain{version}`: 1 for the chain in use
//! - `heartgate_db_commit_seconds` (histogram): the writer's apply-and-commit
//!   of one batch
//! - `heartgate_db_write_failures_total`: writes that failed (a full disk, a
//!   read-only file, an I/O error, a lock held elsewhere)
//! - `heartgate_db_writable`: 1 while writes succeed and the database's file
//!   system has room, 0 during an episode (unready, no early acknowledgement)
//! - `heartgate_http_connections`: connections open now;
//!   `heartgate_http_connection_limit_reached_total`: episodes at the cap;
//!   `heartgate_http_connections_evicted_total`: idle connections closed to
//!   make room for new ones
//! - `heartgate_silence_transitions_total{kind,to}`: status changes committed
//!   by silence verdicts (`heartbeat_expired` or `provision_timeout`)
//! - `heartgate_silence_sweep_seconds` (histogram): one sweep for silent
//!   workspaces, evaluations and commits included
//!
//! Each evaluation outcome is its own label value (`applied`, `rejected`,
//! `timeout`, `out_of_memory`, `trap`, `instantiation`, `policy_error`,
//! `invalid_output`, `ungranted_action`), so a sandbox breach is never
//! counted as a generic error.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::FailureKind;

/// Labels of an applied verdict: static strings, so counting a heartbeat
/// allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvaluationLabels {
    /// `heartbeat`, `register` or `silence`.
    pub event: &'static str,
    /// `applied`, `rejected`, or the failure kind.
    pub outcome: &'static str,
}

/// Labels of a slot that failed an evaluation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotFailureLabels {
    pub slot: String,
    pub kind: &'static str,
}

/// Labels of an HTTP request: its route (a fixed template, so a client
/// cannot create series) and response status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

/// A refused registry request: its route template and reason key (both
/// fixed strings, so clients cannot create series).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub route: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabels {
    pub slot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub from: &'static str,
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub trigger: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SuppressionLabels {
    pub slot: String,
    pub trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SilenceLabels {
    /// `heartbeat_expired` or `provision_timeout`.
    pub kind: &'static str,
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChainLabels {
    pub version: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 5 us to 80 ms: one policy's evaluation.
fn slot_buckets() -> Histogram {
    Histogram::new(exponential_buckets(5e-6, 2.0, 15))
}

/// The service's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    evaluations: Family<EvaluationLabels, Counter>,
    slot_failures: Family<SlotFailureLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    rejections: Family<RejectionLabels, Counter>,
    slot_seconds: HistogramFamily<SlotLabels>,
    transitions: Family<TransitionLabels, Counter>,
    reconcile_runs: Family<RunLabels, Counter>,
    suppressions: Family<SuppressionLabels, Counter>,
    chain: Family<ChainLabels, Gauge>,
    commit_seconds: Histogram,
    db_write_failures: Counter,
    db_writable: Gauge,
    silence_transitions: Family<SilenceLabels, Counter>,
    sweep_seconds: Histogram,
    /// The HTTP layer's connection counts.
    pub connections: ConnectionMetrics,
}

/// What the HTTP layer counts of its connections.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    /// Open now.
    pub open: Gauge,
    /// Times the cap was reached (episodes).
    pub limit_reached: Counter,
    /// Idle connections closed to make room.
    pub evicted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let evaluations = Family::<EvaluationLabels, Counter>::default();
        registry.register(
            "heartgate_evaluations",
            "Verdicts recorded, by event and outcome (applied, rejected, or how the chain failed)",
            evaluations.clone(),
        );
        let slot_failures = Family::<SlotFailureLabels, Counter>::default();
        registry.register(
            "heartgate_policy_failures",
            "Slots that failed an evaluation, by slot and failure kind",
            slot_failures.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "heartgate_http_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        let rejections = Family::<RejectionLabels, Counter>::default();
        registry.register(
            "heartgate_registry_rejections",
            "Refused or failed requests of the registry routes, by route and reason key",
            rejections.clone(),
        );
        let slot_seconds: HistogramFamily<SlotLabels> =
            Family::new_with_constructor(slot_buckets as fn() -> Histogram);
        registry.register(
            "heartgate_slot_evaluation_seconds",
            "Time one slot's policy took in one evaluation (fresh sandbox included), by slot",
            slot_seconds.clone(),
        );
        let transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "heartgate_status_transitions",
            "Workspace status changes committed by verdicts, by from and to",
            transitions.clone(),
        );
        let reconcile_runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "heartgate_reconcile_runs",
            "Reconcile runs finished, by trigger and outcome",
            reconcile_runs.clone(),
        );
        let suppressions = Family::<SuppressionLabels, Counter>::default();
        registry.register(
            "heartgate_cooldown_suppressions",
            "Reconcile requests a slot dropped from the actions proposed to it (a cooldown holding), by slot and trigger",
            suppressions.clone(),
        );
        let chain = Family::<ChainLabels, Gauge>::default();
        registry.register(
            "heartgate_active_chain",
            "1 for the version of the chain evaluating verdicts",
            chain.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(5e-5, 2.0, 14));
        registry.register(
            "heartgate_db_commit_seconds",
            "Time the writer took to apply and commit one batch of verdicts",
            commit_seconds.clone(),
        );
        let db_write_failures = Counter::default();
        registry.register(
            "heartgate_db_write_failures",
            "Database writes that failed (a batch of verdicts, or one operator write)",
            db_write_failures.clone(),
        );
        let db_writable = Gauge::default();
        db_writable.set(1);
        registry.register(
            "heartgate_db_writable",
            "1 while database writes succeed and its file system has room; 0 while the service is unready for it",
            db_writable.clone(),
        );
        let silence_transitions = Family::<SilenceLabels, Counter>::default();
        registry.register(
            "heartgate_silence_transitions",
            "Workspace status changes committed by silence verdicts, by kind (heartbeat_expired, provision_timeout) and to",
            silence_transitions.clone(),
        );
        // 100 us to about 54 min.
        let sweep_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 25));
        registry.register(
            "heartgate_silence_sweep_seconds",
            "Time one sweep for silent workspaces took, their evaluations and commits included",
            sweep_seconds.clone(),
        );
        let connections = ConnectionMetrics::default();
        registry.register(
            "heartgate_http_connections",
            "HTTP connections open now",
            connections.open.clone(),
        );
        registry.register(
            "heartgate_http_connection_limit_reached",
            "Times the open connections reached `[http] max_connections`",
            connections.limit_reached.clone(),
        );
        registry.register(
            "heartgate_http_connections_evicted",
            "Idle connections closed to make room for new ones at the cap",
            connections.evicted.clone(),
        );
        Metrics {
            registry,
            evaluations,
            slot_failures,
            requests,
            rejections,
            slot_seconds,
            transitions,
            reconcile_runs,
            suppressions,
            chain,
            commit_seconds,
            db_write_failures,
            db_writable,
            silence_transitions,
            sweep_seconds,
            connections,
        }
    }

    /// Count an answered HTTP request.
    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }

    /// Count a refused or failed registry request.
    pub fn registry_rejection(&self, route: &'static str, reason: &'static str) {
        self.rejections
            .get_or_create(&RejectionLabels { route, reason })
            .inc();
    }

    /// Record how long `slot` took in one evaluation.
    pub fn slot_evaluated(&self, slot: &str, seconds: f64) {
        self.slot_seconds
            .get_or_create(&SlotLabels {
                slot: slot.to_string(),
            })
            .observe(seconds);
    }

    /// Count a committed status change.
    pub fn transition(&self, from: &'static str, to: &'static str) {
        self.transitions
            .get_or_create(&TransitionLabels { from, to })
            .inc();
    }

    /// Count a status change committed by a silence verdict.
    pub fn silence_transition(&self, kind: &'static str, to: &'static str) {
        self.silence_transitions
            .get_or_create(&SilenceLabels { kind, to })
            .inc();
    }

    /// Record how long one sweep for silent workspaces took.
    pub fn sweep_took(&self, seconds: f64) {
        self.sweep_seconds.observe(seconds);
    }

    /// Count a finished reconcile run.
    pub fn reconcile_run(&self, trigger: &str, outcome: &'static str) {
        self.reconcile_runs
            .get_or_create(&RunLabels {
                trigger: trigger.to_string(),
                outcome,
            })
            .inc();
    }

    /// Count a reconcile request `slot` dropped.
    pub fn suppressed(&self, slot: &str, trigger: &'static str) {
        self.suppressions
            .get_or_create(&SuppressionLabels {
                slot: slot.to_string(),
                trigger,
            })
            .inc();
    }

    /// The chain now evaluating verdicts.
    pub fn active_chain(&self, version: &str) {
        self.chain.clear();
        self.chain
            .get_or_create(&ChainLabels {
                version: version.to_string(),
            })
            .set(1);
    }

    /// Where the store counts its commits, write failures and writability.
    pub fn store(&self) -> crate::store::StoreMetrics {
        crate::store::StoreMetrics {
            commit_seconds: self.commit_seconds.clone(),
            write_failures: self.db_write_failures.clone(),
            writable: self.db_writable.clone(),
        }
    }

    /// Count a recorded verdict with its decision-log outcome (`applied`,
    /// `rejected`, `failed:<kind>`) and the failing slot, if any.
    pub fn verdict(&self, event: &'static str, outcome: &str, failed_slot: Option<&str>) {
        let kind = outcome.strip_prefix("failed:").and_then(FailureKind::parse);
        let outcome = match (outcome, kind) {
            (_, Some(kind)) => kind.as_str(),
            ("rejected", None) => "rejected",
            _ => "applied",
        };
        self.evaluations
            .get_or_create(&EvaluationLabels { event, outcome })
            .inc();
        if let (Some(kind), Some(slot)) = (kind, failed_slot) {
            self.slot_failures
                .get_or_create(&SlotFailureLabels {
                    slot: slot.to_string(),
                    kind: kind.as_str(),
                })
                .inc();
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "could not encode the metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_by_kind() {
        let m = Metrics::new();
        m.verdict("heartbeat", "applied", None);
        m.verdict("heartbeat", "failed:timeout", Some("hostile"));
        m.verdict("heartbeat", "failed:timeout", Some("hostile"));
        let text = m.render();
        assert!(
            text.contains(r#"heartgate_evaluations_total{event="heartbeat",outcome="timeout"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"heartgate_evaluations_total{event="heartbeat",outcome="applied"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"heartgate_policy_failures_total{slot="hostile",kind="timeout"} 2"#),
            "{text}"
        );
    }
}
