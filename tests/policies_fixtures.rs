//! Each compiled built-in policy, run by the real engine against the fixture
//! files in `policies/<name>/fixtures/`: input + proposed -> expected actions.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::Path;

use heartgate::authoring::fixtures;
use heartgate::chain::{BUILTIN, Chain};
use heartgate::engine::Engine;

#[test]
fn builtin_policies_pass_their_fixtures() {
    let engine = Engine::new().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut ran = 0;
    let mut failures = Vec::new();
    for (name, bytes) in BUILTIN {
        let module = engine.load(bytes).unwrap();
        let chain = Chain::single(name, module);
        let cases = fixtures::load_dir(&root.join(name).join("fixtures")).unwrap();
        let report = fixtures::run(&chain, &cases, false);
        if report.failed() > 0 {
            failures.push(format!("{name}:\n{}", report.render()));
        }
        ran += report.results.len();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(ran >= 60, "ran {ran} fixtures");
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
            "liveness",
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
