//! Scenario 7 (full set only: `CHAOS_FULL=1`): five nodes run `web` (9
//! replicas) and `api` (3 replicas); then every host crashes: each `meshd`
//! and every container process in its namespace is SIGKILLed (containerd
//! keeps the stopped containers' records). The nodes start again one after
//! the other with their data dirs. Checked:
//! * the state is reloaded from disk: the first node up, alone, lists both
//!   services with their replica counts;
//! * every service is back (target: within 60 s of the first restart; the
//!   wait allows 120 s) with exactly its replica count on containerd, and no
//!   replica runs twice after converging;
//! * every node lists both services, all replicas running.

mod svc;

use anyhow::Result;
use meshwork_chaos_tests::{ReplicaWatch, SvcShape, deadline, full_only, scenario_length, secs};

#[test]
fn every_service_comes_back_after_all_nodes_crash() -> Result<()> {
    if full_only("svc_restart_all") {
        return Ok(());
    }
    let Some(c) = svc::start("svc_restart_all", 5, 2) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let watch = ReplicaWatch::start(&c);
    let shape = SvcShape::default();

    svc::prepare(&c, 0)?;
    svc::deploy(&c, &watch, 0, "web", 9, &shape)?;
    svc::deploy(&c, &watch, 1, "api", 3, &shape)?;

    for &n in &all {
        c.crash_host(n)?;
    }
    let (_, _) = watch.wait_sample(
        &c,
        deadline(secs(20.0)),
        "no container runs after the crash",
        |s| {
            let running: usize = s
                .nodes
                .values()
                .map(|n| n.containers.as_ref().map(Vec::len).unwrap_or(1))
                .sum();
            if running == 0 {
                Ok(())
            } else {
                Err(format!("{running} still run (or unknown)"))
            }
        },
    )?;

    let first = all[0];
    c.restart(first)?;
    let restarted_at = h.now();
    let alone = c.svc_ls(first)?;
    let listed: Vec<(String, u32)> = alone.iter().map(|s| (s.name.clone(), s.replicas)).collect();
    h.event(format!("n{first} restarted alone lists {listed:?}"));
    for (name, n) in [("web", 9), ("api", 3)] {
        h.ensure(
            listed.contains(&(name.to_string(), n)),
            format!(
                "n{first}, restarted alone, does not list {name} with {n} replicas: {listed:?}"
            ),
        )?;
    }
    for &n in &all[1..] {
        c.restart(n)?;
    }
    let web = watch.wait_exact(&c, "web", 9, &all, deadline(secs(120.0)))?;
    let api = watch.wait_exact(&c, "api", 3, &all, deadline(secs(120.0)))?;
    let since_first = h.now() - restarted_at;
    h.event(format!(
        "after the restarts: web exact {:.1}s, api {:.1}s into the wait; {:.1}s after the first \
         restart",
        web.as_secs_f64(),
        api.as_secs_f64(),
        since_first.as_secs_f64()
    ));
    svc::observe_for(&c, scenario_length(secs(10.0), secs(20.0)))?;
    let w = svc::check_window(
        &c,
        &watch,
        "after the restarts",
        "web",
        9,
        &all,
        restarted_at,
    )?;
    let a = svc::check_window(
        &c,
        &watch,
        "after the restarts",
        "api",
        3,
        &all,
        restarted_at,
    )?;
    let ls = svc::check_desired_state(&c, &all, deadline(secs(30.0)))?;

    let report = [
        svc::versus_target(
            &c,
            "every service exact after the first restart",
            since_first,
            secs(60.0),
        ),
        format!("svc ls agreed {:.1}s later", ls.as_secs_f64()),
        format!("web: {}", w.summary(restarted_at)),
        format!("api: {}", a.summary(restarted_at)),
    ];
    eprintln!(
        "svc_restart_all: ok; {}; {}",
        report.join("; "),
        h.summary()
    );
    Ok(())
}
