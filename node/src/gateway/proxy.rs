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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;

use super::Route;
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

/// An idle connection to `addr` that is still open, if there is one.
fn checkout(addr: SocketAddr) -> Option<Sender> {
    let mut pool = POOL.lock().expect("pool lock");
    let idle = pool.get_mut(&addr)?;
    while let Some(sender) = idle.pop() {
        if !sender.is_closed() && sender.is_ready() {
            return Some(sender);
        }
    }
    None
}

/// Puts a connection back once its current exchange is over (the response body read).
fn checkin(addr: SocketAddr, mut sender: Sender) {
    tokio::spawn(async move {
        if sender.ready().await.is_err() {
            return;
        }
        let mut pool = POOL.lock().expect("pool lock");
        let idle = pool.entry(addr).or_default();
        idle.retain(|s| !s.is_closed());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    });
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

/// Orders endpoints: local replicas first (rotated among themselves), then the others.
fn order(mut endpoints: Vec<Endpoint>, me: &str) -> Vec<Endpoint> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let local = endpoints.iter().filter(|e| e.node == me).count();
    if local > 0 {
        endpoints[..local].rotate_left(n % local);
    } else if !endpoints.is_empty() {
        let len = endpoints.len();
        endpoints.rotate_left(n % len);
    }
    endpoints
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
    node: &Arc<NodeState>,
    service: &str,
    route: &Route,
    rest: &str,
    mut request: Request<Body>,
    stats: &Arc<GatewayStats>,
) -> Response<Body> {
    let websocket = route.websocket;
    let body_limit = route.body_limit();
    let timeout = route.timeout();
    let endpoints = order(
        services::endpoints(node, service),
        &node.peer_id.to_string(),
    );
    if endpoints.is_empty() {
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
    'endpoints: for e in &endpoints {
        forwarded.headers_mut().insert(
            header::HOST,
            HeaderValue::from_str(&e.addr.to_string()).expect("an address is a valid header"),
        );
        let reused = if wants_upgrade {
            None
        } else {
            checkout(e.addr)
        };
        let mut candidates = reused.into_iter().map(|s| (s, true)).collect::<Vec<_>>();
        loop {
            let (mut sender, was_reused) = match candidates.pop() {
                Some(c) => c,
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
                    sent = Some((response, sender, e.clone()));
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
    let Some((response, sender, endpoint)) = sent else {
        return plain(
            StatusCode::BAD_GATEWAY,
            format!("no replica of {service} accepted the connection"),
        );
    };
    metrics::counter!("mesh_gateway_forwarded_total", "service" => service.to_string())
        .increment(1);
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
    let pooled = (!wants_upgrade).then_some((endpoint.addr, sender));
    limited(
        response,
        pooled,
        &method,
        &route.label(),
        route.response_limit(),
        stats,
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
        if let Some((addr, sender)) = pooled
            && tokio::runtime::Handle::try_current().is_ok()
        {
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

    use std::time::Instant;

    use axum::http::Method;
    use http_body_util::Empty;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    use super::*;

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
        let deadline = Instant::now() + Duration::from_secs(10);
        while idle(addr) == 0 {
            assert!(Instant::now() < deadline, "the connection was not pooled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stats.local().is_empty(), "nothing counted");
    }
}
