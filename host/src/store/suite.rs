//! The behaviour every store must have, as one suite run against both
//! backends: each case is a function of a [`Fixture`], and
//! [`store_suite!`] makes a `store_suite_sqlite_<case>` and a
//! `store_suite_postgres_<case>` test of it. The PostgreSQL cases run on a
//! throwaway cluster (`heartgate-test-pg`), a fresh database each.
//!
//! What only one backend has (SQLite's WAL bound and coalescing, the
//! PostgreSQL lease fence) is tested beside that backend.

use std::sync::Arc;

use crate::model::{SilenceKind, Status, WorkspaceKind};
use crate::store::*;

/// Which store a case runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A store on a database of its own, with a way in from outside it.
pub(crate) struct Fixture {
    pub(crate) backend: Backend,
    /// The file path or the URL.
    pub(crate) db: String,
    pub(crate) store: Box<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    pub(crate) fn new(backend: Backend) -> Fixture {
        let (db, dir) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("v.db");
                (path.to_string_lossy().into_owned(), Some(dir))
            }
            Backend::Postgres => (
                heartgate_test_pg::PgCluster::shared()
                    .fresh_database()
                    .unwrap(),
                None,
            ),
        };
        let store = Self::open_at(backend, &db);
        Fixture {
            backend,
            db,
            store,
            _dir: dir,
        }
    }

    fn open_at(backend: Backend, db: &str) -> Box<dyn Store> {
        match backend {
            Backend::Sqlite => Box::new(SqliteStore::open(std::path::Path::new(db)).unwrap()),
            Backend::Postgres => Box::new(PgStore::open(db, &pg_options()).unwrap()),
        }
    }

    /// Another store on the same database: another host, or the CLI.
    pub(crate) fn other(&self) -> Box<dyn Store> {
        Self::open_at(self.backend, &self.db)
    }

    /// Run SQL on another connection (raw SQL, the way an operator or an
    /// old process might): `sqlite` or `postgres`, whichever applies.
    pub(crate) fn sql(&self, sqlite: &str, postgres: &str) {
        match self.backend {
            Backend::Sqlite => {
                rusqlite::Connection::open(&self.db)
                    .unwrap()
                    .execute_batch(sqlite)
                    .unwrap();
            }
            Backend::Postgres => {
                let name = self.db.rsplit('/').next().unwrap();
                heartgate_test_pg::PgCluster::shared()
                    .psql(name, postgres)
                    .unwrap();
            }
        }
    }

    /// The number `query` reads on another connection (the same SQL on
    /// either backend).
    pub(crate) fn number(&self, query: &str) -> i64 {
        match self.backend {
            Backend::Sqlite => rusqlite::Connection::open(&self.db)
                .unwrap()
                .query_row(query, [], |r| r.get(0))
                .unwrap(),
            Backend::Postgres => {
                let name = self.db.rsplit('/').next().unwrap();
                heartgate_test_pg::PgCluster::shared()
                    .psql(name, query)
                    .unwrap()
                    .parse()
                    .unwrap()
            }
        }
    }

    /// The fixture with workspace `id` (a platform workspace) provisioned.
    pub(crate) fn with(backend: Backend, id: &str) -> Fixture {
        let f = Fixture::new(backend);
        f.store.add_workspace(&platform(id), 1).unwrap();
        f
    }

    pub(crate) fn version(&self, id: &str) -> i64 {
        self.store.load(id, Read::Fresh).unwrap().unwrap().version
    }
}

/// Short leases, so that a test of a takeover waits little.
pub(crate) fn pg_options() -> crate::store::postgres::PgOptions {
    crate::store::postgres::PgOptions {
        lease: std::time::Duration::from_secs(2),
        ..Default::default()
    }
}

pub(crate) fn platform(id: &str) -> NewWorkspace {
    NewWorkspace {
        id: id.into(),
        name: String::new(),
        kind: WorkspaceKind::Platform,
        model_configured: false,
        runtime: String::new(),
    }
}

/// A decision row with a fixed input and no steps or actions.
#[derive(Debug)]
pub(crate) struct Fixed(pub(crate) String);

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

pub(crate) fn liveness_only(id: &str, expected_version: i64) -> VerdictWrite {
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
        runtime: None,
        agent_card_backfill: None,
        status: None,
        events: Vec::new(),
        markers: Vec::new(),
        conditions: Vec::new(),
        reconciles: Vec::new(),
        silence: None,
        decision: DecisionRecord {
            event_kind: "heartbeat".into(),
            chain_version: "test".into(),
            outcome: "applied".into(),
            detail: Arc::new(Fixed("{}".into())),
            attempts: 1,
        },
    }
}

pub(crate) fn beat_at(id: &str, version: i64, now_ms: i64, task: &str) -> VerdictWrite {
    let mut w = liveness_only(id, version);
    w.now_ms = now_ms;
    if let Some(l) = w.liveness.as_mut() {
        l.current_task = Some(task.into());
    }
    w.decision.detail = Arc::new(Fixed(format!(r#"{{"task":"{task}"}}"#)));
    w
}

/// A silence verdict seen at `since_ms`, writing nothing else.
pub(crate) fn silence_at(
    id: &str,
    version: i64,
    now_ms: i64,
    since_ms: Option<i64>,
) -> VerdictWrite {
    let mut w = liveness_only(id, version);
    w.now_ms = now_ms;
    w.liveness = None;
    w.decision.event_kind = "silence".into();
    w.silence = Some(SilenceSeen {
        kind: SilenceKind::HeartbeatExpired,
        since_ms,
    });
    w
}

/// The recovery a cooldown allows once: a marker compare-and-set from
/// `seen` and an `mcp-recovery` run.
fn fire(id: &str, version: i64, seen: Option<&str>, now_ms: i64) -> VerdictWrite {
    let mut w = liveness_only(id, version);
    w.now_ms = now_ms;
    w.markers.push(MarkerWrite {
        slot: "cooldown".into(),
        owner: "recovery-cooldown".into(),
        key: "last-fire-ms".into(),
        seen: seen.map(str::to_string),
        new: Some(now_ms.to_string()),
    });
    w.reconciles
        .push(crate::model::ReconcileTrigger::McpRecovery);
    w
}

fn silent(store: &dyn Store, kind: SilenceKind, before_ms: i64) -> Vec<String> {
    store
        .silent_workspaces(&SilenceQuery {
            kind,
            before_ms,
            after: None,
            limit: 100,
        })
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect()
}

/// One `#[test]` per backend for each case.
macro_rules! store_suite {
    ($($case:ident: $sqlite:ident, $postgres:ident;)*) => {
        $(
            #[test]
            fn $sqlite() {
                $case(Backend::Sqlite);
            }
            #[test]
            fn $postgres() {
                $case(Backend::Postgres);
            }
        )*
    };
}

store_suite! {
    version_bumps: store_suite_sqlite_every_change_a_verdict_reads_bumps_the_version,
        store_suite_postgres_every_change_a_verdict_reads_bumps_the_version;
    same_value_writes: store_suite_sqlite_liveness_and_same_value_writes_keep_the_version,
        store_suite_postgres_liveness_and_same_value_writes_keep_the_version;
    stale_snapshot: store_suite_sqlite_a_verdict_from_a_stale_snapshot_is_a_conflict,
        store_suite_postgres_a_verdict_from_a_stale_snapshot_is_a_conflict;
    cache_is_never_stale: store_suite_sqlite_the_cache_never_answers_older_than_the_last_commit,
        store_suite_postgres_the_cache_never_answers_older_than_the_last_commit;
    bootstrap_closes: store_suite_sqlite_revoking_every_token_closes_bootstrap_until_reopened,
        store_suite_postgres_revoking_every_token_closes_bootstrap_until_reopened;
    concurrent_fires: store_suite_sqlite_concurrent_verdicts_from_one_snapshot_fire_once,
        store_suite_postgres_concurrent_verdicts_from_one_snapshot_fire_once;
    module_quota: store_suite_sqlite_modules_are_kept_within_the_quota_and_pruned,
        store_suite_postgres_modules_are_kept_within_the_quota_and_pruned;
    chain_activation: store_suite_sqlite_activating_a_chain_retires_the_active_one,
        store_suite_postgres_activating_a_chain_retires_the_active_one;
    deadlines: store_suite_sqlite_each_deadline_is_found_once_and_a_heartbeat_moves_it,
        store_suite_postgres_each_deadline_is_found_once_and_a_heartbeat_moves_it;
    outage: store_suite_sqlite_a_starting_host_after_a_gap_records_an_outage,
        store_suite_postgres_a_starting_host_after_a_gap_records_an_outage;
    one_run_per_workspace: store_suite_sqlite_a_workspace_never_has_two_runs_at_once,
        store_suite_postgres_a_workspace_never_has_two_runs_at_once;
    inbound_secret: store_suite_sqlite_the_inbound_secret_is_minted_once_for_every_store,
        store_suite_postgres_the_inbound_secret_is_minted_once_for_every_store;
    operator_reads: store_suite_sqlite_operators_read_what_was_written,
        store_suite_postgres_operators_read_what_was_written;
    schema_too_new: store_suite_sqlite_a_schema_newer_than_the_binary_is_refused,
        store_suite_postgres_a_schema_newer_than_the_binary_is_refused;
    rollback_walks_history: store_suite_sqlite_rollbacks_walk_back_through_the_history,
        store_suite_postgres_rollbacks_walk_back_through_the_history;
    clear_state: store_suite_sqlite_an_operator_clears_markers_and_conditions,
        store_suite_postgres_an_operator_clears_markers_and_conditions;
    undeclare: store_suite_sqlite_an_undeclared_plugin_is_gone_from_the_next_snapshot,
        store_suite_postgres_an_undeclared_plugin_is_gone_from_the_next_snapshot;
    shadow_state: store_suite_sqlite_a_shadow_keeps_its_own_state_and_drops_it_with_itself,
        store_suite_postgres_a_shadow_keeps_its_own_state_and_drops_it_with_itself;
}

fn version_bumps(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let store = f.store.as_ref();
    let mut seen = f.version("ws");
    let mut bumped = |what: &str| {
        let now = f.version("ws");
        assert!(
            now > seen,
            "{what} did not bump the version ({seen} -> {now})"
        );
        seen = now;
    };
    store.set_status("ws", Status::Online, 2).unwrap();
    bumped("a status change");
    let raw = "UPDATE workspaces SET status = 'offline' WHERE id = 'ws'";
    f.sql(raw, raw);
    bumped("a status change by raw SQL from another connection");
    store.set_secret("ws", "MODEL", 3).unwrap();
    bumped("a secret");
    store
        .declare_plugin("ws", MANAGEMENT_PLUGIN, "local://mcp", 4)
        .unwrap();
    bumped("a declared plugin");
    let token = crate::auth::mint().unwrap();
    store.issue_token("ws", &token.stored, 5).unwrap();
    bumped("a token");
    store.revoke_tokens("ws", 6, false).unwrap();
    bumped("a revocation");
    let raw = "INSERT INTO policy_markers (workspace_id, slot, owner, key, value, updated_ms)
               VALUES ('ws', 's', 'p', 'k', 'v', 7)";
    f.sql(raw, raw);
    bumped("a marker");
    store.stamp_register_failure("ws", 8).unwrap();
    bumped("a register failure");
    f.other().set_status("ws", Status::Degraded, 9).unwrap();
    bumped("a status change by another store");
}

fn same_value_writes(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    f.store.set_status("ws", Status::Online, 2).unwrap();
    let v = f.version("ws");
    let applied = f.store.apply(liveness_only("ws", v)).unwrap();
    assert!(matches!(applied, Applied::Done { .. }), "{applied:?}");
    f.store.set_status("ws", Status::Online, 3).unwrap();
    assert_eq!(f.version("ws"), v);
}

fn stale_snapshot(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let before = f.store.load("ws", Read::Cached).unwrap().unwrap();
    let raw = "UPDATE workspaces SET status = 'paused' WHERE id = 'ws'";
    f.sql(raw, raw);
    assert_eq!(
        f.store.apply(liveness_only("ws", before.version)).unwrap(),
        Applied::Conflict
    );
    assert!(f.store.decisions("ws", 10).unwrap().is_empty());
    let fresh = f.store.load("ws", Read::Fresh).unwrap().unwrap();
    assert_eq!(fresh.workspace.status, Status::Paused);
    assert!(matches!(
        f.store.apply(liveness_only("ws", fresh.version)).unwrap(),
        Applied::Done { .. }
    ));
}

fn cache_is_never_stale(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let token = crate::auth::mint().unwrap();
    f.store.issue_token("ws", &token.stored, 2).unwrap();
    let cached = f.store.load("ws", Read::Cached).unwrap().unwrap();
    assert_eq!(cached.live_token_hashes.len(), 1);
    // Another process or host revokes the token: this store's cache is not
    // told, but the next cached read confirms the version first.
    f.other().revoke_tokens("ws", 3, false).unwrap();
    let again = f.store.load("ws", Read::Cached).unwrap().unwrap();
    assert!(
        again.live_token_hashes.is_empty(),
        "a revoked token served from the cache"
    );
    assert!(!again.token_bootstrap);
    assert_ne!(again.version, cached.version);
    let hit = f.store.load("ws", Read::Cached).unwrap().unwrap();
    assert_eq!(hit.version, again.version);
    // The same for a declared plugin and a secret.
    f.other().declare_plugin("ws", "p", "local://p", 4).unwrap();
    f.other().set_secret("ws", "MODEL", 5).unwrap();
    let seen = f.store.load("ws", Read::Cached).unwrap().unwrap();
    assert_eq!(seen.workspace.declared_plugins, ["p"]);
    assert!(seen.workspace.model_configured);
}

fn clear_state(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let v = f.version("ws");
    let mut w = beat_at("ws", v, 10, "t");
    for (slot, key) in [
        ("cooldown", "last-fire-ms"),
        ("cooldown", "other"),
        ("rules", "since"),
    ] {
        w.markers.push(MarkerWrite {
            slot: slot.into(),
            owner: "p".into(),
            key: key.into(),
            seen: None,
            new: Some("5".into()),
        });
    }
    for (slot, name) in [("gate", "identity"), ("rules", "error-rate")] {
        w.conditions.push(ConditionWrite {
            slot: slot.into(),
            owner: "p".into(),
            name: name.into(),
            new: Some(ConditionState {
                severity: crate::model::Severity::Failed,
                reason: "r".into(),
                message: "m".into(),
            }),
        });
    }
    f.store.apply(w).unwrap();
    let cached = f.store.load("ws", Read::Cached).unwrap().unwrap();
    assert_eq!(
        (cached.markers.len(), cached.workspace.conditions.len()),
        (3, 2)
    );
    let other = f.other();
    assert_eq!(
        other
            .clear_markers("ws", Some("cooldown"), Some("last-fire-ms"))
            .unwrap(),
        1
    );
    assert_eq!(
        other.clear_markers("ws", Some("cooldown"), None).unwrap(),
        1
    );
    assert_eq!(
        other
            .clear_conditions("ws", None, Some("identity"))
            .unwrap(),
        1
    );
    let seen = f.store.load("ws", Read::Cached).unwrap().unwrap();
    let keys: Vec<&str> = seen.markers.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(keys, ["since"]);
    let names: Vec<&str> = seen
        .workspace
        .conditions
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["error-rate"]);
    assert_eq!(other.clear_markers("ws", None, None).unwrap(), 1);
    assert_eq!(other.clear_conditions("ws", None, None).unwrap(), 1);
    assert_eq!(other.clear_conditions("ws", None, None).unwrap(), 0);
    assert!(matches!(
        other.clear_markers("nobody", None, None),
        Err(StoreError::UnknownWorkspace(_))
    ));
}

fn undeclare(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    f.store.declare_plugin("ws", "p", "local://p", 2).unwrap();
    f.store
        .declare_plugin("ws", MANAGEMENT_PLUGIN, "local://mcp", 2)
        .unwrap();
    let cached = f.store.load("ws", Read::Cached).unwrap().unwrap();
    assert_eq!(cached.workspace.declared_plugins.len(), 2);
    // Withdrawn by another process: the next cached read sees it.
    assert!(f.other().undeclare_plugin("ws", "p").unwrap());
    let seen = f.store.load("ws", Read::Cached).unwrap().unwrap();
    assert_eq!(seen.workspace.declared_plugins, [MANAGEMENT_PLUGIN]);
    assert_ne!(seen.version, cached.version);
    assert!(!f.store.undeclare_plugin("ws", "p").unwrap());
    // The platform workspace's management plugin stays.
    let refused = f.store.undeclare_plugin("ws", MANAGEMENT_PLUGIN);
    assert!(
        matches!(refused, Err(StoreError::Refused(_))),
        "{refused:?}"
    );
    assert!(matches!(
        f.store.undeclare_plugin("nobody", "p"),
        Err(StoreError::UnknownWorkspace(_))
    ));
}

fn bootstrap_closes(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let bootstrap = || {
        f.store
            .load("ws", Read::Fresh)
            .unwrap()
            .unwrap()
            .token_bootstrap
    };
    assert!(bootstrap(), "a workspace that never had a token bootstraps");
    let token = crate::auth::mint().unwrap();
    f.store.issue_token("ws", &token.stored, 2).unwrap();
    assert!(!bootstrap());
    f.store.revoke_tokens("ws", 3, false).unwrap();
    assert!(!bootstrap(), "revoked, it stays closed");
    f.store.revoke_tokens("ws", 4, true).unwrap();
    assert!(bootstrap(), "reopened by the operator");
    // Any token written, by whoever, closes it (a trigger).
    f.sql(
        "INSERT INTO auth_tokens (workspace_id, token_hash, prefix, created_ms)
         VALUES ('ws', x'00', 'x', 5)",
        "INSERT INTO auth_tokens (workspace_id, token_hash, prefix, created_ms)
         VALUES ('ws', '\\x00'::bytea, 'x', 5)",
    );
    assert!(!bootstrap());
}

/// 20 verdicts computed from one snapshot, from two stores at once (two
/// hosts): the marker's compare-and-set and the version let exactly one
/// fire.
fn concurrent_fires(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let other: Arc<dyn Store> = Arc::from(f.other());
    let v = f.version("ws");
    let outcomes: Vec<Applied> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let store: &dyn Store = if i % 2 == 0 {
                    f.store.as_ref()
                } else {
                    other.as_ref()
                };
                s.spawn(move || store.apply(fire("ws", v, None, 100 + i)).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let done = outcomes
        .iter()
        .filter(|a| matches!(a, Applied::Done { .. }))
        .count();
    assert_eq!(done, 1, "{outcomes:?}");
    let runs = f.store.reconcile_runs(Some("ws")).unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(f.store.decisions("ws", 100).unwrap().len(), 1);
}

fn module_quota(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let store = f.store.as_ref();
    let meta = |name: &str| crate::model::Metadata {
        name: name.into(),
        version: "1".into(),
    };
    let quota = ModuleQuota {
        max_modules: 2,
        max_bytes: 100,
    };
    let digest = |c: char| c.to_string().repeat(64);
    store
        .put_module(&digest('a'), &[0; 40], &meta("a"), "t", 1, quota)
        .unwrap();
    store
        .put_module(&digest('b'), &[1; 40], &meta("b"), "t", 2, quota)
        .unwrap();
    store
        .put_module(&digest('a'), &[0; 40], &meta("a"), "t", 3, quota)
        .unwrap();
    let full = store.put_module(&digest('c'), &[0; 10], &meta("c"), "t", 4, quota);
    assert!(
        matches!(full, Err(StoreError::QuotaExceeded(_))),
        "{full:?}"
    );
    let bytes = ModuleQuota {
        max_modules: 10,
        max_bytes: 100,
    };
    let over = store.put_module(&digest('c'), &[0; 21], &meta("c"), "t", 4, bytes);
    assert!(
        matches!(over, Err(StoreError::QuotaExceeded(_))),
        "{over:?}"
    );
    assert_eq!(store.module_bytes(&digest('b')).unwrap(), Some(vec![1; 40]));
    let spec = format!(
        r#"{{"slot":[{{"name":"x","module":"sha256:{}"}}]}}"#,
        digest('b')
    );
    let chain = store.stage_chain("v1", &spec, "t", 5).unwrap();
    let used = store.delete_module(&digest('b'));
    assert!(
        matches!(&used, Err(StoreError::InUse(why)) if why.contains(&format!("chain {}", chain.id))),
        "{used:?}"
    );
    let pruned = store.prune_modules().unwrap();
    assert_eq!(pruned.len(), 1);
    assert_eq!(pruned[0].module, format!("sha256:{}", digest('a')));
    assert_eq!(pruned[0].size, 40);
    assert_eq!(store.modules().unwrap().len(), 1);
    assert!(store.delete_module(&digest('a')).unwrap().is_none());
}

fn chain_activation(backend: Backend) {
    let f = Fixture::new(backend);
    let store = f.store.as_ref();
    assert!(store.active_chain().unwrap().is_none());
    let a = store.stage_chain("va", r#"{"slot":[]}"#, "t", 1).unwrap();
    let b = store.stage_chain("vb", r#"{"slot":[]}"#, "t", 2).unwrap();
    assert_eq!(a.state, "staged");
    store.activate_chain(a.id, "alice", 3).unwrap();
    let active = f.other().activate_chain(b.id, "bob", 4).unwrap();
    assert_eq!(active.state, "active");
    assert_eq!(active.activated_by.as_deref(), Some("bob"));
    assert_eq!(store.active_chain().unwrap().unwrap().id, b.id);
    assert_eq!(store.chain(a.id).unwrap().unwrap().state, "retired");
    assert_eq!(store.chain_by_version("vb").unwrap().unwrap().id, b.id);
    let missing = store.activate_chain(b.id + 100, "t", 5);
    assert!(
        matches!(missing, Err(StoreError::Refused(_))),
        "{missing:?}"
    );
    // Activating the active chain again records nothing.
    let again = store.activate_chain(b.id, "carol", 6).unwrap();
    assert_eq!(again.activation, active.activation);
    assert_eq!(store.activations(10).unwrap().len(), 2);
    let chains: Vec<i64> = store.chains(10).unwrap().iter().map(|c| c.id).collect();
    assert_eq!(chains, [b.id, a.id]);
}

/// Rollbacks walk back through the history (a, b, c active in turn: back
/// to b, then to a, then nothing more), on any host; activating anew
/// after a rollback starts a new branch whose rollback returns to where
/// it began.
fn rollback_walks_history(backend: Backend) {
    let f = Fixture::new(backend);
    let store = f.store.as_ref();
    assert!(store.rollback_chain("t", 1).unwrap().is_none());
    let [a, b, c] =
        ["va", "vb", "vc"].map(|v| store.stage_chain(v, r#"{"slot":[]}"#, "t", 1).unwrap());
    store.activate_chain(a.id, "alice", 2).unwrap();
    assert!(
        store.rollback_chain("t", 3).unwrap().is_none(),
        "nothing before the first activation"
    );
    store.activate_chain(b.id, "bob", 4).unwrap();
    store.activate_chain(c.id, "carol", 5).unwrap();
    let back = store.rollback_chain("dave", 6).unwrap().unwrap();
    assert_eq!((back.id, back.state.as_str()), (b.id, "active"));
    // Another host rolls back once more: further back, not to c again.
    let back = f.other().rollback_chain("erin", 7).unwrap().unwrap();
    assert_eq!(back.id, a.id);
    assert!(store.rollback_chain("t", 8).unwrap().is_none());
    assert_eq!(store.active_chain().unwrap().unwrap().id, a.id);
    let history = store.activations(10).unwrap();
    let seen: Vec<(i64, &str, &str, Option<i64>)> = history
        .iter()
        .map(|h| (h.chain_id, h.kind.as_str(), h.by.as_str(), h.from_chain))
        .collect();
    assert_eq!(
        seen,
        [
            (a.id, "rollback", "erin", Some(b.id)),
            (b.id, "rollback", "dave", Some(c.id)),
            (c.id, "activate", "carol", Some(b.id)),
            (b.id, "activate", "bob", Some(a.id)),
            (a.id, "activate", "alice", None),
        ]
    );
    assert!(history.windows(2).all(|w| w[0].id > w[1].id));
    assert_eq!(history[0].chain_version, "va");
    assert_eq!(
        store.active_chain().unwrap().unwrap().activation,
        Some(history[0].id)
    );
    assert_eq!(
        store.activation(history[1].id).unwrap().as_ref(),
        Some(&history[1])
    );
    // A new activation after rolling back: its rollback returns to a.
    store.activate_chain(c.id, "frank", 9).unwrap();
    assert_eq!(store.rollback_chain("t", 10).unwrap().unwrap().id, a.id);
    assert!(store.rollback_chain("t", 11).unwrap().is_none());
}

fn deadlines(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let store = f.store.as_ref();
    assert_eq!(silent(store, SilenceKind::ProvisionTimeout, 10), ["ws"]);
    assert!(silent(store, SilenceKind::HeartbeatExpired, 10).is_empty());
    store.set_status("ws", Status::Online, 2).unwrap();
    let v = f.version("ws");
    assert!(matches!(
        store.apply(beat_at("ws", v, 5, "a")).unwrap(),
        Applied::Done { .. }
    ));
    assert!(silent(store, SilenceKind::HeartbeatExpired, 4).is_empty());
    assert_eq!(silent(store, SilenceKind::HeartbeatExpired, 5), ["ws"]);
    let v = f.version("ws");
    store.apply(beat_at("ws", v, 7, "b")).unwrap();
    assert_eq!(
        store.apply(silence_at("ws", v, 9, Some(5))).unwrap(),
        Applied::Conflict
    );
    assert!(matches!(
        store.apply(silence_at("ws", v, 9, Some(7))).unwrap(),
        Applied::Done { .. }
    ));
    assert!(silent(store, SilenceKind::HeartbeatExpired, 100).is_empty());
    // Another host's evaluation of the same deadline, written second, loses.
    assert_eq!(
        f.other().apply(silence_at("ws", v, 9, Some(7))).unwrap(),
        Applied::Conflict
    );
    assert_eq!(
        store
            .load("ws", Read::Fresh)
            .unwrap()
            .unwrap()
            .silence_noticed_ms,
        Some(7)
    );
    store.apply(beat_at("ws", v, 20, "c")).unwrap();
    assert_eq!(silent(store, SilenceKind::HeartbeatExpired, 100), ["ws"]);
    store.set_status("ws", Status::Paused, 21).unwrap();
    assert!(silent(store, SilenceKind::HeartbeatExpired, 100).is_empty());
}

fn outage(backend: Backend) {
    let f = Fixture::new(backend);
    let store = f.store.as_ref();
    assert_eq!(store.sweep_started(1_000, Some(500)).unwrap(), 1_000);
    assert_eq!(store.sweep_started(1_200, None).unwrap(), 1_000);
    assert_eq!(f.other().sweep_started(9_000, None).unwrap(), 1_000);
    assert_eq!(store.sweep_started(9_300, Some(500)).unwrap(), 1_000);
    assert_eq!(store.sweep_started(20_000, Some(500)).unwrap(), 20_000);
}

/// Two runs of one workspace and one of another, claimed by two stores:
/// never two of one workspace at once; the second of `a` once the first
/// has finished.
fn one_run_per_workspace(backend: Backend) {
    let f = Fixture::with(backend, "a");
    f.store.add_workspace(&platform("b"), 1).unwrap();
    let v = f.version("a");
    f.store.apply(fire("a", v, None, 10)).unwrap();
    let v = f.version("a");
    f.store.apply(fire("a", v, Some("10"), 20)).unwrap();
    let v = f.version("b");
    f.store.apply(fire("b", v, None, 30)).unwrap();
    let other = f.other();
    let first = f.store.claim_run(40).unwrap().unwrap();
    let second = other.claim_run(41).unwrap().unwrap();
    assert_eq!(first.workspace_id, "a");
    assert_eq!(
        second.workspace_id, "b",
        "a's second run waits for its first"
    );
    assert!(f.store.claim_run(42).unwrap().is_none());
    assert!(other.claim_run(42).unwrap().is_none());
    f.store
        .finish_run(
            first.id,
            RunOutcome::Succeeded,
            50,
            None,
            &serde_json::json!({}),
        )
        .unwrap();
    let third = other.claim_run(51).unwrap().unwrap();
    assert_eq!(third.workspace_id, "a");
    assert_eq!(third.attempts, 1);
    let done = f.store.reconcile_run(first.id).unwrap().unwrap();
    assert_eq!(done.state, "succeeded");
    assert_eq!(done.finished_ms, Some(50));
}

fn inbound_secret(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let other = f.other();
    let (a, b) = (
        crate::auth::InboundSecret::mint().unwrap(),
        crate::auth::InboundSecret::mint().unwrap(),
    );
    let first = f.store.inbound_secret("ws", &a).unwrap();
    let second = other.inbound_secret("ws", &b).unwrap();
    assert_eq!(first.expose(), a.expose());
    assert_eq!(second.expose(), a.expose(), "the first stored wins");
    let rotated = crate::auth::InboundSecret::mint().unwrap();
    other.rotate_inbound_secret("ws", &rotated, 5).unwrap();
    let cached = f.store.load("ws", Read::Cached).unwrap().unwrap();
    assert_eq!(
        cached.inbound_secret.map(|s| s.expose().to_string()),
        Some(rotated.expose().to_string())
    );
    f.store.set_status("ws", Status::Removed, 6).unwrap();
    f.store.add_workspace(&platform("gone"), 7).unwrap();
    f.store.set_status("gone", Status::Removed, 8).unwrap();
    assert!(matches!(
        f.store.inbound_secret("gone", &b),
        Err(StoreError::UnknownWorkspace(_))
    ));
}

fn operator_reads(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let store = f.store.as_ref();
    store
        .declare_plugin("ws", MANAGEMENT_PLUGIN, "local://mcp", 2)
        .unwrap();
    let refused = {
        store
            .add_workspace(
                &NewWorkspace {
                    kind: WorkspaceKind::Workspace,
                    ..platform("plain")
                },
                2,
            )
            .unwrap();
        store.declare_plugin("plain", MANAGEMENT_PLUGIN, "local://mcp", 3)
    };
    assert!(
        matches!(refused, Err(StoreError::Refused(_))),
        "{refused:?}"
    );
    assert!(matches!(
        store.add_workspace(&platform("ws"), 3),
        Err(StoreError::Exists(_))
    ));
    assert!(matches!(
        store.add_workspace(&platform("-bad"), 3),
        Err(StoreError::Refused(_))
    ));
    let v = f.version("ws");
    let mut w = beat_at("ws", v, 10, "t");
    w.events.push(("E".into(), r#"{"a":1}"#.into()));
    w.status = Some(StatusWrite {
        expected: Status::Provisioning,
        to: Status::Online,
        message: None,
    });
    store.apply(w).unwrap();
    store
        .update_agent_card(
            "ws",
            r#"{"name":"x"}"#,
            r#"{"agent_card":{"name":"x"}}"#,
            11,
        )
        .unwrap();
    store
        .record_install(
            "ws",
            &InstalledPlugin {
                name: MANAGEMENT_PLUGIN.into(),
                source: "local://mcp".into(),
                tracked_ref: "none".into(),
                installed_sha: None,
                installed_ms: 12,
            },
        )
        .unwrap();
    let rec = store.workspace("ws").unwrap().unwrap();
    assert_eq!(rec.status, Status::Online);
    assert_eq!(rec.last_heartbeat_ms, Some(10));
    assert_eq!(rec.current_task.as_deref(), Some("t"));
    assert_eq!(rec.agent_card.as_deref(), Some(r#"{"name":"x"}"#));
    assert_eq!(rec.declared_plugins.len(), 1);
    let events: Vec<String> = store
        .events("ws")
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(events, ["E", "AGENT_CARD_UPDATED"]);
    assert_eq!(store.installed_plugins("ws").unwrap().len(), 1);
    let plan = store.reconcile_plan("ws").unwrap();
    assert_eq!((plan.declared.len(), plan.installed.len()), (1, 1));
    let decisions = store.decisions_since(0, 0, 10).unwrap();
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0].input["task"], "t");
    let ids: Vec<String> = store
        .workspaces()
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids, ["plain", "ws"]);
    store.check_writable().unwrap();
}

fn schema_too_new(backend: Backend) {
    let f = Fixture::new(backend);
    f.sql(
        "PRAGMA user_version = 999",
        "UPDATE heartgate_schema SET version = 999",
    );
    let reopened = match backend {
        Backend::Sqlite => SqliteStore::open(std::path::Path::new(&f.db)).map(|_| ()),
        Backend::Postgres => PgStore::open(&f.db, &pg_options()).map(|_| ()),
    };
    assert!(
        matches!(reopened, Err(StoreError::SchemaTooNew { found: 999, .. })),
        "{:?}",
        reopened.err()
    );
}

/// A shadow chain's own markers and conditions: apart from the real ones
/// (which stay as they were, version included), written by compare-and-set
/// from any host, only while the chain runs in shadow, and gone once the
/// shadow is replaced, started again or stopped.
fn shadow_state(backend: Backend) {
    let f = Fixture::with(backend, "ws");
    let store = f.store.as_ref();
    let a = store.stage_chain("va", r#"{"slot":[]}"#, "t", 1).unwrap();
    let b = store.stage_chain("vb", r#"{"slot":[]}"#, "t", 2).unwrap();
    let v = f.version("ws");
    store.apply(fire("ws", v, None, 10)).unwrap();
    let real = store.load("ws", Read::Fresh).unwrap().unwrap();
    assert_eq!(real.markers.len(), 1);

    let mine = ShadowState {
        markers: vec![crate::model::Marker {
            slot: Some("cooldown-1m".into()),
            owner: "recovery-cooldown".into(),
            key: "last-fire-ms".into(),
            value: "70".into(),
        }],
        conditions: vec![crate::model::Condition {
            slot: Some("gate".into()),
            owner: "rca2970-gate".into(),
            name: "identity".into(),
            severity: crate::model::Severity::Failed,
            reason: "mcp_server_missing".into(),
            message: "m".into(),
            since_ms: 70,
        }],
        version: 0,
    };
    let write = |store: &dyn Store, chain: i64, state: &ShadowState| {
        store.write_shadow_state(chain, "ws", state, 80).unwrap()
    };
    assert_eq!(write(store, a.id, &mine), ShadowWritten::NotShadow);
    store.set_shadow_chain(Some(a.id), "t", 20).unwrap();
    assert_eq!(store.shadow_state(a.id, "ws").unwrap(), None);
    assert_eq!(write(store, a.id, &mine), ShadowWritten::Stored);
    // Another host's shadow wrote first from the same (absent) state.
    let other = f.other();
    assert_eq!(write(other.as_ref(), a.id, &mine), ShadowWritten::Conflict);
    let stored = other.shadow_state(a.id, "ws").unwrap().unwrap();
    assert_eq!(
        stored,
        ShadowState {
            version: 1,
            ..mine.clone()
        }
    );
    let mut next = stored.clone();
    next.markers[0].value = "90".into();
    assert_eq!(write(other.as_ref(), a.id, &next), ShadowWritten::Stored);
    assert_eq!(write(store, a.id, &stored), ShadowWritten::Conflict);
    let stored = store.shadow_state(a.id, "ws").unwrap().unwrap();
    assert_eq!(
        (stored.version, stored.markers[0].value.as_str()),
        (2, "90")
    );

    // The real state is the verdict's alone.
    let after = store.load("ws", Read::Fresh).unwrap().unwrap();
    assert_eq!(after.version, real.version);
    assert_eq!(after.markers, real.markers);
    assert_eq!(after.workspace.conditions, real.workspace.conditions);
    assert_eq!(after.markers[0].value, "10");

    // Another chain in shadow: the first one's state is gone, its late
    // writes are refused, and the new one starts clean.
    other.set_shadow_chain(Some(b.id), "t", 30).unwrap();
    assert_eq!(store.shadow_state(a.id, "ws").unwrap(), None);
    assert_eq!(write(store, a.id, &stored), ShadowWritten::NotShadow);
    assert_eq!(write(store, a.id, &mine), ShadowWritten::NotShadow);
    assert_eq!(store.shadow_state(b.id, "ws").unwrap(), None);
    assert_eq!(write(store, b.id, &mine), ShadowWritten::Stored);
    // Started again, or stopped: nothing is left.
    store.set_shadow_chain(Some(b.id), "t", 40).unwrap();
    assert_eq!(store.shadow_state(b.id, "ws").unwrap(), None);
    assert_eq!(write(store, b.id, &mine), ShadowWritten::Stored);
    store.set_shadow_chain(None, "t", 50).unwrap();
    assert_eq!(store.shadow_state(b.id, "ws").unwrap(), None);
    assert_eq!(write(store, b.id, &mine), ShadowWritten::NotShadow);
    assert_eq!(f.number("SELECT count(*) FROM shadow_state"), 0);
    assert_eq!(
        store.load("ws", Read::Fresh).unwrap().unwrap().markers,
        real.markers
    );
}
