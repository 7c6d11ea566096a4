//! What the commands print, all through here: a reader that went away
//! (`heartgate ... | head -3`) ends the command quietly and successfully
//! (what it wanted, it has) instead of a panic in `println!`.

use std::io::Write;

use anyhow::Result;

/// The error that ends a command whose standard output was closed by its
/// reader; `main` exits with success on it, printing nothing.
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Write `text` to standard output as it is.
pub(crate) fn out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// `println!` that returns an error instead of panicking: `say!(...)?`.
macro_rules! say {
    () => {
        $crate::cli::output::out("\n")
    };
    ($($arg:tt)*) => {
        $crate::cli::output::out(&format!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use say;

/// One JSON line (an item of a list that streams).
pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    say!("{}", serde_json::to_string(value)?)
}

/// One JSON document: what every command prints with `--json` (lists that
/// stream print [`print_json`] lines instead).
pub(crate) fn print_document(value: &impl serde::Serialize) -> Result<()> {
    say!("{}", serde_json::to_string_pretty(value)?)
}

/// Print `value` as a JSON document with `--json`, else the text `text`
/// makes of it (a line end is added when missing).
pub(crate) fn emit<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> Result<()> {
    if json {
        return print_document(value);
    }
    let mut shown = text(value);
    if !shown.ends_with('\n') {
        shown.push('\n');
    }
    out(&shown)
}

/// An action (or any JSON object with a `kind`) on one line:
/// `set_status ws-1 to=degraded expected=online reason=too_many_tasks`.
pub(crate) fn action_line(action: &serde_json::Value) -> String {
    let Some(map) = action.as_object() else {
        return action.to_string();
    };
    let mut line = String::new();
    for key in ["kind", "workspace_id"] {
        if let Some(v) = map.get(key) {
            line.push_str(&scalar(v));
            line.push(' ');
        }
    }
    for (k, v) in map {
        if k == "kind" || k == "workspace_id" || v.is_null() {
            continue;
        }
        line.push_str(&format!("{k}={} ", scalar(v)));
    }
    line.trim_end().to_string()
}

/// A JSON value as a word: strings bare unless they need quotes.
pub(crate) fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s)
            if !s.is_empty() && !s.contains(char::is_whitespace) && !s.contains('"') =>
        {
            s.clone()
        }
        other => other.to_string(),
    }
}

/// A time in milliseconds since the epoch as RFC 3339, `-` for none.
pub(crate) fn when(v: &serde_json::Value) -> String {
    v.as_i64()
        .map(heartgate::clock::rfc3339)
        .unwrap_or_else(|| "-".into())
}

/// An error and its causes on one line, each said once: a cause whose text
/// the line already holds (SQLite's errors repeat their message in their
/// source, and again as `Error code N: ...`) is left out.
pub(crate) fn error_text(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let bare = match text.strip_prefix("Error code ") {
            Some(rest) => rest.split_once(": ").map_or(rest, |(_, m)| m),
            None => &text,
        };
        if bare.is_empty() || line.contains(bare) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[test]
    fn an_error_says_each_cause_once() {
        let sqlite = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(14),
            Some("unable to open database file: /x/h.db".into()),
        );
        let e = anyhow::Error::new(heartgate::store::StoreError::from(sqlite))
            .context("opening the database `/x/h.db`");
        assert_eq!(
            error_text(&e),
            "opening the database `/x/h.db`: database error: unable to open database file: /x/h.db"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_text(&e), "outer: inner");
    }
}
