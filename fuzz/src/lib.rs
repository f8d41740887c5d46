//! Shared pieces of the fuzz targets (see `fuzz_targets/` and docs/fuzzing.md).
//!
//! [`ArbMsg`] is a control message built by `arbitrary` from the fuzzer's bytes. Ids are
//! drawn from a small pool ([`ID_POOL`] plus the ids of the network under test), so that
//! forged messages name real neighbours and servers often enough to reach deep states,
//! instead of random strings that every check refuses at once.
#![deny(unsafe_code)]

use arbitrary::Arbitrary;
use ott_proto::{MediaKind, Message, NackRange, StreamInfo};

/// Names of the streams the targets use, so that ids match between messages.
pub const STREAM_NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

/// Ids that forged messages may use besides those of the network under test.
pub const ID_POOL: [&str; 3] = ["ghost", "", "x.y-z_0"];

/// An id: an index into the caller's id list, or (rarely) a free string.
#[derive(Debug, Clone, Arbitrary)]
pub enum ArbId {
    /// The `n % len`-th id of the caller's list.
    Known(u8),
    /// Any string.
    Free(String),
}

impl ArbId {
    /// The id, picked from `ids` (followed by [`ID_POOL`]).
    pub fn pick(&self, ids: &[String]) -> String {
        match self {
            Self::Known(n) => {
                let n = usize::from(*n);
                let len = ids.len() + ID_POOL.len();
                let i = n % len;
                match ids.get(i) {
                    Some(id) => id.clone(),
                    None => ID_POOL[i - ids.len()].to_owned(),
                }
            }
            Self::Free(s) => s.clone(),
        }
    }
}

/// A stream: one of [`STREAM_NAMES`] (with its real id) or any id.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum ArbStream {
    /// The `n % 3`-th of [`STREAM_NAMES`].
    Named(u8),
    /// Any id.
    Raw(u32),
}

impl ArbStream {
    /// The stream id.
    pub fn id(self) -> u32 {
        match self {
            Self::Named(n) => ott_proto::stream_id_for(STREAM_NAMES[usize::from(n) % 3]),
            Self::Raw(id) => id,
        }
    }
}

/// A catalogue entry.
#[derive(Debug, Clone, Arbitrary)]
pub struct ArbInfo {
    stream: ArbStream,
    /// A wrong id for the name (the entry lies about its id).
    mismatch: Option<u32>,
    ts: bool,
    fps_milli: u32,
}

impl ArbInfo {
    fn build(&self) -> StreamInfo {
        let name = match self.stream {
            ArbStream::Named(n) => STREAM_NAMES[usize::from(n) % 3].to_owned(),
            ArbStream::Raw(id) => format!("s{id}"),
        };
        let mut info = StreamInfo::new(
            name,
            if self.ts {
                MediaKind::Ts
            } else {
                MediaKind::Mjpeg
            },
            self.fps_milli,
        );
        if let Some(id) = self.mismatch {
            info.id = id;
        }
        info
    }
}

/// A sequence number or timestamp: small, near the top of the range, or anything.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum ArbU64 {
    /// `0..256`.
    Small(u8),
    /// `u64::MAX - n`.
    Top(u8),
    /// Any value.
    Any(u64),
}

impl ArbU64 {
    /// The value.
    pub fn get(self) -> u64 {
        match self {
            Self::Small(n) => u64::from(n),
            Self::Top(n) => u64::MAX - u64::from(n),
            Self::Any(v) => v,
        }
    }
}

/// Every [`Message`] variant, with fields the fuzzer can aim.
#[derive(Debug, Clone, Arbitrary)]
pub enum ArbMsg {
    /// [`Message::Heartbeat`].
    Heartbeat {
        /// Sender.
        from: ArbId,
        /// Sequence number.
        seq: ArbU64,
        /// Sender's clock.
        sent_us: ArbU64,
        /// Sender's incarnation.
        incarnation: ArbU64,
    },
    /// [`Message::HeartbeatAck`].
    HeartbeatAck {
        /// Sender.
        from: ArbId,
        /// Echoed sequence number.
        seq: ArbU64,
        /// Echoed clock.
        echo_us: ArbU64,
        /// Sender's incarnation.
        incarnation: ArbU64,
    },
    /// [`Message::Announce`].
    Announce {
        /// The server.
        server: ArbId,
        /// Announcement number.
        seq: ArbU64,
        /// Path, server first.
        path: Vec<ArbId>,
        /// Accumulated latency.
        latency_us: ArbU64,
        /// Offered streams.
        catalogue: Vec<ArbInfo>,
    },
    /// [`Message::Withdraw`].
    Withdraw {
        /// Sender.
        from: ArbId,
        /// The server.
        server: ArbId,
        /// Last seq.
        seq: ArbU64,
    },
    /// [`Message::RouteRequest`].
    RouteRequest {
        /// Sender.
        from: ArbId,
        /// The server.
        server: ArbId,
        /// Wanted seq.
        seq: ArbU64,
        /// Forwarding budget.
        hops_left: u8,
    },
    /// [`Message::Join`].
    Join {
        /// Stream.
        stream: ArbStream,
        /// Data port.
        data_port: u16,
        /// Sender, `None` for clients.
        from: Option<ArbId>,
    },
    /// [`Message::Leave`].
    Leave {
        /// Stream.
        stream: ArbStream,
        /// Data port.
        data_port: u16,
    },
    /// [`Message::Bye`].
    Bye {
        /// Sender.
        from: ArbId,
    },
    /// [`Message::Probe`].
    Probe {
        /// Nonce.
        nonce: ArbU64,
        /// Client clock.
        sent_us: ArbU64,
    },
    /// [`Message::ProbeReply`]; `nonce: None` echoes the last probe the client sent.
    ProbeReply {
        /// Nonce, or the last one sent.
        nonce: Option<u64>,
        /// Echoed clock, or the last one sent.
        echo_us: Option<u64>,
        /// The PoP.
        pop: ArbId,
        /// Its latency to the server.
        path_latency_us: Option<u64>,
        /// Its hops.
        hops: u32,
        /// Its viewers.
        viewers: u32,
        /// Its tree path.
        path: Vec<ArbId>,
    },
    /// [`Message::ListStreams`].
    ListStreams,
    /// [`Message::Streams`].
    Streams {
        /// The catalogue.
        streams: Vec<ArbInfo>,
    },
    /// [`Message::Nack`].
    Nack {
        /// Stream.
        stream: ArbStream,
        /// Data port.
        data_port: u16,
        /// Ranges.
        ranges: Vec<(u32, u16)>,
    },
    /// [`Message::Error`].
    Error {
        /// Reason.
        reason: String,
    },
    /// [`Message::Avoid`].
    Avoid {
        /// Stream.
        stream: ArbStream,
        /// Data port.
        data_port: u16,
        /// Nodes to avoid.
        avoid: Vec<ArbId>,
    },
}

impl ArbMsg {
    /// The message, with ids picked from `ids` and, for a `ProbeReply` without its own
    /// nonce, the `(nonce, sent_us)` of `last_probe`.
    pub fn build(&self, ids: &[String], last_probe: Option<(u64, u64)>) -> Message {
        match self {
            Self::Heartbeat {
                from,
                seq,
                sent_us,
                incarnation,
            } => Message::Heartbeat {
                from: from.pick(ids),
                seq: seq.get(),
                sent_us: sent_us.get(),
                incarnation: incarnation.get(),
            },
            Self::HeartbeatAck {
                from,
                seq,
                echo_us,
                incarnation,
            } => Message::HeartbeatAck {
                from: from.pick(ids),
                seq: seq.get(),
                echo_us: echo_us.get(),
                incarnation: incarnation.get(),
            },
            Self::Announce {
                server,
                seq,
                path,
                latency_us,
                catalogue,
            } => Message::Announce {
                server: server.pick(ids),
                seq: seq.get(),
                path: path.iter().map(|p| p.pick(ids)).collect(),
                latency_us: latency_us.get(),
                catalogue: catalogue.iter().map(ArbInfo::build).collect(),
            },
            Self::Withdraw { from, server, seq } => Message::Withdraw {
                from: from.pick(ids),
                server: server.pick(ids),
                seq: seq.get(),
            },
            Self::RouteRequest {
                from,
                server,
                seq,
                hops_left,
            } => Message::RouteRequest {
                from: from.pick(ids),
                server: server.pick(ids),
                seq: seq.get(),
                hops_left: *hops_left,
            },
            Self::Join {
                stream,
                data_port,
                from,
            } => Message::Join {
                stream: stream.id(),
                data_port: *data_port,
                from: from.as_ref().map(|f| f.pick(ids)),
            },
            Self::Leave { stream, data_port } => Message::Leave {
                stream: stream.id(),
                data_port: *data_port,
            },
            Self::Bye { from } => Message::Bye {
                from: from.pick(ids),
            },
            Self::Probe { nonce, sent_us } => Message::Probe {
                nonce: nonce.get(),
                sent_us: sent_us.get(),
            },
            Self::ProbeReply {
                nonce,
                echo_us,
                pop,
                path_latency_us,
                hops,
                viewers,
                path,
            } => {
                let (last_nonce, last_sent) = last_probe.unwrap_or_default();
                Message::ProbeReply {
                    nonce: nonce.unwrap_or(last_nonce),
                    echo_us: echo_us.unwrap_or(last_sent),
                    pop: pop.pick(ids),
                    path_latency_us: *path_latency_us,
                    hops: *hops,
                    viewers: *viewers,
                    path: path.iter().map(|p| p.pick(ids)).collect(),
                }
            }
            Self::ListStreams => Message::ListStreams,
            Self::Streams { streams } => Message::Streams {
                streams: streams.iter().map(ArbInfo::build).collect(),
            },
            Self::Nack {
                stream,
                data_port,
                ranges,
            } => Message::Nack {
                stream: stream.id(),
                data_port: *data_port,
                ranges: ranges
                    .iter()
                    .map(|&(first, count)| NackRange { first, count })
                    .collect(),
            },
            Self::Error { reason } => Message::Error {
                reason: reason.clone(),
            },
            Self::Avoid {
                stream,
                data_port,
                avoid,
            } => Message::Avoid {
                stream: stream.id(),
                data_port: *data_port,
                avoid: avoid.iter().map(|p| p.pick(ids)).collect(),
            },
        }
    }
}
