//! Batch jobs (like AWS Batch): a mesh-wide queue of container or Wasm jobs with arrays,
//! retries by exit code, dependencies and no time limit unless one is set.
//!
//! The queue is plain data in the replicated state:
//! - `job/<id>`: the [`JobSpec`] (written at submit; `cancelled` set by cancel). Ids start
//!   with the submit time in hex, so they sort in submission order and the placement core,
//!   which orders workloads by priority and then id, places first in, first out within a
//!   priority.
//! - `jobatt/<id>/<index>/<n>`: attempt `n` of index `index` ([`Attempt`]), written only by
//!   the node that runs it.
//! - `joblost/<id>/<index>/<n>`: a [`LostMark`]: attempt `n` was given up for lost ("node
//!   lost"), by the node the index moved to (its node died) or by its own node (which stopped
//!   it while fenced, or restarted). A key of its own, so that a late write of the attempt by
//!   a node that was wrongly thought dead cannot undo it (the state is last-writer-wins per
//!   key): a marked attempt reads as FAILED whatever its own record says, and its node stops
//!   it. So an index never shows two successes, and never waits on an attempt nobody runs.
//!
//! Every index that may run (dependencies met, not finished, attempts left) is a workload
//! `job/<id>/<index>` for the placement core, so claims and fencing epochs decide where it
//! runs, exactly as for services. The [`executor`] of the node a claim names starts an
//! attempt, after marking attempts of dead nodes "node lost"; a fenced node records nothing.
//! The states users see are derived from the attempts, never stored, so they cannot disagree
//! with them: see [`index_state`].
//!
//! History is bounded: the coordinator of an ended job removes its records (attempts, event
//! marker, then the spec) once it has been over for the node's `--job-retention` (7 days by
//! default), unless a job that has not ended depends on it; see [`JobTable::expired`].

pub mod executor;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::blobs::store::Hash;
use crate::node::NodeState;
use crate::placement::{Strategy, WorkloadSpec};
use crate::registry::Registry;
use crate::scheduler::WorkloadSource;
use crate::services::{CONTAINERS_LABEL, CONTAINERS_READY, LogPiece, LogRead};

const JOB_PREFIX: &str = "job/";
const ATTEMPT_PREFIX: &str = "jobatt/";
const EVENT_PREFIX: &str = "jobev/";
const LOST_PREFIX: &str = "joblost/";
/// Most indices of an array job.
pub const MAX_ARRAY: u32 = 10_000;
/// Most retries.
pub const MAX_RETRIES: u32 = 10;
/// The reason an attempt gets when its node died or was cut off.
pub const NODE_LOST: &str = "node lost";

/// What a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    /// A container from this image tag.
    Container {
        /// `name:tag` in the mesh registry.
        image: String,
    },
    /// A WASI module (a blob).
    Wasm {
        /// blake3 of the module.
        module: Hash,
    },
}

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Id: submit time in ms (hex, 12 digits) and 4 random hex digits.
    pub id: String,
    /// Name given by the user.
    pub name: String,
    /// What runs.
    pub kind: JobKind,
    /// Container command, or Wasm arguments after argv[0].
    pub cmd: Vec<String>,
    /// CPU per index, millicores.
    pub cpu_millis: u64,
    /// Memory per index, bytes.
    pub memory_bytes: u64,
    /// Number of indices (1 for a plain job).
    pub array: u32,
    /// Attempts after the first.
    pub retries: u32,
    /// Retry only on these exit codes when not empty.
    pub retry_on_exit: Vec<i32>,
    /// Jobs that must succeed first.
    pub depends_on: Vec<String>,
    /// Time limit per attempt in ms; 0 for none.
    pub timeout_ms: u64,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Higher runs first.
    pub priority: i32,
    /// Submit time, ms since the epoch.
    pub submitted_ms: u64,
    /// Cancelled by the user.
    pub cancelled: bool,
    /// When it was cancelled, ms since the epoch (0 when it was not, or by a node that
    /// predates this field).
    #[serde(default)]
    pub cancelled_ms: u64,
}

impl JobSpec {
    /// Attempts allowed per index.
    pub fn max_attempts(&self) -> u32 {
        self.retries + 1
    }
}

/// The record that an attempt was given up for lost (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostMark {
    /// When it was marked, ms since the epoch (the attempt's end).
    pub at_ms: u64,
    /// Name of the node that marked it.
    pub by: String,
}

/// How an attempt is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptState {
    /// Pulling, importing, compiling, creating.
    Starting,
    /// The process runs.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited otherwise, timed out, was cancelled, or its node was lost.
    Failed,
}

/// One attempt of one index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1, 2, ...
    pub number: u32,
    /// Peer id of the node running it.
    pub node: String,
    /// That node's name.
    pub node_name: String,
    /// The claim epoch it ran under.
    pub epoch: u64,
    /// Its state.
    pub state: AttemptState,
    /// Start, ms since the epoch.
    pub started_ms: u64,
    /// End, ms since the epoch (0 while it runs).
    pub ended_ms: u64,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Why it failed.
    pub reason: String,
}

/// The states AWS Batch users know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// Accepted, not yet evaluated.
    Submitted,
    /// Waiting for dependencies.
    Pending,
    /// Waiting for capacity (or for its node to start it).
    Runnable,
    /// An attempt is starting.
    Starting,
    /// An attempt runs.
    Running,
    /// An attempt exited 0.
    Succeeded,
    /// No attempt succeeded and none will be made.
    Failed,
}

impl JobState {
    /// The upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Submitted => "SUBMITTED",
            JobState::Pending => "PENDING",
            JobState::Runnable => "RUNNABLE",
            JobState::Starting => "STARTING",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
        }
    }

    /// Finished for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }

    /// Parses the upper-case name (any case).
    pub fn parse(s: &str) -> Option<Self> {
        [
            JobState::Submitted,
            JobState::Pending,
            JobState::Runnable,
            JobState::Starting,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
        ]
        .into_iter()
        .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }
}

/// Whether a failed attempt may be retried under the job's rules.
pub fn retryable(spec: &JobSpec, attempt: &Attempt) -> bool {
    if attempt.reason == NODE_LOST {
        return true;
    }
    if attempt.reason == "cancelled" {
        return false;
    }
    if spec.retry_on_exit.is_empty() {
        return true;
    }
    attempt
        .exit_code
        .is_some_and(|c| spec.retry_on_exit.contains(&c))
}

/// The state of one index from its attempts and the states of what it depends on (already
/// resolved to this index for equal-sized arrays).
pub fn index_state(
    spec: &JobSpec,
    attempts: &[Attempt],
    deps: &[(String, JobState)],
) -> (JobState, String) {
    if attempts.iter().any(|a| a.state == AttemptState::Succeeded) {
        return (JobState::Succeeded, String::new());
    }
    let last = attempts.iter().max_by_key(|a| a.number);
    let active = last.filter(|a| matches!(a.state, AttemptState::Starting | AttemptState::Running));
    if spec.cancelled {
        return match active {
            Some(_) => (JobState::Running, "cancelling".into()),
            None => (JobState::Failed, "cancelled".into()),
        };
    }
    if let Some((dep, _)) = deps.iter().find(|(_, s)| *s == JobState::Failed) {
        return (JobState::Failed, format!("dependency {dep} failed"));
    }
    if let Some((dep, _)) = deps.iter().find(|(_, s)| *s != JobState::Succeeded) {
        return (JobState::Pending, format!("waiting for {dep}"));
    }
    match last {
        None => (JobState::Runnable, String::new()),
        Some(a) if a.state == AttemptState::Starting => (JobState::Starting, String::new()),
        Some(a) if a.state == AttemptState::Running => (JobState::Running, String::new()),
        Some(a) => {
            let why = if a.reason.is_empty() {
                a.exit_code
                    .map(|c| format!("exit code {c}"))
                    .unwrap_or_else(|| "failed".into())
            } else {
                a.reason.clone()
            };
            if retryable(spec, a) && a.number < spec.max_attempts() {
                (
                    JobState::Runnable,
                    format!("attempt {} failed: {why}", a.number),
                )
            } else {
                (JobState::Failed, why)
            }
        }
    }
}

/// A job's state from its indices' states.
pub fn job_state(indices: &[JobState]) -> JobState {
    if indices.is_empty() {
        return JobState::Submitted;
    }
    if indices.iter().all(|s| *s == JobState::Succeeded) {
        return JobState::Succeeded;
    }
    if indices.iter().all(|s| s.is_terminal()) {
        return JobState::Failed;
    }
    for s in [
        JobState::Running,
        JobState::Starting,
        JobState::Runnable,
        JobState::Pending,
    ] {
        if indices.contains(&s) {
            return s;
        }
    }
    JobState::Submitted
}

/// Errors of job operations.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No such job.
    #[error("no job {0:?}")]
    Unknown(String),
    /// The image or module is not in the registry.
    #[error("{0}")]
    Missing(String),
    /// Storing failed.
    #[error("cannot store the job: {0}")]
    State(String),
}

/// Everything known about the jobs, read once from the state.
pub struct JobTable {
    /// Specs by id.
    pub specs: BTreeMap<String, JobSpec>,
    /// Attempts by (id, index).
    pub attempts: HashMap<(String, u32), Vec<Attempt>>,
}

/// One index's view.
#[derive(Debug, Clone)]
pub struct IndexView {
    /// Index.
    pub index: u32,
    /// State.
    pub state: JobState,
    /// Why.
    pub reason: String,
    /// Attempts, by number.
    pub attempts: Vec<Attempt>,
}

impl JobTable {
    /// Reads every job, attempt and lost mark.
    pub fn read(node: &NodeState) -> Self {
        let replica = node.replica.lock().expect("replica lock");
        let map = replica.map();
        let specs = map
            .list(JOB_PREFIX)
            .filter_map(|e| serde_json::from_slice::<JobSpec>(e.value.as_deref()?).ok());
        let attempts = map.list(ATTEMPT_PREFIX).filter_map(|e| {
            let (id, index, _) = parse_attempt_path(&e.key[ATTEMPT_PREFIX.len()..])?;
            let a = serde_json::from_slice::<Attempt>(e.value.as_deref()?).ok()?;
            Some((id.to_string(), index, a))
        });
        let marks = map.list(LOST_PREFIX).filter_map(|e| {
            let (id, index, number) = parse_attempt_path(&e.key[LOST_PREFIX.len()..])?;
            let mark = serde_json::from_slice::<LostMark>(e.value.as_deref()?).ok()?;
            Some((id.to_string(), index, number, mark))
        });
        Self::from_records(specs, attempts, marks)
    }

    /// A table from records as stored: specs, attempts by `(id, index)`, and lost marks by
    /// `(id, index, attempt number)`, which override the attempts' own records.
    pub fn from_records(
        specs: impl IntoIterator<Item = JobSpec>,
        attempts: impl IntoIterator<Item = (String, u32, Attempt)>,
        marks: impl IntoIterator<Item = (String, u32, u32, LostMark)>,
    ) -> Self {
        let specs = specs.into_iter().map(|s| (s.id.clone(), s)).collect();
        let mut by_index: HashMap<(String, u32), Vec<Attempt>> = HashMap::new();
        for (id, index, a) in attempts {
            by_index.entry((id, index)).or_default().push(a);
        }
        for (id, index, number, mark) in marks {
            if let Some(a) = by_index
                .get_mut(&(id, index))
                .and_then(|list| list.iter_mut().find(|a| a.number == number))
            {
                mark_lost(a, &mark);
            }
        }
        for list in by_index.values_mut() {
            list.sort_by_key(|a| a.number);
        }
        Self {
            specs,
            attempts: by_index,
        }
    }

    /// When job `id` ended, ms since the epoch: `None` while any index may still run. The
    /// latest attempt end, the cancel time, or the submit time (an index that never ran
    /// because a dependency failed), whichever is latest.
    pub fn ended_ms(&self, id: &str, views: &[IndexView]) -> Option<u64> {
        let spec = self.specs.get(id)?;
        let states: Vec<JobState> = views.iter().map(|v| v.state).collect();
        if !job_state(&states).is_terminal() {
            return None;
        }
        let last_attempt = views
            .iter()
            .flat_map(|v| v.attempts.iter())
            .map(|a| a.ended_ms.max(a.started_ms))
            .max()
            .unwrap_or(0);
        Some(last_attempt.max(spec.cancelled_ms).max(spec.submitted_ms))
    }

    /// Jobs that ended before `cutoff_ms` and that no unfinished job depends on, oldest first:
    /// the ones whose records may go.
    pub fn expired(&self, cutoff_ms: u64) -> Vec<String> {
        let mut memo = HashMap::new();
        let mut ended = BTreeMap::new();
        for id in self.specs.keys() {
            let views = self.indices_memo(id, &mut memo, 0);
            if let Some(at) = self.ended_ms(id, &views) {
                ended.insert(id.clone(), at);
            }
        }
        let needed: std::collections::HashSet<&String> = self
            .specs
            .values()
            .filter(|s| !ended.contains_key(&s.id))
            .flat_map(|s| s.depends_on.iter())
            .collect();
        ended
            .into_iter()
            .filter(|(id, at)| *at < cutoff_ms && !needed.contains(id))
            .map(|(id, _)| id)
            .collect()
    }

    /// The attempts of one index.
    pub fn attempts_of(&self, id: &str, index: u32) -> &[Attempt] {
        self.attempts
            .get(&(id.to_string(), index))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The states of every index of `id`, resolving dependencies (with a depth bound against
    /// cycles, which submit refuses anyway).
    pub fn indices(&self, id: &str) -> Vec<IndexView> {
        let mut memo = HashMap::new();
        self.indices_memo(id, &mut memo, 0)
    }

    fn indices_memo(
        &self,
        id: &str,
        memo: &mut HashMap<String, Vec<IndexView>>,
        depth: u32,
    ) -> Vec<IndexView> {
        if let Some(v) = memo.get(id) {
            return v.clone();
        }
        let Some(spec) = self.specs.get(id) else {
            return Vec::new();
        };
        let deps: Vec<(String, Vec<IndexView>)> = if depth > 64 {
            Vec::new()
        } else {
            spec.depends_on
                .iter()
                .map(|d| (d.clone(), self.indices_memo(d, memo, depth + 1)))
                .collect()
        };
        let views: Vec<IndexView> = (0..spec.array.max(1))
            .map(|index| {
                let dep_states: Vec<(String, JobState)> = deps
                    .iter()
                    .map(|(d, views)| {
                        let dep_array = self.specs.get(d).map(|s| s.array.max(1)).unwrap_or(0);
                        let state = if views.is_empty() {
                            // An unknown dependency (removed): it can never succeed.
                            JobState::Failed
                        } else if dep_array == spec.array.max(1) && dep_array > 1 {
                            views[index as usize].state
                        } else {
                            job_state(&views.iter().map(|v| v.state).collect::<Vec<_>>())
                        };
                        (d.clone(), state)
                    })
                    .collect();
                let attempts = self.attempts_of(id, index).to_vec();
                let (state, reason) = index_state(spec, &attempts, &dep_states);
                IndexView {
                    index,
                    state,
                    reason,
                    attempts,
                }
            })
            .collect();
        memo.insert(id.to_string(), views.clone());
        views
    }
}

/// Removes every record of job `id`: its attempts, its event marker, then its spec (last, so
/// that a removal cut short is finished by the next pass). Returns how many keys it deleted.
pub fn remove_job_records(node: &NodeState, id: &str) -> Result<usize, JobError> {
    let keys: Vec<String> = {
        let replica = node.replica.lock().expect("replica lock");
        let map = replica.map();
        let mut keys: Vec<String> = map
            .list(&format!("{ATTEMPT_PREFIX}{id}/"))
            .chain(map.list(&format!("{LOST_PREFIX}{id}/")))
            .map(|e| e.key.clone())
            .collect();
        for key in [format!("{EVENT_PREFIX}{id}"), format!("{JOB_PREFIX}{id}")] {
            if map.get(&key).is_some() {
                keys.push(key);
            }
        }
        keys
    };
    for key in &keys {
        node.write(key, None)
            .map_err(|e| JobError::State(e.to_string()))?;
    }
    Ok(keys.len())
}

/// `<id>/<index>/<n>` of an attempt or lost-mark key.
fn parse_attempt_path(path: &str) -> Option<(&str, u32, u32)> {
    let mut parts = path.split('/');
    let id = parts.next()?;
    let index = parts.next()?.parse().ok()?;
    let number = parts.next()?.parse().ok()?;
    Some((id, index, number))
}

/// Applies a lost mark to an attempt's own record: it failed with reason "node lost".
pub fn mark_lost(attempt: &mut Attempt, mark: &LostMark) {
    attempt.state = AttemptState::Failed;
    attempt.reason = NODE_LOST.into();
    attempt.exit_code = None;
    if attempt.ended_ms == 0 || attempt.ended_ms > mark.at_ms {
        attempt.ended_ms = mark.at_ms;
    }
}

/// The key of an attempt's lost mark.
pub fn lost_key(id: &str, index: u32, number: u32) -> String {
    format!("{LOST_PREFIX}{id}/{index}/{number}")
}

/// Whether attempt `number` of `(id, index)` is marked lost (one key read).
pub fn is_marked_lost(node: &NodeState, id: &str, index: u32, number: u32) -> bool {
    let replica = node.replica.lock().expect("replica lock");
    replica.map().get(&lost_key(id, index, number)).is_some()
}

/// The key of an attempt record.
pub fn attempt_key(id: &str, index: u32, number: u32) -> String {
    format!("{ATTEMPT_PREFIX}{id}/{index}/{number}")
}

/// The placement workload of one index.
pub fn workload_id(id: &str, index: u32) -> String {
    format!("{JOB_PREFIX}{id}/{index}")
}

/// The log file name (without `.log`) of an attempt.
pub fn log_name(id: &str, index: u32, number: u32) -> String {
    format!("job-{id}-{index}-{number}")
}

/// The gRPC-facing operations on jobs.
pub struct Batch {
    node: Arc<NodeState>,
    registry: Arc<Registry>,
    log_dir: std::path::PathBuf,
}

impl Batch {
    /// Job operations over the node's state; registers the `job.logs` node-to-node call.
    pub fn new(
        node: Arc<NodeState>,
        registry: Arc<Registry>,
        log_dir: std::path::PathBuf,
    ) -> Arc<Self> {
        let dir = log_dir.clone();
        node.router.register(
            "job.logs",
            Arc::new(move |_peer, body| {
                let dir = dir.clone();
                Box::pin(async move {
                    let read: LogRead =
                        postcard::from_bytes(&body).map_err(|e| format!("bad call: {e}"))?;
                    let piece = crate::services::read_log(&dir, &read);
                    Ok(postcard::to_allocvec(&piece).expect("answers serialize"))
                })
            }),
        );
        Arc::new(Self {
            node,
            registry,
            log_dir,
        })
    }

    /// The scheduler's view: one workload per index that may run or runs now.
    pub fn workload_source() -> WorkloadSource {
        Box::new(move |node: &NodeState| {
            let table = JobTable::read(node);
            let mut out = Vec::new();
            let mut memo = HashMap::new();
            for spec in table.specs.values() {
                let mut constraints = BTreeMap::new();
                if matches!(spec.kind, JobKind::Container { .. }) {
                    constraints.insert(CONTAINERS_LABEL.to_string(), CONTAINERS_READY.to_string());
                }
                for view in table.indices_memo(&spec.id, &mut memo, 0) {
                    if matches!(
                        view.state,
                        JobState::Runnable | JobState::Starting | JobState::Running
                    ) && !spec.cancelled
                    {
                        out.push(WorkloadSpec {
                            id: workload_id(&spec.id, view.index),
                            replicas: 1,
                            cpu_millis: spec.cpu_millis,
                            memory_bytes: spec.memory_bytes,
                            constraints: constraints.clone(),
                            strategy: Strategy::Spread,
                            priority: spec.priority,
                            preferred: Default::default(),
                        });
                    }
                }
            }
            out
        })
    }

    /// Validates and queues a job; returns it with its id.
    pub fn submit(&self, mut spec: JobSpec) -> Result<JobSpec, JobError> {
        crate::functions::validate_name(&spec.name).map_err(|_| {
            JobError::Invalid(format!(
                "job name {:?}: 1 to 63 of a-z, 0-9 and '-', starting with a letter",
                spec.name
            ))
        })?;
        if spec.cpu_millis == 0 || spec.memory_bytes < (1 << 20) {
            return Err(JobError::Invalid(
                "a job needs some CPU (e.g. --cpu 100m) and at least 1 MiB of memory".into(),
            ));
        }
        if spec.array == 0 {
            spec.array = 1;
        }
        if spec.array > MAX_ARRAY {
            return Err(JobError::Invalid(format!(
                "array {}: at most {MAX_ARRAY}",
                spec.array
            )));
        }
        if spec.retries > MAX_RETRIES {
            return Err(JobError::Invalid(format!(
                "retries {}: at most {MAX_RETRIES}",
                spec.retries
            )));
        }
        if let Some(c) = spec.retry_on_exit.iter().find(|c| !(0..=255).contains(*c)) {
            return Err(JobError::Invalid(format!(
                "retry exit code {c}: exit codes are 0 to 255"
            )));
        }
        for k in spec.env.keys() {
            let ok = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok || k.starts_with("MESH_JOB_") {
                return Err(JobError::Invalid(format!(
                    "env name {k:?}: letters, digits and '_', not starting with a digit, and \
                     not MESH_JOB_* (set by the node)"
                )));
            }
        }
        for dep in &spec.depends_on {
            if !self.exists(dep) {
                return Err(JobError::Invalid(format!(
                    "depends on {dep:?}, which is not a job in this mesh"
                )));
            }
        }
        match &spec.kind {
            JobKind::Container { image } => {
                if self.registry.image(image).is_err() {
                    return Err(JobError::Missing(format!(
                        "image {image:?} is not in the mesh registry; push it first"
                    )));
                }
                if spec.cmd.iter().any(|a| a.contains('\0')) {
                    return Err(JobError::Invalid("the command contains a NUL byte".into()));
                }
            }
            JobKind::Wasm { module } => {
                if !matches!(self.registry.blob_meta(module), Ok(Some(_))) {
                    return Err(JobError::Missing(format!(
                        "module {module} is not in the mesh; upload it first (meshctl blob put)"
                    )));
                }
            }
        }
        let now = crate::functions::now_ms();
        spec.id = format!("{now:012x}{:04x}", rand::random::<u16>());
        spec.submitted_ms = now;
        spec.cancelled = false;
        spec.cancelled_ms = 0;
        self.store(&spec)?;
        tracing::info!(job = %spec.id, name = %spec.name, array = spec.array, "job submitted");
        Ok(spec)
    }

    /// Whether job `id` is in the state (one key lookup, not a table read).
    fn exists(&self, id: &str) -> bool {
        let key = format!("{JOB_PREFIX}{id}");
        let replica = self.node.replica.lock().expect("replica lock");
        replica.map().get(&key).is_some_and(|e| e.value.is_some())
    }

    fn store(&self, spec: &JobSpec) -> Result<(), JobError> {
        let value = serde_json::to_vec(spec).expect("jobs serialize");
        self.node
            .write(&format!("{JOB_PREFIX}{}", spec.id), Some(value))
            .map(|_| ())
            .map_err(|e| JobError::State(e.to_string()))
    }

    /// A job and its indices.
    pub fn get(&self, id: &str) -> Result<(JobSpec, Vec<IndexView>), JobError> {
        let table = JobTable::read(&self.node);
        let spec = table
            .specs
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::Unknown(id.to_string()))?;
        let views = table.indices(id);
        Ok((spec, views))
    }

    /// Every job with its indices, newest first.
    pub fn list(&self) -> Vec<(JobSpec, Vec<IndexView>)> {
        let table = JobTable::read(&self.node);
        let mut memo = HashMap::new();
        let mut out: Vec<_> = table
            .specs
            .values()
            .map(|s| (s.clone(), table.indices_memo(&s.id, &mut memo, 0)))
            .collect();
        out.reverse();
        out
    }

    /// Cancels a job: running attempts stop, unfinished indices end FAILED.
    pub fn cancel(&self, id: &str) -> Result<(JobSpec, Vec<IndexView>), JobError> {
        let (mut spec, _) = self.get(id)?;
        if !spec.cancelled {
            spec.cancelled = true;
            spec.cancelled_ms = crate::functions::now_ms();
            self.store(&spec)?;
            tracing::info!(job = %id, "job cancelled");
        }
        self.get(id)
    }

    /// Reads a piece of an attempt's log from the node that ran it.
    pub async fn read_log(
        &self,
        attempt: &Attempt,
        name: &str,
        from: Option<u64>,
    ) -> Result<LogPiece, String> {
        let read = LogRead {
            container: name.to_string(),
            from,
            tail: 1 << 20,
        };
        if attempt.node == self.node.peer_id.to_string() {
            return crate::services::read_log(&self.log_dir, &read);
        }
        let peer = attempt
            .node
            .parse()
            .map_err(|e| format!("bad node id: {e}"))?;
        let body = postcard::to_allocvec(&read).expect("requests serialize");
        let bytes = self
            .node
            .call(peer, "job.logs", body)
            .await
            .map_err(|e| format!("{} does not answer: {e}", attempt.node_name))?;
        postcard::from_bytes::<Result<LogPiece, String>>(&bytes).map_err(|e| e.to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            id: "j".into(),
            name: "j".into(),
            kind: JobKind::Container {
                image: "a:1".into(),
            },
            cmd: vec![],
            cpu_millis: 100,
            memory_bytes: 1 << 20,
            array: 1,
            retries: 2,
            retry_on_exit: vec![],
            depends_on: vec![],
            timeout_ms: 0,
            env: BTreeMap::new(),
            priority: 0,
            submitted_ms: 0,
            cancelled: false,
            cancelled_ms: 0,
        }
    }

    fn attempt(number: u32, state: AttemptState, exit: Option<i32>, reason: &str) -> Attempt {
        Attempt {
            number,
            node: "n".into(),
            node_name: "n".into(),
            epoch: 1,
            state,
            started_ms: 0,
            ended_ms: 0,
            exit_code: exit,
            reason: reason.into(),
        }
    }

    #[test]
    fn retries_follow_exit_codes_and_attempt_limits() {
        let s = spec();
        use AttemptState::*;
        assert_eq!(index_state(&s, &[], &[]).0, JobState::Runnable);
        let a1 = attempt(1, Failed, Some(3), "");
        assert_eq!(
            index_state(&s, std::slice::from_ref(&a1), &[]).0,
            JobState::Runnable
        );
        let a3 = attempt(3, Failed, Some(3), "");
        assert_eq!(
            index_state(&s, &[a1.clone(), attempt(2, Failed, Some(3), ""), a3], &[]).0,
            JobState::Failed,
            "three attempts used up"
        );
        let mut only = spec();
        only.retry_on_exit = vec![137];
        assert_eq!(
            index_state(&only, std::slice::from_ref(&a1), &[]).0,
            JobState::Failed
        );
        assert_eq!(
            index_state(&only, &[attempt(1, Failed, Some(137), "")], &[]).0,
            JobState::Runnable
        );
        assert_eq!(
            index_state(&only, &[attempt(1, Failed, None, NODE_LOST)], &[]).0,
            JobState::Runnable,
            "a lost node is always retried"
        );
        assert_eq!(
            index_state(&s, &[a1, attempt(2, Succeeded, Some(0), "")], &[]).0,
            JobState::Succeeded
        );
        assert_eq!(
            index_state(&s, &[attempt(1, Running, None, "")], &[]).0,
            JobState::Running
        );
    }

    #[test]
    fn dependencies_and_cancellation() {
        let s = spec();
        let pending = index_state(&s, &[], &[("d".into(), JobState::Running)]);
        assert_eq!(pending.0, JobState::Pending);
        let failed = index_state(&s, &[], &[("d".into(), JobState::Failed)]);
        assert_eq!(failed.0, JobState::Failed);
        assert!(failed.1.contains("dependency d failed"));
        let mut c = spec();
        c.cancelled = true;
        assert_eq!(index_state(&c, &[], &[]).0, JobState::Failed);
        assert_eq!(
            index_state(&c, &[attempt(1, AttemptState::Running, None, "")], &[]).0,
            JobState::Running
        );
    }

    #[test]
    fn job_state_aggregates_indices() {
        use JobState::*;
        assert_eq!(job_state(&[Succeeded, Succeeded]), Succeeded);
        assert_eq!(job_state(&[Succeeded, Failed]), Failed);
        assert_eq!(job_state(&[Succeeded, Running, Failed]), Running);
        assert_eq!(job_state(&[Runnable, Pending]), Runnable);
        assert_eq!(JobState::parse("running"), Some(Running));
    }

    /// A table of `specs` with `attempts` of index 0.
    fn table(specs: Vec<JobSpec>, attempts: Vec<(&str, Attempt)>) -> JobTable {
        let attempts = attempts.into_iter().map(|(id, a)| (id.to_string(), 0, a));
        JobTable::from_records(specs, attempts, [])
    }

    fn job(id: &str, submitted_ms: u64, depends_on: &[&str]) -> JobSpec {
        JobSpec {
            id: id.into(),
            submitted_ms,
            depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
            ..spec()
        }
    }

    fn ended_at(number: u32, state: AttemptState, at: u64) -> Attempt {
        Attempt {
            started_ms: at - 5,
            ended_ms: at,
            ..attempt(
                number,
                state,
                Some(i32::from(state == AttemptState::Failed)),
                "",
            )
        }
    }

    #[test]
    fn only_jobs_ended_before_the_cutoff_and_not_needed_expire() {
        use AttemptState::*;
        let mut cancelled = job("e-cancelled", 10, &[]);
        cancelled.cancelled = true;
        cancelled.cancelled_ms = 500;
        let t = table(
            vec![
                job("a-old", 10, &[]),
                job("b-recent", 10, &[]),
                job("c-needed", 10, &[]),
                job("d-waits", 300, &["c-needed"]),
                cancelled,
                job("f-running", 10, &[]),
                job("g-failed", 10, &[]),
                job("h-needs-old", 20, &["a-old"]),
            ],
            vec![
                ("a-old", ended_at(1, Succeeded, 100)),
                ("b-recent", ended_at(1, Succeeded, 900)),
                ("c-needed", ended_at(1, Succeeded, 100)),
                // d-waits ran once and failed with retries left: RUNNABLE, not ended.
                ("d-waits", ended_at(1, Failed, 200)),
                (
                    "f-running",
                    Attempt {
                        started_ms: 50,
                        ..attempt(1, Running, None, "")
                    },
                ),
                ("g-failed", ended_at(1, Failed, 100)),
                ("g-failed", ended_at(2, Failed, 110)),
                ("g-failed", ended_at(3, Failed, 120)),
                ("h-needs-old", ended_at(1, Succeeded, 150)),
            ],
        );
        assert_eq!(t.ended_ms("a-old", &t.indices("a-old")), Some(100));
        assert_eq!(
            t.ended_ms("e-cancelled", &t.indices("e-cancelled")),
            Some(500)
        );
        assert_eq!(t.ended_ms("f-running", &t.indices("f-running")), None);
        assert_eq!(t.ended_ms("d-waits", &t.indices("d-waits")), None);
        // a-old is needed only by an ended job, so it goes; c-needed is kept for d-waits.
        assert_eq!(t.expired(400), vec!["a-old", "g-failed", "h-needs-old"]);
        assert_eq!(
            t.expired(1000),
            vec![
                "a-old",
                "b-recent",
                "e-cancelled",
                "g-failed",
                "h-needs-old"
            ]
        );
        assert!(t.expired(100).is_empty(), "ended at the cutoff is kept");
    }

    #[test]
    fn a_lost_mark_wins_over_a_late_write_of_the_attempt() {
        use AttemptState::*;
        let mark = LostMark {
            at_ms: 500,
            by: "n4".into(),
        };
        // Attempt 1 was marked lost; its node, wrongly thought dead, later wrote it RUNNING
        // and then SUCCEEDED. Attempt 2 ran elsewhere and succeeded.
        let late = Attempt {
            started_ms: 100,
            ..ended_at(1, Succeeded, 900)
        };
        let t = JobTable::from_records(
            vec![job("j", 10, &[])],
            vec![
                ("j".to_string(), 0, late),
                ("j".to_string(), 0, ended_at(2, Succeeded, 800)),
            ],
            vec![
                ("j".to_string(), 0, 1, mark.clone()),
                // A mark for an attempt that is not recorded (yet) changes nothing.
                ("j".to_string(), 0, 3, mark),
            ],
        );
        let a = t.attempts_of("j", 0);
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].state, a[0].reason.as_str()), (Failed, NODE_LOST));
        assert_eq!((a[0].ended_ms, a[0].exit_code), (500, None));
        assert_eq!(a[1].state, Succeeded);
        let views = t.indices("j");
        assert_eq!(views[0].state, JobState::Succeeded);
        assert_eq!(
            views[0]
                .attempts
                .iter()
                .filter(|a| a.state == Succeeded)
                .count(),
            1,
            "exactly one success in the record"
        );
        // A RUNNING attempt marked lost no longer holds the index: it is runnable again.
        let t = JobTable::from_records(
            vec![job("r", 10, &[])],
            vec![(
                "r".to_string(),
                0,
                Attempt {
                    started_ms: 50,
                    ..attempt(1, Running, None, "")
                },
            )],
            vec![(
                "r".to_string(),
                0,
                1,
                LostMark {
                    at_ms: 60,
                    by: "n1".into(),
                },
            )],
        );
        assert_eq!(t.indices("r")[0].state, JobState::Runnable);
        assert_eq!(parse_attempt_path("abc/7/2"), Some(("abc", 7, 2)));
        assert_eq!(parse_attempt_path("abc/x/2"), None);
        assert_eq!(parse_attempt_path("abc/7"), None);
    }
}
