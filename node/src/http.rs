//! The HTTP listener of every node: `/healthz`, `/metrics`, functions at `/fn/<name>`, and
//! the API gateway (see [`crate::gateway`]) for anything else.
//!
//! Connections are served by hyper's HTTP/1 server with explicit limits (instead of
//! `axum::serve`, which exposes none of them):
//! - a request head must arrive within [`HEADER_READ_TIMEOUT`] (this also ends idle keep-alive
//!   connections); a slow client's connection is closed;
//! - at most [`MAX_HEADERS`] headers and [`MAX_HEAD_BYTES`] of head: hyper answers 431;
//! - ambiguous framing (both `Content-Length` and `Transfer-Encoding`, or `Content-Length`
//!   twice) is answered 400 with `Connection: close` (see [`crate::gateway::framing`]);
//! - bodies over a route's limit get 413 from the declared length, or as soon as the streamed
//!   body passes the limit; they are never buffered whole;
//! - answers over a route's response limit get 502, or are cut while they stream (see
//!   [`crate::gateway::response`]);
//! - nothing from the request is echoed raw: a 404 names the path with `escape_debug`, and
//!   function response headers that are not valid HTTP are dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::functions::runtime::CgiRequest;
use crate::functions::{FunctionError, Functions, MAX_BODY_BYTES, UrlAccess};
use crate::gateway::framing::{FramingState, Guarded};
use crate::gateway::jwt::JwtError;
use crate::gateway::limits::Decision;
use crate::gateway::response::{Source, has_body, refuse};
use crate::gateway::router::request_host;
use crate::gateway::stats::NO_ROUTE;
use crate::gateway::{Auth, Gateway, Matched, RouteTarget, Snapshot, keys};

/// How long a client may take to send a request head (then the connection is closed).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most headers in a request (431 beyond).
pub const MAX_HEADERS: usize = 100;
/// Largest request head, request line included (431 beyond).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    functions: Arc<Functions>,
    node: Arc<crate::node::NodeState>,
    gateway: Arc<Gateway>,
}

/// Serves HTTP on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    functions: Arc<Functions>,
    node: Arc<crate::node::NodeState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let gateway = Gateway::new(node.clone());
    tokio::spawn(gateway.limits.clone().run(shutdown.clone()));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(render_metrics))
        .route("/fn/{name}", any(invoke_function))
        .route("/fn/{name}/{*rest}", any(invoke_function))
        .fallback(gateway_route)
        .with_state(AppState {
            metrics,
            functions,
            node,
            gateway: gateway.clone(),
        });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let framing = Arc::new(FramingState::default());
        let io = TokioIo::new(Guarded::new(stream, framing.clone()));
        let tower = TowerToHyperService::new(app.clone());
        let requests = AtomicU64::new(0);
        let gateway = gateway.clone();
        let service = hyper::service::service_fn(move |request| {
            let index = requests.fetch_add(1, Ordering::Relaxed);
            let forward =
                (!framing.is_bad(index)).then(|| hyper::service::Service::call(&tower, request));
            let gateway = gateway.clone();
            async move {
                match forward {
                    Some(answer) => answer.await,
                    None => {
                        gateway.stats.record(NO_ROUTE, 400, false, Duration::ZERO);
                        tracing::info!(target: "meshwork_node::gateway::access",
                            status = 400, "ambiguous request framing refused");
                        Ok(ambiguous_framing())
                    }
                }
            }
        });
        let conn = http.serve_connection(io, service).with_upgrades();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "HTTP connection ended");
                    }
                }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(3), conn).await;
                }
            }
        });
    }
}

fn ambiguous_framing() -> Response {
    let mut r = plain(
        StatusCode::BAD_REQUEST,
        "ambiguous request framing: Content-Length with Transfer-Encoding, or Content-Length \
         twice"
            .into(),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

fn plain(status: StatusCode, text: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text + "\n",
    )
        .into_response()
}

/// Request text fit for a log line or an error message: control characters escaped (so no
/// CR or LF reaches a response or a log), at most 200 characters.
fn clean(text: &str) -> String {
    let mut s: String = text.chars().take(200).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s.escape_debug().to_string()
}

async fn invoke_function(
    State(state): State<AppState>,
    Path(params): Path<Vec<(String, String)>>,
    request: Request,
) -> Response {
    let name = params
        .iter()
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let rest = params
        .iter()
        .find(|(k, _)| k == "rest")
        .map(|(_, v)| format!("/{v}"))
        .unwrap_or_else(|| "/".into());
    // An unknown name falls through to `call_function`, which says so.
    match state.functions.spec(&name) {
        Ok(spec) if spec.url == UrlAccess::Off => plain(
            StatusCode::FORBIDDEN,
            format!(
                "function {name} is not callable at /fn/ (deployed with --url off): \
                 call it through a route"
            ),
        ),
        Ok(spec) if spec.url == UrlAccess::Key => {
            // The same pipeline as a route with key auth (key, plan, rate, quota), with the
            // limits of /fn/ itself and time for the call and a cold start.
            let mut route = crate::gateway::Route::new(
                &format!("/fn/{name}"),
                RouteTarget::Function(name.clone()),
            );
            route.auth = Auth::Key;
            route.max_body_bytes = MAX_BODY_BYTES as u64;
            route.max_response_bytes = Some(crate::gateway::MAX_FN_RESPONSE_LIMIT);
            route.timeout_ms = spec.timeout_ms.saturating_add(FN_URL_GRACE_MS);
            let m = Matched {
                route: Arc::new(crate::gateway::router::CompiledRoute::new(route)),
                rest,
                params: vec![],
            };
            let snapshot = state.gateway.snapshot();
            route_request(&state, &snapshot, m, request).await.response
        }
        _ => call_function(&state, &name, rest, request, MAX_BODY_BYTES, None).await,
    }
}

/// Time a keyed `/fn/` call gets beyond the function's own timeout (a pull, a compile).
const FN_URL_GRACE_MS: u64 = 60_000;

/// What the gateway did with a request, for the counters and the access log.
struct Outcome {
    response: Response,
    key: Option<String>,
    throttled: bool,
}

impl From<Response> for Outcome {
    fn from(response: Response) -> Self {
        Self {
            response,
            key: None,
            throttled: false,
        }
    }
}

/// Anything that is not a built-in path: the gateway routes.
async fn gateway_route(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(request.uri().host())
        .map(request_host)
        .unwrap_or_default();
    let snapshot = state.gateway.snapshot();
    let (label, outcome): (Arc<str>, Outcome) =
        match crate::gateway::match_route(&snapshot.routes, &host, &path) {
            None => (
                Arc::from(NO_ROUTE),
                Outcome::from(plain(
                    StatusCode::NOT_FOUND,
                    format!("no route for {}", clean(&path)),
                )),
            ),
            Some(m) => {
                let label = m.route.label.clone();
                (label, route_request(&state, &snapshot, m, request).await)
            }
        };
    let status = outcome.response.status().as_u16();
    let elapsed = started.elapsed();
    state
        .gateway
        .stats
        .record(&label, status, outcome.throttled, elapsed);
    tracing::info!(target: "meshwork_node::gateway::access",
        method = %method,
        path = %clean(&path),
        route = %label,
        status,
        duration_ms = (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
        node = %state.node.name,
        key = %outcome.key.as_deref().unwrap_or("-"),
        "request");
    outcome.response
}

fn method_allowed(methods: &[String], method: &Method) -> bool {
    methods.is_empty()
        || methods
            .iter()
            .any(|m| m == method.as_str() || (method == Method::HEAD && m == "GET"))
}

fn allow_header(methods: &[String], cors: bool) -> String {
    let mut all: Vec<&str> = methods.iter().map(String::as_str).collect();
    if all.contains(&"GET") && !all.contains(&"HEAD") {
        all.push("HEAD");
    }
    if cors && !all.contains(&"OPTIONS") {
        all.push("OPTIONS");
    }
    all.join(", ")
}

/// The `Access-Control-Allow-Origin` value for a request's `Origin`, if the route allows it.
fn allowed_origin(origins: &[String], origin: Option<&HeaderValue>) -> Option<HeaderValue> {
    let origin = origin?;
    if origins.iter().any(|o| o == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    let text = origin.to_str().ok()?;
    origins
        .iter()
        .any(|o| o.eq_ignore_ascii_case(text))
        .then(|| origin.clone())
}

fn with_cors(mut response: Response, allow: &HeaderValue) -> Response {
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow.clone());
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Retry-After"),
    );
    response
}

fn preflight(methods: &[String], allow: Option<HeaderValue>, headers: &HeaderMap) -> Response {
    let requested = headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
    let (Some(allow), Some(requested)) = (allow, requested) else {
        return plain(
            StatusCode::FORBIDDEN,
            "CORS preflight refused: origin not allowed".into(),
        );
    };
    if !method_allowed(methods, &requested) {
        return plain(
            StatusCode::FORBIDDEN,
            "CORS preflight refused: method not allowed".into(),
        );
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    let allow_methods = if methods.is_empty() {
        requested.as_str().to_string()
    } else {
        allow_header(methods, false)
    };
    if let Ok(v) = HeaderValue::from_str(&allow_methods) {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    if let Some(v) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

fn too_many(text: String, retry_after_s: u64) -> Response {
    let mut r = plain(StatusCode::TOO_MANY_REQUESTS, text);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    r
}

fn unauthorized(text: &str, challenge: Option<&'static str>) -> Response {
    let mut r = plain(StatusCode::UNAUTHORIZED, text.to_string());
    if let Some(c) = challenge {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
    }
    r
}

/// The gateway pipeline for a matched route: CORS preflight, method, auth and limits,
/// body limit, then the target within the route's time limit.
async fn route_request(
    state: &AppState,
    snapshot: &Snapshot,
    m: Matched,
    request: Request,
) -> Outcome {
    let route = &m.route.route;
    let cors = (!route.cors_origins.is_empty())
        .then(|| allowed_origin(&route.cors_origins, request.headers().get(header::ORIGIN)))
        .flatten();
    if !route.cors_origins.is_empty()
        && request.method() == Method::OPTIONS
        && request.headers().contains_key(header::ORIGIN)
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return preflight(&route.methods, cors, request.headers()).into();
    }
    let mut outcome = checked_request(state, snapshot, &m, request).await;
    if let Some(allow) = &cors {
        outcome.response = with_cors(outcome.response, allow);
    }
    outcome
}

async fn checked_request(
    state: &AppState,
    snapshot: &Snapshot,
    m: &Matched,
    mut request: Request,
) -> Outcome {
    let route = &m.route.route;
    if !method_allowed(&route.methods, request.method()) {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "method {} is not allowed here",
                clean(request.method().as_str())
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&allow_header(
            &route.methods,
            !route.cors_origins.is_empty(),
        )) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return r.into();
    }
    let mut key_name = None;
    let mut subject = None;
    match route.auth {
        Auth::None => {}
        Auth::Key => {
            let presented = request
                .headers()
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::trim);
            let Some(presented) = presented.filter(|p| !p.is_empty()) else {
                return unauthorized("missing API key (x-api-key)", None).into();
            };
            let Some(key) = keys::key_id(presented)
                .and_then(|id| snapshot.keys.get(id))
                .filter(|k| k.verify(presented))
            else {
                return unauthorized("unknown API key", None).into();
            };
            let refuse = |text: &str| Outcome {
                response: plain(StatusCode::FORBIDDEN, text.to_string()),
                key: Some(key.name.clone()),
                throttled: false,
            };
            if key.revoked {
                return refuse("API key revoked");
            }
            if !route.plans.is_empty() && !route.plans.contains(&key.plan) {
                return refuse("this key's plan is not allowed on this route");
            }
            let plan = if key.plan.is_empty() {
                None
            } else {
                match snapshot.plans.get(&key.plan) {
                    Some(p) => Some(p),
                    None => return refuse("this key's plan no longer exists"),
                }
            };
            let throttled = |response| Outcome {
                response,
                key: Some(key.name.clone()),
                throttled: true,
            };
            match state.gateway.limits.check(key, plan) {
                Decision::Allow => {}
                Decision::RateLimited(s) => {
                    return throttled(too_many(
                        format!("rate limit of plan {} exceeded", key.plan),
                        s,
                    ));
                }
                Decision::QuotaExceeded(s) => {
                    return throttled(too_many(
                        format!("daily quota of plan {} used up", key.plan),
                        s,
                    ));
                }
            }
            key_name = Some(key.name.clone());
        }
        Auth::Jwt => {
            let Some(verifier) = &m.route.jwt else {
                return plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "this route's JWT keys do not parse".into(),
                )
                .into();
            };
            let authorization = request
                .headers()
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes);
            match verifier.verify(authorization) {
                Ok(id) => subject = id.subject,
                Err(JwtError::Missing) => {
                    return unauthorized("missing bearer token", Some("Bearer")).into();
                }
                Err(JwtError::Invalid(why)) => {
                    return unauthorized(&why, Some("Bearer error=\"invalid_token\"")).into();
                }
            }
        }
    }
    let outcome = |response| Outcome {
        response,
        key: key_name.clone(),
        throttled: false,
    };
    let limit = route.body_limit();
    if declared_length(request.headers()).is_some_and(|n| n > limit) {
        return outcome(plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is over {limit} bytes"),
        ));
    }
    // What the target learns from the gateway, and nothing a client could forge.
    let headers = request.headers_mut();
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-mesh-"))
        .cloned()
        .collect();
    for k in forged {
        headers.remove(k);
    }
    headers.remove("x-api-key");
    for (name, value) in &m.params {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(format!("x-mesh-param-{name}")),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            headers.insert(n, v);
        }
    }
    if let Some(k) = &key_name
        && let Ok(v) = HeaderValue::from_str(k)
    {
        headers.insert("x-mesh-key", v);
    }
    if let Some(s) = &subject
        && let Ok(v) = HeaderValue::from_str(s)
    {
        headers.insert("x-mesh-jwt-sub", v);
    }
    let timeout = route.timeout();
    let target = async {
        match &route.target {
            RouteTarget::Function(name) => {
                let limit = usize::try_from(limit).unwrap_or(MAX_BODY_BYTES);
                let response_limit = Some((m.route.label.clone(), route.response_limit()));
                call_function(state, name, m.rest.clone(), request, limit, response_limit).await
            }
            RouteTarget::Service(name) => {
                crate::gateway::proxy_to_service(&state.gateway, name, &m.route, &m.rest, request)
                    .await
            }
        }
    };
    match tokio::time::timeout(timeout, target).await {
        Ok(r) => outcome(r),
        Err(_) => outcome(plain(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer within the route's {} ms", timeout.as_millis()),
        )),
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Calls function `name` with `request`, whose body may be at most `limit` bytes (413
/// beyond). With `response_limit` (a route's label and its limit), an answer whose body is
/// over the limit is refused with 502.
async fn call_function(
    state: &AppState,
    name: &str,
    rest: String,
    request: Request,
    limit: usize,
    response_limit: Option<(Arc<str>, u64)>,
) -> Response {
    let (parts, body) = request.into_parts();
    let too_large = || {
        let text = if limit == MAX_BODY_BYTES {
            FunctionError::TooLarge.to_string()
        } else {
            format!("request body is over {limit} bytes")
        };
        plain(StatusCode::PAYLOAD_TOO_LARGE, text)
    };
    if declared_length(&parts.headers).is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    // Read at most the limit plus one byte: a larger body is refused without being buffered.
    let body = match to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) if crate::gateway::over_limit(&e) => return too_large(),
        Err(_) => {
            return plain(
                StatusCode::BAD_REQUEST,
                "cannot read the request body".into(),
            );
        }
    };
    let headers = parts
        .headers
        .iter()
        .filter_map(|(k, v)| {
            Some((
                k.as_str().to_string(),
                String::from_utf8(v.as_bytes().to_vec()).ok()?,
            ))
        })
        .collect();
    let cgi = CgiRequest {
        method: parts.method.to_string(),
        path: rest,
        query: parts.uri.query().unwrap_or_default().to_string(),
        headers,
        body: body.to_vec(),
        env: Default::default(),
        args: vec![],
        raw_output: false,
        scratch: None,
    };
    match state.functions.invoke(name, cgi).await {
        Ok(resp) => {
            let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::OK);
            let length = resp.body.len() as u64;
            if let Some((route, max)) = &response_limit
                && length > *max
                && has_body(&parts.method, status)
            {
                return refuse(route, Source::Function, length, *max);
            }
            let mut headers = HeaderMap::new();
            for (k, v) in &resp.headers {
                // Header names and values that are not valid HTTP (CR, LF, ...) are dropped.
                if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v))
                {
                    headers.append(k, v);
                }
            }
            (status, headers, Body::from(resp.body)).into_response()
        }
        Err(e) => {
            let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
            plain(status, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_allow() {
        let m = vec!["GET".to_string(), "POST".to_string()];
        assert!(method_allowed(&m, &Method::GET));
        assert!(method_allowed(&m, &Method::HEAD));
        assert!(!method_allowed(&m, &Method::DELETE));
        assert!(method_allowed(&[], &Method::DELETE));
        assert_eq!(allow_header(&m, true), "GET, POST, HEAD, OPTIONS");
    }

    #[test]
    fn origins() {
        let any = vec!["*".to_string()];
        let one = vec!["https://a.example".to_string()];
        let o = HeaderValue::from_static("https://a.example");
        let other = HeaderValue::from_static("https://b.example");
        assert_eq!(allowed_origin(&any, Some(&o)).unwrap(), "*");
        assert_eq!(allowed_origin(&one, Some(&o)).unwrap(), o);
        assert!(allowed_origin(&one, Some(&other)).is_none());
        assert!(allowed_origin(&one, None).is_none());
    }

    #[test]
    fn cleaning_escapes_control_characters() {
        assert_eq!(clean("/a\r\nSet-Cookie: x"), "/a\\r\\nSet-Cookie: x");
        assert!(clean(&"x".repeat(500)).chars().count() <= 201);
    }
}
