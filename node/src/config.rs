//! `meshd`'s command line, and its translation into a [`NodeConfig`].
//!
//! The flags are fixed so that scripts and docs can rely on them:
//! `meshd --data-dir DIR --secret-file FILE --p2p HOST:PORT --grpc HOST:PORT --http HOST:PORT
//! [--join HOST:PORT]... [--name NAME] [--label K=V]... [--cpu N] [--memory BYTES] [--no-mdns]
//! [--dev]`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::admission::{ClusterSecret, SecretError};
use crate::membership::FailureDetector;
use crate::node::NodeConfig;

/// Command line of `meshd`.
#[derive(Debug, Parser)]
#[command(
    name = "meshd",
    version,
    about = "A Meshwork node: start one on every machine."
)]
pub struct MeshdArgs {
    /// Directory for the node's identity and state (created if absent).
    #[arg(long, value_name = "DIR", required_unless_present = "dev")]
    pub data_dir: Option<PathBuf>,
    /// File holding the cluster's join secret (64 hex characters; `meshctl secret new`).
    #[arg(long, value_name = "FILE", required_unless_present = "dev")]
    pub secret_file: Option<PathBuf>,
    /// Peer-to-peer address, for QUIC (UDP) and TCP alike.
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:7000")]
    pub p2p: String,
    /// TCP port for direct blob connections (TLS, admitted by the cluster secret) on the
    /// --p2p host: 0 takes a free one, announced to the mesh; `off` moves blobs over libp2p
    /// streams only.
    #[arg(long, value_name = "PORT|off", default_value = "0", value_parser = parse_blob_port)]
    pub blob_port: BlobPort,
    /// gRPC API address.
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:7100")]
    pub grpc: String,
    /// HTTP address (health, metrics, gateway).
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:8080")]
    pub http: String,
    /// p2p address of a member to join through; repeat for several.
    #[arg(long, value_name = "HOST:PORT")]
    pub join: Vec<String>,
    /// Node name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Label K=V for placement constraints; repeat for several.
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// CPU cores to offer (default: all cores).
    #[arg(long, value_name = "N")]
    pub cpu: Option<f64>,
    /// Memory to offer, in bytes or with a suffix (512Mi, 4Gi, 2G; default: all memory).
    #[arg(long, value_name = "BYTES")]
    pub memory: Option<String>,
    /// Do not look for peers on the LAN with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Try it out: one node with a generated secret and a data dir under the user's cache,
    /// listening on 127.0.0.1 only unless addresses are given.
    #[arg(long)]
    pub dev: bool,
    /// containerd's gRPC socket.
    #[arg(long, value_name = "PATH", default_value = crate::containerd::DEFAULT_SOCKET)]
    pub containerd_socket: PathBuf,
    /// This node's namespace in containerd (give each node its own when they share one).
    #[arg(long, value_name = "NAME", default_value = "meshwork")]
    pub containerd_namespace: String,
    /// Seconds an unreferenced blob is kept before garbage collection removes it.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub blob_gc_grace_secs: u64,
    /// How long ended batch jobs (their records and attempts) stay queryable before they are
    /// removed from the replicated state, e.g. `7d`, `12h`.
    #[arg(long, value_name = "DURATION", default_value = "7d",
          value_parser = parse_retention)]
    pub job_retention: Duration,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Test only: misbehave on purpose so tests can check how peers cope with a liar.
    #[arg(long, hide = true, value_enum)]
    pub test_lie: Option<crate::p2p::LieMode>,
}

/// A flag that does not make sense; the message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An address does not parse or resolve.
    #[error("--{flag} {value:?}: {reason}")]
    Address {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
    /// The secret file cannot be read.
    #[error("--secret-file {path}: {reason}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A label is not K=V.
    #[error("--label {0:?}: expected KEY=VALUE with KEY of letters, digits, '.', '_', '-', '/'")]
    Label(String),
    /// `--cpu` out of range.
    #[error("--cpu {0}: must be a positive number of cores")]
    Cpu(f64),
    /// `--memory` does not parse.
    #[error("--memory {0:?}: expected bytes, optionally with K, M, G, Ki, Mi or Gi")]
    Memory(String),
    /// The dev directories could not be prepared.
    #[error("--dev: {0}")]
    Dev(String),
}

fn resolve(flag: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    let err = |reason: String| ConfigError::Address {
        flag,
        value: value.to_string(),
        reason,
    };
    let mut addrs = value
        .to_socket_addrs()
        .map_err(|e| err(format!("expected HOST:PORT ({e})")))?;
    addrs
        .next()
        .ok_or_else(|| err("resolves to no address".into()))
}

pub use meshwork_proto::units::parse_bytes;

fn parse_label(text: &str) -> Result<(String, String), ConfigError> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| ConfigError::Label(text.into()))?;
    let key_ok = !k.is_empty()
        && k.len() <= 63
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
    let value_ok = v.len() <= 253 && !v.chars().any(|c| c.is_control());
    if !key_ok || !value_ok {
        return Err(ConfigError::Label(text.into()));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Where `--dev` keeps its files: `$XDG_CACHE_HOME/meshwork/dev` or `~/.cache/meshwork/dev`.
pub fn dev_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("meshwork").join("dev")
}

fn read_secret(path: &Path) -> Result<ClusterSecret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Secret {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    ClusterSecret::from_hex(&text).map_err(|e: SecretError| ConfigError::Secret {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl MeshdArgs {
    /// Checks every flag and builds the node's configuration.
    pub fn into_config(self) -> Result<NodeConfig, ConfigError> {
        let (data_dir, secret_file) = if self.dev {
            let dir = dev_dir();
            std::fs::create_dir_all(&dir).map_err(|e| ConfigError::Dev(e.to_string()))?;
            let secret_file = self.secret_file.unwrap_or_else(|| dir.join("secret"));
            if !secret_file.exists() {
                std::fs::write(&secret_file, ClusterSecret::generate().to_hex() + "\n")
                    .map_err(|e| ConfigError::Dev(e.to_string()))?;
            }
            (
                self.data_dir.unwrap_or_else(|| dir.join("data")),
                secret_file,
            )
        } else {
            (
                self.data_dir.expect("clap requires --data-dir"),
                self.secret_file.expect("clap requires --secret-file"),
            )
        };
        let secret = read_secret(&secret_file)?;
        // --dev listens on loopback unless told otherwise.
        let local = |given: &str, default: &str, dev_default: &str| {
            if self.dev && given == default {
                dev_default.to_string()
            } else {
                given.to_string()
            }
        };
        let p2p = resolve("p2p", &local(&self.p2p, "0.0.0.0:7000", "127.0.0.1:7000"))?;
        let grpc = resolve("grpc", &local(&self.grpc, "0.0.0.0:7100", "127.0.0.1:7100"))?;
        let http = resolve("http", &local(&self.http, "0.0.0.0:8080", "127.0.0.1:8080"))?;
        let join = self
            .join
            .iter()
            .map(|j| resolve("join", j))
            .collect::<Result<Vec<_>, _>>()?;
        let labels = self
            .labels
            .iter()
            .map(|l| parse_label(l))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        if let Some(c) = self.cpu
            && !(c > 0.0 && c.is_finite())
        {
            return Err(ConfigError::Cpu(c));
        }
        let memory = match &self.memory {
            Some(m) => Some(parse_bytes(m).ok_or_else(|| ConfigError::Memory(m.clone()))?),
            None => None,
        };
        let name = self
            .name
            .unwrap_or_else(|| sysinfo::System::host_name().unwrap_or_else(|| "meshd".to_string()));
        Ok(NodeConfig {
            data_dir,
            secret,
            p2p,
            blob_port: self.blob_port.0,
            grpc,
            http,
            join,
            name,
            labels,
            cpu: self.cpu,
            memory,
            mdns: !self.no_mdns && !self.dev,
            detector: FailureDetector::default(),
            lie: self.test_lie,
            blob_gc_grace: Duration::from_secs(self.blob_gc_grace_secs),
            job_retention: self.job_retention,
            containerd_socket: self.containerd_socket,
            containerd_namespace: self.containerd_namespace,
        })
    }
}

/// `--blob-port`: a port, 0 for any free one, or `off` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobPort(pub Option<u16>);

fn parse_blob_port(text: &str) -> Result<BlobPort, String> {
    if text == "off" {
        return Ok(BlobPort(None));
    }
    text.parse::<u16>()
        .map(|p| BlobPort(Some(p)))
        .map_err(|_| format!("{text:?} is neither a port (0-65535) nor `off`"))
}

/// Parses `--job-retention`: a duration of at least a second.
fn parse_retention(text: &str) -> Result<Duration, String> {
    let d = meshwork_proto::units::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration like 30m, 12h or 7d"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{text:?}: keep ended jobs at least a second"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        assert_eq!(parse_label("zone=a").unwrap(), ("zone".into(), "a".into()));
        assert!(parse_label("zone").is_err());
        assert!(parse_label("=a").is_err());
        assert!(parse_label("bad key=a").is_err());
    }

    #[test]
    fn bad_flags_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "nothex").unwrap();
        let args = |extra: &[&str]| {
            let mut v = vec![
                "meshd",
                "--data-dir",
                dir.path().to_str().unwrap(),
                "--secret-file",
                secret.to_str().unwrap(),
            ];
            v.extend_from_slice(extra);
            MeshdArgs::try_parse_from(v).unwrap()
        };
        let e = args(&[]).into_config().unwrap_err().to_string();
        assert!(e.contains("--secret-file") && e.contains("64 hex"), "{e}");
        std::fs::write(&secret, ClusterSecret::generate().to_hex()).unwrap();
        let e = args(&["--p2p", "nonsense"])
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--p2p"), "{e}");
        let e = args(&["--cpu=-1"]).into_config().unwrap_err().to_string();
        assert!(e.contains("--cpu"), "{e}");
        let e = args(&["--memory", "lots"])
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--memory"), "{e}");
        assert!(
            args(&["--label", "zone=a", "--memory", "1Gi"])
                .into_config()
                .is_ok()
        );
        assert!(
            MeshdArgs::try_parse_from(["meshd"]).is_err(),
            "data dir is required"
        );
        // The blob port: any free one by default, a given one, or off.
        assert_eq!(args(&[]).into_config().unwrap().blob_port, Some(0));
        let c = args(&["--blob-port", "7300"]).into_config().unwrap();
        assert_eq!(c.blob_port, Some(7300));
        let c = args(&["--blob-port", "off"]).into_config().unwrap();
        assert_eq!(c.blob_port, None);
        let e = MeshdArgs::try_parse_from(["meshd", "--dev", "--blob-port", "99999"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--blob-port") && e.contains("nor `off`"), "{e}");
    }
}
