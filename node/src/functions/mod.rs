//! Functions (like Lambda): WebAssembly modules run in Wasmer, deployed by name, placed by the
//! placement core, invoked through HTTP or gRPC on any node.
//!
//! - A function is a record `fn/<name>` in the replicated state: the module's blake3 hash (the
//!   module is a blob in the mesh's registry), memory limit, timeout, environment, concurrency
//!   limit and the number of warm replicas.
//! - The scheduler places `replicas` warm copies like any workload (memory is the request);
//!   a node that holds a claim pulls the module and compiles it ahead of the first call.
//! - An invocation arriving anywhere runs on a node that holds a claim: locally if this node
//!   is one, else forwarded over the node-to-node RPC to a claimed node (warm, no compile).
//!   If no claimed node answers, the receiving node fetches the module and runs it itself, so
//!   a call never fails because of placement. Forwarding is the default because a warm call
//!   costs well under a millisecond while a cold one on a node without the artifact costs a
//!   compile; see `bench/fn`.
//! - Per node and function, at most `concurrency` calls run at once; more get 429.
//! - Every call is metered: invocations, errors, cold starts, a duration histogram and
//!   GB-seconds, on `/metrics` and through `meshctl fn stats` (summed over all nodes).

pub mod call_threads;
pub mod memory_pool;
pub mod runtime;
pub mod triggers;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::blobs::store::Hash;
use crate::membership::MemberState;
use crate::node::NodeState;
use crate::placement::{Strategy, WorkloadSpec};
use crate::registry::{Registry, RegistryError};
use crate::scheduler::{Scheduler, WorkloadSource};
use runtime::{
    CacheOutcome, CgiRequest, CgiResponse, FunctionRuntime, InvokeError, Limits, LoadedModule,
};

const FN_PREFIX: &str = "fn/";
/// Largest request body a function accepts (413 beyond).
pub const MAX_BODY_BYTES: usize = 6 << 20;

// A forwarded call's answer (the whole output, stderr and headers) fits in one node-to-node
// message, so a large answer never looks like an unreachable node (which would run the call a
// second time here).
const _: () = assert!(
    runtime::MAX_STDOUT_BYTES + runtime::MAX_STDERR_BYTES + (1 << 20)
        <= crate::rpc::MAX_RPC_BYTES as usize
);
/// Log lines kept per function on each node.
const LOG_LINES: usize = 1000;
/// Duration histogram bucket bounds, seconds (for mergeable p50/p99 across nodes).
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 900.0,
];

/// A deployed function, as kept in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// Name: 1–63 of `[a-z0-9-]`, starting with a letter.
    pub name: String,
    /// blake3 of the module (a blob in the registry).
    pub module: Hash,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Wall-clock and CPU limit per call, in milliseconds.
    pub timeout_ms: u64,
    /// Environment given to every call.
    pub env: BTreeMap<String, String>,
    /// Calls running at once per node; more get 429.
    pub concurrency: u32,
    /// Warm copies the scheduler places.
    pub replicas: u32,
    /// When it was deployed, ms since the epoch.
    pub created_ms: u64,
    /// Internal events that invoke it asynchronously (e.g. `job.finished`).
    #[serde(default)]
    pub events: Vec<String>,
    /// Who may call it at `/fn/<name>` on the HTTP listener (routes have their own auth).
    #[serde(default)]
    pub url: UrlAccess,
}

/// Who may call a function at `/fn/<name>` (like a Lambda function URL's auth type). Routes
/// to the function are not affected: they have their own auth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UrlAccess {
    /// Anyone who can reach the node's HTTP port (the default).
    #[default]
    Public,
    /// Callers with a valid, unrevoked API key in `x-api-key`; its plan's limits apply.
    Key,
    /// Nobody: the function is reachable only through routes, events and gRPC.
    Off,
}

impl UrlAccess {
    /// The name used on the command line and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Key => "key",
            Self::Off => "off",
        }
    }
}

impl std::str::FromStr for UrlAccess {
    type Err = FunctionError;

    /// `public` (or empty), `key` or `off`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "public" => Ok(Self::Public),
            "key" => Ok(Self::Key),
            "off" => Ok(Self::Off),
            other => Err(FunctionError::Invalid(format!(
                "url access {other:?}: expected public, key or off"
            ))),
        }
    }
}

/// Why a deploy was refused, or a call failed; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// Invalid deploy parameters.
    #[error("{0}")]
    Invalid(String),
    /// No such function.
    #[error("no function {0:?} in this mesh")]
    Unknown(String),
    /// The module is not usable (not wasm, no `_start`, unknown import).
    #[error("module {module}: {source}")]
    BadModule {
        /// The module hash.
        module: Hash,
        /// What is wrong.
        source: InvokeError,
    },
    /// The call failed in the function (trap, timeout, memory).
    #[error(transparent)]
    Invoke(#[from] InvokeError),
    /// Too many calls at once.
    #[error("function {name} is running {limit} calls on this node already; try again")]
    Throttled {
        /// The function.
        name: String,
        /// Its concurrency limit.
        limit: u32,
    },
    /// The request body is over the limit.
    #[error("request body is over {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// The module could not be fetched.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Storing the record failed.
    #[error("cannot store the function: {0}")]
    State(String),
    /// The node that ran the call answered with an error.
    #[error("{message}")]
    Remote {
        /// The HTTP status it chose.
        status: u16,
        /// Its message.
        message: String,
    },
}

impl FunctionError {
    /// The HTTP status a gateway answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            FunctionError::Invalid(_) | FunctionError::BadModule { .. } => 400,
            FunctionError::Unknown(_) => 404,
            FunctionError::TooLarge => 413,
            FunctionError::Throttled { .. } => 429,
            FunctionError::Invoke(e) => e.http_status(),
            FunctionError::Registry(_) | FunctionError::State(_) => 503,
            FunctionError::Remote { status, .. } => *status,
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Checks a function name.
pub fn validate_name(name: &str) -> Result<(), FunctionError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(FunctionError::Invalid(format!(
            "function name {name:?}: 1 to 63 of a-z, 0-9 and '-', starting with a letter"
        )))
    }
}

/// Checks a spec's limits; the messages give the allowed range.
pub fn validate_spec(spec: &FunctionSpec) -> Result<(), FunctionError> {
    validate_name(&spec.name)?;
    let mib = 1u64 << 20;
    if !(mib..=4096 * mib).contains(&spec.memory_bytes) {
        return Err(FunctionError::Invalid(format!(
            "memory {} bytes: must be between 1Mi and 4Gi",
            spec.memory_bytes
        )));
    }
    if !(1..=900_000).contains(&spec.timeout_ms) {
        return Err(FunctionError::Invalid(format!(
            "timeout {} ms: must be between 1ms and 15m",
            spec.timeout_ms
        )));
    }
    if !(1..=1000).contains(&spec.concurrency) {
        return Err(FunctionError::Invalid(format!(
            "concurrency {}: must be between 1 and 1000",
            spec.concurrency
        )));
    }
    if spec.replicas > 64 {
        return Err(FunctionError::Invalid(format!(
            "replicas {}: at most 64",
            spec.replicas
        )));
    }
    for e in &spec.events {
        let ok = !e.is_empty()
            && e.len() <= 64
            && e.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c));
        if !ok {
            return Err(FunctionError::Invalid(format!(
                "event {e:?}: 1 to 64 of letters, digits, '.', '-', '_'"
            )));
        }
    }
    for k in spec.env.keys() {
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(FunctionError::Invalid(format!(
                "env name {k:?}: letters, digits and '_', not starting with a digit"
            )));
        }
    }
    Ok(())
}

/// Per-function counters on one node; mergeable across nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionStats {
    /// Calls run.
    pub invocations: u64,
    /// Calls that failed (trap, timeout, memory, bad output).
    pub errors: u64,
    /// Calls that had to load or compile the module first.
    pub cold_starts: u64,
    /// Calls refused with 429.
    pub throttled: u64,
    /// Memory limit × duration, in GB-seconds.
    pub gb_seconds: f64,
    /// Counts per [`DURATION_BUCKETS`] bucket (the last counts everything above).
    pub buckets: Vec<u64>,
}

impl FunctionStats {
    fn record(&mut self, d: Duration) {
        if self.buckets.len() != DURATION_BUCKETS.len() + 1 {
            self.buckets = vec![0; DURATION_BUCKETS.len() + 1];
        }
        let s = d.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i] += 1;
    }

    /// Adds another node's counters.
    pub fn merge(&mut self, other: &FunctionStats) {
        self.invocations += other.invocations;
        self.errors += other.errors;
        self.cold_starts += other.cold_starts;
        self.throttled += other.throttled;
        self.gb_seconds += other.gb_seconds;
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
    }

    /// Upper bound of the bucket holding quantile `q` (0..1), in seconds.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(DURATION_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }
}

/// One line a function wrote to stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// The node that ran the call.
    pub node: String,
    /// The text.
    pub line: String,
}

#[derive(Serialize, Deserialize)]
struct InvokeWire {
    name: String,
    request: CgiRequest,
}

#[derive(Serialize, Deserialize)]
enum InvokeAnswer {
    Ok(CgiResponse),
    Failed { status: u16, message: String },
}

/// The function subsystem of one node.
pub struct Functions {
    node: Arc<NodeState>,
    registry: Arc<Registry>,
    /// Created on first use: a node that never runs a function pays nothing for Wasmer.
    runtime: std::sync::OnceLock<Arc<FunctionRuntime>>,
    cache_dir: std::path::PathBuf,
    loaded: Mutex<HashMap<Hash, LoadedModule>>,
    limits: Mutex<HashMap<String, (u32, Arc<Semaphore>)>>,
    stats: Mutex<HashMap<String, FunctionStats>>,
    logs: Mutex<HashMap<String, VecDeque<LogLine>>>,
    /// Parsed specs by name, with the state bytes they were parsed from: a call looks its
    /// function up, and parsing the JSON each time was a few percent of a warm call.
    parsed: Mutex<HashMap<String, (Vec<u8>, FunctionSpec)>>,
    /// Whether this node holds a claim on a function, by the state generation it was
    /// read at: every call asks, and reading the claims parses them.
    claimed_here: Mutex<HashMap<String, (u64, bool)>>,
    /// This node's peer id as claims name it.
    self_id: String,
}

impl Functions {
    /// The subsystem; compiled artifacts are cached in `cache_dir`.
    pub fn new(
        node: Arc<NodeState>,
        registry: Arc<Registry>,
        cache_dir: std::path::PathBuf,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            registry,
            runtime: std::sync::OnceLock::new(),
            cache_dir,
            loaded: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            logs: Mutex::new(HashMap::new()),
            parsed: Mutex::new(HashMap::new()),
            claimed_here: Mutex::new(HashMap::new()),
            self_id: node.peer_id.to_string(),
            node,
        });
        Self::register_rpc(&this);
        this
    }

    /// Registers the node-to-node services: `fn.invoke` (run a forwarded call here),
    /// `fn.stats` and `fn.logs` (this node's share of a function's counters and logs).
    fn register_rpc(this: &Arc<Self>) {
        fn serve<Q, A, F, Fut>(this: &Arc<Functions>, service: &str, f: F)
        where
            Q: serde::de::DeserializeOwned + Send + 'static,
            A: Serialize + 'static,
            F: Fn(Arc<Functions>, Q) -> Fut + Send + Sync + 'static,
            Fut: std::future::Future<Output = A> + Send + 'static,
        {
            let f = Arc::new(f);
            let functions = this.clone();
            this.node.router.register(
                service,
                Arc::new(move |_peer, body| {
                    let (f, functions) = (f.clone(), functions.clone());
                    Box::pin(async move {
                        let q: Q =
                            postcard::from_bytes(&body).map_err(|e| format!("bad call: {e}"))?;
                        let answer = f(functions, q).await;
                        Ok(postcard::to_allocvec(&answer).expect("answers serialize"))
                    })
                }),
            );
        }
        serve(this, "fn.invoke", |f, wire: InvokeWire| async move {
            match f.invoke_local(&wire.name, wire.request).await {
                Ok(r) => InvokeAnswer::Ok(r),
                Err(e) => InvokeAnswer::Failed {
                    status: e.http_status(),
                    message: e.to_string(),
                },
            }
        });
        serve(this, "fn.stats", |f, name: String| async move {
            f.local_stats(&name)
        });
        serve(this, "fn.logs", |f, name: String| async move {
            f.local_logs(&name)
        });
    }

    /// The function records as workloads for the scheduler.
    pub fn workload_source(registry: Arc<Registry>) -> WorkloadSource {
        Box::new(move |node: &NodeState| {
            let specs = read_specs(node);
            specs
                .into_iter()
                .map(|s| WorkloadSpec {
                    id: format!("{FN_PREFIX}{}", s.name),
                    replicas: s.replicas,
                    cpu_millis: 0,
                    memory_bytes: s.memory_bytes,
                    constraints: BTreeMap::new(),
                    strategy: Strategy::Spread,
                    priority: 0,
                    preferred: registry
                        .holders(&s.module)
                        .into_iter()
                        .map(|h| h.peer.to_string())
                        .collect(),
                })
                .collect()
        })
    }

    /// A function by name (one key read).
    pub fn spec(&self, name: &str) -> Result<FunctionSpec, FunctionError> {
        validate_name(name)?;
        let unknown = || FunctionError::Unknown(name.to_string());
        let replica = self.node.replica.lock().expect("replica lock");
        let mut parsed = self.parsed.lock().expect("parsed specs lock");
        let Some(bytes) = replica
            .map()
            .get(&format!("{FN_PREFIX}{name}"))
            .and_then(|e| e.value.as_deref())
        else {
            parsed.remove(name);
            return Err(unknown());
        };
        if let Some((from, spec)) = parsed.get(name)
            && from.as_slice() == bytes
        {
            return Ok(spec.clone());
        }
        let spec: FunctionSpec = serde_json::from_slice(bytes).map_err(|_| unknown())?;
        parsed.insert(name.to_string(), (bytes.to_vec(), spec.clone()));
        Ok(spec)
    }

    /// Every function.
    pub fn list(&self) -> Vec<FunctionSpec> {
        read_specs(&self.node)
    }

    /// Deploys (or updates) a function whose module was uploaded as a blob: the module is
    /// fetched, validated and compiled here first, so a bad module is refused at deploy.
    pub async fn deploy(&self, mut spec: FunctionSpec) -> Result<FunctionSpec, FunctionError> {
        validate_spec(&spec)?;
        self.load(&spec.module).await?;
        spec.created_ms = now_ms();
        let bytes = serde_json::to_vec(&spec).expect("specs serialize");
        self.node
            .write(&format!("{FN_PREFIX}{}", spec.name), Some(bytes))
            .map_err(|e| FunctionError::State(e.to_string()))?;
        Ok(spec)
    }

    /// Removes a function.
    pub fn remove(&self, name: &str) -> Result<(), FunctionError> {
        self.spec(name)?;
        self.node
            .write(&format!("{FN_PREFIX}{name}"), None)
            .map_err(|e| FunctionError::State(e.to_string()))?;
        Ok(())
    }

    /// Makes a module ready on this node; says whether that was a cold start.
    async fn load(&self, module: &Hash) -> Result<(LoadedModule, bool), FunctionError> {
        if let Some(m) = self.loaded.lock().expect("loaded lock").get(module) {
            return Ok((m.clone(), false));
        }
        self.registry.ensure_local(module, |_| {}).await?;
        let store = self.registry.store().clone();
        let runtime = self.runtime()?;
        let hash = *module;
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let mut bytes = Vec::new();
            use std::io::Read;
            store
                .reader(&hash)
                .map_err(|e| InvokeError::NotWasm(e.to_string()))?
                .read_to_end(&mut bytes)
                .map_err(|e| InvokeError::NotWasm(e.to_string()))?;
            runtime.load(hash.0, &bytes)
        })
        .await
        .expect("load task");
        let (loaded, outcome) = result.map_err(|source| FunctionError::BadModule {
            module: *module,
            source,
        })?;
        let source = match outcome {
            CacheOutcome::MemoryHit => "memory",
            CacheOutcome::DiskHit => "disk",
            CacheOutcome::Compiled => "compiled",
        };
        metrics::counter!("mesh_fn_artifact_cache_total", "result" => source).increment(1);
        let elapsed = started.elapsed();
        metrics::histogram!("mesh_fn_load_seconds", "result" => source)
            .record(elapsed.as_secs_f64());
        tracing::debug!(module = %module, source, elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "function module loaded");
        self.loaded
            .lock()
            .expect("loaded lock")
            .insert(*module, loaded.clone());
        Ok((loaded, true))
    }

    /// Runs a module (a blob in the registry) once on this node, outside any function: for
    /// batch jobs. Fetches and compiles it as a function's module would be; keeps no stats.
    /// Setting `cancel` kills the run (it ends as a timeout).
    pub async fn run_module(
        &self,
        module: &Hash,
        request: CgiRequest,
        limits: Limits,
        cancel: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<CgiResponse, FunctionError> {
        let (module, _) = self.load(module).await?;
        let runtime = self.runtime()?;
        let result = tokio::task::spawn_blocking(move || {
            runtime.invoke_cancellable(&module, request, &limits, &cancel)
        })
        .await
        .expect("invoke task");
        Ok(result?)
    }

    fn runtime(&self) -> Result<Arc<FunctionRuntime>, FunctionError> {
        if let Some(r) = self.runtime.get() {
            return Ok(r.clone());
        }
        let created = FunctionRuntime::new(&self.cache_dir)
            .map_err(|e| FunctionError::State(format!("function runtime: {e}")))?;
        Ok(self.runtime.get_or_init(|| Arc::new(created)).clone())
    }

    fn semaphore(&self, spec: &FunctionSpec) -> Arc<Semaphore> {
        let mut limits = self.limits.lock().expect("limits lock");
        match limits.get(&spec.name) {
            Some((n, s)) if *n == spec.concurrency => s.clone(),
            _ => {
                let s = Arc::new(Semaphore::new(spec.concurrency as usize));
                limits.insert(spec.name.clone(), (spec.concurrency, s.clone()));
                s
            }
        }
    }

    /// Names of the live nodes holding a warm claim for the function.
    pub fn warm_node_names(&self, name: &str) -> Vec<String> {
        let peers = self.claimed_nodes(name);
        let table = self.node.membership.read().expect("membership lock");
        peers
            .iter()
            .filter_map(|p| table.get(&p.to_string()).map(|m| m.heartbeat.name.clone()))
            .collect()
    }

    /// Nodes that hold a live claim for the function, this node first if it is one.
    fn claimed_nodes(&self, name: &str) -> Vec<PeerId> {
        let workload = format!("{FN_PREFIX}{name}");
        let table = self.node.membership.read().expect("membership lock");
        let mut nodes: Vec<PeerId> = Scheduler::claims_of(&self.node, &workload)
            .into_iter()
            .filter(|c| {
                table
                    .get(&c.node)
                    .is_some_and(|m| m.state == MemberState::Alive)
            })
            .filter_map(|c| c.node.parse().ok())
            .collect();
        nodes.sort_by_key(|p| (*p != self.node.peer_id, *p));
        nodes.dedup();
        nodes
    }

    /// Whether this node holds a claim on the function (then calls run here).
    fn is_claimed_here(&self, name: &str) -> bool {
        let generation = self.node.state_generation();
        if let Some((at, claimed)) = self.claimed_here.lock().expect("claims lock").get(name)
            && *at == generation
        {
            return *claimed;
        }
        // Read after the generation: a change meanwhile makes the next call read again.
        let claimed = Scheduler::claims_of(&self.node, &format!("{FN_PREFIX}{name}"))
            .iter()
            .any(|c| c.node == self.self_id);
        let mut cache = self.claimed_here.lock().expect("claims lock");
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(name.to_string(), (generation, claimed));
        claimed
    }

    /// Invokes a function from any node: here when this node is warm for it, else on a
    /// warm node, else here anyway.
    pub async fn invoke(
        &self,
        name: &str,
        request: CgiRequest,
    ) -> Result<CgiResponse, FunctionError> {
        if request.body.len() > MAX_BODY_BYTES {
            return Err(FunctionError::TooLarge);
        }
        let spec = self.spec(name)?;
        if self.is_claimed_here(name) {
            return self.run_here(spec, request).await;
        }
        let claimed = self.claimed_nodes(name);
        if claimed.is_empty() || claimed[0] == self.node.peer_id {
            return self.run_here(spec, request).await;
        }
        // Spread calls over the warm nodes.
        let pick = claimed[rand::random_range(0..claimed.len())];
        let wire = postcard::to_allocvec(&InvokeWire {
            name: name.to_string(),
            request: request.clone(),
        })
        .expect("calls serialize");
        match self.node.call(pick, "fn.invoke", wire).await {
            Ok(bytes) => match postcard::from_bytes::<InvokeAnswer>(&bytes) {
                Ok(InvokeAnswer::Ok(r)) => Ok(r),
                Ok(InvokeAnswer::Failed { status, message }) => {
                    Err(FunctionError::Remote { status, message })
                }
                Err(e) => Err(FunctionError::Invoke(InvokeError::BadOutput(e.to_string()))),
            },
            Err(e) => {
                tracing::warn!(function = name, node = %pick, error = %e, "warm node unreachable; running here");
                self.run_here(spec, request).await
            }
        }
    }

    /// Runs a call on this node (a call forwarded here by another node).
    pub async fn invoke_local(
        &self,
        name: &str,
        request: CgiRequest,
    ) -> Result<CgiResponse, FunctionError> {
        let spec = self.spec(name)?;
        self.run_here(spec, request).await
    }

    async fn run_here(
        &self,
        spec: FunctionSpec,
        request: CgiRequest,
    ) -> Result<CgiResponse, FunctionError> {
        let name = spec.name.as_str();
        let semaphore = self.semaphore(&spec);
        let Ok(_permit) = semaphore.try_acquire_owned() else {
            self.stats_mut(name, |s| s.throttled += 1);
            metrics::counter!("mesh_fn_throttled_total", "fn" => name.to_string()).increment(1);
            return Err(FunctionError::Throttled {
                name: name.to_string(),
                limit: spec.concurrency,
            });
        };
        let (module, cold) = self.load(&spec.module).await?;
        let limits = Limits {
            memory_bytes: spec.memory_bytes,
            timeout: Duration::from_millis(spec.timeout_ms),
        };
        let mut request = request;
        for (k, v) in &spec.env {
            request.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let runtime = self.runtime()?;
        let started = Instant::now();
        let result = runtime.invoke_async(&module, request, &limits).await;
        let elapsed = started.elapsed();
        metrics::gauge!("mesh_fn_runaway_calls").set(self.runtime()?.runaway_calls() as f64);
        let gb_s = spec.memory_bytes as f64 / 1e9 * elapsed.as_secs_f64();
        let failed = result.is_err();
        self.stats_mut(name, |s| {
            s.invocations += 1;
            s.errors += u64::from(failed);
            s.cold_starts += u64::from(cold);
            s.gb_seconds += gb_s;
            s.record(elapsed);
        });
        let label = name.to_string();
        metrics::counter!("mesh_fn_invocations_total", "fn" => label.clone()).increment(1);
        if failed {
            metrics::counter!("mesh_fn_errors_total", "fn" => label.clone()).increment(1);
        }
        if cold {
            metrics::counter!("mesh_fn_cold_starts_total", "fn" => label.clone()).increment(1);
        }
        metrics::histogram!("mesh_fn_duration_seconds", "fn" => label.clone())
            .record(elapsed.as_secs_f64());
        metrics::counter!("mesh_fn_gb_milliseconds_total", "fn" => label)
            .increment((gb_s * 1000.0) as u64);
        let stderr = match &result {
            Ok(r) => r.stderr.clone(),
            Err(e) => e.stderr().map(<[u8]>::to_vec).unwrap_or_default(),
        };
        self.append_logs(name, &stderr);
        Ok(result?)
    }

    fn stats_mut(&self, name: &str, f: impl FnOnce(&mut FunctionStats)) {
        let mut all = self.stats.lock().expect("stats lock");
        f(all.entry(name.to_string()).or_default());
    }

    fn append_logs(&self, name: &str, stderr: &[u8]) {
        if stderr.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(stderr);
        let mut logs = self.logs.lock().expect("logs lock");
        let buf = logs.entry(name.to_string()).or_default();
        for line in text.lines() {
            tracing::info!(function = name, "{line}");
            buf.push_back(LogLine {
                at_ms: now_ms(),
                node: self.node.name.clone(),
                line: line.chars().take(4096).collect(),
            });
            while buf.len() > LOG_LINES {
                buf.pop_front();
            }
        }
    }

    fn local_stats(&self, name: &str) -> FunctionStats {
        self.stats
            .lock()
            .expect("stats lock")
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    fn local_logs(&self, name: &str) -> Vec<LogLine> {
        self.logs
            .lock()
            .expect("logs lock")
            .get(name)
            .map(|b| b.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Other nodes not declared dead (a suspect one, e.g. busy for a moment, is still asked:
    /// leaving it out would make counters jump).
    fn live_peers(&self) -> Vec<PeerId> {
        let table = self.node.membership.read().expect("membership lock");
        table
            .peers_in(MemberState::Alive)
            .chain(table.peers_in(MemberState::Suspect))
            .filter_map(|m| m.heartbeat.peer_id.parse().ok())
            .collect()
    }

    /// Counters summed over every live node.
    pub async fn stats(&self, name: &str) -> Result<FunctionStats, FunctionError> {
        self.spec(name)?;
        let mut total = self.local_stats(name);
        let body = postcard::to_allocvec(&name.to_string()).expect("names serialize");
        let calls = self
            .live_peers()
            .into_iter()
            .map(|p| self.node.call(p, "fn.stats", body.clone()));
        for answer in futures::future::join_all(calls).await.into_iter().flatten() {
            if let Ok(s) = postcard::from_bytes::<FunctionStats>(&answer) {
                total.merge(&s);
            }
        }
        Ok(total)
    }

    /// Recent stderr lines from every live node, oldest first.
    pub async fn logs(&self, name: &str) -> Result<Vec<LogLine>, FunctionError> {
        self.spec(name)?;
        let mut all = self.local_logs(name);
        let body = postcard::to_allocvec(&name.to_string()).expect("names serialize");
        let calls = self
            .live_peers()
            .into_iter()
            .map(|p| self.node.call(p, "fn.logs", body.clone()));
        for answer in futures::future::join_all(calls).await.into_iter().flatten() {
            if let Ok(lines) = postcard::from_bytes::<Vec<LogLine>>(&answer) {
                all.extend(lines);
            }
        }
        all.sort_by_key(|l| l.at_ms);
        Ok(all)
    }

    /// Keeps the functions this node holds claims for loaded (pulled and compiled), so the
    /// first forwarded call is warm.
    pub async fn warm_claimed(&self) {
        let me = self.node.peer_id.to_string();
        let mine: Vec<String> = Scheduler::claims(&self.node)
            .into_iter()
            .filter(|c| c.node == me)
            .filter_map(|c| c.workload.strip_prefix(FN_PREFIX).map(str::to_string))
            .collect();
        for name in mine {
            if let Ok(spec) = self.spec(&name)
                && let Err(e) = self.load(&spec.module).await
            {
                tracing::warn!(function = %name, error = %e, "cannot warm function");
            }
        }
    }

    /// Warms claimed functions every two seconds until shutdown.
    pub async fn run_background(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = tick.tick() => self.warm_claimed().await,
                _ = shutdown.changed() => break,
            }
        }
    }
}

pub(crate) fn read_specs(node: &NodeState) -> Vec<FunctionSpec> {
    let replica = node.replica.lock().expect("replica lock");
    replica
        .map()
        .list(FN_PREFIX)
        .filter_map(|e| serde_json::from_slice(e.value.as_deref()?).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FunctionSpec {
        FunctionSpec {
            name: "hello".into(),
            module: Hash([1; 32]),
            memory_bytes: 64 << 20,
            timeout_ms: 5000,
            env: BTreeMap::new(),
            concurrency: 16,
            replicas: 1,
            created_ms: 0,
            events: vec![],
            url: UrlAccess::Public,
        }
    }

    #[test]
    fn specs_are_validated_with_ranges_in_the_message() {
        assert!(validate_spec(&spec()).is_ok());
        for (f, needle) in [
            (
                FunctionSpec {
                    name: "Hello".into(),
                    ..spec()
                },
                "function name",
            ),
            (
                FunctionSpec {
                    memory_bytes: 10,
                    ..spec()
                },
                "between 1Mi and 4Gi",
            ),
            (
                FunctionSpec {
                    timeout_ms: 0,
                    ..spec()
                },
                "between 1ms and 15m",
            ),
            (
                FunctionSpec {
                    concurrency: 0,
                    ..spec()
                },
                "between 1 and 1000",
            ),
            (
                FunctionSpec {
                    replicas: 65,
                    ..spec()
                },
                "at most 64",
            ),
        ] {
            let e = validate_spec(&f).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let mut bad_env = spec();
        bad_env.env.insert("1X".into(), "v".into());
        assert!(validate_spec(&bad_env).is_err());
    }

    #[test]
    fn stats_merge_and_quantiles() {
        let mut a = FunctionStats::default();
        for _ in 0..90 {
            a.record(Duration::from_micros(300));
        }
        let mut b = FunctionStats::default();
        for _ in 0..10 {
            b.record(Duration::from_millis(150));
        }
        a.invocations = 90;
        b.invocations = 10;
        a.merge(&b);
        assert_eq!(a.invocations, 100);
        assert_eq!(a.quantile(0.5), Some(0.0005));
        assert_eq!(a.quantile(0.99), Some(0.2));
        assert_eq!(FunctionStats::default().quantile(0.5), None);
    }
}
