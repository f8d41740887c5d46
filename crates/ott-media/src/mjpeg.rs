//! Splitting Motion JPEG byte streams into their JPEG frames.
//!
//! An `.mjpeg` file (or an `ffmpeg -f mjpeg` pipe) is plain concatenated JPEG images.
//! Scanning for `ff d9` is not enough to find where a frame ends: that pair may appear
//! inside an APPn or COM segment, or inside a quantisation or Huffman table. This module
//! therefore walks the JPEG structure:
//!
//! - SOI (`ff d8`);
//! - marker segments, each with a 2-byte big-endian length that counts itself
//!   (APPn, DQT, DHT, SOF, DRI, COM...), skipped whole;
//! - after SOS, the entropy-coded data, where `ff 00` is a stuffed `ff` byte and
//!   `ff d0`..`ff d7` are restart markers; any other marker ends the scan (a progressive
//!   image has several scans);
//! - EOI (`ff d9`) ends the frame.
//!
//! Fill bytes (`ff` repeated before a marker code) are skipped. Bytes between frames that
//! are not a SOI are an error naming their offset: nothing is skipped silently.

use std::collections::VecDeque;
use std::ops::Range;

use bytes::Bytes;

use crate::error::FramingError;

const SOI: u8 = 0xd8;
const EOI: u8 = 0xd9;
const SOS: u8 = 0xda;
const TEM: u8 = 0x01;

fn is_rst(m: u8) -> bool {
    (0xd0..=0xd7).contains(&m)
}

/// Split concatenated JPEG frames into the byte range of each frame.
///
/// Empty input gives no frame. Any byte outside a frame is an error
/// ([`FramingError::Garbage`] with its offset), and so is a final frame cut before its EOI
/// ([`FramingError::Truncated`]).
pub fn split_frames(data: &[u8]) -> Result<Vec<Range<usize>>, FramingError> {
    let mut frames = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let end = parse_frame(data, pos)?;
        frames.push(pos..end);
        pos = end;
    }
    Ok(frames)
}

/// Whether `frame` is exactly one complete JPEG image: it starts with SOI and its
/// structure parses to an EOI that is its last byte.
pub fn is_complete_jpeg(frame: &[u8]) -> bool {
    matches!(parse_frame(frame, 0), Ok(end) if end == frame.len())
}

/// Largest frame a [`MjpegFramer`] waits for before giving up on it and resynchronising.
pub const MAX_LIVE_FRAME: usize = 8 * 1024 * 1024;

/// Splits a live MJPEG byte stream (any chunking) into whole JPEG frames.
///
/// Unlike [`split_frames`], bad bytes are not an error: they are skipped up to the next
/// start of image and counted, so a live feed recovers from loss or garbage.
#[derive(Debug, Default)]
pub struct MjpegFramer {
    buf: Vec<u8>,
    frames: VecDeque<Bytes>,
    skipped: u64,
}

impl MjpegFramer {
    /// An empty framer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take more bytes; complete frames become available from [`MjpegFramer::poll_frame`].
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        loop {
            match parse_frame(&self.buf, 0) {
                Ok(end) => {
                    self.frames
                        .push_back(Bytes::copy_from_slice(self.buf.get(..end).unwrap_or(&[])));
                    self.buf.drain(..end);
                }
                Err(FramingError::Truncated { .. }) if self.buf.len() <= MAX_LIVE_FRAME => return,
                Err(_) => {
                    // Skip to the next start of image after the first byte.
                    let next = self
                        .buf
                        .windows(2)
                        .skip(1)
                        .position(|w| w == [0xff, SOI])
                        .map(|i| i + 1);
                    let cut = next.unwrap_or_else(|| {
                        // Keep a trailing ff: it may start the next SOI.
                        self.buf.len() - usize::from(self.buf.last() == Some(&0xff))
                    });
                    self.skipped += cut as u64;
                    self.buf.drain(..cut);
                    if next.is_none() {
                        return;
                    }
                }
            }
        }
    }

    /// The next complete frame.
    pub fn poll_frame(&mut self) -> Option<Bytes> {
        self.frames.pop_front()
    }

    /// Bytes skipped so far because they were not part of a valid frame.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }
}

/// Length of the JPEG frame at the start of `data` (which may hold more after it).
pub fn first_frame_len(data: &[u8]) -> Result<usize, FramingError> {
    parse_frame(data, 0)
}

/// Parse the frame starting at `start`; returns the offset just past its EOI.
fn parse_frame(data: &[u8], start: usize) -> Result<usize, FramingError> {
    let truncated = || FramingError::Truncated {
        start,
        end: data.len(),
    };
    match (data.get(start), data.get(start + 1)) {
        (Some(0xff), Some(&SOI)) => {}
        (Some(0xff), None) => return Err(truncated()),
        (Some(&byte), _) => {
            return Err(FramingError::Garbage {
                offset: start,
                byte,
            })
        }
        (None, _) => return Err(truncated()),
    }
    let mut pos = start + 2;
    loop {
        // A marker: one `ff`, any number of fill `ff`s, then the marker code.
        let marker_at = pos;
        match data.get(pos) {
            Some(0xff) => {}
            Some(&byte) => return Err(FramingError::ExpectedMarker { offset: pos, byte }),
            None => return Err(truncated()),
        }
        while data.get(pos) == Some(&0xff) {
            pos += 1;
        }
        let marker = *data.get(pos).ok_or_else(truncated)?;
        pos += 1;
        match marker {
            EOI => return Ok(pos),
            m if is_rst(m) || m == TEM => continue,
            0x00 | SOI => {
                return Err(FramingError::BadMarker {
                    offset: marker_at,
                    marker,
                })
            }
            _ => {}
        }
        let len = match (data.get(pos), data.get(pos + 1)) {
            (Some(&hi), Some(&lo)) => u16::from_be_bytes([hi, lo]),
            _ => return Err(truncated()),
        };
        if len < 2 {
            return Err(FramingError::BadSegmentLength { offset: pos, len });
        }
        pos += usize::from(len);
        if pos > data.len() {
            return Err(truncated());
        }
        if marker == SOS {
            pos = skip_entropy_coded(data, pos).ok_or_else(truncated)?;
        }
    }
}

/// Skip entropy-coded data from `pos`; returns the offset of the `ff` of the marker that
/// ends it, or `None` if the data ends first.
fn skip_entropy_coded(data: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let rel = data.get(pos..)?.iter().position(|&b| b == 0xff)?;
        pos += rel;
        // Skip fill bytes: the last `ff` of a run is the one that pairs with what follows.
        while data.get(pos + 1) == Some(&0xff) {
            pos += 1;
        }
        let next = *data.get(pos + 1)?;
        if next == 0x00 || is_rst(next) {
            pos += 2;
        } else {
            return Some(pos);
        }
    }
}

#[cfg(test)]
// Tests take the real clock as an arbitrary origin of fake time, and read sample files.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    /// A tiny structurally valid JPEG: the APP0 and COM payloads and a DQT table hold
    /// `ff d9`, and the scan holds stuffed `ff 00`, a restart marker and fill bytes.
    pub(crate) fn tricky_jpeg(tag: u8) -> Vec<u8> {
        let mut j = vec![0xff, SOI];
        // APP0 with ff d9 inside.
        j.extend_from_slice(&[0xff, 0xe0, 0x00, 0x08, b'J', b'F', 0xff, 0xd9, 0x00, tag]);
        // COM with ff d9 and ff d8 inside.
        j.extend_from_slice(&[0xff, 0xfe, 0x00, 0x08, 0xff, 0xd9, 0xff, 0xd8, b'!', tag]);
        // DQT whose table bytes hold ff d9.
        j.extend_from_slice(&[0xff, 0xdb, 0x00, 0x06, 0x00, 0xff, 0xd9, 0x01]);
        // Fill bytes before SOF0.
        j.extend_from_slice(&[0xff, 0xff, 0xff, 0xc0, 0x00, 0x05, 0x08, 0x00, 0x10]);
        // SOS, then a scan with stuffing, a restart marker and fill bytes.
        j.extend_from_slice(&[0xff, SOS, 0x00, 0x04, 0x01, 0x00]);
        j.extend_from_slice(&[0x12, 0xff, 0x00, 0xd9, 0x34, 0xff, 0xd0, 0xff, 0x00]);
        j.extend_from_slice(&[0x56, tag, 0xff, 0xff, 0xff, 0x00, 0x78]);
        j.extend_from_slice(&[0xff, EOI]);
        j
    }

    #[test]
    fn test_tricky_frames_split_right() {
        let a = tricky_jpeg(1);
        let b = tricky_jpeg(2);
        let mut data = a.clone();
        data.extend_from_slice(&b);
        let frames = split_frames(&data).expect("valid stream");
        assert_eq!(frames, vec![0..a.len(), a.len()..a.len() + b.len()]);
        assert!(is_complete_jpeg(&a));
        assert!(is_complete_jpeg(&data[frames[1].clone()]));
    }

    #[test]
    fn test_empty_input_has_no_frame() {
        assert_eq!(split_frames(&[]), Ok(vec![]));
        assert!(!is_complete_jpeg(&[]));
    }

    #[test]
    fn test_truncated_final_frame() {
        let a = tricky_jpeg(1);
        let mut data = a.clone();
        data.extend_from_slice(&a[..a.len() - 1]);
        assert_eq!(
            split_frames(&data),
            Err(FramingError::Truncated {
                start: a.len(),
                end: data.len()
            })
        );
        // Every cut of a single frame is truncated, never a panic or a bogus frame.
        for cut in 1..a.len() {
            assert!(
                matches!(
                    split_frames(&a[..cut]),
                    Err(FramingError::Truncated { start: 0, .. })
                ),
                "cut at {cut}"
            );
            assert!(!is_complete_jpeg(&a[..cut]));
        }
    }

    #[test]
    fn test_garbage_between_frames_names_offset() {
        let a = tricky_jpeg(1);
        let mut data = a.clone();
        data.push(0x0a);
        data.extend_from_slice(&a);
        assert_eq!(
            split_frames(&data),
            Err(FramingError::Garbage {
                offset: a.len(),
                byte: 0x0a
            })
        );
        let msg = split_frames(&data).unwrap_err().to_string();
        assert!(msg.contains(&a.len().to_string()), "{msg}");
    }

    #[test]
    fn test_trailing_bytes_after_eoi_are_not_complete() {
        let mut a = tricky_jpeg(1);
        a.push(0);
        assert!(!is_complete_jpeg(&a));
    }

    #[test]
    fn test_bad_structure() {
        // Data where a marker is expected.
        let j = [0xff, SOI, 0x12];
        assert_eq!(
            split_frames(&j),
            Err(FramingError::ExpectedMarker {
                offset: 2,
                byte: 0x12
            })
        );
        // Segment length below 2.
        let j = [0xff, SOI, 0xff, 0xfe, 0x00, 0x01, 0xff, EOI];
        assert_eq!(
            split_frames(&j),
            Err(FramingError::BadSegmentLength { offset: 4, len: 1 })
        );
        // Nested SOI.
        let j = [0xff, SOI, 0xff, SOI, 0xff, EOI];
        assert_eq!(
            split_frames(&j),
            Err(FramingError::BadMarker {
                offset: 2,
                marker: SOI
            })
        );
        // A segment running past the end.
        let j = [0xff, SOI, 0xff, 0xfe, 0x10, 0x00, 0xff, EOI];
        assert!(matches!(
            split_frames(&j),
            Err(FramingError::Truncated { .. })
        ));
    }

    #[test]
    fn test_sample_clips_split_to_ffprobe_counts() {
        // Counts measured with:
        // ffprobe -v error -count_frames -select_streams v:0 \
        //   -show_entries stream=nb_read_frames -of csv=p=0 videos/X.mjpeg
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../videos");
        for (file, count) in [("countdown.mjpeg", 200), ("bars.mjpeg", 200)] {
            let data = std::fs::read(dir.join(file)).expect("sample clip is readable");
            let frames = split_frames(&data).expect("sample clip splits");
            assert_eq!(frames.len(), count, "{file}");
            assert_eq!(frames.last().map(|r| r.end), Some(data.len()));
            // Every frame is distinct: the content moves.
            let mut seen: Vec<&[u8]> = frames.iter().map(|r| &data[r.clone()]).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), count, "{file}");
        }
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn prop_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut data = vec![0xff, SOI];
            data.extend_from_slice(&b);
            for input in [&b[..], &data[..]] {
                if let Ok(frames) = split_frames(input) {
                    let mut pos = 0;
                    for f in frames {
                        prop_assert_eq!(f.start, pos);
                        prop_assert!(is_complete_jpeg(&input[f.clone()]));
                        pos = f.end;
                    }
                    prop_assert_eq!(pos, input.len());
                }
            }
        }

        #[test]
        fn prop_mutated_frames_never_panic(at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut data = tricky_jpeg(1);
            data.extend(tricky_jpeg(2));
            let i = at.index(data.len());
            data[i] = byte;
            let cut = cut.index(data.len() + 1);
            if let Ok(frames) = split_frames(&data[..cut]) {
                prop_assert_eq!(frames.last().map_or(0, |r| r.end), cut);
            }
        }
    }

    #[test]
    fn test_live_framer_any_chunking_and_garbage() {
        let mut data = b"junk".to_vec();
        let frames: Vec<Vec<u8>> = (0..4).map(tricky_jpeg).collect();
        for f in &frames {
            data.extend_from_slice(f);
        }
        data.extend_from_slice(&[0x00, 0xff]);
        data.extend_from_slice(&frames[0][..10]);
        for chunk in [1, 3, 7, 64, 4096] {
            let mut m = MjpegFramer::new();
            let mut got = Vec::new();
            for c in data.chunks(chunk) {
                m.push(c);
                while let Some(f) = m.poll_frame() {
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got, frames, "chunk {chunk}");
            assert_eq!(m.skipped(), 4 + 2, "chunk {chunk}");
        }
    }
}
