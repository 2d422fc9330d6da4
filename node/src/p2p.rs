//! The libp2p side of a node: transports, admission, discovery, gossip and state sync.
//!
//! One tokio task owns the [`Swarm`] and drives it; everything it learns goes into the shared
//! [`NodeState`] (membership table, state replica) whose logic lives in sans-IO modules. The
//! rest of the node talks to this task through [`NetworkCommand`]s.
//!
//! - Transports: QUIC (quinn-based) first, TCP with noise and yamux as fallback, both behind the
//!   admission upgrade of [`crate::admission`].
//! - Discovery: `--join` addresses (retried with backoff until reached), identify, Kademlia
//!   through any known peer, mDNS on the LAN, and the addresses members put in heartbeats.
//! - Gossip: gossipsub topics for heartbeats and state writes, messages signed by their
//!   author; every message is validated, and an invalid one is rejected, which lowers the
//!   sender's gossipsub score.
//! - Anti-entropy: once a second, a digest exchange over request-response with one random
//!   live peer (see [`crate::state`]), so a node that was down or cut off catches up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Transport as _;
use libp2p::core::upgrade;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, mdns, noise, quic, tcp, yamux};
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::admission::{ClusterSecret, admit};
use crate::capacity::CapacityProbe;
use crate::membership::{Heartbeat, MemberState, Resources, Transition};
use crate::node::NodeState;
use crate::replica::Merged;
use crate::rpc::{MAX_RPC_BYTES, RpcError, RpcRequest, RpcResponse, RpcRouter};
use crate::state::{Digest, Entry};

const HEARTBEAT_TOPIC: &str = "meshwork/heartbeat/1";
const STATE_TOPIC: &str = "meshwork/state/1";
const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshwork/sync/1");
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshwork/kad/1");
const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshwork/rpc/1");
/// Largest gossip message accepted or sent.
pub const MAX_GOSSIP_BYTES: usize = 512 * 1024;
/// Largest anti-entropy response, in bytes of entries.
const MAX_SYNC_BYTES: usize = 4 * 1024 * 1024;
/// Bad messages after which a peer is no longer synced with.
const MAX_STRIKES: u32 = 20;
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Requests of the anti-entropy protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SyncRequest {
    /// "Here is my digest; send me your entries where we differ."
    Digest(Digest),
    /// "Here are entries you lacked or had older."
    Push(Vec<Entry>),
}

/// Responses of the anti-entropy protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SyncResponse {
    /// Every entry of the covered buckets.
    Buckets {
        /// Buckets sent whole.
        covered: Vec<usize>,
        /// Their entries, tombstones included.
        entries: Vec<Entry>,
    },
    /// Push received.
    Ack,
}

/// State writes as gossiped.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateGossip {
    entries: Vec<Entry>,
}

/// Asks of the rest of the node to the network task.
pub enum NetworkCommand {
    /// Spread local writes to the mesh.
    Broadcast(Vec<Entry>),
    /// Call another node.
    Rpc {
        /// The node.
        peer: PeerId,
        /// The call.
        request: RpcRequest,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Vec<u8>, RpcError>>,
    },
    /// A local handler answered an inbound call.
    RespondRpc {
        /// Which inbound call.
        id: u64,
        /// The answer.
        response: RpcResponse,
    },
}

#[derive(NetworkBehaviour)]
struct MeshBehaviour {
    identify: identify::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    gossipsub: gossipsub::Behaviour,
    sync: request_response::cbor::Behaviour<SyncRequest, SyncResponse>,
    rpc: request_response::cbor::Behaviour<RpcRequest, RpcResponse>,
    blobs: libp2p_stream::Behaviour,
}

/// Settings of the network task.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Address for both QUIC (UDP) and TCP.
    pub listen: SocketAddr,
    /// Members to join through.
    pub join: Vec<SocketAddr>,
    /// Discover peers with mDNS.
    pub mdns: bool,
    /// Test-only: misbehave on purpose, to test how peers cope with a liar.
    pub lie: Option<LieMode>,
}

/// Ways a node can be told to misbehave, for tests of the others' defences (hidden flag
/// `--test-lie`). Never set in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LieMode {
    /// Each heartbeat tick, gossip an undecodable state message and a heartbeat that claims
    /// to come from another peer.
    Gossip,
    /// Serve blob pieces with a flipped byte.
    CorruptPieces,
}

/// One `--join` address and what is known of it.
struct JoinTarget {
    addr: SocketAddr,
    peer: Option<PeerId>,
    next_attempt: Instant,
    backoff: Duration,
    failures: u32,
}

/// An outbound node-to-node call waiting for its answer.
type PendingCall = (PeerId, oneshot::Sender<Result<Vec<u8>, RpcError>>);

/// The network task: owns the swarm.
pub struct MeshNetwork {
    swarm: Swarm<MeshBehaviour>,
    node: Arc<NodeState>,
    probe: CapacityProbe,
    commands: mpsc::UnboundedReceiver<NetworkCommand>,
    joins: Vec<JoinTarget>,
    hb_topic: IdentTopic,
    state_topic: IdentTopic,
    incarnation: u64,
    seq: u64,
    disk_free: u64,
    disk_checked: Option<Instant>,
    redial: HashMap<PeerId, Instant>,
    strikes: HashMap<PeerId, u32>,
    bootstrapped: bool,
    lie: Option<LieMode>,
    unsubscribed_since: HashMap<PeerId, Instant>,
    router: RpcRouter,
    self_tx: mpsc::UnboundedSender<NetworkCommand>,
    rpc_waiting: HashMap<request_response::OutboundRequestId, PendingCall>,
    rpc_inbound: HashMap<u64, request_response::ResponseChannel<RpcResponse>>,
    rpc_next: u64,
}

/// Errors building the network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// libp2p refused a part of the setup.
    #[error("network setup: {0}")]
    Setup(String),
    /// Could not listen on the p2p address.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

fn setup<E: std::fmt::Display>(e: E) -> NetworkError {
    NetworkError::Setup(e.to_string())
}

/// The QUIC and TCP multiaddrs for one socket address.
pub fn multiaddrs(addr: SocketAddr) -> [Multiaddr; 2] {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) => Protocol::Ip4(ip),
        std::net::IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    let quic = Multiaddr::empty()
        .with(ip.clone())
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1);
    let tcp = Multiaddr::empty().with(ip).with(Protocol::Tcp(addr.port()));
    [quic, tcp]
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl MeshNetwork {
    /// Builds the swarm and starts listening.
    pub fn new(
        key: libp2p::identity::Keypair,
        secret: ClusterSecret,
        config: &NetworkConfig,
        node: Arc<NodeState>,
        probe: CapacityProbe,
        commands: mpsc::UnboundedReceiver<NetworkCommand>,
        self_tx: mpsc::UnboundedSender<NetworkCommand>,
    ) -> Result<Self, NetworkError> {
        let router = node.router.clone();
        let mdns_on = config.mdns;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|key| {
                let local = key.public().to_peer_id();
                let quic = quic::tokio::Transport::new(quic::Config::new(key))
                    .map(|(p, c), _| (p, StreamMuxerBox::new(c)));
                let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .upgrade(upgrade::Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default())
                    .map(|(p, m), _| (p, StreamMuxerBox::new(m)));
                let transport = quic
                    .or_transport(tcp)
                    .map(|either, _| either.into_inner())
                    .and_then(move |conn, endpoint| admit(secret.clone(), local, conn, endpoint));
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(transport)
            })
            .map_err(setup)?
            .with_behaviour(|key| {
                let local = key.public().to_peer_id();
                let identify = identify::Behaviour::new(
                    identify::Config::new("/meshwork/id/1".into(), key.public())
                        .with_agent_version(format!("meshd/{}", env!("CARGO_PKG_VERSION"))),
                );
                let mut kad = kad::Behaviour::with_config(
                    local,
                    MemoryStore::new(local),
                    kad::Config::new(KAD_PROTOCOL),
                );
                kad.set_mode(Some(kad::Mode::Server));
                let mdns = if mdns_on {
                    Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
                } else {
                    None
                };
                let gs_config = gossipsub::ConfigBuilder::default()
                    .heartbeat_interval(Duration::from_millis(700))
                    .validation_mode(gossipsub::ValidationMode::Strict)
                    .validate_messages()
                    .max_transmit_size(MAX_GOSSIP_BYTES)
                    .flood_publish(true)
                    .build()?;
                let mut gossipsub = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gs_config,
                )?;
                // Score only what says something about a peer's honesty here: invalid
                // messages. Delivery-rate terms assume a steady message rate per topic that
                // heartbeats and state writes do not have, and would penalise every peer.
                let mut score = gossipsub::PeerScoreParams::default();
                for t in [HEARTBEAT_TOPIC, STATE_TOPIC] {
                    let params = gossipsub::TopicScoreParams {
                        topic_weight: 1.0,
                        mesh_message_deliveries_weight: 0.0,
                        mesh_failure_penalty_weight: 0.0,
                        first_message_deliveries_weight: 0.0,
                        invalid_message_deliveries_weight: -10.0,
                        invalid_message_deliveries_decay: 0.5,
                        ..Default::default()
                    };
                    score.topics.insert(IdentTopic::new(t).hash(), params);
                }
                // Many members behind one address (a homelab NAT, a test on loopback) are
                // normal here, and every peer has already proven the secret: no penalty.
                score.ip_colocation_factor_weight = 0.0;
                gossipsub.with_peer_score(score, gossipsub::PeerScoreThresholds::default())?;
                let sync = request_response::cbor::Behaviour::with_codec(
                    request_response::cbor::codec::Codec::default()
                        .set_request_size_maximum(MAX_SYNC_BYTES as u64 + 1024 * 1024)
                        .set_response_size_maximum(MAX_SYNC_BYTES as u64 + 1024 * 1024),
                    [(SYNC_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(10)),
                );
                Ok(MeshBehaviour {
                    identify,
                    kad,
                    mdns: Toggle::from(mdns),
                    gossipsub,
                    sync,
                    rpc: request_response::cbor::Behaviour::with_codec(
                        request_response::cbor::codec::Codec::default()
                            .set_request_size_maximum(MAX_RPC_BYTES)
                            .set_response_size_maximum(MAX_RPC_BYTES),
                        [(RPC_PROTOCOL, ProtocolSupport::Full)],
                        request_response::Config::default()
                            .with_request_timeout(Duration::from_secs(120)),
                    ),
                    blobs: libp2p_stream::Behaviour::new(),
                })
            })
            .map_err(setup)?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();

        for addr in multiaddrs(config.listen) {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetworkError::Listen {
                    addr,
                    reason: e.to_string(),
                })?;
        }
        let hb_topic = IdentTopic::new(HEARTBEAT_TOPIC);
        let state_topic = IdentTopic::new(STATE_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&hb_topic)
            .map_err(setup)?;
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&state_topic)
            .map_err(setup)?;
        let joins = config
            .join
            .iter()
            .map(|addr| JoinTarget {
                addr: *addr,
                peer: None,
                next_attempt: Instant::now(),
                backoff: Duration::from_millis(500),
                failures: 0,
            })
            .collect();
        Ok(Self {
            swarm,
            node,
            probe,
            commands,
            joins,
            hb_topic,
            state_topic,
            incarnation: now_ms(),
            seq: 0,
            disk_free: 0,
            disk_checked: None,
            redial: HashMap::new(),
            strikes: HashMap::new(),
            bootstrapped: false,
            lie: config.lie,
            unsubscribed_since: HashMap::new(),
            router,
            self_tx,
            rpc_waiting: HashMap::new(),
            rpc_inbound: HashMap::new(),
            rpc_next: 0,
        })
    }

    /// A handle for opening and accepting blob transfer streams.
    pub fn blob_control(&self) -> libp2p_stream::Control {
        self.swarm.behaviour().blobs.new_control()
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let interval = self.node.detector.interval;
        let mut heartbeat = tokio::time::interval(interval);
        let mut sync = tokio::time::interval(Duration::from_secs(1));
        let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
        let mut kad_refresh = tokio::time::interval(Duration::from_secs(30));
        for t in [
            &mut heartbeat,
            &mut sync,
            &mut housekeeping,
            &mut kad_refresh,
        ] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = heartbeat.tick() => self.on_heartbeat_tick(),
                _ = sync.tick() => self.start_sync_round(),
                _ = housekeeping.tick() => {
                    self.judge_members();
                    self.heal_silent_connections();
                    self.retry_joins();
                    self.redial_members();
                }
                _ = kad_refresh.tick() => self.kad_bootstrap(),
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = shutdown.changed() => break,
            }
        }
        self.close_connections().await;
        tracing::info!("network task stopped");
    }

    /// Closes every connection and drives the swarm briefly (at most 500 ms) so the close
    /// reaches the peers. They then drop this process's connections at once, and a restarted
    /// process gets fresh connections (with its gossip subscriptions) instead of waiting for
    /// the old ones to time out.
    async fn close_connections(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(deadline);
        while self.swarm.connected_peers().next().is_some() {
            tokio::select! {
                _ = &mut deadline => break,
                _ = self.swarm.select_next_some() => {}
            }
        }
    }

    fn local(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    fn listen_addrs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .swarm
            .listeners()
            .chain(self.swarm.external_addresses())
            .map(|a| a.to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn on_heartbeat_tick(&mut self) {
        let now = Instant::now();
        if self
            .disk_checked
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(5))
        {
            self.disk_free = self.probe.disk_free_bytes();
            self.disk_checked = Some(now);
        }
        self.seq += 1;
        let (allocated, workloads) = *self.node.allocated.lock().expect("allocated lock");
        let hb = Heartbeat {
            peer_id: self.local().to_string(),
            name: self.node.name.clone(),
            incarnation: self.incarnation,
            seq: self.seq,
            addrs: self.listen_addrs(),
            blob_port: self.node.blob_port,
            labels: {
                let mut labels = self.node.labels.clone();
                if self
                    .node
                    .containers_ready
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    labels.insert(
                        crate::services::CONTAINERS_LABEL.into(),
                        crate::services::CONTAINERS_READY.into(),
                    );
                }
                labels
            },
            total: self.probe.total(),
            allocated,
            disk_free_bytes: self.disk_free,
            workloads,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let bytes = postcard::to_allocvec(&hb).expect("heartbeat serializes");
        let transitions = {
            let mut table = self.node.membership.write().expect("membership lock");
            table.observe(hb, now);
            table.tick(now)
        };
        self.report(&transitions);
        self.publish(self.hb_topic.clone(), bytes);
        if self.seq.is_multiple_of(4) {
            // Entries from peers are written lazily; make them durable every two seconds.
            let flushed = self.node.replica.lock().expect("replica lock").flush();
            if let Err(e) = flushed {
                tracing::error!(error = %e, "cannot make synced state durable");
            }
        }
        if self.lie == Some(LieMode::Gossip) {
            self.tell_lies();
        }
        self.update_gauges();
    }

    fn tell_lies(&mut self) {
        self.publish(self.state_topic.clone(), vec![0xff; 64]);
        let phantom = Heartbeat {
            peer_id: PeerId::random().to_string(),
            name: "phantom".into(),
            incarnation: 1,
            seq: self.seq,
            addrs: vec![],
            labels: Default::default(),
            total: Resources::default(),
            allocated: Resources::default(),
            disk_free_bytes: 0,
            workloads: 0,
            version: "lie".into(),
            blob_port: 0,
        };
        let bytes = postcard::to_allocvec(&phantom).expect("heartbeat serializes");
        self.publish(self.hb_topic.clone(), bytes);
    }

    /// Gossipsub exchanges topic subscriptions only on a peer's first connection. When a peer
    /// restarts before its old connection times out, one side never learns the other's
    /// subscriptions and gossip stops flowing one way. A connected peer that has not shown
    /// our heartbeat topic for ten seconds is disconnected, so that both sides reconnect
    /// and exchange subscriptions afresh.
    fn heal_silent_connections(&mut self) {
        let now = Instant::now();
        let hb = self.hb_topic.hash();
        let subscribed: std::collections::HashSet<PeerId> = self
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .filter(|(_, topics)| topics.contains(&&hb))
            .map(|(p, _)| *p)
            .collect();
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        self.unsubscribed_since.retain(|p, _| connected.contains(p));
        for peer in connected {
            if subscribed.contains(&peer) {
                self.unsubscribed_since.remove(&peer);
                continue;
            }
            let since = *self.unsubscribed_since.entry(peer).or_insert(now);
            // Generous: under load, subscriptions can take a few seconds, and a reset costs
            // every stream on the connection (blob transfers included).
            if now.duration_since(since) > Duration::from_secs(10) {
                tracing::info!(%peer, "peer connected but not subscribed; reconnecting");
                metrics::counter!("mesh_connection_resets_total").increment(1);
                self.unsubscribed_since.remove(&peer);
                self.redial.remove(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    /// Re-judges members between heartbeats so a death is seen within a quarter second.
    fn judge_members(&mut self) {
        let transitions = self
            .node
            .membership
            .write()
            .expect("membership lock")
            .tick(Instant::now());
        self.report(&transitions);
    }

    fn report(&mut self, transitions: &[Transition]) {
        for t in transitions {
            if t.peer_id == self.local().to_string() {
                continue;
            }
            if t.to == MemberState::Dead
                && let Ok(p) = t.peer_id.parse::<PeerId>()
            {
                // Drop whatever connection is left (a killed process sends no close): a
                // returning node must get a fresh connection, on which gossipsub exchanges
                // subscriptions again.
                let _ = self.swarm.disconnect_peer_id(p);
            }
            match t.to {
                MemberState::Alive => {
                    tracing::info!(peer = %t.peer_id, name = %t.name, from = ?t.from, "member alive")
                }
                MemberState::Suspect => {
                    tracing::warn!(peer = %t.peer_id, name = %t.name, "member suspect")
                }
                MemberState::Dead => {
                    tracing::warn!(peer = %t.peer_id, name = %t.name, "member dead")
                }
            }
            metrics::counter!("mesh_member_transitions_total", "to" => t.to.as_str()).increment(1);
            if t.to == MemberState::Alive
                && let Ok(p) = t.peer_id.parse::<PeerId>()
            {
                // Fresh or returning member: talk to it soon.
                self.redial.remove(&p);
            }
        }
    }

    fn update_gauges(&self) {
        let table = self.node.membership.read().expect("membership lock");
        for (state, n) in table.counts() {
            metrics::gauge!("mesh_peers", "state" => state.as_str()).set(n as f64);
        }
        drop(table);
        let replica = self.node.replica.lock().expect("replica lock");
        metrics::gauge!("mesh_state_entries").set(replica.map().live_len() as f64);
        metrics::gauge!("mesh_state_tombstones")
            .set((replica.map().len() - replica.map().live_len()) as f64);
        metrics::gauge!("mesh_connected_peers").set(self.swarm.connected_peers().count() as f64);
    }

    fn publish(&mut self, topic: IdentTopic, bytes: Vec<u8>) {
        let name = if topic.hash() == self.hb_topic.hash() {
            "heartbeat"
        } else {
            "state"
        };
        match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
            Ok(_) => metrics::counter!("mesh_gossip_messages_total", "direction" => "out", "topic" => name)
                .increment(1),
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
            | Err(gossipsub::PublishError::AllQueuesFull(_)) => {
                tracing::trace!(topic = name, "no peer to gossip to yet");
            }
            Err(e) => tracing::debug!(topic = name, error = %e, "gossip publish failed"),
        }
    }

    fn on_command(&mut self, cmd: NetworkCommand) {
        match cmd {
            NetworkCommand::Broadcast(entries) => {
                let bytes = postcard::to_allocvec(&StateGossip { entries })
                    .expect("state gossip serializes");
                self.publish(self.state_topic.clone(), bytes);
            }
            NetworkCommand::Rpc {
                peer,
                request,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
                self.rpc_waiting.insert(id, (peer, reply));
            }
            NetworkCommand::RespondRpc { id, response } => {
                if let Some(channel) = self.rpc_inbound.remove(&id) {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .rpc
                        .send_response(channel, response);
                }
            }
        }
    }

    fn start_sync_round(&mut self) {
        let candidates: Vec<PeerId> = {
            let table = self.node.membership.read().expect("membership lock");
            table
                .peers_in(MemberState::Alive)
                .filter_map(|m| m.heartbeat.peer_id.parse().ok())
                .filter(|p| self.swarm.is_connected(p))
                .filter(|p| self.strikes.get(p).copied().unwrap_or(0) < MAX_STRIKES)
                .collect()
        };
        let Some(peer) = candidates.choose(&mut rand::rng()).copied() else {
            return;
        };
        let digest = self
            .node
            .replica
            .lock()
            .expect("replica lock")
            .map()
            .digest();
        self.swarm
            .behaviour_mut()
            .sync
            .send_request(&peer, SyncRequest::Digest(digest));
        metrics::counter!("mesh_sync_rounds_total").increment(1);
    }

    fn retry_joins(&mut self) {
        let now = Instant::now();
        let mut dials = Vec::new();
        for j in &mut self.joins {
            let connected = j.peer.is_some_and(|p| self.swarm.is_connected(&p));
            if connected || now < j.next_attempt {
                continue;
            }
            if j.failures > 0 {
                tracing::warn!(addr = %j.addr, attempt = j.failures + 1, retry_in = ?j.backoff,
                    "not joined through this address yet (unreachable, or admission refused); retrying");
            }
            j.next_attempt = now + j.backoff;
            j.backoff = (j.backoff * 2).min(JOIN_BACKOFF_MAX);
            j.failures += 1;
            dials.extend(multiaddrs(j.addr));
        }
        for addr in dials {
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, error = %e, "dial failed");
            }
        }
    }

    /// Keeps a connection to every known member: alive and suspect ones are redialled
    /// within a second, dead ones every few seconds (so a healed partition reconnects).
    fn redial_members(&mut self) {
        let now = Instant::now();
        let local = self.local();
        let targets: Vec<(PeerId, MemberState, Vec<Multiaddr>)> = {
            let table = self.node.membership.read().expect("membership lock");
            table
                .members()
                .into_iter()
                .filter_map(|m| {
                    let p: PeerId = m.heartbeat.peer_id.parse().ok()?;
                    let addrs = m
                        .heartbeat
                        .addrs
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .collect();
                    Some((p, m.state, addrs))
                })
                .filter(|(p, _, _)| *p != local)
                .collect()
        };
        for (peer, state, addrs) in targets {
            if self.swarm.is_connected(&peer) || addrs.is_empty() {
                continue;
            }
            if self.redial.get(&peer).is_some_and(|t| now < *t) {
                continue;
            }
            let wait = if state == MemberState::Dead {
                Duration::from_secs(3)
            } else {
                Duration::from_secs(1)
            };
            self.redial.insert(peer, now + wait);
            let opts = DialOpts::peer_id(peer).addresses(addrs).build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::trace!(%peer, error = %e, "redial failed");
            }
        }
    }

    fn kad_bootstrap(&mut self) {
        if self.swarm.connected_peers().next().is_some() {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    fn strike(&mut self, peer: PeerId, reason: &'static str) {
        let n = self.strikes.entry(peer).or_default();
        *n += 1;
        metrics::counter!("mesh_bad_messages_total", "reason" => reason).increment(1);
        tracing::warn!(%peer, reason, strikes = *n, "dropped a bad message from peer");
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<MeshBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                if endpoint.is_dialer() {
                    let remote = endpoint.get_remote_address();
                    for j in &mut self.joins {
                        if multiaddrs(j.addr).iter().any(|a| a == remote) {
                            if j.peer.is_none() || j.failures > 1 {
                                tracing::info!(addr = %j.addr, peer = %peer_id, "joined the mesh through");
                            }
                            j.peer = Some(peer_id);
                            j.failures = 0;
                            j.backoff = Duration::from_millis(500);
                        }
                    }
                }
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer_id, endpoint.get_remote_address().clone());
                if !self.bootstrapped {
                    self.bootstrapped = true;
                    self.kad_bootstrap();
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, error = %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(addr = %send_back_addr, error = %error, "incoming connection failed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: MeshBehaviourEvent) {
        match event {
            MeshBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            MeshBehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, addresses, ..
            }) if !self.swarm.is_connected(&peer) && peer != self.local() => {
                let opts = DialOpts::peer_id(peer)
                    .addresses(addresses.into_vec())
                    .build();
                let _ = self.swarm.dial(opts);
            }
            MeshBehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (p, a) in found {
                    by_peer.entry(p).or_default().push(a);
                }
                for (peer, addrs) in by_peer {
                    if !self.swarm.is_connected(&peer) {
                        tracing::info!(%peer, "found on the LAN by mDNS");
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(addrs).build());
                    }
                }
            }
            MeshBehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let acceptance = self.on_gossip(&message);
                if matches!(acceptance, MessageAcceptance::Reject) {
                    self.strike(propagation_source, "gossip");
                }
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            MeshBehaviourEvent::Sync(request_response::Event::Message {
                peer, message, ..
            }) => self.on_sync_message(peer, message),
            MeshBehaviourEvent::Rpc(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let id = self.rpc_next;
                        self.rpc_next += 1;
                        self.rpc_inbound.insert(id, channel);
                        let router = self.router.clone();
                        let tx = self.self_tx.clone();
                        tokio::spawn(async move {
                            let response = router.handle(peer, request).await;
                            let _ = tx.send(NetworkCommand::RespondRpc { id, response });
                        });
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some((peer, reply)) = self.rpc_waiting.remove(&request_id) {
                            let _ = reply.send(match response {
                                RpcResponse::Ok(body) => Ok(body),
                                RpcResponse::Err(message) => {
                                    Err(RpcError::Remote { peer, message })
                                }
                            });
                        }
                    }
                }
            }
            MeshBehaviourEvent::Rpc(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                if let Some((peer, reply)) = self.rpc_waiting.remove(&request_id) {
                    let _ = reply.send(Err(RpcError::Unreachable {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            MeshBehaviourEvent::Sync(request_response::Event::OutboundFailure {
                peer,
                error,
                ..
            }) => {
                tracing::debug!(%peer, %error, "sync request failed");
            }
            MeshBehaviourEvent::Sync(request_response::Event::InboundFailure {
                peer,
                error,
                ..
            }) => {
                tracing::debug!(%peer, %error, "sync request from peer failed");
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    self.strike(peer, "sync-malformed");
                }
            }
            _ => {}
        }
    }

    /// Validates and applies one gossip message; the verdict goes back to gossipsub.
    fn on_gossip(&mut self, message: &gossipsub::Message) -> MessageAcceptance {
        let Some(author) = message.source else {
            return MessageAcceptance::Reject;
        };
        if message.topic == self.hb_topic.hash() {
            metrics::counter!("mesh_gossip_messages_total", "direction" => "in", "topic" => "heartbeat")
                .increment(1);
            let Some(hb) = Heartbeat::decode(&message.data) else {
                return MessageAcceptance::Reject;
            };
            if hb.peer_id != author.to_string() || hb.name.len() > 253 || hb.addrs.len() > 64 {
                // A member speaking for another, or nonsense: a lie.
                return MessageAcceptance::Reject;
            }
            let transition = self
                .node
                .membership
                .write()
                .expect("membership lock")
                .observe(hb, Instant::now());
            if let Some(t) = transition {
                self.report(&[t]);
            }
            MessageAcceptance::Accept
        } else if message.topic == self.state_topic.hash() {
            metrics::counter!("mesh_gossip_messages_total", "direction" => "in", "topic" => "state")
                .increment(1);
            let Ok(gossip) = postcard::from_bytes::<StateGossip>(&message.data) else {
                return MessageAcceptance::Reject;
            };
            let result = self
                .node
                .replica
                .lock()
                .expect("replica lock")
                .apply_remote(gossip.entries);
            match result {
                Ok(merged) => {
                    if !merged.applied.is_empty() {
                        self.node.state_changed();
                    }
                    observe_propagation(&merged.applied);
                    if merged.invalid.is_empty() {
                        MessageAcceptance::Accept
                    } else {
                        MessageAcceptance::Reject
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot persist gossiped state");
                    MessageAcceptance::Ignore
                }
            }
        } else {
            MessageAcceptance::Reject
        }
    }

    fn on_sync_message(
        &mut self,
        peer: PeerId,
        message: request_response::Message<SyncRequest, SyncResponse>,
    ) {
        let banned = self.strikes.get(&peer).copied().unwrap_or(0) >= MAX_STRIKES;
        match message {
            request_response::Message::Request {
                request, channel, ..
            } => {
                if banned {
                    return; // dropping the channel refuses the request
                }
                let response = match request {
                    SyncRequest::Digest(d) => {
                        let replica = self.node.replica.lock().expect("replica lock");
                        let (covered, entries) = replica.bucket_entries_for(&d, MAX_SYNC_BYTES);
                        SyncResponse::Buckets { covered, entries }
                    }
                    SyncRequest::Push(entries) => {
                        self.apply_from_sync(peer, entries);
                        SyncResponse::Ack
                    }
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_response(channel, response);
            }
            request_response::Message::Response { response, .. } => {
                if let SyncResponse::Buckets { covered, entries } = response {
                    if covered.is_empty() {
                        return;
                    }
                    let result = self
                        .node
                        .replica
                        .lock()
                        .expect("replica lock")
                        .reconcile(&covered, entries);
                    match result {
                        Ok(merged) => {
                            if !merged.applied.is_empty() {
                                self.node.state_changed();
                            }
                            self.count_synced(peer, &merged);
                            if !merged.to_push.is_empty() {
                                self.swarm
                                    .behaviour_mut()
                                    .sync
                                    .send_request(&peer, SyncRequest::Push(merged.to_push));
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "cannot persist synced state"),
                    }
                }
            }
        }
    }

    fn apply_from_sync(&mut self, peer: PeerId, entries: Vec<Entry>) {
        let result = self
            .node
            .replica
            .lock()
            .expect("replica lock")
            .apply_remote(entries);
        match result {
            Ok(merged) => {
                if !merged.applied.is_empty() {
                    self.node.state_changed();
                }
                self.count_synced(peer, &merged)
            }
            Err(e) => tracing::error!(error = %e, "cannot persist synced state"),
        }
    }

    fn count_synced(&mut self, peer: PeerId, merged: &Merged) {
        if !merged.invalid.is_empty() {
            self.strike(peer, "sync-invalid-entry");
        }
        if !merged.applied.is_empty() {
            tracing::debug!(%peer, n = merged.applied.len(), "caught up from peer");
            metrics::counter!("mesh_sync_entries_applied_total")
                .increment(merged.applied.len() as u64);
        }
    }
}

/// Records how long gossiped writes took to arrive here (the write's clock to now).
fn observe_propagation(applied: &[Entry]) {
    let now = SystemTime::now();
    for e in applied {
        let written = e.stamp.get_time().to_system_time();
        if let Ok(d) = now.duration_since(written) {
            metrics::histogram!("mesh_state_propagation_seconds").record(d.as_secs_f64());
        }
    }
}
