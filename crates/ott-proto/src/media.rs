//! The fixed binary header of media datagrams.
//!
//! Layout (big-endian, 24 bytes), documented in `docs/protocol.md`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2 | magic `"OT"` |
//! | 2 | 1 | version (1) |
//! | 3 | 1 | flags ([`flags`]) |
//! | 4 | 4 | stream id |
//! | 8 | 4 | sequence number (per stream and source, wraps) |
//! | 12 | 4 | frame number (wraps) |
//! | 16 | 2 | fragment index |
//! | 18 | 2 | fragment count |
//! | 20 | 4 | media timestamp, 90 kHz (wraps) |
//! | 24 | … | payload |

use crate::error::HeaderError;

/// First two bytes of every media datagram.
pub const MAGIC: [u8; 2] = *b"OT";
/// Version of the header layout.
pub const MEDIA_VERSION: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 24;
/// Largest media datagram: a 1500-byte MTU minus IPv4 (20) and UDP (8) headers, with
/// the overlay key's tag ([`crate::auth::TAG_LEN`]) when there is one.
pub const MAX_DATAGRAM_LEN: usize = 1472;
/// Largest payload in one media datagram: room is left for the tag, so a tagged
/// datagram still fits [`MAX_DATAGRAM_LEN`].
pub const MAX_PAYLOAD_LEN: usize = MAX_DATAGRAM_LEN - HEADER_LEN - crate::auth::TAG_LEN;

/// `a` is strictly older than `b` among sequence or frame numbers, which wrap: serial
/// number arithmetic (RFC 1982) over 32 bits, so 0 comes after `u32::MAX`.
///
/// ```
/// assert!(ott_proto::older(u32::MAX, 0));
/// assert!(!ott_proto::older(5, 5));
/// ```
pub fn older(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Bits of [`MediaHeader::flags`].
pub mod flags {
    /// The frame is a decodable start (every JPEG; a TS keyframe with PAT/PMT).
    pub const KEYFRAME: u8 = 0x01;
    /// This datagram is a retransmission answering a NACK.
    pub const RETRANSMIT: u8 = 0x02;
    /// The source restarted or looped: timestamps and frame numbers jump.
    pub const DISCONTINUITY: u8 = 0x04;
    /// A replay of a relay's or PoP's cache of the latest decodable start, sent to a new
    /// child before live data. The sequence number is the original one, so a receiver
    /// that already has the datagram drops it as a duplicate.
    pub const CACHED: u8 = 0x08;
}

/// The parsed fixed header of a media datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MediaHeader {
    /// Bit set of [`flags`].
    pub flags: u8,
    /// Stream id (see [`crate::stream_id_for`]).
    pub stream: u32,
    /// Datagram sequence number within the stream.
    pub seq: u32,
    /// Frame number within the stream.
    pub frame: u32,
    /// Index of this fragment within the frame.
    pub frag_index: u16,
    /// Number of fragments of the frame (at least 1).
    pub frag_count: u16,
    /// Media timestamp, 90 kHz clock.
    pub timestamp: u32,
}

impl MediaHeader {
    /// Parse the header at the start of `buf`; the payload is `&buf[HEADER_LEN..]`.
    pub fn parse(buf: &[u8]) -> Result<Self, HeaderError> {
        if buf.len() < HEADER_LEN {
            return Err(HeaderError::Short(buf.len()));
        }
        if buf.len() > MAX_DATAGRAM_LEN {
            return Err(HeaderError::TooLong(buf.len()));
        }
        if buf[0..2] != MAGIC {
            return Err(HeaderError::Magic(u16::from_be_bytes([buf[0], buf[1]])));
        }
        if buf[2] != MEDIA_VERSION {
            return Err(HeaderError::Version(buf[2]));
        }
        let u32_at = |o: usize| u32::from_be_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let u16_at = |o: usize| u16::from_be_bytes([buf[o], buf[o + 1]]);
        let h = Self {
            flags: buf[3],
            stream: u32_at(4),
            seq: u32_at(8),
            frame: u32_at(12),
            frag_index: u16_at(16),
            frag_count: u16_at(18),
            timestamp: u32_at(20),
        };
        if h.frag_count == 0 || h.frag_index >= h.frag_count {
            return Err(HeaderError::Fragment {
                index: h.frag_index,
                count: h.frag_count,
            });
        }
        Ok(h)
    }

    /// Write the header into the first [`HEADER_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than [`HEADER_LEN`] (a caller bug, never network input).
    pub fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = MEDIA_VERSION;
        out[3] = self.flags;
        out[4..8].copy_from_slice(&self.stream.to_be_bytes());
        out[8..12].copy_from_slice(&self.seq.to_be_bytes());
        out[12..16].copy_from_slice(&self.frame.to_be_bytes());
        out[16..18].copy_from_slice(&self.frag_index.to_be_bytes());
        out[18..20].copy_from_slice(&self.frag_count.to_be_bytes());
        out[20..24].copy_from_slice(&self.timestamp.to_be_bytes());
    }

    /// The header as its 24 wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.write(&mut b);
        b
    }

    /// Whether a flag bit of [`flags`] is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Set the [`flags::RETRANSMIT`] bit in an encoded datagram in place, if it has a header.
    pub fn mark_retransmit(datagram: &mut [u8]) {
        if datagram.len() >= HEADER_LEN {
            datagram[3] |= flags::RETRANSMIT;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    static PACKET_BYTES: [u8; 28] = [
        b'O', b'T', 1, 0x01, // magic, version, flags
        0, 0, 0, 7, // stream
        0, 0, 1, 0, // seq 256
        0, 0, 0, 3, // frame
        0, 1, 0, 2, // fragment 1 of 2
        0, 0, 0x0e, 0x10, // timestamp 3600
        0xde, 0xad, 0xbe, 0xef, // payload
    ];

    fn header() -> MediaHeader {
        MediaHeader {
            flags: flags::KEYFRAME,
            stream: 7,
            seq: 256,
            frame: 3,
            frag_index: 1,
            frag_count: 2,
            timestamp: 3600,
        }
    }

    #[test]
    fn test_parse() {
        assert_eq!(MediaHeader::parse(&PACKET_BYTES), Ok(header()));
    }

    #[test]
    fn test_emit() {
        assert_eq!(header().to_bytes()[..], PACKET_BYTES[..HEADER_LEN]);
    }

    #[test]
    fn test_malformed() {
        assert_eq!(
            MediaHeader::parse(&PACKET_BYTES[..10]),
            Err(HeaderError::Short(10))
        );
        let mut b = PACKET_BYTES;
        b[0] = b'X';
        assert!(matches!(MediaHeader::parse(&b), Err(HeaderError::Magic(_))));
        let mut b = PACKET_BYTES;
        b[2] = 9;
        assert_eq!(MediaHeader::parse(&b), Err(HeaderError::Version(9)));
        let mut b = PACKET_BYTES;
        b[17] = 2; // index 2 of 2
        assert!(matches!(
            MediaHeader::parse(&b),
            Err(HeaderError::Fragment { .. })
        ));
        let long = vec![0u8; MAX_DATAGRAM_LEN + 1];
        assert!(MediaHeader::parse(&long).is_err());
    }

    #[test]
    fn test_mark_retransmit() {
        let mut b = PACKET_BYTES;
        MediaHeader::mark_retransmit(&mut b);
        let h = MediaHeader::parse(&b).expect("valid");
        assert!(h.has(flags::RETRANSMIT) && h.has(flags::KEYFRAME));
    }

    proptest! {
        #[test]
        fn prop_round_trip(flags in any::<u8>(), stream in any::<u32>(), seq in any::<u32>(),
                           frame in any::<u32>(), count in 1u16.., idx in any::<u16>(), ts in any::<u32>()) {
            let h = MediaHeader { flags, stream, seq, frame, frag_index: idx % count, frag_count: count, timestamp: ts };
            prop_assert_eq!(MediaHeader::parse(&h.to_bytes()), Ok(h));
        }

        #[test]
        fn prop_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = MediaHeader::parse(&b);
        }
    }
}
