//! The node-local half of services: run exactly the replicas this node's claims name.
//!
//! Once a second the [`Supervisor`] compares the claims that name this node with the replica
//! runners it has, starts a runner per new claim, tells runners when their template changes,
//! and stops runners whose claim moved away. Each runner is one task owning one container:
//! it pulls and imports the image, allocates a port, creates and starts the container, and
//! then watches it: a crashed container restarts after a capped exponential backoff
//! (1 s, 2 s, 4 s … 30 s), a failing health check restarts it, a template change replaces it.
//! Runners report to `svcstat/<service>/<index>` whenever what they report changes, and
//! re-assert their report if someone else's overwrote it.
//!
//! Networking: containers join the network namespace of `meshd` itself (its
//! `/proc/<pid>/ns/net`), so a node inside a network namespace (the chaos harness) runs its
//! containers there too, and a replica is reachable at the node's address. Several replicas
//! on one node cannot all bind the same port, so the node allocates one per replica from
//! 20000–29999 and passes it as `PORT` (as Heroku and Cloud Run do); the service's `--port`
//! says that it speaks HTTP (gateway routes and HTTP health checks need that).
//!
//! Fencing (see [`crate::fence`]): while the node is fenced every runner is stopped; while it
//! holds, nothing new starts.
//!
//! After a `meshd` restart the supervisor lists the containers in its containerd namespace
//! and hands each runner the container its labels name: a running container with the wanted
//! template is adopted, not duplicated; containers nobody claims are removed. A restarted
//! containerd keeps its shims and tasks; the runners' calls fail while it is down and resume
//! when it answers again.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::runtime::{
    ContainerRuntime, FoundContainer, LABEL_GENERATION, LABEL_PORT, LABEL_REPLICA, LABEL_SERVICE,
    LABEL_TEMPLATE, NewContainer, TaskState,
};
use super::spec::{ContainerSpecInput, ImageRunConfig};
use super::{
    ReplicaStatus, RolloutAction, ServiceSpec, Template, read_progress, read_specs, read_statuses,
    rollout_step, status_key, wanted_template, workload_id,
};
use crate::containerd::Containerd;
use crate::fence::Verdict;
use crate::node::NodeState;
use crate::placement;
use crate::registry::Registry;
use crate::scheduler::Scheduler;

/// Ports handed to replicas as `PORT`.
const PORT_RANGE: std::ops::Range<u16> = 20000..30000;
/// Longest wait between restarts of a crashing container.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A container that ran this long before exiting starts its backoff from 1 s again.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// Log bytes kept per replica before rotation (plus one rotated file of the same size).
const LOG_MAX_BYTES: u64 = 1 << 20;
/// How long a stopping container gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Health checks: how often, how long one may take, failures in a row that mean unhealthy,
/// and how long a new container may take to pass its first check.
const HEALTH_EVERY: Duration = Duration::from_secs(2);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
const HEALTH_FAILURES: u32 = 3;
const HEALTH_START_PERIOD: Duration = Duration::from_secs(60);
/// How long containerd may not answer before the node stops offering to run containers
/// (its replicas then move elsewhere).
const CONTAINERD_GRACE: Duration = Duration::from_secs(30);
/// Without a health check, a container counts as healthy once it has run this long.
const RUNNING_IS_HEALTHY_AFTER: Duration = Duration::from_millis(300);

/// What a runner should run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    spec: ServiceSpec,
    template: Template,
    hash: String,
    epoch: u64,
}

struct Runner {
    want: watch::Sender<Option<Want>>,
    /// Set before `want` becomes `None` when the container must go at once (SIGKILL, no
    /// grace): the node is fenced, or the claim moved to a node that may run it already.
    urgent: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Shared by the supervisor loop and its runners.
struct Shared {
    node: Arc<NodeState>,
    registry: Arc<Registry>,
    runtime: ContainerRuntime,
    ports: Mutex<BTreeSet<u16>>,
    /// Images imported (and verified) into containerd through this connection, by reference.
    /// Saves re-checking every blob for each new replica; an entry is dropped when a create
    /// from it fails.
    imported: Mutex<HashMap<String, Imported>>,
}

/// An image this node imported into containerd.
#[derive(Clone)]
struct Imported {
    /// The OCI manifest digest it was imported from (a re-tagged reference imports again).
    manifest: String,
    /// Its name in containerd.
    name: String,
    /// The chain id of its top layer, the parent of a replica's snapshot.
    chain_id: String,
}

/// Runs this node's share of every service.
pub struct Supervisor {
    node: Arc<NodeState>,
    registry: Arc<Registry>,
    socket: PathBuf,
    namespace: String,
    log_dir: PathBuf,
}

impl Supervisor {
    /// A supervisor using the containerd at `socket`, in `namespace`, keeping container logs
    /// under `log_dir`.
    pub fn new(
        node: Arc<NodeState>,
        registry: Arc<Registry>,
        socket: PathBuf,
        namespace: String,
        log_dir: PathBuf,
    ) -> Self {
        Self {
            node,
            registry,
            socket,
            namespace,
            log_dir,
        }
    }

    /// Runs until shutdown. Without containerd it keeps retrying every 5 s and the node
    /// advertises no container capacity meanwhile.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut shared: Option<Arc<Shared>> = None;
        let mut runners: HashMap<(String, u32), Runner> = HashMap::new();
        let mut found: HashMap<(String, u32), FoundContainer> = HashMap::new();
        let mut orphans: Vec<FoundContainer> = Vec::new();
        let mut pacer = crate::pacing::Pacer::new(
            &self.node,
            Duration::from_secs(1),
            Duration::from_millis(100),
        );
        let mut next_probe = Instant::now();
        let mut unanswered_since: Option<Instant> = None;
        while pacer.next(&mut shutdown).await {
            // containerd: connect, and re-check that it answers every 5 s.
            if Instant::now() >= next_probe {
                next_probe = Instant::now() + Duration::from_secs(5);
                match &shared {
                    None => match Containerd::connect(&self.socket, &self.namespace).await {
                        Ok(cd) => {
                            let runtime = ContainerRuntime::new(cd, self.log_dir.clone());
                            match runtime.list().await {
                                Ok(list) => {
                                    for c in list {
                                        match c.replica() {
                                            Some(key) => {
                                                found.insert(key, c);
                                            }
                                            None => orphans.push(c),
                                        }
                                    }
                                    tracing::info!(adoptable = found.len(), "containerd connected");
                                    shared = Some(Arc::new(Shared {
                                        node: self.node.clone(),
                                        registry: self.registry.clone(),
                                        runtime,
                                        ports: Mutex::new(BTreeSet::new()),
                                        imported: Mutex::new(HashMap::new()),
                                    }));
                                    self.set_ready(true);
                                }
                                Err(e) => tracing::warn!(error = %e, "cannot list containers"),
                            }
                        }
                        Err(e) => {
                            self.set_ready(false);
                            tracing::debug!(error = %e, "containerd unavailable");
                        }
                    },
                    Some(s) => {
                        let ok = s.runtime.list().await.is_ok();
                        if ok != unanswered_since.is_none() {
                            tracing::warn!(answering = ok, "containerd availability changed");
                        }
                        // A containerd restart is not a lost node: its containers run on, so
                        // the node keeps its replicas unless containerd stays away.
                        let since = if ok {
                            unanswered_since = None;
                            None
                        } else {
                            Some(*unanswered_since.get_or_insert_with(Instant::now))
                        };
                        self.set_ready(since.is_none_or(|t| t.elapsed() < CONTAINERD_GRACE));
                    }
                }
            }
            let verdict = *self.node.verdict.lock().expect("verdict lock");
            if verdict == Verdict::Act {
                self.coordinate_rollouts();
            }
            let Some(shared) = &shared else { continue };
            runners.retain(|_, r| !r.task.is_finished());
            match verdict {
                Verdict::Fenced => {
                    for r in runners.values() {
                        r.urgent.store(true, std::sync::atomic::Ordering::Relaxed);
                        r.want.send_if_modified(|w| w.take().is_some());
                    }
                    continue;
                }
                Verdict::Hold => continue,
                Verdict::Act => {}
            }
            let desired = self.desired();
            for (key, want) in &desired {
                match runners.get(key) {
                    Some(r) => {
                        r.urgent.store(false, std::sync::atomic::Ordering::Relaxed);
                        r.want.send_if_modified(|w| {
                            if w.as_ref() == Some(want) {
                                false
                            } else {
                                *w = Some(want.clone());
                                true
                            }
                        });
                    }
                    None => {
                        let (tx, rx) = watch::channel(Some(want.clone()));
                        let adopt = found.remove(key);
                        let urgent = Arc::new(std::sync::atomic::AtomicBool::new(false));
                        let task = tokio::spawn(run_replica(
                            shared.clone(),
                            key.clone(),
                            rx,
                            adopt,
                            urgent.clone(),
                        ));
                        runners.insert(
                            key.clone(),
                            Runner {
                                want: tx,
                                urgent,
                                task,
                            },
                        );
                    }
                }
            }
            let me = self.node.peer_id.to_string();
            let elsewhere: BTreeSet<(String, u32)> = Scheduler::claims(&self.node)
                .into_iter()
                .filter(|c| c.node != me)
                .map(|c| (c.workload, c.replica))
                .collect();
            for (key, r) in &runners {
                if !desired.contains_key(key) {
                    if elsewhere.contains(&(workload_id(&key.0), key.1)) {
                        r.urgent.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    r.want.send_if_modified(|w| w.take().is_some());
                }
            }
            // Containers found at start that no claim wants any more.
            for (key, c) in found.drain() {
                if !desired.contains_key(&key) {
                    orphans.push(c);
                }
            }
            for c in orphans.drain(..) {
                tracing::info!(container = %c.id, "removing a container no claim wants");
                // Its replica runs elsewhere by now, or is not wanted: no grace period.
                let _ = shared.runtime.kill_now(&c.id).await;
                if let Err(e) = shared.runtime.remove(&c.id).await {
                    tracing::warn!(container = %c.id, error = %e, "cannot remove container");
                }
            }
        }
        // Shutdown leaves containers running: a restarted meshd adopts them.
        for r in runners.values() {
            r.task.abort();
        }
    }

    fn set_ready(&self, ready: bool) {
        self.node
            .containers_ready
            .store(ready, std::sync::atomic::Ordering::Relaxed);
    }

    /// The replicas the claims give this node, with what each should run.
    fn desired(&self) -> HashMap<(String, u32), Want> {
        let me = self.node.peer_id.to_string();
        let specs: HashMap<String, ServiceSpec> = read_specs(&self.node)
            .into_iter()
            .map(|s| (workload_id(&s.name), s))
            .collect();
        let mut out = HashMap::new();
        for claim in Scheduler::claims(&self.node) {
            if claim.node != me {
                continue;
            }
            let Some(spec) = specs.get(&claim.workload) else {
                continue;
            };
            if claim.replica >= spec.replicas {
                continue;
            }
            let progress = read_progress(&self.node, &spec.name);
            let template = wanted_template(spec, progress.as_ref(), claim.replica).clone();
            out.insert(
                (spec.name.clone(), claim.replica),
                Want {
                    hash: template.hash(),
                    template,
                    spec: spec.clone(),
                    epoch: claim.epoch,
                },
            );
        }
        out
    }

    /// Advances the rolling updates of the services this node coordinates.
    fn coordinate_rollouts(&self) {
        let nodes = Scheduler::live_nodes(&self.node);
        let me = self.node.peer_id.to_string();
        for spec in read_specs(&self.node) {
            if spec.previous.is_none()
                || placement::coordinator(&workload_id(&spec.name), &nodes) != Some(&me)
            {
                continue;
            }
            let progress = read_progress(&self.node, &spec.name);
            let statuses = read_statuses(&self.node, &spec.name);
            match rollout_step(&spec, progress.as_ref(), &statuses, super::now_ms()) {
                RolloutAction::Wait => {}
                RolloutAction::Progress(p) => {
                    let value = serde_json::to_vec(&p).expect("progress serializes");
                    let _ = self
                        .node
                        .write(&format!("{}{}", super::ROLL_PREFIX, spec.name), Some(value));
                    if p.done {
                        tracing::info!(service = %spec.name, generation = p.generation,
                            "rolling update done");
                    }
                }
                RolloutAction::RollBack(reason) => {
                    tracing::warn!(service = %spec.name, %reason, "rolling back");
                    let mut back = spec.clone();
                    back.template = spec.previous.clone().expect("checked above");
                    back.previous = None;
                    back.generation += 1;
                    back.rolled_back = Some(reason);
                    let value = serde_json::to_vec(&back).expect("specs serialize");
                    let _ = self
                        .node
                        .write(&format!("{}{}", super::SVC_PREFIX, spec.name), Some(value));
                }
            }
        }
    }
}

/// A container this runner owns.
struct Live {
    id: String,
    port: u16,
    hash: String,
    process: Option<oci_spec::runtime::Process>,
    started: Instant,
    healthy: bool,
    ever_healthy: bool,
    failures: u32,
    next_health: Instant,
}

/// Status bookkeeping of one runner.
struct Reporter {
    shared: Arc<Shared>,
    service: String,
    index: u32,
    last: Option<ReplicaStatus>,
    restarts: u32,
}

impl Reporter {
    /// The replica's status as the replicated state holds it now (maybe another node's).
    fn stored(&self) -> Option<ReplicaStatus> {
        let key = status_key(&self.service, self.index);
        let replica = self.shared.node.replica.lock().expect("replica lock");
        replica
            .map()
            .get(&key)
            .and_then(|e| serde_json::from_slice(e.value.as_deref()?).ok())
    }

    fn report(&mut self, want: &Want, live: Option<&Live>, state: &str, reason: String) {
        let node = &self.shared.node;
        let mut status = ReplicaStatus {
            node: node.peer_id.to_string(),
            node_name: node.name.clone(),
            epoch: want.epoch,
            template: live
                .map(|l| l.hash.clone())
                .unwrap_or_else(|| want.hash.clone()),
            state: state.to_string(),
            restarts: self.restarts,
            since_ms: super::now_ms(),
            reason,
            healthy: live.is_some_and(|l| l.healthy) && state == "running",
            port: live.map(|l| l.port).unwrap_or(0),
            container_id: live.map(|l| l.id.clone()).unwrap_or_default(),
        };
        let key = status_key(&self.service, self.index);
        let stored = self.stored();
        if let Some(last) = &self.last {
            let same = ReplicaStatus {
                since_ms: last.since_ms,
                ..status.clone()
            } == *last;
            if same {
                if stored.as_ref() == Some(last) {
                    return;
                }
                // Someone overwrote it (an old owner after a partition): say it again.
                status.since_ms = last.since_ms;
            } else if last.state == status.state {
                status.since_ms = last.since_ms;
            }
        }
        let value = serde_json::to_vec(&status).expect("statuses serialize");
        if let Err(e) = node.write(&key, Some(value)) {
            tracing::warn!(error = %e, "cannot write a replica status");
            return;
        }
        self.last = Some(status);
    }

    /// Deletes the replica's status once it no longer runs here (`container` was removed, or
    /// none ran), so that a later claim of the same replica and epoch (scale down, then up)
    /// does not show this one's last state as its own. A status another node has written
    /// since is theirs and stays.
    fn forget(&mut self, container: &str) {
        let node = &self.shared.node;
        let ours = self.stored().is_some_and(|s| {
            s.node == node.peer_id.to_string()
                && (s.container_id.is_empty() || s.container_id == container)
        });
        let key = status_key(&self.service, self.index);
        if ours && let Err(e) = node.write(&key, None) {
            tracing::warn!(error = %e, "cannot delete a replica status");
        }
        self.last = None;
    }
}

/// One replica's life on this node.
async fn run_replica(
    shared: Arc<Shared>,
    key: (String, u32),
    mut want_rx: watch::Receiver<Option<Want>>,
    mut adopt: Option<FoundContainer>,
    urgent: Arc<std::sync::atomic::AtomicBool>,
) {
    let (service, index) = key;
    let rt = shared.runtime.clone();
    let mut reporter = Reporter {
        shared: shared.clone(),
        service: service.clone(),
        index,
        last: None,
        restarts: 0,
    };
    let mut live: Option<Live> = None;
    let mut streak: u32 = 0;
    let mut retry_at: Option<Instant> = None;
    let mut last_reason = String::new();
    loop {
        let want = want_rx.borrow_and_update().clone();
        let Some(want) = want else {
            let mut removed = String::new();
            if let Some(l) = live.take() {
                let now = urgent.load(std::sync::atomic::Ordering::Relaxed);
                tracing::info!(service = %service, replica = index, container = %l.id,
                    urgent = now, "stopping replica (claim gone or node fenced)");
                if now {
                    let _ = rt.kill_now(&l.id).await;
                }
                if let Err(e) = rt.remove(&l.id).await {
                    // containerd down or restarting: keep the container and try again, or
                    // it would run on with nobody watching it (next to its replacement).
                    tracing::warn!(container = %l.id, error = %e, "cannot remove container");
                    live = Some(l);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = want_rx.changed() => {}
                    }
                    continue;
                }
                shared.ports.lock().expect("ports lock").remove(&l.port);
                removed = l.id;
            }
            if want_rx.borrow().is_none() {
                reporter.forget(&removed);
                return;
            }
            continue;
        };

        if let Some(found) = adopt.take() {
            live = adopt_container(&shared, &found, &want).await;
            if let Some(l) = &live {
                tracing::info!(service = %service, replica = index, container = %l.id,
                    "adopted a running container");
            }
        }
        if live.as_ref().is_some_and(|l| l.hash != want.hash) {
            let l = live.take().expect("checked");
            reporter.report(&want, Some(&l), "stopping", "template changed".into());
            if let Err(e) = rt.remove(&l.id).await {
                tracing::warn!(container = %l.id, error = %e, "cannot remove container");
            }
            shared.ports.lock().expect("ports lock").remove(&l.port);
            streak = 0;
            retry_at = None;
        }

        match live.as_mut() {
            None => {
                if retry_at.is_none_or(|t| Instant::now() >= t) {
                    match start_new(&shared, &service, index, &want, &mut reporter).await {
                        Ok(l) => {
                            live = Some(l);
                            reporter.report(&want, live.as_ref(), "starting", String::new());
                        }
                        Err(e) => {
                            streak += 1;
                            let wait = backoff(streak);
                            tracing::warn!(service = %service, replica = index, error = %e,
                                "cannot start replica");
                            reporter.report(
                                &want,
                                None,
                                "backoff",
                                format!("{e}; retrying in {} s", wait.as_secs()),
                            );
                            retry_at = Some(Instant::now() + wait);
                        }
                    }
                }
            }
            Some(l) => match rt.state(&l.id).await {
                Ok(TaskState::Running(_)) => {
                    check_health(&rt, &want, l).await;
                    if l.failures >= HEALTH_FAILURES
                        || (!l.ever_healthy && l.started.elapsed() > HEALTH_START_PERIOD)
                    {
                        reporter.restarts += 1;
                        last_reason =
                            format!("health check failed {} times; restarting", l.failures);
                        reporter.report(&want, Some(l), "unhealthy", last_reason.clone());
                        let _ = rt.stop(&l.id, STOP_GRACE).await;
                        restart_in_place(&rt, l, &mut reporter, &want).await;
                    } else if l.healthy {
                        let reason = if reporter.restarts > 0 {
                            last_reason.clone()
                        } else {
                            String::new()
                        };
                        reporter.report(&want, Some(l), "running", reason);
                    } else {
                        reporter.report(&want, Some(l), "starting", "waiting for health".into());
                    }
                }
                Ok(state @ (TaskState::Exited(_) | TaskState::Absent | TaskState::Created)) => {
                    // Crashed (or containerd lost the task): restart after a backoff.
                    let ran = l.started.elapsed();
                    if retry_at.is_none() {
                        if ran > BACKOFF_RESET_AFTER {
                            streak = 0;
                        }
                        streak += 1;
                        let wait = backoff(streak);
                        last_reason = match state {
                            TaskState::Exited(code) => format!("exited with code {code}"),
                            _ => "task gone".into(),
                        };
                        l.healthy = false;
                        reporter.report(
                            &want,
                            Some(l),
                            "backoff",
                            format!("{last_reason}; restarting in {} s", wait.as_secs()),
                        );
                        retry_at = Some(Instant::now() + wait);
                    } else if retry_at.is_some_and(|t| Instant::now() >= t) {
                        retry_at = None;
                        reporter.restarts += 1;
                        restart_in_place(&rt, l, &mut reporter, &want).await;
                    }
                }
                Ok(TaskState::Other) => {}
                Err(e) => {
                    // containerd down or restarting: keep the container, try again.
                    tracing::debug!(container = %l.id, error = %e, "cannot get task state");
                }
            },
        }
        if let Some(l) = &live {
            let _ = super::runtime::rotate_log(&rt.log_path(&l.id), LOG_MAX_BYTES);
        }
        // Look closely while a new container comes up, then once a second.
        let pause = if live.as_ref().is_some_and(|l| !l.ever_healthy) {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = want_rx.changed() => {}
        }
    }
}

fn backoff(streak: u32) -> Duration {
    Duration::from_secs(1u64 << streak.saturating_sub(1).min(5)).min(MAX_BACKOFF)
}

/// Starts a new task in the existing container (after a crash or failed health check).
async fn restart_in_place(
    rt: &ContainerRuntime,
    l: &mut Live,
    reporter: &mut Reporter,
    want: &Want,
) {
    l.healthy = false;
    l.ever_healthy = false;
    l.failures = 0;
    l.started = Instant::now();
    l.next_health = Instant::now();
    match rt.start(&l.id).await {
        Ok(pid) => {
            tracing::info!(container = %l.id, pid, restarts = reporter.restarts, "restarted");
            reporter.report(want, Some(l), "starting", String::new());
        }
        Err(e) => {
            tracing::warn!(container = %l.id, error = %e, "restart failed");
            reporter.report(want, Some(l), "backoff", e.to_string());
        }
    }
}

/// Takes over a container found at start if it runs what is wanted; removes it otherwise.
async fn adopt_container(
    shared: &Arc<Shared>,
    found: &FoundContainer,
    want: &Want,
) -> Option<Live> {
    let rt = &shared.runtime;
    let port: u16 = found
        .labels
        .get(LABEL_PORT)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let same = found.labels.get(LABEL_TEMPLATE) == Some(&want.hash);
    let running = matches!(rt.state(&found.id).await, Ok(TaskState::Running(_)));
    if !same || !running {
        if let Err(e) = rt.remove(&found.id).await {
            tracing::warn!(container = %found.id, error = %e, "cannot remove container");
        }
        return None;
    }
    shared.ports.lock().expect("ports lock").insert(port);
    let process = super::image_config(&shared.registry, &want.template.image)
        .ok()
        .and_then(|cfg| build_spec(&want.spec, &want.template, &cfg, &found.id, port, rt).ok())
        .and_then(|s| s.process().clone());
    Some(Live {
        id: found.id.clone(),
        port,
        hash: want.hash.clone(),
        process,
        started: Instant::now() - HEALTH_START_PERIOD / 2,
        healthy: want.template.health_http.is_empty() && want.template.health_cmd.is_empty(),
        ever_healthy: true,
        failures: 0,
        next_health: Instant::now(),
    })
}

fn build_spec(
    spec: &ServiceSpec,
    template: &Template,
    image: &ImageRunConfig,
    id: &str,
    port: u16,
    rt: &ContainerRuntime,
) -> Result<oci_spec::runtime::Spec, String> {
    let mut env: Vec<(String, String)> = template
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.push(("PORT".into(), port.to_string()));
    env.push(("MESH_SERVICE".into(), spec.name.clone()));
    super::spec::runtime_spec(&ContainerSpecInput {
        hostname: spec.name.clone(),
        image: image.clone(),
        cmd_override: template.cmd.clone(),
        env,
        cpu_millis: spec.cpu_millis,
        memory_bytes: spec.memory_bytes,
        cgroups_path: format!("/meshwork/{}/{id}", rt.containerd().namespace()),
        netns_path: Some(format!("/proc/{}/ns/net", std::process::id())),
    })
    .map_err(|e| e.to_string())
}

/// Pulls and imports the image, allocates a port, creates and starts a container.
async fn start_new(
    shared: &Arc<Shared>,
    service: &str,
    index: u32,
    want: &Want,
    reporter: &mut Reporter,
) -> Result<Live, String> {
    let rt = &shared.runtime;
    let reference = &want.template.image;
    let manifest = shared
        .registry
        .image(reference)
        .map_err(|e| e.to_string())?
        .manifest
        .sha256;
    let cached = shared
        .imported
        .lock()
        .expect("imported lock")
        .get(reference)
        .filter(|i| i.manifest == manifest)
        .cloned();
    let from_cache = cached.is_some();
    let image = match cached {
        Some(hit) => hit,
        None => {
            reporter.report(want, None, "pulling", reference.clone());
            let (name, report) = shared
                .registry
                .import_to_containerd(reference, rt.containerd())
                .await
                .map_err(|e| e.to_string())?;
            let image = Imported {
                manifest,
                name,
                chain_id: report.chain_id,
            };
            shared
                .imported
                .lock()
                .expect("imported lock")
                .insert(reference.clone(), image.clone());
            image
        }
    };
    let config = super::image_config(&shared.registry, &want.template.image)?;
    let port = allocate_port(&shared.ports).ok_or("no free port in 20000-29999")?;
    let id = format!("{service}-{index}-{:08x}", rand::random::<u32>());
    let result = async {
        let spec = build_spec(&want.spec, &want.template, &config, &id, port, rt)?;
        let process = spec.process().clone();
        let mut labels = HashMap::new();
        labels.insert(LABEL_SERVICE.to_string(), service.to_string());
        labels.insert(LABEL_REPLICA.to_string(), index.to_string());
        labels.insert(LABEL_TEMPLATE.to_string(), want.hash.clone());
        labels.insert(LABEL_PORT.to_string(), port.to_string());
        labels.insert(
            LABEL_GENERATION.to_string(),
            want.spec.generation.to_string(),
        );
        let created = rt
            .create(&NewContainer {
                id: id.clone(),
                image: image.name,
                chain_id: image.chain_id,
                spec,
                labels,
            })
            .await;
        if let Err(e) = created {
            if from_cache {
                // The image or its snapshot may have been removed from containerd behind
                // our back: import it again on the next try.
                shared
                    .imported
                    .lock()
                    .expect("imported lock")
                    .remove(reference);
            }
            return Err(e.to_string());
        }
        let pid = match rt.start(&id).await {
            Ok(pid) => pid,
            Err(e) => {
                let _ = rt.remove(&id).await;
                return Err(e.to_string());
            }
        };
        tracing::info!(service, replica = index, container = %id, pid, port, "replica started");
        Ok(Live {
            id: id.clone(),
            port,
            hash: want.hash.clone(),
            process,
            started: Instant::now(),
            healthy: false,
            ever_healthy: false,
            failures: 0,
            next_health: Instant::now(),
        })
    }
    .await;
    if result.is_err() {
        shared.ports.lock().expect("ports lock").remove(&port);
    }
    result
}

/// A port in [`PORT_RANGE`] that no replica here uses and that nothing else has bound.
fn allocate_port(ports: &Mutex<BTreeSet<u16>>) -> Option<u16> {
    let mut used = ports.lock().expect("ports lock");
    let start = PORT_RANGE.start + (rand::random::<u16>() % (PORT_RANGE.end - PORT_RANGE.start));
    let candidates = (start..PORT_RANGE.end).chain(PORT_RANGE.start..start);
    for port in candidates {
        if used.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            used.insert(port);
            return Some(port);
        }
    }
    None
}

/// Runs the replica's health check when it is due and updates `l`.
async fn check_health(rt: &ContainerRuntime, want: &Want, l: &mut Live) {
    let t = &want.template;
    if t.health_http.is_empty() && t.health_cmd.is_empty() {
        l.healthy = l.started.elapsed() >= RUNNING_IS_HEALTHY_AFTER;
        l.ever_healthy |= l.healthy;
        return;
    }
    if Instant::now() < l.next_health {
        return;
    }
    // Until the first pass, check often: a new replica takes traffic as soon as it passes.
    l.next_health = Instant::now()
        + if l.ever_healthy {
            HEALTH_EVERY
        } else {
            Duration::from_millis(200)
        };
    let ok = if !t.health_http.is_empty() {
        http_ok(l.port, &t.health_http).await
    } else if let Some(process) = &l.process {
        matches!(
            rt.exec(&l.id, process, &t.health_cmd, HEALTH_TIMEOUT).await,
            Ok(Some(0))
        )
    } else {
        true
    };
    if ok {
        l.healthy = true;
        l.ever_healthy = true;
        l.failures = 0;
    } else if l.ever_healthy {
        l.failures += 1;
        l.healthy = l.failures < HEALTH_FAILURES && l.healthy;
    }
}

/// `GET path` on the replica's port answers 2xx or 3xx within the health timeout.
async fn http_ok(port: u16, path: &str) -> bool {
    let probe = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
            .header("user-agent", "meshwork-health")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let s = response.status();
        Some(s.is_success() || s.is_redirection())
    };
    tokio::time::timeout(HEALTH_TIMEOUT, probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The ports replicas use on this node (for tests of the allocator).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (1..=8).map(|s| backoff(s).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn allocated_ports_are_distinct_and_in_range() {
        let used = Mutex::new(BTreeSet::new());
        let a = allocate_port(&used).unwrap();
        let b = allocate_port(&used).unwrap();
        assert_ne!(a, b);
        assert!(PORT_RANGE.contains(&a) && PORT_RANGE.contains(&b));
        // A port something else holds is skipped.
        let held = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let _ = held;
        assert_eq!(used.lock().unwrap().len(), 2);
    }
}
