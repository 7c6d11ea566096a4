//! One verdict, one transaction: the workspace's row is locked
//! (`SELECT ... FOR UPDATE`) and its version checked before anything is
//! written, so verdicts of one workspace computed on different hosts are
//! serialised by the database and the second finds the version moved (a
//! conflict: it writes nothing and is evaluated again). No savepoints:
//! PostgreSQL's own group commit batches concurrent commits.
//!
//! A verdict that records only liveness commits with `synchronous_commit =
//! off`: it is acknowledged once queued anyway (see [`LIVENESS_LOSS_WINDOW`]).

use deadpool_postgres::Transaction;

use crate::model::SilenceKind;
use crate::store::{Applied, NewToken, QueuedRun, StoreError, VerdictWrite};

/// The most liveness PostgreSQL itself can lose if its server crashes:
/// liveness-only verdicts commit without waiting for the WAL flush, which
/// the WAL writer makes within three `wal_writer_delay`s (200 ms by
/// default). A host killed with verdicts in flight loses those too, as on
/// SQLite (they were acknowledged once queued).
pub const LIVENESS_LOSS_WINDOW: std::time::Duration = std::time::Duration::from_millis(600);

/// Apply `w` in `tx`; on a conflict nothing was written (the caller rolls
/// back).
pub(super) async fn apply_in(
    tx: &Transaction<'_>,
    w: &VerdictWrite,
) -> Result<Applied, StoreError> {
    let id = w.workspace_id.as_str();
    // A verdict that records only liveness is acknowledged once queued
    // anyway: its commit does not wait for the WAL flush. Set in the same
    // statement as the row lock (`SET LOCAL` would be a round trip more on
    // every heartbeat).
    let lock = if w.records_only_liveness() {
        "SELECT version, set_config('synchronous_commit', 'off', true)
         FROM workspaces WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT version FROM workspaces WHERE id = $1 FOR UPDATE"
    };
    let row = tx
        .query_opt(&tx.prepare_cached(lock).await?, &[&id])
        .await?;
    let Some(row) = row else {
        return Err(StoreError::UnknownWorkspace(id.to_string()));
    };
    let version: i64 = row.get(0);
    if w.expected_version
        .is_some_and(|expected| expected != version)
    {
        return Ok(Applied::Conflict);
    }

    if let Some(seen) = &w.silence {
        let sql = match seen.kind {
            SilenceKind::HeartbeatExpired => {
                "UPDATE workspaces SET silence_noticed_ms = last_heartbeat_ms
                 WHERE id = $1 AND last_heartbeat_ms IS NOT DISTINCT FROM $2
                     AND silence_noticed_ms IS DISTINCT FROM $2"
            }
            SilenceKind::ProvisionTimeout => {
                "UPDATE workspaces SET silence_noticed_ms = status_since_ms
                 WHERE id = $1 AND status_since_ms IS NOT DISTINCT FROM $2
                     AND silence_noticed_ms IS DISTINCT FROM $2"
            }
        };
        if tx
            .execute(&tx.prepare_cached(sql).await?, &[&id, &seen.since_ms])
            .await?
            == 0
        {
            return Ok(Applied::Conflict);
        }
    }

    if let Some(l) = &w.liveness {
        let tools = l
            .loaded_mcp_tools
            .as_ref()
            .map(|t| serde_json::to_string(t).unwrap_or_default());
        tx.execute(
            &tx.prepare_cached(
                "UPDATE workspaces SET last_heartbeat_ms = $2, last_error_rate = $3,
                     last_sample_error = $4, active_tasks = $5, uptime_seconds = $6,
                     current_task = $7, loaded_mcp_tools = COALESCE($8, loaded_mcp_tools),
                     updated_ms = $2
                 WHERE id = $1 AND status != 'removed'",
            )
            .await?,
            &[
                &id,
                &w.now_ms,
                &l.error_rate,
                &l.sample_error,
                &l.active_tasks,
                &l.uptime_seconds,
                &l.current_task,
                &tools,
            ],
        )
        .await?;
    }

    if let Some(s) = &w.status {
        let changed = tx
            .execute(
                &tx.prepare_cached(
                    "UPDATE workspaces SET status = $2,
                         last_sample_error = COALESCE($3, last_sample_error), updated_ms = $4,
                         status_since_ms = CASE WHEN status = $2 THEN status_since_ms ELSE $4 END
                     WHERE id = $1 AND status = $5",
                )
                .await?,
                &[
                    &id,
                    &s.to.as_str(),
                    &s.message,
                    &w.now_ms,
                    &s.expected.as_str(),
                ],
            )
            .await?;
        if changed == 0 {
            return Ok(Applied::Conflict);
        }
    }

    for m in &w.markers {
        let changed = match (&m.seen, &m.new) {
            (None, Some(new)) => {
                tx.execute(
                    &tx.prepare_cached(
                        "INSERT INTO policy_markers (workspace_id, slot, owner, key, value, updated_ms)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    )
                    .await?,
                    &[&id, &m.slot, &m.owner, &m.key, new, &w.now_ms],
                )
                .await?
            }
            (Some(seen), Some(new)) => {
                tx.execute(
                    &tx.prepare_cached(
                        "UPDATE policy_markers SET value = $5, updated_ms = $6
                         WHERE workspace_id = $1 AND slot = $2 AND owner = $3 AND key = $4
                             AND value = $7",
                    )
                    .await?,
                    &[&id, &m.slot, &m.owner, &m.key, new, &w.now_ms, seen],
                )
                .await?
            }
            (Some(seen), None) => {
                tx.execute(
                    &tx.prepare_cached(
                        "DELETE FROM policy_markers
                         WHERE workspace_id = $1 AND slot = $2 AND owner = $3 AND key = $4
                             AND value = $5",
                    )
                    .await?,
                    &[&id, &m.slot, &m.owner, &m.key, seen],
                )
                .await?
            }
            (None, None) => {
                let present: bool = tx
                    .query_one(
                        &tx.prepare_cached(
                            "SELECT EXISTS(SELECT 1 FROM policy_markers
                             WHERE workspace_id = $1 AND slot = $2 AND owner = $3 AND key = $4)",
                        )
                        .await?,
                        &[&id, &m.slot, &m.owner, &m.key],
                    )
                    .await?
                    .get(0);
                u64::from(!present)
            }
        };
        if changed != 1 {
            return Ok(Applied::Conflict);
        }
    }

    for c in &w.conditions {
        match &c.new {
            Some(new) => {
                tx.execute(
                    &tx.prepare_cached(
                        "INSERT INTO conditions (workspace_id, slot, owner, name, severity, reason,
                             message, since_ms, updated_ms)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
                         ON CONFLICT (workspace_id, slot, owner, name) DO UPDATE SET
                             severity = excluded.severity, reason = excluded.reason,
                             message = excluded.message, updated_ms = excluded.updated_ms",
                    )
                    .await?,
                    &[
                        &id,
                        &c.slot,
                        &c.owner,
                        &c.name,
                        &new.severity.as_str(),
                        &new.reason,
                        &new.message,
                        &w.now_ms,
                    ],
                )
                .await?
            }
            None => {
                tx.execute(
                    &tx.prepare_cached(
                        "DELETE FROM conditions
                         WHERE workspace_id = $1 AND slot = $2 AND owner = $3 AND name = $4",
                    )
                    .await?,
                    &[&id, &c.slot, &c.owner, &c.name],
                )
                .await?
            }
        };
    }

    let d = &w.decision;
    let attempts = i64::from(d.attempts);
    let decision_id: i64 = tx
        .query_one(
            &tx.prepare_cached(
                "INSERT INTO decisions (workspace_id, at_ms, event_kind, chain_version, outcome,
                     input, steps, final_actions, attempts, heartbeats, first_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, NULL) RETURNING id",
            )
            .await?,
            &[
                &id,
                &w.now_ms,
                &d.event_kind,
                &d.chain_version,
                &d.outcome,
                &d.detail.input_json(),
                &d.detail.steps_json(),
                &d.detail.final_actions_json(),
                &attempts,
            ],
        )
        .await?
        .get(0);

    for (event_type, payload) in &w.events {
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO events (workspace_id, event_type, payload, at_ms, decision_id)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await?,
            &[&id, event_type, payload, &w.now_ms, &decision_id],
        )
        .await?;
    }

    let mut queued = Vec::with_capacity(w.reconciles.len());
    for trigger in &w.reconciles {
        let run: i64 = tx
            .query_one(
                &tx.prepare_cached(
                    "INSERT INTO reconcile_runs (workspace_id, trigger, state, requested_ms,
                         decision_id)
                     VALUES ($1, $2, 'queued', $3, $4) RETURNING id",
                )
                .await?,
                &[&id, &trigger.as_str(), &w.now_ms, &decision_id],
            )
            .await?
            .get(0);
        queued.push(QueuedRun {
            id: run,
            workspace_id: id.to_string(),
            trigger: *trigger,
        });
    }

    if let Some(card) = &w.agent_card_backfill {
        tx.execute(
            &tx.prepare_cached(
                "UPDATE workspaces SET agent_card = COALESCE(agent_card, $2),
                     last_register_failure_ms = NULL
                 WHERE id = $1 AND status != 'removed'",
            )
            .await?,
            &[&id, card],
        )
        .await?;
    }

    if let Some(rt) = &w.runtime {
        tx.execute(
            &tx.prepare_cached(
                "UPDATE workspaces SET capabilities = $2, idle_timeout_seconds = $3
                 WHERE id = $1 AND status != 'removed'",
            )
            .await?,
            &[
                &id,
                &serde_json::to_string(&rt.capabilities).unwrap_or_else(|_| "[]".into()),
                &rt.idle_timeout_seconds,
            ],
        )
        .await?;
    }

    if w.stamp_register_failure {
        tx.execute(
            &tx.prepare_cached("UPDATE workspaces SET last_register_failure_ms = $2 WHERE id = $1")
                .await?,
            &[&id, &w.now_ms],
        )
        .await?;
    }

    let mut token_stored = false;
    if let Some(r) = &w.registration {
        tx.execute(
            &tx.prepare_cached(
                "UPDATE workspaces SET url = $2, agent_card = $3, delivery_mode = $4,
                     last_heartbeat_ms = $5, last_register_failure_ms = NULL, updated_ms = $5,
                     capabilities = $6, idle_timeout_seconds = $7
                 WHERE id = $1 AND status != 'removed'",
            )
            .await?,
            &[
                &id,
                &r.url,
                &r.agent_card,
                &r.delivery_mode,
                &w.now_ms,
                &serde_json::to_string(&r.runtime.capabilities).unwrap_or_else(|_| "[]".into()),
                &r.runtime.idle_timeout_seconds,
            ],
        )
        .await?;
        if let Some(token) = &r.new_token {
            let open: bool = tx
                .query_one(
                    &tx.prepare_cached(
                        "SELECT token_bootstrap AND NOT EXISTS(SELECT 1 FROM auth_tokens
                         WHERE workspace_id = $1 AND revoked_ms IS NULL)
                         FROM workspaces WHERE id = $1",
                    )
                    .await?,
                    &[&id],
                )
                .await?
                .get(0);
            if open {
                insert_token(tx, id, token, w.now_ms).await?;
                token_stored = true;
            }
        }
    }

    Ok(Applied::Done {
        decision_id,
        queued,
        token_stored,
    })
}

pub(super) async fn insert_token(
    tx: &Transaction<'_>,
    id: &str,
    token: &NewToken,
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO auth_tokens (workspace_id, token_hash, prefix, created_ms)
             VALUES ($1, $2, $3, $4)",
        )
        .await?,
        &[&id, &token.hash, &token.prefix, &now_ms],
    )
    .await?;
    Ok(())
}
