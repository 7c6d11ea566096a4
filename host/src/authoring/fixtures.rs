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

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::chain::{Chain, ChainOutcome};
use crate::engine::FailureKind;
use crate::model::{Action, Input};

/// One fixture file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// A label (fixture files are named by their file name instead).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub input: Input,
    #[serde(default)]
    pub proposed: Vec<Action>,
    #[serde(default)]
    pub expected: Option<Vec<Action>>,
    #[serde(default)]
    pub expected_error: Option<ExpectedError>,
}

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
                Ok(fx) if whole_chain && !fx.proposed.is_empty() => Some(
                    "a chain starts with no proposed actions; remove `proposed` from this fixture"
                        .into(),
                ),
                Ok(fx) => check(
                    fx,
                    verdict(chain, &fx.input, fx.proposed.clone(), whole_chain),
                ),
            },
        })
        .collect();
    Report {
        results,
        elapsed: started.elapsed(),
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
