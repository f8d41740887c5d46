//! The data-plane core (`ott_datapath::DataPath`) under random operation sequences.
//!
//! The fuzzer's bytes choose a mode (relay without a key, relay with the overlay key,
//! viewer with session keys) and a list of operations on a fake clock: set or remove a
//! route (children drawn from a small address pool, each a member, a viewer without a
//! session or a viewer with one), pin or remove a stream, feed media (valid headers near
//! the current sequence numbers or far from them, keyframes, retransmitted and cached
//! flags, tagged with the right key or a wrong one) or raw bytes, feed a server's own
//! datagram, NACKs from children or strangers, and advance the clock (due NACKs fire).
//!
//! Checked after every operation:
//! - no panic or overflow;
//! - bounded state: at most `max_streams` streams, `max_children` children each;
//! - every queued transmit names the datagram just fed and no more of its bytes;
//! - a NACK is answered with at most `max_resend_per_nack` datagrams, only to its sender,
//!   and only when the sender is a child of the stream;
//! - timers make progress: after `handle_timeout(now)`, `poll_timeout()` is later.
#![deny(unsafe_code)]
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ott_datapath::{Child, ChildKind, Config, DataPath, Payload};
use ott_proto::auth::{OverlayKey, SessionKey};
use ott_proto::{MediaHeader, NackRange, HEADER_LEN};

#[derive(Debug, Arbitrary)]
enum Mode {
    Plain,
    Keyed,
    Viewer,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Route {
        stream: u8,
        children: Vec<(u8, u8)>,
    },
    Pin {
        stream: u8,
    },
    Remove {
        stream: u8,
    },
    Media {
        stream: u8,
        seq: u32,
        near: bool,
        frame: u16,
        flags: u8,
        frag: (u8, u8),
        len: u8,
        from: u8,
        tag: u8,
    },
    Local {
        stream: u8,
        seq: u16,
        key: bool,
        len: u8,
    },
    Raw {
        bytes: Vec<u8>,
        from: u8,
    },
    Nack {
        stream: u8,
        from: u8,
        ranges: Vec<(u16, u16)>,
    },
    Advance {
        ms: u16,
    },
    Session {
        which: u8,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    mode: Mode,
    ops: Vec<Op>,
}

const STREAMS: u32 = 6;

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(127, 0, 0, 1), 4000 + u16::from(n % 8)))
}

fn session(n: u8) -> SessionKey {
    SessionKey::from_bytes([n % 3; 32])
}

fuzz_target!(|input: Input| {
    let config = Config {
        max_streams: 4,
        max_children: 3,
        retransmit_depth: 32,
        max_resend_per_nack: 16,
        ..Config::default()
    };
    let key = OverlayKey::from_bytes(&[7; 32]).expect("a valid key");
    let wrong = OverlayKey::from_bytes(&[8; 32]).expect("a valid key");
    let mut dp = match input.mode {
        Mode::Plain => DataPath::new(config, None),
        Mode::Keyed => DataPath::new(config, Some(key.clone())),
        Mode::Viewer => DataPath::for_viewer(config),
    };
    let keyed = matches!(input.mode, Mode::Keyed);
    let mut now = Instant::now();
    let mut newest = 0u32;
    for op in input.ops.into_iter().take(512) {
        let mut fed_len = 0usize;
        let mut nack: Option<(SocketAddr, bool)> = None;
        match op {
            Op::Route { stream, children } => {
                let children = children
                    .into_iter()
                    .take(6)
                    .map(|(a, k)| Child {
                        addr: addr(a),
                        kind: match k % 3 {
                            0 => ChildKind::Member,
                            1 => ChildKind::Strip,
                            _ => ChildKind::Session(session(k)),
                        },
                    })
                    .collect();
                dp.set_route(now, u32::from(stream) % STREAMS, children);
            }
            Op::Pin { stream } => {
                dp.pin_stream(u32::from(stream) % STREAMS);
            }
            Op::Remove { stream } => dp.remove_stream(u32::from(stream) % STREAMS),
            Op::Media {
                stream,
                seq,
                near,
                frame,
                flags,
                frag,
                len,
                from,
                tag,
            } => {
                let seq = if near {
                    newest.wrapping_add(seq % 64).wrapping_sub(16)
                } else {
                    seq
                };
                newest = newest.max(seq);
                let h = MediaHeader {
                    flags,
                    stream: u32::from(stream) % STREAMS,
                    seq,
                    frame: u32::from(frame),
                    frag_index: u16::from(frag.0 % frag.1.max(1)),
                    frag_count: u16::from(frag.1.max(1)),
                    timestamp: 0,
                };
                let mut d = h.to_bytes().to_vec();
                d.resize(HEADER_LEN + usize::from(len), 0x5a);
                let d = match tag % 4 {
                    0 => {
                        key.seal_media(&mut d);
                        d
                    }
                    1 => {
                        wrong.seal_media(&mut d);
                        d
                    }
                    2 => session(tag / 4).seal(&d),
                    _ => d,
                };
                fed_len = d.len();
                let _ = dp.handle_media(now, Some(addr(from)), &d, 7);
            }
            Op::Local {
                stream,
                seq,
                key: kf,
                len,
            } => {
                let h = MediaHeader {
                    flags: if kf { ott_proto::flags::KEYFRAME } else { 0 },
                    stream: u32::from(stream) % STREAMS,
                    seq: u32::from(seq),
                    frame: u32::from(seq),
                    frag_index: 0,
                    frag_count: 1,
                    timestamp: 0,
                };
                let mut d = h.to_bytes().to_vec();
                d.resize(HEADER_LEN + usize::from(len), 0x33);
                if keyed {
                    key.seal_media(&mut d);
                }
                fed_len = d.len();
                let _ = dp.handle_local(now, &bytes::Bytes::from(d), 7);
            }
            Op::Raw { bytes, from } => {
                fed_len = bytes.len();
                let _ = dp.handle_media(now, Some(addr(from)), &bytes, 7);
            }
            Op::Nack {
                stream,
                from,
                ranges,
            } => {
                let ranges: Vec<NackRange> = ranges
                    .into_iter()
                    .take(8)
                    .map(|(f, c)| NackRange {
                        first: u32::from(f),
                        count: c,
                    })
                    .collect();
                let refused = dp.counters().nacks_refused;
                dp.handle_nack(now, addr(from), u32::from(stream) % STREAMS, &ranges);
                nack = Some((addr(from), dp.counters().nacks_refused > refused));
            }
            Op::Advance { ms } => {
                now += Duration::from_millis(u64::from(ms));
                if let Some(due) = dp.poll_timeout() {
                    let at = due.max(now);
                    dp.handle_timeout(at);
                    assert!(
                        dp.poll_timeout().is_none_or(|t| t > at),
                        "timer does not progress"
                    );
                }
            }
            Op::Session { which } => dp.add_session(session(which)),
        }
        assert!(dp.streams().count() <= 4);
        assert!(dp.streams().all(|(_, s)| s.children <= 3));
        let mut resent = 0usize;
        while let Some(t) = dp.poll_transmit() {
            match t.payload {
                Payload::Input { token, len } => {
                    assert_eq!(token, 7);
                    assert!(len <= fed_len);
                }
                Payload::Bytes(_) => {
                    if let Some((from, _)) = nack {
                        assert_eq!(t.to, from, "a resend to someone who did not ask");
                        resent += 1;
                    }
                }
                Payload::Nack { ranges, .. } => assert!(!ranges.is_empty()),
            }
        }
        if let Some((_, refused)) = nack {
            assert!(resent <= 16);
            assert!(!refused || resent == 0, "a refused NACK was answered");
        }
        while dp.poll_event().is_some() {}
    }
});
