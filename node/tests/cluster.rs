//! Whole-node behaviour with real `meshd` processes and real libp2p on loopback: joining,
//! failure detection, catch-up, admission, persistence and API errors.

mod common;

use std::time::Duration;

use common::{TestCluster, TestNode, wait_until, write_secret};
use meshwork_client::MeshClient;

const CONVERGE: Duration = Duration::from_secs(60);

fn all_alive(n: usize) -> Vec<(String, &'static str)> {
    (0..n).map(|i| (format!("n{i}"), "alive")).collect()
}

fn states<'a>(v: &'a [(String, &'static str)]) -> Vec<(&'a str, &'static str)> {
    v.iter().map(|(n, s)| (n.as_str(), *s)).collect()
}

async fn get_value(node: &TestNode, key: &str) -> Option<String> {
    let mut c = MeshClient::connect(&node.endpoint()).await.ok()?;
    c.get(key).await.ok().map(|e| e.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_join_detect_death_and_catch_up() {
    let mut c = TestCluster::start(3);
    let alive = all_alive(3);
    for i in 0..3 {
        c.wait_states(i, &states(&alive), CONVERGE).await;
    }

    // A write on A is read on C.
    let mut a = c.nodes[0].client().await;
    a.put("svc/web", b"v1".to_vec()).await.unwrap();
    wait_until(CONVERGE, "n2 reads svc/web", || async {
        get_value(&c.nodes[2], "svc/web").await.as_deref() == Some("v1")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    // kill -9 n1: both survivors mark it dead.
    c.nodes[1].kill9();
    let n1_dead = [("n0", "alive"), ("n1", "dead"), ("n2", "alive")];
    c.wait_states(0, &n1_dead, CONVERGE).await;
    c.wait_states(2, &n1_dead, CONVERGE).await;

    // Writes it misses: a new key, a changed key and a delete.
    a.put("while/down", b"x".to_vec()).await.unwrap();
    let mut cc = c.nodes[2].client().await;
    cc.put("svc/web", b"v2".to_vec()).await.unwrap();
    a.put("doomed", b"1".to_vec()).await.unwrap();
    a.delete("doomed").await.unwrap();

    // It comes back, is alive everywhere, and catches up.
    c.nodes[1].start();
    for i in 0..3 {
        c.wait_states(i, &states(&alive), CONVERGE).await;
    }
    let n1 = &c.nodes[1];
    wait_until(CONVERGE, "n1 catches up on missed writes", || async {
        get_value(n1, "while/down").await.as_deref() == Some("x")
            && get_value(n1, "svc/web").await.as_deref() == Some("v2")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let mut b = n1.client().await;
    let err = b.get("doomed").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_secret_is_refused_and_never_listed() {
    let c = TestCluster::start(2);
    let alive = all_alive(2);
    c.wait_states(0, &states(&alive), CONVERGE).await;
    let mut a = c.nodes[0].client().await;
    a.put("secret/plan", b"private".to_vec()).await.unwrap();

    let other = write_secret(c.dir.path(), "other-secret");
    let mut intruder = TestNode::new(c.dir.path(), "intruder", &other, vec![c.nodes[0].p2p]);
    intruder.start();
    let intruder_log = intruder.log.clone();
    wait_until(CONVERGE, "the intruder is told it was refused", || async {
        std::fs::read_to_string(&intruder_log)
            .unwrap_or_default()
            .contains("refused admission")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", intruder.log_tail(), c.logs()));

    // Refused again on every retry, never listed, and it reads nothing.
    let n0_log = c.nodes[0].log.clone();
    wait_until(CONVERGE, "n0 refuses at least three attempts", || async {
        std::fs::read_to_string(&n0_log)
            .unwrap_or_default()
            .matches("did not prove the cluster secret")
            .count()
            >= 3
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    for node in &c.nodes {
        let names: Vec<String> = node.nodes().await.into_iter().map(|n| n.name).collect();
        assert!(!names.contains(&"intruder".to_string()), "{names:?}");
        assert_eq!(names.len(), 2, "{names:?}");
    }
    let seen: Vec<String> = intruder.nodes().await.into_iter().map(|n| n.name).collect();
    assert_eq!(seen, vec!["intruder".to_string()]);
    let mut i = intruder.client().await;
    assert_eq!(
        i.get("secret/plan").await.unwrap_err().code(),
        Some(tonic::Code::NotFound)
    );
    assert!(i.list("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_restarted_keep_their_state() {
    let mut c = TestCluster::start(3);
    let alive = all_alive(3);
    c.wait_states(0, &states(&alive), CONVERGE).await;
    for i in 0..12 {
        let mut cl = c.nodes[i % 3].client().await;
        cl.put(&format!("k/{i}"), format!("v{i}").into_bytes())
            .await
            .unwrap();
    }
    for node in &c.nodes {
        wait_until(CONVERGE, "every node has all 12 keys", || async {
            match MeshClient::connect(&node.endpoint()).await {
                Ok(mut cl) => cl.list("k/").await.map(|v| v.len()).unwrap_or(0) == 12,
                Err(_) => false,
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    }
    for n in &mut c.nodes {
        n.kill9();
    }
    for n in &mut c.nodes {
        n.start();
    }
    // Every write a node accepted is on its disk (durable before the client was answered):
    // right after the restart, before it has heard from a peer, each node has its own.
    for (n, node) in c.nodes.iter().enumerate() {
        let mut cl = node.client().await;
        for i in (n..12).step_by(3) {
            let e = cl.get(&format!("k/{i}")).await;
            assert_eq!(
                e.map(|e| e.value).ok(),
                Some(format!("v{i}")),
                "{} lost k/{i}",
                node.name
            );
        }
    }
    // Nothing survived anywhere but on disk, and the whole state comes back everywhere.
    for i in 0..3 {
        c.wait_states(i, &states(&alive), CONVERGE).await;
    }
    for node in &c.nodes {
        wait_until(CONVERGE, "every node has all 12 keys again", || async {
            match MeshClient::connect(&node.endpoint()).await {
                Ok(mut cl) => cl.list("k/").await.map(|v| v.len()).unwrap_or(0) == 12,
                Err(_) => false,
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_say_what_is_wrong() {
    let c = TestCluster::start(1);
    let mut cl = c.nodes[0].client().await;
    let e = cl.put("bad key", b"x".to_vec()).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    assert!(e.to_string().contains("bad key"), "{e}");
    let e = cl.put("big", vec![0; 200 * 1024]).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("limit"), "{e}");
    let e = cl.get("missing").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound));
    assert!(e.to_string().contains("missing"), "{e}");
    let e = cl.delete("missing").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound));
    let e = cl.node("nobody").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound));
    assert!(e.to_string().contains("nobody"), "{e}");
    let e = cl.node("").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    // The node is still fine.
    cl.put("good", b"1".to_vec()).await.unwrap();
    let me = cl.node("n0").await.unwrap();
    assert!(me.is_self);
    assert!(me.cpu_total_millis >= 1000 && me.memory_total_bytes > 0 && me.disk_free_bytes > 0);
    // Health and metrics on the HTTP listener.
    let http = |path: &str| {
        let url = format!("127.0.0.1:{}", c.nodes[0].http);
        let path = path.to_string();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(url).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    assert!(http("/healthz").await.starts_with("HTTP/1.0 200"));
    // Gauges are refreshed on the heartbeat tick: wait for the next one.
    let wanted = [
        "mesh_peers{state=\"alive\"} 1",
        "mesh_state_writes_total",
        "mesh_state_entries 1",
        "mesh_gossip_messages_total",
    ];
    let http = &http;
    wait_until(
        CONVERGE,
        "/metrics shows the node's peers, writes and entries",
        || async move {
            let m = http("/metrics").await;
            wanted.iter().all(|w| m.contains(w))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_join_address_is_retried_while_the_api_serves() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret");
    let nowhere = common::free_port();
    let mut n = TestNode::new(dir.path(), "lonely", &secret, vec![nowhere]);
    n.start();
    let mut cl = n.client().await;
    let nodes = cl.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    cl.put("still/works", b"1".to_vec()).await.unwrap();
    let log = n.log.clone();
    wait_until(CONVERGE, "the log says the join is retried", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("retrying")
            .count()
            >= 2
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", n.log_tail()));
}

#[test]
fn a_foreign_data_dir_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("precious.txt"), b"keep me").unwrap();
    let n = TestNode::new(dir.path(), "data", &secret, vec![]);
    let out = std::process::Command::new(common::MESHD)
        .args(n.args())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a Meshwork data dir"), "{err}");
    assert_eq!(
        std::fs::read(data.join("precious.txt")).unwrap(),
        b"keep me"
    );
}

#[test]
fn malformed_flags_are_a_usage_error() {
    let out = std::process::Command::new(common::MESHD)
        .args(["--data-dir"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data-dir"));
    let out = std::process::Command::new(common::MESHD)
        .args([
            "--data-dir",
            "/tmp/x",
            "--secret-file",
            "/nonexistent/secret",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret-file /nonexistent/secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_dropped_and_counted_and_nothing_breaks() {
    let c = TestCluster::start(2);
    c.wait_states(0, &[("n0", "alive"), ("n1", "alive")], CONVERGE)
        .await;
    let secret = c.dir.path().join("secret");
    let mut liar = TestNode::new(c.dir.path(), "liar", &secret, vec![c.nodes[0].p2p]);
    liar.extra_args = vec!["--test-lie".into(), "gossip".into()];
    liar.start();
    let expect = [("liar", "alive"), ("n0", "alive"), ("n1", "alive")];
    c.wait_states(0, &expect, CONVERGE).await;
    let metrics_url = format!("127.0.0.1:{}", c.nodes[1].http);
    wait_until(CONVERGE, "n1 counts the liar's bad gossip", || async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(&metrics_url).await else {
            return false;
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out.lines().any(|l| {
            l.starts_with("mesh_bad_messages_total{reason=\"gossip\"}")
                && l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) >= Some(3.0)
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // The phantom the liar invents never becomes a member, and the honest nodes still work.
    for node in &c.nodes {
        let names: Vec<String> = node.nodes().await.into_iter().map(|n| n.name).collect();
        assert!(!names.contains(&"phantom".to_string()), "{names:?}");
    }
    let mut a = c.nodes[0].client().await;
    a.put("after/lies", b"ok".to_vec()).await.unwrap();
    wait_until(CONVERGE, "n1 still receives writes", || async {
        get_value(&c.nodes[1], "after/lies").await.as_deref() == Some("ok")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_serve_standard_clients() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let c = TestCluster::start(1);
    let _ = c.nodes[0].client().await; // serving
    let channel = tonic::transport::Channel::from_shared(c.nodes[0].endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "mesh.v1.ClusterService", "mesh.v1.StateService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().status, 1, "{service} is not SERVING");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "mesh.v1.ClusterService",
        "mesh.v1.StateService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} not in {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_node_cleanly() {
    let mut c = TestCluster::start(2);
    c.wait_states(0, &[("n0", "alive"), ("n1", "alive")], CONVERGE)
        .await;
    assert!(
        c.nodes[1].terminate(Duration::from_secs(15)),
        "meshd did not exit cleanly on SIGTERM\n{}",
        c.nodes[1].log_tail()
    );
    assert!(
        std::fs::read_to_string(&c.nodes[1].log)
            .unwrap()
            .contains("node stopped")
    );
}
