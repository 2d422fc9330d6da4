//! Scenario 1, service part (fast subset): five nodes of one core each run a
//! service of 9 replicas of 300m, binpacked, so three nodes run 3 each. One
//! of those nodes' `meshd` is `kill -9`ed (its containers keep running, as
//! they would on a machine where only the agent died). Checked on what
//! containerd runs, sampled twice a second:
//! * the survivors run exactly 9 again (target: within 30 s; the wait allows
//!   60 s and the measured time is printed) and stay exact after converging;
//! * the killed node restarts with the same data dir: it must not keep its
//!   old containers next to their replacements; after convergence exactly
//!   9 run on all five nodes and no replica runs twice;
//! * every node lists the service with 9 replicas, all running.

mod svc;

use anyhow::Result;
use meshwork_chaos_tests::{ReplicaWatch, SvcShape, deadline, scenario_length, secs};

#[test]
fn replicas_of_a_killed_node_come_back_once() -> Result<()> {
    let Some(c) = svc::start("svc_kill", 5, 1) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let watch = ReplicaWatch::start(&c);
    let hold = scenario_length(secs(5.0), secs(30.0));

    svc::prepare(&c, 0)?;
    let shape = SvcShape {
        cpu: "300m".into(),
        binpack: true,
    };
    let initial = svc::deploy(&c, &watch, 0, "web", 9, &shape)?;

    // The victim: a node other than n0 (the client's node) running 3 replicas.
    let sample = watch.latest().expect("deploy saw a sample");
    let placement_of = |n: usize| sample.ids_on("web", n).map(|s| s.len()).unwrap_or(0);
    let victim = all
        .iter()
        .copied()
        .filter(|&n| n != 0)
        .max_by_key(|&n| (placement_of(n), std::cmp::Reverse(n)))
        .expect("five nodes");
    let lost = placement_of(victim);
    h.ensure(
        lost == 3,
        format!("binpack should put 3 replicas on some node other than n0, best is n{victim} with {lost}"),
    )?;
    let orphans = sample.ids_on("web", victim).unwrap_or_default();
    let survivors: Vec<usize> = all.iter().copied().filter(|&n| n != victim).collect();

    c.kill(victim)?;
    let killed_at = h.now();
    let restore = watch.wait_exact(&c, "web", 9, &survivors, deadline(secs(60.0)))?;
    h.event(format!(
        "survivors run 9 again {:.1}s after the kill",
        restore.as_secs_f64()
    ));
    svc::observe_for(&c, hold)?;
    let down = svc::check_window(
        &c,
        &watch,
        &format!("while n{victim} is down"),
        "web",
        9,
        &survivors,
        killed_at,
    )?;

    c.restart(victim)?;
    let restarted_at = h.now();
    let rejoin = watch.wait_exact(&c, "web", 9, &all, deadline(secs(60.0)))?;
    let orphans_gone =
        meshwork_chaos_tests::containers::first_where(&watch.samples(), restarted_at, |s| {
            s.ids_on("web", victim)
                .is_some_and(|ids| ids.is_disjoint(&orphans))
        });
    h.event(format!(
        "exactly 9 on all nodes {:.1}s after the restart; the killed node's old containers \
         gone {}",
        rejoin.as_secs_f64(),
        orphans_gone
            .map(|t| format!("{:.1}s after it", (t - restarted_at).as_secs_f64()))
            .unwrap_or("never (adopted)".into())
    ));
    svc::observe_for(&c, hold + secs(5.0))?;
    let after = svc::check_window(
        &c,
        &watch,
        "after the restart",
        "web",
        9,
        &all,
        restarted_at,
    )?;
    let ls = svc::check_desired_state(&c, &all, deadline(secs(30.0)))?;

    let report = [
        format!("initial placement {:.1}s", initial.as_secs_f64()),
        svc::versus_target(&c, "9 running again after kill -9", restore, secs(30.0)),
        format!(
            "old containers of n{victim} removed {:.1}s after its restart",
            orphans_gone
                .map(|t| (t - restarted_at).as_secs_f64())
                .unwrap_or(f64::NAN)
        ),
        format!(
            "exact on all 5 {:.1}s after the restart",
            rejoin.as_secs_f64()
        ),
        format!("svc ls agreed {:.1}s later", ls.as_secs_f64()),
        format!("down: {}", down.summary(killed_at)),
        format!("after restart: {}", after.summary(restarted_at)),
    ];
    eprintln!("svc_kill: ok; {}; {}", report.join("; "), h.summary());
    Ok(())
}
