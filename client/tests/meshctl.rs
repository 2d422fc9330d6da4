//! `meshctl` end to end against a real `meshd`: the commands a user types, their output and
//! their errors.

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");

/// `meshd` is built into the same directory by `cargo test --workspace`.
fn meshd_path() -> PathBuf {
    let p = PathBuf::from(MESHCTL).with_file_name("meshd");
    assert!(
        p.exists(),
        "{} not found: run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

/// A port free for TCP and UDP, never handed out twice in this test process, below Linux's
/// ephemeral range and meshd's replica ports (see `node/tests/common`: asking for port 0 can
/// hand a parallel test the same port).
fn free_port() -> u16 {
    static TAKEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        let port = rand::random_range(10_000..20_000u16);
        if !taken.contains(&port)
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port in 10000-19999");
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn meshctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(MESHCTL)
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_user_session_against_a_real_node() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(MESHCTL)
        .args(["secret", "new"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let secret = text(&out.stdout);
    assert_eq!(secret.trim().len(), 64);
    assert!(secret.trim().chars().all(|c| c.is_ascii_hexdigit()));
    std::fs::write(dir.path().join("secret"), &secret).unwrap();

    let (p2p, grpc, http) = (free_port(), free_port(), free_port());
    let child = Command::new(meshd_path())
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--secret-file", dir.path().join("secret").to_str().unwrap()])
        .args(["--p2p", &format!("127.0.0.1:{p2p}")])
        .args(["--grpc", &format!("127.0.0.1:{grpc}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args([
            "--name", "alpha", "--label", "zone=a", "--cpu", "1.5", "--memory", "2Gi",
        ])
        .arg("--no-mdns")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _daemon = Daemon(child);
    let ep = format!("http://127.0.0.1:{grpc}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let table = loop {
        let out = meshctl(&ep, &["nodes"]);
        if out.status.success() && text(&out.stdout).contains("alpha") {
            break text(&out.stdout);
        }
        assert!(
            Instant::now() < deadline,
            "node never answered: {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let header = table.lines().next().unwrap();
    for col in [
        "NAME",
        "PEER",
        "ADDR",
        "STATE",
        "CPU (free/total)",
        "MEMORY (free/total)",
        "DISK FREE",
        "WORKLOADS",
        "LABELS",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.contains("ALIVE")
            && row.contains("1.50/1.50")
            && row.contains("2.0Gi/2.0Gi")
            && row.contains("zone=a"),
        "{row}"
    );

    let out = meshctl(&ep, &["nodes", "--json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes[0]["name"], "alpha");
    assert_eq!(nodes[0]["state"], "alive");
    assert_eq!(nodes[0]["cpu_total_millis"], 1500);
    assert_eq!(nodes[0]["memory_total_bytes"], 2u64 << 30);
    assert_eq!(nodes[0]["labels"]["zone"], "a");

    assert!(
        meshctl(&ep, &["state", "put", "app/greeting", "hello"])
            .status
            .success()
    );
    let out = meshctl(&ep, &["state", "get", "app/greeting"]);
    assert_eq!(text(&out.stdout), "hello\n");
    let out = meshctl(&ep, &["state", "ls", "app/", "--json"]);
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(entries[0]["key"], "app/greeting");
    assert_eq!(entries[0]["value"], "hello");
    assert!(
        meshctl(&ep, &["state", "rm", "app/greeting"])
            .status
            .success()
    );

    let out = meshctl(&ep, &["state", "get", "app/greeting"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
    let out = meshctl(&ep, &["state", "put", "bad key", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid argument"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn unreachable_endpoints_and_bad_usage_give_clear_errors() {
    let port = free_port();
    let out = meshctl(&format!("http://127.0.0.1:{port}"), &["nodes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach a node"),
        "{}",
        text(&out.stderr)
    );
    let out = meshctl("not a url", &["nodes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not a URL"),
        "{}",
        text(&out.stderr)
    );
    let out = Command::new(MESHCTL)
        .args(["nodes", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn service_and_route_flags_are_checked_before_connecting() {
    // Nothing listens here: a flag error must come first, and say which flag.
    let ep = format!("http://127.0.0.1:{}", free_port());
    for (args, expected) in [
        (
            &["svc", "create", "web", "--image", "app:1", "--cpu", "0"][..],
            "--cpu \"0\": must be more than 0",
        ),
        (
            &["svc", "create", "web", "--image", "app:1", "--cpu", "-1"],
            "--cpu \"-1\": must be more than 0",
        ),
        (
            &["svc", "create", "web", "--image", "app:1", "--cpu", "lots"],
            "--cpu \"lots\": expected cores",
        ),
        (
            &["svc", "create", "web", "--image", "app:1", "--cpu", "1001"],
            "more than 1000 cores",
        ),
        (
            &["svc", "create", "web", "--image", "app:1", "--env", "1X=a"],
            "--env \"1X=a\"",
        ),
        (
            &[
                "svc", "create", "web", "--image", "app:1", "--env", "NOVALUE",
            ],
            "expected K=V",
        ),
        (
            &[
                "svc", "create", "web", "--image", "app:1", "--memory", "lots",
            ],
            "--memory \"lots\"",
        ),
        (
            &[
                "svc",
                "create",
                "web",
                "--image",
                "app:1",
                "--cmd",
                "sh -c 'echo",
            ],
            "--cmd \"sh -c 'echo\": an unbalanced quote",
        ),
        (
            &[
                "svc",
                "create",
                "web",
                "--image",
                "app:1",
                "--health-cmd",
                "\"x",
            ],
            "--health-cmd",
        ),
        (
            &[
                "svc",
                "create",
                "web",
                "--image",
                "a:1",
                "--label-constraint",
                "zone",
            ],
            "--label-constraint \"zone\": expected K=V",
        ),
        (&["svc", "update", "web"], "nothing to update"),
        (
            &["svc", "update", "web", "--env", "A B=1"],
            "--env \"A B=1\"",
        ),
        (&["logs", "web", "--tail", "lots"], "--tail \"lots\""),
        (
            &[
                "route",
                "add",
                "/web",
                "--service",
                "web",
                "--max-response",
                "0",
            ],
            "--max-response \"0\": must be at least 1 byte",
        ),
        (
            &[
                "route",
                "add",
                "/web",
                "--service",
                "web",
                "--max-response",
                "lots",
            ],
            "--max-response \"lots\": expected bytes like 1Mi",
        ),
    ] {
        let out = meshctl(&ep, args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("cannot reach"), "{args:?}: {err}");
    }
    // Good flags get as far as connecting.
    let out = meshctl(
        &ep,
        &[
            "svc",
            "create",
            "web",
            "--image",
            "app:1",
            "--cpu",
            "0.5",
            "--memory",
            "128Mi",
            "--env",
            "A=1",
            "--cmd",
            "sh -c 'echo hi'",
            "--binpack",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach a node"),
        "{}",
        text(&out.stderr)
    );
    // Usage errors are clap's: exit 2.
    for args in [
        &[
            "svc",
            "create",
            "web",
            "--image",
            "a:1",
            "--spread",
            "--binpack",
        ][..],
        &["svc", "create", "web", "--image", "a:1", "--port", "70000"],
        &["svc", "create", "web"],
        &["svc", "scale", "web", "many"],
        &["route", "add", "/web"],
        &["route", "add", "/web", "--fn", "hello", "--service", "web"],
        &["route", "add", "/web", "--fn", "hello", "--websocket"],
    ] {
        assert_eq!(meshctl(&ep, args).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn service_and_route_help_lists_the_subcommands() {
    let help = |args: &[&str]| {
        let out = Command::new(MESHCTL).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        text(&out.stdout)
    };
    let svc = help(&["svc", "--help"]);
    for sub in ["create", "ls", "ps", "scale", "update", "rm", "inspect"] {
        assert!(
            svc.lines().any(|l| l.trim_start().starts_with(sub)),
            "{sub}: {svc}"
        );
    }
    let route = help(&["route", "--help"]);
    for sub in ["add", "ls", "rm"] {
        assert!(
            route.lines().any(|l| l.trim_start().starts_with(sub)),
            "{sub}: {route}"
        );
    }
    let logs = help(&["logs", "--help"]);
    for flag in ["--follow", "--replica", "--tail"] {
        assert!(logs.contains(flag), "{flag}: {logs}");
    }
    let top = help(&["--help"]);
    for sub in ["svc", "logs", "route"] {
        assert!(
            top.lines().any(|l| l.trim_start().starts_with(sub)),
            "{sub}: {top}"
        );
    }
}

#[test]
fn job_flags_are_checked_before_connecting() {
    // Nothing listens here: a flag error must come first, and say which flag.
    let ep = format!("http://127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("task.wasm");
    std::fs::write(&wasm, b"\0asm\x01\0\0\0").unwrap();
    let wasm = wasm.to_str().unwrap();
    let missing = dir.path().join("missing.wasm");
    let missing = missing.to_str().unwrap();
    let submit = ["job", "submit", "--name", "render"];
    let image = [&submit[..], &["--image", "app:1.0"]].concat();
    fn with<'a>(base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
        [base, more].concat()
    }
    for (args, expected) in [
        (
            with(&image, &["--array", "0"]),
            "--array 0: an array job has 2 or more indices; use 2 or more, or leave it out",
        ),
        (
            with(&image, &["--retries", "3", "--retry-on-exit", "137,x"]),
            "--retry-on-exit \"137,x\": \"x\" is not an exit code",
        ),
        (
            with(&image, &["--retries", "3", "--retry-on-exit", "256"]),
            "--retry-on-exit \"256\": 256 is not an exit code: they go from 0 to 255",
        ),
        (
            with(&image, &["--retries", "3", "--retry-on-exit", "137,,143"]),
            "--retry-on-exit \"137,,143\": an empty item",
        ),
        (
            with(&image, &["--retry-on-exit", "137"]),
            "without --retries",
        ),
        (
            with(&image, &["--timeout", "forever"]),
            "--timeout \"forever\": expected a duration",
        ),
        (
            with(&image, &["--timeout", "0s"]),
            "--timeout \"0s\": must be more than 0",
        ),
        (
            with(&image, &["--cpu", "0"]),
            "--cpu \"0\": must be more than 0",
        ),
        (with(&image, &["--memory", "lots"]), "--memory \"lots\""),
        (with(&image, &["--env", "1X=a"]), "--env \"1X=a\""),
        (
            with(&image, &["--cmd", "render 'x"]),
            "--cmd \"render 'x\": an unbalanced quote",
        ),
        (
            vec!["job", "ls", "--state", "runing"],
            "--state \"runing\": expected one of SUBMITTED, PENDING, RUNNABLE, STARTING, RUNNING, SUCCEEDED, FAILED",
        ),
    ] {
        let out = meshctl(&ep, &args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("cannot reach"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // A module that cannot be read fails before connecting too.
    let out = meshctl(&ep, &[&submit[..], &["--wasm", missing]].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("opening {missing}")),
        "{}",
        text(&out.stderr)
    );
    // Good flags get as far as connecting, in any case of --state.
    for args in [
        with(
            &image,
            &[
                "--cmd",
                "render --frame '$MESH_JOB_INDEX'",
                "--cpu",
                "1",
                "--memory",
                "512Mi",
                "--array",
                "100",
                "--retries",
                "3",
                "--retry-on-exit",
                "137,143",
                "--depends-on",
                "j-1",
                "--depends-on",
                "j-2",
                "--timeout",
                "2h",
                "--env",
                "A=1",
                "--priority",
                "-1",
            ],
        ),
        [&submit[..], &["--wasm", wasm, "--args", "1000000"]].concat(),
        [&submit[..], &["--wasm", wasm, "--cmd", "1000000"]].concat(),
        vec!["job", "ls", "--state", "Running"],
        vec!["job", "show", "j-1"],
        vec!["job", "logs", "j-1", "--index", "3", "--attempt", "2", "-f"],
        vec!["job", "cancel", "j-1"],
    ] {
        let out = meshctl(&ep, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains("cannot reach a node"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // Usage errors are clap's: exit 2.
    for args in [
        submit.to_vec(),
        vec!["job", "submit", "--image", "app:1.0"],
        with(&image, &["--wasm", wasm]),
        with(&image, &["--args", "1"]),
        [&submit[..], &["--wasm", wasm, "--args", "1", "--cmd", "2"]].concat(),
        with(&image, &["--array", "-1"]),
        with(&image, &["--retries", "many"]),
        vec!["job", "logs", "j-1", "--attempt", "0"],
        vec!["job", "show"],
        vec!["job", "cancel"],
    ] {
        assert_eq!(meshctl(&ep, &args).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn job_help_lists_the_subcommands() {
    let help = |args: &[&str]| {
        let out = Command::new(MESHCTL).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        text(&out.stdout)
    };
    let job = help(&["job", "--help"]);
    for sub in ["submit", "ls", "show", "logs", "cancel"] {
        assert!(
            job.lines().any(|l| l.trim_start().starts_with(sub)),
            "{sub}: {job}"
        );
    }
    let submit = help(&["job", "submit", "--help"]);
    for flag in [
        "--name",
        "--image",
        "--wasm",
        "--cmd",
        "--args",
        "--cpu",
        "--memory",
        "--array",
        "--retries",
        "--retry-on-exit",
        "--depends-on",
        "--timeout",
        "--env",
        "--priority",
        "--json",
    ] {
        assert!(submit.contains(flag), "{flag}: {submit}");
    }
    let logs = help(&["job", "logs", "--help"]);
    for flag in ["--index", "--attempt", "--follow"] {
        assert!(logs.contains(flag), "{flag}: {logs}");
    }
    let top = help(&["--help"]);
    assert!(
        top.lines().any(|l| l.trim_start().starts_with("job")),
        "{top}"
    );
}
