//! Scenario 12: a node started with another secret is refused at connection
//! time. It never appears in any member's `nodes`, it cannot read the
//! cluster's state, its own writes do not reach the cluster, and the members
//! still list exactly themselves, all alive.

use std::time::{Duration, Instant};

use anyhow::Result;
use meshwork_chaos_tests::{Cluster, ClusterOptions, deadline, secs};

/// Words that, in the intruder's log, show the admission check refused it.
const REFUSAL_WORDS: &[&str] = &["admission", "refus", "reject", "denied", "secret"];

#[test]
fn wrong_secret_node_is_never_admitted() -> Result<()> {
    let Some(c) = Cluster::start_or_skip("wrong_secret", 3, ClusterOptions::default()) else {
        return Ok(());
    };
    let h = c.history().clone();
    let good = c.members();

    let key = "chaos/wrong-secret/members-only";
    h.ensure(
        c.put(0, key, "members-only").is_ok(),
        "write on n0 is acknowledged",
    )?;
    c.wait_value_everywhere(&good, key, "members-only", deadline(secs(15.0)))?;

    let bad_secret = c.new_secret()?;
    let x = c.start_extra_node_with_secret("intruder", &bad_secret, 0)?;
    c.wait_ready(x)?;
    let intruder_ip = c.ip(x).to_string();
    let intruder_peer = c
        .nodes(x)?
        .into_iter()
        .find(|n| n.is_self)
        .map(|n| n.peer_id)
        .unwrap_or_default();
    h.event(format!("intruder n{x} is up, peer id {intruder_peer:?}"));
    let intruder_key = "chaos/wrong-secret/from-intruder";
    let intruder_write = c.put(x, intruder_key, "leak");
    h.event(format!("intruder's own write: {intruder_write}"));

    // Watch every member's view over a bounded window; end early once the
    // intruder's log shows the refusal and a minimum time has passed.
    let window = deadline(secs(12.0));
    let minimum = deadline(secs(4.0));
    let start = Instant::now();
    let mut sightings = Vec::new();
    let mut refusal_line = None;
    let mut polls = 0;
    while start.elapsed() < window && polls < 500 {
        polls += 1;
        let round = Instant::now();
        for &g in &good {
            match c.nodes(g) {
                Ok(view) => {
                    for n in view {
                        let is_intruder = n.name == "intruder"
                            || (!intruder_peer.is_empty() && n.peer_id == intruder_peer)
                            || n.addrs
                                .iter()
                                .any(|a| a.contains(&format!("/{intruder_ip}/")));
                        if is_intruder {
                            sightings.push(format!(
                                "+{:.1}s n{g} lists {} ({}) as {}",
                                start.elapsed().as_secs_f64(),
                                n.name,
                                n.peer_id,
                                n.state
                            ));
                        }
                    }
                }
                Err(e) => sightings.push(format!("n{g}: nodes failed: {e:#}")),
            }
        }
        if refusal_line.is_none() {
            refusal_line = c
                .log(x)
                .lines()
                .filter(|l| !l.starts_with("==== chaos harness"))
                .find(|l| {
                    let l = l.to_lowercase();
                    REFUSAL_WORDS.iter().any(|w| l.contains(w))
                        && (l.contains("warn") || l.contains("error") || l.contains("refus"))
                })
                .map(str::to_string);
        }
        if refusal_line.is_some() && start.elapsed() >= minimum {
            break;
        }
        if let Some(rest) = Duration::from_millis(100).checked_sub(round.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    h.event(format!(
        "observed {:.1}s ({polls} polls); intruder's log on refusal: {}",
        start.elapsed().as_secs_f64(),
        refusal_line.as_deref().unwrap_or("<nothing matched>")
    ));
    h.ensure(
        sightings.is_empty(),
        format!("the intruder must never be listed by a member: {sightings:#?}"),
    )?;

    // The intruder cannot read the cluster's state.
    let seen = c.read(x, key)?;
    h.ensure(
        seen.is_none(),
        format!("intruder's `state get {key}` must be NOT_FOUND, got {seen:?}"),
    )?;
    // Its own write stays its own.
    for &g in &good {
        let leaked = c.read(g, intruder_key)?;
        h.ensure(
            leaked.is_none(),
            format!("n{g} must not have the intruder's key, got {leaked:?}"),
        )?;
    }
    // The members still list exactly the three of them, all alive.
    for &g in &good {
        let view = c.nodes(g)?;
        let mut names: Vec<(String, String)> =
            view.into_iter().map(|n| (n.name, n.state)).collect();
        names.sort();
        let expected: Vec<(String, String)> = good
            .iter()
            .map(|&i| (c.name(i), "alive".to_string()))
            .collect();
        h.ensure(
            names == expected,
            format!("n{g} must list exactly {expected:?}, lists {names:?}"),
        )?;
    }
    let intruder_view: Vec<String> = c.nodes(x)?.into_iter().map(|n| n.name).collect();
    eprintln!("intruder's own view: {intruder_view:?}");
    eprintln!("wrong_secret: ok; {}", h.summary());
    Ok(())
}
