//! The content-addressed blob store of one node, on its disk, behind a narrow API.
//!
//! A blob is named by the blake3 hash of its bytes (what `b3sum` prints). It is kept as
//! fixed-size [`CHUNK_SIZE`] chunks, each stored once under its own blake3 hash, plus a
//! [`ChunkList`] (the blob's size and the hash of every chunk). Identical chunks are stored
//! once, across blobs and images.
//!
//! **Why a hashed chunk list and not bao outboards.** A peer that serves a piece must be
//! caught at the first bad piece. With a chunk list, each 1 MiB piece is checked against its
//! own hash before it is written; the list itself is checked against `chunks_hash`, which
//! travels in the replicated (admitted, signed) desired state. The overhead is 32 bytes per
//! MiB (1/32768, against about 1/256 for bao with 16 KiB groups), the code is a few hundred
//! lines with no tree arithmetic, and chunk-level dedup comes for free. What we give up is
//! verifying ranges smaller than a chunk, which a pull never needs.
//!
//! **Collection during writes.** A push or pull [`Pins`] every chunk (and the blob) it
//! writes or relies on until it is done; garbage collection never removes a pinned hash, so
//! it is safe to run at any moment, with any grace period.
//!
//! **Atomicity.** Every file is written to `tmp/` and renamed into place; a blob's list is
//! written (fsynced) only after a `syncfs` has made all its chunks durable and the whole blob
//! has been checked against its name. A kill -9 at any point leaves either a complete blob or
//! stray chunks that garbage collection removes; never a blob that reads wrong.
//!
//! **Pulled chunks bypass the page cache.** A chunk received from a peer in a [`ChunkBuf`]
//! (page-aligned, a whole number of pages) is written with `O_DIRECT`: straight from the buffer to the disk,
//! with no copy into the page cache, no dirty pages for a later `syncfs` to flush, and no page
//! cache growing by the size of every image pulled. On this project's VMs a buffered write of a
//! 512 MiB pull into fresh page-cache pages cost 0.15-1.7 s of kernel time, the direct write a
//! steady 0.1 s (bench/README.md, bench/pull). Where the file system refuses `O_DIRECT`
//! (tmpfs on older kernels) the store falls back to buffered writes for good. Pushed chunks
//! still go through the page cache: the node that took a push serves them to the replicas
//! right away.
//!
//! **Checking a pulled blob without reading it back.** Each chunk is verified against its own
//! hash when it arrives; the whole blob is then checked against its name from the chunks'
//! blake3 *chaining values* ([`chunk_cv`], computed from the bytes in memory as they arrive),
//! merged up the blake3 tree ([`root_from_cvs`]): the same hash `b3sum` gives, without reading
//! the blob back from disk.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Size of every chunk but a blob's last.
pub const CHUNK_SIZE: usize = 1 << 20;

/// Alignment (of the buffer's address and length) that `O_DIRECT` writes need: a page, which
/// covers every logical block size in use (512 and 4096 bytes).
const DIRECT_ALIGN: usize = 4096;

/// A byte buffer that starts on a page boundary, so that a chunk received into it can be
/// written to disk with `O_DIRECT` (see the module doc). It keeps its allocation when resized
/// within its capacity, so a pull reuses a few of them for all its chunks.
pub struct ChunkBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl ChunkBuf {
    /// A zeroed buffer of `len` bytes with room for `capacity`.
    pub fn with_capacity(len: usize, capacity: usize) -> Self {
        let capacity = capacity.max(len);
        let raw = vec![0u8; capacity + DIRECT_ALIGN];
        // `align_offset` may in principle give up (usize::MAX); then the buffer is just not
        // aligned and its chunk is written through the page cache.
        let start = match raw.as_ptr().align_offset(DIRECT_ALIGN) {
            n if n < DIRECT_ALIGN => n,
            _ => 0,
        };
        Self { raw, start, len }
    }

    /// Sets the length to `len` bytes (their content is whatever was there), growing the
    /// allocation only if needed.
    pub fn resize(&mut self, len: usize) {
        if self.start + len > self.raw.len() {
            *self = Self::with_capacity(len, len);
        }
        self.len = len;
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Whether `bytes` can be written with `O_DIRECT`: page-aligned address and length.
fn direct_ok(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && (bytes.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        && bytes.len().is_multiple_of(DIRECT_ALIGN)
}

/// A blake3 chaining value: the hash of a subtree of a blob's blake3 tree.
pub type ChainingValue = blake3::hazmat::ChainingValue;

/// The chaining value of chunk `index` of a blob (its bytes are `bytes`): what [`root_from_cvs`]
/// merges into the blob's hash. Chunks are [`CHUNK_SIZE`] bytes, a power of two, so each chunk
/// is a whole subtree of the blob's blake3 tree.
pub fn chunk_cv(bytes: &[u8], index: usize) -> ChainingValue {
    use blake3::hazmat::HasherExt as _;
    blake3::Hasher::new()
        .set_input_offset(index as u64 * CHUNK_SIZE as u64)
        .update(bytes)
        .finalize_non_root()
}

/// The blake3 hash of a blob of `size` bytes whose chunks (at least two) have the chaining
/// values `cvs`, merged as blake3 builds its tree (the left subtree of `n` bytes holds the
/// largest power of two of chunks that leaves at least one byte on the right).
pub fn root_from_cvs(size: u64, cvs: &[ChainingValue]) -> Hash {
    use blake3::hazmat::{Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};
    fn subtree(size: u64, cvs: &[ChainingValue]) -> ChainingValue {
        if cvs.len() == 1 {
            return cvs[0];
        }
        let left = (left_subtree_len(size) / CHUNK_SIZE as u64) as usize;
        let (l, r) = cvs.split_at(left);
        let left_bytes = left as u64 * CHUNK_SIZE as u64;
        merge_subtrees_non_root(
            &subtree(left_bytes, l),
            &subtree(size - left_bytes, r),
            Mode::Hash,
        )
    }
    assert!(cvs.len() >= 2, "a blob of one chunk is hashed by its chunk");
    let left = (left_subtree_len(size) / CHUNK_SIZE as u64) as usize;
    let (l, r) = cvs.split_at(left);
    let left_bytes = left as u64 * CHUNK_SIZE as u64;
    let root = merge_subtrees_root(
        &subtree(left_bytes, l),
        &subtree(size - left_bytes, r),
        Mode::Hash,
    );
    Hash(*root.as_bytes())
}

/// A blake3 hash naming a blob or a chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// Hash of some bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..12])
    }
}

/// A string that is not a blake3 hash.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a blake3 hash (64 hex characters)")]
pub struct BadHash(pub String);

impl FromStr for Hash {
    type Err = BadHash;
    fn from_str(s: &str) -> Result<Self, BadHash> {
        let mut out = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(BadHash(s.to_string()));
        }
        Ok(Self(out))
    }
}

/// The size of a blob and the hash of each of its chunks, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkList {
    /// Total bytes.
    pub size: u64,
    /// Hash of each chunk.
    pub chunks: Vec<Hash>,
}

impl ChunkList {
    /// Canonical encoding: size as 8 bytes little endian, then the hashes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + 32 * self.chunks.len());
        v.extend_from_slice(&self.size.to_le_bytes());
        for c in &self.chunks {
            v.extend_from_slice(&c.0);
        }
        v
    }

    /// Decodes [`ChunkList::encode`]'s output, checking that it is consistent.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 8 || !(bytes.len() - 8).is_multiple_of(32) {
            return None;
        }
        let size = u64::from_le_bytes(bytes[..8].try_into().ok()?);
        let chunks: Vec<Hash> = bytes[8..]
            .chunks_exact(32)
            .map(|c| Hash(c.try_into().expect("32 bytes")))
            .collect();
        let expected = size.div_ceil(CHUNK_SIZE as u64) as usize;
        (chunks.len() == expected).then_some(Self { size, chunks })
    }

    /// The hash of the encoding: what the replicated state records as `chunks_hash`.
    pub fn hash(&self) -> Hash {
        Hash::of(&self.encode())
    }

    /// Length of chunk `i`.
    pub fn chunk_len(&self, i: usize) -> usize {
        let start = i as u64 * CHUNK_SIZE as u64;
        (self.size - start).min(CHUNK_SIZE as u64) as usize
    }
}

/// What the store knows of a complete blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    /// blake3 of the content.
    pub hash: Hash,
    /// Bytes.
    pub size: u64,
    /// Hash of the chunk list.
    pub chunks_hash: Hash,
    /// `sha256:<hex>` of the content (what OCI and containerd name it by).
    pub sha256: String,
}

/// Errors of the store. Each names the blob, chunk or file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system error.
    #[error("blob store {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What.
        source: io::Error,
    },
    /// The blob is not (completely) here.
    #[error("blob {0} is not in this node's store")]
    NotFound(Hash),
    /// A chunk's bytes do not hash to the expected value.
    #[error("chunk should hash to {expected} but hashes to {found}")]
    ChunkMismatch {
        /// Expected hash.
        expected: Hash,
        /// Actual hash.
        found: Hash,
    },
    /// The assembled blob does not hash to the expected value.
    #[error("blob should hash to {expected} but its chunks hash to {found}")]
    BlobMismatch {
        /// Expected.
        expected: Hash,
        /// Actual.
        found: Hash,
    },
    /// A chunk list file is corrupt.
    #[error("chunk list of blob {0} is corrupt")]
    CorruptList(Hash),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The store under `<data dir>/blobs`.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
    pins: Mutex<HashMap<Hash, usize>>,
    /// False once the file system refused an `O_DIRECT` write: buffered writes from then on.
    direct_io: AtomicBool,
}

/// Hashes that garbage collection must leave alone while this guard lives.
pub struct Pins<'a> {
    store: &'a BlobStore,
    held: Vec<Hash>,
}

impl Pins<'_> {
    /// Protects one more hash (a chunk or a blob).
    pub fn add(&mut self, h: Hash) {
        *self
            .store
            .pins
            .lock()
            .expect("pins lock")
            .entry(h)
            .or_default() += 1;
        self.held.push(h);
    }
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        let mut pins = self.store.pins.lock().expect("pins lock");
        for h in self.held.drain(..) {
            if let Some(n) = pins.get_mut(&h) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(&h);
                }
            }
        }
    }
}

impl BlobStore {
    /// Opens (creating) the store; leftovers of interrupted writes in `tmp/`, and the partial
    /// lists of pulls that ended with the last process, are removed.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for d in ["chunks", "lists", "partial", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        for d in ["tmp", "partial"] {
            let dir = root.join(d);
            for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let _ = fs::remove_file(e.map_err(io_err(&dir))?.path());
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
            pins: Mutex::new(HashMap::new()),
            direct_io: AtomicBool::new(true),
        })
    }

    fn chunk_path(&self, h: &Hash) -> PathBuf {
        let hex = h.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn list_path(&self, h: &Hash) -> PathBuf {
        self.root.join("lists").join(h.to_hex())
    }

    /// Writes `bytes` to `dest` atomically: temp file, fsync, rename.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        self.write_file(dest, bytes, true, false)
    }

    /// Flushes everything written to the store's file system to disk (one `syncfs` instead
    /// of an fsync per chunk).
    fn sync_all(&self) -> Result<(), StoreError> {
        let dir = File::open(&self.root).map_err(io_err(&self.root))?;
        rustix::fs::syncfs(&dir).map_err(|e| StoreError::Io {
            path: self.root.clone(),
            source: e.into(),
        })
    }

    /// Temp file, optional fsync, rename. Chunks are written without their own fsync: the
    /// list that makes a blob complete is written only after a `syncfs`, and a chunk that a
    /// power loss left wrong is detected by its hash wherever it is used. `direct`: write with
    /// `O_DIRECT` if the bytes are page-aligned.
    fn write_file(
        &self,
        dest: &Path,
        bytes: &[u8],
        durable: bool,
        direct: bool,
    ) -> Result<(), StoreError> {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()));
        let result = (|| {
            if !direct || durable || !direct_ok(bytes) || !self.write_direct(&tmp, bytes)? {
                let mut f = File::create(&tmp)?;
                f.write_all(bytes)?;
                if durable {
                    f.sync_all()?;
                } else {
                    start_writeback(&f);
                }
            }
            if let Some(dir) = dest.parent() {
                fs::create_dir_all(dir)?;
            }
            fs::rename(&tmp, dest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err(dest))
    }

    /// Writes `bytes` (page-aligned, see [`direct_ok`]) to a new file at `tmp` with `O_DIRECT`.
    /// Ok(false) when direct writes are off, or the file system refused this one (they are then
    /// off for good and the caller writes through the page cache).
    fn write_direct(&self, tmp: &Path, bytes: &[u8]) -> io::Result<bool> {
        use std::os::unix::fs::OpenOptionsExt as _;
        if !self.direct_io.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let written = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(tmp)
            .and_then(|mut f| f.write_all(bytes));
        match written {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(store = %self.root.display(), "the file system refuses O_DIRECT; writing chunks through the page cache");
                self.direct_io.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// True when the chunk is stored.
    pub fn has_chunk(&self, h: &Hash) -> bool {
        self.chunk_path(h).exists()
    }

    /// Stores a chunk after checking it hashes to `expected`. A wrong chunk is refused and
    /// nothing is written. The chunk goes through the page cache, where the node's next reads
    /// of it (serving the replicas of a push) find it.
    pub fn put_chunk(&self, expected: &Hash, bytes: &[u8]) -> Result<(), StoreError> {
        self.put_chunk_with(expected, bytes, false)
    }

    /// Stores a chunk received from a peer, like [`BlobStore::put_chunk`], but written with
    /// `O_DIRECT` where the buffer and file system allow (see the module doc).
    pub fn put_received_chunk(&self, expected: &Hash, buf: &ChunkBuf) -> Result<(), StoreError> {
        self.put_chunk_with(expected, buf.as_slice(), true)
    }

    fn put_chunk_with(
        &self,
        expected: &Hash,
        bytes: &[u8],
        direct: bool,
    ) -> Result<(), StoreError> {
        let found = Hash::of(bytes);
        if found != *expected {
            return Err(StoreError::ChunkMismatch {
                expected: *expected,
                found,
            });
        }
        let path = self.chunk_path(expected);
        if self.chunk_ok(expected) {
            touch(&path); // a fresh reference: keep it out of the GC grace window
            return Ok(());
        }
        self.write_file(&path, bytes, false, direct)
    }

    /// True when the chunk is stored and its bytes hash to its name (a chunk a power loss
    /// cut short is not).
    pub fn chunk_ok(&self, h: &Hash) -> bool {
        fs::read(self.chunk_path(h)).is_ok_and(|b| Hash::of(&b) == *h)
    }

    /// Reads a chunk.
    pub fn read_chunk(&self, h: &Hash) -> Result<Vec<u8>, StoreError> {
        let path = self.chunk_path(h);
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound(*h),
            _ => StoreError::Io { path, source: e },
        })
    }

    /// True when the blob is complete here.
    pub fn has(&self, h: &Hash) -> bool {
        self.list_path(h).exists()
    }

    /// The chunk list of a complete blob.
    pub fn chunk_list(&self, h: &Hash) -> Result<ChunkList, StoreError> {
        let path = self.list_path(h);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound(*h),
            _ => StoreError::Io { path, source: e },
        })?;
        ChunkList::decode(&bytes).ok_or(StoreError::CorruptList(*h))
    }

    fn partial_path(&self, h: &Hash) -> PathBuf {
        self.root.join("partial").join(h.to_hex())
    }

    /// Records the (verified) chunk list of a blob being pulled, so that this node can serve
    /// the chunks it already has to other pullers before it has them all. Not fsynced: it
    /// matters only while this process pulls ([`BlobStore::open`] removes what is left).
    pub fn put_partial_list(&self, h: &Hash, list: &ChunkList) -> Result<(), StoreError> {
        self.write_file(&self.partial_path(h), &list.encode(), false, false)
    }

    /// The chunk list of a blob, complete or being pulled.
    pub fn any_list(&self, h: &Hash) -> Option<ChunkList> {
        self.chunk_list(h).ok().or_else(|| {
            fs::read(self.partial_path(h))
                .ok()
                .and_then(|b| ChunkList::decode(&b))
        })
    }

    /// Forgets the partial list of a blob (after its pull committed or gave up).
    pub fn remove_partial_list(&self, h: &Hash) {
        let _ = fs::remove_file(self.partial_path(h));
    }

    /// Deletes the given chunks unless a complete blob uses them: undoes what a failed write
    /// added (for example when the disk filled up), so the store is left as it was.
    pub fn discard_chunks(&self, chunks: &[Hash]) -> Result<usize, StoreError> {
        let mut used = HashSet::new();
        for (h, _) in self.blobs()? {
            used.extend(self.chunk_list(&h)?.chunks);
        }
        let mut removed = 0;
        for c in chunks {
            if !used.contains(c) && fs::remove_file(self.chunk_path(c)).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Marks a blob complete once every chunk of `list` is stored and the chunks hash to
    /// `expected` as one blob. `cvs` holds the chaining value ([`chunk_cv`]) of each chunk the
    /// caller computed as it stored it (`None` where it did not: those chunks are read back and
    /// hashed here). Returns its info, with `sha256` as given: the digest the replicated state
    /// records for the blob, checked by the node that took the push and again by containerd
    /// when the blob is imported (hashing 512 MiB with sha256 again here cost about a sixth of
    /// a pull's CPU).
    pub fn commit(
        &self,
        expected: &Hash,
        list: &ChunkList,
        sha256: &str,
        cvs: &[Option<ChainingValue>],
    ) -> Result<BlobInfo, StoreError> {
        let found = if list.chunks.len() < 2 {
            // One chunk (or none): the blob's hash is its chunk's, checked on the way in; hash
            // it again from disk, which costs at most a chunk.
            let mut b3 = blake3::Hasher::new();
            for c in &list.chunks {
                b3.update(&self.read_chunk(c)?);
            }
            Hash(*b3.finalize().as_bytes())
        } else {
            let mut all = Vec::with_capacity(list.chunks.len());
            for (i, c) in list.chunks.iter().enumerate() {
                all.push(match cvs.get(i).copied().flatten() {
                    Some(cv) => cv,
                    None => chunk_cv(&self.read_chunk(c)?, i),
                });
            }
            root_from_cvs(list.size, &all)
        };
        if found != *expected {
            return Err(StoreError::BlobMismatch {
                expected: *expected,
                found,
            });
        }
        self.sync_all()?;
        self.write_atomic(&self.list_path(expected), &list.encode())?;
        Ok(BlobInfo {
            hash: *expected,
            size: list.size,
            chunks_hash: list.hash(),
            sha256: sha256.to_string(),
        })
    }

    /// A new, empty pin guard.
    pub fn pins(&self) -> Pins<'_> {
        Pins {
            store: self,
            held: Vec::new(),
        }
    }

    /// Starts writing a new blob from a stream of bytes.
    pub fn writer(&self) -> BlobWriter<'_> {
        BlobWriter {
            store: self,
            pins: self.pins(),
            buf: Vec::with_capacity(CHUNK_SIZE),
            chunks: Vec::new(),
            size: 0,
            b3: blake3::Hasher::new(),
            sha: sha2::Sha256::new(),
        }
    }

    /// Copies a whole reader into the store. The blob stays pinned while the returned guard
    /// lives, so the caller can record it before collection may consider it.
    pub fn import(&self, mut reader: impl Read) -> Result<(BlobInfo, Pins<'_>), StoreError> {
        let mut w = self.writer();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = reader.read(&mut buf).map_err(io_err(&self.root))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        w.finish()
    }

    /// A reader over a complete blob's bytes.
    pub fn reader(&self, h: &Hash) -> Result<BlobReader<'_>, StoreError> {
        let list = self.chunk_list(h)?;
        Ok(BlobReader {
            store: self,
            list,
            next: 0,
            current: io::Cursor::new(Vec::new()),
        })
    }

    /// Every complete blob with its size.
    pub fn blobs(&self) -> Result<Vec<(Hash, u64)>, StoreError> {
        let dir = self.root.join("lists");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let Some(h) = e.file_name().to_str().and_then(|n| n.parse::<Hash>().ok()) else {
                continue;
            };
            if let Ok(list) = self.chunk_list(&h) {
                out.push((h, list.size));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Forgets a blob (its chunks go at the next collection if nothing else uses them).
    pub fn remove(&self, h: &Hash) -> Result<bool, StoreError> {
        let path = self.list_path(h);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// Garbage collection: removes complete blobs not in `keep` whose list is older than
    /// `grace`, then chunks used by no remaining blob and older than `grace`. A push or pull
    /// in progress writes its chunks (or touches existing ones) before it commits its list,
    /// so anything it is working on is younger than the grace period and stays.
    pub fn collect_garbage(
        &self,
        keep: &HashSet<Hash>,
        grace: Duration,
    ) -> Result<GcReport, StoreError> {
        let now = SystemTime::now();
        let old = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= grace)
        };
        let mut report = GcReport::default();
        let mut used: HashSet<Hash> = HashSet::new();
        // Partial lists of pulls that died with their node.
        let partial = self.root.join("partial");
        for e in fs::read_dir(&partial).map_err(io_err(&partial))? {
            let path = e.map_err(io_err(&partial))?.path();
            let h = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<Hash>().ok());
            if let Some(h) = h
                && old(&path)
                && !self.pins.lock().expect("pins lock").contains_key(&h)
            {
                let _ = fs::remove_file(&path);
            }
        }
        for (h, _) in self.blobs()? {
            if !keep.contains(&h) && old(&self.list_path(&h)) {
                let pins = self.pins.lock().expect("pins lock");
                if !pins.contains_key(&h) {
                    self.remove(&h)?;
                    report.blobs_removed += 1;
                    continue;
                }
            }
            used.extend(self.chunk_list(&h)?.chunks);
        }
        let chunks = self.root.join("chunks");
        for sub in fs::read_dir(&chunks).map_err(io_err(&chunks))? {
            let sub = sub.map_err(io_err(&chunks))?.path();
            for e in fs::read_dir(&sub).map_err(io_err(&sub))? {
                let path = e.map_err(io_err(&sub))?.path();
                let Some(h) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse::<Hash>().ok())
                else {
                    continue;
                };
                if !used.contains(&h) && old(&path) {
                    // Holding the lock while removing: a writer pins before it writes.
                    let pins = self.pins.lock().expect("pins lock");
                    if pins.contains_key(&h) {
                        continue;
                    }
                    let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    report.chunks_removed += 1;
                    report.bytes_freed += size;
                }
            }
        }
        Ok(report)
    }
}

/// Asks the kernel to start writing a file's dirty pages to disk now, without waiting for it,
/// so that a pull's disk writes overlap its network transfer and the `syncfs` before the
/// commit finds little left to do (it made a 512 MiB pull wait about a quarter of a second).
/// A hint: failure is ignored.
#[allow(unsafe_code)]
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: `f` is an open file for the whole call; sync_file_range only reads its arguments.
    let _ = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

fn touch(path: &Path) {
    if let Ok(f) = File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs forgotten.
    pub blobs_removed: usize,
    /// Chunk files deleted.
    pub chunks_removed: usize,
    /// Bytes of chunks deleted.
    pub bytes_freed: u64,
}

/// Streams a new blob into the store, chunk by chunk.
pub struct BlobWriter<'a> {
    store: &'a BlobStore,
    pins: Pins<'a>,
    buf: Vec<u8>,
    chunks: Vec<Hash>,
    size: u64,
    b3: blake3::Hasher,
    sha: sha2::Sha256,
}

impl<'a> BlobWriter<'a> {
    /// Appends bytes.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        self.b3.update(data);
        self.sha.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = (CHUNK_SIZE - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK_SIZE {
                self.flush_chunk()?;
            }
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> Result<(), StoreError> {
        let h = Hash::of(&self.buf);
        self.pins.add(h);
        self.store.put_chunk(&h, &self.buf)?;
        self.chunks.push(h);
        self.buf.clear();
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// True before the first byte.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Stores the last chunk and commits the blob, which stays pinned while the returned
    /// guard lives.
    pub fn finish(mut self) -> Result<(BlobInfo, Pins<'a>), StoreError> {
        if !self.buf.is_empty() {
            self.flush_chunk()?;
        }
        let list = ChunkList {
            size: self.size,
            chunks: std::mem::take(&mut self.chunks),
        };
        let hash = Hash(*self.b3.finalize().as_bytes());
        self.pins.add(hash);
        let path = self.store.list_path(&hash);
        if !path.exists() {
            self.store.sync_all()?;
            self.store.write_atomic(&path, &list.encode())?;
        } else {
            touch(&path);
        }
        let info = BlobInfo {
            hash,
            size: list.size,
            chunks_hash: list.hash(),
            sha256: format!("sha256:{}", hex::encode(self.sha.finalize())),
        };
        Ok((info, self.pins))
    }
}

/// Reads a blob's bytes in order.
pub struct BlobReader<'a> {
    store: &'a BlobStore,
    list: ChunkList,
    next: usize,
    current: io::Cursor<Vec<u8>>,
}

impl BlobReader<'_> {
    /// Total size.
    pub fn size(&self) -> u64 {
        self.list.size
    }
}

impl Read for BlobReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            let Some(h) = self.list.chunks.get(self.next) else {
                return Ok(0);
            };
            let bytes = self
                .store
                .read_chunk(h)
                .map_err(|e| io::Error::other(e.to_string()))?;
            if Hash::of(&bytes) != *h {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("chunk {h} is corrupt on disk"),
                ));
            }
            self.next += 1;
            self.current = io::Cursor::new(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_pins(p: Pins<'_>) {
        std::mem::drop(p);
    }

    /// Pseudo-random bytes with no repeating chunks.
    fn data(n: usize, seed: u8) -> Vec<u8> {
        let mut v = vec![0u8; n];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut v);
        v
    }

    #[test]
    fn import_read_back_and_hashes_match_b3sum_and_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for n in [
            0,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE + 17,
        ] {
            let bytes = data(n, 1);
            let (info, _) = store.import(&bytes[..]).unwrap();
            assert_eq!(info.hash, Hash::of(&bytes));
            assert_eq!(info.size, n as u64);
            let sha = hex::encode(sha2::Sha256::digest(&bytes));
            assert_eq!(info.sha256, format!("sha256:{sha}"));
            let mut back = Vec::new();
            store
                .reader(&info.hash)
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, bytes);
            let list = store.chunk_list(&info.hash).unwrap();
            assert_eq!(list.hash(), info.chunks_hash);
            assert_eq!(ChunkList::decode(&list.encode()), Some(list));
        }
    }

    #[test]
    fn chaining_values_merge_to_the_blake3_of_the_blob() {
        let mb = CHUNK_SIZE;
        for size in [
            2 * mb,
            2 * mb + 1,
            3 * mb,
            4 * mb,
            5 * mb + 7,
            8 * mb,
            9 * mb - 1,
        ] {
            let bytes = data(size, size as u8);
            let cvs: Vec<_> = bytes
                .chunks(CHUNK_SIZE)
                .enumerate()
                .map(|(i, c)| chunk_cv(c, i))
                .collect();
            assert_eq!(
                root_from_cvs(size as u64, &cvs),
                Hash::of(&bytes),
                "size {size}"
            );
            // A chunk hashed at the wrong place gives another hash.
            let mut swapped = cvs.clone();
            swapped[1] = chunk_cv(&bytes[CHUNK_SIZE..2 * CHUNK_SIZE], 0);
            assert_ne!(root_from_cvs(size as u64, &swapped), Hash::of(&bytes));
        }
    }

    #[test]
    fn commit_uses_the_chaining_values_given_and_hashes_the_rest_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes = data(3 * CHUNK_SIZE + 100, 3);
        let list = ChunkList {
            size: bytes.len() as u64,
            chunks: bytes.chunks(CHUNK_SIZE).map(Hash::of).collect(),
        };
        for (c, h) in bytes.chunks(CHUNK_SIZE).zip(&list.chunks) {
            store.put_chunk(h, c).unwrap();
        }
        let mut cvs: Vec<_> = bytes
            .chunks(CHUNK_SIZE)
            .enumerate()
            .map(|(i, c)| Some(chunk_cv(c, i)))
            .collect();
        cvs[2] = None; // read back from disk
        // A wrong chaining value (say, a chunk that was not the one stored) is caught.
        let mut wrong = cvs.clone();
        wrong[0] = Some(chunk_cv(b"not this", 0));
        assert!(matches!(
            store.commit(&Hash::of(&bytes), &list, "sha256:00", &wrong),
            Err(StoreError::BlobMismatch { .. })
        ));
        assert!(!store.has(&Hash::of(&bytes)));
        let info = store
            .commit(&Hash::of(&bytes), &list, "sha256:00", &cvs)
            .unwrap();
        assert_eq!(info.hash, Hash::of(&bytes));
        assert!(store.has(&info.hash));
    }

    #[test]
    fn a_partial_list_is_served_while_its_pull_runs_and_gone_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(2 * CHUNK_SIZE + 5, 4);
        let list = ChunkList {
            size: bytes.len() as u64,
            chunks: bytes.chunks(CHUNK_SIZE).map(Hash::of).collect(),
        };
        let blob = Hash::of(&bytes);
        {
            let store = BlobStore::open(dir.path()).unwrap();
            store.put_partial_list(&blob, &list).unwrap();
            assert_eq!(store.any_list(&blob).unwrap().hash(), list.hash());
            assert!(!store.has(&blob));
        }
        let store = BlobStore::open(dir.path()).unwrap();
        assert!(
            store.any_list(&blob).is_none(),
            "a stale partial list survived"
        );
    }

    #[test]
    fn aligned_chunks_are_written_directly_and_read_back_intact() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut buf = ChunkBuf::with_capacity(CHUNK_SIZE, CHUNK_SIZE);
        assert!(
            direct_ok(buf.as_slice()),
            "a ChunkBuf of a whole chunk is page-aligned"
        );
        let bytes = data(CHUNK_SIZE, 11);
        buf.as_mut_slice().copy_from_slice(&bytes);
        let h = Hash::of(&bytes);
        store.put_received_chunk(&h, &buf).unwrap();
        assert_eq!(store.read_chunk(&h).unwrap(), bytes);
        assert!(store.chunk_ok(&h));
        // A short last chunk is not aligned in length: written through the page cache.
        buf.resize(1000);
        assert!(!direct_ok(buf.as_slice()));
        buf.as_mut_slice().copy_from_slice(&bytes[..1000]);
        let short = Hash::of(&bytes[..1000]);
        store.put_received_chunk(&short, &buf).unwrap();
        assert_eq!(store.read_chunk(&short).unwrap(), &bytes[..1000]);
        // Growing past the capacity reallocates, still aligned.
        buf.resize(2 * CHUNK_SIZE);
        assert!(direct_ok(buf.as_slice()));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn identical_chunks_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let shared = data(2 * CHUNK_SIZE, 7);
        let mut a = shared.clone();
        a.extend(data(100, 1));
        let mut b = shared.clone();
        b.extend(data(100, 2));
        store.import(&a[..]).unwrap();
        store.import(&b[..]).unwrap();
        let n: usize = fs::read_dir(dir.path().join("chunks"))
            .unwrap()
            .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(
            n, 4,
            "2 shared chunks stored once, plus 2 different tails (6 without dedup)"
        );
    }

    #[test]
    fn a_wrong_chunk_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let good = data(1000, 3);
        let h = Hash::of(&good);
        let err = store.put_chunk(&h, &data(1000, 4)).unwrap_err();
        assert!(matches!(err, StoreError::ChunkMismatch { .. }), "{err}");
        assert!(!store.has_chunk(&h));
        store.put_chunk(&h, &good).unwrap();
        assert!(store.has_chunk(&h));
    }

    #[test]
    fn commit_checks_the_whole_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes = data(CHUNK_SIZE + 5, 9);
        let list = ChunkList {
            size: bytes.len() as u64,
            chunks: bytes.chunks(CHUNK_SIZE).map(Hash::of).collect(),
        };
        for (c, h) in bytes.chunks(CHUNK_SIZE).zip(&list.chunks) {
            store.put_chunk(h, c).unwrap();
        }
        let wrong = Hash::of(b"something else");
        assert!(matches!(
            store.commit(&wrong, &list, "sha256:00", &[]),
            Err(StoreError::BlobMismatch { .. })
        ));
        assert!(!store.has(&wrong));
        let info = store
            .commit(&Hash::of(&bytes), &list, "sha256:00", &[])
            .unwrap();
        assert!(store.has(&info.hash));
        assert_eq!(info.sha256, "sha256:00", "the digest recorded in the state");
    }

    #[test]
    fn interrupted_writes_leave_no_blob_and_tmp_is_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = BlobStore::open(dir.path()).unwrap();
            let mut w = store.writer();
            w.write(&data(2 * CHUNK_SIZE + 10, 5)).unwrap();
            // dropped without finish: as if killed
            fs::write(dir.path().join("tmp").join("123-0"), b"half").unwrap();
        }
        let store = BlobStore::open(dir.path()).unwrap();
        assert!(store.blobs().unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // the stray chunks go at collection
        let r = store
            .collect_garbage(&HashSet::new(), Duration::ZERO)
            .unwrap();
        assert_eq!(r.chunks_removed, 2);
    }

    #[test]
    fn gc_keeps_referenced_and_young_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let (keep, _) = store.import(&data(CHUNK_SIZE + 1, 1)[..]).unwrap();
        let (drop, pins) = store.import(&data(CHUNK_SIZE + 1, 2)[..]).unwrap();
        drop_pins(pins);
        let keep_set = HashSet::from([keep.hash]);
        // within the grace period nothing goes
        let r = store
            .collect_garbage(&keep_set, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(r, GcReport::default());
        let r = store.collect_garbage(&keep_set, Duration::ZERO).unwrap();
        assert_eq!(r.blobs_removed, 1);
        assert_eq!(r.chunks_removed, 2);
        assert!(store.has(&keep.hash) && !store.has(&drop.hash));
        let mut back = Vec::new();
        store
            .reader(&keep.hash)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data(CHUNK_SIZE + 1, 1));
    }

    #[test]
    fn collection_never_removes_what_a_write_in_progress_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut w = store.writer();
        w.write(&data(2 * CHUNK_SIZE, 8)).unwrap();
        // A collection with no grace at all, in the middle of the write.
        let r = store
            .collect_garbage(&HashSet::new(), Duration::ZERO)
            .unwrap();
        assert_eq!(r.chunks_removed, 0);
        let (info, pins) = w.finish().unwrap();
        let r = store
            .collect_garbage(&HashSet::new(), Duration::ZERO)
            .unwrap();
        assert_eq!(
            r,
            GcReport::default(),
            "the finished blob is pinned until recorded"
        );
        let mut back = Vec::new();
        store
            .reader(&info.hash)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data(2 * CHUNK_SIZE, 8));
        drop(pins);
        let r = store
            .collect_garbage(&HashSet::new(), Duration::ZERO)
            .unwrap();
        assert_eq!((r.blobs_removed, r.chunks_removed), (1, 2));
    }

    #[test]
    fn corruption_on_disk_is_detected_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let (info, _) = store.import(&data(5000, 1)[..]).unwrap();
        let list = store.chunk_list(&info.hash).unwrap();
        fs::write(store.chunk_path(&list.chunks[0]), b"rot").unwrap();
        let mut out = Vec::new();
        let err = store
            .reader(&info.hash)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn hashes_parse_and_reject_garbage() {
        let h = Hash::of(b"x");
        assert_eq!(h.to_hex().parse::<Hash>().unwrap(), h);
        assert!("xyz".parse::<Hash>().is_err());
        assert!("zz".repeat(32).parse::<Hash>().is_err());
        assert!(ChunkList::decode(&[1, 2, 3]).is_none());
        // size says 2 chunks, only one hash
        let mut bad = ((CHUNK_SIZE + 1) as u64).to_le_bytes().to_vec();
        bad.extend([0u8; 32]);
        assert!(ChunkList::decode(&bad).is_none());
    }
}
