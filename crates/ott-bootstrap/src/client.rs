//! The client side: ask the bootstrapper for an assignment.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use tracing::debug;

use ott_proto::auth::OverlayKey;

use crate::keyed::{open_response, seal_request, AnyResponse};
use crate::{read_frame_body, write_frame, Assignment, BootstrapError, Request, Response};

/// How long [`request_until`] waits between attempts.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// Longest single attempt of [`request_until`].
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

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
    // A zero timeout is refused by the standard library; take it as "as short as can be".
    let timeout = timeout.max(Duration::from_millis(1));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
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

/// Like [`request`], but retries I/O failures (nobody listening yet, connection reset,
/// timeout) every [`RETRY_INTERVAL`] until `deadline`, because the bootstrapper may
/// start after the node. Refusals and malformed answers are returned at once. When the
/// deadline passes, the last I/O error is returned.
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
    let mut last: Option<io::Error> = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(BootstrapError::Io(last.unwrap_or_else(|| {
                io::Error::new(ErrorKind::TimedOut, "deadline passed before any attempt")
            })));
        }
        match request_keyed(addr, req, key, remaining.min(ATTEMPT_TIMEOUT)) {
            Err(BootstrapError::Io(e)) => {
                debug!(%addr, error = %e, "bootstrapper not reachable yet, retrying");
                last = Some(e);
                let remaining = deadline.saturating_duration_since(Instant::now());
                thread::sleep(RETRY_INTERVAL.min(remaining));
            }
            other => return other,
        }
    }
}
