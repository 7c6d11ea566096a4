//! The snapshot cache both stores keep: snapshots by workspace id, each
//! used only once the database has confirmed its version (one indexed read),
//! so an entry may be stale but an answer never is.

use std::sync::Mutex;

use crate::store::{Applied, SNAPSHOT_CACHE_ENTRIES, Snapshot, StoreError, VerdictWrite};

/// The snapshot cache. A snapshot here may be stale (another process or
/// host changed the workspace); the writer's version check catches that.
#[derive(Default)]
pub(crate) struct SnapshotCache {
    entries: Mutex<std::collections::HashMap<String, Snapshot>>,
}

impl SnapshotCache {
    pub(crate) fn get(&self, id: &str) -> Option<Snapshot> {
        self.entries.lock().ok()?.get(id).cloned()
    }

    pub(crate) fn put(&self, snapshot: &Snapshot) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= SNAPSHOT_CACHE_ENTRIES
                && !entries.contains_key(&snapshot.workspace.id)
            {
                entries.clear();
            }
            entries.insert(snapshot.workspace.id.clone(), snapshot.clone());
        }
    }

    pub(crate) fn forget(&self, id: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(id);
        }
    }
}

/// Whether a verdict's outcome makes a cached snapshot of its workspace
/// stale: it wrote more than liveness and its decision, or it found the
/// workspace changed.
pub(crate) fn changes_snapshot(w: &VerdictWrite, result: &Result<Applied, StoreError>) -> bool {
    match result {
        Ok(Applied::Done { .. }) => {
            w.status.is_some()
                || !w.markers.is_empty()
                || !w.conditions.is_empty()
                || w.registration.is_some()
                || w.stamp_register_failure
        }
        Ok(Applied::Coalesced) => false,
        Ok(Applied::Conflict) | Err(_) => true,
    }
}
