//! SIGSTOP one of five nodes (scenario 2 is the 40 s variant, `CHAOS_FULL=1`):
//! the others stop calling it alive; after SIGCONT it is alive everywhere
//! again, it catches up with a write made while it was frozen, and its own
//! writes spread again.

use std::time::{Duration, Instant};

use anyhow::Result;
use meshwork_chaos_tests::{Cluster, ClusterOptions, deadline, scenario_length, secs};

#[test]
fn paused_node_is_suspected_then_recovers() -> Result<()> {
    let Some(c) = Cluster::start_or_skip("pause_resume", 5, ClusterOptions::default()) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let victim = 2;
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != victim).collect();
    let prefix = "chaos/pause/";
    let length = scenario_length(secs(10.0), secs(40.0));

    c.pause(victim)?;
    let paused_at = Instant::now();
    let detect = c.wait_state(
        &others,
        victim,
        deadline(secs(15.0)),
        &format!("every other node stops calling n{victim} alive"),
        |s| s != Some("alive"),
    )?;
    h.event(format!(
        "all others see n{victim} non-alive {:.1}s after SIGSTOP",
        detect.as_secs_f64()
    ));

    let during = format!("{prefix}during");
    h.ensure(
        c.put(0, &during, "d").is_ok(),
        "write while n{victim} is frozen",
    )?;

    // Hold the pause for the scenario length, watching the others' views.
    let mut seen_states = std::collections::BTreeSet::new();
    let mut flapped_alive = Vec::new();
    let mut polls = 0;
    while paused_at.elapsed() < length && polls < 2000 {
        polls += 1;
        let round = Instant::now();
        for &o in &others {
            if let Ok(Some(s)) = c.state_of(o, victim) {
                if s == "alive" {
                    flapped_alive.push(format!("+{:.1}s n{o}", paused_at.elapsed().as_secs_f64()));
                }
                seen_states.insert(s);
            }
        }
        if let Some(rest) = Duration::from_millis(500).checked_sub(round.elapsed()) {
            std::thread::sleep(rest.min(length.saturating_sub(paused_at.elapsed())));
        }
    }
    h.event(format!(
        "n{victim} frozen for {:.1}s; states others reported: {seen_states:?}",
        paused_at.elapsed().as_secs_f64()
    ));
    h.ensure(
        flapped_alive.is_empty(),
        format!("a frozen node must not be reported alive again: {flapped_alive:?}"),
    )?;

    c.resume(victim)?;
    let back = c.wait_all_alive(&all, &all, deadline(secs(20.0)))?;
    h.event(format!(
        "n{victim} alive everywhere {:.1}s after SIGCONT",
        back.as_secs_f64()
    ));
    c.wait_value_everywhere(&[victim], &during, "d", deadline(secs(20.0)))?;
    let after = format!("{prefix}after");
    h.ensure(
        c.put(victim, &after, "a").is_ok(),
        "write on the resumed node",
    )?;
    c.wait_value_everywhere(&all, &after, "a", deadline(secs(15.0)))?;

    for &i in &all {
        let state = c.state_map(i, prefix)?;
        h.check_writes_durable(prefix, &state, &format!("n{i}"))?;
    }
    eprintln!(
        "pause_resume: ok; non-alive after {:.1}s, alive again after {:.1}s; {}",
        detect.as_secs_f64(),
        back.as_secs_f64(),
        h.summary()
    );
    Ok(())
}
