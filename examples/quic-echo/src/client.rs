//! The client side, for trying a service out: which worker answers each new connection.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use quinn::{
    ClientConfig, Endpoint,
    crypto::rustls::QuicClientConfig,
    rustls::{
        self, DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::{CryptoProvider, ring},
        pki_types::{CertificateDer, ServerName, UnixTime},
    },
};

use crate::ECHO_ALPN;

/// How long one connection and its answer may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts any certificate: the worker's is self-signed at start, and this client only
/// asks who answers. Signatures are still checked, so the handshake itself is sound.
#[derive(Debug)]
pub struct AnyCertificate(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An echo client endpoint on `bind` that trusts any server certificate.
pub fn endpoint(bind: SocketAddr) -> Result<Endpoint> {
    endpoint_speaking(bind, ECHO_ALPN)
}

/// A client endpoint on `bind` that trusts any server certificate and offers `alpn`.
pub fn endpoint_speaking(bind: SocketAddr, alpn: &[u8]) -> Result<Endpoint> {
    let provider = Arc::new(ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with ring")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let mut endpoint = Endpoint::client(bind).context("binding the client socket")?;
    endpoint.set_default_client_config(ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).context("QUIC TLS config")?,
    )));
    Ok(endpoint)
}

/// `count` connections to `server`, each from a new port, one request each; prints every
/// answer's first line.
pub fn run(server: SocketAddr, count: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let bind: SocketAddr = if server.is_ipv6() {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        };
        for _ in 0..count {
            let endpoint = endpoint(bind)?;
            let answer = tokio::time::timeout(TIMEOUT, ask(&endpoint, server))
                .await
                .with_context(|| format!("no answer from {server} in {TIMEOUT:?}"))??;
            println!("{}", answer.lines().next().unwrap_or_default());
            endpoint.wait_idle().await;
        }
        Ok(())
    })
}

async fn ask(endpoint: &Endpoint, server: SocketAddr) -> Result<String> {
    let connection = endpoint
        .connect(server, "localhost")?
        .await
        .with_context(|| format!("connecting to {server}"))?;
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(b"who are you?\n").await?;
    send.finish()?;
    let answer = recv.read_to_end(64 * 1024).await?;
    connection.close(0u32.into(), b"done");
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
