//! The batch job API: submit, list, get, cancel, logs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meshwork_proto::v1::{self as pb, job_service_server::JobService};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::batch::{Batch, IndexView, JobError, JobKind, JobSpec, JobState, job_state, log_name};

/// The job API.
pub struct JobApi {
    pub(super) batch: Arc<Batch>,
}

fn status(e: JobError) -> Status {
    match e {
        JobError::Invalid(_) => Status::invalid_argument(e.to_string()),
        JobError::Unknown(_) | JobError::Missing(_) => Status::not_found(e.to_string()),
        JobError::State(_) => Status::unavailable(e.to_string()),
    }
}

fn to_pb(spec: &JobSpec, views: &[IndexView], with_indices: bool) -> pb::Job {
    let states: Vec<JobState> = views.iter().map(|v| v.state).collect();
    let state = job_state(&states);
    let mut counts: HashMap<String, u32> = HashMap::new();
    for s in &states {
        *counts.entry(s.as_str().to_string()).or_default() += 1;
    }
    let mut nodes: Vec<String> = views
        .iter()
        .filter_map(|v| {
            v.attempts.iter().rev().find(|a| {
                matches!(
                    a.state,
                    crate::batch::AttemptState::Starting | crate::batch::AttemptState::Running
                )
            })
        })
        .map(|a| a.node_name.clone())
        .collect();
    nodes.sort();
    nodes.dedup();
    let reason = if views.len() == 1 {
        views[0].reason.clone()
    } else {
        views
            .iter()
            .find(|v| v.state == JobState::Failed)
            .map(|v| format!("index {}: {}", v.index, v.reason))
            .unwrap_or_default()
    };
    let (image, module) = match &spec.kind {
        JobKind::Container { image } => (image.clone(), String::new()),
        JobKind::Wasm { module } => (String::new(), module.to_hex()),
    };
    pb::Job {
        id: spec.id.clone(),
        name: spec.name.clone(),
        image,
        module,
        cmd: spec.cmd.clone(),
        cpu_millis: spec.cpu_millis,
        memory_bytes: spec.memory_bytes,
        array: spec.array,
        retries: spec.retries,
        retry_on_exit: spec.retry_on_exit.clone(),
        depends_on: spec.depends_on.clone(),
        timeout_ms: spec.timeout_ms,
        env: spec.env.clone().into_iter().collect(),
        priority: spec.priority,
        submitted_ms: spec.submitted_ms,
        state: state.as_str().to_string(),
        counts,
        attempts: views.iter().map(|v| v.attempts.len() as u32).sum(),
        nodes,
        cancelled: spec.cancelled,
        indices: if with_indices {
            views
                .iter()
                .map(|v| pb::JobIndex {
                    index: v.index,
                    state: v.state.as_str().to_string(),
                    reason: v.reason.clone(),
                    attempts: v
                        .attempts
                        .iter()
                        .map(|a| pb::JobAttempt {
                            number: a.number,
                            node: a.node_name.clone(),
                            state: format!("{:?}", a.state).to_uppercase(),
                            started_ms: a.started_ms,
                            ended_ms: a.ended_ms,
                            exit_code: a.exit_code,
                            reason: a.reason.clone(),
                        })
                        .collect(),
                })
                .collect()
        } else {
            Vec::new()
        },
        reason,
    }
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = req.into_inner();
        let kind = match (r.image.is_empty(), r.module.is_empty()) {
            (false, true) => JobKind::Container { image: r.image },
            (true, false) => JobKind::Wasm {
                module: r
                    .module
                    .parse()
                    .map_err(|e: crate::blobs::store::BadHash| {
                        Status::invalid_argument(e.to_string())
                    })?,
            },
            _ => {
                return Err(Status::invalid_argument(
                    "a job runs exactly one of an image or a Wasm module",
                ));
            }
        };
        let spec = JobSpec {
            id: String::new(),
            name: r.name,
            kind,
            cmd: r.cmd,
            cpu_millis: if r.cpu_millis == 0 { 100 } else { r.cpu_millis },
            memory_bytes: if r.memory_bytes == 0 {
                64 << 20
            } else {
                r.memory_bytes
            },
            array: r.array,
            retries: r.retries,
            retry_on_exit: r.retry_on_exit,
            depends_on: r.depends_on,
            timeout_ms: r.timeout_ms,
            env: r.env.into_iter().collect(),
            priority: r.priority,
            submitted_ms: 0,
            cancelled: false,
            cancelled_ms: 0,
        };
        let spec = self.batch.submit(spec).map_err(status)?;
        let (spec, views) = self.batch.get(&spec.id).map_err(status)?;
        Ok(Response::new(to_pb(&spec, &views, false)))
    }

    async fn list(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let filter = req.into_inner().state;
        let wanted = if filter.is_empty() {
            None
        } else {
            Some(JobState::parse(&filter).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "state {filter:?}: SUBMITTED, PENDING, RUNNABLE, STARTING, RUNNING, \
                     SUCCEEDED or FAILED"
                ))
            })?)
        };
        let jobs = self
            .batch
            .list()
            .iter()
            .map(|(s, v)| to_pb(s, v, false))
            .filter(|j| wanted.is_none_or(|w| j.state == w.as_str()))
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn get(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let (spec, views) = self.batch.get(&req.into_inner().id).map_err(status)?;
        Ok(Response::new(to_pb(&spec, &views, true)))
    }

    async fn cancel(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let (spec, views) = self.batch.cancel(&req.into_inner().id).map_err(status)?;
        Ok(Response::new(to_pb(&spec, &views, true)))
    }

    type LogsStream = ReceiverStream<Result<pb::JobLogChunk, Status>>;

    async fn logs(
        &self,
        req: Request<pb::JobLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let r = req.into_inner();
        let (spec, views) = self.batch.get(&r.id).map_err(status)?;
        let view = views.get(r.index as usize).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "job {} has indices 0 to {}",
                spec.id,
                spec.array.max(1) - 1
            ))
        })?;
        let attempt = if r.attempt == 0 {
            view.attempts.last().cloned()
        } else {
            view.attempts
                .iter()
                .find(|a| a.number == r.attempt)
                .cloned()
        };
        let Some(attempt) = attempt else {
            if r.attempt == 0 {
                return Err(Status::failed_precondition(format!(
                    "index {} of job {} has not started yet ({})",
                    r.index,
                    spec.id,
                    view.state.as_str()
                )));
            }
            return Err(Status::not_found(format!("no attempt {}", r.attempt)));
        };
        let name = log_name(&spec.id, r.index, attempt.number);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let batch = self.batch.clone();
        tokio::spawn(async move {
            let mut from = None;
            loop {
                match batch.read_log(&attempt, &name, from).await {
                    Ok(piece) => {
                        from = Some(piece.next);
                        if !piece.data.is_empty() {
                            let chunk = pb::JobLogChunk {
                                attempt: attempt.number,
                                node: attempt.node_name.clone(),
                                data: piece.data,
                            };
                            if tx.send(Ok(chunk)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::unavailable(e))).await;
                        return;
                    }
                }
                if !r.follow {
                    return;
                }
                // Follow until the attempt ends, then one last read.
                let ended = batch
                    .get(&spec.id)
                    .ok()
                    .and_then(|(_, v)| {
                        v.get(r.index as usize)?
                            .attempts
                            .iter()
                            .find(|a| a.number == attempt.number)
                            .map(|a| a.ended_ms != 0)
                    })
                    .unwrap_or(true);
                if ended {
                    if let Ok(piece) = batch.read_log(&attempt, &name, from).await
                        && !piece.data.is_empty()
                    {
                        let _ = tx
                            .send(Ok(pb::JobLogChunk {
                                attempt: attempt.number,
                                node: attempt.node_name.clone(),
                                data: piece.data,
                            }))
                            .await;
                    }
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
