//! Scenario 8 (fast subset): a host crashes in the middle of a batch job
//! with 3 attempts allowed. Five nodes; a container job (the busybox test
//! image running `sleep 8; echo done`), an array of 4 indices (placed
//! spread, so several nodes run one) with `--retries 2`. As soon as an index runs on a node
//! other than n0 (the client's node), that host crashes: its `meshd` and the
//! job's container processes are SIGKILLed. Every change of the job's
//! attempts (as n0 reports them) and the job containers containerd runs are
//! in the history. Checked:
//! * the job ends SUCCEEDED; every index has exactly one SUCCEEDED attempt
//!   and at most 3 attempts; no attempt is left STARTING or RUNNING;
//! * the attempts running on the crashed node end FAILED with reason `node
//!   lost`, and no attempt of another node is marked lost;
//! * on containerd no index ever ran twice at once, and no index ran more
//!   than 3 containers;
//! * every surviving node reports the same attempts; after the crashed node
//!   comes back (same data dir) nothing changes: n0 keeps reporting exactly
//!   those attempts, the restarted node (which answers from its disk, the
//!   job as at the crash, until anti-entropy catches it up) reports them
//!   too and keeps reporting them for 6 s of its executor's passes (no
//!   second success recorded, no attempt revived), every node agrees, and
//!   no container of the job is left in any containerd namespace.

mod svc;

use std::collections::BTreeSet;

use anyhow::Result;
use meshwork_chaos_tests::containers::{ctr, job_service, new_containers};
use meshwork_chaos_tests::{
    ExactlyOnce, JobTracker, JobView, ReplicaWatch, deadline, job_problems, secs,
};

/// The job's command (the image's busybox; `$MESH_JOB_INDEX` is replaced
/// by the node).
const CMD: &str = "/bin/busybox sh -c '/bin/busybox sleep 8; echo done $MESH_JOB_INDEX'";
/// Indices of the array.
const ARRAY: u32 = 4;
/// Attempts after the first.
const RETRIES: u32 = 2;

#[test]
fn a_crash_mid_job_retries_elsewhere_and_succeeds_once() -> Result<()> {
    let Some(c) = svc::start("job_kill", 5, 2) else {
        return Ok(());
    };
    let h = c.history().clone();
    let all = c.members();
    let watch = ReplicaWatch::start(&c);
    svc::prepare(&c, 0)?;

    let array = ARRAY.to_string();
    let retries = RETRIES.to_string();
    let (out, job) = c.job_submit(
        0,
        &[
            "--name",
            "chaos",
            "--image",
            svc::IMAGE,
            "--cmd",
            CMD,
            "--array",
            &array,
            "--retries",
            &retries,
            "--cpu",
            "100m",
            "--memory",
            "32Mi",
        ],
    );
    let Some(job) = job else {
        return Err(h.fail(format!("job submit on n0: {out}")));
    };
    let submitted_at = h.now();
    let tracker = JobTracker::new(&job.id);
    let service = job_service(&job.id);

    // An index running on a node other than n0: that host crashes.
    let client = 0;
    let names: Vec<String> = all.iter().map(|&n| c.name(n)).collect();
    let ((victim, running_at_crash), started) = c.wait_for(
        deadline(secs(120.0)),
        "an index of the job RUNNING on a node other than n0",
        || {
            let j = tracker.poll(&c, client).map_err(|e| format!("{e:#}"))?;
            let candidates = j.nodes_with(&["RUNNING"]);
            let Some(victim) = all
                .iter()
                .copied()
                .filter(|&n| n != client)
                .find(|&n| candidates.contains(&names[n]))
            else {
                return Err(j.render());
            };
            Ok((
                victim,
                j.attempts_on(&names[victim], &["STARTING", "RUNNING"]),
            ))
        },
    )?;
    c.crash_host(victim)?;
    let crashed_at = h.now();
    h.event(format!(
        "crashed n{victim} ({}) {:.1}s after the submit, running (index, attempt) \
         {running_at_crash:?}",
        names[victim],
        started.as_secs_f64()
    ));

    // The lost attempts are marked and retried; the job ends.
    let mut marked_lost = None;
    let (j, ended) = c.wait_for(deadline(secs(150.0)), "the job ends", || {
        let j = tracker.poll(&c, client).map_err(|e| format!("{e:#}"))?;
        if marked_lost.is_none() && !j.attempts_on(&names[victim], &["FAILED"]).is_empty() {
            marked_lost = Some(h.now() - crashed_at);
        }
        if j.ended() { Ok(j) } else { Err(j.render()) }
    })?;
    h.event(format!(
        "job {} {:.1}s after the crash: {}",
        j.state,
        ended.as_secs_f64(),
        j.render()
    ));
    let want = ExactlyOnce {
        max_attempts: RETRIES + 1,
        crashed: names[victim].clone(),
        running_at_crash: running_at_crash.clone(),
    };
    let problems = job_problems(&j, &want);
    h.ensure(
        problems.is_empty(),
        format!(
            "job {} after crashing n{victim}:\n  {}",
            j.id,
            problems.join("\n  ")
        ),
    )?;

    // containerd: never an index twice at once, at most 3 containers per index.
    let samples = watch.samples();
    let twice: Vec<String> = samples
        .iter()
        .filter(|s| s.at >= submitted_at)
        .filter_map(|s| {
            let p = s.placement(&service, &all)?;
            (p.duplicates() > 0).then(|| format!("at {:.1}s: {}", s.at.as_secs_f64(), s.render()))
        })
        .collect();
    h.ensure(
        twice.is_empty(),
        format!("an index ran twice at once:\n  {}", twice.join("\n  ")),
    )?;
    let containers = new_containers(&samples, &service, submitted_at, h.now());
    let per_index: Vec<(u32, usize)> = containers.iter().map(|(i, c)| (*i, c.len())).collect();
    h.ensure(
        per_index.iter().all(|(_, n)| *n <= (RETRIES + 1) as usize),
        format!(
            "more than {} containers for an index: {per_index:?}",
            RETRIES + 1
        ),
    )?;

    // Every survivor reports the same attempts.
    let survivors: Vec<usize> = all.iter().copied().filter(|&n| n != victim).collect();
    let agree = |nodes: &[usize], label: &str| {
        c.wait_for(deadline(secs(15.0)), label, || {
            for &n in nodes {
                let other = tracker.poll(&c, n).map_err(|e| format!("n{n}: {e:#}"))?;
                if other.indices != j.indices {
                    return Err(format!("n{n}: {}", other.render()));
                }
            }
            Ok(())
        })
        .map(|(_, d)| d)
    };
    agree(&survivors, "every survivor reports the same attempts")?;

    // The crashed node comes back: nothing changes. Right after its start it
    // answers from its disk (the job as it was at the crash) until
    // anti-entropy brings it the rest; the survivors' view must not change at
    // all, and the restarted node's must catch up and then stay.
    c.restart(victim)?;
    let back_at = h.now();
    c.wait_all_alive(&all, &all, deadline(secs(30.0)))?;
    // Ok(None): n reports the final attempts; Ok(Some(why)): it reports
    // others; Err: it could not be asked (a slow answer under load).
    let differs = |n: usize| -> Result<Option<String>, String> {
        let again: JobView = tracker.poll(&c, n).map_err(|e| format!("n{n}: {e:#}"))?;
        Ok((again.indices != j.indices).then(|| {
            format!(
                "n{n} reports\n  {}\n  instead of\n  {}",
                again.render(),
                j.render()
            )
        }))
    };
    let (survivor_changed, caught_up) = c.wait_for(
        deadline(secs(30.0)),
        &format!("n{victim}, restarted, reports the job's attempts as they ended"),
        || {
            // A survivor's view changing is a failure at once, not "not yet".
            if let Some(why) = differs(client)? {
                return Ok(Some(why));
            }
            match differs(victim)? {
                None => Ok(None),
                Some(why) => Err(why),
            }
        },
    )?;
    if let Some(why) = survivor_changed {
        return Err(h.fail(format!("after n{victim} came back the job changed: {why}")));
    }
    // A few executor passes of the restarted node (every 0.5 s) after it
    // acts again (the fence's 3 s after seeing a majority).
    let settle = secs(6.0);
    let watching = h.now();
    let mut rounds = 0;
    while h.now() - watching < settle && rounds < 1000 {
        rounds += 1;
        for n in [client, victim] {
            match differs(n) {
                Ok(None) => {}
                Ok(Some(why)) => {
                    return Err(h.fail(format!("after n{victim} came back the job changed: {why}")));
                }
                Err(e) => h.event(format!("could not read the job: {e}")),
            }
        }
        svc::observe_for(&c, secs(0.5))?;
    }
    agree(
        &all,
        "every node, the restarted one too, reports the same attempts",
    )?;
    let prefix = format!("job-{}-", j.id);
    c.wait_for(
        deadline(secs(30.0)),
        "no container of the job left in any containerd namespace",
        || {
            for &n in &all {
                let ns = c.containerd_namespace(n);
                let out = ctr(&["-n", &ns, "containers", "ls", "-q"])
                    .map_err(|e| format!("n{n}: {e:#}"))?;
                let left: BTreeSet<&str> = out
                    .stdout
                    .lines()
                    .map(str::trim)
                    .filter(|l| l.starts_with(&prefix))
                    .collect();
                if !left.is_empty() {
                    return Err(format!("n{n} keeps {left:?}"));
                }
            }
            Ok(())
        },
    )?;
    let gone_at = h.now();

    let lost: Vec<String> = j
        .indices
        .iter()
        .flat_map(|i| i.attempts.iter().map(move |a| (i.index, a)))
        .filter(|(_, a)| a.reason == meshwork_chaos_tests::jobs::NODE_LOST)
        .map(|(i, a)| format!("i{i}#{}", a.number))
        .collect();
    let report = [
        format!(
            "index running on n{victim} {:.1}s after submit",
            started.as_secs_f64()
        ),
        format!(
            "lost attempts [{}] marked {}",
            lost.join(","),
            marked_lost
                .map(|d| format!("{:.1}s after the crash", d.as_secs_f64()))
                .unwrap_or("(before the first poll)".into())
        ),
        format!(
            "job SUCCEEDED {:.1}s after the crash, {} attempts",
            ended.as_secs_f64(),
            j.attempts
        ),
        format!("containers per index {per_index:?}"),
        format!(
            "n{victim} restarted: reported the final attempts {:.1}s after it answered, \
             unchanged for {:.0}s more; no container of the job left {:.1}s after its start",
            caught_up.as_secs_f64(),
            settle.as_secs_f64(),
            (gone_at - back_at).as_secs_f64()
        ),
        j.render(),
    ];
    eprintln!("job_kill: ok; {}; {}", report.join("; "), h.summary());
    Ok(())
}
