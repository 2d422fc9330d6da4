//! Scenario 4 (full set only: `CHAOS_FULL=1`): five nodes run `web` (9
//! replicas, spread); every packet from the other hosts into one node that
//! runs 2 of them is dropped for 30 s × `CHAOS_SCALE` (it can still send),
//! then the drop is removed. Checked on what containerd runs, sampled twice a
//! second, over all five nodes:
//! * the count is exact again during the drop (target: within 30 s; the wait
//!   allows 60 s): the time from the cut to the start of the last run of exact
//!   samples is printed;
//! * at most one spurious placement: a placement is a container of `web` that
//!   starts during the drop; those of the replicas the cut-off node ran are
//!   needed (they have to move if it fences itself), every other one is
//!   spurious; and no replica index starts more than once (no flapping);
//! * after the drop ends: exact, no replica twice, every node lists the service.

mod svc;

use anyhow::Result;
use meshwork_chaos_tests::containers::new_containers;
use meshwork_chaos_tests::{
    ReplicaWatch, SvcShape, analyse, deadline, full_only, scaled, scenario_length, secs,
};

#[test]
fn a_node_that_hears_nothing_costs_at_most_one_spurious_placement() -> Result<()> {
    if full_only("svc_one_way") {
        return Ok(());
    }
    let Some(c) = svc::start("svc_one_way", 5, 2) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let length = scaled(secs(30.0));
    let watch = ReplicaWatch::start(&c);

    svc::prepare(&c, 0)?;
    svc::deploy(&c, &watch, 0, "web", 9, &SvcShape::default())?;
    let sample = watch.latest().expect("a sample");
    let count_on = |n: usize| sample.ids_on("web", n).map(|s| s.len()).unwrap_or(0);
    let deaf = all
        .iter()
        .copied()
        .filter(|&n| n != 0)
        .max_by_key(|&n| (count_on(n), std::cmp::Reverse(n)))
        .expect("five nodes");
    let held_by_deaf: Vec<u32> = sample
        .nodes
        .get(&deaf)
        .and_then(|s| s.containers.as_ref())
        .map(|cs| {
            cs.iter()
                .filter(|c| c.service == "web")
                .map(|c| c.replica)
                .collect()
        })
        .unwrap_or_default();

    c.one_way_drop(deaf)?;
    let cut_at = h.now();
    svc::observe_for(&c, length)?;
    // Exact by now, or (bounded) soon: the last exact run must reach the end.
    let limit = deadline(secs(60.0)).saturating_sub(h.now() - cut_at);
    watch.wait_exact(&c, "web", 9, &all, limit.max(secs(5.0)))?;
    let during = analyse(
        &watch.samples(),
        "web",
        9,
        &all,
        cut_at,
        h.now(),
        svc::SETTLE,
    );
    let settled = during
        .exact_since
        .map(|t| t.saturating_sub(cut_at))
        .unwrap_or_default();
    h.event(format!(
        "during the drop into n{deaf}: exact since {:.1}s after the cut (the count may dip \
         while its replicas move; only the last exact run is checked); {}",
        settled.as_secs_f64(),
        during.summary(cut_at)
    ));
    let placements = new_containers(&watch.samples(), "web", cut_at, h.now());
    let mut spurious = Vec::new();
    let mut flapping = Vec::new();
    for (replica, starts) in &placements {
        let needed = usize::from(held_by_deaf.contains(replica));
        for (at, node, id) in starts.iter().skip(needed) {
            spurious.push(format!(
                "replica {replica} on n{node} at {:.1}s ({id})",
                at.as_secs_f64()
            ));
        }
        if starts.len() > 1 {
            flapping.push(format!("replica {replica} started {} times", starts.len()));
        }
    }
    let moved: usize = placements.values().map(Vec::len).sum();
    h.event(format!(
        "during the drop into n{deaf} (which ran {held_by_deaf:?}): {moved} container(s) \
         started; spurious: {spurious:?}"
    ));
    h.ensure(
        spurious.len() <= 1,
        format!(
            "more than one spurious placement while n{deaf} heard nothing: {}",
            spurious.join("; ")
        ),
    )?;
    h.ensure(
        flapping.is_empty(),
        format!("replicas flapped: {}", flapping.join("; ")),
    )?;

    c.heal()?;
    let healed_at = h.now();
    let back = watch.wait_exact(&c, "web", 9, &all, deadline(secs(60.0)))?;
    svc::observe_for(&c, scenario_length(secs(10.0), secs(20.0)))?;
    let after = svc::check_window(&c, &watch, "after the drop", "web", 9, &all, healed_at)?;
    let ls = svc::check_desired_state(&c, &all, deadline(secs(30.0)))?;

    let report = [
        format!("n{deaf} ran replicas {held_by_deaf:?}"),
        svc::versus_target(&c, "exact during the drop", settled, secs(30.0)),
        format!(
            "{moved} placement(s) during the drop, {} spurious",
            spurious.len()
        ),
        format!("exact {:.1}s after the heal", back.as_secs_f64()),
        format!("svc ls agreed {:.1}s later", ls.as_secs_f64()),
        format!("during: {}", during.summary(cut_at)),
        format!("after: {}", after.summary(healed_at)),
    ];
    eprintln!("svc_one_way: ok; {}; {}", report.join("; "), h.summary());
    Ok(())
}
