//! The embedded SQLite store: rusqlite with bundled SQLite, WAL,
//! `synchronous=NORMAL`, one writer connection (used by the writer thread
//! for verdicts, and directly for everything else), a small pool of reader
//! connections, and the snapshot cache.

mod migrations;
mod read;
#[cfg(test)]
mod tests;
mod writer;

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use self::migrations::init;
use self::read::*;
use self::writer::{Job, Queue, WRITER_CACHE_KIB, Writer, insert_token};
use crate::auth::InboundSecret;
use crate::model::{SilenceKind, Status};
use crate::store::cache::SnapshotCache;
use crate::store::health::Health;
use crate::store::*;

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
    /// Whether writes succeed, shared with the writer.
    health: Arc<Health>,
    path: std::path::PathBuf,
}

const MAX_IDLE_READERS: usize = 8;

/// The WAL file of the database at `path`.
fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    std::path::PathBuf::from(name)
}

/// The query of [`Store::silent_workspaces`] for `kind`: its WHERE repeats
/// its partial index's terms literally, which is how SQLite knows the index
/// applies (migration 10; a unit test reads the plan).
fn silence_sql(kind: SilenceKind) -> &'static str {
    match kind {
        SilenceKind::HeartbeatExpired => {
            "SELECT id, last_heartbeat_ms, runtime FROM workspaces
             WHERE status IN ('online', 'degraded', 'failed')
                 AND silence_noticed_ms IS NOT last_heartbeat_ms
                 AND last_heartbeat_ms <= ?1 AND (last_heartbeat_ms, id) > (?2, ?3)
             ORDER BY last_heartbeat_ms, id LIMIT ?4"
        }
        SilenceKind::ProvisionTimeout => {
            "SELECT id, status_since_ms, runtime FROM workspaces
             WHERE status = 'provisioning' AND silence_noticed_ms IS NOT status_since_ms
                 AND status_since_ms <= ?1 AND (status_since_ms, id) > (?2, ?3)
             ORDER BY status_since_ms, id LIMIT ?4"
        }
    }
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
    /// [`SqliteStore::open`] a database that must exist already: no file
    /// at `path`, or a file that is not a Heartgate database, is
    /// [`StoreError::Missing`], and nothing is created or changed.
    pub fn open_existing(path: &Path) -> Result<SqliteStore, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing(format!(
                "no database at {}",
                path.display()
            )));
        }
        let not_ours = |why: String| {
            StoreError::Missing(format!(
                "{} is not a Heartgate database ({why})",
                path.display()
            ))
        };
        // Without SQLITE_OPEN_CREATE: nothing is made if the file goes.
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| not_ours(e.to_string()))?;
        if version == 0 {
            return Err(not_ours("no Heartgate schema in it".into()));
        }
        drop(conn);
        SqliteStore::open(path)
    }

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
        let health = Arc::new(Health::new(path));
        let writer = Arc::new(Writer {
            conn: Mutex::new(conn),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            answered: Condvar::new(),
            cache: cache.clone(),
            wal_frames,
            health: health.clone(),
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
            health,
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
        let result = f(&mut conn);
        if let Err(e) = &result
            && cannot_write(e)
        {
            self.health.failed(&e.to_string());
        }
        result
    }
}

/// Whether `e` says the database cannot be written (rather than that the
/// write was refused for its content).
fn cannot_write(e: &StoreError) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => matches!(
            f.code,
            C::DiskFull
                | C::ReadOnly
                | C::SystemIoFailure
                | C::CannotOpen
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::DatabaseCorrupt
                | C::NotADatabase
        ),
        StoreError::Failed(_) | StoreError::WriterStopped | StoreError::Poisoned => true,
        _ => false,
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

impl Store for SqliteStore {
    fn load(&self, workspace_id: &str, read: Read) -> Result<Option<Snapshot>, StoreError> {
        let cached = match read {
            Read::Cached => self.cache.get(workspace_id),
            Read::Fresh => None,
        };
        let (snapshot, hit) = self.with_reader(|c| {
            // A cached snapshot is used only once the database confirms its
            // version: one indexed read instead of four, and never state
            // older than the last committed change (a token revoked by the
            // CLI a moment ago is refused at once).
            // The last heartbeat time comes with it: liveness writes do not
            // bump the version, so the cached one may be older.
            // So do the inbound secret and whether a card is stored, which
            // are not part of the version either.
            if let Some(mut snapshot) = cached {
                let row: Option<(i64, Option<i64>, Option<String>, bool)> = c
                    .prepare_cached(
                        "SELECT version, last_heartbeat_ms, platform_inbound_secret,
                                agent_card IS NOT NULL
                         FROM workspaces WHERE id = ?1",
                    )
                    .and_then(|mut stmt| {
                        stmt.query_row([workspace_id], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                        })
                        .optional()
                    })
                    .map_err(|source| StoreError::Read {
                        what: READING_ROW,
                        source: source.into(),
                    })?;
                if let Some((version, last_heartbeat_ms, secret, has_card)) = row
                    && version == snapshot.version
                {
                    snapshot.workspace.last_heartbeat_ms = last_heartbeat_ms;
                    snapshot.inbound_secret = secret.map(InboundSecret::from_stored);
                    snapshot.has_agent_card = has_card;
                    return Ok((Some(snapshot), true));
                }
            }
            Ok((load_snapshot(c, workspace_id)?, false))
        })?;
        if !hit {
            match &snapshot {
                // A removed workspace is never cached: nothing is written
                // for it.
                Some(s) if s.workspace.status != Status::Removed => self.cache.put(s),
                _ => self.cache.forget(workspace_id),
            }
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

    fn instrument(&self, metrics: StoreMetrics) {
        self.health.instrument(metrics);
    }

    fn set_min_free(&self, bytes: u64) {
        self.health.set_min_free(bytes);
    }

    fn allows_early_ack(&self) -> bool {
        self.health.allows_early_ack()
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
        // Writes failing since the last commit, or a file system nearly full.
        self.health.check().map_err(StoreError::Failed)?;
        // Write permission, asked of the OS with access(2), which opens
        // nothing: an open connection keeps writing to a file made read-only
        // since (its descriptor was opened for writing) until a checkpoint
        // fails. Never open the files with std::fs: closing any descriptor
        // of the database drops every POSIX lock this process holds on it,
        // and another process then deletes the WAL under the service.
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty());
        for file in [self.path.clone(), wal_path(&self.path)] {
            match rustix::fs::access(&file, rustix::fs::Access::WRITE_OK) {
                Ok(()) => {}
                Err(rustix::io::Errno::NOENT) if file != self.path => {}
                Err(e) => {
                    return Err(StoreError::Failed(format!(
                        "the database file `{}` is read-only: {e}",
                        file.display()
                    )));
                }
            }
        }
        if let Err(e) =
            rustix::fs::access(dir.unwrap_or(Path::new(".")), rustix::fs::Access::WRITE_OK)
        {
            return Err(StoreError::Failed(format!(
                "the database's directory is read-only (SQLite creates its WAL there): {e}"
            )));
        }
        // And the write lock can be taken (no other process holds it for
        // longer than the busy timeout), through a pooled connection.
        self.with_reader(|c| {
            c.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")?;
            Ok(())
        })
    }

    fn flush(&self) {
        self.writer.flush();
    }

    fn backup(&self, dest: &Path) -> Result<Backup, StoreError> {
        if dest.exists() {
            return Err(StoreError::Refused(format!(
                "`{}` already exists; a backup never overwrites a file",
                dest.display()
            )));
        }
        let mut partial = dest.as_os_str().to_owned();
        partial.push(format!(".partial-{}", std::process::id()));
        let partial = std::path::PathBuf::from(partial);
        let copied = self.with_reader(|src| {
            let mut dst = Connection::open(&partial)?;
            // SQLite's online backup API, all pages in one step: one read
            // transaction of the source, so the copy is consistent as of one
            // moment, and in WAL mode the service's writes go on meanwhile
            // (a backup in many steps starts over at each of them).
            {
                let backup = rusqlite::backup::Backup::new(src, &mut dst)?;
                backup.step(-1)?;
            }
            let check: String = dst.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
            Ok(check)
        });
        let check = match copied {
            Ok(check) if check == "ok" => check,
            Ok(check) => {
                let _ = std::fs::remove_file(&partial);
                return Err(StoreError::Failed(format!(
                    "the copy failed its check: {check}"
                )));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        // The copy is a file of its own (this process holds no lock on it),
        // made durable before it takes its name.
        let io = |what: &str, e: std::io::Error| StoreError::Failed(format!("{what}: {e}"));
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .map_err(|e| io("syncing the copy", e))?;
        // A link, not a rename: it never replaces a file created meanwhile.
        let named = std::fs::hard_link(&partial, dest);
        let _ = std::fs::remove_file(&partial);
        named.map_err(|e| io(&format!("naming the copy `{}`", dest.display()), e))?;
        if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
        Ok(Backup {
            path: dest.to_path_buf(),
            bytes,
            check,
        })
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

    fn inbound_secret(
        &self,
        workspace_id: &str,
        mint: &InboundSecret,
    ) -> Result<InboundSecret, StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE workspaces SET platform_inbound_secret = ?2
                 WHERE id = ?1 AND platform_inbound_secret IS NULL AND status != 'removed'",
                params![workspace_id, mint.expose()],
            )?;
            let stored: Option<Option<String>> = tx
                .query_row(
                    "SELECT platform_inbound_secret FROM workspaces WHERE id = ?1",
                    [workspace_id],
                    |r| r.get(0),
                )
                .optional()?;
            tx.commit()?;
            match stored {
                Some(Some(secret)) => Ok(InboundSecret::from_stored(secret)),
                _ => Err(StoreError::UnknownWorkspace(workspace_id.to_string())),
            }
        })
    }

    fn rotate_inbound_secret(
        &self,
        workspace_id: &str,
        new: &InboundSecret,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with_writer(|c| {
            let n = c.execute(
                "UPDATE workspaces SET platform_inbound_secret = ?2, updated_ms = ?3 WHERE id = ?1",
                params![workspace_id, new.expose(), now_ms],
            )?;
            if n == 0 {
                return Err(StoreError::UnknownWorkspace(workspace_id.to_string()));
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
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE workspaces SET agent_card = ?2, updated_ms = ?3
                 WHERE id = ?1 AND status != 'removed'",
                params![workspace_id, card, now_ms],
            )?;
            if n == 0 {
                return Err(StoreError::UnknownWorkspace(workspace_id.to_string()));
            }
            tx.execute(
                "INSERT INTO events (workspace_id, event_type, payload, at_ms)
                 VALUES (?1, 'AGENT_CARD_UPDATED', ?2, ?3)",
                params![workspace_id, event_payload, now_ms],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn silent_workspaces(&self, query: &SilenceQuery) -> Result<Vec<SilentWorkspace>, StoreError> {
        let sql = silence_sql(query.kind);
        let (after_ms, after_id) = match &query.after {
            Some((ms, id)) => (*ms, id.as_str()),
            None => (i64::MIN, ""),
        };
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            let rows = stmt.query_map(
                params![
                    query.before_ms,
                    after_ms,
                    after_id,
                    i64::try_from(query.limit).unwrap_or(i64::MAX)
                ],
                |r| {
                    Ok(SilentWorkspace {
                        id: r.get(0)?,
                        kind: query.kind,
                        since_ms: r.get(1)?,
                        runtime: r.get(2)?,
                    })
                },
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn sweep_started(&self, now_ms: i64, gap_ms: Option<i64>) -> Result<i64, StoreError> {
        self.with_writer(|c| {
            Ok(c.prepare_cached(
                "INSERT INTO sweeps (id, up_since_ms, last_ms) VALUES (1, ?1, ?1)
                 ON CONFLICT (id) DO UPDATE SET
                     up_since_ms = CASE WHEN ?1 - sweeps.last_ms > ?2 THEN ?1
                         ELSE sweeps.up_since_ms END,
                     last_ms = MAX(sweeps.last_ms, ?1)
                 RETURNING up_since_ms",
            )?
            .query_row(params![now_ms, gap_ms], |r| r.get(0))?)
        })
    }

    fn add_workspace(&self, new: &NewWorkspace, now_ms: i64) -> Result<(), StoreError> {
        validate_new(new)?;
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let inserted = tx.execute(
                "INSERT INTO workspaces (id, name, kind, created_ms, updated_ms, runtime,
                     status_since_ms, delivery_mode)
                 VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?4, ?6) ON CONFLICT DO NOTHING",
                params![
                    new.id,
                    new.name,
                    new.kind.as_str(),
                    now_ms,
                    new.runtime,
                    initial_delivery_mode(new)
                ],
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
                "UPDATE workspaces SET status = ?2, updated_ms = ?3,
                     status_since_ms = CASE WHEN status = ?2 THEN status_since_ms ELSE ?3 END
                 WHERE id = ?1",
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
            refuse_privileged("declare", name, require_workspace(&tx, id)?, id)?;
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

    fn undeclare_plugin(&self, id: &str, name: &str) -> Result<bool, StoreError> {
        self.with_workspace_writer(id, |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            refuse_undeclare(name, require_workspace(&tx, id)?, id)?;
            let n = tx.execute(
                "DELETE FROM declared_plugins WHERE workspace_id = ?1 AND plugin_name = ?2",
                params![id, name],
            )?;
            tx.commit()?;
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
            "DELETE FROM policy_markers WHERE workspace_id = ?1
                 AND (?2 IS NULL OR slot = ?2) AND (?3 IS NULL OR key = ?3)",
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
            "DELETE FROM conditions WHERE workspace_id = ?1
                 AND (?2 IS NULL OR slot = ?2) AND (?3 IS NULL OR name = ?3)",
            slot,
            name,
        )
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

    fn revoke_tokens(
        &self,
        id: &str,
        now_ms: i64,
        allow_bootstrap: bool,
    ) -> Result<usize, StoreError> {
        self.with_workspace_writer(id, |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            require_workspace(&tx, id)?;
            let n = tx.execute(
                "UPDATE auth_tokens SET revoked_ms = ?2 WHERE workspace_id = ?1 AND revoked_ms IS NULL",
                params![id, now_ms],
            )?;
            tx.execute(
                "UPDATE workspaces SET token_bootstrap = ?2 WHERE id = ?1",
                params![id, allow_bootstrap],
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

    fn requeue_interrupted(&self, now_ms: i64) -> Result<Requeued, StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let failed = tx.execute(
                &format!("UPDATE reconcile_runs SET state = 'failed', finished_ms = ?2,
                     cause = {INTERRUPTED_CAUSE_SQL}
                 WHERE state = 'running' AND attempts >= ?1"),
                params![MAX_RUN_ATTEMPTS, now_ms],
            )?;
            let requeued = tx.execute(
                "UPDATE reconcile_runs SET state = 'queued', started_ms = NULL WHERE state = 'running'",
                [],
            )?;
            tx.commit()?;
            Ok(Requeued { requeued, failed })
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
            refuse_privileged("record", &plugin.name, kind, workspace_id)?;
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
        quota: ModuleQuota,
    ) -> Result<(), StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (exists, count, total): (bool, i64, i64) = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM policy_modules WHERE digest = ?1),
                        COUNT(*), COALESCE(SUM(LENGTH(bytes)), 0)
                 FROM policy_modules",
                [digest],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            if exists {
                return Ok(());
            }
            let (count, total) = (count.unsigned_abs(), total.unsigned_abs());
            let size = bytes.len() as u64;
            if count + 1 > quota.max_modules || total + size > quota.max_bytes {
                return Err(quota_exceeded(count, total, quota));
            }
            tx.execute(
                "INSERT INTO policy_modules (digest, bytes, name, version, uploaded_ms, uploaded_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![digest, bytes, meta.name, meta.version, now_ms, by],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn modules(&self) -> Result<Vec<StoredModule>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare(&format!("{MODULE_COLUMNS} ORDER BY uploaded_ms, digest"))?;
            let rows = stmt
                .query_map([], module_from_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn delete_module(&self, digest: &str) -> Result<Option<StoredModule>, StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let user: Option<i64> = tx
                .query_row(
                    &format!("SELECT c.id FROM {CHAINS_USING} ORDER BY c.id LIMIT 1"),
                    [digest],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(chain) = user {
                return Err(StoreError::InUse(format!(
                    "module `sha256:{digest}` is used by chain {chain}"
                )));
            }
            let module = tx
                .query_row(
                    &format!("{MODULE_COLUMNS} WHERE digest = ?1"),
                    [digest],
                    module_from_row,
                )
                .optional()?;
            tx.execute("DELETE FROM policy_modules WHERE digest = ?1", [digest])?;
            tx.commit()?;
            Ok(module)
        })
    }

    fn prune_modules(&self) -> Result<Vec<StoredModule>, StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let unused = format!(
                "WHERE NOT EXISTS (SELECT 1 FROM {})",
                CHAINS_USING.replace("?1", "policy_modules.digest")
            );
            let pruned = tx
                .prepare(&format!(
                    "{MODULE_COLUMNS} {unused} ORDER BY uploaded_ms, digest"
                ))?
                .query_map([], module_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            tx.execute(&format!("DELETE FROM policy_modules {unused}"), [])?;
            tx.commit()?;
            Ok(pruned)
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
            let Some(chain) = tx
                .query_row(
                    &format!("{CHAIN_COLUMNS} WHERE id = ?1"),
                    [id],
                    chain_from_row,
                )
                .optional()?
            else {
                return Err(StoreError::Refused(format!("no chain {id}")));
            };
            if chain.state == "active" {
                return Ok(chain);
            }
            let last = last_activation(&tx)?;
            let chain = activate_in(
                &tx,
                id,
                by,
                now_ms,
                ActivationKind::Activate,
                last.as_ref().map(|l| l.chain_id),
                last.as_ref().map(|l| l.id),
            )?;
            tx.commit()?;
            Ok(chain)
        })
    }

    fn rollback_chain(&self, by: &str, now_ms: i64) -> Result<Option<StoredChain>, StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(last) = last_activation(&tx)? else {
                return Ok(None);
            };
            let Some(target) = last
                .back_to
                .map(|id| activation(&tx, id))
                .transpose()?
                .flatten()
            else {
                return Ok(None);
            };
            let chain = activate_in(
                &tx,
                target.chain_id,
                by,
                now_ms,
                ActivationKind::Rollback,
                Some(last.chain_id),
                target.back_to,
            )?;
            tx.commit()?;
            Ok(Some(chain))
        })
    }

    fn activation(&self, id: i64) -> Result<Option<Activation>, StoreError> {
        self.with_reader(|c| {
            Ok(c.query_row(
                &format!("{ACTIVATION_COLUMNS} WHERE a.id = ?1"),
                [id],
                activation_from_row,
            )
            .optional()?)
        })
    }

    fn activations(&self, limit: usize) -> Result<Vec<Activation>, StoreError> {
        self.with_reader(|c| {
            let mut stmt =
                c.prepare_cached(&format!("{ACTIVATION_COLUMNS} ORDER BY a.id DESC LIMIT ?1"))?;
            let rows = stmt.query_map(
                [i64::try_from(limit).unwrap_or(i64::MAX)],
                activation_from_row,
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn chains(&self, limit: usize) -> Result<Vec<StoredChain>, StoreError> {
        self.with_reader(|c| {
            let mut stmt =
                c.prepare_cached(&format!("{CHAIN_COLUMNS} ORDER BY id DESC LIMIT ?1"))?;
            let rows =
                stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], chain_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn set_shadow_chain(
        &self,
        chain: Option<i64>,
        by: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO shadow (id, chain_id, set_ms, set_by) VALUES (1, ?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET chain_id = excluded.chain_id,
                     set_ms = excluded.set_ms, set_by = excluded.set_by",
                params![chain, now_ms, by],
            )?;
            tx.execute("DELETE FROM shadow_state", [])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn shadow_state(
        &self,
        chain_id: i64,
        workspace_id: &str,
    ) -> Result<Option<ShadowState>, StoreError> {
        let row: Option<(String, String, i64)> = self.with_reader(|c| {
            Ok(c.prepare_cached(
                "SELECT markers, conditions, version FROM shadow_state
                 WHERE chain_id = ?1 AND workspace_id = ?2",
            )?
            .query_row(params![chain_id, workspace_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?)
        })?;
        row.map(|(markers, conditions, version)| shadow_state_from(&markers, &conditions, version))
            .transpose()
    }

    fn write_shadow_state(
        &self,
        chain_id: i64,
        workspace_id: &str,
        state: &ShadowState,
        now_ms: i64,
    ) -> Result<ShadowWritten, StoreError> {
        let (markers, conditions) = shadow_state_json(state);
        self.with_writer(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let shadow: Option<i64> = tx
                .query_row("SELECT chain_id FROM shadow WHERE id = 1", [], |r| r.get(0))
                .optional()?
                .flatten();
            if shadow != Some(chain_id) {
                return Ok(ShadowWritten::NotShadow);
            }
            let n = if state.version == 0 {
                tx.prepare_cached(
                    "INSERT INTO shadow_state (chain_id, workspace_id, version, markers,
                         conditions, updated_ms)
                     VALUES (?1, ?2, 1, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )?
                .execute(params![
                    chain_id,
                    workspace_id,
                    markers,
                    conditions,
                    now_ms
                ])?
            } else {
                tx.prepare_cached(
                    "UPDATE shadow_state SET version = version + 1, markers = ?3,
                         conditions = ?4, updated_ms = ?5
                     WHERE chain_id = ?1 AND workspace_id = ?2 AND version = ?6",
                )?
                .execute(params![
                    chain_id,
                    workspace_id,
                    markers,
                    conditions,
                    now_ms,
                    state.version
                ])?
            };
            tx.commit()?;
            Ok(if n == 1 {
                ShadowWritten::Stored
            } else {
                ShadowWritten::Conflict
            })
        })
    }

    fn shadow_chain(&self) -> Result<Option<i64>, StoreError> {
        self.with_reader(|c| {
            Ok(
                c.query_row("SELECT chain_id FROM shadow WHERE id = 1", [], |r| {
                    r.get::<_, Option<i64>>(0)
                })
                .optional()?
                .flatten(),
            )
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
}

/// The last activation, if any.
fn last_activation(tx: &rusqlite::Transaction<'_>) -> Result<Option<Activation>, StoreError> {
    Ok(tx
        .query_row(
            &format!("{ACTIVATION_COLUMNS} ORDER BY a.id DESC LIMIT 1"),
            [],
            activation_from_row,
        )
        .optional()?)
}

fn activation(tx: &rusqlite::Transaction<'_>, id: i64) -> Result<Option<Activation>, StoreError> {
    Ok(tx
        .query_row(
            &format!("{ACTIVATION_COLUMNS} WHERE a.id = ?1"),
            [id],
            activation_from_row,
        )
        .optional()?)
}

/// Make chain `id` the active one and record the activation.
fn activate_in(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    by: &str,
    now_ms: i64,
    kind: ActivationKind,
    from_chain: Option<i64>,
    back_to: Option<i64>,
) -> Result<StoredChain, StoreError> {
    tx.execute(
        // The next rowid: past every activation, those migration 13 carried
        // over with their old numbers included.
        "INSERT INTO activations (chain_id, at_ms, by, kind, from_chain, back_to)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, now_ms, by, kind.as_str(), from_chain, back_to],
    )?;
    let number = tx.last_insert_rowid();
    tx.execute(
        "UPDATE chains SET state = 'retired' WHERE state = 'active' AND id != ?1",
        [id],
    )?;
    tx.execute(
        "UPDATE chains SET state = 'active', activated_ms = ?2, activated_by = ?3, activation = ?4
         WHERE id = ?1",
        params![id, now_ms, by, number],
    )?;
    Ok(tx.query_row(
        &format!("{CHAIN_COLUMNS} WHERE id = ?1"),
        [id],
        chain_from_row,
    )?)
}

impl SqliteStore {
    /// Run `delete` (bound to the workspace id and two optional filters) in
    /// a transaction of the workspace, which must exist; how many rows went.
    fn delete_state(
        &self,
        id: &str,
        delete: &str,
        first: Option<&str>,
        second: Option<&str>,
    ) -> Result<usize, StoreError> {
        self.with_workspace_writer(id, |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            require_workspace(&tx, id)?;
            let n = tx.execute(delete, params![id, first, second])?;
            tx.commit()?;
            Ok(n)
        })
    }
}
