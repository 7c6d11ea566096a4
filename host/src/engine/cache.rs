//! Compiled components on disk, so that a module is compiled once.
//!
//! wasmtime's own compilation cache (its `cache` feature) keeps the
//! compiled code of every component under a directory, named by a hash of
//! the component's bytes and of the compiler's settings and version; a
//! later compile of the same bytes by a compatible engine loads the code
//! instead. Its worker evicts the least used files past a size and count
//! limit, so the directory does not grow without bound.
//!
//! The directory holds native code that the process will run: it must be as
//! well protected as the binary. It is created with mode 0700; a directory
//! that another user owns, or that its group or others may write, is not
//! used (a warning says why, and every module is compiled as before).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The cache's directory and what it has done in this process.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub dir: PathBuf,
    /// Components loaded from the directory instead of compiled.
    pub hits: usize,
    /// Components compiled and written to the directory.
    pub misses: usize,
}

impl CacheStats {
    pub(super) fn of(cache: &wasmtime::Cache) -> CacheStats {
        CacheStats {
            dir: cache.directory().clone(),
            hits: cache.cache_hits(),
            misses: cache.cache_misses(),
        }
    }
}

/// Where compiled components are kept unless configured otherwise:
/// `HEARTGATE_MODULE_CACHE` (empty or `off`: nowhere), else
/// `$XDG_CACHE_HOME/heartgate/modules`, else `$HOME/.cache/heartgate/modules`.
pub fn default_module_cache_dir() -> Option<PathBuf> {
    let absolute = |v: std::ffi::OsString| {
        let p = PathBuf::from(v);
        p.is_absolute().then_some(p)
    };
    if let Some(v) = std::env::var_os("HEARTGATE_MODULE_CACHE") {
        return (!v.is_empty() && v != "off").then(|| PathBuf::from(v));
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").and_then(absolute) {
        return Some(xdg.join("heartgate/modules"));
    }
    std::env::var_os("HOME")
        .and_then(absolute)
        .map(|home| home.join(".cache/heartgate/modules"))
}

/// The cache in `dir`, or `None` (with a warning) when it cannot be used.
pub(super) fn open(dir: &Path) -> Option<wasmtime::Cache> {
    match try_open(dir) {
        Ok(cache) => Some(cache),
        Err(why) => {
            tracing::warn!(
                dir = %dir.display(),
                "not keeping compiled modules on disk: {why}"
            );
            None
        }
    }
}

fn try_open(dir: &Path) -> Result<wasmtime::Cache, String> {
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("cannot resolve a relative path: {e}"))?
            .join(dir)
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create it: {e}"))?;
    let meta = std::fs::metadata(&dir).map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_dir() {
        return Err("it is not a directory".into());
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "it belongs to uid {}, not to this process (uid {me})",
            meta.uid()
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "its group or others may write it (mode {:o}); `chmod 700` it",
            meta.permissions().mode() & 0o777
        ));
    }
    let mut config = wasmtime::CacheConfig::new();
    config.with_directory(&dir);
    wasmtime::Cache::new(config).map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_others_may_write_is_not_used() {
        let Ok(tmp) = tempfile::tempdir() else {
            return;
        };
        let shared = tmp.path().join("shared");
        assert!(std::fs::create_dir(&shared).is_ok());
        assert!(std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).is_ok());
        let refused = try_open(&shared).err().unwrap_or_default();
        assert!(refused.contains("chmod 700"), "{refused}");

        let fresh = tmp.path().join("a/b/modules");
        assert!(try_open(&fresh).is_ok());
        let mode = std::fs::metadata(&fresh).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o700));

        let file = tmp.path().join("file");
        assert!(std::fs::write(&file, b"x").is_ok());
        assert!(try_open(&file).is_err());
    }
}
