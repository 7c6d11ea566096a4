//! The `policy` commands that change or ask the running service, through
//! its admin API.

use anyhow::{Context, Result, bail};

use super::args::PolicyCommand;
use super::output::{out, say};

/// One admin API call; prints nothing, returns the JSON answer or the error.
pub(crate) async fn admin_call(
    client: &heartgate::deliverer::HttpClient,
    server: &str,
    operator: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<serde_json::Value> {
    use http_body_util::BodyExt;
    let token = std::env::var("HEARTGATE_ADMIN_TOKEN")
        .context("set HEARTGATE_ADMIN_TOKEN to the service's admin token")?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", server.trim_end_matches('/')))
        .header("authorization", format!("Bearer {token}"))
        .header("x-heartgate-operator", operator)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let resp = client
        .request(req)
        .await
        .with_context(|| format!("calling {server}"))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        bail!(
            "{method} {path}: HTTP {status}: {}",
            value["error"].as_str().unwrap_or("no details")
        );
    }
    Ok(value)
}

/// Who is acting: `--as`/`HEARTGATE_OPERATOR`, else the login name, else
/// the user id. Never a made-up name: the record says who did it.
fn operator_name(given: Option<String>) -> String {
    given
        .filter(|n| !n.trim().is_empty())
        .or_else(|| std::env::var("USER").ok().filter(|n| !n.is_empty()))
        .or_else(|| std::env::var("LOGNAME").ok().filter(|n| !n.is_empty()))
        .unwrap_or_else(|| format!("uid {}", rustix::process::getuid().as_raw()))
}

pub(crate) fn policy(server: &str, operator: Option<String>, command: PolicyCommand) -> Result<()> {
    let operator = operator_name(operator);
    if operator.chars().any(char::is_control) || operator.len() > 64 {
        bail!("--as: a name of at most 64 characters, without control characters");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = heartgate::deliverer::http_client();
        let call = |method: &'static str, path: String, body: Vec<u8>| {
            let client = client.clone();
            let operator = operator.clone();
            async move { admin_call(&client, server, &operator, method, &path, body).await }
        };
        let out = match command {
            PolicyCommand::List => call("GET", "/admin/chain".into(), Vec::new()).await?,
            PolicyCommand::Push {
                module,
                slot,
                after,
                grants,
                activate,
            } => {
                let bytes = std::fs::read(&module)
                    .with_context(|| format!("reading {}", module.display()))?;
                let pushed = call("POST", "/admin/modules".into(), bytes).await?;
                match slot {
                    None => pushed,
                    Some(slot) => {
                        let active = call("GET", "/admin/chain".into(), Vec::new()).await?;
                        let mut spec = active["spec"].clone();
                        let slots = spec["slot"]
                            .as_array_mut()
                            .context("the service returned no chain spec")?;
                        let exists = slots.iter().any(|s| s["name"] == slot.as_str());
                        match &after {
                            Some(_) if exists => {
                                bail!("the active chain already has a slot `{slot}`; drop --after to replace it")
                            }
                            Some(prev) => {
                                let at = slots
                                    .iter()
                                    .position(|s| s["name"] == prev.as_str())
                                    .with_context(|| {
                                        format!("the active chain has no slot `{prev}`")
                                    })?;
                                slots.insert(
                                    at + 1,
                                    serde_json::json!({"name": slot, "module": pushed["module"]}),
                                );
                            }
                            None if !exists => bail!(
                                "the active chain has no slot `{slot}`; add it with --after SLOT"
                            ),
                            None => {}
                        }
                        let target = slots
                            .iter_mut()
                            .find(|s| s["name"] == slot.as_str())
                            .with_context(|| format!("the active chain has no slot `{slot}`"))?;
                        target["module"] = pushed["module"].clone();
                        if !grants.is_empty() || after.is_some() {
                            target["grants"] = serde_json::json!(grants);
                        }
                        let staged =
                            call("POST", "/admin/chains".into(), serde_json::to_vec(&spec)?)
                                .await?;
                        if activate {
                            let id = staged["id"].as_i64().context("no chain id")?;
                            call("POST", format!("/admin/chains/{id}/activate"), Vec::new()).await?
                        } else {
                            staged
                        }
                    }
                }
            }
            PolicyCommand::Stage { file } => {
                let body =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                call("POST", "/admin/chains".into(), body).await?
            }
            PolicyCommand::Prune => {
                call("POST", "/admin/modules/prune".into(), Vec::new()).await?
            }
            PolicyCommand::Activate { id } => {
                call("POST", format!("/admin/chains/{id}/activate"), Vec::new()).await?
            }
            PolicyCommand::Rollback => {
                call("POST", "/admin/chains/rollback".into(), Vec::new()).await?
            }
            PolicyCommand::History { limit, json } => {
                let history = call("GET", format!("/admin/chains?limit={limit}"), Vec::new()).await?;
                if json {
                    history
                } else {
                    return out(&render_history(&history));
                }
            }
            PolicyCommand::RemoveSlot { slot, activate } => {
                let active = call("GET", "/admin/chain".into(), Vec::new()).await?;
                let mut spec = active["spec"].clone();
                let slots = spec["slot"]
                    .as_array_mut()
                    .context("the service returned no chain spec")?;
                let before = slots.len();
                slots.retain(|s| s["name"] != slot.as_str());
                if slots.len() == before {
                    let names: Vec<&str> = slots.iter().filter_map(|s| s["name"].as_str()).collect();
                    bail!(
                        "the active chain has no slot `{slot}`; its slots: {}",
                        names.join(", ")
                    );
                }
                let staged =
                    call("POST", "/admin/chains".into(), serde_json::to_vec(&spec)?).await?;
                if activate {
                    let id = staged["id"].as_i64().context("no chain id")?;
                    call("POST", format!("/admin/chains/{id}/activate"), Vec::new()).await?
                } else {
                    staged
                }
            }
            PolicyCommand::Eval { input, chain, .. } => {
                let chain: Option<i64> = chain
                    .map(|c| c.parse())
                    .transpose()
                    .context("--chain of a running service is a stored chain id")?;
                let input: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(&input)
                        .with_context(|| format!("reading {}", input.display()))?,
                )
                .context("the input file is not JSON")?;
                let body = serde_json::json!({"input": input, "chain": chain});
                call("POST", "/admin/eval".into(), serde_json::to_vec(&body)?).await?
            }
            PolicyCommand::Shadow { id, stop } => match (id, stop) {
                (Some(id), _) => {
                    let body = serde_json::json!({"chain": id});
                    call("POST", "/admin/shadow".into(), serde_json::to_vec(&body)?).await?
                }
                (None, true) => call("DELETE", "/admin/shadow".into(), Vec::new()).await?,
                (None, false) => call("GET", "/admin/shadow".into(), Vec::new()).await?,
            },
            PolicyCommand::New { .. }
            | PolicyCommand::Build { .. }
            | PolicyCommand::Test { .. }
            | PolicyCommand::Replay { .. } => {
                bail!("internal: a local command reached the admin API")
            }
        };
        say!("{}", serde_json::to_string_pretty(&out)?)?;
        Ok(())
    })
}

/// `policy history` as text: the activations, then the chains.
fn render_history(history: &serde_json::Value) -> String {
    use std::fmt::Write;
    let at = |v: &serde_json::Value| {
        v.as_i64()
            .map(heartgate::clock::rfc3339)
            .unwrap_or_else(|| "-".into())
    };
    let id = |v: &serde_json::Value| v.as_i64().map_or_else(|| "-".into(), |n| n.to_string());
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let mut out = String::new();
    let activations = history["activations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(out, "activations, newest first:");
    if activations.is_empty() {
        let _ = writeln!(out, "  none (the service runs the chain it started with)");
    } else {
        let _ = writeln!(
            out,
            "  {:>6}  {:<8}  {:>5}  {:>5}  {:<24}  BY",
            "#", "KIND", "CHAIN", "FROM", "AT"
        );
    }
    for a in &activations {
        let _ = writeln!(
            out,
            "  {:>6}  {:<8}  {:>5}  {:>5}  {:<24}  {}",
            id(&a["id"]),
            text(&a["kind"]),
            id(&a["chain_id"]),
            id(&a["from_chain"]),
            at(&a["at_ms"]),
            text(&a["by"]),
        );
    }
    let chains = history["chains"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nchains, newest first:");
    let _ = writeln!(
        out,
        "  {:>5}  {:<7}  {:<16}  {:<24}  CREATED BY",
        "CHAIN", "STATE", "VERSION", "CREATED"
    );
    for c in &chains {
        let version = text(&c["version"]);
        let _ = writeln!(
            out,
            "  {:>5}  {:<7}  {:<16}  {:<24}  {}",
            id(&c["id"]),
            text(&c["state"]),
            version.chars().take(16).collect::<String>(),
            at(&c["created_ms"]),
            text(&c["created_by"]),
        );
    }
    out
}
