//! Client load through the API gateway, and the gateway's routes.
//!
//! A [`GatewayLoad`] sends plain HTTP/1.1 `GET`s (one connection per try,
//! `Connection: close`) to the HTTP port of the nodes from the root
//! namespace, at a fixed rate (from a few client threads, so one slow answer
//! does not hold up the next requests; a slot missed because every thread
//! was busy is not made up for), rotating the first node over the nodes given.
//! Like a client with a list of endpoints, it retries a try that failed on
//! the connection (refused, reset, timed out, unparsable answer) or got a
//! 5xx against the next node, up to `retries` times; any other answer ends
//! the request. A request succeeds when its last try got 200 with a body
//! containing the expected text. Every request is recorded in the history
//! (`gateway GET /web/index.html #17: n1 refused; n2 200`) with its first
//! node, its start and end, and `ok` or `FAIL`, so a failed check prints
//! the requests next to the faults and the containers seen.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::cluster::Cluster;
use crate::history::{History, OpKind, Outcome};
use crate::timing::percentile;

/// What a [`GatewayLoad`] sends and how it retries.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The request path, e.g. `/web/index.html`.
    pub path: String,
    /// Text the body of a successful answer contains.
    pub expect: String,
    /// Requests started per second (a late request is not made up for).
    pub per_second: f64,
    /// Tries after the first, each against the next node.
    pub retries: u32,
    /// Time limit of a try's connect, and of each of its reads and writes.
    pub timeout: Duration,
    /// The load stops by itself after this long (and after
    /// `max_duration × per_second` requests).
    pub max_duration: Duration,
}

/// One try of a request against one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Try {
    /// The node whose gateway was asked.
    pub node: usize,
    /// The answer's status; `None` when the connection failed.
    pub status: Option<u16>,
    /// Empty for a 200 with the expected text; else the connection error,
    /// or the start of the body.
    pub detail: String,
    /// How long it took.
    pub took: Duration,
}

impl Try {
    /// 200 with the expected body.
    pub fn ok(&self) -> bool {
        self.status == Some(200) && self.detail.is_empty()
    }

    /// A connection failure or a 5xx: the client tries the next node.
    pub fn retryable(&self) -> bool {
        self.status.is_none_or(|s| s >= 500)
    }

    fn describe(&self) -> String {
        match (self.status, self.detail.is_empty()) {
            (Some(s), true) => format!("n{} {s}", self.node),
            (Some(s), false) => format!("n{} {s} {:?}", self.node, self.detail.trim()),
            (None, _) => format!("n{} {}", self.node, self.detail),
        }
    }
}

/// One client request: its tries, first node first.
#[derive(Debug, Clone)]
pub struct GatewayRequest {
    /// Sequence number (0, 1, ...).
    pub seq: u64,
    /// When it started (history time).
    pub start: Duration,
    /// When its last try ended (history time).
    pub end: Duration,
    /// Its tries, in order.
    pub tries: Vec<Try>,
}

impl GatewayRequest {
    /// True when the last try succeeded.
    pub fn ok(&self) -> bool {
        self.tries.last().is_some_and(Try::ok)
    }

    /// The tries, one line.
    pub fn describe(&self) -> String {
        self.tries
            .iter()
            .map(Try::describe)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Sends requests through the gateways in the background until stopped.
pub struct GatewayLoad {
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<GatewayRequest>>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for GatewayLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayLoad")
            .field("requests", &self.requests.lock().unwrap().len())
            .finish_non_exhaustive()
    }
}

/// The schedule the workers share: the next request's number and start time.
struct Pace {
    began: Instant,
    seq: u64,
    due: Instant,
}

impl GatewayLoad {
    /// Starts the load over the gateways of `nodes` (request `k` first tries
    /// `nodes[k % len]`, its retries the nodes after it), with `workers`
    /// client threads, so a slow answer does not hold up the next requests.
    pub fn start(c: &Cluster, nodes: &[usize], workers: usize, opts: LoadOptions) -> Self {
        assert!(!nodes.is_empty(), "a load needs nodes");
        assert!(opts.per_second > 0.0, "a load needs a rate");
        let targets: Arc<Vec<(usize, SocketAddr)>> =
            Arc::new(nodes.iter().map(|&n| (n, c.http_addr(n))).collect());
        let history = c.history().clone();
        history.event(format!(
            "gateway load started: GET {} at {}/s over {nodes:?}, {} tries per request",
            opts.path,
            opts.per_second,
            opts.retries + 1
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let now = Instant::now();
        let pace = Arc::new(Mutex::new(Pace {
            began: now,
            seq: 0,
            due: now,
        }));
        let opts = Arc::new(opts);
        let threads = (0..workers.max(1))
            .map(|_| {
                let (targets, opts, history, stop, requests, pace) = (
                    targets.clone(),
                    opts.clone(),
                    history.clone(),
                    stop.clone(),
                    requests.clone(),
                    pace.clone(),
                );
                std::thread::spawn(move || {
                    worker(&targets, &opts, &history, &stop, &requests, &pace)
                })
            })
            .collect();
        GatewayLoad {
            stop,
            requests,
            threads,
        }
    }

    /// Every request finished so far, by number.
    pub fn requests(&self) -> Vec<GatewayRequest> {
        let mut v = self.requests.lock().unwrap().clone();
        v.sort_by_key(|r| r.seq);
        v
    }

    /// Stops the load (after the requests in flight) and returns every request.
    pub fn stop(&mut self) -> Vec<GatewayRequest> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.requests()
    }
}

impl Drop for GatewayLoad {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One client thread: takes the next slot of the schedule, waits for its
/// time, sends the request with its retries and records it.
fn worker(
    targets: &[(usize, SocketAddr)],
    opts: &LoadOptions,
    history: &History,
    stop: &AtomicBool,
    requests: &Mutex<Vec<GatewayRequest>>,
    pace: &Mutex<Pace>,
) {
    let interval = Duration::from_secs_f64(1.0 / opts.per_second);
    let max = (opts.max_duration.as_secs_f64() * opts.per_second).ceil() as u64;
    while !stop.load(Ordering::Relaxed) {
        let (seq, due) = {
            let mut p = pace.lock().unwrap();
            let now = Instant::now();
            if p.seq >= max || now.duration_since(p.began) >= opts.max_duration {
                return;
            }
            // Every worker busy past a slot: start now, without a burst to catch up.
            if now.saturating_duration_since(p.due) > interval {
                p.due = now;
            }
            let slot = (p.seq, p.due);
            p.seq += 1;
            p.due += interval;
            slot
        };
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
        let req = send(targets, opts, history, seq);
        requests.lock().unwrap().push(req);
    }
}

/// Request `seq` with its retries, recorded in the history.
fn send(
    targets: &[(usize, SocketAddr)],
    opts: &LoadOptions,
    history: &History,
    seq: u64,
) -> GatewayRequest {
    let start = Instant::now();
    let mut tries = Vec::new();
    for k in 0..=opts.retries as usize {
        let (node, addr) = targets[(seq as usize + k) % targets.len()];
        let t0 = Instant::now();
        let (status, detail) = match http_get(addr, &opts.path, opts.timeout) {
            Ok((200, body)) if body.contains(&opts.expect) => (Some(200), String::new()),
            Ok((200, body)) => (
                Some(200),
                format!(
                    "unexpected body {:?}",
                    body.chars().take(80).collect::<String>()
                ),
            ),
            Ok((code, body)) => (Some(code), body.chars().take(80).collect()),
            Err(e) => (None, short_error(&e)),
        };
        let t = Try {
            node,
            status,
            detail,
            took: t0.elapsed(),
        };
        let again = t.retryable();
        tries.push(t);
        if !again {
            break;
        }
    }
    let end = Instant::now();
    let req = GatewayRequest {
        seq,
        start: history.at(start),
        end: history.at(end),
        tries,
    };
    let outcome = if req.ok() {
        Outcome::Ok(None)
    } else {
        Outcome::Fail(format!("after {} tries", req.tries.len()))
    };
    history.record(
        req.tries[0].node,
        OpKind::Other(format!(
            "gateway GET {} #{seq}: {}",
            opts.path,
            req.describe()
        )),
        start,
        end,
        outcome,
    );
    req
}

/// The innermost cause of a connection error, short (`refused`, `timed
/// out`, ...).
fn short_error(e: &anyhow::Error) -> String {
    let text = format!("{:#}", e.root_cause());
    let lower = text.to_lowercase();
    for (needle, short) in [
        ("refused", "refused"),
        ("reset", "reset"),
        ("timed out", "timed out"),
        ("would block", "timed out"),
        ("temporarily unavailable", "timed out"),
        ("unreachable", "unreachable"),
        ("broken pipe", "broken pipe"),
    ] {
        if lower.contains(needle) {
            return short.into();
        }
    }
    text
}

/// A minimal `GET path` to `addr` with `Connection: close`: status and body.
/// `timeout` limits the connect and each read and write.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: meshwork-chaos\r\n\
         Connection: close\r\n\r\n"
    )
    .context("send")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).context("read")?;
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP answer: {:?}", &text[..text.len().min(80)]))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// What a load's requests came to.
#[derive(Debug, Clone, Default)]
pub struct LoadSummary {
    /// Requests sent.
    pub total: usize,
    /// Requests that succeeded (possibly after retries).
    pub ok: usize,
    /// Requests that succeeded but needed more than one try.
    pub retried: usize,
    /// Tries in all.
    pub tries: usize,
    /// The requests that failed.
    pub failed: Vec<GatewayRequest>,
    /// Latency of the successful requests (all tries): p50, p99, max.
    pub latency: (Duration, Duration, Duration),
}

impl LoadSummary {
    /// Of `requests`.
    pub fn of(requests: &[GatewayRequest]) -> Self {
        let ok: Vec<&GatewayRequest> = requests.iter().filter(|r| r.ok()).collect();
        let lat: Vec<Duration> = ok.iter().map(|r| r.end.saturating_sub(r.start)).collect();
        LoadSummary {
            total: requests.len(),
            ok: ok.len(),
            retried: ok.iter().filter(|r| r.tries.len() > 1).count(),
            tries: requests.iter().map(|r| r.tries.len()).sum(),
            failed: requests.iter().filter(|r| !r.ok()).cloned().collect(),
            latency: (
                percentile(&lat, 0.5).unwrap_or_default(),
                percentile(&lat, 0.99).unwrap_or_default(),
                lat.iter().max().copied().unwrap_or_default(),
            ),
        }
    }

    /// Successful requests over all requests (1.0 for none).
    pub fn success_ratio(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.ok as f64 / self.total as f64
        }
    }

    /// One line for the report.
    pub fn line(&self) -> String {
        format!(
            "{}/{} requests ok ({:.2} %), {} needed retries, {} tries; latency p50 {:.0} ms, \
             p99 {:.0} ms, max {:.0} ms",
            self.ok,
            self.total,
            100.0 * self.success_ratio(),
            self.retried,
            self.tries,
            self.latency.0.as_secs_f64() * 1000.0,
            self.latency.1.as_secs_f64() * 1000.0,
            self.latency.2.as_secs_f64() * 1000.0
        )
    }
}

impl Cluster {
    /// `route add PATH --service SERVICE` on node `i`, recorded in the history.
    pub fn route_add_service(&self, i: usize, path: &str, service: &str) -> Outcome {
        let kind = OpKind::Other(format!("route add {path} --service {service}"));
        self.history().invoke(i, kind, || {
            match self.meshctl_timeout(
                i,
                &["route", "add", path, "--service", service],
                Duration::from_secs(30),
            ) {
                Ok(o) if o.success() => Outcome::Ok(None),
                Ok(o) if o.timed_out => Outcome::Info(o.combined()),
                Ok(o) => Outcome::Fail(o.combined()),
                Err(e) => Outcome::Fail(format!("{e:#}")),
            }
        })
    }

    /// `route ls --json` on node `i`: each route as `meshctl` prints it.
    pub fn routes(&self, i: usize) -> Result<Vec<serde_json::Value>> {
        let out = self.meshctl_ok(i, &["route", "ls", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `route ls --json`: {out}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(seq: u64, tries: &[(usize, Option<u16>, &str)]) -> GatewayRequest {
        GatewayRequest {
            seq,
            start: Duration::from_millis(seq * 100),
            end: Duration::from_millis(seq * 100 + 10 * tries.len() as u64),
            tries: tries
                .iter()
                .map(|(node, status, detail)| Try {
                    node: *node,
                    status: *status,
                    detail: detail.to_string(),
                    took: Duration::from_millis(10),
                })
                .collect(),
        }
    }

    #[test]
    fn tries_and_summary() {
        let reqs = vec![
            req(0, &[(0, Some(200), "")]),
            req(1, &[(1, None, "refused"), (2, Some(200), "")]),
            req(
                2,
                &[(2, Some(503), "no healthy replica"), (3, Some(200), "")],
            ),
            req(3, &[(3, Some(404), "not found")]),
        ];
        assert!(reqs[1].ok() && reqs[2].ok() && !reqs[3].ok());
        assert!(!reqs[3].tries[0].retryable());
        assert!(reqs[1].tries[0].retryable() && reqs[2].tries[0].retryable());
        assert_eq!(reqs[1].describe(), "n1 refused; n2 200");
        let s = LoadSummary::of(&reqs);
        assert_eq!((s.total, s.ok, s.retried, s.tries), (4, 3, 2, 6));
        assert_eq!(s.failed.len(), 1);
        assert!((s.success_ratio() - 0.75).abs() < 1e-9);
        assert_eq!(s.latency.2, Duration::from_millis(20));
        assert!(
            s.line().starts_with("3/4 requests ok (75.00 %)"),
            "{}",
            s.line()
        );
    }

    #[test]
    fn a_closed_port_is_refused() {
        // Bind, learn the port, close: nothing listens there any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = http_get(addr, "/", Duration::from_secs(1)).unwrap_err();
        assert_eq!(short_error(&e), "refused");
    }
}
