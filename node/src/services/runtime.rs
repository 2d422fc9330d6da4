//! The container life cycle on containerd: create a container on an unpacked image, start,
//! inspect, stop and remove its task, run a command in it, list what this node's namespace
//! holds. Nothing here decides *what* should run; the supervisor does.
//!
//! Each container gets its own writable snapshot (key = container id) on top of the image's
//! top chain id, a runtime spec from [`super::spec`], and its stdout and stderr appended to
//! one log file through containerd's `file://` stdio scheme: the shim (not `meshd`) holds
//! the file, so output keeps flowing while `meshd` restarts, and a replica re-adopted after
//! a restart keeps its log.
//!
//! Containers carry labels (`meshwork.service`, `meshwork.replica`, `meshwork.template`,
//! `meshwork.port`) so a restarted `meshd` can recognise and adopt them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest, GetRequest, KillRequest,
    ListContainersRequest, StartRequest,
};
use containerd_client::types::v1::Status as TaskStatus;
use prost_types::Any;
use tonic::Code;

use crate::containerd::Containerd;

/// Label naming the service a container belongs to.
pub const LABEL_SERVICE: &str = "meshwork.service";
/// Label with the replica index.
pub const LABEL_REPLICA: &str = "meshwork.replica";
/// Label with the hash of the template (image, command, env, ...) the container runs.
pub const LABEL_TEMPLATE: &str = "meshwork.template";
/// Label with the port the node allocated.
pub const LABEL_PORT: &str = "meshwork.port";
/// Label with the service generation the template belongs to.
pub const LABEL_GENERATION: &str = "meshwork.generation";

const RUNC: &str = "io.containerd.runc.v2";
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// SIGTERM, then SIGKILL after the stop grace period.
const SIGTERM: u32 = 15;
const SIGKILL: u32 = 9;

/// Errors of container operations, with containerd's message.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A containerd call failed.
    #[error("containerd {operation} for {container}: {message}")]
    Call {
        /// What was being done.
        operation: &'static str,
        /// The container.
        container: String,
        /// containerd's message.
        message: String,
    },
    /// The spec could not be serialised.
    #[error("cannot encode the runtime spec: {0}")]
    Spec(String),
    /// A log file could not be prepared.
    #[error("cannot prepare the log file {}: {source}", path.display())]
    Log {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn call_error(operation: &'static str, container: &str, status: &tonic::Status) -> RuntimeError {
    RuntimeError::Call {
        operation,
        container: container.to_owned(),
        message: status.message().to_owned(),
    }
}

/// What a container's task is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// No task exists (never started, or deleted).
    Absent,
    /// Created but not started.
    Created,
    /// Running with this pid.
    Running(u32),
    /// Exited with this status.
    Exited(u32),
    /// Paused or in an unknown state.
    Other,
}

/// A Meshwork container found in this node's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundContainer {
    /// Container id.
    pub id: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
}

impl FoundContainer {
    /// The service and replica index its labels name.
    pub fn replica(&self) -> Option<(String, u32)> {
        Some((
            self.labels.get(LABEL_SERVICE)?.clone(),
            self.labels.get(LABEL_REPLICA)?.parse().ok()?,
        ))
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct NewContainer {
    /// Container id (also its snapshot key).
    pub id: String,
    /// containerd image name (for the record only).
    pub image: String,
    /// The image's top chain id (the snapshot to build the root file system on).
    pub chain_id: String,
    /// The runtime spec.
    pub spec: oci_spec::runtime::Spec,
    /// Labels to set.
    pub labels: HashMap<String, String>,
}

/// Container operations in one node's containerd namespace.
#[derive(Debug, Clone)]
pub struct ContainerRuntime {
    containerd: Containerd,
    log_dir: PathBuf,
}

impl ContainerRuntime {
    /// Runtime over `containerd`, writing container logs under `log_dir`.
    pub fn new(containerd: Containerd, log_dir: PathBuf) -> Self {
        Self {
            containerd,
            log_dir,
        }
    }

    /// The containerd connection.
    pub fn containerd(&self) -> &Containerd {
        &self.containerd
    }

    /// The log file of a container.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.log_dir.join(format!("{id}.log"))
    }

    /// Every container in the namespace that carries Meshwork's service label.
    pub async fn list(&self) -> Result<Vec<FoundContainer>, RuntimeError> {
        self.list_with_label(LABEL_SERVICE).await
    }

    /// Every container in the namespace that carries `label`.
    pub async fn list_with_label(&self, label: &str) -> Result<Vec<FoundContainer>, RuntimeError> {
        let mut client = ContainersClient::new(self.containerd.channel());
        let response = client
            .list(self.containerd.request(ListContainersRequest {
                filters: vec![format!("labels.\"{label}\"")],
            }))
            .await
            .map_err(|s| call_error("list containers", "*", &s))?;
        Ok(response
            .into_inner()
            .containers
            .into_iter()
            .map(|c| FoundContainer {
                id: c.id,
                labels: c.labels,
            })
            .collect())
    }

    /// Creates the container record and its writable snapshot. An existing container of
    /// the same id is an error (remove it first).
    pub async fn create(&self, new: &NewContainer) -> Result<(), RuntimeError> {
        let spec = serde_json::to_vec(&new.spec).map_err(|e| RuntimeError::Spec(e.to_string()))?;
        let snapshotter = self.containerd.snapshotter().to_owned();
        let container = Container {
            id: new.id.clone(),
            labels: new.labels.clone(),
            image: new.image.clone(),
            runtime: Some(Runtime {
                name: RUNC.to_owned(),
                options: None,
            }),
            spec: Some(Any {
                type_url: SPEC_TYPE.to_owned(),
                value: spec,
            }),
            snapshotter: snapshotter.clone(),
            snapshot_key: new.id.clone(),
            ..Default::default()
        };
        // The container record first: it references the snapshot, so containerd's
        // garbage collector keeps the snapshot from the moment it exists.
        ContainersClient::new(self.containerd.channel())
            .create(self.containerd.request(CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(|s| call_error("create container", &new.id, &s))?;
        let prepared = SnapshotsClient::new(self.containerd.channel())
            .prepare(self.containerd.request(PrepareSnapshotRequest {
                snapshotter,
                key: new.id.clone(),
                parent: new.chain_id.clone(),
                labels: HashMap::new(),
            }))
            .await;
        match prepared {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => {
                let error = call_error("prepare snapshot", &new.id, &s);
                let _ = self.remove(&new.id).await;
                Err(error)
            }
        }
    }

    /// Creates and starts the container's task (deleting a stopped one first), with stdout
    /// and stderr appended to the container's log file. Returns the pid.
    pub async fn start(&self, id: &str) -> Result<u32, RuntimeError> {
        self.delete_task(id).await?;
        let log = self.log_path(id);
        std::fs::create_dir_all(&self.log_dir).map_err(|source| RuntimeError::Log {
            path: self.log_dir.clone(),
            source,
        })?;
        let mounts = SnapshotsClient::new(self.containerd.channel())
            .mounts(self.containerd.request(MountsRequest {
                snapshotter: self.containerd.snapshotter().to_owned(),
                key: id.to_owned(),
            }))
            .await
            .map_err(|s| call_error("get snapshot mounts", id, &s))?
            .into_inner()
            .mounts;
        let uri = format!("file://{}", log.display());
        let mut tasks = TasksClient::new(self.containerd.channel());
        tasks
            .create(self.containerd.request(CreateTaskRequest {
                container_id: id.to_owned(),
                rootfs: mounts,
                stdout: uri.clone(),
                stderr: uri,
                ..Default::default()
            }))
            .await
            .map_err(|s| call_error("create task", id, &s))?;
        let started = tasks
            .start(self.containerd.request(StartRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| call_error("start task", id, &s))?;
        Ok(started.into_inner().pid)
    }

    /// The state of the container's task.
    pub async fn state(&self, id: &str) -> Result<TaskState, RuntimeError> {
        self.process_state(id, "").await
    }

    async fn process_state(&self, id: &str, exec_id: &str) -> Result<TaskState, RuntimeError> {
        let response = TasksClient::new(self.containerd.channel())
            .get(self.containerd.request(GetRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            }))
            .await;
        let process = match response {
            Ok(r) => r.into_inner().process,
            Err(s) if s.code() == Code::NotFound => return Ok(TaskState::Absent),
            Err(s) => return Err(call_error("get task", id, &s)),
        };
        let Some(p) = process else {
            return Ok(TaskState::Absent);
        };
        Ok(
            match TaskStatus::try_from(p.status).unwrap_or(TaskStatus::Unknown) {
                TaskStatus::Created => TaskState::Created,
                TaskStatus::Running => TaskState::Running(p.pid),
                TaskStatus::Stopped => TaskState::Exited(p.exit_status),
                _ => TaskState::Other,
            },
        )
    }

    async fn kill(&self, id: &str, signal: u32) -> Result<(), RuntimeError> {
        match TasksClient::new(self.containerd.channel())
            .kill(self.containerd.request(KillRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
                signal,
                all: true,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => Ok(()),
            Err(s) => Err(call_error("kill task", id, &s)),
        }
    }

    /// Stops the task: SIGTERM, then SIGKILL after `grace`, then deletes the task.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        if let TaskState::Running(_) | TaskState::Created | TaskState::Other =
            self.state(id).await?
        {
            self.kill(id, SIGTERM).await?;
            let deadline = tokio::time::Instant::now() + grace;
            loop {
                match self.state(id).await? {
                    TaskState::Exited(_) | TaskState::Absent => break,
                    _ if tokio::time::Instant::now() >= deadline => {
                        self.kill(id, SIGKILL).await?;
                        let hard = tokio::time::Instant::now() + Duration::from_secs(10);
                        while !matches!(
                            self.state(id).await?,
                            TaskState::Exited(_) | TaskState::Absent
                        ) && tokio::time::Instant::now() < hard
                        {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        break;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        self.delete_task(id).await
    }

    /// Kills the task at once (SIGKILL); for tests and fencing.
    pub async fn kill_now(&self, id: &str) -> Result<(), RuntimeError> {
        self.kill(id, SIGKILL).await
    }

    async fn delete_task(&self, id: &str) -> Result<(), RuntimeError> {
        match TasksClient::new(self.containerd.channel())
            .delete(self.containerd.request(DeleteTaskRequest {
                container_id: id.to_owned(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(call_error("delete task", id, &s)),
        }
    }

    /// Stops (with a short grace) and removes the container, its snapshot and its log.
    pub async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.remove_keeping_log(id).await?;
        let log = self.log_path(id);
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(log.with_extension("log.1"));
        Ok(())
    }

    /// Stops (with a short grace) and removes the container and its snapshot; its log stays
    /// (batch jobs keep theirs after they end).
    pub async fn remove_keeping_log(&self, id: &str) -> Result<(), RuntimeError> {
        self.stop(id, Duration::from_secs(5)).await?;
        match ContainersClient::new(self.containerd.channel())
            .delete(
                self.containerd
                    .request(DeleteContainerRequest { id: id.to_owned() }),
            )
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(call_error("delete container", id, &s)),
        }
        match SnapshotsClient::new(self.containerd.channel())
            .remove(self.containerd.request(RemoveSnapshotRequest {
                snapshotter: self.containerd.snapshotter().to_owned(),
                key: id.to_owned(),
            }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(call_error("remove snapshot", id, &s)),
        }
        Ok(())
    }

    /// Runs `args` inside the running container (as its process user, in its cwd and
    /// environment) and returns the exit status, or `None` when it did not finish within
    /// `timeout` (it is then killed).
    pub async fn exec(
        &self,
        id: &str,
        process: &oci_spec::runtime::Process,
        args: &[String],
        timeout: Duration,
    ) -> Result<Option<u32>, RuntimeError> {
        let mut process = process.clone();
        process.set_args(Some(args.to_vec()));
        process.set_terminal(Some(false));
        let spec = serde_json::to_vec(&process).map_err(|e| RuntimeError::Spec(e.to_string()))?;
        let exec_id = format!("health-{}", rand::random::<u32>());
        let mut tasks = TasksClient::new(self.containerd.channel());
        tasks
            .exec(self.containerd.request(ExecProcessRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.clone(),
                spec: Some(Any {
                    type_url: PROCESS_TYPE.to_owned(),
                    value: spec,
                }),
                ..Default::default()
            }))
            .await
            .map_err(|s| call_error("exec", id, &s))?;
        let result = async {
            tasks
                .start(self.containerd.request(StartRequest {
                    container_id: id.to_owned(),
                    exec_id: exec_id.clone(),
                }))
                .await
                .map_err(|s| call_error("start exec", id, &s))?;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                if let TaskState::Exited(code) = self.process_state(id, &exec_id).await? {
                    return Ok(Some(code));
                }
                if tokio::time::Instant::now() >= deadline {
                    let _ = tasks
                        .kill(self.containerd.request(KillRequest {
                            container_id: id.to_owned(),
                            exec_id: exec_id.clone(),
                            signal: SIGKILL,
                            all: false,
                        }))
                        .await;
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        .await;
        let _ = tasks
            .delete_process(self.containerd.request(DeleteProcessRequest {
                container_id: id.to_owned(),
                exec_id,
            }))
            .await;
        result
    }
}

/// Keeps a log file bounded: once it passes `max` bytes its content moves to `<file>.1`
/// (replacing the previous one) and the file is truncated in place. The shim opened the file
/// with `O_APPEND`, so its next write lands at the new end; a few lines written between the
/// copy and the truncation can be lost, as with logrotate's `copytruncate`.
pub fn rotate_log(path: &Path, max: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let old = path.with_extension("log.1");
    std::fs::copy(path, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// The last `max` bytes of a container's output: the end of the rotated file followed by the
/// current file.
pub fn read_log_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let current = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let max = max as usize;
    if current.len() >= max {
        return Ok(current[current.len() - max..].to_vec());
    }
    let old = std::fs::read(path.with_extension("log.1")).unwrap_or_default();
    let want = max - current.len();
    let mut out = old[old.len().saturating_sub(want)..].to_vec();
    out.extend_from_slice(&current);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_newest_output_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        std::fs::write(&log, b"0123456789").unwrap();
        assert!(!rotate_log(&log, 10).unwrap());
        std::fs::write(&log, b"0123456789abc").unwrap();
        assert!(rotate_log(&log, 10).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        std::fs::write(&log, b"XYZ").unwrap();
        assert_eq!(read_log_tail(&log, 5).unwrap(), b"bcXYZ");
        assert_eq!(read_log_tail(&log, 2).unwrap(), b"YZ");
        assert!(!rotate_log(&dir.path().join("absent.log"), 1).unwrap());
        assert!(
            read_log_tail(&dir.path().join("absent.log"), 9)
                .unwrap()
                .is_empty()
        );
    }
}
