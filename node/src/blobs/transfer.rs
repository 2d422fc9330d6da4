//! Peer-to-peer blob transfer over libp2p streams, verified piece by piece.
//!
//! Protocol `/meshwork/blobs/1`, on connections that passed admission (so pieces are only ever
//! served to peers that hold the cluster secret). On one stream the puller sends requests,
//! each a `u32` length and a postcard [`BlobRequest`]; the server answers each in order:
//!
//! - `List(blob)`: status byte, `u32` length, the blob's [`ChunkList`] encoding;
//! - `Chunks([h..])` (at most [`MAX_CHUNKS_PER_REQUEST`]): for each, status byte, `u32`
//!   length, the chunk's bytes.
//!
//! The puller ([`fetch`]) checks the list against the `chunks_hash` recorded in the replicated
//! state and every chunk against its hash before writing it, so a lying holder is caught at
//! the first bad piece: the piece goes back to the queue and the holder is dropped from this
//! pull. Pieces come from several holders at once (one worker per holder, a shared queue);
//! a holder that dies mid-transfer loses its in-flight pieces to the others. Chunks already
//! in the store are not fetched again, so an interrupted pull resumes where it stopped.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use super::store::{BlobInfo, BlobStore, ChunkList, Hash, StoreError};

/// The stream protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshwork/blobs/1");
/// Most chunks asked for in one request.
pub const MAX_CHUNKS_PER_REQUEST: usize = 8;
const MAX_REQUEST_BYTES: u32 = 64 * 1024;
const MAX_LIST_BYTES: u32 = 16 << 20;
const OK: u8 = 0;
const MISSING: u8 = 1;

/// A request on a blob stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BlobRequest {
    /// The chunk list of a blob.
    List(Hash),
    /// Some chunks' bytes.
    Chunks(Vec<Hash>),
}

/// How the server misbehaves, for tests of the puller's defences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeMode {
    /// Serve what is stored.
    Honest,
    /// Flip a byte in every chunk served.
    CorruptPieces,
}

/// Serves blob streams from `store` until the control is dropped.
pub async fn serve(mut control: libp2p_stream::Control, store: Arc<BlobStore>, mode: ServeMode) {
    let mut incoming = match control.accept(PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept blob streams");
            return;
        }
    };
    while let Some((peer, stream)) = incoming.next().await {
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(stream, store, mode).await {
                tracing::debug!(%peer, error = %e, "blob stream ended");
            }
        });
    }
}

async fn serve_stream(
    mut stream: libp2p::Stream,
    store: Arc<BlobStore>,
    mode: ServeMode,
) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        match stream.read_exact(&mut len).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
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
                let list = tokio::task::spawn_blocking(move || s.chunk_list(&h))
                    .await
                    .map_err(std::io::Error::other)?;
                match list {
                    Ok(l) => write_frame(&mut stream, OK, &l.encode()).await?,
                    Err(_) => write_frame(&mut stream, MISSING, &[]).await?,
                }
            }
            BlobRequest::Chunks(hashes) => {
                if hashes.len() > MAX_CHUNKS_PER_REQUEST {
                    return Err(std::io::Error::other("too many chunks in one request"));
                }
                for h in hashes {
                    let s = store.clone();
                    let bytes = tokio::task::spawn_blocking(move || s.read_chunk(&h))
                        .await
                        .map_err(std::io::Error::other)?;
                    match bytes {
                        Ok(mut b) => {
                            if mode == ServeMode::CorruptPieces && !b.is_empty() {
                                b[0] ^= 0xff;
                            }
                            metrics::counter!("mesh_blob_bytes_served_total")
                                .increment(b.len() as u64);
                            write_frame(&mut stream, OK, &b).await?
                        }
                        Err(_) => write_frame(&mut stream, MISSING, &[]).await?,
                    }
                }
            }
        }
        stream.flush().await?;
    }
}

async fn write_frame(stream: &mut libp2p::Stream, status: u8, body: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = status;
    head[1..].copy_from_slice(&(body.len() as u32).to_le_bytes());
    stream.write_all(&head).await?;
    stream.write_all(body).await
}

async fn read_frame(stream: &mut libp2p::Stream, max: u32) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await?;
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes"));
    if len > max {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes is over the limit"
        )));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).await?;
    Ok((head[0] == OK).then_some(body))
}

async fn send_request(stream: &mut libp2p::Stream, req: &BlobRequest) -> std::io::Result<()> {
    let bytes = postcard::to_allocvec(req).expect("requests serialize");
    stream
        .write_all(&(bytes.len() as u32).to_le_bytes())
        .await?;
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// What the replicated state says about a blob: enough to verify any holder's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// blake3 of the content.
    pub hash: Hash,
    /// Hash of the chunk list.
    pub chunks_hash: Hash,
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
    /// Chunks fetched from peers.
    pub chunks_fetched: usize,
    /// Chunks already present (dedup or resume).
    pub chunks_present: usize,
    /// Holders dropped for serving bad pieces.
    pub liars: Vec<PeerId>,
    /// Holders lost mid-transfer.
    pub failed: Vec<PeerId>,
}

struct PullState {
    queue: Mutex<VecDeque<usize>>,
    list: ChunkList,
    remaining: AtomicU64,
    done: AtomicBool,
}

/// Pulls a blob from `holders` into `store`, verifying everything. `progress` is called with
/// the bytes of each chunk as it is stored.
pub async fn fetch(
    control: &libp2p_stream::Control,
    store: &Arc<BlobStore>,
    expected: Expected,
    holders: &[PeerId],
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<(BlobInfo, FetchReport), FetchError> {
    let blob = expected.hash;
    if store.has(&blob) {
        let list = store.chunk_list(&blob)?;
        let s = store.clone();
        let info = tokio::task::spawn_blocking(move || s.commit(&blob, &list))
            .await
            .expect("commit task")?;
        return Ok((info, FetchReport::default()));
    }
    if holders.is_empty() {
        return Err(FetchError::NoHolders(blob));
    }
    let mut report = FetchReport::default();

    // 1. The chunk list, checked against the replicated state.
    let mut list = None;
    for peer in holders {
        match fetch_list(control.clone(), *peer, blob).await {
            Ok(Some(l)) if l.hash() == expected.chunks_hash => {
                list = Some(l);
                break;
            }
            Ok(Some(_)) => {
                tracing::warn!(%peer, %blob, "holder served a chunk list that does not match");
                report.liars.push(*peer);
            }
            Ok(None) => tracing::debug!(%peer, %blob, "holder does not have the blob"),
            Err(e) => {
                tracing::debug!(%peer, %blob, error = %e, "holder unreachable");
                report.failed.push(*peer);
            }
        }
    }
    let list = list.ok_or(FetchError::NoValidList {
        blob,
        asked: holders.len(),
    })?;

    // 2. The chunks we lack, from every honest holder at once. Every chunk of the blob is
    // pinned until the commit, so a collection running meanwhile cannot take any of them.
    let mut pins = store.pins();
    for h in &list.chunks {
        pins.add(*h);
    }
    pins.add(blob);
    let mut seen = HashSet::new();
    let mut queue = VecDeque::new();
    for (i, h) in list.chunks.iter().enumerate() {
        if !seen.insert(*h) {
            continue;
        }
        if store.has_chunk(h) {
            report.chunks_present += 1;
            progress(list.chunk_len(i) as u64);
        } else {
            queue.push_back(i);
        }
    }
    let total_missing = queue.len();
    let state = Arc::new(PullState {
        remaining: AtomicU64::new(queue.len() as u64),
        queue: Mutex::new(queue),
        list,
        done: AtomicBool::new(total_missing == 0),
    });
    let progress = Arc::new(progress);
    let pool: Vec<PeerId> = holders
        .iter()
        .filter(|p| !report.liars.contains(p) && !report.failed.contains(p))
        .copied()
        .collect();
    let mut workers = tokio::task::JoinSet::new();
    for peer in pool {
        for _ in 0..2 {
            workers.spawn(worker(
                control.clone(),
                store.clone(),
                peer,
                state.clone(),
                progress.clone(),
            ));
        }
    }
    let mut reasons = Vec::new();
    while let Some(result) = workers.join_next().await {
        match result.expect("worker task") {
            WorkerEnd::Done(n) => report.chunks_fetched += n,
            WorkerEnd::Liar(peer, n) => {
                report.chunks_fetched += n;
                if !report.liars.contains(&peer) {
                    reasons.push(format!("{peer} served a corrupt piece"));
                    report.liars.push(peer);
                }
            }
            WorkerEnd::Failed(peer, n, why) => {
                report.chunks_fetched += n;
                if !report.failed.contains(&peer) {
                    reasons.push(format!("{peer}: {why}"));
                    report.failed.push(peer);
                }
            }
            WorkerEnd::Store(e) => return Err(e.into()),
        }
    }
    let missing = state.remaining.load(Ordering::SeqCst) as usize;
    if missing > 0 {
        return Err(FetchError::Incomplete {
            blob,
            missing,
            total: state.list.chunks.len(),
            reasons: if reasons.is_empty() {
                "no holder left".into()
            } else {
                reasons.join("; ")
            },
        });
    }

    // 3. Commit: re-hash the whole blob against its name.
    let s = store.clone();
    let list = state.list.clone();
    let info = tokio::task::spawn_blocking(move || s.commit(&blob, &list))
        .await
        .expect("commit task")?;
    drop(pins);
    for peer in &report.liars {
        metrics::counter!("mesh_blob_liars_total").increment(1);
        tracing::warn!(%peer, %blob, "dropped a holder that served corrupt pieces");
    }
    Ok((info, report))
}

async fn fetch_list(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    blob: Hash,
) -> std::io::Result<Option<ChunkList>> {
    let mut stream = control
        .open_stream(peer, PROTOCOL)
        .await
        .map_err(std::io::Error::other)?;
    send_request(&mut stream, &BlobRequest::List(blob)).await?;
    let body = read_frame(&mut stream, MAX_LIST_BYTES).await?;
    let _ = stream.close().await;
    Ok(body.and_then(|b| ChunkList::decode(&b)))
}

enum WorkerEnd {
    Done(usize),
    Liar(PeerId, usize),
    Failed(PeerId, usize, String),
    Store(StoreError),
}

async fn worker(
    mut control: libp2p_stream::Control,
    store: Arc<BlobStore>,
    peer: PeerId,
    state: Arc<PullState>,
    progress: Arc<impl Fn(u64) + Send + Sync + 'static>,
) -> WorkerEnd {
    let mut fetched = 0usize;
    let mut stream = match control.open_stream(peer, PROTOCOL).await {
        Ok(s) => s,
        Err(e) => return WorkerEnd::Failed(peer, 0, e.to_string()),
    };
    loop {
        if state.done.load(Ordering::SeqCst) {
            let _ = stream.close().await;
            return WorkerEnd::Done(fetched);
        }
        let batch: Vec<usize> = {
            let mut q = state.queue.lock().expect("queue lock");
            let n = q.len().min(MAX_CHUNKS_PER_REQUEST);
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            // Others hold the last pieces; wait for them to finish or fail.
            if state.remaining.load(Ordering::SeqCst) == 0 {
                let _ = stream.close().await;
                return WorkerEnd::Done(fetched);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        }
        let give_back = |from: usize| {
            let mut q = state.queue.lock().expect("queue lock");
            for i in batch[from..].iter().rev() {
                q.push_front(*i);
            }
        };
        let hashes: Vec<Hash> = batch.iter().map(|i| state.list.chunks[*i]).collect();
        if let Err(e) = send_request(&mut stream, &BlobRequest::Chunks(hashes.clone())).await {
            give_back(0);
            return WorkerEnd::Failed(peer, fetched, e.to_string());
        }
        for (k, i) in batch.iter().enumerate() {
            let body = match read_frame(&mut stream, super::store::CHUNK_SIZE as u32).await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    give_back(k);
                    return WorkerEnd::Failed(peer, fetched, "does not have every chunk".into());
                }
                Err(e) => {
                    give_back(k);
                    return WorkerEnd::Failed(peer, fetched, e.to_string());
                }
            };
            let h = hashes[k];
            let s = store.clone();
            let len = body.len() as u64;
            let put = tokio::task::spawn_blocking(move || s.put_chunk(&h, &body))
                .await
                .expect("store task");
            match put {
                Ok(()) => {
                    fetched += 1;
                    progress(len);
                    if state.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
                        state.done.store(true, Ordering::SeqCst);
                    }
                }
                Err(StoreError::ChunkMismatch { .. }) => {
                    tracing::warn!(%peer, chunk = %h, index = i, "corrupt piece; dropping holder");
                    give_back(k);
                    return WorkerEnd::Liar(peer, fetched);
                }
                Err(e) => {
                    give_back(k);
                    return WorkerEnd::Store(e);
                }
            }
        }
    }
}
