//! Functions with real Wasmer and real modules built from `examples/`: deploy on one node,
//! invoke through HTTP and gRPC on every node, limits, throttling, logs, stats, the artifact
//! cache across restarts, and bad input.

mod common;

use std::time::Duration;

use common::{TestCluster, example_wasm, http_call, wait_until};
use meshwork_client::proto::{DeployFunctionRequest, InvokeRequest};
use meshwork_client::{MeshClient, UploadOptions};

const CONVERGE: Duration = Duration::from_secs(60);

async fn deploy(
    cl: &mut MeshClient,
    name: &str,
    wasm: &[u8],
    memory: u64,
    timeout_ms: u64,
    concurrency: u32,
) -> Result<meshwork_client::proto::Function, meshwork_client::ClientError> {
    let info = cl
        .put_blob(
            std::io::Cursor::new(wasm.to_vec()),
            UploadOptions {
                pinned: true,
                ..Default::default()
            },
            |_| {},
        )
        .await?;
    cl.deploy_function(DeployFunctionRequest {
        name: name.into(),
        module: info.blake3,
        memory_bytes: memory,
        timeout_ms,
        env: [("GREETING".to_string(), "hi".to_string())].into(),
        concurrency,
        replicas: 1,
        events: vec![],
        url: String::new(),
    })
    .await
}

/// Body bytes of [`BIG_ANSWER_WAT`]'s answer: 9 MiB of zeros.
const BIG_ANSWER_BYTES: usize = 9 << 20;

/// A function that answers with a 9 MiB body (more than fitted a node-to-node message once).
const BIG_ANSWER_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 160)
  (data (i32.const 64) "Content-Type: application/octet-stream\n\n")
  (func (export "_start")
    ;; one iovec at 0: the 40-byte header section at 64, then 9 MiB of zeros
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 9437224))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#;

fn invoke_req(name: &str, query: &str) -> InvokeRequest {
    InvokeRequest {
        name: name.into(),
        body: vec![],
        method: "GET".into(),
        path: "/".into(),
        query: query.into(),
        headers: Default::default(),
    }
}

/// Waits until `node` lists `n` functions.
async fn wait_known(node: &common::TestNode, n: usize) {
    wait_until(CONVERGE, "the function is known everywhere", || async {
        let Ok(mut cl) = MeshClient::connect(&node.endpoint()).await else {
            return false;
        };
        cl.functions().await.is_ok_and(|f| f.len() == n)
    })
    .await
    .unwrap();
}

async fn all_alive(c: &TestCluster) {
    let names: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    let expect: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "alive")).collect();
    for i in 0..c.nodes.len() {
        c.wait_states(i, &expect, CONVERGE).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_answers_through_http_and_grpc_on_every_node() {
    let c = TestCluster::start(3);
    all_alive(&c).await;
    let hello = std::fs::read(example_wasm("hello")).unwrap();
    let mut a = c.nodes[0].client().await;
    deploy(&mut a, "hello", &hello, 64 << 20, 5000, 16)
        .await
        .unwrap();
    for node in &c.nodes {
        wait_known(node, 1).await;
        let (status, body) = http_call(node.http, "GET", "/fn/hello?name=ann", b"").await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert!(
            String::from_utf8_lossy(&body).contains("hello, ann"),
            "{}",
            String::from_utf8_lossy(&body)
        );
        let mut cl = node.client().await;
        let r = cl.invoke(invoke_req("hello", "name=bo")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.error);
        assert!(String::from_utf8_lossy(&r.body).contains("hello, bo"));
    }
    // The warm copy's memory shows as allocated on the node that holds it.
    wait_until(
        CONVERGE,
        "one node advertises the function's memory as allocated",
        || async {
            let nodes = c.nodes[0].nodes().await;
            nodes.iter().filter(|n| n.workloads == 1).count() == 1
                && nodes.iter().any(|n| {
                    n.workloads == 1 && n.memory_total_bytes - n.memory_free_bytes == 64 << 20
                })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let stats = a.function_stats("hello").await.unwrap();
    assert_eq!(stats.invocations, 6);
    assert_eq!(stats.errors, 0);
    assert!(stats.cold_starts >= 1);
    assert!(stats.gb_seconds > 0.0);

    // An answer far over 8 MiB comes back whole through every node: forwarded from the nodes
    // that are not warm for it, and run exactly once per call (never again locally because
    // the forwarded answer did not fit a node-to-node message).
    let big = wat::parse_str(BIG_ANSWER_WAT).unwrap();
    deploy(&mut a, "big", &big, 64 << 20, 5000, 4)
        .await
        .unwrap();
    for node in &c.nodes {
        wait_known(node, 2).await;
        // Every node knows where it runs warm, so two of the three calls are forwarded.
        wait_until(CONVERGE, "the warm claim of big is known", || async {
            let mut cl = node.client().await;
            cl.functions()
                .await
                .is_ok_and(|fs| fs.iter().any(|f| f.name == "big" && f.nodes.len() == 1))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    }
    for node in &c.nodes {
        let (status, body) = http_call(node.http, "GET", "/fn/big", b"").await;
        assert_eq!(
            status,
            200,
            "{}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
        assert_eq!(body.len(), BIG_ANSWER_BYTES);
    }
    let stats = a.function_stats("big").await.unwrap();
    assert_eq!(stats.invocations, 3, "each call ran once");
    assert_eq!(stats.errors, 0);
    assert!(stats.p99_seconds > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_traps_throttling_and_logs() {
    let c = TestCluster::start(1);
    let mut cl = c.nodes[0].client().await;
    let hello = std::fs::read(example_wasm("hello")).unwrap();
    deploy(&mut cl, "hello", &hello, 64 << 20, 5000, 16)
        .await
        .unwrap();

    // An infinite loop ends at the timeout (504) and the node keeps serving.
    let spin = std::fs::read(example_wasm("spin")).unwrap();
    deploy(&mut cl, "spin", &spin, 64 << 20, 500, 1)
        .await
        .unwrap();
    let r = cl.invoke(invoke_req("spin", "")).await.unwrap();
    assert_eq!(r.status, 504, "{}", r.error);
    let r = cl.invoke(invoke_req("hello", "")).await.unwrap();
    assert_eq!(r.status, 200);

    // Memory without bound stops at the limit.
    let grow = std::fs::read(example_wasm("grow")).unwrap();
    deploy(&mut cl, "grow", &grow, 32 << 20, 5000, 4)
        .await
        .unwrap();
    let r = cl.invoke(invoke_req("grow", "")).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.error);
    assert!(r.error.contains("memory"), "{}", r.error);

    // A trap is a 502 and its stderr reaches the function's logs.
    let trap = std::fs::read(example_wasm("trap")).unwrap();
    deploy(&mut cl, "trap", &trap, 64 << 20, 5000, 4)
        .await
        .unwrap();
    let r = cl.invoke(invoke_req("trap", "")).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.error);
    let logs = cl.function_logs("trap").await.unwrap();
    assert!(!logs.lines.is_empty(), "no stderr captured");

    // Beyond the concurrency limit: 429.
    let endpoint = c.nodes[0].endpoint();
    let calls = (0..3).map(|_| {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let mut cl = MeshClient::connect(&endpoint).await.unwrap();
            cl.invoke(invoke_req("spin", "")).await.unwrap().status
        })
    });
    let statuses: Vec<u32> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&504), "{statuses:?}");
    let (status, _) = http_call(c.nodes[0].http, "GET", "/fn/hello", b"").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_loads_the_compiled_artifact_instead_of_recompiling() {
    let mut c = TestCluster::start(1);
    let mut cl = c.nodes[0].client().await;
    let hello = std::fs::read(example_wasm("hello")).unwrap();
    deploy(&mut cl, "hello", &hello, 64 << 20, 5000, 16)
        .await
        .unwrap();
    assert_eq!(
        cl.invoke(invoke_req("hello", "")).await.unwrap().status,
        200
    );
    c.nodes[0].kill9();
    c.nodes[0].start();
    let mut cl = c.nodes[0].client().await;
    assert_eq!(
        cl.invoke(invoke_req("hello", "")).await.unwrap().status,
        200
    );
    let (_, metrics) = http_call(c.nodes[0].http, "GET", "/metrics", b"").await;
    let metrics = String::from_utf8_lossy(&metrics);
    let value = |label: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "mesh_fn_artifact_cache_total{{result=\"{label}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(value("disk") >= 1.0, "{metrics}");
    // The load itself is timed, by where the module came from.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_fn_load_seconds_count{result=\"disk\"}")),
        "{metrics}"
    );
    assert_eq!(
        value("compiled"),
        0.0,
        "the restarted node compiled again:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_modules_and_bad_calls_give_clear_errors() {
    let c = TestCluster::start(1);
    let mut cl = c.nodes[0].client().await;
    let e = deploy(&mut cl, "junk", b"this is not wasm", 64 << 20, 1000, 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("WebAssembly"), "{e}");
    // A valid module with no `_start`.
    let empty = b"\0asm\x01\0\0\0";
    let e = deploy(&mut cl, "empty", empty, 64 << 20, 1000, 1)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("_start"), "{e}");
    // A module importing a host function it is not given.
    let mut imports = b"\0asm\x01\0\0\0".to_vec();
    imports.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]);
    imports.extend_from_slice(&[
        0x02, 0x0b, 0x01, 0x03, b'e', b'n', b'v', 0x03, b'f', b'o', b'o', 0x00, 0x00,
    ]);
    let e = deploy(&mut cl, "imports", &imports, 64 << 20, 1000, 1)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("env.foo"), "{e}");
    // Limits out of range.
    let hello = std::fs::read(example_wasm("hello")).unwrap();
    let e = deploy(&mut cl, "hello", &hello, 1, 1000, 1)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("memory"), "{e}");
    let e = deploy(&mut cl, "hello", &hello, 64 << 20, 10_000_000, 1)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("timeout"), "{e}");
    assert!(
        cl.functions().await.unwrap().is_empty(),
        "nothing was deployed"
    );

    deploy(&mut cl, "hello", &hello, 64 << 20, 5000, 4)
        .await
        .unwrap();
    let (status, _) = http_call(c.nodes[0].http, "GET", "/fn/nobody", b"").await;
    assert_eq!(status, 404);
    let e = cl.invoke(invoke_req("nobody", "")).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound));
    let big = vec![b'x'; 7 << 20];
    let (status, _) = http_call(c.nodes[0].http, "POST", "/fn/hello", &big).await;
    assert_eq!(status, 413);
    let (status, _) = http_call(c.nodes[0].http, "GET", "/fn/hello", b"").await;
    assert_eq!(status, 200, "the node still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_runs_once_per_tick_in_the_mesh_and_async_calls_retry() {
    let c = TestCluster::start(3);
    all_alive(&c).await;
    let mut a = c.nodes[0].client().await;
    let echo = std::fs::read(example_wasm("echo")).unwrap();
    deploy(&mut a, "tick", &echo, 64 << 20, 5000, 16)
        .await
        .unwrap();
    for node in &c.nodes {
        wait_known(node, 1).await;
    }
    // Every 2 seconds, in the whole mesh.
    a.schedule("tick", "*/2 * * * * *").await.unwrap();
    wait_until(CONVERGE, "the schedule ran 4 times", || {
        let mut cl = a.clone();
        async move {
            cl.function_stats("tick")
                .await
                .is_ok_and(|s| s.invocations >= 4)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    a.schedule("tick", "").await.unwrap();
    // Each run writes one stderr line naming its tick (the body is {"tick_ms":T,...}): every
    // tick must appear once.
    let logs = a.function_logs("tick").await.unwrap().lines;
    let ticks: Vec<String> = logs
        .iter()
        .filter_map(|l| {
            let at = l.line.find("\"tick_ms\":")? + 10;
            Some(
                l.line[at..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect(),
            )
        })
        .collect();
    assert!(ticks.len() >= 4, "{logs:?}");
    let mut unique = ticks.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ticks.len(), "a tick ran twice: {logs:#?}");

    // Async: a call that fails is tried 3 times and then kept as failed; one that works is
    // removed from the queue.
    let trap = std::fs::read(example_wasm("trap")).unwrap();
    deploy(&mut a, "fails", &trap, 64 << 20, 5000, 4)
        .await
        .unwrap();
    let id = a.invoke_async(invoke_req("fails", "")).await.unwrap();
    let key = format!("async/{id}");
    wait_until(
        CONVERGE,
        "the failing async call ends as failed after 3 attempts",
        || {
            let mut cl = a.clone();
            let key = key.clone();
            async move {
                cl.get(&key).await.is_ok_and(|e| {
                    e.value.contains("\"Failed\"") && e.value.contains("\"attempts\":3")
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // Stats are summed over the nodes that ran the attempts; a node's answer can lag a moment.
    wait_until(CONVERGE, "three invocations of fails are counted", || {
        let mut cl = a.clone();
        async move {
            cl.function_stats("fails")
                .await
                .is_ok_and(|s| s.invocations == 3)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let id = a.invoke_async(invoke_req("tick", "")).await.unwrap();
    let key = format!("async/{id}");
    wait_until(CONVERGE, "the working async call leaves the queue", || {
        let mut cl = a.clone();
        let key = key.clone();
        async move { cl.get(&key).await.is_err() }
    })
    .await
    .unwrap();
}
