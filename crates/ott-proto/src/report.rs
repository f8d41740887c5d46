//! State reports: what an overlay node tells the bootstrapper about itself, for the
//! dashboard (`ott-bootstrap --http`).
//!
//! A node sends one [`StateReport`] every half second or so, over UDP, to the port of
//! the bootstrapper's TCP address. The report is not a control [`crate::Message`]: it
//! has its own datagram layout, so that nothing that reads control datagrams can mistake
//! one for the other, and so that the bootstrapper needs only this decoder:
//!
//! ```text
//! "OR" (2 bytes) | version (1 byte, REPORT_VERSION) | MessagePack of StateReport
//! ```
//!
//! [`decode_report`] refuses, with a typed [`ReportError`] and without panicking: input
//! longer than [`MAX_REPORT_LEN`], a wrong magic or version, malformed MessagePack,
//! trailing bytes, and any list longer than [`MAX_REPORT_ITEMS`] or string longer than
//! [`MAX_REPORT_STR`] (so a report costs its receiver a bounded amount of memory).
//!
//! Where the overlay has a key, the whole datagram is the body that gets sealed: a
//! sealing layer wraps the bytes of [`encode_report`] and unwraps them before
//! [`decode_report`], without knowing what is inside.

use serde::{Deserialize, Serialize};

use crate::control::NodeId;
use crate::error::EncodeError;

/// First two bytes of every report datagram.
pub const REPORT_MAGIC: [u8; 2] = *b"OR";
/// Version of the report layout; a report of another version is refused.
pub const REPORT_VERSION: u8 = 1;
/// Largest report datagram accepted by [`decode_report`] or produced by [`encode_report`].
pub const MAX_REPORT_LEN: usize = 16 * 1024;
/// Most entries in any list of a report (routes, streams, children, neighbours, viewers).
pub const MAX_REPORT_ITEMS: usize = 256;
/// Longest string (an id, a stream name, a viewer address) in a report, bytes.
pub const MAX_REPORT_STR: usize = 128;

/// A node's state at one moment, as sent to the bootstrapper.
///
/// Latencies are microseconds, accumulated from the server (routes) or smoothed
/// round-trip times (neighbours), as the node measured them itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReport {
    /// The node's id.
    pub id: NodeId,
    /// `server`, `relay` or `pop`, as the node believes.
    pub role: String,
    /// Grows at each restart of the node.
    pub incarnation: u64,
    /// Grows by one per report of this incarnation: older reports are ignored.
    pub seq: u64,
    /// Set in the last report of a node that is shutting down.
    pub leaving: bool,
    /// The server the node's best route leads to (itself for a server).
    pub server: Option<NodeId>,
    /// The parent on that route (`None` for a server, or without a route).
    pub parent: Option<NodeId>,
    /// Accumulated latency of that route, µs.
    pub latency_us: Option<u64>,
    /// Hops of that route.
    pub hops: Option<u32>,
    /// The route towards every server the node knows.
    pub routes: Vec<RouteReport>,
    /// Streams the node knows, with who feeds it each and whom it feeds.
    pub streams: Vec<StreamReport>,
    /// Every overlay neighbour.
    pub neighbours: Vec<NeighbourReport>,
    /// Viewers attached to the node (a PoP), all streams together.
    pub viewers: u32,
    /// Some of those viewers' addresses (`ip:port`), at most [`MAX_REPORT_ITEMS`].
    pub viewer_addrs: Vec<String>,
}

/// A node's route towards one server, in a [`StateReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteReport {
    /// The server.
    pub server: NodeId,
    /// The parent chosen towards it.
    pub parent: Option<NodeId>,
    /// Accumulated latency from the server, µs.
    pub latency_us: Option<u64>,
    /// Hops from the server.
    pub hops: Option<u32>,
}

/// One stream at a node, in a [`StateReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamReport {
    /// The stream's name.
    pub name: String,
    /// The neighbour the node receives it from (`None` at its server, or when the node
    /// does not receive it).
    pub upstream: Option<NodeId>,
    /// Overlay nodes the node forwards it to.
    pub children: Vec<NodeId>,
    /// Viewers the node sends it to.
    pub viewers: u32,
}

/// One overlay neighbour, in a [`StateReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourReport {
    /// Its id.
    pub id: NodeId,
    /// Alive by the node's heartbeats.
    pub alive: bool,
    /// Smoothed round-trip time, µs.
    pub rtt_us: Option<u64>,
}

/// Why a report datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Fewer than the three bytes of magic and version.
    #[error("report datagram of {0} bytes is too short")]
    Short(usize),
    /// More than [`MAX_REPORT_LEN`] bytes.
    #[error("report datagram of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Length of the datagram.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not a report (the first two bytes are not `OR`).
    #[error("not a state report (magic {0:#06x})")]
    Magic(u16),
    /// A layout version this build does not read.
    #[error("unsupported report version {0}")]
    Version(u8),
    /// The body is not a valid MessagePack report.
    #[error("malformed state report: {0}")]
    Malformed(String),
    /// Bytes were left over after the report.
    #[error("{0} trailing bytes after state report")]
    Trailing(usize),
    /// A list longer than [`MAX_REPORT_ITEMS`].
    #[error("state report has {len} {what}, more than {max}")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A string longer than [`MAX_REPORT_STR`] bytes.
    #[error("state report has a {what} of {len} bytes, more than {max}")]
    StringTooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Encode a report into one datagram.
///
/// Fails with [`EncodeError::TooLong`] when it would exceed [`MAX_REPORT_LEN`]; a sender
/// then trims its lists (see [`StateReport::trim`]) and tries again.
pub fn encode_report(report: &StateReport) -> Result<Vec<u8>, EncodeError> {
    let mut buf = Vec::with_capacity(512);
    buf.extend_from_slice(&REPORT_MAGIC);
    buf.push(REPORT_VERSION);
    rmp_serde::encode::write(&mut buf, report)
        .map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if buf.len() > MAX_REPORT_LEN {
        return Err(EncodeError::TooLong {
            len: buf.len(),
            max: MAX_REPORT_LEN,
        });
    }
    Ok(buf)
}

/// Decode one report datagram, checking every bound (see the module documentation).
pub fn decode_report(buf: &[u8]) -> Result<StateReport, ReportError> {
    if buf.len() > MAX_REPORT_LEN {
        return Err(ReportError::TooLong {
            len: buf.len(),
            max: MAX_REPORT_LEN,
        });
    }
    let (head, body) = match buf {
        [a, b, v, body @ ..] => ([*a, *b, *v], body),
        _ => return Err(ReportError::Short(buf.len())),
    };
    if head[..2] != REPORT_MAGIC {
        return Err(ReportError::Magic(u16::from_be_bytes([head[0], head[1]])));
    }
    if head[2] != REPORT_VERSION {
        return Err(ReportError::Version(head[2]));
    }
    let mut de = rmp_serde::Deserializer::new(body);
    let report =
        StateReport::deserialize(&mut de).map_err(|e| ReportError::Malformed(e.to_string()))?;
    let rest = de.get_ref().len();
    if rest != 0 {
        return Err(ReportError::Trailing(rest));
    }
    report.check()?;
    Ok(report)
}

fn check_len(what: &'static str, len: usize) -> Result<(), ReportError> {
    if len > MAX_REPORT_ITEMS {
        return Err(ReportError::TooMany {
            what,
            len,
            max: MAX_REPORT_ITEMS,
        });
    }
    Ok(())
}

fn check_str(what: &'static str, s: &str) -> Result<(), ReportError> {
    if s.len() > MAX_REPORT_STR {
        return Err(ReportError::StringTooLong {
            what,
            len: s.len(),
            max: MAX_REPORT_STR,
        });
    }
    Ok(())
}

fn check_opt(what: &'static str, s: &Option<String>) -> Result<(), ReportError> {
    s.as_deref().map_or(Ok(()), |s| check_str(what, s))
}

impl StateReport {
    /// Check the bounds [`decode_report`] enforces: list lengths and string lengths.
    pub fn check(&self) -> Result<(), ReportError> {
        check_str("node id", &self.id)?;
        check_str("role", &self.role)?;
        check_opt("server id", &self.server)?;
        check_opt("parent id", &self.parent)?;
        check_len("routes", self.routes.len())?;
        for r in &self.routes {
            check_str("server id", &r.server)?;
            check_opt("parent id", &r.parent)?;
        }
        check_len("streams", self.streams.len())?;
        for s in &self.streams {
            check_str("stream name", &s.name)?;
            check_opt("upstream id", &s.upstream)?;
            check_len("children", s.children.len())?;
            for c in &s.children {
                check_str("child id", c)?;
            }
        }
        check_len("neighbours", self.neighbours.len())?;
        for n in &self.neighbours {
            check_str("neighbour id", &n.id)?;
        }
        check_len("viewer addresses", self.viewer_addrs.len())?;
        for v in &self.viewer_addrs {
            check_str("viewer address", v)?;
        }
        Ok(())
    }

    /// Shorten every list to at most `max` entries (and [`MAX_REPORT_ITEMS`]), and drop
    /// strings longer than [`MAX_REPORT_STR`], so that the report passes
    /// [`StateReport::check`]; a sender halves `max` until [`encode_report`] fits.
    pub fn trim(&mut self, max: usize) {
        let max = max.min(MAX_REPORT_ITEMS);
        let fits = |s: &String| s.len() <= MAX_REPORT_STR;
        let fits_opt = |s: &mut Option<String>| {
            if s.as_ref().is_some_and(|s| !fits(s)) {
                *s = None;
            }
        };
        if !fits(&self.id) {
            self.id.truncate(
                (0..=MAX_REPORT_STR)
                    .rev()
                    .find(|&i| self.id.is_char_boundary(i))
                    .unwrap_or(0),
            );
        }
        if !fits(&self.role) {
            self.role.clear();
        }
        fits_opt(&mut self.server);
        fits_opt(&mut self.parent);
        self.routes.retain(|r| fits(&r.server));
        self.routes.truncate(max);
        for r in &mut self.routes {
            fits_opt(&mut r.parent);
        }
        self.streams.retain(|s| fits(&s.name));
        self.streams.truncate(max);
        for s in &mut self.streams {
            fits_opt(&mut s.upstream);
            s.children.retain(fits);
            s.children.truncate(max);
        }
        self.neighbours.retain(|n| fits(&n.id));
        self.neighbours.truncate(max);
        self.viewer_addrs.retain(fits);
        self.viewer_addrs.truncate(max);
    }

    /// Encode, trimming the lists (halving their bound each time) until the datagram
    /// fits [`MAX_REPORT_LEN`].
    pub fn encode_fitted(&mut self) -> Result<Vec<u8>, EncodeError> {
        let mut max = MAX_REPORT_ITEMS;
        loop {
            self.trim(max);
            match encode_report(self) {
                Err(EncodeError::TooLong { .. }) if max > 0 => max /= 2,
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> StateReport {
        StateReport {
            id: "n3".into(),
            role: "pop".into(),
            incarnation: 17,
            seq: 4,
            leaving: false,
            server: Some("s1".into()),
            parent: Some("n2".into()),
            latency_us: Some(2_500),
            hops: Some(2),
            routes: vec![RouteReport {
                server: "s1".into(),
                parent: Some("n2".into()),
                latency_us: Some(2_500),
                hops: Some(2),
            }],
            streams: vec![StreamReport {
                name: "news".into(),
                upstream: Some("n2".into()),
                children: vec!["n4".into()],
                viewers: 2,
            }],
            neighbours: vec![NeighbourReport {
                id: "n2".into(),
                alive: true,
                rtt_us: Some(400),
            }],
            viewers: 2,
            viewer_addrs: vec!["127.0.0.1:5000".into(), "127.0.0.1:5002".into()],
        }
    }

    #[test]
    fn test_round_trip() {
        let r = sample();
        let b = encode_report(&r).expect("encodes");
        assert_eq!(&b[..3], b"OR\x01");
        assert_eq!(decode_report(&b).expect("decodes"), r);
    }

    #[test]
    fn test_refusals_name_the_problem() {
        assert_eq!(decode_report(b"OR"), Err(ReportError::Short(2)));
        assert!(matches!(
            decode_report(b"OT\x01\x90"),
            Err(ReportError::Magic(0x4f54))
        ));
        assert_eq!(decode_report(b"OR\x09\x90"), Err(ReportError::Version(9)));
        assert!(matches!(
            decode_report(b"OR\x01\xff\xff"),
            Err(ReportError::Malformed(_))
        ));
        let mut b = encode_report(&sample()).expect("encodes");
        b.push(0);
        assert_eq!(decode_report(&b), Err(ReportError::Trailing(1)));
        let big = vec![b'O'; MAX_REPORT_LEN + 1];
        assert!(matches!(
            decode_report(&big),
            Err(ReportError::TooLong { .. })
        ));
        // A control datagram is not a report.
        let ctrl = crate::encode(&crate::Message::ListStreams).expect("encodes");
        assert!(matches!(decode_report(&ctrl), Err(ReportError::Magic(_))));
    }

    #[test]
    fn test_bounds_are_checked_after_decoding() {
        let mut r = sample();
        r.neighbours = vec![NeighbourReport::default(); MAX_REPORT_ITEMS + 1];
        // Encoding does not check bounds (only size): a hostile sender could skip `trim`.
        let b = encode_report(&r).expect("encodes");
        assert_eq!(
            decode_report(&b),
            Err(ReportError::TooMany {
                what: "neighbours",
                len: MAX_REPORT_ITEMS + 1,
                max: MAX_REPORT_ITEMS
            })
        );
        let mut r = sample();
        r.streams[0].name = "x".repeat(MAX_REPORT_STR + 1);
        let b = encode_report(&r).expect("encodes");
        assert!(matches!(
            decode_report(&b),
            Err(ReportError::StringTooLong {
                what: "stream name",
                ..
            })
        ));
    }

    #[test]
    fn test_encode_fitted_trims_until_it_fits() {
        let mut r = sample();
        r.streams = (0..400)
            .map(|i| StreamReport {
                name: format!("stream-{i:04}-{}", "y".repeat(60)),
                upstream: Some("n2".into()),
                children: (0..40).map(|c| format!("child-{c}")).collect(),
                viewers: 1,
            })
            .collect();
        let b = r.encode_fitted().expect("fits after trimming");
        assert!(b.len() <= MAX_REPORT_LEN);
        let back = decode_report(&b).expect("decodes");
        assert!(!back.streams.is_empty() && back.streams.len() < 400);
        assert_eq!(back, r);
    }

    proptest! {
        #[test]
        fn prop_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_report(&b);
            let mut with_magic = b"OR\x01".to_vec();
            with_magic.extend_from_slice(&b);
            let _ = decode_report(&with_magic);
        }

        #[test]
        fn prop_truncation_is_an_error(cut in 1usize..64) {
            let b = encode_report(&sample()).expect("encodes");
            let keep = b.len().saturating_sub(cut);
            prop_assert!(decode_report(&b[..keep]).is_err());
        }
    }
}
