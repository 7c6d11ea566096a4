//! A corpus of bad input against the real service: malformed and mistyped
//! JSON, bodies over the limit, deep nesting, invalid UTF-8, out-of-range
//! numbers, unknown routes and methods, and every way of presenting the
//! wrong bearer token, on the registry routes and on the admin API.
//!
//! Each case is one row of a table. [`check`] sends it and requires a 4xx
//! with the expected status and a JSON body `{"error": "..."}` (lowercase,
//! naming the problem), a database dump taken with the service quiet that is
//! unchanged by the request, and a service that still answers the next
//! request. Every failing case is reported by name, all at once.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use common::{Service, T0_MS};
use heartgate::clock::ManualClock;
use heartgate::deliverer::Secret;
use heartgate::model::WorkspaceKind::Workspace;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const ADMIN: &str = "admin-s3cret";
const INVALID: &str = "invalid request body";
const TOO_LARGE: &str = "request body larger than";
const TOO_DEEP: &str = "nested deeper than";
const NOT_FOUND: &str = "not found";
const NOT_ALLOWED: &str = "not allowed on";
const MISSING_TOKEN: &str = "missing workspace auth token";
const INVALID_TOKEN: &str = "invalid workspace auth token";
const UNKNOWN_WORKSPACE: &str = "unknown workspace";
const BAD_ID: &str = "must be 1-128 of";
const TOOLS: &str = "loaded_mcp_tools: at most 512 names of at most 256 bytes";

/// The registry's body limit, from `http::ServerConfig::default()`.
const REGISTRY_LIMIT: usize = 256 * 1024;

/// A valid heartbeat of workspace `ws` (the older runtime of wire-examples).
const HEARTBEAT: &str = r#"{"workspace_id":"ws","error_rate":0.5,"sample_error":"boom: sample error","active_tasks":1,"current_task":"demo task","uptime_seconds":0}"#;
/// A valid register of workspace `ws` (the standalone MCP wrapper).
const REGISTER: &str = r#"{"id":"ws","url":"","agent_card":{"name":"Demo Agent","skills":[{"name":"research"}]},"delivery_mode":"poll"}"#;
/// A valid input for `POST /admin/eval`.
const EVAL_INPUT: &str = r#"{"event":{"heartbeat":{}},"workspace":{"id":"ws","kind":"workspace","status":"online","model_configured":false},"now_ms":1782302400000}"#;

/// The tokens a corpus presents.
struct Tokens {
    /// The live token of workspace `ws`.
    ws: String,
    /// The live token of workspace `ws-other`.
    other: String,
    /// A revoked token of workspace `ws` (which has a live one as well).
    revoked: String,
}

impl Tokens {
    /// Placeholders, for counting the cases.
    fn dummy() -> Tokens {
        Tokens {
            ws: "ws-token".into(),
            other: "other-token".into(),
            revoked: "revoked-token".into(),
        }
    }
}

/// One bad request and what it must get.
struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
    /// Send the body in chunks, without a `Content-Length`.
    chunked: bool,
    status: u16,
    /// A part of the error message.
    says: &'static str,
}

impl Case {
    /// A request with `Content-Type: application/json` and, if `auth` is
    /// given, that `Authorization` header value (raw bytes).
    fn new(
        name: &'static str,
        method: &'static str,
        path: impl Into<String>,
        auth: Option<Vec<u8>>,
        body: impl AsRef<[u8]>,
        status: u16,
        says: &'static str,
    ) -> Case {
        let mut headers = vec![("content-type", b"application/json".to_vec())];
        if let Some(value) = auth {
            headers.push(("authorization", value));
        }
        Case {
            name,
            method,
            path: path.into(),
            headers,
            body: body.as_ref().to_vec(),
            chunked: false,
            status,
            says,
        }
    }

    /// Set header `name` to `value`, replacing any value it had.
    fn header(mut self, name: &'static str, value: &[u8]) -> Case {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.to_vec()));
        self
    }

    /// Leave header `name` out.
    fn without(mut self, name: &'static str) -> Case {
        self.headers.retain(|(n, _)| *n != name);
        self
    }

    fn chunked(mut self) -> Case {
        self.chunked = true;
        self
    }
}

/// `Authorization: Bearer <token>`.
fn bearer(token: &str) -> Option<Vec<u8>> {
    Some(format!("Bearer {token}").into_bytes())
}

fn raw(value: &[u8]) -> Option<Vec<u8>> {
    Some(value.to_vec())
}

/// `n` nested arrays, closed.
fn nested_arrays(n: usize) -> String {
    format!("{}{}", "[".repeat(n), "]".repeat(n))
}

/// `n` nested objects, closed.
fn nested_objects(n: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n))
}

/// A valid heartbeat of exactly `len` bytes (its `current_task` padded).
fn padded_heartbeat(len: usize) -> String {
    let frame = r#"{"workspace_id":"ws","current_task":""}"#;
    let body = format!(
        r#"{{"workspace_id":"ws","current_task":"{}"}}"#,
        "t".repeat(len - frame.len())
    );
    assert_eq!(body.len(), len);
    body
}

/// `{"workspace_id":"ws","loaded_mcp_tools":[...]}` with `names`.
fn tools_heartbeat(names: &[String]) -> String {
    json!({"workspace_id": "ws", "loaded_mcp_tools": names}).to_string()
}

fn heartbeat_cases(t: &Tokens) -> Vec<Case> {
    let row = |name, body: &[u8], status, says| {
        Case::new(
            name,
            "POST",
            "/registry/heartbeat",
            bearer(&t.ws),
            body,
            status,
            says,
        )
    };
    let huge_sample = format!(
        r#"{{"workspace_id":"ws","sample_error":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let many_tools = tools_heartbeat(&(0..513).map(|i| format!("t{i}")).collect::<Vec<_>>());
    let long_tool = tools_heartbeat(&["t".repeat(257)]);
    let deep_arrays = format!(r#"{{"workspace_id":"ws","x":{}}}"#, nested_arrays(100_000));
    let unclosed = format!(r#"{{"workspace_id":"ws","x":{}"#, "[".repeat(100_000));
    let deep_objects = format!(
        r#"{{"workspace_id":"ws","runtime_metadata":{}}}"#,
        nested_objects(40)
    );
    let long_id = format!(r#"{{"workspace_id":"{}"}}"#, "w".repeat(10 * 1024));
    let caps: Vec<String> = (0..65).map(|i| format!(r#""c{i}":true"#)).collect();
    let many_caps = format!(
        r#"{{"workspace_id":"ws","runtime_metadata":{{"capabilities":{{{}}}}}}}"#,
        caps.join(",")
    );
    let long_cap = format!(
        r#"{{"workspace_id":"ws","runtime_metadata":{{"capabilities":{{"{}":true}}}}}}"#,
        "c".repeat(65)
    );
    let big_card = format!(
        r#"{{"workspace_id":"ws","agent_card":{{"name":"{}"}}}}"#,
        "x".repeat(65 * 1024)
    );
    let long_card_url = format!(
        r#"{{"workspace_id":"ws","agent_card":{{"url":"http://localhost/{}"}}}}"#,
        "u".repeat(2100)
    );
    let zeros = vec![0u8; REGISTRY_LIMIT + 1];
    let just_over = padded_heartbeat(REGISTRY_LIMIT + 1);
    vec![
        row("malformed json", b"{not json", 400, INVALID),
        row("truncated json", br#"{"workspace_id":"ws""#, 400, INVALID),
        row(
            "trailing garbage",
            br#"{"workspace_id":"ws"} trailing"#,
            400,
            INVALID,
        ),
        row(
            "two documents",
            br#"{"workspace_id":"ws"}{"workspace_id":"ws"}"#,
            400,
            INVALID,
        ),
        row("empty body", b"", 400, INVALID),
        row("whitespace body", b" \r\n\t ", 400, INVALID),
        row("json null", b"null", 400, INVALID),
        row("json array", b"[]", 400, INVALID),
        row("json string", br#""ws""#, 400, INVALID),
        row("json number", b"42", 400, INVALID),
        row("single quotes", b"{'workspace_id':'ws'}", 400, INVALID),
        row(
            "trailing comma",
            br#"{"workspace_id":"ws","error_rate":0.1,}"#,
            400,
            INVALID,
        ),
        row(
            "comment",
            br#"{"workspace_id":"ws" /* hi */}"#,
            400,
            INVALID,
        ),
        row(
            "byte order mark",
            b"\xef\xbb\xbf{\"workspace_id\":\"ws\"}",
            400,
            INVALID,
        ),
        row("missing workspace_id", br#"{"error_rate":0.1}"#, 400, INVALID),
        row("empty workspace_id", br#"{"workspace_id":""}"#, 400, INVALID),
        row("null workspace_id", br#"{"workspace_id":null}"#, 400, INVALID),
        row("numeric workspace_id", br#"{"workspace_id":42}"#, 400, INVALID),
        row(
            "object workspace_id",
            br#"{"workspace_id":{"id":"ws"}}"#,
            400,
            INVALID,
        ),
        row(
            "duplicate workspace_id",
            br#"{"workspace_id":"ws","workspace_id":"ws-other"}"#,
            400,
            INVALID,
        ),
        row(
            "error_rate as a string",
            br#"{"workspace_id":"ws","error_rate":"0.5"}"#,
            400,
            INVALID,
        ),
        row(
            "error_rate as a bool",
            br#"{"workspace_id":"ws","error_rate":true}"#,
            400,
            INVALID,
        ),
        row(
            "error_rate NaN literal",
            br#"{"workspace_id":"ws","error_rate":NaN}"#,
            400,
            INVALID,
        ),
        row(
            "error_rate Infinity literal",
            br#"{"workspace_id":"ws","error_rate":Infinity}"#,
            400,
            INVALID,
        ),
        row(
            "error_rate -Infinity literal",
            br#"{"workspace_id":"ws","error_rate":-Infinity}"#,
            400,
            INVALID,
        ),
        row(
            "error_rate 1e400",
            br#"{"workspace_id":"ws","error_rate":1e400}"#,
            400,
            INVALID,
        ),
        row(
            "error_rate -1e400",
            br#"{"workspace_id":"ws","error_rate":-1e400}"#,
            400,
            INVALID,
        ),
        row(
            "error_rate above 1",
            br#"{"workspace_id":"ws","error_rate":1.5}"#,
            400,
            "error_rate must be between 0 and 1",
        ),
        row(
            "error_rate below 0",
            br#"{"workspace_id":"ws","error_rate":-0.1}"#,
            400,
            "error_rate must be between 0 and 1",
        ),
        row(
            "error_rate as hex",
            br#"{"workspace_id":"ws","error_rate":0x1}"#,
            400,
            INVALID,
        ),
        row(
            "active_tasks as a string",
            br#"{"workspace_id":"ws","active_tasks":"3"}"#,
            400,
            INVALID,
        ),
        row(
            "active_tasks negative",
            br#"{"workspace_id":"ws","active_tasks":-1}"#,
            400,
            "active_tasks must not be negative",
        ),
        row(
            "active_tasks i64 minimum",
            br#"{"workspace_id":"ws","active_tasks":-9223372036854775808}"#,
            400,
            "active_tasks must not be negative",
        ),
        row(
            "active_tasks i64 overflow",
            br#"{"workspace_id":"ws","active_tasks":9223372036854775808}"#,
            400,
            INVALID,
        ),
        row(
            "active_tasks i64 underflow",
            br#"{"workspace_id":"ws","active_tasks":-9223372036854775809}"#,
            400,
            INVALID,
        ),
        row(
            "active_tasks huge",
            br#"{"workspace_id":"ws","active_tasks":100000000000000000000000000000}"#,
            400,
            INVALID,
        ),
        row(
            "active_tasks 1e30",
            br#"{"workspace_id":"ws","active_tasks":1e30}"#,
            400,
            INVALID,
        ),
        row(
            "active_tasks fractional",
            br#"{"workspace_id":"ws","active_tasks":1.5}"#,
            400,
            INVALID,
        ),
        row(
            "active_tasks leading plus",
            br#"{"workspace_id":"ws","active_tasks":+1}"#,
            400,
            INVALID,
        ),
        row(
            "active_tasks leading zero",
            br#"{"workspace_id":"ws","active_tasks":01}"#,
            400,
            INVALID,
        ),
        row(
            "uptime_seconds negative",
            br#"{"workspace_id":"ws","uptime_seconds":-5}"#,
            400,
            "uptime_seconds must not be negative",
        ),
        row(
            "uptime_seconds overflow",
            br#"{"workspace_id":"ws","uptime_seconds":99999999999999999999999}"#,
            400,
            INVALID,
        ),
        row(
            "sample_error as a number",
            br#"{"workspace_id":"ws","sample_error":500}"#,
            400,
            INVALID,
        ),
        row(
            "current_task as an array",
            br#"{"workspace_id":"ws","current_task":[]}"#,
            400,
            INVALID,
        ),
        row(
            "runtime_state as a number",
            br#"{"workspace_id":"ws","runtime_state":42}"#,
            400,
            INVALID,
        ),
        row(
            "mcp_server_present as a string",
            br#"{"workspace_id":"ws","mcp_server_present":"yes"}"#,
            400,
            INVALID,
        ),
        row(
            "mcp_server_present as a number",
            br#"{"workspace_id":"ws","mcp_server_present":1}"#,
            400,
            INVALID,
        ),
        row(
            "loaded_mcp_tools as a string",
            br#"{"workspace_id":"ws","loaded_mcp_tools":"a"}"#,
            400,
            INVALID,
        ),
        row(
            "loaded_mcp_tools of numbers",
            br#"{"workspace_id":"ws","loaded_mcp_tools":[1,2]}"#,
            400,
            INVALID,
        ),
        row(
            "loaded_mcp_tools with a null",
            br#"{"workspace_id":"ws","loaded_mcp_tools":["a",null]}"#,
            400,
            INVALID,
        ),
        row(
            "invalid utf-8 in a string",
            b"{\"workspace_id\":\"ws\",\"sample_error\":\"\xff\xfe\"}",
            400,
            INVALID,
        ),
        row(
            "invalid utf-8 in the id",
            b"{\"workspace_id\":\"w\xc3\"}",
            400,
            INVALID,
        ),
        row(
            "invalid utf-8 outside strings",
            b"{\"workspace_id\":\"ws\",\xc0\xaf}",
            400,
            INVALID,
        ),
        row(
            "lone surrogate escape",
            br#"{"workspace_id":"ws","sample_error":"\ud800"}"#,
            400,
            INVALID,
        ),
        row(
            "raw control character in a string",
            b"{\"workspace_id\":\"ws\",\"sample_error\":\"a\x00b\"}",
            400,
            INVALID,
        ),
        row("100k nested arrays", deep_arrays.as_bytes(), 400, TOO_DEEP),
        row("100k unclosed arrays", unclosed.as_bytes(), 400, TOO_DEEP),
        row("40 nested objects", deep_objects.as_bytes(), 400, TOO_DEEP),
        row("sample_error of 300 KB", huge_sample.as_bytes(), 413, TOO_LARGE),
        row("513 loaded tools", many_tools.as_bytes(), 400, TOOLS),
        row("a tool name of 257 bytes", long_tool.as_bytes(), 400, TOOLS),
        row("body one byte over the limit", just_over.as_bytes(), 413, TOO_LARGE),
        row("binary body over the limit", &zeros, 413, TOO_LARGE),
        row("chunked body over the limit", huge_sample.as_bytes(), 413, TOO_LARGE).chunked(),
        row(
            "form-encoded body",
            b"workspace_id=ws&error_rate=0.1",
            400,
            INVALID,
        )
        .header("content-type", b"application/x-www-form-urlencoded"),
        row(
            "xml body",
            b"<heartbeat><workspace_id>ws</workspace_id></heartbeat>",
            400,
            INVALID,
        )
        .header("content-type", b"application/xml"),
        row(
            "gzip body",
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae\x05\x00\x43\xbf\xa6\xa3\x02\x00\x00\x00",
            400,
            INVALID,
        )
        .header("content-encoding", b"gzip"),
        row("no content type, not json", b"ws", 400, INVALID).without("content-type"),
        row(
            "unknown workspace",
            br#"{"workspace_id":"nobody"}"#,
            404,
            UNKNOWN_WORKSPACE,
        ),
        row(
            "path traversal id",
            br#"{"workspace_id":"../../etc/passwd"}"#,
            404,
            UNKNOWN_WORKSPACE,
        ),
        row(
            "id with a nul",
            br#"{"workspace_id":"ws\u0000"}"#,
            404,
            UNKNOWN_WORKSPACE,
        ),
        row(
            "id with a newline",
            br#"{"workspace_id":"ws\n"}"#,
            404,
            UNKNOWN_WORKSPACE,
        ),
        row("id of 10 KB", long_id.as_bytes(), 404, UNKNOWN_WORKSPACE),
        row(
            "runtime_metadata not an object",
            br#"{"workspace_id":"ws","runtime_metadata":["status_mgmt"]}"#,
            400,
            "runtime_metadata must be an object",
        ),
        row(
            "runtime_metadata capabilities a list",
            br#"{"workspace_id":"ws","runtime_metadata":{"capabilities":["status_mgmt"]}}"#,
            400,
            "runtime_metadata.capabilities must be an object of booleans",
        ),
        row(
            "runtime_metadata capability a number",
            br#"{"workspace_id":"ws","runtime_metadata":{"capabilities":{"status_mgmt":1}}}"#,
            400,
            "runtime_metadata.capabilities must be an object of booleans",
        ),
        row(
            "runtime_metadata 65 capabilities",
            many_caps.as_bytes(),
            400,
            "runtime_metadata.capabilities has more than 64 entries",
        ),
        row(
            "runtime_metadata capability name of 65 bytes",
            long_cap.as_bytes(),
            400,
            "runtime_metadata.capabilities names are 1-64 bytes",
        ),
        row(
            "runtime_metadata idle timeout negative",
            br#"{"workspace_id":"ws","runtime_metadata":{"idle_timeout_seconds":-1}}"#,
            400,
            "runtime_metadata.idle_timeout_seconds must be a non-negative integer",
        ),
        row(
            "runtime_metadata idle timeout of two years",
            br#"{"workspace_id":"ws","runtime_metadata":{"idle_timeout_seconds":63072000}}"#,
            400,
            "runtime_metadata.idle_timeout_seconds must be a non-negative integer",
        ),
        row(
            "runtime_metadata idle timeout a fraction",
            br#"{"workspace_id":"ws","runtime_metadata":{"idle_timeout_seconds":1.5}}"#,
            400,
            "runtime_metadata.idle_timeout_seconds must be a non-negative integer",
        ),
        row(
            "runtime_metadata idle timeout a string",
            br#"{"workspace_id":"ws","runtime_metadata":{"idle_timeout_seconds":"600"}}"#,
            400,
            "runtime_metadata.idle_timeout_seconds must be a non-negative integer",
        ),
        row(
            "agent_card a string",
            br#"{"workspace_id":"ws","agent_card":"Echo"}"#,
            400,
            "agent_card must be an object",
        ),
        row(
            "agent_card a list",
            br#"{"workspace_id":"ws","agent_card":[{"name":"Echo"}]}"#,
            400,
            "agent_card must be an object",
        ),
        row(
            "agent_card over 64 KiB",
            big_card.as_bytes(),
            400,
            "agent_card larger than 65536 bytes",
        ),
        row(
            "agent_card url over 2048 bytes",
            long_card_url.as_bytes(),
            400,
            "agent_card.url longer than 2048 bytes",
        ),
    ]
}

fn update_card_cases(t: &Tokens) -> Vec<Case> {
    let row = |name, token: &str, body: &[u8], status, says| {
        Case::new(
            name,
            "POST",
            "/registry/update-card",
            bearer(token),
            body,
            status,
            says,
        )
    };
    let ws = t.ws.as_str();
    let big_card = format!(
        r#"{{"workspace_id":"ws","agent_card":{{"name":"{}"}}}}"#,
        "x".repeat(65 * 1024)
    );
    let deep = format!(
        r#"{{"workspace_id":"ws","agent_card":{}}}"#,
        nested_objects(40)
    );
    vec![
        row("not json", ws, b"{", 400, INVALID),
        row("empty body", ws, b"", 400, INVALID),
        row("no workspace_id", ws, br#"{"agent_card":{}}"#, 400, INVALID),
        row(
            "empty workspace_id",
            ws,
            br#"{"workspace_id":"","agent_card":{}}"#,
            400,
            INVALID,
        ),
        row(
            "workspace_id a number",
            ws,
            br#"{"workspace_id":7,"agent_card":{}}"#,
            400,
            INVALID,
        ),
        row(
            "no agent_card",
            ws,
            br#"{"workspace_id":"ws"}"#,
            400,
            INVALID,
        ),
        row(
            "agent_card null",
            ws,
            br#"{"workspace_id":"ws","agent_card":null}"#,
            400,
            INVALID,
        ),
        row(
            "agent_card a string",
            ws,
            br#"{"workspace_id":"ws","agent_card":"x"}"#,
            400,
            "agent_card must be an object",
        ),
        row(
            "agent_card over 64 KiB",
            ws,
            big_card.as_bytes(),
            400,
            "agent_card larger than 65536 bytes",
        ),
        row(
            "agent_card nested 40 deep",
            ws,
            deep.as_bytes(),
            400,
            "nested deeper than",
        ),
        row(
            "metadata card url",
            ws,
            br#"{"workspace_id":"ws","agent_card":{"url":"http://169.254.169.254/"}}"#,
            400,
            "workspace URL not allowed",
        ),
        row(
            "file card url",
            ws,
            br#"{"workspace_id":"ws","agent_card":{"url":"file:///etc/shadow"}}"#,
            400,
            "workspace URL not allowed",
        ),
        Case::new(
            "no token",
            "POST",
            "/registry/update-card",
            None,
            br#"{"workspace_id":"ws","agent_card":{}}"#,
            401,
            "missing workspace auth token",
        ),
        row(
            "another workspace's token",
            &t.other,
            br#"{"workspace_id":"ws","agent_card":{}}"#,
            401,
            "invalid workspace auth token",
        ),
        row(
            "a revoked token",
            &t.revoked,
            br#"{"workspace_id":"ws","agent_card":{}}"#,
            401,
            "invalid workspace auth token",
        ),
        row(
            "unknown workspace",
            ws,
            br#"{"workspace_id":"nobody","agent_card":{}}"#,
            404,
            UNKNOWN_WORKSPACE,
        ),
        Case::new(
            "GET",
            "GET",
            "/registry/update-card",
            bearer(ws),
            b"",
            405,
            "not allowed",
        ),
    ]
}

fn register_cases(t: &Tokens) -> Vec<Case> {
    let row = |name, body: &[u8], status, says| {
        Case::new(
            name,
            "POST",
            "/registry/register",
            bearer(&t.ws),
            body,
            status,
            says,
        )
    };
    let huge_card = format!(
        r#"{{"id":"ws","url":"","agent_card":{{"name":"{}"}},"delivery_mode":"poll"}}"#,
        "n".repeat(300 * 1024)
    );
    let huge_url = format!(
        r#"{{"id":"ws","url":"http://{}","agent_card":{{}}}}"#,
        "u".repeat(300 * 1024)
    );
    let deep_card = format!(
        r#"{{"id":"ws","agent_card":{{"skills":{}}}}}"#,
        nested_arrays(100_000)
    );
    let nested_card = format!(r#"{{"id":"ws","agent_card":{}}}"#, nested_objects(33));
    let long_id = format!(r#"{{"id":"{}","agent_card":{{}}}}"#, "w".repeat(10 * 1024));
    let long_url =
        json!({"id": "ws", "url": format!("http://{}", "u".repeat(2042)), "agent_card": {}})
            .to_string();
    let big_card = json!({"id": "ws", "url": "", "agent_card": {"name": "n".repeat(65 << 10)}, "delivery_mode": "poll"})
        .to_string();
    let many_tools = json!({"id": "ws", "url": "", "agent_card": {}, "delivery_mode": "poll",
        "loaded_mcp_tools": (0..513).map(|i| format!("t{i}")).collect::<Vec<_>>()})
    .to_string();
    vec![
        row("malformed json", b"{\"id\":", 400, INVALID),
        row("empty body", b"", 400, INVALID),
        row("json null", b"null", 400, INVALID),
        row(
            "json array",
            br#"[{"id":"ws","agent_card":{}}]"#,
            400,
            INVALID,
        ),
        row("json true", b"true", 400, INVALID),
        row("missing id", br#"{"agent_card":{}}"#, 400, INVALID),
        row("empty id", br#"{"id":"","agent_card":{}}"#, 400, INVALID),
        row("null id", br#"{"id":null,"agent_card":{}}"#, 400, INVALID),
        row("numeric id", br#"{"id":7,"agent_card":{}}"#, 400, INVALID),
        row(
            "array id",
            br#"{"id":["ws"],"agent_card":{}}"#,
            400,
            INVALID,
        ),
        row(
            "duplicate id",
            br#"{"id":"ws","id":"ws-other","agent_card":{}}"#,
            400,
            INVALID,
        ),
        row("missing agent_card", br#"{"id":"ws"}"#, 400, INVALID),
        row(
            "agent_card as a string",
            br#"{"id":"ws","agent_card":"card"}"#,
            400,
            INVALID,
        ),
        row(
            "agent_card as an array",
            br#"{"id":"ws","agent_card":[]}"#,
            400,
            INVALID,
        ),
        row(
            "agent_card null",
            br#"{"id":"ws","agent_card":null}"#,
            400,
            INVALID,
        ),
        row(
            "agent_card with NaN",
            br#"{"id":"ws","agent_card":{"score":NaN}}"#,
            400,
            INVALID,
        ),
        row(
            "agent_card with 1e400",
            br#"{"id":"ws","agent_card":{"score":1e400}}"#,
            400,
            INVALID,
        ),
        row(
            "url as a number",
            br#"{"id":"ws","url":80,"agent_card":{}}"#,
            400,
            INVALID,
        ),
        row(
            "unknown delivery_mode",
            br#"{"id":"ws","agent_card":{},"delivery_mode":"webhook"}"#,
            400,
            "delivery_mode must be 'push' or 'poll'",
        ),
        row(
            "delivery_mode in capitals",
            br#"{"id":"ws","agent_card":{},"delivery_mode":"POLL"}"#,
            400,
            "delivery_mode must be 'push' or 'poll'",
        ),
        row(
            "delivery_mode as a number",
            br#"{"id":"ws","agent_card":{},"delivery_mode":1}"#,
            400,
            INVALID,
        ),
        row(
            "unknown kind",
            br#"{"id":"ws","agent_card":{},"kind":"bogus"}"#,
            400,
            "kind must be 'workspace' or 'platform'",
        ),
        row(
            "kind in capitals",
            br#"{"id":"ws","agent_card":{},"kind":"PLATFORM"}"#,
            400,
            "kind must be 'workspace' or 'platform'",
        ),
        row(
            "kind as a bool",
            br#"{"id":"ws","agent_card":{},"kind":true}"#,
            400,
            INVALID,
        ),
        row(
            "runtime_metadata not an object",
            br#"{"id":"ws","agent_card":{},"runtime_metadata":"status_mgmt"}"#,
            400,
            "runtime_metadata must be an object",
        ),
        row(
            "runtime_metadata capabilities a list",
            br#"{"id":"ws","agent_card":{},"runtime_metadata":{"capabilities":["status_mgmt"]}}"#,
            400,
            "runtime_metadata.capabilities must be an object of booleans",
        ),
        row(
            "runtime_metadata capability a string",
            br#"{"id":"ws","agent_card":{},"runtime_metadata":{"capabilities":{"status_mgmt":"yes"}}}"#,
            400,
            "runtime_metadata.capabilities must be an object of booleans",
        ),
        row(
            "runtime_metadata idle timeout negative",
            br#"{"id":"ws","agent_card":{},"runtime_metadata":{"idle_timeout_seconds":-1}}"#,
            400,
            "runtime_metadata.idle_timeout_seconds must be a non-negative integer",
        ),
        row(
            "mcp_server_present as a string",
            br#"{"id":"ws","agent_card":{},"mcp_server_present":"false"}"#,
            400,
            INVALID,
        ),
        row(
            "loaded_mcp_tools as an object",
            br#"{"id":"ws","agent_card":{},"loaded_mcp_tools":{"a":1}}"#,
            400,
            INVALID,
        ),
        row(
            "invalid utf-8 in the agent card",
            b"{\"id\":\"ws\",\"agent_card\":{\"name\":\"\xed\xa0\x80\"}}",
            400,
            INVALID,
        ),
        row(
            "truncated utf-8 in the id",
            b"{\"id\":\"ws\xe2\x82\",\"agent_card\":{}}",
            400,
            INVALID,
        ),
        row(
            "100k nested arrays in the card",
            deep_card.as_bytes(),
            400,
            TOO_DEEP,
        ),
        row(
            "33 nested objects as the card",
            nested_card.as_bytes(),
            400,
            TOO_DEEP,
        ),
        row("agent card of 300 KB", huge_card.as_bytes(), 413, TOO_LARGE),
        row("url of 300 KB", huge_url.as_bytes(), 413, TOO_LARGE),
        row(
            "url of 2049 bytes",
            long_url.as_bytes(),
            400,
            "url longer than 2048 bytes",
        ),
        row(
            "agent_card of 65 KiB",
            big_card.as_bytes(),
            400,
            "agent_card larger than 65536 bytes",
        ),
        row("513 loaded tools", many_tools.as_bytes(), 400, TOOLS),
        row(
            "multipart body",
            b"--x\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\nws\r\n--x--\r\n",
            400,
            INVALID,
        )
        .header("content-type", b"multipart/form-data; boundary=x"),
        row(
            "unknown workspace",
            br#"{"id":"nobody","agent_card":{}}"#,
            404,
            UNKNOWN_WORKSPACE,
        ),
        row(
            "path traversal id",
            br#"{"id":"../ws","agent_card":{}}"#,
            404,
            UNKNOWN_WORKSPACE,
        ),
        row(
            "id with control characters",
            br#"{"id":"ws\r\n\u001b[2J","agent_card":{}}"#,
            404,
            UNKNOWN_WORKSPACE,
        ),
        row("id of 10 KB", long_id.as_bytes(), 404, UNKNOWN_WORKSPACE),
    ]
}

/// Ids a register may not create, with open registration on.
fn open_registration_cases() -> Vec<Case> {
    let row = |name, id: &str, status, says| {
        let body = json!({"id": id, "url": "", "agent_card": {}, "delivery_mode": "poll"});
        Case::new(
            name,
            "POST",
            "/registry/register",
            None,
            body.to_string(),
            status,
            says,
        )
    };
    let long = "w".repeat(10 * 1024);
    let just_over = "w".repeat(129);
    vec![
        row("path traversal", "../../etc/passwd", 400, BAD_ID),
        row("parent directory", "..", 400, BAD_ID),
        row("hidden directory", ".ws", 400, BAD_ID),
        row("slash", "ws/../other", 400, BAD_ID),
        row("backslash", "..\\ws", 400, BAD_ID),
        row("nul", "ws\u{0}x", 400, BAD_ID),
        row("newline", "ws\nx", 400, BAD_ID),
        row("escape sequence", "ws\u{1b}[2J", 400, BAD_ID),
        row("space", "a b", 400, BAD_ID),
        row("leading dash", "-ws", 400, BAD_ID),
        row("an option", "--help", 400, BAD_ID),
        row("percent-encoded traversal", "%2e%2e%2f", 400, BAD_ID),
        row("non-ascii", "wś", 400, BAD_ID),
        row("129 characters", &just_over, 400, BAD_ID),
        row("10 KB", &long, 400, BAD_ID),
        Case::new(
            "kind platform for a new id",
            "POST",
            "/registry/register",
            None,
            br#"{"id":"fresh","url":"","agent_card":{},"kind":"platform","delivery_mode":"poll"}"#,
            403,
            "kind='platform' may only be assigned",
        ),
    ]
}

fn admin_cases() -> Vec<Case> {
    let post = |name, path: &str, body: &[u8], status, says| {
        Case::new(name, "POST", path, bearer(ADMIN), body, status, says)
    };
    let get = |name, path: &str, status, says| {
        Case::new(name, "GET", path, bearer(ADMIN), b"", status, says)
    };
    let chains = "/admin/chains";
    let slot =
        |extra: &str| format!(r#"{{"slot":[{{"name":"gate","module":"builtin:gate"{extra}}}]}}"#);
    let deep = format!(r#"{{"slot":{}}}"#, nested_arrays(100_000));
    let over_module_limit = vec![0u8; heartgate::http::MAX_ADMIN_BODY_BYTES + 1024];
    vec![
        post("empty module", "/admin/modules", b"", 422, "the module was refused"),
        post(
            "garbage module",
            "/admin/modules",
            b"MZ\x90\x00 definitely not wasm",
            422,
            "the module was refused",
        ),
        post(
            "core module, not a component",
            "/admin/modules",
            b"\0asm\x01\0\0\0",
            422,
            "the module was refused",
        ),
        post(
            "truncated component header",
            "/admin/modules",
            b"\0asm\x0d\0\x01\0\x01",
            422,
            "the module was refused",
        ),
        post(
            "json instead of a module",
            "/admin/modules",
            br#"{"module":"builtin:gate"}"#,
            422,
            "the module was refused",
        ),
        post(
            "module over 16 MiB",
            "/admin/modules",
            &over_module_limit,
            413,
            TOO_LARGE,
        ),
        post("stage malformed json", chains, b"{\"slot\":[", 400, INVALID),
        post("stage empty body", chains, b"", 400, INVALID),
        post("stage without slots", chains, b"{}", 400, INVALID),
        post("stage slot not a list", chains, br#"{"slot":"gate"}"#, 400, INVALID),
        post("stage zero slots", chains, br#"{"slot":[]}"#, 422, "at least one slot"),
        post(
            "stage unknown field",
            chains,
            br#"{"slot":[{"name":"gate","module":"builtin:gate"}],"force":true}"#,
            400,
            INVALID,
        ),
        post(
            "stage slot without module",
            chains,
            br#"{"slot":[{"name":"gate"}]}"#,
            400,
            INVALID,
        ),
        post(
            "stage unknown built-in",
            chains,
            br#"{"slot":[{"name":"gate","module":"builtin:nope"}]}"#,
            422,
            "unknown built-in module",
        ),
        post(
            "stage absolute path module",
            chains,
            br#"{"slot":[{"name":"gate","module":"/etc/passwd"}]}"#,
            422,
            "push the module first",
        ),
        post(
            "stage relative traversal module",
            chains,
            br#"{"slot":[{"name":"gate","module":"../../target/x.wasm"}]}"#,
            422,
            "push the module first",
        ),
        post(
            "stage unknown digest",
            chains,
            br#"{"slot":[{"name":"gate","module":"sha256:0000000000000000000000000000000000000000000000000000000000000000"}]}"#,
            422,
            "no stored module",
        ),
        post(
            "stage traversal digest",
            chains,
            br#"{"slot":[{"name":"gate","module":"sha256:../../etc/passwd"}]}"#,
            422,
            "no stored module",
        ),
        post(
            "stage duplicate slot names",
            chains,
            br#"{"slot":[{"name":"gate","module":"builtin:gate"},{"name":"gate","module":"builtin:cooldown"}]}"#,
            422,
            "unique",
        ),
        post(
            "stage empty slot name",
            chains,
            br#"{"slot":[{"name":"","module":"builtin:gate"}]}"#,
            422,
            "non-empty",
        ),
        post(
            "stage timeout 0",
            chains,
            slot(r#","timeout_ms":0"#).as_bytes(),
            422,
            "timeout_ms must be 1-10000",
        ),
        post(
            "stage timeout negative",
            chains,
            slot(r#","timeout_ms":-1"#).as_bytes(),
            400,
            INVALID,
        ),
        post(
            "stage timeout u64 overflow",
            chains,
            slot(r#","timeout_ms":18446744073709551616"#).as_bytes(),
            400,
            INVALID,
        ),
        post(
            "stage timeout 1e400",
            chains,
            slot(r#","timeout_ms":1e400"#).as_bytes(),
            400,
            INVALID,
        ),
        post(
            "stage memory 0",
            chains,
            slot(r#","max_memory_mib":0"#).as_bytes(),
            422,
            "max_memory_mib must be 1-32",
        ),
        post(
            "stage memory 33",
            chains,
            slot(r#","max_memory_mib":33"#).as_bytes(),
            422,
            "max_memory_mib must be 1-32",
        ),
        post(
            "stage memory that wraps when shifted",
            chains,
            slot(r#","max_memory_mib":17592186044432"#).as_bytes(),
            422,
            "max_memory_mib must be 1-32",
        ),
        post(
            "stage unknown grant",
            chains,
            slot(r#","grants":["everything"]"#).as_bytes(),
            400,
            INVALID,
        ),
        post(
            "stage unknown on_failure",
            chains,
            slot(r#","on_failure":"explode""#).as_bytes(),
            400,
            INVALID,
        ),
        post(
            "stage fixtures naming no slot",
            chains,
            br#"{"slot":[{"name":"gate","module":"builtin:gate"}],"fixtures":[{"slot":"nope","fixtures":[]}]}"#,
            422,
            "fixtures name no slot",
        ),
        post("stage 100k nested arrays", chains, deep.as_bytes(), 400, TOO_DEEP),
        post(
            "stage invalid utf-8",
            chains,
            b"{\"slot\":[{\"name\":\"g\xff\",\"module\":\"builtin:gate\"}]}",
            400,
            INVALID,
        ),
        post("stage malformed, odd operator", chains, b"{", 400, INVALID)
            .header("x-heartgate-operator", b"\xff\xfe root"),
        post(
            "activate a non-numeric id",
            "/admin/chains/abc/activate",
            b"",
            400,
            "chain id `abc` is not a number",
        ),
        post(
            "activate an unknown id",
            "/admin/chains/99999/activate",
            b"",
            404,
            "no chain 99999",
        ),
        post(
            "activate a negative id",
            "/admin/chains/-1/activate",
            b"",
            404,
            "no chain -1",
        ),
        post(
            "activate an i64 overflow",
            "/admin/chains/99999999999999999999/activate",
            b"",
            400,
            "is not a number",
        ),
        post(
            "activate an encoded traversal",
            "/admin/chains/..%2F1/activate",
            b"",
            400,
            "is not a number",
        ),
        post(
            "roll back with nothing activated",
            "/admin/chains/rollback",
            b"",
            409,
            "no previous chain",
        ),
        post("eval malformed json", "/admin/eval", b"{\"input\":", 400, INVALID),
        post("eval empty object", "/admin/eval", b"{}", 400, INVALID),
        post(
            "eval unknown chain",
            "/admin/eval",
            format!(r#"{{"input":{EVAL_INPUT},"chain":99999}}"#).as_bytes(),
            404,
            "no chain 99999",
        ),
        post(
            "eval chain as a string",
            "/admin/eval",
            format!(r#"{{"input":{EVAL_INPUT},"chain":"1"}}"#).as_bytes(),
            400,
            INVALID,
        ),
        post(
            "eval now_ms overflow",
            "/admin/eval",
            format!(
                r#"{{"input":{}}}"#,
                EVAL_INPUT.replace("1782302400000", "9223372036854775808")
            )
            .as_bytes(),
            400,
            INVALID,
        ),
        post(
            "eval error_rate NaN",
            "/admin/eval",
            format!(
                r#"{{"input":{}}}"#,
                EVAL_INPUT.replace(r#"{"heartbeat":{}}"#, r#"{"heartbeat":{"error_rate":NaN}}"#)
            )
            .as_bytes(),
            400,
            INVALID,
        ),
        post(
            "eval unknown status",
            "/admin/eval",
            format!(
                r#"{{"input":{}}}"#,
                EVAL_INPUT.replace(r#""online""#, r#""zombie""#)
            )
            .as_bytes(),
            400,
            INVALID,
        ),
        post("shadow empty body", "/admin/shadow", b"", 400, INVALID),
        post(
            "shadow chain as a string",
            "/admin/shadow",
            br#"{"chain":"x"}"#,
            400,
            INVALID,
        ),
        post(
            "shadow unknown chain",
            "/admin/shadow",
            br#"{"chain":99999}"#,
            404,
            "no chain 99999",
        ),
        get(
            "run id not a number",
            "/admin/reconciles/abc",
            400,
            "run id `abc` is not a number",
        ),
        get("run id unknown", "/admin/reconciles/99999", 404, "no reconcile run"),
        get(
            "run id i64 overflow",
            "/admin/reconciles/99999999999999999999",
            400,
            "is not a number",
        ),
        get(
            "plugins of an unknown workspace",
            "/admin/workspaces/nobody/plugins",
            404,
            UNKNOWN_WORKSPACE,
        ),
        get(
            "plugins of an encoded traversal",
            "/admin/workspaces/..%2F..%2Fetc/plugins",
            404,
            UNKNOWN_WORKSPACE,
        ),
        get(
            "plugins of an encoded nul",
            "/admin/workspaces/ws%00/plugins",
            404,
            UNKNOWN_WORKSPACE,
        ),
        get("plugins with a suffix", "/admin/workspaces/ws/plugins/x", 404, NOT_FOUND),
        get("unknown admin path", "/admin/nothing", 404, NOT_FOUND),
        get("admin root", "/admin/", 404, NOT_FOUND),
        post("post to a read-only path", "/admin/chain", b"{}", 404, NOT_FOUND),
        Case::new("delete chains", "DELETE", chains, bearer(ADMIN), b"", 404, NOT_FOUND),
        Case::new("put the chain", "PUT", "/admin/chain", bearer(ADMIN), b"{}", 405, NOT_ALLOWED),
        Case::new("patch chains", "PATCH", chains, bearer(ADMIN), b"{}", 405, NOT_ALLOWED),
    ]
}

/// Tokens presented where they do not belong; all against valid bodies.
fn token_cases(t: &Tokens) -> Vec<Case> {
    let hb = |name, auth, status, says| {
        Case::new(
            name,
            "POST",
            "/registry/heartbeat",
            auth,
            HEARTBEAT,
            status,
            says,
        )
    };
    let reg = |name, auth, status, says| {
        Case::new(
            name,
            "POST",
            "/registry/register",
            auth,
            REGISTER,
            status,
            says,
        )
    };
    let get = |name, path: &str, auth, status, says| {
        Case::new(name, "GET", path, auth, b"", status, says)
    };
    let write = |name, path: &str, auth, body: &str, status, says| {
        Case::new(name, "POST", path, auth, body, status, says)
    };
    let long_token = "t".repeat(10 * 1024);
    let stage = r#"{"slot":[{"name":"gate","module":"builtin:gate"}]}"#;
    vec![
        hb("heartbeat without a token", None, 401, MISSING_TOKEN),
        hb(
            "heartbeat with an empty header",
            raw(b""),
            401,
            MISSING_TOKEN,
        ),
        hb(
            "heartbeat with `Bearer ` only",
            raw(b"Bearer "),
            401,
            MISSING_TOKEN,
        ),
        hb(
            "heartbeat with `Bearer` and no space",
            raw(b"Bearer"),
            401,
            MISSING_TOKEN,
        ),
        hb(
            "heartbeat with a lowercase scheme",
            Some(format!("bearer {}", t.ws).into_bytes()),
            401,
            MISSING_TOKEN,
        ),
        hb(
            "heartbeat with no scheme",
            Some(t.ws.clone().into_bytes()),
            401,
            MISSING_TOKEN,
        ),
        hb(
            "heartbeat with basic auth",
            raw(b"Basic d3M6c2VjcmV0"),
            401,
            MISSING_TOKEN,
        ),
        hb(
            "heartbeat with non-ascii header bytes",
            raw(b"Bearer \xff\xfe\x80"),
            401,
            MISSING_TOKEN,
        ),
        hb(
            "heartbeat with a utf-8 token",
            raw("Bearer tökén".as_bytes()),
            401,
            INVALID_TOKEN,
        ),
        hb(
            "heartbeat with a wrong token",
            bearer("not-the-token"),
            401,
            INVALID_TOKEN,
        ),
        hb(
            "heartbeat with the token and more",
            bearer(&format!("{} {}", t.ws, t.ws)),
            401,
            INVALID_TOKEN,
        ),
        hb(
            "heartbeat with a 10 KB token",
            bearer(&long_token),
            401,
            INVALID_TOKEN,
        ),
        hb(
            "heartbeat with a revoked token",
            bearer(&t.revoked),
            401,
            INVALID_TOKEN,
        ),
        hb(
            "heartbeat with another workspace's token",
            bearer(&t.other),
            401,
            INVALID_TOKEN,
        ),
        hb(
            "heartbeat with the admin token",
            bearer(ADMIN),
            401,
            INVALID_TOKEN,
        ),
        reg("register without a token", None, 401, MISSING_TOKEN),
        reg(
            "register with non-ascii header bytes",
            raw(b"Bearer \xc3\x28"),
            401,
            MISSING_TOKEN,
        ),
        reg(
            "register with a revoked token",
            bearer(&t.revoked),
            401,
            INVALID_TOKEN,
        ),
        reg(
            "register with another workspace's token",
            bearer(&t.other),
            401,
            INVALID_TOKEN,
        ),
        reg(
            "register with the admin token",
            bearer(ADMIN),
            401,
            INVALID_TOKEN,
        ),
        get(
            "admin without a token",
            "/admin/chain",
            None,
            401,
            "missing admin token",
        ),
        get(
            "admin with `Bearer ` only",
            "/admin/chain",
            raw(b"Bearer "),
            401,
            "missing admin token",
        ),
        get(
            "admin with a lowercase scheme",
            "/admin/chain",
            Some(format!("bearer {ADMIN}").into_bytes()),
            401,
            "missing admin token",
        ),
        get(
            "admin with non-ascii header bytes",
            "/admin/chain",
            raw(b"Bearer \xe9t\xe9"),
            401,
            "missing admin token",
        ),
        get(
            "admin with a wrong token",
            "/admin/chain",
            bearer("admin-s3cret-not"),
            401,
            "invalid admin token",
        ),
        get(
            "admin with a workspace token",
            "/admin/chain",
            bearer(&t.ws),
            401,
            "invalid admin token",
        ),
        get(
            "admin plugins with the workspace's own token",
            "/admin/workspaces/ws/plugins",
            bearer(&t.ws),
            401,
            "invalid admin token",
        ),
        get(
            "admin runs with a revoked token",
            "/admin/reconciles",
            bearer(&t.revoked),
            401,
            "invalid admin token",
        ),
        get(
            "admin shadow with another workspace's token",
            "/admin/shadow",
            bearer(&t.other),
            401,
            "invalid admin token",
        ),
        write(
            "stage with a workspace token",
            "/admin/chains",
            bearer(&t.ws),
            stage,
            401,
            "invalid admin token",
        ),
        write(
            "stage without a token",
            "/admin/chains",
            None,
            stage,
            401,
            "missing admin token",
        ),
        write(
            "push with a workspace token",
            "/admin/modules",
            bearer(&t.ws),
            "\0asm",
            401,
            "invalid admin token",
        ),
        write(
            "roll back with a workspace token",
            "/admin/chains/rollback",
            bearer(&t.ws),
            "",
            401,
            "invalid admin token",
        ),
        write(
            "eval with a workspace token",
            "/admin/eval",
            bearer(&t.ws),
            &format!(r#"{{"input":{EVAL_INPUT}}}"#),
            401,
            "invalid admin token",
        ),
        Case::new(
            "clear shadow with a workspace token",
            "DELETE",
            "/admin/shadow",
            bearer(&t.ws),
            b"",
            401,
            "invalid admin token",
        ),
    ]
}

/// Requests to no route, or with a method a route does not have; each with
/// a valid heartbeat body and the right token.
fn route_cases(t: &Tokens) -> Vec<Case> {
    let row = |name, method, path: &str, status, says| {
        Case::new(name, method, path, bearer(&t.ws), HEARTBEAT, status, says)
    };
    vec![
        row(
            "put heartbeat",
            "PUT",
            "/registry/heartbeat",
            405,
            NOT_ALLOWED,
        ),
        row(
            "delete heartbeat",
            "DELETE",
            "/registry/heartbeat",
            405,
            NOT_ALLOWED,
        ),
        row(
            "patch heartbeat",
            "PATCH",
            "/registry/heartbeat",
            405,
            NOT_ALLOWED,
        ),
        row(
            "get heartbeat",
            "GET",
            "/registry/heartbeat",
            405,
            NOT_ALLOWED,
        ),
        row(
            "put register",
            "PUT",
            "/registry/register",
            405,
            NOT_ALLOWED,
        ),
        row(
            "delete register",
            "DELETE",
            "/registry/register",
            405,
            NOT_ALLOWED,
        ),
        row(
            "patch register",
            "PATCH",
            "/registry/register",
            405,
            NOT_ALLOWED,
        ),
        row(
            "options register",
            "OPTIONS",
            "/registry/register",
            405,
            NOT_ALLOWED,
        ),
        row(
            "made-up method",
            "BREW",
            "/registry/heartbeat",
            405,
            NOT_ALLOWED,
        ),
        row("post healthz", "POST", "/healthz", 405, NOT_ALLOWED),
        row("root", "POST", "/", 404, NOT_FOUND),
        row("registry prefix", "POST", "/registry", 404, NOT_FOUND),
        row(
            "trailing slash",
            "POST",
            "/registry/heartbeat/",
            404,
            NOT_FOUND,
        ),
        row(
            "double slash",
            "POST",
            "/registry//heartbeat",
            404,
            NOT_FOUND,
        ),
        row("capitals", "POST", "/Registry/Heartbeat", 404, NOT_FOUND),
        row(
            "dot segments",
            "POST",
            "/registry/x/../heartbeat",
            404,
            NOT_FOUND,
        ),
        row(
            "encoded path",
            "POST",
            "/registry/%68eartbeat",
            404,
            NOT_FOUND,
        ),
        row(
            "encoded nul",
            "POST",
            "/registry/heartbeat%00",
            404,
            NOT_FOUND,
        ),
        row("admin without slash", "GET", "/admin", 404, NOT_FOUND),
        row("unknown path", "GET", "/index.html", 404, NOT_FOUND),
    ]
}

/// With no admin token configured, every admin route is refused.
fn disabled_admin_cases() -> Vec<Case> {
    let row = |name, method, path: &str, body: &str| {
        Case::new(
            name,
            method,
            path,
            bearer(ADMIN),
            body,
            403,
            "admin API is disabled",
        )
    };
    vec![
        row("disabled: get chain", "GET", "/admin/chain", ""),
        row("disabled: push", "POST", "/admin/modules", "\0asm"),
        row(
            "disabled: stage",
            "POST",
            "/admin/chains",
            r#"{"slot":[{"name":"gate","module":"builtin:gate"}]}"#,
        ),
        row("disabled: roll back", "POST", "/admin/chains/rollback", ""),
        row("disabled: runs", "GET", "/admin/reconciles", ""),
        Case::new(
            "disabled: no token",
            "GET",
            "/admin/chain",
            None,
            b"",
            403,
            "admin API is disabled",
        ),
    ]
}

/// A request body sent with a `Content-Length`, or in chunks without one.
struct TestBody {
    chunks: VecDeque<Bytes>,
    exact: Option<u64>,
}

impl TestBody {
    fn new(bytes: &[u8], chunked: bool) -> TestBody {
        let exact = (!chunked).then_some(bytes.len() as u64);
        let size = if chunked {
            16 * 1024
        } else {
            bytes.len().max(1)
        };
        TestBody {
            chunks: bytes.chunks(size).map(Bytes::copy_from_slice).collect(),
            exact,
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        self.exact.map(SizeHint::with_exact).unwrap_or_default()
    }
}

type TestClient = Client<HttpConnector, TestBody>;

/// A client that opens a connection per request, so that a connection the
/// service closed (after a 413) is never reused.
fn client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// Send `case`; its status, content type and body.
async fn send(
    client: &TestClient,
    svc: &Service,
    case: &Case,
) -> Result<(StatusCode, Option<HeaderValue>, Bytes), String> {
    let method = Method::from_bytes(case.method.as_bytes()).map_err(|e| e.to_string())?;
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{}", svc.url(), case.path));
    for (name, value) in &case.headers {
        let value = HeaderValue::from_bytes(value).map_err(|e| format!("header `{name}`: {e}"))?;
        req = req.header(*name, value);
    }
    let req = req
        .body(TestBody::new(&case.body, case.chunked))
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("no response: {e:?}"))?;
    let status = resp.status();
    let content_type = resp.headers().get(CONTENT_TYPE).cloned();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body cut short: {e}"))?
        .to_bytes();
    Ok((status, content_type, body))
}

/// Send `case` and check the response, that the database still dumps as
/// `before`, and that the service answers the next request. On failure,
/// the case's name and what went wrong.
async fn check(
    client: &TestClient,
    svc: &Service,
    case: &Case,
    before: &mut Vec<String>,
) -> Result<(), String> {
    let result = check_response(client, svc, case).await;
    let after = svc.quiet_dump().await;
    let written = (after != *before).then(|| {
        let short = |r: &String| r.chars().take(160).collect::<String>();
        let added: Vec<_> = after
            .iter()
            .filter(|r| !before.contains(r))
            .map(short)
            .collect();
        let removed: Vec<_> = before
            .iter()
            .filter(|r| !after.contains(r))
            .map(short)
            .collect();
        format!("the database changed: added {added:?}, removed {removed:?}")
    });
    *before = after;
    let next = match svc.get("/healthz").await {
        Ok((StatusCode::OK, _)) => None,
        other => Some(format!("the next request was not served: {other:?}")),
    };
    let problems: Vec<String> = [result.err(), written, next]
        .into_iter()
        .flatten()
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("case `{}`: {}", case.name, problems.join("; ")))
    }
}

async fn check_response(client: &TestClient, svc: &Service, case: &Case) -> Result<(), String> {
    let (status, content_type, body) = send(client, svc, case).await?;
    let text = String::from_utf8_lossy(&body);
    let shown: String = text.chars().take(300).collect();
    if status.as_u16() != case.status || !status.is_client_error() {
        return Err(format!(
            "status {status}, expected {}; body {shown}",
            case.status
        ));
    }
    if content_type.as_ref().map(HeaderValue::as_bytes) != Some(b"application/json") {
        return Err(format!("content type {content_type:?}; body {shown}"));
    }
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| format!("body is not json ({e}): {shown}"))?;
    let message = value
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get("error"))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("body is not {{\"error\": \"...\"}}: {shown}"))?;
    if message.is_empty() || message.starts_with(char::is_uppercase) || message.ends_with('.') {
        return Err(format!(
            "message `{message}` is not lowercase without a final period"
        ));
    }
    if !message.contains(case.says) {
        return Err(format!("message `{message}` does not say `{}`", case.says));
    }
    Ok(())
}

/// Run every case against `svc`, then fail listing every case that failed.
async fn run_corpus(svc: &Service, cases: &[Case]) {
    let client = client();
    let mut before = svc.quiet_dump().await;
    let mut failures = Vec::new();
    for case in cases {
        if let Err(why) = check(&client, svc, case, &mut before).await {
            failures.push(why);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

async fn start(dir: &tempfile::TempDir, admin: bool, open_registration: bool) -> Service {
    Service::start_with(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        "127.0.0.1:0",
        |o| {
            o.admin_token = admin.then(|| Secret::Value(ADMIN.into()));
            o.open_registration = open_registration;
        },
    )
    .await
}

/// Workspaces `ws` (a live and a revoked token) and `ws-other`.
fn provision(svc: &Service) -> Tokens {
    let revoked = svc.provision("ws", Workspace, false);
    svc.store.revoke_tokens("ws", T0_MS, false).unwrap();
    let ws = svc.issue_token("ws");
    let other = svc.provision("ws-other", Workspace, false);
    Tokens { ws, other, revoked }
}

#[test]
fn bad_input_corpus_has_at_least_50_cases() {
    let t = Tokens::dummy();
    let counts = [
        ("heartbeat", heartbeat_cases(&t).len()),
        ("register", register_cases(&t).len()),
        ("open registration", open_registration_cases().len()),
        ("admin", admin_cases().len()),
        ("tokens", token_cases(&t).len()),
        ("routes", route_cases(&t).len()),
        ("update-card", update_card_cases(&t).len()),
        ("disabled admin", disabled_admin_cases().len()),
    ];
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    assert!(total >= 50, "only {total} cases: {counts:?}");
    for (table, n) in counts {
        assert!(n > 0, "the {table} table is empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_heartbeat_corpus_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, true, false).await;
    let t = provision(&svc);
    run_corpus(&svc, &heartbeat_cases(&t)).await;

    let at_limit = padded_heartbeat(REGISTRY_LIMIT);
    let (status, body) = svc
        .post_raw("POST", "/registry/heartbeat", Some(&t.ws), at_limit)
        .await;
    assert_eq!((status, &body["status"]), (StatusCode::OK, &json!("ok")));

    let (status, body) = svc
        .post_raw("POST", "/registry/heartbeat", Some(&t.ws), HEARTBEAT)
        .await;
    assert_eq!((status, &body["status"]), (StatusCode::OK, &json!("ok")));
    let ws = svc.workspace("ws");
    assert_eq!(ws["last_sample_error"], "boom: sample error");
    assert_eq!(ws["last_error_rate"], 0.5);
    assert_eq!(ws["status"], "degraded");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_register_corpus_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, true, false).await;
    let t = provision(&svc);
    run_corpus(&svc, &register_cases(&t)).await;

    let (status, body) = svc
        .post_raw("POST", "/registry/register", Some(&t.ws), REGISTER)
        .await;
    assert_eq!(
        (status, &body["status"], &body["delivery_mode"]),
        (StatusCode::OK, &json!("registered"), &json!("poll")),
        "{body}"
    );
    assert!(body["platform_inbound_secret"].is_string(), "{body}");
    assert_eq!(svc.status("ws"), "online");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_update_card_corpus_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, true, false).await;
    let t = provision(&svc);
    run_corpus(&svc, &update_card_cases(&t)).await;
    let (status, body) = svc
        .post_raw(
            "POST",
            "/registry/update-card",
            Some(&t.ws),
            br#"{"workspace_id":"ws","agent_card":{"name":"ok"}}"#.to_vec(),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"status": "updated"}))
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_register_ids_are_refused_under_open_registration() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, true, true).await;
    run_corpus(&svc, &open_registration_cases()).await;

    let body = json!({"id": "fresh-ws", "url": "", "agent_card": {}, "delivery_mode": "poll"});
    let (status, registered) = svc.register(None, body).await;
    assert_eq!(status, StatusCode::OK, "{registered}");
    assert!(registered["auth_token"].is_string(), "{registered}");
    assert_eq!(svc.workspace("fresh-ws")["kind"], "workspace");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_admin_corpus_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, true, false).await;
    provision(&svc);
    run_corpus(&svc, &admin_cases()).await;

    let (status, chain) = svc.get_as("/admin/chain", Some(ADMIN)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{chain}");
    let eval = format!(r#"{{"input":{EVAL_INPUT}}}"#);
    let (status, view) = svc.post_raw("POST", "/admin/eval", Some(ADMIN), eval).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["chain_version"], chain["version"]);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_tokens_are_never_interchangeable_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, true, false).await;
    let t = provision(&svc);
    run_corpus(&svc, &token_cases(&t)).await;

    let (status, _) = svc
        .post_raw("POST", "/registry/heartbeat", Some(&t.ws), HEARTBEAT)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = svc.get_as("/admin/chain", Some(ADMIN)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_unknown_routes_and_methods_are_json_404_and_405() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, true, false).await;
    let t = provision(&svc);
    run_corpus(&svc, &route_cases(&t)).await;

    let (status, _) = svc
        .post_raw("POST", "/registry/heartbeat", Some(&t.ws), HEARTBEAT)
        .await;
    assert_eq!(status, StatusCode::OK);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_disabled_admin_api_refuses_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&dir, false, false).await;
    let t = provision(&svc);
    run_corpus(&svc, &disabled_admin_cases()).await;

    let (status, _) = svc
        .post_raw("POST", "/registry/heartbeat", Some(&t.ws), HEARTBEAT)
        .await;
    assert_eq!(status, StatusCode::OK);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_a_body_that_never_arrives_times_out_and_writes_nothing() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_with(
        &dir.path().join("heartgate.db"),
        ManualClock::at(T0_MS),
        "127.0.0.1:0",
        |o| o.server.body_timeout = std::time::Duration::from_millis(300),
    )
    .await;
    let tokens = provision(&svc);
    let before = svc.quiet_dump().await;
    let started = std::time::Instant::now();
    let addr = svc.addr;
    let ws = tokens.ws.clone();
    // A blocking client on its own thread: headers and the start of a body,
    // then nothing more. The service must answer and let go.
    let answer = tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let head = format!(
            "POST /registry/heartbeat HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ws}\r\n\
             content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"workspace_id\""
        );
        conn.write_all(head.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) => panic!("the service held the connection: {e}"),
            }
            if answer.windows(2).any(|w| w == b"}}") || answer.ends_with(b"}") {
                break;
            }
        }
        answer
    })
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(r#"{"error":"request body not received within"#),
        "{answer}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    common::assert_unchanged(&before, &svc.quiet_dump().await);
    svc.stop().await;
}
