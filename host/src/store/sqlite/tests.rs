//! The SQLite store's own tests: versions, conflicts, the WAL bound,
//! coalescing and pruning.

use super::*;
use crate::store::*;

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
                runtime: String::new(),
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
    store.revoke_tokens("ws", 6, false).unwrap();
    bumped("a revocation", &store);
    raw.execute(
        "INSERT INTO policy_markers (workspace_id, slot, owner, key, value, updated_ms)
         VALUES ('ws', 's', 'p', 'k', 'v', 7)",
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
    let before = store.load("ws", Read::Cached).unwrap().unwrap();
    // Another process changes the workspace after the snapshot was read.
    Connection::open(dir.path().join("v.db"))
        .unwrap()
        .execute(
            "UPDATE workspaces SET status = 'paused' WHERE id = 'ws'",
            [],
        )
        .unwrap();
    assert_eq!(
        store.apply(liveness_only("ws", before.version)).unwrap(),
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
fn the_cache_never_answers_with_state_older_than_the_last_commit() {
    let (dir, store) = store_with("ws");
    let token = crate::auth::mint().unwrap();
    store.issue_token("ws", &token.stored, 2).unwrap();
    let cached = store.load("ws", Read::Cached).unwrap().unwrap();
    assert_eq!(cached.live_token_hashes.len(), 1);
    // Another process (the CLI) revokes the token: this store's cache is
    // not told, but the next cached read confirms the version first.
    let other = SqliteStore::open(&dir.path().join("v.db")).unwrap();
    other.revoke_tokens("ws", 3, false).unwrap();
    let again = store.load("ws", Read::Cached).unwrap().unwrap();
    assert!(
        again.live_token_hashes.is_empty(),
        "a revoked token served from the cache"
    );
    assert!(!again.token_bootstrap);
    assert_ne!(again.version, cached.version);
    // Unchanged, it is served from the cache (same version, one read).
    let hit = store.load("ws", Read::Cached).unwrap().unwrap();
    assert_eq!(hit.version, again.version);
}

#[test]
fn revoking_every_token_closes_bootstrap_until_reopened() {
    let (dir, store) = store_with("ws");
    let bootstrap = |store: &SqliteStore| {
        store
            .load("ws", Read::Fresh)
            .unwrap()
            .unwrap()
            .token_bootstrap
    };
    assert!(
        bootstrap(&store),
        "a workspace that never had a token bootstraps"
    );
    let token = crate::auth::mint().unwrap();
    store.issue_token("ws", &token.stored, 2).unwrap();
    assert!(!bootstrap(&store));
    store.revoke_tokens("ws", 3, false).unwrap();
    assert!(!bootstrap(&store), "revoked, it stays closed");
    store.revoke_tokens("ws", 4, true).unwrap();
    assert!(bootstrap(&store), "reopened by the operator");
    // Any token written, by whoever, closes it (a trigger).
    Connection::open(dir.path().join("v.db"))
        .unwrap()
        .execute(
            "INSERT INTO auth_tokens (workspace_id, token_hash, prefix, created_ms)
             VALUES ('ws', x'00', 'x', 5)",
            [],
        )
        .unwrap();
    assert!(!bootstrap(&store));
}

#[test]
fn modules_are_kept_within_the_quota_and_pruned_when_no_chain_uses_them() {
    let (_dir, store) = store_with("ws");
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
        .put_module(&digest('b'), &[0; 40], &meta("b"), "t", 2, quota)
        .unwrap();
    // The same module again is no new module.
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
    assert_eq!(store.modules().unwrap().len(), 1);
    assert!(store.delete_module(&digest('a')).unwrap().is_none());
}

#[test]
fn markers_move_to_the_slot_that_runs_their_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    // A database of the schema before markers had slots, with the built-in
    // chain's markers and one of a policy the active chain runs in a slot
    // named otherwise.
    {
        let mut conn = Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for sql in &migrations::MIGRATIONS[..6] {
            tx.execute_batch(sql).unwrap();
        }
        tx.pragma_update(None, "user_version", 6).unwrap();
        tx.execute_batch(
            "INSERT INTO workspaces (id, created_ms, updated_ms) VALUES ('ws', 1, 1);
             INSERT INTO policy_markers VALUES ('ws', 'recovery-cooldown', 'last-fire-ms', '5', 1);
             INSERT INTO policy_markers VALUES ('ws', 'status-rules', 'mcp-unloaded-since', '6', 1);
             INSERT INTO policy_markers VALUES ('ws', 'busy', 'since', '7', 1);
             INSERT INTO policy_modules VALUES ('d1', x'00', 'busy', '1', 1, 't');
             INSERT INTO chains (version, spec, state, created_ms, created_by) VALUES ('v',
                 '{\"slot\":[{\"name\":\"rules\",\"module\":\"builtin:status-rules\"},
                             {\"name\":\"hold\",\"module\":\"sha256:d1\"}]}', 'active', 1, 't');",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let mut markers: Vec<(String, String)> = store
        .load("ws", Read::Fresh)
        .unwrap()
        .unwrap()
        .markers
        .into_iter()
        .map(|m| (m.slot.unwrap(), m.owner))
        .collect();
    markers.sort();
    assert_eq!(
        markers,
        [
            ("cooldown".to_string(), "recovery-cooldown".to_string()),
            ("hold".into(), "busy".into()),
            ("rules".into(), "status-rules".into()),
        ]
    );
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
                    runtime: String::new(),
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

/// A silence verdict seen at `since_ms`, writing nothing else.
fn silence_at(id: &str, version: i64, now_ms: i64, since_ms: Option<i64>) -> VerdictWrite {
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

fn silent(store: &SqliteStore, kind: SilenceKind, before_ms: i64) -> Vec<String> {
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

#[test]
fn the_silence_queries_read_their_partial_indexes() {
    let (_dir, store) = store_with("ws");
    let conn = open_connection(&store.path).unwrap();
    for (kind, index) in [
        (
            SilenceKind::HeartbeatExpired,
            "workspaces_heartbeat_deadline",
        ),
        (
            SilenceKind::ProvisionTimeout,
            "workspaces_provision_deadline",
        ),
    ] {
        let sql = super::silence_sql(kind);
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(params![0, 0, "", 10], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            plan.iter().any(|p| p.contains(index)) && !plan.iter().any(|p| p.contains("SCAN")),
            "{kind:?}: {plan:?}"
        );
    }
}

#[test]
fn each_deadline_is_found_once_and_a_heartbeat_moves_it() {
    let (_dir, store) = store_with("ws");
    // Provisioning since 1: a provision timeout candidate, not a heartbeat one.
    assert_eq!(silent(&store, SilenceKind::ProvisionTimeout, 10), ["ws"]);
    assert!(silent(&store, SilenceKind::HeartbeatExpired, 10).is_empty());
    store.set_status("ws", Status::Online, 2).unwrap();
    let v = version(&store, "ws");
    assert!(matches!(
        store.apply(beat_at("ws", v, 5, "a")).unwrap(),
        Applied::Done { .. }
    ));
    assert!(silent(&store, SilenceKind::HeartbeatExpired, 4).is_empty());
    assert_eq!(silent(&store, SilenceKind::HeartbeatExpired, 5), ["ws"]);

    // A silence verdict computed before a heartbeat that landed first loses.
    let v = version(&store, "ws");
    store.apply(beat_at("ws", v, 7, "b")).unwrap();
    assert_eq!(
        store.apply(silence_at("ws", v, 9, Some(5))).unwrap(),
        Applied::Conflict
    );
    // One computed from the last heartbeat stands, and that deadline is not
    // found again ...
    assert!(matches!(
        store.apply(silence_at("ws", v, 9, Some(7))).unwrap(),
        Applied::Done { .. }
    ));
    assert!(silent(&store, SilenceKind::HeartbeatExpired, 100).is_empty());
    // Another host's evaluation of the same deadline, written second, loses.
    assert_eq!(
        store.apply(silence_at("ws", v, 9, Some(7))).unwrap(),
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
    // ... until the next heartbeat sets a new one.
    store.apply(beat_at("ws", v, 20, "c")).unwrap();
    assert_eq!(silent(&store, SilenceKind::HeartbeatExpired, 100), ["ws"]);
    // Frozen statuses are never candidates.
    store.set_status("ws", Status::Paused, 21).unwrap();
    assert!(silent(&store, SilenceKind::HeartbeatExpired, 100).is_empty());
}

#[test]
fn a_starting_host_after_a_gap_records_an_outage() {
    let (_dir, store) = store_with("ws");
    // The first sweep ever: an outage ending now.
    assert_eq!(store.sweep_started(1_000, Some(500)).unwrap(), 1_000);
    // A running host's sweeps keep it, however far apart.
    assert_eq!(store.sweep_started(1_200, None).unwrap(), 1_000);
    assert_eq!(store.sweep_started(9_000, None).unwrap(), 1_000);
    // A host starting while the others ran: no outage.
    assert_eq!(store.sweep_started(9_300, Some(500)).unwrap(), 1_000);
    // A host starting after nobody swept for longer than the gap: an outage.
    assert_eq!(store.sweep_started(20_000, Some(500)).unwrap(), 20_000);
}
