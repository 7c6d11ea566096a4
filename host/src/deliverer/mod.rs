//! The deliverer: the only code that touches workspace config volumes and
//! restart hooks.
//!
//! A verdict that requests a reconcile records a `reconcile_runs` row in state
//! `queued` in the same transaction as the rest of the verdict; after the
//! commit the executor tells a [`Deliverer`] (the reconcile worker, see
//! `reconcile`), which claims runs from the table. The queue is the database,
//! so a run survives a crash between commit and hand-over.
//!
//! [`PluginDeliverer::reconcile`] makes one workspace's installed plugins
//! match its declared ones: for each declared plugin that is not both
//! recorded as installed **and** present on disk, stage it from its source
//! ([`source`], [`stage`]), deliver it atomically into the config volume
//! ([`volume`]), record it; one plugin's failure never stops the others and
//! writes no installed row. After at least one delivery, the restart hook
//! runs ([`restart`]); a failed delivery restarts nothing.
//!
//! **Invariant:** tokens for private sources come from the service's
//! configuration or environment, never from a policy or a request.

pub mod process;
pub mod restart;
pub mod source;
pub mod stage;
pub mod volume;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;

use crate::clock::Clock;
use crate::model::ReconcileTrigger;
use crate::store::{InstalledPlugin, QueuedRun, ReconcileRun, Store};
use restart::{RestartHook, RestartOutcome};
use source::Source;
use stage::{StageError, StageLimits};
use volume::CompleteMarker;

/// Receives reconcile runs after their verdict committed. Must not block.
pub trait Deliverer: Send + Sync + 'static {
    /// The runs were committed in state `queued`.
    fn queued(&self, runs: &[QueuedRun]);
}

/// The HTTP(S) client used for archive downloads and restart webhooks.
pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// Build the HTTP(S) client (Mozilla's trust roots, bundled).
pub fn http_client() -> HttpClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// A secret named in the configuration: read when it is used, so rotating the
/// environment of a restarted service takes effect without a config change.
#[derive(Clone, Debug)]
pub enum Secret {
    /// The value of an environment variable.
    Env(String),
    /// A literal value (tests and embedders).
    Value(String),
}

impl Secret {
    /// The secret's value, if set and non-empty.
    pub fn resolve(&self) -> Option<String> {
        match self {
            Secret::Env(name) => std::env::var(name).ok().filter(|v| !v.is_empty()),
            Secret::Value(v) => Some(v.clone()).filter(|v| !v.is_empty()),
        }
    }

    /// How to tell an operator where the secret comes from.
    pub fn describe(&self) -> String {
        match self {
            Secret::Env(name) => format!("environment variable `{name}`"),
            Secret::Value(_) => "the configured value".to_string(),
        }
    }
}

/// Where Gitea archive sources are downloaded from.
#[derive(Clone, Debug)]
pub struct GiteaConfig {
    pub base_url: String,
    pub token: Option<Secret>,
}

impl Default for GiteaConfig {
    fn default() -> Self {
        GiteaConfig {
            base_url: "https://git.moleculesai.app".into(),
            token: Some(Secret::Env("MOLECULE_TEMPLATE_REPO_TOKEN".into())),
        }
    }
}

/// The deliverer's configuration.
#[derive(Clone, Debug)]
pub struct DelivererConfig {
    /// Holds one config volume per workspace: `<configs_root>/<id>/`.
    pub configs_root: PathBuf,
    /// Holds the `local://<name>` plugins: `<plugins_dir>/<name>/`.
    pub plugins_dir: PathBuf,
    pub allow_unpinned: bool,
    pub limits: StageLimits,
    pub git_timeout: Duration,
    pub download_timeout: Duration,
    pub gitea: GiteaConfig,
    pub restart: RestartHook,
}

impl Default for DelivererConfig {
    fn default() -> Self {
        DelivererConfig {
            configs_root: PathBuf::from("configs"),
            plugins_dir: PathBuf::from("plugins"),
            allow_unpinned: false,
            limits: StageLimits::default(),
            git_timeout: Duration::from_secs(120),
            download_timeout: Duration::from_secs(120),
            gitea: GiteaConfig::default(),
            restart: RestartHook::None,
        }
    }
}

/// The MCP server name the runtime renders from the management plugin.
pub const MANAGEMENT_MCP_SERVER: &str = "molecule-platform";

/// What happened to one declared plugin in a run.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PluginResult {
    pub name: String,
    pub source: String,
    /// `present` (already installed and on disk), `delivered`, or `failed`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installed_sha: Option<String>,
}

/// The outcome of one run, as recorded.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RunReport {
    pub plugins: Vec<PluginResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartOutcome>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restored_after_crash: Vec<String>,
    /// Something in the volume was not what it must be (a symlink, a FIFO,
    /// a device): the run touched nothing and failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl RunReport {
    fn refused(cause: String) -> RunReport {
        RunReport {
            plugins: Vec::new(),
            restart: None,
            restored_after_crash: Vec::new(),
            refused: Some(cause),
        }
    }

    /// The causes of failure in plain words, if the run failed.
    pub fn cause(&self) -> Option<String> {
        let mut causes: Vec<String> = self.refused.iter().cloned().collect();
        causes.extend(
            self.plugins
                .iter()
                .filter_map(|p| p.cause.as_ref().map(|c| format!("{}: {c}", p.name))),
        );
        if let Some(r) = self.restart.as_ref().filter(|r| !r.ok) {
            causes.push(format!("restart hook failed: {}", r.detail));
        }
        (!causes.is_empty()).then(|| causes.join("; "))
    }
}

/// The name of this process's staging directories in the temporary
/// directory: `heartgate-stage-<pid>-<random>`, so that the ones a killed
/// process left can be told from those of a live one.
fn scratch_prefix(pid: u32) -> String {
    format!("{SCRATCH_PREFIX}{pid}-")
}

const SCRATCH_PREFIX: &str = "heartgate-stage-";

/// Remove the staging directories that processes no longer running left in
/// the temporary directory (a SIGKILL mid-run leaves one; each holds up to a
/// plugin's size and a clone), and those of earlier versions of heartgate
/// (named without a pid) untouched for an hour. Returns how many.
pub fn clean_scratch() -> usize {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(SCRATCH_PREFIX) else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let pid = rest
            .split_once('-')
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw);
        let stale = match pid {
            Some(pid)
                if pid.as_raw_nonzero().get() == i32::try_from(std::process::id()).unwrap_or(0) =>
            {
                false
            }
            Some(pid) => matches!(
                rustix::process::test_kill_process(pid),
                Err(rustix::io::Errno::SRCH)
            ),
            None => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(3600)),
        };
        if stale && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Stages, delivers and restarts.
pub struct PluginDeliverer {
    config: DelivererConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    client: HttpClient,
}

impl PluginDeliverer {
    pub fn new(config: DelivererConfig, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        PluginDeliverer {
            config,
            store,
            clock,
            client: http_client(),
        }
    }

    /// Reconcile one workspace for `run`. Errors reading the store are
    /// returned; everything else is in the report.
    pub async fn reconcile(&self, run: &ReconcileRun) -> Result<RunReport, String> {
        let ws = run.workspace_id.clone();
        let root = self.config.configs_root.clone();
        let store = self.store.clone();
        // Everything that touches the volume runs on the blocking pool (it
        // is the runtime's to write: it may hold anything), and a refusal
        // fails the run before anything is touched.
        let (plan, looked) = {
            let ws = ws.clone();
            tokio::task::spawn_blocking(move || {
                let plan = store.reconcile_plan(&ws).map_err(|e| e.to_string())?;
                let looked = volume::recover(&root, &ws).and_then(|restored| {
                    let present = plan
                        .declared
                        .iter()
                        .map(|d| volume::presence(&root, &ws, &d.name))
                        .collect::<Result<Vec<bool>, _>>()?;
                    Ok((restored, present))
                });
                Ok::<_, String>((plan, looked))
            })
            .await
            .map_err(|e| format!("reconcile task failed: {e}"))??
        };
        let (restored, present) = match looked {
            Ok(looked) => looked,
            Err(refusal) => return Ok(RunReport::refused(refusal.to_string())),
        };
        let mut report = RunReport {
            plugins: Vec::new(),
            restart: None,
            restored_after_crash: restored,
            refused: None,
        };
        let mut delivered = 0;
        for (declared, present) in plan.declared.iter().zip(present) {
            let recorded = plan.installed.iter().any(|i| i.name == declared.name);
            if recorded && present {
                report.plugins.push(PluginResult {
                    name: declared.name.clone(),
                    source: declared.source.clone(),
                    result: "present",
                    cause: None,
                    installed_sha: None,
                });
                continue;
            }
            let result = self
                .install(&ws, run.id, &declared.name, &declared.source)
                .await;
            match result {
                Ok(sha) => {
                    delivered += 1;
                    report.plugins.push(PluginResult {
                        name: declared.name.clone(),
                        source: declared.source.clone(),
                        result: "delivered",
                        cause: None,
                        installed_sha: sha,
                    });
                }
                Err(cause) => {
                    tracing::error!(workspace_id = %ws, plugin = %declared.name, %cause, "plugin not delivered");
                    report.plugins.push(PluginResult {
                        name: declared.name.clone(),
                        source: declared.source.clone(),
                        result: "failed",
                        cause: Some(cause),
                        installed_sha: None,
                    });
                }
            }
        }
        // A recovery whose plugins are all in place but whose runtime has not
        // rendered the management MCP needs a restart too, or it would stay
        // stuck (e.g. after a restart hook that failed last time).
        let may_be_stale = run.trigger == ReconcileTrigger::McpRecovery.as_str()
            && delivered == 0
            && report.plugins.iter().all(|p| p.result == "present")
            && plan
                .declared
                .iter()
                .any(|p| p.name == crate::store::MANAGEMENT_PLUGIN);
        let stale_runtime = if may_be_stale {
            let root = self.config.configs_root.clone();
            let ws = ws.clone();
            let rendered = tokio::task::spawn_blocking(move || {
                volume::settings_have_mcp(&root, &ws, MANAGEMENT_MCP_SERVER)
            })
            .await
            .map_err(|e| format!("reconcile task failed: {e}"))?;
            match rendered {
                Ok(rendered) => !rendered,
                Err(refusal) => {
                    report.refused = Some(refusal.to_string());
                    return Ok(report);
                }
            }
        } else {
            false
        };
        if delivered > 0 || stale_runtime {
            report.restart =
                Some(restart::restart(&self.config.restart, &self.client, &ws, run.id).await);
        }
        Ok(report)
    }

    /// Stage, deliver and record one plugin. Returns the installed commit.
    async fn install(
        &self,
        ws: &str,
        run_id: i64,
        name: &str,
        raw_source: &str,
    ) -> Result<Option<String>, String> {
        source::check_name(name).map_err(|e| e.to_string())?;
        let source =
            source::parse(raw_source, self.config.allow_unpinned).map_err(|e| e.to_string())?;
        let scratch = tempfile::Builder::new()
            .prefix(&scratch_prefix(std::process::id()))
            .tempdir()
            .map_err(|e| format!("creating a staging directory: {e}"))?;
        let staged = scratch.path().join("plugin");
        let archive = match &source {
            Source::Gitea {
                owner,
                repo,
                reference,
            } => {
                let reference = match reference {
                    source::GitRef::Tag(r) | source::GitRef::Sha(r) | source::GitRef::Branch(r) => {
                        r.clone()
                    }
                    source::GitRef::Default => "main".to_string(),
                };
                Some(
                    self.download_gitea(owner, repo, &reference)
                        .await
                        .map_err(|e| e.to_string())?,
                )
            }
            _ => None,
        };
        let config = self.config.clone();
        let ws_owned = ws.to_string();
        let name_owned = name.to_string();
        let raw_owned = raw_source.to_string();
        let tracked = source.tracked();
        let now_ms = self.clock.now_ms();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || -> Result<Option<String>, String> {
            let limits = config.limits;
            let (sha, tally) = match (&source, archive) {
                (Source::Local { name: local }, _) => {
                    let dir = config.plugins_dir.join(local);
                    if !dir.is_dir() {
                        return Err(StageError::LocalMissing {
                            name: local.clone(),
                            dir: config.plugins_dir.clone(),
                        }
                        .to_string());
                    }
                    let tally =
                        stage::copy_tree(&dir, &staged, limits).map_err(|e| e.to_string())?;
                    if tally.files == 0 {
                        return Err(StageError::Empty.to_string());
                    }
                    (None, tally)
                }
                (Source::Git { url, reference }, _) => {
                    let (sha, tally) = stage::git_clone(
                        url,
                        reference,
                        scratch.path(),
                        &staged,
                        limits,
                        config.git_timeout,
                    )
                    .map_err(|e| e.to_string())?;
                    (Some(sha), tally)
                }
                (Source::Gitea { .. }, Some(bytes)) => {
                    let tally = stage::extract_tar_gz(&bytes, &staged, limits)
                        .map_err(|e| e.to_string())?;
                    (None, tally)
                }
                (Source::Gitea { .. }, None) => return Err("archive missing".into()),
            };
            let marker = CompleteMarker {
                name: name_owned.clone(),
                source: raw_owned.clone(),
                tracked_ref: tracked.clone(),
                installed_sha: sha.clone(),
                run_id,
                files: tally.files,
                bytes: tally.bytes,
            };
            volume::deliver(&config.configs_root, &ws_owned, &staged, &marker, limits)
                .map_err(|e| e.to_string())?;
            store
                .record_install(
                    &ws_owned,
                    &InstalledPlugin {
                        name: name_owned,
                        source: raw_owned,
                        tracked_ref: tracked,
                        installed_sha: sha.clone(),
                        installed_ms: now_ms,
                    },
                )
                .map_err(|e| format!("delivered but not recorded: {e}"))?;
            drop(scratch);
            Ok(sha)
        })
        .await
        .map_err(|e| format!("staging task failed: {e}"))?
    }

    async fn download_gitea(
        &self,
        owner: &str,
        repo: &str,
        reference: &str,
    ) -> Result<Bytes, StageError> {
        let base = self.config.gitea.base_url.trim_end_matches('/');
        let url = format!("{base}/api/v1/repos/{owner}/{repo}/archive/{reference}.tar.gz");
        let token = self.config.gitea.token.as_ref().and_then(Secret::resolve);
        let mut req = hyper::Request::get(&url);
        if let Some(token) = &token {
            req = req.header("authorization", format!("token {token}"));
        }
        let download = |reason: String| StageError::Download {
            url: url.clone(),
            reason,
        };
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| download(e.to_string()))?;
        let timeout = self.config.download_timeout;
        let resp = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| download(format!("no answer within {}s", timeout.as_secs())))?
            .map_err(|e| download(e.to_string()))?;
        let status = resp.status().as_u16();
        if matches!(status, 401 | 403 | 404) {
            let hint = match (&token, &self.config.gitea.token) {
                (None, Some(secret)) => format!(
                    ": no token configured for private sources ({} is not set)",
                    secret.describe()
                ),
                (None, None) => ": no token configured for private sources".to_string(),
                (Some(_), _) => ": the configured token was refused".to_string(),
            };
            return Err(StageError::NotAccessible {
                repo: format!("{owner}/{repo}"),
                status,
                hint,
            });
        }
        if status != 200 {
            return Err(download(format!("HTTP {status}")));
        }
        let limit = usize::try_from(self.config.limits.max_bytes).unwrap_or(usize::MAX);
        let body = tokio::time::timeout(timeout, Limited::new(resp.into_body(), limit).collect())
            .await
            .map_err(|_| download(format!("body not received within {}s", timeout.as_secs())))?
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    StageError::TooLarge(self.config.limits.max_bytes)
                } else {
                    download(e.to_string())
                }
            })?;
        Ok(body.to_bytes())
    }
}
