//! Fragmentation of frames into media datagrams.

use bytes::{BufMut, Bytes, BytesMut};
use ott_proto::{MediaHeader, MediaKind, HEADER_LEN, MAX_PAYLOAD_LEN};

use crate::error::FramingError;

/// Largest frame [`Packetizer::packetize`] accepts: `u16::MAX` full fragments.
pub const MAX_FRAME_LEN: usize = u16::MAX as usize * MAX_PAYLOAD_LEN;

/// Splits the frames of one stream into media datagrams (header + payload, each at most
/// [`ott_proto::MAX_DATAGRAM_LEN`] bytes), numbering datagrams and frames.
///
/// For MPEG-TS ([`Packetizer::for_kind`]) every payload but the last is
/// [`crate::ts::DATAGRAM_PAYLOAD`] bytes (7 whole TS packets), so a datagram always
/// carries whole 188-byte packets.
#[derive(Debug, Clone)]
pub struct Packetizer {
    stream: u32,
    seq: u32,
    frame: u32,
    chunk: usize,
}

impl Packetizer {
    /// A packetizer for `stream`; sequence and frame numbers start at 0.
    pub fn new(stream: u32) -> Self {
        Self::starting_at(stream, 0, 0)
    }

    /// A packetizer whose next sequence and frame numbers are `seq` and `frame` (to resume
    /// a numbering, or to test wraparound).
    pub fn starting_at(stream: u32, seq: u32, frame: u32) -> Self {
        Self {
            stream,
            seq,
            frame,
            chunk: MAX_PAYLOAD_LEN,
        }
    }

    /// A packetizer for `stream` cutting payloads for `kind`: as large as possible for
    /// MJPEG, 7 whole TS packets for MPEG-TS.
    pub fn for_kind(stream: u32, kind: MediaKind) -> Self {
        Self::for_kind_at(stream, kind, 0, 0)
    }

    /// [`Packetizer::for_kind`] whose next sequence and frame numbers are `seq` and `frame`.
    pub fn for_kind_at(stream: u32, kind: MediaKind, seq: u32, frame: u32) -> Self {
        let mut p = Self::starting_at(stream, seq, frame);
        if kind == MediaKind::Ts {
            p.chunk = crate::ts::DATAGRAM_PAYLOAD;
        }
        p
    }

    /// Split one frame into datagrams.
    ///
    /// The datagrams have consecutive sequence numbers, `frag_index` `0..count`, the same
    /// frame number and `timestamp_90k`, and `flags` on every fragment. Every payload but
    /// the last is [`MAX_PAYLOAD_LEN`] bytes (1316 for MPEG-TS); an empty frame gives one
    /// datagram with an empty payload. Sequence and frame numbers wrap. A frame longer
    /// than [`MAX_FRAME_LEN`] (or than `u16::MAX` TS payloads) is refused and consumes no
    /// number.
    pub fn packetize(
        &mut self,
        frame: &[u8],
        timestamp_90k: u32,
        flags: u8,
    ) -> Result<Vec<Bytes>, FramingError> {
        let max = MAX_FRAME_LEN.min(u16::MAX as usize * self.chunk);
        if frame.len() > max {
            return Err(FramingError::FrameTooLarge {
                len: frame.len(),
                max,
            });
        }
        let count = frame.len().div_ceil(self.chunk).max(1);
        // count <= u16::MAX because frame.len() <= max, checked above.
        let frag_count = u16::try_from(count).map_err(|_| FramingError::FrameTooLarge {
            len: frame.len(),
            max,
        })?;
        let mut out = Vec::with_capacity(count);
        for frag_index in 0..frag_count {
            let start = usize::from(frag_index) * self.chunk;
            let end = (start + self.chunk).min(frame.len());
            let chunk = frame.get(start..end).unwrap_or_default();
            let h = MediaHeader {
                flags,
                stream: self.stream,
                seq: self.seq,
                frame: self.frame,
                frag_index,
                frag_count,
                timestamp: timestamp_90k,
            };
            let mut buf = BytesMut::with_capacity(HEADER_LEN + chunk.len());
            buf.put_slice(&h.to_bytes());
            buf.put_slice(chunk);
            out.push(buf.freeze());
            self.seq = self.seq.wrapping_add(1);
        }
        self.frame = self.frame.wrapping_add(1);
        Ok(out)
    }

    /// Sequence number of the next datagram.
    pub fn next_seq(&self) -> u32 {
        self.seq
    }

    /// Frame number of the next frame.
    pub fn next_frame(&self) -> u32 {
        self.frame
    }

    /// The stream id written in every header.
    pub fn stream(&self) -> u32 {
        self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ott_proto::{flags, MAX_DATAGRAM_LEN};

    #[test]
    fn test_fragments() {
        let mut p = Packetizer::new(9);
        let frame: Vec<u8> = (0..MAX_PAYLOAD_LEN * 2 + 10).map(|i| i as u8).collect();
        let dgs = p.packetize(&frame, 3600, flags::KEYFRAME).expect("fits");
        assert_eq!(dgs.len(), 3);
        let mut joined = Vec::new();
        for (i, d) in dgs.iter().enumerate() {
            assert!(d.len() <= MAX_DATAGRAM_LEN);
            let h = MediaHeader::parse(d).expect("valid header");
            assert_eq!(
                h,
                MediaHeader {
                    flags: flags::KEYFRAME,
                    stream: 9,
                    seq: i as u32,
                    frame: 0,
                    frag_index: i as u16,
                    frag_count: 3,
                    timestamp: 3600,
                }
            );
            joined.extend_from_slice(&d[HEADER_LEN..]);
        }
        assert_eq!(joined, frame);
        assert_eq!((p.next_seq(), p.next_frame()), (3, 1));

        // Exactly one full payload is one fragment; an empty frame is one empty fragment.
        let dgs = p.packetize(&frame[..MAX_PAYLOAD_LEN], 0, 0).expect("fits");
        assert_eq!(dgs.len(), 1);
        // Room is left for the overlay key's tag.
        assert_eq!(dgs[0].len(), MAX_DATAGRAM_LEN - ott_proto::auth::TAG_LEN);
        let dgs = p.packetize(&[], 0, 0).expect("fits");
        assert_eq!(dgs.len(), 1);
        assert_eq!(dgs[0].len(), HEADER_LEN);
        assert_eq!((p.next_seq(), p.next_frame()), (5, 3));
    }

    #[test]
    fn test_ts_whole_packets() {
        let mut p = Packetizer::for_kind(3, MediaKind::Ts);
        let frame = vec![0x47u8; 188 * 20];
        let dgs = p.packetize(&frame, 0, flags::KEYFRAME).expect("fits");
        let lens: Vec<usize> = dgs.iter().map(|d| d.len() - HEADER_LEN).collect();
        assert_eq!(lens, [1316, 1316, 188 * 6]);
    }

    #[test]
    fn test_wraparound() {
        let mut p = Packetizer::starting_at(1, u32::MAX - 1, u32::MAX);
        let dgs = p
            .packetize(&vec![7u8; MAX_PAYLOAD_LEN * 3], 0, 0)
            .expect("fits");
        let seqs: Vec<u32> = dgs
            .iter()
            .map(|d| MediaHeader::parse(d).expect("valid").seq)
            .collect();
        assert_eq!(seqs, [u32::MAX - 1, u32::MAX, 0]);
        assert_eq!((p.next_seq(), p.next_frame()), (1, 0));
    }

    #[test]
    fn test_too_large() {
        let mut p = Packetizer::new(1);
        let big = vec![0u8; MAX_FRAME_LEN + 1];
        assert!(matches!(
            p.packetize(&big, 0, 0),
            Err(FramingError::FrameTooLarge { .. })
        ));
        assert_eq!((p.next_seq(), p.next_frame()), (0, 0));
    }
}
