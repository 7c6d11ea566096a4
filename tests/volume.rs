//! A workspace's config volume is hostile ground (issue 15): the runtime
//! writes it too. Each test prepares a volume the way a hostile runtime
//! would (symlinks, FIFOs, device links), runs the real `heartgate` binary
//! on it, and checks that nothing outside `<configs_root>/<id>/plugins/<name>/`
//! changed (the tree around it is hashed before and after, links and FIFOs by
//! what they are, never opened), that the service kept answering `/healthz`
//! and heartbeats within a second throughout, and that SIGTERM still ends
//! it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest;

use common::binary::{
    self, HttpClient, Serve, Tmpfs, cli, git, http_client, open_db, post_heartbeat, provision,
    request,
};
use common::gitea::Gitea;

const ADMIN: &str = "admin-s3cret";

/// A test's world: a directory holding the database, the configuration,
/// the config volumes (`configs/`) and the local plugin sources (`plugins/`).
struct World {
    dir: tempfile::TempDir,
    config: PathBuf,
    /// Extra environment for the service.
    env: Vec<(String, String)>,
}

impl World {
    fn new(extra_config: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let config = binary::write_config(
            dir.path(),
            &format!("[reconcile]\ndeadline_secs = 10\n{extra_config}"),
        );
        // The local plugin every test declares.
        let source = dir.path().join("plugins/tools");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(source.join("plugin.yaml"), "name: tools\n").unwrap();
        World {
            dir,
            config,
            env: vec![("HEARTGATE_ADMIN_TOKEN".into(), ADMIN.into())],
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn db(&self) -> PathBuf {
        self.root().join("heartgate.db")
    }

    fn volume(&self, id: &str) -> PathBuf {
        self.root().join("configs").join(id)
    }

    /// A workspace with the plugin `tools` declared; its token.
    fn workspace(&self, id: &str) -> String {
        let token = provision(&self.db(), id, false);
        cli(
            &self.db(),
            &["workspace", "declare-plugin", id, "tools", "local://tools"],
        );
        token
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(binary::heartgate());
        cmd.arg("--db")
            .arg(self.db())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&self.config)
            .args(extra);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn serve(&self, log: &str) -> Serve {
        self.serve_with(log, &[]).await
    }

    async fn serve_with(&self, log: &str, extra: &[&str]) -> Serve {
        let serve = Serve::spawn(self.command(extra), &self.root().join(log));
        serve.wait_healthy().await;
        serve
    }

    /// Every entry under the world except the database, the logs, the
    /// service's scratch and `configs/<id>/plugins/tools/`: by path, what it
    /// is and (for a regular file) its content's hash or (for a link) its
    /// target. Never opens anything but regular files.
    fn hash(&self, except: &str) -> BTreeMap<String, String> {
        self.hash_but(except, "tools")
    }

    /// [`World::hash`] leaving out plugin `plugin` of `except`.
    fn hash_but(&self, except: &str, plugin: &str) -> BTreeMap<String, String> {
        let skip = self.volume(except).join("plugins").join(plugin);
        let mut out = BTreeMap::new();
        let mut stack = vec![self.root().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                let path = entry.path();
                let rel = path
                    .strip_prefix(self.root())
                    .unwrap()
                    .display()
                    .to_string();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path == skip
                    || name.starts_with("heartgate.db")
                    || name.ends_with(".log")
                    || name == "tmp"
                {
                    continue;
                }
                let ty = entry.file_type().unwrap();
                let what = if ty.is_symlink() {
                    format!("link {}", std::fs::read_link(&path).unwrap().display())
                } else if ty.is_dir() {
                    stack.push(path.clone());
                    "dir".to_string()
                } else if ty.is_file() {
                    let bytes = std::fs::read(&path).unwrap();
                    format!("file {:x}", sha2::Sha256::digest(&bytes))
                } else if ty.is_fifo() {
                    "fifo".to_string()
                } else {
                    "special".to_string()
                };
                out.insert(rel, what);
            }
        }
        out
    }
}

fn assert_same_tree(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
    let changed: Vec<_> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v} -> {:?}", after.get(k)))
        .chain(
            after
                .iter()
                .filter(|(k, _)| !before.contains_key(*k))
                .map(|(k, v)| format!("{k}: new {v}")),
        )
        .collect();
    assert!(
        changed.is_empty(),
        "outside the plugin's directory, changed: {changed:#?}"
    );
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

/// Probes `/healthz` and a bystander's heartbeat every 100 ms, each bounded
/// by a second; what took longer or failed.
struct Prober {
    stop: Arc<AtomicBool>,
    slow: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<usize>,
}

impl Prober {
    fn start(base: String, bystander: (String, String)) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let slow = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (stop, slow) = (stop.clone(), slow.clone());
            tokio::spawn(async move {
                let mut probes = 0;
                while !stop.load(Ordering::Relaxed) {
                    // A fresh client each round: a stuck connection must
                    // not hide behind a pooled one.
                    let client = http_client();
                    let (id, token) = &bystander;
                    let url = format!("{base}/healthz");
                    let body = json!({"workspace_id": id});
                    let health = request(&client, "GET", &url, None, Vec::new());
                    let beat = post_heartbeat(&client, &base, token, &body);
                    for (what, answer) in [
                        (
                            "healthz",
                            tokio::time::timeout(Duration::from_secs(1), health).await,
                        ),
                        (
                            "heartbeat",
                            tokio::time::timeout(Duration::from_secs(1), beat).await,
                        ),
                    ] {
                        match answer {
                            Ok(Ok(a)) if a.status == 200 => {}
                            Ok(Ok(a)) => slow.lock().unwrap().push(format!("{what}: {}", a.status)),
                            Ok(Err(e)) => slow.lock().unwrap().push(format!("{what}: {e}")),
                            Err(_) => slow.lock().unwrap().push(format!("{what}: over 1 s")),
                        }
                    }
                    probes += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                probes
            })
        };
        Prober { stop, slow, task }
    }

    /// Stop; panics if any probe took over a second or failed.
    async fn check(self) {
        self.stop.store(true, Ordering::Relaxed);
        let probes = self.task.await.unwrap();
        let slow = self.slow.lock().unwrap().clone();
        assert!(probes > 0);
        assert!(
            slow.is_empty(),
            "the service did not keep answering: {slow:?}"
        );
    }
}

/// The reconcile runs of `id`: (id, trigger, state, cause).
fn runs(db: &Path, id: &str) -> Vec<(i64, String, String, Option<String>)> {
    let conn = open_db(db);
    let mut stmt = conn
        .prepare(
            "SELECT id, trigger, state, cause FROM reconcile_runs WHERE workspace_id = ?1 ORDER BY id",
        )
        .unwrap();
    stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Wait until `id` has `n` runs and none is queued or running; the last.
async fn settled(
    db: &Path,
    id: &str,
    n: usize,
    within: Duration,
) -> (i64, String, String, Option<String>) {
    let deadline = Instant::now() + within;
    loop {
        let all = runs(db, id);
        if all.len() >= n && all.iter().all(|r| r.2 == "succeeded" || r.2 == "failed") {
            return all.last().unwrap().clone();
        }
        assert!(
            Instant::now() < deadline,
            "runs of `{id}` did not finish: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register(client: &HttpClient, base: &str, id: &str, token: &str) {
    let body = json!({"id": id, "url": "http://agent:8000", "agent_card": {"name": id}});
    let a = request(
        client,
        "POST",
        &format!("{base}/registry/register"),
        Some(token),
        body.to_string().into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{:?}", a.json());
}

/// Another online reconcile for `id`: offline (as another part of the control
/// plane would set it), then a heartbeat.
async fn online_again(world: &World, client: &HttpClient, base: &str, id: &str, token: &str) {
    open_db(&world.db())
        .execute(
            "UPDATE workspaces SET status = 'offline' WHERE id = ?1",
            [id],
        )
        .unwrap();
    let a = post_heartbeat(client, base, token, &json!({"workspace_id": id}))
        .await
        .unwrap();
    assert_eq!(a.status, 200);
}

/// Deliver `tools` to `id` the ordinary way (its first register).
async fn delivered(world: &World, client: &HttpClient, base: &str, id: &str, token: &str) {
    register(client, base, id, token).await;
    let run = settled(&world.db(), id, 1, Duration::from_secs(30)).await;
    assert_eq!(run.2, "succeeded", "{run:?}");
    assert!(world.volume(id).join("plugins/tools/.complete").is_file());
}

async fn sigterm(serve: &mut Serve) {
    serve.signal("TERM");
    let status = serve.exit_within(Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        serve.log_text()
    );
}

fn assert_refused(run: &(i64, String, String, Option<String>), says: &[&str]) {
    assert_eq!(run.2, "failed", "{run:?}");
    let cause = run.3.clone().unwrap_or_default();
    for s in says {
        assert!(cause.contains(s), "`{s}` missing from the cause: {cause}");
    }
}

/// Serve `world`, register `id` (its first run), and check that the run is
/// refused saying `says`, that `plugin` was not delivered, and the three
/// things every test checks.
async fn first_run_refused(
    world: &World,
    id: &str,
    token: &str,
    bystander: (String, String),
    plugin: &str,
    says: &[&str],
) {
    let before = world.hash_but(id, plugin);
    let mut serve = world.serve("serve.log").await;
    let base = serve.url();
    let prober = Prober::start(base.clone(), bystander);
    register(&http_client(), &base, id, token).await;
    let run = settled(&world.db(), id, 1, Duration::from_secs(60)).await;
    assert_refused(&run, says);
    assert!(!world.volume(id).join("plugins").join(plugin).exists());
    prober.check().await;
    sigterm(&mut serve).await;
    assert_same_tree(&before, &world.hash_but(id, plugin));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_symlinked_previous_touches_nothing_outside() {
    let world = World::new("");
    let victim = world.root().join("victim");
    std::fs::create_dir_all(victim.join("a.1")).unwrap();
    std::fs::write(victim.join("a.1/secret"), "s").unwrap();
    std::fs::create_dir_all(victim.join("b/c")).unwrap();
    std::fs::write(victim.join("b/c/keep"), "k").unwrap();
    let bystander = (
        "bystander".to_string(),
        provision(&world.db(), "bystander", false),
    );
    // `.previous` as a link to the world's root (the database and the
    // configuration), and as a link to a victim directory.
    let up = world.workspace("up");
    let aside = world.workspace("aside");
    std::fs::create_dir_all(world.volume("up").join("plugins")).unwrap();
    std::os::unix::fs::symlink("../../..", world.volume("up").join("plugins/.previous")).unwrap();
    std::fs::create_dir_all(world.volume("aside").join("plugins")).unwrap();
    std::os::unix::fs::symlink(&victim, world.volume("aside").join("plugins/.previous")).unwrap();
    let before = (world.hash("up"), world.hash("aside"));

    let mut serve = world.serve("serve.log").await;
    let base = serve.url();
    let prober = Prober::start(base.clone(), bystander);
    let client = http_client();
    for (id, token) in [("up", &up), ("aside", &aside)] {
        register(&client, &base, id, token).await;
        let run = settled(&world.db(), id, 1, Duration::from_secs(30)).await;
        assert_refused(&run, &["plugins/.previous", "symlink"]);
    }
    prober.check().await;
    sigterm(&mut serve).await;
    assert_same_tree(&before.0, &world.hash("up"));
    assert_same_tree(&before.1, &world.hash("aside"));
    assert!(world.db().is_file() && world.config.is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_symlinked_plugins_dir_is_refused() {
    let world = World::new("");
    let victim = world.root().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("keep"), "k").unwrap();
    let bystander = (
        "bystander".to_string(),
        provision(&world.db(), "bystander", false),
    );
    let token = world.workspace("ws");
    std::fs::create_dir_all(world.volume("ws")).unwrap();
    std::os::unix::fs::symlink(&victim, world.volume("ws").join("plugins")).unwrap();
    first_run_refused(
        &world,
        "ws",
        &token,
        bystander,
        "tools",
        &["`plugins`", "symlink"],
    )
    .await;
}

const MANAGEMENT: &str = "molecule-ai-plugin-molecule-platform-mcp";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_fifo_does_not_block_the_service() {
    let world = World::new("");
    let bystander = (
        "bystander".to_string(),
        provision(&world.db(), "bystander", false),
    );
    let a = world.workspace("fifo-marker");
    // A concierge whose management plugin is delivered; a recovery of it
    // reads the runtime's rendered settings.
    let mgmt = world.root().join("plugins/mgmt");
    std::fs::create_dir_all(&mgmt).unwrap();
    std::fs::write(mgmt.join("plugin.yaml"), "name: mgmt\n").unwrap();
    let b = provision(&world.db(), "concierge", true);
    cli(
        &world.db(),
        &[
            "workspace",
            "declare-plugin",
            "concierge",
            MANAGEMENT,
            "local://mgmt",
        ],
    );
    let mut serve = world.serve("serve.log").await;
    let base = serve.url();
    let client = http_client();
    delivered(&world, &client, &base, "fifo-marker", &a).await;
    let boot = json!({"id": "concierge", "url": "http://agent:8000", "agent_card": {},
                      "kind": "platform", "mcp_server_present": true});
    let answer = request(
        &client,
        "POST",
        &format!("{base}/registry/register"),
        Some(&b),
        boot.to_string().into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.json());
    let run = settled(&world.db(), "concierge", 1, Duration::from_secs(30)).await;
    assert_eq!(run.2, "succeeded", "{run:?}");
    // The runtimes turn a marker, and the rendered settings, into FIFOs.
    let marker = world.volume("fifo-marker").join("plugins/tools/.complete");
    std::fs::remove_file(&marker).unwrap();
    mkfifo(&marker);
    std::fs::create_dir_all(world.volume("concierge").join(".claude")).unwrap();
    mkfifo(&world.volume("concierge").join(".claude/settings.json"));
    let before = (
        world.hash("fifo-marker"),
        world.hash_but("concierge", MANAGEMENT),
    );

    let prober = Prober::start(base.clone(), bystander);
    online_again(&world, &client, &base, "fifo-marker", &a).await;
    // The concierge reports its MCP missing: failed closed, and a recovery
    // that finds the plugin present and looks at the settings.
    let missing = json!({"workspace_id": "concierge", "mcp_server_present": false});
    let answer = post_heartbeat(&client, &base, &b, &missing).await.unwrap();
    assert_eq!(answer.status, 200);
    let run = settled(&world.db(), "fifo-marker", 2, Duration::from_secs(20)).await;
    assert_refused(&run, &["plugins/tools/.complete", "FIFO"]);
    let run = settled(&world.db(), "concierge", 2, Duration::from_secs(20)).await;
    assert_eq!(run.1, "mcp-recovery", "{run:?}");
    assert_refused(&run, &[".claude/settings.json", "FIFO"]);
    // The admin view of the plugins, eight at once (every blocking permit).
    let views: Vec<_> = (0..8)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move {
                let client = http_client();
                tokio::time::timeout(
                    Duration::from_secs(2),
                    request(
                        &client,
                        "GET",
                        &format!("{base}/admin/workspaces/fifo-marker/plugins"),
                        Some(ADMIN),
                        Vec::new(),
                    ),
                )
                .await
            })
        })
        .collect();
    for view in views {
        let a = view
            .await
            .unwrap()
            .expect("the plugins view within 2 s")
            .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["installed"][0]["present"], false, "{:?}", a.json());
    }
    prober.check().await;
    sigterm(&mut serve).await;
    assert_same_tree(&before.0, &world.hash("fifo-marker"));
    assert_same_tree(&before.1, &world.hash_but("concierge", MANAGEMENT));
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_dev_zero_is_bounded() {
    let world = World::new("");
    let bystander = (
        "bystander".to_string(),
        provision(&world.db(), "bystander", false),
    );
    let token = world.workspace("ws");
    let mut serve = world.serve("serve.log").await;
    let base = serve.url();
    let client = http_client();
    delivered(&world, &client, &base, "ws", &token).await;
    let marker = world.volume("ws").join("plugins/tools/.complete");
    std::fs::remove_file(&marker).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &marker).unwrap();
    std::fs::create_dir_all(world.volume("ws").join(".claude")).unwrap();
    std::os::unix::fs::symlink(
        "/dev/zero",
        world.volume("ws").join(".claude/settings.json"),
    )
    .unwrap();
    let before = world.hash("ws");
    let rss_before = rss_kib(serve.child.id());

    let prober = Prober::start(base.clone(), bystander);
    online_again(&world, &client, &base, "ws", &token).await;
    let run = settled(&world.db(), "ws", 2, Duration::from_secs(20)).await;
    assert_refused(&run, &["plugins/tools/.complete", "symlink"]);
    // The admin view, too, reads nothing of it.
    let a = request(
        &client,
        "GET",
        &format!("{base}/admin/workspaces/ws/plugins"),
        Some(ADMIN),
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    prober.check().await;
    let rss_after = rss_kib(serve.child.id());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "resident memory grew from {rss_before} to {rss_after} KiB"
    );
    sigterm(&mut serve).await;
    assert_same_tree(&before, &world.hash("ws"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_run_does_not_crash_loop() {
    let mut world = World::new("");
    let token = world.workspace("ws");
    let bystander = (
        "bystander".to_string(),
        provision(&world.db(), "bystander", false),
    );
    let reached = world.root().join("failpoint-reached");
    world.env.push((
        "HEARTGATE_FAILPOINT".into(),
        format!("before-swap:{}", reached.display()),
    ));
    // Twice, the run stops the service: it hangs at the failpoint and the
    // process is killed there (as a run that crashes it would).
    for lifetime in 0..2 {
        let mut serve = world.serve(&format!("serve-{lifetime}.log")).await;
        if lifetime == 0 {
            register(&http_client(), &serve.url(), "ws", &token).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reached.exists() {
            assert!(Instant::now() < deadline, "the failpoint was never reached");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::remove_file(&reached).unwrap();
        serve.sigkill();
    }
    let before = world.hash("ws");
    world.env.retain(|(k, _)| k != "HEARTGATE_FAILPOINT");
    let mut serve = world.serve("serve-2.log").await;
    let prober = Prober::start(serve.url(), bystander);
    let run = settled(&world.db(), "ws", 1, Duration::from_secs(10)).await;
    assert_refused(&run, &["interrupted 2 times"]);
    // It is not run again at this start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs(&world.db(), "ws").len(), 1);
    assert!(!reached.exists());
    prober.check().await;
    sigterm(&mut serve).await;
    assert_same_tree(&before, &world.hash("ws"));
}

/// A git repository at `dir` with `files`, tagged `v1`.
fn git_repo(dir: &Path, files: &[(&str, &[u8])]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, body) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
    for args in [
        &["init", "--quiet"][..],
        &["add", "."],
        &["commit", "--quiet", "-m", "v1"],
        &["tag", "v1"],
    ] {
        git(dir, args);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_source_size_limit_holds_during_clone() {
    let mut world = World::new("max_plugin_mib = 5\n");
    // A small repository (its pack is under a MiB) holding a 200 MiB file
    // that compresses to nearly nothing (text, not zeros: a checkout writes
    // zeros as a sparse file).
    let repo = world.root().join("repo");
    let line = "heartgate refuses this plugin while it stages it, not after.\n";
    let text = line.repeat((200 << 20) / line.len()).into_bytes();
    git_repo(
        &repo,
        &[("plugin.yaml", b"name: big\n"), ("blob.txt", &text)],
    );
    drop(text);
    let bystander = (
        "bystander".to_string(),
        provision(&world.db(), "bystander", false),
    );
    let token = provision(&world.db(), "ws", false);
    let source = format!("git+file://{}#tag:v1", repo.display());
    cli(
        &world.db(),
        &["workspace", "declare-plugin", "ws", "big", &source],
    );
    // The service stages in a 64 MiB temporary directory: a checkout of the
    // whole file would fill it; staging must stop at the 5 MiB limit first.
    let tmp = world.root().join("tmp");
    let _tmpfs = Tmpfs::mount(&tmp, 64);
    world.env.push(("TMPDIR".into(), tmp.display().to_string()));
    first_run_refused(
        &world,
        "ws",
        &token,
        bystander,
        "big",
        &["big", "larger than 5242880 bytes"],
    )
    .await;
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "staging left {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_directory_flood_is_refused() {
    // 2 000 directories and one file: under 100 KiB compressed.
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for i in 0..2000 {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        header.set_mode(0o755);
        header.set_cksum();
        builder
            .append_data(&mut header, format!("repo/d{i}/"), &[][..])
            .unwrap();
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(11);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "repo/plugin.yaml", &b"name: flood"[..])
        .unwrap();
    let archive = builder.into_inner().unwrap().finish().unwrap();
    let gitea = Gitea::start("/api/v1/repos/o/flood/archive/v1.tar.gz", "t0ken", archive).await;
    let mut world = World::new(&format!(
        "max_plugin_files = 100\n[gitea]\nbase_url = \"http://{}\"\ntoken_env = \"FLOOD_TOKEN\"\n",
        gitea.addr
    ));
    world.env.push(("FLOOD_TOKEN".into(), "t0ken".into()));
    let bystander = (
        "bystander".to_string(),
        provision(&world.db(), "bystander", false),
    );
    let token = provision(&world.db(), "ws", false);
    cli(
        &world.db(),
        &[
            "workspace",
            "declare-plugin",
            "ws",
            "flood",
            "gitea://o/flood#tag:v1",
        ],
    );
    first_run_refused(
        &world,
        "ws",
        &token,
        bystander,
        "flood",
        &["flood", "more than 100 files and directories"],
    )
    .await;
}

fn scratch_dirs(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.starts_with("heartgate-stage-").then_some(name)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_scratch_is_cleaned_after_a_crash() {
    let mut world = World::new("");
    let token = world.workspace("ws");
    let bystander = (
        "bystander".to_string(),
        provision(&world.db(), "bystander", false),
    );
    let tmp = world.root().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    world.env.push(("TMPDIR".into(), tmp.display().to_string()));
    let reached = world.root().join("failpoint-reached");
    world.env.push((
        "HEARTGATE_FAILPOINT".into(),
        format!("before-swap:{}", reached.display()),
    ));
    std::fs::create_dir_all(world.volume("ws").join("plugins")).unwrap();
    let before = world.hash("ws");
    let mut serve = world.serve("serve-0.log").await;
    register(&http_client(), &serve.url(), "ws", &token).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reached.exists() {
        assert!(Instant::now() < deadline, "the failpoint was never reached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serve.sigkill();
    std::fs::remove_file(&reached).unwrap();
    assert_eq!(scratch_dirs(&tmp).len(), 1, "the killed run's scratch");

    world.env.retain(|(k, _)| k != "HEARTGATE_FAILPOINT");
    let mut serve = world.serve("serve-1.log").await;
    let prober = Prober::start(serve.url(), bystander);
    let run = settled(&world.db(), "ws", 1, Duration::from_secs(30)).await;
    assert_eq!(run.2, "succeeded", "the re-queued run: {run:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !scratch_dirs(&tmp).is_empty() {
        assert!(Instant::now() < deadline, "left: {:?}", scratch_dirs(&tmp));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    prober.check().await;
    sigterm(&mut serve).await;
    assert_same_tree(&before, &world.hash("ws"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_dir_fifo_is_refused() {
    let world = World::new("");
    let bystander = (
        "bystander".to_string(),
        provision(&world.db(), "bystander", false),
    );
    let watch = world.root().join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    mkfifo(&watch.join("gate.wasm"));
    std::os::unix::fs::symlink("/dev/zero", watch.join("cooldown.wasm")).unwrap();
    let before = world.hash("bystander");
    let mut serve = world
        .serve_with("serve.log", &["--watch", watch.to_str().unwrap()])
        .await;
    let prober = Prober::start(serve.url(), bystander);
    // Three scans of the directory (one a second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    prober.check().await;
    let chain: Value = {
        let a = request(
            &http_client(),
            "GET",
            &format!("{}/admin/chain", serve.url()),
            Some(ADMIN),
            Vec::new(),
        )
        .await
        .unwrap();
        a.json()
    };
    assert!(chain["stored"].is_null(), "nothing was activated: {chain}");
    sigterm(&mut serve).await;
    let log = serve.log_text();
    assert_eq!(
        log.matches("watch: refused a file").count(),
        2,
        "each refused once:\n{log}"
    );
    assert_same_tree(&before, &world.hash("bystander"));
}
