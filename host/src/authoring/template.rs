//! `heartgate policy new NAME`: a policy crate on the guest SDK (contract
//! 0.2.0) with a sample rule that holds a workspace back with a condition of
//! its own (with hysteresis), its native tests, two single-shot fixtures and
//! one sequence fixture, ready to build into a component.
//!
//! The crate depends on the SDK by a path relative to its own directory (so
//! the crate and the SDK's checkout can move together, and a repository
//! holding both builds in CI), or by version, for an SDK that comes from a
//! registry. Never by an absolute path: that builds on one machine only.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::chain::Grant;

/// Where the SDK of the checkout this binary was built from lives.
pub const DEFAULT_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/sdk");

/// The SDK's version: the workspace's, which this binary shares.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where a new crate's SDK comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sdk {
    /// An SDK crate on disk (a checkout's `policies/sdk`, or an unpacked
    /// copy): a path dependency, written relative to the new crate.
    Path(PathBuf),
    /// The crate `heartgate-policy` of this version (a Cargo version
    /// requirement) from a registry.
    Version(String),
}

impl Sdk {
    /// The SDK `policy new` uses when told none: the checkout at `checkout`
    /// (the one this binary was built from) if it is still there, else the
    /// published crate of this binary's version.
    pub fn default_at(checkout: &Path) -> Sdk {
        if checkout.join("Cargo.toml").is_file() {
            Sdk::Path(checkout.to_path_buf())
        } else {
            Sdk::Version(SDK_VERSION.to_string())
        }
    }
}

/// A crate `create` wrote.
#[derive(Debug)]
pub struct Created {
    /// The files written.
    pub files: Vec<PathBuf>,
    /// The SDK dependency as written into its `Cargo.toml`, e.g.
    /// `heartgate-policy = { path = "../heartgate/policies/sdk" }`.
    pub dependency: String,
    /// The grants its `Cargo.toml` declares.
    pub grants: Vec<Grant>,
}

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

/// Check a version requirement for `--sdk-version`: what Cargo accepts in a
/// dependency's version (`0.1.0`, `^0.2`, `>=0.2, <0.4`, ...), loosely; Cargo
/// checks it exactly when it builds the crate.
fn validate_version(version: &str) -> Result<()> {
    let ok = !version.trim().is_empty()
        && version.len() <= 64
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" .,^~=<>*+-".contains(&b));
    if !ok {
        bail!("`{version}` is not a version requirement (e.g. `0.1.0` or `^0.2`)");
    }
    Ok(())
}

/// What the sample rule needs: its condition, its marker and its event.
pub const SAMPLE_GRANTS: [Grant; 3] = [Grant::Conditions, Grant::Markers, Grant::RecordEvent];

/// Create the crate `NAME` in `parent/NAME`, depending on `sdk`, declaring
/// `grants` (`[package.metadata.heartgate] grants`; `None`: what the sample
/// rule needs, [`SAMPLE_GRANTS`]). Refuses to write into an existing
/// directory.
pub fn create(parent: &Path, name: &str, sdk: &Sdk, grants: Option<&[Grant]>) -> Result<Created> {
    validate_name(name)?;
    let sdk = match sdk {
        Sdk::Path(path) => {
            let path = std::fs::canonicalize(path).with_context(|| {
                format!(
                    "the guest SDK is not at {}; pass --sdk with the path of a Heartgate checkout's policies/sdk, or --sdk-version",
                    path.display()
                )
            })?;
            if !path.join("Cargo.toml").is_file() {
                bail!("{} is not the guest SDK (no Cargo.toml)", path.display());
            }
            Sdk::Path(path)
        }
        Sdk::Version(version) => {
            validate_version(version)?;
            Sdk::Version(version.clone())
        }
    };
    let root = parent.join(name);
    if root.exists() {
        bail!(
            "{} already exists; choose another name or directory",
            root.display()
        );
    }
    let dependency = match &sdk {
        Sdk::Path(sdk) => {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
            let parent = std::fs::canonicalize(parent)
                .with_context(|| format!("resolving {}", parent.display()))?;
            let rel = relative(&parent.join(name), sdk);
            let rel = rel.to_str().with_context(|| {
                format!(
                    "the path from the crate to the SDK, {}, is not UTF-8",
                    rel.display()
                )
            })?;
            // A TOML string, quoted and escaped; Cargo reads `/` everywhere.
            let rel = toml::Value::String(rel.replace('\\', "/"));
            format!("heartgate-policy = {{ path = {rel} }}")
        }
        Sdk::Version(version) => {
            format!(
                "heartgate-policy = {}",
                toml::Value::String(version.clone())
            )
        }
    };
    let mut declared: Vec<Grant> = Vec::new();
    for g in grants.unwrap_or(&SAMPLE_GRANTS) {
        if !declared.contains(g) {
            declared.push(*g);
        }
    }
    let files = render(name, &dependency, &declared);
    let mut written = Vec::with_capacity(files.len());
    for (rel, text) in files {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(Created {
        files: written,
        dependency,
        grants: declared,
    })
}

/// The path from directory `from` to `to`, both absolute and canonical:
/// `..` for each component of `from` past their common prefix, then the rest
/// of `to`. Paths with nothing in common (another drive) give `to` itself.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return to.iter().collect();
    }
    let mut rel: PathBuf = std::iter::repeat_n(Component::ParentDir, from.len() - common).collect();
    rel.extend(&to[common..]);
    if rel.as_os_str().is_empty() {
        rel.push(".");
    }
    rel
}

/// The crate's files; `dependency` is the SDK's line of `[dependencies]`.
fn render(name: &str, dependency: &str, grants: &[Grant]) -> Vec<(&'static str, String)> {
    let grants = toml::Value::Array(
        grants
            .iter()
            .map(|g| toml::Value::String(g.as_str().to_string()))
            .collect(),
    )
    .to_string();
    let fill = |s: &str| {
        s.replace("{{name}}", name)
            .replace("{{sdk_dependency}}", dependency)
            .replace("{{grants}}", &grants)
    };
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
        (
            "fixtures/overloaded_then_calm_recovers_once.json",
            fill(FIXTURE_SEQUENCE),
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
{{sdk_dependency}}

# What the policy may do in its slot. `heartgate policy build` writes this
# into the component, and a slot that does not grant all of it is refused
# when staged: keep it to what `decide` returns (conditions, markers,
# record_event, request_reconcile, reject, set_status, drop).
[package.metadata.heartgate]
grants = {{grants}}

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

A Heartgate policy (contract `heartgate:policy@0.2.0`). The rule is `decide`
in `src/rule.rs`: it states why a workspace should not be online with a
condition of its own, and the host derives the status from every condition
in force.

    cargo test                                   # native unit tests
    heartgate policy build                       # -> {{name}}.wasm
    heartgate policy test {{name}}.wasm          # the fixtures in fixtures/
    heartgate policy eval {{name}}.wasm --input fixtures/overloaded_online_degrades.json

`fixtures/` holds two single-shot fixtures (one input, the module's exact
actions) and one sequence fixture (many heartbeats, the state carried from
step to step as the service would, the status checked after each).

The author's guide (policies/README.md in the Heartgate repository) explains
the contract, how conditions compose, the limits, replay, and how to
hot-swap the module into a running service. The grants it needs are
declared in `Cargo.toml` (`[package.metadata.heartgate] grants`): a slot
must grant them all.
"#;

const LIB_RS: &str = r#"//! The component adapter of the `{{name}}` policy; the decision lives in [`rule`].

pub mod rule;

heartgate_policy::policy!(rule::NAME, rule::decide);
"#;

const RULE_RS: &str = r##"//! The `{{name}}` policy: hold a workspace degraded while its runtime reports
//! `runtime_state = "overloaded"`, and until it has reported another state
//! for [`CALM_MS`].
//!
//! The hold is the condition [`CONDITION`] (severity `degraded`): stated on
//! every overloaded heartbeat, cleared only once the runtime has been calm
//! for two minutes (the hysteresis: a runtime that is overloaded on every
//! other heartbeat stays degraded instead of flapping). The time of the last
//! overloaded report is the marker [`LAST_OVERLOADED_KEY`]. The event
//! `WORKSPACE_DEGRADED` is recorded when the condition comes into force, not
//! when it is restated. The status itself is the host's: the most severe
//! condition in force, of any policy, decides it, and with none the workspace
//! is online.

use heartgate_policy::{Action, Input, Severity};

/// The policy's name: its markers and conditions are kept under it.
pub const NAME: &str = "{{name}}";
/// The condition that holds the workspace back.
pub const CONDITION: &str = "overloaded";
/// Its reason code.
pub const REASON: &str = "runtime_overloaded";
/// Its message, the workspace's last error while it decides the status.
pub const MESSAGE: &str = "the runtime reports it is overloaded";
/// The marker holding when the runtime last reported it is overloaded.
pub const LAST_OVERLOADED_KEY: &str = "last-overloaded-ms";
/// How long the runtime must be calm before the condition is cleared.
pub const CALM_MS: i64 = 2 * 60 * 1000;

/// Decide: take the actions proposed by the slots before this one and return
/// them with this policy's own added.
pub fn decide(input: &Input, mut proposed: Vec<Action>) -> Vec<Action> {
    // A register or a silence says nothing about load: leave things as they are.
    let Some(beat) = input.heartbeat() else {
        return proposed;
    };
    let ws = &input.workspace;
    let in_force = input.condition(NAME, CONDITION).is_some();
    if beat.runtime_state == "overloaded" {
        // Restating a condition in force writes nothing.
        proposed.push(Action::set_condition(
            &ws.id,
            NAME,
            CONDITION,
            Severity::Degraded,
            REASON,
            MESSAGE,
        ));
        proposed.push(Action::set_marker(
            &ws.id,
            NAME,
            LAST_OVERLOADED_KEY,
            input.now_ms.to_string(),
        ));
        if !in_force {
            proposed.push(Action::record_event(
                &ws.id,
                "WORKSPACE_DEGRADED",
                r#"{"runtime_state":"overloaded"}"#.to_string(),
            ));
        }
    } else if in_force {
        // A missing or malformed marker counts as calm for long enough.
        let calm = input
            .marker_ms(LAST_OVERLOADED_KEY)
            .is_none_or(|at| input.now_ms.saturating_sub(at) >= CALM_MS);
        if calm {
            proposed.push(Action::clear_condition(&ws.id, NAME, CONDITION));
            proposed.push(Action::clear_marker(&ws.id, NAME, LAST_OVERLOADED_KEY));
        }
    }
    proposed
}

#[cfg(test)]
mod tests {
    use super::*;
    use heartgate_policy::testing::{
        T0_MS, assert_clears_condition, assert_clears_marker, assert_leaves_condition,
        assert_no_event, assert_records_event, assert_sets_condition, assert_sets_marker, carry,
        heartbeat, register,
    };
    use heartgate_policy::{Effect, Status};

    fn overloaded() -> Input {
        heartbeat("ws-1").beat(|b| b.runtime_state = "overloaded".into())
    }

    /// The workspace held back by this policy since the runtime was last
    /// overloaded `ago_ms` before now.
    fn held(ago_ms: i64) -> Input {
        heartbeat("ws-1")
            .with_status(Status::Degraded)
            .with_condition(NAME, CONDITION, Severity::Degraded, REASON)
            .with_marker(NAME, LAST_OVERLOADED_KEY, &(T0_MS - ago_ms).to_string())
    }

    #[test]
    fn an_overloaded_runtime_puts_the_condition_in_force() {
        let out = decide(&overloaded(), vec![]);
        let c = assert_sets_condition(&out, CONDITION, Severity::Degraded);
        assert_eq!(c.reason, REASON);
        assert_eq!(
            assert_sets_marker(&out, LAST_OVERLOADED_KEY),
            T0_MS.to_string()
        );
        assert_records_event(&out, "WORKSPACE_DEGRADED");
    }

    #[test]
    fn restating_the_condition_records_no_event() {
        let input = held(30_000).beat(|b| b.runtime_state = "overloaded".into());
        let out = decide(&input, vec![]);
        assert_sets_condition(&out, CONDITION, Severity::Degraded);
        assert_no_event(&out, "WORKSPACE_DEGRADED");
    }

    #[test]
    fn a_calm_runtime_is_held_until_two_minutes_have_passed() {
        assert_leaves_condition(&decide(&held(CALM_MS - 1), vec![]), CONDITION);
        let out = decide(&held(CALM_MS), vec![]);
        assert_clears_condition(&out, CONDITION);
        assert_clears_marker(&out, LAST_OVERLOADED_KEY);
    }

    #[test]
    fn a_healthy_heartbeat_or_a_register_adds_nothing() {
        assert!(decide(&heartbeat("ws-1"), vec![]).is_empty());
        let register = register("ws-1").with_condition(NAME, CONDITION, Severity::Degraded, REASON);
        assert!(decide(&register, vec![]).is_empty());
    }

    #[test]
    fn what_earlier_slots_proposed_passes_through() {
        let earlier = Action::set_condition(
            "ws-1",
            "rca2970-gate",
            "identity",
            Severity::Failed,
            "mcp_server_missing",
            "",
        );
        let out = decide(&overloaded(), vec![earlier.clone()]);
        assert_eq!(out[0], earlier);
        assert_sets_condition(&out, CONDITION, Severity::Degraded);
    }

    #[test]
    fn overloaded_every_other_heartbeat_comes_into_force_once() {
        // Ten minutes of heartbeats 30 s apart, overloaded on every other
        // one: one event, and the condition is never cleared.
        let mut input = overloaded();
        let mut events = 0;
        for i in 0..20 {
            let state = if i % 2 == 0 { "overloaded" } else { "" };
            input = input.beat(|b| b.runtime_state = state.into());
            let out = decide(&input, vec![]);
            assert!(
                !out.iter().any(|a| a.as_condition_clear().is_some()),
                "{out:?}"
            );
            events += out
                .iter()
                .filter(|a| matches!(&a.effect, Effect::RecordEvent(e) if e.event_type == "WORKSPACE_DEGRADED"))
                .count();
            input = carry(&input, NAME, &out, input.now_ms + 30_000);
        }
        assert_eq!(events, 1);
    }
}
"##;

const FIXTURE_DEGRADES: &str = r#"{
  "description": "an overloaded runtime puts the condition in force (the module's own actions; the host derives the status)",
  "input": {
    "event": { "heartbeat": { "runtime_state": "overloaded", "uptime_seconds": 60 } },
    "workspace": { "id": "ws-1", "kind": "workspace", "status": "online", "model_configured": true },
    "now_ms": 1782302400000
  },
  "expected": [
    {
      "workspace_id": "ws-1",
      "kind": "set_condition",
      "owner": "{{name}}",
      "name": "overloaded",
      "severity": "degraded",
      "reason": "runtime_overloaded",
      "message": "the runtime reports it is overloaded"
    },
    {
      "workspace_id": "ws-1",
      "kind": "set_marker",
      "owner": "{{name}}",
      "key": "last-overloaded-ms",
      "value": "1782302400000"
    },
    {
      "workspace_id": "ws-1",
      "kind": "record_event",
      "event_type": "WORKSPACE_DEGRADED",
      "payload_json": "{\"runtime_state\":\"overloaded\"}"
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

const FIXTURE_SEQUENCE: &str = r#"{
  "description": "overloaded for a minute, then calm: degraded once, held for two calm minutes, then online once",
  "workspace": { "id": "ws-1", "kind": "workspace", "status": "online", "model_configured": true },
  "markers": [],
  "steps": [
    {
      "event": { "heartbeat": { "runtime_state": "overloaded" } },
      "now_ms": 1782302400000,
      "repeat": 3,
      "every_ms": 30000,
      "expect_status": "degraded"
    },
    {
      "event": { "heartbeat": {} },
      "now_ms": 1782302490000,
      "repeat": 3,
      "every_ms": 30000,
      "expect_status": "degraded"
    },
    {
      "event": { "heartbeat": {} },
      "now_ms": 1782302580000,
      "expect_status": "online",
      "expected": [
        { "workspace_id": "ws-1", "kind": "clear_condition", "owner": "{{name}}", "name": "overloaded" },
        { "workspace_id": "ws-1", "kind": "clear_marker", "owner": "{{name}}", "key": "last-overloaded-ms" },
        { "workspace_id": "ws-1", "kind": "set_status", "to": "online", "expected": "degraded", "reason": "heartbeat", "message": null },
        { "workspace_id": "ws-1", "kind": "record_event", "event_type": "WORKSPACE_ONLINE", "payload_json": "{\"recovered_from\":\"degraded\"}" },
        { "workspace_id": "ws-1", "kind": "request_reconcile", "trigger": "online" }
      ]
    }
  ],
  "expect_transitions": 2
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

    #[test]
    fn the_sdk_path_is_relative_to_the_crate() {
        for (from, to, rel) in [
            (
                "/home/a/policies/busy",
                "/home/a/heartgate/policies/sdk",
                "../../heartgate/policies/sdk",
            ),
            (
                "/tmp/x/busy",
                "/work/hg/policies/sdk",
                "../../../work/hg/policies/sdk",
            ),
            ("/w/hg/policies/busy", "/w/hg/policies/sdk", "../sdk"),
            ("/w/busy", "/w/busy/vendor/sdk", "vendor/sdk"),
        ] {
            assert_eq!(
                relative(Path::new(from), Path::new(to)),
                Path::new(rel),
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn a_crate_on_a_path_sdk_names_it_relatively_and_a_versioned_one_by_version() {
        let dir = tempfile::tempdir().unwrap();
        let sdk = dir.path().join("checkout/policies/sdk");
        std::fs::create_dir_all(&sdk).unwrap();
        std::fs::write(sdk.join("Cargo.toml"), "").unwrap();
        let created = create(&dir.path().join("mine"), "p", &Sdk::Path(sdk.clone()), None).unwrap();
        assert_eq!(
            created.dependency,
            r#"heartgate-policy = { path = "../../checkout/policies/sdk" }"#
        );
        let manifest = std::fs::read_to_string(dir.path().join("mine/p/Cargo.toml")).unwrap();
        assert!(manifest.contains(&created.dependency), "{manifest}");

        let created = create(dir.path(), "q", &Sdk::Version("^0.2".into()), None).unwrap();
        assert_eq!(created.dependency, r#"heartgate-policy = "^0.2""#);
        let manifest = std::fs::read_to_string(dir.path().join("q/Cargo.toml")).unwrap();
        assert!(
            manifest.contains("\nheartgate-policy = \"^0.2\"\n"),
            "{manifest}"
        );
        let manifest: toml::Table = manifest.parse().unwrap();
        assert_eq!(
            manifest["dependencies"]["heartgate-policy"].as_str(),
            Some("^0.2")
        );

        for bad in ["", "0.1\"\nevil = 1", "0.1'"] {
            assert!(
                create(dir.path(), "r", &Sdk::Version(bad.into()), None).is_err(),
                "{bad}"
            );
        }
        assert!(!dir.path().join("r").exists());
    }

    /// The crate declares what its rule needs: the sample rule's grants by
    /// default, or exactly those given (once each), as `policy build` reads
    /// them.
    #[test]
    fn the_crate_declares_its_grants() {
        let dir = tempfile::tempdir().unwrap();
        let grants_of = |name: &str| {
            let manifest: toml::Table =
                std::fs::read_to_string(dir.path().join(name).join("Cargo.toml"))
                    .unwrap()
                    .parse()
                    .unwrap();
            let list = manifest["package"]["metadata"]["heartgate"]["grants"].clone();
            list.as_array()
                .unwrap()
                .iter()
                .map(|g| g.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        create(dir.path(), "sample", &Sdk::Version("0.1.0".into()), None).unwrap();
        assert_eq!(
            grants_of("sample"),
            ["conditions", "markers", "record_event"]
        );
        create(
            dir.path(),
            "told",
            &Sdk::Version("0.1.0".into()),
            Some(&[Grant::RecordEvent, Grant::Conditions, Grant::RecordEvent]),
        )
        .unwrap();
        assert_eq!(grants_of("told"), ["record_event", "conditions"]);
        create(dir.path(), "none", &Sdk::Version("0.1.0".into()), Some(&[])).unwrap();
        assert!(grants_of("none").is_empty());
    }

    #[test]
    fn without_a_checkout_the_default_sdk_is_the_published_one_of_this_version() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Sdk::default_at(&dir.path().join("gone")),
            Sdk::Version(SDK_VERSION.to_string())
        );
        std::fs::write(dir.path().join("Cargo.toml"), "").unwrap();
        assert_eq!(
            Sdk::default_at(dir.path()),
            Sdk::Path(dir.path().to_path_buf())
        );
    }

    #[test]
    fn rendered_fixtures_are_fixtures_of_the_named_policy() {
        let files = render(
            "x-pol",
            "heartgate-policy = { path = \"../sdk\" }",
            &SAMPLE_GRANTS,
        );
        let mut sequences = 0;
        for (rel, text) in &files {
            assert!(!text.contains("{{"), "{rel} has an unfilled placeholder");
            let Some(stem) = rel.strip_prefix("fixtures/") else {
                continue;
            };
            let fixture = crate::authoring::fixtures::parse(Path::new(stem), text)
                .unwrap_or_else(|e| panic!("{rel}: {e}"));
            sequences += usize::from(!fixture.steps.is_empty());
            if text.contains("\"owner\"") {
                assert!(text.contains("\"owner\": \"x-pol\""), "{rel}");
            }
        }
        assert_eq!(sequences, 1, "one sequence fixture");
        let rule = &files
            .iter()
            .find(|(rel, _)| *rel == "src/rule.rs")
            .unwrap()
            .1;
        assert!(rule.contains("pub const NAME: &str = \"x-pol\";"));
    }
}
