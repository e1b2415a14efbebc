//! The Prometheus endpoint, on `hyper`: `GET /metrics` (or `/`) answers the event loop's
//! snapshot in the OpenMetrics text format. A client gets [`HEADER_TIMEOUT`] to send its
//! request and [`CONNECTION_TIMEOUT`] in all; beyond [`MAX_CONNECTIONS`] at once, new
//! connections are closed at once, so slow or idle clients cannot pile up in the daemon.
use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, body::Incoming, header,
    server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::debug;

use super::shell::Input;

/// Connections served at once.
pub(super) const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request's head.
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may last in all.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Accepts scrapers until the daemon stops.
pub(super) async fn serve(listener: TcpListener, events: mpsc::UnboundedSender<Input>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                super::accept::back_off("metrics endpoint", &error).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "metrics: {MAX_CONNECTIONS} connections already open; closing this one");
            continue;
        };
        let events = events.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(request, events.clone()));
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            if let Err(error) = tokio::time::timeout(CONNECTION_TIMEOUT, connection)
                .await
                .unwrap_or(Ok(()))
            {
                debug!(%peer, %error, "metrics connection ended");
            }
            drop(permit);
        });
    }
}

async fn respond(
    request: Request<Incoming>,
    events: mpsc::UnboundedSender<Input>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics" | "/") => {
            let (reply, snapshot) = oneshot::channel();
            let _ = events.send(Input::Scrape { reply });
            match snapshot.await {
                Ok(text) => (StatusCode::OK, OPENMETRICS, text),
                Err(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "the daemon is stopping\n".to_owned(),
                ),
            }
        }
        (_, "/metrics" | "/") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is served\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "only GET /metrics is served\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    Ok(response)
}
