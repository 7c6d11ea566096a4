//! The `policy` commands that change or ask the running service, through
//! its admin API.

use anyhow::{Context, Result, bail};

use super::args::PolicyCommand;
use super::output::{action_line, emit, when};

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
    let resp = client.request(req).await.map_err(|e| {
        let why = format!("{:#}", anyhow::Error::new(e));
        let hint = if why.contains("Connection refused") || why.contains("dns error") {
            "; is the service running there? Point at it with --server URL or HEARTGATE_SERVER"
        } else {
            ""
        };
        anyhow::anyhow!("cannot reach the service at {server}: {why}{hint}")
    })?;
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

pub(crate) fn policy(
    server: &str,
    operator: Option<String>,
    json: bool,
    command: PolicyCommand,
) -> Result<()> {
    // How the answer reads as text (`--json`: the answer itself).
    let render: fn(&serde_json::Value) -> String = match &command {
        PolicyCommand::List { .. } => render_active,
        PolicyCommand::Push { slot: None, .. } => render_module,
        PolicyCommand::Push { .. }
        | PolicyCommand::Stage { .. }
        | PolicyCommand::Activate { .. }
        | PolicyCommand::Rollback { .. }
        | PolicyCommand::RemoveSlot { .. } => render_chain,
        PolicyCommand::Prune { .. } => render_prune,
        PolicyCommand::History { .. } => render_history,
        PolicyCommand::Eval { .. } => render_eval,
        PolicyCommand::Shadow { .. } => render_shadow,
        _ => |v| serde_json::to_string_pretty(v).unwrap_or_default(),
    };
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
            PolicyCommand::List { .. } => call("GET", "/admin/chain".into(), Vec::new()).await?,
            PolicyCommand::Push {
                module,
                slot,
                after,
                grants,
                fixtures,
                activate,
                ..
            } => {
                let bytes = std::fs::read(&module)
                    .with_context(|| format!("reading {}", module.display()))?;
                // What the bytes say without compiling: a file that is no
                // component is refused here, before the upload.
                let checked = heartgate::engine::precheck(&bytes)
                    .with_context(|| format!("{} cannot be pushed", module.display()))?;
                let fixtures = fixtures
                    .map(|dir| heartgate::authoring::fixtures::load_dir_values(&dir))
                    .transpose()?;
                let active = match &slot {
                    Some(slot) => {
                        let active = call("GET", "/admin/chain".into(), Vec::new()).await?;
                        check_push_grants(&active, slot, &grants, after.is_some(), &checked)?;
                        Some(active)
                    }
                    None => None,
                };
                let pushed = call("POST", "/admin/modules".into(), bytes).await?;
                match (slot, active) {
                    (None, _) | (_, None) => pushed,
                    (Some(slot), Some(active)) => {
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
                        if let Some(fixtures) = fixtures {
                            spec["fixtures"] =
                                serde_json::json!([{"slot": slot, "fixtures": fixtures}]);
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
            PolicyCommand::Stage { file, .. } => {
                let body =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                call("POST", "/admin/chains".into(), body).await?
            }
            PolicyCommand::Prune { .. } => {
                call("POST", "/admin/modules/prune".into(), Vec::new()).await?
            }
            PolicyCommand::Activate { id, .. } => {
                call("POST", format!("/admin/chains/{id}/activate"), Vec::new()).await?
            }
            PolicyCommand::Rollback { .. } => {
                call("POST", "/admin/chains/rollback".into(), Vec::new()).await?
            }
            PolicyCommand::History { limit, .. } => {
                call("GET", format!("/admin/chains?limit={limit}"), Vec::new()).await?
            }
            PolicyCommand::RemoveSlot { slot, activate, .. } => {
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
                // An input, or a whole fixture file (its `input`), as a
                // local evaluation reads it.
                let text = std::fs::read_to_string(&input)
                    .with_context(|| format!("reading {}", input.display()))?;
                let yaml = input.extension().is_some_and(|e| e == "yaml" || e == "yml");
                let (input_value, _) = heartgate::authoring::trace::read_input(&text, yaml)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
                let body = serde_json::json!({"input": input_value, "chain": chain});
                call("POST", "/admin/eval".into(), serde_json::to_vec(&body)?).await?
            }
            PolicyCommand::Shadow { id, stop, .. } => match (id, stop) {
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
        emit(json, &out, render)
    })
}

/// A chain spec as the API gives it: an object (older services: a string).
fn spec_of(v: &serde_json::Value) -> serde_json::Value {
    match &v["spec"] {
        serde_json::Value::String(s) => serde_json::from_str(s).unwrap_or_default(),
        other => other.clone(),
    }
}

/// `policy list` as text: the chain and a table of its slots.
fn render_active(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let version = v["version"].as_str().unwrap_or("-");
    match v["stored"].as_object() {
        Some(stored) => {
            let _ = writeln!(
                t,
                "active chain {} (version {version}), activated {} by {}",
                stored
                    .get("id")
                    .map_or_else(|| "-".into(), |i| i.to_string()),
                when(
                    stored
                        .get("activated_ms")
                        .unwrap_or(&serde_json::Value::Null)
                ),
                stored
                    .get("activated_by")
                    .and_then(|b| b.as_str())
                    .unwrap_or("-"),
            );
        }
        None => {
            let _ = writeln!(
                t,
                "the chain the service started with (version {version}); nothing activated yet"
            );
        }
    }
    let spec = spec_of(v);
    let limits = |slot: &str| {
        spec["slot"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == slot)
            .map(|s| {
                let ms = s["timeout_ms"]
                    .as_u64()
                    .map_or("100 ms".into(), |n| format!("{n} ms"));
                let mib = s["max_memory_mib"]
                    .as_u64()
                    .map_or("16 MiB".into(), |n| format!("{n} MiB"));
                format!("{ms}, {mib}")
            })
            .unwrap_or_default()
    };
    let rows: Vec<[String; 5]> = v["slots"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let slot = s["slot"].as_str().unwrap_or("-").to_string();
            let grants: Vec<&str> = s["grants"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g.as_str())
                .collect();
            [
                slot.clone(),
                format!(
                    "{} {}",
                    s["policy"].as_str().unwrap_or("-"),
                    s["policy_version"].as_str().unwrap_or("-")
                ),
                format!(
                    "sha256:{}",
                    s["digest"]
                        .as_str()
                        .unwrap_or("-")
                        .chars()
                        .take(12)
                        .collect::<String>()
                ),
                limits(&slot),
                if grants.is_empty() {
                    "none".into()
                } else {
                    grants.join(", ")
                },
            ]
        })
        .collect();
    t.push_str(&super::operator::table(
        &["SLOT", "POLICY", "DIGEST", "LIMITS", "GRANTS"],
        &rows,
    ));
    t
}

/// A pushed module as text.
fn render_module(v: &serde_json::Value) -> String {
    format!(
        "pushed {} {} (contract {}, {} bytes) as {}\nrun it in a slot: `heartgate policy push FILE --slot NAME`, or name it in a stage file",
        v["name"].as_str().unwrap_or("-"),
        v["version"].as_str().unwrap_or("-"),
        v["contract"].as_str().unwrap_or("-"),
        v["size"],
        v["module"].as_str().unwrap_or("-"),
    )
}

/// A stored chain (staged, activated, rolled back to) as text.
fn render_chain(v: &serde_json::Value) -> String {
    let id = v["id"].to_string();
    let slots: Vec<String> = spec_of(v)["slot"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{}={}",
                s["name"].as_str().unwrap_or("-"),
                s["module"]
                    .as_str()
                    .unwrap_or("-")
                    .chars()
                    .take(19)
                    .collect::<String>()
            )
        })
        .collect();
    let state = v["state"].as_str().unwrap_or("-");
    let head = match state {
        "active" => format!(
            "chain {id} (version {}) is active, activated {} by {}",
            v["version"].as_str().unwrap_or("-"),
            when(&v["activated_ms"]),
            v["activated_by"].as_str().unwrap_or("-")
        ),
        "staged" => format!(
            "chain {id} (version {}) is staged, not active: `heartgate policy shadow {id}` runs it beside the active chain, `heartgate policy activate {id}` swaps it in",
            v["version"].as_str().unwrap_or("-")
        ),
        other => format!(
            "chain {id} (version {}) is {other}",
            v["version"].as_str().unwrap_or("-")
        ),
    };
    format!("{head}\nslots: {}", slots.join(" -> "))
}

/// `policy prune` as text.
fn render_prune(v: &serde_json::Value) -> String {
    let removed: Vec<String> = v["removed"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "  sha256:{} {} {}",
                m["digest"].as_str().unwrap_or("-"),
                m["name"].as_str().unwrap_or("-"),
                m["version"].as_str().unwrap_or("-")
            )
        })
        .collect();
    let mut t = format!(
        "deleted {} module(s) no stored chain uses; kept {}",
        removed.len(),
        v["kept"]
    );
    for line in removed {
        t.push('\n');
        t.push_str(&line);
    }
    t
}

/// An evaluation without effects as text: each slot, then the verdict.
fn render_eval(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(t, "chain {}", v["chain_version"].as_str().unwrap_or("-"));
    for step in v["steps"].as_array().into_iter().flatten() {
        let head = format!(
            "  {} ({} {}, {} us)",
            step["slot"].as_str().unwrap_or("-"),
            step["policy"].as_str().unwrap_or("-"),
            step["policy_version"].as_str().unwrap_or("-"),
            step["elapsed_us"]
        );
        match (&step["output"], &step["failure"]) {
            (_, f) if f.is_object() => {
                let _ = writeln!(
                    t,
                    "{head}: failed: {}: {}",
                    f["kind"].as_str().unwrap_or("-"),
                    f["message"].as_str().unwrap_or("")
                );
            }
            (out, _) => {
                let n = out.as_array().map_or(0, Vec::len);
                let _ = writeln!(t, "{head}: {n} action(s)");
            }
        }
    }
    render_verdict(&mut t, v);
    t
}

/// The verdict part of an evaluation (`actions`, or a failure).
pub(crate) fn render_verdict(t: &mut String, v: &serde_json::Value) {
    use std::fmt::Write;
    let failure = if v["failure"].is_object() {
        &v["failure"]
    } else {
        &v["error"]
    };
    if failure.is_object() {
        let _ = writeln!(
            t,
            "failed closed: slot `{}`: {}: {}",
            failure["slot"].as_str().unwrap_or("-"),
            failure["kind"].as_str().unwrap_or("-"),
            failure["message"].as_str().unwrap_or("")
        );
        return;
    }
    let actions = v["actions"].as_array().cloned().unwrap_or_default();
    if actions.is_empty() {
        let _ = writeln!(t, "actions: none");
    } else {
        let _ = writeln!(t, "actions:");
        for a in &actions {
            let _ = writeln!(t, "  {}", action_line(a));
        }
    }
}

/// What the shadow chain saw, as text.
fn render_shadow(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let Some(chain) = v["chain"].as_i64() else {
        return "no chain runs in shadow; `heartgate policy shadow ID` starts one".into();
    };
    let _ = writeln!(
        t,
        "shadow chain {chain} (version {}): {} evaluated beside the active chain, {} decided differently",
        v["version"].as_str().unwrap_or("-"),
        v["evaluated"],
        v["differed"]
    );
    for d in v["recent"].as_array().into_iter().flatten() {
        let _ = writeln!(
            t,
            "  {} {} {}: active {} | shadow {}",
            when(&d["at_ms"]),
            d["workspace_id"].as_str().unwrap_or("-"),
            d["event_kind"].as_str().unwrap_or("-"),
            d["active"],
            d["shadow"]
        );
    }
    t
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

/// Refuse, before the upload, a push into slot `slot` whose grants (the
/// `--grant` flags; else those of the slot it replaces; a new slot: none)
/// do not cover what the module declares it needs. The service checks it
/// again when it stages the chain.
fn check_push_grants(
    active: &serde_json::Value,
    slot: &str,
    flags: &[String],
    new_slot: bool,
    checked: &heartgate::engine::Precheck,
) -> Result<()> {
    let Some(declared) = &checked.declared_grants else {
        return Ok(());
    };
    let granted: Vec<String> = if !flags.is_empty() || new_slot {
        flags.to_vec()
    } else {
        active["spec"]["slot"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == slot)
            .and_then(|s| s["grants"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str().map(str::to_string))
            .collect()
    };
    let have: Vec<heartgate::chain::Grant> = granted
        .iter()
        .filter_map(|g| heartgate::chain::Grant::parse(g))
        .collect();
    let missing = heartgate::chain::missing_grants(declared, &have);
    if missing.is_empty() {
        return Ok(());
    }
    let flags: Vec<String> = missing.iter().map(|g| format!("--grant {g}")).collect();
    bail!(
        "the module declares that it needs the grants {}, which slot `{slot}` would not have{}; add {} (the slot gets exactly the grants given) or it fails closed with ungranted_action",
        missing.join(", "),
        if granted.is_empty() {
            String::new()
        } else {
            format!(" (it would have {})", granted.join(", "))
        },
        flags.join(" ")
    )
}
