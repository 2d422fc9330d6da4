//! Container services under faults: what containerd really runs, sampled over
//! time, and the checks on those samples.
//!
//! The service scenarios do not trust what `meshd` reports about its
//! replicas; they ask containerd. Every node has its own containerd namespace
//! (named like its network namespace) in the one shared containerd, and
//! containers carry the labels `meshwork.service` and `meshwork.replica`
//! (batch job containers `meshwork.job` and `meshwork.job-index`: they are
//! sampled as service `job/<id>`, replica = index).
//! A [`ReplicaWatch`] thread lists the running tasks of every node's namespace
//! (`ctr -n NS task ls`, plus `ctr -n NS containers info ID` once per new
//! container for its labels) about twice a second and keeps every sample, with
//! the harness's status of each node (up, paused, down) at that moment. Each
//! change is also written to the history's timeline as an observation, so a
//! failed check prints which replica ran where, next to the faults and the
//! client operations. [`analyse`] then checks a window of samples: when the
//! exact count was first seen, and whether any sample after that (plus a
//! settle time) had a replica twice, missing, or out of range.
//!
//! Definitions used by the checks (for one service with `desired` replicas,
//! over a set of nodes):
//! * a sample is *exact* when every replica index `0..desired` has exactly one
//!   running container on those nodes and no other container of the service
//!   runs there; a sample in which a node's namespace could not be listed is
//!   *unknown* (neither exact nor a violation);
//! * the service *converged* at the first exact sample at or after the start of
//!   the window;
//! * *after convergence* means from `converged + settle` to the end of the
//!   window: every known sample there must be exact, so a replica running twice
//!   (on two nodes, or twice on one), missing, or out of range is reported with
//!   its time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use crate::cluster::Cluster;
use crate::exec::{CmdOutput, run};
use crate::history::{History, OpKind, Outcome};
use crate::netns::{capability_check, run_id_of_namespace};

/// Label naming a container's service.
pub const LABEL_SERVICE: &str = "meshwork.service";
/// Label naming a container's replica index.
pub const LABEL_REPLICA: &str = "meshwork.replica";
/// Label naming a batch job container's job id.
pub const LABEL_JOB: &str = "meshwork.job";
/// Label naming a batch job container's index.
pub const LABEL_JOB_INDEX: &str = "meshwork.job-index";
/// containerd's socket (the nodes use the default).
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Time limit of one `ctr` call.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(10);
/// Time limit of one `ctr` call of the [`ReplicaWatch`] (a namespace that
/// does not answer in time is unknown in that sample).
pub const CTR_SAMPLE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the harness did to a node's `meshd` last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeStatus {
    /// Running.
    Up,
    /// SIGSTOPped.
    Paused,
    /// Killed, or not started.
    Down,
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeStatus::Up => "up",
            NodeStatus::Paused => "paused",
            NodeStatus::Down => "down",
        })
    }
}

/// The status of every node, shared with background threads.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard(Arc<Mutex<BTreeMap<usize, NodeStatus>>>);

impl StatusBoard {
    /// Records node `i`'s status.
    pub fn set(&self, i: usize, status: NodeStatus) {
        self.0.lock().unwrap().insert(i, status);
    }

    /// Node `i`'s status ([`NodeStatus::Down`] if never started).
    pub fn get(&self, i: usize) -> NodeStatus {
        self.0
            .lock()
            .unwrap()
            .get(&i)
            .copied()
            .unwrap_or(NodeStatus::Down)
    }
}

// ------------------------------------------------------------------- ctr

/// Runs `ctr args...` (root namespace; containerd's socket is a file).
pub fn ctr(args: &[&str]) -> Result<CmdOutput> {
    run(Command::new("ctr").args(args), None, CTR_TIMEOUT)
}

fn ctr_ok(args: &[&str]) -> Result<String> {
    let out = ctr(args)?;
    if !out.success() {
        bail!("`ctr {}` failed: {}", args.join(" "), out.combined());
    }
    Ok(out.stdout)
}

/// Fails unless containerd answers `ctr version`.
pub fn check_containerd() -> Result<()> {
    ctr_ok(&["--connect-timeout", "2s", "version"])
        .map(|_| ())
        .context("containerd does not answer (start it with scripts/start-containerd.sh)")
}

/// Why this machine cannot run the service scenarios, or `Ok` if it can:
/// the namespace requirements, plus a running containerd, `ctr`, and
/// `/bin/busybox` (the test image is built from it).
pub fn services_capability() -> Result<(), String> {
    capability_check()?;
    if !Path::new(CONTAINERD_SOCKET).exists() || check_containerd().is_err() {
        return Err(format!(
            "needs containerd running at {CONTAINERD_SOCKET} and `ctr` \
             (apt-get install containerd runc; scripts/start-containerd.sh)"
        ));
    }
    if !Path::new("/bin/busybox").exists() {
        return Err("needs /bin/busybox (apt-get install busybox-static)".into());
    }
    Ok(())
}

/// Prints the standard skip line and returns true when the service scenarios
/// cannot run here.
pub fn skip_unless_services_capable(test: &str) -> bool {
    match services_capability() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipped: needs root: {test}: {why}");
            println!("skipped: needs root: {test}: {why}");
            true
        }
    }
}

fn lines_of(out: Result<String>) -> Vec<String> {
    out.map(|s| {
        s.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    })
    .unwrap_or_default()
}

/// Removes containerd namespace `ns` and everything in it: tasks (SIGKILL),
/// containers, snapshots, images, content and leases, then the namespace.
/// Best effort and idempotent; returns what is left, empty when it is gone.
pub fn remove_namespace(ns: &str) -> Vec<String> {
    let exists = |ns: &str| lines_of(ctr_ok(&["namespaces", "ls", "-q"])).contains(&ns.into());
    if !exists(ns) {
        return Vec::new();
    }
    let containers = lines_of(ctr_ok(&["-n", ns, "containers", "ls", "-q"]));
    for id in &containers {
        let _ = ctr(&["-n", ns, "tasks", "kill", "-s", "SIGKILL", id]);
    }
    for id in &containers {
        // `tasks delete -f` waits for the kill; the container then goes with its snapshot.
        let _ = ctr(&["-n", ns, "tasks", "delete", "-f", id]);
        let _ = ctr(&["-n", ns, "containers", "delete", id]);
    }
    for _ in 0..3 {
        for snap in lines_of(ctr_ok(&["-n", ns, "snapshots", "ls"]))
            .iter()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        {
            let _ = ctr(&["-n", ns, "snapshots", "rm", &snap]);
        }
        for image in lines_of(ctr_ok(&["-n", ns, "images", "ls", "-q"])) {
            let _ = ctr(&["-n", ns, "images", "rm", &image]);
        }
        for lease in lines_of(ctr_ok(&["-n", ns, "leases", "ls", "-q"])) {
            let _ = ctr(&["-n", ns, "leases", "rm", &lease]);
        }
        for digest in lines_of(ctr_ok(&["-n", ns, "content", "ls", "-q"])) {
            let _ = ctr(&["-n", ns, "content", "rm", &digest]);
        }
        if ctr(&["namespaces", "rm", ns]).is_ok_and(|o| o.success()) || !exists(ns) {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut left = Vec::new();
    for what in ["containers", "snapshots", "images", "content", "leases"] {
        let n = lines_of(ctr_ok(&["-n", ns, what, "ls", "-q"])).len();
        if n > 0 {
            left.push(format!("{n} {what}"));
        }
    }
    if left.is_empty() {
        left.push("the namespace itself".into());
    }
    eprintln!(
        "chaos: containerd namespace {ns} not fully removed: {}",
        left.join(", ")
    );
    left
}

/// Removes the containerd namespaces of earlier runs whose process is gone
/// (named `mw<run id>h<i>` like the network namespaces).
pub fn cleanup_stale_namespaces() -> usize {
    let mut removed = 0;
    for ns in lines_of(ctr_ok(&["namespaces", "ls", "-q"])) {
        let gone = run_id_of_namespace(&ns)
            .and_then(crate::netns::pid_of_run_id)
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if gone {
            remove_namespace(&ns);
            removed += 1;
        }
    }
    if removed > 0 {
        eprintln!("chaos: removed {removed} stale containerd namespaces of dead runs");
    }
    removed
}

/// The name under which the samples list the containers of batch job `id`
/// (`job/<id>`; the job index is the "replica"), so the same placement
/// checks apply: an index running twice at once is a duplicate.
pub fn job_service(id: &str) -> String {
    format!("job/{id}")
}

/// A running container of a service (or of a batch job, see [`job_service`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunningContainer {
    /// containerd container id.
    pub id: String,
    /// Its `meshwork.service` label.
    pub service: String,
    /// Its `meshwork.replica` label.
    pub replica: u32,
}

#[derive(Deserialize)]
struct ContainerInfo {
    #[serde(rename = "Labels", default)]
    labels: BTreeMap<String, String>,
}

/// The labels' (service, replica) of container `id` in `ns`; `Ok(None)` for
/// a container without them (not a replica); `Err(None)` when it is gone.
fn replica_labels(
    ns: &str,
    id: &str,
    timeout: Duration,
) -> Result<Option<(String, u32)>, Option<anyhow::Error>> {
    let out = run(
        Command::new("ctr").args(["-n", ns, "containers", "info", id]),
        None,
        timeout,
    )
    .map_err(Some)?;
    if !out.success() {
        if out.combined().to_lowercase().contains("not found") {
            return Err(None);
        }
        return Err(Some(anyhow!(
            "ctr containers info {id}: {}",
            out.combined()
        )));
    }
    let info: ContainerInfo = serde_json::from_str(&out.stdout)
        .context("parsing `ctr containers info`")
        .map_err(Some)?;
    if let (Some(job), Some(index)) = (info.labels.get(LABEL_JOB), info.labels.get(LABEL_JOB_INDEX))
        && let Ok(index) = index.parse::<u32>()
    {
        return Ok(Some((job_service(job), index)));
    }
    let service = info.labels.get(LABEL_SERVICE).cloned();
    let replica = info
        .labels
        .get(LABEL_REPLICA)
        .and_then(|r| r.parse::<u32>().ok());
    Ok(service.zip(replica))
}

/// Ids of the RUNNING tasks in `ns` (`ctr -n NS tasks ls`).
pub fn running_tasks(ns: &str, timeout: Duration) -> Result<Vec<String>> {
    let out = run(
        Command::new("ctr").args(["-n", ns, "tasks", "ls"]),
        None,
        timeout,
    )?;
    if !out.success() {
        bail!("ctr -n {ns} tasks ls: {}", out.combined());
    }
    Ok(out
        .stdout
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(2) == Some("RUNNING"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Cache of container labels (a container's labels never change).
pub type LabelCache = HashMap<(String, String), Option<(String, u32)>>;

/// The running replica containers of namespace `ns`, labels looked up once
/// per container id through `cache`; every `ctr` call limited to `timeout`.
/// An error when containerd did not answer (the listing would be incomplete).
pub fn running_containers(
    ns: &str,
    cache: &mut LabelCache,
    timeout: Duration,
) -> Result<Vec<RunningContainer>> {
    let mut out = Vec::new();
    for id in running_tasks(ns, timeout)? {
        let key = (ns.to_string(), id.clone());
        let labels = match cache.get(&key) {
            Some(l) => l.clone(),
            None => match replica_labels(ns, &id, timeout) {
                Ok(l) => {
                    cache.insert(key, l.clone());
                    l
                }
                // Removed between the two calls: not running any more.
                Err(None) => continue,
                Err(Some(e)) => return Err(e),
            },
        };
        if let Some((service, replica)) = labels {
            out.push(RunningContainer {
                id,
                service,
                replica,
            });
        }
    }
    out.sort();
    Ok(out)
}

// --------------------------------------------------------------- samples

/// One node in a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSample {
    /// What the harness had done to its `meshd`.
    pub status: NodeStatus,
    /// Its running replica containers; `None` when containerd did not answer.
    pub containers: Option<Vec<RunningContainer>>,
}

/// What containerd ran on every node at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSample {
    /// When (history time, at the end of the listing).
    pub at: Duration,
    /// Per node index.
    pub nodes: BTreeMap<usize, NodeSample>,
}

/// Where the replicas of one service run in a sample, over some nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Replica index -> the nodes running a container for it (a node twice
    /// if it runs two).
    pub by_replica: BTreeMap<u32, Vec<usize>>,
}

impl Placement {
    /// Containers counted.
    pub fn total(&self) -> usize {
        self.by_replica.values().map(Vec::len).sum()
    }

    /// Replica indices `0..desired` that run at least once.
    pub fn distinct_in_range(&self, desired: u32) -> usize {
        self.by_replica
            .iter()
            .filter(|(r, n)| **r < desired && !n.is_empty())
            .count()
    }

    /// What keeps this from being exact: duplicates, missing and extra replicas.
    pub fn problems(&self, desired: u32) -> Vec<String> {
        let mut out = Vec::new();
        for (r, nodes) in &self.by_replica {
            if nodes.len() > 1 {
                let on: Vec<String> = nodes.iter().map(|n| format!("n{n}")).collect();
                out.push(format!(
                    "replica {r} runs {}x ({})",
                    nodes.len(),
                    on.join(",")
                ));
            }
            if *r >= desired && !nodes.is_empty() {
                out.push(format!("replica {r} runs but only {desired} are desired"));
            }
        }
        let missing: Vec<String> = (0..desired)
            .filter(|r| self.by_replica.get(r).is_none_or(Vec::is_empty))
            .map(|r| r.to_string())
            .collect();
        if !missing.is_empty() {
            out.push(format!("replica(s) {} not running", missing.join(",")));
        }
        out
    }

    /// Exactly one container per index `0..desired`, nothing else.
    pub fn is_exact(&self, desired: u32) -> bool {
        self.problems(desired).is_empty()
    }

    /// Replica indices running more than once.
    pub fn duplicates(&self) -> usize {
        self.by_replica.values().filter(|n| n.len() > 1).count()
    }
}

impl ReplicaSample {
    /// The placement of `service` over `nodes`; `None` if one of them could
    /// not be listed.
    pub fn placement(&self, service: &str, nodes: &[usize]) -> Option<Placement> {
        let mut p = Placement::default();
        for n in nodes {
            let containers = self.nodes.get(n)?.containers.as_ref()?;
            for c in containers.iter().filter(|c| c.service == service) {
                p.by_replica.entry(c.replica).or_default().push(*n);
            }
        }
        Some(p)
    }

    /// Container ids of `service` running on node `n` (`None`: unknown).
    pub fn ids_on(&self, service: &str, n: usize) -> Option<BTreeSet<String>> {
        Some(
            self.nodes
                .get(&n)?
                .containers
                .as_ref()?
                .iter()
                .filter(|c| c.service == service)
                .map(|c| c.id.clone())
                .collect(),
        )
    }

    /// One line: per node its status and the replica indices it runs, per service.
    pub fn render(&self) -> String {
        let mut services: BTreeSet<&str> = BTreeSet::new();
        for s in self.nodes.values() {
            for c in s.containers.iter().flatten() {
                services.insert(&c.service);
            }
        }
        let mut parts = Vec::new();
        for (n, s) in &self.nodes {
            let status = match s.status {
                NodeStatus::Up => String::new(),
                other => format!("({other})"),
            };
            let what = match &s.containers {
                None => "?".to_string(),
                Some(cs) => services
                    .iter()
                    .filter_map(|svc| {
                        let idx: Vec<String> = cs
                            .iter()
                            .filter(|c| c.service == *svc)
                            .map(|c| c.replica.to_string())
                            .collect();
                        (!idx.is_empty()).then(|| format!("{svc}:{}", idx.join(",")))
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            parts.push(format!("n{n}{status}[{what}]"));
        }
        let totals: Vec<String> = services
            .iter()
            .map(|svc| {
                let n: usize = self
                    .nodes
                    .values()
                    .flat_map(|s| s.containers.iter().flatten())
                    .filter(|c| c.service == *svc)
                    .count();
                format!("{svc}={n}")
            })
            .collect();
        format!(
            "containers {} (running: {})",
            parts.join(" "),
            if totals.is_empty() {
                "none".into()
            } else {
                totals.join(" ")
            }
        )
    }
}

/// Samples containerd in the background until dropped (or [`ReplicaWatch::stop`]).
pub struct ReplicaWatch {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<ReplicaSample>>>,
    thread: Option<JoinHandle<()>>,
    history: History,
}

impl std::fmt::Debug for ReplicaWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaWatch")
            .field("samples", &self.samples.lock().unwrap().len())
            .finish_non_exhaustive()
    }
}

/// How often the watch samples (plus the time the listing takes).
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);

impl ReplicaWatch {
    /// Starts sampling every member's containerd namespace about every
    /// [`SAMPLE_EVERY`]; changes go to the history's timeline. Stops by itself
    /// after 2 hours.
    pub fn start(c: &Cluster) -> Self {
        let nodes: Vec<(usize, String)> = c
            .members()
            .into_iter()
            .map(|i| (i, c.containerd_namespace(i)))
            .collect();
        let board = c.status_board();
        let history = c.history().clone();
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let stop = stop.clone();
            let samples = samples.clone();
            let history = history.clone();
            std::thread::spawn(move || {
                let mut cache = LabelCache::new();
                let mut last_render = String::new();
                let began = Instant::now();
                while !stop.load(Ordering::Relaxed) && began.elapsed() < Duration::from_secs(7200) {
                    let tick = Instant::now();
                    let mut sample = ReplicaSample {
                        at: Duration::ZERO,
                        nodes: BTreeMap::new(),
                    };
                    for (i, ns) in &nodes {
                        let status = board.get(*i);
                        let containers =
                            running_containers(ns, &mut cache, CTR_SAMPLE_TIMEOUT).ok();
                        sample.nodes.insert(*i, NodeSample { status, containers });
                    }
                    sample.at = history.now();
                    let render = sample.render();
                    if render != last_render {
                        history.observe_at(sample.at, render.clone());
                        last_render = render;
                    }
                    samples.lock().unwrap().push(sample);
                    if let Some(rest) = SAMPLE_EVERY.checked_sub(tick.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
            })
        };
        ReplicaWatch {
            stop,
            samples,
            thread: Some(thread),
            history,
        }
    }

    /// Every sample so far.
    pub fn samples(&self) -> Vec<ReplicaSample> {
        self.samples.lock().unwrap().clone()
    }

    /// The newest sample, if any.
    pub fn latest(&self) -> Option<ReplicaSample> {
        self.samples.lock().unwrap().last().cloned()
    }

    /// Stops sampling and waits for the thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Waits (bounded by `limit`, see [`Cluster::wait_for`]) for a sample
    /// taken after this call in which `cond` holds; returns that sample and
    /// the time from the call to it (the sample's own time, not when the
    /// poll noticed).
    pub fn wait_sample(
        &self,
        c: &Cluster,
        limit: Duration,
        description: &str,
        mut cond: impl FnMut(&ReplicaSample) -> Result<(), String>,
    ) -> Result<(ReplicaSample, Duration)> {
        let from = self.history.now();
        let mut seen = 0usize;
        let (sample, _) = c.wait_for(limit, description, || {
            let fresh: Vec<ReplicaSample> = {
                let all = self.samples.lock().unwrap();
                let start = seen.max(all.partition_point(|s| s.at < from));
                seen = all.len();
                all[start..].to_vec()
            };
            let mut last = Err("no sample yet".to_string());
            for s in fresh {
                match cond(&s) {
                    Ok(()) => return Ok(s),
                    Err(e) => last = Err(format!("at {:.1}s: {e}", s.at.as_secs_f64())),
                }
            }
            last
        })?;
        let took = sample.at.saturating_sub(from);
        Ok((sample, took))
    }

    /// Waits for a sample in which `service` runs exactly `desired` replicas
    /// on `nodes` (see the module docs); returns the time from the call.
    pub fn wait_exact(
        &self,
        c: &Cluster,
        service: &str,
        desired: u32,
        nodes: &[usize],
        limit: Duration,
    ) -> Result<Duration> {
        self.wait_sample(
            c,
            limit,
            &format!("exactly {desired} replicas of {service} on {nodes:?} (containerd)"),
            |s| match s.placement(service, nodes) {
                None => Err("a namespace could not be listed".into()),
                Some(p) if p.is_exact(desired) => Ok(()),
                Some(p) => Err(p.problems(desired).join("; ")),
            },
        )
        .map(|(_, d)| d)
    }
}

impl Drop for ReplicaWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What [`analyse`] found in a window of samples.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    /// Samples in the window, and how many of them were unknown.
    pub samples: usize,
    /// Samples with a node that could not be listed.
    pub unknown: usize,
    /// First exact sample in the window.
    pub converged_at: Option<Duration>,
    /// Start of the last run of exact samples, if it lasts to the end of the
    /// window (unknown samples do not break it): since when it has been exact.
    pub exact_since: Option<Duration>,
    /// Violations after convergence + settle: time and what was wrong
    /// (consecutive samples with the same problem are reported once, with
    /// their span).
    pub violations: Vec<String>,
    /// Most containers of the service counted at once, and when.
    pub max_running: (usize, Duration),
    /// Most replica indices running twice or more at once.
    pub max_duplicated: usize,
    /// Time covered by samples with a duplicate (sample to next sample).
    pub duplicate_time: Duration,
    /// First and last sample time with a duplicate.
    pub duplicate_span: Option<(Duration, Duration)>,
}

impl Analysis {
    /// One line for the scenario's report.
    pub fn summary(&self, from: Duration) -> String {
        let conv = match self.converged_at {
            Some(t) => format!("exact after {:.1}s", (t.saturating_sub(from)).as_secs_f64()),
            None => "never exact".into(),
        };
        let dup = match self.duplicate_span {
            Some((a, b)) => format!(
                "duplicates for {:.1}s (at most {} replica(s) at once, {:.1}s..{:.1}s)",
                self.duplicate_time.as_secs_f64(),
                self.max_duplicated,
                a.as_secs_f64(),
                b.as_secs_f64()
            ),
            None => "no duplicates".into(),
        };
        format!(
            "{conv}; {dup}; peak {} containers at {:.1}s; {} samples ({} unknown); {} violation(s)",
            self.max_running.0,
            self.max_running.1.as_secs_f64(),
            self.samples,
            self.unknown,
            self.violations.len()
        )
    }
}

/// Checks `service` with `desired` replicas on `nodes` over the samples with
/// `from <= at <= to`: see the module docs for "exact", "converged" and
/// "after convergence" (`settle` after the first exact sample).
pub fn analyse(
    samples: &[ReplicaSample],
    service: &str,
    desired: u32,
    nodes: &[usize],
    from: Duration,
    to: Duration,
    settle: Duration,
) -> Analysis {
    let window: Vec<&ReplicaSample> = samples
        .iter()
        .filter(|s| s.at >= from && s.at <= to)
        .collect();
    let mut a = Analysis {
        samples: window.len(),
        ..Default::default()
    };
    let mut open: Option<(String, Duration, Duration)> = None;
    let flush = |open: &mut Option<(String, Duration, Duration)>, out: &mut Vec<String>| {
        if let Some((what, t0, t1)) = open.take() {
            if t0 == t1 {
                out.push(format!("at {:.1}s: {what}", t0.as_secs_f64()));
            } else {
                out.push(format!(
                    "from {:.1}s to {:.1}s: {what}",
                    t0.as_secs_f64(),
                    t1.as_secs_f64()
                ));
            }
        }
    };
    for (k, s) in window.iter().enumerate() {
        let Some(p) = s.placement(service, nodes) else {
            a.unknown += 1;
            continue;
        };
        if p.total() > a.max_running.0 {
            a.max_running = (p.total(), s.at);
        }
        let dups = p.duplicates();
        if dups > 0 {
            a.max_duplicated = a.max_duplicated.max(dups);
            let next = window.get(k + 1).map(|n| n.at).unwrap_or(s.at);
            a.duplicate_time += next.saturating_sub(s.at);
            a.duplicate_span = Some(match a.duplicate_span {
                None => (s.at, s.at),
                Some((t0, _)) => (t0, s.at),
            });
        }
        let exact = p.is_exact(desired);
        if exact && a.converged_at.is_none() {
            a.converged_at = Some(s.at);
        }
        if !exact {
            a.exact_since = None;
        } else if a.exact_since.is_none() {
            a.exact_since = Some(s.at);
        }
        let after = a.converged_at.is_some_and(|t| s.at >= t + settle);
        if !after {
            continue;
        }
        if exact {
            flush(&mut open, &mut a.violations);
            continue;
        }
        let what = p.problems(desired).join("; ");
        match &mut open {
            Some((w, _, t1)) if *w == what => *t1 = s.at,
            _ => {
                flush(&mut open, &mut a.violations);
                open = Some((what, s.at, s.at));
            }
        }
    }
    flush(&mut open, &mut a.violations);
    a
}

/// First sample at or after `from` for which `cond` holds.
pub fn first_where(
    samples: &[ReplicaSample],
    from: Duration,
    mut cond: impl FnMut(&ReplicaSample) -> bool,
) -> Option<Duration> {
    samples
        .iter()
        .filter(|s| s.at >= from)
        .find(|s| cond(s))
        .map(|s| s.at)
}

/// Per replica index, the containers of `service` that started running in
/// `from..=to` (first seen then, not running in the last sample before
/// `from`), with the node and first time: new placements (and restarts).
pub fn new_containers(
    samples: &[ReplicaSample],
    service: &str,
    from: Duration,
    to: Duration,
) -> BTreeMap<u32, Vec<(Duration, usize, String)>> {
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut out: BTreeMap<u32, Vec<(Duration, usize, String)>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.at <= to) {
        for (n, ns) in &s.nodes {
            for c in ns.containers.iter().flatten() {
                if c.service != service || known.contains(&c.id) {
                    continue;
                }
                known.insert(c.id.clone());
                if s.at >= from {
                    out.entry(c.replica)
                        .or_default()
                        .push((s.at, *n, c.id.clone()));
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------- containerd

/// Pid of the running `containerd` daemon (the process named exactly
/// `containerd`, not a shim).
pub fn containerd_pid() -> Result<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() == "containerd" {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("no containerd process found"),
        many => bail!("several containerd processes: {many:?}"),
    }
}

/// The repository's `scripts/start-containerd.sh`.
pub fn start_containerd_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/start-containerd.sh")
}

/// Restarts the shared containerd as a service manager would: SIGTERM the
/// daemon (its shims, and so the containers, keep running), wait for it to
/// exit, keep it down for `down_for` more (a slow restart), start it again
/// with `scripts/start-containerd.sh` and wait until it answers. Recorded in
/// the history; returns how long it did not answer.
pub fn restart_containerd(history: &History, down_for: Duration) -> Result<Duration> {
    let pid = containerd_pid()?;
    let began = Instant::now();
    crate::exec::run_ok("kill", &["-TERM", &pid.to_string()])?;
    history.event(format!("containerd (pid {pid}) sent SIGTERM"));
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    while proc_dir.exists() {
        // A zombie of someone else's still shows; look at its state.
        let state = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
        if state.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        if began.elapsed() > Duration::from_secs(30) {
            bail!("containerd (pid {pid}) did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    history.event(format!(
        "containerd exited after {:.1}s; starting it again in {:.1}s",
        began.elapsed().as_secs_f64(),
        down_for.as_secs_f64()
    ));
    std::thread::sleep(down_for);
    let script = start_containerd_script();
    let out = run(
        Command::new("bash").arg(&script),
        None,
        Duration::from_secs(60),
    )?;
    if !out.success() {
        bail!("{} failed: {}", script.display(), out.combined());
    }
    check_containerd()?;
    let down = began.elapsed();
    history.event(format!(
        "containerd answers again (pid {}), {:.1}s after the SIGTERM",
        containerd_pid()
            .map(|p| p.to_string())
            .unwrap_or("?".into()),
        down.as_secs_f64()
    ));
    Ok(down)
}

// ---------------------------------------------------------- meshctl svc

/// What each replica of a test service asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcShape {
    /// `--cpu` (e.g. `100m`).
    pub cpu: String,
    /// `--binpack` instead of spread.
    pub binpack: bool,
}

impl Default for SvcShape {
    fn default() -> Self {
        SvcShape {
            cpu: "100m".into(),
            binpack: false,
        }
    }
}

/// One service as `meshctl svc ls --json` prints it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ServiceView {
    /// Name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Desired replicas.
    pub replicas: u32,
    /// Running and healthy replicas, as the node reports them.
    pub running: u32,
    /// Replicas not placed.
    pub pending: u32,
    /// Generation of the template.
    pub generation: u64,
}

/// One replica as `meshctl svc ps NAME --json` prints it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ReplicaView {
    /// Index.
    pub index: u32,
    /// Node name.
    pub node: String,
    /// State.
    pub state: String,
    /// Healthy.
    pub healthy: bool,
    /// Claim epoch.
    pub epoch: u64,
    /// Container id.
    pub container_id: String,
}

fn outcome_of(out: Result<CmdOutput>) -> Outcome {
    match out {
        Ok(o) if o.success() => Outcome::Ok(None),
        Ok(o) if o.timed_out => Outcome::Info(o.combined()),
        Ok(o) => Outcome::Fail(format!(
            "exit {:?}: {}",
            o.status.and_then(|s| s.code()),
            o.combined()
        )),
        Err(e) => Outcome::Fail(format!("{e:#}")),
    }
}

impl Cluster {
    /// `svc create NAME --image IMAGE --replicas N --cpu CPU --memory 32Mi
    /// --port 8080 --health-http /index.html [--binpack]` on node `i` (see
    /// [`SvcShape`]), recorded in the history as `svc create NAME replicas=N
    /// ...`. A non-zero exit is a failure (the API answered), a timeout of
    /// unknown outcome.
    pub fn svc_create(
        &self,
        i: usize,
        name: &str,
        image: &str,
        replicas: u32,
        shape: &SvcShape,
    ) -> Outcome {
        let n = replicas.to_string();
        let kind = OpKind::Other(format!(
            "svc create {name} replicas={replicas} image={image} cpu={}{}",
            shape.cpu,
            if shape.binpack { " binpack" } else { "" }
        ));
        let mut args = vec![
            "svc",
            "create",
            name,
            "--image",
            image,
            "--replicas",
            &n,
            "--cpu",
            &shape.cpu,
            "--memory",
            "32Mi",
            "--port",
            "8080",
            "--health-http",
            "/index.html",
        ];
        if shape.binpack {
            args.push("--binpack");
        }
        self.history().invoke(i, kind, || {
            outcome_of(self.meshctl_timeout(i, &args, Duration::from_secs(30)))
        })
    }

    /// `svc scale NAME N` on node `i`, recorded as `svc scale NAME replicas=N`.
    pub fn svc_scale(&self, i: usize, name: &str, replicas: u32) -> Outcome {
        let n = replicas.to_string();
        let kind = OpKind::Other(format!("svc scale {name} replicas={replicas}"));
        self.history().invoke(i, kind, || {
            outcome_of(self.meshctl_timeout(
                i,
                &["svc", "scale", name, &n],
                Duration::from_secs(30),
            ))
        })
    }

    /// `svc ls --json` on node `i`.
    pub fn svc_ls(&self, i: usize) -> Result<Vec<ServiceView>> {
        let out = self.meshctl_ok(i, &["svc", "ls", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `svc ls --json`: {out}"))
    }

    /// The desired state of every service as node `i` lists it (`svc ls
    /// --json` without the status fields `running`, `pending`, `updated` and
    /// `rollout`): name -> spec (image, replicas, CPU, memory, port, env,
    /// command, health check, strategy, constraints, generation, created).
    pub fn svc_specs(&self, i: usize) -> Result<BTreeMap<String, serde_json::Value>> {
        let out = self.meshctl_ok(i, &["svc", "ls", "--json"])?;
        let list: Vec<serde_json::Value> = serde_json::from_str(&out)
            .with_context(|| format!("parsing `svc ls --json`: {out}"))?;
        let mut specs = BTreeMap::new();
        for mut s in list {
            let name = s["name"].as_str().unwrap_or_default().to_string();
            if let Some(fields) = s.as_object_mut() {
                for status in ["running", "pending", "updated", "rollout"] {
                    fields.remove(status);
                }
            }
            specs.insert(name, s);
        }
        Ok(specs)
    }

    /// `svc ps NAME --json` on node `i`.
    pub fn svc_ps(&self, i: usize, name: &str) -> Result<Vec<ReplicaView>> {
        let out = self.meshctl_ok(i, &["svc", "ps", name, "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `svc ps --json`: {out}"))
    }

    /// `image push TAR --tag reference --replicas N` to node `i` (recorded), failing
    /// unless acknowledged.
    pub fn push_service_image(&self, i: usize, tar: &Path, reference: &str) -> Result<()> {
        let content = crate::images::blake3_file(tar)?;
        let replicas = self.len() as u32;
        match self.image_push(
            i,
            tar,
            reference,
            replicas,
            &content,
            Duration::from_secs(120),
        ) {
            Outcome::Ok(_) => Ok(()),
            other => Err(anyhow!("image push {reference} to n{i}: {other}")),
        }
    }

    /// Waits until node `i` lists every node in `nodes` with the containers
    /// label (their containerd connected), so placement can use them.
    pub fn wait_containers_ready(&self, observer: usize, nodes: &[usize]) -> Result<Duration> {
        let names: Vec<String> = nodes.iter().map(|&n| self.name(n)).collect();
        self.wait_for(
            crate::timing::deadline(Duration::from_secs(30)),
            &format!("n{observer} sees containerd ready on {names:?}"),
            || {
                let view = self.nodes(observer).map_err(|e| format!("{e:#}"))?;
                for n in &names {
                    let ready = view.iter().any(|v| {
                        &v.name == n
                            && v.labels.get("meshwork.containers").map(String::as_str)
                                == Some("ready")
                    });
                    if !ready {
                        return Err(format!("{n} not ready"));
                    }
                }
                Ok(())
            },
        )
        .map(|(_, d)| d)
    }
}

/// The desired replicas per service according to the acknowledged `svc
/// create` / `svc scale` operations in the history (the last acknowledged one
/// per service, by start time); operations of unknown outcome are listed
/// separately as possible values.
pub fn acknowledged_services(history: &History) -> BTreeMap<String, (u32, BTreeSet<u32>)> {
    let mut out: BTreeMap<String, (u32, BTreeSet<u32>)> = BTreeMap::new();
    for op in history.ops() {
        let OpKind::Other(text) = &op.kind else {
            continue;
        };
        let mut words = text.split_whitespace();
        if words.next() != Some("svc") {
            continue;
        }
        if !matches!(words.next(), Some("create") | Some("scale")) {
            continue;
        }
        let Some(name) = words.next() else { continue };
        let Some(n) = words
            .find_map(|w| w.strip_prefix("replicas="))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        match &op.outcome {
            Outcome::Ok(_) => {
                let e = out.entry(name.to_string()).or_default();
                e.0 = n;
                e.1.insert(n);
            }
            Outcome::Info(_) => {
                out.entry(name.to_string()).or_default().1.insert(n);
            }
            Outcome::Fail(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, nodes: &[(usize, &[u32])]) -> ReplicaSample {
        ReplicaSample {
            at: Duration::from_secs_f64(at),
            nodes: nodes
                .iter()
                .map(|(n, reps)| {
                    (
                        *n,
                        NodeSample {
                            status: NodeStatus::Up,
                            containers: Some(
                                reps.iter()
                                    .map(|r| RunningContainer {
                                        id: format!("web-{r}-n{n}"),
                                        service: "web".into(),
                                        replica: *r,
                                    })
                                    .collect(),
                            ),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn placement_problems() {
        let s = sample(1.0, &[(0, &[0, 1]), (1, &[1, 3])]);
        let p = s.placement("web", &[0, 1]).unwrap();
        let probs = p.problems(3);
        assert!(
            probs
                .iter()
                .any(|x| x.contains("replica 1 runs 2x (n0,n1)"))
        );
        assert!(
            probs
                .iter()
                .any(|x| x.contains("replica 3 runs but only 3"))
        );
        assert!(probs.iter().any(|x| x.contains("replica(s) 2 not running")));
        assert_eq!(p.duplicates(), 1);
        let only0 = s.placement("web", &[0]).unwrap();
        assert!(!only0.is_exact(3));
        assert!(only0.is_exact(2));
        assert!(s.placement("web", &[0, 7]).is_none(), "unknown node");
    }

    #[test]
    fn analysis_converges_then_flags_duplicates_after_settle() {
        let samples = vec![
            sample(0.0, &[(0, &[0]), (1, &[])]),
            sample(1.0, &[(0, &[0]), (1, &[1])]), // exact: converged
            sample(2.0, &[(0, &[0, 1]), (1, &[1])]), // within settle: tolerated
            sample(5.0, &[(0, &[0]), (1, &[1])]),
            sample(6.0, &[(0, &[0, 1]), (1, &[1])]), // violation
            sample(6.5, &[(0, &[0, 1]), (1, &[1])]), // same violation, merged
            sample(7.0, &[(0, &[0]), (1, &[1])]),
        ];
        let a = analyse(
            &samples,
            "web",
            2,
            &[0, 1],
            Duration::ZERO,
            Duration::from_secs(10),
            Duration::from_secs(3),
        );
        assert_eq!(a.converged_at, Some(Duration::from_secs(1)));
        assert_eq!(a.exact_since, Some(Duration::from_secs(7)));
        assert_eq!(a.violations.len(), 1, "{:?}", a.violations);
        assert!(a.violations[0].starts_with("from 6.0s to 6.5s: replica 1 runs 2x"));
        assert_eq!(a.max_duplicated, 1);
        assert_eq!(a.max_running.0, 3);
        assert_eq!(
            a.duplicate_span,
            Some((Duration::from_secs(2), Duration::from_secs_f64(6.5)))
        );
        // A window that never sees the exact count.
        let b = analyse(
            &samples[..1],
            "web",
            2,
            &[0, 1],
            Duration::ZERO,
            Duration::from_secs(10),
            Duration::from_secs(3),
        );
        assert_eq!(b.converged_at, None);
        assert!(b.violations.is_empty());
    }

    #[test]
    fn new_containers_are_the_ones_first_seen_in_the_window() {
        let samples = vec![
            sample(0.0, &[(0, &[0]), (1, &[1])]),
            sample(1.0, &[(0, &[0]), (2, &[1])]),
        ];
        let n = new_containers(&samples, "web", Duration::from_secs(1), Duration::MAX);
        assert_eq!(n.len(), 1);
        assert_eq!(n[&1][0].1, 2);
    }

    #[test]
    fn acknowledged_services_from_the_history() {
        let h = History::new();
        let t = Instant::now();
        let op = |text: &str, outcome: Outcome| {
            h.record(0, OpKind::Other(text.into()), t, t, outcome);
        };
        op("svc create web replicas=9 image=w:1", Outcome::Ok(None));
        op("svc scale web replicas=4", Outcome::Fail("x".into()));
        op(
            "svc create api replicas=2 image=w:1",
            Outcome::Info("timeout".into()),
        );
        let a = acknowledged_services(&h);
        assert_eq!(a["web"].0, 9);
        assert_eq!(a["api"].0, 0);
        assert!(a["api"].1.contains(&2));
    }
}
