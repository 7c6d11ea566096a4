//! Workspace config volumes on disk: `<configs_root>/<workspace id>/`.
//!
//! A plugin lives at `plugins/<name>/` and is complete when its `.complete`
//! marker is there. Delivery is a sequence of whole-directory renames on one
//! filesystem: the new tree is copied into `plugins/.staging/<name>.<run>/`
//! and marked complete, the old tree is moved to
//! `plugins/.previous/<name>.<run>/`, the new one is renamed into place, and
//! the old one is removed. A crash at any point leaves either the old or the
//! new version at `plugins/<name>/`, or none with the old one in `.previous`,
//! which [`recover`] moves back before anything else touches the volume.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::source::check_name;
use super::stage::{StageError, StageLimits, Tally, copy_tree};

/// The marker file of a complete plugin.
pub const COMPLETE_MARKER: &str = ".complete";

/// What the completion marker records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteMarker {
    pub name: String,
    pub source: String,
    pub tracked_ref: String,
    pub installed_sha: Option<String>,
    pub run_id: i64,
    pub files: usize,
    pub bytes: u64,
}

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("workspace id `{0}` cannot name a directory")]
    BadWorkspaceId(String),
    #[error("{0}")]
    Name(#[from] super::source::SourceError),
    #[error("copying into the volume: {0}")]
    Copy(#[from] StageError),
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeliverError {
    let context = context.into();
    move |error| DeliverError::Io { context, error }
}

fn check_workspace_id(id: &str) -> Result<(), DeliverError> {
    if crate::model::valid_workspace_id(id) {
        Ok(())
    } else {
        Err(DeliverError::BadWorkspaceId(id.to_string()))
    }
}

/// The config volume of a workspace.
pub fn workspace_dir(root: &Path, workspace_id: &str) -> Result<PathBuf, DeliverError> {
    check_workspace_id(workspace_id)?;
    Ok(root.join(workspace_id))
}

/// Where plugin `name` of a workspace lives.
pub fn plugin_dir(root: &Path, workspace_id: &str, name: &str) -> Result<PathBuf, DeliverError> {
    check_name(name)?;
    Ok(workspace_dir(root, workspace_id)?
        .join("plugins")
        .join(name))
}

/// Whether the plugin's files are present and complete.
pub fn is_present(root: &Path, workspace_id: &str, name: &str) -> bool {
    let Ok(dir) = plugin_dir(root, workspace_id, name) else {
        return false;
    };
    std::fs::read(dir.join(COMPLETE_MARKER))
        .ok()
        .and_then(|b| serde_json::from_slice::<CompleteMarker>(&b).ok())
        .is_some_and(|m| m.name == name)
}

/// Whether the runtime rendered the management MCP server into its settings
/// (`.claude/settings.json`, `mcpServers.molecule-platform`), the way the
/// runtime itself decides `mcp_server_present`.
pub fn settings_have_mcp(root: &Path, workspace_id: &str, server: &str) -> bool {
    let Ok(dir) = workspace_dir(root, workspace_id) else {
        return false;
    };
    std::fs::read(dir.join(".claude/settings.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["mcpServers"].get(server).is_some())
}

/// Undo interrupted deliveries: a plugin whose directory is missing while an
/// old version waits in `.previous` gets the old version back; leftovers of
/// `.staging` and `.previous` are removed. Returns the plugins restored.
pub fn recover(root: &Path, workspace_id: &str) -> Result<Vec<String>, DeliverError> {
    let plugins = workspace_dir(root, workspace_id)?.join("plugins");
    let previous = plugins.join(".previous");
    let mut restored = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&previous) {
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        // Newest run last, so the most recent old version wins.
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let file_name = entry.file_name().to_string_lossy().to_string();
            let Some((name, _run)) = file_name.rsplit_once('.') else {
                continue;
            };
            let target = plugins.join(name);
            if check_name(name).is_ok() && !target.exists() {
                std::fs::rename(entry.path(), &target)
                    .map_err(io(format!("restoring `{name}` from `.previous`")))?;
                restored.push(name.to_string());
            } else {
                std::fs::remove_dir_all(entry.path())
                    .map_err(io(format!("removing `.previous/{file_name}`")))?;
            }
        }
    }
    let staging = plugins.join(".staging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io("removing `.staging`"))?;
    }
    Ok(restored)
}

/// Where a crash test asks delivery to stop: with `HEARTGATE_FAILPOINT` set to
/// `before-swap:<path>`, delivery writes `<path>` once the new version is
/// staged and then waits forever, so the test can kill the process there.
fn failpoint_before_swap() {
    let Ok(value) = std::env::var("HEARTGATE_FAILPOINT") else {
        return;
    };
    let Some(path) = value.strip_prefix("before-swap:") else {
        return;
    };
    tracing::warn!("failpoint before-swap reached; waiting to be killed");
    if std::fs::write(path, b"reached").is_ok() {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Deliver the staged tree at `staged` as plugin `marker.name`, atomically.
pub fn deliver(
    root: &Path,
    workspace_id: &str,
    staged: &Path,
    marker: &CompleteMarker,
    limits: StageLimits,
) -> Result<Tally, DeliverError> {
    let target = plugin_dir(root, workspace_id, &marker.name)?;
    recover(root, workspace_id)?;
    let plugins = workspace_dir(root, workspace_id)?.join("plugins");
    let slot = format!("{}.{}", marker.name, marker.run_id);
    let staging = plugins.join(".staging").join(&slot);
    let previous_dir = plugins.join(".previous");
    let previous = previous_dir.join(&slot);

    let tally = copy_tree(staged, &staging, limits)?;
    let marker_json = serde_json::to_vec_pretty(marker).map_err(|e| DeliverError::Io {
        context: "encoding the completion marker".into(),
        error: std::io::Error::other(e),
    })?;
    std::fs::write(staging.join(COMPLETE_MARKER), marker_json)
        .map_err(io("writing the completion marker"))?;
    failpoint_before_swap();

    std::fs::create_dir_all(&previous_dir).map_err(io("creating `.previous`"))?;
    let had_old = target.exists();
    if had_old {
        std::fs::rename(&target, &previous).map_err(io("moving the old version aside"))?;
    }
    if let Err(e) = std::fs::rename(&staging, &target) {
        if had_old {
            // Put the old version back; if even that fails, `recover` will.
            let _ = std::fs::rename(&previous, &target);
        }
        return Err(io("swapping the new version in")(e));
    }
    if had_old && let Err(e) = std::fs::remove_dir_all(&previous) {
        tracing::warn!(error = %e, "could not remove the previous version; recover() will");
    }
    // Leave no empty bookkeeping directories behind (another delivery of the
    // same workspace may still use them: then they are not empty).
    let _ = std::fs::remove_dir(plugins.join(".staging"));
    let _ = std::fs::remove_dir(&previous_dir);
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(name: &str, run_id: i64) -> CompleteMarker {
        CompleteMarker {
            name: name.into(),
            source: "local://x".into(),
            tracked_ref: "none".into(),
            installed_sha: None,
            run_id,
            files: 1,
            bytes: 1,
        }
    }

    #[test]
    fn delivers_replaces_and_recovers() {
        let root = tempfile::tempdir().unwrap();
        let v1 = tempfile::tempdir().unwrap();
        std::fs::write(v1.path().join("version"), "1").unwrap();
        assert!(!is_present(root.path(), "ws", "p"));
        deliver(
            root.path(),
            "ws",
            v1.path(),
            &marker("p", 1),
            StageLimits::default(),
        )
        .unwrap();
        assert!(is_present(root.path(), "ws", "p"));

        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("version"), "2").unwrap();
        deliver(
            root.path(),
            "ws",
            v2.path(),
            &marker("p", 2),
            StageLimits::default(),
        )
        .unwrap();
        let dir = plugin_dir(root.path(), "ws", "p").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("version")).unwrap(), "2");
        assert!(!root.path().join("ws/plugins/.previous/p.2").exists());

        // A crash between moving the old version aside and swapping in.
        std::fs::create_dir_all(root.path().join("ws/plugins/.previous")).unwrap();
        std::fs::rename(&dir, root.path().join("ws/plugins/.previous/p.3")).unwrap();
        std::fs::create_dir_all(root.path().join("ws/plugins/.staging/p.3")).unwrap();
        assert!(!is_present(root.path(), "ws", "p"));
        assert_eq!(recover(root.path(), "ws").unwrap(), vec!["p".to_string()]);
        assert_eq!(std::fs::read_to_string(dir.join("version")).unwrap(), "2");
        assert!(!root.path().join("ws/plugins/.staging").exists());
    }

    #[test]
    fn hostile_names_never_become_paths() {
        let root = tempfile::tempdir().unwrap();
        assert!(plugin_dir(root.path(), "../x", "p").is_err());
        assert!(plugin_dir(root.path(), "ws", "../../etc").is_err());
        assert!(!is_present(root.path(), "..", "p"));
    }
}
