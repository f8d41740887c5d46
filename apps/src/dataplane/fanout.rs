//! Fan-out over several sender threads, for a forwarder with many children.
//!
//! When one round's transmits reach at least `min_children` distinct destinations (and
//! [`MIN_SENDS`] sends), the
//! forwarder splits them by destination: [`sender_of`] (a fixed hash of the address)
//! names the thread that sends to each child, share 0 being the forwarder's own thread
//! and shares 1.. the helpers'. A child's datagrams are therefore always sent by one
//! thread, in the order the core queued them, and a round is finished (every share
//! handed to the kernel) before the forwarder receives the next batch: no stream is
//! reordered to a child, not even when a round below the threshold is sent by the
//! forwarder alone.
//!
//! Nothing is copied or allocated per datagram: a helper's share names the datagrams of
//! the receive batch by index (the batch is shared behind an [`Arc`], and the forwarder
//! reuses its buffers only once every helper has let go of it) and moves the
//! [`Bytes`] of the others (sealed copies, retransmissions); the share vectors go back
//! and forth between the forwarder and its helpers and keep their capacity. The
//! channels hold one job each way per helper, and the forwarder waits for every share
//! of a round, so a slow helper slows the forwarder down instead of queueing memory.
//!
//! Helpers are started the first time a round reaches the threshold, each with its own
//! clone of the data socket (same address and port, so children see one sender), and
//! are stopped and joined when the `Fanout` is dropped.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use crate::batch::{send_batch, RecvBatch, SendOutcome};

/// Most sender threads by default (the forwarder's own included).
pub const DEFAULT_MAX_THREADS: usize = 4;

/// Fewest distinct destinations in one round for it to be split, by default. Below it
/// the forwarder sends the round itself, as with one thread.
pub const DEFAULT_MIN_CHILDREN: usize = 8;

/// Fewest sends in one round for it to be split, by default: a round of a datagram or two (a live
/// stream's usual batch) costs less to send than to hand over to another thread, and
/// would only add the hand-over to its delay.
pub const MIN_SENDS: usize = 64;

/// The cores this process may use (1 when unknown).
pub fn available_cores() -> usize {
    thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// The default number of sender threads: the cores, at most [`DEFAULT_MAX_THREADS`].
pub fn default_threads() -> usize {
    available_cores().min(DEFAULT_MAX_THREADS)
}

/// Which of `threads` sender threads sends to `to` (0 is the forwarder's own thread).
///
/// A fixed function of the address alone (no per-process seed): a child keeps its thread
/// for as long as the thread count stays, whatever other children come and go.
pub fn sender_of(to: &SocketAddr, threads: usize) -> usize {
    if threads <= 1 {
        return 0;
    }
    let ip = match to.ip() {
        IpAddr::V4(a) => u64::from(u32::from(a)),
        IpAddr::V6(a) => {
            let v = u128::from(a);
            (v as u64) ^ ((v >> 64) as u64).rotate_left(29)
        }
    };
    let h = mix(ip.rotate_left(16) ^ u64::from(to.port()));
    // Multiply-shift: an unbiased map of the 64-bit hash onto 0..threads.
    ((u128::from(h) * threads as u128) >> 64) as usize
}

/// SplitMix64's finaliser: every input bit moves about half the output bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether `dests` holds at least `n` distinct addresses (stops looking once it does;
/// `seen` is working memory, cleared first).
pub(crate) fn distinct_at_least(
    dests: impl Iterator<Item = SocketAddr>,
    n: usize,
    seen: &mut HashSet<SocketAddr>,
) -> bool {
    seen.clear();
    if n == 0 {
        return true;
    }
    let mut last = None;
    for d in dests {
        // Runs to one child (a retransmission, a start cache) cost no lookup.
        if last == Some(d) {
            continue;
        }
        last = Some(d);
        seen.insert(d);
        if seen.len() >= n {
            return true;
        }
    }
    false
}

/// One datagram of a helper's share.
#[derive(Debug)]
pub(crate) enum Datagram {
    /// The first `len` bytes of datagram `token` of the round's receive batch.
    Input {
        /// Index in the receive batch.
        token: usize,
        /// How many of its bytes.
        len: usize,
    },
    /// These bytes (moved, not copied).
    Bytes(Bytes),
}

/// A share and what its datagrams refer to.
struct Job {
    batch: Option<Arc<RecvBatch>>,
    items: Vec<(Datagram, SocketAddr)>,
}

/// A finished share: its (emptied) vector comes back for the next round.
struct Done {
    items: Vec<(Datagram, SocketAddr)>,
    out: SendOutcome,
}

/// One helper thread and the forwarder's end of its channels.
struct Helper {
    jobs: Sender<Job>,
    done: Receiver<Done>,
    handle: JoinHandle<()>,
    /// The share being filled this round (its capacity is kept between rounds).
    share: Vec<(Datagram, SocketAddr)>,
    /// Datagrams handed to the thread and not yet reported.
    pending: usize,
}

/// The forwarder's sender threads: see the module documentation.
pub(crate) struct Fanout {
    /// Sender threads in all, the forwarder's own included (1: never split).
    threads: usize,
    min_children: usize,
    min_sends: usize,
    /// `threads - 1` once started.
    helpers: Vec<Helper>,
    /// Set when starting the helpers failed: every round is sent by the forwarder.
    off: bool,
    seen: HashSet<SocketAddr>,
    /// Spare buffer for the slices of one share (empty between uses).
    refs: Vec<(&'static [u8], SocketAddr)>,
    /// What the forwarder sent itself of shares it could not hand over this round.
    fallback: SendOutcome,
}

impl Fanout {
    /// Up to `threads` sender threads (the forwarder's included), used for rounds with
    /// at least `min_children` destinations and `min_sends` sends.
    pub(crate) fn new(threads: usize, min_children: usize, min_sends: usize) -> Self {
        Self {
            threads: threads.max(1),
            min_children,
            min_sends,
            helpers: Vec::new(),
            off: false,
            seen: HashSet::new(),
            refs: Vec::new(),
            fallback: SendOutcome::default(),
        }
    }

    /// Sender threads in use: 1 until the helpers are started (or when they could not).
    pub(crate) fn active_threads(&self) -> usize {
        if self.off {
            1
        } else {
            self.helpers.len() + 1
        }
    }

    /// Whether a round to `dests` is split over the threads, starting them (with clones
    /// of `sock`) the first time.
    pub(crate) fn splits(
        &mut self,
        sock: &UdpSocket,
        dests: impl ExactSizeIterator<Item = SocketAddr>,
    ) -> bool {
        if self.threads < 2 || self.off || dests.len() < self.min_sends {
            return false;
        }
        if !distinct_at_least(dests, self.min_children, &mut self.seen) {
            return false;
        }
        if self.helpers.is_empty() {
            if let Err(e) = self.start(sock) {
                tracing::warn!(error = %e, "cannot start the fan-out threads: sending from one thread");
                self.stop();
                self.off = true;
                return false;
            }
            tracing::info!(
                threads = self.threads,
                "fan-out over several sender threads"
            );
        }
        true
    }

    fn start(&mut self, sock: &UdpSocket) -> std::io::Result<()> {
        for i in 1..self.threads {
            let sock = sock.try_clone()?;
            let (jobs, job_rx) = crossbeam_channel::bounded::<Job>(1);
            let (done_tx, done) = crossbeam_channel::bounded::<Done>(1);
            let handle = thread::Builder::new()
                .name(format!("data-send-{i}"))
                .spawn(move || helper(&sock, &job_rx, &done_tx))?;
            self.helpers.push(Helper {
                jobs,
                done,
                handle,
                share: Vec::new(),
                pending: 0,
            });
        }
        Ok(())
    }

    /// The thread (0: the caller) that sends to `to` when a round is split.
    pub(crate) fn sender_of(&self, to: &SocketAddr) -> usize {
        sender_of(to, self.active_threads())
    }

    /// Queue a datagram for helper `thread` (1..): see [`Fanout::sender_of`].
    pub(crate) fn push(&mut self, thread: usize, d: Datagram, to: SocketAddr) {
        if let Some(h) = thread.checked_sub(1).and_then(|i| self.helpers.get_mut(i)) {
            h.share.push((d, to));
        }
    }

    /// Hand every helper its share of the round (`batch` is what `Datagram::Input`s
    /// index). A helper that is gone has its share sent from here instead.
    pub(crate) fn dispatch(&mut self, sock: &UdpSocket, batch: &Arc<RecvBatch>) {
        for h in &mut self.helpers {
            if h.share.is_empty() {
                continue;
            }
            let job = Job {
                batch: Some(batch.clone()),
                items: std::mem::take(&mut h.share),
            };
            let n = job.items.len();
            match h.jobs.send(job) {
                Ok(()) => h.pending = n,
                Err(crossbeam_channel::SendError(mut job)) => {
                    let out = send_share(sock, &job, &mut self.refs);
                    self.fallback.add(out);
                    job.items.clear();
                    h.share = job.items;
                }
            }
        }
    }

    /// Wait until every helper has sent its share of the round; what they sent.
    pub(crate) fn wait(&mut self) -> SendOutcome {
        let mut out = std::mem::take(&mut self.fallback);
        for h in &mut self.helpers {
            if h.pending == 0 {
                continue;
            }
            match h.done.recv() {
                Ok(done) => {
                    out.add(done.out);
                    h.share = done.items;
                }
                // The thread died with its share: count it as failed.
                Err(_) => out.failed += h.pending,
            }
            h.pending = 0;
        }
        out
    }

    /// Stop and join the helpers.
    fn stop(&mut self) {
        for h in self.helpers.drain(..) {
            let Helper { jobs, handle, .. } = h;
            drop(jobs);
            let _ = handle.join();
        }
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A helper thread: send each share given, give its vector back emptied.
fn helper(sock: &UdpSocket, jobs: &Receiver<Job>, done: &Sender<Done>) {
    let mut refs = Vec::new();
    while let Ok(job) = jobs.recv() {
        let out = send_share(sock, &job, &mut refs);
        let Job { batch, mut items } = job;
        // The receive batch is let go of before the forwarder hears that the share is
        // sent: it reuses the batch's buffers only when no helper holds them.
        drop(batch);
        items.clear();
        if done.send(Done { items, out }).is_err() {
            return;
        }
    }
}

/// Send a share with [`send_batch`] (GSO where available).
fn send_share(
    sock: &UdpSocket,
    job: &Job,
    spare: &mut Vec<(&'static [u8], SocketAddr)>,
) -> SendOutcome {
    let mut refs = recycle(std::mem::take(spare));
    let mut missing = 0;
    for (d, to) in &job.items {
        let bytes = match d {
            Datagram::Input { token, len } => job
                .batch
                .as_deref()
                .and_then(|b| b.get(*token))
                .and_then(|(d, _)| d.get(..*len)),
            Datagram::Bytes(b) => Some(b.as_ref()),
        };
        match bytes {
            Some(b) => refs.push((b, *to)),
            None => missing += 1,
        }
    }
    let mut out = send_batch(sock, &refs);
    out.failed += missing;
    *spare = recycle(refs);
    out
}

/// An empty vector of slices with `v`'s allocation, for slices of another lifetime (the
/// standard library collects an emptied `Vec` into one of a same-sized type in place).
pub(crate) fn recycle<'b>(mut v: Vec<(&[u8], SocketAddr)>) -> Vec<(&'b [u8], SocketAddr)> {
    v.clear();
    // `v` is empty: the closure only gives the new element type.
    v.into_iter().map(|(_, to)| (&[][..], to)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(last: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 99, 1, last], port))
    }

    #[test]
    fn the_partition_is_a_fixed_function_of_the_address_in_range() {
        let addrs: Vec<SocketAddr> = (1..=100).map(|i| addr(i, 40000 + u16::from(i))).collect();
        for threads in 1..=8 {
            for a in &addrs {
                let t = sender_of(a, threads);
                assert!(t < threads.max(1));
                // The same answer every time, whoever else is a child.
                assert_eq!(sender_of(a, threads), t);
            }
        }
        assert!(addrs.iter().all(|a| sender_of(a, 1) == 0));
        assert!(addrs.iter().all(|a| sender_of(a, 0) == 0));
        // Fixed across processes and builds (no random seed): pinned values.
        let pinned: Vec<usize> = (1..=8).map(|i| sender_of(&addr(i, 5000), 4)).collect();
        assert_eq!(pinned, pinned_partition());
    }

    /// What [`sender_of`] gives 127.99.1.1..=8, port 5000, over 4 threads.
    fn pinned_partition() -> Vec<usize> {
        vec![3, 3, 3, 1, 0, 3, 3, 2]
    }

    #[test]
    fn the_partition_spreads_children_and_ports_alike() {
        for threads in [2usize, 3, 4] {
            // Many viewers on one host (ports differ) and many hosts (one port).
            for addrs in [
                (0..120u16)
                    .map(|p| SocketAddr::from(([127, 0, 0, 1], 30000 + p)))
                    .collect::<Vec<_>>(),
                (0..120u8).map(|i| addr(i, 7001)).collect(),
            ] {
                let mut per = vec![0usize; threads];
                for a in &addrs {
                    per[sender_of(a, threads)] += 1;
                }
                let fair = addrs.len() / threads;
                assert!(
                    per.iter().all(|&n| n * 2 >= fair && n <= fair * 2),
                    "{threads} threads: {per:?}"
                );
            }
        }
        let v6: SocketAddr = "[2001:db8::1]:7001".parse().expect("addr");
        assert!(sender_of(&v6, 3) < 3);
    }

    #[test]
    fn distinct_destinations_are_counted_up_to_the_threshold() {
        let mut seen = HashSet::new();
        let round = |kids: u8, per: usize| -> Vec<SocketAddr> {
            (0..per)
                .flat_map(|_| (0..kids).map(|k| addr(k, 1)))
                .collect()
        };
        assert!(!distinct_at_least(round(7, 64).into_iter(), 8, &mut seen));
        assert!(distinct_at_least(round(8, 1).into_iter(), 8, &mut seen));
        assert!(distinct_at_least(round(100, 3).into_iter(), 8, &mut seen));
        // Stops looking once the threshold is reached.
        assert_eq!(seen.len(), 8);
        // A long run to one child is one destination.
        let runs: Vec<SocketAddr> = (0..200).map(|_| addr(1, 1)).collect();
        assert!(!distinct_at_least(runs.into_iter(), 2, &mut seen));
        assert!(distinct_at_least(std::iter::empty(), 0, &mut seen));
    }

    #[test]
    fn recycled_vectors_keep_their_allocation() {
        let data = [1u8; 4];
        let mut v: Vec<(&[u8], SocketAddr)> = Vec::with_capacity(100);
        v.push((&data, addr(1, 1)));
        let cap = v.capacity();
        let r: Vec<(&'static [u8], SocketAddr)> = recycle(v);
        assert!(r.is_empty());
        assert_eq!(r.capacity(), cap);
    }

    /// Datagram `i` to a child: its number in the first bytes.
    fn numbered(i: u32) -> Bytes {
        let mut d = i.to_be_bytes().to_vec();
        d.resize(200, 7);
        Bytes::from(d)
    }

    #[test]
    fn shares_reach_every_child_in_order_from_one_address() {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let from = sock.local_addr().expect("addr");
        let child = || {
            let c = crate::net::bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
            c.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            c
        };
        let thread_of = |c: &UdpSocket| sender_of(&c.local_addr().expect("addr"), 3);
        let mut children: Vec<UdpSocket> = (0..10).map(|_| child()).collect();
        // The ports are the kernel's choice: make sure both the caller (share 0) and a
        // helper have a child, replacing the first or the last child until they do
        // (each new port is share 0 with odds 1 in 3).
        for _ in 0..1000 {
            if !children.iter().any(|c| thread_of(c) == 0) {
                children[0] = child();
            } else if !children.iter().any(|c| thread_of(c) != 0) {
                children[9] = child();
            } else {
                break;
            }
        }
        let to: Vec<SocketAddr> = children
            .iter()
            .map(|c| c.local_addr().expect("addr"))
            .collect();
        let mut f = Fanout::new(3, 8, 1);
        let batch = Arc::new(RecvBatch::new(1));
        let rounds = 20u32;
        let mut local_sent = 0;
        for r in 0..rounds {
            let items: Vec<(Bytes, SocketAddr)> = (0..5)
                .flat_map(|k| to.iter().map(move |a| (numbered(r * 5 + k), *a)))
                .collect();
            assert!(f.splits(&sock, items.iter().map(|i| i.1)));
            assert_eq!(f.active_threads(), 3);
            let mut mine = Vec::new();
            for (d, a) in items {
                match f.sender_of(&a) {
                    0 => mine.push((d, a)),
                    t => f.push(t, Datagram::Bytes(d), a),
                }
            }
            f.dispatch(&sock, &batch);
            let refs: Vec<(&[u8], SocketAddr)> =
                mine.iter().map(|(d, a)| (d.as_ref(), *a)).collect();
            let out = send_batch(&sock, &refs);
            let helpers = f.wait();
            local_sent += out.sent;
            assert_eq!(out.sent + helpers.sent, 50);
            assert_eq!(out.failed + helpers.failed, 0);
            // Every helper let go of the batch.
            assert_eq!(Arc::strong_count(&batch), 1);
        }
        // Both the caller and the helpers sent some (10 children over 3 threads).
        assert!(local_sent > 0 && local_sent < (rounds * 50) as usize);
        let mut buf = [0u8; 2048];
        for c in &children {
            for i in 0..rounds * 5 {
                let (n, src) = c.recv_from(&mut buf).expect("datagram");
                assert_eq!(src, from, "one sender address");
                assert_eq!(n, 200);
                assert_eq!(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]), i);
            }
        }
        assert!(f.helpers.iter().all(|h| !h.handle.is_finished()));
        f.stop();
        assert_eq!(f.active_threads(), 1);
    }

    #[test]
    fn one_thread_or_few_children_never_split() {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let many: Vec<SocketAddr> = (0..20).map(|i| addr(i, 9)).collect();
        let mut one = Fanout::new(1, 8, 1);
        assert!(!one.splits(&sock, many.iter().copied()));
        let mut f = Fanout::new(2, 8, 1);
        assert!(!f.splits(&sock, many[..7].iter().copied()));
        let mut few_sends = Fanout::new(2, 8, 64);
        assert!(
            !few_sends.splits(&sock, many.iter().copied()),
            "20 sends < 64"
        );
        let sixty_four: Vec<SocketAddr> = many.iter().cycle().take(64).copied().collect();
        assert!(few_sends.splits(&sock, sixty_four.into_iter()));
        assert_eq!(
            f.active_threads(),
            1,
            "no thread started below the threshold"
        );
        assert!(f.splits(&sock, many.iter().copied()));
        assert_eq!(f.active_threads(), 2);
    }
}
