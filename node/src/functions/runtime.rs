//! The function runtime: runs WebAssembly functions (WASI preview 1 command
//! modules) in Wasmer, one HTTP request per run, in the WAGI style (CGI over
//! WASI).
//!
//! # Why this exists
//!
//! Meshwork nodes run two kinds of workloads: containers (through containerd)
//! and *functions*, small WebAssembly modules that are started per request,
//! like AWS Lambda. Functions are cheap to ship (kilobytes), start in well
//! under a millisecond once compiled, and are sandboxed by the WebAssembly
//! runtime instead of a kernel namespace. This module is the node's single
//! entry point for them:
//!
//! * [`FunctionRuntime::load`] turns module bytes into a runnable
//!   [`LoadedModule`] once per node: from an in-memory map keyed by the
//!   module's blake3 hash, else from the on-disk artifact cache in the node's
//!   data dir, else by validating and compiling it (Cranelift) and writing the
//!   compiled artifact to that cache. Modules that would not run here are
//!   refused at this point, with an error that names the problem
//!   ([`InvokeError::NotWasm`], [`InvokeError::NoStart`],
//!   [`InvokeError::UnknownImport`]).
//! * [`FunctionRuntime::invoke`] runs the module's `_start` for one
//!   [`CgiRequest`] and parses its standard output as a CGI response
//!   ([`CgiResponse`]), under [`Limits`]: a memory cap, a CPU budget
//!   (instruction metering) and a wall-clock deadline.
//!
//! # The interface a function sees (WAGI)
//!
//! * `argv` is `["function", args...]` with the args from the deployment.
//! * The environment holds the function's own variables from the deployment,
//!   the CGI meta-variables `GATEWAY_INTERFACE`, `SERVER_PROTOCOL`,
//!   `REQUEST_METHOD`, `PATH_INFO`, `QUERY_STRING`, `CONTENT_LENGTH`,
//!   `CONTENT_TYPE` (when the request has one), and one `HTTP_<NAME>` variable
//!   per request header (upper-cased, `-` turned into `_`; repeated headers
//!   joined with `", "`). The CGI meta-variables win over the function's
//!   variables, which win over `HTTP_*` variables, so a client cannot
//!   override the deployment's configuration with a header. `Content-Type`
//!   and `Content-Length` are passed only as `CONTENT_TYPE` and
//!   `CONTENT_LENGTH`, and a `Proxy` header is dropped (it would become
//!   `HTTP_PROXY`, the "httpoxy" problem).
//! * Standard input is the request body, then end of file.
//! * Standard output is the response: optional header lines (`Name: value`),
//!   a blank line, then the body. A `Status: 404 Not Found` header sets the
//!   status (default 200; 302 when only `Location` is given). When the output
//!   does not start with such a header section (no blank line, or a line
//!   before it that is not a header), the whole output is the body, with
//!   status 200 and `Content-Type: text/plain`, so `println!("hi")` works.
//! * Standard error is captured (the first [`MAX_STDERR_BYTES`]) for logs and
//!   error reports.
//! * The file system is an empty, read-only `/` (the one preopened
//!   directory): nothing can be read or created. There is no network. A
//!   request with a [`CgiRequest::scratch`] directory (batch jobs) also gets
//!   that host directory, read-write, preopened at `/scratch`. The guest cannot leave it: paths are normalized
//!   below its root, and symlinks and hard links the guest makes stay
//!   virtual (they never reach the host), so a fresh directory holds none.
//! * Exiting with `proc_exit(0)` is a normal end; any other exit code, a trap
//!   (e.g. a Rust panic, which aborts), running out of memory or of time is a
//!   failed invocation ([`InvokeError`], with [`InvokeError::http_status`]).
//!
//! # Cost model
//!
//! The compiled [`wasmer::Module`] and the engine are shared by all calls;
//! each call gets a fresh WASI environment, instance and linear memory, so no
//! state leaks from one request to the next. What can be reused without
//! sharing state is: the call threads ([`super::call_threads`]), the store
//! with the WASI host functions in it (a call thread keeps it for up to
//! [`CALLS_PER_STORE`] calls, see [`CallStore`]), and the linear memories'
//! reservations, zeroed between calls ([`super::memory_pool`]). A call from an
//! async caller runs inline, on the caller's own thread, when its module's
//! calls are short, saving the two cross-thread wake-ups of a call thread
//! ([`InlineHistory`]). A warm call of the `hello` example costs about 30 µs
//! of CPU in all (HTTP included; `bench/fn` in `bench/README.md`).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use wasmer::sys::vm::{
    LinearMemory, MemoryError, MemoryStyle, TableStyle, VMMemory, VMMemoryDefinition, VMTable,
    VMTableDefinition,
};
use wasmer::sys::{
    BaseTunables, CompilerConfig, Cranelift, EngineBuilder, Features, FunctionMiddleware,
    MiddlewareError, MiddlewareReaderState, ModuleMiddleware, NativeEngineExt, Tunables,
};
use wasmer::wasmparser::{BlockType, Operator};
use wasmer::{
    CompileError, Engine, ExportIndex, ExternType, GlobalInit, GlobalType, LocalFunctionIndex,
    MemoryType, Module, ModuleInfo, Mutability, Pages, Store, TableType, Type,
};
use wasmer_middlewares::Metering;
use wasmer_middlewares::metering::{MeteringPoints, get_remaining_points, set_remaining_points};
use wasmer_wasix::os::task::process::WasiProcess;
use wasmer_wasix::runtime::PluggableRuntime;
use wasmer_wasix::runtime::task_manager::tokio::TokioTaskManager;
use wasmer_wasix::virtual_fs::{self, EmptyFileSystem, VirtualFile};
use wasmer_wasix::wasmer_wasix_types::types::Signal;
use wasmer_wasix::wasmer_wasix_types::wasi::Errno;
use wasmer_wasix::{
    WasiEnv, WasiError, WasiFunctionEnv, WasiVersion, generate_import_object_from_env,
};

use super::call_threads::CallThreads;
use super::memory_pool::MemoryPool;

/// Most bytes of standard output (the CGI response) a call may write; more
/// fails the call with [`InvokeError::OutputTooLarge`].
pub const MAX_STDOUT_BYTES: usize = 32 * 1024 * 1024;

/// Where a call's scratch directory ([`CgiRequest::scratch`]) appears to the module.
pub const SCRATCH_PATH: &str = "/scratch";

/// Most bytes of standard error kept per call; the rest is dropped silently
/// (writes still succeed, so logging never breaks a function).
pub const MAX_STDERR_BYTES: usize = 64 * 1024;

/// Metering points granted per second of [`Limits::timeout`].
///
/// A point is roughly one WebAssembly instruction that does work (see
/// `metering_cost`; locals and constants are free) or 4 bytes of a bulk
/// memory copy. Calibrated on a 2-core x86-64 development VM, where compute
/// loops (sorting, hash maps, a bare spin loop, 1 MiB copies) ran at 5e9 to
/// 1.3e10 points per second, and a `hello` call needs about 4,000 points.
/// So the budget is millions of times what a normal call needs, a
/// compute-bound call on a machine up to ~1.5 times faster than that still
/// reaches its wall-clock deadline before its budget, and a runaway call's
/// thread ends within a few timeouts after the deadline. The deadline itself
/// is enforced by the wall clock (see [`FunctionRuntime::invoke`]).
pub const POINTS_PER_SECOND: u64 = 20_000_000_000;

/// Metering points available to a module's start section and `_initialize`
/// during instantiation, before the per-call budget is set. Baked into the
/// compiled artifact (hence part of the artifact cache key).
const INSTANTIATION_POINTS: u64 = 1_000_000_000;

/// Version of [`metering_cost`]; bump it whenever the cost function changes,
/// so artifacts compiled with the old costs are not reused.
const METERING_COST_VERSION: u32 = 2;

/// The wasmer release line this file was written against. Part of the
/// artifact cache key, so an upgrade recompiles instead of loading artifacts
/// of another version; a test checks it against `Cargo.lock`.
const WASMER_VERSION: &str = "7.4.2";

/// The only import module a function may use.
const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// The functions of WASI preview 1 (`wasi_snapshot_preview1`).
const WASI_PREVIEW1_FUNCTIONS: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "environ_get",
    "environ_sizes_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_dir_name",
    "fd_prestat_get",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "random_get",
    "sched_yield",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// First bytes of an artifact file: format name and version.
const ARTIFACT_MAGIC: &[u8; 8] = b"MWFNART1";

/// Size of the artifact file header: magic, then blake3 of the payload.
const ARTIFACT_HEADER_LEN: usize = ARTIFACT_MAGIC.len() + 32;

/// WebAssembly page size in bytes.
const PAGE_SIZE: u64 = 64 * 1024;

/// Resource limits for one invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Cap on the function's linear memory, in bytes (rounded down to whole
    /// 64 KiB pages). `memory.grow` past it fails; a module whose initial
    /// memory is already larger does not start.
    pub memory_bytes: u64,
    /// Wall-clock limit for the whole call (instantiation included); it also
    /// sets the CPU budget ([`POINTS_PER_SECOND`] per second).
    pub timeout: Duration,
}

impl Limits {
    /// Limits with the given memory cap and timeout.
    pub fn new(memory_bytes: u64, timeout: Duration) -> Self {
        Self {
            memory_bytes,
            timeout,
        }
    }

    /// The metering budget for one call under these limits.
    pub fn fuel_budget(&self) -> u64 {
        let points = self.timeout.as_secs_f64() * POINTS_PER_SECOND as f64;
        // `as` saturates for floats; keep at least a small budget.
        (points as u64).max(1_000_000)
    }

    fn max_pages(&self) -> Pages {
        let pages = (self.memory_bytes / PAGE_SIZE).min(u64::from(wasmer::WASM_MAX_PAGES));
        Pages(pages as u32)
    }
}

impl Default for Limits {
    /// 128 MiB of memory and 30 seconds.
    fn default() -> Self {
        Self::new(128 * 1024 * 1024, Duration::from_secs(30))
    }
}

/// One HTTP request, as handed to a function.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgiRequest {
    /// HTTP method, e.g. `GET` (`REQUEST_METHOD`).
    pub method: String,
    /// The path below the function's route (`PATH_INFO`), e.g. `/items/7`.
    pub path: String,
    /// The query string without the `?` (`QUERY_STRING`), e.g. `name=ann`.
    pub query: String,
    /// Request headers, in order; names in any case.
    pub headers: Vec<(String, String)>,
    /// Request body, given to the function on standard input.
    pub body: Vec<u8>,
    /// The function's environment variables from its deployment (`K=V`).
    pub env: BTreeMap<String, String>,
    /// Extra command-line arguments from the deployment (after `argv[0]`).
    pub args: Vec<String>,
    /// Hand back standard output as the body, unparsed (batch jobs are commands, not CGI).
    #[serde(default)]
    pub raw_output: bool,
    /// A host directory the module may read and write, seen as `/scratch` (batch jobs' scratch
    /// space). Local to this node, so never sent over the wire; `None` for functions.
    #[serde(skip)]
    pub scratch: Option<PathBuf>,
}

/// A function's response, parsed from its standard output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgiResponse {
    /// HTTP status code (from a `Status:` header; 200 by default).
    pub status: u16,
    /// Response headers, in the order written, without `Status`.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
    /// What the function wrote to standard error (at most
    /// [`MAX_STDERR_BYTES`]).
    pub stderr: Vec<u8>,
    /// Wall-clock time of the call, instantiation included.
    pub duration: Duration,
    /// Metering points the call used (roughly: WebAssembly instructions).
    pub fuel_used: u64,
}

impl CgiResponse {
    /// The value of the first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Where [`FunctionRuntime::load`] found the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheOutcome {
    /// Already loaded in this process.
    MemoryHit,
    /// Deserialized from the on-disk artifact cache (no compilation).
    DiskHit,
    /// Validated and compiled now (a cold start), then written to the cache.
    Compiled,
}

/// A validated, compiled module, ready for [`FunctionRuntime::invoke`].
/// Cheap to clone.
#[derive(Clone)]
pub struct LoadedModule {
    hash: [u8; 32],
    module: Module,
    /// Whether its calls have been short enough to run inline (shared by all clones).
    inline: Arc<InlineHistory>,
}

impl LoadedModule {
    /// The blake3 hash of the module's WebAssembly bytes.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }
}

impl fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedModule")
            .field("hash", &hex::encode(self.hash))
            .finish_non_exhaustive()
    }
}

/// Errors creating a [`FunctionRuntime`].
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The artifact cache directory could not be created.
    #[error("cannot create the function artifact cache directory {path}: {source}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The runtime's helper thread pool could not be started.
    #[error("cannot start the function runtime's task threads: {0}")]
    TaskRuntime(#[source] io::Error),
}

/// Why a module could not be loaded or a call did not produce a response.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The bytes are not a valid WebAssembly module.
    #[error("not a valid WebAssembly module: {0}")]
    NotWasm(String),
    /// The module is valid WebAssembly but does not export `_start`.
    #[error(
        "the module has no `_start` function taking and returning nothing; a function must be a WASI command (e.g. a Rust binary built for wasm32-wasip1)"
    )]
    NoStart,
    /// The module imports something other than a WASI preview 1 function.
    #[error(
        "the module imports `{module}.{name}`, which this runtime does not provide (only `wasi_snapshot_preview1` functions are available)"
    )]
    UnknownImport {
        /// Import module name.
        module: String,
        /// Imported item name.
        name: String,
    },
    /// The bytes do not hash to the hash they were loaded under.
    #[error("module bytes hash to {actual}, not to the expected {expected}")]
    HashMismatch {
        /// The hash the caller gave (hex).
        expected: String,
        /// The blake3 hash of the bytes (hex).
        actual: String,
    },
    /// Compilation failed for a reason other than invalid input.
    #[error("compiling the module failed: {0}")]
    Compile(String),
    /// The WASI environment could not be set up (e.g. an environment
    /// variable name containing `=` or a NUL byte).
    #[error("cannot set up the function's WASI environment: {0}")]
    Setup(String),
    /// The module could not be instantiated.
    #[error("instantiating the module failed: {message}")]
    Instantiate {
        /// What failed.
        message: String,
        /// Standard error written so far.
        stderr: Vec<u8>,
    },
    /// The call ran past its timeout or used up its CPU budget.
    #[error("the function did not finish within its time limit of {limit:?}")]
    Timeout {
        /// The timeout.
        limit: Duration,
        /// Standard error written so far.
        stderr: Vec<u8>,
    },
    /// The function needed more memory than its limit.
    #[error("the function exceeded its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The limit in bytes.
        limit: u64,
        /// Standard error written so far.
        stderr: Vec<u8>,
    },
    /// The function trapped (e.g. panicked) or exited with a non-zero code.
    #[error("the function failed: {message}")]
    Trap {
        /// The trap message, or `exit code N`.
        message: String,
        /// Standard error written so far.
        stderr: Vec<u8>,
    },
    /// The function's output is not a valid CGI response.
    #[error("the function's output is not a valid CGI response: {0}")]
    BadOutput(String),
    /// The function wrote more than [`MAX_STDOUT_BYTES`] to standard output.
    #[error("the function's response exceeds {limit} bytes")]
    OutputTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A failure of the runtime itself (not of the function).
    #[error("function runtime failure: {0}")]
    Internal(String),
}

impl InvokeError {
    /// The HTTP status a gateway should answer with: 504 for a timeout, 500
    /// for failures of the runtime or the environment setup, 502 for
    /// everything the function (or its module) is to blame for.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Timeout { .. } => 504,
            Self::Setup(_) | Self::Internal(_) | Self::HashMismatch { .. } => 500,
            Self::NotWasm(_)
            | Self::NoStart
            | Self::UnknownImport { .. }
            | Self::Compile(_)
            | Self::Instantiate { .. }
            | Self::MemoryLimit { .. }
            | Self::Trap { .. }
            | Self::BadOutput(_)
            | Self::OutputTooLarge { .. } => 502,
        }
    }

    /// The standard error the function wrote before failing, if it ran.
    pub fn stderr(&self) -> Option<&[u8]> {
        match self {
            Self::Instantiate { stderr, .. }
            | Self::Timeout { stderr, .. }
            | Self::MemoryLimit { stderr, .. }
            | Self::Trap { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// Runs WebAssembly functions; one per node, shared by all calls.
pub struct FunctionRuntime {
    /// Engine holding every loaded module's code; modules are deserialized
    /// into it, and each call's store uses a clone of it (same code, own
    /// tunables).
    engine: Engine,
    cache_dir: PathBuf,
    /// Suffix of artifact file names: which engine, version, target and
    /// metering produced them.
    engine_key: String,
    modules: Mutex<HashMap<[u8; 32], LoadedModule>>,
    wasi_runtime: Arc<PluggableRuntime>,
    /// Owns the threads behind `wasi_runtime`'s task manager (timers,
    /// background tasks). `None` only during drop.
    tasks: Option<tokio::runtime::Runtime>,
    temp_counter: AtomicU64,
    /// Call threads still running after their caller got a timeout.
    runaway: Arc<AtomicUsize>,
    /// The threads calls run on, reused from call to call.
    threads: CallThreads,
    /// Linear memories, reused from call to call.
    memory_pool: Arc<MemoryPool>,
}

impl fmt::Debug for FunctionRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FunctionRuntime")
            .field("cache_dir", &self.cache_dir)
            .field("engine_key", &self.engine_key)
            .finish_non_exhaustive()
    }
}

impl Drop for FunctionRuntime {
    fn drop(&mut self) {
        // Safe in async contexts too, unlike dropping a Runtime.
        if let Some(tasks) = self.tasks.take() {
            tasks.shutdown_background();
        }
    }
}

impl FunctionRuntime {
    /// The WASI task runtime's handle (host file systems run their I/O on it).
    fn tasks_handle(&self) -> tokio::runtime::Handle {
        self.tasks
            .as_ref()
            .expect("the task runtime lives until drop")
            .handle()
            .clone()
    }

    /// A runtime whose compiled artifacts live in `cache_dir` (created if
    /// missing; it should be inside the node's own data dir, since artifacts
    /// are trusted machine code).
    pub fn new(cache_dir: &Path) -> Result<Self, RuntimeError> {
        fs::create_dir_all(cache_dir).map_err(|source| RuntimeError::CacheDir {
            path: cache_dir.to_owned(),
            source,
        })?;
        let tasks = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("meshwork-wasi")
            .enable_all()
            .build()
            .map_err(RuntimeError::TaskRuntime)?;
        // Loading and running needs no compiler: modules are compiled by a
        // fresh metering engine each (see `compile`) and deserialized here.
        let engine = Engine::headless();
        let mut wasi_runtime =
            PluggableRuntime::new(Arc::new(TokioTaskManager::new(tasks.handle().clone())));
        wasi_runtime.set_engine(engine.clone());
        Ok(Self {
            engine_key: engine_key(&engine),
            engine,
            cache_dir: cache_dir.to_owned(),
            modules: Mutex::new(HashMap::new()),
            wasi_runtime: Arc::new(wasi_runtime),
            tasks: Some(tasks),
            temp_counter: AtomicU64::new(0),
            runaway: Arc::new(AtomicUsize::new(0)),
            threads: CallThreads::default(),
            memory_pool: Arc::new(MemoryPool::new()),
        })
    }

    /// Where the compiled artifact of the module with this hash is cached:
    /// `<cache_dir>/<blake3 hex>-<engine key>.bin`.
    pub fn artifact_path(&self, hash: [u8; 32]) -> PathBuf {
        self.cache_dir
            .join(format!("{}-{}.bin", hex::encode(hash), self.engine_key))
    }

    /// Whether the module with this hash is loaded in memory or has a
    /// compiled artifact on disk (so loading it is not a cold start).
    pub fn has_artifact(&self, hash: [u8; 32]) -> bool {
        self.lock_modules().contains_key(&hash) || self.artifact_path(hash).is_file()
    }

    /// The module with this hash, if it is already loaded in memory.
    pub fn cached(&self, hash: [u8; 32]) -> Option<LoadedModule> {
        self.lock_modules().get(&hash).cloned()
    }

    /// How many call threads are still running although their caller already
    /// got [`InvokeError::Timeout`]. At the deadline the call's WASI process
    /// is killed, which ends it at its next system call (or wakes it from a
    /// sleep), and its CPU budget ends pure computation; this gauge shows
    /// calls that take long to reach either (e.g. loops of huge bulk memory
    /// copies, which metering undercharges). Worth exporting as a metric.
    pub fn runaway_calls(&self) -> usize {
        self.runaway.load(Ordering::SeqCst)
    }

    /// Drops the in-memory copy of a module (e.g. when its function is
    /// deleted); the artifact on disk stays.
    pub fn forget(&self, hash: [u8; 32]) {
        self.lock_modules().remove(&hash);
    }

    /// Loads the module whose bytes are `wasm` and whose blake3 hash is
    /// `hash`: from memory, else from the artifact cache on disk, else by
    /// validating and compiling it (and caching the artifact). Returns where
    /// it came from.
    ///
    /// Validation refuses bytes that are not WebAssembly
    /// ([`InvokeError::NotWasm`]), modules without a `_start` function
    /// ([`InvokeError::NoStart`]) and modules importing anything but WASI
    /// preview 1 functions ([`InvokeError::UnknownImport`]). A corrupt or
    /// incompatible artifact file is deleted and the module recompiled.
    /// Failing to write the artifact only logs a warning.
    ///
    /// Blocking (compilation takes tens of milliseconds for small modules,
    /// more for large ones): call it from a blocking thread. Two concurrent
    /// cold loads of the same module both compile; the result is the same.
    pub fn load(
        &self,
        hash: [u8; 32],
        wasm: &[u8],
    ) -> Result<(LoadedModule, CacheOutcome), InvokeError> {
        if let Some(loaded) = self.cached(hash) {
            return Ok((loaded, CacheOutcome::MemoryHit));
        }
        let actual = blake3::hash(wasm);
        if *actual.as_bytes() != hash {
            return Err(InvokeError::HashMismatch {
                expected: hex::encode(hash),
                actual: actual.to_hex().to_string(),
            });
        }
        let path = self.artifact_path(hash);
        let (module, outcome) = match self.read_artifact(&path) {
            Ok(Some(module)) => (module, CacheOutcome::DiskHit),
            Ok(None) => (self.compile(hash, wasm, &path)?, CacheOutcome::Compiled),
            Err(reason) => {
                tracing::warn!(
                    artifact = %path.display(),
                    %reason,
                    "discarding unusable function artifact; recompiling"
                );
                if let Err(err) = fs::remove_file(&path)
                    && err.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(artifact = %path.display(), %err, "cannot delete artifact");
                }
                (self.compile(hash, wasm, &path)?, CacheOutcome::Compiled)
            }
        };
        let loaded = LoadedModule {
            hash,
            module,
            inline: Arc::default(),
        };
        let loaded = self.lock_modules().entry(hash).or_insert(loaded).clone();
        Ok((loaded, outcome))
    }

    /// Runs the module's `_start` for one request under `limits` and parses
    /// its output as a CGI response (see the module docs for the interface).
    ///
    /// Blocking: the call runs on a call thread of its own (reused from call
    /// to call, see [`super::call_threads`]), and this waits at most
    /// `limits.timeout` for it. After a timeout the thread is left to its
    /// call; its CPU budget ends it shortly after.
    pub fn invoke(
        &self,
        module: &LoadedModule,
        req: CgiRequest,
        limits: &Limits,
    ) -> Result<CgiResponse, InvokeError> {
        self.invoke_cancellable(module, req, limits, &AtomicBool::new(false))
    }

    /// [`FunctionRuntime::invoke`], also ended early (as a timeout) once `cancel` turns
    /// true: the call is killed as at its deadline. Checked every 100 ms.
    pub fn invoke_cancellable(
        &self,
        module: &LoadedModule,
        req: CgiRequest,
        limits: &Limits,
        cancel: &AtomicBool,
    ) -> Result<CgiResponse, InvokeError> {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let call = self.start(module, req, limits, Instant::now(), move |outcome| {
            done_tx.send(outcome).is_ok()
        })?;
        let deadline = call.started + limits.timeout;
        let outcome = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match done_rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(outcome) => break outcome,
                Err(mpsc::RecvTimeoutError::Timeout)
                    if Instant::now() < deadline && !cancel.load(Ordering::SeqCst) =>
                {
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Counted before `done_rx` is dropped (at return), so the
                    // thread's decrement always comes after this increment.
                    self.abandon(&call);
                    break Err(Failure::Exhausted);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(panicked()),
            }
        };
        self.finish(call, outcome, limits)
    }

    /// [`FunctionRuntime::invoke`] for async callers: waits for the call thread without
    /// holding a thread of its own. If the returned future is dropped before the call ends
    /// (its client went away), the call runs on to its end and counts as a runaway until
    /// then; at the deadline it is killed.
    ///
    /// A call of a module whose calls have been short runs inline instead, on the task's
    /// own thread, within a budget of [`INLINE_POINTS`] and without waiting in WASI; one
    /// that would go beyond starts over on a call thread (see [`InlineHistory`]).
    pub async fn invoke_async(
        &self,
        module: &LoadedModule,
        req: CgiRequest,
        limits: &Limits,
    ) -> Result<CgiResponse, InvokeError> {
        let started = Instant::now();
        if let Some(answer) = self.try_inline(module, &req, limits, started) {
            return answer;
        }
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        let call = self.start(module, req, limits, started, move |outcome| {
            done_tx.send(outcome).is_ok()
        })?;
        // A dropped future makes the call a runaway, counted before `done_rx` goes (locals
        // drop in reverse order).
        let mut waiting = WaitGuard {
            runaway: &self.runaway,
            waiting: true,
        };
        let left = (call.started + limits.timeout).saturating_duration_since(Instant::now());
        let waited = tokio::time::timeout(left, &mut done_rx).await;
        waiting.waiting = false;
        let outcome = match waited {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => return Err(panicked()),
            Err(_) => {
                self.abandon(&call);
                Err(Failure::Exhausted)
            }
        };
        self.finish(call, outcome, limits)
    }

    /// Runs the call on this thread if `module`'s calls have been short and this one is
    /// too: `None` if it is not tried, or turns out to need more than [`INLINE_POINTS`]
    /// or to wait in WASI (`poll_oneoff`), in which case its output is dropped and the
    /// caller starts it over on a call thread. Calls with host files (a scratch
    /// directory) or a body over [`INLINE_MAX_BODY`] are not tried.
    fn try_inline(
        &self,
        module: &LoadedModule,
        req: &CgiRequest,
        limits: &Limits,
        started: Instant,
    ) -> Option<Result<CgiResponse, InvokeError>> {
        if req.scratch.is_some() || req.body.len() > INLINE_MAX_BODY || !module.inline.take_turn() {
            return None;
        }
        let full = limits.fuel_budget();
        let budget = full.min(INLINE_POINTS);
        let (call, started_call) =
            match self.prepare(module, req.clone(), limits, started, budget, true) {
                Ok(prepared) => prepared,
                Err(err) => return Some(Err(err)),
            };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || call.run()));
        let took = started.elapsed();
        // Not timed: a spent store zeroes all its memories as it drops, every so many calls.
        CallStore::retire_if_spent();
        let Ok(outcome) = outcome else {
            module.inline.go_threaded();
            return Some(Err(panicked()));
        };
        let start_over = match &outcome {
            Err(Failure::NeedsThread) => true,
            Err(Failure::Exhausted) => budget < full,
            _ => false,
        };
        let slow = module.inline.record(took > INLINE_MAX_WALL);
        if start_over || slow {
            tracing::debug!(
                module = %hex::encode(module.hash),
                ?took,
                start_over,
                "function calls go to call threads for a while"
            );
            module.inline.go_threaded();
        }
        if start_over {
            return None;
        }
        Some(self.finish(started_call, outcome, limits))
    }

    /// Starts a call on a call thread; `deliver` hands its outcome to the waiting caller and
    /// says whether the caller was still there. The deadline counts from `started`.
    fn start(
        &self,
        module: &LoadedModule,
        req: CgiRequest,
        limits: &Limits,
        started: Instant,
        deliver: impl FnOnce(Result<u64, Failure>) -> bool + Send + 'static,
    ) -> Result<StartedCall, InvokeError> {
        let (call, started_call) =
            self.prepare(module, req, limits, started, limits.fuel_budget(), false)?;
        let runaway = self.runaway.clone();
        self.threads
            .run(move || {
                // The caller is gone after a timeout: this was a runaway.
                if !deliver(call.run()) {
                    runaway.fetch_sub(1, Ordering::SeqCst);
                }
                // After the answer is out: a store that served its last call goes now
                // (zeroing its memories), not at the start of the thread's next call.
                CallStore::retire_if_spent();
            })
            .map_err(|err| InvokeError::Internal(format!("cannot start a call thread: {err}")))?;
        Ok(started_call)
    }

    /// A call ready to run (with `budget` metering points; `inline`: on an async task's
    /// thread), and what its caller keeps of it.
    fn prepare(
        &self,
        module: &LoadedModule,
        req: CgiRequest,
        limits: &Limits,
        started: Instant,
        budget: u64,
        inline: bool,
    ) -> Result<(Call, StartedCall), InvokeError> {
        let raw_output = req.raw_output;
        let scratch = req.scratch.clone();
        let env = cgi_environment(&req);
        for (key, value) in &env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return Err(InvokeError::Setup(format!(
                    "environment variable {key:?} has an empty name, or a `=` or NUL byte in it"
                )));
            }
        }
        let stdout = Capture::new(MAX_STDOUT_BYTES, true);
        let stderr = Capture::new(MAX_STDERR_BYTES, false);
        let memory_hit = Arc::new(AtomicBool::new(false));
        let kill = Arc::new(KillSwitch::default());
        let call = Call {
            engine: self.engine.clone(),
            module: module.module.clone(),
            module_hash: module.hash(),
            wasi_runtime: self.wasi_runtime.clone(),
            args: req.args,
            env,
            stdin: Body::new(req.body),
            stdout: stdout.clone(),
            stderr: stderr.clone(),
            max_pages: limits.max_pages(),
            memory_hit: memory_hit.clone(),
            memory_pool: self.memory_pool.clone(),
            budget,
            kill: kill.clone(),
            scratch,
            tasks: self.tasks_handle(),
            inline,
        };
        let started_call = StartedCall {
            started,
            raw_output,
            stdout,
            stderr,
            memory_hit,
            kill,
        };
        Ok((call, started_call))
    }

    /// The deadline of `call` passed: it is killed, and a runaway until its thread ends.
    fn abandon(&self, call: &StartedCall) {
        self.runaway.fetch_add(1, Ordering::SeqCst);
        call.kill.kill();
    }

    /// Turns a call's outcome and output into the answer.
    fn finish(
        &self,
        call: StartedCall,
        outcome: Result<u64, Failure>,
        limits: &Limits,
    ) -> Result<CgiResponse, InvokeError> {
        let stderr_bytes = call.stderr.take();
        let fuel_used = match outcome {
            Ok(fuel_used) => fuel_used,
            Err(failure) => {
                return Err(failure.into_error(
                    limits,
                    call.memory_hit.load(Ordering::SeqCst),
                    call.stdout.overflowed(),
                    stderr_bytes,
                ));
            }
        };
        if call.stdout.overflowed() {
            return Err(InvokeError::OutputTooLarge {
                limit: MAX_STDOUT_BYTES,
            });
        }
        let (status, headers, body) = if call.raw_output {
            (200, Vec::new(), call.stdout.take())
        } else {
            parse_cgi_output(call.stdout.take())?
        };
        Ok(CgiResponse {
            status,
            headers,
            body,
            stderr: stderr_bytes,
            duration: call.started.elapsed(),
            fuel_used,
        })
    }

    fn lock_modules(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], LoadedModule>> {
        self.modules.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Validates and compiles `wasm`, writes the artifact to `path` and
    /// returns the module loaded into the shared engine.
    fn compile(&self, hash: [u8; 32], wasm: &[u8], path: &Path) -> Result<Module, InvokeError> {
        if !wasmer::is_wasm(wasm) {
            return Err(InvokeError::NotWasm(
                "the bytes do not start with the WebAssembly magic number `\\0asm`".to_owned(),
            ));
        }
        let started = Instant::now();
        let compiled = Module::new(&metering_engine(), wasm).map_err(|err| match err {
            CompileError::Wasm(_) | CompileError::Validate(_) => {
                InvokeError::NotWasm(err.to_string())
            }
            other => InvokeError::Compile(other.to_string()),
        })?;
        check_interface(&compiled)?;
        let artifact = compiled
            .serialize()
            .map_err(|err| InvokeError::Compile(format!("cannot serialize the artifact: {err}")))?;
        drop(compiled);
        tracing::debug!(
            module = %hex::encode(hash),
            elapsed = ?started.elapsed(),
            artifact_bytes = artifact.len(),
            "compiled function module"
        );
        if let Err(err) = self.write_artifact(path, &artifact) {
            tracing::warn!(artifact = %path.display(), %err, "cannot cache the function artifact");
        }
        deserialize_artifact(&self.engine, &artifact).map_err(|err| {
            InvokeError::Internal(format!("cannot load the artifact just compiled: {err}"))
        })
    }

    /// The cached module at `path`: `Ok(None)` if there is none, `Err` with
    /// the reason if the file is unusable.
    fn read_artifact(&self, path: &Path) -> Result<Option<Module>, String> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(format!("cannot read it: {err}")),
        };
        if bytes.len() < ARTIFACT_HEADER_LEN || !bytes.starts_with(ARTIFACT_MAGIC) {
            return Err("it does not start with the artifact header".to_owned());
        }
        let (header, payload) = bytes.split_at(ARTIFACT_HEADER_LEN);
        if blake3::hash(payload).as_bytes() != &header[ARTIFACT_MAGIC.len()..] {
            return Err("its checksum does not match (corrupt file)".to_owned());
        }
        deserialize_artifact(&self.engine, payload)
            .map(Some)
            .map_err(|err| format!("wasmer cannot deserialize it: {err}"))
    }

    /// Writes an artifact atomically: temp file, fsync, rename, fsync dir.
    fn write_artifact(&self, path: &Path, artifact: &[u8]) -> io::Result<()> {
        let file_name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("artifact");
        let temp = self.cache_dir.join(format!(
            ".{file_name}.tmp-{}-{}",
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut file = fs::File::create(&temp)?;
            file.write_all(ARTIFACT_MAGIC)?;
            file.write_all(blake3::hash(artifact).as_bytes())?;
            file.write_all(artifact)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&temp, path)?;
            fs::File::open(&self.cache_dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }
}

/// Loads a serialized artifact into `engine`.
///
/// This is the one place where the runtime trusts bytes as machine code.
#[allow(unsafe_code)]
fn deserialize_artifact(
    engine: &Engine,
    artifact: &[u8],
) -> Result<Module, wasmer::DeserializeError> {
    // SAFETY: `Module::deserialize` maps the bytes as executable code, so
    // they must be an artifact produced by `Module::serialize` of a
    // compatible engine. They are: either they were serialized by this
    // process a moment ago (`compile`), or they come from the artifact cache,
    // which only this node writes, into its own data directory, atomically
    // (temp file + fsync + rename), under a name keyed by the module's
    // content hash and by the engine key (wasmer version, compiler, target
    // CPU features, metering version), and whose blake3 checksum in the file
    // header was verified just before this call, so a torn or corrupted file
    // is rejected rather than executed.
    unsafe { Module::deserialize(engine, artifact) }
}

/// A fresh Cranelift engine with metering. Each engine compiles exactly one
/// module: wasmer's `Metering` middleware keeps per-module state and refuses
/// to be reused.
fn metering_engine() -> Engine {
    let mut compiler = Cranelift::default();
    compiler.push_middleware(Arc::new(Metering::new(INSTANTIATION_POINTS, metering_cost)));
    // Must come after `Metering`, whose globals it charges.
    compiler.push_middleware(Arc::new(BulkMetering::default()));
    EngineBuilder::new(compiler)
        .set_features(Some(wasm_features()))
        .into()
}

/// The WebAssembly features functions may use: wasmer's defaults without
/// threads (shared memory), memory64 and multi-memory, none of which WASI
/// preview 1 commands need (and `BulkMetering` assumes 32-bit lengths).
fn wasm_features() -> Features {
    let mut features = Features::new();
    features.threads(false).memory64(false).multi_memory(false);
    features
}

/// Bulk memory operations cost one metering point per `2^this` bytes: a
/// large copy runs at about the points per second of ordinary code.
const BULK_BYTES_PER_POINT_LOG2: i64 = 2;

/// Metering points a direct call of an imported (WASI host) function costs on top of
/// the call itself: about a microsecond of the budget, what a small host call takes.
/// `Metering` charges every call the same, so a loop of cheap instructions around a
/// host call would otherwise run many times longer than its points say (which matters
/// most for inline calls, see [`INLINE_POINTS`]). Calls through a table are charged as
/// ordinary calls.
const HOST_CALL_POINTS: u64 = POINTS_PER_SECOND / 1_000_000;

/// Charges bulk memory operations (`memory.copy`, `memory.fill`,
/// `memory.init`) one metering point per 4 bytes, and direct calls of imported
/// functions [`HOST_CALL_POINTS`], from the `Metering` middleware's points, so
/// that a loop of huge copies or of host calls cannot run far past its budget.
/// (`Metering` charges per operator and cannot see the length or the callee.)
#[derive(Debug, Default)]
struct BulkMetering {
    globals: Mutex<Option<BulkGlobals>>,
}

/// Global indexes used by [`BulkMetering`].
#[derive(Debug, Clone, Copy)]
struct BulkGlobals {
    /// `Metering`'s remaining points (i64).
    remaining: u32,
    /// `Metering`'s "exhausted" flag (i32).
    exhausted: u32,
    /// Scratch: the operation's length (i32).
    length: u32,
    /// Scratch: the operation's cost (i64).
    cost: u32,
    /// Functions below this index are imported.
    imported_functions: u32,
}

impl BulkGlobals {
    /// Charges the `cost` global's points: if remaining < cost { exhausted = 1; trap };
    /// remaining -= cost.
    fn charge<'a>(&self) -> [Operator<'a>; 12] {
        let Self {
            remaining,
            exhausted,
            cost,
            ..
        } = *self;
        [
            Operator::GlobalGet {
                global_index: remaining,
            },
            Operator::GlobalGet { global_index: cost },
            Operator::I64LtU,
            Operator::If {
                blockty: BlockType::Empty,
            },
            Operator::I32Const { value: 1 },
            Operator::GlobalSet {
                global_index: exhausted,
            },
            Operator::Unreachable,
            Operator::End,
            Operator::GlobalGet {
                global_index: remaining,
            },
            Operator::GlobalGet { global_index: cost },
            Operator::I64Sub,
            Operator::GlobalSet {
                global_index: remaining,
            },
        ]
    }
}

impl ModuleMiddleware for BulkMetering {
    fn generate_function_middleware<'a>(
        &self,
        _: LocalFunctionIndex,
    ) -> Box<dyn FunctionMiddleware<'a> + 'a> {
        let globals = self
            .globals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expect("wasmer calls transform_module_info before generating function middlewares");
        Box::new(FunctionBulkMetering { globals })
    }

    fn transform_module_info(&self, info: &mut ModuleInfo) -> Result<(), MiddlewareError> {
        let metering_global = |name: &str| match info.exports.get(name) {
            Some(ExportIndex::Global(index)) => Ok(index.as_u32()),
            _ => Err(MiddlewareError::new(
                "BulkMetering",
                format!("no `{name}` global: the Metering middleware must come first"),
            )),
        };
        let remaining = metering_global("wasmer_metering_remaining_points")?;
        let exhausted = metering_global("wasmer_metering_points_exhausted")?;
        let length = info
            .globals
            .push(GlobalType::new(Type::I32, Mutability::Var));
        info.global_initializers.push(GlobalInit::I32Const(0));
        let cost = info
            .globals
            .push(GlobalType::new(Type::I64, Mutability::Var));
        info.global_initializers.push(GlobalInit::I64Const(0));
        *self.globals.lock().unwrap_or_else(PoisonError::into_inner) = Some(BulkGlobals {
            remaining,
            exhausted,
            length: length.as_u32(),
            cost: cost.as_u32(),
            imported_functions: u32::try_from(info.num_imported_functions)
                .map_err(|_| MiddlewareError::new("BulkMetering", "too many imported functions"))?,
        });
        Ok(())
    }
}

#[derive(Debug)]
struct FunctionBulkMetering {
    globals: BulkGlobals,
}

impl<'a> FunctionMiddleware<'a> for FunctionBulkMetering {
    fn feed(
        &mut self,
        operator: Operator<'a>,
        state: &mut MiddlewareReaderState<'a>,
    ) -> Result<(), MiddlewareError> {
        let BulkGlobals {
            length,
            cost,
            imported_functions,
            ..
        } = self.globals;
        if let Operator::Call { function_index } | Operator::ReturnCall { function_index } =
            operator
            && function_index < imported_functions
        {
            state.extend([
                Operator::I64Const {
                    value: HOST_CALL_POINTS as i64,
                },
                Operator::GlobalSet { global_index: cost },
            ]);
            state.extend(self.globals.charge());
        }
        if matches!(
            operator,
            Operator::MemoryCopy { .. } | Operator::MemoryFill { .. } | Operator::MemoryInit { .. }
        ) {
            // The length (an i32, memories being 32-bit) is on top of the
            // stack: stash it, charge it, put it back.
            state.extend([
                Operator::GlobalSet {
                    global_index: length,
                },
                Operator::GlobalGet {
                    global_index: length,
                },
                Operator::I64ExtendI32U,
                Operator::I64Const {
                    value: BULK_BYTES_PER_POINT_LOG2,
                },
                Operator::I64ShrU,
                Operator::GlobalSet { global_index: cost },
            ]);
            state.extend(self.globals.charge());
            state.extend([Operator::GlobalGet {
                global_index: length,
            }]);
        }
        state.push_operator(operator);
        Ok(())
    }
}

/// Cost of one operator, in metering points. Version [`METERING_COST_VERSION`].
///
/// Operators that compile to nothing or to register moves are free, calls
/// cost more, and table operations and `memory.grow` (whose work grows with
/// an operand the cost function cannot see, but which are bounded by the
/// table and memory limits) have a fixed higher cost. Bulk memory operations
/// cost 1 here plus one point per 4 bytes, charged by [`BulkMetering`].
fn metering_cost(operator: &Operator<'_>) -> u64 {
    match operator {
        Operator::Nop
        | Operator::Block { .. }
        | Operator::Loop { .. }
        | Operator::Else
        | Operator::End
        | Operator::Drop
        | Operator::LocalGet { .. }
        | Operator::LocalSet { .. }
        | Operator::LocalTee { .. }
        | Operator::I32Const { .. }
        | Operator::I64Const { .. }
        | Operator::F32Const { .. }
        | Operator::F64Const { .. } => 0,
        Operator::Call { .. }
        | Operator::CallIndirect { .. }
        | Operator::ReturnCall { .. }
        | Operator::ReturnCallIndirect { .. } => 5,
        Operator::MemoryGrow { .. }
        | Operator::TableGrow { .. }
        | Operator::TableFill { .. }
        | Operator::TableCopy { .. }
        | Operator::TableInit { .. } => 100,
        _ => 1,
    }
}

/// Names everything that makes compiled artifacts (in)compatible.
fn engine_key(engine: &Engine) -> String {
    let target = engine.target();
    let description = format!(
        "wasmer {WASMER_VERSION}; compiler cranelift; target {}; cpu {:?}; features {:?}; metering v{METERING_COST_VERSION} with {INSTANTIATION_POINTS} initial points",
        target.triple(),
        target.cpu_features(),
        wasm_features(),
    );
    blake3::hash(description.as_bytes()).to_hex()[..16].to_owned()
}

/// Checks the compiled module's imports and exports against the WAGI
/// contract.
fn check_interface(module: &Module) -> Result<(), InvokeError> {
    for import in module.imports() {
        let is_wasi_function = import.module() == WASI_MODULE
            && WASI_PREVIEW1_FUNCTIONS.contains(&import.name())
            && matches!(import.ty(), ExternType::Function(_));
        if !is_wasi_function {
            return Err(InvokeError::UnknownImport {
                module: import.module().to_owned(),
                name: import.name().to_owned(),
            });
        }
    }
    let has_start = module.exports().any(|export| match export.ty() {
        ExternType::Function(ty) => {
            export.name() == "_start" && ty.params().is_empty() && ty.results().is_empty()
        }
        _ => false,
    });
    if has_start {
        Ok(())
    } else {
        Err(InvokeError::NoStart)
    }
}

/// The environment of one call (see the module docs for the precedence).
fn cgi_environment(req: &CgiRequest) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (name, value) in &req.headers {
        if name.eq_ignore_ascii_case("content-type")
            || name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("proxy")
            || value.contains('\0')
        {
            continue;
        }
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            continue;
        }
        let key = format!("HTTP_{}", name.to_ascii_uppercase().replace('-', "_"));
        env.entry(key)
            .and_modify(|existing: &mut String| {
                existing.push_str(", ");
                existing.push_str(value);
            })
            .or_insert_with(|| value.clone());
    }
    env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let content_type = req
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.clone());
    let meta = [
        ("GATEWAY_INTERFACE", "CGI/1.1".to_owned()),
        ("SERVER_PROTOCOL", "HTTP/1.1".to_owned()),
        ("SERVER_SOFTWARE", "meshwork".to_owned()),
        ("REQUEST_METHOD", req.method.clone()),
        ("PATH_INFO", req.path.clone()),
        ("QUERY_STRING", req.query.clone()),
        ("CONTENT_LENGTH", req.body.len().to_string()),
    ];
    env.extend(meta.into_iter().map(|(k, v)| (k.to_owned(), v)));
    match content_type {
        Some(content_type) => {
            env.insert("CONTENT_TYPE".to_owned(), content_type);
        }
        None => {
            env.remove("CONTENT_TYPE");
        }
    }
    env
}

/// Status, headers and body of a parsed CGI response.
type CgiParts = (u16, Vec<(String, String)>, Vec<u8>);

/// Parses CGI output into status, headers and body (see the module docs).
fn parse_cgi_output(output: Vec<u8>) -> Result<CgiParts, InvokeError> {
    let Some((header_lines, body_start)) = split_header_section(&output) else {
        let headers = vec![("Content-Type".to_owned(), "text/plain".to_owned())];
        return Ok((200, headers, output));
    };
    let mut status = None;
    let mut headers = Vec::new();
    for (name, value) in header_lines {
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(InvokeError::BadOutput(format!(
                "the value of header `{name}` contains a control character"
            )));
        }
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or_default();
            let code = code
                .parse::<u16>()
                .ok()
                .filter(|code| (100..=599).contains(code))
                .ok_or_else(|| {
                    InvokeError::BadOutput(format!(
                        "`Status: {value}` does not start with an HTTP status code (100-599)"
                    ))
                })?;
            status = Some(code);
        } else {
            headers.push((name.to_owned(), value.to_owned()));
        }
    }
    let status = status.unwrap_or_else(|| {
        let redirect = headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("location"));
        if redirect { 302 } else { 200 }
    });
    let mut body = output;
    body.drain(..body_start);
    Ok((status, headers, body))
}

/// Finds a leading CGI header section: lines of `Name: value` ended by an
/// empty line (`\n` or `\r\n` line ends). Returns the parsed lines and where
/// the body starts, or `None` if the output does not begin with one.
fn split_header_section(output: &[u8]) -> Option<(Vec<(&str, &str)>, usize)> {
    let mut lines = Vec::new();
    let mut pos = 0;
    loop {
        let end = pos + output[pos..].iter().position(|&b| b == b'\n')?;
        let line = output[pos..end]
            .strip_suffix(b"\r")
            .unwrap_or(&output[pos..end]);
        pos = end + 1;
        if line.is_empty() {
            return Some((lines, pos));
        }
        let line = std::str::from_utf8(line).ok()?;
        let (name, value) = line.split_once(':')?;
        let is_token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !is_token {
            return None;
        }
        lines.push((name, value.trim()));
    }
}

/// How a call ended badly, before stderr and limits are attached.
#[derive(Debug)]
enum Failure {
    /// Out of metering points, or past the wall-clock deadline.
    Exhausted,
    /// WASI environment setup failed.
    Setup(String),
    /// Instantiation failed.
    Instantiate(String),
    /// `proc_exit` with a non-zero code.
    Exit(i32),
    /// A trap or another runtime error.
    Trap(String),
    /// An inline call tried to wait ([`NeedsThread`]).
    NeedsThread,
}

/// What `poll_oneoff` raises in an inline call: the call would wait, which a task's thread
/// must not, so it starts over on a call thread.
#[derive(Debug, thiserror::Error)]
#[error("an inline call waited in poll_oneoff")]
struct NeedsThread;

impl Failure {
    fn into_error(
        self,
        limits: &Limits,
        memory_hit: bool,
        stdout_overflowed: bool,
        stderr: Vec<u8>,
    ) -> InvokeError {
        match self {
            Self::Exhausted => InvokeError::Timeout {
                limit: limits.timeout,
                stderr,
            },
            Self::Setup(message) => InvokeError::Setup(message),
            Self::NeedsThread => InvokeError::Internal(
                "an inline call waited in WASI and was not started over".to_owned(),
            ),
            _ if memory_hit => InvokeError::MemoryLimit {
                limit: limits.max_pages().0 as u64 * PAGE_SIZE,
                stderr,
            },
            _ if stdout_overflowed => InvokeError::OutputTooLarge {
                limit: MAX_STDOUT_BYTES,
            },
            Self::Instantiate(message) => InvokeError::Instantiate { message, stderr },
            Self::Exit(code) => InvokeError::Trap {
                message: format!("exit code {code}"),
                stderr,
            },
            Self::Trap(message) => InvokeError::Trap { message, stderr },
        }
    }
}

/// What the caller keeps of a call it started (see [`FunctionRuntime::invoke`]).
struct StartedCall {
    started: Instant,
    raw_output: bool,
    stdout: Capture,
    stderr: Capture,
    memory_hit: Arc<AtomicBool>,
    kill: Arc<KillSwitch>,
}

/// Counts a call as a runaway if its async caller is dropped while still waiting for it.
struct WaitGuard<'a> {
    runaway: &'a AtomicUsize,
    waiting: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.waiting {
            self.runaway.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn panicked() -> InvokeError {
    InvokeError::Internal("the call thread ended without a result (it panicked)".to_owned())
}

/// Everything one call needs on its thread.
struct Call {
    engine: Engine,
    module: Module,
    /// The module's blake3 hash (WASI wants a module hash; it would draw a random one).
    module_hash: [u8; 32],
    wasi_runtime: Arc<PluggableRuntime>,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    stdin: Body,
    stdout: Capture,
    stderr: Capture,
    max_pages: Pages,
    memory_hit: Arc<AtomicBool>,
    memory_pool: Arc<MemoryPool>,
    budget: u64,
    kill: Arc<KillSwitch>,
    scratch: Option<PathBuf>,
    tasks: tokio::runtime::Handle,
    /// Runs on an async task's thread, which it must not block (see
    /// [`FunctionRuntime::invoke_async`]).
    inline: bool,
}

/// Lets the invoking thread stop a call's WASI process at the deadline.
#[derive(Debug, Default)]
struct KillSwitch {
    state: Mutex<KillState>,
}

#[derive(Debug, Default)]
struct KillState {
    killed: bool,
    process: Option<WasiProcess>,
}

impl KillSwitch {
    fn lock(&self) -> std::sync::MutexGuard<'_, KillState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the call's process; `false` if the call was already killed.
    fn arm(&self, process: WasiProcess) -> bool {
        let mut state = self.lock();
        if state.killed {
            return false;
        }
        state.process = Some(process);
        true
    }

    fn disarm(&self) {
        self.lock().process = None;
    }

    /// Sends SIGKILL to the process, which makes its next (or current,
    /// blocking) system call exit; marks the call killed if it has not
    /// started yet.
    fn kill(&self) {
        let mut state = self.lock();
        state.killed = true;
        if let Some(process) = state.process.take() {
            process.signal_process(Signal::Sigkill);
        }
    }
}

impl Call {
    /// Instantiates and runs `_start`; returns the metering points used.
    fn run(mut self) -> Result<u64, Failure> {
        // Host file I/O (a scratch directory) runs on the WASI task runtime.
        let tasks = self.tasks.clone();
        let _tasks = tasks.enter();
        let env = self.wasi_env()?;
        let owner = Arc::as_ptr(&self.memory_pool) as usize;
        let reused = CALL_STORE
            .with(|slot| slot.borrow_mut().take())
            .filter(|kept| kept.owner == owner && kept.inline == self.inline && !kept.spent());
        let mut kept = match reused {
            Some(mut kept) => {
                // The previous call's environment goes; the host functions stay.
                *kept.wasi_env.data_mut(&mut kept.store) = env;
                kept
            }
            None => CallStore::new(self.engine, self.memory_pool, env, self.inline),
        };
        kept.calls += 1;
        kept.cap.set(self.max_pages, self.memory_hit);
        let outcome = kept.run(
            &self.module,
            &self.kill,
            self.budget,
            self.scratch.is_some(),
        );
        // A call with host files (a batch attempt's scratch directory) does not leave its
        // environment behind: it goes now, with its mount, before the caller removes the
        // directory.
        if outcome.is_ok() && self.scratch.is_none() {
            // What the kept environment still refers to: the body here, the output
            // taken by the caller (`Capture::take`).
            self.stdin.release();
            CALL_STORE.with(|slot| *slot.borrow_mut() = Some(kept));
        }
        outcome
    }

    /// The call's WASI environment: arguments, variables, standard streams and files
    /// (the arguments, variables and body move into it).
    fn wasi_env(&mut self) -> Result<WasiEnv, Failure> {
        let mut builder = WasiEnv::builder("function")
            .args(std::mem::take(&mut self.args))
            .envs(std::mem::take(&mut self.env))
            .stdin(Box::new(self.stdin.clone()))
            .stdout(Box::new(self.stdout.clone()))
            .stderr(Box::new(self.stderr.clone()))
            .runtime(self.wasi_runtime.clone());
        builder.set_module_hash(wasmer_types::ModuleHash::from_bytes(self.module_hash));
        match &self.scratch {
            None => {
                let no_files: Arc<dyn virtual_fs::FileSystem + Send + Sync> =
                    Arc::new(EmptyFileSystem::default());
                builder = builder.fs(no_files);
            }
            Some(dir) => {
                let setup = |e: &dyn std::fmt::Display| {
                    Failure::Setup(format!("scratch directory {}: {e}", dir.display()))
                };
                let host = virtual_fs::host_fs::FileSystem::new(self.tasks.clone(), dir)
                    .map_err(|e| setup(&e))?;
                let mounts = virtual_fs::MountFileSystem::new();
                mounts
                    .mount(SCRATCH_PATH, Arc::new(host))
                    .map_err(|e| setup(&e))?;
                let files: Arc<dyn virtual_fs::FileSystem + Send + Sync> = Arc::new(mounts);
                builder = builder
                    .fs(files)
                    .preopen_dir(SCRATCH_PATH)
                    .map_err(|e| setup(&e))?;
            }
        }
        builder.build().map_err(|err| match err {
            wasmer_wasix::WasiRuntimeError::Init(err) => Failure::Setup(err.to_string()),
            other => Failure::Instantiate(other.to_string()),
        })
    }
}

/// Calls one store serves before its thread drops it (see [`CallStore`]).
const CALLS_PER_STORE: u32 = 16;

/// Bytes of linear memory (sized at their calls' ends) a store holds in its finished
/// instances before its thread drops it (see [`CallStore`]).
const RETAINED_PER_STORE: u64 = 16 * 1024 * 1024;

/// The metering budget of an inline call (see [`InlineHistory`]): about a millisecond.
pub const INLINE_POINTS: u64 = POINTS_PER_SECOND / 1_000;

/// Largest request body an inline call is tried with (it is copied, for a start over).
pub const INLINE_MAX_BODY: usize = 64 * 1024;

/// An inline call that took longer than this (instantiation and memory zeroing
/// included, which metering does not see) counts as slow; [`SLOW_INLINE_CALLS`] in a
/// row send its module's calls to call threads.
const INLINE_MAX_WALL: Duration = Duration::from_millis(2);

/// Slow inline calls of a module in a row that send its calls to call threads: one
/// could be the thread being preempted on a busy machine.
const SLOW_INLINE_CALLS: u32 = 3;

/// Calls of a module that go to call threads after one of its calls was not short.
const THREADED_CALLS_AFTER_LONG: u32 = 1024;

/// Whether a module's calls run inline, on the async task that asks for them, or on
/// a call thread ([`super::call_threads`]).
///
/// A call thread lets the caller answer at the deadline whatever the call does, but
/// handing the call over and its answer back costs two cross-thread wake-ups, about a
/// quarter of a warm `hello` call's CPU. Most functions answer in microseconds, so
/// [`FunctionRuntime::invoke_async`] first runs a call inline, with a budget of
/// [`INLINE_POINTS`] (host calls charged [`HOST_CALL_POINTS`] each) and with a
/// `poll_oneoff` that raises [`NeedsThread`] instead of waiting. A call that runs out
/// of that budget or would wait is started over on a call thread with its full budget
/// and deadline (its output so far is dropped; a function without host files has no
/// other effects), and so are its module's next [`THREADED_CALLS_AFTER_LONG`] calls,
/// as after [`SLOW_INLINE_CALLS`] inline calls in a row that took longer than
/// [`INLINE_MAX_WALL`]. So a task's thread is held for at most about a millisecond of
/// guest code per call, and a long call costs its module that much extra once per
/// [`THREADED_CALLS_AFTER_LONG`] calls.
#[derive(Debug, Default)]
pub struct InlineHistory {
    /// Calls still to send to call threads before trying inline again.
    threaded_left: AtomicU32,
    /// The module's latest inline calls that were slow, in a row.
    slow_in_a_row: AtomicU32,
}

impl InlineHistory {
    /// Whether this call may run inline (counts one threaded call down if not).
    fn take_turn(&self) -> bool {
        if self.threaded_left.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let _ = self
            .threaded_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        false
    }

    /// Records whether an inline call was slow; true when enough were, in a row, that
    /// the module's calls should go to call threads.
    fn record(&self, slow: bool) -> bool {
        if !slow {
            // Read first: a write per call would bounce the cache line between cores.
            if self.slow_in_a_row.load(Ordering::Relaxed) != 0 {
                self.slow_in_a_row.store(0, Ordering::Relaxed);
            }
            return false;
        }
        if self.slow_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 < SLOW_INLINE_CALLS {
            return false;
        }
        self.slow_in_a_row.store(0, Ordering::Relaxed);
        true
    }

    /// A call was not short: the next calls go to call threads.
    fn go_threaded(&self) {
        self.threaded_left
            .store(THREADED_CALLS_AFTER_LONG, Ordering::Relaxed);
    }
}

thread_local! {
    /// The store this call thread reuses, between its calls (see [`CallStore`]).
    static CALL_STORE: RefCell<Option<CallStore>> = const { RefCell::new(None) };
}

/// A store that a call thread keeps from one call to the next, with the WASI preview 1
/// host functions already in it: building those (signature registration, an index map
/// of ~45 names) cost about an eighth of a warm call. Each call still gets a fresh WASI
/// environment (put into the same function environment) and a fresh instance, so no
/// state passes from call to call. A store frees nothing until it is dropped, though:
/// every call's instance, with its linear memory, stays in it until then. So a store
/// serves at most [`CALLS_PER_STORE`] calls, goes once its finished instances' memories
/// reach [`RETAINED_PER_STORE`], and serves none after a call that failed or had host files.
struct CallStore {
    /// Which runtime's engine and memory pool the store belongs to (the pool's address).
    owner: usize,
    store: Store,
    wasi_env: WasiFunctionEnv,
    imports: wasmer::Imports,
    /// The current call's memory cap, which the store's tunables read.
    cap: Arc<MemoryCap>,
    calls: u32,
    /// Linear memory of the instances it holds, in bytes.
    retained: u64,
    /// Serves inline calls: `poll_oneoff` raises [`NeedsThread`] instead of waiting.
    inline: bool,
}

impl CallStore {
    fn new(engine: Engine, pool: Arc<MemoryPool>, env: WasiEnv, inline: bool) -> Self {
        let owner = Arc::as_ptr(&pool) as usize;
        let cap = Arc::new(MemoryCap::default());
        // Same compiled code and signature registry as the shared engine, but tunables
        // that apply the current call's memory cap.
        let mut engine = engine;
        engine.set_tunables(LimitingTunables {
            base: BaseTunables::new(),
            cap: cap.clone(),
            pool,
        });
        let mut store = Store::new(engine);
        let wasi_env = WasiFunctionEnv::new(&mut store, env);
        // Only the preview 1 functions (all a module may import, see `check_interface`):
        // `WasiEnvBuilder::instantiate` would create the host functions of every WASI and
        // WASIX version for every call, about a fifth of a warm call's CPU.
        let mut imports =
            generate_import_object_from_env(&mut store, &wasi_env.env, WasiVersion::Snapshot1);
        if inline {
            // The one preview 1 call that waits (sleeps, or for stdin to become readable);
            // the others return at once with no files or sockets around.
            let wait = wasmer::Function::new_typed(
                &mut store,
                |_: i32, _: i32, _: i32, _: i32| -> Result<i32, wasmer::RuntimeError> {
                    Err(wasmer::RuntimeError::user(Box::new(NeedsThread)))
                },
            );
            imports.define("wasi_snapshot_preview1", "poll_oneoff", wait);
        }
        Self {
            owner,
            store,
            wasi_env,
            imports,
            cap,
            calls: 0,
            retained: 0,
            inline,
        }
    }

    /// Whether the store has served all the calls it may.
    fn spent(&self) -> bool {
        self.calls >= CALLS_PER_STORE || self.retained >= RETAINED_PER_STORE
    }

    /// Drops this thread's kept store if it is spent.
    fn retire_if_spent() {
        let spent = CALL_STORE.with(|slot| {
            let mut slot = slot.borrow_mut();
            if slot.as_ref().is_some_and(CallStore::spent) {
                slot.take()
            } else {
                None
            }
        });
        drop(spent);
    }

    /// Instantiates `module` with the current environment and runs its `_start`.
    ///
    /// `with_files`: the call has host files (a scratch directory), which are closed and
    /// flushed when it ends; without, the end only marks the WASI process as exited
    /// (WASI's full exit would also start and abort a 10-second cleanup timer on the
    /// task runtime, a cross-thread wake-up per call, to close nothing but the
    /// in-memory standard streams).
    fn run(
        &mut self,
        module: &Module,
        kill: &KillSwitch,
        budget: u64,
        with_files: bool,
    ) -> Result<u64, Failure> {
        let end = |env: &WasiEnv, code: wasmer_wasix::types::wasi::ExitCode| {
            if with_files {
                env.blocking_on_exit(Some(code));
            } else {
                env.process.terminate(code);
            }
        };
        let Self {
            store, wasi_env, ..
        } = self;
        let instantiated = match wasmer::Instance::new(store, module, &self.imports) {
            Ok(instance) => wasi_env
                .initialize(store, instance.clone())
                .map(|()| instance)
                .map_err(|err| err.to_string()),
            Err(err) => Err(err.to_string()),
        };
        let instance = match instantiated {
            Ok(instance) => instance,
            Err(message) => {
                end(wasi_env.data(store), Errno::Noexec.into());
                return Err(Failure::Instantiate(message));
            }
        };
        if !kill.arm(wasi_env.data(store).process.clone()) {
            end(wasi_env.data(store), Errno::Timedout.into());
            return Err(Failure::Exhausted);
        }
        set_remaining_points(store, &instance, budget);
        let start = instance
            .exports
            .get_function("_start")
            .map_err(|err| Failure::Instantiate(err.to_string()))?
            .clone();
        let result = start.call(store, &[]);
        self.retained += instance
            .exports
            .get_memory("memory")
            .map_or(0, |memory| memory.view(store).data_size());
        let (fuel_used, exhausted) = match get_remaining_points(store, &instance) {
            MeteringPoints::Remaining(left) => (budget.saturating_sub(left), false),
            MeteringPoints::Exhausted => (budget, true),
        };
        let (exit_code, outcome) = match result {
            Ok(_) => (0u16.into(), Ok(fuel_used)),
            Err(_) if exhausted => (Errno::Timedout.into(), Err(Failure::Exhausted)),
            Err(err) if err.is::<NeedsThread>() => {
                (Errno::Noexec.into(), Err(Failure::NeedsThread))
            }
            Err(err) => match err.downcast::<WasiError>() {
                Ok(WasiError::Exit(code)) if code.is_success() => (code, Ok(fuel_used)),
                Ok(WasiError::Exit(code)) => (code, Err(Failure::Exit(code.raw()))),
                Ok(other) => (Errno::Noexec.into(), Err(Failure::Trap(other.to_string()))),
                Err(err) => (Errno::Noexec.into(), Err(Failure::Trap(trap_message(&err)))),
            },
        };
        kill.disarm();
        end(wasi_env.data(store), exit_code);
        outcome
    }
}

/// The memory cap of the call a [`CallStore`] runs now, for its tunables.
#[derive(Debug, Default)]
struct MemoryCap {
    max_pages: AtomicU32,
    /// Set when the call's memory hits the cap (shared with the caller).
    hit: Mutex<Arc<AtomicBool>>,
}

impl MemoryCap {
    fn set(&self, max_pages: Pages, hit: Arc<AtomicBool>) {
        self.max_pages.store(max_pages.0, Ordering::SeqCst);
        *self.hit.lock().unwrap_or_else(PoisonError::into_inner) = hit;
    }

    fn max_pages(&self) -> Pages {
        Pages(self.max_pages.load(Ordering::SeqCst))
    }

    fn hit(&self) -> Arc<AtomicBool> {
        self.hit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A trap's message with the innermost named frames, e.g.
/// `unreachable (in __rust_abort <- main)`.
fn trap_message(err: &wasmer::RuntimeError) -> String {
    let message = err.message();
    let frames: Vec<&str> = err
        .trace()
        .iter()
        .filter_map(|frame| frame.function_name())
        .take(4)
        .collect();
    if frames.is_empty() {
        message
    } else {
        format!("{message} (in {})", frames.join(" <- "))
    }
}

/// Tunables that cap each linear memory at `max_pages` and record a refused
/// allocation or growth in `hit`.
struct LimitingTunables {
    base: BaseTunables,
    /// The running call's cap.
    cap: Arc<MemoryCap>,
    /// Where the module's own linear memory comes from (reused between calls).
    pool: Arc<MemoryPool>,
}

impl LimitingTunables {
    /// The memory type with its maximum lowered to the cap; an error (and
    /// `hit`) if even its minimum is above the cap.
    fn limit(&self, ty: &MemoryType) -> Result<MemoryType, MemoryError> {
        let max_pages = self.cap.max_pages();
        if ty.minimum > max_pages {
            self.cap.hit().store(true, Ordering::SeqCst);
            return Err(MemoryError::MinimumMemoryTooLarge {
                min_requested: ty.minimum,
                max_allowed: max_pages,
            });
        }
        let mut limited = *ty;
        limited.maximum = Some(ty.maximum.map_or(max_pages, |max| max.min(max_pages)));
        Ok(limited)
    }

    fn wrap(&self, memory: VMMemory) -> VMMemory {
        let recording: Box<dyn LinearMemory + Send + Sync + 'static> = Box::new(RecordingMemory {
            inner: memory,
            hit: self.cap.hit(),
        });
        VMMemory::from(recording)
    }
}

#[allow(unsafe_code)]
impl Tunables for LimitingTunables {
    fn memory_style(&self, memory: &MemoryType) -> MemoryStyle {
        // Must match the style the artifact was compiled with: the base's.
        self.base.memory_style(memory)
    }

    fn table_style(&self, table: &TableType) -> TableStyle {
        self.base.table_style(table)
    }

    fn create_host_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
    ) -> Result<VMMemory, MemoryError> {
        let ty = self.limit(ty)?;
        Ok(self.wrap(self.base.create_host_memory(&ty, style)?))
    }

    unsafe fn create_vm_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
        vm_definition_location: NonNull<VMMemoryDefinition>,
    ) -> Result<VMMemory, MemoryError> {
        let ty = self.limit(ty)?;
        // A static memory of our own (all a wasm32 module gets) comes from the pool;
        // anything else from Wasmer.
        // SAFETY: forwarded unchanged from wasmer, which guarantees that
        // `vm_definition_location` points to a valid memory definition.
        let memory = if *style == MemoryStyle::Static && !ty.shared {
            VMMemory::from(
                Box::new(unsafe { self.pool.create(&ty, vm_definition_location)? })
                    as Box<dyn LinearMemory + Send + Sync + 'static>,
            )
        } else {
            unsafe {
                self.base
                    .create_vm_memory(&ty, style, vm_definition_location)?
            }
        };
        Ok(self.wrap(memory))
    }

    fn create_host_table(&self, ty: &TableType, style: &TableStyle) -> Result<VMTable, String> {
        self.base.create_host_table(ty, style)
    }

    unsafe fn create_vm_table(
        &self,
        ty: &TableType,
        style: &TableStyle,
        vm_definition_location: NonNull<VMTableDefinition>,
    ) -> Result<VMTable, String> {
        // SAFETY: forwarded unchanged from wasmer, which guarantees that
        // `vm_definition_location` points to a valid table definition.
        unsafe { self.base.create_vm_table(ty, style, vm_definition_location) }
    }
}

/// A linear memory that records failed growth (the module hit its cap).
#[derive(Debug)]
struct RecordingMemory {
    inner: VMMemory,
    hit: Arc<AtomicBool>,
}

impl LinearMemory for RecordingMemory {
    fn ty(&self) -> MemoryType {
        self.inner.ty()
    }

    fn size(&self) -> Pages {
        self.inner.size()
    }

    fn style(&self) -> MemoryStyle {
        self.inner.style()
    }

    fn grow(&mut self, delta: Pages) -> Result<Pages, MemoryError> {
        let result = self.inner.grow(delta);
        if result.is_err() {
            self.hit.store(true, Ordering::SeqCst);
        }
        result
    }

    fn grow_at_least(&mut self, min_size: u64) -> Result<(), MemoryError> {
        let result = self.inner.grow_at_least(min_size);
        if result.is_err() {
            self.hit.store(true, Ordering::SeqCst);
        }
        result
    }

    fn reset(&mut self) -> Result<(), MemoryError> {
        self.inner.reset()
    }

    fn vmmemory(&self) -> NonNull<VMMemoryDefinition> {
        self.inner.vmmemory()
    }

    fn try_clone(&self) -> Result<Box<dyn LinearMemory + Send + Sync + 'static>, MemoryError> {
        self.inner.try_clone().map(|inner| {
            Box::new(RecordingMemory {
                inner,
                hit: self.hit.clone(),
            }) as Box<dyn LinearMemory + Send + Sync + 'static>
        })
    }

    fn copy(&self) -> Result<Box<dyn LinearMemory + Send + Sync + 'static>, MemoryError> {
        self.inner.copy()
    }
}

/// Standard input: the request body, then end of file. Clones share the body, so the call
/// can let go of it when it ends ([`Body::release`]) though its WASI environment, kept in
/// the thread's store until the next call, still holds a clone.
#[derive(Debug, Clone)]
struct Body {
    state: Arc<Mutex<BodyState>>,
}

#[derive(Debug)]
struct BodyState {
    data: Vec<u8>,
    pos: usize,
}

impl Body {
    fn new(data: Vec<u8>) -> Self {
        Self {
            state: Arc::new(Mutex::new(BodyState { data, pos: 0 })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BodyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Frees the body's bytes; reads see end of file from now on.
    fn release(&self) {
        let mut state = self.lock();
        state.data = Vec::new();
        state.pos = 0;
    }

    fn unread(&self) -> usize {
        let state = self.lock();
        state.data.len() - state.pos
    }
}

impl AsyncRead for Body {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.lock();
        let n = buf.remaining().min(state.data.len() - state.pos);
        buf.put_slice(&state.data[state.pos..state.pos + n]);
        state.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Body {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "standard input is read-only",
        )))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for Body {
    fn start_seek(self: Pin<&mut Self>, _position: io::SeekFrom) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "standard input is not seekable",
        ))
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.lock().pos as u64))
    }
}

impl VirtualFile for Body {
    fn last_accessed(&self) -> u64 {
        0
    }

    fn last_modified(&self) -> u64 {
        0
    }

    fn created_time(&self) -> u64 {
        0
    }

    fn size(&self) -> u64 {
        self.lock().data.len() as u64
    }

    fn set_len(&mut self, _new_size: u64) -> virtual_fs::Result<()> {
        Err(virtual_fs::FsError::PermissionDenied)
    }

    fn unlink(&mut self) -> virtual_fs::Result<()> {
        Ok(())
    }

    fn poll_read_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(self.unread()))
    }

    fn poll_write_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(0))
    }
}

/// Standard output or error: a bounded in-memory buffer shared with the
/// invoking thread, which can read it even while the call still runs.
#[derive(Debug, Clone)]
struct Capture {
    inner: Arc<Mutex<CaptureBuffer>>,
    /// Whether a write past the limit fails (stdout) or is dropped (stderr).
    fail_on_overflow: bool,
}

#[derive(Debug)]
struct CaptureBuffer {
    data: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl Capture {
    fn new(limit: usize, fail_on_overflow: bool) -> Self {
        Self {
            inner: Arc::new(Mutex::new(CaptureBuffer {
                data: Vec::new(),
                limit,
                overflowed: false,
            })),
            fail_on_overflow,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CaptureBuffer> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of what was written so far.
    /// The bytes written so far, taken out (a second call gets only what came after).
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.lock().data)
    }

    fn overflowed(&self) -> bool {
        self.lock().overflowed
    }
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let fail_on_overflow = self.fail_on_overflow;
        let mut inner = self.lock();
        let room = inner.limit - inner.data.len();
        if buf.len() <= room {
            inner.data.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        inner.overflowed = true;
        if fail_on_overflow {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "the function's output exceeds the size limit",
            )))
        } else {
            inner.data.extend_from_slice(&buf[..room]);
            Poll::Ready(Ok(buf.len()))
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Capture {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Nothing to read: end of file.
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for Capture {
    fn start_seek(self: Pin<&mut Self>, _position: io::SeekFrom) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "output is not seekable",
        ))
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.lock().data.len() as u64))
    }
}

impl VirtualFile for Capture {
    fn last_accessed(&self) -> u64 {
        0
    }

    fn last_modified(&self) -> u64 {
        0
    }

    fn created_time(&self) -> u64 {
        0
    }

    fn size(&self) -> u64 {
        self.lock().data.len() as u64
    }

    fn set_len(&mut self, _new_size: u64) -> virtual_fs::Result<()> {
        Err(virtual_fs::FsError::PermissionDenied)
    }

    fn unlink(&mut self) -> virtual_fs::Result<()> {
        Ok(())
    }

    fn poll_read_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(0))
    }

    fn poll_write_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(8192))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::OnceLock;

    /// The example functions' workspace (`<repo>/examples`).
    fn examples_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
    }

    /// Builds the examples once per test process and returns the wasm bytes
    /// of one of them.
    fn example(name: &str) -> Vec<u8> {
        static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let out_dir = BUILT
            .get_or_init(build_examples)
            .as_ref()
            .unwrap_or_else(|msg| panic!("{msg}"));
        let path = out_dir.join(format!("{name}.wasm"));
        fs::read(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
    }

    fn build_examples() -> Result<PathBuf, String> {
        let dir = examples_dir();
        let sysroot = Command::new("rustc")
            .args(["--print", "sysroot"])
            .output()
            .map_err(|err| format!("cannot run rustc: {err}"))?;
        let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
        if !Path::new(&sysroot)
            .join("lib/rustlib/wasm32-wasip1")
            .is_dir()
        {
            return Err(format!(
                "the wasm32-wasip1 target is not installed in {sysroot}; run `rustup target add wasm32-wasip1`"
            ));
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let target_dir = dir.join("target");
        let output = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "--manifest-path",
            ])
            .arg(dir.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            // The examples are their own project: no flags meant for the host build.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .output()
            .map_err(|err| format!("cannot run cargo: {err}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let hint = if stderr.contains("wasm32-wasip1") && stderr.contains("not installed")
                || stderr.contains("can't find crate for `std`")
            {
                "\nrun `rustup target add wasm32-wasip1`"
            } else {
                ""
            };
            return Err(format!(
                "building the example functions failed:\n{stderr}{hint}"
            ));
        }
        Ok(target_dir.join("wasm32-wasip1/release"))
    }

    fn runtime() -> (tempfile::TempDir, FunctionRuntime) {
        let dir = tempfile::tempdir().unwrap();
        let runtime = FunctionRuntime::new(dir.path()).unwrap();
        (dir, runtime)
    }

    fn load(
        runtime: &FunctionRuntime,
        wasm: &[u8],
    ) -> Result<(LoadedModule, CacheOutcome), InvokeError> {
        runtime.load(*blake3::hash(wasm).as_bytes(), wasm)
    }

    fn limits() -> Limits {
        Limits::new(64 * 1024 * 1024, Duration::from_secs(5))
    }

    fn get(query: &str) -> CgiRequest {
        CgiRequest {
            method: "GET".to_owned(),
            path: "/".to_owned(),
            query: query.to_owned(),
            ..CgiRequest::default()
        }
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn hello_answers_with_the_name_from_the_query() {
        let (_dir, runtime) = runtime();
        let (module, outcome) = load(&runtime, &example("hello")).unwrap();
        assert_eq!(outcome, CacheOutcome::Compiled);
        let mut req = get("x=1&name=ann");
        req.method = "POST".to_owned();
        let resp = runtime.invoke(&module, req, &limits()).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("text/plain"));
        let body = text(&resp.body);
        assert!(body.starts_with("hello, ann\n"), "{body:?}");
        assert!(body.contains("method: POST"), "{body:?}");
        assert!(resp.fuel_used > 0);

        let resp = runtime.invoke(&module, get(""), &limits()).unwrap();
        assert!(text(&resp.body).starts_with("hello, world\n"));
    }

    #[test]
    fn echo_returns_the_body_and_captures_stderr() {
        let (_dir, runtime) = runtime();
        let (module, _) = load(&runtime, &example("echo")).unwrap();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let req = CgiRequest {
            method: "PUT".to_owned(),
            body: body.clone(),
            ..CgiRequest::default()
        };
        let resp = runtime.invoke(&module, req, &limits()).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("Content-Type"),
            Some("application/octet-stream")
        );
        assert_eq!(resp.body, body);
        let stderr = text(&resp.stderr);
        assert!(stderr.starts_with("echo: 100000 bytes: "), "{stderr}");
        assert!(
            stderr.ends_with('\n') && stderr.lines().count() == 1,
            "{stderr}"
        );
    }

    #[test]
    fn spin_times_out_and_the_runtime_keeps_working() {
        let (_dir, runtime) = runtime();
        let (spin, _) = load(&runtime, &example("spin")).unwrap();
        let limits = Limits::new(64 * 1024 * 1024, Duration::from_millis(500));
        let started = Instant::now();
        let err = runtime.invoke(&spin, get(""), &limits).unwrap_err();
        let elapsed = started.elapsed();
        assert!(matches!(err, InvokeError::Timeout { .. }), "{err:?}");
        assert_eq!(err.http_status(), 504);
        assert!(elapsed < Duration::from_millis(1500), "took {elapsed:?}");

        let (hello, _) = load(&runtime, &example("hello")).unwrap();
        let resp = runtime.invoke(&hello, get("name=bo"), &limits).unwrap();
        assert!(text(&resp.body).starts_with("hello, bo\n"));
    }

    /// Waits (at most 60 s) until no call runs past its caller any more.
    async fn until_no_runaways(runtime: &FunctionRuntime) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while runtime.runaway_calls() != 0 {
            assert!(Instant::now() < deadline, "runaway calls never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_calls_answer_time_out_and_count_abandoned_calls_as_runaways() {
        let (_dir, runtime) = runtime();
        let (hello, _) = load(&runtime, &example("hello")).unwrap();
        let resp = runtime
            .invoke_async(&hello, get("name=al"), &limits())
            .await
            .unwrap();
        assert!(text(&resp.body).starts_with("hello, al\n"));

        // At the deadline: a timeout; the call ends by its budget and stops counting.
        let (spin, _) = load(&runtime, &example("spin")).unwrap();
        let short = Limits::new(64 * 1024 * 1024, Duration::from_millis(300));
        let err = runtime
            .invoke_async(&spin, get(""), &short)
            .await
            .unwrap_err();
        assert!(matches!(err, InvokeError::Timeout { .. }), "{err:?}");
        until_no_runaways(&runtime).await;

        // A caller that goes away mid-call (its client disconnected): the call runs on as a
        // runaway until its own end, and the next call is not held up by it.
        let long = Limits::new(64 * 1024 * 1024, Duration::from_secs(1));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let gone = async {
            let call = runtime.invoke_async(&spin, get(""), &long);
            let _ = started_tx.send(());
            call.await
        };
        tokio::select! {
            _ = gone => panic!("the spinning call answered"),
            _ = started_rx => {}
        }
        assert_eq!(runtime.runaway_calls(), 1);
        let resp = runtime
            .invoke_async(&hello, get("name=bo"), &limits())
            .await
            .unwrap();
        assert!(text(&resp.body).starts_with("hello, bo\n"));
        until_no_runaways(&runtime).await;
    }

    #[test]
    fn exhausting_the_cpu_budget_is_a_timeout() {
        let (_dir, runtime) = runtime();
        let (spin, _) = load(&runtime, &example("spin")).unwrap();
        // A generous wall clock but the minimum budget: metering ends it.
        let limits = Limits::new(64 * 1024 * 1024, Duration::ZERO);
        assert_eq!(limits.fuel_budget(), 1_000_000);
        let call = Call {
            engine: runtime.engine.clone(),
            module: spin.module.clone(),
            module_hash: spin.hash(),
            wasi_runtime: runtime.wasi_runtime.clone(),
            args: Vec::new(),
            env: BTreeMap::new(),
            stdin: Body::new(Vec::new()),
            stdout: Capture::new(1024, true),
            stderr: Capture::new(1024, false),
            max_pages: limits.max_pages(),
            memory_hit: Arc::new(AtomicBool::new(false)),
            memory_pool: runtime.memory_pool.clone(),
            budget: limits.fuel_budget(),
            kill: Arc::default(),
            scratch: None,
            tasks: runtime.tasks_handle(),
            inline: false,
        };
        assert!(matches!(call.run(), Err(Failure::Exhausted)));
    }

    #[test]
    fn direct_calls_of_host_functions_are_charged() {
        let (_dir, runtime) = runtime();
        let module = |calls: usize| {
            wat::parse_str(format!(
                r#"(module
                    (import "wasi_snapshot_preview1" "args_sizes_get" (func $sizes (param i32 i32) (result i32)))
                    (memory (export "memory") 1)
                    (func (export "_start") {}))"#,
                "(drop (call $sizes (i32.const 0) (i32.const 4)))".repeat(calls)
            ))
            .unwrap()
        };
        let fuel = |calls: usize| {
            let (module, _) = load(&runtime, &module(calls)).unwrap();
            runtime
                .invoke(&module, get(""), &limits())
                .unwrap()
                .fuel_used
        };
        let (none, three) = (fuel(0), fuel(3));
        // Each call: the host call's charge, plus the call operator's own cost.
        assert!(
            (3 * HOST_CALL_POINTS..3 * HOST_CALL_POINTS + 100).contains(&(three - none)),
            "{none} -> {three}"
        );
    }

    /// A module that prints `start`, counts to `count` (about 3 points a step), then
    /// prints ` done`.
    fn counting_module(count: u32) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (data (i32.const 16) "start done")
                (func $print (param i32 i32)
                    (i32.store (i32.const 0) (local.get 0))
                    (i32.store (i32.const 4) (local.get 1))
                    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
                (func (export "_start") (local i32)
                    (call $print (i32.const 16) (i32.const 5))
                    (loop $count
                        (local.set 0 (i32.add (local.get 0) (i32.const 1)))
                        (br_if $count (i32.lt_u (local.get 0) (i32.const {count}))))
                    (call $print (i32.const 21) (i32.const 5))))"#
        ))
        .unwrap()
    }

    #[test]
    fn slow_inline_calls_in_a_row_send_a_module_to_call_threads_for_a_while() {
        let history = InlineHistory::default();
        assert!(history.take_turn());
        // A slow call now and then (a preempted thread) is not enough...
        for _ in 0..3 {
            for _ in 1..SLOW_INLINE_CALLS {
                assert!(!history.record(true));
            }
            assert!(!history.record(false));
        }
        // ...slow calls in a row are.
        for _ in 1..SLOW_INLINE_CALLS {
            assert!(!history.record(true));
        }
        assert!(history.record(true));
        history.go_threaded();
        for _ in 0..THREADED_CALLS_AFTER_LONG {
            assert!(!history.take_turn());
        }
        assert!(history.take_turn());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_async_calls_run_inline_and_others_start_over_on_a_call_thread() {
        let (_dir, runtime) = runtime();
        let (hello, _) = load(&runtime, &example("hello")).unwrap();
        for name in ["al", "bo", "cy"] {
            let resp = runtime
                .invoke_async(&hello, get(&format!("name={name}")), &limits())
                .await
                .unwrap();
            assert!(text(&resp.body).starts_with(&format!("hello, {name}\n")));
        }
        assert_eq!(runtime.threads.started(), 0, "hello ran on a call thread");

        // Past the inline budget: started over on a call thread with the full budget;
        // the first attempt's output is not in the answer.
        let count = u32::try_from(INLINE_POINTS).unwrap();
        let (counting, _) = load(&runtime, &counting_module(count)).unwrap();
        let resp = runtime
            .invoke_async(&counting, get(""), &limits())
            .await
            .unwrap();
        assert_eq!(text(&resp.body), "start done");
        assert_eq!(runtime.threads.started(), 1);
        assert!(resp.fuel_used > INLINE_POINTS, "{}", resp.fuel_used);
        // Its next calls go straight to call threads: one attempt each.
        assert_eq!(
            counting.inline.threaded_left.load(Ordering::Relaxed),
            THREADED_CALLS_AFTER_LONG
        );
        let resp = runtime
            .invoke_async(&counting, get(""), &limits())
            .await
            .unwrap();
        assert_eq!(text(&resp.body), "start done");
        assert_eq!(
            counting.inline.threaded_left.load(Ordering::Relaxed),
            THREADED_CALLS_AFTER_LONG - 1
        );

        // A call that sleeps (`poll_oneoff`) is started over on a call thread too, and
        // its output is there once. Within the inline budget, but waiting.
        let (task, _) = load(&runtime, &example("task")).unwrap();
        let req = CgiRequest {
            args: vec!["--sleep-ms".to_owned(), "20".to_owned()],
            raw_output: true,
            ..get("")
        };
        let resp = runtime.invoke_async(&task, req, &limits()).await.unwrap();
        assert_eq!(text(&resp.body), "task index=- attempt=1\n");
        assert!(resp.duration >= Duration::from_millis(20));
        assert!(task.inline.threaded_left.load(Ordering::Relaxed) > 0);

        // A short call past a long one of another module still runs inline.
        let before = runtime.threads.started();
        let resp = runtime
            .invoke_async(&hello, get("name=di"), &limits())
            .await
            .unwrap();
        assert!(text(&resp.body).starts_with("hello, di\n"));
        assert_eq!(runtime.threads.started(), before);
    }

    #[test]
    fn bulk_memory_operations_are_charged_by_length() {
        let (_dir, runtime) = runtime();
        let fill = |bytes: u32| {
            wat::parse_str(format!(
                r#"(module (memory (export "memory") 32)
                    (func (export "_start") (memory.fill (i32.const 0) (i32.const 7) (i32.const {bytes}))))"#
            ))
            .unwrap()
        };
        let (small, _) = load(&runtime, &fill(0)).unwrap();
        let (large, _) = load(&runtime, &fill(1 << 20)).unwrap();
        let small = runtime
            .invoke(&small, get(""), &limits())
            .unwrap()
            .fuel_used;
        let large = runtime
            .invoke(&large, get(""), &limits())
            .unwrap()
            .fuel_used;
        assert_eq!(large - small, (1 << 20) / 4);
    }

    #[test]
    fn grow_hits_the_memory_limit() {
        let (_dir, runtime) = runtime();
        let (module, _) = load(&runtime, &example("grow")).unwrap();
        let limits = Limits::new(32 * 1024 * 1024, Duration::from_secs(10));
        let err = runtime.invoke(&module, get(""), &limits).unwrap_err();
        match &err {
            InvokeError::MemoryLimit { limit, stderr } => {
                assert_eq!(*limit, 32 * 1024 * 1024);
                assert!(
                    text(stderr).contains("memory allocation"),
                    "{}",
                    text(stderr)
                );
            }
            other => panic!("expected MemoryLimit, got {other:?}"),
        }
        assert_eq!(err.http_status(), 502);
    }

    #[test]
    fn a_call_never_sees_the_memory_of_an_earlier_call() {
        // Linear memories are pooled (`memory_pool`): each call checks that the bytes the
        // previous one wrote, in its first page and in a page it grew, read as zero, and
        // traps otherwise; then writes them and grows further, leaving a bigger memory
        // behind.
        let (_dir, runtime) = runtime();
        let wasm = wat::parse_str(
            r#"(module (memory (export "memory") 2)
                (func (export "_start")
                  (if (i32.ne (i32.load (i32.const 1000)) (i32.const 0)) (then unreachable))
                  (i32.store (i32.const 1000) (i32.const 42))
                  (drop (memory.grow (i32.const 40)))
                  (if (i32.ne (i32.load (i32.const 2621000)) (i32.const 0)) (then unreachable))
                  (i32.store (i32.const 2621000) (i32.const 7))
                  (if (i32.ne (i32.load (i32.const 100000)) (i32.const 0)) (then unreachable))
                  (i32.store (i32.const 100000) (i32.const 9))))"#,
        )
        .unwrap();
        let (module, _) = load(&runtime, &wasm).unwrap();
        // Enough calls for call threads to drop their stores and reuse the memories.
        for round in 0..(2 * CALLS_PER_STORE + 3) {
            runtime
                .invoke(&module, get(""), &limits())
                .unwrap_or_else(|err| panic!("call {round}: {err:?}"));
        }
        // And a smaller memory after a bigger one: the pages beyond it are out of bounds.
        let small = wat::parse_str(
            r#"(module (memory (export "memory") 1)
                (func (export "_start") (drop (i32.load (i32.const 100000)))))"#,
        )
        .unwrap();
        let (small, _) = load(&runtime, &small).unwrap();
        let err = runtime.invoke(&small, get(""), &limits()).unwrap_err();
        assert!(matches!(err, InvokeError::Trap { .. }), "{err:?}");
    }

    #[test]
    fn calls_in_a_reused_store_get_their_own_request_and_memory_cap() {
        // Call threads keep their store for several calls (`CallStore`): each call must
        // still see only its own request, and its own function's memory cap.
        let (_dir, runtime) = runtime();
        let (hello, _) = load(&runtime, &example("hello")).unwrap();
        let (grow, _) = load(&runtime, &example("grow")).unwrap();
        let small = Limits::new(32 * 1024 * 1024, Duration::from_secs(10));
        for round in 0..(2 * CALLS_PER_STORE) {
            let name = format!("n{round}");
            let resp = runtime
                .invoke(&hello, get(&format!("name={name}")), &limits())
                .unwrap();
            assert!(
                text(&resp.body).starts_with(&format!("hello, {name}\n")),
                "round {round}: {}",
                text(&resp.body)
            );
            if round % 5 == 4 {
                let err = runtime.invoke(&grow, get(""), &small).unwrap_err();
                assert!(
                    matches!(err, InvokeError::MemoryLimit { limit, .. } if limit == 32 * 1024 * 1024),
                    "round {round}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn a_memory_minimum_above_the_limit_is_a_memory_limit_error() {
        let (_dir, runtime) = runtime();
        let wasm =
            wat::parse_str(r#"(module (memory (export "memory") 100) (func (export "_start")))"#)
                .unwrap();
        let (module, _) = load(&runtime, &wasm).unwrap();
        let limits = Limits::new(10 * PAGE_SIZE, Duration::from_secs(5));
        let err = runtime.invoke(&module, get(""), &limits).unwrap_err();
        assert!(
            matches!(err, InvokeError::MemoryLimit { limit, .. } if limit == 10 * PAGE_SIZE),
            "{err:?}"
        );
    }

    #[test]
    fn trap_reports_the_trap_with_stderr() {
        let (_dir, runtime) = runtime();
        let (module, _) = load(&runtime, &example("trap")).unwrap();
        let err = runtime.invoke(&module, get(""), &limits()).unwrap_err();
        match &err {
            InvokeError::Trap { message, stderr } => {
                assert!(message.contains("unreachable"), "{message}");
                let stderr = text(stderr);
                assert!(stderr.contains("trap: about to fail"), "{stderr}");
                assert!(stderr.contains("deliberate failure"), "{stderr}");
            }
            other => panic!("expected Trap, got {other:?}"),
        }
        assert_eq!(err.http_status(), 502);
    }

    /// A module whose `_start` writes `text` to stdout and then calls
    /// `proc_exit(code)`.
    fn exiting_module(text: &str, code: i32) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
                (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
                (memory (export "memory") 1)
                (data (i32.const 16) "{text}")
                (func (export "_start")
                    (i32.store (i32.const 0) (i32.const 16))
                    (i32.store (i32.const 4) (i32.const {len}))
                    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
                    (call $proc_exit (i32.const {code}))))"#,
            len = text.len(),
        ))
        .unwrap()
    }

    #[test]
    fn proc_exit_zero_is_success_and_non_zero_is_a_trap() {
        let (_dir, runtime) = runtime();
        let (ok, _) = load(&runtime, &exiting_module("done", 0)).unwrap();
        let resp = runtime.invoke(&ok, get(""), &limits()).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"done");
        assert_eq!(resp.header("content-type"), Some("text/plain"));

        let (failing, _) = load(&runtime, &exiting_module("partial", 3)).unwrap();
        let err = runtime.invoke(&failing, get(""), &limits()).unwrap_err();
        assert!(
            matches!(&err, InvokeError::Trap { message, .. } if message == "exit code 3"),
            "{err:?}"
        );
    }

    #[test]
    fn functions_cannot_create_files() {
        let (_dir, runtime) = runtime();
        // Exits with the errno of `path_open(3, "x", O_CREAT)`, fd 3 being
        // the (empty) preopened `/`.
        let wasm = wat::parse_str(
            r#"(module
                (import "wasi_snapshot_preview1" "path_open" (func $path_open
                    (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
                (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
                (memory (export "memory") 1)
                (data (i32.const 16) "x")
                (func (export "_start")
                    (call $proc_exit (call $path_open (i32.const 3) (i32.const 0)
                        (i32.const 16) (i32.const 1) (i32.const 1) (i64.const -1) (i64.const -1)
                        (i32.const 0) (i32.const 32)))))"#,
        )
        .unwrap();
        let (module, _) = load(&runtime, &wasm).unwrap();
        let err = runtime.invoke(&module, get(""), &limits()).unwrap_err();
        let InvokeError::Trap { message, .. } = &err else {
            panic!("expected a non-zero exit, got {err:?}");
        };
        assert!(message.starts_with("exit code "), "{message}");
    }

    /// A batch-style request running `task` with `args` and `scratch`.
    fn task_request(args: &[&str], scratch: Option<&Path>) -> CgiRequest {
        let mut env = BTreeMap::new();
        if scratch.is_some() {
            env.insert("MESH_SCRATCH".to_owned(), SCRATCH_PATH.to_owned());
        }
        CgiRequest {
            args: args.iter().map(|a| a.to_string()).collect(),
            env,
            raw_output: true,
            scratch: scratch.map(Path::to_path_buf),
            ..CgiRequest::default()
        }
    }

    #[test]
    fn a_scratch_directory_is_read_write_and_cannot_be_left() {
        let (_dir, runtime) = runtime();
        let (module, _) = load(&runtime, &example("task")).unwrap();
        let host = tempfile::tempdir().unwrap();
        // Something the module must not be able to see from inside its scratch directory.
        fs::write(host.path().join("outside.txt"), "secret").unwrap();
        let scratch = host.path().join("attempt");
        fs::create_dir(&scratch).unwrap();
        let resp = runtime
            .invoke(
                &module,
                task_request(&["--scratch"], Some(&scratch)),
                &limits(),
            )
            .unwrap_or_else(|e| panic!("{e:?}"));
        let out = text(&resp.body);
        assert!(out.contains("scratch ok"), "{out}\n{}", text(&resp.stderr));
        // The file the module wrote is on the host, inside the directory and nowhere else.
        let written = fs::read_to_string(scratch.join("relative.txt")).unwrap();
        assert!(written.starts_with("written by attempt"), "{written}");
        assert!(scratch.join("a/b").is_dir());
        for entry in fs::read_dir(&scratch).unwrap() {
            let entry = entry.unwrap();
            assert!(
                !entry.file_type().unwrap().is_symlink(),
                "a guest symlink reached the host: {}",
                entry.path().display()
            );
        }
        assert_eq!(fs::read_dir(host.path()).unwrap().count(), 2);
    }

    #[test]
    fn without_a_scratch_directory_nothing_can_be_written() {
        let (_dir, runtime) = runtime();
        let (module, _) = load(&runtime, &example("task")).unwrap();
        let err = runtime
            .invoke(&module, task_request(&["--scratch"], None), &limits())
            .unwrap_err();
        let InvokeError::Trap { message, stderr } = &err else {
            panic!("expected a non-zero exit, got {err:?}");
        };
        assert_eq!(message, "exit code 3");
        assert!(
            text(stderr).contains("MESH_SCRATCH is not set"),
            "{}",
            text(stderr)
        );
        // Set the variable without the directory: the write itself fails.
        let mut req = task_request(&["--scratch"], None);
        req.env.insert("MESH_SCRATCH".into(), SCRATCH_PATH.into());
        let err = runtime.invoke(&module, req, &limits()).unwrap_err();
        let InvokeError::Trap { stderr, .. } = &err else {
            panic!("expected a non-zero exit, got {err:?}");
        };
        assert!(text(stderr).contains("scratch: write"), "{}", text(stderr));
    }

    #[test]
    fn a_missing_scratch_directory_is_a_setup_error() {
        let (_dir, runtime) = runtime();
        let (module, _) = load(&runtime, &example("task")).unwrap();
        let gone = Path::new("/nonexistent/meshwork-scratch");
        let err = runtime
            .invoke(
                &module,
                task_request(&["--sum", "3"], Some(gone)),
                &limits(),
            )
            .unwrap_err();
        assert!(
            matches!(&err, InvokeError::Setup(m) if m.contains("scratch directory")),
            "{err:?}"
        );
    }

    #[test]
    fn invalid_modules_are_refused_at_load_time() {
        let (_dir, runtime) = runtime();

        let err = load(&runtime, b"#!/bin/sh\necho hi\n").unwrap_err();
        assert!(matches!(err, InvokeError::NotWasm(_)), "{err:?}");
        let err = load(&runtime, b"\0asm\x01\0\0\0\x01\xff").unwrap_err();
        assert!(matches!(err, InvokeError::NotWasm(_)), "{err:?}");

        let no_start =
            wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "main")))"#)
                .unwrap();
        let err = load(&runtime, &no_start).unwrap_err();
        assert!(matches!(err, InvokeError::NoStart), "{err:?}");

        let foreign = wat::parse_str(
            r#"(module (import "env" "foo" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
        )
        .unwrap();
        let err = load(&runtime, &foreign).unwrap_err();
        let InvokeError::UnknownImport { module, name } = &err else {
            panic!("expected UnknownImport, got {err:?}");
        };
        assert_eq!((module.as_str(), name.as_str()), ("env", "foo"));
        assert!(err.to_string().contains("`env.foo`"), "{err}");

        let wasix = wat::parse_str(
            r#"(module (import "wasix_32v1" "thread_spawn" (func (param i32) (result i32))) (memory (export "memory") 1) (func (export "_start")))"#,
        )
        .unwrap();
        assert!(matches!(
            load(&runtime, &wasix),
            Err(InvokeError::UnknownImport { .. })
        ));

        // Nothing invalid was cached.
        assert!(fs::read_dir(&runtime.cache_dir).unwrap().next().is_none());
    }

    #[test]
    fn bytes_must_match_their_hash() {
        let (_dir, runtime) = runtime();
        let err = runtime.load([7; 32], &example("hello")).unwrap_err();
        assert!(matches!(err, InvokeError::HashMismatch { .. }), "{err:?}");
    }

    #[test]
    fn artifacts_are_reused_across_runtimes() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = example("hello");
        let hash = *blake3::hash(&wasm).as_bytes();

        let first = FunctionRuntime::new(dir.path()).unwrap();
        assert!(!first.has_artifact(hash));
        assert_eq!(first.load(hash, &wasm).unwrap().1, CacheOutcome::Compiled);
        assert_eq!(first.load(hash, &wasm).unwrap().1, CacheOutcome::MemoryHit);
        assert!(first.has_artifact(hash));
        assert!(first.artifact_path(hash).is_file());
        drop(first);

        let second = FunctionRuntime::new(dir.path()).unwrap();
        assert!(second.has_artifact(hash));
        assert!(second.cached(hash).is_none());
        let (module, outcome) = second.load(hash, &wasm).unwrap();
        assert_eq!(outcome, CacheOutcome::DiskHit);
        let resp = second.invoke(&module, get("name=disk"), &limits()).unwrap();
        assert!(text(&resp.body).starts_with("hello, disk\n"));
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_artifacts_are_recompiled() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = example("hello");
        let hash = *blake3::hash(&wasm).as_bytes();
        let path = {
            let runtime = FunctionRuntime::new(dir.path()).unwrap();
            runtime.load(hash, &wasm).unwrap();
            runtime.artifact_path(hash)
        };
        let good = fs::read(&path).unwrap();

        let mut flipped = good.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0xff;
        let truncated = good[..good.len() / 3].to_vec();
        let mut garbage_payload = good[..ARTIFACT_HEADER_LEN].to_vec();
        garbage_payload.extend_from_slice(&[0xab; 4096]);
        let checksum = *blake3::hash(&garbage_payload[ARTIFACT_HEADER_LEN..]).as_bytes();
        garbage_payload[ARTIFACT_MAGIC.len()..ARTIFACT_HEADER_LEN].copy_from_slice(&checksum);

        for corrupt in [flipped, truncated, garbage_payload, Vec::new()] {
            fs::write(&path, &corrupt).unwrap();
            let runtime = FunctionRuntime::new(dir.path()).unwrap();
            let (module, outcome) = runtime.load(hash, &wasm).unwrap();
            assert_eq!(outcome, CacheOutcome::Compiled);
            let resp = runtime
                .invoke(&module, get("name=fixed"), &limits())
                .unwrap();
            assert!(text(&resp.body).starts_with("hello, fixed\n"));
            // The artifact was rewritten and is good again.
            let runtime = FunctionRuntime::new(dir.path()).unwrap();
            assert_eq!(runtime.load(hash, &wasm).unwrap().1, CacheOutcome::DiskHit);
        }
    }

    #[test]
    fn cgi_environment_follows_the_documented_precedence() {
        let req = CgiRequest {
            method: "POST".to_owned(),
            path: "/a/b".to_owned(),
            query: "q=1".to_owned(),
            headers: vec![
                ("Content-Type".to_owned(), "application/json".to_owned()),
                ("Content-Length".to_owned(), "999".to_owned()),
                ("X-Trace-Id".to_owned(), "abc".to_owned()),
                ("accept".to_owned(), "text/html".to_owned()),
                ("Accept".to_owned(), "text/plain".to_owned()),
                ("Proxy".to_owned(), "evil:8080".to_owned()),
                ("Secret".to_owned(), "from-client".to_owned()),
                ("Bad=Name".to_owned(), "x".to_owned()),
            ],
            body: b"{}".to_vec(),
            env: BTreeMap::from([
                ("HTTP_SECRET".to_owned(), "from-deploy".to_owned()),
                ("REQUEST_METHOD".to_owned(), "SPOOF".to_owned()),
                ("GREETING".to_owned(), "hi".to_owned()),
            ]),
            args: Vec::new(),
            raw_output: false,
            scratch: None,
        };
        let env = cgi_environment(&req);
        let get = |key: &str| env.get(key).map(String::as_str);
        assert_eq!(get("REQUEST_METHOD"), Some("POST"));
        assert_eq!(get("PATH_INFO"), Some("/a/b"));
        assert_eq!(get("QUERY_STRING"), Some("q=1"));
        assert_eq!(get("CONTENT_LENGTH"), Some("2"));
        assert_eq!(get("CONTENT_TYPE"), Some("application/json"));
        assert_eq!(get("SERVER_PROTOCOL"), Some("HTTP/1.1"));
        assert_eq!(get("GATEWAY_INTERFACE"), Some("CGI/1.1"));
        assert_eq!(get("HTTP_X_TRACE_ID"), Some("abc"));
        assert_eq!(get("HTTP_ACCEPT"), Some("text/html, text/plain"));
        assert_eq!(get("HTTP_SECRET"), Some("from-deploy"));
        assert_eq!(get("GREETING"), Some("hi"));
        assert_eq!(get("HTTP_PROXY"), None);
        assert_eq!(get("HTTP_CONTENT_TYPE"), None);
        assert_eq!(get("HTTP_CONTENT_LENGTH"), None);
        assert!(env.keys().all(|key| !key.contains('=')));
    }

    #[test]
    fn function_env_and_args_reach_the_module() {
        let (_dir, runtime) = runtime();
        let (module, _) = load(&runtime, &example("hello")).unwrap();
        let mut req = get("name=x");
        req.env.insert("BAD=KEY".to_owned(), "v".to_owned());
        let err = runtime.invoke(&module, req, &limits()).unwrap_err();
        assert!(matches!(err, InvokeError::Setup(_)), "{err:?}");
        assert_eq!(err.http_status(), 500);
    }

    #[test]
    fn cgi_output_parsing() {
        let parse = |out: &[u8]| parse_cgi_output(out.to_vec());

        let (status, headers, body) = parse(
            b"Status: 404 Not Found\r\nContent-Type: text/html\r\nX-A:  b \r\n\r\n<p>gone</p>",
        )
        .unwrap();
        assert_eq!(status, 404);
        assert_eq!(
            headers,
            vec![
                ("Content-Type".to_owned(), "text/html".to_owned()),
                ("X-A".to_owned(), "b".to_owned())
            ]
        );
        assert_eq!(body, b"<p>gone</p>");

        let (status, headers, body) = parse(b"just text\nmore\n").unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"just text\nmore\n"[..]));
        assert_eq!(
            headers,
            vec![("Content-Type".to_owned(), "text/plain".to_owned())]
        );

        // A blank line after something that is not a header: all body.
        let (_, _, body) = parse(b"hello world\n\nsecond paragraph\n").unwrap();
        assert_eq!(body, b"hello world\n\nsecond paragraph\n");
        // Headers without the blank line: all body.
        let (_, _, body) = parse(b"Content-Type: text/plain\n").unwrap();
        assert_eq!(body, b"Content-Type: text/plain\n");
        // Empty output.
        assert_eq!(parse(b"").unwrap().0, 200);
        // Empty header section.
        let (status, headers, body) = parse(b"\nbody").unwrap();
        assert_eq!(
            (status, headers.len(), body.as_slice()),
            (200, 0, &b"body"[..])
        );
        // Redirect.
        let (status, _, _) = parse(b"Location: /elsewhere\n\n").unwrap();
        assert_eq!(status, 302);
        // Binary body after headers.
        let (_, _, body) =
            parse(b"Content-Type: application/octet-stream\n\n\xff\x00\n\n").unwrap();
        assert_eq!(body, b"\xff\x00\n\n");

        for bad in [
            &b"Status: teapot\n\n"[..],
            b"Status: 42\n\n",
            b"Status: 700 Weird\n\n",
            b"X: a\x07b\n\n",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(matches!(err, InvokeError::BadOutput(_)), "{err:?}");
            assert_eq!(err.http_status(), 502);
        }
    }

    #[test]
    fn a_released_body_frees_its_bytes_for_every_clone() {
        // The kept store's WASI environment holds a clone of the body until the thread's
        // next call; releasing it after the call must free the bytes there too.
        let body = Body::new(b"payload".to_vec());
        let mut in_env = body.clone();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut bytes = [0u8; 3];
        let mut buf = ReadBuf::new(&mut bytes);
        assert!(
            Pin::new(&mut in_env)
                .poll_read(&mut cx, &mut buf)
                .is_ready()
        );
        assert_eq!(buf.filled(), b"pay");
        assert_eq!(in_env.unread(), 4);
        body.release();
        assert_eq!(in_env.size(), 0);
        let mut buf = ReadBuf::new(&mut bytes);
        assert!(
            Pin::new(&mut in_env)
                .poll_read(&mut cx, &mut buf)
                .is_ready()
        );
        assert!(buf.filled().is_empty(), "end of file after release");

        let capture = Capture::new(10, false);
        let mut writer = capture.clone();
        assert!(Pin::new(&mut writer).poll_write(&mut cx, b"abc").is_ready());
        assert_eq!(capture.take(), b"abc");
        assert!(writer.take().is_empty(), "taking empties the shared buffer");
    }

    #[test]
    fn oversized_output_is_refused() {
        let mut capture = Capture::new(10, true);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(matches!(
            Pin::new(&mut capture).poll_write(&mut cx, b"12345"),
            Poll::Ready(Ok(5))
        ));
        assert!(matches!(
            Pin::new(&mut capture).poll_write(&mut cx, b"123456"),
            Poll::Ready(Err(_))
        ));
        assert!(capture.overflowed());
        assert_eq!(capture.take(), b"12345");

        let mut stderr = Capture::new(10, false);
        assert!(matches!(
            Pin::new(&mut stderr).poll_write(&mut cx, b"123456789012"),
            Poll::Ready(Ok(12))
        ));
        assert_eq!(stderr.take(), b"1234567890");
    }

    #[test]
    fn wasmer_version_in_the_cache_key_matches_cargo_lock() {
        let lock_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
        let lock = fs::read_to_string(&lock_path).unwrap();
        let version = lock
            .split("[[package]]")
            .find(|pkg| pkg.contains("\nname = \"wasmer\"\n"))
            .and_then(|pkg| {
                pkg.lines()
                    .find_map(|line| line.strip_prefix("version = \""))
            })
            .map(|v| v.trim_end_matches('"'))
            .expect("wasmer in Cargo.lock");
        assert_eq!(
            version, WASMER_VERSION,
            "update WASMER_VERSION after upgrading wasmer"
        );
    }
}
