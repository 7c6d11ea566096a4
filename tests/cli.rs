//! The CLI as a careful operator uses it (issue 20): the real `heartgate`
//! binary, as child processes, on temp SQLite files, a throwaway PostgreSQL
//! database and a real `heartgate serve` on loopback.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::common::binary::{self, Serve, cli, cli_output, provision};

/// Its stderr, for messages.
fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The CLI, run in `dir` (where `heartgate.db` is the default database),
/// with no `--db` and no `HEARTGATE_DB`.
fn cli_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(binary::heartgate())
        .current_dir(dir)
        .env_remove("HEARTGATE_DB")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Every command that reads or changes a database it did not create.
const NEEDS_A_DATABASE: &[&[&str]] = &[
    &["workspace", "list"],
    &["workspace", "show", "ws"],
    &["workspace", "explain", "ws"],
    &["workspace", "remove", "ws"],
    &["workspace", "rotate-inbound-secret", "ws"],
    &["workspace", "declare-plugin", "ws", "p", "local://p"],
    &["workspace", "undeclare-plugin", "ws", "p"],
    &["token", "issue", "ws"],
    &["token", "revoke", "ws"],
    &["reconcile", "list"],
    &["reconcile", "show", "1"],
    &["db", "backup", "copy.db"],
    &[
        "policy",
        "replay",
        "--candidate",
        "builtin:gate",
        "--slot",
        "gate",
    ],
];

#[test]
fn read_only_commands_never_create_a_database() {
    let dir = tempfile::tempdir().unwrap();
    // The default database, in an empty directory.
    for args in NEEDS_A_DATABASE {
        let out = cli_in(dir.path(), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no database at heartgate.db"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // `--db` with a typo.
    let typo = dir.path().join("heartgaet.db");
    for args in NEEDS_A_DATABASE {
        let out = cli_output(&typo, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("no database at {}", typo.display())),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files were created: {left:?}");
    // A file that is some other program's SQLite database is not taken
    // over (no Heartgate tables added to it).
    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('mine');")
        .unwrap();
    let out = cli_output(&other, &["workspace", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not a Heartgate database"),
        "{}",
        stderr(&out)
    );
    let tables: i64 = rusqlite::Connection::open(&other)
        .unwrap()
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 1);
    // A file that is not SQLite at all.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a database\n".repeat(100)).unwrap();
    let out = cli_output(&text, &["workspace", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not a Heartgate database"),
        "{}",
        stderr(&out)
    );
    // What may create one says why it cannot, once.
    let nowhere = dir.path().join("no-such-dir/h.db");
    let out = cli_output(&nowhere, &["workspace", "add", "ws"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "error: cannot create the database {}: there is no directory {}",
            nowhere.display(),
            nowhere.parent().unwrap().display()
        )
    );
    // What may create one does, and then everything works on it.
    let fresh = dir.path().join("fresh.db");
    assert!(cli(&fresh, &["db", "init"]).contains("created the database"));
    assert_eq!(cli(&fresh, &["--json", "workspace", "list"]), "");
    assert!(cli(&fresh, &["db", "init"]).contains("is ready"));
    let added = dir.path().join("added.db");
    provision(&added, "ws", false);
    assert!(cli(&added, &["--json", "workspace", "list"]).contains("\"ws\""));

    // PostgreSQL: an empty database gets no schema from a read.
    let pg = heartgate_test_pg::PgCluster::shared();
    let url = pg.fresh_database().unwrap();
    let name = url.rsplit('/').next().unwrap();
    let url_path = Path::new(&url);
    for args in [&["workspace", "list"][..], &["reconcile", "list"]] {
        let out = cli_output(url_path, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no Heartgate database at"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let schema = "SELECT to_regclass('heartgate_schema') IS NULL";
    assert_eq!(pg.psql(name, schema).unwrap(), "t");
    cli(url_path, &["db", "init"]);
    assert_eq!(pg.psql(name, schema).unwrap(), "f");
    assert_eq!(cli(url_path, &["--json", "workspace", "list"]), "");
}

#[test]
fn declare_plugin_validates_source() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    provision(&db, "concierge", true);
    let refused = |args: &[&str], says: &str| {
        let out = cli_output(&db, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    };
    let declare = ["workspace", "declare-plugin", "concierge"];
    for (name, source, says) in [
        (
            "foo",
            "bogus://x",
            "unknown scheme; use local://, git+<url> or gitea://",
        ),
        ("foo", "local://../etc", "plugin name"),
        (
            "foo",
            "git+https://example.com/p.git#main",
            "--allow-unpinned",
        ),
        ("foo", "git+https://example.com/p.git", "not pinned"),
        (
            "foo",
            "gitea://only-owner#tag:v1",
            "gitea://<owner>/<repo>#<ref>",
        ),
        ("Bad Name", "local://p", "plugin name `Bad Name`"),
        ("", "local://p", "plugin name"),
    ] {
        refused(&[&declare[..], &[name, source]].concat(), says);
    }
    // Nothing was declared by the refusals.
    let shown = |db: &Path| -> serde_json::Value {
        serde_json::from_str(&cli(db, &["--json", "workspace", "show", "concierge"])).unwrap()
    };
    assert_eq!(
        shown(&db)["declared_plugins"],
        serde_json::json!([]),
        "{}",
        shown(&db)
    );

    cli(&db, &[&declare[..], &["foo", "local://foo"]].concat());
    cli(
        &db,
        &[
            &declare[..],
            &[
                "bar",
                "git+https://example.com/bar.git#main",
                "--allow-unpinned",
            ],
        ]
        .concat(),
    );
    cli(
        &db,
        &[&declare[..], &["baz", "gitea://team/baz#tag:v1.2.0"]].concat(),
    );
    let names = |db: &Path| -> Vec<String> {
        let mut names: Vec<String> = shown(db)["declared_plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&db), ["bar", "baz", "foo"]);

    // Withdrawn again.
    let out = cli(&db, &["workspace", "undeclare-plugin", "concierge", "bar"]);
    assert!(out.contains("withdrew plugin `bar`"), "{out}");
    assert_eq!(names(&db), ["baz", "foo"]);
    refused(
        &["workspace", "undeclare-plugin", "concierge", "bar"],
        "declares no plugin `bar`",
    );
    refused(
        &["workspace", "undeclare-plugin", "nobody", "foo"],
        "unknown workspace `nobody`",
    );
    // The platform workspace's management plugin cannot be withdrawn: that
    // is the deadlock again.
    let mcp = heartgate::store::MANAGEMENT_PLUGIN;
    cli(&db, &[&declare[..], &[mcp, "local://mcp"]].concat());
    refused(
        &["workspace", "undeclare-plugin", "concierge", mcp],
        "nothing can recover it",
    );
}

/// `heartgate serve` on `db` with an empty config and admin token `admin`,
/// its log in `dir`; once it answers.
async fn serve_with_admin(dir: &Path, db: &Path, admin: &str) -> Serve {
    let config = dir.join("heartgate.toml");
    std::fs::write(&config, "").unwrap();
    let mut serve = Command::new(binary::heartgate());
    serve
        .arg("--db")
        .arg(db)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("HEARTGATE_ADMIN_TOKEN", admin);
    let service = Serve::spawn(serve, &dir.join("serve.log"));
    service.wait_healthy().await;
    service
}

/// Run `args` with its standard output a pipe whose reader is gone (what
/// `| head -3` leaves once it has its lines): no panic, no failure.
fn with_closed_stdout(mut cmd: Command, what: &str) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(out.status.success(), "{what}: {:?} {err}", out.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_panics_on_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    provision(&db, "concierge", true);
    // Enough output to fill a pipe many times over.
    for i in 0..60 {
        cli(
            &db,
            &[
                "workspace",
                "add",
                &format!("ws-{i:03}-{}", "x".repeat(100)),
            ],
        );
    }
    let admin = "pipe-admin-token";
    let service = serve_with_admin(dir.path(), &db, admin).await;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/gate/fixtures");
    let fixture = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let fixtures = fixtures.to_str().unwrap();
    let fixture = fixture.to_str().unwrap();
    let server = service.url();
    let on_db: &[&[&str]] = &[
        &["workspace", "list"],
        &["workspace", "show", "concierge"],
        &["workspace", "explain", "concierge"],
        &["reconcile", "list"],
        &["--help"],
        &["workspace", "--help"],
        &["policy", "test", "builtin:gate", "--fixtures", fixtures],
        &[
            "policy",
            "eval",
            "builtin:gate",
            "--input",
            fixture,
            "--trace",
        ],
        &["policy", "list", "--server", &server],
        &["policy", "shadow", "--server", &server],
    ];
    for args in on_db {
        let mut cmd = Command::new(binary::heartgate());
        cmd.arg("--db")
            .arg(&db)
            .args(*args)
            .env("HEARTGATE_ADMIN_TOKEN", admin);
        with_closed_stdout(cmd, &args.join(" "));
    }
}

/// `heartgate policy ...` against `server` as `operator`.
fn policy(db: &Path, server: &str, admin: &str, operator: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(binary::heartgate());
    cmd.arg("--db")
        .arg(db)
        .arg("policy")
        .args(args)
        .args(["--server", server])
        .env("HEARTGATE_ADMIN_TOKEN", admin)
        .env_remove("HEARTGATE_OPERATOR")
        .stdin(Stdio::null());
    if let Some(name) = operator {
        cmd.args(["--as", name]);
    }
    cmd.output().unwrap()
}

/// Its stdout as JSON, asserting it succeeded.
fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_walks_history() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    cli(&db, &["db", "init"]);
    let admin = "history-admin-token";
    let service = serve_with_admin(dir.path(), &db, admin).await;
    let url = service.url();
    let run = |operator: Option<&str>, args: &[&str]| policy(&db, &url, admin, operator, args);
    let slots = |chain: &serde_json::Value| -> Vec<String> {
        let spec: serde_json::Value = match &chain["spec"] {
            serde_json::Value::String(s) => serde_json::from_str(s).unwrap(),
            other => other.clone(),
        };
        spec["slot"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    let active = || json_of(&run(None, &["--json", "list"]));
    let startup = slots(&active());
    assert!(startup.contains(&"liveness".to_string()), "{startup:?}");

    // A slot removed without a stage file, by a named operator.
    let out = run(Some("alice"), &["remove-slot", "nonesuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no slot `nonesuch`; its slots: gate"),
        "{}",
        stderr(&out)
    );
    let a = json_of(&run(
        Some("alice"),
        &["--json", "remove-slot", "liveness", "--activate"],
    ));
    assert_eq!(a["activated_by"], "alice", "{a}");
    assert!(!slots(&a).contains(&"liveness".to_string()));
    let b = json_of(&run(
        Some("bob"),
        &["--json", "remove-slot", "cooldown", "--activate"],
    ));
    assert_eq!(b["activated_by"], "bob");
    let (a_id, b_id) = (a["id"].as_i64().unwrap(), b["id"].as_i64().unwrap());

    // Rollbacks walk back: b -> a -> the chain it started with -> nothing.
    let back = json_of(&run(Some("carol"), &["--json", "rollback"]));
    assert_eq!(back["id"].as_i64(), Some(a_id), "{back}");
    assert_eq!(back["activated_by"], "carol");
    assert_eq!(slots(&active()), slots(&a));
    let back = json_of(&run(Some("carol"), &["--json", "rollback"]));
    assert_eq!(
        slots(&back),
        startup,
        "a second rollback goes further back, not to b"
    );
    let startup_id = back["id"].as_i64().unwrap();
    let out = run(Some("carol"), &["rollback"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no previous chain to roll back to"),
        "{}",
        stderr(&out)
    );
    assert_eq!(slots(&active()), startup);

    // A chain of the history is re-activated by id; its rollback returns
    // to where it was activated from.
    let again = json_of(&run(
        Some("dave"),
        &["--json", "activate", &b_id.to_string()],
    ));
    assert_eq!(again["activated_by"], "dave");
    assert_eq!(slots(&active()), slots(&b));
    // Without --as: the login name, never a made-up `cli`.
    let mut cmd = Command::new(binary::heartgate());
    cmd.arg("--db")
        .arg(&db)
        .args(["policy", "rollback", "--server", &url])
        .env("HEARTGATE_ADMIN_TOKEN", admin)
        .env_remove("HEARTGATE_OPERATOR")
        .env("USER", "erin")
        .stdin(Stdio::null());
    let back = json_of(&cmd.arg("--json").output().unwrap());
    assert_eq!(back["id"].as_i64(), Some(startup_id));
    assert_eq!(back["activated_by"], "erin");

    // The history: who, when, from which chain, in order.
    let history = json_of(&run(None, &["history", "--json"]));
    let seen: Vec<(String, i64, Option<i64>, String)> = history["activations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap().to_string(),
                a["chain_id"].as_i64().unwrap(),
                a["from_chain"].as_i64(),
                a["by"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let by_default = back["activated_by"].as_str().unwrap().to_string();
    assert_eq!(
        seen,
        [
            ("rollback".to_string(), startup_id, Some(b_id), by_default),
            ("activate".into(), b_id, Some(startup_id), "dave".into()),
            ("rollback".into(), startup_id, Some(a_id), "carol".into()),
            ("rollback".into(), a_id, Some(b_id), "carol".into()),
            ("activate".into(), b_id, Some(a_id), "bob".into()),
            ("activate".into(), a_id, Some(startup_id), "alice".into()),
            ("activate".into(), startup_id, None, "startup".into()),
        ]
    );
    assert_eq!(history["chains"].as_array().unwrap().len(), 3);
    let text = String::from_utf8(run(None, &["history"]).stdout).unwrap();
    assert!(text.starts_with("activations, newest first:"), "{text}");
    assert!(
        text.contains("rollback")
            && text.contains("dave")
            && text.contains("chains, newest first:"),
        "{text}"
    );
    // A bad limit is refused by the service.
    let out = run(None, &["history", "--limit", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("limit must be 1-1000"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_and_clear_policy_state() {
    use crate::common::{MINUTE_MS, Service, T0_MS};
    use heartgate::clock::ManualClock;
    use heartgate::model::WorkspaceKind::Platform;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("heartgate.db");
    let clock = ManualClock::at(T0_MS);
    let svc = Service::start(&db, clock.clone()).await;
    let token = svc.provision("concierge", Platform, true);
    svc.force_status("concierge", "online");
    let missing = serde_json::json!({"workspace_id": "concierge", "uptime_seconds": 60, "mcp_server_present": false});
    // The deadlock scenario: failed closed, one recovery, then the cooldown.
    svc.heartbeat(&token, missing.clone()).await;
    clock.advance(MINUTE_MS);
    svc.heartbeat(&token, missing.clone()).await;
    assert_eq!(svc.runs("concierge", "mcp-recovery"), 1);

    let markers = cli(&db, &["workspace", "markers", "concierge"]);
    assert!(markers.starts_with("SLOT"), "{markers}");
    assert!(
        markers.contains("cooldown") && markers.contains("last-fire-ms"),
        "{markers}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cli(&db, &["workspace", "markers", "concierge", "--json"])).unwrap();
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .any(|m| m["slot"] == "cooldown" && m["key"] == "last-fire-ms"),
        "{json}"
    );
    let conditions = cli(&db, &["workspace", "conditions", "concierge"]);
    assert!(
        conditions.contains("identity") && conditions.contains("failed"),
        "{conditions}"
    );

    // Clearing needs a slot or --all.
    let out = cli_output(&db, &["workspace", "clear-markers", "concierge"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let cleared = cli(
        &db,
        &[
            "workspace",
            "clear-markers",
            "concierge",
            "--slot",
            "cooldown",
            "--key",
            "last-fire-ms",
        ],
    );
    assert!(cleared.contains("cleared 1 policy marker"), "{cleared}");
    // With its cooldown's marker gone, the next heartbeat recovers again.
    clock.advance(MINUTE_MS);
    svc.heartbeat(&token, missing.clone()).await;
    assert_eq!(svc.runs("concierge", "mcp-recovery"), 2);

    let cleared = cli(
        &db,
        &["workspace", "clear-conditions", "concierge", "--all"],
    );
    assert!(cleared.contains("cleared 1 condition"), "{cleared}");
    assert!(cli(&db, &["workspace", "conditions", "concierge"]).contains("no conditions in force"));
    let out = cli_output(&db, &["workspace", "markers", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown workspace `nobody`"));
    svc.stop().await;
}

/// A fixture for the busy-degrade test guest: an online workspace with 60
/// active tasks is set degraded (with `set_status`).
const BUSY_FIXTURE: &str = r#"{
  "input": {
    "event": {"heartbeat": {"active_tasks": 60}},
    "workspace": {"id": "ws-1", "kind": "workspace", "status": "online", "model_configured": true},
    "now_ms": 1782302400000
  },
  "expected": [
    {"workspace_id": "ws-1", "kind": "set_status", "to": "degraded", "expected": "online",
     "reason": "too_many_tasks", "message": null}
  ]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_refuses_missing_grants() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    cli(&db, &["db", "init"]);
    let admin = "grants-admin-token";
    let service = serve_with_admin(dir.path(), &db, admin).await;
    let url = service.url();
    let run = |args: &[&str]| policy(&db, &url, admin, None, args);
    let chains = || {
        json_of(&run(&["history", "--json"]))["chains"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = chains();

    // The guide's busy-degrade before contract 0.2.0 writes the status: it
    // declares that it needs `set_status`.
    let guest = format!("{}/busy_degrade.wasm", env!("HEARTGATE_TEST_GUESTS_DIR"));
    let raw = std::fs::read(&guest).unwrap();
    let declared = dir.path().join("busy.wasm");
    std::fs::write(
        &declared,
        heartgate::engine::with_declared_grants(&raw, &[heartgate::chain::Grant::SetStatus]),
    )
    .unwrap();
    let declared = declared.to_str().unwrap();
    let push = |module: &str, extra: &[&str]| {
        let mut args = vec!["push", module, "--slot", "busy", "--after", "status-rules"];
        args.extend_from_slice(extra);
        args.push("--json");
        run(&args)
    };

    // Granted something else: refused before the upload, naming what is missing.
    let out = push(
        declared,
        &[
            "--grant",
            "record_event",
            "--grant",
            "markers",
            "--activate",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("needs the grants set_status")
            && err.contains("--grant set_status")
            && err.contains("record_event, markers"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(chains(), before, "nothing was staged");

    // The service refuses it too, for a client that does not check: a stage
    // naming the stored module in a slot without the grant.
    let pushed = json_of(&run(&["--json", "push", declared]));
    let mut spec = json_of(&run(&["--json", "list"]))["spec"].clone();
    if let serde_json::Value::String(s) = &spec {
        spec = serde_json::from_str(s).unwrap();
    }
    let slots = spec["slot"].as_array_mut().unwrap();
    slots.push(
        serde_json::json!({"name": "busy", "module": pushed["module"], "grants": ["record_event"]}),
    );
    let stage = dir.path().join("stage.json");
    std::fs::write(&stage, serde_json::to_vec(&spec).unwrap()).unwrap();
    let out = run(&["stage", stage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("slot `busy`: the policy busy-degrade")
            && stderr(&out).contains("needs the grants set_status"),
        "{}",
        stderr(&out)
    );
    assert_eq!(chains(), before);

    // A module that declares nothing is caught by the author's fixtures, run
    // by the service with the slot's real grants.
    let fixtures = dir.path().join("fixtures");
    std::fs::create_dir(&fixtures).unwrap();
    std::fs::write(fixtures.join("sixty_tasks_degrades.json"), BUSY_FIXTURE).unwrap();
    let fixtures = fixtures.to_str().unwrap();
    let out = push(&guest, &["--grant", "record_event", "--fixtures", fixtures]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("slot `busy` fails fixture `sixty_tasks_degrades`")
            && stderr(&out).contains("ungranted_action"),
        "{}",
        stderr(&out)
    );
    assert_eq!(chains(), before);

    // A fixture file that is not one is said before anything is sent.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("typo.json"), r#"{"inptu": {}}"#).unwrap();
    let out = push(
        declared,
        &["--grant", "set_status", "--fixtures", bad.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("typo.json") && stderr(&out).contains("inptu"),
        "{}",
        stderr(&out)
    );

    // Granted what it declares, with its fixtures passing: staged and active.
    let active = json_of(&push(
        declared,
        &[
            "--grant",
            "set_status",
            "--fixtures",
            fixtures,
            "--activate",
        ],
    ));
    assert_eq!(active["state"], "active", "{active}");
    // (The first activation also stores the chain the service started with.)
    assert!(chains() > before);

    // Not a component at all: a clear refusal, no bytes dumped.
    let out = run(&["push", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("not WebAssembly"), "{err}");
    assert!(!err.contains("[114,") && !err.contains("114, 111"), "{err}");
}

#[test]
fn compiled_modules_are_cached_by_digest() {
    use heartgate::engine::Engine;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("modules");
    let guests = env!("HEARTGATE_TEST_GUESTS_DIR");
    let busy = std::fs::read(format!("{guests}/busy_degrade.wasm")).unwrap();
    let counts = |engine: &Engine| {
        let stats = engine.module_cache().expect("the engine keeps a cache");
        (stats.hits, stats.misses)
    };

    // The first engine compiles it and keeps the result.
    let first = Engine::with_module_cache(Some(&cache)).unwrap();
    let module = first.load(&busy).unwrap();
    assert_eq!(counts(&first), (0, 1));
    assert_eq!(module.metadata().name, "busy-degrade");
    // Another engine (another process: `policy test`, `push`, a service
    // start) on the same directory loads it instead of compiling it, and
    // the loaded code runs.
    let second = Engine::with_module_cache(Some(&cache)).unwrap();
    let again = second.load(&busy).unwrap();
    assert_eq!(counts(&second), (1, 0));
    assert_eq!(again.metadata().name, "busy-degrade");
    assert_eq!(again.digest(), module.digest());
    // Other bytes are another entry: a grants section changes the digest.
    let declared =
        heartgate::engine::with_declared_grants(&busy, &[heartgate::chain::Grant::SetStatus]);
    second.load(&declared).unwrap();
    assert_eq!(counts(&second), (1, 1));

    // A module that imports WASI is refused before anything is compiled.
    let wasi = std::fs::read(format!("{guests}/wasi_user.wasm")).unwrap();
    let third = Engine::with_module_cache(Some(&cache)).unwrap();
    let refused = third.load(&wasi).unwrap_err().to_string();
    assert!(refused.contains("policies may import nothing"), "{refused}");
    assert_eq!(counts(&third), (0, 0), "refused without compiling");

    // Damaged cache files are compiled again, never run.
    let mut damaged = 0;
    for entry in walk(&cache) {
        std::fs::write(&entry, b"not compiled code").unwrap();
        damaged += 1;
    }
    assert!(damaged >= 2, "{damaged} files in the cache");
    let fourth = Engine::with_module_cache(Some(&cache)).unwrap();
    let rebuilt = fourth.load(&busy).unwrap();
    assert_eq!(counts(&fourth), (0, 1));
    assert_eq!(rebuilt.metadata().name, "busy-degrade");

    // The CLI uses it: the second `policy test` of a module loads it.
    let fixtures = dir.path().join("fixtures");
    std::fs::create_dir(&fixtures).unwrap();
    std::fs::write(fixtures.join("sixty_tasks_degrades.json"), BUSY_FIXTURE).unwrap();
    let cli_cache = dir.path().join("cli-cache");
    let test = || {
        Command::new(binary::heartgate())
            .args(["policy", "test"])
            .arg(format!("{guests}/busy_degrade.wasm"))
            .arg("--fixtures")
            .arg(&fixtures)
            .env("HEARTGATE_MODULE_CACHE", &cli_cache)
            .output()
            .unwrap()
    };
    let out = test();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("from the module cache"), "{text}");
    assert!(!walk(&cli_cache).is_empty(), "the first run kept it");
    let out = test();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("from the module cache"), "{text}");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn error_text_names_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    // A typo in a chain file: the line, the value and the likely meaning.
    std::fs::write(
        dir.path().join("chain.toml"),
        "[[slot]]\nname = \"gate\"\nmodule = \"builtin:gaet\"\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("fixtures")).unwrap();
    std::fs::write(dir.path().join("fixtures/one.json"), BUSY_FIXTURE).unwrap();
    let out = cli_in(dir.path(), &["policy", "test", "--chain", "chain.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("chain.toml:3")
            && err.contains("`builtin:gaet`")
            && err.contains("did you mean `builtin:gate`?"),
        "{err}"
    );

    // An evaluation with no module asks the service only when told where.
    let out = Command::new(binary::heartgate())
        .current_dir(dir.path())
        .env_remove("HEARTGATE_SERVER")
        .args(["policy", "eval", "--input", "fixtures/one.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("give a MODULE") && err.contains("--server URL"),
        "{err}"
    );

    // No service there: say how to point at one.
    let out = Command::new(binary::heartgate())
        .current_dir(dir.path())
        .env("HEARTGATE_ADMIN_TOKEN", "x")
        .args(["policy", "list", "--server", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach the service at http://127.0.0.1:9")
            && err.contains("--server URL or HEARTGATE_SERVER"),
        "{err}"
    );

    // `--server` and `--as` go before the command too, like `--db`; after
    // it, they win.
    for args in [
        &["--server", "http://127.0.0.1:9", "policy", "list"][..],
        &[
            "--server",
            "http://127.0.0.1:7",
            "--as",
            "alice",
            "policy",
            "rollback",
            "--server",
            "http://127.0.0.1:9",
        ][..],
    ] {
        let out = Command::new(binary::heartgate())
            .current_dir(dir.path())
            .env("HEARTGATE_ADMIN_TOKEN", "x")
            .env_remove("HEARTGATE_SERVER")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("cannot reach the service at http://127.0.0.1:9"),
            "{args:?}: {err}"
        );
    }
    // The local commands do not take it, nor list it.
    for command in ["new", "build", "test", "replay"] {
        let help = Command::new(binary::heartgate())
            .args(["policy", command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(
            !help.contains("--server") && !help.contains("--as <NAME>"),
            "policy {command} --help lists --server or --as:\n{help}"
        );
    }
    let help = Command::new(binary::heartgate())
        .args(["policy", "push", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--server") && help.contains("--as"), "{help}");
}

/// Its stdout as one JSON document, asserting it succeeded.
fn json_document(what: &str, out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{what}: {}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} --json: not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Its stdout as JSON lines, asserting it succeeded.
fn json_lines(what: &str, out: &Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{what}: {}", stderr(out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{what} --json: a line that is not JSON ({e}): {l}"))
        })
        .collect()
}

/// Its stdout, asserting it succeeded and is text, not JSON.
fn text_of(what: &str, out: &Output) -> String {
    assert!(out.status.success(), "{what}: {}", stderr(out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err() && !text.trim().is_empty(),
        "{what} without --json printed JSON (or nothing): {text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_has_json_output() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let d = |args: &[&str]| cli_output(&db, args);
    let with_json = |args: &[&str]| {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        cli_output(&db, &all)
    };

    // The database and the operator's commands: one document each, and the
    // lists that stream one object a line.
    let init = json_document("db init", &with_json(&["db", "init"]));
    assert_eq!(init["created"], true, "{init}");
    let added = json_document(
        "workspace add",
        &with_json(&["workspace", "add", "concierge", "--kind", "platform"]),
    );
    assert_eq!(added["id"], "concierge");
    assert_eq!(added["status"], "provisioning");
    let token = json_document("token issue", &with_json(&["token", "issue", "concierge"]));
    assert!(
        token["token"].as_str().is_some_and(|t| t.len() > 20),
        "{token}"
    );
    let text = text_of("workspace add", &d(&["workspace", "add", "other"]));
    assert!(text.contains("added workspace `other`"), "{text}");
    let listed = json_lines("workspace list", &with_json(&["workspace", "list"]));
    assert_eq!(listed.len(), 2);
    let text = text_of("workspace list", &d(&["workspace", "list"]));
    assert!(
        text.starts_with("ID") && text.contains("concierge"),
        "{text}"
    );
    let shown = json_document(
        "workspace show",
        &with_json(&["workspace", "show", "concierge"]),
    );
    assert_eq!(shown["kind"], "platform");
    let text = text_of("workspace show", &d(&["workspace", "show", "concierge"]));
    assert!(
        text.contains("status:") && text.contains("provisioning"),
        "{text}"
    );
    for args in [
        &["workspace", "explain", "concierge"][..],
        &["workspace", "markers", "concierge"],
        &["workspace", "conditions", "concierge"],
        &["workspace", "declare-plugin", "concierge", "p", "local://p"],
        &["workspace", "undeclare-plugin", "concierge", "p"],
        &["workspace", "clear-markers", "concierge", "--all"],
        &["workspace", "clear-conditions", "concierge", "--all"],
        &["workspace", "rotate-inbound-secret", "concierge"],
        &["token", "revoke", "other"],
        &["workspace", "remove", "other"],
    ] {
        json_document(&args.join(" "), &with_json(args));
    }
    json_lines("reconcile list", &with_json(&["reconcile", "list"]));
    let copy = dir.path().join("copy.db");
    let backup = json_document(
        "db backup",
        &with_json(&["db", "backup", copy.to_str().unwrap()]),
    );
    assert_eq!(backup["check"], "ok", "{backup}");
    let config = dir.path().join("heartgate.toml");
    std::fs::write(&config, "").unwrap();
    let checked = json_document(
        "config check",
        &with_json(&["config", "check", config.to_str().unwrap()]),
    );
    assert_eq!(checked["ok"], true);

    // The author's commands, here.
    let gate_fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/gate/fixtures");
    let gate_fixtures = gate_fixtures.to_str().unwrap();
    let report = json_document(
        "policy test",
        &with_json(&[
            "policy",
            "test",
            "builtin:gate",
            "--fixtures",
            gate_fixtures,
        ]),
    );
    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["passed"].as_u64().unwrap() >= 3, "{report}");
    assert!(report["cases"][0]["name"].is_string(), "{report}");
    text_of(
        "policy test",
        &d(&[
            "policy",
            "test",
            "builtin:gate",
            "--fixtures",
            gate_fixtures,
        ]),
    );
    let input = format!("{gate_fixtures}/heartbeat_model_missing_fails_closed.json");
    let eval = json_document(
        "policy eval --trace",
        &with_json(&[
            "policy",
            "eval",
            "builtin:gate",
            "--input",
            &input,
            "--trace",
        ]),
    );
    assert!(eval["trace"]["steps"].is_array(), "{eval}");
    let text = text_of(
        "policy eval --trace",
        &d(&[
            "policy",
            "eval",
            "builtin:gate",
            "--input",
            &input,
            "--trace",
        ]),
    );
    assert!(
        text.contains("slot rca2970-gate") && text.contains("proposed"),
        "{text}"
    );
    let new = json_document(
        "policy new",
        &with_json(&[
            "policy",
            "new",
            "json-pol",
            "--dir",
            dir.path().to_str().unwrap(),
        ]),
    );
    assert!(
        new["files"].as_array().is_some_and(|f| !f.is_empty()),
        "{new}"
    );
    json_document(
        "policy replay",
        &with_json(&[
            "policy",
            "replay",
            "--candidate",
            "builtin:gate",
            "--slot",
            "gate",
        ]),
    );

    // The admin API's commands.
    let admin = "json-admin-token";
    let service = serve_with_admin(dir.path(), &db, admin).await;
    let url = service.url();
    let remote = |json: bool, args: &[&str]| {
        let mut all: Vec<&str> = if json { vec!["--json"] } else { Vec::new() };
        all.extend_from_slice(args);
        policy(&db, &url, admin, Some("jo"), &all)
    };
    let listed = json_document("policy list", &remote(true, &["list"]));
    assert!(listed["spec"]["slot"].is_array(), "{listed}");
    let text = text_of("policy list", &remote(false, &["list"]));
    assert!(text.contains("SLOT") && text.contains("cooldown"), "{text}");
    let module = format!("{}/cooldown_1m.wasm", env!("HEARTGATE_TEST_GUESTS_DIR"));
    let pushed = json_document("policy push", &remote(true, &["push", &module]));
    assert!(pushed["module"].as_str().unwrap().starts_with("sha256:"));
    let text = text_of("policy push", &remote(false, &["push", &module]));
    assert!(text.starts_with("pushed recovery-cooldown"), "{text}");
    let staged = json_document(
        "policy push --slot",
        &remote(true, &["push", &module, "--slot", "cooldown"]),
    );
    assert_eq!(staged["state"], "staged");
    assert!(
        staged["spec"]["slot"].is_array(),
        "a chain's spec is an object everywhere: {staged}"
    );
    let id = staged["id"].to_string();
    let text = text_of(
        "policy push --slot",
        &remote(false, &["push", &module, "--slot", "cooldown"]),
    );
    assert!(text.contains("is staged"), "{text}");
    let shadow = json_document("policy shadow ID", &remote(true, &["shadow", &id]));
    assert_eq!(shadow["chain"].to_string(), id);
    let text = text_of("policy shadow", &remote(false, &["shadow"]));
    assert!(text.starts_with(&format!("shadow chain {id}")), "{text}");
    json_document("policy shadow --stop", &remote(true, &["shadow", "--stop"]));
    let eval = json_document(
        "policy eval (service)",
        &remote(true, &["eval", "--input", &input]),
    );
    assert!(eval["steps"].is_array(), "{eval}");
    let text = text_of(
        "policy eval (service)",
        &remote(false, &["eval", "--input", &input]),
    );
    assert!(
        text.contains("failed closed") || text.contains("actions"),
        "{text}"
    );
    let active = json_document("policy activate", &remote(true, &["activate", &id]));
    assert_eq!(active["state"], "active");
    assert!(active["spec"]["slot"].is_array(), "{active}");
    let removed = json_document(
        "policy remove-slot",
        &remote(true, &["remove-slot", "liveness"]),
    );
    assert_eq!(removed["state"], "staged");
    json_document("policy history", &remote(true, &["history"]));
    let back = json_document("policy rollback", &remote(true, &["rollback"]));
    assert!(back["spec"]["slot"].is_array(), "{back}");
    let text = text_of("policy rollback", &remote(false, &["activate", &id]));
    assert!(
        text.contains("is active") && text.contains("by jo"),
        "{text}"
    );
    let pruned = json_document("policy prune", &remote(true, &["prune"]));
    assert!(pruned["removed"].is_array(), "{pruned}");
    text_of("policy prune", &remote(false, &["prune"]));
}
