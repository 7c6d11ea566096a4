//! Reads: the snapshot a verdict is computed from, and the rows operators
//! read, mapped from SQL.

use rusqlite::{Connection, OptionalExtension};

use crate::auth::InboundSecret;
use crate::model::{Condition, Marker, Severity, Status, Workspace, WorkspaceKind};
pub(super) use crate::store::json_or_null;
use crate::store::{
    Activation, DecisionRow, DeclaredPlugin, InstalledPlugin, ReconcileRun, Snapshot, StoreError,
    StoredChain, StoredModule, WorkspaceRecord,
};

pub(super) fn parse_status(s: String) -> rusqlite::Result<Status> {
    Status::parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown status `{s}`").into(),
        )
    })
}

pub(super) fn parse_kind(s: String) -> rusqlite::Result<WorkspaceKind> {
    WorkspaceKind::parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown kind `{s}`").into(),
        )
    })
}

pub(super) const CHAIN_COLUMNS: &str = "SELECT id, version, spec, state, created_ms, created_by,
    activated_ms, activated_by, activation FROM chains";

pub(super) const ACTIVATION_COLUMNS: &str =
    "SELECT a.id, a.chain_id, c.version, a.at_ms, a.by, a.kind, a.from_chain, a.back_to
     FROM activations a JOIN chains c ON c.id = a.chain_id";

pub(super) fn activation_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Activation> {
    Ok(Activation {
        id: r.get(0)?,
        chain_id: r.get(1)?,
        chain_version: r.get(2)?,
        at_ms: r.get(3)?,
        by: r.get(4)?,
        kind: r.get(5)?,
        from_chain: r.get(6)?,
        back_to: r.get(7)?,
    })
}

pub(super) const DECISION_COLUMNS: &str =
    "SELECT id, workspace_id, at_ms, event_kind, chain_version,
    outcome, input, steps, final_actions, attempts, heartbeats, first_at_ms FROM decisions";

pub(super) fn decision_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DecisionRow> {
    Ok(DecisionRow {
        id: r.get(0)?,
        workspace_id: r.get(1)?,
        at_ms: r.get(2)?,
        event_kind: r.get(3)?,
        chain_version: r.get(4)?,
        outcome: r.get(5)?,
        input: json_or_null(r.get(6)?),
        steps: json_or_null(r.get(7)?),
        final_actions: json_or_null(r.get(8)?),
        attempts: r.get(9)?,
        heartbeats: r.get(10)?,
        first_at_ms: r.get(11)?,
    })
}

pub(super) fn chain_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredChain> {
    Ok(StoredChain {
        id: r.get(0)?,
        version: r.get(1)?,
        spec: r.get(2)?,
        state: r.get(3)?,
        created_ms: r.get(4)?,
        created_by: r.get(5)?,
        activated_ms: r.get(6)?,
        activated_by: r.get(7)?,
        activation: r.get(8)?,
    })
}

pub(super) const RUN_COLUMNS: &str =
    "SELECT id, workspace_id, trigger, state, requested_ms, decision_id,
    started_ms, finished_ms, attempts, cause, detail FROM reconcile_runs";

pub(super) fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReconcileRun> {
    Ok(ReconcileRun {
        id: r.get(0)?,
        workspace_id: r.get(1)?,
        trigger: r.get(2)?,
        state: r.get(3)?,
        requested_ms: r.get(4)?,
        decision_id: r.get(5)?,
        started_ms: r.get(6)?,
        finished_ms: r.get(7)?,
        attempts: r.get(8)?,
        cause: r.get(9)?,
        detail: r.get::<_, Option<String>>(10)?.map(json_or_null),
    })
}

pub(super) fn read_installed(
    conn: &Connection,
    workspace_id: &str,
) -> Result<Vec<InstalledPlugin>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT plugin_name, source, tracked_ref, installed_sha, installed_ms
         FROM installed_plugins WHERE workspace_id = ?1 ORDER BY plugin_name",
    )?;
    let rows = stmt
        .query_map([workspace_id], |r| {
            Ok(InstalledPlugin {
                name: r.get(0)?,
                source: r.get(1)?,
                tracked_ref: r.get(2)?,
                installed_sha: r.get(3)?,
                installed_ms: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub(super) fn load_snapshot(
    conn: &mut Connection,
    id: &str,
) -> Result<Option<Snapshot>, StoreError> {
    // One read transaction for the four reads, begun and ended by cached
    // statements: this runs once per heartbeat, so nothing here parses SQL.
    conn.prepare_cached("BEGIN")?.execute([])?;
    let read = read_snapshot(conn, id);
    let end = conn
        .prepare_cached("COMMIT")
        .and_then(|mut s| s.execute([]));
    let snapshot = read?;
    end?;
    Ok(snapshot)
}

pub(super) use crate::store::{
    READING_CONDITIONS, READING_MARKERS, READING_PLUGINS, READING_ROW, READING_TOKENS,
};

/// The conditions in force on workspace `id`, by owner and name.
pub(super) fn read_conditions(
    conn: &Connection,
    id: &str,
) -> Result<Vec<Condition>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT slot, owner, name, severity, reason, message, since_ms FROM conditions
         WHERE workspace_id = ?1 ORDER BY owner, name, slot",
    )?;
    stmt.query_map([id], |r| {
        let severity: String = r.get(3)?;
        Ok(Condition {
            slot: Some(r.get(0)?),
            owner: r.get(1)?,
            name: r.get(2)?,
            severity: Severity::parse(&severity).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    3,
                    rusqlite::types::Type::Text,
                    format!("unknown severity `{severity}`").into(),
                )
            })?,
            reason: r.get(4)?,
            message: r.get(5)?,
            since_ms: r.get(6)?,
        })
    })?
    .collect()
}

pub(super) fn read_snapshot(tx: &Connection, id: &str) -> Result<Option<Snapshot>, StoreError> {
    let failed = |what: &'static str| {
        move |source: rusqlite::Error| StoreError::Read {
            what,
            source: source.into(),
        }
    };
    let row = tx
        .prepare_cached(
            "SELECT kind, status, last_register_failure_ms, delivery_mode,
                    EXISTS(SELECT 1 FROM workspace_secrets s
                           WHERE s.workspace_id = w.id AND s.name = 'MODEL'),
                    version, token_bootstrap, runtime, capabilities, last_heartbeat_ms,
                    status_since_ms, silence_noticed_ms, idle_timeout_seconds,
                    platform_inbound_secret, agent_card IS NOT NULL
             FROM workspaces w WHERE id = ?1",
        )
        .and_then(|mut stmt| {
            stmt.query_row([id], |r| {
                Ok((
                    parse_kind(r.get(0)?)?,
                    parse_status(r.get(1)?)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, bool>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, String>(8)?,
                    r.get::<_, Option<i64>>(9)?,
                    r.get::<_, Option<i64>>(10)?,
                    r.get::<_, Option<i64>>(11)?,
                    r.get::<_, Option<i64>>(12)?,
                    r.get::<_, Option<String>>(13)?,
                    r.get::<_, bool>(14)?,
                ))
            })
            .optional()
        })
        .map_err(failed(READING_ROW))?;
    let Some((
        kind,
        status,
        last_register_failure_ms,
        delivery_mode,
        model_configured,
        version,
        token_bootstrap,
        runtime,
        capabilities,
        last_heartbeat_ms,
        status_since_ms,
        silence_noticed_ms,
        idle_timeout_seconds,
        inbound_secret,
        has_agent_card,
    )) = row
    else {
        return Ok(None);
    };
    let capabilities: Vec<String> = serde_json::from_str(&capabilities).unwrap_or_default();
    let conditions = read_conditions(tx, id).map_err(failed(READING_CONDITIONS))?;
    let declared_plugins = tx
        .prepare_cached(
            "SELECT plugin_name FROM declared_plugins WHERE workspace_id = ?1 ORDER BY plugin_name",
        )
        .and_then(|mut stmt| {
            stmt.query_map([id], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()
        })
        .map_err(failed(READING_PLUGINS))?;
    let markers = tx
        .prepare_cached(
            "SELECT slot, owner, key, value FROM policy_markers WHERE workspace_id = ?1
             ORDER BY slot, owner, key",
        )
        .and_then(|mut stmt| {
            stmt.query_map([id], |r| {
                Ok(Marker {
                    slot: Some(r.get(0)?),
                    owner: r.get(1)?,
                    key: r.get(2)?,
                    value: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()
        })
        .map_err(failed(READING_MARKERS))?;
    let live_token_hashes = tx
        .prepare_cached(
            "SELECT token_hash FROM auth_tokens WHERE workspace_id = ?1 AND revoked_ms IS NULL",
        )
        .and_then(|mut stmt| {
            stmt.query_map([id], |r| r.get(0))?
                .collect::<Result<Vec<Vec<u8>>, _>>()
        })
        .map_err(failed(READING_TOKENS))?;
    Ok(Some(Snapshot {
        workspace: Workspace {
            id: id.to_string(),
            kind,
            status,
            model_configured,
            declared_plugins,
            last_register_failure_ms,
            runtime,
            capabilities,
            idle_timeout_seconds,
            last_heartbeat_ms,
            status_since_ms,
            conditions,
        },
        markers,
        live_token_hashes,
        token_bootstrap,
        delivery_mode,
        version,
        silence_noticed_ms,
        inbound_secret: inbound_secret.map(InboundSecret::from_stored),
        has_agent_card,
    }))
}

pub(super) fn require_workspace(conn: &Connection, id: &str) -> Result<WorkspaceKind, StoreError> {
    conn.query_row("SELECT kind FROM workspaces WHERE id = ?1", [id], |r| {
        parse_kind(r.get(0)?)
    })
    .optional()?
    .ok_or_else(|| StoreError::UnknownWorkspace(id.to_string()))
}

pub(super) fn read_workspace(
    conn: &Connection,
    id: &str,
) -> Result<Option<WorkspaceRecord>, StoreError> {
    let rec = conn
        .query_row(
            "SELECT id, name, kind, status, url, delivery_mode, last_sample_error,
                    last_error_rate, last_heartbeat_ms, last_register_failure_ms,
                    EXISTS(SELECT 1 FROM workspace_secrets s
                           WHERE s.workspace_id = w.id AND s.name = 'MODEL'),
                    (SELECT COUNT(*) FROM auth_tokens t
                     WHERE t.workspace_id = w.id AND t.revoked_ms IS NULL),
                    token_bootstrap, runtime, status_since_ms, agent_card, active_tasks,
                    current_task, uptime_seconds, capabilities, idle_timeout_seconds
             FROM workspaces w WHERE id = ?1",
            [id],
            |r| {
                Ok(WorkspaceRecord {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    kind: parse_kind(r.get(2)?)?,
                    status: parse_status(r.get(3)?)?,
                    url: r.get(4)?,
                    delivery_mode: r.get(5)?,
                    last_sample_error: r.get(6)?,
                    last_error_rate: r.get(7)?,
                    last_heartbeat_ms: r.get(8)?,
                    last_register_failure_ms: r.get(9)?,
                    model_configured: r.get(10)?,
                    declared_plugins: Vec::new(),
                    live_tokens: r.get(11)?,
                    token_bootstrap: r.get(12)?,
                    runtime: r.get(13)?,
                    status_since_ms: r.get(14)?,
                    conditions: Vec::new(),
                    agent_card: r.get(15)?,
                    active_tasks: r.get(16)?,
                    current_task: r.get(17)?,
                    uptime_seconds: r.get(18)?,
                    capabilities: serde_json::from_str(&r.get::<_, String>(19)?)
                        .unwrap_or_default(),
                    idle_timeout_seconds: r.get(20)?,
                })
            },
        )
        .optional()?;
    let Some(mut rec) = rec else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT plugin_name, source FROM declared_plugins WHERE workspace_id = ?1 ORDER BY plugin_name",
    )?;
    rec.declared_plugins = stmt
        .query_map([id], |r| {
            Ok(DeclaredPlugin {
                name: r.get(0)?,
                source: r.get(1)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    rec.conditions = read_conditions(conn, id)?;
    Ok(Some(rec))
}

pub(super) const MODULE_COLUMNS: &str = "SELECT digest, name, version, LENGTH(bytes),
    uploaded_ms, uploaded_by FROM policy_modules";

/// The stored chains whose spec names module `sha256:<?1>` in a slot (as
/// `FROM` items; the chain is `c`).
pub(super) const CHAINS_USING: &str = "chains c, json_each(c.spec, '$.slot') s
    WHERE json_extract(s.value, '$.module') = 'sha256:' || ?1";

pub(super) fn module_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredModule> {
    Ok(StoredModule {
        module: format!("sha256:{}", r.get::<_, String>(0)?),
        name: r.get(1)?,
        version: r.get(2)?,
        size: r.get::<_, i64>(3)?.unsigned_abs(),
        uploaded_ms: r.get(4)?,
        uploaded_by: r.get(5)?,
    })
}
