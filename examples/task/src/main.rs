//! A batch job (not a CGI function): `meshctl job submit --wasm task.wasm --args '...'`.
//!
//! Prints `task index=I attempt=A` (from `MESH_JOB_INDEX` and `MESH_JOB_ATTEMPT`), then
//! follows its arguments in order:
//! - `--sum N`: prints the sum of 1..=N;
//! - `--sleep-ms N`: sleeps N milliseconds;
//! - `--fail-attempts K CODE`: exits with CODE while the attempt number is at most K;
//! - `--scratch`: writes a file in `$MESH_SCRATCH` and reads it back, then tries to leave the
//!   directory (`..` to a sibling `outside.txt` and to `/etc/hostname`, a symlink to `/`);
//!   prints `scratch ok` only when every escape found nothing;
//! - `--exit CODE`: exits with CODE.

use std::time::Duration;

fn main() {
    let index = std::env::var("MESH_JOB_INDEX").unwrap_or_else(|_| "-".into());
    let attempt: u32 = std::env::var("MESH_JOB_ATTEMPT")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    println!("task index={index} attempt={attempt}");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                eprintln!("expected a number after {}", args[i - 1]);
                std::process::exit(2)
            })
    };
    while i < args.len() {
        match args[i].as_str() {
            "--sum" => {
                let n = num(i + 1);
                println!("sum={}", (1..=n).sum::<u64>());
                i += 2;
            }
            "--sleep-ms" => {
                std::thread::sleep(Duration::from_millis(num(i + 1)));
                i += 2;
            }
            "--fail-attempts" => {
                let (k, code) = (num(i + 1), num(i + 2));
                if u64::from(attempt) <= k {
                    eprintln!("failing attempt {attempt} with {code}");
                    std::process::exit(code as i32);
                }
                i += 3;
            }
            "--scratch" => {
                scratch();
                i += 1;
            }
            "--exit" => std::process::exit(num(i + 1) as i32),
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
}

/// The `--scratch` step: a round trip through the scratch directory, then escape attempts.
fn scratch() {
    let dir = std::env::var("MESH_SCRATCH").unwrap_or_else(|_| fail("MESH_SCRATCH is not set"));
    let data = format!(
        "written by attempt {}",
        std::env::var("MESH_JOB_ATTEMPT").unwrap_or_default()
    );
    std::fs::write(format!("{dir}/relative.txt"), &data).unwrap_or_else(|e| fail(&format!("write: {e}")));
    let back = std::fs::read_to_string(format!("{dir}/relative.txt"))
        .unwrap_or_else(|e| fail(&format!("read back: {e}")));
    if back != data {
        fail("read back other bytes");
    }
    std::fs::create_dir_all(format!("{dir}/a/b")).unwrap_or_else(|e| fail(&format!("mkdir: {e}")));
    let escapes = [
        format!("{dir}/../outside.txt"),
        format!("{dir}/a/../../outside.txt"),
        format!("{dir}/../../../etc/hostname"),
        "/etc/hostname".to_string(),
        format!("{dir}/a/b/../../../../../etc/hostname"),
    ];
    for path in &escapes {
        if std::fs::read(path).is_ok() {
            fail(&format!("could read {path}"));
        }
    }
    // A symlink to `/` made through each preopened directory (fds from 3), then read through.
    for fd in 3..8 {
        let name = format!("root{fd}");
        if symlink("/", fd, &name) && std::fs::read(format!("{dir}/{name}/etc/hostname")).is_ok()
        {
            fail("could read /etc/hostname through a symlink");
        }
    }
    println!("scratch ok");
}

fn fail(why: &str) -> ! {
    eprintln!("scratch: {why}");
    std::process::exit(3)
}

/// WASI `path_symlink` (std's wrapper is unstable): makes `new` under directory `fd` point to
/// `old`; true when it was made.
fn symlink(old: &str, fd: u32, new: &str) -> bool {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    unsafe extern "C" {
        fn path_symlink(old: *const u8, old_len: usize, fd: u32, new: *const u8, new_len: usize)
        -> u16;
    }
    // SAFETY: both pointers and lengths describe live strings for the length of the call.
    unsafe { path_symlink(old.as_ptr(), old.len(), fd, new.as_ptr(), new.len()) == 0 }
}
