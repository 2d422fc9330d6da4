//! A Jepsen-style history: what clients did, when, and what came back, next
//! to what the nemesis did; plus checkers over it.
//!
//! Scenario assertions about replicated state are only meaningful relative to
//! what was actually acknowledged, so every client operation is recorded with
//! its start and end time and outcome, and every fault with its time. A failed
//! check prints the whole timeline so the failure can be read in order.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a client operation was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// `state put key value`.
    Write {
        /// The key written.
        key: String,
        /// The value written.
        value: String,
    },
    /// `state get key`.
    Read {
        /// The key read.
        key: String,
    },
    /// `state rm key`.
    Delete {
        /// The key deleted.
        key: String,
    },
    /// `image push TAR --tag reference` to the node; `content` is the blake3
    /// (hex) of the layer bytes in the tar.
    ImagePush {
        /// `NAME:TAG`.
        reference: String,
        /// blake3 hex of the layer bytes pushed.
        content: String,
    },
    /// `image pull reference` on the node (make it complete there).
    ImagePull {
        /// `NAME:TAG`.
        reference: String,
    },
    /// Anything else, described in words (e.g. "propagate k to all").
    Other(String),
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpKind::Write { key, value } => write!(f, "write {key} = {value:?}"),
            OpKind::Read { key } => write!(f, "read {key}"),
            OpKind::Delete { key } => write!(f, "delete {key}"),
            OpKind::ImagePush { reference, content } => write!(
                f,
                "image push {reference} (layer blake3 {}..)",
                &content[..content.len().min(12)]
            ),
            OpKind::ImagePull { reference } => write!(f, "image pull {reference}"),
            OpKind::Other(s) => f.write_str(s),
        }
    }
}

/// How a client operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It definitely happened; for reads, the value seen (`None`: not found).
    Ok(Option<String>),
    /// It definitely did not happen.
    Fail(String),
    /// Unknown whether it happened (timeout, transport error).
    Info(String),
}

impl Outcome {
    /// True for [`Outcome::Ok`].
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok(None) => f.write_str("ok"),
            Outcome::Ok(Some(v)) => write!(f, "ok {v:?}"),
            Outcome::Fail(e) => write!(f, "FAIL {e}"),
            Outcome::Info(e) => write!(f, "INFO (unknown) {e}"),
        }
    }
}

/// One recorded client operation.
#[derive(Debug, Clone)]
pub struct OpRecord {
    /// Sequence number in the history.
    pub id: u64,
    /// The node the client talked to (index in the cluster).
    pub node: usize,
    /// What it did.
    pub kind: OpKind,
    /// When it was invoked, since the history began.
    pub start: Duration,
    /// When it returned, since the history began.
    pub end: Duration,
    /// What came back.
    pub outcome: Outcome,
}

/// One recorded nemesis action or notable moment.
#[derive(Debug, Clone)]
pub struct Event {
    /// When, since the history began.
    pub at: Duration,
    /// What happened.
    pub what: String,
}

#[derive(Debug, Default)]
struct Inner {
    ops: Vec<OpRecord>,
    events: Vec<Event>,
    observations: Vec<Event>,
    next_id: u64,
    failed: bool,
}

/// A shared, thread-safe recorder; clones record into the same history.
#[derive(Debug, Clone)]
pub struct History {
    origin: Instant,
    inner: Arc<Mutex<Inner>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

fn fmt_t(d: Duration) -> String {
    format!("{:>9.3}s", d.as_secs_f64())
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> Self {
        History {
            origin: Instant::now(),
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    /// Time since the history began.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Converts an instant into history time.
    pub fn at(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.origin)
    }

    /// Records a nemesis action or a notable moment, and echoes it to stderr.
    pub fn event(&self, what: impl Into<String>) {
        let what = what.into();
        let at = self.now();
        eprintln!("chaos {} event {what}", fmt_t(at));
        self.inner.lock().unwrap().events.push(Event { at, what });
    }

    /// Records what an observer saw (e.g. which containers run where), at
    /// `at`, and echoes it to stderr. Observers record only changes, so the
    /// timeline stays readable.
    pub fn observe_at(&self, at: Duration, what: impl Into<String>) {
        let what = what.into();
        eprintln!("chaos {} seen  {what}", fmt_t(at));
        self.inner
            .lock()
            .unwrap()
            .observations
            .push(Event { at, what });
    }

    /// All observations, in time order.
    pub fn observations(&self) -> Vec<Event> {
        let mut v = self.inner.lock().unwrap().observations.clone();
        v.sort_by_key(|e| e.at);
        v
    }

    /// Records a finished operation that ran from `start` to `end`.
    pub fn record(
        &self,
        node: usize,
        kind: OpKind,
        start: Instant,
        end: Instant,
        outcome: Outcome,
    ) -> OpRecord {
        let mut g = self.inner.lock().unwrap();
        let rec = OpRecord {
            id: g.next_id,
            node,
            kind,
            start: self.at(start),
            end: self.at(end),
            outcome,
        };
        g.next_id += 1;
        g.ops.push(rec.clone());
        rec
    }

    /// Runs `f` as operation `kind` against `node`, recording its timing and outcome.
    pub fn invoke(&self, node: usize, kind: OpKind, f: impl FnOnce() -> Outcome) -> Outcome {
        let start = Instant::now();
        let outcome = f();
        self.record(node, kind, start, Instant::now(), outcome.clone());
        outcome
    }

    /// All operations, in invocation order.
    pub fn ops(&self) -> Vec<OpRecord> {
        let mut v = self.inner.lock().unwrap().ops.clone();
        v.sort_by_key(|o| (o.start, o.id));
        v
    }

    /// All events, in time order.
    pub fn events(&self) -> Vec<Event> {
        self.inner.lock().unwrap().events.clone()
    }

    /// Write operations whose key starts with `prefix`.
    pub fn writes(&self, prefix: &str) -> Vec<OpRecord> {
        self.ops()
            .into_iter()
            .filter(|o| matches!(&o.kind, OpKind::Write { key, .. } if key.starts_with(prefix)))
            .collect()
    }

    /// The whole history, operations and events interleaved by time.
    pub fn timeline(&self) -> String {
        let ops = self.ops();
        let events = self.events();
        let mut rows: Vec<(Duration, u8, String)> = Vec::new();
        for e in events {
            rows.push((
                e.at,
                0,
                format!("{}            nemesis  {}", fmt_t(e.at), e.what),
            ));
        }
        for e in self.observations() {
            rows.push((
                e.at,
                2,
                format!("{}            seen     {}", fmt_t(e.at), e.what),
            ));
        }
        for o in ops {
            rows.push((
                o.start,
                1,
                format!(
                    "{} {} n{:<3} #{:<4} {} -> {}",
                    fmt_t(o.start),
                    fmt_t(o.end),
                    o.node,
                    o.id,
                    o.kind,
                    o.outcome
                ),
            ));
        }
        rows.sort_by_key(|r| (r.0, r.1));
        let mut s = String::from("---- history (start, end, node, op -> outcome) ----\n");
        for (_, _, r) in rows {
            s.push_str(&r);
            s.push('\n');
        }
        s.push_str("---- end of history ----\n");
        s
    }

    /// Prints the timeline to stderr and returns an error carrying `msg`.
    /// Also marks the history failed (see [`History::has_failed`]).
    pub fn fail(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        self.inner.lock().unwrap().failed = true;
        eprintln!("{}", self.timeline());
        eprintln!("CHECK FAILED: {msg}");
        anyhow::anyhow!("check failed: {msg}")
    }

    /// True once a check failed through [`History::fail`].
    pub fn has_failed(&self) -> bool {
        self.inner.lock().unwrap().failed
    }

    /// `Ok` if `cond`, else [`History::fail`] with `msg`.
    pub fn ensure(&self, cond: bool, msg: impl std::fmt::Display) -> anyhow::Result<()> {
        if cond { Ok(()) } else { Err(self.fail(msg)) }
    }

    /// Checks that no acknowledged write under `prefix` is lost in
    /// `final_state` (one replica's `key -> value` map, as seen by `observer`).
    ///
    /// For every key written under `prefix`:
    /// * a key with an acknowledged write must be present;
    /// * its value must be one some write (acknowledged or of unknown outcome)
    ///   wrote — a value nobody wrote is corruption;
    /// * if acknowledged writes to it did not overlap in time, the last one
    ///   must be the value (last writer wins);
    ///
    /// and every key present under `prefix` must have been written by someone.
    /// Deletes are not modelled: use distinct prefixes for deleted keys.
    pub fn check_writes_durable(
        &self,
        prefix: &str,
        final_state: &BTreeMap<String, String>,
        observer: &str,
    ) -> anyhow::Result<()> {
        let problems = self.durability_problems(prefix, final_state);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(self.fail(format!(
                "replica {observer}: {} problem(s):\n  {}",
                problems.len(),
                problems.join("\n  ")
            )))
        }
    }

    /// The problems [`History::check_writes_durable`] would report (empty when fine).
    pub fn durability_problems(
        &self,
        prefix: &str,
        final_state: &BTreeMap<String, String>,
    ) -> Vec<String> {
        let mut by_key: BTreeMap<String, Vec<OpRecord>> = BTreeMap::new();
        for w in self.writes(prefix) {
            if let OpKind::Write { key, .. } = &w.kind {
                by_key.entry(key.clone()).or_default().push(w.clone());
            }
        }
        let mut problems = Vec::new();
        for (key, writes) in &by_key {
            let acked: Vec<&OpRecord> = writes.iter().filter(|w| w.outcome.is_ok()).collect();
            let possible: BTreeSet<&str> = writes
                .iter()
                .filter(|w| !matches!(w.outcome, Outcome::Fail(_)))
                .filter_map(|w| match &w.kind {
                    OpKind::Write { value, .. } => Some(value.as_str()),
                    _ => None,
                })
                .collect();
            match final_state.get(key) {
                None if !acked.is_empty() => problems.push(format!(
                    "LOST: {key} had {} acknowledged write(s) (first #{}) but is missing",
                    acked.len(),
                    acked[0].id
                )),
                None => {}
                Some(v) if !possible.contains(v.as_str()) => problems.push(format!(
                    "CORRUPT: {key} = {v:?}, which no write wrote (possible: {possible:?})"
                )),
                Some(v) => {
                    if let Some(last) = acked.iter().max_by_key(|w| w.start) {
                        let sequential = writes
                            .iter()
                            .filter(|w| w.id != last.id)
                            .all(|w| w.end < last.start);
                        if let OpKind::Write { value, .. } = &last.kind
                            && sequential
                            && value != v
                        {
                            problems.push(format!(
                                "LWW: {key} = {v:?}, but the last write #{} ({value:?}) \
                                     started after every other write to it ended",
                                last.id
                            ));
                        }
                    }
                }
            }
        }
        for key in final_state.keys() {
            if key.starts_with(prefix) && !by_key.contains_key(key) {
                problems.push(format!("PHANTOM: {key} present but never written"));
            }
        }
        problems
    }

    /// Events that happened while `op` was in flight (strictly after its
    /// start, before its end).
    pub fn events_during(&self, op: &OpRecord) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.at > op.start && e.at < op.end)
            .collect()
    }

    /// Checks what nodes hold of image `reference` against the image pushes
    /// and pulls in the history; see [`History::image_problems`].
    ///
    /// `found` maps each node checked to the blake3 (hex) of the layer bytes
    /// read back from it (`None`: it could not give them). Nodes not in
    /// `found` (killed ones, say) are not checked.
    pub fn check_images_intact(
        &self,
        reference: &str,
        found: &BTreeMap<usize, Option<String>>,
    ) -> anyhow::Result<()> {
        let problems = self.image_problems(reference, found);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(self.fail(format!(
                "image {reference}: {} problem(s):\n  {}",
                problems.len(),
                problems.join("\n  ")
            )))
        }
    }

    /// The problems [`History::check_images_intact`] would report (empty when fine):
    /// * LOST: a node checked whose push or pull of `reference` was
    ///   acknowledged cannot give the layer;
    /// * CORRUPT: a node gives layer bytes that no push (acknowledged or of
    ///   unknown outcome) wrote;
    /// * PHANTOM: a pull was acknowledged although no push had been
    ///   acknowledged or was in flight before the pull ended.
    pub fn image_problems(
        &self,
        reference: &str,
        found: &BTreeMap<usize, Option<String>>,
    ) -> Vec<String> {
        let ops: Vec<OpRecord> = self
            .ops()
            .into_iter()
            .filter(|o| match &o.kind {
                OpKind::ImagePush { reference: r, .. } | OpKind::ImagePull { reference: r } => {
                    r == reference
                }
                _ => false,
            })
            .collect();
        let pushes: Vec<&OpRecord> = ops
            .iter()
            .filter(|o| matches!(o.kind, OpKind::ImagePush { .. }))
            .filter(|o| !matches!(o.outcome, Outcome::Fail(_)))
            .collect();
        let possible: BTreeSet<&str> = pushes
            .iter()
            .filter_map(|o| match &o.kind {
                OpKind::ImagePush { content, .. } => Some(content.as_str()),
                _ => None,
            })
            .collect();
        let mut problems = Vec::new();
        for o in ops.iter().filter(|o| o.outcome.is_ok()) {
            if matches!(o.kind, OpKind::ImagePull { .. }) && !pushes.iter().any(|p| p.start < o.end)
            {
                problems.push(format!(
                    "PHANTOM: pull #{} on n{} acknowledged but no push started before it ended",
                    o.id, o.node
                ));
            }
            if let Some(None) = found.get(&o.node) {
                problems.push(format!(
                    "LOST: n{} acknowledged #{} ({}) but cannot give the layer",
                    o.node, o.id, o.kind
                ));
            }
        }
        for (node, v) in found {
            if let Some(v) = v
                && !possible.contains(v.as_str())
            {
                problems.push(format!(
                    "CORRUPT: n{node} gives layer bytes with blake3 {v}, which no push wrote \
                     (pushed: {possible:?})"
                ));
            }
        }
        problems
    }

    /// A short count of operations by outcome, for the end of a scenario.
    pub fn summary(&self) -> String {
        let ops = self.ops();
        let ok = ops.iter().filter(|o| o.outcome.is_ok()).count();
        let fail = ops
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Fail(_)))
            .count();
        let info = ops.len() - ok - fail;
        let mut s = String::new();
        let _ = write!(
            s,
            "{} ops ({ok} ok, {fail} failed, {info} unknown), {} nemesis events",
            ops.len(),
            self.events().len()
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(h: &History, node: usize, key: &str, value: &str, outcome: Outcome) {
        let t = Instant::now();
        h.record(
            node,
            OpKind::Write {
                key: key.into(),
                value: value.into(),
            },
            t,
            t,
            outcome,
        );
        std::thread::sleep(Duration::from_millis(2));
    }

    #[test]
    fn durable_check_finds_lost_corrupt_phantom_and_lww() {
        let h = History::new();
        write(&h, 0, "p/a", "1", Outcome::Ok(None));
        write(&h, 1, "p/b", "2", Outcome::Ok(None));
        write(&h, 0, "p/c", "x", Outcome::Ok(None));
        write(&h, 1, "p/c", "y", Outcome::Ok(None));
        write(&h, 1, "p/d", "z", Outcome::Info("timeout".into()));
        let mut state = BTreeMap::new();
        state.insert("p/a".to_string(), "1".to_string());
        state.insert("p/c".to_string(), "y".to_string());
        let problems = h.durability_problems("p/", &state);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("LOST: p/b"));

        state.insert("p/b".to_string(), "2".to_string());
        assert!(h.durability_problems("p/", &state).is_empty());

        state.insert("p/c".to_string(), "x".to_string());
        let p = h.durability_problems("p/", &state);
        assert!(p.len() == 1 && p[0].starts_with("LWW"), "{p:?}");
        state.insert("p/c".to_string(), "q".to_string());
        let p = h.durability_problems("p/", &state);
        assert!(p.len() == 1 && p[0].starts_with("CORRUPT"), "{p:?}");
        state.insert("p/c".to_string(), "y".to_string());
        state.insert("p/zz".to_string(), "?".to_string());
        let p = h.durability_problems("p/", &state);
        assert!(p.len() == 1 && p[0].starts_with("PHANTOM"), "{p:?}");
        state.remove("p/zz");
        // An unknown-outcome write may or may not be there.
        state.insert("p/d".to_string(), "z".to_string());
        assert!(h.durability_problems("p/", &state).is_empty());
    }

    #[test]
    fn image_check_finds_lost_corrupt_and_phantom() {
        let h = History::new();
        let pull = |node: usize, outcome: Outcome| {
            let s = Instant::now();
            std::thread::sleep(Duration::from_millis(2));
            h.record(
                node,
                OpKind::ImagePull {
                    reference: "a:1".into(),
                },
                s,
                Instant::now(),
                outcome,
            )
        };
        let early = pull(3, Outcome::Ok(None));
        h.record(
            0,
            OpKind::ImagePush {
                reference: "a:1".into(),
                content: "good".into(),
            },
            Instant::now(),
            Instant::now(),
            Outcome::Ok(None),
        );
        pull(1, Outcome::Ok(None));
        pull(2, Outcome::Fail("exit 1".into()));
        let mut found = BTreeMap::new();
        found.insert(1, Some("good".to_string()));
        found.insert(2, None);
        let p = h.image_problems("a:1", &found);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("PHANTOM") && p[0].contains(&format!("#{}", early.id)));
        found.insert(3, Some("good".to_string()));
        found.insert(1, None);
        let p = h.image_problems("a:1", &found);
        assert!(p.iter().any(|x| x.starts_with("LOST: n1")), "{p:?}");
        found.insert(1, Some("bad".to_string()));
        let p = h.image_problems("a:1", &found);
        assert!(p.iter().any(|x| x.starts_with("CORRUPT: n1")), "{p:?}");
        // Other images are not looked at.
        assert!(h.image_problems("b:1", &BTreeMap::new()).is_empty());
    }

    #[test]
    fn events_during_an_op() {
        let h = History::new();
        let s = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        h.event("inside");
        std::thread::sleep(Duration::from_millis(2));
        let op = h.record(
            0,
            OpKind::Other("x".into()),
            s,
            Instant::now(),
            Outcome::Ok(None),
        );
        std::thread::sleep(Duration::from_millis(2));
        h.event("after");
        let e = h.events_during(&op);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].what, "inside");
    }

    #[test]
    fn timeline_interleaves() {
        let h = History::new();
        h.event("partition");
        write(&h, 2, "k", "v", Outcome::Fail("refused".into()));
        let t = h.timeline();
        assert!(t.contains("nemesis  partition"), "{t}");
        assert!(t.contains("write k = \"v\" -> FAIL refused"), "{t}");
        assert!(t.find("partition").unwrap() < t.find("write k").unwrap());
        assert!(h.summary().starts_with("1 ops (0 ok, 1 failed, 0 unknown)"));
    }
}
