//! The mesh as its own registry: which blobs and images exist, who holds them, and the
//! background work that keeps them replicated and collects what nothing uses.
//!
//! Records live in the replicated desired state, so every node knows them:
//!
//! | key | value |
//! |---|---|
//! | `blob/<blake3>` | [`BlobMeta`]: size, `chunks_hash`, sha256, pinned, wanted replicas |
//! | `holder/<blake3>/<peer id>` | present while that node has the whole blob |
//! | `image/<name>:<tag>` | [`ImageRecord`]: manifest, config and layers with both digests |
//! | `pulling/<blake3>/<peer id>` | present while that node pulls the blob (it shares pieces) |
//!
//! Bytes live in each node's [`BlobStore`] and move with [`transfer::fetch`].
//!
//! Replication is pull-based and leaderless: for every blob, each node ranks the live nodes
//! by a rendezvous hash of (blob, node); the top `replicas` nodes that do not hold it fetch it.
//! When a holder dies it stops counting, the ranking moves to the next node, and that node
//! pulls. With converged views exactly the top nodes act; while views differ a blob may get
//! an extra copy, never fewer.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::blobs::store::{BlobInfo, BlobStore, Hash, StoreError};
use crate::blobs::transfer::{self, BlobDialer, Expected, FetchError, Source};
use crate::containerd::{Containerd, ContainerdError, ImageToImport, ImportReport, OciBlob};
use crate::membership::MemberState;
use crate::node::NodeState;
use crate::replica::ReplicaError;

const BLOB_PREFIX: &str = "blob/";
const HOLDER_PREFIX: &str = "holder/";
const IMAGE_PREFIX: &str = "image/";
const PULLING_PREFIX: &str = "pulling/";
/// Copies of each blob the mesh keeps by default.
pub const DEFAULT_REPLICAS: u32 = 2;

/// Blobs pulled at once by an image pull or a replication pass, as Docker's default
/// `max-concurrent-downloads`: an image's small manifest and config do not wait for each other
/// or for a layer, nor layers for layers, and each blob's pull still gets its own streams to
/// every holder.
pub const IMAGE_PULL_CONCURRENCY: usize = 3;

/// What the replicated state says about a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Bytes.
    pub size: u64,
    /// Hash of the chunk list; lets a puller verify any holder's list.
    pub chunks_hash: Hash,
    /// `sha256:<hex>` of the content.
    pub sha256: String,
    /// Put by `blob put`: kept even when no image refers to it.
    pub pinned: bool,
    /// Copies to keep.
    pub replicas: u32,
    /// When it was first stored, ms since the epoch.
    pub created_ms: u64,
}

/// One blob of an image, with both of its names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageBlob {
    /// blake3, the mesh's name.
    pub blake3: Hash,
    /// `sha256:<hex>`, the OCI name containerd checks.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// OCI or Docker media type.
    pub media_type: String,
}

/// A tagged image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Repository name, e.g. `app` or `team/app`.
    pub name: String,
    /// Tag, e.g. `1.0`.
    pub tag: String,
    /// The manifest handed to containerd.
    pub manifest: ImageBlob,
    /// The image config.
    pub config: ImageBlob,
    /// Layers in order.
    pub layers: Vec<ImageBlob>,
    /// Copies to keep.
    pub replicas: u32,
    /// When it was pushed, ms since the epoch.
    pub created_ms: u64,
}

impl ImageRecord {
    /// `name:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }

    /// Every blob, manifest first.
    pub fn blobs(&self) -> impl Iterator<Item = &ImageBlob> {
        std::iter::once(&self.manifest)
            .chain(std::iter::once(&self.config))
            .chain(self.layers.iter())
    }

    /// Sum of all blob sizes.
    pub fn size(&self) -> u64 {
        self.blobs().map(|b| b.size).sum()
    }
}

/// Errors of registry operations, each saying what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// An image reference that is not `name:tag` with allowed characters.
    #[error("{0}")]
    BadReference(String),
    /// No such image.
    #[error("no image {0} in this mesh")]
    UnknownImage(String),
    /// No such blob anywhere in the mesh.
    #[error("no node in this mesh has blob {0}")]
    UnknownBlob(Hash),
    /// An image names a blob that was never pushed.
    #[error("the image names {what} {sha256} (blake3 {blake3}), which was not pushed to the mesh")]
    MissingBlob {
        /// manifest, config or layer N.
        what: String,
        /// Its OCI digest.
        sha256: String,
        /// Its mesh name.
        blake3: Hash,
    },
    /// The bytes pushed do not match the digest the client claimed.
    #[error("{what}: the bytes hash to {found}, but the image says {expected}")]
    WrongDigest {
        /// Which blob.
        what: String,
        /// Claimed digest.
        expected: String,
        /// Actual digest.
        found: String,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A pull failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The replicated state failed.
    #[error(transparent)]
    State(#[from] ReplicaError),
    /// containerd refused or is not there.
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    /// A record in the state does not decode.
    #[error("corrupt registry record {key}: {reason}")]
    CorruptRecord {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Splits and validates `name:tag` (Docker's rules: lower-case path components separated
/// by `/`, each `[a-z0-9]+` joined by `.`, `_`, `__` or `-`; a tag of up to 128 characters
/// `[A-Za-z0-9_.-]` not starting with `.` or `-`).
pub fn parse_reference(reference: &str) -> Result<(String, String), RegistryError> {
    let bad = |why: &str| RegistryError::BadReference(format!("image {reference:?}: {why}"));
    let (name, tag) = match reference.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => return Err(bad("expected NAME:TAG, e.g. app:1.0")),
    };
    if name.is_empty() || name.len() > 200 {
        return Err(bad("the name must be 1 to 200 characters"));
    }
    for component in name.split('/') {
        let ok = !component.is_empty()
            && component
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && component.starts_with(|c: char| c.is_ascii_alphanumeric())
            && component.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(bad(
                "name components are lower-case letters and digits, joined by '.', '_' or '-'",
            ));
        }
    }
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && !tag.starts_with(['.', '-']);
    if !tag_ok {
        return Err(bad(
            "a tag is 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
        ));
    }
    Ok((name.to_string(), tag.to_string()))
}

/// A holder of a blob, as seen in the state and membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Peer id.
    pub peer: PeerId,
    /// Node name, if the node is known.
    pub name: Option<String>,
    /// Whether the node is alive now.
    pub alive: bool,
}

/// The registry of one node: its blob store, the dialer of blob streams, and the shared state.
pub struct Registry {
    node: Arc<NodeState>,
    store: Arc<BlobStore>,
    dialer: BlobDialer,
    /// One pull per blob at a time on this node: concurrent callers wait for it.
    pulls: PullGates,
}

/// One pull per blob at a time: callers asking for the same blob take turns (the later ones
/// then find it in the store). A blob's gate is dropped with its last turn, so the map holds
/// only blobs being pulled now (a waiter that gives up can leave its gate until the blob's
/// next pull).
#[derive(Default)]
struct PullGates {
    gates: std::sync::Mutex<std::collections::HashMap<Hash, Arc<tokio::sync::Mutex<()>>>>,
}

/// A caller's turn to pull one blob; the next caller's turn starts when it is dropped.
struct PullTurn<'a> {
    gates: &'a PullGates,
    hash: Hash,
    gate: Arc<tokio::sync::Mutex<()>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl PullGates {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Hash, Arc<tokio::sync::Mutex<()>>>>
    {
        self.gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for this caller's turn to pull `hash`.
    async fn enter(&self, hash: Hash) -> PullTurn<'_> {
        let gate = self.lock().entry(hash).or_default().clone();
        let held = gate.clone().lock_owned().await;
        PullTurn {
            gates: self,
            hash,
            gate,
            held: Some(held),
        }
    }

    /// Blobs with a gate (being pulled, or waited for).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for PullTurn<'_> {
    fn drop(&mut self) {
        self.held.take();
        let mut gates = self.gates.lock();
        // Only the map's reference and ours are left: nobody waits for this blob.
        if Arc::strong_count(&self.gate) == 2 {
            gates.remove(&self.hash);
        }
    }
}

impl Registry {
    /// A registry over this node's store.
    pub fn new(node: Arc<NodeState>, store: Arc<BlobStore>, dialer: BlobDialer) -> Self {
        Self {
            node,
            store,
            dialer,
            pulls: Default::default(),
        }
    }

    /// This node's store.
    pub fn store(&self) -> &Arc<BlobStore> {
        &self.store
    }

    fn read<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, RegistryError> {
        let replica = self.node.replica.lock().expect("replica lock");
        let Some(e) = replica.map().get(key) else {
            return Ok(None);
        };
        let bytes = e.value.as_deref().unwrap_or_default();
        serde_json::from_slice(bytes)
            .map(Some)
            .map_err(|err| RegistryError::CorruptRecord {
                key: key.to_string(),
                reason: err.to_string(),
            })
    }

    fn write<T: Serialize>(&self, key: &str, value: &T) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        self.node.write(key, Some(bytes))?;
        Ok(())
    }

    /// The state's record of a blob.
    pub fn blob_meta(&self, hash: &Hash) -> Result<Option<BlobMeta>, RegistryError> {
        self.read(&format!("{BLOB_PREFIX}{hash}"))
    }

    /// A blob's meta, waiting a few seconds for it to arrive: the record naming the blob
    /// (an image, a function) can arrive by gossip before the blob's own record does.
    async fn wait_blob_meta(&self, hash: &Hash) -> Result<BlobMeta, RegistryError> {
        let deadline = tokio::time::Instant::now() + transfer::HOLDERS_GRACE;
        loop {
            if let Some(meta) = self.blob_meta(hash)? {
                return Ok(meta);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RegistryError::UnknownBlob(*hash));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Records that this node holds a complete blob, and the blob's meta if new.
    pub fn record_local(
        &self,
        info: &BlobInfo,
        pinned: bool,
        replicas: u32,
    ) -> Result<BlobMeta, RegistryError> {
        let key = format!("{BLOB_PREFIX}{}", info.hash);
        let meta = match self.read::<BlobMeta>(&key)? {
            Some(mut m) => {
                if pinned && !m.pinned {
                    m.pinned = true;
                    self.write(&key, &m)?;
                }
                m
            }
            None => {
                let m = BlobMeta {
                    size: info.size,
                    chunks_hash: info.chunks_hash,
                    sha256: info.sha256.clone(),
                    pinned,
                    replicas,
                    created_ms: now_ms(),
                };
                self.write(&key, &m)?;
                m
            }
        };
        let holder_key = format!("{HOLDER_PREFIX}{}/{}", info.hash, self.node.peer_id);
        let held = self
            .node
            .replica
            .lock()
            .expect("replica lock")
            .map()
            .get(&holder_key)
            .is_some();
        if !held {
            self.node.write(&holder_key, Some(b"1".to_vec()))?;
        }
        Ok(meta)
    }

    /// Imports bytes from a client into the local store and the state. When
    /// `expected_sha256` is given, bytes that hash otherwise are refused (and left for GC).
    pub fn put_local(
        &self,
        reader: impl std::io::Read,
        expected_sha256: Option<&str>,
        pinned: bool,
        replicas: u32,
    ) -> Result<(BlobInfo, BlobMeta), RegistryError> {
        // The pins keep the new blob from collection until its record is written.
        let (info, _pins) = self.store.import(reader)?;
        if let Some(want) = expected_sha256
            && want != info.sha256
        {
            return Err(RegistryError::WrongDigest {
                what: format!("blob {}", info.hash),
                expected: want.to_string(),
                found: info.sha256,
            });
        }
        let meta = self.record_local(&info, pinned, replicas)?;
        Ok((info, meta))
    }

    /// The nodes named by the records `<prefix><peer id>`, with their names and whether they
    /// are alive now; alive ones first.
    fn nodes_under(&self, prefix: &str) -> Vec<Holder> {
        let peers: Vec<String> = {
            let replica = self.node.replica.lock().expect("replica lock");
            replica
                .map()
                .list(prefix)
                .map(|e| e.key[prefix.len()..].to_string())
                .collect()
        };
        let table = self.node.membership.read().expect("membership lock");
        let mut out: Vec<Holder> = peers
            .iter()
            .filter_map(|p| {
                let peer: PeerId = p.parse().ok()?;
                let member = table.get(p);
                Some(Holder {
                    peer,
                    name: member.map(|m| m.heartbeat.name.clone()),
                    alive: member.is_some_and(|m| m.state == MemberState::Alive),
                })
            })
            .collect();
        out.sort_by_key(|h| (!h.alive, h.name.clone()));
        out
    }

    /// Whether `peer` holds the whole blob according to the state.
    pub fn holds(&self, hash: &Hash, peer: &PeerId) -> bool {
        let key = format!("{HOLDER_PREFIX}{hash}/{peer}");
        let replica = self.node.replica.lock().expect("replica lock");
        replica.map().get(&key).is_some_and(|e| e.value.is_some())
    }

    /// Holders of a blob according to the state, alive ones first.
    pub fn holders(&self, hash: &Hash) -> Vec<Holder> {
        self.nodes_under(&format!("{HOLDER_PREFIX}{hash}/"))
    }

    /// Live nodes to fetch a blob from: its holders, and other nodes pulling it right now.
    pub fn sources(&self, hash: &Hash) -> Vec<Source> {
        let me = self.node.peer_id;
        let holders = self.holders(hash).into_iter().map(|h| (h, true));
        let pullers = self
            .nodes_under(&format!("{PULLING_PREFIX}{hash}/"))
            .into_iter()
            .map(|h| (h, false));
        let mut out: Vec<Source> = Vec::new();
        for (h, complete) in holders.chain(pullers) {
            if h.alive && h.peer != me && !out.iter().any(|s| s.peer == h.peer) {
                out.push(Source {
                    peer: h.peer,
                    complete,
                });
            }
        }
        out
    }

    /// Makes a blob complete in the local store, pulling it from holders if needed.
    pub async fn ensure_local(
        &self,
        hash: &Hash,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<BlobInfo, RegistryError> {
        let meta = self.wait_blob_meta(hash).await?;
        let _turn = self.pulls.enter(*hash).await;
        if !self.store.has(hash) {
            let expected = Expected {
                hash: *hash,
                chunks_hash: meta.chunks_hash,
                sha256: meta.sha256.clone(),
            };
            // Tell fellow pullers that this node has pieces to share while it pulls. The
            // record is stale after a crash anyway, so it is not worth an fsync (two per blob).
            let pulling_key = format!("{PULLING_PREFIX}{hash}/{}", self.node.peer_id);
            self.node.write_lazy(&pulling_key, Some(b"1".to_vec()))?;
            let sources = || self.sources(hash);
            let result =
                transfer::fetch(&self.dialer, &self.store, expected, sources, progress).await;
            if let Err(e) = self.node.write_lazy(&pulling_key, None) {
                // The pull's own outcome matters more (a full disk fails both).
                tracing::warn!(blob = %hash, error = %e, "cannot clear the pulling record");
            }
            let (info, report) = result?;
            tracing::info!(blob = %hash, from_holders = report.chunks_from_holders,
                from_pullers = report.chunks_from_pullers, present = report.chunks_present,
                liars = report.liars.len(), "blob pulled");
            self.record_local(&info, meta.pinned, meta.replicas)?;
            return Ok(info);
        }
        progress(meta.size);
        let list = self.store.chunk_list(hash)?;
        let info = BlobInfo {
            hash: *hash,
            size: list.size,
            chunks_hash: list.hash(),
            sha256: meta.sha256.clone(),
        };
        self.record_local(&info, meta.pinned, meta.replicas)?;
        Ok(info)
    }

    /// Deletes this node's `pulling/` records of blobs it is not pulling now: left by a pull of
    /// an earlier process (killed mid-pull), or brought back by anti-entropy after a crash lost
    /// the lazy write that cleared one. Fellow pullers would otherwise keep asking this node
    /// for pieces of a pull it no longer runs. Runs with every replication pass; returns how
    /// many records went.
    pub fn forget_stale_pulls(&self) -> usize {
        let suffix = format!("/{}", self.node.peer_id);
        let mine: Vec<(String, Hash)> = {
            let replica = self.node.replica.lock().expect("replica lock");
            replica
                .map()
                .list(PULLING_PREFIX)
                .filter_map(|e| {
                    let hash = e.key.strip_prefix(PULLING_PREFIX)?.strip_suffix(&suffix)?;
                    Some((e.key.clone(), hash.parse().ok()?))
                })
                .collect()
        };
        // Holding the gates: a pull of one of these blobs that starts meanwhile writes its
        // record after this delete, not before it.
        let gates = self.pulls.lock();
        let mut forgotten = 0;
        for (key, hash) in mine {
            if gates.contains_key(&hash) {
                continue;
            }
            match self.node.write_lazy(&key, None) {
                Ok(_) => forgotten += 1,
                Err(e) => tracing::warn!(%key, error = %e, "cannot delete a stale pulling record"),
            }
        }
        if forgotten > 0 {
            tracing::info!(
                records = forgotten,
                "deleted pulling records of pulls this node no longer runs"
            );
        }
        forgotten
    }

    /// Makes every blob of `image` complete in the local store, pulling up to
    /// [`IMAGE_PULL_CONCURRENCY`] of them at once; `progress` gets the bytes of all of them.
    /// Every pull that starts runs to its end (an interrupted pull would leave its
    /// `pulling` record behind); the first error is returned.
    pub async fn ensure_image_local(
        &self,
        image: &ImageRecord,
        progress: impl Fn(u64) + Clone + Send + Sync + 'static,
    ) -> Result<(), RegistryError> {
        use futures::StreamExt as _;
        let mut hashes: Vec<Hash> = Vec::new();
        for blob in image.blobs() {
            if !hashes.contains(&blob.blake3) {
                hashes.push(blob.blake3);
            }
        }
        let started = std::time::Instant::now();
        let blobs = hashes.len();
        let results: Vec<Result<BlobInfo, RegistryError>> = futures::stream::iter(hashes)
            .map(|hash| {
                let progress = progress.clone();
                async move { self.ensure_local(&hash, progress).await }
            })
            .buffer_unordered(IMAGE_PULL_CONCURRENCY)
            .collect()
            .await;
        tracing::debug!(image = %image.reference(), blobs, elapsed = ?started.elapsed(),
            "image blobs local");
        results.into_iter().try_for_each(|r| r.map(drop))
    }

    /// Registers an image whose blobs were pushed, after checking every one of them.
    pub fn create_image(&self, mut image: ImageRecord) -> Result<ImageRecord, RegistryError> {
        parse_reference(&image.reference())?;
        let mut what = vec!["manifest".to_string(), "config".to_string()];
        what.extend((0..image.layers.len()).map(|i| format!("layer {i}")));
        for (blob, what) in image.blobs().zip(what) {
            let meta = self
                .blob_meta(&blob.blake3)?
                .ok_or_else(|| RegistryError::MissingBlob {
                    what: what.clone(),
                    sha256: blob.sha256.clone(),
                    blake3: blob.blake3,
                })?;
            if meta.sha256 != blob.sha256 || meta.size != blob.size {
                return Err(RegistryError::WrongDigest {
                    what,
                    expected: format!("{} ({} bytes)", blob.sha256, blob.size),
                    found: format!("{} ({} bytes)", meta.sha256, meta.size),
                });
            }
        }
        image.created_ms = now_ms();
        if image.replicas == 0 {
            image.replicas = DEFAULT_REPLICAS;
        }
        self.write(&format!("{IMAGE_PREFIX}{}", image.reference()), &image)?;
        Ok(image)
    }

    /// An image by `name:tag`.
    pub fn image(&self, reference: &str) -> Result<ImageRecord, RegistryError> {
        parse_reference(reference)?;
        self.read(&format!("{IMAGE_PREFIX}{reference}"))?
            .ok_or_else(|| RegistryError::UnknownImage(reference.to_string()))
    }

    /// Every image, by reference.
    pub fn images(&self) -> Result<Vec<ImageRecord>, RegistryError> {
        let entries: Vec<(String, Vec<u8>)> = {
            let replica = self.node.replica.lock().expect("replica lock");
            replica
                .map()
                .list(IMAGE_PREFIX)
                .map(|e| (e.key.clone(), e.value.clone().unwrap_or_default()))
                .collect()
        };
        entries
            .into_iter()
            .map(|(key, v)| {
                serde_json::from_slice(&v).map_err(|e| RegistryError::CorruptRecord {
                    key,
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Removes a tag. Blobs no other image uses and nobody pinned lose their record, and the
    /// stores collect them after the grace period.
    pub fn remove_image(&self, reference: &str) -> Result<(), RegistryError> {
        let image = self.image(reference)?;
        self.node
            .write(&format!("{IMAGE_PREFIX}{reference}"), None)?;
        let still_used = self.referenced_by_images()?;
        for blob in image.blobs() {
            if still_used.contains(&blob.blake3) {
                continue;
            }
            if let Some(meta) = self.blob_meta(&blob.blake3)?
                && !meta.pinned
            {
                self.forget_blob(&blob.blake3)?;
            }
        }
        Ok(())
    }

    /// Removes a blob's record and holder entries (the bytes go at the next collection).
    pub fn forget_blob(&self, hash: &Hash) -> Result<(), RegistryError> {
        self.node.write(&format!("{BLOB_PREFIX}{hash}"), None)?;
        for h in self.holders(hash) {
            self.node
                .write(&format!("{HOLDER_PREFIX}{hash}/{}", h.peer), None)?;
        }
        Ok(())
    }

    fn referenced_by_images(&self) -> Result<HashSet<Hash>, RegistryError> {
        Ok(self
            .images()?
            .iter()
            .flat_map(|i| i.blobs().map(|b| b.blake3).collect::<Vec<_>>())
            .collect())
    }

    /// Every blob the state records, with its meta.
    pub fn blob_metas(&self) -> Result<BTreeMap<Hash, BlobMeta>, RegistryError> {
        let entries: Vec<(String, Vec<u8>)> = {
            let replica = self.node.replica.lock().expect("replica lock");
            replica
                .map()
                .list(BLOB_PREFIX)
                .map(|e| (e.key.clone(), e.value.clone().unwrap_or_default()))
                .collect()
        };
        let mut out = BTreeMap::new();
        for (key, v) in entries {
            let Ok(hash) = key[BLOB_PREFIX.len()..].parse::<Hash>() else {
                continue;
            };
            let meta = serde_json::from_slice(&v).map_err(|e| RegistryError::CorruptRecord {
                key,
                reason: e.to_string(),
            })?;
            out.insert(hash, meta);
        }
        Ok(out)
    }

    /// The nodes that should hold something (a blob, or a whole image): the top `replicas`
    /// live nodes, current holders first (so a copy never moves needlessly), then by
    /// rendezvous hash of (`key`, node).
    fn replica_targets(&self, key: &[u8], holders: &HashSet<PeerId>, replicas: u32) -> Vec<PeerId> {
        let live: Vec<PeerId> = {
            let table = self.node.membership.read().expect("membership lock");
            table
                .members()
                .into_iter()
                .filter(|m| m.state == MemberState::Alive)
                .filter_map(|m| m.heartbeat.peer_id.parse().ok())
                .collect()
        };
        let mut ranked: Vec<(bool, [u8; 32], PeerId)> = live
            .into_iter()
            .map(|p| {
                let mut h = blake3::Hasher::new();
                h.update(b"meshwork/registry/replica/v1");
                h.update(key);
                h.update(&p.to_bytes());
                (!holders.contains(&p), *h.finalize().as_bytes(), p)
            })
            .collect();
        ranked.sort();
        ranked
            .into_iter()
            .take(replicas as usize)
            .map(|(_, _, p)| p)
            .collect()
    }

    fn live_holders(&self, hash: &Hash) -> HashSet<PeerId> {
        self.holders(hash)
            .into_iter()
            .filter(|h| h.alive)
            .map(|h| h.peer)
            .collect()
    }

    /// One replication pass. Images replicate as units (all their blobs to the same nodes,
    /// chosen by the manifest's hash), pinned blobs on their own; this node pulls whatever it
    /// is a target for and lacks.
    pub async fn replicate_once(&self) -> usize {
        self.forget_stale_pulls();
        let (Ok(images), Ok(metas)) = (self.images(), self.blob_metas()) else {
            return 0;
        };
        let me = self.node.peer_id;
        let mut wanted: Vec<Hash> = Vec::new();
        let mut in_images: HashSet<Hash> = HashSet::new();
        for image in &images {
            let blobs: Vec<Hash> = image.blobs().map(|b| b.blake3).collect();
            in_images.extend(blobs.iter().copied());
            // Nodes holding the whole image.
            let mut complete: Option<HashSet<PeerId>> = None;
            for b in &blobs {
                let h = self.live_holders(b);
                complete = Some(match complete {
                    None => h,
                    Some(c) => c.intersection(&h).copied().collect(),
                });
            }
            let complete = complete.unwrap_or_default();
            if self
                .replica_targets(&image.manifest.blake3.0, &complete, image.replicas)
                .contains(&me)
            {
                wanted.extend(blobs);
            }
        }
        for (hash, meta) in &metas {
            if !in_images.contains(hash)
                && self
                    .replica_targets(&hash.0, &self.live_holders(hash), meta.replicas)
                    .contains(&me)
            {
                wanted.push(*hash);
            }
        }
        // Several at once, as an image pull (a blob wanted twice is pulled once).
        use futures::StreamExt as _;
        let mut seen = HashSet::new();
        wanted.retain(|h| seen.insert(*h));
        futures::stream::iter(wanted)
            .map(|hash| async move {
                let held_here = self.store.has(&hash);
                let recorded = self.holders(&hash).iter().any(|h| h.peer == me);
                if held_here && recorded {
                    return 0;
                }
                match self.ensure_local(&hash, |_| {}).await {
                    Ok(_) if !held_here => {
                        metrics::counter!("mesh_blob_replications_total").increment(1);
                        tracing::info!(blob = %hash, "replicated blob to this node");
                        1
                    }
                    Ok(_) => 0,
                    Err(e) => {
                        tracing::warn!(blob = %hash, error = %e, "replication pull failed");
                        0
                    }
                }
            })
            .buffer_unordered(IMAGE_PULL_CONCURRENCY)
            .fold(0, |n, one| async move { n + one })
            .await
    }

    /// The name containerd knows a mesh image by.
    pub fn containerd_name(image: &ImageRecord) -> String {
        format!("meshwork.local/{}", image.reference())
    }

    /// Pulls an image onto this node and imports it into `containerd`: content with its
    /// sha256 digests (containerd verifies them), the image record, unpacked snapshots.
    pub async fn import_to_containerd(
        &self,
        reference: &str,
        containerd: &Containerd,
    ) -> Result<(String, ImportReport), RegistryError> {
        let image = self.image(reference)?;
        self.ensure_image_local(&image, |_| {}).await?;
        let oci = |b: &ImageBlob| OciBlob {
            digest: b.sha256.clone(),
            size: b.size,
            media_type: b.media_type.clone(),
        };
        let name = Self::containerd_name(&image);
        let to_import = ImageToImport {
            name: name.clone(),
            manifest: oci(&image.manifest),
            config: oci(&image.config),
            layers: image.layers.iter().map(oci).collect(),
        };
        // containerd names blobs by sha256; the store by blake3.
        let by_sha: Vec<(String, Hash)> = image
            .blobs()
            .map(|b| (b.sha256.clone(), b.blake3))
            .collect();
        let store = self.store.clone();
        let report = containerd
            .import(&to_import, |blob| {
                let hash = by_sha
                    .iter()
                    .find(|(sha, _)| *sha == blob.digest)
                    .map(|(_, h)| *h)
                    .ok_or_else(|| {
                        std::io::Error::other(format!("{} is not in the image", blob.digest))
                    })?;
                store
                    .reader(&hash)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            })
            .await?;
        tracing::info!(image = %reference, containerd = %name, ?report, "image imported into containerd");
        Ok((name, report))
    }

    /// One garbage-collection pass over the local store: keeps every blob the state still
    /// records; records nothing refers to (unpinned, in no image, older than `grace`) are
    /// forgotten first.
    pub fn collect_garbage(
        &self,
        grace: Duration,
    ) -> Result<crate::blobs::store::GcReport, RegistryError> {
        let used = self.referenced_by_images()?;
        let metas = self.blob_metas()?;
        let now = now_ms();
        for (hash, meta) in &metas {
            let old = now.saturating_sub(meta.created_ms) >= grace.as_millis() as u64;
            if !meta.pinned && !used.contains(hash) && old {
                self.forget_blob(hash)?;
            }
        }
        let keep: HashSet<Hash> = self.blob_metas()?.into_keys().collect();
        let report = self.store.collect_garbage(&keep, grace)?;
        if report.blobs_removed + report.chunks_removed > 0 {
            tracing::info!(?report, "collected unreferenced blobs");
        }
        Ok(report)
    }

    /// Runs replication every few seconds and collection every minute, until shutdown.
    pub async fn run_background(
        self: Arc<Self>,
        grace: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut replicate = tokio::time::interval(Duration::from_secs(3));
        let mut gc = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = replicate.tick() => { self.replicate_once().await; }
                _ = gc.tick() => {
                    let this = self.clone();
                    let r = tokio::task::spawn_blocking(move || this.collect_garbage(grace)).await;
                    if let Ok(Err(e)) = r {
                        tracing::warn!(error = %e, "garbage collection failed");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pulling_records_of_pulls_not_running_are_forgotten_and_a_running_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeState::for_tests(dir.path(), "n0");
        let store = Arc::new(BlobStore::open(&dir.path().join("blobs")).unwrap());
        let dialer = BlobDialer::new(
            libp2p_stream::Behaviour::new().new_control(),
            None,
            Arc::new(|_| false),
        );
        let registry = Registry::new(node.clone(), store, dialer);
        let me = node.peer_id;
        let other = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let (stale, running) = (Hash([1u8; 32]), Hash([2u8; 32]));
        let key = |h: &Hash, p: &PeerId| format!("{PULLING_PREFIX}{h}/{p}");
        for k in [key(&stale, &me), key(&running, &me), key(&stale, &other)] {
            node.write(&k, Some(b"1".to_vec())).unwrap();
        }
        let _turn = registry.pulls.enter(running).await;

        assert_eq!(registry.forget_stale_pulls(), 1);
        let live = |k: String| {
            node.replica
                .lock()
                .unwrap()
                .map()
                .get(&k)
                .is_some_and(|e| e.value.is_some())
        };
        assert!(
            !live(key(&stale, &me)),
            "this node's record of a pull it does not run"
        );
        assert!(live(key(&running, &me)), "the record of a pull under way");
        assert!(live(key(&stale, &other)), "another node's record");
        assert_eq!(registry.forget_stale_pulls(), 0);
    }

    #[tokio::test]
    async fn pulls_of_one_blob_take_turns_and_leave_no_gate_behind() {
        let gates = Arc::new(PullGates::default());
        let blob = Hash([7u8; 32]);
        let first = gates.enter(blob).await;
        // A second caller for the same blob waits; one for another blob does not.
        let waiter = {
            let gates = gates.clone();
            tokio::spawn(async move {
                let _turn = gates.enter(blob).await;
            })
        };
        let other = gates.enter(Hash([8u8; 32])).await;
        assert_eq!(gates.len(), 2);
        drop(other);
        assert_eq!(gates.len(), 1, "the other blob's gate went with its turn");
        // The waiter holds the gate too once it is queued on it (map, first turn, waiter).
        let queued = || gates.lock().get(&blob).map_or(0, Arc::strong_count) >= 3;
        for _ in 0..10_000 {
            if queued() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(queued(), "the second caller never queued on the gate");
        assert!(
            !waiter.is_finished(),
            "the second caller waits for the first"
        );
        drop(first);
        waiter.await.unwrap();
        assert_eq!(gates.len(), 0, "no gate is left once every turn is over");
    }

    #[test]
    fn references_follow_docker_rules() {
        assert_eq!(
            parse_reference("app:1.0").unwrap(),
            ("app".into(), "1.0".into())
        );
        assert!(parse_reference("team/my-app:v2_rc.1").is_ok());
        for bad in [
            "app",
            "App:1",
            "app:",
            ":1",
            "app:-x",
            "a//b:1",
            "app:bad tag",
            "app:1/2",
            "-app:1",
        ] {
            assert!(parse_reference(bad).is_err(), "{bad} should be refused");
        }
    }
}
