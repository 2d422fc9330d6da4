//! The internal event hook with a node embedded in the test process: a function deployed with
//! `--on job.finished` runs (asynchronously) when the node emits that event.

mod common;

use std::time::Duration;

use common::{example_wasm, free_port, wait_until};
use meshwork_client::proto::DeployFunctionRequest;
use meshwork_client::{MeshClient, UploadOptions};
use meshwork_node::admission::ClusterSecret;
use meshwork_node::membership::FailureDetector;
use meshwork_node::{Node, NodeConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emitted_event_runs_the_functions_subscribed_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        data_dir: dir.path().join("data"),
        secret: ClusterSecret::generate(),
        p2p: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        blob_port: Some(0),
        grpc: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        join: vec![],
        name: "embedded".into(),
        labels: Default::default(),
        cpu: None,
        memory: None,
        mdns: false,
        detector: FailureDetector::default(),
        lie: None,
        blob_gc_grace: Duration::from_secs(600),
        job_retention: Duration::from_secs(7 * 86_400),
        containerd_socket: dir.path().join("no-containerd.sock"),
        containerd_namespace: "meshwork".into(),
    };
    let node = Node::start(config, meshwork_node::telemetry::install_metrics())
        .await
        .unwrap();
    let mut cl = MeshClient::connect(&format!("http://{}", node.grpc_addr()))
        .await
        .unwrap();
    let echo = std::fs::read(example_wasm("echo")).unwrap();
    let blob = cl
        .put_blob(
            std::io::Cursor::new(echo),
            UploadOptions {
                pinned: true,
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    cl.deploy_function(DeployFunctionRequest {
        name: "on-done".into(),
        module: blob.blake3,
        memory_bytes: 64 << 20,
        timeout_ms: 5000,
        env: Default::default(),
        concurrency: 4,
        replicas: 1,
        events: vec!["job.finished".into()],
        url: String::new(),
    })
    .await
    .unwrap();

    assert!(
        node.emit_event("job.started", b"{}").is_empty(),
        "nobody listens to that"
    );
    let ids = node.emit_event("job.finished", br#"{"job":"render-7","state":"SUCCEEDED"}"#);
    assert_eq!(ids.len(), 1);
    wait_until(
        Duration::from_secs(60),
        "the subscribed function ran with the payload",
        || {
            let mut cl = cl.clone();
            async move {
                cl.function_logs("on-done")
                    .await
                    .is_ok_and(|l| l.lines.iter().any(|l| l.line.contains("render-7")))
            }
        },
    )
    .await
    .unwrap();
    node.shutdown().await;
}
