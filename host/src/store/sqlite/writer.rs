//! The writer thread: verdicts queued by [`Store::submit`] are applied in
//! one transaction per batch (group commit), each in its own savepoint, and
//! answered only after the commit; liveness-only verdicts may be held and
//! coalesced; between batches the writer prunes the decision log and
//! checkpoints the WAL.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::model::SilenceKind;
use crate::store::cache::{SnapshotCache, changes_snapshot};
use crate::store::health::Health;
use crate::store::{
    Applied, Done, LIVENESS_HOLD, NewToken, QueuedRun, Retention, StoreError, VerdictWrite,
};

/// What the writer thread shares with the store.
pub(super) struct Writer {
    pub(super) conn: Mutex<Connection>,
    pub(super) queue: Mutex<Queue>,
    pub(super) wake: Condvar,
    /// Signalled whenever a batch has been answered (for [`Store::flush`]).
    pub(super) answered: Condvar,
    /// Entries of workspaces a verdict changed (or found changed) are dropped.
    pub(super) cache: Arc<SnapshotCache>,
    /// Pages in the WAL after the last commit (from the WAL hook).
    pub(super) wal_frames: Arc<std::sync::atomic::AtomicI64>,
    /// Whether writes succeed; where commit times and failures are counted.
    pub(super) health: Arc<Health>,
    pub(super) retention: Mutex<Retention>,
}

/// The WAL size (pages) at which the writer checkpoints (SQLite's default
/// for its automatic checkpoint).
pub(super) const CHECKPOINT_FRAMES: i64 = 1000;
/// The writer connection's page cache (reader connections keep SQLite's
/// default 2 MiB).
pub(super) const WRITER_CACHE_KIB: u32 = 16 << 10;
/// The most workspaces with a held verdict; past it, all are written.
pub(super) const MAX_HELD: usize = 16_384;
/// Verdicts queued at which a submit wakes the writer even if they may be
/// held (otherwise the writer's timer takes them).
pub(super) const WAKE_AT_QUEUED: usize = 1024;
#[derive(Default)]
pub(super) struct Queue {
    pub(super) jobs: Vec<Job>,
    /// The writer thread is waiting for work (so a submit must wake it).
    pub(super) idle: bool,
    /// No more verdicts are taken; the writer drains what it has and stops.
    pub(super) closed: bool,
    /// Verdicts taken since the store opened.
    pub(super) submitted: u64,
    /// Verdicts answered (committed, coalesced, refused or failed) since
    /// the store opened.
    pub(super) answered: u64,
    /// A caller of [`Store::flush`] waits: write the held verdicts now.
    pub(super) flush: bool,
    /// The idle writer will wake by itself to write held verdicts, so a
    /// verdict that may be held need not wake it.
    pub(super) timer_armed: bool,
}

/// A verdict waiting for the writer.
pub(super) struct Job {
    pub(super) write: VerdictWrite,
    pub(super) done: Done,
    /// Submitted by [`Store::submit_liveness`]: may be held and coalesced.
    pub(super) hold: bool,
    /// Evaluations its decision row stands for, and the first one's time.
    pub(super) heartbeats: u32,
    pub(super) first_at_ms: Option<i64>,
}

impl Job {
    pub(super) fn new(write: VerdictWrite, done: Done, hold: bool) -> Job {
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
    pub(super) fn coalesces_with(&self, later: &Job) -> bool {
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

/// Decision rows pruned at most at once, between two batches of verdicts.
pub(super) const PRUNE_CHUNK: i64 = 2_000;
/// How often the writer looks for rows to prune while the log is within
/// its bounds (beyond them, it prunes a chunk after every batch).
pub(super) const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Writer {
    /// The writer thread: take everything queued, apply it as one batch,
    /// tell each caller, repeat. Stops once closed and drained.
    pub(super) fn run(&self) {
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
                if let Some(h) = self.health.commit_seconds() {
                    h.observe(started.elapsed().as_secs_f64());
                }
                // A failed verdict (a whole batch when its commit fails) is a
                // failed write; a committed one ends the failing.
                let failure = results.iter().find_map(|r| match r {
                    Err(StoreError::UnknownWorkspace(_)) | Ok(_) => None,
                    Err(e) => Some(e.to_string()),
                });
                match failure {
                    Some(cause) => self.health.failed(&cause),
                    None if results
                        .iter()
                        .any(|r| matches!(r, Ok(Applied::Done { .. }))) =>
                    {
                        self.health.succeeded();
                    }
                    None => {}
                }
                self.health.tick();
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
    pub(super) fn prune(&self, now_ms: i64) -> usize {
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
    pub(super) fn checkpoint(&self) {
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

    pub(super) fn submit(&self, job: Job) {
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
    pub(super) fn backlog(&self) -> u64 {
        self.queue.lock().map(|q| q.jobs.len() as u64).unwrap_or(0)
    }

    /// Wait until every verdict taken before this call has been answered.
    pub(super) fn flush(&self) {
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
    pub(super) fn close(&self) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.closed = true;
            self.wake.notify_all();
        }
    }
}

/// Group commit: the verdicts queued while the writer was busy, applied in
/// one transaction with a savepoint each, so a conflict or error undoes only
/// its own verdict. Every verdict is durable (committed) before its caller
/// hears of it; if the commit fails, every verdict of the batch failed.
pub(super) fn apply_batch(
    conn: &mut Connection,
    batch: &[Job],
) -> Vec<Result<Applied, StoreError>> {
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

/// Apply one verdict inside the caller's transaction; writes nothing on a
/// conflict (the caller rolls back).
pub(super) fn apply_in(
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

    // A silence verdict stands only if no register or heartbeat (or status
    // change) moved the deadline's reference since it was read and no other
    // evaluation of this deadline (another host's) was written first; it
    // records that this deadline was evaluated.
    if let Some(seen) = &w.silence {
        let sql = match seen.kind {
            SilenceKind::HeartbeatExpired => {
                "UPDATE workspaces SET silence_noticed_ms = last_heartbeat_ms
                 WHERE id = ?1 AND last_heartbeat_ms IS ?2 AND silence_noticed_ms IS NOT ?2"
            }
            SilenceKind::ProvisionTimeout => {
                "UPDATE workspaces SET silence_noticed_ms = status_since_ms
                 WHERE id = ?1 AND status_since_ms IS ?2 AND silence_noticed_ms IS NOT ?2"
            }
        };
        if tx
            .prepare_cached(sql)?
            .execute(params![id, seen.since_ms])?
            == 0
        {
            return Ok(Applied::Conflict);
        }
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
                     last_sample_error = COALESCE(?3, last_sample_error), updated_ms = ?4,
                     status_since_ms = CASE WHEN status = ?2 THEN status_since_ms ELSE ?4 END
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
                    "INSERT INTO policy_markers (workspace_id, slot, owner, key, value, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                )?
                .execute(params![id, m.slot, m.owner, m.key, new, w.now_ms])?,
            (Some(seen), Some(new)) => tx
                .prepare_cached(
                    "UPDATE policy_markers SET value = ?5, updated_ms = ?6
                     WHERE workspace_id = ?1 AND slot = ?2 AND owner = ?3 AND key = ?4
                         AND value = ?7",
                )?
                .execute(params![id, m.slot, m.owner, m.key, new, w.now_ms, seen])?,
            (Some(seen), None) => tx
                .prepare_cached(
                    "DELETE FROM policy_markers
                     WHERE workspace_id = ?1 AND slot = ?2 AND owner = ?3 AND key = ?4
                         AND value = ?5",
                )?
                .execute(params![id, m.slot, m.owner, m.key, seen])?,
            (None, None) => {
                let present: bool = tx.query_row(
                    "SELECT EXISTS(SELECT 1 FROM policy_markers
                     WHERE workspace_id = ?1 AND slot = ?2 AND owner = ?3 AND key = ?4)",
                    params![id, m.slot, m.owner, m.key],
                    |r| r.get(0),
                )?;
                usize::from(!present)
            }
        };
        if changed != 1 {
            return Ok(Applied::Conflict);
        }
    }

    // Conditions need no compare-and-set of their own: each write bumps the
    // version, which was checked above.
    for c in &w.conditions {
        match &c.new {
            Some(new) => tx
                .prepare_cached(
                    "INSERT INTO conditions (workspace_id, slot, owner, name, severity, reason,
                         message, since_ms, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
                     ON CONFLICT (workspace_id, slot, owner, name) DO UPDATE SET
                         severity = excluded.severity, reason = excluded.reason,
                         message = excluded.message, updated_ms = excluded.updated_ms",
                )?
                .execute(params![
                    id,
                    c.slot,
                    c.owner,
                    c.name,
                    new.severity.as_str(),
                    new.reason,
                    new.message,
                    w.now_ms
                ])?,
            None => tx
                .prepare_cached(
                    "DELETE FROM conditions
                     WHERE workspace_id = ?1 AND slot = ?2 AND owner = ?3 AND name = ?4",
                )?
                .execute(params![id, c.slot, c.owner, c.name])?,
        };
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

    // A heartbeat's card fills a workspace that has none (a runtime whose
    // register failed), and clears the register-failure stamp.
    if let Some(card) = &w.agent_card_backfill {
        tx.prepare_cached(
            "UPDATE workspaces SET agent_card = COALESCE(agent_card, ?2),
                 last_register_failure_ms = NULL
             WHERE id = ?1 AND status != 'removed'",
        )?
        .execute(params![id, card])?;
    }

    if let Some(rt) = &w.runtime {
        tx.prepare_cached(
            "UPDATE workspaces SET capabilities = ?2, idle_timeout_seconds = ?3
             WHERE id = ?1 AND status != 'removed'",
        )?
        .execute(params![
            id,
            serde_json::to_string(&rt.capabilities).unwrap_or_else(|_| "[]".into()),
            rt.idle_timeout_seconds
        ])?;
    }

    if w.stamp_register_failure {
        tx.prepare_cached("UPDATE workspaces SET last_register_failure_ms = ?2 WHERE id = ?1")?
            .execute(params![id, w.now_ms])?;
    }

    let mut token_stored = false;
    if let Some(r) = &w.registration {
        tx.prepare_cached(
            "UPDATE workspaces SET url = ?2, agent_card = ?3, delivery_mode = ?4,
                 last_heartbeat_ms = ?5, last_register_failure_ms = NULL, updated_ms = ?5,
                 capabilities = ?6, idle_timeout_seconds = ?7
             WHERE id = ?1 AND status != 'removed'",
        )?
        .execute(params![
            id,
            r.url,
            r.agent_card,
            r.delivery_mode,
            w.now_ms,
            serde_json::to_string(&r.runtime.capabilities).unwrap_or_else(|_| "[]".into()),
            r.runtime.idle_timeout_seconds
        ])?;
        if let Some(token) = &r.new_token {
            // Bootstrap: only while the workspace has no live token and has
            // never had one (or the operator reopened it).
            let open: bool = tx.query_row(
                "SELECT token_bootstrap = 1 AND NOT EXISTS(SELECT 1 FROM auth_tokens
                 WHERE workspace_id = ?1 AND revoked_ms IS NULL)
                 FROM workspaces WHERE id = ?1",
                [id],
                |r| r.get(0),
            )?;
            if open {
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

pub(super) fn insert_token(
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
