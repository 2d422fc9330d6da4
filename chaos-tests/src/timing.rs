//! Scenario lengths and deadlines, scaled by `CHAOS_SCALE`.
//!
//! The same scenarios run short in CI and long by hand: every duration that
//! says "how long the fault lasts" goes through [`scaled`], every deadline that
//! says "how long we wait for the system to react" goes through [`deadline`]
//! (which never shrinks below its base, so a small scale cannot turn a correct
//! but slow reaction into a failure).

use std::time::Duration;

/// The factor read from env `CHAOS_SCALE` (a positive float, default 1.0).
///
/// Unparsable or non-positive values fall back to 1.0.
pub fn scale() -> f64 {
    std::env::var("CHAOS_SCALE")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f > 0.0)
        .unwrap_or(1.0)
}

/// True when env `CHAOS_FULL` is `1` (or `true`/`yes`): run the long variants
/// of the scenarios (the lengths of the full scenario list).
pub fn full() -> bool {
    matches!(
        std::env::var("CHAOS_FULL").as_deref().map(str::trim),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// For scenarios of the full set only: returns true (after printing
/// `skipped: full set only ...`) unless `CHAOS_FULL=1`; the test then returns
/// early and passes. The fast subset (CI) runs without `CHAOS_FULL`.
pub fn full_only(test: &str) -> bool {
    if full() {
        return false;
    }
    let line = format!("skipped: full set only (set CHAOS_FULL=1 to run it): {test}");
    eprintln!("{line}");
    println!("{line}");
    true
}

/// A scenario length: `base × CHAOS_SCALE`.
pub fn scaled(base: Duration) -> Duration {
    base.mul_f64(scale())
}

/// A reaction deadline: `base × max(1, CHAOS_SCALE)`.
pub fn deadline(base: Duration) -> Duration {
    base.mul_f64(scale().max(1.0))
}

/// Shorthand for [`Duration::from_secs_f64`].
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Picks the CI length or, with `CHAOS_FULL=1`, the full length, then scales it.
pub fn scenario_length(ci: Duration, full_length: Duration) -> Duration {
    scaled(if full() { full_length } else { ci })
}

/// The `q`-quantile (0.0..=1.0) of a sample, nearest-rank; `None` when empty.
pub fn percentile(sample: &[Duration], q: f64) -> Option<Duration> {
    if sample.is_empty() {
        return None;
    }
    let mut v = sample.to_vec();
    v.sort();
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.saturating_sub(1).min(v.len() - 1)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&s, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&s, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&[], 0.5), None);
        let one = [Duration::from_millis(7)];
        assert_eq!(percentile(&one, 0.99), Some(Duration::from_millis(7)));
    }

    #[test]
    fn deadline_never_shrinks() {
        // Whatever CHAOS_SCALE is in the environment, a deadline is at least its base.
        assert!(deadline(secs(5.0)) >= secs(5.0));
    }
}
