//! Shared by the service scenarios: a cluster whose nodes each have their own
//! containerd namespace, the busybox `httpd` test image, deploying a service
//! and waiting for containerd to run it, and the checks on the samples.

// Not every scenario uses every helper.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshwork_chaos_tests::containers::{
    Analysis, acknowledged_services, skip_unless_services_capable,
};
use meshwork_chaos_tests::{
    Cluster, ClusterOptions, ReplicaWatch, SvcShape, analyse, deadline, secs,
};

/// The image tag every service scenario runs.
pub const IMAGE: &str = "web:1";

/// How long after the first exact sample a window still tolerates movement
/// (a container stopping while its replacement starts): the fence settle
/// period (3 s) plus a supervisor tick.
pub const SETTLE: Duration = Duration::from_secs(4);

/// Starts `n` nodes (`--cpu cpu`, 1 GiB each), each with its own containerd
/// namespace, or prints the skip line and returns `None` when the machine
/// cannot run service scenarios (not root, no containerd, no busybox).
pub fn start(test: &str, n: usize, cpu: u32) -> Option<Cluster> {
    if skip_unless_services_capable(test) {
        return None;
    }
    let opts = ClusterOptions {
        containerd: true,
        cpu: Some(cpu),
        memory: Some(1 << 30),
        ..ClusterOptions::default()
    };
    match Cluster::start(n, opts) {
        Ok(c) => Some(c),
        Err(e) => panic!("{test}: starting a {n}-node cluster failed: {e:#}"),
    }
}

/// Writes the test image: busybox `httpd` serving `/www` on `$PORT`
/// (`/www/index.html` is the health check), as an OCI layout tar.
pub fn web_image(c: &Cluster) -> Result<PathBuf> {
    let busybox = std::fs::read("/bin/busybox").context("reading /bin/busybox")?;
    let tar = c.work_dir().join("web.tar");
    meshwork_client::oci::write_oci_layout_tar(
        &tar,
        &[
            ("bin/busybox", &busybox, 0o755),
            ("bin/sh", &busybox, 0o755),
            ("www/index.html", b"hello from a chaos replica\n", 0o644),
        ],
        &[
            "/bin/sh",
            "-c",
            "echo \"web starting on port $PORT\"; exec /bin/busybox httpd -f -p $PORT -h /www",
        ],
    )
    .with_context(|| format!("writing {}", tar.display()))?;
    Ok(tar)
}

/// Pushes the test image to node `via` (replicated to every node) and waits
/// until `via` sees every member's containerd ready.
pub fn prepare(c: &Cluster, via: usize) -> Result<()> {
    let tar = web_image(c)?;
    c.push_service_image(via, &tar, IMAGE)?;
    let ready = c.wait_containers_ready(via, &c.members())?;
    c.history().event(format!(
        "image {IMAGE} pushed; containerd ready everywhere after {:.1}s",
        ready.as_secs_f64()
    ));
    Ok(())
}

/// Creates service `name` with `replicas` on node `via` and waits until
/// containerd runs exactly that many on the members; returns the time it took.
pub fn deploy(
    c: &Cluster,
    watch: &ReplicaWatch,
    via: usize,
    name: &str,
    replicas: u32,
    shape: &SvcShape,
) -> Result<Duration> {
    let h = c.history();
    let out = c.svc_create(via, name, IMAGE, replicas, shape);
    h.ensure(out.is_ok(), format!("svc create {name} on n{via}: {out}"))?;
    let took = watch.wait_exact(c, name, replicas, &c.members(), deadline(secs(120.0)))?;
    h.event(format!(
        "{name}: {replicas} replicas running {:.1}s after svc create",
        took.as_secs_f64()
    ));
    Ok(took)
}

/// Waits `d` (a fault's length or an observation window), failing early if a
/// `meshd` exits without the harness killing it.
pub fn observe_for(c: &Cluster, d: Duration) -> Result<()> {
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < d && rounds < 1_000_000 {
        rounds += 1;
        let exits = c.unexpected_exits();
        if !exits.is_empty() {
            c.mark_failed();
            bail!("meshd exited on its own: {}", exits.join("; "));
        }
        std::thread::sleep((d - start.elapsed().min(d)).min(Duration::from_millis(200)));
    }
    Ok(())
}

/// Analyses `service` on `nodes` over `[from, now]` (history time) and fails,
/// printing the timeline, unless it converged to exactly `desired` and stayed
/// exact from `SETTLE` after that to the end. Records the summary as an event.
pub fn check_window(
    c: &Cluster,
    watch: &ReplicaWatch,
    label: &str,
    service: &str,
    desired: u32,
    nodes: &[usize],
    from: Duration,
) -> Result<Analysis> {
    let h = c.history();
    let to = h.now();
    let a = analyse(&watch.samples(), service, desired, nodes, from, to, SETTLE);
    h.event(format!(
        "check {label}: {service} on {nodes:?} over {:.1}s..{:.1}s: {}",
        from.as_secs_f64(),
        to.as_secs_f64(),
        a.summary(from)
    ));
    h.ensure(
        a.converged_at.is_some(),
        format!("{label}: {service} never ran exactly {desired} replicas on {nodes:?}"),
    )?;
    h.ensure(
        a.violations.is_empty(),
        format!(
            "{label}: after converging, {service} on {nodes:?} was not exact:\n  {}",
            a.violations.join("\n  ")
        ),
    )?;
    Ok(a)
}

/// Every node in `nodes` lists every service the history acknowledged, with
/// the acknowledged replica count (no desired state lost), and reports them
/// all running (healthy) within `limit`.
pub fn check_desired_state(c: &Cluster, nodes: &[usize], limit: Duration) -> Result<Duration> {
    let h = c.history();
    let wanted = acknowledged_services(h);
    let (_, took) = c.wait_for(
        limit,
        "every node lists every acknowledged service, all replicas running",
        || {
            for &n in nodes {
                let ls = c.svc_ls(n).map_err(|e| format!("n{n}: {e:#}"))?;
                for (name, (replicas, possible)) in &wanted {
                    let Some(s) = ls.iter().find(|s| &s.name == name) else {
                        if *replicas == 0 {
                            continue; // only unknown-outcome creates
                        }
                        return Err(format!("n{n} does not list service {name}"));
                    };
                    if !possible.contains(&s.replicas) {
                        return Err(format!(
                            "n{n}: {name} wants {} replicas, acknowledged {replicas} \
                             (possible {possible:?})",
                            s.replicas
                        ));
                    }
                    if s.running != s.replicas {
                        return Err(format!("n{n}: {name} {}/{} running", s.running, s.replicas));
                    }
                }
            }
            Ok(())
        },
    )?;
    Ok(took)
}

/// Notes a measured time next to the target (not asserted here: the
/// waits that produced it have their own, looser, deadlines).
pub fn versus_target(c: &Cluster, what: &str, took: Duration, target: Duration) -> String {
    let line = format!(
        "{what}: {:.1}s (target {:.0}s)",
        took.as_secs_f64(),
        target.as_secs_f64()
    );
    if took > target {
        eprintln!("NOTE: {line}: over the target");
        c.history().event(format!("NOTE over target: {line}"));
    }
    line
}
