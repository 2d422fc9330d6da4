//! Logging and metrics set-up, shared by `meshd` and tests that embed a node.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Bucket bounds (seconds) of the latency histograms: sub-millisecond to a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Installs the global Prometheus recorder and returns the handle that renders it. When a
/// recorder is already installed (several nodes in one test process) the handle still
/// renders, but only the first node's metrics reach the global recorder.
pub fn install_metrics() -> PrometheusHandle {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("mesh_state_propagation_seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .expect("bucket list is not empty")
        // Request latencies (gateway routes, functions): histograms, so p50/p99 can be
        // computed across nodes.
        .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), LATENCY_BUCKETS)
        .expect("bucket list is not empty")
        // Loading a function's module: deserializing its artifact (about a millisecond) or
        // compiling it (tens of milliseconds and up).
        .set_buckets_for_metric(
            Matcher::Full("mesh_fn_load_seconds".into()),
            LATENCY_BUCKETS,
        )
        .expect("bucket list is not empty")
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::debug!("a metrics recorder was already installed");
    }
    describe_metrics();
    handle
}

/// Describes every metric the node exports and makes the counters visible at zero, so a
/// scrape shows the full set from the start.
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "mesh_peers",
        "Members by failure-detector state, this node included"
    );
    describe_gauge!(
        "mesh_connected_peers",
        "Peers with an open, admitted connection"
    );
    describe_counter!(
        "mesh_gossip_messages_total",
        "Gossip messages sent (out) and received (in)"
    );
    describe_counter!(
        "mesh_member_transitions_total",
        "Failure-detector verdict changes"
    );
    describe_counter!(
        "mesh_jobs_expired_total",
        "Ended batch jobs removed after their retention by this node"
    );
    describe_counter!("mesh_admission_total", "Admission exchanges by result");
    describe_counter!(
        "mesh_bad_messages_total",
        "Malformed or lying messages dropped, by reason"
    );
    describe_gauge!("mesh_state_entries", "Live entries in the desired state");
    describe_gauge!("mesh_state_tombstones", "Deleted keys kept as tombstones");
    describe_counter!("mesh_state_writes_total", "Writes accepted by this node");
    describe_counter!("mesh_sync_rounds_total", "Anti-entropy rounds started");
    describe_counter!(
        "mesh_sync_entries_applied_total",
        "Entries learned through anti-entropy"
    );
    describe_histogram!(
        "mesh_fn_load_seconds",
        Unit::Seconds,
        "Time to make a function's module runnable on this node, by where it came from \
         (memory, disk: the compiled artifact, compiled)"
    );
    describe_histogram!(
        "mesh_state_propagation_seconds",
        Unit::Seconds,
        "Time from a write on its origin to its arrival here by gossip"
    );
    for direction in ["in", "out"] {
        for topic in ["heartbeat", "state"] {
            metrics::counter!("mesh_gossip_messages_total", "direction" => direction, "topic" => topic)
                .increment(0);
        }
    }
    for result in ["accepted", "refused", "error", "timeout"] {
        metrics::counter!("mesh_admission_total", "result" => result).increment(0);
    }
    metrics::counter!("mesh_state_writes_total").increment(0);
    metrics::counter!("mesh_sync_entries_applied_total").increment(0);
}

/// Sets up `tracing` output on stderr, filtered by `RUST_LOG` (default `info`), as text or
/// JSON lines.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,libp2p_gossipsub=warn,libp2p_kad=error,libp2p_mdns=warn",
        )
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
