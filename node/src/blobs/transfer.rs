//! Peer-to-peer blob transfer, verified piece by piece.
//!
//! A blob stream is a direct connection where the other node takes them (TLS over TCP, admitted
//! by the cluster secret and bound to its libp2p identity: see [`super::direct`], which also
//! says why) and a libp2p stream of protocol `/meshwork/blobs/2` otherwise, on a connection that
//! passed admission; either way pieces are only ever served to peers that hold the cluster
//! secret, and [`BlobDialer`] picks. On one stream the puller sends requests,
//! each a `u32` length and a postcard [`BlobRequest`]; the server answers each in order:
//!
//! - `List(blob)`: status byte, `u32` length, the blob's [`ChunkList`] encoding;
//! - `Chunks { blob, chunks: [h..] }` (at most [`MAX_CHUNKS_PER_REQUEST`]): for each, status
//!   byte, `u32` length, the chunk's bytes (or nothing, with status `MISSING`, or `ELSEWHERE`:
//!   see below);
//! - `Have(blob)`: status byte, `u32` length, a bitmap of the chunks of the blob this node has
//!   (all ones for a complete blob; the progress of a pull in flight otherwise).
//!
//! Pulls share: a node that is pulling a blob serves the chunks it already has, and pullers
//! find each other through `pulling/` records in the replicated state. A puller takes from its
//! fellow pullers every chunk they have, and from the complete holders (the seeders of last
//! resort) preferably the chunks no fellow puller has yet; each puller walks the blob in its own
//! random order, so that concurrent pullers fetch different chunks from the seeders and then
//! trade them. And a complete holder gives each chunk to one puller at a time: asked for a chunk
//! it gave another puller less than [`SEED_MEMORY`] ago, it answers `ELSEWHERE` (a
//! [`SeedLedger`] decides), and the puller leaves that chunk to its fellow pullers for a moment
//! before asking a holder again. This is what keeps the upload of the first holder near one
//! copy when many nodes pull the same image at once (BitTorrent calls it super-seeding).
//!
//! The puller ([`fetch`]) checks the list against the `chunks_hash` recorded in the replicated
//! state and every chunk against its hash before writing it, so a lying holder is caught at
//! the first bad piece: the piece goes back to the queue and the holder is dropped from this
//! pull. Pieces come from several holders at once (one worker per holder, a shared queue);
//! a holder that dies mid-transfer loses its in-flight pieces to the others. Chunks already
//! in the store are not fetched again, so an interrupted pull resumes where it stopped.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use super::direct::DirectTls;
use super::store::{
    BlobInfo, BlobStore, ChainingValue, ChunkBuf, ChunkList, Hash, StoreError, chunk_cv,
};

/// The stream protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshwork/blobs/2");
/// How long a pull waits for a blob's records (its meta, its holders) to arrive before it
/// fails: gossip has no order across keys, so an image can be known before its blobs are.
pub const HOLDERS_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// Most chunks asked for in one request.
pub const MAX_CHUNKS_PER_REQUEST: usize = 8;
const MAX_REQUEST_BYTES: u32 = 64 * 1024;
const MAX_LIST_BYTES: u32 = 16 << 20;
const OK: u8 = 0;
const MISSING: u8 = 1;
const ELSEWHERE: u8 = 2;
/// How long a complete holder remembers which puller it gave a chunk to. Within this window
/// another puller asking for the same chunk is told to get it from its fellow pullers; after it
/// the chunk is served again, so a puller that died with the only copy delays the others by at
/// most this long.
pub const SEED_MEMORY: Duration = Duration::from_secs(4);
/// How long a puller leaves a chunk that a holder sent elsewhere to its fellow pullers before
/// asking a holder for it again.
const ELSEWHERE_BACKOFF: Duration = Duration::from_millis(250);
/// How long a chunk stays in flight with one worker before idle workers ask for it too.
const ENDGAME_AFTER: Duration = Duration::from_secs(3);
/// Ledger size above which entries older than [`SEED_MEMORY`] are dropped.
const LEDGER_PRUNE_AT: usize = 4096;

/// Which puller a complete holder last gave each chunk to: the state of "give each chunk to one
/// puller at a time", kept apart from the streams that consult it.
#[derive(Debug, Default)]
pub struct SeedLedger {
    given: HashMap<Hash, (PeerId, Instant)>,
}

impl SeedLedger {
    /// Whether `peer` may have `chunk` from this holder at `now`, recording it if so. False when
    /// another peer was given the chunk less than [`SEED_MEMORY`] ago and is still pulling
    /// (`complete` says whether a peer now holds the whole blob: then it is a holder the asker
    /// will use anyway, and this holder serves too). The same peer asking again, say after a
    /// lost stream, always gets it.
    pub fn grant(
        &mut self,
        chunk: Hash,
        peer: PeerId,
        now: Instant,
        complete: impl Fn(&PeerId) -> bool,
    ) -> bool {
        if let Some((other, at)) = self.given.get(&chunk)
            && *other != peer
            && now.saturating_duration_since(*at) < SEED_MEMORY
            && !complete(other)
        {
            return false;
        }
        self.given.insert(chunk, (peer, now));
        if self.given.len() > LEDGER_PRUNE_AT {
            self.given
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < SEED_MEMORY);
        }
        true
    }
}

/// A request on a blob stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BlobRequest {
    /// The chunk list of a blob.
    List(Hash),
    /// Some chunks of a blob: a node holding the whole blob gives each chunk to one puller
    /// at a time (see [`SeedLedger`]).
    Chunks {
        /// The blob they belong to.
        blob: Hash,
        /// The chunks wanted.
        chunks: Vec<Hash>,
    },
    /// Which chunks of a blob this node has.
    Have(Hash),
}

/// How the server misbehaves, for tests of the puller's defences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeMode {
    /// Serve what is stored.
    Honest,
    /// Flip a byte in every chunk served.
    CorruptPieces,
}

/// Whether a node holds the whole of a blob, according to the replicated state.
pub type Holds = Arc<dyn Fn(&Hash, &PeerId) -> bool + Send + Sync>;

/// Serves blob streams from `store` until `shutdown` turns true: those opened over libp2p, and
/// those that come as direct connections on `direct`'s listener once they passed its admission
/// (see [`super::direct`]). `holds` tells which peers have finished pulling a blob (see
/// [`SeedLedger::grant`]).
pub async fn serve(
    mut control: libp2p_stream::Control,
    direct: Option<(tokio::net::TcpListener, Arc<DirectTls>)>,
    store: Arc<BlobStore>,
    holds: Holds,
    mode: ServeMode,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut incoming = match control.accept(PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept blob streams");
            return;
        }
    };
    let ledger = Arc::new(Mutex::new(SeedLedger::default()));
    let serving = Serving {
        store,
        ledger,
        holds,
        mode,
    };
    let mut accepting = tokio::task::JoinSet::new();
    if let Some((listener, tls)) = direct {
        accepting.spawn(serve_direct(
            listener,
            tls,
            serving.clone(),
            shutdown.clone(),
        ));
    }
    loop {
        let next = tokio::select! {
            next = incoming.next() => next,
            _ = shutdown.changed() => None,
        };
        let Some((peer, stream)) = next else { break };
        tokio::spawn(serving.clone().stream(peer, stream));
    }
    accepting.shutdown().await;
}

/// What serving a blob stream needs, whatever carries it.
#[derive(Clone)]
struct Serving {
    store: Arc<BlobStore>,
    ledger: Arc<Mutex<SeedLedger>>,
    holds: Holds,
    mode: ServeMode,
}

impl Serving {
    async fn stream(
        self,
        peer: PeerId,
        stream: impl futures::AsyncRead + futures::AsyncWrite + Unpin,
    ) {
        if let Err(e) =
            serve_stream(peer, stream, self.store, self.ledger, self.holds, self.mode).await
        {
            tracing::debug!(%peer, error = %e, "blob stream ended");
        }
    }
}

/// Direct connections that may be in their handshake at once; more are closed at once, so a
/// flood of connections that never prove anything costs a bounded amount.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// Accepts direct blob connections until `shutdown`; each serves blob requests once the peer
/// proved the cluster secret and its identity.
async fn serve_direct(
    listener: tokio::net::TcpListener,
    tls: Arc<DirectTls>,
    serving: Serving,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                tracing::warn!(error = %e, "cannot accept a direct blob connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(handshake) = pending.clone().try_acquire_owned() else {
            metrics::counter!("mesh_blob_direct_refused_total", "reason" => "busy").increment(1);
            tracing::warn!(%addr, "too many direct blob connections in their handshake; closed");
            continue;
        };
        let tls = tls.clone();
        let serving = serving.clone();
        tokio::spawn(async move {
            let admitted = tls.accept(tcp, addr).await;
            drop(handshake);
            match admitted {
                Ok((peer, stream)) => serving.stream(peer, stream).await,
                Err(e) => {
                    metrics::counter!("mesh_blob_direct_refused_total", "reason" => e.reason())
                        .increment(1);
                    tracing::warn!(%addr, error = %e, "direct blob connection not admitted");
                }
            }
        });
    }
}

async fn serve_stream(
    peer: PeerId,
    mut stream: impl futures::AsyncRead + futures::AsyncWrite + Unpin,
    store: Arc<BlobStore>,
    ledger: Arc<Mutex<SeedLedger>>,
    holds: Holds,
    mode: ServeMode,
) -> std::io::Result<()> {
    loop {
        match tokio::time::timeout(
            SERVE_STEP_TIMEOUT,
            serve_request(peer, &mut stream, &store, &ledger, &holds, mode),
        )
        .await
        {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request, or an answer not taken, within 2 minutes",
                ));
            }
        }
    }
}

/// How long a served stream may wait for its next request, or for the puller to take an
/// answer. A puller that died or was cut off is not noticed otherwise on a direct connection
/// (libp2p closes the connection of a dead member; TCP keeps a silent one open).
const SERVE_STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Reads one request and answers it; false at the end of the stream.
async fn serve_request(
    peer: PeerId,
    stream: &mut (impl futures::AsyncRead + futures::AsyncWrite + Unpin),
    store: &Arc<BlobStore>,
    ledger: &Mutex<SeedLedger>,
    holds: &Holds,
    mode: ServeMode,
) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_REQUEST_BYTES {
        metrics::counter!("mesh_bad_messages_total", "reason" => "blob-request").increment(1);
        return Err(std::io::Error::other("oversized blob request"));
    }
    let mut buf = vec![0u8; len as usize];
    stream.read_exact(&mut buf).await?;
    let Ok(request) = postcard::from_bytes::<BlobRequest>(&buf) else {
        metrics::counter!("mesh_bad_messages_total", "reason" => "blob-request").increment(1);
        return Err(std::io::Error::other("malformed blob request"));
    };
    match request {
        BlobRequest::List(h) => {
            let s = store.clone();
            let list = tokio::task::spawn_blocking(move || s.any_list(&h))
                .await
                .map_err(std::io::Error::other)?;
            match list {
                Some(l) => write_frame(stream, OK, &l.encode()).await?,
                None => write_frame(stream, MISSING, &[]).await?,
            }
        }
        BlobRequest::Have(h) => {
            let s = store.clone();
            let bitmap = tokio::task::spawn_blocking(move || {
                let complete = s.has(&h);
                s.any_list(&h).map(|l| {
                    let mut bits = vec![0u8; l.chunks.len().div_ceil(8)];
                    for (i, c) in l.chunks.iter().enumerate() {
                        if complete || s.has_chunk(c) {
                            bits[i / 8] |= 1 << (i % 8);
                        }
                    }
                    bits
                })
            })
            .await
            .map_err(std::io::Error::other)?;
            match bitmap {
                Some(b) => write_frame(stream, OK, &b).await?,
                None => write_frame(stream, MISSING, &[]).await?,
            }
        }
        BlobRequest::Chunks { blob, chunks } => {
            if chunks.len() > MAX_CHUNKS_PER_REQUEST {
                return Err(std::io::Error::other("too many chunks in one request"));
            }
            // Only a complete holder seeds; a fellow puller trades whatever it has.
            let seeding = store.has(&blob);
            for h in chunks {
                if seeding
                    && !ledger.lock().expect("ledger lock").grant(
                        h,
                        peer,
                        Instant::now(),
                        |other| holds(&blob, other),
                    )
                {
                    write_frame(stream, ELSEWHERE, &[]).await?;
                    continue;
                }
                let s = store.clone();
                let bytes = tokio::task::spawn_blocking(move || s.read_chunk(&h))
                    .await
                    .map_err(std::io::Error::other)?;
                match bytes {
                    Ok(mut b) => {
                        if mode == ServeMode::CorruptPieces && !b.is_empty() {
                            b[0] ^= 0xff;
                        }
                        metrics::counter!("mesh_blob_bytes_served_total").increment(b.len() as u64);
                        write_frame(stream, OK, &b).await?
                    }
                    Err(_) => write_frame(stream, MISSING, &[]).await?,
                }
            }
        }
    }
    stream.flush().await?;
    Ok(true)
}

async fn write_frame(
    stream: &mut (impl futures::AsyncWrite + Unpin),
    status: u8,
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = status;
    head[1..].copy_from_slice(&(body.len() as u32).to_le_bytes());
    stream.write_all(&head).await?;
    stream.write_all(body).await
}

/// A blob stream, whatever carries it: a libp2p stream or a direct connection.
pub trait BlobStream: futures::AsyncRead + futures::AsyncWrite + Unpin + Send {}

impl<T: futures::AsyncRead + futures::AsyncWrite + Unpin + Send> BlobStream for T {}

/// Where a peer takes direct blob connections, as its heartbeat says (none if it takes none).
pub type DirectAddrs = Arc<dyn Fn(&PeerId) -> Vec<SocketAddr> + Send + Sync>;

/// Whether the membership has declared a peer dead.
pub type IsDead = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

/// How often an exchange in flight looks whether its peer was declared dead.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);

/// After a direct connection to a peer failed, how long its streams go over libp2p without
/// trying again (a firewall that drops the blob port would otherwise cost every stream a
/// connect timeout).
const DIRECT_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Opens blob streams to peers: a direct connection (see [`super::direct`]) where the peer
/// takes them, else, or if that fails, a libp2p stream.
#[derive(Clone)]
pub struct BlobDialer {
    control: libp2p_stream::Control,
    direct: Option<(Arc<DirectTls>, DirectAddrs)>,
    dead: IsDead,
    /// Peers whose direct connection failed, with when to try one again.
    direct_failed: Arc<Mutex<HashMap<PeerId, Instant>>>,
}

impl BlobDialer {
    /// A dialer over `control`, trying direct connections first when `direct` is given; `dead`
    /// tells when to give up on a peer's streams (see [`BlobDialer::while_alive`]).
    pub fn new(
        control: libp2p_stream::Control,
        direct: Option<(Arc<DirectTls>, DirectAddrs)>,
        dead: IsDead,
    ) -> Self {
        Self {
            control,
            direct,
            dead,
            direct_failed: Default::default(),
        }
    }

    /// Runs one exchange with `peer`, failing it as soon as the membership declares the peer
    /// dead. libp2p closes its connection to a dead member, which fails its streams at once;
    /// a direct connection to a node that was paused or cut off would otherwise wait out
    /// [`FRAME_TIMEOUT`] before its pieces went to other holders.
    async fn while_alive<T>(
        &self,
        peer: PeerId,
        exchange: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> std::io::Result<T> {
        tokio::pin!(exchange);
        let mut check = tokio::time::interval(LIVENESS_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                done = &mut exchange => return done,
                _ = check.tick() => {
                    if (self.dead)(&peer) {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the node was declared dead",
                        ));
                    }
                }
            }
        }
    }

    /// Opens a blob stream to `peer`. Direct connections to each of its addresses are tried at
    /// once (a node on several networks lists addresses this one cannot reach) and the first to
    /// pass admission is taken.
    pub async fn open(&self, peer: PeerId) -> std::io::Result<Box<dyn BlobStream>> {
        let failed_lately = {
            let mut failed = self.direct_failed.lock().expect("direct_failed lock");
            let now = Instant::now();
            failed.retain(|_, until| *until > now);
            failed.contains_key(&peer)
        };
        if let Some((tls, addrs)) = self.direct.as_ref().filter(|_| !failed_lately) {
            let tries: Vec<_> = addrs(&peer)
                .into_iter()
                .map(|addr| Box::pin(tls.connect(addr, peer)))
                .collect();
            if !tries.is_empty() {
                match futures::future::select_ok(tries).await {
                    Ok((stream, _)) => {
                        metrics::counter!("mesh_blob_streams_opened_total", "via" => "direct")
                            .increment(1);
                        return Ok(Box::new(stream));
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e,
                            "no direct blob connection; using libp2p streams for a minute");
                        self.direct_failed
                            .lock()
                            .expect("direct_failed lock")
                            .insert(peer, Instant::now() + DIRECT_RETRY_AFTER);
                    }
                }
            }
        }
        let mut control = self.control.clone();
        let stream = tokio::time::timeout(FRAME_TIMEOUT, control.open_stream(peer, PROTOCOL))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "opening a stream timed out")
            })?
            .map_err(std::io::Error::other)?;
        metrics::counter!("mesh_blob_streams_opened_total", "via" => "libp2p").increment(1);
        Ok(Box::new(stream))
    }
}

/// Streams a pull opens to each complete holder (a fellow puller gets one). Each has one
/// request of up to [`MAX_CHUNKS_PER_REQUEST`] chunks out and stores what arrives; 4 rather
/// than 2 kept both cores busier in bench/pull part (a): 0.73-0.78 s against 0.81-1.11 s for
/// 512 MiB in three runs each, with part (b)'s upload from the first holder unchanged.
const WORKERS_PER_HOLDER: usize = 4;

/// How long one answer may take to arrive. A holder that stays a member but stops answering
/// loses its pieces to the others after this; a holder that dies loses them when it is
/// declared dead and its connections are closed, which is sooner.
const FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One answer frame.
enum Answer {
    /// The bytes asked for.
    Bytes(Vec<u8>),
    /// The node does not have it.
    Missing,
    /// A holder gave this chunk to another puller a moment ago: ask a fellow puller.
    Elsewhere,
}

impl Answer {
    /// The bytes, if the node had them.
    fn bytes(self) -> Option<Vec<u8>> {
        match self {
            Answer::Bytes(b) => Some(b),
            Answer::Missing | Answer::Elsewhere => None,
        }
    }
}

/// Runs one exchange on a stream; `what` failed with `TimedOut` if it took over
/// [`FRAME_TIMEOUT`].
async fn within_frame_timeout<T>(
    what: &str,
    exchange: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(FRAME_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{what}: nothing within 30 s"),
            ))
        })
}

async fn read_frame(
    stream: &mut (impl futures::AsyncRead + Unpin),
    max: u32,
) -> std::io::Result<Answer> {
    within_frame_timeout("answer", async {
        let (status, len) = read_head(stream, max).await?;
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        Ok(match status {
            OK => Answer::Bytes(body),
            ELSEWHERE => Answer::Elsewhere,
            _ => Answer::Missing,
        })
    })
    .await
}

/// Reads a frame's status byte and length, refusing a length over `max`.
async fn read_head(
    stream: &mut (impl futures::AsyncRead + Unpin),
    max: u32,
) -> std::io::Result<(u8, usize)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await?;
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes"));
    if len > max {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes is over the limit"
        )));
    }
    Ok((head[0], len as usize))
}

/// Reads the answer frame for one chunk into `buf` (page-aligned, so that the store can write
/// it with `O_DIRECT`) and returns its status; `buf` holds the chunk when that is `OK`.
async fn read_chunk_frame(
    stream: &mut (impl futures::AsyncRead + Unpin),
    buf: &mut ChunkBuf,
) -> std::io::Result<u8> {
    within_frame_timeout("chunk", async {
        let (status, len) = read_head(stream, super::store::CHUNK_SIZE as u32).await?;
        buf.resize(len);
        stream.read_exact(buf.as_mut_slice()).await?;
        Ok(status)
    })
    .await
}

async fn send_request(
    stream: &mut (impl futures::AsyncWrite + Unpin),
    req: &BlobRequest,
) -> std::io::Result<()> {
    let bytes = postcard::to_allocvec(req).expect("requests serialize");
    stream
        .write_all(&(bytes.len() as u32).to_le_bytes())
        .await?;
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// What the replicated state says about a blob: enough to verify any holder's answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// blake3 of the content.
    pub hash: Hash,
    /// Hash of the chunk list.
    pub chunks_hash: Hash,
    /// `sha256:<hex>` of the content, as recorded (see [`BlobStore::commit`]).
    pub sha256: String,
}

/// A node to fetch from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source {
    /// The node.
    pub peer: PeerId,
    /// It has the whole blob (a holder); otherwise it is pulling it too.
    pub complete: bool,
}

/// Why a pull failed. Chunks fetched so far stay in the store for the next attempt.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nobody to fetch from.
    #[error("no node holds blob {0}")]
    NoHolders(Hash),
    /// No holder gave a chunk list that matches the replicated state.
    #[error("no holder of blob {blob} served a valid chunk list (asked {asked})")]
    NoValidList {
        /// The blob.
        blob: Hash,
        /// Holders asked.
        asked: usize,
    },
    /// Holders failed or lied until none was left.
    #[error(
        "pull of blob {blob} stopped: {missing} of {total} chunks could not be fetched from any holder ({reasons})"
    )]
    Incomplete {
        /// The blob.
        blob: Hash,
        /// Chunks still missing.
        missing: usize,
        /// Chunks in the blob.
        total: usize,
        /// What went wrong with each holder.
        reasons: String,
    },
    /// The local store failed (for example the disk is full).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a pull did.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    /// Chunks fetched from complete holders.
    pub chunks_from_holders: usize,
    /// Chunks fetched from fellow pullers.
    pub chunks_from_pullers: usize,
    /// Chunks already present (dedup or resume).
    pub chunks_present: usize,
    /// Holders dropped for serving bad pieces.
    pub liars: Vec<PeerId>,
    /// Holders lost mid-transfer.
    pub failed: Vec<PeerId>,
}

/// Shared state of one pull.
struct Pull {
    blob: Hash,
    list: ChunkList,
    /// Chunk indexes still to fetch, in this puller's own random order.
    queue: Mutex<Vec<usize>>,
    remaining: AtomicU64,
    done: AtomicBool,
    /// What each fellow puller has, as last asked.
    peer_has: Mutex<HashMap<PeerId, Vec<u8>>>,
    /// Chunks this pull wrote, to undo them if the local store fails.
    written: Mutex<Vec<Hash>>,
    /// Chunks a holder sent elsewhere, until taken again, with the time from which holders
    /// may be asked for them again.
    deferred: Mutex<HashMap<usize, Instant>>,
    /// Chunks some worker has asked for and not yet stored or given back, with when.
    inflight: Mutex<HashMap<usize, Instant>>,
    /// Chunks stored by this pull (a chunk can arrive twice in the end game).
    stored: Mutex<HashSet<usize>>,
    /// Chunk writes running on blocking threads.
    puts: WritesInFlight,
    /// The blake3 chaining value of each chunk (by index) this pull stored, for the commit.
    cvs: Mutex<Vec<Option<ChainingValue>>>,
    /// Receive buffers not in use, shared by the workers (a pull allocates a few, not one per
    /// chunk).
    bufs: Mutex<Vec<ChunkBuf>>,
    /// Wakes idle workers when the last chunk is stored, so they end at once rather than at
    /// the end of their nap (which cost each small blob of an image its 20 ms).
    finished: tokio::sync::Notify,
}

/// Counts writes running on blocking threads, so that a failed pull can wait for them before it
/// undoes what they wrote.
#[derive(Default, Clone)]
struct WritesInFlight(Arc<(Mutex<usize>, tokio::sync::Notify)>);

/// One running write; dropping it ends it.
struct Writing(WritesInFlight);

impl WritesInFlight {
    /// Counts a write from now until the returned guard is dropped.
    fn start(&self) -> Writing {
        *self.0.0.lock().expect("writes lock") += 1;
        Writing(self.clone())
    }

    /// Waits until no write runs.
    async fn idle(&self) {
        loop {
            let finished = self.0.1.notified();
            if *self.0.0.lock().expect("writes lock") == 0 {
                return;
            }
            finished.await;
        }
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        *self.0.0.0.lock().expect("writes lock") -= 1;
        self.0.0.1.notify_waiters();
    }
}

impl Pull {
    /// A pull of `blob` that still has to fetch the chunks at the indexes in `queue`.
    fn new(blob: Hash, list: ChunkList, queue: Vec<usize>) -> Self {
        Self {
            blob,
            cvs: Mutex::new(vec![None; list.chunks.len()]),
            remaining: AtomicU64::new(queue.len() as u64),
            done: AtomicBool::new(queue.is_empty()),
            queue: Mutex::new(queue),
            list,
            peer_has: Mutex::new(HashMap::new()),
            written: Mutex::new(Vec::new()),
            deferred: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            stored: Mutex::new(HashSet::new()),
            puts: WritesInFlight::default(),
            bufs: Mutex::new(Vec::new()),
            finished: tokio::sync::Notify::new(),
        }
    }

    fn has_bit(bits: &[u8], i: usize) -> bool {
        bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Takes up to `n` chunks for `source`: from a fellow puller only chunks it has; from a
    /// holder, chunks no fellow puller has first (unless `any`).
    ///
    /// Chunks a holder sent elsewhere ([`SeedLedger`]) wait [`ELSEWHERE_BACKOFF`] before a
    /// holder is asked for them again, and a fellow puller that has them is asked for them
    /// before anything else.
    fn take(&self, source: &Source, n: usize, any: bool) -> Vec<usize> {
        let mut queue = self.queue.lock().expect("queue lock");
        let peer_has = self.peer_has.lock().expect("have lock");
        let mut deferred = self.deferred.lock().expect("deferred lock");
        let now = Instant::now();
        let fellow_has = |i: usize| {
            peer_has
                .get(&source.peer)
                .is_some_and(|bits| Self::has_bit(bits, i))
        };
        let mut out = Vec::new();
        let mut take_where = |wanted: &dyn Fn(usize) -> bool, out: &mut Vec<usize>| {
            let mut k = 0;
            while k < queue.len() && out.len() < n {
                if wanted(queue[k]) {
                    out.push(queue.swap_remove(k));
                } else {
                    k += 1;
                }
            }
        };
        if source.complete {
            let wanted = |i: usize| {
                deferred.get(&i).is_none_or(|until| *until <= now)
                    && (any || !peer_has.values().any(|bits| Self::has_bit(bits, i)))
            };
            take_where(&wanted, &mut out);
        } else {
            take_where(&|i| deferred.contains_key(&i) && fellow_has(i), &mut out);
            take_where(&fellow_has, &mut out);
        }
        let mut inflight = self.inflight.lock().expect("inflight lock");
        for i in &out {
            deferred.remove(i);
            inflight.insert(*i, now);
        }
        if out.is_empty() && self.remaining.load(Ordering::SeqCst) > 0 {
            // End game: the queue is empty but chunks are still missing. Ask for chunks another
            // worker has had in flight for a while (its stream may be stuck on a connection that
            // died without a reset), so that one slow source cannot hold the pull back.
            for (i, at) in inflight.iter_mut() {
                if out.len() < n
                    && now.saturating_duration_since(*at) >= ENDGAME_AFTER
                    && (source.complete || fellow_has(*i))
                {
                    *at = now;
                    out.push(*i);
                }
            }
        }
        out
    }

    /// Puts a chunk a holder sent elsewhere back in the queue, for fellow pullers first.
    fn defer(&self, chunk: usize) {
        self.deferred
            .lock()
            .expect("deferred lock")
            .insert(chunk, Instant::now() + ELSEWHERE_BACKOFF);
        self.give_back(&[chunk]);
    }

    /// Puts chunks a worker could not fetch back in the queue (unless another worker stored
    /// them meanwhile, or they are queued already).
    fn give_back(&self, chunks: &[usize]) {
        let mut queue = self.queue.lock().expect("queue lock");
        let mut inflight = self.inflight.lock().expect("inflight lock");
        let stored = self.stored.lock().expect("stored lock");
        for i in chunks {
            inflight.remove(i);
            if !stored.contains(i) && !queue.contains(i) {
                queue.push(*i);
            }
        }
    }

    /// Records chunk `i` as stored; the pull is done with the last one. A second copy of a
    /// chunk (end game) counts once.
    fn stored_one(&self, i: usize) {
        self.inflight.lock().expect("inflight lock").remove(&i);
        if !self.stored.lock().expect("stored lock").insert(i) {
            return;
        }
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.done.store(true, Ordering::SeqCst);
            self.finished.notify_waiters();
        }
    }
}

/// Pulls a blob into `store`, verifying everything. `sources` is asked for the current
/// holders and fellow pullers at the start and then twice a second, so pullers that start
/// later are used too. `progress` is called with the bytes of each chunk as it is stored.
pub async fn fetch(
    dialer: &BlobDialer,
    store: &Arc<BlobStore>,
    expected: Expected,
    sources: impl Fn() -> Vec<Source> + Send + Sync,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<(BlobInfo, FetchReport), FetchError> {
    let blob = expected.hash;
    if store.has(&blob) {
        let list = store.chunk_list(&blob)?;
        let info = BlobInfo {
            hash: blob,
            size: list.size,
            chunks_hash: list.hash(),
            sha256: expected.sha256,
        };
        return Ok((info, FetchReport::default()));
    }
    // The blob's record can arrive before its holder records (gossip has no order across
    // keys): give the holders a few seconds to show up before giving up.
    let mut initial = sources();
    let wait_for_holders = tokio::time::Instant::now() + HOLDERS_GRACE;
    while initial.is_empty() && tokio::time::Instant::now() < wait_for_holders {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        initial = sources();
    }
    if initial.is_empty() {
        return Err(FetchError::NoHolders(blob));
    }
    let mut report = FetchReport::default();

    // 1. The chunk list, checked against the replicated state (holders first).
    let mut list = None;
    // The stream the list came on, for the first worker on that peer (one handshake fewer).
    let mut list_stream: Option<(PeerId, Box<dyn BlobStream>)> = None;
    let mut ordered = initial.clone();
    ordered.sort_by_key(|s| !s.complete);
    for src in &ordered {
        match fetch_list(dialer, src.peer, blob).await {
            Ok((Some(l), stream)) if l.hash() == expected.chunks_hash => {
                list = Some(l);
                list_stream = Some((src.peer, stream));
                break;
            }
            Ok((Some(_), mut stream)) => {
                let _ = stream.close().await;
                tracing::warn!(peer = %src.peer, %blob, "node served a chunk list that does not match");
                report.liars.push(src.peer);
            }
            Ok((None, mut stream)) => {
                let _ = stream.close().await;
                tracing::debug!(peer = %src.peer, %blob, "node does not have the blob")
            }
            Err(e) => {
                tracing::debug!(peer = %src.peer, %blob, error = %e, "node unreachable");
                report.failed.push(src.peer);
            }
        }
    }
    let list = list.ok_or(FetchError::NoValidList {
        blob,
        asked: ordered.len(),
    })?;

    // 2. Pin every chunk until the commit (a collection running meanwhile cannot take any),
    // and publish the list so that fellow pullers can fetch from this node already.
    let mut pins = store.pins();
    for h in &list.chunks {
        pins.add(*h);
    }
    pins.add(blob);
    store.put_partial_list(&blob, &list)?;
    let mut seen = HashSet::new();
    let mut queue = Vec::new();
    for (i, h) in list.chunks.iter().enumerate() {
        if !seen.insert(*h) {
            continue;
        }
        if store.chunk_ok(h) {
            report.chunks_present += 1;
            progress(list.chunk_len(i) as u64);
        } else {
            queue.push(i);
        }
    }
    {
        use rand::seq::SliceRandom;
        queue.shuffle(&mut rand::rng());
    }
    // Four streams per holder for a large blob; a small one needs fewer (one request asks for
    // up to MAX_CHUNKS_PER_REQUEST chunks), and each stream is a handshake.
    let per_holder = WORKERS_PER_HOLDER.min(queue.len().div_ceil(MAX_CHUNKS_PER_REQUEST).max(1));
    let pull = Arc::new(Pull::new(blob, list, queue));
    let progress = Arc::new(progress);
    let mut workers = tokio::task::JoinSet::new();
    let mut started: HashSet<PeerId> = HashSet::new();
    let mut reasons = Vec::new();
    let mut discover = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut retry_at: HashMap<PeerId, std::time::Instant> = HashMap::new();
    let mut holder_failures: HashMap<PeerId, u32> = HashMap::new();
    loop {
        // (Re)discover sources: new holders or pullers get workers; fellow pullers that
        // went away may be retried.
        if !pull.done.load(Ordering::SeqCst) {
            let now = std::time::Instant::now();
            for src in sources() {
                if started.contains(&src.peer)
                    || report.liars.contains(&src.peer)
                    || report.failed.contains(&src.peer)
                    || retry_at.get(&src.peer).is_some_and(|t| now < *t)
                {
                    continue;
                }
                started.insert(src.peer);
                let n = if src.complete { per_holder } else { 1 };
                for _ in 0..n {
                    let first = list_stream
                        .take_if(|(peer, _)| *peer == src.peer)
                        .map(|(_, stream)| stream);
                    workers.spawn(worker(
                        dialer.clone(),
                        store.clone(),
                        src,
                        first,
                        pull.clone(),
                        progress.clone(),
                    ));
                }
            }
        }
        if workers.is_empty() {
            // Nobody working: wait for a holder that is due for another try, else stop.
            let now = std::time::Instant::now();
            let next_holder_try = holder_failures
                .iter()
                .filter(|(_, n)| **n < 3)
                .filter_map(|(p, _)| retry_at.get(p))
                .filter(|t| **t > now)
                .min()
                .copied();
            match next_holder_try {
                Some(t) if !pull.done.load(Ordering::SeqCst) => {
                    tokio::time::sleep_until(t.into()).await;
                    continue;
                }
                _ => break, // done, or nobody left to ask
            }
        }
        tokio::select! {
            _ = discover.tick() => {}
            Some(result) = workers.join_next() => match result.expect("worker task") {
                WorkerEnd::Done { from_holder, n } => {
                    if from_holder {
                        report.chunks_from_holders += n
                    } else {
                        report.chunks_from_pullers += n
                    }
                }
                WorkerEnd::Liar(peer, n) => {
                    report.chunks_from_holders += n;
                    if !report.liars.contains(&peer) {
                        metrics::counter!("mesh_blob_liars_total").increment(1);
                        tracing::warn!(%peer, %blob, "dropped a holder that served corrupt pieces");
                        reasons.push(format!("{peer} served a corrupt piece"));
                        report.liars.push(peer);
                    }
                }
                WorkerEnd::Failed(src, n, why) => {
                    tracing::debug!(peer = %src.peer, %blob, error = %why, "blob stream failed");
                    if src.complete {
                        report.chunks_from_holders += n;
                        // A holder whose connection broke (a reconnect, a timeout) is asked
                        // again after a pause; after three failures it is given up on.
                        let count = holder_failures.entry(src.peer).or_insert(0u32);
                        *count += 1;
                        if *count < 3 {
                            started.remove(&src.peer);
                            retry_at.insert(
                                src.peer,
                                std::time::Instant::now() + std::time::Duration::from_secs(2),
                            );
                        } else if !report.failed.contains(&src.peer) {
                            reasons.push(format!("{}: {why}", src.peer));
                            report.failed.push(src.peer);
                        }
                    } else {
                        // A fellow puller that stopped (or has no list yet) may come back;
                        // ask again in a second.
                        report.chunks_from_pullers += n;
                        started.remove(&src.peer);
                        retry_at.insert(
                            src.peer,
                            std::time::Instant::now() + std::time::Duration::from_secs(1),
                        );
                    }
                }
                WorkerEnd::Store(e) => {
                    // The local store failed (a full disk, say): stop, and take back what
                    // this pull wrote so the store is as it was. (Other failures keep the
                    // chunks so a later pull resumes.)
                    workers.abort_all();
                    while workers.join_next().await.is_some() {}
                    // Writes already handed to blocking threads still finish: wait for them.
                    if tokio::time::timeout(FRAME_TIMEOUT, pull.puts.idle()).await.is_err() {
                        tracing::warn!(%blob, "chunk writes still running after 30 s; some may stay");
                    }
                    store.remove_partial_list(&blob);
                    let written = std::mem::take(&mut *pull.written.lock().expect("written lock"));
                    let s = store.clone();
                    let _ = tokio::task::spawn_blocking(move || s.discard_chunks(&written)).await;
                    return Err(e.into());
                }
            },
        }
    }
    let missing = pull.remaining.load(Ordering::SeqCst) as usize;
    if missing > 0 {
        store.remove_partial_list(&blob);
        return Err(FetchError::Incomplete {
            blob,
            missing,
            total: pull.list.chunks.len(),
            reasons: if reasons.is_empty() {
                "no holder left".into()
            } else {
                reasons.join("; ")
            },
        });
    }

    // 3. Commit: re-hash the whole blob against its name.
    let s = store.clone();
    let list = pull.list.clone();
    let sha256 = expected.sha256;
    let started = Instant::now();
    let cvs = std::mem::take(&mut *pull.cvs.lock().expect("cvs lock"));
    let info = tokio::task::spawn_blocking(move || s.commit(&blob, &list, &sha256, &cvs))
        .await
        .expect("commit task")?;
    tracing::debug!(%blob, elapsed = ?started.elapsed(), "pulled blob committed");
    store.remove_partial_list(&blob);
    drop(pins);
    Ok((info, report))
}

/// Asks `peer` for the chunk list of `blob`; returns it (if the peer has the blob) with the
/// stream, which the pull's first worker for that peer goes on using.
async fn fetch_list(
    dialer: &BlobDialer,
    peer: PeerId,
    blob: Hash,
) -> std::io::Result<(Option<ChunkList>, Box<dyn BlobStream>)> {
    let mut stream = dialer.while_alive(peer, dialer.open(peer)).await?;
    let exchange = async {
        send_request(&mut stream, &BlobRequest::List(blob)).await?;
        read_frame(&mut stream, MAX_LIST_BYTES).await
    };
    let body = dialer.while_alive(peer, exchange).await?.bytes();
    Ok((body.and_then(|b| ChunkList::decode(&b)), stream))
}

enum WorkerEnd {
    Done { from_holder: bool, n: usize },
    Liar(PeerId, usize),
    Failed(Source, usize, String),
    Store(StoreError),
}

/// Fetches chunks from one source until the pull is done or the source fails or lies, on
/// `first` if given (an open stream to that source) or a stream it opens.
async fn worker(
    dialer: BlobDialer,
    store: Arc<BlobStore>,
    src: Source,
    first: Option<Box<dyn BlobStream>>,
    pull: Arc<Pull>,
    progress: Arc<impl Fn(u64) + Send + Sync + 'static>,
) -> WorkerEnd {
    let peer = src.peer;
    let mut fetched = 0usize;
    let mut stream = match first {
        Some(s) => s,
        None => match dialer.while_alive(peer, dialer.open(peer)).await {
            Ok(s) => s,
            Err(e) => return WorkerEnd::Failed(src, 0, e.to_string()),
        },
    };
    let blob_list_len = pull.list.chunks.len();
    let mut idle_rounds = 0u32;
    loop {
        if pull.done.load(Ordering::SeqCst) {
            let _ = stream.close().await;
            return WorkerEnd::Done {
                from_holder: src.complete,
                n: fetched,
            };
        }
        if !src.complete {
            // Learn what the fellow puller has now.
            let blob = pull.blob;
            let have = async {
                send_request(&mut stream, &BlobRequest::Have(blob)).await?;
                read_frame(&mut stream, blob_list_len.div_ceil(8) as u32 + 8)
                    .await
                    .map(Answer::bytes)
            };
            let have = dialer
                .while_alive(peer, within_frame_timeout("have", have))
                .await;
            match have {
                Ok(Some(bits)) => {
                    pull.peer_has.lock().expect("have lock").insert(peer, bits);
                }
                Ok(None) | Err(_) => {
                    pull.peer_has.lock().expect("have lock").remove(&peer);
                    return WorkerEnd::Failed(src, fetched, "stopped pulling".into());
                }
            }
        }
        // Holders hold back briefly on chunks a fellow puller can give, then take anything.
        let batch = pull.take(&src, MAX_CHUNKS_PER_REQUEST, idle_rounds >= 10);
        if batch.is_empty() {
            // Made before the check: it then hears of a last chunk stored right after it.
            let finished = pull.finished.notified();
            if pull.remaining.load(Ordering::SeqCst) == 0 {
                let _ = stream.close().await;
                return WorkerEnd::Done {
                    from_holder: src.complete,
                    n: fetched,
                };
            }
            idle_rounds += 1;
            let nap = Duration::from_millis(if src.complete { 20 } else { 100 });
            let _ = tokio::time::timeout(nap, finished).await;
            continue;
        }
        idle_rounds = 0;
        let hashes: Vec<Hash> = batch.iter().map(|i| pull.list.chunks[*i]).collect();
        // Sending can stall on a connection that died without a reset; the chunks taken must
        // not be held forever, or the other workers would wait for them in vain.
        let request = BlobRequest::Chunks {
            blob: pull.blob,
            chunks: hashes.clone(),
        };
        let sent = dialer
            .while_alive(
                peer,
                within_frame_timeout("sending", send_request(&mut stream, &request)),
            )
            .await;
        if let Err(e) = sent {
            pull.give_back(&batch);
            return WorkerEnd::Failed(src, fetched, e.to_string());
        }
        for (k, i) in batch.iter().enumerate() {
            let mut body = pull
                .bufs
                .lock()
                .expect("bufs lock")
                .pop()
                .unwrap_or_else(|| ChunkBuf::with_capacity(0, super::store::CHUNK_SIZE));
            match dialer
                .while_alive(peer, read_chunk_frame(&mut stream, &mut body))
                .await
            {
                Ok(OK) => {}
                Ok(ELSEWHERE) => {
                    // Another puller got it from this holder a moment ago.
                    pull.bufs.lock().expect("bufs lock").push(body);
                    pull.defer(*i);
                    continue;
                }
                Ok(_) if !src.complete => {
                    // A fellow puller may have been asked for a chunk it lost; not a lie.
                    pull.bufs.lock().expect("bufs lock").push(body);
                    pull.give_back(&batch[k..k + 1]);
                    continue;
                }
                Ok(_) => {
                    pull.give_back(&batch[k..]);
                    return WorkerEnd::Failed(src, fetched, "does not have every chunk".into());
                }
                Err(e) => {
                    pull.give_back(&batch[k..]);
                    return WorkerEnd::Failed(src, fetched, e.to_string());
                }
            };
            let h = hashes[k];
            let s = store.clone();
            let len = body.as_slice().len() as u64;
            let index = *i;
            // The blocking write runs to its end even if this worker is aborted, so it records
            // what it wrote itself (a failed pull must find every chunk it has to undo).
            let writing = pull.puts.start();
            let p = pull.clone();
            let put = tokio::task::spawn_blocking(move || {
                let _writing = writing;
                let put = s.put_received_chunk(&h, &body);
                if put.is_ok() {
                    p.written.lock().expect("written lock").push(h);
                    // Its place in the blob's hash, from the bytes still in memory.
                    let cv = chunk_cv(body.as_slice(), index);
                    p.cvs.lock().expect("cvs lock")[index] = Some(cv);
                }
                p.bufs.lock().expect("bufs lock").push(body);
                put
            })
            .await
            .expect("store task");
            match put {
                Ok(()) => {
                    fetched += 1;
                    progress(len);
                    pull.stored_one(*i);
                }
                Err(StoreError::ChunkMismatch { .. }) => {
                    tracing::warn!(%peer, chunk = %h, index = i, "corrupt piece; dropping holder");
                    pull.give_back(&batch[k..]);
                    return WorkerEnd::Liar(peer, fetched);
                }
                Err(e) => {
                    pull.give_back(&batch[k..]);
                    return WorkerEnd::Store(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_served_stream_that_stays_silent_is_closed_after_the_step_timeout() {
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path()).unwrap());
        let (server_end, mut puller_end) = tokio::io::duplex(64 << 10);
        let serving = tokio::spawn(serve_stream(
            PeerId::random(),
            server_end.compat(),
            store.clone(),
            Arc::new(Mutex::new(SeedLedger::default())),
            Arc::new(|_: &Hash, _: &PeerId| false),
            ServeMode::Honest,
        ));
        // A request for an unknown blob is answered...
        let mut puller = (&mut puller_end).compat();
        send_request(&mut puller, &BlobRequest::List(Hash::of(b"nothing")))
            .await
            .unwrap();
        assert!(matches!(
            read_frame(&mut puller, MAX_LIST_BYTES).await,
            Ok(Answer::Missing)
        ));
        // ...and then nothing more comes: the server gives up on the stream (the clock is
        // paused, so the two minutes pass as soon as everything waits).
        let ended = tokio::time::timeout(Duration::from_secs(3600), serving)
            .await
            .expect("the silent stream is still served after an hour")
            .unwrap();
        assert_eq!(ended.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_failed_pull_waits_for_the_writes_it_started() {
        let writes = WritesInFlight::default();
        let (a, b) = (writes.start(), writes.start());
        let waiter = tokio::spawn({
            let writes = writes.clone();
            async move { writes.idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one write still runs");
        drop(b);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("idle once every write ended")
            .unwrap();
        writes.idle().await;
    }

    #[test]
    fn a_chunk_stuck_with_one_worker_is_asked_for_again_and_counted_once() {
        let pull = pull_of(2);
        let holder = Source {
            peer: PeerId::random(),
            complete: true,
        };
        let mut first = pull.take(&holder, 2, true);
        first.sort();
        assert_eq!(first, vec![0, 1]);
        pull.stored_one(0);
        // Chunk 1 is in flight but not for long: nothing to do for an idle worker.
        assert!(pull.take(&holder, 2, true).is_empty());
        // After ENDGAME_AFTER another worker asks for it too, once.
        pull.inflight
            .lock()
            .unwrap()
            .insert(1, Instant::now() - ENDGAME_AFTER);
        assert_eq!(pull.take(&holder, 2, true), vec![1]);
        assert!(pull.take(&holder, 2, true).is_empty());
        // Both copies arrive: counted once, and the pull is done.
        pull.stored_one(1);
        assert!(pull.done.load(Ordering::SeqCst));
        pull.stored_one(1);
        assert_eq!(pull.remaining.load(Ordering::SeqCst), 0);
        // The stuck worker giving it back afterwards does not queue it again.
        pull.give_back(&[1]);
        assert!(pull.queue.lock().unwrap().is_empty());
    }

    fn chunk(n: u8) -> Hash {
        Hash::of(&[n])
    }

    /// Nobody has finished pulling.
    fn pulling(_: &PeerId) -> bool {
        false
    }

    #[test]
    fn a_holder_gives_each_chunk_to_one_puller_at_a_time() {
        let (x, y) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut ledger = SeedLedger::default();
        assert!(ledger.grant(chunk(1), x, t0, pulling));
        // Another puller is sent elsewhere while the memory lasts...
        assert!(!ledger.grant(chunk(1), y, t0 + ms(100), pulling));
        assert!(!ledger.grant(chunk(1), y, t0 + SEED_MEMORY - ms(1), pulling));
        // ...but gets other chunks, and the first puller may ask again (a lost stream).
        assert!(ledger.grant(chunk(2), y, t0, pulling));
        assert!(ledger.grant(chunk(1), x, t0 + ms(500), pulling));
        // Once the memory of the last grant (500 ms) has passed, anyone gets it: a puller that
        // died with the only copy delays the others by at most SEED_MEMORY.
        assert!(!ledger.grant(chunk(1), y, t0 + SEED_MEMORY, pulling));
        assert!(ledger.grant(chunk(1), y, t0 + ms(500) + SEED_MEMORY, pulling));
        // Once the first puller holds the whole blob it is a holder like this one, and the
        // asker is served at once (nobody is pulling it to trade with).
        assert!(ledger.grant(chunk(3), x, t0, pulling));
        assert!(!ledger.grant(chunk(3), y, t0 + ms(1), pulling));
        assert!(ledger.grant(chunk(3), y, t0 + ms(1), |p| *p == x));
    }

    #[test]
    fn the_ledger_forgets_old_grants_when_it_grows() {
        let x = PeerId::random();
        let t0 = Instant::now();
        let mut ledger = SeedLedger::default();
        for n in 0..LEDGER_PRUNE_AT as u32 {
            ledger.grant(Hash::of(&n.to_le_bytes()), x, t0, pulling);
        }
        assert_eq!(ledger.given.len(), LEDGER_PRUNE_AT);
        ledger.grant(chunk(1), x, t0 + SEED_MEMORY, pulling);
        assert_eq!(ledger.given.len(), 1, "only the fresh grant is left");
    }

    fn pull_of(chunks: usize) -> Pull {
        let list = ChunkList {
            size: (chunks * super::super::store::CHUNK_SIZE) as u64,
            chunks: (0..chunks).map(|n| chunk(n as u8)).collect(),
        };
        Pull::new(list.hash(), list, (0..chunks).collect())
    }

    #[test]
    fn a_chunk_sent_elsewhere_goes_to_fellow_pullers_before_holders() {
        let pull = pull_of(3);
        let holder = Source {
            peer: PeerId::random(),
            complete: true,
        };
        let fellow = Source {
            peer: PeerId::random(),
            complete: false,
        };
        let mut taken = pull.take(&holder, 3, true);
        taken.sort();
        assert_eq!(taken, vec![0, 1, 2]);
        pull.defer(1);
        pull.give_back(&[0, 2]);
        // The holder is not asked for chunk 1 again at once, even with `any`...
        let mut again = pull.take(&holder, 3, true);
        again.sort();
        assert_eq!(again, vec![0, 2]);
        // ...while a fellow puller that has it gives it first, before anything else it has.
        pull.give_back(&[0, 2]);
        pull.peer_has
            .lock()
            .unwrap()
            .insert(fellow.peer, vec![0b111]);
        assert_eq!(pull.take(&fellow, 1, false), vec![1]);
        // Given back (the fellow lost it), it waits out the back-off for holders again only
        // when a holder sends it elsewhere again; past the back-off a holder gets it.
        pull.defer(1);
        pull.deferred
            .lock()
            .unwrap()
            .insert(1, Instant::now() - Duration::from_millis(1));
        let mut all = pull.take(&holder, 3, true);
        all.sort();
        assert_eq!(all, vec![0, 1, 2]);
        assert!(pull.deferred.lock().unwrap().is_empty());
    }
}
