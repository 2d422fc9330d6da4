//! Scenario 1, foundation part: `kill -9` one of five nodes. Every survivor
//! marks it dead within a deadline (the contract says about 5 s); a key
//! written while it is down reaches it after it restarts with the same data
//! dir, and it is alive again everywhere.

use anyhow::Result;
use meshwork_chaos_tests::{Cluster, ClusterOptions, deadline, secs};

#[test]
fn killed_node_is_detected_and_catches_up() -> Result<()> {
    let Some(c) = Cluster::start_or_skip("kill_detect", 5, ClusterOptions::default()) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let victim = 3;
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != victim).collect();
    let prefix = "chaos/kill/";

    let before = format!("{prefix}before");
    h.ensure(c.put(0, &before, "v0").is_ok(), "write before the kill")?;
    c.wait_value_everywhere(&all, &before, "v0", deadline(secs(15.0)))?;

    c.kill(victim)?;
    let detect = c.wait_state(
        &survivors,
        victim,
        deadline(secs(10.0)),
        &format!("every survivor marks n{victim} dead"),
        |s| s == Some("dead"),
    )?;
    h.event(format!(
        "all survivors see n{victim} dead {:.1}s after the kill",
        detect.as_secs_f64()
    ));
    if detect > secs(5.0) {
        eprintln!(
            "NOTE: detection took {:.1}s, more than the ~5 s of the contract",
            detect.as_secs_f64()
        );
    }

    let while_down = format!("{prefix}while-down");
    h.ensure(
        c.put(1, &while_down, "v1").is_ok(),
        "write while the victim is down",
    )?;
    c.wait_value_everywhere(&survivors, &while_down, "v1", deadline(secs(15.0)))?;

    c.restart(victim)?;
    let back = c.wait_all_alive(&all, &all, deadline(secs(30.0)))?;
    h.event(format!(
        "n{victim} alive everywhere {:.1}s after restart",
        back.as_secs_f64()
    ));
    let caught_up = c.wait_value_everywhere(&[victim], &while_down, "v1", deadline(secs(30.0)))?;
    h.event(format!(
        "n{victim} has the key written while it was down after {:.1}s",
        caught_up.as_secs_f64()
    ));

    for &i in &all {
        let state = c.state_map(i, prefix)?;
        h.check_writes_durable(prefix, &state, &format!("n{i}"))?;
    }
    eprintln!(
        "kill_detect: ok; detection {:.1}s; {}",
        detect.as_secs_f64(),
        h.summary()
    );
    Ok(())
}
