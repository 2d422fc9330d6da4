//! Leaderless placement in practice: every node evaluates the placement core over its own view
//! of members and desired workloads; the coordinator of each workload (one per workload,
//! chosen by rendezvous hash over the live nodes) writes that workload's claims into the
//! replicated state; every node acts on the claims that name it.
//!
//! Claims are records `claim/<workload id>/<replica>` holding the owner and a fencing epoch.
//! The placement core raises the epoch whenever a replica changes owner, so an executor that
//! was cut off and comes back can tell that its claim is stale (a higher epoch exists) and
//! must stop. After views converge every replica has exactly one owner and no node is over
//! capacity; while views differ, two coordinators may both write, and last-writer-wins plus
//! the epoch decide.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fence::{QuorumWatch, Verdict};
use crate::membership::MemberState;
use crate::node::NodeState;
use crate::placement::{self, Claim, NodeCapacity, PlacementTable, WorkloadSpec};

const CLAIM_PREFIX: &str = "claim/";

/// A pending reason as `svc ps` shows it (the container capability label is explained).
fn pending_text(reason: &placement::PendingReason) -> String {
    match reason {
        placement::PendingReason::NoNodeMatchesConstraints => format!(
            "no live node matches the constraints (nodes need containerd running to take \
             services: label {}={})",
            crate::services::CONTAINERS_LABEL,
            crate::services::CONTAINERS_READY
        ),
        other => other.to_string(),
    }
}

/// A claim as stored in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredClaim {
    /// Owner's peer id.
    pub node: String,
    /// Fencing epoch.
    pub epoch: u64,
}

/// Something that contributes desired workloads (functions now; services and jobs later).
pub type WorkloadSource = Box<dyn Fn(&NodeState) -> Vec<WorkloadSpec> + Send + Sync>;

/// Runs the placement loop of one node.
pub struct Scheduler {
    node: Arc<NodeState>,
    sources: Vec<WorkloadSource>,
    quorum: std::sync::Mutex<QuorumWatch>,
}

fn claim_key(workload: &str, replica: u32) -> String {
    format!("{CLAIM_PREFIX}{workload}/{replica}")
}

impl Scheduler {
    /// A scheduler over the given workload sources.
    pub fn new(node: Arc<NodeState>, sources: Vec<WorkloadSource>) -> Self {
        Self {
            node,
            sources,
            quorum: std::sync::Mutex::new(QuorumWatch::starting(
                crate::fence::FENCE_TIMEOUT,
                crate::fence::SETTLE,
            )),
        }
    }

    /// Every claim in the state.
    pub fn claims(node: &NodeState) -> Vec<Claim> {
        Self::claims_under(node, CLAIM_PREFIX)
    }

    /// The claims of one workload (its replicas), without reading every other claim: what
    /// a request on the hot path (the gateway, a function call) needs.
    pub fn claims_of(node: &NodeState, workload: &str) -> Vec<Claim> {
        Self::claims_under(node, &format!("{CLAIM_PREFIX}{workload}/"))
            .into_iter()
            .filter(|c| c.workload == workload)
            .collect()
    }

    fn claims_under(node: &NodeState, prefix: &str) -> Vec<Claim> {
        let replica = node.replica.lock().expect("replica lock");
        replica
            .map()
            .list(prefix)
            .filter_map(|e| {
                let rest = &e.key[CLAIM_PREFIX.len()..];
                let (workload, idx) = rest.rsplit_once('/')?;
                let stored: StoredClaim = serde_json::from_slice(e.value.as_deref()?).ok()?;
                Some(Claim {
                    workload: workload.to_string(),
                    replica: idx.parse().ok()?,
                    node: stored.node,
                    epoch: stored.epoch,
                })
            })
            .collect()
    }

    /// The live nodes as placement sees them: alive or suspect. A suspect member (a missed
    /// heartbeat or two) keeps its claims; only a dead one loses them, so a short hiccup
    /// does not move replicas (and start duplicates next to ones still running).
    pub fn live_nodes(node: &NodeState) -> Vec<NodeCapacity> {
        let table = node.membership.read().expect("membership lock");
        table
            .members()
            .into_iter()
            .filter(|m| m.state != MemberState::Dead)
            .map(|m| NodeCapacity {
                node: m.heartbeat.peer_id.clone(),
                cpu_millis: m.heartbeat.total.cpu_millis,
                memory_bytes: m.heartbeat.total.memory_bytes,
                labels: m.heartbeat.labels.clone(),
            })
            .collect()
    }

    /// One pass: compute the table and write the claims of the workloads this node
    /// coordinates. Returns the table (for status and tests).
    pub fn run_once(&self) -> PlacementTable {
        let verdict = self.observe_quorum();
        let workloads: Vec<WorkloadSpec> =
            self.sources.iter().flat_map(|s| s(&self.node)).collect();
        let nodes = Self::live_nodes(&self.node);
        let current = Self::claims(&self.node);
        let table = placement::place(&workloads, &nodes, &current);
        let me = self.node.peer_id.to_string();

        let desired: BTreeMap<(String, u32), &Claim> = table
            .claims
            .iter()
            .map(|c| ((c.workload.clone(), c.replica), c))
            .collect();
        let mut stored: BTreeMap<(String, u32), Claim> = BTreeMap::new();
        for c in current {
            stored.insert((c.workload.clone(), c.replica), c);
        }
        // A node without a majority writes no claims (see `fence`).
        let coordinates = |workload: &str| {
            verdict == Verdict::Act && placement::coordinator(workload, &nodes) == Some(&me)
        };
        for (key, claim) in &desired {
            if !coordinates(&key.0) {
                continue;
            }
            let same = stored
                .get(key)
                .is_some_and(|s| s.node == claim.node && s.epoch == claim.epoch);
            if !same {
                let value = serde_json::to_vec(&StoredClaim {
                    node: claim.node.clone(),
                    epoch: claim.epoch,
                })
                .expect("claims serialize");
                if let Err(e) = self.node.write(&claim_key(&key.0, key.1), Some(value)) {
                    tracing::warn!(error = %e, "cannot write a claim");
                } else {
                    tracing::info!(workload = %key.0, replica = key.1, node = %claim.node,
                        epoch = claim.epoch, "placed");
                }
            }
        }
        // Claims no longer wanted (scaled down, workload deleted, or now pending).
        for key in stored.keys() {
            if !desired.contains_key(key) && coordinates(&key.0) {
                let _ = self.node.write(&claim_key(&key.0, key.1), None);
            }
        }
        // What the claims naming this node take, for its heartbeat ("free" in `nodes`).
        let mut taken = crate::membership::Resources::default();
        let mut count = 0u32;
        for c in table.claims.iter().filter(|c| c.node == me) {
            if let Some(w) = workloads.iter().find(|w| w.id == c.workload) {
                taken.cpu_millis += w.cpu_millis;
                taken.memory_bytes += w.memory_bytes;
                count += 1;
            }
        }
        *self.node.allocated.lock().expect("allocated lock") = (taken, count);
        metrics::gauge!("mesh_placements_pending").set(table.pending.len() as f64);
        *self.node.pending.lock().expect("pending lock") = table
            .pending
            .iter()
            .map(|p| ((p.workload.clone(), p.replica), pending_text(&p.reason)))
            .collect();
        table
    }

    /// Updates the node's fencing verdict from its current view of the membership.
    ///
    /// Known members are those in the membership table plus the owners of claims: a node
    /// restarting from its data dir has heard from nobody yet, but its claims say who else
    /// exists, so it does not mistake itself for a majority and act on stale claims.
    fn observe_quorum(&self) -> Verdict {
        let owners: std::collections::BTreeSet<String> = Self::claims(&self.node)
            .into_iter()
            .map(|c| c.node)
            .collect();
        let (live, known) = {
            let table = self.node.membership.read().expect("membership lock");
            let members = table.members();
            let live = members
                .iter()
                .filter(|m| m.state == MemberState::Alive)
                .count();
            let mut known: std::collections::BTreeSet<&str> = owners
                .iter()
                .map(String::as_str)
                .chain(members.iter().map(|m| m.heartbeat.peer_id.as_str()))
                .collect();
            let me = self.node.peer_id.to_string();
            known.insert(&me);
            (live.max(1), known.len())
        };
        let verdict = self.quorum.lock().expect("quorum lock").observe(
            std::time::Instant::now(),
            live,
            known,
        );
        let mut current = self.node.verdict.lock().expect("verdict lock");
        if *current != verdict {
            tracing::warn!(?verdict, live, known, "fencing verdict changed");
        }
        *current = verdict;
        verdict
    }

    /// Runs a pass every `every`, and soon after the state changes, until shutdown.
    pub async fn run(self, every: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut pacer = crate::pacing::Pacer::new(&self.node, every, Duration::from_millis(100));
        while pacer.next(&mut shutdown).await {
            self.run_once();
        }
    }
}
