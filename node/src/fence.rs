//! Fencing without a leader: a node that cannot see a majority of the members it knows stops
//! acting on its claims.
//!
//! Claims carry fencing epochs, but a node cut off from the mesh never hears that its
//! replicas were placed elsewhere. So each node watches its own view: while a majority of the
//! known members (itself included) are alive it may place and run work. When it loses that
//! majority it keeps running what it runs for [`FenceTimeout`] (a short network glitch should
//! not restart everything), then it is fenced: it stops its replicas and writes no claims
//! until it has seen a majority again for a settle period (so anti-entropy can deliver the
//! claims that moved meanwhile). A process that was paused (SIGSTOP, a VM freeze) notices
//! the gap between two observations and is fenced at once, before doing any work.
//!
//! Clusters of one or two members cannot form a meaningful majority: a node never fences
//! itself there (in a two-node cluster the survivor keeps running everything).
//!
//! This module is pure (it is given the time), so the rules are tested without a network.

use std::time::{Duration, Instant};

/// How long a node without a majority keeps running before it fences itself.
pub const FENCE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a majority must be seen again before a fenced node acts again.
pub const SETTLE: Duration = Duration::from_secs(3);

/// Alias documenting the unit of [`FENCE_TIMEOUT`].
pub type FenceTimeout = Duration;

/// What a node may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It sees a majority: place, start and run.
    Act,
    /// It lost the majority less than the fence timeout ago: keep what runs, start nothing,
    /// place nothing.
    Hold,
    /// Cut off, just resumed from a pause, or back in a majority for less than the settle
    /// period: stop every replica, place nothing.
    Fenced,
}

/// Tracks a node's view of the majority over time.
#[derive(Debug, Clone)]
pub struct QuorumWatch {
    timeout: Duration,
    settle: Duration,
    last_observed: Option<Instant>,
    last_majority: Option<Instant>,
    majority_since: Option<Instant>,
    fenced: bool,
}

/// Whether `live` alive members (self included) out of `known` form a majority.
pub fn is_majority(live: usize, known: usize) -> bool {
    known <= 2 || live * 2 > known
}

impl Default for QuorumWatch {
    fn default() -> Self {
        Self::new(FENCE_TIMEOUT, SETTLE)
    }
}

impl QuorumWatch {
    /// A watch with the given fence timeout and settle period. A fresh node starts settled
    /// (nothing ran before it), so it acts as soon as it sees a majority.
    pub fn new(timeout: Duration, settle: Duration) -> Self {
        Self {
            timeout,
            settle,
            last_observed: None,
            last_majority: None,
            majority_since: None,
            fenced: false,
        }
    }

    /// A watch for a node process that is starting: it may have run replicas before (its
    /// containers outlive `meshd`), and claims may have moved while it was down, so it
    /// starts fenced and acts only once it has seen a majority for the settle period
    /// (anti-entropy delivers the claims meanwhile).
    pub fn starting(timeout: Duration, settle: Duration) -> Self {
        Self {
            fenced: true,
            ..Self::new(timeout, settle)
        }
    }

    /// Records one observation of the membership and returns what the node may do.
    pub fn observe(&mut self, now: Instant, live: usize, known: usize) -> Verdict {
        let paused = self
            .last_observed
            .is_some_and(|t| now.saturating_duration_since(t) > self.timeout);
        self.last_observed = Some(now);
        if paused {
            // Everything this node believed may have changed while it was frozen.
            self.fenced = true;
            self.majority_since = None;
            self.last_majority = None;
        }
        if is_majority(live, known) {
            self.last_majority = Some(now);
            let since = *self.majority_since.get_or_insert(now);
            if self.fenced {
                if now.saturating_duration_since(since) >= self.settle {
                    self.fenced = false;
                    return Verdict::Act;
                }
                return Verdict::Fenced;
            }
            return Verdict::Act;
        }
        self.majority_since = None;
        if self.fenced {
            return Verdict::Fenced;
        }
        match self.last_majority {
            Some(t) if now.saturating_duration_since(t) <= self.timeout => Verdict::Hold,
            None if !paused => {
                // Never saw a majority yet (a node starting while the others are down):
                // nothing runs here yet, so holding is safe.
                self.last_majority = Some(now);
                Verdict::Hold
            }
            _ => {
                self.fenced = true;
                Verdict::Fenced
            }
        }
    }

    /// Whether the last observation left the node fenced.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn majority_rules() {
        assert!(is_majority(1, 1));
        assert!(is_majority(1, 2), "two-node clusters never fence");
        assert!(!is_majority(1, 3));
        assert!(is_majority(2, 3));
        assert!(!is_majority(2, 5));
        assert!(is_majority(3, 5));
        assert!(!is_majority(2, 4), "half is not a majority");
    }

    #[test]
    fn a_minority_holds_then_fences_then_settles_back() {
        let t0 = Instant::now();
        let mut w = QuorumWatch::new(secs(3.0), secs(3.0));
        assert_eq!(w.observe(t0, 5, 5), Verdict::Act);
        assert_eq!(w.observe(t0 + secs(1.0), 2, 5), Verdict::Hold);
        assert_eq!(w.observe(t0 + secs(3.0), 2, 5), Verdict::Hold);
        assert_eq!(w.observe(t0 + secs(4.5), 2, 5), Verdict::Fenced);
        assert!(w.is_fenced());
        assert_eq!(w.observe(t0 + secs(5.0), 2, 5), Verdict::Fenced);
        // Healed: stay fenced while claims sync, then act.
        assert_eq!(w.observe(t0 + secs(6.0), 5, 5), Verdict::Fenced);
        assert_eq!(w.observe(t0 + secs(8.0), 5, 5), Verdict::Fenced);
        assert_eq!(w.observe(t0 + secs(9.0), 5, 5), Verdict::Act);
        assert!(!w.is_fenced());
    }

    #[test]
    fn a_short_glitch_does_not_fence() {
        let t0 = Instant::now();
        let mut w = QuorumWatch::new(secs(3.0), secs(3.0));
        assert_eq!(w.observe(t0, 3, 3), Verdict::Act);
        assert_eq!(w.observe(t0 + secs(1.0), 1, 3), Verdict::Hold);
        assert_eq!(w.observe(t0 + secs(2.0), 3, 3), Verdict::Act);
    }

    #[test]
    fn a_pause_fences_at_once_even_if_the_view_looks_fine() {
        let t0 = Instant::now();
        let mut w = QuorumWatch::new(secs(3.0), secs(3.0));
        assert_eq!(w.observe(t0, 5, 5), Verdict::Act);
        // 40 s frozen: the stale view still says everyone is alive.
        assert_eq!(w.observe(t0 + secs(40.0), 5, 5), Verdict::Fenced);
        assert!(w.is_fenced());
        assert_eq!(w.observe(t0 + secs(41.0), 1, 5), Verdict::Fenced);
        assert_eq!(w.observe(t0 + secs(42.0), 5, 5), Verdict::Fenced);
        assert_eq!(w.observe(t0 + secs(45.0), 5, 5), Verdict::Act);
    }

    #[test]
    fn a_starting_node_waits_for_a_settled_majority() {
        let t0 = Instant::now();
        let mut w = QuorumWatch::starting(secs(3.0), secs(3.0));
        // Restarted: its claims name four other nodes, none heard from yet.
        assert_eq!(w.observe(t0, 1, 5), Verdict::Fenced);
        assert_eq!(w.observe(t0 + secs(1.0), 5, 5), Verdict::Fenced);
        assert_eq!(w.observe(t0 + secs(3.5), 5, 5), Verdict::Fenced);
        assert_eq!(w.observe(t0 + secs(4.0), 5, 5), Verdict::Act);
        // Alone for good (a one-node cluster): it acts after the settle period.
        let mut one = QuorumWatch::starting(secs(3.0), secs(3.0));
        assert_eq!(one.observe(t0, 1, 1), Verdict::Fenced);
        assert_eq!(one.observe(t0 + secs(3.0), 1, 1), Verdict::Act);
    }

    #[test]
    fn small_clusters_never_fence() {
        let t0 = Instant::now();
        let mut w = QuorumWatch::new(secs(3.0), secs(3.0));
        assert_eq!(w.observe(t0, 2, 2), Verdict::Act);
        assert_eq!(w.observe(t0 + secs(1.0), 1, 2), Verdict::Act);
        assert_eq!(w.observe(t0 + secs(2.0), 1, 1), Verdict::Act);
    }
}
