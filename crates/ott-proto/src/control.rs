//! Control-plane messages and their MessagePack codec.

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, EncodeError};

/// Version carried in every [`Envelope`]; a peer with another version is refused.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest control datagram accepted by [`decode`] or produced by [`encode`].
///
/// Control messages normally fit one 1472-byte datagram; the limit leaves room for long
/// announcement paths in big overlays while staying under the UDP maximum.
pub const MAX_CONTROL_LEN: usize = 16 * 1024;

/// Identifier of an overlay node, as written in the topology file (`"n12"`).
pub type NodeId = String;

/// Identifier of a stream on the data plane, derived from its name by [`stream_id_for`].
pub type StreamId = u32;

/// Stream identifier of a stream name: 32-bit FNV-1a of its UTF-8 bytes.
///
/// Deriving the id from the name means two servers offering the same stream name put
/// the same id in their media headers without any coordination.
pub fn stream_id_for(name: &str) -> StreamId {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// How a stream's payload is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MediaKind {
    /// Motion JPEG: each frame is one whole JPEG image.
    Mjpeg,
    /// MPEG transport stream: frames are groups of 188-byte TS packets.
    Ts,
}

/// One entry of a server's catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Stream name (the clip's file stem).
    pub name: String,
    /// Data-plane id, `stream_id_for(&name)`.
    pub id: StreamId,
    /// Payload framing.
    pub kind: MediaKind,
    /// Nominal frame rate in frames per 1000 s (25 fps = 25000); 0 if unknown.
    pub fps_milli: u32,
}

impl StreamInfo {
    /// A catalogue entry whose id is derived from its name.
    pub fn new(name: impl Into<String>, kind: MediaKind, fps_milli: u32) -> Self {
        let name = name.into();
        let id = stream_id_for(&name);
        Self {
            name,
            id,
            kind,
            fps_milli,
        }
    }
}

/// An inclusive range of missing media sequence numbers, for [`Message::Nack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NackRange {
    /// First missing sequence number.
    pub first: u32,
    /// Number of missing sequence numbers from `first` on.
    pub count: u16,
}

/// Every control message of the overlay.
///
/// Timestamps (`*_us`) are microseconds on the *sender's own* monotonic clock, echoed
/// back unchanged: no two hosts' clocks are ever compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Neighbour liveness probe, sent periodically to each overlay neighbour.
    Heartbeat {
        /// Sender's node id.
        from: NodeId,
        /// Sequence number of this heartbeat.
        seq: u64,
        /// Sender's clock at sending, µs.
        sent_us: u64,
        /// Grows at each restart of the sender, so a restarted node is seen as new.
        incarnation: u64,
    },
    /// Answer to a [`Message::Heartbeat`].
    HeartbeatAck {
        /// Sender's node id.
        from: NodeId,
        /// The heartbeat's sequence number.
        seq: u64,
        /// The heartbeat's `sent_us`, echoed.
        echo_us: u64,
        /// Incarnation of the node answering.
        incarnation: u64,
    },
    /// A server's periodic announcement, flooded along the overlay.
    Announce {
        /// The announcing server.
        server: NodeId,
        /// Grows by one per announcement period of that server.
        seq: u64,
        /// Node ids the announcement went through, the server first, the sender last.
        path: Vec<NodeId>,
        /// Accumulated one-way latency from the server to the sender, µs.
        latency_us: u64,
        /// Streams the server offers.
        catalogue: Vec<StreamInfo>,
    },
    /// "I have no path to this server any more."
    Withdraw {
        /// Sender's node id.
        from: NodeId,
        /// The server that became unreachable.
        server: NodeId,
        /// Last announcement sequence number the sender had.
        seq: u64,
    },
    /// "I lost my route to `server` and no neighbour's offer is feasible: send me an
    /// announcement of it, with a seq of at least `seq` if you can" (Babel's seqno
    /// request, RFC 8966 §3.8.1.2). A node with a route answers the sender with its
    /// announcement at once and, when its route is older than `seq`, forwards the
    /// request to its parent with `hops_left` one lower; the server answers with a
    /// fresh announcement. Rate-limited by every receiver. With `hops_left` 1 it is a
    /// node asking its parent for the seq it missed (announcements lost on the way):
    /// answered, not forwarded, no sign of a break.
    RouteRequest {
        /// Sender's node id.
        from: NodeId,
        /// The server a route is wanted to.
        server: NodeId,
        /// The announcement seq wanted (one more than the requester's feasibility
        /// distance's).
        seq: u64,
        /// How many more times the request may be forwarded.
        hops_left: u8,
    },
    /// Subscribe the sender to a stream (soft state: repeated every period).
    Join {
        /// The stream.
        stream: StreamId,
        /// UDP port at the sender's IP address where media must be sent.
        data_port: u16,
        /// Sender's node id; `None` for clients.
        from: Option<NodeId>,
    },
    /// Unsubscribe the sender from a stream.
    Leave {
        /// The stream.
        stream: StreamId,
        /// UDP port given in the matching `Join`.
        data_port: u16,
    },
    /// A PoP's answer to a viewer's first [`Message::Join`] (return-routability check):
    /// sent to the viewer's data address, the one the media would go to. The viewer
    /// must echo `cookie` in a [`Message::ViewerJoin`] before anything is sent to it.
    Cookie {
        /// The stream the viewer asked for.
        stream: StreamId,
        /// The data port the viewer named.
        data_port: u16,
        /// Keyed hash, by the PoP's secret, of the viewer's address, data port and a
        /// coarse time bucket.
        cookie: u64,
    },
    /// A viewer's `Join` echoing the PoP's [`Message::Cookie`] (also its refresh).
    ViewerJoin {
        /// The stream.
        stream: StreamId,
        /// UDP port at the sender's IP address where media must be sent.
        data_port: u16,
        /// The cookie the PoP sent to that address.
        cookie: u64,
    },
    /// A PoP admitted a viewer: media to it carries a tag made with `session_key`.
    /// Sent to the viewer's data address, answering each valid [`Message::ViewerJoin`].
    Admitted {
        /// The stream.
        stream: StreamId,
        /// The data port the viewer named.
        data_port: u16,
        /// The key of the tags on the media this PoP sends to that address.
        session_key: [u8; 32],
    },
    /// A viewer unsubscribes, proving with its cookie that it owns the address.
    ViewerLeave {
        /// The stream.
        stream: StreamId,
        /// The data port of the matching `ViewerJoin`.
        data_port: u16,
        /// The cookie echoed in the `ViewerJoin`.
        cookie: u64,
    },
    /// The sender leaves the overlay (clean shutdown).
    Bye {
        /// Sender's node id.
        from: NodeId,
    },
    /// A client measures a PoP.
    Probe {
        /// Matches the reply to the probe.
        nonce: u64,
        /// Client's clock at sending, µs.
        sent_us: u64,
    },
    /// A PoP's answer to [`Message::Probe`].
    ProbeReply {
        /// The probe's nonce.
        nonce: u64,
        /// The probe's `sent_us`, echoed.
        echo_us: u64,
        /// The PoP's node id.
        pop: NodeId,
        /// The PoP's accumulated latency to its (best) server, µs; `None` without a path.
        path_latency_us: Option<u64>,
        /// The PoP's hop count to its server.
        hops: u32,
        /// Number of viewers attached to the PoP.
        viewers: u32,
        /// The PoP's tree path from that server, node ids from the server to the PoP
        /// inclusive; empty without a path or when it would not fit the reply's
        /// budget ([`MAX_PROBE_PATH_BYTES`]). A viewer with two paths
        /// (`ott-client --paths 2`) picks two PoPs whose paths share no node.
        path: Vec<NodeId>,
    },
    /// Ask a PoP for the stream catalogue.
    ListStreams,
    /// The catalogue known to a PoP.
    Streams {
        /// Streams reachable through that PoP.
        streams: Vec<StreamInfo>,
    },
    /// Ask the parent to resend missing media datagrams of a stream.
    Nack {
        /// The stream.
        stream: StreamId,
        /// UDP port the retransmissions go to.
        data_port: u16,
        /// Missing sequence numbers.
        ranges: Vec<NackRange>,
    },
    /// A request was refused.
    Error {
        /// What was wrong, for a human.
        reason: String,
    },
    /// "Bring me `stream` over a path that goes through none of `avoid`": soft state
    /// attached to the sender's subscription (the child at the sender's IP address and
    /// `data_port`), repeated with each of its `Join`s and forgotten with it. A viewer
    /// sends it to the PoP of its second path (`ott-client --paths 2`) with the nodes
    /// of its first path; a node passes the union of its children's sets, plus its own
    /// id, to its upstream, so no subscription chain can loop. A node takes the stream
    /// from the best feasible neighbour whose announced path avoids the set, or from its
    /// parent when none does. At most [`MAX_AVOID`] ids are heeded.
    Avoid {
        /// The stream.
        stream: StreamId,
        /// UDP port of the matching `Join`.
        data_port: u16,
        /// Node ids the stream's path should not go through.
        avoid: Vec<NodeId>,
    },
}

/// Most node ids of an [`Message::Avoid`] a node heeds (and passes on).
pub const MAX_AVOID: usize = 64;

impl Message {
    /// Short name of the variant, for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Heartbeat { .. } => "heartbeat",
            Self::HeartbeatAck { .. } => "heartbeat_ack",
            Self::Announce { .. } => "announce",
            Self::Withdraw { .. } => "withdraw",
            Self::RouteRequest { .. } => "route_request",
            Self::Join { .. } => "join",
            Self::Leave { .. } => "leave",
            Self::Cookie { .. } => "cookie",
            Self::ViewerJoin { .. } => "viewer_join",
            Self::Admitted { .. } => "admitted",
            Self::ViewerLeave { .. } => "viewer_leave",
            Self::Bye { .. } => "bye",
            Self::Probe { .. } => "probe",
            Self::ProbeReply { .. } => "probe_reply",
            Self::ListStreams => "list_streams",
            Self::Streams { .. } => "streams",
            Self::Nack { .. } => "nack",
            Self::Error { .. } => "error",
            Self::Avoid { .. } => "avoid",
        }
    }
}

/// The versioned wrapper every control datagram carries. A viewer's request has a third
/// element after the message, zero bytes of padding ([`request_padding`]), which
/// [`decode`] skips.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u8,
    /// The message.
    pub msg: Message,
}

/// Smallest datagram of a request a PoP answers to an address it has not admitted yet:
/// its answer (a [`Message::Cookie`], [`Message::ProbeReply`], [`Message::Streams`] or
/// [`Message::Error`]) is never bigger than the request, so a forged source address
/// gets no amplification. [`encode`] pads these requests (see [`Envelope`]).
///
/// `None` for every message that is not such a request.
pub fn request_padding(msg: &Message) -> Option<usize> {
    match msg {
        Message::Join { from: None, .. }
        | Message::ViewerJoin { .. }
        | Message::ViewerLeave { .. } => Some(PAD_JOIN),
        Message::Probe { .. } => Some(PAD_PROBE),
        Message::ListStreams => Some(PAD_LIST_STREAMS),
        _ => None,
    }
}

/// A viewer's `Join`, `ViewerJoin`, `ViewerLeave`: a `Cookie` or an `Error` fits.
const PAD_JOIN: usize = 96;
/// A `Probe`: the `ProbeReply` fits with a PoP id of up to about 64 bytes and a path of
/// up to [`MAX_PROBE_PATH_BYTES`].
const PAD_PROBE: usize = 256;

/// Most bytes of node ids a PoP puts in a [`Message::ProbeReply`]'s `path` (with one
/// byte of overhead per id); a longer path is sent empty, so the reply stays within the
/// probe's padding.
pub const MAX_PROBE_PATH_BYTES: usize = 112;
/// `ListStreams`: a catalogue of about 30 streams fits (as a QUIC Initial, one
/// ordinary datagram).
const PAD_LIST_STREAMS: usize = 1200;

/// Encode a control message into one datagram (a viewer's request padded to
/// [`request_padding`]).
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    // Most messages fit in 128 bytes: one allocation instead of a doubling from 8.
    let mut buf = Vec::with_capacity(128);
    encode_into(msg, &mut buf)?;
    Ok(buf)
}

/// [`encode`] into `buf`, which is cleared first: a caller that encodes many messages
/// reuses one buffer instead of allocating one per message. On error `buf` holds no
/// datagram to send (it may hold part of one).
pub fn encode_into(msg: &Message, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
    buf.clear();
    let env = EnvelopeRef {
        v: PROTOCOL_VERSION,
        msg,
    };
    rmp_serde::encode::write(buf, &env).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if let Some(min) = request_padding(msg) {
        // The envelope gets a third element: an array of zeros (one byte each) whose
        // header is 3 bytes (array 16), or 1 for fewer than 16.
        let want = min.saturating_sub(buf.len());
        let n = if want <= 16 {
            want.saturating_sub(1)
        } else {
            (want - 3).max(16)
        };
        let padded = PaddedRef {
            v: PROTOCOL_VERSION,
            msg,
            pad: vec![0u8; n],
        };
        buf.clear();
        rmp_serde::encode::write(buf, &padded)
            .map_err(|e| EncodeError::Serialize(e.to_string()))?;
    }
    if buf.len() > MAX_CONTROL_LEN {
        return Err(EncodeError::TooLong {
            len: buf.len(),
            max: MAX_CONTROL_LEN,
        });
    }
    Ok(())
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    v: u8,
    msg: &'a Message,
}

#[derive(Serialize)]
struct PaddedRef<'a> {
    v: u8,
    msg: &'a Message,
    pad: Vec<u8>,
}

/// Decode one control datagram.
///
/// Refuses, with a typed error and without panicking: empty or oversized input, a wrong
/// protocol version, malformed MessagePack, and trailing bytes.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    if buf.is_empty() {
        return Err(DecodeError::Empty);
    }
    if buf.len() > MAX_CONTROL_LEN {
        return Err(DecodeError::TooLong {
            len: buf.len(),
            max: MAX_CONTROL_LEN,
        });
    }
    if let Some(m) = decode_liveness(buf) {
        return Ok(m);
    }
    decode_with_serde(buf)
}

/// [`decode`] by serde alone: what [`decode_liveness`] does not take.
fn decode_with_serde(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut de = rmp_serde::Deserializer::new(buf);
    let env = match EnvelopeIn::deserialize(&mut de) {
        Ok(env) => env,
        Err(e) => {
            // A future version's body need not parse as ours: read the version alone,
            // with a fresh deserializer (a failed one is never read on: rmp-serde does
            // not restore its nesting budget on an error, and reading on after one
            // underflowed it, a panic the fuzzer found).
            let mut again = rmp_serde::Deserializer::new(buf);
            return match VersionOnly::deserialize(&mut again) {
                Ok(o) if o.v != PROTOCOL_VERSION => Err(DecodeError::Version(o.v)),
                _ => Err(DecodeError::Malformed(e.to_string())),
            };
        }
    };
    if env.v != PROTOCOL_VERSION {
        return Err(DecodeError::Version(env.v));
    }
    let rest = de.get_ref().len();
    if rest != 0 {
        return Err(DecodeError::Trailing(rest));
    }
    Ok(env.msg)
}

/// The two liveness messages ([`Message::Heartbeat`], [`Message::HeartbeatAck`]), most
/// of the control traffic (every neighbour, 20 of each per second), decoded without
/// serde's generic walk, when their datagram is laid out exactly as [`encode`] lays it
/// out: `[1, {name: [from, seq, µs, incarnation]}]`, the id a MessagePack str and the
/// numbers unsigned ints, nothing after. Anything else, `None`: [`decode`] then reads
/// it with serde, which decodes these same bytes to the same message (the tests
/// compare the two on ids and numbers of every width, and on damaged copies).
fn decode_liveness(buf: &[u8]) -> Option<Message> {
    let mut r = MsgpackReader(buf);
    // An array of two, the version as a positive fixint, a map of one.
    if PROTOCOL_VERSION >= 0x80 || r.byte()? != 0x92 || r.byte()? != PROTOCOL_VERSION {
        return None;
    }
    if r.byte()? != 0x81 {
        return None;
    }
    let heartbeat = match r.str()? {
        "Heartbeat" => true,
        "HeartbeatAck" => false,
        _ => return None,
    };
    // The variant's four fields, as an array.
    if r.byte()? != 0x94 {
        return None;
    }
    let from = r.str()?.to_owned();
    let (seq, us, incarnation) = (r.uint()?, r.uint()?, r.uint()?);
    if !r.0.is_empty() {
        return None;
    }
    Some(if heartbeat {
        Message::Heartbeat {
            from,
            seq,
            sent_us: us,
            incarnation,
        }
    } else {
        Message::HeartbeatAck {
            from,
            seq,
            echo_us: us,
            incarnation,
        }
    })
}

/// The MessagePack items [`decode_liveness`] reads, from the front of a datagram.
struct MsgpackReader<'a>(&'a [u8]);

impl<'a> MsgpackReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(*self.take(1)?.first()?)
    }

    /// A big-endian unsigned number of `N` bytes.
    fn be<const N: usize>(&mut self) -> Option<u64> {
        let b: [u8; N] = self.take(N)?.try_into().ok()?;
        Some(b.iter().fold(0, |v, &x| v << 8 | u64::from(x)))
    }

    /// A str (fixstr, str 8, 16 or 32) of valid UTF-8.
    fn str(&mut self) -> Option<&'a str> {
        let len = match self.byte()? {
            m @ 0xa0..=0xbf => u64::from(m & 0x1f),
            0xd9 => self.be::<1>()?,
            0xda => self.be::<2>()?,
            0xdb => self.be::<4>()?,
            _ => return None,
        };
        std::str::from_utf8(self.take(usize::try_from(len).ok()?)?).ok()
    }

    /// An unsigned int (positive fixint, uint 8, 16, 32 or 64).
    fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            v @ 0x00..=0x7f => Some(u64::from(v)),
            0xcc => self.be::<1>(),
            0xcd => self.be::<2>(),
            0xce => self.be::<4>(),
            0xcf => self.be::<8>(),
            _ => None,
        }
    }
}

/// The envelope as [`decode`] reads it: the body strictly, the request padding
/// ([`request_padding`]) skipped.
#[derive(Deserialize)]
struct EnvelopeIn {
    v: u8,
    msg: Message,
    #[serde(default)]
    #[allow(dead_code)]
    pad: Option<serde::de::IgnoredAny>,
}

/// The version alone, everything else skipped: tells a future version's unknown body
/// ([`DecodeError::Version`]) from a malformed one.
#[derive(Deserialize)]
struct VersionOnly {
    v: u8,
    #[serde(default)]
    #[allow(dead_code)]
    msg: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    pad: Option<serde::de::IgnoredAny>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Heartbeats and acks of every width of id and number, as [`encode`] writes them.
    fn liveness_samples() -> Vec<Message> {
        let ids = [
            "",
            "n1",
            "r0412",
            &"x".repeat(31),
            &"y".repeat(32),
            &"z".repeat(300),
        ];
        let nums = [
            0,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX),
            1 << 32,
            u64::MAX,
        ];
        let mut out = Vec::new();
        for (k, id) in ids.iter().enumerate() {
            for (j, &n) in nums.iter().enumerate() {
                let (a, b) = (nums[(j + k) % nums.len()], nums[(j * 7 + k) % nums.len()]);
                out.push(Message::Heartbeat {
                    from: (*id).to_owned(),
                    seq: n,
                    sent_us: a,
                    incarnation: b,
                });
                out.push(Message::HeartbeatAck {
                    from: (*id).to_owned(),
                    seq: b,
                    echo_us: n,
                    incarnation: a,
                });
            }
        }
        out
    }

    #[test]
    fn heartbeats_and_acks_take_the_fast_path_to_the_same_message_as_serde() {
        for m in liveness_samples() {
            let b = encode(&m).expect("encodes");
            assert_eq!(decode_liveness(&b).as_ref(), Some(&m), "{m:?}");
            assert_eq!(decode_with_serde(&b).expect("serde decodes"), m);
        }
        // Other messages are left to serde.
        let join = encode(&Message::Join {
            stream: 3,
            data_port: 7000,
            from: None,
        })
        .expect("encodes");
        assert_eq!(decode_liveness(&join), None);
    }

    #[test]
    fn what_the_fast_path_takes_from_damaged_bytes_serde_decodes_the_same() {
        // Every byte of every sample changed to a few values, and every truncation:
        // whatever the fast path still accepts, serde must decode to the same message.
        let mut taken = 0;
        let mut left = 0;
        for m in liveness_samples().iter().take(40) {
            let b = encode(m).expect("encodes");
            let mut variants: Vec<Vec<u8>> = (0..b.len()).map(|n| b[..n].to_vec()).collect();
            for k in 0..b.len() {
                for x in [
                    0x00, 0x01, 0x7f, 0x80, 0x92, 0xa5, 0xcc, 0xcf, 0xd0, 0xd9, 0xff,
                ] {
                    let mut v = b.clone();
                    v[k] = x;
                    variants.push(v);
                }
            }
            let mut longer = b.clone();
            longer.push(0);
            variants.push(longer);
            for v in variants {
                match decode_liveness(&v) {
                    Some(fast) => {
                        taken += 1;
                        assert_eq!(decode_with_serde(&v).ok(), Some(fast), "{v:02x?}");
                    }
                    None => left += 1,
                }
            }
        }
        assert!(taken > 100 && left > 100, "{taken} taken, {left} left");
    }

    /// `encode_into` gives `encode`'s bytes, padded requests included, whatever the
    /// buffer held before.
    #[test]
    fn encode_into_a_used_buffer_gives_the_same_bytes() {
        let msgs = [
            Message::Heartbeat {
                from: "r0412".into(),
                seq: 7,
                sent_us: 1_234_567,
                incarnation: 99,
            },
            Message::Join {
                stream: 3,
                data_port: 7000,
                from: None,
            },
            Message::ListStreams,
        ];
        let mut buf = vec![0xAB; 3000];
        for m in &msgs {
            encode_into(m, &mut buf).expect("encodes");
            assert_eq!(buf, encode(m).expect("encodes"), "{m:?}");
        }
    }

    #[test]
    fn viewer_requests_are_padded_to_at_least_their_answers() {
        let join = Message::Join {
            stream: u32::MAX,
            data_port: u16::MAX,
            from: None,
        };
        let probe = Message::Probe {
            nonce: u64::MAX,
            sent_us: u64::MAX,
        };
        let cookie = Message::Cookie {
            stream: u32::MAX,
            data_port: u16::MAX,
            cookie: u64::MAX,
        };
        let error = Message::Error {
            reason: "too many viewers of this stream at this PoP".into(),
        };
        let reply = Message::ProbeReply {
            nonce: u64::MAX,
            echo_us: u64::MAX,
            pop: "p".repeat(64),
            path_latency_us: Some(u64::MAX),
            hops: u32::MAX,
            viewers: u32::MAX,
            path: (0..8).map(|i| format!("relay-{i:07}")).collect(),
        };
        let streams = Message::Streams {
            streams: (0..20)
                .map(|i| StreamInfo::new(format!("stream-number-{i}"), MediaKind::Mjpeg, 25_000))
                .collect(),
        };
        let len = |m: &Message| encode(m).expect("encodes").len();
        for (req, answers) in [
            (&join, vec![&cookie, &error]),
            (&probe, vec![&reply]),
            (&Message::ListStreams, vec![&streams, &error]),
        ] {
            let r = encode(req).expect("encodes");
            assert!(r.len() >= request_padding(req).expect("a viewer's request"));
            assert_eq!(decode(&r).expect("decodes"), *req);
            for a in answers {
                assert!(
                    len(a) <= r.len(),
                    "{a:?} is {} bytes for a {} byte {req:?}",
                    len(a),
                    r.len()
                );
            }
        }
        assert_eq!(request_padding(&cookie), None);
        assert!(len(&cookie) < 40);
    }

    fn sample() -> Vec<Message> {
        vec![
            Message::Heartbeat {
                from: "n1".into(),
                seq: 7,
                sent_us: 123_456,
                incarnation: 2,
            },
            Message::Announce {
                server: "s1".into(),
                seq: 9,
                path: vec!["s1".into(), "n12".into()],
                latency_us: 2_000,
                catalogue: vec![StreamInfo::new("news", MediaKind::Mjpeg, 25_000)],
            },
            Message::Join {
                stream: stream_id_for("news"),
                data_port: 7001,
                from: None,
            },
            Message::RouteRequest {
                from: "n9".into(),
                server: "s1".into(),
                seq: u64::MAX,
                hops_left: 16,
            },
            Message::ListStreams,
            Message::Cookie {
                stream: 5,
                data_port: 9000,
                cookie: u64::MAX,
            },
            Message::ViewerJoin {
                stream: 5,
                data_port: 9000,
                cookie: 0x0123_4567_89ab_cdef,
            },
            Message::Admitted {
                stream: 5,
                data_port: 9000,
                session_key: [0xa5; 32],
            },
            Message::ViewerLeave {
                stream: 5,
                data_port: 9000,
                cookie: 1,
            },
            Message::Nack {
                stream: 1,
                data_port: 9,
                ranges: vec![NackRange { first: 4, count: 2 }],
            },
        ]
    }

    #[test]
    fn test_round_trip_samples() {
        for m in sample() {
            let b = encode(&m).expect("encodes");
            assert_eq!(decode(&b).expect("decodes"), m);
        }
    }

    #[test]
    fn test_stream_id_is_fnv1a() {
        // Reference values of 32-bit FNV-1a.
        assert_eq!(stream_id_for(""), 0x811c_9dc5);
        assert_eq!(stream_id_for("a"), 0xe40c_292c);
    }

    #[test]
    fn test_rejects_empty_long_version_trailing() {
        assert!(matches!(decode(&[]), Err(DecodeError::Empty)));
        let big = vec![0u8; MAX_CONTROL_LEN + 1];
        assert!(matches!(decode(&big), Err(DecodeError::TooLong { .. })));
        let mut b = encode(&Message::ListStreams).expect("encodes");
        // A future version with an unknown body.
        let future = rmp_serde::to_vec(&(99u8, "something else")).expect("encodes");
        assert!(matches!(decode(&future), Err(DecodeError::Version(99))));
        b.push(0);
        assert!(matches!(decode(&b), Err(DecodeError::Trailing(1))));
        assert!(matches!(
            decode(b"\xff\xff\xff"),
            Err(DecodeError::Malformed(_))
        ));
    }

    /// Found by the `control` fuzz target (the input is in its corpus): an envelope
    /// whose `msg` bodies failed to decode, then more keys. The old decoder swallowed
    /// each body's error and read on, and rmp-serde, which does not restore its nesting
    /// budget on an error, underflowed it: a panic. It is an error now.
    #[test]
    fn test_an_input_that_underflowed_the_nesting_budget_is_an_error() {
        let found = include_bytes!("../../../fuzz/corpus/control/regression-depth-underflow");
        assert!(decode(found).is_err());
    }

    #[test]
    fn test_admitted_with_a_short_key_is_an_error() {
        // `Admitted` whose key has 31 bytes instead of 32: refused, not truncated.
        let short = rmp_serde::to_vec(&(
            PROTOCOL_VERSION,
            std::collections::BTreeMap::from([("Admitted", (5u32, 9000u16, vec![1u8; 31]))]),
        ))
        .expect("encodes");
        assert!(matches!(decode(&short), Err(DecodeError::Malformed(_))));
        let good = rmp_serde::to_vec(&(
            PROTOCOL_VERSION,
            std::collections::BTreeMap::from([("Admitted", (5u32, 9000u16, [1u8; 32]))]),
        ))
        .expect("encodes");
        assert!(matches!(decode(&good), Ok(Message::Admitted { .. })));
    }

    fn arb_info() -> impl Strategy<Value = StreamInfo> {
        ("[a-z]{1,12}", any::<bool>(), any::<u32>()).prop_map(|(n, ts, fps)| {
            StreamInfo::new(n, if ts { MediaKind::Ts } else { MediaKind::Mjpeg }, fps)
        })
    }

    fn arb_msg() -> impl Strategy<Value = Message> {
        prop_oneof![
            ("[a-z0-9]{1,8}", any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(from, seq, sent_us, incarnation)| Message::Heartbeat {
                    from,
                    seq,
                    sent_us,
                    incarnation
                }
            ),
            (
                "[a-z0-9]{1,8}",
                any::<u64>(),
                proptest::collection::vec("[a-z0-9]{1,8}", 0..20),
                any::<u64>(),
                proptest::collection::vec(arb_info(), 0..8)
            )
                .prop_map(|(server, seq, path, latency_us, catalogue)| {
                    Message::Announce {
                        server,
                        seq,
                        path,
                        latency_us,
                        catalogue,
                    }
                }),
            (
                any::<u32>(),
                any::<u16>(),
                proptest::option::of("[a-z]{1,5}")
            )
                .prop_map(|(stream, data_port, from)| Message::Join {
                    stream,
                    data_port,
                    from
                }),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::option::of(any::<u64>()),
                any::<u32>()
            )
                .prop_map(|(nonce, echo_us, path_latency_us, hops)| {
                    Message::ProbeReply {
                        nonce,
                        echo_us,
                        pop: "p".into(),
                        path_latency_us,
                        hops,
                        viewers: 3,
                        path: vec!["s".into(), "p".into()],
                    }
                }),
            Just(Message::ListStreams),
            (any::<u32>(), any::<u16>(), any::<u64>()).prop_map(|(stream, data_port, cookie)| {
                Message::ViewerJoin {
                    stream,
                    data_port,
                    cookie,
                }
            }),
            (any::<u32>(), any::<u16>(), any::<[u8; 32]>()).prop_map(
                |(stream, data_port, session_key)| Message::Admitted {
                    stream,
                    data_port,
                    session_key,
                }
            ),
            ".{0,40}".prop_map(|reason| Message::Error { reason }),
            (
                any::<u32>(),
                any::<u16>(),
                proptest::collection::vec("[a-z0-9]{1,8}", 0..5)
            )
                .prop_map(|(stream, data_port, avoid)| Message::Avoid {
                    stream,
                    data_port,
                    avoid,
                }),
        ]
    }

    proptest! {
        #[test]
        fn prop_round_trip(m in arb_msg()) {
            let b = encode(&m).expect("encodes");
            prop_assert_eq!(decode(&b).expect("decodes"), m);
        }

        #[test]
        fn prop_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&b);
        }

        #[test]
        fn prop_truncation_is_an_error(m in arb_msg(), cut in 1usize..64) {
            let b = encode(&m).expect("encodes");
            let keep = b.len().saturating_sub(cut);
            prop_assert!(decode(&b[..keep]).is_err());
        }
    }
}
