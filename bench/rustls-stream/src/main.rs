//! Sends 512 MiB from memory over TLS 1.3 on loopback (one or more TCP connections, the
//! receivers read into 1 MiB buffers and discard them, or hash them with HASH=1) and prints GB/s.

use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use rustls::crypto::ring as provider;

#[derive(Debug)]
struct NoVerify;
impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(&self, _: &rustls::pki_types::CertificateDer<'_>, _: &[rustls::pki_types::CertificateDer<'_>], _: &rustls::pki_types::ServerName<'_>, _: &[u8], _: rustls::pki_types::UnixTime) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> { Ok(rustls::client::danger::ServerCertVerified::assertion()) }
    fn verify_tls12_signature(&self, _: &[u8], _: &rustls::pki_types::CertificateDer<'_>, _: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> { Ok(rustls::client::danger::HandshakeSignatureValid::assertion()) }
    fn verify_tls13_signature(&self, _: &[u8], _: &rustls::pki_types::CertificateDer<'_>, _: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> { Ok(rustls::client::danger::HandshakeSignatureValid::assertion()) }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> { provider::default_provider().signature_verification_algorithms.supported_schemes() }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let suite = std::env::args().nth(1).unwrap_or("aes128".into());
    let streams: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(4);
    let hash = std::env::var("HASH").is_ok();
    let mut p = provider::default_provider();
    p.cipher_suites = match suite.as_str() {
        "aes128" => vec![provider::cipher_suite::TLS13_AES_128_GCM_SHA256],
        "aes256" => vec![provider::cipher_suite::TLS13_AES_256_GCM_SHA384],
        _ => vec![provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256],
    };
    let p = Arc::new(p);
    let cert = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let sc = rustls::ServerConfig::builder_with_provider(p.clone()).with_protocol_versions(&[&rustls::version::TLS13]).unwrap()
        .with_no_client_auth().with_single_cert(vec![cert.cert.der().clone()], key).unwrap();
    let cc = rustls::ClientConfig::builder_with_provider(p.clone()).with_protocol_versions(&[&rustls::version::TLS13]).unwrap()
        .dangerous().with_custom_certificate_verifier(Arc::new(NoVerify)).with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let total: usize = 512 << 20;
    let per = total / streams;
    let data = Arc::new(vec![7u8; 1 << 20]);
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let acc = acceptor.clone(); let data = data.clone();
            tokio::spawn(async move {
                let mut t = acc.accept(s).await.unwrap();
                let mut sent = 0; while sent < per { t.write_all(&data).await.unwrap(); sent += data.len(); }
                t.flush().await.unwrap();
                t.shutdown().await.ok();
            });
        }
    });
    let start = Instant::now();
    let mut hs = vec![];
    for _ in 0..streams {
        let c = connector.clone();
        hs.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            // BUFREAD=N: the receiver reads the socket through an N-byte buffer (rustls alone
            // asks the socket for 4 KiB at a time).
            let bufread: usize = std::env::var("BUFREAD").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            let s = tokio::io::BufReader::with_capacity(bufread.max(1), s);
            let mut t = c.connect("x".try_into().unwrap(), s).await.unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            while got < per {
                let mut fill = 0;
                while fill < buf.len() && got + fill < per { let n = t.read(&mut buf[fill..]).await.unwrap(); if n == 0 { break; } fill += n; }
                if hash { let b = buf.clone(); tokio::task::spawn_blocking(move || blake3::hash(&b)).await.unwrap(); }
                got += fill;
            }
            got
        }));
    }
    let mut got = 0; for h in hs { got += h.await.unwrap(); }
    let el = start.elapsed().as_secs_f64();
    println!("{suite} streams={streams} hash={hash}: {got} bytes in {el:.3}s = {:.2} GB/s", got as f64 / el / 1e9);
}
