//! Scenario 5: 10 % random packet loss on every link between hosts (30 s ×
//! `CHAOS_SCALE` in CI, 5 min with `CHAOS_FULL=1`). No node is ever reported
//! dead by any other, and every write reaches every node; the propagation
//! latency per write is recorded and its percentiles reported, not asserted.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use meshwork_chaos_tests::{
    Cluster, ClusterOptions, OpKind, Outcome, deadline, scenario_length, secs, timing::percentile,
};

#[test]
fn lossy_links_do_not_kill_nodes_or_lose_writes() -> Result<()> {
    let Some(c) = Cluster::start_or_skip("packet_drop", 5, ClusterOptions::default()) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let prefix = "chaos/pd/";
    let length = scenario_length(secs(30.0), secs(300.0));

    c.random_drop(10)?;
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    // (time, observer, target, state) for every non-alive verdict seen.
    let verdicts: Mutex<Vec<(f64, usize, String, String)>> = Mutex::new(Vec::new());
    let mut polls = 0u64;
    let mut latencies = Vec::new();

    std::thread::scope(|s| -> Result<()> {
        let observer = s.spawn(|| {
            let mut n = 0u64;
            let hard_stop = length + deadline(secs(120.0));
            while !stop.load(Ordering::Relaxed) && started.elapsed() < hard_stop && n < 100_000 {
                n += 1;
                let tick = Instant::now();
                for &o in &all {
                    if let Ok(view) = c.states(o) {
                        for (name, state) in view {
                            if state != "alive" {
                                verdicts.lock().unwrap().push((
                                    started.elapsed().as_secs_f64(),
                                    o,
                                    name,
                                    state,
                                ));
                            }
                        }
                    }
                }
                if let Some(rest) = Duration::from_millis(500).checked_sub(tick.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            n
        });

        let result = (|| -> Result<()> {
            let mut k = 0usize;
            while (k < 3 || started.elapsed() < length) && k < 1000 {
                let tick = Instant::now();
                let node = all[k % all.len()];
                let key = format!("{prefix}{k}");
                let value = format!("v{k}");
                let outcome = c.put(node, &key, &value);
                h.ensure(
                    outcome.is_ok(),
                    format!("write {key} on n{node} under loss: {outcome}"),
                )?;
                let acked = Instant::now();
                let (_, took) = c.wait_for(
                    deadline(secs(30.0)),
                    &format!("{key} reaches every node under 10% loss"),
                    || {
                        for &n in &all {
                            match c.get(n, &key) {
                                Ok(Some(v)) if v == value => {}
                                other => return Err(format!("n{n}: {other:?}")),
                            }
                        }
                        Ok(())
                    },
                )?;
                h.record(
                    node,
                    OpKind::Other(format!("propagate {key} to all")),
                    acked,
                    Instant::now(),
                    Outcome::Ok(Some(format!("{} ms", took.as_millis()))),
                );
                latencies.push(took);
                k += 1;
                if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        polls = observer.join().expect("observer thread");
        result
    })?;
    h.event(format!(
        "loss held {:.1}s; {} writes; {polls} membership polls",
        started.elapsed().as_secs_f64(),
        latencies.len()
    ));
    c.heal()?;

    let verdicts = verdicts.into_inner().unwrap();
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for v in &verdicts {
        *by_state.entry(v.3.clone()).or_default() += 1;
    }
    let dead: Vec<String> = verdicts
        .iter()
        .filter(|v| v.3 == "dead")
        .map(|v| format!("+{:.1}s n{} says {} is dead", v.0, v.1, v.2))
        .collect();
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
    let report = format!(
        "propagation under 10% loss over {} writes: p50 {}, p99 {}, max {}; \
         non-alive verdicts seen: {by_state:?}",
        latencies.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.iter().max().copied()),
    );
    eprintln!("packet_drop: {report}");
    h.ensure(
        dead.is_empty(),
        format!("no node may be reported dead under 10% loss: {dead:#?}"),
    )?;
    for &n in &all {
        let m = c.state_map(n, prefix)?;
        h.check_writes_durable(prefix, &m, &format!("n{n}"))?;
    }
    eprintln!("packet_drop: ok; {}", h.summary());
    Ok(())
}
