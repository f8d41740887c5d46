//! The server's media thread: paces every clip at its own rate and sends each frame's
//! datagrams to the stream's current children.
//!
//! Clips play live: a stream advances whether or not anyone watches, so a viewer who
//! joins sees the current frame, as with a broadcast.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use ott_media::{Clip, ClipSource, Pacer, Packetizer};

use crate::counters::{add, Counters};
use crate::dataplane::{DataCmd, DataSnapshot, StreamTraffic};

struct Feed {
    id: u32,
    name: String,
    source: ClipSource,
    pacer: Pacer,
    packetizer: Packetizer,
    children: Vec<SocketAddr>,
    traffic: StreamTraffic,
}

/// Start the media thread for `clips`, sending from `sock`.
pub fn spawn_source(
    clips: Vec<Clip>,
    sock: UdpSocket,
    counters: Arc<Counters>,
    cmds: Receiver<DataCmd>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("media-src".into())
        .spawn(move || {
            let start = Instant::now();
            let mut feeds: Vec<Feed> = clips
                .into_iter()
                .map(|clip| {
                    let info = clip.info();
                    Feed {
                        id: info.id,
                        name: info.name,
                        pacer: Pacer::new(clip.fps, start),
                        source: ClipSource::new(clip),
                        packetizer: {
                            // Random first sequence and frame numbers: another server's
                            // copy of the same stream lives in another number space, so
                            // receivers tell the two apart (see `dedup::StreamDedup`).
                            let r = splitmix64(crate::overlay::incarnation() ^ u64::from(info.id));
                            Packetizer::starting_at(info.id, r as u32, (r >> 32) as u32)
                        },
                        children: Vec::new(),
                        traffic: StreamTraffic::default(),
                    }
                })
                .collect();
            source_loop(&mut feeds, &sock, &counters, &cmds);
        })
}

/// SplitMix64: a well-mixed 64-bit value from a seed.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn source_loop(
    feeds: &mut [Feed],
    sock: &UdpSocket,
    counters: &Counters,
    cmds: &Receiver<DataCmd>,
) {
    loop {
        let due = feeds
            .iter()
            .map(|f| f.pacer.next_due())
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        match cmds.recv_deadline(due) {
            Ok(DataCmd::Route { stream, children }) => {
                if let Some(f) = feeds.iter_mut().find(|f| f.id == stream) {
                    tracing::info!(stream = %f.name, children = children.len(), "stream route changed");
                    f.traffic.children = children.len();
                    f.children = children;
                }
                continue;
            }
            Ok(DataCmd::Snapshot(reply)) => {
                let snap: DataSnapshot = feeds.iter().map(|f| (f.id, f.traffic.clone())).collect();
                let _ = reply.send(snap);
                continue;
            }
            Ok(DataCmd::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        for f in feeds.iter_mut() {
            if f.pacer.next_due() > now {
                continue;
            }
            f.pacer.catch_up(now, Duration::from_millis(500));
            let (frame, flags) = f.source.next_frame();
            let ts = f.pacer.timestamp_90k();
            f.pacer.advance();
            if f.children.is_empty() {
                continue;
            }
            let datagrams = match f.packetizer.packetize(&frame, ts, flags) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(stream = %f.name, error = %e, "frame cannot be sent");
                    add(&counters.dropped, 1);
                    continue;
                }
            };
            for d in &datagrams {
                for child in &f.children {
                    match sock.send_to(d, child) {
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
    }
}
