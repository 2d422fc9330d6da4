//! Mesh-wide throttling and daily quotas of API keys.
//!
//! **Rate.** Each node enforces, per key, a token bucket from the `governor` crate (GCRA) with
//! the plan's full burst and a *share* of the plan's rate: `rate × w`, where this node's weight
//! `w = FLOOR / n + (1 − FLOOR) × mine / total`. `mine` and `total` are the key's recent request
//! rates (attempts per second, smoothed) on this node and on all `n` serving nodes, which every
//! node publishes once a second in the replicated state (`gwuse/<peer id>`); a node that has
//! seen no traffic for the key gets `FLOOR / n` (or `1 / n` while nobody has any). Every node
//! computes the weights from the same published numbers, so they add up to 1 and the shares to
//! the plan's rate. When a weight moves by more than 10 % the bucket is rebuilt with the new
//! rate, keeping its fill level (rounded down), so a rebalance never adds tokens.
//!
//! **Bound.** Over any window of `T` seconds a node accepts at most `burst + ∫ rate × w dt`
//! requests of a key, so the mesh accepts at most `rate × T + nodes × burst`: the overshoot
//! over a single bucket is at most `(nodes − 1) × burst`. While a change of traffic is still
//! spreading (one publish period, about a second) nodes may briefly disagree on the weights;
//! each weight is still at most 1.
//!
//! **Quota.** Accepted requests are counted per key and UTC day; a node refuses a key whose
//! count on this node plus the counts other nodes last published reaches the plan's quota. The
//! other nodes' counts lag by at most a publish period plus propagation, so the quota can be
//! overshot by what the other nodes accept in that time: at most about
//! `rate × 1 s + (nodes − 1) × burst` beyond the quota, and exactly 0 while one node serves
//! the key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use super::keys::{ApiKey, Plan};
use crate::membership::MemberState;
use crate::node::NodeState;

const USAGE_PREFIX: &str = "gwuse/";
/// How often counters are published and shares rebalanced.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// The part of a plan's rate split evenly among the nodes, whatever their traffic.
pub const FLOOR: f64 = 0.2;
/// A weight change that rebuilds a bucket (relative).
const REBUILD_AT: f64 = 0.1;
/// Keys idle this long without a count today are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(120);

type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// The outcome of checking a request against a key's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Over the rate: retry after this many seconds.
    RateLimited(u64),
    /// Over the daily quota: retry after this many seconds (the next UTC day).
    QuotaExceeded(u64),
}

/// What a node publishes: per key, its recent rate and today's accepted count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Days since the epoch (UTC) of the counts.
    pub day: u64,
    /// Key name → (requests per second, smoothed; accepted today).
    pub keys: BTreeMap<String, (f64, u64)>,
}

struct Share {
    bucket: Bucket,
    plan_rate: f64,
    burst: u32,
    weight: f64,
    /// Burst capacity left after the last decision, and when.
    remaining: u32,
    at: Instant,
}

impl Share {
    fn rate(&self) -> f64 {
        self.plan_rate * self.weight
    }

    /// Tokens in the bucket now, rounded down.
    fn fill(&self) -> u32 {
        let refilled = self.at.elapsed().as_secs_f64() * self.rate();
        (f64::from(self.remaining) + refilled.floor()).min(f64::from(self.burst)) as u32
    }
}

fn bucket(rate: f64, burst: u32, fill: u32) -> Bucket {
    let period = Duration::from_secs_f64(1.0 / rate).max(Duration::from_nanos(1));
    let burst_nz = NonZeroU32::new(burst.max(1)).expect("at least 1");
    let quota = Quota::with_period(period)
        .expect("a period above zero")
        .allow_burst(burst_nz);
    let b = RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>();
    if let Some(used) = NonZeroU32::new(burst.saturating_sub(fill)) {
        let _ = b.check_n(used);
    }
    b
}

struct KeyState {
    attempts: u64,
    rps: f64,
    day: u64,
    accepted_today: u64,
    others_today: u64,
    weight: f64,
    share: Option<Share>,
    last_attempt: Instant,
}

#[derive(Default)]
struct Shared {
    keys: HashMap<String, KeyState>,
    /// From the last rebalance: serving nodes, and per key the total rate of the mesh.
    nodes: usize,
    totals: HashMap<String, f64>,
    /// Per key, today's accepted count on the other nodes.
    others: HashMap<String, u64>,
    published: Option<Vec<u8>>,
}

impl Shared {
    fn weight_for(&self, own: f64, total: f64) -> f64 {
        let n = self.nodes.max(1) as f64;
        if total > 0.0 {
            FLOOR / n + (1.0 - FLOOR) * own / total
        } else {
            1.0 / n
        }
    }
}

/// Throttling state of one node.
pub struct Limits {
    node: Arc<NodeState>,
    shared: Mutex<Shared>,
}

/// Days since the epoch, UTC.
pub fn today() -> u64 {
    crate::services::now_ms() / 86_400_000
}

fn seconds_to_midnight() -> u64 {
    let ms = crate::services::now_ms();
    (86_400_000 - ms % 86_400_000).div_ceil(1000).max(1)
}

fn round(rps: f64) -> f64 {
    (rps * 100.0).round() / 100.0
}

impl Limits {
    /// The limits of `node`; restores today's counts that this node published before a restart.
    pub fn new(node: Arc<NodeState>) -> Arc<Self> {
        let mut shared = Shared {
            nodes: serving_nodes(&node).len() + 1,
            ..Default::default()
        };
        let own = format!("{USAGE_PREFIX}{}", node.peer_id);
        let previous = {
            let replica = node.replica.lock().expect("replica lock");
            replica.map().get(&own).and_then(|e| e.value.clone())
        };
        if let Some(bytes) = previous {
            if let Ok(record) = serde_json::from_slice::<UsageRecord>(&bytes)
                && record.day == today()
            {
                for (name, (_, accepted)) in record.keys {
                    let mut st = KeyState::new(1.0);
                    st.day = record.day;
                    st.accepted_today = accepted;
                    shared.keys.insert(name, st);
                }
            }
            shared.published = Some(bytes);
        }
        Arc::new(Self {
            node,
            shared: Mutex::new(shared),
        })
    }

    /// Counts a request of `key` and decides whether it may go ahead under `plan`.
    pub fn check(&self, key: &ApiKey, plan: Option<&Plan>) -> Decision {
        let day = today();
        let mut shared = self.shared.lock().expect("limits lock");
        if !shared.keys.contains_key(&key.name) {
            let total = shared.totals.get(&key.name).copied().unwrap_or(0.0);
            let weight = shared.weight_for(0.0, total);
            let mut st = KeyState::new(weight);
            st.others_today = shared.others.get(&key.name).copied().unwrap_or(0);
            shared.keys.insert(key.name.clone(), st);
        }
        let st = shared.keys.get_mut(&key.name).expect("inserted");
        st.attempts += 1;
        st.last_attempt = Instant::now();
        if st.day != day {
            st.day = day;
            st.accepted_today = 0;
            st.others_today = 0;
        }
        let Some(plan) = plan else {
            st.accepted_today += 1;
            return Decision::Allow;
        };
        if plan.quota_per_day > 0 && st.accepted_today + st.others_today >= plan.quota_per_day {
            return Decision::QuotaExceeded(seconds_to_midnight());
        }
        let weight = st.weight;
        let stale = st.share.as_ref().is_none_or(|s| {
            s.plan_rate != plan.rate_per_second
                || s.burst != plan.burst
                || ((s.weight - weight).abs() / s.weight) > REBUILD_AT
        });
        if stale {
            let fill = st
                .share
                .as_ref()
                .map_or(plan.burst, |s| s.fill().min(plan.burst));
            st.share = Some(Share {
                bucket: bucket(plan.rate_per_second * weight, plan.burst, fill),
                plan_rate: plan.rate_per_second,
                burst: plan.burst,
                weight,
                remaining: fill,
                at: Instant::now(),
            });
        }
        let share = st.share.as_mut().expect("built");
        match share.bucket.check() {
            Ok(snapshot) => {
                share.remaining = snapshot.remaining_burst_capacity();
                share.at = Instant::now();
                st.accepted_today += 1;
                Decision::Allow
            }
            Err(not_until) => {
                share.remaining = 0;
                share.at = Instant::now();
                let wait = not_until.wait_time_from(share.bucket.clock().now());
                Decision::RateLimited((wait.as_secs_f64().ceil() as u64).max(1))
            }
        }
    }

    /// This node's current weight for a key (for tests and logs).
    pub fn weight(&self, name: &str) -> Option<f64> {
        let shared = self.shared.lock().expect("limits lock");
        shared.keys.get(name).map(|s| s.weight)
    }

    /// Once a second: smooths the rates, publishes this node's counters, reads the others'
    /// and recomputes the weights.
    pub fn tick(&self) {
        let day = today();
        let own_key = format!("{USAGE_PREFIX}{}", self.node.peer_id);
        let mut record = UsageRecord {
            day,
            keys: BTreeMap::new(),
        };
        let to_publish = {
            let mut shared = self.shared.lock().expect("limits lock");
            for (name, st) in shared.keys.iter_mut() {
                st.rps = round(0.5 * st.rps + 0.5 * st.attempts as f64);
                st.attempts = 0;
                if st.day != day {
                    st.day = day;
                    st.accepted_today = 0;
                    st.others_today = 0;
                }
                if st.rps > 0.0 || st.accepted_today > 0 {
                    record
                        .keys
                        .insert(name.clone(), (st.rps, st.accepted_today));
                }
            }
            let bytes = serde_json::to_vec(&record).expect("records serialize");
            let unchanged = match &shared.published {
                Some(p) => *p == bytes,
                None => record.keys.is_empty(),
            };
            if unchanged {
                None
            } else {
                shared.published = Some(bytes.clone());
                Some(bytes)
            }
        };
        if let Some(bytes) = to_publish
            && let Err(e) = self.node.write(&own_key, Some(bytes))
        {
            tracing::warn!(error = %e, "cannot publish gateway counters");
        }

        let serving = serving_nodes(&self.node);
        let mut totals: HashMap<String, f64> = HashMap::new();
        let mut others: HashMap<String, u64> = HashMap::new();
        {
            let replica = self.node.replica.lock().expect("replica lock");
            for e in replica.map().list(USAGE_PREFIX) {
                let peer = &e.key[USAGE_PREFIX.len()..];
                let Some(Ok(rec)) = e
                    .value
                    .as_deref()
                    .map(serde_json::from_slice::<UsageRecord>)
                else {
                    continue;
                };
                let mine = e.key == own_key;
                let counts_rate = mine || serving.contains(peer);
                for (name, (rps, accepted)) in &rec.keys {
                    if counts_rate {
                        *totals.entry(name.clone()).or_default() += rps;
                    }
                    if !mine && rec.day == day {
                        *others.entry(name.clone()).or_default() += accepted;
                    }
                }
            }
        }
        let mut shared = self.shared.lock().expect("limits lock");
        shared.nodes = serving.len() + 1;
        shared.totals = totals;
        let weights: Vec<(String, f64)> = shared
            .keys
            .keys()
            .map(|name| {
                let own = record.keys.get(name).map_or(0.0, |r| r.0);
                let total = shared.totals.get(name).copied().unwrap_or(0.0).max(own);
                (name.clone(), shared.weight_for(own, total))
            })
            .collect();
        for (name, w) in weights {
            let st = shared.keys.get_mut(&name).expect("listed");
            st.weight = w;
            st.others_today = others.get(&name).copied().unwrap_or(0);
        }
        shared.others = others;
        shared.keys.retain(|_, st| {
            st.last_attempt.elapsed() < FORGET_AFTER || st.accepted_today > 0 || st.others_today > 0
        });
    }

    /// Runs [`Limits::tick`] every [`PUBLISH_EVERY`] until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut every = tokio::time::interval(PUBLISH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.tick(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl KeyState {
    fn new(weight: f64) -> Self {
        Self {
            attempts: 0,
            rps: 0.0,
            day: today(),
            accepted_today: 0,
            others_today: 0,
            weight,
            share: None,
            last_attempt: Instant::now(),
        }
    }
}

/// Peer ids of the other nodes that may be serving (alive or suspect).
fn serving_nodes(node: &NodeState) -> HashSet<String> {
    let table = node.membership.read().expect("membership lock");
    table
        .peers_in(MemberState::Alive)
        .chain(table.peers_in(MemberState::Suspect))
        .map(|m| m.heartbeat.peer_id.clone())
        .collect()
}

/// Requests of a key accepted today on all nodes, as published (up to a second old).
pub fn used_today(node: &NodeState) -> HashMap<String, u64> {
    let day = today();
    let replica = node.replica.lock().expect("replica lock");
    let mut used: HashMap<String, u64> = HashMap::new();
    for e in replica.map().list(USAGE_PREFIX) {
        let Some(Ok(rec)) = e
            .value
            .as_deref()
            .map(serde_json::from_slice::<UsageRecord>)
        else {
            continue;
        };
        if rec.day != day {
            continue;
        }
        for (name, (_, accepted)) in rec.keys {
            *used.entry(name).or_default() += accepted;
        }
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_add_up_to_one() {
        let shared = Shared {
            nodes: 3,
            ..Default::default()
        };
        let rates = [6.0, 3.0, 1.0];
        let total: f64 = rates.iter().sum();
        let sum: f64 = rates.iter().map(|r| shared.weight_for(*r, total)).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
        assert!((shared.weight_for(0.0, 0.0) - 1.0 / 3.0).abs() < 1e-9);
        assert!(shared.weight_for(0.0, 10.0) >= FLOOR / 3.0);
    }

    #[test]
    fn a_bucket_keeps_its_fill_when_rebuilt() {
        let b = bucket(1.0, 10, 3);
        for _ in 0..3 {
            assert!(b.check().is_ok());
        }
        assert!(b.check().is_err());
        let full = bucket(1.0, 10, 10);
        let accepted = (0..20).filter(|_| full.check().is_ok()).count();
        assert_eq!(accepted, 10);
    }
}
