//! Reading container image tars for `meshctl image push`.
//!
//! `meshctl image push ./app.tar --tag app:1.0` uploads an image that exists
//! only as a tar on the user's machine to a node's content-addressed store,
//! and the node later hands exactly those bytes to containerd. containerd
//! checks the sha256 digest of every blob itself, so this module makes sure,
//! before anything is registered, that the digest and size of every blob
//! (manifest, config, layers) are known and that the bytes really match them.
//!
//! Two tar formats are understood (see [`TarFormat`]):
//!
//! * an OCI image layout tar (`oci-layout`, `index.json`, `blobs/sha256/…`),
//!   as written by `skopeo`, `buildah`, `ctr export`, `docker buildx
//!   --output type=oci` and `docker save` from Docker 25 on;
//! * a legacy `docker save` tar (`manifest.json`, `<id>/layer.tar`,
//!   `<config>.json`), for which an image manifest is synthesized.
//!
//! The work is split in two passes so that a 512 MiB image is never held in
//! memory:
//!
//! 1. [`plan_image`] indexes the tar (headers only, seeking over file data),
//!    reads the small JSON documents and returns an [`ImagePlan`];
//! 2. [`stream_blobs`] hands every blob of the plan to a caller-supplied sink
//!    as a reader, hashing the bytes as they stream through.
//!
//! Paths inside the tar are only ever used to look entries up in the tar
//! itself; nothing is extracted to disk.
//!
//! [`write_oci_layout_tar`] and [`write_docker_save_tar`] build small images
//! for tests and tooling.

use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, DigestAlgorithm, ImageConfigurationBuilder,
    ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder, MediaType, Os,
    PlatformBuilder, RootFsBuilder,
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index (a multi-platform list of manifests).
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed OCI layer.
pub const MEDIA_TYPE_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a Docker image manifest, v2 schema 2.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of a Docker manifest list (the Docker counterpart of an OCI index).
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media type of a Docker image config.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Media type of an uncompressed Docker layer.
pub const MEDIA_TYPE_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Media type of a gzip-compressed Docker layer.
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Largest JSON document (index, manifest, config, `manifest.json`) read into memory.
pub const MAX_JSON_SIZE: u64 = 8 * 1024 * 1024;

/// The platform this module selects from multi-platform images.
const WANTED_PLATFORM: &str = "linux/amd64";
/// How deep image indexes may nest inside each other.
const MAX_INDEX_DEPTH: usize = 4;
/// How many symbolic or hard links a lookup follows before giving up.
const MAX_LINK_HOPS: usize = 16;
/// Files of a tar to write: (path, contents).
type TarFiles = Vec<(String, Vec<u8>)>;
/// Buffer size for reading layer bytes.
const READ_BUFFER: usize = 256 * 1024;
/// `PATH` written into the configs of images built by the fixture helpers.
const DEFAULT_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Which kind of image tar was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarFormat {
    /// An OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`).
    /// Docker 25 and later write this layout (plus a `manifest.json`) from
    /// `docker save`; the layout is preferred whenever it is present.
    OciLayout,
    /// A legacy `docker save` tar (`manifest.json`, `<id>/layer.tar`,
    /// `<config>.json`). Its image manifest is synthesized, and its layer
    /// files are read twice: once by [`plan_image`] to learn their digests,
    /// once by [`stream_blobs`].
    DockerSave,
}

/// Where the bytes of a blob come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobSource {
    /// A file inside the image tar, by its normalized path (no leading `./`
    /// or `/`). Symbolic and hard links inside the tar are followed when the
    /// blob is read.
    TarEntry(String),
    /// Bytes built by this module, such as the manifest synthesized for a
    /// legacy `docker save` tar.
    Inline(Vec<u8>),
}

/// One blob of an image: its digest, size, media type and where to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// Content digest, `sha256:<64 lowercase hex digits>`.
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Media type, as the image manifest names it (or as synthesized).
    pub media_type: String,
    /// Where the bytes are.
    pub source: BlobSource,
}

/// What [`plan_image`] found in an image tar: every blob to upload, with its
/// digest and size, and the manifest that ties them together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePlan {
    /// The format of the tar.
    pub format: TarFormat,
    /// The single-platform image manifest to hand to containerd.
    pub manifest: BlobRef,
    /// Media type of [`ImagePlan::manifest`] (equal to `manifest.media_type`),
    /// e.g. [`MEDIA_TYPE_OCI_MANIFEST`] or [`MEDIA_TYPE_DOCKER_MANIFEST`].
    pub manifest_media_type: String,
    /// The image config.
    pub config: BlobRef,
    /// The layers, base layer first. The same digest may appear twice.
    pub layers: Vec<BlobRef>,
    /// `os/architecture[/variant]` from the config (e.g. `linux/amd64`), if
    /// the config names both.
    pub platform: Option<String>,
}

impl ImagePlan {
    /// The blobs in the order [`stream_blobs`] hands them to its sink: the
    /// layers in order, then the config, then the manifest, each distinct
    /// digest once. The manifest comes last so that everything it references
    /// has been uploaded before it.
    pub fn blobs(&self) -> Vec<&BlobRef> {
        let mut seen = HashSet::new();
        self.layers
            .iter()
            .chain([&self.config, &self.manifest])
            .filter(|blob| seen.insert(blob.digest.as_str()))
            .collect()
    }

    /// Total number of bytes [`stream_blobs`] hands to its sink.
    pub fn total_size(&self) -> u64 {
        self.blobs().iter().map(|blob| blob.size).sum()
    }
}

/// Everything that can go wrong reading an image tar.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// Reading (or, for the fixture helpers, writing) a file failed.
    #[error("cannot read or write {}: {source}", path.display())]
    Io {
        /// The file on disk.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not a tar archive at all.
    #[error("{} is not a tar archive: {reason}", path.display())]
    NotATar {
        /// The file on disk.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// The file starts like a tar archive but is damaged or truncated.
    #[error("{} is a damaged tar archive: {reason}", path.display())]
    CorruptTar {
        /// The file on disk.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A valid tar that is neither an OCI image layout nor a `docker save` tar.
    #[error(
        "{} is a tar archive but not an image: an OCI image layout needs `oci-layout` and \
         `index.json`, a `docker save` tar needs `manifest.json`; it contains {}",
        path.display(),
        list_or_none(entries)
    )]
    UnknownFormat {
        /// The file on disk.
        path: PathBuf,
        /// The first few entry names, for the message.
        entries: Vec<String>,
    },
    /// A file named by `manifest.json` of a `docker save` tar is not in the tar.
    #[error("{file} is not in the image tar, but {referenced_by} names it")]
    MissingFile {
        /// The path that was looked up.
        file: String,
        /// The document that named it.
        referenced_by: String,
    },
    /// A JSON document is not valid JSON or lacks a required field.
    #[error("{file} in the image tar is not a valid document: {source}")]
    InvalidJson {
        /// The document, by its path in the tar.
        file: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON document parses but breaks a rule of its format.
    #[error("{file} in the image tar is invalid: {reason}")]
    InvalidDocument {
        /// The document, by its path in the tar (or `image plan`).
        file: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A blob named by a manifest or index is not in the tar.
    #[error("blob {digest} named by {referenced_by} is not in the image tar (looked for {path})")]
    MissingBlob {
        /// The digest of the missing blob.
        digest: String,
        /// The path that was looked up.
        path: String,
        /// What named the blob.
        referenced_by: String,
    },
    /// The bytes of a blob do not hash to its digest.
    #[error(
        "{path} in the image tar does not match its digest: expected {expected}, found {found}"
    )]
    DigestMismatch {
        /// The blob's path in the tar (`<inline …>` for synthesized blobs).
        path: String,
        /// The digest the image names.
        expected: String,
        /// The digest of the bytes actually there.
        found: String,
    },
    /// A blob's size differs from what the image says.
    #[error(
        "{path} in the image tar has the wrong size for {digest}: expected {expected} bytes, found {found}"
    )]
    SizeMismatch {
        /// The blob's path in the tar.
        path: String,
        /// The blob's digest.
        digest: String,
        /// The size the image names.
        expected: u64,
        /// The size actually there.
        found: u64,
    },
    /// A digest uses an algorithm other than sha256.
    #[error("digest {digest} in {file} is not supported: only sha256 digests are")]
    UnsupportedDigest {
        /// The digest.
        digest: String,
        /// The document that holds it.
        file: String,
    },
    /// A manifest, index or config has a media type this module cannot use.
    #[error("{file}: the {what} has unsupported media type {media_type}")]
    UnsupportedMediaType {
        /// The document that names it.
        file: String,
        /// What kind of object (`image manifest`, `config`, …).
        what: &'static str,
        /// The media type.
        media_type: String,
    },
    /// No image for linux/amd64 in a multi-platform image.
    #[error(
        "{file} has no {wanted} image; platforms available: {}",
        list_or_none(available)
    )]
    NoMatchingPlatform {
        /// The index that was searched.
        file: String,
        /// The wanted platform (`linux/amd64`).
        wanted: &'static str,
        /// The platforms that are listed.
        available: Vec<String>,
    },
    /// The tar holds several images and it is unclear which one to push.
    #[error("{file} holds several images ({}); export a single image", candidates.join(", "))]
    AmbiguousImage {
        /// The document listing them.
        file: String,
        /// The candidates, by digest or name.
        candidates: Vec<String>,
    },
    /// A JSON document is too large to be read into memory.
    #[error(
        "{file} in the image tar is {size} bytes, more than the {limit}-byte limit for JSON documents"
    )]
    TooLarge {
        /// The document.
        file: String,
        /// Its size.
        size: u64,
        /// The limit ([`MAX_JSON_SIZE`]).
        limit: u64,
    },
    /// An uncompressed layer's digest differs from its diff ID in the config
    /// (containerd would refuse to unpack it).
    #[error(
        "layer {layer} ({digest}) is uncompressed, so its digest must equal \
         rootfs.diff_ids[{layer}] of the config, which is {diff_id}"
    )]
    DiffIdMismatch {
        /// Index of the layer, base layer 0.
        layer: usize,
        /// The layer's digest.
        digest: String,
        /// The diff ID the config names.
        diff_id: String,
    },
    /// The sink given to [`stream_blobs`] failed.
    #[error("handling blob {digest} failed: {source}")]
    Sink {
        /// The blob being handled.
        digest: String,
        /// The sink's error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// Bad input to a fixture helper.
    #[error("invalid image content: {reason}")]
    InvalidInput {
        /// What is wrong.
        reason: String,
    },
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

// ---------------------------------------------------------------------------
// Tar index
// ---------------------------------------------------------------------------

/// What a tar path names.
#[derive(Debug, Clone)]
enum Node {
    /// A regular file whose bytes are contiguous in the tar.
    File { offset: u64, size: u64 },
    /// A symbolic or hard link, by its normalized target path.
    Link(String),
}

/// An open image tar with an index of its entries (built from the headers only).
struct ImageTar {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Node>,
    /// The first few entry names in tar order, for messages.
    names: Vec<String>,
}

/// Normalizes a tar path: drops empty and `.` components and applies `..`
/// lexically. Returns `None` for a path that is empty or escapes the root.
fn normalize(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Rejects compressed files and files too short to hold a tar header, with
/// a message that says what the file looks like.
fn sniff_not_tar(head: &[u8]) -> Option<String> {
    if head.starts_with(&[0x1f, 0x8b]) {
        return Some("it is gzip-compressed; decompress it first (gunzip)".to_owned());
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Some("it is zstd-compressed; decompress it first (zstd -d)".to_owned());
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Some("it is xz-compressed; decompress it first (unxz)".to_owned());
    }
    if head.starts_with(b"BZh") {
        return Some("it is bzip2-compressed; decompress it first (bunzip2)".to_owned());
    }
    if head.len() < 512 {
        return Some(format!(
            "it is {} bytes long, shorter than one 512-byte tar header",
            head.len()
        ));
    }
    None
}

impl ImageTar {
    /// Opens a tar and indexes its entries, seeking over file data.
    fn open(path: &Path) -> Result<Self, OciError> {
        let io_err = |source| OciError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();

        let mut head = Vec::with_capacity(512);
        (&mut file)
            .take(512)
            .read_to_end(&mut head)
            .map_err(io_err)?;
        if let Some(reason) = sniff_not_tar(&head) {
            return Err(OciError::NotATar {
                path: path.to_owned(),
                reason,
            });
        }
        file.seek(SeekFrom::Start(0)).map_err(io_err)?;

        let mut entries = HashMap::new();
        let mut names = Vec::new();
        let mut headers_read = 0usize;
        let mut last_name: Option<String> = None;
        let mut archive = tar::Archive::new(file);
        {
            let iter = archive.entries_with_seek().map_err(io_err)?;
            for entry in iter {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(err) => {
                        return Err(match (headers_read, last_name) {
                            (0, _) => OciError::NotATar {
                                path: path.to_owned(),
                                reason: format!("no valid tar header at the start ({err})"),
                            },
                            (_, last) => OciError::CorruptTar {
                                path: path.to_owned(),
                                reason: format!(
                                    "after entry {}: {err}",
                                    last.as_deref().unwrap_or("(unnamed)")
                                ),
                            },
                        });
                    }
                };
                headers_read += 1;
                let Ok(raw_name) = std::str::from_utf8(&entry.path_bytes()).map(str::to_owned)
                else {
                    continue; // Not UTF-8: never a name this module looks up.
                };
                if names.len() < 10 {
                    names.push(raw_name.clone());
                }
                last_name = Some(raw_name.clone());
                let Some(name) = normalize(&raw_name) else {
                    continue;
                };
                let link_target = || {
                    entry
                        .link_name_bytes()
                        .and_then(|t| std::str::from_utf8(&t).ok().map(str::to_owned))
                };
                let node = match entry.header().entry_type() {
                    tar::EntryType::Regular | tar::EntryType::Continuous => {
                        let offset = entry.raw_file_position();
                        let size = entry.size();
                        if offset.saturating_add(size) > file_len {
                            return Err(OciError::CorruptTar {
                                path: path.to_owned(),
                                reason: format!(
                                    "entry {raw_name} needs {size} bytes from offset {offset}, \
                                     but the file ends at {file_len} (truncated?)"
                                ),
                            });
                        }
                        Some(Node::File { offset, size })
                    }
                    tar::EntryType::Link => {
                        link_target().and_then(|t| normalize(&t)).map(Node::Link)
                    }
                    tar::EntryType::Symlink => link_target()
                        .and_then(|target| {
                            if target.starts_with('/') {
                                normalize(&target)
                            } else {
                                let parent = name.rsplit_once('/').map_or("", |(dir, _)| dir);
                                normalize(&format!("{parent}/{target}"))
                            }
                        })
                        .map(Node::Link),
                    _ => None,
                };
                // Later entries replace earlier ones, as when a tar is extracted.
                match node {
                    Some(node) => {
                        entries.insert(name, node);
                    }
                    None => {
                        entries.remove(&name);
                    }
                }
            }
        }
        Ok(Self {
            path: path.to_owned(),
            file: archive.into_inner(),
            entries,
            names,
        })
    }

    fn has(&self, name: &str) -> bool {
        self.lookup(name).is_some()
    }

    /// Finds a regular file by path, following links. Returns `(offset, size)`.
    fn lookup(&self, name: &str) -> Option<(u64, u64)> {
        let mut current = normalize(name)?;
        for _ in 0..MAX_LINK_HOPS {
            match self.entries.get(&current)? {
                Node::File { offset, size } => return Some((*offset, *size)),
                Node::Link(target) => current = target.clone(),
            }
        }
        None
    }

    fn io_err(&self, source: io::Error) -> OciError {
        OciError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// A reader over the bytes of the entry at `offset`.
    fn open_entry(&self, offset: u64, size: u64) -> Result<impl Read + '_, OciError> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| self.io_err(e))?;
        Ok(BufReader::with_capacity(READ_BUFFER, file).take(size))
    }

    /// Reads a small file (a JSON document) into memory.
    fn read_small(&self, name: &str, offset: u64, size: u64) -> Result<Vec<u8>, OciError> {
        if size > MAX_JSON_SIZE {
            return Err(OciError::TooLarge {
                file: name.to_owned(),
                size,
                limit: MAX_JSON_SIZE,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        self.open_entry(offset, size)?
            .read_to_end(&mut bytes)
            .map_err(|e| self.io_err(e))?;
        if bytes.len() as u64 != size {
            return Err(OciError::CorruptTar {
                path: self.path.clone(),
                reason: format!("entry {name} ended after {} of {size} bytes", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Reads a small file by path; `None` if absent.
    fn read_named(&self, name: &str) -> Result<Option<Vec<u8>>, OciError> {
        match self.lookup(name) {
            Some((offset, size)) => self.read_small(name, offset, size).map(Some),
            None => Ok(None),
        }
    }

    /// Streams an entry through sha256. Returns the hex digest and the first
    /// bytes of the entry (for sniffing compression).
    fn hash_entry(
        &self,
        name: &str,
        offset: u64,
        size: u64,
    ) -> Result<(String, Vec<u8>), OciError> {
        let mut reader = self.open_entry(offset, size)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; READ_BUFFER];
        let mut head = Vec::new();
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_err(e)),
            };
            if head.len() < 8 {
                head.extend_from_slice(&buf[..n.min(8 - head.len())]);
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        if total != size {
            return Err(OciError::CorruptTar {
                path: self.path.clone(),
                reason: format!("entry {name} ended after {total} of {size} bytes"),
            });
        }
        Ok((hex::encode(hasher.finalize()), head))
    }

    /// Reads a blob of an OCI layout by digest and checks its size and digest.
    fn read_verified_blob(
        &self,
        digest: &Digest,
        size: u64,
        referenced_by: &str,
    ) -> Result<Vec<u8>, OciError> {
        let hex = sha256_of(digest, referenced_by)?;
        let name = blob_path(hex);
        let Some((offset, found_size)) = self.lookup(&name) else {
            return Err(OciError::MissingBlob {
                digest: digest.to_string(),
                path: name,
                referenced_by: referenced_by.to_owned(),
            });
        };
        if found_size != size {
            return Err(OciError::SizeMismatch {
                path: name,
                digest: digest.to_string(),
                expected: size,
                found: found_size,
            });
        }
        let bytes = self.read_small(&name, offset, size)?;
        let found = hex::encode(Sha256::digest(&bytes));
        if found != hex {
            return Err(OciError::DigestMismatch {
                path: name,
                expected: digest.to_string(),
                found: format!("sha256:{found}"),
            });
        }
        Ok(bytes)
    }
}

fn blob_path(hex: &str) -> String {
    format!("blobs/sha256/{hex}")
}

/// The hex part of a sha256 digest; other algorithms are refused.
fn sha256_of<'a>(digest: &'a Digest, file: &str) -> Result<&'a str, OciError> {
    match digest.algorithm() {
        DigestAlgorithm::Sha256 => Ok(digest.digest()),
        _ => Err(OciError::UnsupportedDigest {
            digest: digest.to_string(),
            file: file.to_owned(),
        }),
    }
}

/// Parses a `sha256:<hex>` string as found in an [`ImagePlan`].
fn parse_plan_digest(digest: &str) -> Result<String, OciError> {
    let parsed: Digest = digest.parse().map_err(|_| OciError::InvalidDocument {
        file: "image plan".to_owned(),
        reason: format!("malformed digest {digest:?}"),
    })?;
    sha256_of(&parsed, "image plan").map(str::to_owned)
}

fn parse_json<'a, T: Deserialize<'a>>(file: &str, bytes: &'a [u8]) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|source| OciError::InvalidJson {
        file: file.to_owned(),
        source,
    })
}

/// The fields of an image config this module looks at. Everything else is
/// passed through untouched.
#[derive(Deserialize)]
struct ConfigProbe {
    architecture: Option<String>,
    os: Option<String>,
    variant: Option<String>,
    rootfs: Option<RootFsProbe>,
}

#[derive(Deserialize)]
struct RootFsProbe {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl ConfigProbe {
    fn platform(&self) -> Option<String> {
        let (os, arch) = (self.os.as_deref()?, self.architecture.as_deref()?);
        Some(match self.variant.as_deref() {
            Some(variant) if !variant.is_empty() => format!("{os}/{arch}/{variant}"),
            _ => format!("{os}/{arch}"),
        })
    }

    fn diff_ids(&self) -> Option<&[String]> {
        self.rootfs.as_ref().map(|r| r.diff_ids.as_slice())
    }
}

/// Checks the layer count against the config's diff IDs, and for
/// uncompressed layers that digest and diff ID agree.
fn check_diff_ids(
    config: &ConfigProbe,
    config_file: &str,
    layers: &[BlobRef],
) -> Result<(), OciError> {
    let Some(diff_ids) = config.diff_ids() else {
        return Ok(());
    };
    if diff_ids.len() != layers.len() {
        return Err(OciError::InvalidDocument {
            file: config_file.to_owned(),
            reason: format!(
                "rootfs.diff_ids lists {} layers but the manifest has {}",
                diff_ids.len(),
                layers.len()
            ),
        });
    }
    for (layer, (blob, diff_id)) in layers.iter().zip(diff_ids).enumerate() {
        let uncompressed =
            blob.media_type == MEDIA_TYPE_OCI_LAYER || blob.media_type == MEDIA_TYPE_DOCKER_LAYER;
        if uncompressed && blob.digest != *diff_id {
            return Err(OciError::DiffIdMismatch {
                layer,
                digest: blob.digest.clone(),
                diff_id: diff_id.clone(),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Pass 1: plan
// ---------------------------------------------------------------------------

/// Pass 1: reads the structure of an image tar and returns what to upload.
///
/// Reads the tar's headers (seeking over file data), the small JSON
/// documents (`oci-layout`, `index.json`, `manifest.json`, manifests,
/// configs) and checks that every blob is present with the right size. The
/// manifest and config bytes are verified against their digests here; layer
/// bytes of an OCI layout are verified by [`stream_blobs`].
///
/// An OCI layout is used when both `oci-layout` and `index.json` exist (so
/// Docker 25+ `docker save` tars are read as OCI layouts); otherwise a
/// `manifest.json` makes it a legacy `docker save` tar. Legacy tars are read
/// twice: this function streams every layer file through sha256 (without
/// holding it in memory) to build the manifest, and [`stream_blobs`] reads
/// them again.
///
/// From a multi-platform image the `linux/amd64` manifest is chosen; an index
/// whose only image carries no platform is taken as it is.
pub fn plan_image(tar_path: &Path) -> Result<ImagePlan, OciError> {
    let tar = ImageTar::open(tar_path)?;
    if tar.has("oci-layout") && tar.has("index.json") {
        plan_oci_layout(&tar)
    } else if tar.has("manifest.json") {
        plan_docker_save(&tar)
    } else {
        Err(OciError::UnknownFormat {
            path: tar_path.to_owned(),
            entries: tar.names.clone(),
        })
    }
}

fn is_index_type(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_OCI_INDEX || media_type == MEDIA_TYPE_DOCKER_MANIFEST_LIST
}

fn is_manifest_type(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_OCI_MANIFEST || media_type == MEDIA_TYPE_DOCKER_MANIFEST
}

/// An image manifest listed by an index.
struct Candidate {
    descriptor: Descriptor,
    /// `os/arch[/variant]` from the descriptor, if it has a platform.
    platform: Option<String>,
    /// The index that lists it.
    listed_in: String,
}

/// Walks an index (and the indexes nested in it), collecting image manifests.
fn collect_candidates(
    tar: &ImageTar,
    index: &ImageIndex,
    file: &str,
    depth: usize,
    candidates: &mut Vec<Candidate>,
    unsupported: &mut Vec<(String, String)>,
) -> Result<(), OciError> {
    if index.schema_version() != 2 {
        return Err(OciError::InvalidDocument {
            file: file.to_owned(),
            reason: format!("schemaVersion is {}, expected 2", index.schema_version()),
        });
    }
    if let Some(media_type) = index.media_type()
        && !is_index_type(media_type.as_ref())
    {
        return Err(OciError::UnsupportedMediaType {
            file: file.to_owned(),
            what: "image index",
            media_type: media_type.to_string(),
        });
    }
    for descriptor in index.manifests() {
        let media_type = descriptor.media_type().as_ref();
        if is_index_type(media_type) {
            if depth >= MAX_INDEX_DEPTH {
                return Err(OciError::InvalidDocument {
                    file: file.to_owned(),
                    reason: format!("image indexes nest more than {MAX_INDEX_DEPTH} deep"),
                });
            }
            let bytes = tar.read_verified_blob(descriptor.digest(), descriptor.size(), file)?;
            let nested_file = blob_path(sha256_of(descriptor.digest(), file)?);
            let nested: ImageIndex = parse_json(&nested_file, &bytes)?;
            collect_candidates(
                tar,
                &nested,
                &nested_file,
                depth + 1,
                candidates,
                unsupported,
            )?;
        } else if is_manifest_type(media_type) {
            let platform = descriptor
                .platform()
                .as_ref()
                .map(|p| match p.variant().as_deref() {
                    Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os(), p.architecture()),
                    _ => format!("{}/{}", p.os(), p.architecture()),
                });
            candidates.push(Candidate {
                descriptor: descriptor.clone(),
                platform,
                listed_in: file.to_owned(),
            });
        } else {
            unsupported.push((file.to_owned(), media_type.to_owned()));
        }
    }
    Ok(())
}

fn is_wanted_platform(platform: &str) -> bool {
    platform == WANTED_PLATFORM || platform == "linux/amd64/v1"
}

fn candidate_label(c: &Candidate) -> String {
    let name = c.descriptor.annotations().as_ref().and_then(|a| {
        a.get("io.containerd.image.name")
            .or(a.get("org.opencontainers.image.ref.name"))
    });
    match (name, &c.platform) {
        (Some(name), _) => format!("{} ({name})", c.descriptor.digest()),
        (None, Some(platform)) => format!("{} ({platform})", c.descriptor.digest()),
        (None, None) => c.descriptor.digest().to_string(),
    }
}

/// Picks the image manifest to push from the candidates of `index.json`.
fn select_candidate(candidates: Vec<Candidate>) -> Result<Candidate, OciError> {
    let mut seen = HashSet::new();
    let candidates: Vec<Candidate> = candidates
        .into_iter()
        .filter(|c| seen.insert(c.descriptor.digest().to_string()))
        .collect();

    let (mut matching, rest): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|c| c.platform.as_deref().is_some_and(is_wanted_platform));
    if matching.len() > 1 {
        // Prefer the baseline amd64 over micro-architecture variants.
        let plain: Vec<usize> = (0..matching.len())
            .filter(|&i| matching[i].platform.as_deref() == Some(WANTED_PLATFORM))
            .collect();
        if plain.len() == 1 {
            return Ok(matching.swap_remove(plain[0]));
        }
        return Err(OciError::AmbiguousImage {
            file: matching[0].listed_in.clone(),
            candidates: matching.iter().map(candidate_label).collect(),
        });
    }
    if let Some(found) = matching.pop() {
        return Ok(found);
    }
    let (mut unlabeled, labeled): (Vec<_>, Vec<_>) =
        rest.into_iter().partition(|c| c.platform.is_none());
    match unlabeled.len() {
        1 => Ok(unlabeled.remove(0)),
        0 => Err(OciError::NoMatchingPlatform {
            file: labeled
                .first()
                .map_or_else(|| "index.json".to_owned(), |c| c.listed_in.clone()),
            wanted: WANTED_PLATFORM,
            available: labeled
                .iter()
                .filter_map(|c| c.platform.clone())
                // Attestation manifests of buildx carry unknown/unknown.
                .filter(|p| p != "unknown/unknown")
                .collect(),
        }),
        _ => Err(OciError::AmbiguousImage {
            file: unlabeled[0].listed_in.clone(),
            candidates: unlabeled.iter().map(candidate_label).collect(),
        }),
    }
}

fn plan_oci_layout(tar: &ImageTar) -> Result<ImagePlan, OciError> {
    // oci-layout
    let layout_bytes = tar.read_named("oci-layout")?.unwrap_or_default();
    let layout: oci_spec::image::OciLayout = parse_json("oci-layout", &layout_bytes)?;
    if !layout.image_layout_version().starts_with("1.") {
        return Err(OciError::InvalidDocument {
            file: "oci-layout".to_owned(),
            reason: format!(
                "imageLayoutVersion is {:?}, only 1.x is supported",
                layout.image_layout_version()
            ),
        });
    }

    // index.json, and the manifest it leads to
    let index_bytes = tar.read_named("index.json")?.unwrap_or_default();
    let index: ImageIndex = parse_json("index.json", &index_bytes)?;
    let mut candidates = Vec::new();
    let mut unsupported = Vec::new();
    collect_candidates(
        tar,
        &index,
        "index.json",
        0,
        &mut candidates,
        &mut unsupported,
    )?;
    if candidates.is_empty() {
        return Err(match unsupported.into_iter().next() {
            Some((file, media_type)) => OciError::UnsupportedMediaType {
                file,
                what: "image manifest",
                media_type,
            },
            None => OciError::InvalidDocument {
                file: "index.json".to_owned(),
                reason: "it lists no image manifest".to_owned(),
            },
        });
    }
    let chosen = select_candidate(candidates)?;
    let descriptor = chosen.descriptor;
    let manifest_media_type = descriptor.media_type().to_string();
    let referenced_by = match &chosen.platform {
        Some(platform) => format!("{} (the {platform} image)", chosen.listed_in),
        None => chosen.listed_in.clone(),
    };
    let manifest_bytes =
        tar.read_verified_blob(descriptor.digest(), descriptor.size(), &referenced_by)?;
    let manifest_hex = sha256_of(descriptor.digest(), &chosen.listed_in)?;
    let manifest_file = blob_path(manifest_hex);
    let manifest: ImageManifest = parse_json(&manifest_file, &manifest_bytes)?;
    if manifest.schema_version() != 2 {
        return Err(OciError::InvalidDocument {
            file: manifest_file,
            reason: format!("schemaVersion is {}, expected 2", manifest.schema_version()),
        });
    }
    if let Some(own) = manifest.media_type()
        && own.as_ref() != manifest_media_type
    {
        return Err(OciError::InvalidDocument {
            file: manifest_file,
            reason: format!(
                "its mediaType is {own} but {} lists it as {manifest_media_type}",
                chosen.listed_in
            ),
        });
    }

    // config
    let config_desc = manifest.config();
    let config_media_type = config_desc.media_type().to_string();
    if config_media_type != MEDIA_TYPE_OCI_CONFIG && config_media_type != MEDIA_TYPE_DOCKER_CONFIG {
        return Err(OciError::UnsupportedMediaType {
            file: manifest_file,
            what: "image config (so this is no container image)",
            media_type: config_media_type,
        });
    }
    let config_bytes =
        tar.read_verified_blob(config_desc.digest(), config_desc.size(), &manifest_file)?;
    let config_hex = sha256_of(config_desc.digest(), &manifest_file)?;
    let config_file = blob_path(config_hex);
    let config_probe: ConfigProbe = parse_json(&config_file, &config_bytes)?;
    let config = BlobRef {
        digest: config_desc.digest().to_string(),
        size: config_desc.size(),
        media_type: config_media_type,
        source: BlobSource::TarEntry(config_file.clone()),
    };

    // layers: present with the right size; their bytes are checked in pass 2
    let mut layers = Vec::with_capacity(manifest.layers().len());
    for layer in manifest.layers() {
        let hex = sha256_of(layer.digest(), &manifest_file)?;
        let path = blob_path(hex);
        let Some((_, size)) = tar.lookup(&path) else {
            return Err(OciError::MissingBlob {
                digest: layer.digest().to_string(),
                path,
                referenced_by: manifest_file,
            });
        };
        if size != layer.size() {
            return Err(OciError::SizeMismatch {
                path,
                digest: layer.digest().to_string(),
                expected: layer.size(),
                found: size,
            });
        }
        layers.push(BlobRef {
            digest: layer.digest().to_string(),
            size,
            media_type: layer.media_type().to_string(),
            source: BlobSource::TarEntry(path),
        });
    }
    check_diff_ids(&config_probe, &config_file, &layers)?;

    Ok(ImagePlan {
        format: TarFormat::OciLayout,
        manifest: BlobRef {
            digest: descriptor.digest().to_string(),
            size: descriptor.size(),
            media_type: manifest_media_type.clone(),
            source: BlobSource::TarEntry(manifest_file),
        },
        manifest_media_type,
        config,
        layers,
        platform: config_probe.platform(),
    })
}

/// One image in the `manifest.json` of a legacy `docker save` tar.
#[derive(Deserialize)]
struct DockerSaveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Media type of a `docker save` layer file, by its first bytes.
fn docker_layer_media_type(head: &[u8]) -> &'static str {
    if head.starts_with(&[0x1f, 0x8b]) {
        MEDIA_TYPE_DOCKER_LAYER_GZIP
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    } else {
        MEDIA_TYPE_DOCKER_LAYER
    }
}

fn plan_docker_save(tar: &ImageTar) -> Result<ImagePlan, OciError> {
    let bytes = tar.read_named("manifest.json")?.unwrap_or_default();
    let mut images: Vec<DockerSaveEntry> = parse_json("manifest.json", &bytes)?;
    let image = match images.len() {
        0 => {
            return Err(OciError::InvalidDocument {
                file: "manifest.json".to_owned(),
                reason: "it lists no image".to_owned(),
            });
        }
        1 => images.remove(0),
        _ => {
            return Err(OciError::AmbiguousImage {
                file: "manifest.json".to_owned(),
                candidates: images
                    .iter()
                    .map(|i| match &i.repo_tags {
                        Some(tags) if !tags.is_empty() => {
                            format!("{} ({})", i.config, tags.join(" "))
                        }
                        _ => i.config.clone(),
                    })
                    .collect(),
            });
        }
    };

    let entry_of = |name: &str| {
        let path = normalize(name).unwrap_or_else(|| name.to_owned());
        tar.lookup(&path)
            .map(|(offset, size)| (path, offset, size))
            .ok_or_else(|| OciError::MissingFile {
                file: name.to_owned(),
                referenced_by: "manifest.json".to_owned(),
            })
    };

    let (config_path, offset, size) = entry_of(&image.config)?;
    let config_bytes = tar.read_small(&config_path, offset, size)?;
    let config_probe: ConfigProbe = parse_json(&config_path, &config_bytes)?;
    let config = BlobRef {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes))),
        size,
        media_type: MEDIA_TYPE_DOCKER_CONFIG.to_owned(),
        source: BlobSource::TarEntry(config_path.clone()),
    };

    let mut layers = Vec::with_capacity(image.layers.len());
    for name in &image.layers {
        let (path, offset, size) = entry_of(name)?;
        let (hex, head) = tar.hash_entry(&path, offset, size)?;
        layers.push(BlobRef {
            digest: format!("sha256:{hex}"),
            size,
            media_type: docker_layer_media_type(&head).to_owned(),
            source: BlobSource::TarEntry(path),
        });
    }
    check_diff_ids(&config_probe, &config_path, &layers)?;

    let manifest_bytes = docker_manifest_json(&config, &layers)?;
    let manifest = BlobRef {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&manifest_bytes))),
        size: manifest_bytes.len() as u64,
        media_type: MEDIA_TYPE_DOCKER_MANIFEST.to_owned(),
        source: BlobSource::Inline(manifest_bytes),
    };
    Ok(ImagePlan {
        format: TarFormat::DockerSave,
        manifest,
        manifest_media_type: MEDIA_TYPE_DOCKER_MANIFEST.to_owned(),
        config,
        layers,
        platform: config_probe.platform(),
    })
}

fn descriptor_of(blob: &BlobRef) -> Result<Descriptor, OciError> {
    let digest: Digest = blob.digest.parse().map_err(|e| OciError::InvalidInput {
        reason: format!("malformed digest {}: {e}", blob.digest),
    })?;
    Ok(Descriptor::new(
        MediaType::from(blob.media_type.as_str()),
        blob.size,
        digest,
    ))
}

fn spec_err(e: oci_spec::OciSpecError) -> OciError {
    OciError::InvalidInput {
        reason: e.to_string(),
    }
}

/// A Docker v2 schema 2 manifest for a legacy `docker save` image.
fn docker_manifest_json(config: &BlobRef, layers: &[BlobRef]) -> Result<Vec<u8>, OciError> {
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(MEDIA_TYPE_DOCKER_MANIFEST))
        .config(descriptor_of(config)?)
        .layers(
            layers
                .iter()
                .map(descriptor_of)
                .collect::<Result<Vec<_>, _>>()?,
        )
        .build()
        .map_err(spec_err)?;
    serde_json::to_vec(&manifest).map_err(|e| OciError::InvalidInput {
        reason: format!("cannot serialize the manifest: {e}"),
    })
}

// ---------------------------------------------------------------------------
// Pass 2: stream
// ---------------------------------------------------------------------------

/// Why a verified read failed.
#[derive(Debug)]
enum Failure {
    Digest {
        found: String,
    },
    Size {
        found: u64,
    },
    Io {
        kind: io::ErrorKind,
        message: String,
    },
}

#[derive(Debug)]
enum State {
    Reading,
    Verified,
    Failed(Failure),
}

/// A reader that hashes what passes through it and checks size and digest.
///
/// The read that completes the expected size compares the digest; on a
/// mismatch that read fails instead of returning the last bytes, so a sink
/// never sees a complete blob whose bytes are wrong, and never sees EOF
/// for one either.
struct VerifyingReader<'a, R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    expected_size: u64,
    expected_hex: &'a str,
    state: State,
}

impl<'a, R: Read> VerifyingReader<'a, R> {
    fn new(inner: R, expected_size: u64, expected_hex: &'a str) -> Self {
        let mut reader = Self {
            inner,
            hasher: Sha256::new(),
            read: 0,
            expected_size,
            expected_hex,
            state: State::Reading,
        };
        if expected_size == 0 {
            reader.finish();
        }
        reader
    }

    fn finish(&mut self) {
        let found = hex::encode(std::mem::take(&mut self.hasher).finalize());
        self.state = if found == self.expected_hex {
            State::Verified
        } else {
            State::Failed(Failure::Digest { found })
        };
    }

    fn failure_io(&self) -> io::Error {
        let message = match &self.state {
            State::Failed(Failure::Digest { found }) => format!(
                "sha256 mismatch: expected {}, found sha256:{found}",
                self.expected_hex
            ),
            State::Failed(Failure::Size { found }) => {
                format!("blob ended after {found} of {} bytes", self.expected_size)
            }
            State::Failed(Failure::Io { message, .. }) => message.clone(),
            _ => "blob verification failed".to_owned(),
        };
        io::Error::new(io::ErrorKind::InvalidData, message)
    }
}

impl<R: Read> Read for VerifyingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.state {
            State::Verified => return Ok(0),
            State::Failed(_) => return Err(self.failure_io()),
            State::Reading => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let remaining = self.expected_size - self.read;
        let len = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let n = match self.inner.read(&mut buf[..len]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                self.state = State::Failed(Failure::Io {
                    kind: e.kind(),
                    message: e.to_string(),
                });
                return Err(e);
            }
        };
        if n == 0 {
            self.state = State::Failed(Failure::Size { found: self.read });
            return Err(self.failure_io());
        }
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if self.read == self.expected_size {
            self.finish();
            if let State::Failed(_) = self.state {
                return Err(self.failure_io());
            }
        }
        Ok(n)
    }
}

/// Pass 2: hands every blob of `plan` to `sink`, verifying its bytes.
///
/// The blobs come in the order of [`ImagePlan::blobs`] (layers, config,
/// manifest last), each distinct digest exactly once, inline blobs included.
/// For each, `sink` gets the [`BlobRef`] and a reader over exactly
/// `blob.size` bytes. The reader hashes the bytes as they pass; nothing is
/// held in memory beyond a read buffer.
///
/// Verification: the read that would complete a blob whose sha256 differs
/// from its digest fails with [`io::ErrorKind::InvalidData`] instead (and so
/// does a blob that ends short), so a sink that only commits after reading
/// the whole blob never commits wrong bytes. Whatever the sink leaves
/// unread is drained and checked after it returns. A mismatch is reported as
/// [`OciError::DigestMismatch`] / [`OciError::SizeMismatch`] even if the sink
/// itself returned an error because of it.
///
/// The sink's error type `E` is anything convertible into
/// `Box<dyn Error + Send + Sync>` (`anyhow::Error`, `io::Error`, `String`, …);
/// a sink error stops the walk and comes back as [`OciError::Sink`].
pub fn stream_blobs<F, E>(tar_path: &Path, plan: &ImagePlan, mut sink: F) -> Result<(), OciError>
where
    F: FnMut(&BlobRef, &mut dyn Read) -> Result<(), E>,
    E: Into<Box<dyn StdError + Send + Sync>>,
{
    let tar = ImageTar::open(tar_path)?;
    for blob in plan.blobs() {
        let hex = parse_plan_digest(&blob.digest)?;
        match &blob.source {
            BlobSource::TarEntry(path) => {
                let Some((offset, size)) = tar.lookup(path) else {
                    return Err(OciError::MissingBlob {
                        digest: blob.digest.clone(),
                        path: path.clone(),
                        referenced_by: "the image plan".to_owned(),
                    });
                };
                if size != blob.size {
                    return Err(OciError::SizeMismatch {
                        path: path.clone(),
                        digest: blob.digest.clone(),
                        expected: blob.size,
                        found: size,
                    });
                }
                let reader = tar.open_entry(offset, size)?;
                feed(&tar.path, path, blob, &hex, reader, &mut sink)?;
            }
            BlobSource::Inline(bytes) => {
                let path = format!("<inline {}>", blob.media_type);
                if bytes.len() as u64 != blob.size {
                    return Err(OciError::SizeMismatch {
                        path,
                        digest: blob.digest.clone(),
                        expected: blob.size,
                        found: bytes.len() as u64,
                    });
                }
                feed(&tar.path, &path, blob, &hex, bytes.as_slice(), &mut sink)?;
            }
        }
    }
    Ok(())
}

/// Runs the sink over one blob and turns the outcome into a result.
fn feed<R: Read, F, E>(
    tar_path: &Path,
    path: &str,
    blob: &BlobRef,
    hex: &str,
    reader: R,
    sink: &mut F,
) -> Result<(), OciError>
where
    F: FnMut(&BlobRef, &mut dyn Read) -> Result<(), E>,
    E: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut verifying = VerifyingReader::new(reader, blob.size, hex);
    let outcome = sink(blob, &mut verifying);
    if outcome.is_ok() {
        // Check what the sink did not read; errors are recorded in the state.
        let _ = io::copy(&mut verifying, &mut io::sink());
    }
    match verifying.state {
        State::Failed(Failure::Digest { found }) => Err(OciError::DigestMismatch {
            path: path.to_owned(),
            expected: blob.digest.clone(),
            found: format!("sha256:{found}"),
        }),
        State::Failed(Failure::Size { found }) => Err(OciError::SizeMismatch {
            path: path.to_owned(),
            digest: blob.digest.clone(),
            expected: blob.size,
            found,
        }),
        State::Failed(Failure::Io { kind, message }) => Err(OciError::Io {
            path: tar_path.to_owned(),
            source: io::Error::new(kind, message),
        }),
        State::Verified | State::Reading => match outcome {
            Ok(()) => Ok(()),
            Err(e) => Err(OciError::Sink {
                digest: blob.digest.clone(),
                source: e.into(),
            }),
        },
    }
}

// ---------------------------------------------------------------------------
// Fixture helpers
// ---------------------------------------------------------------------------

/// An uncompressed layer tar holding `files` (with their parent directories).
fn layer_tar(files: &[(&str, &[u8], u32)]) -> Result<Vec<u8>, OciError> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs = HashSet::new();
    let io_err = |e: io::Error| OciError::InvalidInput {
        reason: format!("cannot build the layer tar: {e}"),
    };
    for (path, data, mode) in files {
        let Some(path) = normalize(path) else {
            return Err(OciError::InvalidInput {
                reason: format!("file path {path:?} is empty or leaves the root"),
            });
        };
        let mut dir = String::new();
        for part in path.split('/').take(path.split('/').count() - 1) {
            dir = if dir.is_empty() {
                part.to_owned()
            } else {
                format!("{dir}/{part}")
            };
            if dirs.insert(dir.clone()) {
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_uid(0);
                header.set_gid(0);
                header.set_mtime(0);
                header.set_size(0);
                builder
                    .append_data(&mut header, format!("{dir}/"), io::empty())
                    .map_err(io_err)?;
            }
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(mode & 0o7777);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, &path, *data)
            .map_err(io_err)?;
    }
    builder.into_inner().map_err(io_err)
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An image config for linux/amd64 with the given layers and command.
fn image_config_json(diff_ids: Vec<String>, cmd: &[&str]) -> Result<Vec<u8>, OciError> {
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .cmd(cmd.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .env(vec![DEFAULT_PATH_ENV.to_owned()])
                .build()
                .map_err(spec_err)?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids)
                .build()
                .map_err(spec_err)?,
        )
        .build()
        .map_err(spec_err)?;
    serde_json::to_vec(&config).map_err(|e| OciError::InvalidInput {
        reason: format!("cannot serialize the config: {e}"),
    })
}

/// Writes a tar file whose entries are regular files, with directories
/// created for them.
fn write_tar(path: &Path, files: &[(String, Vec<u8>)]) -> Result<(), OciError> {
    let io_err = |source| OciError::Io {
        path: path.to_owned(),
        source,
    };
    let out = BufWriter::new(File::create(path).map_err(io_err)?);
    let mut builder = tar::Builder::new(out);
    let mut dirs = HashSet::new();
    for (name, data) in files {
        if let Some((dir, _)) = name.rsplit_once('/') {
            let mut prefix = String::new();
            for part in dir.split('/') {
                prefix = if prefix.is_empty() {
                    part.to_owned()
                } else {
                    format!("{prefix}/{part}")
                };
                if dirs.insert(prefix.clone()) {
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_mtime(0);
                    header.set_size(0);
                    builder
                        .append_data(&mut header, format!("{prefix}/"), io::empty())
                        .map_err(io_err)?;
                }
            }
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, name, data.as_slice())
            .map_err(io_err)?;
    }
    let mut out = builder.into_inner().map_err(io_err)?;
    out.flush().map_err(io_err)
}

/// The files of a single-layer OCI image layout, and the manifest digest.
fn oci_layout_files(
    files: &[(&str, &[u8], u32)],
    cmd: &[&str],
) -> Result<(TarFiles, String), OciError> {
    let layer = layer_tar(files)?;
    let layer_digest = sha256_digest(&layer);
    let config = image_config_json(vec![layer_digest.clone()], cmd)?;
    let config_digest = sha256_digest(&config);
    let desc =
        |media_type: MediaType, bytes: &[u8], digest: &str| -> Result<Descriptor, OciError> {
            let digest: Digest = digest.parse().map_err(spec_err)?;
            Ok(Descriptor::new(media_type, bytes.len() as u64, digest))
        };
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(desc(MediaType::ImageConfig, &config, &config_digest)?)
        .layers(vec![desc(MediaType::ImageLayer, &layer, &layer_digest)?])
        .build()
        .map_err(spec_err)?;
    let manifest = serde_json::to_vec(&manifest).map_err(|e| OciError::InvalidInput {
        reason: format!("cannot serialize the manifest: {e}"),
    })?;
    let manifest_digest = sha256_digest(&manifest);
    let mut manifest_desc = desc(MediaType::ImageManifest, &manifest, &manifest_digest)?;
    manifest_desc.set_platform(Some(
        PlatformBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .build()
            .map_err(spec_err)?,
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()
        .map_err(spec_err)?;
    let index = serde_json::to_vec(&index).map_err(|e| OciError::InvalidInput {
        reason: format!("cannot serialize the index: {e}"),
    })?;

    let blob = |digest: &str| blob_path(digest.trim_start_matches("sha256:"));
    let out = vec![
        (
            "oci-layout".to_owned(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".to_owned(), index),
        (blob(&layer_digest), layer),
        (blob(&config_digest), config),
        (blob(&manifest_digest), manifest),
    ];
    Ok((out, manifest_digest))
}

/// Test and tooling helper: writes a single-layer linux/amd64 image as an
/// OCI image layout tar at `path` and returns the manifest digest
/// (`sha256:<hex>`).
///
/// The layer is an uncompressed tar (`application/vnd.oci.image.layer.v1.tar`)
/// of `files`, each given as (path in the root filesystem, contents, mode
/// bits), owned by root, with parent directories (mode 0755) added. The
/// config names os `linux`, architecture `amd64`, the layer's digest as its
/// only diff ID, `cmd` as `Cmd` and a standard `PATH`. The output is
/// deterministic (all timestamps 0). Used, for example, to build a busybox
/// image for tests.
pub fn write_oci_layout_tar(
    path: &Path,
    files: &[(&str, &[u8], u32)],
    cmd: &[&str],
) -> Result<String, OciError> {
    let (entries, manifest_digest) = oci_layout_files(files, cmd)?;
    write_tar(path, &entries)?;
    Ok(manifest_digest)
}

/// Test and tooling helper: writes a linux/amd64 image in the legacy
/// `docker save` format (`manifest.json`, `<config hex>.json`,
/// `<id>/layer.tar`, `<id>/VERSION`) at `path` and returns the config
/// digest (the Docker image ID).
///
/// Each element of `layers` is the list of files of one layer, base layer
/// first, as for [`write_oci_layout_tar`]. The image is tagged
/// `meshwork-test:latest`.
pub fn write_docker_save_tar(
    path: &Path,
    layers: &[&[(&str, &[u8], u32)]],
    cmd: &[&str],
) -> Result<String, OciError> {
    let mut entries = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layer_paths = Vec::new();
    for (i, files) in layers.iter().enumerate() {
        let layer = layer_tar(files)?;
        let digest = sha256_digest(&layer);
        let id = hex::encode(Sha256::digest(format!("{i}:{digest}")));
        entries.push((format!("{id}/VERSION"), b"1.0".to_vec()));
        entries.push((format!("{id}/layer.tar"), layer));
        layer_paths.push(format!("{id}/layer.tar"));
        diff_ids.push(digest);
    }
    let config = image_config_json(diff_ids, cmd)?;
    let config_digest = sha256_digest(&config);
    let config_name = format!("{}.json", config_digest.trim_start_matches("sha256:"));
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["meshwork-test:latest"],
        "Layers": layer_paths,
    }]);
    entries.push((config_name, config));
    entries.push((
        "manifest.json".to_owned(),
        manifest.to_string().into_bytes(),
    ));
    write_tar(path, &entries)?;
    Ok(config_digest)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn sha(bytes: &[u8]) -> String {
        sha256_digest(bytes)
    }

    fn hex_of(digest: &str) -> &str {
        digest.trim_start_matches("sha256:")
    }

    /// Streams a plan, collecting (digest, media type, bytes) of each blob.
    fn collect(path: &Path, plan: &ImagePlan) -> Result<Vec<(String, String, Vec<u8>)>, OciError> {
        let mut out = Vec::new();
        stream_blobs(path, plan, |blob, reader| {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes)?;
            out.push((blob.digest.clone(), blob.media_type.clone(), bytes));
            Ok::<(), io::Error>(())
        })?;
        Ok(out)
    }

    /// A tar whose entries may be files or symlinks, written in order.
    enum E {
        F(String, Vec<u8>),
        S(&'static str, &'static str),
    }

    fn write_raw_tar(path: &Path, entries: &[E]) {
        let mut b = tar::Builder::new(File::create(path).unwrap());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            match e {
                E::F(name, data) => {
                    // Names are written verbatim (append_data would strip "./").
                    h.set_size(data.len() as u64);
                    h.set_entry_type(tar::EntryType::Regular);
                    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
                    h.set_cksum();
                    b.append(&h, data.as_slice()).unwrap();
                }
                E::S(name, target) => {
                    h.set_size(0);
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, name, target).unwrap();
                }
            }
        }
        b.finish().unwrap();
    }

    /// Parts of an OCI layout built by hand, to corrupt in tests.
    struct Oci {
        layers: Vec<(String, Vec<u8>)>, // (media type, bytes)
        config: Vec<u8>,
        config_media_type: String,
    }

    impl Oci {
        fn new(layers: Vec<Vec<u8>>) -> Self {
            let diff_ids = layers.iter().map(|l| sha(l)).collect();
            Oci {
                config: image_config_json(diff_ids, &["/bin/sh"]).unwrap(),
                layers: layers
                    .into_iter()
                    .map(|l| (MEDIA_TYPE_OCI_LAYER.to_owned(), l))
                    .collect(),
                config_media_type: MEDIA_TYPE_OCI_CONFIG.to_owned(),
            }
        }

        fn manifest_value(&self) -> Value {
            json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "config": {"mediaType": self.config_media_type, "digest": sha(&self.config), "size": self.config.len()},
                "layers": self.layers.iter().map(|(mt, l)| json!({"mediaType": mt, "digest": sha(l), "size": l.len()})).collect::<Vec<_>>(),
            })
        }

        /// Blob files (path, bytes) for config and layers.
        fn blob_files(&self) -> Vec<(String, Vec<u8>)> {
            let mut out: Vec<(String, Vec<u8>)> = self
                .layers
                .iter()
                .map(|(_, l)| (blob_path(hex_of(&sha(l))), l.clone()))
                .collect();
            out.push((blob_path(hex_of(&sha(&self.config))), self.config.clone()));
            out
        }
    }

    fn desc(media_type: &str, bytes: &[u8], platform: Option<(&str, &str)>) -> Value {
        let mut d = json!({"mediaType": media_type, "digest": sha(bytes), "size": bytes.len()});
        if let Some((os, arch)) = platform {
            d["platform"] = json!({"os": os, "architecture": arch});
        }
        d
    }

    fn index_of(manifests: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": manifests}),
        )
        .unwrap()
    }

    /// Writes an OCI layout tar with `index.json` and the given blobs.
    fn write_layout(path: &Path, index: Vec<u8>, blobs: Vec<(String, Vec<u8>)>) {
        let mut files = vec![
            (
                "oci-layout".to_owned(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_owned(), index),
        ];
        files.extend(blobs);
        write_tar(path, &files).unwrap();
    }

    /// A single-image layout from `oci`, with `manifest` as the manifest bytes.
    fn write_single(path: &Path, oci: &Oci, manifest: Vec<u8>) -> String {
        let digest = sha(&manifest);
        let mut blobs = oci.blob_files();
        blobs.push((blob_path(hex_of(&digest)), manifest.clone()));
        write_layout(
            path,
            index_of(vec![desc(MEDIA_TYPE_OCI_MANIFEST, &manifest, None)]),
            blobs,
        );
        digest
    }

    fn layer(name: &str, data: &[u8]) -> Vec<u8> {
        layer_tar(&[(name, data, 0o644)]).unwrap()
    }

    #[test]
    fn oci_layout_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.tar");
        let files: &[(&str, &[u8], u32)] = &[
            ("bin/hello", b"#!/bin/sh\necho hi\n", 0o755),
            ("/etc/motd", b"welcome\n", 0o644),
        ];
        let digest = write_oci_layout_tar(&path, files, &["/bin/hello", "x"]).unwrap();

        let plan = plan_image(&path).unwrap();
        assert_eq!(plan.format, TarFormat::OciLayout);
        assert_eq!(plan.manifest.digest, digest);
        assert_eq!(plan.manifest_media_type, MEDIA_TYPE_OCI_MANIFEST);
        assert_eq!(plan.manifest.media_type, MEDIA_TYPE_OCI_MANIFEST);
        assert_eq!(plan.config.media_type, MEDIA_TYPE_OCI_CONFIG);
        assert_eq!(plan.platform.as_deref(), Some("linux/amd64"));
        assert_eq!(plan.layers.len(), 1);
        assert_eq!(plan.layers[0].media_type, MEDIA_TYPE_OCI_LAYER);
        assert_eq!(
            plan.layers[0].source,
            BlobSource::TarEntry(blob_path(hex_of(&plan.layers[0].digest)))
        );

        let blobs = collect(&path, &plan).unwrap();
        let order: Vec<&str> = blobs.iter().map(|b| b.0.as_str()).collect();
        assert_eq!(
            order,
            [
                &plan.layers[0].digest,
                &plan.config.digest,
                &plan.manifest.digest
            ]
        );
        for ((digest, _, bytes), blob) in blobs.iter().zip(plan.blobs()) {
            assert_eq!(&sha(bytes), digest);
            assert_eq!(bytes.len() as u64, blob.size);
        }

        // The layer holds the files with their modes; the config the command.
        let mut archive = tar::Archive::new(blobs[0].2.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mode = entry.header().mode().unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            seen.push((name, mode, data));
        }
        assert!(seen.contains(&("bin/hello".into(), 0o755, b"#!/bin/sh\necho hi\n".to_vec())));
        assert!(seen.contains(&("etc/motd".into(), 0o644, b"welcome\n".to_vec())));
        assert!(seen.iter().any(|(n, m, _)| n == "bin/" && *m == 0o755));
        let config: Value = serde_json::from_slice(&blobs[1].2).unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["/bin/hello", "x"]));
        assert_eq!(config["rootfs"]["diff_ids"], json!([plan.layers[0].digest]));
        assert_eq!(config["os"], "linux");
        assert_eq!(config["architecture"], "amd64");

        // The fixture is deterministic.
        let again = dir.path().join("again.tar");
        assert_eq!(
            write_oci_layout_tar(&again, files, &["/bin/hello", "x"]).unwrap(),
            digest
        );
    }

    #[test]
    fn docker_save_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("save.tar");
        let l1: &[(&str, &[u8], u32)] = &[("bin/a", b"aaa", 0o755)];
        let l2: &[(&str, &[u8], u32)] = &[("etc/b", b"bbbb", 0o644)];
        let config_digest = write_docker_save_tar(&path, &[l1, l2], &["/bin/a"]).unwrap();

        let plan = plan_image(&path).unwrap();
        assert_eq!(plan.format, TarFormat::DockerSave);
        assert_eq!(plan.manifest_media_type, MEDIA_TYPE_DOCKER_MANIFEST);
        assert_eq!(plan.config.digest, config_digest);
        assert_eq!(plan.config.media_type, MEDIA_TYPE_DOCKER_CONFIG);
        assert_eq!(plan.platform.as_deref(), Some("linux/amd64"));
        assert_eq!(plan.layers.len(), 2);
        assert_eq!(plan.layers[0].digest, sha(&layer_tar(l1).unwrap()));
        assert_eq!(plan.layers[1].digest, sha(&layer_tar(l2).unwrap()));
        assert!(
            plan.layers
                .iter()
                .all(|l| l.media_type == MEDIA_TYPE_DOCKER_LAYER)
        );
        let BlobSource::Inline(manifest) = &plan.manifest.source else {
            panic!("legacy manifest must be inline");
        };
        assert_eq!(sha(manifest), plan.manifest.digest);
        assert_eq!(manifest.len() as u64, plan.manifest.size);
        let m: Value = serde_json::from_slice(manifest).unwrap();
        assert_eq!(m["schemaVersion"], 2);
        assert_eq!(m["mediaType"], MEDIA_TYPE_DOCKER_MANIFEST);
        assert_eq!(m["config"]["mediaType"], MEDIA_TYPE_DOCKER_CONFIG);
        assert_eq!(m["config"]["digest"], config_digest);
        assert_eq!(m["config"]["size"], plan.config.size);
        for (i, l) in plan.layers.iter().enumerate() {
            assert_eq!(m["layers"][i]["digest"], l.digest);
            assert_eq!(m["layers"][i]["size"], l.size);
            assert_eq!(m["layers"][i]["mediaType"], MEDIA_TYPE_DOCKER_LAYER);
        }

        let blobs = collect(&path, &plan).unwrap();
        let order: Vec<&String> = blobs.iter().map(|b| &b.0).collect();
        assert_eq!(
            order,
            [
                &plan.layers[0].digest,
                &plan.layers[1].digest,
                &plan.config.digest,
                &plan.manifest.digest
            ]
        );
        for (digest, _, bytes) in &blobs {
            assert_eq!(&sha(bytes), digest);
        }
        assert_eq!(&blobs[3].2, manifest);
    }

    #[test]
    fn docker_save_follows_layer_symlinks_and_dedupes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("save.tar");
        let l = layer("x", b"same");
        let config = image_config_json(vec![sha(&l), sha(&l)], &["/x"]).unwrap();
        let manifest = json!([{"Config": "cfg.json", "RepoTags": null, "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]);
        write_raw_tar(
            &path,
            &[
                E::F("./aaa/layer.tar".into(), l.clone()),
                E::S("bbb/layer.tar", "../aaa/layer.tar"),
                E::F("cfg.json".into(), config.clone()),
                E::F("manifest.json".into(), manifest.to_string().into_bytes()),
            ],
        );
        let plan = plan_image(&path).unwrap();
        assert_eq!(plan.layers[0].digest, plan.layers[1].digest);
        assert_eq!(plan.blobs().len(), 3);
        let blobs = collect(&path, &plan).unwrap();
        assert_eq!(blobs.len(), 3, "each distinct digest is streamed once");
        assert_eq!(blobs[0].2, l);
        assert_eq!(blobs[1].2, config);
    }

    #[test]
    fn docker_25_layout_prefers_oci() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d25.tar");
        let (mut files, digest) = oci_layout_files(&[("a", b"a", 0o644)], &["/a"]).unwrap();
        files.push((
            "manifest.json".to_owned(),
            br#"[{"Config":"blobs/sha256/00","RepoTags":["a:1"],"Layers":[]}]"#.to_vec(),
        ));
        write_tar(&path, &files).unwrap();
        let plan = plan_image(&path).unwrap();
        assert_eq!(plan.format, TarFormat::OciLayout);
        assert_eq!(plan.manifest.digest, digest);
    }

    #[test]
    fn dot_slash_entry_names_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dot.tar");
        let (files, digest) = oci_layout_files(&[("a", b"a", 0o644)], &["/a"]).unwrap();
        let entries: Vec<E> = files
            .into_iter()
            .map(|(n, d)| E::F(format!("./{n}"), d))
            .collect();
        write_raw_tar(&path, &entries);
        let mut archive = tar::Archive::new(File::open(&path).unwrap());
        for entry in archive.entries().unwrap() {
            assert!(entry.unwrap().path_bytes().starts_with(b"./"));
        }
        let plan = plan_image(&path).unwrap();
        assert_eq!(plan.manifest.digest, digest);
        assert_eq!(collect(&path, &plan).unwrap().len(), 3);
    }

    #[test]
    fn not_a_tar() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("short text", b"hello, I am not a tar\n".to_vec()),
            (
                "long text",
                "lorem ipsum dolor sit amet\n".repeat(100).into_bytes(),
            ),
            ("random", {
                let mut x: u64 = 0x9e3779b97f4a7c15;
                (0..8192)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            }),
            ("gzip", [&[0x1f, 0x8b, 8, 0][..], &[0u8; 1020]].concat()),
        ];
        for (name, bytes) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            match plan_image(&path) {
                Err(OciError::NotATar { reason, .. }) => {
                    if name == "gzip" {
                        assert!(reason.contains("gzip"), "{reason}");
                    }
                }
                other => panic!("{name}: expected NotATar, got {other:?}"),
            }
        }
    }

    #[test]
    fn missing_file_reports_io() {
        let err = plan_image(Path::new("/nonexistent/meshwork/app.tar")).unwrap_err();
        assert!(matches!(err, OciError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/meshwork/app.tar"));
    }

    #[test]
    fn tar_that_is_no_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.tar");
        write_tar(&path, &[("hello.txt".to_owned(), b"hi".to_vec())]).unwrap();
        let err = plan_image(&path).unwrap_err();
        match &err {
            OciError::UnknownFormat { entries, .. } => assert_eq!(entries, &["hello.txt"]),
            other => panic!("expected UnknownFormat, got {other:?}"),
        }
        assert!(err.to_string().contains("hello.txt"));

        // index.json alone (no oci-layout) is not a layout either.
        write_tar(&path, &[("index.json".to_owned(), index_of(vec![]))]).unwrap();
        assert!(matches!(
            plan_image(&path),
            Err(OciError::UnknownFormat { .. })
        ));
    }

    #[test]
    fn truncated_tar() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.tar");
        write_oci_layout_tar(&path, &[("big", &vec![7u8; 100_000], 0o644)], &["/big"]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // Cut inside the layer blob (the largest entry).
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = plan_image(&path).unwrap_err();
        assert!(matches!(err, OciError::CorruptTar { .. }), "{err:?}");
    }

    #[test]
    fn invalid_json_documents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.tar");
        let expect_invalid = |file: &str| match plan_image(&path) {
            Err(OciError::InvalidJson { file: f, .. }) => assert_eq!(f, file),
            other => panic!("expected InvalidJson for {file}, got {other:?}"),
        };

        // index.json that is not JSON
        write_layout(&path, b"{not json".to_vec(), vec![]);
        expect_invalid("index.json");
        // index.json without `manifests`
        write_layout(&path, br#"{"schemaVersion":2}"#.to_vec(), vec![]);
        expect_invalid("index.json");
        // oci-layout that is not JSON
        write_tar(
            &path,
            &[
                ("oci-layout".to_owned(), b"1.0.0".to_vec()),
                ("index.json".to_owned(), index_of(vec![])),
            ],
        )
        .unwrap();
        expect_invalid("oci-layout");
        // a manifest without `config`
        let oci = Oci::new(vec![layer("a", b"a")]);
        let mut m = oci.manifest_value();
        m.as_object_mut().unwrap().remove("config");
        let digest = write_single(&path, &oci, serde_json::to_vec(&m).unwrap());
        expect_invalid(&blob_path(hex_of(&digest)));
        // a config that is not JSON
        let mut oci = Oci::new(vec![layer("a", b"a")]);
        oci.config = b"not json".to_vec();
        let m = serde_json::to_vec(&oci.manifest_value()).unwrap();
        write_single(&path, &oci, m);
        expect_invalid(&blob_path(hex_of(&sha(b"not json"))));
        // legacy manifest.json that is not JSON, or lacks Layers
        write_tar(&path, &[("manifest.json".to_owned(), b"[{".to_vec())]).unwrap();
        expect_invalid("manifest.json");
        write_tar(
            &path,
            &[(
                "manifest.json".to_owned(),
                br#"[{"Config":"c.json"}]"#.to_vec(),
            )],
        )
        .unwrap();
        expect_invalid("manifest.json");
    }

    #[test]
    fn oversized_json_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.tar");
        let huge = vec![b' '; MAX_JSON_SIZE as usize + 1];
        write_layout(&path, huge, vec![]);
        match plan_image(&path) {
            Err(OciError::TooLarge { file, size, .. }) => {
                assert_eq!(file, "index.json");
                assert_eq!(size, MAX_JSON_SIZE + 1);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn empty_index_and_bad_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.tar");
        write_layout(&path, index_of(vec![]), vec![]);
        assert!(matches!(
            plan_image(&path),
            Err(OciError::InvalidDocument { .. })
        ));
        write_layout(
            &path,
            br#"{"schemaVersion":1,"manifests":[]}"#.to_vec(),
            vec![],
        );
        assert!(matches!(
            plan_image(&path),
            Err(OciError::InvalidDocument { .. })
        ));
        write_tar(&path, &[("manifest.json".to_owned(), b"[]".to_vec())]).unwrap();
        assert!(matches!(
            plan_image(&path),
            Err(OciError::InvalidDocument { .. })
        ));
    }

    #[test]
    fn missing_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.tar");
        let oci = Oci::new(vec![layer("a", b"a"), layer("b", b"b")]);
        let manifest = serde_json::to_vec(&oci.manifest_value()).unwrap();
        let missing = sha(&oci.layers[1].1);
        let mut blobs: Vec<_> = oci
            .blob_files()
            .into_iter()
            .filter(|(p, _)| !p.ends_with(hex_of(&missing)))
            .collect();
        blobs.push((blob_path(hex_of(&sha(&manifest))), manifest.clone()));
        write_layout(
            &path,
            index_of(vec![desc(MEDIA_TYPE_OCI_MANIFEST, &manifest, None)]),
            blobs,
        );
        match plan_image(&path) {
            Err(OciError::MissingBlob { digest, .. }) => assert_eq!(digest, missing),
            other => panic!("expected MissingBlob, got {other:?}"),
        }

        // The manifest itself missing.
        write_layout(
            &path,
            index_of(vec![desc(MEDIA_TYPE_OCI_MANIFEST, &manifest, None)]),
            oci.blob_files(),
        );
        match plan_image(&path) {
            Err(OciError::MissingBlob { digest, .. }) => assert_eq!(digest, sha(&manifest)),
            other => panic!("expected MissingBlob, got {other:?}"),
        }

        // A legacy layer file missing.
        write_tar(
            &path,
            &[
                ("c.json".to_owned(), image_config_json(vec![], &[]).unwrap()),
                (
                    "manifest.json".to_owned(),
                    br#"[{"Config":"c.json","Layers":["x/layer.tar"]}]"#.to_vec(),
                ),
            ],
        )
        .unwrap();
        match plan_image(&path) {
            Err(OciError::MissingFile { file, .. }) => assert_eq!(file, "x/layer.tar"),
            other => panic!("expected MissingFile, got {other:?}"),
        }
    }

    #[test]
    fn layer_digest_mismatch_is_caught_while_streaming() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corrupt.tar");
        let good = layer("a", &[1u8; 3000]);
        let oci = Oci::new(vec![good.clone()]);
        let manifest = serde_json::to_vec(&oci.manifest_value()).unwrap();
        // Same size, different bytes under the layer's name.
        let mut bad = good.clone();
        bad[1000] ^= 0xff;
        let mut blobs = vec![(blob_path(hex_of(&sha(&good))), bad.clone())];
        blobs.push((blob_path(hex_of(&sha(&oci.config))), oci.config.clone()));
        blobs.push((blob_path(hex_of(&sha(&manifest))), manifest.clone()));
        write_layout(
            &path,
            index_of(vec![desc(MEDIA_TYPE_OCI_MANIFEST, &manifest, None)]),
            blobs,
        );

        let plan = plan_image(&path).unwrap();
        // A sink that reads everything sees an error, never a clean EOF.
        let mut sink_result = None;
        let err = stream_blobs(&path, &plan, |_, reader| {
            let mut bytes = Vec::new();
            let r = reader.read_to_end(&mut bytes);
            sink_result = Some((r.is_ok(), bytes.len()));
            r.map(|_| ())
        })
        .unwrap_err();
        let (ok, len) = sink_result.unwrap();
        assert!(!ok, "the sink must not get a clean EOF for bad bytes");
        assert!(len < good.len(), "the sink must not get all the bytes");
        match err {
            OciError::DigestMismatch {
                path: p,
                expected,
                found,
            } => {
                assert_eq!(p, blob_path(hex_of(&sha(&good))));
                assert_eq!(expected, sha(&good));
                assert_eq!(found, sha(&bad));
            }
            other => panic!("expected DigestMismatch, got {other:?}"),
        }

        // A sink that reads nothing: the rest is drained and checked.
        let err = stream_blobs(&path, &plan, |_, _| Ok::<(), io::Error>(())).unwrap_err();
        assert!(matches!(err, OciError::DigestMismatch { .. }), "{err:?}");
    }

    #[test]
    fn config_digest_mismatch_is_caught_while_planning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corrupt.tar");
        let oci = Oci::new(vec![layer("a", b"a")]);
        let manifest = serde_json::to_vec(&oci.manifest_value()).unwrap();
        let mut blobs = oci.blob_files();
        let mut bad = oci.config.clone();
        bad[0] = b' ';
        blobs[1].1 = bad;
        blobs.push((blob_path(hex_of(&sha(&manifest))), manifest.clone()));
        write_layout(
            &path,
            index_of(vec![desc(MEDIA_TYPE_OCI_MANIFEST, &manifest, None)]),
            blobs,
        );
        match plan_image(&path) {
            Err(OciError::DigestMismatch { expected, .. }) => {
                assert_eq!(expected, sha(&oci.config))
            }
            other => panic!("expected DigestMismatch, got {other:?}"),
        }
    }

    #[test]
    fn size_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("size.tar");
        let oci = Oci::new(vec![layer("a", b"a")]);
        let mut m = oci.manifest_value();
        let real = oci.layers[0].1.len() as u64;
        m["layers"][0]["size"] = json!(real + 1);
        write_single(&path, &oci, serde_json::to_vec(&m).unwrap());
        match plan_image(&path) {
            Err(OciError::SizeMismatch {
                expected,
                found,
                digest,
                ..
            }) => {
                assert_eq!((expected, found), (real + 1, real));
                assert_eq!(digest, sha(&oci.layers[0].1));
            }
            other => panic!("expected SizeMismatch, got {other:?}"),
        }

        // A plan whose size disagrees with the tar is refused when streaming.
        let ok = dir.path().join("ok.tar");
        write_oci_layout_tar(&ok, &[("a", b"a", 0o644)], &[]).unwrap();
        let mut plan = plan_image(&ok).unwrap();
        plan.layers[0].size += 1;
        let err = stream_blobs(&ok, &plan, |_, _| Ok::<(), io::Error>(())).unwrap_err();
        assert!(matches!(err, OciError::SizeMismatch { .. }), "{err:?}");
    }

    #[test]
    fn unsupported_media_types() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mt.tar");

        // An artifact (helm chart) is no container image.
        let mut oci = Oci::new(vec![layer("a", b"a")]);
        oci.config_media_type = "application/vnd.cncf.helm.config.v1+json".to_owned();
        let m = serde_json::to_vec(&oci.manifest_value()).unwrap();
        write_single(&path, &oci, m);
        match plan_image(&path) {
            Err(OciError::UnsupportedMediaType { media_type, .. }) => {
                assert_eq!(media_type, "application/vnd.cncf.helm.config.v1+json")
            }
            other => panic!("expected UnsupportedMediaType, got {other:?}"),
        }

        // A Docker schema 1 manifest.
        let schema1 = br#"{"schemaVersion":1}"#.to_vec();
        write_layout(
            &path,
            index_of(vec![desc(
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
                &schema1,
                None,
            )]),
            vec![(blob_path(hex_of(&sha(&schema1))), schema1.clone())],
        );
        assert!(matches!(
            plan_image(&path),
            Err(OciError::UnsupportedMediaType { .. })
        ));

        // A sha512 digest.
        let oci = Oci::new(vec![layer("a", b"a")]);
        let mut m = oci.manifest_value();
        m["layers"][0]["digest"] = json!(format!("sha512:{}", "ab".repeat(64)));
        write_single(&path, &oci, serde_json::to_vec(&m).unwrap());
        assert!(matches!(
            plan_image(&path),
            Err(OciError::UnsupportedDigest { .. })
        ));
    }

    #[test]
    fn zstd_and_foreign_layers_are_opaque() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zstd.tar");
        let opaque = b"\x28\xb5\x2f\xfd not really zstd".to_vec();
        let mut oci = Oci::new(vec![opaque.clone()]);
        oci.layers[0].0 = "application/vnd.oci.image.layer.v1.tar+zstd".to_owned();
        let m = serde_json::to_vec(&oci.manifest_value()).unwrap();
        write_single(&path, &oci, m);
        let plan = plan_image(&path).unwrap();
        assert_eq!(
            plan.layers[0].media_type,
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        let blobs = collect(&path, &plan).unwrap();
        assert_eq!(blobs[0].2, opaque);
    }

    #[test]
    fn diff_id_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("diff.tar");
        let mut oci = Oci::new(vec![layer("a", b"a")]);
        oci.config = image_config_json(vec![sha(b"something else")], &[]).unwrap();
        let m = serde_json::to_vec(&oci.manifest_value()).unwrap();
        write_single(&path, &oci, m);
        assert!(matches!(
            plan_image(&path),
            Err(OciError::DiffIdMismatch { layer: 0, .. })
        ));

        oci.config = image_config_json(vec![], &[]).unwrap();
        let m = serde_json::to_vec(&oci.manifest_value()).unwrap();
        write_single(&path, &oci, m);
        assert!(matches!(
            plan_image(&path),
            Err(OciError::InvalidDocument { .. })
        ));
    }

    /// A multi-platform layout: index.json -> nested index -> manifests.
    /// Only the manifests in `present` have their blobs in the tar.
    fn write_multi(
        path: &Path,
        platforms: &[(&str, &str)],
        present: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut blobs = Vec::new();
        let mut descs = Vec::new();
        let mut digests = Vec::new();
        for &(os, arch) in platforms {
            let mut oci = Oci::new(vec![layer("arch", arch.as_bytes())]);
            let mut config: Value = serde_json::from_slice(&oci.config).unwrap();
            config["os"] = json!(os);
            config["architecture"] = json!(arch);
            oci.config = serde_json::to_vec(&config).unwrap();
            let manifest = serde_json::to_vec(&oci.manifest_value()).unwrap();
            descs.push(desc(MEDIA_TYPE_OCI_MANIFEST, &manifest, Some((os, arch))));
            digests.push((format!("{os}/{arch}"), sha(&manifest)));
            if present.contains(&(os, arch)) {
                blobs.extend(oci.blob_files());
                blobs.push((blob_path(hex_of(&sha(&manifest))), manifest));
            }
        }
        // A buildx attestation manifest.
        let att = br#"{"schemaVersion":2}"#.to_vec();
        descs.push(desc(
            MEDIA_TYPE_OCI_MANIFEST,
            &att,
            Some(("unknown", "unknown")),
        ));
        let nested = index_of(descs);
        blobs.push((blob_path(hex_of(&sha(&nested))), nested.clone()));
        write_layout(
            path,
            index_of(vec![desc(MEDIA_TYPE_OCI_INDEX, &nested, None)]),
            blobs,
        );
        digests
    }

    #[test]
    fn nested_index_picks_linux_amd64() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("multi.tar");
        let all = [("linux", "arm64"), ("linux", "amd64"), ("windows", "amd64")];
        // Like `docker save` of a multi-platform image: only one platform's blobs exported.
        let digests = write_multi(&path, &all, &[("linux", "amd64")]);
        let plan = plan_image(&path).unwrap();
        assert_eq!(plan.manifest.digest, digests[1].1);
        assert_eq!(plan.platform.as_deref(), Some("linux/amd64"));
        let blobs = collect(&path, &plan).unwrap();
        assert_eq!(blobs.len(), 3);
        assert_eq!(blobs[2].0, digests[1].1);
    }

    #[test]
    fn nested_index_without_linux_amd64() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("multi.tar");
        let all = [("linux", "arm64"), ("linux", "s390x")];
        write_multi(&path, &all, &all);
        let err = plan_image(&path).unwrap_err();
        match &err {
            OciError::NoMatchingPlatform { available, .. } => {
                assert_eq!(available, &["linux/arm64", "linux/s390x"])
            }
            other => panic!("expected NoMatchingPlatform, got {other:?}"),
        }
        assert!(
            err.to_string().contains("linux/arm64, linux/s390x"),
            "{err}"
        );
    }

    #[test]
    fn several_images_are_ambiguous() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("two.tar");
        let a = Oci::new(vec![layer("a", b"a")]);
        let b = Oci::new(vec![layer("b", b"b")]);
        let ma = serde_json::to_vec(&a.manifest_value()).unwrap();
        let mb = serde_json::to_vec(&b.manifest_value()).unwrap();
        let mut blobs = a.blob_files();
        blobs.extend(b.blob_files());
        blobs.push((blob_path(hex_of(&sha(&ma))), ma.clone()));
        blobs.push((blob_path(hex_of(&sha(&mb))), mb.clone()));
        write_layout(
            &path,
            index_of(vec![
                desc(MEDIA_TYPE_OCI_MANIFEST, &ma, None),
                desc(MEDIA_TYPE_OCI_MANIFEST, &mb, None),
            ]),
            blobs.clone(),
        );
        assert!(matches!(
            plan_image(&path),
            Err(OciError::AmbiguousImage { .. })
        ));

        // The same manifest listed twice (two tags) is one image.
        write_layout(
            &path,
            index_of(vec![
                desc(MEDIA_TYPE_OCI_MANIFEST, &ma, None),
                desc(MEDIA_TYPE_OCI_MANIFEST, &ma, None),
            ]),
            blobs,
        );
        assert_eq!(plan_image(&path).unwrap().manifest.digest, sha(&ma));

        // docker save of two images.
        let two = json!([
            {"Config": "a.json", "RepoTags": ["a:1"], "Layers": []},
            {"Config": "b.json", "RepoTags": ["b:1"], "Layers": []},
        ]);
        write_tar(
            &path,
            &[("manifest.json".to_owned(), two.to_string().into_bytes())],
        )
        .unwrap();
        assert!(matches!(
            plan_image(&path),
            Err(OciError::AmbiguousImage { .. })
        ));
    }

    #[test]
    fn duplicate_layers_stream_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dup.tar");
        let l = layer("same", b"same");
        let oci = Oci::new(vec![l.clone(), l.clone()]);
        let m = serde_json::to_vec(&oci.manifest_value()).unwrap();
        let mut blobs = oci.blob_files();
        blobs.remove(1); // the duplicate blob file
        blobs.push((blob_path(hex_of(&sha(&m))), m.clone()));
        write_layout(
            &path,
            index_of(vec![desc(MEDIA_TYPE_OCI_MANIFEST, &m, None)]),
            blobs,
        );
        let plan = plan_image(&path).unwrap();
        assert_eq!(plan.layers.len(), 2);
        let mut calls = 0;
        stream_blobs(&path, &plan, |_, _| {
            calls += 1;
            Ok::<(), io::Error>(())
        })
        .unwrap();
        assert_eq!(calls, 3);
        assert_eq!(
            plan.total_size(),
            l.len() as u64 + plan.config.size + plan.manifest.size
        );
    }

    #[test]
    fn sink_errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.tar");
        write_oci_layout_tar(&path, &[("a", b"a", 0o644)], &[]).unwrap();
        let plan = plan_image(&path).unwrap();
        let mut calls = 0;
        let err = stream_blobs(&path, &plan, |_, _| {
            calls += 1;
            Err("node refused the upload")
        })
        .unwrap_err();
        assert_eq!(calls, 1, "the walk stops at the first sink error");
        match &err {
            OciError::Sink { digest, source } => {
                assert_eq!(digest, &plan.layers[0].digest);
                assert_eq!(source.to_string(), "node refused the upload");
            }
            other => panic!("expected Sink, got {other:?}"),
        }
    }

    #[test]
    fn large_layer_streams() {
        const SIZE: usize = 20 * 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.tar");
        let mut data = vec![0u8; SIZE];
        let mut x: u32 = 1;
        for b in data.iter_mut() {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (x >> 24) as u8;
        }
        write_oci_layout_tar(&path, &[("big.bin", &data, 0o644)], &["/big.bin"]).unwrap();
        drop(data);

        let plan = plan_image(&path).unwrap();
        assert!(plan.layers[0].size > SIZE as u64);
        let mut largest_read = 0;
        let mut seen = Vec::new();
        stream_blobs(&path, &plan, |blob, reader| {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                largest_read = largest_read.max(n);
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            assert_eq!(total, blob.size);
            assert_eq!(
                format!("sha256:{}", hex::encode(hasher.finalize())),
                blob.digest
            );
            seen.push(blob.digest.clone());
            Ok::<(), io::Error>(())
        })
        .unwrap();
        assert_eq!(seen.len(), 3);
        assert!(largest_read <= 64 * 1024);
    }
}
