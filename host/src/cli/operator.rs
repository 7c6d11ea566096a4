//! The operator's commands on the database: `workspace`, `token`,
//! `reconcile`, `db`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use heartgate::model::{Status, WorkspaceKind};
use heartgate::store::{NewWorkspace, Store};
use heartgate::{auth, open_existing_store, open_store};

use super::args::{DbCommand, ReconcileCommand, TokenCommand, WorkspaceCommand};
use super::output::{out, print_json, say};

pub(crate) fn workspace(store: &dyn Store, cmd: WorkspaceCommand, now: i64) -> Result<()> {
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
                    id,
                    name,
                    kind,
                    model_configured,
                    runtime,
                },
                now,
            )?;
        }
        WorkspaceCommand::Explain { id, limit, json } => {
            if !(1..=heartgate::history::MAX_DECISIONS).contains(&limit) {
                bail!("--limit must be 1-{}", heartgate::history::MAX_DECISIONS);
            }
            let Some(history) = heartgate::history::history(store, &id, limit)? else {
                bail!("unknown workspace `{id}`");
            };
            if json {
                say!("{}", serde_json::to_string_pretty(&history)?)?;
            } else {
                out(&heartgate::history::explain(&history))?;
            }
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
                print_json(&shown)?
            }
            None => bail!("unknown workspace `{id}`"),
        },
        WorkspaceCommand::RotateInboundSecret { id } => {
            let secret = heartgate::auth::InboundSecret::mint()
                .map_err(|e| anyhow::anyhow!("minting a secret: {e}"))?;
            store.rotate_inbound_secret(&id, &secret, now)?;
            say!(
                "rotated the platform inbound secret of `{id}`; its runtime receives the new one with its next register or heartbeat"
            )?;
        }
        WorkspaceCommand::List => {
            for rec in store.workspaces()? {
                print_json(&rec)?;
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
            say!("declared plugin `{name}` of `{id}` from {source}")?;
        }
        WorkspaceCommand::UndeclarePlugin { id, name } => {
            if store.undeclare_plugin(&id, &name)? {
                say!(
                    "withdrew plugin `{name}` of `{id}`; the copy already delivered stays in its config volume"
                )?;
            } else {
                bail!("workspace `{id}` declares no plugin `{name}`");
            }
        }
        WorkspaceCommand::Markers { id, json } => {
            let Some(snapshot) = store.load(&id, heartgate::store::Read::Fresh)? else {
                bail!("unknown workspace `{id}`");
            };
            if json {
                say!("{}", serde_json::to_string_pretty(&snapshot.markers)?)?;
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
        WorkspaceCommand::Conditions { id, json } => {
            let Some(rec) = store.workspace(&id)? else {
                bail!("unknown workspace `{id}`");
            };
            if json {
                say!("{}", serde_json::to_string_pretty(&rec.conditions)?)?;
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
            say!("cleared {n} policy marker(s) of `{id}`")?;
        }
        WorkspaceCommand::ClearConditions { id, slot, name, .. } => {
            let n = store.clear_conditions(&id, slot.as_deref(), name.as_deref())?;
            say!(
                "cleared {n} condition(s) of `{id}`; its status is derived again at its next heartbeat"
            )?;
        }
        WorkspaceCommand::Remove { id } => store.set_status(&id, Status::Removed, now)?,
    }
    Ok(())
}

/// The database named by `--db` or `HEARTGATE_DB`, or the default.
pub(crate) fn db_or_default(db: Option<PathBuf>) -> PathBuf {
    db.unwrap_or_else(|| PathBuf::from(DEFAULT_DB))
}

pub(crate) const DEFAULT_DB: &str = "heartgate.db";

/// `heartgate token ...`.
pub(crate) fn token(db: &Path, cmd: TokenCommand, now: i64) -> Result<()> {
    let store = open_existing_store(db)?;
    match cmd {
        TokenCommand::Issue { id } => {
            let token = auth::mint().context("minting a token")?;
            store.issue_token(&id, &token.stored, now)?;
            say!("{}", token.plaintext)?;
        }
        TokenCommand::Revoke {
            id,
            allow_bootstrap,
        } => {
            let n = store.revoke_tokens(&id, now, allow_bootstrap)?;
            if allow_bootstrap {
                eprintln!(
                    "revoked {n} token(s) of `{id}`; its next register without a token mints one"
                );
            } else {
                eprintln!(
                    "revoked {n} token(s) of `{id}`; it refuses every request until `heartgate token issue {id}`"
                );
            }
        }
    }
    Ok(())
}

/// `heartgate db ...`.
pub(crate) fn db(db: &Path, cmd: DbCommand) -> Result<()> {
    match cmd {
        DbCommand::Init => {
            let created = !heartgate::Database::from(db).is_postgres() && !db.exists();
            open_store(db)?;
            let shown = heartgate::Database::from(db).describe();
            if created {
                say!("created the database {shown}")?;
            } else {
                say!("the database {shown} is ready (migrated to this binary's schema)")?;
            }
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
            print_json(&backup)?;
        }
    }
    Ok(())
}

/// `heartgate reconcile ...`.
pub(crate) fn reconcile(db: &Path, cmd: ReconcileCommand) -> Result<()> {
    let store = open_existing_store(db)?;
    match cmd {
        ReconcileCommand::List { workspace } => {
            for run in store.reconcile_runs(workspace.as_deref())? {
                print_json(&run)?;
            }
        }
        ReconcileCommand::Show { id } => match store.reconcile_run(id)? {
            Some(run) => say!("{}", serde_json::to_string_pretty(&run)?)?,
            None => bail!("no reconcile run {id}"),
        },
    }
    Ok(())
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
