//! The executor: turns a register or heartbeat into one applied verdict.
//!
//! For each request it reads the workspace snapshot, checks the token, runs
//! the active chain, validates the chain's final actions, and applies them
//! with the request's own writes (liveness, registration) in one store
//! transaction. A status write or marker write that finds the state changed
//! since the snapshot, or a workspace version that moved, makes the store
//! report a conflict; the executor then
//! re-reads and re-evaluates, so every applied verdict was computed from the
//! state it replaced. Queued reconciles are handed to the deliverer only after
//! the commit.
//!
//! A chain that fails (trap, timeout, out of memory, policy error, invalid
//! output) fails closed: none of its actions is applied, the heartbeat is
//! still acknowledged with its liveness stored, and the failure is recorded in
//! the decision log.
//!
//! **Invariant:** this is the only code that performs the effects of actions.
//! Registers run on blocking threads; the service's heartbeats run on the
//! async workers ([`Executor::heartbeat_async`]: a short read, usually the
//! snapshot cache, a chain whose policies yield at every epoch tick, and an
//! awaited commit).
//!
//! Shadow mode (a stored chain deciding beside the active one, off the
//! request path, on markers and conditions of its own) is `shadow.rs`.

mod shadow;

pub use shadow::{Shadow, ShadowDiff, ShadowStats};

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::agent_url::AgentUrlPolicy;
use crate::auth::{self, AuthCheck, InboundSecret};
use crate::chain::{Chain, ChainOutcome, SlotFailure};
use crate::clock::Clock;
use crate::deliverer::Deliverer;
use crate::engine::{EvalFailure, FailureKind};
use crate::metrics::Metrics;
use crate::model::{
    Action, Effect, Event, HeartbeatEvent, Input, ReconcileTrigger, RegisterEvent, RuntimeMetadata,
    SilenceEvent, SilenceKind, Status, WorkspaceKind,
};
use crate::store::{
    Applied, ConditionState, ConditionWrite, DecisionDetail, DecisionRecord, Liveness, MarkerWrite,
    NewWorkspace, Read, Registration, SilenceSeen, Snapshot, StatusWrite, Store, StoreError,
    VerdictWrite,
};

/// How many times a verdict is re-evaluated after conflicting writes.
pub const MAX_ATTEMPTS: u32 = 16;
/// While fewer verdicts than this wait for the writer, a heartbeat whose
/// verdict records only liveness is acknowledged once queued; beyond it,
/// every heartbeat waits for its commit (the writer's backpressure).
pub const MAX_UNCOMMITTED: u64 = 4096;
/// The longest marker key a policy may write.
pub const MAX_MARKER_KEY: usize = 64;
/// The longest marker value a policy may write.
pub const MAX_MARKER_VALUE: usize = 1024;

/// Why a register or heartbeat was not accepted. The HTTP layer maps each to
/// its status code and body.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown workspace")]
    UnknownWorkspace,
    #[error("missing workspace auth token")]
    MissingToken,
    #[error("invalid workspace auth token")]
    InvalidToken,
    #[error("token lookup failed: {0}")]
    AuthUnavailable(StoreError),
    /// Reading the workspace's snapshot failed elsewhere than at its
    /// tokens; `what` names the part (`its declared plugins`, ...).
    #[error("reading {what} failed: {error}")]
    StateUnavailable {
        what: &'static str,
        error: StoreError,
    },
    #[error("kind='platform' may only be assigned by the platform-agent install path")]
    PlatformKindRefused,
    /// A policy refused the register; `policy` is its name.
    #[error("rejected by policy: {message}")]
    Rejected {
        http_status: u16,
        message: String,
        policy: String,
    },
    #[error("url is required for push-mode workspaces")]
    UrlRequired,
    /// The agent URL is not one the configured mode allows (why, without
    /// the URL).
    #[error("{0}")]
    UrlNotAllowed(String),
    /// The agent card's `url` is not one the configured mode allows.
    #[error("workspace agent_card URL not allowed")]
    CardUrlNotAllowed(String),
    #[error("{0}")]
    BadWorkspaceId(String),
    #[error("registration failed: {0}")]
    RegistrationFailed(String),
    #[error("failed to update: {0}")]
    UpdateFailed(String),
    /// The database cannot be reached: nothing was written, the request
    /// may be retried.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("failed to update card: {0}")]
    CardUpdateFailed(String),
}

impl RegistryError {
    /// The reason key it is logged and counted under
    /// (`heartgate_registry_rejections_total`).
    pub fn reason(&self) -> &'static str {
        use RegistryError as E;
        match self {
            E::UnknownWorkspace => "unknown_workspace",
            E::MissingToken => "auth_missing",
            E::InvalidToken => "auth_invalid",
            E::AuthUnavailable(_) => "auth_unavailable",
            E::StateUnavailable { .. } => "state_unavailable",
            E::PlatformKindRefused => "platform_kind_refused",
            E::Rejected { policy, .. } if policy == GATE_POLICY => "identity_gate",
            E::Rejected { .. } => "policy_rejected",
            E::UrlRequired => "url_required",
            E::UrlNotAllowed(_) => "url_not_allowed",
            E::CardUrlNotAllowed(_) => "card_url_not_allowed",
            E::BadWorkspaceId(_) => "bad_workspace_id",
            E::RegistrationFailed(_) => "registration_failed",
            E::UpdateFailed(_) => "update_failed",
            E::Unavailable(_) => "database_unavailable",
            E::CardUpdateFailed(_) => "update_card_failed",
        }
    }
}

/// The built-in RCA#2970 gate's policy name: its refusals are counted as
/// `identity_gate`.
const GATE_POLICY: &str = "rca2970-gate";

/// A register, as parsed by the HTTP layer.
#[derive(Clone, Debug)]
pub struct RegisterRequest {
    pub id: String,
    pub bearer: Option<String>,
    pub url: Option<String>,
    /// The agent card as JSON text (an object).
    pub agent_card: String,
    /// `url` of the agent card, the fallback for push mode.
    pub agent_card_url: Option<String>,
    pub delivery_mode: Option<String>,
    pub kind: Option<WorkspaceKind>,
    pub mcp_server_present: Option<bool>,
    pub loaded_mcp_tools: Option<Vec<String>>,
    /// What `runtime_metadata` declared.
    pub runtime: RuntimeMetadata,
}

/// A successful register.
#[derive(Clone, Debug)]
pub struct Registered {
    pub delivery_mode: String,
    /// The new token, when this register minted one.
    pub auth_token: Option<String>,
    pub verdict: String,
    /// The version of the chain that decided it.
    pub chain_version: String,
    /// The workspace's platform inbound secret, unless minting it failed.
    pub inbound_secret: Option<InboundSecret>,
}

/// What a durable verdict answered `Applied::Coalesced` means: it was not
/// written (never happens: only early-acknowledged verdicts are coalesced).
const NOT_WRITTEN: &str = "the verdict was coalesced instead of written";

/// How a heartbeat was acknowledged.
#[derive(Clone, Debug)]
pub struct Acknowledged {
    /// A short description of the verdict, e.g. `unchanged`, `online->degraded`.
    pub verdict: String,
    /// Committed before the acknowledgement; `false` for a liveness-only
    /// verdict acknowledged once queued.
    pub committed: bool,
    /// The version of the chain that decided it (empty for a removed
    /// workspace, which no chain evaluates).
    pub chain_version: String,
    /// The workspace's platform inbound secret as read with its snapshot;
    /// `None` if it has none yet (see [`Executor::inbound_secret`]).
    pub inbound_secret: Option<InboundSecret>,
    /// The workspace is removed: nothing was evaluated or written.
    pub removed: bool,
}

/// When a workspace's silence is due (the liveness sweep's rule).
#[derive(Clone, Debug)]
pub struct SilenceRule {
    pub kind: SilenceKind,
    /// The heartbeat TTL, or the provision timeout of the workspace's
    /// runtime.
    pub limit_ms: i64,
    /// Nothing is due before this: one TTL after the last outage ended.
    pub not_before_ms: i64,
}

/// What [`Executor::notice_silence`] came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SilenceOutcome {
    /// Nothing evaluated: the workspace is gone, its status is not one the
    /// silence applies to, or its deadline moved (a heartbeat won).
    NotDue,
    /// Evaluated and applied; the status stayed.
    Unchanged,
    /// Evaluated and applied; the status changed.
    Changed { from: Status, to: Status },
    /// The evaluation failed closed (recorded in the decision log).
    Failed,
}

/// A heartbeat, as parsed by the HTTP layer.
#[derive(Clone, Debug)]
pub struct HeartbeatRequest {
    pub workspace_id: String,
    pub bearer: Option<String>,
    pub event: HeartbeatEvent,
    /// What `runtime_metadata` declared (none if absent: it clears the
    /// stored, as the original registry does).
    pub runtime: RuntimeMetadata,
    /// The agent card as JSON text, if the heartbeat carried one: stored
    /// if the workspace has none, and it clears the register-failure stamp.
    pub agent_card: Option<String>,
}

impl HeartbeatRequest {
    /// A heartbeat with no `runtime_metadata` and no agent card.
    pub fn new(workspace_id: &str, bearer: Option<String>, event: HeartbeatEvent) -> Self {
        HeartbeatRequest {
            workspace_id: workspace_id.to_string(),
            bearer,
            event,
            runtime: RuntimeMetadata::default(),
            agent_card: None,
        }
    }
}

/// The executor and what it works with.
pub struct Executor {
    store: Arc<dyn Store>,
    chain: ArcSwap<Chain>,
    shadow: arc_swap::ArcSwapOption<Shadow>,
    clock: Arc<dyn Clock>,
    deliverer: Arc<dyn Deliverer>,
    open_registration: bool,
    agent_urls: AgentUrlPolicy,
    metrics: Arc<Metrics>,
    /// Set by [`Executor::acknowledge_when_queued`]: where a liveness-only
    /// heartbeat acknowledged before its commit goes to be evaluated again
    /// if its verdict turned out to conflict.
    retries: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<HeartbeatRequest>>,
    /// Set by [`Executor::run_shadow`]: where applied verdicts go for the
    /// shadow chain to decide too.
    shadow_jobs: std::sync::OnceLock<tokio::sync::mpsc::Sender<shadow::Job>>,
}

/// The checked final actions of a chain, grouped for the store.
struct Effects {
    status: Option<StatusWrite>,
    reject: Option<(u16, String)>,
    events: Vec<(String, String)>,
    markers: Vec<MarkerWrite>,
    conditions: Vec<ConditionWrite>,
    reconciles: Vec<ReconcileTrigger>,
}

#[derive(Serialize)]
struct FailedOutcome<'a> {
    failure: &'a SlotFailure,
}

impl Executor {
    pub fn new(
        store: Arc<dyn Store>,
        chain: Chain,
        clock: Arc<dyn Clock>,
        deliverer: Arc<dyn Deliverer>,
    ) -> Executor {
        let metrics = Arc::new(Metrics::new());
        metrics.active_chain(&chain.version);
        Executor {
            store,
            chain: ArcSwap::from_pointee(chain),
            shadow: arc_swap::ArcSwapOption::empty(),
            clock,
            deliverer,
            open_registration: false,
            agent_urls: AgentUrlPolicy::default(),
            metrics,
            retries: std::sync::OnceLock::new(),
            shadow_jobs: std::sync::OnceLock::new(),
        }
    }

    /// From now on, acknowledge a heartbeat whose verdict records only
    /// liveness (no status change, marker, event or reconcile request) once
    /// it is queued for the writer, not once it is committed: what the
    /// service does. Such a verdict can be lost with a killed process; the
    /// next heartbeat records liveness again. Everything else still waits
    /// for its commit. The returned future evaluates again, on fresh state,
    /// the early-acknowledged heartbeats whose verdicts conflicted; run it
    /// until `stop` completes (it then finishes the ones already waiting).
    pub fn acknowledge_when_queued<S: Future<Output = ()>>(
        self: &Arc<Self>,
        stop: S,
    ) -> impl Future<Output = ()> + use<S> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<HeartbeatRequest>();
        let set = self.retries.set(tx).is_ok();
        let this = self.clone();
        async move {
            if !set {
                return;
            }
            let again = |req: HeartbeatRequest| {
                let this = this.clone();
                async move {
                    if let Err(e) = this.heartbeat_from(&req, 2, false).await {
                        tracing::warn!(workspace_id = %req.workspace_id, error = %e,
                            "evaluating a conflicting heartbeat again failed");
                    }
                }
            };
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    req = rx.recv() => match req {
                        Some(req) => again(req).await,
                        None => return,
                    },
                }
            }
            while let Ok(req) = rx.try_recv() {
                again(req).await;
            }
        }
    }

    /// The counters of recorded verdicts.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Count into `metrics` (shared with the reconcile worker and the store)
    /// instead of metrics of its own.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Executor {
        metrics.active_chain(&self.chain.load().version);
        self.metrics = metrics;
        self
    }

    /// Count a verdict that was committed (or queued, if liveness only):
    /// its outcome, each slot's time, the reconcile requests a slot dropped,
    /// and its status change.
    fn count(
        &self,
        input: &Input,
        recorded: &str,
        checked: &Result<Effects, SlotFailure>,
        outcome: &ChainOutcome,
    ) {
        let slot = checked.as_ref().err().map(|f| f.slot.as_str());
        self.metrics.verdict(input.event.kind(), recorded, slot);
        let mut proposed: &[Action] = &[];
        for step in &outcome.steps {
            self.metrics
                .slot_evaluated(&step.id.slot, step.elapsed_us as f64 / 1e6);
            let Some(output) = &step.output else {
                continue;
            };
            for action in proposed {
                if let Effect::RequestReconcile { trigger } = &action.effect
                    && !output.contains(action)
                {
                    self.metrics.suppressed(&step.id.slot, trigger.as_str());
                }
            }
            proposed = output;
        }
        if let Ok(Effects {
            status: Some(change),
            ..
        }) = checked
            && change.expected != change.to
        {
            self.metrics
                .transition(change.expected.as_str(), change.to.as_str());
        }
    }

    /// Let a register for an unknown id create the workspace (an ordinary
    /// `workspace`, never `platform`). Off by default: workspaces are
    /// provisioned by the operator.
    pub fn with_open_registration(mut self, open: bool) -> Executor {
        self.open_registration = open;
        self
    }

    /// Which agent URLs a push-mode register may store (default: strict).
    pub fn with_agent_url_policy(mut self, policy: AgentUrlPolicy) -> Executor {
        self.agent_urls = policy;
        self
    }

    /// The workspace's platform inbound secret, minted and stored now if it
    /// has none. Best effort: a failure is logged (never the secret) and
    /// answers `None`, and the request is answered without it. Blocking.
    pub fn inbound_secret(&self, workspace_id: &str) -> Option<InboundSecret> {
        let minted = match InboundSecret::mint() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(workspace_id, error = %e,
                    "minting a platform inbound secret failed; answering without it");
                return None;
            }
        };
        match self.store.inbound_secret(workspace_id, &minted) {
            Ok(secret) => Some(secret),
            Err(StoreError::UnknownWorkspace(_)) => None,
            Err(e) => {
                tracing::warn!(workspace_id, error = %e,
                    "storing a platform inbound secret failed; answering without it");
                None
            }
        }
    }

    /// Store a runtime's new agent card (`POST /registry/update-card`):
    /// authenticated like a heartbeat, its `url` checked like a register's,
    /// recorded with an `AGENT_CARD_UPDATED` event. Blocking.
    pub fn update_card(
        &self,
        workspace_id: &str,
        bearer: Option<&str>,
        card: &str,
        card_url: Option<&str>,
    ) -> Result<(), RegistryError> {
        let snap = self.load_and_authenticate(workspace_id, bearer, Read::Fresh)?;
        if snap.workspace.status == Status::Removed {
            return Err(RegistryError::UnknownWorkspace);
        }
        if let Some(url) = card_url.filter(|u| !u.is_empty()) {
            self.agent_urls
                .check(url)
                .map_err(|e| RegistryError::CardUrlNotAllowed(e.to_string()))?;
        }
        // `card` is JSON text the HTTP layer serialized: embedded as it is.
        let payload = format!(r#"{{"agent_card":{card}}}"#);
        match self
            .store
            .update_agent_card(workspace_id, card, &payload, self.clock.now_ms())
        {
            Ok(()) => Ok(()),
            Err(StoreError::UnknownWorkspace(_)) => Err(RegistryError::UnknownWorkspace),
            Err(e) => Err(RegistryError::CardUpdateFailed(e.to_string())),
        }
    }

    /// The active chain.
    pub fn chain(&self) -> Arc<Chain> {
        self.chain.load_full()
    }

    /// Replace the active chain at once; evaluations that already loaded the
    /// old one finish on it. Returns the old chain.
    pub fn swap_chain(&self, chain: Chain) -> Arc<Chain> {
        self.metrics.active_chain(&chain.version);
        self.chain.swap(Arc::new(chain))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn load_and_authenticate(
        &self,
        id: &str,
        bearer: Option<&str>,
        read: Read,
    ) -> Result<Snapshot, RegistryError> {
        let snap = self.store.load(id, read).map_err(|e| match e.reading() {
            Some(what) if what != crate::store::READING_TOKENS => {
                RegistryError::StateUnavailable { what, error: e }
            }
            _ => RegistryError::AuthUnavailable(e),
        })?;
        let checked = match snap {
            None => Err(RegistryError::UnknownWorkspace),
            Some(snap) => {
                match auth::check(bearer, &snap.live_token_hashes, snap.token_bootstrap) {
                    AuthCheck::Token | AuthCheck::Bootstrap => Ok(snap),
                    AuthCheck::Missing => Err(RegistryError::MissingToken),
                    AuthCheck::Invalid => Err(RegistryError::InvalidToken),
                }
            }
        };
        match checked {
            // A refusal is never answered from the cache: the workspace or
            // its token may be newer than the cached snapshot.
            Err(_) if read == Read::Cached => self.load_and_authenticate(id, bearer, Read::Fresh),
            other => other,
        }
    }

    /// Evaluate and apply a heartbeat, blocking until it is durable (for
    /// callers without an async runtime). Returns a short description of the
    /// verdict for the request's span.
    pub fn heartbeat(&self, req: &HeartbeatRequest) -> Result<String, RegistryError> {
        crate::engine::block_on(self.heartbeat_async(req))
    }

    /// Evaluate and apply a heartbeat; returns once it is durable. Meant for
    /// an async worker: the read is a short one (usually the snapshot cache),
    /// the chain yields at every epoch tick, and the commit is awaited
    /// without holding a thread.
    pub async fn heartbeat_async(&self, req: &HeartbeatRequest) -> Result<String, RegistryError> {
        Ok(self.heartbeat_acknowledged(req).await?.verdict)
    }

    /// [`Executor::heartbeat_async`], saying also whether the verdict was
    /// committed before this returned (see
    /// [`Executor::acknowledge_when_queued`]).
    pub async fn heartbeat_acknowledged(
        &self,
        req: &HeartbeatRequest,
    ) -> Result<Acknowledged, RegistryError> {
        self.heartbeat_from(req, 1, true).await
    }

    /// Evaluate and apply a heartbeat from attempt `first` (a later attempt
    /// reads fresh state); `early` lets a liveness-only verdict be
    /// acknowledged once queued (see [`Executor::acknowledge_when_queued`]).
    async fn heartbeat_from(
        &self,
        req: &HeartbeatRequest,
        first: u32,
        early: bool,
    ) -> Result<Acknowledged, RegistryError> {
        for attempt in first..=MAX_ATTEMPTS {
            let Some(Verdict { write, pending }) = self.evaluate_heartbeat(req, attempt).await?
            else {
                return Ok(Acknowledged {
                    verdict: "ignored: removed".into(),
                    committed: true,
                    chain_version: String::new(),
                    inbound_secret: None,
                    removed: true,
                });
            };
            // Early only for a verdict the chain applied: a failed
            // evaluation's decision is committed before the answer.
            // Never while the store cannot write: early acknowledgement is
            // for speed, not for hiding a dead disk.
            if early
                && write.records_only_liveness()
                && pending.recorded == "applied"
                && let Some(retries) = self.retries.get()
                && self.store.backlog() < MAX_UNCOMMITTED
                && self.store.allows_early_ack()
            {
                let retries = retries.clone();
                let again = req.clone();
                self.store.submit_liveness(
                    write,
                    Box::new(move |applied| match applied {
                        Ok(Applied::Done { .. } | Applied::Coalesced) => {}
                        Ok(Applied::Conflict) => {
                            let _ = retries.send(again);
                        }
                        // The store logs the failing episode at ERROR.
                        Err(e) => tracing::warn!(workspace_id = %again.workspace_id, error = %e,
                            "a liveness-only heartbeat acknowledged before its commit was not written"),
                    }),
                );
                self.count(
                    &pending.input,
                    &pending.recorded,
                    &pending.checked,
                    &pending.outcome,
                );
                self.compare_with_shadow(&pending.input, &pending.outcome);
                return Ok(Acknowledged {
                    verdict: pending.summary,
                    committed: false,
                    chain_version: pending.chain_version,
                    inbound_secret: pending.inbound_secret,
                    removed: false,
                });
            }
            match self.committed(write).await {
                Ok(Applied::Done { queued, .. }) => {
                    self.count(
                        &pending.input,
                        &pending.recorded,
                        &pending.checked,
                        &pending.outcome,
                    );
                    if !queued.is_empty() {
                        self.deliverer.queued(&queued);
                    }
                    self.compare_with_shadow(&pending.input, &pending.outcome);
                    return Ok(Acknowledged {
                        verdict: pending.summary,
                        committed: true,
                        chain_version: pending.chain_version,
                        inbound_secret: pending.inbound_secret,
                        removed: false,
                    });
                }
                // Evaluate again on fresh state.
                Ok(Applied::Conflict) => continue,
                Ok(Applied::Coalesced) => {
                    return Err(RegistryError::UpdateFailed(NOT_WRITTEN.into()));
                }
                Err(StoreError::Unavailable(e)) => return Err(RegistryError::Unavailable(e)),
                Err(e) => return Err(RegistryError::UpdateFailed(e.to_string())),
            }
        }
        Err(RegistryError::UpdateFailed(format!(
            "state kept changing under {MAX_ATTEMPTS} evaluations"
        )))
    }

    /// Read, authenticate and evaluate one heartbeat (attempt `attempt`):
    /// the verdict to write, or `None` for a removed workspace.
    async fn evaluate_heartbeat(
        &self,
        req: &HeartbeatRequest,
        attempt: u32,
    ) -> Result<Option<Verdict>, RegistryError> {
        // The first attempt may use a cached snapshot: the writer checks its
        // version, and a conflict brings a fresh read.
        let read = if attempt == 1 {
            Read::Cached
        } else {
            Read::Fresh
        };
        let snap = self.load_and_authenticate(&req.workspace_id, req.bearer.as_deref(), read)?;
        if snap.workspace.status == Status::Removed {
            return Ok(None);
        }
        let chain = self.chain.load_full();
        let version = snap.version;
        let backfill_writes =
            !snap.has_agent_card || snap.workspace.last_register_failure_ms.is_some();
        let mut workspace = snap.workspace;
        if !workspace.conditions.is_empty() {
            chain.retain_in_force(&mut workspace.conditions);
        }
        // What this heartbeat declares replaces the stored before the
        // policies look (the original applies it from the next beat), and a
        // card it carries clears the register-failure stamp first, as the
        // original's backfill does before it evaluates the status.
        let runtime_changed = workspace.capabilities != req.runtime.capabilities
            || workspace.idle_timeout_seconds != req.runtime.idle_timeout_seconds;
        workspace.capabilities.clone_from(&req.runtime.capabilities);
        workspace.idle_timeout_seconds = req.runtime.idle_timeout_seconds;
        if req.agent_card.is_some() {
            workspace.last_register_failure_ms = None;
        }
        let input = Arc::new(Input {
            event: Event::Heartbeat(req.event.clone()),
            workspace,
            markers: snap.markers,
            now_ms: self.clock.now_ms(),
        });
        let outcome = Arc::new(chain.evaluate_async(&input).await);
        let checked = check_final(&input, &outcome);
        let mut write = self.verdict_write(&input, &chain, &outcome, &checked, attempt);
        write.expected_version = Some(version);
        write.liveness = Some(Liveness {
            error_rate: req.event.error_rate,
            sample_error: req.event.sample_error.clone(),
            active_tasks: req.event.active_tasks,
            uptime_seconds: req.event.uptime_seconds,
            current_task: req.event.current_task.clone(),
            loaded_mcp_tools: req.event.loaded_mcp_tools.clone(),
        });
        if runtime_changed {
            write.runtime = Some(req.runtime.clone());
        }
        // The backfill writes only where it changes something, so a runtime
        // that sends its card with every heartbeat keeps the liveness-only
        // path (acknowledged once queued).
        if backfill_writes {
            write.agent_card_backfill.clone_from(&req.agent_card);
        }
        let summary = summarize(input.workspace.status, &checked);
        let recorded = write.decision.outcome.clone();
        let chain_version = write.decision.chain_version.clone();
        Ok(Some(Verdict {
            write,
            pending: Pending {
                input,
                outcome,
                checked,
                summary,
                recorded,
                chain_version,
                inbound_secret: snap.inbound_secret,
            },
        }))
    }

    /// Evaluate and apply a register.
    pub fn register(&self, req: &RegisterRequest) -> Result<Registered, RegistryError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let snap = match self.load_and_authenticate(&req.id, req.bearer.as_deref(), Read::Fresh)
            {
                Err(RegistryError::UnknownWorkspace) if self.open_registration => {
                    // `platform` is granted by an operator, never by a runtime.
                    if req.kind == Some(WorkspaceKind::Platform) {
                        return Err(RegistryError::PlatformKindRefused);
                    }
                    self.open_register(&req.id)?;
                    self.load_and_authenticate(&req.id, req.bearer.as_deref(), Read::Fresh)?
                }
                other => other?,
            };
            let now_ms = self.clock.now_ms();
            if snap.workspace.status == Status::Removed {
                return Err(RegistryError::UnknownWorkspace);
            }
            if req.kind == Some(WorkspaceKind::Platform)
                && snap.workspace.kind != WorkspaceKind::Platform
            {
                self.stamp_failure(&req.id, now_ms);
                return Err(RegistryError::PlatformKindRefused);
            }
            let delivery_mode = req
                .delivery_mode
                .clone()
                .unwrap_or_else(|| snap.delivery_mode.clone());
            let url = req
                .url
                .clone()
                .filter(|u| !u.is_empty())
                .or_else(|| req.agent_card_url.clone().filter(|u| !u.is_empty()));
            let chain = self.chain.load_full();
            let mut workspace = snap.workspace.clone();
            chain.retain_in_force(&mut workspace.conditions);
            workspace.capabilities.clone_from(&req.runtime.capabilities);
            workspace.idle_timeout_seconds = req.runtime.idle_timeout_seconds;
            let input = Arc::new(Input {
                event: Event::Register(RegisterEvent {
                    url: url.clone().unwrap_or_default(),
                    delivery_mode: delivery_mode.clone(),
                    requested_kind: req.kind,
                    mcp_server_present: req.mcp_server_present,
                    loaded_mcp_tools: req.loaded_mcp_tools.clone(),
                }),
                workspace,
                markers: snap.markers.clone(),
                now_ms,
            });
            let outcome = Arc::new(chain.evaluate(&input));
            let checked = check_final(&input, &outcome);
            let mut write = self.verdict_write(&input, &chain, &outcome, &checked, attempt);
            let mut minted = None;
            let result = match &checked {
                Err(failure) => Err(RegistryError::RegistrationFailed(failure.to_string())),
                Ok(effects) => match &effects.reject {
                    Some((http_status, message)) => {
                        write.stamp_register_failure = true;
                        write.decision.outcome = "rejected".into();
                        Err(RegistryError::Rejected {
                            http_status: *http_status,
                            message: message.clone(),
                            policy: rejecting_policy(&outcome),
                        })
                    }
                    // Push mode only (a poll-mode agent is never called):
                    // the card's URL and the agent URL must be ones the
                    // configured mode allows (SSRF).
                    None if delivery_mode == "push" => match self.push_url_refusal(req, &url) {
                        Some(refused) => {
                            write = self
                                .bare_write(&input, &chain, &outcome, None, attempt, "rejected");
                            write.stamp_register_failure = true;
                            Err(refused)
                        }
                        None => Ok(()),
                    },
                    None => Ok(()),
                },
            };
            if result.is_ok() {
                if snap.live_token_hashes.is_empty() {
                    minted = Some(auth::mint().map_err(|e| {
                        RegistryError::RegistrationFailed(format!("minting a token: {e}"))
                    })?);
                }
                write.registration = Some(Registration {
                    url: url.clone(),
                    agent_card: req.agent_card.clone(),
                    delivery_mode: delivery_mode.clone(),
                    runtime: req.runtime.clone(),
                    new_token: minted.as_ref().map(|m| m.stored.clone()),
                });
            }
            write.expected_version = Some(snap.version);
            let recorded = write.decision.outcome.clone();
            match self.store.apply(write) {
                Ok(Applied::Done {
                    queued,
                    token_stored,
                    ..
                }) => {
                    self.count(&input, &recorded, &checked, &outcome);
                    if !queued.is_empty() {
                        self.deliverer.queued(&queued);
                    }
                    self.compare_with_shadow(&input, &outcome);
                    result?;
                    let inbound_secret =
                        snap.inbound_secret.or_else(|| self.inbound_secret(&req.id));
                    return Ok(Registered {
                        delivery_mode,
                        auth_token: minted.filter(|_| token_stored).map(|m| m.plaintext),
                        verdict: summarize(snap.workspace.status, &checked),
                        chain_version: chain.version.clone(),
                        inbound_secret,
                    });
                }
                Ok(Applied::Conflict) => continue,
                Ok(Applied::Coalesced) => {
                    return Err(RegistryError::RegistrationFailed(NOT_WRITTEN.into()));
                }
                Err(StoreError::Unavailable(e)) => return Err(RegistryError::Unavailable(e)),
                Err(e) => return Err(RegistryError::RegistrationFailed(e.to_string())),
            }
        }
        Err(RegistryError::RegistrationFailed(format!(
            "state kept changing under {MAX_ATTEMPTS} evaluations"
        )))
    }

    /// Why a push-mode register may not store its URLs, if it may not: no
    /// URL at all, the card's `url` refused, or the agent URL refused.
    /// May resolve names (blocking, bounded by the policy's timeout).
    fn push_url_refusal(
        &self,
        req: &RegisterRequest,
        url: &Option<String>,
    ) -> Option<RegistryError> {
        if let Some(card_url) = req.agent_card_url.as_deref().filter(|u| !u.is_empty())
            && let Err(e) = self.agent_urls.check(card_url)
        {
            return Some(RegistryError::CardUrlNotAllowed(e.to_string()));
        }
        let Some(url) = url else {
            return Some(RegistryError::UrlRequired);
        };
        // The card's URL, when it is the fallback, was checked above.
        if req.url.as_deref().is_some_and(|u| !u.is_empty())
            && let Err(e) = self.agent_urls.check(url)
        {
            return Some(RegistryError::UrlNotAllowed(e.to_string()));
        }
        None
    }

    /// Submit `write` to the store and wait for its commit.
    async fn committed(&self, write: VerdictWrite) -> Result<Applied, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.store.submit(
            write,
            Box::new(move |applied| {
                let _ = tx.send(applied);
            }),
        );
        rx.await.unwrap_or(Err(StoreError::WriterStopped))
    }

    /// The service's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Evaluate the silence of workspace `id` at `now_ms` if `rule` says its
    /// deadline passed, and apply the verdict (what the liveness sweep calls
    /// for each workspace the store found past its deadline). The verdict is
    /// written only if the workspace's version and its deadline's reference
    /// (last register or heartbeat, or the start of `provisioning`) are
    /// still what the evaluation saw: a heartbeat that lands first wins,
    /// and a conflict is evaluated again on fresh state, which then finds
    /// nothing due. Each deadline is evaluated once, whatever the chain
    /// decides (a failed evaluation is recorded and not retried until the
    /// next register or heartbeat).
    pub async fn notice_silence(
        &self,
        id: &str,
        rule: &SilenceRule,
        now_ms: i64,
    ) -> Result<SilenceOutcome, RegistryError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let snap =
                self.store
                    .load(id, Read::Fresh)
                    .map_err(|e| RegistryError::StateUnavailable {
                        what: e.reading().unwrap_or("its workspace"),
                        error: e,
                    })?;
            let Some(snap) = snap else {
                return Ok(SilenceOutcome::NotDue);
            };
            let ws = &snap.workspace;
            let since = match rule.kind {
                SilenceKind::HeartbeatExpired => matches!(
                    ws.status,
                    Status::Online | Status::Degraded | Status::Failed
                )
                .then_some(ws.last_heartbeat_ms)
                .flatten(),
                SilenceKind::ProvisionTimeout => (ws.status == Status::Provisioning)
                    .then_some(ws.status_since_ms)
                    .flatten(),
            };
            let Some(since_ms) = since.filter(|s| snap.silence_noticed_ms != Some(*s)) else {
                return Ok(SilenceOutcome::NotDue);
            };
            if now_ms
                < since_ms
                    .saturating_add(rule.limit_ms)
                    .max(rule.not_before_ms)
            {
                return Ok(SilenceOutcome::NotDue);
            }
            let chain = self.chain.load_full();
            let version = snap.version;
            let mut workspace = snap.workspace;
            chain.retain_in_force(&mut workspace.conditions);
            let input = Arc::new(Input {
                event: Event::Silence(SilenceEvent {
                    kind: rule.kind,
                    last_heartbeat_ms: workspace.last_heartbeat_ms,
                    silent_for_ms: now_ms.saturating_sub(since_ms),
                }),
                workspace,
                markers: snap.markers,
                now_ms,
            });
            let outcome = Arc::new(chain.evaluate_async(&input).await);
            let checked = check_final(&input, &outcome);
            let mut write = self.verdict_write(&input, &chain, &outcome, &checked, attempt);
            write.expected_version = Some(version);
            write.silence = Some(SilenceSeen {
                kind: rule.kind,
                since_ms: Some(since_ms),
            });
            let recorded = write.decision.outcome.clone();
            match self.committed(write).await {
                Ok(Applied::Done { queued, .. }) => {
                    self.count(&input, &recorded, &checked, &outcome);
                    if !queued.is_empty() {
                        self.deliverer.queued(&queued);
                    }
                    self.compare_with_shadow(&input, &outcome);
                    return Ok(match &checked {
                        Err(_) => SilenceOutcome::Failed,
                        Ok(Effects {
                            status: Some(change),
                            ..
                        }) if change.to != change.expected => {
                            self.metrics
                                .silence_transition(rule.kind.as_str(), change.to.as_str());
                            SilenceOutcome::Changed {
                                from: change.expected,
                                to: change.to,
                            }
                        }
                        Ok(_) => SilenceOutcome::Unchanged,
                    });
                }
                Ok(Applied::Conflict) => continue,
                Ok(Applied::Coalesced) => {
                    return Err(RegistryError::UpdateFailed(NOT_WRITTEN.into()));
                }
                Err(StoreError::Unavailable(e)) => return Err(RegistryError::Unavailable(e)),
                Err(e) => return Err(RegistryError::UpdateFailed(e.to_string())),
            }
        }
        Err(RegistryError::UpdateFailed(format!(
            "state kept changing under {MAX_ATTEMPTS} evaluations"
        )))
    }

    fn open_register(&self, id: &str) -> Result<(), RegistryError> {
        let new = NewWorkspace {
            id: id.to_string(),
            name: String::new(),
            kind: WorkspaceKind::Workspace,
            model_configured: false,
            runtime: String::new(),
        };
        match self.store.add_workspace(&new, self.clock.now_ms()) {
            Ok(()) | Err(StoreError::Exists(_)) => Ok(()),
            Err(StoreError::Refused(reason)) => Err(RegistryError::BadWorkspaceId(reason)),
            Err(e) => Err(RegistryError::RegistrationFailed(e.to_string())),
        }
    }

    fn stamp_failure(&self, id: &str, now_ms: i64) {
        if let Err(e) = self.store.stamp_register_failure(id, now_ms) {
            tracing::warn!(workspace_id = id, error = %e, "could not stamp the register failure");
        }
    }

    /// A write carrying only the decision row (of a failed evaluation if
    /// `failure` is given).
    fn bare_write(
        &self,
        input: &Arc<Input>,
        chain: &Chain,
        outcome: &Arc<ChainOutcome>,
        failure: Option<&SlotFailure>,
        attempts: u32,
        decision_outcome: &str,
    ) -> VerdictWrite {
        VerdictWrite {
            workspace_id: input.workspace.id.clone(),
            expected_version: None,
            now_ms: input.now_ms,
            liveness: None,
            registration: None,
            stamp_register_failure: false,
            runtime: None,
            agent_card_backfill: None,
            status: None,
            events: Vec::new(),
            markers: Vec::new(),
            conditions: Vec::new(),
            reconciles: Vec::new(),
            silence: None,
            decision: DecisionRecord {
                event_kind: input.event.kind().to_string(),
                chain_version: chain.version.clone(),
                outcome: decision_outcome.to_string(),
                detail: Arc::new(Detail {
                    input: input.clone(),
                    outcome: outcome.clone(),
                    failure: failure.cloned(),
                }),
                attempts,
            },
        }
    }

    fn verdict_write(
        &self,
        input: &Arc<Input>,
        chain: &Chain,
        outcome: &Arc<ChainOutcome>,
        checked: &Result<Effects, SlotFailure>,
        attempts: u32,
    ) -> VerdictWrite {
        match checked {
            Err(failure) => {
                let w = self.bare_write(
                    input,
                    chain,
                    outcome,
                    Some(failure),
                    attempts,
                    &format!("failed:{}", failure.failure.kind.as_str()),
                );
                tracing::warn!(
                    workspace_id = %input.workspace.id,
                    slot = %failure.slot,
                    outcome = failure.failure.kind.as_str(),
                    message = %failure.failure.message,
                    "policy evaluation failed closed"
                );
                w
            }
            Ok(effects) => {
                let mut w = self.bare_write(input, chain, outcome, None, attempts, "applied");
                w.status = effects.status.clone();
                w.events = effects.events.clone();
                w.markers = effects.markers.clone();
                w.conditions = effects.conditions.clone();
                w.reconciles = effects.reconciles.clone();
                w
            }
        }
    }
}

/// A decision row's JSON, serialized by the store when it writes the row
/// (so a coalesced liveness-only verdict is never serialized).
#[derive(Debug)]
struct Detail {
    input: Arc<Input>,
    outcome: Arc<ChainOutcome>,
    /// The evaluation failed closed: the final actions column says why.
    failure: Option<SlotFailure>,
}

impl DecisionDetail for Detail {
    fn input_json(&self) -> String {
        serde_json::to_string(&*self.input).unwrap_or_default()
    }

    fn steps_json(&self) -> String {
        serde_json::to_string(&self.outcome.steps).unwrap_or_default()
    }

    fn final_actions_json(&self) -> String {
        match (&self.failure, &self.outcome.result) {
            (Some(failure), _) => {
                serde_json::to_string(&FailedOutcome { failure }).unwrap_or_default()
            }
            (None, Ok(actions)) => serde_json::to_string(actions).unwrap_or_default(),
            (None, Err(_)) => "[]".to_string(),
        }
    }
}

/// A heartbeat's verdict: the write goes to the store, the rest stays with
/// the executor until the store has answered.
struct Verdict {
    write: VerdictWrite,
    pending: Pending,
}

struct Pending {
    input: Arc<Input>,
    outcome: Arc<ChainOutcome>,
    checked: Result<Effects, SlotFailure>,
    summary: String,
    /// The decision log's outcome label, for the metrics.
    recorded: String,
    chain_version: String,
    inbound_secret: Option<InboundSecret>,
}

/// The name of the policy whose step first proposed a rejection.
fn rejecting_policy(outcome: &ChainOutcome) -> String {
    outcome
        .steps
        .iter()
        .find(|step| {
            step.output.as_ref().is_some_and(|actions| {
                actions
                    .iter()
                    .any(|a| matches!(a.effect, Effect::Reject { .. }))
            })
        })
        .map(|step| step.id.policy.clone())
        .unwrap_or_default()
}

/// `from`: the status the verdict was computed from.
fn summarize(from: Status, checked: &Result<Effects, SlotFailure>) -> String {
    match checked {
        Err(f) => format!("failed:{}", f.failure.kind.as_str()),
        Ok(e) => {
            let mut parts = Vec::new();
            if let Some(s) = &e.status {
                parts.push(format!("{}->{}", from.as_str(), s.to.as_str()));
            }
            if e.reject.is_some() {
                parts.push("rejected".into());
            }
            for r in &e.reconciles {
                parts.push(format!("reconcile:{}", r.as_str()));
            }
            if parts.is_empty() {
                "unchanged".into()
            } else {
                parts.join(",")
            }
        }
    }
}

/// Check a chain's final actions as the executor does before applying them
/// (one status change expecting the stored status, a rejection only of a
/// register, well-formed events and markers), applying nothing: what the
/// authoring tools use to give a chain's verdict as the service would.
pub fn check_verdict(input: &Input, outcome: &ChainOutcome) -> Result<(), SlotFailure> {
    check_final(input, outcome).map(drop)
}

/// Validate the chain's final actions against the request and the snapshot,
/// and group them for the store. Any violation fails the whole verdict closed.
fn check_final(input: &Input, outcome: &ChainOutcome) -> Result<Effects, SlotFailure> {
    let actions = outcome.result.as_ref().map_err(Clone::clone)?;
    let last_slot = outcome
        .steps
        .last()
        .map(|s| s.id.slot.clone())
        .unwrap_or_default();
    let invalid = |message: String| SlotFailure {
        slot: last_slot.clone(),
        failure: EvalFailure::new(FailureKind::InvalidOutput, message),
    };
    let current = input.workspace.status;
    let mut effects = Effects {
        status: None,
        reject: None,
        events: Vec::new(),
        markers: Vec::new(),
        conditions: Vec::new(),
        reconciles: Vec::new(),
    };
    // A marker write is the slot's that runs the policy it names (a chain
    // runs each policy name once): every marker action of the service's
    // chains was added by that slot, whose output check required its own
    // name. Only an author's fixture can propose one of a policy outside
    // the chain; it is then kept under a slot of the policy's name.
    let slot_of = |owner: &str| -> String {
        outcome
            .steps
            .iter()
            .find(|s| s.id.policy == owner)
            .map_or_else(|| owner.to_string(), |s| s.id.slot.clone())
    };
    let seen: HashMap<MarkerKey, &str> = input
        .markers
        .iter()
        .map(|m| {
            let slot = m.slot.clone().unwrap_or_else(|| slot_of(&m.owner));
            ((slot, m.owner.clone(), m.key.clone()), m.value.as_str())
        })
        .collect();
    // The last write to a marker wins; keep first-write order.
    let mut marker_writes: Vec<(MarkerKey, Option<String>)> = Vec::new();
    // Likewise for conditions: (slot, owner, name) -> what it says after.
    let mut condition_writes: Vec<(MarkerKey, Option<ConditionState>)> = Vec::new();
    for Action {
        workspace_id,
        effect,
    } in actions
    {
        if workspace_id != &input.workspace.id {
            return Err(invalid(format!(
                "an action targets another workspace `{workspace_id}`"
            )));
        }
        match effect {
            Effect::SetStatus {
                to,
                expected,
                message,
                ..
            } => {
                if effects.status.is_some() {
                    return Err(invalid("more than one status change in one verdict".into()));
                }
                if *expected != current {
                    return Err(invalid(format!(
                        "a status change expects `{}` but the workspace is `{}`",
                        expected.as_str(),
                        current.as_str()
                    )));
                }
                if current.is_frozen() || to.is_frozen() {
                    return Err(invalid(format!(
                        "status `{}` -> `{}`: removed, paused and hibernated workspaces are never changed by a heartbeat or register",
                        current.as_str(),
                        to.as_str()
                    )));
                }
                effects.status = Some(StatusWrite {
                    expected: *expected,
                    to: *to,
                    message: message.clone(),
                });
            }
            Effect::Reject {
                http_status,
                message,
            } => {
                if !matches!(input.event, Event::Register(_)) {
                    return Err(invalid("only a register can be rejected".into()));
                }
                if !(400..=499).contains(http_status) || effects.reject.is_some() {
                    return Err(invalid(format!(
                        "a rejection must be one 4xx status, not {http_status}"
                    )));
                }
                effects.reject = Some((*http_status, message.clone()));
            }
            Effect::RecordEvent {
                event_type,
                payload_json,
            } => {
                let well_formed = !event_type.is_empty()
                    && event_type.len() <= 64
                    && event_type
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
                if !well_formed {
                    return Err(invalid(format!(
                        "event type `{event_type}` must be 1-64 of A-Z, 0-9, _"
                    )));
                }
                let payload: serde_json::Value = serde_json::from_str(payload_json)
                    .map_err(|e| invalid(format!("event payload is not JSON: {e}")))?;
                if !payload.is_object() {
                    return Err(invalid("event payload must be a JSON object".into()));
                }
                effects
                    .events
                    .push((event_type.clone(), payload.to_string()));
            }
            Effect::RequestReconcile { trigger } => {
                if !effects.reconciles.contains(trigger) {
                    effects.reconciles.push(*trigger);
                }
            }
            Effect::SetMarker { owner, key, value } => {
                if key.is_empty() || key.len() > MAX_MARKER_KEY || value.len() > MAX_MARKER_VALUE {
                    return Err(invalid(format!(
                        "marker `{key}`: keys are 1-{MAX_MARKER_KEY} bytes, values at most {MAX_MARKER_VALUE}"
                    )));
                }
                upsert(
                    &mut marker_writes,
                    (slot_of(owner), owner.clone(), key.clone()),
                    Some(value.clone()),
                );
            }
            Effect::ClearMarker { owner, key } => {
                upsert(
                    &mut marker_writes,
                    (slot_of(owner), owner.clone(), key.clone()),
                    None,
                );
            }
            Effect::SetCondition {
                owner,
                name,
                severity,
                reason,
                message,
            } => {
                // The bounds each slot's output was checked against (a
                // fixture's `proposed` actions were not).
                if let Some(problem) = crate::chain::condition_problem(effect) {
                    return Err(invalid(problem));
                }
                upsert(
                    &mut condition_writes,
                    (slot_of(owner), owner.clone(), name.clone()),
                    Some(ConditionState {
                        severity: *severity,
                        reason: reason.clone(),
                        message: message.clone(),
                    }),
                );
            }
            Effect::ClearCondition { owner, name } => {
                upsert(
                    &mut condition_writes,
                    (slot_of(owner), owner.clone(), name.clone()),
                    None,
                );
            }
        }
    }
    let in_force: HashMap<MarkerKey, ConditionState> = input
        .workspace
        .conditions
        .iter()
        .map(|c| {
            let slot = c.slot.clone().unwrap_or_else(|| slot_of(&c.owner));
            (
                (slot, c.owner.clone(), c.name.clone()),
                ConditionState {
                    severity: c.severity,
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                },
            )
        })
        .collect();
    // Restating a condition already in force, or clearing one that is not,
    // writes nothing: a policy states its condition on every evaluation it
    // holds, and a steady workspace's heartbeats stay liveness-only.
    effects.conditions = condition_writes
        .into_iter()
        .filter(|(at, new)| in_force.get(at) != new.as_ref())
        .map(|((slot, owner, name), new)| ConditionWrite {
            slot,
            owner,
            name,
            new,
        })
        .collect();
    effects.markers = marker_writes
        .into_iter()
        .filter_map(|(at, new)| {
            let before = seen.get(&at).map(|v| v.to_string());
            let (slot, owner, key) = at;
            // A write that changes nothing needs no compare-and-set.
            (before != new).then_some(MarkerWrite {
                slot,
                owner,
                key,
                seen: before,
                new,
            })
        })
        .collect();
    Ok(effects)
}

/// A marker's identity: (slot, owner, key).
type MarkerKey = (String, String, String);

fn upsert<T>(writes: &mut Vec<(MarkerKey, Option<T>)>, key: MarkerKey, value: Option<T>) {
    match writes.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => writes.push((key, value)),
    }
}
