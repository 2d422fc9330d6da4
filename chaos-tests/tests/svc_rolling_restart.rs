//! Scenario 6 (full set only: `CHAOS_FULL=1`): a rolling restart of all
//! five nodes under gateway load with client retries. `web` runs 3 replicas
//! behind the route `/web`; a client sends 10 requests a second through the
//! gateways, rotating over the five nodes, and retries a request that failed
//! on the connection or got a 5xx up to 3 times against the next node (a
//! client with a list of endpoints). Meanwhile each node in turn is stopped
//! with SIGTERM (`meshd` exits; its containers keep running, to be adopted)
//! and started again; the next one only once every node lists every node
//! alive, containerd runs exactly 3 replicas, and every node reports them
//! running. Checked:
//! * at least 99 % of the requests succeeded (after the client's retries);
//!   every request is in the history with its tries;
//! * no desired state lost: at the end every node lists `web` with the same
//!   spec (image, replicas, resources, health check, generation, ...) and the
//!   route `/web` with the same values as right after they were created, and
//!   reports 3 of 3 running;
//! * once a restarted node is back (the three conditions above), the
//!   replica count on containerd stays exactly 3, no replica twice, until the
//!   next stop, and after the last node is back to the end. (While a node
//!   restarts, a replica may move if the others declare it dead, and then
//!   runs twice until the restarted node acts and drops its old container,
//!   as after any agent crash: reported with a NOTE, not asserted.)

mod svc;

use std::time::Duration;

use anyhow::Result;
use meshwork_chaos_tests::gateway::http_get;
use meshwork_chaos_tests::{
    GatewayLoad, LoadOptions, LoadSummary, ReplicaWatch, SvcShape, analyse, deadline, full_only,
    scenario_length, secs,
};

/// The route's path, as the client requests it (`/index.html` on the replica).
const PATH: &str = "/web/index.html";
/// What the test image serves there.
const BODY: &str = "hello from a chaos replica";
/// Replicas of `web`.
const REPLICAS: u32 = 3;

#[test]
fn rolling_restart_under_gateway_load() -> Result<()> {
    if full_only("svc_rolling_restart") {
        return Ok(());
    }
    let Some(c) = svc::start("svc_rolling_restart", 5, 2) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let watch = ReplicaWatch::start(&c);
    // Steady time after each restart (and before the first): the load runs on
    // a settled mesh, and the window after convergence is checked.
    let hold = scenario_length(secs(5.0), secs(15.0));

    svc::prepare(&c, 0)?;
    svc::deploy(&c, &watch, 0, "web", REPLICAS, &SvcShape::default())?;
    let out = c.route_add_service(0, "/web", "web");
    h.ensure(
        out.is_ok(),
        format!("route add /web --service web on n0: {out}"),
    )?;
    let specs = c.svc_specs(0)?;
    let routes = c.routes(0)?;
    h.event(format!(
        "desired state: {} service(s), {} route(s): {}",
        specs.len(),
        routes.len(),
        serde_json::to_string(&routes).unwrap_or_default()
    ));
    let (_, served) = c.wait_for(
        deadline(secs(30.0)),
        "every node's gateway serves /web",
        || {
            for &n in &all {
                match http_get(c.http_addr(n), PATH, secs(3.0)) {
                    Ok((200, body)) if body.contains(BODY) => {}
                    other => return Err(format!("n{n}: {other:?}")),
                }
            }
            Ok(())
        },
    )?;
    svc::check_desired_state(&c, &all, deadline(secs(30.0)))?;

    let mut load = GatewayLoad::start(
        &c,
        &all,
        4,
        LoadOptions {
            path: PATH.into(),
            expect: BODY.into(),
            per_second: 10.0,
            retries: 3,
            timeout: secs(2.0),
            max_duration: deadline(secs(900.0)),
        },
    );
    let load_began = h.now();
    svc::observe_for(&c, hold)?;

    let mut rounds = Vec::new();
    let mut settled = h.now();
    for &n in &all {
        let stopping = h.now();
        let stop = c.stop(n, deadline(secs(15.0)))?;
        c.restart(n)?;
        let restarted_at = h.now();
        let alive = c.wait_all_alive(&all, &all, deadline(secs(30.0)))?;
        let exact = watch.wait_exact(&c, "web", REPLICAS, &all, deadline(secs(60.0)))?;
        let running = svc::check_desired_state(&c, &all, deadline(secs(60.0)))?;
        settled = h.now();
        h.event(format!(
            "n{n} back: exited {:.1}s after SIGTERM; after its start every node lists all \
             alive in {:.1}s, exactly {REPLICAS} on containerd {:.1}s later, all running \
             {:.1}s later",
            stop.as_secs_f64(),
            alive.as_secs_f64(),
            exact.as_secs_f64(),
            running.as_secs_f64()
        ));
        // While it restarted (reported, not asserted: a replica that moved
        // because the node was declared dead runs twice until the restarted
        // node acts and drops its old container, as after any agent crash).
        let during = analyse(
            &watch.samples(),
            "web",
            REPLICAS,
            &all,
            stopping,
            settled,
            Duration::ZERO,
        );
        if let Some((from, to)) = during.duplicate_span {
            let note = format!(
                "NOTE while n{n} restarted a replica ran twice for {:.1}s ({:.1}s..{:.1}s, at \
                 most {} at once)",
                during.duplicate_time.as_secs_f64(),
                from.as_secs_f64(),
                to.as_secs_f64(),
                during.max_duplicated
            );
            eprintln!("{note}");
            h.event(note);
        }
        svc::observe_for(&c, hold)?;
        let a = svc::check_window(
            &c,
            &watch,
            &format!("after n{n} is back"),
            "web",
            REPLICAS,
            &all,
            settled,
        )?;
        rounds.push(format!(
            "n{n}: exit {:.1}s, back {:.1}s after its start{}; then {}",
            stop.as_secs_f64(),
            (settled - restarted_at).as_secs_f64(),
            match during.duplicate_span {
                Some(_) => format!(
                    " (duplicates for {:.1}s meanwhile)",
                    during.duplicate_time.as_secs_f64()
                ),
                None => String::new(),
            },
            a.summary(settled)
        ));
    }

    let requests = load.stop();
    let load_time = h.now() - load_began;
    let summary = LoadSummary::of(&requests);
    h.event(format!(
        "gateway load over {:.1}s: {}",
        load_time.as_secs_f64(),
        summary.line()
    ));
    let minimum = (load_time.as_secs_f64() * 10.0 * 0.5) as usize;
    h.ensure(
        summary.total >= minimum,
        format!(
            "the client sent only {} requests in {:.1}s (at least {minimum} expected at 10/s)",
            summary.total,
            load_time.as_secs_f64()
        ),
    )?;
    let failed: Vec<String> = summary
        .failed
        .iter()
        .map(|r| {
            format!(
                "#{} at {:.1}s: {}",
                r.seq,
                r.start.as_secs_f64(),
                r.describe()
            )
        })
        .collect();
    h.ensure(
        summary.success_ratio() >= 0.99,
        format!(
            "fewer than 99 % of the requests succeeded: {}; failed:\n  {}",
            summary.line(),
            failed.join("\n  ")
        ),
    )?;

    // No desired state lost: every node has the spec and the route as created.
    let (_, agreed) = c.wait_for(
        deadline(secs(10.0)),
        "every node lists web and /web as created",
        || {
            for &n in &all {
                let s = c.svc_specs(n).map_err(|e| format!("n{n}: {e:#}"))?;
                if s != specs {
                    return Err(format!(
                        "n{n} lists services {}, created {}",
                        serde_json::to_string(&s).unwrap_or_default(),
                        serde_json::to_string(&specs).unwrap_or_default()
                    ));
                }
                let r = c.routes(n).map_err(|e| format!("n{n}: {e:#}"))?;
                if r != routes {
                    return Err(format!(
                        "n{n} lists routes {}, created {}",
                        serde_json::to_string(&r).unwrap_or_default(),
                        serde_json::to_string(&routes).unwrap_or_default()
                    ));
                }
            }
            Ok(())
        },
    )?;
    let ls = svc::check_desired_state(&c, &all, deadline(secs(30.0)))?;
    let last = svc::check_window(
        &c,
        &watch,
        "after the last node is back",
        "web",
        REPLICAS,
        &all,
        settled,
    )?;

    let report = [
        format!(
            "gateway served /web on all 5 {:.1}s after route add",
            served.as_secs_f64()
        ),
        format!("load: {}", summary.line()),
        format!("failed: [{}]", failed.join(", ")),
        format!("restarts: {}", rounds.join("; ")),
        format!(
            "specs and routes agreed {:.1}s, svc ls {:.1}s",
            agreed.as_secs_f64(),
            ls.as_secs_f64()
        ),
        format!("after the last node is back: {}", last.summary(settled)),
    ];
    eprintln!(
        "svc_rolling_restart: ok; {}; {}",
        report.join("; "),
        h.summary()
    );
    Ok(())
}
