//! Plugin sources: parsing and validating the `source` of a declared plugin.
//!
//! - `local://<name>`: the directory `<plugins_dir>/<name>/` the operator keeps;
//! - `git+<url>#<ref>`: a git repository (`https`, `http`, `ssh` or `file`),
//!   cloned with the system `git`;
//! - `gitea://<owner>/<repo>#<ref>`: a Gitea archive download,
//!   `<base>/api/v1/repos/<owner>/<repo>/archive/<ref>.tar.gz`, with the
//!   configured token.
//!
//! Git refs must be pinned: `#tag:<tag>` or `#sha:<hex>`. A branch (`#main`)
//! or no ref at all is accepted only when the operator allows unpinned
//! sources.

use std::fmt;

/// Why a source or a name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error(
        "plugin name `{0}` must be 1-128 of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit"
    )]
    BadName(String),
    #[error("source `{0}` has an unknown scheme; use local://, git+<url> or gitea://")]
    UnknownScheme(String),
    #[error("source `{raw}`: {reason}")]
    Malformed { raw: String, reason: String },
    #[error("source `{0}` is not pinned: use #tag:<tag> or #sha:<hex>, or allow unpinned sources")]
    Unpinned(String),
}

/// A git ref as a source pins it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GitRef {
    Tag(String),
    Sha(String),
    /// Unpinned: follows a branch.
    Branch(String),
    /// Unpinned: the remote's default branch.
    Default,
}

impl GitRef {
    /// The tracking label stored with the installed plugin.
    pub fn tracked(&self) -> String {
        match self {
            GitRef::Tag(t) => format!("tag:{t}"),
            GitRef::Sha(s) => format!("sha:{s}"),
            GitRef::Branch(_) | GitRef::Default => "none".to_string(),
        }
    }

    fn is_pinned(&self) -> bool {
        matches!(self, GitRef::Tag(_) | GitRef::Sha(_))
    }
}

/// A parsed plugin source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Local {
        name: String,
    },
    Git {
        url: String,
        reference: GitRef,
    },
    Gitea {
        owner: String,
        repo: String,
        reference: GitRef,
    },
}

impl Source {
    /// The tracking label stored with the installed plugin.
    pub fn tracked(&self) -> String {
        match self {
            Source::Local { .. } => "none".to_string(),
            Source::Git { reference, .. } | Source::Gitea { reference, .. } => reference.tracked(),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Local { name } => write!(f, "local://{name}"),
            Source::Git { url, .. } => write!(f, "git+{url}"),
            Source::Gitea { owner, repo, .. } => write!(f, "gitea://{owner}/{repo}"),
        }
    }
}

/// Check a plugin or local source name.
pub fn check_name(name: &str) -> Result<(), SourceError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(SourceError::BadName(name.to_string()))
    }
}

/// A path segment of a Gitea owner or repository.
fn check_segment(source: &str, what: &str, s: &str) -> Result<(), SourceError> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SourceError::Malformed {
            raw: source.to_string(),
            reason: format!("{what} `{s}` is not a valid name"),
        })
    }
}

fn parse_ref(source: &str, fragment: Option<&str>) -> Result<GitRef, SourceError> {
    let malformed = |reason: String| SourceError::Malformed {
        raw: source.to_string(),
        reason,
    };
    let Some(fragment) = fragment else {
        return Ok(GitRef::Default);
    };
    // Refs go on a git command line and into a URL: no option-looking or
    // traversing values, and a small alphabet.
    let valid = |r: &str| {
        !r.is_empty()
            && r.len() <= 200
            && !r.starts_with(['-', '/', '.'])
            && !r.contains("..")
            && r.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    };
    if let Some(tag) = fragment.strip_prefix("tag:") {
        if !valid(tag) {
            return Err(malformed(format!("tag `{tag}` is not a valid ref")));
        }
        return Ok(GitRef::Tag(tag.to_string()));
    }
    if let Some(sha) = fragment.strip_prefix("sha:") {
        let hex = (7..=64).contains(&sha.len()) && sha.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex {
            return Err(malformed(format!("sha `{sha}` must be 7-64 hex digits")));
        }
        return Ok(GitRef::Sha(sha.to_ascii_lowercase()));
    }
    if !valid(fragment) {
        return Err(malformed(format!("ref `{fragment}` is not a valid ref")));
    }
    Ok(GitRef::Branch(fragment.to_string()))
}

/// Parse and validate a source.
pub fn parse(raw: &str, allow_unpinned: bool) -> Result<Source, SourceError> {
    let malformed = |reason: &str| SourceError::Malformed {
        raw: raw.to_string(),
        reason: reason.to_string(),
    };
    if raw.len() > 2048 || raw.chars().any(char::is_control) {
        return Err(malformed("too long or has control characters"));
    }
    let (body, fragment) = match raw.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (raw, None),
    };
    let source = if let Some(name) = body.strip_prefix("local://") {
        if fragment.is_some() {
            return Err(malformed("a local source takes no ref"));
        }
        check_name(name)?;
        return Ok(Source::Local {
            name: name.to_string(),
        });
    } else if let Some(path) = body.strip_prefix("gitea://") {
        let mut parts = path.split('/');
        let (Some(owner), Some(repo), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed("expected gitea://<owner>/<repo>#<ref>"));
        };
        check_segment(raw, "owner", owner)?;
        let repo = repo.strip_suffix(".git").unwrap_or(repo);
        check_segment(raw, "repository", repo)?;
        Source::Gitea {
            owner: owner.to_string(),
            repo: repo.to_string(),
            reference: parse_ref(raw, fragment)?,
        }
    } else if let Some(url) = body.strip_prefix("git+") {
        let scheme_ok = ["https://", "http://", "ssh://", "file://"]
            .iter()
            .any(|s| url.starts_with(s) && url.len() > s.len());
        if !scheme_ok || url.contains(char::is_whitespace) || url.starts_with('-') {
            return Err(malformed(
                "git+ sources take an https, http, ssh or file URL",
            ));
        }
        Source::Git {
            url: url.to_string(),
            reference: parse_ref(raw, fragment)?,
        }
    } else {
        return Err(SourceError::UnknownScheme(raw.to_string()));
    };
    let pinned = match &source {
        Source::Git { reference, .. } | Source::Gitea { reference, .. } => reference.is_pinned(),
        Source::Local { .. } => true,
    };
    if !pinned && !allow_unpinned {
        return Err(SourceError::Unpinned(raw.to_string()));
    }
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme_and_tracks_its_ref() {
        assert_eq!(
            parse("local://molecule-platform-mcp", false),
            Ok(Source::Local {
                name: "molecule-platform-mcp".into()
            })
        );
        let gitea = parse(
            "gitea://molecule-ai/molecule-ai-plugin-molecule-platform-mcp#tag:v1.0",
            false,
        )
        .unwrap();
        assert_eq!(gitea.tracked(), "tag:v1.0");
        let git = parse("git+file:///srv/repo#sha:ABCDEF1", false).unwrap();
        assert_eq!(git.tracked(), "sha:abcdef1");
        assert_eq!(parse("gitea://o/r#main", true).unwrap().tracked(), "none");
    }

    #[test]
    fn unpinned_sources_need_the_operator_s_consent() {
        for raw in ["gitea://o/r#main", "gitea://o/r", "git+https://h/r.git"] {
            assert_eq!(parse(raw, false), Err(SourceError::Unpinned(raw.into())));
            assert!(parse(raw, true).is_ok());
        }
    }

    #[test]
    fn hostile_sources_are_refused() {
        for raw in [
            "local://../etc",
            "local://a/b",
            "local://",
            "local://UPPER",
            "gitea://o/r/x#tag:v1",
            "gitea://../r#tag:v1",
            "gitea://o/r#tag:--upload-pack=evil",
            "gitea://o/r#tag:../../x",
            "gitea://o/r#sha:xyz",
            "git+ftp://h/r#tag:v1",
            "git+-oProxyCommand=x#tag:v1",
            "https://h/r#tag:v1",
            "git+https://h/r#--orphan",
        ] {
            assert!(parse(raw, true).is_err(), "{raw}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("molecule-ai-plugin-molecule-platform-mcp").is_ok());
        for bad in ["", "-x", "a/b", "a..b", "A", ".hidden", &"a".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
