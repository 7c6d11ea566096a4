//! Prometheus metrics, served at `GET /metrics` in the OpenMetrics text
//! format. Names are `heartgate_<thing>_<unit>`; counters end in `_total`.
//!
//! Each evaluation outcome is its own label value (`applied`, `rejected`,
//! `timeout`, `out_of_memory`, `trap`, `instantiation`, `policy_error`,
//! `invalid_output`, `ungranted_action`), so a sandbox breach is never
//! counted as a generic error.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::engine::FailureKind;

/// Labels of an applied verdict: static strings, so counting a heartbeat
/// allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvaluationLabels {
    /// `heartbeat` or `register`.
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

/// The service's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    evaluations: Family<EvaluationLabels, Counter>,
    slot_failures: Family<SlotFailureLabels, Counter>,
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
        Metrics {
            registry,
            evaluations,
            slot_failures,
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
