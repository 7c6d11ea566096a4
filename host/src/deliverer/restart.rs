//! Restart hooks: how a workspace is restarted after a successful delivery.
//!
//! - `command`: an argv, `{workspace_id}` substituted in each argument, run
//!   with a time limit; its exit status and output go into the run record.
//! - `http`: a POST of `{"workspace_id": ..., "run_id": ...}` to a URL, signed
//!   with HMAC-SHA256 in `X-Heartgate-Signature: sha256=<hex>`, retried with
//!   exponential backoff.
//! - `none`.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use sha2::Sha256;

use super::{HttpClient, Secret, process};

/// The header carrying the signature of an HTTP restart hook.
pub const SIGNATURE_HEADER: &str = "x-heartgate-signature";

/// How a workspace is restarted.
#[derive(Clone, Debug, Default)]
pub enum RestartHook {
    #[default]
    None,
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    Http {
        url: String,
        secret: Option<Secret>,
        attempts: u32,
        timeout: Duration,
    },
}

/// What a restart hook did, as recorded in the run.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RestartOutcome {
    pub hook: &'static str,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stdout: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stderr: String,
}

/// HMAC-SHA256 of `body` under `secret`, lowercase hex.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        // HMAC takes keys of any length; this cannot happen.
        Err(_) => return String::new(),
    };
    mac.update(body);
    crate::engine::hex(&mac.finalize().into_bytes())
}

/// Restart `workspace_id` with `hook`.
pub async fn restart(
    hook: &RestartHook,
    client: &HttpClient,
    workspace_id: &str,
    run_id: i64,
) -> RestartOutcome {
    match hook {
        RestartHook::None => RestartOutcome {
            hook: "none",
            ok: true,
            detail: "no restart hook configured".into(),
            stdout: String::new(),
            stderr: String::new(),
        },
        RestartHook::Command { argv, timeout } => {
            if !crate::model::valid_workspace_id(workspace_id) {
                return RestartOutcome {
                    hook: "command",
                    ok: false,
                    detail: format!("refusing to pass workspace id `{workspace_id}` to a command"),
                    stdout: String::new(),
                    stderr: String::new(),
                };
            }
            let argv: Vec<String> = argv
                .iter()
                .map(|a| a.replace("{workspace_id}", workspace_id))
                .collect();
            let timeout = *timeout;
            let done = tokio::task::spawn_blocking(move || {
                let (program, args) = argv.split_first()?;
                let mut cmd = Command::new(program);
                cmd.args(args);
                Some(process::run(cmd, timeout))
            })
            .await;
            let (ok, detail, stdout, stderr) = match done {
                Ok(Some(Ok(f))) => match f.status {
                    Some(status) => (
                        status.success(),
                        format!("command exited with {status}"),
                        f.stdout,
                        f.stderr,
                    ),
                    None => (
                        false,
                        format!("command killed after {}s", timeout.as_secs()),
                        f.stdout,
                        f.stderr,
                    ),
                },
                Ok(Some(Err(e))) => (
                    false,
                    format!("command could not start: {e}"),
                    String::new(),
                    String::new(),
                ),
                Ok(None) => (
                    false,
                    "the restart command is empty".into(),
                    String::new(),
                    String::new(),
                ),
                Err(e) => (
                    false,
                    format!("restart task failed: {e}"),
                    String::new(),
                    String::new(),
                ),
            };
            RestartOutcome {
                hook: "command",
                ok,
                detail,
                stdout,
                stderr,
            }
        }
        RestartHook::Http {
            url,
            secret,
            attempts,
            timeout,
        } => {
            let body =
                serde_json::json!({"workspace_id": workspace_id, "run_id": run_id}).to_string();
            let signature = match secret.as_ref().map(Secret::resolve) {
                Some(Some(key)) => Some(sign(key.as_bytes(), body.as_bytes())),
                Some(None) => {
                    return RestartOutcome {
                        hook: "http",
                        ok: false,
                        detail: "the restart hook's signing secret is not set".into(),
                        stdout: String::new(),
                        stderr: String::new(),
                    };
                }
                None => None,
            };
            let mut detail = String::new();
            let attempts = (*attempts).max(1);
            for attempt in 0..attempts {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(250 << attempt.min(6))).await;
                }
                match post(client, url, &body, signature.as_deref(), *timeout).await {
                    Ok(()) => {
                        return RestartOutcome {
                            hook: "http",
                            ok: true,
                            detail: format!("POST {url} accepted after {} attempt(s)", attempt + 1),
                            stdout: String::new(),
                            stderr: String::new(),
                        };
                    }
                    Err(e) => detail = e,
                }
            }
            RestartOutcome {
                hook: "http",
                ok: false,
                detail: format!("POST {url} failed {attempts} time(s); last: {detail}"),
                stdout: String::new(),
                stderr: String::new(),
            }
        }
    }
}

async fn post(
    client: &HttpClient,
    url: &str,
    body: &str,
    signature: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let mut req = hyper::Request::post(url).header("content-type", "application/json");
    if let Some(sig) = signature {
        req = req.header(SIGNATURE_HEADER, format!("sha256={sig}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| format!("no answer within {}s", timeout.as_secs()))?
        .map_err(|e| format!("{e}"))?;
    let status = resp.status();
    // Drain the body so the connection can be reused.
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::sign;

    #[test]
    fn signature_is_rfc4231_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
