//! `heartgate policy build`: a policy crate compiled for
//! `wasm32-unknown-unknown`, turned into a component, and loaded by the
//! service's engine before it is written, so a module that would be refused
//! at push time is refused here.
//!
//! The grants the policy needs are declared in its `Cargo.toml`:
//!
//! ```toml
//! [package.metadata.heartgate]
//! grants = ["conditions", "record_event"]
//! ```
//!
//! and written into the component ([`crate::engine::GRANTS_SECTION`]), so
//! that staging it in a slot without them is refused.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::chain::Grant;
use crate::engine::{Engine, with_declared_grants};
use crate::model::Metadata;

/// The target policies are compiled for.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// A built module.
#[derive(Debug)]
pub struct Built {
    pub path: PathBuf,
    pub metadata: Metadata,
    pub digest: String,
    pub bytes: usize,
    /// What it declares it needs (`None`: the crate declares nothing).
    pub declared_grants: Option<Vec<Grant>>,
}

/// `[package.metadata.heartgate] grants` of a parsed manifest.
fn declared_grants(manifest: &Path, parsed: &toml::Table) -> Result<Option<Vec<Grant>>> {
    let Some(value) = parsed
        .get("package")
        .and_then(|p| p.get("metadata"))
        .and_then(|m| m.get("heartgate"))
        .and_then(|h| h.get("grants"))
    else {
        return Ok(None);
    };
    let known = Grant::ALL.map(Grant::as_str).join(", ");
    let list = value.as_array().with_context(|| {
        format!(
            "{}: [package.metadata.heartgate] grants must be a list of grant names ({known})",
            manifest.display()
        )
    })?;
    let mut grants = Vec::with_capacity(list.len());
    for item in list {
        let grant = item.as_str().and_then(Grant::parse).with_context(|| {
            format!(
                "{}: [package.metadata.heartgate] grants: `{item}` is not a grant; grants are {known}",
                manifest.display()
            )
        })?;
        if !grants.contains(&grant) {
            grants.push(grant);
        }
    }
    Ok(Some(grants))
}

/// Build the policy crate in `crate_dir`; write the component to `out`
/// (default `<crate_dir>/<package name>.wasm`). Cargo's diagnostics go to
/// this process's stderr.
pub fn build(engine: &Engine, crate_dir: &Path, out: Option<&Path>) -> Result<Built> {
    let manifest = crate_dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "{} has no Cargo.toml: run this in a policy crate or pass its directory",
            crate_dir.display()
        )
    })?;
    let parsed: toml::Table =
        toml::from_str(&text).with_context(|| format!("reading {}", manifest.display()))?;
    let package = parsed
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .with_context(|| format!("{} has no [package] name", manifest.display()))?
        .to_string();
    let lib_name = package.replace('-', "_");
    let grants = declared_grants(&manifest, &parsed)?;

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .current_dir(crate_dir)
        .args([
            "build",
            "--release",
            "--lib",
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        // The service's stack for policies (see .cargo/config.toml): a small
        // stack keeps the fresh sandbox of every evaluation cheap.
        .env(
            "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS",
            "-C link-arg=-zstack-size=32768",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running cargo (is the Rust toolchain installed?)")?;
    let mut core: Option<PathBuf> = None;
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.context("reading cargo's output")?;
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if msg["reason"] != "compiler-artifact" || msg["target"]["name"] != lib_name.as_str() {
                continue;
            }
            let wasm = msg["filenames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".wasm"));
            if let Some(f) = wasm {
                core = Some(PathBuf::from(f));
            }
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!(
            "cargo build failed ({status}); if the target is missing, run `rustup target add {TARGET}`"
        );
    }
    let core = core.with_context(|| {
        format!("cargo built no .wasm for `{package}`: its [lib] needs crate-type = [\"cdylib\", \"rlib\"]")
    })?;
    let module = std::fs::read(&core).with_context(|| format!("reading {}", core.display()))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|e| e.validate(true).encode())
        .with_context(|| format!("turning {} into a component", core.display()))?;
    let component = match &grants {
        Some(grants) => with_declared_grants(&component, grants),
        None => component,
    };
    let loaded = engine
        .load(&component)
        .context("the built component would be refused by the service")?;
    let path = out.map_or_else(
        || crate_dir.join(format!("{package}.wasm")),
        Path::to_path_buf,
    );
    // Write beside the destination and rename, so a reader never sees half a module.
    let tmp = path.with_extension("wasm.partial");
    std::fs::write(&tmp, &component).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(Built {
        path,
        metadata: loaded.metadata().clone(),
        digest: loaded.digest().to_string(),
        bytes: component.len(),
        declared_grants: grants,
    })
}
