//! Safety as an operator and an attacker test it from outside (issue 14):
//! no probe or reader corrupts the database, a revoked token is dead at once
//! and a revoked workspace stays closed, a pushed module cannot take over a
//! built-in policy's state, a full disk is said out loud and never hidden
//! behind an early acknowledgement, and no input grows the database or
//! exhausts the process.
//!
//! Most of these run the real `heartgate` binary and the real CLI as
//! separate processes (and the `sqlite3` shell and Python's `sqlite3` as
//! other readers), because that is where the bugs were: between processes.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::{
    self, Answer, HttpClient, Serve, Tmpfs, cli, cli_output, http_client, integrity_check, open_db,
    post_heartbeat, provision, request, write_config,
};
use common::{ADMIN, MINUTE_MS, Service, T0_MS};
use heartgate::clock::ManualClock;
use heartgate::deliverer::Secret;
use heartgate::model::WorkspaceKind::{Platform, Workspace};
use hyper::StatusCode;
use serde_json::{Value, json};

/// How long the load of `sqlite_readers_and_probes_never_lose_data` runs
/// (`HEARTGATE_SAFETY_SECS` runs it longer).
fn load_secs() -> u64 {
    std::env::var("HEARTGATE_SAFETY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

async fn get(client: &HttpClient, url: String) -> Result<Answer, String> {
    request(client, "GET", &url, None, Vec::new()).await
}

async fn post(client: &HttpClient, url: String, bearer: Option<&str>, body: &Value) -> Answer {
    request(client, "POST", &url, bearer, body.to_string().into_bytes())
        .await
        .unwrap()
}

/// `current_task` of a heartbeat decision's input: every heartbeat these
/// tests send carries a nonce there.
fn nonce_of(input: &Value) -> Option<String> {
    input["event"]["heartbeat"]["current_task"]
        .as_str()
        .map(str::to_string)
}

/// What the heartbeat decisions of `db` stand for: the nonces they hold, and
/// by workspace how many heartbeats they count (coalesced ones included).
fn heartbeat_decisions(db: &Path) -> (Vec<String>, HashMap<String, i64>) {
    let conn = open_db(db);
    let mut stmt = conn
        .prepare(
            "SELECT workspace_id, input, heartbeats FROM decisions
             WHERE event_kind = 'heartbeat' ORDER BY id",
        )
        .unwrap();
    let mut nonces = Vec::new();
    let mut counts: HashMap<String, i64> = HashMap::new();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .unwrap();
    for row in rows {
        let (ws, input, heartbeats) = row.unwrap();
        let input: Value = serde_json::from_str(&input).unwrap();
        nonces.extend(nonce_of(&input));
        *counts.entry(ws).or_default() += heartbeats;
    }
    (nonces, counts)
}

/// Acknowledged heartbeats, by workspace: their nonces and whether each was
/// committed before its answer.
#[derive(Default)]
struct Acked {
    by_workspace: HashMap<String, Vec<(String, bool)>>,
    refused: Vec<String>,
}

/// Every heartbeat acknowledged is in the decision log: each committed one
/// by its nonce, and by count (coalesced rows count every heartbeat they
/// stand for) exactly as many as were acknowledged, when nothing was killed.
fn assert_every_acknowledged_heartbeat_is_stored(db: &Path, acked: &Acked) {
    let (nonces, counts) = heartbeat_decisions(db);
    let stored: std::collections::HashSet<&str> = nonces.iter().map(String::as_str).collect();
    for (ws, beats) in &acked.by_workspace {
        for (nonce, committed) in beats {
            if *committed {
                assert!(
                    stored.contains(nonce.as_str()),
                    "heartbeat {nonce} of `{ws}` was acknowledged as committed but is not stored"
                );
            }
        }
        let want = beats.len() as i64;
        let got = counts.get(ws).copied().unwrap_or(0);
        assert_eq!(
            got, want,
            "`{ws}`: {want} heartbeats acknowledged, the decision log stands for {got}"
        );
    }
}

// ---------------------------------------------------------------------------
// 1. Probes and other SQLite readers.

/// The `sqlite3` shell opening, reading and closing the database `rounds`
/// times in one process (each `.open` closes the connection before).
fn sqlite3_shell_reader(db: &Path, rounds: usize) -> std::process::Child {
    let mut child = Command::new("sqlite3")
        .arg("-batch")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the sqlite3 shell (Debian package `sqlite3`; .ci/run installs it)");
    let mut script = String::new();
    for _ in 0..rounds {
        script.push_str(&format!(
            ".open {}\n.timeout 5000\nSELECT COUNT(*) FROM workspaces;\nSELECT COUNT(*) FROM decisions;\n",
            db.display()
        ));
    }
    script.push_str(".quit\n");
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let _ = stdin.write_all(script.as_bytes());
    });
    child
}

/// Python's `sqlite3` connecting, reading and closing until `stop` exists.
fn python_reader(db: &Path, stop: &Path) -> std::process::Child {
    let program = r#"
import os, sqlite3, sys, time
db, stop = sys.argv[1], sys.argv[2]
n = 0
while not os.path.exists(stop):
    c = sqlite3.connect(db, timeout=5)
    c.execute("select count(*) from workspaces").fetchall()
    c.execute("select count(*) from decisions").fetchall()
    c.close()
    n += 1
    time.sleep(0.002)
print(n)
"#;
    Command::new("python3")
        .args(["-c", program])
        .arg(db)
        .arg(stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_readers_and_probes_never_lose_data() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let config = write_config(dir.path(), "");
    let workspaces: Vec<(String, String)> = (0..6)
        .map(|i| {
            let id = format!("ws-{i}");
            let token = provision(&db, &id, false);
            (id, token)
        })
        .collect();
    let serve = Serve::start_ready(&db, &config, &dir.path().join("serve.log")).await;
    let base = serve.url();
    let client = http_client();
    for (id, token) in &workspaces {
        let body = json!({"id": id, "url": "http://agent:8000", "agent_card": {"name": id}});
        let answer = post(
            &client,
            format!("{base}/registry/register"),
            Some(token),
            &body,
        )
        .await;
        assert_eq!(answer.status, 200, "{:?}", answer.json());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let registers = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // Heartbeats, two clients.
    for task in 0..2 {
        let (client, base, stop, acked) =
            (http_client(), base.clone(), stop.clone(), acked.clone());
        let workspaces = workspaces.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (id, token) = &workspaces[(n as usize + task) % workspaces.len()];
                let nonce = format!("t{task}-{n}");
                n += 1;
                let body = json!({"workspace_id": id, "current_task": nonce, "uptime_seconds": n});
                let answer = post_heartbeat(&client, &base, token, &body).await;
                let mut acked = acked.lock().unwrap();
                match answer {
                    Ok(a) if a.status == 200 => acked
                        .by_workspace
                        .entry(id.clone())
                        .or_default()
                        .push((nonce, a.committed())),
                    Ok(a) => acked.refused.push(format!(
                        "heartbeat {nonce}: {} {}",
                        a.status,
                        String::from_utf8_lossy(&a.body)
                    )),
                    Err(e) => acked.refused.push(format!("heartbeat {nonce}: {e}")),
                }
            }
        }));
    }
    // Registers.
    {
        let (client, base, stop, acked) =
            (http_client(), base.clone(), stop.clone(), acked.clone());
        let (workspaces, registers) = (workspaces.clone(), registers.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let (id, token) = &workspaces[n % workspaces.len()];
                n += 1;
                let body = json!({"id": id, "url": format!("http://agent-{n}:8000"), "agent_card": {"name": id}});
                let answer = post(&client, format!("{base}/registry/register"), Some(token), &body).await;
                if answer.status == 200 {
                    registers.fetch_add(1, Ordering::Relaxed);
                } else {
                    acked.lock().unwrap().refused.push(format!(
                        "register {n}: {} {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // Probes: /readyz and /metrics, back to back.
    let probes = Arc::new(AtomicU64::new(0));
    {
        let (client, base, stop, probes) =
            (http_client(), base.clone(), stop.clone(), probes.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for path in ["/readyz", "/metrics"] {
                    let answer = get(&client, format!("{base}{path}")).await.unwrap();
                    assert!(
                        answer.status == 200 || path == "/readyz",
                        "{path}: {}",
                        answer.status
                    );
                    probes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // CLI writes: workspaces added by another process.
    let added = {
        let (db, stop) = (db.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut added = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("added-{n}");
                n += 1;
                let out = cli_output(&db, &["workspace", "add", &id]);
                assert!(
                    out.status.success(),
                    "workspace add {id}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                added.push(id);
            }
            added
        })
    };
    // Other readers: the sqlite3 shell and Python, opening and closing.
    let stop_file = dir.path().join("stop-readers");
    let python = python_reader(&db, &stop_file);
    let mut shells = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(load_secs()) {
        shells.push(sqlite3_shell_reader(&db, 200));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    std::fs::write(&stop_file, "").unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let added = added.await.unwrap();
    for mut shell in shells {
        let status = shell.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(shell.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(status.success(), "the sqlite3 shell failed: {err}");
    }
    let out = python.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Python reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python_rounds: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let mut serve = serve;
    serve.stop().await;

    let acked = Arc::try_unwrap(acked).ok().unwrap().into_inner().unwrap();
    let beats: usize = acked.by_workspace.values().map(Vec::len).sum();
    eprintln!(
        "{beats} heartbeats, {} registers, {} workspaces added by the CLI, {} probes, \
         {python_rounds} Python connections, {} sqlite3 shells",
        registers.load(Ordering::Relaxed),
        added.len(),
        probes.load(Ordering::Relaxed),
        load_secs() * 2
    );
    assert!(
        acked.refused.is_empty(),
        "requests refused under the readers: {:#?}",
        &acked.refused[..acked.refused.len().min(20)]
    );
    assert!(beats > 100 && python_rounds > 100 && !added.is_empty());
    let conn = open_db(&db);
    integrity_check(&conn);
    for id in &added {
        let present: bool = conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM workspaces WHERE id = ?1)",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert!(present, "workspace `{id}` added by the CLI was lost");
    }
    let stored_registers: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM decisions WHERE event_kind = 'register'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        stored_registers as u64 >= registers.load(Ordering::Relaxed) + workspaces.len() as u64,
        "registers were lost"
    );
    assert_every_acknowledged_heartbeat_is_stored(&db, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_backup_copies_a_live_database_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let config = write_config(dir.path(), "");
    let token = provision(&db, "ws", false);
    let mut serve = Serve::start_ready(&db, &config, &dir.path().join("serve.log")).await;
    let base = serve.url();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, base, stop, token) =
            (http_client(), base.clone(), stop.clone(), token.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = json!({"workspace_id": "ws", "current_task": format!("b{n}")});
                let answer = post_heartbeat(&client, &base, &token, &body).await.unwrap();
                assert_eq!(answer.status, 200);
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let backup = dir.path().join("backup.db");
    let db2 = db.clone();
    let backup2 = backup.clone();
    let out = tokio::task::spawn_blocking(move || {
        cli_output(&db2, &["db", "backup", backup2.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "db backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It refuses to overwrite a file.
    let again = cli_output(&db, &["db", "backup", backup.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    serve.stop().await;
    let copy = open_db(&backup);
    integrity_check(&copy);
    let beats: i64 = copy
        .query_row(
            "SELECT COALESCE(SUM(heartbeats), 0) FROM decisions WHERE workspace_id = 'ws'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        beats > 0 && beats as u64 <= sent,
        "the copy holds {beats} of {sent} heartbeats: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    integrity_check(&open_db(&db));
}

// ---------------------------------------------------------------------------
// 2 and 3. Revoked tokens.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_is_refused_immediately() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let config = write_config(dir.path(), "");
    cli(&db, &["workspace", "add", "ws"]);
    let mut serve = Serve::start_ready(&db, &config, &dir.path().join("serve.log")).await;
    let base = serve.url();
    let client = http_client();
    let beat = |n: u64| json!({"workspace_id": "ws", "current_task": format!("n{n}")});
    let mut after_revoke = 0usize;
    for round in 0..15u64 {
        let token = cli(&db, &["token", "issue", "ws"]).trim().to_string();
        // The snapshot cache holds the workspace with this token.
        for n in 0..3 {
            let a = post_heartbeat(&client, &base, &token, &beat(n))
                .await
                .unwrap();
            assert_eq!(a.status, 200, "round {round}: {:?}", a.json());
        }
        // Heartbeats in flight during the revoke, each noting when it was sent.
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::<(Instant, u16)>::new()));
        let flood: Vec<_> = (0..3)
            .map(|_| {
                let (client, base, token) = (http_client(), base.clone(), token.clone());
                let (stop, seen) = (stop.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let sent = Instant::now();
                        let body = json!({"workspace_id": "ws", "current_task": format!("f{n}")});
                        if let Ok(a) = post_heartbeat(&client, &base, &token, &body).await {
                            seen.lock().unwrap().push((sent, a.status));
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let db2 = db.clone();
        tokio::task::spawn_blocking(move || cli(&db2, &["token", "revoke", "ws"]))
            .await
            .unwrap();
        let revoked_at = Instant::now();
        for n in 0..5 {
            let a = post_heartbeat(&client, &base, &token, &beat(n))
                .await
                .unwrap();
            assert_eq!(
                a.status, 401,
                "round {round}: heartbeat {n} after the revoke returned: {} {:?}",
                a.status, a.durability
            );
        }
        let register = json!({"id": "ws", "url": "http://agent:8000", "agent_card": {}});
        let a = post(
            &client,
            format!("{base}/registry/register"),
            Some(&token),
            &register,
        )
        .await;
        assert_eq!(a.status, 401, "round {round}: a register after the revoke");
        tokio::time::sleep(Duration::from_millis(30)).await;
        stop.store(true, Ordering::Relaxed);
        for f in flood {
            f.await.unwrap();
        }
        for (sent, status) in seen.lock().unwrap().iter() {
            if *sent > revoked_at {
                after_revoke += 1;
                assert_eq!(
                    *status, 401,
                    "round {round}: a heartbeat sent after the revoke returned got {status}"
                );
            }
        }
    }
    assert!(
        after_revoke > 0,
        "no heartbeat of the flood came after a revoke"
    );
    serve.stop().await;
}

/// A heartbeat of `id` with `bearer`.
async fn heartbeat_as(client: &HttpClient, base: &str, bearer: Option<&str>, id: &str) -> Answer {
    let body = json!({"workspace_id": id});
    post(client, format!("{base}/registry/heartbeat"), bearer, &body).await
}

/// A register of `id` with `bearer`.
async fn register_as(client: &HttpClient, base: &str, bearer: Option<&str>, id: &str) -> Answer {
    let body = json!({"id": id, "url": "http://agent:8000", "agent_card": {"name": id}});
    post(client, format!("{base}/registry/register"), bearer, &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_workspace_cannot_be_bootstrapped_by_anyone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let config = write_config(dir.path(), "");
    let old = provision(&db, "ws", false);
    cli(&db, &["workspace", "add", "fresh"]);
    let mut serve = Serve::start_ready(&db, &config, &dir.path().join("serve.log")).await;
    let (client, base) = (http_client(), serve.url());

    let a = register_as(&client, &base, Some(&old), "ws").await;
    assert_eq!(a.status, 200);
    assert!(a.json().get("auth_token").is_none());
    cli(&db, &["token", "revoke", "ws"]);

    // Nobody gets in: the old token, a made-up one, no token at all.
    for bearer in [Some(old.as_str()), Some("made-up-token"), None] {
        let hb = heartbeat_as(&client, &base, bearer, "ws").await;
        assert_eq!(hb.status, 401, "heartbeat with {bearer:?}: {:?}", hb.json());
        let reg = register_as(&client, &base, bearer, "ws").await;
        assert_eq!(
            reg.status,
            401,
            "register with {bearer:?}: {:?}",
            reg.json()
        );
        assert!(reg.json().get("auth_token").is_none(), "a token was minted");
    }
    let shown: Value =
        serde_json::from_str(&cli(&db, &["--json", "workspace", "show", "ws"])).unwrap();
    assert_eq!(shown["live_tokens"], 0, "{shown}");
    assert_eq!(shown["token_bootstrap"], false, "{shown}");

    // The operator issues a token: it works, and only it.
    let issued = cli(&db, &["token", "issue", "ws"]).trim().to_string();
    assert_eq!(
        heartbeat_as(&client, &base, Some(&issued), "ws")
            .await
            .status,
        200
    );
    assert_eq!(heartbeat_as(&client, &base, None, "ws").await.status, 401);

    // Or reopens bootstrap explicitly: the next register mints a token.
    cli(&db, &["token", "revoke", "ws", "--allow-bootstrap"]);
    let reg = register_as(&client, &base, None, "ws").await;
    assert_eq!(reg.status, 200, "{:?}", reg.json());
    let minted = reg.json()["auth_token"].as_str().unwrap().to_string();
    assert_eq!(
        heartbeat_as(&client, &base, Some(&minted), "ws")
            .await
            .status,
        200
    );
    // Once bootstrapped, it is closed again.
    assert_eq!(register_as(&client, &base, None, "ws").await.status, 401);

    // A workspace that never had a token bootstraps as before.
    let reg = register_as(&client, &base, None, "fresh").await;
    assert_eq!(reg.status, 200, "{:?}", reg.json());
    assert!(reg.json()["auth_token"].is_string());
    serve.stop().await;
}

// ---------------------------------------------------------------------------
// 4. Marker ownership.

fn guest(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}.wasm", env!("HEARTGATE_TEST_GUESTS_DIR"))).unwrap()
}

fn last_fire(db: &Path) -> Vec<(String, String)> {
    let conn = open_db(db);
    let mut stmt = conn
        .prepare("SELECT slot, value FROM policy_markers WHERE key = 'last-fire-ms' ORDER BY slot")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_module_cannot_impersonate_a_builtin() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let clock = ManualClock::at(T0_MS);
    let svc = Service::start_admin(&db, clock.clone()).await;
    let token = svc.provision("ws", Platform, true);
    svc.force_status("ws", "online");
    let missing = json!({"workspace_id": "ws", "mcp_server_present": false});
    svc.heartbeat(&token, missing.clone()).await;
    assert_eq!(svc.runs("ws", "mcp-recovery"), 1);
    let fired = last_fire(&db);
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].0, "cooldown", "the marker is the cooldown slot's");

    let (status, pushed) = svc.admin("POST", "/admin/modules", guest("impostor")).await;
    assert_eq!(status, StatusCode::CREATED, "{pushed}");
    assert_eq!(pushed["name"], "recovery-cooldown");
    let (_, chain) = svc.get_as("/admin/chain", Some(ADMIN)).await.unwrap();
    let builtin = chain["spec"].clone();

    // Beside the cooldown it claims: refused at staging, naming both slots.
    let mut spec = builtin.clone();
    spec["slot"].as_array_mut().unwrap().push(json!({
        "name": "impostor", "module": pushed["module"], "grants": ["markers"]
    }));
    let (status, refused) = svc.admin("POST", "/admin/chains", spec.to_string()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    let why = refused["error"].as_str().unwrap();
    for want in ["recovery-cooldown", "`cooldown`", "`impostor`"] {
        assert!(why.contains(want), "`{want}` missing: {why}");
    }

    // In a slot of its own, with no cooldown in the chain, it sees nothing
    // of the cooldown's and clears nothing.
    let mut spec = builtin.clone();
    let slots = spec["slot"].as_array_mut().unwrap();
    slots.retain(|s| s["name"] != "cooldown");
    slots.push(json!({"name": "impostor", "module": pushed["module"], "grants": ["markers"]}));
    let (status, staged) = svc.admin("POST", "/admin/chains", spec.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{staged}");
    let id = staged["id"].as_i64().unwrap();
    let (status, _) = svc
        .admin("POST", &format!("/admin/chains/{id}/activate"), "")
        .await;
    assert_eq!(status, StatusCode::OK);
    clock.advance(1_000);
    svc.heartbeat(&token, missing.clone()).await;
    assert_eq!(
        last_fire(&db),
        fired,
        "the impostor touched the cooldown's marker"
    );
    let runs_with_impostor = svc.runs("ws", "mcp-recovery");

    // Back on the built-in chain, the cooldown still holds its window.
    let (status, _) = svc.admin("POST", "/admin/chains/rollback", "").await;
    assert_eq!(status, StatusCode::OK);
    for _ in 0..4 {
        clock.advance(MINUTE_MS / 2);
        svc.heartbeat(&token, missing.clone()).await;
    }
    assert_eq!(svc.runs("ws", "mcp-recovery"), runs_with_impostor);
    svc.stop().await;

    // A chain file with two slots claiming one name is refused too.
    let file = dir.path().join("two.toml");
    std::fs::write(
        &file,
        "[[chain.slot]]\nname = \"a\"\nmodule = \"builtin:cooldown\"\n\
         [[chain.slot]]\nname = \"b\"\nmodule = \"builtin:cooldown\"\n",
    )
    .unwrap();
    let out = Command::new(binary::heartgate())
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("recovery-cooldown"), "{err}");
}

// ---------------------------------------------------------------------------
// 5. A full disk.

/// Fill the file system of `dir` with one file, until it is full.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 << 10];
    loop {
        if file.write_all(&chunk).is_err() {
            break;
        }
    }
    // The last partial chunks, down to the page.
    let small = vec![0u8; 512];
    while file.write_all(&small).is_ok() {}
    let _ = file.sync_all();
    path
}

async fn readyz(client: &HttpClient, base: &str) -> (u16, Value) {
    let a = get(client, format!("{base}/readyz")).await.unwrap();
    (a.status, a.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_unready_and_never_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("disk");
    let _tmpfs = Tmpfs::mount(&mnt, 24);
    let db = mnt.join("heartgate.db");
    let config = write_config(dir.path(), "[store]\nmin_free_mib = 2\n");
    let tokens: Vec<(String, String)> = (0..3)
        .map(|i| {
            let id = format!("ws-{i}");
            (id.clone(), provision(&db, &id, false))
        })
        .collect();
    let mut serve = Serve::start_ready(&db, &config, &dir.path().join("serve.log")).await;
    let base = serve.url();
    let client = http_client();
    let mut acked = Acked::default();
    let mut n = 0u64;
    let beat = |acked: &mut Acked, a: Result<Answer, String>, id: &str, nonce: String| {
        let a = a.unwrap();
        match a.status {
            200 => acked
                .by_workspace
                .entry(id.to_string())
                .or_default()
                .push((nonce, a.committed())),
            status => acked
                .refused
                .push(format!("{status} {}", String::from_utf8_lossy(&a.body))),
        }
        a
    };
    let body = |id: &str, nonce: &str| json!({"workspace_id": id, "current_task": nonce});

    for (id, token) in &tokens {
        n += 1;
        let nonce = format!("before-{n}");
        let a = post_heartbeat(&client, &base, token, &body(id, &nonce)).await;
        assert_eq!(beat(&mut acked, a, id, nonce).status, 200);
    }
    assert_eq!(readyz(&client, &base).await.0, 200);

    let filler = fill(&mnt);
    // Free space is asked of the file system at most once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ready = loop {
        let (status, ready) = readyz(&client, &base).await;
        if status == 503 {
            break ready;
        }
        assert!(
            Instant::now() < deadline,
            "a full disk is still ready: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let why = ready["checks"]["database"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("free"), "{ready}");

    // 60 heartbeats on a full disk: each is committed before its answer or
    // refused with the spec's 500; none is acknowledged only queued.
    let mut failed = 0;
    for i in 0..60 {
        let (id, token) = &tokens[i % tokens.len()];
        n += 1;
        let nonce = format!("full-{n}");
        let a = post_heartbeat(&client, &base, token, &body(id, &nonce)).await;
        let a = beat(&mut acked, a, id, nonce);
        match a.status {
            200 => assert!(
                a.committed(),
                "acknowledged before its commit on a full disk"
            ),
            500 => {
                failed += 1;
                assert_eq!(a.json(), json!({"error": "failed to update"}));
            }
            other => panic!("heartbeat on a full disk: {other}"),
        }
    }
    assert!(failed > 0, "no write failed on the full disk");
    let (status, ready) = readyz(&client, &base).await;
    assert_eq!(status, 503, "{ready}");
    let metrics = get(&client, format!("{base}/metrics")).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(metrics.contains("heartgate_db_writable 0"), "{metrics}");
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("heartgate_db_write_failures_total "))
        .map(|v| v.trim().parse::<f64>().unwrap())
        .unwrap_or(0.0);
    assert!(
        failures >= 1.0,
        "heartgate_db_write_failures_total {failures}"
    );

    // Space again: writes succeed, the service is ready again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (id, token) = &tokens[0];
        n += 1;
        let nonce = format!("after-{n}");
        let a = post_heartbeat(&client, &base, token, &body(id, &nonce)).await;
        let ok = beat(&mut acked, a, id, nonce).status == 200;
        if ok && readyz(&client, &base).await.0 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready again after the disk was freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (id, token) in &tokens {
        n += 1;
        let nonce = format!("after-{n}");
        let a = post_heartbeat(&client, &base, token, &body(id, &nonce)).await;
        assert_eq!(beat(&mut acked, a, id, nonce).status, 200);
    }
    serve.stop().await;
    let log = serve.log_text();
    let episodes = log.matches("database writes are failing").count();
    assert_eq!(episodes, 1, "one ERROR line for the episode:\n{log}");
    assert!(log.contains("ERROR"), "{log}");
    assert!(log.contains("database writes succeed again"), "{log}");
    integrity_check(&open_db(&db));
    // Every heartbeat that got a 200 is in the decision log.
    acked.refused.clear();
    assert_every_acknowledged_heartbeat_is_stored(&db, &acked);
}

// ---------------------------------------------------------------------------
// 6. Inputs that grow the database or exhaust the process.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_strings_are_bounded_before_they_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let svc = Service::start(&db, ManualClock::at(T0_MS)).await;
    let token = svc.provision("ws", Workspace, false);
    svc.force_status("ws", "online");
    let size = |svc: &Service| -> i64 {
        let conn = open_db(&svc.db);
        conn.query_row(
            "SELECT COALESCE(SUM(LENGTH(input) + LENGTH(steps) + LENGTH(final_actions)), 0)
             FROM decisions",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let before = size(&svc);
    // 240 kB of text in each heartbeat (inside the 256 KiB body limit), in
    // two-byte characters so that a cut must find a character boundary.
    let big = "é".repeat(20_000);
    for i in 0..20 {
        let (status, body) = svc
            .heartbeat(
                &token,
                json!({"workspace_id": "ws", "error_rate": 0.0, "sample_error": big.repeat(3),
                       "current_task": format!("{i}{}", big.repeat(2)), "runtime_state": big}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Liveness-only heartbeats are acknowledged once queued: wait for all
    // 20 to be written (the writer holds them up to 250 ms).
    svc.wait_for("the heartbeats to be written", 10, |svc| {
        open_db(&svc.db)
            .query_row(
                "SELECT COALESCE(SUM(heartbeats), 0) FROM decisions WHERE event_kind = 'heartbeat'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            == 20
    })
    .await;
    let stored = svc.workspace("ws");
    let sample = stored["last_sample_error"].as_str().unwrap();
    assert!(sample.len() <= 4096, "{} bytes stored", sample.len());
    assert!(
        sample.ends_with("[truncated]"),
        "{}",
        sample.chars().rev().take(40).collect::<String>()
    );
    let grown = size(&svc) - before;
    assert!(
        grown < 20 * 16 * 1024,
        "20 heartbeats of 240 kB of text grew the decision log by {grown} bytes"
    );
    let conn = open_db(&svc.db);
    let input: String = conn
        .query_row(
            "SELECT input FROM decisions ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let input: Value = serde_json::from_str(&input).unwrap();
    for field in ["sample_error", "current_task", "runtime_state"] {
        let text = input["event"]["heartbeat"][field].as_str().unwrap();
        assert!(text.len() <= 4096, "{field}: {} bytes", text.len());
    }
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_connections_never_starve_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let config = write_config(dir.path(), "[http]\nmax_connections = 64\n");
    let token = provision(&db, "ws", false);
    // Fewer descriptors than the connections the test holds open.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" --db \"$1\" serve --listen 127.0.0.1:0 --config \"$2\"")
        .arg(binary::heartgate())
        .arg(&db)
        .arg(&config);
    let mut serve = Serve::spawn(cmd, &dir.path().join("serve.log"));
    serve.wait_healthy().await;
    let addr = serve.addr;
    let base = serve.url();
    // 1500 connections that never send a byte (this process may need more
    // descriptors than its soft limit).
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if limit.current.is_some_and(|n| n < 2048) {
        let raised = rustix::process::Rlimit {
            current: limit.maximum.map(|m| m.min(4096)),
            maximum: limit.maximum,
        };
        rustix::process::setrlimit(rustix::process::Resource::Nofile, raised).unwrap();
    }
    let held: Vec<std::net::TcpStream> = tokio::task::spawn_blocking(move || {
        (0..1500)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..10 {
        for path in ["/healthz", "/readyz"] {
            let client = http_client();
            let started = Instant::now();
            let a = tokio::time::timeout(
                Duration::from_secs(2),
                get(&client, format!("{base}{path}")),
            )
            .await
            .unwrap_or_else(|_| panic!("round {round}: {path} took over 2 s"))
            .unwrap();
            assert_eq!(a.status, 200, "round {round}: {path}");
            assert!(started.elapsed() < Duration::from_secs(2));
        }
        let client = http_client();
        let a = tokio::time::timeout(
            Duration::from_secs(2),
            post_heartbeat(&client, &base, &token, &json!({"workspace_id": "ws"})),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(a.status, 200);
    }
    let metrics = get(&http_client(), format!("{base}/metrics"))
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains("heartgate_http_connections_evicted_total"),
        "{metrics}"
    );
    drop(held);
    serve.stop().await;
    let log = serve.log_text();
    assert_eq!(
        log.matches("connection limit reached").count(),
        1,
        "one line for the episode:\n{log}"
    );
    assert!(!log.contains("accept failed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_store_has_a_quota_and_prunes_what_no_chain_uses() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let svc = Service::start_with(&db, ManualClock::at(T0_MS), "127.0.0.1:0", |o| {
        o.admin_token = Some(Secret::Value(ADMIN.into()));
        o.module_quota.max_modules = 3;
    })
    .await;
    let mut digests = HashMap::new();
    for name in ["always_trap", "always_loop", "noisy"] {
        let (status, pushed) = svc.admin("POST", "/admin/modules", guest(name)).await;
        assert_eq!(status, StatusCode::CREATED, "{pushed}");
        digests.insert(name, pushed["module"].as_str().unwrap().to_string());
    }
    // The same module again is no new module.
    let (status, _) = svc.admin("POST", "/admin/modules", guest("noisy")).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, full) = svc
        .admin("POST", "/admin/modules", guest("cooldown_1m"))
        .await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{full}");
    let why = full["error"].as_str().unwrap();
    assert!(
        why.contains("3 modules") && why.contains("policy prune"),
        "{why}"
    );

    // A chain uses `noisy`.
    let (_, chain) = svc.get_as("/admin/chain", Some(ADMIN)).await.unwrap();
    let mut spec = chain["spec"].clone();
    spec["slot"].as_array_mut().unwrap().push(json!({
        "name": "noise", "module": digests["noisy"], "grants": ["record_event"]
    }));
    let (status, staged) = svc.admin("POST", "/admin/chains", spec.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{staged}");

    let (status, refused) = svc
        .admin(
            "DELETE",
            &format!("/admin/modules/{}", digests["noisy"]),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("chain"),
        "{refused}"
    );

    let out = Command::new(binary::heartgate())
        .args(["--json", "policy", "prune", "--server", &svc.url()])
        .env("HEARTGATE_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pruned: Value = serde_json::from_slice(&out.stdout).unwrap();
    let removed: Vec<&str> = pruned["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["module"].as_str().unwrap())
        .collect();
    assert_eq!(removed.len(), 2, "{pruned}");
    assert!(removed.contains(&digests["always_trap"].as_str()));
    assert!(removed.contains(&digests["always_loop"].as_str()));

    let (status, pushed) = svc
        .admin("POST", "/admin/modules", guest("cooldown_1m"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pushed}");
    let (status, deleted) = svc
        .admin(
            "DELETE",
            &format!("/admin/modules/{}", pushed["module"].as_str().unwrap()),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_ids_starting_with_a_dash_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let out = cli_output(&db, &["workspace", "add", "--", "--help"]);
    assert!(!out.status.success(), "a workspace `--help` was added");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not starting with `.` or `-`"), "{err}");
    let svc = Service::start_with(&db, ManualClock::at(T0_MS), "127.0.0.1:0", |o| {
        o.open_registration = true;
    })
    .await;
    let (status, body) = svc
        .register(
            None,
            json!({"id": "-x", "url": "http://a", "agent_card": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(svc.store.workspace("-x").unwrap().is_none());
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_messages_never_echo_input_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let svc = Service::start_with(&db, ManualClock::at(T0_MS), "127.0.0.1:0", |o| {
        o.admin_token = Some(Secret::Value(ADMIN.into()));
        o.open_registration = true;
    })
    .await;
    let (status, body) = svc
        .admin("POST", "/admin/modules", guest("long_name"))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let text = body.to_string();
    assert!(text.len() < 1024, "a {}-byte error", text.len());
    assert!(text.contains("name"), "{text}");
    let id = format!("bad id{}", "x".repeat(200_000));
    let (status, body) = svc
        .register(None, json!({"id": id, "url": "http://a", "agent_card": {}}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.to_string().len() < 1024,
        "a {}-byte error",
        body.to_string().len()
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_snapshot_read_says_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let svc = Service::start(&db, ManualClock::at(T0_MS)).await;
    let token = svc.provision("ws", Workspace, false);
    open_db(&db)
        .execute_batch("ALTER TABLE declared_plugins RENAME TO declared_plugins_gone")
        .unwrap();
    let (status, body) = svc.heartbeat(&token, json!({"workspace_id": "ws"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        body["error"],
        "workspace state temporarily unavailable: reading its declared plugins failed"
    );
    svc.stop().await;
}
