//! The operator's commands on the database: `workspace`, `token`,
//! `reconcile`, `db`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use heartgate::model::{Status, WorkspaceKind};
use heartgate::store::{NewWorkspace, Store};
use heartgate::{auth, open_existing_store, open_store};

use super::args::{DbCommand, ReconcileCommand, TokenCommand, WorkspaceCommand};
use super::output::{emit, out, print_document, print_json, say, when};

/// What an action command did, with `--json`: the workspace and the facts.
fn done(json: bool, value: serde_json::Value, text: String) -> Result<()> {
    emit(json, &value, |_| text)
}

/// How often `workspace wait` looks again: a read of one row.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// `workspace wait`: poll the workspace's row until its status is one of
/// `statuses`, or fail after `timeout` saying what it is.
fn wait_for_status(
    store: &dyn Store,
    id: &str,
    statuses: &[String],
    timeout: &str,
    json: bool,
) -> Result<()> {
    let wanted = statuses
        .iter()
        .map(|s| {
            Status::parse(s).with_context(|| {
                let all: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
                format!("--status: unknown status `{s}` (one of {})", all.join(", "))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let timeout_ms = heartgate::clock::parse_duration_ms(timeout)
        .map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
    let started = std::time::Instant::now();
    let deadline = started + std::time::Duration::from_millis(timeout_ms.unsigned_abs());
    loop {
        let rec = store
            .workspace(id)?
            .with_context(|| format!("unknown workspace `{id}`"))?;
        if wanted.contains(&rec.status) {
            let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let shown = serde_json::json!({
                "workspace_id": id,
                "status": rec.status.as_str(),
                "waited_ms": waited_ms,
            });
            return emit(json, &shown, |_| {
                format!(
                    "`{id}` is {} (after {:.1} s)",
                    rec.status.as_str(),
                    waited_ms as f64 / 1000.0
                )
            });
        }
        if std::time::Instant::now() >= deadline {
            let want: Vec<&str> = wanted.iter().map(|s| s.as_str()).collect();
            bail!(
                "`{id}` is still {} after {timeout} (waiting for {})",
                rec.status.as_str(),
                want.join(" or ")
            );
        }
        std::thread::sleep(WAIT_POLL);
    }
}

pub(crate) fn workspace(
    store: &dyn Store,
    cmd: WorkspaceCommand,
    now: i64,
    json: bool,
) -> Result<()> {
    match cmd {
        WorkspaceCommand::Add {
            id,
            kind,
            name,
            model_configured,
            runtime,
        } => {
            let kind = WorkspaceKind::parse(&kind).context("kind must be workspace or platform")?;
            store.add_workspace(
                &NewWorkspace {
                    id: id.clone(),
                    name,
                    kind,
                    model_configured,
                    runtime,
                },
                now,
            )?;
            let rec = store
                .workspace(&id)?
                .with_context(|| format!("workspace `{id}` is gone"))?;
            emit(json, &rec, |r| {
                format!(
                    "added workspace `{}` ({}, {}); issue its token with `heartgate token issue {}`",
                    r.id,
                    r.kind.as_str(),
                    r.status.as_str(),
                    r.id
                )
            })?;
        }
        WorkspaceCommand::Explain { id, limit } => {
            if !(1..=heartgate::history::MAX_DECISIONS).contains(&limit) {
                bail!("--limit must be 1-{}", heartgate::history::MAX_DECISIONS);
            }
            let Some(history) = heartgate::history::history(store, &id, limit)? else {
                bail!("unknown workspace `{id}`");
            };
            emit(json, &history, heartgate::history::explain)?;
        }
        WorkspaceCommand::Show { id } => match store.workspace(&id)? {
            // What `GET /workspaces/{id}` answers, and what only the
            // operator sees (conditions, plugins, tokens, register failure).
            Some(rec) => {
                let mut shown = serde_json::to_value(&rec)?;
                if let (Some(all), serde_json::Value::Object(public)) = (
                    shown.as_object_mut(),
                    heartgate::admin::workspace_view(&rec),
                ) {
                    all.extend(public);
                }
                emit(json, &shown, |v| show_text(&rec, v))?
            }
            None => bail!("unknown workspace `{id}`"),
        },
        WorkspaceCommand::Wait {
            id,
            statuses,
            timeout,
        } => wait_for_status(store, &id, &statuses, &timeout, json)?,
        WorkspaceCommand::RotateInboundSecret { id } => {
            let secret = heartgate::auth::InboundSecret::mint()
                .map_err(|e| anyhow::anyhow!("minting a secret: {e}"))?;
            store.rotate_inbound_secret(&id, &secret, now)?;
            done(
                json,
                serde_json::json!({"workspace_id": id, "rotated": true}),
                format!(
                    "rotated the platform inbound secret of `{id}`; its runtime receives the new one with its next register or heartbeat"
                ),
            )?;
        }
        WorkspaceCommand::List => {
            let all = store.workspaces()?;
            if json {
                for rec in &all {
                    print_json(rec)?;
                }
            } else if all.is_empty() {
                say!("no workspaces; add one with `heartgate workspace add ID`")?;
            } else {
                let rows: Vec<[String; 6]> = all
                    .iter()
                    .map(|r| {
                        [
                            r.id.clone(),
                            r.kind.as_str().to_string(),
                            r.status.as_str().to_string(),
                            r.status_since_ms
                                .map_or_else(|| "-".into(), heartgate::clock::rfc3339),
                            r.last_heartbeat_ms
                                .map_or_else(|| "-".into(), heartgate::clock::rfc3339),
                            r.runtime.clone(),
                        ]
                    })
                    .collect();
                out(&table(
                    &["ID", "KIND", "STATUS", "SINCE", "LAST HEARTBEAT", "RUNTIME"],
                    &rows,
                ))?;
            }
        }
        WorkspaceCommand::DeclarePlugin {
            id,
            name,
            source,
            allow_unpinned,
        } => {
            use heartgate::deliverer::source::{self, SourceError};
            source::check_name(&name)?;
            match source::parse(&source, allow_unpinned) {
                Ok(_) => {}
                Err(e @ SourceError::Unpinned(_)) => bail!(
                    "{e} (`--allow-unpinned` declares it anyway, for a service with `[deliverer] allow_unpinned = true`)"
                ),
                Err(e) => return Err(e.into()),
            }
            store.declare_plugin(&id, &name, &source, now)?;
            done(
                json,
                serde_json::json!({"workspace_id": id, "plugin": name, "source": source}),
                format!("declared plugin `{name}` of `{id}` from {source}"),
            )?;
        }
        WorkspaceCommand::UndeclarePlugin { id, name } => {
            if store.undeclare_plugin(&id, &name)? {
                done(
                    json,
                    serde_json::json!({"workspace_id": id, "plugin": name, "withdrawn": true}),
                    format!(
                        "withdrew plugin `{name}` of `{id}`; the copy already delivered stays in its config volume"
                    ),
                )?;
            } else {
                bail!("workspace `{id}` declares no plugin `{name}`");
            }
        }
        WorkspaceCommand::Markers { id } => {
            let Some(snapshot) = store.load(&id, heartgate::store::Read::Fresh)? else {
                bail!("unknown workspace `{id}`");
            };
            if json {
                print_document(&snapshot.markers)?;
            } else if snapshot.markers.is_empty() {
                say!("no policy markers for `{id}`")?;
            } else {
                let rows: Vec<[String; 4]> = snapshot
                    .markers
                    .iter()
                    .map(|m| {
                        [
                            m.slot.clone().unwrap_or_default(),
                            m.owner.clone(),
                            m.key.clone(),
                            m.value.clone(),
                        ]
                    })
                    .collect();
                out(&table(&["SLOT", "POLICY", "KEY", "VALUE"], &rows))?;
            }
        }
        WorkspaceCommand::Conditions { id } => {
            let Some(rec) = store.workspace(&id)? else {
                bail!("unknown workspace `{id}`");
            };
            if json {
                print_document(&rec.conditions)?;
            } else if rec.conditions.is_empty() {
                say!("no conditions in force for `{id}`")?;
            } else {
                let rows: Vec<[String; 6]> = rec
                    .conditions
                    .iter()
                    .map(|c| {
                        [
                            c.slot.clone().unwrap_or_default(),
                            c.name.clone(),
                            c.severity.as_str().to_string(),
                            heartgate::clock::rfc3339(c.since_ms),
                            c.reason.clone(),
                            c.message.clone(),
                        ]
                    })
                    .collect();
                out(&table(
                    &["SLOT", "NAME", "SEVERITY", "SINCE", "REASON", "MESSAGE"],
                    &rows,
                ))?;
            }
        }
        WorkspaceCommand::ClearMarkers { id, slot, key, .. } => {
            let n = store.clear_markers(&id, slot.as_deref(), key.as_deref())?;
            done(
                json,
                serde_json::json!({"workspace_id": id, "cleared": n}),
                format!("cleared {n} policy marker(s) of `{id}`"),
            )?;
        }
        WorkspaceCommand::ClearConditions { id, slot, name, .. } => {
            let n = store.clear_conditions(&id, slot.as_deref(), name.as_deref())?;
            done(
                json,
                serde_json::json!({"workspace_id": id, "cleared": n}),
                format!(
                    "cleared {n} condition(s) of `{id}`; its status is derived again at its next heartbeat"
                ),
            )?;
        }
        WorkspaceCommand::Remove { id } => {
            store.set_status(&id, Status::Removed, now)?;
            done(
                json,
                serde_json::json!({"workspace_id": id, "status": "removed"}),
                format!("removed `{id}`: its heartbeats and registers never change it again"),
            )?;
        }
    }
    Ok(())
}

/// `workspace show` as text: one fact a line, the lists after.
fn show_text(rec: &heartgate::store::WorkspaceRecord, shown: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(t, "id:              {}", rec.id);
    if !rec.name.is_empty() {
        let _ = writeln!(t, "name:            {}", rec.name);
    }
    let _ = writeln!(t, "kind:            {}", rec.kind.as_str());
    let _ = writeln!(
        t,
        "status:          {} since {}",
        rec.status.as_str(),
        rec.status_since_ms
            .map_or_else(|| "-".into(), heartgate::clock::rfc3339)
    );
    let _ = writeln!(
        t,
        "runtime:         {}",
        if rec.runtime.is_empty() {
            "-"
        } else {
            &rec.runtime
        }
    );
    let _ = writeln!(t, "url:             {}", opt(&rec.url));
    let _ = writeln!(t, "last heartbeat:  {}", when(&shown["last_heartbeat_ms"]));
    let _ = writeln!(t, "active tasks:    {}", rec.active_tasks);
    let _ = writeln!(t, "current task:    {}", opt(&rec.current_task));
    let _ = writeln!(t, "uptime:          {} s", rec.uptime_seconds);
    let _ = writeln!(t, "error rate:      {}", rec.last_error_rate);
    if !rec.last_sample_error.is_empty() {
        let _ = writeln!(t, "last error:      {}", rec.last_sample_error);
    }
    let _ = writeln!(
        t,
        "model:           {}",
        if rec.model_configured {
            "configured"
        } else {
            "not configured"
        }
    );
    let _ = writeln!(
        t,
        "tokens:          {} live{}",
        rec.live_tokens,
        if rec.token_bootstrap {
            " (the next register without one mints one)"
        } else {
            ""
        }
    );
    if rec.conditions.is_empty() {
        let _ = writeln!(t, "conditions:      none in force");
    } else {
        let _ = writeln!(t, "conditions:");
        for c in &rec.conditions {
            let _ = writeln!(
                t,
                "  {} {}/{}: {} since {}{}",
                c.severity.as_str(),
                c.owner,
                c.name,
                if c.reason.is_empty() { "-" } else { &c.reason },
                heartgate::clock::rfc3339(c.since_ms),
                if c.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", c.message)
                }
            );
        }
    }
    if rec.declared_plugins.is_empty() {
        let _ = writeln!(t, "plugins:         none declared");
    } else {
        let _ = writeln!(t, "plugins:");
        for p in &rec.declared_plugins {
            let _ = writeln!(t, "  {} from {}", p.name, p.source);
        }
    }
    let _ = writeln!(t, "(all fields: --json)");
    t
}

/// The database named by `--db` or `HEARTGATE_DB`, or the default.
pub(crate) fn db_or_default(db: Option<PathBuf>) -> PathBuf {
    db.unwrap_or_else(|| PathBuf::from(DEFAULT_DB))
}

pub(crate) const DEFAULT_DB: &str = "heartgate.db";

/// `heartgate token ...`.
pub(crate) fn token(db: &Path, cmd: TokenCommand, now: i64, json: bool) -> Result<()> {
    let store = open_existing_store(db)?;
    match cmd {
        TokenCommand::Issue { id } => {
            let token = auth::mint().context("minting a token")?;
            store.issue_token(&id, &token.stored, now)?;
            // Text: the token alone, for `TOKEN=$(heartgate token issue ID)`.
            done(
                json,
                serde_json::json!({"workspace_id": id, "token": token.plaintext}),
                token.plaintext.clone(),
            )?;
        }
        TokenCommand::Revoke {
            id,
            allow_bootstrap,
        } => {
            let n = store.revoke_tokens(&id, now, allow_bootstrap)?;
            let text = if allow_bootstrap {
                format!(
                    "revoked {n} token(s) of `{id}`; its next register without a token mints one"
                )
            } else {
                format!(
                    "revoked {n} token(s) of `{id}`; it refuses every request until `heartgate token issue {id}`"
                )
            };
            done(
                json,
                serde_json::json!({"workspace_id": id, "revoked": n, "bootstrap": allow_bootstrap}),
                text,
            )?;
        }
    }
    Ok(())
}

/// `heartgate db ...`.
pub(crate) fn db(db: &Path, cmd: DbCommand, json: bool) -> Result<()> {
    match cmd {
        DbCommand::Init => {
            let created = !heartgate::Database::from(db).is_postgres() && !db.exists();
            open_store(db)?;
            let shown = heartgate::Database::from(db).describe();
            done(
                json,
                serde_json::json!({"database": shown, "created": created}),
                if created {
                    format!("created the database {shown}")
                } else {
                    format!("the database {shown} is ready (migrated to this binary's schema)")
                },
            )?;
        }
        DbCommand::Backup { file } => {
            if heartgate::Database::from(db).is_postgres() {
                bail!(
                    "`heartgate db backup` copies a SQLite file; back up a PostgreSQL database with its own tools (pg_dump, or continuous archiving)"
                );
            }
            let store = open_existing_store(db)?;
            let backup = store
                .backup(&file)
                .with_context(|| format!("backing up {} to {}", db.display(), file.display()))?;
            emit(json, &backup, |b| {
                format!(
                    "copied {} to {} ({} bytes, quick_check: {})",
                    db.display(),
                    b.path.display(),
                    b.bytes,
                    b.check
                )
            })?;
        }
    }
    Ok(())
}

/// `heartgate reconcile ...`.
pub(crate) fn reconcile(db: &Path, cmd: ReconcileCommand, json: bool) -> Result<()> {
    let store = open_existing_store(db)?;
    match cmd {
        ReconcileCommand::List { workspace } => {
            let runs = store.reconcile_runs(workspace.as_deref())?;
            if json {
                for run in &runs {
                    print_json(run)?;
                }
            } else if runs.is_empty() {
                say!("no reconcile runs")?;
            } else {
                let rows: Vec<[String; 7]> = runs
                    .iter()
                    .map(|r| {
                        [
                            r.id.to_string(),
                            r.workspace_id.clone(),
                            r.trigger.clone(),
                            r.state.clone(),
                            heartgate::clock::rfc3339(r.requested_ms),
                            r.finished_ms
                                .map_or_else(|| "-".into(), heartgate::clock::rfc3339),
                            r.cause.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                out(&table(
                    &[
                        "ID",
                        "WORKSPACE",
                        "TRIGGER",
                        "STATE",
                        "REQUESTED",
                        "FINISHED",
                        "CAUSE",
                    ],
                    &rows,
                ))?;
            }
        }
        ReconcileCommand::Show { id } => match store.reconcile_run(id)? {
            Some(run) => emit(json, &run, run_text)?,
            None => bail!("no reconcile run {id}"),
        },
    }
    Ok(())
}

/// `reconcile show` as text.
fn run_text(r: &heartgate::store::ReconcileRun) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let at = |ms: Option<i64>| ms.map_or_else(|| "-".into(), heartgate::clock::rfc3339);
    let _ = writeln!(
        t,
        "run {} of `{}`: {} ({})",
        r.id, r.workspace_id, r.state, r.trigger
    );
    let _ = writeln!(
        t,
        "requested:  {}",
        heartgate::clock::rfc3339(r.requested_ms)
    );
    let _ = writeln!(t, "started:    {}", at(r.started_ms));
    let _ = writeln!(t, "finished:   {}", at(r.finished_ms));
    let _ = writeln!(t, "attempts:   {}", r.attempts);
    if let Some(d) = r.decision_id {
        let _ = writeln!(t, "decision:   {d}");
    }
    if let Some(cause) = &r.cause {
        let _ = writeln!(t, "cause:      {cause}");
    }
    if let Some(detail) = &r.detail {
        let _ = writeln!(t, "detail:");
        let pretty = serde_json::to_string_pretty(detail).unwrap_or_default();
        for line in pretty.lines() {
            let _ = writeln!(t, "  {line}");
        }
    }
    t
}

/// Rows under a header, in columns as wide as their widest cell (the last
/// column is not padded).
pub(crate) fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut line = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        line.trim_end().to_string() + "\n"
    };
    let mut text = line(header.to_vec());
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}
