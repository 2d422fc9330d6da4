//! Forwarding to the replicas of a service over HTTP/1.1: to a healthy replica that runs under
//! its current claim, replicas on this node first (rotated among themselves), then round-robin
//! over the others; a replica that refuses the connection is skipped for the next one.
//! Connections to replicas are kept open and reused (at most [`MAX_IDLE`] idle ones per
//! replica); a request that a reused connection could not even send (the replica closed it
//! meanwhile) is sent again on a new one. Hop-by-hop headers (`Connection`, the headers it
//! names, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-Connection`)
//! are dropped in both directions, so a replica that closes every connection does not make the
//! client reconnect too. WebSocket (any HTTP upgrade) passes through when the route allows it,
//! on a connection of its own. Answers are held to the route's response limit (see
//! [`super::response`]); a connection is pooled again only after an answer read whole.
//!
//! The endpoints of each service are computed once per change ([`Upstreams`]): they depend
//! only on the replicated state (claims, replica statuses) and on the membership (verdicts,
//! addresses), so they are kept until either changes and recomputed by the first request
//! after it, never served stale.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;

use super::Gateway;
use super::response::{self, CappedBody, Source};
use super::stats::GatewayStats;
use crate::node::NodeState;
use crate::services::{self, Endpoint};

/// How long connecting to a replica may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Round-robin position shared by all requests of this node.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Idle connections kept per replica address.
pub const MAX_IDLE: usize = 64;

type ProxyBody = http_body_util::combinators::UnsyncBoxBody<
    bytes::Bytes,
    Box<dyn std::error::Error + Send + Sync>,
>;
type Sender = hyper::client::conn::http1::SendRequest<ProxyBody>;

/// Idle connections to replicas, by address.
static POOL: LazyLock<Mutex<HashMap<SocketAddr, Vec<Sender>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// An idle connection to `addr` that is still open, if there is one. It may still be
/// finishing its previous exchange: wait for [`Sender::ready`] before sending on it.
fn checkout(addr: SocketAddr) -> Option<Sender> {
    let mut pool = POOL.lock().expect("pool lock");
    let idle = pool.get_mut(&addr)?;
    while let Some(sender) = idle.pop() {
        if !sender.is_closed() {
            return Some(sender);
        }
    }
    None
}

/// Puts a connection back once its current exchange is over (the response body read). No
/// task is spawned to wait until the connection is ready again: [`checkout`]'s caller waits.
fn checkin(addr: SocketAddr, sender: Sender) {
    if sender.is_closed() {
        return;
    }
    let mut pool = POOL.lock().expect("pool lock");
    let idle = pool.entry(addr).or_default();
    idle.retain(|s| !s.is_closed());
    if idle.len() < MAX_IDLE {
        idle.push(sender);
    }
}

/// A new connection to `addr`; `upgrades` keeps it able to switch protocols.
async fn connect(addr: SocketAddr, upgrades: bool) -> Option<Sender> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
    });
    Some(sender)
}

/// Drops the hop-by-hop headers of one connection (RFC 9110 section 7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

pub(crate) fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Body::from(text + "\n"));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What the proxy needs of one service, computed once per change of what it depends on.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// Healthy replicas that run under their current claim, local ones first.
    endpoints: Vec<Endpoint>,
    /// The `Host` header sent to each endpoint (its address).
    hosts: Vec<HeaderValue>,
    /// How many endpoints are on this node (they come first).
    local: usize,
    /// `mesh_gateway_forwarded_total{service}`.
    forwarded: metrics::Counter,
}

impl Upstream {
    fn new(service: &str, endpoints: Vec<Endpoint>, me: &str) -> Self {
        let hosts = endpoints
            .iter()
            .map(|e| {
                HeaderValue::from_str(&e.addr.to_string()).expect("an address is a valid header")
            })
            .collect();
        let local = endpoints.iter().filter(|e| e.node == me).count();
        Self {
            endpoints,
            hosts,
            local,
            forwarded: metrics::counter!("mesh_gateway_forwarded_total",
                "service" => service.to_string()),
        }
    }

    /// The endpoints in the order to try them, with their `Host` header, for the `n`th
    /// request: local replicas first (rotated among themselves), then the others; without a
    /// local one, all rotated.
    fn order(&self, n: usize) -> impl Iterator<Item = (&Endpoint, &HeaderValue)> {
        let (len, local) = (self.endpoints.len(), self.local);
        (0..len).map(move |i| {
            let j = if local > 0 {
                if i < local { (i + n) % local } else { i }
            } else {
                (i + n) % len
            };
            (&self.endpoints[j], &self.hosts[j])
        })
    }
}

/// What a node's state and membership looked like when an [`Upstream`] was computed.
type Stamp = (u64, u64);

/// The [`Upstream`] of each service this node's gateway forwarded to since the last change
/// of the replicated state or the membership. A request reads the state's generation and
/// the membership's version first; an entry computed under other ones is recomputed, so a
/// replica that moved, died or became unhealthy is seen by the first request after the
/// change reached this node, as when the endpoints were read for every request.
#[derive(Default)]
pub(crate) struct Upstreams {
    entries: Mutex<HashMap<String, (Stamp, Arc<Upstream>)>>,
}

impl Upstreams {
    /// The current [`Upstream`] of `service`.
    pub(crate) fn get(&self, node: &NodeState, service: &str) -> Arc<Upstream> {
        // Read before the state, so that a change while computing only leaves an entry
        // that the next request recomputes.
        let stamp = (
            node.state_generation(),
            node.membership.read().expect("membership lock").version(),
        );
        self.get_or_compute(service, stamp, || {
            let me = node.peer_id.to_string();
            Upstream::new(service, services::endpoints(node, service), &me)
        })
    }

    fn get_or_compute(
        &self,
        service: &str,
        stamp: Stamp,
        compute: impl FnOnce() -> Upstream,
    ) -> Arc<Upstream> {
        if let Some((at, upstream)) = self.entries.lock().expect("upstreams lock").get(service)
            && *at == stamp
        {
            return upstream.clone();
        }
        let fresh = Arc::new(compute());
        let mut entries = self.entries.lock().expect("upstreams lock");
        // Entries of an older stamp are of no use any more (this also bounds the map).
        entries.retain(|_, (at, _)| *at == stamp);
        entries.insert(service.to_string(), (stamp, fresh.clone()));
        fresh
    }
}

/// Whether an error (or one of its sources) is a body over its limit.
pub(crate) fn over_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Forwards `request` (whose path is already the rest after the route's prefix) to a healthy
/// replica of `service` under `route`'s limits: the request body may be at most the route's
/// body limit (413 beyond, streamed, never buffered), the replica must answer within the
/// route's time limit (504), and its answer may be at most the route's response limit (502
/// from the declared length, else cut while streaming, counted in `stats`).
pub async fn proxy_to_service(
    gateway: &Gateway,
    service: &str,
    compiled: &super::router::CompiledRoute,
    rest: &str,
    mut request: Request<Body>,
) -> Response<Body> {
    let route = &compiled.route;
    let websocket = route.websocket;
    let body_limit = route.body_limit();
    let timeout = route.timeout();
    let upstream = gateway.upstreams.get(&gateway.node, service);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    if upstream.endpoints.is_empty() {
        metrics::counter!("mesh_gateway_no_replica_total", "service" => service.to_string())
            .increment(1);
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("service {service} has no healthy replica"),
        );
    }
    let wants_upgrade = request
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if wants_upgrade && !websocket {
        return plain(
            StatusCode::BAD_REQUEST,
            "this route does not pass WebSocket upgrades".into(),
        );
    }
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri = format!("{rest}{query}");
    let method = request.method().clone();
    let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    parts.uri = match uri.parse() {
        Ok(u) => u,
        Err(_) => return plain(StatusCode::BAD_REQUEST, "bad request path".into()),
    };
    parts.version = axum::http::Version::HTTP_11;
    if let Some(host) = parts.headers.get(header::HOST).cloned() {
        parts.headers.insert("x-forwarded-host", host);
    }
    if !wants_upgrade {
        strip_hop_by_hop(&mut parts.headers);
    }
    let limit = usize::try_from(body_limit).unwrap_or(usize::MAX);
    let body: ProxyBody = Limited::new(body, limit).boxed_unsync();
    let mut forwarded = Request::from_parts(parts, body);

    // A reused connection first, else a new one; a replica that refuses is skipped. A
    // request a reused connection could not send goes out again on a new connection.
    let mut sent = None;
    'endpoints: for (e, host) in upstream.order(n) {
        forwarded.headers_mut().insert(header::HOST, host.clone());
        let mut reused = if wants_upgrade {
            None
        } else {
            checkout(e.addr)
        };
        loop {
            // A pooled connection may still be taking in the end of its last exchange.
            let ready = match reused.take() {
                Some(mut s) => s.ready().await.is_ok().then_some(s),
                None => None,
            };
            let (mut sender, was_reused) = match ready {
                Some(s) => (s, true),
                None => match connect(e.addr, wants_upgrade).await {
                    Some(s) => (s, false),
                    None => {
                        tracing::debug!(replica = %e.addr, "replica refused; trying the next");
                        continue 'endpoints;
                    }
                },
            };
            match tokio::time::timeout(timeout, sender.try_send_request(forwarded)).await {
                Err(_) => {
                    return plain(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("replica {} did not answer in time", e.index),
                    );
                }
                Ok(Ok(response)) => {
                    sent = Some((response, sender, e.addr));
                    break 'endpoints;
                }
                Ok(Err(mut failed)) => {
                    let error = failed.error().to_string();
                    let over = over_limit(failed.error());
                    match failed.take_message() {
                        Some(request) if was_reused => {
                            // Never sent: the replica had closed the idle connection.
                            forwarded = request;
                        }
                        _ if over => {
                            return plain(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                format!("request body is over {body_limit} bytes"),
                            );
                        }
                        _ => {
                            return plain(
                                StatusCode::BAD_GATEWAY,
                                format!("replica {} failed: {error}", e.index),
                            );
                        }
                    }
                }
            }
        }
    }
    let Some((response, sender, addr)) = sent else {
        return plain(
            StatusCode::BAD_GATEWAY,
            format!("no replica of {service} accepted the connection"),
        );
    };
    upstream.forwarded.increment(1);
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let mut response = response;
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream.await) else {
                return;
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    let pooled = (!wants_upgrade).then_some((addr, sender));
    limited(
        response,
        pooled,
        &method,
        &compiled.label,
        route.response_limit(),
        &gateway.stats,
    )
}

/// Holds a replica's answer to the route's response limit: 502 if its declared length is
/// over (its connection is closed, not pooled), else its body capped while it streams. The
/// connection in `pooled` goes back to the pool once the body has been read whole.
fn limited(
    response: Response<hyper::body::Incoming>,
    pooled: Option<(SocketAddr, Sender)>,
    method: &axum::http::Method,
    route: &str,
    limit: u64,
    stats: &Arc<GatewayStats>,
) -> Response<Body> {
    if let Some(length) =
        response::declared_over(method, response.status(), response.headers(), limit)
    {
        // Dropping the answer unread and the sender closes the connection.
        drop(pooled);
        return response::refuse(route, Source::Upstream, length, limit);
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let label = route.to_string();
    let stats = stats.clone();
    let on_over = move || {
        tracing::warn!(route = %label, limit,
            "streamed upstream response passed the route's response limit: cut");
        metrics::counter!("mesh_gateway_response_too_large_total", "route" => label.clone())
            .increment(1);
        stats.record_cut(&label);
    };
    let on_complete = move || {
        if let Some((addr, sender)) = pooled {
            checkin(addr, sender);
        }
    };
    Response::from_parts(
        parts,
        Body::new(CappedBody::new(body, limit, on_over, on_complete)),
    )
}

#[cfg(test)]
mod tests {
    //! The pool and the response limit against a keep-alive upstream on loopback (the whole
    //! gateway against real replicas is in `node/tests/gateway.rs`).

    use axum::http::Method;
    use http_body_util::Empty;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    use super::*;
    use crate::membership::{FailureDetector, Heartbeat};

    /// An upstream that answers the first request of one connection with `answer`, keeps the
    /// connection open, and reports when the other side closes it.
    async fn upstream(answer: Vec<u8>) -> (SocketAddr, oneshot::Receiver<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed_rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the request");
                head.extend_from_slice(&buf[..n]);
            }
            s.write_all(&answer).await.unwrap();
            // Anything but a new request: the gateway closed the connection.
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            let _ = closed_tx.send(());
        });
        (addr, closed_rx)
    }

    async fn exchange(addr: SocketAddr) -> (Response<hyper::body::Incoming>, Sender) {
        let mut sender = connect(addr, false).await.expect("upstream reachable");
        let request = Request::get("/")
            .header(header::HOST, "upstream")
            .body(Empty::new().map_err(|never| match never {}).boxed_unsync())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        (response, sender)
    }

    fn idle(addr: SocketAddr) -> usize {
        POOL.lock().unwrap().get(&addr).map_or(0, Vec::len)
    }

    async fn closed_within(closed: oneshot::Receiver<()>, what: &str) {
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .unwrap_or_else(|_| panic!("{what}: the upstream connection stayed open"))
            .unwrap();
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_502_and_the_connection_is_closed() {
        let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n".to_vec();
        answer.extend_from_slice(&[b'x'; 5000]);
        let (addr, closed) = upstream(answer).await;
        let (response, sender) = exchange(addr).await;
        let stats = GatewayStats::new();
        let r = limited(
            response,
            Some((addr, sender)),
            &Method::GET,
            "/t",
            1000,
            &stats,
        );
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        let text = r.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("is 5000 bytes"), "{text}");
        assert!(text.contains("response limit of 1000 bytes"), "{text}");
        closed_within(closed, "after a 502").await;
        assert_eq!(idle(addr), 0, "never pooled");
    }

    #[tokio::test]
    async fn a_chunked_answer_over_the_limit_is_cut_counted_and_not_pooled() {
        let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..10 {
            answer.extend_from_slice(b"100\r\n");
            answer.extend_from_slice(&[b'y'; 256]);
            answer.extend_from_slice(b"\r\n");
        }
        answer.extend_from_slice(b"0\r\n\r\n");
        let (addr, closed) = upstream(answer).await;
        let (response, sender) = exchange(addr).await;
        let stats = GatewayStats::new();
        stats.record("/t", 200, false, Duration::ZERO);
        let r = limited(
            response,
            Some((addr, sender)),
            &Method::GET,
            "/t",
            1000,
            &stats,
        );
        assert_eq!(r.status(), StatusCode::OK, "the head is passed on");
        let error = r.into_body().collect().await.unwrap_err();
        assert!(
            error.to_string().contains("response limit of 1000 bytes"),
            "{error}"
        );
        assert_eq!(stats.local()["/t"].server_errors, 1);
        closed_within(closed, "after a cut").await;
        assert_eq!(idle(addr), 0, "never pooled");
    }

    #[tokio::test]
    async fn an_answer_within_the_limit_passes_whole_and_its_connection_is_pooled() {
        let body: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec();
        answer.extend_from_slice(&body);
        let (addr, _closed) = upstream(answer).await;
        let (response, sender) = exchange(addr).await;
        let stats = GatewayStats::new();
        let r = limited(
            response,
            Some((addr, sender)),
            &Method::GET,
            "/t",
            1000,
            &stats,
        );
        assert_eq!(r.status(), StatusCode::OK);
        let got = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, body);
        assert_eq!(idle(addr), 1, "pooled as soon as the body was read whole");
        assert!(stats.local().is_empty(), "nothing counted");
        let mut again = checkout(addr).expect("the pooled connection");
        again.ready().await.expect("ready for the next exchange");
        assert_eq!(idle(addr), 0);
    }

    fn endpoint(index: u32, node: &str, port: u16) -> Endpoint {
        Endpoint {
            index,
            node: node.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    #[test]
    fn local_replicas_come_first_and_take_turns() {
        let u = Upstream::new(
            "web",
            vec![
                endpoint(0, "me", 1),
                endpoint(1, "me", 2),
                endpoint(2, "other", 3),
                endpoint(3, "other", 4),
            ],
            "me",
        );
        let ports = |n| u.order(n).map(|(e, _)| e.addr.port()).collect::<Vec<_>>();
        assert_eq!(ports(0), [1, 2, 3, 4]);
        assert_eq!(ports(1), [2, 1, 3, 4]);
        assert_eq!(ports(2), [1, 2, 3, 4]);
        let hosts: Vec<_> = u
            .order(1)
            .map(|(_, h)| h.to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            hosts,
            ["127.0.0.1:2", "127.0.0.1:1", "127.0.0.1:3", "127.0.0.1:4"]
        );
        let remote = Upstream::new(
            "web",
            vec![
                endpoint(0, "a", 1),
                endpoint(1, "b", 2),
                endpoint(2, "c", 3),
            ],
            "me",
        );
        let ports = |n| {
            remote
                .order(n)
                .map(|(e, _)| e.addr.port())
                .collect::<Vec<_>>()
        };
        assert_eq!(ports(0), [1, 2, 3]);
        assert_eq!(ports(1), [2, 3, 1]);
        assert_eq!(ports(5), [3, 1, 2]);
        assert_eq!(Upstream::new("web", vec![], "me").order(3).count(), 0);
    }

    /// Writes the claim of replica `index` of service `web` and the status its node reports.
    fn place(node: &NodeState, index: u32, owner: &str, epoch: u64, port: u16, healthy: bool) {
        let claim = serde_json::json!({ "node": owner, "epoch": epoch });
        node.write(
            &format!("claim/svc/web/{index}"),
            Some(serde_json::to_vec(&claim).unwrap()),
        )
        .unwrap();
        let status = services::ReplicaStatus {
            node: owner.into(),
            node_name: "n".into(),
            epoch,
            template: "t".into(),
            state: "running".into(),
            restarts: 0,
            since_ms: 1,
            reason: String::new(),
            healthy,
            port,
            container_id: "c".into(),
        };
        node.write(
            &services::status_key("web", index),
            Some(serde_json::to_vec(&status).unwrap()),
        )
        .unwrap();
    }

    fn addrs(u: &Upstream) -> Vec<String> {
        u.order(0).map(|(e, _)| e.addr.to_string()).collect()
    }

    #[test]
    fn endpoints_are_cached_until_the_state_changes_and_seen_at_once_after() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeState::for_tests(dir.path(), "n0");
        let me = node.peer_id.to_string();
        let upstreams = Upstreams::default();
        assert!(addrs(&upstreams.get(&node, "web")).is_empty());

        place(&node, 0, &me, 1, 1000, true);
        let first = upstreams.get(&node, "web");
        assert_eq!(addrs(&first), ["127.0.0.1:1000"]);
        assert_eq!(first.local, 1);
        assert!(
            Arc::ptr_eq(&first, &upstreams.get(&node, "web")),
            "nothing changed: the same entry"
        );

        // The replica moves (a new claim epoch, a new port): the next request sees it.
        place(&node, 0, &me, 2, 2000, true);
        assert_eq!(addrs(&upstreams.get(&node, "web")), ["127.0.0.1:2000"]);
        // A status that does not match the claim is not used.
        node.write(
            "claim/svc/web/0",
            Some(serde_json::to_vec(&serde_json::json!({ "node": me, "epoch": 3 })).unwrap()),
        )
        .unwrap();
        assert!(addrs(&upstreams.get(&node, "web")).is_empty());
        // It runs again, then fails its health check.
        place(&node, 0, &me, 3, 3000, true);
        assert_eq!(addrs(&upstreams.get(&node, "web")), ["127.0.0.1:3000"]);
        place(&node, 0, &me, 3, 3000, false);
        assert!(addrs(&upstreams.get(&node, "web")).is_empty());
        // A change to another service's records invalidates too (one generation for all).
        place(&node, 0, &me, 4, 4000, true);
        let before = upstreams.get(&node, "web");
        node.write("svc/other", Some(b"{}".to_vec())).unwrap();
        let after = upstreams.get(&node, "web");
        assert!(!Arc::ptr_eq(&before, &after));
        assert_eq!(addrs(&after), ["127.0.0.1:4000"]);
    }

    #[test]
    fn a_replica_on_a_node_that_stops_answering_is_dropped_without_a_state_change() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeState::for_tests(dir.path(), "n0");
        let upstreams = Upstreams::default();
        let peer = "12D3KooWRemotePeer";
        let heartbeat = |seq, ip: &str| Heartbeat {
            peer_id: peer.into(),
            name: "n1".into(),
            incarnation: 1,
            seq,
            addrs: vec![format!("/ip4/{ip}/tcp/7000")],
            labels: Default::default(),
            total: Default::default(),
            allocated: Default::default(),
            disk_free_bytes: 0,
            workloads: 0,
            version: "test".into(),
            blob_port: 0,
        };
        let t0 = std::time::Instant::now();
        node.membership
            .write()
            .unwrap()
            .observe(heartbeat(1, "10.0.0.2"), t0);
        place(&node, 0, peer, 1, 5000, true);
        let generation = node.state_generation();
        let u = upstreams.get(&node, "web");
        assert_eq!(addrs(&u), ["10.0.0.2:5000"]);
        assert_eq!(u.local, 0);

        // Its node comes back on another address: the replica is reached there.
        node.membership
            .write()
            .unwrap()
            .observe(heartbeat(2, "10.0.0.3"), t0);
        assert_eq!(addrs(&upstreams.get(&node, "web")), ["10.0.0.3:5000"]);
        // Its node falls silent: suspect, then its replica is no longer sent to.
        let suspect_after = FailureDetector::default().suspect_after;
        node.membership.write().unwrap().tick(t0 + suspect_after);
        assert!(addrs(&upstreams.get(&node, "web")).is_empty());
        assert_eq!(
            node.state_generation(),
            generation,
            "no state change involved"
        );
        // It answers again.
        node.membership
            .write()
            .unwrap()
            .observe(heartbeat(3, "10.0.0.3"), t0 + suspect_after);
        assert_eq!(addrs(&upstreams.get(&node, "web")), ["10.0.0.3:5000"]);
    }
}
