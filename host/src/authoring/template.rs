//! `heartgate policy new NAME`: a policy crate on the guest SDK with a sample
//! rule, its native tests and two fixtures, ready to build into a component.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where the SDK of the checkout this binary was built from lives.
pub const DEFAULT_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/sdk");

/// Check a policy name: 1-64 of `a-z`, `0-9`, `-`, starting with a letter
/// (it becomes the crate name, the module's metadata name and its file name).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.ends_with('-');
    if !ok {
        bail!(
            "policy name `{name}` must be 1-64 of a-z, 0-9 and `-`, start with a letter and not end with `-`"
        );
    }
    Ok(())
}

/// Create the crate `NAME` in `parent/NAME`, depending on the SDK at `sdk`.
/// Refuses to write into an existing directory. Returns the files written.
pub fn create(parent: &Path, name: &str, sdk: &Path) -> Result<Vec<PathBuf>> {
    validate_name(name)?;
    let sdk = std::fs::canonicalize(sdk).with_context(|| {
        format!(
            "the guest SDK is not at {}; pass --sdk with the path of a Heartgate checkout's policies/sdk",
            sdk.display()
        )
    })?;
    if !sdk.join("Cargo.toml").is_file() {
        bail!("{} is not the guest SDK (no Cargo.toml)", sdk.display());
    }
    let root = parent.join(name);
    if root.exists() {
        bail!(
            "{} already exists; choose another name or directory",
            root.display()
        );
    }
    let files = render(name, &sdk);
    let mut written = Vec::with_capacity(files.len());
    for (rel, text) in files {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn render(name: &str, sdk: &Path) -> Vec<(&'static str, String)> {
    let sdk = sdk.display().to_string().replace('\\', "/");
    let fill = |s: &str| s.replace("{{name}}", name).replace("{{sdk}}", &sdk);
    vec![
        ("Cargo.toml", fill(CARGO_TOML)),
        (".gitignore", "/target\n*.wasm\n".to_string()),
        ("README.md", fill(README)),
        ("src/lib.rs", fill(LIB_RS)),
        ("src/rule.rs", fill(RULE_RS)),
        (
            "fixtures/overloaded_online_degrades.json",
            fill(FIXTURE_DEGRADES),
        ),
        (
            "fixtures/healthy_heartbeat_passes.json",
            fill(FIXTURE_PASSES),
        ),
    ]
}

const CARGO_TOML: &str = r#"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2024"
publish = false

# A component for Heartgate (`heartgate policy build`) and a plain library for
# native unit tests (`cargo test`).
[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
heartgate-policy = { path = "{{sdk}}" }

# A policy is its own workspace, wherever it lives.
[workspace]

# Small, deterministic components; a panic aborts (the host fails the slot closed).
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true
panic = "abort"
"#;

const README: &str = r#"# {{name}}

A Heartgate policy. The rule is `decide` in `src/rule.rs`.

    cargo test                                   # native unit tests
    heartgate policy build                       # -> {{name}}.wasm
    heartgate policy test {{name}}.wasm          # the fixtures in fixtures/
    heartgate policy eval {{name}}.wasm --input fixtures/overloaded_online_degrades.json

The author's guide (policies/README.md in the Heartgate repository) explains
the contract, the limits, replay, and how to hot-swap the module into a
running service.
"#;

const LIB_RS: &str = r#"//! The component adapter of the `{{name}}` policy; the decision lives in [`rule`].

pub mod rule;

heartgate_policy::policy!(rule::NAME, rule::decide);
"#;

const RULE_RS: &str = r#"//! The `{{name}}` policy: mark an online workspace degraded when its runtime
//! reports `runtime_state = "overloaded"`.

use heartgate_policy::{Action, Input, Status};

/// The policy's name (its markers are kept under it).
pub const NAME: &str = "{{name}}";

/// Decide: take the actions proposed by the slots before this one and return
/// the actions to propose next.
pub fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    let Some(beat) = input.heartbeat() else {
        return proposed;
    };
    let ws = &input.workspace;
    // One status change per verdict: leave the status to an earlier slot
    // that already decided it.
    let status_decided = proposed.iter().any(|a| a.as_status_change().is_some());
    if ws.status == Status::Online && beat.runtime_state == "overloaded" && !status_decided {
        proposed.push(Action::set_status(
            &ws.id,
            Status::Online,
            Status::Degraded,
            "runtime_overloaded",
            Some("the runtime reports it is overloaded"),
        ));
    }
    proposed
}

#[cfg(test)]
mod tests {
    use super::*;
    use heartgate_policy::testing::{assert_no_status_change, assert_sets_status, heartbeat};

    #[test]
    fn an_overloaded_online_workspace_degrades() {
        let input = heartbeat("ws-1").beat(|b| b.runtime_state = "overloaded".into());
        let out = decide(&input, vec![]);
        assert_sets_status(&out, Status::Degraded, "runtime_overloaded");
    }

    #[test]
    fn a_healthy_heartbeat_changes_nothing() {
        assert!(decide(&heartbeat("ws-1"), vec![]).is_empty());
    }

    #[test]
    fn a_status_change_already_proposed_is_left_alone() {
        let input = heartbeat("ws-1").beat(|b| b.runtime_state = "overloaded".into());
        let earlier = Action::set_status("ws-1", Status::Online, Status::Failed, "gate", None);
        let out = decide(&input, vec![earlier.clone()]);
        assert_eq!(out, vec![earlier]);
    }

    #[test]
    fn a_degraded_workspace_is_not_degraded_again() {
        let input = heartbeat("ws-1")
            .with_status(Status::Degraded)
            .beat(|b| b.runtime_state = "overloaded".into());
        assert_no_status_change(&decide(&input, vec![]));
    }
}
"#;

const FIXTURE_DEGRADES: &str = r#"{
  "description": "an online workspace whose runtime is overloaded degrades",
  "input": {
    "event": { "heartbeat": { "runtime_state": "overloaded", "uptime_seconds": 60 } },
    "workspace": { "id": "ws-1", "kind": "workspace", "status": "online", "model_configured": true },
    "now_ms": 1782302400000
  },
  "expected": [
    {
      "workspace_id": "ws-1",
      "kind": "set_status",
      "to": "degraded",
      "expected": "online",
      "reason": "runtime_overloaded",
      "message": "the runtime reports it is overloaded"
    }
  ]
}
"#;

const FIXTURE_PASSES: &str = r#"{
  "description": "a healthy heartbeat passes the proposed actions through",
  "input": {
    "event": { "heartbeat": { "uptime_seconds": 60 } },
    "workspace": { "id": "ws-1", "kind": "workspace", "status": "online", "model_configured": true },
    "now_ms": 1782302400000
  },
  "proposed": [
    { "workspace_id": "ws-1", "kind": "request_reconcile", "trigger": "online" }
  ],
  "expected": [
    { "workspace_id": "ws-1", "kind": "request_reconcile", "trigger": "online" }
  ]
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["busy-degrade", "a", "p2"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Busy", "9lives", "a_b", "a-", "../x", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
