//! Instant start: the latest decodable start of each stream a node carries, replayed to
//! each new child before live data.
//!
//! For each stream the cache holds the datagrams from the start of the last keyframe
//! (for MJPEG every frame; for MPEG-TS a unit with PAT, PMT and an IDR picture) up to
//! the newest one, as they were received. When a child appears in a stream's route, the
//! node sends it these datagrams first, with [`flags::CACHED`] set and their original
//! sequence numbers: a child that already has them (a make-before-break switch) drops
//! them as duplicates, and a new one decodes at once instead of waiting for the next
//! keyframe. The server, whose clips play whether or not anyone watches, keeps the same
//! cache, so the first viewer of a stream starts at once too.
//!
//! Bounds: at most [`MAX_DATAGRAMS`] datagrams (well inside the receivers' duplicate
//! window, so a replay is never taken for a restarted source) and [`MAX_BYTES`] bytes per
//! stream; a GOP larger than that is not cached until the next keyframe. A cache whose
//! stream has not flowed for [`MAX_AGE`] is not replayed (it would be stale).
//!
//! Pure data structure: time is a parameter; the forwarding thread (see `dataplane`) and
//! the server's media thread (see `source`) do the sending.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ott_proto::{flags, MediaHeader};

/// Most datagrams kept per stream.
pub const MAX_DATAGRAMS: usize = 768;
/// Most bytes kept per stream.
pub const MAX_BYTES: usize = 1 << 20;
/// A cache older than this (no datagram of its stream since) is not replayed.
pub const MAX_AGE: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Entry {
    /// Frame number of the keyframe the cache starts at.
    key: Option<u32>,
    datagrams: Vec<Bytes>,
    bytes: usize,
    /// The GOP outgrew the bounds: wait for the next keyframe.
    overflow: bool,
    last: Option<Instant>,
}

/// `a` is strictly newer than `b` in serial-number arithmetic.
fn newer(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) < 0
}

/// The caches of every stream of one node.
#[derive(Debug, Default)]
pub struct StartCache {
    streams: HashMap<u32, Entry>,
}

impl StartCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a datagram (already deduplicated) of a stream, received or sent at `now`.
    /// The bytes are shared, not copied: pass the same `Bytes` the caller keeps elsewhere.
    pub fn observe(&mut self, now: Instant, header: &MediaHeader, datagram: &Bytes) {
        let e = self.streams.entry(header.stream).or_default();
        e.last = Some(now);
        let starts = header.has(flags::KEYFRAME) && e.key.is_none_or(|k| newer(header.frame, k));
        if starts {
            e.key = Some(header.frame);
            e.datagrams.clear();
            e.bytes = 0;
            e.overflow = false;
        } else if e.overflow || e.key.is_none_or(|k| newer(k, header.frame)) {
            // Nothing before the first keyframe, nor late datagrams of older frames.
            return;
        }
        if e.datagrams.len() >= MAX_DATAGRAMS || e.bytes + datagram.len() > MAX_BYTES {
            tracing::debug!(
                stream = header.stream,
                "GOP too large to cache until the next keyframe"
            );
            e.overflow = true;
            e.datagrams.clear();
            e.bytes = 0;
            return;
        }
        e.bytes += datagram.len();
        e.datagrams.push(datagram.clone());
    }

    /// The datagrams to send a new child of `stream` at `now`, marked [`flags::CACHED`];
    /// empty when there is no fresh decodable start.
    pub fn replay(&self, now: Instant, stream: u32) -> Vec<Bytes> {
        let Some(e) = self.streams.get(&stream) else {
            return Vec::new();
        };
        let fresh = e
            .last
            .is_some_and(|t| now.saturating_duration_since(t) <= MAX_AGE);
        if !fresh || e.overflow {
            return Vec::new();
        }
        e.datagrams
            .iter()
            .map(|d| {
                let mut d = d.to_vec();
                // Cached datagrams parsed as media, so they hold a whole header.
                if let Some(f) = d.get_mut(3) {
                    *f |= flags::CACHED;
                }
                Bytes::from(d)
            })
            .collect()
    }

    /// Drop what is cached for `stream` (its source changed: another number space).
    pub fn forget(&mut self, stream: u32) {
        self.streams.remove(&stream);
    }

    /// Datagrams cached for `stream`.
    pub fn len(&self, stream: u32) -> usize {
        self.streams.get(&stream).map_or(0, |e| e.datagrams.len())
    }

    /// Whether nothing is cached for any stream.
    pub fn is_empty(&self) -> bool {
        self.streams.values().all(|e| e.datagrams.is_empty())
    }
}

/// Send a replay to new children (the server's media thread; the forwarder batches its
/// own). Failures are counted, never fatal.
pub fn send_replay(
    sock: &std::net::UdpSocket,
    counters: &crate::counters::Counters,
    datagrams: &[Bytes],
    to: &[std::net::SocketAddr],
) {
    for child in to {
        for d in datagrams {
            match sock.send_to(d, child) {
                Ok(n) => counters.tx(n),
                Err(e) => {
                    tracing::debug!(%child, error = %e, "cache replay send failed");
                    crate::counters::add(&counters.send_errors, 1);
                }
            }
        }
        if !datagrams.is_empty() {
            tracing::debug!(%child, datagrams = datagrams.len(), "replayed the latest decodable start");
        }
    }
}

/// The children in `new` that are not in `old`: those that get a replay.
pub fn added<T: PartialEq + Copy>(old: &[T], new: &[T]) -> Vec<T> {
    new.iter().filter(|c| !old.contains(c)).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ott_proto::HEADER_LEN;

    fn dg(frame: u32, seq: u32, key: bool, len: usize) -> (MediaHeader, Bytes) {
        let h = MediaHeader {
            flags: if key { flags::KEYFRAME } else { 0 },
            stream: 7,
            seq,
            frame,
            frag_index: 0,
            frag_count: 1,
            timestamp: 0,
        };
        let mut d = h.to_bytes().to_vec();
        d.resize(HEADER_LEN + len, 0xaa);
        (h, Bytes::from(d))
    }

    #[test]
    fn test_keeps_from_the_last_keyframe() {
        let t0 = Instant::now();
        let mut c = StartCache::new();
        // Nothing before the first keyframe.
        let (h, d) = dg(0, 0, false, 10);
        c.observe(t0, &h, &d);
        assert!(c.replay(t0, 7).is_empty());
        for frame in 1..=12 {
            let (h, d) = dg(frame, frame, frame % 5 == 1, 100);
            c.observe(t0, &h, &d);
        }
        // Keyframes at 1, 6, 11: the cache holds 11 and 12.
        let r = c.replay(t0, 7);
        let frames: Vec<u32> = r
            .iter()
            .map(|d| MediaHeader::parse(d).expect("valid").frame)
            .collect();
        assert_eq!(frames, [11, 12]);
        let first = MediaHeader::parse(&r[0]).expect("valid");
        assert!(first.has(flags::CACHED) && first.has(flags::KEYFRAME));
        assert_eq!(first.seq, 11, "original sequence number");
        // A late keyframe fragment of an older frame does not restart the cache.
        let (h, d) = dg(6, 6, true, 100);
        c.observe(t0, &h, &d);
        assert_eq!(c.len(7), 2);
        // Stale after MAX_AGE without traffic.
        assert!(c
            .replay(t0 + MAX_AGE + Duration::from_millis(1), 7)
            .is_empty());
        assert!(c.replay(t0, 99).is_empty());
    }

    #[test]
    fn test_oversized_gop_is_not_cached() {
        let t0 = Instant::now();
        let mut c = StartCache::new();
        let (h, d) = dg(1, 1, true, 1000);
        c.observe(t0, &h, &d);
        for i in 0..MAX_DATAGRAMS as u32 {
            let (h, d) = dg(2 + i, 2 + i, false, 1000);
            c.observe(t0, &h, &d);
        }
        assert!(c.replay(t0, 7).is_empty());
        let (h, d) = dg(5000, 5000, true, 1000);
        c.observe(t0, &h, &d);
        assert_eq!(c.replay(t0, 7).len(), 1);
    }

    #[test]
    fn test_added_children() {
        assert_eq!(added(&[1, 2], &[2, 3, 4]), [3, 4]);
        assert!(added(&[1], &[1]).is_empty());
    }
}
