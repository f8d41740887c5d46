//! A deterministic discrete-event network that runs real [`Node`]s and [`Client`]s.
//!
//! Every host gets a fake address (`10.a.b.c`, control port [`CONTROL_PORT`], data port
//! [`DATA_PORT`] for nodes, [`CLIENT_DATA_PORT`] for clients). Datagrams travel over
//! links with latency, jitter, loss and an up/down state, drawn from the sending host's
//! own seeded `fastrand::Rng`; in-flight datagrams sit in a calendar queue ordered by
//! (arrival, sender, the sender's count), so a run depends on nothing but the seed and
//! the script. Every control
//! message is encoded with `ott_proto::encode` and decoded again on arrival (failures
//! are dropped and counted).
//!
//! Media runs through the real data plane. Every host has an [`ott_datapath::DataPath`]
//! beside its tree state machine, configured as the programs configure theirs: a
//! server's (streams pinned, no NACKs), a relay's or PoP's, a viewer's (media accepted
//! only with its session key, NACKs to its PoP, the real [`ott_media::PlayoutBuffer`]).
//! Each [`Event::Forwarding`] becomes the data path's route (children and viewers'
//! session keys, through [`ott_datapath::children_from`], as `ott-apps` does); each
//! client's session key and stream go to its data path. Every [`MediaParams::period`]
//! each server makes a synthetic frame of each stream, cut into datagrams by the real
//! [`ott_media::Packetizer`]; the datagrams, the retransmissions, the start-cache
//! replays and the NACKs travel the simulated links like control messages (same delay,
//! jitter, loss). Tests can check who played which frame intact, when, and how many
//! copies each link carried.
//!
//! The simulation is event-driven: a step delivers the earliest datagram, or fires the
//! earliest timer of one host (its tree state machine's or its data plane's: NACKs,
//! playout deadlines; timers sit in a heap too), or the media tick, so a step
//! costs the same with ten hosts or ten thousand and only the hosts with something to do
//! run. Each step changes the state of at most one host, so [`Sim::check_loops_each_step`]
//! checks loop freedom after every step by walking the parent and subscription chains
//! from that host only (a new loop must go through the host that changed).
//!
//! A run can use several threads ([`Sim::threads`]): the hosts are split into as many
//! parts of consecutive indices, each with its own datagrams in flight, timers and
//! counters, stepped by its own thread through windows of virtual time no longer than
//! the shortest link between two parts (a conservative parallel simulation: nothing
//! sent in a window can arrive in it on another part, so the parts only hand datagrams
//! over at window ends; a window also ends at each media tick, which each part plays
//! for its own servers). Nothing a step does depends on another part's hosts at the
//! same instant, and ties are broken by sender, so each host sees the same inputs in
//! the same order as on one thread. The loop check cannot walk the other parts' pointers
//! mid-window: each step logs the pointers it changed with its place in the one-thread
//! order, and at the end of the run the logs, merged in that order, are replayed into
//! the forests, checking exactly the states a run on one thread checks after each
//! step. The output is the same with any number of threads (a test holds it so).
//!
//! The clock is virtual: [`Sim::now`] only moves when [`Sim::run_until`] or
//! [`Sim::run_for`] steps the simulation; the wall clock is read once, in [`Sim::new`], to
//! get an origin `Instant`.
//!
//! ```
//! use std::time::Duration;
//! use ott_tree::sim::{LinkParams, Sim};
//! use ott_tree::Role;
//!
//! let mut sim = Sim::new(7);
//! sim.add_node("s1", Role::Server);
//! sim.add_node("n1", Role::Pop);
//! sim.add_link("s1", "n1", LinkParams::new(Duration::from_millis(2)));
//! sim.start();
//! sim.run_for(Duration::from_secs(3));
//! assert_eq!(sim.node("n1").parent("s1"), Some("s1"));
//! ```

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ott_datapath::{DataPath, DataPathEvent as DataEvent, Payload as DataPayload};
use ott_media::{Packetizer, PlayoutBuffer, PlayoutConfig};
use ott_overlay::Topology;
use ott_proto::{flags, MediaHeader, Message, StreamId, StreamInfo, HEADER_LEN};

use crate::{Client, ClientConfig, ClientEvent, Event, Node, NodeConfig, Role};

/// Control port of every simulated host.
pub const CONTROL_PORT: u16 = 7000;
/// Data port of every simulated node.
pub const DATA_PORT: u16 = 7001;
/// Data port of every simulated client.
pub const CLIENT_DATA_PORT: u16 = 9000;

/// Properties of one simulated link (the same both ways).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way latency.
    pub latency: Duration,
    /// Extra one-way delay, uniform in `[0, jitter)`, drawn per datagram.
    pub jitter: Duration,
    /// Probability that a datagram is lost, 0.0..=1.0.
    pub loss: f64,
}

impl LinkParams {
    /// A link with this latency, no jitter and no loss.
    pub fn new(latency: Duration) -> Self {
        Self {
            latency,
            jitter: Duration::ZERO,
            loss: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct SimLink {
    params: LinkParams,
    up: bool,
}

#[derive(Debug)]
enum Machine {
    Node(Box<Node>),
    Client(Box<Client>),
}

/// Media reception of one stream at one host.
#[derive(Debug, Clone, Default)]
struct Reception {
    /// Nodes: frames started (first fragments accepted by the data path). Clients:
    /// frames played (released whole by the playout buffer).
    count: u64,
    /// Clients: when each frame was played (since the start).
    arrivals: Vec<Duration>,
    /// Clients: the number of each frame played, in play order (when the server made
    /// it is looked up in [`Sim`]'s record of the frames made, when asked).
    played: Vec<u32>,
    /// Clients: frames played whose bytes were not the ones the server sent.
    corrupt: u64,
}

/// The data plane of one running host: the real [`DataPath`] (a server's, a relay's or
/// a viewer's) and, for a viewer, the real playout buffer.
struct Data {
    path: DataPath,
    /// A viewer's: the frames of the stream watched, rebuilt and released in order.
    playout: Option<PlayoutBuffer>,
    /// A viewer's: the stream watched.
    watching: Option<StreamId>,
    /// A server's: one packetizer per stream of its catalogue.
    packetizers: Vec<(StreamId, Packetizer)>,
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Data")
            .field("path", &self.path)
            .field("watching", &self.watching)
            .finish_non_exhaustive()
    }
}

impl Data {
    fn poll_timeout(&self) -> Option<Instant> {
        let p = self.playout.as_ref().and_then(PlayoutBuffer::poll_timeout);
        [self.path.poll_timeout(), p].into_iter().flatten().min()
    }
}

/// How the servers of a simulation make media ([`Sim::set_media`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaParams {
    /// Time between two frames of each stream.
    pub period: Duration,
    /// Bytes of each synthetic frame (more than one datagram's payload makes frames of
    /// several datagrams, which the viewers reassemble).
    pub frame_len: usize,
    /// Every this many frames is a keyframe (a new child starts from the last one).
    pub keyframe_every: u32,
    /// Playout latency budget of the viewers (and their NACK give-up time).
    pub latency: Duration,
}

impl Default for MediaParams {
    fn default() -> Self {
        Self {
            period: Duration::from_millis(100),
            frame_len: ott_proto::MAX_PAYLOAD_LEN + 200,
            keyframe_every: 10,
            latency: Duration::from_millis(300),
        }
    }
}

/// SplitMix64: a well-mixed 64-bit value from a seed.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The data port a host sends media and NACKs from.
fn data_port_of(h: &Host) -> u16 {
    if h.role.is_some() {
        DATA_PORT
    } else {
        CLIENT_DATA_PORT
    }
}

/// The bytes of synthetic frame `number` of `len` bytes: its number, then a pattern.
fn synthetic_frame(number: u32, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|k| (k as u32 ^ number) as u8).collect();
    for (d, b) in v.iter_mut().zip(number.to_be_bytes()) {
        *d = b;
    }
    v
}

#[derive(Debug)]
struct Host {
    id: String,
    ip: Ipv4Addr,
    role: Option<Role>,
    pops: Vec<String>,
    machine: Option<Machine>,
    next_timeout: Option<Instant>,
    /// The data plane's timer ([`Data::poll_timeout`]) as of its last call, valid
    /// while `data_dirty` is false.
    data_timeout: Option<Instant>,
    /// Whether the data plane was called since its timer was last read or its
    /// transmits last drained: a step that only touched the tree state machine (most
    /// of them: heartbeats and acks) then reads neither, each a cache miss at 10,000
    /// nodes.
    data_dirty: bool,
    incarnation: u64,
    /// The host's own random stream (its links' loss and jitter draws for what it
    /// sends), so that a run does not depend on which thread steps which host.
    rng: fastrand::Rng,
    /// Datagrams this host put on the wire: with its index, the tie-break between
    /// datagrams arriving at the same instant.
    sent: u64,
    /// This host's links, by the host at their other end (each once, in the order
    /// they were made): a copy of [`Sim::links`]
    /// (kept in step by [`Sim::connect`] and [`Sim::change_link`]) that a send finds
    /// among a few entries, prefetched with the host, rather than in the map of
    /// every link.
    out: Vec<(u32, SimLink)>,
    /// [`Node::pointer_version`] of the node its forest pointers were last logged
    /// from (see [`Ctx::recheck`]); `None`: not a node's, or forgotten.
    forest_version: Option<u64>,
    /// [`Node::changing_inputs`] of the node when its invariants were last found
    /// intact: while it stays the same they still are (see [`Ctx::recheck`]).
    intact_at: Option<u64>,
    catalogue: Vec<StreamInfo>,
    forwarding: BTreeMap<StreamId, Vec<SocketAddr>>,
    received: BTreeMap<StreamId, Reception>,
    data: Option<Data>,
    control_sent: u64,
    log: Vec<String>,
    selected: Option<String>,
}

#[derive(Debug)]
enum Payload {
    /// An encoded control message (to a control port), or a NACK (to a data port).
    Control(Arc<ControlDatagram>),
    /// The same, short enough to travel in the datagram's slot itself (heartbeats and
    /// their acks, most of the traffic): no allocation, no shared count, and the bytes
    /// are in the cache line the simulator prefetched.
    Small(SmallDatagram),
    /// A media datagram.
    Media(Bytes),
}

/// The bytes of one encoded control message, shared by its copies to several
/// neighbours, and what decoding them gives, once one has arrived: decoding is a pure
/// function of the bytes, so the later copies take a clone of the message (and count a
/// codec error each if it failed, as decoding again would).
#[derive(Debug)]
struct ControlDatagram {
    bytes: Vec<u8>,
    decoded: OnceLock<Option<Message>>,
}

impl Payload {
    /// Another copy of a datagram to send (a shared one is not copied).
    fn share(&self) -> Self {
        match self {
            Payload::Control(d) => Payload::Control(Arc::clone(d)),
            Payload::Small(s) => Payload::Small(*s),
            Payload::Media(b) => Payload::Media(b.clone()),
        }
    }
}

impl ControlDatagram {
    fn new(bytes: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            bytes,
            decoded: OnceLock::new(),
        })
    }

    /// The message, decoded (once for all copies); `None` if it does not decode.
    fn decode(this: Arc<Self>) -> Option<Message> {
        match Arc::try_unwrap(this) {
            // The last copy, never decoded: no need to keep the message.
            Ok(d) => match d.decoded.into_inner() {
                Some(m) => m,
                None => ott_proto::decode(&d.bytes).ok(),
            },
            Err(shared) => shared
                .decoded
                .get_or_init(|| ott_proto::decode(&shared.bytes).ok())
                .clone(),
        }
    }
}

/// Longest control datagram kept in a [`Payload::Small`].
const SMALL_DATAGRAM: usize = 94;

/// The bytes of a short control datagram, inline.
#[derive(Debug, Clone, Copy)]
struct SmallDatagram {
    len: u8,
    bytes: [u8; SMALL_DATAGRAM],
}

impl SmallDatagram {
    /// `bytes` inline, if they fit.
    fn of(bytes: &[u8]) -> Option<Self> {
        let mut s = Self {
            len: u8::try_from(bytes.len()).ok()?,
            bytes: [0; SMALL_DATAGRAM],
        };
        s.bytes.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(s)
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(SMALL_DATAGRAM)]
    }
}

/// An encoded control message as it goes on the wire: inline when short, else shared
/// by the copies to several neighbours.
fn control_payload(bytes: &[u8]) -> Payload {
    match SmallDatagram::of(bytes) {
        Some(s) => Payload::Small(s),
        None => Payload::Control(ControlDatagram::new(bytes.to_vec())),
    }
}

#[derive(Debug)]
struct InFlight {
    /// The sender's address (every host's is IPv4: see [`Sim::add_host`]).
    from: SocketAddrV4,
    /// Index of the sending host.
    src: u32,
    /// Index of the receiving host, found from the destination address when sent.
    dst: u32,
    /// [`Sim::link_changes`] when it was sent (over a link that was up then).
    links_at: u64,
    payload: Payload,
}

/// Width of one bucket of [`Wire`]'s calendar, in nanoseconds of virtual time (about
/// 0.26 ms).
const BUCKET_NS: u64 = 1 << 18;
/// Buckets of the calendar (about 67 ms ahead; later datagrams wait in a heap).
const BUCKETS: u64 = 256;

/// The datagrams in flight, delivered in order of (arrival, sequence number).
///
/// A calendar queue: the keys (arrival in ns since the epoch, sequence number, slot of
/// the datagram and its receiving host) of the current bucket are in a vector sorted
/// latest first; those of the next [`BUCKETS`] buckets in unsorted lists, sorted when
/// their turn comes; later ones in an overflow heap. A network of thousands of nodes
/// has tens of thousands of datagrams in flight, and one big heap costs a cache miss
/// per level at every step; the current bucket stays small, and being sorted it shows
/// the next datagrams to come ([`Wire::upcoming`]), whose memory the simulator
/// prefetches. The datagrams themselves sit in reusable slots, so that nothing but
/// 24-byte keys moves.
#[derive(Debug, Default)]
struct Wire {
    /// Bucket number of `cur`: every key in `cur` has a bucket at or before it, every
    /// key in `ring` and `overflow` one after it.
    base: u64,
    /// Keys of the current bucket, latest first (the next datagram is the last).
    cur: Vec<WireKey>,
    /// Keys of buckets `base + 1 .. base + BUCKETS`, at their bucket modulo `BUCKETS`.
    ring: Vec<Vec<WireKey>>,
    in_ring: usize,
    overflow: BinaryHeap<Reverse<WireKey>>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
}

/// (arrival in ns, sequence number, slot in the low 32 bits and receiving host in the
/// high 32): unique by its first two, so the third never decides the order.
type WireKey = (u64, u64, u64);

/// The slot and receiving host of a [`WireKey`].
fn slot_and_dst(k: &WireKey) -> (usize, usize) {
    ((k.2 & 0xffff_ffff) as usize, (k.2 >> 32) as usize)
}

impl Wire {
    /// Queue `f` to arrive at `at` ns since the epoch, after the datagrams queued
    /// before it for the same time (`seq` grows with every call).
    fn push(&mut self, at: u64, seq: u64, f: InFlight) {
        let dst = u64::from(f.dst);
        let slot = match self.free.pop() {
            Some(k) => {
                self.slots[k] = Some(f);
                k
            }
            None => {
                self.slots.push(Some(f));
                self.slots.len() - 1
            }
        };
        let key = (at, seq, slot as u64 | dst << 32);
        let bucket = at / BUCKET_NS;
        if bucket <= self.base {
            // Rare: a link shorter than what is left of the bucket.
            let k = self.cur.partition_point(|x| *x > key);
            self.cur.insert(k, key);
        } else if bucket < self.base + BUCKETS {
            if self.ring.is_empty() {
                self.ring.resize_with(BUCKETS as usize, Vec::new);
            }
            self.ring[(bucket % BUCKETS) as usize].push(key);
            self.in_ring += 1;
        } else {
            self.overflow.push(Reverse(key));
        }
    }

    /// Arrival (ns since the epoch) of the earliest datagram.
    fn peek(&mut self) -> Option<u64> {
        loop {
            if let Some((at, _, _)) = self.cur.last() {
                return Some(*at);
            }
            // Move on to the next bucket with something in it.
            if self.in_ring == 0 {
                let Reverse((at, _, _)) = self.overflow.peek()?;
                self.base = self.base.max(at / BUCKET_NS);
            } else {
                self.base += 1;
                let list = &mut self.ring[(self.base % BUCKETS) as usize];
                self.in_ring -= list.len();
                // `cur` is empty here: take the list's storage, give it `cur`'s.
                std::mem::swap(&mut self.cur, list);
            }
            while let Some(&Reverse(key)) = self.overflow.peek() {
                if key.0 / BUCKET_NS > self.base {
                    break;
                }
                self.overflow.pop();
                self.cur.push(key);
            }
            self.cur.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    /// The earliest datagram, with its sequence number.
    fn pop(&mut self) -> Option<(u64, InFlight)> {
        self.peek()?;
        let key = self.cur.pop()?;
        let (slot, _) = slot_and_dst(&key);
        let f = self.slots.get_mut(slot)?.take();
        self.free.push(slot);
        f.map(|f| (key.1, f))
    }

    /// The `n`-th next datagram of the current bucket (0: the next), with its receiving
    /// host, if the bucket holds it: a hint of what is coming, for prefetching.
    /// Its slot is not read: taking its place reads nothing but the slots' handle.
    fn upcoming(&self, n: usize) -> Option<(&Option<InFlight>, usize)> {
        let k = self.cur.len().checked_sub(n + 1)?;
        let (slot, dst) = slot_and_dst(self.cur.get(k)?);
        Some((self.slots.get(slot)?, dst))
    }

    /// Take every datagram out, in no particular order, with its arrival and sequence
    /// number (to queue them again elsewhere).
    fn drain_all(&mut self) -> Vec<(u64, u64, InFlight)> {
        let keys = std::mem::take(&mut self.cur)
            .into_iter()
            .chain(
                std::mem::take(&mut self.overflow)
                    .into_iter()
                    .map(|Reverse(k)| k),
            )
            .chain(self.ring.iter_mut().flat_map(std::mem::take));
        let mut out = Vec::new();
        for key in keys {
            let (at, seq) = (key.0, key.1);
            let (slot, _) = slot_and_dst(&key);
            if let Some(f) = self.slots.get_mut(slot).and_then(Option::take) {
                out.push((at, seq, f));
            }
        }
        self.in_ring = 0;
        self.slots.clear();
        self.free.clear();
        out
    }
}

/// A fast hasher for the simulator's own maps (host indices, stream ids, short ids):
/// their keys come from the simulator, not from an adversary, so SipHash's protection
/// buys nothing and costs a large part of every step. Nothing iterates these maps in
/// an order that matters (every walk over them is sorted or order-free).
#[derive(Debug, Default, Clone, Copy)]
struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        // Spread the high bits (where the multiplications put the entropy) down.
        let z = self.0 ^ (self.0 >> 29);
        z.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (z >> 32)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

/// Copies of one stream carried over one directed link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Copies {
    total: u64,
    /// Sequence number of the last live (not resent, not cached) datagram...
    last_seq: Option<u32>,
    /// ... and how many times in a row it was sent.
    in_a_row: u64,
    max_per_datagram: u64,
}

/// Counters of the whole simulated network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Control datagrams put on a link.
    pub control_sent: u64,
    /// Media datagrams put on a link (live, resent and replayed from start caches).
    pub media_sent: u64,
    /// NACKs put on a link (by relays and viewers).
    pub nacks_sent: u64,
    /// Frames the servers made (one per stream per media period).
    pub frames_made: u64,
    /// Datagrams lost to link loss.
    pub lost: u64,
    /// Datagrams dropped because there is no link or it is down.
    pub no_route: u64,
    /// Datagrams dropped because their destination is dead or unknown.
    pub dead_dest: u64,
    /// Control messages that failed to encode or decode.
    pub codec_errors: u64,
    /// Steps run.
    pub steps: u64,
    /// Loop-freedom checks made by [`Sim::check_loops_each_step`].
    pub loop_checks: u64,
    /// Checks that found a loop or a broken node invariant.
    pub loop_violations: u64,
}

/// Which parent-pointer forest an edge belongs to: a server's tree or a stream's
/// subscription chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ForestKey {
    /// Parent pointers towards the server with this host index.
    Server(usize),
    /// Upstream pointers of this stream.
    Stream(StreamId),
}

/// Incremental cycle detection over parent pointers (one forest per [`ForestKey`]).
///
/// The structure mirrors every running node's pointers. When a pointer changes, only
/// the chain from the node that changed is walked: if the forests were free of cycles
/// before, a new cycle must use the new edge, so it goes through that node. The walk
/// marks hosts with a per-walk epoch, so it costs the length of the chain, not its
/// square, and allocates nothing.
#[derive(Debug, Default)]
struct Forests {
    parent: FastMap<ForestKey, Vec<Option<usize>>>,
    /// Per host, the keys under which it has a pointer (sorted).
    keys: Vec<Vec<ForestKey>>,
    mark: Vec<u64>,
    epoch: u64,
}

impl Forests {
    fn grow(&mut self, n: usize) {
        if self.mark.len() < n {
            self.mark.resize(n, 0);
            self.keys.resize_with(n, Vec::new);
        }
    }

    /// Set every pointer of `host` (the pairs not given become none); on a cycle, the
    /// hosts along it, the repeated one last.
    fn set_all(
        &mut self,
        host: usize,
        now: &mut [(ForestKey, usize)],
    ) -> Result<(), (ForestKey, Vec<usize>)> {
        self.grow(host + 1);
        now.sort_unstable();
        let gone: Vec<ForestKey> = self.keys[host]
            .iter()
            .filter(|k| now.binary_search_by(|(x, _)| x.cmp(k)).is_err())
            .copied()
            .collect();
        for k in gone {
            // Removing a pointer cannot make a loop.
            let _ = self.set(k, host, None);
        }
        let mut result = Ok(());
        for &(k, p) in now.iter() {
            if let Err(e) = self.set(k, host, Some(p)) {
                if result.is_ok() {
                    result = Err((k, e));
                }
            }
        }
        result
    }

    /// Set one pointer; walks from `host` only if it changed.
    fn set(&mut self, k: ForestKey, host: usize, p: Option<usize>) -> Result<(), Vec<usize>> {
        let n = self.mark.len().max(host + 1).max(p.map_or(0, |p| p + 1));
        self.grow(n);
        let v = self.parent.entry(k).or_default();
        if v.len() < n {
            v.resize(n, None);
        }
        if v[host] == p {
            return Ok(());
        }
        v[host] = p;
        let keys = &mut self.keys[host];
        match (keys.binary_search(&k), p) {
            (Err(at), Some(_)) => keys.insert(at, k),
            (Ok(at), None) => {
                keys.remove(at);
            }
            _ => {}
        }
        if p.is_none() {
            return Ok(());
        }
        self.epoch += 1;
        let mut cur = host;
        loop {
            self.mark[cur] = self.epoch;
            match v.get(cur).copied().flatten() {
                None => return Ok(()),
                Some(next) if self.mark[next] == self.epoch => {
                    // Name the cycle: from `next` round to `next` again.
                    let mut cycle = vec![next];
                    let mut at = next;
                    while let Some(q) = v.get(at).copied().flatten() {
                        cycle.push(q);
                        if q == next || cycle.len() > v.len() + 1 {
                            break;
                        }
                        at = q;
                    }
                    return Err(cycle);
                }
                Some(next) => cur = next,
            }
        }
    }

    /// Forget every pointer of `host` (it died or restarts with a fresh state).
    fn clear(&mut self, host: usize) {
        if let Some(keys) = self.keys.get_mut(host) {
            for k in std::mem::take(keys) {
                if let Some(v) = self.parent.get_mut(&k) {
                    if let Some(x) = v.get_mut(host) {
                        *x = None;
                    }
                }
            }
        }
    }
}

type Hook = Box<dyn FnMut(&Sim)>;

/// A datagram on its way to another part's hosts: (arrival in ns since the epoch,
/// tie-break key, datagram).
type Crossing = (u64, u64, InFlight);

/// Where an event sits in the order a run on one thread takes them: (media segment,
/// time in ns since the epoch, kind: 0 a datagram, 1 a timer, 2 the media tick, key:
/// the datagram's tie-break key or the host). Two parts' logs merged by this order
/// are the log of the same run on one thread.
type Order = (u64, u64, u8, u64);

/// One host's pointers as a step left them, for the loop check to replay in order
/// (see [`Ctx::recheck`]).
#[derive(Debug)]
struct Change {
    order: Order,
    at: Duration,
    host: usize,
    /// The node's own invariants, if broken.
    broken: Option<String>,
    /// Every pointer of the host, if they changed since they were last logged.
    pairs: Option<Vec<(ForestKey, usize)>>,
}

/// The state of the hosts `lo..hi` that a step changes: their datagrams in flight and
/// timers, and the counters and records their steps add to. A run on several threads
/// gives each thread a part; between runs one part holds every host.
#[derive(Debug, Default)]
struct Part {
    /// The first host of the part (its hosts are the [`Ctx`]'s slice).
    lo: usize,
    /// Virtual time since the epoch.
    now: Duration,
    wire: Wire,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    stats: SimStats,
    copies: FastMap<(usize, usize, StreamId), Copies>,
    /// Hosts of the part with a route (a stream with children): where the silence
    /// hint looks.
    routed: std::collections::BTreeSet<usize>,
    /// Next media tick, since the epoch.
    next_media: Option<Duration>,
    /// Media ticks so far: the first field of [`Order`].
    segment: u64,
    /// Order of the event being stepped.
    order: Order,
    /// Datagrams for other parts' hosts, handed over at the end of each window.
    outbox: Vec<Crossing>,
    /// Pointer changes for the loop check, in step order.
    log: Vec<Change>,
    /// Frames the part's servers made: (stream, number, when).
    made: Vec<(StreamId, u32, Duration)>,
    /// Reused buffer of the control messages a host queued (see [`Ctx::drain`]).
    out_buf: Vec<(SocketAddr, Message)>,
    /// Reused buffer the control messages are encoded into.
    enc_buf: Vec<u8>,
}

impl std::ops::AddAssign for SimStats {
    /// Add another part's counters (a run on several threads counts per part).
    fn add_assign(&mut self, other: SimStats) {
        let s = self;
        s.control_sent += other.control_sent;
        s.media_sent += other.media_sent;
        s.nacks_sent += other.nacks_sent;
        s.frames_made += other.frames_made;
        s.lost += other.lost;
        s.no_route += other.no_route;
        s.dead_dest += other.dead_dest;
        s.codec_errors += other.codec_errors;
        s.steps += other.steps;
        s.loop_checks += other.loop_checks;
        s.loop_violations += other.loop_violations;
    }
}

/// A barrier for the threads of a run that any of them can break: a thread that stops
/// (the step bound, or a panic, through [`GateGuard`]) must not leave the others
/// waiting for it for ever.
#[derive(Debug)]
struct Gate {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicU64,
    broken: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Gate {
    fn new(threads: usize) -> Self {
        Self {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// Wait until every thread arrived; false if the gate is broken.
    fn wait(&self) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            self.arrived.store(0, Ordering::Relaxed);
            let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.generation.fetch_add(1, Ordering::Release);
            self.cv.notify_all();
        } else {
            let mut spins = 0u32;
            while self.generation.load(Ordering::Acquire) == generation {
                if self.broken.load(Ordering::Acquire) {
                    return false;
                }
                if spins < 4_000 {
                    spins += 1;
                    std::hint::spin_loop();
                    continue;
                }
                let g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
                if self.generation.load(Ordering::Acquire) == generation
                    && !self.broken.load(Ordering::Acquire)
                {
                    // A timeout, so that a wake-up lost to a race costs a millisecond.
                    let _ = self.cv.wait_timeout(g, Duration::from_millis(1));
                }
            }
        }
        !self.broken.load(Ordering::Acquire)
    }

    fn break_it(&self) {
        self.broken.store(true, Ordering::Release);
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.cv.notify_all();
    }
}

/// Breaks its gate when dropped while its thread unwinds from a panic.
struct GateGuard<'a>(&'a Gate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.break_it();
        }
    }
}

/// The shortest lookahead worth a thread per part: with shorter links between parts a
/// run stays on one thread (see [`Sim::threads`]).
const MIN_LOOKAHEAD: Duration = Duration::from_micros(200);

/// What the threads of a run share: the gate and each part's inbox.
struct Exchange {
    gate: Gate,
    inboxes: Vec<Mutex<Vec<Crossing>>>,
    /// The first host of each part.
    starts: Vec<usize>,
}

impl Exchange {
    /// The part host `i` belongs to.
    fn part_of(&self, i: usize) -> usize {
        part_of(&self.starts, i)
    }
}

/// The part host `i` belongs to, given the first host of each part.
fn part_of(starts: &[usize], i: usize) -> usize {
    starts.partition_point(|&s| s <= i).saturating_sub(1)
}

/// A virtual time (since the epoch) in nanoseconds, the calendar queue's unit.
fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a step reads and never changes: the network's shape and settings.
#[derive(Clone, Copy)]
struct Env<'a> {
    epoch: Instant,
    seed: u64,
    hosts: usize,
    links: &'a FastMap<(usize, usize), SimLink>,
    link_changes: u64,
    ids: &'a FastMap<String, usize>,
    names: &'a [String],
    servers: &'a [usize],
    media: MediaParams,
    silence_hint: Option<Duration>,
    check_loops: bool,
}

/// One part's hosts and state, and the network: everything a step needs.
struct Ctx<'a> {
    hosts: &'a mut [Host],
    p: &'a mut Part,
    env: Env<'a>,
}

/// The [`Env`] of a [`Sim`], borrowing its fields one by one (so that its hosts and
/// parts can be borrowed mutably beside it).
macro_rules! env_of {
    ($s:ident) => {
        Env {
            epoch: $s.epoch,
            seed: $s.seed,
            hosts: $s.hosts.len(),
            links: &$s.links,
            link_changes: $s.link_changes,
            ids: &$s.ids,
            names: &$s.names,
            servers: &$s.server_hosts,
            media: $s.media,
            silence_hint: $s.silence_hint,
            check_loops: $s.check_loops,
        }
    };
}

/// The simulated network. See the module docs.
pub struct Sim {
    epoch: Instant,
    seed: u64,
    hosts: Vec<Host>,
    index: BTreeMap<String, usize>,
    links: FastMap<(usize, usize), SimLink>,
    /// Links brought down or up so far: a datagram sent since the last change finds
    /// its link as it was (up) without looking it up.
    link_changes: u64,
    /// Hosts with the server role, in index order (the media tick's makers).
    server_hosts: Vec<usize>,
    /// Every host's state between runs (see [`Part`]).
    main: Part,
    started: bool,
    media: MediaParams,
    /// Hint nodes of an upstream silence this long ([`Sim::set_silence_hint`]).
    silence_hint: Option<Duration>,
    /// When each frame was made (since the start), by stream and frame number (the
    /// earliest, should two servers' numbers meet).
    frame_sent: FastMap<(StreamId, u32), Duration>,
    /// Per stream, when a frame of it was made (once per period, however many servers
    /// offer it).
    frame_times: BTreeMap<StreamId, Vec<Duration>>,
    hook: Option<Hook>,
    check_loops: bool,
    first_violation: Option<String>,
    /// Mirror of every running node's parent and upstream pointers, for the
    /// incremental loop check.
    forests: Forests,
    /// Host index by id (the sorted `index` is for ordered walks).
    ids: FastMap<String, usize>,
    /// Host id by index.
    names: Vec<String>,
    /// Threads a run may use (at least 1). With more than one, the hosts are split
    /// into as many parts, each stepped by its own thread through windows of virtual
    /// time as long as the shortest link between two parts; the output is the same as
    /// with one thread. A run with an [`Sim::on_step`] hook uses one, and so does a
    /// network whose parts would be joined by a link shorter than 200 µs (the windows
    /// would cost more than they gain).
    pub threads: usize,
    /// Most steps a single `run_until` may take before it panics, plus
    /// [`Sim::max_steps_per_host_second`] for each host and simulated second it runs.
    pub max_steps: u64,
    /// Steps each host may take per simulated second of a `run_until` beyond
    /// [`Sim::max_steps`] (a node with 15 neighbours takes about 700 with the default
    /// timings): the bound on a runaway simulation grows with the network, so that
    /// 100,000 nodes are not stopped for being many.
    pub max_steps_per_host_second: u64,
    /// Template for node configurations (id, role, data port and seed are overwritten).
    pub node_config: NodeConfig,
    /// Template for client configurations (the seed is overwritten).
    pub client_config: ClientConfig,
    /// Parameters of the link created between a client and each of its PoPs.
    pub access_link: LinkParams,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("now", &self.main.now)
            .field("hosts", &self.hosts.len())
            .field("links", &self.links.len())
            .field("stats", &self.main.stats)
            .finish_non_exhaustive()
    }
}

fn key(a: usize, b: usize) -> (usize, usize) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// The underlay path from `a` to `b` that is shortest by delay (as OSPF with delay
/// costs would route it), as the parameters of one link: delays and jitters add up,
/// losses combine. `None` if `b` cannot be reached.
fn underlay_path(t: &Topology, a: &str, b: &str) -> Option<LinkParams> {
    // Dijkstra over node indices; the graphs are small, a linear scan for the minimum
    // is enough.
    let n = t.nodes.len();
    let (src, dst) = (t.index_of(a)?, t.index_of(b)?);
    let mut dist = vec![f64::INFINITY; n];
    let mut via: Vec<Option<usize>> = vec![None; n];
    let mut done = vec![false; n];
    dist[src] = 0.0;
    loop {
        let u = (0..n)
            .filter(|&i| !done[i] && dist[i].is_finite())
            .min_by(|&x, &y| dist[x].total_cmp(&dist[y]).then(x.cmp(&y)))?;
        if u == dst {
            break;
        }
        done[u] = true;
        for (li, l) in t.links_of(&t.nodes[u].id) {
            let Some(v) = l.other_end(&t.nodes[u].id).and_then(|o| t.index_of(o)) else {
                continue;
            };
            let d = dist[u] + l.delay_ms.max(0.0);
            if d < dist[v] {
                dist[v] = d;
                via[v] = Some(li);
            }
        }
    }
    let (mut delay, mut jitter, mut keep) = (0.0, 0.0, 1.0);
    let mut at = dst;
    while at != src {
        let l = &t.links[via[at]?];
        delay += l.delay_ms.max(0.0);
        jitter += l.jitter_ms.max(0.0);
        keep *= 1.0 - (l.loss_pct / 100.0).clamp(0.0, 1.0);
        at = t.index_of(l.other_end(&t.nodes[at].id)?)?;
    }
    Some(LinkParams {
        latency: Duration::from_secs_f64(delay / 1e3),
        jitter: Duration::from_secs_f64(jitter / 1e3),
        loss: (1.0 - keep).clamp(0.0, 1.0),
    })
}

/// Parameters of [`Sim::random`]: a random connected overlay.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomOverlay {
    /// Overlay nodes, the server included (at least 2).
    pub nodes: usize,
    /// Average number of neighbours per node (at least 2).
    pub degree: usize,
    /// Fraction of the relays that are PoPs (default 0.1).
    pub pop_fraction: f64,
    /// Clients, each attached to three random PoPs (default 20).
    pub clients: usize,
    /// Link latencies are drawn uniformly from this range, ms (default 1..20).
    pub latency_ms: (u64, u64),
    /// Jitter of every link (default 0.5 ms).
    pub jitter: Duration,
    /// Seed of the graph, the link draws and every node.
    pub seed: u64,
}

impl RandomOverlay {
    /// `nodes` nodes of average degree `degree`, the other parameters at their defaults.
    pub fn new(nodes: usize, degree: usize, seed: u64) -> Self {
        Self {
            nodes,
            degree,
            pop_fraction: 0.1,
            clients: 20,
            latency_ms: (1, 20),
            jitter: Duration::from_micros(500),
            seed,
        }
    }
}

/// The name of the stream every server of [`Sim::random`] and [`Sim::from_topology`]
/// offers.
pub const SIM_STREAM: &str = "live";

impl Sim {
    /// An empty network whose randomness all derives from `seed`.
    pub fn new(seed: u64) -> Self {
        // The only clock read of the simulator: an arbitrary origin for virtual time,
        // never read again. tidy: allow(clock)
        let epoch = Instant::now();
        Self {
            epoch,
            seed,
            hosts: Vec::new(),
            index: BTreeMap::new(),
            links: FastMap::default(),
            server_hosts: Vec::new(),
            main: Part::default(),
            link_changes: 0,
            started: false,
            media: MediaParams::default(),
            silence_hint: None,
            frame_sent: FastMap::default(),
            frame_times: BTreeMap::new(),
            hook: None,
            check_loops: false,
            first_violation: None,
            forests: Forests::default(),
            ids: FastMap::default(),
            names: Vec::new(),
            threads: 1,
            max_steps: 50_000_000,
            max_steps_per_host_second: 5_000,
            node_config: NodeConfig::new("", Role::Relay, DATA_PORT),
            client_config: ClientConfig::default(),
            access_link: LinkParams::new(Duration::from_millis(1)),
        }
    }

    /// A network built from a topology file: one node per server, relay and PoP, one
    /// link per overlay neighbour pair. A pair joined by a direct link gets that link's
    /// delay, jitter and loss; a pair of an explicit `[[overlay]]` section that is
    /// several underlay hops apart gets the underlay path IP routing would use (shortest
    /// by delay): the sum of its delays and jitters and the combined loss of its links,
    /// or 2 ms if no path is found. Every server offers the stream [`SIM_STREAM`].
    /// Clients are not created: add them with [`Sim::add_client`] (the bootstrapper
    /// gives every client every PoP, see [`Sim::pop_ids`]).
    pub fn from_topology(t: &Topology, seed: u64) -> Self {
        let mut sim = Self::new(seed);
        for n in t.nodes.iter().filter(|n| n.role.is_overlay()) {
            sim.add_node(&n.id, n.role);
        }
        for n in t.nodes.iter().filter(|n| n.role.is_overlay()) {
            for m in t.overlay_neighbours(&n.id) {
                if n.id < m && sim.index.contains_key(&m) {
                    let params = match t.link_between(&n.id, &m) {
                        Some((_, l)) => LinkParams {
                            latency: Duration::from_secs_f64(l.delay_ms.max(0.0) / 1e3),
                            jitter: Duration::from_secs_f64(l.jitter_ms.max(0.0) / 1e3),
                            loss: (l.loss_pct / 100.0).clamp(0.0, 1.0),
                        },
                        None => underlay_path(t, &n.id, &m)
                            .unwrap_or_else(|| LinkParams::new(Duration::from_millis(2))),
                    };
                    sim.add_link(&n.id, &m, params);
                }
            }
        }
        let stream = StreamInfo::new(SIM_STREAM, ott_proto::MediaKind::Mjpeg, 25_000);
        for s in t.servers() {
            sim.set_catalogue(&s.id, vec![stream.clone()]);
        }
        sim
    }

    /// A random connected overlay: one server `s0`, relays `r<i>` and PoPs `p<i>`, a
    /// random spanning tree plus random extra links up to the average degree, and
    /// clients `c<i>` each given three random PoPs and watching [`SIM_STREAM`]. The
    /// same parameters always give the same network.
    pub fn random(p: &RandomOverlay) -> Self {
        let n = p.nodes.max(2);
        let mut rng = fastrand::Rng::with_seed(p.seed ^ 0x5eed_0f0e_71a7);
        let mut sim = Self::new(p.seed);
        let width = n.to_string().len();
        let mut ids = vec!["s0".to_owned()];
        let mut pops = Vec::new();
        for i in 1..n {
            let id = if rng.f64() < p.pop_fraction {
                let id = format!("p{i:0width$}");
                pops.push(id.clone());
                sim.add_node(&id, Role::Pop);
                id
            } else {
                let id = format!("r{i:0width$}");
                sim.add_node(&id, Role::Relay);
                id
            };
            ids.push(id);
        }
        sim.add_node("s0", Role::Server);
        if pops.is_empty() {
            // At least one PoP, so that clients have somewhere to go.
            let last = ids.len() - 1;
            let id = ids[last].clone();
            sim.hosts[sim.index[&id]].role = Some(Role::Pop);
            pops.push(id);
        }
        let (lo, hi) = p.latency_ms;
        let draw_link = |rng: &mut fastrand::Rng| LinkParams {
            latency: Duration::from_millis(rng.u64(lo.max(1)..hi.max(lo.max(1) + 1))),
            jitter: p.jitter,
            loss: 0.0,
        };
        let mut edges = 0usize;
        for i in 1..ids.len() {
            let j = rng.usize(..i);
            let params = draw_link(&mut rng);
            sim.add_link(&ids[i], &ids[j], params);
            edges += 1;
        }
        let target = n * p.degree.max(2) / 2;
        let mut attempts = 0;
        while edges < target && attempts < 20 * target {
            attempts += 1;
            let a = rng.usize(..ids.len());
            let b = rng.usize(..ids.len());
            let (ia, ib) = (sim.index[&ids[a]], sim.index[&ids[b]]);
            if a == b || sim.links.contains_key(&key(ia, ib)) {
                continue;
            }
            let params = draw_link(&mut rng);
            sim.add_link(&ids[a], &ids[b], params);
            edges += 1;
        }
        let stream = StreamInfo::new(SIM_STREAM, ott_proto::MediaKind::Mjpeg, 25_000);
        sim.set_catalogue("s0", vec![stream]);
        let cw = p.clients.to_string().len();
        for c in 0..p.clients {
            let mut mine: Vec<&str> = Vec::new();
            for _ in 0..3 {
                let pick = pops[rng.usize(..pops.len())].as_str();
                if !mine.contains(&pick) {
                    mine.push(pick);
                }
            }
            let id = format!("c{c:0cw$}");
            sim.add_client(&id, &mine);
            sim.select_stream(&id, SIM_STREAM);
        }
        sim
    }

    /// Virtual time elapsed since the start.
    pub fn elapsed(&self) -> Duration {
        self.main.now
    }

    /// The current virtual instant.
    pub fn now(&self) -> Instant {
        self.epoch + self.main.now
    }

    /// Period of the frames servers make (default 100 ms).
    pub fn media_period(&self) -> Duration {
        self.media.period
    }

    /// Change the period of the frames servers make.
    pub fn set_media_period(&mut self, d: Duration) {
        self.media.period = d.max(Duration::from_millis(1));
    }

    /// How the servers make media and the viewers play it (before [`Sim::start`]).
    pub fn media(&self) -> MediaParams {
        self.media
    }

    /// Change how the servers make media and the viewers play it (before
    /// [`Sim::start`]; viewers started later get the new latency budget).
    pub fn set_media(&mut self, m: MediaParams) {
        self.media = MediaParams {
            period: m.period.max(Duration::from_millis(1)),
            keyframe_every: m.keyframe_every.max(1),
            ..m
        };
    }

    /// Play the silence detector of the programs' control loop: at every media tick, a
    /// node whose data path received no live datagram of a stream for `after` is told
    /// with [`Node::handle_upstream_silent`]. Off (`None`) by default.
    pub fn set_silence_hint(&mut self, after: Option<Duration>) {
        self.silence_hint = after;
    }

    /// Network-wide counters.
    pub fn stats(&self) -> SimStats {
        self.main.stats
    }

    /// After every step, check loop freedom from the host that step changed (its own
    /// invariants, its parent chain towards every server and its subscription chain of
    /// every stream). Violations are counted in [`SimStats::loop_violations`] and the
    /// first one is kept ([`Sim::first_loop_violation`]).
    pub fn check_loops_each_step(&mut self, on: bool) {
        self.check_loops = on;
        if on {
            // Bring the mirror of every pointer up to date, checking each node.
            self.op(|c| {
                for i in 0..c.hosts.len() {
                    if c.hosts[i].role.is_some() {
                        c.recheck(i);
                    }
                }
            });
        }
    }

    /// Apply the pointer changes the steps logged, in the order given, to the
    /// forests, checking each (see [`Forests`]): the same checks, in the same order,
    /// as after each step of a run on one thread.
    fn replay(&mut self, log: Vec<Change>) {
        for c in log {
            let mut result = match c.broken {
                Some(e) => Err(e),
                None => Ok(()),
            };
            if let Some(mut pairs) = c.pairs {
                if let Err((k, cycle)) = self.forests.set_all(c.host, &mut pairs) {
                    let names: Vec<&str> = cycle.iter().map(|&x| self.names[x].as_str()).collect();
                    let what = match k {
                        ForestKey::Server(s) => format!("loop towards {}", self.names[s]),
                        ForestKey::Stream(st) => format!("subscription loop for {st:#x}"),
                    };
                    result = result.and(Err(format!("{what}: {}", names.join(" -> "))));
                }
            }
            if let Err(e) = result {
                self.main.stats.loop_violations += 1;
                if self.first_violation.is_none() {
                    self.first_violation = Some(format!("at {:?}: {e}", c.at));
                }
            }
        }
    }

    /// The first violation found by [`Sim::check_loops_each_step`], with its time.
    pub fn first_loop_violation(&self) -> Option<&str> {
        self.first_violation.as_deref()
    }

    fn idx(&self, id: &str) -> Option<usize> {
        self.ids.get(id).copied()
    }

    fn host(&self, id: &str) -> Option<&Host> {
        self.idx(id).and_then(|i| self.hosts.get(i))
    }

    fn add_host(&mut self, id: &str, role: Option<Role>, pops: Vec<String>) {
        assert!(!self.index.contains_key(id), "duplicate host {id}");
        let i = u32::try_from(self.hosts.len() + 1).unwrap_or(u32::MAX);
        let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
        let idx = self.hosts.len();
        self.index.insert(id.to_owned(), idx);
        self.ids.insert(id.to_owned(), idx);
        self.names.push(id.to_owned());
        if role == Some(Role::Server) {
            self.server_hosts.push(idx);
        }
        self.hosts.push(Host {
            id: id.to_owned(),
            ip,
            role,
            pops,
            machine: None,
            next_timeout: None,
            data_timeout: None,
            data_dirty: true,
            incarnation: 1,
            rng: fastrand::Rng::with_seed(splitmix64(self.seed ^ (idx as u64) << 24)),
            sent: 0,
            out: Vec::new(),
            forest_version: None,
            intact_at: None,
            catalogue: Vec::new(),
            forwarding: BTreeMap::new(),
            received: BTreeMap::new(),
            data: None,
            control_sent: 0,
            log: Vec::new(),
            selected: None,
        });
    }

    /// Add an overlay node (before [`Sim::start`]).
    pub fn add_node(&mut self, id: &str, role: Role) {
        self.add_host(id, Some(role), Vec::new());
    }

    /// Add a client attached to `pops` through [`Sim::access_link`] links. It starts at
    /// once if the simulation is running.
    pub fn add_client(&mut self, id: &str, pops: &[&str]) {
        self.add_host(id, None, pops.iter().map(|p| (*p).to_owned()).collect());
        let me = self.hosts.len() - 1;
        for p in pops {
            if let Some(pi) = self.idx(p) {
                let link = SimLink {
                    params: self.access_link,
                    up: true,
                };
                self.connect(me, pi, link);
            }
        }
        if self.started {
            self.boot(me);
        }
    }

    /// Add a link between two hosts (before [`Sim::start`] for nodes).
    pub fn add_link(&mut self, a: &str, b: &str, params: LinkParams) {
        let (Some(ia), Some(ib)) = (self.idx(a), self.idx(b)) else {
            panic!("add_link: unknown host {a} or {b}");
        };
        self.connect(ia, ib, SimLink { params, up: true });
    }

    /// Put `link` between hosts `a` and `b` (replacing the one there was, if any).
    fn connect(&mut self, a: usize, b: usize, link: SimLink) {
        self.mirror(a, b, link);
        self.links.insert(key(a, b), link);
    }

    /// Change the link between `a` and `b`, if there is one, in the map and in both
    /// hosts' copies.
    fn change_link(&mut self, a: &str, b: &str, change: impl FnOnce(&mut SimLink)) {
        let (Some(ia), Some(ib)) = (self.idx(a), self.idx(b)) else {
            return;
        };
        let Some(l) = self.links.get_mut(&key(ia, ib)) else {
            return;
        };
        change(l);
        let l = *l;
        self.mirror(ia, ib, l);
    }

    /// Write `link` into hosts `a`'s and `b`'s copies ([`Host::out`]).
    fn mirror(&mut self, a: usize, b: usize, link: SimLink) {
        for (x, y) in [(a, b), (b, a)] {
            // Host indices fit 32 bits (see `put_on_wire`).
            let y = y as u32;
            let out = &mut self.hosts[x].out;
            match out.iter_mut().find(|(d, _)| *d == y) {
                Some((_, l)) => *l = link,
                None => out.push((y, link)),
            }
        }
    }

    /// Change a link's parameters.
    pub fn set_link(&mut self, a: &str, b: &str, params: LinkParams) {
        self.change_link(a, b, |l| l.params = params);
    }

    /// The parameters of the link between `a` and `b`, if there is one.
    pub fn link_params(&self, a: &str, b: &str) -> Option<LinkParams> {
        let (ia, ib) = (self.idx(a)?, self.idx(b)?);
        self.links.get(&key(ia, ib)).map(|l| l.params)
    }

    /// Take a link down: everything sent over it is dropped.
    pub fn link_down(&mut self, a: &str, b: &str) {
        self.change_link(a, b, |l| l.up = false);
        self.link_changes += 1;
    }

    /// Bring a link back up.
    pub fn link_up(&mut self, a: &str, b: &str) {
        self.change_link(a, b, |l| l.up = true);
        self.link_changes += 1;
    }

    /// Whether the link between `a` and `b` exists and is up.
    pub fn link_is_up(&self, a: &str, b: &str) -> bool {
        match (self.idx(a), self.idx(b)) {
            (Some(ia), Some(ib)) => self.links.get(&key(ia, ib)).is_some_and(|l| l.up),
            _ => false,
        }
    }

    /// Ids of every link `(a, b)` with `a < b`, sorted.
    pub fn links(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .links
            .keys()
            .map(|&(a, b)| {
                let (x, y) = (&self.hosts[a].id, &self.hosts[b].id);
                if x <= y {
                    (x.clone(), y.clone())
                } else {
                    (y.clone(), x.clone())
                }
            })
            .collect();
        v.sort();
        v
    }

    /// Overlay neighbours of node `id` (links to other nodes, up or down), sorted.
    pub fn neighbours_of(&self, id: &str) -> Vec<String> {
        self.overlay_neighbours(id)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// Control address of a host.
    pub fn addr(&self, id: &str) -> Option<SocketAddr> {
        self.host(id)
            .map(|h| SocketAddr::new(IpAddr::V4(h.ip), CONTROL_PORT))
    }

    /// Set a server's catalogue (now, or at start).
    pub fn set_catalogue(&mut self, server: &str, streams: Vec<StreamInfo>) {
        let now = self.now();
        let Some(i) = self.idx(server) else {
            return;
        };
        let h = &mut self.hosts[i];
        h.catalogue = streams.clone();
        if let Some(Machine::Node(n)) = &mut h.machine {
            n.set_catalogue(now, streams);
        }
        self.op(|c| c.drain(i));
    }

    /// Create every state machine at the current time.
    pub fn start(&mut self) {
        self.started = true;
        self.main.next_media = Some(self.main.now + self.media.period);
        let order: Vec<usize> = self.index.values().copied().collect();
        for (rank, i) in order.into_iter().enumerate() {
            self.boot_ranked(i, rank as u64);
        }
    }

    fn overlay_neighbours(&self, id: &str) -> Vec<(String, SocketAddr)> {
        let Some(me) = self.idx(id) else {
            return Vec::new();
        };
        let mut v: Vec<(String, SocketAddr)> = self.hosts[me]
            .out
            .iter()
            .filter_map(|&(other, _)| {
                let h = &self.hosts[other as usize];
                h.role?;
                Some((
                    h.id.clone(),
                    SocketAddr::new(IpAddr::V4(h.ip), CONTROL_PORT),
                ))
            })
            .collect();
        v.sort();
        v
    }

    fn boot(&mut self, i: usize) {
        // The host's rank among the ids in sorted order.
        let id = self.hosts[i].id.as_str();
        let below = (std::ops::Bound::Unbounded, std::ops::Bound::Excluded(id));
        let rank = self.index.range::<str, _>(below).count() as u64;
        self.boot_ranked(i, rank);
    }

    /// [`Sim::boot`] given host `i`'s rank among the ids in sorted order.
    fn boot_ranked(&mut self, i: usize, rank: u64) {
        // A fresh node counts its pointer versions from 0 again.
        self.hosts[i].forest_version = None;
        self.hosts[i].intact_at = None;
        let now = self.now();
        let epoch = self.epoch;
        let id = self.hosts[i].id.clone();
        let seed = self.seed ^ rank;
        let neighbours = self.overlay_neighbours(&id);
        let pops: Vec<(String, SocketAddr)> = self.hosts[i]
            .pops
            .iter()
            .filter_map(|p| Some((p.clone(), self.addr(p)?)))
            .collect();
        let mut node_cfg = self.node_config.clone();
        let mut client_cfg = self.client_config.clone();
        let media = self.media;
        let h = &mut self.hosts[i];
        h.data = Some(Self::new_data(h.role, media));
        h.data_dirty = true;
        let machine = match h.role {
            Some(role) => {
                node_cfg.id = id;
                node_cfg.role = role;
                node_cfg.data_port = DATA_PORT;
                node_cfg.seed = seed;
                node_cfg.incarnation = h.incarnation;
                let mut n = Node::new(node_cfg, neighbours, epoch, now);
                if role == Role::Server {
                    n.set_catalogue(now, h.catalogue.clone());
                }
                Machine::Node(Box::new(n))
            }
            None => {
                client_cfg.seed = seed;
                let mut c = Client::new(client_cfg, pops, CLIENT_DATA_PORT, epoch, now);
                if let Some(s) = &h.selected {
                    c.select_stream(now, s);
                }
                Machine::Client(Box::new(c))
            }
        };
        h.machine = Some(machine);
        h.forwarding.clear();
        self.main.routed.remove(&i);
        self.op(|c| c.drain(i));
    }

    /// The data plane of a host starting afresh: a server's (its streams pinned, so the
    /// start cache fills while nobody watches, no NACKs: it has no upstream), a relay's
    /// or PoP's (NACKs upstream), or a viewer's (media only with a session key, NACKs to
    /// its PoP, the playout buffer), as the programs configure them.
    fn new_data(role: Option<Role>, m: MediaParams) -> Data {
        let path = match role {
            Some(Role::Server) => ott_datapath::DataPath::new(
                ott_datapath::Config {
                    nack: false,
                    ..ott_datapath::Config::default()
                },
                None,
            ),
            Some(_) => ott_datapath::DataPath::new(ott_datapath::Config::default(), None),
            None => {
                ott_datapath::DataPath::for_viewer(ott_datapath::Config::viewer(true, m.latency))
            }
        };
        Data {
            path,
            playout: role.is_none().then(|| {
                PlayoutBuffer::new(PlayoutConfig {
                    budget: m.latency,
                    ..PlayoutConfig::default()
                })
            }),
            watching: None,
            packetizers: Vec::new(),
        }
    }

    /// Crash a host: it stops at once, without a word to anyone.
    pub fn kill(&mut self, id: &str) {
        if let Some(i) = self.idx(id) {
            let h = &mut self.hosts[i];
            h.machine = None;
            h.data = None;
            h.data_dirty = true;
            h.next_timeout = None;
            h.forwarding.clear();
            h.forest_version = None;
            h.intact_at = None;
            self.main.routed.remove(&i);
            self.forests.clear(i);
        }
    }

    /// Restart a killed host with a higher incarnation and a fresh state.
    pub fn restart(&mut self, id: &str) {
        let us = u64::try_from(self.elapsed().as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = self.idx(id) {
            // Like a real node's start time in microseconds: grows faster than the
            // number of announcements a server makes.
            let h = &mut self.hosts[i];
            h.incarnation = (h.incarnation + 1).max(us);
            self.boot(i);
        }
    }

    /// Shut a host down cleanly (`Bye`, `Leave`), then stop it.
    pub fn shutdown(&mut self, id: &str) {
        let now = self.now();
        let Some(i) = self.idx(id) else {
            return;
        };
        match &mut self.hosts[i].machine {
            Some(Machine::Node(n)) => n.shutdown(now),
            Some(Machine::Client(c)) => c.shutdown(now),
            None => {}
        }
        self.op(|c| c.drain(i));
        self.kill(id);
    }

    /// Make a client watch `name`.
    pub fn select_stream(&mut self, client: &str, name: &str) {
        let now = self.now();
        let Some(i) = self.idx(client) else {
            return;
        };
        let h = &mut self.hosts[i];
        h.selected = Some(name.to_owned());
        if let Some(Machine::Client(c)) = &mut h.machine {
            c.select_stream(now, name);
        }
        self.op(|c| c.drain(i));
    }

    /// A running node. Panics if `id` is not a running node (a test bug).
    pub fn node(&self, id: &str) -> &Node {
        match self.host(id).and_then(|h| h.machine.as_ref()) {
            Some(Machine::Node(n)) => n,
            _ => panic!("{id} is not a running node"),
        }
    }

    /// A running node, or `None`.
    pub fn try_node(&self, id: &str) -> Option<&Node> {
        match self.host(id).and_then(|h| h.machine.as_ref()) {
            Some(Machine::Node(n)) => Some(n),
            _ => None,
        }
    }

    /// A running client. Panics if `id` is not a running client (a test bug).
    pub fn client(&self, id: &str) -> &Client {
        match self.host(id).and_then(|h| h.machine.as_ref()) {
            Some(Machine::Client(c)) => c,
            _ => panic!("{id} is not a running client"),
        }
    }

    /// Whether `id` is running.
    pub fn is_running(&self, id: &str) -> bool {
        self.host(id).is_some_and(|h| h.machine.is_some())
    }

    /// Role of node `id` (`None` for a client or an unknown id).
    pub fn role(&self, id: &str) -> Option<Role> {
        self.host(id).and_then(|h| h.role)
    }

    /// Ids of all nodes (not clients), sorted.
    pub fn node_ids(&self) -> Vec<String> {
        self.index
            .iter()
            .filter(|(_, &i)| self.hosts[i].role.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ids of all clients, sorted.
    pub fn client_ids(&self) -> Vec<String> {
        self.index
            .iter()
            .filter(|(_, &i)| self.hosts[i].role.is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The PoPs client `id` was given (empty for a node or an unknown id).
    pub fn pops_of(&self, id: &str) -> &[String] {
        self.host(id).map_or(&[], |h| &h.pops)
    }

    /// Ids of all PoPs, sorted.
    pub fn pop_ids(&self) -> Vec<String> {
        self.ids_with_role(Role::Pop)
    }

    /// Ids of all nodes with this role, sorted.
    pub fn ids_with_role(&self, role: Role) -> Vec<String> {
        self.index
            .iter()
            .filter(|(_, &i)| self.hosts[i].role == Some(role))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The subscription chain of `stream` from node `from` upwards: `from`, its upstream,
    /// that node's upstream, ... as far as running nodes go (normally to a server).
    /// Empty if `from` is not a running node; stops before a node already in the chain.
    pub fn stream_path(&self, from: &str, stream: StreamId) -> Vec<String> {
        let mut path: Vec<String> = Vec::new();
        let mut cur = self.try_node(from).map(|_| from.to_owned());
        while let Some(id) = cur.take() {
            if path.contains(&id) {
                break;
            }
            cur = self
                .try_node(&id)
                .and_then(|n| n.upstream(stream))
                .filter(|up| self.try_node(up).is_some())
                .map(str::to_owned);
            path.push(id);
        }
        path
    }

    /// Control datagrams sent by `id` so far.
    pub fn control_messages_sent(&self, id: &str) -> u64 {
        self.host(id).map_or(0, |h| h.control_sent)
    }

    /// Media of `stream` received by host `id`: frames played (released whole by the
    /// playout buffer) for a client, frames started (first fragments accepted by the data
    /// path) for a node.
    pub fn received(&self, id: &str, stream: StreamId) -> u64 {
        self.host(id)
            .and_then(|h| h.received.get(&stream))
            .map_or(0, |r| r.count)
    }

    /// When client `id` played each frame of `stream`, as times since the start.
    pub fn arrivals(&self, id: &str, stream: StreamId) -> &[Duration] {
        self.host(id)
            .and_then(|h| h.received.get(&stream))
            .map_or(&[], |r| r.arrivals.as_slice())
    }

    /// The first time client `id` played a frame of `stream` at or after `t` (since the
    /// start).
    pub fn first_arrival_after(&self, id: &str, stream: StreamId, t: Duration) -> Option<Duration> {
        let a = self.arrivals(id, stream);
        let i = a.partition_point(|x| *x < t);
        a.get(i).copied()
    }

    /// The longest time client `id` went without playing a frame of `stream` between
    /// `from` and `to` (since the start); `to - from` if it played none.
    pub fn longest_gap(
        &self,
        id: &str,
        stream: StreamId,
        from: Duration,
        to: Duration,
    ) -> Duration {
        let mut last = from;
        let mut worst = Duration::ZERO;
        for &t in self.arrivals(id, stream) {
            if t < from {
                continue;
            }
            if t > to {
                break;
            }
            worst = worst.max(t - last);
            last = t;
        }
        worst.max(to.saturating_sub(last))
    }

    /// Media datagrams of `stream` sent from `from` to `to` so far.
    pub fn media_sent(&self, from: &str, to: &str, stream: StreamId) -> u64 {
        match (self.idx(from), self.idx(to)) {
            (Some(a), Some(b)) => self.main.copies.get(&(a, b, stream)).map_or(0, |c| c.total),
            _ => 0,
        }
    }

    /// The largest number of copies of one live media datagram (not resent, not
    /// replayed from a start cache) any directed link carried.
    pub fn max_copies_per_link(&self) -> u64 {
        self.main
            .copies
            .values()
            .map(|c| c.max_per_datagram)
            .max()
            .unwrap_or(0)
    }

    /// Frames of `stream` made between `from` and `to` (since the start) that client
    /// `id` played whole, and how many were made then while it was attached (from the
    /// making of the first frame it played on): `(intact, expected)`. Frames still on
    /// their way or waiting in the playout buffer count as missing, so leave them time
    /// (a path's delay and the latency budget) before `to`.
    pub fn frames_intact(
        &self,
        id: &str,
        stream: StreamId,
        from: Duration,
        to: Duration,
    ) -> (u64, u64) {
        let Some(r) = self.host(id).and_then(|h| h.received.get(&stream)) else {
            return (0, 0);
        };
        let played: Vec<Duration> = r
            .played
            .iter()
            .filter_map(|&n| self.frame_sent.get(&(stream, n)).copied())
            .collect();
        let Some(&first) = played.first() else {
            return (0, 0);
        };
        let from = from.max(first);
        if to <= from {
            return (0, 0);
        }
        let made = self.frame_times.get(&stream).map_or(&[][..], Vec::as_slice);
        let expected = made.iter().filter(|t| (from..to).contains(*t)).count() as u64;
        let intact = played.iter().filter(|t| (from..to).contains(*t)).count() as u64;
        // Two servers' copies of one period both played (a source switch) count once.
        (intact.min(expected), expected)
    }

    /// Frames client `id` played whose bytes were not those the server made (always 0
    /// unless the data plane corrupts media).
    pub fn frames_corrupt(&self, id: &str, stream: StreamId) -> u64 {
        self.host(id)
            .and_then(|h| h.received.get(&stream))
            .map_or(0, |r| r.corrupt)
    }

    /// The data plane of running host `id` (`None` for a dead or unknown host).
    pub fn data_path(&self, id: &str) -> Option<&DataPath> {
        self.host(id).and_then(|h| h.data.as_ref()).map(|d| &d.path)
    }

    /// Control messages a client sent, as `"<kind> <to>"` lines (e.g. `"join n5"`).
    pub fn client_log(&self, id: &str) -> &[String] {
        self.host(id).map_or(&[], |h| &h.log)
    }

    /// Call `f` after every step of the simulation.
    pub fn on_step(&mut self, f: impl FnMut(&Self) + 'static) {
        self.hook = Some(Box::new(f));
    }

    /// Run until virtual time `t` (relative to the start).
    ///
    /// Panics, naming the step count, if more steps are needed than [`Sim::max_steps`]
    /// and [`Sim::max_steps_per_host_second`] allow.
    pub fn run_until(&mut self, t: Duration) {
        let seconds = t.saturating_sub(self.main.now).as_secs() + 1;
        let limit = (self.hosts.len() as u64)
            .saturating_mul(self.max_steps_per_host_second)
            .saturating_mul(seconds)
            .saturating_add(self.max_steps);
        match self.split_for_run() {
            Some((parts, look)) => self.run_parts(parts, look, t, limit),
            None => self.run_alone(t, limit),
        }
        self.main.now = self.main.now.max(t);
    }

    /// Run for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let t = self.elapsed() + d;
        self.run_until(t);
    }

    /// Run `f` on every host as one part (between runs), then check the pointer
    /// changes it logged.
    fn op<R>(&mut self, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        let env = env_of!(self);
        let r = f(&mut Ctx {
            hosts: &mut self.hosts,
            p: &mut self.main,
            env,
        });
        let log = std::mem::take(&mut self.main.log);
        self.replay(log);
        r
    }

    /// One thread steps every host until `t`.
    fn run_alone(&mut self, t: Duration, limit: u64) {
        let mut steps = 0u64;
        loop {
            let env = env_of!(self);
            let mut c = Ctx {
                hosts: &mut self.hosts,
                p: &mut self.main,
                env,
            };
            let hooked = self.hook.is_some();
            let mut more = false;
            while c.step(t, true, true) {
                steps += 1;
                assert!(
                    steps <= limit,
                    "simulation did not reach {t:?} after {steps} steps (now {:?})",
                    c.p.now
                );
                if hooked {
                    more = true;
                    break;
                }
            }
            let log = std::mem::take(&mut self.main.log);
            self.replay(log);
            self.record_made();
            if !more {
                return;
            }
            if let Some(mut hook) = self.hook.take() {
                hook(self);
                self.hook = Some(hook);
            }
        }
    }

    /// How to split the hosts for a run on [`Sim::threads`] threads: the parts (each
    /// with its share of the datagrams in flight and timers) and the lookahead (the
    /// shortest link between two parts); `None` for one thread.
    ///
    /// The parts are ranges of consecutive hosts of about the same work: a host's
    /// steps grow with its links (heartbeats and acks), and in a random overlay the
    /// first hosts have the most.
    fn split_for_run(&mut self) -> Option<(Vec<Part>, Duration)> {
        let n = self.hosts.len();
        let k = self.threads.min(n / 2).max(1);
        if k < 2 || self.hook.is_some() {
            return None;
        }
        let weight = |i: usize| self.hosts[i].out.len() as u64 + 1;
        let total: u64 = (0..n).map(weight).sum();
        let mut starts = vec![0];
        let mut acc = 0u64;
        for i in 0..n {
            if starts.len() < k && acc * k as u64 >= total * starts.len() as u64 {
                starts.push(i);
            }
            acc += weight(i);
        }
        let part_of = |i: usize| part_of(&starts, i);
        let look = self
            .links
            .iter()
            .filter(|(&(a, b), _)| part_of(a) != part_of(b))
            .map(|(_, l)| l.params.latency)
            .min()
            .unwrap_or(Duration::MAX);
        // Windows shorter than this cost more at the barrier than a second thread
        // gains (links of a few microseconds between parts).
        if look < MIN_LOOKAHEAD || starts.len() < 2 {
            return None;
        }
        let m = &mut self.main;
        let mut parts: Vec<Part> = starts
            .iter()
            .map(|&lo| Part {
                lo,
                now: m.now,
                next_media: m.next_media,
                segment: m.segment,
                ..Part::default()
            })
            .collect();
        for (at, key, f) in m.wire.drain_all() {
            parts[part_of(f.dst as usize)].wire.push(at, key, f);
        }
        for Reverse((t, i)) in std::mem::take(&mut m.timers).into_vec() {
            parts[part_of(i)].timers.push(Reverse((t, i)));
        }
        for i in std::mem::take(&mut m.routed) {
            parts[part_of(i)].routed.insert(i);
        }
        for (k, c) in m.copies.drain() {
            parts[part_of(k.0)].copies.insert(k, c);
        }
        Some((parts, look))
    }

    /// Step each part on a thread of its own until `t`, then gather the parts again.
    fn run_parts(&mut self, mut parts: Vec<Part>, look: Duration, t: Duration, limit: u64) {
        let x = Exchange {
            gate: Gate::new(parts.len()),
            inboxes: parts.iter().map(|_| Mutex::new(Vec::new())).collect(),
            starts: parts.iter().map(|p| p.lo).collect(),
        };
        let env = env_of!(self);
        // Each part's hosts, cut from the end.
        let mut slices = Vec::with_capacity(parts.len());
        let mut rest: &mut [Host] = &mut self.hosts;
        for p in parts.iter().rev() {
            let (a, b) = rest.split_at_mut(p.lo);
            slices.push(b);
            rest = a;
        }
        slices.reverse();
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = slices
                .into_iter()
                .zip(parts.iter_mut())
                .enumerate()
                .map(|(me, (hosts, p))| {
                    let x = &x;
                    s.spawn(move || {
                        let _guard = GateGuard(&x.gate);
                        Ctx { hosts, p, env }.run_windows(t, look, x, me, limit)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        // Gather: every part ends its last window at `t`.
        let m = &mut self.main;
        let mut log = Vec::new();
        for (q, mut p) in parts.into_iter().enumerate() {
            if q == 0 {
                m.now = p.now;
                m.next_media = p.next_media;
                m.segment = p.segment;
            }
            m.stats += p.stats;
            for (at, key, f) in p.wire.drain_all() {
                m.wire.push(at, key, f);
            }
            m.timers.extend(p.timers.into_vec());
            m.routed.extend(p.routed);
            m.copies.extend(p.copies);
            m.made.append(&mut p.made);
            log.append(&mut p.log);
        }
        // The order a run on one thread takes (each part's log is in it already).
        log.sort_by_key(|c| c.order);
        self.replay(log);
        self.record_made();
        if let Some(e) = results.into_iter().find_map(Result::err) {
            panic!("{e}");
        }
    }

    /// Move the frames the servers made into the record [`Sim::frames_intact`] reads.
    fn record_made(&mut self) {
        if self.main.made.is_empty() {
            return;
        }
        let mut made = std::mem::take(&mut self.main.made);
        made.sort_unstable_by_key(|&(s, _, t)| (s, t));
        for (s, n, t) in made {
            let e = self.frame_sent.entry((s, n)).or_insert(t);
            *e = (*e).min(t);
            let times = self.frame_times.entry(s).or_default();
            if times.last().is_none_or(|&l| l < t) {
                times.push(t);
            }
        }
    }
}

impl Ctx<'_> {
    /// Host `i` (of this part).
    fn h(&mut self, i: usize) -> &mut Host {
        &mut self.hosts[i - self.p.lo]
    }

    /// Whether host `i` is one of this part's.
    fn mine(&self, i: usize) -> bool {
        i >= self.p.lo && i - self.p.lo < self.hosts.len()
    }

    fn now(&self) -> Instant {
        self.env.epoch + self.p.now
    }

    /// Step windows of virtual time until `t`, handing the datagrams for other parts
    /// over at the end of each; a window is never longer than `look`, the shortest
    /// link between two parts, so nothing sent in a window arrives in it elsewhere.
    /// Ends at a media tick (after every event at that instant, as on one thread) or
    /// at `t` (included).
    fn run_windows(
        &mut self,
        t: Duration,
        look: Duration,
        x: &Exchange,
        me: usize,
        limit: u64,
    ) -> Result<(), String> {
        let mut steps = 0u64;
        loop {
            let lim = self.p.now.saturating_add(look);
            let (hi, inclusive, tick) = match self.p.next_media {
                Some(m) if m <= t && m < lim => (m, true, true),
                _ if t < lim => (t, true, false),
                _ => (lim, false, false),
            };
            while self.step(hi, inclusive, false) {
                steps += 1;
                if steps > limit {
                    x.gate.break_it();
                    return Err(format!(
                        "simulation did not reach {t:?} after {steps} steps of one part (now {:?})",
                        self.p.now
                    ));
                }
            }
            self.p.now = self.p.now.max(hi);
            if tick {
                // One step of a run on one thread, counted once.
                if self.p.lo == 0 {
                    self.p.stats.steps += 1;
                }
                self.media_tick();
            }
            let mut out = std::mem::take(&mut self.p.outbox);
            out.sort_unstable_by_key(|f| f.2.dst);
            let mut it = out.drain(..).peekable();
            while let Some(f) = it.next() {
                let q = x.part_of(f.2.dst as usize);
                let Some(inbox) = x.inboxes.get(q) else {
                    continue;
                };
                let mut inbox = inbox.lock().unwrap_or_else(PoisonError::into_inner);
                inbox.push(f);
                while let Some(g) = it.next_if(|g| x.part_of(g.2.dst as usize) == q) {
                    inbox.push(g);
                }
            }
            drop(it);
            self.p.outbox = out;
            if !x.gate.wait() {
                return Err("another part of the simulation stopped".to_owned());
            }
            let inbox = match x.inboxes.get(me) {
                Some(m) => std::mem::take(&mut *m.lock().unwrap_or_else(PoisonError::into_inner)),
                None => Vec::new(),
            };
            for (at, key, f) in inbox {
                self.p.wire.push(at, key, f);
            }
            if !tick && inclusive && hi == t {
                return Ok(());
            }
        }
    }

    /// The earliest live timer, dropping stale heap entries.
    fn next_timer(&mut self) -> Option<(Instant, usize)> {
        while let Some(&Reverse((t, i))) = self.p.timers.peek() {
            if self.h(i).next_timeout == Some(t) {
                return Some((t, i));
            }
            self.p.timers.pop();
        }
        None
    }

    /// One step: deliver the earliest datagram, or fire the earliest timer, or (if
    /// `with_media`) the media tick, if it is before `bound` (or at it, if
    /// `inclusive`). Returns false when nothing is left before it.
    fn step(&mut self, bound: Duration, inclusive: bool, with_media: bool) -> bool {
        let epoch = self.env.epoch;
        let wire = self.p.wire.peek();
        let timer = self.next_timer();
        let timer_ns = timer.map(|(t, _)| ns(t.saturating_duration_since(epoch)));
        let media = self.p.next_media.filter(|_| with_media).map(ns);
        let Some(next) = [wire, timer_ns, media].into_iter().flatten().min() else {
            return false;
        };
        let b = ns(bound);
        if next > b || (next == b && !inclusive) {
            return false;
        }
        self.p.now = self.p.now.max(Duration::from_nanos(next));
        self.p.stats.steps += 1;
        let segment = self.p.segment;
        if wire == Some(next) {
            if let Some((key, f)) = self.p.wire.pop() {
                self.hint_upcoming();
                self.p.order = (segment, next, 0, key);
                self.deliver(f);
            }
        } else if let Some((t, i)) = timer.filter(|_| timer_ns == Some(next)) {
            self.p.order = (segment, next, 1, i as u64);
            self.p.timers.pop();
            let now = self.now().max(t);
            let due = |x: Option<Instant>| x.is_some_and(|x| x <= now);
            let h = self.h(i);
            // The host's timer is the earliest of its state machines' timers: fire those
            // that are due.
            let mut control = false;
            match &mut h.machine {
                Some(Machine::Node(n)) if due(n.poll_timeout()) => {
                    n.handle_timeout(now);
                    control = true;
                }
                Some(Machine::Client(c)) if due(c.poll_timeout()) => c.handle_timeout(now),
                _ => {}
            }
            // The data plane (its timer and a viewer's playout deadlines) only if its
            // timer is due: most timers are the tree's (heartbeats), and the data plane
            // is several cache lines away.
            let data_timeout = if h.data_dirty {
                h.data.as_ref().and_then(Data::poll_timeout)
            } else {
                h.data_timeout
            };
            if due(data_timeout) {
                if let Some(d) = &mut h.data {
                    if due(d.path.poll_timeout()) {
                        d.path.handle_timeout(now);
                    }
                }
                h.data_dirty = true;
                self.play(i);
            }
            if control || self.h(i).role.is_none() {
                self.drain(i);
            } else {
                self.flush_data(i, &[]);
                self.rearm(i);
            }
        } else {
            self.media_tick();
        }
        true
    }

    /// Prefetch what the next datagrams' steps will read first, in stages a step
    /// apart, each reading only what the stage before brought in: three datagrams ahead
    /// the receiving host and the datagram, two ahead the node and the datagram's
    /// shared bytes, next the node's neighbour table, queues and those bytes. At 10,000 nodes
    /// each of these is a cache miss a step would otherwise wait for.
    fn hint_upcoming(&self) {
        use ott_overlay::hint::prefetch;
        let (w, lo) = (&self.p.wire, self.p.lo);
        let host = |dst: usize| self.hosts.get(dst.wrapping_sub(lo));
        let node = |dst: usize| match host(dst).map(|h| &h.machine) {
            Some(Some(Machine::Node(n))) => Some(&**n),
            _ => None,
        };
        if let Some((f, dst)) = w.upcoming(2) {
            ott_overlay::hint::prefetch_all(f);
            if let Some(h) = host(dst) {
                // The fields a step reads (the rest, the data plane above all, only
                // when media or its timer come).
                prefetch(&h.machine);
                prefetch(&h.sent);
                prefetch(&h.out);
                prefetch(&h.ip);
                prefetch(&h.role);
                prefetch(&h.next_timeout);
                prefetch(&h.forest_version);
                prefetch(&h.intact_at);
                prefetch(&h.control_sent);
                prefetch(&h.forwarding);
                prefetch(&h.log);
            }
        }
        if let Some((f, dst)) = w.upcoming(1) {
            if let Some(Payload::Control(d)) = f.as_ref().map(|f| &f.payload) {
                prefetch(&**d);
            }
            if let Some(n) = node(dst) {
                n.prefetch_self();
            }
        }
        if let Some((f, dst)) = w.upcoming(0) {
            if let Some(Payload::Control(d)) = f.as_ref().map(|f| &f.payload) {
                prefetch(d.bytes.as_slice());
            }
            if let Some(n) = node(dst) {
                n.prefetch_inner();
            }
            // The links its answers will go out on.
            if let Some(h) = host(dst) {
                prefetch(h.out.as_slice());
            }
        }
    }

    /// Every server of the part makes one frame of each stream of its catalogue (the
    /// real packetizer cuts it into datagrams, its data path keeps them for
    /// retransmission and its start cache and queues them to the stream's children);
    /// then the silence hint, if on. Ends the media segment.
    fn media_tick(&mut self) {
        self.p.next_media = Some(self.p.now + self.env.media.period);
        let now = self.now();
        let elapsed = self.p.now;
        let m = self.env.media;
        let seed = self.env.seed;
        let servers = self.env.servers;
        let at = ns(elapsed);
        let (lo, n) = (self.p.lo, self.hosts.len());
        for &i in servers.iter().filter(|&&i| i >= lo && i - lo < n) {
            self.p.order = (self.p.segment, at, 2, i as u64);
            let h = &mut self.hosts[i - lo];
            if h.role != Some(Role::Server) || h.machine.is_none() {
                continue;
            }
            h.data_dirty = true;
            let Some(d) = &mut h.data else {
                continue;
            };
            let mut made: Vec<Bytes> = Vec::new();
            for s in &h.catalogue {
                let p = match d.packetizers.iter().position(|(id, _)| *id == s.id) {
                    Some(k) => &mut d.packetizers[k].1,
                    None => {
                        d.path.pin_stream(s.id);
                        // Another server's copy, or a restarted server's, lives in another
                        // number space (as the programs' random first numbers make it).
                        let r =
                            splitmix64(seed ^ (i as u64) << 20 ^ h.incarnation ^ u64::from(s.id));
                        let p = Packetizer::for_kind_at(s.id, s.kind, r as u32, (r >> 40) as u32);
                        d.packetizers.push((s.id, p));
                        let last = d.packetizers.len() - 1;
                        &mut d.packetizers[last].1
                    }
                };
                let number = p.next_frame();
                let fl = if number % m.keyframe_every == 0 {
                    flags::KEYFRAME
                } else {
                    0
                };
                let Ok(datagrams) = p.packetize(
                    &synthetic_frame(number, m.frame_len),
                    number.wrapping_mul(3600),
                    fl,
                ) else {
                    continue;
                };
                self.p.made.push((s.id, number, elapsed));
                self.p.stats.frames_made += 1;
                let base = made.len();
                for (k, dg) in datagrams.iter().enumerate() {
                    let _ = d.path.handle_local(now, dg, base + k);
                }
                made.extend(datagrams);
            }
            self.flush_data(i, &made);
            self.rearm(i);
        }
        if let Some(after) = self.env.silence_hint {
            let mut hinted = Vec::new();
            let routed: Vec<usize> = self.p.routed.iter().copied().collect();
            for i in routed {
                let h = &mut self.hosts[i - lo];
                let (Some(Machine::Node(n)), Some(d)) = (&mut h.machine, &h.data) else {
                    continue;
                };
                for stream in n.stream_ids() {
                    let Some(up) = n.upstream(stream).map(str::to_owned) else {
                        continue;
                    };
                    let Some(last) = d.path.stream(stream).and_then(|s| s.last_live_in) else {
                        continue;
                    };
                    if now.saturating_duration_since(last) >= after {
                        n.handle_upstream_silent(now, &up, stream, last);
                        hinted.push(i);
                    }
                }
            }
            hinted.dedup();
            for i in hinted {
                self.p.order = (self.p.segment, at, 2, i as u64);
                self.drain(i);
            }
        }
        self.p.segment += 1;
    }

    /// Put a media datagram from host `from` on the link to `to`, counting copies.
    fn send_media(&mut self, from: usize, to: SocketAddr, datagram: Bytes) {
        let Some(dst) = self.dest(to) else {
            self.p.stats.dead_dest += 1;
            return;
        };
        if let Ok(h) = MediaHeader::parse(&datagram) {
            let c = self.p.copies.entry((from, dst, h.stream)).or_default();
            c.total += 1;
            if !h.has(flags::RETRANSMIT) && !h.has(flags::CACHED) {
                if c.last_seq == Some(h.seq) {
                    c.in_a_row += 1;
                } else {
                    c.last_seq = Some(h.seq);
                    c.in_a_row = 1;
                }
                c.max_per_datagram = c.max_per_datagram.max(c.in_a_row);
            }
        }
        self.p.stats.media_sent += 1;
        let h = self.h(from);
        let from_addr = SocketAddrV4::new(h.ip, data_port_of(h));
        self.put_on_wire(from, from_addr, to, Payload::Media(datagram));
    }

    /// Send what host `i`'s data path queued: media (`inputs` are the datagrams its
    /// [`ott_datapath::Payload::Input`] tokens name) and NACKs, encoded as the programs
    /// encode them, from its data address.
    fn flush_data(&mut self, i: usize, inputs: &[Bytes]) {
        let h = self.h(i);
        if !h.data_dirty {
            // Not called since its transmits were last drained: none are queued.
            return;
        }
        let Some(d) = h.data.as_mut() else {
            return;
        };
        let out: Vec<ott_datapath::Transmit> = d.path.drain_transmits().collect();
        if out.is_empty() {
            return;
        }
        let port = data_port_of(h);
        let from_addr = SocketAddrV4::new(h.ip, port);
        for t in out {
            match t.payload {
                DataPayload::Input { token, len } => {
                    if let Some(b) = inputs.get(token) {
                        self.send_media(i, t.to, b.slice(..len.min(b.len())));
                    }
                }
                DataPayload::Bytes(b) => self.send_media(i, t.to, b),
                DataPayload::Nack { stream, ranges } => {
                    let msg = Message::Nack {
                        stream,
                        data_port: port,
                        ranges,
                    };
                    let Ok(bytes) = ott_proto::encode(&msg) else {
                        self.p.stats.codec_errors += 1;
                        continue;
                    };
                    self.p.stats.nacks_sent += 1;
                    self.put_on_wire(i, from_addr, t.to, control_payload(&bytes));
                }
            }
        }
    }

    /// A viewer plays what its playout buffer releases.
    fn play(&mut self, i: usize) {
        let now = self.now();
        let elapsed = self.p.now;
        let len = self.env.media.frame_len;
        let h = self.h(i);
        let Some(d) = &mut h.data else {
            return;
        };
        let (Some(p), Some(stream)) = (&mut d.playout, d.watching) else {
            return;
        };
        while let Some(frame) = p.poll_frame(now) {
            let r = h.received.entry(stream).or_default();
            r.count += 1;
            r.arrivals.push(elapsed);
            r.played.push(frame.number);
            if frame.data[..] != synthetic_frame(frame.number, len)[..] {
                r.corrupt += 1;
            }
        }
    }

    /// The host with address `ip`: host `k` has `10.a.b.c` with `a.b.c` = `k + 1` (see
    /// [`Sim::add_host`]), so no map is needed.
    fn by_ip(&self, ip: Ipv4Addr) -> Option<usize> {
        let [ten, a, b, c] = ip.octets();
        if ten != 10 {
            return None;
        }
        let k = ((usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c)).checked_sub(1)?;
        (k < self.env.hosts).then_some(k)
    }

    fn dest(&self, to: SocketAddr) -> Option<usize> {
        match to.ip() {
            IpAddr::V4(ip) => self.by_ip(ip),
            IpAddr::V6(_) => None,
        }
    }
    fn put_on_wire(&mut self, from: usize, from_addr: SocketAddrV4, to: SocketAddr, p: Payload) {
        let Some(dst) = self.dest(to) else {
            self.p.stats.dead_dest += 1;
            return;
        };
        let h = self.h(from);
        let link = h
            .out
            .iter()
            .find(|(d, _)| *d as usize == dst)
            .map(|(_, l)| *l);
        debug_assert_eq!(
            link.map(|l| (l.up, l.params)),
            self.env
                .links
                .get(&key(from, dst))
                .map(|l| (l.up, l.params)),
            "a host's copy of its links out of step"
        );
        let Some(SimLink { params, up: true }) = link else {
            self.p.stats.no_route += 1;
            return;
        };
        let h = self.h(from);
        if params.loss > 0.0 && h.rng.f64() < params.loss {
            self.p.stats.lost += 1;
            return;
        }
        let jitter = if params.jitter.is_zero() {
            Duration::ZERO
        } else {
            params.jitter.mul_f64(h.rng.f64())
        };
        // The tie-break between datagrams arriving at the same instant: the sender,
        // then its own count (a run's order does not depend on how hosts are split).
        h.sent += 1;
        let seq = (from as u64) << 40 | (h.sent & ((1 << 40) - 1));
        let at = self.p.now + params.latency + jitter;
        let at_ns = ns(at);
        let f = InFlight {
            from: from_addr,
            // Host indices fit 32 bits: addresses number at most 2^24 hosts.
            src: from as u32,
            dst: dst as u32,
            links_at: self.env.link_changes,
            payload: p,
        };
        if self.mine(dst) {
            self.p.wire.push(at_ns, seq, f);
        } else {
            self.p.outbox.push((at_ns, seq, f));
        }
    }

    /// Deliver one datagram; returns the host whose tree state machine it changed.
    fn deliver(&mut self, f: InFlight) -> Option<usize> {
        let now = self.now();
        let i = f.dst as usize;
        let from = SocketAddr::V4(f.from);
        // A datagram in flight when its link went down is lost too (its link was up
        // when it was sent: no need to look while no link went down or up since).
        if f.links_at != self.env.link_changes
            && !self
                .env
                .links
                .get(&key(f.src as usize, i))
                .is_some_and(|l| l.up)
        {
            self.p.stats.no_route += 1;
            return None;
        }
        if self.h(i).machine.is_none() {
            self.p.stats.dead_dest += 1;
            return None;
        }
        let control = match f.payload {
            Payload::Control(d) => Ok(ControlDatagram::decode(d)),
            Payload::Small(s) => Ok(ott_proto::decode(s.as_slice()).ok()),
            Payload::Media(bytes) => Err(bytes),
        };
        match control {
            Ok(msg) => {
                let Some(msg) = msg else {
                    self.p.stats.codec_errors += 1;
                    return None;
                };
                if let Message::Nack { stream, ranges, .. } = &msg {
                    // A NACK from a child, for the data path (which answers only its
                    // current children).
                    let h = self.h(i);
                    h.data_dirty = true;
                    if let Some(d) = &mut h.data {
                        d.path.handle_nack(now, from, *stream, ranges);
                    }
                    self.flush_data(i, &[]);
                    self.rearm(i);
                    return None;
                }
                match &mut self.h(i).machine {
                    Some(Machine::Node(n)) => n.handle(now, from, msg),
                    Some(Machine::Client(c)) => c.handle(now, from, msg),
                    None => {}
                }
                self.drain(i);
                Some(i)
            }
            Err(bytes) => {
                let lo = self.p.lo;
                let h = &mut self.hosts[i - lo];
                h.data_dirty = true;
                let Some(d) = &mut h.data else {
                    self.p.stats.dead_dest += 1;
                    return None;
                };
                let accepted = d.path.handle_media(now, Some(from), &bytes, 0);
                while let Some(ev) = d.path.poll_event() {
                    if let DataEvent::SourceSwitched { .. } = ev {
                        // Another server's copy: its frame numbers are unrelated.
                        if let Some(p) = &mut d.playout {
                            p.reset();
                        }
                    }
                }
                if let Ok(a) = accepted {
                    match &mut d.playout {
                        Some(p) => {
                            let body = bytes.get(HEADER_LEN..a.len).unwrap_or_default();
                            p.push(now, &a.header, body);
                        }
                        None if a.header.frag_index == 0 => {
                            h.received.entry(a.header.stream).or_default().count += 1;
                        }
                        None => {}
                    }
                    if let Some(Machine::Client(c)) = &mut h.machine {
                        c.media_received(now);
                    }
                }
                let client = h.role.is_none();
                self.play(i);
                self.flush_data(i, std::slice::from_ref(&bytes));
                if client {
                    self.drain(i);
                } else {
                    self.rearm(i);
                }
                None
            }
        }
    }

    /// Re-arm host `i`'s timer: the earliest of its tree state machine's and its data
    /// plane's.
    fn rearm(&mut self, i: usize) {
        let lo = self.p.lo;
        let h = &mut self.hosts[i - lo];
        let before = h.next_timeout;
        let machine = match &h.machine {
            Some(Machine::Node(n)) => n.poll_timeout(),
            Some(Machine::Client(c)) => c.poll_timeout(),
            None => {
                h.next_timeout = None;
                return;
            }
        };
        let data = if h.data_dirty {
            h.data_timeout = h.data.as_ref().and_then(Data::poll_timeout);
            h.data_dirty = false;
            h.data_timeout
        } else {
            debug_assert_eq!(
                h.data_timeout,
                h.data.as_ref().and_then(Data::poll_timeout),
                "cached data-plane timer out of step"
            );
            h.data_timeout
        };
        let after = [machine, data].into_iter().flatten().min();
        h.next_timeout = after;
        if let Some(t) = after {
            if before != after {
                self.p.timers.push(Reverse((t, i)));
            }
        }
    }

    /// Drain a host's outputs (drain rule): control messages onto the wire; a node's
    /// routes into its data path (as the programs' control loop hands them to the
    /// forwarder), a viewer's session keys and stream into its data path (as the client
    /// program does); then what the data path queued; then re-arm its timer.
    fn drain(&mut self, i: usize) {
        let now = self.now();
        let lo = self.p.lo;
        let mut out = std::mem::take(&mut self.p.out_buf);
        out.clear();
        type Route = (
            StreamId,
            Vec<SocketAddr>,
            Vec<(SocketAddr, ott_proto::auth::SessionKey)>,
        );
        let mut fwd: Vec<Route> = Vec::new();
        let mut log: Vec<String> = Vec::new();
        let Some(h) = self.hosts.get_mut(i - lo) else {
            return;
        };
        let mut pop_targets: Vec<(usize, SocketAddr)> = Vec::new();
        match &mut h.machine {
            Some(Machine::Node(n)) => {
                while let Some(t) = n.poll_transmit() {
                    out.push((t.to, t.msg));
                }
                while let Some(ev) = n.poll_event() {
                    if let Event::Forwarding {
                        stream,
                        children,
                        sessions,
                    } = ev
                    {
                        fwd.push((stream, children, sessions));
                    }
                }
            }
            Some(Machine::Client(c)) => {
                while let Some(t) = c.poll_transmit() {
                    // A viewer's echoed Join and its Leave count as joins and leaves.
                    let kind = match t.msg {
                        Message::Join { .. } | Message::ViewerJoin { .. } => Some("join"),
                        Message::Leave { .. } | Message::ViewerLeave { .. } => Some("leave"),
                        _ => None,
                    };
                    if let Some(kind) = kind {
                        pop_targets.push((log.len(), t.to));
                        log.push(kind.to_owned());
                    }
                    out.push((t.to, t.msg));
                }
                while let Some(ev) = c.poll_event() {
                    // Events that reach the data plane.
                    if matches!(ev, ClientEvent::Watching(_) | ClientEvent::Session { .. }) {
                        h.data_dirty = true;
                    }
                    match ev {
                        ClientEvent::Watching(s) => {
                            log.push(format!("watching {}", s.name));
                            if let Some(d) = &mut h.data {
                                // Nothing of the old stream is played after this point.
                                if let Some(p) = &mut d.playout {
                                    p.reset();
                                }
                                if let Some(old) = d.watching.take() {
                                    d.path.remove_stream(old);
                                }
                                d.path.pin_stream(s.id);
                                d.watching = Some(s.id);
                            }
                        }
                        ClientEvent::PopChanged { new, .. } => log.push(format!("pop {new}")),
                        ClientEvent::Session { key, .. } => {
                            if let Some(d) = &mut h.data {
                                d.path.add_session(key);
                            }
                        }
                        _ => {}
                    }
                }
            }
            None => {
                h.next_timeout = None;
                return;
            }
        }
        let routes_changed = !fwd.is_empty();
        for (stream, children, sessions) in fwd {
            h.data_dirty = true;
            if let Some(d) = &mut h.data {
                // Unkeyed: every child gets the bytes as received, a viewer with a
                // session sealed with its key.
                let to = ott_datapath::children_from(&children, &sessions, |_| true);
                d.path.set_route(now, stream, to);
            }
            if children.is_empty() {
                h.forwarding.remove(&stream);
            } else {
                h.forwarding.insert(stream, children);
            }
        }
        // `routed` holds the hosts with a forwarding entry; only a route event changes
        // that (and a kill or restart, which clear both).
        if routes_changed {
            if h.forwarding.is_empty() {
                self.p.routed.remove(&i);
            } else {
                self.p.routed.insert(i);
            }
        }
        debug_assert_eq!(self.p.routed.contains(&i), !h.forwarding.is_empty());
        let ip = h.ip;
        h.control_sent += out.len() as u64;
        // Name the PoP of each logged join/leave.
        for (k, to) in pop_targets {
            let name = match to.ip() {
                IpAddr::V4(v4) => self
                    .by_ip(v4)
                    .map_or_else(|| to.to_string(), |j| self.env.names[j].clone()),
                IpAddr::V6(_) => to.to_string(),
            };
            if let Some(l) = log.get_mut(k) {
                *l = format!("{l} {name}");
            }
        }
        let h = &mut self.hosts[i - lo];
        h.log.extend(log);
        if self.env.check_loops && h.role.is_some() {
            self.recheck(i);
        }
        self.flush_data(i, &[]);
        self.rearm(i);
        let from_addr = SocketAddrV4::new(ip, CONTROL_PORT);
        // The same message to several neighbours in a row (heartbeats, announcements)
        // is encoded once: encoding is a pure function of the message.
        let mut last: Option<(Message, Option<Payload>)> = None;
        let mut buf = std::mem::take(&mut self.p.enc_buf);
        for (to, msg) in out.drain(..) {
            let payload = match &last {
                Some((m, p)) if *m == msg => p.as_ref().map(Payload::share),
                _ => {
                    let p = ott_proto::encode_into(&msg, &mut buf)
                        .ok()
                        .map(|()| control_payload(&buf));
                    let copy = p.as_ref().map(Payload::share);
                    last = Some((msg, p));
                    copy
                }
            };
            let Some(payload) = payload else {
                self.p.stats.codec_errors += 1;
                continue;
            };
            self.p.stats.control_sent += 1;
            self.put_on_wire(i, from_addr, to, payload);
        }
        self.p.enc_buf = buf;
        self.p.out_buf = out;
    }

    /// Loop freedom after host `i` changed: its own invariants, and its pointers if
    /// they changed, logged for [`Sim::replay`] to check in the forests (see
    /// [`Forests`]) in the order a run on one thread takes the steps.
    fn recheck(&mut self, i: usize) {
        self.p.stats.loop_checks += 1;
        let ids = self.env.ids;
        let order = self.p.order;
        let at = self.p.now;
        let mut pairs = Vec::new();
        let mut broken = None;
        let mut version = None;
        let lo = self.p.lo;
        let h = &mut self.hosts[i - lo];
        if let Some(Machine::Node(n)) = &h.machine {
            let changes = n.changing_inputs();
            if h.intact_at == Some(changes) {
                // Only heartbeats since the last check, which change neither the
                // invariants nor the pointers: intact, and the forests as logged.
                debug_assert!(n.check_invariants().is_ok());
                debug_assert_eq!(h.forest_version, Some(n.pointer_version()));
                return;
            }
            broken = n.check_invariants().err();
            h.intact_at = broken.is_none().then_some(changes);
            version = Some(n.pointer_version());
            if h.forest_version == version {
                // No pointer of this host changed since they were last logged: the
                // forests are as they were, free of cycles.
                if broken.is_some() {
                    self.p.log.push(Change {
                        order,
                        at,
                        host: i,
                        broken,
                        pairs: None,
                    });
                }
                return;
            }
            for (s, p) in n.parents() {
                if let (Some(&si), Some(&p)) = (ids.get(s), ids.get(p)) {
                    pairs.push((ForestKey::Server(si), p));
                }
            }
            for (st, p) in n.upstreams() {
                if let Some(&p) = ids.get(p) {
                    pairs.push((ForestKey::Stream(st), p));
                }
            }
        }
        h.forest_version = version;
        self.p.log.push(Change {
            order,
            at,
            host: i,
            broken,
            pairs: Some(pairs),
        });
    }
}

impl Sim {
    fn running_node(&self, id: &str) -> Option<&Node> {
        match self.host(id)?.machine.as_ref()? {
            Machine::Node(n) => Some(n),
            Machine::Client(_) => None,
        }
    }

    /// Walk `next` from `start`; an error naming the cycle if one is found.
    fn walk<'a>(
        &'a self,
        start: &'a str,
        what: &str,
        next: impl Fn(&'a Node) -> Option<&'a str>,
    ) -> Result<(), String> {
        let mut seen = vec![start];
        let mut cur = start;
        while let Some(p) = self.running_node(cur).and_then(&next) {
            if seen.contains(&p) {
                seen.push(p);
                return Err(format!("{what}: {}", seen.join(" -> ")));
            }
            seen.push(p);
            cur = p;
            if seen.len() > self.hosts.len() + 1 {
                return Err(format!("{what}: chain longer than the network"));
            }
        }
        Ok(())
    }

    /// Loop freedom as seen from host `i` (see [`Sim::check_loops_each_step`]).
    fn check_from(&self, i: usize) -> Result<(), String> {
        let h = &self.hosts[i];
        let Some(Machine::Node(n)) = &h.machine else {
            return Ok(());
        };
        n.check_invariants()?;
        for s in n.servers() {
            self.walk(&h.id, &format!("loop towards {s}"), |m| m.parent(&s))?;
        }
        for st in n.stream_ids() {
            self.walk(&h.id, &format!("subscription loop for {st:#x}"), |m| {
                m.upstream(st)
            })?;
        }
        Ok(())
    }

    /// Check that no server's tree and no stream's subscription chain has a cycle among
    /// the running nodes, and every node's own invariants.
    pub fn check_loop_free(&self) -> Result<(), String> {
        for i in 0..self.hosts.len() {
            self.check_from(i)?;
        }
        Ok(())
    }

    /// Whether running node `id` is connected to running node `to` by up links through
    /// running nodes (clients are not used as transit).
    pub fn connected(&self, id: &str, to: &str) -> bool {
        let (Some(a), Some(b)) = (self.idx(id), self.idx(to)) else {
            return false;
        };
        let alive = |i: usize| self.hosts[i].role.is_some() && self.hosts[i].machine.is_some();
        if !alive(a) || !alive(b) {
            return false;
        }
        let mut adj: HashMap<usize, Vec<usize>> = HashMap::new();
        for (&(x, y), l) in &self.links {
            if l.up && alive(x) && alive(y) {
                adj.entry(x).or_default().push(y);
                adj.entry(y).or_default().push(x);
            }
        }
        let mut seen = vec![false; self.hosts.len()];
        let mut stack = vec![a];
        seen[a] = true;
        while let Some(x) = stack.pop() {
            if x == b {
                return true;
            }
            for &y in adj.get(&x).into_iter().flatten() {
                if !seen[y] {
                    seen[y] = true;
                    stack.push(y);
                }
            }
        }
        false
    }

    /// The tree as stable, sorted text: one line per running host, e.g.
    /// `n5 parent=n9 hops=3 latency=7.0ms` or `c1 pop=n5`.
    pub fn dump_tree(&self) -> String {
        let mut out = String::new();
        for &i in self.index.values() {
            let h = &self.hosts[i];
            let id = &h.id;
            match &h.machine {
                Some(Machine::Node(n)) => {
                    let st = n.status();
                    let _ = writeln!(
                        out,
                        "{id} parent={} hops={} latency={}",
                        st.parent.as_deref().unwrap_or("-"),
                        st.hops.map_or("-".to_owned(), |h| h.to_string()),
                        st.latency_ms
                            .map_or("-".to_owned(), |l| format!("{l:.1}ms"))
                    );
                }
                Some(Machine::Client(c)) => {
                    let _ = writeln!(
                        out,
                        "{id} pop={} stream={}",
                        c.pop().unwrap_or("-"),
                        c.stream().map_or("-", |s| s.name.as_str())
                    );
                }
                None => {
                    let _ = writeln!(out, "{id} down");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ott_proto::stream_id_for;
    use std::rc::Rc;

    /// A datagram in flight, a short control message inline, fits two cache lines: the
    /// calendar queue reads one per step, written tens of milliseconds earlier.
    #[test]
    fn a_datagram_in_flight_fits_two_cache_lines() {
        assert!(std::mem::size_of::<Option<InFlight>>() <= 128);
    }

    /// The calendar queue gives the datagrams in the order one heap of (arrival,
    /// sequence number) gives them, whatever the delays (none, within the calendar,
    /// beyond it) and however pushes and pops interleave.
    #[test]
    fn the_wire_delivers_in_arrival_then_sequence_order() {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut wire = Wire::default();
        let mut reference: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
        let (mut now, mut seq) = (0u64, 0u64);
        let addr = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), CONTROL_PORT);
        for _ in 0..20_000 {
            if rng.u8(..3) > 0 {
                let delay = match rng.u8(..4) {
                    0 => 0,
                    1 => rng.u64(..BUCKET_NS),
                    2 => rng.u64(..BUCKET_NS * BUCKETS),
                    _ => rng.u64(..BUCKET_NS * BUCKETS * 3),
                };
                seq += 1;
                let f = InFlight {
                    from: addr,
                    src: seq as u32,
                    dst: 0,
                    links_at: 0,
                    payload: Payload::Media(Bytes::new()),
                };
                wire.push(now + delay, seq, f);
                reference.push(Reverse((now + delay, seq)));
            } else {
                let want = reference.pop().map(|Reverse(k)| k);
                assert_eq!(wire.peek(), want.map(|(at, _)| at));
                let got = wire.pop().map(|(_, f)| f.src as u64);
                assert_eq!(got, want.map(|(_, s)| s));
                if let Some((at, _)) = want {
                    now = at;
                }
            }
        }
        while let Some(Reverse((_, s))) = reference.pop() {
            assert_eq!(wire.pop().map(|(_, f)| f.src as u64), Some(s));
        }
        assert!(wire.pop().is_none());
    }

    /// s1 and p1 are overlay neighbours three router hops apart by the short way
    /// (1 + 2 + 3 ms, 10 % loss on one hop) and two hops by a slow way (20 + 20 ms).
    const SPARSE: &str = r#"
name = "t"
bootstrapper = "s1"
[[node]]
id = "s1"
role = "server"
[[node]]
id = "r1"
role = "relay"
[[node]]
id = "p1"
role = "pop"
[[node]]
id = "g1"
role = "router"
[[node]]
id = "g2"
role = "router"
[[node]]
id = "g3"
role = "router"
[[link]]
ends = ["s1", "g1"]
delay_ms = 1.0
[[link]]
ends = ["g1", "g2"]
delay_ms = 2.0
jitter_ms = 0.5
loss_pct = 10.0
[[link]]
ends = ["g2", "p1"]
delay_ms = 3.0
[[link]]
ends = ["s1", "g3"]
delay_ms = 20.0
[[link]]
ends = ["g3", "p1"]
delay_ms = 20.0
[[link]]
ends = ["s1", "r1"]
delay_ms = 4.0
[[overlay]]
ends = ["s1", "p1"]
[[overlay]]
ends = ["s1", "r1"]
"#;

    #[test]
    fn an_overlay_pair_several_hops_apart_gets_the_shortest_underlay_path() {
        let t = Topology::parse(SPARSE, "sparse test").expect("topology parses");
        let sim = Sim::from_topology(&t, 1);
        let l = &sim.links[&key(sim.index["s1"], sim.index["p1"])].params;
        assert_eq!(
            l.latency,
            Duration::from_millis(6),
            "1 + 2 + 3 ms, not 20 + 20"
        );
        assert_eq!(l.jitter, Duration::from_micros(500));
        assert!((l.loss - 0.1).abs() < 1e-9, "loss {}", l.loss);
        // A direct link keeps its own parameters.
        let d = &sim.links[&key(sim.index["s1"], sim.index["r1"])].params;
        assert_eq!(d.latency, Duration::from_millis(4));
        assert_eq!(sim.links().len(), 2, "only the overlay pairs are links");
    }

    /// Whether the pointers `p` (host -> parent) have a cycle: the naive full check.
    fn has_cycle(p: &[Option<usize>]) -> bool {
        (0..p.len()).any(|start| {
            let mut cur = start;
            for _ in 0..=p.len() {
                match p[cur] {
                    Some(next) if next == start => return true,
                    Some(next) => cur = next,
                    None => return false,
                }
            }
            false
        })
    }

    #[test]
    fn the_incremental_check_finds_a_constructed_loop() {
        let k = ForestKey::Server(0);
        let mut f = Forests::default();
        // 1 -> 2 -> 3 -> 0: a chain, no loop.
        assert_eq!(f.set(k, 1, Some(2)), Ok(()));
        assert_eq!(f.set(k, 2, Some(3)), Ok(()));
        assert_eq!(f.set(k, 3, Some(0)), Ok(()));
        // Another forest is independent.
        assert_eq!(f.set(ForestKey::Stream(7), 0, Some(1)), Ok(()));
        // 0 -> 1 closes the loop 0 -> 1 -> 2 -> 3 -> 0 in the server's forest.
        let mut full = vec![Some(1), Some(2), Some(3), Some(0)];
        assert!(has_cycle(&full), "the full check sees it");
        assert_eq!(f.set(k, 0, Some(1)), Err(vec![0, 1, 2, 3, 0]));
        // Breaking it (3 dies) makes the next change clean again.
        f.clear(3);
        full[3] = None;
        assert!(!has_cycle(&full));
        assert_eq!(f.set(k, 0, Some(2)), Ok(()));
        // A pointer set again to the same parent walks nothing and stays clean.
        assert_eq!(f.set(k, 0, Some(2)), Ok(()));
        // set_all drops the pointers not given and reports the forest of a loop.
        let mut now = vec![(k, 1)];
        assert_eq!(f.set_all(2, &mut now), Err((k, vec![2, 1, 2])));
    }

    #[test]
    fn the_incremental_check_agrees_with_the_full_check_on_random_changes() {
        let mut rng = fastrand::Rng::with_seed(11);
        let n = 9;
        let keys = [ForestKey::Server(0), ForestKey::Stream(5)];
        let mut f = Forests::default();
        let mut full: Vec<Vec<Option<usize>>> = vec![vec![None; n]; keys.len()];
        let (mut loops, mut clean) = (0, 0);
        for _ in 0..20_000 {
            let ki = rng.usize(..keys.len());
            let host = rng.usize(..n);
            let p = if rng.u8(..4) == 0 {
                None
            } else {
                Some(rng.usize(..n))
            };
            let before = full[ki][host];
            full[ki][host] = p;
            let expect = has_cycle(&full[ki]);
            let got = f.set(keys[ki], host, p);
            assert_eq!(
                got.is_err(),
                expect,
                "host {host} -> {p:?} in {:?}",
                full[ki]
            );
            if expect {
                loops += 1;
                // Undo, so that the forests are loop free before each change (the
                // precondition of the incremental check, as in the simulator).
                full[ki][host] = before;
                assert_eq!(f.set(keys[ki], host, before), Ok(()));
            } else {
                clean += 1;
            }
        }
        assert!(loops > 1000 && clean > 1000, "{loops} loops, {clean} clean");
    }

    #[test]
    fn the_incremental_check_agrees_with_the_full_check_over_a_random_run() {
        let mut p = RandomOverlay::new(40, 3, 5);
        p.clients = 6;
        let mut sim = Sim::random(&p);
        sim.set_media_period(Duration::from_millis(50));
        sim.check_loops_each_step(true);
        sim.start();
        let relays = sim.ids_with_role(Role::Relay);
        for (k, r) in relays.iter().take(4).enumerate() {
            sim.run_for(Duration::from_secs(2));
            assert!(sim.check_loop_free().is_ok());
            assert_eq!(sim.stats().loop_violations, 0);
            sim.kill(r);
            if k % 2 == 1 {
                sim.restart(&relays[k - 1]);
            }
        }
        sim.run_for(Duration::from_secs(3));
        assert_eq!(sim.check_loop_free(), Ok(()));
        assert_eq!(sim.first_loop_violation(), None);
        assert!(sim.stats().loop_checks > 10_000, "{:?}", sim.stats());
    }

    /// What the loop check's skip relies on: the same [`Node::pointer_version`] of the
    /// same node means the same parents and upstreams.
    #[test]
    fn a_nodes_pointer_version_changes_whenever_its_pointers_do() {
        type Seen = (u64, Vec<(String, String)>, Vec<(StreamId, String)>);
        let mut p = RandomOverlay::new(40, 3, 9);
        p.clients = 6;
        let mut sim = Sim::random(&p);
        sim.set_media_period(Duration::from_millis(50));
        sim.start();
        let seen: Rc<std::cell::RefCell<(BTreeMap<String, Seen>, u64)>> = Rc::default();
        let log = seen.clone();
        sim.on_step(move |s| {
            let (map, changes) = &mut *log.borrow_mut();
            for id in s.node_ids() {
                let Some(n) = s.try_node(&id) else {
                    // Killed: a restart is a new node, whose versions start again.
                    map.remove(&id);
                    continue;
                };
                let now: Seen = (
                    n.pointer_version(),
                    n.parents().map(|(a, b)| (a.into(), b.into())).collect(),
                    n.upstreams().map(|(a, b)| (a, b.into())).collect(),
                );
                if let Some(old) = map.get(&id) {
                    if old.0 == now.0 {
                        assert_eq!((&old.1, &old.2), (&now.1, &now.2), "{id}");
                    } else {
                        *changes += 1;
                    }
                }
                map.insert(id, now);
            }
        });
        let relays = sim.ids_with_role(Role::Relay);
        for r in relays.iter().take(3) {
            sim.run_for(Duration::from_secs(2));
            sim.kill(r);
        }
        sim.run_for(Duration::from_secs(2));
        // The run moved pointers (joins, failovers): the check was not vacuous.
        assert!(seen.borrow().1 > 20, "{} changes", seen.borrow().1);
    }

    #[test]
    fn stream_path_follows_the_subscription_chain_of_running_nodes() {
        let mut sim = Sim::new(3);
        sim.add_node("s1", Role::Server);
        sim.add_node("r1", Role::Relay);
        sim.add_node("p1", Role::Pop);
        sim.add_link("s1", "r1", LinkParams::new(Duration::from_millis(2)));
        sim.add_link("r1", "p1", LinkParams::new(Duration::from_millis(2)));
        sim.set_catalogue(
            "s1",
            vec![StreamInfo::new(
                SIM_STREAM,
                ott_proto::MediaKind::Mjpeg,
                25_000,
            )],
        );
        sim.add_client("c1", &["p1"]);
        sim.select_stream("c1", SIM_STREAM);
        sim.start();
        sim.run_for(Duration::from_secs(3));
        let id = stream_id_for(SIM_STREAM);
        assert_eq!(sim.stream_path("p1", id), ["p1", "r1", "s1"]);
        assert!(
            sim.stream_path("c1", id).is_empty(),
            "a client is not a node"
        );
        assert!(sim.stream_path("nobody", id).is_empty());
        sim.kill("r1");
        assert_eq!(
            sim.stream_path("p1", id),
            ["p1"],
            "stops at a dead upstream"
        );
        assert!(
            sim.stream_path("r1", id).is_empty(),
            "a dead node has no path"
        );
        assert_eq!(sim.ids_with_role(Role::Relay), ["r1"]);
        assert_eq!(sim.pops_of("c1"), ["p1"]);
        assert!(sim.pops_of("p1").is_empty());
    }

    /// A random overlay with viewers, run for `secs`; loss on every link if given.
    fn media_run(seed: u64, loss: f64, secs: u64) -> Sim {
        let mut p = RandomOverlay::new(30, 3, seed);
        p.clients = 6;
        let mut sim = Sim::random(&p);
        sim.set_media(MediaParams {
            period: Duration::from_millis(40),
            ..MediaParams::default()
        });
        if loss > 0.0 {
            for (a, b) in sim.links() {
                if let Some(mut l) = sim.link_params(&a, &b) {
                    l.loss = loss;
                    sim.set_link(&a, &b, l);
                }
            }
        }
        sim.check_loops_each_step(true);
        sim.start();
        sim.run_for(Duration::from_secs(secs));
        sim
    }

    /// Sum of (intact, expected) over the viewers, frames made up to 1 s before the end.
    fn intact(sim: &Sim) -> (u64, u64) {
        let id = stream_id_for(SIM_STREAM);
        let to = sim.elapsed() - Duration::from_secs(1);
        sim.client_ids().iter().fold((0, 0), |(i, e), c| {
            let (a, b) = sim.frames_intact(c, id, Duration::ZERO, to);
            (i + a, e + b)
        })
    }

    #[test]
    fn without_loss_every_viewer_plays_every_frame_intact() {
        for seed in [1, 2] {
            let sim = media_run(seed, 0.0, 8);
            let id = stream_id_for(SIM_STREAM);
            for c in sim.client_ids() {
                let to = sim.elapsed() - Duration::from_secs(1);
                let (i, e) = sim.frames_intact(&c, id, Duration::ZERO, to);
                assert!(
                    e > 100,
                    "{c} was attached for {e} frames\n{}",
                    sim.dump_tree()
                );
                assert_eq!(i, e, "{c}: {i} of {e} frames intact");
                assert_eq!(sim.frames_corrupt(&c, id), 0);
            }
            assert_eq!(sim.stats().nacks_sent, 0);
            assert_eq!(sim.stats().loop_violations, 0);
            // Live data crosses each link once (the data path drops duplicates).
            assert_eq!(sim.max_copies_per_link(), 1);
        }
    }

    #[test]
    fn under_loss_nacks_recover_most_frames() {
        let sim = media_run(3, 0.03, 10);
        let (i, e) = intact(&sim);
        eprintln!("3 % loss: {i} of {e} frames intact, {:?}", sim.stats());
        assert!(e > 6 * 150, "{e} frames expected");
        let st = sim.stats();
        assert!(st.nacks_sent > 20 && st.lost > 100, "{st:?}");
        // About 2 datagrams x 4 links a frame at 3 % loss each: without NACKs a frame in
        // five would be lost.
        assert!(
            i * 100 >= e * 98,
            "{i} of {e} frames intact under 3 % loss, {st:?}"
        );
        let resent: u64 = sim
            .node_ids()
            .iter()
            .filter_map(|n| sim.data_path(n))
            .map(|d| d.counters().retransmitted)
            .sum();
        assert!(resent > 20, "{resent} retransmissions");
    }

    #[test]
    fn a_relay_kill_costs_a_bounded_number_of_frames() {
        // s1 - r1 - p1 and s1 - r2 - p1 (slower): p1's viewer takes the stream via r1
        // until r1 dies.
        let mut sim = Sim::new(5);
        sim.add_node("s1", Role::Server);
        sim.add_node("r1", Role::Relay);
        sim.add_node("r2", Role::Relay);
        sim.add_node("p1", Role::Pop);
        let l = |ms| LinkParams::new(Duration::from_millis(ms));
        sim.add_link("s1", "r1", l(2));
        sim.add_link("r1", "p1", l(2));
        sim.add_link("s1", "r2", l(5));
        sim.add_link("r2", "p1", l(5));
        sim.set_catalogue(
            "s1",
            vec![StreamInfo::new(
                SIM_STREAM,
                ott_proto::MediaKind::Mjpeg,
                25_000,
            )],
        );
        sim.set_media(MediaParams {
            period: Duration::from_millis(20),
            ..MediaParams::default()
        });
        sim.set_silence_hint(Some(Duration::from_millis(100)));
        sim.add_client("v", &["p1"]);
        sim.select_stream("v", SIM_STREAM);
        sim.start();
        sim.run_for(Duration::from_secs(4));
        let id = stream_id_for(SIM_STREAM);
        assert_eq!(sim.stream_path("p1", id), ["p1", "r1", "s1"]);
        let at = sim.elapsed();
        sim.kill("r1");
        sim.run_for(Duration::from_secs(4));
        assert_eq!(sim.stream_path("p1", id), ["p1", "r2", "s1"]);
        let (i, e) = sim.frames_intact("v", id, at, at + Duration::from_secs(2));
        assert_eq!(e, 100);
        eprintln!("kill: {} of {e} frames lost", e - i);
        // The silence hint moves p1 within about 100 ms + an RTT: at most half a second
        // of frames is lost.
        assert!(e - i <= 25, "lost {} frames to the kill", e - i);
        let (i, e) = sim.frames_intact(
            "v",
            id,
            at + Duration::from_secs(2),
            sim.elapsed() - Duration::from_secs(1),
        );
        assert_eq!(i, e, "every frame after the repair");
    }

    /// Everything a run shows from outside, as text.
    fn outcome(sim: &Sim) -> String {
        let stream = stream_id_for(SIM_STREAM);
        let end = sim.elapsed().saturating_sub(Duration::from_secs(1));
        let mut out = format!("{:?}\n{}", sim.stats(), sim.dump_tree());
        for c in sim.client_ids() {
            let _ = writeln!(
                out,
                "{c}: {:?} {:?} {:?}",
                sim.frames_intact(&c, stream, Duration::ZERO, end),
                sim.arrivals(&c, stream).len(),
                sim.client_log(&c)
            );
        }
        for n in sim.node_ids() {
            let _ = writeln!(out, "{n}: {}", sim.control_messages_sent(&n));
        }
        let _ = writeln!(
            out,
            "{} {:?}",
            sim.max_copies_per_link(),
            sim.first_loop_violation()
        );
        out
    }

    #[test]
    fn one_thread_or_several_give_the_same_run() {
        let run = |threads: usize| {
            let mut p = RandomOverlay::new(120, 4, 3);
            p.clients = 10;
            p.jitter = Duration::from_millis(2);
            let mut sim = Sim::random(&p);
            for (a, b) in sim.links() {
                if let Some(mut l) = sim.link_params(&a, &b) {
                    l.loss = 0.02;
                    sim.set_link(&a, &b, l);
                }
            }
            sim.threads = threads;
            sim.set_media_period(Duration::from_millis(20));
            sim.set_silence_hint(Some(Duration::from_millis(100)));
            sim.check_loops_each_step(true);
            sim.start();
            sim.run_until(Duration::from_secs(6));
            // Kill the relays the first viewer's stream comes through, one by one, and
            // bring the first back.
            let c = sim.client_ids()[0].clone();
            let pop = sim.client(&c).pop().map(str::to_owned);
            let path = pop.map_or(Vec::new(), |p| {
                sim.stream_path(&p, stream_id_for(SIM_STREAM))
            });
            let relays: Vec<String> = path
                .into_iter()
                .filter(|n| sim.role(n) == Some(Role::Relay))
                .take(2)
                .collect();
            let mut t = 6;
            for r in &relays {
                sim.kill(r);
                t += 2;
                sim.run_until(Duration::from_secs(t));
            }
            if let Some(r) = relays.first() {
                sim.restart(r);
            }
            sim.run_for(Duration::from_millis(2500));
            (relays, outcome(&sim))
        };
        let (relays, one) = run(1);
        assert!(!relays.is_empty(), "no relay on the stream path\n{one}");
        assert!(one.contains("loop_violations: 0"), "{one}");
        for threads in [2, 3] {
            let (_, several) = run(threads);
            assert!(one == several, "{threads} threads:\n{several}\none:\n{one}");
        }
    }

    #[test]
    #[should_panic(expected = "did not reach")]
    fn a_part_over_the_step_bound_stops_every_thread() {
        let mut sim = Sim::random(&RandomOverlay::new(40, 3, 1));
        sim.threads = 2;
        sim.max_steps = 1_000;
        sim.max_steps_per_host_second = 0;
        sim.start();
        // Far more than 1,000 steps: the part that reaches the bound breaks the gate,
        // the other stops at it, and the run panics instead of hanging.
        sim.run_until(Duration::from_secs(5));
    }

    #[test]
    fn the_gate_holds_every_thread_until_all_arrived() {
        let gate = Gate::new(3);
        let arrivals = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for round in 1..=300u64 {
                        arrivals.fetch_add(1, Ordering::SeqCst);
                        assert!(gate.wait());
                        // Nobody passes before the three arrived for this round.
                        assert!(arrivals.load(Ordering::SeqCst) >= 3 * round);
                    }
                });
            }
        });
        assert_eq!(arrivals.load(Ordering::SeqCst), 900);
    }

    #[test]
    fn a_thread_that_panics_releases_the_others_at_the_gate() {
        let gate = &Gate::new(2);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let failing = s.spawn(|| {
                let _guard = GateGuard(gate);
                panic!("a part failed");
            });
            let waiting = s.spawn(move || {
                let _ = tx.send(gate.wait());
            });
            assert!(failing.join().is_err());
            let got = rx.recv_timeout(Duration::from_secs(20));
            if got.is_err() {
                // Release the waiter so the assertion below fails instead of hanging.
                gate.break_it();
            }
            assert_eq!(got, Ok(false), "the waiting thread was not released");
            assert!(waiting.join().is_ok());
        });
    }
}
