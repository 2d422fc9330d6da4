//! The mesh as its own registry, with real `meshd` processes on loopback: push on one node,
//! pull on another while several holders serve pieces, holders that die or lie, replication,
//! garbage collection, interrupted pushes and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TestCluster, TestNode, http_call, wait_until};
use meshwork_client::{MeshClient, UploadOptions, oci, push_image};

const CONVERGE: Duration = Duration::from_secs(60);

/// Pseudo-random bytes (no repeated chunks), so the store cannot dedup within a file.
fn noise(n: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; n];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut v);
    v
}

fn image_tar(dir: &Path, name: &str, payload: &[u8]) -> PathBuf {
    let path = dir.join(format!("{name}.tar"));
    oci::write_oci_layout_tar(
        &path,
        &[("data/payload.bin", payload, 0o644)],
        &["/bin/true"],
    )
    .unwrap();
    path
}

async fn alive_all(c: &TestCluster) {
    let expect: Vec<(String, &str)> = c.nodes.iter().map(|n| (n.name.clone(), "alive")).collect();
    let expect: Vec<(&str, &str)> = expect.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    for i in 0..c.nodes.len() {
        c.wait_states(i, &expect, CONVERGE).await;
    }
}

async fn holders_of(node: &TestNode, reference: &str) -> Vec<String> {
    let Ok(mut c) = MeshClient::connect(&node.endpoint()).await else {
        return vec![];
    };
    match c.image(reference).await {
        Ok(i) => i
            .holders
            .into_iter()
            .filter(|h| h.alive)
            .map(|h| h.name)
            .collect(),
        Err(_) => vec![],
    }
}

/// Pushes `tar` as `reference` to n0 with one copy (so n0 alone holds it) and waits until n1
/// knows the image and its holder.
async fn push_to_n0_for_n1(
    c: &TestCluster,
    tar: &Path,
    reference: &str,
) -> meshwork_client::proto::Image {
    let mut a = c.nodes[0].client().await;
    let image = push_image(&mut a, tar, reference, 1, |_, _| {})
        .await
        .unwrap();
    wait_until(
        CONVERGE,
        &format!("n1 knows {reference} and its holder"),
        || async { !holders_of(&c.nodes[1], reference).await.is_empty() },
    )
    .await
    .unwrap();
    image
}

async fn read_layer(node: &TestNode, reference: &str) -> Vec<u8> {
    let mut c = node.client().await;
    let image = c.image(reference).await.unwrap();
    let layer = &image.layers[0];
    let mut out = Vec::new();
    c.get_blob(&layer.blake3, &mut out, |_, _| {})
        .await
        .unwrap();
    out
}

/// Blob streams a node opened over `via` ("direct" or "libp2p"), from its /metrics.
async fn streams_opened(node: &TestNode, via: &str) -> u64 {
    let (status, body) = http_call(node.http, "GET", "/metrics", b"").await;
    assert_eq!(status, 200);
    let line = format!("mesh_blob_streams_opened_total{{via=\"{via}\"}} ");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Starts a pull of `reference` on `node` and returns once it has stored more than
/// `after_bytes`, with the task to await for the pull's result.
async fn pull_under_way(
    node: &TestNode,
    reference: &str,
    after_bytes: u64,
) -> tokio::task::JoinHandle<Result<(), meshwork_client::ClientError>> {
    let started = Arc::new(AtomicBool::new(false));
    let s = started.clone();
    let endpoint = node.endpoint();
    let reference = reference.to_string();
    let pull = tokio::spawn(async move {
        let mut cl = MeshClient::connect(&endpoint).await.unwrap();
        cl.pull_image(&reference, move |done, _| {
            if done > after_bytes {
                s.store(true, Ordering::SeqCst);
            }
        })
        .await
    });
    wait_until(CONVERGE, "the pull is under way", || async {
        started.load(Ordering::SeqCst)
    })
    .await
    .unwrap();
    pull
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_on_a_replicate_and_pull_on_c_from_several_holders() {
    let c = TestCluster::start(3);
    alive_all(&c).await;
    let payload = noise(6 << 20, 1);
    let tar = image_tar(c.dir.path(), "app", &payload);
    let mut a = c.nodes[0].client().await;
    let image = push_image(&mut a, &tar, "app:1.0", 2, |_, _| {})
        .await
        .unwrap();
    assert_eq!(image.reference, "app:1.0");
    assert_eq!(image.layers.len(), 1);
    assert!(image.layers[0].sha256.starts_with("sha256:"));

    // Replication brings a second holder without anyone asking.
    wait_until(CONVERGE, "app:1.0 has 2 holders", || async {
        holders_of(&c.nodes[2], "app:1.0").await.len() >= 2
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    // Whoever does not hold it pulls it peer to peer, and the bytes are the pushed bytes.
    for node in &c.nodes {
        wait_until(CONVERGE, "every node knows app:1.0", || async {
            !holders_of(node, "app:1.0").await.is_empty()
        })
        .await
        .unwrap();
        let mut cl = node.client().await;
        cl.pull_image("app:1.0", |_, _| {}).await.unwrap();
    }
    wait_until(CONVERGE, "n1 sees 3 holders of app:1.0", || async {
        holders_of(&c.nodes[1], "app:1.0").await.len() == 3
    })
    .await
    .unwrap();
    let layer = read_layer(&c.nodes[2], "app:1.0").await;
    let (_, layer_bytes) = oci_layer_of(&tar);
    assert_eq!(blake3::hash(&layer), blake3::hash(&layer_bytes));

    // The digests the image records are the OCI ones from the tar.
    let plan = oci::plan_image(&tar).unwrap();
    let inspected = a.image("app:1.0").await.unwrap();
    assert_eq!(inspected.manifest.unwrap().sha256, plan.manifest.digest);
    assert_eq!(inspected.layers[0].sha256, plan.layers[0].digest);

    // Every node takes direct blob connections, so every piece moved over one.
    let mut direct = 0;
    for node in &c.nodes {
        direct += streams_opened(node, "direct").await;
        assert_eq!(streams_opened(node, "libp2p").await, 0, "{}", node.name);
    }
    assert!(direct > 0, "no direct blob connection was opened");
}

/// A counter (without labels) from a node's /metrics, 0 if it is not there yet.
async fn metric(node: &TestNode, name: &str) -> u64 {
    let (status, body) = http_call(node.http, "GET", "/metrics", b"").await;
    assert_eq!(status, 200);
    let line = format!("{name} ");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_of_several_layers_is_pulled_whole_and_a_repeated_layer_once() {
    let c = TestCluster::start(2);
    alive_all(&c).await;
    // Four layers, the last a copy of the first (the same blob twice in the manifest); the
    // pull fetches several blobs at once, and both mentions of the copy must end in one pull.
    let payloads: Vec<Vec<u8>> = (0..3).map(|i| noise(3 << 20, 20 + i)).collect();
    let files: Vec<[(&str, &[u8], u32); 1]> = payloads
        .iter()
        .map(|p| [("data/payload.bin", p.as_slice(), 0o644)])
        .collect();
    let layers: Vec<&[(&str, &[u8], u32)]> = vec![&files[0], &files[1], &files[2], &files[0]];
    let tar = c.dir.path().join("layers.tar");
    oci::write_docker_save_tar(&tar, &layers, &["/bin/true"]).unwrap();
    let image = push_to_n0_for_n1(&c, &tar, "layers:1").await;
    assert_eq!(image.layers.len(), 4);
    assert_eq!(image.layers[0].blake3, image.layers[3].blake3);

    let mut b = c.nodes[1].client().await;
    let served_before = metric(&c.nodes[0], "mesh_blob_bytes_served_total").await;
    let last = Arc::new(std::sync::Mutex::new((0u64, 0u64)));
    let l = last.clone();
    b.pull_image("layers:1", move |done, total| {
        *l.lock().unwrap() = (done, total);
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let (done, total) = *last.lock().unwrap();
    assert_eq!(done, total, "the last progress report is the whole image");

    // n1 holds every blob, each with the pushed bytes.
    let pulled = b.image("layers:1").await.unwrap();
    assert!(pulled.holders.iter().any(|h| h.name == "n1"), "{pulled:?}");
    for (i, layer) in pulled.layers.iter().enumerate() {
        let mut bytes = Vec::new();
        b.get_blob(&layer.blake3, &mut bytes, |_, _| {})
            .await
            .unwrap();
        assert_eq!(
            blake3::hash(&bytes).to_hex().as_str(),
            layer.blake3,
            "layer {i}"
        );
    }
    // The repeated layer crossed the network once: n0 served the three distinct layers (and
    // the small manifest and config), less than a fourth layer more.
    let served = metric(&c.nodes[0], "mesh_blob_bytes_served_total").await - served_before;
    let distinct: u64 = pulled.layers[..3].iter().map(|l| l.size).sum();
    assert!(
        served >= distinct && served < distinct + pulled.layers[3].size,
        "n0 served {served} bytes for {distinct} bytes of distinct layers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_opens_as_many_streams_as_its_blob_needs() {
    let c = TestCluster::start(2);
    alive_all(&c).await;
    let mut a = c.nodes[0].client().await;
    let mut b = c.nodes[1].client().await;
    // (bytes, streams the puller opens to the one holder): the stream that brought the chunk
    // list carries chunks too, and one request asks for up to 8 chunks, so a blob of up to
    // 8 MiB needs one stream; larger ones get up to four.
    for (seed, (size, streams)) in [(100_000, 1), (3 << 20, 1), (20 << 20, 3), (40 << 20, 4)]
        .into_iter()
        .enumerate()
    {
        // Seeds of their own: blobs sharing chunks would pull only what is missing.
        let bytes = noise(size, 40 + seed as u8);
        let put = a
            .put_blob(
                std::io::Cursor::new(bytes.clone()),
                UploadOptions {
                    pinned: true,
                    replicas: 1,
                    ..Default::default()
                },
                |_| {},
            )
            .await
            .unwrap();
        wait_until(CONVERGE, "n1 knows the blob and its holder", || {
            let mut cl = b.clone();
            let hash = put.blake3.clone();
            async move {
                cl.blobs()
                    .await
                    .is_ok_and(|bs| bs.iter().any(|x| x.blake3 == hash && !x.holders.is_empty()))
            }
        })
        .await
        .unwrap();
        let before = streams_opened(&c.nodes[1], "direct").await;
        let mut got = Vec::new();
        b.get_blob(&put.blake3, &mut got, |_, _| {}).await.unwrap();
        assert!(got == bytes, "{size} bytes: not the bytes put");
        let opened = streams_opened(&c.nodes[1], "direct").await - before;
        assert_eq!(opened, streams, "streams n1 opened to pull {size} bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_blob_port_pulls_and_serves_over_libp2p_streams() {
    let c = TestCluster::start(1);
    let secret = c.dir.path().join("secret");
    let mut plain = TestNode::new(c.dir.path(), "plain", &secret, vec![c.nodes[0].p2p]);
    plain.extra_args = vec!["--blob-port".into(), "off".into()];
    plain.start();
    c.wait_states(0, &[("n0", "alive"), ("plain", "alive")], CONVERGE)
        .await;
    // Pushed on each node with one copy, pulled by the other.
    let on_plain = image_tar(c.dir.path(), "p", &noise(5 << 20, 3));
    let on_n0 = image_tar(c.dir.path(), "q", &noise(5 << 20, 4));
    push_image(&mut plain.client().await, &on_plain, "p:1", 1, |_, _| {})
        .await
        .unwrap();
    push_image(&mut c.nodes[0].client().await, &on_n0, "q:1", 1, |_, _| {})
        .await
        .unwrap();
    for (node, reference, tar) in [(&c.nodes[0], "p:1", &on_plain), (&plain, "q:1", &on_n0)] {
        wait_until(CONVERGE, "the image is known", || async {
            !holders_of(node, reference).await.is_empty()
        })
        .await
        .unwrap();
        let mut cl = node.client().await;
        cl.pull_image(reference, |_, _| {})
            .await
            .unwrap_or_else(|e| panic!("{reference}: {e}\n{}", plain.log_tail()));
        let layer = read_layer(node, reference).await;
        assert_eq!(blake3::hash(&layer), blake3::hash(&oci_layer_of(tar).1));
    }
    // n0 found no blob port for `plain`; `plain` opens none itself.
    assert_eq!(streams_opened(&c.nodes[0], "direct").await, 0);
    assert!(streams_opened(&c.nodes[0], "libp2p").await > 0);
    assert!(streams_opened(&plain, "libp2p").await > 0);
    assert_eq!(streams_opened(&plain, "direct").await, 0);
}

/// The first layer of an image tar: (digest, bytes).
fn oci_layer_of(tar: &Path) -> (String, Vec<u8>) {
    let plan = oci::plan_image(tar).unwrap();
    let want = plan.layers[0].digest.clone();
    let mut out = Vec::new();
    oci::stream_blobs(tar, &plan, |b, r| -> Result<(), std::io::Error> {
        if b.digest == want {
            r.read_to_end(&mut out)?;
        }
        Ok(())
    })
    .unwrap();
    (want, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_mid_pull_and_a_lying_holder_do_not_stop_the_pull() {
    let mut c = TestCluster::start(3);
    // A fourth node that serves corrupted pieces.
    let secret = c.dir.path().join("secret");
    let mut liar = TestNode::new(c.dir.path(), "liar", &secret, vec![c.nodes[0].p2p]);
    liar.extra_args = vec!["--test-lie".into(), "corrupt-pieces".into()];
    liar.start();
    let everyone = [
        ("liar", "alive"),
        ("n0", "alive"),
        ("n1", "alive"),
        ("n2", "alive"),
    ];
    for i in 0..3 {
        c.wait_states(i, &everyone, CONVERGE).await;
    }

    // Large enough that the first requests of the honest holders cannot take every chunk
    // (12 streams x 8 chunks in flight): the liar always gets some to serve.
    let payload = noise(128 << 20, 2);
    let tar = image_tar(c.dir.path(), "big", &payload);
    let mut a = c.nodes[0].client().await;
    push_image(&mut a, &tar, "big:1", 1, |_, _| {})
        .await
        .unwrap();
    // n1 and the liar hold it too (pulled explicitly), n2 does not.
    for node in [&c.nodes[1], &liar, &c.nodes[2]] {
        wait_until(CONVERGE, "every node knows big:1", || async {
            match MeshClient::connect(&node.endpoint()).await {
                Ok(mut cl) => cl.image("big:1").await.is_ok(),
                Err(_) => false,
            }
        })
        .await
        .unwrap();
    }
    for node in [&c.nodes[1], &liar] {
        let mut cl = node.client().await;
        cl.pull_image("big:1", |_, _| {}).await.unwrap();
    }
    wait_until(CONVERGE, "n2 sees 3 holders of big:1", || async {
        holders_of(&c.nodes[2], "big:1").await.len() == 3
    })
    .await
    .unwrap();

    // n2 pulls; as soon as bytes flow, n0 is killed.
    let pull = pull_under_way(&c.nodes[2], "big:1", 0).await;
    c.nodes[0].kill9();
    pull.await
        .unwrap()
        .unwrap_or_else(|e| panic!("pull failed: {e}\n{}", c.logs()));

    // What n2 stored is exactly what was pushed, and it caught the liar.
    let layer = read_layer(&c.nodes[2], "big:1").await;
    assert_eq!(blake3::hash(&layer), blake3::hash(&oci_layer_of(&tar).1));
    let log = std::fs::read_to_string(&c.nodes[2].log).unwrap();
    assert!(
        log.contains("corrupt piece") || log.contains("served a corrupt piece"),
        "n2 never saw a corrupt piece from the liar:\n{}",
        c.nodes[2].log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puller_killed_mid_pull_drops_its_pulling_record_once_restarted_and_resumes() {
    let mut c = TestCluster::start(2);
    alive_all(&c).await;
    let payload = noise(96 << 20, 30);
    let tar = image_tar(c.dir.path(), "stale", &payload);
    push_to_n0_for_n1(&c, &tar, "stale:1").await;
    let a = c.nodes[0].client().await;

    // n1 pulls; the holder is paused so the pull stays under way, with n1's record "n1 is
    // pulling this blob" in the state; n1 dies mid-pull.
    let pull = pull_under_way(&c.nodes[1], "stale:1", 8 << 20).await;
    c.nodes[0].signal("STOP");
    let mut b = c.nodes[1].client().await;
    let record = b.list("pulling/").await.unwrap();
    let record = record
        .first()
        .expect("n1 lists its pulling record while its pull is under way")
        .key
        .clone();
    c.nodes[1].kill9();
    let _ = pull.await;
    c.nodes[0].signal("CONT");
    // n0 keeps the record of the pull that died (it came with the gossip of the pull's start).
    let on_n0 = |present: bool| {
        let a = a.clone();
        let record = record.clone();
        move || {
            let mut cl = a.clone();
            let record = record.clone();
            async move {
                cl.list("pulling/")
                    .await
                    .is_ok_and(|entries| entries.iter().any(|e| e.key == record) == present)
            }
        }
    };
    wait_until(CONVERGE, "n0 has n1's pulling record", on_n0(true))
        .await
        .unwrap();

    // The restarted n1 runs no pull of that blob, so the record goes (whether n1 kept it on
    // disk or learns it again from n0).
    c.nodes[1].start();
    wait_until(
        CONVERGE,
        "n1's stale pulling record is deleted",
        on_n0(false),
    )
    .await
    .unwrap_or_else(|e| panic!("{e} ({record})\n{}", c.nodes[1].log_tail()));

    // And a new pull completes with the pushed bytes.
    alive_all(&c).await;
    let mut b = c.nodes[1].client().await;
    b.pull_image("stale:1", |_, _| {})
        .await
        .unwrap_or_else(|e| panic!("pull after the restart: {e}\n{}", c.logs()));
    let layer = read_layer(&c.nodes[1], "stale:1").await;
    assert_eq!(blake3::hash(&layer), blake3::hash(&oci_layer_of(&tar).1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_mid_pull_is_given_up_once_declared_dead_and_the_pull_resumes_later() {
    let c = TestCluster::start(2);
    alive_all(&c).await;
    let payload = noise(128 << 20, 5);
    let tar = image_tar(c.dir.path(), "paused", &payload);
    push_to_n0_for_n1(&c, &tar, "paused:1").await;

    // n1 pulls over direct connections from n0, the only holder, which stops mid-pull: its
    // sockets stay open, so nothing fails by itself until the 30 s frame timeout.
    // Into the layer (config and manifest are small and come first).
    let pull = pull_under_way(&c.nodes[1], "paused:1", 8 << 20).await;
    c.nodes[0].signal("STOP");
    // Once n1 declares n0 dead (about 4 s), its streams to n0 are given up, without waiting
    // for the frame timeout.
    let log = c.nodes[1].log.clone();
    let gave_up = wait_until(CONVERGE, "n1 gives up n0's streams as dead", || async {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("the node was declared dead"))
    })
    .await;
    c.nodes[0].signal("CONT");
    gave_up.unwrap_or_else(|e| panic!("{e}\n{}", c.nodes[1].log_tail()));
    let timed_out = std::fs::read_to_string(&log)
        .unwrap()
        .contains("nothing within 30 s");
    assert!(
        !timed_out,
        "a stream waited out the frame timeout:\n{}",
        c.nodes[1].log_tail()
    );
    // That pull may have failed (no holder left) or finished once n0 came back; another one
    // completes either way, and the bytes are the pushed bytes.
    let _ = pull.await.unwrap();
    c.wait_states(1, &[("n0", "alive"), ("n1", "alive")], CONVERGE)
        .await;
    let mut cl = c.nodes[1].client().await;
    cl.pull_image("paused:1", |_, _| {})
        .await
        .unwrap_or_else(|e| panic!("pull after the resume: {e}\n{}", c.logs()));
    let layer = read_layer(&c.nodes[1], "paused:1").await;
    assert_eq!(blake3::hash(&layer), blake3::hash(&oci_layer_of(&tar).1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blob_port_admits_members_only() {
    use meshwork_node::admission::ClusterSecret;
    use meshwork_node::blobs::direct::{DirectError, DirectTls};

    let dir = tempfile::tempdir().unwrap();
    let secret = common::write_secret(dir.path(), "secret");
    let port = common::free_port();
    let mut node = TestNode::new(dir.path(), "n0", &secret, vec![]);
    node.extra_args = vec!["--blob-port".into(), port.to_string()];
    node.start();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Up once it answers on HTTP (every listener is bound before any is served); no probe
    // of the blob port, which would count as a refused connection.
    wait_until(CONVERGE, "the node answers", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", node.http))
            .await
            .is_ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log_tail()));
    let anyone = libp2p::identity::Keypair::generate_ed25519();
    let someone_else = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();

    // Without the secret: refused, and the node said nothing about itself.
    let stranger = DirectTls::new(anyone.clone(), &ClusterSecret::generate());
    let refused = stranger.connect(addr, someone_else).await;
    assert!(
        matches!(refused, Err(DirectError::Refused(_))),
        "{refused:?}"
    );
    wait_until(
        CONVERGE,
        "the node counts one refusal, for a bad proof",
        || async {
            let (_, metrics) = http_call(node.http, "GET", "/metrics", b"").await;
            String::from_utf8_lossy(&metrics)
                .contains("mesh_blob_direct_refused_total{reason=\"bad_proof\"} 1\n")
        },
    )
    .await
    .unwrap();

    // With it: admitted, and the node proves who it is (here not the peer asked for).
    let member_secret =
        ClusterSecret::from_hex(&std::fs::read_to_string(&secret).unwrap()).unwrap();
    let member = DirectTls::new(anyone, &member_secret);
    match member.connect(addr, someone_else).await {
        Err(DirectError::WrongPeer { found, .. }) => assert_ne!(*found, someone_else),
        other => panic!(
            "expected the node's own peer id, got {:?}",
            other.map(|_| ())
        ),
    }

    // A probe that connects and hangs up is counted apart from a wrong secret.
    drop(tokio::net::TcpStream::connect(addr).await.unwrap());
    wait_until(
        CONVERGE,
        "the node counts the probe as an io refusal",
        || async {
            let (_, metrics) = http_call(node.http, "GET", "/metrics", b"").await;
            let metrics = String::from_utf8_lossy(&metrics).into_owned();
            metrics.contains("mesh_blob_direct_refused_total{reason=\"io\"} 1\n")
                && metrics.contains("mesh_blob_direct_refused_total{reason=\"bad_proof\"} 1\n")
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_collects_what_nothing_refers_to_and_nothing_else() {
    let c = TestCluster::start(1);
    let mut cl = c.nodes[0].client().await;
    let keep = image_tar(c.dir.path(), "keep", &noise(3 << 20, 3));
    let drop = image_tar(c.dir.path(), "drop", &noise(3 << 20, 4));
    push_image(&mut cl, &keep, "keep:1", 1, |_, _| {})
        .await
        .unwrap();
    push_image(&mut cl, &drop, "drop:1", 1, |_, _| {})
        .await
        .unwrap();
    let module = noise(100_000, 5);
    let pinned = cl
        .put_blob(
            std::io::Cursor::new(module.clone()),
            UploadOptions {
                pinned: true,
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    let dropped_layer = cl.image("drop:1").await.unwrap().layers[0].blake3.clone();
    cl.remove_image("drop:1").await.unwrap();

    // Within the grace period nothing goes.
    let r = cl.collect_garbage(Some(3600)).await.unwrap();
    assert_eq!(r.blobs_removed, 0);
    let r = cl.collect_garbage(Some(0)).await.unwrap();
    assert_eq!(r.blobs_removed, 3, "manifest, config and layer of drop:1");
    let blobs: Vec<String> = cl
        .blobs()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.blake3)
        .collect();
    assert!(!blobs.contains(&dropped_layer));
    assert!(blobs.contains(&pinned.blake3));
    assert!(read_layer(&c.nodes[0], "keep:1").await.len() as u64 > 3 << 20);
    let mut out = Vec::new();
    cl.get_blob(&pinned.blake3, &mut out, |_, _| {})
        .await
        .unwrap();
    assert_eq!(out, module);
    let e = cl
        .get_blob(&dropped_layer, &mut Vec::new(), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_a_push_keeps_a_consistent_store_and_the_push_can_be_repeated() {
    let mut c = TestCluster::start(1);
    let tar = image_tar(c.dir.path(), "crash", &noise(64 << 20, 6));
    let endpoint = c.nodes[0].endpoint();
    let started = Arc::new(AtomicBool::new(false));
    let s = started.clone();
    let t = tar.clone();
    let push = tokio::spawn(async move {
        let mut cl = MeshClient::connect(&endpoint).await.unwrap();
        push_image(&mut cl, &t, "crash:1", 1, move |done, _| {
            if done > (8 << 20) {
                s.store(true, Ordering::SeqCst);
            }
        })
        .await
    });
    wait_until(CONVERGE, "the push is under way", || async {
        started.load(Ordering::SeqCst)
    })
    .await
    .unwrap();
    c.nodes[0].kill9();
    assert!(
        push.await.unwrap().is_err(),
        "a push to a dead node cannot succeed"
    );

    c.nodes[0].start();
    let mut cl = c.nodes[0].client().await;
    // No half image, no blob that reads wrong.
    assert!(cl.images().await.unwrap().is_empty());
    for b in cl.blobs().await.unwrap() {
        let mut out = Vec::new();
        cl.get_blob(&b.blake3, &mut out, |_, _| {}).await.unwrap();
        assert_eq!(blake3::hash(&out).to_hex().as_str(), b.blake3);
    }
    push_image(&mut cl, &tar, "crash:1", 1, |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        blake3::hash(&read_layer(&c.nodes[0], "crash:1").await),
        blake3::hash(&oci_layer_of(&tar).1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pushes_and_unknown_names_give_clear_errors_and_change_nothing() {
    let c = TestCluster::start(1);
    let mut cl = c.nodes[0].client().await;
    let dir = c.dir.path();

    let not_tar = dir.join("notes.txt");
    std::fs::write(&not_tar, "this is not a tar").unwrap();
    let e = push_image(&mut cl, &not_tar, "x:1", 1, |_, _| {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("notes.txt"), "{e}");

    let plain = dir.join("plain.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&plain).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
        b.finish().unwrap();
    }
    let e = push_image(&mut cl, &plain, "x:1", 1, |_, _| {})
        .await
        .unwrap_err();
    assert!(
        e.to_string().to_lowercase().contains("oci") || e.to_string().contains("docker"),
        "{e}"
    );

    let good = image_tar(dir, "good", b"payload");
    let e = push_image(&mut cl, &good, "Bad Tag!", 1, |_, _| {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Bad Tag!"), "{e}");

    // A digest the bytes do not match is refused by the node.
    let e = cl
        .put_blob(
            std::io::Cursor::new(b"abc".to_vec()),
            UploadOptions {
                expected_sha256: Some(format!("sha256:{}", "0".repeat(64))),
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");

    // An image naming a blob that was never pushed.
    let e = cl
        .create_image(meshwork_client::proto::CreateImageRequest {
            reference: "ghost:1".into(),
            manifest: Some(meshwork_client::proto::ImageBlob {
                blake3: "ab".repeat(32),
                sha256: format!("sha256:{}", "cd".repeat(32)),
                size: 10,
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            }),
            config: None,
            layers: vec![],
            replicas: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");

    let e = cl
        .get_blob(&"ab".repeat(32), &mut Vec::new(), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
    assert!(e.to_string().contains(&"ab".repeat(32)), "{e}");
    let e = cl
        .get_blob("xyz", &mut Vec::new(), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    let e = cl.image("nothere:1").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");

    // Nothing was registered by any of it.
    assert!(cl.images().await.unwrap().is_empty());
    push_image(&mut cl, &good, "good:1", 1, |_, _| {})
        .await
        .unwrap();
    assert_eq!(cl.images().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_is_replaced_by_a_new_copy() {
    let mut c = TestCluster::start(3);
    alive_all(&c).await;
    let tar = image_tar(c.dir.path(), "rep", &noise(3 << 20, 9));
    let mut a = c.nodes[0].client().await;
    push_image(&mut a, &tar, "rep:1", 2, |_, _| {})
        .await
        .unwrap();
    wait_until(CONVERGE, "rep:1 has 2 holders", || async {
        holders_of(&c.nodes[0], "rep:1").await.len() == 2
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let holders = holders_of(&c.nodes[0], "rep:1").await;
    // Kill a holder other than n0 if there is one, else n0's partner; watch from a survivor.
    let victim = if holders.contains(&"n1".to_string()) {
        1
    } else {
        2
    };
    let observer = 3 - victim; // the other of n1/n2
    c.nodes[victim].kill9();
    let observer_node = &c.nodes[observer];
    wait_until(CONVERGE, "rep:1 is back to 2 live holders", || async {
        let h = holders_of(observer_node, "rep:1").await;
        h.len() == 2 && !h.contains(&format!("n{victim}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}

/// Unmounts a tmpfs when the test ends, however it ends.
struct TmpfsMount(PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_up_during_a_pull_gives_a_clear_error_and_leaves_the_store_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    }
    let _mount = TmpfsMount(small.clone());
    let secret = common::write_secret(dir.path(), "secret");
    let mut a = TestNode::new(dir.path(), "n0", &secret, vec![]);
    a.start();
    let mut b = TestNode::new(dir.path(), "n1", &secret, vec![a.p2p]);
    b.data_dir = small.join("data");
    b.start();
    let c = TestCluster {
        dir,
        nodes: vec![a, b],
    };
    c.wait_states(1, &[("n0", "alive"), ("n1", "alive")], CONVERGE)
        .await;

    let tar = image_tar(c.dir.path(), "huge", &noise(40 << 20, 10));
    push_to_n0_for_n1(&c, &tar, "huge:1").await;
    let mut on_b = c.nodes[1].client().await;
    let used_before = du(&small);
    let e = on_b.pull_image("huge:1", |_, _| {}).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("disk"), "{e}");
    // Nothing of the failed pull stays: no blob, no holder record, the space is back.
    let image = on_b.image("huge:1").await.unwrap();
    assert!(!image.holders.iter().any(|h| h.name == "n1"));
    let used_after = du(&small);
    assert!(
        used_after <= used_before + (1 << 20),
        "the failed pull left {} bytes behind",
        used_after.saturating_sub(used_before)
    );
    // The node is fine: it still answers and stores small things.
    on_b.put_blob(
        std::io::Cursor::new(vec![1u8; 1000]),
        UploadOptions::default(),
        |_| {},
    )
    .await
    .unwrap();
}

/// Bytes used on the file system holding `path`.
fn du(path: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=used", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}
