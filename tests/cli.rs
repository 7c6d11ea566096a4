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
    assert_eq!(cli(&fresh, &["workspace", "list"]), "");
    assert!(cli(&fresh, &["db", "init"]).contains("is ready"));
    let added = dir.path().join("added.db");
    provision(&added, "ws", false);
    assert!(cli(&added, &["workspace", "list"]).contains("\"ws\""));

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
    assert_eq!(cli(url_path, &["workspace", "list"]), "");
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
        serde_json::from_str(&cli(db, &["workspace", "show", "concierge"])).unwrap()
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
    let active = || json_of(&run(None, &["list"]));
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
        &["remove-slot", "liveness", "--activate"],
    ));
    assert_eq!(a["activated_by"], "alice", "{a}");
    assert!(!slots(&a).contains(&"liveness".to_string()));
    let b = json_of(&run(
        Some("bob"),
        &["remove-slot", "cooldown", "--activate"],
    ));
    assert_eq!(b["activated_by"], "bob");
    let (a_id, b_id) = (a["id"].as_i64().unwrap(), b["id"].as_i64().unwrap());

    // Rollbacks walk back: b -> a -> the chain it started with -> nothing.
    let back = json_of(&run(Some("carol"), &["rollback"]));
    assert_eq!(back["id"].as_i64(), Some(a_id), "{back}");
    assert_eq!(back["activated_by"], "carol");
    assert_eq!(slots(&active()), slots(&a));
    let back = json_of(&run(Some("carol"), &["rollback"]));
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
    let again = json_of(&run(Some("dave"), &["activate", &b_id.to_string()]));
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
    let back = json_of(&cmd.output().unwrap());
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
