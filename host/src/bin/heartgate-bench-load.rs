//! Load benchmark: the real service on loopback (built-in chain, a fresh
//! sandbox per policy, a SQLite file in a temporary directory) driven by
//! many concurrent keep-alive connections from a generator in this process,
//! and, in the same run, the same generator against a minimal hyper server
//! that answers a fixed body: the ceiling of this machine.
//!
//! `cargo run --release --bin heartgate-bench-load -- --seconds N` runs three
//! phases of N seconds: the ceiling at full speed, the service at full speed,
//! and the service paced at half its full-speed rate (the latency a service
//! shows when it is not saturated). It ends with one line:
//! `heartbeats_per_s=<n> ceiling_per_s=<n> ratio=<r> p50_ms=<x> p99_ms=<x>`
//! where the rates are the full-speed phases and the latencies the paced one.
//!
//! `--db postgres://...` runs the service on that PostgreSQL database (an
//! empty one: the workspaces are provisioned into it) instead of a SQLite
//! file, and `--hosts N` runs N services on it in this process, the
//! connections spread over them.
//!
//! `--silent N` adds a phase: N more workspaces heartbeat once each and then
//! go silent together (with `[liveness] heartbeat_ttl` = `--silent-ttl`),
//! while the first ones keep heartbeating at half the full-speed rate. It
//! reports how long after their deadlines all N were `offline` and the live
//! heartbeats' latencies meanwhile, and adds `silent_offline_s=<x>
//! silent_live_p99_ms=<x>` to the last line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use heartgate::ServiceOptions;

/// The allocator of the `heartgate` binary, so the service measured here
/// allocates as the deployed one does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use heartgate::model::WorkspaceKind;
use heartgate::store::NewWorkspace;

#[derive(Parser)]
#[command(
    name = "heartgate-bench-load",
    about = "Durable heartbeats per second against a bare hyper ceiling"
)]
struct Args {
    /// Seconds per phase (three phases).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Keep at most this many decision rows (the service's
    /// `[decision_log] max_rows`), to measure pruning under load.
    #[arg(long)]
    decision_log_rows: Option<u64>,
    /// Workspaces heartbeating (spread over the connections).
    #[arg(long, default_value_t = 1000)]
    workspaces: usize,
    /// Also this many workspaces that heartbeat once, then go silent at once.
    #[arg(long, default_value_t = 0)]
    silent: usize,
    /// The heartbeat TTL while `--silent` is given.
    #[arg(long, default_value = "10s")]
    silent_ttl: String,
    /// A PostgreSQL URL to run on (an empty database) [default: a SQLite
    /// file in a temporary directory].
    #[arg(long)]
    db: Option<String>,
    /// Services on the database (more than one only on PostgreSQL).
    #[arg(long, default_value_t = 1)]
    hosts: usize,
}

/// Latencies of one phase, in microseconds.
struct Phase {
    name: &'static str,
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies_us: Vec<u32>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    fn report(&self) {
        println!(
            "{:<22} {:>9.0} req/s  p50={:.3}ms p99={:.3}ms p99.9={:.3}ms  ({} requests, {} errors, {:.1}s)",
            self.name,
            self.rate(),
            self.quantile_ms(0.50),
            self.quantile_ms(0.99),
            self.quantile_ms(0.999),
            self.requests,
            self.errors,
            self.elapsed.as_secs_f64()
        );
    }
}

/// One request to send: path, bearer, body.
type Shot = (String, Option<String>, Bytes);

/// Drive `addr` with `connections` keep-alive connections for `duration`;
/// each connection cycles through its `shots`. With `per_second`, the
/// connections together send at most that many requests a second.
async fn drive(
    name: &'static str,
    addrs: Vec<SocketAddr>,
    shots: Arc<Vec<Shot>>,
    connections: usize,
    duration: Duration,
    per_second: Option<f64>,
    stop: Option<Arc<AtomicBool>>,
) -> Result<Phase> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let shots = shots.clone();
        let stop = stop.clone();
        let addr = addrs[c % addrs.len()];
        // Each connection sends at an even share of the paced rate.
        let interval = per_second.map(|r| Duration::from_secs_f64(connections as f64 / r));
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await?;
            let mut latencies = Vec::new();
            let (mut ok, mut errors) = (0usize, 0usize);
            let mut i = c;
            let mut next = Instant::now()
                + interval.map_or(Duration::ZERO, |iv| {
                    iv.mul_f64(c as f64 / connections as f64)
                });
            while Instant::now() < deadline
                && !stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
            {
                if interval.is_some() {
                    tokio::time::sleep_until(next.into()).await;
                }
                let (path, bearer, body) = &shots[i % shots.len()];
                i += connections;
                let mut req = Request::post(path.as_str())
                    .header("host", "bench")
                    .header("content-type", "application/json");
                if let Some(token) = bearer {
                    req = req.header("authorization", format!("Bearer {token}"));
                }
                let req = req.body(Full::new(body.clone()))?;
                let t = Instant::now();
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                let us = u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX);
                if status.is_success() {
                    ok += 1;
                    latencies.push(us);
                } else {
                    errors += 1;
                }
                if let Some(iv) = interval {
                    next += iv;
                }
            }
            anyhow::Ok((ok, errors, latencies))
        }));
    }
    let mut phase = Phase {
        name,
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
    };
    for t in tasks {
        let (ok, errors, latencies) = t.await??;
        phase.requests += ok;
        phase.errors += errors;
        phase.latencies_us.extend(latencies);
    }
    phase.elapsed = started.elapsed();
    phase.latencies_us.sort_unstable();
    Ok(phase)
}

/// A keep-alive connection to `addr`, without Nagle's delay.
async fn connect(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A minimal hyper server that answers every request with a fixed body.
async fn ceiling_server(stop: Arc<AtomicBool>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    // Read the body as the service does, then answer.
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        br#"{"status":"ok"}"#,
                    ))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.seconds == 0 || args.connections == 0 || args.workspaces == 0 || args.hosts == 0 {
        bail!("--seconds, --connections, --workspaces and --hosts must be at least 1");
    }
    let postgres = args
        .db
        .as_deref()
        .is_some_and(heartgate::store::postgres::is_postgres_url);
    if args.db.is_some() && !postgres {
        bail!("--db takes a postgres:// URL (without it, a temporary SQLite file is used)");
    }
    if args.hosts > 1 && !postgres {
        bail!("--hosts above 1 needs --db postgres://...: hosts share one database");
    }
    if args.hosts > 1 && args.silent > 0 {
        bail!("--silent runs with one host");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let db = match &args.db {
        Some(url) => heartgate::Database::Postgres(url.clone()),
        None => heartgate::Database::Sqlite(dir.path().join("bench.db")),
    };
    let duration = Duration::from_secs(args.seconds);

    // Workspaces online with a token each, as after their first heartbeat.
    let store = heartgate::open_store(&db)?;
    let now = heartgate::clock::Clock::now_ms(&heartgate::clock::SystemClock);
    // Provisioned from 16 threads: on PostgreSQL each workspace is three
    // committed transactions, which its group commit then shares.
    let provision = |prefix: &str, n: usize, task: &str| -> Result<Vec<Shot>> {
        let bodies: Vec<(String, String)> = (0..n)
            .map(|i| {
                let id = format!("{prefix}-{i:06}");
                let body = format!(
                    r#"{{"workspace_id":"{id}","error_rate":0.0,"sample_error":"","active_tasks":1,{task}"uptime_seconds":60}}"#
                );
                (id, body)
            })
            .collect();
        let chunk = n.div_ceil(16).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = bodies
                .chunks(chunk)
                .map(|part| {
                    let store = store.clone();
                    s.spawn(move || {
                        part.iter()
                            .map(|(id, body)| online(store.as_ref(), id, now, body.clone()))
                            .collect::<Result<Vec<Shot>>>()
                    })
                })
                .collect();
            let mut shots = Vec::with_capacity(n);
            for h in handles {
                shots.extend(
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a provisioning thread panicked"))??,
                );
            }
            Ok(shots)
        })
    };
    let shots = provision("bench", args.workspaces, r#""current_task":"bench","#)?;
    // Online, never heard from yet: no deadline until their one heartbeat.
    let silent_shots = provision("silent", args.silent, "")?;
    drop(store);
    let shots = Arc::new(shots);
    let silent_ttl = heartgate::liveness::parse_duration(&args.silent_ttl)
        .map_err(|e| anyhow::anyhow!("--silent-ttl: {e}"))?;

    // The ceiling: the same generator against a bare hyper server.
    let stop = Arc::new(AtomicBool::new(false));
    let ceiling_addr = ceiling_server(stop.clone()).await?;
    let ceiling = drive(
        "hyper ceiling",
        vec![ceiling_addr],
        shots.clone(),
        args.connections,
        duration,
        None,
        None,
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    ceiling.report();

    // The services, with their embedded defaults, on loopback.
    let mut addrs = Vec::with_capacity(args.hosts);
    let mut servers = Vec::with_capacity(args.hosts);
    for _ in 0..args.hosts {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        let mut opts = ServiceOptions::new(&db);
        opts.deliverer.configs_root = dir.path().join("configs");
        opts.deliverer.plugins_dir = dir.path().join("plugins");
        if let Some(rows) = args.decision_log_rows {
            opts.retention.max_rows = rows;
        }
        if args.silent > 0 {
            opts.liveness.heartbeat_ttl = silent_ttl;
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        servers.push((
            tx,
            tokio::spawn(heartgate::run(listener, opts, async move {
                let _ = rx.await;
            })),
        ));
    }
    for addr in &addrs {
        wait_healthy(*addr).await?;
    }
    let addr = addrs[0];
    let rss_start = rss_kib();
    let full = drive(
        "heartgate full speed",
        addrs.clone(),
        shots.clone(),
        args.connections,
        duration,
        None,
        None,
    )
    .await?;
    full.report();
    let rss_warm = rss_kib();
    let paced = drive(
        "heartgate at half rate",
        addrs.clone(),
        shots.clone(),
        args.connections,
        duration,
        Some(full.rate() / 2.0),
        None,
    )
    .await?;
    paced.report();
    if let (Some(start), Some(warm), Some(end)) = (rss_start, rss_warm, rss_kib()) {
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "rss: {:.1} MiB at start, {:.1} MiB after the full-speed phase ({} heartbeats), \
             {:.1} MiB after the paced phase ({} more): {:+.1}% over the paced phase",
            mib(start),
            mib(warm),
            full.requests,
            mib(end),
            paced.requests,
            (end as f64 - warm as f64) * 100.0 / warm as f64
        );
    }
    // The WAL must stay bounded under sustained writes (its checkpoints have
    // to finish), and the database grows by the decision log.
    let size_mib = |name: &str| {
        std::fs::metadata(dir.path().join(name)).map_or(0.0, |m| m.len() as f64 / 1048576.0)
    };
    if !db.is_postgres() {
        println!(
            "disk: database {:.1} MiB, WAL {:.1} MiB after {} heartbeats",
            size_mib("bench.db"),
            size_mib("bench.db-wal"),
            full.requests + paced.requests
        );
    }
    let silence = if args.silent > 0 {
        Some(
            silent_phase(
                addr,
                silent_shots,
                shots,
                args.connections,
                full.rate() / 2.0,
                silent_ttl,
            )
            .await?,
        )
    } else {
        None
    };
    for (tx, server) in servers {
        let _ = tx.send(());
        server.await??;
    }

    if full.errors + paced.errors > 0 {
        bail!("{} requests failed", full.errors + paced.errors);
    }
    let silent_figures = silence.map_or(String::new(), |(offline_s, live)| {
        format!(
            " silent_offline_s={offline_s:.1} silent_live_p99_ms={:.3}",
            live.quantile_ms(0.99)
        )
    });
    println!(
        "heartbeats_per_s={:.0} ceiling_per_s={:.0} ratio={:.3} p50_ms={:.3} p99_ms={:.3}{silent_figures}",
        full.rate(),
        ceiling.rate(),
        full.rate() / ceiling.rate(),
        paced.quantile_ms(0.50),
        paced.quantile_ms(0.99)
    );
    Ok(())
}

/// The silent phase: each of `silent` heartbeats once, then all go silent
/// while `live` heartbeats at `per_second`; returns how many seconds after
/// the last one's deadline all were `offline`, and the live latencies.
async fn silent_phase(
    addr: SocketAddr,
    silent: Vec<Shot>,
    live: Arc<Vec<Shot>>,
    connections: usize,
    per_second: f64,
    ttl: Duration,
) -> Result<(f64, Phase)> {
    let n = silent.len();
    let before = offline_transitions(addr).await?;
    let started = Instant::now();
    let once = drive_once(addr, silent, connections).await?;
    let last_deadline = Instant::now() + ttl;
    println!(
        "silent phase: {n} workspaces heartbeat once ({:.1}s, {once} errors); their deadlines pass between +{:.1}s and +{:.1}s",
        started.elapsed().as_secs_f64(),
        ttl.as_secs_f64(),
        (last_deadline - started).as_secs_f64()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let live = tokio::spawn(drive(
        "heartgate live, silence",
        vec![addr],
        live,
        connections,
        ttl + Duration::from_secs(600),
        Some(per_second),
        Some(stop.clone()),
    ));
    let limit = last_deadline + Duration::from_secs(600);
    let mut offline = 0;
    while Instant::now() < limit {
        offline = offline_transitions(addr).await? - before;
        if offline >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let live = live.await??;
    if offline < n as u64 {
        bail!("only {offline} of {n} silent workspaces went offline");
    }
    let after_last = done.saturating_duration_since(last_deadline).as_secs_f64();
    println!(
        "silent phase: all {n} offline {:.1}s after the first deadline, {after_last:.1}s after the last",
        (done - started - ttl).as_secs_f64(),
    );
    live.report();
    if live.errors > 0 || once > 0 {
        bail!("{} requests failed in the silent phase", live.errors + once);
    }
    Ok((after_last, live))
}

/// Send each shot once over `connections` connections; the errors.
async fn drive_once(addr: SocketAddr, shots: Vec<Shot>, connections: usize) -> Result<usize> {
    let shots = Arc::new(shots);
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let shots = shots.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await?;
            let mut errors = 0usize;
            for (path, bearer, body) in shots.iter().skip(c).step_by(connections) {
                let mut req = Request::post(path.as_str())
                    .header("host", "bench")
                    .header("content-type", "application/json");
                if let Some(token) = bearer {
                    req = req.header("authorization", format!("Bearer {token}"));
                }
                sender.ready().await?;
                let resp = sender
                    .send_request(req.body(Full::new(body.clone()))?)
                    .await?;
                if !resp.status().is_success() {
                    errors += 1;
                }
                resp.into_body().collect().await?;
            }
            anyhow::Ok(errors)
        }));
    }
    let mut errors = 0;
    for t in tasks {
        errors += t.await??;
    }
    Ok(errors)
}

/// `heartgate_silence_transitions_total{kind="heartbeat_expired",to="offline"}`.
async fn offline_transitions(addr: SocketAddr) -> Result<u64> {
    let body = get(addr, "/metrics").await?.into_body().collect().await?;
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    Ok(text
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "heartgate_silence_transitions_total{kind=\"heartbeat_expired\",to=\"offline\"} ",
            )
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0))
}

/// Provision `id` online with a token; its heartbeat with `body`.
fn online(store: &dyn heartgate::store::Store, id: &str, now: i64, body: String) -> Result<Shot> {
    store.add_workspace(
        &NewWorkspace {
            id: id.to_string(),
            name: String::new(),
            kind: WorkspaceKind::Workspace,
            model_configured: true,
            runtime: String::new(),
        },
        now,
    )?;
    store.set_status(id, heartgate::model::Status::Online, now)?;
    let token = heartgate::auth::mint()?;
    store.issue_token(id, &token.stored, now)?;
    Ok((
        "/registry/heartbeat".to_string(),
        Some(token.plaintext),
        Bytes::from(body),
    ))
}

async fn wait_healthy(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if healthz(addr).await.unwrap_or(false) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the service did not answer /healthz within 120 s")
}

async fn healthz(addr: SocketAddr) -> Result<bool> {
    Ok(get(addr, "/healthz").await?.status().is_success())
}

/// `GET path` on a connection of its own.
async fn get(addr: SocketAddr, path: &str) -> Result<Response<hyper::body::Incoming>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "bench")
        .body(Full::new(Bytes::new()))?;
    Ok(sender.send_request(req).await?)
}

/// This process's resident set in KiB (Linux), for the memory-growth figure.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
