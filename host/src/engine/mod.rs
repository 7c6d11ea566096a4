//! The engine: the only code that knows wasmtime.
//!
//! One [`Engine`] per process, with the pooling allocator and epoch
//! interruption; one [`PolicyModule`] per compiled policy (its `InstancePre`,
//! metadata and digest); a fresh `Store` per evaluation with a memory cap and
//! an epoch deadline, so a policy can keep no state between evaluations and
//! cannot run or grow without bound.
//!
//! Evaluation is async ([`PolicyModule::evaluate_async`]): the guest runs on
//! a fiber and yields to the caller's executor at every epoch tick, so a slow
//! or looping policy holds an async worker for at most one tick at a time
//! until its deadline stops it. The blocking forms ([`PolicyModule::evaluate`])
//! drive the same future on the calling thread.
//!
//! A component implements contract 0.1.0 or 0.2.0 (`contract.rs` holds both
//! bindings and the conversions); the version is told by the types
//! interface it imports.
//!
//! **Invariant:** a policy imports nothing but its contract's types-only
//! interface. A component that imports anything else (WASI included) is
//! refused at load time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use crate::model;

mod cache;
mod contract;
mod precheck;

pub use cache::{CacheStats, default_module_cache_dir};
pub use contract::Contract;
use contract::{to_v1, to_v2, v1, v2};
pub use precheck::{GRANTS_SECTION, Precheck, precheck, with_declared_grants};

/// How often the epoch advances: a running guest yields and checks its
/// deadline at every tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);
/// The most memory any one policy instance may ever have (the pool's slot size).
pub const MAX_MEMORY_BYTES: usize = 32 << 20;
/// The budget of the metadata call that checks a module at load time: off
/// the request path, and generous, so that a loaded machine does not refuse
/// a good module (a request's evaluation keeps its slot's own limit).
pub const LOAD_METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// How many policy instances may be alive at once across the process.
pub const MAX_INSTANCES: u32 = 256;

/// Limits of one evaluation of one policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget, checked at every epoch tick (so a policy may run
    /// up to one tick past it).
    pub timeout: Duration,
    /// Linear-memory cap in bytes (at most [`MAX_MEMORY_BYTES`]).
    pub max_memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_millis(100),
            max_memory_bytes: 16 << 20,
        }
    }
}

/// Why a module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a valid policy component: {0}")]
    Compile(String),
    #[error("the component imports `{0}`; policies may import nothing")]
    Imports(String),
    #[error("the component does not implement the `heartgate:policy/policy` world: {0}")]
    World(String),
    #[error("the component's metadata could not be read: {0}")]
    Metadata(String),
    #[error("the component's metadata is incomplete: {0}")]
    BadMetadata(String),
}

/// How the sandbox stopped an evaluation, or what went wrong around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The policy ran past its deadline.
    Timeout,
    /// The policy tried to grow its memory past its cap.
    OutOfMemory,
    /// The policy trapped (panic, unreachable, stack overflow, ...).
    Trap,
    /// No instance could be created (the pool is exhausted).
    Instantiation,
    /// The policy returned its own error value.
    PolicyError,
    /// The policy returned actions the host refuses.
    InvalidOutput,
    /// The policy added or dropped an action its slot is not granted.
    #[serde(rename = "ungranted_action")]
    Ungranted,
}

impl FailureKind {
    /// Every kind.
    pub const ALL: [FailureKind; 7] = [
        FailureKind::Timeout,
        FailureKind::OutOfMemory,
        FailureKind::Trap,
        FailureKind::Instantiation,
        FailureKind::PolicyError,
        FailureKind::InvalidOutput,
        FailureKind::Ungranted,
    ];

    /// The kind named `name` (as [`FailureKind::as_str`] spells it).
    pub fn parse(name: &str) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The snake_case name used in logs and the decision log.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::OutOfMemory => "out_of_memory",
            FailureKind::Trap => "trap",
            FailureKind::Instantiation => "instantiation",
            FailureKind::PolicyError => "policy_error",
            FailureKind::InvalidOutput => "invalid_output",
            FailureKind::Ungranted => "ungranted_action",
        }
    }
}

/// An evaluation that produced no verdict.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct EvalFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl EvalFailure {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        EvalFailure {
            kind,
            message: message.into(),
        }
    }
}

/// The process-wide engine. Cloning is cheap.
#[derive(Clone)]
pub struct Engine {
    inner: wasmtime::Engine,
    linker: Arc<Linker<StoreState>>,
    _ticker: Arc<Ticker>,
    /// Compiled components by digest: a chain built again from modules
    /// this engine already compiled (a host following an activation made
    /// on another host, a rollback) compiles nothing.
    compiled: Arc<std::sync::Mutex<std::collections::HashMap<String, Component>>>,
    /// Compiled components on disk (wasmtime's cache, keyed by the hash of
    /// the bytes and the compiler's settings), shared by every process that
    /// uses the same directory: `policy test`, `push`, `activate` and a
    /// service start compile a module once.
    disk_cache: Option<wasmtime::Cache>,
}

/// The most compiled components an engine keeps; when full it starts over.
const COMPILED_CACHE_ENTRIES: usize = 64;

struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct StoreState {
    max_memory_bytes: usize,
    memory_exceeded: bool,
    /// When the policy's wall-clock budget runs out (checked at each tick,
    /// so time spent yielded to other tasks counts too).
    deadline: std::time::Instant,
}

// The types interfaces have no functions; their host side is empty.
impl v1::heartgate::policy::types::Host for StoreState {}
impl v2::heartgate::policy::types::Host for StoreState {}

impl wasmtime::ResourceLimiter for StoreState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory_bytes {
            self.memory_exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl Engine {
    /// Create the engine, without a disk cache, and start its epoch ticker
    /// thread.
    pub fn new() -> anyhow::Result<Engine> {
        Engine::build(None)
    }

    /// [`Engine::new`], keeping compiled components in `dir` (see
    /// [`default_module_cache_dir`]). A directory that cannot be used is
    /// said in a warning and the engine compiles without it: a cache never
    /// stops the service.
    pub fn with_module_cache(dir: Option<&std::path::Path>) -> anyhow::Result<Engine> {
        Engine::build(dir.and_then(cache::open))
    }

    /// The disk cache's directory and counts, if it has one.
    pub fn module_cache(&self) -> Option<CacheStats> {
        self.disk_cache.as_ref().map(CacheStats::of)
    }

    fn build(disk_cache: Option<wasmtime::Cache>) -> anyhow::Result<Engine> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(MAX_INSTANCES)
            .total_core_instances(MAX_INSTANCES)
            .total_memories(MAX_INSTANCES)
            .total_tables(MAX_INSTANCES)
            .max_memory_size(MAX_MEMORY_BYTES)
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10)
            // The fibers guests run on while they may yield.
            .total_stacks(MAX_INSTANCES)
            .async_stack_keep_resident(64 << 10);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            // Bounds-checked memories without guard pages: resetting a slot
            // for the next evaluation then needs no mprotect (and no TLB
            // shootdown), which was most of the cost of a fresh sandbox.
            .memory_reservation(MAX_MEMORY_BYTES as u64)
            .memory_guard_size(0)
            .signals_based_traps(false)
            .max_wasm_stack(512 << 10)
            .async_stack_size(1 << 20)
            // Compiling a candidate must not take both cores from requests.
            .parallel_compilation(false)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .cache(disk_cache.clone());
        let inner = wasmtime::Engine::new(&config)?;
        let mut linker = Linker::new(&inner);
        v1::Policy::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)?;
        v2::Policy::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)?;
        let linker = Arc::new(linker);

        let stop = Arc::new(AtomicBool::new(false));
        let weak = inner.weak();
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("heartgate-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        Ok(Engine {
            inner,
            linker,
            _ticker: Arc::new(Ticker { stop }),
            compiled: Arc::default(),
            disk_cache,
        })
    }

    /// Compile and check a policy component: it must be a component of the
    /// `policy` world, import nothing, and report its metadata. What can be
    /// told without compiling (that it is a component, its imports, its
    /// declared grants) is checked first ([`precheck`]).
    pub fn load(&self, bytes: &[u8]) -> Result<PolicyModule, LoadError> {
        let checked = precheck(bytes)?;
        let mut contract = None;
        for name in &checked.imports {
            contract = Some(allowed_import(name, contract)?);
        }
        let digest = hex(&Sha256::digest(bytes));
        let cached = self
            .compiled
            .lock()
            .ok()
            .and_then(|c| c.get(&digest).cloned());
        let component = match cached {
            Some(component) => component,
            None => {
                let component = Component::new(&self.inner, bytes)
                    .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
                if let Ok(mut compiled) = self.compiled.lock() {
                    if compiled.len() >= COMPILED_CACHE_ENTRIES {
                        compiled.clear();
                    }
                    compiled.insert(digest.clone(), component.clone());
                }
                component
            }
        };
        let ty = component.component_type();
        // A contract's types-only interface is the one import allowed: it
        // carries no functions, only the types the world `use`s. Which one
        // tells the contract (a component importing nothing is 0.2.0).
        let mut compiled_contract = None;
        for (name, _) in ty.imports(&self.inner) {
            compiled_contract = Some(allowed_import(name, compiled_contract)?);
        }
        let contract = compiled_contract.or(contract).unwrap_or(Contract::V0_2);
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::World(format!("{e:#}")))?;
        let world =
            |e: wasmtime::Error| LoadError::World(format!("contract {}: {e:#}", contract.as_str()));
        let pre = match contract {
            Contract::V0_1 => Pre::V1(v1::PolicyPre::new(pre).map_err(world)?),
            Contract::V0_2 => Pre::V2(v2::PolicyPre::new(pre).map_err(world)?),
        };
        let mut module = PolicyModule {
            engine: self.clone(),
            pre,
            digest,
            bytes: Arc::from(bytes),
            declared_grants: checked.declared_grants,
            metadata: model::Metadata {
                name: String::new(),
                version: String::new(),
            },
        };
        let metadata = module
            .metadata_call(Limits {
                timeout: LOAD_METADATA_TIMEOUT,
                ..Limits::default()
            })
            .map_err(|e| LoadError::Metadata(e.to_string()))?;
        // The messages quote at most 64 characters of what the module said.
        let quoted = |s: &str| {
            let shown: String = s.chars().take(64).collect();
            if shown.len() < s.len() {
                format!("`{shown}...` ({} bytes)", s.len())
            } else {
                format!("`{shown}`")
            }
        };
        if !valid_name(&metadata.name) {
            return Err(LoadError::BadMetadata(format!(
                "name {} must be 1-64 lowercase letters, digits or dashes",
                quoted(&metadata.name)
            )));
        }
        if metadata.version.is_empty() || metadata.version.len() > 64 {
            return Err(LoadError::BadMetadata(format!(
                "version {} must be 1-64 characters",
                quoted(&metadata.version)
            )));
        }
        module.metadata = metadata;
        Ok(module)
    }

    fn store(&self, limits: Limits) -> Store<StoreState> {
        let mut store = Store::new(
            &self.inner,
            StoreState {
                max_memory_bytes: limits.max_memory_bytes.min(MAX_MEMORY_BYTES),
                memory_exceeded: false,
                deadline: std::time::Instant::now() + limits.timeout.max(EPOCH_TICK),
            },
        );
        store.limiter(|s| s);
        // At every tick the guest yields to the executor, until its deadline.
        store.epoch_deadline_callback(|cx| {
            if std::time::Instant::now() >= cx.data().deadline {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            Ok(wasmtime::UpdateDeadline::Yield(1))
        });
        store.set_epoch_deadline(1);
        store
    }
}

/// The contract `name` is the types interface of, if it is one and agrees
/// with the contract of the imports seen before it (`seen`).
fn allowed_import(name: &str, seen: Option<Contract>) -> Result<Contract, LoadError> {
    match Contract::ALL
        .into_iter()
        .find(|c| c.types_interface() == name)
    {
        Some(c) if seen.is_none_or(|seen| seen == c) => Ok(c),
        _ => Err(LoadError::Imports(name.to_string())),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A component, ready to instantiate, as the bindings of its contract.
#[derive(Clone)]
enum Pre {
    V1(v1::PolicyPre<StoreState>),
    V2(v2::PolicyPre<StoreState>),
}

/// A compiled, checked policy, ready to instantiate.
#[derive(Clone)]
pub struct PolicyModule {
    engine: Engine,
    pre: Pre,
    digest: String,
    bytes: Arc<[u8]>,
    declared_grants: Option<Vec<crate::chain::Grant>>,
    metadata: model::Metadata,
}

impl std::fmt::Debug for PolicyModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyModule")
            .field("metadata", &self.metadata)
            .field("contract", &self.contract())
            .field("digest", &self.digest)
            .finish()
    }
}

impl PolicyModule {
    /// The name and version the policy reports.
    pub fn metadata(&self) -> &model::Metadata {
        &self.metadata
    }

    /// The grants the component declares it needs ([`GRANTS_SECTION`]), if
    /// it declares any.
    pub fn declared_grants(&self) -> Option<&[crate::chain::Grant]> {
        self.declared_grants.as_deref()
    }

    /// The version of the contract the component implements.
    pub fn contract(&self) -> Contract {
        match self.pre {
            Pre::V1(_) => Contract::V0_1,
            Pre::V2(_) => Contract::V0_2,
        }
    }

    /// The sha256 of the component's bytes, lowercase hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The component's bytes, as loaded (to store them by digest).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn metadata_call(&self, limits: Limits) -> Result<model::Metadata, EvalFailure> {
        block_on(self.metadata_async(limits))
    }

    async fn metadata_async(&self, limits: Limits) -> Result<model::Metadata, EvalFailure> {
        let mut store = self.engine.store(limits);
        let (name, version) = match &self.pre {
            Pre::V1(pre) => {
                let instance = pre.instantiate_async(&mut store).await;
                let instance = instance.map_err(|e| classify(&store, e, true))?;
                let meta = instance.call_metadata(&mut store).await;
                let meta = meta.map_err(|e| classify(&store, e, false))?;
                (meta.name, meta.version)
            }
            Pre::V2(pre) => {
                let instance = pre.instantiate_async(&mut store).await;
                let instance = instance.map_err(|e| classify(&store, e, true))?;
                let meta = instance.call_metadata(&mut store).await;
                let meta = meta.map_err(|e| classify(&store, e, false))?;
                (meta.name, meta.version)
            }
        };
        Ok(model::Metadata { name, version })
    }

    /// Evaluate the policy in a fresh sandbox, on this thread.
    pub fn evaluate(
        &self,
        input: &model::Input,
        proposed: &[model::Action],
        limits: Limits,
    ) -> Result<Vec<model::Action>, EvalFailure> {
        block_on(self.evaluate_async(input, proposed, limits))
    }

    /// Evaluate the policy in a fresh sandbox, yielding to the executor at
    /// every epoch tick.
    pub async fn evaluate_async(
        &self,
        input: &model::Input,
        proposed: &[model::Action],
        limits: Limits,
    ) -> Result<Vec<model::Action>, EvalFailure> {
        let mut guest = GuestInput::new(input);
        guest.set_markers(input.markers.iter());
        self.evaluate_guest_async(&guest, proposed, limits).await
    }

    /// [`PolicyModule::evaluate_async`] of an input already converted for
    /// the guest (once per chain evaluation, not once per slot).
    pub async fn evaluate_guest_async(
        &self,
        input: &GuestInput,
        proposed: &[model::Action],
        limits: Limits,
    ) -> Result<Vec<model::Action>, EvalFailure> {
        match &self.pre {
            Pre::V2(pre) => {
                let mut store = self.engine.store(limits);
                let instance = pre.instantiate_async(&mut store).await;
                let instance = instance.map_err(|e| classify(&store, e, true))?;
                let wit_proposed: Vec<_> = proposed.iter().map(to_v2::action).collect();
                let result = instance
                    .call_evaluate(&mut store, &input.v2, &wit_proposed)
                    .await
                    .map_err(|e| classify(&store, e, false))?;
                match result {
                    Ok(actions) => Ok(actions.into_iter().map(to_v2::from_action).collect()),
                    Err(err) => Err(policy_error(&err.code, &err.message)),
                }
            }
            Pre::V1(pre) => {
                // Not asked about what 0.1.0 cannot express: the event, or
                // the actions (kept aside, passed on ahead of its output).
                let Some(wit_input) = &input.v1 else {
                    return Ok(proposed.to_vec());
                };
                let (visible, mut kept): (Vec<_>, Vec<_>) = proposed
                    .iter()
                    .cloned()
                    .partition(model::Action::in_contract_0_1);
                let wit_proposed: Vec<_> = visible.iter().filter_map(to_v1::action).collect();
                let mut store = self.engine.store(limits);
                let instance = pre.instantiate_async(&mut store).await;
                let instance = instance.map_err(|e| classify(&store, e, true))?;
                let result = instance
                    .call_evaluate(&mut store, wit_input, &wit_proposed)
                    .await
                    .map_err(|e| classify(&store, e, false))?;
                match result {
                    Ok(actions) => {
                        kept.extend(actions.into_iter().map(to_v1::from_action));
                        Ok(kept)
                    }
                    Err(err) => Err(policy_error(&err.code, &err.message)),
                }
            }
        }
    }
}

fn policy_error(code: &str, message: &str) -> EvalFailure {
    EvalFailure::new(FailureKind::PolicyError, format!("{code}: {message}"))
}

/// Drive a future to completion on this thread, parking it while the
/// future waits (an evaluation is only pending at an epoch yield, which
/// wakes it at once; a blocking caller may also wait for the store's commit).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

fn classify(store: &Store<StoreState>, err: wasmtime::Error, instantiating: bool) -> EvalFailure {
    if store.data().memory_exceeded {
        return EvalFailure::new(
            FailureKind::OutOfMemory,
            format!(
                "memory limit of {} bytes exceeded",
                store.data().max_memory_bytes
            ),
        );
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => EvalFailure::new(FailureKind::Timeout, "deadline exceeded"),
        Some(trap) => EvalFailure::new(FailureKind::Trap, trap.to_string()),
        None if instantiating => EvalFailure::new(FailureKind::Instantiation, format!("{err:#}")),
        None => EvalFailure::new(FailureKind::Trap, format!("{err:#}")),
    }
}

/// An evaluation's input as the guests receive it, converted once for every
/// slot of a chain (into each contract's form); each slot gets only its own
/// markers ([`GuestInput::set_markers`]).
pub struct GuestInput {
    v2: v2::heartgate::policy::types::Input,
    /// `None` for an event 0.1.0 cannot express.
    v1: Option<v1::heartgate::policy::types::Input>,
}

impl GuestInput {
    /// `input` without its markers.
    pub fn new(input: &model::Input) -> GuestInput {
        GuestInput {
            v2: to_v2::input(input),
            v1: to_v1::input(input),
        }
    }

    /// Replace the markers the guest sees.
    pub fn set_markers<'a>(&mut self, markers: impl Iterator<Item = &'a model::Marker>) {
        self.v2.markers.clear();
        if let Some(v1) = &mut self.v1 {
            v1.markers.clear();
        }
        for m in markers {
            self.v2.markers.push(to_v2::to_wit_marker(m));
            if let Some(v1) = &mut self.v1 {
                v1.markers.push(to_v1::to_wit_marker(m));
            }
        }
    }
}
