//! The server's media thread: plays every clip at its own pace (MJPEG at its frame
//! rate, MPEG-TS at its PCR), forwards live inputs as their frames arrive, and sends
//! each frame's datagrams to the stream's current children.
//!
//! Clips play live: a stream advances whether or not anyone watches, so a viewer who
//! joins sees the current frame, as with a broadcast.
//!
//! The per-stream logic is the data-plane core's ([`ott_datapath::DataPath`], as in the
//! relay's forwarder): each stream's state is pinned, so its start cache holds the latest
//! decodable start even while nobody watches and the first viewer starts without waiting
//! for a keyframe; the core keeps the retransmission buffer and answers NACKs only from
//! current children, within their byte budgets.
//!
//! With the overlay key ([`crate::keying`]) the server tags every datagram it makes;
//! children that are overlay members get it tagged, viewers (if any) without the tag,
//! and NACKs from members must be sealed.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{select, Receiver, Sender};
use ott_datapath::{DataPath, DataPathCounters as CoreCounters, Payload};
use ott_media::{Clip, ClipSource, Packetizer, TimedFrame};
use ott_proto::{MediaKind, Message, NackRange};

use crate::batch;
use crate::counters::{add, Counters};
use crate::datacmd::{DataCmd, DataSnapshot, StreamTraffic};
use crate::dataplane::{self, ForwarderConfig};
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
                        }
                    }
                    Input::Live { name, kind } => {
                        let id = ott_proto::stream_id_for(&name);
                        Feed {
                            id,
                            name,
                            playing: None,
                            packetizer: packetizer(id, kind),
                        }
                    }
                })
                .collect();
            let config = dataplane::core_config(ForwarderConfig {
                nack: false,
                ..ForwarderConfig::default()
            });
            let mut out = Out {
                core: DataPath::new(config, keying.key().cloned()),
                published: CoreCounters::default(),
                sock,
                keying,
                counters,
            };
            for f in &feeds {
                if !out.core.pin_stream(f.id) {
                    tracing::warn!(stream = %f.name, "stream cap reached: stream not served");
                }
            }
            source_loop(&mut feeds, live, &nacks, &mut out, &cmds);
        })
}

/// A packetizer for a stream, with random first sequence and frame numbers: another
/// server's copy of the same stream lives in another number space, so receivers tell
/// the two apart (see `dedup::StreamDedup`).
fn packetizer(id: u32, kind: MediaKind) -> Packetizer {
    let r = splitmix64(crate::node_runtime::incarnation() ^ u64::from(id));
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

/// The data-plane core of the server and what it sends with.
struct Out {
    core: DataPath,
    /// The core's counters already added to `counters`.
    published: CoreCounters,
    sock: UdpSocket,
    keying: Keying,
    counters: Arc<Counters>,
}

impl Out {
    /// Send what the core queued; `Payload::Input` tokens index `inputs`.
    fn flush(&mut self, inputs: &[Bytes]) {
        let plan: Vec<_> = std::iter::from_fn(|| self.core.poll_transmit()).collect();
        let items: Vec<(&[u8], SocketAddr)> = plan
            .iter()
            .filter_map(|t| match &t.payload {
                Payload::Input { token, len } => inputs
                    .get(*token)
                    .and_then(|d| d.get(..*len))
                    .map(|d| (d, t.to)),
                Payload::Bytes(b) => Some((b.as_ref(), t.to)),
                // The server has no upstream: it never NACKs.
                Payload::Nack { .. } => None,
            })
            .collect();
        let out = batch::send_batch(&self.sock, &items);
        add(&self.counters.packets_out, out.sent as u64);
        add(&self.counters.bytes_out, out.bytes as u64);
        if out.failed > 0 {
            tracing::debug!(failed = out.failed, "media sends failed");
            add(&self.counters.send_errors, out.failed as u64);
        }
        dataplane::publish(&self.counters, &mut self.published, self.core.counters());
    }
}

fn source_loop(
    feeds: &mut [Feed],
    mut live: Receiver<LiveFrame>,
    nacks: &Receiver<Nack>,
    out: &mut Out,
    cmds: &Receiver<DataCmd>,
) {
    loop {
        let due = feeds
            .iter()
            .filter_map(Feed::due)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        select! {
            recv(cmds) -> cmd => match cmd {
                Ok(DataCmd::Route {
                    stream, children, sessions, ..
                }) => {
                    if let Some(f) = feeds.iter().find(|f| f.id == stream) {
                        tracing::info!(stream = %f.name, children = children.len(), "stream route changed");
                        let children = dataplane::children_of(&out.keying, &children, &sessions);
                        out.core.set_route(Instant::now(), stream, children);
                        out.flush(&[]);
                    }
                }
                Ok(DataCmd::Snapshot(reply)) => {
                    let snap: DataSnapshot = out
                        .core
                        .streams()
                        .map(|(id, s)| (id, StreamTraffic::from(s)))
                        .collect();
                    let _ = reply.send(snap);
                }
                Ok(DataCmd::Stop) | Err(_) => return,
            },
            recv(nacks) -> nack => {
                if let Ok(nack) = nack {
                    out.core.handle_nack(Instant::now(), nack.from, nack.stream, &nack.ranges);
                    out.flush(&[]);
                }
            },
            recv(live) -> frame => {
                let Ok(frame) = frame else {
                    // Every live reader ended (or there is none); clips go on.
                    live = crossbeam_channel::never();
                    continue;
                };
                if let Some(f) = feeds.iter_mut().find(|f| f.id == frame.stream) {
                    send_frame(f, out, &frame.data, frame.timestamp_90k, frame.flags);
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
                        tracing::warn!(stream = %f.name, lag_ms = lag.as_millis() as u64, "the clip fell behind its schedule (an overloaded machine?): its schedule restarts, viewers are that much further behind live");
                        p.start += lag;
                    }
                    let frame = std::mem::replace(&mut p.next, p.source.next_timed());
                    send_frame(f, out, &frame.data, frame.timestamp_90k, frame.flags);
                }
            },
        }
    }
}

/// Packetize a frame, tag its datagrams (with the overlay key) and hand them to the core,
/// which keeps them (retransmission, start cache) and queues them to the children.
fn send_frame(f: &mut Feed, out: &mut Out, data: &[u8], timestamp_90k: u32, flags: u8) {
    let datagrams = match f.packetizer.packetize(data, timestamp_90k, flags) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(stream = %f.name, error = %e, "frame cannot be sent");
            add(&out.counters.dropped, 1);
            return;
        }
    };
    // With the overlay key, the tag goes on once, here; relays forward it unchanged.
    let datagrams: Vec<Bytes> = match out.keying.key() {
        Some(k) => datagrams
            .into_iter()
            .map(|d| {
                let mut v = d.to_vec();
                k.seal_media(&mut v);
                Bytes::from(v)
            })
            .collect(),
        None => datagrams,
    };
    let now = Instant::now();
    for (i, d) in datagrams.iter().enumerate() {
        if let Err(why) = out.core.handle_local(now, d, i) {
            tracing::debug!(stream = %f.name, ?why, "own datagram not sent");
        }
    }
    out.flush(&datagrams);
}
