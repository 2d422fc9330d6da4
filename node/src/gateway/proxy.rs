//! Forwarding to the replicas of a service: a new HTTP/1.1 connection per request to a healthy
//! replica that runs under its current claim, replicas on this node first (rotated among
//! themselves), then round-robin over the others; a replica that refuses the connection is
//! skipped for the next one. WebSocket (any HTTP upgrade) passes through when the route allows
//! it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;

use crate::node::NodeState;
use crate::services::{self, Endpoint};

/// How long connecting to a replica may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Round-robin position shared by all requests of this node.
static NEXT: AtomicUsize = AtomicUsize::new(0);

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
    // Connect first, so a dead replica costs a retry, not the request.
    let mut stream = None;
    for e in &endpoints {
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(e.addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                stream = Some((s, e.clone()));
                break;
            }
            _ => tracing::debug!(replica = %e.addr, "replica refused; trying the next"),
        }
    }
    let Some((stream, endpoint)) = stream else {
        return plain(
            StatusCode::BAD_GATEWAY,
            format!("no replica of {service} accepted the connection"),
        );
    };
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
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&endpoint.addr.to_string()).expect("an address is a valid header"),
    );
    if !wants_upgrade {
        parts.headers.remove(header::CONNECTION);
    }
    let limit = usize::try_from(body_limit).unwrap_or(usize::MAX);
    let body = Limited::new(body, limit).boxed_unsync();
    let forwarded = Request::from_parts(parts, body);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("replica handshake: {e}")),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let response = match tokio::time::timeout(timeout, sender.send_request(forwarded)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) if over_limit(&e) => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is over {body_limit} bytes"),
            );
        }
        Ok(Err(e)) => {
            return plain(
                StatusCode::BAD_GATEWAY,
                format!("replica {} failed: {e}", endpoint.index),
            );
        }
        Err(_) => {
            return plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!("replica {} did not answer in time", endpoint.index),
            );
        }
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
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::new(body))
}
