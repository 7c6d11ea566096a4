//! The `heartgate` command: the service and its operator CLI.
//!
//! Every command works on the database named by `--db` or `HEARTGATE_DB`
//! (default `heartgate.db` in the working directory), also while the service
//! runs on it.

mod cli;

use anyhow::Result;
use clap::Parser;

use heartgate::clock::{Clock, SystemClock};
use heartgate::telemetry;
use heartgate::{open_existing_store, open_store};

use cli::args::{Cli, Command, ConfigCommand, WorkspaceCommand};
use cli::author::{Local, local_policy};
use cli::operator::{db, db_or_default, reconcile, token, workspace};
use cli::remote::policy;
use cli::serve::{config_check, serve};

/// Where the admin API is unless `--server`/`HEARTGATE_SERVER` says.
const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// A heartbeat allocates and frees many small objects on two threads at
/// once (the request, the guests' inputs and outputs, the decision row):
/// mimalloc took the durable rate from 37-38k/s to 46-47k/s (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        // Its reader has what it wanted (`| head`).
        Err(e) if e.is::<cli::output::StdoutClosed>() => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::output::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let now = SystemClock.now_ms();
    let json = cli.json;
    match cli.command {
        Command::Serve {
            listen,
            config,
            watch,
        } => serve(cli.db, listen, config, watch),
        Command::Config(ConfigCommand::Check { file }) => config_check(&file, json),
        Command::Policy(command) => {
            // `--server`/`--as` after the command win over those before it
            // (and their environment variables).
            let after = command.remote().cloned().unwrap_or_default();
            let server = after.server.or(cli.server);
            let operator = after.operator.or(cli.operator);
            match local_policy(&db_or_default(cli.db), server.is_some(), json, command)? {
                Local::Done(code) => {
                    if code != 0 {
                        std::process::exit(code);
                    }
                    Ok(())
                }
                Local::Remote(command) => policy(
                    server.as_deref().unwrap_or(DEFAULT_SERVER),
                    operator,
                    json,
                    command,
                ),
            }
        }
        Command::Workspace(cmd) => {
            // Only `add` may create the database: a typo in `--db` is not
            // a new, empty fleet.
            let db = db_or_default(cli.db);
            let store = if matches!(cmd, WorkspaceCommand::Add { .. }) {
                open_store(db)?
            } else {
                open_existing_store(db)?
            };
            workspace(store.as_ref(), cmd, now, json)
        }
        Command::Token(cmd) => token(&db_or_default(cli.db), cmd, now, json),
        Command::Db(cmd) => db(&db_or_default(cli.db), cmd, json),
        Command::Reconcile(cmd) => reconcile(&db_or_default(cli.db), cmd, json),
    }
}
