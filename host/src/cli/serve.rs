//! `heartgate serve` and `heartgate config check`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use heartgate::ServiceOptions;
use heartgate::config::ConfigFile;

use super::operator::DEFAULT_DB;
use super::output::say;

/// The directory relative paths of the config file `path` are taken from.
pub(crate) fn config_base(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `heartgate config check FILE`.
pub(crate) fn config_check(path: &Path, json: bool) -> Result<()> {
    let file = ConfigFile::load(path)?;
    let base = config_base(path);
    if let Some(spec) = &file.chain {
        let engine = super::author::engine()?;
        heartgate::chain::Chain::from_spec(&engine, spec, &base, &|_| None).map_err(|e| {
            match heartgate::authoring::error_line(path, &e) {
                Some(line) => anyhow::anyhow!("`{}`: line {line}: chain: {e}", path.display()),
                None => anyhow::anyhow!("`{}`: chain: {e}", path.display()),
            }
        })?;
    }
    let shown = path.display().to_string();
    super::output::emit(
        json,
        &serde_json::json!({"ok": true, "file": shown}),
        |_| format!("ok: {shown}"),
    )
}

pub(crate) fn serve(
    db: Option<PathBuf>,
    listen: Option<SocketAddr>,
    config: Option<PathBuf>,
    watch: Option<PathBuf>,
) -> Result<()> {
    let mut addr: SocketAddr = ([127, 0, 0, 1], 8080).into();
    let mut opts = ServiceOptions::new(DEFAULT_DB);
    opts.module_cache = heartgate::engine::default_module_cache_dir();
    if let Some(path) = &config {
        let file = ConfigFile::load(path)?;
        if let Some(a) = file.listen {
            addr = a;
        }
        let base = config_base(path);
        if let Some(database) = &file.database {
            opts.db = match heartgate::Database::from(database) {
                url @ heartgate::Database::Postgres(_) => url,
                heartgate::Database::Sqlite(path) => heartgate::Database::Sqlite(base.join(path)),
            };
        }
        file.apply(&mut opts, &base);
    }
    if let Some(db) = db {
        opts.db = db.into();
    }
    opts.watch_dir = watch;
    if let Some(a) = listen {
        addr = a;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(async move {
        let shutdown = shutdown_signal();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        // One line on stdout saying where to connect (port 0 picks a free one).
        say!("heartgate listening on http://{}", listener.local_addr()?)?;
        heartgate::run(listener, opts, shutdown).await
    });
    // `run` has answered the in-flight requests and stopped the reconcile
    // worker, which abandons its runs in flight (durable, re-queued at the
    // next start). Dropping the runtime would wait for their blocking work
    // (a restart hook, a git clone) up to its own time limit; don't.
    runtime.shutdown_timeout(ABANDONED_WORK_GRACE);
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// How long the exit waits for blocking work abandoned at shutdown.
pub(crate) const ABANDONED_WORK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves at the first SIGTERM or ctrl-c. The handlers are installed when
/// this is called, before the service starts: a signal that arrives while the
/// policies still compile stops the service cleanly once it is up, instead of
/// killing it by the default action.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (term, int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    };
    async move {
        #[cfg(unix)]
        {
            // A handler that could not be installed never fires.
            let received = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
                match s {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = received(term) => {},
                () = received(int) => {},
            }
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
    }
}
