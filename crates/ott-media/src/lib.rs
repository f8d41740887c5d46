//! Media framing of the OTT overlay.
//!
//! What the server and client need between a clip file and media datagrams:
//! - [`mjpeg`]: split concatenated JPEG frames by walking the JPEG structure (whole
//!   files, or a live byte stream with [`mjpeg::MjpegFramer`]);
//! - [`ts`]: cut an MPEG transport stream into units (one access unit each, keyframes
//!   marked and led by PAT/PMT), read PCR/PTS/DTS and shift them for loops;
//! - [`Clip`], [`load_dir`]: load `.mjpeg` clips (with an optional `.fps` sidecar) and
//!   `.ts` clips from files; [`ClipSource`] loops over a clip, giving each frame its
//!   flags, due time (frame rate or PCR) and timestamp;
//! - [`Packetizer`]: cut frames into datagrams of at most
//!   [`ott_proto::MAX_DATAGRAM_LEN`] bytes with an [`ott_proto::MediaHeader`];
//! - [`Reassembler`]: rebuild frames from the datagrams of one stream, in order, with
//!   bounded memory, counting what it drops;
//! - [`arq`]: per-hop loss recovery (a bounded retransmission buffer, a NACK scheduler);
//! - [`PlayoutBuffer`]: frames released in order within a latency budget;
//! - [`hls`]: HTTP Live Streaming of TS units (playlist and segments, with LL-HLS parts).
//!
//! Except [`Clip::load`] and [`load_dir`], which read files, this crate is sans-IO: it
//! opens no socket, spawns no thread and never reads the clock (time is a parameter).
//! It does not decode images or video, or relay datagrams.
//!
//! # Example
//!
//! ```
//! use ott_media::{Packetizer, Reassembler, ReassemblerConfig};
//! use ott_proto::{flags, MediaHeader, HEADER_LEN};
//!
//! let frame = vec![0x5a; 4000];
//! let mut packetizer = Packetizer::new(ott_proto::stream_id_for("news"));
//! let datagrams = packetizer.packetize(&frame, 3600, flags::KEYFRAME)?;
//! assert_eq!(datagrams.len(), 3);
//!
//! let mut reassembler = Reassembler::new(ReassemblerConfig::default());
//! let mut out = None;
//! for d in datagrams.iter().rev() {
//!     let header = MediaHeader::parse(d)?;
//!     out = out.or(reassembler.push(&header, &d[HEADER_LEN..]));
//! }
//! let got = out.expect("all fragments arrived");
//! assert_eq!((got.number, got.timestamp, &got.data[..]), (0, 3600, &frame[..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod arq;
mod clip;
mod error;
pub mod hls;
pub mod mjpeg;
mod packet;
mod playout;
mod reassembly;
pub mod ts;

pub use clip::{
    load_dir, Clip, ClipSource, TimedFrame, TsTiming, CLOCK_RATE, DEFAULT_FPS, MAX_FPS,
};
pub use error::{ClipError, FramingError};
pub use packet::{Packetizer, MAX_FRAME_LEN};
pub use playout::{PlayoutBuffer, PlayoutConfig, PlayoutStats};
pub use reassembly::{Frame, Reassembler, ReassemblerConfig, ReassemblyStats};
