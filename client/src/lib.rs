//! Client library for the `mesh.v1` gRPC API of a Meshwork node, and the plain views that
//! `meshctl` prints (as tables or JSON).
//!
//! Any node answers every call, so a client needs one endpoint: `MESH_ENDPOINT` or
//! `--endpoint`, e.g. `http://127.0.0.1:7100`.

use std::collections::BTreeMap;

use meshwork_proto::v1::{
    self as pb, cluster_service_client::ClusterServiceClient,
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
            state: StateServiceClient::new(channel).max_decoding_message_size(64 << 20),
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
