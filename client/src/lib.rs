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
    function_service_client::FunctionServiceClient, registry_service_client::RegistryServiceClient,
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
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
    /// Something failed on this side (reading or writing a file).
    #[error("{0}")]
    Local(String),
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
            functions: FunctionServiceClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
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
}
