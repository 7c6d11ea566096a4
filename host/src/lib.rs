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
//! - [`deliverer`]: where queued reconciles go after commit.
//! - [`auth`], [`clock`], [`model`], [`telemetry`]: tokens, time, the
//!   contract's data on the host side, logging.

pub mod auth;
pub mod chain;
pub mod clock;
pub mod config;
pub mod deliverer;
pub mod engine;
pub mod executor;
pub mod http;
pub mod model;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::chain::Chain;
use crate::clock::Clock;
use crate::deliverer::Deliverer;
use crate::engine::Engine;
use crate::executor::Executor;
use crate::store::{SqliteStore, Store};

/// Everything needed to run the service.
pub struct ServiceOptions {
    /// The SQLite database file.
    pub db: PathBuf,
    /// The chain and the directory its relative module paths are under;
    /// `None` uses the built-in chain.
    pub chain: Option<(chain::ChainSpec, PathBuf)>,
    pub clock: Arc<dyn Clock>,
    pub deliverer: Arc<dyn Deliverer>,
    pub server: http::ServerConfig,
}

impl ServiceOptions {
    /// The embedded default: built-in chain, system clock, runs left queued.
    pub fn new(db: impl Into<PathBuf>) -> ServiceOptions {
        ServiceOptions {
            db: db.into(),
            chain: None,
            clock: Arc::new(clock::SystemClock),
            deliverer: Arc::new(deliverer::QueueOnly),
            server: http::ServerConfig::default(),
        }
    }
}

/// Open the store at `path`.
pub fn open_store(path: &Path) -> anyhow::Result<Arc<dyn Store>> {
    let store = SqliteStore::open(path)
        .with_context(|| format!("opening the database `{}`", path.display()))?;
    Ok(Arc::new(store))
}

/// Build the engine, load the chain and open the store.
pub fn build_executor(opts: &ServiceOptions) -> anyhow::Result<Arc<Executor>> {
    let engine = Engine::new().context("creating the WebAssembly engine")?;
    let chain = match &opts.chain {
        Some((spec, base)) => Chain::from_spec(&engine, spec, base)?,
        None => Chain::builtin(&engine)?,
    };
    tracing::info!(
        chain_version = %chain.version,
        slots = ?chain.slots.iter().map(|s| format!("{}={}@{}", s.name, s.module.metadata().name, &s.module.digest()[..12])).collect::<Vec<_>>(),
        "chain loaded"
    );
    let store = open_store(&opts.db)?;
    Ok(Arc::new(Executor::new(
        store,
        chain,
        opts.clock.clone(),
        opts.deliverer.clone(),
    )))
}

/// Run the service on `listener` until `shutdown` completes.
pub async fn run(
    listener: tokio::net::TcpListener,
    opts: ServiceOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let executor = tokio::task::block_in_place(|| build_executor(&opts))?;
    let app = Arc::new(http::App::new(executor, opts.server.clone()));
    tracing::info!(addr = %listener.local_addr()?, "serving");
    http::serve(listener, app, shutdown).await?;
    Ok(())
}
