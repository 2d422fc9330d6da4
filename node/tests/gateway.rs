//! The API gateway end to end on real `meshd` processes: routing (methods, parameters, hosts,
//! CORS, body limits, timeouts), API keys and plans with throttling and quotas across three
//! nodes, revocation, JWT, hardening with raw TCP, monitoring, and response size limits.
//!
//! Targets are functions written in WAT here (no containerd, no examples build): `env` answers
//! with its CGI environment (so a test sees the path, the query and the headers the gateway
//! passed on), `spin` loops until its time limit, `blob` answers 5000 known bytes. Response
//! limits on service routes run against a real replica (busybox httpd on containerd, skipped
//! with a message without them). WebSocket through the gateway is covered in `services.rs`.

mod common;

use std::time::{Duration, Instant};

use common::{Mesh, TestCluster, wait_until};
use meshwork_client::proto::{CreateServiceRequest, DeployFunctionRequest, Plan, Route};
use meshwork_client::{MeshClient, UploadOptions, oci, push_image};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONVERGE: Duration = Duration::from_secs(60);

/// Writes "Content-Type: text/plain" and a blank line, then every environment variable on its
/// own line.
const ENV_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $get (param i32 i32) (result i32)))
  (memory (export "memory") 4)
  (data (i32.const 100) "Content-Type: text/plain\n\n")
  (func (export "_start") (local $i i32) (local $size i32)
    (i32.store (i32.const 16) (i32.const 100))
    (i32.store (i32.const 20) (i32.const 26))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
    (drop (call $sizes (i32.const 0) (i32.const 4)))
    (drop (call $get (i32.const 1024) (i32.const 65536)))
    (local.set $size (i32.load (i32.const 4)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $size)))
        (if (i32.eqz (i32.load8_u (i32.add (i32.const 65536) (local.get $i))))
          (then (i32.store8 (i32.add (i32.const 65536) (local.get $i)) (i32.const 10))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store (i32.const 16) (i32.const 65536))
    (i32.store (i32.const 20) (local.get $size))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))
"#;

const SPIN_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (br $l))))
"#;

/// Answers "Content-Type: application/octet-stream" and a body of [`BLOB_LEN`] bytes, the
/// alphabet over and over.
const BLOB_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "Content-Type: application/octet-stream\n\n")
  (func (export "_start") (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.const 5000)))
        (i32.store8 (i32.add (i32.const 1024) (local.get $i))
          (i32.add (i32.const 97) (i32.rem_u (local.get $i) (i32.const 26))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store (i32.const 16) (i32.const 100))
    (i32.store (i32.const 20) (i32.const 40))
    (i32.store (i32.const 24) (i32.const 1024))
    (i32.store (i32.const 28) (i32.const 5000))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 2) (i32.const 32)))))
"#;

/// The length of `blob`'s body.
const BLOB_LEN: usize = 5000;

/// A test-only RSA key pair for RS256.
const RSA_PRIVATE: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAvySmkmxhg42hZFFq9PWDfH87fC4NjsZ3yb5pX36dXsq8OdXw
y8xmu8WryVoEzonstUTma7lSzm3WprgO+bU/q6mj6BNWjs0vwija0JA4L3y2opWa
L73g4Jn+ZSY9dj0yjmzCHJ9GXsWc099tBlDG0FZN2I+JcpEenR2QGtzwQinrrNMD
kawbzfPj46QuHs1ogDxysDOeRRPQWgH5OG91aA3xEWTYK/oEBQPmPTxpgunTr3Qt
eSaJcCIgIa2dd1qjHphq+NYlnJe8nZw7yFLU79t1XXpFF4AHowz1AG/yHII4Revw
qT+ljArcIjdzbHs09WVzKoWkykeS+Ou+IQS4vQIDAQABAoIBAAmoIV4+aYLK8f9u
eZfcm4L7rpasgPTYpA6mNw6jB/JVDcNiQqMZNYuBBhfLG3kP0MyrqXSBzWQuemy7
2c3V0Vyr2mMMLxBR33rQs5Vb4+rKQzPdmQeWcTkHrqmPkAVcPCSj6/6kMVryYuT1
Yb2y8Qhvg8lQHyKRoFlRuAkTZnQBMdGgJLfSq307mYYEu9R1027sn/hDwC3+bU6a
ycf8pIpUtT6X1eHtHWMmjNYycKMwrYdorDcV/kPAMbKRH8EGY/I7wzs8hGVJ/WJJ
gINtwOYaWbO81pKQfpdQm7ELI+W64zc7oSv4KyHXAiqTvRmqHaRpunHr2ymWSiKC
qm/Lj4UCgYEA45A6w/N/6hEcNXJ00S/ocYl221h5tr65NXs7wKRzdTOUtSAJ8c58
JEhH2tTdTpLn4c+zh2v9PMWgm77S9kMISoJYVIbLVSxHI9Ng1JI6KjJNWk1dRNpD
5ugEdrvIoE3zv0CIjNKAgXZevMdqh7ZzRSW6/q89J2T8D+tooFefG5MCgYEA1wdV
zkWw2Q+4drmwfvAoeLkRSzFl5xSmRqseVW9hUu/zWiae+vNBxgwRU8wDV23Hl2e9
RpUR/+i2ItRLIEXcl87qiboLdhGl05uKcAfqtvfBnVZGuotl8eP/D1f/ALXU1hpG
rHiznNrSjI9Oh9zAKXMWZuaTyoZaJYNwBdwbrG8CgYEAsKYzmA0bzN1/YlX5LLHd
5NTq+RbTVPL03vlMxxxhrCdgVsIKNjUt1RRvAwaezPHpIzeSi5tet6BKLtyQ8y3R
79UDMIp6qSF4D+10i07/6+Wkemb38gzlDQgq/uiCsz4P6vTziy2VJ+p1XGII5lTR
YmoJoM7zz/LqYIlDbMTX9BUCgYA3ffQd7IxMKCtxsFAlIjM/nHsjDZd/wCt9F1IX
uEvEjJofzNHAb6CszJZ4KrE+Ed2tbB9DpNrlURgX+vN8W6snHkYWzwWALeO+rWhX
qyNenqe/w/Ey2SCxASbkvc/YThSkQFm2ztuDglFN5vncRBLvX30LhzviyzNedQIm
8PvPTwKBgDM5xP55n5yUAXWKvJMTZ/nAT3gwxiC91RnvohljPYT7pzeNWtBZotzk
1PIkp5kTWbCMuui38C5SPWYkCuoDSbugS7Nijx73PgBKo+ZjZf2FKhwrwFgaDgmK
+Mnnxk1Mn2Rp7m/EvyuhA5NkUHxVpejZFCpCLvzUNM+R6nXXdp+t
-----END RSA PRIVATE KEY-----
";

const RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAvySmkmxhg42hZFFq9PWD
fH87fC4NjsZ3yb5pX36dXsq8OdXwy8xmu8WryVoEzonstUTma7lSzm3WprgO+bU/
q6mj6BNWjs0vwija0JA4L3y2opWaL73g4Jn+ZSY9dj0yjmzCHJ9GXsWc099tBlDG
0FZN2I+JcpEenR2QGtzwQinrrNMDkawbzfPj46QuHs1ogDxysDOeRRPQWgH5OG91
aA3xEWTYK/oEBQPmPTxpgunTr3QteSaJcCIgIa2dd1qjHphq+NYlnJe8nZw7yFLU
79t1XXpFF4AHowz1AG/yHII4RevwqT+ljArcIjdzbHs09WVzKoWkykeS+Ou+IQS4
vQIDAQAB
-----END PUBLIC KEY-----
";

/// The value of header `name` (any case) in a response head (status line first).
fn head_header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// An HTTP answer read off a raw connection.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
    /// The server closed the connection after the answer.
    closed: bool,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        head_header(&self.head, name)
    }
}

fn parse_reply(out: &[u8], closed: bool) -> Reply {
    let text = String::from_utf8_lossy(out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
        closed,
    }
}

/// Sends raw bytes and reads until the server closes or 10 s pass.
async fn raw(port: u16, bytes: &[u8]) -> Reply {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = Instant::now() + Duration::from_secs(10);
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    parse_reply(&out, closed)
}

/// One request with `Connection: close`.
async fn send(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str("Host: test\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    raw(port, &[head.as_bytes(), body].concat()).await
}

async fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(port, "GET", path, headers, b"").await
}

async fn deploy(client: &mut MeshClient, name: &str, wat: &str, timeout_ms: u64) {
    deploy_with_url(client, name, wat, timeout_ms, "")
        .await
        .unwrap();
}

/// Deploys with `url` access at `/fn/<name>` (empty for the default).
async fn deploy_with_url(
    client: &mut MeshClient,
    name: &str,
    wat: &str,
    timeout_ms: u64,
    url: &str,
) -> Result<(), meshwork_client::ClientError> {
    let wasm = wat::parse_str(wat).unwrap();
    let info = client
        .put_blob(
            std::io::Cursor::new(wasm),
            UploadOptions {
                pinned: true,
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    client
        .deploy_function(DeployFunctionRequest {
            name: name.into(),
            module: info.blake3,
            memory_bytes: 16 << 20,
            timeout_ms,
            env: Default::default(),
            concurrency: 64,
            replicas: 1,
            events: vec![],
            url: url.into(),
        })
        .await
        .map(|_| ())
}

fn fn_route(path: &str, function: &str) -> Route {
    Route {
        path: path.into(),
        function: function.into(),
        ..Default::default()
    }
}

/// Waits until every node answers `path` with `status` (routes and keys spread).
async fn wait_status(cluster: &TestCluster, path: &str, headers: &[(&str, &str)], status: u16) {
    for node in &cluster.nodes {
        let port = node.http;
        wait_until(
            CONVERGE,
            &format!("{} answers {path} with {status}", node.name),
            || async { get(port, path, headers).await.status == status },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_methods_parameters_hosts_cors_limits_and_timeouts() {
    let cluster = TestCluster::start(1);
    let node = &cluster.nodes[0];
    let port = node.http;
    let mut c = node.client().await;
    deploy(&mut c, "env", ENV_WAT, 5000).await;
    deploy(&mut c, "spin", SPIN_WAT, 2000).await;
    c.add_route(Route {
        methods: vec!["get".into(), "POST".into()],
        ..fn_route("/api/users/{id}", "env")
    })
    .await
    .unwrap();
    c.add_route(Route {
        host: "Example.com".into(),
        ..fn_route("/only-host", "env")
    })
    .await
    .unwrap();
    c.add_route(Route {
        cors_origins: vec!["https://app.example".into()],
        methods: vec!["GET".into(), "POST".into()],
        ..fn_route("/cors", "env")
    })
    .await
    .unwrap();
    c.add_route(Route {
        max_body_bytes: 1024,
        ..fn_route("/small", "env")
    })
    .await
    .unwrap();
    c.add_route(Route {
        timeout_ms: 300,
        ..fn_route("/slow", "spin")
    })
    .await
    .unwrap();
    let listed = c.routes().await.unwrap();
    let users = listed.iter().find(|r| r.path == "/api/users/{id}").unwrap();
    assert_eq!(users.methods, ["GET", "POST"]);
    assert_eq!(users.auth, "none");
    assert!(listed.iter().any(|r| r.host == "example.com"));

    // Parameters, the rest of the path and the query reach the function; forged gateway
    // headers do not.
    wait_status(&cluster, "/api/users/42", &[], 200).await;
    let r = get(
        port,
        "/api/users/42/photos?size=big",
        &[("X-Mesh-Param-Id", "forged"), ("X-Mesh-Key", "forged")],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("HTTP_X_MESH_PARAM_ID=42\n"), "{}", r.body);
    assert!(r.body.contains("PATH_INFO=/photos\n"), "{}", r.body);
    assert!(r.body.contains("QUERY_STRING=size=big\n"), "{}", r.body);
    assert!(!r.body.contains("forged"), "{}", r.body);
    let r = get(port, "/api/users/ann%20lee", &[]).await;
    assert!(
        r.body.contains("HTTP_X_MESH_PARAM_ID=ann lee\n"),
        "{}",
        r.body
    );
    assert!(r.body.contains("PATH_INFO=/\n"), "{}", r.body);
    assert_eq!(
        send(port, "POST", "/api/users/7", &[], b"x").await.status,
        200
    );
    assert_eq!(
        send(port, "HEAD", "/api/users/7", &[], b"").await.status,
        200
    );

    // Methods: 405 with Allow.
    let r = send(port, "DELETE", "/api/users/42", &[], b"").await;
    assert_eq!(r.status, 405, "{r:?}");
    assert_eq!(r.header("allow").as_deref(), Some("GET, POST, HEAD"));

    // Hosts: the port and the case do not matter; another host gets 404.
    let r = get(port, "/only-host/x", &[("Host", "EXAMPLE.com:8080")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("PATH_INFO=/x\n"), "{}", r.body);
    assert_eq!(
        get(port, "/only-host", &[("Host", "other.org")])
            .await
            .status,
        404
    );

    // CORS: preflight from an allowed origin, refused for another; responses carry the
    // allowed origin only.
    let r = send(
        port,
        "OPTIONS",
        "/cors",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "x-api-key, content-type"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(
        r.header("access-control-allow-headers").as_deref(),
        Some("x-api-key, content-type")
    );
    assert_eq!(
        r.header("access-control-allow-methods").as_deref(),
        Some("GET, POST, HEAD")
    );
    let r = send(
        port,
        "OPTIONS",
        "/cors",
        &[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), None);
    let r = get(port, "/cors", &[("Origin", "https://app.example")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    let r = get(port, "/cors", &[("Origin", "https://evil.example")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);

    // Body limit per route, from the declared length.
    let r = send(port, "POST", "/small", &[], &[b'a'; 2000]).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(
        send(port, "POST", "/small", &[], &[b'a'; 1000])
            .await
            .status,
        200
    );

    // The route's time limit (300 ms) ends the call before the function's own (2 s).
    let r = get(port, "/slow", &[]).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(r.body.contains("300 ms"), "{}", r.body);

    // Bad routes are refused with the reason.
    let bad = [
        Route {
            methods: vec!["GE T".into()],
            ..fn_route("/b", "env")
        },
        Route {
            plans: vec!["basic".into()],
            ..fn_route("/b", "env")
        },
        Route {
            cors_origins: vec!["example.com".into()],
            ..fn_route("/b", "env")
        },
        Route {
            max_body_bytes: 7 << 20,
            ..fn_route("/b", "env")
        },
        Route {
            auth: "jwt".into(),
            ..fn_route("/b", "env")
        },
        Route {
            auth: "magic".into(),
            ..fn_route("/b", "env")
        },
        fn_route("/b/{x}/{x}", "env"),
    ];
    for r in bad {
        let e = c.add_route(r.clone()).await.unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{r:?}: {e}");
    }
    let e = c
        .add_route(Route {
            auth: "key".into(),
            plans: vec!["nope".into()],
            ..fn_route("/b", "env")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");

    // Monitoring: /metrics per route, the stats call, and an access log line.
    let metrics = get(port, "/metrics", &[]).await.body;
    for line in [
        "mesh_gateway_requests_total{route=\"/api/users/{id}\"}",
        "mesh_gateway_4xx_total{route=\"/api/users/{id}\"} 1",
        "mesh_gateway_5xx_total{route=\"/slow\"} 1",
        "mesh_gateway_duration_seconds",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    let stats = c.gateway_stats().await.unwrap();
    let users = stats.iter().find(|s| s.route == "/api/users/{id}").unwrap();
    assert!(users.requests >= 6, "{users:?}");
    assert_eq!(users.client_errors, 1, "{users:?}");
    assert!(users.p99_seconds > 0.0, "{users:?}");
    let slow = stats.iter().find(|s| s.route == "/slow").unwrap();
    assert_eq!((slow.requests, slow.server_errors), (1, 1), "{slow:?}");
    assert!(stats.iter().any(|s| s.route == "example.com/only-host"));
    wait_until(
        Duration::from_secs(5),
        "the access log has the 405",
        || async {
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            log.lines().any(|l| {
                l.contains("gateway::access")
                    && l.contains("method=DELETE")
                    && l.contains("route=/api/users/{id}")
                    && l.contains("status=405")
                    && l.contains("node=n0")
            })
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_with_raw_requests() {
    let cluster = TestCluster::start(1);
    let node = &cluster.nodes[0];
    let port = node.http;
    let mut c = node.client().await;
    deploy(&mut c, "env", ENV_WAT, 5000).await;
    c.add_route(Route {
        max_body_bytes: 1000,
        ..fn_route("/h", "env")
    })
    .await
    .unwrap();
    c.add_route(fn_route("/p/{id}", "env")).await.unwrap();
    wait_status(&cluster, "/h", &[], 200).await;

    // Both Content-Length and Transfer-Encoding, in either order: 400 and closed.
    for head in [
        "POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /h HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ] {
        let r = raw(port, head.as_bytes()).await;
        assert_eq!(r.status, 400, "{head:?}: {r:?}");
        assert!(r.closed, "{r:?}");
        assert_eq!(r.header("connection").as_deref(), Some("close"));
        assert!(r.body.contains("ambiguous"), "{r:?}");
    }
    // Content-Length twice, equal or not: 400 and closed.
    for head in [
        "POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ] {
        let r = raw(port, head.as_bytes()).await;
        assert_eq!(r.status, 400, "{head:?}: {r:?}");
        assert!(r.closed, "{r:?}");
    }
    // On a kept-alive connection: the good request is answered, the ambiguous one after it
    // is refused and nothing after that is read.
    let pipelined = "GET /h HTTP/1.1\r\nHost: x\r\n\r\n\
        POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
        GET /h HTTP/1.1\r\nHost: x\r\n\r\n";
    let r = raw(port, pipelined.as_bytes()).await;
    assert!(r.closed);
    let text = format!("{}\r\n\r\n{}", r.head, r.body);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "400"], "{text}");

    // Too many headers, or too large a head: 431.
    let mut many = String::from("GET /h HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(port, many.as_bytes()).await;
    assert_eq!(r.status, 431, "{r:?}");
    let big = format!(
        "GET /h HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let r = raw(port, big.as_bytes()).await;
    assert_eq!(r.status, 431, "{r:?}");

    // A body over the limit: refused from the declared length without waiting for the body...
    let started = Instant::now();
    let r = raw(
        port,
        b"POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\nabc",
    )
    .await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "answered before the body"
    );
    // ... and as soon as a chunked body passes it.
    let mut chunked =
        String::from("POST /h HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..4 {
        chunked.push_str(&format!("1f4\r\n{}\r\n", "b".repeat(500)));
    }
    let r = raw(port, chunked.as_bytes()).await;
    assert_eq!(r.status, 413, "{r:?}");
    // The default limit (6 MiB) on /fn/ too.
    let r = raw(
        port,
        b"POST /fn/env HTTP/1.1\r\nHost: x\r\nContent-Length: 7000000\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 413, "{r:?}");

    // CR and LF are never echoed: encoded ones stay encoded in the 404 text and in a
    // parameter, raw ones are refused by the parser.
    let r = get(port, "/nope%0d%0aX-Injected:%20yes", &[]).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(!r.head.to_ascii_lowercase().contains("x-injected"), "{r:?}");
    assert!(!r.body.contains('\r'), "{r:?}");
    let r = get(port, "/p/a%0d%0aX-Injected:%20yes", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body
            .contains("HTTP_X_MESH_PARAM_ID=a%0d%0aX-Injected:%20yes\n"),
        "{}",
        r.body
    );
    let r = raw(port, b"GET /h\rX-Injected: yes HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(!r.head.to_ascii_lowercase().contains("x-injected"), "{r:?}");

    // A slow client (an unfinished head) is disconnected after the header timeout (10 s).
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /h HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection of a slow client stays open: {read:?}"
    );

    // The node still serves.
    assert_eq!(get(port, "/h", &[]).await.status, 200);
    let metrics = get(port, "/metrics", &[]).await.body;
    assert!(
        metrics.contains("mesh_gateway_4xx_total{route=\"-\"}"),
        "{metrics}"
    );
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_routes_accept_valid_tokens_and_reject_the_rest() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    let cluster = TestCluster::start(1);
    let port = cluster.nodes[0].http;
    let mut c = cluster.nodes[0].client().await;
    deploy(&mut c, "env", ENV_WAT, 5000).await;
    let secret = b"a shared secret of 32 bytes.....";
    c.add_route(Route {
        auth: "jwt".into(),
        jwt_hs256_secret: secret.to_vec(),
        jwt_audience: "api".into(),
        ..fn_route("/hs", "env")
    })
    .await
    .unwrap();
    c.add_route(Route {
        auth: "jwt".into(),
        jwt_rs256_public_key: RSA_PUBLIC.into(),
        ..fn_route("/rs", "env")
    })
    .await
    .unwrap();
    let listed = c.routes().await.unwrap();
    let hs = listed.iter().find(|r| r.path == "/hs").unwrap();
    assert!(hs.jwt_hs256_secret.is_empty(), "the secret is never listed");
    assert!(hs.jwt_hs256_configured);
    assert_eq!(hs.jwt_audience, "api");
    wait_status(&cluster, "/hs", &[], 401).await;

    let hs_token = |claims: serde_json::Value, key: &[u8]| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key),
        )
        .unwrap()
    };
    let rs_token = |claims: serde_json::Value| {
        encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let call = |path: &'static str, token: Option<String>| async move {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        get(port, path, &headers).await
    };

    // Accepted: the subject reaches the function.
    let good = hs_token(
        serde_json::json!({"sub": "ann", "aud": "api", "exp": now_s() + 300}),
        secret,
    );
    let r = call("/hs", Some(good)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("HTTP_X_MESH_JWT_SUB=ann\n"), "{}", r.body);
    let r = call(
        "/rs",
        Some(rs_token(
            serde_json::json!({"sub": "bob", "exp": now_s() + 300}),
        )),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("HTTP_X_MESH_JWT_SUB=bob\n"), "{}", r.body);

    // Rejected, with the reason.
    let cases = [
        ("/hs", None, "missing bearer token"),
        (
            "/hs",
            Some(hs_token(
                serde_json::json!({"aud": "api", "exp": now_s() - 3600}),
                secret,
            )),
            "token expired",
        ),
        (
            "/hs",
            Some(hs_token(
                serde_json::json!({"aud": "web", "exp": now_s() + 300}),
                secret,
            )),
            "wrong audience",
        ),
        (
            "/hs",
            Some(hs_token(
                serde_json::json!({"aud": "api", "exp": now_s() + 300}),
                b"not the secret, but 32 bytes....",
            )),
            "bad signature",
        ),
        (
            "/hs",
            Some(hs_token(serde_json::json!({"aud": "api"}), secret)),
            "missing",
        ),
        ("/hs", Some("not.a.token".into()), "malformed token"),
        (
            "/rs",
            Some(rs_token(serde_json::json!({"exp": now_s() - 3600}))),
            "token expired",
        ),
        // An HS256 token on an RS256-only route (the public key as the HMAC secret).
        (
            "/rs",
            Some(hs_token(
                serde_json::json!({"exp": now_s() + 300}),
                RSA_PUBLIC.as_bytes(),
            )),
            "not accepted",
        ),
        (
            "/rs",
            Some({
                let t = rs_token(serde_json::json!({"sub": "bob", "exp": now_s() + 300}));
                let (rest, sig) = t.rsplit_once('.').unwrap();
                let flipped = if sig.starts_with('A') { "B" } else { "A" };
                format!("{rest}.{flipped}{}", &sig[1..])
            }),
            "bad signature",
        ),
    ];
    for (path, token, why) in cases {
        let r = call(path, token.clone()).await;
        assert_eq!(r.status, 401, "{path} {token:?}: {r:?}");
        assert!(r.body.contains(why), "{path} {why}: {r:?}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|h| h.starts_with("Bearer")),
            "{r:?}"
        );
    }

    // A route with JWT auth needs a key that parses.
    let e = c
        .add_route(Route {
            auth: "jwt".into(),
            jwt_rs256_public_key: "not a key".into(),
            ..fn_route("/bad", "env")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_plans_throttle_mesh_wide_with_quotas_and_revocation() {
    let cluster = TestCluster::start(3);
    for i in 0..3 {
        cluster
            .wait_states(
                i,
                &[("n0", "alive"), ("n1", "alive"), ("n2", "alive")],
                CONVERGE,
            )
            .await;
    }
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.http).collect();
    let mut c = cluster.nodes[0].client().await;
    deploy(&mut c, "env", ENV_WAT, 5000).await;
    let plan = |name: &str, rate: f64, burst: u32, quota: u64| Plan {
        name: name.into(),
        rate_per_second: rate,
        burst,
        quota_per_day: quota,
        created_ms: 0,
    };
    let (rate, burst) = (2.0, 3u32);
    c.create_plan(plan("basic", rate, burst, 0)).await.unwrap();
    c.create_plan(plan("tiny", 100.0, 100, 5)).await.unwrap();
    c.create_plan(plan("other", 100.0, 100, 0)).await.unwrap();
    let e = c.create_plan(plan("bad", 0.0, 1, 0)).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    let mobile = c.create_key("mobile", "basic").await.unwrap();
    assert!(mobile.secret.starts_with("mw_"), "{}", mobile.secret);
    let daily = c.create_key("daily", "tiny").await.unwrap().secret;
    let stranger = c.create_key("stranger", "other").await.unwrap().secret;
    let free = c.create_key("free", "").await.unwrap().secret;
    let mobile = mobile.secret;
    let e = c.create_key("mobile", "basic").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::AlreadyExists), "{e}");
    let e = c.create_key("k2", "nope").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
    c.add_route(Route {
        auth: "key".into(),
        plans: vec!["basic".into(), "tiny".into()],
        ..fn_route("/k", "env")
    })
    .await
    .unwrap();
    c.add_route(Route {
        auth: "key".into(),
        ..fn_route("/q", "env")
    })
    .await
    .unwrap();
    let e = c.remove_plan("basic").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition), "{e}");

    // Only hashes are stored: the key is nowhere in the replicated state.
    let state = c.list("").await.unwrap();
    assert!(
        !state.iter().any(|e| e.value.contains(&mobile[3..])),
        "a key is stored in the clear"
    );
    let keys = c.keys().await.unwrap();
    assert_eq!(keys.len(), 4);
    let k = keys.iter().find(|k| k.name == "mobile").unwrap();
    assert_eq!((k.plan.as_str(), k.revoked), ("basic", false));
    assert!(mobile.contains(&k.id));

    // Every node knows the routes and keys (the key without a plan has no limits).
    wait_status(&cluster, "/q", &[("x-api-key", free.as_str())], 200).await;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let ci = node.client().await;
        wait_until(CONVERGE, &format!("n{i} has the keys"), || {
            let mut ci = ci.clone();
            async move { ci.keys().await.map(|k| k.len()).unwrap_or(0) == 4 }
        })
        .await
        .unwrap();
    }

    // Missing or unknown keys 401; a key of a plan the route does not allow 403.
    let port = ports[1];
    assert_eq!(get(port, "/k", &[]).await.status, 401);
    for bad in ["nope", "mw_000000000000_00", &mobile[..mobile.len() - 1]] {
        let r = get(port, "/k", &[("x-api-key", bad)]).await;
        assert_eq!(r.status, 401, "{bad}: {r:?}");
    }
    let r = get(port, "/k", &[("x-api-key", stranger.as_str())]).await;
    assert_eq!(r.status, 403, "{r:?}");

    // Throttling: one key spread over three nodes. Each node holds a bucket with the plan's
    // burst and a share of its rate, so the mesh accepts at most rate × elapsed + nodes ×
    // burst.
    let started = Instant::now();
    let (mut accepted, mut throttled) = (0u64, 0u64);
    let mut sent = 0u64;
    for i in 0..150 {
        let port = ports[i % 3];
        let r = get(port, "/k", &[("x-api-key", mobile.as_str())]).await;
        sent += 1;
        match r.status {
            200 => {
                accepted += 1;
                assert!(r.body.contains("HTTP_X_MESH_KEY=mobile\n"), "{}", r.body);
                assert!(!r.body.contains(&mobile[3..]), "the key reached the target");
            }
            429 => {
                throttled += 1;
                let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
                assert!(retry >= 1, "{r:?}");
            }
            other => panic!("unexpected {other}: {r:?}"),
        }
    }
    // Then all on one node for a while, so the shares rebalance under load.
    for _ in 0..60 {
        let r = get(ports[0], "/k", &[("x-api-key", mobile.as_str())]).await;
        sent += 1;
        match r.status {
            200 => accepted += 1,
            429 => throttled += 1,
            other => panic!("unexpected {other}: {r:?}"),
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let bound = rate * elapsed + 3.0 * f64::from(burst);
    eprintln!(
        "accepted {accepted}, throttled {throttled} of {sent} in {elapsed:.2}s (bound {bound:.1})"
    );
    assert!(
        (accepted as f64) <= bound,
        "accepted {accepted} of {sent} in {elapsed:.2}s: more than {bound:.1}"
    );
    assert!(accepted >= u64::from(burst), "accepted only {accepted}");
    assert!(throttled > 0);

    // The daily quota (5 per day): counted on every node, from the published counters.
    for i in 0..5 {
        let r = get(ports[0], "/q", &[("x-api-key", daily.as_str())]).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
    let r = get(ports[0], "/q", &[("x-api-key", daily.as_str())]).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.body.contains("daily quota"), "{r:?}");
    assert!(r.header("retry-after").is_some());
    for (i, &port) in ports.iter().enumerate().skip(1) {
        let ci = cluster.nodes[i].client().await;
        wait_until(CONVERGE, &format!("n{i} counts 5 for daily"), || {
            let mut ci = ci.clone();
            async move {
                ci.keys()
                    .await
                    .is_ok_and(|ks| ks.iter().any(|k| k.name == "daily" && k.used_today == 5))
            }
        })
        .await
        .unwrap();
        // Give the node's once-a-second rebalance a chance to read the counters it now has.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let r = get(port, "/q", &[("x-api-key", daily.as_str())]).await;
        assert_eq!(r.status, 429, "n{i}: {r:?}");
    }

    // Revocation spreads: every node answers 403.
    let mut c1 = cluster.nodes[1].client().await;
    let revoked = c1.revoke_key("free").await.unwrap();
    assert!(revoked.revoked);
    wait_status(&cluster, "/q", &[("x-api-key", free.as_str())], 403).await;
    let keys = c.keys().await.unwrap();
    assert!(keys.iter().any(|k| k.name == "free" && k.revoked));

    // Stats summed over the three nodes.
    let stats = c.gateway_stats().await.unwrap();
    let k = stats.iter().find(|s| s.route == "/k").unwrap();
    assert_eq!(k.throttled, throttled, "{k:?}");
    assert_eq!(k.requests, sent + 5, "{k:?}");
    assert_eq!(k.client_errors, throttled + 5, "{k:?}");
    let metrics = get(ports[0], "/metrics", &[]).await.body;
    assert!(
        metrics.contains("mesh_gateway_throttled_total{route=\"/k\"}"),
        "{metrics}"
    );
}

/// An answer read off a raw connection as bytes.
struct RawReply {
    status: u16,
    head: String,
    /// The body as sent (still chunked if it was).
    body: Vec<u8>,
    /// The server closed the connection (rather than 30 s passing).
    closed: bool,
}

impl RawReply {
    fn header(&self, name: &str) -> Option<String> {
        head_header(&self.head, name)
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding").as_deref() == Some("chunked")
    }
}

/// One request with `Connection: close`, read as bytes until the server closes.
async fn fetch(port: u16, method: &str, path: &str) -> RawReply {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&out[..at]).trim_end().to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    RawReply {
        status,
        head,
        body: out[at..].to_vec(),
        closed,
    }
}

/// Decodes a chunked body: the data, and whether it ended properly (the last, empty chunk).
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (data, false);
        };
        let line = String::from_utf8_lossy(&raw[..eol]);
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
        raw = &raw[eol + 2..];
        if size == 0 {
            return (data, raw.starts_with(b"\r\n"));
        }
        if raw.len() < size + 2 {
            data.extend_from_slice(&raw[..raw.len().min(size)]);
            return (data, false);
        }
        data.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_responses_over_the_route_limit_get_502() {
    let cluster = TestCluster::start(1);
    let node = &cluster.nodes[0];
    let port = node.http;
    let mut c = node.client().await;
    deploy(&mut c, "blob", BLOB_WAT, 5000).await;
    let limited = |path: &str, bytes: Option<u64>| Route {
        max_response_bytes: bytes,
        ..fn_route(path, "blob")
    };
    c.add_route(limited("/exact", Some(BLOB_LEN as u64)))
        .await
        .unwrap();
    c.add_route(limited("/small", Some(BLOB_LEN as u64 - 1)))
        .await
        .unwrap();
    c.add_route(limited("/default", None)).await.unwrap();
    let listed = c.routes().await.unwrap();
    let limit_of = |path: &str| {
        listed
            .iter()
            .find(|r| r.path == path)
            .unwrap()
            .max_response_bytes
    };
    assert_eq!(limit_of("/exact"), Some(BLOB_LEN as u64));
    assert_eq!(limit_of("/default"), None, "the default is not stored");
    wait_status(&cluster, "/default", &[], 200).await;

    // At the limit, and under the default: the body passes byte for byte.
    let expected: Vec<u8> = (0..BLOB_LEN).map(|i| b'a' + (i % 26) as u8).collect();
    for path in ["/exact", "/default"] {
        let r = fetch(port, "GET", path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        assert_eq!(r.body, expected, "{path}");
    }

    // One byte over: 502 saying why. HEAD answers carry no body and are not limited.
    let r = get(port, "/small", &[]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        r.body.contains(
            "the function's response is 5000 bytes, over this route's response limit of 4999 bytes"
        ),
        "{r:?}"
    );
    assert_eq!(send(port, "HEAD", "/small", &[], b"").await.status, 200);
    let stats = c.gateway_stats().await.unwrap();
    let small = stats.iter().find(|s| s.route == "/small").unwrap();
    assert_eq!((small.requests, small.server_errors), (2, 1), "{small:?}");
    let metrics = get(port, "/metrics", &[]).await.body;
    assert!(
        metrics.contains("mesh_gateway_response_too_large_total{route=\"/small\"} 1"),
        "{metrics}"
    );
    wait_until(Duration::from_secs(5), "the refusal is logged", || async {
        let log = std::fs::read_to_string(&node.log).unwrap_or_default();
        log.lines().any(|l| {
            l.contains("WARN")
                && l.contains("response limit")
                && l.contains("route=/small")
                && l.contains("limit=4999")
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log_tail()));

    // Limits out of range are refused with the reason.
    let svc_route = |bytes| Route {
        path: "/s".into(),
        service: "web".into(),
        max_response_bytes: Some(bytes),
        ..Default::default()
    };
    for (route, why) in [
        (limited("/b", Some(0)), "must be at least 1 byte"),
        (svc_route(0), "must be at least 1 byte"),
        (
            limited("/b", Some((32 << 20) + 1)),
            "at most 33554432 for a function route",
        ),
        (
            svc_route((16 << 30) + 1),
            "at most 17179869184 for a service route",
        ),
    ] {
        let e = c.add_route(route.clone()).await.unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{route:?}");
        assert!(e.to_string().contains(why), "{route:?}: {e}");
    }
    // The largest limits are accepted.
    c.add_route(limited("/b", Some(32 << 20))).await.unwrap();
    c.add_route(svc_route(16 << 30)).await.unwrap();
}

/// A busybox httpd image serving `files` under `/www`, with two CGI scripts: `chunked?N`
/// answers N KiB in chunks of 1 KiB with `Transfer-Encoding: chunked`, `stream?N` answers N
/// KiB with no length at all (delimited by closing the connection). Every KiB is [`KIB`].
fn httpd_image(dir: &std::path::Path, files: &[(&str, &[u8])]) -> Option<std::path::PathBuf> {
    let busybox = std::fs::read("/bin/busybox").ok()?;
    let tar = dir.join("httpd.tar");
    let kib = format!("kib={}\n", String::from_utf8(kib()).unwrap());
    let chunked = format!(
        "#!/bin/sh\n{kib}\
         printf 'HTTP/1.1 200 OK\\r\\nContent-Type: application/octet-stream\\r\\n\
         Transfer-Encoding: chunked\\r\\n\\r\\n'\n\
         i=0\n\
         while [ $i -lt \"$QUERY_STRING\" ]; do printf '400\\r\\n%s\\r\\n' \"$kib\"; i=$((i+1)); done\n\
         printf '0\\r\\n\\r\\n'\n"
    );
    let stream = format!(
        "#!/bin/sh\n{kib}\
         printf 'Content-Type: application/octet-stream\\r\\n\\r\\n'\n\
         i=0\n\
         while [ $i -lt \"$QUERY_STRING\" ]; do printf '%s' \"$kib\"; i=$((i+1)); done\n"
    );
    let mut entries: Vec<(String, &[u8], u32)> = vec![
        ("bin/busybox".into(), &busybox, 0o755),
        ("bin/sh".into(), &busybox, 0o755),
        ("www/index.html".into(), b"ok\n", 0o644),
        ("www/cgi-bin/chunked".into(), chunked.as_bytes(), 0o755),
        ("www/cgi-bin/stream".into(), stream.as_bytes(), 0o755),
    ];
    for (name, bytes) in files {
        entries.push((format!("www/{name}"), bytes, 0o644));
    }
    let entries: Vec<(&str, &[u8], u32)> = entries
        .iter()
        .map(|(n, b, m)| (n.as_str(), *b, *m))
        .collect();
    oci::write_oci_layout_tar(
        &tar,
        &entries,
        &[
            "/bin/sh",
            "-c",
            "exec /bin/busybox httpd -f -p $PORT -h /www",
        ],
    )
    .unwrap();
    Some(tar)
}

/// The KiB the CGI scripts repeat.
fn kib() -> Vec<u8> {
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_".repeat(16)
}

/// `n` bytes that are not all alike.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_responses_over_the_route_limit_get_502_or_are_cut() {
    if !std::path::Path::new(common::CONTAINERD_SOCKET).exists() {
        eprintln!(
            "skipped: containerd not running at {}",
            common::CONTAINERD_SOCKET
        );
        return;
    }
    const LIMIT: usize = 256 << 10;
    let small = noise(200_000);
    let exact = noise(LIMIT);
    let large = noise(LIMIT + 1);
    let mesh = Mesh::start(1, "gwlimit").await;
    let Some(image) = httpd_image(
        mesh.cluster.dir.path(),
        &[
            ("small.bin", &small),
            ("exact.bin", &exact),
            ("large.bin", &large),
        ],
    ) else {
        eprintln!("skipped: /bin/busybox missing (apt-get install busybox-static)");
        return;
    };
    let node = &mesh.cluster.nodes[0];
    let port = node.http;
    let mut c = mesh.client(0).await;
    push_image(&mut c, &image, "files:1", 1, |_, _| {})
        .await
        .unwrap();
    c.create_service(CreateServiceRequest {
        name: "files".into(),
        image: "files:1".into(),
        replicas: 1,
        cpu_millis: 100,
        memory_bytes: 32 << 20,
        port: 8080,
        health_http: "/index.html".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.add_route(Route {
        path: "/files".into(),
        service: "files".into(),
        max_response_bytes: Some(LIMIT as u64),
        ..Default::default()
    })
    .await
    .unwrap();
    c.add_route(Route {
        path: "/open".into(),
        service: "files".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let listed = c.routes().await.unwrap();
    let files = listed.iter().find(|r| r.path == "/files").unwrap();
    assert_eq!(files.max_response_bytes, Some(LIMIT as u64));
    // Through /open, so that /files counts only the requests below.
    mesh.wait(120, "the replica serves through the gateway", async || {
        fetch(port, "GET", "/open/index.html").await.status == 200
    })
    .await;

    // Under the limit and at it: byte for byte, with the length.
    for (name, bytes) in [("small.bin", &small), ("exact.bin", &exact)] {
        let r = fetch(port, "GET", &format!("/files/{name}")).await;
        assert_eq!(r.status, 200, "{name}: {}", r.head);
        assert_eq!(r.header("content-length"), Some(bytes.len().to_string()));
        assert!(r.body == *bytes, "{name}: {} bytes differ", r.body.len());
    }
    // Chunked under the limit: whole, with its last chunk.
    let r = fetch(port, "GET", "/files/cgi-bin/chunked?100").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.chunked(), "{}", r.head);
    let (data, complete) = dechunk(&r.body);
    assert!(complete, "{} bytes, no last chunk", data.len());
    assert!(data == kib().repeat(100), "{} bytes differ", data.len());

    // A declared length one byte over: 502 saying why; HEAD is not limited; the default
    // limit (10 MiB) lets it through.
    let r = fetch(port, "GET", "/files/large.bin").await;
    assert_eq!(r.status, 502, "{}", r.head);
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains(&format!(
            "the upstream response (Content-Length) is {} bytes, over this route's response \
             limit of {LIMIT} bytes",
            LIMIT + 1
        )),
        "{text}"
    );
    let r = fetch(port, "HEAD", "/files/large.bin").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("content-length"), Some((LIMIT + 1).to_string()));
    let r = fetch(port, "GET", "/open/large.bin").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.body == large);

    // Without a length (chunked, or until the replica closes): the head has gone out, so the
    // body is cut where it passes the limit. The client sees the connection close before
    // the last chunk, never an ending that looks complete.
    for script in ["chunked", "stream"] {
        let r = fetch(port, "GET", &format!("/files/cgi-bin/{script}?1024")).await;
        assert_eq!(r.status, 200, "{script}: {}", r.head);
        assert!(r.chunked(), "{script}: {}", r.head);
        assert!(r.closed, "{script}: the connection stayed open");
        let (data, complete) = dechunk(&r.body);
        assert!(!complete, "{script}: a cut body ended with its last chunk");
        assert!(
            data.len() <= LIMIT,
            "{script}: {} bytes passed a limit of {LIMIT}",
            data.len()
        );
        assert!(
            kib().repeat(LIMIT / 1024).starts_with(&data),
            "{script}: what passed is not the start of the answer"
        );
    }

    // Counted as server errors of the route, and logged with the route and the limit.
    let stats = c.gateway_stats().await.unwrap();
    let s = stats.iter().find(|s| s.route == "/files").unwrap();
    assert_eq!((s.requests, s.server_errors), (7, 3), "{s:?}");
    let metrics = fetch(port, "GET", "/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(
        metrics.contains("mesh_gateway_response_too_large_total{route=\"/files\"} 3"),
        "{metrics}"
    );
    mesh.wait(10, "the 502 and both cuts are logged", async || {
        let log = std::fs::read_to_string(&node.log).unwrap_or_default();
        let warned = |what: &str| {
            log.lines()
                .filter(|l| {
                    l.contains("WARN")
                        && l.contains(what)
                        && l.contains("route=/files")
                        && l.contains(&format!("limit={LIMIT}"))
                })
                .count()
        };
        warned("answered 502") == 1 && warned("cut") == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_urls_are_public_keyed_or_off() {
    let cluster = TestCluster::start(1);
    cluster.wait_states(0, &[("n0", "alive")], CONVERGE).await;
    let port = cluster.nodes[0].http;
    let mut c = cluster.nodes[0].client().await;
    deploy(&mut c, "open", ENV_WAT, 5000).await;
    deploy_with_url(&mut c, "keyed", ENV_WAT, 5000, "key")
        .await
        .unwrap();
    deploy_with_url(&mut c, "closed", ENV_WAT, 5000, "off")
        .await
        .unwrap();
    let e = deploy_with_url(&mut c, "odd", ENV_WAT, 5000, "private")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("expected public, key or off"), "{e}");
    let urls: Vec<(String, String)> = c
        .functions()
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.name, f.url))
        .collect();
    assert!(urls.contains(&("keyed".into(), "key".into())), "{urls:?}");
    assert!(urls.contains(&("open".into(), "public".into())), "{urls:?}");

    c.create_plan(Plan {
        name: "tiny".into(),
        rate_per_second: 100.0,
        burst: 100,
        quota_per_day: 2,
        created_ms: 0,
    })
    .await
    .unwrap();
    let metered = c.create_key("metered", "tiny").await.unwrap().secret;
    let free = c.create_key("free", "").await.unwrap().secret;

    // Public (the default): anyone.
    let r = get(port, "/fn/open", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Keyed: the key pipeline of a route, without the key reaching the function.
    assert_eq!(get(port, "/fn/keyed", &[]).await.status, 401);
    let r = get(port, "/fn/keyed", &[("x-api-key", "mw_nope")]).await;
    assert_eq!(r.status, 401, "{r:?}");
    wait_status(&cluster, "/fn/keyed", &[("x-api-key", free.as_str())], 200).await;
    let r = get(
        port,
        "/fn/keyed/deeper?x=1",
        &[("x-api-key", free.as_str())],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let body = r.body.clone();
    assert!(body.contains("HTTP_X_MESH_KEY=free"), "{body}");
    assert!(body.contains("PATH_INFO=/deeper"), "{body}");
    assert!(
        !body.contains(&free[3..]),
        "the key reached the function: {body}"
    );
    // The key's plan applies: a daily quota of 2.
    for _ in 0..2 {
        let r = get(port, "/fn/keyed", &[("x-api-key", metered.as_str())]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = get(port, "/fn/keyed", &[("x-api-key", metered.as_str())]).await;
    assert_eq!(r.status, 429, "{r:?}");
    // A revoked key is refused.
    c.revoke_key("free").await.unwrap();
    wait_status(&cluster, "/fn/keyed", &[("x-api-key", free.as_str())], 403).await;
    // Public again after a redeploy without --url key.
    deploy(&mut c, "keyed", ENV_WAT, 5000).await;
    wait_status(&cluster, "/fn/keyed", &[], 200).await;

    // Off: refused at /fn/, with the reason; a route to it still works.
    let r = get(port, "/fn/closed", &[]).await;
    assert_eq!(r.status, 403, "{r:?}");
    let text = r.body.clone();
    assert!(text.contains("--url off"), "{text}");
    c.add_route(fn_route("/closed-route", "closed"))
        .await
        .unwrap();
    wait_status(&cluster, "/closed-route", &[], 200).await;
    // An unknown function is still a plain 404.
    assert_eq!(get(port, "/fn/nobody", &[]).await.status, 404);
}
