//! A cluster of real `meshd` processes, one per namespace, and the nemesis
//! and client operations the scenarios use.
//!
//! The scenarios test the binaries exactly as they ship: `meshd` is started
//! inside each host namespace with `ip netns exec`, talks to its peers over
//! the bridge, and is driven and observed only through `meshctl` and its HTTP
//! port. Everything waits by polling ([`Cluster::wait_until`]), never by a fixed
//! sleep, and every wait is bounded; when one times out, the tail of every
//! node's log is printed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use crate::containers::{NodeStatus, StatusBoard};
use crate::exec::{CmdOutput, run};
use crate::firewall::Faults;
use crate::history::{History, OpKind, Outcome};
use crate::netns::{Netns, skip_unless_capable};
use crate::timing::{deadline, secs};

/// Port of the p2p listener (QUIC/UDP and TCP) on every host's address.
pub const P2P_PORT: u16 = 7000;
/// Port of the gRPC API on every host's address.
pub const GRPC_PORT: u16 = 7001;
/// Port of the HTTP endpoint (`/healthz`, `/metrics`) on every host's address.
pub const HTTP_PORT: u16 = 7002;

/// Time limit of one `meshctl` call (a paused node never answers).
pub const MESHCTL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often [`Cluster::wait_until`] polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// One member as `meshctl nodes --json` prints it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeView {
    /// The member's name (`--name`).
    pub name: String,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Multiaddrs it listens on.
    pub addrs: Vec<String>,
    /// `alive`, `suspect` or `dead`.
    pub state: String,
    /// CPU capacity in millicores.
    pub cpu_total_millis: u64,
    /// Unallocated CPU in millicores.
    pub cpu_free_millis: u64,
    /// Memory capacity in bytes.
    pub memory_total_bytes: u64,
    /// Unallocated memory in bytes.
    pub memory_free_bytes: u64,
    /// Free disk in bytes.
    pub disk_free_bytes: u64,
    /// Number of workloads it runs.
    pub workloads: u64,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Milliseconds since the answering node last heard from it.
    pub last_seen_ms_ago: u64,
    /// True for the answering node itself.
    pub is_self: bool,
}

/// One entry as `meshctl state ls --json` prints it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct StateEntry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// Hybrid logical clock stamp of the winning write.
    pub stamp: serde_json::Value,
    /// Peer id of the node that accepted the winning write.
    pub origin: serde_json::Value,
}

/// Knobs for [`Cluster::start`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `RUST_LOG` for the nodes; default: env `CHAOS_RUST_LOG`, else `RUST_LOG`,
    /// else `info`.
    pub rust_log: Option<String>,
    /// Extra arguments for every `meshd`.
    pub extra_args: Vec<String>,
    /// Extra arguments for one node only (by host index), after `extra_args`;
    /// e.g. `{3: ["--test-lie", "corrupt-pieces"]}`. Kept across restarts.
    pub node_args: BTreeMap<usize, Vec<String>>,
    /// `--cpu` for every node.
    pub cpu: Option<u32>,
    /// `--memory` for every node.
    pub memory: Option<u64>,
    /// `--label K=V` for every node.
    pub labels: Vec<(String, String)>,
    /// Deadline for one node to answer `/healthz` after its start.
    pub ready_timeout: Duration,
    /// Deadline for every node to list every node alive after the start.
    pub converge_timeout: Duration,
    /// Give every node its own containerd namespace (`--containerd-namespace`,
    /// named like its network namespace, see [`Cluster::containerd_namespace`])
    /// and remove those namespaces, with everything in them, on drop. For the
    /// service scenarios; see [`crate::containers`].
    pub containerd: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            rust_log: None,
            extra_args: Vec::new(),
            node_args: BTreeMap::new(),
            cpu: None,
            memory: None,
            labels: Vec::new(),
            ready_timeout: deadline(secs(20.0)),
            converge_timeout: deadline(secs(30.0)),
            containerd: false,
        }
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    data_dir: PathBuf,
    log: PathBuf,
    secret_file: PathBuf,
    /// `--join` targets (host indices) used on the first start.
    join: Vec<usize>,
    /// True for nodes of the cluster; false for extras (e.g. a wrong secret).
    member: bool,
    child: Option<Child>,
    pid: Option<u32>,
    paused: bool,
    starts: u32,
}

/// Paths of `meshd` and `meshctl`.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `meshd`.
    pub meshd: PathBuf,
    /// `meshctl`.
    pub meshctl: PathBuf,
}

impl Binaries {
    /// From env `MESHD_BIN` / `MESHCTL_BIN`, else next to the test binary
    /// (`target/<profile>/`, the parent of the test binary's `deps/`).
    pub fn locate() -> Result<Self> {
        let exe = std::env::current_exe().context("current_exe")?;
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| anyhow!("cannot derive target dir from {}", exe.display()))?
            .to_path_buf();
        let pick = |env: &str, name: &str| -> Result<PathBuf> {
            let p = std::env::var_os(env)
                .map(PathBuf::from)
                .unwrap_or_else(|| dir.join(name));
            if !p.is_file() {
                bail!(
                    "{name} not found at {} (build it first: `cargo build -p meshwork-node \
                     -p meshwork-client`, or set {env})",
                    p.display()
                );
            }
            Ok(p)
        };
        Ok(Binaries {
            meshd: pick("MESHD_BIN", "meshd")?,
            meshctl: pick("MESHCTL_BIN", "meshctl")?,
        })
    }
}

/// Lines of each log printed when a wait fails (env `CHAOS_LOG_LINES`, default 40).
fn log_lines() -> usize {
    std::env::var("CHAOS_LOG_LINES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

/// The last `n` lines of a file (empty if unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(f) = File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].join("\n")
}

/// A cluster of `meshd` processes in their own namespaces, with a nemesis.
///
/// All methods take `&self` so a scenario can poll from helper threads while
/// the main thread injects faults. Dropping it kills every node and removes the
/// namespaces; the log directory is kept (and its path printed) if a wait or
/// check failed, the test panicked, or env `CHAOS_KEEP=1`.
pub struct Cluster {
    bins: Binaries,
    opts: ClusterOptions,
    size: usize,
    slots: Mutex<Vec<Slot>>,
    faults: Mutex<Faults>,
    history: History,
    failed: AtomicBool,
    logs_dumped: AtomicBool,
    status: StatusBoard,
    // Declared after the slots so namespaces go after the processes.
    net: Netns,
    dir: Option<tempfile::TempDir>,
    secret_file: PathBuf,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("size", &self.size)
            .field("net", &self.net)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Prints the skip line and returns `None` when this machine cannot run
    /// the scenarios (not root, no `ip netns`); otherwise starts the cluster
    /// and panics (after printing the node logs) if that fails.
    pub fn start_or_skip(test: &str, n: usize, opts: ClusterOptions) -> Option<Cluster> {
        if skip_unless_capable(test) {
            return None;
        }
        match Cluster::start(n, opts) {
            Ok(c) => Some(c),
            Err(e) => panic!("{test}: starting a {n}-node cluster failed: {e:#}"),
        }
    }

    /// Starts `n` nodes: writes a fresh secret with `meshctl secret new`,
    /// starts node 0, then the others joining node 0, and waits until every
    /// node lists every node alive.
    pub fn start(n: usize, opts: ClusterOptions) -> Result<Cluster> {
        assert!(n >= 1, "a cluster needs at least one node");
        let bins = Binaries::locate()?;
        let net = Netns::new()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("meshwork-chaos-{}-", net.id()))
            .tempdir()?;
        let secret = new_secret(&bins)?;
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("{secret}\n"))?;
        let history = History::new();
        if opts.containerd {
            crate::containers::check_containerd()?;
            crate::containers::cleanup_stale_namespaces();
        }
        let cluster = Cluster {
            bins,
            opts,
            size: n,
            slots: Mutex::new(Vec::new()),
            faults: Mutex::new(Faults::default()),
            history,
            failed: AtomicBool::new(false),
            logs_dumped: AtomicBool::new(false),
            status: StatusBoard::default(),
            net,
            dir: Some(dir),
            secret_file,
        };
        eprintln!(
            "chaos: run {} bridge {} ({}/24), logs in {}",
            cluster.net.id(),
            cluster.net.bridge(),
            cluster.net.gateway(),
            cluster.dir().display()
        );
        for i in 0..n {
            let secret_file = cluster.secret_file.clone();
            let join = if i == 0 { vec![] } else { vec![0] };
            cluster.add_slot(i, format!("node{i}"), secret_file, join, true)?;
        }
        let result = (|| -> Result<()> {
            cluster.spawn(0)?;
            cluster.wait_ready(0)?;
            for i in 1..n {
                cluster.spawn(i)?;
            }
            for i in 1..n {
                cluster.wait_ready(i)?;
            }
            let all: Vec<usize> = (0..n).collect();
            cluster.wait_all_alive(&all, &all, cluster.opts.converge_timeout)?;
            Ok(())
        })();
        if let Err(e) = result {
            cluster.mark_failed();
            return Err(e);
        }
        cluster
            .history
            .event(format!("cluster of {n} nodes started"));
        Ok(cluster)
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir lives until drop").path()
    }

    fn add_slot(
        &self,
        index: usize,
        name: String,
        secret_file: PathBuf,
        join: Vec<usize>,
        member: bool,
    ) -> Result<()> {
        self.net.add_host(index)?;
        let data_dir = self.dir().join(format!("{name}-data"));
        std::fs::create_dir_all(&data_dir)?;
        let log = self.dir().join(format!("{name}.log"));
        let mut slots = self.slots.lock().unwrap();
        assert_eq!(slots.len(), index, "slots are added in index order");
        slots.push(Slot {
            name,
            data_dir,
            log,
            secret_file,
            join,
            member,
            child: None,
            pid: None,
            paused: false,
            starts: 0,
        });
        Ok(())
    }

    /// Number of cluster members (not counting extra nodes).
    pub fn len(&self) -> usize {
        self.size
    }

    /// True for a cluster of zero members (never: `start` needs one).
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Number of nodes including extras started later.
    pub fn node_count(&self) -> usize {
        self.slots.lock().unwrap().len()
    }

    /// Indices of the cluster members.
    pub fn members(&self) -> Vec<usize> {
        (0..self.size).collect()
    }

    /// The shared history of this run (operations and nemesis events).
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The network of this run.
    pub fn net(&self) -> &Netns {
        &self.net
    }

    /// The `--name` of node `i`.
    pub fn name(&self, i: usize) -> String {
        self.slots.lock().unwrap()[i].name.clone()
    }

    /// The address of node `i`'s host.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.net.host_ip(i)
    }

    /// `HOST:PORT` of node `i`'s p2p listener.
    pub fn p2p_addr(&self, i: usize) -> String {
        format!("{}:{P2P_PORT}", self.ip(i))
    }

    /// `http://HOST:PORT` of node `i`'s gRPC API.
    pub fn grpc_endpoint(&self, i: usize) -> String {
        format!("http://{}:{GRPC_PORT}", self.ip(i))
    }

    /// `HOST:PORT` of node `i`'s HTTP endpoint.
    pub fn http_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ip(i), HTTP_PORT))
    }

    /// Path of node `i`'s log file (stdout and stderr, all starts).
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.slots.lock().unwrap()[i].log.clone()
    }

    /// This run's temp dir (logs, data dirs, secrets; kept after a failure):
    /// scenarios put their own files (image tars, downloads) here too.
    pub fn work_dir(&self) -> PathBuf {
        self.dir().to_path_buf()
    }

    /// Node `i`'s data directory (`--data-dir`; kept across restarts).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.slots.lock().unwrap()[i].data_dir.clone()
    }

    /// Node `i`'s whole log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// Pid of node `i`'s running `meshd`, if running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        let slots = self.slots.lock().unwrap();
        slots[i].child.as_ref().and_then(|_| slots[i].pid)
    }

    /// Node `i`'s containerd namespace (the same name as its network
    /// namespace); only passed to `meshd` with [`ClusterOptions::containerd`].
    pub fn containerd_namespace(&self, i: usize) -> String {
        self.net.namespace_name(i)
    }

    /// Whether the harness has node `i` running, paused or down, as a shared
    /// board a background thread can read (see [`crate::containers::ReplicaWatch`]).
    pub fn status_board(&self) -> StatusBoard {
        self.status.clone()
    }

    /// Node `i`'s status as the harness left it (up, paused, down).
    pub fn node_status(&self, i: usize) -> NodeStatus {
        self.status.get(i)
    }

    /// True while node `i`'s process runs (paused counts as running).
    pub fn is_running(&self, i: usize) -> bool {
        let mut slots = self.slots.lock().unwrap();
        match slots[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn meshd_args(&self, i: usize, slot: &Slot) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--data-dir".into(),
            slot.data_dir.display().to_string(),
            "--secret-file".into(),
            slot.secret_file.display().to_string(),
            "--p2p".into(),
            self.p2p_addr(i),
            "--grpc".into(),
            format!("{}:{GRPC_PORT}", self.ip(i)),
            "--http".into(),
            format!("{}:{HTTP_PORT}", self.ip(i)),
            "--name".into(),
            slot.name.clone(),
            "--no-mdns".into(),
        ];
        for j in &slot.join {
            a.push("--join".into());
            a.push(self.p2p_addr(*j));
        }
        if let Some(cpu) = self.opts.cpu {
            a.push("--cpu".into());
            a.push(cpu.to_string());
        }
        if let Some(m) = self.opts.memory {
            a.push("--memory".into());
            a.push(m.to_string());
        }
        if self.opts.containerd {
            a.push("--containerd-namespace".into());
            a.push(self.containerd_namespace(i));
        }
        for (k, v) in &self.opts.labels {
            a.push("--label".into());
            a.push(format!("{k}={v}"));
        }
        a.extend(self.opts.extra_args.iter().cloned());
        if let Some(extra) = self.opts.node_args.get(&i) {
            a.extend(extra.iter().cloned());
        }
        a
    }

    fn spawn(&self, i: usize) -> Result<()> {
        let mut slots = self.slots.lock().unwrap();
        let slot = &mut slots[i];
        if let Some(c) = slot.child.as_mut()
            && matches!(c.try_wait(), Ok(None))
        {
            bail!("node {i} is already running");
        }
        let args = self.meshd_args(i, slot);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&slot.log)?;
        slot.starts += 1;
        writeln!(
            log,
            "==== chaos harness: start #{} of {} at +{:.3}s: meshd {} ====",
            slot.starts,
            slot.name,
            self.history.now().as_secs_f64(),
            args.join(" ")
        )?;
        let rust_log = self
            .opts
            .rust_log
            .clone()
            .or_else(|| std::env::var("CHAOS_RUST_LOG").ok())
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".into());
        let child = self
            .net
            .command(i, &self.bins.meshd)
            .args(&args)
            .env("RUST_LOG", rust_log)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning meshd for node {i}"))?;
        slot.pid = Some(child.id());
        slot.child = Some(child);
        slot.paused = false;
        self.status.set(i, NodeStatus::Up);
        Ok(())
    }

    /// Waits until node `i` answers `GET /healthz` with 200 (fails fast if it exits).
    pub fn wait_ready(&self, i: usize) -> Result<Duration> {
        let t = self.opts.ready_timeout;
        self.wait_for(t, &format!("node {i} healthy"), || {
            if !self.is_running(i) {
                return Err(format!("meshd of node {i} exited"));
            }
            match self.http_get(i, "/healthz") {
                Ok((200, _)) => Ok(()),
                Ok((code, body)) => Err(format!("/healthz answered {code}: {body}")),
                Err(e) => Err(format!("/healthz: {e}")),
            }
        })
        .map(|(_, d)| d)
    }

    /// A minimal `GET path` against node `i`'s HTTP port from the root
    /// namespace; returns status code and body.
    pub fn http_get(&self, i: usize, path: &str) -> Result<(u16, String)> {
        let addr = self.http_addr(i);
        let timeout = Duration::from_secs(3);
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("bad HTTP answer: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    }

    // ---------------------------------------------------------------- nemesis

    /// SIGKILLs node `i` and reaps it.
    pub fn kill(&self, i: usize) -> Result<()> {
        let mut slots = self.slots.lock().unwrap();
        let slot = &mut slots[i];
        let mut child = slot
            .child
            .take()
            .ok_or_else(|| anyhow!("node {i} is not running"))?;
        let _ = child.kill();
        let _ = child.wait();
        slot.paused = false;
        drop(slots);
        self.status.set(i, NodeStatus::Down);
        self.history.event(format!("kill -9 n{i}"));
        Ok(())
    }

    /// A host crash: SIGKILLs node `i`'s `meshd` and then every other process
    /// in its network namespace (its containers, which joined that namespace);
    /// their containerd shims live on and report the tasks stopped. Returns
    /// how many processes besides `meshd` were killed.
    pub fn crash_host(&self, i: usize) -> Result<usize> {
        {
            let mut slots = self.slots.lock().unwrap();
            let slot = &mut slots[i];
            let mut child = slot
                .child
                .take()
                .ok_or_else(|| anyhow!("node {i} is not running"))?;
            let _ = child.kill();
            let _ = child.wait();
            slot.paused = false;
        }
        self.status.set(i, NodeStatus::Down);
        let ns = self.net.namespace_name(i);
        let mut killed = 0;
        // A container may fork between listing and killing: a few rounds.
        for _ in 0..5 {
            let pids = crate::exec::run_ok("ip", &["netns", "pids", &ns])?;
            let pids: Vec<&str> = pids.split_whitespace().collect();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                if crate::exec::run_ok("kill", &["-KILL", pid]).is_ok() {
                    killed += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.history.event(format!(
            "crash host n{i}: kill -9 meshd and {killed} container process(es)"
        ));
        Ok(killed)
    }

    /// A graceful stop, as a service manager does it: SIGTERMs node `i`'s
    /// `meshd` and waits up to `limit` for it to exit (its containers keep
    /// running: `meshd` leaves them for the next start to adopt). Fails,
    /// after a SIGKILL, if it is still running then, and fails if it exits
    /// with anything but status 0. Returns how long the exit took.
    pub fn stop(&self, i: usize, limit: Duration) -> Result<Duration> {
        let mut child = {
            let mut slots = self.slots.lock().unwrap();
            let slot = &mut slots[i];
            let child = slot
                .child
                .take()
                .ok_or_else(|| anyhow!("node {i} is not running"))?;
            slot.paused = false;
            child
        };
        let began = Instant::now();
        let sent = crate::exec::run_ok("kill", &["-TERM", &child.id().to_string()]);
        self.history.event(format!("SIGTERM n{i}"));
        let mut status = None;
        if sent.is_ok() {
            while began.elapsed() < limit {
                if let Ok(Some(s)) = child.try_wait() {
                    status = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let took = began.elapsed();
        self.status.set(i, NodeStatus::Down);
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            self.mark_failed();
            self.history.event(format!(
                "n{i} still running {:.1}s after SIGTERM: SIGKILLed",
                took.as_secs_f64()
            ));
            bail!(
                "node {i} did not exit within {:.1}s of SIGTERM ({})",
                limit.as_secs_f64(),
                sent.err().map(|e| format!("{e:#}")).unwrap_or_default()
            );
        };
        self.history.event(format!(
            "n{i} exited after SIGTERM in {:.1}s: {status}",
            took.as_secs_f64()
        ));
        if !status.success() {
            self.mark_failed();
            bail!(
                "node {i} exited with {status} after SIGTERM; last log line: {}",
                tail(&self.log_path(i), 1)
            );
        }
        Ok(took)
    }

    fn signal(&self, i: usize, sig: &str) -> Result<()> {
        let pid = self
            .pid(i)
            .ok_or_else(|| anyhow!("node {i} is not running"))?;
        crate::exec::run_ok("kill", &[sig, &pid.to_string()])?;
        Ok(())
    }

    /// SIGSTOPs node `i`.
    pub fn pause(&self, i: usize) -> Result<()> {
        self.signal(i, "-STOP")?;
        self.slots.lock().unwrap()[i].paused = true;
        self.status.set(i, NodeStatus::Paused);
        self.history.event(format!("SIGSTOP n{i}"));
        Ok(())
    }

    /// SIGCONTs node `i`.
    pub fn resume(&self, i: usize) -> Result<()> {
        self.signal(i, "-CONT")?;
        self.slots.lock().unwrap()[i].paused = false;
        self.status.set(i, NodeStatus::Up);
        self.history.event(format!("SIGCONT n{i}"));
        Ok(())
    }

    /// Starts node `i` again with the same data dir and name (it must have
    /// been killed), joining every other running member, and waits for `/healthz`.
    pub fn restart(&self, i: usize) -> Result<()> {
        let others: Vec<usize> = (0..self.node_count())
            .filter(|&j| j != i && self.is_running(j) && self.slots.lock().unwrap()[j].member)
            .collect();
        {
            let mut slots = self.slots.lock().unwrap();
            if slots[i].member {
                slots[i].join = others;
            }
        }
        self.spawn(i)?;
        self.history.event(format!("restart n{i}"));
        self.wait_ready(i)?;
        Ok(())
    }

    /// Starts an extra node (not a member) on a new host with its own secret
    /// (`secret_hex`, 64 hex chars), joining `join`; returns its index.
    /// Does not wait for `/healthz`: see [`Cluster::wait_ready`].
    pub fn start_extra_node_with_secret(
        &self,
        name: &str,
        secret_hex: &str,
        join: usize,
    ) -> Result<usize> {
        let index = self.node_count();
        let secret_file = self.dir().join(format!("{name}.secret"));
        std::fs::write(&secret_file, format!("{secret_hex}\n"))?;
        self.add_slot(index, name.to_string(), secret_file, vec![join], false)?;
        // New host: bring its firewall table in line with the faults in force.
        self.apply_faults()?;
        self.spawn(index)?;
        self.history.event(format!(
            "start extra node n{index} ({name}) with another secret, joining n{join}"
        ));
        Ok(index)
    }

    /// A fresh secret from `meshctl secret new`.
    pub fn new_secret(&self) -> Result<String> {
        new_secret(&self.bins)
    }

    fn apply_faults(&self) -> Result<()> {
        let f = self.faults.lock().unwrap().clone();
        self.net.apply_faults(&f)
    }

    fn set_faults(&self, change: impl FnOnce(&mut Faults)) -> Result<()> {
        let desc = {
            let mut f = self.faults.lock().unwrap();
            change(&mut f);
            f.describe()
        };
        self.apply_faults()?;
        self.history.event(format!("network: {desc}"));
        Ok(())
    }

    /// Symmetric partition into `groups` (hosts in no group are isolated).
    pub fn partition(&self, groups: &[&[usize]]) -> Result<()> {
        let g: Vec<Vec<usize>> = groups.iter().map(|g| g.to_vec()).collect();
        self.set_faults(|f| f.partition = Some(g))
    }

    /// Drops every packet from other hosts into node `into` (it can still send).
    pub fn one_way_drop(&self, into: usize) -> Result<()> {
        self.set_faults(|f| {
            f.drop_into.insert(into);
        })
    }

    /// Drops `percent` % of packets on every link between hosts, at random.
    pub fn random_drop(&self, percent: u8) -> Result<()> {
        self.set_faults(|f| f.drop_percent = percent.min(100))
    }

    /// Drops TCP from other hosts to `port` of node `host` (as a firewall that forgot it).
    pub fn drop_tcp_port(&self, host: usize, port: u16) -> Result<()> {
        self.set_faults(|f| {
            f.drop_tcp_port.insert((host, port));
        })
    }

    /// Removes every network fault.
    pub fn heal(&self) -> Result<()> {
        self.set_faults(|f| *f = Faults::default())
    }

    /// The network faults currently in force.
    pub fn faults(&self) -> Faults {
        self.faults.lock().unwrap().clone()
    }

    // ----------------------------------------------------------------- client

    /// Runs `meshctl --endpoint <node i> args...` inside node `i`'s namespace
    /// (over its own address, so network faults between hosts do not apply).
    pub fn meshctl(&self, i: usize, args: &[&str]) -> Result<CmdOutput> {
        self.meshctl_timeout(i, args, MESHCTL_TIMEOUT)
    }

    /// [`Cluster::meshctl`] with an explicit time limit.
    pub fn meshctl_timeout(&self, i: usize, args: &[&str], timeout: Duration) -> Result<CmdOutput> {
        let mut cmd = self.net.command(i, &self.bins.meshctl);
        cmd.arg("--endpoint").arg(self.grpc_endpoint(i)).args(args);
        run(&mut cmd, None, timeout)
    }

    /// [`Cluster::meshctl`], failing unless it exits 0; returns stdout.
    pub fn meshctl_ok(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.meshctl(i, args)?;
        if !out.success() {
            bail!("meshctl {} on node {i}: {}", args.join(" "), out.combined());
        }
        Ok(out.stdout)
    }

    /// Node `i`'s membership view (`meshctl nodes --json`).
    pub fn nodes(&self, i: usize) -> Result<Vec<NodeView>> {
        let out = self.meshctl_ok(i, &["nodes", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `nodes --json`: {out}"))
    }

    /// Node `i`'s view as `name -> state`.
    pub fn states(&self, i: usize) -> Result<BTreeMap<String, String>> {
        Ok(self
            .nodes(i)?
            .into_iter()
            .map(|n| (n.name, n.state))
            .collect())
    }

    /// What `observer` says about node `target` (`None`: not listed).
    pub fn state_of(&self, observer: usize, target: usize) -> Result<Option<String>> {
        let name = self.name(target);
        Ok(self.states(observer)?.remove(&name))
    }

    /// `state put key value` on node `i`, recorded in the history.
    pub fn put(&self, i: usize, key: &str, value: &str) -> Outcome {
        let kind = OpKind::Write {
            key: key.into(),
            value: value.into(),
        };
        self.history.invoke(i, kind, || {
            match self.meshctl(i, &["state", "put", key, value]) {
                Ok(out) if out.success() => Outcome::Ok(None),
                Ok(out) => Outcome::Info(out.combined()),
                Err(e) => Outcome::Fail(format!("{e:#}")),
            }
        })
    }

    /// `state get key` on node `i`, not recorded; `Ok(None)` for NOT_FOUND.
    pub fn get(&self, i: usize, key: &str) -> Result<Option<String>> {
        let out = self.meshctl(i, &["state", "get", key])?;
        if out.success() {
            let mut v = out.stdout;
            if v.ends_with('\n') {
                v.pop();
            }
            return Ok(Some(v));
        }
        if is_not_found(&out) {
            return Ok(None);
        }
        bail!("meshctl state get {key} on node {i}: {}", out.combined())
    }

    /// [`Cluster::get`], recorded in the history.
    pub fn read(&self, i: usize, key: &str) -> Result<Option<String>> {
        let start = Instant::now();
        let r = self.get(i, key);
        let outcome = match &r {
            Ok(v) => Outcome::Ok(v.clone()),
            Err(e) => Outcome::Info(format!("{e:#}")),
        };
        self.history.record(
            i,
            OpKind::Read { key: key.into() },
            start,
            Instant::now(),
            outcome,
        );
        r
    }

    /// `state rm key` on node `i`, recorded in the history.
    pub fn delete(&self, i: usize, key: &str) -> Outcome {
        self.history
            .invoke(i, OpKind::Delete { key: key.into() }, || {
                match self.meshctl(i, &["state", "rm", key]) {
                    Ok(out) if out.success() => Outcome::Ok(None),
                    Ok(out) if is_not_found(&out) => Outcome::Fail(out.combined()),
                    Ok(out) => Outcome::Info(out.combined()),
                    Err(e) => Outcome::Fail(format!("{e:#}")),
                }
            })
    }

    /// `state ls prefix --json` on node `i`.
    pub fn ls(&self, i: usize, prefix: &str) -> Result<Vec<StateEntry>> {
        let out = self.meshctl_ok(i, &["state", "ls", prefix, "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `state ls --json`: {out}"))
    }

    /// Node `i`'s replica under `prefix` as `key -> value`.
    pub fn state_map(&self, i: usize, prefix: &str) -> Result<BTreeMap<String, String>> {
        Ok(self
            .ls(i, prefix)?
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect())
    }

    // ---------------------------------------------------------------- waiting

    /// Polls `check` every 100 ms until it returns `Ok`, for at most `limit`.
    ///
    /// `Err(reason)` means "not yet" and the last reason is reported on
    /// timeout, together with the tail of every node's log and the history.
    /// Returns the value and the time it took.
    pub fn wait_for<T>(
        &self,
        limit: Duration,
        description: &str,
        mut check: impl FnMut() -> Result<T, String>,
    ) -> Result<(T, Duration)> {
        let start = Instant::now();
        let mut polls = 0u64;
        loop {
            let round = Instant::now();
            polls += 1;
            let last = match check() {
                Ok(v) => return Ok((v, start.elapsed())),
                Err(why) => why,
            };
            let exits = self.unexpected_exits();
            if !exits.is_empty() {
                self.mark_failed();
                self.dump_logs();
                eprintln!("{}", self.history.timeline());
                bail!(
                    "while waiting for: {description}: meshd exited without the harness \
                     killing it: {}; last: {last}",
                    exits.join("; ")
                );
            }
            if start.elapsed() >= limit {
                self.mark_failed();
                self.dump_logs();
                eprintln!("{}", self.history.timeline());
                bail!(
                    "timed out after {:.1}s ({polls} polls) waiting for: {description}; \
                     last: {last}",
                    limit.as_secs_f64()
                );
            }
            if let Some(rest) = POLL_INTERVAL.checked_sub(round.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }

    /// Nodes whose `meshd` exited although the harness did not kill it, with
    /// how it ended and its last log line (a crash, or a signal from outside
    /// the harness, e.g. someone's `pkill meshd`).
    pub fn unexpected_exits(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut slots = self.slots.lock().unwrap();
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(child) = slot.child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                let how = match (status.code(), status.signal()) {
                    (_, Some(sig)) => format!("killed by signal {sig}"),
                    (Some(code), _) => format!("exit code {code}"),
                    _ => status.to_string(),
                };
                let last = tail(&slot.log, 1);
                out.push(format!("n{i} ({}) {how}; last log line: {last}", slot.name));
            }
        }
        out
    }

    /// Polls `cond` every 100 ms until true, for at most `limit`; see
    /// [`Cluster::wait_for`]. Returns how long it took.
    pub fn wait_until(
        &self,
        limit: Duration,
        description: &str,
        mut cond: impl FnMut() -> bool,
    ) -> Result<Duration> {
        self.wait_for(limit, description, || {
            if cond() {
                Ok(())
            } else {
                Err("condition false".into())
            }
        })
        .map(|(_, d)| d)
    }

    /// Waits until every node in `observers` lists every node in `targets` as alive.
    pub fn wait_all_alive(
        &self,
        observers: &[usize],
        targets: &[usize],
        limit: Duration,
    ) -> Result<Duration> {
        let names: Vec<String> = targets.iter().map(|&t| self.name(t)).collect();
        self.wait_for(
            limit,
            &format!("{observers:?} all list {names:?} alive"),
            || {
                for &o in observers {
                    let view = self.states(o).map_err(|e| format!("n{o}: {e:#}"))?;
                    for n in &names {
                        match view.get(n).map(String::as_str) {
                            Some("alive") => {}
                            other => return Err(format!("n{o} sees {n} as {other:?}")),
                        }
                    }
                }
                Ok(())
            },
        )
        .map(|(_, d)| d)
    }

    /// Waits until every node in `observers` says `target` is in a state
    /// accepted by `accept` (`None` = not listed); returns the time it took.
    pub fn wait_state(
        &self,
        observers: &[usize],
        target: usize,
        limit: Duration,
        description: &str,
        accept: impl Fn(Option<&str>) -> bool,
    ) -> Result<Duration> {
        let name = self.name(target);
        self.wait_for(limit, description, || {
            for &o in observers {
                let view = self.states(o).map_err(|e| format!("n{o}: {e:#}"))?;
                let s = view.get(&name).map(String::as_str);
                if !accept(s) {
                    return Err(format!("n{o} sees {name} as {s:?}"));
                }
            }
            Ok(())
        })
        .map(|(_, d)| d)
    }

    /// Waits until `key` reads `value` on every node in `nodes`.
    pub fn wait_value_everywhere(
        &self,
        nodes: &[usize],
        key: &str,
        value: &str,
        limit: Duration,
    ) -> Result<Duration> {
        self.wait_for(limit, &format!("{key} = {value:?} on {nodes:?}"), || {
            for &n in nodes {
                match self.get(n, key) {
                    Ok(Some(v)) if v == value => {}
                    other => return Err(format!("n{n}: {other:?}")),
                }
            }
            Ok(())
        })
        .map(|(_, d)| d)
    }

    /// Prints the last lines (env `CHAOS_LOG_LINES`, default 40) of every node's log.
    pub fn dump_logs(&self) {
        self.logs_dumped.store(true, Ordering::Relaxed);
        let n = log_lines();
        let slots: Vec<(String, PathBuf)> = self
            .slots
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.name.clone(), s.log.clone()))
            .collect();
        for (i, (name, log)) in slots.iter().enumerate() {
            eprintln!(
                "---- n{i} {name}: last {n} lines of {} ----\n{}",
                log.display(),
                tail(log, n)
            );
        }
        eprintln!("---- end of logs ----");
    }

    /// Marks the run failed: its logs are kept after drop.
    pub fn mark_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let exits = self.unexpected_exits();
        if !exits.is_empty() {
            eprintln!(
                "chaos: meshd exited without the harness killing it: {}",
                exits.join("; ")
            );
            self.mark_failed();
        }
        for slot in self.slots.get_mut().unwrap().iter_mut() {
            if let Some(mut c) = slot.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.net.cleanup();
        if self.opts.containerd {
            // After the processes (nothing restarts a container now) and the
            // network namespaces (whose deletion killed the containers' processes).
            for i in 0..self.slots.get_mut().unwrap().len() {
                crate::containers::remove_namespace(&self.containerd_namespace(i));
            }
        }
        let failed = panicking || self.failed.load(Ordering::Relaxed) || self.history.has_failed();
        if failed && !self.logs_dumped.load(Ordering::Relaxed) {
            self.dump_logs();
        }
        let keep = failed || std::env::var("CHAOS_KEEP").is_ok_and(|v| v == "1");
        if let Some(dir) = self.dir.take()
            && keep
        {
            let path = dir.keep();
            eprintln!("chaos: logs and data kept in {}", path.display());
        }
    }
}

fn is_not_found(out: &CmdOutput) -> bool {
    let t = out.combined().to_lowercase();
    t.contains("not found") || t.contains("not_found") || t.contains("notfound")
}

fn new_secret(bins: &Binaries) -> Result<String> {
    let out = run(
        Command::new(&bins.meshctl).args(["secret", "new"]),
        None,
        Duration::from_secs(10),
    )?;
    if !out.success() {
        bail!("meshctl secret new: {}", out.combined());
    }
    let s = out.stdout.trim().to_string();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("meshctl secret new printed {s:?}, expected 64 hex chars");
    }
    Ok(s)
}
