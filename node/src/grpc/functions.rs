//! The function service: deploy, list, remove, invoke, logs and stats.

use std::sync::Arc;

use meshwork_proto::v1::{self as pb, function_service_server::FunctionService};
use tonic::{Request, Response, Status};

use crate::functions::runtime::CgiRequest;
use crate::functions::triggers::Triggers;
use crate::functions::{FunctionError, FunctionSpec, Functions};

/// The function service.
pub struct FunctionApi {
    pub(super) functions: Arc<Functions>,
    pub(super) triggers: Arc<Triggers>,
}

fn status(e: FunctionError) -> Status {
    match e {
        FunctionError::Invalid(_) | FunctionError::BadModule { .. } | FunctionError::TooLarge => {
            Status::invalid_argument(e.to_string())
        }
        FunctionError::Unknown(_) => Status::not_found(e.to_string()),
        FunctionError::Registry(crate::registry::RegistryError::UnknownBlob(_)) => {
            Status::invalid_argument(format!("{e}; upload it first (meshctl blob put)"))
        }
        _ => Status::unavailable(e.to_string()),
    }
}

fn to_pb(f: &Functions, t: &Triggers, s: &FunctionSpec) -> pb::Function {
    pb::Function {
        events: s.events.clone(),
        cron: t
            .schedules()
            .into_iter()
            .find(|x| x.function == s.name)
            .map(|x| x.cron)
            .unwrap_or_default(),
        name: s.name.clone(),
        module: s.module.to_hex(),
        memory_bytes: s.memory_bytes,
        timeout_ms: s.timeout_ms,
        env: s.env.clone().into_iter().collect(),
        concurrency: s.concurrency,
        replicas: s.replicas,
        nodes: f.warm_node_names(&s.name),
        created_ms: s.created_ms,
        url: s.url.as_str().to_string(),
    }
}

#[tonic::async_trait]
impl FunctionService for FunctionApi {
    async fn deploy(
        &self,
        req: Request<pb::DeployFunctionRequest>,
    ) -> Result<Response<pb::Function>, Status> {
        let r = req.into_inner();
        let module = r
            .module
            .parse()
            .map_err(|e: crate::blobs::store::BadHash| Status::invalid_argument(e.to_string()))?;
        let spec = FunctionSpec {
            name: r.name,
            module,
            memory_bytes: if r.memory_bytes == 0 {
                128 << 20
            } else {
                r.memory_bytes
            },
            timeout_ms: if r.timeout_ms == 0 {
                3000
            } else {
                r.timeout_ms
            },
            env: r.env.into_iter().collect(),
            concurrency: if r.concurrency == 0 {
                16
            } else {
                r.concurrency
            },
            replicas: r.replicas,
            created_ms: 0,
            events: r.events,
            url: r.url.parse().map_err(status)?,
        };
        let spec = self.functions.deploy(spec).await.map_err(status)?;
        Ok(Response::new(to_pb(&self.functions, &self.triggers, &spec)))
    }

    async fn list(
        &self,
        _: Request<pb::ListFunctionsRequest>,
    ) -> Result<Response<pb::ListFunctionsResponse>, Status> {
        let functions = self
            .functions
            .list()
            .iter()
            .map(|s| to_pb(&self.functions, &self.triggers, s))
            .collect();
        Ok(Response::new(pb::ListFunctionsResponse { functions }))
    }

    async fn remove(
        &self,
        req: Request<pb::FunctionRef>,
    ) -> Result<Response<pb::RemoveFunctionResponse>, Status> {
        self.functions
            .remove(&req.into_inner().name)
            .map_err(status)?;
        Ok(Response::new(pb::RemoveFunctionResponse {}))
    }

    async fn invoke(
        &self,
        req: Request<pb::InvokeRequest>,
    ) -> Result<Response<pb::InvokeResponse>, Status> {
        let r = req.into_inner();
        let request = CgiRequest {
            method: if r.method.is_empty() {
                "POST".into()
            } else {
                r.method
            },
            path: r.path,
            query: r.query,
            headers: r.headers.into_iter().collect(),
            body: r.body,
            env: Default::default(),
            args: vec![],
            raw_output: false,
            scratch: None,
        };
        match self.functions.invoke(&r.name, request).await {
            Ok(resp) => Ok(Response::new(pb::InvokeResponse {
                status: u32::from(resp.status),
                headers: resp.headers.into_iter().collect(),
                body: resp.body,
                error: String::new(),
                duration_us: resp.duration.as_micros() as u64,
            })),
            Err(e @ (FunctionError::Unknown(_) | FunctionError::Invalid(_))) => Err(status(e)),
            Err(e) => Ok(Response::new(pb::InvokeResponse {
                status: u32::from(e.http_status()),
                headers: Default::default(),
                body: vec![],
                error: e.to_string(),
                duration_us: 0,
            })),
        }
    }

    async fn invoke_async(
        &self,
        req: Request<pb::InvokeRequest>,
    ) -> Result<Response<pb::InvokeAsyncResponse>, Status> {
        let r = req.into_inner();
        if r.body.len() > crate::functions::MAX_BODY_BYTES {
            return Err(status(FunctionError::TooLarge));
        }
        let id = self.triggers.enqueue(&r.name, r.body).map_err(status)?;
        Ok(Response::new(pb::InvokeAsyncResponse { id }))
    }

    async fn schedule(
        &self,
        req: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::ScheduleResponse>, Status> {
        let r = req.into_inner();
        if r.cron.is_empty() {
            self.triggers.unschedule(&r.name).map_err(status)?;
        } else {
            self.triggers.schedule(&r.name, &r.cron).map_err(status)?;
        }
        Ok(Response::new(pb::ScheduleResponse {}))
    }

    async fn logs(
        &self,
        req: Request<pb::FunctionRef>,
    ) -> Result<Response<pb::FunctionLogs>, Status> {
        let lines = self
            .functions
            .logs(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::FunctionLogs {
            lines: lines
                .into_iter()
                .map(|l| pb::FunctionLogLine {
                    at_ms: l.at_ms,
                    node: l.node,
                    line: l.line,
                })
                .collect(),
        }))
    }

    async fn stats(
        &self,
        req: Request<pb::FunctionRef>,
    ) -> Result<Response<pb::FunctionStats>, Status> {
        let s = self
            .functions
            .stats(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::FunctionStats {
            invocations: s.invocations,
            errors: s.errors,
            cold_starts: s.cold_starts,
            throttled: s.throttled,
            gb_seconds: s.gb_seconds,
            p50_seconds: s.quantile(0.5).unwrap_or(0.0),
            p99_seconds: s.quantile(0.99).unwrap_or(0.0),
        }))
    }
}
