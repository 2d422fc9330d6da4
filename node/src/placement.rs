//! Placement: which live node runs each replica of each workload.
//!
//! Meshwork has no leader and no central scheduler. Every node runs [`place`] over
//! its own converged view of the cluster (the desired workloads, the live members and
//! the current claims) and acts on the part of the answer that concerns it. That only
//! works if placement is a pure function of the *contents* of that view: two nodes
//! with the same view must reach exactly the same [`PlacementTable`], whatever order
//! gossip delivered the pieces in. So this module does no I/O, reads no clock and
//! draws no random numbers; its only "randomness" is blake3 rendezvous hashing, which
//! gives the same answer on every node.
//!
//! [`place`] applies these rules:
//!
//! 1. **Deterministic.** Inputs are put in a canonical order first (workloads by
//!    priority descending then id, nodes by id, claims by workload then replica), and
//!    duplicates are resolved deterministically, so the output does not depend on the
//!    order of the input slices.
//! 2. **Sticky.** A current claim is kept while its node is alive, still satisfies the
//!    workload's constraints, the replica is still wanted and the capacity accounting
//!    still has room for it. Kept claims are accounted before anything new is placed,
//!    so a node joining moves nothing and a node leaving moves only what it held.
//! 3. **Scored.** A replica without a kept claim goes to the best node that has room
//!    and matches the constraints (see [`Strategy`]); blake3 rendezvous hashing breaks
//!    ties so that equal nodes share the load evenly but deterministically.
//! 4. **Fenced.** A kept claim keeps its epoch; a replica placed anew gets one more
//!    than the highest epoch seen for it, so every change of owner raises the epoch and
//!    a stale owner can be fenced off.
//! 5. **Bounded.** No node is ever given more CPU or memory than its capacity; a
//!    replica that fits nowhere is reported as [`Pending`] with a readable reason.
//! 6. **Scale down.** Claims for replica indices at or above the desired count, or for
//!    workloads that no longer exist, are dropped.
//!
//! [`coordinator`] uses the same kind of hashing to pick, for each workload, the one
//! live node that coordinates it.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's identity: its libp2p peer id, as a string.
pub type NodeId = String;

/// The total schedulable capacity of one live node, and the labels constraints match on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeCapacity {
    /// The node this capacity belongs to.
    pub node: NodeId,
    /// Schedulable CPU, in millicores (1000 = one core).
    pub cpu_millis: u64,
    /// Schedulable memory, in bytes.
    pub memory_bytes: u64,
    /// Free-form labels (zone, disk type, ...) that workload constraints match against.
    pub labels: BTreeMap<String, String>,
}

/// How a workload's new replicas choose among the nodes that can take them.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Strategy {
    /// Keep replicas of the same workload on different nodes, and favour the least
    /// loaded node. Good for availability; the default.
    #[default]
    Spread,
    /// Favour the most loaded node that still fits, keeping other nodes free for large
    /// workloads.
    Binpack,
}

/// One desired workload: how many replicas, what each needs, and where it may run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Unique workload id.
    pub id: String,
    /// How many replicas should run; replicas are numbered `0..replicas`.
    pub replicas: u32,
    /// CPU each replica needs, in millicores.
    pub cpu_millis: u64,
    /// Memory each replica needs, in bytes.
    pub memory_bytes: u64,
    /// Node labels that must be present with exactly these values.
    pub constraints: BTreeMap<String, String>,
    /// How to choose among nodes that fit.
    pub strategy: Strategy,
    /// Higher priorities are accounted first.
    pub priority: i32,
    /// Nodes to favour within the same tier, e.g. nodes that already hold the image.
    pub preferred: BTreeSet<NodeId>,
}

/// One replica's current owner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Claim {
    /// The workload id.
    pub workload: String,
    /// The replica index, in `0..replicas`.
    pub replica: u32,
    /// The node that owns (runs) the replica.
    pub node: NodeId,
    /// Fencing epoch: rises every time the replica changes owner.
    pub epoch: u64,
}

/// A replica that could not be placed this time, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pending {
    /// The workload id.
    pub workload: String,
    /// The replica index.
    pub replica: u32,
    /// Why no node could take it.
    pub reason: PendingReason,
}

/// Why a replica could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PendingReason {
    /// There are no live nodes at all.
    NoLiveNodes,
    /// No live node has all the labels the workload's constraints require.
    NoNodeMatchesConstraints,
    /// Some nodes match the constraints, but none has enough free CPU and memory left.
    InsufficientCapacity {
        /// CPU one replica needs, in millicores.
        needed_cpu_millis: u64,
        /// Memory one replica needs, in bytes.
        needed_memory_bytes: u64,
        /// Free CPU on the matching node that comes closest to fitting, in millicores.
        largest_cpu_millis: u64,
        /// Free memory on that same node, in bytes.
        largest_memory_bytes: u64,
    },
}

impl fmt::Display for PendingReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PendingReason::NoLiveNodes => f.write_str("no live nodes to place it on"),
            PendingReason::NoNodeMatchesConstraints => {
                f.write_str("no live node has the labels its constraints require")
            }
            PendingReason::InsufficientCapacity {
                needed_cpu_millis,
                needed_memory_bytes,
                largest_cpu_millis,
                largest_memory_bytes,
            } => write!(
                f,
                "needs {needed_cpu_millis}m CPU and {} memory; \
                 the largest free node has {largest_cpu_millis}m CPU and {} memory",
                ByteSize(*needed_memory_bytes),
                ByteSize(*largest_memory_bytes),
            ),
        }
    }
}

/// Formats a byte count the way people read it: `512 MiB`, `1.5 GiB`, `300 B`.
struct ByteSize(u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        let bytes = self.0;
        let Some((name, unit)) = UNITS.into_iter().find(|&(_, unit)| bytes >= unit) else {
            return write!(f, "{bytes} B");
        };
        // Tenths of the unit, rounded to nearest.
        let tenths = (u128::from(bytes) * 10 + u128::from(unit) / 2) / u128::from(unit);
        if tenths % 10 == 0 {
            write!(f, "{} {name}", tenths / 10)
        } else {
            write!(f, "{}.{} {name}", tenths / 10, tenths % 10)
        }
    }
}

/// The outcome of [`place`]: who owns each replica, and which replicas wait.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PlacementTable {
    /// One claim per placed replica, sorted by (workload, replica).
    pub claims: Vec<Claim>,
    /// Replicas that fit nowhere, sorted by (workload, replica).
    pub pending: Vec<Pending>,
}

impl PlacementTable {
    /// The claim for one replica, if it is placed.
    pub fn claim(&self, workload: &str, replica: u32) -> Option<&Claim> {
        self.claims
            .binary_search_by(|c| (c.workload.as_str(), c.replica).cmp(&(workload, replica)))
            .ok()
            .map(|i| &self.claims[i])
    }

    /// The claims a node owns, i.e. the replicas it should run.
    pub fn claims_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Claim> + 'a {
        self.claims.iter().filter(move |c| c.node == node)
    }
}

/// Decides which node runs each replica of each workload; see the module docs for the
/// rules.
///
/// `nodes` are the live members with their total capacity; `current` are the claims
/// in the replicated state (duplicates allowed, e.g. after a partition healed). The
/// result depends only on the contents of the three slices, never on their order.
///
/// Cost: O(C log C) for the claims plus, for each replica that needs a new home,
/// O(nodes) for scoring, with a blake3 hash only for nodes that tie on the score.
pub fn place(
    workloads: &[WorkloadSpec],
    nodes: &[NodeCapacity],
    current: &[Claim],
) -> PlacementTable {
    let workloads = canonical_workloads(workloads);
    let mut nodes: Vec<NodeState<'_>> = canonical_nodes(nodes)
        .into_iter()
        .map(NodeState::new)
        .collect();
    let history = resolve_claims(current);
    let mut claims = Vec::new();

    // Pass 1: keep every current claim that is still valid and still fits, in the
    // canonical order, before anything is placed anew.
    let mut kept: Vec<Vec<(u32, usize)>> = Vec::with_capacity(workloads.len());
    for workload in &workloads {
        let mut kept_here = Vec::new();
        for past in history.get(workload.id.as_str()).into_iter().flatten() {
            if past.replica >= workload.replicas {
                break; // sorted by replica: the rest are scaled away too
            }
            let Some(n) = find_node(&nodes, past.owner) else {
                continue; // the owner left
            };
            if !nodes[n].matches(workload) || !nodes[n].fits(workload) {
                continue;
            }
            nodes[n].take(workload);
            kept_here.push((past.replica, n));
            claims.push(Claim {
                workload: workload.id.clone(),
                replica: past.replica,
                node: past.owner.to_owned(),
                epoch: past.kept_epoch(),
            });
        }
        kept.push(kept_here);
    }

    // Pass 2: place every wanted replica that has no kept claim.
    let mut unplaced: Vec<(usize, u32)> = Vec::new();
    for (w, (workload, kept_here)) in workloads.iter().zip(&kept).enumerate() {
        if kept_here.len() as u64 >= u64::from(workload.replicas) {
            continue;
        }
        let candidates: Vec<usize> = (0..nodes.len())
            .filter(|&n| nodes[n].matches(workload))
            .collect();
        let mut replicas_on: HashMap<usize, u32> = HashMap::new();
        for &(_, n) in kept_here {
            *replicas_on.entry(n).or_default() += 1;
        }
        let past = history.get(workload.id.as_str());
        for replica in 0..workload.replicas {
            if kept_here
                .binary_search_by_key(&replica, |&(r, _)| r)
                .is_ok()
            {
                continue;
            }
            let Some(n) = choose_node(workload, replica, &candidates, &nodes, &replicas_on) else {
                unplaced.push((w, replica));
                continue;
            };
            nodes[n].take(workload);
            *replicas_on.entry(n).or_default() += 1;
            let highest_seen = past.and_then(|p| {
                p.binary_search_by_key(&replica, |h| h.replica)
                    .ok()
                    .map(|i| p[i].epoch)
            });
            claims.push(Claim {
                workload: workload.id.clone(),
                replica,
                node: nodes[n].spec.node.clone(),
                epoch: highest_seen.map_or(1, |e| e.saturating_add(1)),
            });
        }
    }

    // Reasons are worked out against the final accounting, once per workload, so they
    // describe the cluster as this table leaves it.
    let mut pending = Vec::with_capacity(unplaced.len());
    let mut reason: Option<(usize, PendingReason)> = None;
    for (w, replica) in unplaced {
        let workload = workloads[w];
        if reason.as_ref().is_none_or(|(for_w, _)| *for_w != w) {
            reason = Some((w, explain(workload, &nodes)));
        }
        let (_, why) = reason.as_ref().expect("just set");
        pending.push(Pending {
            workload: workload.id.clone(),
            replica,
            reason: why.clone(),
        });
    }

    claims.sort_unstable_by(|a, b| (&a.workload, a.replica).cmp(&(&b.workload, b.replica)));
    pending.sort_unstable_by(|a, b| (&a.workload, a.replica).cmp(&(&b.workload, b.replica)));
    PlacementTable { claims, pending }
}

/// The node that coordinates `workload_id` among the live `nodes`: the one with the
/// highest rendezvous weight blake3(workload id, node id).
///
/// Every node computes the same answer from the same member set, whatever its order;
/// a node leaving only changes the coordinator of the workloads it coordinated, and a
/// node joining takes over only the workloads for which it now has the highest weight.
/// `None` only when `nodes` is empty.
pub fn coordinator<'a>(workload_id: &str, nodes: &'a [NodeCapacity]) -> Option<&'a NodeId> {
    nodes
        .iter()
        .map(|n| (coordinator_weight(workload_id, &n.node), Reverse(&n.node)))
        .max()
        .map(|(_, Reverse(node))| node)
}

// ---------------------------------------------------------------------------------
// Canonical inputs.

/// Workloads deduplicated by id and sorted by (priority descending, id).
///
/// Two specs with the same id should not happen; if they do, the one with the higher
/// priority (then the smaller spec) wins, so that every node picks the same one.
fn canonical_workloads(workloads: &[WorkloadSpec]) -> Vec<&WorkloadSpec> {
    let mut out: Vec<&WorkloadSpec> = workloads.iter().collect();
    out.sort_unstable_by(|a, b| {
        (&a.id, Reverse(a.priority), *a).cmp(&(&b.id, Reverse(b.priority), *b))
    });
    out.dedup_by(|later, first| later.id == first.id);
    out.sort_unstable_by(|a, b| (Reverse(a.priority), &a.id).cmp(&(Reverse(b.priority), &b.id)));
    out
}

/// Nodes deduplicated by id and sorted by id. If one id appears with two capacities,
/// the smaller one wins: it is the safe assumption, and every node makes the same one.
fn canonical_nodes(nodes: &[NodeCapacity]) -> Vec<&NodeCapacity> {
    let mut out: Vec<&NodeCapacity> = nodes.iter().collect();
    out.sort_unstable();
    out.dedup_by(|later, first| later.node == first.node);
    out
}

/// What `current` says about one replica once duplicates are resolved.
struct ReplicaHistory<'a> {
    replica: u32,
    /// The winning owner: highest epoch, then smallest node id.
    owner: &'a str,
    /// The highest epoch any claim for this replica carries.
    epoch: u64,
    /// Another node claims the same replica at the same epoch (split brain).
    contested: bool,
}

impl ReplicaHistory<'_> {
    /// The epoch the owner keeps if its claim stays. A contested claim is re-issued one
    /// epoch higher so that the losing node's writes are fenced off.
    fn kept_epoch(&self) -> u64 {
        if self.contested {
            self.epoch.saturating_add(1)
        } else {
            self.epoch
        }
    }
}

/// Groups claims by workload, each group sorted by replica, one entry per replica.
fn resolve_claims(current: &[Claim]) -> HashMap<&str, Vec<ReplicaHistory<'_>>> {
    let mut sorted: Vec<&Claim> = current.iter().collect();
    sorted.sort_unstable_by(|a, b| {
        (&a.workload, a.replica, Reverse(a.epoch), &a.node).cmp(&(
            &b.workload,
            b.replica,
            Reverse(b.epoch),
            &b.node,
        ))
    });
    let mut out: HashMap<&str, Vec<ReplicaHistory<'_>>> = HashMap::new();
    for claim in sorted {
        let replicas = out.entry(claim.workload.as_str()).or_default();
        match replicas.last_mut() {
            // The first claim seen for a replica has the highest epoch; later ones only
            // matter if they tie with it on a different node.
            Some(last) if last.replica == claim.replica => {
                if claim.epoch == last.epoch && claim.node != last.owner {
                    last.contested = true;
                }
            }
            _ => replicas.push(ReplicaHistory {
                replica: claim.replica,
                owner: &claim.node,
                epoch: claim.epoch,
                contested: false,
            }),
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Capacity accounting.

/// A live node and what is still free on it in this run.
struct NodeState<'a> {
    spec: &'a NodeCapacity,
    free_cpu_millis: u64,
    free_memory_bytes: u64,
}

/// Load is measured in parts per million of capacity.
const PPM: u64 = 1_000_000;

impl<'a> NodeState<'a> {
    fn new(spec: &'a NodeCapacity) -> Self {
        NodeState {
            spec,
            free_cpu_millis: spec.cpu_millis,
            free_memory_bytes: spec.memory_bytes,
        }
    }

    /// The node has every label the workload's constraints ask for.
    fn matches(&self, workload: &WorkloadSpec) -> bool {
        workload
            .constraints
            .iter()
            .all(|(key, value)| self.spec.labels.get(key) == Some(value))
    }

    fn fits(&self, workload: &WorkloadSpec) -> bool {
        workload.cpu_millis <= self.free_cpu_millis
            && workload.memory_bytes <= self.free_memory_bytes
    }

    /// Accounts one replica. Callers check [`Self::fits`] first.
    fn take(&mut self, workload: &WorkloadSpec) {
        self.free_cpu_millis -= workload.cpu_millis;
        self.free_memory_bytes -= workload.memory_bytes;
    }

    /// The node's load if it took one more replica of `workload`: the larger of its CPU
    /// and memory shares, in ppm (the "dominant share"). A resource the node has none of
    /// counts as unloaded.
    fn load_ppm_after(&self, workload: &WorkloadSpec) -> u64 {
        fn share(capacity: u64, free: u64, request: u64) -> u64 {
            if capacity == 0 {
                return 0;
            }
            let used = u128::from(capacity - free) + u128::from(request);
            let ppm = used * u128::from(PPM) / u128::from(capacity);
            u64::try_from(ppm).unwrap_or(u64::MAX).min(PPM)
        }
        let cpu = share(
            self.spec.cpu_millis,
            self.free_cpu_millis,
            workload.cpu_millis,
        );
        let memory = share(
            self.spec.memory_bytes,
            self.free_memory_bytes,
            workload.memory_bytes,
        );
        cpu.max(memory)
    }
}

/// Index of the node with this id in the id-sorted node list.
fn find_node(nodes: &[NodeState<'_>], id: &str) -> Option<usize> {
    nodes
        .binary_search_by(|n| n.spec.node.as_str().cmp(id))
        .ok()
}

// ---------------------------------------------------------------------------------
// Choosing a node.

/// How attractive a node is for one new replica. Larger is better; fields are compared
/// in order, and the rendezvous hash breaks remaining ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Score {
    /// Spread: fewer replicas of this workload already on the node is better.
    /// Binpack: always equal, so it never decides.
    tier: Reverse<u32>,
    /// Within a tier, nodes listed in the workload's `preferred` set win.
    preferred: bool,
    /// Spread: the emptier the node would be, the better. Binpack: the fuller, the better.
    load: u64,
}

fn score(workload: &WorkloadSpec, node: &NodeState<'_>, replicas_here: u32) -> Score {
    let load_after = node.load_ppm_after(workload);
    let (tier, load) = match workload.strategy {
        Strategy::Spread => (replicas_here, PPM - load_after),
        Strategy::Binpack => (0, load_after),
    };
    Score {
        tier: Reverse(tier),
        preferred: workload.preferred.contains(&node.spec.node),
        load,
    }
}

/// The best candidate node with room for one more replica, if any.
fn choose_node(
    workload: &WorkloadSpec,
    replica: u32,
    candidates: &[usize],
    nodes: &[NodeState<'_>],
    replicas_on: &HashMap<usize, u32>,
) -> Option<usize> {
    struct Best {
        node: usize,
        score: Score,
        /// Computed only when another node ties on `score`.
        weight: Option<u64>,
    }
    let weight = |n: usize| replica_weight(&workload.id, replica, &nodes[n].spec.node);

    let mut best: Option<Best> = None;
    for &n in candidates {
        if !nodes[n].fits(workload) {
            continue;
        }
        let score = score(
            workload,
            &nodes[n],
            replicas_on.get(&n).copied().unwrap_or(0),
        );
        let Some(current) = best.as_mut() else {
            best = Some(Best {
                node: n,
                score,
                weight: None,
            });
            continue;
        };
        match score.cmp(&current.score) {
            Ordering::Less => {}
            Ordering::Greater => {
                *current = Best {
                    node: n,
                    score,
                    weight: None,
                }
            }
            Ordering::Equal => {
                let current_weight = *current.weight.get_or_insert_with(|| weight(current.node));
                let challenger = weight(n);
                // Candidates come in id order, so on an (astronomically unlikely) equal
                // weight the smaller id, already held, stays.
                if challenger > current_weight {
                    *current = Best {
                        node: n,
                        score,
                        weight: Some(challenger),
                    };
                }
            }
        }
    }
    best.map(|b| b.node)
}

/// Why no node could take a replica of `workload`, given the final accounting.
fn explain(workload: &WorkloadSpec, nodes: &[NodeState<'_>]) -> PendingReason {
    if nodes.is_empty() {
        return PendingReason::NoLiveNodes;
    }
    // The matching node that comes closest to fitting: the largest fraction of the
    // request it could cover in its scarcer resource, then the most free CPU, then the
    // most free memory, then the smallest id.
    let closest = nodes.iter().filter(|n| n.matches(workload)).max_by(|a, b| {
        compare_fractions(coverage(a, workload), coverage(b, workload))
            .then(a.free_cpu_millis.cmp(&b.free_cpu_millis))
            .then(a.free_memory_bytes.cmp(&b.free_memory_bytes))
            .then(b.spec.node.cmp(&a.spec.node))
    });
    match closest {
        None => PendingReason::NoNodeMatchesConstraints,
        Some(node) => PendingReason::InsufficientCapacity {
            needed_cpu_millis: workload.cpu_millis,
            needed_memory_bytes: workload.memory_bytes,
            largest_cpu_millis: node.free_cpu_millis,
            largest_memory_bytes: node.free_memory_bytes,
        },
    }
}

/// free / needed in the scarcer of the requested resources, as (numerator, denominator).
/// A resource the workload does not ask for is ignored; asking for nothing is full cover.
fn coverage(node: &NodeState<'_>, workload: &WorkloadSpec) -> (u64, u64) {
    [
        (node.free_cpu_millis, workload.cpu_millis),
        (node.free_memory_bytes, workload.memory_bytes),
    ]
    .into_iter()
    .filter(|&(_, needed)| needed > 0)
    .min_by(|&a, &b| compare_fractions(a, b))
    .unwrap_or((1, 1))
}

/// Compares a/b with c/d exactly (denominators are non-zero).
fn compare_fractions((a, b): (u64, u64), (c, d): (u64, u64)) -> Ordering {
    (u128::from(a) * u128::from(d)).cmp(&(u128::from(c) * u128::from(b)))
}

// ---------------------------------------------------------------------------------
// Rendezvous hashing.
//
// The domain strings and the encoding are part of the protocol: every node must use the
// same ones, so changing them moves placements cluster-wide on upgrade.

const REPLICA_DOMAIN: &[u8] = b"meshwork/placement/replica/v1";
const COORDINATOR_DOMAIN: &[u8] = b"meshwork/placement/coordinator/v1";

/// Appends a length-prefixed field, so that ("ab", "c") and ("a", "bc") hash differently.
fn hash_field(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

fn weight_of(hasher: &blake3::Hasher) -> u64 {
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Rendezvous weight of `node` for one replica of a workload.
fn replica_weight(workload: &str, replica: u32, node: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hash_field(&mut hasher, REPLICA_DOMAIN);
    hash_field(&mut hasher, workload.as_bytes());
    hash_field(&mut hasher, &replica.to_le_bytes());
    hash_field(&mut hasher, node.as_bytes());
    weight_of(&hasher)
}

/// Rendezvous weight of `node` as coordinator of a workload.
fn coordinator_weight(workload: &str, node: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hash_field(&mut hasher, COORDINATOR_DOMAIN);
    hash_field(&mut hasher, workload.as_bytes());
    hash_field(&mut hasher, node.as_bytes());
    weight_of(&hasher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{
        Just, ProptestConfig, any, prop, prop_assert, prop_assert_eq, proptest,
    };
    use proptest::strategy::Strategy as _;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn node(id: &str, cpu_millis: u64, memory_bytes: u64) -> NodeCapacity {
        NodeCapacity {
            node: id.to_owned(),
            cpu_millis,
            memory_bytes,
            labels: BTreeMap::new(),
        }
    }

    fn labelled(
        id: &str,
        cpu_millis: u64,
        memory_bytes: u64,
        labels: &[(&str, &str)],
    ) -> NodeCapacity {
        NodeCapacity {
            labels: labels
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..node(id, cpu_millis, memory_bytes)
        }
    }

    fn workload(id: &str, replicas: u32, cpu_millis: u64, memory_bytes: u64) -> WorkloadSpec {
        WorkloadSpec {
            id: id.to_owned(),
            replicas,
            cpu_millis,
            memory_bytes,
            constraints: BTreeMap::new(),
            strategy: Strategy::Spread,
            priority: 0,
            preferred: BTreeSet::new(),
        }
    }

    fn claim(workload: &str, replica: u32, node: &str, epoch: u64) -> Claim {
        Claim {
            workload: workload.to_owned(),
            replica,
            node: node.to_owned(),
            epoch,
        }
    }

    /// Node id of each replica of `workload`, in replica order.
    fn owners<'a>(table: &'a PlacementTable, workload: &str) -> Vec<&'a str> {
        table
            .claims
            .iter()
            .filter(|c| c.workload == workload)
            .map(|c| c.node.as_str())
            .collect()
    }

    /// CPU and memory used on each node by a set of claims.
    fn usage(workloads: &[WorkloadSpec], claims: &[Claim]) -> BTreeMap<String, (u128, u128)> {
        let mut used: BTreeMap<String, (u128, u128)> = BTreeMap::new();
        for c in claims {
            let w = workloads
                .iter()
                .find(|w| w.id == c.workload)
                .expect("claim of a known workload");
            let entry = used.entry(c.node.clone()).or_default();
            entry.0 += u128::from(w.cpu_millis);
            entry.1 += u128::from(w.memory_bytes);
        }
        used
    }

    // ------------------------------------------------------------------ unit tests

    #[test]
    fn places_every_replica_when_there_is_room() {
        let nodes = [node("a", 4000, 8 * GIB), node("b", 4000, 8 * GIB)];
        let table = place(&[workload("web", 3, 500, 256 * MIB)], &nodes, &[]);
        assert_eq!(table.claims.len(), 3);
        assert!(table.pending.is_empty());
        assert_eq!(
            table.claims.iter().map(|c| c.replica).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(table.claims.iter().all(|c| c.epoch == 1));
    }

    #[test]
    fn output_is_sorted_by_workload_then_replica() {
        let nodes = [node("a", 100_000, 100 * GIB)];
        let mut high = workload("zeta", 2, 10, MIB);
        high.priority = 10;
        let table = place(&[high, workload("alpha", 2, 10, MIB)], &nodes, &[]);
        let keys: Vec<_> = table
            .claims
            .iter()
            .map(|c| (c.workload.as_str(), c.replica))
            .collect();
        assert_eq!(keys, [("alpha", 0), ("alpha", 1), ("zeta", 0), ("zeta", 1)]);
    }

    #[test]
    fn input_order_does_not_matter() {
        let workloads = vec![
            workload("a", 3, 300, MIB),
            workload("b", 2, 700, MIB),
            workload("c", 4, 100, GIB),
        ];
        let nodes = vec![
            node("n1", 1000, 4 * GIB),
            node("n2", 2000, 2 * GIB),
            node("n3", 1500, 3 * GIB),
        ];
        let current = vec![
            claim("a", 0, "n2", 4),
            claim("b", 1, "n1", 2),
            claim("c", 3, "n3", 1),
        ];
        let expected = place(&workloads, &nodes, &current);
        let mut w = workloads.clone();
        let mut n = nodes.clone();
        let mut c = current.clone();
        w.reverse();
        n.rotate_left(1);
        c.reverse();
        assert_eq!(place(&w, &n, &c), expected);
    }

    #[test]
    fn duplicate_claims_keep_the_highest_epoch() {
        let nodes = [node("a", 1000, GIB), node("b", 1000, GIB)];
        let current = [
            claim("w", 0, "a", 3),
            claim("w", 0, "b", 7),
            claim("w", 0, "a", 5),
        ];
        let table = place(&[workload("w", 1, 100, MIB)], &nodes, &current);
        assert_eq!(table.claims, [claim("w", 0, "b", 7)]);
    }

    #[test]
    fn duplicate_claims_with_equal_epochs_go_to_the_smaller_node_id_and_are_refenced() {
        let nodes = [node("a", 1000, GIB), node("b", 1000, GIB)];
        let current = [claim("w", 0, "b", 4), claim("w", 0, "a", 4)];
        let table = place(&[workload("w", 1, 100, MIB)], &nodes, &current);
        // "a" wins the tie; the epoch rises so that "b", which also believed it owned
        // epoch 4, is fenced off.
        assert_eq!(table.claims, [claim("w", 0, "a", 5)]);
        // An exact duplicate (same node, same epoch) is not a conflict.
        let current = [claim("w", 0, "a", 4), claim("w", 0, "a", 4)];
        let table = place(&[workload("w", 1, 100, MIB)], &nodes, &current);
        assert_eq!(table.claims, [claim("w", 0, "a", 4)]);
    }

    #[test]
    fn duplicate_ids_in_inputs_resolve_deterministically() {
        let mut small = workload("w", 1, 100, MIB);
        small.priority = 1;
        let big = workload("w", 5, 100, MIB);
        let nodes_one = [node("a", 1000, GIB), node("a", 500, GIB)];
        let nodes_two = [node("a", 500, GIB), node("a", 1000, GIB)];
        let one = place(&[small.clone(), big.clone()], &nodes_one, &[]);
        let two = place(&[big, small], &nodes_two, &[]);
        assert_eq!(one, two);
        // The higher-priority spec wins.
        assert_eq!(one.claims.len(), 1);
    }

    #[test]
    fn valid_claims_stay_put_with_their_epoch() {
        let nodes = [
            node("a", 1000, GIB),
            node("b", 1000, GIB),
            node("c", 1000, GIB),
        ];
        let current = [claim("w", 0, "c", 9), claim("w", 1, "c", 2)];
        let table = place(&[workload("w", 2, 100, MIB)], &nodes, &current);
        // Sticky beats spread: both stay on "c" although "a" and "b" are empty.
        assert_eq!(table.claims, current);
    }

    #[test]
    fn a_departed_node_loses_only_its_replicas_and_they_get_a_higher_epoch() {
        let nodes = [
            node("a", 1000, GIB),
            node("b", 1000, GIB),
            node("c", 1000, GIB),
        ];
        let current = [
            claim("w", 0, "a", 3),
            claim("w", 1, "gone", 6),
            claim("w", 2, "c", 1),
        ];
        let table = place(&[workload("w", 3, 100, MIB)], &nodes, &current);
        assert_eq!(table.claim("w", 0), Some(&claim("w", 0, "a", 3)));
        assert_eq!(table.claim("w", 2), Some(&claim("w", 2, "c", 1)));
        // Spread: the moved replica goes to the only node without one.
        assert_eq!(table.claim("w", 1), Some(&claim("w", 1, "b", 7)));
    }

    #[test]
    fn a_claim_that_no_longer_matches_constraints_moves() {
        let nodes = [
            labelled("a", 1000, GIB, &[("zone", "x")]),
            labelled("b", 1000, GIB, &[("zone", "y")]),
        ];
        let mut w = workload("w", 1, 100, MIB);
        w.constraints.insert("zone".into(), "y".into());
        let table = place(&[w], &nodes, &[claim("w", 0, "a", 2)]);
        assert_eq!(table.claims, [claim("w", 0, "b", 3)]);
    }

    #[test]
    fn a_claim_that_no_longer_fits_moves() {
        // The workload grew; "a" can no longer hold it.
        let nodes = [node("a", 1000, GIB), node("b", 4000, GIB)];
        let table = place(
            &[workload("w", 1, 2000, MIB)],
            &nodes,
            &[claim("w", 0, "a", 1)],
        );
        assert_eq!(table.claims, [claim("w", 0, "b", 2)]);
    }

    #[test]
    fn kept_claims_are_accounted_before_new_replicas_even_of_higher_priority() {
        let nodes = [node("a", 1000, GIB)];
        let mut urgent = workload("urgent", 1, 1000, MIB);
        urgent.priority = 100;
        let table = place(
            &[urgent, workload("old", 1, 1000, MIB)],
            &nodes,
            &[claim("old", 0, "a", 1)],
        );
        assert_eq!(table.claims, [claim("old", 0, "a", 1)]);
        assert_eq!(table.pending.len(), 1);
        assert_eq!(table.pending[0].workload, "urgent");
    }

    #[test]
    fn a_joining_node_moves_nothing() {
        let workloads = [workload("w", 4, 300, MIB), workload("v", 2, 200, MIB)];
        let nodes = vec![node("a", 1000, GIB), node("b", 1000, GIB)];
        let before = place(&workloads, &nodes, &[]);
        let mut grown = nodes.clone();
        grown.push(node("c", 8000, 8 * GIB));
        let after = place(&workloads, &grown, &before.claims);
        assert_eq!(after.claims, before.claims);
    }

    #[test]
    fn constraints_restrict_the_nodes() {
        let nodes = [
            labelled("a", 8000, 8 * GIB, &[("disk", "hdd")]),
            labelled("b", 8000, 8 * GIB, &[("disk", "ssd"), ("zone", "x")]),
            labelled("c", 8000, 8 * GIB, &[("disk", "ssd"), ("zone", "y")]),
        ];
        let mut w = workload("db", 4, 100, MIB);
        w.constraints.insert("disk".into(), "ssd".into());
        let table = place(&[w], &nodes, &[]);
        assert_eq!(table.claims.len(), 4);
        assert!(table.claims.iter().all(|c| c.node == "b" || c.node == "c"));
    }

    #[test]
    fn spread_puts_replicas_on_distinct_nodes_then_evens_them_out() {
        let nodes = [
            node("a", 8000, 8 * GIB),
            node("b", 8000, 8 * GIB),
            node("c", 8000, 8 * GIB),
        ];
        let table = place(&[workload("w", 3, 100, MIB)], &nodes, &[]);
        let mut on: Vec<_> = owners(&table, "w");
        on.sort_unstable();
        assert_eq!(on, ["a", "b", "c"]);
        let table = place(&[workload("w", 6, 100, MIB)], &nodes, &[]);
        for n in ["a", "b", "c"] {
            assert_eq!(table.claims_on(n).count(), 2);
        }
    }

    #[test]
    fn spread_prefers_the_least_loaded_node() {
        let nodes = [node("a", 1000, GIB), node("b", 1000, GIB)];
        let busy = workload("busy", 1, 800, MIB);
        let table = place(
            &[busy, workload("w", 1, 100, MIB)],
            &nodes,
            &[claim("busy", 0, "a", 1)],
        );
        assert_eq!(owners(&table, "w"), ["b"]);
    }

    #[test]
    fn binpack_fills_the_most_loaded_node_that_fits() {
        let nodes = [
            node("a", 1000, GIB),
            node("b", 1000, GIB),
            node("c", 1000, GIB),
        ];
        let mut w = workload("w", 4, 250, MIB);
        w.strategy = Strategy::Binpack;
        let table = place(&[w.clone()], &nodes, &[]);
        let first = table.claims[0].node.clone();
        assert!(table.claims.iter().all(|c| c.node == first), "{table:?}");
        // One more replica than fits on a node spills to a second one.
        w.replicas = 5;
        let table = place(&[w], &nodes, &[]);
        assert_eq!(table.claims_on(&first).count(), 4);
        // And with an existing load, binpack picks the fuller node.
        let mut small = workload("small", 1, 100, MIB);
        small.strategy = Strategy::Binpack;
        let table = place(
            &[workload("busy", 1, 600, MIB), small],
            &nodes,
            &[claim("busy", 0, "b", 1)],
        );
        assert_eq!(owners(&table, "small"), ["b"]);
    }

    #[test]
    fn preferred_nodes_win_within_the_same_tier_only() {
        let nodes = [
            node("a", 1000, GIB),
            node("b", 1000, GIB),
            node("c", 1000, GIB),
        ];
        let mut w = workload("w", 1, 100, MIB);
        w.preferred.insert("c".into());
        assert_eq!(owners(&place(&[w.clone()], &nodes, &[]), "w"), ["c"]);
        // Preferred beats a less-loaded node ...
        let loaded = place(
            &[workload("busy", 1, 500, MIB), w.clone()],
            &nodes,
            &[claim("busy", 0, "c", 1)],
        );
        assert_eq!(owners(&loaded, "w"), ["c"]);
        // ... but not the spread tier: the second replica leaves "c".
        w.replicas = 2;
        let table = place(&[w.clone()], &nodes, &[]);
        assert_eq!(owners(&table, "w")[0], "c");
        assert_ne!(owners(&table, "w")[1], "c");
        // Binpack: preferred wins too.
        w.replicas = 1;
        w.strategy = Strategy::Binpack;
        let mut busy = workload("busy", 1, 500, MIB);
        busy.strategy = Strategy::Binpack;
        let table = place(&[busy, w], &nodes, &[claim("busy", 0, "a", 1)]);
        assert_eq!(owners(&table, "w"), ["c"]);
    }

    #[test]
    fn rendezvous_hashing_breaks_ties_evenly() {
        // Zero-request workloads leave every node tied on the score: only the hash
        // decides, and it must not pile them all onto one node.
        let nodes: Vec<_> = (0..10).map(|i| node(&format!("n{i}"), 1000, GIB)).collect();
        let workloads: Vec<_> = (0..200)
            .map(|i| workload(&format!("w{i}"), 1, 0, 0))
            .collect();
        let table = place(&workloads, &nodes, &[]);
        for n in &nodes {
            let count = table.claims_on(&n.node).count();
            assert!((5..=40).contains(&count), "{} got {count} of 200", n.node);
        }
        // The choice is the hash's, so it is the same for any node order.
        let mut reversed = nodes.clone();
        reversed.reverse();
        assert_eq!(place(&workloads, &reversed, &[]), table);
    }

    #[test]
    fn higher_priority_workloads_get_capacity_first() {
        let nodes = [node("a", 1000, GIB)];
        let mut important = workload("zz-important", 1, 800, MIB);
        important.priority = 5;
        let table = place(&[workload("aa-batch", 1, 800, MIB), important], &nodes, &[]);
        assert_eq!(owners(&table, "zz-important"), ["a"]);
        assert_eq!(table.pending.len(), 1);
        assert_eq!(table.pending[0].workload, "aa-batch");
    }

    #[test]
    fn pending_reasons() {
        let w = workload("w", 2, 2000, 512 * MIB);
        let table = place(std::slice::from_ref(&w), &[], &[]);
        assert_eq!(table.pending.len(), 2);
        assert!(
            table
                .pending
                .iter()
                .all(|p| p.reason == PendingReason::NoLiveNodes)
        );

        let mut constrained = w.clone();
        constrained.constraints.insert("gpu".into(), "yes".into());
        let table = place(&[constrained], &[node("a", 8000, 8 * GIB)], &[]);
        assert_eq!(
            table.pending[0].reason,
            PendingReason::NoNodeMatchesConstraints
        );

        let nodes = [
            node("small", 1000, 4 * GIB),
            node("lopsided", 8000, 100 * MIB),
        ];
        let table = place(&[w], &nodes, &[]);
        assert!(table.claims.is_empty());
        let expected = PendingReason::InsufficientCapacity {
            needed_cpu_millis: 2000,
            needed_memory_bytes: 512 * MIB,
            largest_cpu_millis: 1000,
            largest_memory_bytes: 4 * GIB,
        };
        assert_eq!(
            table.pending[0],
            Pending {
                workload: "w".into(),
                replica: 0,
                reason: expected.clone()
            }
        );
        assert_eq!(table.pending[1].replica, 1);
    }

    #[test]
    fn pending_reason_reflects_the_final_accounting() {
        // One replica fits, the second does not; the reason reports what is left.
        let table = place(
            &[workload("w", 2, 600, GIB)],
            &[node("a", 1000, 2 * GIB)],
            &[],
        );
        assert_eq!(table.claims.len(), 1);
        assert_eq!(
            table.pending[0].reason,
            PendingReason::InsufficientCapacity {
                needed_cpu_millis: 600,
                needed_memory_bytes: GIB,
                largest_cpu_millis: 400,
                largest_memory_bytes: GIB,
            }
        );
    }

    #[test]
    fn pending_reasons_read_well() {
        let reason = PendingReason::InsufficientCapacity {
            needed_cpu_millis: 2000,
            needed_memory_bytes: 512 * MIB,
            largest_cpu_millis: 1000,
            largest_memory_bytes: 4 * GIB,
        };
        assert_eq!(
            reason.to_string(),
            "needs 2000m CPU and 512 MiB memory; the largest free node has 1000m CPU and 4 GiB memory"
        );
        assert_eq!(
            PendingReason::NoLiveNodes.to_string(),
            "no live nodes to place it on"
        );
        assert_eq!(
            PendingReason::NoNodeMatchesConstraints.to_string(),
            "no live node has the labels its constraints require"
        );
        assert_eq!(ByteSize(0).to_string(), "0 B");
        assert_eq!(ByteSize(1536).to_string(), "1.5 KiB");
        assert_eq!(ByteSize(3 * GIB / 2).to_string(), "1.5 GiB");
        assert_eq!(ByteSize(2 << 40).to_string(), "2 TiB");
    }

    #[test]
    fn scaling_down_drops_the_highest_replicas() {
        let nodes = [node("a", 8000, 8 * GIB), node("b", 8000, 8 * GIB)];
        let before = place(&[workload("w", 5, 100, MIB)], &nodes, &[]);
        let after = place(&[workload("w", 2, 100, MIB)], &nodes, &before.claims);
        assert_eq!(after.claims, before.claims[..2]);
        assert!(after.pending.is_empty());
        // A workload that is gone loses all its claims.
        assert_eq!(
            place(&[], &nodes, &before.claims),
            PlacementTable::default()
        );
    }

    #[test]
    fn new_replicas_start_at_epoch_one_and_replaced_ones_go_above_the_highest_seen() {
        let nodes = [node("a", 8000, 8 * GIB)];
        let current = [claim("w", 0, "gone", 3), claim("w", 0, "also-gone", 8)];
        let table = place(&[workload("w", 2, 100, MIB)], &nodes, &current);
        assert_eq!(table.claims, [claim("w", 0, "a", 9), claim("w", 1, "a", 1)]);
    }

    #[test]
    fn tables_round_trip_through_serde() {
        let mut w = workload("w", 3, 2000, GIB);
        w.constraints.insert("zone".into(), "x".into());
        let nodes = [labelled("a", 2000, 2 * GIB, &[("zone", "x")])];
        let table = place(&[w.clone()], &nodes, &[]);
        let json = serde_json::to_string(&table).expect("serialize");
        assert_eq!(
            serde_json::from_str::<PlacementTable>(&json).expect("deserialize"),
            table
        );
        let json = serde_json::to_string(&w).expect("serialize");
        assert_eq!(
            serde_json::from_str::<WorkloadSpec>(&json).expect("deserialize"),
            w
        );
    }

    #[test]
    fn coordinator_is_stable() {
        assert_eq!(coordinator("w", &[]), None);
        let nodes: Vec<NodeCapacity> = (0..12)
            .map(|i| node(&format!("peer-{i}"), 1000, GIB))
            .collect();
        for workload_id in ["alpha", "beta", "gamma", "delta", "svc/web"] {
            let chosen = coordinator(workload_id, &nodes)
                .expect("nodes exist")
                .clone();
            let mut permuted = nodes.clone();
            permuted.reverse();
            permuted.rotate_left(5);
            assert_eq!(coordinator(workload_id, &permuted), Some(&chosen));
            // Any non-coordinator leaving changes nothing.
            for leaving in nodes.iter().filter(|n| n.node != chosen) {
                let rest: Vec<_> = nodes
                    .iter()
                    .filter(|n| n.node != leaving.node)
                    .cloned()
                    .collect();
                assert_eq!(coordinator(workload_id, &rest), Some(&chosen));
            }
            // The coordinator leaving hands over to someone else.
            let rest: Vec<_> = nodes.iter().filter(|n| n.node != chosen).cloned().collect();
            assert_ne!(coordinator(workload_id, &rest), Some(&chosen));
        }
        // Different workloads do not all land on one coordinator.
        let distinct: BTreeSet<_> = (0..50)
            .filter_map(|i| coordinator(&format!("w{i}"), &nodes))
            .collect();
        assert!(distinct.len() > 3, "{distinct:?}");
    }

    #[test]
    fn places_a_thousand_workloads_on_a_thousand_nodes() {
        let nodes: Vec<_> = (0..1000)
            .map(|i| node(&format!("node-{i:04}"), 4000, 16 * GIB))
            .collect();
        let workloads: Vec<_> = (0..1000)
            .map(|i| {
                let mut w = workload(&format!("w-{i:04}"), 1, 100 + (i % 7) * 100, 64 * MIB);
                if i % 3 == 0 {
                    w.strategy = Strategy::Binpack;
                }
                w
            })
            .collect();
        let table = place(&workloads, &nodes, &[]);
        assert_eq!(table.claims.len(), 1000);
        // And the steady state, where everything is kept.
        let again = place(&workloads, &nodes, &table.claims);
        assert_eq!(again, table);
    }

    // ------------------------------------------------------------ property tests

    /// A random scenario: workloads, live nodes and (messy) current claims.
    #[derive(Debug, Clone)]
    struct Scenario {
        workloads: Vec<WorkloadSpec>,
        nodes: Vec<NodeCapacity>,
        current: Vec<Claim>,
    }

    const ZONES: [&str; 3] = ["x", "y", "z"];

    fn arb_nodes() -> impl proptest::strategy::Strategy<Value = Vec<NodeCapacity>> {
        prop::collection::vec((0u64..=8, 0u64..=8, 0usize..3, any::<bool>()), 1..30).prop_map(
            |params| {
                params
                    .into_iter()
                    .enumerate()
                    .map(|(i, (cpu, mem, zone, ssd))| {
                        let disk = if ssd { "ssd" } else { "hdd" };
                        labelled(
                            &format!("n{i}"),
                            cpu * 500,
                            mem * 512 * MIB,
                            &[("zone", ZONES[zone]), ("disk", disk)],
                        )
                    })
                    .collect()
            },
        )
    }

    fn arb_workloads() -> impl proptest::strategy::Strategy<Value = Vec<WorkloadSpec>> {
        let one = (
            0u32..=6,
            0u64..=6,
            0u64..=6,
            prop::option::of(0usize..3),
            any::<bool>(),
            -2i32..=2,
            prop::collection::btree_set(0usize..32, 0..3),
        );
        prop::collection::vec(one, 0..20).prop_map(|params| {
            params
                .into_iter()
                .enumerate()
                .map(
                    |(i, (replicas, cpu, mem, zone, binpack, priority, preferred))| {
                        let mut w =
                            workload(&format!("w{i}"), replicas, cpu * 250, mem * 256 * MIB);
                        if let Some(zone) = zone {
                            w.constraints.insert("zone".into(), ZONES[zone].into());
                        }
                        w.strategy = if binpack {
                            Strategy::Binpack
                        } else {
                            Strategy::Spread
                        };
                        w.priority = priority;
                        w.preferred = preferred.into_iter().map(|n| format!("n{n}")).collect();
                        w
                    },
                )
                .collect()
        })
    }

    /// Claims that look like what gossip delivers: some valid, some on dead nodes
    /// (ids up to n34 while nodes stop at n29), some for unknown workloads or replicas,
    /// duplicates with equal or different epochs.
    fn arb_claims() -> impl proptest::strategy::Strategy<Value = Vec<Claim>> {
        prop::collection::vec((0usize..22, 0u32..8, 0usize..35, 0u64..5), 0..60).prop_map(
            |params| {
                params
                    .into_iter()
                    .map(|(w, replica, n, epoch)| {
                        claim(&format!("w{w}"), replica, &format!("n{n}"), epoch)
                    })
                    .collect()
            },
        )
    }

    fn arb_scenario() -> impl proptest::strategy::Strategy<Value = Scenario> {
        (arb_workloads(), arb_nodes(), arb_claims()).prop_map(|(workloads, nodes, current)| {
            Scenario {
                workloads,
                nodes,
                current,
            }
        })
    }

    fn run(s: &Scenario) -> PlacementTable {
        place(&s.workloads, &s.nodes, &s.current)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn capacity_is_never_exceeded(s in arb_scenario()) {
            let table = run(&s);
            for (node_id, (cpu, mem)) in usage(&s.workloads, &table.claims) {
                let n = s.nodes.iter().find(|n| n.node == node_id);
                prop_assert!(n.is_some(), "claim on a dead node {node_id}");
                let n = n.unwrap();
                prop_assert!(
                    cpu <= u128::from(n.cpu_millis),
                    "{node_id}: cpu {cpu} > {}", n.cpu_millis
                );
                prop_assert!(
                    mem <= u128::from(n.memory_bytes),
                    "{node_id}: memory {mem} > {}", n.memory_bytes
                );
            }
            // Claims also respect constraints.
            for c in &table.claims {
                let w = s.workloads.iter().find(|w| w.id == c.workload).unwrap();
                let n = s.nodes.iter().find(|n| n.node == c.node).unwrap();
                prop_assert!(w.constraints.iter().all(|(k, v)| n.labels.get(k) == Some(v)));
            }
        }

        #[test]
        fn every_replica_is_claimed_once_or_pending(s in arb_scenario()) {
            let table = run(&s);
            let mut seen: BTreeMap<(String, u32), usize> = BTreeMap::new();
            for key in table.claims.iter().map(|c| (c.workload.clone(), c.replica))
                .chain(table.pending.iter().map(|p| (p.workload.clone(), p.replica)))
            {
                *seen.entry(key).or_default() += 1;
            }
            let wanted: BTreeMap<(String, u32), usize> = s.workloads.iter()
                .flat_map(|w| (0..w.replicas).map(move |r| ((w.id.clone(), r), 1)))
                .collect();
            prop_assert_eq!(seen, wanted);
            let claims_sorted = table
                .claims
                .is_sorted_by(|a, b| (&a.workload, a.replica) < (&b.workload, b.replica));
            let pending_sorted = table
                .pending
                .is_sorted_by(|a, b| (&a.workload, a.replica) < (&b.workload, b.replica));
            prop_assert!(claims_sorted && pending_sorted);
        }

        #[test]
        fn permuting_the_inputs_gives_the_identical_table(
            (s, permuted) in arb_scenario().prop_flat_map(|s| {
                let shuffled = (
                    Just(s.workloads.clone()).prop_shuffle(),
                    Just(s.nodes.clone()).prop_shuffle(),
                    Just(s.current.clone()).prop_shuffle(),
                ).prop_map(|(workloads, nodes, current)| Scenario { workloads, nodes, current });
                (Just(s), shuffled)
            })
        ) {
            prop_assert_eq!(run(&s), run(&permuted));
        }

        #[test]
        fn the_output_is_a_fixed_point(s in arb_scenario()) {
            let first = run(&s);
            let second = place(&s.workloads, &s.nodes, &first.claims);
            prop_assert_eq!(first, second);
        }

        #[test]
        fn a_joining_node_moves_no_claim(
            s in arb_scenario(),
            cpu in 0u64..=8000,
            mem in 0u64..=8,
            zone in 0usize..3,
        ) {
            let before = run(&s);
            let mut nodes = s.nodes.clone();
            nodes.push(labelled("joiner", cpu, mem * GIB, &[("zone", ZONES[zone])]));
            let after = place(&s.workloads, &nodes, &before.claims);
            for c in &before.claims {
                prop_assert_eq!(after.claim(&c.workload, c.replica), Some(c));
            }
        }

        #[test]
        fn a_leaving_node_moves_only_its_claims(
            s in arb_scenario(),
            leaver in any::<prop::sample::Index>(),
        ) {
            let before = run(&s);
            let gone = s.nodes[leaver.index(s.nodes.len())].node.clone();
            let nodes: Vec<_> = s.nodes.iter().filter(|n| n.node != gone).cloned().collect();
            let after = place(&s.workloads, &nodes, &before.claims);
            for c in &before.claims {
                let now = after.claim(&c.workload, c.replica);
                if c.node == gone {
                    if let Some(now) = now {
                        prop_assert!(now.node != gone && now.epoch > c.epoch);
                    }
                } else {
                    prop_assert_eq!(now, Some(c));
                }
            }
        }

        #[test]
        fn a_change_of_owner_raises_the_epoch(s in arb_scenario()) {
            let table = run(&s);
            for c in &table.claims {
                let history: Vec<&Claim> = s.current.iter()
                    .filter(|p| p.workload == c.workload && p.replica == c.replica)
                    .collect();
                let Some(highest) = history.iter().map(|p| p.epoch).max() else {
                    prop_assert_eq!(c.epoch, 1);
                    continue;
                };
                prop_assert!(c.epoch >= highest);
                // Anyone else who ever claimed this replica holds a strictly lower epoch.
                for p in history.iter().filter(|p| p.node != c.node) {
                    prop_assert!(c.epoch > p.epoch, "{c:?} vs {p:?}");
                }
            }
        }

        #[test]
        fn spread_never_doubles_up_when_there_is_room(
            node_count in 1usize..30,
            replicas in prop::collection::vec(0u32..30, 0..20),
            preferred in prop::collection::btree_set(0usize..30, 0..5),
        ) {
            let nodes: Vec<_> = (0..node_count)
                .map(|i| node(&format!("n{i}"), 1_000_000, 1 << 50))
                .collect();
            let workloads: Vec<_> = replicas.iter().enumerate().map(|(i, &r)| {
                let mut w = workload(&format!("w{i}"), r.min(node_count as u32), 100, MIB);
                w.preferred = preferred.iter().map(|n| format!("n{n}")).collect();
                w
            }).collect();
            let table = place(&workloads, &nodes, &[]);
            prop_assert!(table.pending.is_empty());
            for w in &workloads {
                let on = owners(&table, &w.id);
                let distinct: BTreeSet<_> = on.iter().collect();
                prop_assert_eq!(distinct.len(), on.len(), "{} doubled up: {:?}", w.id, on);
            }
        }
    }
}
