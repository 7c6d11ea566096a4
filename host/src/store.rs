//! The store: the only code that knows SQL.
//!
//! [`Store`] is the interface the rest of the host uses; [`SqliteStore`] is the
//! embedded implementation (rusqlite, bundled SQLite, WAL, migrations embedded
//! in the binary). Every method is blocking: callers run it on a blocking
//! thread, never on an async worker; the exceptions are [`Store::load`], a
//! short read the heartbeat path makes on its own thread, and
//! [`Store::submit`], which only queues.
//!
//! Verdicts are written by one writer thread (group commit): everything
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

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use crate::model::{Marker, ReconcileTrigger, Status, Workspace, WorkspaceKind};

/// The privileged plugin that only a platform workspace may declare.
pub const MANAGEMENT_PLUGIN: &str = "molecule-ai-plugin-molecule-platform-mcp";

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
}

/// Everything the request path needs about one workspace, read at once.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub workspace: Workspace,
    /// All policy markers of the workspace (every owner).
    pub markers: Vec<Marker>,
    /// SHA-256 hashes of its live tokens.
    pub live_token_hashes: Vec<Vec<u8>>,
    pub delivery_mode: String,
    /// The workspace's version: the database bumps it (by trigger) on every
    /// change to anything above, whoever makes it.
    pub version: i64,
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
    pub owner: String,
    pub key: String,
    pub seen: Option<String>,
    pub new: Option<String>,
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
    pub status: Option<StatusWrite>,
    pub events: Vec<(String, String)>,
    pub markers: Vec<MarkerWrite>,
    pub reconciles: Vec<ReconcileTrigger>,
    pub decision: DecisionRecord,
}

impl VerdictWrite {
    /// Whether the verdict writes nothing but liveness (last heartbeat time,
    /// counters) and its decision row: no status change, marker, event,
    /// reconcile request or registration. Only such a verdict may be
    /// acknowledged before it is committed.
    pub fn records_only_liveness(&self) -> bool {
        self.status.is_none()
            && self.markers.is_empty()
            && self.events.is_empty()
            && self.reconciles.is_empty()
            && self.registration.is_none()
            && !self.stamp_register_failure
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
}

/// A declared plugin.
#[derive(Clone, Debug, Serialize)]
pub struct DeclaredPlugin {
    pub name: String,
    pub source: String,
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

/// A chain as stored: its spec (JSON, modules as `builtin:` or `sha256:`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StoredChain {
    pub id: i64,
    pub version: String,
    pub spec: String,
    /// `staged`, `active` or `retired`.
    pub state: String,
    pub created_ms: i64,
    pub created_by: String,
    pub activated_ms: Option<i64>,
    pub activated_by: Option<String>,
}

/// The store's interface. Blocking; every method is atomic (one transaction,
/// or for `apply` one savepoint of a transaction shared with other verdicts).
pub trait Store: Send + Sync + 'static {
    /// Read the workspace, its markers and its live token hashes. With
    /// [`Read::Cached`] the answer may come from the store's cache and be
    /// stale: a verdict computed from it carries its version, and
    /// [`Store::submit`] reports a conflict if the workspace changed since,
    /// so a stale snapshot costs a re-evaluation, never a wrong write.
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
    /// Record how long each commit of verdicts takes in `histogram` (once;
    /// later calls are ignored).
    fn observe_commits(&self, _histogram: prometheus_client::metrics::histogram::Histogram) {}
    /// Whether verdicts can be written now: the writer is running and the
    /// database accepts a write transaction. For `/readyz`.
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
    /// Store a new token's hash.
    fn issue_token(&self, id: &str, token: &NewToken, now_ms: i64) -> Result<(), StoreError>;
    /// Revoke every live token of a workspace; returns how many.
    fn revoke_tokens(&self, id: &str, now_ms: i64) -> Result<usize, StoreError>;
    /// Reconcile runs, oldest first, optionally of one workspace.
    fn reconcile_runs(&self, workspace_id: Option<&str>) -> Result<Vec<ReconcileRun>, StoreError>;
    /// One reconcile run.
    fn reconcile_run(&self, id: i64) -> Result<Option<ReconcileRun>, StoreError>;
    /// Put runs left `running` by a process that died back in the queue;
    /// returns how many. Called once by the worker at start.
    fn requeue_interrupted(&self) -> Result<usize, StoreError>;
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

    /// Keep a policy module's bytes under its digest (idempotent).
    fn put_module(
        &self,
        digest: &str,
        bytes: &[u8],
        meta: &crate::model::Metadata,
        by: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// A stored module's bytes.
    fn module_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Record a validated chain as `staged`.
    fn stage_chain(
        &self,
        version: &str,
        spec: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<StoredChain, StoreError>;
    /// Make chain `id` the active one; the active one before it is retired.
    fn activate_chain(&self, id: i64, by: &str, now_ms: i64) -> Result<StoredChain, StoreError>;
    /// The active chain, if one was ever activated.
    fn active_chain(&self) -> Result<Option<StoredChain>, StoreError>;
    /// One chain.
    fn chain(&self, id: i64) -> Result<Option<StoredChain>, StoreError>;
    /// The chain that was active before the current one.
    fn previous_chain(&self) -> Result<Option<StoredChain>, StoreError>;
    /// The newest stored chain with content version `version`.
    fn chain_by_version(&self, version: &str) -> Result<Option<StoredChain>, StoreError>;
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE workspaces (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'workspace' CHECK (kind IN ('workspace', 'platform')),
    status TEXT NOT NULL DEFAULT 'provisioning' CHECK (status IN ('provisioning', 'online',
        'offline', 'degraded', 'failed', 'removed', 'paused', 'hibernated', 'hibernating',
        'awaiting_agent')),
    url TEXT,
    agent_card TEXT,
    delivery_mode TEXT NOT NULL DEFAULT 'push' CHECK (delivery_mode IN ('push', 'poll')),
    last_heartbeat_ms INTEGER,
    last_error_rate REAL NOT NULL DEFAULT 0,
    last_sample_error TEXT NOT NULL DEFAULT '',
    active_tasks INTEGER NOT NULL DEFAULT 0,
    uptime_seconds INTEGER NOT NULL DEFAULT 0,
    current_task TEXT,
    loaded_mcp_tools TEXT,
    last_register_failure_ms INTEGER,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
) STRICT;

-- Secrets by name only: their values live in the secret store, never here.
CREATE TABLE workspace_secrets (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, name)
) STRICT;

CREATE TABLE auth_tokens (
    id INTEGER PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    token_hash BLOB NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
) STRICT;
CREATE INDEX auth_tokens_live ON auth_tokens (workspace_id) WHERE revoked_ms IS NULL;

CREATE TABLE declared_plugins (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    plugin_name TEXT NOT NULL,
    source TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, plugin_name)
) STRICT;

CREATE TABLE installed_plugins (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    plugin_name TEXT NOT NULL,
    source TEXT NOT NULL,
    tracked_ref TEXT NOT NULL DEFAULT 'none',
    installed_sha TEXT,
    installed_ms INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, plugin_name)
) STRICT;

CREATE TABLE policy_markers (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, owner, key)
) STRICT;

CREATE TABLE decisions (
    id INTEGER PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    event_kind TEXT NOT NULL,
    chain_version TEXT NOT NULL,
    outcome TEXT NOT NULL,
    input TEXT NOT NULL,
    steps TEXT NOT NULL,
    final_actions TEXT NOT NULL,
    attempts INTEGER NOT NULL
) STRICT;
CREATE INDEX decisions_by_workspace ON decisions (workspace_id, id);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    decision_id INTEGER REFERENCES decisions(id)
) STRICT;
CREATE INDEX events_by_workspace ON events (workspace_id, id);

CREATE TABLE reconcile_runs (
    id INTEGER PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    trigger TEXT NOT NULL CHECK (trigger IN ('online', 'mcp-recovery')),
    state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    requested_ms INTEGER NOT NULL,
    decision_id INTEGER REFERENCES decisions(id),
    started_ms INTEGER,
    finished_ms INTEGER,
    -- How many times a worker started it (a crash re-queues a running run).
    attempts INTEGER NOT NULL DEFAULT 0,
    -- For a failure, the cause in plain words.
    cause TEXT,
    -- JSON: per-plugin results and the restart hook's outcome.
    detail TEXT
) STRICT;
CREATE INDEX reconcile_runs_by_state ON reconcile_runs (state, id);
CREATE INDEX reconcile_runs_by_workspace ON reconcile_runs (workspace_id, id);
"#,
    r#"
-- Policy modules by content, so an activated chain survives restarts and
-- never depends on files staying where they were.
CREATE TABLE policy_modules (
    digest TEXT PRIMARY KEY,
    bytes BLOB NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    uploaded_ms INTEGER NOT NULL,
    uploaded_by TEXT NOT NULL
) STRICT;

-- Chains as staged and activated; at most one is active.
CREATE TABLE chains (
    id INTEGER PRIMARY KEY,
    version TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('staged', 'active', 'retired')),
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    activated_ms INTEGER,
    activated_by TEXT
) STRICT;
CREATE UNIQUE INDEX chains_one_active ON chains (state) WHERE state = 'active';
"#,
    // Replay reads the decision log by time across workspaces.
    r#"
CREATE INDEX decisions_by_time ON decisions (at_ms, id);
"#,
    // A version per workspace, bumped on any change to what a verdict is
    // computed from (by triggers, so that raw SQL and other processes bump it
    // too; a write of the same value is no change): a verdict computed from
    // an older version is a conflict.
    r#"
ALTER TABLE workspaces ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER workspaces_version AFTER UPDATE OF kind, status, last_register_failure_ms,
    delivery_mode ON workspaces
WHEN OLD.kind IS NOT NEW.kind OR OLD.status IS NOT NEW.status
    OR OLD.last_register_failure_ms IS NOT NEW.last_register_failure_ms
    OR OLD.delivery_mode IS NOT NEW.delivery_mode
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.id; END;
CREATE TRIGGER policy_markers_version_insert AFTER INSERT ON policy_markers
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.workspace_id; END;
CREATE TRIGGER policy_markers_version_update AFTER UPDATE ON policy_markers
WHEN OLD.value IS NOT NEW.value OR OLD.key IS NOT NEW.key OR OLD.owner IS NOT NEW.owner
    OR OLD.workspace_id IS NOT NEW.workspace_id
BEGIN UPDATE workspaces SET version = version + 1 WHERE id IN (OLD.workspace_id, NEW.workspace_id); END;
CREATE TRIGGER policy_markers_version_delete AFTER DELETE ON policy_markers
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = OLD.workspace_id; END;
CREATE TRIGGER auth_tokens_version_insert AFTER INSERT ON auth_tokens
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.workspace_id; END;
CREATE TRIGGER auth_tokens_version_update AFTER UPDATE ON auth_tokens
WHEN OLD.revoked_ms IS NOT NEW.revoked_ms OR OLD.token_hash IS NOT NEW.token_hash
    OR OLD.workspace_id IS NOT NEW.workspace_id
BEGIN UPDATE workspaces SET version = version + 1 WHERE id IN (OLD.workspace_id, NEW.workspace_id); END;
CREATE TRIGGER auth_tokens_version_delete AFTER DELETE ON auth_tokens
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = OLD.workspace_id; END;
CREATE TRIGGER declared_plugins_version_insert AFTER INSERT ON declared_plugins
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.workspace_id; END;
CREATE TRIGGER declared_plugins_version_update AFTER UPDATE ON declared_plugins
WHEN OLD.plugin_name IS NOT NEW.plugin_name OR OLD.workspace_id IS NOT NEW.workspace_id
BEGIN UPDATE workspaces SET version = version + 1 WHERE id IN (OLD.workspace_id, NEW.workspace_id); END;
CREATE TRIGGER declared_plugins_version_delete AFTER DELETE ON declared_plugins
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = OLD.workspace_id; END;
CREATE TRIGGER workspace_secrets_version_insert AFTER INSERT ON workspace_secrets
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.workspace_id; END;
CREATE TRIGGER workspace_secrets_version_update AFTER UPDATE ON workspace_secrets
WHEN OLD.name IS NOT NEW.name OR OLD.workspace_id IS NOT NEW.workspace_id
BEGIN UPDATE workspaces SET version = version + 1 WHERE id IN (OLD.workspace_id, NEW.workspace_id); END;
CREATE TRIGGER workspace_secrets_version_delete AFTER DELETE ON workspace_secrets
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = OLD.workspace_id; END;
"#,
    // Liveness-only heartbeats are coalesced: one decision row stands for
    // the `heartbeats` evaluations since `first_at_ms` (its own `at_ms` is the
    // last one's, and so are its input and steps).
    r#"
ALTER TABLE decisions ADD COLUMN heartbeats INTEGER NOT NULL DEFAULT 1;
ALTER TABLE decisions ADD COLUMN first_at_ms INTEGER;
"#,
    // The decision log is pruned oldest first: what points at a decision
    // is found by index.
    r#"
CREATE INDEX events_by_decision ON events (decision_id);
CREATE INDEX reconcile_runs_by_decision ON reconcile_runs (decision_id);
"#,
];

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

/// Decision rows pruned at most at once, between two batches of verdicts.
const PRUNE_CHUNK: i64 = 2_000;
/// How often the writer looks for rows to prune while the log is within
/// its bounds (beyond them, it prunes a chunk after every batch).
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether [`Store::load`] may answer from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    Cached,
    Fresh,
}

/// The most snapshots the cache keeps; when full it starts over.
pub const SNAPSHOT_CACHE_ENTRIES: usize = 1 << 18;

/// How a queued verdict's caller hears of its outcome.
pub type Done = Box<dyn FnOnce(Result<Applied, StoreError>) + Send>;

/// The embedded SQLite store: one writer connection (used by the writer
/// thread for verdicts and directly for everything else), a small pool of
/// readers.
pub struct SqliteStore {
    writer: Arc<Writer>,
    thread: Option<JoinHandle<()>>,
    readers: Mutex<Vec<Connection>>,
    /// Snapshots by workspace id, for [`Read::Cached`]. Never trusted for a
    /// write: each verdict's version is checked by the writer.
    cache: Arc<SnapshotCache>,
    path: std::path::PathBuf,
}

/// The snapshot cache. A snapshot here may be stale (another process or
/// host changed the workspace); the writer's version check catches that.
#[derive(Default)]
struct SnapshotCache {
    entries: Mutex<std::collections::HashMap<String, Snapshot>>,
}

impl SnapshotCache {
    fn get(&self, id: &str) -> Option<Snapshot> {
        self.entries.lock().ok()?.get(id).cloned()
    }

    fn put(&self, snapshot: &Snapshot) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= SNAPSHOT_CACHE_ENTRIES
                && !entries.contains_key(&snapshot.workspace.id)
            {
                entries.clear();
            }
            entries.insert(snapshot.workspace.id.clone(), snapshot.clone());
        }
    }

    fn forget(&self, id: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(id);
        }
    }
}

/// What the writer thread shares with the store.
struct Writer {
    conn: Mutex<Connection>,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Signalled whenever a batch has been answered (for [`Store::flush`]).
    answered: Condvar,
    /// Entries of workspaces a verdict changed (or found changed) are dropped.
    cache: Arc<SnapshotCache>,
    /// Pages in the WAL after the last commit (from the WAL hook).
    wal_frames: Arc<std::sync::atomic::AtomicI64>,
    /// Where each batch's apply-and-commit time goes (the metrics).
    commit_seconds: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
    retention: Mutex<Retention>,
}

/// The WAL size (pages) at which the writer checkpoints (SQLite's default
/// for its automatic checkpoint).
const CHECKPOINT_FRAMES: i64 = 1000;
/// The longest the writer holds a liveness-only verdict (acknowledged
/// before its commit) to coalesce later ones of the same workspace into it:
/// also the most liveness a killed process can lose.
pub const LIVENESS_HOLD: std::time::Duration = std::time::Duration::from_millis(250);
/// The writer connection's page cache (reader connections keep SQLite's
/// default 2 MiB).
const WRITER_CACHE_KIB: u32 = 16 << 10;
/// The most workspaces with a held verdict; past it, all are written.
const MAX_HELD: usize = 16_384;
/// Verdicts queued at which a submit wakes the writer even if they may be
/// held (otherwise the writer's timer takes them).
const WAKE_AT_QUEUED: usize = 1024;
#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// The writer thread is waiting for work (so a submit must wake it).
    idle: bool,
    /// No more verdicts are taken; the writer drains what it has and stops.
    closed: bool,
    /// Verdicts taken since the store opened.
    submitted: u64,
    /// Verdicts answered (committed, coalesced, refused or failed) since
    /// the store opened.
    answered: u64,
    /// A caller of [`Store::flush`] waits: write the held verdicts now.
    flush: bool,
    /// The idle writer will wake by itself to write held verdicts, so a
    /// verdict that may be held need not wake it.
    timer_armed: bool,
}

/// A verdict waiting for the writer.
struct Job {
    write: VerdictWrite,
    done: Done,
    /// Submitted by [`Store::submit_liveness`]: may be held and coalesced.
    hold: bool,
    /// Evaluations its decision row stands for, and the first one's time.
    heartbeats: u32,
    first_at_ms: Option<i64>,
}

impl Job {
    fn new(write: VerdictWrite, done: Done, hold: bool) -> Job {
        Job {
            write,
            done,
            hold,
            heartbeats: 1,
            first_at_ms: None,
        }
    }

    /// Whether `later` (of the same workspace) may be written in this
    /// one's place: both held, evaluated less than [`LIVENESS_HOLD`] apart
    /// by the service's clock (a runtime heartbeating every few seconds is
    /// never coalesced), and both applied by the same chain (a failed
    /// evaluation is always kept).
    fn coalesces_with(&self, later: &Job) -> bool {
        let (a, b) = (&self.write.decision, &later.write.decision);
        let first_ms = self.first_at_ms.unwrap_or(self.write.now_ms);
        let apart_ms = later.write.now_ms.saturating_sub(first_ms);
        self.hold
            && later.hold
            && (0..i64::try_from(LIVENESS_HOLD.as_millis()).unwrap_or(i64::MAX)).contains(&apart_ms)
            && a.outcome == "applied"
            && b.outcome == "applied"
            && a.event_kind == b.event_kind
            && a.chain_version == b.chain_version
    }
}

const MAX_IDLE_READERS: usize = 8;

/// The WAL file of the database at `path`.
fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    std::path::PathBuf::from(name)
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Every statement of the request path stays prepared (the default keeps 16).
    conn.set_prepared_statement_cache_capacity(128);
    // Plans that do not depend on bound values: without this, SQLite (built
    // with STAT4) recompiles some cached statements on every new binding.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path` and migrate it.
    ///
    /// Two processes may open a fresh file at once (the service starting
    /// while the CLI provisions a workspace). Switching to WAL and migrating
    /// can then find the file locked without SQLite's busy handler being
    /// asked, so both steps are retried for up to five seconds.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let mut conn = open_connection(path)?;
        let started = std::time::Instant::now();
        loop {
            match init(&mut conn) {
                Ok(()) => break,
                Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && started.elapsed() < std::time::Duration::from_secs(5) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        // The writer thread checkpoints the WAL itself once it passes
        // `CHECKPOINT_FRAMES` pages, but after it has answered the batch that
        // crossed the line rather than inside that batch's commit (SQLite's
        // automatic checkpoint, which the hook below replaces). A checkpoint
        // on another thread (tried) copies the pages but never finishes while
        // commits keep landing, so the WAL never starts over and grows
        // without bound. A WAL a burst grew is cut back to 64 MiB when it
        // starts over.
        let wal_frames = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let frames = wal_frames.clone();
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages| {
            frames.store(i64::from(pages), std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }))?;
        conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
        // A batch touches a workspace row per verdict: with many workspaces
        // SQLite's default 2 MiB cache spilled mid-transaction and re-read
        // pages. The savepoints' statement journal stays in memory.
        conn.pragma_update(None, "cache_size", -(WRITER_CACHE_KIB as i64))?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        let cache = Arc::new(SnapshotCache::default());
        let writer = Arc::new(Writer {
            conn: Mutex::new(conn),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            answered: Condvar::new(),
            cache: cache.clone(),
            wal_frames,
            commit_seconds: std::sync::OnceLock::new(),
            retention: Mutex::new(Retention::default()),
        });
        let thread = std::thread::Builder::new()
            .name("heartgate-writer".into())
            .spawn({
                let writer = writer.clone();
                move || writer.run()
            })
            .map_err(|e| StoreError::Failed(format!("starting the writer thread: {e}")))?;
        Ok(SqliteStore {
            writer,
            thread: Some(thread),
            readers: Mutex::new(Vec::new()),
            cache,
            path: path.to_path_buf(),
        })
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.readers.lock().map_err(|_| StoreError::Poisoned)?.pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => open_connection(&self.path)?,
        };
        let result = f(&mut conn);
        // A connection left inside a transaction (a failed COMMIT) is closed.
        if conn.is_autocommit()
            && let Ok(mut idle) = self.readers.lock()
            && idle.len() < MAX_IDLE_READERS
        {
            idle.push(conn);
        }
        result
    }

    /// A write to one workspace outside a verdict; its cached snapshot is
    /// dropped afterwards.
    fn with_workspace_writer<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = self.with_writer(f);
        self.cache.forget(id);
        result
    }

    fn with_writer<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.writer.conn.lock().map_err(|_| StoreError::Poisoned)?;
        f(&mut conn)
    }
}

impl Drop for SqliteStore {
    /// Stop taking verdicts, let the writer commit what is queued, and wait.
    fn drop(&mut self) {
        self.writer.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Writer {
    /// The writer thread: take everything queued, apply it as one batch,
    /// tell each caller, repeat. Stops once closed and drained.
    fn run(&self) {
        // If this thread dies (a callback panicked), nothing must wait on it.
        struct Closer<'a>(&'a Writer);
        impl Drop for Closer<'_> {
            fn drop(&mut self) {
                self.0.close();
                let stranded = match self.0.queue.lock() {
                    Ok(mut queue) => std::mem::take(&mut queue.jobs),
                    Err(_) => Vec::new(),
                };
                for job in stranded {
                    (job.done)(Err(StoreError::WriterStopped));
                }
                // Nothing queued will be answered any more: release flushes.
                if let Ok(mut queue) = self.0.queue.lock() {
                    queue.answered = queue.submitted;
                }
                self.0.answered.notify_all();
            }
        }
        let _closer = Closer(self);
        // Liveness-only verdicts held back, by workspace, and when the
        // first of them must be written.
        let mut held: HashMap<String, Job> = HashMap::new();
        let mut write_held_at: Option<Instant> = None;
        // The verdicts' clock (what retention ages by), and the last prune.
        let mut latest_ms = i64::MIN;
        let mut pruned_at = Instant::now();
        // The last prune found rows to prune: there may be more.
        let mut prune_more = true;
        loop {
            let (batch, flush) = {
                let Ok(mut queue) = self.queue.lock() else {
                    return;
                };
                loop {
                    if !queue.jobs.is_empty() || queue.closed || queue.flush {
                        break;
                    }
                    queue.timer_armed = write_held_at.is_some();
                    match write_held_at {
                        None => {
                            queue.idle = true;
                            queue = match self.wake.wait(queue) {
                                Ok(q) => q,
                                Err(_) => return,
                            };
                        }
                        Some(at) => {
                            let now = Instant::now();
                            if now >= at {
                                break;
                            }
                            queue.idle = true;
                            queue = match self.wake.wait_timeout(queue, at - now) {
                                Ok((q, _)) => q,
                                Err(_) => return,
                            };
                        }
                    }
                }
                queue.idle = false;
                if queue.jobs.is_empty() && queue.closed && held.is_empty() {
                    return;
                }
                let flush = std::mem::take(&mut queue.flush) || queue.closed;
                (std::mem::take(&mut queue.jobs), flush)
            };
            // What to write now, in order: a workspace's held verdict goes
            // before any later verdict of it that is not held.
            let mut writes = Vec::with_capacity(batch.len());
            let mut coalesced = Vec::new();
            for job in batch {
                if job.hold {
                    match held.remove(&job.write.workspace_id) {
                        Some(before) if before.coalesces_with(&job) => {
                            let mut job = job;
                            job.heartbeats = before.heartbeats.saturating_add(1);
                            job.first_at_ms =
                                Some(before.first_at_ms.unwrap_or(before.write.now_ms));
                            coalesced.push(before.done);
                            held.insert(job.write.workspace_id.clone(), job);
                        }
                        before => {
                            writes.extend(before);
                            held.insert(job.write.workspace_id.clone(), job);
                        }
                    }
                    write_held_at.get_or_insert_with(|| Instant::now() + LIVENESS_HOLD);
                } else {
                    writes.extend(held.remove(&job.write.workspace_id));
                    writes.push(job);
                }
            }
            if flush
                || held.len() > MAX_HELD
                || write_held_at.is_some_and(|at| Instant::now() >= at)
            {
                writes.extend(held.drain().map(|(_, job)| job));
                write_held_at = None;
            }
            let results = if writes.is_empty() {
                Vec::new()
            } else {
                let started = Instant::now();
                let results = match self.conn.lock() {
                    Ok(mut conn) => apply_batch(&mut conn, &writes),
                    Err(_) => writes.iter().map(|_| Err(StoreError::Poisoned)).collect(),
                };
                if let Some(h) = self.commit_seconds.get() {
                    h.observe(started.elapsed().as_secs_f64());
                }
                results
            };
            if let Some(ms) = writes.iter().map(|j| j.write.now_ms).max() {
                latest_ms = latest_ms.max(ms);
            }
            let answered = (writes.len() + coalesced.len()) as u64;
            for done in coalesced {
                done(Ok(Applied::Coalesced));
            }
            for (job, result) in writes.into_iter().zip(results) {
                if changes_snapshot(&job.write, &result) {
                    self.cache.forget(&job.write.workspace_id);
                }
                (job.done)(result);
            }
            if let Ok(mut queue) = self.queue.lock() {
                queue.answered += answered;
            }
            self.answered.notify_all();
            if self.wal_frames.load(std::sync::atomic::Ordering::Relaxed) >= CHECKPOINT_FRAMES {
                self.checkpoint();
            }
            // While the log is over its bounds, a chunk after every batch
            // (so pruning keeps up with any rate of verdicts); otherwise a
            // look once a second.
            if prune_more || pruned_at.elapsed() >= PRUNE_EVERY || flush {
                pruned_at = Instant::now();
                prune_more = self.prune(latest_ms) > 0;
            }
        }
    }

    /// Prune at most one chunk of the decision log's oldest rows beyond the
    /// retention (`now_ms`: the latest verdict's time); how many it pruned.
    fn prune(&self, now_ms: i64) -> usize {
        let retention = self.retention.lock().map(|r| *r).unwrap_or_default();
        let cutoff = match retention.max_age_ms {
            Some(age) if now_ms != i64::MIN => now_ms.saturating_sub(age),
            _ => i64::MIN,
        };
        let Ok(mut conn) = self.conn.lock() else {
            return 0;
        };
        let run = |conn: &mut Connection| -> Result<usize, StoreError> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "CREATE TEMP TABLE IF NOT EXISTS pruned (id INTEGER PRIMARY KEY)",
                [],
            )?;
            tx.execute("DELETE FROM temp.pruned", [])?;
            // The oldest rows only: ids grow with time, so the chunk is the
            // start of the table, whichever rule selects it.
            let n = tx.execute(
                "INSERT INTO temp.pruned (id)
                 SELECT id FROM (SELECT id, at_ms FROM decisions ORDER BY id LIMIT ?1)
                 WHERE id <= (SELECT MAX(id) FROM decisions) - ?2 OR at_ms < ?3",
                params![
                    PRUNE_CHUNK,
                    i64::try_from(retention.max_rows).unwrap_or(i64::MAX),
                    cutoff
                ],
            )?;
            if n > 0 {
                tx.execute(
                    "UPDATE reconcile_runs SET decision_id = NULL
                     WHERE decision_id IN (SELECT id FROM temp.pruned)",
                    [],
                )?;
                tx.execute(
                    "DELETE FROM events WHERE decision_id IN (SELECT id FROM temp.pruned)",
                    [],
                )?;
                tx.execute(
                    "DELETE FROM decisions WHERE id IN (SELECT id FROM temp.pruned)",
                    [],
                )?;
            }
            tx.commit()?;
            Ok(n)
        };
        match run(&mut conn) {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(decisions = n, "pruned the decision log");
                }
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning the decision log failed");
                0
            }
        }
    }

    /// Copy the WAL into the database. No commit can land meanwhile (this is
    /// the writer's thread), so unless a reader still uses the WAL it
    /// finishes, and the next commit starts the WAL over.
    fn checkpoint(&self) {
        let Ok(conn) = self.conn.lock() else {
            return;
        };
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(_) => self
                .wal_frames
                .store(0, std::sync::atomic::Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "checkpointing the WAL failed"),
        }
    }

    fn submit(&self, job: Job) {
        let refused = match self.queue.lock() {
            Ok(mut queue) if !queue.closed => {
                // A verdict that may be held waits for the writer's timer,
                // unless too many have piled up: no wake-up per heartbeat.
                let wait_for_timer =
                    job.hold && queue.timer_armed && queue.jobs.len() < WAKE_AT_QUEUED;
                queue.jobs.push(job);
                queue.submitted += 1;
                if queue.idle && !wait_for_timer {
                    queue.idle = false;
                    self.wake.notify_one();
                }
                None
            }
            Ok(_) | Err(_) => Some(job),
        };
        if let Some(job) = refused {
            (job.done)(Err(StoreError::WriterStopped));
        }
    }

    /// Verdicts queued and not yet taken by the writer.
    fn backlog(&self) -> u64 {
        self.queue.lock().map(|q| q.jobs.len() as u64).unwrap_or(0)
    }

    /// Wait until every verdict taken before this call has been answered.
    fn flush(&self) {
        let Ok(mut queue) = self.queue.lock() else {
            return;
        };
        let target = queue.submitted;
        if queue.answered < target {
            queue.flush = true;
            self.wake.notify_one();
        }
        while queue.answered < target {
            queue = match self.answered.wait(queue) {
                Ok(q) => q,
                Err(_) => return,
            };
        }
    }

    /// Refuse new verdicts; the writer still applies the ones queued. If the
    /// writer thread is gone, fail them instead.
    fn close(&self) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.closed = true;
            self.wake.notify_all();
        }
    }
}

/// WAL journal mode, then the embedded migrations.
fn init(conn: &mut Connection) -> Result<(), StoreError> {
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "sqlite refused WAL journal mode");
    }
    migrate(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > supported {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn parse_status(s: String) -> rusqlite::Result<Status> {
    Status::parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown status `{s}`").into(),
        )
    })
}

fn parse_kind(s: String) -> rusqlite::Result<WorkspaceKind> {
    WorkspaceKind::parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown kind `{s}`").into(),
        )
    })
}

const CHAIN_COLUMNS: &str = "SELECT id, version, spec, state, created_ms, created_by,
    activated_ms, activated_by FROM chains";

const DECISION_COLUMNS: &str = "SELECT id, workspace_id, at_ms, event_kind, chain_version,
    outcome, input, steps, final_actions, attempts, heartbeats, first_at_ms FROM decisions";

fn decision_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DecisionRow> {
    Ok(DecisionRow {
        id: r.get(0)?,
        workspace_id: r.get(1)?,
        at_ms: r.get(2)?,
        event_kind: r.get(3)?,
        chain_version: r.get(4)?,
        outcome: r.get(5)?,
        input: json_or_null(r.get(6)?),
        steps: json_or_null(r.get(7)?),
        final_actions: json_or_null(r.get(8)?),
        attempts: r.get(9)?,
        heartbeats: r.get(10)?,
        first_at_ms: r.get(11)?,
    })
}

fn chain_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredChain> {
    Ok(StoredChain {
        id: r.get(0)?,
        version: r.get(1)?,
        spec: r.get(2)?,
        state: r.get(3)?,
        created_ms: r.get(4)?,
        created_by: r.get(5)?,
        activated_ms: r.get(6)?,
        activated_by: r.get(7)?,
    })
}

const RUN_COLUMNS: &str = "SELECT id, workspace_id, trigger, state, requested_ms, decision_id,
    started_ms, finished_ms, attempts, cause, detail FROM reconcile_runs";

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReconcileRun> {
    Ok(ReconcileRun {
        id: r.get(0)?,
        workspace_id: r.get(1)?,
        trigger: r.get(2)?,
        state: r.get(3)?,
        requested_ms: r.get(4)?,
        decision_id: r.get(5)?,
        started_ms: r.get(6)?,
        finished_ms: r.get(7)?,
        attempts: r.get(8)?,
        cause: r.get(9)?,
        detail: r.get::<_, Option<String>>(10)?.map(json_or_null),
    })
}

fn read_installed(
    conn: &Connection,
    workspace_id: &str,
) -> Result<Vec<InstalledPlugin>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT plugin_name, source, tracked_ref, installed_sha, installed_ms
         FROM installed_plugins WHERE workspace_id = ?1 ORDER BY plugin_name",
    )?;
    let rows = stmt
        .query_map([workspace_id], |r| {
            Ok(InstalledPlugin {
                name: r.get(0)?,
                source: r.get(1)?,
                tracked_ref: r.get(2)?,
                installed_sha: r.get(3)?,
                installed_ms: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

fn json_or_null(s: String) -> serde_json::Value {
    serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s))
}

fn load_snapshot(conn: &mut Connection, id: &str) -> Result<Option<Snapshot>, StoreError> {
    // One read transaction for the four reads, begun and ended by cached
    // statements: this runs once per heartbeat, so nothing here parses SQL.
    conn.prepare_cached("BEGIN")?.execute([])?;
    let read = read_snapshot(conn, id);
    let end = conn
        .prepare_cached("COMMIT")
        .and_then(|mut s| s.execute([]));
    let snapshot = read?;
    end?;
    Ok(snapshot)
}

fn read_snapshot(tx: &Connection, id: &str) -> Result<Option<Snapshot>, StoreError> {
    let row = tx
        .prepare_cached(
            "SELECT kind, status, last_register_failure_ms, delivery_mode,
                    EXISTS(SELECT 1 FROM workspace_secrets s
                           WHERE s.workspace_id = w.id AND s.name = 'MODEL'),
                    version
             FROM workspaces w WHERE id = ?1",
        )?
        .query_row([id], |r| {
            Ok((
                parse_kind(r.get(0)?)?,
                parse_status(r.get(1)?)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, bool>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })
        .optional()?;
    let Some((kind, status, last_register_failure_ms, delivery_mode, model_configured, version)) =
        row
    else {
        return Ok(None);
    };
    let declared_plugins = {
        let mut stmt = tx.prepare_cached(
            "SELECT plugin_name FROM declared_plugins WHERE workspace_id = ?1 ORDER BY plugin_name",
        )?;
        stmt.query_map([id], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?
    };
    let markers = {
        let mut stmt = tx.prepare_cached(
            "SELECT owner, key, value FROM policy_markers WHERE workspace_id = ?1 ORDER BY owner, key",
        )?;
        stmt.query_map([id], |r| {
            Ok(Marker {
                owner: r.get(0)?,
                key: r.get(1)?,
                value: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?
    };
    let live_token_hashes = {
        let mut stmt = tx.prepare_cached(
            "SELECT token_hash FROM auth_tokens WHERE workspace_id = ?1 AND revoked_ms IS NULL",
        )?;
        stmt.query_map([id], |r| r.get(0))?
            .collect::<Result<Vec<Vec<u8>>, _>>()?
    };
    Ok(Some(Snapshot {
        workspace: Workspace {
            id: id.to_string(),
            kind,
            status,
            model_configured,
            declared_plugins,
            last_register_failure_ms,
        },
        markers,
        live_token_hashes,
        delivery_mode,
        version,
    }))
}

/// Group commit: the verdicts queued while the writer was busy, applied in
/// one transaction with a savepoint each, so a conflict or error undoes only
/// its own verdict. Every verdict is durable (committed) before its caller
/// hears of it; if the commit fails, every verdict of the batch failed.
fn apply_batch(conn: &mut Connection, batch: &[Job]) -> Vec<Result<Applied, StoreError>> {
    let run = |conn: &mut Connection| -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(batch.len());
        for job in batch {
            // A liveness-only verdict can only conflict at its version check,
            // before it writes anything: no savepoint to undo it. (An error
            // fails the whole batch.)
            if job.write.records_only_liveness() {
                let applied = apply_in(&tx, &job.write, job.heartbeats, job.first_at_ms);
                match &applied {
                    // Found before anything was written.
                    Ok(_) | Err(StoreError::UnknownWorkspace(_)) => {}
                    Err(e) => return Err(StoreError::Failed(e.to_string())),
                }
                results.push(applied);
                continue;
            }
            // Savepoints by cached statements: no SQL parsed per verdict.
            tx.prepare_cached("SAVEPOINT verdict")?.execute([])?;
            let applied = apply_in(&tx, &job.write, job.heartbeats, job.first_at_ms);
            if !matches!(applied, Ok(Applied::Done { .. })) {
                tx.prepare_cached("ROLLBACK TO verdict")?.execute([])?;
            }
            tx.prepare_cached("RELEASE verdict")?.execute([])?;
            results.push(applied);
        }
        tx.commit()?;
        Ok(results)
    };
    match run(conn) {
        Ok(results) => results,
        Err(e) => {
            let message = e.to_string();
            batch
                .iter()
                .map(|_| Err(StoreError::Failed(message.clone())))
                .collect()
        }
    }
}

/// Whether a verdict's outcome makes a cached snapshot of its workspace
/// stale: it wrote more than liveness and its decision, or it found the
/// workspace changed.
fn changes_snapshot(w: &VerdictWrite, result: &Result<Applied, StoreError>) -> bool {
    match result {
        Ok(Applied::Done { .. }) => {
            w.status.is_some()
                || !w.markers.is_empty()
                || w.registration.is_some()
                || w.stamp_register_failure
        }
        Ok(Applied::Coalesced) => false,
        Ok(Applied::Conflict) | Err(_) => true,
    }
}

/// Apply one verdict inside the caller's transaction; writes nothing on a
/// conflict (the caller rolls back).
fn apply_in(
    tx: &Connection,
    w: &VerdictWrite,
    heartbeats: u32,
    first_at_ms: Option<i64>,
) -> Result<Applied, StoreError> {
    let id = w.workspace_id.as_str();
    let version: Option<i64> = tx
        .prepare_cached("SELECT version FROM workspaces WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let Some(version) = version else {
        return Err(StoreError::UnknownWorkspace(id.to_string()));
    };
    if w.expected_version
        .is_some_and(|expected| expected != version)
    {
        return Ok(Applied::Conflict);
    }

    if let Some(l) = &w.liveness {
        let tools = l
            .loaded_mcp_tools
            .as_ref()
            .map(|t| serde_json::to_string(t).unwrap_or_default());
        tx.prepare_cached(
            "UPDATE workspaces SET last_heartbeat_ms = ?2, last_error_rate = ?3,
                 last_sample_error = ?4, active_tasks = ?5, uptime_seconds = ?6,
                 current_task = ?7, loaded_mcp_tools = COALESCE(?8, loaded_mcp_tools),
                 updated_ms = ?2
             WHERE id = ?1 AND status != 'removed'",
        )?
        .execute(params![
            id,
            w.now_ms,
            l.error_rate,
            l.sample_error,
            l.active_tasks,
            l.uptime_seconds,
            l.current_task,
            tools
        ])?;
    }

    if let Some(s) = &w.status {
        let changed = tx
            .prepare_cached(
                "UPDATE workspaces SET status = ?2,
                     last_sample_error = COALESCE(?3, last_sample_error), updated_ms = ?4
                 WHERE id = ?1 AND status = ?5",
            )?
            .execute(params![
                id,
                s.to.as_str(),
                s.message,
                w.now_ms,
                s.expected.as_str()
            ])?;
        if changed == 0 {
            return Ok(Applied::Conflict);
        }
    }

    for m in &w.markers {
        let changed = match (&m.seen, &m.new) {
            (None, Some(new)) => tx
                .prepare_cached(
                    "INSERT INTO policy_markers (workspace_id, owner, key, value, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )?
                .execute(params![id, m.owner, m.key, new, w.now_ms])?,
            (Some(seen), Some(new)) => tx
                .prepare_cached(
                    "UPDATE policy_markers SET value = ?4, updated_ms = ?5
                     WHERE workspace_id = ?1 AND owner = ?2 AND key = ?3 AND value = ?6",
                )?
                .execute(params![id, m.owner, m.key, new, w.now_ms, seen])?,
            (Some(seen), None) => tx
                .prepare_cached(
                    "DELETE FROM policy_markers
                     WHERE workspace_id = ?1 AND owner = ?2 AND key = ?3 AND value = ?4",
                )?
                .execute(params![id, m.owner, m.key, seen])?,
            (None, None) => {
                let present: bool = tx.query_row(
                    "SELECT EXISTS(SELECT 1 FROM policy_markers
                     WHERE workspace_id = ?1 AND owner = ?2 AND key = ?3)",
                    params![id, m.owner, m.key],
                    |r| r.get(0),
                )?;
                usize::from(!present)
            }
        };
        if changed != 1 {
            return Ok(Applied::Conflict);
        }
    }

    let d = &w.decision;
    let (input_json, steps_json, final_actions_json) = (
        d.detail.input_json(),
        d.detail.steps_json(),
        d.detail.final_actions_json(),
    );
    tx.prepare_cached(
        "INSERT INTO decisions (workspace_id, at_ms, event_kind, chain_version, outcome,
             input, steps, final_actions, attempts, heartbeats, first_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        id,
        w.now_ms,
        d.event_kind,
        d.chain_version,
        d.outcome,
        input_json,
        steps_json,
        final_actions_json,
        d.attempts,
        heartbeats,
        first_at_ms
    ])?;
    let decision_id = tx.last_insert_rowid();

    for (event_type, payload) in &w.events {
        tx.prepare_cached(
            "INSERT INTO events (workspace_id, event_type, payload, at_ms, decision_id)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![id, event_type, payload, w.now_ms, decision_id])?;
    }

    let mut queued = Vec::with_capacity(w.reconciles.len());
    for trigger in &w.reconciles {
        tx.prepare_cached(
            "INSERT INTO reconcile_runs (workspace_id, trigger, state, requested_ms, decision_id)
             VALUES (?1, ?2, 'queued', ?3, ?4)",
        )?
        .execute(params![id, trigger.as_str(), w.now_ms, decision_id])?;
        queued.push(QueuedRun {
            id: tx.last_insert_rowid(),
            workspace_id: id.to_string(),
            trigger: *trigger,
        });
    }

    if w.stamp_register_failure {
        tx.prepare_cached("UPDATE workspaces SET last_register_failure_ms = ?2 WHERE id = ?1")?
            .execute(params![id, w.now_ms])?;
    }

    let mut token_stored = false;
    if let Some(r) = &w.registration {
        tx.prepare_cached(
            "UPDATE workspaces SET url = ?2, agent_card = ?3, delivery_mode = ?4,
                 last_heartbeat_ms = ?5, last_register_failure_ms = NULL, updated_ms = ?5
             WHERE id = ?1 AND status != 'removed'",
        )?
        .execute(params![id, r.url, r.agent_card, r.delivery_mode, w.now_ms])?;
        if let Some(token) = &r.new_token {
            let live: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM auth_tokens
                 WHERE workspace_id = ?1 AND revoked_ms IS NULL)",
                [id],
                |r| r.get(0),
            )?;
            if !live {
                insert_token(tx, id, token, w.now_ms)?;
                token_stored = true;
            }
        }
    }

    Ok(Applied::Done {
        decision_id,
        queued,
        token_stored,
    })
}

fn insert_token(
    conn: &Connection,
    id: &str,
    token: &NewToken,
    now_ms: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO auth_tokens (workspace_id, token_hash, prefix, created_ms) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![id, token.hash, token.prefix, now_ms])?;
    Ok(())
}

fn require_workspace(conn: &Connection, id: &str) -> Result<WorkspaceKind, StoreError> {
    conn.query_row("SELECT kind FROM workspaces WHERE id = ?1", [id], |r| {
        parse_kind(r.get(0)?)
    })
    .optional()?
    .ok_or_else(|| StoreError::UnknownWorkspace(id.to_string()))
}

fn read_workspace(conn: &Connection, id: &str) -> Result<Option<WorkspaceRecord>, StoreError> {
    let rec = conn
        .query_row(
            "SELECT id, name, kind, status, url, delivery_mode, last_sample_error,
                    last_error_rate, last_heartbeat_ms, last_register_failure_ms,
                    EXISTS(SELECT 1 FROM workspace_secrets s
                           WHERE s.workspace_id = w.id AND s.name = 'MODEL'),
                    (SELECT COUNT(*) FROM auth_tokens t
                     WHERE t.workspace_id = w.id AND t.revoked_ms IS NULL)
             FROM workspaces w WHERE id = ?1",
            [id],
            |r| {
                Ok(WorkspaceRecord {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    kind: parse_kind(r.get(2)?)?,
                    status: parse_status(r.get(3)?)?,
                    url: r.get(4)?,
                    delivery_mode: r.get(5)?,
                    last_sample_error: r.get(6)?,
                    last_error_rate: r.get(7)?,
                    last_heartbeat_ms: r.get(8)?,
                    last_register_failure_ms: r.get(9)?,
                    model_configured: r.get(10)?,
                    declared_plugins: Vec::new(),
                    live_tokens: r.get(11)?,
                })
            },
        )
        .optional()?;
    let Some(mut rec) = rec else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT plugin_name, source FROM declared_plugins WHERE workspace_id = ?1 ORDER BY plugin_name",
    )?;
    rec.declared_plugins = stmt
        .query_map([id], |r| {
            Ok(DeclaredPlugin {
                name: r.get(0)?,
                source: r.get(1)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(rec))
}

impl Store for SqliteStore {
    fn load(&self, workspace_id: &str, read: Read) -> Result<Option<Snapshot>, StoreError> {
        if read == Read::Cached
            && let Some(snapshot) = self.cache.get(workspace_id)
        {
            return Ok(Some(snapshot));
        }
        let snapshot = self.with_reader(|c| load_snapshot(c, workspace_id))?;
        match &snapshot {
            // A removed workspace is never cached: nothing is written for
            // it, so no version check would catch a stale entry.
            Some(s) if s.workspace.status != Status::Removed => self.cache.put(s),
            _ => self.cache.forget(workspace_id),
        }
        Ok(snapshot)
    }

    fn submit(&self, write: VerdictWrite, done: Done) {
        self.writer.submit(Job::new(write, done, false));
    }

    fn submit_liveness(&self, write: VerdictWrite, done: Done) {
        debug_assert!(write.records_only_liveness());
        self.writer.submit(Job::new(write, done, true));
    }

    fn backlog(&self) -> u64 {
        self.writer.backlog()
    }

    fn observe_commits(&self, histogram: prometheus_client::metrics::histogram::Histogram) {
        let _ = self.writer.commit_seconds.set(histogram);
    }

    fn set_retention(&self, retention: Retention) {
        if let Ok(mut r) = self.writer.retention.lock() {
            *r = retention;
        }
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.writer.queue.lock().map_or(true, |q| q.closed) {
            return Err(StoreError::WriterStopped);
        }
        // Asked of the OS, not of an open connection: one keeps writing to a
        // file made read-only since (its descriptor was opened for writing)
        // until a checkpoint fails, and SQLite reuses such descriptors.
        for file in [self.path.clone(), wal_path(&self.path)] {
            if let Err(e) = std::fs::OpenOptions::new().write(true).open(&file)
                && (file == self.path || e.kind() != std::io::ErrorKind::NotFound)
            {
                return Err(StoreError::Failed(format!(
                    "the database file `{}` is read-only: {e}",
                    file.display()
                )));
            }
        }
        // And the write lock can be taken (no other process holds it for
        // longer than the busy timeout).
        let conn = open_connection(&self.path)?;
        conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")?;
        Ok(())
    }

    fn flush(&self) {
        self.writer.flush();
    }

    fn stamp_register_failure(&self, workspace_id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with_workspace_writer(workspace_id, |c| {
            c.execute(
                "UPDATE workspaces SET last_register_failure_ms = ?2 WHERE id = ?1",
                params![workspace_id, now_ms],
            )?;
            Ok(())
        })
    }

    fn add_workspace(&self, new: &NewWorkspace, now_ms: i64) -> Result<(), StoreError> {
        if !crate::model::valid_workspace_id(&new.id) {
            return Err(StoreError::Refused(format!(
                "workspace id `{}` must be 1-128 of A-Z, a-z, 0-9, `-`, `_`, `.`, not starting with `.`",
                new.id
            )));
        }
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let inserted = tx.execute(
                "INSERT INTO workspaces (id, name, kind, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT DO NOTHING",
                params![new.id, new.name, new.kind.as_str(), now_ms],
            )?;
            if inserted == 0 {
                return Err(StoreError::Exists(new.id.clone()));
            }
            if new.model_configured {
                tx.execute(
                    "INSERT INTO workspace_secrets (workspace_id, name, created_ms)
                     VALUES (?1, 'MODEL', ?2)",
                    params![new.id, now_ms],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn workspace(&self, id: &str) -> Result<Option<WorkspaceRecord>, StoreError> {
        self.with_reader(|c| read_workspace(c, id))
    }

    fn workspaces(&self) -> Result<Vec<WorkspaceRecord>, StoreError> {
        self.with_reader(|c| {
            let tx = c.transaction()?;
            let ids: Vec<String> = {
                let mut stmt = tx.prepare("SELECT id FROM workspaces ORDER BY id")?;
                stmt.query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?
            };
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(rec) = read_workspace(&tx, &id)? {
                    out.push(rec);
                }
            }
            tx.commit()?;
            Ok(out)
        })
    }

    fn set_status(&self, id: &str, status: Status, now_ms: i64) -> Result<(), StoreError> {
        self.with_workspace_writer(id, |c| {
            let n = c.execute(
                "UPDATE workspaces SET status = ?2, updated_ms = ?3 WHERE id = ?1",
                params![id, status.as_str(), now_ms],
            )?;
            if n == 0 {
                return Err(StoreError::UnknownWorkspace(id.to_string()));
            }
            Ok(())
        })
    }

    fn set_secret(&self, id: &str, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with_workspace_writer(id, |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            require_workspace(&tx, id)?;
            tx.execute(
                "INSERT INTO workspace_secrets (workspace_id, name, created_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
                params![id, name, now_ms],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn declare_plugin(
        &self,
        id: &str,
        name: &str,
        source: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with_workspace_writer(id, |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let kind = require_workspace(&tx, id)?;
            if name == MANAGEMENT_PLUGIN && kind != WorkspaceKind::Platform {
                return Err(StoreError::Refused(format!(
                    "refusing to declare privileged plugin `{name}` on non-platform workspace `{id}`"
                )));
            }
            tx.execute(
                "INSERT INTO declared_plugins (workspace_id, plugin_name, source, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (workspace_id, plugin_name)
                 DO UPDATE SET source = excluded.source, updated_ms = excluded.updated_ms",
                params![id, name, source, now_ms],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn issue_token(&self, id: &str, token: &NewToken, now_ms: i64) -> Result<(), StoreError> {
        self.with_workspace_writer(id, |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            require_workspace(&tx, id)?;
            insert_token(&tx, id, token, now_ms)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn revoke_tokens(&self, id: &str, now_ms: i64) -> Result<usize, StoreError> {
        self.with_workspace_writer(id, |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            require_workspace(&tx, id)?;
            let n = tx.execute(
                "UPDATE auth_tokens SET revoked_ms = ?2 WHERE workspace_id = ?1 AND revoked_ms IS NULL",
                params![id, now_ms],
            )?;
            tx.commit()?;
            Ok(n)
        })
    }

    fn reconcile_runs(&self, workspace_id: Option<&str>) -> Result<Vec<ReconcileRun>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare(&format!(
                "{RUN_COLUMNS} WHERE ?1 IS NULL OR workspace_id = ?1 ORDER BY id"
            ))?;
            let rows = stmt
                .query_map([workspace_id], run_from_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn reconcile_run(&self, id: i64) -> Result<Option<ReconcileRun>, StoreError> {
        self.with_reader(|c| {
            Ok(
                c.query_row(&format!("{RUN_COLUMNS} WHERE id = ?1"), [id], run_from_row)
                    .optional()?,
            )
        })
    }

    fn requeue_interrupted(&self) -> Result<usize, StoreError> {
        self.with_writer(|c| {
            Ok(c.execute(
                "UPDATE reconcile_runs SET state = 'queued', started_ms = NULL WHERE state = 'running'",
                [],
            )?)
        })
    }

    fn claim_run(&self, now_ms: i64) -> Result<Option<ReconcileRun>, StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id: Option<i64> = tx
                .query_row(
                    "SELECT r.id FROM reconcile_runs r
                     WHERE r.state = 'queued' AND NOT EXISTS (
                         SELECT 1 FROM reconcile_runs x
                         WHERE x.workspace_id = r.workspace_id AND x.state = 'running')
                     ORDER BY r.id LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(id) = id else {
                return Ok(None);
            };
            tx.execute(
                "UPDATE reconcile_runs SET state = 'running', started_ms = ?2,
                     attempts = attempts + 1
                 WHERE id = ?1",
                params![id, now_ms],
            )?;
            let run = tx.query_row(&format!("{RUN_COLUMNS} WHERE id = ?1"), [id], run_from_row)?;
            tx.commit()?;
            Ok(Some(run))
        })
    }

    fn finish_run(
        &self,
        id: i64,
        outcome: RunOutcome,
        now_ms: i64,
        cause: Option<&str>,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let state = match outcome {
            RunOutcome::Succeeded => "succeeded",
            RunOutcome::Failed => "failed",
        };
        self.with_writer(|c| {
            c.execute(
                "UPDATE reconcile_runs SET state = ?2, finished_ms = ?3, cause = ?4, detail = ?5
                 WHERE id = ?1",
                params![id, state, now_ms, cause, detail.to_string()],
            )?;
            Ok(())
        })
    }

    fn reconcile_plan(&self, workspace_id: &str) -> Result<ReconcilePlan, StoreError> {
        self.with_reader(|c| {
            let tx = c.transaction()?;
            let kind = require_workspace(&tx, workspace_id)?;
            let declared = {
                let mut stmt = tx.prepare_cached(
                    "SELECT plugin_name, source FROM declared_plugins
                     WHERE workspace_id = ?1 ORDER BY plugin_name",
                )?;
                stmt.query_map([workspace_id], |r| {
                    Ok(DeclaredPlugin {
                        name: r.get(0)?,
                        source: r.get(1)?,
                    })
                })?
                .collect::<Result<_, _>>()?
            };
            let installed = read_installed(&tx, workspace_id)?;
            tx.commit()?;
            Ok(ReconcilePlan {
                kind,
                declared,
                installed,
            })
        })
    }

    fn record_install(
        &self,
        workspace_id: &str,
        plugin: &InstalledPlugin,
    ) -> Result<(), StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let kind = require_workspace(&tx, workspace_id)?;
            if plugin.name == MANAGEMENT_PLUGIN && kind != WorkspaceKind::Platform {
                return Err(StoreError::Refused(format!(
                    "refusing to record privileged plugin `{}` on non-platform workspace `{workspace_id}`",
                    plugin.name
                )));
            }
            tx.execute(
                "INSERT INTO installed_plugins
                     (workspace_id, plugin_name, source, tracked_ref, installed_sha, installed_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (workspace_id, plugin_name) DO UPDATE SET
                     source = excluded.source, tracked_ref = excluded.tracked_ref,
                     installed_sha = excluded.installed_sha, installed_ms = excluded.installed_ms",
                params![
                    workspace_id,
                    plugin.name,
                    plugin.source,
                    plugin.tracked_ref,
                    plugin.installed_sha,
                    plugin.installed_ms
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn installed_plugins(&self, workspace_id: &str) -> Result<Vec<InstalledPlugin>, StoreError> {
        self.with_reader(|c| read_installed(c, workspace_id))
    }

    fn events(&self, workspace_id: &str) -> Result<Vec<EventRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare(
                "SELECT id, workspace_id, event_type, payload, at_ms FROM events
                 WHERE workspace_id = ?1 ORDER BY id",
            )?;
            let rows = stmt
                .query_map([workspace_id], |r| {
                    Ok(EventRow {
                        id: r.get(0)?,
                        workspace_id: r.get(1)?,
                        event_type: r.get(2)?,
                        payload: json_or_null(r.get(3)?),
                        at_ms: r.get(4)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn decisions(&self, workspace_id: &str, limit: usize) -> Result<Vec<DecisionRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare(&format!(
                "{DECISION_COLUMNS} WHERE workspace_id = ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            let mut rows: Vec<DecisionRow> = stmt
                .query_map(params![workspace_id, limit as i64], decision_from_row)?
                .collect::<Result<_, _>>()?;
            rows.reverse();
            Ok(rows)
        })
    }

    fn decisions_since(
        &self,
        since_ms: i64,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<DecisionRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare(&format!(
                "{DECISION_COLUMNS} WHERE at_ms >= ?1 AND id > ?2 ORDER BY id LIMIT ?3"
            ))?;
            let rows = stmt
                .query_map(params![since_ms, after_id, limit as i64], decision_from_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn put_module(
        &self,
        digest: &str,
        bytes: &[u8],
        meta: &crate::model::Metadata,
        by: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with_writer(|c| {
            c.execute(
                "INSERT INTO policy_modules (digest, bytes, name, version, uploaded_ms, uploaded_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                params![digest, bytes, meta.name, meta.version, now_ms, by],
            )?;
            Ok(())
        })
    }

    fn module_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_reader(|c| {
            Ok(c.query_row(
                "SELECT bytes FROM policy_modules WHERE digest = ?1",
                [digest],
                |r| r.get(0),
            )
            .optional()?)
        })
    }

    fn stage_chain(
        &self,
        version: &str,
        spec: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<StoredChain, StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO chains (version, spec, state, created_ms, created_by)
                 VALUES (?1, ?2, 'staged', ?3, ?4)",
                params![version, spec, now_ms, by],
            )?;
            let id = tx.last_insert_rowid();
            let chain = tx.query_row(
                &format!("{CHAIN_COLUMNS} WHERE id = ?1"),
                [id],
                chain_from_row,
            )?;
            tx.commit()?;
            Ok(chain)
        })
    }

    fn activate_chain(&self, id: i64, by: &str, now_ms: i64) -> Result<StoredChain, StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let exists: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM chains WHERE id = ?1)",
                [id],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(StoreError::Refused(format!("no chain {id}")));
            }
            tx.execute(
                "UPDATE chains SET state = 'retired' WHERE state = 'active' AND id != ?1",
                [id],
            )?;
            tx.execute(
                "UPDATE chains SET state = 'active', activated_ms = ?2, activated_by = ?3
                 WHERE id = ?1",
                params![id, now_ms, by],
            )?;
            let chain = tx.query_row(
                &format!("{CHAIN_COLUMNS} WHERE id = ?1"),
                [id],
                chain_from_row,
            )?;
            tx.commit()?;
            Ok(chain)
        })
    }

    fn active_chain(&self) -> Result<Option<StoredChain>, StoreError> {
        self.with_reader(|c| {
            Ok(c.query_row(
                &format!("{CHAIN_COLUMNS} WHERE state = 'active'"),
                [],
                chain_from_row,
            )
            .optional()?)
        })
    }

    fn chain(&self, id: i64) -> Result<Option<StoredChain>, StoreError> {
        self.with_reader(|c| {
            Ok(c.query_row(
                &format!("{CHAIN_COLUMNS} WHERE id = ?1"),
                [id],
                chain_from_row,
            )
            .optional()?)
        })
    }

    fn chain_by_version(&self, version: &str) -> Result<Option<StoredChain>, StoreError> {
        self.with_reader(|c| {
            Ok(c.query_row(
                &format!("{CHAIN_COLUMNS} WHERE version = ?1 ORDER BY id DESC LIMIT 1"),
                [version],
                chain_from_row,
            )
            .optional()?)
        })
    }

    fn previous_chain(&self) -> Result<Option<StoredChain>, StoreError> {
        self.with_reader(|c| {
            Ok(c.query_row(
                &format!(
                    "{CHAIN_COLUMNS} WHERE state = 'retired' AND activated_ms IS NOT NULL
                     ORDER BY activated_ms DESC, id DESC LIMIT 1"
                ),
                [],
                chain_from_row,
            )
            .optional()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_file_opened_by_many_at_once_opens_for_all() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("race.db");
            let openers: Vec<_> = (0..4)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || SqliteStore::open(&path).map(|_| ()))
                })
                .collect();
            for o in openers {
                o.join().unwrap().unwrap();
            }
        }
    }

    fn store_with(id: &str) -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("v.db")).unwrap();
        store
            .add_workspace(
                &NewWorkspace {
                    id: id.into(),
                    name: String::new(),
                    kind: WorkspaceKind::Platform,
                    model_configured: false,
                },
                1,
            )
            .unwrap();
        (dir, store)
    }

    fn version(store: &SqliteStore, id: &str) -> i64 {
        store.load(id, Read::Fresh).unwrap().unwrap().version
    }

    /// A decision row with a fixed input and no steps or actions.
    #[derive(Debug)]
    struct Fixed(String);

    impl DecisionDetail for Fixed {
        fn input_json(&self) -> String {
            self.0.clone()
        }
        fn steps_json(&self) -> String {
            "[]".into()
        }
        fn final_actions_json(&self) -> String {
            "[]".into()
        }
    }

    fn liveness_only(id: &str, expected_version: i64) -> VerdictWrite {
        VerdictWrite {
            workspace_id: id.into(),
            expected_version: Some(expected_version),
            now_ms: 2,
            liveness: Some(Liveness {
                error_rate: 0.0,
                sample_error: String::new(),
                active_tasks: 0,
                uptime_seconds: 1,
                current_task: None,
                loaded_mcp_tools: None,
            }),
            registration: None,
            stamp_register_failure: false,
            status: None,
            events: Vec::new(),
            markers: Vec::new(),
            reconciles: Vec::new(),
            decision: DecisionRecord {
                event_kind: "heartbeat".into(),
                chain_version: "test".into(),
                outcome: "applied".into(),
                detail: Arc::new(Fixed("{}".into())),
                attempts: 1,
            },
        }
    }

    #[test]
    fn every_change_a_verdict_reads_bumps_the_version_whoever_makes_it() {
        let (dir, store) = store_with("ws");
        let raw = Connection::open(dir.path().join("v.db")).unwrap();
        let mut seen = version(&store, "ws");
        let mut bumped = |what: &str, store: &SqliteStore| {
            let now = version(store, "ws");
            assert!(
                now > seen,
                "{what} did not bump the version ({seen} -> {now})"
            );
            seen = now;
        };
        store.set_status("ws", Status::Online, 2).unwrap();
        bumped("a status change", &store);
        raw.execute(
            "UPDATE workspaces SET status = 'offline' WHERE id = 'ws'",
            [],
        )
        .unwrap();
        bumped("a status change by raw SQL from another connection", &store);
        store.set_secret("ws", "MODEL", 3).unwrap();
        bumped("a secret", &store);
        store
            .declare_plugin("ws", MANAGEMENT_PLUGIN, "local://mcp", 4)
            .unwrap();
        bumped("a declared plugin", &store);
        let token = crate::auth::mint().unwrap();
        store.issue_token("ws", &token.stored, 5).unwrap();
        bumped("a token", &store);
        store.revoke_tokens("ws", 6).unwrap();
        bumped("a revocation", &store);
        raw.execute(
            "INSERT INTO policy_markers (workspace_id, owner, key, value, updated_ms)
             VALUES ('ws', 'p', 'k', 'v', 7)",
            [],
        )
        .unwrap();
        bumped("a marker", &store);
        store.stamp_register_failure("ws", 8).unwrap();
        bumped("a register failure", &store);
    }

    #[test]
    fn liveness_and_same_value_writes_keep_the_version() {
        let (_dir, store) = store_with("ws");
        store.set_status("ws", Status::Online, 2).unwrap();
        let v = version(&store, "ws");
        let applied = store.apply(liveness_only("ws", v)).unwrap();
        assert!(matches!(applied, Applied::Done { .. }), "{applied:?}");
        store.set_status("ws", Status::Online, 3).unwrap();
        assert_eq!(version(&store, "ws"), v);
    }

    #[test]
    fn a_verdict_from_a_stale_snapshot_is_a_conflict_and_writes_nothing() {
        let (dir, store) = store_with("ws");
        let cached = store.load("ws", Read::Cached).unwrap().unwrap();
        // Another process changes the workspace; this store's cache still
        // holds the old snapshot.
        Connection::open(dir.path().join("v.db"))
            .unwrap()
            .execute(
                "UPDATE workspaces SET status = 'paused' WHERE id = 'ws'",
                [],
            )
            .unwrap();
        let stale = store.load("ws", Read::Cached).unwrap().unwrap();
        assert_eq!(stale.version, cached.version, "served from the cache");
        assert_eq!(
            store.apply(liveness_only("ws", stale.version)).unwrap(),
            Applied::Conflict
        );
        assert!(store.decisions("ws", 10).unwrap().is_empty());
        let fresh = store.load("ws", Read::Fresh).unwrap().unwrap();
        assert_eq!(fresh.workspace.status, Status::Paused);
        assert!(matches!(
            store.apply(liveness_only("ws", fresh.version)).unwrap(),
            Applied::Done { .. }
        ));
    }

    #[test]
    fn the_wal_stays_bounded_under_sustained_verdicts() {
        let (dir, store) = store_with("ws");
        let seen = version(&store, "ws");
        for _ in 0..3_000 {
            let applied = store.apply(liveness_only("ws", seen)).unwrap();
            assert!(matches!(applied, Applied::Done { .. }), "{applied:?}");
        }
        // 3 000 commits of a few pages each: with the writer's checkpoint
        // switched off, the WAL measured 39 MB here.
        let wal = std::fs::metadata(dir.path().join("v.db-wal"))
            .unwrap()
            .len();
        assert!(wal < 8 << 20, "the WAL is {wal} bytes after 3 000 verdicts");
    }

    /// Submit a liveness-only verdict as the service does for an early
    /// acknowledgement; the outcome arrives on the returned channel.
    fn submit_held(
        store: &SqliteStore,
        write: VerdictWrite,
    ) -> std::sync::mpsc::Receiver<Result<Applied, StoreError>> {
        let (tx, rx) = std::sync::mpsc::channel();
        store.submit_liveness(
            write,
            Box::new(move |applied| {
                let _ = tx.send(applied);
            }),
        );
        rx
    }

    fn beat_at(id: &str, version: i64, now_ms: i64, task: &str) -> VerdictWrite {
        let mut w = liveness_only(id, version);
        w.now_ms = now_ms;
        if let Some(l) = w.liveness.as_mut() {
            l.current_task = Some(task.into());
        }
        w.decision.detail = Arc::new(Fixed(format!(r#"{{"task":"{task}"}}"#)));
        w
    }

    #[test]
    fn liveness_only_verdicts_close_together_are_coalesced_into_the_last() {
        let (_dir, store) = store_with("ws");
        let v = version(&store, "ws");
        let first = submit_held(&store, beat_at("ws", v, 1_000, "a"));
        let second = submit_held(&store, beat_at("ws", v, 1_100, "b"));
        let third = submit_held(&store, beat_at("ws", v, 1_200, "c"));
        store.flush();
        let outcomes: Vec<_> = [first, second, third]
            .iter()
            .map(|rx| rx.try_recv().unwrap().unwrap())
            .collect();
        assert_eq!(outcomes[0], Applied::Coalesced);
        assert_eq!(outcomes[1], Applied::Coalesced);
        assert!(matches!(outcomes[2], Applied::Done { .. }), "{outcomes:?}");
        let rows = store.decisions("ws", 10).unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].heartbeats, 3);
        assert_eq!(rows[0].first_at_ms, Some(1_000));
        assert_eq!(rows[0].at_ms, 1_200);
        assert_eq!(rows[0].input["task"], "c");
        let record = store.workspace("ws").unwrap().unwrap();
        assert_eq!(record.last_heartbeat_ms, Some(1_200));
    }

    #[test]
    fn liveness_only_verdicts_a_hold_apart_or_failed_keep_their_rows() {
        let (_dir, store) = store_with("ws");
        let v = version(&store, "ws");
        let hold = i64::try_from(LIVENESS_HOLD.as_millis()).unwrap();
        let _a = submit_held(&store, beat_at("ws", v, 1_000, "a"));
        let _b = submit_held(&store, beat_at("ws", v, 1_000 + hold, "b"));
        let mut failed = beat_at("ws", v, 1_000 + hold + 1, "c");
        failed.decision.outcome = "failed:timeout".into();
        let _c = submit_held(&store, failed);
        let _d = submit_held(&store, beat_at("ws", v, 1_000 + hold + 2, "d"));
        store.flush();
        let mut rows = store.decisions("ws", 10).unwrap();
        rows.sort_by_key(|r| r.id);
        let tasks: Vec<_> = rows.iter().map(|r| r.input["task"].clone()).collect();
        assert_eq!(tasks, ["a", "b", "c", "d"], "{rows:?}");
        assert!(
            rows.iter()
                .all(|r| r.heartbeats == 1 && r.first_at_ms.is_none())
        );
    }

    #[test]
    fn a_held_verdict_is_written_before_a_later_committed_one_of_its_workspace() {
        let (_dir, store) = store_with("ws");
        let v = version(&store, "ws");
        let held = submit_held(&store, beat_at("ws", v, 1_000, "held"));
        // A verdict the caller waits for: the held one goes first, in the
        // same batch, without waiting for the hold to run out.
        let applied = store.apply(beat_at("ws", v, 1_050, "waited")).unwrap();
        assert!(matches!(applied, Applied::Done { .. }), "{applied:?}");
        assert!(matches!(
            held.try_recv().unwrap().unwrap(),
            Applied::Done { .. }
        ));
        let mut rows = store.decisions("ws", 10).unwrap();
        rows.sort_by_key(|r| r.id);
        let tasks: Vec<_> = rows.iter().map(|r| r.input["task"].clone()).collect();
        assert_eq!(tasks, ["held", "waited"]);
    }

    #[test]
    fn a_held_verdict_is_written_after_the_hold_and_its_conflict_reported() {
        let (dir, store) = store_with("ws");
        let v = version(&store, "ws");
        let on_time = submit_held(&store, beat_at("ws", v, 1_000, "a"));
        // Nothing else happens: the writer's timer writes it.
        let applied = on_time.recv_timeout(LIVENESS_HOLD * 40).unwrap().unwrap();
        assert!(matches!(applied, Applied::Done { .. }), "{applied:?}");
        // The workspace changes elsewhere while a verdict is held.
        let stale = submit_held(&store, beat_at("ws", v, 2_000, "b"));
        Connection::open(dir.path().join("v.db"))
            .unwrap()
            .execute(
                "UPDATE workspaces SET status = 'paused' WHERE id = 'ws'",
                [],
            )
            .unwrap();
        store.flush();
        assert_eq!(stale.try_recv().unwrap().unwrap(), Applied::Conflict);
        assert_eq!(store.decisions("ws", 10).unwrap().len(), 1);
    }

    #[test]
    fn closing_the_store_writes_the_held_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let v = {
            let store = SqliteStore::open(&dir.path().join("v.db")).unwrap();
            store
                .add_workspace(
                    &NewWorkspace {
                        id: "ws".into(),
                        name: String::new(),
                        kind: WorkspaceKind::Workspace,
                        model_configured: false,
                    },
                    1,
                )
                .unwrap();
            let v = version(&store, "ws");
            let _held = submit_held(&store, beat_at("ws", v, 1_000, "a"));
            v
        };
        let store = SqliteStore::open(&dir.path().join("v.db")).unwrap();
        let rows = store.decisions("ws", 10).unwrap();
        assert_eq!(rows.len(), 1, "version {v}: {rows:?}");
    }

    #[test]
    fn the_decision_log_is_pruned_oldest_first_within_its_retention() {
        let (_dir, store) = store_with("ws");
        let v = version(&store, "ws");
        store.set_retention(Retention {
            max_rows: 1_000,
            max_age_ms: Some(1_000_000),
        });
        // 3 000 verdicts, one a millisecond apart, each waited for.
        for i in 0..3_000 {
            let applied = store.apply(beat_at("ws", v, 10_000 + i, "t")).unwrap();
            assert!(matches!(applied, Applied::Done { .. }), "{applied:?}");
        }
        // One pass of the writer's pruning: one chunk (2 000 rows at most)
        // beyond the cap.
        store.writer.prune(10_000 + 2_999);
        let rows = store.decisions("ws", 5_000).unwrap();
        assert_eq!(rows.len(), 1_000, "the newest 1 000 are kept");
        assert_eq!(rows.first().unwrap().at_ms, 10_000 + 2_000);
        assert_eq!(rows.last().unwrap().at_ms, 10_000 + 2_999);

        // By age: a verdict 1 000 s later makes every older row too old.
        let late = 10_000 + 3_000 + 1_000_000;
        store.apply(beat_at("ws", v, late, "late")).unwrap();
        store.writer.prune(late);
        let rows = store.decisions("ws", 5_000).unwrap();
        assert_eq!(rows.len(), 1, "{:?}", rows.first());
        assert_eq!(rows[0].input["task"], "late");
    }
}
