//! The SQLite store's own tests: opening, the marker migration, the WAL
//! bound, coalescing, pruning and the silence indexes. What every store
//! must do is in the shared suite (`store/suite.rs`).

use super::*;
use crate::store::suite::{beat_at, liveness_only, platform};
use crate::store::*;

fn store_with(id: &str) -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("v.db")).unwrap();
    store.add_workspace(&platform(id), 1).unwrap();
    (dir, store)
}

fn version(store: &SqliteStore, id: &str) -> i64 {
    store.load(id, Read::Fresh).unwrap().unwrap().version
}

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
fn activations_recorded_before_the_history_become_a_line_a_rollback_walks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    // Schema 12: chains keep only their last activation.
    {
        let mut conn = Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for sql in &migrations::MIGRATIONS[..12] {
            tx.execute_batch(sql).unwrap();
        }
        tx.pragma_update(None, "user_version", 12).unwrap();
        tx.execute_batch(
            "INSERT INTO chains (id, version, spec, state, created_ms, created_by, activated_ms,
                 activated_by, activation) VALUES
                 (1, 'va', '{}', 'retired', 1, 't', 2, 'alice', 1),
                 (2, 'vb', '{}', 'retired', 1, 't', 3, 'bob', 2),
                 (3, 'vc', '{}', 'active', 1, 't', 4, NULL, 3),
                 (4, 'vd', '{}', 'staged', 1, 't', NULL, NULL, NULL);",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let history: Vec<(i64, i64, String, Option<i64>)> = store
        .activations(10)
        .unwrap()
        .into_iter()
        .map(|a| (a.id, a.chain_id, a.by, a.back_to))
        .collect();
    assert_eq!(
        history,
        [
            (3, 3, "unknown".to_string(), Some(2)),
            (2, 2, "bob".into(), Some(1)),
            (1, 1, "alice".into(), None),
        ]
    );
    // New activations number on from the old ones.
    let d = store.activate_chain(4, "carol", 5).unwrap();
    assert_eq!(d.activation, Some(4));
    assert_eq!(store.rollback_chain("t", 6).unwrap().unwrap().id, 3);
    assert_eq!(store.rollback_chain("t", 7).unwrap().unwrap().id, 2);
}
