//! Scenario tests of the client's PoP choice, on a virtual clock with fake PoPs.
// Tests may read the clock (an origin for fake time) and files (samples).
#![allow(clippy::disallowed_methods)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ott_proto::{stream_id_for, MediaKind, Message, StreamInfo};
use ott_tree::client::{Client, ClientConfig, ClientEvent};

const DATA_PORT: u16 = 9000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 1, i], 7000))
}

fn catalogue() -> Vec<StreamInfo> {
    vec![
        StreamInfo::new("news", MediaKind::Mjpeg, 25_000),
        StreamInfo::new("sport", MediaKind::Ts, 0),
    ]
}

/// A PoP that answers probes after `rtt` (the whole round trip) and lists streams.
struct FakePop {
    id: String,
    addr: SocketAddr,
    rtt: Duration,
    path_latency_us: Option<u64>,
    alive: bool,
    /// Drop this many `ListStreams` requests before answering.
    drop_lists: u32,
    /// Every message received, with the time.
    got: Vec<(Duration, Message)>,
    /// Its tree path from the server, as its probe replies give it.
    path: Vec<String>,
    /// Answer a first `Join` with a `Cookie` and a `ViewerJoin` with `Admitted`.
    admits: bool,
    /// Each reply is delayed by `rtt` plus up to this much more or less (uniform,
    /// from a fixed-seed generator).
    jitter: Duration,
}

impl FakePop {
    fn new(i: u8, rtt_ms: u64, path_latency_us: u64) -> Self {
        Self {
            id: format!("p{i}"),
            addr: addr(i),
            rtt: ms(rtt_ms),
            path_latency_us: Some(path_latency_us),
            alive: true,
            drop_lists: 0,
            got: Vec::new(),
            path: Vec::new(),
            admits: false,
            jitter: Duration::ZERO,
        }
    }
}

/// A reply in flight towards the client: (arrival, tie-break seq, pop index, bytes).
type InFlight = Reverse<(Instant, u64, usize, Vec<u8>)>;

/// The client, its PoPs and the messages in flight, on a virtual clock.
struct World {
    epoch: Instant,
    now: Instant,
    client: Client,
    pops: Vec<FakePop>,
    /// (arrival, seq, pop index, message) towards the client.
    wire: BinaryHeap<InFlight>,
    seq: u64,
    /// Every message the client sent, in order, with its destination PoP id.
    sent: Vec<(String, Message)>,
    events: Vec<(Duration, ClientEvent)>,
    rng: fastrand::Rng,
}

impl World {
    fn new(pops: Vec<FakePop>) -> Self {
        Self::with_config(ClientConfig::default(), pops)
    }

    fn with_config(config: ClientConfig, pops: Vec<FakePop>) -> Self {
        // Only an arbitrary origin: every time below is derived from it.
        let epoch = Instant::now();
        let list = pops.iter().map(|p| (p.id.clone(), p.addr)).collect();
        let client = Client::new(config, list, DATA_PORT, epoch, epoch);
        let mut w = Self {
            epoch,
            now: epoch,
            client,
            pops,
            wire: BinaryHeap::new(),
            seq: 0,
            sent: Vec::new(),
            events: Vec::new(),
            rng: fastrand::Rng::with_seed(5),
        };
        w.drain();
        w
    }

    fn elapsed(&self) -> Duration {
        self.now - self.epoch
    }

    /// Deliver the client's transmits to the fake PoPs and collect its events.
    fn drain(&mut self) {
        while let Some(t) = self.client.poll_transmit() {
            // Round-trip through the codec, as on the wire.
            let bytes = ott_proto::encode(&t.msg).expect("client messages encode");
            let msg = ott_proto::decode(&bytes).expect("client messages decode");
            let Some(i) = self.pops.iter().position(|p| p.addr == t.to) else {
                panic!("client sent to an unknown address {}", t.to);
            };
            self.sent.push((self.pops[i].id.clone(), msg.clone()));
            let elapsed = self.elapsed();
            let pop = &mut self.pops[i];
            pop.got.push((elapsed, msg.clone()));
            if !pop.alive {
                continue;
            }
            let reply = match msg {
                Message::Probe { nonce, sent_us } => Some(Message::ProbeReply {
                    nonce,
                    echo_us: sent_us,
                    pop: pop.id.clone(),
                    path_latency_us: pop.path_latency_us,
                    hops: 2,
                    viewers: 0,
                    path: pop.path.clone(),
                }),
                Message::ListStreams if pop.drop_lists > 0 => {
                    pop.drop_lists -= 1;
                    None
                }
                Message::ListStreams => Some(Message::Streams {
                    streams: catalogue(),
                }),
                Message::Join {
                    stream,
                    data_port,
                    from: None,
                } if pop.admits => Some(Message::Cookie {
                    stream,
                    data_port,
                    cookie: 7,
                }),
                Message::ViewerJoin {
                    stream, data_port, ..
                } if pop.admits => Some(Message::Admitted {
                    stream,
                    data_port,
                    session_key: [1; 32],
                }),
                _ => None,
            };
            if let Some(r) = reply {
                let mut delay = pop.rtt;
                if !pop.jitter.is_zero() {
                    let j = pop.jitter.as_secs_f64() * (self.rng.f64() * 2.0 - 1.0);
                    delay = Duration::from_secs_f64((delay.as_secs_f64() + j).max(0.0));
                }
                let at = self.now + delay;
                let bytes = ott_proto::encode(&r).expect("replies encode");
                self.seq += 1;
                self.wire.push(Reverse((at, self.seq, i, bytes)));
            }
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push((self.elapsed(), e));
        }
    }

    /// Run the client until `until` (time since the epoch).
    fn run_until(&mut self, until: Duration) {
        let end = self.epoch + until;
        for _ in 0..100_000 {
            self.drain();
            let timer = self.client.poll_timeout();
            let arrival = self.wire.peek().map(|Reverse((at, ..))| *at);
            let next = match (timer, arrival) {
                (Some(t), Some(a)) => t.min(a),
                (Some(t), None) => t,
                (None, Some(a)) => a,
                (None, None) => break,
            };
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            if arrival == Some(next) {
                let Some(Reverse((_, _, i, bytes))) = self.wire.pop() else {
                    unreachable!("peeked above");
                };
                let from = self.pops[i].addr;
                let msg = ott_proto::decode(&bytes).expect("replies decode");
                self.client.handle(self.now, from, msg);
            } else {
                self.client.handle_timeout(self.now);
            }
        }
        self.now = end;
        self.drain();
    }

    fn pop_mut(&mut self, id: &str) -> &mut FakePop {
        self.pops
            .iter_mut()
            .find(|p| p.id == id)
            .expect("known fake pop")
    }

    fn pop_changes(&self) -> Vec<(Duration, Option<String>, String)> {
        self.events
            .iter()
            .filter_map(|(t, e)| match e {
                ClientEvent::PopChanged { old, new } => Some((*t, old.clone(), new.clone())),
                _ => None,
            })
            .collect()
    }

    /// The client's `Join`/`Leave` messages, as (pop id, "join"/"leave", stream id).
    fn subscriptions(&self) -> Vec<(String, &'static str, u32)> {
        self.sent
            .iter()
            .filter_map(|(to, m)| match m {
                Message::Join { stream, .. } => Some((to.clone(), "join", *stream)),
                Message::Leave { stream, .. } => Some((to.clone(), "leave", *stream)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn first_round_probes_every_pop_at_once() {
    let w = World::new(vec![FakePop::new(1, 10, 0), FakePop::new(2, 20, 0)]);
    for p in &w.pops {
        assert!(
            matches!(p.got.first(), Some((t, Message::Probe { .. })) if t.is_zero()),
            "{} probed at t=0",
            p.id
        );
    }
}

#[test]
fn picks_the_lower_score_pop() {
    // p1 answers first (10 ms) but is far from the server (50 ms); p2 is 20 ms + 5 ms.
    let mut w = World::new(vec![
        FakePop::new(1, 10, 50_000),
        FakePop::new(2, 20, 5_000),
    ]);
    w.run_until(Duration::from_secs(3));
    assert_eq!(w.client.pop(), Some("p2"));
    // Started fast on the first answer, then moved once.
    assert_eq!(
        w.pop_changes(),
        vec![
            (ms(10), None, "p1".to_owned()),
            (ms(20), Some("p1".to_owned()), "p2".to_owned())
        ]
    );
    let status = w.client.status();
    assert_eq!(status.pop.as_deref(), Some("p2"));
    let p2 = &status.pops[1];
    assert!(p2.usable);
    assert_eq!(p2.rtt_ms, Some(20.0));
    assert_eq!(p2.path_latency_ms, Some(5.0));
    assert_eq!(p2.score, Some(25.0));
    assert_eq!(p2.loss, 0.0);
}

#[test]
fn pop_without_server_path_is_never_chosen() {
    let mut near = FakePop::new(1, 5, 0);
    near.path_latency_us = None;
    let mut w = World::new(vec![near, FakePop::new(2, 40, 1_000)]);
    w.run_until(Duration::from_secs(2));
    assert_eq!(w.client.pop(), Some("p2"));
    assert_eq!(w.pop_changes().len(), 1);
    assert!(!w.client.status().pops[0].usable);
}

#[test]
fn switches_within_three_seconds_when_the_pop_dies_join_before_leave() {
    // Two probes lost in a row make a PoP unusable here (the default is three since
    // issue 11), to keep this test about make-before-break.
    let config = ClientConfig {
        max_lost_in_a_row: 2,
        ..ClientConfig::default()
    };
    let mut w = World::with_config(
        config,
        vec![FakePop::new(1, 10, 1_000), FakePop::new(2, 30, 1_000)],
    );
    w.client.select_stream(w.now, "news");
    w.run_until(Duration::from_millis(2_500));
    assert_eq!(w.client.pop(), Some("p1"));
    assert_eq!(w.client.stream().map(|s| s.name.as_str()), Some("news"));

    w.pop_mut("p1").alive = false;
    let died = w.elapsed();
    w.run_until(Duration::from_secs(10));
    assert_eq!(w.client.pop(), Some("p2"));
    assert_eq!(w.client.pop_switches(), 1);
    let changes = w.pop_changes();
    let (at, old, new) = changes.last().expect("a pop change");
    assert_eq!((old.as_deref(), new.as_str()), (Some("p1"), "p2"));
    assert!(
        *at - died <= Duration::from_secs(3),
        "switched {:?} after the pop died",
        *at - died
    );

    // Make before break: the first message about the stream after the switch is the
    // Join at p2; the Leave at p1 follows, once, `leave_after` later.
    let news = stream_id_for("news");
    let subs = w.subscriptions();
    let first_p2 = subs
        .iter()
        .position(|(to, ..)| to == "p2")
        .expect("joined at p2");
    assert_eq!(subs[first_p2], ("p2".to_owned(), "join", news));
    assert!(!subs[..first_p2].iter().any(|(_, kind, _)| *kind == "leave"));
    let leaves: Vec<usize> = subs
        .iter()
        .enumerate()
        .filter(|(_, s)| **s == ("p1".to_owned(), "leave", news))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(leaves.len(), 1, "{subs:?}");
    assert!(leaves[0] > first_p2);
    let left_at = w
        .pops
        .iter()
        .find(|p| p.id == "p1")
        .and_then(|p| {
            p.got
                .iter()
                .find(|(_, m)| matches!(m, Message::Leave { .. }))
        })
        .map(|(t, _)| *t)
        .expect("left p1");
    assert_eq!(left_at - *at, ClientConfig::default().leave_after);
    // And the Join keeps being refreshed at the new PoP.
    let p2_joins = subs
        .iter()
        .filter(|(to, kind, _)| to == "p2" && *kind == "join")
        .count();
    assert!(p2_joins >= 5, "only {p2_joins} joins at p2");
}

#[test]
fn no_pop_when_every_pop_dies() {
    let mut w = World::new(vec![FakePop::new(1, 10, 0)]);
    w.run_until(Duration::from_secs(2));
    assert_eq!(w.client.pop(), Some("p1"));
    w.pop_mut("p1").alive = false;
    w.run_until(Duration::from_secs(8));
    let no_pop = w
        .events
        .iter()
        .filter(|(_, e)| *e == ClientEvent::NoPop)
        .count();
    assert_eq!(no_pop, 1, "NoPop reported once");
    // It comes back: usable again after one answer, no new PopChanged (still p1).
    w.pop_mut("p1").alive = true;
    w.run_until(Duration::from_secs(10));
    assert!(w.client.status().pops[0].usable);
    assert_eq!(w.pop_changes().len(), 1);
}

#[test]
fn hysteresis_small_gain_does_not_switch() {
    let mut w = World::new(vec![FakePop::new(1, 20, 0), FakePop::new(2, 40, 0)]);
    w.run_until(Duration::from_secs(2));
    assert_eq!(w.client.pop(), Some("p1"));
    // p2 becomes 5 % better than p1 (19 ms against 20 ms).
    w.pop_mut("p2").rtt = ms(19);
    w.run_until(Duration::from_secs(20));
    assert_eq!(w.client.pop(), Some("p1"));
    assert_eq!(w.client.pop_switches(), 0);
}

#[test]
fn hysteresis_large_gain_switches() {
    let mut w = World::new(vec![FakePop::new(1, 20, 0), FakePop::new(2, 40, 0)]);
    w.run_until(Duration::from_secs(2));
    assert_eq!(w.client.pop(), Some("p1"));
    // p2 becomes 50 % better than p1.
    w.pop_mut("p2").rtt = ms(10);
    w.run_until(Duration::from_secs(20));
    assert_eq!(w.client.pop(), Some("p2"));
    assert_eq!(w.client.pop_switches(), 1);
}

#[test]
fn stream_switch_leaves_then_joins_and_reports_watching() {
    let mut w = World::new(vec![FakePop::new(1, 10, 0)]);
    w.client.select_stream(w.now, "news");
    w.run_until(Duration::from_secs(1));
    let news = stream_id_for("news");
    let sport = stream_id_for("sport");
    assert_eq!(w.client.stream().map(|s| s.id), Some(news));
    let before = w.sent.len();

    w.client.select_stream(w.now, "sport");
    w.drain();
    let after: Vec<_> = w.sent[before..]
        .iter()
        .map(|(to, m)| (to.as_str(), m.clone()))
        .collect();
    assert_eq!(
        after,
        vec![
            (
                "p1",
                Message::Leave {
                    stream: news,
                    data_port: DATA_PORT
                }
            ),
            (
                "p1",
                Message::Join {
                    stream: sport,
                    data_port: DATA_PORT,
                    from: None
                }
            ),
        ]
    );
    assert_eq!(
        w.events.last().map(|(_, e)| e.clone()),
        Some(ClientEvent::Watching(catalogue()[1].clone()))
    );
    assert_eq!(w.client.stream().map(|s| s.id), Some(sport));

    // Selecting the same stream again sends nothing.
    let n = w.sent.len();
    w.client.select_stream(w.now, "sport");
    w.drain();
    assert_eq!(w.sent.len(), n);

    // Shutdown leaves the watched stream, then the client is silent.
    w.client.shutdown(w.now);
    w.drain();
    assert_eq!(
        w.sent.last().map(|(to, m)| (to.as_str(), m.clone())),
        Some((
            "p1",
            Message::Leave {
                stream: sport,
                data_port: DATA_PORT
            }
        ))
    );
    assert_eq!(w.client.poll_timeout(), None);
}

#[test]
fn unknown_stream_is_reported_once() {
    let mut w = World::new(vec![FakePop::new(1, 10, 0)]);
    w.client.select_stream(w.now, "weather");
    w.run_until(Duration::from_secs(12));
    let unknown: Vec<_> = w
        .events
        .iter()
        .filter(|(_, e)| matches!(e, ClientEvent::UnknownStream(_)))
        .collect();
    assert_eq!(unknown.len(), 1);
    assert_eq!(unknown[0].1, ClientEvent::UnknownStream("weather".into()));
    assert_eq!(w.client.stream(), None);
    assert!(w.subscriptions().is_empty());
}

#[test]
fn list_streams_is_retried_when_lost() {
    let mut pop = FakePop::new(1, 10, 0);
    pop.drop_lists = 2;
    let mut w = World::new(vec![pop]);
    w.client.select_stream(w.now, "news");
    w.run_until(Duration::from_secs(2));
    let lists: Vec<Duration> = w.pops[0]
        .got
        .iter()
        .filter(|(_, m)| *m == Message::ListStreams)
        .map(|(t, _)| *t)
        .collect();
    // Asked at 10 ms (first answer), retried every 300 ms, answered the third time.
    assert_eq!(lists, vec![ms(10), ms(310), ms(610)]);
    assert_eq!(w.client.catalogue(), catalogue().as_slice());
    assert_eq!(
        w.events
            .iter()
            .filter(|(_, e)| matches!(e, ClientEvent::Catalogue(_)))
            .count(),
        1
    );
    assert_eq!(w.client.stream().map(|s| s.name.as_str()), Some("news"));
}

#[test]
fn garbage_and_unknown_senders_are_ignored_and_counted() {
    let mut w = World::new(vec![FakePop::new(1, 10, 0)]);
    w.run_until(Duration::from_secs(2));
    let pop = w.client.pop().map(str::to_owned);
    let before = w.client.stats().clone();
    let stranger = SocketAddr::from(([10, 9, 9, 9], 1));
    let now = w.now;
    // A stranger offering a perfect PoP, and a catalogue.
    w.client.handle(
        now,
        stranger,
        Message::ProbeReply {
            nonce: 0,
            echo_us: 0,
            pop: "evil".into(),
            path_latency_us: Some(0),
            hops: 0,
            viewers: 0,
            path: Vec::new(),
        },
    );
    w.client
        .handle(now, stranger, Message::Streams { streams: vec![] });
    // A known PoP sending nonsense: forged probe replies, absurd timestamps, messages
    // clients never get.
    let p1 = w.pops[0].addr;
    for echo_us in [0, u64::MAX] {
        w.client.handle(
            now,
            p1,
            Message::ProbeReply {
                nonce: 12345,
                echo_us,
                pop: "p1".into(),
                path_latency_us: Some(0),
                hops: u32::MAX,
                viewers: u32::MAX,
                path: vec!["x".repeat(64)],
            },
        );
    }
    w.client.handle(now, p1, Message::ListStreams);
    w.client.handle(
        now,
        p1,
        Message::Join {
            stream: 1,
            data_port: 0,
            from: Some("x".into()),
        },
    );
    w.client.handle(
        now,
        p1,
        Message::Error {
            reason: "no such stream".into(),
        },
    );
    w.drain();
    let after = w.client.stats();
    assert_eq!(after.unknown_sender - before.unknown_sender, 2);
    assert_eq!(after.stale_replies - before.stale_replies, 2);
    assert_eq!(after.unexpected - before.unexpected, 2);
    assert_eq!(w.client.pop().map(str::to_owned), pop);
    assert_eq!(
        w.events.last().map(|(_, e)| e.clone()),
        Some(ClientEvent::Refused("no such stream".into()))
    );
    // The client goes on as before.
    w.run_until(Duration::from_secs(5));
    assert_eq!(w.client.pop(), Some("p1"));
    assert_eq!(w.client.catalogue(), catalogue().as_slice());
}

#[test]
fn a_lossy_pop_loses_to_a_clean_one() {
    // Loss up to a quarter of the window costs nothing (issue 11: one lost probe must
    // not move a viewer); over a window of 5, two lost probes (40 %) do.
    let config = ClientConfig {
        seed: 7,
        loss_window: 5,
        ..ClientConfig::default()
    };
    let mut w = World::with_config(config, vec![FakePop::new(1, 10, 0), FakePop::new(2, 11, 0)]);
    w.run_until(Duration::from_millis(1_500));
    assert_eq!(w.client.pop(), Some("p1"));
    // p1 drops two probes, then answers again: 40 % loss makes it score 16 ms against 11.
    w.pop_mut("p1").alive = false;
    w.run_until(Duration::from_millis(3_500));
    w.pop_mut("p1").alive = true;
    w.run_until(Duration::from_secs(6));
    assert_eq!(w.client.pop(), Some("p2"));
    let status = w.client.status();
    assert!(status.pops[0].loss > 0.0);
    assert!(status.pops[0].usable);
}

#[test]
fn moving_back_before_the_old_pop_is_left_keeps_it_joined() {
    let config = ClientConfig {
        leave_after: Duration::from_secs(10),
        max_lost_in_a_row: 2,
        ..ClientConfig::default()
    };
    let mut w = World::with_config(
        config,
        vec![FakePop::new(1, 10, 1_000), FakePop::new(2, 30, 1_000)],
    );
    w.client.select_stream(w.now, "news");
    w.run_until(Duration::from_millis(2_500));
    assert_eq!(w.client.pop(), Some("p1"));
    // p1 goes silent long enough for the client to move to p2, then answers again.
    w.pop_mut("p1").alive = false;
    w.run_until(Duration::from_millis(5_500));
    assert_eq!(w.client.pop(), Some("p2"));
    w.pop_mut("p1").alive = true;
    w.run_until(Duration::from_secs(12));
    assert_eq!(w.client.pop(), Some("p1"), "{:?}", w.pop_changes());
    let back = w.pop_changes().last().map(|c| c.0).expect("moved back");
    w.run_until(back + Duration::from_secs(11));
    let news = stream_id_for("news");
    let subs = w.subscriptions();
    // p1 was never left (the client came back within leave_after), p2 was, once.
    assert!(
        !subs.contains(&("p1".to_owned(), "leave", news)),
        "{subs:?}"
    );
    let p2_leaves = subs
        .iter()
        .filter(|s| **s == ("p2".to_owned(), "leave", news))
        .count();
    assert_eq!(p2_leaves, 1, "{subs:?}");
}

fn path(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// PoP ids joined (their last subscription message a `Join`) for `stream`.
fn joined_at(w: &World, stream: u32) -> Vec<String> {
    let mut last: std::collections::BTreeMap<String, &str> = Default::default();
    for (to, kind, s) in w.subscriptions() {
        if s == stream {
            last.insert(to, kind);
        }
    }
    last.into_iter()
        .filter(|(_, k)| *k == "join")
        .map(|(p, _)| p)
        .collect()
}

fn two_paths() -> ClientConfig {
    ClientConfig {
        paths: 2,
        ..ClientConfig::default()
    }
}

#[test]
fn two_paths_join_a_second_pop_whose_path_is_disjoint_even_if_it_scores_worse() {
    // p1 is best; p2 is next but hangs off the same relay r1; p3 goes through r2.
    let mut p1 = FakePop::new(1, 10, 1_000);
    p1.path = path(&["s", "r1", "p1"]);
    let mut p2 = FakePop::new(2, 12, 1_000);
    p2.path = path(&["s", "r1", "p2"]);
    let mut p3 = FakePop::new(3, 40, 1_000);
    p3.path = path(&["s", "r2", "p3"]);
    let mut w = World::with_config(two_paths(), vec![p1, p2, p3]);
    w.client.select_stream(w.now, "news");
    w.run_until(ms(2_500));
    let news = stream_id_for("news");
    assert_eq!(w.client.pop(), Some("p1"));
    assert_eq!(joined_at(&w, news), vec!["p1".to_owned(), "p3".to_owned()]);
    let st = w.client.status();
    assert_eq!(st.paths_wanted, 2);
    let pops: Vec<&str> = st.paths.iter().map(|p| p.pop.as_str()).collect();
    assert_eq!(pops, vec!["p1", "p3"]);
    assert_eq!(st.paths[1].path, path(&["s", "r2", "p3"]));
    assert_eq!(st.disjoint, Some(true));
    // The second PoP's Join is refreshed like the first's.
    let p3_joins = w
        .subscriptions()
        .iter()
        .filter(|(to, k, _)| to == "p3" && *k == "join")
        .count();
    assert!(p3_joins >= 3, "only {p3_joins} joins at p3");
}

#[test]
fn one_path_joins_one_pop_only() {
    let mut p1 = FakePop::new(1, 10, 1_000);
    p1.path = path(&["s", "r1", "p1"]);
    let mut p2 = FakePop::new(2, 40, 1_000);
    p2.path = path(&["s", "r2", "p2"]);
    let mut w = World::new(vec![p1, p2]);
    w.client.select_stream(w.now, "news");
    w.run_until(ms(3_000));
    assert_eq!(joined_at(&w, stream_id_for("news")), vec!["p1".to_owned()]);
    let st = w.client.status();
    assert_eq!(st.paths.len(), 1);
    assert_eq!(st.disjoint, None);
}

#[test]
fn without_a_disjoint_pop_the_best_other_is_the_second_and_status_says_so() {
    let mut p1 = FakePop::new(1, 10, 1_000);
    p1.path = path(&["s", "r1", "p1"]);
    let mut p2 = FakePop::new(2, 30, 1_000);
    p2.path = path(&["s", "r1", "p2"]);
    let mut w = World::with_config(two_paths(), vec![p1, p2]);
    w.client.select_stream(w.now, "news");
    w.run_until(ms(2_500));
    assert_eq!(
        joined_at(&w, stream_id_for("news")),
        vec!["p1".to_owned(), "p2".to_owned()]
    );
    assert_eq!(w.client.status().disjoint, Some(false));
}

#[test]
fn when_the_first_pop_dies_the_second_carries_on_and_a_new_second_is_found() {
    let mut p1 = FakePop::new(1, 10, 1_000);
    p1.path = path(&["s", "r1", "p1"]);
    let mut p2 = FakePop::new(2, 20, 1_000);
    p2.path = path(&["s", "r2", "p2"]);
    let mut p3 = FakePop::new(3, 30, 1_000);
    p3.path = path(&["s", "r3", "p3"]);
    let mut w = World::with_config(two_paths(), vec![p1, p2, p3]);
    w.client.select_stream(w.now, "news");
    w.run_until(ms(2_500));
    let news = stream_id_for("news");
    assert_eq!(joined_at(&w, news), vec!["p1".to_owned(), "p2".to_owned()]);
    let joins_before = w.subscriptions().len();
    w.pop_mut("p1").alive = false;
    // Over two paths media keeps flowing from p2, so the client hears no silence:
    // probes find p1 dead, and p2 (joined already) takes its place.
    let died = w.elapsed();
    for t in (0..8_000).step_by(40) {
        w.run_until(died + ms(t));
        w.client.media_received(w.now);
    }
    assert_eq!(w.client.pop(), Some("p2"));
    let st = w.client.status();
    let pops: Vec<&str> = st.paths.iter().map(|p| p.pop.as_str()).collect();
    assert_eq!(pops, vec!["p2", "p3"], "{st:?}");
    assert_eq!(st.disjoint, Some(true));
    // p2 was not joined again from scratch (it was joined); p1 is left.
    let after = &w.subscriptions()[joins_before..];
    assert!(
        after.contains(&("p3".to_owned(), "join", news)),
        "{after:?}"
    );
    assert!(
        after.contains(&("p1".to_owned(), "leave", news)),
        "{after:?}"
    );
    assert_eq!(joined_at(&w, news), vec!["p2".to_owned(), "p3".to_owned()]);
}

#[test]
fn a_second_path_that_stops_being_disjoint_is_replaced_by_a_disjoint_one() {
    let mut p1 = FakePop::new(1, 10, 1_000);
    p1.path = path(&["s", "r1", "p1"]);
    let mut p2 = FakePop::new(2, 20, 1_000);
    p2.path = path(&["s", "r2", "p2"]);
    let mut p3 = FakePop::new(3, 30, 1_000);
    p3.path = path(&["s", "r1", "p3"]);
    let mut w = World::with_config(two_paths(), vec![p1, p2, p3]);
    w.client.select_stream(w.now, "news");
    w.run_until(ms(2_500));
    let news = stream_id_for("news");
    assert_eq!(joined_at(&w, news), vec!["p1".to_owned(), "p2".to_owned()]);
    // The tree moves p2 under r1 and p3 under r3: the next probe replies say so.
    w.pop_mut("p2").path = path(&["s", "r1", "p2"]);
    w.pop_mut("p3").path = path(&["s", "r3", "p3"]);
    w.run_until(ms(6_000));
    assert_eq!(joined_at(&w, news), vec!["p1".to_owned(), "p3".to_owned()]);
    assert_eq!(w.client.status().disjoint, Some(true));
    // Paths through a shared relay are not disjoint; a common server is.
    use ott_tree::client::disjoint;
    assert_eq!(
        disjoint(&path(&["s", "a", "p"]), &path(&["s", "b", "q"])),
        Some(true)
    );
    assert_eq!(
        disjoint(&path(&["s", "a", "p"]), &path(&["s", "a", "q"])),
        Some(false)
    );
    assert_eq!(
        disjoint(&path(&["s", "p"]), &path(&["s", "p", "q"])),
        Some(false)
    );
    assert_eq!(
        disjoint(&path(&["s1", "a"]), &path(&["s2", "b"])),
        Some(true)
    );
    assert_eq!(disjoint(&[], &path(&["s"])), None);
}

#[test]
fn a_second_pop_that_never_gets_disjoint_is_traded_for_an_untried_one_once() {
    // Every PoP hangs off r1 as the tree stands; p3 can get round it once asked
    // (here: its path changes once it is the second), p2 cannot.
    let mut p1 = FakePop::new(1, 10, 1_000);
    p1.path = path(&["s", "r1", "p1"]);
    let mut p2 = FakePop::new(2, 20, 1_000);
    p2.path = path(&["s", "r1", "p2"]);
    let mut p3 = FakePop::new(3, 30, 1_000);
    p3.path = path(&["s", "r1", "p3"]);
    let mut w = World::with_config(two_paths(), vec![p1, p2, p3]);
    w.client.select_stream(w.now, "news");
    w.run_until(ms(2_000));
    let news = stream_id_for("news");
    assert_eq!(joined_at(&w, news), vec!["p1".to_owned(), "p2".to_owned()]);
    // p2 stays on r1: after the trial time the client moves its second path to p3.
    w.run_until(ms(6_000));
    assert_eq!(joined_at(&w, news), vec!["p1".to_owned(), "p3".to_owned()]);
    assert_eq!(w.client.status().disjoint, Some(false));
    // Every other PoP was tried: no endless round; p3 stays.
    w.run_until(ms(12_000));
    assert_eq!(joined_at(&w, news), vec!["p1".to_owned(), "p3".to_owned()]);
    // p3's stream moves round r1: the paths are disjoint now, and p3 is kept.
    w.pop_mut("p3").path = path(&["s", "r2", "p3"]);
    w.run_until(ms(15_000));
    assert_eq!(joined_at(&w, news), vec!["p1".to_owned(), "p3".to_owned()]);
    assert_eq!(w.client.status().disjoint, Some(true));
}

/// The `Avoid` sets the client sent to `pop`, in order.
fn avoids_to(w: &World, pop: &str) -> Vec<Vec<String>> {
    w.sent
        .iter()
        .filter(|(to, _)| to == pop)
        .filter_map(|(_, m)| match m {
            Message::Avoid { avoid, .. } => Some(avoid.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_second_pop_is_asked_to_avoid_the_first_path_then_the_first_the_seconds() {
    // p2 can only be reached through r1, which p1's path crosses too.
    let mut p1 = FakePop::new(1, 10, 1_000);
    p1.path = path(&["s", "r1", "p1"]);
    let mut p2 = FakePop::new(2, 20, 1_000);
    p2.path = path(&["s", "r1", "p2"]);
    for p in [&mut p1, &mut p2] {
        p.admits = true;
    }
    let mut w = World::with_config(two_paths(), vec![p1, p2]);
    w.client.select_stream(w.now, "news");
    w.run_until(ms(2_000));
    // Admitted at both; the second is asked to avoid r1 and p1, the first nothing.
    let st = w.client.status();
    assert!(st.paths.iter().all(|p| p.admitted), "{st:?}");
    let to_p2 = avoids_to(&w, "p2");
    assert!(!to_p2.is_empty());
    assert!(to_p2.iter().all(|a| *a == path(&["r1", "p1"])), "{to_p2:?}");
    assert!(avoids_to(&w, "p1").is_empty());
    // p2 never gets round r1 and no other PoP is left to try: now the first PoP is
    // asked to avoid the second's path (r1, p2), and the second no longer.
    w.run_until(ms(5_000));
    let n2 = avoids_to(&w, "p2").len();
    w.run_until(ms(8_000));
    let to_p1 = avoids_to(&w, "p1");
    assert!(!to_p1.is_empty(), "the first PoP is asked to avoid");
    assert!(to_p1.iter().all(|a| *a == path(&["r1", "p2"])), "{to_p1:?}");
    assert_eq!(avoids_to(&w, "p2").len(), n2, "no more Avoid to the second");
    // p1 finds a way round through r2: disjoint.
    w.pop_mut("p1").path = path(&["s", "r2", "p1"]);
    w.run_until(ms(11_000));
    assert_eq!(w.client.status().disjoint, Some(true));
    assert_eq!(w.client.pop(), Some("p1"));
}

#[test]
fn a_second_pop_that_takes_the_first_place_keeps_avoiding_the_other_path() {
    let mut p1 = FakePop::new(1, 10, 1_000);
    p1.path = path(&["s", "r1", "p1"]);
    let mut p2 = FakePop::new(2, 20, 1_000);
    p2.path = path(&["s", "r2", "p2"]);
    let mut p3 = FakePop::new(3, 30, 1_000);
    p3.path = path(&["s", "r1", "p3"]);
    for p in [&mut p1, &mut p2, &mut p3] {
        p.admits = true;
    }
    let mut w = World::with_config(two_paths(), vec![p1, p2, p3]);
    w.client.select_stream(w.now, "news");
    w.run_until(ms(2_000));
    assert_eq!(w.client.status().disjoint, Some(true));
    assert!(!avoids_to(&w, "p2").is_empty());
    // p1 dies: p2 takes its place, p3 becomes the second; p2 (whose path is the one
    // that was moved) is still the one asked to avoid, now p3's path.
    w.pop_mut("p1").alive = false;
    let before = avoids_to(&w, "p2").len();
    for t in (2_000..9_000).step_by(40) {
        w.run_until(ms(t));
        w.client.media_received(w.now);
    }
    assert_eq!(w.client.pop(), Some("p2"));
    let st = w.client.status();
    let pops: Vec<&str> = st.paths.iter().map(|p| p.pop.as_str()).collect();
    assert_eq!(pops, vec!["p2", "p3"]);
    let to_p2 = avoids_to(&w, "p2");
    assert!(to_p2.len() > before, "p2 is still asked to avoid");
    assert_eq!(to_p2.last(), Some(&path(&["r1", "p3"])));
    assert!(avoids_to(&w, "p3").is_empty(), "the new second is not");
}

#[test]
fn jitter_on_the_paths_does_not_make_the_client_hop_between_pops() {
    // Two PoPs 5 ms apart, each reply ±20 ms: noise, not a better PoP.
    let mut p1 = FakePop::new(1, 45, 1_000);
    let mut p2 = FakePop::new(2, 40, 1_000);
    for p in [&mut p1, &mut p2] {
        p.jitter = ms(20);
    }
    let spread = ClientConfig {
        switch_spread: 2.0,
        ..ClientConfig::default()
    };
    let mut w = World::with_config(spread.clone(), vec![p1, p2]);
    w.client.select_stream(w.now, "news");
    w.run_until(Duration::from_secs(300));
    assert!(
        w.client.pop_switches() <= 2,
        "{} PoP switches in 5 minutes of jitter",
        w.client.pop_switches()
    );
    // A PoP really better by far more than the jitter still wins.
    let mut p1 = FakePop::new(1, 150, 1_000);
    let mut p2 = FakePop::new(2, 40, 1_000);
    for p in [&mut p1, &mut p2] {
        p.jitter = ms(20);
    }
    p2.alive = false;
    let mut w = World::with_config(spread, vec![p1, p2]);
    w.run_until(Duration::from_secs(5));
    assert_eq!(w.client.pop(), Some("p1"));
    w.pop_mut("p2").alive = true;
    w.run_until(Duration::from_secs(40));
    assert_eq!(w.client.pop(), Some("p2"));
}
