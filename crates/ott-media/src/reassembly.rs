//! Reassembly of frames from the media datagrams of one stream.

use bytes::{Bytes, BytesMut};
use ott_proto::{flags, older, MediaHeader, MAX_PAYLOAD_LEN};

/// Limits of a [`Reassembler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblerConfig {
    /// Most frames in progress at once; a new frame beyond that evicts the oldest.
    pub max_pending: usize,
    /// Largest frame accepted, bytes; fragments beyond it are dropped as malformed.
    pub max_frame_len: usize,
    /// A fragment older than the last emitted frame by more than this many frames is taken
    /// as a restarted source (frame numbers started again): the state is reset and the
    /// fragment accepted, instead of everything being dropped as late.
    pub restart_window: u32,
}

impl Default for ReassemblerConfig {
    fn default() -> Self {
        Self {
            max_pending: 8,
            max_frame_len: 8 * 1024 * 1024,
            restart_window: 1024,
        }
    }
}

/// One reassembled frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Stream id.
    pub stream: u32,
    /// Frame number.
    pub number: u32,
    /// Media timestamp, 90 kHz.
    pub timestamp: u32,
    /// Union of the flags of the frame's fragments, without [`flags::RETRANSMIT`].
    pub flags: u8,
    /// The frame's bytes.
    pub data: Bytes,
}

/// Counters of a [`Reassembler`]; cumulative, kept across [`Reassembler::reset`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReassemblyStats {
    /// Frames emitted.
    pub frames: u64,
    /// Incomplete frames given up (a newer frame completed, or evicted by `max_pending`).
    pub incomplete_dropped: u64,
    /// Fragments received twice (including fragments of the frame just emitted).
    pub duplicates: u64,
    /// Fragments of frames older than the last emitted one.
    pub late: u64,
    /// Inconsistent fragments: fragment count differing within a frame, payload too big,
    /// frame over `max_frame_len`, bad fragment index, another stream's id.
    pub malformed: u64,
    /// Times the source was taken as restarted (see [`ReassemblerConfig::restart_window`]).
    pub restarts: u64,
}

#[derive(Debug)]
struct Pending {
    number: u32,
    timestamp: u32,
    flags: u8,
    frags: Vec<Option<Bytes>>,
    received: usize,
    bytes: usize,
}

/// Rebuilds the frames of ONE stream from its datagrams, with bounded memory.
///
/// Emits only complete frames, in frame order (serial-number arithmetic, so frame numbers
/// may wrap). When a frame completes, older incomplete frames are dropped and counted;
/// fragments of frames older than the last emitted one are dropped as late; duplicates
/// and inconsistent fragments are dropped and counted. At most
/// [`ReassemblerConfig::max_pending`] frames of at most
/// [`ReassemblerConfig::max_frame_len`] bytes are held. The stream id of the first
/// fragment (after creation or [`Reassembler::reset`]) is the stream reassembled.
///
/// Sans-IO: no clock, no socket; bad input is counted, never an error or a panic.
#[derive(Debug)]
pub struct Reassembler {
    config: ReassemblerConfig,
    stream: Option<u32>,
    last_emitted: Option<u32>,
    pending: Vec<Pending>,
    stats: ReassemblyStats,
}

impl Reassembler {
    /// An empty reassembler.
    pub fn new(config: ReassemblerConfig) -> Self {
        Self {
            config,
            stream: None,
            last_emitted: None,
            pending: Vec::new(),
            stats: ReassemblyStats::default(),
        }
    }

    /// Take one datagram (its parsed header and its payload); returns the frame it
    /// completes, if any. A push completes at most one frame.
    pub fn push(&mut self, header: &MediaHeader, payload: &[u8]) -> Option<Frame> {
        let h = header;
        if *self.stream.get_or_insert(h.stream) != h.stream
            || h.frag_count == 0
            || h.frag_index >= h.frag_count
            || payload.len() > MAX_PAYLOAD_LEN
            || usize::from(h.frag_count) > self.max_fragments()
        {
            self.stats.malformed += 1;
            return None;
        }
        if let Some(last) = self.last_emitted {
            if h.frame == last {
                self.stats.duplicates += 1;
                return None;
            }
            if older(h.frame, last) {
                if last.wrapping_sub(h.frame) > self.config.restart_window {
                    tracing::debug!(last, frame = h.frame, "media source restarted");
                    self.stats.restarts += 1;
                    self.pending.clear();
                    self.last_emitted = None;
                } else {
                    self.stats.late += 1;
                    return None;
                }
            }
        }
        let idx = match self.pending.iter().position(|p| p.number == h.frame) {
            Some(i) => i,
            None => self.insert_pending(h)?,
        };
        let max_frame_len = self.config.max_frame_len;
        let p = self.pending.get_mut(idx)?;
        if p.frags.len() != usize::from(h.frag_count) {
            self.stats.malformed += 1;
            return None;
        }
        let slot = p.frags.get_mut(usize::from(h.frag_index))?;
        if slot.is_some() {
            self.stats.duplicates += 1;
            return None;
        }
        if p.bytes + payload.len() > max_frame_len {
            self.stats.malformed += 1;
            return None;
        }
        *slot = Some(Bytes::copy_from_slice(payload));
        p.received += 1;
        p.bytes += payload.len();
        p.flags |= h.flags & !flags::RETRANSMIT;
        if p.received < p.frags.len() {
            return None;
        }
        let p = self.pending.swap_remove(idx);
        Some(self.emit(p))
    }

    /// Forget every frame in progress and the last emitted frame (stream switch); the
    /// next fragment's stream becomes the stream reassembled. Counters are kept.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.last_emitted = None;
        self.stream = None;
    }

    /// The counters.
    pub fn stats(&self) -> ReassemblyStats {
        self.stats
    }

    /// Number of frames in progress (never above `max_pending`).
    pub fn pending_frames(&self) -> usize {
        self.pending.len()
    }

    /// Most fragments a frame of `max_frame_len` bytes can have.
    fn max_fragments(&self) -> usize {
        self.config.max_frame_len.div_ceil(MAX_PAYLOAD_LEN).max(1)
    }

    /// Make room and add a pending frame for `h`; returns its index, or `None` if `h` is
    /// older than every frame in progress while there is no room (counted as late).
    fn insert_pending(&mut self, h: &MediaHeader) -> Option<usize> {
        if self.pending.len() >= self.config.max_pending.max(1) {
            let oldest = self
                .pending
                .iter()
                .enumerate()
                .reduce(|a, b| if older(b.1.number, a.1.number) { b } else { a })
                .map(|(i, p)| (i, p.number));
            if let Some((i, number)) = oldest {
                if older(h.frame, number) {
                    self.stats.late += 1;
                    return None;
                }
                self.pending.swap_remove(i);
                self.stats.incomplete_dropped += 1;
            }
        }
        self.pending.push(Pending {
            number: h.frame,
            timestamp: h.timestamp,
            flags: 0,
            frags: vec![None; usize::from(h.frag_count)],
            received: 0,
            bytes: 0,
        });
        Some(self.pending.len() - 1)
    }

    fn emit(&mut self, p: Pending) -> Frame {
        let number = p.number;
        let before = self.pending.len();
        self.pending.retain(|q| !older(q.number, number));
        self.stats.incomplete_dropped += (before - self.pending.len()) as u64;
        self.last_emitted = Some(number);
        self.stats.frames += 1;
        let data = if p.frags.len() == 1 {
            p.frags.into_iter().flatten().next().unwrap_or_default()
        } else {
            let mut buf = BytesMut::with_capacity(p.bytes);
            for f in p.frags.iter().flatten() {
                buf.extend_from_slice(f);
            }
            buf.freeze()
        };
        Frame {
            stream: self.stream.unwrap_or_default(),
            number,
            timestamp: p.timestamp,
            flags: p.flags,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Packetizer;
    use ott_proto::HEADER_LEN;
    use proptest::prelude::*;

    fn parse(d: &Bytes) -> (MediaHeader, &[u8]) {
        let h = MediaHeader::parse(d).expect("packetizer output parses");
        (h, &d[HEADER_LEN..])
    }

    fn frame_bytes(n: usize, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + n * 13) as u8).collect()
    }

    fn push_all(r: &mut Reassembler, dgs: &[Bytes]) -> Vec<Frame> {
        dgs.iter()
            .filter_map(|d| {
                let (h, p) = parse(d);
                r.push(&h, p)
            })
            .collect()
    }

    #[test]
    fn test_round_trip_in_order() {
        let mut p = Packetizer::new(5);
        let mut r = Reassembler::new(ReassemblerConfig::default());
        for n in 0..10 {
            let f = frame_bytes(n, n * 1000);
            let dgs = p
                .packetize(&f, n as u32 * 3600, flags::KEYFRAME)
                .expect("fits");
            let out = push_all(&mut r, &dgs);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].data, f);
            assert_eq!(
                (out[0].stream, out[0].number, out[0].timestamp, out[0].flags),
                (5, n as u32, n as u32 * 3600, flags::KEYFRAME)
            );
        }
        assert_eq!(r.stats().frames, 10);
    }

    #[test]
    fn test_lost_fragment_drops_that_frame_only() {
        let mut p = Packetizer::new(1);
        let mut r = Reassembler::new(ReassemblerConfig::default());
        let frames: Vec<Vec<u8>> = (0..3).map(|n| frame_bytes(n, 4000)).collect();
        let mut dgs: Vec<Vec<Bytes>> = frames
            .iter()
            .map(|f| p.packetize(f, 0, 0).expect("fits"))
            .collect();
        dgs[1].remove(1);
        let out: Vec<Frame> = dgs.iter().flat_map(|d| push_all(&mut r, d)).collect();
        let numbers: Vec<u32> = out.iter().map(|f| f.number).collect();
        assert_eq!(numbers, [0, 2]);
        assert_eq!(out[1].data, frames[2]);
        assert_eq!(r.stats().incomplete_dropped, 1);
        assert_eq!(r.pending_frames(), 0);
    }

    #[test]
    fn test_late_duplicate_malformed() {
        let mut p = Packetizer::new(1);
        let mut r = Reassembler::new(ReassemblerConfig::default());
        let a = p.packetize(&frame_bytes(0, 3000), 0, 0).expect("fits");
        let b = p.packetize(&frame_bytes(1, 3000), 0, 0).expect("fits");
        // Frame 0 incomplete, frame 1 complete: frame 0 dropped.
        push_all(&mut r, &a[..1]);
        assert_eq!(push_all(&mut r, &b).len(), 1);
        // The rest of frame 0 is late; frame 1 again is a duplicate.
        assert!(push_all(&mut r, &a[1..]).is_empty());
        assert!(push_all(&mut r, &b[..1]).is_empty());
        let s = r.stats();
        assert_eq!(
            (s.frames, s.incomplete_dropped, s.late, s.duplicates),
            (1, 1, 2, 1)
        );

        // Duplicate within a pending frame.
        let c = p.packetize(&frame_bytes(2, 3000), 0, 0).expect("fits");
        push_all(&mut r, &c[..1]);
        push_all(&mut r, &c[..1]);
        assert_eq!(r.stats().duplicates, 2);
        // Same frame, another fragment count: malformed.
        let (mut h, pl) = parse(&c[1]);
        h.frag_count += 1;
        assert_eq!(r.push(&h, pl), None);
        // Payload too big, bad index, other stream: malformed.
        let (h, _) = parse(&c[1]);
        assert_eq!(r.push(&h, &[0u8; MAX_PAYLOAD_LEN + 1]), None);
        let bad = MediaHeader {
            frag_index: 5,
            frag_count: 5,
            ..h
        };
        assert_eq!(r.push(&bad, &[]), None);
        let other = MediaHeader { stream: 2, ..h };
        assert_eq!(r.push(&other, &[]), None);
        assert_eq!(r.stats().malformed, 4);
        // The genuine rest still completes the frame.
        assert_eq!(push_all(&mut r, &c[1..]).len(), 1);
    }

    #[test]
    fn test_frame_len_limit() {
        let mut p = Packetizer::new(1);
        let mut r = Reassembler::new(ReassemblerConfig {
            max_frame_len: 2000,
            ..Default::default()
        });
        // Three fragments cannot fit 2000 bytes: refused on the count.
        let big = p.packetize(&frame_bytes(0, 3000), 0, 0).expect("fits");
        assert!(push_all(&mut r, &big).is_empty());
        assert_eq!(r.stats().malformed, 3);
        // Two fragments announced but carrying more than 2000 bytes in total.
        let two = p.packetize(&frame_bytes(1, 2500), 0, 0).expect("fits");
        assert!(push_all(&mut r, &two).is_empty());
        assert_eq!(r.stats().malformed, 4);
        assert_eq!(r.stats().frames, 0);
    }

    #[test]
    fn test_wraparound_of_frame_and_seq_numbers() {
        let mut p = Packetizer::starting_at(3, u32::MAX - 2, u32::MAX - 1);
        let mut r = Reassembler::new(ReassemblerConfig::default());
        let mut numbers = Vec::new();
        for n in 0..4 {
            let dgs = p.packetize(&frame_bytes(n, 2000), 0, 0).expect("fits");
            numbers.extend(push_all(&mut r, &dgs).iter().map(|f| f.number));
        }
        assert_eq!(numbers, [u32::MAX - 1, u32::MAX, 0, 1]);
        // A fragment of frame u32::MAX is now late, not "newer".
        let mut old = Packetizer::starting_at(3, 0, u32::MAX);
        let dgs = old.packetize(&frame_bytes(9, 10), 0, 0).expect("fits");
        assert!(push_all(&mut r, &dgs).is_empty());
        assert_eq!(r.stats().late, 1);
    }

    #[test]
    fn test_restart_and_reset() {
        let mut p = Packetizer::starting_at(1, 0, 50_000);
        let mut r = Reassembler::new(ReassemblerConfig::default());
        push_all(&mut r, &p.packetize(b"a", 0, 0).expect("fits"));
        // The source restarts at frame 0: far older than the window, taken as a restart.
        let mut p = Packetizer::new(1);
        let out = push_all(&mut r, &p.packetize(b"b", 0, 0).expect("fits"));
        assert_eq!(out.len(), 1);
        assert_eq!(r.stats().restarts, 1);
        // After reset, another stream is accepted and old numbers are not late.
        r.reset();
        let mut q = Packetizer::new(2);
        let out = push_all(&mut r, &q.packetize(b"c", 0, 0).expect("fits"));
        assert_eq!((out.len(), out[0].stream), (1, 2));
        assert_eq!(r.stats().late, 0);
    }

    #[test]
    fn test_flags_union_without_retransmit() {
        let mut p = Packetizer::new(1);
        let mut r = Reassembler::new(ReassemblerConfig::default());
        let dgs = p
            .packetize(&frame_bytes(0, 2000), 0, flags::KEYFRAME)
            .expect("fits");
        let (h0, p0) = parse(&dgs[0]);
        let (mut h1, p1) = parse(&dgs[1]);
        h1.flags |= flags::RETRANSMIT;
        assert!(r.push(&h0, p0).is_none());
        let f = r.push(&h1, p1).expect("complete");
        assert_eq!(f.flags, flags::KEYFRAME);
    }

    #[test]
    fn test_memory_bounded_under_flood() {
        let cfg = ReassemblerConfig::default();
        let mut r = Reassembler::new(cfg);
        let mut rng = 0x1234_5678u32;
        for seq in 0..100_000 {
            // xorshift: frame numbers all over the 32-bit space, each frame incomplete.
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            let h = MediaHeader {
                flags: 0,
                stream: 1,
                seq,
                frame: rng,
                frag_index: 0,
                frag_count: 2,
                timestamp: 0,
            };
            assert!(r.push(&h, &[0u8; MAX_PAYLOAD_LEN]).is_none());
            assert!(r.pending_frames() <= cfg.max_pending);
            let held: usize = r.pending.iter().map(|q| q.bytes).sum();
            assert!(held <= cfg.max_pending * cfg.max_frame_len);
            assert!(r.pending.iter().all(|q| q.frags.len() <= r.max_fragments()));
        }
        assert_eq!(r.stats().frames, 0);
        assert!(r.stats().incomplete_dropped > 0);
    }

    /// For each frame, its fragment indices in arrival order, each with "also duplicated".
    type Orders = Vec<Vec<(usize, bool)>>;

    /// Frames, and for each its fragments in a shuffled order with duplicates.
    fn arb_stream() -> impl Strategy<Value = (Vec<Vec<u8>>, Orders)> {
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6000), 1..8)
            .prop_flat_map(|frames| {
                let orders: Vec<_> = frames
                    .iter()
                    .map(|f| {
                        let n = f.len().div_ceil(MAX_PAYLOAD_LEN).max(1);
                        (
                            Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
                            proptest::collection::vec(any::<bool>(), n),
                        )
                            .prop_map(|(order, dup)| order.into_iter().zip(dup).collect::<Vec<_>>())
                    })
                    .collect();
                (Just(frames), orders)
            })
    }

    proptest! {
        #[test]
        fn prop_arbitrary_input_stays_bounded(
            input in proptest::collection::vec(
                (any::<u8>(), 0u32..3, 0u32..40, 0u16..6, 0u16..6, 0usize..1600),
                0..300,
            )
        ) {
            let cfg = ReassemblerConfig { max_pending: 4, max_frame_len: 4000, restart_window: 16 };
            let mut r = Reassembler::new(cfg);
            let payload = vec![0xabu8; 1600];
            let mut last: Option<u32> = None;
            for (fl, stream, frame, idx, count, len) in input {
                let h = MediaHeader { flags: fl, stream, seq: 0, frame, frag_index: idx, frag_count: count, timestamp: 0 };
                if let Some(f) = r.push(&h, &payload[..len]) {
                    prop_assert!(f.data.len() <= cfg.max_frame_len);
                    prop_assert_eq!(f.flags & flags::RETRANSMIT, 0);
                    if let Some(l) = last {
                        // In order, unless the source was taken as restarted.
                        prop_assert!(older(l, f.number) || r.stats().restarts > 0);
                    }
                    last = Some(f.number);
                }
                prop_assert!(r.pending_frames() <= cfg.max_pending);
            }
        }

        #[test]
        fn prop_packetize_reassemble((frames, orders) in arb_stream(), seq0 in any::<u32>(), frame0 in any::<u32>()) {
            let mut p = Packetizer::starting_at(7, seq0, frame0);
            let mut r = Reassembler::new(ReassemblerConfig::default());
            let mut out = Vec::new();
            for (i, (f, order)) in frames.iter().zip(&orders).enumerate() {
                let dgs = p.packetize(f, i as u32, flags::KEYFRAME).expect("fits");
                for &(k, dup) in order {
                    let (h, pl) = parse(&dgs[k]);
                    out.extend(r.push(&h, pl));
                    if dup {
                        out.extend(r.push(&h, pl));
                    }
                }
            }
            prop_assert_eq!(out.len(), frames.len());
            for (i, (got, want)) in out.iter().zip(&frames).enumerate() {
                prop_assert_eq!(&got.data[..], &want[..]);
                prop_assert_eq!(got.number, frame0.wrapping_add(i as u32));
                prop_assert_eq!(got.timestamp, i as u32);
            }
            let dups: usize = orders.iter().flatten().filter(|(_, d)| *d).count();
            prop_assert_eq!(r.stats().duplicates, dups as u64);
            prop_assert_eq!(r.stats().incomplete_dropped + r.stats().late + r.stats().malformed, 0);
        }

        #[test]
        fn prop_drop_one_fragment_drops_that_frame_only(
            (frames, orders) in arb_stream(), victim in any::<prop::sample::Index>(), which in any::<prop::sample::Index>()
        ) {
            let victim = victim.index(frames.len());
            let mut p = Packetizer::new(7);
            let mut r = Reassembler::new(ReassemblerConfig::default());
            let mut out = Vec::new();
            for (i, (f, order)) in frames.iter().zip(&orders).enumerate() {
                let dgs = p.packetize(f, 0, 0).expect("fits");
                let skip = (i == victim).then(|| order[which.index(order.len())].0);
                for &(k, _) in order {
                    if Some(k) == skip {
                        continue;
                    }
                    let (h, pl) = parse(&dgs[k]);
                    out.extend(r.push(&h, pl));
                }
            }
            let numbers: Vec<u32> = out.iter().map(|f| f.number).collect();
            let want: Vec<u32> = (0..frames.len() as u32).filter(|&n| n as usize != victim).collect();
            prop_assert_eq!(numbers, want);
            for f in &out {
                prop_assert_eq!(&f.data[..], &frames[f.number as usize][..]);
            }
            // The victim is counted as dropped once a later frame completes, if any fragment
            // of it arrived at all (a lost single-fragment frame leaves no trace).
            let seen = orders[victim].len() > 1 && victim != frames.len() - 1;
            prop_assert_eq!(r.stats().incomplete_dropped, u64::from(seen));
        }
    }
}
