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
