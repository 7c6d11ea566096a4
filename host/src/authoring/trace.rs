//! `heartgate policy eval MODULE.wasm --input FILE [--trace]`: one input
//! through a module or a chain, printed as a verdict, or slot by slot.

use serde::Serialize;
use serde_json::{Value, json};

use crate::chain::{Chain, ChainOutcome};
use crate::model::{Action, Input};

use super::fixtures::{Verdict, verdict_of};

/// Read an eval input: an [`Input`], or a fixture-shaped object whose
/// `input` (and `proposed`) are used, so any fixture file can be evaluated.
pub fn read_input(text: &str, yaml: bool) -> Result<(Input, Vec<Action>), String> {
    let value: Value = if yaml {
        serde_norway::from_str(text).map_err(|e| e.to_string())?
    } else {
        serde_json::from_str(text).map_err(|e| e.to_string())?
    };
    if value.get("input").is_some() {
        let input =
            serde_json::from_value(value["input"].clone()).map_err(|e| format!("`input`: {e}"))?;
        let proposed = match value.get("proposed") {
            Some(p) => serde_json::from_value(p.clone()).map_err(|e| format!("`proposed`: {e}"))?,
            None => Vec::new(),
        };
        Ok((input, proposed))
    } else {
        let input = serde_json::from_value(value).map_err(|e| e.to_string())?;
        Ok((input, Vec::new()))
    }
}

/// What one slot saw and did.
#[derive(Debug, Serialize)]
pub struct TraceStep {
    pub slot: String,
    pub policy: String,
    pub policy_version: String,
    pub digest: String,
    /// The markers this slot saw (only its own); the rest of its input is
    /// the evaluation's `input`.
    pub markers: Vec<crate::model::Marker>,
    pub proposed: Vec<Action>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Vec<Action>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<crate::engine::EvalFailure>,
    pub elapsed_us: u64,
}

/// The verdict as JSON: `{"actions": [...]}` or `{"error": {slot, kind,
/// message}}`.
pub fn verdict_json(v: &Verdict) -> Value {
    match v {
        Verdict::Actions(actions) => json!({ "actions": actions }),
        Verdict::Failed {
            slot,
            kind,
            message,
        } => json!({ "error": { "slot": slot, "kind": kind.as_str(), "message": message } }),
    }
}

/// Evaluate and describe: the verdict, and with `trace` each slot's input,
/// proposed actions and output.
pub fn eval(
    chain: &Chain,
    input: &Input,
    proposed: Vec<Action>,
    final_check: bool,
    trace: bool,
) -> Value {
    let outcome = chain.evaluate_from(input, proposed.clone());
    let mut out = verdict_json(&verdict_of(input, &outcome, final_check));
    if trace {
        out["trace"] = json!({
            "input": input,
            "steps": trace_steps(chain, input, proposed, outcome),
        });
    }
    out
}

fn trace_steps(
    chain: &Chain,
    input: &Input,
    proposed: Vec<Action>,
    outcome: ChainOutcome,
) -> Vec<TraceStep> {
    let mut seen = proposed;
    let mut steps = Vec::with_capacity(outcome.steps.len());
    for (step, slot) in outcome.steps.into_iter().zip(&chain.slots) {
        let markers = input
            .markers
            .iter()
            .filter(|m| m.belongs_to(&slot.name, &slot.module.metadata().name))
            .cloned()
            .collect();
        let next = step.output.clone();
        steps.push(TraceStep {
            slot: step.id.slot.clone(),
            policy: step.id.policy.clone(),
            policy_version: step.id.policy_version.clone(),
            digest: step.id.digest.clone(),
            markers,
            proposed: seen.clone(),
            output: step.output,
            failure: step.failure,
            elapsed_us: step.elapsed_us,
        });
        if let Some(next) = next {
            seen = next;
        }
    }
    steps
}
