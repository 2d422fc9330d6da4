//! `echo`: copies the request body (stdin) to the response body (stdout).
//!
//! Also writes one line to stderr, which the node captures for the logs.

use std::io::{self, Read, Write};

fn main() -> io::Result<()> {
    let mut body = Vec::new();
    io::stdin().read_to_end(&mut body)?;
    let preview: String = String::from_utf8_lossy(&body).chars().take(80).collect();
    eprintln!("echo: {} bytes: {}", body.len(), preview.replace('\n', " "));

    let mut out = io::stdout().lock();
    out.write_all(b"Content-Type: application/octet-stream\n\n")?;
    out.write_all(&body)?;
    out.flush()
}
