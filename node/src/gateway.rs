//! Gateway routes: every node's HTTP listener forwards requests under a route's path prefix to
//! a function or to the healthy replicas of a service.
//!
//! Routes are records `route<path>` in the replicated state, so every node knows every route.
//! The longest prefix that matches on a segment boundary wins (`/web` matches `/web` and
//! `/web/x`, not `/website`), and the prefix is stripped before forwarding (`/web/x` reaches
//! the replica as `/x`). Service requests go to a healthy replica that runs under its current
//! claim, replicas on this node first, then round-robin over the others; a replica that
//! refuses the connection is skipped for the next one. WebSocket upgrades pass through when
//! the route allows them.
//!
//! This is the routing half of the API gateway; keys, plans, JWT and hardening come with the
//! gateway issue.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::node::NodeState;
use crate::services::{self, Endpoint};

const ROUTE_PREFIX: &str = "route";
/// How long connecting to a replica may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a replica may take to answer a forwarded request.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a route sends requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteTarget {
    /// A function, by name.
    Function(String),
    /// A service, by name.
    Service(String),
}

/// A route as stored in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Path prefix, e.g. `/web`.
    pub path: String,
    /// The target.
    pub target: RouteTarget,
    /// Pass WebSocket upgrades through.
    pub websocket: bool,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
}

/// Errors of route operations.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No such route.
    #[error("no route {0:?}")]
    Unknown(String),
    /// Storing failed.
    #[error("cannot store the route: {0}")]
    State(String),
}

/// Checks a route path: starts with `/`, plain characters, no empty or dot segments.
pub fn validate_path(path: &str) -> Result<(), RouteError> {
    let bad = || {
        RouteError::Invalid(format!(
            "route path {path:?}: must start with '/' and use letters, digits, '.', '_', '-' \
             and '/' (no empty, '.' or '..' segments, at most 200 bytes)"
        ))
    };
    if !path.starts_with('/') || path.len() > 200 {
        return Err(bad());
    }
    if path == "/" {
        return Ok(());
    }
    let trimmed = path.trim_end_matches('/');
    for segment in trimmed[1..].split('/') {
        let ok = !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(bad());
        }
    }
    if trimmed.starts_with("/fn/")
        || trimmed == "/fn"
        || trimmed == "/healthz"
        || trimmed == "/metrics"
    {
        return Err(RouteError::Invalid(format!(
            "route path {path:?} is reserved (/fn, /healthz, /metrics)"
        )));
    }
    Ok(())
}

fn normalise(path: &str) -> String {
    if path == "/" {
        path.to_string()
    } else {
        path.trim_end_matches('/').to_string()
    }
}

/// Every route.
pub fn list(node: &NodeState) -> Vec<Route> {
    let replica = node.replica.lock().expect("replica lock");
    replica
        .map()
        .list(&format!("{ROUTE_PREFIX}/"))
        .filter_map(|e| serde_json::from_slice(e.value.as_deref()?).ok())
        .collect()
}

/// Adds or replaces a route.
pub fn add(node: &NodeState, mut route: Route) -> Result<Route, RouteError> {
    validate_path(&route.path)?;
    route.path = normalise(&route.path);
    match &route.target {
        RouteTarget::Function(name) | RouteTarget::Service(name) => {
            crate::functions::validate_name(name)
                .map_err(|_| RouteError::Invalid(format!("target name {name:?} is not valid")))?;
        }
    }
    if route.websocket && matches!(route.target, RouteTarget::Function(_)) {
        return Err(RouteError::Invalid(
            "WebSocket routes need a service target".into(),
        ));
    }
    route.created_ms = services::now_ms();
    let value = serde_json::to_vec(&route).expect("routes serialize");
    node.write(&format!("{ROUTE_PREFIX}{}", route.path), Some(value))
        .map_err(|e| RouteError::State(e.to_string()))?;
    Ok(route)
}

/// Removes a route.
pub fn remove(node: &NodeState, path: &str) -> Result<(), RouteError> {
    let path = normalise(path);
    if !list(node).iter().any(|r| r.path == path) {
        return Err(RouteError::Unknown(path));
    }
    node.write(&format!("{ROUTE_PREFIX}{path}"), None)
        .map_err(|e| RouteError::State(e.to_string()))?;
    Ok(())
}

/// The route for a request path (longest prefix on a segment boundary) and the rest of the
/// path after the prefix (always starting with `/`).
pub fn match_route(routes: &[Route], path: &str) -> Option<(Route, String)> {
    routes
        .iter()
        .filter_map(|r| {
            let rest = if r.path == "/" {
                Some(path)
            } else {
                path.strip_prefix(r.path.as_str())
                    .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            }?;
            let rest = if rest.is_empty() { "/" } else { rest };
            Some((r.clone(), rest.to_string()))
        })
        .max_by_key(|(r, _)| r.path.len())
}

/// Round-robin position shared by all requests of this node.
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn plain(status: StatusCode, text: String) -> Response<Body> {
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

/// Forwards `request` (whose path is already the rest after the route prefix) to a healthy
/// replica of `service`.
pub async fn proxy_to_service(
    node: &Arc<NodeState>,
    service: &str,
    websocket: bool,
    rest: &str,
    mut request: Request<Body>,
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
    let forwarded = Request::from_parts(parts, body);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("replica handshake: {e}")),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let response =
        match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(forwarded)).await {
            Ok(Ok(r)) => r,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> Route {
        Route {
            path: path.into(),
            target: RouteTarget::Service("web".into()),
            websocket: false,
            created_ms: 0,
        }
    }

    #[test]
    fn paths_are_checked() {
        for ok in ["/", "/web", "/api/v1", "/a.b_c-d/"] {
            assert!(validate_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "web", "/a//b", "/a/../b", "/a b", "/fn/x", "/metrics", "/a\r\n",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let routes = vec![route("/"), route("/web"), route("/web/api")];
        let m = |p: &str| match_route(&routes, p).map(|(r, rest)| (r.path, rest));
        assert_eq!(m("/web"), Some(("/web".into(), "/".into())));
        assert_eq!(m("/web/x"), Some(("/web".into(), "/x".into())));
        assert_eq!(
            m("/web/api/users"),
            Some(("/web/api".into(), "/users".into()))
        );
        assert_eq!(m("/website"), Some(("/".into(), "/website".into())));
        let no_root = vec![route("/web")];
        assert_eq!(match_route(&no_root, "/website"), None);
    }
}
