//! The README's walk-throughs, run in order as printed, in one shell
//! (`readme_followed_literally`): every `sh` block not marked `norun`, each
//! command as the README spells it, and every output line the README shows
//! under a command checked against what the command printed.
//!
//! One thing stands in for the reader's machine: `cargo run ... -- ARGS`
//! runs the binaries this test was built with (cargo does not build inside
//! a test), and `heartgate` is on `PATH` as after `cargo install`. The
//! "repository's root" is a scratch directory holding the built policy
//! components where the README says they are (`target/policies/components`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HEARTGATE: &str = env!("CARGO_BIN_EXE_heartgate");
const GUESTS: &str = env!("HEARTGATE_TEST_GUESTS_DIR");

/// How long the whole README may take (a few services, a simulated
/// recovery, a five-second TTL running out): far more than it needs.
const DEADLINE: Duration = Duration::from_secs(300);

/// One command of the README, with the lines it shows the command prints.
#[derive(Debug)]
struct Step {
    section: String,
    command: String,
    expect: Vec<String>,
    /// The README shows it failing (`# error: ...`).
    fails: bool,
}

/// What an output line of the README says, without its annotation (three
/// spaces and a parenthesis closing the line) and without `# `; `None` for
/// a line that only says "something" (`...`).
fn expected_line(comment: &str) -> Option<String> {
    let mut line = comment.trim_start_matches('#').trim().to_string();
    if line.ends_with(')')
        && let Some(at) = line.rfind("   (")
    {
        line.truncate(at);
    }
    let line = line.trim();
    (!line.is_empty() && line != "...").then(|| line.to_string())
}

/// The README's commands in order: lines of `sh` blocks (joined where they
/// end in `\`); `#` lines right under a command (no blank line between) are
/// what it prints, other `#` lines are prose.
fn readme_steps(markdown: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for super::Block {
        section,
        words,
        body,
    } in super::runnable_blocks(markdown)
    {
        if words.first() != Some(&"sh") {
            continue;
        }
        let mut under_command = false;
        let mut body = body.into_iter();
        while let Some(l) = body.next() {
            let t = l.trim();
            if t.is_empty() {
                under_command = false;
            } else if t.starts_with('#') {
                if under_command
                    && let Some(step) = steps.last_mut()
                    && let Some(expect) = expected_line(t)
                {
                    step.fails |= expect.starts_with("error:");
                    step.expect.push(expect);
                }
            } else {
                let mut command = l.to_string();
                while command.ends_with('\\') {
                    command.push('\n');
                    command.push_str(body.next().unwrap_or_default());
                }
                steps.push(Step {
                    section: section.to_string(),
                    command,
                    expect: Vec::new(),
                    fails: false,
                });
                under_command = true;
            }
        }
    }
    steps
}

/// Whether `line` shows what `pattern` says: its pieces between `...` (and
/// `<placeholders>`) in order, with runs of spaces counting as one.
fn shows(pattern: &str, line: &str) -> bool {
    let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut wild = String::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('<') {
        match rest[open..].find('>') {
            Some(close) => {
                wild.push_str(&rest[..open]);
                wild.push_str("...");
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    wild.push_str(rest);
    let line = squeeze(line);
    let mut at = 0;
    for piece in wild.split("...") {
        let piece = squeeze(piece);
        if piece.is_empty() {
            continue;
        }
        match line[at..].find(&piece) {
            Some(i) => at += i + piece.len(),
            None => return false,
        }
    }
    true
}

/// `cargo run [--release] [-q] [--manifest-path FILE] [--bin NAME] -- ARGS`
/// as the README writes it, running the binary already built.
fn cargo_stand_in(bin_dir: &Path) -> String {
    format!(
        r#"#!/bin/sh
# readme_followed_literally: the README's `cargo run`, with the binaries the test was built with.
[ "$1" = run ] || {{ echo "readme test: only 'cargo run' is stood in for, not: cargo $*" >&2; exit 2; }}
shift
bin=heartgate
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    --bin) bin=$2; shift 2 ;;
    --manifest-path) shift 2 ;;
    --release|-q) shift ;;
    *) echo "readme test: a cargo flag the stand-in does not know: $1" >&2; exit 2 ;;
  esac
done
exec "{}/$bin" "$@"
"#,
        bin_dir.display()
    )
}

/// The shell script: each step in a brace group (so `cd`, variables,
/// functions and background jobs carry over, as in a reader's shell), its
/// output and exit status kept, stopping at the first step that does not
/// exit as the README says.
fn script(steps: &[Step], out: &Path) -> String {
    let mut s = String::from("# the README's walk-throughs, step by step\n");
    for (i, step) in steps.iter().enumerate() {
        let check = if step.fails { "!=" } else { "=" };
        s.push_str(&format!(
            "{{ {}\n}} >'{dir}/{i}.out' 2>&1 </dev/null; rc=$?; echo $rc >'{dir}/{i}.rc'; [ $rc {check} 0 ] || exit 100\n",
            step.command,
            dir = out.display()
        ));
    }
    s
}

#[test]
fn readme_followed_literally() {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let steps = readme_steps(&std::fs::read_to_string(readme).unwrap());
    let sections: std::collections::BTreeSet<&str> =
        steps.iter().map(|s| s.section.as_str()).collect();
    for walk_through in [
        "A session with curl",
        "When a runtime goes silent",
        "Recovering a concierge",
        "Changing a policy in a running service",
    ] {
        assert!(
            sections.contains(walk_through),
            "no commands under `{walk_through}`: {sections:?}"
        );
    }
    assert!(steps.len() >= 40, "the README has {} steps", steps.len());
    let expected: usize = steps.iter().map(|s| s.expect.len()).sum();
    assert!(expected >= 25, "the README shows {expected} output lines");

    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("heartgate");
    let components = root.join("target/policies/components");
    std::fs::create_dir_all(components.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(GUESTS, &components).unwrap();
    let stand_in = scratch.path().join("stand-in");
    std::fs::create_dir(&stand_in).unwrap();
    let bin_dir = Path::new(HEARTGATE).parent().unwrap();
    let cargo = stand_in.join("cargo");
    std::fs::write(&cargo, cargo_stand_in(bin_dir)).unwrap();
    std::fs::set_permissions(&cargo, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let outputs = scratch.path().join("steps");
    std::fs::create_dir(&outputs).unwrap();
    let script_file = scratch.path().join("readme.sh");
    std::fs::write(&script_file, script(&steps, &outputs)).unwrap();

    let path = format!(
        "{}:{}:{}",
        stand_in.display(),
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut shell = Command::new("bash");
    shell
        .arg(&script_file)
        .current_dir(&root)
        .env("PATH", &path)
        .env(
            "HEARTGATE_MODULE_CACHE",
            scratch.path().join("module-cache"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for var in [
        "HEARTGATE_DB",
        "HEARTGATE_CONFIG",
        "HEARTGATE_LISTEN",
        "HEARTGATE_SERVER",
        "HEARTGATE_ADMIN_TOKEN",
        "HEARTGATE_OPERATOR",
        "HEARTGATE_LOG_FORMAT",
        "RUST_LOG",
    ] {
        shell.env_remove(var);
    }
    std::os::unix::process::CommandExt::process_group(&mut shell, 0);
    let mut child = shell.spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever a failed step left running (a service, the simulator).
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();

    let read = |i: usize, ext: &str| std::fs::read_to_string(outputs.join(format!("{i}.{ext}")));
    let mut ran = 0;
    let mut mismatches = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let Ok(rc) = read(i, "rc") else {
            let output = read(i, "out").unwrap_or_default();
            panic!(
                "step {i} ({}) {}: `{}`\n--- its output so far:\n{}",
                step.section,
                if status.is_none() {
                    "did not finish within the deadline"
                } else {
                    "never ran"
                },
                step.command,
                tail(&output)
            );
        };
        ran += 1;
        let output = read(i, "out").unwrap_or_default();
        let rc: i32 = rc.trim().parse().unwrap();
        assert_eq!(
            rc != 0,
            step.fails,
            "step {i} ({}): `{}` exited {rc}; the README shows it {}:\n{}",
            step.section,
            step.command,
            if step.fails { "failing" } else { "succeeding" },
            tail(&output)
        );
        for line in &step.expect {
            if !output.lines().any(|l| shows(line, l)) {
                mismatches.push(format!(
                    "step {i} ({}): `{}`\n  the README shows: {line}\n  it printed:\n{}",
                    step.section,
                    step.command,
                    tail(&output)
                ));
            }
        }
    }
    assert_eq!(ran, steps.len(), "every step ran");
    assert!(
        mismatches.is_empty(),
        "{} output lines differ from the README:\n{}",
        mismatches.len(),
        mismatches.join("\n\n")
    );
    // The walk-throughs did what they say.
    assert!(
        root.join("demo/configs/concierge/.claude/settings.json")
            .is_file()
    );
    let backups: Vec<PathBuf> = std::fs::read_dir(root.join("backups"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
}

/// The end of a long output.
fn tail(text: &str) -> &str {
    let from = text.len().saturating_sub(4000);
    let from = (from..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[from..]
}

#[test]
fn readme_output_lines_match_as_the_test_reads_them() {
    assert!(shows(
        "status:          failed since ...",
        "status:   failed since 2026-12-02T10:00:00Z"
    ));
    assert!(shows(
        r#"{"auth_token":"<43 characters>","status":"registered"}"#,
        r#"{"auth_token":"abc","status":"registered"}"#
    ));
    assert!(!shows("online -> offline", "offline -> online"));
    assert_eq!(
        expected_line("# 2   concierge  mcp-recovery ...   (the recovery)").as_deref(),
        Some("2   concierge  mcp-recovery ...")
    );
    assert_eq!(expected_line("# ..."), None);
    let steps = readme_steps(
        "## S\n```sh\n# prose\nfoo \\\n  bar\n# out\n\n# prose again\nbaz\n# error: no\n```\n```sh norun\nskipped\n```\n",
    );
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert_eq!(steps[0].command, "foo \\\n  bar");
    assert_eq!(steps[0].expect, ["out"]);
    assert!(steps[1].fails && !steps[0].fails);
}
