//! The client side: ask the bootstrapper for an assignment.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use ott_proto::auth::OverlayKey;

use crate::keyed::{open_response, seal_request, AnyResponse};
use crate::{read_frame_body, write_frame, Assignment, BootstrapError, Request, Response};

/// How long [`request_until`] waits between attempts.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// Longest single attempt of [`request_until`].
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// First connection timeout of [`request_until`]; it doubles after every
/// [`TIMEOUTS_PER_STEP`] attempts that timed out, up to [`ATTEMPT_TIMEOUT`]. A lost SYN
/// is then sent again by a new attempt within about 700 ms, instead of by the kernel
/// after 1, 3 and 7 s (on a lossy path three lost SYNs in a row kept a viewer from
/// starting for over ten seconds).
const FIRST_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Connection attempts that time out at one timeout before it doubles: a lost SYN or
/// SYN-ACK is far likelier than a round trip of over half a second, and with the
/// timeout doubled at each loss, three losses on a path that loses a fifth of its
/// packets each way kept a viewer from starting for 8 s (0.5 + 1 + 2 + 4 s).
const TIMEOUTS_PER_STEP: u32 = 3;
/// Longest wait between attempts while the bootstrapper says it is busy: the wait
/// doubles from [`RETRY_INTERVAL`] up to this, so that a crowd of programs started at
/// once does not keep it busy.
const BUSY_RETRY_MAX: Duration = Duration::from_millis(1600);

/// How a refusal's reason starts when the bootstrapper has too many connections open
/// (`Service::serve`): the only refusal worth asking again, later.
pub(crate) const BUSY_REASON: &str = "bootstrapper busy";

/// Whether a refusal's `reason` says the bootstrapper is busy (asking again later may
/// succeed), as opposed to a refusal of the request itself (an unknown id).
fn is_busy(reason: &str) -> bool {
    reason.starts_with(BUSY_REASON)
}

/// Asks the bootstrapper at `addr` once; `timeout` bounds the connection and each read
/// and write.
///
/// A refusal is [`BootstrapError::Refused`] with the bootstrapper's reason.
pub fn request(
    addr: SocketAddr,
    req: &Request,
    timeout: Duration,
) -> Result<Assignment, BootstrapError> {
    request_keyed(addr, req, None, timeout)
}

/// [`request`] with the overlay key: the request is tagged, and only an answer tagged
/// for it is accepted ([`BootstrapError::Auth`] otherwise; a refusal is passed on). With
/// `None`, a plain request as [`request`] sends.
pub fn request_keyed(
    addr: SocketAddr,
    req: &Request,
    key: Option<&OverlayKey>,
    timeout: Duration,
) -> Result<Assignment, BootstrapError> {
    request_timed(addr, req, key, timeout, timeout)
}

/// [`request_keyed`] with its own timeout for the connection.
fn request_timed(
    addr: SocketAddr,
    req: &Request,
    key: Option<&OverlayKey>,
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<Assignment, BootstrapError> {
    // A zero timeout is refused by the standard library; take it as "as short as can be".
    let timeout = timeout.max(Duration::from_millis(1));
    let connect_timeout = connect_timeout.max(Duration::from_millis(1));
    let mut stream = TcpStream::connect_timeout(&addr, connect_timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let _ = stream.set_nodelay(true);
    let (frame, nonce) = seal_request(key, req)?;
    write_frame(&mut stream, &frame)?;
    let answer = AnyResponse::decode(&read_frame_body(&mut stream)?)?;
    match open_response(key, nonce.as_ref(), answer)? {
        Response::Assigned(a) => Ok(a),
        Response::Refused { reason } => Err(BootstrapError::Refused(reason)),
    }
}

/// Like [`request`], but retries until `deadline` while asking again may succeed: I/O
/// failures (nobody listening yet, connection reset, timeout) every [`RETRY_INTERVAL`],
/// because the bootstrapper may start after the node, and refusals because it is busy
/// (too many connections open) with a wait that doubles up to 1.6 s. An attempt left
/// without an answer for 400 ms gets another one beside it (up to three at once; the
/// first answer wins), so a segment lost on a lossy path costs a fraction of a second,
/// not TCP's retransmission timeout. Other refusals
/// (an unknown id) and malformed answers are returned at once. When the deadline
/// passes, the last error is returned (the busy refusal, or the I/O error).
pub fn request_until(
    addr: SocketAddr,
    req: &Request,
    deadline: Instant,
) -> Result<Assignment, BootstrapError> {
    request_until_keyed(addr, req, None, deadline)
}

/// [`request_until`] with the overlay key (see [`request_keyed`]).
pub fn request_until_keyed(
    addr: SocketAddr,
    req: &Request,
    key: Option<&OverlayKey>,
    deadline: Instant,
) -> Result<Assignment, BootstrapError> {
    // Say what to do while waiting, after 1 s, then less and less often.
    let mut next_hint = Instant::now() + HINT_FIRST;
    let mut gap = HINT_FIRST * 2;
    request_until_with(addr, req, key, deadline, |e| {
        let now = Instant::now();
        if now < next_hint {
            return;
        }
        let left = deadline.saturating_duration_since(now).as_secs();
        match e {
            BootstrapError::Io(_) => {
                info!("no bootstrapper at {addr}: is ott-bootstrap running? (still trying for {left} s)")
            }
            _ => info!("the bootstrapper at {addr} is busy (still trying for {left} s)"),
        }
        next_hint = now + gap;
        gap = (gap * 2).min(HINT_MAX);
    })
}

/// The connection timeout of [`request_until`] after `timeouts` attempts that timed
/// out: [`FIRST_CONNECT_TIMEOUT`], doubled every [`TIMEOUTS_PER_STEP`] of them, at most
/// [`ATTEMPT_TIMEOUT`].
fn connect_timeout(timeouts: u32) -> Duration {
    let doublings = (timeouts / TIMEOUTS_PER_STEP).min(8);
    (FIRST_CONNECT_TIMEOUT * (1u32 << doublings)).min(ATTEMPT_TIMEOUT)
}

/// When [`request_until_keyed`] first says what to do while nobody answers.
const HINT_FIRST: Duration = Duration::from_secs(1);
/// Longest gap between two such hints (the gap doubles up to it).
const HINT_MAX: Duration = Duration::from_secs(30);

/// While an attempt of [`request_until`] has had no answer for this long, another one
/// starts beside it (up to [`MAX_PENDING`] at once). On a lossy path an attempt can
/// hang for seconds on a lost segment (a SYN-ACK the server sends again only after
/// 1 s, a request or an answer TCP sends again after its retransmission timeout, which
/// starts at 1 s): with one attempt at a time, lost SYNs and segments in a row kept a
/// viewer from starting for 6 s of a 10-s emulation at 5 % loss per link.
const OVERLAP_AFTER: Duration = Duration::from_millis(400);
/// Most attempts of [`request_until`] pending at once.
const MAX_PENDING: usize = 3;

/// [`request_until_keyed`], calling `on_retry` with each error it is about to retry.
///
/// Each attempt runs on a thread of its own and reports on a channel, so that a new
/// one can start while an earlier one still waits ([`OVERLAP_AFTER`]); the first
/// answer wins, and attempts still pending then end on their own timeouts (their
/// answers are dropped). A busy refusal stops new attempts for the busy wait.
fn request_until_with(
    addr: SocketAddr,
    req: &Request,
    key: Option<&OverlayKey>,
    deadline: Instant,
    mut on_retry: impl FnMut(&BootstrapError),
) -> Result<Assignment, BootstrapError> {
    let (tx, rx) = mpsc::channel::<Result<Assignment, BootstrapError>>();
    let mut last: Option<BootstrapError> = None;
    let mut busy_wait = RETRY_INTERVAL;
    let mut timeouts = 0u32;
    let mut pending = 0usize;
    let mut next_start = Instant::now();
    loop {
        let now = Instant::now();
        let remaining = deadline.saturating_duration_since(now);
        if remaining.is_zero() {
            return Err(last.unwrap_or_else(|| {
                BootstrapError::Io(io::Error::new(
                    ErrorKind::TimedOut,
                    "no answer before the deadline",
                ))
            }));
        }
        if pending < MAX_PENDING && now >= next_start {
            let attempt = remaining.min(ATTEMPT_TIMEOUT);
            let connect = connect_timeout(timeouts).min(attempt);
            let (req_t, key_t, tx_t) = (req.clone(), key.cloned(), tx.clone());
            let spawned = thread::Builder::new()
                .name("bootstrap-attempt".into())
                .spawn(move || {
                    let r = request_timed(addr, &req_t, key_t.as_ref(), connect, attempt);
                    // The receiver is gone once an earlier attempt was answered.
                    let _ = tx_t.send(r);
                });
            if spawned.is_err() {
                // No thread to be had: make this attempt here, alone.
                let _ = tx.send(request_timed(addr, req, key, connect, attempt));
            }
            pending += 1;
            next_start = now + OVERLAP_AFTER;
        }
        let wait = next_start
            .min(deadline)
            .saturating_duration_since(Instant::now());
        let result = if pending == MAX_PENDING {
            rx.recv_timeout(remaining)
        } else {
            rx.recv_timeout(wait)
        };
        // Nothing yet: time to start another attempt (or the deadline passed).
        let Ok(result) = result else {
            continue;
        };
        pending = pending.saturating_sub(1);
        match result {
            Err(BootstrapError::Io(e)) => {
                debug!(%addr, error = %e, "bootstrapper not reachable yet, retrying");
                if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock {
                    timeouts = timeouts.saturating_add(1);
                }
                // Nobody listening answers at once: ask again after the retry interval,
                // not in a tight loop.
                next_start = next_start.min(Instant::now() + RETRY_INTERVAL);
                last = Some(BootstrapError::Io(e));
            }
            Err(BootstrapError::Refused(reason)) if is_busy(&reason) => {
                info!(%addr, %reason, retry_in = ?busy_wait, "bootstrapper busy, retrying");
                next_start = Instant::now() + busy_wait;
                busy_wait = (busy_wait * 2).min(BUSY_RETRY_MAX);
                last = Some(BootstrapError::Refused(reason));
            }
            other => return other,
        }
        if let Some(e) = &last {
            on_retry(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};

    use ott_overlay::{AddressPlan, Role, Topology};

    use super::*;
    use crate::Service;

    const TOPO: &str = r#"
name = "tiny"
bootstrapper = "s1"
[[node]]
id = "s1"
role = "server"
[[node]]
id = "p1"
role = "pop"
[[node]]
id = "c1"
role = "client"
[[link]]
ends = ["s1", "p1"]
[[link]]
ends = ["p1", "c1"]
"#;

    /// Generous bound for a wait in a test; never reached when things work.
    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// A bootstrapper on 127.0.0.1 that refuses every request as busy while `busy` is
    /// set (as the real service does when connections pile up faster than they close)
    /// and answers with the real [`Service::answer`] otherwise. Stopped on drop.
    struct Busy {
        addr: SocketAddr,
        busy: Arc<AtomicBool>,
        stop: Arc<AtomicBool>,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Busy {
        fn start() -> Self {
            let t = Topology::parse(TOPO, "tiny.toml").expect("valid");
            let service = Service::new(t, AddressPlan::Loopback);
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            let addr = listener.local_addr().expect("bound");
            let stop = Arc::new(AtomicBool::new(false));
            let busy = Arc::new(AtomicBool::new(true));
            let (stop_t, busy_t) = (Arc::clone(&stop), Arc::clone(&busy));
            let thread = Some(thread::spawn(move || {
                while !stop_t.load(Ordering::Acquire) {
                    let Ok((mut conn, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(TEST_TIMEOUT));
                    let Ok(req) = crate::wire::read_frame::<_, Request>(&mut conn) else {
                        continue;
                    };
                    let answer = if busy_t.load(Ordering::Acquire) {
                        Response::Refused {
                            reason: format!("{BUSY_REASON}: test, retry later"),
                        }
                    } else {
                        service.answer(&req)
                    };
                    let _ = crate::wire::write_frame(&mut conn, &answer);
                }
            }));
            Self {
                addr,
                busy,
                stop,
                thread,
            }
        }
    }

    impl Drop for Busy {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    #[test]
    fn a_lost_syn_is_sent_again_soon_and_the_timeout_grows_slowly() {
        let ms = Duration::from_millis;
        let got: Vec<Duration> = [0, 1, 2, 3, 5, 6, 9, 12, u32::MAX]
            .iter()
            .map(|t| connect_timeout(*t))
            .collect();
        assert_eq!(
            got,
            [
                ms(500),
                ms(500),
                ms(500),
                ms(1000),
                ms(1000),
                ms(2000),
                ms(4000),
                ATTEMPT_TIMEOUT,
                ATTEMPT_TIMEOUT
            ]
        );
    }

    #[test]
    fn a_busy_refusal_is_recognised() {
        assert!(is_busy(
            "bootstrapper busy: 256 connections already open, retry later"
        ));
        assert!(!is_busy(
            "unknown node id \"busy\" (topology t has: s1, p1)"
        ));
    }

    // The client exited at once (status 2) when the bootstrapper said it was busy.
    #[test]
    fn request_until_retries_while_the_bootstrapper_is_busy() {
        let busy = Busy::start();
        let addr = busy.addr;
        let (tx, rx) = mpsc::channel::<String>();
        let asker = thread::spawn(move || {
            request_until_with(
                addr,
                &Request::Client {
                    id: Some("c1".into()),
                },
                None,
                Instant::now() + TEST_TIMEOUT,
                |e| {
                    let _ = tx.send(e.to_string());
                },
            )
        });
        // Wait until it has been told "busy" once and is waiting to ask again...
        let first = rx.recv_timeout(TEST_TIMEOUT).expect("a retry");
        assert!(first.contains(BUSY_REASON), "{first}");
        // ...then make room: the next attempt gets through.
        busy.busy.store(false, Ordering::Release);
        let a = asker
            .join()
            .expect("no panic")
            .expect("assigned once the bootstrapper has room");
        assert_eq!(a.role, Role::Client);
        assert_eq!(a.pops.len(), 1);
    }

    #[test]
    fn a_bootstrapper_busy_until_the_deadline_gives_its_busy_refusal() {
        let busy = Busy::start();
        let mut retries = 0;
        let err = request_until_with(
            busy.addr,
            &Request::Node { id: "p1".into() },
            None,
            Instant::now() + Duration::from_millis(700),
            |_| retries += 1,
        )
        .expect_err("busy all along");
        assert!(
            matches!(&err, BootstrapError::Refused(r) if r.starts_with(BUSY_REASON)),
            "{err}"
        );
        assert!(retries >= 2, "retried {retries} times");
    }

    // At 5 % loss per link a viewer's first bootstrap attempts hung on lost segments
    // and it started 6 s late: an attempt that hangs must not hold up the next one.
    #[test]
    fn an_attempt_that_hangs_does_not_hold_up_the_next() {
        let t = Topology::parse(TOPO, "tiny.toml").expect("valid");
        let service = Service::new(t, AddressPlan::Loopback);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("bound");
        let (held_tx, held_rx) = mpsc::channel::<TcpStream>();
        let server = thread::spawn(move || {
            // The first connection is accepted and never answered (as when its request
            // or the answer is lost); it stays open until the test ends. The next one
            // is answered.
            let Ok((first, _)) = listener.accept() else {
                return;
            };
            let _ = held_tx.send(first);
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            let _ = conn.set_read_timeout(Some(TEST_TIMEOUT));
            if let Ok(req) = crate::wire::read_frame::<_, Request>(&mut conn) {
                let _ = crate::wire::write_frame(&mut conn, &service.answer(&req));
            }
        });
        // The deadline is shorter than an attempt's read timeout: with one attempt at
        // a time, the hanging one would use it all up.
        let deadline = Instant::now() + Duration::from_secs(4);
        let got = request_until_with(
            addr,
            &Request::Client {
                id: Some("c1".into()),
            },
            None,
            deadline,
            |_| {},
        );
        let held = held_rx
            .recv_timeout(TEST_TIMEOUT)
            .expect("first connection");
        let a = got.expect("assigned by the second attempt while the first hangs");
        assert_eq!(a.role, Role::Client);
        drop(held);
        server.join().expect("no panic");
    }

    #[test]
    fn an_unknown_id_fails_at_once_without_a_retry() {
        let t = Topology::parse(TOPO, "tiny.toml").expect("valid");
        let service = Arc::new(Service::new(t, AddressPlan::Loopback));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("bound");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let server = thread::spawn(move || service.serve(listener, flag));
        let mut retries = 0;
        let err = request_until_with(
            addr,
            &Request::Node { id: "zz".into() },
            None,
            Instant::now() + TEST_TIMEOUT,
            |_| retries += 1,
        )
        .expect_err("unknown id");
        stop.store(true, Ordering::Release);
        let _ = server.join();
        assert_eq!(retries, 0);
        let msg = err.to_string();
        assert!(msg.contains("unknown node id \"zz\""), "{msg}");
    }
}
