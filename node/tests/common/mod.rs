//! Test support: real `meshd` processes on loopback, and waiting on conditions with deadlines.

#![allow(dead_code, missing_docs)]

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshwork_client::{MeshClient, NodeView};

pub const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

/// A port free for TCP and UDP at once (libp2p listens on both), never handed out twice in
/// this test process. Picked below Linux's ephemeral range (32768-60999), so that no outgoing
/// connection takes it before meshd binds it, and below the replica ports meshd allocates
/// (20000-29999): asking the kernel for port 0 can give a port back that another node of a
/// test running in parallel was just given (a CI run saw one node's HTTP port chosen as
/// another's gRPC port).
pub fn free_port() -> u16 {
    static TAKEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        let port = rand::random_range(10_000..20_000u16);
        if taken.contains(&port) {
            continue;
        }
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port in 10000-19999");
}

pub fn write_secret(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let bytes: [u8; 32] = rand::random();
    std::fs::write(&path, hex::encode(bytes)).unwrap();
    path
}

/// One `meshd` process and what is needed to restart it as the same node.
pub struct TestNode {
    pub name: String,
    pub data_dir: PathBuf,
    pub secret: PathBuf,
    pub p2p: u16,
    pub grpc: u16,
    pub http: u16,
    pub join: Vec<u16>,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

impl TestNode {
    pub fn new(root: &Path, name: &str, secret: &Path, join: Vec<u16>) -> Self {
        Self {
            name: name.into(),
            data_dir: root.join(name),
            secret: secret.into(),
            p2p: free_port(),
            grpc: free_port(),
            http: free_port(),
            join,
            log: root.join(format!("{name}.log")),
            extra_args: vec![],
            child: None,
        }
    }

    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--secret-file".into(),
            self.secret.display().to_string(),
            "--p2p".into(),
            format!("127.0.0.1:{}", self.p2p),
            "--grpc".into(),
            format!("127.0.0.1:{}", self.grpc),
            "--http".into(),
            format!("127.0.0.1:{}", self.http),
            "--name".into(),
            self.name.clone(),
            "--no-mdns".into(),
        ];
        for j in &self.join {
            a.push("--join".into());
            a.push(format!("127.0.0.1:{j}"));
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(MESHD)
            .args(self.args())
            .env("RUST_LOG", "info,meshwork_node=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn meshd");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Sends a signal (`"STOP"`, `"CONT"`, …) to the running process.
    pub fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("running");
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {}", self.name);
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    pub async fn client(&self) -> MeshClient {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match MeshClient::connect(&self.endpoint()).await {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => {
                    panic!("{} not serving gRPC: {e}\n{}", self.name, self.log_tail())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `nodes` as this node sees them; empty if it does not answer.
    pub async fn nodes(&self) -> Vec<NodeView> {
        match MeshClient::connect(&self.endpoint()).await {
            Ok(mut c) => c.nodes().await.unwrap_or_default(),
            Err(_) => vec![],
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// N nodes sharing one secret; node 0 is the one the others join through.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
}

impl TestCluster {
    pub fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = write_secret(dir.path(), "secret");
        let mut nodes: Vec<TestNode> = Vec::new();
        for i in 0..n {
            let join = nodes.first().map(|n0| vec![n0.p2p]).unwrap_or_default();
            let mut node = TestNode::new(dir.path(), &format!("n{i}"), &secret, join);
            node.start();
            nodes.push(node);
        }
        Self { dir, nodes }
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("----- {} -----\n{}", n.name, n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until `observer` sees exactly the given names in the given state.
    pub async fn wait_states(&self, observer: usize, expect: &[(&str, &str)], within: Duration) {
        let what = format!("{} sees {:?}", self.nodes[observer].name, expect);
        let node = &self.nodes[observer];
        wait_until(within, &what, || async {
            let seen = node.nodes().await;
            seen.len() == expect.len()
                && expect
                    .iter()
                    .all(|(name, state)| seen.iter().any(|n| n.name == *name && n.state == *state))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }
}

/// Polls `cond` every 100 ms until it holds or `within` passes.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {within:?} waiting until {what}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Builds the example functions once per test process and returns the path of one module.
/// Fails with instructions when the wasm32-wasip1 target is missing.
pub fn example_wasm(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
            let out = Command::new("cargo")
                .args(["build", "--release", "--target", "wasm32-wasip1", "--manifest-path"])
                .arg(examples.join("Cargo.toml"))
                .output()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building examples/ failed (is the target installed? `rustup target add wasm32-wasip1`):\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(examples.join("target/wasm32-wasip1/release"))
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A plain HTTP/1.1 request on loopback; returns (status, body).
pub async fn http_call(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body_at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    (status, out[body_at..].to_vec())
}

/// containerd's socket on Debian.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

/// Kills and deletes every container and image in a containerd namespace, then the namespace.
pub fn remove_containerd_namespace(ns: &str) {
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .args(["--namespace", ns])
            .args(args)
            .output()
    };
    if let Ok(out) = ctr(&["container", "ls", "-q"]) {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        for id in &ids {
            let _ = ctr(&["task", "kill", "-s", "SIGKILL", id]);
        }
        for id in &ids {
            let _ = ctr(&["task", "delete", "-f", id]);
            let _ = ctr(&["container", "delete", id]);
        }
    }
    if let Ok(out) = ctr(&["image", "ls", "-q"]) {
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = ctr(&["image", "rm", name]);
        }
    }
    let _ = Command::new("ctr").args(["namespace", "rm", ns]).output();
}

/// N nodes (2 CPUs and 1 GiB each), each with its own containerd namespace, all removed when
/// dropped.
pub struct Mesh {
    pub cluster: TestCluster,
    pub namespaces: Vec<String>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for n in &mut self.cluster.nodes {
            n.kill9();
        }
        for ns in &self.namespaces {
            remove_containerd_namespace(ns);
        }
    }
}

impl Mesh {
    /// Starts `n` nodes joined through the first and waits until node 0 sees all alive.
    pub async fn start(n: usize, tag: &str) -> Self {
        Self::start_with(n, tag, &[]).await
    }

    /// [`Mesh::start`] with `extra` flags for every node.
    pub async fn start_with(n: usize, tag: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = write_secret(dir.path(), "secret");
        let mut nodes: Vec<TestNode> = Vec::new();
        let mut namespaces = Vec::new();
        for i in 0..n {
            let join = nodes.first().map(|n0| vec![n0.p2p]).unwrap_or_default();
            let mut node = TestNode::new(dir.path(), &format!("n{i}"), &secret, join);
            let ns = format!("mw-{tag}-{}-{i}", std::process::id());
            node.extra_args = vec![
                "--containerd-namespace".into(),
                ns.clone(),
                "--cpu".into(),
                "2".into(),
                "--memory".into(),
                "1Gi".into(),
            ];
            node.extra_args.extend(extra.iter().map(|a| a.to_string()));
            node.start();
            nodes.push(node);
            namespaces.push(ns);
        }
        let mesh = Mesh {
            cluster: TestCluster { dir, nodes },
            namespaces,
        };
        let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let expect: Vec<(&str, &str)> = names.iter().map(|s| (s.as_str(), "alive")).collect();
        mesh.cluster
            .wait_states(0, &expect, Duration::from_secs(60))
            .await;
        mesh
    }

    pub async fn client(&self, i: usize) -> MeshClient {
        self.cluster.nodes[i].client().await
    }

    /// Polls `cond` every 200 ms until it holds; fails with every node's log after `within`
    /// seconds.
    pub async fn wait(&self, within: u64, what: &str, mut cond: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(within);
        loop {
            if cond().await {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {within} s waiting until {what}\n{}",
                    self.cluster.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
