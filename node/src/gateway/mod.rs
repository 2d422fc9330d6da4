//! The API gateway on every node's HTTP listener: routes to functions and services, methods,
//! path parameters, host matching, CORS, request and response size limits and timeouts per
//! route, API keys with usage plans throttled mesh-wide, JWT auth, and per-route monitoring.
//!
//! - **Routes** are records in the replicated state (`route<path>`, or `route@<host><path>` for
//!   a route bound to a host; a `{param}` segment is stored as `:param` in the key), so every
//!   node knows every route. Matching ([`router`]) takes the route with the most segments that
//!   matches the start of the path on segment boundaries, literal segments before parameters,
//!   a route bound to the request's host before one that is not. The matched part is stripped:
//!   the rest is what the target sees as its path (`PATH_INFO` for functions), and each
//!   `{name}` segment is passed as the header `x-mesh-param-<name>` (percent-decoded).
//! - **Services**: a healthy replica that runs under its current claim, replicas on this node
//!   first, then round-robin over the others; a replica that refuses the connection is skipped
//!   for the next one. WebSocket upgrades pass through when the route allows them.
//! - **Keys and plans** ([`keys`], [`limits`]): `x-api-key`, stored as blake3 hashes and compared
//!   in constant time; each node enforces a share of a plan's rate, rebalanced every second from
//!   per-key request counters that every node publishes in the replicated state.
//! - **JWT** ([`jwt`]): HS256 and RS256 per route, expiry and audience checked.
//! - **Response limits** ([`response`]): a service's answer declaring more than the route's
//!   limit gets 502, a streamed one is cut where it passes the limit; a function's gets 502.
//! - **Hardening**: see [`framing`] and `crate::http`.
//! - **Monitoring** ([`stats`]): per-route counters and latency on `/metrics` and, summed over
//!   the nodes, in `meshctl gateway stats`.

pub mod framing;
pub mod jwt;
pub mod keys;
pub mod limits;
mod proxy;
pub mod response;
pub mod router;
pub mod stats;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::node::NodeState;
use crate::services;

pub(crate) use proxy::over_limit;
pub use proxy::proxy_to_service;
pub use router::{CompiledRoute, Matched, match_route};

const ROUTE_PREFIX: &str = "route";
/// Default request body limit of a route (the functions' limit).
pub const DEFAULT_MAX_BODY: u64 = crate::functions::MAX_BODY_BYTES as u64;
/// Largest body limit a service route may set.
pub const MAX_BODY_LIMIT: u64 = 1 << 30;
/// Default response body limit of a route: 10 MiB, API Gateway's payload limit.
pub const DEFAULT_MAX_RESPONSE: u64 = 10 << 20;
/// Largest response limit a service route may set.
pub const MAX_RESPONSE_LIMIT: u64 = 16 << 30;
/// Largest response limit a function route may set: all a function may write at all.
pub const MAX_FN_RESPONSE_LIMIT: u64 = crate::functions::runtime::MAX_STDOUT_BYTES as u64;
/// Default time limit of a request through a route.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest time limit a route may set.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the gateway's view of routes, plans and keys may lag the replicated state.
const SNAPSHOT_TTL: Duration = Duration::from_millis(250);

/// Where a route sends requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteTarget {
    /// A function, by name.
    Function(String),
    /// A service, by name.
    Service(String),
}

/// How a route authenticates callers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Auth {
    /// Anyone may call.
    #[default]
    None,
    /// An API key in `x-api-key`.
    Key,
    /// A JWT in `Authorization: Bearer`.
    Jwt,
}

impl Auth {
    /// Parses `none`, `key` or `jwt` (empty is `none`).
    pub fn parse(text: &str) -> Result<Self, RouteError> {
        match text {
            "" | "none" => Ok(Auth::None),
            "key" => Ok(Auth::Key),
            "jwt" => Ok(Auth::Jwt),
            other => Err(RouteError::Invalid(format!(
                "auth {other:?}: expected none, key or jwt"
            ))),
        }
    }

    /// The name `parse` accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Key => "key",
            Auth::Jwt => "jwt",
        }
    }
}

/// JWT settings of a route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtConfig {
    /// HS256 shared secret, hex; empty if HS256 is not accepted.
    #[serde(default)]
    pub hs256_secret_hex: String,
    /// RS256 public key, PEM; empty if RS256 is not accepted.
    #[serde(default)]
    pub rs256_public_key: String,
    /// Required audience; empty skips the check.
    #[serde(default)]
    pub audience: String,
}

/// A route as stored in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Path pattern, e.g. `/web` or `/api/users/{id}`.
    pub path: String,
    /// The target.
    pub target: RouteTarget,
    /// Pass WebSocket upgrades through.
    pub websocket: bool,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Allowed methods, upper case; empty allows all (GET allows HEAD).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Host the route is bound to (lower case, no port); empty for any.
    #[serde(default)]
    pub host: String,
    /// CORS origins (`*` or exact origins); empty: no CORS.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Body limit in bytes; 0 for [`DEFAULT_MAX_BODY`].
    #[serde(default)]
    pub max_body_bytes: u64,
    /// Time limit in ms; 0 for [`DEFAULT_TIMEOUT`].
    #[serde(default)]
    pub timeout_ms: u64,
    /// Response body limit in bytes; `None` for [`DEFAULT_MAX_RESPONSE`]. Not applied to
    /// upgraded (WebSocket) connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
    /// Authentication.
    #[serde(default)]
    pub auth: Auth,
    /// With key auth: the plans allowed; empty allows all.
    #[serde(default)]
    pub plans: Vec<String>,
    /// With JWT auth: keys and audience.
    #[serde(default)]
    pub jwt: JwtConfig,
}

impl Route {
    /// A plain route: any method and host, no auth, default limits.
    pub fn new(path: &str, target: RouteTarget) -> Self {
        Self {
            path: path.to_string(),
            target,
            websocket: false,
            created_ms: 0,
            methods: vec![],
            host: String::new(),
            cors_origins: vec![],
            max_body_bytes: 0,
            timeout_ms: 0,
            max_response_bytes: None,
            auth: Auth::None,
            plans: vec![],
            jwt: JwtConfig::default(),
        }
    }

    /// The body limit in force.
    pub fn body_limit(&self) -> u64 {
        if self.max_body_bytes == 0 {
            DEFAULT_MAX_BODY
        } else {
            self.max_body_bytes
        }
    }

    /// The response limit in force.
    pub fn response_limit(&self) -> u64 {
        self.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE)
    }

    /// The time limit in force.
    pub fn timeout(&self) -> Duration {
        if self.timeout_ms == 0 {
            DEFAULT_TIMEOUT
        } else {
            Duration::from_millis(self.timeout_ms)
        }
    }

    /// The label of the route in metrics and logs: the path, after the host if it has one.
    pub fn label(&self) -> String {
        if self.host.is_empty() {
            self.path.clone()
        } else {
            format!("{}{}", self.host, self.path)
        }
    }
}

/// Errors of route, plan and key operations.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No such route, plan or key.
    #[error("{0}")]
    Unknown(String),
    /// The name is taken.
    #[error("{0}")]
    Exists(String),
    /// Still in use.
    #[error("{0}")]
    InUse(String),
    /// Storing failed.
    #[error("cannot store it: {0}")]
    State(String),
}

/// Checks a route path: starts with `/`, plain characters or `{name}` segments, no empty or
/// dot segments.
pub fn validate_path(path: &str) -> Result<(), RouteError> {
    let bad = || {
        RouteError::Invalid(format!(
            "route path {path:?}: must start with '/' and use letters, digits, '.', '_', '-' \
             and '/', or whole segments {{name}} for parameters (no empty, '.' or '..' \
             segments, at most 200 bytes)"
        ))
    };
    if !path.starts_with('/') || path.len() > 200 {
        return Err(bad());
    }
    if path == "/" {
        return Ok(());
    }
    let trimmed = path.trim_end_matches('/');
    let mut names = Vec::new();
    for segment in trimmed[1..].split('/') {
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let ok = !name.is_empty()
                && name.len() <= 40
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(bad());
            }
            if names.contains(&name) {
                return Err(RouteError::Invalid(format!(
                    "route path {path:?}: parameter {{{name}}} appears twice"
                )));
            }
            names.push(name);
            continue;
        }
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

/// Checks a route's own response limit: at least one byte, at most
/// [`MAX_FN_RESPONSE_LIMIT`] for a function route and [`MAX_RESPONSE_LIMIT`] for a service
/// route.
pub fn validate_response_limit(bytes: u64, function: bool) -> Result<(), RouteError> {
    let (max, kind) = if function {
        (MAX_FN_RESPONSE_LIMIT, "function")
    } else {
        (MAX_RESPONSE_LIMIT, "service")
    };
    if bytes == 0 {
        return Err(RouteError::Invalid(format!(
            "response limit 0 bytes: must be at least 1 byte (leave it unset for the default, \
             {DEFAULT_MAX_RESPONSE} bytes)"
        )));
    }
    if bytes > max {
        return Err(RouteError::Invalid(format!(
            "response limit {bytes} bytes: at most {max} for a {kind} route"
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

/// The state key of a route.
fn route_key(host: &str, path: &str) -> String {
    let path = path.replace('{', ":").replace('}', "");
    if host.is_empty() {
        format!("{ROUTE_PREFIX}{path}")
    } else {
        format!("{ROUTE_PREFIX}@{host}{path}")
    }
}

fn validate_host(host: &str) -> Result<(), RouteError> {
    let ok = host.len() <= 50
        && !host.starts_with(['.', '-'])
        && host
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RouteError::Invalid(format!(
            "host {host:?}: a DNS name of at most 50 characters (a-z, 0-9, '.', '-'), no port"
        )))
    }
}

fn validate_origin(origin: &str) -> Result<(), RouteError> {
    if origin == "*" {
        return Ok(());
    }
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    let ok = rest.is_some_and(|r| {
        !r.is_empty()
            && r.len() <= 200
            && r.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
    });
    if ok {
        Ok(())
    } else {
        Err(RouteError::Invalid(format!(
            "CORS origin {origin:?}: '*' or scheme://host[:port], e.g. https://app.example.com"
        )))
    }
}

/// Every route.
pub fn list(node: &NodeState) -> Vec<Route> {
    let replica = node.replica.lock().expect("replica lock");
    let map = replica.map();
    map.list(&format!("{ROUTE_PREFIX}/"))
        .chain(map.list(&format!("{ROUTE_PREFIX}@")))
        .filter_map(|e| serde_json::from_slice(e.value.as_deref()?).ok())
        .collect()
}

/// Checks and normalises a route before it is stored.
pub fn check(node: &NodeState, route: &mut Route) -> Result<(), RouteError> {
    validate_path(&route.path)?;
    route.path = normalise(&route.path);
    route.host = route.host.trim().to_ascii_lowercase();
    if !route.host.is_empty() {
        validate_host(&route.host)?;
    }
    match &route.target {
        RouteTarget::Function(name) | RouteTarget::Service(name) => {
            crate::functions::validate_name(name)
                .map_err(|_| RouteError::Invalid(format!("target name {name:?} is not valid")))?;
        }
    }
    let function = matches!(route.target, RouteTarget::Function(_));
    if route.websocket && function {
        return Err(RouteError::Invalid(
            "WebSocket routes need a service target".into(),
        ));
    }
    let mut methods = Vec::new();
    for m in &route.methods {
        let m = m.trim().to_ascii_uppercase();
        if m.is_empty() || m.len() > 20 || !m.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(RouteError::Invalid(format!(
                "method {m:?}: letters only, e.g. GET or POST"
            )));
        }
        if !methods.contains(&m) {
            methods.push(m);
        }
    }
    route.methods = methods;
    for o in &route.cors_origins {
        validate_origin(o)?;
    }
    let max_body = if function {
        DEFAULT_MAX_BODY
    } else {
        MAX_BODY_LIMIT
    };
    if route.max_body_bytes > max_body {
        return Err(RouteError::Invalid(format!(
            "body limit {} bytes: at most {max_body} for a {} route",
            route.max_body_bytes,
            if function { "function" } else { "service" }
        )));
    }
    if let Some(bytes) = route.max_response_bytes {
        validate_response_limit(bytes, function)?;
    }
    if route.timeout_ms > MAX_TIMEOUT.as_millis() as u64 {
        return Err(RouteError::Invalid(format!(
            "timeout {} ms: at most {} ms",
            route.timeout_ms,
            MAX_TIMEOUT.as_millis()
        )));
    }
    if route.auth != Auth::Key && !route.plans.is_empty() {
        return Err(RouteError::Invalid(
            "plans restrict API keys: they need auth key".into(),
        ));
    }
    let jwt_set = !route.jwt.hs256_secret_hex.is_empty()
        || !route.jwt.rs256_public_key.is_empty()
        || !route.jwt.audience.is_empty();
    if route.auth != Auth::Jwt && jwt_set {
        return Err(RouteError::Invalid("JWT settings need auth jwt".into()));
    }
    if route.auth == Auth::Key {
        let plans = keys::plans(node);
        for p in &route.plans {
            if !plans.iter().any(|x| &x.name == p) {
                return Err(RouteError::Unknown(format!("no plan {p:?}")));
            }
        }
    }
    if route.auth == Auth::Jwt {
        jwt::Verifier::new(&route.jwt).map_err(RouteError::Invalid)?;
    }
    let key = route_key(&route.host, &route.path);
    crate::state::validate_key(&key)
        .map_err(|e| RouteError::Invalid(format!("route {}: {e}", route.label())))?;
    Ok(())
}

/// Adds or replaces a route.
pub fn add(node: &NodeState, mut route: Route) -> Result<Route, RouteError> {
    check(node, &mut route)?;
    route.created_ms = services::now_ms();
    let value = serde_json::to_vec(&route).expect("routes serialize");
    node.write(&route_key(&route.host, &route.path), Some(value))
        .map_err(|e| RouteError::State(e.to_string()))?;
    changed();
    Ok(route)
}

/// Removes a route.
pub fn remove(node: &NodeState, host: &str, path: &str) -> Result<(), RouteError> {
    let path = normalise(path);
    let host = host.trim().to_ascii_lowercase();
    if !list(node).iter().any(|r| r.path == path && r.host == host) {
        let what = if host.is_empty() {
            path
        } else {
            format!("{host}{path}")
        };
        return Err(RouteError::Unknown(format!("no route {what:?}")));
    }
    node.write(&route_key(&host, &path), None)
        .map_err(|e| RouteError::State(e.to_string()))?;
    changed();
    Ok(())
}

/// Bumped by every local change of routes, plans or keys, so this node's gateway sees its
/// own writes at once (others' arrive within [`SNAPSHOT_TTL`] of reaching this node).
static GENERATION: AtomicU64 = AtomicU64::new(0);

pub(crate) fn changed() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// What the gateway needs per request, read from the replicated state at most every
/// [`SNAPSHOT_TTL`].
pub struct Snapshot {
    /// Routes with their compiled patterns and JWT verifiers.
    pub routes: Vec<Arc<CompiledRoute>>,
    /// Plans by name.
    pub plans: std::collections::HashMap<String, keys::Plan>,
    /// Keys by their public id.
    pub keys: std::collections::HashMap<String, keys::ApiKey>,
}

/// The gateway of one node: its cached view, throttling state and counters.
pub struct Gateway {
    /// The node.
    pub node: Arc<NodeState>,
    snapshot: Mutex<(Arc<Snapshot>, Instant, u64)>,
    /// Per-key throttling and quotas.
    pub limits: Arc<limits::Limits>,
    /// Per-route counters.
    pub stats: Arc<stats::GatewayStats>,
    /// The replicas of each service, kept until the state or the membership changes.
    upstreams: proxy::Upstreams,
}

impl Gateway {
    /// The gateway of `node`; registers its node-to-node calls.
    pub fn new(node: Arc<NodeState>) -> Arc<Self> {
        let stats = stats::GatewayStats::new();
        stats::register_rpc(&node, &stats);
        let limits = limits::Limits::new(node.clone());
        let snapshot = Arc::new(build_snapshot(&node));
        Arc::new(Self {
            node,
            snapshot: Mutex::new((snapshot, Instant::now(), GENERATION.load(Ordering::Relaxed))),
            limits,
            stats,
            upstreams: proxy::Upstreams::default(),
        })
    }

    /// The current view of routes, plans and keys.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let mut guard = self.snapshot.lock().expect("snapshot lock");
        let generation = GENERATION.load(Ordering::Relaxed);
        if guard.1.elapsed() >= SNAPSHOT_TTL || guard.2 != generation {
            *guard = (
                Arc::new(build_snapshot(&self.node)),
                Instant::now(),
                generation,
            );
        }
        guard.0.clone()
    }
}

fn build_snapshot(node: &NodeState) -> Snapshot {
    let routes = list(node)
        .into_iter()
        .map(|r| Arc::new(CompiledRoute::new(r)))
        .collect();
    let plans = keys::plans(node)
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect();
    let keys = keys::keys(node)
        .into_iter()
        .map(|k| (k.id.clone(), k))
        .collect();
    Snapshot {
        routes,
        plans,
        keys,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        for ok in [
            "/",
            "/web",
            "/api/v1",
            "/a.b_c-d/",
            "/api/users/{id}",
            "/a/{x}/b/{y_2}",
        ] {
            assert!(validate_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "web",
            "/a//b",
            "/a/../b",
            "/a b",
            "/fn/x",
            "/metrics",
            "/a\r\n",
            "/a/{}",
            "/a/{x-y}",
            "/a/x{y}",
            "/a/{x}/{x}",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn response_limits_default_and_are_checked() {
        let mut r = Route::new("/a", RouteTarget::Service("web".into()));
        assert_eq!(r.response_limit(), DEFAULT_MAX_RESPONSE);
        r.max_response_bytes = Some(1000);
        assert_eq!(r.response_limit(), 1000);
        for (bytes, function, ok) in [
            (1, false, true),
            (1, true, true),
            (MAX_RESPONSE_LIMIT, false, true),
            (MAX_FN_RESPONSE_LIMIT, true, true),
            (0, false, false),
            (0, true, false),
            (MAX_RESPONSE_LIMIT + 1, false, false),
            (MAX_FN_RESPONSE_LIMIT + 1, true, false),
        ] {
            assert_eq!(
                validate_response_limit(bytes, function).is_ok(),
                ok,
                "{bytes} {function}"
            );
        }
        let e = validate_response_limit(0, false).unwrap_err().to_string();
        assert!(e.contains("at least 1 byte"), "{e}");
        let e = validate_response_limit(MAX_FN_RESPONSE_LIMIT + 1, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 33554432 for a function route"), "{e}");
    }

    #[test]
    fn records_without_a_response_limit_still_read() {
        // A route stored before response limits existed has no such field.
        let old = r#"{"path":"/web","target":{"Service":"web"},"websocket":false,
            "created_ms":1,"max_body_bytes":0,"timeout_ms":0}"#;
        let r: Route = serde_json::from_str(old).unwrap();
        assert_eq!(r.max_response_bytes, None);
        assert_eq!(r.response_limit(), DEFAULT_MAX_RESPONSE);
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("max_response_bytes"), "{json}");
        let mut r = r;
        r.max_response_bytes = Some(5);
        let back: Route = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.max_response_bytes, Some(5));
    }

    #[test]
    fn route_keys_are_valid_state_keys() {
        for (host, path) in [
            ("", "/"),
            ("", "/api/users/{id}"),
            ("example.com", "/"),
            ("a-b.example.com", "/x/{y}/z"),
        ] {
            let key = route_key(host, path);
            crate::state::validate_key(&key).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        assert_eq!(route_key("", "/a/{id}"), "route/a/:id");
        assert_eq!(route_key("x.org", "/a"), "route@x.org/a");
    }

    #[test]
    fn origins_and_hosts_are_checked() {
        for ok in ["*", "https://app.example.com", "http://127.0.0.1:8080"] {
            assert!(validate_origin(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "example.com",
            "https://x/y",
            "https://a\r\nb",
            "ftp://x",
        ] {
            assert!(validate_origin(bad).is_err(), "{bad:?}");
        }
        assert!(validate_host("example.com").is_ok());
        assert!(validate_host("example.com:80").is_err());
        assert!(validate_host("Ex ample").is_err());
    }
}
