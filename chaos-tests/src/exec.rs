//! Running external commands (`ip`, `nft`, `meshctl`) with a hard time limit.
//!
//! A `meshctl` call against a paused (SIGSTOPped) node would otherwise hang
//! the test forever; every command the harness runs goes through [`run`],
//! which kills the child when its time is up and always returns what it
//! printed.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What a finished (or killed) command printed and how it ended.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The exit status; `None` when the command was killed for running too long.
    pub status: Option<ExitStatus>,
    /// Everything written to stdout, lossily decoded.
    pub stdout: String,
    /// Everything written to stderr, lossily decoded.
    pub stderr: String,
    /// True when the time limit was hit and the child was killed.
    pub timed_out: bool,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl CmdOutput {
    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Stdout and stderr together, trimmed, for error messages.
    pub fn combined(&self) -> String {
        let mut s = String::new();
        s.push_str(self.stdout.trim());
        if !self.stderr.trim().is_empty() {
            if !s.is_empty() {
                s.push_str(" | ");
            }
            s.push_str(self.stderr.trim());
        }
        if self.timed_out {
            s.push_str(" [timed out]");
        }
        s
    }
}

/// Runs `cmd` to completion or until `timeout`, feeding `stdin` if given.
///
/// Stdout and stderr are captured (the command's own settings for them are
/// replaced). A command that runs too long is killed; that is not an error,
/// see [`CmdOutput::timed_out`]. Errors are only for failing to spawn.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<CmdOutput> {
    let started = Instant::now();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        // Small inputs (nft scripts) fit the pipe buffer; write errors surface
        // as a failing command anyway.
        let _ = pipe.write_all(input);
    }
    let mut out_pipe = child.stdout.take().expect("stdout was piped");
    let mut err_pipe = child.stderr.take().expect("stderr was piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() >= timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Ok(CmdOutput {
        status,
        stdout,
        stderr,
        timed_out,
        elapsed: started.elapsed(),
    })
}

/// Runs a host tool (`ip`, `nft`, ...) and fails with its output unless it exits 0.
pub fn run_ok(program: &str, args: &[&str]) -> Result<String> {
    run_ok_stdin(program, args, None)
}

/// Like [`run_ok`], feeding `stdin` to the command.
pub fn run_ok_stdin(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String> {
    let out = run(
        Command::new(program).args(args),
        stdin,
        Duration::from_secs(30),
    )?;
    if !out.success() {
        bail!(
            "`{} {}` failed: {}",
            program,
            args.join(" "),
            out.combined()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = run(
            Command::new("sh").args(["-c", "echo hi; echo err >&2; exit 3"]),
            None,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout.trim(), "hi");
        assert_eq!(out.stderr.trim(), "err");
        assert_eq!(out.status.and_then(|s| s.code()), Some(3));
        assert!(!out.success());
    }

    #[test]
    fn kills_on_timeout() {
        let out = run(
            Command::new("sleep").arg("30"),
            None,
            Duration::from_millis(200),
        )
        .unwrap();
        assert!(out.timed_out);
        assert!(out.elapsed < Duration::from_secs(10));
    }

    #[test]
    fn feeds_stdin() {
        let out = run(
            &mut Command::new("cat"),
            Some(b"payload"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, "payload");
    }
}
