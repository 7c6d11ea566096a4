//! The policy set: which modules form the active chain, and how a chain
//! evaluates one input.
//!
//! A [`Chain`] is an ordered list of slots, each a loaded [`PolicyModule`] with
//! its limits. Evaluating it runs each slot on the actions proposed so far,
//! gives each slot only its own markers, and checks each slot's output before
//! handing it on: a slot may only act on the workspace being evaluated and may
//! only introduce writes to its own markers. The first failing slot stops the
//! chain: the evaluation fails closed and no action of it is applied.
//!
//! The built-in chain (gate, status rules, liveness, recovery trigger, cooldown) is
//! embedded in the binary; a chain file can name other module files.
//!
//! **Invariant:** the chain never performs effects; it returns data that the
//! executor validates and applies.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::{
    Engine, EvalFailure, FailureKind, GuestInput, Limits, LoadError, PolicyModule,
};
use crate::model::{Action, Input};

/// The embedded built-in policies, by name: (name, component bytes).
pub const BUILTIN: [(&str, &[u8]); 5] = [
    (
        "gate",
        include_bytes!(concat!(env!("OUT_DIR"), "/gate.wasm")),
    ),
    (
        "status-rules",
        include_bytes!(concat!(env!("OUT_DIR"), "/status_rules.wasm")),
    ),
    (
        "liveness",
        include_bytes!(concat!(env!("OUT_DIR"), "/liveness.wasm")),
    ),
    (
        "recovery-trigger",
        include_bytes!(concat!(env!("OUT_DIR"), "/recovery_trigger.wasm")),
    ),
    (
        "cooldown",
        include_bytes!(concat!(env!("OUT_DIR"), "/cooldown.wasm")),
    ),
];

/// The component bytes of the built-in policy `name`.
pub fn builtin_module(name: &str) -> Option<&'static [u8]> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// The most actions a chain may hold at any step.
pub const MAX_ACTIONS: usize = 64;
/// The longest string a policy may put in an action.
pub const MAX_STRING_BYTES: usize = 4096;

/// Why a chain could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("slot `{slot}`: {error}")]
    Load { slot: String, error: LoadError },
    #[error("slot `{slot}`: cannot read module `{path}`: {error}")]
    Read {
        slot: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "slot `{slot}`: unknown built-in module `{module}`{}; built-ins are gate, status-rules, liveness, recovery-trigger, cooldown",
        closest_builtin(module).map(|b| format!(" (did you mean `builtin:{b}`?)")).unwrap_or_default()
    )]
    UnknownBuiltin { slot: String, module: String },
    #[error("the chain is invalid: {0}")]
    Invalid(String),
    #[error(
        "slot `{slot}`: the policy {policy} declares that it needs the grants {missing}, which the slot does not have; grant them (`{flags}`, or `grants` in a chain file) or the policy fails closed with ungranted_action"
    )]
    MissingGrants {
        slot: String,
        policy: String,
        missing: String,
        flags: String,
    },
}

/// One slot of a chain file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotSpec {
    /// The slot's name, unique within the chain.
    pub name: String,
    /// `builtin:<name>`, `sha256:<digest>` of a stored module, or a path to a
    /// component file (relative to the chain file).
    pub module: String,
    /// Time limit in milliseconds (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Memory cap in MiB (default 16, at most 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<usize>,
    /// What the slot may do. A built-in module has its own default; any
    /// other module may only pass the proposed actions through unless
    /// granted more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grants: Option<Vec<Grant>>,
    /// What a failure of this slot does to the evaluation (default
    /// `fail_closed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
}

/// What a slot's failure (trap, timeout, error, invalid or ungranted output)
/// does to the evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Nothing of the verdict is applied (the default).
    #[default]
    FailClosed,
    /// The slot is skipped: the actions proposed before it pass through. For
    /// advisory policies only; never for a gate.
    Skip,
}

/// A kind of thing a slot may do to the list of actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// Add `set_status` actions.
    SetStatus,
    /// Add `reject` actions.
    Reject,
    /// Add `record_event` actions.
    RecordEvent,
    /// Add `request_reconcile` actions.
    RequestReconcile,
    /// Set or clear its own markers.
    Markers,
    /// Set or clear its own conditions (contract 0.2.0).
    Conditions,
    /// Drop actions proposed before it.
    Drop,
}

impl Grant {
    /// Every grant: what a module tested on its own may do.
    pub const ALL: [Grant; 7] = [
        Grant::SetStatus,
        Grant::Reject,
        Grant::RecordEvent,
        Grant::RequestReconcile,
        Grant::Markers,
        Grant::Conditions,
        Grant::Drop,
    ];

    /// The grant named `name` (as [`Grant::as_str`] spells it).
    pub fn parse(name: &str) -> Option<Grant> {
        Grant::ALL.into_iter().find(|g| g.as_str() == name)
    }

    /// The snake_case name used in chain files.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::SetStatus => "set_status",
            Grant::Reject => "reject",
            Grant::RecordEvent => "record_event",
            Grant::RequestReconcile => "request_reconcile",
            Grant::Markers => "markers",
            Grant::Conditions => "conditions",
            Grant::Drop => "drop",
        }
    }

    /// The grant adding `effect` needs.
    fn to_add(effect: &crate::model::Effect) -> Grant {
        use crate::model::Effect as E;
        match effect {
            E::SetStatus { .. } => Grant::SetStatus,
            E::Reject { .. } => Grant::Reject,
            E::RecordEvent { .. } => Grant::RecordEvent,
            E::RequestReconcile { .. } => Grant::RequestReconcile,
            E::SetMarker { .. } | E::ClearMarker { .. } => Grant::Markers,
            E::SetCondition { .. } | E::ClearCondition { .. } => Grant::Conditions,
        }
    }
}

/// The grants of a built-in policy: exactly what its rules need.
fn builtin_grants(name: &str) -> Vec<Grant> {
    use Grant::*;
    match name {
        // Fails closed: its condition, why, refuses a register, and drops
        // any explicit status change proposed before it.
        "gate" => vec![Conditions, RecordEvent, Reject, Drop],
        "status-rules" => vec![Conditions, RecordEvent, Markers],
        // Silence: its conditions and their events.
        "liveness" => vec![Conditions, RecordEvent],
        "recovery-trigger" => vec![RequestReconcile],
        // Drops recovery requests inside the window; writes its fire time.
        "cooldown" => vec![Markers, Drop],
        _ => Vec::new(),
    }
}

/// The built-in `module` (`builtin:NAME`) most likely meant: one edit or
/// swap away.
fn closest_builtin(module: &str) -> Option<&'static str> {
    let name = module.strip_prefix("builtin:").unwrap_or(module);
    BUILTIN
        .iter()
        .map(|(b, _)| *b)
        .find(|b| edit_distance(name, b) <= 2)
}

/// Levenshtein distance of two short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The grants of `declared` that `granted` lacks, by name.
pub fn missing_grants(declared: &[Grant], granted: &[Grant]) -> Vec<&'static str> {
    declared
        .iter()
        .filter(|g| !granted.contains(g))
        .map(|g| g.as_str())
        .collect()
}

/// Refuse a slot whose grants do not cover what its module declares it
/// needs ([`crate::engine::GRANTS_SECTION`]): without them it would fail
/// with `ungranted_action` on the requests that use them.
fn check_declared_grants(
    slot: &str,
    module: &PolicyModule,
    grants: &[Grant],
) -> Result<(), ChainError> {
    let missing = missing_grants(module.declared_grants().unwrap_or_default(), grants);
    if missing.is_empty() {
        return Ok(());
    }
    let meta = module.metadata();
    Err(ChainError::MissingGrants {
        slot: slot.to_string(),
        policy: format!("{} {}", meta.name, meta.version),
        missing: missing.join(", "),
        flags: missing
            .iter()
            .map(|g| format!("--grant {g}"))
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// A chain file: `[[slot]]` tables in evaluation order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainSpec {
    pub slot: Vec<SlotSpec>,
}

/// One link of a chain.
#[derive(Clone, Debug)]
pub struct Slot {
    pub name: String,
    pub module: Arc<PolicyModule>,
    pub limits: Limits,
    pub grants: Vec<Grant>,
    pub on_failure: OnFailure,
    /// How its steps name it: shared by every evaluation, not copied.
    step_id: Arc<StepId>,
}

impl Slot {
    pub fn new(
        name: String,
        module: Arc<PolicyModule>,
        limits: Limits,
        grants: Vec<Grant>,
        on_failure: OnFailure,
    ) -> Slot {
        let meta = module.metadata();
        let step_id = Arc::new(StepId {
            slot: name.clone(),
            policy: meta.name.clone(),
            policy_version: meta.version.clone(),
            digest: module.digest().to_string(),
        });
        Slot {
            name,
            module,
            limits,
            grants,
            on_failure,
            step_id,
        }
    }
}

/// An ordered, loaded chain of policies.
#[derive(Clone, Debug)]
pub struct Chain {
    /// A content version: the first 16 hex digits of the sha256 of the
    /// normalized spec (slot names, module digests, limits, grants), so equal
    /// chains have equal versions.
    pub version: String,
    pub slots: Vec<Slot>,
    /// The spec with every module named by content: `builtin:<name>` or
    /// `sha256:<digest>`, so it can be stored and rebuilt anywhere.
    pub spec: ChainSpec,
    /// The host derives the verdict's status from the conditions
    /// ([`crate::conditions::derive`]): a chain of the service with a 0.2.0
    /// slot. A chain of only 0.1.0 slots, and one module tested on its own,
    /// decide as their policies say.
    pub derives_status: bool,
}

/// The slot and policy a step is of.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StepId {
    pub slot: String,
    pub policy: String,
    pub policy_version: String,
    pub digest: String,
}

/// What one slot did in one evaluation (a decision-log entry).
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    #[serde(flatten)]
    pub id: Arc<StepId>,
    pub elapsed_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Vec<Action>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<EvalFailure>,
}

/// The result of evaluating a chain.
#[derive(Clone, Debug)]
pub struct ChainOutcome {
    pub steps: Vec<Step>,
    /// The final actions, or the failure of the first slot that failed.
    pub result: Result<Vec<Action>, SlotFailure>,
}

/// The slot that stopped a chain, and how.
#[derive(Clone, Debug, Serialize, thiserror::Error)]
#[error("slot `{slot}`: {failure}")]
pub struct SlotFailure {
    pub slot: String,
    #[serde(flatten)]
    pub failure: EvalFailure,
}

impl Chain {
    /// The built-in chain: gate, status rules, liveness, recovery trigger, cooldown.
    ///
    /// The status rules run before the recovery trigger so that the trigger
    /// also sees their `management_mcp_unloaded` degrade, and the cooldown
    /// runs last so that every recovery request passes through it.
    pub fn builtin(engine: &Engine) -> Result<Chain, ChainError> {
        let specs = BUILTIN
            .iter()
            .map(|(name, _)| SlotSpec {
                name: (*name).to_string(),
                module: format!("builtin:{name}"),
                timeout_ms: None,
                max_memory_mib: None,
                grants: None,
                on_failure: None,
            })
            .collect();
        Chain::from_spec(engine, &ChainSpec { slot: specs }, Path::new("."), &|_| {
            None
        })
    }

    /// Build a chain from its spec; relative module paths are under `base`,
    /// and `sha256:<digest>` modules come from `stored`.
    pub fn from_spec(
        engine: &Engine,
        spec: &ChainSpec,
        base: &Path,
        stored: &dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Chain, ChainError> {
        if spec.slot.is_empty() {
            return Err(ChainError::Invalid(
                "a chain needs at least one slot".into(),
            ));
        }
        let mut slots: Vec<Slot> = Vec::with_capacity(spec.slot.len());
        let mut normalized: Vec<SlotSpec> = Vec::with_capacity(spec.slot.len());
        for s in &spec.slot {
            if s.name.is_empty() || slots.iter().any(|o| o.name == s.name) {
                return Err(ChainError::Invalid(format!(
                    "slot names must be non-empty and unique; `{}` is not",
                    s.name
                )));
            }
            let builtin = s.module.strip_prefix("builtin:");
            let grants = match (&s.grants, builtin) {
                (Some(g), _) => g.clone(),
                (None, Some(name)) => builtin_grants(name),
                (None, None) => Vec::new(),
            };
            let bytes: Vec<u8> = match (builtin, s.module.strip_prefix("sha256:")) {
                (Some(name), _) => builtin_module(name).map(<[u8]>::to_vec).ok_or_else(|| {
                    ChainError::UnknownBuiltin {
                        slot: s.name.clone(),
                        module: s.module.clone(),
                    }
                })?,
                (None, Some(digest)) => stored(digest).ok_or_else(|| {
                    ChainError::Invalid(format!(
                        "slot `{}`: no stored module with digest `{digest}`",
                        s.name
                    ))
                })?,
                (None, None) => {
                    let path = base.join(&s.module);
                    std::fs::read(&path).map_err(|error| ChainError::Read {
                        slot: s.name.clone(),
                        path,
                        error,
                    })?
                }
            };
            let module = engine.load(&bytes).map_err(|error| ChainError::Load {
                slot: s.name.clone(),
                error,
            })?;
            check_declared_grants(&s.name, &module, &grants)?;
            let mut limits = Limits::default();
            if let Some(ms) = s.timeout_ms {
                if ms == 0 || ms > 10_000 {
                    return Err(ChainError::Invalid(format!(
                        "slot `{}`: timeout_ms must be 1-10000",
                        s.name
                    )));
                }
                limits.timeout = Duration::from_millis(ms);
            }
            if let Some(mib) = s.max_memory_mib {
                if mib == 0 || mib > crate::engine::MAX_MEMORY_BYTES >> 20 {
                    return Err(ChainError::Invalid(format!(
                        "slot `{}`: max_memory_mib must be 1-32",
                        s.name
                    )));
                }
                limits.max_memory_bytes = mib << 20;
            }
            normalized.push(SlotSpec {
                module: match builtin {
                    Some(name) => format!("builtin:{name}"),
                    None => format!("sha256:{}", module.digest()),
                },
                grants: Some(grants.clone()),
                ..s.clone()
            });
            slots.push(Slot::new(
                s.name.clone(),
                Arc::new(module),
                limits,
                grants,
                s.on_failure.unwrap_or_default(),
            ));
        }
        // Markers belong to (slot, policy name): one name per chain, so that
        // a module cannot reach the markers of another slot by reporting
        // its name.
        for (i, a) in slots.iter().enumerate() {
            let name = &a.module.metadata().name;
            if let Some(b) = slots[i + 1..]
                .iter()
                .find(|b| &b.module.metadata().name == name)
            {
                return Err(ChainError::Invalid(format!(
                    "slots `{}` and `{}` both run a policy named `{name}`; a chain runs each policy once, \
                     and a policy's markers belong to its slot",
                    a.name, b.name
                )));
            }
        }
        let spec = ChainSpec { slot: normalized };
        let canonical = serde_json::to_vec(&spec).unwrap_or_default();
        let version = crate::engine::hex(&Sha256::digest(&canonical)[..8]);
        let derives_status = slots
            .iter()
            .any(|s| s.module.contract() >= crate::engine::Contract::V0_2);
        Ok(Chain {
            version,
            slots,
            spec,
            derives_status,
        })
    }

    /// A chain of one slot running `module` with every grant and the
    /// default limits: how a policy is tested on its own, in the same
    /// sandbox and with the same output checks as in a service.
    pub fn single(name: &str, module: PolicyModule) -> Chain {
        Chain::of_slot(Slot::new(
            name.to_string(),
            Arc::new(module),
            Limits::default(),
            Grant::ALL.to_vec(),
            OnFailure::FailClosed,
        ))
    }

    /// A chain of one slot of another chain, with its grants and limits.
    pub fn of_slot(slot: Slot) -> Chain {
        let spec = ChainSpec {
            slot: vec![SlotSpec {
                name: slot.name.clone(),
                module: format!("sha256:{}", slot.module.digest()),
                timeout_ms: u64::try_from(slot.limits.timeout.as_millis()).ok(),
                max_memory_mib: Some(slot.limits.max_memory_bytes >> 20),
                grants: Some(slot.grants.clone()),
                on_failure: Some(slot.on_failure),
            }],
        };
        Chain {
            version: slot.module.digest()[..16].to_string(),
            slots: vec![slot],
            spec,
            derives_status: false,
        }
    }

    /// Keep of `conditions` those of a slot of this chain running their
    /// owner: a condition whose policy left the chain (or was replaced by
    /// another policy in its slot) holds nothing back any more, since
    /// nothing could ever clear it.
    pub fn retain_in_force(&self, conditions: &mut Vec<crate::model::Condition>) {
        conditions.retain(|c| {
            self.slots
                .iter()
                .any(|s| c.belongs_to(&s.name, &s.module.metadata().name))
        });
    }

    /// Evaluate `input` through every slot, on this thread.
    pub fn evaluate(&self, input: &Input) -> ChainOutcome {
        self.evaluate_from(input, Vec::new())
    }

    /// Evaluate `input` through every slot on an async worker: each policy
    /// yields at every epoch tick, so a slow one cannot hold the worker.
    pub async fn evaluate_async(&self, input: &Input) -> ChainOutcome {
        self.evaluate_from_async(input, Vec::new()).await
    }

    /// Evaluate `input` through every slot, the first slot seeing `proposed`
    /// (a fixture's actions of slots that would run before this chain).
    pub fn evaluate_from(&self, input: &Input, proposed: Vec<Action>) -> ChainOutcome {
        crate::engine::block_on(self.evaluate_from_async(input, proposed))
    }

    /// [`Chain::evaluate_from`], yielding at every epoch tick.
    pub async fn evaluate_from_async(&self, input: &Input, proposed: Vec<Action>) -> ChainOutcome {
        let mut steps = Vec::with_capacity(self.slots.len());
        let mut proposed = proposed;
        let mut guest = GuestInput::new(input);
        for slot in &self.slots {
            let meta = slot.module.metadata();
            guest.set_markers(
                input
                    .markers
                    .iter()
                    .filter(|m| m.belongs_to(&slot.name, &meta.name)),
            );
            let started = Instant::now();
            let result = slot
                .module
                .evaluate_guest_async(&guest, &proposed, slot.limits)
                .await
                .and_then(|out| {
                    check_output(
                        &input.workspace.id,
                        &meta.name,
                        &slot.grants,
                        &proposed,
                        out,
                    )
                });
            let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let mut step = Step {
                id: slot.step_id.clone(),
                elapsed_us,
                output: None,
                failure: None,
            };
            match result {
                Ok(out) => {
                    step.output = Some(out.clone());
                    steps.push(step);
                    proposed = out;
                }
                Err(failure) if slot.on_failure == OnFailure::Skip => {
                    // Fail open, by the operator's choice for this slot: the
                    // proposed actions pass through as if it were absent.
                    step.failure = Some(failure);
                    steps.push(step);
                }
                Err(failure) => {
                    step.failure = Some(failure.clone());
                    steps.push(step);
                    return ChainOutcome {
                        steps,
                        result: Err(SlotFailure {
                            slot: slot.name.clone(),
                            failure,
                        }),
                    };
                }
            }
        }
        if self.derives_status {
            let derived = crate::conditions::derive(input, &proposed);
            proposed.extend(derived);
        }
        ChainOutcome {
            steps,
            result: Ok(proposed),
        }
    }
}

/// Check one slot's output: size limits, the workspace it targets, that every
/// marker write it introduces is its own, and that everything it added or
/// dropped is granted.
pub(crate) fn check_output(
    workspace_id: &str,
    policy: &str,
    grants: &[Grant],
    before: &[Action],
    out: Vec<Action>,
) -> Result<Vec<Action>, EvalFailure> {
    let invalid = |msg: String| Err(EvalFailure::new(FailureKind::InvalidOutput, msg));
    if out.len() > MAX_ACTIONS {
        return invalid(format!(
            "{} actions returned; at most {MAX_ACTIONS} are allowed",
            out.len()
        ));
    }
    let mut inherited: Vec<&Action> = before.iter().collect();
    for action in &out {
        if action.workspace_id != workspace_id {
            return invalid(format!(
                "an action targets workspace `{}`; only `{workspace_id}` may be touched",
                truncate(&action.workspace_id)
            ));
        }
        if let Some(len) = longest_string(action).filter(|l| *l > MAX_STRING_BYTES) {
            return invalid(format!(
                "an action holds a {len}-byte string; at most {MAX_STRING_BYTES} are allowed"
            ));
        }
        // An action kept from the proposed list is not this policy's to own.
        if let Some(pos) = inherited.iter().position(|a| *a == action) {
            inherited.swap_remove(pos);
            continue;
        }
        if let Some(owner) = action.marker_owner()
            && owner != policy
        {
            let what = if action.in_contract_0_1() {
                "marker"
            } else {
                "condition"
            };
            return invalid(format!(
                "a {what} write for policy `{}`; `{policy}` may only write its own {what}s",
                truncate(owner)
            ));
        }
        if let Some(problem) = condition_problem(&action.effect) {
            return invalid(problem);
        }
        let needed = Grant::to_add(&action.effect);
        if !grants.contains(&needed) {
            return Err(ungranted(needed));
        }
    }
    // Whatever of the proposed list is not in the output was dropped.
    if !inherited.is_empty() && !grants.contains(&Grant::Drop) {
        return Err(ungranted(Grant::Drop));
    }
    Ok(out)
}

/// What is wrong with a condition action, if anything.
pub(crate) fn condition_problem(effect: &crate::model::Effect) -> Option<String> {
    use crate::conditions::{MAX_MESSAGE, MAX_NAME, valid_name};
    use crate::model::Effect as E;
    let (name, reason, message) = match effect {
        E::SetCondition {
            name,
            reason,
            message,
            ..
        } => (name, reason.as_str(), message.as_str()),
        E::ClearCondition { name, .. } => (name, "x", ""),
        _ => return None,
    };
    if !valid_name(name) {
        return Some(format!(
            "condition `{}`: names are 1-{MAX_NAME} lowercase letters, digits or dashes",
            truncate(name)
        ));
    }
    if reason.is_empty() || reason.len() > MAX_NAME {
        return Some(format!(
            "condition `{name}`: a reason code is 1-{MAX_NAME} bytes"
        ));
    }
    (message.len() > MAX_MESSAGE)
        .then(|| format!("condition `{name}`: a message is at most {MAX_MESSAGE} bytes"))
}

fn ungranted(grant: Grant) -> EvalFailure {
    EvalFailure::new(
        FailureKind::Ungranted,
        format!("the slot is not granted `{}`", grant.as_str()),
    )
}

fn longest_string(action: &Action) -> Option<usize> {
    use crate::model::Effect as E;
    let lens: Vec<usize> = match &action.effect {
        E::SetStatus {
            reason, message, ..
        } => vec![reason.len(), message.as_ref().map_or(0, String::len)],
        E::Reject { message, .. } => vec![message.len()],
        E::RecordEvent {
            event_type,
            payload_json,
        } => vec![event_type.len(), payload_json.len()],
        E::RequestReconcile { .. } => vec![],
        E::SetMarker { owner, key, value } => vec![owner.len(), key.len(), value.len()],
        E::ClearMarker { owner, key } => vec![owner.len(), key.len()],
        E::SetCondition {
            owner,
            name,
            reason,
            message,
            ..
        } => vec![owner.len(), name.len(), reason.len(), message.len()],
        E::ClearCondition { owner, name } => vec![owner.len(), name.len()],
    };
    lens.into_iter().max()
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}
