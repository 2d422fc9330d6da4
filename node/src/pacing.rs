//! When the control loops (scheduler, supervisor, batch executor) run: on a steady tick, and
//! also soon after the replicated state changes, so that a write (a new service, a claim for
//! this node, a finished attempt) is acted on within milliseconds instead of up to a tick
//! later.
//!
//! Changes come in short chains: `svc create` writes the service, the scheduler's pass writes
//! the claim a few milliseconds later, and only that second write concerns the supervisor. So a
//! loop may run [`BURST`] passes back to back, and a longer storm of changes runs it at most once
//! per `min_gap` (a generic cell rate limit: each pass pushes a theoretical time one `min_gap`
//! ahead, and a pass may run once that time is less than `BURST` gaps away). With a plain
//! minimum gap the claim above waited out the gap after the pass that the service write
//! triggered: ~100 ms of a ~70 ms container start.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::node::NodeState;

/// Passes a loop may run back to back after changes before the `min_gap` pacing applies.
pub const BURST: u32 = 3;

/// Paces one control loop.
pub struct Pacer {
    tick: Interval,
    changes: watch::Receiver<u64>,
    min_gap: Duration,
    /// Theoretical time of the next pass at the steady rate; passes run while it is less than
    /// [`BURST`] gaps ahead of now.
    theoretical: Instant,
}

impl Pacer {
    /// A pacer that fires every `every`, and after a state change: at once for up to
    /// [`BURST`] passes in a row, then at most once per `min_gap`.
    pub fn new(node: &NodeState, every: Duration, min_gap: Duration) -> Self {
        Self::over(node.subscribe_changes(), every, min_gap)
    }

    /// [`Pacer::new`] over any change counter.
    pub fn over(changes: watch::Receiver<u64>, every: Duration, min_gap: Duration) -> Self {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            tick,
            changes,
            min_gap,
            theoretical: Instant::now(),
        }
    }

    /// The earliest time the next pass may run after a change.
    fn allowed_at(&self) -> Instant {
        let tolerance = self.min_gap * (BURST - 1);
        self.theoretical
            .checked_sub(tolerance)
            .unwrap_or(self.theoretical)
    }

    /// Waits for the next pass; `false` once `shutdown` turns true.
    pub async fn next(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = self.tick.tick() => {}
            changed = self.changes.changed() => {
                if changed.is_ok() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(self.allowed_at()) => {}
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
        let now = Instant::now();
        self.theoretical = self.theoretical.max(now) + self.min_gap;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: Duration = Duration::from_millis(100);

    /// Sends a change and returns how long the pacer took to fire for it.
    async fn pass_after_change(pacer: &mut Pacer, tx: &watch::Sender<u64>) -> Duration {
        let (_stop_tx, mut stop) = watch::channel(false);
        tx.send_modify(|n| *n += 1);
        let started = Instant::now();
        assert!(pacer.next(&mut stop).await);
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_chain_of_changes_runs_at_once_then_the_gap_applies() {
        let (tx, rx) = watch::channel(0u64);
        let mut pacer = Pacer::over(rx, Duration::from_secs(3600), GAP);
        // The interval's first tick is immediate: consume it.
        let (_stop_tx, mut stop) = watch::channel(false);
        assert!(pacer.next(&mut stop).await);
        tokio::time::advance(Duration::from_secs(1)).await;

        for n in 0..BURST {
            assert_eq!(
                pass_after_change(&mut pacer, &tx).await,
                Duration::ZERO,
                "pass {n} of a burst waited"
            );
        }
        let waited = pass_after_change(&mut pacer, &tx).await;
        assert!(
            waited >= GAP / 2 && waited <= GAP,
            "a pass beyond the burst ran after {waited:?}"
        );
        // A storm settles at one pass per gap.
        for _ in 0..5 {
            assert_eq!(pass_after_change(&mut pacer, &tx).await, GAP);
        }
        // After a quiet spell the burst is available again.
        tokio::time::advance(GAP * BURST).await;
        assert_eq!(pass_after_change(&mut pacer, &tx).await, Duration::ZERO);
        assert_eq!(pass_after_change(&mut pacer, &tx).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tick_runs_without_changes_and_shutdown_ends_it() {
        let (_tx, rx) = watch::channel(0u64);
        let mut pacer = Pacer::over(rx, Duration::from_secs(1), GAP);
        let (stop_tx, mut stop) = watch::channel(false);
        assert!(pacer.next(&mut stop).await);
        let started = Instant::now();
        assert!(pacer.next(&mut stop).await);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        stop_tx.send(true).expect("receiver alive");
        assert!(!pacer.next(&mut stop).await);
    }
}
