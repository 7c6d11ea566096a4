//! `heartgate-sim`: a runtime simulator that behaves like a Molecule runtime.
//!
//! At each boot it renders `<configs>/.claude/settings.json` from the plugins
//! present under `<configs>/plugins/` (a plugin with an `mcp.json` adds its
//! `mcpServers` entries), registers, then heartbeats every `--interval-ms`.
//! Like the real runtime it reports `mcp_server_present=true` when the
//! settings file parses and has a `molecule-platform` MCP server, and reports
//! the server's tools as loaded once it is present. SIGHUP restarts it (a new
//! boot: settings rendered again, register again): that is what a restart
//! hook such as `kill -HUP $(cat <configs>/sim.pid)` does. SIGTERM stops it.
//!
//! It keeps its token in `<configs>/.auth_token` and appends one line per boot
//! to `<configs>/sim.boots`, so tests can count restarts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

const MCP_SERVER: &str = "molecule-platform";
const PROVISION_TOOL: &str = "mcp__molecule-platform__provision_workspace";

#[derive(Parser)]
#[command(name = "heartgate-sim", about = "A Molecule runtime simulator")]
struct Args {
    /// The service, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
    /// The workspace id.
    #[arg(long)]
    workspace: String,
    /// The workspace's config volume (`/configs` on a real box).
    #[arg(long)]
    configs: PathBuf,
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 300)]
    interval_ms: u64,
    /// The agent URL sent at register.
    #[arg(long, default_value = "http://localhost:9/agent")]
    url: String,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Render `.claude/settings.json` from the plugins present.
fn render_settings(configs: &Path) -> Result<()> {
    let mut servers = serde_json::Map::new();
    if let Ok(entries) = std::fs::read_dir(configs.join("plugins")) {
        let mut dirs: Vec<_> = entries.filter_map(Result::ok).collect();
        dirs.sort_by_key(|e| e.file_name());
        for entry in dirs {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !entry.path().join(".complete").exists() {
                continue;
            }
            let Ok(text) = std::fs::read(entry.path().join("mcp.json")) else {
                continue;
            };
            if let Ok(Value::Object(desc)) = serde_json::from_slice::<Value>(&text)
                && let Some(Value::Object(s)) = desc.get("mcpServers")
            {
                servers.extend(s.clone());
            }
        }
    }
    let dir = configs.join(".claude");
    std::fs::create_dir_all(&dir)?;
    let settings = json!({ "mcpServers": servers });
    std::fs::write(
        dir.join("settings.json"),
        serde_json::to_vec_pretty(&settings)?,
    )?;
    Ok(())
}

/// As the runtime decides it: the settings file parses and names the server.
fn mcp_server_present(configs: &Path) -> bool {
    std::fs::read(configs.join(".claude/settings.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| v["mcpServers"].get(MCP_SERVER).is_some())
}

async fn post(
    client: &HttpClient,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> Result<(u16, Value)> {
    let mut req = hyper::Request::post(url).header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(body.to_string())))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .context("request timed out")??;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Save the platform inbound secret a response carries, as the runtimes do
/// (`<configs>/.platform_inbound_secret`), when it changed.
fn save_inbound_secret(configs: &Path, body: &Value) -> Result<()> {
    let Some(secret) = body["platform_inbound_secret"].as_str() else {
        return Ok(());
    };
    let path = configs.join(".platform_inbound_secret");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(secret) {
        std::fs::write(&path, secret)?;
    }
    Ok(())
}

fn read_token(configs: &Path) -> Option<String> {
    std::fs::read_to_string(configs.join(".auth_token"))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

enum Next {
    Restart,
    Stop,
}

struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

async fn boot(
    args: &Args,
    client: &HttpClient,
    signals: &mut Signals,
    boot_no: u64,
) -> Result<Next> {
    render_settings(&args.configs)?;
    let mut boots = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.configs.join("sim.boots"))?;
    std::io::Write::write_all(&mut boots, format!("boot {boot_no}\n").as_bytes())?;
    let present = mcp_server_present(&args.configs);
    eprintln!("sim: boot {boot_no}, mcp_server_present={present}");

    let register = json!({
        "id": args.workspace, "url": args.url, "delivery_mode": "push",
        "agent_card": {"name": format!("sim {}", args.workspace)},
        "mcp_server_present": present,
    });
    let url = format!("{}/registry/register", args.server);
    for attempt in 0..8u32 {
        let token = read_token(&args.configs);
        match post(client, &url, token.as_deref(), &register).await {
            Ok((200, body)) => {
                if let Some(t) = body["auth_token"].as_str() {
                    std::fs::write(args.configs.join(".auth_token"), t)?;
                }
                save_inbound_secret(&args.configs, &body)?;
                eprintln!("sim: registered");
                break;
            }
            Ok((401 | 403, body)) => {
                eprintln!("sim: register refused: {body}; exiting");
                return Ok(Next::Stop);
            }
            Ok((status, body)) if status < 500 => {
                eprintln!("sim: register answered {status} {body}; heartbeating anyway");
                break;
            }
            Ok((status, _)) => eprintln!("sim: register answered {status}; retrying"),
            Err(e) => eprintln!("sim: register failed: {e}; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
    }

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    let url = format!("{}/registry/heartbeat", args.server);
    loop {
        tokio::select! {
            _ = signals.hup.recv() => {
                eprintln!("sim: SIGHUP, restarting");
                return Ok(Next::Restart);
            }
            _ = signals.term.recv() => return Ok(Next::Stop),
            _ = tick.tick() => {}
        }
        let present = mcp_server_present(&args.configs);
        let mut beat = json!({
            "workspace_id": args.workspace, "error_rate": 0.0, "sample_error": "",
            "active_tasks": 0, "uptime_seconds": started.elapsed().as_secs(),
            "mcp_server_present": present,
        });
        if present {
            beat["loaded_mcp_tools"] = json!([PROVISION_TOOL]);
        }
        let token = read_token(&args.configs);
        match post(client, &url, token.as_deref(), &beat).await {
            Ok((200, body)) => save_inbound_secret(&args.configs, &body)?,
            Ok(_) => {}
            Err(e) => eprintln!("sim: heartbeat failed: {e}"),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Installed before anything else, so an early SIGHUP restarts rather than kills.
    let mut signals = Signals {
        hup: signal(SignalKind::hangup())?,
        term: signal(SignalKind::terminate())?,
    };
    std::fs::create_dir_all(&args.configs)
        .with_context(|| format!("creating {}", args.configs.display()))?;
    std::fs::write(args.configs.join("sim.pid"), std::process::id().to_string())?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut boot_no = 1;
    loop {
        match boot(&args, &client, &mut signals, boot_no).await? {
            Next::Restart => boot_no += 1,
            Next::Stop => return Ok(()),
        }
    }
}
