//! The one small HTTP/1.1 server of the programs: `--status` (`/status`, `/metrics`) and
//! the client's `--http` page run on it. Std sockets, `httparse` for the request head,
//! one request per connection, and a bound on everything a peer can make it hold.
//!
//! # Limits ([`Limits`], each counted in [`HttpStats`] when it bites)
//! - The whole request head, and the body, must arrive within `head_deadline` (5 s)
//!   from the accept, however it is sliced: else `408` (a deadline, not a timeout per read).
//! - A head is at most `max_head` bytes (8 KiB) and `max_headers` headers: else `431`.
//!   The server never reads more than `max_head` bytes of a head, so a 1 MB header costs
//!   it 8 KiB. A body is at most `max_body` bytes (`413`); chunked bodies get `501`,
//!   anything `httparse` refuses `400`.
//! - At most `max_connections` connections (64) and `max_per_addr` (16) per source IP.
//!   When a cap is full, the oldest connection that is still sending its head (of that
//!   address; for the global cap, of the address holding the most) is answered `503` and
//!   closed to make room ("evicted"): idle or slow connections cannot lock real requests
//!   out, since a real client sends its head at once. When every connection is past its
//!   head (e.g. all streaming), the new one gets a `503` ("refused").
//! - A response must be written within `write_timeout` (10 s); each write of a
//!   streaming response too, so a reader that stops reading is dropped, never buffered.
//!
//! # Routing
//! A [`Router`] maps exact paths and methods to handlers (404 lists the GET paths, 405
//! says which methods are allowed). A handler returns a [`Reply`]: a whole [`HttpResponse`],
//! or a streaming closure that gets the socket as a [`StreamConn`] with a write deadline.
//!
//! # Threads
//! One accept thread, and one thread per admitted connection (256 KiB stack): at most
//! `max_connections`, plus evicted ones finishing their `503` (never more than twice as
//! many in all).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use ott_proto::untrusted;
use serde::Serialize;

/// The bounds of one server; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time from the accept by which the whole request head and body must have arrived.
    pub head_deadline: Duration,
    /// Largest request head (request line and headers), bytes.
    pub max_head: usize,
    /// Most headers in a request.
    pub max_headers: usize,
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections open at once from one source IP address.
    pub max_per_addr: usize,
    /// Time to write a whole response, or each write of a streaming response.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            head_deadline: Duration::from_secs(5),
            max_head: 8 * 1024,
            max_headers: 32,
            max_body: 4 * 1024,
            max_connections: 64,
            max_per_addr: 16,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Stack of a connection thread: handlers build small pages and JSON documents.
const CONN_STACK: usize = 256 * 1024;
/// After an answer, how much of what the peer still sends is read and dropped before
/// closing (so that its unread bytes do not turn our close into a reset that loses the
/// answer), and for how long at most.
const LINGER_BYTES: usize = 64 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(1);
/// How long the answer to an evicted or refused connection may take.
const BUSY_WRITE: Duration = Duration::from_millis(200);
/// Caps that bite are logged at most once per this interval, with how often they bit.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Counters of one server; every cap has one.
#[derive(Debug)]
pub struct HttpStats {
    name: String,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Requests read whole and routed.
    pub requests: AtomicU64,
    /// Malformed requests (`400`), unsupported ones (`501`), and heads cut by the peer.
    pub bad_requests: AtomicU64,
    /// Heads over `max_head` bytes or `max_headers` headers (`431`), bodies over
    /// `max_body` (`413`).
    pub too_large: AtomicU64,
    /// Heads not complete by the deadline (`408`).
    pub head_timeouts: AtomicU64,
    /// Connections still sending their head closed (`503`) to make room for a new one.
    pub evicted: AtomicU64,
    /// Connections refused (`503`) because `max_connections` were busy past their head.
    pub refused: AtomicU64,
    /// Connections refused (`503`) because `max_per_addr` from that address were busy.
    pub refused_per_addr: AtomicU64,
    /// Streaming responses dropped because the reader did not keep up.
    pub slow_readers: AtomicU64,
    /// Requests refused by a handler with `403` (e.g. a cross-origin `POST`).
    pub forbidden: AtomicU64,
}

/// A point-in-time copy of [`HttpStats`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct HttpSnapshot {
    /// See [`HttpStats::accepted`].
    pub accepted: u64,
    /// See [`HttpStats::requests`].
    pub requests: u64,
    /// See [`HttpStats::bad_requests`].
    pub bad_requests: u64,
    /// See [`HttpStats::too_large`].
    pub too_large: u64,
    /// See [`HttpStats::head_timeouts`].
    pub head_timeouts: u64,
    /// See [`HttpStats::evicted`].
    pub evicted: u64,
    /// See [`HttpStats::refused`].
    pub refused: u64,
    /// See [`HttpStats::refused_per_addr`].
    pub refused_per_addr: u64,
    /// See [`HttpStats::slow_readers`].
    pub slow_readers: u64,
    /// See [`HttpStats::forbidden`].
    pub forbidden: u64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl HttpStats {
    /// Zeroed counters of the server called `name` (the `server` label in `/metrics`).
    pub fn new(name: &str) -> Self {
        let z = || AtomicU64::new(0);
        Self {
            name: name.to_string(),
            accepted: z(),
            requests: z(),
            bad_requests: z(),
            too_large: z(),
            head_timeouts: z(),
            evicted: z(),
            refused: z(),
            refused_per_addr: z(),
            slow_readers: z(),
            forbidden: z(),
        }
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Copy every counter.
    pub fn snapshot(&self) -> HttpSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HttpSnapshot {
            accepted: g(&self.accepted),
            requests: g(&self.requests),
            bad_requests: g(&self.bad_requests),
            too_large: g(&self.too_large),
            head_timeouts: g(&self.head_timeouts),
            evicted: g(&self.evicted),
            refused: g(&self.refused),
            refused_per_addr: g(&self.refused_per_addr),
            slow_readers: g(&self.slow_readers),
            forbidden: g(&self.forbidden),
        }
    }
}

impl HttpSnapshot {
    fn rows(&self) -> [(&'static str, &'static str, u64); 10] {
        [
            ("accepted", "HTTP connections accepted", self.accepted),
            ("requests", "HTTP requests read and routed", self.requests),
            (
                "bad_requests",
                "Malformed or unsupported HTTP requests (400, 501)",
                self.bad_requests,
            ),
            (
                "too_large",
                "HTTP request heads or bodies over the cap (431, 413)",
                self.too_large,
            ),
            (
                "head_timeouts",
                "HTTP request heads not complete by the deadline (408)",
                self.head_timeouts,
            ),
            (
                "evicted",
                "HTTP connections still sending their head closed to make room (503)",
                self.evicted,
            ),
            (
                "refused",
                "HTTP connections refused at the global cap (503)",
                self.refused,
            ),
            (
                "refused_per_addr",
                "HTTP connections refused at the per-address cap (503)",
                self.refused_per_addr,
            ),
            (
                "slow_readers",
                "Streaming HTTP responses dropped for a reader that did not keep up",
                self.slow_readers,
            ),
            (
                "forbidden",
                "HTTP requests refused by a handler (403)",
                self.forbidden,
            ),
        ]
    }
}

/// The Prometheus text of several servers' counters: one family per counter
/// (`ott_http_<counter>_total`), one sample per server (label `server`).
pub fn prometheus(servers: &[&HttpStats]) -> String {
    let snaps: Vec<(&str, HttpSnapshot)> =
        servers.iter().map(|s| (s.name(), s.snapshot())).collect();
    let mut out = String::new();
    let Some((_, first)) = snaps.first() else {
        return out;
    };
    for (i, (name, help, _)) in first.rows().iter().enumerate() {
        let _ = write!(
            out,
            "# HELP ott_http_{name}_total {help}.\n# TYPE ott_http_{name}_total counter\n"
        );
        for (server, snap) in &snaps {
            let v = snap.rows().get(i).map_or(0, |r| r.2);
            let server = server.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "ott_http_{name}_total{{server=\"{server}\"}} {v}");
        }
    }
    out
}

/// A request read whole.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The target up to `?`.
    pub path: String,
    /// The target after `?` (empty if none).
    pub query: String,
    /// Headers in order, names in lower case, values as (lossy) UTF-8.
    pub headers: Vec<(String, String)>,
    /// The body (at most `max_body` bytes).
    pub body: Vec<u8>,
    /// Who sent it.
    pub peer: SocketAddr,
}

impl HttpRequest {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key` in an `application/x-www-form-urlencoded` text (a body or a
    /// query), decoded.
    pub fn form_value(form: &str, key: &str) -> Option<String> {
        form.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| url_decode(k) == key)
            .map(|(_, v)| url_decode(v))
    }
}

/// A whole response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers besides `Content-Length`, `Connection`, `Cache-Control` and
    /// `X-Content-Type-Options`, which every response gets.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A response of `content_type`.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body.into())
    }

    /// The same with one more header (CR and LF are dropped from `value` when written).
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// What a handler answers.
pub enum Reply {
    /// A whole response, written within the write timeout.
    Full(HttpResponse),
    /// A streaming response: the closure writes the head and the body on the
    /// connection's thread, and ends the response by returning. An error of kind
    /// [`ErrorKind::TimedOut`] counts the reader as too slow.
    Stream(Box<dyn FnOnce(StreamConn) -> io::Result<()> + Send>),
}

impl From<HttpResponse> for Reply {
    fn from(r: HttpResponse) -> Self {
        Reply::Full(r)
    }
}

/// The socket of a streaming response. Each [`StreamConn::send`] must complete within
/// the write timeout, or fails with [`ErrorKind::TimedOut`].
pub struct StreamConn {
    stream: TcpStream,
    write_timeout: Duration,
}

impl StreamConn {
    /// Write the response head: `status`, `content_type`, no length (the body ends when
    /// the connection closes).
    pub fn send_head(&mut self, status: u16, content_type: &str) -> io::Result<()> {
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {}\r\n{COMMON_HEADERS}\r\n",
            reason(status),
            header_value(content_type)
        );
        self.send(&[head.as_bytes()])
    }

    /// Write `parts` one after the other, all within the write timeout.
    pub fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let deadline = Instant::now() + self.write_timeout;
        for p in parts {
            write_all_by(&self.stream, p, deadline)?;
        }
        Ok(())
    }

    /// The peer.
    pub fn peer(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }
}

/// A request handler.
pub type Handler = Box<dyn Fn(&HttpRequest) -> Reply + Send + Sync>;

struct Route {
    method: &'static str,
    path: String,
    /// Matches every path that starts with `path` (tried after the exact routes).
    prefix: bool,
    handler: Handler,
}

/// Exact paths and methods to handlers.
#[derive(Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// No routes: every request gets a 404.
    pub fn new() -> Self {
        Self::default()
    }

    /// Route `method` on `path` to `handler`.
    pub fn route(
        mut self,
        method: &'static str,
        path: &str,
        handler: impl Fn(&HttpRequest) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.routes.push(Route {
            method,
            path: path.to_string(),
            prefix: false,
            handler: Box::new(handler),
        });
        self
    }

    /// Route `GET` on every path under `prefix` (e.g. `/watch/`), when no exact route
    /// matches; the handler reads the rest of [`HttpRequest::path`].
    pub fn get_under(
        mut self,
        prefix: &str,
        handler: impl Fn(&HttpRequest) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.routes.push(Route {
            method: "GET",
            path: prefix.to_string(),
            prefix: true,
            handler: Box::new(handler),
        });
        self
    }

    /// Route `GET` on `path`.
    pub fn get(
        self,
        path: &str,
        h: impl Fn(&HttpRequest) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.route("GET", path, h)
    }

    /// Route `POST` on `path`.
    pub fn post(
        self,
        path: &str,
        h: impl Fn(&HttpRequest) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.route("POST", path, h)
    }

    /// The handler's reply, or a 404 (listing the GET paths) or 405 (with `Allow`).
    pub fn dispatch(&self, req: &HttpRequest) -> Reply {
        let mut allowed = Vec::new();
        let exact = self
            .routes
            .iter()
            .filter(|r| !r.prefix && r.path == req.path);
        let under = self
            .routes
            .iter()
            .filter(|r| r.prefix && req.path.starts_with(&r.path));
        for r in exact.chain(under) {
            if r.method == req.method {
                return (r.handler)(req);
            }
            allowed.push(r.method);
        }
        if allowed.is_empty() {
            let paths: Vec<String> = self
                .routes
                .iter()
                .filter(|r| r.method == "GET")
                .map(|r| {
                    if r.prefix {
                        format!("{}…", r.path)
                    } else {
                        r.path.clone()
                    }
                })
                .collect();
            return HttpResponse::text(404, format!("not found: try {}\n", paths.join(", ")))
                .into();
        }
        let allow = allowed.join(", ");
        HttpResponse::text(
            405,
            format!(
                "method {} not allowed on {}: use {allow}\n",
                untrusted(&req.method),
                req.path
            ),
        )
        .with_header("Allow", allow)
        .into()
    }
}

/// A running server. Dropping it does not stop it (the programs serve until they
/// exit); [`Server::shutdown`] does.
pub struct Server {
    addr: SocketAddr,
    stats: Arc<HttpStats>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<HttpStats> {
        &self.stats
    }

    /// Stop accepting connections; those open end by their own deadlines.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept thread.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(200));
    }
}

/// Serve `router` on `addr` within `limits`, counting into `stats`, from background
/// threads. The error names the address when it cannot be bound.
pub fn serve(
    addr: SocketAddr,
    router: Router,
    limits: Limits,
    stats: Arc<HttpStats>,
) -> anyhow::Result<Server> {
    let listener =
        listen(addr).with_context(|| format!("cannot serve HTTP ({}) on {addr}", stats.name()))?;
    let bound = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        router,
        limits: Limits {
            max_connections: limits.max_connections.max(1),
            max_per_addr: limits.max_per_addr.max(1),
            max_headers: limits.max_headers.max(1),
            ..limits
        },
        stats: stats.clone(),
        registry: Mutex::new(Registry::default()),
    });
    let flag = stop.clone();
    thread::Builder::new()
        .name(format!("{}-accept", stats.name()))
        .spawn(move || accept_loop(&listener, &shared, &flag))
        .context("cannot start the HTTP accept thread")?;
    Ok(Server {
        addr: bound,
        stats,
        stop,
    })
}

/// Connections the kernel completes before the accept thread takes them: a burst of
/// them is taken (and sorted out by the caps) instead of SYNs being dropped (the
/// standard library's 128 makes clients of a burst wait a second for a retry).
const BACKLOG: i32 = 1024;

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

struct Shared {
    router: Router,
    limits: Limits,
    stats: Arc<HttpStats>,
    registry: Mutex<Registry>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts how often something happened since it was last logged.
#[derive(Default)]
struct Burst {
    last: Option<Instant>,
    count: u64,
}

impl Burst {
    /// Note one more; `Some(n)` when it is time to log `n` of them.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    let name = shared.stats.name().to_string();
    let (mut busy_log, mut evict_log) = (Burst::default(), Burst::default());
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, or a connection reset before the accept.
                tracing::debug!(server = %name, error = %e, "accept failed");
                thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        bump(&shared.stats.accepted);
        let now = Instant::now();
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let admitted = shared
            .registry()
            .admit(peer.ip(), clone, now, &shared.limits);
        if admitted.evicted > 0 {
            for _ in 0..admitted.evicted {
                bump(&shared.stats.evicted);
            }
            if let Some(n) = evict_log.note(now) {
                tracing::warn!(server = %name, evicted = n, %peer,
                    "HTTP connection cap reached: connections still sending their head closed to make room");
            }
        }
        let id = match admitted.outcome {
            Ok(id) => id,
            Err(cap) => {
                let (counter, text) = match cap {
                    Cap::PerAddr => (
                        &shared.stats.refused_per_addr,
                        "too many connections from your address\n",
                    ),
                    Cap::Global => (&shared.stats.refused, "too many connections\n"),
                };
                bump(counter);
                if let Some(n) = busy_log.note(now) {
                    tracing::warn!(server = %name, refused = n, %peer, cap = ?cap,
                        "HTTP connection cap reached: connections refused");
                }
                busy(&stream, text);
                continue;
            }
        };
        let sh = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("{name}-conn"))
            .stack_size(CONN_STACK)
            .spawn(move || connection(&sh, id, stream, peer, now));
        if let Err(e) = spawned {
            shared.registry().finish(id);
            tracing::warn!(server = %name, error = %e, "cannot start an HTTP connection thread");
        }
    }
}

/// A 503 written without waiting (the socket's send buffer is empty), then close.
fn busy(stream: &TcpStream, text: &str) {
    let resp = HttpResponse::text(503, text).with_header("Retry-After", "1");
    let _ = write_response(stream, &resp, Instant::now() + BUSY_WRITE);
    let _ = stream.shutdown(Shutdown::Write);
    // Drop what the peer already sent, without waiting: closing with unread bytes
    // would reset the connection, and a reset can lose the answer.
    if stream.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        for _ in 0..16 {
            if !matches!((&mut &*stream).read(&mut buf), Ok(n) if n > 0) {
                break;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cap {
    PerAddr,
    Global,
}

struct Admitted {
    outcome: Result<u64, Cap>,
    evicted: usize,
}

struct Conn {
    ip: IpAddr,
    since: Instant,
    /// A handle on the socket while the head is being read (to evict it).
    pending: Option<TcpStream>,
    /// Closed to make room: its slot is already free.
    evicted: bool,
}

/// The open connections, by address and state.
#[derive(Default)]
struct Registry {
    next_id: u64,
    conns: HashMap<u64, Conn>,
    /// Connections holding a slot (not evicted), per address and in all.
    per_ip: HashMap<IpAddr, usize>,
    held: usize,
}

impl Registry {
    fn admit(&mut self, ip: IpAddr, handle: TcpStream, now: Instant, l: &Limits) -> Admitted {
        let mut evicted = 0;
        let outcome = self.make_room(ip, l, &mut evicted).map(|()| {
            self.next_id += 1;
            let id = self.next_id;
            self.conns.insert(
                id,
                Conn {
                    ip,
                    since: now,
                    pending: Some(handle),
                    evicted: false,
                },
            );
            self.held += 1;
            *self.per_ip.entry(ip).or_default() += 1;
            id
        });
        Admitted { outcome, evicted }
    }

    fn make_room(&mut self, ip: IpAddr, l: &Limits, evicted: &mut usize) -> Result<(), Cap> {
        // Threads of evicted connections finish within BUSY_WRITE; never more than this.
        if self.conns.len() >= 2 * l.max_connections {
            return Err(Cap::Global);
        }
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= l.max_per_addr {
            if !self.evict(|c, _| c.ip == ip) {
                return Err(Cap::PerAddr);
            }
            *evicted += 1;
        }
        if self.held >= l.max_connections {
            // The oldest pending connection of the address holding the most.
            let per_ip = &self.per_ip;
            let heaviest = self
                .conns
                .values()
                .filter(|c| c.pending.is_some())
                .map(|c| per_ip.get(&c.ip).copied().unwrap_or(0))
                .max();
            let Some(heaviest) = heaviest else {
                return Err(Cap::Global);
            };
            if !self.evict(|_, w| w == heaviest) {
                return Err(Cap::Global);
            }
            *evicted += 1;
        }
        Ok(())
    }

    /// Evict the oldest pending connection that `pick` accepts (given the connection
    /// and its address's count): its reader wakes up, answers 503 and closes.
    fn evict(&mut self, pick: impl Fn(&Conn, usize) -> bool) -> bool {
        let per_ip = &self.per_ip;
        let victim = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.pending.is_some() && pick(c, per_ip.get(&c.ip).copied().unwrap_or(0))
            })
            .min_by_key(|(id, c)| (c.since, **id))
            .map(|(id, _)| *id);
        let Some(c) = victim.and_then(|id| self.conns.get_mut(&id)) else {
            return false;
        };
        if let Some(s) = c.pending.take() {
            // Wakes the thread blocked reading the head.
            let _ = s.shutdown(Shutdown::Read);
        }
        c.evicted = true;
        let ip = c.ip;
        self.release(ip);
        true
    }

    fn release(&mut self, ip: IpAddr) {
        self.held = self.held.saturating_sub(1);
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// The head is read: the connection can no longer be evicted. False if it was.
    fn start_active(&mut self, id: u64) -> bool {
        match self.conns.get_mut(&id) {
            Some(c) if !c.evicted => {
                c.pending = None;
                true
            }
            _ => false,
        }
    }

    fn finish(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            if !c.evicted {
                self.release(c.ip);
            }
        }
    }
}

/// Removes the connection from the registry however its thread ends.
struct Finish<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.shared.registry().finish(self.id);
    }
}

fn connection(shared: &Shared, id: u64, stream: TcpStream, peer: SocketAddr, accepted: Instant) {
    let _finish = Finish { shared, id };
    let limits = &shared.limits;
    let stats = &shared.stats;
    let _ = stream.set_nodelay(true);
    let head = read_request(
        &mut DeadlineReader {
            stream: &stream,
            deadline: accepted + limits.head_deadline,
        },
        limits,
        peer,
    );
    if !shared.registry().start_active(id) {
        busy(&stream, "server busy: too many connections\n");
        return;
    }
    let reply = match head {
        Ok(req) => {
            bump(&stats.requests);
            shared.router.dispatch(&req)
        }
        Err(HeadError::Closed | HeadError::Io(_)) => return,
        Err(e) => {
            let counter = match e {
                HeadError::TooLarge(_) | HeadError::BodyTooLarge(_) => &stats.too_large,
                HeadError::Timeout => &stats.head_timeouts,
                _ => &stats.bad_requests,
            };
            bump(counter);
            tracing::debug!(server = %stats.name(), %peer, error = %e, "bad HTTP request");
            Reply::Full(HttpResponse::text(e.status(), format!("{e}\n")))
        }
    };
    match reply {
        Reply::Full(resp) => {
            if resp.status == 403 {
                bump(&stats.forbidden);
            }
            let deadline = Instant::now() + limits.write_timeout;
            if write_response(&stream, &resp, deadline).is_ok() {
                linger_close(&stream);
            }
        }
        Reply::Stream(f) => {
            let Ok(s) = stream.try_clone() else { return };
            let conn = StreamConn {
                stream: s,
                write_timeout: limits.write_timeout,
            };
            match f(conn) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::TimedOut => {
                    bump(&stats.slow_readers);
                    tracing::debug!(server = %stats.name(), %peer, error = %e, "slow HTTP reader dropped");
                }
                Err(e) => {
                    tracing::debug!(server = %stats.name(), %peer, error = %e, "HTTP stream ended")
                }
            }
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Close after an answer without losing it: stop writing, then read and drop what the
/// peer still sends, a bounded amount for a bounded time.
fn linger_close(stream: &TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let mut r = DeadlineReader {
        stream,
        deadline: Instant::now() + LINGER_TIME,
    };
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < LINGER_BYTES {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

/// Reads from a socket until a deadline for all the reads together.
struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
            match (&mut &*self.stream).read(buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return Err(ErrorKind::TimedOut.into())
                }
                other => return other,
            }
        }
    }
}

fn write_all_by(stream: &TcpStream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                "the reader did not take the data in time",
            ));
        }
        stream.set_write_timeout(Some(left))?;
        match (&mut &*stream).write(buf) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => buf = buf.get(n..).unwrap_or(&[]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    "the reader did not take the data in time",
                ))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

const COMMON_HEADERS: &str =
    "Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n";

/// A header value without CR or LF (no header injection from a value).
fn header_value(v: &str) -> String {
    v.chars().filter(|c| *c != '\r' && *c != '\n').collect()
}

fn write_response(stream: &TcpStream, resp: &HttpResponse, deadline: Instant) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        let _ = write!(head, "{}: {}\r\n", header_value(k), header_value(v));
    }
    let _ = write!(
        head,
        "Content-Length: {}\r\n{COMMON_HEADERS}\r\n",
        resp.body.len()
    );
    write_all_by(stream, head.as_bytes(), deadline)?;
    write_all_by(stream, &resp.body, deadline)
}

/// The reason phrase of `status`.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        303 => "See Other",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Why a request could not be read.
#[derive(Debug)]
enum HeadError {
    /// The peer closed (or was evicted) before sending anything.
    Closed,
    /// The peer closed in the middle of its request.
    Cut,
    /// Not complete by the deadline.
    Timeout,
    /// The head is over a cap (what was over it).
    TooLarge(String),
    /// The body is longer than the cap (its length).
    BodyTooLarge(usize),
    /// Not HTTP/1.x as `httparse` reads it, or a bad length.
    Bad(String),
    /// Valid but not supported here.
    Unsupported(&'static str),
    /// A read failed (reset).
    Io(io::Error),
}

impl HeadError {
    fn status(&self) -> u16 {
        match self {
            HeadError::Timeout => 408,
            HeadError::TooLarge(_) => 431,
            HeadError::BodyTooLarge(_) => 413,
            HeadError::Unsupported(_) => 501,
            _ => 400,
        }
    }
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::Closed => write!(f, "connection closed before a request"),
            HeadError::Cut => write!(f, "connection closed in the middle of the request"),
            HeadError::Timeout => write!(f, "request not complete in time"),
            HeadError::TooLarge(what) => write!(f, "request head too large: {what}"),
            HeadError::BodyTooLarge(n) => write!(f, "request body too large: {n} bytes"),
            HeadError::Bad(why) => write!(f, "bad request: {why}"),
            HeadError::Unsupported(what) => write!(f, "not supported: {what}"),
            HeadError::Io(e) => write!(f, "read failed: {e}"),
        }
    }
}

fn read_err(e: io::Error) -> HeadError {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => HeadError::Timeout,
        _ => HeadError::Io(e),
    }
}

/// Parse one request (head and body) from `bytes` within `limits`, as a connection
/// would read it: `Err` (with the status it would be answered with, and why) for
/// anything malformed, too large, cut short or unsupported. Never panics; what the
/// fuzz target `http_head` checks.
pub fn parse_request(bytes: &[u8], limits: &Limits) -> Result<HttpRequest, (u16, String)> {
    let peer = SocketAddr::from(([127, 0, 0, 1], 0));
    read_request(&mut &bytes[..], limits, peer).map_err(|e| (e.status(), e.to_string()))
}

/// Read one request from `r`: never more than `max_head` bytes of head, then the body.
fn read_request(r: &mut impl Read, l: &Limits, peer: SocketAddr) -> Result<HttpRequest, HeadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024.min(l.max_head));
    let mut chunk = [0u8; 2048];
    loop {
        let room = l.max_head.saturating_sub(buf.len());
        if room == 0 {
            return Err(HeadError::TooLarge(format!("over {} bytes", l.max_head)));
        }
        let want = room.min(chunk.len());
        let n = r
            .read(chunk.get_mut(..want).unwrap_or(&mut []))
            .map_err(read_err)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Cut
            });
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        let mut headers = vec![httparse::EMPTY_HEADER; l.max_headers];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(len)) => {
                let mut req = head_of(&parsed, peer)?;
                let body_len = body_length(&req)?;
                if body_len > l.max_body {
                    return Err(HeadError::BodyTooLarge(body_len));
                }
                let mut body = buf.get(len..).unwrap_or(&[]).to_vec();
                body.truncate(body_len);
                while body.len() < body_len {
                    let want = (body_len - body.len()).min(chunk.len());
                    let n = r
                        .read(chunk.get_mut(..want).unwrap_or(&mut []))
                        .map_err(read_err)?;
                    if n == 0 {
                        return Err(HeadError::Cut);
                    }
                    body.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
                }
                req.body = body;
                return Ok(req);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(HeadError::TooLarge(format!(
                    "more than {} headers",
                    l.max_headers
                )))
            }
            Err(e) => return Err(HeadError::Bad(e.to_string())),
        }
    }
}

fn head_of(p: &httparse::Request<'_, '_>, peer: SocketAddr) -> Result<HttpRequest, HeadError> {
    let (Some(method), Some(target)) = (p.method, p.path) else {
        return Err(HeadError::Bad("incomplete request line".into()));
    };
    if !target.starts_with('/') {
        return Err(HeadError::Bad(format!(
            "request target {} is not a path",
            untrusted(target)
        )));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(HttpRequest {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers: p
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: Vec::new(),
        peer,
    })
}

fn body_length(req: &HttpRequest) -> Result<usize, HeadError> {
    if req.header("transfer-encoding").is_some() {
        return Err(HeadError::Unsupported(
            "Transfer-Encoding (send Content-Length)",
        ));
    }
    let mut len: Option<usize> = None;
    for (_, v) in req.headers.iter().filter(|(k, _)| k == "content-length") {
        let n = v
            .trim()
            .parse::<usize>()
            .map_err(|_| HeadError::Bad(format!("Content-Length {}", untrusted(v))))?;
        if len.is_some_and(|l| l != n) {
            return Err(HeadError::Bad("conflicting Content-Length headers".into()));
        }
        len = Some(n);
    }
    Ok(len.unwrap_or(0))
}

/// Decode `application/x-www-form-urlencoded` text (`+` is a space, `%XX` a byte; a
/// bad escape is kept as it is).
pub fn url_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(c),
                }
            }
            _ => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `s` escaped for HTML text and quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `v` as JSON that is safe inside an HTML `<script>` element: no `<`, `>` or `&`
/// (so no `</script>` or `<!--`), and no U+2028/U+2029 line separators.
pub fn json_for_script(v: &impl Serialize) -> String {
    let json = serde_json::to_string(v).unwrap_or_else(|_| "null".into());
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            // Outside strings JSON has none of these, so escaping them keeps it valid.
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// Whether a state-changing request may be acted on: sent by a page of this very server,
/// or by a program that is not a browser.
///
/// - With an `Origin` header (every browser sends one on a cross-origin `POST`, and
///   `null` from opaque origins), it must be `http://` + the `Host` header.
/// - Else with a `Referer`, its scheme and authority must be that.
/// - With neither, the request does not come from a browser (curl, a script): allowed,
///   since a page cannot make a browser send a cross-origin `POST` without them.
/// - The `Host` must be an IP address or `localhost` (with any port): a page of another
///   name that resolves to this server (DNS rebinding) is its own origin, so it is
///   refused.
pub fn check_same_origin(req: &HttpRequest) -> Result<(), String> {
    let origin = match (req.header("origin"), req.header("referer")) {
        (Some(o), _) => o.trim().to_string(),
        (None, Some(r)) => {
            origin_of(r.trim()).ok_or_else(|| format!("malformed Referer {}", untrusted(r)))?
        }
        (None, None) => return Ok(()),
    };
    let host = req
        .header("host")
        .map(str::trim)
        .ok_or("a request with an Origin but no Host")?;
    if !host_is_address(host) {
        return Err(format!(
            "Host {} is neither an IP address nor localhost",
            untrusted(host)
        ));
    }
    if !origin.eq_ignore_ascii_case(&format!("http://{host}")) {
        return Err(format!(
            "cross-origin request: Origin {} is not http://{}",
            untrusted(&origin),
            untrusted(host)
        ));
    }
    Ok(())
}

/// `scheme://authority` of a URL.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = rest.get(..end)?;
    (!scheme.is_empty() && !authority.is_empty()).then(|| format!("{scheme}://{authority}"))
}

/// Whether a `Host` header names an IP address or localhost (port optional).
pub fn host_is_address(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || is_port(port.strip_prefix(':')) => v6,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(Some(port)) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.parse::<IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost")
}

fn is_port(p: Option<&str>) -> bool {
    p.is_some_and(|p| p.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4242))
    }

    fn parse(text: &[u8]) -> Result<HttpRequest, HeadError> {
        read_request(&mut &text[..], &limits(), peer())
    }

    /// A reader of an endless header line that counts what was taken from it.
    struct Endless {
        taken: usize,
    }

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let head = b"GET / HTTP/1.1\r\nX-Big: ";
            for (i, b) in buf.iter_mut().enumerate() {
                *b = head.get(self.taken + i).copied().unwrap_or(b'a');
            }
            self.taken += buf.len();
            Ok(buf.len())
        }
    }

    #[test]
    fn test_a_request_with_a_body() {
        let r =
            parse(b"POST /switch?x=1 HTTP/1.1\r\nHost: a:1\r\nContent-Length: 9\r\n\r\nstream=ab")
                .expect("valid");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/switch"));
        assert_eq!(r.query, "x=1");
        assert_eq!(r.header("HOST"), Some("a:1"));
        assert_eq!(r.body, b"stream=ab");
        assert_eq!(
            HttpRequest::form_value("a=1&stream=x%2By+z", "stream").as_deref(),
            Some("x+y z")
        );
        let r = parse(b"GET / HTTP/1.0\r\n\r\n").expect("HTTP/1.0 without Host");
        assert!(r.headers.is_empty() && r.body.is_empty());
    }

    #[test]
    fn test_an_endless_header_is_refused_after_max_head_bytes() {
        let mut r = Endless { taken: 0 };
        let e = read_request(&mut r, &limits(), peer()).expect_err("too large");
        assert_eq!(e.status(), 431, "{e}");
        assert_eq!(r.taken, limits().max_head, "read exactly up to the cap");
    }

    #[test]
    fn test_malformed_and_unsupported_requests() {
        for (text, status) in [
            (&b"GARBAGE\r\n\r\n"[..], 400),
            (b"GET http://x/ HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                400,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
            (b"GET / HTTP/1.1\r\nHost: a\r\n", 400),
        ] {
            let e = parse(text).expect_err("refused");
            assert_eq!(e.status(), status, "{}: {e}", String::from_utf8_lossy(text));
        }
        assert!(matches!(parse(b""), Err(HeadError::Closed)));
        let many: String = (0..40).map(|i| format!("H{i}: v\r\n")).collect();
        let e = parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).expect_err("too many");
        assert_eq!(e.status(), 431, "{e}");
    }

    fn req(headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            method: "POST".into(),
            path: "/switch".into(),
            query: String::new(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect(),
            body: Vec::new(),
            peer: peer(),
        }
    }

    #[test]
    fn test_same_origin() {
        let host = ("Host", "127.0.0.1:8000");
        assert!(check_same_origin(&req(&[host])).is_ok(), "not a browser");
        assert!(check_same_origin(&req(&[host, ("Origin", "http://127.0.0.1:8000")])).is_ok());
        assert!(check_same_origin(&req(&[host, ("Referer", "http://127.0.0.1:8000/?x")])).is_ok());
        assert!(check_same_origin(&req(&[
            ("Host", "localhost:8000"),
            ("Origin", "http://localhost:8000")
        ]))
        .is_ok());
        assert!(check_same_origin(&req(&[
            ("Host", "[::1]:8000"),
            ("Origin", "http://[::1]:8000")
        ]))
        .is_ok());
        for bad in [
            vec![host, ("Origin", "http://evil.example")],
            vec![host, ("Origin", "null")],
            vec![host, ("Origin", "http://127.0.0.1:8001")],
            vec![host, ("Referer", "http://evil.example/page")],
            vec![host, ("Referer", "garbage")],
            vec![("Origin", "http://127.0.0.1:8000")],
            // DNS rebinding: the attacker's name is the page's origin and the Host.
            vec![
                ("Host", "rebind.example:8000"),
                ("Origin", "http://rebind.example:8000"),
            ],
        ] {
            assert!(check_same_origin(&req(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_escapes() {
        assert_eq!(
            escape_html("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let name = "</script><script>alert(1)</script>\u{2028}";
        let js = json_for_script(&name);
        assert!(!js.contains('<') && !js.contains('>') && !js.contains('\u{2028}'));
        let back: String = serde_json::from_str(&js).expect("still JSON");
        assert_eq!(back, name);
        assert_eq!(url_decode("a+b%20c%2Fd%zz"), "a b c/d%zz");
        assert_eq!(url_decode("%"), "%");
        assert_eq!(header_value("a\r\nSet-Cookie: x"), "aSet-Cookie: x");
    }

    #[test]
    fn test_router() {
        let r = Router::new()
            .get("/a", |_| HttpResponse::text(200, "a").into())
            .post("/b", |_| HttpResponse::text(200, "b").into());
        let mut q = req(&[]);
        let status = |reply: Reply| match reply {
            Reply::Full(r) => (r.status, r.headers),
            Reply::Stream(_) => (0, Vec::new()),
        };
        q.method = "GET".into();
        q.path = "/b".into();
        let (s, h) = status(r.dispatch(&q));
        assert_eq!(s, 405);
        assert!(h.contains(&("Allow".into(), "POST".into())));
        q.path = "/zz".into();
        assert_eq!(status(r.dispatch(&q)).0, 404);
        q.path = "/a".into();
        assert_eq!(status(r.dispatch(&q)).0, 200);
        let r = Router::new()
            .get("/w/x", |_| HttpResponse::text(201, "exact").into())
            .get_under("/w/", |_| HttpResponse::text(200, "under").into());
        for (path, want) in [("/w/x", 201), ("/w/y/z", 200), ("/w/", 200), ("/w", 404)] {
            q.path = path.into();
            assert_eq!(status(r.dispatch(&q)).0, want, "{path}");
        }
    }

    #[test]
    fn test_registry_evicts_the_oldest_pending_of_the_heaviest_address() {
        let l = Limits {
            max_connections: 3,
            max_per_addr: 2,
            ..Limits::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handle = || TcpStream::connect(addr).expect("connect");
        let (a, b) = (IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3]));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut reg = Registry::default();
        let a1 = reg.admit(a, handle(), at(0), &l).outcome.expect("room");
        let a2 = reg.admit(a, handle(), at(1), &l).outcome.expect("room");
        // Per address: a's third evicts a's oldest.
        let got = reg.admit(a, handle(), at(2), &l);
        assert_eq!(got.evicted, 1);
        assert!(reg.conns.get(&a1).is_some_and(|c| c.evicted));
        let a3 = got.outcome.expect("room");
        let b1 = reg.admit(b, handle(), at(3), &l).outcome.expect("room");
        // Global: c's first evicts the oldest of a (the heaviest), not b's older one.
        let c = IpAddr::from([127, 0, 0, 4]);
        let got = reg.admit(c, handle(), at(4), &l);
        assert_eq!(got.evicted, 1);
        let c1 = got.outcome.expect("room");
        assert!(reg.conns.get(&a2).is_some_and(|c| c.evicted));
        assert!(reg.conns.get(&b1).is_some_and(|c| !c.evicted));
        assert_eq!((reg.held, reg.per_ip.get(&a).copied()), (3, Some(1)));
        // Once past their head, connections are not evicted: refused.
        for id in [a3, b1, c1] {
            assert!(reg.start_active(id));
        }
        assert!(matches!(
            reg.admit(a, handle(), at(5), &l).outcome,
            Err(Cap::Global)
        ));
        reg.finish(c1);
        let a4 = reg.admit(a, handle(), at(6), &l).outcome.expect("room");
        assert!(reg.start_active(a4));
        assert!(matches!(
            reg.admit(a, handle(), at(7), &l).outcome,
            Err(Cap::PerAddr)
        ));
        assert!(!reg.start_active(a1), "an evicted connection stays evicted");
        for id in [a1, a2, a3, a4, b1] {
            reg.finish(id);
        }
        assert_eq!((reg.held, reg.per_ip.len(), reg.conns.len()), (0, 0, 0));
    }
}
