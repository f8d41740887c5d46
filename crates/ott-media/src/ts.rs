//! MPEG transport stream framing, sans-IO.
//!
//! A transport stream is a sequence of 188-byte packets. This module cuts one into
//! *units* that the overlay carries as frames:
//!
//! - a unit is one access unit of the *primary* elementary stream (the first video
//!   stream of the first program, else its first stream), together with every other
//!   packet (audio, SI, PCR-only) muxed between it and the next one; PAT and PMT packets
//!   always open a new unit, so a unit that starts a GOP starts with them;
//! - a unit is a *keyframe* (a decodable start) when its primary access unit is one
//!   (H.264 IDR, HEVC IRAP, MPEG-2 sequence header, or a random access indicator;
//!   audio-only streams: every unit) and it carries the PAT and the PMT: when the
//!   source did not repeat them there, the latest ones are inserted in front;
//! - the continuity counters of PAT and PMT packets are rewritten so that inserted
//!   copies keep them continuous.
//!
//! [`TsFramer`] is incremental (bytes in any chunking, resynchronising on the sync byte),
//! so the same code frames a file and a live feed. [`Restamp`] shifts the PCR, PTS, DTS
//! and continuity counters of packets, which is how a looped clip stays one continuous
//! stream for players.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// Length of one transport stream packet.
pub const PACKET_LEN: usize = 188;
/// First byte of every packet.
pub const SYNC_BYTE: u8 = 0x47;
/// Whole TS packets carried in one media datagram.
pub const PACKETS_PER_DATAGRAM: usize = 7;
/// Payload of a full TS media datagram: 7 × 188 = 1316 bytes.
pub const DATAGRAM_PAYLOAD: usize = PACKETS_PER_DATAGRAM * PACKET_LEN;
/// PID of the program association table.
pub const PAT_PID: u16 = 0;
/// PID of null (stuffing) packets.
pub const NULL_PID: u16 = 0x1fff;
/// PTS and DTS are 33-bit counters of a 90 kHz clock.
pub const PTS_WRAP: u64 = 1 << 33;
/// Largest unit a [`TsFramer`] builds; a longer run of packets is cut there (not a keyframe).
pub const MAX_UNIT_LEN: usize = 11_000 * PACKET_LEN;
/// Most PCR samples a [`TsFramer`] keeps (16 bytes each). When full, every other one is
/// dropped and later PCRs are kept at twice the stride, so the samples still span the
/// whole input (a live feed runs for ever; a clip of 40 ms PCRs fills it after 5 min).
pub const MAX_PCR_SAMPLES: usize = 8192;

/// A view of one 188-byte transport stream packet.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    b: &'a [u8],
}

impl<'a> Packet<'a> {
    /// A view of `b` if it is exactly one packet starting with the sync byte.
    pub fn new(b: &'a [u8]) -> Option<Self> {
        (b.len() == PACKET_LEN && b.first() == Some(&SYNC_BYTE)).then_some(Self { b })
    }

    fn byte(&self, i: usize) -> u8 {
        self.b.get(i).copied().unwrap_or(0)
    }

    /// Packet identifier.
    pub fn pid(&self) -> u16 {
        (u16::from(self.byte(1) & 0x1f) << 8) | u16::from(self.byte(2))
    }

    /// Payload unit start indicator: a PES packet or a PSI section starts here.
    pub fn pusi(&self) -> bool {
        self.byte(1) & 0x40 != 0
    }

    /// Continuity counter (4 bits).
    pub fn cc(&self) -> u8 {
        self.byte(3) & 0x0f
    }

    /// Whether the packet carries a payload (its continuity counter then counts).
    pub fn has_payload(&self) -> bool {
        self.byte(3) & 0x10 != 0
    }

    /// The adaptation field after its length byte (flags first), if any and well formed.
    pub fn adaptation(&self) -> Option<&'a [u8]> {
        if self.byte(3) & 0x20 == 0 {
            return None;
        }
        let len = usize::from(self.byte(4));
        self.b.get(5..5 + len)
    }

    /// The payload bytes (empty when there is none or the adaptation field is malformed).
    pub fn payload(&self) -> &'a [u8] {
        if !self.has_payload() {
            return &[];
        }
        let start = if self.byte(3) & 0x20 != 0 {
            5 + usize::from(self.byte(4))
        } else {
            4
        };
        self.b.get(start..).unwrap_or(&[])
    }

    /// The random access indicator of the adaptation field.
    pub fn random_access(&self) -> bool {
        self.adaptation()
            .and_then(|a| a.first())
            .is_some_and(|f| f & 0x40 != 0)
    }

    /// The program clock reference, 27 MHz (base × 300 + extension), if the packet has one.
    pub fn pcr(&self) -> Option<u64> {
        let a = self.adaptation()?;
        if a.first()? & 0x10 == 0 {
            return None;
        }
        let p = a.get(1..7)?;
        let base = (u64::from(p[0]) << 25)
            | (u64::from(p[1]) << 17)
            | (u64::from(p[2]) << 9)
            | (u64::from(p[3]) << 1)
            | (u64::from(p[4]) >> 7);
        let ext = (u64::from(p[4] & 1) << 8) | u64::from(p[5]);
        Some(base * 300 + ext)
    }
}

/// PTS and DTS of a PES header, and where its elementary stream data starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PesHeader {
    /// Presentation timestamp, 90 kHz, 33 bits.
    pub pts: Option<u64>,
    /// Decoding timestamp, 90 kHz, 33 bits.
    pub dts: Option<u64>,
    /// Offset of the elementary stream data in the payload.
    pub data_offset: usize,
}

impl PesHeader {
    /// The decoding time: DTS, else PTS.
    pub fn decode_time(&self) -> Option<u64> {
        self.dts.or(self.pts)
    }
}

fn read_ts(b: &[u8]) -> Option<u64> {
    let b = b.get(..5)?;
    Some(
        (u64::from((b[0] >> 1) & 7) << 30)
            | (u64::from(b[1]) << 22)
            | (u64::from(b[2] >> 1) << 15)
            | (u64::from(b[3]) << 7)
            | u64::from(b[4] >> 1),
    )
}

fn write_ts(b: &mut [u8], ts: u64) {
    if let Some(b) = b.get_mut(..5) {
        b[0] = (b[0] & 0xf1) | (((ts >> 29) & 0x0e) as u8);
        b[1] = (ts >> 22) as u8;
        b[2] = (((ts >> 14) & 0xfe) as u8) | 1;
        b[3] = (ts >> 7) as u8;
        b[4] = (((ts << 1) & 0xfe) as u8) | 1;
    }
}

/// Parse the PES header at the start of a unit-start payload. `None` when the payload
/// does not start a PES packet or its header does not fit in it.
pub fn parse_pes(payload: &[u8]) -> Option<PesHeader> {
    if payload.get(..3)? != [0, 0, 1] {
        return None;
    }
    let stream_id = *payload.get(3)?;
    // Streams without the optional header: program stream map, padding, private 2,
    // ECM, EMM, directory, DSMCC, H.222.1 type E.
    if matches!(
        stream_id,
        0xbc | 0xbe | 0xbf | 0xf0 | 0xf1 | 0xf2 | 0xf8 | 0xff
    ) {
        return Some(PesHeader {
            data_offset: 6,
            ..PesHeader::default()
        });
    }
    if payload.get(6)? & 0xc0 != 0x80 {
        return None;
    }
    let flags = payload.get(7)? >> 6;
    let data_offset = 9 + usize::from(*payload.get(8)?);
    if data_offset > payload.len() {
        return None;
    }
    let pts = if flags & 2 != 0 {
        Some(read_ts(payload.get(9..)?)?)
    } else {
        None
    };
    let dts = if flags == 3 {
        Some(read_ts(payload.get(14..)?)?)
    } else {
        None
    };
    Some(PesHeader {
        pts,
        dts,
        data_offset,
    })
}

/// What kind of elementary stream the primary PID carries, for keyframe detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// H.264 / AVC (stream type 0x1b).
    H264,
    /// H.265 / HEVC (stream type 0x24).
    Hevc,
    /// MPEG-1 or MPEG-2 video (stream types 0x01, 0x02).
    Mpeg2,
    /// Another video codec: keyframes only from the random access indicator.
    OtherVideo,
    /// Not video (audio, data): every access unit is a decodable start.
    NotVideo,
}

impl Codec {
    /// The codec of a PMT stream type.
    pub fn from_stream_type(t: u8) -> Self {
        match t {
            0x1b => Self::H264,
            0x24 => Self::Hevc,
            0x01 | 0x02 => Self::Mpeg2,
            0x10 | 0x20 | 0x33 | 0x42 | 0xd1 | 0xea => Self::OtherVideo,
            _ => Self::NotVideo,
        }
    }

    fn is_video(self) -> bool {
        self != Self::NotVideo
    }
}

/// Incremental scan of an elementary stream for the first coded picture of an access
/// unit: finds start codes across packet boundaries and decides whether it is a
/// decodable start.
#[derive(Debug, Clone)]
struct StartScan {
    codec: Codec,
    zeros: u8,
    header_next: bool,
    verdict: Option<bool>,
    seq_header: bool,
}

impl StartScan {
    fn new(codec: Codec) -> Self {
        Self {
            codec,
            zeros: 0,
            header_next: false,
            verdict: if codec.is_video() && codec != Codec::OtherVideo {
                None
            } else {
                Some(codec == Codec::NotVideo)
            },
            seq_header: false,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if self.verdict.is_some() {
                return;
            }
            if self.header_next {
                self.header_next = false;
                self.on_start_code(b);
            }
            if b == 0 {
                self.zeros = self.zeros.saturating_add(1);
            } else {
                if b == 1 && self.zeros >= 2 {
                    self.header_next = true;
                }
                self.zeros = 0;
            }
        }
    }

    fn on_start_code(&mut self, b: u8) {
        match self.codec {
            Codec::H264 => {
                let t = b & 0x1f;
                match t {
                    5 => self.verdict = Some(true),
                    1..=4 => self.verdict = Some(false),
                    _ => {}
                }
            }
            Codec::Hevc => {
                let t = (b >> 1) & 0x3f;
                match t {
                    16..=23 => self.verdict = Some(true),
                    0..=15 | 24..=31 => self.verdict = Some(false),
                    _ => {}
                }
            }
            Codec::Mpeg2 => match b {
                0xb3 => self.seq_header = true,
                0x00 => self.verdict = Some(self.seq_header),
                _ => {}
            },
            Codec::OtherVideo | Codec::NotVideo => {}
        }
    }
}

/// One unit of a transport stream: whole packets, ready to be sent as one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// Whole 188-byte packets.
    pub data: Bytes,
    /// A decodable start: PAT, PMT, then a keyframe of the primary stream.
    pub keyframe: bool,
    /// PTS of the primary access unit, 90 kHz.
    pub pts: Option<u64>,
    /// Offset in the framer's input of the first packet taken from it.
    pub input_pos: u64,
}

/// Counters of a [`TsFramer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TsStats {
    /// Packets read.
    pub packets: u64,
    /// Bytes skipped to find the sync byte again.
    pub resync_bytes: u64,
    /// Packets dropped because no PAT and PMT had been seen yet.
    pub before_psi: u64,
    /// Packets flagged with a transport error, dropped.
    pub errored: u64,
    /// PSI sections that could not be parsed.
    pub bad_psi: u64,
    /// Units emitted.
    pub units: u64,
    /// Keyframe units emitted.
    pub keyframes: u64,
    /// PAT/PMT pairs inserted in front of a keyframe.
    pub psi_inserted: u64,
}

/// First and last decoding times of one PID, relative to the stream's first timestamp.
#[derive(Debug, Clone, Copy)]
struct Extent {
    last: i64,
    max: i64,
    delta: i64,
}

/// Cuts a transport stream into [`Unit`]s; see the module documentation.
///
/// Feed bytes with [`TsFramer::push`] in any chunking, take units with
/// [`TsFramer::poll_unit`]; [`TsFramer::finish`] emits the last unit at the end of a
/// file. A unit is emitted when the next one starts, so a live feed's units lag by one
/// access unit. Garbage is skipped (counted), never an error.
#[derive(Debug)]
pub struct TsFramer {
    pending: Vec<u8>,
    pending_pos: u64,
    pmt_pid: Option<u16>,
    primary: Option<(u16, Codec)>,
    pcr_pid: Option<u16>,
    pat: Option<[u8; PACKET_LEN]>,
    pmt: Option<[u8; PACKET_LEN]>,
    psi_cc: [u8; 2],
    cur: Vec<u8>,
    cur_pos: u64,
    cur_has_primary: bool,
    cur_has_pat: bool,
    cur_has_pmt: bool,
    cur_pts: Option<u64>,
    cur_rai: bool,
    scan: Option<StartScan>,
    out: VecDeque<Unit>,
    pcr_samples: Vec<(u64, u64)>,
    /// Keep one PCR in this many (a power of two, doubled each time the samples fill).
    pcr_stride: u64,
    /// PCRs of the PCR PID seen so far.
    pcr_seen: u64,
    ts_ref: Option<u64>,
    extents: HashMap<u16, Extent>,
    min_ts: i64,
    stats: TsStats,
}

impl Default for TsFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl TsFramer {
    /// A framer at the start of a stream.
    pub fn new() -> Self {
        Self {
            pending: Vec::new(),
            pending_pos: 0,
            pmt_pid: None,
            primary: None,
            pcr_pid: None,
            pat: None,
            pmt: None,
            psi_cc: [0; 2],
            cur: Vec::new(),
            cur_pos: 0,
            cur_has_primary: false,
            cur_has_pat: false,
            cur_has_pmt: false,
            cur_pts: None,
            cur_rai: false,
            scan: None,
            out: VecDeque::new(),
            pcr_samples: Vec::new(),
            pcr_stride: 1,
            pcr_seen: 0,
            ts_ref: None,
            extents: HashMap::new(),
            min_ts: 0,
            stats: TsStats::default(),
        }
    }

    /// Take more bytes of the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        self.drain(false);
    }

    /// End of the stream: frame the packets left and emit the unit in progress (bytes of
    /// an incomplete packet are counted as skipped).
    pub fn finish(&mut self) {
        self.drain(true);
        self.stats.resync_bytes += self.pending.len() as u64;
        self.pending_pos += self.pending.len() as u64;
        self.pending.clear();
        self.close_unit();
    }

    /// Frame the whole packets of `pending`. A packet is taken when the next one also
    /// starts with the sync byte (at the end of the stream, when there is no next one).
    fn drain(&mut self, at_end: bool) {
        let len = self.pending.len();
        let mut i = 0;
        loop {
            let has_next = i + 2 * PACKET_LEN <= len;
            if !(has_next || at_end && i + PACKET_LEN <= len) {
                break;
            }
            let aligned = self.pending.get(i) == Some(&SYNC_BYTE)
                && (!has_next || self.pending.get(i + PACKET_LEN) == Some(&SYNC_BYTE));
            if !aligned {
                i += 1;
                self.stats.resync_bytes += 1;
                continue;
            }
            let mut pkt = [0u8; PACKET_LEN];
            if let Some(src) = self.pending.get(i..i + PACKET_LEN) {
                pkt.copy_from_slice(src);
            }
            let pos = self.pending_pos + i as u64;
            self.packet(&pkt, pos);
            i += PACKET_LEN;
        }
        self.pending.drain(..i);
        self.pending_pos += i as u64;
    }

    /// The next complete unit.
    pub fn poll_unit(&mut self) -> Option<Unit> {
        self.out.pop_front()
    }

    /// The counters.
    pub fn stats(&self) -> TsStats {
        self.stats
    }

    /// PCRs of the PCR PID seen so far: (input offset of its packet, PCR at 27 MHz).
    /// Every one up to [`MAX_PCR_SAMPLES`]; past that, every 2nd, then 4th, ... (evenly
    /// spaced over the whole input, never more than [`MAX_PCR_SAMPLES`]).
    pub fn pcr_samples(&self) -> &[(u64, u64)] {
        &self.pcr_samples
    }

    /// Time from the earliest decoding time of any PES to the end of the last access
    /// unit of any PID (its decoding time plus its last frame duration), 90 kHz ticks.
    /// This is how long one play of a clip lasts, so a loop can continue it seamlessly.
    pub fn timestamp_span(&self) -> Option<u64> {
        let end = self.extents.values().map(|e| e.max + e.delta).max()?;
        u64::try_from(end - self.min_ts).ok().filter(|s| *s > 0)
    }

    /// The primary PID and its codec, once the PMT was read.
    pub fn primary(&self) -> Option<(u16, Codec)> {
        self.primary
    }

    /// Keep PCR number `pcr_seen` if it falls on the stride; halve the samples when full.
    fn note_pcr(&mut self, pos: u64, pcr: u64) {
        if self.pcr_seen.is_multiple_of(self.pcr_stride) {
            if self.pcr_samples.len() >= MAX_PCR_SAMPLES {
                // Keep samples 0, 2, 4, ...: PCRs number 0, 2s, 4s, ... of the new stride.
                let mut i = 0;
                self.pcr_samples.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
                self.pcr_stride *= 2;
            }
            if self.pcr_seen.is_multiple_of(self.pcr_stride) {
                self.pcr_samples.push((pos, pcr));
            }
        }
        self.pcr_seen += 1;
    }

    fn packet(&mut self, pkt: &[u8; PACKET_LEN], pos: u64) {
        let Some(p) = Packet::new(pkt) else { return };
        self.stats.packets += 1;
        if pkt[1] & 0x80 != 0 {
            self.stats.errored += 1;
            return;
        }
        let pid = p.pid();
        if pid == NULL_PID {
            return;
        }
        if pid == PAT_PID {
            if self.cur_has_primary {
                self.close_unit();
            }
            self.read_pat(&p);
            self.pat = Some(*pkt);
            self.append(pkt, pos);
            self.cur_has_pat = true;
            return;
        }
        if Some(pid) == self.pmt_pid {
            if self.cur_has_primary {
                self.close_unit();
            }
            self.read_pmt(&p);
            self.pmt = Some(*pkt);
            self.append(pkt, pos);
            self.cur_has_pmt = true;
            return;
        }
        let Some((primary, codec)) = self.primary else {
            self.stats.before_psi += 1;
            return;
        };
        if Some(pid) == self.pcr_pid {
            if let Some(pcr) = p.pcr() {
                self.note_pcr(pos, pcr);
            }
        }
        let pes = if p.pusi() {
            parse_pes(p.payload())
        } else {
            None
        };
        if let Some(h) = pes {
            self.note_timestamp(pid, h);
        }
        if pid == primary && p.pusi() {
            if self.cur_has_primary || self.cur.len() + PACKET_LEN > MAX_UNIT_LEN {
                self.close_unit();
            }
            self.cur_has_primary = true;
            self.cur_rai = p.random_access();
            self.cur_pts = pes.and_then(|h| h.pts);
            let mut scan = StartScan::new(codec);
            let data_offset = pes.map(|h| h.data_offset).unwrap_or(0);
            scan.feed(p.payload().get(data_offset..).unwrap_or(&[]));
            self.scan = Some(scan);
        } else {
            if self.cur.len() + PACKET_LEN > MAX_UNIT_LEN {
                self.close_unit();
            }
            if pid == primary {
                if let Some(s) = &mut self.scan {
                    s.feed(p.payload());
                }
            }
        }
        self.append(pkt, pos);
    }

    fn append(&mut self, pkt: &[u8; PACKET_LEN], pos: u64) {
        if self.cur.is_empty() {
            self.cur_pos = pos;
        }
        self.cur.extend_from_slice(pkt);
    }

    fn note_timestamp(&mut self, pid: u16, h: PesHeader) {
        let Some(t) = h.decode_time() else { return };
        let r = *self.ts_ref.get_or_insert(t);
        // Signed 33-bit distance from the stream's first timestamp.
        let d = (t.wrapping_sub(r)) & (PTS_WRAP - 1);
        let off = if d >= PTS_WRAP / 2 {
            d as i64 - PTS_WRAP as i64
        } else {
            d as i64
        };
        self.min_ts = self.min_ts.min(off);
        match self.extents.get_mut(&pid) {
            Some(e) => {
                if off > e.last {
                    e.delta = off - e.last;
                }
                e.last = off;
                e.max = e.max.max(off);
            }
            None => {
                self.extents.insert(
                    pid,
                    Extent {
                        last: off,
                        max: off,
                        delta: 0,
                    },
                );
            }
        }
    }

    /// The complete section starting in a unit-start payload (pointer field skipped).
    fn section<'b>(&mut self, p: &Packet<'b>) -> Option<&'b [u8]> {
        let payload = p.payload();
        let found = p
            .pusi()
            .then(|| {
                let pointer = usize::from(*payload.first()?);
                let s = payload.get(1 + pointer..)?;
                let len = (usize::from(*s.get(1)? & 0x0f) << 8) | usize::from(*s.get(2)?);
                s.get(..3 + len).filter(|_| len >= 9)
            })
            .flatten();
        if found.is_none() && p.pusi() {
            self.stats.bad_psi += 1;
        }
        found
    }

    fn read_pat(&mut self, p: &Packet<'_>) {
        let Some(s) = self.section(p) else { return };
        if s.first() != Some(&0x00) {
            return;
        }
        let entries = s.get(8..s.len().saturating_sub(4)).unwrap_or(&[]);
        for e in entries.chunks_exact(4) {
            let program = u16::from_be_bytes([e[0], e[1]]);
            if program != 0 {
                self.pmt_pid = Some((u16::from(e[2] & 0x1f) << 8) | u16::from(e[3]));
                return;
            }
        }
    }

    fn read_pmt(&mut self, p: &Packet<'_>) {
        let Some(s) = self.section(p) else { return };
        if s.first() != Some(&0x02) || s.len() < 16 {
            self.stats.bad_psi += 1;
            return;
        }
        let pcr_pid = (u16::from(s[8] & 0x1f) << 8) | u16::from(s[9]);
        let info_len = (usize::from(s[10] & 0x0f) << 8) | usize::from(s[11]);
        let end = s.len() - 4;
        let mut i = 12 + info_len;
        let mut first: Option<(u16, Codec)> = None;
        let mut video: Option<(u16, Codec)> = None;
        while i + 5 <= end {
            let stream_type = s[i];
            let pid = (u16::from(s[i + 1] & 0x1f) << 8) | u16::from(s[i + 2]);
            let es_len = (usize::from(s[i + 3] & 0x0f) << 8) | usize::from(s[i + 4]);
            let codec = Codec::from_stream_type(stream_type);
            first.get_or_insert((pid, codec));
            if codec.is_video() && video.is_none() {
                video = Some((pid, codec));
            }
            i += 5 + es_len;
        }
        let Some(primary) = video.or(first) else {
            self.stats.bad_psi += 1;
            return;
        };
        if self.primary != Some(primary) {
            tracing::debug!(pid = primary.0, codec = ?primary.1, "ts primary stream");
        }
        self.primary = Some(primary);
        self.pcr_pid = (pcr_pid != NULL_PID).then_some(pcr_pid);
    }

    fn close_unit(&mut self) {
        if self.cur.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.cur);
        let scan_key = self.scan.take().and_then(|s| s.verdict).unwrap_or(false);
        let has_primary = std::mem::take(&mut self.cur_has_primary);
        let key_es = has_primary && (scan_key || self.cur_rai);
        let mut keyframe = false;
        if key_es {
            if let (Some(pat), Some(pmt)) = (self.pat, self.pmt) {
                keyframe = true;
                if !(self.cur_has_pat && self.cur_has_pmt) {
                    let mut front = Vec::with_capacity(2 * PACKET_LEN + data.len());
                    front.extend_from_slice(&pat);
                    front.extend_from_slice(&pmt);
                    front.extend_from_slice(&data);
                    data = front;
                    self.stats.psi_inserted += 1;
                }
            }
        }
        // Our own continuity counters on PAT and PMT, so inserted copies stay continuous.
        for pkt in data.chunks_exact_mut(PACKET_LEN) {
            let pid = (u16::from(pkt[1] & 0x1f) << 8) | u16::from(pkt[2]);
            let slot = if pid == PAT_PID {
                0
            } else if Some(pid) == self.pmt_pid {
                1
            } else {
                continue;
            };
            if pkt[3] & 0x10 != 0 {
                pkt[3] = (pkt[3] & 0xf0) | self.psi_cc[slot];
                self.psi_cc[slot] = (self.psi_cc[slot] + 1) & 0x0f;
            }
        }
        self.stats.units += 1;
        if keyframe {
            self.stats.keyframes += 1;
        }
        self.out.push_back(Unit {
            data: Bytes::from(data),
            keyframe,
            pts: self.cur_pts.take(),
            input_pos: self.cur_pos,
        });
        self.cur_has_pat = false;
        self.cur_has_pmt = false;
        self.cur_rai = false;
    }
}

/// Shifts the timestamps and continuity counters of packets: how loop `k` of a clip
/// continues loop `k − 1` without a jump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restamp {
    /// Added to every PTS, DTS and PCR base, 90 kHz (mod 2³³).
    pub ticks_90k: u64,
    /// Added to the continuity counter of each listed PID (mod 16).
    pub cc_shift: Vec<(u16, u8)>,
}

impl Restamp {
    /// Rewrite whole packets in place; a trailing partial packet is left alone, and so is
    /// any packet that does not start with the sync byte.
    pub fn apply(&self, data: &mut [u8]) {
        for pkt in data.chunks_exact_mut(PACKET_LEN) {
            if pkt[0] != SYNC_BYTE {
                continue;
            }
            let pid = (u16::from(pkt[1] & 0x1f) << 8) | u16::from(pkt[2]);
            if let Some((_, s)) = self.cc_shift.iter().find(|(p, _)| *p == pid) {
                pkt[3] = (pkt[3] & 0xf0) | (pkt[3].wrapping_add(*s) & 0x0f);
            }
            if self.ticks_90k.is_multiple_of(PTS_WRAP) {
                continue;
            }
            let afc = (pkt[3] >> 4) & 3;
            let mut payload_start = 4;
            if afc & 2 != 0 {
                let len = usize::from(pkt[4]);
                payload_start = 5 + len;
                if len >= 7 && pkt[5] & 0x10 != 0 {
                    self.shift_pcr(&mut pkt[6..12]);
                }
            }
            if afc & 1 != 0 && pkt[1] & 0x40 != 0 && payload_start < PACKET_LEN {
                self.shift_pes(&mut pkt[payload_start..]);
            }
        }
    }

    fn shift_pcr(&self, p: &mut [u8]) {
        let base = (u64::from(p[0]) << 25)
            | (u64::from(p[1]) << 17)
            | (u64::from(p[2]) << 9)
            | (u64::from(p[3]) << 1)
            | (u64::from(p[4]) >> 7);
        let base = (base + self.ticks_90k) % PTS_WRAP;
        p[0] = (base >> 25) as u8;
        p[1] = (base >> 17) as u8;
        p[2] = (base >> 9) as u8;
        p[3] = (base >> 1) as u8;
        p[4] = (((base & 1) as u8) << 7) | (p[4] & 0x7f);
    }

    fn shift_pes(&self, payload: &mut [u8]) {
        let Some(h) = parse_pes(payload) else { return };
        if let Some(pts) = h.pts {
            if let Some(b) = payload.get_mut(9..) {
                write_ts(b, (pts + self.ticks_90k) % PTS_WRAP);
            }
        }
        if let Some(dts) = h.dts {
            if let Some(b) = payload.get_mut(14..) {
                write_ts(b, (dts + self.ticks_90k) % PTS_WRAP);
            }
        }
    }
}

/// Whether `data` looks like a transport stream: sync bytes at three packet starts
/// (or at every packet start of a shorter input).
pub fn looks_like_ts(data: &[u8]) -> bool {
    let n = (data.len() / PACKET_LEN).min(3);
    n > 0 && (0..n).all(|i| data.get(i * PACKET_LEN) == Some(&SYNC_BYTE))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A packet of `pid` with the given flags and payload (padded with an adaptation
    /// field of stuffing, as muxers do).
    pub(crate) fn packet(
        pid: u16,
        pusi: bool,
        cc: u8,
        pcr: Option<u64>,
        rai: bool,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut p = vec![
            SYNC_BYTE,
            ((pid >> 8) as u8 & 0x1f) | if pusi { 0x40 } else { 0 },
            pid as u8,
            0,
        ];
        let mut af = Vec::new();
        if pcr.is_some() || rai || payload.len() < 184 {
            let mut flags = 0u8;
            if rai {
                flags |= 0x40;
            }
            if pcr.is_some() {
                flags |= 0x10;
            }
            af.push(flags);
            if let Some(pcr) = pcr {
                let base = pcr / 300;
                let ext = pcr % 300;
                af.extend_from_slice(&[
                    (base >> 25) as u8,
                    (base >> 17) as u8,
                    (base >> 9) as u8,
                    (base >> 1) as u8,
                    (((base & 1) as u8) << 7) | 0x7e | ((ext >> 8) as u8 & 1),
                    ext as u8,
                ]);
            }
        }
        let room = 184usize.saturating_sub(if af.is_empty() { 0 } else { 1 + af.len() });
        let payload = &payload[..payload.len().min(room)];
        if !af.is_empty() {
            while 1 + af.len() + payload.len() < 184 {
                af.push(0xff);
            }
        }
        let afc = match (af.is_empty(), payload.is_empty()) {
            (true, _) => 0x10,
            (false, true) => 0x20,
            (false, false) => 0x30,
        };
        p[3] = afc | (cc & 0x0f);
        if !af.is_empty() {
            p.push(af.len() as u8);
            p.extend_from_slice(&af);
        }
        p.extend_from_slice(payload);
        assert_eq!(p.len(), PACKET_LEN, "test packet builder");
        p
    }

    fn section(table_id: u8, body: &[u8]) -> Vec<u8> {
        let len = 5 + body.len() + 4;
        let mut s = vec![
            0u8,
            table_id,
            0xb0 | ((len >> 8) as u8),
            len as u8,
            0,
            1,
            0xc1,
            0,
            0,
        ];
        s.extend_from_slice(body);
        s.extend_from_slice(&[0, 0, 0, 0]); // CRC, not checked
        s
    }

    pub(crate) fn pat(cc: u8) -> Vec<u8> {
        packet(
            0,
            true,
            cc,
            None,
            false,
            &section(0x00, &[0, 1, 0xf0, 0x00]),
        )
    }

    pub(crate) fn pmt(cc: u8) -> Vec<u8> {
        // PCR PID 0x100; one H.264 stream on 0x100, one AAC stream on 0x101.
        let body = [
            0xe1, 0x00, 0xf0, 0x00, 0x1b, 0xe1, 0x00, 0xf0, 0x00, 0x0f, 0xe1, 0x01, 0xf0, 0x00,
        ];
        packet(0x1000, true, cc, None, false, &section(0x02, &body))
    }

    fn pes(stream_id: u8, pts: u64, dts: Option<u64>, es: &[u8]) -> Vec<u8> {
        let mut h = vec![0, 0, 1, stream_id, 0, 0, 0x80];
        let mut opt = vec![0u8; 5];
        write_ts(&mut opt, pts);
        opt[0] |= 0x21;
        let flags = if let Some(d) = dts {
            let mut o = vec![0u8; 5];
            write_ts(&mut o, d);
            o[0] |= 0x11;
            opt[0] = (opt[0] & 0x0f) | 0x30;
            opt.extend_from_slice(&o);
            0xc0
        } else {
            0x80
        };
        h.push(flags);
        h.push(opt.len() as u8);
        h.extend_from_slice(&opt);
        h.extend_from_slice(es);
        h
    }

    /// A video access unit: IDR (`key`) or non-IDR slice, in two packets.
    pub(crate) fn video_au(cc: &mut u8, pts: u64, key: bool, pcr: Option<u64>) -> Vec<u8> {
        let nal: &[u8] = if key {
            &[
                0, 0, 0, 1, 0x09, 0xf0, 0, 0, 1, 0x67, 0x42, 0, 0, 1, 0x65, 0x88,
            ]
        } else {
            &[0, 0, 0, 1, 0x09, 0xf0, 0, 0, 1, 0x41, 0x9a]
        };
        let mut out = packet(
            0x100,
            true,
            *cc,
            pcr,
            key,
            &pes(0xe0, pts, Some(pts - 3600), nal),
        );
        *cc = (*cc + 1) & 15;
        out.extend(packet(0x100, false, *cc, None, false, &[0xaa; 184]));
        *cc = (*cc + 1) & 15;
        out
    }

    /// A small synthetic stream: `gops` GOPs of `gop` frames at 25 fps, PAT/PMT before
    /// each keyframe when `psi_each_gop`, else only at the start; one audio packet per frame.
    pub(crate) fn stream(gops: usize, gop: usize, psi_each_gop: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut vcc, mut acc, mut psicc) = (0u8, 0u8, 0u8);
        for g in 0..gops {
            for f in 0..gop {
                let n = (g * gop + f) as u64;
                let key = f == 0;
                if key && (psi_each_gop || g == 0) {
                    out.extend(pat(psicc));
                    out.extend(pmt(psicc));
                    psicc = (psicc + 1) & 15;
                }
                let pts = 126_000 + n * 3600;
                out.extend(video_au(&mut vcc, pts, key, Some((pts - 9000) * 300)));
                out.extend(packet(
                    0x101,
                    true,
                    acc,
                    None,
                    false,
                    &pes(0xc0, pts, None, &[0x55; 20]),
                ));
                acc = (acc + 1) & 15;
            }
        }
        out
    }

    fn frame_all(data: &[u8], chunk: usize) -> (Vec<Unit>, TsFramer) {
        let mut f = TsFramer::new();
        let mut units = Vec::new();
        for c in data.chunks(chunk.max(1)) {
            f.push(c);
            while let Some(u) = f.poll_unit() {
                units.push(u);
            }
        }
        f.finish();
        while let Some(u) = f.poll_unit() {
            units.push(u);
        }
        (units, f)
    }

    #[test]
    fn test_parse_packet_fields() {
        let p = packet(0x100, true, 5, Some(27_000_123), true, &[1, 2, 3]);
        let v = Packet::new(&p).expect("valid packet");
        assert_eq!(
            (v.pid(), v.pusi(), v.cc(), v.has_payload()),
            (0x100, true, 5, true)
        );
        assert!(v.random_access());
        assert_eq!(v.pcr(), Some(27_000_123));
        assert_eq!(&v.payload()[..3], &[1, 2, 3]);
        assert!(Packet::new(&p[..100]).is_none());
    }

    #[test]
    fn test_pes_timestamps_round_trip() {
        let p = pes(0xe0, (1 << 33) - 5, Some(12345), &[0, 0, 1, 0x65]);
        let h = parse_pes(&p).expect("valid pes");
        assert_eq!((h.pts, h.dts), (Some((1 << 33) - 5), Some(12345)));
        assert_eq!(&p[h.data_offset..], &[0, 0, 1, 0x65]);
        assert!(parse_pes(&[0, 0, 2]).is_none());
        assert!(parse_pes(&[0, 0, 1, 0xe0, 0, 0, 0x80, 0xc0, 200]).is_none());
    }

    #[test]
    fn test_pcr_samples_stay_bounded_and_span_a_live_feed() {
        // A live feed of 3.5 × MAX_PCR_SAMPLES PCR-only packets on the PCR PID, 40 ms apart.
        let n = MAX_PCR_SAMPLES * 7 / 2;
        let mut f = TsFramer::new();
        f.push(&pat(0));
        f.push(&pmt(0));
        let start = 2 * PACKET_LEN as u64;
        let mut most = 0;
        for i in 0..n {
            f.push(&packet(
                0x100,
                false,
                0,
                Some(i as u64 * 1_080_000),
                false,
                &[],
            ));
            while f.poll_unit().is_some() {}
            most = most.max(f.pcr_samples().len());
        }
        f.finish();
        assert!(most <= MAX_PCR_SAMPLES, "{most} samples kept");
        let s = f.pcr_samples();
        // Two halvings (at 1× and 2× the cap): every 4th PCR, from the first one on.
        assert_eq!(s.len(), n.div_ceil(4));
        assert_eq!(s[0], (start, 0));
        for (k, &(pos, pcr)) in s.iter().enumerate() {
            let i = 4 * k as u64;
            assert_eq!(
                (pos, pcr),
                (start + i * PACKET_LEN as u64, i * 1_080_000),
                "sample {k}"
            );
        }
        // The last sample is within one stride of the end of the input.
        let last = s.last().map(|&(_, pcr)| pcr / 1_080_000).unwrap_or(0);
        assert!(n as u64 - 1 - last < 4, "last sample is PCR {last} of {n}");
    }

    #[test]
    fn test_units_and_keyframes() {
        let data = stream(3, 5, true);
        let (units, f) = frame_all(&data, 1316);
        assert_eq!(units.len(), 15, "one unit per video frame");
        let keys: Vec<bool> = units.iter().map(|u| u.keyframe).collect();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(*k, i % 5 == 0, "unit {i}");
        }
        for u in &units {
            assert_eq!(u.data.len() % PACKET_LEN, 0);
        }
        // A keyframe unit starts with PAT then PMT.
        let k = &units[5].data;
        assert_eq!(Packet::new(&k[..188]).map(|p| p.pid()), Some(0));
        assert_eq!(Packet::new(&k[188..376]).map(|p| p.pid()), Some(0x1000));
        assert_eq!(f.primary(), Some((0x100, Codec::H264)));
        assert_eq!(f.stats().psi_inserted, 0);
        // 15 frames of 3600 ticks: the span ends one frame after the last one.
        assert_eq!(f.timestamp_span(), Some(15 * 3600 + 3600));
        assert_eq!(f.pcr_samples().len(), 15);
        // Bytes in = bytes out when nothing is inserted.
        let total: usize = units.iter().map(|u| u.data.len()).sum();
        assert_eq!(total, data.len());
    }

    #[test]
    fn test_psi_inserted_before_keyframes_with_continuous_cc() {
        let data = stream(3, 4, false);
        let (units, f) = frame_all(&data, 7);
        assert_eq!(f.stats().psi_inserted, 2);
        let mut last: HashMap<u16, u8> = HashMap::new();
        for u in &units {
            if u.keyframe {
                assert_eq!(Packet::new(&u.data[..188]).map(|p| p.pid()), Some(0));
            }
            for pkt in u.data.chunks(PACKET_LEN) {
                let p = Packet::new(pkt).expect("whole packets");
                if let Some(prev) = last.insert(p.pid(), p.cc()) {
                    assert_eq!(p.cc(), (prev + 1) & 15, "pid {:#x} continuous", p.pid());
                }
            }
        }
        assert_eq!(units.iter().filter(|u| u.keyframe).count(), 3);
    }

    #[test]
    fn test_resync_and_before_psi() {
        let mut data = vec![0x12, 0x47, 0x00];
        // Packets before any PSI are dropped.
        let mut cc = 0;
        data.extend(video_au(&mut cc, 90_000, false, None));
        data.extend(stream(1, 3, true));
        let (units, f) = frame_all(&data, 100);
        assert_eq!(f.stats().resync_bytes, 3);
        assert_eq!(f.stats().before_psi, 2);
        assert_eq!(units.len(), 3);
        assert!(units[0].keyframe);
    }

    #[test]
    fn test_restamp_continues_timestamps_and_cc() {
        let data = stream(1, 4, true);
        let r = Restamp {
            ticks_90k: 4 * 3600,
            cc_shift: vec![(0x100, 8), (0x101, 4)],
        };
        let mut shifted = data.clone();
        r.apply(&mut shifted);
        for (a, b) in data.chunks(188).zip(shifted.chunks(188)) {
            let (pa, pb) = (
                Packet::new(a).expect("packet"),
                Packet::new(b).expect("packet"),
            );
            assert_eq!(pa.pid(), pb.pid());
            let want_cc = match pa.pid() {
                0x100 => (pa.cc() + 8) & 15,
                0x101 => (pa.cc() + 4) & 15,
                _ => pa.cc(),
            };
            assert_eq!(pb.cc(), want_cc);
            if let Some(pcr) = pa.pcr() {
                assert_eq!(pb.pcr(), Some(pcr + 4 * 3600 * 300));
            }
            if pa.pusi() {
                if let Some(h) = parse_pes(pa.payload()) {
                    let g = parse_pes(pb.payload()).expect("still a pes");
                    assert_eq!(g.pts, h.pts.map(|t| t + 4 * 3600));
                    assert_eq!(g.dts, h.dts.map(|t| t + 4 * 3600));
                }
            }
        }
    }

    #[test]
    fn test_looks_like_ts() {
        assert!(looks_like_ts(&stream(1, 2, true)));
        assert!(!looks_like_ts(&[0xff, 0xd8, 0xff]));
        assert!(!looks_like_ts(&[]));
    }

    proptest! {
        #[test]
        fn prop_framer_never_panics_and_keeps_whole_packets(
            junk in proptest::collection::vec(any::<u8>(), 0..2000),
            cut in 1usize..400,
            at in 0usize..3000,
        ) {
            let mut data = stream(2, 3, false);
            let at = at.min(data.len());
            data.splice(at..at, junk);
            let (units, _) = frame_all(&data, cut);
            for u in units {
                prop_assert_eq!(u.data.len() % PACKET_LEN, 0);
                prop_assert!(u.data.len() <= MAX_UNIT_LEN + 2 * PACKET_LEN);
            }
        }

        #[test]
        fn prop_restamp_never_panics(data in proptest::collection::vec(any::<u8>(), 0..1000), t in any::<u64>()) {
            let mut d = data;
            for p in d.chunks_mut(188) { p[0] = SYNC_BYTE; }
            Restamp { ticks_90k: t, cc_shift: vec![(0, 3)] }.apply(&mut d);
        }
    }
}
