//! Hands images from Meshwork's own content store to a real containerd.
//!
//! Meshwork distributes OCI images between peers itself (as blobs in its own
//! content store, `crate::blobs`), so a node never pulls from a registry.
//! To *run* such an image the node's containerd must hold the same blobs, an
//! image record and unpacked snapshots, exactly as if `ctr images pull` had
//! done it. This module does that over containerd's gRPC API
//! (`containerd-client`, tested against containerd 1.6):
//!
//! 1. a lease is taken so containerd's garbage collector cannot remove
//!    half-imported content or snapshots;
//! 2. every blob (layers, config, manifest) missing from containerd's content
//!    store is streamed in with the `Write` API; containerd verifies each
//!    digest and size on commit;
//! 3. the manifest gets the `containerd.io/gc.ref.content.*` labels that
//!    point at its config and layers (what containerd's pull sets);
//! 4. each layer is unpacked into the snapshotter (overlayfs by default)
//!    under its chain id, through the diff service, and labelled
//!    `containerd.io/uncompressed`; the config is labelled
//!    `containerd.io/gc.ref.snapshot.<snapshotter>` = top chain id (what
//!    containerd's `Image.Unpack` does), so the snapshots live as long as
//!    the image;
//! 5. the image record (name → manifest descriptor) is created or updated
//!    last, so an image that [`Containerd::image_exists`] reports is runnable;
//! 6. the lease is deleted.
//!
//! [`Containerd`] wraps the gRPC channel and the containerd namespace and is
//! meant to be reused by the container runtime (containers, tasks) as well:
//! see [`Containerd::channel`] and [`Containerd::request`].

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, Kind as SnapshotKind, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest,
};
use containerd_client::services::v1::{
    AbortRequest, AddResourceRequest, ApplyRequest, CreateImageRequest, DeleteImageRequest,
    GetImageRequest, Image, Info as ContentInfo, InfoRequest, Resource, UpdateImageRequest,
    UpdateRequest, WriteAction, WriteContentRequest, content_client::ContentClient,
    diff_client::DiffClient, images_client::ImagesClient, version_client::VersionClient,
};
use containerd_client::types::Descriptor;
use futures::SinkExt;
use futures::channel::mpsc;
use sha2::{Digest, Sha256};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The default containerd socket of a Debian/Ubuntu containerd package.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";

/// The snapshotter used unless [`Containerd::with_snapshotter`] says otherwise;
/// it is containerd's default, so `ctr run` finds the unpacked layers.
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";

/// gRPC header carrying the containerd namespace of a call.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// gRPC header carrying the lease a call's new resources are attached to.
const LEASE_HEADER: &str = "containerd-lease";
/// Lease label after which containerd's GC drops a lease nobody deleted
/// (e.g. because the node crashed mid-import).
const LEASE_EXPIRE_LABEL: &str = "containerd.io/gc.expire";
/// How long an import lease may outlive a crashed importer.
const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Content label naming a layer's uncompressed digest (its diff id).
const UNCOMPRESSED_LABEL: &str = "containerd.io/uncompressed";
/// Bytes sent per `Write` message (containerd accepts up to 16 MiB messages).
const WRITE_CHUNK: usize = 1 << 20;
/// How long to wait for the socket to answer in [`Containerd::connect`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a write whose ingest ref is locked by another writer is retried.
const LOCKED_RETRIES: u32 = 50;

/// Layer media types the diff service can apply (it decompresses by type).
const LAYER_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

/// Manifest media types an image record may point at.
const MANIFEST_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// One content-addressed blob of an image (manifest, config or layer), as in
/// an OCI descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciBlob {
    /// `sha256:<64 lowercase hex>` of the blob's bytes.
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// OCI or Docker media type, e.g. `application/vnd.oci.image.layer.v1.tar+gzip`.
    pub media_type: String,
}

/// A single-platform image to hand to containerd: its name and the
/// descriptors of its manifest, config and layers (in manifest order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageToImport {
    /// The containerd image name, e.g. `meshwork.local/app:1.0`.
    pub name: String,
    /// The image manifest (OCI or Docker schema 2; not an index).
    pub manifest: OciBlob,
    /// The image config the manifest references.
    pub config: OciBlob,
    /// The layers, bottom first, as listed in the manifest.
    pub layers: Vec<OciBlob>,
}

/// What [`Containerd::import`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// The chain id of the top layer: the snapshot a container's root file system is
    /// prepared on (empty for an image without layers).
    pub chain_id: String,
    /// Blobs streamed into containerd's content store.
    pub blobs_written: usize,
    /// Blobs containerd already had (not read from Meshwork's store, except
    /// the small manifest and config, which are always read to be checked).
    pub blobs_present: usize,
    /// Layers applied into new snapshots (0 when every chain id was there).
    pub layers_unpacked: usize,
}

/// Everything that can go wrong talking to containerd; each names the image,
/// the blob and containerd's own message where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The socket is missing, refuses connections or nothing answers on it.
    #[error("containerd is not running at {}: {message}", socket.display())]
    NotRunning {
        /// The socket that was tried.
        socket: PathBuf,
        /// Why the connection failed.
        message: String,
    },
    /// The namespace cannot be used as a containerd namespace.
    #[error(
        "invalid containerd namespace {namespace:?}: use letters and digits separated by '.', '-' or '_'"
    )]
    InvalidNamespace {
        /// The rejected namespace.
        namespace: String,
    },
    /// A blob descriptor or its bytes are not acceptable (bad digest syntax,
    /// unsupported media type, wrong size, manifest/config inconsistent
    /// with the descriptors given).
    #[error("image {image}: blob {digest} is invalid: {message}")]
    InvalidBlob {
        /// The image being imported.
        image: String,
        /// The offending blob.
        digest: String,
        /// What is wrong with it.
        message: String,
    },
    /// Meshwork's store could not open or read a blob.
    #[error("image {image}: reading blob {digest} from the Meshwork store failed: {source}")]
    Read {
        /// The image being imported.
        image: String,
        /// The blob being read.
        digest: String,
        /// The store's error.
        #[source]
        source: io::Error,
    },
    /// containerd's content store refused or failed a blob (a digest or size
    /// mismatch shows up here, as containerd verifies both on commit).
    #[error("image {image}: containerd refused blob {digest}: {message}")]
    Content {
        /// The image being imported.
        image: String,
        /// The blob being written or labelled.
        digest: String,
        /// containerd's message.
        message: String,
    },
    /// Preparing, applying or committing a layer's snapshot failed.
    #[error("image {image}: unpacking layer {digest} failed: {message}")]
    Unpack {
        /// The image being imported.
        image: String,
        /// The layer blob being unpacked.
        digest: String,
        /// containerd's message (or the diff id mismatch).
        message: String,
    },
    /// An image record or lease call failed.
    #[error("image {image}: {operation} failed: {message}")]
    Image {
        /// The image concerned.
        image: String,
        /// What was being done, e.g. `creating the image record`.
        operation: &'static str,
        /// containerd's message.
        message: String,
    },
}

/// A connection to containerd bound to one containerd namespace.
///
/// Cheap to clone (the gRPC channel is shared); every call made through
/// [`Containerd::request`] carries the namespace.
#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    namespace_header: AsciiMetadataValue,
    snapshotter: String,
}

impl Containerd {
    /// Connects to containerd's gRPC socket (normally [`DEFAULT_SOCKET`]) and
    /// checks that it answers, for calls in `namespace` (created by
    /// containerd on first use).
    ///
    /// # Errors
    ///
    /// [`ContainerdError::NotRunning`] when the socket is missing, refuses
    /// connections or containerd does not answer within 10 s;
    /// [`ContainerdError::InvalidNamespace`] for a name containerd would
    /// reject.
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self, ContainerdError> {
        if !valid_namespace(namespace) {
            return Err(ContainerdError::InvalidNamespace {
                namespace: namespace.to_owned(),
            });
        }
        let namespace_header =
            MetadataValue::try_from(namespace).map_err(|_| ContainerdError::InvalidNamespace {
                namespace: namespace.to_owned(),
            })?;
        let not_running = |message: String| ContainerdError::NotRunning {
            socket: socket.to_owned(),
            message,
        };
        let attempt = async {
            let channel = containerd_client::connect(socket)
                .await
                .map_err(|e| not_running(error_chain(&e)))?;
            let version = VersionClient::new(channel.clone())
                .version(Request::new(()))
                .await
                .map_err(|s| not_running(status_message(&s)))?
                .into_inner();
            tracing::debug!(
                socket = %socket.display(),
                version = %version.version,
                "connected to containerd"
            );
            Ok(channel)
        };
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| not_running(format!("no answer within {CONNECT_TIMEOUT:?}")))??;
        Ok(Self {
            channel,
            namespace: namespace.to_owned(),
            namespace_header,
            snapshotter: DEFAULT_SNAPSHOTTER.to_owned(),
        })
    }

    /// Uses `snapshotter` (e.g. `native` where overlayfs is unavailable)
    /// instead of [`DEFAULT_SNAPSHOTTER`] for unpacking.
    #[must_use]
    pub fn with_snapshotter(mut self, snapshotter: &str) -> Self {
        snapshotter.clone_into(&mut self.snapshotter);
        self
    }

    /// The gRPC channel, for building other containerd service clients.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The containerd namespace every call is made in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The snapshotter layers are unpacked into.
    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// Wraps `message` in a request carrying this connection's namespace
    /// header, as every containerd call needs.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace_header.clone());
        request
    }

    /// Like [`Containerd::request`], plus the lease header so that what the
    /// call creates belongs to `lease` until the lease is deleted.
    fn leased<T>(&self, message: T, lease: &Lease) -> Request<T> {
        let mut request = self.request(message);
        request
            .metadata_mut()
            .insert(LEASE_HEADER, lease.header.clone());
        request
    }

    /// Whether containerd has an image record called `name` in this namespace.
    ///
    /// # Errors
    ///
    /// [`ContainerdError::Image`] when containerd fails the lookup.
    pub async fn image_exists(&self, name: &str) -> Result<bool, ContainerdError> {
        let mut images = ImagesClient::new(self.channel());
        match images
            .get(self.request(GetImageRequest {
                name: name.to_owned(),
            }))
            .await
        {
            Ok(response) => Ok(response.into_inner().image.is_some()),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(image_error(name, "looking up the image record", &status)),
        }
    }

    /// Removes the image record `name` (a missing record is not an error) and
    /// waits for containerd's garbage collection, which then drops the
    /// image's content and snapshots unless another image shares them.
    ///
    /// # Errors
    ///
    /// [`ContainerdError::Image`] when containerd fails the deletion.
    pub async fn remove_image(&self, name: &str) -> Result<(), ContainerdError> {
        let mut images = ImagesClient::new(self.channel());
        match images
            .delete(self.request(DeleteImageRequest {
                name: name.to_owned(),
                sync: true,
                target: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(image_error(name, "removing the image record", &status)),
        }
    }

    /// Imports `image` into containerd: writes the blobs containerd lacks,
    /// unpacks the layers into the snapshotter and creates or updates the
    /// image record, so that `ctr -n <namespace> run <name> <id>` works.
    ///
    /// `open` gives a blocking reader over a blob's bytes in Meshwork's store;
    /// it is called only for the manifest, the config and the blobs
    /// containerd does not already have. Reads happen in 1 MiB chunks (via
    /// `block_in_place` on a multi-threaded runtime). Nothing is trusted:
    /// containerd checks every digest and size, and the manifest and config
    /// are checked here against the descriptors given.
    ///
    /// # Errors
    ///
    /// [`ContainerdError::InvalidBlob`] for bad descriptors, an unsupported
    /// media type, or a manifest/config that does not match them;
    /// [`ContainerdError::Read`] when `open` or a read fails;
    /// [`ContainerdError::Content`] when containerd refuses a blob (digest
    /// or size mismatch); [`ContainerdError::Unpack`] when a layer cannot be
    /// applied; [`ContainerdError::Image`] for lease or image record calls.
    /// On error no image record is created or changed; what was written stays
    /// only until containerd's next garbage collection (if the future is
    /// dropped midway, until the import lease expires after 24 h).
    pub async fn import<F, R>(
        &self,
        image: &ImageToImport,
        mut open: F,
    ) -> Result<ImportReport, ContainerdError>
    where
        F: FnMut(&OciBlob) -> Result<R, io::Error> + Send,
        R: Read + Send,
    {
        validate(image)?;
        let lease = self.create_lease(&image.name).await?;
        let result = self.import_leased(image, &mut open, &lease).await;
        self.delete_lease(&lease).await;
        result
    }

    /// The body of [`Containerd::import`], run while `lease` protects what it
    /// writes.
    async fn import_leased<F, R>(
        &self,
        image: &ImageToImport,
        open: &mut F,
        lease: &Lease,
    ) -> Result<ImportReport, ContainerdError>
    where
        F: FnMut(&OciBlob) -> Result<R, io::Error> + Send,
        R: Read + Send,
    {
        let name = image.name.as_str();
        let mut report = ImportReport::default();

        // The manifest and config are small and needed here: read, check.
        let manifest_bytes = read_small(name, &image.manifest, open)?;
        check_manifest(image, &manifest_bytes)?;
        let config_bytes = read_small(name, &image.config, open)?;
        let diff_ids = diff_ids(image, &config_bytes)?;

        for layer in &image.layers {
            if self.content_present(name, layer, lease).await? {
                report.blobs_present += 1;
                continue;
            }
            let mut reader = open(layer).map_err(|source| ContainerdError::Read {
                image: name.to_owned(),
                digest: layer.digest.clone(),
                source,
            })?;
            if self.write_blob(name, layer, &mut reader, lease).await? {
                report.blobs_written += 1;
            } else {
                report.blobs_present += 1;
            }
        }
        for (blob, bytes) in [
            (&image.config, &config_bytes),
            (&image.manifest, &manifest_bytes),
        ] {
            if self.content_present(name, blob, lease).await?
                || !self
                    .write_blob(name, blob, &mut bytes.as_slice(), lease)
                    .await?
            {
                report.blobs_present += 1;
            } else {
                report.blobs_written += 1;
            }
        }

        // The GC references containerd's pull puts on a manifest.
        let mut manifest_labels = HashMap::new();
        manifest_labels.insert(
            "containerd.io/gc.ref.content.config".to_owned(),
            image.config.digest.clone(),
        );
        for (i, layer) in image.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.clone(),
            );
        }
        self.label_content(name, &image.manifest.digest, manifest_labels)
            .await?;

        // Unpack, bottom layer first.
        let mut parent = String::new();
        for (layer, diff_id) in image.layers.iter().zip(&diff_ids) {
            let chain_id = if parent.is_empty() {
                diff_id.clone()
            } else {
                chain_id(&parent, diff_id)
            };
            if self
                .unpack_layer(name, layer, diff_id, &parent, &chain_id, lease)
                .await?
            {
                report.layers_unpacked += 1;
            }
            parent = chain_id;
        }
        report.chain_id.clone_from(&parent);
        if !parent.is_empty() {
            let mut labels = HashMap::new();
            labels.insert(
                format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter),
                parent,
            );
            self.label_content(name, &image.config.digest, labels)
                .await?;
        }

        self.put_image_record(image).await?;
        tracing::info!(
            image = name,
            namespace = %self.namespace,
            written = report.blobs_written,
            present = report.blobs_present,
            unpacked = report.layers_unpacked,
            "image imported into containerd"
        );
        Ok(report)
    }

    /// Creates the lease that keeps an import's content and snapshots alive.
    async fn create_lease(&self, image: &str) -> Result<Lease, ContainerdError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let now = SystemTime::now();
        let nanos = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let id = format!(
            "meshwork-import-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut labels = HashMap::new();
        labels.insert(LEASE_EXPIRE_LABEL.to_owned(), rfc3339_utc(now + LEASE_TTL));
        LeasesClient::new(self.channel())
            .create(
                self.request(containerd_client::services::v1::CreateRequest {
                    id: id.clone(),
                    labels,
                }),
            )
            .await
            .map_err(|s| image_error(image, "creating an import lease", &s))?;
        let header = MetadataValue::try_from(id.as_str()).map_err(|_| ContainerdError::Image {
            image: image.to_owned(),
            operation: "creating an import lease",
            message: format!("lease id {id:?} is not a valid header"),
        })?;
        Ok(Lease { id, header })
    }

    /// Deletes an import lease; a failure only delays cleanup until the
    /// lease expires, so it is logged, not returned.
    async fn delete_lease(&self, lease: &Lease) {
        if let Err(status) = LeasesClient::new(self.channel())
            .delete(
                self.request(containerd_client::services::v1::DeleteRequest {
                    id: lease.id.clone(),
                    sync: false,
                }),
            )
            .await
        {
            tracing::warn!(lease = %lease.id, error = %status_message(&status), "could not delete containerd lease");
        }
    }

    /// Whether containerd already has `blob`; if so it is added to `lease`
    /// so the GC cannot take it before the image record references it.
    async fn content_present(
        &self,
        image: &str,
        blob: &OciBlob,
        lease: &Lease,
    ) -> Result<bool, ContainerdError> {
        let mut content = ContentClient::new(self.channel());
        match content
            .info(self.request(InfoRequest {
                digest: blob.digest.clone(),
            }))
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => return Ok(false),
            Err(status) => return Err(content_error(image, &blob.digest, &status)),
        }
        LeasesClient::new(self.channel())
            .add_resource(self.request(AddResourceRequest {
                id: lease.id.clone(),
                resource: Some(Resource {
                    id: blob.digest.clone(),
                    r#type: "content".to_owned(),
                }),
            }))
            .await
            .map_err(|s| content_error(image, &blob.digest, &s))?;
        tracing::debug!(image, digest = %blob.digest, "blob already in containerd");
        Ok(true)
    }

    /// Streams `blob` from `reader` into containerd's content store.
    /// Returns `false` if containerd turned out to have it already (another
    /// writer committed it meanwhile).
    async fn write_blob<R: Read + Send>(
        &self,
        image: &str,
        blob: &OciBlob,
        reader: &mut R,
        lease: &Lease,
    ) -> Result<bool, ContainerdError> {
        let reference = format!("meshwork-import-{}", blob.digest);
        let mut attempt = 0;
        loop {
            match self
                .try_write_blob(image, blob, reader, lease, &reference)
                .await
            {
                Err(WriteFailure::Locked(status)) if attempt < LOCKED_RETRIES => {
                    // Another writer is ingesting the same blob; wait for it.
                    tracing::debug!(image, digest = %blob.digest, error = %status_message(&status), "ingest locked, retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10))))
                        .await;
                    if self.content_present(image, blob, lease).await? {
                        return Ok(false);
                    }
                }
                Err(WriteFailure::Locked(status)) => {
                    return Err(content_error(image, &blob.digest, &status));
                }
                Err(WriteFailure::Exists) => {
                    if self.content_present(image, blob, lease).await? {
                        return Ok(false);
                    }
                    return Err(content_error_msg(
                        image,
                        &blob.digest,
                        "containerd says the blob exists but has no info for it".to_owned(),
                    ));
                }
                Err(WriteFailure::Failed(error)) => {
                    // Drop the partial ingest so a retry starts clean.
                    let abort = ContentClient::new(self.channel())
                        .abort(self.request(AbortRequest {
                            r#ref: reference.clone(),
                        }))
                        .await;
                    if let Err(status) = abort
                        && status.code() != Code::NotFound
                    {
                        tracing::debug!(reference, error = %status_message(&status), "could not abort ingest");
                    }
                    return Err(error);
                }
                Ok(()) => {
                    tracing::debug!(image, digest = %blob.digest, size = blob.size, "blob written to containerd");
                    return Ok(true);
                }
            }
        }
    }

    /// One attempt of [`Containerd::write_blob`]: Stat (resume offset),
    /// Write chunks, Commit with the expected digest and size.
    async fn try_write_blob<R: Read + Send>(
        &self,
        image: &str,
        blob: &OciBlob,
        reader: &mut R,
        lease: &Lease,
        reference: &str,
    ) -> Result<(), WriteFailure> {
        let failed =
            |status: &Status| WriteFailure::Failed(content_error(image, &blob.digest, status));
        let size = i64::try_from(blob.size).map_err(|_| {
            WriteFailure::Failed(invalid(image, &blob.digest, "size does not fit in i64"))
        })?;
        let (mut tx, rx) = mpsc::channel::<WriteContentRequest>(2);
        let request = |action: WriteAction| WriteContentRequest {
            action: action as i32,
            r#ref: reference.to_owned(),
            total: size,
            expected: blob.digest.clone(),
            ..Default::default()
        };
        // Queue the Stat before opening the stream so containerd answers
        // (and sends its headers) at once.
        tx.send(request(WriteAction::Stat))
            .await
            .map_err(|_| closed(image, blob))?;
        let mut content = ContentClient::new(self.channel());
        let mut responses = match content.write(self.leased(rx, lease)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(classify_write_status(status, image, blob)),
        };
        let stat = match responses.message().await {
            Ok(Some(stat)) => stat,
            Ok(None) => return Err(closed(image, blob)),
            Err(status) => return Err(classify_write_status(status, image, blob)),
        };

        // Resume a previous partial ingest of the same digest (containerd
        // still verifies the whole blob on commit).
        let mut offset = stat.offset;
        if offset > size {
            return Err(WriteFailure::Failed(content_error_msg(
                image,
                &blob.digest,
                format!("stale ingest {reference} is larger ({offset}) than the blob"),
            )));
        }
        if offset > 0 && offset < size {
            let skip = u64::try_from(offset).unwrap_or(0);
            let skipped = blocking(|| io::copy(&mut reader.by_ref().take(skip), &mut io::sink()))
                .map_err(|source| read_error(image, blob, source))?;
            if skipped != skip {
                return Err(WriteFailure::Failed(invalid(
                    image,
                    &blob.digest,
                    &format!("store has {skipped} bytes, descriptor says {}", blob.size),
                )));
            }
        }

        // containerd reports the whole size when it already holds the blob
        // (e.g. in another namespace: content is shared) or a previous
        // ingest completed; the commit then just links that verified blob.
        let mut buffer = vec![0u8; if offset < size { WRITE_CHUNK } else { 0 }];
        while offset < size {
            let n = blocking(|| read_full(reader, &mut buffer))
                .map_err(|source| read_error(image, blob, source))?;
            if n == 0 {
                break;
            }
            let len = i64::try_from(n).unwrap_or(i64::MAX);
            if offset.saturating_add(len) > size {
                return Err(WriteFailure::Failed(invalid(
                    image,
                    &blob.digest,
                    &format!(
                        "store has more than the {} bytes the descriptor says",
                        blob.size
                    ),
                )));
            }
            let mut write = request(WriteAction::Write);
            write.offset = offset;
            write.data = buffer[..n].to_vec();
            tx.send(write).await.map_err(|_| closed(image, blob))?;
            match responses.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Err(closed(image, blob)),
                Err(status) => return Err(failed(&status)),
            }
            offset += len;
        }
        if offset != size {
            return Err(WriteFailure::Failed(invalid(
                image,
                &blob.digest,
                &format!("store has {offset} bytes, descriptor says {}", blob.size),
            )));
        }

        // The commit must carry the current offset: containerd truncates
        // the ingest when a write or commit says offset 0.
        let mut commit = request(WriteAction::Commit);
        commit.offset = offset;
        tx.send(commit).await.map_err(|_| closed(image, blob))?;
        let committed = match responses.message().await {
            Ok(Some(committed)) => committed,
            Ok(None) => return Err(closed(image, blob)),
            Err(status) if status.code() == Code::AlreadyExists => {
                return Err(WriteFailure::Exists);
            }
            Err(status) => return Err(failed(&status)),
        };
        if committed.digest != blob.digest {
            return Err(WriteFailure::Failed(content_error_msg(
                image,
                &blob.digest,
                format!("containerd committed digest {}", committed.digest),
            )));
        }
        Ok(())
    }

    /// Sets (adds or replaces) `labels` on the content `digest`.
    async fn label_content(
        &self,
        image: &str,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        ContentClient::new(self.channel())
            .update(self.request(UpdateRequest {
                info: Some(ContentInfo {
                    digest: digest.to_owned(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|s| content_error(image, digest, &s))?;
        Ok(())
    }

    /// Unpacks one layer as snapshot `chain_id` on top of `parent` (empty for
    /// the bottom layer), as containerd's `rootfs.ApplyLayer` does. Returns
    /// `false` if the snapshot already existed.
    async fn unpack_layer(
        &self,
        image: &str,
        layer: &OciBlob,
        diff_id: &str,
        parent: &str,
        chain_id: &str,
        lease: &Lease,
    ) -> Result<bool, ContainerdError> {
        let unpack_error = |message: String| ContainerdError::Unpack {
            image: image.to_owned(),
            digest: layer.digest.clone(),
            message,
        };
        let mut snapshots = SnapshotsClient::new(self.channel());
        match snapshots
            .stat(self.request(StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: chain_id.to_owned(),
            }))
            .await
        {
            Ok(response) => {
                let kind = response.into_inner().info.map(|i| i.kind);
                if kind == Some(SnapshotKind::Committed as i32) {
                    self.lease_snapshot(chain_id, lease)
                        .await
                        .map_err(|s| unpack_error(status_message(&s)))?;
                    tracing::debug!(image, chain_id, "layer already unpacked");
                    return Ok(false);
                }
                return Err(unpack_error(format!(
                    "snapshot {chain_id} exists but is not committed"
                )));
            }
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return Err(unpack_error(status_message(&status))),
        }

        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        // containerd's own unpack key format: "extract-<unique> <chain id>".
        let key = format!("extract-{nanos}-{} {chain_id}", std::process::id());
        let mounts = snapshots
            .prepare(self.leased(
                PrepareSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.to_owned(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await
            .map_err(|s| unpack_error(format!("preparing snapshot: {}", status_message(&s))))?
            .into_inner()
            .mounts;

        let result = async {
            let applied = DiffClient::new(self.channel())
                .apply(self.leased(
                    ApplyRequest {
                        diff: Some(descriptor(layer)),
                        mounts,
                        payloads: HashMap::new(),
                        sync_fs: false,
                    },
                    lease,
                ))
                .await
                .map_err(|s| unpack_error(format!("applying: {}", status_message(&s))))?
                .into_inner()
                .applied
                .map(|d| d.digest)
                .unwrap_or_default();
            if applied != diff_id {
                return Err(unpack_error(format!(
                    "uncompressed digest is {applied}, the config's diff id is {diff_id}"
                )));
            }
            match snapshots
                .commit(self.leased(
                    CommitSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        name: chain_id.to_owned(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await
            {
                Ok(_) => Ok(true),
                // Unpacked concurrently by someone else: theirs is identical.
                Err(status) if status.code() == Code::AlreadyExists => {
                    self.lease_snapshot(chain_id, lease)
                        .await
                        .map_err(|s| unpack_error(status_message(&s)))?;
                    Ok(false)
                }
                Err(status) => Err(unpack_error(format!(
                    "committing snapshot {chain_id}: {}",
                    status_message(&status)
                ))),
            }
        }
        .await;

        let unpacked = match result {
            Ok(unpacked) => unpacked,
            Err(error) => {
                self.remove_snapshot(&key).await;
                return Err(error);
            }
        };
        if !unpacked {
            self.remove_snapshot(&key).await;
            return Ok(false);
        }
        let mut labels = HashMap::new();
        labels.insert(UNCOMPRESSED_LABEL.to_owned(), diff_id.to_owned());
        self.label_content(image, &layer.digest, labels).await?;
        tracing::debug!(image, digest = %layer.digest, chain_id, "layer unpacked");
        Ok(true)
    }

    /// Adds the committed snapshot `chain_id` to `lease`.
    async fn lease_snapshot(&self, chain_id: &str, lease: &Lease) -> Result<(), Status> {
        LeasesClient::new(self.channel())
            .add_resource(self.request(AddResourceRequest {
                id: lease.id.clone(),
                resource: Some(Resource {
                    id: chain_id.to_owned(),
                    r#type: format!("snapshots/{}", self.snapshotter),
                }),
            }))
            .await
            .map(|_| ())
    }

    /// Best-effort removal of an unpack's active snapshot.
    async fn remove_snapshot(&self, key: &str) {
        if let Err(status) = SnapshotsClient::new(self.channel())
            .remove(self.request(RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_owned(),
            }))
            .await
            && status.code() != Code::NotFound
        {
            tracing::debug!(key, error = %status_message(&status), "could not remove extraction snapshot");
        }
    }

    /// Creates the image record, or points an existing one at this manifest.
    async fn put_image_record(&self, image: &ImageToImport) -> Result<(), ContainerdError> {
        let record = Image {
            name: image.name.clone(),
            labels: HashMap::new(),
            target: Some(descriptor(&image.manifest)),
            created_at: None,
            updated_at: None,
        };
        let mut images = ImagesClient::new(self.channel());
        match images
            .create(self.request(CreateImageRequest {
                image: Some(record.clone()),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => images
                .update(self.request(UpdateImageRequest {
                    image: Some(record),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".to_owned()],
                    }),
                    source_date_epoch: None,
                }))
                .await
                .map(|_| ())
                .map_err(|s| image_error(&image.name, "updating the image record", &s)),
            Err(status) => Err(image_error(
                &image.name,
                "creating the image record",
                &status,
            )),
        }
    }
}

/// An import lease: its id and the same id as a header value.
struct Lease {
    id: String,
    header: AsciiMetadataValue,
}

/// Why one attempt to write a blob failed.
enum WriteFailure {
    /// The ingest ref is locked by another writer; worth retrying.
    Locked(Status),
    /// containerd already has the blob.
    Exists,
    /// A real failure; the partial ingest should be aborted.
    Failed(ContainerdError),
}

/// Sorts a status from opening a write stream.
fn classify_write_status(status: Status, image: &str, blob: &OciBlob) -> WriteFailure {
    match status.code() {
        Code::AlreadyExists => WriteFailure::Exists,
        Code::Unavailable if status.message().contains("locked") => WriteFailure::Locked(status),
        _ => WriteFailure::Failed(content_error(image, &blob.digest, &status)),
    }
}

/// The stream closed before containerd answered.
fn closed(image: &str, blob: &OciBlob) -> WriteFailure {
    WriteFailure::Failed(content_error_msg(
        image,
        &blob.digest,
        "containerd closed the write stream".to_owned(),
    ))
}

/// A read error from Meshwork's store during a write.
fn read_error(image: &str, blob: &OciBlob, source: io::Error) -> WriteFailure {
    WriteFailure::Failed(ContainerdError::Read {
        image: image.to_owned(),
        digest: blob.digest.clone(),
        source,
    })
}

/// Checks descriptors before anything is sent to containerd.
fn validate(image: &ImageToImport) -> Result<(), ContainerdError> {
    let name = &image.name;
    if name.is_empty() {
        return Err(ContainerdError::Image {
            image: name.clone(),
            operation: "validating the import",
            message: "empty image name".to_owned(),
        });
    }
    for blob in std::iter::once(&image.manifest)
        .chain(std::iter::once(&image.config))
        .chain(&image.layers)
    {
        if !valid_digest(&blob.digest) {
            return Err(invalid(
                name,
                &blob.digest,
                "digest is not sha256:<64 lowercase hex digits>",
            ));
        }
    }
    if !MANIFEST_MEDIA_TYPES.contains(&image.manifest.media_type.as_str()) {
        return Err(invalid(
            name,
            &image.manifest.digest,
            &format!(
                "unsupported manifest media type {:?}",
                image.manifest.media_type
            ),
        ));
    }
    if image.layers.is_empty() {
        return Err(invalid(name, &image.manifest.digest, "image has no layers"));
    }
    for layer in &image.layers {
        if !LAYER_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
            return Err(invalid(
                name,
                &layer.digest,
                &format!("unsupported layer media type {:?}", layer.media_type),
            ));
        }
    }
    Ok(())
}

/// Reads a small blob (manifest or config) whole and checks its digest.
fn read_small<F, R>(image: &str, blob: &OciBlob, open: &mut F) -> Result<Vec<u8>, ContainerdError>
where
    F: FnMut(&OciBlob) -> Result<R, io::Error>,
    R: Read,
{
    const MAX_SMALL: u64 = 16 << 20;
    if blob.size > MAX_SMALL {
        return Err(invalid(
            image,
            &blob.digest,
            &format!("{} bytes is too large for a manifest or config", blob.size),
        ));
    }
    let read_err = |source| ContainerdError::Read {
        image: image.to_owned(),
        digest: blob.digest.clone(),
        source,
    };
    let reader = open(blob).map_err(read_err)?;
    let mut bytes = Vec::with_capacity(usize::try_from(blob.size).unwrap_or(0));
    blocking(|| reader.take(blob.size + 1).read_to_end(&mut bytes)).map_err(read_err)?;
    if bytes.len() as u64 != blob.size {
        return Err(invalid(
            image,
            &blob.digest,
            &format!(
                "store has {} bytes, descriptor says {}",
                bytes.len(),
                blob.size
            ),
        ));
    }
    let actual = sha256_digest(&bytes);
    if actual != blob.digest {
        return Err(invalid(
            image,
            &blob.digest,
            &format!("content hashes to {actual}"),
        ));
    }
    Ok(bytes)
}

/// Checks that the manifest references exactly the config and layers given.
fn check_manifest(image: &ImageToImport, bytes: &[u8]) -> Result<(), ContainerdError> {
    let bad = |message: String| invalid(&image.name, &image.manifest.digest, &message);
    let manifest: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("manifest is not JSON: {e}")))?;
    let digest_of = |v: &serde_json::Value| {
        v.get("digest")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let config = manifest.get("config").and_then(digest_of);
    if config.as_deref() != Some(image.config.digest.as_str()) {
        return Err(bad(format!(
            "manifest config is {config:?}, expected {}",
            image.config.digest
        )));
    }
    let layers: Option<Vec<String>> = manifest
        .get("layers")
        .and_then(serde_json::Value::as_array)
        .and_then(|ls| ls.iter().map(digest_of).collect());
    let expected: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
    match layers {
        Some(layers) if layers == expected => Ok(()),
        other => Err(bad(format!(
            "manifest layers are {other:?}, expected {expected:?}"
        ))),
    }
}

/// The config's `rootfs.diff_ids`, one per layer.
fn diff_ids(image: &ImageToImport, config: &[u8]) -> Result<Vec<String>, ContainerdError> {
    let bad = |message: String| invalid(&image.name, &image.config.digest, &message);
    let config: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| bad(format!("config is not JSON: {e}")))?;
    let ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(serde_json::Value::as_array)
        .and_then(|ids| {
            ids.iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| bad("config has no rootfs.diff_ids".to_owned()))?;
    if ids.len() != image.layers.len() {
        return Err(bad(format!(
            "config has {} diff ids for {} layers",
            ids.len(),
            image.layers.len()
        )));
    }
    if let Some(id) = ids.iter().find(|id| !valid_digest(id)) {
        return Err(bad(format!("diff id {id:?} is not a sha256 digest")));
    }
    Ok(ids)
}

/// The chain id of a layer on top of the chain `parent`:
/// `sha256(parent + " " + diff_id)`.
fn chain_id(parent: &str, diff_id: &str) -> String {
    sha256_digest(format!("{parent} {diff_id}").as_bytes())
}

/// `sha256:<hex>` of `bytes`.
fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Whether `digest` is `sha256:` and 64 lowercase hex digits.
fn valid_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// containerd's namespace rule: labels of letters and digits joined by
/// `.`, `-` or `_`, at most 76 characters.
fn valid_namespace(namespace: &str) -> bool {
    !namespace.is_empty()
        && namespace.len() <= 76
        && namespace
            .split(['.', '-', '_'])
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The containerd descriptor of a blob.
fn descriptor(blob: &OciBlob) -> Descriptor {
    Descriptor {
        media_type: blob.media_type.clone(),
        digest: blob.digest.clone(),
        size: i64::try_from(blob.size).unwrap_or(i64::MAX),
        annotations: HashMap::new(),
    }
}

/// Runs a blocking read without stalling other tasks on a multi-threaded
/// runtime (elsewhere it simply runs inline).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Fills `buffer` as far as the reader allows; returns the bytes read
/// (less than the buffer only at end of stream).
fn read_full<R: Read>(reader: &mut R, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// `UTC` time as RFC 3339 (`2006-01-02T15:04:05Z`), as containerd's GC
/// expects in `containerd.io/gc.expire`.
fn rfc3339_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An error and all its sources, joined with `: `.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = e.source();
    }
    message
}

/// containerd's message and the gRPC code, e.g. `unexpected commit digest … (FailedPrecondition)`.
fn status_message(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{} ({:?})", status.message(), status.code())
    }
}

/// A [`ContainerdError::InvalidBlob`].
fn invalid(image: &str, digest: &str, message: &str) -> ContainerdError {
    ContainerdError::InvalidBlob {
        image: image.to_owned(),
        digest: digest.to_owned(),
        message: message.to_owned(),
    }
}

/// A [`ContainerdError::Content`] from a gRPC status.
fn content_error(image: &str, digest: &str, status: &Status) -> ContainerdError {
    content_error_msg(image, digest, status_message(status))
}

/// A [`ContainerdError::Content`] from a message.
fn content_error_msg(image: &str, digest: &str, message: String) -> ContainerdError {
    ContainerdError::Content {
        image: image.to_owned(),
        digest: digest.to_owned(),
        message,
    }
}

/// A [`ContainerdError::Image`] from a gRPC status.
fn image_error(image: &str, operation: &'static str, status: &Status) -> ContainerdError {
    ContainerdError::Image {
        image: image.to_owned(),
        operation,
        message: status_message(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A test image: descriptors plus the bytes behind them.
    pub(crate) struct Fixture {
        pub(crate) image: ImageToImport,
        pub(crate) blobs: HashMap<String, Vec<u8>>,
    }

    impl Fixture {
        /// An `open` callback serving the fixture's blobs.
        pub(crate) fn opener(
            &self,
        ) -> impl FnMut(&OciBlob) -> io::Result<io::Cursor<Vec<u8>>> + Send + '_ {
            |blob: &OciBlob| {
                self.blobs
                    .get(&blob.digest)
                    .cloned()
                    .map(io::Cursor::new)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, blob.digest.clone()))
            }
        }
    }

    fn blob(bytes: &[u8], media_type: &str) -> OciBlob {
        OciBlob {
            digest: sha256_digest(bytes),
            size: bytes.len() as u64,
            media_type: media_type.to_owned(),
        }
    }

    fn descriptor_json(blob: &OciBlob) -> serde_json::Value {
        serde_json::json!({
            "mediaType": blob.media_type,
            "digest": blob.digest,
            "size": blob.size,
        })
    }

    /// An uncompressed tar with `/bin/busybox` (Debian's busybox-static) and
    /// `/bin/sh`, `/bin/echo` symlinked to it.
    pub(crate) fn busybox_layer() -> Vec<u8> {
        let busybox =
            std::fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
        let mut builder = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        dir.set_mtime(0);
        builder
            .append_data(&mut dir, "bin/", io::empty())
            .expect("tar dir");
        let mut file = tar::Header::new_gnu();
        file.set_entry_type(tar::EntryType::Regular);
        file.set_mode(0o755);
        file.set_size(busybox.len() as u64);
        file.set_mtime(0);
        builder
            .append_data(&mut file, "bin/busybox", busybox.as_slice())
            .expect("tar busybox");
        for name in ["bin/sh", "bin/echo"] {
            let mut link = tar::Header::new_gnu();
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_mode(0o777);
            link.set_size(0);
            link.set_mtime(0);
            builder
                .append_link(&mut link, name, "busybox")
                .expect("tar link");
        }
        builder.into_inner().expect("tar finish")
    }

    /// A single-layer OCI image around `layer` (an uncompressed tar) running
    /// `/bin/echo <word>`.
    pub(crate) fn image_with_layer(name: &str, layer: Vec<u8>, word: &str) -> Fixture {
        build_image(name, vec![layer], &["/bin/echo", word], false)
    }

    /// The same as a Docker schema 2 image whose layer is gzip-compressed
    /// (with the `gzip` command, so the diff id differs from the digest).
    pub(crate) fn docker_gzip_image(name: &str, layer: Vec<u8>, word: &str) -> Fixture {
        build_image(name, vec![layer], &["/bin/echo", word], true)
    }

    /// An uncompressed tar holding one regular file.
    pub(crate) fn file_layer(path: &str, contents: &[u8]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        builder
            .append_data(&mut header, path, contents)
            .expect("tar");
        builder.into_inner().expect("tar")
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = Command::new("gzip")
            .args(["-n", "-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("gzip");
        let mut stdin = child.stdin.take().expect("stdin");
        let input = bytes.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let output = child.wait_with_output().expect("gzip output");
        writer.join().expect("join").expect("write to gzip");
        assert!(output.status.success());
        output.stdout
    }

    /// An image of `tars` (bottom first) running `cmd`: OCI with uncompressed
    /// layers, or Docker schema 2 with gzip layers.
    pub(crate) fn build_image(
        name: &str,
        tars: Vec<Vec<u8>>,
        cmd: &[&str],
        docker_gzip: bool,
    ) -> Fixture {
        let (layer_type, config_type, manifest_type) = if docker_gzip {
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json",
            )
        } else {
            (
                "application/vnd.oci.image.layer.v1.tar",
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.manifest.v1+json",
            )
        };
        let mut blobs = HashMap::new();
        let mut diff_ids = Vec::new();
        let mut layers = Vec::new();
        for tar in tars {
            diff_ids.push(sha256_digest(&tar));
            let layer = if docker_gzip { gzip(&tar) } else { tar };
            let layer_blob = blob(&layer, layer_type);
            blobs.insert(layer_blob.digest.clone(), layer);
            layers.push(layer_blob);
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Cmd": cmd, "Env": ["PATH=/bin"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))
        .expect("config json");
        let config_blob = blob(&config, config_type);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": descriptor_json(&config_blob),
            "layers": layers.iter().map(descriptor_json).collect::<Vec<_>>(),
        }))
        .expect("manifest json");
        let manifest_blob = blob(&manifest, manifest_type);
        blobs.insert(config_blob.digest.clone(), config);
        blobs.insert(manifest_blob.digest.clone(), manifest);
        Fixture {
            image: ImageToImport {
                name: name.to_owned(),
                manifest: manifest_blob,
                config: config_blob,
                layers,
            },
            blobs,
        }
    }

    /// Connects to the local containerd in a fresh namespace, or `None`
    /// (after saying so) when containerd is not running here.
    async fn connect_or_skip(suffix: &str) -> Option<Containerd> {
        let socket = Path::new(DEFAULT_SOCKET);
        if !socket.exists() {
            println!("skipped: containerd not running");
            return None;
        }
        let namespace = format!("meshwork-test-{}-{suffix}", std::process::id());
        Some(
            Containerd::connect(socket, &namespace)
                .await
                .expect("connect to containerd"),
        )
    }

    /// Forces a synchronous garbage collection in the namespace (by deleting
    /// an empty lease with `sync`).
    async fn collect_garbage(ctrd: &Containerd) {
        let id = format!("meshwork-test-gc-{}", std::process::id());
        let mut leases = LeasesClient::new(ctrd.channel());
        leases
            .create(
                ctrd.request(containerd_client::services::v1::CreateRequest {
                    id: id.clone(),
                    labels: HashMap::new(),
                }),
            )
            .await
            .expect("create gc lease");
        leases
            .delete(ctrd.request(containerd_client::services::v1::DeleteRequest { id, sync: true }))
            .await
            .expect("delete gc lease");
    }

    async fn content_labels(ctrd: &Containerd, digest: &str) -> Option<HashMap<String, String>> {
        match ContentClient::new(ctrd.channel())
            .info(ctrd.request(InfoRequest {
                digest: digest.to_owned(),
            }))
            .await
        {
            Ok(r) => Some(r.into_inner().info.expect("info").labels),
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => panic!("content info: {s}"),
        }
    }

    async fn snapshot_committed(ctrd: &Containerd, key: &str) -> bool {
        match SnapshotsClient::new(ctrd.channel())
            .stat(ctrd.request(StatSnapshotRequest {
                snapshotter: ctrd.snapshotter().to_owned(),
                key: key.to_owned(),
            }))
            .await
        {
            Ok(r) => r.into_inner().info.expect("info").kind == SnapshotKind::Committed as i32,
            Err(s) if s.code() == Code::NotFound => false,
            Err(s) => panic!("snapshot stat: {s}"),
        }
    }

    /// Deletes the (by now empty) test namespace; fails if anything is left.
    async fn delete_namespace(ctrd: &Containerd) {
        use containerd_client::services::v1::{
            DeleteNamespaceRequest, namespaces_client::NamespacesClient,
        };
        NamespacesClient::new(ctrd.channel())
            .delete(Request::new(DeleteNamespaceRequest {
                name: ctrd.namespace().to_owned(),
            }))
            .await
            .expect("namespace is empty after cleanup");
    }

    /// `ctr -n <ns> run --rm <image> <id>`, asserting success; its stdout.
    fn ctr_run(ctrd: &Containerd, image: &str, id: &str) -> String {
        let output = Command::new("ctr")
            .args(["-n", ctrd.namespace(), "run", "--rm", image, id])
            .output()
            .expect("run ctr");
        assert!(
            output.status.success(),
            "ctr run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let expected = sha256_digest(format!("{a} {b}").as_bytes());
        assert_eq!(chain_id(&a, &b), expected);
        assert!(valid_digest(&a));
        assert!(!valid_digest("sha256:ABC"));
        assert!(!valid_digest(&format!("sha512:{}", "a".repeat(64))));
    }

    #[test]
    fn namespaces_are_checked() {
        assert!(valid_namespace("meshwork-test-12.x_y"));
        assert!(!valid_namespace(""));
        assert!(!valid_namespace("a..b"));
        assert!(!valid_namespace("-a"));
        assert!(!valid_namespace("a b"));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661); // 2000-02-29
        assert_eq!(rfc3339_utc(t), "2000-02-29T01:01:01Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599); // 2026-12-31 23:59:59
        assert_eq!(rfc3339_utc(t), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn import_future_is_send() {
        fn assert_send<T: Send>(_: T) {}
        let fixture = image_with_layer("x", b"not a tar".to_vec(), "x");
        let ctrd: Option<Containerd> = None;
        if let Some(ctrd) = &ctrd {
            assert_send(ctrd.import(&fixture.image, fixture.opener()));
        }
    }

    #[test]
    fn descriptors_are_validated_locally() {
        let mut fixture = image_with_layer("x", b"layer".to_vec(), "x");
        fixture.image.layers[0].media_type = "application/x-unknown".to_owned();
        assert!(matches!(
            validate(&fixture.image),
            Err(ContainerdError::InvalidBlob { .. })
        ));
        let mut fixture = image_with_layer("x", b"layer".to_vec(), "x");
        fixture.image.config.digest = "sha256:nothex".to_owned();
        assert!(validate(&fixture.image).is_err());
        let fixture = image_with_layer("x", b"layer".to_vec(), "x");
        assert!(validate(&fixture.image).is_ok());
        let manifest = &fixture.blobs[&fixture.image.manifest.digest];
        check_manifest(&fixture.image, manifest).expect("fixture manifest is consistent");
        let mut other = fixture.image.clone();
        other.layers[0].digest = sha256_digest(b"other");
        assert!(check_manifest(&other, manifest).is_err());
    }

    #[tokio::test]
    async fn connect_reports_missing_socket() {
        let err = Containerd::connect(Path::new("/nonexistent/containerd.sock"), "meshwork")
            .await
            .expect_err("no socket");
        let text = err.to_string();
        assert!(
            text.starts_with("containerd is not running at /nonexistent/containerd.sock: "),
            "{text}"
        );

        // A stale socket file that nobody listens on.
        let stale =
            std::env::temp_dir().join(format!("meshwork-stale-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&stale);
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        let err = Containerd::connect(&stale, "meshwork")
            .await
            .expect_err("nobody listens");
        let _ = std::fs::remove_file(&stale);
        assert!(matches!(err, ContainerdError::NotRunning { .. }), "{err:?}");
        println!("{err}");
        assert!(err.to_string().contains("refused"), "{err}");

        let err = Containerd::connect(Path::new(DEFAULT_SOCKET), "bad namespace")
            .await
            .expect_err("bad namespace");
        assert!(
            matches!(err, ContainerdError::InvalidNamespace { .. }),
            "{err:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn import_unpack_and_run_busybox() {
        let Some(ctrd) = connect_or_skip("run").await else {
            return;
        };
        let name = "meshwork.local/busybox-echo:1.0";
        let fixture = image_with_layer(name, busybox_layer(), "hello");
        let layer = &fixture.image.layers[0];
        let diff_id = layer.digest.clone(); // uncompressed layer: diff id == digest

        let report = ctrd
            .import(&fixture.image, fixture.opener())
            .await
            .expect("import");
        assert_eq!(
            report,
            ImportReport {
                chain_id: diff_id.clone(),
                blobs_written: 3,
                blobs_present: 0,
                layers_unpacked: 1
            }
        );
        assert!(ctrd.image_exists(name).await.expect("image_exists"));
        assert!(
            !ctrd
                .image_exists("meshwork.local/absent:1")
                .await
                .expect("image_exists")
        );

        // What containerd's own unpack would have left, and it survives GC.
        collect_garbage(&ctrd).await;
        assert!(
            snapshot_committed(&ctrd, &diff_id).await,
            "snapshot kept by GC"
        );
        let config_labels = content_labels(&ctrd, &fixture.image.config.digest)
            .await
            .expect("config kept by GC");
        assert_eq!(
            config_labels.get("containerd.io/gc.ref.snapshot.overlayfs"),
            Some(&diff_id)
        );
        let layer_labels = content_labels(&ctrd, &layer.digest)
            .await
            .expect("layer kept");
        assert_eq!(layer_labels.get(UNCOMPRESSED_LABEL), Some(&diff_id));
        let manifest_labels = content_labels(&ctrd, &fixture.image.manifest.digest)
            .await
            .expect("manifest kept");
        assert_eq!(
            manifest_labels.get("containerd.io/gc.ref.content.l.0"),
            Some(&layer.digest)
        );

        // Importing again finds everything in place.
        let report = ctrd
            .import(&fixture.image, fixture.opener())
            .await
            .expect("re-import");
        assert_eq!(
            report,
            ImportReport {
                chain_id: diff_id.clone(),
                blobs_written: 0,
                blobs_present: 3,
                layers_unpacked: 0
            }
        );

        assert_eq!(ctr_run(&ctrd, name, "t1"), "hello");

        // The same name re-pointed at a new image sharing the layer: only
        // its config and manifest are new, the record is updated.
        let second = image_with_layer(name, busybox_layer(), "bye");
        let report = ctrd
            .import(&second.image, second.opener())
            .await
            .expect("import under the same name");
        assert_eq!(
            report,
            ImportReport {
                chain_id: diff_id.clone(),
                blobs_written: 2,
                blobs_present: 1,
                layers_unpacked: 0
            }
        );
        assert_eq!(ctr_run(&ctrd, name, "t2"), "bye");

        ctrd.remove_image(name).await.expect("remove image");
        assert!(!ctrd.image_exists(name).await.expect("image_exists"));
        ctrd.remove_image(name)
            .await
            .expect("removing twice is fine");
        assert!(
            content_labels(&ctrd, &layer.digest).await.is_none(),
            "GC took the layer"
        );
        assert!(
            !snapshot_committed(&ctrd, &diff_id).await,
            "GC took the snapshot"
        );
        delete_namespace(&ctrd).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn docker_gzip_image_runs() {
        let Some(ctrd) = connect_or_skip("gzip").await else {
            return;
        };
        let name = "meshwork.local/busybox-gzip:1.0";
        let tar = busybox_layer();
        let diff_id = sha256_digest(&tar);
        let fixture = docker_gzip_image(name, tar, "compressed");
        let layer = &fixture.image.layers[0];
        assert_ne!(layer.digest, diff_id);

        let report = ctrd
            .import(&fixture.image, fixture.opener())
            .await
            .expect("import");
        assert_eq!(report.layers_unpacked, 1);
        collect_garbage(&ctrd).await;
        assert!(snapshot_committed(&ctrd, &diff_id).await);
        let labels = content_labels(&ctrd, &layer.digest).await.expect("layer");
        assert_eq!(labels.get(UNCOMPRESSED_LABEL), Some(&diff_id));
        assert_eq!(ctr_run(&ctrd, name, "g1"), "compressed");

        ctrd.remove_image(name).await.expect("remove image");
        delete_namespace(&ctrd).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn layers_stack_by_chain_id() {
        let Some(ctrd) = connect_or_skip("layers").await else {
            return;
        };
        let name = "meshwork.local/three-layers:1.0";
        let tars = vec![
            busybox_layer(),
            file_layer("etc/greeting", b"first\n"),
            file_layer("etc/greeting", b"layered\n"),
        ];
        let diff_ids: Vec<String> = tars.iter().map(|t| sha256_digest(t)).collect();
        let fixture = build_image(name, tars, &["/bin/busybox", "cat", "/etc/greeting"], false);

        let report = ctrd
            .import(&fixture.image, fixture.opener())
            .await
            .expect("import");
        assert_eq!(report.blobs_written, 5);
        assert_eq!(report.layers_unpacked, 3);
        collect_garbage(&ctrd).await;
        let top = chain_id(&chain_id(&diff_ids[0], &diff_ids[1]), &diff_ids[2]);
        for chain in [
            diff_ids[0].clone(),
            chain_id(&diff_ids[0], &diff_ids[1]),
            top.clone(),
        ] {
            assert!(
                snapshot_committed(&ctrd, &chain).await,
                "{chain} kept by GC"
            );
        }
        let labels = content_labels(&ctrd, &fixture.image.config.digest)
            .await
            .expect("config");
        assert_eq!(
            labels.get("containerd.io/gc.ref.snapshot.overlayfs"),
            Some(&top)
        );
        assert_eq!(ctr_run(&ctrd, name, "l1"), "layered");

        ctrd.remove_image(name).await.expect("remove image");
        assert!(
            !snapshot_committed(&ctrd, &diff_ids[0]).await,
            "GC took the base"
        );
        delete_namespace(&ctrd).await;
    }

    #[tokio::test]
    async fn corrupt_blob_is_refused() {
        let Some(ctrd) = connect_or_skip("bad").await else {
            return;
        };
        let name = "meshwork.local/corrupt:1.0";
        // A layer no other test (or namespace: containerd shares content
        // between namespaces) can have, so containerd must read our bytes.
        let nonce = format!("{} {:?}", std::process::id(), SystemTime::now());
        let mut fixture = image_with_layer(name, file_layer("nonce", nonce.as_bytes()), "x");
        let layer = fixture.image.layers[0].digest.clone();
        // Same size, one byte flipped: only containerd's digest check sees it.
        let bytes = fixture.blobs.get_mut(&layer).expect("layer bytes");
        bytes[600] ^= 0xff;

        let err = ctrd
            .import(&fixture.image, fixture.opener())
            .await
            .expect_err("corrupt layer must be refused");
        let text = err.to_string();
        println!("{text}");
        assert!(matches!(err, ContainerdError::Content { .. }), "{err:?}");
        assert!(text.contains(name), "{text}");
        assert!(text.contains(&layer), "{text}");
        assert!(text.contains("digest"), "{text}");
        assert!(!ctrd.image_exists(name).await.expect("image_exists"));
        assert!(content_labels(&ctrd, &layer).await.is_none());

        collect_garbage(&ctrd).await;
        delete_namespace(&ctrd).await;
    }
}
