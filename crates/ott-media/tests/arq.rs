//! Loss recovery over a simulated chain of lossy hops, on a virtual clock.
//!
//! A source sends frames through `hops` relays to a client. Every hop loses datagrams at
//! random, delays them with jitter (so they reorder), and every node keeps a
//! retransmission buffer for its child and NACKs its parent for gaps. The client plays
//! out through a [`PlayoutBuffer`]. Checked: every frame played is byte-identical to the
//! frame sent, in order, never twice; the share of frames played; bounded NACK traffic.
// Tests may read the clock (an origin for fake time) and files (samples).
#![allow(clippy::disallowed_methods)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ott_media::arq::{nacked_seqs, GapTracker, NackConfig, RetransmitBuffer};
use ott_media::{Packetizer, PlayoutBuffer, PlayoutConfig};
use ott_proto::{flags, MediaHeader, NackRange, HEADER_LEN};

#[derive(Debug)]
enum What {
    /// A media datagram arriving at node `to`.
    Media { to: usize, datagram: Bytes },
    /// A NACK arriving at node `to` (from its child).
    Nack { to: usize, ranges: Vec<NackRange> },
    /// The source emits its next frame.
    Emit,
    /// Wake every node to run its timers.
    Tick,
}

struct Ev {
    at: Instant,
    seq: u64,
    what: What,
}
impl PartialEq for Ev {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct Node {
    buffer: RetransmitBuffer,
    gaps: GapTracker,
    seen: HashSet<u32>,
}

struct Outcome {
    sent_frames: usize,
    played: usize,
    nack_messages: u64,
    datagrams_sent: u64,
    retransmissions: u64,
    max_missing: usize,
}

struct Net {
    rng: fastrand::Rng,
    loss: f64,
    delay: Duration,
    jitter: Duration,
    queue: BinaryHeap<Reverse<Ev>>,
    seq: u64,
}

impl Net {
    fn send(&mut self, now: Instant, what: What) {
        if self.rng.f64() < self.loss {
            return;
        }
        let jitter = self.jitter.mul_f64(self.rng.f64());
        self.schedule(now + self.delay + jitter, what);
    }
    fn schedule(&mut self, at: Instant, what: What) {
        self.seq += 1;
        self.queue.push(Reverse(Ev {
            at,
            seq: self.seq,
            what,
        }));
    }
}

/// Frames of varied sizes: 1 to 12 datagrams.
fn frame(n: usize, rng: &mut fastrand::Rng) -> Vec<u8> {
    let len = 200 + rng.usize(..16_000);
    (0..len).map(|i| (i * 31 + n * 7) as u8).collect()
}

fn run(
    seed: u64,
    hops: usize,
    loss: f64,
    frames: usize,
    budget: Duration,
    recover: bool,
) -> Outcome {
    run_with(
        seed,
        hops,
        loss,
        Duration::from_millis(3),
        frames,
        budget,
        recover,
    )
}

fn run_with(
    seed: u64,
    hops: usize,
    loss: f64,
    jitter: Duration,
    frames: usize,
    budget: Duration,
    recover: bool,
) -> Outcome {
    let t0 = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut net = Net {
        rng: fastrand::Rng::with_seed(seed ^ 0x5eed),
        loss,
        delay: Duration::from_millis(5),
        jitter,
        queue: BinaryHeap::new(),
        seq: 0,
    };
    let nack = NackConfig {
        give_up_after: budget,
        ..NackConfig::default()
    };
    // Node 0 is the source; nodes 1..=hops receive; the last one is the client.
    let mut nodes: Vec<Node> = (0..=hops)
        .map(|_| Node {
            buffer: RetransmitBuffer::new(2048),
            gaps: GapTracker::new(nack),
            seen: HashSet::new(),
        })
        .collect();
    let mut playout = PlayoutBuffer::new(PlayoutConfig {
        budget,
        ..PlayoutConfig::default()
    });
    let mut packetizer = Packetizer::new(7);
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut played: Vec<u32> = Vec::new();
    let (mut datagrams_sent, mut retransmissions, mut max_missing) = (0u64, 0u64, 0usize);
    let client = hops;
    net.schedule(t0, What::Emit);
    net.schedule(t0, What::Tick);
    let end = t0 + Duration::from_millis(40) * frames as u32 + Duration::from_secs(2);
    while let Some(Reverse(ev)) = net.queue.pop() {
        let now = ev.at;
        if now > end {
            break;
        }
        match ev.what {
            What::Emit => {
                let data = frame(sent.len(), &mut rng);
                let ds = packetizer
                    .packetize(&data, sent.len() as u32 * 3600, flags::KEYFRAME)
                    .expect("frame fits");
                sent.push(data);
                for d in ds {
                    let h = MediaHeader::parse(&d).expect("valid");
                    nodes[0].buffer.insert(h.seq, now, d.clone());
                    datagrams_sent += 1;
                    net.send(now, What::Media { to: 1, datagram: d });
                }
                // The stream goes on after the frames counted, as a live stream does, so
                // that a loss in the last counted frame is noticed too.
                if sent.len() < frames + 5 {
                    net.schedule(now + Duration::from_millis(40), What::Emit);
                }
            }
            What::Media { to, datagram } => {
                let h = MediaHeader::parse(&datagram).expect("valid");
                let node = &mut nodes[to];
                node.gaps
                    .on_fragment(now, h.seq, h.frag_index, h.frag_count);
                max_missing = max_missing.max(node.gaps.missing());
                if !node.seen.insert(h.seq) {
                    continue; // duplicate
                }
                if to == client {
                    playout.push(now, &h, &datagram[HEADER_LEN..]);
                } else {
                    node.buffer.insert(h.seq, now, datagram.clone());
                    datagrams_sent += 1;
                    net.send(
                        now,
                        What::Media {
                            to: to + 1,
                            datagram,
                        },
                    );
                }
            }
            What::Nack { to, ranges } => {
                for s in nacked_seqs(&ranges, 256) {
                    if let Some(d) = nodes[to].buffer.get(s).cloned() {
                        let mut d = d.to_vec();
                        MediaHeader::mark_retransmit(&mut d);
                        retransmissions += 1;
                        net.send(
                            now,
                            What::Media {
                                to: to + 1,
                                datagram: Bytes::from(d),
                            },
                        );
                    }
                }
            }
            What::Tick => {
                for i in (1..=hops).filter(|_| recover) {
                    while let Some(ranges) = nodes[i].gaps.poll_nack(now) {
                        net.send(now, What::Nack { to: i - 1, ranges });
                    }
                }
                net.schedule(now + Duration::from_millis(1), What::Tick);
            }
        }
        while let Some(f) = playout.poll_frame(now) {
            let n = f.number as usize;
            assert_eq!(&f.data[..], &sent[n][..], "frame {n} is intact");
            if let Some(&last) = played.last() {
                assert!(f.number > last, "frame {n} played in order, once");
            }
            played.push(f.number);
        }
    }
    if std::env::var("ARQ_DEBUG").is_ok() {
        let set: HashSet<u32> = played.iter().copied().collect();
        let missing: Vec<usize> = (0..sent.len())
            .filter(|i| !set.contains(&(*i as u32)))
            .collect();
        eprintln!(
            "seed {seed}: missing frames {missing:?}; per node {:?}",
            nodes.iter().map(|n| n.gaps.stats()).collect::<Vec<_>>()
        );
    }
    let nack_messages = nodes.iter().map(|n| n.gaps.stats().nacks).sum();
    Outcome {
        sent_frames: frames,
        played: played.iter().filter(|n| (**n as usize) < frames).count(),
        nack_messages,
        datagrams_sent,
        retransmissions,
        max_missing,
    }
}

#[test]
fn no_loss_plays_every_frame_without_nacks() {
    let o = run_with(
        1,
        4,
        0.0,
        Duration::ZERO,
        200,
        Duration::from_millis(300),
        true,
    );
    assert_eq!(o.played, o.sent_frames);
    assert_eq!(o.nack_messages, 0);
    assert_eq!(o.retransmissions, 0);
}

#[test]
fn five_percent_loss_per_hop_over_four_hops_plays_nearly_every_frame() {
    let mut played = 0;
    let mut sent = 0;
    for seed in 1..=5 {
        let o = run(seed, 4, 0.05, 500, Duration::from_millis(300), true);
        played += o.played;
        sent += o.sent_frames;
    }
    let share = played as f64 / sent as f64;
    eprintln!("{played} of {sent} frames played ({share:.5})");
    assert!(
        share >= 0.999,
        "{played} of {sent} frames played ({share:.4})"
    );
}

#[test]
fn without_recovery_the_same_loss_loses_many_frames() {
    let o = run(1, 4, 0.05, 500, Duration::from_millis(300), false);
    let share = o.played as f64 / o.sent_frames as f64;
    assert!(share < 0.8, "without NACKs {share:.3} of frames play");
    assert_eq!(o.retransmissions, 0);
}

#[test]
fn fifty_percent_loss_keeps_nack_traffic_and_state_bounded() {
    let nack = NackConfig::default();
    let o = run(9, 4, 0.5, 300, Duration::from_millis(300), true);
    // Each missing datagram is asked for at most max_retries times per hop, and a NACK
    // message carries at least one; so NACK messages never exceed retries × datagrams.
    assert!(
        o.nack_messages <= u64::from(nack.max_retries) * o.datagrams_sent,
        "nacks {} for {} datagrams",
        o.nack_messages,
        o.datagrams_sent
    );
    assert!(o.max_missing <= nack.max_missing);
    // Frames still played are intact and in order (checked inside run).
    assert!(o.played <= o.sent_frames);
}

#[test]
fn reordering_alone_causes_no_loss() {
    let o = run(3, 2, 0.0, 300, Duration::from_millis(300), true);
    assert_eq!(o.played, o.sent_frames);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
    /// Whatever the loss, reordering and number of hops: every frame played is intact,
    /// in order and played once (checked inside `run`), and never more are played than sent.
    #[test]
    fn prop_frames_are_intact_ordered_and_unique(
        seed in 0u64..10_000,
        hops in 1usize..5,
        loss in 0.0f64..0.5,
        jitter_ms in 0u64..10,
        recover in proptest::bool::ANY,
    ) {
        let o = run_with(seed, hops, loss, Duration::from_millis(jitter_ms), 60, Duration::from_millis(200), recover);
        proptest::prop_assert!(o.played <= o.sent_frames);
        if !recover {
            proptest::prop_assert_eq!(o.retransmissions, 0);
        }
    }
}

#[test]
fn a_run_of_missing_datagrams_is_one_entry_split_when_one_arrives() {
    let t0 = Instant::now();
    let config = NackConfig::default();
    let mut g = GapTracker::new(config);
    g.on_datagram(t0, 10);
    g.on_datagram(t0, 20); // 11..=19 missing
    assert_eq!(g.missing(), 9);
    assert!(g.on_datagram(t0, 15), "15 fills the run");
    assert_eq!(g.missing(), 8);
    let due = t0 + config.reorder_delay;
    assert_eq!(g.poll_timeout(), Some(due));
    assert_eq!(g.poll_nack(t0), None, "nothing before the reorder delay");
    let ranges = g.poll_nack(due).expect("a NACK is due");
    assert_eq!(
        ranges,
        vec![
            NackRange {
                first: 11,
                count: 4
            },
            NackRange {
                first: 16,
                count: 4
            }
        ]
    );
    assert_eq!(
        g.poll_nack(due),
        None,
        "not again before the retry interval"
    );
}

/// A node that took the stream late is asked for numbers from before its first: they
/// become missing (NACKed upstream at once), are filled when they come, and numbers it
/// received, or too far back, are not asked for.
#[test]
fn numbers_older_than_the_first_seen_are_asked_upstream_for_a_child() {
    let t0 = Instant::now();
    let config = NackConfig::default();
    let mut g = GapTracker::new(config);
    assert!(!g.want_older(t0, 5), "nothing seen yet: nothing to extend");
    for s in 100..110u32 {
        g.on_datagram(t0, s);
    }
    assert!(!g.want_older(t0, 100), "received");
    assert!(!g.want_older(t0, 105), "received");
    let far = 100u32.wrapping_sub(config.max_missing as u32 + 1);
    assert!(!g.want_older(t0, far), "too far back");
    assert!(g.want_older(t0, 90));
    assert_eq!(g.missing(), 10);
    let due = t0 + config.reorder_delay;
    let ranges = g.poll_nack(due).expect("a NACK for 90..100");
    let asked: Vec<u32> = nacked_seqs(&ranges, 1000).collect();
    assert_eq!(asked, (90..100).collect::<Vec<_>>());
    // Asked again for part of it: already missing, nothing new.
    assert!(!g.want_older(due, 95));
    for s in 90..100u32 {
        assert!(g.on_datagram(due, s), "{s} fills the run");
    }
    assert_eq!(g.missing(), 0);
    // Older still, across the wrap of u32 sequence numbers.
    let mut w = GapTracker::new(config);
    w.on_datagram(t0, 3);
    assert!(w.want_older(t0, u32::MAX - 1));
    assert_eq!(w.missing(), 5);
}

/// A frame whose last fragments are lost is NACKed a reorder delay after its newest
/// fragment, not when the next frame comes; fragments that keep coming put it off, a
/// complete frame or a newer datagram cancels it, and absurd fragment counts are not
/// waited for.
#[test]
fn a_lost_tail_of_a_frame_is_nacked_without_waiting_for_the_next_frame() {
    let t0 = Instant::now();
    let config = NackConfig::default();
    let ms = Duration::from_millis;
    let mut g = GapTracker::new(config);
    // Frame of 5 fragments, seqs 10..15: 10, 11, 12 come 1 ms apart, 13 and 14 never.
    for i in 0..3u16 {
        g.on_fragment(t0 + ms(u64::from(i)), 10 + u32::from(i), i, 5);
    }
    assert_eq!(g.missing(), 0, "nothing is missing yet");
    let due = t0 + ms(2) + config.reorder_delay;
    // (An earlier wake-up is allowed: it finds nothing due.)
    assert!(g.poll_timeout().is_some_and(|w| w <= due));
    assert!(
        g.poll_nack(due - ms(1)).is_none(),
        "not before the reorder delay"
    );
    assert_eq!(g.poll_timeout(), Some(due));
    let ranges = g.poll_nack(due).expect("the tail is asked for");
    assert_eq!(nacked_seqs(&ranges, 100).collect::<Vec<_>>(), [13, 14]);
    assert_eq!(g.missing(), 2);
    // The retransmissions fill it; the next frame reveals no gap again.
    assert!(g.on_fragment(due + ms(5), 13, 3, 5));
    assert!(g.on_fragment(due + ms(5), 14, 4, 5));
    g.on_fragment(t0 + ms(40), 15, 0, 1);
    assert_eq!(g.missing(), 0);
    assert!(g.poll_nack(t0 + ms(100)).is_none());

    // A complete frame leaves nothing to wait for; a newer frame replaces the wait.
    let mut h = GapTracker::new(config);
    h.on_fragment(t0, 100, 0, 2);
    h.on_fragment(t0, 101, 1, 2);
    assert!(h.poll_nack(t0 + ms(20)).is_none());
    assert_eq!(h.missing(), 0);
    h.on_fragment(t0 + ms(40), 102, 0, 3);
    h.on_fragment(t0 + ms(40), 104, 2, 3); // 103 lost inside the frame
    assert!(h.poll_nack(t0 + ms(100)).is_some());
    assert_eq!(h.missing(), 1, "only 103: the frame's last came");

    // A fragment count past MAX_TAIL is not waited for.
    let mut f = GapTracker::new(config);
    f.on_fragment(t0, 7, 0, u16::MAX);
    assert!(f.poll_nack(t0 + ms(100)).is_none());
    assert_eq!(f.missing(), 0);
    assert_eq!(ott_media::arq::MAX_TAIL, 256);
}
