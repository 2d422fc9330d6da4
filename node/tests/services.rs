//! Container services on the real containerd: three `meshd` processes on loopback, each in its
//! own containerd namespace, running a busybox `httpd` image built by the test. Skipped (with
//! a message) when containerd is not running or busybox-static is missing; CI has both.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Mesh, TestCluster, TestNode, http_call, wait_until, write_secret};
use meshwork_client::{MeshClient, oci, push_image};
use meshwork_proto::v1 as pb;

const SOCKET: &str = common::CONTAINERD_SOCKET;

/// An OCI image whose command serves `/www` with busybox httpd on `$PORT`, after printing a
/// line to stdout; `/www/index.html` says `body`.
fn web_image(dir: &Path, name: &str, body: &str) -> Option<PathBuf> {
    let busybox = std::fs::read("/bin/busybox").ok()?;
    let tar = dir.join(format!("{name}.tar"));
    oci::write_oci_layout_tar(
        &tar,
        &[
            ("bin/busybox", &busybox, 0o755),
            ("bin/sh", &busybox, 0o755),
            ("www/index.html", body.as_bytes(), 0o644),
        ],
        &[
            "/bin/sh",
            "-c",
            "echo \"web starting on port $PORT\"; exec /bin/busybox httpd -f -v -p $PORT -h /www",
        ],
    )
    .unwrap();
    Some(tar)
}

/// (container id, pid) of the running tasks in a containerd namespace.
fn running_pids(ns: &str) -> Vec<(String, u32)> {
    let out = Command::new("ctr")
        .args(["--namespace", ns, "task", "ls"])
        .output()
        .expect("ctr runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(2) == Some("RUNNING"))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect()
}

/// The container's process runs confined: no new privileges, a seccomp filter, no
/// CAP_SYS_ADMIN or CAP_NET_RAW, the memory limit in its cgroup, `PORT` set, and the network
/// namespace of meshd (here the test's own).
fn check_confinement(ns: &str, memory: u64) {
    let (id, pid) = running_pids(ns).into_iter().next().expect("a running task");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("Seccomp:"), "2", "seccomp filter mode: {status}");
    let bounding = u64::from_str_radix(&field("CapBnd:"), 16).unwrap();
    assert_eq!(bounding & (1 << 21), 0, "no CAP_SYS_ADMIN");
    assert_eq!(bounding & (1 << 13), 0, "no CAP_NET_RAW");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|kv| kv.starts_with(b"PORT=2")),
        "PORT is set from the node's range"
    );
    let net = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_eq!(
        net(&pid.to_string()),
        net("self"),
        "shares meshd's network namespace"
    );
    let limit = format!("/sys/fs/cgroup/memory/meshwork/{ns}/{id}/memory.limit_in_bytes");
    match std::fs::read_to_string(&limit) {
        Ok(v) => assert_eq!(v.trim().parse::<u64>().unwrap(), memory),
        Err(_) => {
            // cgroup v2: one unified hierarchy.
            let v2 = format!("/sys/fs/cgroup/meshwork/{ns}/{id}/memory.max");
            let v = std::fs::read_to_string(&v2).unwrap_or_else(|e| panic!("{v2}: {e}"));
            assert_eq!(v.trim().parse::<u64>().unwrap(), memory);
        }
    }
}

/// Sends two GETs on one connection and checks both answers and that the connection stays
/// open in between.
async fn keep_alive_twice(port: u16, path: &str, body: &[u8]) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut stream = BufReader::new(stream);
    for round in 0..2 {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            let n = stream.read_line(&mut line).await.unwrap();
            assert!(
                n > 0,
                "round {round}: connection closed; head so far {head:?}"
            );
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_ascii_lowercase());
        }
        assert!(head[0].starts_with("http/1.1 200"), "{head:?}");
        assert!(!head.iter().any(|h| h == "connection: close"), "{head:?}");
        let length: usize = head
            .iter()
            .find_map(|h| h.strip_prefix("content-length: "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no content-length: {head:?}"));
        let mut got = vec![0u8; length];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, body);
    }
}

/// Running tasks in a containerd namespace, by container id.
fn running_tasks(ns: &str) -> Vec<String> {
    let out = Command::new("ctr")
        .args(["--namespace", ns, "task", "ls"])
        .output()
        .expect("ctr runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(2) == Some("RUNNING"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// A mesh with a directory for the images the test builds; `None` when containerd or busybox
/// is missing.
async fn start(n: usize, tag: &str) -> Option<(Mesh, PathBuf)> {
    if !Path::new(SOCKET).exists() {
        eprintln!("skipped: containerd not running at {SOCKET}");
        return None;
    }
    if !Path::new("/bin/busybox").exists() {
        eprintln!("skipped: /bin/busybox missing (apt-get install busybox-static)");
        return None;
    }
    let mesh = Mesh::start(n, tag).await;
    let images = mesh.cluster.dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    Some((mesh, images))
}

fn total_running(m: &Mesh) -> usize {
    m.namespaces.iter().map(|ns| running_tasks(ns).len()).sum()
}

fn create_request(name: &str, image: &str, replicas: u32) -> pb::CreateServiceRequest {
    pb::CreateServiceRequest {
        name: name.into(),
        image: image.into(),
        replicas,
        cpu_millis: 100,
        memory_bytes: 32 << 20,
        port: 8080,
        health_http: "/index.html".into(),
        ..Default::default()
    }
}

fn running_healthy(ps: &[pb::ServiceReplica]) -> usize {
    ps.iter()
        .filter(|r| r.state == "running" && r.healthy)
        .count()
}

async fn ps(client: &mut MeshClient, name: &str) -> Vec<pb::ServiceReplica> {
    client.service_ps(name).await.unwrap_or_default()
}

fn show(ps: &[pb::ServiceReplica]) -> String {
    ps.iter()
        .map(|r| {
            format!(
                "{}: node={} state={} healthy={} restarts={} reason={}",
                r.index, r.node, r.state, r.healthy, r.restarts, r.reason
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_heal_scale_roll_and_route_on_real_containerd() {
    let Some((mut f, images)) = start(3, "svc").await else {
        return;
    };
    let v1 = web_image(&images, "v1", "hello from v1\n").unwrap();
    let v2 = web_image(&images, "v2", "hello from v2\n").unwrap();
    let mut c0 = f.client(0).await;
    push_image(&mut c0, &v1, "web:1", 2, |_, _| {})
        .await
        .unwrap();
    push_image(&mut c0, &v2, "web:2", 2, |_, _| {})
        .await
        .unwrap();

    // Three replicas, one per node (spread), as containerd itself reports.
    c0.create_service(create_request("web", "web:1", 3))
        .await
        .unwrap();
    f.wait(120, "3 healthy replicas", async || {
        running_healthy(&ps(&mut c0, "web").await) == 3
    })
    .await;
    f.wait(10, "containerd runs 3 tasks", async || {
        total_running(&f) == 3
    })
    .await;
    for ns in &f.namespaces {
        assert_eq!(running_tasks(ns).len(), 1, "spread: one per node");
    }
    check_confinement(&f.namespaces[0], 32 << 20);

    // Kill a container behind meshd's back: it comes back, with a restart counted.
    let victim_ns = f.namespaces[1].clone();
    let victim = running_tasks(&victim_ns)[0].clone();
    let out = Command::new("ctr")
        .args([
            "--namespace",
            &victim_ns,
            "task",
            "kill",
            "-s",
            "SIGKILL",
            &victim,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait(60, "the killed container restarted", async || {
        let p = ps(&mut c0, "web").await;
        running_healthy(&p) == 3 && p.iter().any(|r| r.restarts >= 1)
    })
    .await;
    assert_eq!(total_running(&f), 3);

    // A route on every node; a request through a node that runs no replica reaches one.
    c0.scale_service("web", 1).await.unwrap();
    f.wait(60, "one replica left", async || {
        running_healthy(&ps(&mut c0, "web").await) == 1 && total_running(&f) == 1
    })
    .await;
    c0.add_route(pb::Route {
        path: "/web".into(),
        service: "web".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let running_on: Vec<usize> = (0..3)
        .filter(|i| !running_tasks(&f.namespaces[*i]).is_empty())
        .collect();
    assert_eq!(running_on.len(), 1);
    let other = (0..3).find(|i| *i != running_on[0]).unwrap();
    let port = f.cluster.nodes[other].http;
    f.wait(
        30,
        "the gateway of a node without a replica answers",
        async || {
            let (status, body) = http_call(port, "GET", "/web/index.html", b"").await;
            status == 200 && body == b"hello from v1\n"
        },
    )
    .await;
    let (status, _) = http_call(port, "GET", "/nothing-here", b"").await;
    assert_eq!(status, 404);
    // busybox httpd closes every connection; the gateway does not pass that on: two requests
    // on one client connection.
    keep_alive_twice(port, "/web/index.html", b"hello from v1\n").await;

    // Logs from any node: the replica's stdout (and httpd's access log on stderr).
    let mut c_other = f.client(other).await;
    let mut stream = c_other
        .service_logs(pb::ServiceLogsRequest {
            name: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    assert!(text.contains("web starting on port"), "logs: {text:?}");

    // Scale out to 5: two nodes run two.
    c0.scale_service("web", 5).await.unwrap();
    f.wait(120, "5 healthy replicas", async || {
        running_healthy(&ps(&mut c0, "web").await) == 5 && total_running(&f) == 5
    })
    .await;

    // Rolling update to v2: every replica ends on v2; never more than one down at a time.
    c0.update_service(pb::UpdateServiceRequest {
        name: "web".into(),
        image: "web:2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut min_healthy = 5;
    f.wait(180, "every replica on generation 2", async || {
        let p = ps(&mut c0, "web").await;
        min_healthy = min_healthy.min(running_healthy(&p));
        let svc = c0.service("web").await.unwrap();
        running_healthy(&p) == 5 && svc.updated == 5 && svc.rollout.is_empty()
    })
    .await;
    assert!(
        min_healthy >= 4,
        "at most one replica down during the update"
    );
    f.wait(30, "the gateway serves v2", async || {
        let (status, body) = http_call(port, "GET", "/web/index.html", b"").await;
        status == 200 && body == b"hello from v2\n"
    })
    .await;

    // A restarted meshd adopts its containers instead of starting new ones.
    let before: Vec<Vec<String>> = f.namespaces.iter().map(|ns| running_tasks(ns)).collect();
    assert!(f.cluster.nodes[2].terminate(Duration::from_secs(20)));
    f.cluster.nodes[2].start();
    f.wait(60, "n2 back and every replica healthy", async || {
        running_healthy(&ps(&mut c0, "web").await) == 5
    })
    .await;
    let after: Vec<Vec<String>> = f.namespaces.iter().map(|ns| running_tasks(ns)).collect();
    let mut b2 = before[2].clone();
    let mut a2 = after[2].clone();
    b2.sort();
    a2.sort();
    assert_eq!(a2, b2, "the same containers run on the restarted node");
    assert_eq!(total_running(&f), 5);

    // kill -9 a node: its replicas come back on the others; after it returns, no duplicates.
    let lost = running_tasks(&f.namespaces[1]).len();
    assert!(lost > 0);
    f.cluster.nodes[1].kill9();
    f.wait(90, "5 healthy replicas on n0 and n2", async || {
        let p = ps(&mut c0, "web").await;
        running_healthy(&p) == 5 && p.iter().all(|r| r.node != "n1")
    })
    .await;
    f.cluster.nodes[1].start();
    f.wait(90, "exactly 5 containers after n1 returns", async || {
        total_running(&f) == 5 && running_healthy(&ps(&mut c0, "web").await) == 5
    })
    .await;

    // Removing the service stops everything.
    c0.remove_service("web").await.unwrap();
    f.wait(60, "no containers left", async || total_running(&f) == 0)
        .await;
    let err = c0.service_ps("web").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_services_are_refused_and_crash_loops_back_off() {
    let Some((f, images)) = start(1, "bad").await else {
        return;
    };
    let v1 = web_image(&images, "v1", "v1\n").unwrap();
    let mut c = f.client(0).await;
    push_image(&mut c, &v1, "web:1", 1, |_, _| {})
        .await
        .unwrap();
    f.wait(30, "the node advertises containers", async || {
        c.nodes()
            .await
            .map(|n| {
                n.iter().any(|n| {
                    n.labels.get("meshwork.containers").map(String::as_str) == Some("ready")
                })
            })
            .unwrap_or(false)
    })
    .await;

    let unknown = c
        .create_service(create_request("web", "nope:1", 1))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some(tonic::Code::NotFound), "{unknown}");
    assert!(unknown.to_string().contains("nope:1"));

    let mut huge = create_request("web", "web:1", 1);
    huge.cpu_millis = 64_000;
    let err = c.create_service(huge).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    assert!(
        err.to_string().contains("largest node, n0, has 2 CPU"),
        "{err}"
    );

    for (bad, what) in [
        (
            pb::CreateServiceRequest {
                name: "Bad_Name".into(),
                ..create_request("x", "web:1", 1)
            },
            "service name",
        ),
        (
            pb::CreateServiceRequest {
                env: [("1X".to_string(), "v".to_string())].into_iter().collect(),
                ..create_request("x", "web:1", 1)
            },
            "env name",
        ),
        (
            pb::CreateServiceRequest {
                port: 70000,
                ..create_request("x", "web:1", 1)
            },
            "port",
        ),
    ] {
        let err = c.create_service(bad).await.unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains(what), "{err}");
    }
    let err = c.scale_service("absent", 2).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound));

    // A command that exits at once: a crash loop, visible, with a growing backoff.
    let mut crash = create_request("crash", "web:1", 1);
    crash.cmd = vec!["/bin/sh".into(), "-c".into(), "echo dying; exit 3".into()];
    crash.health_http = String::new();
    c.create_service(crash).await.unwrap();
    f.wait(60, "the crash loop shows in ps", async || {
        let p = ps(&mut c, "crash").await;
        p.len() == 1 && p[0].restarts >= 2 && p[0].reason.contains("exited with code 3")
    })
    .await;
    let p = ps(&mut c, "crash").await;
    assert_eq!(p[0].state, "backoff", "{}", show(&p));
    // The backoff doubles: after 2 restarts the wait is at least 4 s, so the count stays
    // low (no busy loop) over the next seconds.
    let restarts = p[0].restarts;
    assert!(p[0].reason.contains("restarting in"), "{}", show(&p));
    let wait: u64 = p[0]
        .reason
        .split("restarting in ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(wait >= 2, "backoff grows: {}", show(&p));
    assert!(restarts < 6, "{}", show(&p));

    // An update whose new replica crash-loops is rolled back to the running template.
    let mut roll = create_request("roll", "web:1", 1);
    roll.health_http = String::new();
    c.create_service(roll).await.unwrap();
    f.wait(60, "roll runs", async || {
        running_healthy(&ps(&mut c, "roll").await) == 1
    })
    .await;
    let good = c.service("roll").await.unwrap();
    c.update_service(pb::UpdateServiceRequest {
        name: "roll".into(),
        cmd: vec!["/bin/sh".into(), "-c".into(), "exit 7".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    f.wait(120, "the update is rolled back", async || {
        let svc = c.service("roll").await.unwrap();
        svc.rollout.starts_with("rolled back") && svc.cmd.is_empty()
    })
    .await;
    f.wait(60, "the old template runs again", async || {
        let svc = c.service("roll").await.unwrap();
        running_healthy(&ps(&mut c, "roll").await) == 1 && svc.updated == 1
    })
    .await;
    let svc = c.service("roll").await.unwrap();
    assert!(svc.rollout.contains("restarted"), "{}", svc.rollout);
    assert!(svc.generation > good.generation);
}

/// Runs `ctr --namespace ns args…`, which must succeed; its standard output.
fn ctr(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ctr")
        .args(["--namespace", ns])
        .args(args)
        .output()
        .expect("ctr runs");
    assert!(
        out.status.success(),
        "ctr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Image names in a containerd namespace.
fn containerd_images(ns: &str) -> Vec<String> {
    ctr(ns, &["images", "ls", "-q"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Snapshot keys in a containerd namespace (default snapshotter), in `ctr snapshots ls` order.
fn snapshot_keys(ns: &str) -> Vec<String> {
    ctr(ns, &["snapshots", "ls"])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The supervisor remembers which images it imported into containerd; when one is removed
/// behind its back (and containerd collects its layers), the next replica's create fails, the
/// memory is dropped, and the retry imports the image again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starts_after_its_image_was_removed_from_containerd() {
    let Some((f, images)) = start(1, "reimport").await else {
        return;
    };
    let ns = f.namespaces[0].clone();
    let v1 = web_image(&images, "v1", "v1\n").unwrap();
    let mut c = f.client(0).await;
    push_image(&mut c, &v1, "web:1", 1, |_, _| {})
        .await
        .unwrap();
    c.create_service(create_request("web", "web:1", 1))
        .await
        .unwrap();
    f.wait(120, "one healthy replica", async || {
        running_healthy(&ps(&mut c, "web").await) == 1
    })
    .await;
    let old_container = ps(&mut c, "web").await[0].container_id.clone();
    assert!(!old_container.is_empty());
    let imported = containerd_images(&ns);
    assert!(
        imported.iter().any(|i| i.ends_with("/web:1")),
        "{imported:?}"
    );

    // No container left, then the image removed with a synchronous garbage collection: its
    // content and layer snapshots are gone from containerd.
    c.scale_service("web", 0).await.unwrap();
    f.wait(60, "no replica left", async || {
        running_tasks(&ns).is_empty() && ps(&mut c, "web").await.is_empty()
    })
    .await;
    // The stopped replica's status goes with it, so that a later claim of the same replica
    // and epoch (the scale-up below) does not show the old container's state as its own.
    f.wait(30, "the stopped replica's status is deleted", async || {
        c.get("svcstat/web/0").await.is_err()
    })
    .await;
    f.wait(30, "the container record is removed", async || {
        ctr(&ns, &["containers", "ls", "-q"]).is_empty()
    })
    .await;
    for image in &imported {
        ctr(&ns, &["images", "rm", "--sync", image]);
    }
    assert!(containerd_images(&ns).is_empty());
    // The layer snapshots too (containerd may keep them a while after the image is gone,
    // and a create on a kept one would succeed without any re-import).
    for key in snapshot_keys(&ns).iter().rev() {
        ctr(&ns, &["snapshots", "rm", key]);
    }
    f.wait(30, "no snapshot left", async || {
        snapshot_keys(&ns).is_empty()
    })
    .await;

    c.scale_service("web", 1).await.unwrap();
    f.wait(120, "the replica runs again", async || {
        let p = ps(&mut c, "web").await;
        assert!(
            p.iter().all(|r| r.container_id != old_container),
            "stale status shown: {}",
            show(&p)
        );
        running_healthy(&p) == 1
    })
    .await;
    let p = ps(&mut c, "web").await;
    assert_eq!(running_tasks(&ns), vec![p[0].container_id.clone()]);
    let again = containerd_images(&ns);
    assert!(
        again.iter().any(|i| i.ends_with("/web:1")),
        "the image was imported again: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_containerd_runs_no_services_but_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret");
    let mut n = TestNode::new(dir.path(), "n0", &secret, vec![]);
    n.extra_args = vec![
        "--containerd-socket".into(),
        dir.path().join("no-containerd.sock").display().to_string(),
    ];
    n.start();
    let cluster = TestCluster {
        dir,
        nodes: vec![n],
    };
    cluster
        .wait_states(0, &[("n0", "alive")], Duration::from_secs(60))
        .await;
    let mut c = cluster.nodes[0].client().await;
    let tar = cluster.dir.path().join("v1.tar");
    if let Some(img) = web_image(cluster.dir.path(), "v1", "v1\n") {
        std::fs::rename(img, &tar).unwrap();
    } else {
        eprintln!("skipped: /bin/busybox missing");
        return;
    }
    push_image(&mut c, &tar, "web:1", 1, |_, _| {})
        .await
        .unwrap();
    c.create_service(create_request("web", "web:1", 1))
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the replica is pending with a reason",
        || {
            let mut c = c.clone();
            async move {
                let p = ps(&mut c, "web").await;
                p.len() == 1 && p[0].state == "pending" && p[0].reason.contains("containerd")
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let nodes = c.nodes().await.unwrap();
    assert!(!nodes[0].labels.contains_key("meshwork.containers"));
    // The node still answers its other APIs and runs functions.
    let (status, _) = http_call(cluster.nodes[0].http, "GET", "/healthz", b"").await;
    assert_eq!(status, 200);
    let wasm = std::fs::read(common::example_wasm("hello")).unwrap();
    let blob = c
        .put_blob(
            std::io::Cursor::new(wasm),
            meshwork_client::UploadOptions {
                pinned: true,
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    c.deploy_function(pb::DeployFunctionRequest {
        name: "hello".into(),
        module: blob.blake3,
        memory_bytes: 64 << 20,
        timeout_ms: 5000,
        concurrency: 4,
        replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let (status, body) = http_call(cluster.nodes[0].http, "GET", "/fn/hello?name=ann", b"").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("hello, ann"));
}

/// An image whose command answers an HTTP upgrade with 101 and then echoes every byte:
/// what a WebSocket echo server looks like to a proxy.
fn upgrade_echo_image(dir: &Path) -> Option<PathBuf> {
    let busybox = std::fs::read("/bin/busybox").ok()?;
    let tar = dir.join("ws.tar");
    let script = b"#!/bin/sh\n\
        while IFS= read -r line; do\n\
          line=$(printf '%s' \"$line\" | tr -d '\\r')\n\
          [ -z \"$line\" ] && break\n\
        done\n\
        printf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n\\r\\n'\n\
        exec cat\n";
    oci::write_oci_layout_tar(
        &tar,
        &[
            ("bin/busybox", &busybox, 0o755),
            ("bin/sh", &busybox, 0o755),
            ("bin/tr", &busybox, 0o755),
            ("bin/cat", &busybox, 0o755),
            ("bin/ws.sh", script, 0o755),
        ],
        &[
            "/bin/sh",
            "-c",
            "exec /bin/busybox nc -ll -p $PORT -e /bin/ws.sh",
        ],
    )
    .unwrap();
    Some(tar)
}

/// Sends an upgrade request through a gateway and returns the response head and the stream.
async fn upgrade(port: u16, path: &str) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") && got.len() < 4096 {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        got.push(byte[0]);
    }
    (String::from_utf8_lossy(&got).into_owned(), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_the_gateway_and_health_commands_restart() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some((f, images)) = start(2, "ws").await else {
        return;
    };
    let ws = upgrade_echo_image(&images).unwrap();
    let web = web_image(&images, "web", "hi\n").unwrap();
    let mut c = f.client(0).await;
    push_image(&mut c, &ws, "ws:1", 2, |_, _| {}).await.unwrap();
    push_image(&mut c, &web, "web:1", 2, |_, _| {})
        .await
        .unwrap();

    // An upgrade through the gateway of the node that does not run the replica.
    let mut req = create_request("echo", "ws:1", 1);
    req.health_http = String::new();
    c.create_service(req).await.unwrap();
    f.wait(90, "the echo replica runs", async || {
        running_healthy(&ps(&mut c, "echo").await) == 1
    })
    .await;
    let host = ps(&mut c, "echo").await[0].node.clone();
    let other = if host == "n0" { 1 } else { 0 };
    let port = f.cluster.nodes[other].http;
    // The response limit does not apply to upgraded connections: the echo passes 8 bytes.
    for (path, websocket) in [("/plain", false), ("/ws", true)] {
        c.add_route(pb::Route {
            path: path.into(),
            service: "echo".into(),
            websocket,
            max_response_bytes: websocket.then_some(8),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    f.wait(30, "the route reached the other node", async || {
        let (head, _) = upgrade(port, "/plain/").await;
        head.starts_with("HTTP/1.1 400")
    })
    .await;
    // The two routes are separate records: gossip may bring `/ws` later than `/plain`.
    let mut upgraded = None;
    f.wait(
        30,
        "the websocket route reached the other node",
        async || {
            let (head, stream) = upgrade(port, "/ws/").await;
            assert!(
                head.starts_with("HTTP/1.1 101") || head.starts_with("HTTP/1.1 404"),
                "{head}"
            );
            if head.starts_with("HTTP/1.1 101") {
                upgraded = Some(stream);
            }
            upgraded.is_some()
        },
    )
    .await;
    let mut stream = upgraded.expect("upgraded");
    for message in [
        &b"hello over the mesh\n"[..],
        &[0x81, 0x02, b'h', b'i', b'\n'],
    ] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed))
            .await
            .expect("echo within 10 s")
            .unwrap();
        assert_eq!(echoed, message);
    }

    // A health command that starts failing restarts the container; the fresh task passes.
    let mut req = create_request("checked", "web:1", 1);
    req.health_http = String::new();
    req.health_cmd = vec![
        "/bin/sh".into(),
        "-c".into(),
        "test ! -e /dev/shm/broken".into(),
    ];
    c.create_service(req).await.unwrap();
    f.wait(90, "the checked replica is healthy", async || {
        running_healthy(&ps(&mut c, "checked").await) == 1
    })
    .await;
    let p = ps(&mut c, "checked").await;
    let ns = &f.namespaces[if p[0].node == "n0" { 0 } else { 1 }];
    let out = Command::new("ctr")
        .args([
            "--namespace",
            ns,
            "task",
            "exec",
            "--exec-id",
            "break-it",
            &p[0].container_id,
            "/bin/sh",
            "-c",
            ": > /dev/shm/broken",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait(
        60,
        "the unhealthy replica restarted and is healthy again",
        async || {
            let p = ps(&mut c, "checked").await;
            p.len() == 1 && p[0].restarts >= 1 && running_healthy(&p) == 1
        },
    )
    .await;
}
