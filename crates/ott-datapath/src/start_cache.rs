//! Instant start: the latest decodable start of one stream, replayed to each new child
//! before live data.
//!
//! The cache holds the datagrams from the start of the last keyframe (for MJPEG every
//! frame; for MPEG-TS a unit with PAT, PMT and an IDR picture) up to the newest one, as
//! they were received. A new child gets them first, with [`flags::CACHED`] set and their
//! original sequence numbers: a child that already has them (a make-before-break switch)
//! drops them as duplicates, and a new one decodes at once.
//!
//! Bounds: at most [`MAX_DATAGRAMS`] datagrams (well inside the receivers' duplicate
//! window) and [`MAX_BYTES`] bytes; a GOP larger than that is not cached until the next
//! keyframe. A cache whose stream has not flowed for [`MAX_AGE`] is not replayed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ott_proto::{flags, older, MediaHeader};

/// Most datagrams kept per stream.
pub const MAX_DATAGRAMS: usize = 768;
/// Most bytes kept per stream.
pub const MAX_BYTES: usize = 1 << 20;
/// A cache older than this (no datagram of its stream since) is not replayed.
pub const MAX_AGE: Duration = Duration::from_secs(1);

/// The start cache of one stream.
#[derive(Debug, Default)]
pub struct StartCache {
    /// Frame number of the keyframe the cache starts at.
    key: Option<u32>,
    datagrams: Vec<Bytes>,
    bytes: usize,
    /// The GOP outgrew the bounds: wait for the next keyframe.
    overflow: bool,
    last: Option<Instant>,
}

impl StartCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a datagram (already deduplicated) received or sent at `now`. The bytes are
    /// shared, not copied.
    pub fn observe(&mut self, now: Instant, header: &MediaHeader, datagram: &Bytes) {
        self.last = Some(now);
        let starts = header.has(flags::KEYFRAME) && self.key.is_none_or(|k| older(k, header.frame));
        if starts {
            self.key = Some(header.frame);
            self.datagrams.clear();
            self.bytes = 0;
            self.overflow = false;
        } else if self.overflow || self.key.is_none_or(|k| older(header.frame, k)) {
            // Nothing before the first keyframe, nor late datagrams of older frames.
            return;
        }
        if self.datagrams.len() >= MAX_DATAGRAMS || self.bytes + datagram.len() > MAX_BYTES {
            self.overflow = true;
            self.datagrams.clear();
            self.bytes = 0;
            return;
        }
        self.bytes += datagram.len();
        self.datagrams.push(datagram.clone());
    }

    /// Whether there is a fresh decodable start at `now`.
    pub fn is_fresh(&self, now: Instant) -> bool {
        let fresh = self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) <= MAX_AGE);
        fresh && !self.overflow && !self.datagrams.is_empty()
    }

    /// The datagrams to send a new child at `now`, marked [`flags::CACHED`]; empty when
    /// there is no fresh decodable start.
    pub fn replay(&self, now: Instant) -> Vec<Bytes> {
        if !self.is_fresh(now) {
            return Vec::new();
        }
        self.datagrams
            .iter()
            .map(|d| marked(d, flags::CACHED))
            .collect()
    }

    /// Forget everything (the source changed: another number space).
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Datagrams cached.
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }
}

/// A copy of a media datagram with `flag` set in its header.
pub fn marked(datagram: &[u8], flag: u8) -> Bytes {
    let mut d = datagram.to_vec();
    if let Some(f) = d.get_mut(3) {
        *f |= flag;
    }
    Bytes::from(d)
}
