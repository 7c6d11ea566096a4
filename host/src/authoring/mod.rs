//! Tools for policy authors, used by `heartgate policy new|build|test|eval|replay`:
//! everything a policy needs from creation to a replay against production
//! decisions, without a running service.
//!
//! - [`template`]: a new policy crate on the guest SDK.
//! - [`compile`]: a policy crate built into a validated component.
//! - [`fixtures`]: fixture files run through a module or a whole chain, in the
//!   service's sandbox and limits, with a `cargo test`-like report.
//! - [`trace`]: one input through a module or chain, slot by slot.
//! - [`replay`]: recorded decisions re-evaluated with a candidate in a slot.
//!
//! Modules run exactly as in the service: the same [`Engine`] (pooling
//! allocator, epoch deadline, memory cap), and the chain's output checks. A
//! module tested on its own is a one-slot chain with every grant
//! ([`Chain::single`]); a chain is built from a chain file by
//! [`Chain::from_spec`].

pub mod compile;
pub mod fixtures;
pub mod replay;
pub mod template;
pub mod trace;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::chain::{Chain, ChainSpec, builtin_module};
use crate::config::ConfigFile;
use crate::engine::Engine;

/// Load a module given on the command line: a component file, or
/// `builtin:<name>` for an embedded policy.
pub fn load_module(engine: &Engine, arg: &str) -> Result<crate::engine::PolicyModule> {
    let bytes: std::borrow::Cow<'static, [u8]> = match arg.strip_prefix("builtin:") {
        Some(name) => builtin_module(name)
            .with_context(|| {
                format!(
                    "no built-in module `{name}`; built-ins are gate, status-rules, liveness, recovery-trigger, cooldown"
                )
            })?
            .into(),
        None => std::fs::read(arg)
            .with_context(|| format!("reading module {arg}"))?
            .into(),
    };
    engine
        .load(&bytes)
        .with_context(|| format!("loading module {arg}"))
}

/// Read a chain file: a bare chain (`[[slot]]` tables in TOML, or
/// `{"slot": [...]}` in JSON), or a service config file with a `[[chain.slot]]`
/// section. Returns the spec and the directory relative module paths are under.
pub fn read_chain_file(path: &Path) -> Result<(ChainSpec, PathBuf)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading chain file {}", path.display()))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let is_json = path.extension().is_some_and(|e| e == "json");
    let spec = if is_json {
        serde_json::from_str::<ChainSpec>(&text)
            .with_context(|| format!("{} is not a chain file", path.display()))?
    } else {
        match toml::from_str::<ChainSpec>(&text) {
            Ok(spec) => spec,
            Err(bare) => match ConfigFile::load(path) {
                Ok(ConfigFile {
                    chain: Some(spec), ..
                }) => spec,
                Ok(_) => bail!(
                    "{}: no chain in this file ({bare}); give `[[slot]]` tables or a config with `[[chain.slot]]`",
                    path.display()
                ),
                Err(e) => bail!(
                    "{} is neither a chain file ({bare}) nor a config file ({e})",
                    path.display()
                ),
            },
        }
    };
    Ok((spec, base))
}

/// Build the chain of a chain file, with `module` (if given) in slot `slot`.
/// Without `slot`, `module` must be a file some slot of the chain already
/// names.
pub fn chain_with(
    engine: &Engine,
    chain_file: &Path,
    module: Option<&str>,
    slot: Option<&str>,
) -> Result<Chain> {
    let (mut spec, base) = read_chain_file(chain_file)?;
    if let Some(module) = module {
        let slot_name = match slot {
            Some(name) => name.to_string(),
            None => {
                let wanted = std::fs::canonicalize(module).ok();
                spec.slot
                    .iter()
                    .find(|s| {
                        wanted.is_some()
                            && std::fs::canonicalize(base.join(&s.module)).ok() == wanted
                    })
                    .map(|s| s.name.clone())
                    .with_context(|| {
                        format!(
                            "no slot of {} runs {module}; name the slot it should run in with --slot",
                            chain_file.display()
                        )
                    })?
            }
        };
        let names: Vec<String> = spec.slot.iter().map(|s| s.name.clone()).collect();
        let target = spec
            .slot
            .iter_mut()
            .find(|s| s.name == slot_name)
            .with_context(|| {
                format!(
                    "{} has no slot `{slot_name}`; its slots are {}",
                    chain_file.display(),
                    names.join(", ")
                )
            })?;
        target.module = if module.starts_with("builtin:") {
            module.to_string()
        } else {
            std::fs::canonicalize(module)
                .with_context(|| format!("reading module {module}"))?
                .display()
                .to_string()
        };
    }
    Chain::from_spec(engine, &spec, &base, &|_| None).map_err(|e| {
        let at = error_line(chain_file, &e)
            .map(|l| format!(":{l}"))
            .unwrap_or_default();
        anyhow::Error::new(e).context(format!(
            "building the chain of {}{at}",
            chain_file.display()
        ))
    })
}

/// The line of `file` holding the value a chain error is about, when it is
/// about one (an unknown built-in).
pub fn error_line(file: &Path, e: &crate::chain::ChainError) -> Option<usize> {
    match e {
        crate::chain::ChainError::UnknownBuiltin { module, .. } => std::fs::read_to_string(file)
            .ok()
            .and_then(|text| line_of(&text, module)),
        _ => None,
    }
}

/// The first line (1-based) of `text` that holds `value` quoted.
fn line_of(text: &str, value: &str) -> Option<usize> {
    let quoted = [format!("\"{value}\""), format!("'{value}'")];
    text.lines()
        .position(|l| quoted.iter().any(|q| l.contains(q.as_str())))
        .map(|i| i + 1)
}

/// The chain a local command runs: the chain of `chain_file` (with `module`
/// in `slot`), or `module` alone as a one-slot chain with every grant.
/// Returns it and whether it is a whole chain (whose verdict gets the
/// executor's final check).
pub fn local_chain(
    engine: &Engine,
    chain_file: Option<&Path>,
    module: Option<&str>,
    slot: Option<&str>,
) -> Result<(Chain, bool)> {
    match (chain_file, module) {
        (Some(file), module) => Ok((chain_with(engine, file, module, slot)?, true)),
        (None, Some(module)) => {
            let loaded = load_module(engine, module)?;
            let name = loaded.metadata().name.clone();
            Ok((Chain::single(&name, loaded), false))
        }
        (None, None) => bail!("give a MODULE or a chain file (--chain)"),
    }
}
