//! The declared-plugin reconcile end to end: the reconcile worker, staging
//! from local, git and Gitea-archive sources, atomic delivery into config
//! volumes, restart hooks, and a runtime simulator (`heartgate-sim`, a
//! separate process) that renders its settings from the delivered plugins and
//! reports `mcp_server_present` the way the real runtime does.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::binary::git;
use common::gitea::Gitea;
use common::{MINUTE_MS, Service, T0_MS};
use heartgate::clock::ManualClock;
use heartgate::deliverer::Secret;
use heartgate::deliverer::restart::RestartHook;
use heartgate::model::WorkspaceKind::{Platform, Workspace};
use http_body_util::Full;
use hyper::StatusCode;
use serde_json::{Value, json};

const MANAGEMENT_PLUGIN: &str = "molecule-ai-plugin-molecule-platform-mcp";
const MCP_JSON: &str = r#"{"mcpServers":{"molecule-platform":{"command":"npx","args":["-y","@molecule-ai/mcp-server"]}}}"#;

/// A plugin directory with `files`.
fn write_plugin(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, body) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
}

/// The management MCP plugin, as the operator keeps it for `local://`.
fn management_plugin(plugins_dir: &Path) {
    write_plugin(
        &plugins_dir.join("molecule-platform-mcp"),
        &[
            ("plugin.yaml", "name: molecule-platform-mcp\n"),
            ("mcp.json", MCP_JSON),
        ],
    );
}

/// A restart hook that restarts the simulator of the workspace.
fn sim_restart_hook(configs: &Path) -> RestartHook {
    RestartHook::Command {
        argv: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "kill -HUP \"$(cat '{}/{{workspace_id}}/sim.pid')\"",
                configs.display()
            ),
        ],
        timeout: Duration::from_secs(10),
    }
}

struct Sim(Child);

impl Sim {
    fn start(server: &str, workspace: &str, configs: &Path, interval_ms: u64) -> Sim {
        std::fs::create_dir_all(configs).unwrap();
        let log = std::fs::File::create(configs.with_extension("sim.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_heartgate-sim"))
            .args([
                "--server",
                server,
                "--workspace",
                workspace,
                "--interval-ms",
            ])
            .arg(interval_ms.to_string())
            .arg("--configs")
            .arg(configs)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Sim(child)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boots(configs: &Path) -> usize {
    std::fs::read_to_string(configs.join("sim.boots"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn finished_runs(svc: &Service, id: &str, trigger: &str) -> Vec<heartgate::store::ReconcileRun> {
    svc.store
        .reconcile_runs(Some(id))
        .unwrap()
        .into_iter()
        .filter(|r| r.trigger == trigger && (r.state == "succeeded" || r.state == "failed"))
        .collect()
}

/// The concierge as the deadlock found it: a platform workspace with no
/// token yet (its runtime bootstraps one) and the management plugin declared.
fn booting_concierge(svc: &Service) {
    svc.provision("concierge", Platform, true);
    svc.store.revoke_tokens("concierge", T0_MS, true).unwrap();
    svc.store
        .declare_plugin(
            "concierge",
            MANAGEMENT_PLUGIN,
            "local://molecule-platform-mcp",
            T0_MS,
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlock_breaks_end_to_end() {
    deadlock_breaks(None).await;
}

/// The same story with the state in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlock_breaks_end_to_end_on_postgres() {
    deadlock_breaks(Some(common::postgres_database())).await;
}

async fn deadlock_breaks(database: Option<heartgate::Database>) {
    let dir = tempfile::tempdir().unwrap();
    let configs = dir.path().join("configs");
    management_plugin(&dir.path().join("plugins"));
    let svc = Service::start_with(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        "127.0.0.1:0",
        |o| {
            o.deliverer.restart = sim_restart_hook(&configs);
            if let Some(database) = database {
                o.db = database;
            }
        },
    )
    .await;
    booting_concierge(&svc);

    let started = Instant::now();
    let ws_configs = configs.join("concierge");
    let _sim = Sim::start(&svc.url(), "concierge", &ws_configs, 200);
    // Online, and the recovery run recorded (the runtime may come back
    // before the worker has written the run's outcome).
    svc.wait_for("the concierge to come online", 60, |s| {
        s.status("concierge") == "online"
            && !s.events("concierge", "WORKSPACE_ONLINE").is_empty()
            && !finished_runs(s, "concierge", "mcp-recovery").is_empty()
    })
    .await;
    let converged = started.elapsed();
    println!("deadlock_breaks_end_to_end: converged in {converged:?}");

    // The story, in order: failed by the gate, recovery queued, delivered, restarted, online.
    let failed = svc.events("concierge", "WORKSPACE_PROVISION_FAILED");
    assert_eq!(failed[0]["reason"], "mcp_server_missing");
    assert_eq!(
        failed[0]["error"],
        "platform agent registered without its management MCP server (mcp_server_present=false); refusing online"
    );
    let recoveries = finished_runs(&svc, "concierge", "mcp-recovery");
    assert_eq!(recoveries.len(), 1, "{recoveries:?}");
    let run = &recoveries[0];
    assert_eq!(run.state, "succeeded", "{run:?}");
    let detail = run.detail.as_ref().unwrap();
    assert_eq!(detail["plugins"][0]["name"], MANAGEMENT_PLUGIN);
    assert_eq!(detail["plugins"][0]["result"], "delivered");
    assert_eq!(detail["restart"]["ok"], true);
    assert!(run.started_ms.is_some() && run.finished_ms.is_some());
    assert_eq!(boots(&ws_configs), 2, "restarted exactly once");
    assert_eq!(
        svc.events("concierge", "WORKSPACE_ONLINE").last().unwrap(),
        &json!({"recovered_from": "failed"})
    );
    let plugin = ws_configs.join("plugins").join(MANAGEMENT_PLUGIN);
    assert!(plugin.join(".complete").exists());
    let settings: Value =
        serde_json::from_slice(&std::fs::read(ws_configs.join(".claude/settings.json")).unwrap())
            .unwrap();
    assert!(settings["mcpServers"]["molecule-platform"].is_object());
    assert_eq!(svc.store.installed_plugins("concierge").unwrap().len(), 1);
    // The runtime saved the platform inbound secret it was handed.
    let saved = std::fs::read_to_string(ws_configs.join(".platform_inbound_secret")).unwrap();
    assert_eq!(saved.len(), 43, "{saved}");
    svc.stop().await;
}

/// `heartgate workspace explain` and `GET /admin/workspaces/{id}/history` on
/// the deadlock scenario, with the system clock (the story is ordered by
/// time): failed by the gate, recovery queued, delivered, restarted, online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_tells_the_deadlock_story_in_order() {
    const ADMIN: &str = "admin-secret";
    let dir = tempfile::tempdir().unwrap();
    let configs = dir.path().join("configs");
    let db = dir.path().join("heartgate.db");
    management_plugin(&dir.path().join("plugins"));
    let svc = Service::start_with(&db, ManualClock::at(T0_MS), "127.0.0.1:0", |o| {
        o.clock = Arc::new(heartgate::clock::SystemClock);
        o.deliverer.restart = sim_restart_hook(&configs);
        o.admin_token = Some(Secret::Value(ADMIN.into()));
    })
    .await;
    booting_concierge(&svc);
    let ws_configs = configs.join("concierge");
    let sim = Sim::start(&svc.url(), "concierge", &ws_configs, 200);
    svc.wait_for("the concierge to come online", 60, |s| {
        s.status("concierge") == "online"
            && !finished_runs(s, "concierge", "mcp-recovery").is_empty()
    })
    .await;
    drop(sim);

    // Over HTTP: the entries, in order.
    let (status, history) = svc
        .get_as("/admin/workspaces/concierge/history?limit=50", Some(ADMIN))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{history}");
    let entries = history["entries"].as_array().unwrap();
    let position = |what: &dyn Fn(&Value) -> bool| {
        entries
            .iter()
            .position(what)
            .unwrap_or_else(|| panic!("not in the history: {history:#}"))
    };
    let failed = position(&|e| {
        e["kind"] == "transition" && e["to"] == "failed" && e["reason"] == "mcp_server_missing"
    });
    let queued = position(&|e| e["kind"] == "reconcile_queued" && e["trigger"] == "mcp-recovery");
    let ran = position(&|e| e["kind"] == "reconcile_run" && e["trigger"] == "mcp-recovery");
    let online = position(&|e| e["kind"] == "transition" && e["to"] == "online");
    assert!(
        failed < queued && queued < ran && ran < online,
        "{history:#}"
    );
    assert_eq!(entries[ran]["plugins"][0]["result"], "delivered");
    assert_eq!(entries[ran]["restart"]["ok"], true);
    // The gate's condition came into force, and the host derived the
    // status from it (contract 0.2.0).
    let set = &entries[failed - 1];
    assert_eq!(set["kind"], "condition_set");
    assert_eq!(
        (&set["owner"], &set["name"], &set["severity"]),
        (&json!("rca2970-gate"), &json!("identity"), &json!("failed"))
    );
    let by_gate = &entries[failed - 2];
    assert_eq!(by_gate["kind"], "decision");
    assert_eq!(by_gate["steps"][0]["slot"], "gate");
    assert_eq!(by_gate["steps"][0]["output"][0]["severity"], "failed");
    let (status, _) = svc
        .get_as("/admin/workspaces/nobody/history", Some(ADMIN))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = svc
        .get_as("/admin/workspaces/concierge/history?limit=0", Some(ADMIN))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    svc.stop().await;

    // The CLI tells the same story, in words.
    let out = Command::new(env!("CARGO_BIN_EXE_heartgate"))
        .args(["workspace", "explain", "concierge", "--limit", "50", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let story = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{story}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at = |needle: &str| {
        story
            .find(needle)
            .unwrap_or_else(|| panic!("`{needle}` not in the story:\n{story}"))
    };
    let gate = at("gate (rca2970-gate): added set_condition identity failed (mcp_server_missing)");
    let derived =
        at("host (from the conditions): set_status provisioning->failed (mcp_server_missing)");
    let failed = at("status provisioning -> failed (mcp_server_missing)");
    let queued = at("(mcp-recovery) queued by decision");
    let delivered = at(&format!("ran: delivered {MANAGEMENT_PLUGIN}; restarted"));
    let online = at("status failed -> online");
    assert!(
        gate < derived
            && derived < failed
            && failed < queued
            && queued < delivered
            && delivered < online,
        "out of order:\n{story}"
    );
    assert!(
        story.starts_with("workspace concierge (platform) is online"),
        "{story}"
    );
}

fn archive(top: &str, files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, body) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, format!("{top}/{name}"), body.as_bytes())
            .unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_source_without_token_stays_failed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let configs = dir.path().join("configs");
    let ws_configs = configs.join("concierge");
    let gitea = Gitea::start(
        "/api/v1/repos/molecule-ai/molecule-ai-plugin-molecule-platform-mcp/archive/v1.0.tar.gz",
        "s3cret",
        archive(
            "molecule-ai-plugin-molecule-platform-mcp",
            &[
                ("plugin.yaml", "name: molecule-platform-mcp\n"),
                ("mcp.json", MCP_JSON),
            ],
        ),
    )
    .await;
    let base_url = format!("http://{}", gitea.addr);
    let clock = ManualClock::at(T0_MS);
    let no_token = Secret::Env("HEARTGATE_TEST_TOKEN_THAT_IS_NEVER_SET".into());
    let svc = Service::start_with(&db, clock.clone(), "127.0.0.1:0", |o| {
        o.deliverer.restart = sim_restart_hook(&configs);
        o.deliverer.gitea.base_url = base_url.clone();
        o.deliverer.gitea.token = Some(no_token.clone());
    })
    .await;
    svc.provision("concierge", Platform, true);
    svc.store.revoke_tokens("concierge", T0_MS, true).unwrap();
    svc.store
        .declare_plugin(
            "concierge",
            MANAGEMENT_PLUGIN,
            "gitea://molecule-ai/molecule-ai-plugin-molecule-platform-mcp#tag:v1.0",
            T0_MS,
        )
        .unwrap();
    let _sim = Sim::start(&svc.url(), "concierge", &ws_configs, 100);

    svc.wait_for("the recovery run to fail", 30, |s| {
        !finished_runs(s, "concierge", "mcp-recovery").is_empty()
    })
    .await;
    let run = &finished_runs(&svc, "concierge", "mcp-recovery")[0];
    assert_eq!(run.state, "failed");
    let cause = run.cause.as_deref().unwrap();
    assert!(cause.contains("is not accessible (HTTP 404)"), "{cause}");
    assert!(
        cause.contains("HEARTGATE_TEST_TOKEN_THAT_IS_NEVER_SET"),
        "{cause}"
    );
    assert!(
        run.detail.as_ref().unwrap().get("restart").is_none(),
        "nothing restarted"
    );
    assert!(
        !ws_configs.join("plugins").join(MANAGEMENT_PLUGIN).exists(),
        "nothing delivered"
    );

    // Heartbeats every 100 ms keep failing the gate; no second run inside the cooldown.
    let seen = svc.store.decisions("concierge", 1000).unwrap().len();
    svc.wait_for("twenty more heartbeats", 30, |s| {
        s.store.decisions("concierge", 1000).unwrap().len() >= seen + 20
    })
    .await;
    assert_eq!(svc.status("concierge"), "failed");
    assert_eq!(svc.runs("concierge", "mcp-recovery"), 1);
    assert_eq!(boots(&ws_configs), 1, "the runtime was never restarted");
    assert_eq!(gitea.requests.load(Ordering::SeqCst), 1);
    let addr = svc.addr.to_string();
    svc.stop().await;

    // The operator configures the token and restarts the service; the cooldown passes.
    clock.advance(5 * MINUTE_MS);
    let svc = Service::start_with(&db, clock.clone(), &addr, |o| {
        o.deliverer.restart = sim_restart_hook(&configs);
        o.deliverer.gitea.base_url = base_url.clone();
        o.deliverer.gitea.token = Some(Secret::Value("s3cret".into()));
    })
    .await;
    svc.wait_for("the concierge to converge", 60, |s| {
        s.status("concierge") == "online"
            && finished_runs(s, "concierge", "mcp-recovery").len() == 2
    })
    .await;
    let runs = finished_runs(&svc, "concierge", "mcp-recovery");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].state, "succeeded", "{:?}", runs[1]);
    assert_eq!(boots(&ws_configs), 2);
    svc.stop().await;
}

/// A `heartgate serve` child process, killed when dropped.
struct ServeProcess {
    child: Child,
    url: String,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_process(db: &Path, config: &Path, failpoint: Option<&Path>) -> ServeProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_heartgate"));
    cmd.arg("--db")
        .arg(db)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .env_remove("HEARTGATE_FAILPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(db.with_extension("serve.log")).unwrap());
    if let Some(path) = failpoint {
        cmd.env(
            "HEARTGATE_FAILPOINT",
            format!("before-swap:{}", path.display()),
        );
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("heartgate listening on ")
        .unwrap()
        .to_string();
    ServeProcess { child, url }
}

fn tree(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == ".complete" {
            continue;
        }
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            std::fs::read_to_string(entry.path()).unwrap(),
        ));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_delivery_keeps_plugin_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let configs = dir.path().join("configs");
    let plugins = dir.path().join("plugins");
    let config = dir.path().join("heartgate.toml");
    std::fs::write(
        &config,
        "configs_root = \"configs\"\nplugins_dir = \"plugins\"\n",
    )
    .unwrap();
    let v1 = [("a.md", "one"), ("b.md", "one")];
    let v2 = [("a.md", "two"), ("c.md", "two"), ("mcp.json", MCP_JSON)];
    write_plugin(&plugins.join("molecule-platform-mcp"), &v2);

    // The old version is on disk but not recorded, so the reconcile delivers v2.
    let store = heartgate::open_store(&db).unwrap();
    store
        .add_workspace(
            &heartgate::store::NewWorkspace {
                id: "ws".into(),
                name: "ws".into(),
                kind: Platform,
                model_configured: true,
                runtime: String::new(),
            },
            T0_MS,
        )
        .unwrap();
    store
        .set_status("ws", heartgate::model::Status::Online, T0_MS)
        .unwrap();
    store
        .declare_plugin(
            "ws",
            MANAGEMENT_PLUGIN,
            "local://molecule-platform-mcp",
            T0_MS,
        )
        .unwrap();
    let old = dir.path().join("v1");
    write_plugin(&old, &v1);
    heartgate::deliverer::volume::deliver(
        &configs,
        "ws",
        &old,
        &heartgate::deliverer::volume::CompleteMarker {
            name: MANAGEMENT_PLUGIN.into(),
            source: "local://molecule-platform-mcp".into(),
            tracked_ref: "none".into(),
            installed_sha: None,
            run_id: 0,
            files: 2,
            bytes: 6,
        },
        Default::default(),
    )
    .unwrap();
    let token = heartgate::auth::mint().unwrap();
    store.issue_token("ws", &token.stored, T0_MS).unwrap();
    let target = configs.join("ws/plugins").join(MANAGEMENT_PLUGIN);
    let expect = |files: &[(&str, &str)]| -> Vec<(String, String)> {
        files
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };

    // Kill the service between staging and swap.
    let reached = dir.path().join("failpoint-reached");
    let mut serve = serve_process(&db, &config, Some(&reached));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = hyper::Request::post(format!("{}/registry/heartbeat", serve.url))
        .header("authorization", format!("Bearer {}", token.plaintext))
        .body(Full::new(Bytes::from(
            r#"{"workspace_id":"ws","mcp_server_present":false}"#,
        )))
        .unwrap();
    assert_eq!(client.request(req).await.unwrap().status(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reached.exists() {
        assert!(Instant::now() < deadline, "the failpoint was never reached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serve.child.kill().unwrap(); // SIGKILL
    serve.child.wait().unwrap();

    assert_eq!(tree(&target), expect(&v1), "the old version, whole");
    let runs = store.reconcile_runs(Some("ws")).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, "running", "killed mid-run");

    // Restart: the run is re-queued, finishes, and the new version is whole.
    let serve = serve_process(&db, &config, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = store.reconcile_run(runs[0].id).unwrap().unwrap();
        if run.state == "succeeded" {
            assert_eq!(run.attempts, 2);
            break;
        }
        assert!(run.state != "failed", "{run:?}");
        assert!(
            Instant::now() < deadline,
            "the re-queued run never finished: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tree(&target), expect(&v2), "the new version, whole");
    assert!(!configs.join("ws/plugins/.staging").exists());
    assert!(!configs.join("ws/plugins/.previous").exists());
    drop(serve);
}

/// An online-reconcile trigger: bring `id` from offline to online.
async fn trigger_online_reconcile(svc: &Service, id: &str, token: &str) -> i64 {
    let before = svc.store.reconcile_runs(Some(id)).unwrap().len();
    svc.force_status(id, "offline");
    let (status, _) = svc.heartbeat(token, json!({"workspace_id": id})).await;
    assert_eq!(status, StatusCode::OK);
    let runs = svc.store.reconcile_runs(Some(id)).unwrap();
    assert_eq!(runs.len(), before + 1);
    let run_id = runs.last().unwrap().id;
    svc.wait_for("the run to finish", 30, |s| {
        let r = s.store.reconcile_run(run_id).unwrap().unwrap();
        r.state == "succeeded" || r.state == "failed"
    })
    .await;
    run_id
}

fn results(svc: &Service, run_id: i64) -> Vec<(String, String)> {
    let run = svc.store.reconcile_run(run_id).unwrap().unwrap();
    run.detail.unwrap()["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["result"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn restarts(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_delivers_exactly_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    write_plugin(
        &plugins.join("seo-all"),
        &[("plugin.yaml", "name: seo-all\n")],
    );
    write_plugin(&plugins.join("notes"), &[("plugin.yaml", "name: notes\n")]);
    let restart_log = dir.path().join("restarts");
    let log = restart_log.clone();
    let svc = Service::start_with(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        "127.0.0.1:0",
        |o| {
            o.deliverer.restart = RestartHook::Command {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("echo {{workspace_id}} >> '{}'", log.display()),
                ],
                timeout: Duration::from_secs(10),
            };
        },
    )
    .await;
    let token = svc.provision("ws", Workspace, false);
    let configs = dir.path().join("configs/ws/plugins");

    // Nothing declared: nothing delivered, nothing restarted.
    let run = trigger_online_reconcile(&svc, "ws", &token).await;
    assert!(results(&svc, run).is_empty());
    assert_eq!(restarts(&restart_log), 0);

    // Declared and not installed: delivered once and recorded.
    svc.store
        .declare_plugin("ws", "seo-all", "local://seo-all", T0_MS)
        .unwrap();
    let run = trigger_online_reconcile(&svc, "ws", &token).await;
    assert_eq!(
        results(&svc, run),
        [("seo-all".to_string(), "delivered".to_string())]
    );
    assert!(configs.join("seo-all/.complete").exists());
    assert_eq!(
        svc.store.installed_plugins("ws").unwrap()[0].name,
        "seo-all"
    );
    assert_eq!(restarts(&restart_log), 1);

    // Already installed and present: nothing.
    let run = trigger_online_reconcile(&svc, "ws", &token).await;
    assert_eq!(
        results(&svc, run),
        [("seo-all".to_string(), "present".to_string())]
    );
    assert_eq!(restarts(&restart_log), 1);

    // Two declared, one installed: only the missing one.
    svc.store
        .declare_plugin("ws", "notes", "local://notes", T0_MS)
        .unwrap();
    let run = trigger_online_reconcile(&svc, "ws", &token).await;
    assert_eq!(
        results(&svc, run),
        [
            ("notes".to_string(), "delivered".to_string()),
            ("seo-all".to_string(), "present".to_string())
        ]
    );
    assert_eq!(restarts(&restart_log), 2);

    // Recorded as installed but gone from the box: delivered again.
    std::fs::remove_dir_all(configs.join("seo-all")).unwrap();
    let run = trigger_online_reconcile(&svc, "ws", &token).await;
    assert_eq!(
        results(&svc, run),
        [
            ("notes".to_string(), "present".to_string()),
            ("seo-all".to_string(), "delivered".to_string())
        ]
    );
    assert!(configs.join("seo-all/.complete").exists());
    assert_eq!(restarts(&restart_log), 3);

    // One plugin failing never stops the others, and restarts nothing.
    svc.store
        .declare_plugin("ws", "broken", "local://does-not-exist", T0_MS)
        .unwrap();
    svc.store
        .declare_plugin("ws", "zzz-unpinned", "gitea://o/r#main", T0_MS)
        .unwrap();
    std::fs::remove_dir_all(configs.join("notes")).unwrap();
    let run = trigger_online_reconcile(&svc, "ws", &token).await;
    let r = svc.store.reconcile_run(run).unwrap().unwrap();
    assert_eq!(r.state, "failed");
    let cause = r.cause.unwrap();
    assert!(
        cause.contains("broken: local plugin `does-not-exist` not found"),
        "{cause}"
    );
    assert!(cause.contains("is not pinned"), "{cause}");
    assert_eq!(
        results(&svc, run),
        [
            ("broken".to_string(), "failed".to_string()),
            ("notes".to_string(), "delivered".to_string()),
            ("seo-all".to_string(), "present".to_string()),
            ("zzz-unpinned".to_string(), "failed".to_string()),
        ]
    );
    assert_eq!(
        restarts(&restart_log),
        4,
        "the delivered plugin restarts the workspace"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_sources_are_cloned_at_their_pinned_ref() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    write_plugin(&repo, &[("plugin.yaml", "name: tools\nversion: 1\n")]);
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "v1"]);
    git(&repo, &["tag", "v1.0"]);
    let v1 = git(&repo, &["rev-parse", "HEAD"]);
    std::fs::write(repo.join("plugin.yaml"), "name: tools\nversion: 2\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "v2"]);

    let svc = Service::start_with(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        "127.0.0.1:0",
        |_| {},
    )
    .await;
    let token = svc.provision("ws", Workspace, false);
    let url = format!("git+file://{}", repo.display());
    svc.store
        .declare_plugin("ws", "tools", &format!("{url}#tag:v1.0"), T0_MS)
        .unwrap();
    let run = trigger_online_reconcile(&svc, "ws", &token).await;
    assert_eq!(
        results(&svc, run),
        [("tools".to_string(), "delivered".to_string())],
        "{:?}",
        svc.store.reconcile_run(run).unwrap()
    );
    let installed = &svc.store.installed_plugins("ws").unwrap()[0];
    assert_eq!(installed.tracked_ref, "tag:v1.0");
    assert_eq!(installed.installed_sha.as_deref(), Some(v1.as_str()));
    let plugin = dir.path().join("configs/ws/plugins/tools");
    assert_eq!(
        std::fs::read_to_string(plugin.join("plugin.yaml")).unwrap(),
        "name: tools\nversion: 1\n"
    );
    assert!(!plugin.join(".git").exists());

    // A missing tag fails with the cause and delivers nothing.
    svc.store
        .declare_plugin("ws", "other", &format!("{url}#tag:v9"), T0_MS)
        .unwrap();
    let run = trigger_online_reconcile(&svc, "ws", &token).await;
    let r = svc.store.reconcile_run(run).unwrap().unwrap();
    assert!(r.cause.unwrap().contains("not found"));
    assert!(!dir.path().join("configs/ws/plugins/other").exists());
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_shows_runs_and_plugins_behind_its_token() {
    let dir = tempfile::tempdir().unwrap();
    write_plugin(&dir.path().join("plugins/seo-all"), &[("plugin.yaml", "x")]);
    let svc = Service::start_with(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        "127.0.0.1:0",
        |o| {
            o.admin_token = Some(Secret::Value("admin-s3cret".into()));
        },
    )
    .await;
    let token = svc.provision("ws", Workspace, false);
    svc.store
        .declare_plugin("ws", "seo-all", "local://seo-all", T0_MS)
        .unwrap();
    let run = trigger_online_reconcile(&svc, "ws", &token).await;

    let admin = Some("admin-s3cret");
    let (status, body) = svc
        .get_as("/admin/reconciles?workspace=ws", admin)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["runs"][0]["state"], "succeeded");
    let (status, body) = svc
        .get_as(&format!("/admin/reconciles/{run}"), admin)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["detail"]["plugins"][0]["result"], "delivered");
    let (status, body) = svc
        .get_as("/admin/workspaces/ws/plugins", admin)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["installed"][0]["name"], "seo-all");
    assert_eq!(body["installed"][0]["present"], true);

    // Workspace tokens are not admin tokens; no token is 401.
    assert_eq!(
        svc.get_as("/admin/reconciles", Some(&token))
            .await
            .unwrap()
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        svc.get_as("/admin/reconciles", None).await.unwrap().0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        svc.get_as("/admin/reconciles/999", admin).await.unwrap().0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        svc.get_as("/admin/workspaces/nobody/plugins", admin)
            .await
            .unwrap()
            .0,
        StatusCode::NOT_FOUND
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_webhook_is_signed_and_retried() {
    use http_body_util::BodyExt;

    // A control plane that fails the first call and records what it got.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = listener.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<(String, String)>>> = Arc::default();
    let calls = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let calls = calls.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let calls = calls.clone();
                        async move {
                            let sig = req
                                .headers()
                                .get("x-heartgate-signature")
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut calls = calls.lock().unwrap();
                            calls.push((sig, String::from_utf8(body.to_vec()).unwrap()));
                            let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                            if calls.len() == 1 {
                                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let dir = tempfile::tempdir().unwrap();
    write_plugin(&dir.path().join("plugins/seo-all"), &[("plugin.yaml", "x")]);
    let url = format!("http://{hook_addr}/restart");
    let svc = Service::start_with(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        "127.0.0.1:0",
        |o| {
            o.deliverer.restart = RestartHook::Http {
                url,
                secret: Some(Secret::Value("hook-secret".into())),
                attempts: 3,
                timeout: Duration::from_secs(5),
            };
        },
    )
    .await;
    let token = svc.provision("ws", Workspace, false);
    svc.store
        .declare_plugin("ws", "seo-all", "local://seo-all", T0_MS)
        .unwrap();
    let run = trigger_online_reconcile(&svc, "ws", &token).await;
    let r = svc.store.reconcile_run(run).unwrap().unwrap();
    assert_eq!(r.state, "succeeded", "{r:?}");
    assert_eq!(r.detail.unwrap()["restart"]["ok"], true);

    let calls = seen.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "retried once after the 503");
    for (sig, body) in &calls {
        let payload: Value = serde_json::from_str(body).unwrap();
        assert_eq!(payload, json!({"workspace_id": "ws", "run_id": run}));
        let expected = heartgate::deliverer::restart::sign(b"hook-secret", body.as_bytes());
        assert_eq!(sig, &format!("sha256={expected}"));
    }
    svc.stop().await;
}
