//! Client library for the `mesh.v1` gRPC API of a Meshwork node, and the plain views that
//! `meshctl` prints (as tables or JSON).
//!
//! Any node answers every call, so a client needs one endpoint: `MESH_ENDPOINT` or
//! `--endpoint`, e.g. `http://127.0.0.1:7100`.

pub mod oci;
mod push;

pub use push::{PushError, push_image};

use std::collections::BTreeMap;

use meshwork_proto::v1::{
    self as pb, cluster_service_client::ClusterServiceClient,
    function_service_client::FunctionServiceClient, gateway_service_client::GatewayServiceClient,
    job_service_client::JobServiceClient, key_service_client::KeyServiceClient,
    plan_service_client::PlanServiceClient, registry_service_client::RegistryServiceClient,
    route_service_client::RouteServiceClient, service_service_client::ServiceServiceClient,
    state_service_client::StateServiceClient,
};
use serde::Serialize;
use tonic::transport::Channel;

pub use meshwork_proto::v1 as proto;

/// Errors of a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint URL is malformed.
    #[error("endpoint {endpoint:?} is not a URL like http://127.0.0.1:7100: {reason}")]
    BadEndpoint {
        /// What was given.
        endpoint: String,
        /// Why it is wrong.
        reason: String,
    },
    /// The node could not be reached.
    #[error("cannot reach a node at {endpoint}: {reason}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// The transport error.
        reason: String,
    },
    /// The node answered with an error.
    // Not `#[from]`: that would also make the status the error's source, and `{:#}` would
    // print its message twice.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// Something failed on this side (reading or writing a file).
    #[error("{0}")]
    Local(String),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        NotFound => "not found",
        InvalidArgument => "invalid argument",
        Unavailable => "unavailable",
        AlreadyExists => "already exists",
        FailedPrecondition => "failed precondition",
        PermissionDenied => "permission denied",
        Unauthenticated => "unauthenticated",
        ResourceExhausted => "resource exhausted",
        DeadlineExceeded => "deadline exceeded",
        _ => "error",
    }
}

impl ClientError {
    /// The gRPC code, when the node answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// A connection to one node.
#[derive(Clone)]
pub struct MeshClient {
    cluster: ClusterServiceClient<Channel>,
    state: StateServiceClient<Channel>,
    registry: RegistryServiceClient<Channel>,
    functions: FunctionServiceClient<Channel>,
    services: ServiceServiceClient<Channel>,
    routes: RouteServiceClient<Channel>,
    plans: PlanServiceClient<Channel>,
    keys: KeyServiceClient<Channel>,
    gateway: GatewayServiceClient<Channel>,
    jobs: JobServiceClient<Channel>,
}

impl MeshClient {
    /// Connects to a node's gRPC endpoint.
    pub async fn connect(endpoint: &str) -> Result<Self, ClientError> {
        let ep = Channel::from_shared(endpoint.to_string())
            .map_err(|e| ClientError::BadEndpoint {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?
            .connect_timeout(std::time::Duration::from_secs(5));
        let channel = ep.connect().await.map_err(|e| ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string()),
        })?;
        Ok(Self {
            cluster: ClusterServiceClient::new(channel.clone()),
            state: StateServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            registry: RegistryServiceClient::new(channel.clone())
                .max_decoding_message_size(64 << 20),
            functions: FunctionServiceClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            services: ServiceServiceClient::new(channel.clone())
                .max_decoding_message_size(64 << 20),
            routes: RouteServiceClient::new(channel.clone()),
            plans: PlanServiceClient::new(channel.clone()),
            keys: KeyServiceClient::new(channel.clone()),
            gateway: GatewayServiceClient::new(channel.clone()),
            jobs: JobServiceClient::new(channel).max_decoding_message_size(64 << 20),
        })
    }

    /// Every member the node knows of.
    pub async fn nodes(&mut self) -> Result<Vec<NodeView>, ClientError> {
        let r = self.cluster.list_nodes(pb::ListNodesRequest {}).await?;
        Ok(r.into_inner()
            .nodes
            .into_iter()
            .map(NodeView::from)
            .collect())
    }

    /// One member by name or peer id.
    pub async fn node(&mut self, name: &str) -> Result<NodeView, ClientError> {
        let r = self
            .cluster
            .get_node(pb::GetNodeRequest { name: name.into() })
            .await?;
        Ok(r.into_inner().into())
    }

    /// The answering node and its cluster.
    pub async fn info(&mut self) -> Result<pb::NodeInfo, ClientError> {
        Ok(self
            .cluster
            .get_info(pb::GetInfoRequest {})
            .await?
            .into_inner())
    }

    /// Writes a value.
    pub async fn put(&mut self, key: &str, value: Vec<u8>) -> Result<EntryView, ClientError> {
        let r = self
            .state
            .put(pb::PutRequest {
                key: key.into(),
                value,
            })
            .await?;
        Ok(r.into_inner().entry.unwrap_or_default().into())
    }

    /// Reads a value.
    pub async fn get(&mut self, key: &str) -> Result<EntryView, ClientError> {
        let r = self.state.get(pb::GetRequest { key: key.into() }).await?;
        Ok(r.into_inner().into())
    }

    /// Deletes a key.
    pub async fn delete(&mut self, key: &str) -> Result<(), ClientError> {
        self.state
            .delete(pb::DeleteRequest { key: key.into() })
            .await?;
        Ok(())
    }

    /// Lists live entries under a prefix.
    pub async fn list(&mut self, prefix: &str) -> Result<Vec<EntryView>, ClientError> {
        let r = self
            .state
            .list(pb::ListRequest {
                prefix: prefix.into(),
            })
            .await?;
        Ok(r.into_inner()
            .entries
            .into_iter()
            .map(EntryView::from)
            .collect())
    }
}

/// Bytes per upload message.
const UPLOAD_PIECE: usize = 256 * 1024;

/// Options of a blob upload.
#[derive(Debug, Clone, Default)]
pub struct UploadOptions {
    /// Refuse the upload unless the bytes hash to this `sha256:<hex>`.
    pub expected_sha256: Option<String>,
    /// Keep the blob even when no image refers to it (`blob put`).
    pub pinned: bool,
    /// Copies the mesh keeps (0: the default, 2).
    pub replicas: u32,
}

impl MeshClient {
    /// Uploads a blob read from `reader` (on a blocking thread), calling `progress` with the
    /// bytes of each piece sent.
    pub async fn put_blob<R: std::io::Read + Send + 'static>(
        &mut self,
        mut reader: R,
        options: UploadOptions,
        progress: impl Fn(u64) + Send + 'static,
    ) -> Result<pb::BlobInfo, ClientError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let reading = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            loop {
                let mut buf = vec![0u8; UPLOAD_PIECE];
                let mut filled = 0;
                while filled < buf.len() {
                    let n = reader.read(&mut buf[filled..])?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    return Ok(());
                }
                buf.truncate(filled);
                if tx.blocking_send(buf).is_err() {
                    return Ok(()); // the call ended; its error is reported
                }
                progress(filled as u64);
            }
        });
        let result = self.put_blob_stream(rx, options).await;
        match reading.await {
            Ok(Err(e)) => Err(ClientError::Local(format!("reading the blob: {e}"))),
            Err(e) => Err(ClientError::Local(e.to_string())),
            Ok(Ok(())) => result,
        }
    }

    /// Uploads a blob whose bytes arrive on a channel; the upload ends when the channel
    /// closes.
    pub async fn put_blob_stream(
        &mut self,
        mut pieces: tokio::sync::mpsc::Receiver<Vec<u8>>,
        options: UploadOptions,
    ) -> Result<pb::BlobInfo, ClientError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::BlobUpload>(4);
        tokio::spawn(async move {
            // The first message carries the options, even for an empty blob.
            let mut msg = pb::BlobUpload {
                data: pieces.recv().await.unwrap_or_default(),
                expected_sha256: options.expected_sha256.unwrap_or_default(),
                pinned: options.pinned,
                replicas: options.replicas,
            };
            loop {
                if tx.send(msg).await.is_err() {
                    return;
                }
                match pieces.recv().await {
                    Some(data) => {
                        msg = pb::BlobUpload {
                            data,
                            ..Default::default()
                        }
                    }
                    None => return,
                }
            }
        });
        Ok(self
            .registry
            .put_blob(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner())
    }

    /// Downloads a blob into `writer`, calling `progress(done, total)`.
    pub async fn get_blob(
        &mut self,
        blake3: &str,
        writer: &mut (impl std::io::Write + ?Sized),
        progress: impl Fn(u64, u64),
    ) -> Result<u64, ClientError> {
        let mut stream = self
            .registry
            .get_blob(pb::GetBlobRequest {
                blake3: blake3.into(),
            })
            .await?
            .into_inner();
        let mut total = 0;
        let mut done = 0u64;
        while let Some(msg) = stream.message().await? {
            if msg.size > 0 {
                total = msg.size;
            }
            writer
                .write_all(&msg.data)
                .map_err(|e| ClientError::Local(format!("writing the blob: {e}")))?;
            done += msg.data.len() as u64;
            progress(done, total);
        }
        Ok(done)
    }

    /// Blobs the mesh records.
    pub async fn blobs(&mut self) -> Result<Vec<pb::BlobInfo>, ClientError> {
        Ok(self
            .registry
            .list_blobs(pb::ListBlobsRequest {})
            .await?
            .into_inner()
            .blobs)
    }

    /// Registers an image whose blobs were uploaded.
    pub async fn create_image(
        &mut self,
        request: pb::CreateImageRequest,
    ) -> Result<pb::Image, ClientError> {
        Ok(self.registry.create_image(request).await?.into_inner())
    }

    /// Every image.
    pub async fn images(&mut self) -> Result<Vec<pb::Image>, ClientError> {
        Ok(self
            .registry
            .list_images(pb::ListImagesRequest {})
            .await?
            .into_inner()
            .images)
    }

    /// One image.
    pub async fn image(&mut self, reference: &str) -> Result<pb::Image, ClientError> {
        Ok(self
            .registry
            .get_image(pb::ImageRef {
                reference: reference.into(),
            })
            .await?
            .into_inner())
    }

    /// Removes a tag.
    pub async fn remove_image(&mut self, reference: &str) -> Result<(), ClientError> {
        self.registry
            .remove_image(pb::ImageRef {
                reference: reference.into(),
            })
            .await?;
        Ok(())
    }

    /// Makes an image complete on the answering node, calling `progress(done, total)`.
    pub async fn pull_image(
        &mut self,
        reference: &str,
        progress: impl Fn(u64, u64),
    ) -> Result<(), ClientError> {
        let mut stream = self
            .registry
            .pull_image(pb::ImageRef {
                reference: reference.into(),
            })
            .await?
            .into_inner();
        while let Some(p) = stream.message().await? {
            progress(p.done_bytes, p.total_bytes);
            if p.finished {
                return Ok(());
            }
        }
        Err(ClientError::Local(
            "the pull ended without finishing".into(),
        ))
    }

    /// Pulls an image onto the answering node and imports it into that node's containerd.
    pub async fn import_image(
        &mut self,
        reference: &str,
    ) -> Result<pb::ImportImageResponse, ClientError> {
        Ok(self
            .registry
            .import_image(pb::ImageRef {
                reference: reference.into(),
            })
            .await?
            .into_inner())
    }

    /// Deploys (or updates) a function whose module was uploaded.
    pub async fn deploy_function(
        &mut self,
        request: pb::DeployFunctionRequest,
    ) -> Result<pb::Function, ClientError> {
        Ok(self.functions.deploy(request).await?.into_inner())
    }

    /// Every function.
    pub async fn functions(&mut self) -> Result<Vec<pb::Function>, ClientError> {
        Ok(self
            .functions
            .list(pb::ListFunctionsRequest {})
            .await?
            .into_inner()
            .functions)
    }

    /// Removes a function.
    pub async fn remove_function(&mut self, name: &str) -> Result<(), ClientError> {
        self.functions
            .remove(pb::FunctionRef { name: name.into() })
            .await?;
        Ok(())
    }

    /// Invokes a function; the answer carries the HTTP-style status.
    pub async fn invoke(
        &mut self,
        request: pb::InvokeRequest,
    ) -> Result<pb::InvokeResponse, ClientError> {
        Ok(self.functions.invoke(request).await?.into_inner())
    }

    /// Queues an invocation; returns its id.
    pub async fn invoke_async(
        &mut self,
        request: pb::InvokeRequest,
    ) -> Result<String, ClientError> {
        Ok(self.functions.invoke_async(request).await?.into_inner().id)
    }

    /// Sets (or with an empty `cron`, removes) a function's schedule.
    pub async fn schedule(&mut self, name: &str, cron: &str) -> Result<(), ClientError> {
        self.functions
            .schedule(pb::ScheduleRequest {
                name: name.into(),
                cron: cron.into(),
            })
            .await?;
        Ok(())
    }

    /// Recent log lines of a function from every node.
    pub async fn function_logs(&mut self, name: &str) -> Result<pb::FunctionLogs, ClientError> {
        Ok(self
            .functions
            .logs(pb::FunctionRef { name: name.into() })
            .await?
            .into_inner())
    }

    /// A function's counters summed over the mesh.
    pub async fn function_stats(&mut self, name: &str) -> Result<pb::FunctionStats, ClientError> {
        Ok(self
            .functions
            .stats(pb::FunctionRef { name: name.into() })
            .await?
            .into_inner())
    }

    /// Collects unreferenced blobs on the answering node.
    pub async fn collect_garbage(
        &mut self,
        grace_secs: Option<u64>,
    ) -> Result<pb::CollectGarbageResponse, ClientError> {
        Ok(self
            .registry
            .collect_garbage(pb::CollectGarbageRequest { grace_secs })
            .await?
            .into_inner())
    }
}

impl MeshClient {
    /// Creates a container service; its replicas start wherever placement puts them.
    pub async fn create_service(
        &mut self,
        request: pb::CreateServiceRequest,
    ) -> Result<pb::Service, ClientError> {
        Ok(self.services.create(request).await?.into_inner())
    }

    /// Changes a service's image, command, env or health check: a rolling update, one
    /// replica at a time. Fields left empty keep their value.
    pub async fn update_service(
        &mut self,
        request: pb::UpdateServiceRequest,
    ) -> Result<pb::Service, ClientError> {
        Ok(self.services.update(request).await?.into_inner())
    }

    /// Sets a service's desired replica count.
    pub async fn scale_service(
        &mut self,
        name: &str,
        replicas: u32,
    ) -> Result<pb::Service, ClientError> {
        Ok(self
            .services
            .scale(pb::ScaleServiceRequest {
                name: name.into(),
                replicas,
            })
            .await?
            .into_inner())
    }

    /// Removes a service; its replicas stop.
    pub async fn remove_service(&mut self, name: &str) -> Result<(), ClientError> {
        self.services
            .remove(pb::ServiceRef { name: name.into() })
            .await?;
        Ok(())
    }

    /// Every service, with its running, pending and updated replica counts.
    pub async fn services(&mut self) -> Result<Vec<pb::Service>, ClientError> {
        Ok(self
            .services
            .list(pb::ListServicesRequest {})
            .await?
            .into_inner()
            .services)
    }

    /// One service.
    pub async fn service(&mut self, name: &str) -> Result<pb::Service, ClientError> {
        Ok(self
            .services
            .get(pb::ServiceRef { name: name.into() })
            .await?
            .into_inner())
    }

    /// A service's replicas (and pending replicas, with the reason), one entry each.
    pub async fn service_ps(&mut self, name: &str) -> Result<Vec<pb::ServiceReplica>, ClientError> {
        Ok(self
            .services
            .ps(pb::ServiceRef { name: name.into() })
            .await?
            .into_inner()
            .replicas)
    }

    /// Streams the stdout and stderr of a service's replicas: first the end of each log,
    /// then, with `follow`, new output as it comes.
    pub async fn service_logs(
        &mut self,
        request: pb::ServiceLogsRequest,
    ) -> Result<ServiceLogStream, ClientError> {
        Ok(ServiceLogStream(
            self.services.logs(request).await?.into_inner(),
        ))
    }

    /// Adds a gateway route from a path prefix to a function or a service.
    pub async fn add_route(&mut self, route: pb::Route) -> Result<pb::Route, ClientError> {
        Ok(self.routes.add(route).await?.into_inner())
    }

    /// Every gateway route.
    pub async fn routes(&mut self) -> Result<Vec<pb::Route>, ClientError> {
        Ok(self
            .routes
            .list(pb::ListRoutesRequest {})
            .await?
            .into_inner()
            .routes)
    }

    /// Removes the gateway route with this path (and host, for a route bound to one; empty
    /// otherwise).
    pub async fn remove_route(&mut self, host: &str, path: &str) -> Result<(), ClientError> {
        self.routes
            .remove(pb::RouteRef {
                path: path.into(),
                host: host.into(),
            })
            .await?;
        Ok(())
    }

    /// Creates or replaces a usage plan.
    pub async fn create_plan(&mut self, plan: pb::Plan) -> Result<pb::Plan, ClientError> {
        Ok(self.plans.create(plan).await?.into_inner())
    }

    /// Every usage plan.
    pub async fn plans(&mut self) -> Result<Vec<pb::Plan>, ClientError> {
        Ok(self
            .plans
            .list(pb::ListPlansRequest {})
            .await?
            .into_inner()
            .plans)
    }

    /// Removes a plan that no key or route uses.
    pub async fn remove_plan(&mut self, name: &str) -> Result<(), ClientError> {
        self.plans.remove(pb::PlanRef { name: name.into() }).await?;
        Ok(())
    }

    /// Creates an API key; the answer holds the key itself, shown only this once.
    pub async fn create_key(
        &mut self,
        name: &str,
        plan: &str,
    ) -> Result<pb::CreatedKey, ClientError> {
        Ok(self
            .keys
            .create(pb::CreateKeyRequest {
                name: name.into(),
                plan: plan.into(),
            })
            .await?
            .into_inner())
    }

    /// Every API key (never the keys themselves).
    pub async fn keys(&mut self) -> Result<Vec<pb::ApiKey>, ClientError> {
        Ok(self
            .keys
            .list(pb::ListKeysRequest {})
            .await?
            .into_inner()
            .keys)
    }

    /// Revokes an API key on every node.
    pub async fn revoke_key(&mut self, name: &str) -> Result<pb::ApiKey, ClientError> {
        Ok(self
            .keys
            .revoke(pb::KeyRef { name: name.into() })
            .await?
            .into_inner())
    }

    /// Per-route gateway counters summed over the live nodes.
    pub async fn gateway_stats(&mut self) -> Result<Vec<pb::RouteStats>, ClientError> {
        Ok(self
            .gateway
            .stats(pb::GatewayStatsRequest {})
            .await?
            .into_inner()
            .routes)
    }
}

/// Parses a rate such as `10/s`, `600/min`, `100/h` or `5000/day` into requests per second.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let (n, unit) = text
        .split_once('/')
        .ok_or_else(|| "expected COUNT/UNIT, e.g. 10/s, 600/min, 100/h".to_string())?;
    let n: f64 = n
        .trim()
        .parse()
        .map_err(|_| format!("{n:?} is not a number"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err("the count must be above 0".into());
    }
    let seconds = match unit.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        "d" | "day" => 86_400.0,
        other => return Err(format!("unit {other:?}: s, min, h or day")),
    };
    Ok(n / seconds)
}

/// Parses a daily quota `N/day` (or a bare `N`).
pub fn parse_quota(text: &str) -> Result<u64, String> {
    let n = match text.split_once('/') {
        Some((n, "day" | "d")) => n,
        Some((_, unit)) => return Err(format!("unit {unit:?}: quotas are per day (N/day)")),
        None => text,
    };
    n.trim()
        .parse()
        .map_err(|_| format!("{n:?} is not a whole number"))
}

/// A rate in requests per second, the way `parse_rate` reads it (`10/s`, `30/min`, ...).
pub fn human_rate(per_second: f64) -> String {
    let fmt = |v: f64| {
        let r = (v * 1000.0).round() / 1000.0;
        if r.fract() == 0.0 {
            format!("{r:.0}")
        } else {
            format!("{r}")
        }
    };
    for (unit, seconds) in [("s", 1.0), ("min", 60.0), ("h", 3600.0), ("day", 86_400.0)] {
        let n = per_second * seconds;
        if n >= 1.0 && ((n * 1000.0).round() / 1000.0).fract() == 0.0 {
            return format!("{}/{unit}", fmt(n));
        }
    }
    format!("{}/s", fmt(per_second))
}

impl MeshClient {
    /// Submits a batch job (or an array job of `array` indices); it runs once its
    /// dependencies succeeded and placement finds room.
    pub async fn submit_job(
        &mut self,
        request: pb::SubmitJobRequest,
    ) -> Result<pb::Job, ClientError> {
        Ok(self.jobs.submit(request).await?.into_inner())
    }

    /// Jobs, newest first; a non-empty `state` (e.g. `RUNNING`) keeps only jobs in it.
    pub async fn jobs(&mut self, state: &str) -> Result<Vec<pb::Job>, ClientError> {
        Ok(self
            .jobs
            .list(pb::ListJobsRequest {
                state: state.into(),
            })
            .await?
            .into_inner()
            .jobs)
    }

    /// One job, with every attempt of every index.
    pub async fn job(&mut self, id: &str) -> Result<pb::Job, ClientError> {
        Ok(self
            .jobs
            .get(pb::JobRef { id: id.into() })
            .await?
            .into_inner())
    }

    /// Cancels a job: running attempts stop, and indices not finished end FAILED.
    pub async fn cancel_job(&mut self, id: &str) -> Result<pb::Job, ClientError> {
        Ok(self
            .jobs
            .cancel(pb::JobRef { id: id.into() })
            .await?
            .into_inner())
    }

    /// Streams the output of one index of a job: its last attempt unless the request names
    /// one, and with `follow`, new output as it comes.
    pub async fn job_logs(
        &mut self,
        request: pb::JobLogsRequest,
    ) -> Result<JobLogStream, ClientError> {
        Ok(JobLogStream(self.jobs.logs(request).await?.into_inner()))
    }
}

/// The log output of a job's attempt, chunk by chunk, from [`MeshClient::job_logs`].
pub struct JobLogStream(tonic::Streaming<pb::JobLogChunk>);

impl JobLogStream {
    /// The next chunk, or `None` when the stream ends (without `follow`, once the output
    /// so far was sent).
    pub async fn next(&mut self) -> Result<Option<pb::JobLogChunk>, ClientError> {
        Ok(self.0.message().await?)
    }
}

/// The log output of a service, chunk by chunk, from [`MeshClient::service_logs`].
pub struct ServiceLogStream(tonic::Streaming<pb::ServiceLogChunk>);

impl ServiceLogStream {
    /// The next chunk, or `None` when the stream ends (without `follow`, once every
    /// replica's tail was sent).
    pub async fn next(&mut self) -> Result<Option<pb::ServiceLogChunk>, ClientError> {
        Ok(self.0.message().await?)
    }
}

/// A member, as `meshctl nodes --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// libp2p peer id.
    pub peer_id: String,
    /// Listen multiaddrs.
    pub addrs: Vec<String>,
    /// `alive`, `suspect` or `dead`.
    pub state: String,
    /// Total CPU, thousandths of a core.
    pub cpu_total_millis: u64,
    /// Unallocated CPU.
    pub cpu_free_millis: u64,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Unallocated memory.
    pub memory_free_bytes: u64,
    /// Free disk in the data dir.
    pub disk_free_bytes: u64,
    /// Workloads running.
    pub workloads: u32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Milliseconds since the answering node heard from it.
    pub last_seen_ms_ago: u64,
    /// Whether this is the answering node.
    pub is_self: bool,
}

impl From<pb::Node> for NodeView {
    fn from(n: pb::Node) -> Self {
        let state = match pb::NodeState::try_from(n.state).unwrap_or_default() {
            pb::NodeState::Alive => "alive",
            pb::NodeState::Suspect => "suspect",
            pb::NodeState::Dead => "dead",
            pb::NodeState::Unspecified => "unknown",
        };
        let total = n.total.unwrap_or_default();
        let alloc = n.allocated.unwrap_or_default();
        NodeView {
            name: n.name,
            peer_id: n.peer_id,
            addrs: n.addrs,
            state: state.into(),
            cpu_total_millis: total.cpu_millis,
            cpu_free_millis: total.cpu_millis.saturating_sub(alloc.cpu_millis),
            memory_total_bytes: total.memory_bytes,
            memory_free_bytes: total.memory_bytes.saturating_sub(alloc.memory_bytes),
            disk_free_bytes: n.disk_free_bytes,
            workloads: n.workloads,
            labels: n.labels.into_iter().collect(),
            last_seen_ms_ago: n.last_seen_ms_ago,
            is_self: n.is_self,
        }
    }
}

impl NodeView {
    /// The node's main address as HOST:PORT: the first non-loopback QUIC address, else the
    /// first address.
    pub fn addr(&self) -> String {
        let hostport = |a: &str| {
            let parts: Vec<&str> = a.split('/').collect();
            match parts.as_slice() {
                ["", "ip4" | "ip6" | "dns", host, "udp" | "tcp", port, ..] => {
                    Some(format!("{host}:{port}"))
                }
                _ => None,
            }
        };
        let quic = |a: &&String| a.contains("/quic");
        let non_loop = |a: &&String| !a.contains("/127.") && !a.contains("/::1/");
        self.addrs
            .iter()
            .filter(quic)
            .find(non_loop)
            .or_else(|| self.addrs.iter().find(quic))
            .or_else(|| self.addrs.first())
            .and_then(|a| hostport(a))
            .unwrap_or_else(|| "-".into())
    }
}

/// A state entry, as `meshctl state ls --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryView {
    /// The key.
    pub key: String,
    /// The value as text (invalid UTF-8 replaced).
    pub value: String,
    /// HLC stamp of the write.
    pub stamp: String,
    /// Peer id of the node that accepted the write.
    pub origin: String,
    /// The raw value.
    #[serde(skip)]
    pub raw: Vec<u8>,
}

impl From<pb::Entry> for EntryView {
    fn from(e: pb::Entry) -> Self {
        EntryView {
            key: e.key,
            value: String::from_utf8_lossy(&e.value).into_owned(),
            stamp: e.stamp,
            origin: e.origin,
            raw: e.value,
        }
    }
}

/// Formats bytes the way people read them (`3.8Gi`, `512Mi`, `900`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}")
    } else if v >= 100.0 {
        format!("{v:.0}{}", UNITS[i])
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

/// Formats thousandths of a core (`2`, `1.5`, `250m`).
pub fn human_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        format!("{}", millis / 1000)
    } else if millis < 1000 {
        format!("{millis}m")
    } else {
        format!("{:.2}", millis as f64 / 1000.0)
    }
}

/// The most CPU a `--cpu` may ask for: 1000 cores.
pub const MAX_CPU_MILLIS: u64 = 1_000_000;

/// Parses a CPU amount into thousandths of a core: cores such as `0.5`, `1` or `2.25`, or
/// thousandths such as `250m`. Zero, negative amounts, finer than `1m`, more than
/// [`MAX_CPU_MILLIS`] and anything else are errors whose text says why.
pub fn parse_cpu(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected cores like 0.5 or 2, or thousandths of a core like 250m";
    let too_much = || format!("more than {} cores", MAX_CPU_MILLIS / 1000);
    let t = text.trim();
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if let Some(positive) = t.strip_prefix('-') {
        // A number with a minus sign is negative; anything else is not a number.
        return Err(match parse_cpu(positive) {
            Err(e) if e == EXPECTED || positive.starts_with('-') => EXPECTED.into(),
            _ => "must be more than 0".into(),
        });
    }
    let millis = if let Some(m) = t.strip_suffix('m') {
        if m.is_empty() || !digits(m) {
            return Err(EXPECTED.into());
        }
        m.parse::<u64>().map_err(|_| too_much())?
    } else {
        let (int, frac) = t.split_once('.').unwrap_or((t, ""));
        if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
            return Err(EXPECTED.into());
        }
        let (thousandths, finer) = frac.split_at(frac.len().min(3));
        if finer.bytes().any(|b| b != b'0') {
            return Err("finer than a thousandth of a core (1m)".into());
        }
        let whole = if int.is_empty() {
            0
        } else {
            int.parse::<u64>().map_err(|_| too_much())?
        };
        let part = format!("{thousandths:0<3}").parse::<u64>().unwrap_or(0);
        whole
            .checked_mul(1000)
            .and_then(|w| w.checked_add(part))
            .ok_or_else(too_much)?
    };
    if millis == 0 {
        return Err("must be more than 0".into());
    }
    if millis > MAX_CPU_MILLIS {
        return Err(too_much());
    }
    Ok(millis)
}

/// Splits a command line into its arguments the way a POSIX shell would (quotes,
/// backslashes; no expansion), e.g. `sh -c 'echo hi'` into `sh`, `-c`, `echo hi`. An
/// unbalanced quote, a trailing backslash or an empty command is an error.
pub fn split_command(text: &str) -> Result<Vec<String>, String> {
    let argv = shlex::split(text)
        .ok_or_else(|| "an unbalanced quote or a trailing backslash".to_string())?;
    if argv.is_empty() {
        return Err("the command is empty".into());
    }
    Ok(argv)
}

/// Joins arguments back into one line a shell would split the same way (for display).
pub fn join_command(argv: &[String]) -> String {
    shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_else(|_| format!("{argv:?}"))
}

/// The states a job (or one index of an array job) goes through, in order; a job ends
/// SUCCEEDED or FAILED.
pub const JOB_STATES: [&str; 7] = [
    "SUBMITTED",
    "PENDING",
    "RUNNABLE",
    "STARTING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
];

/// Parses a job state in any case (`running`, `Running`) into the uppercase name the API
/// takes; anything not in [`JOB_STATES`] is an error listing them.
pub fn parse_job_state(text: &str) -> Result<String, String> {
    let upper = text.trim().to_ascii_uppercase();
    if JOB_STATES.contains(&upper.as_str()) {
        Ok(upper)
    } else {
        Err(format!("expected one of {}", JOB_STATES.join(", ")))
    }
}

/// Parses a comma-separated list of process exit codes, each an integer from 0 to 255
/// (`137,143`; spaces around the commas are fine). Empty items and anything else are errors
/// whose text says why.
pub fn parse_exit_codes(text: &str) -> Result<Vec<i32>, String> {
    if text.trim().is_empty() {
        return Err("expected exit codes 0-255 separated by commas, like 137,143".into());
    }
    let mut codes = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(
                "an empty item; expected exit codes separated by commas, like 137,143".into(),
            );
        }
        if !item.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{item:?} is not an exit code (an integer from 0 to 255)"
            ));
        }
        let code: u8 = item
            .parse()
            .map_err(|_| format!("{item} is not an exit code: they go from 0 to 255"))?;
        let code = i32::from(code);
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    Ok(codes)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long ago `since_ms` (ms since the Unix epoch) was at `now_ms`, the way people read
/// it: `12s`, `3m`, `2h`, `5d`; `-` when `since_ms` is 0 (unknown).
pub fn human_age(since_ms: u64, now_ms: u64) -> String {
    if since_ms == 0 {
        return "-".into();
    }
    let secs = now_ms.saturating_sub(since_ms) / 1000;
    if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m", secs / 60)
    } else if secs < 86_400 {
        format!("{}h", secs / 3600)
    } else {
        format!("{}d", secs / 86_400)
    }
}

/// Turns the log chunks of a service's replicas into output, prefixing each line with its
/// replica (`web.1 | `) when more than one replica contributes. Chunks need not end at a
/// line break: while prefixing, a replica's unfinished line waits for the rest of it, so
/// lines of different replicas never mix.
#[derive(Debug)]
pub struct LogPrefixer {
    service: String,
    prefix: bool,
    first: Option<u32>,
    partial: BTreeMap<u32, Vec<u8>>,
    /// Raw output ended in the middle of a line.
    open_line: bool,
}

impl LogPrefixer {
    /// Starts with prefixes when `prefix` (e.g. the service has several replicas); without,
    /// output passes through unchanged until a second replica shows up.
    pub fn new(service: &str, prefix: bool) -> Self {
        LogPrefixer {
            service: service.to_string(),
            prefix,
            first: None,
            partial: BTreeMap::new(),
            open_line: false,
        }
    }

    /// The bytes to write now for a chunk of `replica`'s output.
    pub fn push(&mut self, replica: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.prefix {
            match self.first {
                None => self.first = Some(replica),
                Some(r) if r != replica => {
                    self.prefix = true;
                    if self.open_line {
                        out.push(b'\n');
                    }
                }
                Some(_) => {}
            }
        }
        if !self.prefix {
            if let Some(&last) = data.last() {
                self.open_line = last != b'\n';
            }
            out.extend_from_slice(data);
            return out;
        }
        let buf = self.partial.entry(replica).or_default();
        buf.extend_from_slice(data);
        if let Some(end) = buf.iter().rposition(|&b| b == b'\n') {
            let rest = buf.split_off(end + 1);
            let complete = std::mem::replace(buf, rest);
            let tag = format!("{}.{replica} | ", self.service);
            for line in complete.split_inclusive(|&b| b == b'\n') {
                out.extend_from_slice(tag.as_bytes());
                out.extend_from_slice(line);
            }
        }
        out
    }

    /// The bytes left when the stream ends: every unfinished line, prefixed and ended.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for (replica, line) in std::mem::take(&mut self.partial) {
            if !line.is_empty() {
                out.extend_from_slice(format!("{}.{replica} | ", self.service).as_bytes());
                out.extend_from_slice(&line);
                out.push(b'\n');
            }
        }
        out
    }
}

/// Renders rows as a left-aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human_bytes(900), "900");
        assert_eq!(human_bytes(512 << 20), "512Mi");
        assert_eq!(human_bytes(3 << 30), "3.0Gi");
        assert_eq!(human_cpu(2000), "2");
        assert_eq!(human_cpu(250), "250m");
        assert_eq!(human_cpu(1500), "1.50");
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }

    #[test]
    fn cpu_amounts() {
        assert_eq!(parse_cpu("250m"), Ok(250));
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu("1"), Ok(1000));
        assert_eq!(parse_cpu("2.25"), Ok(2250));
        assert_eq!(parse_cpu(".5"), Ok(500));
        assert_eq!(parse_cpu("0.001"), Ok(1));
        assert_eq!(parse_cpu("1.2500"), Ok(1250));
        assert_eq!(parse_cpu(" 100m "), Ok(100));
        assert_eq!(parse_cpu("1000"), Ok(MAX_CPU_MILLIS));
        assert_eq!(parse_cpu("1000000m"), Ok(MAX_CPU_MILLIS));
        for zero in ["0", "0m", "0.0", "0.0001"] {
            let e = parse_cpu(zero).unwrap_err();
            assert!(
                e.contains("more than 0") || e.contains("finer"),
                "{zero}: {e}"
            );
        }
        for negative in ["-1", "-250m", "-0.5", "-0", "-2000"] {
            assert_eq!(parse_cpu(negative).unwrap_err(), "must be more than 0");
        }
        for big in [
            "1000.001",
            "1000001m",
            "99999999999999999999",
            "18446744073709552",
        ] {
            assert!(
                parse_cpu(big).unwrap_err().contains("more than 1000 cores"),
                "{big}"
            );
        }
        for garbage in [
            "-abc", "--1", "", "m", "-", ".", "abc", "1.5m", "1e3", "+1", "1 m", "0x10", "1..2",
            "2 cores",
        ] {
            assert!(
                parse_cpu(garbage).unwrap_err().contains("expected cores"),
                "{garbage:?}"
            );
        }
        assert!(parse_cpu("0.0005").unwrap_err().contains("finer"));
    }

    #[test]
    fn commands_split_like_a_shell() {
        assert_eq!(
            split_command("sh -c 'echo hi; sleep 1'").unwrap(),
            ["sh", "-c", "echo hi; sleep 1"]
        );
        assert_eq!(
            split_command(r#"python3 -m http.server "80 80" a\ b"#).unwrap(),
            ["python3", "-m", "http.server", "80 80", "a b"]
        );
        assert_eq!(split_command("  nginx  ").unwrap(), ["nginx"]);
        assert_eq!(split_command(r#"echo "it's""#).unwrap(), ["echo", "it's"]);
        assert!(
            split_command("sh -c 'echo hi")
                .unwrap_err()
                .contains("unbalanced")
        );
        assert!(
            split_command(r#"echo "a"#)
                .unwrap_err()
                .contains("unbalanced")
        );
        assert!(split_command("echo \\").unwrap_err().contains("unbalanced"));
        assert!(split_command("   ").unwrap_err().contains("empty"));
        let argv = split_command("sh -c 'echo \"$X\"'").unwrap();
        assert_eq!(split_command(&join_command(&argv)).unwrap(), argv);
    }

    #[test]
    fn job_states_in_any_case() {
        assert_eq!(parse_job_state("RUNNING").unwrap(), "RUNNING");
        assert_eq!(parse_job_state("running").unwrap(), "RUNNING");
        assert_eq!(parse_job_state(" Succeeded ").unwrap(), "SUCCEEDED");
        for s in JOB_STATES {
            assert_eq!(parse_job_state(&s.to_lowercase()).unwrap(), s);
        }
        for bad in ["", "runing", "DONE", "RUNNING,FAILED", "cancelled"] {
            let e = parse_job_state(bad).unwrap_err();
            assert!(
                e.contains("SUBMITTED, PENDING, RUNNABLE, STARTING, RUNNING, SUCCEEDED, FAILED"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn exit_code_lists() {
        assert_eq!(parse_exit_codes("137").unwrap(), [137]);
        assert_eq!(parse_exit_codes("137,143").unwrap(), [137, 143]);
        assert_eq!(parse_exit_codes(" 1 , 2,255 ").unwrap(), [1, 2, 255]);
        assert_eq!(parse_exit_codes("0").unwrap(), [0]);
        assert_eq!(parse_exit_codes("1,1,2").unwrap(), [1, 2]);
        assert!(parse_exit_codes("256").unwrap_err().contains("0 to 255"));
        assert!(
            parse_exit_codes("99999999999")
                .unwrap_err()
                .contains("0 to 255")
        );
        for bad in ["-1", "+1", "x", "1;2", "1 2", "0x10", "1.0"] {
            assert!(
                parse_exit_codes(bad)
                    .unwrap_err()
                    .contains("is not an exit code"),
                "{bad:?}"
            );
        }
        for empty in ["", " ", "1,", ",1", "1,,2"] {
            assert!(
                parse_exit_codes(empty)
                    .unwrap_err()
                    .contains("separated by commas"),
                "{empty:?}"
            );
        }
    }

    #[test]
    fn ages() {
        let now = 1_700_000_000_000;
        assert_eq!(human_age(0, now), "-");
        assert_eq!(human_age(now, now), "0s");
        assert_eq!(human_age(now - 12_400, now), "12s");
        assert_eq!(human_age(now - 59_999, now), "59s");
        assert_eq!(human_age(now - 60_000, now), "1m");
        assert_eq!(human_age(now - 3 * 60_000 - 5_000, now), "3m");
        assert_eq!(human_age(now - 2 * 3_600_000 - 1, now), "2h");
        assert_eq!(human_age(now - 3 * 86_400_000, now), "3d");
        // A replica's clock ahead of ours.
        assert_eq!(human_age(now + 5_000, now), "0s");
    }

    #[test]
    fn log_lines_get_their_replica_when_several_contribute() {
        // One replica: bytes pass through as they come.
        let mut p = LogPrefixer::new("web", false);
        assert_eq!(p.push(0, b"hel"), b"hel");
        assert_eq!(p.push(0, b"lo\nwor"), b"lo\nwor");
        assert_eq!(p.finish(), b"");

        // Several: whole lines, each tagged, unfinished lines held back until they end.
        let mut p = LogPrefixer::new("web", true);
        assert_eq!(p.push(0, b"a1\na2\npart"), b"web.0 | a1\nweb.0 | a2\n");
        assert_eq!(p.push(1, b"b1\n"), b"web.1 | b1\n");
        assert_eq!(p.push(0, b"ial\n"), b"web.0 | partial\n");
        assert_eq!(p.push(1, b"no end"), b"");
        assert_eq!(p.push(2, b""), b"");
        assert_eq!(p.finish(), b"web.1 | no end\n");

        // Started without prefixes; a second replica turns them on, ending the open line.
        let mut p = LogPrefixer::new("api", false);
        assert_eq!(p.push(3, b"x\ny"), b"x\ny");
        assert_eq!(p.push(4, b"z\n"), b"\napi.4 | z\n");
        assert_eq!(p.push(3, b"w\n"), b"api.3 | w\n");
    }

    #[test]
    fn main_address_prefers_non_loopback_quic() {
        let mut n = NodeView::from(pb::Node::default());
        assert_eq!(n.addr(), "-");
        n.addrs = vec![
            "/ip4/127.0.0.1/tcp/7000".into(),
            "/ip4/127.0.0.1/udp/7000/quic-v1".into(),
            "/ip4/10.0.0.2/udp/7000/quic-v1".into(),
        ];
        assert_eq!(n.addr(), "10.0.0.2:7000");
    }

    #[test]
    fn rates_and_quotas() {
        assert_eq!(parse_rate("10/s"), Ok(10.0));
        assert_eq!(parse_rate("600/min"), Ok(10.0));
        assert_eq!(parse_rate("1/h"), Ok(1.0 / 3600.0));
        assert_eq!(parse_rate("0.5/s"), Ok(0.5));
        assert!(parse_rate("10").is_err());
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10/week").is_err());
        assert_eq!(parse_quota("10000/day"), Ok(10000));
        assert_eq!(parse_quota("5"), Ok(5));
        assert!(parse_quota("5/h").is_err());
        assert_eq!(human_rate(10.0), "10/s");
        assert_eq!(human_rate(0.5), "30/min");
        assert_eq!(human_rate(1.0 / 3600.0), "1/h");
        assert_eq!(human_rate(2.5), "150/min");
    }
}
