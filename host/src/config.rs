//! The service's configuration file (TOML), validated before anything starts.
//! Every key is optional; `deploy/heartgate.example.toml` documents them all.
//! Relative paths are relative to the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ServiceOptions;
use crate::agent_url::{AgentUrlMode, AgentUrlPolicy};
use crate::chain::ChainSpec;
use crate::deliverer::restart::RestartHook;
use crate::deliverer::{GiteaConfig, Secret};
use crate::liveness::{LivenessConfig, parse_duration};

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read `{}`: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("`{}`: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// `[reconcile]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSection {
    pub concurrency: Option<usize>,
    pub deadline_secs: Option<u64>,
    pub max_plugin_mib: Option<u64>,
    pub max_plugin_files: Option<usize>,
    pub git_timeout_secs: Option<u64>,
    /// Whether this host runs reconcile runs (default true): off for a host
    /// without the workspaces' config volumes.
    pub enabled: Option<bool>,
    /// On PostgreSQL, how long a claimed run stays this host's without
    /// renewal before another host may take it over.
    pub lease_seconds: Option<u64>,
}

/// `[postgres]`: only for a `postgres://` database.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// The most connections this host opens.
    pub pool_size: Option<usize>,
    /// How long a request waits for a free connection, and how long opening
    /// one may take, before it fails with 503.
    pub timeout_ms: Option<u64>,
}

/// `[gitea]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GiteaSection {
    pub base_url: Option<String>,
    /// The environment variable holding the token for private sources.
    pub token_env: Option<String>,
}

/// `[http]`: the server's limits.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Registers and admin requests on blocking threads at once.
    pub max_in_flight: Option<usize>,
    pub header_timeout_secs: Option<u64>,
    pub body_timeout_secs: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    /// The most connections open at once.
    pub max_connections: Option<usize>,
}

/// `[policy]`: the store of pushed modules.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// The most pushed modules stored.
    pub max_stored_modules: Option<u64>,
    /// The most MiB of pushed modules stored.
    pub max_stored_module_mib: Option<u64>,
    /// Where compiled modules are kept, so each is compiled once (relative
    /// to the config file; `""`: nowhere) [default: `HEARTGATE_MODULE_CACHE`,
    /// else `$XDG_CACHE_HOME/heartgate/modules`, else
    /// `~/.cache/heartgate/modules`].
    pub module_cache: Option<PathBuf>,
}

/// `[store]`: the database's file system.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Below this many MiB free, the service is unready and acknowledges no
    /// heartbeat before its commit.
    pub min_free_mib: Option<u64>,
}

/// `[decision_log]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionLogSection {
    /// The most decision rows kept; the oldest are pruned first.
    pub max_rows: Option<u64>,
    /// Decisions older than this many days are pruned; 0 keeps them until
    /// `max_rows`.
    pub retention_days: Option<u64>,
}

/// `[restart]`: either `command` or `url`, or neither.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSection {
    pub command: Option<Vec<String>>,
    pub url: Option<String>,
    /// The environment variable holding the webhook's HMAC secret.
    pub secret_env: Option<String>,
    pub timeout_secs: Option<u64>,
    pub attempts: Option<u32>,
}

/// `[liveness]`: when silence is noticed. Durations are strings such as
/// `"2s"`, `"90s"`, `"12m"`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LivenessSection {
    pub heartbeat_ttl: Option<String>,
    pub provision_timeout: Option<String>,
    pub sweep_interval: Option<String>,
    /// `[liveness.runtime.<name>]`
    #[serde(default)]
    pub runtime: std::collections::BTreeMap<String, RuntimeLivenessSection>,
}

/// `[liveness.runtime.<name>]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeLivenessSection {
    pub provision_timeout: Option<String>,
}

impl LivenessSection {
    /// The configuration it describes over the built-in defaults; the
    /// error names the key.
    pub fn resolve(&self) -> Result<LivenessConfig, (String, String)> {
        let mut c = LivenessConfig::default();
        let parse = |key: &str, v: &Option<String>, into: &mut std::time::Duration| {
            if let Some(text) = v {
                *into = parse_duration(text).map_err(|m| (key.to_string(), m))?;
            }
            Ok::<(), (String, String)>(())
        };
        parse(
            "liveness.heartbeat_ttl",
            &self.heartbeat_ttl,
            &mut c.heartbeat_ttl,
        )?;
        parse(
            "liveness.provision_timeout",
            &self.provision_timeout,
            &mut c.provision_timeout,
        )?;
        parse(
            "liveness.sweep_interval",
            &self.sweep_interval,
            &mut c.sweep_interval,
        )?;
        for (name, section) in &self.runtime {
            let key = format!("liveness.runtime.{name}.provision_timeout");
            let Some(text) = &section.provision_timeout else {
                return Err((
                    format!("liveness.runtime.{name}"),
                    "needs `provision_timeout`".into(),
                ));
            };
            let d = parse_duration(text).map_err(|m| (key, m))?;
            c.runtime_provision_timeout.insert(name.clone(), d);
        }
        c.check()?;
        Ok(c)
    }
}

/// `[registry]`: which agent URLs a push-mode register may store.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    /// `strict` (default), `saas` or `dev`.
    pub agent_url_mode: Option<String>,
    /// The platform's app domain: `ws-*.<app_domain>` names are allowed in
    /// `saas` mode without resolving.
    pub app_domain: Option<String>,
}

impl RegistrySection {
    /// The policy it describes; the error names the key.
    pub fn resolve(&self) -> Result<AgentUrlPolicy, (String, String)> {
        let mode = match self.agent_url_mode.as_deref() {
            None => AgentUrlMode::Strict,
            Some(text) => AgentUrlMode::parse(text).ok_or_else(|| {
                (
                    "registry.agent_url_mode".to_string(),
                    format!("must be `strict`, `saas` or `dev`, not `{text}`"),
                )
            })?,
        };
        if let Some(domain) = &self.app_domain {
            let trimmed = domain.trim_end_matches('.');
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            };
            if trimmed.is_empty() || trimmed.len() > 253 || !trimmed.split('.').all(label_ok) {
                return Err((
                    "registry.app_domain".to_string(),
                    format!("must be a DNS name such as `apps.example.com`, not `{domain}`"),
                ));
            }
        }
        Ok(AgentUrlPolicy::new(mode, self.app_domain.clone()))
    }
}

/// The configuration file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<SocketAddr>,
    /// The SQLite database file, or a `postgres://` URL (`--db` and
    /// `HEARTGATE_DB` override it).
    pub database: Option<PathBuf>,
    pub max_body_bytes: Option<usize>,
    /// The longest text of a runtime's request stored (longer ones are cut).
    pub max_text_bytes: Option<usize>,
    /// The environment variable holding the admin API's bearer token.
    pub admin_token_env: Option<String>,
    pub configs_root: Option<PathBuf>,
    pub plugins_dir: Option<PathBuf>,
    pub allow_unpinned: Option<bool>,
    pub open_registration: Option<bool>,
    #[serde(default)]
    pub reconcile: ReconcileSection,
    #[serde(default)]
    pub gitea: GiteaSection,
    #[serde(default)]
    pub restart: RestartSection,
    #[serde(default)]
    pub decision_log: DecisionLogSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub liveness: LivenessSection,
    #[serde(default)]
    pub registry: RegistrySection,
    #[serde(default)]
    pub postgres: PostgresSection,
    pub chain: Option<ChainSpec>,
}

impl ConfigFile {
    /// Read and validate `path`; errors name the key and the line.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        // Parse errors carry their own line and column; a value the parser
        // accepted but the rules refuse is reported at its key's line.
        let config: ConfigFile = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: match key_line(&text, key) {
                Some(line) => format!("line {line}: `{key}` {message}"),
                None => format!("`{key}` {message}"),
            },
        };
        if let Some(n) = config.max_body_bytes
            && !(1024..=16 << 20).contains(&n)
        {
            return Err(invalid(
                "max_body_bytes",
                format!("must be 1024-16777216, not {n}"),
            ));
        }
        if let Some(n) = config.max_text_bytes
            && !(256..=65_536).contains(&n)
        {
            return Err(invalid(
                "max_text_bytes",
                format!("must be 256-65536, not {n}"),
            ));
        }
        if let Some(n) = config.http.max_connections
            && !(16..=65_536).contains(&n)
        {
            return Err(invalid(
                "http.max_connections",
                format!("must be 16-65536, not {n}"),
            ));
        }
        for (key, value, range) in [
            (
                "policy.max_stored_modules",
                config.policy.max_stored_modules,
                1..=100_000,
            ),
            (
                "policy.max_stored_module_mib",
                config.policy.max_stored_module_mib,
                1..=65_536,
            ),
            ("store.min_free_mib", config.store.min_free_mib, 0..=1 << 20),
            (
                "reconcile.lease_seconds",
                config.reconcile.lease_seconds,
                2..=3_600,
            ),
            (
                "postgres.pool_size",
                config.postgres.pool_size.map(|n| n as u64),
                1..=1_000,
            ),
            (
                "postgres.timeout_ms",
                config.postgres.timeout_ms,
                50..=60_000,
            ),
        ] {
            if let Some(n) = value.filter(|n| !range.contains(n)) {
                return Err(invalid(
                    key,
                    format!("must be {}-{}, not {n}", range.start(), range.end()),
                ));
            }
        }
        let r = &config.reconcile;
        if let Some(n) = r.concurrency.filter(|n| !(1..=64).contains(n)) {
            return Err(invalid(
                "reconcile.concurrency",
                format!("must be 1-64, not {n}"),
            ));
        }
        if let Some(n) = r.deadline_secs.filter(|n| !(1..=86_400).contains(n)) {
            return Err(invalid(
                "reconcile.deadline_secs",
                format!("must be 1-86400, not {n}"),
            ));
        }
        if let Some(n) = r.max_plugin_mib.filter(|n| !(1..=4096).contains(n)) {
            return Err(invalid(
                "reconcile.max_plugin_mib",
                format!("must be 1-4096, not {n}"),
            ));
        }
        let restart = &config.restart;
        if restart.command.is_some() && restart.url.is_some() {
            return Err(invalid(
                "restart.url",
                "and `restart.command` exclude each other".into(),
            ));
        }
        if restart.command.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid("restart.command", "must name a program".into()));
        }
        if let Some(url) = &restart.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "restart.url",
                format!("must be an http(s) URL, not `{url}`"),
            ));
        }
        if let Some(url) = &config.gitea.base_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "gitea.base_url",
                format!("must be an http(s) URL, not `{url}`"),
            ));
        }
        let http = &config.http;
        if let Some(n) = http.max_in_flight.filter(|n| !(1..=1024).contains(n)) {
            return Err(invalid(
                "http.max_in_flight",
                format!("must be 1-1024, not {n}"),
            ));
        }
        for (key, value) in [
            ("http.header_timeout_secs", http.header_timeout_secs),
            ("http.body_timeout_secs", http.body_timeout_secs),
            ("http.shutdown_grace_secs", http.shutdown_grace_secs),
        ] {
            if let Some(n) = value.filter(|n| !(1..=3_600).contains(n)) {
                return Err(invalid(key, format!("must be 1-3600, not {n}")));
            }
        }
        let log = &config.decision_log;
        if let Some(n) = log
            .max_rows
            .filter(|n| !(1_000..=1_000_000_000).contains(n))
        {
            return Err(invalid(
                "decision_log.max_rows",
                format!("must be 1000-1000000000, not {n}"),
            ));
        }
        if let Some(n) = log.retention_days.filter(|n| *n > 36_500) {
            return Err(invalid(
                "decision_log.retention_days",
                format!("must be 0-36500, not {n}"),
            ));
        }
        for (key, name) in [
            ("admin_token_env", &config.admin_token_env),
            ("gitea.token_env", &config.gitea.token_env),
            ("restart.secret_env", &config.restart.secret_env),
        ] {
            if let Some(name) = name
                && !valid_env_name(name)
            {
                return Err(invalid(
                    key,
                    format!("must name an environment variable (A-Z, 0-9, _), not `{name}`"),
                ));
            }
        }
        if let Err((key, message)) = config.liveness.resolve() {
            return Err(invalid(&key, message));
        }
        if let Err((key, message)) = config.registry.resolve() {
            return Err(invalid(&key, message));
        }
        if config
            .database
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("database", "must not be empty".into()));
        }
        Ok(config)
    }

    /// Apply the file to `opts`; relative paths are taken from `base`.
    pub fn apply(self, opts: &mut ServiceOptions, base: &Path) {
        if let Some(n) = self.max_body_bytes {
            opts.server.max_body_bytes = n;
        }
        if let Some(n) = self.max_text_bytes {
            opts.server.input.max_text_bytes = n;
        }
        if let Some(n) = self.http.max_connections {
            opts.server.max_connections = n;
        }
        if let Some(n) = self.policy.max_stored_modules {
            opts.module_quota.max_modules = n;
        }
        if let Some(n) = self.policy.max_stored_module_mib {
            opts.module_quota.max_bytes = n << 20;
        }
        if let Some(dir) = self.policy.module_cache {
            opts.module_cache = (!dir.as_os_str().is_empty()).then(|| base.join(dir));
        }
        if let Some(n) = self.store.min_free_mib {
            opts.min_free_bytes = n << 20;
        }
        if let Some(open) = self.open_registration {
            opts.open_registration = open;
        }
        if let Some(name) = self.admin_token_env {
            opts.admin_token = Some(Secret::Env(name));
        }
        let d = &mut opts.deliverer;
        if let Some(p) = self.configs_root {
            d.configs_root = base.join(p);
        }
        if let Some(p) = self.plugins_dir {
            d.plugins_dir = base.join(p);
        }
        if let Some(b) = self.allow_unpinned {
            d.allow_unpinned = b;
        }
        let r = self.reconcile;
        if let Some(enabled) = r.enabled {
            opts.reconcile = enabled;
        }
        if let Some(n) = r.lease_seconds {
            opts.postgres.lease = Duration::from_secs(n);
        }
        if let Some(n) = self.postgres.pool_size {
            opts.postgres.pool_size = n;
        }
        if let Some(ms) = self.postgres.timeout_ms {
            opts.postgres.wait_timeout = Duration::from_millis(ms);
            opts.postgres.connect_timeout = Duration::from_millis(ms);
        }
        if let Some(n) = r.concurrency {
            opts.worker.concurrency = n;
        }
        if let Some(n) = r.deadline_secs {
            opts.worker.deadline = Duration::from_secs(n);
        }
        if let Some(n) = r.max_plugin_mib {
            d.limits.max_bytes = n << 20;
        }
        if let Some(n) = r.max_plugin_files {
            d.limits.max_files = n;
        }
        if let Some(n) = r.git_timeout_secs {
            d.git_timeout = Duration::from_secs(n);
        }
        let defaults = GiteaConfig::default();
        d.gitea = GiteaConfig {
            base_url: self.gitea.base_url.unwrap_or(defaults.base_url),
            token: self.gitea.token_env.map(Secret::Env).or(defaults.token),
        };
        let timeout = Duration::from_secs(self.restart.timeout_secs.unwrap_or(30));
        d.restart = match (self.restart.command, self.restart.url) {
            (Some(argv), _) => RestartHook::Command { argv, timeout },
            (None, Some(url)) => RestartHook::Http {
                url,
                secret: self.restart.secret_env.map(Secret::Env),
                attempts: self.restart.attempts.unwrap_or(3),
                timeout,
            },
            (None, None) => RestartHook::None,
        };
        let http = self.http;
        if let Some(n) = http.max_in_flight {
            opts.server.max_in_flight = n;
        }
        if let Some(n) = http.header_timeout_secs {
            opts.server.header_timeout = Duration::from_secs(n);
        }
        if let Some(n) = http.body_timeout_secs {
            opts.server.body_timeout = Duration::from_secs(n);
        }
        if let Some(n) = http.shutdown_grace_secs {
            opts.server.shutdown_grace = Duration::from_secs(n);
        }
        if let Some(n) = self.decision_log.max_rows {
            opts.retention.max_rows = n;
        }
        if let Some(days) = self.decision_log.retention_days {
            opts.retention.max_age_ms = match days {
                0 => None,
                d => Some(
                    i64::try_from(d)
                        .unwrap_or(i64::MAX)
                        .saturating_mul(86_400_000),
                ),
            };
        }
        // Checked by `load`.
        if let Ok(urls) = self.registry.resolve() {
            opts.agent_urls = urls;
        }
        if let Ok(liveness) = self.liveness.resolve() {
            opts.liveness = liveness;
        }
        opts.chain = self.chain.map(|spec| (spec, base.to_path_buf()));
    }
}

/// The 1-based line of the dotted `key` (e.g. `reconcile.concurrency`) in the
/// TOML `text`, if it is there.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part)?;
        if parts.peek().is_none() {
            let start = k.span().start;
            return Some(text[..start.min(text.len())].matches('\n').count() + 1);
        }
        table = match v.get_ref() {
            toml::de::DeValue::Table(t) => t,
            _ => return None,
        };
    }
    None
}

/// A portable environment variable name.
fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/heartgate.example.toml");
        let config = ConfigFile::load(&path).unwrap();
        assert_eq!(config.listen, Some(([127, 0, 0, 1], 8080).into()));
        let mut opts = ServiceOptions::new("x.db");
        config.apply(&mut opts, Path::new("/srv/heartgate"));
        assert_eq!(
            opts.deliverer.configs_root,
            Path::new("/srv/heartgate/configs")
        );
        assert_eq!(opts.worker.deadline, Duration::from_secs(600));
        assert_eq!(opts.server.body_timeout, Duration::from_secs(30));
        assert_eq!(opts.server.shutdown_grace, Duration::from_secs(10));
        assert_eq!(opts.retention.max_rows, 1_000_000);
        assert_eq!(opts.retention.max_age_ms, Some(30 * 86_400_000));
    }

    #[test]
    fn the_several_hosts_example_is_valid() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/several-hosts/heartgate.toml");
        let config = ConfigFile::load(&path).unwrap();
        let mut opts = ServiceOptions::new("postgres://h/db");
        config.apply(&mut opts, Path::new("/srv/heartgate"));
        assert!(opts.db.is_postgres());
        assert_eq!(opts.postgres.pool_size, 16);
        assert_eq!(opts.postgres.lease, Duration::from_secs(30));
        assert!(opts.reconcile);
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:8080\"\n\n[reconcile]\nconcurency = 2\n",
        )
        .unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("concurency") && err.contains("line 4"),
            "{err}"
        );
        std::fs::write(&path, "[restart]\ncommand = []\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("`restart.command`") && err.contains("line 2"),
            "{err}"
        );
        std::fs::write(
            &path,
            "# limits\nmax_body_bytes = 4096\n\n[reconcile]\n\nconcurrency = 0\n",
        )
        .unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 6: `reconcile.concurrency` must be 1-64, not 0"),
            "{err}"
        );
        std::fs::write(&path, "admin_token_env = \"my token\"\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 1: `admin_token_env`"), "{err}");
        std::fs::write(&path, "listen = \"localhost\"\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("listen"), "{err}");
    }

    #[test]
    fn liveness_durations_are_read_and_checked_at_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.toml");
        std::fs::write(
            &path,
            "[liveness]\nheartbeat_ttl = \"2s\"\nprovision_timeout = \"3s\"\nsweep_interval = \"200ms\"\n\n[liveness.runtime.kimi]\nprovision_timeout = \"5m\"\n",
        )
        .unwrap();
        let mut opts = ServiceOptions::new("x.db");
        ConfigFile::load(&path)
            .unwrap()
            .apply(&mut opts, dir.path());
        let l = &opts.liveness;
        assert_eq!(l.heartbeat_ttl, Duration::from_secs(2));
        assert_eq!(l.provision_timeout, Duration::from_secs(3));
        assert_eq!(l.sweep_interval, Duration::from_millis(200));
        assert_eq!(l.provision_timeout_for("kimi"), Duration::from_secs(300));
        // The built-in override stays unless the file replaces it.
        assert_eq!(l.provision_timeout_for("hermes"), Duration::from_secs(1800));
        for (text, expected) in [
            (
                "[liveness]\n\nheartbeat_ttl = \"3 minutes\"\n",
                "line 3: `liveness.heartbeat_ttl` `3 minutes` is not a duration",
            ),
            (
                "[liveness]\nsweep_interval = \"0s\"\n",
                "line 2: `liveness.sweep_interval` must be 10ms-1h00m, not 0ms",
            ),
            (
                "[liveness]\nheartbeat_ttl = \"2s\"\nsweep_interval = \"5s\"\n",
                "line 3: `liveness.sweep_interval` (5s) must not be longer than",
            ),
            (
                "[liveness.runtime.hermes]\nprovision_timeout = \"30d\"\n",
                "line 2: `liveness.runtime.hermes.provision_timeout` must be 1s-",
            ),
            (
                "[liveness.runtime.hermes]\n",
                "`liveness.runtime.hermes` needs `provision_timeout`",
            ),
            ("[liveness]\nttl = \"2s\"\n", "unknown field `ttl`"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = ConfigFile::load(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
