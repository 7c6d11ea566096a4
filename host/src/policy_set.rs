//! The policy set in a running service: pushing modules, staging chains,
//! validating them, activating, rolling back, evaluating without effects.
//!
//! Modules are stored by content (`sha256:<digest>`) and chains by their
//! normalized spec, so the active chain survives a restart and never depends
//! on files staying where they were. Validation happens before a chain can be
//! staged, on its own thread: the module must be a component of the policy
//! world importing nothing else, report its metadata, compile within limits,
//! pass the fixtures given with it, and get through a smoke set of inputs
//! without any slot failing. Activation swaps the whole chain at once (an
//! evaluation that started on the old chain finishes on it); a failure at any
//! step leaves the active chain untouched and says why.
//!
//! Hosts sharing a database follow each other's activations ([`follow`]):
//! each activation has a number, and a host only ever moves to a higher one.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::authoring::fixtures::{self, Fixture};
use crate::chain::{Chain, ChainError, ChainSpec, SlotFailure, Step};
use crate::clock::Clock;
use crate::engine::{Engine, LoadError};
use crate::executor::{Executor, Shadow, ShadowStats};
use crate::model::{
    Action, Event, HeartbeatEvent, Input, RegisterEvent, SilenceEvent, SilenceKind, Status,
    Workspace, WorkspaceKind,
};
use crate::store::{ModuleQuota, Store, StoreError, StoredChain, StoredModule};

/// Why a policy-set operation was refused. The active chain is untouched.
#[derive(Debug, thiserror::Error)]
pub enum PolicySetError {
    #[error("the module was refused: {0}")]
    Module(#[from] LoadError),
    #[error("the chain was refused: {0}")]
    Chain(#[from] ChainError),
    #[error("the chain failed validation: {0}")]
    Validation(String),
    #[error("{0}")]
    NotFound(String),
    #[error(
        "there is no previous chain to roll back to: the first activation of the history is the active one"
    )]
    NoPrevious,
    /// The module store is full.
    #[error("{0}")]
    Quota(String),
    /// A stored chain still uses the module.
    #[error("{0}")]
    InUse(String),
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
}

/// Fixtures by slot name, in the format of fixture files
/// ([`crate::authoring::fixtures::Fixture`], with an optional `name`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlotFixtures {
    pub slot: String,
    pub fixtures: Vec<Fixture>,
}

/// `GET /admin/chains`: the stored chains and the activation history.
#[derive(Clone, Debug, Serialize)]
pub struct ChainHistory {
    pub chains: Vec<StoredChain>,
    pub activations: Vec<crate::store::Activation>,
}

/// A stored module, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleView {
    pub digest: String,
    pub name: String,
    pub version: String,
    pub size: usize,
    /// What to put in a chain spec's `module`.
    pub module: String,
    /// The contract version the component implements (`0.1.0`, `0.2.0`).
    pub contract: crate::engine::Contract,
}

/// One slot of the active chain, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SlotView {
    pub slot: String,
    pub policy: String,
    pub policy_version: String,
    pub digest: String,
    pub grants: Vec<crate::chain::Grant>,
}

/// The active chain, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ActiveView {
    pub version: String,
    pub slots: Vec<SlotView>,
    /// The normalized spec, to stage a variant of the active chain.
    pub spec: ChainSpec,
    /// The stored chain, `None` while the service runs the chain it started
    /// with (built-in or from its configuration) and nothing was activated.
    pub stored: Option<StoredChain>,
    /// What this host serves (hosts of one database each say theirs).
    pub serving: Serving,
}

/// The result of an evaluation without effects.
#[derive(Clone, Debug, Serialize)]
pub struct EvalView {
    pub chain_version: String,
    pub steps: Vec<Step>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<Action>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<SlotFailure>,
}

/// The shadow chain and what it has seen.
#[derive(Clone, Debug, Serialize)]
pub struct ShadowReport {
    pub chain: Option<i64>,
    pub version: Option<String>,
    #[serde(flatten)]
    pub stats: ShadowStats,
}

/// The policy set of a running service.
pub struct PolicySet {
    engine: Engine,
    store: Arc<dyn Store>,
    executor: Arc<Executor>,
    clock: Arc<dyn Clock>,
    /// How many pushed modules (and bytes of them) are kept.
    quota: ModuleQuota,
    /// The stored chain this host serves, with its activation number (0
    /// while it serves the chain it started with and nothing was
    /// activated).
    served: Mutex<Serving>,
}

/// The stored chain a host serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Serving {
    /// The stored chain's id (`None`: the chain the service started with).
    pub chain: Option<i64>,
    /// Its activation number: a host only moves to a higher one.
    pub activation: i64,
}

/// What `policy prune` deleted.
#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    pub removed: Vec<StoredModule>,
    /// Modules kept because a stored chain uses them.
    pub kept: usize,
}

/// The chain to start with: the one last activated, or `fallback` when none
/// ever was.
pub fn startup_chain(
    engine: &Engine,
    store: &dyn Store,
    fallback: impl FnOnce() -> Result<Chain, ChainError>,
) -> Result<Chain, PolicySetError> {
    match store.active_chain()? {
        Some(stored) => {
            let chain = build_stored(engine, store, &stored)?;
            tracing::info!(chain = stored.id, version = %chain.version, "restored the last activated chain");
            Ok(chain)
        }
        None => Ok(fallback()?),
    }
}

fn build_stored(
    engine: &Engine,
    store: &dyn Store,
    stored: &StoredChain,
) -> Result<Chain, PolicySetError> {
    let spec: ChainSpec = serde_json::from_str(&stored.spec).map_err(|e| {
        PolicySetError::Validation(format!("stored chain {} is unreadable: {e}", stored.id))
    })?;
    let lookup = |digest: &str| store.module_bytes(digest).ok().flatten();
    Ok(Chain::from_spec(engine, &spec, Path::new("."), &lookup)?)
}

/// The smoke set every candidate chain must get through without a failure.
fn smoke_inputs() -> Vec<(&'static str, Input)> {
    let heartbeat = |mcp: Option<bool>| {
        Event::Heartbeat(HeartbeatEvent {
            uptime_seconds: 60,
            mcp_server_present: mcp,
            ..HeartbeatEvent::default()
        })
    };
    let workspace = |kind, status| Workspace {
        id: "smoke-workspace".into(),
        kind,
        status,
        model_configured: true,
        declared_plugins: Vec::new(),
        last_register_failure_ms: None,
        ..Workspace::default()
    };
    let input = |event, ws| Input {
        event,
        workspace: ws,
        markers: Vec::new(),
        now_ms: 1_782_302_400_000,
    };
    vec![
        (
            "healthy heartbeat",
            input(
                heartbeat(None),
                workspace(WorkspaceKind::Workspace, Status::Online),
            ),
        ),
        (
            "heartbeat from offline",
            input(
                heartbeat(None),
                workspace(WorkspaceKind::Workspace, Status::Offline),
            ),
        ),
        (
            "platform heartbeat without its MCP",
            input(
                heartbeat(Some(false)),
                workspace(WorkspaceKind::Platform, Status::Online),
            ),
        ),
        (
            "register",
            input(
                Event::Register(RegisterEvent {
                    url: "http://agent".into(),
                    delivery_mode: "push".into(),
                    requested_kind: None,
                    mcp_server_present: Some(true),
                    loaded_mcp_tools: None,
                }),
                workspace(WorkspaceKind::Platform, Status::Provisioning),
            ),
        ),
        (
            "silence past the heartbeat TTL",
            input(
                Event::Silence(SilenceEvent {
                    kind: SilenceKind::HeartbeatExpired,
                    last_heartbeat_ms: Some(1_782_302_400_000 - 200_000),
                    silent_for_ms: 200_000,
                }),
                workspace(WorkspaceKind::Workspace, Status::Online),
            ),
        ),
        (
            "provision timeout",
            input(
                Event::Silence(SilenceEvent {
                    kind: SilenceKind::ProvisionTimeout,
                    last_heartbeat_ms: None,
                    silent_for_ms: 720_000,
                }),
                workspace(WorkspaceKind::Platform, Status::Provisioning),
            ),
        ),
    ]
}

/// Run `f` on its own thread at the lowest scheduling priority, so that
/// compiling and validating a candidate yields to request handling (and the
/// engine compiles on one core only).
fn on_validation_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PolicySetError> + Send + 'static,
) -> Result<T, PolicySetError> {
    std::thread::Builder::new()
        .name("heartgate-validate".into())
        .spawn(move || {
            if let Err(e) =
                thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min)
            {
                tracing::debug!(error = ?e, "could not lower the validation thread's priority");
            }
            f()
        })
        .map_err(|e| {
            PolicySetError::Validation(format!("cannot start the validation thread: {e}"))
        })?
        .join()
        .map_err(|_| PolicySetError::Validation("the validation thread panicked".into()))?
}

fn validate(chain: &Chain, fixtures: &[SlotFixtures]) -> Result<(), PolicySetError> {
    for (case, input) in smoke_inputs() {
        let outcome = chain.evaluate(&input);
        if let Err(failure) = outcome.result {
            return Err(PolicySetError::Validation(format!(
                "smoke input `{case}`: {failure}"
            )));
        }
    }
    for set in fixtures {
        let slot = chain
            .slots
            .iter()
            .find(|s| s.name == set.slot)
            .ok_or_else(|| {
                PolicySetError::Validation(format!("fixtures name no slot `{}`", set.slot))
            })?;
        // The slot alone, with its grants and limits: what a fixture file
        // run by `heartgate policy test` checks.
        let alone = Chain::of_slot(slot.clone());
        for (i, fx) in set.fixtures.iter().enumerate() {
            let name = fx.name.clone().unwrap_or_else(|| format!("#{}", i + 1));
            if let Some(why) = fixtures::check_case(&alone, fx, false) {
                return Err(PolicySetError::Validation(format!(
                    "slot `{}` fails fixture `{name}`: {why}",
                    set.slot
                )));
            }
        }
    }
    Ok(())
}

impl PolicySet {
    pub fn new(
        engine: Engine,
        store: Arc<dyn Store>,
        executor: Arc<Executor>,
        clock: Arc<dyn Clock>,
    ) -> PolicySet {
        // The chain the executor runs is the stored active one if their
        // versions agree (`startup_chain`).
        let running = executor.chain().version.clone();
        let served = match store.active_chain() {
            Ok(Some(stored)) if stored.version == running => Serving {
                chain: Some(stored.id),
                activation: stored.activation.unwrap_or(0),
            },
            _ => Serving::default(),
        };
        PolicySet {
            engine,
            store,
            executor,
            clock,
            quota: ModuleQuota::default(),
            served: Mutex::new(served),
        }
    }

    /// What this host serves.
    pub fn serving(&self) -> Serving {
        self.served.lock().map(|s| *s).unwrap_or_default()
    }

    /// Swap in `chain`, stored chain `stored`, unless this host already
    /// serves that activation or a later one (an activation on another
    /// host may have been followed meanwhile). Whether it swapped.
    fn serve(&self, chain: Chain, stored: &StoredChain, by: &str) -> bool {
        let activation = stored.activation.unwrap_or(0);
        let Ok(mut served) = self.served.lock() else {
            return false;
        };
        if served.chain.is_some() && activation <= served.activation {
            return false;
        }
        let old = self.executor.swap_chain(chain);
        *served = Serving {
            chain: Some(stored.id),
            activation,
        };
        tracing::info!(chain = stored.id, activation, from = %old.version, to = %stored.version, by, "chain activated");
        true
    }

    /// Serve the active stored chain if it was activated after the one this
    /// host serves (by another host): what [`follow`] does. The stored chain
    /// now served, if it changed.
    pub fn catch_up(&self) -> Result<Option<StoredChain>, PolicySetError> {
        let Some(stored) = self.store.active_chain()? else {
            return Ok(None);
        };
        let served = self.serving();
        if served.chain.is_some() && stored.activation.unwrap_or(0) <= served.activation {
            return Ok(None);
        }
        let chain = self.load_chain(stored.id)?;
        let by = format!(
            "{} (on another host)",
            stored.activated_by.as_deref().unwrap_or("unknown")
        );
        Ok(self.serve(chain, &stored, &by).then_some(stored))
    }

    /// Keep at most `quota` of pushed modules.
    pub fn with_quota(mut self, quota: ModuleQuota) -> PolicySet {
        self.quota = quota;
        self
    }

    /// Delete a pushed module that no stored chain uses.
    pub fn delete_module(&self, module: &str) -> Result<StoredModule, PolicySetError> {
        let digest = module.strip_prefix("sha256:").unwrap_or(module);
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PolicySetError::NotFound(
                "a module is named `sha256:<64 hex digits>`".into(),
            ));
        }
        match self.store.delete_module(&digest.to_ascii_lowercase()) {
            Ok(Some(module)) => Ok(module),
            Ok(None) => Err(PolicySetError::NotFound(format!(
                "no stored module `sha256:{digest}`"
            ))),
            Err(StoreError::InUse(why)) => Err(PolicySetError::InUse(why)),
            Err(e) => Err(e.into()),
        }
    }

    /// Delete every pushed module no stored chain uses.
    pub fn prune(&self) -> Result<PruneReport, PolicySetError> {
        let removed = self.store.prune_modules()?;
        let kept = self.store.modules()?.len();
        Ok(PruneReport { removed, kept })
    }

    /// Build stored chain `id` (on the validation thread).
    fn load_chain(&self, id: i64) -> Result<Chain, PolicySetError> {
        let stored = self
            .store
            .chain(id)?
            .ok_or_else(|| PolicySetError::NotFound(format!("no chain {id}")))?;
        let engine = self.engine.clone();
        let store = self.store.clone();
        on_validation_thread(move || build_stored(&engine, store.as_ref(), &stored))
    }

    /// Check a module and store it by digest.
    pub fn push(&self, bytes: Vec<u8>, by: &str) -> Result<ModuleView, PolicySetError> {
        let engine = self.engine.clone();
        let module = on_validation_thread(move || Ok(engine.load(&bytes)?))?;
        let meta = module.metadata().clone();
        self.store
            .put_module(
                module.digest(),
                module.bytes(),
                &meta,
                by,
                self.clock.now_ms(),
                self.quota,
            )
            .map_err(|e| match e {
                StoreError::QuotaExceeded(why) => PolicySetError::Quota(why),
                e => PolicySetError::Store(e),
            })?;
        Ok(ModuleView {
            digest: module.digest().to_string(),
            name: meta.name,
            version: meta.version,
            size: module.bytes().len(),
            module: format!("sha256:{}", module.digest()),
            contract: module.contract(),
        })
    }

    /// Validate a chain (modules `builtin:` or pushed `sha256:`) and stage it.
    pub fn stage(
        &self,
        spec: ChainSpec,
        fixtures: Vec<SlotFixtures>,
        by: &str,
    ) -> Result<StoredChain, PolicySetError> {
        if let Some(s) = spec
            .slot
            .iter()
            .find(|s| !s.module.starts_with("builtin:") && !s.module.starts_with("sha256:"))
        {
            return Err(PolicySetError::Validation(format!(
                "slot `{}`: push the module first and name it `sha256:<digest>`",
                s.name
            )));
        }
        let engine = self.engine.clone();
        let store = self.store.clone();
        let chain = on_validation_thread(move || {
            let lookup = |digest: &str| store.module_bytes(digest).ok().flatten();
            let chain = Chain::from_spec(&engine, &spec, Path::new("."), &lookup)?;
            validate(&chain, &fixtures)?;
            Ok(chain)
        })?;
        let spec_json = serde_json::to_string(&chain.spec).unwrap_or_default();
        Ok(self
            .store
            .stage_chain(&chain.version, &spec_json, by, self.clock.now_ms())?)
    }

    /// Activate a staged (or retired) chain: persist, then swap it in whole.
    pub fn activate(&self, id: i64, by: &str) -> Result<StoredChain, PolicySetError> {
        let chain = self.load_chain(id)?;
        self.remember_startup_chain(by)?;
        let activated = self.store.activate_chain(id, by, self.clock.now_ms())?;
        self.serve(chain, &activated, by);
        Ok(activated)
    }

    /// Push `bytes` and activate the active chain with slot `slot` running
    /// it (same limits and grants). What watch mode does with a changed file.
    pub fn replace_slot(
        &self,
        slot: &str,
        bytes: Vec<u8>,
        by: &str,
    ) -> Result<StoredChain, PolicySetError> {
        let module = self.push(bytes, by)?;
        let mut spec = self.executor.chain().spec.clone();
        let target = spec
            .slot
            .iter_mut()
            .find(|s| s.name == slot)
            .ok_or_else(|| {
                PolicySetError::NotFound(format!("the active chain has no slot `{slot}`"))
            })?;
        target.module = module.module;
        let staged = self.stage(spec, Vec::new(), by)?;
        self.activate(staged.id, by)
    }

    /// Go back one step in the activation history (a second rollback goes
    /// one step further back, never forward again).
    pub fn rollback(&self, by: &str) -> Result<StoredChain, PolicySetError> {
        let Some(last) = self.store.activations(1)?.pop() else {
            return Err(PolicySetError::NoPrevious);
        };
        let Some(target) = last.back_to else {
            return Err(PolicySetError::NoPrevious);
        };
        // Compile it before the store moves: a chain that no longer loads
        // (a module pruned by hand) is refused with nothing changed.
        let target = self
            .store
            .activation(target)?
            .ok_or(PolicySetError::NoPrevious)?;
        let chain = self.load_chain(target.chain_id)?;
        let rolled = self
            .store
            .rollback_chain(by, self.clock.now_ms())?
            .ok_or(PolicySetError::NoPrevious)?;
        if rolled.id == target.chain_id {
            self.serve(chain, &rolled, by);
        } else {
            // Another host moved the history meanwhile: serve what it is now.
            let chain = self.load_chain(rolled.id)?;
            self.serve(chain, &rolled, by);
        }
        Ok(rolled)
    }

    /// The stored chains and the activation history, newest first.
    pub fn history(&self, limit: usize) -> Result<ChainHistory, PolicySetError> {
        Ok(ChainHistory {
            chains: self.store.chains(limit)?,
            activations: self.store.activations(limit)?,
        })
    }

    /// The first activation also stores the chain the service started with,
    /// so that a rollback can return to it.
    fn remember_startup_chain(&self, by: &str) -> Result<(), PolicySetError> {
        if self.store.active_chain()?.is_some() {
            return Ok(());
        }
        let running = self.executor.chain();
        for (slot, spec) in running.slots.iter().zip(&running.spec.slot) {
            if spec.module.starts_with("sha256:") {
                self.store.put_module(
                    slot.module.digest(),
                    slot.module.bytes(),
                    slot.module.metadata(),
                    by,
                    self.clock.now_ms(),
                    // The running chain's own modules are stored whatever
                    // the quota: a rollback must be able to return to it.
                    ModuleQuota {
                        max_modules: u64::MAX,
                        max_bytes: u64::MAX,
                    },
                )?;
            }
        }
        let spec_json = serde_json::to_string(&running.spec).unwrap_or_default();
        let now = self.clock.now_ms();
        let stored = self
            .store
            .stage_chain(&running.version, &spec_json, "startup", now)?;
        self.store.activate_chain(stored.id, "startup", now)?;
        Ok(())
    }

    /// Run stored chain `id` beside the active one on live traffic, without
    /// effects, counting and logging every difference in the final actions.
    /// It is stored, so every host of the database runs it (each counts
    /// what it sees).
    pub fn shadow(&self, id: i64, by: &str) -> Result<ShadowReport, PolicySetError> {
        let chain = self.load_chain(id)?;
        self.store
            .set_shadow_chain(Some(id), by, self.clock.now_ms())?;
        self.executor.set_shadow(Some(Shadow::new(id, chain)));
        Ok(self.shadow_report())
    }

    /// Stop the shadow chain (on every host); returns what it saw here.
    pub fn clear_shadow(&self, by: &str) -> Result<ShadowReport, PolicySetError> {
        self.store.set_shadow_chain(None, by, self.clock.now_ms())?;
        let report = self.shadow_report();
        self.executor.set_shadow(None);
        Ok(report)
    }

    /// Run in shadow what the database says runs in shadow (set on another
    /// host, or before this one started).
    pub fn catch_up_shadow(&self) -> Result<(), PolicySetError> {
        let stored = self.store.shadow_chain()?;
        let running = self.executor.shadow().map(|s| s.chain_id);
        if stored == running {
            return Ok(());
        }
        match stored {
            Some(id) => {
                let chain = self.load_chain(id)?;
                self.executor.set_shadow(Some(Shadow::new(id, chain)));
                tracing::info!(
                    chain = id,
                    "running a chain in shadow (set on another host)"
                );
            }
            None => {
                self.executor.set_shadow(None);
                tracing::info!("stopped the shadow chain (on another host)");
            }
        }
        Ok(())
    }

    /// What the shadow chain has seen so far.
    pub fn shadow_report(&self) -> ShadowReport {
        match self.executor.shadow() {
            Some(shadow) => ShadowReport {
                chain: Some(shadow.chain_id),
                version: Some(shadow.chain.version.clone()),
                stats: shadow.stats(),
            },
            None => ShadowReport {
                chain: None,
                version: None,
                stats: ShadowStats::default(),
            },
        }
    }

    /// The active chain.
    pub fn active(&self) -> Result<ActiveView, PolicySetError> {
        let chain = self.executor.chain();
        let stored = self
            .store
            .active_chain()?
            .filter(|s| s.version == chain.version);
        Ok(ActiveView {
            version: chain.version.clone(),
            spec: chain.spec.clone(),
            slots: chain
                .slots
                .iter()
                .map(|s| SlotView {
                    slot: s.name.clone(),
                    policy: s.module.metadata().name.clone(),
                    policy_version: s.module.metadata().version.clone(),
                    digest: s.module.digest().to_string(),
                    grants: s.grants.clone(),
                })
                .collect(),
            stored,
            serving: self.serving(),
        })
    }

    /// Evaluate `input` against the active chain or stored chain `id`,
    /// without effects.
    pub fn eval(&self, input: &Input, id: Option<i64>) -> Result<EvalView, PolicySetError> {
        let chain = match id {
            None => self.executor.chain(),
            Some(id) => Arc::new(self.load_chain(id)?),
        };
        let outcome = chain.evaluate(input);
        let (actions, failure) = match outcome.result {
            Ok(a) => (Some(a), None),
            Err(f) => (None, Some(f)),
        };
        Ok(EvalView {
            chain_version: chain.version.clone(),
            steps: outcome.steps,
            actions,
            failure,
        })
    }
}

/// The `<slot>.wasm` files of a watched directory, each read whole if it is
/// a regular file of at most [`crate::http::MAX_ADMIN_BODY_BYTES`] (what a
/// push accepts): a symlink, a FIFO or a device is refused, never opened in
/// a way that could block. Blocking: run off the async workers.
fn read_watch_dir(dir: &Path) -> Vec<(String, Result<Vec<u8>, String>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "wasm") {
            continue;
        }
        let Some(slot) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        files.push((slot, read_module_file(&path)));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

fn read_module_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let max = crate::http::MAX_ADMIN_BODY_BYTES as u64;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(
            i32::try_from((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOFOLLOW).bits())
                .unwrap_or_default(),
        )
        .open(path)
        .map_err(|e| format!("cannot open it (a symlink is not followed): {e}"))?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(bytes)
}

/// Watch `dir` for `<slot>.wasm` files: a new or changed file goes through
/// the same validation and activation as a push, for the slot its name
/// names. Runs until `shutdown` resolves.
pub async fn watch(
    policies: Arc<PolicySet>,
    dir: std::path::PathBuf,
    every: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut refused: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        let scan = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || read_watch_dir(&dir)).await
        };
        let files = match scan {
            Ok(files) => files,
            Err(e) => {
                tracing::error!(error = %e, "watch: scanning the directory failed");
                Vec::new()
            }
        };
        for (slot, read) in files {
            let bytes = match read {
                Ok(bytes) => {
                    refused.remove(&slot);
                    bytes
                }
                Err(why) => {
                    // Said once per file, not at every scan.
                    if refused.insert(slot.clone()) {
                        tracing::error!(slot, reason = %why, "watch: refused a file; the active chain is unchanged");
                    }
                    continue;
                }
            };
            let digest = crate::engine::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if seen.get(&slot) == Some(&digest) {
                continue;
            }
            let running = policies.executor.chain();
            let current = running
                .slots
                .iter()
                .find(|s| s.name == slot)
                .map(|s| s.module.digest().to_string());
            seen.insert(slot.clone(), digest.clone());
            if current.as_deref() == Some(digest.as_str()) {
                continue;
            }
            let policies = policies.clone();
            let name = slot.clone();
            let result =
                tokio::task::spawn_blocking(move || policies.replace_slot(&name, bytes, "watch"))
                    .await;
            match result {
                Ok(Ok(chain)) => {
                    tracing::info!(slot, chain = chain.id, version = %chain.version, "watch: activated a changed module")
                }
                Ok(Err(e)) => {
                    tracing::error!(slot, error = %e, "watch: the changed module was refused; the active chain is unchanged")
                }
                Err(e) => tracing::error!(slot, error = %e, "watch: the activation task failed"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = &mut shutdown => return,
        }
    }
}

/// How often a host that shares its database looks at the active chain
/// when no notification came: the bound on how late it follows an
/// activation made on another host whose notification it missed.
pub const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(300);

/// Serve every activation and rollback made on any host of the database:
/// woken by the store's notification of a change, and looking anyway every
/// `every` (a notification can be missed while the listener reconnects).
/// Runs until `shutdown` resolves.
pub async fn follow(
    policies: Arc<PolicySet>,
    every: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let changes = policies.store.chain_changes();
    loop {
        let woken = async {
            match &changes {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep(every) => {}
            () = &mut shutdown => return,
        }
        let p = policies.clone();
        match tokio::task::spawn_blocking(move || p.catch_up().and_then(|_| p.catch_up_shadow()))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not serve the chain activated on another host; serving the current one")
            }
            Err(e) => tracing::error!(error = %e, "following the active chain failed"),
        }
    }
}
