//! `trap`: writes a line to stderr, then panics. The examples are built with
//! `panic = "abort"`, so the panic ends in a WebAssembly `unreachable` trap,
//! which the node reports as a failed invocation (HTTP 502) with the stderr.

fn main() {
    eprintln!("trap: about to fail");
    panic!("trap: deliberate failure");
}
