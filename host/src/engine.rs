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
//! **Invariant:** a policy has no imports. A component that imports anything
//! (WASI included) is refused at load time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use crate::model;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "policy",
        exports: { default: async },
    });
}

use bindings::heartgate::policy::types as wit;

/// The contract's types interface, the only import a policy may have.
pub const TYPES_INTERFACE: &str = "heartgate:policy/types@0.1.0";

/// How often the epoch advances: a running guest yields and checks its
/// deadline at every tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);
/// The most memory any one policy instance may ever have (the pool's slot size).
pub const MAX_MEMORY_BYTES: usize = 32 << 20;
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
}

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

// The types interface has no functions; its host side is empty.
impl wit::Host for StoreState {}

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
    /// Create the engine and start its epoch ticker thread.
    pub fn new() -> anyhow::Result<Engine> {
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
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let inner = wasmtime::Engine::new(&config)?;
        let mut linker = Linker::new(&inner);
        bindings::Policy::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)?;
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
        })
    }

    /// Compile and check a policy component: it must be a component of the
    /// `policy` world, import nothing, and report its metadata.
    pub fn load(&self, bytes: &[u8]) -> Result<PolicyModule, LoadError> {
        let digest = hex(&Sha256::digest(bytes));
        let component =
            Component::new(&self.inner, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let ty = component.component_type();
        // The contract's types-only interface is the one import allowed: it
        // carries no functions, only the types the world `use`s.
        if let Some((name, _)) = ty
            .imports(&self.inner)
            .find(|(name, _)| *name != TYPES_INTERFACE)
        {
            return Err(LoadError::Imports(name.to_string()));
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::World(format!("{e:#}")))?;
        let pre = bindings::PolicyPre::new(pre).map_err(|e| LoadError::World(format!("{e:#}")))?;
        let mut module = PolicyModule {
            engine: self.clone(),
            pre,
            digest,
            bytes: Arc::from(bytes),
            metadata: model::Metadata {
                name: String::new(),
                version: String::new(),
            },
        };
        let metadata = module
            .metadata_call(Limits::default())
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

/// A compiled, checked policy, ready to instantiate.
#[derive(Clone)]
pub struct PolicyModule {
    engine: Engine,
    pre: bindings::PolicyPre<StoreState>,
    digest: String,
    bytes: Arc<[u8]>,
    metadata: model::Metadata,
}

impl std::fmt::Debug for PolicyModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyModule")
            .field("metadata", &self.metadata)
            .field("digest", &self.digest)
            .finish()
    }
}

impl PolicyModule {
    /// The name and version the policy reports.
    pub fn metadata(&self) -> &model::Metadata {
        &self.metadata
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
        let instance = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| classify(&store, e, true))?;
        let meta = instance
            .call_metadata(&mut store)
            .await
            .map_err(|e| classify(&store, e, false))?;
        Ok(model::Metadata {
            name: meta.name,
            version: meta.version,
        })
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
        let mut store = self.engine.store(limits);
        let instance = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| classify(&store, e, true))?;
        let wit_input = &input.0;
        let wit_proposed: Vec<wit::Action> = proposed.iter().map(to_wit_action).collect();
        let result = instance
            .call_evaluate(&mut store, wit_input, &wit_proposed)
            .await
            .map_err(|e| classify(&store, e, false))?;
        match result {
            Ok(actions) => Ok(actions.into_iter().map(from_wit_action).collect()),
            Err(err) => Err(EvalFailure::new(
                FailureKind::PolicyError,
                format!("{}: {}", err.code, err.message),
            )),
        }
    }
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

fn to_wit_status(s: model::Status) -> wit::Status {
    match s {
        model::Status::Provisioning => wit::Status::Provisioning,
        model::Status::Online => wit::Status::Online,
        model::Status::Offline => wit::Status::Offline,
        model::Status::Degraded => wit::Status::Degraded,
        model::Status::Failed => wit::Status::Failed,
        model::Status::Removed => wit::Status::Removed,
        model::Status::Paused => wit::Status::Paused,
        model::Status::Hibernated => wit::Status::Hibernated,
        model::Status::Hibernating => wit::Status::Hibernating,
        model::Status::AwaitingAgent => wit::Status::AwaitingAgent,
    }
}

fn from_wit_status(s: wit::Status) -> model::Status {
    match s {
        wit::Status::Provisioning => model::Status::Provisioning,
        wit::Status::Online => model::Status::Online,
        wit::Status::Offline => model::Status::Offline,
        wit::Status::Degraded => model::Status::Degraded,
        wit::Status::Failed => model::Status::Failed,
        wit::Status::Removed => model::Status::Removed,
        wit::Status::Paused => model::Status::Paused,
        wit::Status::Hibernated => model::Status::Hibernated,
        wit::Status::Hibernating => model::Status::Hibernating,
        wit::Status::AwaitingAgent => model::Status::AwaitingAgent,
    }
}

fn to_wit_kind(k: model::WorkspaceKind) -> wit::WorkspaceKind {
    match k {
        model::WorkspaceKind::Workspace => wit::WorkspaceKind::Workspace,
        model::WorkspaceKind::Platform => wit::WorkspaceKind::Platform,
    }
}

fn to_wit_trigger(t: model::ReconcileTrigger) -> wit::ReconcileTrigger {
    match t {
        model::ReconcileTrigger::Online => wit::ReconcileTrigger::Online,
        model::ReconcileTrigger::McpRecovery => wit::ReconcileTrigger::McpRecovery,
    }
}

fn from_wit_trigger(t: wit::ReconcileTrigger) -> model::ReconcileTrigger {
    match t {
        wit::ReconcileTrigger::Online => model::ReconcileTrigger::Online,
        wit::ReconcileTrigger::McpRecovery => model::ReconcileTrigger::McpRecovery,
    }
}

/// An evaluation's input as the guests receive it, converted once for every
/// slot of a chain; each slot gets only its own markers
/// ([`GuestInput::set_markers`]).
pub struct GuestInput(wit::Input);

impl GuestInput {
    /// `input` without its markers.
    pub fn new(input: &model::Input) -> GuestInput {
        GuestInput(to_wit_input(input))
    }

    /// Replace the markers the guest sees.
    pub fn set_markers<'a>(&mut self, markers: impl Iterator<Item = &'a model::Marker>) {
        self.0.markers.clear();
        self.0.markers.extend(markers.map(|m| wit::Marker {
            owner: m.owner.clone(),
            key: m.key.clone(),
            value: m.value.clone(),
        }));
    }
}

/// `input` for the guest, without markers.
fn to_wit_input(input: &model::Input) -> wit::Input {
    let event = match &input.event {
        model::Event::Register(r) => wit::Event::Register(wit::RegisterEvent {
            url: r.url.clone(),
            delivery_mode: r.delivery_mode.clone(),
            requested_kind: r.requested_kind.map(to_wit_kind),
            mcp_server_present: r.mcp_server_present,
            loaded_mcp_tools: r.loaded_mcp_tools.clone(),
        }),
        model::Event::Heartbeat(h) => wit::Event::Heartbeat(wit::HeartbeatEvent {
            error_rate: h.error_rate,
            sample_error: h.sample_error.clone(),
            active_tasks: h.active_tasks,
            current_task: h.current_task.clone(),
            uptime_seconds: h.uptime_seconds,
            runtime_state: h.runtime_state.clone(),
            mcp_server_present: h.mcp_server_present,
            loaded_mcp_tools: h.loaded_mcp_tools.clone(),
        }),
    };
    let ws = &input.workspace;
    wit::Input {
        event,
        workspace: wit::Workspace {
            id: ws.id.clone(),
            kind: to_wit_kind(ws.kind),
            status: to_wit_status(ws.status),
            model_configured: ws.model_configured,
            declared_plugins: ws.declared_plugins.clone(),
            last_register_failure_ms: ws.last_register_failure_ms,
        },
        markers: Vec::new(),
        now_ms: input.now_ms,
    }
}

fn to_wit_action(action: &model::Action) -> wit::Action {
    use model::Effect as E;
    let effect = match &action.effect {
        E::SetStatus {
            to,
            expected,
            reason,
            message,
        } => wit::Effect::SetStatus(wit::StatusChange {
            to: to_wit_status(*to),
            expected: to_wit_status(*expected),
            reason: reason.clone(),
            message: message.clone(),
        }),
        E::Reject {
            http_status,
            message,
        } => wit::Effect::Reject(wit::Rejection {
            http_status: *http_status,
            message: message.clone(),
        }),
        E::RecordEvent {
            event_type,
            payload_json,
        } => wit::Effect::RecordEvent(wit::EventRecord {
            event_type: event_type.clone(),
            payload_json: payload_json.clone(),
        }),
        E::RequestReconcile { trigger } => wit::Effect::RequestReconcile(to_wit_trigger(*trigger)),
        E::SetMarker { owner, key, value } => wit::Effect::SetMarker(wit::Marker {
            owner: owner.clone(),
            key: key.clone(),
            value: value.clone(),
        }),
        E::ClearMarker { owner, key } => wit::Effect::ClearMarker(wit::MarkerKey {
            owner: owner.clone(),
            key: key.clone(),
        }),
    };
    wit::Action {
        workspace_id: action.workspace_id.clone(),
        effect,
    }
}

fn from_wit_action(action: wit::Action) -> model::Action {
    use model::Effect as E;
    let effect = match action.effect {
        wit::Effect::SetStatus(c) => E::SetStatus {
            to: from_wit_status(c.to),
            expected: from_wit_status(c.expected),
            reason: c.reason,
            message: c.message,
        },
        wit::Effect::Reject(r) => E::Reject {
            http_status: r.http_status,
            message: r.message,
        },
        wit::Effect::RecordEvent(e) => E::RecordEvent {
            event_type: e.event_type,
            payload_json: e.payload_json,
        },
        wit::Effect::RequestReconcile(t) => E::RequestReconcile {
            trigger: from_wit_trigger(t),
        },
        wit::Effect::SetMarker(m) => E::SetMarker {
            owner: m.owner,
            key: m.key,
            value: m.value,
        },
        wit::Effect::ClearMarker(k) => E::ClearMarker {
            owner: k.owner,
            key: k.key,
        },
    };
    model::Action {
        workspace_id: action.workspace_id,
        effect,
    }
}
