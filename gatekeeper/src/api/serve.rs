//! Serving the HTTP surface (the REST API and `/metrics`) over HTTP/1.1, plain or TLS, so that
//! slow or idle clients cannot make it unreachable (slowloris):
//!
//! * a request head (request line and headers) must arrive within [`HEADER_READ_TIMEOUT`] of the
//!   connection being ready for it (after the TLS handshake, and again after each response, so
//!   this is also the keep-alive idle timeout); a TLS handshake within
//!   [`tls::HANDSHAKE_TIMEOUT`], each in its own task so a stalled one holds up nobody;
//! * a request body that sends nothing for [`BODY_IDLE_TIMEOUT`] fails its request, and a client
//!   that reads nothing of its response for [`WRITE_STALL_TIMEOUT`] is dropped;
//! * at most [`connection_cap`] connections at once (the file descriptor limit, raised from its
//!   soft to its hard value where allowed, less a reserve for the rest of the daemon, and at most
//!   [`MAX_CONNECTIONS`]). At the cap a new connection makes room by closing the connection that
//!   has been idle (no request in progress) the longest, so a client that sends its request at
//!   once, the operator's, is served however many slow connections there are; requests in
//!   progress are never cut for room.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tokio_rustls::TlsAcceptor;

use crate::tls;

/// Time for a request head to arrive, from when the connection is ready to read one.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a request body may send nothing while its handler waits for it.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a client may leave its response unread (the socket buffer full) before it is dropped.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The most connections served at once, whatever the file descriptor limit (each costs memory).
pub const MAX_CONNECTIONS: usize = 4096;
/// File descriptors kept for everything but the API's connections (store, BPF maps and links,
/// the Netskope client, logs), at least.
pub const FD_RESERVE: u64 = 128;
/// How long a new connection waits for room when every connection has a request in progress;
/// it is closed after that.
const ROOM_WAIT: Duration = Duration::from_secs(1);

/// The limits [`serve_with`] applies; [`Limits::default`] is what [`serve`] uses.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub handshake_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub write_stall_timeout: Duration,
    /// The connection cap; `None`: [`connection_cap`] of the (raised) file descriptor limit.
    pub max_connections: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            handshake_timeout: tls::HANDSHAKE_TIMEOUT,
            body_idle_timeout: BODY_IDLE_TIMEOUT,
            write_stall_timeout: WRITE_STALL_TIMEOUT,
            max_connections: None,
        }
    }
}

/// The connections served at once under a file descriptor limit of `fd_limit`: the limit less
/// an eighth of it (at least [`FD_RESERVE`]), at most [`MAX_CONNECTIONS`], at least 1.
pub fn connection_cap(fd_limit: u64) -> usize {
    let reserve = (fd_limit / 8).max(FD_RESERVE);
    usize::try_from(fd_limit.saturating_sub(reserve)).unwrap_or(usize::MAX).clamp(1, MAX_CONNECTIONS)
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit where allowed (systemd starts
/// services with 1,024 soft and 524,288 hard) and returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "getrlimit(RLIMIT_NOFILE) failed; assuming 1024");
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(from = limit.rlim_cur, to = raised.rlim_cur, "raised the open file limit (RLIMIT_NOFILE)");
            return raised.rlim_cur;
        }
        tracing::warn!(
            soft = limit.rlim_cur,
            hard = limit.rlim_max,
            error = %std::io::Error::last_os_error(),
            "could not raise the open file limit (RLIMIT_NOFILE)"
        );
    }
    limit.rlim_cur
}

/// Serves `router` on `listener` (over TLS with `tls`) with the [default limits](Limits) until
/// the task is dropped: accept errors (a full fd table, an aborted connection) are retried, so
/// it does not return in practice.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
) -> std::io::Result<()> {
    serve_with(listener, tls, router, Limits::default()).await
}

/// [`serve`] with other limits.
pub async fn serve_with(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    limits: Limits,
) -> std::io::Result<()> {
    let fd_limit = raise_fd_limit();
    let cap = limits.max_connections.unwrap_or_else(|| connection_cap(fd_limit)).max(1);
    tracing::info!(
        max_connections = cap,
        open_file_limit = fd_limit,
        header_read_timeout_s = limits.header_read_timeout.as_secs_f64(),
        "API connection limits"
    );
    let server = Arc::new(Server {
        router,
        tls: tls.map(TlsAcceptor::from),
        limits,
        cap,
        slots: Arc::new(Semaphore::new(cap)),
        tracker: Tracker::default(),
        full_logged: Mutex::new(None),
    });
    let mut emfile_logged: Option<Instant> = None;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                use std::io::ErrorKind as K;
                if matches!(e.kind(), K::ConnectionRefused | K::ConnectionAborted | K::ConnectionReset | K::Interrupted)
                {
                    continue;
                }
                // Out of file descriptors (used elsewhere in the process): free one and retry
                // shortly rather than spin.
                if emfile_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::error!(error = %e, "API accept failed; closing the longest idle connection");
                    emfile_logged = Some(Instant::now());
                }
                server.tracker.evict_longest_idle();
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let permit = match server.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => match server.make_room().await {
                Some(permit) => permit,
                None => {
                    tracing::debug!(%peer, "API connection refused: every connection has a request in progress");
                    continue;
                }
            },
        };
        tokio::spawn(server.clone().connection(tcp, peer, permit));
    }
}

struct Server {
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    cap: usize,
    /// One permit per connection.
    slots: Arc<Semaphore>,
    tracker: Tracker,
    /// When reaching the cap was last logged.
    full_logged: Mutex<Option<Instant>>,
}

impl Server {
    /// At the cap: closes the connection idle the longest and takes its slot, or waits up to
    /// [`ROOM_WAIT`] for one when none is idle.
    async fn make_room(&self) -> Option<OwnedSemaphorePermit> {
        {
            let mut logged = self.full_logged.lock().unwrap_or_else(|p| p.into_inner());
            if logged.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(
                    max_connections = self.cap,
                    "API connection limit reached; closing the longest idle connections for new ones"
                );
                *logged = Some(Instant::now());
            }
        }
        self.tracker.evict_longest_idle();
        tokio::time::timeout(ROOM_WAIT, self.slots.clone().acquire_owned()).await.ok()?.ok()
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit) {
        let _permit = permit;
        let _ = tcp.set_nodelay(true);
        let conn = self.tracker.open();
        let evicted = conn.evict.clone();
        let served = async {
            match &self.tls {
                None => self.http(tcp, peer, &conn).await,
                Some(acceptor) => match tokio::time::timeout(self.limits.handshake_timeout, acceptor.accept(tcp)).await
                {
                    Ok(Ok(stream)) => self.http(stream, peer, &conn).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        };
        tokio::select! {
            () = served => {}
            () = evicted.notified() => tracing::debug!(%peer, "idle API connection closed to make room"),
        }
    }

    /// HTTP/1.1 on an established (and, over TLS, handshaken) connection.
    async fn http<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        stream: S,
        peer: SocketAddr,
        conn: &Arc<Conn>,
    ) {
        let io = TokioIo::new(WriteStall::new(stream, self.limits.write_stall_timeout));
        let inner = TowerToHyperService::new(self.router.clone());
        let body_idle = self.limits.body_idle_timeout;
        let (tracker, conn) = (self.tracker.clone(), conn.clone());
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            // Not idle, so never closed for room, until the response is handed over.
            let busy = tracker.busy(&conn);
            let mut req = req.map(|body| Body::new(IdleBody::new(body, body_idle)));
            // The client's address, for the audit log.
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            let response = hyper::service::Service::call(&inner, req);
            async move {
                let response = response.await;
                drop(busy);
                response
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(self.limits.header_read_timeout);
        if let Err(e) = builder.serve_connection(io, service).await {
            tracing::debug!(error = %e, "API connection ended");
        }
    }
}

/// The open connections, and which are idle (no request in progress) in the order they became
/// idle, oldest first.
#[derive(Clone, Default)]
struct Tracker(Arc<Mutex<Connections>>);

#[derive(Default)]
struct Connections {
    next: u64,
    /// Idle since (a sequence number) to connection id.
    idle: BTreeMap<u64, u64>,
    /// Connection id to its state.
    open: HashMap<u64, ConnState>,
}

struct ConnState {
    busy: usize,
    /// Its key in `idle` while it is idle.
    idle_since: Option<u64>,
    evict: Arc<Notify>,
}

/// One open connection, deregistered on drop.
struct Conn {
    id: u64,
    evict: Arc<Notify>,
    tracker: Tracker,
}

impl Connections {
    fn seq(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection, idle (its handshake and first request head still to come).
    fn open(&self) -> Arc<Conn> {
        let mut c = self.lock();
        let id = c.seq();
        let since = c.seq();
        let evict = Arc::new(Notify::new());
        c.idle.insert(since, id);
        c.open.insert(id, ConnState { busy: 0, idle_since: Some(since), evict: evict.clone() });
        Arc::new(Conn { id, evict, tracker: self.clone() })
    }

    /// Marks `conn` busy until the guard is dropped.
    fn busy(&self, conn: &Arc<Conn>) -> Busy {
        let mut c = self.lock();
        if let Some(state) = c.open.get_mut(&conn.id) {
            state.busy += 1;
            if let Some(since) = state.idle_since.take() {
                c.idle.remove(&since);
            }
        }
        Busy(conn.clone())
    }

    /// Tells the connection idle the longest to close; false when none is idle.
    fn evict_longest_idle(&self) -> bool {
        let mut c = self.lock();
        let Some((_, id)) = c.idle.pop_first() else { return false };
        match c.open.get_mut(&id) {
            Some(state) => {
                state.idle_since = None;
                // Stored when it is not waiting: it then closes when it next looks.
                state.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut c = self.tracker.lock();
        if let Some(state) = c.open.remove(&self.id)
            && let Some(since) = state.idle_since
        {
            c.idle.remove(&since);
        }
    }
}

/// A request in progress on a connection; the connection is idle again when it is dropped.
struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut c = self.0.tracker.lock();
        let since = c.seq();
        let Some(state) = c.open.get_mut(&self.0.id) else { return };
        state.busy = state.busy.saturating_sub(1);
        if state.busy == 0 && state.idle_since.is_none() {
            state.idle_since = Some(since);
            c.idle.insert(since, self.0.id);
        }
    }
}

/// A request body that fails when nothing arrives for `timeout` while its reader waits.
struct IdleBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        Self { inner, timeout, sleep: None }
    }
}

impl hyper::body::Body for IdleBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(sleep.as_mut().poll(cx));
                Poll::Ready(Some(Err(format!("request body: nothing received for {} s", timeout.as_secs()).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stream whose writes fail when the peer has taken nothing for `timeout` (its receive window
/// and our send buffer full): a client that never reads its response cannot hold a connection.
struct WriteStall<S> {
    inner: S,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteStall<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout, sleep: None }
    }

    /// `poll` as the write's result, failing it once it has been pending for `timeout`.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.sleep = None;
            return poll;
        }
        let timeout = self.timeout;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client read nothing of its response")))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_keeps_a_reserve_below_the_fd_limit() {
        // systemd's default soft limit, when the hard one cannot be reached.
        assert_eq!(connection_cap(1024), 896);
        assert_eq!(connection_cap(256), 128);
        assert_eq!(connection_cap(100), 1);
        assert_eq!(connection_cap(20_000), 4096);
        assert_eq!(connection_cap(524_288), MAX_CONNECTIONS);
        assert_eq!(connection_cap(u64::MAX), MAX_CONNECTIONS);
    }

    #[test]
    fn the_longest_idle_connection_is_closed_first_and_busy_ones_never() {
        let t = Tracker::default();
        let (a, b, c) = (t.open(), t.open(), t.open());
        let busy_a = t.busy(&a);
        assert!(t.evict_longest_idle());
        // b was idle the longest; a is busy.
        assert!(futures_ready(&b.evict) && !futures_ready(&a.evict) && !futures_ready(&c.evict));
        drop(busy_a);
        // a is idle again, since after c.
        assert!(t.evict_longest_idle());
        assert!(futures_ready(&c.evict) && !futures_ready(&a.evict));
        assert!(t.evict_longest_idle());
        assert!(futures_ready(&a.evict));
        assert!(!t.evict_longest_idle(), "nothing idle left");
        drop((a, b, c));
        assert!(t.lock().open.is_empty());
        assert!(t.lock().idle.is_empty());
    }

    /// Whether a notification is stored in `n` (consuming it).
    fn futures_ready(n: &Notify) -> bool {
        let fut = n.notified();
        let mut fut = std::pin::pin!(fut);
        let waker = std::task::Waker::noop();
        fut.as_mut().poll(&mut Context::from_waker(waker)).is_ready()
    }
}
