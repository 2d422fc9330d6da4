//! Baseline runner of bench/batch: what a node does for one Wasm job, as a process of its own.
//!
//! ```text
//! batch-runner compile MODULE.wasm ARTIFACT     # once: Cranelift compile, serialized to a file
//! batch-runner run ARTIFACT LOG [ARG]...        # per job: load the artifact, run it, write LOG
//! batch-runner compile-run MODULE.wasm LOG [ARG]...   # per job, compiling every time
//! ```
//!
//! `run` does what meshd does for a Wasm job whose module it has compiled before: deserialize
//! the compiled artifact into a headless engine, build a WASI environment (the arguments after
//! argv[0], `MESH_JOB_INDEX`/`MESH_JOB_ATTEMPT` from this process's environment when set, stdout
//! and stderr captured in memory, no file system) with a `PluggableRuntime` on a one-worker
//! tokio runtime, instantiate, call `_start`, and write the captured output to LOG. It exits
//! with the module's exit code. What it does not do: meshd's fuel metering (instrumented code),
//! its memory-limiting tunables, and the bookkeeping around a job (claims, attempt records).

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmer::sys::{Cranelift, EngineBuilder, NativeEngineExt};
use wasmer::{Engine, Module, Store};
use wasmer_wasix::runtime::PluggableRuntime;
use wasmer_wasix::runtime::task_manager::tokio::TokioTaskManager;
use wasmer_wasix::virtual_fs::{self, AsyncRead, AsyncSeek, AsyncWrite, EmptyFileSystem, ReadBuf, VirtualFile};
use wasmer_wasix::{WasiEnv, WasiError};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: batch-runner compile MODULE.wasm ARTIFACT | run ARTIFACT LOG [ARG]... | compile-run MODULE.wasm LOG [ARG]...";
    let code = match args.get(1).map(String::as_str) {
        Some("compile") if args.len() == 4 => {
            let (_, module) = compile(&args[2]);
            module.serialize_to_file(&args[3]).expect("serialize the artifact");
            0
        }
        Some("run") if args.len() >= 4 => {
            let engine = Engine::headless();
            // SAFETY: the artifact was written by `batch-runner compile` with this same build.
            let module = unsafe { Module::deserialize_from_file(&engine, &args[2]) }.expect("load the artifact");
            run(engine, module, &args[3], &args[4..])
        }
        Some("compile-run") if args.len() >= 4 => {
            let (engine, module) = compile(&args[2]);
            run(engine, module, &args[3], &args[4..])
        }
        _ => {
            eprintln!("{usage}");
            2
        }
    };
    std::process::exit(code);
}

fn compile(path: &str) -> (Engine, Module) {
    let wasm = std::fs::read(path).expect("read the module");
    let engine: Engine = EngineBuilder::new(Cranelift::default()).into();
    let module = Module::new(&engine, wasm).expect("compile the module");
    (engine, module)
}

fn run(engine: Engine, module: Module, log: &str, args: &[String]) -> i32 {
    let tasks = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut wasi_runtime = PluggableRuntime::new(Arc::new(TokioTaskManager::new(tasks.handle().clone())));
    wasi_runtime.set_engine(engine.clone());
    let mut env = BTreeMap::new();
    for k in ["MESH_JOB_INDEX", "MESH_JOB_ATTEMPT"] {
        if let Ok(v) = std::env::var(k) {
            env.insert(k.to_string(), v);
        }
    }
    let out = Capture::default();
    let err = Capture::default();
    let mut store = Store::new(engine);
    let no_files: Arc<dyn virtual_fs::FileSystem + Send + Sync> = Arc::new(EmptyFileSystem::default());
    let (instance, wasi_env) = WasiEnv::builder("task")
        .args(args)
        .envs(env)
        .stdout(Box::new(out.clone()))
        .stderr(Box::new(err.clone()))
        .fs(no_files)
        .runtime(Arc::new(wasi_runtime))
        .instantiate(module, &mut store)
        .expect("instantiate");
    let start = instance.exports.get_function("_start").expect("_start").clone();
    let result = start.call(&mut store, &[]);
    let code: i32 = match result {
        Ok(_) => 0,
        Err(e) => match e.downcast::<WasiError>() {
            Ok(WasiError::Exit(code)) => code.raw(),
            Ok(other) => {
                eprintln!("{other}");
                127
            }
            Err(e) => {
                eprintln!("trap: {}", e.message());
                128
            }
        },
    };
    wasi_env.data(&store).blocking_on_exit(None);
    let mut text = out.0.lock().unwrap().clone();
    text.extend_from_slice(&err.0.lock().unwrap());
    std::fs::write(log, text).expect("write the log");
    code
}

/// Standard output or error, kept in memory.
#[derive(Debug, Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl AsyncWrite for Capture {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Capture {
    fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, _buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for Capture {
    fn start_seek(self: Pin<&mut Self>, _position: io::SeekFrom) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "not seekable"))
    }
    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.0.lock().unwrap().len() as u64))
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
        self.0.lock().unwrap().len() as u64
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
