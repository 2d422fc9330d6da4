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

fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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
