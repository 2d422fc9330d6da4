//! A running node: opens the data dir, starts the network task and both API listeners, and
//! holds the [`NodeState`] they share.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use libp2p::PeerId;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::admission::ClusterSecret;
use crate::blobs::direct::{DirectTls, direct_addrs};
use crate::blobs::store::{BlobStore, StoreError};
use crate::blobs::transfer::{self, BlobDialer, DirectAddrs, IsDead, ServeMode};
use crate::capacity::CapacityProbe;
use crate::datadir::{DataDir, DataDirError};
use crate::functions::Functions;
use crate::functions::triggers::Triggers;
use crate::membership::{FailureDetector, MemberState, MembershipTable};
use crate::p2p::{MeshNetwork, NetworkCommand, NetworkConfig, NetworkError};
use crate::registry::Registry;
use crate::replica::{Replica, ReplicaError};
use crate::rpc::{RpcError, RpcRequest, RpcRouter};
use crate::scheduler::Scheduler;
use crate::services::Services;
use crate::services::supervisor::Supervisor;
use crate::state::Entry;

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// The cluster's join secret.
    pub secret: ClusterSecret,
    /// libp2p address (QUIC on UDP and TCP on the same port).
    pub p2p: SocketAddr,
    /// Port for direct blob connections on the p2p host (0: any free one; `None`: blobs move
    /// over libp2p streams only; see [`crate::blobs::direct`]).
    pub blob_port: Option<u16>,
    /// gRPC API address.
    pub grpc: SocketAddr,
    /// HTTP listener address (health, metrics, later the gateway).
    pub http: SocketAddr,
    /// Members to join through.
    pub join: Vec<SocketAddr>,
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// CPU cores to offer instead of the measured count.
    pub cpu: Option<f64>,
    /// Memory bytes to offer instead of the measured amount.
    pub memory: Option<u64>,
    /// Discover peers by mDNS.
    pub mdns: bool,
    /// Failure detector timing.
    pub detector: FailureDetector,
    /// Test-only misbehaviour (hidden `--test-lie` flag).
    pub lie: Option<crate::p2p::LieMode>,
    /// How long an unreferenced blob is kept before garbage collection removes it.
    pub blob_gc_grace: Duration,
    /// How long ended batch jobs stay in the replicated state.
    pub job_retention: Duration,
    /// containerd's socket.
    pub containerd_socket: PathBuf,
    /// This node's containerd namespace (distinct per node when nodes share a containerd).
    pub containerd_namespace: String,
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data dir could not be used.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The network could not start.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// The blob store could not be opened.
    #[error(transparent)]
    Blobs(#[from] StoreError),
    /// An API listener could not bind.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// State shared by the network task and the APIs.
pub struct NodeState {
    /// This node's peer id.
    pub peer_id: PeerId,
    /// This node's name.
    pub name: String,
    /// This node's labels.
    pub labels: BTreeMap<String, String>,
    /// Public id of the cluster.
    pub cluster_id: String,
    /// Failure detector timing.
    pub detector: FailureDetector,
    /// Who is in the mesh.
    pub membership: RwLock<MembershipTable>,
    /// The desired state.
    pub replica: Mutex<Replica>,
    /// Handlers of node-to-node calls.
    pub router: RpcRouter,
    /// Capacity taken by the replicas placed on this node, and how many there are, as the
    /// last scheduler pass computed them; advertised in heartbeats.
    pub allocated: Mutex<(crate::membership::Resources, u32)>,
    /// Whether this node's containerd answers (advertised as a label; services need it).
    pub containers_ready: std::sync::atomic::AtomicBool,
    /// What fencing allows this node to do now (updated by the scheduler every pass).
    pub verdict: Mutex<crate::fence::Verdict>,
    /// Replicas the last placement pass could not place, with the reason, by (workload,
    /// replica).
    pub pending: Mutex<BTreeMap<(String, u32), String>>,
    /// Counts changes of the replicated state (local writes and applied remote entries);
    /// control loops wait on it (see `pacing`).
    changes: watch::Sender<u64>,
    network: mpsc::UnboundedSender<NetworkCommand>,
    /// The port this node takes direct blob connections on (0: none); advertised in heartbeats.
    pub blob_port: u16,
}

impl NodeState {
    /// Calls `service` on another node and waits for its answer.
    pub async fn call(
        &self,
        peer: PeerId,
        service: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, RpcError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = RpcRequest {
            service: service.to_string(),
            body,
        };
        if self
            .network
            .send(NetworkCommand::Rpc {
                peer,
                request,
                reply,
            })
            .is_err()
        {
            return Err(RpcError::Unreachable {
                peer,
                reason: "the network task has stopped".into(),
            });
        }
        answer.await.unwrap_or_else(|_| {
            Err(RpcError::Unreachable {
                peer,
                reason: "the network task dropped the call".into(),
            })
        })
    }

    /// Tells the control loops that the replicated state changed.
    pub fn state_changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Notifications of state changes, for a control loop.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The number of state changes so far: differs from an earlier reading once the
    /// replicated state changed (a local write or an applied remote entry) since then.
    pub fn state_generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// A node state over a fresh replica in `dir`, with no network task (writes are stored
    /// but go nowhere), for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(dir: &std::path::Path, name: &str) -> Arc<Self> {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let peer_id = key.public().to_peer_id();
        let db = crate::datadir::StateDb::open(&dir.join("state.redb")).expect("state db");
        let replica = Replica::load(db, peer_id.to_string()).expect("replica");
        let detector = FailureDetector::default();
        Arc::new(NodeState {
            peer_id,
            name: name.to_string(),
            labels: BTreeMap::new(),
            cluster_id: "test".into(),
            detector,
            membership: RwLock::new(MembershipTable::new(peer_id.to_string(), detector)),
            replica: Mutex::new(replica),
            router: RpcRouter::default(),
            allocated: Mutex::new(Default::default()),
            containers_ready: std::sync::atomic::AtomicBool::new(false),
            verdict: Mutex::new(crate::fence::Verdict::Act),
            pending: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
            network: mpsc::unbounded_channel().0,
            blob_port: 0,
        })
    }

    /// Writes a value (or deletes with `None`) and spreads it to the mesh.
    pub fn write(&self, key: &str, value: Option<Vec<u8>>) -> Result<Entry, ReplicaError> {
        let entry = self
            .replica
            .lock()
            .expect("replica lock")
            .write(key, value)?;
        self.spread(entry)
    }

    /// [`write`](Self::write) for a record whose loss in a crash of this node does not
    /// matter: made durable lazily ([`crate::replica::Replica::write_lazy`]), spread at once.
    pub fn write_lazy(&self, key: &str, value: Option<Vec<u8>>) -> Result<Entry, ReplicaError> {
        let entry = self
            .replica
            .lock()
            .expect("replica lock")
            .write_lazy(key, value)?;
        self.spread(entry)
    }

    /// Sends a local entry to the mesh and wakes whoever waits on state changes.
    fn spread(&self, entry: Entry) -> Result<Entry, ReplicaError> {
        let _ = self
            .network
            .send(NetworkCommand::Broadcast(vec![entry.clone()]));
        metrics::counter!("mesh_state_writes_total").increment(1);
        self.state_changed();
        Ok(entry)
    }
}

/// Where each member takes direct blob connections, from its last heartbeat.
fn direct_addrs_of(state: Arc<NodeState>) -> DirectAddrs {
    Arc::new(move |peer| {
        let table = state.membership.read().expect("membership lock");
        table.get(&peer.to_string()).map_or_else(Vec::new, |m| {
            direct_addrs(&m.heartbeat.addrs, m.heartbeat.blob_port)
        })
    })
}

/// Whether the membership declared a peer dead (an unknown peer is not).
fn declared_dead(state: Arc<NodeState>) -> IsDead {
    Arc::new(move |peer| {
        let table = state.membership.read().expect("membership lock");
        table
            .get(&peer.to_string())
            .is_some_and(|m| m.state == MemberState::Dead)
    })
}

/// A started node; dropping it does not stop it, call [`Node::shutdown`].
pub struct Node {
    state: Arc<NodeState>,
    triggers: Arc<Triggers>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
}

impl Node {
    /// Opens the data dir, binds every listener and starts all tasks.
    pub async fn start(config: NodeConfig, metrics: PrometheusHandle) -> Result<Self, NodeError> {
        let cluster_id = config.secret.cluster_id();
        let data_dir = DataDir::open(&config.data_dir, &cluster_id)?;
        let key = data_dir.identity().clone();
        let peer_id = key.public().to_peer_id();
        let probe = CapacityProbe::new(data_dir.root(), config.cpu, config.memory);
        let store = Arc::new(BlobStore::open(&data_dir.root().join("blobs"))?);
        let replica = Replica::load(data_dir.into_db(), peer_id.to_string())?;
        tracing::info!(%peer_id, name = %config.name, cluster = %cluster_id,
            entries = replica.map().live_len(), capacity = ?probe.total(), "node starting");

        let grpc_listener =
            TcpListener::bind(config.grpc)
                .await
                .map_err(|source| NodeError::Bind {
                    what: "gRPC",
                    addr: config.grpc,
                    source,
                })?;
        let http_listener =
            TcpListener::bind(config.http)
                .await
                .map_err(|source| NodeError::Bind {
                    what: "HTTP",
                    addr: config.http,
                    source,
                })?;
        let blob_listener = match config.blob_port {
            Some(port) => {
                let addr = SocketAddr::new(config.p2p.ip(), port);
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| NodeError::Bind {
                            what: "direct blob",
                            addr,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let grpc_addr = grpc_listener.local_addr().expect("bound");
        let http_addr = http_listener.local_addr().expect("bound");

        let (net_tx, net_rx) = mpsc::unbounded_channel();
        let state = Arc::new(NodeState {
            peer_id,
            name: config.name.clone(),
            labels: config.labels.clone(),
            cluster_id,
            detector: config.detector,
            membership: RwLock::new(MembershipTable::new(peer_id.to_string(), config.detector)),
            replica: Mutex::new(replica),
            router: RpcRouter::default(),
            allocated: Mutex::new(Default::default()),
            containers_ready: std::sync::atomic::AtomicBool::new(false),
            verdict: Mutex::new(crate::fence::Verdict::Act),
            pending: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
            network: net_tx.clone(),
            blob_port: blob_listener
                .as_ref()
                .map_or(0, |l| l.local_addr().expect("bound").port()),
        });
        let network = MeshNetwork::new(
            key.clone(),
            config.secret.clone(),
            &NetworkConfig {
                listen: config.p2p,
                join: config.join.clone(),
                mdns: config.mdns,
                lie: config.lie,
            },
            state.clone(),
            probe,
            net_rx,
            net_tx,
        )?;

        let control = network.blob_control();
        let direct_tls = blob_listener
            .as_ref()
            .map(|_| Arc::new(DirectTls::new(key.clone(), &config.secret)));
        let dialer = BlobDialer::new(
            control.clone(),
            direct_tls
                .clone()
                .map(|tls| (tls, direct_addrs_of(state.clone()))),
            declared_dead(state.clone()),
        );
        let registry = Arc::new(Registry::new(state.clone(), store.clone(), dialer));
        let functions = Functions::new(
            state.clone(),
            registry.clone(),
            config.data_dir.join("fn-cache"),
        );
        let triggers = Triggers::new(state.clone(), functions.clone());
        let triggers_handle = triggers.clone();
        let scheduler = Scheduler::new(
            state.clone(),
            vec![
                Functions::workload_source(registry.clone()),
                Services::workload_source(registry.clone()),
                crate::batch::Batch::workload_source(),
            ],
        );
        let job_logs = config.data_dir.join("job-logs");
        let batch = crate::batch::Batch::new(state.clone(), registry.clone(), job_logs.clone());
        let executor = crate::batch::executor::Executor::new(
            state.clone(),
            registry.clone(),
            functions.clone(),
            triggers.clone(),
            job_logs,
            config.data_dir.join("job-scratch"),
            config.containerd_socket.clone(),
            config.containerd_namespace.clone(),
            config.job_retention,
        );
        let log_dir = config.data_dir.join("container-logs");
        let services = Services::new(state.clone(), registry.clone(), log_dir.clone());
        let supervisor = Supervisor::new(
            state.clone(),
            registry.clone(),
            config.containerd_socket.clone(),
            config.containerd_namespace.clone(),
            log_dir,
        );
        let serve_mode = if config.lie == Some(crate::p2p::LieMode::CorruptPieces) {
            ServeMode::CorruptPieces
        } else {
            ServeMode::Honest
        };

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(network.run(shutdown_rx.clone()));
        let holds: transfer::Holds = {
            let registry = registry.clone();
            Arc::new(move |blob, peer| registry.holds(blob, peer))
        };
        tasks.spawn(transfer::serve(
            control,
            blob_listener.zip(direct_tls),
            store,
            holds,
            serve_mode,
            shutdown_rx.clone(),
        ));
        tasks.spawn(
            registry
                .clone()
                .run_background(config.blob_gc_grace, shutdown_rx.clone()),
        );
        tasks.spawn(scheduler.run(Duration::from_secs(1), shutdown_rx.clone()));
        tasks.spawn(functions.clone().run_background(shutdown_rx.clone()));
        tasks.spawn(triggers.clone().run(shutdown_rx.clone()));
        tasks.spawn(supervisor.run(shutdown_rx.clone()));
        tasks.spawn(executor.run(shutdown_rx.clone()));
        let subsystems = crate::grpc::Subsystems {
            node: state.clone(),
            registry: registry.clone(),
            functions: functions.clone(),
            triggers,
            gc_grace: config.blob_gc_grace,
            containerd: crate::grpc::ContainerdTarget {
                socket: config.containerd_socket.clone(),
                namespace: config.containerd_namespace.clone(),
            },
            services,
            batch,
        };
        tasks.spawn(crate::grpc::serve(
            grpc_listener,
            subsystems,
            shutdown_rx.clone(),
        ));
        tasks.spawn(crate::http::serve(
            http_listener,
            metrics,
            functions,
            state.clone(),
            shutdown_rx,
        ));
        tracing::info!(grpc = %grpc_addr, http = %http_addr, p2p = %config.p2p, "node started");
        Ok(Self {
            state,
            triggers: triggers_handle,
            shutdown,
            tasks,
            grpc_addr,
            http_addr,
        })
    }

    /// Internal event hook: queues an async call of every function deployed with `--on
    /// EVENT` (e.g. the batch queue's `job.finished`), with `payload` as the body. Returns the
    /// ids of the queued calls.
    pub fn emit_event(&self, event: &str, payload: &[u8]) -> Vec<String> {
        self.triggers.emit(event, payload)
    }

    /// The shared state, for embedding and tests.
    pub fn state(&self) -> &Arc<NodeState> {
        &self.state
    }

    /// Where the gRPC API listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where the HTTP listener listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Waits until a task ends on its own (which means something failed).
    pub async fn wait(&mut self) {
        let _ = self.tasks.join_next().await;
    }

    /// Stops every task: asks them to stop, gives them five seconds, then aborts the rest.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("tasks did not stop within 5 s; aborting them");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        tracing::info!("node stopped");
    }
}
