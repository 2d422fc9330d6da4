//! Direct blob connections: the chunk streams of a pull over TLS 1.3 on plain TCP, admitted by
//! the cluster secret, beside the libp2p connection.
//!
//! Why a second channel: bench/pull measured the libp2p paths at about 0.6 GB/s for one pull on
//! this project's machine (QUIC datagrams of ~1.4 KB each cost a system call and a
//! ChaCha20-Poly1305 seal apiece; noise over TCP fixes ChaCha20-Poly1305 and 64 KB frames), while
//! rustls over one TCP connection with AES-GCM moved 2.9 GB/s on the same loopback. The bytes and
//! the blob protocol are the same on both (see [`super::transfer`]); only the pipe differs, and a
//! puller falls back to a libp2p stream whenever a direct connection cannot be made.
//!
//! Admission, since this socket is outside libp2p's: the TLS handshake authenticates nothing by
//! itself (the server's certificate is a throw-away one; the client accepts any), so right after
//! it both sides prove two things about *this* TLS session, bound to it through its exported
//! keying material (RFC 8446 §7.5), which a man in the middle cannot make equal on both legs:
//!
//! - that they hold the cluster secret: `blake3::keyed_hash(K, role ‖ ekm ‖ public key)` with
//!   `K` derived from the secret;
//! - who they are: their libp2p public key and its signature over `role ‖ ekm`, so the peer id
//!   a node serves under or pulls as is the one of its libp2p identity.
//!
//! The client (puller) speaks first; the server checks in constant time and answers with its own
//! proof, or refuses and closes without having said anything about itself or the store. The
//! client checks that the server is the peer it meant to reach. So a node without the secret can
//! neither pull a piece nor learn whether a node holds one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use crate::admission::ClusterSecret;

/// How long connecting, the TLS handshake and the proofs may take together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the TCP connect alone may take (a port a firewall drops answers nothing).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const MAGIC: &[u8; 8] = b"MWBLOBS1";
const ACCEPT: u8 = 1;
const REFUSE: u8 = 0;
const CLIENT: &[u8] = b"client";
const SERVER: &[u8] = b"server";
const EKM_LABEL: &[u8] = b"EXPORTER-meshwork-blobs-v1";
/// A public key (ed25519 in protobuf: 36 bytes; RSA would be larger) or a signature longer
/// than this is refused before it is read.
const MAX_KEY_OR_SIG: usize = 1024;

/// A direct blob connection, TLS over TCP, after both sides proved themselves.
pub type DirectStream = futures_rustls::TlsStream<Socket>;

/// The TCP socket under the TLS, read through a buffer: rustls asks for 4 KiB at a time, which
/// would be some 130,000 receive calls for a 512 MiB blob.
pub type Socket = futures::io::BufReader<Compat<tokio::net::TcpStream>>;

/// Bytes the socket is read in.
const SOCKET_READ: usize = 256 << 10;

fn socket(tcp: tokio::net::TcpStream) -> Socket {
    futures::io::BufReader::with_capacity(SOCKET_READ, tcp.compat())
}

/// Why a direct connection was not made or not accepted.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// Connecting, TLS or a read or write failed.
    #[error("direct blob connection with {addr}: {source}")]
    Io {
        /// The other end.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
    /// Connecting or the exchange took too long (see [`HANDSHAKE_TIMEOUT`]).
    #[error("direct blob connection with {0}: timed out")]
    Timeout(SocketAddr),
    /// The other side does not speak this protocol.
    #[error("direct blob connection with {0}: not a Meshwork blob endpoint")]
    NotMeshwork(SocketAddr),
    /// The other side's proof of the cluster secret or its signature is wrong.
    #[error("direct blob connection with {0}: the peer did not prove the cluster secret")]
    BadProof(SocketAddr),
    /// The server refused our proof.
    #[error(
        "direct blob connection with {0}: refused (this node's cluster secret is not the cluster's)"
    )]
    Refused(SocketAddr),
    /// The server is another node than the one asked for.
    #[error("direct blob connection with {addr}: expected peer {expected}, found {found}")]
    WrongPeer {
        /// The other end.
        addr: SocketAddr,
        /// The peer meant.
        expected: Box<PeerId>,
        /// The peer that answered.
        found: Box<PeerId>,
    },
}

impl DirectError {
    /// A short, fixed name for the kind of failure, for metric labels: `io` (the connection or
    /// TLS failed, or closed early: a port scan or a health probe looks like this), `timeout`,
    /// `not_meshwork`, `bad_proof` (no cluster secret, or a forged proof), `refused`,
    /// `wrong_peer`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Timeout(_) => "timeout",
            Self::NotMeshwork(_) => "not_meshwork",
            Self::BadProof(_) => "bad_proof",
            Self::Refused(_) => "refused",
            Self::WrongPeer { .. } => "wrong_peer",
        }
    }
}

/// What one node needs to open and accept direct blob connections.
pub struct DirectTls {
    identity: Keypair,
    key: [u8; 32],
    client: futures_rustls::TlsConnector,
    server: futures_rustls::TlsAcceptor,
}

impl std::fmt::Debug for DirectTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectTls")
            .field("peer", &self.identity.public().to_peer_id())
            .finish_non_exhaustive()
    }
}

/// The ring provider with AES-GCM first (fast where the CPU has AES instructions; ChaCha20 is
/// kept for CPUs without them).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::{self, cipher_suite};
    let mut p = ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Accepts any server certificate: the server is authenticated by its proof after the
/// handshake (see the module doc), but the handshake's own signature is still checked, so the
/// exported keying material is that of a sound TLS session.
#[derive(Debug)]
struct AfterHandshake(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AfterHandshake {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("only TLS 1.3 is offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl DirectTls {
    /// TLS configurations for a node with this identity in the cluster of `secret` (a fresh
    /// self-signed certificate each start; it proves nothing and needs no keeping).
    pub fn new(identity: Keypair, secret: &ClusterSecret) -> Self {
        let provider = provider();
        let cert = rcgen::generate_simple_self_signed(vec!["meshwork-blobs".into()])
            .expect("a self-signed certificate is generated");
        let key = PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("the generated key fits its certificate");
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AfterHandshake(provider)))
            .with_no_client_auth();
        Self {
            identity,
            key: secret.blob_channel_key(),
            client: futures_rustls::TlsConnector::from(Arc::new(client)),
            server: futures_rustls::TlsAcceptor::from(Arc::new(server)),
        }
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.identity.public().to_peer_id()
    }

    /// Connects to `addr`, where `expected` should be serving, and proves this node to it.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: PeerId,
    ) -> Result<DirectStream, DirectError> {
        let io = |source| DirectError::Io { addr, source };
        let exchange = async {
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| DirectError::Timeout(addr))?
                .map_err(io)?;
            tcp.set_nodelay(true).map_err(io)?;
            let name = ServerName::try_from("meshwork-blobs").expect("a valid name");
            let mut tls = self.client.connect(name, socket(tcp)).await.map_err(io)?;
            let ekm = keying_material(tls.get_ref().1, addr)?;
            let mine = self.proof_message(CLIENT, &ekm);
            tls.write_all(MAGIC).await.map_err(io)?;
            tls.write_all(&mine).await.map_err(io)?;
            tls.flush().await.map_err(io)?;
            let mut answer = [0u8; 9];
            match tls.read_exact(&mut answer).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(DirectError::Refused(addr));
                }
                Err(e) => return Err(io(e)),
            }
            if &answer[..8] != MAGIC {
                return Err(DirectError::NotMeshwork(addr));
            }
            if answer[8] != ACCEPT {
                return Err(DirectError::Refused(addr));
            }
            let found = self.read_proof(&mut tls, SERVER, &ekm, addr).await?;
            if found != expected {
                return Err(DirectError::WrongPeer {
                    addr,
                    expected: Box::new(expected),
                    found: Box::new(found),
                });
            }
            Ok(DirectStream::Client(tls))
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
            .await
            .unwrap_or(Err(DirectError::Timeout(addr)))
    }

    /// Runs the server side on an accepted connection: the client's proof first, then ours.
    /// Returns the client's peer id and the stream.
    pub async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
        addr: SocketAddr,
    ) -> Result<(PeerId, DirectStream), DirectError> {
        let io = |source| DirectError::Io { addr, source };
        let exchange = async {
            tcp.set_nodelay(true).map_err(io)?;
            let mut tls = self.server.accept(socket(tcp)).await.map_err(io)?;
            let ekm = keying_material(tls.get_ref().1, addr)?;
            let mut magic = [0u8; 8];
            tls.read_exact(&mut magic).await.map_err(io)?;
            if &magic != MAGIC {
                return Err(DirectError::NotMeshwork(addr));
            }
            let peer = match self.read_proof(&mut tls, CLIENT, &ekm, addr).await {
                Ok(p) => p,
                Err(e) => {
                    // Say no and nothing else.
                    let _ = tls.write_all(MAGIC).await;
                    let _ = tls.write_all(&[REFUSE]).await;
                    let _ = tls.close().await;
                    return Err(e);
                }
            };
            let mine = self.proof_message(SERVER, &ekm);
            tls.write_all(MAGIC).await.map_err(io)?;
            tls.write_all(&[ACCEPT]).await.map_err(io)?;
            tls.write_all(&mine).await.map_err(io)?;
            tls.flush().await.map_err(io)?;
            Ok((peer, DirectStream::Server(tls)))
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
            .await
            .unwrap_or(Err(DirectError::Timeout(addr)))
    }

    /// `u16` length, public key (protobuf), `u16` length, signature over `role ‖ ekm`, and the
    /// 32-byte proof of the secret.
    fn proof_message(&self, role: &[u8], ekm: &[u8; 32]) -> Vec<u8> {
        let public = self.identity.public().encode_protobuf();
        let signature = self
            .identity
            .sign(&[role, ekm.as_slice()].concat())
            .expect("ed25519 signing does not fail");
        let proof = proof(&self.key, role, ekm, &public);
        let mut out = Vec::with_capacity(4 + public.len() + signature.len() + 32);
        out.extend_from_slice(&(public.len() as u16).to_le_bytes());
        out.extend_from_slice(&public);
        out.extend_from_slice(&(signature.len() as u16).to_le_bytes());
        out.extend_from_slice(&signature);
        out.extend_from_slice(proof.as_bytes());
        out
    }

    /// Reads and checks the other side's proof message; its peer id if it holds.
    async fn read_proof(
        &self,
        tls: &mut (impl futures::AsyncRead + Unpin),
        role: &[u8],
        ekm: &[u8; 32],
        addr: SocketAddr,
    ) -> Result<PeerId, DirectError> {
        let io = |source| DirectError::Io { addr, source };
        let public = read_sized(tls, addr).await?;
        let signature = read_sized(tls, addr).await?;
        let mut claimed = [0u8; 32];
        tls.read_exact(&mut claimed).await.map_err(io)?;
        // blake3::Hash compares in constant time.
        if proof(&self.key, role, ekm, &public) != blake3::Hash::from_bytes(claimed) {
            return Err(DirectError::BadProof(addr));
        }
        let key =
            PublicKey::try_decode_protobuf(&public).map_err(|_| DirectError::BadProof(addr))?;
        if !key.verify(&[role, ekm.as_slice()].concat(), &signature) {
            return Err(DirectError::BadProof(addr));
        }
        Ok(key.to_peer_id())
    }
}

fn proof(key: &[u8; 32], role: &[u8], ekm: &[u8; 32], public: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(role);
    h.update(ekm);
    h.update(public);
    h.finalize()
}

/// The keying material the TLS session exports (RFC 8446 §7.5), which the proofs are bound to.
fn keying_material<D>(
    conn: &rustls::ConnectionCommon<D>,
    addr: SocketAddr,
) -> Result<[u8; 32], DirectError> {
    conn.export_keying_material([0u8; 32], EKM_LABEL, None)
        .map_err(|e| DirectError::Io {
            addr,
            source: std::io::Error::other(e),
        })
}

async fn read_sized(
    tls: &mut (impl futures::AsyncRead + Unpin),
    addr: SocketAddr,
) -> Result<Vec<u8>, DirectError> {
    let io = |source| DirectError::Io { addr, source };
    let mut len = [0u8; 2];
    tls.read_exact(&mut len).await.map_err(io)?;
    let len = u16::from_le_bytes(len) as usize;
    if len > MAX_KEY_OR_SIG {
        return Err(DirectError::BadProof(addr));
    }
    let mut buf = vec![0u8; len];
    tls.read_exact(&mut buf).await.map_err(io)?;
    Ok(buf)
}

/// Where a peer takes direct blob connections: each IP address among its libp2p listen
/// addresses (`/ip4/…/tcp/…` or `/udp/…`), with its blob port; none if it has no port.
pub fn direct_addrs(libp2p_addrs: &[String], blob_port: u16) -> Vec<SocketAddr> {
    use libp2p::multiaddr::Protocol;
    if blob_port == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for a in libp2p_addrs {
        let Ok(ma) = a.parse::<libp2p::Multiaddr>() else {
            continue;
        };
        let ip = match ma.iter().next() {
            Some(Protocol::Ip4(ip)) => std::net::IpAddr::V4(ip),
            Some(Protocol::Ip6(ip)) => std::net::IpAddr::V6(ip),
            _ => continue,
        };
        if ip.is_unspecified() {
            continue;
        }
        let sa = SocketAddr::new(ip, blob_port);
        if !out.contains(&sa) {
            out.push(sa);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(
        server: Arc<DirectTls>,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<Result<(PeerId, DirectStream), DirectError>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, from) = listener.accept().await.unwrap();
            server.accept(tcp, from).await
        });
        (addr, task)
    }

    fn node(secret: &ClusterSecret) -> Arc<DirectTls> {
        Arc::new(DirectTls::new(Keypair::generate_ed25519(), secret))
    }

    #[tokio::test]
    async fn members_connect_learn_each_other_and_carry_bytes() {
        let secret = ClusterSecret::generate();
        let (a, b) = (node(&secret), node(&secret));
        let (addr, server) = pair(b.clone()).await;
        let mut client = a.connect(addr, b.peer_id()).await.expect("connects");
        let (peer, mut served) = server.await.unwrap().expect("accepts");
        assert_eq!(peer, a.peer_id());
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            served.write_all(&sent).await.unwrap();
            served.close().await.unwrap();
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, payload);
    }

    #[tokio::test]
    async fn a_node_without_the_secret_is_refused_and_learns_nothing() {
        let (a, b) = (
            node(&ClusterSecret::generate()),
            node(&ClusterSecret::generate()),
        );
        let (addr, server) = pair(b.clone()).await;
        let client = a.connect(addr, b.peer_id()).await;
        assert!(
            matches!(client, Err(DirectError::Refused(_))),
            "got {client:?}"
        );
        let served = server.await.unwrap();
        assert!(
            matches!(served, Err(DirectError::BadProof(_))),
            "got {:?}",
            served.map(|(p, _)| p)
        );
    }

    #[tokio::test]
    async fn a_client_refuses_a_member_other_than_the_one_it_asked_for() {
        let secret = ClusterSecret::generate();
        let (a, b) = (node(&secret), node(&secret));
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let (addr, _server) = pair(b.clone()).await;
        let client = a.connect(addr, other).await;
        assert!(
            matches!(&client, Err(DirectError::WrongPeer { found, .. }) if **found == b.peer_id()),
            "got {client:?}"
        );
    }

    #[tokio::test]
    async fn a_server_refuses_garbage_and_a_replayed_proof() {
        let secret = ClusterSecret::generate();
        let b = node(&secret);
        // Not TLS at all.
        let (addr, server) = pair(b.clone()).await;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert!(matches!(server.await.unwrap(), Err(DirectError::Io { .. })));
        // TLS, then a proof made for another session (its keying material differs).
        let a = node(&secret);
        let (addr, server) = pair(b.clone()).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("meshwork-blobs").unwrap();
        let mut tls = a.client.connect(name, socket(tcp)).await.unwrap();
        let stale = a.proof_message(CLIENT, &[7u8; 32]);
        tls.write_all(MAGIC).await.unwrap();
        tls.write_all(&stale).await.unwrap();
        tls.flush().await.unwrap();
        assert!(matches!(
            server.await.unwrap(),
            Err(DirectError::BadProof(_))
        ));
    }

    #[tokio::test]
    async fn connecting_to_a_closed_port_fails_with_the_address() {
        let secret = ClusterSecret::generate();
        let a = node(&secret);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = a.connect(closed, a.peer_id()).await.unwrap_err();
        assert!(err.to_string().contains(&closed.to_string()), "{err}");
    }

    #[test]
    fn direct_addresses_come_from_listen_addresses_and_the_blob_port() {
        let addrs = vec![
            "/ip4/10.0.0.2/udp/7000/quic-v1".to_string(),
            "/ip4/10.0.0.2/tcp/7000".to_string(),
            "/ip4/127.0.0.1/tcp/7000".to_string(),
            "/ip4/0.0.0.0/tcp/7000".to_string(),
            "/dns4/example.org/tcp/7000".to_string(),
            "not a multiaddr".to_string(),
        ];
        assert_eq!(
            direct_addrs(&addrs, 7100),
            vec![
                "10.0.0.2:7100".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:7100".parse().unwrap()
            ]
        );
        assert!(direct_addrs(&addrs, 0).is_empty());
    }
}
