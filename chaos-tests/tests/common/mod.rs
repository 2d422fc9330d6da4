//! Shared by the registry scenarios: a test image with a large layer of
//! pseudo-random bytes, and the checks on what a node gives back.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshwork_chaos_tests::{Cluster, ImageView, blake3_file};

/// The blob store's chunk size (1 MiB).
pub const CHUNK: u64 = 1 << 20;

/// An OCI image layout tar written by the test.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// The tar to push.
    pub tar: PathBuf,
    /// blake3 (hex) of the layer blob's bytes (an uncompressed tar).
    pub layer_blake3: String,
    /// Size of the layer blob.
    pub layer_size: u64,
}

impl TestImage {
    /// Chunks of the layer blob.
    pub fn layer_chunks(&self) -> u64 {
        self.layer_size.div_ceil(CHUNK)
    }
}

/// Writes `dir/<name>.tar`: one layer holding `payload.bin`, `payload_len`
/// bytes from blake3's XOF keyed by `seed` (no two 1 MiB chunks alike, so the
/// store's chunk dedup does not shrink the transfer), and returns the layer's
/// blake3 read back from the tar.
pub fn build_image(dir: &Path, name: &str, seed: &str, payload_len: usize) -> Result<TestImage> {
    let mut payload = vec![0u8; payload_len];
    let mut h = blake3::Hasher::new();
    h.update(b"meshwork chaos-tests image payload\0");
    h.update(seed.as_bytes());
    h.finalize_xof().fill(&mut payload);
    let tar = dir.join(format!("{name}.tar"));
    meshwork_client::oci::write_oci_layout_tar(
        &tar,
        &[("payload.bin", payload.as_slice(), 0o644)],
        &["/bin/true"],
    )
    .with_context(|| format!("writing {}", tar.display()))?;
    drop(payload);
    // The layer is the largest blob of the layout (config and manifest are small JSON).
    let mut archive = tar::Archive::new(std::fs::File::open(&tar)?);
    let mut layer: Option<Vec<u8>> = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if !path.starts_with("blobs/sha256/") {
            continue;
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        if layer.as_ref().is_none_or(|l| bytes.len() > l.len()) {
            layer = Some(bytes);
        }
    }
    let Some(layer) = layer else {
        bail!("no blob in {}", tar.display());
    };
    if layer.len() < payload_len {
        bail!(
            "the largest blob of {} has {} bytes, less than the payload",
            tar.display(),
            layer.len()
        );
    }
    Ok(TestImage {
        tar,
        layer_blake3: blake3::hash(&layer).to_hex().to_string(),
        layer_size: layer.len() as u64,
    })
}

/// Checks that the image the cluster recorded has our layer (one layer,
/// same blake3 and size).
pub fn check_recorded_layer(view: &ImageView, img: &TestImage) -> Result<()> {
    match view.layers.as_slice() {
        [l] if l.blake3 == img.layer_blake3 && l.size == img.layer_size => Ok(()),
        other => bail!(
            "image {} records layers {other:?}, expected one with blake3 {} and {} bytes",
            view.reference,
            img.layer_blake3,
            img.layer_size
        ),
    }
}

/// Downloads blob `hash` from node `i` (its own store when it holds it) and
/// returns the blake3 of the bytes; `None` when the node cannot give it.
pub fn layer_hash_on(c: &Cluster, i: usize, hash: &str, timeout: Duration) -> Option<String> {
    let out = c.work_dir().join(format!("layer-from-n{i}"));
    let _ = std::fs::remove_file(&out);
    match c.blob_get(i, hash, &out, timeout) {
        Ok(()) => {
            let h = blake3_file(&out).ok();
            let _ = std::fs::remove_file(&out);
            h
        }
        Err(e) => {
            eprintln!("n{i}: cannot give blob {hash}: {e:#}");
            None
        }
    }
}

/// Bytes in MiB, for messages.
pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / CHUNK as f64)
}
