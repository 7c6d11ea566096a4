//! The schema, as the migrations that build it, in order; the version
//! reached is kept in `PRAGMA user_version`.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::StoreError;

pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE workspaces (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'workspace' CHECK (kind IN ('workspace', 'platform')),
    status TEXT NOT NULL DEFAULT 'provisioning' CHECK (status IN ('provisioning', 'online',
        'offline', 'degraded', 'failed', 'removed', 'paused', 'hibernated', 'hibernating',
        'awaiting_agent')),
    url TEXT,
    agent_card TEXT,
    delivery_mode TEXT NOT NULL DEFAULT 'push' CHECK (delivery_mode IN ('push', 'poll')),
    last_heartbeat_ms INTEGER,
    last_error_rate REAL NOT NULL DEFAULT 0,
    last_sample_error TEXT NOT NULL DEFAULT '',
    active_tasks INTEGER NOT NULL DEFAULT 0,
    uptime_seconds INTEGER NOT NULL DEFAULT 0,
    current_task TEXT,
    loaded_mcp_tools TEXT,
    last_register_failure_ms INTEGER,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
) STRICT;

-- Secrets by name only: their values live in the secret store, never here.
CREATE TABLE workspace_secrets (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, name)
) STRICT;

CREATE TABLE auth_tokens (
    id INTEGER PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    token_hash BLOB NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
) STRICT;
CREATE INDEX auth_tokens_live ON auth_tokens (workspace_id) WHERE revoked_ms IS NULL;

CREATE TABLE declared_plugins (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    plugin_name TEXT NOT NULL,
    source TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, plugin_name)
) STRICT;

CREATE TABLE installed_plugins (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    plugin_name TEXT NOT NULL,
    source TEXT NOT NULL,
    tracked_ref TEXT NOT NULL DEFAULT 'none',
    installed_sha TEXT,
    installed_ms INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, plugin_name)
) STRICT;

CREATE TABLE policy_markers (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, owner, key)
) STRICT;

CREATE TABLE decisions (
    id INTEGER PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    event_kind TEXT NOT NULL,
    chain_version TEXT NOT NULL,
    outcome TEXT NOT NULL,
    input TEXT NOT NULL,
    steps TEXT NOT NULL,
    final_actions TEXT NOT NULL,
    attempts INTEGER NOT NULL
) STRICT;
CREATE INDEX decisions_by_workspace ON decisions (workspace_id, id);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    decision_id INTEGER REFERENCES decisions(id)
) STRICT;
CREATE INDEX events_by_workspace ON events (workspace_id, id);

CREATE TABLE reconcile_runs (
    id INTEGER PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    trigger TEXT NOT NULL CHECK (trigger IN ('online', 'mcp-recovery')),
    state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    requested_ms INTEGER NOT NULL,
    decision_id INTEGER REFERENCES decisions(id),
    started_ms INTEGER,
    finished_ms INTEGER,
    -- How many times a worker started it (a crash re-queues a running run).
    attempts INTEGER NOT NULL DEFAULT 0,
    -- For a failure, the cause in plain words.
    cause TEXT,
    -- JSON: per-plugin results and the restart hook's outcome.
    detail TEXT
) STRICT;
CREATE INDEX reconcile_runs_by_state ON reconcile_runs (state, id);
CREATE INDEX reconcile_runs_by_workspace ON reconcile_runs (workspace_id, id);
"#,
    r#"
-- Policy modules by content, so an activated chain survives restarts and
-- never depends on files staying where they were.
CREATE TABLE policy_modules (
    digest TEXT PRIMARY KEY,
    bytes BLOB NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    uploaded_ms INTEGER NOT NULL,
    uploaded_by TEXT NOT NULL
) STRICT;

-- Chains as staged and activated; at most one is active.
CREATE TABLE chains (
    id INTEGER PRIMARY KEY,
    version TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('staged', 'active', 'retired')),
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    activated_ms INTEGER,
    activated_by TEXT
) STRICT;
CREATE UNIQUE INDEX chains_one_active ON chains (state) WHERE state = 'active';
"#,
    // Replay reads the decision log by time across workspaces.
    r#"
CREATE INDEX decisions_by_time ON decisions (at_ms, id);
"#,
    // A version per workspace, bumped on any change to what a verdict is
    // computed from (by triggers, so that raw SQL and other processes bump it
    // too; a write of the same value is no change): a verdict computed from
    // an older version is a conflict.
    r#"
ALTER TABLE workspaces ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER workspaces_version AFTER UPDATE OF kind, status, last_register_failure_ms,
    delivery_mode ON workspaces
WHEN OLD.kind IS NOT NEW.kind OR OLD.status IS NOT NEW.status
    OR OLD.last_register_failure_ms IS NOT NEW.last_register_failure_ms
    OR OLD.delivery_mode IS NOT NEW.delivery_mode
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.id; END;
CREATE TRIGGER policy_markers_version_insert AFTER INSERT ON policy_markers
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.workspace_id; END;
CREATE TRIGGER policy_markers_version_update AFTER UPDATE ON policy_markers
WHEN OLD.value IS NOT NEW.value OR OLD.key IS NOT NEW.key OR OLD.owner IS NOT NEW.owner
    OR OLD.workspace_id IS NOT NEW.workspace_id
BEGIN UPDATE workspaces SET version = version + 1 WHERE id IN (OLD.workspace_id, NEW.workspace_id); END;
CREATE TRIGGER policy_markers_version_delete AFTER DELETE ON policy_markers
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = OLD.workspace_id; END;
CREATE TRIGGER auth_tokens_version_insert AFTER INSERT ON auth_tokens
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.workspace_id; END;
CREATE TRIGGER auth_tokens_version_update AFTER UPDATE ON auth_tokens
WHEN OLD.revoked_ms IS NOT NEW.revoked_ms OR OLD.token_hash IS NOT NEW.token_hash
    OR OLD.workspace_id IS NOT NEW.workspace_id
BEGIN UPDATE workspaces SET version = version + 1 WHERE id IN (OLD.workspace_id, NEW.workspace_id); END;
CREATE TRIGGER auth_tokens_version_delete AFTER DELETE ON auth_tokens
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = OLD.workspace_id; END;
CREATE TRIGGER declared_plugins_version_insert AFTER INSERT ON declared_plugins
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.workspace_id; END;
CREATE TRIGGER declared_plugins_version_update AFTER UPDATE ON declared_plugins
WHEN OLD.plugin_name IS NOT NEW.plugin_name OR OLD.workspace_id IS NOT NEW.workspace_id
BEGIN UPDATE workspaces SET version = version + 1 WHERE id IN (OLD.workspace_id, NEW.workspace_id); END;
CREATE TRIGGER declared_plugins_version_delete AFTER DELETE ON declared_plugins
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = OLD.workspace_id; END;
CREATE TRIGGER workspace_secrets_version_insert AFTER INSERT ON workspace_secrets
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.workspace_id; END;
CREATE TRIGGER workspace_secrets_version_update AFTER UPDATE ON workspace_secrets
WHEN OLD.name IS NOT NEW.name OR OLD.workspace_id IS NOT NEW.workspace_id
BEGIN UPDATE workspaces SET version = version + 1 WHERE id IN (OLD.workspace_id, NEW.workspace_id); END;
CREATE TRIGGER workspace_secrets_version_delete AFTER DELETE ON workspace_secrets
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = OLD.workspace_id; END;
"#,
    // Liveness-only heartbeats are coalesced: one decision row stands for
    // the `heartbeats` evaluations since `first_at_ms` (its own `at_ms` is the
    // last one's, and so are its input and steps).
    r#"
ALTER TABLE decisions ADD COLUMN heartbeats INTEGER NOT NULL DEFAULT 1;
ALTER TABLE decisions ADD COLUMN first_at_ms INTEGER;
"#,
    // The decision log is pruned oldest first: what points at a decision
    // is found by index.
    r#"
CREATE INDEX events_by_decision ON events (decision_id);
CREATE INDEX reconcile_runs_by_decision ON reconcile_runs (decision_id);
"#,
    // A marker belongs to a slot of the chain and the policy name its
    // module reports: the slot is the host's to assign, so a module pushed
    // into another slot under a built-in's name never sees (or clears) the
    // built-in's markers. Existing markers go to the slot of the active
    // stored chain whose module has their owner's name, else to the
    // built-in chain's slot of that policy, else to a slot named like it.
    r#"
CREATE TABLE policy_markers_by_slot (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    slot TEXT NOT NULL,
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, slot, owner, key)
) STRICT;
INSERT INTO policy_markers_by_slot (workspace_id, slot, owner, key, value, updated_ms)
SELECT m.workspace_id,
    COALESCE(
        (SELECT json_extract(s.value, '$.name')
         FROM chains c, json_each(c.spec, '$.slot') s
         WHERE c.state = 'active' AND m.owner = COALESCE(
             (SELECT p.name FROM policy_modules p
              WHERE 'sha256:' || p.digest = json_extract(s.value, '$.module')),
             CASE json_extract(s.value, '$.module')
                 WHEN 'builtin:gate' THEN 'rca2970-gate'
                 WHEN 'builtin:status-rules' THEN 'status-rules'
                 WHEN 'builtin:recovery-trigger' THEN 'mcp-recovery-trigger'
                 WHEN 'builtin:cooldown' THEN 'recovery-cooldown'
             END)
         LIMIT 1),
        CASE m.owner
            WHEN 'rca2970-gate' THEN 'gate'
            WHEN 'mcp-recovery-trigger' THEN 'recovery-trigger'
            WHEN 'recovery-cooldown' THEN 'cooldown'
            ELSE m.owner
        END),
    m.owner, m.key, m.value, m.updated_ms
FROM policy_markers m;
DROP TABLE policy_markers;
ALTER TABLE policy_markers_by_slot RENAME TO policy_markers;
CREATE TRIGGER policy_markers_version_insert AFTER INSERT ON policy_markers
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.workspace_id; END;
CREATE TRIGGER policy_markers_version_update AFTER UPDATE ON policy_markers
WHEN OLD.value IS NOT NEW.value OR OLD.key IS NOT NEW.key OR OLD.owner IS NOT NEW.owner
    OR OLD.slot IS NOT NEW.slot OR OLD.workspace_id IS NOT NEW.workspace_id
BEGIN UPDATE workspaces SET version = version + 1 WHERE id IN (OLD.workspace_id, NEW.workspace_id); END;
CREATE TRIGGER policy_markers_version_delete AFTER DELETE ON policy_markers
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = OLD.workspace_id; END;
"#,
    // Token bootstrap (a register without a bearer mints the first token)
    // is open only until a workspace has had a token: revoking every token
    // closes the workspace until the operator issues one or reopens
    // bootstrap explicitly. Issuing any token closes it, by trigger, so
    // every writer (the CLI, raw SQL) keeps to the rule.
    r#"
ALTER TABLE workspaces ADD COLUMN token_bootstrap INTEGER NOT NULL DEFAULT 1
    CHECK (token_bootstrap IN (0, 1));
UPDATE workspaces SET token_bootstrap = 0
WHERE EXISTS (SELECT 1 FROM auth_tokens t WHERE t.workspace_id = workspaces.id);
CREATE TRIGGER auth_tokens_close_bootstrap AFTER INSERT ON auth_tokens
BEGIN UPDATE workspaces SET token_bootstrap = 0
      WHERE id = NEW.workspace_id AND token_bootstrap != 0; END;
DROP TRIGGER workspaces_version;
CREATE TRIGGER workspaces_version AFTER UPDATE OF kind, status, last_register_failure_ms,
    delivery_mode, token_bootstrap ON workspaces
WHEN OLD.kind IS NOT NEW.kind OR OLD.status IS NOT NEW.status
    OR OLD.last_register_failure_ms IS NOT NEW.last_register_failure_ms
    OR OLD.delivery_mode IS NOT NEW.delivery_mode
    OR OLD.token_bootstrap IS NOT NEW.token_bootstrap
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.id; END;
"#,
    // Contract 0.2.0: policies' conditions (owned by (slot, owner) like
    // markers, bumping the version like them), the runtime's name and
    // declared capabilities, and when the status was entered. A workspace
    // degraded before conditions existed was degraded by the status rules:
    // it gets their `degraded-before-0-2` condition, which they clear by
    // their recovery rule, so it does not come online on its next
    // unhealthy heartbeat.
    r#"
ALTER TABLE workspaces ADD COLUMN runtime TEXT NOT NULL DEFAULT '';
ALTER TABLE workspaces ADD COLUMN capabilities TEXT NOT NULL DEFAULT '[]';
ALTER TABLE workspaces ADD COLUMN status_since_ms INTEGER;
CREATE TABLE conditions (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    slot TEXT NOT NULL,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    severity TEXT NOT NULL CHECK (severity IN ('degraded', 'failed', 'awaiting_agent', 'offline')),
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, slot, owner, name)
) STRICT;
CREATE TRIGGER conditions_version_insert AFTER INSERT ON conditions
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.workspace_id; END;
CREATE TRIGGER conditions_version_update AFTER UPDATE ON conditions
WHEN OLD.severity IS NOT NEW.severity OR OLD.reason IS NOT NEW.reason
    OR OLD.message IS NOT NEW.message OR OLD.name IS NOT NEW.name OR OLD.owner IS NOT NEW.owner
    OR OLD.slot IS NOT NEW.slot OR OLD.workspace_id IS NOT NEW.workspace_id
BEGIN UPDATE workspaces SET version = version + 1 WHERE id IN (OLD.workspace_id, NEW.workspace_id); END;
CREATE TRIGGER conditions_version_delete AFTER DELETE ON conditions
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = OLD.workspace_id; END;
INSERT INTO conditions (workspace_id, slot, owner, name, severity, reason, message, since_ms, updated_ms)
SELECT id, 'status-rules', 'status-rules', 'degraded-before-0-2', 'degraded',
    'degraded_before_conditions', last_sample_error, updated_ms, updated_ms
FROM workspaces WHERE status = 'degraded';
DROP TRIGGER workspaces_version;
CREATE TRIGGER workspaces_version AFTER UPDATE OF kind, status, last_register_failure_ms,
    delivery_mode, token_bootstrap, runtime, capabilities ON workspaces
WHEN OLD.kind IS NOT NEW.kind OR OLD.status IS NOT NEW.status
    OR OLD.last_register_failure_ms IS NOT NEW.last_register_failure_ms
    OR OLD.delivery_mode IS NOT NEW.delivery_mode
    OR OLD.token_bootstrap IS NOT NEW.token_bootstrap
    OR OLD.runtime IS NOT NEW.runtime OR OLD.capabilities IS NOT NEW.capabilities
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.id; END;
"#,
    // 10: noticing silence. A workspace's silence deadline is derived from
    // the liveness fields register and heartbeat already write (its last
    // heartbeat, or when `provisioning` began), through partial indexes: no
    // write per heartbeat for it. `silence_noticed_ms` keeps which
    // reference a silence verdict was evaluated for, so each deadline is
    // evaluated once and leaves the index (a heartbeat moves it back in).
    // `sweeps` keeps when a sweep last ran, by any host, and when the last
    // outage (no sweep for a while) ended. None of these bump the version.
    r#"
ALTER TABLE workspaces ADD COLUMN silence_noticed_ms INTEGER;
UPDATE workspaces SET status_since_ms = updated_ms WHERE status_since_ms IS NULL;
CREATE INDEX workspaces_heartbeat_deadline ON workspaces (last_heartbeat_ms, id)
    WHERE status IN ('online', 'degraded', 'failed')
        AND silence_noticed_ms IS NOT last_heartbeat_ms;
CREATE INDEX workspaces_provision_deadline ON workspaces (status_since_ms, id)
    WHERE status = 'provisioning' AND silence_noticed_ms IS NOT status_since_ms;
CREATE TABLE sweeps (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    up_since_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL
) STRICT;
"#,
    // 11: wire parity with the original registry. The runtime's declared
    // idle timeout (with its capabilities, what policies see: it bumps the
    // version), and the platform inbound secret, minted on first use and
    // returned to the runtime (not part of the version: the read that
    // confirms a cached snapshot's version reads it too).
    r#"
ALTER TABLE workspaces ADD COLUMN idle_timeout_seconds INTEGER;
ALTER TABLE workspaces ADD COLUMN platform_inbound_secret TEXT;
DROP TRIGGER workspaces_version;
CREATE TRIGGER workspaces_version AFTER UPDATE OF kind, status, last_register_failure_ms,
    delivery_mode, token_bootstrap, runtime, capabilities, idle_timeout_seconds ON workspaces
WHEN OLD.kind IS NOT NEW.kind OR OLD.status IS NOT NEW.status
    OR OLD.last_register_failure_ms IS NOT NEW.last_register_failure_ms
    OR OLD.delivery_mode IS NOT NEW.delivery_mode
    OR OLD.token_bootstrap IS NOT NEW.token_bootstrap
    OR OLD.runtime IS NOT NEW.runtime OR OLD.capabilities IS NOT NEW.capabilities
    OR OLD.idle_timeout_seconds IS NOT NEW.idle_timeout_seconds
BEGIN UPDATE workspaces SET version = version + 1 WHERE id = NEW.id; END;
"#,
    // 12: activations in order (as on PostgreSQL, where several hosts follow
    // them): each activation gets the next number.
    r#"
ALTER TABLE chains ADD COLUMN activation INTEGER;
UPDATE chains SET activation = id WHERE activated_ms IS NOT NULL;
CREATE TABLE shadow (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    chain_id INTEGER REFERENCES chains(id),
    set_ms INTEGER NOT NULL,
    set_by TEXT NOT NULL
) STRICT;
"#,
    // 13: the activation history, so that rollbacks walk back through it
    // (the chains table keeps only each chain's last activation). What
    // earlier versions recorded becomes a straight line of activations.
    r#"
CREATE TABLE activations (
    id INTEGER PRIMARY KEY,
    chain_id INTEGER NOT NULL REFERENCES chains(id),
    at_ms INTEGER NOT NULL,
    by TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('activate', 'rollback')),
    from_chain INTEGER REFERENCES chains(id),
    back_to INTEGER REFERENCES activations(id)
) STRICT;
INSERT INTO activations (id, chain_id, at_ms, by, kind, from_chain, back_to)
SELECT activation, id, activated_ms, COALESCE(activated_by, 'unknown'), 'activate',
       LAG(id) OVER (ORDER BY activation), LAG(activation) OVER (ORDER BY activation)
FROM chains WHERE activation IS NOT NULL AND activated_ms IS NOT NULL
ORDER BY activation;
"#,
    // 14: a shadow chain's own markers and conditions per workspace (JSON,
    // as the model spells them), so that its cooldowns and conditions take
    // effect in the shadow and never in the real state. Only the chain in
    // shadow has any: setting or stopping the shadow deletes them all, and a
    // write for a chain no longer in shadow is refused.
    r#"
CREATE TABLE shadow_state (
    chain_id INTEGER NOT NULL REFERENCES chains(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    markers TEXT NOT NULL,
    conditions TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (chain_id, workspace_id)
) STRICT;
"#,
];

/// WAL journal mode, then the embedded migrations.
pub(super) fn init(conn: &mut Connection) -> Result<(), StoreError> {
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "sqlite refused WAL journal mode");
    }
    migrate(conn)
}

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > supported {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
    }
    tx.commit()?;
    Ok(())
}
