//! Ambiguous request framing, caught before hyper hides it.
//!
//! hyper (1.x) accepts a request with both `Content-Length` and `Transfer-Encoding: chunked`
//! (chunked wins, the length header is dropped, and the connection closes afterwards), and a
//! request with the same `Content-Length` twice (merged into one); only differing lengths get
//! its automatic 400. Either way the handler cannot tell, because the headers it sees are
//! already cleaned up. Such requests are what request smuggling through a proxy in front of
//! the gateway is made of, so the gateway refuses them: [`Guarded`] wraps each accepted
//! connection and follows the framing of the bytes hyper reads (heads, `Content-Length`
//! bodies, chunked bodies), and marks the index of the first request whose head carries both
//! headers or more than one `Content-Length`. The HTTP service answers that request 400 with
//! `Connection: close` without reading its body.
//!
//! The scanner stops following a connection (and hyper's own checks remain) after an upgrade
//! or CONNECT request, a head it cannot parse, or a malformed chunk.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest head followed (hyper refuses longer ones with 431 anyway).
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 8 * 1024;

/// What the scanner found on one connection, shared with the HTTP service.
#[derive(Debug)]
pub struct FramingState {
    bad: AtomicU64,
}

impl Default for FramingState {
    fn default() -> Self {
        Self {
            bad: AtomicU64::new(u64::MAX),
        }
    }
}

impl FramingState {
    /// Whether the connection's request number `index` (from 0) has ambiguous framing.
    pub fn is_bad(&self, index: u64) -> bool {
        self.bad.load(Ordering::Acquire) == index
    }

    fn mark(&self, index: u64) {
        let _ = self
            .bad
            .compare_exchange(u64::MAX, index, Ordering::AcqRel, Ordering::Acquire);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Off,
}

/// The framing follower of one connection.
#[derive(Debug)]
pub struct Scanner {
    phase: Phase,
    line: Vec<u8>,
    index: u64,
}

impl Default for Scanner {
    fn default() -> Self {
        Self {
            phase: Phase::Head,
            line: Vec::new(),
            index: 0,
        }
    }
}

impl Scanner {
    /// Follows the next bytes read from the client.
    pub fn feed(&mut self, mut data: &[u8], state: &FramingState) {
        while !data.is_empty() {
            match self.phase {
                Phase::Off => return,
                Phase::Head => {
                    let mut consumed = data.len();
                    for (i, &b) in data.iter().enumerate() {
                        if self.line.is_empty() && (b == b'\r' || b == b'\n') {
                            continue; // empty lines between requests
                        }
                        self.line.push(b);
                        if self.line.ends_with(b"\r\n\r\n") || self.line.ends_with(b"\n\n") {
                            consumed = i + 1;
                            let head = std::mem::take(&mut self.line);
                            self.on_head(&head, state);
                            break;
                        }
                        if self.line.len() > MAX_HEAD {
                            self.off();
                            return;
                        }
                    }
                    data = &data[consumed..];
                }
                Phase::Body(n) | Phase::ChunkData(n) => {
                    let k = (data.len() as u64).min(n);
                    data = &data[k as usize..];
                    let left = n - k;
                    self.phase = match (self.phase, left) {
                        (Phase::Body(_), 0) => Phase::Head,
                        (Phase::Body(_), l) => Phase::Body(l),
                        (_, 0) => Phase::ChunkEnd,
                        (_, l) => Phase::ChunkData(l),
                    };
                }
                Phase::ChunkSize | Phase::ChunkEnd | Phase::Trailers => {
                    let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if self.line.len() > MAX_LINE {
                            self.off();
                        }
                        return;
                    };
                    self.line.extend_from_slice(&data[..nl]);
                    data = &data[nl + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.on_line(line);
                }
            }
        }
    }

    fn off(&mut self) {
        self.phase = Phase::Off;
        self.line = Vec::new();
    }

    fn on_line(&mut self, line: &[u8]) {
        match self.phase {
            Phase::ChunkSize => {
                let size = line.split(|&b| b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(size)
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
                self.phase = match size {
                    Some(0) => Phase::Trailers,
                    Some(n) => Phase::ChunkData(n),
                    None => Phase::Off,
                };
            }
            Phase::ChunkEnd if line.is_empty() => self.phase = Phase::ChunkSize,
            Phase::ChunkEnd => self.phase = Phase::Off,
            Phase::Trailers if line.is_empty() => self.phase = Phase::Head,
            _ => {}
        }
    }

    fn on_head(&mut self, head: &[u8], state: &FramingState) {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            self.off();
            return;
        }
        let index = self.index;
        self.index += 1;
        let mut lengths = Vec::new();
        let mut chunked = None;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if lengths.len() > 1 || (!lengths.is_empty() && chunked.is_some()) {
            state.mark(index);
            self.off();
            return;
        }
        if upgrade {
            self.off();
            return;
        }
        self.phase = match (chunked, lengths.first()) {
            (Some(true), _) => Phase::ChunkSize,
            (Some(false), _) => Phase::Off,
            (None, Some(len)) => match std::str::from_utf8(len)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                Some(0) => Phase::Head,
                Some(n) => Phase::Body(n),
                None => Phase::Off,
            },
            (None, None) => Phase::Head,
        };
    }
}

/// A connection whose incoming bytes are followed by a [`Scanner`].
pub struct Guarded<S> {
    inner: S,
    state: Arc<FramingState>,
    scanner: Scanner,
}

impl<S> Guarded<S> {
    /// Wraps `inner`; findings go to `state`.
    pub fn new(inner: S, state: Arc<FramingState>) -> Self {
        Self {
            inner,
            state,
            scanner: Scanner::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            this.scanner.feed(&buf.filled()[before..], &this.state);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of `step` and returns the index marked bad, if any.
    fn scan(bytes: &[u8], step: usize) -> Option<u64> {
        let state = FramingState::default();
        let mut s = Scanner::default();
        for piece in bytes.chunks(step) {
            s.feed(piece, &state);
        }
        let bad = state.bad.load(Ordering::Acquire);
        (bad != u64::MAX).then_some(bad)
    }

    #[test]
    fn ambiguous_framing_is_marked_at_its_index() {
        let ok = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".as_slice();
        let post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello".as_slice();
        let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n3\r\n\r\n\n\r\n0\r\nX-Trailer: y\r\n\r\n"
            .as_slice();
        let both = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\
            Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            .as_slice();
        let te_first =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n"
                .as_slice();
        let dup =
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
                .as_slice();
        for step in [1, 3, 7, 1000] {
            assert_eq!(
                scan(&[ok, post, chunked, ok].concat(), step),
                None,
                "{step}"
            );
            assert_eq!(scan(&[ok, post, chunked, both].concat(), step), Some(3));
            assert_eq!(scan(&[te_first].concat(), step), Some(0));
            assert_eq!(scan(&[post, b"\r\n", dup].concat(), step), Some(1));
            // A body that looks like a bad head is a body.
            let body = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
            let sneaky = [head.as_bytes(), body, ok].concat();
            assert_eq!(scan(&sneaky, step), None);
        }
    }

    #[test]
    fn upgrades_and_garbage_stop_the_scanner() {
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let both = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(scan(&[upgrade.as_slice(), both].concat(), 5), None);
        assert_eq!(
            scan(&[b"\x00\x01garbage\r\n\r\n".as_slice(), both].concat(), 5),
            None
        );
    }
}
