//! An HTTP/3 client (the `h3` crate on quinn) for trying a service out and for the tests: a
//! connection that sends GET requests and reads each answer's body.
use std::{future::poll_fn, net::SocketAddr};

use anyhow::{Context as _, Result, bail};
use bytes::{Buf as _, Bytes};
use quinn::Endpoint;

use crate::{H3_ALPN, client::endpoint_speaking};

/// One HTTP/3 connection from an endpoint of its own (so its own client port, which
/// [`Http3Client::rebind`] changes), its connection driven by a local task.
pub struct Http3Client {
    endpoint: Endpoint,
    requests: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
}

impl Http3Client {
    /// Connects to `server` from a new port on `bind`'s address, offering `h3`. Must run
    /// inside a `tokio::task::LocalSet`, which drives the connection.
    pub async fn connect(bind: SocketAddr, server: SocketAddr) -> Result<Self> {
        let endpoint = endpoint_speaking(bind, H3_ALPN)?;
        let connection = endpoint
            .connect(server, "localhost")?
            .await
            .with_context(|| format!("connecting to {server}"))?;
        let (mut driver, requests) = h3::client::new(h3_quinn::Connection::new(connection))
            .await
            .with_context(|| format!("starting HTTP/3 with {server}"))?;
        tokio::task::spawn_local(async move {
            let _closed = poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(Self { endpoint, requests })
    }

    /// `GET path`: the response's body, if its status is 200.
    pub async fn get(&mut self, path: &str) -> Result<String> {
        let request = http::Request::get(format!("https://localhost{path}"))
            .body(())
            .context("building the request")?;
        let mut stream = self.requests.send_request(request).await?;
        stream.finish().await?;
        let response = stream.recv_response().await?;
        if response.status() != http::StatusCode::OK {
            bail!("GET {path}: {}", response.status());
        }
        let mut body = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await? {
            while chunk.has_remaining() {
                let part = chunk.chunk();
                body.extend_from_slice(part);
                let read = part.len();
                chunk.advance(read);
            }
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Moves the connection to a new client port, as a NAT rebinding or a migrating client
    /// does.
    pub fn rebind(&self, bind: SocketAddr) -> Result<()> {
        let socket = std::net::UdpSocket::bind(bind).context("binding a new client port")?;
        self.endpoint
            .rebind(socket)
            .context("rebinding the endpoint")
    }

    /// Closes the connection and waits until the peer knows.
    pub async fn close(self) {
        self.endpoint.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }
}
