//! Heartbeat latency before and during chain swaps, in one run.
//!
//! Starts the service on loopback with a temp SQLite file, drives it with
//! concurrent keep-alive clients (one workspace each) for a quiet phase, then
//! for a phase in which the admin API activates one of two chains every
//! 200 ms, and prints p50/p99 of both phases and their ratio.
//!
//! `cargo bench --bench hot_swap [-- --seconds N]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark fails loudly"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use heartgate::ServiceOptions;
use heartgate::deliverer::Secret;
use heartgate::model::WorkspaceKind;
use heartgate::store::NewWorkspace;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const ADMIN: &str = "bench-admin";
const CLIENTS: usize = 8;

async fn call(
    client: &HttpClient,
    method: &str,
    url: String,
    token: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1000.0
}

/// Heartbeat as fast as possible until `stop`; returns the latencies.
async fn load(base: String, stop: Arc<AtomicBool>, tokens: Vec<(String, String)>) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for (id, token) in tokens {
        let (base, stop) = (base.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let body = serde_json::json!({"workspace_id": id, "error_rate": 0.0}).to_string();
                let t = Instant::now();
                let (status, _) = call(
                    &client,
                    "POST",
                    format!("{base}/registry/heartbeat"),
                    &token,
                    body.into_bytes(),
                )
                .await;
                assert_eq!(status, 200);
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let seconds: u64 = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut opts = ServiceOptions::new(&db);
    opts.admin_token = Some(Secret::Value(ADMIN.into()));
    opts.deliverer.configs_root = dir.path().join("configs");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(heartgate::run(listener, opts, async move {
        let _ = stop_rx.await;
    }));

    let store = heartgate::open_store(&db).unwrap();
    let mut tokens = Vec::new();
    for i in 0..CLIENTS {
        let id = format!("ws-{i}");
        store
            .add_workspace(
                &NewWorkspace {
                    id: id.clone(),
                    name: id.clone(),
                    kind: WorkspaceKind::Workspace,
                    model_configured: true,
                    runtime: String::new(),
                },
                0,
            )
            .unwrap();
        let token = heartgate::auth::mint().unwrap();
        store.issue_token(&id, &token.stored, 0).unwrap();
        tokens.push((id, token.plaintext));
    }
    let admin: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..100 {
        if admin
            .get(format!("{base}/healthz").parse().unwrap())
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Two chains to swap between: the built-in one, and the same rules with
    // the cooldown pushed as a stored module (a different chain version).
    let (_, active) = call(
        &admin,
        "GET",
        format!("{base}/admin/chain"),
        ADMIN,
        Vec::new(),
    )
    .await;
    let cooldown = heartgate::chain::BUILTIN
        .iter()
        .find(|(n, _)| *n == "cooldown")
        .unwrap()
        .1;
    let (_, pushed) = call(
        &admin,
        "POST",
        format!("{base}/admin/modules"),
        ADMIN,
        cooldown.to_vec(),
    )
    .await;
    let mut spec = active["spec"].clone();
    for slot in spec["slot"].as_array_mut().unwrap() {
        if slot["name"] == "cooldown" {
            slot["module"] = pushed["module"].clone();
        }
    }
    let (_, staged) = call(
        &admin,
        "POST",
        format!("{base}/admin/chains"),
        ADMIN,
        spec.to_string().into_bytes(),
    )
    .await;
    let (_, original) = call(
        &admin,
        "POST",
        format!("{base}/admin/chains"),
        ADMIN,
        active["spec"].to_string().into_bytes(),
    )
    .await;
    let ids = [
        staged["id"].as_i64().unwrap(),
        original["id"].as_i64().unwrap(),
    ];

    // Warm up, then the quiet phase.
    let stop = Arc::new(AtomicBool::new(false));
    let run = |stop: Arc<AtomicBool>| tokio::spawn(load(base.clone(), stop, tokens.clone()));
    let warm = run(stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    warm.await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let quiet = run(stop.clone());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let quiet = quiet.await.unwrap();

    // The swapping phase.
    let stop = Arc::new(AtomicBool::new(false));
    let busy = run(stop.clone());
    let started = Instant::now();
    let mut swaps = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        let (status, _) = call(
            &admin,
            "POST",
            format!("{base}/admin/chains/{}/activate", ids[swaps % 2]),
            ADMIN,
            Vec::new(),
        )
        .await;
        assert_eq!(status, 200);
        swaps += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let busy = busy.await.unwrap();

    let (q50, q99) = (percentile(&quiet, 0.50), percentile(&quiet, 0.99));
    let (b50, b99) = (percentile(&busy, 0.50), percentile(&busy, 0.99));
    println!("heartgate hot-swap benchmark: {CLIENTS} keep-alive clients, {seconds}s per phase");
    println!(
        "before swaps: {} heartbeats, p50={q50:.2}ms p99={q99:.2}ms",
        quiet.len()
    );
    println!(
        "during {swaps} swaps: {} heartbeats, p50={b50:.2}ms p99={b99:.2}ms",
        busy.len()
    );
    println!("p99_ratio={:.2}", b99 / q99.max(f64::MIN_POSITIVE));

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
