//! Error types of the media crate.

use std::path::PathBuf;

/// Why bytes could not be split into frames, or a frame into datagrams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Bytes between two frames (or before the first) that do not start a JPEG image.
    #[error(
        "unexpected byte {byte:#04x} at offset {offset}: expected a jpeg start of image (ff d8)"
    )]
    Garbage {
        /// Offset of the offending byte in the input.
        offset: usize,
        /// The byte found there.
        byte: u8,
    },
    /// The input ends inside a frame.
    #[error("jpeg frame starting at offset {start} is truncated at offset {end}")]
    Truncated {
        /// Offset of the frame's start of image.
        start: usize,
        /// Length of the input, where the frame was cut.
        end: usize,
    },
    /// A byte other than `ff` where a marker must start.
    #[error("expected a jpeg marker at offset {offset}, found byte {byte:#04x}")]
    ExpectedMarker {
        /// Offset of the offending byte.
        offset: usize,
        /// The byte found there.
        byte: u8,
    },
    /// A marker that cannot appear there (`ff 00` outside a scan, a nested start of image).
    #[error("invalid jpeg marker ff {marker:02x} at offset {offset}")]
    BadMarker {
        /// Offset of the marker's `ff` byte.
        offset: usize,
        /// The marker code.
        marker: u8,
    },
    /// A marker segment whose length field is below 2.
    #[error("jpeg segment at offset {offset} has invalid length {len}")]
    BadSegmentLength {
        /// Offset of the length field.
        offset: usize,
        /// The length read.
        len: u16,
    },
    /// Not an MPEG transport stream.
    #[error("not an mpeg transport stream: no sync byte 0x47 at 188-byte intervals")]
    NotTs,
    /// A transport stream without a readable PAT and PMT.
    #[error("mpeg transport stream has no readable pat and pmt")]
    NoPsi,
    /// A transport stream without a decodable start.
    #[error("mpeg transport stream has no keyframe (idr picture after pat and pmt)")]
    NoKeyframe,
    /// A frame too large to be carried in `u16::MAX` fragments.
    #[error("frame of {len} bytes exceeds the largest packetizable frame of {max} bytes")]
    FrameTooLarge {
        /// Frame length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Why a clip or a directory of clips could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A clip file is empty.
    #[error("clip {} is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A clip file holds no frame.
    #[error("clip {} holds no jpeg frame", path.display())]
    NoFrames {
        /// The file.
        path: PathBuf,
    },
    /// A clip file is not valid MJPEG or MPEG-TS.
    #[error("clip {} is not valid {kind}: {source}", path.display())]
    Framing {
        /// The file.
        path: PathBuf,
        /// The format expected from its extension (`mjpeg`, `mpeg-ts`).
        kind: &'static str,
        /// What is wrong in it.
        source: FramingError,
    },
    /// A frame-rate sidecar is unreadable or does not hold a valid rate.
    #[error("bad frame-rate sidecar {}: {reason}", path.display())]
    BadSidecar {
        /// The sidecar file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file's type is not supported (yet).
    #[error("clip {}: {what} is not supported", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The unsupported format.
        what: &'static str,
    },
    /// The file name gives no usable stream name (no stem, or not UTF-8).
    #[error("clip {} has no usable stream name", path.display())]
    BadName {
        /// The file.
        path: PathBuf,
    },
    /// A clip directory is a file.
    #[error("{} is not a directory", path.display())]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// A clip directory holds no supported clip.
    #[error("no clip (.mjpeg, .ts) in directory {}{}", path.display(), skipped_note(*.skipped))]
    NoClips {
        /// The directory.
        path: PathBuf,
        /// Clips skipped because they could not be loaded (each one warned about).
        skipped: usize,
    },
    /// Two clips of a directory give the same stream name.
    #[error("clips {} and {} both give stream name {name:?}", first.display(), second.display())]
    DuplicateName {
        /// The stream name.
        name: String,
        /// The first clip.
        first: PathBuf,
        /// The second clip.
        second: PathBuf,
    },
}

fn skipped_note(skipped: usize) -> String {
    if skipped == 0 {
        String::new()
    } else {
        format!(" that loads ({skipped} bad or unsupported clips skipped: see the warnings above)")
    }
}
