//! Who is in the mesh and whether they are alive, as plain data with no I/O.
//!
//! Every node publishes a [`Heartbeat`] every [`FailureDetector::interval`] over gossipsub. The
//! [`MembershipTable`] keeps the newest heartbeat of each member (ordered by the sender's
//! incarnation, then sequence number, so a stale or replayed one never overwrites a newer one)
//! and judges each member by the time since it was last heard from:
//! alive → suspect after `suspect_after`, → dead after `dead_after`, and back to alive the
//! moment a newer heartbeat arrives (a restarted node comes back with a higher incarnation).
//!
//! Heartbeats travel through the gossipsub mesh over several paths and flood-publish sends each
//! one to every connected member directly, so losing one packet on one link does not lose the
//! heartbeat; `dead_after` spans eight intervals, which makes a false death under 10 % random
//! loss vanishingly unlikely, while a killed node is declared dead in about four seconds.
//! Time is passed in, so the table is tested without clocks or sockets.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// CPU and memory, in the units placement uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Thousandths of a CPU core.
    pub cpu_millis: u64,
    /// Bytes of memory.
    pub memory_bytes: u64,
}

/// What a node says about itself, several times a second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender's libp2p peer id; must match the gossip message's signed author.
    pub peer_id: String,
    /// Human name (`--name`, default the host name).
    pub name: String,
    /// Start time of the sender's process in ms since the epoch; a restart raises it.
    pub incarnation: u64,
    /// Counter within an incarnation.
    pub seq: u64,
    /// Multiaddrs the sender listens on.
    pub addrs: Vec<String>,
    /// Labels (`--label K=V`).
    pub labels: BTreeMap<String, String>,
    /// Schedulable capacity.
    pub total: Resources,
    /// Capacity taken by the workloads it runs.
    pub allocated: Resources,
    /// Free bytes on the disk of the data dir.
    pub disk_free_bytes: u64,
    /// Number of workloads it runs.
    pub workloads: u32,
    /// meshd version.
    pub version: String,
    /// TCP port of its direct blob connections on the hosts of `addrs` (0: it takes none).
    pub blob_port: u16,
}

impl Heartbeat {
    /// Decodes a heartbeat off the wire (postcard), also in the form nodes sent before the
    /// blob port was added (as port 0: no direct blob connections), so that a cluster can be
    /// upgraded one node at a time. Older nodes read newer heartbeats already: postcard leaves
    /// trailing fields unread.
    pub fn decode(bytes: &[u8]) -> Option<Heartbeat> {
        postcard::from_bytes::<Heartbeat>(bytes).ok().or_else(|| {
            postcard::from_bytes::<HeartbeatBeforeBlobPort>(bytes)
                .ok()
                .map(Heartbeat::from)
        })
    }
}

/// [`Heartbeat`] without `blob_port`, as sent by nodes built before it.
#[derive(Serialize, Deserialize)]
struct HeartbeatBeforeBlobPort {
    peer_id: String,
    name: String,
    incarnation: u64,
    seq: u64,
    addrs: Vec<String>,
    labels: BTreeMap<String, String>,
    total: Resources,
    allocated: Resources,
    disk_free_bytes: u64,
    workloads: u32,
    version: String,
}

impl From<HeartbeatBeforeBlobPort> for Heartbeat {
    fn from(h: HeartbeatBeforeBlobPort) -> Self {
        Heartbeat {
            peer_id: h.peer_id,
            name: h.name,
            incarnation: h.incarnation,
            seq: h.seq,
            addrs: h.addrs,
            labels: h.labels,
            total: h.total,
            allocated: h.allocated,
            disk_free_bytes: h.disk_free_bytes,
            workloads: h.workloads,
            version: h.version,
            blob_port: 0,
        }
    }
}

/// Failure-detector verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MemberState {
    /// Heard from recently.
    Alive,
    /// Silent for longer than `suspect_after`.
    Suspect,
    /// Silent for longer than `dead_after`.
    Dead,
}

impl MemberState {
    /// Lower-case name, as shown by `meshctl` and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
        }
    }
}

/// Timing of heartbeats and verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureDetector {
    /// How often each node publishes a heartbeat.
    pub interval: Duration,
    /// Silence after which a member is suspect.
    pub suspect_after: Duration,
    /// Silence after which a member is dead.
    pub dead_after: Duration,
}

impl Default for FailureDetector {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(500),
            suspect_after: Duration::from_millis(1750),
            dead_after: Duration::from_millis(4000),
        }
    }
}

/// One member as this node sees it.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its newest heartbeat.
    pub heartbeat: Heartbeat,
    /// The current verdict.
    pub state: MemberState,
    /// When its newest heartbeat arrived here.
    pub last_heard: Instant,
}

/// A verdict change, reported so the caller can log and count it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The member's peer id.
    pub peer_id: String,
    /// The member's name.
    pub name: String,
    /// Verdict before, `None` for a member seen for the first time.
    pub from: Option<MemberState>,
    /// Verdict now.
    pub to: MemberState,
}

/// The membership view of one node.
#[derive(Debug)]
pub struct MembershipTable {
    local: String,
    detector: FailureDetector,
    members: HashMap<String, Member>,
    version: u64,
}

impl MembershipTable {
    /// An empty table for the node `local` (its own heartbeats are recorded too, always alive).
    pub fn new(local: String, detector: FailureDetector) -> Self {
        Self {
            local,
            detector,
            members: HashMap::new(),
            version: 0,
        }
    }

    /// Bumped whenever a member appears, changes verdict or changes its addresses: what
    /// the gateway's cached replica endpoints depend on (see `gateway::proxy`).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The failure detector settings.
    pub fn detector(&self) -> FailureDetector {
        self.detector
    }

    /// Records a heartbeat received at `now`. Returns the verdict change, if any.
    /// An older heartbeat than the one held (by incarnation and sequence) is ignored.
    pub fn observe(&mut self, hb: Heartbeat, now: Instant) -> Option<Transition> {
        match self.members.get_mut(&hb.peer_id) {
            Some(m) => {
                if (hb.incarnation, hb.seq) <= (m.heartbeat.incarnation, m.heartbeat.seq) {
                    return None;
                }
                let from = m.state;
                if from != MemberState::Alive || m.heartbeat.addrs != hb.addrs {
                    self.version += 1;
                }
                m.heartbeat = hb;
                m.last_heard = now;
                m.state = MemberState::Alive;
                (from != MemberState::Alive).then(|| Transition {
                    peer_id: m.heartbeat.peer_id.clone(),
                    name: m.heartbeat.name.clone(),
                    from: Some(from),
                    to: MemberState::Alive,
                })
            }
            None => {
                let t = Transition {
                    peer_id: hb.peer_id.clone(),
                    name: hb.name.clone(),
                    from: None,
                    to: MemberState::Alive,
                };
                self.version += 1;
                self.members.insert(
                    hb.peer_id.clone(),
                    Member {
                        heartbeat: hb,
                        state: MemberState::Alive,
                        last_heard: now,
                    },
                );
                Some(t)
            }
        }
    }

    /// Re-judges every member at `now`; returns the verdicts that changed.
    pub fn tick(&mut self, now: Instant) -> Vec<Transition> {
        let mut out = Vec::new();
        for (id, m) in &mut self.members {
            if *id == self.local {
                continue;
            }
            let silent = now.saturating_duration_since(m.last_heard);
            let verdict = if silent >= self.detector.dead_after {
                MemberState::Dead
            } else if silent >= self.detector.suspect_after {
                MemberState::Suspect
            } else {
                MemberState::Alive
            };
            // Only silence moves a member down; only a heartbeat moves it up.
            if verdict > m.state {
                out.push(Transition {
                    peer_id: id.clone(),
                    name: m.heartbeat.name.clone(),
                    from: Some(m.state),
                    to: verdict,
                });
                m.state = verdict;
            }
        }
        if !out.is_empty() {
            self.version += 1;
        }
        out
    }

    /// A member by peer id.
    pub fn get(&self, peer_id: &str) -> Option<&Member> {
        self.members.get(peer_id)
    }

    /// All members, sorted by name then peer id.
    pub fn members(&self) -> Vec<&Member> {
        let mut v: Vec<_> = self.members.values().collect();
        v.sort_by(|a, b| {
            (&a.heartbeat.name, &a.heartbeat.peer_id)
                .cmp(&(&b.heartbeat.name, &b.heartbeat.peer_id))
        });
        v
    }

    /// Members in a given state, other than this node.
    pub fn peers_in(&self, state: MemberState) -> impl Iterator<Item = &Member> {
        let local = self.local.clone();
        self.members
            .values()
            .filter(move |m| m.state == state && m.heartbeat.peer_id != local)
    }

    /// Count of members per state, this node included.
    pub fn counts(&self) -> BTreeMap<MemberState, usize> {
        let mut c = BTreeMap::from([
            (MemberState::Alive, 0),
            (MemberState::Suspect, 0),
            (MemberState::Dead, 0),
        ]);
        for m in self.members.values() {
            *c.entry(m.state).or_default() += 1;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heartbeats_decode_with_and_without_the_blob_port() {
        let mut new = hb("p1", 3, 7);
        new.addrs = vec!["/ip4/10.0.0.2/tcp/7000".into()];
        new.blob_port = 7001;
        let bytes = postcard::to_allocvec(&new).unwrap();
        assert_eq!(Heartbeat::decode(&bytes), Some(new.clone()));
        // What a node built before the blob port sends: the same, without the last field.
        let old = HeartbeatBeforeBlobPort {
            peer_id: new.peer_id.clone(),
            name: new.name.clone(),
            incarnation: new.incarnation,
            seq: new.seq,
            addrs: new.addrs.clone(),
            labels: new.labels.clone(),
            total: new.total,
            allocated: new.allocated,
            disk_free_bytes: new.disk_free_bytes,
            workloads: new.workloads,
            version: new.version.clone(),
        };
        let old_bytes = postcard::to_allocvec(&old).unwrap();
        let decoded = Heartbeat::decode(&old_bytes).expect("an old heartbeat decodes");
        assert_eq!(decoded.blob_port, 0);
        assert_eq!(decoded.addrs, new.addrs);
        // An old node reading a new heartbeat reads every field it knows.
        let read_by_old: HeartbeatBeforeBlobPort = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(read_by_old.seq, 7);
        // Garbage is still garbage.
        assert_eq!(Heartbeat::decode(&[0xff; 8]), None);
        assert_eq!(Heartbeat::decode(&bytes[..bytes.len() / 2]), None);
    }

    fn hb(peer: &str, incarnation: u64, seq: u64) -> Heartbeat {
        Heartbeat {
            peer_id: peer.into(),
            name: peer.into(),
            incarnation,
            seq,
            addrs: vec![],
            labels: BTreeMap::new(),
            total: Resources::default(),
            allocated: Resources::default(),
            disk_free_bytes: 0,
            workloads: 0,
            version: "test".into(),
            blob_port: 0,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_version_moves_with_members_verdicts_and_addresses_only() {
        let t0 = Instant::now();
        let d = FailureDetector::default();
        let mut t = MembershipTable::new("me".into(), d);
        let v0 = t.version();
        t.observe(hb("b", 1, 1), t0);
        let v1 = t.version();
        assert!(v1 > v0, "a new member");
        t.observe(hb("b", 1, 2), t0 + ms(10));
        t.tick(t0 + ms(20));
        assert_eq!(
            t.version(),
            v1,
            "a heartbeat that changes nothing that matters"
        );
        let mut moved = hb("b", 1, 3);
        moved.addrs = vec!["/ip4/10.0.0.2/tcp/7000".into()];
        t.observe(moved, t0 + ms(30));
        let v2 = t.version();
        assert!(v2 > v1, "new addresses");
        t.tick(t0 + ms(30) + d.suspect_after);
        let v3 = t.version();
        assert!(v3 > v2, "suspect");
        let mut back = hb("b", 1, 4);
        back.addrs = vec!["/ip4/10.0.0.2/tcp/7000".into()];
        t.observe(back, t0 + ms(40) + d.suspect_after);
        assert!(t.version() > v3, "alive again");
    }

    #[test]
    fn silence_moves_alive_to_suspect_to_dead_and_heartbeat_revives() {
        let t0 = Instant::now();
        let mut t = MembershipTable::new("me".into(), FailureDetector::default());
        assert_eq!(t.observe(hb("b", 1, 1), t0).unwrap().from, None);
        assert!(t.tick(t0 + ms(1000)).is_empty());
        let s = t.tick(t0 + ms(1800));
        assert_eq!(s[0].to, MemberState::Suspect);
        let d = t.tick(t0 + ms(4100));
        assert_eq!(d[0].to, MemberState::Dead);
        assert!(t.tick(t0 + ms(9000)).is_empty(), "no repeated transitions");
        let back = t.observe(hb("b", 2, 1), t0 + ms(9000)).unwrap();
        assert_eq!(
            (back.from, back.to),
            (Some(MemberState::Dead), MemberState::Alive)
        );
    }

    #[test]
    fn stale_or_replayed_heartbeats_are_ignored() {
        let t0 = Instant::now();
        let mut t = MembershipTable::new("me".into(), FailureDetector::default());
        t.observe(hb("b", 5, 10), t0);
        t.tick(t0 + ms(5000));
        assert_eq!(t.get("b").unwrap().state, MemberState::Dead);
        // an old incarnation, or a replay, does not revive
        assert!(t.observe(hb("b", 4, 99), t0 + ms(5000)).is_none());
        assert!(t.observe(hb("b", 5, 10), t0 + ms(5000)).is_none());
        assert_eq!(t.get("b").unwrap().state, MemberState::Dead);
    }

    #[test]
    fn own_entry_never_dies() {
        let t0 = Instant::now();
        let mut t = MembershipTable::new("me".into(), FailureDetector::default());
        t.observe(hb("me", 1, 1), t0);
        assert!(t.tick(t0 + ms(60_000)).is_empty());
        assert_eq!(t.counts()[&MemberState::Alive], 1);
    }

    proptest! {
        /// With heartbeats every interval and at most 7 consecutive ones lost, a member is
        /// never declared dead; a member that goes silent is dead by dead_after.
        #[test]
        fn no_false_death_with_bounded_loss(lost in proptest::collection::vec(any::<bool>(), 1..400)) {
            let d = FailureDetector::default();
            let t0 = Instant::now();
            let mut t = MembershipTable::new("me".into(), d);
            t.observe(hb("b", 1, 0), t0);
            let mut run = 0;
            for (i, l) in lost.iter().enumerate() {
                let now = t0 + d.interval * (i as u32 + 1);
                // cap the run of losses at 7
                if *l && run < 7 { run += 1; } else { run = 0; t.observe(hb("b", 1, i as u64 + 1), now); }
                t.tick(now);
                prop_assert_ne!(t.get("b").unwrap().state, MemberState::Dead);
            }
            let end = t0 + d.interval * (lost.len() as u32 + 1);
            t.tick(end + d.dead_after);
            prop_assert_eq!(t.get("b").unwrap().state, MemberState::Dead);
        }
    }
}
