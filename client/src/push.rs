//! Image push: read an image tar (OCI layout or `docker save`), upload every blob with its
//! sha256 digest checked on both sides, then register the tag. `meshctl image push` is this
//! plus a progress bar.

use std::path::Path;

use tokio::sync::mpsc;

use crate::oci::{self, BlobRef, OciError};
use crate::proto::{CreateImageRequest, Image, ImageBlob};
use crate::{ClientError, MeshClient, UploadOptions};

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The tar is not a usable image.
    #[error("{path}: {source}")]
    Tar {
        /// The tar file.
        path: String,
        /// What is wrong with it.
        source: OciError,
    },
    /// The node refused or failed a call.
    #[error("{what}: {source}")]
    Node {
        /// What was being done.
        what: String,
        /// The node's answer.
        source: ClientError,
    },
}

/// What the tar-reading thread sends to the uploader.
enum Piece {
    Start(BlobRef),
    Data(Vec<u8>),
    End,
}

/// Pushes `tar` as `reference`; `progress(done, total)` follows the bytes uploaded. Returns
/// the registered image.
pub async fn push_image(
    client: &mut MeshClient,
    tar: &Path,
    reference: &str,
    replicas: u32,
    progress: impl Fn(u64, u64),
) -> Result<Image, PushError> {
    let tar_err = |source| PushError::Tar {
        path: tar.display().to_string(),
        source,
    };
    let node_err = |what: String| move |source| PushError::Node { what, source };
    // A bad reference is refused before any byte is uploaded.
    if let Err(e) = client.image(reference).await
        && e.code() == Some(tonic::Code::InvalidArgument)
    {
        return Err(node_err("checking the tag".into())(e));
    }
    let path = tar.to_path_buf();
    let plan = tokio::task::spawn_blocking(move || oci::plan_image(&path))
        .await
        .expect("tar reading task")
        .map_err(tar_err)?;
    let total = plan.total_size();
    let mut done = 0u64;

    let (tx, mut rx) = mpsc::channel::<Piece>(8);
    let path = tar.to_path_buf();
    let reading_plan = plan.clone();
    let reader = tokio::task::spawn_blocking(move || {
        oci::stream_blobs(
            &path,
            &reading_plan,
            |blob, r| -> Result<(), std::io::Error> {
                let closed = || std::io::Error::other("upload stopped");
                tx.blocking_send(Piece::Start(blob.clone()))
                    .map_err(|_| closed())?;
                loop {
                    let mut buf = vec![0u8; 256 * 1024];
                    let n = r.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    buf.truncate(n);
                    tx.blocking_send(Piece::Data(buf)).map_err(|_| closed())?;
                }
                tx.blocking_send(Piece::End).map_err(|_| closed())
            },
        )
    });

    let mut uploaded: Vec<(String, ImageBlob)> = Vec::new();
    while let Some(Piece::Start(blob)) = rx.recv().await {
        let (data_tx, data_rx) = mpsc::channel::<Vec<u8>>(4);
        let options = UploadOptions {
            expected_sha256: Some(blob.digest.clone()),
            pinned: false,
            replicas,
        };
        let mut c = client.clone();
        let upload = tokio::spawn(async move { c.put_blob_stream(data_rx, options).await });
        loop {
            match rx.recv().await {
                Some(Piece::Data(d)) => {
                    done += d.len() as u64;
                    progress(done, total);
                    if data_tx.send(d).await.is_err() {
                        break;
                    }
                }
                Some(Piece::End) | None => break,
                Some(Piece::Start(_)) => unreachable!("a blob starts only after the last ended"),
            }
        }
        drop(data_tx);
        let result = upload.await.expect("upload task");
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                // If the tar reader failed (a digest mismatch inside the tar, say), that is
                // the real cause; otherwise the node's answer is.
                drop(rx);
                if let Ok(Err(tar_error)) = reader.await {
                    return Err(tar_err(tar_error));
                }
                return Err(node_err(format!(
                    "uploading {} ({})",
                    blob.digest, blob.media_type
                ))(e));
            }
        };
        uploaded.push((
            blob.digest.clone(),
            ImageBlob {
                blake3: info.blake3,
                sha256: info.sha256,
                size: info.size,
                media_type: blob.media_type.clone(),
            },
        ));
    }
    // The reader's own error (a digest mismatch inside the tar, say) is the real cause.
    reader.await.expect("tar reading task").map_err(tar_err)?;

    let find = |b: &BlobRef| -> Option<ImageBlob> {
        uploaded
            .iter()
            .find(|(d, _)| *d == b.digest)
            .map(|(_, ib)| ImageBlob {
                media_type: b.media_type.clone(),
                ..ib.clone()
            })
    };
    // Every blob of the plan was streamed (stream_blobs guarantees it), so each is found.
    let request = CreateImageRequest {
        reference: reference.to_string(),
        manifest: find(&plan.manifest),
        config: find(&plan.config),
        layers: plan.layers.iter().filter_map(find).collect(),
        replicas,
    };
    client
        .create_image(request)
        .await
        .map_err(node_err(format!("registering {reference}")))
}
