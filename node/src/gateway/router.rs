//! Route matching: path patterns with `{name}` parameters, prefixes on segment boundaries,
//! and hosts.
//!
//! A pattern matches the first segments of a request path: literal segments exactly, a
//! `{name}` segment any non-empty segment. Among the routes that match, the one with the most
//! segments wins; at equal length a literal segment beats a parameter at the first position
//! where they differ; then a route bound to the request's host beats one that is not. The
//! matched segments are stripped: `/api/users/{id}` matching `/api/users/42/photos` leaves
//! `/photos` (`/` when nothing is left), with `id` = `42`.

use super::{Route, jwt};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// A route with its pattern split into segments and its JWT keys parsed, built when the
/// gateway's view is refreshed.
pub struct CompiledRoute {
    /// The route.
    pub route: Route,
    /// Its label in stats, metrics and the access log ([`Route::label`]), made once.
    pub label: std::sync::Arc<str>,
    segments: Vec<Segment>,
    /// The JWT verifier, for routes with JWT auth whose keys parse.
    pub jwt: Option<jwt::Verifier>,
}

impl CompiledRoute {
    /// Compiles a route.
    pub fn new(route: Route) -> Self {
        let segments = if route.path == "/" {
            vec![]
        } else {
            route.path[1..]
                .split('/')
                .map(
                    |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(name) => Segment::Param(name.to_ascii_lowercase()),
                        None => Segment::Literal(s.to_string()),
                    },
                )
                .collect()
        };
        let jwt = (route.auth == super::Auth::Jwt)
            .then(|| jwt::Verifier::new(&route.jwt).ok())
            .flatten();
        Self {
            label: route.label().into(),
            route,
            segments,
            jwt,
        }
    }

    /// Parameters and rest if the pattern matches the start of `path` (segments without the
    /// leading `/`).
    fn matches(&self, path: &[&str]) -> Option<(Vec<(String, String)>, String)> {
        if path.len() < self.segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (seg, part) in self.segments.iter().zip(path) {
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Param(name) if !part.is_empty() => {
                    params.push((name.clone(), decode_param(part)));
                }
                _ => return None,
            }
        }
        let rest = format!("/{}", path[self.segments.len()..].join("/"));
        Some((params, rest))
    }

    /// Ordering key: longer patterns first, then literal segments before parameters, then
    /// routes bound to a host.
    fn rank(&self) -> (usize, Vec<bool>, bool) {
        (
            self.segments.len(),
            self.segments
                .iter()
                .map(|s| matches!(s, Segment::Literal(_)))
                .collect(),
            !self.route.host.is_empty(),
        )
    }
}

/// A matched route.
pub struct Matched {
    /// The route.
    pub route: std::sync::Arc<CompiledRoute>,
    /// The path after the matched segments, starting with `/`.
    pub rest: String,
    /// Parameter values by name, percent-decoded.
    pub params: Vec<(String, String)>,
}

/// The host a request names, lower case and without the port.
pub fn request_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        &host[..end + 2]
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

/// The best route for a request to `host` (as [`request_host`] gives it) and `path`.
pub fn match_route(
    routes: &[std::sync::Arc<CompiledRoute>],
    host: &str,
    path: &str,
) -> Option<Matched> {
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let segments: &[&str] = if segments == [""] { &[] } else { &segments };
    routes
        .iter()
        .filter(|r| r.route.host.is_empty() || r.route.host == host)
        .filter_map(|r| {
            let (params, rest) = r.matches(segments)?;
            Some((r.rank(), r, params, rest))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, r, params, rest)| Matched {
            route: r.clone(),
            rest,
            params,
        })
}

/// Percent-decodes a parameter; keeps the raw text when the result is not UTF-8 or holds
/// control characters (so a value never carries CR or LF into a header).
fn decode_param(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) if !s.chars().any(char::is_control) => s,
        _ => raw.to_string(),
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{Route, RouteTarget};
    use super::*;

    fn route(path: &str) -> Arc<CompiledRoute> {
        Arc::new(CompiledRoute::new(Route::new(
            path,
            RouteTarget::Service("web".into()),
        )))
    }

    fn on_host(path: &str, host: &str) -> Arc<CompiledRoute> {
        let mut r = Route::new(path, RouteTarget::Service("web".into()));
        r.host = host.into();
        Arc::new(CompiledRoute::new(r))
    }

    fn m(routes: &[Arc<CompiledRoute>], host: &str, p: &str) -> Option<(String, String)> {
        match_route(routes, host, p).map(|m| (m.route.route.label(), m.rest))
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let routes = vec![route("/"), route("/web"), route("/web/api")];
        let m = |p: &str| m(&routes, "x", p);
        assert_eq!(m("/web"), Some(("/web".into(), "/".into())));
        assert_eq!(m("/web/"), Some(("/web".into(), "/".into())));
        assert_eq!(m("/web/x"), Some(("/web".into(), "/x".into())));
        assert_eq!(m("/web/x/"), Some(("/web".into(), "/x/".into())));
        assert_eq!(
            m("/web/api/users"),
            Some(("/web/api".into(), "/users".into()))
        );
        assert_eq!(m("/website"), Some(("/".into(), "/website".into())));
        assert_eq!(m("/"), Some(("/".into(), "/".into())));
        let no_root = vec![route("/web")];
        assert!(match_route(&no_root, "x", "/website").is_none());
        assert!(match_route(&no_root, "x", "/").is_none());
    }

    #[test]
    fn parameters_match_one_segment_and_literals_win() {
        let routes = vec![
            route("/api/users/{id}"),
            route("/api/users/me"),
            route("/api/{kind}/{id}/photos"),
        ];
        let got = match_route(&routes, "h", "/api/users/42").unwrap();
        assert_eq!(got.route.route.path, "/api/users/{id}");
        assert_eq!(got.params, vec![("id".to_string(), "42".to_string())]);
        assert_eq!(got.rest, "/");
        let got = match_route(&routes, "h", "/api/users/me").unwrap();
        assert_eq!(got.route.route.path, "/api/users/me");
        assert!(got.params.is_empty());
        let got = match_route(&routes, "h", "/api/users/42/photos/1").unwrap();
        assert_eq!(got.route.route.path, "/api/{kind}/{id}/photos");
        assert_eq!(
            got.params,
            vec![
                ("kind".to_string(), "users".to_string()),
                ("id".to_string(), "42".to_string())
            ]
        );
        assert_eq!(got.rest, "/1");
        let got = match_route(&routes, "h", "/api/users/42/x").unwrap();
        assert_eq!(got.route.route.path, "/api/users/{id}");
        assert_eq!(got.rest, "/x");
        // An empty segment is no parameter.
        assert!(match_route(&routes, "h", "/api/users/").is_none());
        assert!(match_route(&routes, "h", "/api/users").is_none());
    }

    #[test]
    fn parameters_are_decoded_but_never_carry_control_characters() {
        let routes = vec![route("/u/{name}")];
        let p = |path: &str| match_route(&routes, "h", path).unwrap().params[0].1.clone();
        assert_eq!(p("/u/ann%20lee"), "ann lee");
        assert_eq!(p("/u/%C3%A9"), "é");
        assert_eq!(p("/u/a%0d%0ab"), "a%0d%0ab");
        assert_eq!(p("/u/%ff"), "%ff");
        assert_eq!(p("/u/100%"), "100%");
    }

    #[test]
    fn hosts_filter_and_win_ties() {
        let routes = vec![route("/"), on_host("/", "example.com"), route("/api")];
        assert_eq!(
            m(&routes, "example.com", "/x"),
            Some(("example.com/".into(), "/x".into()))
        );
        assert_eq!(
            m(&routes, "other.org", "/x"),
            Some(("/".into(), "/x".into()))
        );
        // A longer path still wins over a host-bound shorter one.
        assert_eq!(
            m(&routes, "example.com", "/api/x"),
            Some(("/api".into(), "/x".into()))
        );
        assert_eq!(request_host("Example.COM:8080"), "example.com");
        assert_eq!(request_host("example.com."), "example.com");
        assert_eq!(request_host("[::1]:80"), "[::1]");
        assert_eq!(request_host("127.0.0.1"), "127.0.0.1");
    }
}
