//! The real `heartgate` binary as child processes: the service (`serve` on a
//! free loopback port) and the operator CLI, on a temp SQLite file; and a
//! small HTTP client for them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub const HEARTGATE: &str = env!("CARGO_BIN_EXE_heartgate");

/// The binary the tests run: `HEARTGATE_BIN` if set (to show that a test
/// fails on another build, e.g. the last release), else this build's.
pub fn heartgate() -> std::ffi::OsString {
    std::env::var_os("HEARTGATE_BIN").unwrap_or_else(|| HEARTGATE.into())
}

/// The operator CLI on `db`, whatever its exit status.
pub fn cli_output(db: &Path, args: &[&str]) -> Output {
    Command::new(heartgate())
        .arg("--db")
        .arg(db)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The operator CLI on `db`; returns its stdout, panics if it failed.
pub fn cli(db: &Path, args: &[&str]) -> String {
    let out = cli_output(db, args);
    assert!(
        out.status.success(),
        "heartgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Provision a workspace with the CLI and issue it a token.
pub fn provision(db: &Path, id: &str, platform: bool) -> String {
    if platform {
        cli(
            db,
            &[
                "workspace",
                "add",
                id,
                "--kind",
                "platform",
                "--model-configured",
            ],
        );
    } else {
        cli(db, &["workspace", "add", id]);
    }
    cli(db, &["token", "issue", id]).trim().to_string()
}

/// A `heartgate serve` child process; killed if still running when dropped.
pub struct Serve {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    /// Kept open: the service may write to its stdout after the first line.
    _stdout: BufReader<ChildStdout>,
}

impl Serve {
    /// Start the service on `db` and `config` on a free loopback port; its
    /// log goes to `log`. Returns once it has bound its port.
    pub fn start(db: &Path, config: &Path, log: &Path) -> Serve {
        let mut cmd = Command::new(heartgate());
        cmd.arg("--db")
            .arg(db)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config);
        Serve::spawn(cmd, log)
    }

    /// [`Serve::start`], then wait until it answers `/healthz` (the port is
    /// bound before the chain is compiled; requests wait until then).
    pub async fn start_ready(db: &Path, config: &Path, log: &Path) -> Serve {
        let serve = Serve::start(db, config, log);
        serve.wait_healthy().await;
        serve
    }

    /// Wait until the service answers `/healthz`; panics after 30 s.
    pub async fn wait_healthy(&self) {
        let client = http_client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = request(
                &client,
                "GET",
                &format!("{}/healthz", self.url()),
                None,
                Vec::new(),
            )
            .await;
            if answer.is_ok_and(|a| a.status == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the service did not answer /healthz; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start `cmd` (a `heartgate ... serve --listen 127.0.0.1:0 ...`, or a
    /// shell that execs one) with its stderr in `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Serve {
        // The test's own environment never leaks in; what `cmd` sets stays.
        for name in ["HEARTGATE_FAILPOINT", "RUST_LOG"] {
            if !cmd.get_envs().any(|(k, _)| k == name) {
                cmd.env_remove(name);
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let Some(url) = line.trim().strip_prefix("heartgate listening on http://") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the service did not start: {line:?}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        };
        Serve {
            addr: url.parse().unwrap(),
            child,
            log: log.to_path_buf(),
            _stdout: stdout,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the service logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send `signal` (`TERM`, ...) with `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGKILL, and reap it.
    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Wait for the process to exit; panics after `within`.
    pub async fn exit_within(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the service did not exit within {within:?}; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub async fn stop(&mut self) {
        self.signal("TERM");
        let status = self.exit_within(Duration::from_secs(20)).await;
        assert!(status.success(), "exit {status}; log:\n{}", self.log_text());
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `check` until it holds; panics after `within`.
pub async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A configuration file in `dir`: config volumes and local plugins in the
/// temp dir (never in the working directory), plus `extra`. Agent URLs are
/// checked in `dev` mode (tests register names that do not resolve here)
/// unless `extra` has a `[registry]` section of its own.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("heartgate.toml");
    let registry = if extra.contains("[registry]") {
        ""
    } else {
        "\n[registry]\nagent_url_mode = \"dev\"\n"
    };
    std::fs::write(
        &path,
        format!("configs_root = \"configs\"\nplugins_dir = \"plugins\"\n{extra}{registry}"),
    )
    .unwrap();
    path
}

pub fn open_db(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

pub fn integrity_check(conn: &rusqlite::Connection) {
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(result, "ok", "PRAGMA integrity_check");
    let broken: i64 = conn
        .query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(broken, 0, "PRAGMA foreign_key_check");
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client for the service (keep-alive, pooled).
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A complete response: status, `heartgate-durability` header, body.
pub struct Answer {
    pub status: u16,
    pub durability: Option<String>,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`Null` if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Acknowledged as committed before the answer (not only queued).
    pub fn committed(&self) -> bool {
        self.durability.as_deref() == Some("committed")
    }
}

/// One request; `Err` if no complete response came back.
pub async fn request(
    client: &HttpClient,
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: Vec<u8>,
) -> Result<Answer, String> {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let durability = resp
        .headers()
        .get("heartgate-durability")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Answer {
        status,
        durability,
        body,
    })
}

/// POST a heartbeat with `token`.
pub async fn post_heartbeat(
    client: &HttpClient,
    base: &str,
    token: &str,
    body: &Value,
) -> Result<Answer, String> {
    request(
        client,
        "POST",
        &format!("{base}/registry/heartbeat"),
        Some(token),
        body.to_string().into_bytes(),
    )
    .await
}

/// `git args` in `dir` (with a fixed identity and default branch); stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A tmpfs of `mib` MiB mounted at `path` (root only: CI runs as root);
/// unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (as in CI): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
