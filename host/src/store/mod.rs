//! The store: the only code that knows SQL.
//!
//! [`Store`] is the interface the rest of the host uses; [`SqliteStore`] is the
//! embedded implementation (rusqlite, bundled SQLite, WAL, migrations embedded
//! in the binary) and [`PgStore`] the one for several hosts on one PostgreSQL
//! database. Every method is blocking: callers run it on a blocking
//! thread, never on an async worker; the exceptions are [`Store::load`], a
//! short read the heartbeat path makes on its own thread, and
//! [`Store::submit`], which only queues.
//!
//! On SQLite, verdicts are written by one writer thread (group commit): everything
//! queued while it was committing goes into its next transaction, a savepoint
//! per verdict, and each verdict's caller hears of it only after the commit.
//!
//! Per-workspace consistency lives in the database, not in process memory: a
//! verdict is applied in one transaction whose status write and marker writes
//! are compare-and-set against the state the verdict was computed from. If
//! anything changed in between, [`Store::apply`] reports
//! [`Applied::Conflict`] and writes nothing, and the caller re-evaluates on
//! fresh state. That is what keeps the recovery cooldown to one fire per
//! window under concurrent heartbeats and across restarts, and it maps
//! directly onto `UPDATE ... WHERE` on PostgreSQL.
//!
//! # Layout
//! - this module: the [`Store`] interface and the types it speaks;
//! - [`sqlite`]: the embedded SQLite store: its connections and snapshot
//!   cache (`mod.rs`), the writer thread with group commit, coalescing,
//!   pruning and checkpoints (`writer.rs`), the reads (`read.rs`), and the
//!   schema's migrations (`migrations.rs`).
//! - [`postgres`]: the PostgreSQL store: its pool and runtime, leases and
//!   pruning (`mod.rs`), verdicts under the workspace's row lock
//!   (`verdict.rs`), the reads (`read.rs`), and its schema (`schema.rs`);
//! - `cache.rs`: the snapshot cache both keep;
//! - `suite.rs` (tests): the behaviour both must have, one suite run on each.

mod cache;
pub mod health;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod suite;

pub use health::StoreMetrics;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use std::sync::Arc;

use serde::Serialize;

use crate::model::{Condition, Marker, ReconcileTrigger, Status, Workspace, WorkspaceKind};

/// The privileged plugin that only a platform workspace may declare.
pub const MANAGEMENT_PLUGIN: &str = "molecule-ai-plugin-molecule-platform-mcp";

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Postgres(tokio_postgres::Error),
    /// The database cannot be reached (no connection within the pool's
    /// wait, or the server is down): the request may be retried.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("unknown workspace `{0}`")]
    UnknownWorkspace(String),
    #[error("workspace `{0}` already exists")]
    Exists(String),
    #[error("{0}")]
    Refused(String),
    #[error("database schema version {found} is newer than this binary's {supported}")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("the store's connection lock was poisoned")]
    Poisoned,
    #[error("the store's writer has stopped")]
    WriterStopped,
    #[error("database error: {0}")]
    Failed(String),
    /// A read of one part of a workspace's snapshot failed (`what` says
    /// which, in words a client may see).
    #[error("reading {what} failed: {source}")]
    Read {
        what: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The module store is full.
    #[error("{0}")]
    QuotaExceeded(String),
    /// Something still uses what was to be deleted.
    #[error("{0}")]
    InUse(String),
    /// The database a command needs is not there (nothing was created).
    #[error("{0}")]
    Missing(String),
}

impl StoreError {
    /// The part of a workspace a failed snapshot read was reading (`its
    /// tokens`, `its declared plugins`, ...), if that is what failed.
    pub fn reading(&self) -> Option<&'static str> {
        match self {
            StoreError::Read { what, .. } => Some(what),
            _ => None,
        }
    }
}

/// The part of a snapshot a failed read was reading, for the error
/// ([`StoreError::reading`]).
pub const READING_ROW: &str = "the workspace";
pub const READING_PLUGINS: &str = "its declared plugins";
pub const READING_MARKERS: &str = "its policy markers";
/// What [`StoreError::reading`] says when a snapshot read failed at the
/// workspace's tokens.
pub const READING_TOKENS: &str = "its tokens";
pub const READING_CONDITIONS: &str = "its conditions";
/// What a failed read of a shadow chain's own state was reading.
pub const READING_SHADOW: &str = "its shadow state";

/// Everything the request path needs about one workspace, read at once.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub workspace: Workspace,
    /// All policy markers of the workspace (every owner).
    pub markers: Vec<Marker>,
    /// SHA-256 hashes of its live tokens.
    pub live_token_hashes: Vec<Vec<u8>>,
    /// Whether a request without a live token may bootstrap one: only until
    /// the workspace first had a token (or the operator reopened it).
    pub token_bootstrap: bool,
    pub delivery_mode: String,
    /// The workspace's version: the database bumps it (by trigger) on every
    /// change to anything above, whoever makes it.
    pub version: i64,
    /// The deadline reference (last heartbeat, or start of `provisioning`)
    /// a silence verdict was last evaluated for.
    pub silence_noticed_ms: Option<i64>,
    /// The secret the platform authenticates its calls into the workspace
    /// with, once minted (not part of the version: a cached snapshot's is
    /// refreshed by the read that confirms its version).
    pub inbound_secret: Option<crate::auth::InboundSecret>,
    /// Whether an agent card is stored (also outside the version, and
    /// refreshed like the secret).
    pub has_agent_card: bool,
}

/// The liveness fields of a heartbeat, stored on every accepted beat.
#[derive(Clone, Debug)]
pub struct Liveness {
    pub error_rate: f64,
    pub sample_error: String,
    pub active_tasks: i64,
    pub uptime_seconds: i64,
    pub current_task: Option<String>,
    pub loaded_mcp_tools: Option<Vec<String>>,
}

/// The fields a successful register stores.
#[derive(Clone, Debug)]
pub struct Registration {
    pub url: Option<String>,
    pub agent_card: String,
    pub delivery_mode: String,
    /// What the runtime declared (replacing the stored).
    pub runtime: crate::model::RuntimeMetadata,
    /// A new token to store if the workspace has no live token at commit.
    pub new_token: Option<NewToken>,
}

/// A token to store: only its hash and a display prefix.
#[derive(Clone, Debug)]
pub struct NewToken {
    pub hash: Vec<u8>,
    pub prefix: String,
}

/// A conditional status write.
#[derive(Clone, Debug)]
pub struct StatusWrite {
    pub expected: Status,
    pub to: Status,
    pub message: Option<String>,
}

/// A compare-and-set on one marker: applied only if its stored value is still
/// `seen`; `new == None` clears it.
#[derive(Clone, Debug)]
pub struct MarkerWrite {
    /// The slot of the chain it belongs to, with the policy name `owner`.
    pub slot: String,
    pub owner: String,
    pub key: String,
    pub seen: Option<String>,
    pub new: Option<String>,
}

/// One condition's write: put in force (or changed) with `new`, or cleared
/// with `new == None`. Only writes that change something are made; the
/// workspace's version check covers their concurrency.
#[derive(Clone, Debug)]
pub struct ConditionWrite {
    /// The slot of the chain it belongs to, with the policy name `owner`.
    pub slot: String,
    pub owner: String,
    pub name: String,
    pub new: Option<ConditionState>,
}

/// What a condition in force says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionState {
    pub severity: crate::model::Severity,
    pub reason: String,
    pub message: String,
}

/// The decision-log row of one evaluation.
#[derive(Clone, Debug)]
pub struct DecisionRecord {
    pub event_kind: String,
    pub chain_version: String,
    /// `applied`, `rejected`, or `failed:<kind>`.
    pub outcome: String,
    /// The input, steps and final actions, serialized when the row is
    /// written, on the writer's thread: never for a verdict coalesced into
    /// a later one.
    pub detail: Arc<dyn DecisionDetail>,
    pub attempts: u32,
}

/// What a decision row's JSON columns are made from.
pub trait DecisionDetail: Send + Sync + std::fmt::Debug {
    fn input_json(&self) -> String;
    fn steps_json(&self) -> String;
    fn final_actions_json(&self) -> String;
}

/// Everything one verdict writes, in one transaction.
#[derive(Clone, Debug)]
pub struct VerdictWrite {
    pub workspace_id: String,
    pub now_ms: i64,
    /// The version of the snapshot the verdict was computed from; the
    /// verdict is a conflict if the workspace has changed since.
    pub expected_version: Option<i64>,
    pub liveness: Option<Liveness>,
    pub registration: Option<Registration>,
    pub stamp_register_failure: bool,
    /// A heartbeat's `runtime_metadata`, when it differs from the stored.
    pub runtime: Option<crate::model::RuntimeMetadata>,
    /// A heartbeat's agent card: stored if the workspace has none, and the
    /// register-failure stamp is cleared (as the original registry does).
    pub agent_card_backfill: Option<String>,
    pub status: Option<StatusWrite>,
    pub events: Vec<(String, String)>,
    pub markers: Vec<MarkerWrite>,
    pub conditions: Vec<ConditionWrite>,
    pub reconciles: Vec<ReconcileTrigger>,
    /// A silence verdict: written only if the workspace's liveness is still
    /// what its evaluation saw, and it records that this deadline was
    /// evaluated.
    pub silence: Option<SilenceSeen>,
    pub decision: DecisionRecord,
}

/// The liveness a silence verdict was computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SilenceSeen {
    pub kind: crate::model::SilenceKind,
    /// The last register or heartbeat (`heartbeat_expired`) or when
    /// `provisioning` began (`provision_timeout`), as read.
    pub since_ms: Option<i64>,
}

/// Which silent workspaces [`Store::silent_workspaces`] returns: those of
/// `kind` whose deadline's reference (last register or heartbeat, or the
/// start of `provisioning`) is at or before `before_ms` and whose deadline
/// was not evaluated yet, in the order of that reference and then id,
/// after `after`, at most `limit`.
#[derive(Clone, Debug)]
pub struct SilenceQuery {
    pub kind: crate::model::SilenceKind,
    pub before_ms: i64,
    pub after: Option<(i64, String)>,
    pub limit: usize,
}

/// A workspace whose deadline may have passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SilentWorkspace {
    pub id: String,
    pub kind: crate::model::SilenceKind,
    /// The deadline's reference: the last register or heartbeat, or when
    /// `provisioning` began.
    pub since_ms: i64,
    pub runtime: String,
}

impl VerdictWrite {
    /// Whether the verdict writes nothing but liveness (last heartbeat time,
    /// counters) and its decision row: no status change, marker, event,
    /// reconcile request or registration. Only such a verdict may be
    /// acknowledged before it is committed.
    pub fn records_only_liveness(&self) -> bool {
        self.status.is_none()
            && self.markers.is_empty()
            && self.conditions.is_empty()
            && self.events.is_empty()
            && self.reconciles.is_empty()
            && self.registration.is_none()
            && !self.stamp_register_failure
            && self.runtime.is_none()
            && self.agent_card_backfill.is_none()
            && self.silence.is_none()
    }
}

/// A reconcile run queued by a verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueuedRun {
    pub id: i64,
    pub workspace_id: String,
    pub trigger: ReconcileTrigger,
}

/// The outcome of [`Store::apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Committed.
    Done {
        decision_id: i64,
        queued: Vec<QueuedRun>,
        token_stored: bool,
    },
    /// The state changed since the snapshot; nothing was written.
    Conflict,
    /// A liveness-only verdict superseded by a later one of the same
    /// workspace, which was written in its place (see
    /// [`Store::submit_liveness`]).
    Coalesced,
}

/// A workspace to provision.
#[derive(Clone, Debug)]
pub struct NewWorkspace {
    pub id: String,
    pub name: String,
    pub kind: WorkspaceKind,
    pub model_configured: bool,
    /// The runtime's name (`external`, `hermes`, ...), empty if unnamed.
    pub runtime: String,
}

/// Refuse a workspace id or runtime name no store may keep.
pub(crate) fn validate_new(new: &NewWorkspace) -> Result<(), StoreError> {
    if !crate::model::valid_workspace_id(&new.id) {
        let shown: String = new.id.chars().take(64).collect();
        return Err(StoreError::Refused(format!(
            "a workspace id must be 1-128 of A-Z, a-z, 0-9, `-`, `_`, `.`, not starting with `.` or `-`; `{shown}` is not"
        )));
    }
    if !new.runtime.is_empty() && !crate::model::valid_runtime_name(&new.runtime) {
        let shown: String = new.runtime.chars().take(64).collect();
        return Err(StoreError::Refused(format!(
            "a runtime name is at most 64 of A-Z, a-z, 0-9, `-`, `_`, `.`; `{shown}` is not"
        )));
    }
    Ok(())
}

/// Refuse the management plugin on a workspace that is not a platform
/// workspace (`what`: `declare` or `record`), whichever store is asked.
pub(crate) fn refuse_privileged(
    what: &str,
    plugin: &str,
    kind: WorkspaceKind,
    workspace_id: &str,
) -> Result<(), StoreError> {
    if plugin == MANAGEMENT_PLUGIN && kind != WorkspaceKind::Platform {
        return Err(StoreError::Refused(format!(
            "refusing to {what} privileged plugin `{plugin}` on non-platform workspace `{workspace_id}`"
        )));
    }
    Ok(())
}

/// Refuse to withdraw the management plugin of a platform workspace (see
/// [`Store::undeclare_plugin`]), whichever store is asked.
pub(crate) fn refuse_undeclare(
    plugin: &str,
    kind: WorkspaceKind,
    workspace_id: &str,
) -> Result<(), StoreError> {
    if plugin == MANAGEMENT_PLUGIN && kind == WorkspaceKind::Platform {
        return Err(StoreError::Refused(format!(
            "refusing to undeclare `{plugin}` of platform workspace `{workspace_id}`: without it the workspace fails closed and nothing can recover it; declare it again with another source instead"
        )));
    }
    Ok(())
}

/// A JSON column's value; text that is not JSON is kept as a string.
pub(crate) fn json_or_null(s: String) -> serde_json::Value {
    serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s))
}

/// The delivery mode a new workspace starts with: an agent outside the
/// platform cannot be pushed to.
pub(crate) fn initial_delivery_mode(new: &NewWorkspace) -> &'static str {
    if new.runtime == crate::liveness::EXTERNAL_RUNTIME {
        "poll"
    } else {
        "push"
    }
}

/// A shadow chain's own markers and conditions of one workspace: what it
/// is evaluated with instead of the real ones, and where its own marker and
/// condition effects go (see [`Store::shadow_state`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShadowState {
    /// Its markers, by slot, owner and key (each with its slot).
    pub markers: Vec<Marker>,
    /// Its conditions in force, by owner, name and slot (each with its slot).
    pub conditions: Vec<Condition>,
    /// Bumped by every write; 0 for a state not stored yet. A write is a
    /// compare-and-set on the version it was computed from.
    pub version: i64,
}

/// What [`Store::write_shadow_state`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowWritten {
    /// Written, one version higher.
    Stored,
    /// The state stored is not the version the write was computed from (the
    /// shadow on another host wrote it first): nothing was written.
    Conflict,
    /// The chain no longer runs in shadow (stopped or replaced, perhaps on
    /// another host): nothing was written.
    NotShadow,
}

/// A shadow state's JSON columns: its markers and its conditions, as the
/// model spells them.
pub(crate) fn shadow_state_json(state: &ShadowState) -> (String, String) {
    (
        serde_json::to_string(&state.markers).unwrap_or_else(|_| "[]".into()),
        serde_json::to_string(&state.conditions).unwrap_or_else(|_| "[]".into()),
    )
}

/// A shadow state from its JSON columns and version.
pub(crate) fn shadow_state_from(
    markers: &str,
    conditions: &str,
    version: i64,
) -> Result<ShadowState, StoreError> {
    let bad = |e: serde_json::Error| StoreError::Read {
        what: READING_SHADOW,
        source: e.into(),
    };
    Ok(ShadowState {
        markers: serde_json::from_str(markers).map_err(bad)?,
        conditions: serde_json::from_str(conditions).map_err(bad)?,
        version,
    })
}

/// A workspace as an operator sees it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkspaceRecord {
    pub id: String,
    pub name: String,
    pub kind: WorkspaceKind,
    pub status: Status,
    pub url: Option<String>,
    pub delivery_mode: String,
    pub last_sample_error: String,
    pub last_error_rate: f64,
    pub last_heartbeat_ms: Option<i64>,
    pub last_register_failure_ms: Option<i64>,
    pub model_configured: bool,
    pub declared_plugins: Vec<DeclaredPlugin>,
    pub live_tokens: i64,
    /// Whether a register without a token would mint one (never had a
    /// token, or reopened with `token revoke --allow-bootstrap`).
    pub token_bootstrap: bool,
    pub runtime: String,
    pub status_since_ms: Option<i64>,
    /// The conditions in force (with their slots), by owner and name.
    pub conditions: Vec<crate::model::Condition>,
    /// The agent card as stored (JSON text), if any; the view
    /// (`admin::workspace_view`) shows it as JSON.
    #[serde(skip)]
    pub agent_card: Option<String>,
    pub active_tasks: i64,
    pub current_task: Option<String>,
    pub uptime_seconds: i64,
    /// What the runtime last declared in `runtime_metadata`.
    pub capabilities: Vec<String>,
    pub idle_timeout_seconds: Option<i64>,
}

/// A declared plugin.
#[derive(Clone, Debug, Serialize)]
pub struct DeclaredPlugin {
    pub name: String,
    pub source: String,
}

/// How many times a run may be started before an interruption fails it.
pub const MAX_RUN_ATTEMPTS: i64 = 2;

/// What [`Store::requeue_interrupted`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requeued {
    /// Runs put back in the queue.
    pub requeued: usize,
    /// Runs interrupted [`MAX_RUN_ATTEMPTS`] times, now `failed`.
    pub failed: usize,
}

/// A reconcile run as stored.
#[derive(Clone, Debug, Serialize)]
pub struct ReconcileRun {
    pub id: i64,
    pub workspace_id: String,
    pub trigger: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub state: String,
    pub requested_ms: i64,
    pub decision_id: Option<i64>,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub attempts: i64,
    pub cause: Option<String>,
    pub detail: Option<serde_json::Value>,
}

/// An installed plugin as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstalledPlugin {
    pub name: String,
    pub source: String,
    pub tracked_ref: String,
    pub installed_sha: Option<String>,
    pub installed_ms: i64,
}

/// What a reconcile of one workspace works from.
#[derive(Clone, Debug)]
pub struct ReconcilePlan {
    pub kind: WorkspaceKind,
    pub declared: Vec<DeclaredPlugin>,
    pub installed: Vec<InstalledPlugin>,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    Succeeded,
    Failed,
}

/// A recorded event.
#[derive(Clone, Debug, Serialize)]
pub struct EventRow {
    pub id: i64,
    pub workspace_id: String,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub at_ms: i64,
}

/// A decision-log row.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionRow {
    pub id: i64,
    pub workspace_id: String,
    pub at_ms: i64,
    pub event_kind: String,
    pub chain_version: String,
    pub outcome: String,
    pub input: serde_json::Value,
    pub steps: serde_json::Value,
    pub final_actions: serde_json::Value,
    pub attempts: i64,
    /// How many evaluations this row stands for: liveness-only heartbeats
    /// of one workspace are coalesced, and only the last one's input and
    /// steps are kept.
    pub heartbeats: i64,
    /// When the first of them was evaluated (`None` for a single one).
    pub first_at_ms: Option<i64>,
}

/// How many policy modules the store keeps, and how many bytes of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleQuota {
    pub max_modules: u64,
    pub max_bytes: u64,
}

impl Default for ModuleQuota {
    fn default() -> Self {
        ModuleQuota {
            max_modules: 100,
            max_bytes: 512 << 20,
        }
    }
}

/// The refusal of a module that would take the store past `quota`, which
/// holds `count` modules of `total` bytes.
pub(crate) fn quota_exceeded(count: u64, total: u64, quota: ModuleQuota) -> StoreError {
    StoreError::QuotaExceeded(format!(
        "the module store is full: {count} modules of {} MiB stored, at most {} modules \
         and {} MiB (`[policy] max_stored_modules`, `max_stored_module_mib`); \
         `heartgate policy prune` deletes the modules no chain uses",
        total >> 20,
        quota.max_modules,
        quota.max_bytes >> 20
    ))
}

/// The cause recorded for a run failed because it was interrupted too
/// often (SQL: the attempts are concatenated in).
pub(crate) const INTERRUPTED_CAUSE_SQL: &str = "'interrupted ' || attempts || ' times (the service crashed or was stopped during this run); not retried automatically, the next trigger runs it again'";

/// A stored policy module, without its bytes.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StoredModule {
    /// `sha256:<digest>`, as a chain spec names it.
    pub module: String,
    pub name: String,
    pub version: String,
    pub size: u64,
    pub uploaded_ms: i64,
    pub uploaded_by: String,
}

/// A chain as stored: its spec (JSON, modules as `builtin:` or `sha256:`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StoredChain {
    pub id: i64,
    pub version: String,
    /// The spec as JSON text; the API shows it as an object, as it shows
    /// the active chain's.
    #[serde(serialize_with = "spec_as_object")]
    pub spec: String,
    /// `staged`, `active` or `retired`.
    pub state: String,
    pub created_ms: i64,
    pub created_by: String,
    pub activated_ms: Option<i64>,
    pub activated_by: Option<String>,
    /// The order of activations (and rollbacks), across hosts: each
    /// activation gets a higher one, and a host only moves to a higher one.
    pub activation: Option<i64>,
}

/// A stored spec as the JSON object it holds (as text if it holds none).
fn spec_as_object<S: serde::Serializer>(spec: &str, s: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_str::<serde_json::Value>(spec) {
        Ok(value) => serde::Serialize::serialize(&value, s),
        Err(_) => s.serialize_str(spec),
    }
}

/// One activation of a chain (or a rollback to one), in the order they
/// happened on every host of the database.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Activation {
    /// Its number: the order of activations, across hosts (the chain's
    /// [`StoredChain::activation`] while it is the last).
    pub id: i64,
    pub chain_id: i64,
    /// The chain's content version.
    pub chain_version: String,
    pub at_ms: i64,
    pub by: String,
    /// `activate` or `rollback`.
    pub kind: String,
    /// The chain that was active before it, if one was.
    pub from_chain: Option<i64>,
    /// The activation a rollback from this one returns to: the one before
    /// it for an activation, and for a rollback the one before the
    /// activation it returned to, so that rollbacks walk back through the
    /// history instead of toggling between two chains.
    pub back_to: Option<i64>,
}

/// What a newly stored activation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationKind {
    Activate,
    Rollback,
}

impl ActivationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActivationKind::Activate => "activate",
            ActivationKind::Rollback => "rollback",
        }
    }
}

/// The store's interface. Blocking; every method is atomic (one transaction,
/// or for `apply` one savepoint of a transaction shared with other verdicts).
pub trait Store: Send + Sync + 'static {
    /// Read the workspace, its markers and its live token hashes. With
    /// [`Read::Cached`] the answer may come from the store's cache, but only
    /// once the database has confirmed that the workspace's version is still
    /// the cached one: a snapshot is never older than the last change
    /// committed before the call (a revoked token is refused at once). A
    /// verdict carries its snapshot's version, and [`Store::submit`] reports
    /// a conflict if the workspace changed since, so a change racing the
    /// evaluation costs a re-evaluation, never a wrong write.
    fn load(&self, workspace_id: &str, read: Read) -> Result<Option<Snapshot>, StoreError>;
    /// Queue one verdict to be applied atomically, or to report a conflict
    /// and write nothing. `done` is called once with the outcome, after the
    /// verdict is durable (committed), on the store's own thread: it must be
    /// quick and must not call back into the store.
    fn submit(&self, write: VerdictWrite, done: Done);
    /// [`Store::submit`] for a verdict that
    /// [records only liveness](VerdictWrite::records_only_liveness) and whose
    /// caller does not wait for it: the store may hold it for up to
    /// [`LIVENESS_HOLD`] and write only the last of a workspace's verdicts
    /// held meanwhile (the others are answered [`Applied::Coalesced`]).
    fn submit_liveness(&self, write: VerdictWrite, done: Done) {
        self.submit(write, done);
    }
    /// Verdicts submitted and not yet answered.
    fn backlog(&self) -> u64 {
        0
    }
    /// Keep the decision log within `retention`: the oldest rows are pruned
    /// in small chunks between batches of verdicts, so pruning never holds
    /// a heartbeat for long; events of a pruned decision go with it and
    /// its reconcile runs stay, without it.
    fn set_retention(&self, _retention: Retention) {}
    /// Count commits, write failures and writability into `metrics` (once;
    /// later calls are ignored).
    fn instrument(&self, _metrics: StoreMetrics) {}
    /// Below `bytes` free on the database's file system, the store counts
    /// as unable to write (unready, no early acknowledgement).
    fn set_min_free(&self, _bytes: u64) {}
    /// Whether a verdict may be acknowledged before it is committed: not
    /// while writes are failing or the disk is nearly full. Cheap: asked
    /// on every heartbeat.
    fn allows_early_ack(&self) -> bool {
        true
    }
    /// Whether verdicts can be written now: the writer is running, no
    /// write has failed since the last commit, the files are writable and
    /// their file system has room (asked of the OS, never by opening the
    /// files outside the database engine), and the database accepts a
    /// write transaction. For `/readyz`.
    fn check_writable(&self) -> Result<(), StoreError>;
    /// Wait until every verdict submitted before this call has been
    /// answered (committed or failed): what a reader calls to see the
    /// verdicts that were acknowledged before they were committed.
    fn flush(&self) {}
    /// [`Store::submit`], waiting for the outcome.
    fn apply(&self, write: VerdictWrite) -> Result<Applied, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            write,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.recv().unwrap_or(Err(StoreError::WriterStopped))
    }
    /// Record that an authenticated register failed (for the degrade rule).
    fn stamp_register_failure(&self, workspace_id: &str, now_ms: i64) -> Result<(), StoreError>;

    /// The workspace's platform inbound secret: the stored one, or `mint`
    /// stored now if it has none (whichever host stores first wins, and
    /// every host then answers that one). None is minted for a removed
    /// workspace (`UnknownWorkspace`).
    fn inbound_secret(
        &self,
        workspace_id: &str,
        mint: &crate::auth::InboundSecret,
    ) -> Result<crate::auth::InboundSecret, StoreError>;

    /// Replace the workspace's platform inbound secret (the operator's
    /// rotation); runtimes receive it with their next register or heartbeat.
    fn rotate_inbound_secret(
        &self,
        workspace_id: &str,
        new: &crate::auth::InboundSecret,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Store a runtime's new agent card with an `AGENT_CARD_UPDATED` event
    /// (payload `event_payload`), in one transaction. A removed or unknown
    /// workspace is `UnknownWorkspace`.
    fn update_agent_card(
        &self,
        workspace_id: &str,
        card: &str,
        event_payload: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Workspaces whose silence deadline may have passed and was not
    /// evaluated yet (see [`SilenceQuery`]), read from an index: the cost is
    /// in proportion to those, not to the fleet. Removed, paused, hibernated
    /// and hibernating workspaces are never returned.
    fn silent_workspaces(&self, query: &SilenceQuery) -> Result<Vec<SilentWorkspace>, StoreError>;

    /// Record that a sweep for silence runs at `now_ms` (whichever host runs
    /// it) and return when the last outage ended. With `gap_ms` (a host's
    /// first sweep), no sweep for more than `gap_ms` (or none ever) is an
    /// outage that ends now; without, the value kept (`now_ms` if none).
    fn sweep_started(&self, now_ms: i64, gap_ms: Option<i64>) -> Result<i64, StoreError>;

    /// Provision a workspace (`provisioning`).
    fn add_workspace(&self, new: &NewWorkspace, now_ms: i64) -> Result<(), StoreError>;
    /// One workspace, as an operator sees it.
    fn workspace(&self, id: &str) -> Result<Option<WorkspaceRecord>, StoreError>;
    /// Every workspace, by id.
    fn workspaces(&self) -> Result<Vec<WorkspaceRecord>, StoreError>;
    /// Set an operator-decided status (e.g. `removed`), unconditionally.
    fn set_status(&self, id: &str, status: Status, now_ms: i64) -> Result<(), StoreError>;
    /// Record that a secret named `name` is configured (values live elsewhere).
    fn set_secret(&self, id: &str, name: &str, now_ms: i64) -> Result<(), StoreError>;
    /// Declare a plugin; the management plugin only on a platform workspace.
    fn declare_plugin(
        &self,
        id: &str,
        name: &str,
        source: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Withdraw a declared plugin: the reconciler stops delivering it (the
    /// copy already delivered stays where it is). Whether it was declared.
    /// The management plugin of a platform workspace cannot be withdrawn:
    /// without it the workspace fails closed with nothing to recover it
    /// (declare it again with another source instead).
    fn undeclare_plugin(&self, id: &str, name: &str) -> Result<bool, StoreError>;
    /// Delete a workspace's policy markers: those of slot `slot` (of every
    /// slot if `None`) named `key` (every key if `None`); how many went.
    /// The next verdict sees them gone (the version moves): a cooldown
    /// whose marker is cleared may fire at once.
    fn clear_markers(
        &self,
        id: &str,
        slot: Option<&str>,
        key: Option<&str>,
    ) -> Result<usize, StoreError>;
    /// Delete a workspace's conditions of slot `slot` (every slot if
    /// `None`) named `name` (every name if `None`); how many went. The
    /// status stays until the next verdict derives it from what remains.
    fn clear_conditions(
        &self,
        id: &str,
        slot: Option<&str>,
        name: Option<&str>,
    ) -> Result<usize, StoreError>;
    /// Store a new token's hash.
    fn issue_token(&self, id: &str, token: &NewToken, now_ms: i64) -> Result<(), StoreError>;
    /// Revoke every live token of a workspace; returns how many. The
    /// workspace then refuses every request until a token is issued, or,
    /// with `allow_bootstrap`, until a register without a token mints one
    /// (as for a workspace that never had a token).
    fn revoke_tokens(
        &self,
        id: &str,
        now_ms: i64,
        allow_bootstrap: bool,
    ) -> Result<usize, StoreError>;
    /// Reconcile runs, oldest first, optionally of one workspace.
    fn reconcile_runs(&self, workspace_id: Option<&str>) -> Result<Vec<ReconcileRun>, StoreError>;
    /// One reconcile run.
    fn reconcile_run(&self, id: i64) -> Result<Option<ReconcileRun>, StoreError>;
    /// Put runs left `running` by a process that died back in the queue,
    /// except those started [`MAX_RUN_ATTEMPTS`] times already: a run that
    /// was interrupted (the process crashed, or was stopped) that often is
    /// marked `failed` with the cause instead, so that a workspace whose
    /// run kills the process cannot crash-loop the service. Called once by
    /// the worker at start.
    fn requeue_interrupted(&self, now_ms: i64) -> Result<Requeued, StoreError>;
    /// Atomically start the oldest queued run whose workspace has no run in
    /// progress, so a workspace never has two runs at once.
    fn claim_run(&self, now_ms: i64) -> Result<Option<ReconcileRun>, StoreError>;
    /// Record how a run ended.
    fn finish_run(
        &self,
        id: i64,
        outcome: RunOutcome,
        now_ms: i64,
        cause: Option<&str>,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError>;
    /// The declared and installed plugins of a workspace.
    fn reconcile_plan(&self, workspace_id: &str) -> Result<ReconcilePlan, StoreError>;
    /// Record a delivered plugin (the management plugin only on a platform
    /// workspace).
    fn record_install(
        &self,
        workspace_id: &str,
        plugin: &InstalledPlugin,
    ) -> Result<(), StoreError>;
    /// The installed plugins of a workspace, by name.
    fn installed_plugins(&self, workspace_id: &str) -> Result<Vec<InstalledPlugin>, StoreError>;
    /// Events of a workspace, oldest first.
    fn events(&self, workspace_id: &str) -> Result<Vec<EventRow>, StoreError>;
    /// The newest `limit` decisions of a workspace, oldest first.
    fn decisions(&self, workspace_id: &str, limit: usize) -> Result<Vec<DecisionRow>, StoreError>;
    /// Up to `limit` decisions of every workspace made at or after `since_ms`
    /// with an id above `after_id`, oldest first: page through the log by
    /// passing the last id seen.
    fn decisions_since(
        &self,
        since_ms: i64,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<DecisionRow>, StoreError>;

    /// Keep a policy module's bytes under its digest (idempotent), unless
    /// a new one would take the store past `quota`
    /// ([`StoreError::QuotaExceeded`]).
    fn put_module(
        &self,
        digest: &str,
        bytes: &[u8],
        meta: &crate::model::Metadata,
        by: &str,
        now_ms: i64,
        quota: ModuleQuota,
    ) -> Result<(), StoreError>;
    /// A stored module's bytes.
    fn module_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every stored module (without its bytes), oldest first.
    fn modules(&self) -> Result<Vec<StoredModule>, StoreError>;
    /// Delete a stored module no stored chain uses ([`StoreError::InUse`]
    /// names the chain that does); `None` if there is none by that digest.
    fn delete_module(&self, digest: &str) -> Result<Option<StoredModule>, StoreError>;
    /// Delete every stored module no stored chain uses; what was deleted.
    fn prune_modules(&self) -> Result<Vec<StoredModule>, StoreError>;
    /// Record a validated chain as `staged`.
    fn stage_chain(
        &self,
        version: &str,
        spec: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<StoredChain, StoreError>;
    /// Make chain `id` the active one; the active one before it is retired,
    /// and the activation is recorded (a rollback from it returns to the
    /// chain active before). Activating the active chain changes nothing.
    fn activate_chain(&self, id: i64, by: &str, now_ms: i64) -> Result<StoredChain, StoreError>;
    /// Go back one step in the activation history: activate the chain the
    /// last activation's [`Activation::back_to`] names, recorded as a
    /// rollback (so that the next rollback goes one step further back).
    /// `None` if there is nothing to go back to.
    fn rollback_chain(&self, by: &str, now_ms: i64) -> Result<Option<StoredChain>, StoreError>;
    /// One activation.
    fn activation(&self, id: i64) -> Result<Option<Activation>, StoreError>;
    /// The last `limit` activations and rollbacks, newest first.
    fn activations(&self, limit: usize) -> Result<Vec<Activation>, StoreError>;
    /// The last `limit` stored chains, newest first.
    fn chains(&self, limit: usize) -> Result<Vec<StoredChain>, StoreError>;
    /// The active chain, if one was ever activated.
    fn active_chain(&self) -> Result<Option<StoredChain>, StoreError>;
    /// One chain.
    fn chain(&self, id: i64) -> Result<Option<StoredChain>, StoreError>;
    /// The newest stored chain with content version `version`.
    fn chain_by_version(&self, version: &str) -> Result<Option<StoredChain>, StoreError>;

    /// Take the one watch-mode place of this database for as long as the
    /// store lives: a chain activated from a watched directory must come
    /// from one host only. Refused, saying so, if another host has it.
    fn claim_watch(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Record which stored chain runs in shadow (`None`: none), for every
    /// host of the database, and drop every shadow state
    /// ([`Store::shadow_state`]) in the same transaction: a shadow started,
    /// replaced or started again begins clean, and a stopped one leaves
    /// nothing behind.
    fn set_shadow_chain(&self, chain: Option<i64>, by: &str, now_ms: i64)
    -> Result<(), StoreError>;
    /// The stored chain that runs in shadow, if any.
    fn shadow_chain(&self) -> Result<Option<i64>, StoreError>;
    /// Shadow chain `chain_id`'s own markers and conditions of workspace
    /// `workspace_id`, kept apart from the real ones; `None` until its first
    /// write. A short read.
    fn shadow_state(
        &self,
        chain_id: i64,
        workspace_id: &str,
    ) -> Result<Option<ShadowState>, StoreError>;
    /// Store `state` as shadow chain `chain_id`'s own markers and conditions
    /// of workspace `workspace_id`: a compare-and-set on `state.version`
    /// (0: none stored yet), written only while `chain_id` runs in shadow, so
    /// a host still running a shadow another host stopped leaves nothing
    /// behind. Touches no real marker, condition, status or version.
    fn write_shadow_state(
        &self,
        chain_id: i64,
        workspace_id: &str,
        state: &ShadowState,
        now_ms: i64,
    ) -> Result<ShadowWritten, StoreError>;

    /// Something a host wakes on to look at the active chain again (an
    /// activation on another host; a reconnect, after which one may have
    /// been missed), for a database several hosts share. Hosts poll as well:
    /// a missed wake-up only delays.
    fn chain_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    /// Copy the whole database, consistent as of one moment, to a new file
    /// `dest` (refused if it exists), while the service keeps running.
    fn backup(&self, dest: &std::path::Path) -> Result<Backup, StoreError> {
        let _ = dest;
        Err(StoreError::Refused(
            "this store makes no file backups; use its database's own tools".into(),
        ))
    }
}

/// What [`Store::backup`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct Backup {
    pub path: std::path::PathBuf,
    pub bytes: u64,
    /// `PRAGMA quick_check` of the copy: `ok`.
    pub check: String,
}

/// How much of the decision log is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The most decision rows kept; the oldest go first.
    pub max_rows: u64,
    /// Decisions older than this (by the verdicts' clock) go; `None` keeps
    /// them until `max_rows`.
    pub max_age_ms: Option<i64>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_rows: 1_000_000,
            max_age_ms: Some(30 * 24 * 3_600_000),
        }
    }
}

/// Whether [`Store::load`] may answer from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    Cached,
    Fresh,
}

/// The most snapshots the cache keeps; when full it starts over.
pub const SNAPSHOT_CACHE_ENTRIES: usize = 1 << 18;

/// The longest the writer holds a liveness-only verdict (acknowledged
/// before its commit) to coalesce later ones of the same workspace into it:
/// also the most liveness a killed process can lose.
pub const LIVENESS_HOLD: std::time::Duration = std::time::Duration::from_millis(250);

/// How a queued verdict's caller hears of its outcome.
pub type Done = Box<dyn FnOnce(Result<Applied, StoreError>) + Send>;
