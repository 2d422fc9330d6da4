//! The `mesh.v1` gRPC API (tonic), served by every node, with the standard health service and
//! server reflection so that grpcurl and stubs in any language work without the `.proto` file.
//!
//! Errors map to gRPC codes with text that says what was wrong: a malformed key or an
//! oversized value is `INVALID_ARGUMENT`, an unknown key or node is `NOT_FOUND`, a storage
//! failure is `UNAVAILABLE`.

use std::sync::Arc;
use std::time::Instant;

use meshwork_proto::v1::{
    self as pb,
    cluster_service_server::{ClusterService, ClusterServiceServer},
    function_service_server::FunctionServiceServer,
    registry_service_server::RegistryServiceServer,
    state_service_server::{StateService, StateServiceServer},
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::membership::{Member, MemberState};
use crate::node::NodeState;
use crate::registry::Registry;

mod functions;
mod gateway;
mod jobs;
mod registry;
mod services;

use crate::replica::ReplicaError;
use crate::state::{Entry, validate_key};
pub use registry::ContainerdTarget;

/// Largest request decoded, in bytes; larger values than the state accepts still decode, so
/// that the answer names the limit instead of a transport error.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Accepted connections with Nagle's algorithm off: otherwise a reply's trailers wait for
/// the client's delayed ACK (about 40 ms per call).
fn nodelay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    })
}

/// What the API serves: the node's subsystems.
pub struct Subsystems {
    /// Membership and state.
    pub node: Arc<NodeState>,
    /// Blobs and images.
    pub registry: Arc<Registry>,
    /// Functions.
    pub functions: Arc<crate::functions::Functions>,
    /// Schedules, async calls and events.
    pub triggers: Arc<crate::functions::triggers::Triggers>,
    /// The node's garbage-collection grace period.
    pub gc_grace: std::time::Duration,
    /// The node's containerd.
    pub containerd: ContainerdTarget,
    /// Container services.
    pub services: Arc<crate::services::Services>,
    /// Batch jobs.
    pub batch: Arc<crate::batch::Batch>,
}

/// Serves the API on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    subsystems: Subsystems,
    mut shutdown: watch::Receiver<bool>,
) {
    let Subsystems {
        node,
        registry,
        functions,
        triggers,
        gc_grace,
        containerd,
        services,
        batch,
    } = subsystems;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ClusterServiceServer<ClusterApi>>()
        .await;
    health_reporter
        .set_serving::<StateServiceServer<StateApi>>()
        .await;
    health_reporter
        .set_serving::<RegistryServiceServer<registry::RegistryApi>>()
        .await;
    health_reporter
        .set_serving::<FunctionServiceServer<functions::FunctionApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meshwork_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor sets are valid");
    let result = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(
            ClusterServiceServer::new(ClusterApi { node: node.clone() })
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            StateServiceServer::new(StateApi { node: node.clone() })
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            meshwork_proto::v1::service_service_server::ServiceServiceServer::new(
                services::ServiceApi { services },
            )
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            meshwork_proto::v1::job_service_server::JobServiceServer::new(jobs::JobApi { batch })
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            meshwork_proto::v1::route_service_server::RouteServiceServer::new(services::RouteApi {
                node: node.clone(),
            })
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            meshwork_proto::v1::plan_service_server::PlanServiceServer::new(gateway::PlanApi {
                node: node.clone(),
            }),
        )
        .add_service(
            meshwork_proto::v1::key_service_server::KeyServiceServer::new(gateway::KeyApi {
                node: node.clone(),
            }),
        )
        .add_service(
            meshwork_proto::v1::gateway_service_server::GatewayServiceServer::new(
                gateway::GatewayApi { node },
            ),
        )
        .add_service(
            FunctionServiceServer::new(functions::FunctionApi {
                functions,
                triggers,
            })
            .max_decoding_message_size(MAX_REQUEST_BYTES + crate::functions::MAX_BODY_BYTES),
        )
        .add_service(
            RegistryServiceServer::new(registry::RegistryApi {
                registry,
                gc_grace,
                containerd,
            })
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(nodelay(listener), async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// The cluster service.
pub struct ClusterApi {
    node: Arc<NodeState>,
}

fn node_state(s: MemberState) -> pb::NodeState {
    match s {
        MemberState::Alive => pb::NodeState::Alive,
        MemberState::Suspect => pb::NodeState::Suspect,
        MemberState::Dead => pb::NodeState::Dead,
    }
}

fn member_to_pb(m: &Member, local: &str, now: Instant) -> pb::Node {
    let hb = &m.heartbeat;
    let is_self = hb.peer_id == local;
    pb::Node {
        name: hb.name.clone(),
        peer_id: hb.peer_id.clone(),
        addrs: hb.addrs.clone(),
        state: node_state(m.state) as i32,
        total: Some(pb::Resources {
            cpu_millis: hb.total.cpu_millis,
            memory_bytes: hb.total.memory_bytes,
        }),
        allocated: Some(pb::Resources {
            cpu_millis: hb.allocated.cpu_millis,
            memory_bytes: hb.allocated.memory_bytes,
        }),
        disk_free_bytes: hb.disk_free_bytes,
        workloads: hb.workloads,
        labels: hb.labels.clone().into_iter().collect(),
        last_seen_ms_ago: if is_self {
            0
        } else {
            now.saturating_duration_since(m.last_heard).as_millis() as u64
        },
        is_self,
        version: hb.version.clone(),
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let local = self.node.peer_id.to_string();
        let now = Instant::now();
        let table = self.node.membership.read().expect("membership lock");
        let nodes = table
            .members()
            .into_iter()
            .map(|m| member_to_pb(m, &local, now))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(
        &self,
        req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let name = req.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "name: give a node name or peer id",
            ));
        }
        let local = self.node.peer_id.to_string();
        let table = self.node.membership.read().expect("membership lock");
        let found: Vec<_> = table
            .members()
            .into_iter()
            .filter(|m| m.heartbeat.peer_id == name || m.heartbeat.name == name)
            .collect();
        match found.as_slice() {
            [m] => Ok(Response::new(member_to_pb(m, &local, Instant::now()))),
            [] => Err(Status::not_found(format!(
                "no node named {name:?} in this mesh"
            ))),
            many => Err(Status::invalid_argument(format!(
                "{} nodes are named {name:?}; use a peer id",
                many.len()
            ))),
        }
    }

    async fn get_info(
        &self,
        _: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let local = self.node.peer_id.to_string();
        let table = self.node.membership.read().expect("membership lock");
        let node = table
            .get(&local)
            .map(|m| member_to_pb(m, &local, Instant::now()));
        Ok(Response::new(pb::NodeInfo {
            node,
            cluster_id: self.node.cluster_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }
}

/// The state service.
pub struct StateApi {
    node: Arc<NodeState>,
}

fn entry_to_pb(e: &Entry) -> pb::Entry {
    pb::Entry {
        key: e.key.clone(),
        value: e.value.clone().unwrap_or_default(),
        stamp: e.stamp.to_string_rfc3339_lossy(),
        origin: e.origin.clone(),
    }
}

fn replica_status(e: ReplicaError) -> Status {
    match e {
        ReplicaError::Invalid(why) => Status::invalid_argument(why.to_string()),
        ReplicaError::Storage(why) => Status::unavailable(format!("cannot store the write: {why}")),
    }
}

fn check_key(key: &str) -> Result<(), Status> {
    validate_key(key).map_err(|why| Status::invalid_argument(format!("key {key:?}: {why}")))
}

#[tonic::async_trait]
impl StateService for StateApi {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let req = req.into_inner();
        check_key(&req.key)?;
        let entry = self
            .node
            .write(&req.key, Some(req.value))
            .map_err(replica_status)?;
        Ok(Response::new(pb::PutResponse {
            entry: Some(entry_to_pb(&entry)),
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Entry>, Status> {
        let key = req.into_inner().key;
        check_key(&key)?;
        let replica = self.node.replica.lock().expect("replica lock");
        match replica.map().get(&key) {
            Some(e) => Ok(Response::new(entry_to_pb(e))),
            None => Err(Status::not_found(format!("no value for key {key:?}"))),
        }
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let key = req.into_inner().key;
        check_key(&key)?;
        let exists = self
            .node
            .replica
            .lock()
            .expect("replica lock")
            .map()
            .get(&key)
            .is_some();
        if !exists {
            return Err(Status::not_found(format!("no value for key {key:?}")));
        }
        self.node.write(&key, None).map_err(replica_status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let prefix = req.into_inner().prefix;
        if !prefix.is_empty() {
            check_key(&prefix)?;
        }
        let replica = self.node.replica.lock().expect("replica lock");
        let entries = replica.map().list(&prefix).map(entry_to_pb).collect();
        Ok(Response::new(pb::ListResponse { entries }))
    }
}
