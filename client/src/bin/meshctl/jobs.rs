//! `meshctl job`: batch jobs, a container image or a Wasm module run to completion, once or
//! as an array of indices, with retries, dependencies and a time limit. Flags are checked
//! before connecting, so bad input fails the same with or without a reachable node.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use meshwork_client::proto::{Job, JobAttempt, JobIndex, JobLogsRequest, SubmitJobRequest};
use meshwork_client::{
    JOB_STATES, MeshClient, human_age, human_bytes, human_cpu, join_command, now_ms,
    parse_exit_codes, parse_job_state, table,
};
use meshwork_proto::units::parse_duration;

use crate::services::{
    closed_pipe_is_fine, command_flag, cpu_flag, memory_flag, or_dash, pairs, write_stdout,
};
use crate::{open_module, parse_env, upload_module};

#[derive(Subcommand)]
pub enum JobCmd {
    /// Submit a job: an image pushed to the mesh or a Wasm module, run to completion. Prints
    /// the job's id (`ID=$(meshctl job submit ...)`).
    Submit(Box<SubmitArgs>),
    /// List jobs, newest first: ID, NAME, STATE, ATTEMPTS, NODE, AGE (and PROGRESS of array
    /// jobs).
    Ls {
        /// Only jobs in this state: SUBMITTED, PENDING, RUNNABLE, STARTING, RUNNING,
        /// SUCCEEDED or FAILED (any case).
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show a job's spec and state, and the attempts of each index.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Print the output of one index of a job (its last attempt unless --attempt).
    Logs {
        id: String,
        /// The index of an array job.
        #[arg(long, default_value_t = 0)]
        index: u32,
        /// This attempt (counting from 1) instead of the last.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        attempt: Option<u32>,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel a job: running attempts stop, and indices not finished end FAILED.
    Cancel { id: String },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["image", "wasm"])))]
pub struct SubmitArgs {
    /// The job's name.
    #[arg(long)]
    name: String,
    /// Image tag pushed with `meshctl image push`, NAME:TAG.
    #[arg(long)]
    image: Option<String>,
    /// A WASI module (.wasm) to upload and run.
    #[arg(long, value_name = "FILE")]
    wasm: Option<PathBuf>,
    /// Command, split like a shell: with --image, the argv replacing the image's
    /// entrypoint; with --wasm, the same as --args.
    #[arg(long, value_name = "STRING")]
    cmd: Option<String>,
    /// Arguments of the Wasm module after argv[0], split like a shell.
    #[arg(long, value_name = "STRING", conflicts_with_all = ["image", "cmd"])]
    args: Option<String>,
    /// CPU: cores (0.5, 1, 2.25) or thousandths of a core (250m).
    #[arg(long, default_value = "100m", allow_hyphen_values = true)]
    cpu: String,
    /// Memory limit (e.g. 512Mi).
    #[arg(long, default_value = "64Mi")]
    memory: String,
    /// Run an array job of N indices (0 to N-1), each run and retried on its own.
    #[arg(long, value_name = "N")]
    array: Option<u32>,
    /// Attempts after the first when an attempt fails.
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Retry only when an attempt exits with one of these codes, e.g. 137,143.
    #[arg(long, value_name = "CODES")]
    retry_on_exit: Option<String>,
    /// Start only once this job succeeded; repeat for several.
    #[arg(long = "depends-on", value_name = "JOB-ID")]
    depends_on: Vec<String>,
    /// Time limit (e.g. 90s, 30m, 2h); none when left out.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Environment variable K=V; repeat for several.
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Priority among waiting jobs (may be negative).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Print the submitted job as JSON instead of its id.
    #[arg(long)]
    json: bool,
}

/// Checks every flag of `job submit` and builds its request; `module` is left for the
/// upload to fill in.
fn submit_request(a: &SubmitArgs) -> anyhow::Result<SubmitJobRequest> {
    let cmd = if a.image.is_some() {
        command_flag("--cmd", a.cmd.as_deref())?
    } else {
        match (&a.cmd, &a.args) {
            (Some(t), _) => wasm_args("--cmd", t)?,
            (None, Some(t)) => wasm_args("--args", t)?,
            (None, None) => Vec::new(),
        }
    };
    if a.array == Some(0) {
        anyhow::bail!(
            "--array 0: an array job has 2 or more indices; use 2 or more, or leave it out"
        );
    }
    let retry_on_exit = match &a.retry_on_exit {
        None => Vec::new(),
        Some(t) => {
            parse_exit_codes(t).map_err(|e| anyhow::anyhow!("--retry-on-exit {t:?}: {e}"))?
        }
    };
    if !retry_on_exit.is_empty() && a.retries == 0 {
        anyhow::bail!(
            "--retry-on-exit {:?}: without --retries N (attempts after the first) nothing is retried",
            a.retry_on_exit.as_deref().unwrap_or_default()
        );
    }
    if let Some(empty) = a.depends_on.iter().find(|d| d.trim().is_empty()) {
        anyhow::bail!("--depends-on {empty:?}: expected a job id");
    }
    let timeout_ms = match &a.timeout {
        None => 0,
        Some(t) => {
            let d = parse_duration(t).with_context(|| {
                format!("--timeout {t:?}: expected a duration like 90s, 30m or 2h")
            })?;
            if d.is_zero() {
                anyhow::bail!("--timeout {t:?}: must be more than 0 (leave it out for no limit)");
            }
            d.as_millis() as u64
        }
    };
    Ok(SubmitJobRequest {
        name: a.name.clone(),
        image: a.image.clone().unwrap_or_default(),
        module: String::new(),
        cmd,
        cpu_millis: cpu_flag(&a.cpu)?,
        memory_bytes: memory_flag(&a.memory)?,
        array: a.array.unwrap_or(0),
        retries: a.retries,
        retry_on_exit,
        depends_on: a.depends_on.clone(),
        timeout_ms,
        env: parse_env(&a.env)?,
        priority: a.priority,
    })
}

/// The arguments of a Wasm module: split like a shell, none when blank.
fn wasm_args(flag: &str, text: &str) -> anyhow::Result<Vec<String>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    command_flag(flag, Some(text))
}

fn state_flag(text: &str) -> anyhow::Result<String> {
    parse_job_state(text).map_err(|e| anyhow::anyhow!("--state {text:?}: {e}"))
}

/// Runs a `meshctl job` command against the node at `endpoint`.
pub async fn job(endpoint: &str, cmd: JobCmd) -> anyhow::Result<()> {
    match cmd {
        JobCmd::Submit(args) => {
            let mut request = submit_request(&args)?;
            let module = args.wasm.as_deref().map(open_module).transpose()?;
            let mut client = MeshClient::connect(endpoint).await?;
            if let Some(file) = module {
                request.module = upload_module(&mut client, file).await?;
            }
            let j = client.submit_job(request).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&job_json(&j))?);
            } else {
                println!("{}", j.id);
            }
        }
        JobCmd::Ls { state, json } => {
            let state = state.as_deref().map(state_flag).transpose()?;
            let mut client = MeshClient::connect(endpoint).await?;
            let jobs = client.jobs(state.as_deref().unwrap_or_default()).await?;
            if json {
                let v: Vec<_> = jobs.iter().map(job_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", jobs_table(&jobs, now_ms()));
            }
        }
        JobCmd::Show { id, json } => {
            let mut client = MeshClient::connect(endpoint).await?;
            let j = client.job(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job_json(&j))?);
            } else {
                print!("{}", show_text(&j, now_ms()));
            }
        }
        JobCmd::Logs {
            id,
            index,
            attempt,
            follow,
        } => {
            let mut client = MeshClient::connect(endpoint).await?;
            let mut stream = client
                .job_logs(JobLogsRequest {
                    id,
                    index,
                    attempt: attempt.unwrap_or(0),
                    follow,
                })
                .await?;
            let result: anyhow::Result<()> = async {
                let mut current = None;
                while let Some(chunk) = stream.next().await? {
                    // Following can run into a retry: say where the new attempt's output
                    // starts, on stderr so stdout stays the job's output.
                    if current.is_some_and(|a| a != chunk.attempt) {
                        eprintln!(
                            "--- attempt {} on {} ---",
                            chunk.attempt,
                            or_dash(&chunk.node)
                        );
                    }
                    current = Some(chunk.attempt);
                    write_stdout(&chunk.data)?;
                }
                Ok(())
            }
            .await;
            closed_pipe_is_fine(result)?;
        }
        JobCmd::Cancel { id } => {
            let mut client = MeshClient::connect(endpoint).await?;
            let j = client.cancel_job(&id).await?;
            if !j.cancelled && (j.state == "SUCCEEDED" || j.state == "FAILED") {
                println!("{} had already ended: {}", j.id, j.state);
            } else {
                println!("{} cancelled", j.id);
            }
        }
    }
    Ok(())
}

fn job_json(j: &Job) -> serde_json::Value {
    let env: BTreeMap<_, _> = j.env.iter().collect();
    let counts: BTreeMap<_, _> = j.counts.iter().collect();
    let mut indices: Vec<&JobIndex> = j.indices.iter().collect();
    indices.sort_by_key(|i| i.index);
    let indices: Vec<_> = indices
        .iter()
        .map(|i| {
            let mut attempts: Vec<&JobAttempt> = i.attempts.iter().collect();
            attempts.sort_by_key(|a| a.number);
            let attempts: Vec<_> = attempts
                .iter()
                .map(|a| {
                    serde_json::json!({
                    "number": a.number, "node": a.node, "state": a.state,
                    "started_ms": a.started_ms, "ended_ms": a.ended_ms,
                    "exit_code": a.exit_code, "reason": a.reason})
                })
                .collect();
            serde_json::json!({
                "index": i.index, "state": i.state, "reason": i.reason, "attempts": attempts})
        })
        .collect();
    serde_json::json!({
        "id": j.id, "name": j.name, "image": j.image, "module": j.module, "cmd": j.cmd,
        "cpu_millis": j.cpu_millis, "memory_bytes": j.memory_bytes, "array": j.array,
        "retries": j.retries, "retry_on_exit": j.retry_on_exit, "depends_on": j.depends_on,
        "timeout_ms": j.timeout_ms, "env": env, "priority": j.priority,
        "submitted_ms": j.submitted_ms, "state": j.state, "reason": j.reason,
        "counts": counts, "attempts": j.attempts, "nodes": j.nodes,
        "cancelled": j.cancelled, "indices": indices,
    })
}

/// `succeeded/total` of an array job, `-` for a single job.
fn progress(j: &Job) -> String {
    if j.array > 1 {
        let done = j.counts.get("SUCCEEDED").copied().unwrap_or(0);
        format!("{done}/{}", j.array)
    } else {
        "-".into()
    }
}

fn jobs_table(jobs: &[Job], now: u64) -> String {
    let arrays = jobs.iter().any(|j| j.array > 1);
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let mut row = vec![
                j.id.clone(),
                or_dash(&j.name),
                or_dash(&j.state),
                j.attempts.to_string(),
                or_dash(&j.nodes.join(",")),
                human_age(j.submitted_ms, now),
            ];
            if arrays {
                row.push(progress(j));
            }
            row
        })
        .collect();
    let mut header = vec!["ID", "NAME", "STATE", "ATTEMPTS", "NODE", "AGE"];
    if arrays {
        header.push("PROGRESS");
    }
    table(&header, &rows)
}

/// How many indices are in each state, in the order states go through: `18 succeeded, 2
/// running`.
fn counts_text(j: &Job) -> String {
    let rank = |s: &str| {
        JOB_STATES
            .iter()
            .position(|k| *k == s)
            .unwrap_or(JOB_STATES.len())
    };
    let mut counts: Vec<(&String, &u32)> = j.counts.iter().filter(|(_, n)| **n > 0).collect();
    counts.sort_by(|a, b| rank(a.0).cmp(&rank(b.0)).then(a.0.cmp(b.0)));
    let parts: Vec<String> = counts
        .iter()
        .map(|(s, n)| format!("{n} {}", s.to_lowercase()))
        .collect();
    parts.join(", ")
}

/// A time limit the way `--timeout` takes it: `2h`, `90m`, `45s`, `1500ms`.
fn duration_text(ms: u64) -> String {
    if ms == 0 {
        "-".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn show_text(j: &Job, now: u64) -> String {
    let mut lines = vec![("id", j.id.clone()), ("name", or_dash(&j.name))];
    if j.module.is_empty() {
        lines.push(("image", or_dash(&j.image)));
    } else {
        lines.push(("module", j.module.clone()));
    }
    lines.push((
        "cmd",
        match (j.cmd.is_empty(), j.module.is_empty()) {
            (false, _) => join_command(&j.cmd),
            (true, true) => "- (the image's)".into(),
            (true, false) => "-".into(),
        },
    ));
    let state = if j.cancelled {
        format!("{} (cancelled)", or_dash(&j.state))
    } else {
        or_dash(&j.state)
    };
    lines.push(("state", state));
    lines.push(("reason", or_dash(&j.reason)));
    lines.push((
        "array",
        if j.array > 1 {
            let counts = counts_text(j);
            if counts.is_empty() {
                format!("{} indices", j.array)
            } else {
                format!("{} indices: {counts}", j.array)
            }
        } else {
            "-".into()
        },
    ));
    lines.push(("retries", j.retries.to_string()));
    lines.push((
        "retry-on-exit",
        if j.retry_on_exit.is_empty() {
            "- (any failure)".into()
        } else {
            let codes: Vec<String> = j.retry_on_exit.iter().map(i32::to_string).collect();
            codes.join(",")
        },
    ));
    lines.push(("depends-on", or_dash(&j.depends_on.join(","))));
    lines.push(("timeout", duration_text(j.timeout_ms)));
    lines.push(("cpu", human_cpu(j.cpu_millis)));
    lines.push(("memory", human_bytes(j.memory_bytes)));
    lines.push(("env", pairs(&j.env)));
    lines.push(("priority", j.priority.to_string()));
    lines.push((
        "submitted",
        if j.submitted_ms == 0 {
            "-".into()
        } else {
            format!("{} ago", human_age(j.submitted_ms, now))
        },
    ));
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    let mut out: String = lines
        .iter()
        .map(|(k, v)| format!("{k:<width$}{v}\n"))
        .collect();

    let mut indices: Vec<&JobIndex> = j.indices.iter().collect();
    indices.sort_by_key(|i| i.index);
    for i in indices {
        out.push('\n');
        if j.array > 1 {
            out.push_str(&format!("index {}  {}", i.index, or_dash(&i.state)));
            if !i.reason.is_empty() {
                out.push_str(&format!(" ({})", i.reason));
            }
            out.push('\n');
        }
        out.push_str(&attempts_table(&i.attempts, now));
    }
    out
}

fn attempts_table(attempts: &[JobAttempt], now: u64) -> String {
    if attempts.is_empty() {
        return "no attempts yet\n".into();
    }
    let mut attempts: Vec<&JobAttempt> = attempts.iter().collect();
    attempts.sort_by_key(|a| a.number);
    let rows: Vec<Vec<String>> = attempts
        .iter()
        .map(|a| {
            vec![
                a.number.to_string(),
                or_dash(&a.node),
                or_dash(&a.state),
                human_age(a.started_ms, now),
                human_age(a.ended_ms, now),
                a.exit_code.map_or("-".into(), |c| c.to_string()),
                or_dash(&a.reason),
            ]
        })
        .collect();
    table(
        &["ATTEMPT", "NODE", "STATE", "START", "END", "EXIT", "REASON"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        job: JobCmd,
    }

    fn submit(args: &[&str]) -> anyhow::Result<SubmitJobRequest> {
        let argv = ["job", "submit", "--name", "render"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().job {
            JobCmd::Submit(a) => submit_request(&a),
            _ => unreachable!(),
        }
    }

    fn submit_err(args: &[&str]) -> String {
        format!("{:#}", submit(args).unwrap_err())
    }

    #[test]
    fn submit_flags_make_the_request() {
        let r = submit(&[
            "--image",
            "app:1.0",
            "--cmd",
            "render --frame '$MESH_JOB_INDEX'",
            "--cpu",
            "1",
            "--memory",
            "512Mi",
            "--array",
            "100",
            "--retries",
            "3",
            "--retry-on-exit",
            "137,143",
            "--depends-on",
            "j-1",
            "--depends-on",
            "j-2",
            "--timeout",
            "2h",
            "--env",
            "A=1",
            "--priority",
            "-5",
        ])
        .unwrap();
        assert_eq!(r.name, "render");
        assert_eq!(r.image, "app:1.0");
        assert_eq!(r.module, "");
        assert_eq!(r.cmd, ["render", "--frame", "$MESH_JOB_INDEX"]);
        assert_eq!((r.cpu_millis, r.memory_bytes), (1000, 512 << 20));
        assert_eq!((r.array, r.retries), (100, 3));
        assert_eq!(r.retry_on_exit, [137, 143]);
        assert_eq!(r.depends_on, ["j-1", "j-2"]);
        assert_eq!(r.timeout_ms, 2 * 3_600_000);
        assert_eq!(r.env["A"], "1");
        assert_eq!(r.priority, -5);

        // Defaults: a single job of 100m and 64Mi, no limit, no retries.
        let r = submit(&["--image", "app:1.0"]).unwrap();
        assert_eq!((r.cpu_millis, r.memory_bytes), (100, 64 << 20));
        assert_eq!((r.array, r.retries, r.timeout_ms, r.priority), (0, 0, 0, 0));
        assert!(r.cmd.is_empty() && r.retry_on_exit.is_empty());

        // Wasm: --args and --cmd are the arguments after argv[0].
        for flag in ["--args", "--cmd"] {
            let r = submit(&["--wasm", "t.wasm", flag, "1000000 'a b'"]).unwrap();
            assert_eq!(r.cmd, ["1000000", "a b"], "{flag}");
            assert_eq!(r.image, "");
            let r = submit(&["--wasm", "t.wasm", flag, ""]).unwrap();
            assert!(r.cmd.is_empty(), "{flag}");
        }
    }

    #[test]
    fn submit_flags_are_checked() {
        assert!(submit_err(&["--image", "a:1", "--array", "0"]).contains(
            "--array 0: an array job has 2 or more indices; use 2 or more, or leave it out"
        ));
        assert!(
            submit_err(&[
                "--image",
                "a:1",
                "--retries",
                "1",
                "--retry-on-exit",
                "137,x"
            ])
            .starts_with("--retry-on-exit \"137,x\": \"x\" is not an exit code")
        );
        assert!(
            submit_err(&["--image", "a:1", "--retries", "1", "--retry-on-exit", "256"])
                .contains("0 to 255")
        );
        assert!(
            submit_err(&["--image", "a:1", "--retry-on-exit", "137"]).contains("without --retries")
        );
        assert!(
            submit_err(&["--image", "a:1", "--timeout", "2w"])
                .starts_with("--timeout \"2w\": expected a duration")
        );
        assert!(submit_err(&["--image", "a:1", "--timeout", "0s"]).contains("more than 0"));
        assert!(submit_err(&["--image", "a:1", "--cpu", "0"]).starts_with("--cpu \"0\""));
        assert!(submit_err(&["--image", "a:1", "--memory", "x"]).starts_with("--memory \"x\""));
        assert!(submit_err(&["--image", "a:1", "--env", "1X=a"]).starts_with("--env \"1X=a\""));
        assert!(
            submit_err(&["--image", "a:1", "--cmd", "sh -c 'x"])
                .starts_with("--cmd \"sh -c 'x\": an unbalanced quote")
        );
        assert!(submit_err(&["--image", "a:1", "--cmd", " "]).contains("empty"));
        assert!(
            submit_err(&["--wasm", "t.wasm", "--args", "\"x"])
                .starts_with("--args \"\\\"x\": an unbalanced quote")
        );
        assert!(submit_err(&["--image", "a:1", "--depends-on", ""]).starts_with("--depends-on"));

        // Usage errors are clap's.
        for args in [
            &["job", "submit", "--name", "r"][..],
            &[
                "job", "submit", "--name", "r", "--image", "a:1", "--wasm", "t.wasm",
            ],
            &[
                "job", "submit", "--name", "r", "--image", "a:1", "--args", "1",
            ],
            &[
                "job", "submit", "--name", "r", "--wasm", "t.wasm", "--args", "1", "--cmd", "2",
            ],
            &["job", "submit", "--image", "a:1"],
            &["job", "logs", "j-1", "--attempt", "0"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn state_flags() {
        assert_eq!(state_flag("running").unwrap(), "RUNNING");
        let e = state_flag("done").unwrap_err().to_string();
        assert!(
            e.starts_with("--state \"done\": expected one of SUBMITTED"),
            "{e}"
        );
    }

    fn job() -> Job {
        Job {
            id: "j-7".into(),
            name: "render".into(),
            image: "app:1.0".into(),
            cmd: vec!["render".into(), "--frame".into(), "$MESH_JOB_INDEX".into()],
            cpu_millis: 1000,
            memory_bytes: 512 << 20,
            array: 20,
            retries: 3,
            retry_on_exit: vec![137, 143],
            depends_on: vec!["j-5".into()],
            timeout_ms: 2 * 3_600_000,
            submitted_ms: 1_000,
            state: "RUNNING".into(),
            counts: [("RUNNING".to_string(), 2), ("SUCCEEDED".to_string(), 18)].into(),
            attempts: 21,
            nodes: vec!["alpha".into(), "beta".into()],
            indices: vec![
                JobIndex {
                    index: 1,
                    state: "RUNNING".into(),
                    attempts: vec![
                        JobAttempt {
                            number: 2,
                            node: "beta".into(),
                            state: "RUNNING".into(),
                            started_ms: 121_000,
                            ..Default::default()
                        },
                        JobAttempt {
                            number: 1,
                            node: "alpha".into(),
                            state: "FAILED".into(),
                            started_ms: 61_000,
                            ended_ms: 111_000,
                            exit_code: Some(137),
                            reason: "killed".into(),
                        },
                    ],
                    ..Default::default()
                },
                JobIndex {
                    index: 0,
                    state: "PENDING".into(),
                    reason: "no node has 1 CPU free".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn the_progress_column_shows_only_for_arrays() {
        let single = Job {
            id: "j-1".into(),
            name: "once".into(),
            state: "SUCCEEDED".into(),
            attempts: 1,
            array: 0,
            submitted_ms: 1_000,
            ..Default::default()
        };
        let t = jobs_table(std::slice::from_ref(&single), 181_000);
        assert_eq!(
            t,
            "ID   NAME  STATE      ATTEMPTS  NODE  AGE\nj-1  once  SUCCEEDED  1         -     3m\n"
        );
        let t = jobs_table(&[job(), single], 181_000);
        let mut lines = t.lines();
        assert_eq!(
            lines.next().unwrap(),
            "ID   NAME    STATE      ATTEMPTS  NODE        AGE  PROGRESS"
        );
        assert_eq!(
            lines.next().unwrap(),
            "j-7  render  RUNNING    21        alpha,beta  3m   18/20"
        );
        assert!(lines.next().unwrap().ends_with("3m   -"), "{t}");
    }

    #[test]
    fn show_is_readable() {
        let t = show_text(&job(), 181_000);
        for line in [
            "id             j-7\n",
            "image          app:1.0\n",
            "cmd            render --frame '$MESH_JOB_INDEX'\n",
            "state          RUNNING\n",
            "reason         -\n",
            "array          20 indices: 2 running, 18 succeeded\n",
            "retries        3\n",
            "retry-on-exit  137,143\n",
            "depends-on     j-5\n",
            "timeout        2h\n",
            "cpu            1\n",
            "memory         512Mi\n",
            "submitted      3m ago\n",
            // Indices in order, attempts in order.
            "\nindex 0  PENDING (no node has 1 CPU free)\nno attempts yet\n\nindex 1  RUNNING\n",
            "ATTEMPT  NODE   STATE    START  END  EXIT  REASON\n\
             1        alpha  FAILED   2m     1m   137   killed\n\
             2        beta   RUNNING  1m     -    -     -\n",
        ] {
            assert!(t.contains(line), "{line:?} in\n{t}");
        }

        // A single Wasm job: no index lines, the attempts straight after the header.
        let j = Job {
            image: String::new(),
            module: "ab".repeat(32),
            cmd: vec![],
            array: 0,
            cancelled: true,
            state: "FAILED".into(),
            reason: "cancelled".into(),
            retry_on_exit: vec![],
            indices: vec![JobIndex {
                attempts: vec![JobAttempt {
                    number: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..job()
        };
        let t = show_text(&j, 181_000);
        assert!(
            t.contains(&format!("module         {}\n", "ab".repeat(32))),
            "{t}"
        );
        assert!(t.contains("cmd            -\n"), "{t}");
        assert!(t.contains("state          FAILED (cancelled)\n"), "{t}");
        assert!(t.contains("retry-on-exit  - (any failure)\n"), "{t}");
        assert!(!t.contains("index"), "{t}");
        assert!(t.ends_with("\n\nATTEMPT  NODE  STATE  START  END  EXIT  REASON\n1        -     -      -      -    -     -\n"), "{t}");
    }

    #[test]
    fn json_has_every_attempt_in_order() {
        let v = job_json(&job());
        assert_eq!(v["id"], "j-7");
        assert_eq!(v["counts"]["SUCCEEDED"], 18);
        assert_eq!(v["indices"][0]["index"], 0);
        assert_eq!(v["indices"][1]["attempts"][0]["number"], 1);
        assert_eq!(v["indices"][1]["attempts"][0]["exit_code"], 137);
        assert!(v["indices"][1]["attempts"][1]["exit_code"].is_null());
        assert_eq!(v["retry_on_exit"], serde_json::json!([137, 143]));
    }

    #[test]
    fn durations_read_like_the_flag() {
        assert_eq!(duration_text(0), "-");
        assert_eq!(duration_text(2 * 3_600_000), "2h");
        assert_eq!(duration_text(90 * 60_000), "90m");
        assert_eq!(duration_text(45_000), "45s");
        assert_eq!(duration_text(1_500), "1500ms");
        for ms in [7_200_000, 5_400_000, 45_000, 1_500] {
            let back = parse_duration(&duration_text(ms)).unwrap();
            assert_eq!(back.as_millis() as u64, ms);
        }
    }
}
