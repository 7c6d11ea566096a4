//! Staging: fetching a plugin from its source into a temporary directory,
//! validated on the way in.
//!
//! Every path is checked: only regular files and directories are accepted (no
//! symlinks, hard links or devices), no component may be absolute or `..`,
//! and the total size and file count are limited. A `.git` directory is never
//! staged.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process;
use super::source::{GitRef, SourceError};

/// Size limits of one plugin.
#[derive(Clone, Copy, Debug)]
pub struct StageLimits {
    pub max_bytes: u64,
    pub max_files: usize,
}

impl Default for StageLimits {
    fn default() -> Self {
        StageLimits {
            max_bytes: 50 << 20,
            max_files: 10_000,
        }
    }
}

/// Why staging failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("local plugin `{name}` not found under `{}`", dir.display())]
    LocalMissing { name: String, dir: PathBuf },
    #[error("repository `{repo}` is not accessible (HTTP {status}){hint}")]
    NotAccessible {
        repo: String,
        status: u16,
        hint: String,
    },
    #[error("downloading `{url}` failed: {reason}")]
    Download { url: String, reason: String },
    #[error("git failed: {0}")]
    Git(String),
    #[error("the plugin is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the plugin has more than {0} files and directories")]
    TooManyFiles(usize),
    #[error("refused `{path}`: {reason}")]
    BadEntry { path: String, reason: String },
    #[error("the plugin is empty")]
    Empty,
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StageError {
    let context = context.into();
    move |error| StageError::Io { context, error }
}

/// What was staged.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub files: usize,
    pub dirs: usize,
    pub bytes: u64,
}

impl Tally {
    /// Count a directory: every entry counts toward `max_files` (an archive
    /// of nothing but directories still fills a volume's inodes and blocks).
    pub fn add_dir(&mut self, limits: StageLimits) -> Result<(), StageError> {
        self.dirs += 1;
        if self.files + self.dirs > limits.max_files {
            return Err(StageError::TooManyFiles(limits.max_files));
        }
        Ok(())
    }

    /// Count a regular file of `bytes`.
    pub fn add_file(&mut self, bytes: u64, limits: StageLimits) -> Result<(), StageError> {
        self.files += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        if self.files + self.dirs > limits.max_files {
            return Err(StageError::TooManyFiles(limits.max_files));
        }
        if self.bytes > limits.max_bytes {
            return Err(StageError::TooLarge(limits.max_bytes));
        }
        Ok(())
    }
}

/// Copy the tree at `src` into `dst` (created), refusing links and special
/// files and skipping `.git`.
pub fn copy_tree(src: &Path, dst: &Path, limits: StageLimits) -> Result<Tally, StageError> {
    let mut tally = Tally::default();
    std::fs::create_dir_all(dst).map_err(io(format!("creating `{}`", dst.display())))?;
    copy_dir(src, dst, Path::new(""), limits, &mut tally)?;
    Ok(tally)
}

fn copy_dir(
    src: &Path,
    dst: &Path,
    rel: &Path,
    limits: StageLimits,
    tally: &mut Tally,
) -> Result<(), StageError> {
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .map_err(io(format!("reading `{}`", src.display())))?
        .collect::<Result<_, _>>()
        .map_err(io(format!("reading `{}`", src.display())))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        if rel.as_os_str().is_empty() && name == ".git" {
            continue;
        }
        let rel_path = rel.join(&name);
        let ty = entry
            .file_type()
            .map_err(io(format!("reading `{}`", entry.path().display())))?;
        if ty.is_dir() {
            tally.add_dir(limits)?;
            let target = dst.join(&name);
            std::fs::create_dir(&target).map_err(io(format!("creating `{}`", target.display())))?;
            copy_dir(&entry.path(), &target, &rel_path, limits, tally)?;
        } else if ty.is_file() {
            let len = entry
                .metadata()
                .map_err(io(format!("reading `{}`", entry.path().display())))?
                .len();
            tally.add_file(len, limits)?;
            std::fs::copy(entry.path(), dst.join(&name))
                .map_err(io(format!("copying `{}`", rel_path.display())))?;
        } else {
            return Err(StageError::BadEntry {
                path: rel_path.display().to_string(),
                reason: "only regular files and directories are allowed".into(),
            });
        }
    }
    Ok(())
}

/// Extract a `.tar.gz` into `dst`, dropping the archive's top directory
/// (Gitea wraps everything in `<repo>/`).
pub fn extract_tar_gz(bytes: &[u8], dst: &Path, limits: StageLimits) -> Result<Tally, StageError> {
    extract_tar(flate2::read::GzDecoder::new(bytes), dst, limits)
}

/// Extract a tar stream into `dst`, dropping its top directory, as it is
/// read: the limits hold while extracting (a header's size is checked
/// before anything of the entry is written, and no entry may bring more
/// bytes than its header said), and every entry counts toward the file
/// limit, directories included, those made for a file's path too.
pub fn extract_tar(
    reader: impl Read,
    dst: &Path,
    limits: StageLimits,
) -> Result<Tally, StageError> {
    let mut archive = tar::Archive::new(reader);
    let mut tally = Tally::default();
    std::fs::create_dir_all(dst).map_err(io(format!("creating `{}`", dst.display())))?;
    let mut made: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let bad = |path: &Path, reason: &str| StageError::BadEntry {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    for entry in archive.entries().map_err(io("reading the archive"))? {
        let mut entry = entry.map_err(io("reading the archive"))?;
        let path = entry
            .path()
            .map_err(io("reading an archive path"))?
            .into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => parts.push(p.to_owned()),
                Component::CurDir => {}
                Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                    return Err(bad(&path, "path escapes the plugin directory"));
                }
            }
        }
        // Drop the top directory.
        let rel: PathBuf = parts.iter().skip(1).collect();
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                continue;
            }
            return Err(bad(&path, "a file outside the archive's top directory"));
        }
        if rel
            .components()
            .next()
            .is_some_and(|c| c.as_os_str() == ".git")
        {
            continue;
        }
        let target = dst.join(&rel);
        if kind.is_dir() {
            make_dirs(dst, &rel, &mut made, &mut tally, limits)?;
        } else if kind.is_file() {
            let size = entry
                .header()
                .size()
                .map_err(io("reading an archive header"))?;
            tally.add_file(size, limits)?;
            if let Some(parent) = rel.parent() {
                make_dirs(dst, parent, &mut made, &mut tally, limits)?;
            }
            let mut out = std::fs::File::create_new(&target)
                .map_err(io(format!("writing `{}`", rel.display())))?;
            // Never trust the header's size: copy at most what is left.
            let room = limits.max_bytes.saturating_sub(tally.bytes - size) + 1;
            let copied = std::io::copy(&mut (&mut entry).take(room), &mut out)
                .map_err(io(format!("writing `{}`", rel.display())))?;
            if copied > size {
                return Err(StageError::TooLarge(limits.max_bytes));
            }
        } else {
            return Err(bad(&path, "only regular files and directories are allowed"));
        }
    }
    if tally.files == 0 {
        return Err(StageError::Empty);
    }
    Ok(tally)
}

/// Create `rel` and its missing ancestors under `dst`, counting each.
fn make_dirs(
    dst: &Path,
    rel: &Path,
    made: &mut std::collections::HashSet<PathBuf>,
    tally: &mut Tally,
    limits: StageLimits,
) -> Result<(), StageError> {
    let mut at = PathBuf::new();
    for part in rel.components() {
        at.push(part);
        if made.insert(at.clone()) {
            tally.add_dir(limits)?;
            let dir = dst.join(&at);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => return Err(io(format!("creating `{}`", at.display()))(e)),
            }
        }
    }
    Ok(())
}

/// The most a clone of a git source may take on disk: the packed history
/// of a plugin may be larger than the plugin, but not without bound.
pub fn clone_limit(limits: StageLimits) -> u64 {
    limits.max_bytes.saturating_mul(4).max(64 << 20)
}

/// The bytes under `dir` (regular files, not following links).
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => {
                    total = total.saturating_add(entry.metadata().map_or(0, |m| m.len()));
                }
                _ => {}
            }
        }
    }
    total
}

/// Clone `url` at `reference` with the system `git` and export its tree at
/// that commit (without `.git`) into `dst`. Returns the commit.
///
/// The limits hold while staging: the clone has no work tree and is killed
/// once it takes more than [`clone_limit`] on disk; the tree comes out of
/// `git archive` as a stream, extracted under the plugin's limits as it is
/// read (so a small repository holding a huge compressible file is refused
/// before it is written), and `git` is killed when the extraction stops.
pub fn git_clone(
    url: &str,
    reference: &GitRef,
    scratch: &Path,
    dst: &Path,
    limits: StageLimits,
    timeout: Duration,
) -> Result<(String, Tally), StageError> {
    let repo = scratch.join("repo");
    let git_command = |args: &[&str]| {
        let mut cmd = Command::new("git");
        cmd.args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "true")
            .env("GIT_CONFIG_NOSYSTEM", "1");
        cmd
    };
    let clone_max = clone_limit(limits);
    let git = |args: &[&str], watch: bool| -> Result<String, StageError> {
        let done = process::run_watched(git_command(args), timeout, || {
            (watch && disk_usage(&repo) > clone_max)
                .then(|| format!("the clone took more than {clone_max} bytes"))
        })
        .map_err(|e| StageError::Git(format!("cannot run git: {e}")))?;
        if let Some(why) = done.killed {
            return Err(match why {
                process::Killed::Timeout => StageError::Git(format!(
                    "`git {}` took longer than {}s",
                    args.first().copied().unwrap_or_default(),
                    timeout.as_secs()
                )),
                process::Killed::Watch(why) => StageError::Git(why),
            });
        }
        if !done.success() {
            return Err(StageError::Git(done.stderr.trim().to_string()));
        }
        Ok(done.stdout.trim().to_string())
    };
    let repo_s = repo.to_string_lossy().to_string();
    git(
        &["clone", "--quiet", "--no-checkout", "--", url, &repo_s],
        true,
    )?;
    let rev = match reference {
        GitRef::Tag(t) => format!("refs/tags/{t}^{{commit}}"),
        GitRef::Sha(s) => format!("{s}^{{commit}}"),
        GitRef::Branch(b) => format!("refs/remotes/origin/{b}^{{commit}}"),
        GitRef::Default => "HEAD^{commit}".to_string(),
    };
    let sha = git(
        &["-C", &repo_s, "rev-parse", "--verify", "--quiet", &rev],
        false,
    )
    .map_err(|_| StageError::Git(format!("ref `{rev}` not found in `{url}`")))?;
    if let GitRef::Sha(pinned) = reference
        && !sha.starts_with(pinned.as_str())
    {
        return Err(StageError::Git(format!("`{pinned}` resolved to `{sha}`")));
    }
    let tally = process::stream(
        git_command(&[
            "-C",
            &repo_s,
            "archive",
            "--format=tar",
            "--prefix=plugin/",
            &sha,
        ]),
        timeout,
        |stdout| extract_tar(stdout, dst, limits),
    )
    .map_err(|e| StageError::Git(format!("cannot run git: {e}")))?;
    let tally = match tally {
        process::Streamed::Done(result) => result?,
        process::Streamed::TimedOut => {
            return Err(StageError::Git(format!(
                "`git archive` took longer than {}s",
                timeout.as_secs()
            )));
        }
        process::Streamed::Failed(stderr) => return Err(StageError::Git(stderr)),
    };
    Ok((sha, tally))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_gz(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (path, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            // Write the raw name so hostile paths reach the extractor as-is.
            let name = header.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn extracts_below_the_top_directory() {
        let dir = tempfile::tempdir().unwrap();
        let archive = tar_gz(&[
            ("repo/", tar::EntryType::Directory, b""),
            ("repo/plugin.yaml", tar::EntryType::Regular, b"name: x\n"),
            ("repo/skills/a.md", tar::EntryType::Regular, b"# a\n"),
        ]);
        let tally = extract_tar_gz(&archive, dir.path(), StageLimits::default()).unwrap();
        assert_eq!(tally.files, 2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("skills/a.md")).unwrap(),
            "# a\n"
        );
    }

    #[test]
    fn refuses_traversal_links_and_oversize() {
        let limits = StageLimits {
            max_bytes: 10,
            max_files: 2,
        };
        let cases: Vec<Vec<u8>> = vec![
            tar_gz(&[("repo/../../evil", tar::EntryType::Regular, b"x")]),
            tar_gz(&[("/etc/evil", tar::EntryType::Regular, b"x")]),
            tar_gz(&[("repo/link", tar::EntryType::Symlink, b"")]),
            tar_gz(&[("repo/hard", tar::EntryType::Link, b"")]),
            tar_gz(&[("repo/big", tar::EntryType::Regular, &[0u8; 11])]),
            tar_gz(&[
                ("repo/a", tar::EntryType::Regular, b"1"),
                ("repo/b", tar::EntryType::Regular, b"1"),
                ("repo/c", tar::EntryType::Regular, b"1"),
            ]),
            tar_gz(&[("toplevel", tar::EntryType::Regular, b"1")]),
            b"not a gzip stream".to_vec(),
        ];
        for (i, archive) in cases.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let dst = dir.path().join("out");
            assert!(extract_tar_gz(archive, &dst, limits).is_err(), "case {i}");
            assert!(!dir.path().join("evil").exists());
        }
    }

    #[cfg(unix)]
    #[test]
    fn copy_tree_refuses_symlinks_and_skips_git() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join(".git")).unwrap();
        std::fs::write(src.path().join(".git/config"), "x").unwrap();
        std::fs::write(src.path().join("plugin.yaml"), "name: x").unwrap();
        let dst = tempfile::tempdir().unwrap();
        let tally = copy_tree(src.path(), &dst.path().join("p"), StageLimits::default()).unwrap();
        assert_eq!(tally.files, 1);
        assert!(!dst.path().join("p/.git").exists());

        std::os::unix::fs::symlink("/etc/passwd", src.path().join("leak")).unwrap();
        let dst = tempfile::tempdir().unwrap();
        assert!(copy_tree(src.path(), &dst.path().join("p"), StageLimits::default()).is_err());
    }
}
