//! Serving a role's router on its listener: HTTP/1 connections, the limits that keep a flood of
//! them from starving the process, and the drain on stop.
//!
//! A client that opens connections and never finishes a request head (or leaves them idle)
//! would otherwise hold each one for ever, until the process runs out of file descriptors and
//! with them the store, the audit replay files and its outbound calls: evidence lost, every role
//! refusing. So a connection must send each request's head within [`HEAD_TIMEOUT`] (which also
//! closes keep-alive connections idle that long), and each role's listener holds at most
//! [`places_per_role`] inbound connections, an equal share of half the open-file limit; one
//! more on a listener whose share is taken is closed at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

/// What a role's listener reports of its connections (`caracal_<role>_http_connections_*`).
#[derive(Clone, Default)]
pub(crate) struct ConnectionMetrics {
    pub open: Gauge,
    pub refused: Counter,
}

/// One accepted connection, counted open until it ends.
struct Counted(Gauge);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How long a connection may take to send a request's head, counted from the end of its
/// previous exchange (so also how long a keep-alive connection may stay idle). Clients of this
/// process's roles keep idle connections for less ([`IDLE_CLIENT_CONNECTION`]).
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// How long this process's own clients of its roles (the Gateway's STS exchange, the probes of
/// peers' readiness) keep an idle connection: shorter than [`HEAD_TIMEOUT`], so that a request
/// never goes out on a connection the server is closing.
pub(crate) const IDLE_CLIENT_CONNECTION: Duration = Duration::from_secs(20);

/// Raises this process's soft limit of open files to its hard limit, as servers do (the soft
/// default of many systems, 1,024, is meant for interactive programs), and returns the soft
/// limit in force afterwards (`None`: unlimited).
pub(crate) fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return limit.current;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(error) => {
            tracing::warn!(%error, soft = ?limit.current, hard = ?limit.maximum, "the open-files limit could not be raised to its hard limit");
            limit.current
        }
    }
}

/// Inbound connections each of a process's `roles` listeners may hold at once: an equal share
/// (64 at least) of half the process's limit of open files, leaving the other half to the
/// store, the audit replay files and outbound connections.
pub(crate) fn places_per_role(open_files: Option<u64>, roles: usize) -> usize {
    let open_files = open_files.map_or(usize::MAX, |limit| {
        usize::try_from(limit).unwrap_or(usize::MAX)
    });
    (open_files / 2 / roles.max(1)).clamp(64, 1 << 20)
}

/// Serves `app` on `listener` until `stop` turns true, then stops accepting, lets every open
/// connection finish the exchange in progress, and returns once all are closed.
pub(crate) async fn serve_until_stopped(
    listener: TcpListener,
    app: axum::Router,
    connections: Arc<Semaphore>,
    metrics: ConnectionMetrics,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_with(listener, app, connections, metrics, stop, HEAD_TIMEOUT).await
}

async fn serve_with(
    listener: TcpListener,
    app: axum::Router,
    connections: Arc<Semaphore>,
    metrics: ConnectionMetrics,
    stop: watch::Receiver<bool>,
    head_timeout: Duration,
) -> std::io::Result<()> {
    // Every connection's task holds a sender; the receiver ends once all have ended.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    let listening = listener.local_addr()?;
    let stopping = stopped(stop.clone());
    let mut stopping = std::pin::pin!(stopping);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
            () = &mut stopping => break,
        };
        let Ok(place) = Arc::clone(&connections).try_acquire_owned() else {
            metrics.refused.inc();
            over_budget(peer, listening);
            continue; // dropping the stream closes it
        };
        metrics.open.inc();
        let counted = Counted(metrics.open.clone());
        // A response's head and body (and a proxied body's trailers) go out as they are ready,
        // not held back by Nagle's algorithm until the client acknowledges the previous segment.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set on an accepted connection");
        }
        let app = app.clone();
        // The peer address lets the admin API count failed authentications per client.
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            tower::ServiceExt::oneshot(app.clone(), request)
        });
        let (stopping, open) = (stopped(stop.clone()), open.clone());
        tokio::spawn(async move {
            let _held = (place, counted, open);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = stopping => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::trace!(%error, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(open);
    let _ = all_closed.recv().await;
    Ok(())
}

/// Ends once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// A failed `accept`: a connection reset before it was taken is nothing; anything else (out of
/// file descriptors, most likely) is logged and accepting pauses a moment rather than spin.
async fn accept_failed(error: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Logs a connection closed for want of a place, once a second at most (a flood would
/// otherwise flood the log too).
fn over_budget(peer: SocketAddr, listening: SocketAddr) {
    static LAST_LOGGED: AtomicU64 = AtomicU64::new(0);
    let second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    if LAST_LOGGED.swap(second, Ordering::Relaxed) != second {
        tracing::warn!(%peer, %listening, "connection closed: this role holds as many connections as its share allows");
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    struct Server {
        address: SocketAddr,
        metrics: ConnectionMetrics,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn server(places: usize, head_timeout: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    "done"
                }),
            )
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
            );
        let (stop, stopped) = watch::channel(false);
        let connections = Arc::new(Semaphore::new(places));
        let metrics = ConnectionMetrics::default();
        let task = tokio::spawn(serve_with(
            listener,
            app,
            connections,
            metrics.clone(),
            stopped,
            head_timeout,
        ));
        Server {
            address,
            metrics,
            stop,
            task,
        }
    }

    /// Everything the server sends until it closes the connection (within 5 s).
    async fn until_closed(stream: &mut TcpStream) -> String {
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
            .await
            .expect("the server kept the connection open")
            .unwrap_or_default();
        String::from_utf8_lossy(&received).into_owned()
    }

    #[tokio::test]
    async fn stopping_finishes_requests_in_flight_and_refuses_new_connections() {
        let server = server(16, HEAD_TIMEOUT).await;
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.stop.send(true).unwrap();

        let response = until_closed(&mut stream).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("done"), "{response}");
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(server.address).await.is_err());
    }

    #[tokio::test]
    async fn a_connection_without_a_request_head_in_time_is_closed_and_a_slow_answer_is_not() {
        let server = server(16, Duration::from_millis(300)).await;
        // A head that never ends.
        let mut slow = TcpStream::connect(server.address).await.unwrap();
        slow.write_all(b"GET /peer HTTP/1.1\r\nHost: te")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let answered = until_closed(&mut slow).await;
        assert!(!answered.contains("200 OK"), "{answered}");
        assert!(started.elapsed() >= Duration::from_millis(250));

        // An answer slower than the head timeout is still sent whole; the connection is closed
        // once it has stayed idle that long after it.
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        stream
            .write_all(
                b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\nGET /peer HTTP/1.1\r\nHost: test\r\n\r\n",
            )
            .await
            .unwrap();
        let local = stream.local_addr().unwrap().to_string();
        let answered = until_closed(&mut stream).await;
        assert_eq!(answered.matches("HTTP/1.1 200 OK").count(), 2, "{answered}");
        assert!(answered.contains("done"), "{answered}");
        // The handler saw the caller's address.
        assert!(answered.ends_with(&local), "{answered}");
    }

    #[tokio::test]
    async fn a_connection_beyond_the_budget_is_closed_until_a_place_is_free() {
        let server = server(1, Duration::from_secs(10)).await;
        let mut first = TcpStream::connect(server.address).await.unwrap();
        first
            .write_all(b"GET /peer HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0_u8; 12];
        first.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        assert_eq!(server.metrics.open.get(), 1);

        let mut refused = TcpStream::connect(server.address).await.unwrap();
        let _ = refused
            .write_all(b"GET /peer HTTP/1.1\r\nHost: test\r\n\r\n")
            .await;
        assert_eq!(until_closed(&mut refused).await, "");
        assert_eq!(server.metrics.refused.get(), 1);
        assert_eq!(server.metrics.open.get(), 1);

        drop(first);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut next = TcpStream::connect(server.address).await.unwrap();
            let _ = next
                .write_all(b"GET /peer HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                .await;
            if until_closed(&mut next).await.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the freed place was never taken again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Every connection has ended: none is counted open.
        while server.metrics.open.get() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "a connection stayed counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn the_budget_is_half_the_open_files_limit_raised_to_its_hard_limit() {
        assert_eq!(places_per_role(Some(20_000), 1), 10_000);
        assert_eq!(places_per_role(Some(20_000), 6), 1_666);
        assert_eq!(places_per_role(Some(1_024), 6), 85);
        assert_eq!(places_per_role(Some(1_024), 0), 512);
        assert_eq!(places_per_role(Some(16), 1), 64);
        assert_eq!(places_per_role(None, 6), 1 << 20);
        // A soft limit under the hard one (only just: other tests of this process run beside).
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        if let Some(hard) = limit.maximum {
            rustix::process::setrlimit(
                rustix::process::Resource::Nofile,
                rustix::process::Rlimit {
                    current: Some(hard - 1),
                    maximum: Some(hard),
                },
            )
            .unwrap();
        }
        let in_force = raise_open_files_limit();
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(in_force, limit.current);
        assert_eq!(limit.current, limit.maximum, "{limit:?}");
    }
}
