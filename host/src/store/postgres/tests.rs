//! What only the PostgreSQL store has: the lease fence of reconcile runs
//! and pruning under its advisory lock. The shared behaviour is in the
//! store suite (`store/suite.rs`).

use super::*;
use crate::store::suite::{Backend, Fixture, beat_at, pg_options};

#[test]
fn a_host_presumed_dead_cannot_record_a_run_taken_over() {
    let f = Fixture::with(Backend::Postgres, "ws");
    let v = f.version("ws");
    let mut w = beat_at("ws", v, 10, "t");
    w.reconciles.push(crate::model::ReconcileTrigger::Online);
    f.store.apply(w).unwrap();
    let a = f.store.as_ref();
    let b = PgStore::open(&f.db, &pg_options()).unwrap();
    let run = a.claim_run(20).unwrap().unwrap();
    // B does not take a run whose lease is live, not even at its start.
    assert_eq!(b.requeue_interrupted(21).unwrap(), Requeued::default());
    assert!(b.claim_run(21).unwrap().is_none());
    // A stops renewing (paused, partitioned): its lease passes.
    f.sql(
        "",
        "UPDATE reconcile_runs SET lease_until = now() - interval '1 second'",
    );
    let taken = b.claim_run(30).unwrap().unwrap();
    assert_eq!((taken.id, taken.attempts), (run.id, 2));
    let late = a.finish_run(
        run.id,
        RunOutcome::Failed,
        40,
        Some("late"),
        &serde_json::json!({}),
    );
    assert!(matches!(late, Err(StoreError::Refused(_))), "{late:?}");
    b.finish_run(
        run.id,
        RunOutcome::Succeeded,
        41,
        None,
        &serde_json::json!({}),
    )
    .unwrap();
    let done = a.reconcile_run(run.id).unwrap().unwrap();
    assert_eq!(
        (done.state.as_str(), done.finished_ms),
        ("succeeded", Some(41))
    );
    // A run interrupted MAX_RUN_ATTEMPTS times is failed when its lease
    // passes, not started again.
    let v = f.version("ws");
    let mut w = beat_at("ws", v, 50, "t");
    w.reconciles.push(crate::model::ReconcileTrigger::Online);
    f.store.apply(w).unwrap();
    let first = a.claim_run(51).unwrap().unwrap();
    f.sql(
        "",
        "UPDATE reconcile_runs SET lease_until = now() - interval '1 second'",
    );
    b.claim_run(52).unwrap().unwrap();
    f.sql(
        "",
        "UPDATE reconcile_runs SET lease_until = now() - interval '1 second'",
    );
    assert!(a.claim_run(53).unwrap().is_none());
    let failed = a.reconcile_run(first.id).unwrap().unwrap();
    assert_eq!(failed.state, "failed");
    assert!(failed.cause.unwrap().contains("interrupted 2 times"));
}

#[test]
fn leases_are_renewed_while_the_host_lives() {
    let f = Fixture::with(Backend::Postgres, "ws");
    let v = f.version("ws");
    let mut w = beat_at("ws", v, 10, "t");
    w.reconciles.push(crate::model::ReconcileTrigger::Online);
    f.store.apply(w).unwrap();
    let host = PgStore::open(&f.db, &pg_options()).unwrap();
    host.claim_run(20).unwrap().unwrap();
    let until = || {
        let name = f.db.rsplit('/').next().unwrap();
        heartgate_test_pg::PgCluster::shared()
            .psql(
                name,
                "SELECT extract(epoch FROM lease_until - now()) FROM reconcile_runs",
            )
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    // The lease is 2 s; after 3 s it is still ahead (renewed every 2/3 s).
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(until() > 0.0, "the lease lapsed while its host lived");
    // A host stopped cleanly gives its leases up at once.
    drop(host);
    assert!(until() <= 0.0);
}

#[test]
fn the_decision_log_is_pruned_to_its_cap_by_one_host() {
    let f = Fixture::with(Backend::Postgres, "ws");
    let store = PgStore::open(&f.db, &pg_options()).unwrap();
    let v = f.version("ws");
    for i in 0..1_200 {
        store.apply(beat_at("ws", v, 10_000 + i, "t")).unwrap();
    }
    if let Ok(mut r) = store.inner.retention.lock() {
        *r = Retention {
            max_rows: 1_000,
            max_age_ms: None,
        };
    }
    let inner = store.inner.clone();
    let pruned = store.run(async move { prune(&inner).await }).unwrap();
    assert_eq!(pruned, 200);
    assert_eq!(store.decisions("ws", 5_000).unwrap().len(), 1_000);
    // While another host holds the prune lock, this one prunes nothing.
    for i in 0..10 {
        store.apply(beat_at("ws", v, 20_000 + i, "t")).unwrap();
    }
    let other = PgStore::open(&f.db, &pg_options()).unwrap();
    let held = other.inner.clone();
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release_tx, release) = tokio::sync::oneshot::channel::<()>();
    let (released_tx, released) = std::sync::mpsc::channel();
    other.handle().unwrap().spawn(async move {
        let mut c = held.client().await.unwrap();
        let tx = c.transaction().await.unwrap();
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&schema::PRUNE_LOCK])
            .await
            .unwrap();
        locked_tx.send(()).unwrap();
        let _ = release.await;
        tx.commit().await.unwrap();
        released_tx.send(()).unwrap();
    });
    locked.recv().unwrap();
    let inner = store.inner.clone();
    assert_eq!(store.run(async move { prune(&inner).await }).unwrap(), 0);
    release_tx.send(()).unwrap();
    released.recv().unwrap();
    let inner = store.inner.clone();
    assert_eq!(store.run(async move { prune(&inner).await }).unwrap(), 10);
}

/// Liveness-only verdicts commit without waiting for the WAL flush (what
/// makes them cheap), every other verdict waits: counted in the server's
/// WAL syncs (`pg_stat_wal`), on a cluster of this test's own.
#[test]
fn liveness_verdicts_commit_without_waiting_for_the_wal_flush() {
    let cluster = heartgate_test_pg::PgCluster::start().unwrap();
    let url = cluster.fresh_database().unwrap();
    let syncs = || {
        cluster
            .psql("postgres", "SELECT wal_sync FROM pg_stat_wal")
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    let store = PgStore::open(&url, &pg_options()).unwrap();
    store
        .add_workspace(&crate::store::suite::platform("ws"), 1)
        .unwrap();
    let v = store.load("ws", Read::Fresh).unwrap().unwrap().version;
    // A backend reports its WAL statistics when it exits: each phase closes
    // its store's connections before the count is read.
    drop(store);
    let before = syncs();
    let store = PgStore::open(&url, &pg_options()).unwrap();
    for i in 0..200 {
        let applied = store.apply(beat_at("ws", v, 10 + i, "t")).unwrap();
        assert!(matches!(applied, Applied::Done { .. }), "{applied:?}");
    }
    drop(store);
    let liveness = syncs() - before;
    let before = syncs();
    let store = PgStore::open(&url, &pg_options()).unwrap();
    for i in 0..200 {
        // A register-failure stamp is more than liveness: committed in full.
        let mut w = beat_at("ws", v, 1_000 + i, "t");
        w.expected_version = None;
        w.stamp_register_failure = true;
        let applied = store.apply(w).unwrap();
        assert!(matches!(applied, Applied::Done { .. }), "{applied:?}");
    }
    drop(store);
    let full = syncs() - before;
    eprintln!("WAL syncs: {liveness} for 200 liveness verdicts, {full} for 200 others");
    assert!(
        liveness * 4 < full,
        "WAL syncs: {liveness} for 200 liveness verdicts, {full} for 200 others"
    );
}

#[test]
fn urls_are_shown_without_their_password() {
    assert_eq!(
        redacted("postgres://heartgate:s3cret@db.internal:5432/hg"),
        "postgres://heartgate:***@db.internal:5432/hg"
    );
    assert_eq!(
        redacted("postgres://heartgate@db/hg"),
        "postgres://heartgate@db/hg"
    );
    assert_eq!(redacted("postgresql://db/hg"), "postgresql://db/hg");
    assert!(is_postgres_url("postgresql://db/hg") && !is_postgres_url("hg.db"));
}

#[test]
fn a_queued_verdict_waits_out_a_database_restart() {
    // A server of its own: this test stops it.
    let cluster = heartgate_test_pg::PgCluster::start().unwrap();
    let url = cluster.fresh_database().unwrap();
    let store = PgStore::open(&url, &pg_options()).unwrap();
    store
        .add_workspace(&crate::store::suite::platform("ws"), 1)
        .unwrap();
    let v = store.load("ws", Read::Fresh).unwrap().unwrap().version;
    cluster.stop().unwrap();
    // One whose caller waits fails (fast: no hanging request) ...
    let waited = store.apply(beat_at("ws", v, 10, "waited"));
    assert!(
        matches!(waited, Err(StoreError::Unavailable(_))),
        "{waited:?}"
    );
    // ... one acknowledged once queued waits for the database.
    let (tx, rx) = std::sync::mpsc::channel();
    store.submit_liveness(
        beat_at("ws", v, 20, "queued"),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        rx.try_recv().is_err(),
        "answered while the database was down"
    );
    cluster.start_again().unwrap();
    let applied = rx.recv_timeout(QUEUED_OUTAGE_RETRY).unwrap();
    assert!(matches!(applied, Ok(Applied::Done { .. })), "{applied:?}");
    let db = url.rsplit('/').next().unwrap();
    let written = cluster
        .psql(
            db,
            "SELECT count(*) FROM decisions WHERE input LIKE '%queued%'",
        )
        .unwrap();
    assert_eq!(written, "1");
    drop(store);
}
