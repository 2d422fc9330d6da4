//! A function stuck in system calls (cheap in metering points, endless in time) answers its
//! caller with a timeout at its deadline. In a file of its own: it runs alone, with one runtime in the process, as in
//! `meshd` (see the note in the issue: with several runtimes in one process running at once,
//! the kill was seen not to reach the call).

use std::time::Duration;

use meshwork_node::functions::runtime::{CgiRequest, FunctionRuntime, InvokeError, Limits};

fn host_call_loop(setup: &str, body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 256) "spam\n")
            (func (export "_start") {setup} (loop {body} (br 0))))"#
    ))
    .unwrap()
}

fn assert_runaway_ends(runtime: &FunctionRuntime, wasm: &[u8]) {
    let (module, _) = runtime.load(*blake3::hash(wasm).as_bytes(), wasm).unwrap();
    let limits = Limits::new(64 * 1024 * 1024, Duration::from_millis(300));
    let request = CgiRequest {
        method: "GET".into(),
        path: "/".into(),
        ..Default::default()
    };
    let err = runtime.invoke(&module, request, &limits).unwrap_err();
    assert!(matches!(err, InvokeError::Timeout { .. }), "{err:?}");
    // The caller gets its 504 at the deadline; the call's thread is abandoned and counted
    // (or has already ended). Whether the kill always ends that thread is NOT checked here:
    // in a clean CI run it once outlived a 60 s wait (see the issue note), so the count is
    // the honest signal, exported as `mesh_fn_runaway_calls`.
    // A killed thread can take a moment to notice on a loaded machine: wait (bounded) for the
    // earlier calls' threads to end before judging.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while runtime.runaway_calls() > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        runtime.runaway_calls() <= 1,
        "{} abandoned call threads still run",
        runtime.runaway_calls()
    );
}

#[test]
fn a_call_stuck_in_system_calls_is_killed_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = FunctionRuntime::new(dir.path()).unwrap();
    // Writes to stderr forever (past the capture limit, writes are dropped but succeed).
    let log = host_call_loop(
        "(i32.store (i32.const 0) (i32.const 256)) (i32.store (i32.const 4) (i32.const 5))",
        "(drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))",
    );
    assert_runaway_ends(&runtime, &log);
    // Sleeps 10 s at a time (a monotonic clock subscription), forever.
    let sleep = host_call_loop(
        "(i32.store (i32.const 16) (i32.const 1)) (i64.store (i32.const 24) (i64.const 10000000000))",
        "(drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))",
    );
    assert_runaway_ends(&runtime, &sleep);
}
