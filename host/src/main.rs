//! The `heartgate` command: the service and its operator CLI.
//!
//! Every command works on the database named by `--db` or `HEARTGATE_DB`
//! (default `heartgate.db` in the working directory), also while the service
//! runs on it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use heartgate::clock::{Clock, SystemClock};
use heartgate::config::ConfigFile;
use heartgate::model::{Status, WorkspaceKind};
use heartgate::store::{NewWorkspace, Store};
use heartgate::telemetry::{self, LogFormat};
use heartgate::{ServiceOptions, auth, open_store};

#[derive(Parser)]
#[command(
    name = "heartgate",
    version,
    about = "Agent-fleet liveness decided by sandboxed WebAssembly policies"
)]
struct Cli {
    /// The SQLite database file.
    #[arg(
        long,
        global = true,
        env = "HEARTGATE_DB",
        default_value = "heartgate.db"
    )]
    db: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// Address to listen on [default: 127.0.0.1:8080, or `listen` of the config].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Watch a directory for `<slot>.wasm` files and activate each new or
        /// changed one in its slot, after the same validation as a push.
        #[arg(long)]
        watch: Option<PathBuf>,
    },
    /// Provision and inspect workspaces.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Issue and revoke workspace tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect reconcile runs.
    #[command(subcommand)]
    Reconcile(ReconcileCommand),
    /// Change the policy chain of a running service (admin API; the token
    /// comes from `HEARTGATE_ADMIN_TOKEN`).
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
    /// Show the active chain.
    List,
    /// Upload a module; with `--slot`, stage the active chain with that slot
    /// running it (and `--activate` it).
    Push {
        module: PathBuf,
        #[arg(long)]
        slot: Option<String>,
        #[arg(long, requires = "slot")]
        activate: bool,
    },
    /// Stage a chain from a JSON file: `{"slot": [...], "fixtures": [...]}`.
    Stage { file: PathBuf },
    /// Activate a staged chain.
    Activate { id: i64 },
    /// Go back to the chain active before the current one.
    Rollback,
    /// Evaluate an input (JSON file) without effects.
    Eval {
        #[arg(long)]
        input: PathBuf,
        /// A stored chain instead of the active one.
        #[arg(long)]
        chain: Option<i64>,
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
    },
    /// Print one workspace as JSON.
    Show { id: String },
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
    /// Revoke every live token of a workspace.
    Revoke { id: String },
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
        Command::Policy { server, command } => policy(&server, command),
        Command::Workspace(cmd) => {
            let store = open_store(&cli.db)?;
            workspace(store.as_ref(), cmd, now)
        }
        Command::Token(cmd) => {
            let store = open_store(&cli.db)?;
            match cmd {
                TokenCommand::Issue { id } => {
                    let token = auth::mint().context("minting a token")?;
                    store.issue_token(&id, &token.stored, now)?;
                    println!("{}", token.plaintext);
                }
                TokenCommand::Revoke { id } => {
                    let n = store.revoke_tokens(&id, now)?;
                    eprintln!("revoked {n} token(s) of `{id}`");
                }
            }
            Ok(())
        }
        Command::Reconcile(cmd) => {
            let store = open_store(&cli.db)?;
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
        } => {
            let kind = WorkspaceKind::parse(&kind).context("kind must be workspace or platform")?;
            store.add_workspace(
                &NewWorkspace {
                    id,
                    name,
                    kind,
                    model_configured,
                },
                now,
            )?;
        }
        WorkspaceCommand::Show { id } => match store.workspace(&id)? {
            Some(rec) => print_json(&rec)?,
            None => bail!("unknown workspace `{id}`"),
        },
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

fn serve(
    db: PathBuf,
    listen: Option<SocketAddr>,
    config: Option<PathBuf>,
    watch: Option<PathBuf>,
) -> Result<()> {
    let mut opts = ServiceOptions::new(db);
    opts.watch_dir = watch;
    let mut addr: SocketAddr = ([127, 0, 0, 1], 8080).into();
    if let Some(path) = &config {
        let file = ConfigFile::load(path)?;
        if let Some(a) = file.listen {
            addr = a;
        }
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        file.apply(&mut opts, &base);
    }
    if let Some(a) = listen {
        addr = a;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        // One line on stdout saying where to connect (port 0 picks a free one).
        println!("heartgate listening on http://{}", listener.local_addr()?);
        heartgate::run(listener, opts, shutdown_signal()).await
    })?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
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
                        let target = slots
                            .iter_mut()
                            .find(|s| s["name"] == slot.as_str())
                            .with_context(|| format!("the active chain has no slot `{slot}`"))?;
                        target["module"] = pushed["module"].clone();
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
            PolicyCommand::Activate { id } => {
                call("POST", format!("/admin/chains/{id}/activate"), Vec::new()).await?
            }
            PolicyCommand::Rollback => {
                call("POST", "/admin/chains/rollback".into(), Vec::new()).await?
            }
            PolicyCommand::Eval { input, chain } => {
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
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    })
}
