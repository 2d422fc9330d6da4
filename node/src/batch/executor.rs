//! The node-local half of batch jobs: start an attempt for every job index whose claim names
//! this node, run it to the end, and record the outcome, unless the claim moved meanwhile.
//!
//! Twice a second the executor reads the job table and the claims. For a claim naming this
//! node whose index is RUNNABLE it first marks attempts still "running" on other nodes as
//! failed with reason "node lost" (the index only moves when its node died or was cut off),
//! then records attempt `n + 1` as STARTING and runs it:
//! - a container job through containerd, like a service replica, with `MESH_JOB_ID`,
//!   `MESH_JOB_INDEX`, `MESH_JOB_ATTEMPT` in its environment and a scratch directory of its
//!   own on the node's disk bind-mounted at `/scratch` (`MESH_SCRATCH`), removed afterwards;
//!   `$MESH_JOB_*` references in the command are replaced by their values (no shell needed);
//! - a Wasm job in Wasmer as a WASI command (arguments, environment, raw stdout), whose only
//!   files are its own scratch directory, preopened at `/scratch`.
//!
//! Output goes to `<data dir>/job-logs/job-<id>-<index>-<attempt>.log` (rotated at 1 MiB,
//! one old part kept; the newest 2000 logs kept on a node), readable from any node.
//! A cancelled attempt is stopped and recorded as "cancelled". A fenced node stops its attempts
//! and records nothing (the mesh marks them "node lost" once it declares the node dead). An
//! attempt whose claim moves to another node while this node is alive (placement views
//! disagreeing for a moment) runs on; the new owner waits for its result instead of starting a
//! second attempt, so an index never runs twice at once after convergence. A success is
//! recorded only if no other attempt of the index succeeded. When a job ends, its coordinator
//! emits the
//! `job.finished` event that functions deployed with `--on job.finished` receive.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Attempt, AttemptState, JobKind, JobSpec, JobState, JobTable, attempt_key, log_name};
use crate::containerd::Containerd;
use crate::fence::Verdict;
use crate::functions::Functions;
use crate::functions::runtime::{CgiRequest, InvokeError, Limits};
use crate::functions::triggers::Triggers;
use crate::node::NodeState;
use crate::placement;
use crate::registry::Registry;
use crate::scheduler::Scheduler;
use crate::services::runtime::{ContainerRuntime, NewContainer, TaskState};
use crate::services::spec::ContainerSpecInput;

/// Bytes of log kept per attempt before rotation.
const LOG_MAX_BYTES: u64 = 1 << 20;
/// Attempt logs kept per node (oldest removed first).
const LOGS_KEPT: usize = 2000;
/// How often old logs and ended jobs past their retention are removed (more often when the
/// retention is shorter).
const CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// Without `--timeout`, a Wasm attempt still needs a bound for its CPU budget: a day.
const WASM_NO_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

struct Local {
    /// The attempt number it runs.
    number: u32,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Shared by the executor and its attempts.
struct Ctx {
    node: Arc<NodeState>,
    registry: Arc<Registry>,
    functions: Arc<Functions>,
    log_dir: PathBuf,
    scratch_dir: PathBuf,
    socket: PathBuf,
    namespace: String,
    runtime: tokio::sync::Mutex<Option<ContainerRuntime>>,
    retention: Duration,
}

/// Runs this node's share of the batch queue.
pub struct Executor {
    ctx: Arc<Ctx>,
    triggers: Arc<Triggers>,
}

impl Executor {
    /// An executor writing logs under `log_dir` and scratch directories under `scratch_dir`,
    /// removing the records of jobs it coordinates once they ended `retention` ago.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: Arc<NodeState>,
        registry: Arc<Registry>,
        functions: Arc<Functions>,
        triggers: Arc<Triggers>,
        log_dir: PathBuf,
        scratch_dir: PathBuf,
        socket: PathBuf,
        namespace: String,
        retention: Duration,
    ) -> Self {
        Self {
            ctx: Arc::new(Ctx {
                node,
                registry,
                functions,
                log_dir,
                scratch_dir,
                socket,
                namespace,
                runtime: tokio::sync::Mutex::new(None),
                retention,
            }),
            triggers,
        }
    }

    /// Runs until shutdown (running attempts are abandoned; their claims move on).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut local: HashMap<(String, u32), Local> = HashMap::new();
        let mut pacer = crate::pacing::Pacer::new(
            &self.ctx.node,
            Duration::from_millis(500),
            Duration::from_millis(50),
        );
        let mut last_cleanup = Instant::now();
        self.remove_leftover_containers().await;
        while pacer.next(&mut shutdown).await {
            local.retain(|_, l| !l.task.is_finished());
            let verdict = *self.ctx.node.verdict.lock().expect("verdict lock");
            if verdict == Verdict::Fenced {
                for l in local.values() {
                    let _ = l.stop.send(true);
                }
                continue;
            }
            let table = JobTable::read(&self.ctx.node);
            let me = self.ctx.node.peer_id.to_string();
            let mine: HashMap<(String, u32), u64> = Scheduler::claims(&self.ctx.node)
                .into_iter()
                .filter(|c| c.node == me)
                .filter_map(|c| {
                    let rest = c.workload.strip_prefix(super::JOB_PREFIX)?;
                    let (id, index) = rest.split_once('/')?;
                    Some(((id.to_string(), index.parse().ok()?), c.epoch))
                })
                .collect();
            // Attempts of cancelled jobs stop. An attempt whose claim moved to another node
            // while this node is alive and not fenced runs on: stopping it would waste its
            // work, and the new owner waits for its result (see `start`).
            for (key, l) in &local {
                if table.specs.get(&key.0).is_none_or(|s| s.cancelled) {
                    let _ = l.stop.send(true);
                }
                // Given up for lost while it ran (this node was thought dead): another
                // attempt takes over, so this one stops and records nothing.
                let lost = table
                    .attempts_of(&key.0, key.1)
                    .iter()
                    .any(|a| a.number == l.number && a.reason == super::NODE_LOST);
                if lost {
                    let _ = l.stop.send(true);
                }
            }
            if verdict == Verdict::Act {
                self.mark_orphans_lost(&table, &local, &me);
                let mut views = HashMap::new();
                for ((id, index), epoch) in &mine {
                    if local.contains_key(&(id.clone(), *index)) {
                        continue;
                    }
                    let Some(spec) = table.specs.get(id) else {
                        continue;
                    };
                    let indices = views.entry(id.clone()).or_insert_with(|| table.indices(id));
                    let Some(view) = indices.get(*index as usize) else {
                        continue;
                    };
                    if let Some(l) = self.start(spec, view, *epoch, &me) {
                        local.insert((id.clone(), *index), l);
                    }
                }
                self.emit_finished(&table);
            }
            if last_cleanup.elapsed() > CLEANUP_EVERY.min(self.ctx.retention) {
                last_cleanup = Instant::now();
                cleanup_logs(&self.ctx.log_dir, LOGS_KEPT);
                if verdict == Verdict::Act {
                    self.expire_jobs(&table);
                }
            }
        }
        for l in local.values() {
            l.task.abort();
        }
    }

    /// Removes job containers a previous run of this node left behind (their attempts are
    /// recorded as lost and retried).
    async fn remove_leftover_containers(&self) {
        let Ok(rt) = container_runtime(&self.ctx).await else {
            return;
        };
        match rt.list_with_label("meshwork.job").await {
            Ok(found) => {
                for c in found {
                    tracing::info!(container = %c.id, "removing a job container left behind");
                    let _ = rt.remove_keeping_log(&c.id).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot list job containers"),
        }
    }

    /// Starts the next attempt of a runnable index claimed by this node.
    fn start(
        &self,
        spec: &JobSpec,
        view: &super::IndexView,
        epoch: u64,
        me: &str,
    ) -> Option<Local> {
        let node = &self.ctx.node;
        let now = crate::functions::now_ms();
        let mut attempts = view.attempts.clone();
        // Attempts left running that this node does not run: lost if their node is dead (or
        // is this node, restarted); while it is alive its result is awaited.
        for a in attempts.iter_mut() {
            if matches!(a.state, AttemptState::Starting | AttemptState::Running) {
                if a.node != me && !node_is_dead(node, &a.node) {
                    return None;
                }
                let mark = mark_lost(node, &spec.id, view.index, a.number)?;
                super::mark_lost(a, &mark);
                tracing::warn!(job = %spec.id, index = view.index, attempt = a.number,
                    node = %a.node_name, "attempt lost with its node");
            }
        }
        if !matches!(
            view.state,
            JobState::Runnable | JobState::Starting | JobState::Running
        ) {
            return None;
        }
        // Dependencies were met (the view says so); judge the attempts again.
        let (state, _) = super::index_state(spec, &attempts, &[]);
        if state != JobState::Runnable {
            return None;
        }
        let number = attempts.iter().map(|a| a.number).max().unwrap_or(0) + 1;
        if number > spec.max_attempts() {
            return None;
        }
        let attempt = Attempt {
            number,
            node: me.to_string(),
            node_name: node.name.clone(),
            epoch,
            state: AttemptState::Starting,
            started_ms: now,
            ended_ms: 0,
            exit_code: None,
            reason: String::new(),
        };
        write_attempt(node, &spec.id, view.index, &attempt);
        tracing::info!(job = %spec.id, index = view.index, attempt = number, "attempt starting");
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_attempt(
            self.ctx.clone(),
            spec.clone(),
            view.index,
            attempt,
            stop_rx,
        ));
        Some(Local { number, stop, task })
    }

    /// Marks lost this node's own attempts that are recorded as starting or running but that
    /// it does not run: it stopped them while fenced (recording nothing), or it restarted.
    /// Without this, a node elsewhere would wait for them forever (their node is alive).
    fn mark_orphans_lost(&self, table: &JobTable, local: &HashMap<(String, u32), Local>, me: &str) {
        for ((id, index), attempts) in &table.attempts {
            for a in attempts {
                let orphan = a.node == me
                    && matches!(a.state, AttemptState::Starting | AttemptState::Running)
                    && local
                        .get(&(id.clone(), *index))
                        .is_none_or(|l| l.number != a.number);
                if orphan && mark_lost(&self.ctx.node, id, *index, a.number).is_some() {
                    tracing::warn!(job = %id, index, attempt = a.number,
                        "own attempt not running here (stopped while fenced, or restarted): lost");
                }
            }
        }
    }

    /// Emits `job.finished` once for each job that ended, from the job's coordinator.
    fn emit_finished(&self, table: &JobTable) {
        let node = &self.ctx.node;
        let nodes = Scheduler::live_nodes(node);
        let me = node.peer_id.to_string();
        for spec in table.specs.values() {
            let key = format!("{}{}", super::EVENT_PREFIX, spec.id);
            if node
                .replica
                .lock()
                .expect("replica lock")
                .map()
                .get(&key)
                .is_some_and(|e| e.value.is_some())
            {
                continue;
            }
            if placement::coordinator(&format!("{}{}", super::JOB_PREFIX, spec.id), &nodes)
                != Some(&me)
            {
                continue;
            }
            let states: Vec<JobState> = table.indices(&spec.id).iter().map(|v| v.state).collect();
            let state = super::job_state(&states);
            if !state.is_terminal() {
                continue;
            }
            if node.write(&key, Some(b"1".to_vec())).is_err() {
                continue;
            }
            let payload = serde_json::json!({
                "id": spec.id,
                "name": spec.name,
                "state": state.as_str(),
                "array": spec.array,
                "succeeded": states.iter().filter(|s| **s == JobState::Succeeded).count(),
            });
            let ids = self
                .triggers
                .emit("job.finished", payload.to_string().as_bytes());
            tracing::info!(job = %spec.id, state = state.as_str(), calls = ids.len(),
                "job finished");
        }
    }
}

impl Executor {
    /// Removes the records of ended jobs this node coordinates once they are past the
    /// retention, after their `job.finished` event went out.
    fn expire_jobs(&self, table: &JobTable) {
        let node = &self.ctx.node;
        let cutoff = crate::functions::now_ms()
            .saturating_sub(u64::try_from(self.ctx.retention.as_millis()).unwrap_or(u64::MAX));
        let nodes = Scheduler::live_nodes(node);
        let me = node.peer_id.to_string();
        for id in table.expired(cutoff) {
            if placement::coordinator(&format!("{}{id}", super::JOB_PREFIX), &nodes) != Some(&me) {
                continue;
            }
            let announced = node
                .replica
                .lock()
                .expect("replica lock")
                .map()
                .get(&format!("{}{id}", super::EVENT_PREFIX))
                .is_some();
            if !announced {
                continue;
            }
            match super::remove_job_records(node, &id) {
                Ok(keys) => {
                    metrics::counter!("mesh_jobs_expired_total").increment(1);
                    tracing::info!(job = %id, keys, "ended job past its retention removed");
                }
                Err(e) => tracing::warn!(job = %id, error = %e, "cannot remove an expired job"),
            }
        }
    }
}

/// Writes the lost mark of an attempt; `None` if it could not be stored.
fn mark_lost(node: &NodeState, id: &str, index: u32, number: u32) -> Option<super::LostMark> {
    let mark = super::LostMark {
        at_ms: crate::functions::now_ms(),
        by: node.name.clone(),
    };
    let value = serde_json::to_vec(&mark).expect("marks serialize");
    match node.write(&super::lost_key(id, index, number), Some(value)) {
        Ok(_) => Some(mark),
        Err(e) => {
            tracing::warn!(error = %e, "cannot record a lost attempt");
            None
        }
    }
}

fn write_attempt(node: &NodeState, id: &str, index: u32, attempt: &Attempt) {
    let value = serde_json::to_vec(attempt).expect("attempts serialize");
    if let Err(e) = node.write(&attempt_key(id, index, attempt.number), Some(value)) {
        tracing::warn!(error = %e, "cannot record an attempt");
    }
}

/// Whether the failure detector has declared `peer` dead (or never heard of it).
fn node_is_dead(node: &NodeState, peer: &str) -> bool {
    let table = node.membership.read().expect("membership lock");
    table
        .get(peer)
        .is_none_or(|m| m.state == crate::membership::MemberState::Dead)
}

/// Whether another attempt of `(id, index)` already succeeded.
fn succeeded_elsewhere(node: &NodeState, id: &str, index: u32, number: u32) -> bool {
    JobTable::read(node)
        .attempts_of(id, index)
        .iter()
        .any(|a| a.number != number && a.state == AttemptState::Succeeded)
}

/// How an attempt ended.
struct Outcome {
    exit_code: Option<i32>,
    reason: String,
    /// The process never ran (pull, import or create failed): worth a quick local retry.
    not_started: bool,
}

/// Quick local retries of an attempt whose process never started (a pull racing a
/// replication, containerd busy), before the failure is recorded.
const START_TRIES: u32 = 3;

/// Runs one attempt and records how it ended.
async fn run_attempt(
    ctx: Arc<Ctx>,
    spec: JobSpec,
    index: u32,
    mut attempt: Attempt,
    mut stop: watch::Receiver<bool>,
) {
    let name = log_name(&spec.id, index, attempt.number);
    let mut tries = 0;
    let result = loop {
        tries += 1;
        let result = match &spec.kind {
            JobKind::Container { image } => {
                run_container(&ctx, &spec, index, &mut attempt, image, &name, &mut stop).await
            }
            JobKind::Wasm { module } => {
                run_wasm(&ctx, &spec, index, &mut attempt, module, &name, &mut stop).await
            }
        };
        match &result {
            Some(o) if o.not_started && tries < START_TRIES => {
                tracing::warn!(job = %spec.id, index, attempt = attempt.number,
                    reason = %o.reason, "attempt could not start; trying again");
                let wait = Duration::from_secs(1 << tries);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => break None,
                }
            }
            _ => break result,
        }
    };
    let cancelled = JobTable::read(&ctx.node)
        .specs
        .get(&spec.id)
        .is_none_or(|s| s.cancelled);
    let outcome = match result {
        Some(o) => o,
        None if cancelled => Outcome {
            exit_code: None,
            reason: "cancelled".into(),
            not_started: false,
        },
        None => {
            // Fenced: the mesh has marked (or will mark) it lost; record nothing.
            tracing::info!(job = %spec.id, index, attempt = attempt.number,
                "attempt stopped while fenced; not recorded");
            return;
        }
    };
    if *ctx.node.verdict.lock().expect("verdict lock") == Verdict::Fenced {
        tracing::warn!(job = %spec.id, index, attempt = attempt.number,
            "attempt ended while fenced; not recorded");
        return;
    }
    if super::is_marked_lost(&ctx.node, &spec.id, index, attempt.number) {
        tracing::warn!(job = %spec.id, index, attempt = attempt.number,
            "attempt was given up for lost while it ran; not recorded");
        return;
    }
    let mut outcome = outcome;
    if outcome.exit_code == Some(0)
        && succeeded_elsewhere(&ctx.node, &spec.id, index, attempt.number)
    {
        outcome.exit_code = None;
        outcome.reason = "superseded: another attempt succeeded first".into();
    }
    attempt.ended_ms = crate::functions::now_ms();
    attempt.exit_code = outcome.exit_code;
    attempt.state = if outcome.exit_code == Some(0) && outcome.reason.is_empty() {
        AttemptState::Succeeded
    } else {
        AttemptState::Failed
    };
    attempt.reason = outcome.reason;
    tracing::info!(job = %spec.id, index, attempt = attempt.number, state = ?attempt.state,
        exit = ?attempt.exit_code, reason = %attempt.reason, "attempt ended");
    write_attempt(&ctx.node, &spec.id, index, &attempt);
}

fn job_env(spec: &JobSpec, index: u32, number: u32) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.push(("MESH_JOB_ID".into(), spec.id.clone()));
    env.push(("MESH_JOB_NAME".into(), spec.name.clone()));
    env.push(("MESH_JOB_INDEX".into(), index.to_string()));
    env.push(("MESH_JOB_ATTEMPT".into(), number.to_string()));
    env
}

/// The command with `$MESH_JOB_*` / `${MESH_JOB_*}` references replaced by their values, so
/// `--cmd 'render --frame $MESH_JOB_INDEX'` works without a shell (only these variables are
/// expanded; any other `$` stays as it is).
fn expand_args(cmd: &[String], env: &[(String, String)]) -> Vec<String> {
    let mut vars: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with("MESH_JOB_"))
        .collect();
    // Longest names first, so $MESH_JOB_ID does not eat the start of a longer name.
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    cmd.iter()
        .map(|arg| {
            let mut out = arg.clone();
            for (k, v) in &vars {
                out = out
                    .replace(&format!("${{{k}}}"), v)
                    .replace(&format!("${k}"), v);
            }
            out
        })
        .collect()
}

/// A failure after the process ran.
fn failed(reason: impl Into<String>) -> Option<Outcome> {
    Some(Outcome {
        exit_code: None,
        reason: reason.into(),
        not_started: false,
    })
}

/// A failure before the process ran.
fn not_started(reason: impl Into<String>) -> Option<Outcome> {
    Some(Outcome {
        exit_code: None,
        reason: reason.into(),
        not_started: true,
    })
}

async fn container_runtime(ctx: &Ctx) -> Result<ContainerRuntime, String> {
    let mut slot = ctx.runtime.lock().await;
    if let Some(rt) = slot.as_ref() {
        return Ok(rt.clone());
    }
    let cd = Containerd::connect(&ctx.socket, &ctx.namespace)
        .await
        .map_err(|e| e.to_string())?;
    let rt = ContainerRuntime::new(cd, ctx.log_dir.clone());
    *slot = Some(rt.clone());
    Ok(rt)
}

/// Runs a container attempt; `None` when it was stopped from outside.
async fn run_container(
    ctx: &Ctx,
    spec: &JobSpec,
    index: u32,
    attempt: &mut Attempt,
    image: &str,
    name: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<Outcome> {
    let rt = match container_runtime(ctx).await {
        Ok(rt) => rt,
        Err(e) => return not_started(format!("containerd: {e}")),
    };
    let (image_name, report) = match ctx
        .registry
        .import_to_containerd(image, rt.containerd())
        .await
    {
        Ok(x) => x,
        Err(e) => return not_started(format!("image {image}: {e}")),
    };
    let config = match crate::services::image_config(&ctx.registry, image) {
        Ok(c) => c,
        Err(e) => return failed(format!("image {image}: {e}")),
    };
    let scratch = ctx.scratch_dir.join(name);
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        return failed(format!("scratch directory: {e}"));
    }
    let mut env = job_env(spec, index, attempt.number);
    env.push(("MESH_SCRATCH".into(), "/scratch".into()));
    let built = crate::services::spec::runtime_spec(&ContainerSpecInput {
        hostname: spec.name.clone(),
        image: config,
        cmd_override: expand_args(&spec.cmd, &env),
        env,
        cpu_millis: spec.cpu_millis,
        memory_bytes: spec.memory_bytes,
        cgroups_path: format!("/meshwork/{}/{name}", ctx.namespace),
        netns_path: Some(format!("/proc/{}/ns/net", std::process::id())),
    });
    let mut oci = match built {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            return failed(e.to_string());
        }
    };
    let mut mounts = oci.mounts().clone().unwrap_or_default();
    mounts.push(
        oci_spec::runtime::MountBuilder::default()
            .destination("/scratch")
            .typ("bind")
            .source(&scratch)
            .options(vec!["rbind".to_string(), "rw".to_string()])
            .build()
            .expect("a bind mount builds"),
    );
    oci.set_mounts(Some(mounts));
    let mut labels = HashMap::new();
    labels.insert("meshwork.job".to_string(), spec.id.clone());
    labels.insert("meshwork.job-index".to_string(), index.to_string());
    let created = rt
        .create(&NewContainer {
            id: name.to_string(),
            image: image_name,
            chain_id: report.chain_id,
            spec: oci,
            labels,
        })
        .await;
    let outcome = match created {
        Err(e) => not_started(e.to_string()),
        Ok(()) => match rt.start(name).await {
            Err(e) => not_started(e.to_string()),
            Ok(_) => {
                attempt.state = AttemptState::Running;
                write_attempt(&ctx.node, &spec.id, index, attempt);
                watch_container(&rt, spec, name, stop).await
            }
        },
    };
    if let Err(e) = rt.remove_keeping_log(name).await {
        tracing::warn!(container = %name, error = %e, "cannot remove a job container");
    }
    let _ = std::fs::remove_dir_all(&scratch);
    outcome
}

/// Removes an attempt's scratch directory; a failure only costs disk, so it is logged.
fn remove_scratch(dir: &std::path::Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a scratch directory");
    }
}

/// Waits for the container to exit, its timeout, or a stop.
async fn watch_container(
    rt: &ContainerRuntime,
    spec: &JobSpec,
    name: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<Outcome> {
    let deadline =
        (spec.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(spec.timeout_ms));
    loop {
        match rt.state(name).await {
            Ok(TaskState::Exited(code)) => {
                return Some(Outcome {
                    exit_code: Some(code as i32),
                    reason: if code == 0 {
                        String::new()
                    } else {
                        format!("exit code {code}")
                    },
                    not_started: false,
                });
            }
            Ok(TaskState::Absent) => return failed("the task disappeared"),
            Ok(_) => {}
            Err(e) => tracing::debug!(container = %name, error = %e, "cannot get task state"),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = rt.kill_now(name).await;
            return failed(format!("timed out after {} ms", spec.timeout_ms));
        }
        let _ = crate::services::runtime::rotate_log(&rt.log_path(name), LOG_MAX_BYTES);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => {
                if *stop.borrow() {
                    let _ = rt.kill_now(name).await;
                    return None;
                }
            }
        }
    }
}

/// Runs a Wasm attempt; `None` when it was stopped from outside.
async fn run_wasm(
    ctx: &Ctx,
    spec: &JobSpec,
    index: u32,
    attempt: &mut Attempt,
    module: &crate::blobs::store::Hash,
    name: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<Outcome> {
    let scratch = ctx.scratch_dir.join(name);
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        return failed(format!("scratch directory: {e}"));
    }
    attempt.state = AttemptState::Running;
    write_attempt(&ctx.node, &spec.id, index, attempt);
    let mut env = job_env(spec, index, attempt.number);
    env.push((
        "MESH_SCRATCH".into(),
        crate::functions::runtime::SCRATCH_PATH.into(),
    ));
    let request = CgiRequest {
        method: "GET".into(),
        args: expand_args(&spec.cmd, &env),
        env: env.into_iter().collect(),
        raw_output: true,
        scratch: Some(scratch.clone()),
        ..Default::default()
    };
    let timeout = if spec.timeout_ms > 0 {
        Duration::from_millis(spec.timeout_ms)
    } else {
        WASM_NO_TIMEOUT
    };
    let limits = Limits::new(spec.memory_bytes, timeout);
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let run = ctx
        .functions
        .run_module(module, request, limits, cancel.clone());
    tokio::pin!(run);
    let result = tokio::select! {
        r = &mut run => r,
        () = async { let _ = stop.wait_for(|s| *s).await; } => {
            // Kill the module's thread, wait for it to end, and record nothing here.
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = run.await;
            remove_scratch(&scratch);
            return None;
        }
    };
    remove_scratch(&scratch);
    let mut log = Vec::new();
    let outcome = match result {
        Ok(resp) => {
            log.extend_from_slice(&resp.body);
            log.extend_from_slice(&resp.stderr);
            Outcome {
                exit_code: Some(0),
                reason: String::new(),
                not_started: false,
            }
        }
        Err(crate::functions::FunctionError::Invoke(e)) => {
            if let Some(stderr) = e.stderr() {
                log.extend_from_slice(stderr);
            }
            match &e {
                InvokeError::Trap { message, .. } if message.starts_with("exit code ") => {
                    let code = message["exit code ".len()..].parse().ok();
                    Outcome {
                        exit_code: code,
                        reason: message.clone(),
                        not_started: false,
                    }
                }
                InvokeError::Timeout { .. } => Outcome {
                    exit_code: None,
                    reason: format!("timed out after {} ms", spec.timeout_ms),
                    not_started: false,
                },
                other => Outcome {
                    exit_code: None,
                    reason: other.to_string(),
                    not_started: false,
                },
            }
        }
        // The module could not be fetched: it never ran.
        Err(e @ crate::functions::FunctionError::Registry(_)) => Outcome {
            exit_code: None,
            reason: e.to_string(),
            not_started: true,
        },
        Err(e) => Outcome {
            exit_code: None,
            reason: e.to_string(),
            not_started: false,
        },
    };
    let path = ctx.log_dir.join(format!("{name}.log"));
    let _ = std::fs::create_dir_all(&ctx.log_dir);
    if let Err(e) = std::fs::write(&path, &log) {
        tracing::warn!(log = %path.display(), error = %e, "cannot write a job log");
    }
    Some(outcome)
}

/// Keeps the newest `keep` job logs in `dir`.
fn cleanup_logs(dir: &std::path::Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((modified, e.path()))
        })
        .collect();
    if files.len() <= keep {
        return;
    }
    files.sort();
    let excess = files.len() - keep;
    for (_, path) in files.into_iter().take(excess) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_variables_are_expanded_in_the_command() {
        let env = vec![
            ("MESH_JOB_INDEX".to_string(), "7".to_string()),
            ("MESH_JOB_ID".to_string(), "abc".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let cmd: Vec<String> = [
            "render",
            "--frame",
            "$MESH_JOB_INDEX",
            "${MESH_JOB_ID}-$OTHER $5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            expand_args(&cmd, &env),
            vec!["render", "--frame", "7", "abc-$OTHER $5"]
        );
    }

    #[test]
    fn cleanup_keeps_the_newest_logs() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5 {
            let p = dir.path().join(format!("{i}.log"));
            std::fs::write(&p, b"x").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i);
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        cleanup_logs(dir.path(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["3.log", "4.log"]);
    }
}
