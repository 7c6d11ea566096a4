//! Read models for operators: reconcile runs and plugins per workspace, for
//! the admin API (`GET /admin/...`) and the CLI, and a workspace's public
//! state (`GET /workspaces/{id}`, `workspace show`). Blocking.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::deliverer::Secret;
use crate::deliverer::volume;
use crate::policy_set::PolicySet;
use crate::store::{
    DeclaredPlugin, InstalledPlugin, ReconcileRun, Store, StoreError, WorkspaceRecord,
};

/// An installed plugin and whether its files are there.
#[derive(Clone, Debug, Serialize)]
pub struct InstalledView {
    #[serde(flatten)]
    pub plugin: InstalledPlugin,
    /// The files are present and complete in the config volume.
    pub present: bool,
}

/// A workspace's plugins.
#[derive(Clone, Debug, Serialize)]
pub struct PluginsView {
    pub workspace_id: String,
    pub declared: Vec<DeclaredPlugin>,
    pub installed: Vec<InstalledView>,
}

/// A workspace's public state, as `GET /workspaces/{id}` answers it and
/// `heartgate workspace show` prints it (with more for the operator): what
/// the runtime last reported and what the service decided. No token, no
/// secret.
pub fn workspace_view(rec: &WorkspaceRecord) -> serde_json::Value {
    let card = rec
        .agent_card
        .as_deref()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "id": rec.id,
        "name": rec.name,
        "kind": rec.kind,
        "runtime": rec.runtime,
        "status": rec.status,
        "status_since_ms": rec.status_since_ms,
        "url": rec.url,
        "delivery_mode": rec.delivery_mode,
        "agent_card": card,
        "active_tasks": rec.active_tasks,
        "current_task": rec.current_task,
        "uptime_seconds": rec.uptime_seconds,
        "last_error_rate": rec.last_error_rate,
        "last_sample_error": rec.last_sample_error,
        "last_heartbeat_ms": rec.last_heartbeat_ms,
        "last_heartbeat_at": rec.last_heartbeat_ms.map(crate::clock::rfc3339),
        "capabilities": rec.capabilities,
        "idle_timeout_seconds": rec.idle_timeout_seconds,
    })
}

/// What the admin API reads from.
pub struct Admin {
    store: Arc<dyn Store>,
    configs_root: PathBuf,
    token: Option<Secret>,
    policies: Arc<PolicySet>,
}

impl Admin {
    pub fn new(
        store: Arc<dyn Store>,
        configs_root: PathBuf,
        token: Option<Secret>,
        policies: Arc<PolicySet>,
    ) -> Admin {
        Admin {
            store,
            configs_root,
            token,
            policies,
        }
    }

    /// The policy set (push, stage, activate, roll back, evaluate).
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// The admin token's SHA-256, if one is configured and set.
    pub fn token_hash(&self) -> Option<Vec<u8>> {
        self.token
            .as_ref()
            .and_then(Secret::resolve)
            .map(|t| crate::auth::hash(&t))
    }

    pub fn runs(&self, workspace_id: Option<&str>) -> Result<Vec<ReconcileRun>, StoreError> {
        self.store.reconcile_runs(workspace_id)
    }

    pub fn run(&self, id: i64) -> Result<Option<ReconcileRun>, StoreError> {
        self.store.reconcile_run(id)
    }

    /// `None` for an unknown workspace.
    pub fn plugins(&self, workspace_id: &str) -> Result<Option<PluginsView>, StoreError> {
        plugins(self.store.as_ref(), &self.configs_root, workspace_id)
    }
}

/// A workspace's declared and installed plugins, with presence on disk.
pub fn plugins(
    store: &dyn Store,
    configs_root: &std::path::Path,
    workspace_id: &str,
) -> Result<Option<PluginsView>, StoreError> {
    let plan = match store.reconcile_plan(workspace_id) {
        Ok(plan) => plan,
        Err(StoreError::UnknownWorkspace(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let installed = plan
        .installed
        .into_iter()
        .map(|plugin| InstalledView {
            present: volume::is_present(configs_root, workspace_id, &plugin.name),
            plugin,
        })
        .collect();
    Ok(Some(PluginsView {
        workspace_id: workspace_id.to_string(),
        declared: plan.declared,
        installed,
    }))
}
