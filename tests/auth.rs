//! Secrets stay secret: the real `heartgate` binary, with every log target of
//! ours and hyper's at `trace`, never writes a workspace token, the admin
//! token, a presented wrong token or a platform inbound secret to its logs. (Failing closed on a token
//! lookup error is `token_lookup_failure_fails_closed_with_503` in
//! `tests/service.rs`; tokens used on the wrong API are in `tests/bad_input.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const HEARTGATE: &str = env!("CARGO_BIN_EXE_heartgate");
const ADMIN: &str = "admin-token-that-must-never-be-logged-8d1f";
const WRONG: &str = "wrong-token-that-must-never-be-logged-5c2e";

fn cli(db: &Path, args: &[&str]) -> String {
    let out = Command::new(HEARTGATE)
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn call(
    url: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{url}{path}"))
        .header("content-type", "application/json");
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_tokens_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    cli(&db, &["workspace", "add", "boot", "--model-configured"]);
    cli(&db, &["workspace", "add", "issued", "--model-configured"]);
    let issued = cli(&db, &["token", "issue", "issued"]);
    let log_path = dir.path().join("serve.log");
    let mut child = Command::new(HEARTGATE)
        .arg("--db")
        .arg(&db)
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .env("HEARTGATE_ADMIN_TOKEN", ADMIN)
        .env(
            "RUST_LOG",
            "trace,wasmtime=info,cranelift=info,cranelift_codegen=info,regalloc2=info",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("heartgate listening on ")
        .unwrap()
        .to_string();

    // A bootstrap register hands out a token; use it, the issued one, the
    // admin token, and wrong ones everywhere.
    let (status, body) = call(
        &url,
        "POST",
        "/registry/register",
        None,
        json!({"id": "boot", "url": "http://localhost/boot", "agent_card": {}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let minted = body["auth_token"].as_str().unwrap().to_string();
    let inbound = body["platform_inbound_secret"]
        .as_str()
        .unwrap()
        .to_string();
    for (token, id, expect) in [
        (minted.as_str(), "boot", 200),
        (issued.as_str(), "issued", 200),
        (WRONG, "boot", 401),
        (issued.as_str(), "boot", 401),
        (ADMIN, "boot", 401),
    ] {
        let (status, _) = call(
            &url,
            "POST",
            "/registry/heartbeat",
            Some(token),
            json!({"workspace_id": id}),
        )
        .await;
        assert_eq!(status, expect, "{id}");
    }
    let (status, _) = call(&url, "GET", "/admin/chain", Some(ADMIN), Value::Null).await;
    assert_eq!(status, 200);
    for token in [WRONG, minted.as_str()] {
        let (status, _) = call(&url, "GET", "/admin/chain", Some(token), Value::Null).await;
        assert_eq!(status, 401);
    }
    let (status, _) = call(
        &url,
        "POST",
        "/registry/register",
        Some(WRONG),
        json!({"id": "boot", "url": "http://localhost/boot", "agent_card": {}}),
    )
    .await;
    assert_eq!(status, 401);

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logs.contains("/registry/heartbeat")
            && logs.contains("/admin/chain")
            && logs.contains("DEBUG"),
        "the logs are too quiet to prove anything:\n{logs}"
    );
    for (what, secret) in [
        ("the minted token", minted.as_str()),
        ("the issued token", issued.as_str()),
        ("the admin token", ADMIN),
        ("a wrong token", WRONG),
        ("the platform inbound secret", inbound.as_str()),
    ] {
        assert!(!logs.contains(secret), "{what} is in the logs");
    }
}
