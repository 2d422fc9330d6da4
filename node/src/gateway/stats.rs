//! Per-route counters: on `/metrics` (`mesh_gateway_requests_total`, `mesh_gateway_4xx_total`,
//! `mesh_gateway_5xx_total`, `mesh_gateway_throttled_total` and `mesh_gateway_duration_seconds`,
//! labelled `route`), and kept per node in mergeable form for `meshctl gateway stats`, which
//! sums them over every live node through the node-to-node call `gw.stats`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::functions::DURATION_BUCKETS;
use crate::membership::MemberState;
use crate::node::NodeState;
use crate::rpc::{RpcRequest, RpcResponse};

/// The label of requests that matched no route.
pub const NO_ROUTE: &str = "-";
/// Routes tracked per node; beyond, new routes count under "other".
const MAX_ROUTES: usize = 10_000;

/// Counters of one route on one node; mergeable across nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteCounters {
    /// Requests answered.
    pub requests: u64,
    /// 4xx answers (throttled ones included).
    pub client_errors: u64,
    /// 5xx answers.
    pub server_errors: u64,
    /// 429 answers for a key's rate or quota.
    pub throttled: u64,
    /// Counts per [`DURATION_BUCKETS`] bucket (the last counts everything above).
    pub buckets: Vec<u64>,
}

impl RouteCounters {
    fn record(&mut self, status: u16, throttled: bool, d: Duration) {
        self.requests += 1;
        self.client_errors += u64::from((400..500).contains(&status));
        self.server_errors += u64::from(status >= 500);
        self.throttled += u64::from(throttled);
        if self.buckets.len() != DURATION_BUCKETS.len() + 1 {
            self.buckets = vec![0; DURATION_BUCKETS.len() + 1];
        }
        let s = d.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i] += 1;
    }

    /// Adds another node's counters.
    pub fn merge(&mut self, other: &RouteCounters) {
        self.requests += other.requests;
        self.client_errors += other.client_errors;
        self.server_errors += other.server_errors;
        self.throttled += other.throttled;
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
    }

    /// Upper bound of the bucket holding quantile `q` (0..1), in seconds; 0 without data.
    pub fn quantile(&self, q: f64) -> f64 {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return DURATION_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            }
        }
        0.0
    }
}

/// The `/metrics` handles of one route, each registered on its first use (a route that
/// never answered 4xx has no 4xx series), so that counting a request neither builds a label
/// set nor looks the series up in the recorder.
#[derive(Default)]
struct RouteMetrics {
    requests: Option<metrics::Counter>,
    duration: Option<metrics::Histogram>,
    client_errors: Option<metrics::Counter>,
    server_errors: Option<metrics::Counter>,
    throttled: Option<metrics::Counter>,
}

impl RouteMetrics {
    fn record(&mut self, route: &str, status: u16, throttled: bool, d: Duration) {
        let label = || route.to_string();
        self.requests
            .get_or_insert_with(
                || metrics::counter!("mesh_gateway_requests_total", "route" => label()),
            )
            .increment(1);
        if (400..500).contains(&status) {
            self.client_errors
                .get_or_insert_with(
                    || metrics::counter!("mesh_gateway_4xx_total", "route" => label()),
                )
                .increment(1);
        }
        if status >= 500 {
            self.server_error(route);
        }
        if throttled {
            self.throttled
                .get_or_insert_with(
                    || metrics::counter!("mesh_gateway_throttled_total", "route" => label()),
                )
                .increment(1);
        }
        self.duration
            .get_or_insert_with(
                || metrics::histogram!("mesh_gateway_duration_seconds", "route" => label()),
            )
            .record(d.as_secs_f64());
    }

    fn server_error(&mut self, route: &str) {
        self.server_errors
            .get_or_insert_with(
                || metrics::counter!("mesh_gateway_5xx_total", "route" => route.to_string()),
            )
            .increment(1);
    }
}

/// One tracked route: its counters and its `/metrics` handles.
#[derive(Default)]
struct Tracked {
    counters: RouteCounters,
    metrics: RouteMetrics,
}

/// This node's per-route counters.
#[derive(Default)]
pub struct GatewayStats {
    routes: Mutex<BTreeMap<String, Tracked>>,
}

impl GatewayStats {
    /// Empty counters.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records one answered request on `/metrics` and in the counters.
    pub fn record(&self, route: &str, status: u16, throttled: bool, d: Duration) {
        let mut routes = self.routes.lock().expect("stats lock");
        if !routes.contains_key(route) {
            if routes.len() >= MAX_ROUTES {
                // Counted under "other"; `/metrics` still names the route.
                RouteMetrics::default().record(route, status, throttled, d);
                tracked(&mut routes, "other")
                    .counters
                    .record(status, throttled, d);
                return;
            }
            routes.insert(route.to_string(), Tracked::default());
        }
        let t = routes.get_mut(route).expect("inserted above");
        t.metrics.record(route, status, throttled, d);
        t.counters.record(status, throttled, d);
    }

    /// Counts a server error for a request already recorded with the status of its head:
    /// its response was cut while streaming (it passed the route's response limit).
    pub fn record_cut(&self, route: &str) {
        let mut routes = self.routes.lock().expect("stats lock");
        if !routes.contains_key(route) && routes.len() >= MAX_ROUTES {
            RouteMetrics::default().server_error(route);
            tracked(&mut routes, "other").counters.server_errors += 1;
            return;
        }
        let t = tracked(&mut routes, route);
        t.metrics.server_error(route);
        t.counters.server_errors += 1;
    }

    /// A copy of this node's counters.
    pub fn local(&self) -> BTreeMap<String, RouteCounters> {
        self.routes
            .lock()
            .expect("stats lock")
            .iter()
            .map(|(route, t)| (route.clone(), t.counters.clone()))
            .collect()
    }
}

/// The entry of `route`, made if missing.
fn tracked<'a>(routes: &'a mut BTreeMap<String, Tracked>, route: &str) -> &'a mut Tracked {
    routes.entry(route.to_string()).or_default()
}

/// Registers `gw.stats`: this node's counters, postcard-encoded.
pub fn register_rpc(node: &NodeState, stats: &Arc<GatewayStats>) {
    let stats = stats.clone();
    node.router.register(
        "gw.stats",
        Arc::new(move |_peer, _body| {
            let stats = stats.clone();
            Box::pin(async move {
                Ok(postcard::to_allocvec(&stats.local()).expect("counters serialize"))
            })
        }),
    );
}

/// Counters summed over this node and every live node that answers.
pub async fn gather(node: &NodeState) -> BTreeMap<String, RouteCounters> {
    let request = || RpcRequest {
        service: "gw.stats".into(),
        body: vec![],
    };
    let mut answers = Vec::new();
    if let RpcResponse::Ok(body) = node.router.handle(node.peer_id, request()).await {
        answers.push(body);
    }
    let peers: Vec<libp2p::PeerId> = {
        let table = node.membership.read().expect("membership lock");
        table
            .peers_in(MemberState::Alive)
            .filter_map(|m| m.heartbeat.peer_id.parse().ok())
            .collect()
    };
    let calls = peers.into_iter().map(|p| node.call(p, "gw.stats", vec![]));
    answers.extend(futures::future::join_all(calls).await.into_iter().flatten());
    let mut total: BTreeMap<String, RouteCounters> = BTreeMap::new();
    for a in answers {
        if let Ok(map) = postcard::from_bytes::<BTreeMap<String, RouteCounters>>(&a) {
            for (route, c) in map {
                total.entry(route).or_default().merge(&c);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_merge_and_give_quantiles() {
        let mut a = RouteCounters::default();
        a.record(200, false, Duration::from_millis(1));
        a.record(429, true, Duration::from_millis(1));
        let mut b = RouteCounters::default();
        b.record(502, false, Duration::from_millis(300));
        a.merge(&b);
        assert_eq!(
            (a.requests, a.client_errors, a.server_errors, a.throttled),
            (3, 1, 1, 1)
        );
        assert_eq!(a.quantile(0.5), 0.001);
        assert_eq!(a.quantile(0.99), 0.5);
        assert_eq!(RouteCounters::default().quantile(0.5), 0.0);
    }

    #[test]
    fn routes_beyond_the_cap_count_under_other() {
        let stats = GatewayStats::new();
        for i in 0..MAX_ROUTES {
            stats.record(&format!("/r{i}"), 200, false, Duration::ZERO);
        }
        stats.record("/r0", 404, false, Duration::ZERO);
        stats.record("/new", 500, true, Duration::ZERO);
        stats.record_cut("/new");
        stats.record_cut("/r1");
        let local = stats.local();
        assert_eq!(local.len(), MAX_ROUTES + 1);
        assert!(!local.contains_key("/new"));
        let c = &local["other"];
        assert_eq!(
            (c.requests, c.server_errors, c.throttled),
            (1, 2, 1),
            "the request and its cut"
        );
        let c = &local["/r0"];
        assert_eq!((c.requests, c.client_errors), (2, 1));
        assert_eq!(local["/r1"].server_errors, 1);
    }

    #[test]
    fn a_cut_response_counts_as_a_server_error_not_a_request() {
        let stats = GatewayStats::new();
        stats.record("/big", 200, false, Duration::from_millis(1));
        stats.record_cut("/big");
        let c = &stats.local()["/big"];
        assert_eq!((c.requests, c.server_errors, c.client_errors), (1, 1, 0));
    }
}
