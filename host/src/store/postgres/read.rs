//! Reads: the snapshot a verdict is computed from (one repeatable-read
//! transaction, its parts read concurrently on one connection) and the rows
//! operators read, mapped from SQL.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::auth::InboundSecret;
use crate::model::{Condition, Marker, Severity, Status, Workspace, WorkspaceKind};
pub(super) use crate::store::json_or_null;
use crate::store::{
    Activation, DecisionRow, DeclaredPlugin, InstalledPlugin, READING_CONDITIONS, READING_MARKERS,
    READING_PLUGINS, READING_ROW, READING_TOKENS, ReconcileRun, Snapshot, StoreError, StoredChain,
    StoredModule, WorkspaceRecord,
};

fn bad(what: &str, value: &str) -> StoreError {
    StoreError::Failed(format!("unknown {what} `{value}` in the database"))
}

pub(super) fn parse_status(s: &str) -> Result<Status, StoreError> {
    Status::parse(s).ok_or_else(|| bad("status", s))
}

pub(super) fn parse_kind(s: &str) -> Result<WorkspaceKind, StoreError> {
    WorkspaceKind::parse(s).ok_or_else(|| bad("kind", s))
}

fn failed(what: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Read {
        what,
        source: source.into(),
    }
}

pub(super) const CHAIN_COLUMNS: &str = "SELECT id, version, spec, state, created_ms, created_by,
    activated_ms, activated_by, activation FROM chains";

pub(super) fn chain_from_row(r: &Row) -> StoredChain {
    StoredChain {
        id: r.get(0),
        version: r.get(1),
        spec: r.get(2),
        state: r.get(3),
        created_ms: r.get(4),
        created_by: r.get(5),
        activated_ms: r.get(6),
        activated_by: r.get(7),
        activation: r.get(8),
    }
}

pub(super) const ACTIVATION_COLUMNS: &str =
    "SELECT a.id, a.chain_id, c.version, a.at_ms, a.by, a.kind, a.from_chain, a.back_to
     FROM activations a JOIN chains c ON c.id = a.chain_id";

pub(super) fn activation_from_row(r: &Row) -> Activation {
    Activation {
        id: r.get(0),
        chain_id: r.get(1),
        chain_version: r.get(2),
        at_ms: r.get(3),
        by: r.get(4),
        kind: r.get(5),
        from_chain: r.get(6),
        back_to: r.get(7),
    }
}

pub(super) const DECISION_COLUMNS: &str =
    "SELECT id, workspace_id, at_ms, event_kind, chain_version,
    outcome, input, steps, final_actions, attempts, heartbeats, first_at_ms FROM decisions";

pub(super) fn decision_from_row(r: &Row) -> DecisionRow {
    DecisionRow {
        id: r.get(0),
        workspace_id: r.get(1),
        at_ms: r.get(2),
        event_kind: r.get(3),
        chain_version: r.get(4),
        outcome: r.get(5),
        input: json_or_null(r.get(6)),
        steps: json_or_null(r.get(7)),
        final_actions: json_or_null(r.get(8)),
        attempts: r.get(9),
        heartbeats: r.get(10),
        first_at_ms: r.get(11),
    }
}

pub(super) const RUN_COLUMNS: &str =
    "SELECT id, workspace_id, trigger, state, requested_ms, decision_id,
    started_ms, finished_ms, attempts, cause, detail FROM reconcile_runs";

pub(super) fn run_from_row(r: &Row) -> ReconcileRun {
    ReconcileRun {
        id: r.get(0),
        workspace_id: r.get(1),
        trigger: r.get(2),
        state: r.get(3),
        requested_ms: r.get(4),
        decision_id: r.get(5),
        started_ms: r.get(6),
        finished_ms: r.get(7),
        attempts: r.get(8),
        cause: r.get(9),
        detail: r.get::<_, Option<String>>(10).map(json_or_null),
    }
}

pub(super) const MODULE_COLUMNS: &str = "SELECT digest, name, version, octet_length(bytes)::BIGINT,
    uploaded_ms, uploaded_by FROM policy_modules";

pub(super) fn module_from_row(r: &Row) -> StoredModule {
    StoredModule {
        module: format!("sha256:{}", r.get::<_, String>(0)),
        name: r.get(1),
        version: r.get(2),
        size: r.get::<_, i64>(3).unsigned_abs(),
        uploaded_ms: r.get(4),
        uploaded_by: r.get(5),
    }
}

/// The stored chains whose spec names module `sha256:<$1>` in a slot (as
/// `FROM` items; the chain is `c`).
pub(super) const CHAINS_USING: &str = "chains c, jsonb_array_elements(c.spec::jsonb -> 'slot') s
    WHERE s ->> 'module' = 'sha256:' || $1";

pub(super) async fn read_installed(
    c: &impl GenericClient,
    workspace_id: &str,
) -> Result<Vec<InstalledPlugin>, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT plugin_name, source, tracked_ref, installed_sha, installed_ms
             FROM installed_plugins WHERE workspace_id = $1 ORDER BY plugin_name",
        )
        .await?;
    Ok(c.query(&stmt, &[&workspace_id])
        .await?
        .iter()
        .map(|r| InstalledPlugin {
            name: r.get(0),
            source: r.get(1),
            tracked_ref: r.get(2),
            installed_sha: r.get(3),
            installed_ms: r.get(4),
        })
        .collect())
}

pub(super) async fn read_conditions(
    c: &impl GenericClient,
    id: &str,
) -> Result<Vec<Condition>, tokio_postgres::Error> {
    let stmt = c
        .prepare_cached(
            "SELECT slot, owner, name, severity, reason, message, since_ms FROM conditions
             WHERE workspace_id = $1 ORDER BY owner, name, slot",
        )
        .await?;
    let rows = c.query(&stmt, &[&id]).await?;
    Ok(rows
        .iter()
        .map(|r| Condition {
            slot: Some(r.get(0)),
            owner: r.get(1),
            name: r.get(2),
            // The column's CHECK admits only known severities.
            severity: Severity::parse(r.get(3)).unwrap_or(Severity::Failed),
            reason: r.get(4),
            message: r.get(5),
            since_ms: r.get(6),
        })
        .collect())
}

/// The snapshot of workspace `id`, read in `c`'s current transaction.
pub(super) async fn read_snapshot(
    c: &impl GenericClient,
    id: &str,
) -> Result<Option<Snapshot>, StoreError> {
    let row = c
        .prepare_cached(
            "SELECT kind, status, last_register_failure_ms, delivery_mode,
                    EXISTS(SELECT 1 FROM workspace_secrets s
                           WHERE s.workspace_id = w.id AND s.name = 'MODEL'),
                    version, token_bootstrap, runtime, capabilities, last_heartbeat_ms,
                    status_since_ms, silence_noticed_ms, idle_timeout_seconds,
                    platform_inbound_secret, agent_card IS NOT NULL
             FROM workspaces w WHERE id = $1",
        )
        .await
        .map_err(failed(READING_ROW))?;
    let Some(row) = c
        .query_opt(&row, &[&id])
        .await
        .map_err(failed(READING_ROW))?
    else {
        return Ok(None);
    };
    let (plugins, markers, tokens) = (
        c.prepare_cached(
            "SELECT plugin_name FROM declared_plugins WHERE workspace_id = $1 ORDER BY plugin_name",
        ),
        c.prepare_cached(
            "SELECT slot, owner, key, value FROM policy_markers WHERE workspace_id = $1
             ORDER BY slot, owner, key",
        ),
        c.prepare_cached(
            "SELECT token_hash FROM auth_tokens WHERE workspace_id = $1 AND revoked_ms IS NULL",
        ),
    );
    let plugins = plugins.await.map_err(failed(READING_PLUGINS))?;
    let markers = markers.await.map_err(failed(READING_MARKERS))?;
    let tokens = tokens.await.map_err(failed(READING_TOKENS))?;
    // Pipelined: the four reads go out together on the one connection.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
    let (conditions, plugins, markers, tokens) = tokio::join!(
        read_conditions(c, id),
        c.query(&plugins, &params),
        c.query(&markers, &params),
        c.query(&tokens, &params),
    );
    let conditions = conditions.map_err(failed(READING_CONDITIONS))?;
    let declared_plugins = plugins
        .map_err(failed(READING_PLUGINS))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let markers = markers
        .map_err(failed(READING_MARKERS))?
        .iter()
        .map(|r| Marker {
            slot: Some(r.get(0)),
            owner: r.get(1),
            key: r.get(2),
            value: r.get(3),
        })
        .collect();
    let live_token_hashes = tokens
        .map_err(failed(READING_TOKENS))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let capabilities: Vec<String> = serde_json::from_str(row.get::<_, &str>(8)).unwrap_or_default();
    Ok(Some(Snapshot {
        workspace: Workspace {
            id: id.to_string(),
            kind: parse_kind(row.get(0))?,
            status: parse_status(row.get(1))?,
            model_configured: row.get(4),
            declared_plugins,
            last_register_failure_ms: row.get(2),
            runtime: row.get(7),
            capabilities,
            idle_timeout_seconds: row.get(12),
            last_heartbeat_ms: row.get(9),
            status_since_ms: row.get(10),
            conditions,
        },
        markers,
        live_token_hashes,
        token_bootstrap: row.get(6),
        delivery_mode: row.get(3),
        version: row.get(5),
        silence_noticed_ms: row.get(11),
        inbound_secret: row
            .get::<_, Option<String>>(13)
            .map(InboundSecret::from_stored),
        has_agent_card: row.get(14),
    }))
}

pub(super) async fn require_workspace(
    c: &impl GenericClient,
    id: &str,
) -> Result<WorkspaceKind, StoreError> {
    let row = c
        .query_opt("SELECT kind FROM workspaces WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| StoreError::UnknownWorkspace(id.to_string()))?;
    parse_kind(row.get(0))
}

pub(super) async fn read_workspace(
    c: &impl GenericClient,
    id: &str,
) -> Result<Option<WorkspaceRecord>, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT id, name, kind, status, url, delivery_mode, last_sample_error,
                    last_error_rate, last_heartbeat_ms, last_register_failure_ms,
                    EXISTS(SELECT 1 FROM workspace_secrets s
                           WHERE s.workspace_id = w.id AND s.name = 'MODEL'),
                    (SELECT COUNT(*) FROM auth_tokens t
                     WHERE t.workspace_id = w.id AND t.revoked_ms IS NULL),
                    token_bootstrap, runtime, status_since_ms, agent_card, active_tasks,
                    current_task, uptime_seconds, capabilities, idle_timeout_seconds
             FROM workspaces w WHERE id = $1",
        )
        .await?;
    let Some(r) = c.query_opt(&stmt, &[&id]).await? else {
        return Ok(None);
    };
    let declared = c
        .prepare_cached(
            "SELECT plugin_name, source FROM declared_plugins WHERE workspace_id = $1
             ORDER BY plugin_name",
        )
        .await?;
    let declared_plugins = c
        .query(&declared, &[&id])
        .await?
        .iter()
        .map(|p| DeclaredPlugin {
            name: p.get(0),
            source: p.get(1),
        })
        .collect();
    let conditions = read_conditions(c, id).await?;
    Ok(Some(WorkspaceRecord {
        id: r.get(0),
        name: r.get(1),
        kind: parse_kind(r.get(2))?,
        status: parse_status(r.get(3))?,
        url: r.get(4),
        delivery_mode: r.get(5),
        last_sample_error: r.get(6),
        last_error_rate: r.get(7),
        last_heartbeat_ms: r.get(8),
        last_register_failure_ms: r.get(9),
        model_configured: r.get(10),
        declared_plugins,
        live_tokens: r.get(11),
        token_bootstrap: r.get(12),
        runtime: r.get(13),
        status_since_ms: r.get(14),
        conditions,
        agent_card: r.get(15),
        active_tasks: r.get(16),
        current_task: r.get(17),
        uptime_seconds: r.get(18),
        capabilities: serde_json::from_str(r.get::<_, &str>(19)).unwrap_or_default(),
        idle_timeout_seconds: r.get(20),
    }))
}
