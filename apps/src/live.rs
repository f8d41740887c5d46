//! Live inputs of the server: MPEG-TS or MJPEG read from a UDP port or from standard
//! input, framed ([`ott_media::ts::TsFramer`], [`ott_media::mjpeg::MjpegFramer`]) and
//! handed to the media thread as frames.
//!
//! A live input is named on the command line as `NAME[:ts|:mjpeg]=udp://ADDR:PORT` or
//! `NAME[:ts|:mjpeg]=stdin` (MPEG-TS when no kind is given), for example
//! `--live cam=udp://127.0.0.1:5000` fed by
//! `ffmpeg -re -i in.mp4 -c:v libx264 -f mpegts udp://127.0.0.1:5000`.

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use crossbeam_channel::Sender;
use ott_media::mjpeg::MjpegFramer;
use ott_media::ts::TsFramer;
use ott_proto::{flags, MediaKind, StreamInfo};

/// Where a live input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveSource {
    /// Datagrams arriving at this UDP address (the server binds it).
    Udp(SocketAddr),
    /// The server's standard input.
    Stdin,
}

/// One `--live` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSpec {
    /// Stream name.
    pub name: String,
    /// Payload framing.
    pub kind: MediaKind,
    /// Where the bytes come from.
    pub source: LiveSource,
}

impl LiveSpec {
    /// The catalogue entry of this input (frame rate unknown: 0).
    pub fn info(&self) -> StreamInfo {
        StreamInfo::new(self.name.clone(), self.kind, 0)
    }
}

impl FromStr for LiveSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (left, src) = s.split_once('=').ok_or_else(|| {
            format!("{s:?}: expected NAME[:ts|:mjpeg]=udp://ADDR:PORT or NAME=stdin")
        })?;
        let (name, kind) = match left.rsplit_once(':') {
            Some((n, "ts")) => (n, MediaKind::Ts),
            Some((n, "mjpeg")) => (n, MediaKind::Mjpeg),
            Some((_, k)) => {
                return Err(format!("{s:?}: unknown kind {k:?} (expected ts or mjpeg)"))
            }
            None => (left, MediaKind::Ts),
        };
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{s:?}: the stream name must be non-empty, without spaces"
            ));
        }
        let source = if src == "stdin" || src == "-" {
            LiveSource::Stdin
        } else if let Some(addr) = src.strip_prefix("udp://") {
            LiveSource::Udp(addr.parse().map_err(|_| {
                format!("{s:?}: {addr:?} is not an ADDR:PORT such as 127.0.0.1:5000")
            })?)
        } else {
            return Err(format!(
                "{s:?}: the source must be udp://ADDR:PORT or stdin"
            ));
        };
        Ok(Self {
            name: name.to_string(),
            kind,
            source,
        })
    }
}

/// A frame of a live input, ready to be packetized.
#[derive(Debug, Clone)]
pub struct LiveFrame {
    /// Stream id.
    pub stream: u32,
    /// The frame: a JPEG image, or a TS unit of whole packets.
    pub data: Bytes,
    /// Bits of [`flags`].
    pub flags: u8,
    /// Media timestamp, 90 kHz: the TS unit's PTS, else the arrival time.
    pub timestamp_90k: u32,
    /// Its bytes in the live input queue, given back when the frame is dropped.
    pub queued: Queued,
}

/// Most bytes of live frames waiting between the input readers and the source (all
/// inputs of the process together); a frame that would pass it is dropped and counted.
pub const LIVE_QUEUE_BYTES: usize = 32 * 1024 * 1024;

static QUEUED_BYTES: AtomicUsize = AtomicUsize::new(0);
static DROPPED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Live input bytes dropped so far because the queue was at [`LIVE_QUEUE_BYTES`].
pub fn dropped_bytes() -> u64 {
    DROPPED_BYTES.load(Ordering::Relaxed)
}

/// Bytes of live frames in the queue now.
pub fn queued_bytes() -> usize {
    QUEUED_BYTES.load(Ordering::Relaxed)
}

/// A live frame's share of the input queue's byte cap, released on drop.
#[derive(Debug)]
pub struct Queued(usize);

impl Queued {
    /// Reserve `len` bytes of the queue, or `None` (counted) when the cap would be passed.
    pub fn reserve(len: usize) -> Option<Self> {
        let mut cur = QUEUED_BYTES.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(len) > LIVE_QUEUE_BYTES {
                DROPPED_BYTES.fetch_add(len as u64, Ordering::Relaxed);
                return None;
            }
            match QUEUED_BYTES.compare_exchange_weak(
                cur,
                cur + len,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Self(len)),
                Err(now) => cur = now,
            }
        }
    }

    /// A frame outside the queue (nothing reserved).
    pub fn none() -> Self {
        Self(0)
    }
}

impl Clone for Queued {
    /// A copy holds nothing of the queue.
    fn clone(&self) -> Self {
        Self(0)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        QUEUED_BYTES.fetch_sub(self.0, Ordering::AcqRel);
    }
}

enum Framer {
    Ts(Box<TsFramer>),
    Mjpeg(MjpegFramer),
}

/// Check that `specs` do not read stdin twice, bind their UDP sockets (so a taken port
/// is an error at start, naming the address) and start one reader thread per input.
pub fn spawn_readers(specs: &[LiveSpec], tx: &Sender<LiveFrame>) -> anyhow::Result<()> {
    if specs
        .iter()
        .filter(|s| s.source == LiveSource::Stdin)
        .count()
        > 1
    {
        anyhow::bail!("only one --live input can read standard input");
    }
    for spec in specs {
        let reader: Box<dyn Read + Send> = match &spec.source {
            LiveSource::Udp(addr) => {
                let sock = crate::net::bind_udp(*addr)
                    .with_context(|| format!("live input {}", spec.name))?;
                Box::new(UdpReader { sock })
            }
            LiveSource::Stdin => Box::new(std::io::stdin()),
        };
        let spec = spec.clone();
        let tx = tx.clone();
        thread::Builder::new()
            .name(format!("live-{}", spec.name))
            .spawn(move || read_loop(&spec, reader, &tx))
            .context("cannot start a live input thread")?;
    }
    Ok(())
}

/// Each `read` returns one datagram.
struct UdpReader {
    sock: UdpSocket,
}

impl Read for UdpReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
}

fn read_loop(spec: &LiveSpec, mut reader: Box<dyn Read + Send>, tx: &Sender<LiveFrame>) {
    let id = ott_proto::stream_id_for(&spec.name);
    let mut framer = match spec.kind {
        MediaKind::Ts => Framer::Ts(Box::default()),
        MediaKind::Mjpeg => Framer::Mjpeg(MjpegFramer::new()),
    };
    tracing::info!(stream = %spec.name, source = ?spec.source, kind = ?spec.kind, "live input ready");
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    let mut first = true;
    let mut warned = false;
    let mut dropped_warned = false;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => {
                tracing::info!(stream = %spec.name, "live input ended");
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(stream = %spec.name, error = %e, "live input read error");
                if matches!(spec.source, LiveSource::Stdin) {
                    return;
                }
                continue;
            }
        };
        let data = buf.get(..n).unwrap_or(&[]);
        if first {
            first = false;
            tracing::info!(stream = %spec.name, "live input receiving");
        }
        let now_90k = (start.elapsed().as_micros() * 9 / 100) as u32;
        let mut out: Vec<LiveFrame> = Vec::new();
        match &mut framer {
            Framer::Ts(f) => {
                f.push(data);
                while let Some(u) = f.poll_unit() {
                    out.push(LiveFrame {
                        stream: id,
                        data: u.data,
                        flags: if u.keyframe { flags::KEYFRAME } else { 0 },
                        timestamp_90k: u.pts.map_or(now_90k, |p| p as u32),
                        queued: Queued::none(),
                    });
                }
                if !warned && f.stats().resync_bytes > 4096 && f.stats().units == 0 {
                    warned = true;
                    tracing::warn!(stream = %spec.name, "live input does not look like MPEG-TS (no 0x47 sync every 188 bytes); use NAME:mjpeg=... for MJPEG");
                }
            }
            Framer::Mjpeg(f) => {
                f.push(data);
                while let Some(frame) = f.poll_frame() {
                    out.push(LiveFrame {
                        stream: id,
                        data: frame,
                        flags: flags::KEYFRAME,
                        timestamp_90k: now_90k,
                        queued: Queued::none(),
                    });
                }
                if !warned && f.skipped() > 4096 {
                    warned = true;
                    tracing::warn!(stream = %spec.name, "live input does not look like MJPEG (no JPEG start of image); use NAME:ts=... for MPEG-TS");
                }
            }
        }
        for mut frame in out {
            // Capped by bytes, not only by count: a burst of big frames waits in at most
            // LIVE_QUEUE_BYTES; past it, frames are dropped (counted) rather than queued.
            let Some(q) = Queued::reserve(frame.data.len()) else {
                if !dropped_warned {
                    dropped_warned = true;
                    tracing::warn!(stream = %spec.name, cap = LIVE_QUEUE_BYTES, "live input queue full: dropping frames");
                }
                continue;
            };
            frame.queued = q;
            if tx.send(frame).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_queue_is_capped_by_bytes_and_gives_them_back() {
        let before = queued_bytes();
        let big = LIVE_QUEUE_BYTES / 4;
        let held: Vec<Queued> = std::iter::from_fn(|| Queued::reserve(big))
            .take(8)
            .collect();
        assert!(
            held.len() <= 4,
            "{} quarters of the cap reserved",
            held.len()
        );
        let dropped = dropped_bytes();
        assert!(Queued::reserve(LIVE_QUEUE_BYTES).is_none());
        assert!(dropped_bytes() >= dropped + LIVE_QUEUE_BYTES as u64);
        drop(held);
        assert!(queued_bytes() <= before.max(LIVE_QUEUE_BYTES));
        let q = Queued::reserve(1).expect("room again");
        assert_eq!(q.clone().0, 0, "a copy holds nothing");
    }

    #[test]
    fn test_parse_live_specs() {
        let s: LiveSpec = "cam=udp://127.0.0.1:5000".parse().expect("valid");
        assert_eq!(s.name, "cam");
        assert_eq!(s.kind, MediaKind::Ts);
        assert_eq!(
            s.source,
            LiveSource::Udp("127.0.0.1:5000".parse().expect("addr"))
        );
        let s: LiveSpec = "desk:mjpeg=stdin".parse().expect("valid");
        assert_eq!(
            (s.name.as_str(), s.kind, s.source),
            ("desk", MediaKind::Mjpeg, LiveSource::Stdin)
        );
        for bad in [
            "cam",
            "=stdin",
            "cam=tcp://1.2.3.4:5",
            "cam:avi=stdin",
            "cam=udp://nowhere",
            "a b=stdin",
        ] {
            let e = bad.parse::<LiveSpec>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
