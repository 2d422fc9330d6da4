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
