//! Triggers other than a direct call: cron schedules, asynchronous invocations with retries
//! (like Lambda's), and internal events (the batch queue's "job finished").
//!
//! **Schedules** (`sched/<function>`): once per tick in the whole mesh, not once per node; the
//! call's body is `{"tick_ms":T,"function":NAME}`. The
//! schedule's coordinator (rendezvous hash over the live nodes) claims the tick by writing
//! `schedrun/<function>` = (tick, itself), waits for the claim to spread, reads it back and runs
//! the function only if its own claim is still the one every replica keeps (last writer wins,
//! deterministically). Two coordinators with different views therefore both write, but only
//! one runs. A coordinator that dies after claiming and before running loses that tick: ticks
//! run at most once, and exactly once while the mesh is healthy.
//!
//! **Async invocations** (`async/<id>`): queued in the replicated state, run by the id's
//! coordinator, retried up to 2 times (3 attempts) with back-off, then kept as failed. If the
//! node running one dies, the next coordinator runs it again: at least once, as with Lambda,
//! so functions must tolerate duplicates.
//!
//! **Events**: [`Triggers::emit`] queues an async invocation of every function deployed with
//! that event in its `events` list, with the event's payload as the body.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::runtime::CgiRequest;
use super::{FunctionError, Functions, now_ms, read_specs, validate_name};
use crate::node::NodeState;
use crate::placement;
use crate::scheduler::Scheduler;

const SCHED_PREFIX: &str = "sched/";
const SCHEDRUN_PREFIX: &str = "schedrun/";
const ASYNC_PREFIX: &str = "async/";
/// Attempts of an async invocation (1 + 2 retries).
pub const ASYNC_ATTEMPTS: u32 = 3;
/// How long a coordinator waits for its tick claim to spread before reading it back.
const CLAIM_SETTLE: Duration = Duration::from_millis(1500);

/// A cron schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The function.
    pub function: String,
    /// Cron expression, 5 fields (minute precision) or 6 (with seconds first).
    pub cron: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TickClaim {
    tick_ms: u64,
    node: String,
}

/// State of an async invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AsyncStatus {
    /// Waiting to run (or to be retried at `next_ms`).
    Queued,
    /// Every attempt failed.
    Failed,
}

/// An async invocation in the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncInvocation {
    /// The function.
    pub function: String,
    /// The request body.
    pub body: Vec<u8>,
    /// Attempts made so far.
    pub attempts: u32,
    /// Earliest time of the next attempt, ms since the epoch.
    pub next_ms: u64,
    /// Queued or failed.
    pub status: AsyncStatus,
    /// The last error, if any.
    pub last_error: String,
}

/// Parses a cron expression, with a message that says what is accepted.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, FunctionError> {
    croner::Cron::from_str(expr).map_err(|e| {
        FunctionError::Invalid(format!(
            "cron {expr:?}: {e} (5 fields `min hour day month weekday`, or 6 with seconds first)"
        ))
    })
}

/// Schedules, async invocations and events of one node.
pub struct Triggers {
    node: Arc<NodeState>,
    functions: Arc<Functions>,
}

impl Triggers {
    /// Triggers over this node's functions.
    pub fn new(node: Arc<NodeState>, functions: Arc<Functions>) -> Arc<Self> {
        Arc::new(Self { node, functions })
    }

    fn write<T: Serialize>(&self, key: &str, value: Option<&T>) -> Result<(), FunctionError> {
        let bytes = value.map(|v| serde_json::to_vec(v).expect("records serialize"));
        self.node
            .write(key, bytes)
            .map(|_| ())
            .map_err(|e| FunctionError::State(e.to_string()))
    }

    fn read_all<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Vec<(String, T)> {
        let replica = self.node.replica.lock().expect("replica lock");
        replica
            .map()
            .list(prefix)
            .filter_map(|e| {
                let v = serde_json::from_slice(e.value.as_deref()?).ok()?;
                Some((e.key[prefix.len()..].to_string(), v))
            })
            .collect()
    }

    /// Sets (or replaces) the schedule of a function.
    pub fn schedule(&self, function: &str, cron: &str) -> Result<Schedule, FunctionError> {
        self.functions.spec(function)?;
        parse_cron(cron)?;
        let s = Schedule {
            function: function.to_string(),
            cron: cron.to_string(),
        };
        self.write(&format!("{SCHED_PREFIX}{function}"), Some(&s))?;
        Ok(s)
    }

    /// Removes a function's schedule.
    pub fn unschedule(&self, function: &str) -> Result<(), FunctionError> {
        validate_name(function)?;
        self.write::<Schedule>(&format!("{SCHED_PREFIX}{function}"), None)
    }

    /// Every schedule.
    pub fn schedules(&self) -> Vec<Schedule> {
        self.read_all::<Schedule>(SCHED_PREFIX)
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }

    /// Queues an async invocation; returns its id.
    pub fn enqueue(&self, function: &str, body: Vec<u8>) -> Result<String, FunctionError> {
        self.functions.spec(function)?;
        let id = format!("{:016x}{:08x}", now_ms(), rand::random::<u32>());
        let inv = AsyncInvocation {
            function: function.to_string(),
            body,
            attempts: 0,
            next_ms: 0,
            status: AsyncStatus::Queued,
            last_error: String::new(),
        };
        self.write(&format!("{ASYNC_PREFIX}{id}"), Some(&inv))?;
        Ok(id)
    }

    /// Async invocations still queued or failed, by id.
    pub fn pending(&self) -> Vec<(String, AsyncInvocation)> {
        self.read_all(ASYNC_PREFIX)
    }

    /// Internal event hook: queues an async invocation of every function subscribed to
    /// `event`, with `payload` as the body. Returns the ids queued.
    pub fn emit(&self, event: &str, payload: &[u8]) -> Vec<String> {
        read_specs(&self.node)
            .into_iter()
            .filter(|s| s.events.iter().any(|e| e == event))
            .filter_map(|s| self.enqueue(&s.name, payload.to_vec()).ok())
            .collect()
    }

    fn coordinates(&self, key: &str) -> bool {
        let nodes = Scheduler::live_nodes(&self.node);
        placement::coordinator(key, &nodes) == Some(&self.node.peer_id.to_string())
    }

    /// One pass over schedules: fires every tick that is due and that this node coordinates.
    pub async fn run_schedules(&self) {
        let now = chrono::Utc::now();
        let last_claims: std::collections::HashMap<String, TickClaim> =
            self.read_all(SCHEDRUN_PREFIX).into_iter().collect();
        for s in self.schedules() {
            if !self.coordinates(&format!("{SCHED_PREFIX}{}", s.function)) {
                continue;
            }
            let Ok(cron) = parse_cron(&s.cron) else {
                continue;
            };
            // The latest tick at or before now.
            let Ok(tick) = cron.find_previous_occurrence(&now, true) else {
                continue;
            };
            // Ticks are whole seconds (croner keeps the sub-second part of `now`).
            let tick_ms = tick.timestamp() as u64 * 1000;
            // Only ticks of the last minute are fired (a node that was away does not replay
            // a backlog), and only once.
            if now.timestamp_millis() as u64 - tick_ms > 60_000
                || last_claims
                    .get(&s.function)
                    .is_some_and(|c| c.tick_ms >= tick_ms)
            {
                continue;
            }
            let me = self.node.peer_id.to_string();
            let key = format!("{SCHEDRUN_PREFIX}{}", s.function);
            let claim = TickClaim {
                tick_ms,
                node: me.clone(),
            };
            if self.write(&key, Some(&claim)).is_err() {
                continue;
            }
            let functions = self.functions.clone();
            let node = self.node.clone();
            tokio::spawn(async move {
                tokio::time::sleep(CLAIM_SETTLE).await;
                let winner: Option<TickClaim> = {
                    let replica = node.replica.lock().expect("replica lock");
                    replica
                        .map()
                        .get(&key)
                        .and_then(|e| serde_json::from_slice(e.value.as_deref()?).ok())
                };
                if winner.as_ref() != Some(&claim) {
                    tracing::info!(function = %s.function, tick_ms, "another node claimed this tick");
                    return;
                }
                // The body names the tick, like a scheduled event's payload.
                let request = CgiRequest {
                    method: "POST".into(),
                    path: "/".into(),
                    headers: vec![
                        ("x-mesh-trigger".into(), "schedule".into()),
                        ("content-type".into(), "application/json".into()),
                    ],
                    body: format!("{{\"tick_ms\":{tick_ms},\"function\":\"{}\"}}", s.function)
                        .into_bytes(),
                    ..Default::default()
                };
                match functions.invoke(&s.function, request).await {
                    Ok(_) => tracing::info!(function = %s.function, tick_ms, "scheduled run done"),
                    Err(e) => {
                        tracing::warn!(function = %s.function, tick_ms, error = %e, "scheduled run failed")
                    }
                }
                metrics::counter!("mesh_fn_scheduled_runs_total").increment(1);
            });
        }
    }

    /// One pass over the async queue: runs what this node coordinates and is due.
    pub async fn run_async(&self) {
        let now = now_ms();
        for (id, mut inv) in self.pending() {
            if inv.status != AsyncStatus::Queued
                || inv.next_ms > now
                || !self.coordinates(&format!("{ASYNC_PREFIX}{id}"))
            {
                continue;
            }
            let key = format!("{ASYNC_PREFIX}{id}");
            // Count the attempt before running it, so a crash mid-run still uses one up.
            inv.attempts += 1;
            inv.next_ms = now + 60_000; // not picked again while it runs
            if self.write(&key, Some(&inv)).is_err() {
                continue;
            }
            let request = CgiRequest {
                method: "POST".into(),
                path: "/".into(),
                headers: vec![("x-mesh-trigger".into(), "async".into())],
                body: inv.body.clone(),
                ..Default::default()
            };
            let result = self.functions.invoke(&inv.function, request).await;
            let ok = matches!(&result, Ok(r) if (200..300).contains(&r.status));
            if ok {
                let _ = self.write::<AsyncInvocation>(&key, None);
                continue;
            }
            inv.last_error = match result {
                Ok(r) => format!("status {}", r.status),
                Err(e) => e.to_string(),
            };
            if inv.attempts >= ASYNC_ATTEMPTS {
                inv.status = AsyncStatus::Failed;
                tracing::warn!(function = %inv.function, %id, error = %inv.last_error, "async invocation failed for good");
                metrics::counter!("mesh_fn_async_failed_total").increment(1);
            } else {
                // Back off 1 s, then 2 s.
                inv.next_ms = now_ms() + 1000 * u64::from(inv.attempts);
            }
            let _ = self.write(&key, Some(&inv));
        }
    }

    /// Runs schedules and the async queue until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.run_schedules().await;
                    self.run_async().await;
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}
