//! Container services (like ECS services): a desired count of replicas of an image, placed by
//! the placement core, run by each node's containerd, healed, scaled and rolled.
//!
//! All of it is plain data in the replicated state:
//! - `svc/<name>`: the [`ServiceSpec`] users write (count, resources, the [`Template`] to run,
//!   and during a rolling update the previous template);
//! - `claim/svc/<name>/<i>`: which node runs replica `i` (written by the scheduler);
//! - `svcstat/<name>/<i>`: what that node reports about replica `i` ([`ReplicaStatus`]);
//! - `svcroll/<name>`: how far the rolling update of the current generation got
//!   ([`RolloutProgress`]), written by the service's coordinator.
//!
//! Each node's [`supervisor`] runs the replicas its claims name through [`runtime`]. The
//! gateway reads the statuses to find healthy replicas.

pub mod runtime;
pub mod spec;
pub mod supervisor;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::membership::MemberState;
use crate::node::NodeState;
use crate::placement::{Strategy, WorkloadSpec};
use crate::registry::Registry;
use crate::scheduler::{Scheduler, WorkloadSource};

const SVC_PREFIX: &str = "svc/";
const STATUS_PREFIX: &str = "svcstat/";
const ROLL_PREFIX: &str = "svcroll/";
/// Heartbeat label a node sets while its containerd answers; services are constrained to it.
pub const CONTAINERS_LABEL: &str = "meshwork.containers";
/// Value of [`CONTAINERS_LABEL`] on nodes that can run containers.
pub const CONTAINERS_READY: &str = "ready";
/// A new replica in a rolling update that has not become healthy by then is rolled back.
pub const ROLLOUT_STEP_TIMEOUT_MS: u64 = 60_000;
/// A new replica that restarted this often during its rollout step is rolled back at once.
pub const ROLLOUT_MAX_RESTARTS: u32 = 3;
/// Most replicas a service may ask for.
pub const MAX_REPLICAS: u32 = 1000;

/// What each replica runs: changing any of it is a rolling update.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Template {
    /// Image reference `name:tag` in the mesh registry.
    pub image: String,
    /// Replaces the image's entrypoint and command when not empty.
    pub cmd: Vec<String>,
    /// Environment (on top of the image's).
    pub env: BTreeMap<String, String>,
    /// HTTP health check path; empty for none.
    pub health_http: String,
    /// Health check command; empty for none.
    pub health_cmd: Vec<String>,
}

impl Template {
    /// A short hash that names this template on containers and statuses.
    pub fn hash(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("templates serialize");
        blake3::hash(&bytes).to_hex()[..16].to_string()
    }
}

/// A service as stored at `svc/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Name: 1–63 of `[a-z0-9-]`, starting with a letter.
    pub name: String,
    /// Desired replicas.
    pub replicas: u32,
    /// CPU per replica, millicores.
    pub cpu_millis: u64,
    /// Memory per replica, bytes.
    pub memory_bytes: u64,
    /// The port the service speaks HTTP on (0: none); see [`supervisor`] for `PORT`.
    pub port: u16,
    /// Spread or binpack.
    pub strategy: Strategy,
    /// Node labels required.
    pub constraints: BTreeMap<String, String>,
    /// What runs.
    pub template: Template,
    /// Bumped by every template change.
    pub generation: u64,
    /// During a rolling update: what replicas not yet updated keep running.
    pub previous: Option<Template>,
    /// Why the last update was rolled back, if it was.
    pub rolled_back: Option<String>,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
}

/// Progress of the rolling update of one generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutProgress {
    /// The generation being rolled out.
    pub generation: u64,
    /// Replicas `0..updated` may run the new template.
    pub updated: u32,
    /// When the current step began, ms since the epoch.
    pub step_started_ms: u64,
    /// Every replica runs the new template and is healthy.
    pub done: bool,
}

/// What the node running a replica reports about it, at `svcstat/<name>/<i>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Peer id of the node.
    pub node: String,
    /// Its name.
    pub node_name: String,
    /// The claim epoch it runs under.
    pub epoch: u64,
    /// Hash of the template it runs.
    pub template: String,
    /// pulling, starting, running, unhealthy, exited, backoff, stopping, failed.
    pub state: String,
    /// Restarts since it was placed here.
    pub restarts: u32,
    /// When it entered this state, ms since the epoch.
    pub since_ms: u64,
    /// Why (exit code, error, health check output).
    pub reason: String,
    /// Passing its health check (or running, without one).
    pub healthy: bool,
    /// The port allocated for it on its node.
    pub port: u16,
    /// containerd container id.
    pub container_id: String,
}

/// Errors of service operations; each maps to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No such service.
    #[error("no service {0:?} in this mesh")]
    Unknown(String),
    /// The name is taken.
    #[error("service {0:?} exists already; use `svc update` or `svc scale`")]
    Exists(String),
    /// The image is not in the registry.
    #[error("image {0:?} is not in the mesh registry; push it first (`meshctl image push`)")]
    UnknownImage(String),
    /// Storing failed.
    #[error("cannot store the service: {0}")]
    State(String),
    /// A node did not answer.
    #[error("node {node} did not answer: {message}")]
    Remote {
        /// The node.
        node: String,
        /// Why.
        message: String,
    },
}

/// The gRPC-facing operations on services.
pub struct Services {
    node: Arc<NodeState>,
    registry: Arc<Registry>,
    log_dir: std::path::PathBuf,
}

/// One replica as `svc ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    /// Index.
    pub index: u32,
    /// Claim owner (peer id) and its name; empty while pending.
    pub node: String,
    /// Owner's name.
    pub node_name: String,
    /// Claim epoch.
    pub epoch: u64,
    /// The owner's report when it is about this claim.
    pub status: Option<ReplicaStatus>,
    /// Why it is not placed, when it is not.
    pub pending: Option<String>,
    /// The template it should run.
    pub wanted_template: String,
}

/// One piece of a replica's log, read on the node that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRead {
    /// containerd container id.
    pub container: String,
    /// Read from this offset of the current file; `None` for the last `tail` bytes.
    pub from: Option<u64>,
    /// How much to send when `from` is `None`.
    pub tail: u64,
}

/// The answer to a [`LogRead`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPiece {
    /// Bytes of output.
    pub data: Vec<u8>,
    /// Offset to ask from next time.
    pub next: u64,
}

/// Most bytes one log read returns.
const LOG_READ_MAX: u64 = 1 << 20;

pub(crate) fn now_ms() -> u64 {
    crate::functions::now_ms()
}

/// Checks a service name (same rules as function names: a DNS label).
pub fn validate_name(name: &str) -> Result<(), ServiceError> {
    crate::functions::validate_name(name)
        .map_err(|_| {
            ServiceError::Invalid(format!(
                "service name {name:?}: 1 to 63 of a-z, 0-9 and '-', starting with a letter"
            ))
        })
        .map(|_| ())
}

fn validate_env(env: &BTreeMap<String, String>) -> Result<(), ServiceError> {
    for (k, v) in env {
        let ok = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(ServiceError::Invalid(format!(
                "env name {k:?}: letters, digits and '_', not starting with a digit"
            )));
        }
        if k == "PORT" {
            return Err(ServiceError::Invalid(
                "env PORT is set by the node (the port it allocated for the replica)".into(),
            ));
        }
        if v.contains('\0') {
            return Err(ServiceError::Invalid(format!(
                "env {k}: the value contains a NUL byte"
            )));
        }
    }
    Ok(())
}

fn validate_template(t: &Template) -> Result<(), ServiceError> {
    crate::registry::parse_reference(&t.image).map_err(|e| ServiceError::Invalid(e.to_string()))?;
    validate_env(&t.env)?;
    if t.cmd.iter().chain(&t.health_cmd).any(|a| a.contains('\0')) {
        return Err(ServiceError::Invalid(
            "command arguments must not contain NUL bytes".into(),
        ));
    }
    if !t.health_http.is_empty()
        && (!t.health_http.starts_with('/') || t.health_http.chars().any(|c| c.is_control()))
    {
        return Err(ServiceError::Invalid(format!(
            "health check path {:?}: must start with '/' and have no control characters",
            t.health_http
        )));
    }
    Ok(())
}

/// Checks everything about a spec that does not depend on the cluster.
pub fn validate_spec(spec: &ServiceSpec) -> Result<(), ServiceError> {
    validate_name(&spec.name)?;
    validate_template(&spec.template)?;
    if spec.replicas > MAX_REPLICAS {
        return Err(ServiceError::Invalid(format!(
            "replicas {}: at most {MAX_REPLICAS}",
            spec.replicas
        )));
    }
    if spec.cpu_millis == 0 || spec.memory_bytes < (4 << 20) {
        return Err(ServiceError::Invalid(
            "a replica needs some CPU (e.g. --cpu 100m) and at least 4 MiB of memory".into(),
        ));
    }
    if !spec.template.health_http.is_empty() && spec.port == 0 {
        return Err(ServiceError::Invalid(
            "an HTTP health check needs --port".into(),
        ));
    }
    Ok(())
}

/// Which template replica `index` should run: during a rolling update, replicas not yet
/// reached keep the previous one.
pub fn wanted_template<'a>(
    spec: &'a ServiceSpec,
    progress: Option<&RolloutProgress>,
    index: u32,
) -> &'a Template {
    match &spec.previous {
        None => &spec.template,
        Some(previous) => {
            let (updated, done) = match progress {
                Some(p) if p.generation == spec.generation => (p.updated.max(1), p.done),
                _ => (1, false),
            };
            if done || index < updated {
                &spec.template
            } else {
                previous
            }
        }
    }
}

/// What the coordinator of a service should do about its rolling update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutAction {
    /// Nothing now.
    Wait,
    /// Write this progress (the first step, or the next one).
    Progress(RolloutProgress),
    /// The new template never became healthy: go back to the previous one.
    RollBack(String),
}

/// One step of the rolling-update state machine (pure: given the spec, the progress record and
/// the statuses of the replicas, by index).
pub fn rollout_step(
    spec: &ServiceSpec,
    progress: Option<&RolloutProgress>,
    statuses: &BTreeMap<u32, ReplicaStatus>,
    now_ms: u64,
) -> RolloutAction {
    if spec.previous.is_none() {
        return RolloutAction::Wait;
    }
    let current = match progress {
        Some(p) if p.generation == spec.generation => p.clone(),
        _ => {
            return RolloutAction::Progress(RolloutProgress {
                generation: spec.generation,
                updated: 1,
                step_started_ms: now_ms,
                done: false,
            });
        }
    };
    if current.done {
        return RolloutAction::Wait;
    }
    let new_hash = spec.template.hash();
    let step = current.updated.saturating_sub(1);
    if step >= spec.replicas {
        return RolloutAction::Progress(RolloutProgress {
            done: true,
            ..current
        });
    }
    let status = statuses.get(&step).filter(|s| s.template == new_hash);
    if let Some(s) = status {
        if s.state == "running" && s.healthy {
            let updated = current.updated + 1;
            return RolloutAction::Progress(RolloutProgress {
                generation: spec.generation,
                updated,
                step_started_ms: now_ms,
                done: updated > spec.replicas,
            });
        }
        if s.restarts >= ROLLOUT_MAX_RESTARTS {
            return RolloutAction::RollBack(format!(
                "replica {step} of generation {} restarted {} times ({})",
                spec.generation, s.restarts, s.reason
            ));
        }
    }
    if now_ms.saturating_sub(current.step_started_ms) > ROLLOUT_STEP_TIMEOUT_MS {
        return RolloutAction::RollBack(format!(
            "replica {step} of generation {} was not healthy within {} s",
            spec.generation,
            ROLLOUT_STEP_TIMEOUT_MS / 1000
        ));
    }
    RolloutAction::Wait
}

/// Every service spec in the state.
pub fn read_specs(node: &NodeState) -> Vec<ServiceSpec> {
    let replica = node.replica.lock().expect("replica lock");
    replica
        .map()
        .list(SVC_PREFIX)
        .filter_map(|e| serde_json::from_slice(e.value.as_deref()?).ok())
        .collect()
}

fn read_json<T: serde::de::DeserializeOwned>(node: &NodeState, key: &str) -> Option<T> {
    let replica = node.replica.lock().expect("replica lock");
    let entry = replica.map().get(key)?;
    serde_json::from_slice(entry.value.as_deref()?).ok()
}

/// The rollout progress of a service.
pub fn read_progress(node: &NodeState, name: &str) -> Option<RolloutProgress> {
    read_json(node, &format!("{ROLL_PREFIX}{name}"))
}

/// The statuses reported for a service's replicas, by index.
pub fn read_statuses(node: &NodeState, name: &str) -> BTreeMap<u32, ReplicaStatus> {
    let prefix = format!("{STATUS_PREFIX}{name}/");
    let replica = node.replica.lock().expect("replica lock");
    replica
        .map()
        .list(&prefix)
        .filter_map(|e| {
            let index = e.key[prefix.len()..].parse().ok()?;
            Some((index, serde_json::from_slice(e.value.as_deref()?).ok()?))
        })
        .collect()
}

/// The state key of replica `index`'s status.
pub fn status_key(name: &str, index: u32) -> String {
    format!("{STATUS_PREFIX}{name}/{index}")
}

/// The workload id of a service in placement and claims.
pub fn workload_id(name: &str) -> String {
    format!("{SVC_PREFIX}{name}")
}

/// A healthy replica the gateway can send a request to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Replica index.
    pub index: u32,
    /// Peer id of the node running it.
    pub node: String,
    /// Where to connect.
    pub addr: std::net::SocketAddr,
}

/// The IPv4 address other nodes reach `peer` at, from the multiaddrs in its heartbeat
/// (a non-loopback one when it has one).
pub fn node_ip(node: &NodeState, peer: &str) -> Option<std::net::IpAddr> {
    if peer == node.peer_id.to_string() {
        return Some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    }
    let table = node.membership.read().expect("membership lock");
    let member = table
        .members()
        .into_iter()
        .find(|m| m.heartbeat.peer_id == peer)?;
    let ips: Vec<std::net::IpAddr> = member
        .heartbeat
        .addrs
        .iter()
        .filter_map(|a| {
            let rest = a.strip_prefix("/ip4/")?;
            rest.split('/').next()?.parse().ok()
        })
        .collect();
    ips.iter()
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .or_else(|| ips.first())
        .copied()
}

/// Healthy replicas of a service that run under their current claim, local ones first.
pub fn endpoints(node: &NodeState, name: &str) -> Vec<Endpoint> {
    let workload = workload_id(name);
    let claims: HashMap<u32, (String, u64)> = Scheduler::claims_of(node, &workload)
        .into_iter()
        .map(|c| (c.replica, (c.node, c.epoch)))
        .collect();
    let alive: std::collections::HashSet<String> = {
        let table = node.membership.read().expect("membership lock");
        table
            .members()
            .into_iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.heartbeat.peer_id.clone())
            .collect()
    };
    let me = node.peer_id.to_string();
    let mut out: Vec<Endpoint> = read_statuses(node, name)
        .into_iter()
        .filter(|(i, s)| {
            claims.get(i) == Some(&(s.node.clone(), s.epoch))
                && s.state == "running"
                && s.healthy
                && s.port != 0
                && (s.node == me || alive.contains(&s.node))
        })
        .filter_map(|(index, s)| {
            let ip = node_ip(node, &s.node)?;
            Some(Endpoint {
                index,
                node: s.node.clone(),
                addr: std::net::SocketAddr::new(ip, s.port),
            })
        })
        .collect();
    out.sort_by_key(|e| (e.node != me, e.index));
    out
}

impl Services {
    /// Service operations over the node's state.
    pub fn new(
        node: Arc<NodeState>,
        registry: Arc<Registry>,
        log_dir: std::path::PathBuf,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            node,
            registry,
            log_dir,
        });
        let logs_dir = this.log_dir.clone();
        this.node.router.register(
            "svc.logs",
            Arc::new(move |_peer, body| {
                let dir = logs_dir.clone();
                Box::pin(async move {
                    let reads: Vec<LogRead> =
                        postcard::from_bytes(&body).map_err(|e| format!("bad call: {e}"))?;
                    let pieces: Vec<Result<LogPiece, String>> =
                        reads.iter().map(|r| read_log(&dir, r)).collect();
                    Ok(postcard::to_allocvec(&pieces).expect("answers serialize"))
                })
            }),
        );
        this
    }

    /// The scheduler's view of services: one workload per service, constrained to nodes
    /// whose containerd answers, preferring nodes that hold the image.
    pub fn workload_source(registry: Arc<Registry>) -> WorkloadSource {
        Box::new(move |node: &NodeState| {
            read_specs(node)
                .into_iter()
                .map(|s| {
                    let mut constraints = s.constraints.clone();
                    constraints.insert(CONTAINERS_LABEL.into(), CONTAINERS_READY.into());
                    let preferred = registry
                        .image(&s.template.image)
                        .ok()
                        .and_then(|img| {
                            img.layers.last().map(|l| {
                                registry
                                    .holders(&l.blake3)
                                    .into_iter()
                                    .map(|h| h.peer.to_string())
                                    .collect()
                            })
                        })
                        .unwrap_or_default();
                    WorkloadSpec {
                        id: workload_id(&s.name),
                        replicas: s.replicas,
                        cpu_millis: s.cpu_millis,
                        memory_bytes: s.memory_bytes,
                        constraints,
                        strategy: s.strategy,
                        priority: 0,
                        preferred,
                    }
                })
                .collect()
        })
    }

    /// A service by name.
    pub fn get(&self, name: &str) -> Result<ServiceSpec, ServiceError> {
        validate_name(name)?;
        read_json(&self.node, &format!("{SVC_PREFIX}{name}"))
            .ok_or_else(|| ServiceError::Unknown(name.to_string()))
    }

    /// Every service, by name.
    pub fn list(&self) -> Vec<ServiceSpec> {
        read_specs(&self.node)
    }

    fn store(&self, spec: &ServiceSpec) -> Result<(), ServiceError> {
        let value = serde_json::to_vec(spec).expect("specs serialize");
        self.node
            .write(&format!("{SVC_PREFIX}{}", spec.name), Some(value))
            .map(|_| ())
            .map_err(|e| ServiceError::State(e.to_string()))
    }

    /// Checks that a replica fits on the largest node that can run containers.
    fn check_fits(&self, spec: &ServiceSpec) -> Result<(), ServiceError> {
        let table = self.node.membership.read().expect("membership lock");
        let nodes: Vec<_> = table
            .members()
            .into_iter()
            .filter(|m| m.state == MemberState::Alive)
            .filter(|m| {
                m.heartbeat.labels.get(CONTAINERS_LABEL).map(String::as_str)
                    == Some(CONTAINERS_READY)
            })
            .collect();
        let Some(largest) = nodes.iter().max_by_key(|m| {
            (
                m.heartbeat.total.memory_bytes.min(u64::MAX / 2),
                m.heartbeat.total.cpu_millis,
            )
        }) else {
            // No node runs containerd right now: accept, the replicas wait as pending.
            return Ok(());
        };
        let max_cpu = nodes
            .iter()
            .map(|m| m.heartbeat.total.cpu_millis)
            .max()
            .unwrap_or(0);
        let max_mem = nodes
            .iter()
            .map(|m| m.heartbeat.total.memory_bytes)
            .max()
            .unwrap_or(0);
        if spec.cpu_millis > max_cpu || spec.memory_bytes > max_mem {
            return Err(ServiceError::Invalid(format!(
                "a replica needs {} CPU and {} memory, more than any node offers; the largest \
                 node, {}, has {} CPU and {} memory",
                human_cpu(spec.cpu_millis),
                human_bytes(spec.memory_bytes),
                largest.heartbeat.name,
                human_cpu(largest.heartbeat.total.cpu_millis),
                human_bytes(largest.heartbeat.total.memory_bytes),
            )));
        }
        Ok(())
    }

    /// Creates a service.
    pub fn create(&self, mut spec: ServiceSpec) -> Result<ServiceSpec, ServiceError> {
        validate_spec(&spec)?;
        if self.get(&spec.name).is_ok() {
            return Err(ServiceError::Exists(spec.name));
        }
        if self.registry.image(&spec.template.image).is_err() {
            return Err(ServiceError::UnknownImage(spec.template.image));
        }
        self.check_fits(&spec)?;
        spec.generation = 1;
        spec.previous = None;
        spec.rolled_back = None;
        spec.created_ms = now_ms();
        self.store(&spec)?;
        tracing::info!(service = %spec.name, image = %spec.template.image,
            replicas = spec.replicas, "service created");
        Ok(spec)
    }

    /// Changes the template: a rolling update from the running template.
    pub fn update(&self, name: &str, template: Template) -> Result<ServiceSpec, ServiceError> {
        let mut spec = self.get(name)?;
        validate_template(&template)?;
        if !template.health_http.is_empty() && spec.port == 0 {
            return Err(ServiceError::Invalid(
                "an HTTP health check needs a port".into(),
            ));
        }
        if self.registry.image(&template.image).is_err() {
            return Err(ServiceError::UnknownImage(template.image));
        }
        if template == spec.template {
            return Ok(spec);
        }
        // An update during an update rolls from what the not-yet-updated replicas run.
        let from = spec
            .previous
            .take()
            .unwrap_or_else(|| spec.template.clone());
        spec.previous = Some(from);
        spec.template = template;
        spec.generation += 1;
        spec.rolled_back = None;
        self.store(&spec)?;
        tracing::info!(service = %name, generation = spec.generation, "rolling update started");
        Ok(spec)
    }

    /// Sets the replica count.
    pub fn scale(&self, name: &str, replicas: u32) -> Result<ServiceSpec, ServiceError> {
        let mut spec = self.get(name)?;
        spec.replicas = replicas;
        validate_spec(&spec)?;
        self.store(&spec)?;
        Ok(spec)
    }

    /// Removes a service; every node stops its replicas.
    pub fn remove(&self, name: &str) -> Result<(), ServiceError> {
        let spec = self.get(name)?;
        self.node
            .write(&format!("{SVC_PREFIX}{name}"), None)
            .map_err(|e| ServiceError::State(e.to_string()))?;
        let _ = self.node.write(&format!("{ROLL_PREFIX}{name}"), None);
        for index in read_statuses(&self.node, name).keys() {
            let _ = self.node.write(&status_key(name, *index), None);
        }
        tracing::info!(service = %spec.name, "service removed");
        Ok(())
    }

    /// One view per replica index `0..replicas`.
    pub fn ps(&self, name: &str) -> Result<Vec<ReplicaView>, ServiceError> {
        let spec = self.get(name)?;
        let workload = workload_id(name);
        let claims: HashMap<u32, (String, u64)> = Scheduler::claims_of(&self.node, &workload)
            .into_iter()
            .map(|c| (c.replica, (c.node, c.epoch)))
            .collect();
        let statuses = read_statuses(&self.node, name);
        let progress = read_progress(&self.node, name);
        let pending = self.node.pending.lock().expect("pending lock").clone();
        let names = self.node_names();
        Ok((0..spec.replicas)
            .map(|index| {
                let claim = claims.get(&index).cloned();
                let status = statuses
                    .get(&index)
                    .filter(|s| claim.as_ref() == Some(&(s.node.clone(), s.epoch)))
                    .cloned();
                let (node, epoch) = claim.clone().unwrap_or_default();
                ReplicaView {
                    index,
                    node_name: names.get(&node).cloned().unwrap_or_else(|| node.clone()),
                    node,
                    epoch,
                    status,
                    pending: if claim.is_none() {
                        Some(
                            pending
                                .get(&(workload.clone(), index))
                                .cloned()
                                .unwrap_or_else(|| "waiting for placement".into()),
                        )
                    } else {
                        None
                    },
                    wanted_template: wanted_template(&spec, progress.as_ref(), index).hash(),
                }
            })
            .collect())
    }

    fn node_names(&self) -> HashMap<String, String> {
        let table = self.node.membership.read().expect("membership lock");
        table
            .members()
            .into_iter()
            .map(|m| (m.heartbeat.peer_id.clone(), m.heartbeat.name.clone()))
            .collect()
    }

    /// Counts for `svc ls`: running and healthy, placed but not running, not placed,
    /// running the current template.
    pub fn counts(&self, spec: &ServiceSpec) -> (u32, u32, u32, u32) {
        let views = self.ps(&spec.name).unwrap_or_default();
        let current = spec.template.hash();
        let mut out = (0, 0, 0, 0);
        for v in &views {
            match &v.status {
                _ if v.pending.is_some() => out.2 += 1,
                Some(s) if s.state == "running" && s.healthy => {
                    out.0 += 1;
                    if s.template == current {
                        out.3 += 1;
                    }
                }
                _ => out.1 += 1,
            }
        }
        out
    }

    /// A rollout summary for `svc ls`.
    pub fn rollout_text(&self, spec: &ServiceSpec) -> String {
        if let Some(reason) = &spec.rolled_back {
            return format!("rolled back: {reason}");
        }
        if spec.previous.is_some() {
            let progress = read_progress(&self.node, &spec.name);
            if !progress
                .as_ref()
                .is_some_and(|p| p.generation == spec.generation && p.done)
            {
                let updated = progress
                    .filter(|p| p.generation == spec.generation)
                    .map(|p| p.updated.saturating_sub(1))
                    .unwrap_or(0);
                return format!("rolling {updated}/{}", spec.replicas);
            }
        }
        String::new()
    }

    /// Reads log pieces of replicas from the nodes that run them: `(replica, node name,
    /// container id, piece)` per replica with a status.
    pub async fn read_logs(
        &self,
        name: &str,
        only: Option<u32>,
        offsets: &HashMap<String, u64>,
        tail: u64,
    ) -> Result<Vec<(u32, String, String, LogPiece)>, ServiceError> {
        self.get(name)?;
        let statuses = read_statuses(&self.node, name);
        let mut by_node: BTreeMap<String, Vec<(u32, String, LogRead)>> = BTreeMap::new();
        for (index, s) in statuses {
            if only.is_some_and(|o| o != index) || s.container_id.is_empty() {
                continue;
            }
            let read = LogRead {
                container: s.container_id.clone(),
                from: offsets.get(&s.container_id).copied(),
                tail,
            };
            by_node
                .entry(s.node.clone())
                .or_default()
                .push((index, s.node_name.clone(), read));
        }
        let me = self.node.peer_id.to_string();
        let mut out = Vec::new();
        for (peer, reads) in by_node {
            let requests: Vec<LogRead> = reads.iter().map(|(_, _, r)| r.clone()).collect();
            let answers: Vec<Result<LogPiece, String>> = if peer == me {
                requests
                    .iter()
                    .map(|r| read_log(&self.log_dir, r))
                    .collect()
            } else {
                let Ok(peer_id) = peer.parse() else { continue };
                let body = postcard::to_allocvec(&requests).expect("requests serialize");
                match self.node.call(peer_id, "svc.logs", body).await {
                    Ok(bytes) => postcard::from_bytes(&bytes).unwrap_or_default(),
                    Err(e) => {
                        tracing::debug!(node = %peer, error = %e, "cannot read replica logs");
                        continue;
                    }
                }
            };
            for ((index, node_name, read), answer) in reads.into_iter().zip(answers) {
                if let Ok(piece) = answer {
                    out.push((index, node_name, read.container, piece));
                }
            }
        }
        Ok(out)
    }
}

/// How the image's config says to run it (entrypoint, command, env, user), read from the
/// config blob in this node's store (pulled with the image).
pub(crate) fn image_config(
    registry: &Registry,
    image: &str,
) -> Result<spec::ImageRunConfig, String> {
    let record = registry.image(image).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    use std::io::Read;
    registry
        .store()
        .reader(&record.config.blake3)
        .map_err(|e| e.to_string())?
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    spec::ImageRunConfig::from_config_json(&bytes).map_err(|e| e.to_string())
}

/// Reads one piece of a local container log.
pub(crate) fn read_log(dir: &std::path::Path, read: &LogRead) -> Result<LogPiece, String> {
    let ok = !read.container.is_empty()
        && read
            .container
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        && !read.container.starts_with('.');
    if !ok {
        return Err(format!("bad container id {:?}", read.container));
    }
    let path = dir.join(format!("{}.log", read.container));
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    match read.from {
        None => {
            let data = runtime::read_log_tail(&path, read.tail.min(LOG_READ_MAX))
                .map_err(|e| e.to_string())?;
            Ok(LogPiece { data, next: len })
        }
        Some(from) => {
            // A smaller file than the offset means it was rotated: start over.
            let from = if from > len { 0 } else { from };
            let want = (len - from).min(LOG_READ_MAX);
            let mut data = vec![0u8; want as usize];
            if want > 0 {
                use std::io::{Read, Seek, SeekFrom};
                let mut f = std::fs::File::open(&path).map_err(|e| e.to_string())?;
                f.seek(SeekFrom::Start(from)).map_err(|e| e.to_string())?;
                let n = f.read(&mut data).map_err(|e| e.to_string())?;
                data.truncate(n);
            }
            let next = from + data.len() as u64;
            Ok(LogPiece { data, next })
        }
    }
}

fn human_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        format!("{}", millis / 1000)
    } else {
        format!("{millis}m")
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(image: &str) -> Template {
        Template {
            image: image.into(),
            cmd: vec![],
            env: BTreeMap::new(),
            health_http: String::new(),
            health_cmd: vec![],
        }
    }

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            replicas: 3,
            cpu_millis: 100,
            memory_bytes: 64 << 20,
            port: 8080,
            strategy: Strategy::Spread,
            constraints: BTreeMap::new(),
            template: template("app:2"),
            generation: 2,
            previous: Some(template("app:1")),
            rolled_back: None,
            created_ms: 0,
        }
    }

    fn status(template: &Template, state: &str, healthy: bool, restarts: u32) -> ReplicaStatus {
        ReplicaStatus {
            node: "n".into(),
            node_name: "n".into(),
            epoch: 1,
            template: template.hash(),
            state: state.into(),
            restarts,
            since_ms: 0,
            reason: "exit 1".into(),
            healthy,
            port: 1,
            container_id: "c".into(),
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let mut s = spec();
        s.name = "Web".into();
        assert!(
            validate_spec(&s)
                .unwrap_err()
                .to_string()
                .contains("service name")
        );
        let mut s = spec();
        s.template.env.insert("1A".into(), "x".into());
        assert!(
            validate_spec(&s)
                .unwrap_err()
                .to_string()
                .contains("env name")
        );
        let mut s = spec();
        s.template.env.insert("PORT".into(), "1".into());
        assert!(validate_spec(&s).unwrap_err().to_string().contains("PORT"));
        let mut s = spec();
        s.template.image = "no tag here!".into();
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.cpu_millis = 0;
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.port = 0;
        s.template.health_http = "/healthz".into();
        assert!(
            validate_spec(&s)
                .unwrap_err()
                .to_string()
                .contains("--port")
        );
        assert!(validate_spec(&spec()).is_ok());
    }

    #[test]
    fn replicas_keep_the_previous_template_until_reached() {
        let s = spec();
        assert_eq!(wanted_template(&s, None, 0).image, "app:2");
        assert_eq!(wanted_template(&s, None, 1).image, "app:1");
        let p = RolloutProgress {
            generation: 2,
            updated: 2,
            step_started_ms: 0,
            done: false,
        };
        assert_eq!(wanted_template(&s, Some(&p), 1).image, "app:2");
        assert_eq!(wanted_template(&s, Some(&p), 2).image, "app:1");
        let stale = RolloutProgress {
            generation: 1,
            ..p.clone()
        };
        assert_eq!(wanted_template(&s, Some(&stale), 1).image, "app:1");
        let done = RolloutProgress { done: true, ..p };
        assert_eq!(wanted_template(&s, Some(&done), 2).image, "app:2");
        let mut plain = spec();
        plain.previous = None;
        assert_eq!(wanted_template(&plain, None, 2).image, "app:2");
    }

    #[test]
    fn rollout_advances_on_health_and_rolls_back_on_failure() {
        let s = spec();
        let mut statuses = BTreeMap::new();
        let RolloutAction::Progress(p) = rollout_step(&s, None, &statuses, 1000) else {
            panic!("first step starts the rollout");
        };
        assert_eq!((p.updated, p.done), (1, false));
        assert_eq!(
            rollout_step(&s, Some(&p), &statuses, 2000),
            RolloutAction::Wait
        );
        // Replica 0 still on the old template, even if healthy: wait.
        statuses.insert(0, status(&template("app:1"), "running", true, 0));
        assert_eq!(
            rollout_step(&s, Some(&p), &statuses, 2000),
            RolloutAction::Wait
        );
        statuses.insert(0, status(&s.template, "running", true, 0));
        let RolloutAction::Progress(p2) = rollout_step(&s, Some(&p), &statuses, 3000) else {
            panic!("healthy replica 0 advances");
        };
        assert_eq!(p2.updated, 2);
        statuses.insert(1, status(&s.template, "running", true, 0));
        let RolloutAction::Progress(p3) = rollout_step(&s, Some(&p2), &statuses, 4000) else {
            panic!()
        };
        statuses.insert(2, status(&s.template, "running", true, 0));
        let RolloutAction::Progress(p4) = rollout_step(&s, Some(&p3), &statuses, 5000) else {
            panic!()
        };
        assert!(p4.done);
        assert_eq!(
            rollout_step(&s, Some(&p4), &statuses, 6000),
            RolloutAction::Wait
        );

        // Crash loop on the new template: roll back.
        let mut crashing = BTreeMap::new();
        crashing.insert(
            0,
            status(&s.template, "backoff", false, ROLLOUT_MAX_RESTARTS),
        );
        assert!(matches!(
            rollout_step(&s, Some(&p), &crashing, 2000),
            RolloutAction::RollBack(r) if r.contains("restarted")
        ));
        // Never healthy: roll back after the step timeout.
        assert!(matches!(
            rollout_step(&s, Some(&p), &BTreeMap::new(), 1000 + ROLLOUT_STEP_TIMEOUT_MS + 1),
            RolloutAction::RollBack(r) if r.contains("not healthy")
        ));
    }

    #[test]
    fn log_reads_refuse_paths_and_follow_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let bad = LogRead {
            container: "../etc/passwd".into(),
            from: None,
            tail: 10,
        };
        assert!(read_log(dir.path(), &bad).is_err());
        std::fs::write(dir.path().join("c1.log"), b"hello\nworld\n").unwrap();
        let tail = read_log(
            dir.path(),
            &LogRead {
                container: "c1".into(),
                from: None,
                tail: 6,
            },
        )
        .unwrap();
        assert_eq!((tail.data.as_slice(), tail.next), (&b"world\n"[..], 12));
        std::fs::write(dir.path().join("c1.log"), b"new\n").unwrap();
        let after = read_log(
            dir.path(),
            &LogRead {
                container: "c1".into(),
                from: Some(12),
                tail: 0,
            },
        )
        .unwrap();
        assert_eq!((after.data.as_slice(), after.next), (&b"new\n"[..], 4));
    }
}
