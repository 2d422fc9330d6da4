//! A batch job (not a CGI function): `meshctl job submit --wasm task.wasm --args '...'`.
//!
//! Prints `task index=I attempt=A` (from `MESH_JOB_INDEX` and `MESH_JOB_ATTEMPT`), then
//! follows its arguments in order:
//! - `--sum N`: prints the sum of 1..=N;
//! - `--sleep-ms N`: sleeps N milliseconds;
//! - `--fail-attempts K CODE`: exits with CODE while the attempt number is at most K;
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
            "--exit" => std::process::exit(num(i + 1) as i32),
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
}
