//! Fixture files and the runner behind `heartgate policy test`.
//!
//! A fixture is a JSON or YAML file:
//!
//! ```json
//! {
//!   "description": "optional, for the reader",
//!   "input": { "event": {...}, "workspace": {...}, "markers": [...], "now_ms": 0 },
//!   "proposed": [ actions of the slots before this one (module fixtures only) ],
//!   "expected": [ the actions the module or chain must return ]
//! }
//! ```
//!
//! or, instead of `expected`, `"expected_error": {"kind": "trap", "message":
//! "substring"}` (both fields optional) when the evaluation must fail. Each
//! fixture runs in the service's sandbox and limits; a chain's verdict also
//! gets the executor's final check, as it would before being applied. The
//! service checks fixtures sent with a staged chain by the same rules.
//!
//! A *sequence* fixture evaluates several events in a row, carrying the
//! state from one to the next as the service would (status, conditions,
//! markers, last heartbeat; the host's status derivation is applied after
//! every step, even for one module), so that a flap shows:
//!
//! ```json
//! {
//!   "workspace": { "id": "ws-1", "kind": "workspace", "status": "online", "model_configured": true },
//!   "markers": [],
//!   "steps": [
//!     { "event": {"heartbeat": {"active_tasks": 80}}, "now_ms": 1782302400000,
//!       "repeat": 20, "every_ms": 30000, "expect_status": "degraded" },
//!     { "event": {"heartbeat": {}}, "expect_status": "online", "expected": [...] }
//!   ],
//!   "expect_transitions": 2
//! }
//! ```
//!
//! A step's `now_ms` defaults to the previous one's plus `every_ms` (30 s);
//! `repeat` evaluates it that many times; `expect_status` is checked after
//! each repetition, `expected` (every action of the verdict, the host's
//! included) after the last; `expect_transitions` counts the status changes
//! of the whole sequence.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::chain::{Chain, ChainOutcome};
use crate::engine::FailureKind;
use crate::model::{Action, Condition, Effect, Event, Input, Marker, Status, Workspace};

/// One fixture file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// A label (fixture files are named by their file name instead).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// A single-shot fixture's input.
    #[serde(default)]
    pub input: Option<Input>,
    #[serde(default)]
    pub proposed: Vec<Action>,
    #[serde(default)]
    pub expected: Option<Vec<Action>>,
    #[serde(default)]
    pub expected_error: Option<ExpectedError>,
    /// A sequence's starting workspace.
    #[serde(default)]
    pub workspace: Option<Workspace>,
    /// A sequence's starting markers.
    #[serde(default)]
    pub markers: Vec<Marker>,
    /// A sequence's steps.
    #[serde(default)]
    pub steps: Vec<SequenceStep>,
    /// How many status changes the whole sequence makes.
    #[serde(default)]
    pub expect_transitions: Option<usize>,
}

/// One step of a sequence fixture.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceStep {
    pub event: Event,
    #[serde(default)]
    pub now_ms: Option<i64>,
    #[serde(default)]
    pub repeat: Option<u32>,
    #[serde(default)]
    pub every_ms: Option<i64>,
    #[serde(default)]
    pub expect_status: Option<Status>,
    #[serde(default)]
    pub expected: Option<Vec<Action>>,
}

/// The most evaluations one sequence fixture may ask for.
pub const MAX_SEQUENCE_EVALUATIONS: u64 = 10_000;

/// The failure a fixture expects.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedError {
    /// `timeout`, `out_of_memory`, `trap`, `instantiation`, `policy_error`,
    /// `invalid_output` or `ungranted_action`.
    #[serde(default)]
    pub kind: Option<String>,
    /// A substring of the failure's message.
    #[serde(default)]
    pub message: Option<String>,
}

/// A fixture as found on disk: its name (the file stem) and its content or
/// why it could not be read.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    pub path: PathBuf,
    pub fixture: Result<Fixture, String>,
}

/// The fixture files of `dir`, each checked and read as the JSON a stage
/// request carries (named by its file name), for the service to run.
pub fn load_dir_values(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for case in load_dir(dir)? {
        if let Err(why) = &case.fixture {
            bail!("{}: {why}", case.path.display());
        }
        let text = std::fs::read_to_string(&case.path)
            .with_context(|| format!("reading {}", case.path.display()))?;
        let yaml = case
            .path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml");
        let mut value: serde_json::Value = if yaml {
            serde_norway::from_str(&text).map_err(anyhow::Error::msg)?
        } else {
            serde_json::from_str(&text)?
        };
        if let Some(map) = value.as_object_mut() {
            map.entry("name")
                .or_insert_with(|| serde_json::Value::String(case.name.clone()));
        }
        out.push(value);
    }
    Ok(out)
}

/// Parse one fixture file (`.json`, `.yaml` or `.yml`).
pub fn parse(path: &Path, text: &str) -> Result<Fixture, String> {
    let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
    let fixture: Fixture = if yaml {
        // Through a JSON value, so YAML has the same shape as JSON (a YAML
        // deserializer would want `!heartbeat` tags for the event).
        let value: serde_json::Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        serde_json::from_value(value).map_err(|e| e.to_string())?
    } else {
        serde_json::from_str(text).map_err(|e| e.to_string())?
    };
    if fixture.workspace.is_some() || !fixture.steps.is_empty() {
        return check_sequence_shape(fixture);
    }
    if fixture.input.is_none() {
        return Err("give an `input` (or a sequence: `workspace` and `steps`)".into());
    }
    if !fixture.markers.is_empty() || fixture.expect_transitions.is_some() {
        return Err("`markers` and `expect_transitions` belong to a sequence (`workspace` and `steps`); a single input carries its markers".into());
    }
    match (&fixture.expected, &fixture.expected_error) {
        (Some(_), Some(_)) => Err("give `expected` or `expected_error`, not both".into()),
        (None, None) => Err("give the `expected` actions or an `expected_error`".into()),
        (
            None,
            Some(ExpectedError {
                kind: Some(kind), ..
            }),
        ) if FailureKind::parse(kind).is_none() => Err(format!(
            "unknown expected_error kind `{kind}`; kinds are {}",
            FailureKind::ALL.map(FailureKind::as_str).join(", ")
        )),
        _ => Ok(fixture),
    }
}

fn check_sequence_shape(fixture: Fixture) -> Result<Fixture, String> {
    if fixture.input.is_some()
        || !fixture.proposed.is_empty()
        || fixture.expected.is_some()
        || fixture.expected_error.is_some()
    {
        return Err("a sequence (`workspace` and `steps`) has no `input`, `proposed`, `expected` or `expected_error`; each step has its own `expected`".into());
    }
    if fixture.workspace.is_none() || fixture.steps.is_empty() {
        return Err("a sequence needs a `workspace` and at least one step".into());
    }
    let mut total: u64 = 0;
    for (i, step) in fixture.steps.iter().enumerate() {
        let repeat = step.repeat.unwrap_or(1);
        if repeat == 0 || step.every_ms.is_some_and(|ms| ms < 0) {
            return Err(format!(
                "step {}: `repeat` is at least 1 and `every_ms` not negative",
                i + 1
            ));
        }
        if i == 0 && step.now_ms.is_none() {
            return Err("the first step needs its `now_ms`".into());
        }
        if step.expect_status.is_none()
            && step.expected.is_none()
            && fixture.expect_transitions.is_none()
        {
            return Err(format!(
                "step {} expects nothing: give `expect_status`, `expected` or the sequence's `expect_transitions`",
                i + 1
            ));
        }
        total += u64::from(repeat);
    }
    if total > MAX_SEQUENCE_EVALUATIONS {
        return Err(format!(
            "the sequence asks for {total} evaluations; at most {MAX_SEQUENCE_EVALUATIONS}"
        ));
    }
    Ok(fixture)
}

/// Every fixture file in `dir` (`.json`, `.yaml`, `.yml`), by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<Case>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading the fixtures directory {}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let is_fixture = path
            .extension()
            .is_some_and(|e| e == "json" || e == "yaml" || e == "yml");
        if is_fixture && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        bail!("no fixtures (*.json, *.yaml) in {}", dir.display());
    }
    Ok(paths
        .into_iter()
        .map(|path| {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let fixture = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| parse(&path, &text));
            Case {
                name,
                path,
                fixture,
            }
        })
        .collect())
}

/// What an evaluation came to.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Actions(Vec<Action>),
    Failed {
        slot: String,
        kind: FailureKind,
        message: String,
    },
}

/// Evaluate `input` with `proposed` through `chain`; with `final_check`,
/// the verdict also gets the executor's check of the final actions.
pub fn verdict(chain: &Chain, input: &Input, proposed: Vec<Action>, final_check: bool) -> Verdict {
    verdict_of(input, &chain.evaluate_from(input, proposed), final_check)
}

/// The verdict of an evaluation's outcome (see [`verdict`]).
pub fn verdict_of(input: &Input, outcome: &ChainOutcome, final_check: bool) -> Verdict {
    let checked = if final_check {
        crate::executor::check_verdict(input, outcome)
    } else {
        Ok(())
    };
    let failure = match (&outcome.result, &checked) {
        (Ok(actions), Ok(())) => return Verdict::Actions(actions.clone()),
        (Err(f), _) | (Ok(_), Err(f)) => f,
    };
    Verdict::Failed {
        slot: failure.slot.clone(),
        kind: failure.failure.kind,
        message: failure.failure.message.clone(),
    }
}

/// The result of one fixture.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub path: PathBuf,
    /// `None` when it passed; otherwise what went wrong, diff included.
    pub failure: Option<String>,
}

/// The results of a fixture run.
#[derive(Debug)]
pub struct Report {
    pub results: Vec<CaseResult>,
    pub elapsed: Duration,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }

    /// The report as `cargo test` prints one: a line per fixture, then each
    /// failure in full, then `test result: ok. N passed, N failed`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.results {
            let status = if r.failure.is_some() { "FAILED" } else { "ok" };
            let _ = writeln!(out, "fixture {} ... {status}", r.name);
        }
        let failed: Vec<&CaseResult> = self
            .results
            .iter()
            .filter(|r| r.failure.is_some())
            .collect();
        if !failed.is_empty() {
            out.push_str("\nfailures:\n");
            for r in &failed {
                let _ = writeln!(
                    out,
                    "\n---- {} ({}) ----\n{}",
                    r.name,
                    r.path.display(),
                    r.failure.as_deref().unwrap_or_default().trim_end()
                );
            }
            out.push_str("\nfailures:\n");
            for r in &failed {
                let _ = writeln!(out, "    {}", r.name);
            }
        }
        let _ = writeln!(
            out,
            "\ntest result: {}. {} passed, {} failed; finished in {:.2}s",
            if failed.is_empty() { "ok" } else { "FAILED" },
            self.passed(),
            self.failed(),
            self.elapsed.as_secs_f64()
        );
        out
    }
}

/// Run every case through `chain`. With `whole_chain`, a fixture describes
/// the whole chain: it may not give `proposed`, and the verdict gets the
/// executor's final check.
pub fn run(chain: &Chain, cases: &[Case], whole_chain: bool) -> Report {
    let started = Instant::now();
    let results = cases
        .iter()
        .map(|case| CaseResult {
            name: case.name.clone(),
            path: case.path.clone(),
            failure: match &case.fixture {
                Err(e) => Some(format!("cannot read the fixture: {e}")),
                Ok(fx) => check_case(chain, fx, whole_chain),
            },
        })
        .collect();
    Report {
        results,
        elapsed: started.elapsed(),
    }
}

/// Run one fixture through `chain` (see [`run`]); `None` when it passes.
pub fn check_case(chain: &Chain, fx: &Fixture, whole_chain: bool) -> Option<String> {
    if whole_chain && !fx.proposed.is_empty() {
        return Some(
            "a chain starts with no proposed actions; remove `proposed` from this fixture".into(),
        );
    }
    match &fx.input {
        Some(input) => check(fx, verdict(chain, input, fx.proposed.clone(), whole_chain)),
        None => run_sequence(chain, fx, whole_chain),
    }
}

/// The state a sequence carries from step to step.
struct State {
    workspace: Workspace,
    markers: Vec<Marker>,
}

impl State {
    /// Apply a verdict's actions as the service's store would.
    fn apply(&mut self, input: &Input, actions: &[Action]) {
        let ws = &mut self.workspace;
        for a in actions {
            match &a.effect {
                Effect::SetStatus { to, .. } => {
                    if *to != ws.status {
                        ws.status = *to;
                        ws.status_since_ms = Some(input.now_ms);
                    }
                }
                Effect::SetMarker { owner, key, value } => {
                    self.markers
                        .retain(|m| !(m.owner == *owner && m.key == *key));
                    self.markers.push(Marker {
                        slot: None,
                        owner: owner.clone(),
                        key: key.clone(),
                        value: value.clone(),
                    });
                }
                Effect::ClearMarker { owner, key } => {
                    self.markers
                        .retain(|m| !(m.owner == *owner && m.key == *key));
                }
                Effect::SetCondition {
                    owner,
                    name,
                    severity,
                    reason,
                    message,
                } => {
                    let since_ms = ws
                        .conditions
                        .iter()
                        .find(|c| c.owner == *owner && c.name == *name)
                        .map_or(input.now_ms, |c| c.since_ms);
                    ws.conditions
                        .retain(|c| !(c.owner == *owner && c.name == *name));
                    ws.conditions.push(Condition {
                        slot: None,
                        owner: owner.clone(),
                        name: name.clone(),
                        severity: *severity,
                        reason: reason.clone(),
                        message: message.clone(),
                        since_ms,
                    });
                }
                Effect::ClearCondition { owner, name } => {
                    ws.conditions
                        .retain(|c| !(c.owner == *owner && c.name == *name));
                }
                Effect::Reject { .. }
                | Effect::RecordEvent { .. }
                | Effect::RequestReconcile { .. } => {}
            }
        }
        ws.conditions
            .sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
        if input.event.is_from_runtime() {
            ws.last_heartbeat_ms = Some(input.now_ms);
        }
    }
}

/// Run a sequence fixture: each step's event on the state the previous
/// steps left, with the host's status derivation after every step.
fn run_sequence(chain: &Chain, fx: &Fixture, whole_chain: bool) -> Option<String> {
    let mut state = State {
        workspace: fx.workspace.clone()?,
        markers: fx.markers.clone(),
    };
    let mut statuses = vec![state.workspace.status.as_str().to_string()];
    let mut transitions = 0;
    let mut now_ms = 0;
    let mut n = 0;
    for (i, step) in fx.steps.iter().enumerate() {
        let every_ms = step.every_ms.unwrap_or(30_000);
        let repeat = step.repeat.unwrap_or(1);
        for r in 0..repeat {
            n += 1;
            now_ms = match (r, step.now_ms) {
                (0, Some(ms)) => ms,
                _ => now_ms + every_ms,
            };
            let input = Input {
                event: step.event.clone(),
                workspace: state.workspace.clone(),
                markers: state.markers.clone(),
                now_ms,
            };
            let at = format!("step {} (evaluation {n}, at {now_ms})", i + 1);
            let mut actions = match verdict(chain, &input, Vec::new(), whole_chain) {
                Verdict::Actions(actions) => actions,
                Verdict::Failed {
                    slot,
                    kind,
                    message,
                } => {
                    return Some(format!(
                        "{at}: slot `{slot}` failed: {}: {message}
statuses so far: {}",
                        kind.as_str(),
                        statuses.join(" -> ")
                    ));
                }
            };
            if !chain.derives_status {
                actions.extend(crate::conditions::derive(&input, &actions));
            }
            let before = state.workspace.status;
            state.apply(&input, &actions);
            let after = state.workspace.status;
            if after != before {
                transitions += 1;
                statuses.push(after.as_str().to_string());
            }
            if let Some(want) = step.expect_status
                && want != after
            {
                return Some(format!(
                    "{at}: the status is `{}`, expected `{}`
statuses so far: {}
the step's actions:
{}",
                    after.as_str(),
                    want.as_str(),
                    statuses.join(" -> "),
                    pretty(&actions)
                ));
            }
            if r + 1 == repeat
                && let Some(expected) = &step.expected
                && expected != &actions
            {
                return Some(format!(
                    "{at}: the actions differ (- expected, + actual):
{}",
                    diff_actions(expected, &actions)
                ));
            }
        }
    }
    match fx.expect_transitions {
        Some(want) if want != transitions => Some(format!(
            "the sequence made {transitions} status change(s), expected {want}
statuses: {}",
            statuses.join(" -> ")
        )),
        _ => None,
    }
}

/// Compare a verdict with what the fixture expects; `None` when they agree,
/// otherwise what differs (with a diff of the actions).
pub fn check(fx: &Fixture, got: Verdict) -> Option<String> {
    match (&fx.expected, &fx.expected_error, got) {
        (Some(expected), _, Verdict::Actions(actual)) => (expected != &actual).then(|| {
            format!(
                "the actions differ (- expected, + actual):\n{}",
                diff_actions(expected, &actual)
            )
        }),
        (
            Some(_),
            _,
            Verdict::Failed {
                slot,
                kind,
                message,
            },
        ) => Some(format!(
            "expected actions, but slot `{slot}` failed: {}: {message}",
            kind.as_str()
        )),
        (None, Some(want), Verdict::Actions(actual)) => Some(format!(
            "expected an error{}, but got actions:\n{}",
            want.kind
                .as_deref()
                .map(|k| format!(" of kind `{k}`"))
                .unwrap_or_default(),
            pretty(&actual)
        )),
        (
            None,
            Some(want),
            Verdict::Failed {
                slot,
                kind,
                message,
            },
        ) => {
            let kind_ok = want.kind.as_deref().is_none_or(|k| k == kind.as_str());
            let message_ok = want.message.as_deref().is_none_or(|m| message.contains(m));
            (!(kind_ok && message_ok)).then(|| {
                format!(
                    "the error differs:\n- expected: {} {}\n+ actual:   {} {message} (slot `{slot}`)",
                    want.kind.as_deref().unwrap_or("any kind"),
                    want.message
                        .as_deref()
                        .map(|m| format!("containing {m:?}"))
                        .unwrap_or_default(),
                    kind.as_str()
                )
            })
        }
        (None, None, _) => Some("the fixture expects nothing".into()),
    }
}

/// Actions as pretty JSON.
pub fn pretty(actions: &[Action]) -> String {
    serde_json::to_string_pretty(actions).unwrap_or_else(|e| format!("<unprintable: {e}>"))
}

/// A line diff of two action lists, one JSON field a line: `-` only in
/// `expected`, `+` only in `actual`, two spaces in both.
pub fn diff_actions(expected: &[Action], actual: &[Action]) -> String {
    let (old, new) = (pretty(expected), pretty(actual));
    let diff = similar::TextDiff::from_lines(&old, &new);
    let mut out = String::new();
    for change in diff.iter_all_changes() {
        let sign = match change.tag() {
            similar::ChangeTag::Delete => '-',
            similar::ChangeTag::Insert => '+',
            similar::ChangeTag::Equal => ' ',
        };
        let _ = write!(out, "{sign} {}", change.value());
        if change.missing_newline() {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &str = r#""input": {"event": {"heartbeat": {}}, "workspace": {"id": "w", "kind": "workspace", "status": "online", "model_configured": true}, "now_ms": 0}"#;

    #[test]
    fn a_fixture_needs_exactly_one_expectation() {
        let p = Path::new("f.json");
        assert!(parse(p, &format!("{{{INPUT}}}")).is_err());
        assert!(
            parse(
                p,
                &format!(r#"{{{INPUT}, "expected": [], "expected_error": {{}}}}"#)
            )
            .is_err()
        );
        assert!(parse(p, &format!(r#"{{{INPUT}, "expected": []}}"#)).is_ok());
        let bad_kind = format!(r#"{{{INPUT}, "expected_error": {{"kind": "boom"}}}}"#);
        assert!(
            parse(p, &bad_kind)
                .unwrap_err()
                .contains("unknown expected_error kind")
        );
        let typo = format!(r#"{{{INPUT}, "expect": []}}"#);
        assert!(
            parse(p, &typo)
                .unwrap_err()
                .contains("unknown field `expect`")
        );
    }

    #[test]
    fn yaml_fixtures_read_like_json() {
        let yaml = "input:\n  event: {heartbeat: {}}\n  workspace: {id: w, kind: workspace, status: online, model_configured: true}\n  now_ms: 0\nexpected: []\n";
        let fx = parse(Path::new("f.yaml"), yaml).unwrap();
        assert_eq!(fx.expected, Some(vec![]));
    }
}
