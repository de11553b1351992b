//! The accept loop: one HTTP/1.1 connection task per client, with the limits `axum::serve`
//! cannot set. A client must finish sending a request's headers within the header read
//! timeout, counted from when the connection opens or its previous response ends (so an idle
//! keep-alive connection is closed after it too); slow-loris connections cannot pile up.

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Accepts connections on `listener` and serves `app` on each until `stop` resolves; then
/// stops accepting, asks every connection to finish its current request and close, and returns
/// once all have.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    // Every connection task holds a receiver: `closed()` on the sender resolves when the
    // last one is gone. Sending tells them to shut down gracefully.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::pin!(stop);
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                // A client that reset its connection before we took it: only that
                // connection is lost, so take the next one at once.
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!("a connection closed before it was accepted: {e}");
                    continue;
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Tokens go out as small writes; do not let Nagle hold them back.
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let shutdown = shutdown_rx.clone();
        tokio::spawn(serve_connection(
            stream,
            remote,
            app,
            header_read_timeout,
            shutdown,
        ));
    }
    drop(listener);
    drop(shutdown_rx);
    let _ = shutdown_tx.send(true);
    shutdown_tx.closed().await;
}

/// Whether an accept error belongs to one connection (which is gone) rather than to the
/// listener or the process (out of descriptors, out of memory), which waiting may cure.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
    )
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    app: Router,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(remote));
        // A Router is always ready, so it may be called without polling readiness.
        let mut app = app.clone();
        tower_service::Service::call(&mut app, req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut asked_to_stop = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%remote, "connection ended: {e}");
                }
                return;
            }
            changed = shutdown.changed(), if !asked_to_stop => {
                asked_to_stop = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_connection_error;
    use std::io::{Error, ErrorKind};

    #[test]
    fn only_errors_of_one_connection_skip_the_wait() {
        for kind in [
            ErrorKind::ConnectionAborted,
            ErrorKind::ConnectionRefused,
            ErrorKind::ConnectionReset,
        ] {
            assert!(is_connection_error(&Error::from(kind)), "{kind:?}");
        }
        // EMFILE (out of descriptors) and ENOMEM: the listener's trouble, worth a pause.
        for errno in [24, 12] {
            assert!(!is_connection_error(&Error::from_raw_os_error(errno)));
        }
    }
}
