//! `heartgate policy replay`: recorded decisions re-evaluated with a
//! candidate module in one slot of the chain that made them.
//!
//! Each decision is replayed on the input it recorded (the workspace, its
//! markers and the clock as they were), through the chain that made it
//! (found by its content version in the database, the built-in chain, or a
//! chain file given with `--chain`) with the candidate in the named slot. A
//! decision whose verdict would differ from the recorded one is reported.
//! Decisions are replayed independently: a changed verdict does not feed the
//! state later decisions saw.

use std::collections::HashMap;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::chain::{Chain, ChainSpec};
use crate::engine::{Engine, PolicyModule};
use crate::model::{Action, Input};
use crate::store::{DecisionRow, Store};

use super::fixtures::{Verdict, verdict};
use super::trace::verdict_json;

/// What to replay.
pub struct ReplayOptions<'a> {
    pub candidate: &'a PolicyModule,
    pub slot: &'a str,
    /// Only decisions made at or after this time.
    pub since_ms: i64,
    /// The chain to replay through instead of the recorded one.
    pub chain: Option<(ChainSpec, std::path::PathBuf)>,
}

/// One decision the candidate would change.
#[derive(Debug, Serialize)]
pub struct Change {
    pub decision_id: i64,
    pub workspace_id: String,
    pub at: String,
    pub at_ms: i64,
    pub event_kind: String,
    pub recorded: Value,
    pub candidate: Value,
    /// Whether the recorded chain, replayed as it was, gives the recorded
    /// verdict; when false the change is not (only) the candidate's doing.
    pub baseline_reproduces: bool,
}

/// A decision that could not be replayed, and why.
#[derive(Debug, Serialize)]
pub struct Skipped {
    pub decision_id: i64,
    pub reason: String,
}

/// The replay's findings.
#[derive(Debug, Serialize)]
pub struct ReplayReport {
    pub candidate: String,
    pub candidate_digest: String,
    pub slot: String,
    pub since: String,
    pub replayed: usize,
    pub unchanged: usize,
    pub changed: Vec<Change>,
    pub skipped: Vec<Skipped>,
}

/// How many decisions are read from the database at a time.
const PAGE: usize = 500;

/// Replay every decision since `opts.since_ms`.
pub fn replay(
    engine: &Engine,
    store: &dyn Store,
    opts: &ReplayOptions<'_>,
) -> Result<ReplayReport> {
    let meta = opts.candidate.metadata();
    let mut report = ReplayReport {
        candidate: format!("{} {}", meta.name, meta.version),
        candidate_digest: opts.candidate.digest().to_string(),
        slot: opts.slot.to_string(),
        since: crate::clock::rfc3339(opts.since_ms),
        replayed: 0,
        unchanged: 0,
        changed: Vec::new(),
        skipped: Vec::new(),
    };
    let mut chains = Chains {
        engine,
        store,
        opts,
        builtin: Chain::builtin(engine).context("loading the built-in chain")?,
        cache: HashMap::new(),
    };
    let mut after_id = 0;
    loop {
        let page = store
            .decisions_since(opts.since_ms, after_id, PAGE)
            .context("reading the decision log")?;
        let Some(last) = page.last() else { break };
        after_id = last.id;
        for row in &page {
            match replay_one(&mut chains, row) {
                Ok(None) => {
                    report.replayed += 1;
                    report.unchanged += 1;
                }
                Ok(Some(change)) => {
                    report.replayed += 1;
                    report.changed.push(change);
                }
                Err(reason) => report.skipped.push(Skipped {
                    decision_id: row.id,
                    reason,
                }),
            }
        }
    }
    Ok(report)
}

/// The baseline and candidate chains per recorded chain version.
struct Chains<'a> {
    engine: &'a Engine,
    store: &'a dyn Store,
    opts: &'a ReplayOptions<'a>,
    builtin: Chain,
    cache: HashMap<String, Result<(Chain, Chain), String>>,
}

impl Chains<'_> {
    fn get(&mut self, version: &str) -> Result<&(Chain, Chain), String> {
        // With `--chain` every decision replays through the same chain.
        let key = if self.opts.chain.is_some() {
            ""
        } else {
            version
        };
        if !self.cache.contains_key(key) {
            let built = self.build(version);
            self.cache.insert(key.to_string(), built);
        }
        self.cache[key].as_ref().map_err(Clone::clone)
    }

    fn build(&self, version: &str) -> Result<(Chain, Chain), String> {
        let stored = |digest: &str| self.store.module_bytes(digest).ok().flatten();
        let rebuild = |spec: &ChainSpec, base: &std::path::Path| {
            Chain::from_spec(self.engine, spec, base, &stored)
                .map_err(|e| format!("rebuilding chain version {version}: {e}"))
        };
        let (baseline, base) = match &self.opts.chain {
            Some((spec, base)) => (rebuild(spec, base)?, base.clone()),
            None => match self.store.chain_by_version(version) {
                Ok(Some(stored)) => {
                    let spec = serde_json::from_str::<ChainSpec>(&stored.spec)
                        .map_err(|e| format!("stored chain {} is unreadable: {e}", stored.id))?;
                    (rebuild(&spec, std::path::Path::new("."))?, ".".into())
                }
                Ok(None) if version == self.builtin.version => (self.builtin.clone(), ".".into()),
                Ok(None) => {
                    return Err(format!(
                        "chain version {version} is not in the database (a chain from a config file?); pass its file with --chain"
                    ));
                }
                Err(e) => return Err(format!("reading chain version {version}: {e}")),
            },
        };
        let mut candidate_spec = baseline.spec.clone();
        let slots: Vec<String> = candidate_spec.slot.iter().map(|s| s.name.clone()).collect();
        let target = candidate_spec
            .slot
            .iter_mut()
            .find(|s| s.name == self.opts.slot)
            .ok_or_else(|| {
                format!(
                    "chain version {version} has no slot `{}` (its slots: {})",
                    self.opts.slot,
                    slots.join(", ")
                )
            })?;
        let digest = self.opts.candidate.digest().to_string();
        target.module = format!("sha256:{digest}");
        let with_candidate = |d: &str| {
            if d == digest {
                Some(self.opts.candidate.bytes().to_vec())
            } else {
                stored(d)
            }
        };
        let candidate = Chain::from_spec(self.engine, &candidate_spec, &base, &with_candidate)
            .map_err(|e| format!("building the candidate chain: {e}"))?;
        Ok((baseline, candidate))
    }
}

fn replay_one(chains: &mut Chains<'_>, row: &DecisionRow) -> Result<Option<Change>, String> {
    let input: Input = serde_json::from_value(row.input.clone())
        .map_err(|e| format!("the recorded input is unreadable: {e}"))?;
    let recorded = recorded_verdict(row)?;
    let (baseline, candidate) = chains.get(&row.chain_version)?;
    let ours = verdict(candidate, &input, Vec::new(), true);
    if same(&recorded, &ours) {
        return Ok(None);
    }
    let again = verdict(baseline, &input, Vec::new(), true);
    Ok(Some(Change {
        decision_id: row.id,
        workspace_id: row.workspace_id.clone(),
        at: crate::clock::rfc3339(row.at_ms),
        at_ms: row.at_ms,
        event_kind: row.event_kind.clone(),
        recorded: verdict_json(&recorded),
        candidate: verdict_json(&ours),
        baseline_reproduces: same(&recorded, &again),
    }))
}

/// The verdict a decision-log row records.
fn recorded_verdict(row: &DecisionRow) -> Result<Verdict, String> {
    if let Some(kind) = row.outcome.strip_prefix("failed:") {
        let kind = crate::engine::FailureKind::parse(kind)
            .ok_or_else(|| format!("unknown recorded failure `{kind}`"))?;
        // The failing slot is the step that recorded a failure, if any (the
        // executor's final check fails no step).
        let failed_step = row
            .steps
            .as_array()
            .and_then(|steps| steps.iter().rev().find(|s| s.get("failure").is_some()));
        return Ok(Verdict::Failed {
            slot: failed_step
                .and_then(|s| s["slot"].as_str())
                .unwrap_or_default()
                .to_string(),
            kind,
            message: failed_step
                .and_then(|s| s["failure"]["message"].as_str())
                .unwrap_or_default()
                .to_string(),
        });
    }
    let actions: Vec<Action> = serde_json::from_value(row.final_actions.clone())
        .map_err(|e| format!("the recorded actions are unreadable: {e}"))?;
    Ok(Verdict::Actions(actions))
}

/// Verdicts agree when the actions are equal, or both failed the same way.
fn same(a: &Verdict, b: &Verdict) -> bool {
    match (a, b) {
        (Verdict::Actions(x), Verdict::Actions(y)) => x == y,
        (Verdict::Failed { kind: k1, .. }, Verdict::Failed { kind: k2, .. }) => k1 == k2,
        _ => false,
    }
}

/// The report for a person: one block per changed decision, then a summary.
pub fn render(report: &ReplayReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for c in &report.changed {
        let _ = writeln!(
            out,
            "decision {} ({} {} at {}) would change{}:",
            c.decision_id,
            c.workspace_id,
            c.event_kind,
            c.at,
            if c.baseline_reproduces {
                ""
            } else {
                " [the recorded chain no longer reproduces it either]"
            }
        );
        let _ = writeln!(out, "  recorded:  {}", c.recorded);
        let _ = writeln!(out, "  candidate: {}", c.candidate);
    }
    let _ = writeln!(
        out,
        "replayed {} decisions since {} with {} in slot `{}`: {} would change, {} unchanged, {} skipped",
        report.replayed,
        report.since,
        report.candidate,
        report.slot,
        report.changed.len(),
        report.unchanged,
        report.skipped.len()
    );
    let mut reasons: Vec<(&str, usize)> = Vec::new();
    for s in &report.skipped {
        match reasons.iter_mut().find(|(r, _)| *r == s.reason) {
            Some((_, n)) => *n += 1,
            None => reasons.push((&s.reason, 1)),
        }
    }
    for (reason, n) in reasons {
        let _ = writeln!(out, "  skipped {n}: {reason}");
    }
    out
}
