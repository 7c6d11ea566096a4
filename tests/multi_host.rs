//! Several real `heartgate serve` processes on one PostgreSQL database (a
//! throwaway cluster from the distribution's binaries, a fresh database per
//! test): the guarantees that must hold across hosts, each shown from
//! outside, over HTTP and the CLI.
//!
//! A module of the `crash` test binary (one binary less to link in CI):
//! `cargo test --release --test crash multi_host::`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::binary::{self, Serve, cli, http_client, post_heartbeat, request, write_config};
use heartgate_test_pg::PgCluster;
use serde_json::{Value, json};

/// Hosts on one database, and the operator's CLI on it.
struct Fleet {
    dir: tempfile::TempDir,
    url: String,
    hosts: Vec<Serve>,
    /// A cluster of the test's own (one it restarts); else the shared one.
    own: Option<PgCluster>,
}

impl Fleet {
    /// `n` hosts with the same config (`extra` appended).
    async fn start(n: usize, extra: &str) -> Fleet {
        let url = PgCluster::shared().fresh_database().unwrap();
        Fleet::start_on(url, n, extra).await
    }

    async fn start_on(url: String, n: usize, extra: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), extra);
        let mut hosts = Vec::new();
        for i in 0..n {
            hosts.push(start_host(
                &url,
                &config,
                &dir.path().join(format!("host-{i}.log")),
            ));
        }
        for host in &hosts {
            host.wait_healthy().await;
        }
        Fleet {
            dir,
            url,
            hosts,
            own: None,
        }
    }

    fn db(&self) -> &Path {
        Path::new(&self.url)
    }

    fn cli(&self, args: &[&str]) -> String {
        cli(self.db(), args)
    }

    /// Provision a workspace with the CLI; its token.
    fn provision(&self, id: &str, platform: bool) -> String {
        binary::provision(self.db(), id, platform)
    }

    fn sql(&self, sql: &str) -> String {
        let name = self.url.rsplit('/').next().unwrap();
        self.own
            .as_ref()
            .unwrap_or_else(|| PgCluster::shared())
            .psql(name, sql)
            .unwrap()
    }

    fn workspace(&self, id: &str) -> Value {
        serde_json::from_str(&self.cli(&["--json", "workspace", "show", id])).unwrap()
    }

    fn runs(&self, id: &str) -> Vec<Value> {
        self.cli(&["--json", "reconcile", "list", "--workspace", id])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn logs(&self) -> String {
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| format!("--- host {i}\n{}", h.log_text()))
            .collect()
    }
}

/// The admin API's token on every host of a fleet.
const ADMIN: &str = "fleet-admin-token";

/// One `heartgate serve` on `url`, with the fleet's admin token.
fn start_host(url: &str, config: &Path, log: &Path) -> Serve {
    let mut cmd = std::process::Command::new(binary::heartgate());
    cmd.arg("--db")
        .arg(url)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .env("HEARTGATE_ADMIN_TOKEN", ADMIN);
    Serve::spawn(cmd, log)
}

/// An admin API request to `host`; the status and the JSON answer.
async fn admin(host: &Serve, method: &str, path: &str, body: &str) -> (u16, Value) {
    let answer = request(
        &http_client(),
        method,
        &format!("{}{path}", host.url()),
        Some(ADMIN),
        body.as_bytes().to_vec(),
    )
    .await
    .unwrap();
    (answer.status, answer.json())
}

/// Wait until every host serves chain version `version`; how long it took.
async fn served_everywhere(fleet: &Fleet, version: &Value, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = true;
        for host in &fleet.hosts {
            let (status, chain) = admin(host, "GET", "/admin/chain", "").await;
            assert_eq!(status, 200, "{chain}");
            all &= chain["version"] == *version;
        }
        if all {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "not every host serves {version} after {within:?}\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The system clock in ms since the epoch.
fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn beat(id: &str) -> Value {
    json!({"workspace_id": id, "error_rate": 0.0, "sample_error": "", "active_tasks": 0,
           "uptime_seconds": 60})
}

fn mcp_missing(id: &str) -> Value {
    json!({"workspace_id": id, "error_rate": 0.0, "sample_error": "", "active_tasks": 0,
           "uptime_seconds": 60, "mcp_server_present": false})
}

/// 20 concurrent MCP-missing heartbeats of one platform workspace, spread
/// over 3 hosts: the workspace fails closed and exactly one `mcp-recovery`
/// run is queued (the cooldown's marker and the workspace's version are
/// checked in the database, under the workspace's row lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_cooldown_holds() {
    let fleet = Fleet::start(3, "[reconcile]\nenabled = false\n").await;
    let token = fleet.provision("concierge", true);
    fleet.sql("UPDATE workspaces SET status = 'online' WHERE id = 'concierge'");
    let client = http_client();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (client, base, token) = (client.clone(), fleet.hosts[i % 3].url(), token.clone());
        tasks.push(tokio::spawn(async move {
            post_heartbeat(&client, &base, &token, &mcp_missing("concierge")).await
        }));
    }
    for t in tasks {
        let answer = t.await.unwrap().unwrap();
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let runs = fleet.runs("concierge");
    let recoveries = runs
        .iter()
        .filter(|r| r["trigger"] == "mcp-recovery")
        .count();
    assert_eq!(recoveries, 1, "{runs:?}\n{}", fleet.logs());
    assert_eq!(fleet.workspace("concierge")["status"], "failed");
    let provision_failed = fleet.sql(
        "SELECT COUNT(*) FROM events WHERE workspace_id = 'concierge'
         AND event_type = 'WORKSPACE_PROVISION_FAILED'",
    );
    assert_eq!(provision_failed, "20");
}

/// A token revoked with the CLI is refused by the next heartbeat on every
/// host: each cached snapshot is used only after one read has confirmed
/// its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_revoke_takes_effect_everywhere() {
    let fleet = Fleet::start(3, "[reconcile]\nenabled = false\n").await;
    let token = fleet.provision("ws", false);
    let client = http_client();
    // Every host has the workspace's snapshot cached.
    for _ in 0..3 {
        for host in &fleet.hosts {
            let answer = post_heartbeat(&client, &host.url(), &token, &beat("ws"))
                .await
                .unwrap();
            assert_eq!(answer.status, 200);
        }
    }
    let revoked = Instant::now();
    fleet.cli(&["token", "revoke", "ws"]);
    for host in &fleet.hosts {
        let answer = post_heartbeat(&client, &host.url(), &token, &beat("ws"))
            .await
            .unwrap();
        assert_eq!(
            answer.status,
            401,
            "a revoked token accepted by {}",
            host.url()
        );
    }
    eprintln!(
        "revoked on every host within {:?} of the CLI's commit",
        revoked.elapsed()
    );
    // A new token works everywhere at once, too.
    let fresh = fleet.cli(&["token", "issue", "ws"]).trim().to_string();
    for host in &fleet.hosts {
        let answer = post_heartbeat(&client, &host.url(), &fresh, &beat("ws"))
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
    }
}

/// Three hosts sweep for silence at once: every silent workspace goes
/// offline once, with one `WORKSPACE_OFFLINE` event, whichever host
/// noticed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_silence_sweep_transitions_once() {
    let fleet = Fleet::start(
        3,
        "[reconcile]\nenabled = false\n\n[liveness]\nheartbeat_ttl = \"2s\"\nsweep_interval = \"100ms\"\n",
    )
    .await;
    let client = http_client();
    let ids: Vec<String> = (0..30).map(|i| format!("ws-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let token = fleet.provision(id, false);
        let answer = post_heartbeat(&client, &fleet.hosts[i % 3].url(), &token, &beat(id))
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
    }
    binary::wait_until("all 30 offline", Duration::from_secs(30), || {
        fleet.sql("SELECT COUNT(*) FROM workspaces WHERE status = 'offline'") == "30"
    })
    .await;
    // Give the other hosts' sweeps time to (wrongly) act again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_workspace = fleet.sql(
        "SELECT COUNT(*) FROM events WHERE event_type = 'WORKSPACE_OFFLINE'
         GROUP BY workspace_id HAVING COUNT(*) != 1",
    );
    assert_eq!(per_workspace, "", "a workspace with other than one event");
    let events = fleet.sql("SELECT COUNT(*) FROM events WHERE event_type = 'WORKSPACE_OFFLINE'");
    assert_eq!(events, "30");
    let silences = fleet.sql("SELECT COUNT(*) FROM decisions WHERE event_kind = 'silence'");
    assert_eq!(silences, "30", "one silence verdict per deadline");
}

/// A host started in watch mode while another has it is refused, saying
/// why; `/readyz` of a running host reports its database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_watch_mode_runs_on_one_host_only() {
    let fleet = Fleet::start(1, "[reconcile]\nenabled = false\n").await;
    let watched = fleet.dir.path().join("watched");
    std::fs::create_dir(&watched).unwrap();
    let config = fleet.dir.path().join("heartgate.toml");
    let watching = |log: &str| {
        let mut cmd = std::process::Command::new(binary::heartgate());
        cmd.arg("--db")
            .arg(&fleet.url)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--watch")
            .arg(&watched);
        Serve::spawn(cmd, &fleet.dir.path().join(log))
    };
    // The first is up (it answers /healthz once it holds the place) before
    // the second starts.
    let first = watching("watch-1.log");
    first.wait_healthy().await;
    let mut second = watching("watch-2.log");
    let status = second.exit_within(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = second.log_text();
    assert!(
        log.contains("another host of this database runs in watch mode"),
        "{log}"
    );
    drop(first);
    let ready = request(
        &http_client(),
        "GET",
        &format!("{}/readyz", fleet.hosts[0].url()),
        None,
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        ready.status,
        200,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
}

/// A chain activated on host A is served by B and C within 1 s (each is
/// notified, and polls besides), also when B's notification connection was
/// killed; a rollback on C likewise; `/admin/chain` and `/readyz` of each
/// host say which stored chain it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_chain_activation_propagates() {
    let fleet = Fleet::start(3, "[reconcile]\nenabled = false\n").await;
    let (a, b, c) = (&fleet.hosts[0], &fleet.hosts[1], &fleet.hosts[2]);
    let (_, builtin) = admin(a, "GET", "/admin/chain", "").await;
    // A variant of the built-in chain: without its last slot.
    let mut spec = builtin["spec"].clone();
    spec["slot"].as_array_mut().unwrap().pop();
    let (status, staged) = admin(a, "POST", "/admin/chains", &spec.to_string()).await;
    assert_eq!(status, 201, "{staged}");
    let id = staged["id"].as_i64().unwrap();
    let (status, activated) = admin(a, "POST", &format!("/admin/chains/{id}/activate"), "").await;
    assert_eq!(status, 200, "{activated}");
    let took = served_everywhere(&fleet, &staged["version"], Duration::from_secs(1)).await;
    eprintln!("activation served by every host after {took:?}");
    for host in [b, c] {
        let (_, chain) = admin(host, "GET", "/admin/chain", "").await;
        assert_eq!(chain["serving"]["chain"], id, "{chain}");
        let ready = request(
            &http_client(),
            "GET",
            &format!("{}/readyz", host.url()),
            None,
            Vec::new(),
        )
        .await
        .unwrap()
        .json();
        assert_eq!(ready["checks"]["chain"]["chain"], id, "{ready}");
    }

    // B's notification connection is killed: B still follows, by polling
    // and by the notification after it reconnects.
    let name = fleet.url.rsplit('/').next().unwrap();
    let killed = PgCluster::shared()
        .terminate(
            name,
            &format!(
                "{}-{}",
                heartgate::store::postgres::LISTENER_NAME,
                b.child.id()
            ),
        )
        .unwrap();
    assert_eq!(killed, 1, "B's listener");
    let (status, rolled) = admin(c, "POST", "/admin/chains/rollback", "").await;
    assert_eq!(status, 200, "{rolled}");
    assert_eq!(rolled["version"], builtin["version"]);
    let took = served_everywhere(&fleet, &builtin["version"], Duration::from_secs(1)).await;
    eprintln!("rollback with B's listener killed served by every host after {took:?}");
    let (_, chain) = admin(b, "GET", "/admin/chain", "").await;
    assert!(
        chain["serving"]["activation"].as_i64().unwrap()
            > activated["activation"].as_i64().unwrap(),
        "{chain}"
    );

    // Shadow mode is stored: set on A, every host runs the shadow chain.
    let (status, shadow) = admin(
        a,
        "POST",
        "/admin/shadow",
        &json!({"chain": id}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{shadow}");
    let started = Instant::now();
    for host in [b, c] {
        loop {
            let (_, shadow) = admin(host, "GET", "/admin/shadow", "").await;
            if shadow["chain"] == id {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(1), "{shadow}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (status, _) = admin(b, "DELETE", "/admin/shadow", "").await;
    assert_eq!(status, 200);
    loop {
        let (_, shadow) = admin(a, "GET", "/admin/shadow", "").await;
        if shadow["chain"].is_null() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{shadow}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every host runs the shadow chain on one shadow state in the database: a
/// cooldown in the shadow (the built-in one, in a slot of its own, so the
/// real marker is not its own) fires once for 20 concurrent MCP-missing
/// heartbeats over 3 hosts, as the real one does, where a state per host
/// would fire once on each; and no real marker is the shadow's. (The
/// shadow's evaluations here seldom overlap, since the real verdicts take
/// turns at the row lock: the compare-and-set for those that do is the
/// store suite's `a_shadow_keeps_its_own_state_and_drops_it_with_itself`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_shadow_cooldown_fires_once() {
    let fleet = Fleet::start(3, "[reconcile]\nenabled = false\n").await;
    let a = &fleet.hosts[0];
    let (_, builtin) = admin(a, "GET", "/admin/chain", "").await;
    let mut spec = builtin["spec"].clone();
    let cooldown = spec["slot"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["name"] == "cooldown")
        .unwrap();
    cooldown["name"] = json!("cooldown-b");
    let (status, staged) = admin(a, "POST", "/admin/chains", &spec.to_string()).await;
    assert_eq!(status, 201, "{staged}");
    let id = staged["id"].as_i64().unwrap();
    let body = json!({"chain": id}).to_string();
    assert_eq!(admin(a, "POST", "/admin/shadow", &body).await.0, 200);
    let started = Instant::now();
    for host in &fleet.hosts {
        while admin(host, "GET", "/admin/shadow", "").await.1["chain"] != id {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{}",
                fleet.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let token = fleet.provision("concierge", true);
    fleet.sql("UPDATE workspaces SET status = 'online' WHERE id = 'concierge'");
    let client = http_client();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (client, base, token) = (client.clone(), fleet.hosts[i % 3].url(), token.clone());
        tasks.push(tokio::spawn(async move {
            post_heartbeat(&client, &base, &token, &mcp_missing("concierge")).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    let recoveries = fleet
        .runs("concierge")
        .iter()
        .filter(|r| r["trigger"] == "mcp-recovery")
        .count();
    assert_eq!(recoveries, 1);

    // Each host compares the heartbeats it served, a little after its
    // answers.
    let reports = loop {
        let mut reports = Vec::new();
        for host in &fleet.hosts {
            reports.push(admin(host, "GET", "/admin/shadow", "").await.1);
        }
        let seen: i64 = reports
            .iter()
            .map(|r| r["evaluated"].as_i64().unwrap() + r["skipped"].as_i64().unwrap())
            .sum();
        if seen == 20 {
            break reports;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{reports:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(reports.iter().all(|r| r["skipped"] == 0), "{reports:?}");
    let fires = |actions: &Value| {
        actions
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["trigger"] == "mcp-recovery"))
    };
    let diffs: Vec<&Value> = reports
        .iter()
        .flat_map(|r| r["recent"].as_array().unwrap())
        .collect();
    let active_only = diffs
        .iter()
        .filter(|d| fires(&d["active"]) && !fires(&d["shadow"]))
        .count();
    let shadow_only = diffs
        .iter()
        .filter(|d| !fires(&d["active"]) && fires(&d["shadow"]))
        .count();
    // The active chain fired once: the shadow did too, on the same heartbeat
    // (no difference) or on another (one difference each way). A shadow
    // that fired more often would differ more often than the active chain.
    assert!(
        active_only <= 1 && shadow_only == active_only,
        "active only {active_only}, shadow only {shadow_only}: {diffs:?}"
    );
    assert_eq!(
        fleet.sql(
            "SELECT string_agg(m->>'slot', ',')
             FROM shadow_state, json_array_elements(markers::json) m"
        ),
        "cooldown-b"
    );
    assert_eq!(
        fleet.sql(
            "SELECT string_agg(slot, ',') FROM policy_markers WHERE workspace_id = 'concierge'"
        ),
        "cooldown"
    );
}

/// A fleet whose hosts run reconcile runs, with the local plugin `tools`.
async fn reconciling_fleet(n: usize, extra: &str) -> Fleet {
    let fleet = Fleet::start(
        0,
        &format!("[reconcile]\nconcurrency = 2\ndeadline_secs = 60\n{extra}"),
    )
    .await;
    let source = fleet.dir.path().join("plugins/tools");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("plugin.yaml"), "name: tools\n").unwrap();
    let mut fleet = fleet;
    for _ in 0..n {
        fleet.add_host().await;
    }
    fleet
}

impl Fleet {
    /// One more host, with the fleet's config.
    async fn add_host(&mut self) -> &Serve {
        let log = self
            .dir
            .path()
            .join(format!("host-{}.log", self.hosts.len()));
        let host = start_host(&self.url, &self.dir.path().join("heartgate.toml"), &log);
        host.wait_healthy().await;
        self.hosts.push(host);
        self.hosts.last().unwrap()
    }

    /// Queue `n` `online` runs of `id` (as verdicts would).
    fn queue_runs(&self, id: &str, n: usize) {
        for _ in 0..n {
            self.sql(&format!(
                "INSERT INTO reconcile_runs (workspace_id, trigger, state, requested_ms)
                 VALUES ('{id}', 'online', 'queued', 1)"
            ));
        }
    }

    /// Wait until no run is queued or running; the runs.
    async fn settled(&self, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let open = self
                .sql("SELECT COUNT(*) FROM reconcile_runs WHERE state IN ('queued', 'running')");
            // Never two runs of one workspace running at once, whichever
            // hosts claimed them.
            let doubled = self.sql(
                "SELECT workspace_id FROM reconcile_runs WHERE state = 'running'
                 GROUP BY workspace_id HAVING COUNT(*) > 1",
            );
            assert_eq!(doubled, "", "two runs running at once");
            if open == "0" {
                return self
                    .cli(&["--json", "reconcile", "list"])
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "{open} runs still open\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// 20 workspaces with 3 queued runs each, claimed by 3 hosts at once: each
/// run ran once (one attempt), they all succeeded, and no workspace was
/// ever seen with two runs running (sampled while they ran; the database
/// refuses it with a unique index besides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_reconcile_claimed_once() {
    let fleet = reconciling_fleet(3, "\n[restart]\ncommand = [\"sleep\", \"0.5\"]\n").await;
    let ids: Vec<String> = (0..20).map(|i| format!("ws-{i}")).collect();
    for id in &ids {
        fleet.provision(id, false);
        fleet.cli(&["workspace", "declare-plugin", id, "tools", "local://tools"]);
    }
    for id in &ids {
        fleet.queue_runs(id, 3);
    }
    let runs = fleet.settled(Duration::from_secs(90)).await;
    assert_eq!(runs.len(), 60);
    for run in &runs {
        assert_eq!(run["state"], "succeeded", "{run}\n{}", fleet.logs());
        assert_eq!(run["attempts"], 1, "{run}");
    }
    for id in &ids {
        assert!(
            fleet
                .dir
                .path()
                .join(format!("configs/{id}/plugins/tools/plugin.yaml"))
                .is_file(),
            "{id} did not get its plugin"
        );
    }
    // More than one host took part.
    let claimed_by: std::collections::HashSet<usize> = fleet
        .hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| h.log_text().contains("reconcile succeeded"))
        .map(|(i, _)| i)
        .collect();
    assert!(claimed_by.len() > 1, "only hosts {claimed_by:?} ran runs");
}

/// A host killed (SIGKILL) in the middle of a run: the other host takes
/// the run over only once its lease has passed, runs it again (a second
/// attempt), and records it; the dead host never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_host_run_is_reclaimed_after_lease() {
    let dir_marker = tempfile::tempdir().unwrap();
    let marker = dir_marker.path().join("first-run");
    let hook = dir_marker.path().join("hook.sh");
    // The first run's restart hook hangs; any later one returns at once.
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nif [ ! -e {m} ]; then touch {m}; sleep 60; fi\n",
            m = marker.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&hook)
        .status()
        .unwrap();
    let mut fleet = reconciling_fleet(
        1,
        &format!(
            "lease_seconds = 2\n\n[restart]\ncommand = [\"{}\"]\n",
            hook.display()
        ),
    )
    .await;
    fleet.provision("ws", false);
    fleet.cli(&[
        "workspace",
        "declare-plugin",
        "ws",
        "tools",
        "local://tools",
    ]);
    fleet.queue_runs("ws", 1);
    binary::wait_until("the run to reach its hook", Duration::from_secs(30), || {
        marker.exists()
    })
    .await;
    fleet.hosts[0].sigkill();
    let killed = Instant::now();
    let killed_ms = now_ms();
    // The dead host's last lease (on the database's clock, which is this
    // machine's): still running when it was killed.
    let lease_until_ms: i64 = fleet
        .sql("SELECT (extract(epoch FROM lease_until) * 1000)::BIGINT FROM reconcile_runs")
        .parse()
        .unwrap();
    assert!(
        lease_until_ms > killed_ms,
        "the lease had passed before the kill"
    );
    fleet.add_host().await;
    let started = fleet.sql("SELECT started_ms FROM reconcile_runs");
    let runs = fleet.settled(Duration::from_secs(30)).await;
    let took = killed.elapsed();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run["state"], "succeeded", "{run}\n{}", fleet.logs());
    assert_eq!(run["attempts"], 2, "{run}");
    assert_ne!(
        run["started_ms"].to_string(),
        started,
        "it was started again"
    );
    // Not taken over while the dead host's lease lasted (the new host reads
    // its clock just before it claims).
    let restarted_ms = run["started_ms"].as_i64().unwrap();
    assert!(
        restarted_ms + 50 >= lease_until_ms,
        "taken over at {restarted_ms}, inside the lease (until {lease_until_ms})"
    );
    eprintln!("the run was taken over and finished {took:?} after its host was killed");
    assert!(fleet.hosts[1].log_text().contains("reconcile succeeded"));
}

/// What one heartbeat of a load got back.
#[derive(Debug)]
struct Sent {
    host: usize,
    task: String,
    status: Option<u16>,
    committed: bool,
    took: Duration,
    at: Instant,
}

/// Heartbeats of `tokens` (workspace id, token) to every host, round robin,
/// one at a time per workspace, until `stop`; each with a unique
/// `current_task`, so that the decision log shows which were written.
async fn load(
    hosts: Vec<String>,
    tokens: Vec<(String, String)>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Sent> {
    let mut tasks = Vec::new();
    for (w, (id, token)) in tokens.into_iter().enumerate() {
        let (hosts, stop) = (hosts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let mut sent = Vec::new();
            let mut n = 0usize;
            while !*stop.borrow() {
                let host = (n + w) % hosts.len();
                let task = format!("{id}-beat-{n}");
                let mut body = beat(&id);
                body["current_task"] = json!(task);
                let at = Instant::now();
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    post_heartbeat(&client, &hosts[host], &token, &body),
                )
                .await;
                let (status, committed) = match answer {
                    Ok(Ok(a)) => (Some(a.status), a.status == 200 && a.committed()),
                    _ => (None, false),
                };
                sent.push(Sent {
                    host,
                    task,
                    status,
                    committed,
                    took: at.elapsed(),
                    at,
                });
                n += 1;
                if status != Some(200) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            sent
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Every heartbeat acknowledged as committed is in the decision log. Of
/// those acknowledged once queued (liveness only), only what `queued_lost`
/// allows may be missing: none when only the database went away for a
/// while (a queued verdict waits for it, `QUEUED_OUTAGE_RETRY`); for a
/// killed host, only what it still held: heartbeats it acknowledged just
/// before the kill (the documented window), never one acknowledged by
/// another host or earlier.
fn assert_committed_kept(fleet: &Fleet, sent: &[Sent], queued_lost: QueuedLoss) {
    let written = fleet.sql("SELECT input FROM decisions");
    let acknowledged = sent.iter().filter(|s| s.status == Some(200)).count();
    let lost_queued: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.status == Some(200) && !s.committed)
        .filter(|s| !written.contains(&format!("\"{}\"", s.task)))
        .collect();
    eprintln!(
        "{} of {acknowledged} acknowledged heartbeats were lost (queued, in flight at the fault)",
        lost_queued.len()
    );
    match queued_lost {
        QueuedLoss::None => assert!(
            lost_queued.is_empty(),
            "{} of {acknowledged} queued heartbeats lost: {lost_queued:?}",
            lost_queued.len()
        ),
        QueuedLoss::HeldBy { host, killed } => {
            let outside: Vec<&&Sent> = lost_queued
                .iter()
                .filter(|s| s.host != host || s.at + s.took + KILL_WINDOW < killed)
                .collect();
            assert!(
                outside.is_empty(),
                "lost, though not held by the killed host in the {KILL_WINDOW:?} before the kill: {outside:?}"
            );
        }
    }
    let committed: Vec<&Sent> = sent.iter().filter(|s| s.committed).collect();
    assert!(
        !committed.is_empty(),
        "no heartbeat was acknowledged as committed"
    );
    let lost: Vec<&&Sent> = committed
        .iter()
        .filter(|s| !written.contains(&format!("\"{}\"", s.task)))
        .collect();
    assert!(lost.is_empty(), "committed and lost: {lost:?}");
}

/// What a fault may lose of the heartbeats acknowledged once queued.
enum QueuedLoss {
    /// Nothing: the hosts lived through it.
    None,
    /// What host `host`, killed at `killed`, still held: heartbeats it
    /// acknowledged within [`KILL_WINDOW`] before.
    HeldBy { host: usize, killed: Instant },
}

/// How long before a kill a heartbeat lost with the host may have been
/// acknowledged: its commit was still in flight. Milliseconds on a quiet
/// machine; generous here, for a machine busy with other builds.
const KILL_WINDOW: Duration = Duration::from_secs(2);

/// Provision `n` workspaces; their ids and tokens.
fn workspaces(fleet: &Fleet, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let id = format!("load-{i}");
            let token = fleet.provision(&id, false);
            (id, token)
        })
        .collect()
}

/// PostgreSQL restarted under load: while it is down requests fail fast
/// with 503 (not hang) and `/readyz` says unready; once it is back the host
/// serves again by itself, and nothing acknowledged is lost, not even what
/// was acknowledged once queued and in flight when the database went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_recovers() {
    let cluster = PgCluster::start().unwrap();
    let url = cluster.fresh_database().unwrap();
    let mut fleet = Fleet::start_on(
        url,
        2,
        "[reconcile]\nenabled = false\n\n[postgres]\ntimeout_ms = 500\n",
    )
    .await;
    fleet.own = Some(cluster);
    let cluster = fleet.own.as_ref().unwrap();
    let tokens = workspaces(&fleet, 4);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let hosts: Vec<String> = fleet.hosts.iter().map(Serve::url).collect();
    let load = tokio::spawn(load(hosts.clone(), tokens, stopped));
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.stop().unwrap();
    let down = Instant::now();
    // Unready while it is down.
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = request(
            &client,
            "GET",
            &format!("{}/readyz", hosts[0]),
            None,
            Vec::new(),
        )
        .await
        .unwrap();
        if ready.status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed ready with the database down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_again().unwrap();
    let up = Instant::now();
    // Back by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    for host in &hosts {
        loop {
            let ready = request(&client, "GET", &format!("{host}/readyz"), None, Vec::new())
                .await
                .unwrap();
            if ready.status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{host} stayed unready\n{}",
                fleet.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    let sent = load.await.unwrap();
    let during: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.at > down + Duration::from_millis(200) && s.at + s.took < up)
        .collect();
    assert!(!during.is_empty());
    for s in &during {
        assert!(
            matches!(s.status, Some(200 | 503)),
            "while the database was down: {s:?}"
        );
        assert!(s.took < Duration::from_secs(3), "a request hung: {s:?}");
    }
    assert!(during.iter().any(|s| s.status == Some(503)));
    let after: Vec<&Sent> = sent.iter().filter(|s| s.at > recovered).collect();
    assert!(
        !after.is_empty() && after.iter().all(|s| s.status == Some(200)),
        "{after:?}"
    );
    eprintln!(
        "{} heartbeats, {} while the database was down (slowest {:?}); ready again {:?} after it was",
        sent.len(),
        during.len(),
        during.iter().map(|s| s.took).max().unwrap(),
        recovered - up
    );
    assert_committed_kept(&fleet, &sent, QueuedLoss::None);
}

/// One of two hosts is killed (SIGKILL) under load: the other keeps
/// serving, nothing acknowledged as committed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_host_under_load_loses_nothing_committed() {
    let mut fleet = Fleet::start(2, "[reconcile]\nenabled = false\n").await;
    let tokens = workspaces(&fleet, 6);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let hosts: Vec<String> = fleet.hosts.iter().map(Serve::url).collect();
    let load = tokio::spawn(load(hosts, tokens, stopped));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fleet.hosts[0].sigkill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.send(true).unwrap();
    let sent = load.await.unwrap();
    let survivor: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.host == 1 && s.at > killed)
        .collect();
    assert!(!survivor.is_empty());
    assert!(
        survivor.iter().all(|s| s.status == Some(200)),
        "the surviving host failed requests: {:?}",
        survivor.iter().find(|s| s.status != Some(200))
    );
    eprintln!(
        "{} heartbeats, {} committed, {} to the survivor after the kill",
        sent.len(),
        sent.iter().filter(|s| s.committed).count(),
        survivor.len()
    );
    assert_committed_kept(&fleet, &sent, QueuedLoss::HeldBy { host: 0, killed });
}

/// 200 requests at once to a host with `pool_size = 4`: the host never
/// opens more than 4 connections for them, and every request is answered
/// (200, or 503 if it waited longer than `timeout_ms` for a connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_connection_storm_is_bounded_by_the_pool() {
    let fleet = Fleet::start(
        1,
        "[reconcile]\nenabled = false\n\n[postgres]\npool_size = 4\ntimeout_ms = 5000\n",
    )
    .await;
    let tokens = workspaces(&fleet, 20);
    let client = http_client();
    let base = fleet.hosts[0].url();
    let mut storm = Vec::new();
    for i in 0..200 {
        let (client, base) = (client.clone(), base.clone());
        let (id, token) = tokens[i % tokens.len()].clone();
        storm.push(tokio::spawn(async move {
            post_heartbeat(&client, &base, &token, &beat(&id)).await
        }));
    }
    let mut most = 0usize;
    while storm.iter().any(|t| !t.is_finished()) {
        let open: usize = fleet
            .sql(&format!(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'heartgate'
                 AND pid != pg_backend_pid() AND datname = '{}'",
                fleet.url.rsplit('/').next().unwrap()
            ))
            .parse()
            .unwrap();
        most = most.max(open);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in storm {
        let answer = t.await.unwrap().unwrap();
        assert!(matches!(answer.status, 200 | 503), "{}", answer.status);
    }
    assert!(most <= 4, "{most} connections for a pool of 4");
    eprintln!("200 concurrent heartbeats on a pool of 4: at most {most} connections seen");
}
