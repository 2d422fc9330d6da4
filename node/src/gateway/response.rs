//! Response size limits of routes ([`super::Route::response_limit`], 10 MiB by default).
//!
//! - **Services**: an answer whose `Content-Length` is over the limit is refused with 502
//!   before any of its body is read, and its connection to the replica is closed, not pooled
//!   ([`declared_over`], [`refuse`]). An answer without a length (chunked, or delimited by
//!   the close of the connection) streams through [`CappedBody`], which counts the bytes and
//!   fails the stream as soon as a frame would pass the limit: the client has the head
//!   already, so it sees the body end without its last chunk and the connection close (never
//!   a short body that looks complete), and the route counts a server error. Nothing is
//!   buffered beyond one frame.
//! - **Functions**: the whole answer is in memory anyway (at most
//!   [`crate::functions::runtime::MAX_STDOUT_BYTES`]); one over the route's limit gets 502.
//! - Not limited: answers to `HEAD` and answers that have no body (1xx, 204, 304), and the
//!   bytes of an upgraded (WebSocket) connection, which are a stream in both directions
//!   rather than a response.
//!
//! Every refusal and cut is logged (warn, with the route and the limit) and counted in
//! `mesh_gateway_response_too_large_total{route}`.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Response, StatusCode, header};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

/// Errors of a body stream, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed response body passed its route's limit.
#[derive(Debug, thiserror::Error)]
#[error("the response body passed this route's response limit of {limit} bytes")]
pub struct ResponseTooLarge {
    /// The limit in bytes.
    pub limit: u64,
}

/// Whether an answer to `method` with `status` has a body at all (RFC 9110 section 6.4.1).
pub fn has_body(method: &Method, status: StatusCode) -> bool {
    *method != Method::HEAD
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED
}

/// The declared `Content-Length` of an answer, if it has a body and the length is over
/// `limit`. A missing or unparsable length is left to the streaming check.
pub fn declared_over(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    limit: u64,
) -> Option<u64> {
    if !has_body(method, status) {
        return None;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| *n > limit)
}

/// Where a refused response came from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A service's replica (its declared `Content-Length`).
    Upstream,
    /// A function.
    Function,
}

/// The 502 answer for a response of `length` bytes over `limit` on `route`; logs and counts
/// it.
pub fn refuse(route: &str, source: Source, length: u64, limit: u64) -> Response<Body> {
    let what = match source {
        Source::Upstream => "the upstream response (Content-Length)",
        Source::Function => "the function's response",
    };
    tracing::warn!(route = %route, limit, length, source = ?source,
        "response over the route's response limit: answered 502");
    metrics::counter!("mesh_gateway_response_too_large_total", "route" => route.to_string())
        .increment(1);
    super::proxy::plain(
        StatusCode::BAD_GATEWAY,
        format!("{what} is {length} bytes, over this route's response limit of {limit} bytes"),
    )
}

/// Called once, when a capped body ends.
type Hook = Box<dyn FnOnce() + Send>;

/// A response body that passes frames through while their total stays within a limit, and
/// fails with [`ResponseTooLarge`] at the first data frame that would pass it (that frame
/// is not passed on).
///
/// `on_over` runs once when the limit is passed; `on_complete` runs once if the inner body
/// was read to its end (used to return a replica's connection to the pool only after a
/// whole exchange). A body dropped before its end, or cut, runs neither hook except
/// `on_over` for the cut.
pub struct CappedBody<B: HttpBody> {
    inner: B,
    limit: u64,
    seen: u64,
    ended: bool,
    failed: bool,
    on_over: Option<Hook>,
    on_complete: Option<Hook>,
}

impl<B: HttpBody> CappedBody<B> {
    /// Caps `inner` at `limit` bytes.
    pub fn new(
        inner: B,
        limit: u64,
        on_over: impl FnOnce() + Send + 'static,
        on_complete: impl FnOnce() + Send + 'static,
    ) -> Self {
        Self {
            inner,
            limit,
            seen: 0,
            ended: false,
            failed: false,
            on_over: Some(Box::new(on_over)),
            on_complete: Some(Box::new(on_complete)),
        }
    }
}

impl<B> HttpBody for CappedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.failed = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                this.seen = this.seen.saturating_add(len);
                if this.seen > this.limit {
                    this.failed = true;
                    if let Some(hook) = this.on_over.take() {
                        hook();
                    }
                    return Poll::Ready(Some(Err(Box::new(ResponseTooLarge {
                        limit: this.limit,
                    }))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for CappedBody<B>
where
    B: HttpBody,
{
    fn drop(&mut self) {
        // hyper does not poll a body that says it has ended, so its last frame may have been
        // the last poll.
        if !self.failed
            && (self.ended || self.inner.is_end_stream())
            && let Some(hook) = self.on_complete.take()
        {
            hook();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::HeaderValue;
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    fn counters() -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)))
    }

    fn capped<B: HttpBody>(
        body: B,
        limit: u64,
        over: &Arc<AtomicUsize>,
        complete: &Arc<AtomicUsize>,
    ) -> CappedBody<B> {
        let (o, c) = (over.clone(), complete.clone());
        CappedBody::new(
            body,
            limit,
            move || {
                o.fetch_add(1, Ordering::SeqCst);
            },
            move || {
                c.fetch_add(1, Ordering::SeqCst);
            },
        )
    }

    fn chunks(
        sizes: &[usize],
    ) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Unpin> {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Ok(Frame::data(Bytes::from(vec![i as u8; *n]))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_within_the_limit_passes_whole() {
        let (over, complete) = counters();
        let body = capped(chunks(&[400, 400, 200]), 1000, &over, &complete);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 1000);
        assert_eq!(&bytes[..400], &[0u8; 400][..]);
        assert_eq!(&bytes[800..], &[2u8; 200][..]);
        assert_eq!(over.load(Ordering::SeqCst), 0);
        assert_eq!(complete.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_streamed_body_is_cut_at_the_frame_that_passes_the_limit() {
        let (over, complete) = counters();
        let mut body = capped(chunks(&[400, 400, 400, 400]), 1000, &over, &complete);
        let mut passed = 0;
        let error = loop {
            match body.frame().await {
                Some(Ok(f)) => passed += f.into_data().unwrap().len(),
                Some(Err(e)) => break e,
                None => panic!("the body ended without an error"),
            }
        };
        assert_eq!(passed, 800, "the frame that passes the limit is not sent");
        assert!(error.is::<ResponseTooLarge>(), "{error}");
        assert!(error.to_string().contains("1000 bytes"), "{error}");
        assert!(body.frame().await.is_none(), "nothing after the error");
        drop(body);
        assert_eq!(over.load(Ordering::SeqCst), 1);
        assert_eq!(
            complete.load(Ordering::SeqCst),
            0,
            "a cut body is not complete"
        );
    }

    #[tokio::test]
    async fn a_body_dropped_early_is_not_complete() {
        let (over, complete) = counters();
        let mut body = capped(chunks(&[10, 10, 10]), 1000, &over, &complete);
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(complete.load(Ordering::SeqCst), 0);
        assert_eq!(over.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_body_that_reports_its_end_is_complete_without_a_last_poll() {
        // hyper stops polling once is_end_stream() is true, as it is for a full body read.
        let (over, complete) = counters();
        let mut body = capped(Full::new(Bytes::from_static(b"hello")), 5, &over, &complete);
        assert_eq!(body.size_hint().exact(), Some(5));
        body.frame().await.unwrap().unwrap();
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(complete.load(Ordering::SeqCst), 1);
        assert_eq!(over.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn declared_lengths_over_the_limit() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1001"));
        let get = Method::GET;
        assert_eq!(declared_over(&get, StatusCode::OK, &h, 1000), Some(1001));
        assert_eq!(declared_over(&get, StatusCode::OK, &h, 1001), None);
        assert_eq!(declared_over(&Method::HEAD, StatusCode::OK, &h, 10), None);
        assert_eq!(declared_over(&get, StatusCode::NOT_MODIFIED, &h, 10), None);
        assert_eq!(declared_over(&get, StatusCode::NO_CONTENT, &h, 10), None);
        assert_eq!(
            declared_over(&get, StatusCode::NOT_FOUND, &h, 10),
            Some(1001)
        );
        assert_eq!(
            declared_over(&get, StatusCode::OK, &HeaderMap::new(), 10),
            None
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("lots"));
        assert_eq!(declared_over(&get, StatusCode::OK, &h, 10), None);
    }

    #[tokio::test]
    async fn refusals_say_why() {
        let r = refuse("/web", Source::Upstream, 2000, 1000);
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        let text = r.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&text);
        assert!(
            text.contains("upstream response (Content-Length) is 2000 bytes, over this route's response limit of 1000 bytes"),
            "{text}"
        );
        let r = refuse("/f", Source::Function, 20, 10);
        let text = r.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&text).contains("function's response is 20 bytes"),
            "{text:?}"
        );
    }
}
