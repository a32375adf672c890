//! The accept loop: HTTP/1.1 connections served by hyper with a header-read timeout, and a graceful
//! stop that waits for requests in flight only so long.
//!
//! Why not `axum::serve`: it sets no timer on hyper, so a client could send its request headers a
//! byte a minute and hold the connection (and a graceful stop, which waits for it) forever; the
//! request timeout only starts once the headers are in. Slack and Discord speak HTTP/1.1, so
//! HTTP/2 is not offered.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Serves `app` on `listener` until `stop` completes, then stops accepting, lets each connection
/// finish the request it is in (keep-alive ends), and returns once they have, or after `drain`,
/// when the rest are dropped. A client has `header_timeout` to send each request's headers.
///
/// # Errors
/// Never: a connection's failure is logged at debug level and the next accepted at once; any
/// other accept failure (a full file table) is retried after a pause.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: impl Future<Output = ()>,
    header_timeout: Duration,
    drain: Duration,
) -> std::io::Result<()> {
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut stop => break,
            // Reap finished connections as we go, so the set holds only live ones.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                // One connection's own failure (reset or aborted before it was accepted).
                Err(e) if connection_error(&e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
                Err(e) => {
                    // Anything else (a full file table, say): the listener is fine, the process
                    // is not; waiting lets connections end, where retrying at once would spin.
                    tracing::warn!(error = %e, "accept failed; pausing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(app.clone());
        let mut closing = closing_rx.clone();
        conns.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = closing.wait_for(|c| *c) => {}
            }
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error while stopping");
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drained =
        tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            connections = conns.len(),
            "requests still in flight when the server stopped were cut off"
        );
        conns.shutdown().await;
    }
    Ok(())
}

/// Whether an accept failed for that one connection's sake, as `axum::serve` tells them apart.
fn connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
