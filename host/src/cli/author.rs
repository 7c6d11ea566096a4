//! The author's `policy` commands, run here: `new`, `build`, `test`, a local
//! `eval`, `replay`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use heartgate::clock::{Clock, SystemClock};
use heartgate::open_existing_store;

use super::args::PolicyCommand;
use super::output::{action_line, emit, out, print_document, say};

/// A `policy` subcommand run here, or one for the running service.
pub(crate) enum Local {
    /// Run here; the process's exit code.
    Done(i32),
    Remote(PolicyCommand),
}

/// The engine of a command run here, keeping compiled modules in the
/// default cache directory (so a second `policy test` compiles nothing).
pub(crate) fn engine() -> Result<heartgate::engine::Engine> {
    heartgate::engine::Engine::with_module_cache(
        heartgate::engine::default_module_cache_dir().as_deref(),
    )
}

/// Run the author's commands (new, build, test, local eval, replay) here;
/// hand the others back for the admin API.
pub(crate) fn local_policy(
    db: &Path,
    server_given: bool,
    json: bool,
    command: PolicyCommand,
) -> Result<Local> {
    use heartgate::authoring::{self, compile, fixtures, replay, template, trace};

    match command {
        PolicyCommand::New {
            name,
            dir,
            sdk,
            sdk_version,
            grants,
        } => {
            let told = sdk.is_some() || sdk_version.is_some();
            let grants = grants
                .iter()
                .map(|g| {
                    heartgate::chain::Grant::parse(g)
                        .with_context(|| format!("--grant: no grant `{g}`"))
                })
                .collect::<Result<Vec<_>>>()?;
            let sdk = match (sdk, sdk_version) {
                (Some(path), _) => template::Sdk::Path(path),
                (None, Some(version)) => template::Sdk::Version(version),
                (None, None) => template::Sdk::default_at(Path::new(template::DEFAULT_SDK)),
            };
            let created = template::create(
                &dir,
                &name,
                &sdk,
                (!grants.is_empty()).then_some(grants.as_slice()),
            )?;
            let crate_dir = dir.join(&name);
            let shown = serde_json::json!({
                "policy": name,
                "dir": crate_dir,
                "files": created.files,
                "sdk": created.dependency,
                "grants": created.grants.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
            });
            emit(json, &shown, |_| {
                let mut t = format!("created policy `{name}` in {}\n", crate_dir.display());
                for f in &created.files {
                    t.push_str(&format!("  {}\n", f.display()));
                }
                t.push_str(&format!("its SDK: {}\n", created.dependency));
                let grants: Vec<&str> = created.grants.iter().map(|g| g.as_str()).collect();
                t.push_str(&format!(
                    "it declares the grants: {} (Cargo.toml, [package.metadata.heartgate])\n",
                    if grants.is_empty() {
                        "none".to_string()
                    } else {
                        grants.join(", ")
                    }
                ));
                if let template::Sdk::Version(_) = sdk {
                    if !told {
                        t.push_str(&format!(
                            "  (the SDK checkout this binary was built from is not at {} any more)\n",
                            template::DEFAULT_SDK
                        ));
                    }
                    t.push_str(
                        "  (from the registry: cargo fetches it on the first build; pass --sdk PATH to use a checkout's policies/sdk)\n",
                    );
                }
                t.push_str(&format!(
                    "next: cd {} && cargo test && heartgate policy build && heartgate policy test {name}.wasm",
                    crate_dir.display()
                ));
                t
            })?;
            Ok(Local::Done(0))
        }
        PolicyCommand::Build { dir, out } => {
            let engine = engine()?;
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let built = compile::build(&engine, &dir, out.as_deref())?;
            if json {
                print_document(&serde_json::json!({
                    "path": built.path,
                    "name": built.metadata.name,
                    "version": built.metadata.version,
                    "digest": built.digest,
                    "bytes": built.bytes,
                    "declared_grants": built.declared_grants,
                }))?;
                return Ok(Local::Done(0));
            }
            say!(
                "built {} {} -> {} ({} bytes, sha256:{})",
                built.metadata.name,
                built.metadata.version,
                built.path.display(),
                built.bytes,
                built.digest
            )?;
            match &built.declared_grants {
                Some(grants) => say!(
                    "declares the grants it needs: {}",
                    if grants.is_empty() {
                        "none".to_string()
                    } else {
                        grants
                            .iter()
                            .map(|g| g.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )?,
                None => say!(
                    "declares no grants: add [package.metadata.heartgate] grants = [...] to Cargo.toml so that a slot without them is refused when staged"
                )?,
            }
            Ok(Local::Done(0))
        }
        PolicyCommand::Test {
            module,
            fixtures: dir,
            chain,
            slot,
        } => {
            let engine = engine()?;
            let (chain, whole) = authoring::local_chain(
                &engine,
                chain.as_deref(),
                module.as_deref(),
                slot.as_deref(),
            )?;
            let cases = fixtures::load_dir(&dir)?;
            if json {
                let report = fixtures::run(&chain, &cases, whole);
                print_document(&test_report(&chain, &dir, &report))?;
                return Ok(Local::Done(i32::from(report.failed() > 0)));
            }
            let what: Vec<String> = chain
                .slots
                .iter()
                .map(|s| {
                    let m = s.module.metadata();
                    format!("{} {}", m.name, m.version)
                })
                .collect();
            say!(
                "\nrunning {} fixture{} from {} against {}\n",
                cases.len(),
                if cases.len() == 1 { "" } else { "s" },
                dir.display(),
                what.join(" -> ")
            )?;
            if let Some(cache) = engine.module_cache().filter(|c| c.hits > 0) {
                say!(
                    "({} compiled module{} from the module cache in {})\n",
                    cache.hits,
                    if cache.hits == 1 { "" } else { "s" },
                    cache.dir.display()
                )?;
            }
            let report = fixtures::run(&chain, &cases, whole);
            out(&report.render())?;
            Ok(Local::Done(i32::from(report.failed() > 0)))
        }
        PolicyCommand::Eval {
            module,
            input,
            chain,
            slot,
            trace: with_trace,
            remote,
        } => {
            let chain_file = chain
                .as_deref()
                .filter(|c| c.parse::<i64>().is_err())
                .map(PathBuf::from);
            if module.is_none() && chain_file.is_none() {
                if with_trace {
                    bail!("--trace needs a local evaluation: give a MODULE or a chain file");
                }
                if !server_given {
                    bail!(
                        "give a MODULE (or a chain file with --chain) to evaluate here, or --server URL (or HEARTGATE_SERVER) to have the running service evaluate it with its active chain (or --chain ID)"
                    );
                }
                return Ok(Local::Remote(PolicyCommand::Eval {
                    module,
                    input,
                    chain,
                    slot,
                    trace: with_trace,
                    remote,
                }));
            }
            let engine = engine()?;
            let (chain, whole) = authoring::local_chain(
                &engine,
                chain_file.as_deref(),
                module.as_deref(),
                slot.as_deref(),
            )?;
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let yaml = input.extension().is_some_and(|e| e == "yaml" || e == "yml");
            let (input_value, proposed) = trace::read_input(&text, yaml)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let shown = trace::eval(&chain, &input_value, proposed, whole, with_trace);
            emit(json, &shown, trace_text)?;
            Ok(Local::Done(0))
        }
        PolicyCommand::Replay {
            candidate,
            slot,
            since,
            chain,
            fail_on_change,
        } => {
            let since_ms = since
                .map(|d| {
                    let span = heartgate::clock::parse_duration_ms(&d)
                        .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
                    anyhow::Ok(SystemClock.now_ms().saturating_sub(span))
                })
                .transpose()?;
            let engine = engine()?;
            let candidate = authoring::load_module(&engine, &candidate)?;
            let chain = chain.map(|f| authoring::read_chain_file(&f)).transpose()?;
            let store = open_existing_store(db)
                .context("replay reads the service's database: pass it with --db")?;
            let report = replay::replay(
                &engine,
                store.as_ref(),
                &replay::ReplayOptions {
                    candidate: &candidate,
                    slot: &slot,
                    since_ms,
                    chain,
                },
            )?;
            emit(json, &report, replay::render)?;
            Ok(Local::Done(i32::from(
                fail_on_change && !report.changed.is_empty(),
            )))
        }
        other => Ok(Local::Remote(other)),
    }
}

/// `policy test --json`: the report a CI keeps.
fn test_report(
    chain: &heartgate::chain::Chain,
    dir: &Path,
    report: &heartgate::authoring::fixtures::Report,
) -> serde_json::Value {
    let modules: Vec<serde_json::Value> = chain
        .slots
        .iter()
        .map(|s| {
            let m = s.module.metadata();
            serde_json::json!({
                "slot": s.name,
                "policy": m.name,
                "version": m.version,
                "digest": s.module.digest(),
            })
        })
        .collect();
    let cases: Vec<serde_json::Value> = report
        .results
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "path": r.path,
                "passed": r.failure.is_none(),
                "failure": r.failure,
            })
        })
        .collect();
    serde_json::json!({
        "fixtures": dir,
        "modules": modules,
        "passed": report.passed(),
        "failed": report.failed(),
        "elapsed_ms": report.elapsed.as_millis() as u64,
        "cases": cases,
    })
}

/// `policy eval` as text: with `--trace`, each slot's markers, what was
/// proposed to it and what it returned; then the verdict.
fn trace_text(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    for step in v["trace"]["steps"].as_array().into_iter().flatten() {
        let _ = writeln!(
            t,
            "slot {} ({} {}, {} us)",
            step["slot"].as_str().unwrap_or("-"),
            step["policy"].as_str().unwrap_or("-"),
            step["policy_version"].as_str().unwrap_or("-"),
            step["elapsed_us"]
        );
        for m in step["markers"].as_array().into_iter().flatten() {
            let _ = writeln!(
                t,
                "  marker {} = {}",
                m["key"].as_str().unwrap_or("-"),
                super::output::scalar(&m["value"])
            );
        }
        let lines = |t: &mut String, what: &str, list: &serde_json::Value| {
            let items = list.as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                let _ = writeln!(t, "  {what}: none");
            }
            for a in &items {
                let _ = writeln!(t, "  {what}: {}", action_line(a));
            }
        };
        lines(&mut t, "proposed", &step["proposed"]);
        if step["failure"].is_object() {
            let _ = writeln!(
                t,
                "  failed: {}: {}",
                step["failure"]["kind"].as_str().unwrap_or("-"),
                step["failure"]["message"].as_str().unwrap_or("")
            );
        } else {
            lines(&mut t, "output", &step["output"]);
        }
    }
    super::remote::render_verdict(&mut t, v);
    t
}
