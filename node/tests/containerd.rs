//! Registry to containerd with the real daemon: an image pushed on one node is pulled peer to
//! peer by another, imported into that node's containerd namespace, and runs under `ctr`.
//! Skipped (with a message) when containerd is not running; CI starts it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{TestCluster, TestNode, write_secret};
use meshwork_client::{oci, push_image};

const SOCKET: &str = "/run/containerd/containerd.sock";

/// An OCI image of Debian's busybox-static with `sh` and `echo` as copies.
fn busybox_image(dir: &Path) -> Option<std::path::PathBuf> {
    let busybox = std::fs::read("/bin/busybox").ok()?;
    let tar = dir.join("busybox.tar");
    oci::write_oci_layout_tar(
        &tar,
        &[
            ("bin/busybox", &busybox, 0o755),
            ("bin/sh", &busybox, 0o755),
            ("bin/echo", &busybox, 0o755),
        ],
        &["/bin/echo", "hello from meshwork"],
    )
    .unwrap();
    Some(tar)
}

fn ctr(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ctr")
        .args(["--namespace", ns])
        .args(args)
        .output()
        .expect("ctr runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_pushed_on_one_node_runs_in_another_nodes_containerd() {
    if !Path::new(SOCKET).exists() {
        eprintln!("skipped: containerd not running at {SOCKET}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(tar) = busybox_image(dir.path()) else {
        eprintln!("skipped: /bin/busybox missing (apt-get install busybox-static)");
        return;
    };
    let secret = write_secret(dir.path(), "secret");
    let ns = format!("meshwork-test-{}", std::process::id());
    let mut a = TestNode::new(dir.path(), "n0", &secret, vec![]);
    a.extra_args = vec!["--containerd-namespace".into(), format!("{ns}-a")];
    a.start();
    let mut b = TestNode::new(dir.path(), "n1", &secret, vec![a.p2p]);
    b.extra_args = vec!["--containerd-namespace".into(), ns.clone()];
    b.start();
    let c = TestCluster {
        dir,
        nodes: vec![a, b],
    };
    c.wait_states(
        1,
        &[("n0", "alive"), ("n1", "alive")],
        Duration::from_secs(60),
    )
    .await;

    let mut on_a = c.nodes[0].client().await;
    push_image(&mut on_a, &tar, "busybox:1", 1, |_, _| {})
        .await
        .unwrap();
    let mut on_b = c.nodes[1].client().await;
    common::wait_until(Duration::from_secs(60), "n1 knows busybox:1", || {
        let mut cl = on_b.clone();
        async move { cl.image("busybox:1").await.is_ok() }
    })
    .await
    .unwrap();
    let r = on_b.import_image("busybox:1").await.unwrap();
    assert_eq!(r.containerd_name, "meshwork.local/busybox:1");
    assert_eq!(r.layers_unpacked, 1);

    let images = ctr(&ns, &["images", "ls", "-q"]);
    assert!(String::from_utf8_lossy(&images.stdout).contains("meshwork.local/busybox:1"));
    let run = ctr(
        &ns,
        &[
            "run",
            "--rm",
            "meshwork.local/busybox:1",
            &format!("t{}", std::process::id()),
        ],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        "hello from meshwork"
    );

    // Importing again writes nothing new.
    let again = on_b.import_image("busybox:1").await.unwrap();
    assert_eq!((again.blobs_written, again.layers_unpacked), (0, 0));

    let _ = ctr(&ns, &["images", "rm", "--sync", "meshwork.local/busybox:1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_without_containerd_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret");
    let mut a = TestNode::new(dir.path(), "n0", &secret, vec![]);
    a.extra_args = vec![
        "--containerd-socket".into(),
        dir.path().join("no.sock").display().to_string(),
    ];
    a.start();
    let tar = dir.path().join("img.tar");
    oci::write_oci_layout_tar(&tar, &[("f", b"x", 0o644)], &["/f"]).unwrap();
    let mut cl = a.client().await;
    push_image(&mut cl, &tar, "img:1", 1, |_, _| {})
        .await
        .unwrap();
    let e = cl.import_image("img:1").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition), "{e}");
    assert!(e.to_string().contains("containerd is not running"), "{e}");
}
