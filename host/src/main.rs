//! The `heartgate` command: the service and its operator CLI.
//!
//! Every command works on the database named by `--db` or `HEARTGATE_DB`
//! (default `heartgate.db` in the working directory), also while the service
//! runs on it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use heartgate::clock::{Clock, SystemClock};
use heartgate::config::ConfigFile;
use heartgate::model::{Status, WorkspaceKind};
use heartgate::store::{NewWorkspace, Store};
use heartgate::telemetry::{self, LogFormat};
use heartgate::{ServiceOptions, auth, open_store};

/// A heartbeat allocates and frees many small objects on two threads at
/// once (the request, the guests' inputs and outputs, the decision row):
/// mimalloc took the durable rate from 37-38k/s to 46-47k/s (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "heartgate",
    version,
    about = "Agent-fleet liveness decided by sandboxed WebAssembly policies"
)]
struct Cli {
    /// The database: a SQLite file, or a `postgres://` URL for several
    /// hosts [default: `database` of the config, or heartgate.db].
    #[arg(long, global = true, env = "HEARTGATE_DB")]
    db: Option<PathBuf>,
    /// Log format (`RUST_LOG` sets the levels).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "HEARTGATE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Export spans over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT, default
    /// http://localhost:4318).
    #[cfg(feature = "otel")]
    #[arg(long, global = true)]
    otel: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// Address to listen on [default: `listen` of the config, or
        /// 127.0.0.1:8080].
        #[arg(long, env = "HEARTGATE_LISTEN")]
        listen: Option<SocketAddr>,
        /// Configuration file (TOML); flags and their environment variables
        /// override its keys.
        #[arg(long, env = "HEARTGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Watch a directory for `<slot>.wasm` files and activate each new or
        /// changed one in its slot, after the same validation as a push.
        #[arg(long)]
        watch: Option<PathBuf>,
    },
    /// Validate configuration files without starting anything.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Provision and inspect workspaces.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Issue and revoke workspace tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect reconcile runs.
    #[command(subcommand)]
    Reconcile(ReconcileCommand),
    /// The database itself.
    #[command(subcommand)]
    Db(DbCommand),
    /// Write, build, test and replay policies locally (new, build, test,
    /// eval MODULE, replay), and change the policy chain of a running service
    /// (list, push, stage, activate, rollback, eval, shadow: admin API, the
    /// token comes from `HEARTGATE_ADMIN_TOKEN`).
    Policy {
        /// The running service.
        #[arg(
            long,
            global = true,
            env = "HEARTGATE_SERVER",
            default_value = "http://127.0.0.1:8080"
        )]
        server: String,
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Create a policy crate NAME (in the current directory) on the guest SDK:
    /// a sample rule, native tests and fixtures.
    New {
        name: String,
        /// The directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The guest SDK crate (`policies/sdk` of a Heartgate checkout)
        /// [default: the checkout this binary was built from].
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build the policy crate in DIR (default: the current directory) into a
    /// component, validated as the service would: `<package>.wasm`.
    Build {
        dir: Option<PathBuf>,
        /// Where to write the component.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run fixture files through a module (or `builtin:NAME`), or a whole
    /// chain, in the service's sandbox and limits; exits 1 on a failure.
    Test {
        /// The module; optional with `--chain`.
        #[arg(required_unless_present = "chain")]
        module: Option<String>,
        /// The fixtures directory (*.json, *.yaml).
        #[arg(long, default_value = "fixtures")]
        fixtures: PathBuf,
        /// Run the fixtures through the chain of this file (a chain or a
        /// config file); MODULE, if given, runs in `--slot`.
        #[arg(long)]
        chain: Option<PathBuf>,
        /// The slot of `--chain` MODULE replaces.
        #[arg(long, requires = "chain")]
        slot: Option<String>,
    },
    /// Replay recorded decisions of `--db` with a candidate module in one
    /// slot of the chain that made them; report every decision that would
    /// change.
    Replay {
        /// The candidate module.
        #[arg(long)]
        candidate: String,
        /// The slot the candidate replaces.
        #[arg(long)]
        slot: String,
        /// Only decisions of the last DURATION (e.g. 30m, 24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Replay through this chain file instead of the recorded chain.
        #[arg(long)]
        chain: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Exit 1 when a decision would change (for CI gates).
        #[arg(long)]
        fail_on_change: bool,
    },
    /// Show the active chain.
    List,
    /// Upload a module; with `--slot`, stage the active chain with that slot
    /// running it (and `--activate` it).
    Push {
        module: PathBuf,
        #[arg(long)]
        slot: Option<String>,
        /// Add `--slot` as a new slot after this one (instead of replacing
        /// an existing slot).
        #[arg(long, requires = "slot")]
        after: Option<String>,
        /// What the slot may do (repeat): conditions, record_event,
        /// request_reconcile, markers, reject, set_status, drop [default: a
        /// replaced slot keeps its grants; a new one gets none].
        #[arg(long = "grant", requires = "slot", value_parser = ["conditions", "record_event", "request_reconcile", "markers", "reject", "set_status", "drop"])]
        grants: Vec<String>,
        #[arg(long, requires = "slot")]
        activate: bool,
    },
    /// Stage a chain from a JSON file: `{"slot": [...], "fixtures": [...]}`.
    Stage { file: PathBuf },
    /// Delete every pushed module that no stored chain uses (the module
    /// store has a quota: `[policy] max_stored_modules`).
    Prune,
    /// Activate a staged chain.
    Activate { id: i64 },
    /// Go back to the chain active before the current one.
    Rollback,
    /// Evaluate an input (JSON file, or a fixture) without effects: with
    /// MODULE or a chain file, locally; otherwise by the running service.
    Eval {
        /// A module (or `builtin:NAME`) to evaluate locally.
        module: Option<String>,
        #[arg(long)]
        input: PathBuf,
        /// A chain file to evaluate locally (MODULE runs in `--slot`), or the
        /// id of a chain stored in the running service.
        #[arg(long)]
        chain: Option<String>,
        /// The slot of `--chain` MODULE replaces.
        #[arg(long, requires = "chain")]
        slot: Option<String>,
        /// Show each policy's input, proposed actions and output.
        #[arg(long)]
        trace: bool,
    },
    /// Run a stored chain beside the active one (no effects), show what it
    /// saw, or stop it.
    Shadow {
        id: Option<i64>,
        #[arg(long, conflicts_with = "id")]
        stop: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check FILE: its syntax, every key and value, and the chain it names
    /// (each module loaded and checked). Prints `ok: FILE` or the first error
    /// with its key and line, and exits 1.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum WorkspaceCommand {
    /// Provision a workspace (status `provisioning`).
    Add {
        id: String,
        #[arg(long, value_parser = ["workspace", "platform"], default_value = "workspace")]
        kind: String,
        #[arg(long, default_value = "")]
        name: String,
        /// A `MODEL` secret is configured for it.
        #[arg(long)]
        model_configured: bool,
        /// The runtime it runs (`external` is an agent outside the platform;
        /// policies see the name).
        #[arg(long, default_value = "")]
        runtime: String,
    },
    /// Print one workspace as JSON: what `GET /workspaces/{id}` answers
    /// (status, url, agent card, active tasks, uptime, current task, last
    /// error rate, ...), with the conditions in force, plugins and tokens.
    Show { id: String },
    /// Replace the workspace's platform inbound secret with a new random
    /// one (the old one stops being handed out at once; the runtime gets
    /// the new one in its next register or heartbeat response). The secret
    /// is not printed.
    RotateInboundSecret { id: String },
    /// Why the workspace is in its state: its last decisions with each
    /// policy's output, the status transitions, the reconcile runs and their
    /// outcomes, in order.
    Explain {
        id: String,
        /// How many decisions (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// The history as JSON (what `GET /admin/workspaces/{id}/history` answers).
        #[arg(long)]
        json: bool,
    },
    /// Print every workspace, one JSON object a line.
    List,
    /// Declare a plugin the workspace must have.
    DeclarePlugin {
        id: String,
        name: String,
        source: String,
    },
    /// Mark a workspace removed: heartbeats and registers never change it again.
    Remove { id: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a token and print it (shown once).
    Issue { id: String },
    /// Revoke every live token of a workspace. It then refuses every
    /// request (401) until a token is issued; with `--allow-bootstrap`, the
    /// next register without a token mints one instead, as for a workspace
    /// that never had a token.
    Revoke {
        id: String,
        #[arg(long)]
        allow_bootstrap: bool,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Copy the database to FILE (which must not exist), consistent as of one
    /// moment, with SQLite's online backup API: safe while the service runs
    /// and writes. The copy is checked (`PRAGMA quick_check`) before it takes
    /// its name.
    Backup { file: PathBuf },
}

#[derive(Subcommand)]
enum ReconcileCommand {
    /// Print reconcile runs, one JSON object a line.
    List {
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Print one run: times, per-plugin results, the cause of a failure.
    Show { id: i64 },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "otel")]
    let _otel = if cli.otel {
        match telemetry::init_with_otel(cli.log_format) {
            Ok(guard) => Some(guard),
            Err(e) => {
                eprintln!("error: starting the OpenTelemetry exporter: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
    } else {
        telemetry::init(cli.log_format);
        None
    };
    #[cfg(not(feature = "otel"))]
    telemetry::init(cli.log_format);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let now = SystemClock.now_ms();
    match cli.command {
        Command::Serve {
            listen,
            config,
            watch,
        } => serve(cli.db, listen, config, watch),
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::Policy { server, command } => match local_policy(&db_or_default(cli.db), command)?
        {
            Local::Done(code) => {
                if code != 0 {
                    std::process::exit(code);
                }
                Ok(())
            }
            Local::Remote(command) => policy(&server, command),
        },
        Command::Workspace(cmd) => {
            let store = open_store(db_or_default(cli.db))?;
            workspace(store.as_ref(), cmd, now)
        }
        Command::Token(cmd) => {
            let store = open_store(db_or_default(cli.db))?;
            match cmd {
                TokenCommand::Issue { id } => {
                    let token = auth::mint().context("minting a token")?;
                    store.issue_token(&id, &token.stored, now)?;
                    println!("{}", token.plaintext);
                }
                TokenCommand::Revoke {
                    id,
                    allow_bootstrap,
                } => {
                    let n = store.revoke_tokens(&id, now, allow_bootstrap)?;
                    if allow_bootstrap {
                        eprintln!(
                            "revoked {n} token(s) of `{id}`; its next register without a token mints one"
                        );
                    } else {
                        eprintln!(
                            "revoked {n} token(s) of `{id}`; it refuses every request until `heartgate token issue {id}`"
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Db(DbCommand::Backup { file }) => {
            let db = db_or_default(cli.db);
            if heartgate::Database::from(&db).is_postgres() {
                bail!(
                    "`heartgate db backup` copies a SQLite file; back up a PostgreSQL database with its own tools (pg_dump, or continuous archiving)"
                );
            }
            if !db.is_file() {
                bail!("no database at {}", db.display());
            }
            let store = open_store(&db)?;
            let backup = store
                .backup(&file)
                .with_context(|| format!("backing up {} to {}", db.display(), file.display()))?;
            print_json(&backup)?;
            Ok(())
        }
        Command::Reconcile(cmd) => {
            let store = open_store(db_or_default(cli.db))?;
            match cmd {
                ReconcileCommand::List { workspace } => {
                    for run in store.reconcile_runs(workspace.as_deref())? {
                        print_json(&run)?;
                    }
                }
                ReconcileCommand::Show { id } => match store.reconcile_run(id)? {
                    Some(run) => println!("{}", serde_json::to_string_pretty(&run)?),
                    None => bail!("no reconcile run {id}"),
                },
            }
            Ok(())
        }
    }
}

fn workspace(store: &dyn Store, cmd: WorkspaceCommand, now: i64) -> Result<()> {
    match cmd {
        WorkspaceCommand::Add {
            id,
            kind,
            name,
            model_configured,
            runtime,
        } => {
            let kind = WorkspaceKind::parse(&kind).context("kind must be workspace or platform")?;
            store.add_workspace(
                &NewWorkspace {
                    id,
                    name,
                    kind,
                    model_configured,
                    runtime,
                },
                now,
            )?;
        }
        WorkspaceCommand::Explain { id, limit, json } => {
            if !(1..=heartgate::history::MAX_DECISIONS).contains(&limit) {
                bail!("--limit must be 1-{}", heartgate::history::MAX_DECISIONS);
            }
            let Some(history) = heartgate::history::history(store, &id, limit)? else {
                bail!("unknown workspace `{id}`");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&history)?);
            } else {
                print!("{}", heartgate::history::explain(&history));
            }
        }
        WorkspaceCommand::Show { id } => match store.workspace(&id)? {
            // What `GET /workspaces/{id}` answers, and what only the
            // operator sees (conditions, plugins, tokens, register failure).
            Some(rec) => {
                let mut shown = serde_json::to_value(&rec)?;
                if let (Some(all), serde_json::Value::Object(public)) = (
                    shown.as_object_mut(),
                    heartgate::admin::workspace_view(&rec),
                ) {
                    all.extend(public);
                }
                print_json(&shown)?
            }
            None => bail!("unknown workspace `{id}`"),
        },
        WorkspaceCommand::RotateInboundSecret { id } => {
            let secret = heartgate::auth::InboundSecret::mint()
                .map_err(|e| anyhow::anyhow!("minting a secret: {e}"))?;
            store.rotate_inbound_secret(&id, &secret, now)?;
            println!(
                "rotated the platform inbound secret of `{id}`; its runtime receives the new one with its next register or heartbeat"
            );
        }
        WorkspaceCommand::List => {
            for rec in store.workspaces()? {
                print_json(&rec)?;
            }
        }
        WorkspaceCommand::DeclarePlugin { id, name, source } => {
            if name.is_empty() || source.is_empty() {
                bail!("plugin name and source must be non-empty");
            }
            store.declare_plugin(&id, &name, &source, now)?;
        }
        WorkspaceCommand::Remove { id } => store.set_status(&id, Status::Removed, now)?,
    }
    Ok(())
}

/// The database named by `--db` or `HEARTGATE_DB`, or the default.
fn db_or_default(db: Option<PathBuf>) -> PathBuf {
    db.unwrap_or_else(|| PathBuf::from(DEFAULT_DB))
}

const DEFAULT_DB: &str = "heartgate.db";

/// The directory relative paths of the config file `path` are taken from.
fn config_base(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `heartgate config check FILE`.
fn config_check(path: &Path) -> Result<()> {
    let file = ConfigFile::load(path)?;
    let base = config_base(path);
    if let Some(spec) = &file.chain {
        let engine = heartgate::engine::Engine::new()?;
        heartgate::chain::Chain::from_spec(&engine, spec, &base, &|_| None)
            .map_err(|e| anyhow::anyhow!("`{}`: chain: {e}", path.display()))?;
    }
    println!("ok: {}", path.display());
    Ok(())
}

fn serve(
    db: Option<PathBuf>,
    listen: Option<SocketAddr>,
    config: Option<PathBuf>,
    watch: Option<PathBuf>,
) -> Result<()> {
    let mut addr: SocketAddr = ([127, 0, 0, 1], 8080).into();
    let mut opts = ServiceOptions::new(DEFAULT_DB);
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
        println!("heartgate listening on http://{}", listener.local_addr()?);
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
const ABANDONED_WORK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves at the first SIGTERM or ctrl-c. The handlers are installed when
/// this is called, before the service starts: a signal that arrives while the
/// policies still compile stops the service cleanly once it is up, instead of
/// killing it by the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
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

/// One admin API call; prints nothing, returns the JSON answer or the error.
async fn admin_call(
    client: &heartgate::deliverer::HttpClient,
    server: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<serde_json::Value> {
    use http_body_util::BodyExt;
    let token = std::env::var("HEARTGATE_ADMIN_TOKEN")
        .context("set HEARTGATE_ADMIN_TOKEN to the service's admin token")?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", server.trim_end_matches('/')))
        .header("authorization", format!("Bearer {token}"))
        .header(
            "x-heartgate-operator",
            std::env::var("USER").unwrap_or_else(|_| "cli".into()),
        )
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let resp = client
        .request(req)
        .await
        .with_context(|| format!("calling {server}"))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        bail!(
            "{method} {path}: HTTP {status}: {}",
            value["error"].as_str().unwrap_or("no details")
        );
    }
    Ok(value)
}

fn policy(server: &str, command: PolicyCommand) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = heartgate::deliverer::http_client();
        let call = |method: &'static str, path: String, body: Vec<u8>| {
            let client = client.clone();
            async move { admin_call(&client, server, method, &path, body).await }
        };
        let out = match command {
            PolicyCommand::List => call("GET", "/admin/chain".into(), Vec::new()).await?,
            PolicyCommand::Push {
                module,
                slot,
                after,
                grants,
                activate,
            } => {
                let bytes = std::fs::read(&module)
                    .with_context(|| format!("reading {}", module.display()))?;
                let pushed = call("POST", "/admin/modules".into(), bytes).await?;
                match slot {
                    None => pushed,
                    Some(slot) => {
                        let active = call("GET", "/admin/chain".into(), Vec::new()).await?;
                        let mut spec = active["spec"].clone();
                        let slots = spec["slot"]
                            .as_array_mut()
                            .context("the service returned no chain spec")?;
                        let exists = slots.iter().any(|s| s["name"] == slot.as_str());
                        match &after {
                            Some(_) if exists => {
                                bail!("the active chain already has a slot `{slot}`; drop --after to replace it")
                            }
                            Some(prev) => {
                                let at = slots
                                    .iter()
                                    .position(|s| s["name"] == prev.as_str())
                                    .with_context(|| {
                                        format!("the active chain has no slot `{prev}`")
                                    })?;
                                slots.insert(
                                    at + 1,
                                    serde_json::json!({"name": slot, "module": pushed["module"]}),
                                );
                            }
                            None if !exists => bail!(
                                "the active chain has no slot `{slot}`; add it with --after SLOT"
                            ),
                            None => {}
                        }
                        let target = slots
                            .iter_mut()
                            .find(|s| s["name"] == slot.as_str())
                            .with_context(|| format!("the active chain has no slot `{slot}`"))?;
                        target["module"] = pushed["module"].clone();
                        if !grants.is_empty() || after.is_some() {
                            target["grants"] = serde_json::json!(grants);
                        }
                        let staged =
                            call("POST", "/admin/chains".into(), serde_json::to_vec(&spec)?)
                                .await?;
                        if activate {
                            let id = staged["id"].as_i64().context("no chain id")?;
                            call("POST", format!("/admin/chains/{id}/activate"), Vec::new()).await?
                        } else {
                            staged
                        }
                    }
                }
            }
            PolicyCommand::Stage { file } => {
                let body =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                call("POST", "/admin/chains".into(), body).await?
            }
            PolicyCommand::Prune => {
                call("POST", "/admin/modules/prune".into(), Vec::new()).await?
            }
            PolicyCommand::Activate { id } => {
                call("POST", format!("/admin/chains/{id}/activate"), Vec::new()).await?
            }
            PolicyCommand::Rollback => {
                call("POST", "/admin/chains/rollback".into(), Vec::new()).await?
            }
            PolicyCommand::Eval { input, chain, .. } => {
                let chain: Option<i64> = chain
                    .map(|c| c.parse())
                    .transpose()
                    .context("--chain of a running service is a stored chain id")?;
                let input: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(&input)
                        .with_context(|| format!("reading {}", input.display()))?,
                )
                .context("the input file is not JSON")?;
                let body = serde_json::json!({"input": input, "chain": chain});
                call("POST", "/admin/eval".into(), serde_json::to_vec(&body)?).await?
            }
            PolicyCommand::Shadow { id, stop } => match (id, stop) {
                (Some(id), _) => {
                    let body = serde_json::json!({"chain": id});
                    call("POST", "/admin/shadow".into(), serde_json::to_vec(&body)?).await?
                }
                (None, true) => call("DELETE", "/admin/shadow".into(), Vec::new()).await?,
                (None, false) => call("GET", "/admin/shadow".into(), Vec::new()).await?,
            },
            PolicyCommand::New { .. }
            | PolicyCommand::Build { .. }
            | PolicyCommand::Test { .. }
            | PolicyCommand::Replay { .. } => {
                bail!("internal: a local command reached the admin API")
            }
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    })
}

/// A `policy` subcommand run here, or one for the running service.
enum Local {
    /// Run here; the process's exit code.
    Done(i32),
    Remote(PolicyCommand),
}

/// Run the author's commands (new, build, test, local eval, replay) here;
/// hand the others back for the admin API.
fn local_policy(db: &Path, command: PolicyCommand) -> Result<Local> {
    use heartgate::authoring::{self, compile, fixtures, replay, template, trace};
    use heartgate::engine::Engine;

    match command {
        PolicyCommand::New { name, dir, sdk } => {
            let sdk = sdk.unwrap_or_else(|| PathBuf::from(template::DEFAULT_SDK));
            let files = template::create(&dir, &name, &sdk)?;
            println!("created policy `{name}` in {}", dir.join(&name).display());
            for f in files {
                println!("  {}", f.display());
            }
            println!(
                "next: cd {} && cargo test && heartgate policy build && heartgate policy test {name}.wasm",
                dir.join(&name).display()
            );
            Ok(Local::Done(0))
        }
        PolicyCommand::Build { dir, out } => {
            let engine = Engine::new()?;
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let built = compile::build(&engine, &dir, out.as_deref())?;
            println!(
                "built {} {} -> {} ({} bytes, sha256:{})",
                built.metadata.name,
                built.metadata.version,
                built.path.display(),
                built.bytes,
                built.digest
            );
            Ok(Local::Done(0))
        }
        PolicyCommand::Test {
            module,
            fixtures: dir,
            chain,
            slot,
        } => {
            let engine = Engine::new()?;
            let (chain, whole) = authoring::local_chain(
                &engine,
                chain.as_deref(),
                module.as_deref(),
                slot.as_deref(),
            )?;
            let cases = fixtures::load_dir(&dir)?;
            let what: Vec<String> = chain
                .slots
                .iter()
                .map(|s| {
                    let m = s.module.metadata();
                    format!("{} {}", m.name, m.version)
                })
                .collect();
            println!(
                "\nrunning {} fixture{} from {} against {}\n",
                cases.len(),
                if cases.len() == 1 { "" } else { "s" },
                dir.display(),
                what.join(" -> ")
            );
            let report = fixtures::run(&chain, &cases, whole);
            print!("{}", report.render());
            Ok(Local::Done(i32::from(report.failed() > 0)))
        }
        PolicyCommand::Eval {
            module,
            input,
            chain,
            slot,
            trace: with_trace,
        } => {
            let chain_file = chain
                .as_deref()
                .filter(|c| c.parse::<i64>().is_err())
                .map(PathBuf::from);
            if module.is_none() && chain_file.is_none() {
                if with_trace {
                    bail!("--trace needs a local evaluation: give a MODULE or a chain file");
                }
                return Ok(Local::Remote(PolicyCommand::Eval {
                    module,
                    input,
                    chain,
                    slot,
                    trace: with_trace,
                }));
            }
            let engine = Engine::new()?;
            let (chain, whole) = authoring::local_chain(
                &engine,
                chain_file.as_deref(),
                module.as_deref(),
                slot.as_deref(),
            )?;
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let yaml = input.extension().is_some_and(|e| e == "yaml" || e == "yml");
            let (input_value, proposed) = trace::read_input(&text, yaml)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let out = trace::eval(&chain, &input_value, proposed, whole, with_trace);
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(Local::Done(0))
        }
        PolicyCommand::Replay {
            candidate,
            slot,
            since,
            chain,
            json,
            fail_on_change,
        } => {
            if !heartgate::Database::from(db).is_postgres() && !db.is_file() {
                bail!(
                    "no database at {}; pass the service's with --db",
                    db.display()
                );
            }
            let since_ms = match since {
                Some(d) => {
                    let span = heartgate::clock::parse_duration_ms(&d)
                        .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
                    SystemClock.now_ms().saturating_sub(span)
                }
                None => 0,
            };
            let engine = Engine::new()?;
            let candidate = authoring::load_module(&engine, &candidate)?;
            let chain = chain.map(|f| authoring::read_chain_file(&f)).transpose()?;
            let store = open_store(db)?;
            let report = replay::replay(
                &engine,
                store.as_ref(),
                &replay::ReplayOptions {
                    candidate: &candidate,
                    slot: &slot,
                    since_ms,
                    chain,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", replay::render(&report));
            }
            Ok(Local::Done(i32::from(
                fail_on_change && !report.changed.is_empty(),
            )))
        }
        other => Ok(Local::Remote(other)),
    }
}
