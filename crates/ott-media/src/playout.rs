//! The client's playout buffer: frames rebuilt from datagrams and released in order,
//! waiting at most a latency budget for missing datagrams (which a NACK may bring back).
//! Sans-IO: time is a parameter.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ott_proto::{flags, MediaHeader, MAX_PAYLOAD_LEN};

use crate::{Frame, CLOCK_RATE};

/// Limits of a [`PlayoutBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayoutConfig {
    /// How long a frame may wait for its missing datagrams, from its first datagram; a
    /// frame never seen at all, from when it was due (one frame interval, by the media
    /// timestamps, after the frame before it arrived): after an outage the frames that
    /// fell into it are not waited for again from the moment media comes back.
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
/// Until the first frame is played, resent datagrams of frames older than the first one
/// seen are dropped as late: a new viewer does not start in the recent past its PoP
/// sends it.
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
    /// The frame of the first datagram seen (since the last reset).
    first: Option<u64>,
    pending: BTreeMap<u64, Pending>,
    stats: PlayoutStats,
    /// When the last frame released or given up was first seen, and its timestamp.
    last: Option<(Instant, u32)>,
}

/// Longest frame interval believed from the timestamps when dating a missing frame.
const MAX_INTERVAL: Duration = Duration::from_secs(1);
/// At start-up, how long an incomplete frame without its first fragment is kept after
/// its first datagram, even once a later frame is complete, before it is taken for one
/// that began before we joined and skipped: a start cache's replay comes as a burst of
/// datagrams that may arrive out of order, and a frame skipped there for a missing
/// first fragment still on its way was lost for good (its other fragments gone with it).
const START_REORDER_WAIT: Duration = Duration::from_millis(30);

impl PlayoutBuffer {
    /// An empty buffer.
    pub fn new(config: PlayoutConfig) -> Self {
        Self {
            config,
            stream: None,
            released: None,
            newest: None,
            first: None,
            pending: BTreeMap::new(),
            stats: PlayoutStats::default(),
            last: None,
        }
    }

    /// Forget everything (a stream switch); counters are kept.
    pub fn reset(&mut self) {
        self.stream = None;
        self.released = None;
        self.newest = None;
        self.first = None;
        self.pending.clear();
        self.last = None;
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
        // Before the first frame is played, resent data of frames older than the first
        // one seen is not a start: a PoP sends a new viewer its recent past (for one that
        // moved from another PoP and has a place in the stream), and a new viewer's NACKs
        // never cover what came before its first datagram, so starting there would wait
        // out the budget for every datagram of it lost on the way.
        let first = *self.first.get_or_insert(f);
        if self.released.is_none() && f < first && h.flags & flags::RETRANSMIT != 0 {
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

    /// Until when the frame at the head (number `n`) may wait: its budget from its first
    /// datagram, or, when frames before it were never seen, from when the first of those
    /// was due (the last frame's arrival plus one frame interval, the interval from the
    /// timestamps), whichever is earlier.
    fn deadline(&self, n: u64, head: &Pending) -> Instant {
        let seen = head.first_seen;
        let due = match (self.released, self.last) {
            (Some(r), Some((at, ts))) if n > r + 1 => {
                let ticks = u64::from(head.timestamp.wrapping_sub(ts));
                let per_frame = Duration::from_micros(ticks * 1_000_000 / CLOCK_RATE / (n - r));
                (per_frame <= MAX_INTERVAL).then(|| at + per_frame)
            }
            _ => None,
        };
        due.map_or(seen, |d| d.min(seen)) + self.config.budget
    }

    /// The next frame to play, if one is ready now.
    pub fn poll_frame(&mut self, now: Instant) -> Option<Frame> {
        loop {
            let (&n, head) = self.pending.first_key_value()?;
            let deadline = self.deadline(n, head);
            let Some(released) = self.released else {
                // Start-up: play the first complete frame. An incomplete frame without its
                // first fragment began before we joined: skip it once a later frame is
                // complete and its first fragment had a moment to come out of order
                // ([`START_REORDER_WAIT`]); one with its first fragment waits for its
                // budget.
                if head.complete() {
                    return self.release(n, false);
                }
                let began_before_us = head.frags.first().is_some_and(Option::is_none);
                if (began_before_us
                    && now >= head.first_seen + START_REORDER_WAIT
                    && self.pending.values().any(Pending::complete))
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
                let (seen, ts) = (head.first_seen, head.timestamp);
                self.pending.pop_first();
                self.stats.incomplete_dropped += n - released;
                self.released = Some(n);
                self.last = Some((seen, ts));
                continue;
            }
            return None;
        }
    }

    fn release(&mut self, n: u64, waited: bool) -> Option<Frame> {
        let p = self.pending.remove(&n)?;
        self.released = Some(n);
        self.last = Some((p.first_seen, p.timestamp));
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
        let (&n, head) = self.pending.first_key_value()?;
        let deadline = self.deadline(n, head);
        let began_before_us = head.frags.first().is_some_and(Option::is_none);
        if self.released.is_none() && began_before_us {
            return Some(deadline.min(head.first_seen + START_REORDER_WAIT));
        }
        Some(deadline)
    }
}

#[cfg(test)]
// Tests read the clock once, as an origin for fake time.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    /// Frame `n` of a 25 fps stream (3,600 ticks a frame), one datagram.
    fn header(n: u32) -> MediaHeader {
        MediaHeader {
            flags: 0,
            stream: 7,
            seq: n,
            frame: n,
            frag_index: 0,
            frag_count: 1,
            timestamp: n * 3_600,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Frames 0..=4 arrive every 40 ms from `t0`, then nothing until frame `resume`
    /// arrives at `t0 + at`; returns the buffer after frame 4 was played.
    fn after_gap(t0: Instant, resume: u32, at: Duration) -> PlayoutBuffer {
        let mut b = PlayoutBuffer::new(PlayoutConfig::default());
        for n in 0..5 {
            let t = t0 + ms(40 * u64::from(n));
            b.push(t, &header(n), b"x");
            assert_eq!(b.poll_frame(t).map(|f| f.number), Some(n));
        }
        b.push(t0 + at, &header(resume), b"y");
        b
    }

    #[test]
    fn frames_never_seen_are_waited_for_from_when_they_were_due() {
        let t0 = Instant::now();
        // An outage: frames 5..=9 never come; frame 10 arrives 250 ms after frame 4.
        let mut b = after_gap(t0, 10, ms(160 + 250));
        // Frame 5 was due at 200 ms: it is waited for until 500 ms, not 300 ms after
        // frame 10 came (710 ms).
        assert_eq!(b.poll_timeout(), Some(t0 + ms(500)));
        assert!(b.poll_frame(t0 + ms(499)).is_none());
        assert_eq!(b.poll_frame(t0 + ms(500)).map(|f| f.number), Some(10));
        assert_eq!(b.stats().incomplete_dropped, 5);
        // An outage longer than the budget: frame 10 plays as soon as it comes.
        let mut b = after_gap(t0, 15, ms(160 + 600));
        assert_eq!(b.poll_frame(t0 + ms(760)).map(|f| f.number), Some(15));
        // One frame lost in a flowing stream: waited for its budget from when it was
        // due (200 ms), about as long as from the next frame's arrival.
        let mut b = after_gap(t0, 6, ms(240));
        assert_eq!(b.poll_timeout(), Some(t0 + ms(500)));
        assert_eq!(b.poll_frame(t0 + ms(500)).map(|f| f.number), Some(6));
        // A frame seen incomplete keeps its budget from its first datagram.
        let mut b = after_gap(t0, 5, ms(200));
        let mut two = header(6);
        two.frag_count = 2;
        b.push(t0 + ms(240), &two, b"a");
        assert_eq!(b.poll_frame(t0 + ms(240)).map(|f| f.number), Some(5));
        assert_eq!(b.poll_timeout(), Some(t0 + ms(540)));
    }

    /// Fragment `i` of two of frame `n`.
    fn half(n: u32, i: u16) -> MediaHeader {
        MediaHeader {
            frag_index: i,
            frag_count: 2,
            ..header(n)
        }
    }

    #[test]
    fn a_start_burst_out_of_order_plays_every_frame() {
        // A start cache's replay of frames 10 to 12 (two datagrams each) arrives out of
        // order: frame 11's second half first, frame 12 whole before frame 10.
        let t0 = Instant::now();
        let mut b = PlayoutBuffer::new(PlayoutConfig::default());
        let mut played = Vec::new();
        let order = [(11, 1), (12, 0), (12, 1), (10, 0), (11, 0), (10, 1)];
        for (k, (n, i)) in order.into_iter().enumerate() {
            let t = t0 + Duration::from_micros(100 * k as u64);
            b.push(t, &half(n, i), b"x");
            while let Some(f) = b.poll_frame(t) {
                played.push(f.number);
            }
        }
        assert_eq!(played, [10, 11, 12], "{:?}", b.stats());
        // A frame that really began before we joined (its first half never comes) is
        // skipped once a later one is complete, after a short wait, not its budget.
        let mut b = PlayoutBuffer::new(PlayoutConfig::default());
        b.push(t0, &half(20, 1), b"x");
        b.push(t0, &half(21, 0), b"x");
        b.push(t0, &half(21, 1), b"x");
        assert!(b.poll_frame(t0).is_none());
        let wait = b.poll_timeout().expect("a wait");
        assert!(wait > t0 && wait < t0 + ms(100), "{wait:?}");
        assert_eq!(b.poll_frame(wait).map(|f| f.number), Some(21));
    }

    #[test]
    fn a_new_viewer_starts_at_the_cache_not_in_the_resent_past_before_it() {
        // A PoP's start cache (frame 10, in two datagrams, the second lost on the way),
        // then the recent past it sends after (frames 3 to 9, resent, one datagram of
        // frame 5 lost), then frame 10's second half, NACKed, and live frame 11.
        let t0 = Instant::now();
        let mut b = PlayoutBuffer::new(PlayoutConfig::default());
        let mut cached = half(10, 0);
        cached.flags = flags::CACHED | flags::KEYFRAME;
        b.push(t0, &cached, b"x");
        for n in (3..10).filter(|n| *n != 5) {
            let mut h = header(n);
            h.flags = flags::RETRANSMIT | flags::KEYFRAME;
            b.push(t0 + ms(1), &h, b"x");
        }
        assert!(b.poll_frame(t0 + ms(1)).is_none(), "nothing older starts");
        assert_eq!(b.stats().late, 6);
        let mut rest = half(10, 1);
        rest.flags = flags::RETRANSMIT | flags::CACHED | flags::KEYFRAME;
        b.push(t0 + ms(20), &rest, b"x");
        assert_eq!(b.poll_frame(t0 + ms(20)).map(|f| f.number), Some(10));
        b.push(t0 + ms(40), &header(11), b"x");
        assert_eq!(b.poll_frame(t0 + ms(40)).map(|f| f.number), Some(11));
        assert_eq!(b.stats().incomplete_dropped, 0);
        // Once playing, the resent past fills what is missing as before.
        let mut b = after_gap(t0, 7, ms(240));
        let mut h = header(5);
        h.flags = flags::RETRANSMIT;
        b.push(t0 + ms(241), &h, b"x");
        assert_eq!(b.poll_frame(t0 + ms(241)).map(|f| f.number), Some(5));
    }
}
