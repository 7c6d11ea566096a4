//! The command line: every command, argument and its help.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand};

use heartgate::chain::Grant;

use heartgate::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "heartgate",
    version,
    about = "Agent-fleet liveness decided by sandboxed WebAssembly policies"
)]
pub(crate) struct Cli {
    /// The database: a SQLite file, or a `postgres://` URL for several
    /// hosts [default: `database` of the config, or heartgate.db].
    #[arg(long, global = true, env = "HEARTGATE_DB")]
    pub db: Option<PathBuf>,
    /// Log format (`RUST_LOG` sets the levels).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "HEARTGATE_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Print data as JSON instead of text: one JSON document, or for the
    /// lists that stream (`workspace list`, `reconcile list`) one JSON
    /// object a line.
    #[arg(long, global = true)]
    pub json: bool,
    /// The running service, for the `policy` commands that call its admin
    /// API (each takes `--server` after it too) [default:
    /// http://127.0.0.1:8080].
    #[arg(long, env = "HEARTGATE_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// Who you are, recorded with every change you make through the admin
    /// API (each such command takes `--as` after it too) [default: `$USER`,
    /// or `$LOGNAME`, or `uid N`].
    #[arg(long = "as", env = "HEARTGATE_OPERATOR", value_name = "NAME")]
    pub operator: Option<String>,
    /// Export spans over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT, default
    /// http://localhost:4318).
    #[cfg(feature = "otel")]
    #[arg(long, global = true)]
    pub otel: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    #[command(subcommand)]
    Policy(PolicyCommand),
}

/// `--server` and `--as` of a `policy` command that calls the running
/// service's admin API; given before the command too (`Cli`), where they
/// lose to these.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct Remote {
    /// The running service [default: `--server` before the command, or
    /// HEARTGATE_SERVER, or http://127.0.0.1:8080].
    #[arg(long = "server", value_name = "URL")]
    pub server: Option<String>,
    /// Who you are, recorded with what you change [default: `--as` before
    /// the command, or HEARTGATE_OPERATOR, or `$USER`, `$LOGNAME`, `uid N`].
    #[arg(long = "as", value_name = "NAME")]
    pub operator: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Create a policy crate NAME (in the current directory) on the guest SDK:
    /// a sample rule, native tests and fixtures.
    New {
        /// The policy's name (and its crate's): 1-64 of a-z, 0-9, `-`,
        /// starting with a letter.
        name: String,
        /// The directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The guest SDK crate (`policies/sdk` of a Heartgate checkout, or an
        /// unpacked copy), written into `Cargo.toml` as a path relative to
        /// the new crate [default: the checkout this binary was built from;
        /// if it is gone, `--sdk-version` of this binary's version].
        #[arg(long, value_name = "PATH")]
        sdk: Option<PathBuf>,
        /// Depend on the published crate `heartgate-policy` of this version
        /// (a Cargo version requirement, e.g. `0.1.0`) instead of an SDK on
        /// disk.
        #[arg(long, value_name = "VERSION", conflicts_with = "sdk")]
        sdk_version: Option<String>,
        /// A grant the policy will need (repeat), declared in its
        /// `Cargo.toml` (`[package.metadata.heartgate] grants`): conditions,
        /// record_event, request_reconcile, markers, reject, set_status, drop
        /// [default: what the sample rule needs: conditions, markers,
        /// record_event].
        #[arg(long = "grant", value_parser = PossibleValuesParser::new(Grant::ALL.map(Grant::as_str)))]
        grants: Vec<String>,
    },
    /// Build the policy crate in DIR (default: the current directory) into a
    /// component, validated as the service would: `<package>.wasm`.
    Build {
        /// The policy crate (holding its Cargo.toml) [default: .].
        dir: Option<PathBuf>,
        /// Where to write the component.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run fixture files through a module (or `builtin:NAME`), or a whole
    /// chain, in the service's sandbox and limits; exits 1 on a failure.
    Test {
        /// The module: a component file, or `builtin:NAME`; optional with
        /// `--chain`.
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
    /// change, and how many recorded evaluations were not replayed, and why
    /// (a coalesced decision keeps only its last heartbeat's input).
    Replay {
        /// The candidate module: a component file, or `builtin:NAME`.
        #[arg(long)]
        candidate: String,
        /// The slot the candidate replaces.
        #[arg(long)]
        slot: String,
        /// Only decisions of the last DURATION (e.g. 30m, 24h, 7d) [default:
        /// all the decision log keeps].
        #[arg(long)]
        since: Option<String>,
        /// Replay through this chain file instead of the recorded chain.
        #[arg(long)]
        chain: Option<PathBuf>,
        /// Exit 1 when a decision would change (for CI gates).
        #[arg(long)]
        fail_on_change: bool,
    },
    /// Show the active chain.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Upload a module; with `--slot`, stage the active chain with that slot
    /// running it (and `--activate` it).
    Push {
        /// The component file (`heartgate policy build` writes one).
        module: PathBuf,
        /// Stage the active chain with this slot running the module (an
        /// existing slot, or a new one with `--after`).
        #[arg(long)]
        slot: Option<String>,
        /// Add `--slot` as a new slot after this one (instead of replacing
        /// an existing slot).
        #[arg(long, requires = "slot")]
        after: Option<String>,
        /// What the slot may do (repeat): conditions, record_event,
        /// request_reconcile, markers, reject, set_status, drop [default: a
        /// replaced slot keeps its grants; a new one gets none].
        #[arg(long = "grant", requires = "slot", value_parser = PossibleValuesParser::new(Grant::ALL.map(Grant::as_str)))]
        grants: Vec<String>,
        /// Fixture files (*.json, *.yaml) the service runs through the slot
        /// with its real grants and limits before it stages the chain.
        #[arg(long, requires = "slot", value_name = "DIR")]
        fixtures: Option<PathBuf>,
        /// Activate the staged chain at once.
        #[arg(long, requires = "slot")]
        activate: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stage a chain from a JSON file: `{"slot": [...], "fixtures": [...]}`.
    Stage {
        /// The JSON file: `{"slot": [...], "fixtures": [...]}`.
        file: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete every pushed module that no stored chain uses (the module
    /// store has a quota: `[policy] max_stored_modules`).
    Prune {
        #[command(flatten)]
        remote: Remote,
    },
    /// Activate a staged chain.
    Activate {
        /// The stored chain (staged, or retired: `policy history` lists them).
        id: i64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Go back one step in the activation history: to the chain active
    /// before the current one was activated; a second rollback goes one
    /// step further back (never forward again: re-activate a chain by id).
    Rollback {
        #[command(flatten)]
        remote: Remote,
    },
    /// List the stored chains and the activation history (who activated or
    /// rolled back which chain, when, from which), newest first.
    History {
        /// How many chains and activations (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stage the active chain without slot SLOT (and `--activate` it).
    RemoveSlot {
        /// The slot to remove.
        slot: String,
        /// Activate the staged chain at once.
        #[arg(long)]
        activate: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Evaluate an input (JSON file, or a fixture) without effects: with
    /// MODULE or a chain file, locally; otherwise by the running service.
    Eval {
        /// A module (or `builtin:NAME`) to evaluate locally.
        module: Option<String>,
        /// The input: a JSON (or YAML) file of the fixture format, an
        /// `input` or a whole fixture.
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
        // The running service evaluates it when there is no MODULE or
        // chain file; then `--server` (or HEARTGATE_SERVER) is required.
        #[command(flatten)]
        remote: Remote,
    },
    /// Run a stored chain beside the active one (no effects), show what it
    /// saw, or stop it.
    Shadow {
        /// The stored chain to run in shadow [default: show what the
        /// running shadow saw].
        id: Option<i64>,
        /// Stop the shadow chain (on every host).
        #[arg(long, conflicts_with = "id")]
        stop: bool,
        #[command(flatten)]
        remote: Remote,
    },
}

impl PolicyCommand {
    /// The `--server` and `--as` given after the command (`None` for the
    /// local commands, which take neither).
    pub(crate) fn remote(&self) -> Option<&Remote> {
        match self {
            Self::List { remote }
            | Self::History { remote, .. }
            | Self::Push { remote, .. }
            | Self::Stage { remote, .. }
            | Self::Prune { remote }
            | Self::Activate { remote, .. }
            | Self::Rollback { remote }
            | Self::RemoveSlot { remote, .. }
            | Self::Eval { remote, .. }
            | Self::Shadow { remote, .. } => Some(remote),
            Self::New { .. } | Self::Build { .. } | Self::Test { .. } | Self::Replay { .. } => None,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check FILE: its syntax, every key and value, and the chain it names
    /// (each module loaded and checked). Prints `ok: FILE` or the first error
    /// with its key and line, and exits 1.
    Check {
        /// The configuration file (TOML).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum WorkspaceCommand {
    /// Provision a workspace (status `provisioning`).
    Add {
        /// The workspace's id, as its runtime sends it (`workspace_id`).
        id: String,
        /// `platform` for the privileged workspace whose management MCP
        /// server is required (the gate fails it closed without it).
        #[arg(long, value_parser = ["workspace", "platform"], default_value = "workspace")]
        kind: String,
        /// A display name.
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
    /// One workspace's facts: what `GET /workspaces/{id}` answers (status,
    /// url, agent card, active tasks, uptime, current task, last error rate,
    /// ...), with the conditions in force, plugins and tokens.
    Show {
        /// The workspace.
        id: String,
    },
    /// Wait until the workspace has one of the statuses of `--status` (for
    /// scripts and walk-throughs); exits 1 with the status it has if that
    /// takes longer than `--timeout`.
    Wait {
        /// The workspace.
        id: String,
        /// The status to wait for (repeat for any of several): provisioning,
        /// online, offline, degraded, failed, removed, paused, hibernated,
        /// hibernating, awaiting_agent.
        #[arg(long = "status", required = true, value_name = "STATUS")]
        statuses: Vec<String>,
        /// How long to wait at most (e.g. 30s, 2m).
        #[arg(long, default_value = "60s", value_name = "DURATION")]
        timeout: String,
    },
    /// Replace the workspace's platform inbound secret with a new random
    /// one (the old one stops being handed out at once; the runtime gets
    /// the new one in its next register or heartbeat response). The secret
    /// is not printed.
    RotateInboundSecret {
        /// The workspace.
        id: String,
    },
    /// Why the workspace is in its state: its last decisions with each
    /// policy's output, the status transitions, the reconcile runs and their
    /// outcomes, in order.
    Explain {
        /// The workspace.
        id: String,
        /// How many decisions (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Every workspace, as a table (`--json`: one JSON object a line).
    List,
    /// Declare a plugin the workspace must have (or change its source); the
    /// reconciler delivers it. The source is checked as the deliverer
    /// reads it.
    DeclarePlugin {
        /// The workspace.
        id: String,
        /// The plugin's name: 1-128 of a-z, 0-9, `.`, `_`, `-`.
        name: String,
        /// Where it comes from: `local://NAME` (a directory of the service's
        /// `plugins_dir`), `git+https://HOST/REPO.git#tag:TAG` (or `#sha:HEX`;
        /// also `git+ssh://`, `git+file://`), or `gitea://OWNER/REPO#tag:TAG`.
        source: String,
        /// Accept a git source that follows a branch (`#main`, or no ref):
        /// only if the service allows it too (`[deliverer] allow_unpinned`).
        #[arg(long)]
        allow_unpinned: bool,
    },
    /// Withdraw a declared plugin: the reconciler stops delivering it. The
    /// copy already in the workspace's config volume stays.
    UndeclarePlugin {
        /// The workspace.
        id: String,
        /// The plugin's name.
        name: String,
    },
    /// The state policies keep for the workspace (markers: a cooldown's last
    /// fire, a grace period's start), by slot.
    Markers {
        /// The workspace.
        id: String,
    },
    /// The conditions in force (why the workspace is not online), by slot.
    Conditions {
        /// The workspace.
        id: String,
    },
    /// Delete policy markers: those of `--slot` (only `--key`), or `--all`.
    /// The next heartbeat's policies see them gone (a cooldown may fire).
    ClearMarkers {
        /// The workspace.
        id: String,
        /// The slot whose markers go.
        #[arg(long, required_unless_present = "all")]
        slot: Option<String>,
        /// Only this marker of the slot.
        #[arg(long, requires = "slot")]
        key: Option<String>,
        /// Every marker of every slot.
        #[arg(long, conflicts_with = "slot")]
        all: bool,
    },
    /// Delete conditions: those of `--slot` (only `--name`), or `--all`. The
    /// status is derived again at the next heartbeat, from what remains
    /// and what the policies then say.
    ClearConditions {
        /// The workspace.
        id: String,
        /// The slot whose conditions go.
        #[arg(long, required_unless_present = "all")]
        slot: Option<String>,
        /// Only this condition of the slot.
        #[arg(long, requires = "slot")]
        name: Option<String>,
        /// Every condition of every slot.
        #[arg(long, conflicts_with = "slot")]
        all: bool,
    },
    /// Mark a workspace removed: heartbeats and registers never change it again.
    Remove {
        /// The workspace.
        id: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Issue a token and print it (shown once).
    Issue {
        /// The workspace the token is for.
        id: String,
    },
    /// Revoke every live token of a workspace. It then refuses every
    /// request (401) until a token is issued; with `--allow-bootstrap`, the
    /// next register without a token mints one instead, as for a workspace
    /// that never had a token.
    Revoke {
        /// The workspace whose tokens are revoked.
        id: String,
        /// Let the next register without a token mint one.
        #[arg(long)]
        allow_bootstrap: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum DbCommand {
    /// Create the database (a SQLite file, or Heartgate's schema in an
    /// empty PostgreSQL database) and migrate it; an existing one is
    /// migrated to this binary's schema. Every command but `serve`,
    /// `workspace add` and this one refuses a database that is not there.
    Init,
    /// Copy the database to FILE (which must not exist), consistent as of one
    /// moment, with SQLite's online backup API: safe while the service runs
    /// and writes. The copy is checked (`PRAGMA quick_check`) before it takes
    /// its name.
    Backup {
        /// The copy's path (must not exist).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum ReconcileCommand {
    /// Reconcile runs, as a table (`--json`: one JSON object a line).
    List {
        /// Only the runs of this workspace.
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Print one run: times, per-plugin results, the cause of a failure.
    Show {
        /// The run's id (`reconcile list` prints them).
        id: i64,
    },
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every argument of every command says what it is in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "heartgate", &mut missing);
        assert!(missing.is_empty(), "no help for: {missing:#?}");
    }
}
