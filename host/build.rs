//! Builds the built-in policies into WebAssembly components for embedding.
//!
//! Each crate under `policies/` is compiled for `wasm32-unknown-unknown` with
//! the workspace's `policy` profile by a nested cargo, in its own target
//! directory beside this build's (so the two never wait on each other's lock),
//! then turned into a component with `wit-component`. The host embeds the
//! components with `include_bytes!`, so `heartgate serve` needs no files.
//!
//! `RUSTUP_AUTO_INSTALL=0` means a `rust-toolchain.toml` alone does not install
//! the wasm target: when it is missing this script runs
//! `rustup target add wasm32-unknown-unknown` and says so.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const TARGET: &str = "wasm32-unknown-unknown";
/// Only for a test guest that must import WASI.
const WASI_TARGET: &str = "wasm32-wasip2";

/// (crate name, file stem of its core module, name of the component file)
const POLICIES: [(&str, &str, &str); 16] = [
    ("heartgate-policy-gate", "heartgate_policy_gate", "gate"),
    (
        "heartgate-policy-status-rules",
        "heartgate_policy_status_rules",
        "status_rules",
    ),
    (
        "heartgate-policy-liveness",
        "heartgate_policy_liveness",
        "liveness",
    ),
    (
        "heartgate-policy-recovery-trigger",
        "heartgate_policy_recovery_trigger",
        "recovery_trigger",
    ),
    (
        "heartgate-policy-cooldown",
        "heartgate_policy_cooldown",
        "cooldown",
    ),
    // Not embedded: test guests (a misbehaving policy, bad candidates, a
    // one-minute cooldown) that the tests load from OUT_DIR (the path is
    // exported as HEARTGATE_TEST_GUESTS_DIR).
    (
        "heartgate-guest-hostile",
        "heartgate_guest_hostile",
        "hostile",
    ),
    (
        "heartgate-guest-always-trap",
        "heartgate_guest_always_trap",
        "always_trap",
    ),
    (
        "heartgate-guest-always-loop",
        "heartgate_guest_always_loop",
        "always_loop",
    ),
    (
        "heartgate-guest-no-metadata",
        "heartgate_guest_no_metadata",
        "no_metadata",
    ),
    ("heartgate-guest-noisy", "heartgate_guest_noisy", "noisy"),
    (
        "heartgate-guest-cooldown-1m",
        "heartgate_guest_cooldown_1m",
        "cooldown_1m",
    ),
    (
        "heartgate-guest-impostor",
        "heartgate_guest_impostor",
        "impostor",
    ),
    (
        "heartgate-guest-long-name",
        "heartgate_guest_long_name",
        "long_name",
    ),
    (
        "heartgate-guest-hold-busy",
        "heartgate_guest_hold_busy",
        "hold_busy",
    ),
    (
        "heartgate-guest-hold-maintenance",
        "heartgate_guest_hold_maintenance",
        "hold_maintenance",
    ),
    (
        "heartgate-guest-busy-degrade",
        "heartgate_guest_busy_degrade",
        "busy_degrade",
    ),
];

/// Test guests built for `wasm32-wasip2`, which links a component by itself
/// (with the WASI imports std brings): (crate, file stem, component name).
const WASI_GUESTS: [(&str, &str, &str); 1] = [(
    "heartgate-guest-wasi-user",
    "heartgate_guest_wasi_user",
    "wasi_user",
)];

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("host/ has no parent directory")?
        .to_path_buf();
    for watched in [
        "policies",
        "tests/guests",
        "wit",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // OUT_DIR is <target>/<profile>/build/<pkg>/out.
    let target_dir = match env::var_os("HEARTGATE_POLICY_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => out_dir
            .ancestors()
            .nth(4)
            .context("cannot find the target directory above OUT_DIR")?
            .join("policies"),
    };

    ensure_target(&root, TARGET)?;
    ensure_target(&root, WASI_TARGET)?;
    let crates: Vec<&str> = POLICIES.iter().map(|(c, _, _)| *c).collect();
    build_guests(&root, &target_dir, TARGET, &crates)?;
    let wasi: Vec<&str> = WASI_GUESTS.iter().map(|(c, _, _)| *c).collect();
    build_guests(&root, &target_dir, WASI_TARGET, &wasi)?;
    for (_, stem, name) in WASI_GUESTS {
        let path = target_dir
            .join(WASI_TARGET)
            .join("policy")
            .join(format!("{stem}.wasm"));
        let component =
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        std::fs::write(out_dir.join(format!("{name}.wasm")), component)?;
    }
    for (_, stem, name) in POLICIES {
        let core_path = target_dir
            .join(TARGET)
            .join("policy")
            .join(format!("{stem}.wasm"));
        let component = componentize(&core_path)?;
        std::fs::write(out_dir.join(format!("{name}.wasm")), &component)?;
        // A stable path for people: `target/policies/components/<name>.wasm`.
        let public = target_dir.join("components");
        std::fs::create_dir_all(&public)?;
        std::fs::write(public.join(format!("{name}.wasm")), &component)?;
    }
    println!(
        "cargo:rustc-env=HEARTGATE_TEST_GUESTS_DIR={}",
        out_dir.display()
    );
    Ok(())
}

/// The toolchain the guests are built with, when it is not the one building
/// the host: `HEARTGATE_GUEST_TOOLCHAIN=1.95.0` lets a nightly build of the
/// host (cargo-fuzz, see TESTING.md) build the guests with the pinned
/// toolchain, which has the wasm targets installed.
fn guest_toolchain() -> Option<String> {
    println!("cargo:rerun-if-env-changed=HEARTGATE_GUEST_TOOLCHAIN");
    env::var("HEARTGATE_GUEST_TOOLCHAIN")
        .ok()
        .filter(|t| !t.is_empty())
}

/// `tool` (`rustc` or `cargo`) of the guest toolchain.
fn guest_tool(tool: &str) -> Command {
    match guest_toolchain() {
        Some(toolchain) => {
            let mut cmd = Command::new("rustup");
            cmd.args(["run", &toolchain, tool])
                .env_remove("RUSTC")
                .env_remove("RUSTDOC")
                .env_remove("RUSTUP_TOOLCHAIN");
            cmd
        }
        None if tool == "rustc" => {
            Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string()))
        }
        None => Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())),
    }
}

fn ensure_target(root: &Path, target: &str) -> Result<()> {
    let libdir = guest_tool("rustc")
        .args(["--print", "target-libdir", "--target", target])
        .output()
        .context("running rustc --print target-libdir")?;
    let libdir = String::from_utf8_lossy(&libdir.stdout).trim().to_string();
    if !libdir.is_empty() && Path::new(&libdir).is_dir() {
        return Ok(());
    }
    println!(
        "cargo:warning=installing the {target} target with `rustup target add {target}` to build the policies"
    );
    let mut add = Command::new("rustup");
    add.current_dir(root).args(["target", "add", target]);
    if let Some(toolchain) = guest_toolchain() {
        add.args(["--toolchain", &toolchain]);
    }
    let status = add
        .status()
        .context("running rustup target add (is rustup installed?)")?;
    if !status.success() {
        bail!("`rustup target add {target}` failed with {status}");
    }
    Ok(())
}

fn build_guests(root: &Path, target_dir: &Path, target: &str, crates: &[&str]) -> Result<()> {
    let mut cmd = guest_tool("cargo");
    cmd.current_dir(root)
        .args(["build", "--profile", "policy", "--target", target])
        .arg("--target-dir")
        .arg(target_dir);
    for krate in crates {
        cmd.args(["-p", krate]);
    }
    // The outer build's settings are for the host, not for the guests.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().to_string();
        let keep = matches!(key.as_str(), "CARGO_HOME" | "CARGO_MAKEFLAGS");
        if (key.starts_with("CARGO_") && !keep)
            || matches!(key.as_str(), "RUSTFLAGS" | "RUSTC_WORKSPACE_WRAPPER")
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .context("running cargo to build the policies")?;
    if !status.success() {
        bail!("building the policies for {target} failed with {status}");
    }
    Ok(())
}

fn componentize(core_path: &Path) -> Result<Vec<u8>> {
    let core =
        std::fs::read(core_path).with_context(|| format!("reading {}", core_path.display()))?;
    wit_component::ComponentEncoder::default()
        .module(&core)?
        .validate(true)
        .encode()
        .with_context(|| format!("turning {} into a component", core_path.display()))
}
