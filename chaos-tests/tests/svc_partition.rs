//! Scenario 3, service part (fast subset, 20 s; 120 s with `CHAOS_FULL=1`):
//! five nodes run `web` (9 replicas, spread) and are split {0,1} | {2,3,4}.
//! While split, each side creates a service (`left` on n0, `right` on n2, 2
//! replicas each). Checked on what containerd runs, sampled twice a second:
//! * the majority side runs exactly 9 `web` replicas again (the time is
//!   printed) and stays exact; it also runs `right`;
//! * the minority side fences: its `web` containers stop (the time from the
//!   split is printed) and nothing of any service runs there afterwards while
//!   split (`left` is not started by the fenced side);
//! * after the heal: exactly 9 `web`, 2 `left`, 2 `right` on all five nodes
//!   (target: within 30 s; the wait allows 60 s), no replica twice after
//!   converging; every node lists all three services with their acknowledged
//!   replica counts, all running (no desired state lost on either side).

mod svc;

use anyhow::Result;
use meshwork_chaos_tests::containers::first_where;
use meshwork_chaos_tests::{ReplicaWatch, SvcShape, deadline, scenario_length, secs};

#[test]
fn both_sides_keep_their_services_and_the_count_is_exact_after_heal() -> Result<()> {
    let Some(c) = svc::start("svc_partition", 5, 2) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let minority = [0usize, 1];
    let majority = [2usize, 3, 4];
    let length = scenario_length(secs(20.0), secs(120.0));
    let watch = ReplicaWatch::start(&c);
    let shape = SvcShape::default();

    svc::prepare(&c, 0)?;
    svc::deploy(&c, &watch, 0, "web", 9, &shape)?;
    let before = watch.latest().expect("a sample");
    let on_minority: usize = minority
        .iter()
        .map(|&n| before.ids_on("web", n).map(|s| s.len()).unwrap_or(0))
        .sum();

    c.partition(&[&minority, &majority])?;
    let split_at = h.now();
    let left = c.svc_create(0, "left", svc::IMAGE, 2, &shape);
    h.ensure(
        left.is_ok(),
        format!("svc create on the minority side: {left}"),
    )?;
    let right = c.svc_create(2, "right", svc::IMAGE, 2, &shape);
    h.ensure(
        right.is_ok(),
        format!("svc create on the majority side: {right}"),
    )?;

    let restored = watch.wait_exact(&c, "web", 9, &majority, deadline(secs(60.0)))?;
    h.event(format!(
        "majority runs 9 web again {:.1}s after the split",
        restored.as_secs_f64()
    ));
    let (fenced_sample, _) = watch.wait_sample(
        &c,
        deadline(secs(60.0)),
        "the minority side runs no container",
        |s| {
            for n in minority {
                match s.nodes.get(&n).and_then(|ns| ns.containers.as_ref()) {
                    None => return Err(format!("n{n} unknown")),
                    Some(cs) if !cs.is_empty() => {
                        return Err(format!("n{n} runs {} container(s)", cs.len()));
                    }
                    Some(_) => {}
                }
            }
            Ok(())
        },
    )?;
    let fenced = fenced_sample.at - split_at;
    h.event(format!(
        "minority fenced: no container on {minority:?} {:.1}s after the split",
        fenced.as_secs_f64()
    ));
    watch.wait_exact(&c, "right", 2, &majority, deadline(secs(60.0)))?;

    // Hold the partition for its length.
    let held = h.now() - split_at;
    svc::observe_for(&c, length.saturating_sub(held))?;
    let majority_check = svc::check_window(
        &c,
        &watch,
        "majority while split",
        "web",
        9,
        &majority,
        split_at,
    )?;
    // Once fenced, the minority side runs nothing while split.
    let samples = watch.samples();
    let relit = first_where(&samples, fenced_sample.at, |s| {
        minority.iter().any(|n| {
            s.nodes
                .get(n)
                .and_then(|ns| ns.containers.as_ref())
                .is_some_and(|cs| !cs.is_empty())
        })
    });
    h.ensure(
        relit.is_none(),
        format!(
            "the fenced minority side ran containers again while split, at {:.1}s",
            relit.unwrap_or_default().as_secs_f64()
        ),
    )?;

    c.heal()?;
    let healed_at = h.now();
    let web_back = watch.wait_exact(&c, "web", 9, &all, deadline(secs(60.0)))?;
    let left_back = watch.wait_exact(&c, "left", 2, &all, deadline(secs(60.0)))?;
    let right_back = watch.wait_exact(&c, "right", 2, &all, deadline(secs(60.0)))?;
    let heal_done = web_back.max(left_back).max(right_back);
    h.event(format!(
        "after the heal: web exact {:.1}s, left {:.1}s, right {:.1}s",
        web_back.as_secs_f64(),
        left_back.as_secs_f64(),
        right_back.as_secs_f64()
    ));
    svc::observe_for(&c, scenario_length(secs(8.0), secs(30.0)))?;
    let mut after = Vec::new();
    for (name, n) in [("web", 9), ("left", 2), ("right", 2)] {
        after.push(svc::check_window(
            &c,
            &watch,
            "after the heal",
            name,
            n,
            &all,
            healed_at,
        )?);
    }
    let ls = svc::check_desired_state(&c, &all, deadline(secs(30.0)))?;

    let report = [
        format!("{on_minority} web replicas were on the minority side"),
        svc::versus_target(&c, "majority restored 9 web", restored, secs(30.0)),
        format!("minority fenced after {:.1}s", fenced.as_secs_f64()),
        svc::versus_target(&c, "all exact after the heal", heal_done, secs(30.0)),
        format!("svc ls agreed {:.1}s later", ls.as_secs_f64()),
        format!("majority: {}", majority_check.summary(split_at)),
        format!("web after heal: {}", after[0].summary(healed_at)),
    ];
    eprintln!("svc_partition: ok; {}; {}", report.join("; "), h.summary());
    Ok(())
}
