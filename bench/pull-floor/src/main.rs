//! The floor under `bench/pull` part (a): the work a verified, encrypted, stored 1 -> 1 pull
//! cannot avoid, done by the plainest program that can do it, with none of meshd around it.
//!
//! A sender and a receiver in one process, talking over loopback TCP with `STREAMS`
//! connections (meshd opens 4 per holder), one thread per connection end, no async runtime.
//! Chunk `i` (1 MiB) goes over connection `i % STREAMS`. What each side does per chunk is set
//! by the arguments, so each cost can be seen on its own:
//!
//! ```text
//! pull-floor PAYLOAD STREAMS ENC HASH STORE
//!   PAYLOAD  a file (page-cached) the sender reads each chunk from, as a holder reads its store
//!   ENC      plain | aes128        TLS 1.3 (rustls + ring, AES-128-GCM, as meshd's blob port)
//!   HASH     0 | 1 | 2             2 = the chunk's blake3 (its name) and its chaining value at
//!                                  its offset (the whole-blob check), as a pull does
//!   STORE    - | DIR               each chunk written to its own new file in DIR with O_DIRECT
//!                                  (temporary name, rename), one syncfs at the end, as the store
//! ```
//!
//! Prints one line: `<bytes> <seconds> <GB/s>`. The clock runs from the first connect to the
//! last chunk stored (and the syncfs). The receiver reads the socket through a 256 KiB buffer
//! (as meshd does).

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rustls::crypto::ring as provider;

const CHUNK: usize = 1 << 20;

/// A socket read through a buffer and written directly.
struct Sock {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Sock {
    fn new(s: TcpStream) -> Self {
        s.set_nodelay(true).unwrap();
        let w = s.try_clone().unwrap();
        Self {
            r: BufReader::with_capacity(256 << 10, s),
            w,
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.r.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Either end of a connection, encrypted or not.
type Conn = Box<dyn ReadWrite + Send>;
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let mut p = provider::default_provider();
    p.cipher_suites = vec![provider::cipher_suite::TLS13_AES_128_GCM_SHA256];
    let p = Arc::new(p);
    let cert = rcgen::generate_simple_self_signed(vec!["floor".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// A 1 MiB buffer on a page boundary (O_DIRECT needs it).
struct Aligned {
    raw: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new() -> Self {
        let raw = vec![0u8; CHUNK + 4096];
        let start = raw.as_ptr().align_offset(4096);
        Self { raw, start }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + CHUNK]
    }
}

fn store_chunk(dir: &Path, name: &blake3::Hash, index: usize, bytes: &[u8]) {
    let tmp = dir.join(format!("tmp.{index}"));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&tmp)
        .unwrap();
    f.write_all(bytes).unwrap();
    drop(f);
    fs::rename(&tmp, dir.join(name.to_hex().as_str())).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: pull-floor PAYLOAD STREAMS plain|aes128 0|1|2 -|DIR");
        std::process::exit(2);
    }
    let payload = PathBuf::from(&args[1]);
    let streams: usize = args[2].parse().unwrap();
    let tls = match args[3].as_str() {
        "plain" => false,
        "aes128" => true,
        other => panic!("ENC is plain or aes128, not {other}"),
    };
    let hashes: u8 = args[4].parse().unwrap();
    let store: Option<PathBuf> = (args[5] != "-").then(|| PathBuf::from(&args[5]));
    let size = fs::metadata(&payload).unwrap().len() as usize;
    let chunks = size.div_ceil(CHUNK);
    let (server_cfg, client_cfg) = configs();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let file = Arc::new(File::open(&payload).unwrap());
    // Senders: one thread per accepted connection; connection s sends chunks s, s+S, ...
    let sender = std::thread::spawn(move || {
        let mut threads = Vec::new();
        for _ in 0..streams {
            let (sock, _) = listener.accept().unwrap();
            let file = file.clone();
            let cfg = server_cfg.clone();
            threads.push(std::thread::spawn(move || {
                let sock = Sock::new(sock);
                let mut conn: Conn = if tls {
                    let c = rustls::ServerConnection::new(cfg).unwrap();
                    Box::new(rustls::StreamOwned::new(c, sock))
                } else {
                    Box::new(sock)
                };
                // Which stream this is: the receiver says.
                let mut id = [0u8; 1];
                conn.read_exact(&mut id).unwrap();
                let s = id[0] as usize;
                let mut buf = vec![0u8; CHUNK];
                let mut i = s;
                while i < chunks {
                    let len = CHUNK.min(size - i * CHUNK);
                    file.read_exact_at(&mut buf[..len], (i * CHUNK) as u64)
                        .unwrap();
                    conn.write_all(&buf[..len]).unwrap();
                    i += streams;
                }
                conn.flush().unwrap();
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
    });

    if let Some(dir) = &store {
        fs::create_dir_all(dir).unwrap();
    }
    let start = Instant::now();
    let mut receivers = Vec::new();
    for s in 0..streams {
        let cfg = client_cfg.clone();
        let dir = store.clone();
        receivers.push(std::thread::spawn(move || {
            let sock = Sock::new(TcpStream::connect(addr).unwrap());
            let mut conn: Conn = if tls {
                let c = rustls::ClientConnection::new(cfg, "floor".try_into().unwrap()).unwrap();
                Box::new(rustls::StreamOwned::new(c, sock))
            } else {
                Box::new(sock)
            };
            conn.write_all(&[s as u8]).unwrap();
            conn.flush().unwrap();
            let mut buf = Aligned::new();
            let mut got = 0usize;
            let mut i = s;
            while i < chunks {
                let len = CHUNK.min(size - i * CHUNK);
                let b = &mut buf.buf()[..len];
                conn.read_exact(b).unwrap();
                let name = if hashes >= 1 {
                    blake3::hash(b)
                } else {
                    // A name of its own without hashing the chunk: its index.
                    let mut n = [0u8; 32];
                    n[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    blake3::Hash::from_bytes(n)
                };
                if hashes >= 2 {
                    use blake3::hazmat::HasherExt as _;
                    let cv = blake3::Hasher::new()
                        .set_input_offset((i * CHUNK) as u64)
                        .update(b)
                        .finalize_non_root();
                    std::hint::black_box(cv);
                }
                if let Some(dir) = &dir {
                    store_chunk(dir, &name, i, b);
                }
                got += len;
                i += streams;
            }
            got
        }));
    }
    let got: usize = receivers.into_iter().map(|r| r.join().unwrap()).sum();
    if let Some(dir) = &store {
        let d = File::open(dir).unwrap();
        assert_eq!(unsafe { libc::syncfs(d.as_raw_fd()) }, 0, "syncfs");
    }
    let secs = start.elapsed().as_secs_f64();
    sender.join().unwrap();
    println!("{got} {secs:.4} {:.3}", got as f64 / secs / 1e9);
}
