//! Why a workspace is in the state it is in: its last decisions with each
//! policy's output, the status transitions they made, and the reconcile runs
//! they queued with what each delivered and restarted, in order. Assembled
//! from the store's read methods (no SQL here); served by
//! `GET /admin/workspaces/{id}/history` and told by
//! `heartgate workspace explain ID`.

use serde::Serialize;
use serde_json::Value;

use crate::store::{DecisionRow, ReconcileRun, Store, StoreError};

/// The most decisions one history shows.
pub const MAX_DECISIONS: usize = 1000;

/// A workspace's recent history, oldest first.
#[derive(Clone, Debug, Serialize)]
pub struct History {
    pub workspace_id: String,
    pub kind: String,
    pub status: String,
    /// The conditions in force now: why the workspace is not online.
    pub conditions: Vec<crate::model::Condition>,
    pub entries: Vec<Entry>,
}

/// One thing that happened to the workspace.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// A register or heartbeat evaluated by the chain.
    Decision {
        at_ms: i64,
        decision_id: i64,
        event: String,
        outcome: String,
        chain_version: String,
        /// Liveness-only heartbeats this row stands for (coalesced).
        heartbeats: i64,
        steps: Vec<StepView>,
        final_actions: Value,
        /// For a silence: what the host noticed and what came of it, e.g.
        /// `no heartbeat for 3m02s: online -> offline`.
        #[serde(skip_serializing_if = "Option::is_none")]
        silence: Option<String>,
    },
    /// A status change the decision committed.
    Transition {
        at_ms: i64,
        decision_id: i64,
        from: String,
        to: String,
        reason: String,
    },
    /// A condition the decision put in force or changed.
    ConditionSet {
        at_ms: i64,
        decision_id: i64,
        owner: String,
        name: String,
        severity: String,
        reason: String,
        message: String,
    },
    /// A condition the decision cleared.
    ConditionCleared {
        at_ms: i64,
        decision_id: i64,
        owner: String,
        name: String,
    },
    /// A reconcile run the decision queued.
    ReconcileQueued {
        at_ms: i64,
        run_id: i64,
        trigger: String,
        decision_id: Option<i64>,
    },
    /// A reconcile run the worker carried out (or is carrying out).
    ReconcileRun {
        at_ms: i64,
        run_id: i64,
        trigger: String,
        state: String,
        finished_ms: Option<i64>,
        attempts: i64,
        cause: Option<String>,
        /// Each plugin's `present`, `delivered` or `failed`.
        plugins: Vec<Value>,
        restart: Option<Value>,
    },
}

/// What one slot did in a decision.
#[derive(Clone, Debug, Serialize)]
pub struct StepView {
    pub slot: String,
    pub policy: String,
    /// The actions it passed on (absent if it failed).
    pub output: Option<Value>,
    pub failure: Option<Value>,
}

impl Entry {
    fn at_ms(&self) -> i64 {
        match self {
            Entry::Decision { at_ms, .. }
            | Entry::Transition { at_ms, .. }
            | Entry::ConditionSet { at_ms, .. }
            | Entry::ConditionCleared { at_ms, .. }
            | Entry::ReconcileQueued { at_ms, .. }
            | Entry::ReconcileRun { at_ms, .. } => *at_ms,
        }
    }

    /// Within one millisecond: a decision, then what it changed, then what
    /// it queued, then runs.
    fn rank(&self) -> u8 {
        match self {
            Entry::Decision { .. } => 0,
            Entry::ConditionSet { .. } | Entry::ConditionCleared { .. } => 1,
            Entry::Transition { .. } => 1,
            Entry::ReconcileQueued { .. } => 2,
            Entry::ReconcileRun { .. } => 3,
        }
    }
}

/// The last `limit` (at most [`MAX_DECISIONS`]) decisions of `workspace_id`
/// and everything that followed from them; `None` for an unknown workspace.
pub fn history(
    store: &dyn Store,
    workspace_id: &str,
    limit: usize,
) -> Result<Option<History>, StoreError> {
    let Some(record) = store.workspace(workspace_id)? else {
        return Ok(None);
    };
    let limit = limit.clamp(1, MAX_DECISIONS);
    let decisions = store.decisions(workspace_id, limit)?;
    // Runs since the oldest decision shown (all of them if every decision is).
    let since = match decisions.first() {
        Some(d) if decisions.len() == limit => d.at_ms,
        _ => i64::MIN,
    };
    let runs: Vec<ReconcileRun> = store
        .reconcile_runs(Some(workspace_id))?
        .into_iter()
        .filter(|r| r.requested_ms >= since)
        .collect();
    let mut entries = Vec::new();
    for d in &decisions {
        decision_entries(d, &mut entries);
    }
    for r in &runs {
        run_entries(r, &mut entries);
    }
    // Stable: decisions keep their id order within a millisecond.
    entries.sort_by_key(|e| (e.at_ms(), e.rank()));
    Ok(Some(History {
        workspace_id: record.id,
        kind: record.kind.as_str().to_string(),
        status: record.status.as_str().to_string(),
        conditions: record.conditions,
        entries,
    }))
}

fn decision_entries(d: &DecisionRow, out: &mut Vec<Entry>) {
    let steps = d
        .steps
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| StepView {
                    slot: text(&s["slot"]),
                    policy: text(&s["policy"]),
                    output: s.get("output").cloned(),
                    failure: s.get("failure").cloned(),
                })
                .collect()
        })
        .unwrap_or_default();
    out.push(Entry::Decision {
        at_ms: d.at_ms,
        decision_id: d.id,
        event: d.event_kind.clone(),
        outcome: d.outcome.clone(),
        chain_version: d.chain_version.clone(),
        heartbeats: d.heartbeats,
        steps,
        final_actions: d.final_actions.clone(),
        silence: silence_summary(d),
    });
    // A failed evaluation applies nothing; an applied one, or a rejected
    // register, applies its final actions.
    if d.outcome.starts_with("failed:") {
        return;
    }
    let in_force = d.input["workspace"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let held = |owner: &Value, name: &Value| {
        in_force
            .iter()
            .find(|c| &c["owner"] == owner && &c["name"] == name)
    };
    for a in d.final_actions.as_array().into_iter().flatten() {
        if a["kind"] == "set_condition" {
            // Restating a condition in force unchanged writes nothing.
            let unchanged = held(&a["owner"], &a["name"]).is_some_and(|c| {
                c["severity"] == a["severity"]
                    && c["reason"] == a["reason"]
                    && c["message"] == a["message"]
            });
            if !unchanged {
                out.push(Entry::ConditionSet {
                    at_ms: d.at_ms,
                    decision_id: d.id,
                    owner: text(&a["owner"]),
                    name: text(&a["name"]),
                    severity: text(&a["severity"]),
                    reason: text(&a["reason"]),
                    message: text(&a["message"]),
                });
            }
        }
        if a["kind"] == "clear_condition" && held(&a["owner"], &a["name"]).is_some() {
            out.push(Entry::ConditionCleared {
                at_ms: d.at_ms,
                decision_id: d.id,
                owner: text(&a["owner"]),
                name: text(&a["name"]),
            });
        }
        if a["kind"] == "set_status" && a["expected"] != a["to"] {
            out.push(Entry::Transition {
                at_ms: d.at_ms,
                decision_id: d.id,
                from: text(&a["expected"]),
                to: text(&a["to"]),
                reason: text(&a["reason"]),
            });
        }
    }
}

/// `no heartbeat for 3m02s: online -> offline` for a silence decision.
fn silence_summary(d: &DecisionRow) -> Option<String> {
    let silence = d.input["event"].get("silence")?;
    let silent_for =
        crate::clock::format_duration_ms(silence["silent_for_ms"].as_i64().unwrap_or(0));
    let noticed = match silence["kind"].as_str() {
        Some("provision_timeout") => format!("still provisioning after {silent_for}"),
        _ => format!("no heartbeat for {silent_for}"),
    };
    let from = text(&d.input["workspace"]["status"]);
    let change = d
        .final_actions
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["kind"] == "set_status" && a["expected"] != a["to"]);
    let came = match (d.outcome.starts_with("failed:"), change) {
        (true, _) => format!("{from} stays (the evaluation failed)"),
        (false, Some(a)) => format!("{} -> {}", text(&a["expected"]), text(&a["to"])),
        (false, None) => format!("{from} stays"),
    };
    Some(format!("{noticed}: {came}"))
}

fn run_entries(r: &ReconcileRun, out: &mut Vec<Entry>) {
    out.push(Entry::ReconcileQueued {
        at_ms: r.requested_ms,
        run_id: r.id,
        trigger: r.trigger.clone(),
        decision_id: r.decision_id,
    });
    if let Some(started) = r.started_ms {
        let detail = r.detail.clone().unwrap_or(Value::Null);
        out.push(Entry::ReconcileRun {
            at_ms: started,
            run_id: r.id,
            trigger: r.trigger.clone(),
            state: r.state.clone(),
            finished_ms: r.finished_ms,
            attempts: r.attempts,
            cause: r.cause.clone(),
            plugins: detail["plugins"].as_array().cloned().unwrap_or_default(),
            restart: detail.get("restart").cloned(),
        });
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// The history as a story, one line per entry (a decision's slots indented
/// under it), oldest first.
pub fn explain(h: &History) -> String {
    let mut out = format!("workspace {} ({}) is {}", h.workspace_id, h.kind, h.status);
    if h.conditions.is_empty() {
        out.push_str(", held back by no condition");
    } else {
        let held: Vec<String> = h
            .conditions
            .iter()
            .map(|c| {
                format!(
                    "{} of {} ({}, {}, since {})",
                    c.name,
                    c.owner,
                    c.severity.as_str(),
                    c.reason,
                    crate::clock::rfc3339(c.since_ms)
                )
            })
            .collect();
        out.push_str(&format!(", held back by {}", held.join("; ")));
    }
    out.push_str(&format!(
        "; its last {} decisions and what followed:\n",
        h.entries
            .iter()
            .filter(|e| matches!(e, Entry::Decision { .. }))
            .count()
    ));
    for e in &h.entries {
        let at = crate::clock::rfc3339(e.at_ms());
        match e {
            Entry::Decision {
                decision_id,
                event,
                outcome,
                heartbeats,
                steps,
                chain_version,
                final_actions,
                silence,
                ..
            } => {
                let times = if *heartbeats > 1 {
                    format!(" (x{heartbeats}, coalesced)")
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "{at}  decision {decision_id}: {event}{times}, {outcome} by chain {chain_version}\n"
                ));
                if let Some(silence) = silence {
                    out.push_str(&format!("    {silence}\n"));
                }
                let mut before: Vec<Value> = Vec::new();
                for s in steps {
                    let line = match (&s.output, &s.failure) {
                        (_, Some(f)) => {
                            format!("failed: {} {}", text(&f["kind"]), text(&f["message"]))
                        }
                        (Some(Value::Array(after)), None) => {
                            let added: Vec<String> = after
                                .iter()
                                .filter(|a| !before.contains(a))
                                .map(action)
                                .collect();
                            let dropped: Vec<String> = before
                                .iter()
                                .filter(|a| !after.contains(a))
                                .map(action)
                                .collect();
                            before = after.clone();
                            match (added.is_empty(), dropped.is_empty()) {
                                (true, true) => "passed the actions on".to_string(),
                                (false, true) => format!("added {}", added.join(", ")),
                                (true, false) => format!("dropped {}", dropped.join(", ")),
                                (false, false) => format!(
                                    "added {}; dropped {}",
                                    added.join(", "),
                                    dropped.join(", ")
                                ),
                            }
                        }
                        _ => "no output".to_string(),
                    };
                    out.push_str(&format!("    {} ({}): {line}\n", s.slot, s.policy));
                }
                // What the host added from the conditions (the status).
                if !outcome.starts_with("failed:") && !steps.is_empty() {
                    let derived: Vec<String> = final_actions
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|a| !before.contains(a))
                        .map(action)
                        .collect();
                    if !derived.is_empty() {
                        out.push_str(&format!(
                            "    host (from the conditions): {}\n",
                            derived.join(", ")
                        ));
                    }
                }
            }
            Entry::ConditionSet {
                owner,
                name,
                severity,
                reason,
                message,
                ..
            } => {
                let why = if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                };
                out.push_str(&format!(
                    "{at}  condition {name} of {owner} set: {severity} ({reason}){why}\n"
                ));
            }
            Entry::ConditionCleared { owner, name, .. } => {
                out.push_str(&format!("{at}  condition {name} of {owner} cleared\n"));
            }
            Entry::Transition {
                from, to, reason, ..
            } => out.push_str(&format!("{at}  status {from} -> {to} ({reason})\n")),
            Entry::ReconcileQueued {
                run_id,
                trigger,
                decision_id,
                ..
            } => {
                let by = decision_id.map_or(String::new(), |d| format!(" by decision {d}"));
                out.push_str(&format!(
                    "{at}  reconcile {run_id} ({trigger}) queued{by}\n"
                ));
            }
            Entry::ReconcileRun {
                run_id,
                trigger,
                state,
                cause,
                plugins,
                restart,
                ..
            } => {
                let mut parts: Vec<String> = plugins
                    .iter()
                    .map(|p| format!("{} {}", text(&p["result"]), text(&p["name"])))
                    .collect();
                if let Some(r) = restart {
                    let ok = if r["ok"] == Value::Bool(true) {
                        "restarted"
                    } else {
                        "restart failed"
                    };
                    parts.push(format!(
                        "{ok} ({}: {})",
                        text(&r["hook"]),
                        text(&r["detail"])
                    ));
                }
                let done = match cause {
                    Some(c) => format!("{state}: {c}"),
                    None => state.clone(),
                };
                parts.push(done);
                out.push_str(&format!(
                    "{at}  reconcile {run_id} ({trigger}) ran: {}\n",
                    parts.join("; ")
                ));
            }
        }
    }
    out
}

/// One action, briefly.
fn action(a: &Value) -> String {
    match a["kind"].as_str().unwrap_or_default() {
        "set_status" => format!(
            "set_status {}->{} ({})",
            text(&a["expected"]),
            text(&a["to"]),
            text(&a["reason"])
        ),
        "record_event" => format!("record_event {}", text(&a["event_type"])),
        "request_reconcile" => format!("request_reconcile {}", text(&a["trigger"])),
        "set_marker" => format!("set_marker {}={}", text(&a["key"]), text(&a["value"])),
        "clear_marker" => format!("clear_marker {}", text(&a["key"])),
        "set_condition" => format!(
            "set_condition {} {} ({})",
            text(&a["name"]),
            text(&a["severity"]),
            text(&a["reason"])
        ),
        "clear_condition" => format!("clear_condition {}", text(&a["name"])),
        "reject" => format!("reject {}", a["http_status"]),
        other => other.to_string(),
    }
}
