//! Which agent URLs a register may store: the SSRF rules.
//!
//! A runtime registers the URL its agent listens on, and the service later
//! calls it. So that a register cannot point the service at the cloud
//! metadata endpoint, at the host's own loopback services or at a private
//! network, [`AgentUrlPolicy::check`] refuses a URL unless:
//! - its scheme is `http` or `https`, it has a host and no userinfo;
//! - its host is an IP address outside the blocked ranges of the mode
//!   ([`classify`], [`Range::allowed_in`]), or a name every address of which
//!   is (names are resolved; see [`AgentUrlMode`] for the names allowed
//!   without resolving and for what an unresolvable name means).
//!
//! The rules are those of the original control plane's `validateAgentURL` /
//! `isSafeURL`. The check is made when the URL is stored: a name can resolve
//! elsewhere later (DNS rebinding), so whoever connects to the agent must
//! not take a stored URL as proof of where it points.
//!
//! Refusals never echo the URL (logs and answers must not carry raw URLs):
//! each says which rule refused it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

/// How strict the check is (`[registry] agent_url_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AgentUrlMode {
    /// Production: loopback, RFC-1918 and `fd00::/8` are refused; a name must
    /// resolve, and every address it resolves to must be allowed. `localhost`
    /// is allowed by name.
    #[default]
    Strict,
    /// A hosted fleet on a private network: like strict, but RFC-1918 and
    /// `fd00::/8` are allowed, and so are the platform tunnel names
    /// `ws-<label>.<app_domain>` without resolving them.
    Saas,
    /// A developer box or compose network: loopback, RFC-1918 and `fd00::/8`
    /// are allowed, and a name that does not resolve is allowed (a name that
    /// does has its addresses checked).
    Dev,
}

impl AgentUrlMode {
    /// The mode named in configuration (`strict`, `saas`, `dev`).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "strict" => Some(Self::Strict),
            "saas" => Some(Self::Saas),
            "dev" => Some(Self::Dev),
            _ => None,
        }
    }

    /// The configuration name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Saas => "saas",
            Self::Dev => "dev",
        }
    }
}

/// A named address range the rules treat apart from the public internet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    /// `0.0.0.0/8` ("this network") and `::`.
    Unspecified,
    /// `127.0.0.0/8` and `::1`.
    Loopback,
    /// RFC 1918: `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`.
    Private,
    /// `fd00::/8`, the locally assigned half of the unique local addresses.
    UniqueLocal,
    /// `fc00::/8`, the unassigned half of the unique local addresses.
    UniqueLocalReserved,
    /// `169.254.0.0/16` (with the cloud metadata address `169.254.169.254`)
    /// and `fe80::/10`.
    LinkLocal,
    /// TEST-NET-1/2/3 (`192.0.2.0/24`, `198.51.100.0/24`, `203.0.113.0/24`)
    /// and `2001:db8::/32`.
    Documentation,
    /// Carrier-grade NAT, `100.64.0.0/10`.
    SharedAddressSpace,
    /// `224.0.0.0/4` and `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `240.0.0.0/4` (less the broadcast address).
    Reserved,
}

impl Range {
    /// The range in words, for refusals ("a link-local address").
    pub fn describe(self) -> &'static str {
        match self {
            Self::Unspecified => "an unspecified address",
            Self::Loopback => "a loopback address",
            Self::Private => "a private (rfc 1918) address",
            Self::UniqueLocal => "a unique local (fd00::/8) address",
            Self::UniqueLocalReserved => "a reserved unique local (fc00::/8) address",
            Self::LinkLocal => "a link-local address",
            Self::Documentation => "a documentation (test-net) address",
            Self::SharedAddressSpace => "a carrier-grade nat (100.64.0.0/10) address",
            Self::Multicast => "a multicast address",
            Self::Broadcast => "a broadcast address",
            Self::Reserved => "a reserved address",
        }
    }

    /// Whether an address in this range may be stored in `mode`.
    pub fn allowed_in(self, mode: AgentUrlMode) -> bool {
        match self {
            Self::Loopback => mode == AgentUrlMode::Dev,
            Self::Private | Self::UniqueLocal => {
                matches!(mode, AgentUrlMode::Saas | AgentUrlMode::Dev)
            }
            Self::Unspecified
            | Self::UniqueLocalReserved
            | Self::LinkLocal
            | Self::Documentation
            | Self::SharedAddressSpace
            | Self::Multicast
            | Self::Broadcast
            | Self::Reserved => false,
        }
    }

    /// Which mode would allow this range, for refusals; `None` if none does.
    fn allowed_with(self) -> Option<&'static str> {
        match self {
            Self::Loopback => Some(r#"allowed only with agent_url_mode = "dev""#),
            Self::Private | Self::UniqueLocal => {
                Some(r#"allowed only with agent_url_mode = "saas" or "dev""#)
            }
            _ => None,
        }
    }
}

/// Which named range `ip` falls in; `None` for a public address.
///
/// IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`) and NAT64
/// (`64:ff9b::a.b.c.d`) addresses are judged by the IPv4 address they embed.
pub fn classify(ip: IpAddr) -> Option<Range> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Range> {
    let [a, b, c, _] = ip.octets();
    if a == 0 {
        Some(Range::Unspecified)
    } else if a == 127 {
        Some(Range::Loopback)
    } else if a == 10 || (a == 172 && (16..=31).contains(&b)) || (a == 192 && b == 168) {
        Some(Range::Private)
    } else if a == 169 && b == 254 {
        Some(Range::LinkLocal)
    } else if a == 100 && (64..=127).contains(&b) {
        Some(Range::SharedAddressSpace)
    } else if (a, b, c) == (192, 0, 2) || (a, b, c) == (198, 51, 100) || (a, b, c) == (203, 0, 113)
    {
        Some(Range::Documentation)
    } else if (224..=239).contains(&a) {
        Some(Range::Multicast)
    } else if ip == Ipv4Addr::BROADCAST {
        Some(Range::Broadcast)
    } else if a >= 240 {
        Some(Range::Reserved)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<Range> {
    if ip.is_unspecified() {
        return Some(Range::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Range::Loopback);
    }
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let s = ip.segments();
    if s[0] & 0xffc0 == 0xfe80 {
        Some(Range::LinkLocal)
    } else if s[0] & 0xff00 == 0xfd00 {
        Some(Range::UniqueLocal)
    } else if s[0] & 0xff00 == 0xfc00 {
        Some(Range::UniqueLocalReserved)
    } else if s[0] & 0xff00 == 0xff00 {
        Some(Range::Multicast)
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some(Range::Documentation)
    } else {
        None
    }
}

/// The IPv4 address an IPv4-mapped (`::ffff:0:0/96`), IPv4-compatible
/// (`::/96`, less `::` and `::1`, handled before) or NAT64 (`64:ff9b::/96`)
/// address carries in its last 32 bits.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let mapped = s[..5] == [0; 5] && s[5] == 0xffff;
    let compatible = s[..6] == [0; 6];
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    if mapped || compatible || nat64 {
        let [.., a, b, c, d] = ip.octets();
        Some(Ipv4Addr::new(a, b, c, d))
    } else {
        None
    }
}

/// Why an agent URL was refused. The message names the rule, never the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlRefused(pub String);

impl UrlRefused {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Turns a host name into addresses.
pub trait Resolve: Send + Sync + std::fmt::Debug {
    /// The addresses of `host` (a name, never an IP literal); `port` is the
    /// URL's port, for resolvers that want one.
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>>;
}

/// The system resolver (`getaddrinfo` through [`ToSocketAddrs`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
        Ok((host, port).to_socket_addrs()?.map(|a| a.ip()).collect())
    }
}

/// How long a lookup may take before the name counts as not resolving.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// How many lookups may run at once for one policy (and its clones).
const MAX_LOOKUPS_IN_FLIGHT: usize = 16;

/// The agent URL rules of one configuration: a mode, the app domain of the
/// platform tunnel names, a resolver and a lookup timeout.
///
/// Clones share the count of lookups in flight.
#[derive(Clone, Debug)]
pub struct AgentUrlPolicy {
    mode: AgentUrlMode,
    /// Lowercase, without a trailing dot; `None` if not configured or empty.
    app_domain: Option<String>,
    resolver: Arc<dyn Resolve>,
    timeout: Duration,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
}

impl Default for AgentUrlPolicy {
    fn default() -> Self {
        Self::new(AgentUrlMode::Strict, None)
    }
}

/// The outcome of a lookup, as the rules see it.
enum Lookup {
    Addresses(Vec<IpAddr>),
    /// Failed, empty or timed out; `true` if it timed out.
    Unresolved {
        timed_out: bool,
    },
}

impl AgentUrlPolicy {
    /// The rules of `mode`, with the system resolver and a 2 s lookup
    /// timeout. `app_domain` matters only in [`AgentUrlMode::Saas`].
    pub fn new(mode: AgentUrlMode, app_domain: Option<String>) -> Self {
        let app_domain = app_domain
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty());
        Self {
            mode,
            app_domain,
            resolver: Arc::new(SystemResolver),
            timeout: DEFAULT_TIMEOUT,
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: MAX_LOOKUPS_IN_FLIGHT,
        }
    }

    /// The same rules with another resolver.
    pub fn with_resolver(self, resolver: Arc<dyn Resolve>) -> Self {
        Self { resolver, ..self }
    }

    /// The same rules with another lookup timeout.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// The mode of these rules.
    pub fn mode(&self) -> AgentUrlMode {
        self.mode
    }

    /// Whether `url` may be stored as an agent URL.
    ///
    /// Blocking (may resolve a name, for up to the lookup timeout): call
    /// from a blocking thread, never an async worker.
    pub fn check(&self, url: &str) -> Result<(), UrlRefused> {
        let target = parse(url)?;
        match target.host {
            Host::Ip(ip) => self.check_ip(ip, "is"),
            Host::Name(name) => self.check_name(&name, target.port),
        }
    }

    fn check_ip(&self, ip: IpAddr, verb: &str) -> Result<(), UrlRefused> {
        match classify(ip) {
            Some(range) if !range.allowed_in(self.mode) => {
                let mut message = format!("agent url host {verb} {}", range.describe());
                if let Some(hint) = range.allowed_with() {
                    message.push_str(&format!(" ({hint})"));
                }
                Err(UrlRefused(message))
            }
            _ => Ok(()),
        }
    }

    fn check_name(&self, name: &str, port: u16) -> Result<(), UrlRefused> {
        let bare = name.strip_suffix('.').unwrap_or(name);
        if bare.eq_ignore_ascii_case("localhost") {
            return Ok(());
        }
        if self.mode == AgentUrlMode::Saas && self.is_tunnel_name(bare) {
            return Ok(());
        }
        // A name is whatever Rust's parser does not take for an IP literal:
        // `2852039166` (169.254.169.254 in decimal), `0x7f.1` or `127.1` are
        // names here, and go to the resolver. Whatever getaddrinfo makes of
        // them is then checked like any other resolution, which is the safe
        // outcome.
        match self.lookup(name, port)? {
            Lookup::Addresses(addresses) => addresses
                .into_iter()
                .try_for_each(|ip| self.check_ip(ip, "resolves to")),
            Lookup::Unresolved { .. } if self.mode == AgentUrlMode::Dev => Ok(()),
            Lookup::Unresolved { timed_out: false } => {
                Err(UrlRefused::new("agent url host does not resolve"))
            }
            Lookup::Unresolved { timed_out: true } => Err(UrlRefused::new(
                "agent url host does not resolve (lookup timed out)",
            )),
        }
    }

    /// Whether `host` (without its trailing dot) is `ws-<label>.<app_domain>`.
    fn is_tunnel_name(&self, host: &str) -> bool {
        let Some(domain) = &self.app_domain else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let Some(label) = host
            .strip_suffix(domain.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
        else {
            return false;
        };
        label
            .strip_prefix("ws-")
            .is_some_and(|rest| !rest.is_empty())
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    }

    /// Resolves `name` on a short-lived thread, waiting at most the timeout;
    /// refuses past the bound on lookups in flight.
    fn lookup(&self, name: &str, port: u16) -> Result<Lookup, UrlRefused> {
        let too_many =
            || UrlRefused::new("agent url host cannot be checked now (too many lookups in flight)");
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(too_many());
        }
        // Moved into the thread: the slot is given back when the lookup
        // ends, not when the wait does, so threads stuck in getaddrinfo
        // count against the bound. Dropped here if the thread cannot start.
        let slot = InFlight(Arc::clone(&self.in_flight));
        let (send, receive) = mpsc::sync_channel(1);
        let resolver = Arc::clone(&self.resolver);
        let host = name.to_owned();
        let spawned = std::thread::Builder::new()
            .name("agent-url-lookup".into())
            .spawn(move || {
                let _slot = slot;
                // The waiter may have given up; nobody to tell then.
                let _ = send.send(resolver.resolve(&host, port));
            });
        if spawned.is_err() {
            return Err(too_many());
        }
        Ok(match receive.recv_timeout(self.timeout) {
            Ok(Ok(addresses)) if !addresses.is_empty() => Lookup::Addresses(addresses),
            Ok(_) => Lookup::Unresolved { timed_out: false },
            Err(mpsc::RecvTimeoutError::Timeout) => Lookup::Unresolved { timed_out: true },
            // The lookup thread panicked.
            Err(mpsc::RecvTimeoutError::Disconnected) => Lookup::Unresolved { timed_out: false },
        })
    }
}

/// One lookup in flight; gives its slot back when dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Host {
    Ip(IpAddr),
    Name(String),
}

struct Target {
    host: Host,
    /// The URL's port, or the scheme's default.
    port: u16,
}

/// The host and port of `url`, if its shape is acceptable.
fn parse(url: &str) -> Result<Target, UrlRefused> {
    // The scheme is read by hand first: `file:///etc/passwd` is not even a
    // valid `Uri` (no authority), and it deserves the scheme message.
    let scheme = url
        .split_once(':')
        .map(|(scheme, _)| scheme)
        .filter(|s| {
            s.starts_with(|c: char| c.is_ascii_alphabetic())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
        .ok_or_else(|| UrlRefused::new("agent url must be an absolute http or https url"))?
        .to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(UrlRefused::new("agent url scheme must be http or https")),
    };
    // The parse error's message describes the fault, never the input.
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| UrlRefused(format!("agent url is not a valid url: {e}")))?;
    let authority = uri
        .authority()
        .filter(|a| !a.as_str().is_empty())
        .ok_or_else(|| UrlRefused::new("agent url has no host"))?;
    if authority.as_str().contains('@') {
        return Err(UrlRefused::new(
            "agent url must not contain credentials (user info)",
        ));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(UrlRefused::new("agent url has no host"));
    }
    // `Authority::port` skips a port that is not a number; read it here.
    let port = match &authority.as_str()[host.len()..] {
        "" => default_port,
        rest => rest
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| UrlRefused::new("agent url port is not valid"))?,
    };
    let host = if let Some(inner) = host.strip_prefix('[') {
        let literal = inner
            .strip_suffix(']')
            .and_then(|s| s.parse::<Ipv6Addr>().ok())
            .ok_or_else(|| UrlRefused::new("agent url host is not a valid ipv6 address"))?;
        Host::Ip(IpAddr::V6(literal))
    } else if let Ok(v4) = host.parse::<Ipv4Addr>() {
        Host::Ip(IpAddr::V4(v4))
    } else {
        Host::Name(host.to_owned())
    };
    Ok(Target { host, port })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Instant;

    /// Names and their addresses; any other name does not resolve.
    #[derive(Debug)]
    struct StaticResolver(HashMap<&'static str, Vec<IpAddr>>);

    impl Resolve for StaticResolver {
        fn resolve(&self, host: &str, _port: u16) -> std::io::Result<Vec<IpAddr>> {
            self.0
                .get(host)
                .cloned()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn static_resolver() -> Arc<dyn Resolve> {
        let mut names = HashMap::new();
        names.insert("example.com", vec![ip("93.184.215.14")]);
        names.insert("public-v6.test", vec![ip("2606:4700::1111")]);
        names.insert("mixed.test", vec![ip("93.184.215.14"), ip("10.0.0.1")]);
        names.insert("ula.test", vec![ip("93.184.215.14"), ip("fd12::1")]);
        names.insert("loopback.test", vec![ip("127.0.0.1")]);
        names.insert("metadata.test", vec![ip("169.254.169.254")]);
        names.insert("mapped-metadata.test", vec![ip("::ffff:169.254.169.254")]);
        names.insert("cgnat.test", vec![ip("100.64.1.1")]);
        names.insert("empty.test", vec![]);
        // What getaddrinfo makes of the decimal form of 169.254.169.254.
        names.insert("2852039166", vec![ip("169.254.169.254")]);
        Arc::new(StaticResolver(names))
    }

    fn policy(mode: AgentUrlMode) -> AgentUrlPolicy {
        AgentUrlPolicy::new(mode, Some("Apps.Example.".into())).with_resolver(static_resolver())
    }

    /// `None`: allowed; `Some(fragment)`: refused with a message holding it.
    type Expected = Option<&'static str>;

    fn check(policy: &AgentUrlPolicy, url: &str, expected: Expected) {
        let mode = policy.mode().as_str();
        match (policy.check(url), expected) {
            (Ok(()), None) => {}
            (Ok(()), Some(fragment)) => {
                panic!("{mode}: `{url}` was allowed, expected refusal with `{fragment}`")
            }
            (Err(refused), None) => panic!("{mode}: `{url}` was refused: {refused}"),
            (Err(refused), Some(fragment)) => {
                let message = refused.to_string();
                assert!(
                    message.contains(fragment),
                    "{mode}: `{url}` refused with `{message}`, expected `{fragment}`"
                );
                assert!(message.starts_with("agent url "), "{mode}: `{message}`");
                assert!(
                    url.is_empty() || !message.contains(url),
                    "{mode}: `{message}` echoes the url"
                );
                assert!(
                    !message.contains("/secret"),
                    "{mode}: `{message}` echoes the path"
                );
            }
        }
    }

    const OK: Expected = None;
    const LOOPBACK: Expected =
        Some(r#"a loopback address (allowed only with agent_url_mode = "dev")"#);
    const PRIVATE: Expected =
        Some(r#"private (rfc 1918) address (allowed only with agent_url_mode = "saas" or "dev")"#);
    const ULA: Expected = Some(r#"fd00::/8) address (allowed only with agent_url_mode = "saas""#);
    const ULA_RESERVED: Expected = Some("reserved unique local (fc00::/8) address");
    const LINK_LOCAL: Expected = Some("is a link-local address");
    const DOCUMENTATION: Expected = Some("documentation (test-net) address");
    const CGNAT: Expected = Some("carrier-grade nat");
    const MULTICAST: Expected = Some("a multicast address");
    const UNSPECIFIED: Expected = Some("an unspecified address");
    const BROADCAST: Expected = Some("a broadcast address");
    const RESERVED: Expected = Some("is a reserved address");
    const RESOLVES_LOOPBACK: Expected = Some("resolves to a loopback address");
    const RESOLVES_PRIVATE: Expected = Some("resolves to a private");
    const RESOLVES_ULA: Expected = Some("resolves to a unique local (fd00::/8)");
    const RESOLVES_LINK_LOCAL: Expected = Some("resolves to a link-local address");
    const RESOLVES_CGNAT: Expected = Some("resolves to a carrier-grade nat");
    const UNRESOLVED: Expected = Some("agent url host does not resolve");
    const SCHEME: Expected = Some("agent url scheme must be http or https");
    const NOT_ABSOLUTE: Expected = Some("must be an absolute http or https url");
    const NO_HOST: Expected = Some("agent url has no host");
    const INVALID: Expected = Some("agent url is not a valid url");
    const CREDENTIALS: Expected = Some("must not contain credentials");
    const BAD_PORT: Expected = Some("agent url port is not valid");
    const BAD_V6: Expected = Some("not a valid ipv6 address");

    /// The same outcome in every mode.
    const fn all(expected: Expected) -> [Expected; 3] {
        [expected, expected, expected]
    }

    /// Each row: a URL and what strict, saas and dev make of it.
    const TABLE: &[(&str, [Expected; 3])] = &[
        // Public addresses and names.
        ("http://8.8.8.8/secret", all(OK)),
        ("https://93.184.215.14:8443/secret", all(OK)),
        ("http://172.32.0.1/secret", all(OK)),
        ("http://100.128.0.1/secret", all(OK)),
        ("http://[2606:4700::1111]:8080/secret", all(OK)),
        ("http://[64:ff9b::808:808]/secret", all(OK)),
        ("http://example.com/secret", all(OK)),
        ("HTTPS://example.com/secret", all(OK)),
        ("http://public-v6.test/secret", all(OK)),
        // Loopback.
        ("http://127.0.0.1:9000/secret", [LOOPBACK, LOOPBACK, OK]),
        ("http://127.8.9.10/secret", [LOOPBACK, LOOPBACK, OK]),
        ("http://[::1]:9000/secret", [LOOPBACK, LOOPBACK, OK]),
        ("http://[::ffff:127.0.0.1]/secret", [LOOPBACK, LOOPBACK, OK]),
        ("http://[64:ff9b::7f00:1]/secret", [LOOPBACK, LOOPBACK, OK]),
        // `localhost` is allowed by name in every mode.
        ("http://localhost:8080/secret", all(OK)),
        ("http://LOCALHOST./secret", all(OK)),
        ("http://LocalHost/secret", all(OK)),
        // RFC 1918 and fd00::/8.
        ("http://10.0.0.1/secret", [PRIVATE, OK, OK]),
        ("http://10.255.255.255/secret", [PRIVATE, OK, OK]),
        ("http://172.16.0.1/secret", [PRIVATE, OK, OK]),
        ("http://172.31.255.255/secret", [PRIVATE, OK, OK]),
        ("http://192.168.1.1/secret", [PRIVATE, OK, OK]),
        ("http://[::ffff:10.0.0.1]/secret", [PRIVATE, OK, OK]),
        ("http://[fd00::1]/secret", [ULA, OK, OK]),
        ("http://[fdff:ffff::1]/secret", [ULA, OK, OK]),
        // Always blocked.
        ("http://[fc00::1]/secret", all(ULA_RESERVED)),
        ("http://169.254.169.254/secret", all(LINK_LOCAL)),
        ("http://169.254.0.1/secret", all(LINK_LOCAL)),
        ("http://[::ffff:169.254.169.254]/secret", all(LINK_LOCAL)),
        ("http://[::ffff:a9fe:a9fe]/secret", all(LINK_LOCAL)),
        ("http://[::169.254.169.254]/secret", all(LINK_LOCAL)),
        ("http://[64:ff9b::a9fe:a9fe]/secret", all(LINK_LOCAL)),
        ("http://[64:ff9b::169.254.169.254]/secret", all(LINK_LOCAL)),
        ("http://[fe80::1]/secret", all(LINK_LOCAL)),
        ("http://[febf:ffff::1]/secret", all(LINK_LOCAL)),
        ("http://192.0.2.1/secret", all(DOCUMENTATION)),
        ("http://198.51.100.7/secret", all(DOCUMENTATION)),
        ("http://203.0.113.9/secret", all(DOCUMENTATION)),
        ("http://[2001:db8::1]/secret", all(DOCUMENTATION)),
        ("http://[2001:db8:ffff::1]/secret", all(DOCUMENTATION)),
        ("http://100.64.0.1/secret", all(CGNAT)),
        ("http://100.127.255.254/secret", all(CGNAT)),
        ("http://224.0.0.1/secret", all(MULTICAST)),
        ("http://239.255.255.250/secret", all(MULTICAST)),
        ("http://[ff02::1]/secret", all(MULTICAST)),
        ("http://0.0.0.0/secret", all(UNSPECIFIED)),
        ("http://0.1.2.3/secret", all(UNSPECIFIED)),
        ("http://[::]/secret", all(UNSPECIFIED)),
        ("http://255.255.255.255/secret", all(BROADCAST)),
        ("http://240.0.0.1/secret", all(RESERVED)),
        // Names: every address they resolve to is checked.
        ("http://mixed.test/secret", [RESOLVES_PRIVATE, OK, OK]),
        ("http://ula.test/secret", [RESOLVES_ULA, OK, OK]),
        (
            "http://loopback.test/secret",
            [RESOLVES_LOOPBACK, RESOLVES_LOOPBACK, OK],
        ),
        ("http://metadata.test/secret", all(RESOLVES_LINK_LOCAL)),
        (
            "http://mapped-metadata.test/secret",
            all(RESOLVES_LINK_LOCAL),
        ),
        ("http://cgnat.test/secret", all(RESOLVES_CGNAT)),
        ("http://2852039166/secret", all(RESOLVES_LINK_LOCAL)),
        // Unresolvable names: refused unless dev; an empty answer is no answer.
        ("http://unknown.test/secret", [UNRESOLVED, UNRESOLVED, OK]),
        ("http://empty.test/secret", [UNRESOLVED, UNRESOLVED, OK]),
        // Platform tunnel names, allowed unresolved in saas only.
        ("http://ws-abc.apps.example/secret", [UNRESOLVED, OK, OK]),
        (
            "https://WS-ABC.Apps.EXAMPLE.:8443/secret",
            [UNRESOLVED, OK, OK],
        ),
        ("http://ws-a-1.apps.example./secret", [UNRESOLVED, OK, OK]),
        (
            "http://ws-.apps.example/secret",
            [UNRESOLVED, UNRESOLVED, OK],
        ),
        (
            "http://xws-a.apps.example/secret",
            [UNRESOLVED, UNRESOLVED, OK],
        ),
        (
            "http://ws-a.b.apps.example/secret",
            [UNRESOLVED, UNRESOLVED, OK],
        ),
        (
            "http://ws-a.other.example/secret",
            [UNRESOLVED, UNRESOLVED, OK],
        ),
        (
            "http://ws-a.notapps.example/secret",
            [UNRESOLVED, UNRESOLVED, OK],
        ),
        (
            "http://ws-a.apps.example../secret",
            [UNRESOLVED, UNRESOLVED, OK],
        ),
        ("http://apps.example/secret", [UNRESOLVED, UNRESOLVED, OK]),
        // Shape.
        ("file:///etc/passwd", all(SCHEME)),
        ("ftp://example.com/secret", all(SCHEME)),
        ("gopher://example.com:70/secret", all(SCHEME)),
        ("javascript:alert(1)", all(SCHEME)),
        ("localhost:8080/secret", all(SCHEME)),
        ("//example.com/secret", all(NOT_ABSOLUTE)),
        ("/secret", all(NOT_ABSOLUTE)),
        ("", all(NOT_ABSOLUTE)),
        ("http:///secret", all(INVALID)),
        ("http://", all(INVALID)),
        ("http://:80/secret", all(NO_HOST)),
        ("http://exa mple.com/secret", all(INVALID)),
        ("http://user:pass@example.com/secret", all(CREDENTIALS)),
        ("http://user@example.com/secret", all(CREDENTIALS)),
        (
            "http://example.com@169.254.169.254/secret",
            all(CREDENTIALS),
        ),
        ("http://example.com:http/secret", all(BAD_PORT)),
        ("http://example.com:99999/secret", all(BAD_PORT)),
        ("http://[fe80::1%25eth0]/secret", [BAD_V6, BAD_V6, BAD_V6]),
    ];

    #[test]
    fn every_range_and_shape_is_judged_per_mode() {
        let modes = [AgentUrlMode::Strict, AgentUrlMode::Saas, AgentUrlMode::Dev];
        let policies = modes.map(policy);
        for (url, expected) in TABLE {
            for (policy, expected) in policies.iter().zip(expected) {
                check(policy, url, *expected);
            }
        }
    }

    #[test]
    fn refusals_never_echo_the_url() {
        for mode in [AgentUrlMode::Strict, AgentUrlMode::Saas, AgentUrlMode::Dev] {
            let policy = policy(mode);
            for (url, _) in TABLE {
                if let Err(UrlRefused(message)) = policy.check(url) {
                    assert!(
                        url.is_empty() || !message.contains(url),
                        "`{message}` echoes `{url}`"
                    );
                    assert!(!message.contains("/secret"), "`{message}` echoes the path");
                    assert!(!message.contains("passwd"), "`{message}` echoes the path");
                    assert!(!message.contains("pass@"), "`{message}` echoes credentials");
                }
            }
        }
    }

    #[test]
    fn saas_without_app_domain_matches_no_tunnel_name() {
        for domain in [None, Some(String::new()), Some(".".into())] {
            let policy =
                AgentUrlPolicy::new(AgentUrlMode::Saas, domain).with_resolver(static_resolver());
            check(&policy, "http://ws-abc.apps.example/secret", UNRESOLVED);
            check(&policy, "http://ws-abc./secret", UNRESOLVED);
        }
    }

    /// Sleeps longer than any timeout the tests give, then answers public.
    #[derive(Debug)]
    struct SlowResolver;

    impl Resolve for SlowResolver {
        fn resolve(&self, _host: &str, _port: u16) -> std::io::Result<Vec<IpAddr>> {
            std::thread::sleep(Duration::from_millis(500));
            Ok(vec![ip("93.184.215.14")])
        }
    }

    #[test]
    fn a_lookup_past_the_timeout_counts_as_not_resolving() {
        for (mode, expected) in [
            (
                AgentUrlMode::Strict,
                Some("does not resolve (lookup timed out)"),
            ),
            (
                AgentUrlMode::Saas,
                Some("does not resolve (lookup timed out)"),
            ),
            (AgentUrlMode::Dev, OK),
        ] {
            let policy = AgentUrlPolicy::new(mode, None)
                .with_resolver(Arc::new(SlowResolver))
                .with_timeout(Duration::from_millis(50));
            let started = Instant::now();
            check(&policy, "http://slow.test/secret", expected);
            assert!(
                started.elapsed() < Duration::from_millis(400),
                "the check waited"
            );
        }
    }

    /// Blocks every lookup until the test lets go, then answers public.
    #[derive(Debug)]
    struct GateResolver(Mutex<()>);

    impl Resolve for GateResolver {
        fn resolve(&self, _host: &str, _port: u16) -> std::io::Result<Vec<IpAddr>> {
            let _open = self.0.lock().unwrap();
            Ok(vec![ip("93.184.215.14")])
        }
    }

    #[test]
    fn lookups_past_the_bound_are_refused_until_one_ends() {
        let gate = Arc::new(GateResolver(Mutex::new(())));
        let mut policy = AgentUrlPolicy::new(AgentUrlMode::Strict, None)
            .with_resolver(gate.clone())
            .with_timeout(Duration::from_millis(20));
        policy.max_in_flight = 1;
        let held = gate.0.lock().unwrap();
        // The first lookup is stuck: timed out, but still holding its slot.
        check(&policy, "http://one.test/secret", Some("lookup timed out"));
        let clone = policy.clone();
        check(
            &clone,
            "http://two.test/secret",
            Some("too many lookups in flight"),
        );
        // Names allowed without a lookup need no slot.
        check(&clone, "http://localhost/secret", OK);
        check(&clone, "http://8.8.8.8/secret", OK);
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        while policy.in_flight.load(Ordering::Acquire) != 0 {
            assert!(Instant::now() < deadline, "the stuck lookup never ended");
            std::thread::yield_now();
        }
        check(&policy, "http://three.test/secret", OK);
    }

    #[test]
    fn modes_parse_from_their_names() {
        for mode in [AgentUrlMode::Strict, AgentUrlMode::Saas, AgentUrlMode::Dev] {
            assert_eq!(AgentUrlMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(AgentUrlMode::parse("lenient"), None);
        assert_eq!(AgentUrlMode::default(), AgentUrlMode::Strict);
        assert_eq!(AgentUrlPolicy::default().mode(), AgentUrlMode::Strict);
    }

    #[test]
    fn classify_names_the_range_or_none_for_public() {
        for (address, expected) in [
            ("169.254.169.254", Some(Range::LinkLocal)),
            ("::ffff:169.254.169.254", Some(Range::LinkLocal)),
            ("64:ff9b::10.1.2.3", Some(Range::Private)),
            ("fd00::1", Some(Range::UniqueLocal)),
            ("fc00::1", Some(Range::UniqueLocalReserved)),
            ("1.1.1.1", None),
            ("2001:db9::1", None),
        ] {
            assert_eq!(classify(ip(address)), expected, "{address}");
        }
    }
}
