//! Contract 0.2.0 in the running service: policies written independently
//! compose through their conditions, the host derives the status, a 0.1.0
//! component still runs in a chain of 0.2.0 policies, a sequence fixture
//! catches a flap, and the operator sees every condition and its story.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::Path;

use common::binary::cli;
use common::{ADMIN, MINUTE_MS, Service, T0_MS};
use heartgate::clock::ManualClock;
use heartgate::model::WorkspaceKind::{Platform, Workspace};
use hyper::StatusCode;
use serde_json::{Value, json};

fn guest_path(name: &str) -> String {
    format!("{}/{name}.wasm", env!("HEARTGATE_TEST_GUESTS_DIR"))
}

fn guest(name: &str) -> Vec<u8> {
    std::fs::read(guest_path(name)).unwrap()
}

/// The 0.1.0 build of the one-minute cooldown, made before contract 0.2.0
/// existed (kept as bytes: no SDK of today can build it).
fn prebuilt_0_1_cooldown() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/guests/prebuilt/cooldown-1m-policy-0.1.0.wasm");
    std::fs::read(path).unwrap()
}

async fn active(svc: &Service) -> Value {
    let (status, chain) = svc.get_as("/admin/chain", Some(ADMIN)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    chain
}

async fn push(svc: &Service, module: Vec<u8>) -> Value {
    let (status, pushed) = svc.admin("POST", "/admin/modules", module).await;
    assert_eq!(status, StatusCode::CREATED, "{pushed}");
    pushed
}

/// Stage `spec`, activate it, and return the activated chain.
async fn activate(svc: &Service, spec: &Value) -> Value {
    let (status, staged) = svc.admin("POST", "/admin/chains", spec.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{staged}");
    let id = staged["id"].as_i64().unwrap();
    let (status, activated) = svc
        .admin("POST", &format!("/admin/chains/{id}/activate"), "")
        .await;
    assert_eq!(status, StatusCode::OK, "{activated}");
    activated
}

fn beat(id: &str, tasks: i64, task: &str) -> Value {
    json!({"workspace_id": id, "active_tasks": tasks, "current_task": task, "error_rate": 0.0})
}

fn transitions(svc: &Service, id: &str) -> Vec<(String, String)> {
    let history = heartgate::history::history(&*svc.store, id, 1000)
        .unwrap()
        .unwrap();
    history
        .entries
        .iter()
        .filter_map(|e| match e {
            heartgate::history::Entry::Transition { from, to, .. } => {
                Some((from.clone(), to.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Two policies, each holding a workspace degraded for its own reason and
/// knowing nothing of the other (or of the status rules), pushed after the
/// status rules with the `conditions` grant and no `drop`: the workspace is
/// degraded while either holds it back and online only once both let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_policies_compose() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_admin(&dir.path().join("hg.db"), ManualClock::at(T0_MS)).await;
    let busy = push(&svc, guest("hold_busy")).await;
    let maintenance = push(&svc, guest("hold_maintenance")).await;
    let mut spec = active(&svc).await["spec"].clone();
    let slots = spec["slot"].as_array_mut().unwrap();
    let at = slots
        .iter()
        .position(|s| s["name"] == "status-rules")
        .unwrap()
        + 1;
    for (name, pushed) in [("maintenance", &maintenance), ("busy", &busy)] {
        slots.insert(
            at,
            json!({"name": name, "module": pushed["module"], "grants": ["conditions", "record_event"]}),
        );
    }
    activate(&svc, &spec).await;

    let token = svc.provision("ws", Workspace, true);
    let hb = |tasks, task: &'static str| beat("ws", tasks, task);
    let step = |svc: &Service| svc.clock.advance(30_000);
    assert_eq!(svc.heartbeat(&token, hb(0, "idle")).await.0, StatusCode::OK);
    assert_eq!(svc.status("ws"), "online");

    // Both hold it back.
    step(&svc);
    svc.heartbeat(&token, hb(80, "maintenance")).await;
    assert_eq!(svc.status("ws"), "degraded");
    let held: Vec<String> = svc.workspace("ws")["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{}/{}",
                c["owner"].as_str().unwrap(),
                c["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(held, ["hold-busy/busy", "hold-maintenance/maintenance"]);

    // Busy lets go (below 10 tasks); maintenance still holds.
    for _ in 0..3 {
        step(&svc);
        svc.heartbeat(&token, hb(5, "maintenance")).await;
        assert_eq!(svc.status("ws"), "degraded");
    }
    // Maintenance lets go, but busy is back (and holds through 30 tasks:
    // its hysteresis).
    step(&svc);
    svc.heartbeat(&token, hb(60, "work")).await;
    assert_eq!(svc.status("ws"), "degraded");
    step(&svc);
    svc.heartbeat(&token, hb(30, "work")).await;
    assert_eq!(svc.status("ws"), "degraded");
    // Both let go: online, once.
    step(&svc);
    svc.heartbeat(&token, hb(2, "work")).await;
    assert_eq!(svc.status("ws"), "online");
    assert_eq!(
        transitions(&svc, "ws"),
        [
            ("provisioning".to_string(), "online".to_string()),
            ("online".into(), "degraded".into()),
            ("degraded".into(), "online".into()),
        ]
    );
    assert_eq!(svc.events("ws", "WORKSPACE_ONLINE").len(), 2);
    // busy degraded it twice (once per time its condition came into force).
    assert_eq!(svc.events("ws", "WORKSPACE_DEGRADED").len(), 2);
    assert!(
        svc.workspace("ws")["conditions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    svc.stop().await;
}

/// A component built against contract 0.1.0 before 0.2.0 existed still
/// loads, validates, hot-swaps into the built-in chain of 0.2.0 policies in
/// place of the cooldown, and decides there: a one-minute window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_0_1_component_runs_in_a_0_2_chain() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_admin(&dir.path().join("hg.db"), ManualClock::at(T0_MS)).await;
    let pushed = push(&svc, prebuilt_0_1_cooldown()).await;
    assert_eq!(pushed["contract"], "0.1.0", "{pushed}");
    let mut spec = active(&svc).await["spec"].clone();
    let cooldown = spec["slot"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["name"] == "cooldown")
        .unwrap();
    cooldown["module"] = pushed["module"].clone();
    let activated = activate(&svc, &spec).await;
    assert_eq!(activated["state"], "active", "{activated}");

    // A platform workspace whose MCP server is missing: the 0.2.0 gate
    // fails it with its condition, the 0.2.0 trigger asks for recovery, and
    // the 0.1.0 cooldown (which never sees the condition actions, and
    // passes them on) lets one recovery through per minute.
    let token = svc.provision("ws-p", Platform, true);
    let missing = json!({"workspace_id": "ws-p", "mcp_server_present": false});
    svc.heartbeat(&token, missing.clone()).await;
    assert_eq!(svc.status("ws-p"), "failed");
    assert_eq!(svc.runs("ws-p", "mcp-recovery"), 1);
    svc.clock.advance(30_000);
    svc.heartbeat(&token, missing.clone()).await;
    assert_eq!(svc.runs("ws-p", "mcp-recovery"), 1, "inside the minute");
    svc.clock.advance(MINUTE_MS);
    svc.heartbeat(&token, missing).await;
    assert_eq!(svc.runs("ws-p", "mcp-recovery"), 2, "a minute later");
    let conditions = svc.workspace("ws-p")["conditions"].clone();
    assert_eq!(conditions[0]["owner"], "rca2970-gate", "{conditions}");

    // Its decisions name it with its own markers, kept under its slot.
    let decisions = svc.store.decisions("ws-p", 10).unwrap();
    let steps = &decisions.last().unwrap().steps;
    assert!(
        steps
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["slot"] == "cooldown" && s["policy"] == "recovery-cooldown"),
        "{steps}"
    );
    // And once the MCP is back the workspace comes online through the same
    // mixed chain.
    svc.clock.advance(MINUTE_MS);
    svc.heartbeat(
        &token,
        json!({"workspace_id": "ws-p", "mcp_server_present": true}),
    )
    .await;
    assert_eq!(svc.status("ws-p"), "online");
    svc.stop().await;
}

/// The guide's old example (an explicit status change at more than 50
/// tasks) flaps once anything brings a healthy degraded workspace back
/// online; a sequence fixture of 20 busy heartbeats catches it, and passes
/// on the condition-based policy.
#[test]
fn sequence_fixture_catches_a_flap() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = dir.path().join("fixtures");
    std::fs::create_dir(&fixtures).unwrap();
    std::fs::write(
        fixtures.join("busy_holds_degraded.json"),
        json!({
            "description": "20 busy heartbeats: one transition to degraded, then it holds",
            "workspace": {"id": "ws-1", "kind": "workspace", "status": "online", "model_configured": true},
            "steps": [
                {"event": {"heartbeat": {"active_tasks": 80}}, "now_ms": T0_MS,
                 "repeat": 20, "every_ms": 30000, "expect_status": "degraded"}
            ],
            "expect_transitions": 1
        })
        .to_string(),
    )
    .unwrap();
    let run = |module: &str| {
        std::process::Command::new(common::binary::heartgate())
            .args(["policy", "test", &guest_path(module), "--fixtures"])
            .arg(&fixtures)
            .output()
            .unwrap()
    };
    let flapping = run("busy_degrade");
    let out = String::from_utf8_lossy(&flapping.stdout);
    assert_eq!(flapping.status.code(), Some(1), "{out}");
    assert!(
        out.contains("fixture busy_holds_degraded ... FAILED"),
        "{out}"
    );
    assert!(
        out.contains("the status is `online`, expected `degraded`"),
        "{out}"
    );
    assert!(out.contains("online -> degraded -> online"), "{out}");

    let composing = run("hold_busy");
    let out = String::from_utf8_lossy(&composing.stdout);
    assert_eq!(composing.status.code(), Some(0), "{out}");
    assert!(out.contains("fixture busy_holds_degraded ... ok"), "{out}");
}

/// The operator sees why: `workspace show` lists the conditions in force,
/// `workspace explain` tells when each was set and cleared and what the
/// host derived, and the history route carries both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_are_shown_and_explained() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hg.db");
    let svc = Service::start_admin(&db, ManualClock::at(T0_MS)).await;
    let token = svc.provision("ws", Workspace, true);
    let healthy = json!({"workspace_id": "ws", "error_rate": 0.0});
    svc.heartbeat(&token, healthy.clone()).await;
    svc.clock.advance(30_000);
    svc.heartbeat(
        &token,
        json!({"workspace_id": "ws", "error_rate": 0.6, "sample_error": "boom"}),
    )
    .await;
    assert_eq!(svc.status("ws"), "degraded");

    let shown: Value =
        serde_json::from_str(&cli(&db, &["--json", "workspace", "show", "ws"])).unwrap();
    let c = &shown["conditions"][0];
    assert_eq!(
        (
            &c["slot"],
            &c["owner"],
            &c["name"],
            &c["severity"],
            &c["reason"]
        ),
        (
            &json!("status-rules"),
            &json!("status-rules"),
            &json!("error-rate"),
            &json!("degraded"),
            &json!("error_rate_high")
        ),
        "{shown}"
    );
    assert_eq!(c["since_ms"], T0_MS + 30_000);
    assert_eq!(shown["status_since_ms"], T0_MS + 30_000);

    let explained = cli(&db, &["workspace", "explain", "ws"]);
    assert!(
        explained.contains("held back by error-rate of status-rules (degraded, error_rate_high"),
        "{explained}"
    );
    assert!(
        explained.contains("condition error-rate of status-rules set: degraded (error_rate_high)"),
        "{explained}"
    );
    assert!(
        explained
            .contains("host (from the conditions): set_status online->degraded (error_rate_high)"),
        "{explained}"
    );

    // Recovery clears it; the story says so, in order.
    svc.clock.advance(30_000);
    svc.heartbeat(&token, healthy).await;
    assert_eq!(svc.status("ws"), "online");
    let explained = cli(&db, &["workspace", "explain", "ws"]);
    let set = explained
        .find("condition error-rate of status-rules set")
        .unwrap();
    let cleared = explained
        .find("condition error-rate of status-rules cleared")
        .unwrap_or_else(|| panic!("{explained}"));
    let online = explained.rfind("status degraded -> online").unwrap();
    assert!(set < cleared && cleared < online, "{explained}");
    assert!(
        explained.contains("held back by no condition"),
        "{explained}"
    );

    let (status, history) = svc
        .get_as("/admin/workspaces/ws/history", Some(ADMIN))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["conditions"], json!([]));
    let kinds: Vec<&str> = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .filter(|k| k.starts_with("condition"))
        .collect();
    assert_eq!(kinds, ["condition_set", "condition_cleared"]);
    svc.stop().await;
}

/// A condition whose policy left the chain holds nothing back: nothing
/// could ever clear it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_leaves_the_chain_holds_nothing_back() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_admin(&dir.path().join("hg.db"), ManualClock::at(T0_MS)).await;
    let builtin = active(&svc).await["spec"].clone();
    let busy = push(&svc, guest("hold_busy")).await;
    let mut spec = builtin.clone();
    spec["slot"].as_array_mut().unwrap().push(
        json!({"name": "busy", "module": busy["module"], "grants": ["conditions", "record_event"]}),
    );
    activate(&svc, &spec).await;
    let token = svc.provision("ws", Workspace, true);
    svc.heartbeat(&token, beat("ws", 0, "idle")).await;
    svc.clock.advance(30_000);
    svc.heartbeat(&token, beat("ws", 80, "work")).await;
    assert_eq!(svc.status("ws"), "degraded");

    activate(&svc, &builtin).await;
    svc.clock.advance(30_000);
    svc.heartbeat(&token, beat("ws", 80, "work")).await;
    assert_eq!(svc.status("ws"), "online");
    svc.stop().await;
}

/// The capabilities a runtime declares (`runtime_metadata`, those set to
/// true) reach the policies evaluating that very request, register or
/// heartbeat, and are stored; a request without them clears them, as the
/// original registry does at every heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_capabilities_reach_the_policies() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_admin(&dir.path().join("hg.db"), ManualClock::at(T0_MS)).await;
    let token = svc.provision("ws", Workspace, true);
    let meta = json!({"capabilities": {"status_mgmt": true, "streaming": false}, "idle_timeout_seconds": 600});
    let register = |meta: Value| json!({"id": "ws", "url": "", "agent_card": {}, "delivery_mode": "poll", "runtime_metadata": meta});
    let (status, body) = svc.register(Some(&token), register(meta.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let registered = svc.store.decisions("ws", 10).unwrap();
    let registered = registered.last().unwrap();
    assert_eq!(registered.event_kind, "register");
    assert_eq!(
        registered.input["workspace"]["capabilities"],
        json!(["status_mgmt"])
    );
    assert_eq!(registered.input["workspace"]["idle_timeout_seconds"], 600);

    // The heartbeat's own row (a liveness-only one may be held a moment).
    let beat = |n: &'static str, meta: Option<&Value>| {
        let mut b = json!({"workspace_id": "ws", "current_task": n});
        if let Some(meta) = meta {
            b["runtime_metadata"] = meta.clone();
        }
        b
    };
    let row_of = |svc: &Service, n: &str| {
        svc.store
            .decisions("ws", 10)
            .unwrap()
            .into_iter()
            .find(|d| d.input["event"]["heartbeat"]["current_task"] == n)
    };
    svc.heartbeat(&token, beat("first", Some(&meta))).await;
    svc.wait_for("the first heartbeat's row", 10, |s| {
        row_of(s, "first").is_some()
    })
    .await;
    let first = row_of(&svc, "first").unwrap();
    assert_eq!(
        first.input["workspace"]["capabilities"],
        json!(["status_mgmt"])
    );

    svc.heartbeat(&token, beat("second", None)).await;
    svc.wait_for("the second heartbeat's row", 10, |s| {
        row_of(s, "second").is_some()
    })
    .await;
    let second = row_of(&svc, "second").unwrap();
    assert!(
        second.input["workspace"].get("capabilities").is_none(),
        "{}",
        second.input
    );
    assert_eq!(svc.workspace("ws")["capabilities"], json!([]));
    svc.stop().await;
}
