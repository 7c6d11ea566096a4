//! Each compiled built-in policy, run by the real engine against the fixture
//! files in `policies/<name>/fixtures/`: input + proposed -> expected actions.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::Path;

use heartgate::chain::BUILTIN;
use heartgate::engine::{Engine, Limits};
use heartgate::model::{Action, Input};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    input: Input,
    #[serde(default)]
    proposed: Vec<Action>,
    expected: Vec<Action>,
}

#[test]
fn builtin_policies_pass_their_fixtures() {
    let engine = Engine::new().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut ran = 0;
    let mut failures = Vec::new();
    for (name, bytes) in BUILTIN {
        let module = engine.load(bytes).unwrap();
        let dir = root.join(name).join("fixtures");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name} has no fixtures");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let fx: Fixture =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let got = module
                .evaluate(&fx.input, &fx.proposed, Limits::default())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if got != fx.expected {
                failures.push(format!(
                    "{}:\n  expected {}\n  actual   {}",
                    file.display(),
                    serde_json::to_string(&fx.expected).unwrap(),
                    serde_json::to_string(&got).unwrap()
                ));
            }
            ran += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(ran >= 11, "ran {ran} fixtures");
}

#[test]
fn builtin_policies_report_their_metadata() {
    let engine = Engine::new().unwrap();
    let names: Vec<_> = BUILTIN
        .iter()
        .map(|(_, b)| engine.load(b).unwrap().metadata().name.clone())
        .collect();
    assert_eq!(
        names,
        [
            "rca2970-gate",
            "status-rules",
            "mcp-recovery-trigger",
            "recovery-cooldown"
        ]
    );
}

#[test]
fn a_core_module_or_garbage_is_refused() {
    let engine = Engine::new().unwrap();
    assert!(engine.load(b"not wasm").is_err());
    // A bare core module (magic + version 1) is not a component.
    assert!(engine.load(b"\0asm\x01\0\0\0").is_err());
}
