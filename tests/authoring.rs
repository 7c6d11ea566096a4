//! The policy author's tools, run as an author runs them: the `heartgate`
//! binary as a child process, cargo building a real policy crate, real
//! compiled components, and a decision log recorded by the real service.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;
#[path = "readme.rs"]
mod readme;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

use common::{MINUTE_MS, Service};
use heartgate::clock::{Clock, ManualClock, SystemClock};
use heartgate::model::WorkspaceKind;

const HEARTGATE: &str = env!("CARGO_BIN_EXE_heartgate");
const GUESTS: &str = env!("HEARTGATE_TEST_GUESTS_DIR");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The target directory of the policy crates these tests build: shared
/// between runs and tests so a rerun does not compile the SDK's dependencies
/// again, and under the target directory cargo builds this test in
/// (`CARGO_TARGET_DIR` when set), never inside the checkout otherwise.
fn policy_target() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("author-guide")
}

/// `heartgate ARGS` in `dir`.
fn heartgate(dir: &Path, args: &[&str]) -> Output {
    Command::new(HEARTGATE)
        .current_dir(dir)
        .args(args)
        .env_remove("HEARTGATE_DB")
        .env_remove("HEARTGATE_ADMIN_TOKEN")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// The author's guide, followed literally

/// One step of `policies/README.md`.
#[derive(Debug)]
enum Step {
    /// A code block with `file=PATH`: write it.
    Write { path: String, body: String },
    /// A `$ command` of an `sh` block, with the output lines shown under it
    /// (each must appear in the output) and whether the block says `fails`.
    Run {
        command: String,
        expect: Vec<String>,
        fails: bool,
    },
}

/// A fenced code block of a Markdown file.
struct Block<'a> {
    /// The `## ` heading it is under ("" before the first).
    section: &'a str,
    /// The words after the opening fence (`sh`, `norun`, `file=PATH`, ...).
    words: Vec<&'a str>,
    body: Vec<&'a str>,
}

/// Every fenced block of `markdown`, in order, but those marked `norun`.
fn runnable_blocks(markdown: &str) -> Vec<Block<'_>> {
    let mut blocks = Vec::new();
    let mut section = "";
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        if let Some(title) = line.strip_prefix("## ") {
            section = title;
            continue;
        }
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let words: Vec<&str> = info.split_whitespace().collect();
        let body = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        if !words.contains(&"norun") {
            blocks.push(Block {
                section,
                words,
                body,
            });
        }
    }
    blocks
}

/// The guide's steps, in order: blocks marked `norun` are skipped, blocks
/// without `file=` that are not `sh` are prose.
fn guide_steps(markdown: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    for Block { words, body, .. } in runnable_blocks(markdown) {
        if let Some(path) = words.iter().find_map(|w| w.strip_prefix("file=")) {
            steps.push(Step::Write {
                path: path.to_string(),
                body: body.join("\n") + "\n",
            });
        } else if words.first() == Some(&"sh") {
            let fails = words.contains(&"fails");
            for l in body {
                if let Some(command) = l.strip_prefix("$ ") {
                    steps.push(Step::Run {
                        command: command.to_string(),
                        expect: Vec::new(),
                        fails,
                    });
                } else if let Some(Step::Run { expect, .. }) = steps.last_mut()
                    && !l.trim().is_empty()
                {
                    expect.push(l.trim().to_string());
                }
            }
        }
    }
    steps
}

#[test]
fn author_guide_followed_literally() {
    let guide = std::fs::read_to_string(repo().join("policies/README.md")).unwrap();
    let steps = guide_steps(&guide);
    assert!(steps.len() >= 15, "the guide has {} steps", steps.len());

    let home = tempfile::tempdir().unwrap();
    let mut cwd = home.path().to_path_buf();
    let bin_dir = Path::new(HEARTGATE).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The guide's commands are unchanged by where cargo puts its output.
    let target = policy_target();

    let (mut wrote, mut ran, mut failed_as_told) = (0, 0, 0);
    for step in &steps {
        match step {
            Step::Write { path, body } => {
                let file = cwd.join(path);
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, body).unwrap();
                wrote += 1;
            }
            Step::Run {
                command,
                expect,
                fails,
            } => {
                if let Some(dir) = command.strip_prefix("cd ") {
                    cwd = cwd.join(dir);
                    assert!(cwd.is_dir(), "`{command}`: no directory {}", cwd.display());
                    continue;
                }
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(command)
                    .current_dir(&cwd)
                    .env("PATH", &path)
                    .env("CARGO_TARGET_DIR", &target)
                    .env_remove("HEARTGATE_DB")
                    .env_remove("CARGO_MANIFEST_DIR")
                    .output()
                    .unwrap();
                let all = text(&out);
                assert_eq!(
                    out.status.success(),
                    !fails,
                    "`{command}` in {}: exit {:?}, the guide says it {}:\n{all}",
                    cwd.display(),
                    out.status.code(),
                    if *fails { "fails" } else { "succeeds" }
                );
                for line in expect {
                    assert!(
                        all.contains(line.as_str()),
                        "`{command}`: the guide shows `{line}`, the output is:\n{all}"
                    );
                }
                ran += 1;
                failed_as_told += usize::from(*fails);
            }
        }
    }
    // The walkthrough did what it claims: the template, native tests, a
    // build, a failing then passing fixture run, and a chain.
    assert!(
        wrote >= 6 && ran >= 8,
        "wrote {wrote} files, ran {ran} commands"
    );
    assert_eq!(failed_as_told, 1, "the deliberately failing fixture run");
    assert!(cwd.join("busy-degrade.wasm").is_file());
}

// ---------------------------------------------------------------------------
// The fixture runner

#[test]
fn builtin_fixture_sets_pass_through_the_runner() {
    let root = repo();
    let mut total = 0;
    for (dir, component) in [
        ("gate", "gate"),
        ("status-rules", "status_rules"),
        ("liveness", "liveness"),
        ("recovery-trigger", "recovery_trigger"),
        ("cooldown", "cooldown"),
    ] {
        let module = format!("{GUESTS}/{component}.wasm");
        let fixtures = root.join("policies").join(dir).join("fixtures");
        let out = heartgate(
            &root,
            &[
                "policy",
                "test",
                &module,
                "--fixtures",
                fixtures.to_str().unwrap(),
            ],
        );
        let all = text(&out);
        assert!(out.status.success(), "{dir}:\n{all}");
        let summary = all
            .lines()
            .find(|l| l.starts_with("test result: ok. "))
            .unwrap_or_else(|| panic!("{dir}: no summary:\n{all}"));
        let passed: usize = summary["test result: ok. ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(summary.contains(&format!("{passed} passed, 0 failed")));
        assert!(passed >= 10, "{dir}: only {passed} fixtures");
        total += passed;
    }
    assert!(total >= 60, "{total} fixtures in all");
}

/// A scratch directory with `fixtures/` holding `files`.
fn fixture_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("fixtures")).unwrap();
    for (name, body) in files {
        std::fs::write(dir.path().join("fixtures").join(name), body).unwrap();
    }
    dir
}

const ONLINE_HEARTBEAT: &str = r#""input": {"event": {"heartbeat": {}}, "workspace": {"id": "ws-1", "kind": "workspace", "status": "online", "model_configured": true}, "now_ms": 0}"#;

#[test]
fn bad_fixtures_fail_by_name_with_the_reason_and_the_rest_still_run() {
    let good = format!(r#"{{{ONLINE_HEARTBEAT}, "expected": []}}"#);
    let typo = format!(r#"{{{ONLINE_HEARTBEAT}, "expect": []}}"#);
    let both = format!(r#"{{{ONLINE_HEARTBEAT}, "expected": [], "expected_error": {{}}}}"#);
    let dir = fixture_dir(&[
        ("a_good.json", &good),
        ("b_typo.json", &typo),
        ("c_not_json.json", "{\"input\": "),
        ("d_both.json", &both),
        ("e_bad.yaml", "input: [unclosed"),
        ("notes.txt", "not a fixture"),
    ]);
    let out = heartgate(
        dir.path(),
        &["policy", "test", &format!("{GUESTS}/gate.wasm")],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("fixture a_good ... ok"), "{all}");
    assert!(all.contains("fixture b_typo ... FAILED"), "{all}");
    assert!(all.contains("unknown field `expect`"), "{all}");
    assert!(all.contains("fixture c_not_json ... FAILED"), "{all}");
    assert!(all.contains("not both"), "{all}");
    assert!(all.contains("fixture e_bad ... FAILED"), "{all}");
    assert!(!all.contains("notes"), "{all}");
    assert!(
        all.contains("test result: FAILED. 1 passed, 4 failed"),
        "{all}"
    );
}

#[test]
fn expected_errors_match_the_sandbox_outcome() {
    let trap = format!(r#"{{{ONLINE_HEARTBEAT}, "expected_error": {{"kind": "trap"}}}}"#);
    let wrong_kind = format!(r#"{{{ONLINE_HEARTBEAT}, "expected_error": {{"kind": "timeout"}}}}"#);
    let dir = fixture_dir(&[("traps.json", &trap), ("times_out.json", &wrong_kind)]);
    let out = heartgate(
        dir.path(),
        &["policy", "test", &format!("{GUESTS}/always_trap.wasm")],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("fixture traps ... ok"), "{all}");
    assert!(all.contains("fixture times_out ... FAILED"), "{all}");
    assert!(all.contains("- expected: timeout"), "{all}");
    assert!(all.contains("+ actual:   trap"), "{all}");

    // A policy that never returns is stopped by the same deadline as in the
    // service, and the runner reports it rather than hanging.
    let looping = format!(r#"{{{ONLINE_HEARTBEAT}, "expected_error": {{"kind": "timeout"}}}}"#);
    let dir = fixture_dir(&[("loops.json", &looping)]);
    let out = heartgate(
        dir.path(),
        &["policy", "test", &format!("{GUESTS}/always_loop.wasm")],
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_refused_module_or_missing_fixtures_is_a_clear_error() {
    let dir = fixture_dir(&[]);
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm but not really").unwrap();
    let out = heartgate(dir.path(), &["policy", "test", garbage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("loading module"), "{}", text(&out));

    let out = heartgate(
        dir.path(),
        &["policy", "test", &format!("{GUESTS}/wasi_user.wasm")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("loading module"), "{}", text(&out));

    let out = heartgate(
        dir.path(),
        &["policy", "test", &format!("{GUESTS}/gate.wasm")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no fixtures"), "{}", text(&out));

    let out = heartgate(
        dir.path(),
        &["policy", "test", "builtin:nope", "--fixtures", "."],
    );
    assert!(
        text(&out).contains("no built-in module `nope`"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_chain_file_runs_fixtures_through_every_slot() {
    let dir = fixture_dir(&[]);
    // The gate fails an MCP-missing concierge; the whole chain adds the
    // recovery request and the cooldown stamps its fire time.
    let fixture = json!({
        "input": {
            "event": {"heartbeat": {"mcp_server_present": false}},
            "workspace": {"id": "c", "kind": "platform", "status": "online", "model_configured": true},
            "now_ms": 1000
        }
    });
    let out = heartgate(
        dir.path(),
        &[
            "policy",
            "eval",
            "--chain",
            repo()
                .join("deploy/heartgate.example.toml")
                .to_str()
                .unwrap(),
            "--input",
            "/dev/null",
        ],
    );
    // The example config has no active chain section: a clear error.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no chain"), "{}", text(&out));

    std::fs::write(
        dir.path().join("chain.toml"),
        format!(
            "[[slot]]\nname = \"gate\"\nmodule = \"builtin:gate\"\n\
             [[slot]]\nname = \"recovery-trigger\"\nmodule = \"builtin:recovery-trigger\"\n\
             [[slot]]\nname = \"cooldown\"\nmodule = \"{GUESTS}/cooldown.wasm\"\ngrants = [\"markers\", \"drop\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("input.json"),
        serde_json::to_string(&fixture["input"]).unwrap(),
    )
    .unwrap();
    let out = heartgate(
        dir.path(),
        &[
            "policy",
            "eval",
            "--chain",
            "chain.toml",
            "--input",
            "input.json",
            "--trace",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    // The gate states its condition; the host derives the status from it
    // once the chain has run (contract 0.2.0).
    assert_eq!(
        kinds,
        [
            "set_condition",
            "record_event",
            "set_marker",
            "request_reconcile",
            "set_status"
        ]
    );
    let steps = v["trace"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[2]["slot"], "cooldown");
    assert_eq!(steps[2]["proposed"].as_array().unwrap().len(), 3);

    // The cooldown slot swapped for the one-minute candidate with --slot,
    // and a whole-chain fixture may not give `proposed`.
    let mut expected = fixture.clone();
    expected["expected"] = v["actions"].clone();
    let mut with_proposed = expected.clone();
    with_proposed["proposed"] = json!([]);
    with_proposed["proposed"]
        .as_array_mut()
        .unwrap()
        .push(v["actions"][0].clone());
    std::fs::write(
        dir.path().join("fixtures/concierge_recovers.json"),
        expected.to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("fixtures/gives_proposed.json"),
        with_proposed.to_string(),
    )
    .unwrap();
    let out = heartgate(
        dir.path(),
        &[
            "policy",
            "test",
            &format!("{GUESTS}/cooldown_1m.wasm"),
            "--chain",
            "chain.toml",
            "--slot",
            "cooldown",
        ],
    );
    let all = text(&out);
    assert!(all.contains("fixture concierge_recovers ... ok"), "{all}");
    assert!(all.contains("fixture gives_proposed ... FAILED"), "{all}");
    assert!(
        all.contains("a chain starts with no proposed actions"),
        "{all}"
    );
    assert!(all.contains("1 passed, 1 failed"), "{all}");

    let out = heartgate(
        dir.path(),
        &[
            "policy",
            "test",
            "--chain",
            "chain.toml",
            "--slot",
            "nope",
            &format!("{GUESTS}/gate.wasm"),
        ],
    );
    assert!(text(&out).contains("has no slot `nope`"), "{}", text(&out));
}

#[test]
fn policy_new_refuses_bad_names_and_existing_directories() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["Busy", "../escape", "a_b", "-x"] {
        let out = heartgate(dir.path(), &["policy", "new", bad]);
        assert!(!out.status.success(), "{bad} was accepted");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let out = heartgate(dir.path(), &["policy", "new", "ok-name"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = heartgate(dir.path(), &["policy", "new", "ok-name"]);
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    let out = heartgate(
        dir.path(),
        &["policy", "new", "other", "--sdk", "/nonexistent"],
    );
    assert!(text(&out).contains("--sdk"), "{}", text(&out));
    let out = heartgate(dir.path(), &["policy", "build", "/nonexistent"]);
    assert!(text(&out).contains("has no Cargo.toml"), "{}", text(&out));
}

/// The SDK carries its own copy of the contract (so it builds from a
/// registry, with no `../../wit`): it must be the contract.
#[test]
fn sdk_wit_is_the_contract() {
    let copy = repo().join("policies/sdk/wit");
    let mut files: Vec<String> = std::fs::read_dir(&copy)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["policy.wit"], "the SDK builds contract 0.2.0 only");
    for file in &files {
        let ours = std::fs::read_to_string(copy.join(file)).unwrap();
        let contract = std::fs::read_to_string(repo().join("wit").join(file)).unwrap();
        assert!(
            ours == contract,
            "policies/sdk/wit/{file} differs from wit/{file}: copy the contract into the SDK \
             (cp wit/{file} policies/sdk/wit/{file})"
        );
    }
}

/// `cargo` as cargo runs this test with.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The SDK as `cargo package` makes it (what a registry would serve: its own
/// files only, the workspace's settings written into its manifest), its
/// policy crate created beside it, both moved elsewhere: the crate builds
/// there, because it names the SDK by a relative path and the SDK needs
/// nothing outside itself.
#[test]
fn a_policy_crate_and_its_sdk_build_after_moving_together() {
    let scratch = tempfile::tempdir().unwrap();
    let out = cargo()
        .current_dir(repo())
        .args([
            "package",
            "-p",
            "heartgate-policy",
            "--no-verify",
            "--allow-dirty",
            "--offline",
        ])
        .arg("--target-dir")
        .arg(scratch.path().join("package"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let packaged = scratch.path().join(format!(
        "package/package/heartgate-policy-{}.crate",
        env!("CARGO_PKG_VERSION")
    ));
    let before = scratch.path().join("before");
    std::fs::create_dir(&before).unwrap();
    let archive = std::fs::File::open(&packaged).unwrap();
    tar::Archive::new(flate2::read::GzDecoder::new(archive))
        .unpack(before.join("vendor"))
        .unwrap();
    let sdk = before
        .join("vendor")
        .join(format!("heartgate-policy-{}", env!("CARGO_PKG_VERSION")));
    assert!(
        sdk.join("wit/policy.wit").is_file(),
        "the package holds the contract"
    );

    let out = heartgate(
        &before,
        &[
            "policy",
            "new",
            "mover",
            "--dir",
            "policies",
            "--sdk",
            sdk.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let dependency = format!(
        "heartgate-policy = {{ path = \"../../vendor/heartgate-policy-{}\" }}",
        env!("CARGO_PKG_VERSION")
    );
    let manifest = std::fs::read_to_string(before.join("policies/mover/Cargo.toml")).unwrap();
    assert!(manifest.contains(&dependency), "{manifest}");
    assert!(
        text(&out).contains(&format!("its SDK: {dependency}")),
        "{}",
        text(&out)
    );

    let after = scratch.path().join("after");
    std::fs::rename(&before, &after).unwrap();
    let krate = after.join("policies/mover");
    let out = Command::new(HEARTGATE)
        .current_dir(&krate)
        .args(["policy", "build"])
        .env("CARGO_TARGET_DIR", policy_target())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = heartgate(&krate, &["policy", "test", "mover.wasm"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("3 passed, 0 failed"), "{}", text(&out));
}

#[test]
fn policy_new_writes_a_versioned_sdk_dependency_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let out = heartgate(
        dir.path(),
        &["policy", "new", "pinned", "--sdk-version", "0.1.0"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let manifest = std::fs::read_to_string(dir.path().join("pinned/Cargo.toml")).unwrap();
    assert!(
        manifest.contains("\nheartgate-policy = \"0.1.0\"\n"),
        "{manifest}"
    );
    assert!(!manifest.contains("path ="), "{manifest}");

    // The checkout's SDK by default, by a relative path.
    let out = heartgate(dir.path(), &["policy", "new", "local"]);
    assert!(out.status.success(), "{}", text(&out));
    let manifest = std::fs::read_to_string(dir.path().join("local/Cargo.toml")).unwrap();
    let line = manifest
        .lines()
        .find(|l| l.starts_with("heartgate-policy = "))
        .unwrap();
    let path = line
        .strip_prefix("heartgate-policy = { path = \"")
        .and_then(|l| l.strip_suffix("\" }"))
        .unwrap_or_else(|| panic!("{line}"));
    assert!(path.starts_with("../"), "{line}");
    assert_eq!(
        std::fs::canonicalize(dir.path().join("local").join(path)).unwrap(),
        std::fs::canonicalize(repo().join("policies/sdk")).unwrap()
    );

    let out = heartgate(
        dir.path(),
        &[
            "policy",
            "new",
            "both",
            "--sdk-version",
            "0.1.0",
            "--sdk",
            ".",
        ],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("cannot be used with"), "{}", text(&out));
    let out = heartgate(
        dir.path(),
        &["policy", "new", "bad", "--sdk-version", "0.1\""],
    );
    assert!(
        text(&out).contains("is not a version requirement"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("both").exists() && !dir.path().join("bad").exists());
}

// ---------------------------------------------------------------------------
// Replay

/// An MCP-missing heartbeat of a platform workspace.
fn mcp_missing(id: &str) -> Value {
    json!({"workspace_id": id, "uptime_seconds": 60, "mcp_server_present": false})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reports_changed_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    // Recorded half an hour ago, so `--since` can include and exclude it.
    let t0 = SystemClock.now_ms() - 30 * MINUTE_MS;
    let clock = ManualClock::at(t0);
    let svc = Service::start(&db, clock.clone()).await;
    let concierge = svc.provision("concierge", WorkspaceKind::Platform, true);
    svc.force_status("concierge", "online");
    let worker = svc.provision("worker", WorkspaceKind::Workspace, true);
    svc.force_status("worker", "online");

    // The concierge boots without its MCP: a heartbeat every two minutes.
    // With the five-minute cooldown the recovery fires at 0 and 6 minutes.
    let mut at = Vec::new();
    for minute in [0, 2, 4, 6] {
        clock.set(t0 + minute * MINUTE_MS);
        let (status, _) = svc.heartbeat(&concierge, mcp_missing("concierge")).await;
        assert_eq!(status, 200);
        at.push(t0 + minute * MINUTE_MS);
        let (status, _) = svc
            .heartbeat(
                &worker,
                json!({"workspace_id": "worker", "uptime_seconds": 60}),
            )
            .await;
        assert_eq!(status, 200);
    }
    assert_eq!(svc.runs("concierge", "mcp-recovery"), 2);
    svc.stop().await;

    // A candidate cooldown of one minute would have fired at 2 and 4 too.
    let candidate = format!("{GUESTS}/cooldown_1m.wasm");
    let run = |db: &Path, candidate: &str, extra: &[&str]| {
        let mut args = vec![
            "policy",
            "replay",
            "--db",
            db.to_str().unwrap(),
            "--candidate",
            candidate,
        ];
        args.extend_from_slice(extra);
        heartgate(dir.path(), &args)
    };
    let replay = |extra: &[&str]| {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let out = run(&db, &candidate, &args);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let report = replay(&["--slot", "cooldown"]);
    // Two minutes apart: no heartbeat was coalesced, every one is replayed.
    assert_eq!(report["recorded"], 8, "{report:#}");
    assert_eq!(report["replayed"], 8, "{report:#}");
    assert_eq!(report["not_replayed"], 0, "{report:#}");
    assert_eq!(report["skipped"], json!([]));
    let changed = report["changed"].as_array().unwrap();
    let changed_at: Vec<i64> = changed
        .iter()
        .map(|c| c["at_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(changed_at, [at[1], at[2]], "{report:#}");
    for c in changed {
        assert_eq!(c["workspace_id"], "concierge");
        assert_eq!(c["baseline"], "reproduces");
        assert_eq!(c["evaluations"], 1);
        let fires = |v: &Value| {
            v["actions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["kind"] == "request_reconcile" && a["trigger"] == "mcp-recovery")
        };
        assert!(!fires(&c["recorded"]) && fires(&c["candidate"]), "{c:#}");
    }
    assert_eq!(report["unchanged"], 6);

    // The built-in cooldown as the candidate changes nothing.
    let out = run(
        &db,
        "builtin:cooldown",
        &["--slot", "cooldown", "--fail-on-change"],
    );
    let same = text(&out);
    assert!(out.status.success(), "{same}");
    assert!(
        same.contains(
            "replayed 8 of 8 recorded evaluations (8 decisions: all the log keeps, from "
        ) && same.contains("0 would change, 8 unchanged, 0 not replayed\n"),
        "{same}"
    );

    // --since: the last hour holds them all, the last ten minutes none.
    assert_eq!(
        replay(&["--slot", "cooldown", "--since", "1h"])["replayed"],
        8
    );
    assert_eq!(
        replay(&["--slot", "cooldown", "--since", "10m"])["replayed"],
        0
    );

    // Human output, and the CI gate's exit code.
    let out = run(&db, &candidate, &["--slot", "cooldown", "--fail-on-change"]);
    assert_eq!(out.status.code(), Some(1));
    let all = text(&out);
    assert!(
        all.contains("2 would change, 6 unchanged, 0 not replayed\n"),
        "{all}"
    );
    assert!(all.contains("(concierge heartbeat at "), "{all}");

    // A slot the recorded chain lacks: every decision skipped, with why.
    let report = replay(&["--slot", "nope"]);
    assert_eq!(report["replayed"], 0);
    assert_eq!(report["not_replayed"], 8);
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 8);
    assert_eq!(skipped[0]["evaluations"], 1);
    let reason = skipped[0]["reason"].as_str().unwrap();
    assert!(reason.contains("no slot `nope`"), "{reason}");

    // Bad input: no database, a bad duration, a module that is not one.
    let missing = dir.path().join("missing.db");
    let out = run(&missing, &candidate, &["--slot", "cooldown"]);
    assert!(text(&out).contains("no database at"), "{}", text(&out));
    assert!(!missing.exists(), "replay must not create a database");
    let out = run(
        &db,
        &candidate,
        &["--slot", "cooldown", "--since", "yesterday"],
    );
    assert!(text(&out).contains("is not a duration"), "{}", text(&out));
    let out = run(&db, db.to_str().unwrap(), &["--slot", "cooldown"]);
    assert!(text(&out).contains("loading module"), "{}", text(&out));
}

/// Reconciles are only queued here; nothing is delivered.
struct NoDelivery;

impl heartgate::deliverer::Deliverer for NoDelivery {
    fn queued(&self, _runs: &[heartgate::store::QueuedRun]) {}
}

/// A chain file: the built-in chain with a slot `busy` after the liveness
/// slot running `busy` with its conditions and events granted (the guide's
/// chain file), and `cooldown` (a built-in, or a file granted what the
/// built-in is) in the cooldown slot.
fn chain_file(busy: &str, cooldown: &str) -> String {
    let slot = |name: &str, module: &str, grants: &str| {
        let grants = if module.starts_with("builtin:") {
            String::new()
        } else {
            format!("grants = [{grants}]\n")
        };
        format!("[[slot]]\nname = \"{name}\"\nmodule = \"{module}\"\n{grants}\n")
    };
    [
        slot("gate", "builtin:gate", ""),
        slot("status-rules", "builtin:status-rules", ""),
        slot("liveness", "builtin:liveness", ""),
        slot("busy", busy, r#""conditions", "record_event""#),
        slot("recovery-trigger", "builtin:recovery-trigger", ""),
        slot("cooldown", cooldown, r#""markers", "drop""#),
    ]
    .concat()
}

/// A coalesced decision row stands for several heartbeats but keeps only
/// the last one's input: replay replays that one, counts the others as not
/// replayed (coalesced), and says so, with exact counts of evaluations; and
/// it says a change is reproduced, or not, by the recorded chain only when
/// it ran the recorded chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_counts_coalesced_heartbeats() {
    use heartgate::executor::{Executor, HeartbeatRequest};
    use heartgate::model::{HeartbeatEvent, Status};
    use heartgate::store::{NewWorkspace, SqliteStore, Store};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
    // Recorded half an hour ago, so `--since` can include and exclude it.
    let t0 = SystemClock.now_ms() - 30 * MINUTE_MS;
    let clock = ManualClock::at(t0);
    store
        .add_workspace(
            &NewWorkspace {
                id: "ws".into(),
                name: String::new(),
                kind: WorkspaceKind::Workspace,
                model_configured: true,
                runtime: String::new(),
            },
            t0,
        )
        .unwrap();
    store.set_status("ws", Status::Online, t0).unwrap();
    let token = heartgate::auth::mint().unwrap();
    store.issue_token("ws", &token.stored, t0).unwrap();
    // As in the service: the built-in chain, and a liveness-only verdict
    // acknowledged once queued; the writer coalesces those of a workspace
    // less than 250 ms apart into the last one's row.
    let engine = heartgate::engine::Engine::new().unwrap();
    let executor = Arc::new(Executor::new(
        store.clone(),
        heartgate::chain::Chain::builtin(&engine).unwrap(),
        Arc::new(clock.clone()),
        Arc::new(NoDelivery),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let retrier = tokio::spawn(executor.acknowledge_when_queued(async {
        let _ = stopped.await;
    }));

    // (seconds after t0, active tasks, heartbeats): each burst at one
    // instant of the service's clock, written (flushed) before the next.
    // The candidate holds a workspace of 50 tasks or more back.
    let plan = [(0, 80, 3), (30, 5, 1), (60, 5, 4), (90, 80, 1)];
    for (secs, tasks, burst) in plan {
        clock.set(t0 + secs * 1000);
        for _ in 0..burst {
            let event = HeartbeatEvent {
                active_tasks: tasks,
                uptime_seconds: 60,
                ..HeartbeatEvent::default()
            };
            let req = HeartbeatRequest::new("ws", Some(token.plaintext.clone()), event);
            let ack = executor.heartbeat_acknowledged(&req).await.unwrap();
            assert!(
                !ack.committed,
                "a liveness-only heartbeat is held: {}",
                ack.verdict
            );
        }
        store.flush();
    }
    let _ = stop.send(());
    retrier.await.unwrap();
    let rows = store.decisions("ws", 100).unwrap();
    let shape: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.heartbeats,
                r.input["event"]["heartbeat"]["active_tasks"]
                    .as_i64()
                    .unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [(3, 80), (1, 5), (4, 5), (1, 80)],
        "the log as planned"
    );
    drop(executor);
    drop(store);

    let replay = |extra: &[&str]| {
        let candidate = format!("{GUESTS}/hold_busy.wasm");
        let mut args = vec![
            "policy",
            "replay",
            "--db",
            db.to_str().unwrap(),
            "--candidate",
            &candidate,
            "--slot",
            "busy",
        ];
        args.extend_from_slice(extra);
        heartgate(dir.path(), &args)
    };
    let json_of = |out: Output| -> Value {
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let baselines = |report: &Value| -> Vec<String> {
        report["changed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["baseline"].as_str().unwrap().to_string())
            .collect()
    };
    let hold_busy = format!("{GUESTS}/hold_busy.wasm");
    let hold_maintenance = format!("{GUESTS}/hold_maintenance.wasm");
    let cooldown_1m = format!("{GUESTS}/cooldown_1m.wasm");
    for (file, busy, cooldown) in [
        ("new-slot.toml", hold_busy.as_str(), "builtin:cooldown"),
        ("other.toml", hold_maintenance.as_str(), "builtin:cooldown"),
        ("mixed.toml", hold_busy.as_str(), cooldown_1m.as_str()),
    ] {
        std::fs::write(dir.path().join(file), chain_file(busy, cooldown)).unwrap();
    }

    // The guide's way of replaying a new slot: a chain file that is the
    // recorded chain with the slot added, running the candidate. Nine
    // evaluations, four kept inputs: each is replayed once; the five
    // heartbeats whose inputs were coalesced away are not, and are said not
    // to be. Without the slot the file is the recorded chain, which run
    // again reproduces each recorded verdict.
    let report = json_of(replay(&["--chain", "new-slot.toml", "--json"]));
    assert_eq!(report["recorded"], 9, "{report:#}");
    assert_eq!(report["decisions"], 4, "{report:#}");
    assert_eq!(report["replayed"], 4, "{report:#}");
    assert_eq!(report["unchanged"], 2, "{report:#}");
    assert_eq!(report["not_replayed"], 5, "{report:#}");
    assert_eq!(report["coalesced"], 5, "{report:#}");
    assert_eq!(report["coalesced_decisions"], 2, "{report:#}");
    assert_eq!(report["skipped"], json!([]), "{report:#}");
    assert_eq!(report["since"], Value::Null, "{report:#}");
    assert_eq!(
        report["first_at"],
        heartgate::clock::rfc3339(t0),
        "{report:#}"
    );
    let changed: Vec<(i64, i64)> = report["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["at_ms"].as_i64().unwrap(),
                c["evaluations"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(changed, [(t0, 3), (t0 + 90_000, 1)], "{report:#}");
    assert_eq!(baselines(&report), ["reproduces", "reproduces"]);

    let out = replay(&["--chain", "new-slot.toml"]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains(&format!(
            "replayed 4 of 9 recorded evaluations (4 decisions: all the log keeps, from {})",
            heartgate::clock::rfc3339(t0)
        )),
        "{all}"
    );
    assert!(!all.contains("1970"), "{all}");
    assert!(
        all.contains("2 would change, 2 unchanged, 5 not replayed (coalesced: 5)\n"),
        "{all}"
    );
    assert!(
        all.contains(
            "  coalesced 5: 2 decisions stand for 7 heartbeats but each keeps only the last one's input, \
             which was replayed"
        ),
        "{all}"
    );
    assert!(
        all.contains(", the last of 3 coalesced heartbeats: only its input is kept)"),
        "{all}"
    );
    assert!(
        !all.contains("reproduce") && !all.contains("note:"),
        "{all}"
    );

    // --since: the last hour holds them all, the last ten minutes none.
    let out = replay(&["--chain", "new-slot.toml", "--since", "1h"]);
    assert!(
        text(&out).contains("replayed 4 of 9 recorded evaluations (4 decisions since "),
        "{}",
        text(&out)
    );
    let out = replay(&["--chain", "new-slot.toml", "--since", "10m"]);
    assert!(
        text(&out).contains("replayed 0 of 0 recorded evaluations (0 decisions since "),
        "{}",
        text(&out)
    );

    // A chain file that is not the recorded chain, with its own module in
    // the slot: that module is what the candidate is compared with.
    let report = json_of(replay(&["--chain", "other.toml", "--json"]));
    assert_eq!(
        (&report["replayed"], &report["not_replayed"]),
        (&json!(4), &json!(5))
    );
    assert_eq!(baselines(&report), ["file_reproduces", "file_reproduces"]);

    // A chain file running the candidate itself and changing another slot
    // too: there is no chain without the candidate to run, and no change is
    // said to be reproduced, or not, by one.
    let report = json_of(replay(&["--chain", "mixed.toml", "--json"]));
    assert_eq!(
        (&report["replayed"], &report["unchanged"]),
        (&json!(4), &json!(2)),
        "{report:#}"
    );
    assert_eq!(baselines(&report), ["not_run", "not_run"]);
    let all = text(&replay(&["--chain", "mixed.toml"]));
    assert!(
        all.contains("2 would change, 2 unchanged, 5 not replayed"),
        "{all}"
    );
    assert!(
        all.contains(
            "note: 2 changes were not compared with a run without the candidate: \
             the chain file runs the candidate itself in slot `busy`"
        ),
        "{all}"
    );
    assert!(!all.contains("[the "), "{all}");

    // Without a chain file the recorded chain has no slot `busy`: no
    // evaluation is replayed, each decision counted for all it stands for.
    let report = json_of(replay(&["--json"]));
    assert_eq!(
        (
            &report["recorded"],
            &report["replayed"],
            &report["not_replayed"],
            &report["coalesced"]
        ),
        (&json!(9), &json!(0), &json!(9), &json!(0)),
        "{report:#}"
    );
    let evaluations: Vec<i64> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["evaluations"].as_i64().unwrap())
        .collect();
    assert_eq!(evaluations, [3, 1, 4, 1], "{report:#}");
    let all = text(&replay(&[]));
    assert!(
        all.contains("0 would change, 0 unchanged, 9 not replayed (skipped: 9)\n"),
        "{all}"
    );
    assert!(
        all.contains("  skipped 9 evaluations (4 decisions): chain version "),
        "{all}"
    );
    assert!(all.contains("has no slot `busy`"), "{all}");
}

/// The guide's own policy, built from the guide's source, in the running
/// service after the status rules: 20 heartbeats over its threshold make one
/// transition, one event and no reconcile beyond the first online one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guide_example_does_not_flap() {
    let guide = std::fs::read_to_string(repo().join("policies/README.md")).unwrap();
    let home = tempfile::tempdir().unwrap();
    // As the guide creates it: declaring what its rule needs.
    let out = heartgate(
        home.path(),
        &[
            "policy",
            "new",
            "busy-degrade",
            "--grant",
            "conditions",
            "--grant",
            "record_event",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let krate = home.path().join("busy-degrade");
    // The guide's source files, as it last writes them.
    for step in guide_steps(&guide) {
        if let Step::Write { path, body } = step
            && path.starts_with("src/")
        {
            std::fs::write(krate.join(path), body).unwrap();
        }
    }
    let out = Command::new(HEARTGATE)
        .current_dir(&krate)
        .args(["policy", "build"])
        .env("CARGO_TARGET_DIR", policy_target())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let module = std::fs::read(krate.join("busy-degrade.wasm")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at(common::T0_MS);
    let svc = Service::start_admin(&dir.path().join("hg.db"), clock.clone()).await;
    let (status, pushed) = svc.admin("POST", "/admin/modules", module).await;
    assert_eq!(status, hyper::StatusCode::CREATED, "{pushed}");
    let (_, chain) = svc
        .get_as("/admin/chain", Some(common::ADMIN))
        .await
        .unwrap();
    let mut spec = chain["spec"].clone();
    let slots = spec["slot"].as_array_mut().unwrap();
    let at = slots
        .iter()
        .position(|s| s["name"] == "status-rules")
        .unwrap()
        + 1;
    slots.insert(
        at,
        json!({"name": "busy", "module": pushed["module"], "grants": ["conditions", "record_event"]}),
    );
    let (status, staged) = svc.admin("POST", "/admin/chains", spec.to_string()).await;
    assert_eq!(status, hyper::StatusCode::CREATED, "{staged}");
    let id = staged["id"].as_i64().unwrap();
    let (status, _) = svc
        .admin("POST", &format!("/admin/chains/{id}/activate"), "")
        .await;
    assert_eq!(status, hyper::StatusCode::OK);

    let token = svc.provision("ws-1", WorkspaceKind::Workspace, true);
    svc.heartbeat(&token, json!({"workspace_id": "ws-1"})).await;
    assert_eq!(svc.status("ws-1"), "online");
    for _ in 0..20 {
        clock.advance(30_000);
        let (status, _) = svc
            .heartbeat(&token, json!({"workspace_id": "ws-1", "active_tasks": 80}))
            .await;
        assert_eq!(status, hyper::StatusCode::OK);
        assert_eq!(svc.status("ws-1"), "degraded");
    }
    let history = heartgate::history::history(&*svc.store, "ws-1", 1000)
        .unwrap()
        .unwrap();
    let transitions: Vec<String> = history
        .entries
        .iter()
        .filter_map(|e| match e {
            heartgate::history::Entry::Transition { from, to, .. } => Some(format!("{from}->{to}")),
            _ => None,
        })
        .collect();
    assert_eq!(transitions, ["provisioning->online", "online->degraded"]);
    assert_eq!(svc.events("ws-1", "WORKSPACE_DEGRADED").len(), 1);
    assert_eq!(svc.events("ws-1", "WORKSPACE_ONLINE").len(), 1);
    assert_eq!(
        svc.runs("ws-1", "online"),
        1,
        "only the first online reconcile"
    );
    svc.stop().await;
}
