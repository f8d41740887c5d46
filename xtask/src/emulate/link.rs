//! A user-space netem: one emulated link between two packet file descriptors (TAP
//! devices in the emulator, socket pairs in the tests).
//!
//! Each direction has its own reader thread, which drops a frame when the link is down,
//! at random with the loss percentage (seeded, so a run is reproducible), or when the
//! queue is full, and otherwise schedules it: serialisation at the rate (frames queue
//! behind each other like on a wire), then the delay plus a uniform jitter in
//! `[-jitter, +jitter]`; frames never overtake each other. A writer thread per direction
//! delivers each frame at its time. Parameters change at run time through
//! [`LinkHandle::set`].

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Frames waiting in one direction beyond which new ones are dropped (netem's default
/// limit is 1000 packets).
pub(crate) const QUEUE_LIMIT: usize = 1000;

/// Parameters of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Params {
    pub(crate) delay: Duration,
    pub(crate) jitter: Duration,
    /// Random loss in percent.
    pub(crate) loss_pct: f64,
    /// Bits per second; `None` is unlimited.
    pub(crate) rate_bps: Option<f64>,
    /// A link that is down drops everything.
    pub(crate) up: bool,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss_pct: 0.0,
            rate_bps: None,
            up: true,
        }
    }
}

impl Params {
    /// A topology link's parameters.
    pub(crate) fn of(l: &ott_overlay::Link) -> Self {
        Self {
            delay: Duration::from_secs_f64(l.delay_ms.max(0.0) / 1000.0),
            jitter: Duration::from_secs_f64(l.jitter_ms.max(0.0) / 1000.0),
            loss_pct: l.loss_pct,
            rate_bps: l.rate_mbit.map(|r| r * 1e6),
            up: true,
        }
    }
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub(crate) struct DirStats {
    pub(crate) delivered: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) down: AtomicU64,
    pub(crate) overflow: AtomicU64,
}

struct Queue {
    frames: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    ready: Condvar,
    len: AtomicUsize,
}

struct Direction {
    params: Mutex<Params>,
    stats: DirStats,
    queue: Queue,
}

/// A running link; dropping it stops its threads.
pub(crate) struct LinkHandle {
    dirs: [Arc<Direction>; 2],
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl LinkHandle {
    /// Forward frames between `a` and `b` (direction 0 is a → b, 1 is b → a), each
    /// direction starting with `params`; `seed` drives the loss and jitter draws.
    pub(crate) fn start(
        name: &str,
        a: File,
        b: File,
        params: Params,
        seed: u64,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let dirs = [0, 1].map(|_| {
            Arc::new(Direction {
                params: Mutex::new(params),
                stats: DirStats::default(),
                queue: Queue {
                    frames: Mutex::new(VecDeque::new()),
                    ready: Condvar::new(),
                    len: AtomicUsize::new(0),
                },
            })
        });
        let a = Arc::new(a);
        let b = Arc::new(b);
        let mut threads = Vec::new();
        for (d, (from, to)) in [(a.clone(), b.clone()), (b, a)].into_iter().enumerate() {
            let dir = dirs[d].clone();
            let stop_r = stop.clone();
            let rng = fastrand::Rng::with_seed(seed.wrapping_mul(2).wrapping_add(d as u64));
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-rx{d}"))
                    .spawn(move || reader(&from, &dir, &stop_r, rng))?,
            );
            let dir = dirs[d].clone();
            let stop_w = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-tx{d}"))
                    .spawn(move || writer(&to, &dir, &stop_w))?,
            );
        }
        Ok(Self {
            dirs,
            stop,
            threads,
        })
    }

    /// Change direction `dir`'s parameters (0: a → b, 1: b → a), from the next frame on.
    pub(crate) fn set(&self, dir: usize, f: impl FnOnce(&mut Params)) {
        if let Some(d) = self.dirs.get(dir) {
            if let Ok(mut p) = d.params.lock() {
                f(&mut p);
            }
        }
    }

    /// Change both directions.
    pub(crate) fn set_both(&self, f: impl Fn(&mut Params)) {
        self.set(0, &f);
        self.set(1, &f);
    }

    /// Direction `dir`'s counters.
    pub(crate) fn stats(&self, dir: usize) -> Option<&DirStats> {
        self.dirs.get(dir).map(|d| &d.stats)
    }
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for d in &self.dirs {
            d.queue.ready.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Wait up to `ms` for `f` to be readable.
fn readable(f: &File, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for an fd this thread's Arc keeps open.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

fn reader(from: &File, dir: &Direction, stop: &AtomicBool, mut rng: fastrand::Rng) {
    let mut buf = vec![0u8; 65_536];
    // When the wire is free again (rate), and the last frame's delivery time (no reordering).
    let mut wire_free = Instant::now();
    let mut last_due = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if !readable(from, 100) {
            continue;
        }
        let n = match (&*from).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        let now = Instant::now();
        let p = dir.params.lock().map(|p| *p).unwrap_or_default();
        if !p.up {
            dir.stats.down.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if p.loss_pct > 0.0 && rng.f64() * 100.0 < p.loss_pct {
            dir.stats.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if dir.queue.len.load(Ordering::SeqCst) >= QUEUE_LIMIT {
            dir.stats.overflow.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut sent = now;
        if let Some(rate) = p.rate_bps.filter(|r| *r > 0.0) {
            let start = wire_free.max(now);
            sent = start + Duration::from_secs_f64(n as f64 * 8.0 / rate);
            wire_free = sent;
        }
        let mut delay = p.delay.as_secs_f64();
        if !p.jitter.is_zero() {
            delay += (rng.f64() * 2.0 - 1.0) * p.jitter.as_secs_f64();
        }
        let due = (sent + Duration::from_secs_f64(delay.max(0.0))).max(last_due);
        last_due = due;
        if let Ok(mut q) = dir.queue.frames.lock() {
            q.push_back((due, buf[..n].to_vec()));
            dir.queue.len.fetch_add(1, Ordering::SeqCst);
        }
        dir.queue.ready.notify_one();
    }
}

fn writer(to: &File, dir: &Direction, stop: &AtomicBool) {
    let Ok(mut q) = dir.queue.frames.lock() else {
        return;
    };
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(due) = q.front().map(|f| f.0) else {
            q = match dir.queue.ready.wait_timeout(q, Duration::from_millis(100)) {
                Ok((q, _)) => q,
                Err(_) => return,
            };
            continue;
        };
        let now = Instant::now();
        if due > now {
            q = match dir.queue.ready.wait_timeout(q, due - now) {
                Ok((q, _)) => q,
                Err(_) => return,
            };
            continue;
        }
        let Some((_, frame)) = q.pop_front() else {
            continue;
        };
        dir.queue.len.fetch_sub(1, Ordering::SeqCst);
        drop(q);
        // A full device queue or a device going away drops the frame, like a wire.
        if (&*to).write(&frame).is_ok() {
            dir.stats.delivered.fetch_add(1, Ordering::Relaxed);
        }
        q = match dir.queue.frames.lock() {
            Ok(q) => q,
            Err(_) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A connected pair of packet sockets: each write is one frame at the other end.
    fn pair() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two fds on success; we take ownership of both.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
        // SAFETY: both fds are fresh and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    /// What one side measured of the frames the other sent through the link.
    struct Measured {
        received: usize,
        mean_delay_ms: f64,
        /// Time from the first to the last arrival.
        span_ms: f64,
    }

    /// Sends `count` frames of `size` bytes (each carrying its index) into `tx`, spaced by
    /// `gap`, and reads them at `rx` until none has come for `quiet`.
    fn measure(
        tx: &File,
        rx: &File,
        count: usize,
        size: usize,
        gap: Duration,
        quiet: Duration,
    ) -> Measured {
        let start = Instant::now();
        let mut sent_at = Vec::with_capacity(count);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 65_536];
                loop {
                    if !readable(rx, quiet.as_millis() as i32) {
                        return got;
                    }
                    let Ok(n) = (&*rx).read(&mut buf) else {
                        return got;
                    };
                    if n >= 8 {
                        let idx = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                        got.push((idx as usize, Instant::now()));
                    }
                }
            });
            let mut frame = vec![0u8; size];
            for i in 0..count {
                frame[..8].copy_from_slice(&(i as u64).to_le_bytes());
                sent_at.push(Instant::now());
                (&*tx).write_all(&frame).expect("send");
                if !gap.is_zero() {
                    std::thread::sleep(gap);
                }
            }
            let got = reader.join().expect("reader");
            let delays: Vec<f64> = got
                .iter()
                .map(|(i, t)| t.duration_since(sent_at[*i]).as_secs_f64() * 1000.0)
                .collect();
            let span = match (got.first(), got.last()) {
                (Some(a), Some(b)) => b.1.duration_since(a.1).as_secs_f64() * 1000.0,
                _ => 0.0,
            };
            let _ = start;
            Measured {
                received: got.len(),
                mean_delay_ms: delays.iter().sum::<f64>() / delays.len().max(1) as f64,
                span_ms: span,
            }
        })
    }

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        crate::emulate::ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn link(params: Params) -> (File, File, LinkHandle) {
        let (a_outer, a_inner) = pair();
        let (b_outer, b_inner) = pair();
        let l = LinkHandle::start("test", a_inner, b_inner, params, 7).expect("link");
        (a_outer, b_outer, l)
    }

    #[test]
    fn delay_matches_in_both_directions() {
        let _serial = serial();
        let (a, b, l) = link(Params::default());
        l.set(0, |p| p.delay = Duration::from_millis(30));
        l.set(1, |p| p.delay = Duration::from_millis(10));
        let ab = measure(
            &a,
            &b,
            100,
            200,
            Duration::from_millis(2),
            Duration::from_millis(300),
        );
        let ba = measure(
            &b,
            &a,
            100,
            200,
            Duration::from_millis(2),
            Duration::from_millis(300),
        );
        assert_eq!((ab.received, ba.received), (100, 100));
        // Never early; late by at most a scheduling hiccup.
        assert!(
            (30.0..40.0).contains(&ab.mean_delay_ms),
            "a→b {} ms",
            ab.mean_delay_ms
        );
        assert!(
            (10.0..20.0).contains(&ba.mean_delay_ms),
            "b→a {} ms",
            ba.mean_delay_ms
        );
    }

    #[test]
    fn loss_matches_in_both_directions() {
        let _serial = serial();
        let (a, b, l) = link(Params {
            loss_pct: 20.0,
            ..Params::default()
        });
        let n = 2000;
        let ab = measure(&a, &b, n, 100, Duration::ZERO, Duration::from_millis(300));
        let ba = measure(&b, &a, n, 100, Duration::ZERO, Duration::from_millis(300));
        for (what, m, d) in [("a→b", &ab, 0), ("b→a", &ba, 1)] {
            let lost = n - m.received;
            let counted = l.stats(d).expect("dir").lost.load(Ordering::Relaxed) as usize;
            assert_eq!(
                lost, counted,
                "{what}: every missing frame is a counted loss"
            );
            let pct = lost as f64 * 100.0 / n as f64;
            // 20 % of 2000: σ ≈ 0.9 %; the seeded draw is reproducible anyway.
            assert!((17.0..23.0).contains(&pct), "{what}: {pct} % lost");
        }
    }

    #[test]
    fn rate_matches_in_both_directions() {
        let _serial = serial();
        // 200 frames of 1250 bytes at 10 Mbit/s: 1 ms each on the wire.
        let (a, b, _l) = link(Params {
            rate_bps: Some(10e6),
            ..Params::default()
        });
        for (what, tx, rx) in [("a→b", &a, &b), ("b→a", &b, &a)] {
            let m = measure(
                tx,
                rx,
                200,
                1250,
                Duration::ZERO,
                Duration::from_millis(300),
            );
            assert_eq!(m.received, 200, "{what}");
            let mbit = 199.0 * 1250.0 * 8.0 / (m.span_ms / 1000.0) / 1e6;
            assert!((8.5..10.5).contains(&mbit), "{what}: {mbit:.2} Mbit/s");
        }
    }

    #[test]
    fn a_link_taken_down_drops_everything_and_comes_back() {
        let _serial = serial();
        let (a, b, l) = link(Params::default());
        l.set_both(|p| p.up = false);
        let m = measure(&a, &b, 50, 100, Duration::ZERO, Duration::from_millis(200));
        assert_eq!(m.received, 0);
        assert_eq!(l.stats(0).expect("dir").down.load(Ordering::Relaxed), 50);
        l.set_both(|p| p.up = true);
        let m = measure(&a, &b, 50, 100, Duration::ZERO, Duration::from_millis(200));
        assert_eq!(m.received, 50);
    }
}
