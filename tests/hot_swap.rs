//! Changing policies in a running service: push, stage with validation,
//! activate, roll back, shadow, and restart, over the real admin API.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{ADMIN, MINUTE_MS, Service, T0_MS};
use heartgate::clock::ManualClock;
use heartgate::deliverer::Secret;
use heartgate::model::WorkspaceKind::{Platform, Workspace};
use hyper::StatusCode;
use serde_json::{Value, json};

fn guest(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}.wasm", env!("HEARTGATE_TEST_GUESTS_DIR"))).unwrap()
}

async fn start(db: &std::path::Path, clock: ManualClock) -> Service {
    Service::start_admin(db, clock).await
}

async fn active(svc: &Service) -> Value {
    let (status, chain) = svc.get_as("/admin/chain", Some(ADMIN)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    chain
}

/// Push `module` and stage the active chain with `slot` running it.
async fn stage_with(svc: &Service, slot: &str, module: Vec<u8>) -> Value {
    let (status, pushed) = svc.admin("POST", "/admin/modules", module).await;
    assert_eq!(status, StatusCode::CREATED, "{pushed}");
    let mut spec = active(svc).await["spec"].clone();
    let target = spec["slot"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["name"] == slot)
        .unwrap();
    target["module"] = pushed["module"].clone();
    let (status, staged) = svc.admin("POST", "/admin/chains", spec.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{staged}");
    staged
}

fn mcp_missing(id: &str) -> Value {
    json!({"workspace_id": id, "mcp_server_present": false})
}

/// The shadow's report once it has evaluated `n` requests (it decides off
/// the request path, so a little after their answers).
async fn shadow_report_after(svc: &Service, n: usize) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, report) = svc.get_as("/admin/shadow", Some(ADMIN)).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        if report["evaluated"] == n {
            return report;
        }
        assert!(std::time::Instant::now() < deadline, "{report}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Whether final actions request an `mcp-recovery`.
fn fires(actions: &Value) -> bool {
    actions
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["kind"] == "request_reconcile" && a["trigger"] == "mcp-recovery")
}

/// The seconds after [`T0_MS`] of the differences in a shadow report.
fn diff_times(report: &Value) -> Vec<i64> {
    report["recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["at_ms"].as_i64().unwrap() - T0_MS) / 1000)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_last_activated_chain() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let clock = ManualClock::at(T0_MS);
    let svc = start(&db, clock.clone()).await;
    let builtin = active(&svc).await["version"].clone();
    let staged = stage_with(&svc, "cooldown", guest("cooldown_1m")).await;
    let id = staged["id"].as_i64().unwrap();
    let (status, activated) = svc
        .admin("POST", &format!("/admin/chains/{id}/activate"), "")
        .await;
    assert_eq!(status, StatusCode::OK, "{activated}");
    assert_eq!(activated["state"], "active");
    let chain = active(&svc).await;
    assert_eq!(chain["version"], staged["version"]);
    assert_ne!(chain["version"], builtin);
    assert_eq!(chain["stored"]["activated_by"], "admin");
    svc.stop().await;

    let svc = start(&db, clock.clone()).await;
    let chain = active(&svc).await;
    assert_eq!(
        chain["version"], staged["version"],
        "the restart came back with the activated chain"
    );
    assert_eq!(chain["stored"]["id"], id);
    // And it behaves as that chain: recovery is cooled for one minute only.
    let token = svc.provision("ws", Platform, true);
    svc.force_status("ws", "online");
    svc.heartbeat(&token, mcp_missing("ws")).await;
    clock.advance(MINUTE_MS);
    svc.heartbeat(&token, mcp_missing("ws")).await;
    assert_eq!(svc.runs("ws", "mcp-recovery"), 2);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_candidate_is_rejected_while_old_chain_serves() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir.path().join("heartgate.db"), ManualClock::at(T0_MS)).await;
    let before = active(&svc).await;
    let token = svc.provision("ws", Workspace, false);

    // Refused at push: not a component, and no metadata.
    let (status, body) = svc
        .admin("POST", "/admin/modules", b"not wasm".to_vec())
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a valid policy component"),
        "{body}"
    );
    let (status, body) = svc
        .admin("POST", "/admin/modules", guest("wasi_user"))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("imports `wasi:") && error.contains("policies may import nothing"),
        "{error}"
    );
    let (status, body) = svc
        .admin("POST", "/admin/modules", guest("no_metadata"))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("metadata is incomplete"),
        "{body}"
    );

    // Refused at stage: traps, loops, and an ungranted action in the smoke set.
    for (module, reason) in [
        ("always_trap", "trap"),
        ("always_loop", "timeout"),
        ("noisy", "not granted `record_event`"),
    ] {
        let (status, pushed) = svc.admin("POST", "/admin/modules", guest(module)).await;
        assert_eq!(status, StatusCode::CREATED);
        let mut spec = before["spec"].clone();
        spec["slot"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "candidate", "module": pushed["module"]}));
        let (status, body) = svc.admin("POST", "/admin/chains", spec.to_string()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{module}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("smoke input") && error.contains(reason),
            "{module}: {error}"
        );
    }

    // Refused at stage: a fixture that the module does not pass.
    let mut stage = before["spec"].clone();
    stage["fixtures"] = json!([{"slot": "gate", "fixtures": [{
        "name": "legacy runtime is failed (wrong on purpose)",
        "input": {"event": {"heartbeat": {}}, "workspace": {"id": "w", "kind": "platform",
                  "status": "online", "model_configured": true}, "now_ms": 0},
        "expected": [{"workspace_id": "w", "kind": "reject", "http_status": 400, "message": "x"}]
    }]}]);
    let (status, body) = svc.admin("POST", "/admin/chains", stage.to_string()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("fails fixture `legacy runtime is failed"),
        "{body}"
    );

    // Nothing to roll back to, and no such chain.
    assert_eq!(
        svc.admin("POST", "/admin/chains/rollback", "").await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        svc.admin("POST", "/admin/chains/999/activate", "").await.0,
        StatusCode::NOT_FOUND
    );

    // The old chain is untouched and keeps serving.
    assert_eq!(active(&svc).await["version"], before["version"]);
    svc.force_status("ws", "offline");
    assert_eq!(
        svc.heartbeat(&token, json!({"workspace_id": "ws"})).await.0,
        StatusCode::OK
    );
    assert_eq!(svc.status("ws"), "online");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_shows_cooldown_difference() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at(T0_MS);
    let svc = start(&dir.path().join("heartgate.db"), clock.clone()).await;
    let staged = stage_with(&svc, "cooldown", guest("cooldown_1m")).await;
    let (status, _) = svc
        .admin(
            "POST",
            "/admin/shadow",
            json!({"chain": staged["id"]}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let token = svc.provision("concierge", Platform, true);
    svc.force_status("concierge", "online");
    // A replayed sequence of MCP-missing heartbeats (seconds after the first).
    // The active chain fires at 0 and 300; the one-minute candidate, on its
    // own marker, at 0, 61 and 299: they differ at 61, 299 and 300.
    let mut at = 0;
    for second in [0, 30, 61, 120, 299, 300] {
        clock.advance((second - at) * 1000);
        at = second;
        assert_eq!(
            svc.heartbeat(&token, mcp_missing("concierge")).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        svc.runs("concierge", "mcp-recovery"),
        2,
        "the shadow had no effects"
    );

    let report = shadow_report_after(&svc, 6).await;
    assert_eq!(report["differed"], 3, "{report}");
    assert_eq!(diff_times(&report), [61, 299, 300]);
    let recent = report["recent"].as_array().unwrap();
    for diff in &recent[..2] {
        assert!(!fires(&diff["active"]) && fires(&diff["shadow"]), "{diff}");
    }
    assert!(
        fires(&recent[2]["active"]) && !fires(&recent[2]["shadow"]),
        "{}",
        recent[2]
    );
    let (status, stopped) = svc.admin("DELETE", "/admin/shadow", "").await;
    assert_eq!(
        (status, stopped["differed"].as_i64()),
        (StatusCode::OK, Some(3))
    );
    svc.stop().await;
}

/// A shadow chain keeps markers of its own: a one-minute cooldown in a slot
/// of its own (whose marker the active chain never writes) fires in the
/// shadow once a minute, not on every heartbeat, and the real markers are
/// only the active chain's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_keeps_its_own_markers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at(T0_MS);
    let svc = start(&dir.path().join("heartgate.db"), clock.clone()).await;
    let (status, pushed) = svc
        .admin("POST", "/admin/modules", guest("cooldown_1m"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pushed}");
    let mut spec = active(&svc).await["spec"].clone();
    let cooldown = spec["slot"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["name"] == "cooldown")
        .unwrap();
    cooldown["name"] = json!("cooldown-1m");
    cooldown["module"] = pushed["module"].clone();
    let (status, staged) = svc.admin("POST", "/admin/chains", spec.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{staged}");
    let (status, _) = svc
        .admin(
            "POST",
            "/admin/shadow",
            json!({"chain": staged["id"]}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let token = svc.provision("concierge", Platform, true);
    svc.force_status("concierge", "online");
    // MCP-missing heartbeats every ten seconds or so for 70 s: the active
    // chain fires at 0 only; an honest shadow fires at 0 and 61, so the one
    // difference is at 61. A shadow reading the real markers never sees its
    // own slot's and fires on every heartbeat.
    let seconds = [0, 10, 20, 30, 40, 50, 61, 70];
    let mut at = 0;
    for second in seconds {
        clock.advance((second - at) * 1000);
        at = second;
        assert_eq!(
            svc.heartbeat(&token, mcp_missing("concierge")).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(svc.runs("concierge", "mcp-recovery"), 1);

    let report = shadow_report_after(&svc, seconds.len()).await;
    assert_eq!(diff_times(&report), [61], "the shadow's differences");
    assert_eq!(report["differed"], 1);
    let diff = &report["recent"][0];
    assert!(!fires(&diff["active"]) && fires(&diff["shadow"]), "{diff}");

    // The real markers are the active chain's alone.
    let real = svc
        .store
        .load("concierge", heartgate::store::Read::Fresh)
        .unwrap()
        .unwrap();
    let real: Vec<_> = real
        .markers
        .iter()
        .map(|m| {
            (
                m.slot.as_deref().unwrap(),
                m.owner.as_str(),
                m.value.as_str(),
            )
        })
        .collect();
    assert_eq!(
        real,
        [("cooldown", "recovery-cooldown", T0_MS.to_string().as_str())]
    );
    // The shadow's are its own: its last fire, in its own slot, and the
    // gate's condition it set itself.
    let chain = staged["id"].as_i64().unwrap();
    let own = svc.store.shadow_state(chain, "concierge").unwrap().unwrap();
    let markers: Vec<_> = own
        .markers
        .iter()
        .map(|m| {
            (
                m.slot.as_deref().unwrap(),
                m.owner.as_str(),
                m.value.clone(),
            )
        })
        .collect();
    assert_eq!(
        markers,
        [(
            "cooldown-1m",
            "recovery-cooldown",
            (T0_MS + 61_000).to_string()
        )]
    );
    let conditions: Vec<_> = own
        .conditions
        .iter()
        .map(|c| (c.name.as_str(), c.since_ms))
        .collect();
    assert_eq!(conditions, [("identity", T0_MS)]);

    // Stopped, it leaves nothing behind.
    let (status, stopped) = svc.admin("DELETE", "/admin/shadow", "").await;
    assert_eq!(
        (status, stopped["differed"].as_i64()),
        (StatusCode::OK, Some(1))
    );
    assert_eq!(svc.store.shadow_state(chain, "concierge").unwrap(), None);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_swap_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir.path().join("heartgate.db"), ManualClock::at(T0_MS)).await;
    hot_swap_under_load(svc, "hot_swap_under_load_loses_nothing").await;
}

/// The same with the state in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_loses_nothing_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let svc =
        Service::start_admin_on_postgres(&dir.path().join("heartgate.db"), ManualClock::at(T0_MS))
            .await;
    hot_swap_under_load(svc, "hot_swap_under_load_loses_nothing_on_postgres").await;
}

async fn hot_swap_under_load(svc: Service, name: &str) {
    let svc = Arc::new(svc);
    let startup = active(&svc).await;
    let a = stage_with(&svc, "cooldown", guest("cooldown_1m")).await;
    let b = stage_with(&svc, "cooldown", guest("cooldown")).await;

    // Load: 16 workspaces, one client each, heartbeating as fast as they can.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..16 {
        let id = format!("ws-{i}");
        let token = svc.provision(&id, if i % 2 == 0 { Platform } else { Workspace }, true);
        let (svc, stop, sent) = (svc.clone(), stop.clone(), sent.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let beat = json!({"workspace_id": id, "error_rate": if n.is_multiple_of(7) { 0.6 } else { 0.0 },
                                  "mcp_server_present": !n.is_multiple_of(5)});
                let (status, body) = svc.heartbeat(&token, beat).await;
                if status != StatusCode::OK {
                    failures.push(format!("{status} {body}"));
                }
                sent.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            failures
        }));
    }

    // 20 swaps between the two chains, one of them a rollback.
    let ids = [a["id"].as_i64().unwrap(), b["id"].as_i64().unwrap()];
    for swap in 0..20 {
        let before = sent.load(Ordering::Relaxed);
        let (status, body) = if swap == 10 {
            svc.admin("POST", "/admin/chains/rollback", "").await
        } else {
            svc.admin(
                "POST",
                &format!("/admin/chains/{}/activate", ids[swap % 2]),
                "",
            )
            .await
        };
        assert_eq!(status, StatusCode::OK, "swap {swap}: {body}");
        svc.wait_for("traffic between swaps", 30, |_| {
            sent.load(Ordering::Relaxed) >= before + 20
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let total = sent.load(Ordering::Relaxed);
    assert!(total >= 400, "only {total} heartbeats");

    // Every decision names exactly one complete chain: its version, and the
    // policies of every slot of that chain with their digests.
    let startup_stored = json!({"version": startup["version"], "spec": startup["spec"]});
    let chains: HashMap<String, Vec<(String, String)>> = [&a, &b, &startup_stored]
        .iter()
        .map(|c| {
            let spec = &c["spec"];
            let slots = spec["slot"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap().to_string(),
                        s["module"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            (c["version"].as_str().unwrap().to_string(), slots)
        })
        .collect();
    // Built-in slots are named `builtin:<name>`; their digests are the ones
    // the service started with.
    let builtin_digest: HashMap<String, String> = startup["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["slot"].as_str().unwrap().to_string(),
                s["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let digests_of = |slots: &[(String, String)]| -> Vec<(String, String)> {
        slots
            .iter()
            .map(|(name, module)| {
                let digest = match module.strip_prefix("sha256:") {
                    Some(d) => d.to_string(),
                    None => builtin_digest[name].clone(),
                };
                (name.clone(), digest)
            })
            .collect()
    };
    let mut versions = HashSet::new();
    let mut decisions = 0;
    for i in 0..16 {
        for d in svc.store.decisions(&format!("ws-{i}"), 100_000).unwrap() {
            decisions += 1;
            let version = d.chain_version.clone();
            let expected = digests_of(
                chains
                    .get(&version)
                    .unwrap_or_else(|| panic!("unknown chain {version}")),
            );
            let steps = d.steps.as_array().unwrap();
            assert_eq!(
                steps.len(),
                expected.len(),
                "a decision by a partial chain: {d:?}"
            );
            for (step, (slot, digest)) in steps.iter().zip(&expected) {
                assert_eq!(step["slot"].as_str(), Some(slot.as_str()));
                assert_eq!(step["digest"].as_str(), Some(digest.as_str()), "{d:?}");
            }
            versions.insert(version);
        }
    }
    assert!(
        versions.contains(a["version"].as_str().unwrap())
            && versions.contains(b["version"].as_str().unwrap()),
        "decisions by both chains: {versions:?}"
    );
    println!("{name}: {total} heartbeats, {decisions} decisions, 20 swaps, 0 failed");
    Arc::try_unwrap(svc).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_activates_changed_files_through_validation() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let watched = dir.path().join("policies.d");
    std::fs::create_dir(&watched).unwrap();
    let dir_for_opts = watched.clone();
    let svc = Service::start_with(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        "127.0.0.1:0",
        move |o| {
            o.admin_token = Some(Secret::Value(ADMIN.into()));
            o.watch_dir = Some(dir_for_opts);
        },
    )
    .await;
    let digest = |bytes: &[u8]| heartgate::engine::hex(&sha2::Sha256::digest(bytes));
    let cooldown_digest = |chain: &Value| {
        chain["slots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["slot"] == "cooldown")
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // A changed file is validated and activated in its slot.
    let candidate = guest("cooldown_1m");
    std::fs::write(watched.join("cooldown.wasm"), &candidate).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cooldown_digest(&active(&svc).await) != digest(&candidate) {
        assert!(
            std::time::Instant::now() < deadline,
            "the watched file was never activated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let activated = active(&svc).await;
    assert_eq!(activated["stored"]["activated_by"], "watch");

    // A bad one is refused and the active chain stays.
    let bad = guest("always_trap");
    std::fs::write(watched.join("cooldown.wasm"), &bad).unwrap();
    svc.wait_for("the watcher to take the bad file", 30, |s| {
        s.store.module_bytes(&digest(&bad)).unwrap().is_some()
    })
    .await;
    // It was pushed (a valid component) but its chain failed validation.
    assert_eq!(active(&svc).await["version"], activated["version"]);

    // The watcher handles files one at a time: once a later good file is
    // active, the bad one has been fully dealt with, and no chain with it was
    // ever staged or activated.
    let good = guest("cooldown");
    std::fs::write(watched.join("cooldown.wasm"), &good).unwrap();
    while cooldown_digest(&active(&svc).await) != digest(&good) {
        assert!(
            std::time::Instant::now() < deadline + std::time::Duration::from_secs(30),
            "the good file was never activated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let newest = active(&svc).await["stored"]["id"].as_i64().unwrap();
    for id in 1..=newest {
        let chain = svc.store.chain(id).unwrap().unwrap();
        assert!(
            !chain.spec.contains(&digest(&bad)),
            "chain {id} runs the refused module"
        );
    }
    svc.stop().await;
}
