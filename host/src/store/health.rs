//! Whether the store can write, as its writes and its file system say: a
//! write that failed (a full disk, a read-only file, an I/O error, a lock
//! held elsewhere for too long) starts an episode that the next successful
//! commit ends, and a file system with less free space than the floor
//! counts as one too. While either holds, the service acknowledges no
//! heartbeat before its commit and `/readyz` is unready with the cause:
//! early acknowledgement is for speed, never for hiding a dead disk.
//!
//! Nothing here opens the database's files: free space is asked of the
//! file system (`statvfs` of the directory), so no descriptor of the
//! database is ever closed outside SQLite (closing one drops every POSIX
//! lock the process holds on the file).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// Where the store's metrics go (see [`crate::metrics::Metrics::store`]).
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    /// Apply-and-commit time of one batch of verdicts.
    pub commit_seconds: Histogram,
    /// Writes that failed (a batch of verdicts, or one operator write).
    pub write_failures: Counter,
    /// 1 while writes succeed and the disk has room, 0 during an episode.
    pub writable: Gauge,
}

/// The default free-space floor of the database's file system.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 << 20;

/// How often free space is asked of the file system at most.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The write health of one store.
#[derive(Debug)]
pub struct Health {
    /// The cause of the last failed write, while no write has committed
    /// since.
    failing: Mutex<Option<String>>,
    /// `failing.is_some()`, for the heartbeat path (no lock).
    failed: AtomicBool,
    disk: DiskWatch,
    /// Neither failing nor low on space: what the episode log follows.
    healthy: AtomicBool,
    /// When the current episode began.
    since: Mutex<Option<Instant>>,
    metrics: std::sync::OnceLock<StoreMetrics>,
}

/// The free space of the database's file system, asked at most once a
/// second.
#[derive(Debug)]
struct DiskWatch {
    dir: PathBuf,
    min_free: AtomicU64,
    /// Free bytes at the last look.
    free: AtomicU64,
    low: AtomicBool,
    /// When the file system was last asked, in ms since `epoch` (0: never).
    looked_ms: AtomicU64,
    epoch: Instant,
}

impl Health {
    /// The health of a database file at `path`.
    pub fn new(path: &Path) -> Health {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Health {
            failing: Mutex::new(None),
            failed: AtomicBool::new(false),
            disk: DiskWatch {
                dir,
                min_free: AtomicU64::new(DEFAULT_MIN_FREE_BYTES),
                free: AtomicU64::new(u64::MAX),
                low: AtomicBool::new(false),
                looked_ms: AtomicU64::new(0),
                epoch: Instant::now(),
            },
            healthy: AtomicBool::new(true),
            since: Mutex::new(None),
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// The health of a database on another machine (PostgreSQL): no local
    /// file system to watch, only whether writes succeed.
    pub fn remote() -> Health {
        let health = Health::new(Path::new("."));
        health.disk.min_free.store(0, Ordering::Relaxed);
        health
    }

    /// Count into `metrics` (once; later calls are ignored).
    pub fn instrument(&self, metrics: StoreMetrics) {
        metrics
            .writable
            .set(i64::from(self.healthy.load(Ordering::Acquire)));
        let _ = self.metrics.set(metrics);
    }

    /// The commit-time histogram, if instrumented.
    pub fn commit_seconds(&self) -> Option<&Histogram> {
        self.metrics.get().map(|m| &m.commit_seconds)
    }

    /// Below `bytes` free, the file system counts as full.
    pub fn set_min_free(&self, bytes: u64) {
        self.disk.min_free.store(bytes, Ordering::Relaxed);
        self.disk.looked_ms.store(0, Ordering::Relaxed);
        self.disk.refresh();
        self.update();
    }

    /// A write failed with `cause`: counted; the first failure of an
    /// episode is logged at ERROR.
    pub fn failed(&self, cause: &str) {
        if let Some(m) = self.metrics.get() {
            m.write_failures.inc();
        }
        if let Ok(mut failing) = self.failing.lock() {
            *failing = Some(cause.to_string());
            self.failed.store(true, Ordering::Release);
        }
        tracing::debug!(cause, "a database write failed");
        self.update();
    }

    /// A write committed: writes no longer fail.
    pub fn succeeded(&self) {
        if !self.failed.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut failing) = self.failing.lock() {
            *failing = None;
            self.failed.store(false, Ordering::Release);
        }
        self.update();
    }

    /// `Ok` while writes succeed and the file system has room; else why not.
    pub fn check(&self) -> Result<(), String> {
        self.disk.refresh();
        self.update();
        self.cause().map_or(Ok(()), Err)
    }

    /// Whether a verdict may be acknowledged before its commit: two atomic
    /// loads, for the heartbeat path (which never asks the file system: a
    /// `statvfs` could block an async worker on a sick file system).
    pub fn allows_early_ack(&self) -> bool {
        !self.failed.load(Ordering::Acquire) && !self.disk.low()
    }

    /// Ask the file system for its free space again if the last look is a
    /// second old: what the writer thread does after each batch (and
    /// `/readyz`, on a blocking thread).
    pub fn tick(&self) {
        if self.disk.refresh() {
            self.update();
        }
    }

    /// Why writes are not healthy, if they are not.
    fn cause(&self) -> Option<String> {
        if self.failed.load(Ordering::Acquire)
            && let Ok(failing) = self.failing.lock()
            && let Some(cause) = &*failing
        {
            return Some(cause.clone());
        }
        if self.disk.low() {
            let free = self.disk.free.load(Ordering::Relaxed);
            let floor = self.disk.min_free.load(Ordering::Relaxed);
            return Some(format!(
                "only {} MiB free on the database's file system `{}` (the floor is {} MiB)",
                free >> 20,
                self.disk.dir.display(),
                floor >> 20
            ));
        }
        None
    }

    /// Log the start and the end of an episode, once each, and keep the
    /// gauge.
    fn update(&self) {
        let healthy = !self.failed.load(Ordering::Acquire) && !self.disk.low();
        let was = self.healthy.swap(healthy, Ordering::AcqRel);
        if was == healthy {
            return;
        }
        if let Some(m) = self.metrics.get() {
            m.writable.set(i64::from(healthy));
        }
        let Ok(mut since) = self.since.lock() else {
            return;
        };
        if healthy {
            let lasted = since.take().map(|at| at.elapsed()).unwrap_or_default();
            tracing::warn!(
                after_ms = u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX),
                "database writes succeed again"
            );
        } else {
            *since = Some(Instant::now());
            tracing::error!(
                cause = self.cause().unwrap_or_default(),
                "database writes are failing: heartbeats are answered 500 and none is acknowledged before its commit until writes succeed again"
            );
        }
    }
}

impl DiskWatch {
    fn low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// Ask the file system again if the last look is older than a second;
    /// whether it looked. One caller looks; the others go on (the heartbeat
    /// path pays two atomic loads).
    fn refresh(&self) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.looked_ms.load(Ordering::Relaxed);
        let every = u64::try_from(DISK_CHECK_EVERY.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < every {
            return false;
        }
        if self
            .looked_ms
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        match rustix::fs::statvfs(&self.dir) {
            Ok(st) => {
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                self.free.store(free, Ordering::Relaxed);
                self.low.store(
                    free < self.min_free.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
            }
            Err(e) => tracing::debug!(error = %e, dir = %self.dir.display(), "statvfs failed"),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_starts_at_a_failure_and_ends_at_a_success() {
        let dir = tempfile::tempdir().unwrap();
        let health = Health::new(&dir.path().join("x.db"));
        health.set_min_free(0);
        assert!(health.check().is_ok());
        assert!(health.allows_early_ack());
        health.failed("disk full");
        health.failed("disk full");
        assert!(!health.allows_early_ack());
        let err = health.check().unwrap_err();
        assert!(err.contains("disk full"), "{err}");
        health.succeeded();
        assert!(health.check().is_ok());
        assert!(health.allows_early_ack());
    }

    #[test]
    fn a_file_system_below_the_floor_counts_as_full() {
        let dir = tempfile::tempdir().unwrap();
        let health = Health::new(&dir.path().join("x.db"));
        health.set_min_free(u64::MAX);
        assert!(!health.allows_early_ack());
        let err = health.check().unwrap_err();
        assert!(err.contains("free"), "{err}");
        health.set_min_free(0);
        assert!(health.check().is_ok());
    }
}
