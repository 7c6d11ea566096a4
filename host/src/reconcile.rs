//! The reconcile worker: runs queued `reconcile_runs` off the request path.
//!
//! It claims runs from the database (the queue), at most `concurrency` at a
//! time and never two of one workspace at once (the claim is one SQL
//! statement, so that holds across processes too), gives each a deadline, and
//! records each outcome durably: start and finish times, per-plugin results,
//! and for a failure the cause in plain words. A failed run is not retried by
//! itself; the next trigger retries, as often as the cooldown policy allows.
//!
//! A run past its deadline is recorded as failed; a git command or a file
//! copy already under way finishes on its blocking thread (each has its own
//! time or size limit), and delivery stays atomic either way.
//!
//! At start it re-queues runs that a previous process left `running` (it
//! died mid-run); delivery is atomic, so running such a run again is safe. At
//! shutdown it stops claiming and abandons runs in flight, which the next
//! start re-queues.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::clock::Clock;
use crate::deliverer::{Deliverer, PluginDeliverer};
use crate::store::{QueuedRun, ReconcileRun, RunOutcome, Store};

/// The worker's limits.
#[derive(Clone, Copy, Debug)]
pub struct WorkerConfig {
    /// How many runs (of different workspaces) may run at once.
    pub concurrency: usize,
    /// How long one run may take.
    pub deadline: Duration,
    /// How often the queue is polled when nobody says a run was queued (runs
    /// queued by another process, e.g. the CLI).
    pub poll: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 2,
            deadline: Duration::from_secs(600),
            poll: Duration::from_secs(1),
        }
    }
}

/// The reconcile worker.
pub struct Worker {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    deliverer: PluginDeliverer,
    config: WorkerConfig,
    wake: Notify,
    /// Inside [`Worker::run`] (what `/readyz` reports).
    running: std::sync::atomic::AtomicBool,
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
}

/// Wakes the worker when a verdict queued a run.
pub struct WorkerHandle(Arc<Worker>);

impl Deliverer for WorkerHandle {
    fn queued(&self, runs: &[QueuedRun]) {
        for run in runs {
            tracing::info!(run = run.id, workspace_id = %run.workspace_id,
                trigger = run.trigger.as_str(), "reconcile queued");
        }
        self.0.wake.notify_one();
    }
}

impl Worker {
    /// Count finished runs in `metrics` (once; later calls are ignored).
    pub fn count_in(&self, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// Whether [`Worker::run`] is running.
    pub fn is_running(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        deliverer: PluginDeliverer,
        config: WorkerConfig,
    ) -> Arc<Worker> {
        Arc::new(Worker {
            store,
            clock,
            deliverer,
            config,
            wake: Notify::new(),
            running: std::sync::atomic::AtomicBool::new(false),
            metrics: std::sync::OnceLock::new(),
        })
    }

    /// A handle for the executor.
    pub fn handle(self: &Arc<Self>) -> WorkerHandle {
        WorkerHandle(self.clone())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, String> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()).map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Run until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        // Running until this returns or its task is dropped.
        struct Running<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        self.running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _running = Running(&self.running);
        let mut shutdown = std::pin::pin!(shutdown);
        let now = self.clock.now_ms();
        match self.blocking(move |s| s.requeue_interrupted(now)).await {
            Ok(r) => {
                if r.requeued > 0 {
                    tracing::warn!(
                        runs = r.requeued,
                        "re-queued runs interrupted by a previous process"
                    );
                }
                if r.failed > 0 {
                    tracing::error!(
                        runs = r.failed,
                        "runs interrupted twice are failed, not re-queued (a workspace whose run stops the service cannot crash-loop it)"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "could not re-queue interrupted runs"),
        }
        // Staging directories of processes that died mid-run.
        match tokio::task::spawn_blocking(crate::deliverer::clean_scratch).await {
            Ok(0) | Err(_) => {}
            Ok(n) => tracing::info!(
                dirs = n,
                "removed staging directories left by processes no longer running"
            ),
        }
        let permits = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        loop {
            // Reap finished runs.
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = &mut shutdown => break,
            };
            let now = self.clock.now_ms();
            match self.blocking(move |s| s.claim_run(now)).await {
                Ok(Some(run)) => {
                    let worker = self.clone();
                    tasks.spawn(async move {
                        worker.execute(run).await;
                        drop(permit);
                        worker.wake.notify_one();
                    });
                }
                Ok(None) => {
                    drop(permit);
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(self.config.poll) => {}
                        () = &mut shutdown => break,
                    }
                }
                Err(e) => {
                    drop(permit);
                    tracing::error!(error = %e, "could not claim a reconcile run");
                    tokio::select! {
                        () = tokio::time::sleep(self.config.poll) => {}
                        () = &mut shutdown => break,
                    }
                }
            }
        }
        // Runs in flight stay `running`; the next start re-queues them.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    async fn execute(&self, run: ReconcileRun) {
        let span = tracing::info_span!("reconcile", run = run.id, workspace_id = %run.workspace_id,
            trigger = %run.trigger);
        self.execute_in_span(run).instrument(span).await;
    }

    async fn execute_in_span(&self, run: ReconcileRun) {
        tracing::info!("reconcile started");
        let deadline = self.config.deadline;
        let result = tokio::time::timeout(deadline, self.deliverer.reconcile(&run)).await;
        let (outcome, cause, detail) = match result {
            Ok(Ok(report)) => {
                let cause = report.cause();
                let outcome = if cause.is_some() {
                    RunOutcome::Failed
                } else {
                    RunOutcome::Succeeded
                };
                (
                    outcome,
                    cause,
                    serde_json::to_value(&report).unwrap_or_default(),
                )
            }
            Ok(Err(e)) => (
                RunOutcome::Failed,
                Some(format!("could not read the workspace's plugins: {e}")),
                serde_json::json!({}),
            ),
            Err(_) => (
                RunOutcome::Failed,
                Some(format!(
                    "the run exceeded its deadline of {}s",
                    deadline.as_secs()
                )),
                serde_json::json!({}),
            ),
        };
        match &cause {
            Some(c) => tracing::error!(cause = %c, "reconcile failed"),
            None => tracing::info!("reconcile succeeded"),
        }
        if let Some(metrics) = self.metrics.get() {
            let label = match outcome {
                RunOutcome::Succeeded => "succeeded",
                RunOutcome::Failed => "failed",
            };
            metrics.reconcile_run(&run.trigger, label);
        }
        let now = self.clock.now_ms();
        let id = run.id;
        if let Err(e) = self
            .blocking(move |s| s.finish_run(id, outcome, now, cause.as_deref(), &detail))
            .await
        {
            tracing::error!(error = %e, "could not record the run's outcome; it stays running until restart");
        }
    }
}
