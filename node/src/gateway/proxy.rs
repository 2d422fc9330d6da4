//! Forwarding to the replicas of a service over HTTP/1.1: to a healthy replica that runs under
//! its current claim, replicas on this node first (rotated among themselves), then round-robin
//! over the others; a replica that refuses the connection is skipped for the next one.
//! Connections to replicas are kept open and reused (at most [`MAX_IDLE`] idle ones per
//! replica); a request that a reused connection could not even send (the replica closed it
//! meanwhile) is sent again on a new one. Hop-by-hop headers (`Connection`, the headers it
//! names, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-Connection`)
//! are dropped in both directions, so a replica that closes every connection does not make the
//! client reconnect too. WebSocket (any HTTP upgrade) passes through when the route allows it,
//! on a connection of its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;

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
/// replica of `service`. The request body may be at most `body_limit` bytes (413 beyond,
/// streamed, never buffered), and the replica must answer within `timeout` (504).
pub async fn proxy_to_service(
    node: &Arc<NodeState>,
    service: &str,
    websocket: bool,
    rest: &str,
    mut request: Request<Body>,
    body_limit: u64,
    timeout: Duration,
) -> Response<Body> {
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
    if !wants_upgrade {
        checkin(endpoint.addr, sender);
    }
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
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::new(body))
}
