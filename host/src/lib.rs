//! Heartgate: agent-fleet liveness decided by sandboxed WebAssembly policies.
//!
//! # Layout
//! - [`http`]: the HTTP layer (hyper); knows routes, JSON bodies and status
//!   codes, nothing below it does.
//! - [`executor`]: turns a request into one applied verdict: snapshot, auth,
//!   chain evaluation, validation, one transaction, hand-over of reconciles.
//!   The only code that performs the effects of actions.
//! - [`chain`]: the policy set: the built-in chain, chain files, evaluating
//!   a chain slot by slot.
//! - [`engine`]: the only code that knows wasmtime.
//! - [`store`]: the only code that knows SQL.
//! - [`liveness`]: the sweep that notices silence (heartbeat TTL,
//!   provision timeout) and has the chain evaluate it.
//! - [`reconcile`]: the worker that runs queued reconciles off the request
//!   path.
//! - [`deliverer`]: the only code that touches workspace config volumes and
//!   restart hooks: sources, staging, atomic delivery, restart hooks.
//! - [`admin`]: read models for the admin API and the CLI.
//! - [`authoring`]: the policy author's tools (template, build, fixture
//!   runner, eval with trace, replay); used by the CLI, never by the service.
//! - [`auth`], [`clock`], [`model`], [`telemetry`], [`metrics`]: tokens,
//!   time, the contract's data on the host side, logging, Prometheus metrics.

pub mod admin;
pub mod agent_url;
pub mod auth;
pub mod authoring;
pub mod chain;
pub mod clock;
pub mod conditions;
pub mod config;
pub mod deliverer;
pub mod engine;
pub mod executor;
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod http;
pub mod liveness;
pub mod metrics;
pub mod model;
pub mod policy_set;
pub mod reconcile;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::chain::Chain;
use crate::clock::Clock;
use crate::deliverer::{DelivererConfig, PluginDeliverer, Secret};
use crate::engine::Engine;
use crate::executor::Executor;
use crate::reconcile::{Worker, WorkerConfig};
use crate::store::postgres::{PgOptions, PgStore};
use crate::store::{SqliteStore, Store};

/// Where the state lives: a SQLite file (the embedded default) or a
/// PostgreSQL database shared by several hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` URL.
    Postgres(String),
}

impl Database {
    /// A `postgres://` or `postgresql://` URL names PostgreSQL; anything
    /// else is a SQLite file's path.
    pub fn parse(db: &str) -> Database {
        if store::postgres::is_postgres_url(db) {
            Database::Postgres(db.to_string())
        } else {
            Database::Sqlite(PathBuf::from(db))
        }
    }

    /// For logs and errors: the path, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(path) => path.display().to_string(),
            Database::Postgres(url) => store::postgres::redacted(url),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Database::Postgres(_))
    }
}

impl From<PathBuf> for Database {
    fn from(path: PathBuf) -> Database {
        match path.to_str() {
            Some(s) if store::postgres::is_postgres_url(s) => Database::Postgres(s.to_string()),
            _ => Database::Sqlite(path),
        }
    }
}

impl From<&Path> for Database {
    fn from(path: &Path) -> Database {
        Database::from(path.to_path_buf())
    }
}

impl From<&PathBuf> for Database {
    fn from(path: &PathBuf) -> Database {
        Database::from(path.clone())
    }
}

impl From<&str> for Database {
    fn from(db: &str) -> Database {
        Database::parse(db)
    }
}

impl From<String> for Database {
    fn from(db: String) -> Database {
        Database::parse(&db)
    }
}

impl From<&Database> for Database {
    fn from(db: &Database) -> Database {
        db.clone()
    }
}

/// Everything needed to run the service.
pub struct ServiceOptions {
    /// The database: a SQLite file or a PostgreSQL URL.
    pub db: Database,
    /// How a PostgreSQL store connects and leases (`[postgres]`,
    /// `[reconcile] lease_seconds`).
    pub postgres: PgOptions,
    /// Whether this host runs reconcile runs (`[reconcile] enabled`): off
    /// for hosts without the workspaces' config volumes.
    pub reconcile: bool,
    /// The chain and the directory its relative module paths are under;
    /// `None` uses the built-in chain.
    pub chain: Option<(chain::ChainSpec, PathBuf)>,
    pub clock: Arc<dyn Clock>,
    pub deliverer: DelivererConfig,
    pub worker: WorkerConfig,
    /// The admin API's bearer token; `None` disables the admin API.
    pub admin_token: Option<Secret>,
    /// A register for an unknown id creates the workspace (off by default).
    pub open_registration: bool,
    /// Watch this directory for `<slot>.wasm` files to activate.
    pub watch_dir: Option<PathBuf>,
    pub server: http::ServerConfig,
    /// How much of the decision log is kept.
    pub retention: store::Retention,
    /// Below this much free space on the database's file system, the
    /// service is unready and acknowledges no heartbeat before its commit.
    pub min_free_bytes: u64,
    /// How many policy modules (and bytes of them) the service stores.
    pub module_quota: store::ModuleQuota,
    /// When silence is noticed (`[liveness]`).
    pub liveness: liveness::LivenessConfig,
    /// Which agent URLs a push-mode register may store (`[registry]`).
    pub agent_urls: agent_url::AgentUrlPolicy,
    /// Where compiled modules are kept (`None`: compiled at every start).
    /// `heartgate serve` sets [`engine::default_module_cache_dir`].
    pub module_cache: Option<PathBuf>,
}

impl ServiceOptions {
    /// The embedded default: built-in chain, system clock, config volumes
    /// under `./configs`, local plugins under `./plugins`, no restart hook,
    /// admin token from `HEARTGATE_ADMIN_TOKEN`.
    pub fn new(db: impl Into<Database>) -> ServiceOptions {
        ServiceOptions {
            db: db.into(),
            postgres: PgOptions::default(),
            reconcile: true,
            chain: None,
            clock: Arc::new(clock::SystemClock),
            deliverer: DelivererConfig::default(),
            worker: WorkerConfig::default(),
            admin_token: Some(Secret::Env("HEARTGATE_ADMIN_TOKEN".into())),
            open_registration: false,
            watch_dir: None,
            server: http::ServerConfig::default(),
            retention: store::Retention::default(),
            min_free_bytes: store::health::DEFAULT_MIN_FREE_BYTES,
            module_quota: store::ModuleQuota::default(),
            liveness: liveness::LivenessConfig::default(),
            agent_urls: agent_url::AgentUrlPolicy::default(),
            module_cache: None,
        }
    }
}

/// Open the store at `db` (a SQLite file or a PostgreSQL URL).
pub fn open_store(db: impl Into<Database>) -> anyhow::Result<Arc<dyn Store>> {
    open_store_with(&db.into(), &PgOptions::default())
}

/// [`open_store`] with PostgreSQL options.
pub fn open_store_with(db: &Database, postgres: &PgOptions) -> anyhow::Result<Arc<dyn Store>> {
    if let Database::Sqlite(path) = db
        && !path.exists()
        && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        anyhow::bail!(
            "cannot create the database {}: there is no directory {}",
            path.display(),
            dir.display()
        );
    }
    let opened: Result<Arc<dyn Store>, _> = match db {
        Database::Sqlite(path) => SqliteStore::open(path).map(|s| Arc::new(s) as Arc<dyn Store>),
        Database::Postgres(url) => {
            PgStore::open(url, postgres).map(|s| Arc::new(s) as Arc<dyn Store>)
        }
    };
    opened.with_context(|| format!("opening the database `{}`", db.describe()))
}

/// [`open_store`] a database that must exist already (every command but
/// `serve`, `workspace add` and `db init`): a missing one is not created,
/// and the error says so without more context.
pub fn open_existing_store(db: impl Into<Database>) -> anyhow::Result<Arc<dyn Store>> {
    let db = db.into();
    let opened: Result<Arc<dyn Store>, _> = match &db {
        Database::Sqlite(path) => {
            SqliteStore::open_existing(path).map(|s| Arc::new(s) as Arc<dyn Store>)
        }
        Database::Postgres(url) => PgStore::open_existing(url, &PgOptions::default())
            .map(|s| Arc::new(s) as Arc<dyn Store>),
    };
    match opened {
        Err(e @ store::StoreError::Missing(_)) => Err(e.into()),
        other => other.with_context(|| format!("opening the database `{}`", db.describe())),
    }
}

/// The parts of a running service.
pub struct Service {
    pub executor: Arc<Executor>,
    pub worker: Arc<Worker>,
    pub policies: Arc<policy_set::PolicySet>,
}

/// Build the engine, load the chain, open the store, create the worker.
pub fn build(opts: &ServiceOptions) -> anyhow::Result<Service> {
    let engine = Engine::with_module_cache(opts.module_cache.as_deref())
        .context("creating the WebAssembly engine")?;
    let store = open_store_with(&opts.db, &opts.postgres)?;
    // The chain last activated wins over the configured one: activations are
    // what an operator did most recently.
    let chain = policy_set::startup_chain(&engine, store.as_ref(), || match &opts.chain {
        Some((spec, base)) => Chain::from_spec(&engine, spec, base, &|_| None),
        None => Chain::builtin(&engine),
    })?;
    tracing::info!(
        chain_version = %chain.version,
        slots = ?chain.slots.iter().map(|s| format!("{}={}@{}", s.name, s.module.metadata().name, &s.module.digest()[..12])).collect::<Vec<_>>(),
        "chain loaded"
    );
    let deliverer = PluginDeliverer::new(opts.deliverer.clone(), store.clone(), opts.clock.clone());
    let worker = Worker::new(store.clone(), opts.clock.clone(), deliverer, opts.worker);
    // One set of metrics for the executor, the worker and the store's writer.
    let metrics = Arc::new(metrics::Metrics::new());
    store.instrument(metrics.store());
    store.set_min_free(opts.min_free_bytes);
    store.set_retention(opts.retention);
    worker.count_in(metrics.clone());
    let executor = Arc::new(
        Executor::new(
            store.clone(),
            chain,
            opts.clock.clone(),
            Arc::new(worker.handle()),
        )
        .with_open_registration(opts.open_registration)
        .with_agent_url_policy(opts.agent_urls.clone())
        .with_metrics(metrics),
    );
    let policies = Arc::new(
        policy_set::PolicySet::new(engine, store.clone(), executor.clone(), opts.clock.clone())
            .with_quota(opts.module_quota),
    );
    // A shadow chain set before this start (or on another host) runs here too.
    if let Err(e) = policies.catch_up_shadow() {
        tracing::warn!(error = %e, "could not start the stored shadow chain");
    }
    Ok(Service {
        executor,
        worker,
        policies,
    })
}

/// Run the service on `listener` until `shutdown` completes: stop accepting,
/// finish in-flight requests, stop the worker (runs in flight stay durable
/// and are re-queued at the next start).
pub async fn run(
    listener: tokio::net::TcpListener,
    opts: ServiceOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let service = tokio::task::block_in_place(|| build(&opts))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop_signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // A host without the workspaces' config volumes leaves the runs to the
    // hosts that have them.
    let worker = opts
        .reconcile
        .then(|| tokio::spawn(service.worker.clone().run(stop_signal(stopped.clone()))));
    if !opts.reconcile {
        tracing::info!("reconcile runs are off on this host (`[reconcile] enabled = false`)");
    }
    let retrier = tokio::spawn(
        service
            .executor
            .acknowledge_when_queued(stop_signal(stopped.clone())),
    );
    // The shadow chain decides off the request path (its own queue and task).
    let shadow = tokio::spawn(service.executor.run_shadow(stop_signal(stopped.clone())));
    let sweeper = liveness::Sweeper::new(service.executor.clone(), opts.liveness.clone())
        .spawn(stop_signal(stopped.clone()))?;
    if opts.watch_dir.is_some() {
        let store = service.executor.store().clone();
        tokio::task::block_in_place(|| store.claim_watch()).context("starting in watch mode")?;
    }
    let watcher = opts.watch_dir.clone().map(|dir| {
        tracing::info!(dir = %dir.display(), "watching for policy modules");
        tokio::spawn(policy_set::watch(
            service.policies.clone(),
            dir,
            std::time::Duration::from_secs(1),
            stop_signal(stopped.clone()),
        ))
    });
    // Hosts sharing a database serve what any of them activates.
    let follower = opts.db.is_postgres().then(|| {
        tokio::spawn(policy_set::follow(
            service.policies.clone(),
            policy_set::FOLLOW_EVERY,
            stop_signal(stopped.clone()),
        ))
    });
    let admin = admin::Admin::new(
        service.executor.store().clone(),
        opts.deliverer.configs_root.clone(),
        opts.admin_token.clone(),
        service.policies.clone(),
    );
    let store = service.executor.store().clone();
    let mut app = http::App::new(service.executor, admin, opts.server.clone())
        .with_worker(service.worker.clone());
    if !opts.reconcile {
        app = app.without_reconcile();
    }
    let app = Arc::new(app);
    tracing::info!(addr = %listener.local_addr()?, "serving");
    let served = http::serve(listener, app, shutdown).await;
    let _ = stop.send(true);
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    if let Some(follower) = follower {
        let _ = follower.await;
    }
    if let Some(worker) = worker
        && let Err(e) = worker.await
    {
        tracing::error!(error = %e, "the reconcile worker failed");
    }
    if tokio::task::spawn_blocking(move || sweeper.join())
        .await
        .map_or(true, |joined| joined.is_err())
    {
        tracing::error!("the silence sweep's thread panicked");
    }
    if let Err(e) = retrier.await {
        tracing::error!(error = %e, "evaluating conflicting heartbeats again failed");
    }
    if let Err(e) = shadow.await {
        tracing::error!(error = %e, "the shadow chain's task failed");
    }
    // Liveness-only verdicts acknowledged before their commit are written
    // before the process exits.
    tokio::task::spawn_blocking(move || store.flush()).await?;
    served?;
    Ok(())
}
