//! Scenario 3, foundation part: five nodes split {0,1} | {2,3,4}. Both sides
//! keep accepting writes (distinct keys, plus one key written on both sides);
//! the sides do not see each other's writes while split; after the heal every
//! node converges to the same full state, the conflicting key has the same
//! winner everywhere (the later write: last writer wins), and no acknowledged
//! write is lost (checked against the history).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use meshwork_chaos_tests::{Cluster, ClusterOptions, OpKind, deadline, scenario_length, secs};

#[test]
fn partitioned_sides_converge_after_heal() -> Result<()> {
    let Some(c) = Cluster::start_or_skip("partition_heal", 5, ClusterOptions::default()) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let side_a = [0usize, 1];
    let side_b = [2usize, 3, 4];
    let prefix = "chaos/ph/";
    let conflict = format!("{prefix}conflict");
    let length = scenario_length(secs(15.0), secs(120.0));

    let pre = format!("{prefix}pre");
    h.ensure(c.put(0, &pre, "pre").is_ok(), "write before the partition")?;
    c.wait_value_everywhere(&all, &pre, "pre", deadline(secs(15.0)))?;

    c.partition(&[&side_a, &side_b])?;
    let split_at = Instant::now();
    let cut = c.wait_for(
        deadline(secs(20.0)),
        "each side stops calling the other side alive",
        || {
            for (mine, theirs) in [(&side_a[..], &side_b[..]), (&side_b[..], &side_a[..])] {
                for &o in mine {
                    let view = c.states(o).map_err(|e| format!("n{o}: {e:#}"))?;
                    for &t in theirs {
                        let s = view.get(&c.name(t));
                        if s.map(String::as_str) == Some("alive") {
                            return Err(format!("n{o} still sees n{t} alive"));
                        }
                    }
                }
            }
            Ok(())
        },
    )?;
    h.event(format!(
        "both sides see the other non-alive after {:.1}s",
        cut.1.as_secs_f64()
    ));

    // Writes on both sides for the length of the partition, about two per second.
    let mut round = 0usize;
    while (round < 2 || split_at.elapsed() < length) && round < 500 {
        let tick = Instant::now();
        let a = side_a[round % side_a.len()];
        let b = side_b[round % side_b.len()];
        c.put(a, &format!("{prefix}a/{round}"), &format!("a{round}"));
        c.put(b, &format!("{prefix}b/{round}"), &format!("b{round}"));
        match round {
            0 => {
                c.put(0, &conflict, "from-a");
            }
            1 => {
                c.put(3, &conflict, "from-b");
            }
            _ => {}
        }
        round += 1;
        if let Some(rest) = Duration::from_millis(500).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let failed: Vec<String> = h
        .writes(prefix)
        .into_iter()
        .filter(|w| !w.outcome.is_ok())
        .map(|w| format!("#{} n{} {} -> {}", w.id, w.node, w.kind, w.outcome))
        .collect();
    h.ensure(
        failed.is_empty(),
        format!("every node accepts writes during a partition: {failed:?}"),
    )?;

    // Within a side, writes spread; across the cut, nothing leaks.
    let written_under = |side_prefix: &str| -> BTreeMap<String, String> {
        h.writes(&format!("{prefix}{side_prefix}"))
            .into_iter()
            .filter(|w| w.outcome.is_ok())
            .filter_map(|w| match w.kind {
                OpKind::Write { key, value } => Some((key, value)),
                _ => None,
            })
            .collect()
    };
    let a_keys = written_under("a/");
    let b_keys = written_under("b/");
    for (mine, own, other) in [
        (&side_a[..], &a_keys, &b_keys),
        (&side_b[..], &b_keys, &a_keys),
    ] {
        c.wait_for(
            deadline(secs(20.0)),
            &format!("side {mine:?} has all its own writes and none of the other side's"),
            || {
                for &n in mine {
                    let m = c.state_map(n, prefix).map_err(|e| format!("n{n}: {e:#}"))?;
                    if let Some(k) = other.keys().find(|k| m.contains_key(*k)) {
                        // A leak is a failure, not a "not yet": it cannot undo itself.
                        return Ok(Some(format!("n{n} has {k} from across the partition")));
                    }
                    if let Some(k) = own.keys().find(|k| !m.contains_key(*k)) {
                        return Err(format!("n{n} lacks {k}"));
                    }
                }
                Ok(None)
            },
        )
        .and_then(|(leak, _)| match leak {
            Some(l) => Err(h.fail(l)),
            None => Ok(()),
        })?;
    }
    h.event(format!(
        "partition held {:.1}s, {round} write rounds",
        split_at.elapsed().as_secs_f64()
    ));

    c.heal()?;
    let healed_at = Instant::now();
    let rejoin = c.wait_all_alive(&all, &all, deadline(secs(30.0)))?;
    h.event(format!(
        "all alive everywhere {:.1}s after heal",
        rejoin.as_secs_f64()
    ));
    let expected_keys = a_keys.len() + b_keys.len() + 2; // + pre + conflict
    let (final_state, _) = c.wait_for(
        deadline(secs(30.0)),
        "every node has the same full state",
        || {
            let mut first: Option<BTreeMap<String, String>> = None;
            for &n in &all {
                let m = c.state_map(n, prefix).map_err(|e| format!("n{n}: {e:#}"))?;
                if m.len() != expected_keys {
                    return Err(format!("n{n} has {} of {expected_keys} keys", m.len()));
                }
                match &first {
                    None => first = Some(m),
                    Some(f) if *f != m => {
                        let diff: Vec<_> = f
                            .iter()
                            .filter(|(k, v)| m.get(*k) != Some(*v))
                            .map(|(k, _)| k)
                            .collect();
                        return Err(format!("n{n} differs from n0 on {diff:?}"));
                    }
                    Some(_) => {}
                }
            }
            Ok(first.unwrap_or_default())
        },
    )?;
    let converge = healed_at.elapsed();
    h.event(format!(
        "converged {:.1}s after heal; conflict winner {:?}",
        converge.as_secs_f64(),
        final_state.get(&conflict)
    ));
    for &n in &all {
        let m = c.state_map(n, prefix)?;
        h.check_writes_durable(prefix, &m, &format!("n{n}"))?;
    }
    eprintln!(
        "partition_heal: ok; {} keys, winner {:?}, converged {:.1}s after heal; {}",
        final_state.len(),
        final_state.get(&conflict),
        converge.as_secs_f64(),
        h.summary()
    );
    Ok(())
}
