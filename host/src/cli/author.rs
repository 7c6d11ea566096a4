//! The author's `policy` commands, run here: `new`, `build`, `test`, a local
//! `eval`, `replay`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use heartgate::clock::{Clock, SystemClock};
use heartgate::open_existing_store;

use super::args::PolicyCommand;
use super::output::{out, say};

/// A `policy` subcommand run here, or one for the running service.
pub(crate) enum Local {
    /// Run here; the process's exit code.
    Done(i32),
    Remote(PolicyCommand),
}

/// Run the author's commands (new, build, test, local eval, replay) here;
/// hand the others back for the admin API.
pub(crate) fn local_policy(db: &Path, command: PolicyCommand) -> Result<Local> {
    use heartgate::authoring::{self, compile, fixtures, replay, template, trace};
    use heartgate::engine::Engine;

    match command {
        PolicyCommand::New {
            name,
            dir,
            sdk,
            sdk_version,
        } => {
            let told = sdk.is_some() || sdk_version.is_some();
            let sdk = match (sdk, sdk_version) {
                (Some(path), _) => template::Sdk::Path(path),
                (None, Some(version)) => template::Sdk::Version(version),
                (None, None) => template::Sdk::default_at(Path::new(template::DEFAULT_SDK)),
            };
            let created = template::create(&dir, &name, &sdk)?;
            say!("created policy `{name}` in {}", dir.join(&name).display())?;
            for f in created.files {
                say!("  {}", f.display())?;
            }
            say!("its SDK: {}", created.dependency)?;
            if let template::Sdk::Version(_) = sdk {
                if !told {
                    say!(
                        "  (the SDK checkout this binary was built from is not at {} any more)",
                        template::DEFAULT_SDK
                    )?;
                }
                say!(
                    "  (from the registry: cargo fetches it on the first build; pass --sdk PATH to use a checkout's policies/sdk)"
                )?;
            }
            say!(
                "next: cd {} && cargo test && heartgate policy build && heartgate policy test {name}.wasm",
                dir.join(&name).display()
            )?;
            Ok(Local::Done(0))
        }
        PolicyCommand::Build { dir, out } => {
            let engine = Engine::new()?;
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let built = compile::build(&engine, &dir, out.as_deref())?;
            say!(
                "built {} {} -> {} ({} bytes, sha256:{})",
                built.metadata.name,
                built.metadata.version,
                built.path.display(),
                built.bytes,
                built.digest
            )?;
            Ok(Local::Done(0))
        }
        PolicyCommand::Test {
            module,
            fixtures: dir,
            chain,
            slot,
        } => {
            let engine = Engine::new()?;
            let (chain, whole) = authoring::local_chain(
                &engine,
                chain.as_deref(),
                module.as_deref(),
                slot.as_deref(),
            )?;
            let cases = fixtures::load_dir(&dir)?;
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
        } => {
            let chain_file = chain
                .as_deref()
                .filter(|c| c.parse::<i64>().is_err())
                .map(PathBuf::from);
            if module.is_none() && chain_file.is_none() {
                if with_trace {
                    bail!("--trace needs a local evaluation: give a MODULE or a chain file");
                }
                return Ok(Local::Remote(PolicyCommand::Eval {
                    module,
                    input,
                    chain,
                    slot,
                    trace: with_trace,
                }));
            }
            let engine = Engine::new()?;
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
            let out = trace::eval(&chain, &input_value, proposed, whole, with_trace);
            say!("{}", serde_json::to_string_pretty(&out)?)?;
            Ok(Local::Done(0))
        }
        PolicyCommand::Replay {
            candidate,
            slot,
            since,
            chain,
            json,
            fail_on_change,
        } => {
            let since_ms = since
                .map(|d| {
                    let span = heartgate::clock::parse_duration_ms(&d)
                        .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
                    anyhow::Ok(SystemClock.now_ms().saturating_sub(span))
                })
                .transpose()?;
            let engine = Engine::new()?;
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
            if json {
                say!("{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                out(&replay::render(&report))?;
            }
            Ok(Local::Done(i32::from(
                fail_on_change && !report.changed.is_empty(),
            )))
        }
        other => Ok(Local::Remote(other)),
    }
}
