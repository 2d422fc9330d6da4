//! Batch jobs through `meshctl job`: submitting, reading a job with its
//! attempts, recording how the attempts change into the history, and the
//! exactly-once check.
//!
//! A [`JobTracker`] reads `job show ID --json` from a node each time a
//! scenario polls it and writes every change of the attempts to the
//! history's timeline (`job 0190.. RUNNING: i0[1 node2 RUNNING] i1[...]`),
//! so a failed check prints which attempt ran where next to the faults.
//! (The job's containers are sampled by [`crate::ReplicaWatch`] as service
//! `job/<id>`, see [`crate::containers::job_service`].)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::cluster::Cluster;
use crate::history::{OpKind, Outcome};

/// The reason of an attempt the mesh gave up on because its node was lost.
pub const NODE_LOST: &str = "node lost";

/// One attempt as `meshctl job show --json` prints it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct AttemptView {
    /// 1, 2, ...
    pub number: u32,
    /// The name of the node that ran it.
    pub node: String,
    /// STARTING, RUNNING, SUCCEEDED or FAILED.
    pub state: String,
    /// Start, ms since the epoch.
    pub started_ms: u64,
    /// End, ms since the epoch (0 while it runs).
    pub ended_ms: u64,
    /// Exit code, once it exited.
    pub exit_code: Option<i32>,
    /// Why it failed (e.g. `node lost`).
    pub reason: String,
}

/// One index of a job.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct IndexView {
    /// The index (0 for a single job).
    pub index: u32,
    /// Its state.
    pub state: String,
    /// Why it is in that state.
    pub reason: String,
    /// Its attempts, by number.
    pub attempts: Vec<AttemptView>,
}

/// A job as `meshctl job show --json` prints it (the fields the scenarios read).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct JobView {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The job's state.
    pub state: String,
    /// Why.
    pub reason: String,
    /// Array size (0 for a single job).
    pub array: u32,
    /// Attempts allowed after the first.
    pub retries: u32,
    /// Attempts so far, all indices.
    pub attempts: u32,
    /// Indices by state.
    pub counts: BTreeMap<String, u32>,
    /// Every index.
    pub indices: Vec<IndexView>,
}

impl JobView {
    /// SUCCEEDED or FAILED.
    pub fn ended(&self) -> bool {
        matches!(self.state.as_str(), "SUCCEEDED" | "FAILED")
    }

    /// `(index, attempt)` of every attempt in `states` on node `node` (a name).
    pub fn attempts_on(&self, node: &str, states: &[&str]) -> BTreeSet<(u32, u32)> {
        self.indices
            .iter()
            .flat_map(|i| i.attempts.iter().map(move |a| (i.index, a)))
            .filter(|(_, a)| a.node == node && states.contains(&a.state.as_str()))
            .map(|(i, a)| (i, a.number))
            .collect()
    }

    /// Names of the nodes with an attempt in `states`.
    pub fn nodes_with(&self, states: &[&str]) -> BTreeSet<String> {
        self.indices
            .iter()
            .flat_map(|i| i.attempts.iter())
            .filter(|a| states.contains(&a.state.as_str()))
            .map(|a| a.node.clone())
            .collect()
    }

    /// One line: the state, then per index its attempts
    /// (`i1[1 node2 FAILED node lost, 2 node0 SUCCEEDED]`).
    pub fn render(&self) -> String {
        let indices: Vec<String> = self
            .indices
            .iter()
            .map(|i| {
                let attempts: Vec<String> = i
                    .attempts
                    .iter()
                    .map(|a| {
                        let mut s = format!("{} {} {}", a.number, a.node, a.state);
                        if !a.reason.is_empty() {
                            s.push_str(&format!(" ({})", a.reason));
                        }
                        s
                    })
                    .collect();
                format!("i{}[{}]", i.index, attempts.join(", "))
            })
            .collect();
        format!("job {} {}: {}", self.id, self.state, indices.join(" "))
    }
}

/// What [`job_problems`] expects of a job that ran through a crash.
#[derive(Debug, Clone)]
pub struct ExactlyOnce {
    /// Attempts allowed per index (`retries + 1`).
    pub max_attempts: u32,
    /// The name of the node that crashed: the only node whose attempts may be lost.
    pub crashed: String,
    /// `(index, attempt)` that ran on the crashed node when it crashed: each must
    /// end FAILED with reason `node lost`.
    pub running_at_crash: BTreeSet<(u32, u32)>,
}

/// Everything wrong with `job` after it ended (empty when fine):
/// * the job did not end SUCCEEDED, or it lacks an index;
/// * an index not SUCCEEDED, or without exactly one SUCCEEDED attempt;
/// * an index with more attempts than allowed, or attempt numbers not `1..=n`;
/// * an attempt still STARTING or RUNNING;
/// * an attempt lost (`node lost`) on another node than the crashed one;
/// * an attempt that ran on the crashed node at the crash and did not end
///   FAILED with `node lost`.
pub fn job_problems(job: &JobView, want: &ExactlyOnce) -> Vec<String> {
    let mut out = Vec::new();
    if job.state != "SUCCEEDED" {
        out.push(format!(
            "job is {} ({}), not SUCCEEDED",
            job.state, job.reason
        ));
    }
    let expected: BTreeSet<u32> = (0..job.array.max(1)).collect();
    let present: BTreeSet<u32> = job.indices.iter().map(|i| i.index).collect();
    if present != expected {
        out.push(format!("indices {present:?}, expected {expected:?}"));
    }
    for i in &job.indices {
        let wins = i.attempts.iter().filter(|a| a.state == "SUCCEEDED").count();
        if i.state != "SUCCEEDED" || wins != 1 {
            out.push(format!(
                "index {} is {} with {wins} SUCCEEDED attempt(s), expected exactly 1",
                i.index, i.state
            ));
        }
        if i.attempts.len() > want.max_attempts as usize {
            out.push(format!(
                "index {} has {} attempts, at most {} allowed",
                i.index,
                i.attempts.len(),
                want.max_attempts
            ));
        }
        let numbers: Vec<u32> = i.attempts.iter().map(|a| a.number).collect();
        if numbers != (1..=numbers.len() as u32).collect::<Vec<_>>() {
            out.push(format!(
                "index {} has attempts numbered {numbers:?}",
                i.index
            ));
        }
        for a in &i.attempts {
            if matches!(a.state.as_str(), "STARTING" | "RUNNING") {
                out.push(format!(
                    "index {} attempt {} on {} still {} after the job ended",
                    i.index, a.number, a.node, a.state
                ));
            }
            if a.reason == NODE_LOST && a.node != want.crashed {
                out.push(format!(
                    "index {} attempt {} on {} marked {NODE_LOST:?}, but only {} crashed",
                    i.index, a.number, a.node, want.crashed
                ));
            }
        }
    }
    for &(index, number) in &want.running_at_crash {
        let a = job
            .indices
            .iter()
            .find(|i| i.index == index)
            .and_then(|i| i.attempts.iter().find(|a| a.number == number));
        match a {
            Some(a) if a.state == "FAILED" && a.reason == NODE_LOST && a.node == want.crashed => {}
            Some(a) => out.push(format!(
                "index {index} attempt {number}, running on {} at the crash, ended {} on {} \
                 ({:?}), expected FAILED {NODE_LOST:?}",
                want.crashed, a.state, a.node, a.reason
            )),
            None => out.push(format!(
                "index {index} attempt {number}, running on {} at the crash, is not recorded",
                want.crashed
            )),
        }
    }
    out
}

/// Reads a job and records every change of its attempts in the history.
#[derive(Debug)]
pub struct JobTracker {
    id: String,
    last: Mutex<String>,
}

impl JobTracker {
    /// Tracks job `id`.
    pub fn new(id: &str) -> Self {
        JobTracker {
            id: id.to_string(),
            last: Mutex::new(String::new()),
        }
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `job show ID --json` on node `i`; a change since the last poll is
    /// written to the history's timeline.
    pub fn poll(&self, c: &Cluster, i: usize) -> Result<JobView> {
        let job = c.job_show(i, &self.id)?;
        let render = job.render();
        let mut last = self.last.lock().unwrap();
        if *last != render {
            c.history()
                .observe_at(c.history().now(), format!("(n{i}) {render}"));
            *last = render;
        }
        Ok(job)
    }
}

impl Cluster {
    /// `job submit --json ARGS...` on node `i`, recorded in the history as
    /// `job submit ARGS`; returns the outcome and, when acknowledged, the job.
    pub fn job_submit(&self, i: usize, args: &[&str]) -> (Outcome, Option<JobView>) {
        let kind = OpKind::Other(format!("job submit {}", args.join(" ")));
        let mut submitted = None;
        let mut cmd = vec!["job", "submit", "--json"];
        cmd.extend_from_slice(args);
        let outcome = self.history().invoke(i, kind, || {
            match self.meshctl_timeout(i, &cmd, Duration::from_secs(30)) {
                Ok(o) if o.success() => match serde_json::from_str::<JobView>(&o.stdout) {
                    Ok(j) => {
                        let id = j.id.clone();
                        submitted = Some(j);
                        Outcome::Ok(Some(id))
                    }
                    Err(e) => Outcome::Info(format!("unparsable answer ({e}): {}", o.stdout)),
                },
                Ok(o) if o.timed_out => Outcome::Info(o.combined()),
                Ok(o) => Outcome::Fail(o.combined()),
                Err(e) => Outcome::Fail(format!("{e:#}")),
            }
        });
        (outcome, submitted)
    }

    /// `job show ID --json` on node `i`.
    pub fn job_show(&self, i: usize, id: &str) -> Result<JobView> {
        let out = self.meshctl_ok(i, &["job", "show", id, "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `job show --json`: {out}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(number: u32, node: &str, state: &str, reason: &str) -> AttemptView {
        AttemptView {
            number,
            node: node.into(),
            state: state.into(),
            reason: reason.into(),
            ..Default::default()
        }
    }

    fn job(indices: Vec<Vec<AttemptView>>) -> JobView {
        JobView {
            id: "j1".into(),
            state: "SUCCEEDED".into(),
            array: indices.len() as u32,
            retries: 2,
            indices: indices
                .into_iter()
                .enumerate()
                .map(|(i, attempts)| IndexView {
                    index: i as u32,
                    state: "SUCCEEDED".into(),
                    reason: String::new(),
                    attempts,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn want(running: &[(u32, u32)]) -> ExactlyOnce {
        ExactlyOnce {
            max_attempts: 3,
            crashed: "node2".into(),
            running_at_crash: running.iter().copied().collect(),
        }
    }

    #[test]
    fn a_lost_attempt_retried_elsewhere_is_fine() {
        let j = job(vec![
            vec![attempt(1, "node1", "SUCCEEDED", "")],
            vec![
                attempt(1, "node2", "FAILED", NODE_LOST),
                attempt(2, "node3", "SUCCEEDED", ""),
            ],
        ]);
        assert!(job_problems(&j, &want(&[(1, 1)])).is_empty());
        assert_eq!(j.attempts_on("node2", &["FAILED"]), [(1, 1)].into());
        assert_eq!(j.nodes_with(&["SUCCEEDED"]).len(), 2);
        assert_eq!(
            j.render(),
            "job j1 SUCCEEDED: i0[1 node1 SUCCEEDED] i1[1 node2 FAILED (node lost), 2 node3 \
             SUCCEEDED]"
        );
    }

    #[test]
    fn twice_too_many_and_wrongly_lost_are_found() {
        let j = job(vec![
            vec![
                attempt(1, "node1", "SUCCEEDED", ""),
                attempt(2, "node3", "SUCCEEDED", ""),
            ],
            vec![
                attempt(1, "node4", "FAILED", NODE_LOST),
                attempt(2, "node2", "FAILED", NODE_LOST),
                attempt(3, "node2", "FAILED", NODE_LOST),
                attempt(4, "node3", "SUCCEEDED", ""),
            ],
        ]);
        let p = job_problems(&j, &want(&[(0, 1)]));
        assert!(
            p.iter().any(|x| x.contains("index 0 is SUCCEEDED with 2")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|x| x.contains("index 1 has 4 attempts")),
            "{p:?}"
        );
        assert!(p.iter().any(|x| x.contains("on node4 marked")), "{p:?}");
        assert!(
            p.iter().any(|x| x.contains("index 0 attempt 1, running")),
            "{p:?}"
        );
        let mut unfinished = job(vec![vec![attempt(1, "node2", "RUNNING", "")]]);
        unfinished.state = "RUNNING".into();
        unfinished.indices[0].state = "RUNNING".into();
        let p = job_problems(&unfinished, &want(&[]));
        assert!(p.iter().any(|x| x.contains("not SUCCEEDED")), "{p:?}");
        assert!(p.iter().any(|x| x.contains("still RUNNING")), "{p:?}");
    }

    #[test]
    fn parses_meshctl_json() {
        let text = r#"{"id":"j1","name":"n","state":"RUNNING","array":4,"retries":2,
            "attempts":1,"counts":{"RUNNING":1},"nodes":["node1"],"cancelled":false,
            "indices":[{"index":0,"state":"RUNNING","reason":"","attempts":[{"number":1,
            "node":"node1","state":"RUNNING","started_ms":5,"ended_ms":0,"exit_code":null,
            "reason":""}]}]}"#;
        let j: JobView = serde_json::from_str(text).unwrap();
        assert_eq!(j.indices[0].attempts[0].exit_code, None);
        assert_eq!(j.attempts_on("node1", &["RUNNING"]), [(0, 1)].into());
        assert!(!j.ended());
    }
}
