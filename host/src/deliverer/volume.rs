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
//!
//! A volume is hostile ground: the runtime writes it too. Every operation
//! goes through directory handles (`cap_std::fs::Dir`) opened one component
//! at a time without following symlinks, so no path is ever resolved through
//! a link the runtime made, and nothing outside the volume can be reached.
//! What is not a directory or a regular file where one is expected (a
//! symlink, a FIFO, a device, a socket) is refused with the path and what
//! it is, and nothing is touched; files are opened non-blocking (a FIFO
//! cannot hold a thread) and read with a bound.

use std::io::{Read, Write};
use std::path::Path;

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use serde::{Deserialize, Serialize};

use super::source::check_name;
use super::stage::{StageError, StageLimits, Tally};

/// The marker file of a complete plugin.
pub const COMPLETE_MARKER: &str = ".complete";
/// The largest completion marker read.
const MAX_MARKER_BYTES: u64 = 64 << 10;
/// The largest `.claude/settings.json` read.
pub const MAX_SETTINGS_BYTES: u64 = 1 << 20;

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

/// Why a delivery (or a look at a volume) failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("workspace id `{0}` cannot name a directory")]
    BadWorkspaceId(String),
    #[error("{0}")]
    Name(#[from] super::source::SourceError),
    #[error("copying into the volume: {0}")]
    Copy(#[from] StageError),
    /// Something in the volume is not what it must be; nothing was touched.
    #[error("refused `{path}` in the config volume: {what}")]
    Refused { path: String, what: String },
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

fn refused(path: &str, what: impl Into<String>) -> DeliverError {
    DeliverError::Refused {
        path: path.to_string(),
        what: what.into(),
    }
}

/// What an entry is, in words, for a refusal.
fn kind_of(file_type: cap_std::fs::FileType) -> &'static str {
    use cap_std::fs::FileTypeExt as _;
    if file_type.is_symlink() {
        "a symlink"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() || file_type.is_block_device() {
        "a device"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a regular file or a directory"
    }
}

/// Whether `e` says the last component was a symlink (`O_NOFOLLOW`) or not
/// a directory where one was opened as such.
fn is_link_or_not_dir(e: &std::io::Error) -> bool {
    e.raw_os_error().is_some_and(|code| {
        code == rustix::io::Errno::LOOP.raw_os_error()
            || code == rustix::io::Errno::NOTDIR.raw_os_error()
    })
}

/// The directory `name` of `dir` (at `path`, for messages): `None` if
/// there is none (created first when `create`), refused if it is anything
/// but a directory. Never follows a symlink.
fn subdir(dir: &Dir, name: &str, path: &str, create: bool) -> Result<Option<Dir>, DeliverError> {
    match dir.symlink_metadata(name) {
        Ok(meta) if meta.is_dir() => {}
        Ok(meta) => {
            return Err(refused(
                path,
                format!("{} where a directory must be", kind_of(meta.file_type())),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Ok(None);
            }
            match dir.create_dir(name) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(format!("creating `{path}`"))(e)),
            }
        }
        Err(e) => return Err(io(format!("reading `{path}`"))(e)),
    }
    match dir.open_dir_nofollow(name) {
        Ok(d) => Ok(Some(d)),
        // Replaced by a link (or a file) since it was looked at.
        Err(e) if is_link_or_not_dir(&e) => {
            Err(refused(path, "replaced by something not a directory"))
        }
        Err(e) => Err(io(format!("opening `{path}`"))(e)),
    }
}

/// The regular file `name` of `dir`, read whole if it has at most `max`
/// bytes: `None` if there is none, refused if it is anything else (a FIFO
/// is opened without blocking and refused, never read) or larger.
fn read_regular(
    dir: &Dir,
    name: &str,
    path: &str,
    max: u64,
) -> Result<Option<Vec<u8>>, DeliverError> {
    let mut options = OpenOptions::new();
    options.read(true).follow(FollowSymlinks::No).custom_flags(
        i32::try_from((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits())
            .unwrap_or_default(),
    );
    let file = match dir.open_with(name, &options) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if is_link_or_not_dir(&e) => {
            return Err(refused(path, "a symlink where a regular file must be"));
        }
        Err(e) => return Err(io(format!("opening `{path}`"))(e)),
    };
    let meta = file.metadata().map_err(io(format!("reading `{path}`")))?;
    if !meta.is_file() {
        return Err(refused(
            path,
            format!("{} where a regular file must be", kind_of(meta.file_type())),
        ));
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io(format!("reading `{path}`")))?;
    if bytes.len() as u64 > max {
        return Err(refused(path, format!("larger than {max} bytes")));
    }
    Ok(Some(bytes))
}

fn check_workspace_id(id: &str) -> Result<(), DeliverError> {
    if crate::model::valid_workspace_id(id) {
        Ok(())
    } else {
        Err(DeliverError::BadWorkspaceId(id.to_string()))
    }
}

/// A workspace's volume, opened: its directory and its `plugins` directory,
/// as handles.
struct Volume {
    id: String,
    plugins: Dir,
}

impl Volume {
    /// Open `<root>/<id>/plugins` (created when `create`; `None` if absent
    /// otherwise). The configs root itself is the operator's, opened as
    /// configured.
    fn open(root: &Path, id: &str, create: bool) -> Result<Option<Volume>, DeliverError> {
        check_workspace_id(id)?;
        if create {
            Dir::create_ambient_dir_all(root, cap_std::ambient_authority())
                .map_err(io(format!("creating `{}`", root.display())))?;
        }
        let configs = match Dir::open_ambient_dir(root, cap_std::ambient_authority()) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(format!("opening `{}`", root.display()))(e)),
        };
        let Some(ws) = subdir(&configs, id, id, create)? else {
            return Ok(None);
        };
        let Some(plugins) = subdir(&ws, "plugins", "plugins", create)? else {
            return Ok(None);
        };
        Ok(Some(Volume {
            id: id.to_string(),
            plugins,
        }))
    }
}

/// Whether plugin `name` is present and complete in the volume: its
/// directory holds a `.complete` marker naming it. Refused (an error) if
/// anything on the way is not what it must be.
pub fn presence(root: &Path, workspace_id: &str, name: &str) -> Result<bool, DeliverError> {
    check_name(name)?;
    let Some(volume) = Volume::open(root, workspace_id, false)? else {
        return Ok(false);
    };
    let path = format!("plugins/{name}");
    let Some(dir) = subdir(&volume.plugins, name, &path, false)? else {
        return Ok(false);
    };
    let marker = read_regular(
        &dir,
        COMPLETE_MARKER,
        &format!("{path}/{COMPLETE_MARKER}"),
        MAX_MARKER_BYTES,
    )?;
    Ok(marker
        .and_then(|b| serde_json::from_slice::<CompleteMarker>(&b).ok())
        .is_some_and(|m| m.name == name))
}

/// [`presence`], counting a refusal as absent (for read models).
pub fn is_present(root: &Path, workspace_id: &str, name: &str) -> bool {
    presence(root, workspace_id, name).unwrap_or(false)
}

/// Whether the runtime rendered the MCP server `server` into its settings
/// (`.claude/settings.json`, `mcpServers.<server>`), the way the runtime
/// itself decides `mcp_server_present`.
pub fn settings_have_mcp(
    root: &Path,
    workspace_id: &str,
    server: &str,
) -> Result<bool, DeliverError> {
    check_workspace_id(workspace_id)?;
    let configs = match Dir::open_ambient_dir(root, cap_std::ambient_authority()) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(format!("opening `{}`", root.display()))(e)),
    };
    let Some(ws) = subdir(&configs, workspace_id, workspace_id, false)? else {
        return Ok(false);
    };
    let Some(claude) = subdir(&ws, ".claude", ".claude", false)? else {
        return Ok(false);
    };
    let settings = read_regular(
        &claude,
        "settings.json",
        ".claude/settings.json",
        MAX_SETTINGS_BYTES,
    )?;
    Ok(settings
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["mcpServers"].get(server).is_some()))
}

/// Undo interrupted deliveries: a plugin whose directory is missing while an
/// old version waits in `.previous` gets the old version back; leftovers of
/// `.staging` and `.previous` are removed. Returns the plugins restored.
/// Anything in `.previous` or `.staging` that is not a directory refuses the
/// whole recovery before anything is moved.
pub fn recover(root: &Path, workspace_id: &str) -> Result<Vec<String>, DeliverError> {
    let Some(volume) = Volume::open(root, workspace_id, false)? else {
        return Ok(Vec::new());
    };
    recover_in(&volume)
}

fn recover_in(volume: &Volume) -> Result<Vec<String>, DeliverError> {
    let plugins = &volume.plugins;
    let previous = subdir(plugins, ".previous", "plugins/.previous", false)?;
    let staging = subdir(plugins, ".staging", "plugins/.staging", false)?;
    let mut restored = Vec::new();
    if let Some(previous) = &previous {
        let mut entries = Vec::new();
        for entry in previous
            .entries()
            .map_err(io("reading `plugins/.previous`"))?
        {
            let entry = entry.map_err(io("reading `plugins/.previous`"))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let ty = entry
                .file_type()
                .map_err(io(format!("reading `plugins/.previous/{file_name}`")))?;
            if !ty.is_dir() {
                return Err(refused(
                    &format!("plugins/.previous/{file_name}"),
                    format!("{} where a directory must be", kind_of(ty)),
                ));
            }
            entries.push(file_name);
        }
        // Newest run last, so the most recent old version wins.
        entries.sort();
        for file_name in entries {
            let name = file_name
                .rsplit_once('.')
                .map(|(name, _run)| name)
                .filter(|name| check_name(name).is_ok());
            let absent = name.is_some_and(|name| {
                matches!(plugins.symlink_metadata(name), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            });
            match name {
                Some(name) if absent => {
                    previous
                        .rename(&file_name, plugins, name)
                        .map_err(io(format!("restoring `{name}` from `.previous`")))?;
                    restored.push(name.to_string());
                }
                _ => previous
                    .remove_dir_all(&file_name)
                    .map_err(io(format!("removing `.previous/{file_name}`")))?,
            }
        }
    }
    if staging.is_some() {
        plugins
            .remove_dir_all(".staging")
            .map_err(io("removing `.staging`"))?;
    }
    if !restored.is_empty() {
        tracing::warn!(workspace_id = %volume.id, plugins = ?restored,
            "restored plugins an interrupted delivery had moved aside");
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

/// Copy the staged tree at `src` (the service's own scratch directory) into
/// the new directory `dst` of the volume, creating every file and directory
/// afresh (never through an existing name).
fn copy_into(
    src: &Path,
    dst: &Dir,
    rel: &str,
    limits: StageLimits,
    tally: &mut Tally,
) -> Result<(), DeliverError> {
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .map_err(io(format!("reading `{}`", src.display())))?
        .collect::<Result<_, _>>()
        .map_err(io(format!("reading `{}`", src.display())))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let name = entry.file_name();
        let shown = format!("{rel}/{}", name.to_string_lossy());
        let ty = entry
            .file_type()
            .map_err(io(format!("reading `{}`", entry.path().display())))?;
        if ty.is_dir() {
            tally.add_dir(limits).map_err(DeliverError::Copy)?;
            dst.create_dir(&name)
                .map_err(io(format!("creating `{shown}`")))?;
            let sub = dst
                .open_dir_nofollow(&name)
                .map_err(io(format!("opening `{shown}`")))?;
            copy_into(&entry.path(), &sub, &shown, limits, tally)?;
        } else if ty.is_file() {
            let mut from =
                std::fs::File::open(entry.path()).map_err(io(format!("reading `{shown}`")))?;
            let len = from
                .metadata()
                .map_err(io(format!("reading `{shown}`")))?
                .len();
            tally.add_file(len, limits).map_err(DeliverError::Copy)?;
            let mut options = OpenOptions::new();
            options
                .write(true)
                .create_new(true)
                .follow(FollowSymlinks::No);
            let mut to = dst
                .open_with(&name, &options)
                .map_err(io(format!("writing `{shown}`")))?;
            std::io::copy(&mut (&mut from).take(len), &mut to)
                .map_err(io(format!("writing `{shown}`")))?;
        } else {
            return Err(DeliverError::Copy(StageError::BadEntry {
                path: shown,
                reason: "only regular files and directories are allowed".into(),
            }));
        }
    }
    Ok(())
}

/// Deliver the staged tree at `staged` as plugin `marker.name`, atomically.
pub fn deliver(
    root: &Path,
    workspace_id: &str,
    staged: &Path,
    marker: &CompleteMarker,
    limits: StageLimits,
) -> Result<Tally, DeliverError> {
    let name = marker.name.as_str();
    check_name(name)?;
    let volume = Volume::open(root, workspace_id, true)?
        .ok_or_else(|| refused("plugins", "vanished while it was opened"))?;
    recover_in(&volume)?;
    let plugins = &volume.plugins;
    let had_old = match plugins.symlink_metadata(name) {
        Ok(meta) if meta.is_dir() => true,
        Ok(meta) => {
            return Err(refused(
                &format!("plugins/{name}"),
                format!("{} where a directory must be", kind_of(meta.file_type())),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(format!("reading `plugins/{name}`"))(e)),
    };
    let slot = format!("{name}.{}", marker.run_id);
    let staging = subdir(plugins, ".staging", "plugins/.staging", true)?
        .ok_or_else(|| refused("plugins/.staging", "vanished while it was opened"))?;
    staging
        .create_dir(&slot)
        .map_err(io(format!("creating `.staging/{slot}`")))?;
    let new = staging
        .open_dir_nofollow(&slot)
        .map_err(io(format!("opening `.staging/{slot}`")))?;
    let mut tally = Tally::default();
    copy_into(
        staged,
        &new,
        &format!(".staging/{slot}"),
        limits,
        &mut tally,
    )?;
    let marker_json = serde_json::to_vec_pretty(marker).map_err(|e| DeliverError::Io {
        context: "encoding the completion marker".into(),
        error: std::io::Error::other(e),
    })?;
    let mut options = OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .follow(FollowSymlinks::No);
    new.open_with(COMPLETE_MARKER, &options)
        .and_then(|mut f| f.write_all(&marker_json))
        .map_err(io("writing the completion marker"))?;
    failpoint_before_swap();

    let previous = subdir(plugins, ".previous", "plugins/.previous", true)?
        .ok_or_else(|| refused("plugins/.previous", "vanished while it was opened"))?;
    if had_old {
        plugins
            .rename(name, &previous, &slot)
            .map_err(io("moving the old version aside"))?;
    }
    if let Err(e) = staging.rename(&slot, plugins, name) {
        if had_old {
            // Put the old version back; if even that fails, `recover` will.
            let _ = previous.rename(&slot, plugins, name);
        }
        return Err(io("swapping the new version in")(e));
    }
    if had_old && let Err(e) = previous.remove_dir_all(&slot) {
        tracing::warn!(error = %e, "could not remove the previous version; recover() will");
    }
    // Leave no empty bookkeeping directories behind (another delivery of the
    // same workspace may still use them: then they are not empty).
    let _ = plugins.remove_dir(".staging");
    let _ = plugins.remove_dir(".previous");
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
        let dir = root.path().join("ws/plugins/p");
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
        assert!(Volume::open(root.path(), "../x", true).is_err());
        assert!(presence(root.path(), "ws", "../../etc").is_err());
        assert!(!is_present(root.path(), "..", "p"));
    }

    #[cfg(unix)]
    #[test]
    fn links_and_special_files_in_a_volume_are_refused_and_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        std::fs::write(victim.path().join("keep"), "x").unwrap();
        let plugins = root.path().join("ws/plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        // `.previous` a symlink out of the volume.
        std::os::unix::fs::symlink(victim.path(), plugins.join(".previous")).unwrap();
        let err = recover(root.path(), "ws").unwrap_err().to_string();
        assert!(
            err.contains("plugins/.previous") && err.contains("symlink"),
            "{err}"
        );
        assert!(victim.path().join("keep").exists());
        std::fs::remove_file(plugins.join(".previous")).unwrap();
        // A marker that is a FIFO is refused without blocking.
        std::fs::create_dir_all(plugins.join("p")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            plugins.join("p/.complete"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = presence(root.path(), "ws", "p").unwrap_err().to_string();
        assert!(err.contains("FIFO"), "{err}");
        // A marker that links to /dev/zero is refused, not read.
        std::fs::remove_file(plugins.join("p/.complete")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", plugins.join("p/.complete")).unwrap();
        let err = presence(root.path(), "ws", "p").unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        // `plugins` itself a symlink: nothing is written through it.
        std::fs::remove_dir_all(&plugins).unwrap();
        std::os::unix::fs::symlink(victim.path(), &plugins).unwrap();
        let staged = tempfile::tempdir().unwrap();
        std::fs::write(staged.path().join("f"), "1").unwrap();
        let err = deliver(
            root.path(),
            "ws",
            staged.path(),
            &marker("p", 1),
            StageLimits::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`plugins`") && err.contains("symlink"),
            "{err}"
        );
        let left: Vec<_> = std::fs::read_dir(victim.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only `keep` is in the victim directory");
    }
}
