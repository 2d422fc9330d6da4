//! Scenario 11 (full set only: `CHAOS_FULL=1`): five nodes run `web` (9
//! replicas); containerd is restarted slowly (SIGTERM, down for 6 s ×
//! `CHAOS_SCALE`, longer than a node's 5 s containerd probe, then started
//! again with `scripts/start-containerd.sh`). Every node shares this one containerd, so
//! this restarts it under all of them at once: stronger than the one
//! node, and it also affects anything else using containerd on the machine
//! at that moment. The shims keep the containers running meanwhile. Checked
//! on what containerd runs, sampled twice a second:
//! * the containers are re-adopted: once containerd answers again, the same
//!   9 container ids run as before, and none is started in their place
//!   (nothing new starts for 20 s × `CHAOS_SCALE` after it is back);
//! * the count is exact in every sample containerd answered, before, during
//!   and after (no replica twice, none missing);
//! * every node lists the service with all 9 running.

mod svc;

use std::collections::BTreeSet;

use anyhow::Result;
use meshwork_chaos_tests::containers::{new_containers, restart_containerd};
use meshwork_chaos_tests::{
    ReplicaWatch, SvcShape, analyse, deadline, full_only, scaled, scenario_length, secs,
};

#[test]
fn containers_survive_a_containerd_restart_and_are_readopted() -> Result<()> {
    if full_only("svc_containerd_restart") {
        return Ok(());
    }
    let Some(c) = svc::start("svc_containerd_restart", 5, 2) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let watch = ReplicaWatch::start(&c);

    svc::prepare(&c, 0)?;
    svc::deploy(&c, &watch, 0, "web", 9, &SvcShape::default())?;
    let before: BTreeSet<String> = {
        let s = watch.latest().expect("a sample");
        all.iter()
            .flat_map(|&n| s.ids_on("web", n).unwrap_or_default())
            .collect()
    };

    let restart_at = h.now();
    // Down for longer than a node's 5 s containerd probe: every node notices.
    let down = match restart_containerd(&h, scaled(secs(6.0))) {
        Ok(d) => d,
        Err(e) => return Err(h.fail(format!("restarting containerd: {e:#}"))),
    };
    let back_at = h.now();
    svc::observe_for(&c, scenario_length(secs(20.0), secs(20.0)))?;
    watch.wait_exact(&c, "web", 9, &all, deadline(secs(30.0)))?;
    let after: BTreeSet<String> = {
        let s = watch.latest().expect("a sample");
        all.iter()
            .flat_map(|&n| s.ids_on("web", n).unwrap_or_default())
            .collect()
    };
    let started = new_containers(&watch.samples(), "web", restart_at, h.now());
    let a = analyse(
        &watch.samples(),
        "web",
        9,
        &all,
        restart_at,
        h.now(),
        secs(0.0),
    );
    h.event(format!(
        "containerd down {:.1}s; since the restart: {}; {} container(s) started",
        down.as_secs_f64(),
        a.summary(restart_at),
        started.values().map(Vec::len).sum::<usize>()
    ));
    h.ensure(
        after == before,
        format!(
            "the containers were not re-adopted: before {before:?}, after {after:?} \
             (started since the restart: {started:?})"
        ),
    )?;
    h.ensure(
        started.is_empty(),
        format!("containers started after the containerd restart: {started:?}"),
    )?;
    h.ensure(
        a.violations.is_empty() && a.converged_at.is_some(),
        format!(
            "the count was not exact across the restart:\n  {}",
            a.violations.join("\n  ")
        ),
    )?;
    let ls = svc::check_desired_state(&c, &all, deadline(secs(30.0)))?;
    eprintln!(
        "svc_containerd_restart: ok; containerd did not answer for {:.1}s; back at {:.1}s; \
         same {} containers; {}; svc ls agreed after {:.1}s; {}",
        down.as_secs_f64(),
        back_at.as_secs_f64(),
        after.len(),
        a.summary(restart_at),
        ls.as_secs_f64(),
        h.summary()
    );
    Ok(())
}
