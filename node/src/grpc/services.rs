//! The container service API (create, update, scale, remove, list, ps, logs) and the gateway
//! route API.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use meshwork_proto::v1::{
    self as pb, route_service_server::RouteService, service_service_server::ServiceService,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::gateway::{self, RouteError, RouteTarget};
use crate::node::NodeState;
use crate::placement::Strategy;
use crate::services::{ServiceError, ServiceSpec, Services, Template};

/// The service API.
pub struct ServiceApi {
    pub(super) services: Arc<Services>,
}

/// The route API.
pub struct RouteApi {
    pub(super) node: Arc<NodeState>,
}

fn status(e: ServiceError) -> Status {
    match e {
        ServiceError::Invalid(_) => Status::invalid_argument(e.to_string()),
        ServiceError::Unknown(_) | ServiceError::UnknownImage(_) => {
            Status::not_found(e.to_string())
        }
        ServiceError::Exists(_) => Status::already_exists(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

pub(super) fn route_status(e: RouteError) -> Status {
    match e {
        RouteError::Invalid(_) => Status::invalid_argument(e.to_string()),
        RouteError::Unknown(_) => Status::not_found(e.to_string()),
        RouteError::Exists(_) => Status::already_exists(e.to_string()),
        RouteError::InUse(_) => Status::failed_precondition(e.to_string()),
        RouteError::State(_) => Status::unavailable(e.to_string()),
    }
}

fn to_pb(services: &Services, s: &ServiceSpec) -> pb::Service {
    let (running, placed, pending, updated) = services.counts(s);
    pb::Service {
        name: s.name.clone(),
        image: s.template.image.clone(),
        replicas: s.replicas,
        cpu_millis: s.cpu_millis,
        memory_bytes: s.memory_bytes,
        port: u32::from(s.port),
        env: s.template.env.clone().into_iter().collect(),
        cmd: s.template.cmd.clone(),
        health_http: s.template.health_http.clone(),
        health_cmd: s.template.health_cmd.clone(),
        strategy: match s.strategy {
            Strategy::Spread => "spread".into(),
            Strategy::Binpack => "binpack".into(),
        },
        constraints: s.constraints.clone().into_iter().collect(),
        generation: s.generation,
        created_ms: s.created_ms,
        running,
        pending: placed + pending,
        updated,
        rollout: services.rollout_text(s),
    }
}

#[tonic::async_trait]
impl ServiceService for ServiceApi {
    async fn create(
        &self,
        req: Request<pb::CreateServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        let r = req.into_inner();
        let port = u16::try_from(r.port)
            .map_err(|_| Status::invalid_argument(format!("port {}: 0 to 65535", r.port)))?;
        let strategy = match r.strategy.as_str() {
            "" | "spread" => Strategy::Spread,
            "binpack" => Strategy::Binpack,
            other => {
                return Err(Status::invalid_argument(format!(
                    "strategy {other:?}: spread or binpack"
                )));
            }
        };
        let spec = ServiceSpec {
            name: r.name,
            replicas: r.replicas,
            cpu_millis: if r.cpu_millis == 0 { 100 } else { r.cpu_millis },
            memory_bytes: if r.memory_bytes == 0 {
                64 << 20
            } else {
                r.memory_bytes
            },
            port,
            strategy,
            constraints: r.constraints.into_iter().collect(),
            template: Template {
                image: r.image,
                cmd: r.cmd,
                env: r.env.into_iter().collect(),
                health_http: r.health_http,
                health_cmd: r.health_cmd,
            },
            generation: 0,
            previous: None,
            rolled_back: None,
            created_ms: 0,
        };
        let created = self.services.create(spec).map_err(status)?;
        Ok(Response::new(to_pb(&self.services, &created)))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        let r = req.into_inner();
        let current = self.services.get(&r.name).map_err(status)?;
        let mut template = current.template.clone();
        if !r.image.is_empty() {
            template.image = r.image;
        }
        if !r.env.is_empty() {
            template.env = r.env.into_iter().collect::<BTreeMap<_, _>>();
        }
        if !r.cmd.is_empty() {
            template.cmd = r.cmd;
        }
        if !r.health_http.is_empty() {
            template.health_http = r.health_http;
        }
        let updated = self.services.update(&r.name, template).map_err(status)?;
        Ok(Response::new(to_pb(&self.services, &updated)))
    }

    async fn scale(
        &self,
        req: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        let r = req.into_inner();
        let spec = self.services.scale(&r.name, r.replicas).map_err(status)?;
        Ok(Response::new(to_pb(&self.services, &spec)))
    }

    async fn remove(
        &self,
        req: Request<pb::ServiceRef>,
    ) -> Result<Response<pb::RemoveServiceResponse>, Status> {
        self.services
            .remove(&req.into_inner().name)
            .map_err(status)?;
        Ok(Response::new(pb::RemoveServiceResponse {}))
    }

    async fn list(
        &self,
        _req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let services = self
            .services
            .list()
            .iter()
            .map(|s| to_pb(&self.services, s))
            .collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn get(&self, req: Request<pb::ServiceRef>) -> Result<Response<pb::Service>, Status> {
        let spec = self.services.get(&req.into_inner().name).map_err(status)?;
        Ok(Response::new(to_pb(&self.services, &spec)))
    }

    async fn ps(
        &self,
        req: Request<pb::ServiceRef>,
    ) -> Result<Response<pb::ServiceReplicas>, Status> {
        let spec = self.services.get(&req.into_inner().name).map_err(status)?;
        let views = self.services.ps(&spec.name).map_err(status)?;
        let current = spec.template.hash();
        let replicas = views
            .into_iter()
            .map(|v| {
                let mut r = pb::ServiceReplica {
                    index: v.index,
                    node: v.node_name.clone(),
                    node_id: v.node.clone(),
                    epoch: v.epoch,
                    ..Default::default()
                };
                match (&v.status, &v.pending) {
                    (_, Some(reason)) => {
                        r.state = "pending".into();
                        r.reason = reason.clone();
                    }
                    (Some(s), None) => {
                        r.state = s.state.clone();
                        r.restarts = s.restarts;
                        r.since_ms = s.since_ms;
                        r.reason = s.reason.clone();
                        r.healthy = s.healthy;
                        r.port = u32::from(s.port);
                        r.container_id = s.container_id.clone();
                        r.generation = if s.template == current {
                            spec.generation
                        } else {
                            spec.generation.saturating_sub(1)
                        };
                    }
                    (None, None) => {
                        r.state = "assigned".into();
                        r.reason = "waiting for the node to report".into();
                    }
                }
                r
            })
            .collect();
        Ok(Response::new(pb::ServiceReplicas { replicas }))
    }

    type LogsStream = ReceiverStream<Result<pb::ServiceLogChunk, Status>>;

    async fn logs(
        &self,
        req: Request<pb::ServiceLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let r = req.into_inner();
        let spec = self.services.get(&r.name).map_err(status)?;
        if let Some(i) = r.replica
            && i >= spec.replicas
        {
            return Err(Status::not_found(format!(
                "service {} has replicas 0 to {}",
                spec.name,
                spec.replicas.saturating_sub(1)
            )));
        }
        let tail = if r.tail_bytes == 0 {
            64 << 10
        } else {
            r.tail_bytes.min(1 << 20)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let services = self.services.clone();
        tokio::spawn(async move {
            let mut offsets: HashMap<String, u64> = HashMap::new();
            loop {
                let pieces = match services
                    .read_logs(&spec.name, r.replica, &offsets, tail)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                };
                for (replica, node, container, piece) in pieces {
                    offsets.insert(container, piece.next);
                    if piece.data.is_empty() {
                        continue;
                    }
                    let chunk = pb::ServiceLogChunk {
                        replica,
                        node,
                        data: piece.data,
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                if !r.follow {
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

fn route_to_pb(r: &gateway::Route) -> pb::Route {
    let (function, service) = match &r.target {
        RouteTarget::Function(f) => (f.clone(), String::new()),
        RouteTarget::Service(s) => (String::new(), s.clone()),
    };
    pb::Route {
        path: r.path.clone(),
        function,
        service,
        websocket: r.websocket,
        created_ms: r.created_ms,
        methods: r.methods.clone(),
        host: r.host.clone(),
        cors_origins: r.cors_origins.clone(),
        max_body_bytes: r.max_body_bytes,
        timeout_ms: r.timeout_ms,
        auth: r.auth.as_str().to_string(),
        plans: r.plans.clone(),
        // The secret is write-only.
        jwt_hs256_secret: vec![],
        jwt_rs256_public_key: r.jwt.rs256_public_key.clone(),
        jwt_audience: r.jwt.audience.clone(),
        jwt_hs256_configured: !r.jwt.hs256_secret_hex.is_empty(),
        max_response_bytes: r.max_response_bytes,
    }
}

#[tonic::async_trait]
impl RouteService for RouteApi {
    async fn add(&self, req: Request<pb::Route>) -> Result<Response<pb::Route>, Status> {
        let r = req.into_inner();
        let target = match (r.function.is_empty(), r.service.is_empty()) {
            (false, true) => RouteTarget::Function(r.function),
            (true, false) => RouteTarget::Service(r.service),
            _ => {
                return Err(Status::invalid_argument(
                    "a route needs exactly one target: a function or a service",
                ));
            }
        };
        let mut route = gateway::Route::new(&r.path, target);
        route.websocket = r.websocket;
        route.methods = r.methods;
        route.host = r.host;
        route.cors_origins = r.cors_origins;
        route.max_body_bytes = r.max_body_bytes;
        route.timeout_ms = r.timeout_ms;
        route.max_response_bytes = r.max_response_bytes;
        route.auth = gateway::Auth::parse(&r.auth).map_err(route_status)?;
        route.plans = r.plans;
        route.jwt = gateway::JwtConfig {
            hs256_secret_hex: hex::encode(&r.jwt_hs256_secret),
            rs256_public_key: r.jwt_rs256_public_key,
            audience: r.jwt_audience,
        };
        let route = gateway::add(&self.node, route).map_err(route_status)?;
        Ok(Response::new(route_to_pb(&route)))
    }

    async fn list(
        &self,
        _req: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let routes = gateway::list(&self.node).iter().map(route_to_pb).collect();
        Ok(Response::new(pb::ListRoutesResponse { routes }))
    }

    async fn remove(
        &self,
        req: Request<pb::RouteRef>,
    ) -> Result<Response<pb::RemoveRouteResponse>, Status> {
        let r = req.into_inner();
        gateway::remove(&self.node, &r.host, &r.path).map_err(route_status)?;
        Ok(Response::new(pb::RemoveRouteResponse {}))
    }
}
