//! The server's media thread: plays every clip at its own pace (MJPEG at its frame
//! rate, MPEG-TS at its PCR), forwards live inputs as their frames arrive, and sends
//! each frame's datagrams to the stream's current children.
//!
//! Clips play live: a stream advances whether or not anyone watches, so a viewer who
//! joins sees the current frame, as with a broadcast. The thread keeps the latest
//! decodable start of every stream ([`crate::gop_cache`]) and sends it first to each new
//! child, so even the first viewer of a stream starts without waiting for a keyframe.
//!
//! With the overlay key ([`crate::keying`]) the server tags every datagram it makes;
//! children that are overlay members get it tagged, viewers (if any) without the tag,
//! and NACKs from members must be sealed.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use ott_media::arq::{nacked_seqs, RetransmitBuffer};
use ott_media::{Clip, ClipSource, Packetizer, TimedFrame};
use ott_proto::{MediaHeader, MediaKind, Message, NackRange};

use crate::counters::{add, Counters};
use crate::dataplane::{DataCmd, DataSnapshot, StreamTraffic};
use crate::gop_cache::{self, StartCache};
use crate::keying::{Keying, Refused};
use crate::live::LiveFrame;

/// A stall longer than this restarts a clip's schedule instead of sending a burst.
const MAX_LAG: Duration = Duration::from_millis(500);

struct Playing {
    source: ClipSource,
    /// When the clip's time 0 is (moved forward after a stall).
    start: Instant,
    next: TimedFrame,
}

struct Feed {
    id: u32,
    name: String,
    playing: Option<Playing>,
    packetizer: Packetizer,
    children: Vec<SocketAddr>,
    traffic: StreamTraffic,
    /// The latest datagrams sent, to answer the children's NACKs.
    sent: RetransmitBuffer,
}

/// A NACK from a child: who asked, for which stream, for what.
struct Nack {
    from: SocketAddr,
    stream: u32,
    ranges: Vec<NackRange>,
}

impl Feed {
    fn due(&self) -> Option<Instant> {
        self.playing.as_ref().map(|p| p.start + p.next.due)
    }
}

/// A stream the server offers: a clip it plays, or a live input it forwards.
pub enum Input {
    /// A clip, looped and paced.
    Clip(Clip),
    /// A live input: frames arrive on the live channel with this stream's id.
    Live {
        /// Stream name.
        name: String,
        /// Payload framing.
        kind: MediaKind,
    },
}

/// Start the media thread for `inputs`, sending from `sock`. Frames of live inputs
/// arrive on `live`.
pub fn spawn_source(
    inputs: Vec<Input>,
    live: Receiver<LiveFrame>,
    sock: UdpSocket,
    counters: Arc<Counters>,
    cmds: Receiver<DataCmd>,
) -> std::io::Result<JoinHandle<()>> {
    spawn_source_keyed(inputs, live, Keying::unkeyed(), sock, counters, cmds)
}

/// [`spawn_source`] with the overlay key: datagrams are tagged, NACKs checked.
pub fn spawn_source_keyed(
    inputs: Vec<Input>,
    live: Receiver<LiveFrame>,
    keying: Keying,
    sock: UdpSocket,
    counters: Arc<Counters>,
    cmds: Receiver<DataCmd>,
) -> std::io::Result<JoinHandle<()>> {
    let (nack_tx, nacks) = crossbeam_channel::bounded(1024);
    let nack_sock = sock.try_clone()?;
    let nack_counters = counters.clone();
    let nack_keying = keying.clone();
    thread::Builder::new()
        .name("media-nack".into())
        .spawn(move || read_nacks(&nack_sock, &nack_keying, &nack_counters, &nack_tx))?;
    thread::Builder::new()
        .name("media-src".into())
        .spawn(move || {
            let start = Instant::now();
            let mut feeds: Vec<Feed> = inputs
                .into_iter()
                .map(|input| match input {
                    Input::Clip(clip) => {
                        let info = clip.info();
                        let mut source = ClipSource::new(clip);
                        let next = source.next_timed();
                        Feed {
                            id: info.id,
                            name: info.name,
                            playing: Some(Playing {
                                source,
                                start,
                                next,
                            }),
                            packetizer: packetizer(info.id, info.kind),
                            children: Vec::new(),
                            traffic: StreamTraffic::default(),
                            sent: RetransmitBuffer::new(crate::dataplane::RETRANSMIT_DEPTH),
                        }
                    }
                    Input::Live { name, kind } => {
                        let id = ott_proto::stream_id_for(&name);
                        Feed {
                            id,
                            name,
                            playing: None,
                            packetizer: packetizer(id, kind),
                            children: Vec::new(),
                            traffic: StreamTraffic::default(),
                            sent: RetransmitBuffer::new(crate::dataplane::RETRANSMIT_DEPTH),
                        }
                    }
                })
                .collect();
            source_loop(&mut feeds, live, &nacks, &sock, &keying, &counters, &cmds);
        })
}

/// A packetizer for a stream, with random first sequence and frame numbers: another
/// server's copy of the same stream lives in another number space, so receivers tell
/// the two apart (see `dedup::StreamDedup`).
fn packetizer(id: u32, kind: MediaKind) -> Packetizer {
    let r = splitmix64(crate::overlay::incarnation() ^ u64::from(id));
    Packetizer::for_kind_at(id, kind, r as u32, (r >> 32) as u32)
}

/// SplitMix64: a well-mixed 64-bit value from a seed.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Read the NACKs children send to the server's data socket.
fn read_nacks(sock: &UdpSocket, keying: &Keying, counters: &Counters, out: &Sender<Nack>) {
    let mut gate = keying.gate();
    let mut buf = vec![0u8; 65536];
    loop {
        let (len, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors of earlier sends surface here on Linux: count, go on.
                tracing::debug!(error = %e, "data socket receive error");
                add(&counters.send_errors, 1);
                thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        counters.rx(len);
        match gate.open(Some(from), &buf[..len]) {
            Ok(Message::Nack { stream, ranges, .. }) => {
                if out
                    .send(Nack {
                        from,
                        stream,
                        ranges,
                    })
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => add(&counters.dropped, 1),
            Err(Refused::Auth(why)) => {
                tracing::debug!(%from, %why, "data socket: overlay key check failed");
                add(&counters.auth_failed, 1);
            }
            Err(Refused::Malformed(_)) => add(&counters.malformed, 1),
        }
    }
}

/// Resend what a child asks for, only to a child of that stream.
fn answer_nack(
    feeds: &mut [Feed],
    nack: &Nack,
    sock: &UdpSocket,
    keying: &Keying,
    counters: &Counters,
) {
    let Some(f) = feeds.iter_mut().find(|f| f.id == nack.stream) else {
        add(&counters.dropped, 1);
        return;
    };
    if !f.children.contains(&nack.from) {
        add(&counters.dropped, 1);
        return;
    }
    for seq in nacked_seqs(&nack.ranges, crate::dataplane::MAX_RESEND_PER_NACK) {
        let Some(d) = f.sent.get(seq) else { continue };
        let d = crate::dataplane::retransmission(d);
        match sock.send_to(&d[..keying.media_len_for(nack.from, d.len())], nack.from) {
            Ok(n) => {
                counters.tx(n);
                add(&counters.retransmitted, 1);
                f.traffic.retransmitted += 1;
            }
            Err(_) => add(&counters.send_errors, 1),
        }
    }
}

fn source_loop(
    feeds: &mut [Feed],
    mut live: Receiver<LiveFrame>,
    nacks: &Receiver<Nack>,
    sock: &UdpSocket,
    keying: &Keying,
    counters: &Counters,
    cmds: &Receiver<DataCmd>,
) {
    let mut cache = StartCache::new();
    loop {
        let due = feeds
            .iter()
            .filter_map(Feed::due)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        select! {
            recv(cmds) -> cmd => match cmd {
                Ok(DataCmd::Route {
                    stream, children, ..
                }) => {
                    if let Some(f) = feeds.iter_mut().find(|f| f.id == stream) {
                        tracing::info!(stream = %f.name, children = children.len(), "stream route changed");
                        let new = gop_cache::added(&f.children, &children);
                        f.traffic.children = children.len();
                        f.children = children;
                        send_replay(sock, keying, counters, &cache.replay(Instant::now(), stream), &new);
                    }
                }
                Ok(DataCmd::Snapshot(reply)) => {
                    let snap: DataSnapshot = feeds.iter().map(|f| (f.id, f.traffic.clone())).collect();
                    let _ = reply.send(snap);
                }
                Ok(DataCmd::Stop) | Err(_) => return,
            },
            recv(nacks) -> nack => {
                if let Ok(nack) = nack {
                    answer_nack(feeds, &nack, sock, keying, counters);
                }
            },
            recv(live) -> frame => {
                let Ok(frame) = frame else {
                    // Every live reader ended (or there is none); clips go on.
                    live = crossbeam_channel::never();
                    continue;
                };
                if let Some(f) = feeds.iter_mut().find(|f| f.id == frame.stream) {
                    send_frame(f, &mut cache, sock, keying, counters, &frame.data, frame.timestamp_90k, frame.flags);
                }
            },
            recv(crossbeam_channel::at(due)) -> _ => {
                let now = Instant::now();
                for f in feeds.iter_mut() {
                    let Some(p) = f.playing.as_mut() else { continue };
                    let at = p.start + p.next.due;
                    if at > now {
                        continue;
                    }
                    let lag = now - at;
                    if lag > MAX_LAG {
                        tracing::debug!(stream = %f.name, lag_ms = lag.as_millis() as u64, "clip schedule restarts after a stall");
                        p.start += lag;
                    }
                    let frame = std::mem::replace(&mut p.next, p.source.next_timed());
                    send_frame(f, &mut cache, sock, keying, counters, &frame.data, frame.timestamp_90k, frame.flags);
                }
            },
        }
    }
}

/// Send a cache replay to new children: tagged to members, without the tag to viewers.
fn send_replay(
    sock: &UdpSocket,
    keying: &Keying,
    counters: &Counters,
    replay: &[bytes::Bytes],
    new: &[SocketAddr],
) {
    let (members, viewers): (Vec<SocketAddr>, Vec<SocketAddr>) =
        new.iter().partition(|c| keying.is_member(**c));
    gop_cache::send_replay(sock, counters, replay, &members);
    if !viewers.is_empty() {
        let plain: Vec<bytes::Bytes> = replay
            .iter()
            .map(|d| d.slice(..keying.media_len_for(viewers[0], d.len())))
            .collect();
        gop_cache::send_replay(sock, counters, &plain, &viewers);
    }
}

#[allow(clippy::too_many_arguments)]
fn send_frame(
    f: &mut Feed,
    cache: &mut StartCache,
    sock: &UdpSocket,
    keying: &Keying,
    counters: &Counters,
    data: &[u8],
    timestamp_90k: u32,
    flags: u8,
) {
    let datagrams = match f.packetizer.packetize(data, timestamp_90k, flags) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(stream = %f.name, error = %e, "frame cannot be sent");
            add(&counters.dropped, 1);
            return;
        }
    };
    let now = Instant::now();
    for d in datagrams {
        let h = MediaHeader::parse(&d);
        // With the overlay key, the tag goes on once, here; relays forward it unchanged.
        let d = match keying.key() {
            Some(k) => {
                let mut v = d.to_vec();
                k.seal_media(&mut v);
                bytes::Bytes::from(v)
            }
            None => d,
        };
        if let Ok(h) = h {
            cache.observe(now, &h, &d);
            f.sent.insert(h.seq, d.clone());
        }
        for child in &f.children {
            match sock.send_to(&d[..keying.media_len_for(*child, d.len())], child) {
                Ok(n) => {
                    counters.tx(n);
                    f.traffic.packets_out += 1;
                }
                Err(e) => {
                    tracing::debug!(%child, error = %e, "media send failed");
                    add(&counters.send_errors, 1);
                }
            }
        }
    }
}
