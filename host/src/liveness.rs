//! Noticing silence: the liveness TTL and the provision timeout.
//!
//! The service reacts to requests; this module notices their absence. A
//! sweep runs every `sweep_interval` and asks the store for the workspaces
//! whose deadline passed, read from an index over the liveness fields that
//! register and heartbeat already write (no write per heartbeat for the
//! deadline):
//! - `heartbeat_expired`: `online`, `degraded` or `failed`, no register or
//!   heartbeat for `heartbeat_ttl`;
//! - `provision_timeout`: `provisioning` for longer than the provision
//!   timeout of its runtime (`provision_timeout`, or
//!   `[liveness.runtime.<name>]`; `hermes` has 30 minutes by default).
//!
//! It decides nothing itself: each such workspace is evaluated by the active
//! chain with a `silence` event ([`Executor::notice_silence`]), and the
//! verdict is applied like any other (validated, one transaction,
//! compare-and-set, decision log). The verdict is written only if the
//! workspace's liveness is still what the evaluation saw, so a heartbeat that
//! lands meanwhile wins; each deadline is evaluated once (the store keeps which
//! one was), so a sweep costs in proportion to the workspaces that expired,
//! and several hosts sweeping one database make one transition between them.
//!
//! **After an outage.** While no host ran, runtimes could not reach the
//! service. The store keeps when a sweep last ran, by any host. The first
//! sweep of a starting host that finds no sweep for longer than
//! [`LivenessConfig::outage_gap`] (a quarter TTL, at least three sweep
//! intervals) records an outage ending now; a host that is running knows it
//! was up, so a slow sweep of its own is never taken for one. For one TTL
//! after an outage's end nothing is noticed: every deadline is at least the
//! end of the last outage plus one TTL, so a healthy fleet has one TTL to
//! reach the service again, and the workspaces that stay silent are noticed
//! then. A host starting while another one runs finds a recent sweep and
//! notices silence at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::clock;
use crate::executor::{Executor, SilenceOutcome, SilenceRule};
use crate::model::SilenceKind;
use crate::store::{SilenceQuery, SilentWorkspace};

/// The runtime whose workspaces are agents outside the platform: silent,
/// they are `awaiting_agent` (not `offline`), and they poll by default.
pub const EXTERNAL_RUNTIME: &str = "external";

/// Workspaces read from the store at once by a sweep.
const SWEEP_BATCH: usize = 512;
/// Silence verdicts a sweep evaluates and writes at once.
const SWEEP_CONCURRENCY: usize = 32;

/// `[liveness]`: when silence is noticed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LivenessConfig {
    /// No register or heartbeat for this long: the heartbeat expired.
    pub heartbeat_ttl: Duration,
    /// `provisioning` for this long (unless its runtime says otherwise).
    pub provision_timeout: Duration,
    /// How often the sweep looks for silent workspaces.
    pub sweep_interval: Duration,
    /// Provision timeouts by runtime name.
    pub runtime_provision_timeout: BTreeMap<String, Duration>,
}

impl Default for LivenessConfig {
    /// The original registry's: 180 s, 12 minutes (30 for `hermes`),
    /// swept every second.
    fn default() -> Self {
        LivenessConfig {
            heartbeat_ttl: Duration::from_secs(180),
            provision_timeout: Duration::from_secs(12 * 60),
            sweep_interval: Duration::from_secs(1),
            runtime_provision_timeout: BTreeMap::from([(
                "hermes".to_string(),
                Duration::from_secs(30 * 60),
            )]),
        }
    }
}

impl LivenessConfig {
    /// The provision timeout of a workspace of `runtime`.
    pub fn provision_timeout_for(&self, runtime: &str) -> Duration {
        self.runtime_provision_timeout
            .get(runtime)
            .copied()
            .unwrap_or(self.provision_timeout)
    }

    /// The shortest provision timeout of any runtime.
    pub fn shortest_provision_timeout(&self) -> Duration {
        self.runtime_provision_timeout
            .values()
            .copied()
            .fold(self.provision_timeout, Duration::min)
    }

    /// No sweep for longer than this is an outage: a quarter TTL, at least
    /// three sweep intervals.
    pub fn outage_gap(&self) -> Duration {
        (self.heartbeat_ttl / 4).max(self.sweep_interval * 3)
    }

    /// Whether the values make sense together: else the key at fault and
    /// what is wrong with it.
    pub fn check(&self) -> Result<(), (String, String)> {
        let bounds = |key: &str, d: Duration, min: Duration, max: Duration| {
            if d < min || d > max {
                Err((
                    key.to_string(),
                    format!(
                        "must be {}-{}, not {}",
                        format_duration(min),
                        format_duration(max),
                        format_duration(d)
                    ),
                ))
            } else {
                Ok(())
            }
        };
        let day = Duration::from_secs(86_400);
        bounds(
            "liveness.heartbeat_ttl",
            self.heartbeat_ttl,
            Duration::from_secs(1),
            day,
        )?;
        bounds(
            "liveness.provision_timeout",
            self.provision_timeout,
            Duration::from_secs(1),
            7 * day,
        )?;
        bounds(
            "liveness.sweep_interval",
            self.sweep_interval,
            Duration::from_millis(10),
            Duration::from_secs(3600),
        )?;
        if self.sweep_interval > self.heartbeat_ttl {
            return Err((
                "liveness.sweep_interval".into(),
                format!(
                    "({}) must not be longer than `liveness.heartbeat_ttl` ({})",
                    format_duration(self.sweep_interval),
                    format_duration(self.heartbeat_ttl)
                ),
            ));
        }
        for (name, d) in &self.runtime_provision_timeout {
            if !crate::model::valid_runtime_name(name) {
                return Err((
                    format!("liveness.runtime.{name}"),
                    "must name a runtime: 1-64 of A-Z, a-z, 0-9, `-`, `_`, `.`".into(),
                ));
            }
            bounds(
                &format!("liveness.runtime.{name}.provision_timeout"),
                *d,
                Duration::from_secs(1),
                7 * day,
            )?;
        }
        Ok(())
    }
}

/// Parse a duration such as `"200ms"`, `"2s"`, `"90s"`, `"12m"`, `"1h"` or
/// `"1m30s"` ([`clock::parse_duration_ms`]).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let ms = clock::parse_duration_ms(text)?;
    Ok(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// A duration as people read it: `800ms`, `45s`, `3m02s`, `1h05m`.
pub fn format_duration(d: Duration) -> String {
    clock::format_duration_ms(ms(d))
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Workspaces whose deadline had passed and that were evaluated.
    pub evaluated: usize,
    /// Of those, the ones whose status the verdict changed.
    pub transitions: usize,
}

/// The sweep for silent workspaces of one service.
pub struct Sweeper {
    executor: Arc<Executor>,
    config: LivenessConfig,
    /// No sweep of this host has been recorded yet: the next one asks
    /// whether the fleet was down.
    starting: AtomicBool,
}

impl Sweeper {
    pub fn new(executor: Arc<Executor>, config: LivenessConfig) -> Sweeper {
        Sweeper {
            executor,
            config,
            starting: AtomicBool::new(true),
        }
    }

    /// Run [`Sweeper::run`] on a thread of its own at the lowest scheduling
    /// priority (with its own single-threaded runtime), so that noticing
    /// many silent workspaces at once takes what CPU the live heartbeats
    /// leave and does not raise their latency.
    pub fn spawn(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("heartgate-sweep".into())
            .spawn(move || {
                if let Err(e) = thread_priority::set_current_thread_priority(
                    thread_priority::ThreadPriority::Min,
                ) {
                    tracing::debug!(error = ?e, "could not lower the sweep thread's priority");
                }
                // Its blocking threads are created by this thread and
                // inherit its priority.
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(self.run(stop)),
                    Err(e) => tracing::error!(error = %e, "the silence sweep could not start"),
                }
            })
    }

    /// Sweep every `sweep_interval` until `stop` completes. A failing sweep
    /// is logged and the next one tries again. `stop` also ends a sweep in
    /// progress (a long one must not hold up a shutdown): a verdict already
    /// submitted is still written whole, and the deadlines not evaluated
    /// are still in the index at the next start.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ticks = tokio::time::interval(self.config.sweep_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => {}
            }
            let swept = tokio::select! {
                () = &mut stop => return,
                swept = self.sweep() => swept,
            };
            match swept {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("the silence sweep works again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!(error = %e, "the silence sweep failed; retrying every sweep interval");
                }
                Err(_) => {}
            }
        }
    }

    /// One sweep: evaluate every workspace whose deadline passed by the
    /// service's clock.
    pub async fn sweep(&self) -> Result<SweepReport, crate::store::StoreError> {
        let started = Instant::now();
        let executor = self.executor.clone();
        let now_ms = executor.now_ms();
        let ttl_ms = ms(self.config.heartbeat_ttl);
        let gap_ms = self
            .starting
            .load(Ordering::Relaxed)
            .then(|| ms(self.config.outage_gap()));
        let store = executor.store().clone();
        let up_since_ms = blocking(move || store.sweep_started(now_ms, gap_ms)).await?;
        self.starting.store(false, Ordering::Relaxed);
        let mut report = SweepReport::default();
        // Within one TTL of an outage's end, every deadline is still ahead:
        // nothing to read.
        let in_grace = now_ms < up_since_ms.saturating_add(ttl_ms);
        let kinds = if in_grace {
            Vec::new()
        } else {
            vec![
                (SilenceKind::HeartbeatExpired, self.config.heartbeat_ttl),
                (
                    SilenceKind::ProvisionTimeout,
                    self.config.shortest_provision_timeout(),
                ),
            ]
        };
        for (kind, limit) in kinds {
            let mut after: Option<(i64, String)> = None;
            loop {
                let store = executor.store().clone();
                let query = SilenceQuery {
                    kind,
                    before_ms: now_ms.saturating_sub(ms(limit)),
                    after: after.clone(),
                    limit: SWEEP_BATCH,
                };
                let batch = blocking(move || store.silent_workspaces(&query)).await?;
                let full = batch.len() == SWEEP_BATCH;
                if let Some(last) = batch.last() {
                    after = Some((last.since_ms, last.id.clone()));
                }
                let not_before_ms = up_since_ms.saturating_add(ttl_ms);
                let due: Vec<(SilentWorkspace, SilenceRule)> = batch
                    .into_iter()
                    .map(|w| {
                        let rule = self.rule(&w, not_before_ms);
                        (w, rule)
                    })
                    .filter(|(w, rule)| w.since_ms.saturating_add(rule.limit_ms) <= now_ms)
                    .collect();
                report.evaluated += due.len();
                report.transitions += self.evaluate_all(due, now_ms).await;
                if !full {
                    break;
                }
            }
        }
        self.executor
            .metrics()
            .sweep_took(started.elapsed().as_secs_f64());
        if report.evaluated > 0 {
            tracing::info!(
                evaluated = report.evaluated,
                transitions = report.transitions,
                took_ms = started.elapsed().as_millis() as u64,
                "silence noticed"
            );
        }
        Ok(report)
    }

    /// When the silence of `w` is due: its runtime's limit, and not before
    /// `not_before_ms`.
    fn rule(&self, w: &SilentWorkspace, not_before_ms: i64) -> SilenceRule {
        let limit = match w.kind {
            SilenceKind::HeartbeatExpired => self.config.heartbeat_ttl,
            SilenceKind::ProvisionTimeout => self.config.provision_timeout_for(&w.runtime),
        };
        SilenceRule {
            kind: w.kind,
            limit_ms: ms(limit),
            not_before_ms,
        }
    }

    /// Evaluate `due` with at most [`SWEEP_CONCURRENCY`] at once; how many
    /// changed a status.
    async fn evaluate_all(&self, due: Vec<(SilentWorkspace, SilenceRule)>, now_ms: i64) -> usize {
        let mut transitions = 0;
        let mut running = tokio::task::JoinSet::new();
        let mut due = due.into_iter();
        loop {
            while running.len() < SWEEP_CONCURRENCY
                && let Some((w, rule)) = due.next()
            {
                let executor = self.executor.clone();
                running.spawn(async move {
                    let outcome = executor.notice_silence(&w.id, &rule, now_ms).await;
                    (w, outcome)
                });
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            match joined {
                Ok((_, Ok(SilenceOutcome::Changed { .. }))) => transitions += 1,
                Ok((_, Ok(_))) => {}
                Ok((w, Err(e))) => {
                    tracing::warn!(workspace_id = %w.id, error = %e, "evaluating a silence failed");
                }
                Err(e) => tracing::error!(error = %e, "a silence evaluation panicked"),
            }
        }
        transitions
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Run a blocking store call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, crate::store::StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        crate::store::StoreError::Failed(format!("the sweep's store call panicked: {e}"))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_written() {
        for (text, ms) in [
            ("2s", 2_000),
            ("90s", 90_000),
            ("12m", 720_000),
            ("200ms", 200),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
            (" 30m ", 1_800_000),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for bad in [
            "",
            "2",
            "s",
            "2 s",
            "-2s",
            "2w",
            "1.5s",
            "2S",
            "99999999999999999999s",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("is not a duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(format_duration(Duration::from_millis(800)), "800ms");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(2_500)), "2.5s");
        assert_eq!(format_duration(Duration::from_secs(182)), "3m02s");
        assert_eq!(format_duration(Duration::from_secs(3_900)), "1h05m");
        assert_eq!(clock::format_duration_ms(-5), "0ms");
    }

    #[test]
    fn runtimes_have_their_own_provision_timeout() {
        let c = LivenessConfig::default();
        assert_eq!(c.provision_timeout_for("hermes"), Duration::from_secs(1800));
        assert_eq!(c.provision_timeout_for(""), Duration::from_secs(720));
        assert_eq!(c.shortest_provision_timeout(), Duration::from_secs(720));
        assert_eq!(c.outage_gap(), Duration::from_secs(45));
        assert_eq!(c.check(), Ok(()));
    }

    #[test]
    fn nonsense_is_refused_with_its_key() {
        let mut c = LivenessConfig {
            sweep_interval: Duration::from_secs(600),
            ..LivenessConfig::default()
        };
        assert_eq!(c.check().unwrap_err().0, "liveness.sweep_interval");
        c.sweep_interval = Duration::from_millis(1);
        assert_eq!(c.check().unwrap_err().0, "liveness.sweep_interval");
        c.sweep_interval = Duration::from_secs(1);
        c.heartbeat_ttl = Duration::ZERO;
        let (key, message) = c.check().unwrap_err();
        assert_eq!(key, "liveness.heartbeat_ttl");
        assert_eq!(message, "must be 1s-24h00m, not 0ms");
        c.heartbeat_ttl = Duration::from_secs(180);
        c.runtime_provision_timeout
            .insert("bad name".into(), Duration::from_secs(5));
        assert_eq!(c.check().unwrap_err().0, "liveness.runtime.bad name");
    }
}
