//! When the control loops (scheduler, supervisor, batch executor) run: on a steady tick, and
//! also soon after the replicated state changes, so that a write (a new service, a claim for
//! this node, a finished attempt) is acted on within tens of milliseconds instead of up to a
//! tick later. A burst of changes runs the loop at most once per `min_gap`.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::node::NodeState;

/// Paces one control loop.
pub struct Pacer {
    tick: Interval,
    changes: watch::Receiver<u64>,
    min_gap: Duration,
    last: Instant,
}

impl Pacer {
    /// A pacer that fires every `every`, and after a state change but never within `min_gap`
    /// of the previous pass.
    pub fn new(node: &NodeState, every: Duration, min_gap: Duration) -> Self {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            tick,
            changes: node.subscribe_changes(),
            min_gap,
            last: Instant::now(),
        }
    }

    /// Waits for the next pass; `false` once `shutdown` turns true.
    pub async fn next(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = self.tick.tick() => {}
            changed = self.changes.changed() => {
                if changed.is_ok() {
                    let due = self.last + self.min_gap;
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = shutdown.changed() => return false,
                    }
                } else {
                    // The node is going away; fall back to the tick.
                    self.tick.tick().await;
                }
            }
            _ = shutdown.changed() => return false,
        }
        self.changes.borrow_and_update();
        self.last = Instant::now();
        true
    }
}
