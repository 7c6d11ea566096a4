//! Throwaway PostgreSQL clusters for tests.
//!
//! A [`PgCluster`] runs the distribution's own server binaries (`initdb`, `pg_ctl`, `postgres`,
//! `psql`) on a data directory in a temp dir, listening on a free loopback port, with trust auth
//! for user `postgres`. A test either starts its own cluster, stopped and removed on drop, or
//! uses [`PgCluster::shared`], which a watchdog process removes once the test process is gone.
//!
//! `initdb` refuses to run as root, so when this process is root (CI containers) every server
//! binary runs as the `postgres` user through `runuser` (or `su`).

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};

const NOT_FOUND: &str = "PostgreSQL's server binaries (initdb, pg_ctl) were not found; \
                         install them with `apt-get install -y postgresql`";

/// How many ports `start` tries before giving up, in case another process takes the free one.
const START_ATTEMPTS: u32 = 5;

/// A throwaway PostgreSQL cluster: its own data directory in a temp dir, listening on a free
/// loopback port, trust auth for user `postgres`. Dropping it stops the server
/// (`pg_ctl stop -m immediate`) and removes the directory.
#[derive(Debug)]
pub struct PgCluster {
    /// Holds `data/` (the cluster), `sock/` (its unix socket) and `server.log`.
    dir: tempfile::TempDir,
    bin: PathBuf,
    runner: Runner,
    port: u16,
}

impl PgCluster {
    /// Start a new cluster (initdb + pg_ctl start). Errors say clearly what is missing, e.g.
    /// "PostgreSQL's server binaries (initdb, pg_ctl) were not found; install them with
    /// `apt-get install -y postgresql`".
    pub fn start() -> Result<PgCluster> {
        let bin = find_bin_dir()?;
        let runner = Runner::detect()?;
        let dir = tempfile::Builder::new()
            .prefix("heartgate-pg-")
            .tempdir_in(temp_base(runner)?)
            .context("could not create a temp dir for the cluster")?;
        fs::create_dir(dir.path().join("sock")).context("could not create the socket dir")?;
        if runner != Runner::Direct {
            let chown = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status();
            if !chown.is_ok_and(|s| s.success()) {
                bail!(
                    "could not give `{}` to the `postgres` user",
                    dir.path().display()
                );
            }
        }
        let mut cluster = PgCluster {
            dir,
            bin,
            runner,
            port: 0,
        };
        cluster.initdb()?;
        for attempt in 1..=START_ATTEMPTS {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => break,
                Err(_) if attempt < START_ATTEMPTS && cluster.port_was_taken() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(cluster)
    }

    /// The one cluster shared by every test of this process, started on first use. Because
    /// statics are never dropped, it is stopped and removed by a small watchdog process (an
    /// `sh` loop polling `kill -0 <this pid>`, then `pg_ctl stop -m immediate` and `rm -rf`)
    /// that notices this process has exited, even after kill -9. Panics with the clear error if
    /// it cannot start (tests must never skip silently).
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            match PgCluster::start().and_then(|c| c.spawn_watchdog().map(|()| c)) {
                Ok(cluster) => cluster,
                Err(e) => panic!("could not start the shared PostgreSQL cluster: {e:#}"),
            }
        })
    }

    /// The loopback TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Create a new empty database with a unique name (process id + counter) and return its URL.
    pub fn fresh_database(&self) -> Result<String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("t_{}_{n}", std::process::id());
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(&name))
    }

    /// Run SQL through `psql -v ON_ERROR_STOP=1 -XAtq` on database `db`; its stdout without the
    /// final newline (error with stderr on failure).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let port = self.port.to_string();
        let mut args = words("-v ON_ERROR_STOP=1 -XAtq -h 127.0.0.1 -U postgres -p");
        args.extend([port.as_str(), "-d", db]);
        let out = self
            .run("psql", &args, sql)
            .with_context(|| format!("psql on database `{db}` failed"))?;
        Ok(out.strip_suffix('\n').unwrap_or(&out).to_owned())
    }

    /// Stop the server (`pg_ctl stop -m fast`, waiting) without removing the data.
    pub fn stop(&self) -> Result<()> {
        let data = self.path("data");
        self.run("pg_ctl", &["stop", "-w", "-m", "fast", "-D", &data], "")
            .map(drop)
            .context("could not stop the cluster")
    }

    /// Start it again after `stop`, on the same port.
    pub fn start_again(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    /// Terminate every backend of database `db` whose application_name starts with
    /// `application_name_prefix` (`pg_terminate_backend`, waiting up to 10 s for each to exit;
    /// PostgreSQL 14 or newer); how many were terminated.
    pub fn terminate(&self, db: &str, application_name_prefix: &str) -> Result<usize> {
        let sql = format!(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) FROM pg_stat_activity \
             WHERE datname = {} AND starts_with(application_name, {}) AND pid <> pg_backend_pid()",
            literal(db),
            literal(application_name_prefix)
        );
        let out = self.psql("postgres", &sql)?;
        out.trim()
            .parse()
            .with_context(|| format!("unexpected output from psql: `{out}`"))
    }

    /// The directory of the server binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn initdb(&self) -> Result<()> {
        let data = self.path("data");
        let base = words("-A trust -U postgres -E UTF8 --no-sync -D");
        let args = |locale| [&base[..], &[data.as_str(), locale]].concat();
        let Err(first) = self.run("initdb", &args("--locale=C.UTF-8"), "") else {
            return Ok(());
        };
        // initdb removes what it created on failure; make sure before trying again.
        let _ = fs::remove_dir_all(&data);
        self.run("initdb", &args("--no-locale"), "")
            .map(drop)
            .with_context(|| {
                format!("initdb failed with --locale=C.UTF-8 ({first:#}) and with --no-locale")
            })
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let (data, log) = (self.path("data"), self.path("server.log"));
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=300 -c fsync=on \
             -c shared_buffers=128MB -c log_min_messages=warning",
            self.port,
            quote(&self.path("sock"))
        );
        // A fresh log per attempt, so its tail (and the port check) are about this start.
        let _ = fs::remove_file(&log);
        let mut args = words("start -w -t 60 -D");
        args.extend([data.as_str(), "-l", &log, "-o", &opts]);
        self.run("pg_ctl", &args, "").map(drop).map_err(|e| {
            e.context(format!(
                "postgres did not start on port {}; server.log ends with:\n{}",
                self.port,
                self.log_tail()
            ))
        })
    }

    fn port_was_taken(&self) -> bool {
        let log = fs::read_to_string(self.path("server.log")).unwrap_or_default();
        log.contains("could not bind") || log.contains("Address already in use")
    }

    fn log_tail(&self) -> String {
        let Ok(log) = fs::read(self.path("server.log")) else {
            return "(no server.log)".to_owned();
        };
        let log = String::from_utf8_lossy(&log);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Run one of the server binaries (as `postgres` when root) with `stdin`; its stdout.
    fn run(&self, tool: &str, args: &[&str], stdin: &str) -> Result<String> {
        let program = self.bin.join(tool).to_string_lossy().into_owned();
        let argv = self.runner.argv(program, args);
        let (program, args) = argv.split_first().context("empty command line")?;
        let mut child = Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not run `{tool}`"))?;
        let input = child.stdin.take();
        let out = std::thread::scope(|s| {
            // Feed stdin from its own thread so a large output cannot deadlock the pipes.
            if let Some(mut pipe) = input {
                s.spawn(move || pipe.write_all(stdin.as_bytes()));
            }
            child.wait_with_output()
        })
        .with_context(|| format!("could not wait for `{tool}`"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!("`{tool}` failed ({}): {}", out.status, stderr.trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn_watchdog(&self) -> Result<()> {
        let (program, data) = (self.bin.join("pg_ctl"), self.path("data"));
        let program = program.to_string_lossy().into_owned();
        let stop = shell_line(
            self.runner
                .argv(program, &["stop", "-m", "immediate", "-D", &data]),
        );
        let script = format!(
            "while kill -0 {} 2>/dev/null; do sleep 1; done; {} >/dev/null 2>&1; rm -rf {}",
            std::process::id(),
            stop,
            quote(&self.dir.path().to_string_lossy())
        );
        // Its own process group, so a Ctrl-C aimed at the test run does not take it down too.
        let watchdog = Command::new("/bin/sh")
            .args(["-c", &script])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("could not start the shared cluster's watchdog")?;
        drop(watchdog);
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.dir.path().join("data/postmaster.pid").exists() {
            let data = self.path("data");
            let _ = self.run("pg_ctl", &["stop", "-m", "immediate", "-D", &data], "");
        }
        // The `TempDir` field removes the directory after this.
    }
}

/// How the server binaries are run: directly, or as `postgres` when this process is root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    Direct,
    Runuser,
    Su,
}

impl Runner {
    fn detect() -> Result<Runner> {
        if effective_uid()? != 0 {
            Ok(Runner::Direct)
        } else if find_on_path("runuser").is_some() {
            Ok(Runner::Runuser)
        } else {
            Ok(Runner::Su)
        }
    }

    /// The command line, program first, that runs `program args` the right way.
    fn argv(self, program: String, args: &[&str]) -> Vec<String> {
        let direct = std::iter::once(program).chain(args.iter().map(|a| (*a).to_owned()));
        let (head, tail): (&[&str], Vec<String>) = match self {
            Runner::Direct => (&[], direct.collect()),
            Runner::Runuser => (&["runuser", "-u", "postgres", "--"], direct.collect()),
            Runner::Su => (
                &["su", "postgres", "-s", "/bin/sh", "-c"],
                vec![shell_line(direct)],
            ),
        };
        head.iter().map(|h| (*h).to_owned()).chain(tail).collect()
    }
}

/// The effective uid, from `id -u`.
fn effective_uid() -> Result<u32> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("could not run `id -u`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("unexpected output from `id -u`: `{text}`"))
}

/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`, else `initdb` on PATH;
/// the first that has `initdb` and `pg_ctl`, with symlinks resolved.
fn find_bin_dir() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version: Result<Vec<u32>, _> = name.split('.').map(str::parse).collect();
            Some((version.ok()?, e.path().join("bin")))
        })
        .collect();
    versioned.sort();
    candidates.extend(versioned.into_iter().rev().map(|(_, dir)| dir));
    candidates.extend(find_on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf)));
    candidates
        .iter()
        .find_map(|dir| server_dir(dir))
        .context(NOT_FOUND)
}

/// The real directory of `dir/initdb`, symlinks resolved, if `pg_ctl` is beside it.
fn server_dir(dir: &Path) -> Option<PathBuf> {
    let initdb = fs::canonicalize(dir.join("initdb")).ok()?;
    let real = initdb.parent()?;
    (real.join("pg_ctl").is_file() && real.to_str().is_some()).then(|| real.to_path_buf())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The system temp dir, or `/tmp`, whichever the `postgres` user can reach when we are root.
fn temp_base(runner: Runner) -> Result<PathBuf> {
    let system = std::env::temp_dir();
    if runner == Runner::Direct {
        return Ok(system);
    }
    let traversable = |dir: &Path| {
        dir.ancestors()
            .all(|d| fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
    };
    let tried = format!("tried `{}` and `/tmp`", system.display());
    let found = [system, PathBuf::from("/tmp")]
        .into_iter()
        .find(|d| traversable(d));
    found.with_context(|| format!("no temp dir the `postgres` user can reach ({tried})"))
}

fn free_port() -> Result<u16> {
    let addr = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
    Ok(addr.context("could not pick a free loopback port")?.port())
}

/// The space-separated words of `s`.
fn words(s: &str) -> Vec<&str> {
    s.split(' ').collect()
}

/// `words` as one `sh` command line.
fn shell_line(words: impl IntoIterator<Item = String>) -> String {
    words
        .into_iter()
        .map(|w| quote(&w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `s` as one `sh` word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `s` as an SQL string literal (standard_conforming_strings is on by default).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    fn db_name(url: &str) -> &str {
        url.rsplit('/').next().unwrap()
    }

    #[test]
    fn fresh_databases_are_distinct_and_usable() {
        let pg = PgCluster::start().unwrap();
        let (a, b) = (pg.fresh_database().unwrap(), pg.fresh_database().unwrap());
        assert_ne!(a, b);
        for url in [&a, &b] {
            assert!(url.starts_with(&format!("postgres://postgres@127.0.0.1:{}/t_", pg.port())));
            assert_eq!(pg.psql(db_name(url), "SELECT 1").unwrap(), "1");
        }
        assert!(pg.bin_dir().join("postgres").is_file());
    }

    #[test]
    fn data_survives_stop_and_start_again_on_the_same_port() {
        let pg = PgCluster::start().unwrap();
        let port = pg.port();
        let db = pg.fresh_database().unwrap();
        pg.psql(
            db_name(&db),
            "CREATE TABLE t (v text); INSERT INTO t VALUES ('kept');",
        )
        .unwrap();
        pg.stop().unwrap();
        assert!(pg.psql(db_name(&db), "SELECT 1").is_err());
        pg.start_again().unwrap();
        assert_eq!(pg.port(), port);
        assert_eq!(pg.psql(db_name(&db), "SELECT v FROM t").unwrap(), "kept");
    }

    #[test]
    fn terminate_ends_only_backends_with_the_prefix() {
        let pg = PgCluster::shared();
        let url = pg.fresh_database().unwrap();
        let db = db_name(&url).to_owned();
        let conninfo = format!("dbname={db} application_name=victim-1");
        let sleeper = std::thread::spawn(move || pg.psql(&conninfo, "SELECT pg_sleep(60)"));
        let count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'victim-1'";
        let deadline = Instant::now() + Duration::from_secs(30);
        while pg.psql("postgres", count).unwrap() != "1" {
            assert!(
                Instant::now() < deadline,
                "the sleeping backend never appeared"
            );
        }
        assert_eq!(pg.terminate(&db, "other").unwrap(), 0);
        assert_eq!(pg.terminate(&db, "victim").unwrap(), 1);
        let err = sleeper.join().unwrap().unwrap_err();
        assert!(
            format!("{err:#}").contains("terminating connection"),
            "{err:#}"
        );
    }

    #[test]
    fn shared_is_started_once() {
        let port = PgCluster::shared().port();
        assert_eq!(PgCluster::shared().port(), port);
        assert_eq!(
            PgCluster::shared().psql("postgres", "SELECT 1").unwrap(),
            "1"
        );
    }

    #[test]
    fn dropping_stops_the_server_and_removes_its_directory() {
        let pg = PgCluster::start().unwrap();
        let (root, port) = (pg.dir.path().to_path_buf(), pg.port());
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        drop(pg);
        assert!(!root.exists());
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn runner_wraps_commands_for_the_postgres_user() {
        let psql = "/usr/lib/postgresql/15/bin/psql";
        assert_eq!(
            Runner::Direct.argv(psql.to_owned(), &["-c", "x"]),
            [psql, "-c", "x"]
        );
        let su = Runner::Su.argv(psql.to_owned(), &["it's"]);
        assert_eq!(su[..5], ["su", "postgres", "-s", "/bin/sh", "-c"]);
        assert_eq!(su[5], format!("'{psql}' 'it'\\''s'"));
    }

    /// Run by `shared_cluster_is_removed_after_kill_9` in a child process; a no-op otherwise.
    #[test]
    fn shared_cluster_child() {
        if std::env::var_os("HEARTGATE_PG_CHILD").is_some() {
            let pg = PgCluster::shared();
            println!("cluster {} {}", pg.port(), pg.dir.path().display());
            // Wait to be killed: the parent holds stdin open.
            std::io::stdin().read_line(&mut String::new()).unwrap();
        }
    }

    #[test]
    fn shared_cluster_is_removed_after_kill_9() {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::shared_cluster_child", "--nocapture"])
            .env("HEARTGATE_PG_CHILD", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let line = stdout
            .lines()
            .map(Result::unwrap)
            .find(|l| l.starts_with("cluster "))
            .unwrap();
        let (port, root) = line["cluster ".len()..].split_once(' ').unwrap();
        let (port, root): (u16, PathBuf) = (port.parse().unwrap(), root.into());
        assert!(root.exists() && TcpStream::connect(("127.0.0.1", port)).is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while root.exists() || TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "the watchdog left `{}` behind",
                root.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
