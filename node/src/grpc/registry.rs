//! The registry service: blob upload and download, images, pulls and garbage collection.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use meshwork_proto::v1::{self as pb, registry_service_server::RegistryService};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::blobs::store::Hash;
use crate::containerd::{Containerd, ContainerdError};
use crate::registry::{DEFAULT_REPLICAS, ImageBlob, ImageRecord, Registry, RegistryError};

/// Bytes per message when streaming a blob to a client.
const DOWNLOAD_PIECE: usize = 256 * 1024;

/// The registry service.
pub struct RegistryApi {
    pub(super) registry: Arc<Registry>,
    pub(super) gc_grace: Duration,
    pub(super) containerd: ContainerdTarget,
}

/// Where this node's containerd is, and the namespace the node uses in it.
#[derive(Debug, Clone)]
pub struct ContainerdTarget {
    /// containerd's gRPC socket.
    pub socket: std::path::PathBuf,
    /// The containerd namespace of this node.
    pub namespace: String,
}

fn status(e: RegistryError) -> Status {
    use crate::blobs::transfer::FetchError;
    match e {
        RegistryError::BadReference(_)
        | RegistryError::MissingBlob { .. }
        | RegistryError::WrongDigest { .. } => Status::invalid_argument(e.to_string()),
        RegistryError::UnknownImage(_) | RegistryError::UnknownBlob(_) => {
            Status::not_found(e.to_string())
        }
        RegistryError::Fetch(FetchError::NoHolders(_)) => Status::unavailable(format!(
            "{e}: every node that had it is gone; push it again"
        )),
        RegistryError::Fetch(FetchError::Store(ref s)) if is_disk_full(s) => {
            Status::resource_exhausted(format!("{e} (the disk of this node is full)"))
        }
        RegistryError::Fetch(_) => Status::unavailable(e.to_string()),
        RegistryError::Containerd(ContainerdError::NotRunning { .. }) => {
            Status::failed_precondition(e.to_string())
        }
        RegistryError::Store(ref s) if is_disk_full(s) => {
            Status::resource_exhausted(format!("{e} (the disk of this node is full)"))
        }
        _ => Status::internal(e.to_string()),
    }
}

fn is_disk_full(e: &crate::blobs::store::StoreError) -> bool {
    matches!(e, crate::blobs::store::StoreError::Io { source, .. }
        if source.raw_os_error() == Some(28))
}

fn parse_hash(s: &str) -> Result<Hash, Status> {
    s.parse::<Hash>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn image_blob_from_pb(b: Option<pb::ImageBlob>, what: &str) -> Result<ImageBlob, Status> {
    let b = b.ok_or_else(|| Status::invalid_argument(format!("{what} is missing")))?;
    if !b.sha256.starts_with("sha256:") || b.sha256.len() != 71 {
        return Err(Status::invalid_argument(format!(
            "{what}: {:?} is not a sha256 digest (sha256:<64 hex>)",
            b.sha256
        )));
    }
    Ok(ImageBlob {
        blake3: parse_hash(&b.blake3)
            .map_err(|s| Status::invalid_argument(format!("{what}: {}", s.message())))?,
        sha256: b.sha256,
        size: b.size,
        media_type: b.media_type,
    })
}

fn image_blob_to_pb(b: &ImageBlob) -> pb::ImageBlob {
    pb::ImageBlob {
        blake3: b.blake3.to_hex(),
        sha256: b.sha256.clone(),
        size: b.size,
        media_type: b.media_type.clone(),
    }
}

impl RegistryApi {
    fn holders_pb(&self, hash: &Hash) -> Vec<pb::Holder> {
        self.registry
            .holders(hash)
            .into_iter()
            .map(|h| pb::Holder {
                peer_id: h.peer.to_string(),
                name: h.name.unwrap_or_default(),
                alive: h.alive,
            })
            .collect()
    }

    fn image_pb(&self, image: &ImageRecord) -> pb::Image {
        // Holders of the image: nodes that hold every one of its blobs.
        let mut holders: Option<Vec<pb::Holder>> = None;
        for b in image.blobs() {
            let these = self.holders_pb(&b.blake3);
            holders = Some(match holders {
                None => these,
                Some(prev) => prev
                    .into_iter()
                    .filter(|h| these.iter().any(|t| t.peer_id == h.peer_id))
                    .collect(),
            });
        }
        pb::Image {
            reference: image.reference(),
            manifest: Some(image_blob_to_pb(&image.manifest)),
            config: Some(image_blob_to_pb(&image.config)),
            layers: image.layers.iter().map(image_blob_to_pb).collect(),
            size: image.size(),
            holders: holders.unwrap_or_default(),
            replicas: image.replicas,
            created_ms: image.created_ms,
        }
    }
}

type DataStream = Pin<Box<dyn Stream<Item = Result<pb::BlobData, Status>> + Send>>;
type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::PullProgress, Status>> + Send>>;

#[tonic::async_trait]
impl RegistryService for RegistryApi {
    async fn put_blob(
        &self,
        req: Request<Streaming<pb::BlobUpload>>,
    ) -> Result<Response<pb::BlobInfo>, Status> {
        let mut incoming = req.into_inner();
        let first = incoming
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty upload"))??;
        let expected = (!first.expected_sha256.is_empty()).then(|| first.expected_sha256.clone());
        let pinned = first.pinned;
        let replicas = if first.replicas == 0 {
            DEFAULT_REPLICAS
        } else {
            first.replicas.min(64)
        };
        // Bytes flow from the gRPC stream to a blocking import through a bounded channel.
        let (tx, rx) = mpsc::channel::<Result<Vec<u8>, ()>>(8);
        let registry = self.registry.clone();
        let import = tokio::task::spawn_blocking(move || {
            let reader = ChannelReader {
                rx,
                current: std::io::Cursor::new(Vec::new()),
            };
            registry.put_local(reader, expected.as_deref(), pinned, replicas)
        });
        let mut client_error = None;
        if tx.send(Ok(first.data)).await.is_ok() {
            while let Some(msg) = incoming.next().await {
                match msg {
                    Ok(m) => {
                        if tx.send(Ok(m.data)).await.is_err() {
                            break; // the import stopped (an error it reports below)
                        }
                    }
                    Err(e) => {
                        // Make the import fail rather than store a truncated blob.
                        let _ = tx.send(Err(())).await;
                        client_error = Some(e);
                        break;
                    }
                }
            }
        }
        drop(tx);
        if let Some(e) = client_error {
            // The upload broke off: what was stored is unreferenced and goes at GC.
            let _ = import.await;
            return Err(Status::cancelled(format!("upload interrupted: {e}")));
        }
        let (info, meta) = import
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        Ok(Response::new(pb::BlobInfo {
            blake3: info.hash.to_hex(),
            sha256: info.sha256,
            size: info.size,
            holders: self.holders_pb(&info.hash),
            pinned: meta.pinned,
            replicas: meta.replicas,
        }))
    }

    type GetBlobStream = DataStream;

    async fn get_blob(
        &self,
        req: Request<pb::GetBlobRequest>,
    ) -> Result<Response<Self::GetBlobStream>, Status> {
        let hash = parse_hash(&req.into_inner().blake3)?;
        let info = self
            .registry
            .ensure_local(&hash, |_| {})
            .await
            .map_err(status)?;
        let (tx, rx) = mpsc::channel(4);
        let store = self.registry.store().clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut reader = match store.reader(&hash) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                    return;
                }
            };
            let mut first = true;
            loop {
                let mut buf = vec![0u8; DOWNLOAD_PIECE];
                match reader.read(&mut buf) {
                    Ok(0) if !first => return,
                    Ok(n) => {
                        buf.truncate(n);
                        let size = if first { info.size } else { 0 };
                        first = false;
                        if tx
                            .blocking_send(Ok(pb::BlobData { data: buf, size }))
                            .is_err()
                            || n == 0
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::data_loss(e.to_string())));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_blobs(
        &self,
        _: Request<pb::ListBlobsRequest>,
    ) -> Result<Response<pb::ListBlobsResponse>, Status> {
        let metas = self.registry.blob_metas().map_err(status)?;
        let blobs = metas
            .iter()
            .map(|(h, m)| pb::BlobInfo {
                blake3: h.to_hex(),
                sha256: m.sha256.clone(),
                size: m.size,
                holders: self.holders_pb(h),
                pinned: m.pinned,
                replicas: m.replicas,
            })
            .collect();
        Ok(Response::new(pb::ListBlobsResponse { blobs }))
    }

    async fn create_image(
        &self,
        req: Request<pb::CreateImageRequest>,
    ) -> Result<Response<pb::Image>, Status> {
        let req = req.into_inner();
        let (name, tag) = crate::registry::parse_reference(&req.reference).map_err(status)?;
        let mut layers = Vec::with_capacity(req.layers.len());
        for (i, l) in req.layers.into_iter().enumerate() {
            layers.push(image_blob_from_pb(Some(l), &format!("layer {i}"))?);
        }
        let record = ImageRecord {
            name,
            tag,
            manifest: image_blob_from_pb(req.manifest, "manifest")?,
            config: image_blob_from_pb(req.config, "config")?,
            layers,
            replicas: req.replicas.min(64),
            created_ms: 0,
        };
        let image = self.registry.create_image(record).map_err(status)?;
        Ok(Response::new(self.image_pb(&image)))
    }

    async fn list_images(
        &self,
        _: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let images = self.registry.images().map_err(status)?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images.iter().map(|i| self.image_pb(i)).collect(),
        }))
    }

    async fn get_image(&self, req: Request<pb::ImageRef>) -> Result<Response<pb::Image>, Status> {
        let image = self
            .registry
            .image(&req.into_inner().reference)
            .map_err(status)?;
        Ok(Response::new(self.image_pb(&image)))
    }

    async fn remove_image(
        &self,
        req: Request<pb::ImageRef>,
    ) -> Result<Response<pb::RemoveImageResponse>, Status> {
        self.registry
            .remove_image(&req.into_inner().reference)
            .map_err(status)?;
        Ok(Response::new(pb::RemoveImageResponse {}))
    }

    type PullImageStream = ProgressStream;

    async fn pull_image(
        &self,
        req: Request<pb::ImageRef>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let image = self
            .registry
            .image(&req.into_inner().reference)
            .map_err(status)?;
        let total = image.size();
        let (tx, rx) = mpsc::channel(64);
        let registry = self.registry.clone();
        tokio::spawn(async move {
            let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let t = tx.clone();
            let result = registry
                .ensure_image_local(&image, move |n| {
                    let now = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                    let _ = t.try_send(Ok(pb::PullProgress {
                        done_bytes: now,
                        total_bytes: total,
                        finished: false,
                    }));
                })
                .await;
            if let Err(e) = result {
                let _ = tx.send(Err(status(e))).await;
                return;
            }
            let _ = tx
                .send(Ok(pb::PullProgress {
                    done_bytes: total,
                    total_bytes: total,
                    finished: true,
                }))
                .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn collect_garbage(
        &self,
        req: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        let grace = req
            .into_inner()
            .grace_secs
            .map_or(self.gc_grace, Duration::from_secs);
        let registry = self.registry.clone();
        let report = tokio::task::spawn_blocking(move || registry.collect_garbage(grace))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        Ok(Response::new(pb::CollectGarbageResponse {
            blobs_removed: report.blobs_removed as u64,
            chunks_removed: report.chunks_removed as u64,
            bytes_freed: report.bytes_freed,
        }))
    }

    async fn import_image(
        &self,
        req: Request<pb::ImageRef>,
    ) -> Result<Response<pb::ImportImageResponse>, Status> {
        let reference = req.into_inner().reference;
        let containerd = Containerd::connect(&self.containerd.socket, &self.containerd.namespace)
            .await
            .map_err(|e| status(e.into()))?;
        let (name, report) = self
            .registry
            .import_to_containerd(&reference, &containerd)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ImportImageResponse {
            containerd_name: name,
            blobs_written: report.blobs_written as u32,
            blobs_present: report.blobs_present as u32,
            layers_unpacked: report.layers_unpacked as u32,
        }))
    }
}

/// A blocking reader over byte messages from a channel.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Vec<u8>, ()>>,
    current: std::io::Cursor<Vec<u8>>,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            match self.rx.blocking_recv() {
                Some(Ok(next)) => self.current = std::io::Cursor::new(next),
                Some(Err(())) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the client broke off the upload",
                    ));
                }
                None => return Ok(0),
            }
        }
    }
}
