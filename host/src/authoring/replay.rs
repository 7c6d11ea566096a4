//! `heartgate policy replay`: recorded decisions re-evaluated with a
//! candidate module in one slot of the chain that made them.
//!
//! Each decision is replayed on the input it recorded (the workspace, its
//! markers and the clock as they were), through the chain that made it
//! (found by its content version in the database, the built-in chain, or a
//! chain file given with `--chain`) with the candidate in the named slot. A
//! decision whose verdict would differ from the recorded one is reported,
//! with what a run without the candidate says about it ([`Baseline`]).
//! Decisions are replayed independently: a changed verdict does not feed the
//! state later decisions saw.
//!
//! Replay counts evaluations, not rows. A coalesced row (liveness-only
//! heartbeats of one workspace, less than 250 ms apart) stands for several
//! evaluations but keeps only the last one's input: that one is replayed,
//! the others are counted as not replayed (`coalesced`). A row that cannot
//! be replayed at all counts every evaluation it stands for as skipped, with
//! the reason. So `recorded = replayed + not_replayed`, always.

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
    /// Only decisions made at or after this time (a coalesced decision's
    /// time is its last heartbeat's); `None`: all the log keeps.
    pub since_ms: Option<i64>,
    /// The chain to replay through instead of the recorded one.
    pub chain: Option<(ChainSpec, std::path::PathBuf)>,
}

/// What the chain replayed through says without the candidate, for a
/// decision the candidate would change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// The recorded chain, run again as it was, gives the recorded verdict:
    /// the change is the candidate's.
    Reproduces,
    /// The recorded chain, run again as it was, gives another verdict than
    /// the recorded one too: the change is not (only) the candidate's.
    Differs,
    /// The chain file is not the recorded chain; with its own module in the
    /// slot it gives the recorded verdict.
    FileReproduces,
    /// The chain file is not the recorded chain, and with its own module in
    /// the slot it gives another verdict than the recorded one too.
    FileDiffers,
    /// Not run: the chain file runs the candidate itself in the slot, and
    /// neither it nor it without that slot is the recorded chain, so there
    /// is no chain without the candidate to compare with.
    NotRun,
}

/// One decision the candidate would change.
#[derive(Debug, Serialize)]
pub struct Change {
    pub decision_id: i64,
    pub workspace_id: String,
    pub at: String,
    pub at_ms: i64,
    pub event_kind: String,
    /// How many evaluations the decision stands for: more than one for
    /// coalesced heartbeats, of which only this, the last, was kept and
    /// replayed.
    pub evaluations: u64,
    pub recorded: Value,
    pub candidate: Value,
    pub baseline: Baseline,
}

/// A decision that could not be replayed, and why.
#[derive(Debug, Serialize)]
pub struct Skipped {
    pub decision_id: i64,
    /// How many evaluations it stands for, none of them replayed.
    pub evaluations: u64,
    pub reason: String,
}

/// The replay's findings, in evaluations: `recorded = replayed +
/// not_replayed`, `replayed = unchanged + changed.len()`, `not_replayed =
/// coalesced + the skipped decisions' evaluations`.
#[derive(Debug, Serialize)]
pub struct ReplayReport {
    pub candidate: String,
    pub candidate_digest: String,
    pub slot: String,
    /// `--since` as a time; `None`: all the log keeps.
    pub since: Option<String>,
    /// When the first evaluation read was made; `None` when none was read.
    pub first_at: Option<String>,
    /// The evaluations the decisions read stand for.
    pub recorded: u64,
    /// The decision rows read.
    pub decisions: u64,
    /// The evaluations replayed: one for each decision that could be.
    pub replayed: u64,
    pub unchanged: u64,
    pub changed: Vec<Change>,
    /// The evaluations not replayed.
    pub not_replayed: u64,
    /// Of those, the heartbeats of replayed decisions whose input was not
    /// kept (coalesced into the decision's last one).
    pub coalesced: u64,
    /// The replayed decisions that stand for more than one heartbeat.
    pub coalesced_decisions: u64,
    /// The decisions that could not be replayed at all.
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
        since: opts.since_ms.map(crate::clock::rfc3339),
        first_at: None,
        recorded: 0,
        decisions: 0,
        replayed: 0,
        unchanged: 0,
        changed: Vec::new(),
        not_replayed: 0,
        coalesced: 0,
        coalesced_decisions: 0,
        skipped: Vec::new(),
    };
    let mut chains = Chains {
        engine,
        store,
        opts,
        builtin: Chain::builtin(engine).context("loading the built-in chain")?,
        cache: HashMap::new(),
    };
    let mut first_ms: Option<i64> = None;
    let mut after_id = 0;
    loop {
        let page = store
            .decisions_since(opts.since_ms.unwrap_or(i64::MIN), after_id, PAGE)
            .context("reading the decision log")?;
        let Some(last) = page.last() else { break };
        after_id = last.id;
        for row in &page {
            let evaluations = u64::try_from(row.heartbeats.max(1)).unwrap_or(1);
            let started = row.first_at_ms.unwrap_or(row.at_ms).min(row.at_ms);
            first_ms = Some(first_ms.map_or(started, |f| f.min(started)));
            report.decisions += 1;
            report.recorded += evaluations;
            match replay_one(&mut chains, row, evaluations) {
                Ok(outcome) => {
                    report.replayed += 1;
                    report.coalesced += evaluations - 1;
                    report.coalesced_decisions += u64::from(evaluations > 1);
                    match outcome {
                        None => report.unchanged += 1,
                        Some(change) => report.changed.push(change),
                    }
                }
                Err(reason) => report.skipped.push(Skipped {
                    decision_id: row.id,
                    evaluations,
                    reason,
                }),
            }
        }
    }
    report.first_at = first_ms.map(crate::clock::rfc3339);
    report.not_replayed = report.recorded - report.replayed;
    Ok(report)
}

/// The chains to replay one recorded chain version through.
struct Replaying {
    /// The recorded chain, or the chain file.
    baseline: Chain,
    /// The baseline with the candidate in the slot.
    candidate: Chain,
    /// The chain file runs the candidate itself in the slot: the file
    /// without that slot, which is the recorded chain when the file adds
    /// the candidate's slot to it (the guide's way of replaying a new slot),
    /// or `None` when it cannot be built.
    runs_candidate: Option<Option<Chain>>,
}

/// The chains per recorded chain version.
struct Chains<'a> {
    engine: &'a Engine,
    store: &'a dyn Store,
    opts: &'a ReplayOptions<'a>,
    builtin: Chain,
    cache: HashMap<String, Result<Replaying, String>>,
}

impl Chains<'_> {
    fn get(&mut self, version: &str) -> Result<&Replaying, String> {
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

    fn build(&self, version: &str) -> Result<Replaying, String> {
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
        let digest = self.opts.candidate.digest().to_string();
        // The spec names every module by digest: the candidate's, the
        // baseline's own (a chain file's need not be in the database), or
        // one the database stores.
        let known = |d: &str| {
            if d == digest {
                return Some(self.opts.candidate.bytes().to_vec());
            }
            baseline
                .slots
                .iter()
                .find(|s| s.module.digest() == d)
                .map(|s| s.module.bytes().to_vec())
                .or_else(|| stored(d))
        };
        let runs_candidate = (self.opts.chain.is_some()
            && baseline
                .slots
                .iter()
                .any(|s| s.name == self.opts.slot && s.module.digest() == digest))
        .then(|| {
            let mut without = baseline.spec.clone();
            without.slot.retain(|s| s.name != self.opts.slot);
            Chain::from_spec(self.engine, &without, &base, &known).ok()
        });
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
        target.module = format!("sha256:{digest}");
        let candidate = Chain::from_spec(self.engine, &candidate_spec, &base, &known)
            .map_err(|e| format!("building the candidate chain: {e}"))?;
        Ok(Replaying {
            baseline,
            candidate,
            runs_candidate,
        })
    }
}

fn replay_one(
    chains: &mut Chains<'_>,
    row: &DecisionRow,
    evaluations: u64,
) -> Result<Option<Change>, String> {
    let input: Input = serde_json::from_value(row.input.clone())
        .map_err(|e| format!("the recorded input is unreadable: {e}"))?;
    let recorded = recorded_verdict(row)?;
    let replaying = chains.get(&row.chain_version)?;
    let ours = verdict(&replaying.candidate, &input, Vec::new(), true);
    if same(&recorded, &ours) {
        return Ok(None);
    }
    // What to run without the candidate, and whether it is the recorded
    // chain: a chain is the recorded one when its content version is the
    // recorded one (always so without `--chain`), and only a run of that
    // says whether the recorded chain still reproduces the decision.
    let recorded_chain = |c: &Chain| c.version == row.chain_version;
    let without = match &replaying.runs_candidate {
        _ if recorded_chain(&replaying.baseline) => Some(&replaying.baseline),
        Some(Some(without)) if recorded_chain(without) => Some(without),
        Some(_) => None,
        None => Some(&replaying.baseline),
    };
    let baseline = match without {
        None => Baseline::NotRun,
        Some(chain) => {
            let again = verdict(chain, &input, Vec::new(), true);
            match (recorded_chain(chain), same(&recorded, &again)) {
                (true, true) => Baseline::Reproduces,
                (true, false) => Baseline::Differs,
                (false, true) => Baseline::FileReproduces,
                (false, false) => Baseline::FileDiffers,
            }
        }
    };
    Ok(Some(Change {
        decision_id: row.id,
        workspace_id: row.workspace_id.clone(),
        at: crate::clock::rfc3339(row.at_ms),
        at_ms: row.at_ms,
        event_kind: row.event_kind.clone(),
        evaluations,
        recorded: verdict_json(&recorded),
        candidate: verdict_json(&ours),
        baseline,
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

/// The report for a person: one block per changed decision, then a summary
/// in evaluations, then what the counts leave out and why.
pub fn render(report: &ReplayReport) -> String {
    use std::fmt::Write as _;
    let plural = |n: u64, one: &str, many: &str| {
        if n == 1 {
            format!("{n} {one}")
        } else {
            format!("{n} {many}")
        }
    };
    let mut out = String::new();
    for c in &report.changed {
        let coalesced = if c.evaluations > 1 {
            format!(
                ", the last of {} coalesced heartbeats: only its input is kept",
                c.evaluations
            )
        } else {
            String::new()
        };
        let note = match c.baseline {
            Baseline::Reproduces | Baseline::FileReproduces | Baseline::NotRun => "",
            Baseline::Differs => " [the recorded chain, run again, gives another verdict too]",
            Baseline::FileDiffers => {
                " [the chain file, run without the candidate, gives another verdict too]"
            }
        };
        let _ = writeln!(
            out,
            "decision {} ({} {} at {}{coalesced}) would change{note}:",
            c.decision_id, c.workspace_id, c.event_kind, c.at,
        );
        let _ = writeln!(out, "  recorded:  {}", c.recorded);
        let _ = writeln!(out, "  candidate: {}", c.candidate);
    }
    let decisions = plural(report.decisions, "decision", "decisions");
    let covered = match (&report.since, &report.first_at) {
        (Some(since), _) => format!("{decisions} since {since}"),
        (None, Some(first)) => format!("{decisions}: all the log keeps, from {first}"),
        (None, None) => "the log keeps no decision".to_string(),
    };
    let _ = writeln!(
        out,
        "replayed {} of {} recorded evaluations ({covered}) with {} in slot `{}`",
        report.replayed, report.recorded, report.candidate, report.slot,
    );
    let skipped: u64 = report.skipped.iter().map(|s| s.evaluations).sum();
    let mut why = Vec::new();
    if report.coalesced > 0 {
        why.push(format!("coalesced: {}", report.coalesced));
    }
    if skipped > 0 {
        why.push(format!("skipped: {skipped}"));
    }
    let _ = writeln!(
        out,
        "{} would change, {} unchanged, {} not replayed{}",
        report.changed.len(),
        report.unchanged,
        report.not_replayed,
        if why.is_empty() {
            String::new()
        } else {
            format!(" ({})", why.join(", "))
        }
    );
    if report.coalesced > 0 {
        let _ = writeln!(
            out,
            "  coalesced {}: {} for {} heartbeats but {} only the last one's input, which was replayed \
             (liveness-only heartbeats of a workspace less than {} ms apart are logged as one decision)",
            report.coalesced,
            plural(
                report.coalesced_decisions,
                "decision stands",
                "decisions stand"
            ),
            report.coalesced + report.coalesced_decisions,
            if report.coalesced_decisions == 1 {
                "keeps"
            } else {
                "each keeps"
            },
            crate::store::LIVENESS_HOLD.as_millis(),
        );
    }
    let mut reasons: Vec<(&str, u64, u64)> = Vec::new();
    for s in &report.skipped {
        match reasons.iter_mut().find(|(r, _, _)| *r == s.reason) {
            Some((_, n, d)) => {
                *n += s.evaluations;
                *d += 1;
            }
            None => reasons.push((&s.reason, s.evaluations, 1)),
        }
    }
    for (reason, n, d) in reasons {
        let _ = writeln!(
            out,
            "  skipped {} ({}): {reason}",
            plural(n, "evaluation", "evaluations"),
            plural(d, "decision", "decisions"),
        );
    }
    let not_run = report
        .changed
        .iter()
        .filter(|c| c.baseline == Baseline::NotRun)
        .count();
    if not_run > 0 {
        let _ = writeln!(
            out,
            "note: {} not compared with a run without the candidate: the chain file runs the candidate itself in slot `{}`, and neither it nor it without that slot is the recorded chain",
            if not_run == 1 {
                "1 change was".to_string()
            } else {
                format!("{not_run} changes were")
            },
            report.slot,
        );
    }
    out
}
