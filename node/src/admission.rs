//! Admission: only nodes that hold the cluster's join secret get a connection at all.
//!
//! libp2p's `pnet` pre-shared-key layer works only over TCP, not QUIC, so Meshwork runs its own
//! check as a transport upgrade, after the connection is authenticated (noise or QUIC's TLS,
//! which prove each side's peer id) and before the connection is handed to the swarm. No
//! protocol of the swarm (identify, Kademlia, gossipsub, state sync) ever runs on a connection
//! that has not passed it, so a node without the secret learns nothing: not the member list,
//! not the state, not content.
//!
//! The exchange runs on the first substream of the connection:
//!
//! 1. the dialer sends `MAGIC` and `proof(dialer → listener)`;
//! 2. the listener checks it in constant time, and answers `ACCEPT` and its own
//!    `proof(listener → dialer)`, or `REFUSE` and closes;
//! 3. the dialer checks the listener's proof.
//!
//! A proof is `blake3::keyed_hash(K, role ‖ own peer id ‖ remote peer id)` with `K` derived from
//! the secret. It is bound to both peer ids, so a proof seen on one connection is useless on
//! any other, and the listener reveals nothing before the dialer has proven itself.

use std::fmt;
use std::time::Duration;

use futures::future::{Either, poll_fn};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use libp2p::core::ConnectedPoint;
use libp2p::core::muxing::{StreamMuxerBox, StreamMuxerExt};

const MAGIC: &[u8; 8] = b"MWADMIT1";
const ACCEPT: u8 = 1;
const REFUSE: u8 = 0;
/// How long the whole exchange may take before the connection is dropped.
pub const ADMISSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster's join secret: 32 random bytes, written as 64 hex characters.
#[derive(Clone)]
pub struct ClusterSecret([u8; 32]);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret(<{}>)", self.cluster_id())
    }
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The text is not 64 hex characters.
    #[error("a cluster secret is 64 hex characters (32 bytes); found {0} characters")]
    BadLength(usize),
    /// The text is not hex.
    #[error("the cluster secret is not hex: {0}")]
    NotHex(#[from] hex::FromHexError),
}

impl ClusterSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// Parses the hex form (surrounding white space is ignored).
    pub fn from_hex(text: &str) -> Result<Self, SecretError> {
        let t = text.trim();
        if t.len() != 64 {
            return Err(SecretError::BadLength(t.len()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(t, &mut out)?;
        Ok(Self(out))
    }

    /// The hex form, as written to a secret file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A public name for the cluster, derived from the secret one way.
    pub fn cluster_id(&self) -> String {
        let k = blake3::derive_key("meshwork 2026 cluster id v1", &self.0);
        hex::encode(&k[..8])
    }

    fn admission_key(&self) -> [u8; 32] {
        blake3::derive_key("meshwork 2026 admission v1", &self.0)
    }

    /// The key that direct blob connections prove the secret with (see
    /// [`crate::blobs::direct`]); derived one way, so it reveals nothing of the secret.
    pub(crate) fn blob_channel_key(&self) -> [u8; 32] {
        blake3::derive_key("meshwork 2026 blob channel v1", &self.0)
    }

    fn proof(&self, role: &[u8], own: &PeerId, remote: &PeerId) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.admission_key());
        h.update(role);
        h.update(&own.to_bytes());
        h.update(&remote.to_bytes());
        h.finalize()
    }
}

/// Why a connection was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// The remote did not prove the secret.
    #[error("peer {0} did not prove the cluster secret; connection refused")]
    BadProof(PeerId),
    /// The remote refused our proof.
    #[error("peer {0} refused admission: this node's cluster secret is not the cluster's")]
    Refused(PeerId),
    /// The remote spoke something else.
    #[error("peer {0} does not speak Meshwork admission")]
    NotMeshwork(PeerId),
    /// The exchange took too long.
    #[error("admission exchange with {0} timed out")]
    Timeout(PeerId),
    /// The stream or connection failed.
    #[error("admission exchange with {peer} failed: {source}")]
    Io {
        /// The remote peer.
        peer: PeerId,
        /// The failure.
        source: std::io::Error,
    },
}

/// Runs the admission exchange on a fresh connection; used with `Transport::and_then`.
pub async fn admit(
    secret: ClusterSecret,
    local: PeerId,
    (remote, mut muxer): (PeerId, StreamMuxerBox),
    endpoint: ConnectedPoint,
) -> Result<(PeerId, StreamMuxerBox), AdmissionError> {
    let io = |source| AdmissionError::Io {
        peer: remote,
        source,
    };
    let exchange = async {
        let dialer = endpoint.is_dialer();
        let mut stream = if dialer {
            poll_fn(|cx| muxer.poll_outbound_unpin(cx))
                .await
                .map_err(io)?
        } else {
            poll_fn(|cx| muxer.poll_inbound_unpin(cx))
                .await
                .map_err(io)?
        };
        // Drive the connection (yamux needs it) while the exchange runs on the stream.
        let drive = async {
            loop {
                if let Err(e) = poll_fn(|cx| muxer.poll_unpin(cx)).await {
                    return e;
                }
            }
        };
        let talk = async {
            if dialer {
                let mut msg = Vec::with_capacity(40);
                msg.extend_from_slice(MAGIC);
                msg.extend_from_slice(secret.proof(b"dialer", &local, &remote).as_bytes());
                stream.write_all(&msg).await.map_err(io)?;
                stream.flush().await.map_err(io)?;
                let mut status = [0u8; 1];
                stream.read_exact(&mut status).await.map_err(io)?;
                if status[0] != ACCEPT {
                    return Err(AdmissionError::Refused(remote));
                }
                let mut theirs = [0u8; 32];
                stream.read_exact(&mut theirs).await.map_err(io)?;
                if secret.proof(b"listener", &remote, &local) != blake3::Hash::from(theirs) {
                    return Err(AdmissionError::BadProof(remote));
                }
            } else {
                let mut msg = [0u8; 40];
                stream.read_exact(&mut msg).await.map_err(io)?;
                if &msg[..8] != MAGIC {
                    return Err(AdmissionError::NotMeshwork(remote));
                }
                let mut theirs = [0u8; 32];
                theirs.copy_from_slice(&msg[8..]);
                // blake3::Hash equality is constant time.
                if secret.proof(b"dialer", &remote, &local) != blake3::Hash::from(theirs) {
                    // Tell the dialer why, and give the answer time to arrive before the
                    // connection is dropped: wait (briefly) for the dialer to hang up.
                    let _ = stream.write_all(&[REFUSE]).await;
                    let _ = stream.flush().await;
                    let _ = stream.close().await;
                    let mut sink = [0u8; 1];
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), stream.read(&mut sink)).await;
                    return Err(AdmissionError::BadProof(remote));
                }
                let mut reply = Vec::with_capacity(33);
                reply.push(ACCEPT);
                reply.extend_from_slice(secret.proof(b"listener", &local, &remote).as_bytes());
                stream.write_all(&reply).await.map_err(io)?;
                stream.flush().await.map_err(io)?;
            }
            let _ = stream.close().await;
            Ok(())
        };
        match futures::future::select(Box::pin(talk), Box::pin(drive)).await {
            Either::Left((result, _)) => result,
            Either::Right((e, _)) => Err(io(e)),
        }
    };
    match tokio::time::timeout(ADMISSION_TIMEOUT, exchange).await {
        Ok(Ok(())) => {
            metrics::counter!("mesh_admission_total", "result" => "accepted").increment(1);
            Ok((remote, muxer))
        }
        Ok(Err(e)) => {
            match &e {
                AdmissionError::BadProof(_)
                | AdmissionError::Refused(_)
                | AdmissionError::NotMeshwork(_) => {
                    metrics::counter!("mesh_admission_total", "result" => "refused").increment(1);
                    tracing::warn!(peer = %remote, error = %e, "admission failed");
                }
                // A connection closed mid-exchange (e.g. both sides dialled at once and
                // libp2p kept the other connection): not a verdict on the peer.
                AdmissionError::Io { .. } | AdmissionError::Timeout(_) => {
                    metrics::counter!("mesh_admission_total", "result" => "error").increment(1);
                    tracing::debug!(peer = %remote, error = %e, "admission exchange broke off");
                }
            }
            Err(e)
        }
        Err(_) => {
            metrics::counter!("mesh_admission_total", "result" => "timeout").increment(1);
            Err(AdmissionError::Timeout(remote))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_round_trips_and_rejects_bad_text() {
        let s = ClusterSecret::generate();
        let back = ClusterSecret::from_hex(&format!("  {}\n", s.to_hex())).unwrap();
        assert_eq!(s.cluster_id(), back.cluster_id());
        assert!(matches!(
            ClusterSecret::from_hex("abcd"),
            Err(SecretError::BadLength(4))
        ));
        assert!(matches!(
            ClusterSecret::from_hex(&"zz".repeat(32)),
            Err(SecretError::NotHex(_))
        ));
    }

    #[test]
    fn proofs_are_bound_to_secret_roles_and_peers() {
        let a = PeerId::random();
        let b = PeerId::random();
        let c = PeerId::random();
        let s1 = ClusterSecret::generate();
        let s2 = ClusterSecret::generate();
        let p = s1.proof(b"dialer", &a, &b);
        assert_eq!(p, s1.proof(b"dialer", &a, &b));
        assert_ne!(p, s2.proof(b"dialer", &a, &b));
        assert_ne!(p, s1.proof(b"listener", &a, &b));
        assert_ne!(p, s1.proof(b"dialer", &a, &c));
        assert_ne!(p, s1.proof(b"dialer", &b, &a));
        assert_ne!(s1.cluster_id(), s2.cluster_id());
    }
}
