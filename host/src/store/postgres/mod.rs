//! The PostgreSQL store, for several stateless hosts on one database:
//! tokio-postgres through a deadpool pool (`[postgres] pool_size`
//! connections at most, prepared statements cached per connection), driven
//! by a small runtime of its own so that the [`Store`] interface stays
//! blocking and backend-neutral.
//!
//! What makes it correct on N hosts at once, all in the database:
//! - a verdict locks its workspace's row and checks its version in its own
//!   transaction (`verdict.rs`); concurrent commits are batched by
//!   PostgreSQL's group commit, not by savepoints;
//! - the snapshot cache answers only after one indexed read confirmed the
//!   version, so a change made by any host or the CLI is seen by the next
//!   heartbeat of every host (no notification needed);
//! - reconcile runs are leased to the host that claimed them, on the
//!   database's clock, renewed while they run, and fenced by a claim
//!   number: a host presumed dead cannot record the outcome of a run another
//!   host took over, and a unique index keeps one running run per workspace;
//! - migrations and decision-log pruning each run under an advisory lock.
//!
//! # Layout
//! - this module: the pool, the runtime, and every [`Store`] method but
//!   verdicts;
//! - `verdict.rs`: applying one verdict;
//! - `read.rs`: the snapshot and the rows operators read;
//! - `schema.rs`: the migrations and the advisory-lock keys.

mod read;
mod schema;
#[cfg(test)]
mod tests;
mod verdict;

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Transaction,
};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use self::read::*;
pub use self::verdict::LIVENESS_LOSS_WINDOW;
use crate::auth::InboundSecret;
use crate::model::{SilenceKind, Status, WorkspaceKind};
use crate::store::cache::{SnapshotCache, changes_snapshot};
use crate::store::health::Health;
use crate::store::*;

/// How a PostgreSQL store connects and leases.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// The most connections this host opens (`[postgres] pool_size`).
    pub pool_size: usize,
    /// How long a request waits for a connection before it fails (503).
    pub wait_timeout: Duration,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// How long a claimed reconcile run stays this host's without renewal
    /// (`[reconcile] lease_seconds`): a host killed mid-run has its runs
    /// re-claimed by another once this has passed.
    pub lease: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool_size: 16,
            wait_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            lease: Duration::from_secs(30),
        }
    }
}

/// Whether `db` names a PostgreSQL database (a `postgres://` or
/// `postgresql://` URL) rather than a SQLite file.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// `url` without its password, for logs and errors.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

struct Inner {
    pool: Pool,
    cache: SnapshotCache,
    health: Health,
    /// This process's name in the leases it holds.
    host: String,
    /// The claim number of each run this host holds: its fence.
    claims: Mutex<HashMap<i64, i64>>,
    retention: Mutex<Retention>,
    lease: Duration,
    /// Verdicts submitted, and answered (for `flush` and `backlog`).
    submitted: AtomicU64,
    answered: Mutex<u64>,
    answered_cv: Condvar,
    /// Whether this host prunes the decision log.
    pruning: std::sync::atomic::AtomicBool,
    /// Woken by a chain activation on any host (`LISTEN heartgate_chains`),
    /// once something asked for it.
    chains: std::sync::OnceLock<Arc<tokio::sync::Notify>>,
    /// How to open the listener's connection.
    config: tokio_postgres::Config,
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if unavailable(&e) {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Postgres(e)
        }
    }
}

/// Whether `e` says the server cannot be reached or is going away (rather
/// than that a statement failed).
fn unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::CONNECTION_FAILURE,
            SqlState::CONNECTION_EXCEPTION,
            SqlState::READ_ONLY_SQL_TRANSACTION,
        ]
        .contains(code),
        None => std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => StoreError::from(e),
        other => StoreError::Unavailable(format!("no database connection: {other}")),
    }
}

impl Inner {
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    fn answer(&self) {
        if let Ok(mut answered) = self.answered.lock() {
            *answered += 1;
            self.answered_cv.notify_all();
        }
    }

    /// A connection found broken (the server restarted since it was
    /// pooled) means the idle ones, opened to the same server, are too:
    /// they are dropped, so the next request opens a fresh one instead of
    /// failing on each of them in turn.
    fn saw<T>(&self, result: &Result<T, StoreError>) {
        if let Err(StoreError::Unavailable(_)) = result {
            self.pool.retain(|_, _| false);
        }
    }

    /// Record a write's outcome in the health (and the pool).
    fn wrote<T>(&self, result: &Result<T, StoreError>) {
        self.saw(result);
        match result {
            Ok(_) => self.health.succeeded(),
            Err(e) if cannot_write(e) => self.health.failed(&e.to_string()),
            Err(_) => {}
        }
    }
}

fn cannot_write(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Unavailable(_) | StoreError::Failed(_) | StoreError::WriterStopped
    )
}

impl PgStore {
    /// Connect to the database at `url` (a `postgres://` URL) and migrate
    /// it. Fails if the database cannot be reached or its schema is newer
    /// than this binary's.
    pub fn open(url: &str, options: &PgOptions) -> Result<PgStore, StoreError> {
        PgStore::open_with(url, options, true)
    }

    /// [`PgStore::open`] a database Heartgate has used already: one without
    /// its schema is [`StoreError::Missing`], and no schema is created in it.
    pub fn open_existing(url: &str, options: &PgOptions) -> Result<PgStore, StoreError> {
        PgStore::open_with(url, options, false)
    }

    fn open_with(url: &str, options: &PgOptions, create: bool) -> Result<PgStore, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
            StoreError::Refused(format!("`{}` is not a PostgreSQL URL: {e}", redacted(url)))
        })?;
        if config.get_application_name().is_none() {
            config.application_name("heartgate");
        }
        config.connect_timeout(options.connect_timeout);
        config.keepalives_idle(Duration::from_secs(30));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("heartgate-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Failed(format!("starting the database runtime: {e}")))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Failed(format!("building the connection pool: {e}")))?;
        let mut host_id = [0u8; 6];
        getrandom::fill(&mut host_id)
            .map_err(|e| StoreError::Failed(format!("naming this host: {e}")))?;
        let host = format!(
            "{}-{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
            std::process::id(),
            host_id
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let inner = Arc::new(Inner {
            pool,
            cache: SnapshotCache::default(),
            health: Health::remote(),
            host,
            claims: Mutex::new(HashMap::new()),
            retention: Mutex::new(Retention::default()),
            lease: options.lease,
            submitted: AtomicU64::new(0),
            answered: Mutex::new(0),
            answered_cv: Condvar::new(),
            pruning: std::sync::atomic::AtomicBool::new(false),
            chains: std::sync::OnceLock::new(),
            config: config.clone(),
        });
        let store = PgStore {
            inner,
            runtime: Some(runtime),
        };
        // Migrate on a connection of its own (the advisory lock is the
        // session's), then let go of it.
        let shown = url.to_owned();
        store.run(async move {
            let (mut client, connection) = config.connect(NoTls).await?;
            let driver = tokio::spawn(connection);
            let migrated = if create || schema::exists(&client).await? {
                schema::migrate(&mut client).await
            } else {
                Err(StoreError::Missing(format!(
                    "no Heartgate database at {}: its schema is not there (`heartgate db init` or `heartgate serve` creates it)",
                    redacted(&shown)
                )))
            };
            drop(client);
            let _ = driver.await;
            migrated
        })?;
        store.spawn_background();
        Ok(store)
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime.as_ref().map(tokio::runtime::Runtime::handle)
    }

    /// Run `fut` on the store's runtime and wait for it: callers are
    /// blocking threads, as for every store.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(handle) = self.handle() else {
            return Err(StoreError::WriterStopped);
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or(Err(StoreError::WriterStopped))
    }

    /// Submit `write`; `queued`: its caller was answered before its commit
    /// (it is retried through an outage, [`apply_queued`]).
    fn submit_with(&self, write: VerdictWrite, done: Done, queued: bool) {
        let Some(handle) = self.handle() else {
            done(Err(StoreError::WriterStopped));
            return;
        };
        self.inner.submitted.fetch_add(1, Ordering::SeqCst);
        let inner = self.inner.clone();
        handle.spawn(async move {
            let started = Instant::now();
            let result = if queued {
                apply_queued(&inner, &write).await
            } else {
                apply(&inner, &write).await
            };
            inner.wrote(&result);
            if result.is_ok()
                && let Some(h) = inner.health.commit_seconds()
            {
                h.observe(started.elapsed().as_secs_f64());
            }
            if changes_snapshot(&write, &result) {
                inner.cache.forget(&write.workspace_id);
            }
            done(result);
            inner.answer();
        });
    }

    /// [`PgStore::run`] with a client of the pool, for a write: its outcome
    /// counts in the health.
    fn write<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>, deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        let inner = self.inner.clone();
        self.run(async move {
            let client = inner.client().await;
            let result = match client {
                Ok(client) => f(inner.clone(), client).await,
                Err(e) => Err(e),
            };
            inner.wrote(&result);
            result
        })
    }

    /// Run `delete` (bound to the workspace id and two optional filters)
    /// with the workspace's row locked; how many rows went.
    fn delete_state(
        &self,
        id: &str,
        delete: &'static str,
        first: Option<&str>,
        second: Option<&str>,
    ) -> Result<usize, StoreError> {
        let (id_owned, first, second) = (
            id.to_string(),
            first.map(str::to_string),
            second.map(str::to_string),
        );
        self.write_workspace(id, move |_, mut c| async move {
            let tx = c.transaction().await?;
            lock_workspace(&tx, &id_owned).await?;
            let n = tx.execute(delete, &[&id_owned, &first, &second]).await?;
            tx.commit().await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    /// [`PgStore::write`] for a write to one workspace outside a verdict:
    /// its cached snapshot is dropped afterwards.
    fn write_workspace<T, F, Fut>(&self, id: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>, deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        let result = self.write(f);
        self.inner.cache.forget(id);
        result
    }

    /// [`PgStore::run`] with a client, for a read.
    fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        let inner = self.inner.clone();
        self.run(async move {
            let result = match inner.client().await {
                Ok(client) => f(client).await,
                Err(e) => Err(e),
            };
            inner.saw(&result);
            result
        })
    }

    /// Renew the leases of the runs this host holds, in the background.
    fn spawn_background(&self) {
        let Some(handle) = self.handle() else {
            return;
        };
        let inner = self.inner.clone();
        handle.spawn(async move {
            let every = (inner.lease / 3).max(Duration::from_millis(200));
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = renew_leases(&inner).await {
                    tracing::warn!(error = %e, "could not renew the leases of this host's reconcile runs");
                }
            }
        });
    }

    /// Prune the decision log in the background (one host at a time): only
    /// a host that was told the retention (the service, never the CLI).
    fn start_pruning(&self) {
        if self.inner.pruning.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(handle) = self.handle() else {
            return;
        };
        let inner = self.inner.clone();
        handle.spawn(async move {
            loop {
                let pruned = match prune(&inner).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!(error = %e, "pruning the decision log failed");
                        0
                    }
                };
                let pause = if pruned >= PRUNE_CHUNK {
                    Duration::from_millis(100)
                } else {
                    PRUNE_EVERY
                };
                tokio::time::sleep(pause).await;
            }
        });
    }
}

/// The application name of the connection that listens for chain
/// activations (what an operator sees in `pg_stat_activity`), followed by
/// `-<process id>`.
pub const LISTENER_NAME: &str = "heartgate-listener";

/// Listen for chain activations on a connection of its own, for as long as
/// the runtime runs: every notification wakes `notify`, and so does every
/// (re)connection, since one may have been missed while it was down.
async fn listen_for_chains(mut config: tokio_postgres::Config, notify: Arc<tokio::sync::Notify>) {
    config.application_name(format!("{LISTENER_NAME}-{}", std::process::id()));
    let mut backoff = Duration::from_millis(100);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
                let woken = notify.clone();
                tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                                woken.notify_one();
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break,
                        }
                    }
                    let _ = closed_tx.send(());
                });
                match client.batch_execute("LISTEN heartgate_chains").await {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        notify.notify_one();
                        let _ = closed.await;
                        tracing::warn!("the chain listener's connection closed; reconnecting");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not listen for chain activations")
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "the chain listener could not connect"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Decision rows deleted at most at once.
const PRUNE_CHUNK: u64 = 5_000;
/// How often a host looks for decision rows to prune.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

async fn renew_leases(inner: &Inner) -> Result<(), StoreError> {
    let held: Vec<i64> = inner
        .claims
        .lock()
        .map(|c| c.keys().copied().collect())
        .unwrap_or_default();
    if held.is_empty() {
        return Ok(());
    }
    let client = inner.client().await?;
    let lease = lease_seconds(inner.lease);
    client
        .execute(
            "UPDATE reconcile_runs SET lease_until = now() + make_interval(secs => $3)
             WHERE id = ANY($1) AND state = 'running' AND lease_owner = $2",
            &[&held, &inner.host, &lease],
        )
        .await?;
    Ok(())
}

fn lease_seconds(lease: Duration) -> f64 {
    lease.as_secs_f64().max(0.5)
}

/// Prune one chunk of the decision log past its retention, if no other host
/// is pruning; how many rows went.
async fn prune(inner: &Inner) -> Result<u64, StoreError> {
    let retention = inner.retention.lock().map(|r| *r).unwrap_or_default();
    let mut client = inner.client().await?;
    let tx = client.transaction().await?;
    let mine: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock($1)",
            &[&schema::PRUNE_LOCK],
        )
        .await?
        .get(0);
    if !mine {
        return Ok(0);
    }
    let max_rows = i64::try_from(retention.max_rows).unwrap_or(i64::MAX);
    let chunk = i64::try_from(PRUNE_CHUNK).unwrap_or(i64::MAX);
    // Ids are not dense (a conflict's rolled-back row used one), so
    // everything at or below the newest id minus the cap is at least what
    // must go: the cap holds, and the count needs no scan.
    let ids: Vec<i64> = tx
        .query(
            "SELECT id FROM decisions
             WHERE id <= (SELECT COALESCE(MAX(id), 0) FROM decisions) - $1
                OR ($2::BIGINT IS NOT NULL
                    AND at_ms < (SELECT MAX(at_ms) FROM decisions) - $2)
             ORDER BY id LIMIT $3",
            &[&max_rows, &retention.max_age_ms, &chunk],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute(
        "UPDATE reconcile_runs SET decision_id = NULL WHERE decision_id = ANY($1)",
        &[&ids],
    )
    .await?;
    tx.execute("DELETE FROM events WHERE decision_id = ANY($1)", &[&ids])
        .await?;
    let n = tx
        .execute("DELETE FROM decisions WHERE id = ANY($1)", &[&ids])
        .await?;
    tx.commit().await?;
    tracing::debug!(decisions = n, "pruned the decision log");
    Ok(n)
}

/// Apply one verdict in a transaction of its own. A verdict that finds its
/// connection broken is tried once more, on a fresh one ([`Inner::saw`]
/// dropped the stale idle ones): a verdict acknowledged once queued is not
/// lost to a stale connection. (A liveness verdict whose commit was lost
/// with its connection is written twice at worst; any other carries its
/// version, so a second write is a conflict.)
async fn apply(inner: &Inner, w: &VerdictWrite) -> Result<Applied, StoreError> {
    let first = apply_once(inner, w).await;
    inner.saw(&first);
    match first {
        Err(StoreError::Unavailable(_)) => apply_once(inner, w).await,
        other => other,
    }
}

/// How long a verdict acknowledged before its commit keeps being tried
/// while the database cannot be reached (a restart, a failover): an outage
/// shorter than this loses none of them. Nobody waits for these verdicts,
/// and while the database is down no new ones are acknowledged (their
/// snapshot cannot be read), so what waits is what was in flight.
pub const QUEUED_OUTAGE_RETRY: Duration = Duration::from_secs(15);

/// [`apply`] for a verdict acknowledged once queued: tried again, backing
/// off, until it is written or [`QUEUED_OUTAGE_RETRY`] has passed.
async fn apply_queued(inner: &Inner, w: &VerdictWrite) -> Result<Applied, StoreError> {
    let deadline = Instant::now() + QUEUED_OUTAGE_RETRY;
    let mut backoff = Duration::from_millis(50);
    loop {
        let result = apply_once(inner, w).await;
        inner.saw(&result);
        match result {
            Err(StoreError::Unavailable(e)) if Instant::now() + backoff < deadline => {
                tracing::debug!(workspace_id = %w.workspace_id, error = %e,
                    "a queued verdict waits for the database");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

async fn apply_once(inner: &Inner, w: &VerdictWrite) -> Result<Applied, StoreError> {
    let mut client = inner.client().await?;
    let tx = client.transaction().await?;
    match verdict::apply_in(&tx, w).await {
        Ok(done @ Applied::Done { .. }) => {
            tx.commit().await?;
            Ok(done)
        }
        Ok(other) => {
            tx.rollback().await?;
            Ok(other)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

impl Drop for PgStore {
    /// Answer what is queued, give up this host's leases (another host may
    /// take its runs at once), and stop the runtime.
    fn drop(&mut self) {
        self.flush();
        let inner = self.inner.clone();
        let held: Vec<i64> = inner
            .claims
            .lock()
            .map(|c| c.keys().copied().collect())
            .unwrap_or_default();
        if !held.is_empty() {
            let _ = self.run(async move {
                let client = inner.client().await?;
                client
                    .execute(
                        "UPDATE reconcile_runs SET lease_until = now()
                         WHERE id = ANY($1) AND state = 'running' AND lease_owner = $2",
                        &[&held, &inner.host],
                    )
                    .await?;
                Ok(())
            });
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Store for PgStore {
    fn load(&self, workspace_id: &str, read: Read) -> Result<Option<Snapshot>, StoreError> {
        let cached = match read {
            Read::Cached => self.inner.cache.get(workspace_id),
            Read::Fresh => None,
        };
        let id = workspace_id.to_string();
        let (snapshot, hit) = self.read(move |mut c| async move {
            if let Some(mut snapshot) = cached {
                let stmt = c
                    .prepare_cached(
                        "SELECT version, last_heartbeat_ms, platform_inbound_secret,
                                agent_card IS NOT NULL
                         FROM workspaces WHERE id = $1",
                    )
                    .await
                    .map_err(|e| read_failed(READING_ROW, e))?;
                let row = c
                    .query_opt(&stmt, &[&id])
                    .await
                    .map_err(|e| read_failed(READING_ROW, e))?;
                if let Some(row) = row
                    && row.get::<_, i64>(0) == snapshot.version
                {
                    snapshot.workspace.last_heartbeat_ms = row.get(1);
                    snapshot.inbound_secret = row
                        .get::<_, Option<String>>(2)
                        .map(InboundSecret::from_stored);
                    snapshot.has_agent_card = row.get(3);
                    return Ok((Some(snapshot), true));
                }
            }
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|e| read_failed(READING_ROW, e))?;
            let snapshot = read_snapshot(&tx, &id).await?;
            tx.commit().await.map_err(|e| read_failed(READING_ROW, e))?;
            Ok((snapshot, false))
        })?;
        if !hit {
            match &snapshot {
                Some(s) if s.workspace.status != Status::Removed => self.inner.cache.put(s),
                _ => self.inner.cache.forget(workspace_id),
            }
        }
        Ok(snapshot)
    }

    fn submit(&self, write: VerdictWrite, done: Done) {
        self.submit_with(write, done, false);
    }

    fn submit_liveness(&self, write: VerdictWrite, done: Done) {
        self.submit_with(write, done, true);
    }

    fn backlog(&self) -> u64 {
        let answered = self.inner.answered.lock().map(|a| *a).unwrap_or(0);
        self.inner
            .submitted
            .load(Ordering::SeqCst)
            .saturating_sub(answered)
    }

    fn set_retention(&self, retention: Retention) {
        if let Ok(mut r) = self.inner.retention.lock() {
            *r = retention;
        }
        self.start_pruning();
    }

    fn instrument(&self, metrics: StoreMetrics) {
        self.inner.health.instrument(metrics);
    }

    fn allows_early_ack(&self) -> bool {
        self.inner.health.allows_early_ack()
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        self.inner.health.check().map_err(StoreError::Failed)?;
        // A write transaction can be begun: the server is up and is not a
        // read-only standby.
        self.read(|c| async move {
            let recovering: bool = c.query_one("SELECT pg_is_in_recovery()", &[]).await?.get(0);
            if recovering {
                return Err(StoreError::Unavailable(
                    "the database is a read-only standby".into(),
                ));
            }
            Ok(())
        })
    }

    fn flush(&self) {
        let target = self.inner.submitted.load(Ordering::SeqCst);
        let Ok(mut answered) = self.inner.answered.lock() else {
            return;
        };
        while *answered < target {
            answered = match self
                .inner
                .answered_cv
                .wait_timeout(answered, Duration::from_secs(1))
            {
                Ok((a, _)) => a,
                Err(_) => return,
            };
        }
    }

    fn stamp_register_failure(&self, workspace_id: &str, now_ms: i64) -> Result<(), StoreError> {
        let id = workspace_id.to_string();
        self.write_workspace(workspace_id, move |_, c| async move {
            c.execute(
                "UPDATE workspaces SET last_register_failure_ms = $2 WHERE id = $1",
                &[&id, &now_ms],
            )
            .await?;
            Ok(())
        })
    }

    fn inbound_secret(
        &self,
        workspace_id: &str,
        mint: &InboundSecret,
    ) -> Result<InboundSecret, StoreError> {
        let id = workspace_id.to_string();
        let mint = mint.expose().to_string();
        self.write(move |_, c| async move {
            // Stored only where none is, then read back by a statement of
            // its own (which sees a secret another host committed
            // meanwhile): whichever host stores first wins.
            c.execute(
                "UPDATE workspaces SET platform_inbound_secret = $2
                 WHERE id = $1 AND platform_inbound_secret IS NULL AND status != 'removed'",
                &[&id, &mint],
            )
            .await?;
            let row = c
                .query_opt(
                    "SELECT platform_inbound_secret FROM workspaces WHERE id = $1",
                    &[&id],
                )
                .await?;
            match row.and_then(|r| r.get::<_, Option<String>>(0)) {
                Some(secret) => Ok(InboundSecret::from_stored(secret)),
                None => Err(StoreError::UnknownWorkspace(id)),
            }
        })
    }

    fn rotate_inbound_secret(
        &self,
        workspace_id: &str,
        new: &InboundSecret,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let id = workspace_id.to_string();
        let new = new.expose().to_string();
        self.write(move |_, c| async move {
            let n = c
                .execute(
                    "UPDATE workspaces SET platform_inbound_secret = $2, updated_ms = $3
                     WHERE id = $1",
                    &[&id, &new, &now_ms],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::UnknownWorkspace(id));
            }
            Ok(())
        })
    }

    fn update_agent_card(
        &self,
        workspace_id: &str,
        card: &str,
        event_payload: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (id, card, payload) = (
            workspace_id.to_string(),
            card.to_string(),
            event_payload.to_string(),
        );
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE workspaces SET agent_card = $2, updated_ms = $3
                     WHERE id = $1 AND status != 'removed'",
                    &[&id, &card, &now_ms],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::UnknownWorkspace(id));
            }
            tx.execute(
                "INSERT INTO events (workspace_id, event_type, payload, at_ms)
                 VALUES ($1, 'AGENT_CARD_UPDATED', $2, $3)",
                &[&id, &payload, &now_ms],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn silent_workspaces(&self, query: &SilenceQuery) -> Result<Vec<SilentWorkspace>, StoreError> {
        let sql = match query.kind {
            SilenceKind::HeartbeatExpired => {
                "SELECT id, last_heartbeat_ms, runtime FROM workspaces
                 WHERE status IN ('online', 'degraded', 'failed')
                     AND silence_noticed_ms IS DISTINCT FROM last_heartbeat_ms
                     AND last_heartbeat_ms <= $1 AND (last_heartbeat_ms, id) > ($2, $3)
                 ORDER BY last_heartbeat_ms, id LIMIT $4"
            }
            SilenceKind::ProvisionTimeout => {
                "SELECT id, status_since_ms, runtime FROM workspaces
                 WHERE status = 'provisioning'
                     AND silence_noticed_ms IS DISTINCT FROM status_since_ms
                     AND status_since_ms <= $1 AND (status_since_ms, id) > ($2, $3)
                 ORDER BY status_since_ms, id LIMIT $4"
            }
        };
        let (after_ms, after_id) = match &query.after {
            Some((ms, id)) => (*ms, id.clone()),
            None => (i64::MIN, String::new()),
        };
        let (before, kind) = (query.before_ms, query.kind);
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        self.read(move |c| async move {
            let stmt = c.prepare_cached(sql).await?;
            Ok(c.query(&stmt, &[&before, &after_ms, &after_id, &limit])
                .await?
                .iter()
                .map(|r| SilentWorkspace {
                    id: r.get(0),
                    kind,
                    since_ms: r.get(1),
                    runtime: r.get(2),
                })
                .collect())
        })
    }

    fn sweep_started(&self, now_ms: i64, gap_ms: Option<i64>) -> Result<i64, StoreError> {
        self.write(move |_, c| async move {
            let stmt = c
                .prepare_cached(
                    "INSERT INTO sweeps (id, up_since_ms, last_ms) VALUES (1, $1, $1)
                     ON CONFLICT (id) DO UPDATE SET
                         up_since_ms = CASE WHEN $1 - sweeps.last_ms > $2 THEN $1
                             ELSE sweeps.up_since_ms END,
                         last_ms = GREATEST(sweeps.last_ms, $1)
                     RETURNING up_since_ms",
                )
                .await?;
            Ok(c.query_one(&stmt, &[&now_ms, &gap_ms]).await?.get(0))
        })
    }

    fn add_workspace(&self, new: &NewWorkspace, now_ms: i64) -> Result<(), StoreError> {
        validate_new(new)?;
        let new = new.clone();
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            let inserted = tx
                .execute(
                    "INSERT INTO workspaces (id, name, kind, created_ms, updated_ms, runtime,
                         status_since_ms, delivery_mode)
                     VALUES ($1, $2, $3, $4, $4, $5, $4, $6) ON CONFLICT DO NOTHING",
                    &[
                        &new.id,
                        &new.name,
                        &new.kind.as_str(),
                        &now_ms,
                        &new.runtime,
                        &initial_delivery_mode(&new),
                    ],
                )
                .await?;
            if inserted == 0 {
                return Err(StoreError::Exists(new.id));
            }
            if new.model_configured {
                tx.execute(
                    "INSERT INTO workspace_secrets (workspace_id, name, created_ms)
                     VALUES ($1, 'MODEL', $2)",
                    &[&new.id, &now_ms],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn workspace(&self, id: &str) -> Result<Option<WorkspaceRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |c| async move { read_workspace(&c, &id).await })
    }

    fn workspaces(&self) -> Result<Vec<WorkspaceRecord>, StoreError> {
        self.read(move |mut c| async move {
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let ids: Vec<String> = tx
                .query("SELECT id FROM workspaces ORDER BY id", &[])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(rec) = read_workspace(&tx, &id).await? {
                    out.push(rec);
                }
            }
            tx.commit().await?;
            Ok(out)
        })
    }

    fn set_status(&self, id: &str, status: Status, now_ms: i64) -> Result<(), StoreError> {
        let id_owned = id.to_string();
        self.write_workspace(id, move |_, c| async move {
            let n = c
                .execute(
                    "UPDATE workspaces SET status = $2, updated_ms = $3,
                         status_since_ms = CASE WHEN status = $2 THEN status_since_ms ELSE $3 END
                     WHERE id = $1",
                    &[&id_owned, &status.as_str(), &now_ms],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::UnknownWorkspace(id_owned));
            }
            Ok(())
        })
    }

    fn set_secret(&self, id: &str, name: &str, now_ms: i64) -> Result<(), StoreError> {
        let (id_owned, name) = (id.to_string(), name.to_string());
        self.write_workspace(id, move |_, mut c| async move {
            let tx = c.transaction().await?;
            lock_workspace(&tx, &id_owned).await?;
            tx.execute(
                "INSERT INTO workspace_secrets (workspace_id, name, created_ms)
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&id_owned, &name, &now_ms],
            )
            .await?;
            tx.commit().await?;
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
        let (id_owned, name, source) = (id.to_string(), name.to_string(), source.to_string());
        self.write_workspace(id, move |_, mut c| async move {
            let tx = c.transaction().await?;
            let kind = lock_workspace(&tx, &id_owned).await?;
            refuse_privileged("declare", &name, kind, &id_owned)?;
            tx.execute(
                "INSERT INTO declared_plugins (workspace_id, plugin_name, source, created_ms,
                     updated_ms)
                 VALUES ($1, $2, $3, $4, $4)
                 ON CONFLICT (workspace_id, plugin_name)
                 DO UPDATE SET source = excluded.source, updated_ms = excluded.updated_ms",
                &[&id_owned, &name, &source, &now_ms],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn undeclare_plugin(&self, id: &str, name: &str) -> Result<bool, StoreError> {
        let (id_owned, name) = (id.to_string(), name.to_string());
        self.write_workspace(id, move |_, mut c| async move {
            let tx = c.transaction().await?;
            let kind = lock_workspace(&tx, &id_owned).await?;
            refuse_undeclare(&name, kind, &id_owned)?;
            let n = tx
                .execute(
                    "DELETE FROM declared_plugins WHERE workspace_id = $1 AND plugin_name = $2",
                    &[&id_owned, &name],
                )
                .await?;
            tx.commit().await?;
            Ok(n > 0)
        })
    }

    fn clear_markers(
        &self,
        id: &str,
        slot: Option<&str>,
        key: Option<&str>,
    ) -> Result<usize, StoreError> {
        self.delete_state(
            id,
            "DELETE FROM policy_markers WHERE workspace_id = $1
                 AND ($2::TEXT IS NULL OR slot = $2) AND ($3::TEXT IS NULL OR key = $3)",
            slot,
            key,
        )
    }

    fn clear_conditions(
        &self,
        id: &str,
        slot: Option<&str>,
        name: Option<&str>,
    ) -> Result<usize, StoreError> {
        self.delete_state(
            id,
            "DELETE FROM conditions WHERE workspace_id = $1
                 AND ($2::TEXT IS NULL OR slot = $2) AND ($3::TEXT IS NULL OR name = $3)",
            slot,
            name,
        )
    }

    fn issue_token(&self, id: &str, token: &NewToken, now_ms: i64) -> Result<(), StoreError> {
        let (id_owned, token) = (id.to_string(), token.clone());
        self.write_workspace(id, move |_, mut c| async move {
            let tx = c.transaction().await?;
            lock_workspace(&tx, &id_owned).await?;
            verdict::insert_token(&tx, &id_owned, &token, now_ms).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn revoke_tokens(
        &self,
        id: &str,
        now_ms: i64,
        allow_bootstrap: bool,
    ) -> Result<usize, StoreError> {
        let id_owned = id.to_string();
        self.write_workspace(id, move |_, mut c| async move {
            let tx = c.transaction().await?;
            lock_workspace(&tx, &id_owned).await?;
            let n = tx
                .execute(
                    "UPDATE auth_tokens SET revoked_ms = $2
                     WHERE workspace_id = $1 AND revoked_ms IS NULL",
                    &[&id_owned, &now_ms],
                )
                .await?;
            tx.execute(
                "UPDATE workspaces SET token_bootstrap = $2 WHERE id = $1",
                &[&id_owned, &allow_bootstrap],
            )
            .await?;
            tx.commit().await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn reconcile_runs(&self, workspace_id: Option<&str>) -> Result<Vec<ReconcileRun>, StoreError> {
        let id = workspace_id.map(str::to_string);
        self.read(move |c| async move {
            Ok(c.query(
                &format!("{RUN_COLUMNS} WHERE $1::TEXT IS NULL OR workspace_id = $1 ORDER BY id"),
                &[&id],
            )
            .await?
            .iter()
            .map(run_from_row)
            .collect())
        })
    }

    fn reconcile_run(&self, id: i64) -> Result<Option<ReconcileRun>, StoreError> {
        self.read(move |c| async move {
            Ok(c.query_opt(&format!("{RUN_COLUMNS} WHERE id = $1"), &[&id])
                .await?
                .as_ref()
                .map(run_from_row))
        })
    }

    /// On PostgreSQL, runs are taken over when their lease has passed (by
    /// [`Store::claim_run`] too, at any time): a starting host never takes
    /// the live runs of another. Those interrupted too often are failed.
    fn requeue_interrupted(&self, now_ms: i64) -> Result<Requeued, StoreError> {
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            let failed = fail_interrupted(&tx, now_ms).await?;
            let requeued = tx
                .execute(
                    "UPDATE reconcile_runs SET state = 'queued', started_ms = NULL,
                         lease_owner = NULL, lease_until = NULL, claim = NULL
                     WHERE state = 'running' AND lease_until < now()",
                    &[],
                )
                .await?;
            tx.commit().await?;
            Ok(Requeued {
                requeued: usize::try_from(requeued).unwrap_or(usize::MAX),
                failed,
            })
        })
    }

    fn claim_run(&self, now_ms: i64) -> Result<Option<ReconcileRun>, StoreError> {
        let claimed = self.write(move |inner, mut c| async move {
            let lease = lease_seconds(inner.lease);
            // Another host may claim a run of the same workspace at the same
            // moment: the unique index refuses the second, which tries again.
            for _ in 0..8 {
                let tx = c.transaction().await?;
                fail_interrupted(&tx, now_ms).await?;
                let row = tx
                    .query_opt(
                        &format!(
                            "UPDATE reconcile_runs SET state = 'running', started_ms = $1,
                                 attempts = attempts + 1, lease_owner = $2,
                                 lease_until = now() + make_interval(secs => $3),
                                 claim = nextval('reconcile_claims')
                             WHERE id = (
                                 SELECT r.id FROM reconcile_runs r
                                 WHERE (r.state = 'queued' AND NOT EXISTS (
                                         SELECT 1 FROM reconcile_runs x
                                         WHERE x.workspace_id = r.workspace_id
                                             AND x.state = 'running'))
                                     OR (r.state = 'running' AND r.lease_until < now())
                                 ORDER BY r.id LIMIT 1 FOR UPDATE SKIP LOCKED)
                             RETURNING {}, claim",
                            returning(RUN_COLUMNS)
                        ),
                        &[&now_ms, &inner.host, &lease],
                    )
                    .await;
                match row {
                    Ok(row) => {
                        tx.commit().await?;
                        return Ok(row.map(|r| (run_from_row(&r), r.get::<_, i64>(11))));
                    }
                    Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                        let _ = tx.rollback().await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(None)
        })?;
        Ok(claimed.map(|(run, claim)| {
            if let Ok(mut claims) = self.inner.claims.lock() {
                claims.insert(run.id, claim);
            }
            run
        }))
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
        let claim = self
            .inner
            .claims
            .lock()
            .ok()
            .and_then(|mut c| c.remove(&id));
        let (cause, detail) = (cause.map(str::to_string), detail.to_string());
        self.write(move |inner, c| async move {
            // The fence: only the claim that still holds the run records it.
            let n = c
                .execute(
                    "UPDATE reconcile_runs SET state = $2, finished_ms = $3, cause = $4,
                         detail = $5, lease_owner = NULL, lease_until = NULL
                     WHERE id = $1 AND state = 'running' AND lease_owner = $6
                         AND claim IS NOT DISTINCT FROM $7",
                    &[&id, &state, &now_ms, &cause, &detail, &inner.host, &claim],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::Refused(format!(
                    "reconcile run {id} is no longer this host's (its lease passed and another host took it over); its outcome is not recorded"
                )));
            }
            Ok(())
        })
    }

    fn reconcile_plan(&self, workspace_id: &str) -> Result<ReconcilePlan, StoreError> {
        let id = workspace_id.to_string();
        self.read(move |mut c| async move {
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let kind = require_workspace(&tx, &id).await?;
            let declared = tx
                .query(
                    "SELECT plugin_name, source FROM declared_plugins
                     WHERE workspace_id = $1 ORDER BY plugin_name",
                    &[&id],
                )
                .await?
                .iter()
                .map(|r| DeclaredPlugin {
                    name: r.get(0),
                    source: r.get(1),
                })
                .collect();
            let installed = read_installed(&tx, &id).await?;
            tx.commit().await?;
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
        let (id, plugin) = (workspace_id.to_string(), plugin.clone());
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            let kind = require_workspace(&tx, &id).await?;
            refuse_privileged("record", &plugin.name, kind, &id)?;
            tx.execute(
                "INSERT INTO installed_plugins
                     (workspace_id, plugin_name, source, tracked_ref, installed_sha, installed_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (workspace_id, plugin_name) DO UPDATE SET
                     source = excluded.source, tracked_ref = excluded.tracked_ref,
                     installed_sha = excluded.installed_sha, installed_ms = excluded.installed_ms",
                &[
                    &id,
                    &plugin.name,
                    &plugin.source,
                    &plugin.tracked_ref,
                    &plugin.installed_sha,
                    &plugin.installed_ms,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn installed_plugins(&self, workspace_id: &str) -> Result<Vec<InstalledPlugin>, StoreError> {
        let id = workspace_id.to_string();
        self.read(move |c| async move { read_installed(&c, &id).await })
    }

    fn events(&self, workspace_id: &str) -> Result<Vec<EventRow>, StoreError> {
        let id = workspace_id.to_string();
        self.read(move |c| async move {
            Ok(c.query(
                "SELECT id, workspace_id, event_type, payload, at_ms FROM events
                 WHERE workspace_id = $1 ORDER BY id",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| EventRow {
                id: r.get(0),
                workspace_id: r.get(1),
                event_type: r.get(2),
                payload: json_or_null(r.get(3)),
                at_ms: r.get(4),
            })
            .collect())
        })
    }

    fn decisions(&self, workspace_id: &str, limit: usize) -> Result<Vec<DecisionRow>, StoreError> {
        let id = workspace_id.to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| async move {
            let mut rows: Vec<DecisionRow> = c
                .query(
                    &format!(
                        "{DECISION_COLUMNS} WHERE workspace_id = $1 ORDER BY id DESC LIMIT $2"
                    ),
                    &[&id, &limit],
                )
                .await?
                .iter()
                .map(decision_from_row)
                .collect();
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
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| async move {
            Ok(c.query(
                &format!("{DECISION_COLUMNS} WHERE at_ms >= $1 AND id > $2 ORDER BY id LIMIT $3"),
                &[&since_ms, &after_id, &limit],
            )
            .await?
            .iter()
            .map(decision_from_row)
            .collect())
        })
    }

    fn put_module(
        &self,
        digest: &str,
        bytes: &[u8],
        meta: &crate::model::Metadata,
        by: &str,
        now_ms: i64,
        quota: ModuleQuota,
    ) -> Result<(), StoreError> {
        let (digest, bytes, name, version, by) = (
            digest.to_string(),
            bytes.to_vec(),
            meta.name.clone(),
            meta.version.clone(),
            by.to_string(),
        );
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            // Two hosts storing at once must not both fit under the quota.
            tx.batch_execute("LOCK TABLE policy_modules IN SHARE ROW EXCLUSIVE MODE")
                .await?;
            let row = tx
                .query_one(
                    "SELECT EXISTS(SELECT 1 FROM policy_modules WHERE digest = $1),
                            COUNT(*), COALESCE(SUM(octet_length(bytes)), 0)::BIGINT
                     FROM policy_modules",
                    &[&digest],
                )
                .await?;
            if row.get::<_, bool>(0) {
                return Ok(());
            }
            let (count, total) = (
                row.get::<_, i64>(1).unsigned_abs(),
                row.get::<_, i64>(2).unsigned_abs(),
            );
            if count + 1 > quota.max_modules || total + bytes.len() as u64 > quota.max_bytes {
                return Err(quota_exceeded(count, total, quota));
            }
            tx.execute(
                "INSERT INTO policy_modules (digest, bytes, name, version, uploaded_ms, uploaded_by)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&digest, &bytes, &name, &version, &now_ms, &by],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn module_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let digest = digest.to_string();
        self.read(move |c| async move {
            Ok(c.query_opt(
                "SELECT bytes FROM policy_modules WHERE digest = $1",
                &[&digest],
            )
            .await?
            .map(|r| r.get(0)))
        })
    }

    fn modules(&self) -> Result<Vec<StoredModule>, StoreError> {
        self.read(move |c| async move {
            Ok(c.query(
                &format!("{MODULE_COLUMNS} ORDER BY uploaded_ms, digest"),
                &[],
            )
            .await?
            .iter()
            .map(module_from_row)
            .collect())
        })
    }

    fn delete_module(&self, digest: &str) -> Result<Option<StoredModule>, StoreError> {
        let digest = digest.to_string();
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            tx.batch_execute("LOCK TABLE chains IN SHARE MODE").await?;
            let user = tx
                .query_opt(
                    &format!("SELECT c.id FROM {CHAINS_USING} ORDER BY c.id LIMIT 1"),
                    &[&digest],
                )
                .await?;
            if let Some(user) = user {
                return Err(StoreError::InUse(format!(
                    "module `sha256:{digest}` is used by chain {}",
                    user.get::<_, i64>(0)
                )));
            }
            let module = tx
                .query_opt(&format!("{MODULE_COLUMNS} WHERE digest = $1"), &[&digest])
                .await?
                .as_ref()
                .map(module_from_row);
            tx.execute("DELETE FROM policy_modules WHERE digest = $1", &[&digest])
                .await?;
            tx.commit().await?;
            Ok(module)
        })
    }

    fn prune_modules(&self) -> Result<Vec<StoredModule>, StoreError> {
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            tx.batch_execute("LOCK TABLE chains IN SHARE MODE").await?;
            let unused = format!(
                "WHERE NOT EXISTS (SELECT 1 FROM {})",
                CHAINS_USING.replace("$1", "policy_modules.digest")
            );
            let pruned = tx
                .query(
                    &format!("{MODULE_COLUMNS} {unused} ORDER BY uploaded_ms, digest"),
                    &[],
                )
                .await?
                .iter()
                .map(module_from_row)
                .collect();
            tx.execute(&format!("DELETE FROM policy_modules {unused}"), &[])
                .await?;
            tx.commit().await?;
            Ok(pruned)
        })
    }

    fn stage_chain(
        &self,
        version: &str,
        spec: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<StoredChain, StoreError> {
        let (version, spec, by) = (version.to_string(), spec.to_string(), by.to_string());
        self.write(move |_, c| async move {
            Ok(chain_from_row(
                &c.query_one(
                    &format!(
                        "INSERT INTO chains (version, spec, state, created_ms, created_by)
                         VALUES ($1, $2, 'staged', $3, $4)
                         RETURNING {}",
                        returning(CHAIN_COLUMNS)
                    ),
                    &[&version, &spec, &now_ms, &by],
                )
                .await?,
            ))
        })
    }

    fn activate_chain(&self, id: i64, by: &str, now_ms: i64) -> Result<StoredChain, StoreError> {
        let by = by.to_string();
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            // Activations on two hosts at once take turns.
            tx.batch_execute("LOCK TABLE chains IN SHARE ROW EXCLUSIVE MODE")
                .await?;
            let Some(chain) = tx
                .query_opt(&format!("{CHAIN_COLUMNS} WHERE id = $1"), &[&id])
                .await?
                .as_ref()
                .map(chain_from_row)
            else {
                return Err(StoreError::Refused(format!("no chain {id}")));
            };
            if chain.state == "active" {
                return Ok(chain);
            }
            let last = last_activation(&tx).await?;
            let chain = activate_in(
                &tx,
                id,
                &by,
                now_ms,
                ActivationKind::Activate,
                last.as_ref().map(|l| l.chain_id),
                last.as_ref().map(|l| l.id),
            )
            .await?;
            tx.commit().await?;
            Ok(chain)
        })
    }

    fn rollback_chain(&self, by: &str, now_ms: i64) -> Result<Option<StoredChain>, StoreError> {
        let by = by.to_string();
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            tx.batch_execute("LOCK TABLE chains IN SHARE ROW EXCLUSIVE MODE")
                .await?;
            let Some(last) = last_activation(&tx).await? else {
                return Ok(None);
            };
            let Some(back_to) = last.back_to else {
                return Ok(None);
            };
            let Some(target) = tx
                .query_opt(
                    &format!("{ACTIVATION_COLUMNS} WHERE a.id = $1"),
                    &[&back_to],
                )
                .await?
                .as_ref()
                .map(activation_from_row)
            else {
                return Ok(None);
            };
            let chain = activate_in(
                &tx,
                target.chain_id,
                &by,
                now_ms,
                ActivationKind::Rollback,
                Some(last.chain_id),
                target.back_to,
            )
            .await?;
            tx.commit().await?;
            Ok(Some(chain))
        })
    }

    fn activation(&self, id: i64) -> Result<Option<Activation>, StoreError> {
        self.read(move |c| async move {
            Ok(
                c.query_opt(&format!("{ACTIVATION_COLUMNS} WHERE a.id = $1"), &[&id])
                    .await?
                    .as_ref()
                    .map(activation_from_row),
            )
        })
    }

    fn activations(&self, limit: usize) -> Result<Vec<Activation>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| async move {
            Ok(c.query(
                &format!("{ACTIVATION_COLUMNS} ORDER BY a.id DESC LIMIT $1"),
                &[&limit],
            )
            .await?
            .iter()
            .map(activation_from_row)
            .collect())
        })
    }

    fn chains(&self, limit: usize) -> Result<Vec<StoredChain>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| async move {
            Ok(c.query(
                &format!("{CHAIN_COLUMNS} ORDER BY id DESC LIMIT $1"),
                &[&limit],
            )
            .await?
            .iter()
            .map(chain_from_row)
            .collect())
        })
    }

    fn set_shadow_chain(
        &self,
        chain: Option<i64>,
        by: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let by = by.to_string();
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO shadow (id, chain_id, set_ms, set_by) VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET chain_id = excluded.chain_id,
                     set_ms = excluded.set_ms, set_by = excluded.set_by",
                &[&chain, &now_ms, &by],
            )
            .await?;
            // After the row above is locked: a shadow state write holds it
            // for share, so every write of the chain that ran in shadow has
            // committed (and is deleted here) or will find it gone.
            tx.execute("DELETE FROM shadow_state", &[]).await?;
            tx.execute("SELECT pg_notify('heartgate_chains', 'shadow')", &[])
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn shadow_chain(&self) -> Result<Option<i64>, StoreError> {
        self.read(move |c| async move {
            Ok(c.query_opt("SELECT chain_id FROM shadow WHERE id = 1", &[])
                .await?
                .and_then(|r| r.get::<_, Option<i64>>(0)))
        })
    }

    fn shadow_state(
        &self,
        chain_id: i64,
        workspace_id: &str,
    ) -> Result<Option<ShadowState>, StoreError> {
        let workspace_id = workspace_id.to_string();
        self.read(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT markers, conditions, version FROM shadow_state
                     WHERE chain_id = $1 AND workspace_id = $2",
                    &[&chain_id, &workspace_id],
                )
                .await
                .map_err(|e| read_failed(READING_SHADOW, e))?;
            row.map(|r| shadow_state_from(r.get(0), r.get(1), r.get(2)))
                .transpose()
        })
    }

    fn write_shadow_state(
        &self,
        chain_id: i64,
        workspace_id: &str,
        state: &ShadowState,
        now_ms: i64,
    ) -> Result<ShadowWritten, StoreError> {
        let (markers, conditions) = shadow_state_json(state);
        let (workspace_id, version) = (workspace_id.to_string(), state.version);
        self.write(move |_, mut c| async move {
            let tx = c.transaction().await?;
            let shadow: Option<i64> = tx
                .query_opt("SELECT chain_id FROM shadow WHERE id = 1 FOR SHARE", &[])
                .await?
                .and_then(|r| r.get(0));
            if shadow != Some(chain_id) {
                return Ok(ShadowWritten::NotShadow);
            }
            let n = if version == 0 {
                tx.execute(
                    "INSERT INTO shadow_state (chain_id, workspace_id, version, markers,
                         conditions, updated_ms)
                     VALUES ($1, $2, 1, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[&chain_id, &workspace_id, &markers, &conditions, &now_ms],
                )
                .await?
            } else {
                tx.execute(
                    "UPDATE shadow_state SET version = version + 1, markers = $3,
                         conditions = $4, updated_ms = $5
                     WHERE chain_id = $1 AND workspace_id = $2 AND version = $6",
                    &[
                        &chain_id,
                        &workspace_id,
                        &markers,
                        &conditions,
                        &now_ms,
                        &version,
                    ],
                )
                .await?
            };
            tx.commit().await?;
            Ok(if n == 1 {
                ShadowWritten::Stored
            } else {
                ShadowWritten::Conflict
            })
        })
    }

    fn active_chain(&self) -> Result<Option<StoredChain>, StoreError> {
        self.read(move |c| async move {
            Ok(
                c.query_opt(&format!("{CHAIN_COLUMNS} WHERE state = 'active'"), &[])
                    .await?
                    .as_ref()
                    .map(chain_from_row),
            )
        })
    }

    fn chain(&self, id: i64) -> Result<Option<StoredChain>, StoreError> {
        self.read(move |c| async move {
            Ok(
                c.query_opt(&format!("{CHAIN_COLUMNS} WHERE id = $1"), &[&id])
                    .await?
                    .as_ref()
                    .map(chain_from_row),
            )
        })
    }

    /// Hold the watch-mode lock for as long as this store lives: only one
    /// host of a database may watch a directory for modules. Refused,
    /// saying so, if another host holds it.
    fn claim_watch(&self) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let Some(handle) = self.handle() else {
            return Err(StoreError::WriterStopped);
        };
        // The lock is a session's: the connection is kept aside (out of
        // the pool) until the runtime stops.
        handle.spawn(async move {
            let client = match inner.client().await {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let got = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&schema::WATCH_LOCK])
                .await
                .map(|r| r.get::<_, bool>(0));
            match got {
                Ok(true) => {
                    let _ = tx.send(Ok(()));
                    let client = deadpool_postgres::Object::take(client);
                    std::future::pending::<()>().await;
                    drop(client);
                }
                Ok(false) => {
                    let _ = tx.send(Err(StoreError::Refused(
                        "another host of this database runs in watch mode; only one may (stop it, or start this one without --watch)".into(),
                    )));
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                }
            }
        });
        rx.recv().unwrap_or(Err(StoreError::WriterStopped))
    }

    fn chain_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        let handle = self.handle()?;
        Some(
            self.inner
                .chains
                .get_or_init(|| {
                    let notify = Arc::new(tokio::sync::Notify::new());
                    handle.spawn(listen_for_chains(self.inner.config.clone(), notify.clone()));
                    notify
                })
                .clone(),
        )
    }

    fn chain_by_version(&self, version: &str) -> Result<Option<StoredChain>, StoreError> {
        let version = version.to_string();
        self.read(move |c| async move {
            Ok(c.query_opt(
                &format!("{CHAIN_COLUMNS} WHERE version = $1 ORDER BY id DESC LIMIT 1"),
                &[&version],
            )
            .await?
            .as_ref()
            .map(chain_from_row))
        })
    }
}

/// The columns of a `SELECT <columns> FROM <table>` constant, for a
/// `RETURNING` clause of the same rows.
fn returning(select: &'static str) -> &'static str {
    let columns = select.trim_start_matches("SELECT ");
    columns.rfind(" FROM ").map_or(columns, |at| &columns[..at])
}

fn read_failed(what: &'static str, e: tokio_postgres::Error) -> StoreError {
    if unavailable(&e) {
        return StoreError::Unavailable(e.to_string());
    }
    StoreError::Read {
        what,
        source: e.into(),
    }
}

/// Lock workspace `id`'s row for a write outside a verdict, so that it
/// takes its turn with the verdicts of the workspace; its kind.
async fn lock_workspace(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &str,
) -> Result<WorkspaceKind, StoreError> {
    let row = tx
        .query_opt(
            "SELECT kind FROM workspaces WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
        .ok_or_else(|| StoreError::UnknownWorkspace(id.to_string()))?;
    parse_kind(row.get(0))
}

/// Fail the runs whose lease has passed and that were started
/// [`MAX_RUN_ATTEMPTS`] times already; how many.
async fn fail_interrupted(
    tx: &deadpool_postgres::Transaction<'_>,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let n = tx
        .execute(
            &format!(
                "UPDATE reconcile_runs SET state = 'failed', finished_ms = $2,
                     lease_owner = NULL, lease_until = NULL,
                     cause = {INTERRUPTED_CAUSE_SQL}
                 WHERE state = 'running' AND lease_until < now() AND attempts >= $1"
            ),
            &[&MAX_RUN_ATTEMPTS, &now_ms],
        )
        .await?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// The last activation, if any.
async fn last_activation(tx: &Transaction<'_>) -> Result<Option<Activation>, StoreError> {
    Ok(tx
        .query_opt(
            &format!("{ACTIVATION_COLUMNS} ORDER BY a.id DESC LIMIT 1"),
            &[],
        )
        .await?
        .as_ref()
        .map(activation_from_row))
}

/// Make chain `id` the active one, record the activation (its number from
/// the activation sequence) and tell the other hosts.
async fn activate_in(
    tx: &Transaction<'_>,
    id: i64,
    by: &str,
    now_ms: i64,
    kind: ActivationKind,
    from_chain: Option<i64>,
    back_to: Option<i64>,
) -> Result<StoredChain, StoreError> {
    let number: i64 = tx
        .query_one(
            "INSERT INTO activations (id, chain_id, at_ms, by, kind, from_chain, back_to)
             VALUES (nextval('chain_activations'), $1, $2, $3, $4, $5, $6) RETURNING id",
            &[&id, &now_ms, &by, &kind.as_str(), &from_chain, &back_to],
        )
        .await?
        .get(0);
    tx.execute(
        "UPDATE chains SET state = 'retired' WHERE state = 'active' AND id != $1",
        &[&id],
    )
    .await?;
    let chain = chain_from_row(
        &tx.query_one(
            &format!(
                "UPDATE chains SET state = 'active', activated_ms = $2, activated_by = $3,
                     activation = $4
                 WHERE id = $1 RETURNING {}",
                returning(CHAIN_COLUMNS)
            ),
            &[&id, &now_ms, &by, &number],
        )
        .await?,
    );
    tx.execute(
        "SELECT pg_notify('heartgate_chains', $1)",
        &[&id.to_string()],
    )
    .await?;
    Ok(chain)
}
