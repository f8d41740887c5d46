//! HTTP Live Streaming of MPEG-TS units, sans-IO: units with keyframe flags and 90 kHz
//! timestamps in, playlist text and segment bytes out (RFC 8216, with the Low-Latency
//! extension of its second edition: partial segments, blocking playlist reload and a
//! preload hint).
//!
//! Segments are MPEG-TS, made of the units the overlay carries: a unit is already whole
//! TS packets, and one that is a keyframe starts with PAT and PMT (see [`crate::ts`]), so
//! a segment cut at a keyframe is decodable on its own with no remuxing at all. (The
//! other choice, fragmented MP4, would need an H.264 parser and an MP4 writer here for no
//! gain in the players that matter: Chromium, Safari and hls.js all play TS segments.)
//!
//! - A **segment** starts at a keyframe, and is closed at the first keyframe at least
//!   [`HlsConfig::segment_target`] after its start: with a source that has a keyframe
//!   every 2 s, segments are 2 s long. A segment that reaches
//!   [`HlsConfig::max_segment`] or [`HlsConfig::max_segment_bytes`] without a keyframe
//!   is closed anyway (counted in [`HlsStats::forced_cuts`]).
//! - A segment is made of **parts** of at most [`HlsConfig::part_target`]; a part that
//!   starts with a keyframe is `INDEPENDENT=YES`. The playlist lists the parts of the
//!   segment being made and of the last few complete ones, and hints the next part
//!   (`EXT-X-PRELOAD-HINT`). A zero part target turns parts off (plain HLS).
//! - Only the last [`HlsConfig::window`] complete segments are kept, and fewer when
//!   their bytes pass [`HlsConfig::max_bytes`]: memory is bounded whatever the input.
//! - Timestamps are the decode times of the units (33-bit PTS/DTS, see
//!   [`unit_time`]), unwrapped. A backward step or a jump forward of more than
//!   [`HlsConfig::max_gap`] (a source that restarted or changed) closes the segment and
//!   marks the next one `EXT-X-DISCONTINUITY`; the playlist's own timeline stays
//!   continuous.
//! - Units before the first keyframe are dropped: a playlist never starts undecodable.
//!
//! Names in the playlist are relative: `s{N}.ts` for segment N (its media sequence
//! number), `p{N}.{I}.ts` for part I of segment N. [`Segmenter::lookup`] resolves them.
//!
//! ```
//! use bytes::Bytes;
//! use ott_media::hls::{HlsConfig, Lookup, Segmenter};
//!
//! let mut s = Segmenter::new(HlsConfig { segment_target: 90_000, part_target: 0, ..HlsConfig::default() });
//! // 25 frames a second, a keyframe every second.
//! for i in 0..76u64 {
//!     s.push(Bytes::from_static(&[0x47; 188]), i % 25 == 0, Some(i * 3600));
//! }
//! let playlist = s.playlist();
//! assert!(playlist.contains("#EXTINF:1.000,\ns0.ts\n"));
//! assert!(playlist.contains("s2.ts") && !playlist.contains("s3.ts"));
//! assert!(matches!(s.lookup("s1.ts"), Lookup::Ready(b) if b.len() == 25 * 188));
//! ```

use std::collections::VecDeque;
use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};

use crate::ts::{self, Packet, PAT_PID, PTS_WRAP};

/// Ticks of the 90 kHz media clock per second.
pub const CLOCK: u64 = 90_000;

/// Limits and targets of a [`Segmenter`]; durations in 90 kHz ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HlsConfig {
    /// A segment is closed at the first keyframe at least this long after its start
    /// (default 1 s: every keyframe of a source with a longer keyframe interval).
    pub segment_target: u64,
    /// Longest part (default 0.5 s); 0: no parts.
    pub part_target: u64,
    /// A segment this long without a keyframe is closed anyway (default 10 s).
    pub max_segment: u64,
    /// A segment that would grow past this many bytes is closed anyway (default 8 MiB).
    pub max_segment_bytes: usize,
    /// Complete segments kept and listed (default 6).
    pub window: usize,
    /// Most bytes of complete segments kept (default 24 MiB); the oldest go first, but
    /// the newest complete segment is always kept.
    pub max_bytes: usize,
    /// A step of the timestamps forward by more than this is a discontinuity (default 5 s).
    pub max_gap: u64,
    /// Duration of a unit when nothing better is known (default 40 ms).
    pub default_unit: u64,
}

impl Default for HlsConfig {
    fn default() -> Self {
        Self {
            segment_target: CLOCK,
            part_target: CLOCK / 2,
            max_segment: 10 * CLOCK,
            max_segment_bytes: 8 << 20,
            window: 6,
            max_bytes: 24 << 20,
            max_gap: 5 * CLOCK,
            default_unit: CLOCK / 25,
        }
    }
}

/// Counters of a [`Segmenter`], cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HlsStats {
    /// Units taken into segments.
    pub units: u64,
    /// Units dropped while waiting for the first keyframe.
    pub skipped: u64,
    /// Segments completed.
    pub segments: u64,
    /// Segments closed without a keyframe next (too long or too large).
    pub forced_cuts: u64,
    /// Timestamp jumps marked as discontinuities.
    pub discontinuities: u64,
    /// Complete segments dropped early because of [`HlsConfig::max_bytes`].
    pub evicted: u64,
    /// Units without a readable timestamp (their time was guessed).
    pub untimed: u64,
}

/// What [`Segmenter::lookup`] found for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The bytes of the segment or part.
    Ready(Bytes),
    /// Not made yet, but soon: the segment being made, the next one, or their parts.
    /// A server may wait for it (LL-HLS clients ask for the hinted part early).
    Pending,
    /// A segment or part that was dropped from the window, or will not come soon.
    Gone,
    /// Not a name of ours.
    Invalid,
}

#[derive(Debug, Clone)]
struct Part {
    units: Vec<Bytes>,
    bytes: usize,
    start: u64,
    /// Time at which the part ends (the start of the unit after its last one, or its
    /// last unit plus one unit duration while it is open).
    end: u64,
    independent: bool,
}

impl Part {
    fn new(start: u64, independent: bool) -> Self {
        Self {
            units: Vec::new(),
            bytes: 0,
            start,
            end: start,
            independent,
        }
    }

    fn data(&self) -> Bytes {
        concat(self.units.iter())
    }
}

#[derive(Debug, Clone)]
struct Segment {
    msn: u64,
    /// Closed parts; the last one is open while the segment is being made.
    parts: Vec<Part>,
    bytes: usize,
    start: u64,
    discontinuity: bool,
    /// Discontinuity sequence number of this segment.
    dseq: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.parts.last().map_or(self.start, |p| p.end)
    }

    fn data(&self) -> Bytes {
        concat(self.parts.iter().flat_map(|p| p.units.iter()))
    }
}

fn concat<'a>(units: impl Iterator<Item = &'a Bytes> + Clone) -> Bytes {
    let len = units.clone().map(Bytes::len).sum();
    let mut b = BytesMut::with_capacity(len);
    for u in units {
        b.extend_from_slice(u);
    }
    b.freeze()
}

/// Cuts a live stream of TS units into an HLS playlist with a bounded window of
/// segments. See the [module documentation](self).
#[derive(Debug)]
pub struct Segmenter {
    config: HlsConfig,
    /// Complete segments, oldest first.
    done: VecDeque<Segment>,
    done_bytes: usize,
    /// The segment being made.
    open: Option<Segment>,
    next_msn: u64,
    dseq: u64,
    /// The last timestamp read and where it fell on our timeline.
    anchor: Option<(u64, u64)>,
    /// Latest time on our timeline so far.
    last_time: Option<u64>,
    /// Step between the last two units (the duration of a unit, as far as known).
    last_delta: u64,
    /// The next unit starts a discontinuity.
    jump: bool,
    /// Where segment 0 started: the playlist's timeline counts from there.
    origin: Option<u64>,
    /// Longest segment so far, whole seconds rounded (EXT-X-TARGETDURATION never shrinks).
    target_secs: u64,
    stats: HlsStats,
}

impl Segmenter {
    /// An empty segmenter. Zero or tiny values in `config` are raised to sane minimums.
    pub fn new(mut config: HlsConfig) -> Self {
        config.window = config.window.max(1);
        config.segment_target = config.segment_target.max(1);
        config.max_segment = config.max_segment.max(config.segment_target);
        config.max_gap = config.max_gap.max(1);
        config.default_unit = config.default_unit.max(1);
        if config.part_target > 0 {
            config.part_target = config.part_target.max(CLOCK / 100);
        }
        Self {
            config,
            done: VecDeque::new(),
            done_bytes: 0,
            open: None,
            next_msn: 0,
            dseq: 0,
            anchor: None,
            last_time: None,
            last_delta: config.default_unit,
            jump: false,
            origin: None,
            target_secs: secs_rounded(config.segment_target).max(1),
            stats: HlsStats::default(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &HlsConfig {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> HlsStats {
        self.stats
    }

    /// Bytes held in segments (complete and being made).
    pub fn bytes(&self) -> usize {
        self.done_bytes + self.open.as_ref().map_or(0, |s| s.bytes)
    }

    /// Media sequence numbers of the oldest segment held and of the segment being made
    /// (the next to be made before the first keyframe).
    pub fn sequence(&self) -> (u64, u64) {
        let first = self.done.front().map_or(self.next_msn, |s| s.msn);
        (first, self.next_msn)
    }

    /// Whether a player that does not know partial segments can start: at least one
    /// complete segment.
    pub fn ready(&self) -> bool {
        !self.done.is_empty()
    }

    /// Complete segments held.
    pub fn complete_segments(&self) -> usize {
        self.done.len()
    }

    /// The end of what was received, in seconds on the playlist's timeline (segment 0
    /// starts at 0).
    pub fn live_edge(&self) -> Option<f64> {
        let origin = self.origin?;
        let end = self.open.as_ref().or(self.done.back()).map(Segment::end)?;
        Some(seconds(end.saturating_sub(origin)))
    }

    /// Where segment `msn` starts, in seconds on the playlist's timeline, if it is held.
    pub fn segment_start(&self, msn: u64) -> Option<f64> {
        let origin = self.origin?;
        self.done
            .iter()
            .chain(self.open.as_ref())
            .find(|s| s.msn == msn)
            .map(|s| seconds(s.start.saturating_sub(origin)))
    }

    /// Take one unit: whole TS packets, `keyframe` when it is a decodable start, `time`
    /// its 33-bit 90 kHz decode time ([`unit_time`]) when known (else it is guessed
    /// from the units before).
    pub fn push(&mut self, unit: Bytes, keyframe: bool, time: Option<u64>) {
        if self.open.is_none() && !keyframe {
            self.stats.skipped += 1;
            return;
        }
        let t = self.timeline(time);
        self.stats.units += 1;
        let cfg = self.config;
        let jump = std::mem::take(&mut self.jump);
        let cut = match &self.open {
            None => true,
            Some(seg) => {
                let len = t.saturating_sub(seg.start);
                let forced =
                    len >= cfg.max_segment || seg.bytes + unit.len() > cfg.max_segment_bytes;
                if forced && !keyframe && !jump {
                    self.stats.forced_cuts += 1;
                }
                (keyframe && len >= cfg.segment_target) || jump || forced
            }
        };
        if cut {
            if let Some(mut seg) = self.open.take() {
                if let Some(p) = seg.parts.last_mut() {
                    p.end = t;
                }
                self.close(seg);
            }
            if jump && self.origin.is_some() {
                self.dseq += 1;
            }
            self.origin.get_or_insert(t);
            self.open = Some(Segment {
                msn: self.next_msn,
                parts: vec![Part::new(t, keyframe)],
                bytes: 0,
                start: t,
                discontinuity: jump,
                dseq: self.dseq,
            });
        }
        let delta = self.last_delta;
        let Some(seg) = self.open.as_mut() else {
            return;
        };
        if let Some(part) = seg.parts.last_mut() {
            // A new part when this unit would take the open one past the part target,
            // or at a keyframe (a part that starts with one is independent).
            if cfg.part_target > 0
                && !part.units.is_empty()
                && (keyframe || t + delta > part.start + cfg.part_target)
            {
                part.end = t;
                seg.parts.push(Part::new(t, keyframe));
            }
        }
        if let Some(part) = seg.parts.last_mut() {
            part.bytes += unit.len();
            part.end = t + delta;
            part.units.push(unit);
        }
        seg.bytes = seg.parts.iter().map(|p| p.bytes).sum();
    }

    /// Place a 33-bit timestamp on the continuous timeline: wraps are unwrapped, small
    /// backward steps are held at the latest time, and big jumps either way start a
    /// discontinuity (the timeline goes on one unit later).
    fn timeline(&mut self, time: Option<u64>) -> u64 {
        let guess = self.last_time.map_or(0, |l| l + self.last_delta);
        let t = match (time.map(|r| r % PTS_WRAP), self.anchor) {
            (None, _) => {
                self.stats.untimed += 1;
                guess
            }
            (Some(raw), None) => {
                self.anchor = Some((raw, guess));
                guess
            }
            (Some(raw), Some((a_raw, a_t))) => {
                let ahead = raw.wrapping_sub(a_raw) % PTS_WRAP;
                let behind = a_raw.wrapping_sub(raw) % PTS_WRAP;
                if ahead <= self.config.max_gap {
                    self.anchor = Some((raw, a_t + ahead));
                    a_t + ahead
                } else if behind <= self.config.max_gap {
                    a_t
                } else {
                    self.stats.discontinuities += 1;
                    self.jump = true;
                    self.anchor = Some((raw, guess));
                    guess
                }
            }
        };
        match self.last_time {
            Some(l) if t > l => {
                self.last_delta = t - l;
                self.last_time = Some(t);
            }
            Some(_) => {}
            None => self.last_time = Some(t),
        }
        t
    }

    fn close(&mut self, seg: Segment) {
        self.stats.segments += 1;
        self.target_secs = self
            .target_secs
            .max(secs_rounded(seg.end().saturating_sub(seg.start)));
        self.next_msn = seg.msn + 1;
        self.done_bytes += seg.bytes;
        self.done.push_back(seg);
        while self.done.len() > self.config.window
            || (self.done_bytes > self.config.max_bytes && self.done.len() > 1)
        {
            let over_count = self.done.len() > self.config.window;
            if let Some(old) = self.done.pop_front() {
                self.done_bytes -= old.bytes;
                if !over_count {
                    self.stats.evicted += 1;
                }
            }
        }
    }

    /// Whether the playlist lists segment `msn` whole, or with `part` given, that part of
    /// it (or anything later): what a blocking playlist reload
    /// (`_HLS_msn`/`_HLS_part`) waits for.
    pub fn has(&self, msn: u64, part: Option<u64>) -> bool {
        if msn < self.next_msn {
            return true;
        }
        match (part, &self.open) {
            (Some(p), Some(seg)) if seg.msn == msn => {
                // The open segment's parts but its last (still being filled) are listed.
                (p as usize) + 1 < seg.parts.len()
            }
            _ => false,
        }
    }

    /// The media playlist.
    pub fn playlist(&self) -> String {
        self.playlist_last(self.config.window)
    }

    /// The media playlist listing only the last `n` complete segments (at least one):
    /// a player that starts some segments back from the end (Chromium: three) then
    /// starts closer to the live edge.
    pub fn playlist_last(&self, n: usize) -> String {
        let cfg = &self.config;
        let parts = cfg.part_target > 0;
        let skip = self.done.len().saturating_sub(n.max(1));
        let done = self.done.iter().skip(skip);
        let mut out = String::with_capacity(256 + 64 * self.done.len());
        let first = self.done.get(skip).map_or(self.next_msn, |s| s.msn);
        let dseq = self
            .done
            .get(skip)
            .or(self.open.as_ref())
            .map_or(self.dseq, |s| s.dseq);
        let _ = write!(
            out,
            "#EXTM3U\n#EXT-X-VERSION:{}\n#EXT-X-TARGETDURATION:{}\n#EXT-X-MEDIA-SEQUENCE:{first}\n#EXT-X-DISCONTINUITY-SEQUENCE:{dseq}\n",
            if parts { 9 } else { 3 },
            self.target_secs,
        );
        if parts {
            let pt = seconds(cfg.part_target);
            let _ = write!(
                out,
                "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={:.3}\n#EXT-X-PART-INF:PART-TARGET={pt:.3}\n",
                3.0 * pt
            );
        }
        // Parts are listed for the segment being made and the last two complete ones.
        let with_parts = self.done.len().saturating_sub(2);
        for (i, seg) in done.enumerate().map(|(i, s)| (i + skip, s)) {
            if seg.discontinuity {
                out.push_str("#EXT-X-DISCONTINUITY\n");
            }
            if parts && i >= with_parts {
                list_parts(&mut out, seg, seg.parts.len());
            }
            let _ = write!(
                out,
                "#EXTINF:{:.3},\ns{}.ts\n",
                seconds(seg.end().saturating_sub(seg.start)),
                seg.msn
            );
        }
        if let (true, Some(seg)) = (parts, &self.open) {
            if seg.discontinuity {
                out.push_str("#EXT-X-DISCONTINUITY\n");
            }
            let closed = seg.parts.len().saturating_sub(1);
            list_parts(&mut out, seg, closed);
            let _ = writeln!(
                out,
                "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"p{}.{closed}.ts\"",
                seg.msn
            );
        }
        out
    }

    /// The bytes of `name` (`s{N}.ts` or `p{N}.{I}.ts`), or why not.
    pub fn lookup(&self, name: &str) -> Lookup {
        let Some((msn, part)) = parse_name(name) else {
            return Lookup::Invalid;
        };
        if let Some(seg) = self.done.iter().find(|s| s.msn == msn) {
            return match part {
                None => Lookup::Ready(seg.data()),
                Some(i) => usize::try_from(i)
                    .ok()
                    .and_then(|i| seg.parts.get(i))
                    .map_or(Lookup::Gone, |p| Lookup::Ready(p.data())),
            };
        }
        match (&self.open, part) {
            (Some(seg), Some(i)) if seg.msn == msn => {
                let closed = seg.parts.len().saturating_sub(1) as u64;
                match usize::try_from(i).ok().and_then(|i| seg.parts.get(i)) {
                    Some(p) if i < closed => Lookup::Ready(p.data()),
                    // The part being filled, or the one after it.
                    _ if i <= closed + 1 => Lookup::Pending,
                    _ => Lookup::Gone,
                }
            }
            (Some(seg), None) if seg.msn == msn => Lookup::Pending,
            // The first part of the next segment can be hinted just before a cut.
            (Some(seg), Some(0)) if seg.msn + 1 == msn => Lookup::Pending,
            (None, _) if msn == self.next_msn => Lookup::Pending,
            _ => Lookup::Gone,
        }
    }
}

fn list_parts(out: &mut String, seg: &Segment, count: usize) {
    for (i, p) in seg.parts.iter().take(count).enumerate() {
        let _ = writeln!(
            out,
            "#EXT-X-PART:DURATION={:.3},URI=\"p{}.{i}.ts\"{}",
            seconds(p.end.saturating_sub(p.start)),
            seg.msn,
            if p.independent {
                ",INDEPENDENT=YES"
            } else {
                ""
            }
        );
    }
}

fn seconds(ticks: u64) -> f64 {
    ticks as f64 / CLOCK as f64
}

fn secs_rounded(ticks: u64) -> u64 {
    (ticks + CLOCK / 2) / CLOCK
}

/// `s{N}.ts` → `(N, None)`, `p{N}.{I}.ts` → `(N, Some(I))`.
pub fn parse_name(name: &str) -> Option<(u64, Option<u64>)> {
    let stem = name.strip_suffix(".ts")?;
    let digits = |s: &str| {
        (!s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    if let Some(n) = stem.strip_prefix('s') {
        return Some((digits(n)?, None));
    }
    let (n, i) = stem.strip_prefix('p')?.split_once('.')?;
    Some((digits(n)?, Some(digits(i)?)))
}

/// The 33-bit 90 kHz decode time of a TS unit: the DTS (else PTS) of the first PES
/// packet that starts in it (the unit's primary access unit, see [`crate::ts`]).
pub fn unit_time(unit: &[u8]) -> Option<u64> {
    unit.chunks_exact(ts::PACKET_LEN)
        .filter_map(Packet::new)
        .filter(|p| p.pusi() && p.pid() != PAT_PID)
        .find_map(|p| ts::parse_pes(p.payload()).and_then(|h| h.decode_time()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: u64 = CLOCK / 25;

    /// A unit of `n` TS packets whose first byte after the header tells it apart.
    fn unit(tag: u8) -> Bytes {
        let mut b = vec![0x47u8; 188];
        b[4] = tag;
        Bytes::from(b)
    }

    /// `frames` units at 25 fps from `t0`, a keyframe every `gop` frames.
    fn feed(s: &mut Segmenter, t0: u64, frames: u64, gop: u64) {
        for i in 0..frames {
            s.push(unit(i as u8), i % gop == 0, Some(t0 + i * FRAME));
        }
    }

    fn plain() -> HlsConfig {
        HlsConfig {
            part_target: 0,
            ..HlsConfig::default()
        }
    }

    fn extinfs(p: &str) -> Vec<f64> {
        p.lines()
            .filter_map(|l| l.strip_prefix("#EXTINF:"))
            .filter_map(|l| l.trim_end_matches(',').parse().ok())
            .collect()
    }

    fn header(p: &str, tag: &str) -> Option<u64> {
        p.lines()
            .find_map(|l| l.strip_prefix(tag))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn test_segments_are_cut_at_keyframes_and_the_window_slides() {
        let mut s = Segmenter::new(plain());
        assert!(!s.ready());
        assert_eq!(s.lookup("s0.ts"), Lookup::Pending);
        // 2 s GOPs, 20 s: ten segments made, the tenth still open.
        feed(&mut s, 1000, 500, 50);
        let p = s.playlist();
        assert!(p.starts_with("#EXTM3U\n"), "{p}");
        assert_eq!(extinfs(&p), vec![2.0; 6], "{p}");
        assert_eq!(header(&p, "#EXT-X-MEDIA-SEQUENCE:"), Some(3));
        assert_eq!(header(&p, "#EXT-X-TARGETDURATION:"), Some(2));
        assert!(p.contains("s8.ts") && !p.contains("s9.ts"), "{p}");
        assert_eq!(s.sequence(), (3, 9));
        assert_eq!(s.stats().segments, 9);
        assert_eq!(s.lookup("s2.ts"), Lookup::Gone);
        assert_eq!(s.lookup("s9.ts"), Lookup::Pending);
        assert_eq!(s.lookup("s11.ts"), Lookup::Gone);
        assert_eq!(s.lookup("index.m3u8"), Lookup::Invalid);
        // A segment is its units in order, starting with its keyframe.
        let Lookup::Ready(b) = s.lookup("s4.ts") else {
            panic!("s4 is held")
        };
        assert_eq!(b.len(), 50 * 188);
        let tags: Vec<u8> = b.chunks(188).map(|p| p[4]).collect();
        let want: Vec<u8> = (200..250).map(|i: u64| i as u8).collect();
        assert_eq!(tags, want);
        assert_eq!(s.segment_start(4), Some(8.0));
        assert_eq!(s.live_edge(), Some(20.0));
    }

    #[test]
    fn test_a_shorter_playlist_lists_the_newest_segments() {
        let mut s = Segmenter::new(plain());
        feed(&mut s, 0, 500, 50);
        let p = s.playlist_last(1);
        assert_eq!(extinfs(&p), vec![2.0], "{p}");
        assert_eq!(header(&p, "#EXT-X-MEDIA-SEQUENCE:"), Some(8));
        assert!(p.contains("\ns8.ts\n"), "{p}");
        assert_eq!(s.playlist_last(0), p, "at least one segment");
        assert_eq!(s.playlist_last(100), s.playlist());
        assert_eq!(s.complete_segments(), 6);
    }

    #[test]
    fn test_a_short_gop_is_gathered_up_to_the_segment_target() {
        let mut s = Segmenter::new(HlsConfig {
            segment_target: 2 * CLOCK,
            ..plain()
        });
        // A keyframe every 0.4 s: segments of 2 s (five GOPs).
        feed(&mut s, 0, 260, 10);
        assert_eq!(extinfs(&s.playlist()), vec![2.0; 5]);
    }

    #[test]
    fn test_units_before_the_first_keyframe_are_dropped() {
        let mut s = Segmenter::new(plain());
        for i in 0..10 {
            s.push(unit(i), false, Some(u64::from(i) * FRAME));
        }
        assert_eq!(s.stats().skipped, 10);
        assert_eq!(s.bytes(), 0);
        feed(&mut s, 10 * FRAME, 51, 50);
        let Lookup::Ready(b) = s.lookup("s0.ts") else {
            panic!("one segment")
        };
        assert_eq!(b.first().copied(), Some(0x47));
        assert_eq!(b.get(4).copied(), Some(0), "starts at the keyframe");
    }

    #[test]
    fn test_parts_respect_the_target_and_mark_keyframes_independent() {
        let mut s = Segmenter::new(HlsConfig {
            part_target: CLOCK / 5,
            ..HlsConfig::default()
        });
        // 2.5 s: segment 0 complete (2 s), segment 1 has 12 frames.
        feed(&mut s, 0, 62, 50);
        let p = s.playlist();
        assert_eq!(header(&p, "#EXT-X-VERSION:"), Some(9));
        assert!(p.contains("#EXT-X-PART-INF:PART-TARGET=0.200\n"), "{p}");
        assert!(p.contains("PART-HOLD-BACK=0.600"), "{p}");
        let parts: Vec<&str> = p
            .lines()
            .filter(|l| l.starts_with("#EXT-X-PART:"))
            .collect();
        // Segment 0: ten parts of five frames; segment 1: two closed of five, one open.
        assert_eq!(parts.len(), 12, "{p}");
        for l in &parts {
            let d: f64 = l
                .split("DURATION=")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|v| v.parse().ok())
                .expect("a duration");
            assert!(d <= 0.2 + 1e-9, "{l}");
        }
        assert!(parts[0].contains("URI=\"p0.0.ts\",INDEPENDENT=YES"));
        assert!(!parts[1].contains("INDEPENDENT"));
        assert!(parts[10].contains("URI=\"p1.0.ts\",INDEPENDENT=YES"));
        assert!(
            p.ends_with("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"p1.2.ts\"\n"),
            "{p}"
        );
        // The segment is its parts.
        let Lookup::Ready(seg) = s.lookup("s0.ts") else {
            panic!("s0")
        };
        let mut joined = Vec::new();
        for i in 0..10 {
            let Lookup::Ready(b) = s.lookup(&format!("p0.{i}.ts")) else {
                panic!("p0.{i}")
            };
            joined.extend_from_slice(&b);
        }
        assert_eq!(&seg[..], &joined[..]);
        // The open part and the one after are pending; later ones will not come soon.
        assert!(matches!(s.lookup("p1.1.ts"), Lookup::Ready(_)));
        assert_eq!(s.lookup("p1.2.ts"), Lookup::Pending);
        assert_eq!(s.lookup("p1.3.ts"), Lookup::Pending);
        assert_eq!(s.lookup("p1.4.ts"), Lookup::Gone);
        assert_eq!(s.lookup("p2.0.ts"), Lookup::Pending);
        assert_eq!(s.lookup("p0.10.ts"), Lookup::Gone);
        // Blocking reload: what the playlist already has.
        assert!(s.has(0, None) && s.has(1, Some(1)));
        assert!(!s.has(1, Some(2)) && !s.has(1, None) && !s.has(2, Some(0)));
    }

    #[test]
    fn test_old_segments_lose_their_parts_in_the_playlist() {
        let mut s = Segmenter::new(HlsConfig::default());
        feed(&mut s, 0, 300, 50);
        let p = s.playlist();
        assert!(!p.contains("\"p0.") && !p.contains("\"p2."), "{p}");
        assert!(p.contains("\"p3.0.ts") && p.contains("\"p5.0.ts"), "{p}");
    }

    #[test]
    fn test_timestamps_unwrap_across_the_33_bit_wrap() {
        let mut s = Segmenter::new(plain());
        feed(&mut s, PTS_WRAP - 30 * FRAME, 151, 50);
        let p = s.playlist();
        assert_eq!(extinfs(&p), vec![2.0; 3], "{p}");
        assert!(!p.contains("DISCONTINUITY\n"), "{p}");
        assert_eq!(s.stats().discontinuities, 0);
    }

    #[test]
    fn test_a_jump_is_a_discontinuity_and_the_timeline_goes_on() {
        let mut s = Segmenter::new(HlsConfig {
            window: 3,
            ..plain()
        });
        feed(&mut s, 0, 75, 50);
        // The source restarts at another time base, mid-segment.
        feed(&mut s, 5_000_000, 101, 50);
        let p = s.playlist();
        assert_eq!(s.stats().discontinuities, 1);
        let lines: Vec<&str> = p.lines().collect();
        let disc = lines
            .iter()
            .position(|l| *l == "#EXT-X-DISCONTINUITY")
            .expect("a discontinuity");
        assert_eq!(lines.get(disc + 2), Some(&"s2.ts"), "{p}");
        // Segment 1 (cut by the jump) lasted one GOP half; the timeline stays continuous.
        assert_eq!(extinfs(&p), vec![1.0, 2.0, 2.0], "{p}");
        assert_eq!(s.segment_start(2), Some(3.0));
        // Once the discontinuity leaves the window, the sequence counts it.
        feed(&mut s, 5_000_000 + 101 * FRAME, 150, 50);
        let p = s.playlist();
        assert!(!p.contains("#EXT-X-DISCONTINUITY\n"), "{p}");
        assert_eq!(header(&p, "#EXT-X-DISCONTINUITY-SEQUENCE:"), Some(1));
    }

    #[test]
    fn test_small_backward_steps_and_missing_times_do_not_break_the_timeline() {
        let mut s = Segmenter::new(plain());
        s.push(unit(0), true, Some(10 * FRAME));
        s.push(unit(1), false, Some(9 * FRAME));
        s.push(unit(2), false, None);
        s.push(unit(3), false, Some(12 * FRAME));
        assert_eq!(s.stats().discontinuities, 0);
        assert_eq!(s.stats().untimed, 1);
        assert_eq!(s.live_edge(), Some(3.0 * FRAME as f64 / CLOCK as f64));
    }

    #[test]
    fn test_memory_is_bounded_without_keyframes_and_by_bytes() {
        let mut s = Segmenter::new(HlsConfig {
            max_segment: 2 * CLOCK,
            max_bytes: 100 * 188,
            ..plain()
        });
        // One keyframe, then none for 20 s.
        feed(&mut s, 0, 500, 1000);
        assert_eq!(s.stats().forced_cuts, 9);
        // Each forced segment is 50 units (9400 bytes): two fit in the cap with the
        // open one.
        assert!(s.bytes() <= 100 * 188 + 50 * 188, "{}", s.bytes());
        assert!(s.stats().evicted > 0);
        assert_eq!(extinfs(&s.playlist()).len(), 2);
        // A segment larger than max_segment_bytes is cut there.
        let mut s = Segmenter::new(HlsConfig {
            max_segment_bytes: 10 * 188,
            ..plain()
        });
        feed(&mut s, 0, 45, 50);
        assert_eq!(s.stats().forced_cuts, 4);
    }

    #[test]
    fn test_names() {
        assert_eq!(parse_name("s12.ts"), Some((12, None)));
        assert_eq!(parse_name("p3.0.ts"), Some((3, Some(0))));
        for bad in [
            "s.ts",
            "s-1.ts",
            "s1",
            "p1.ts",
            "p1..ts",
            "x1.ts",
            "s+1.ts",
            "s99999999999999999999.ts",
            "p1.2.3.ts",
            "",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn test_unit_time_reads_the_first_pes_timestamp() {
        // PAT, then a PES start with PTS 0x1_2345_6789 and DTS 0x1_2345_6000.
        let mut pat = vec![0x47u8, 0x40, 0x00, 0x10, 0];
        pat.resize(188, 0xff);
        let mut pes = vec![0x47u8, 0x41, 0x00, 0x10];
        pes.extend_from_slice(&[0, 0, 1, 0xe0, 0, 0, 0x80, 0xc0, 10]);
        let enc = |marker: u8, t: u64| {
            [
                (marker << 4) | (((t >> 29) & 0x0e) as u8) | 1,
                (t >> 22) as u8,
                (((t >> 14) & 0xfe) as u8) | 1,
                (t >> 7) as u8,
                (((t << 1) & 0xfe) as u8) | 1,
            ]
        };
        pes.extend_from_slice(&enc(3, 0x1_2345_6789));
        pes.extend_from_slice(&enc(1, 0x1_2345_6000));
        pes.resize(188, 0xff);
        let unit: Vec<u8> = [pat, pes].concat();
        assert_eq!(unit_time(&unit), Some(0x1_2345_6000));
        assert_eq!(unit_time(&unit[..188]), None);
        assert_eq!(unit_time(&[0x47, 1, 2]), None);
    }

    proptest::proptest! {
        #[test]
        fn prop_any_input_keeps_the_bounds(
            input in proptest::collection::vec(
                (proptest::prelude::any::<bool>(), proptest::option::of(0u64..(1 << 34)), 1usize..4000),
                0..300,
            )
        ) {
            let cfg = HlsConfig { max_bytes: 64 * 1024, max_segment_bytes: 16 * 1024, window: 3, ..HlsConfig::default() };
            let mut s = Segmenter::new(cfg);
            for (key, t, len) in input {
                s.push(Bytes::from(vec![0x47; len]), key, t);
                proptest::prop_assert!(s.bytes() <= cfg.max_bytes + 2 * cfg.max_segment_bytes);
                let p = s.playlist();
                proptest::prop_assert!(extinfs(&p).len() <= cfg.window);
                let (first, next) = s.sequence();
                proptest::prop_assert!(first <= next);
            }
        }
    }
}
