//! Registry operations through `meshctl` (image push / pull / ls / inspect,
//! blob get), a node's `/metrics`, and what its blob store holds on disk.
//!
//! Pushes and pulls are recorded in the history as [`OpKind::ImagePush`] and
//! [`OpKind::ImagePull`], so that [`crate::History::check_images_intact`] can
//! check what the nodes give back against what was pushed and acknowledged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::cluster::Cluster;
use crate::exec::CmdOutput;
use crate::history::{OpKind, Outcome};

/// One holder of an image as `meshctl image ls --json` prints it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct HolderView {
    /// The holder's libp2p peer id.
    pub peer_id: String,
    /// Its `--name`, if the answering node knows it.
    pub name: Option<String>,
    /// Whether the answering node sees it alive.
    pub alive: bool,
}

/// One blob of an image (manifest, config or layer).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ImageBlobView {
    /// blake3 hex: the blob's name in the mesh.
    pub blake3: String,
    /// OCI digest (`sha256:...`).
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// OCI media type.
    pub media_type: String,
}

/// One image as `meshctl image ls --json` / `image inspect --json` print it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ImageView {
    /// `NAME:TAG`.
    pub reference: String,
    /// blake3 of the manifest.
    pub root: Option<String>,
    /// Total bytes of its blobs.
    pub size: u64,
    /// Copies the mesh keeps.
    pub replicas: u64,
    /// The manifest blob.
    pub manifest: Option<ImageBlobView>,
    /// The config blob.
    pub config: Option<ImageBlobView>,
    /// The layers, base first.
    pub layers: Vec<ImageBlobView>,
    /// Nodes holding the whole image.
    pub holders: Vec<HolderView>,
}

/// blake3 (hex) of a file's bytes.
pub fn blake3_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

fn outcome_of(out: Result<CmdOutput>, fail_is_definite: bool) -> Outcome {
    match out {
        Ok(o) if o.success() => Outcome::Ok(None),
        Ok(o) if o.timed_out => Outcome::Info(o.combined()),
        Ok(o) if fail_is_definite => Outcome::Fail(format!(
            "exit {:?}: {}",
            o.status.and_then(|s| s.code()),
            o.combined()
        )),
        Ok(o) => Outcome::Info(format!(
            "exit {:?}: {}",
            o.status.and_then(|s| s.code()),
            o.combined()
        )),
        Err(e) => Outcome::Fail(format!("{e:#}")),
    }
}

/// Sums a Prometheus text exposition by metric name (over all label sets).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        let Some(value) = line
            .split_whitespace()
            .last()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        *out.entry(line[..name_end].to_string()).or_insert(0.0) += value;
    }
    out
}

impl Cluster {
    /// `image push TAR --tag reference --replicas N` to node `i`, recorded as
    /// [`OpKind::ImagePush`] with `content`, the blake3 of the layer bytes in
    /// the tar. A non-zero exit is recorded as of unknown outcome (the push
    /// may have got far).
    pub fn image_push(
        &self,
        i: usize,
        tar: &Path,
        reference: &str,
        replicas: u32,
        content: &str,
        timeout: Duration,
    ) -> Outcome {
        let kind = OpKind::ImagePush {
            reference: reference.into(),
            content: content.into(),
        };
        let tar = tar.display().to_string();
        let replicas = replicas.to_string();
        self.history().invoke(i, kind, || {
            outcome_of(
                self.meshctl_timeout(
                    i,
                    &[
                        "image",
                        "push",
                        &tar,
                        "--tag",
                        reference,
                        "--replicas",
                        &replicas,
                    ],
                    timeout,
                ),
                false,
            )
        })
    }

    /// `image pull reference` on node `i`, recorded as [`OpKind::ImagePull`]:
    /// exit 0 is ok, another exit a failure, a timeout unknown.
    pub fn image_pull(&self, i: usize, reference: &str, timeout: Duration) -> Outcome {
        let kind = OpKind::ImagePull {
            reference: reference.into(),
        };
        self.history().invoke(i, kind, || {
            outcome_of(
                self.meshctl_timeout(i, &["image", "pull", reference], timeout),
                true,
            )
        })
    }

    /// Node `i`'s list of images (`image ls --json`).
    pub fn images(&self, i: usize) -> Result<Vec<ImageView>> {
        let out = self.meshctl_ok(i, &["image", "ls", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `image ls --json`: {out}"))
    }

    /// Node `i`'s view of one image (`image inspect reference --json`).
    pub fn image_inspect(&self, i: usize, reference: &str) -> Result<ImageView> {
        let out = self.meshctl_ok(i, &["image", "inspect", reference, "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `image inspect --json`: {out}"))
    }

    /// Names of the holders of `reference` that node `i` sees alive (empty
    /// when it does not know the image).
    pub fn image_holders_alive(&self, i: usize, reference: &str) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .images(i)?
            .into_iter()
            .filter(|im| im.reference == reference)
            .flat_map(|im| im.holders)
            .filter(|h| h.alive)
            .map(|h| h.name.unwrap_or(h.peer_id))
            .collect();
        names.sort();
        Ok(names)
    }

    /// `blob get hash -o out` on node `i` (from its own store if it has the
    /// blob, else from any holder).
    pub fn blob_get(&self, i: usize, hash: &str, out: &Path, timeout: Duration) -> Result<()> {
        let path = out.display().to_string();
        let o = self.meshctl_timeout(i, &["blob", "get", hash, "-o", &path], timeout)?;
        if !o.success() {
            bail!("meshctl blob get {hash} on node {i}: {}", o.combined());
        }
        Ok(())
    }

    /// Node `i`'s `/metrics`, summed by metric name over label sets.
    pub fn metrics(&self, i: usize) -> Result<BTreeMap<String, f64>> {
        let (code, body) = self.http_get(i, "/metrics")?;
        if code != 200 {
            bail!("/metrics of node {i} answered {code}: {body}");
        }
        Ok(parse_metrics(&body))
    }

    /// One metric of node `i` (summed over label sets; 0 when not exported yet).
    pub fn metric(&self, i: usize, name: &str) -> Result<f64> {
        Ok(self.metrics(i)?.get(name).copied().unwrap_or(0.0))
    }

    /// Chunk files in node `i`'s blob store (`<data dir>/blobs/chunks/xx/<blake3>`).
    pub fn stored_chunks(&self, i: usize) -> Vec<PathBuf> {
        let root = self.data_dir(i).join("blobs").join("chunks");
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(&root) else {
            return out;
        };
        for d in dirs.flatten() {
            if let Ok(files) = std::fs::read_dir(d.path()) {
                out.extend(files.flatten().map(|f| f.path()));
            }
        }
        out.sort();
        out
    }

    /// Chunk files of node `i` whose bytes do not hash to their name (each as
    /// `path: found <hash>`); empty when everything stored is intact.
    pub fn corrupt_chunks(&self, i: usize) -> Result<Vec<String>> {
        let mut bad = Vec::new();
        for p in self.stored_chunks(i) {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let found = match blake3_file(&p) {
                Ok(h) => h,
                // Removed between listing and reading (garbage collection).
                Err(_) if !p.exists() => continue,
                Err(e) => return Err(e),
            };
            if found != name {
                bad.push(format!("{}: found {found}", p.display()));
            }
        }
        Ok(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_sum_over_labels() {
        let text =
            "# TYPE a counter\na 3\nb{x=\"1\"} 2\nb{x=\"2\"} 5.5\n\nc_total{l=\"a b\"} 1e3\n";
        let m = parse_metrics(text);
        assert_eq!(m["a"], 3.0);
        assert_eq!(m["b"], 7.5);
        assert_eq!(m["c_total"], 1000.0);
        assert_eq!(m.len(), 3);
    }
}
