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
        Command::Serve { listen, config } => serve(cli.db, listen, config),
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

fn serve(db: PathBuf, listen: Option<SocketAddr>, config: Option<PathBuf>) -> Result<()> {
    let mut opts = ServiceOptions::new(db);
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
