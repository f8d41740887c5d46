//! The client's playout buffer: frames rebuilt from datagrams and released in order,
//! waiting at most a latency budget for missing datagrams (which a NACK may bring back).
//! Sans-IO: time is a parameter.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ott_proto::{flags, MediaHeader, MAX_PAYLOAD_LEN};

use crate::Frame;

/// Limits of a [`PlayoutBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayoutConfig {
    /// How long a frame may wait for its missing datagrams, from its first datagram.
    pub budget: Duration,
    /// Most frames held at once; beyond that the oldest is given up.
    pub max_pending: usize,
    /// Largest frame accepted, bytes.
    pub max_frame_len: usize,
    /// A frame number this far from the expected one is taken as a restarted source.
    pub restart_window: u32,
}

impl Default for PlayoutConfig {
    fn default() -> Self {
        Self {
            budget: Duration::from_millis(300),
            max_pending: 256,
            max_frame_len: 8 * 1024 * 1024,
            restart_window: 1024,
        }
    }
}

/// Counters of a [`PlayoutBuffer`], cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlayoutStats {
    /// Frames released.
    pub frames: u64,
    /// Frames given up incomplete (or never seen at all) after the budget.
    pub incomplete_dropped: u64,
    /// Fragments of frames already released or given up.
    pub late: u64,
    /// Fragments received twice.
    pub duplicates: u64,
    /// Inconsistent fragments.
    pub malformed: u64,
    /// Complete frames released only when the budget of an earlier missing frame ran out.
    pub waited: u64,
}

#[derive(Debug)]
struct Pending {
    first_seen: Instant,
    timestamp: u32,
    flags: u8,
    frags: Vec<Option<Bytes>>,
    received: usize,
    bytes: usize,
}

impl Pending {
    fn complete(&self) -> bool {
        self.received == self.frags.len()
    }
}

/// Rebuilds the frames of ONE stream and releases them in frame order.
///
/// A complete frame is released at once when every earlier frame was released or given
/// up; otherwise it waits, at most until the missing frame's budget runs out. A frame
/// never released incomplete, never released twice, and memory stays bounded.
///
/// Drive it with [`PlayoutBuffer::push`], then [`PlayoutBuffer::poll_frame`] until it
/// returns `None`, and again at [`PlayoutBuffer::poll_timeout`].
#[derive(Debug)]
pub struct PlayoutBuffer {
    config: PlayoutConfig,
    stream: Option<u32>,
    /// Last frame released or given up, unwrapped.
    released: Option<u64>,
    /// Reference for unwrapping frame numbers: the newest frame seen.
    newest: Option<u64>,
    pending: BTreeMap<u64, Pending>,
    stats: PlayoutStats,
}

impl PlayoutBuffer {
    /// An empty buffer.
    pub fn new(config: PlayoutConfig) -> Self {
        Self {
            config,
            stream: None,
            released: None,
            newest: None,
            pending: BTreeMap::new(),
            stats: PlayoutStats::default(),
        }
    }

    /// Forget everything (a stream switch); counters are kept.
    pub fn reset(&mut self) {
        self.stream = None;
        self.released = None;
        self.newest = None;
        self.pending.clear();
    }

    /// The counters.
    pub fn stats(&self) -> PlayoutStats {
        self.stats
    }

    /// Frames held now.
    pub fn pending_frames(&self) -> usize {
        self.pending.len()
    }

    fn unwrap_frame(&self, n: u32) -> u64 {
        match self.newest {
            None => u64::from(n) + (1 << 32),
            Some(newest) => {
                let delta = n.wrapping_sub(newest as u32) as i32;
                newest.saturating_add_signed(i64::from(delta))
            }
        }
    }

    /// Take one datagram's header and payload.
    pub fn push(&mut self, now: Instant, header: &MediaHeader, payload: &[u8]) {
        let h = header;
        let max_frags = self.config.max_frame_len.div_ceil(MAX_PAYLOAD_LEN).max(1);
        if *self.stream.get_or_insert(h.stream) != h.stream
            || h.frag_count == 0
            || h.frag_index >= h.frag_count
            || payload.len() > MAX_PAYLOAD_LEN
            || usize::from(h.frag_count) > max_frags
        {
            self.stats.malformed += 1;
            return;
        }
        let mut f = self.unwrap_frame(h.frame);
        let far = |a: u64, b: u64| a.abs_diff(b) > u64::from(self.config.restart_window);
        if self.released.is_some_and(|r| far(f, r)) || self.newest.is_some_and(|n| far(f, n)) {
            // The source restarted (or we jumped to another source): start over.
            let stream = self.stream;
            self.reset();
            self.stream = stream;
            f = self.unwrap_frame(h.frame);
        }
        if self.released.is_some_and(|r| f <= r) {
            self.stats.late += 1;
            return;
        }
        if self.newest.is_none_or(|n| f > n) {
            self.newest = Some(f);
        }
        if let std::collections::btree_map::Entry::Vacant(e) = self.pending.entry(f) {
            e.insert(Pending {
                first_seen: now,
                timestamp: h.timestamp,
                flags: 0,
                frags: vec![None; usize::from(h.frag_count)],
                received: 0,
                bytes: 0,
            });
            while self.pending.len() > self.config.max_pending.max(1) {
                if let Some((n, _)) = self.pending.pop_first() {
                    self.stats.incomplete_dropped += 1;
                    self.released = Some(n);
                }
            }
        }
        let max_len = self.config.max_frame_len;
        let Some(p) = self.pending.get_mut(&f) else {
            return;
        };
        if p.frags.len() != usize::from(h.frag_count) || p.bytes + payload.len() > max_len {
            self.stats.malformed += 1;
            return;
        }
        let Some(slot) = p.frags.get_mut(usize::from(h.frag_index)) else {
            self.stats.malformed += 1;
            return;
        };
        if slot.is_some() {
            self.stats.duplicates += 1;
            return;
        }
        *slot = Some(Bytes::copy_from_slice(payload));
        p.received += 1;
        p.bytes += payload.len();
        p.flags |= h.flags & !flags::RETRANSMIT;
    }

    /// The next frame to play, if one is ready now.
    pub fn poll_frame(&mut self, now: Instant) -> Option<Frame> {
        loop {
            let (&n, head) = self.pending.first_key_value()?;
            let deadline = head.first_seen + self.config.budget;
            let Some(released) = self.released else {
                // Start-up: play the first complete frame. An incomplete frame without its
                // first fragment began before we joined: skip it as soon as a later frame
                // is complete; one with its first fragment waits for its budget.
                if head.complete() {
                    return self.release(n, false);
                }
                let began_before_us = head.frags.first().is_some_and(Option::is_none);
                if (began_before_us && self.pending.values().any(Pending::complete))
                    || now >= deadline
                {
                    self.pending.pop_first();
                    continue;
                }
                return None;
            };
            let in_order = n == released + 1;
            if head.complete() && (in_order || now >= deadline) {
                // Frames between `released` and `n` were never seen at all: given up.
                self.stats.incomplete_dropped += n - released - 1;
                return self.release(n, !in_order);
            }
            if !head.complete() && now >= deadline {
                self.pending.pop_first();
                self.stats.incomplete_dropped += n - released;
                self.released = Some(n);
                continue;
            }
            return None;
        }
    }

    fn release(&mut self, n: u64, waited: bool) -> Option<Frame> {
        let p = self.pending.remove(&n)?;
        self.released = Some(n);
        self.stats.frames += 1;
        if waited {
            self.stats.waited += 1;
        }
        let data = if p.frags.len() == 1 {
            p.frags.into_iter().flatten().next().unwrap_or_default()
        } else {
            let mut buf = BytesMut::with_capacity(p.bytes);
            for f in p.frags.iter().flatten() {
                buf.extend_from_slice(f);
            }
            buf.freeze()
        };
        Some(Frame {
            stream: self.stream.unwrap_or_default(),
            number: n as u32,
            timestamp: p.timestamp,
            flags: p.flags,
            data,
        })
    }

    /// When [`PlayoutBuffer::poll_frame`] may next have a frame without a new datagram:
    /// the budget deadline of the frame at the head, if it blocks.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let (_, head) = self.pending.first_key_value()?;
        Some(head.first_seen + self.config.budget)
    }
}
