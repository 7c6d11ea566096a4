//! Test harness: the real service on `127.0.0.1:0` with a temp SQLite file, a
//! manual clock, and a small HTTP client.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

pub mod binary;
pub mod gitea;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::oneshot;

use heartgate::clock::ManualClock;
use heartgate::model::WorkspaceKind;
use heartgate::store::{NewWorkspace, Store};
use heartgate::{ServiceOptions, auth, open_store};

/// 2026-06-24T12:00:00Z, the day the PR merged.
pub const T0_MS: i64 = 1_782_302_400_000;
pub const MINUTE_MS: i64 = 60_000;
/// The admin token of [`Service::start_admin`].
pub const ADMIN: &str = "admin-s3cret";

pub struct Service {
    pub addr: SocketAddr,
    pub db: PathBuf,
    pub clock: ManualClock,
    pub store: Arc<dyn Store>,
    client: Client<HttpConnector, Full<Bytes>>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    /// Start the service on the database `db` with `clock` and the built-in chain.
    pub async fn start(db: &Path, clock: ManualClock) -> Service {
        Service::start_with_chain(db, clock, None).await
    }

    /// Start the service with a chain of its own.
    pub async fn start_with_chain(
        db: &Path,
        clock: ManualClock,
        chain: Option<heartgate::chain::ChainSpec>,
    ) -> Service {
        Service::start_with(db, clock, "127.0.0.1:0", |opts| {
            opts.chain = chain.map(|spec| (spec, PathBuf::from("/")));
        })
        .await
    }

    /// Start the service with the admin API behind [`ADMIN`].
    pub async fn start_admin(db: &Path, clock: ManualClock) -> Service {
        Service::start_with(db, clock, "127.0.0.1:0", |o| {
            o.admin_token = Some(heartgate::deliverer::Secret::Value(ADMIN.into()));
        })
        .await
    }

    /// [`Service::start_admin`] on a fresh PostgreSQL database instead of
    /// the SQLite file `db` (whose directory still holds the scratch).
    #[allow(dead_code, reason = "not every test binary runs on PostgreSQL")]
    pub async fn start_admin_on_postgres(db: &Path, clock: ManualClock) -> Service {
        let database = postgres_database();
        Service::start_with(db, clock, "127.0.0.1:0", move |o| {
            o.admin_token = Some(heartgate::deliverer::Secret::Value(ADMIN.into()));
            o.db = database;
        })
        .await
    }

    /// A call of the admin API with [`ADMIN`].
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Value) {
        self.post_raw(method, path, Some(ADMIN), body).await
    }

    /// Start the service on `addr` with options adjusted by `customize`.
    pub async fn start_with(
        db: &Path,
        clock: ManualClock,
        addr: &str,
        customize: impl FnOnce(&mut ServiceOptions),
    ) -> Service {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut opts = ServiceOptions::new(db);
        opts.clock = Arc::new(clock.clone());
        opts.worker.poll = Duration::from_millis(50);
        let scratch = db.parent().unwrap();
        opts.deliverer.configs_root = scratch.join("configs");
        opts.deliverer.plugins_dir = scratch.join("plugins");
        // Tests move the manual clock by minutes or days; silence is noticed
        // only where a test asks for it (`tests/liveness.rs`).
        opts.liveness.heartbeat_ttl = Duration::from_secs(365 * 86_400);
        opts.liveness.provision_timeout = Duration::from_secs(365 * 86_400);
        opts.liveness.runtime_provision_timeout.clear();
        // Tests register agent names that do not resolve here (`http://a`,
        // `https://example.com/...`); the strict mode has tests of its own.
        opts.agent_urls = heartgate::agent_url::AgentUrlPolicy::new(
            heartgate::agent_url::AgentUrlMode::Dev,
            None,
        );
        customize(&mut opts);
        // The store the test reads: the service's own database (a customized
        // one may be PostgreSQL).
        let database = opts.db.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(heartgate::run(listener, opts, async move {
            let _ = rx.await;
        }));
        let store = open_store(database).unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        let svc = Service {
            addr,
            db: db.to_path_buf(),
            clock,
            store,
            client,
            shutdown: Some(tx),
            handle: Some(handle),
        };
        svc.wait_ready().await;
        svc
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((StatusCode::OK, _)) = self.get("/healthz").await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "service did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The service's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Wait until `check` holds, polling; panics after `secs` seconds.
    pub async fn wait_for(&self, what: &str, secs: u64, mut check: impl FnMut(&Service) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while !check(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Wait until the reconcile worker has nothing queued or running, then
    /// dump the database (so its own writes do not race a comparison).
    pub async fn quiet_dump(&self) -> Vec<String> {
        self.wait_reconciles_done().await;
        dump(&self.db)
    }

    /// Wait until no reconcile run is queued or running.
    pub async fn wait_reconciles_done(&self) {
        self.wait_for("the reconcile worker to go idle", 30, |s| {
            s.store
                .reconcile_runs(None)
                .unwrap()
                .iter()
                .all(|r| r.state == "succeeded" || r.state == "failed")
        })
        .await;
    }

    /// Stop the service and wait for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }

    pub async fn get(
        &self,
        path: &str,
    ) -> Result<(StatusCode, Value), hyper_util::client::legacy::Error> {
        self.get_as(path, None).await
    }

    pub async fn get_as(
        &self,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<(StatusCode, Value), hyper_util::client::legacy::Error> {
        let mut req = Request::get(format!("http://{}{path}", self.addr));
        if let Some(token) = bearer {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let resp = self.client.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// GET `path` as text (e.g. `/metrics`).
    pub async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let req = Request::get(format!("http://{}{path}", self.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// POST raw bytes to `path`.
    pub async fn post_raw(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json");
        if let Some(token) = bearer {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
        (status, json)
    }

    pub async fn post(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &Value,
    ) -> (StatusCode, Value) {
        self.post_raw("POST", path, bearer, body.to_string()).await
    }

    /// A heartbeat's status and its `heartgate-durability` header
    /// (`committed`, or `queued` for a liveness-only verdict).
    pub async fn heartbeat_durability(&self, token: &str, body: Value) -> (StatusCode, String) {
        let req = Request::post(format!("http://{}/registry/heartbeat", self.addr))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let durability = resp
            .headers()
            .get("heartgate-durability")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (resp.status(), durability)
    }

    pub async fn heartbeat(&self, token: &str, body: Value) -> (StatusCode, Value) {
        self.post("/registry/heartbeat", Some(token), &body).await
    }

    pub async fn register(&self, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.post("/registry/register", token, &body).await
    }

    /// Provision a workspace and issue it a token.
    pub fn provision(&self, id: &str, kind: WorkspaceKind, model: bool) -> String {
        self.store
            .add_workspace(
                &NewWorkspace {
                    id: id.into(),
                    name: id.into(),
                    kind,
                    model_configured: model,
                    runtime: String::new(),
                },
                self.clock_now(),
            )
            .unwrap();
        self.issue_token(id)
    }

    pub fn issue_token(&self, id: &str) -> String {
        let token = auth::mint().unwrap();
        self.store
            .issue_token(id, &token.stored, self.clock_now())
            .unwrap();
        token.plaintext
    }

    fn clock_now(&self) -> i64 {
        use heartgate::clock::Clock;
        self.clock.now_ms()
    }

    /// A workspace's stored fields as JSON.
    pub fn workspace(&self, id: &str) -> Value {
        serde_json::to_value(self.store.workspace(id).unwrap().unwrap()).unwrap()
    }

    pub fn status(&self, id: &str) -> String {
        self.workspace(id)["status"].as_str().unwrap().to_string()
    }

    /// Reconcile runs of `id` with `trigger`.
    pub fn runs(&self, id: &str, trigger: &str) -> usize {
        self.store
            .reconcile_runs(Some(id))
            .unwrap()
            .iter()
            .filter(|r| r.trigger == trigger)
            .count()
    }

    pub fn events(&self, id: &str, event_type: &str) -> Vec<Value> {
        self.store
            .events(id)
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == event_type)
            .map(|e| e.payload)
            .collect()
    }

    /// Put a workspace in `degraded` for the status rules' `error-rate`
    /// condition directly (as an older verdict would have left it): a
    /// healthy heartbeat then makes the status rules propose clearing it.
    pub fn force_degraded_by_error_rate(&self, id: &str) {
        self.force_status(id, "degraded");
        let conn = rusqlite::Connection::open(&self.db).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute(
            "INSERT INTO conditions (workspace_id, slot, owner, name, severity, reason, message,
                 since_ms, updated_ms)
             VALUES (?1, 'status-rules', 'status-rules', 'error-rate', 'degraded',
                 'error_rate_high', '', 0, 0)",
            [id],
        )
        .unwrap();
    }

    /// Put a workspace in `status` directly (as another part of the control
    /// plane would).
    pub fn force_status(&self, id: &str, status: &str) {
        let conn = rusqlite::Connection::open(&self.db).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute(
            "UPDATE workspaces SET status = ?2 WHERE id = ?1",
            rusqlite::params![id, status],
        )
        .unwrap();
    }
}

/// A fresh database on the throwaway PostgreSQL cluster the tests share.
#[allow(dead_code, reason = "not every test binary runs on PostgreSQL")]
pub fn postgres_database() -> heartgate::Database {
    heartgate::Database::Postgres(
        heartgate_test_pg::PgCluster::shared()
            .fresh_database()
            .unwrap(),
    )
}

/// Every row of every table, as text: compare before and after to prove that
/// a request wrote nothing. `sweeps` is left out: the silence sweep records
/// there that it ran, every sweep interval, whatever the requests.
pub fn dump(db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'sweeps'
             ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = Vec::new();
    for t in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{t}\"")).unwrap();
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                let mut cells = vec![t.clone()];
                for i in 0..n {
                    let v: rusqlite::types::Value = r.get(i)?;
                    cells.push(format!("{v:?}"));
                }
                Ok(cells.join("|"))
            })
            .unwrap();
        for row in rows {
            out.push(row.unwrap());
        }
    }
    out.sort();
    out
}

/// A chain slot for `module` (`builtin:<name>` or an absolute path).
pub fn slot(name: &str, module: &str) -> heartgate::chain::SlotSpec {
    heartgate::chain::SlotSpec {
        name: name.into(),
        module: module.into(),
        timeout_ms: None,
        max_memory_mib: None,
        grants: None,
        on_failure: None,
    }
}

/// The hostile test guest's component file.
pub fn hostile_guest() -> String {
    format!("{}/hostile.wasm", env!("HEARTGATE_TEST_GUESTS_DIR"))
}

/// Assert two dumps are equal, printing only the rows that differ.
pub fn assert_unchanged(before: &[String], after: &[String]) {
    let added: Vec<_> = after.iter().filter(|r| !before.contains(r)).collect();
    let removed: Vec<_> = before.iter().filter(|r| !after.contains(r)).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "the database changed:\n  added {added:#?}\n  removed {removed:#?}"
    );
}
