//! The control socket: root only, one JSON request per line (see [`crate::control`]). It
//! only forwards requests to the event loop and writes back what it answers.
use std::io;

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};
use tracing::warn;

use super::shell::Input;
use crate::control::{self, Reply, Request};

/// Accepts control connections: root only, one request per line.
pub(super) async fn control_server(listener: UnixListener, events: mpsc::UnboundedSender<Input>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                super::accept::back_off("control socket", &error).await;
                continue;
            }
        };
        let events = events.clone();
        tokio::spawn(async move {
            if let Err(error) = control_connection(stream, events).await {
                warn!(%error, "control connection failed");
            }
        });
    }
}

async fn control_connection(
    stream: UnixStream,
    events: mpsc::UnboundedSender<Input>,
) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    // A peer that is not root gets its requests read (so it sees the refusal rather than a
    // broken pipe) and each refused; nothing reaches the daemon.
    let refusal = (uid != 0).then(|| {
        warn!(uid, "control connection refused: not root");
        format!("permission denied: uid {uid} is not root; only root may control portshard")
    });
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(control::MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.last() != Some(&b'\n') && line.len() > control::MAX_REQUEST;
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        let decoded = match &refusal {
            Some(message) => Err(message.clone()),
            None if too_long => Err(control::ProtocolError::TooLong.to_string()),
            None => control::decode_request(&line).map_err(|error| error.to_string()),
        };
        let reply = match decoded {
            Err(message) => Reply::error(message),
            Ok(Request::Upgrade) => {
                // The connection goes with the request: the image that serves after the
                // upgrade (this one or the next) writes the replies.
                let stream = lines
                    .into_inner()
                    .reunite(write)
                    .map_err(io::Error::other)?
                    .into_std()?;
                let _ = events.send(Input::Upgrade { client: stream });
                return Ok(());
            }
            Ok(request) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                if events.send(Input::Control { request, reply: tx }).is_err() {
                    return Ok(());
                }
                // Progress replies go out as they come; the final one ends the request.
                loop {
                    let reply = rx
                        .recv()
                        .await
                        .unwrap_or_else(|| Reply::error("the daemon is stopping"));
                    if reply.is_final() {
                        break reply;
                    }
                    write.write_all(&control::encode_reply(&reply)).await?;
                }
            }
        };
        write.write_all(&control::encode_reply(&reply)).await?;
        if too_long || refusal.is_some() {
            return Ok(());
        }
    }
}
