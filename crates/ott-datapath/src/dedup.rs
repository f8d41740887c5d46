//! Duplicate suppression by sequence number, for make-before-break switches, and
//! locking onto one source per stream.
//!
//! Two servers offering the same stream number their datagrams independently (each
//! starts its sequence and frame numbers at random), so when a receiver's copy of a
//! stream moves from one server to the other the numbers jump. [`StreamDedup`] keeps
//! to the sequence space it receives; a datagram far outside it is another source's,
//! dropped while the current source still flows, and adopted (a fresh window, and the
//! caller resets its reassembly) once the current source has been silent for
//! [`StreamDedup::SWITCH_AFTER`].

use std::time::{Duration, Instant};

/// Remembers which of the last [`SeqWindow::SIZE`] sequence numbers were seen.
///
/// Sequence numbers wrap (serial-number arithmetic). A number far behind the newest
/// (a restarted source) resets the window instead of being dropped for ever.
#[derive(Debug, Clone)]
pub struct SeqWindow {
    newest: Option<u32>,
    bits: [u64; Self::WORDS],
}

impl Default for SeqWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl SeqWindow {
    const WORDS: usize = 16;
    /// How many sequence numbers back duplicates are detected.
    pub const SIZE: u32 = (Self::WORDS * 64) as u32;

    /// An empty window.
    pub fn new() -> Self {
        Self {
            newest: None,
            bits: [0; Self::WORDS],
        }
    }

    fn bit(&mut self, seq: u32) -> (usize, u64) {
        let i = (seq % Self::SIZE) as usize;
        (i / 64, 1u64 << (i % 64))
    }

    /// Record `seq`; returns `false` when it was already seen (a duplicate).
    pub fn insert(&mut self, seq: u32) -> bool {
        let Some(newest) = self.newest else {
            self.reset_at(seq);
            return true;
        };
        let ahead = seq.wrapping_sub(newest);
        if ahead == 0 {
            return false;
        }
        if ahead < 0x8000_0000 {
            if ahead >= Self::SIZE {
                self.reset_at(seq);
                return true;
            }
            // Clear the slots we skip over, then mark seq.
            for s in 1..=ahead {
                let (w, m) = self.bit(newest.wrapping_add(s));
                self.bits[w] &= !m;
            }
            let (w, m) = self.bit(seq);
            self.bits[w] |= m;
            self.newest = Some(seq);
            return true;
        }
        let behind = newest.wrapping_sub(seq);
        if behind >= Self::SIZE {
            // Far behind: the source restarted; start over.
            self.reset_at(seq);
            return true;
        }
        let (w, m) = self.bit(seq);
        if self.bits[w] & m != 0 {
            return false;
        }
        self.bits[w] |= m;
        true
    }

    /// How far ahead of the newest number a datagram may be and still belong to the same
    /// sequence space: a burst of loss (or an overloaded receiver dropping in its socket)
    /// skips many numbers, while another server's space starts at a random place, so it
    /// lands this close by chance once in about 2,000 switches.
    pub const AHEAD: u32 = 1 << 20;

    /// Whether `seq` belongs to the same sequence space as the newest number seen: up to
    /// [`SeqWindow::AHEAD`] ahead of it, or within the window behind it; true when nothing
    /// was seen yet.
    pub fn near(&self, seq: u32) -> bool {
        let Some(newest) = self.newest else {
            return true;
        };
        let d = seq.wrapping_sub(newest);
        d < Self::AHEAD || d.wrapping_neg() < Self::SIZE
    }

    fn reset_at(&mut self, seq: u32) {
        self.bits = [0; Self::WORDS];
        let (w, m) = self.bit(seq);
        self.bits[w] |= m;
        self.newest = Some(seq);
    }
}

/// What [`StreamDedup::accept`] decided about one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First copy from the current source: forward or play it.
    New,
    /// Already seen: drop it.
    Duplicate,
    /// Another source's datagram while the current one still flows: drop it.
    OtherSource,
    /// The current source went silent and this datagram's source takes over: a fresh
    /// window; the caller resets any per-source state (reassembly) and plays it.
    Switched,
}

/// Per-stream receive state: duplicate suppression within one source's sequence space,
/// and a switch to another source only once the current one is silent.
#[derive(Debug, Clone, Default)]
pub struct StreamDedup {
    window: SeqWindow,
    last: Option<Instant>,
}

impl StreamDedup {
    /// Silence of the current source after which another source is adopted.
    pub const SWITCH_AFTER: Duration = Duration::from_millis(150);

    /// Classify datagram `seq` received at `now`.
    pub fn accept(&mut self, seq: u32, now: Instant) -> Verdict {
        if self.window.near(seq) {
            if self.window.insert(seq) {
                self.last = Some(now);
                return Verdict::New;
            }
            return Verdict::Duplicate;
        }
        let silent = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::SWITCH_AFTER);
        if !silent {
            return Verdict::OtherSource;
        }
        self.window = SeqWindow::new();
        self.window.insert(seq);
        self.last = Some(now);
        Verdict::Switched
    }
}

#[cfg(test)]
// Tests take the real clock as an arbitrary origin of fake time, and read sample files.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn test_locks_to_one_source_and_switches_after_silence() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = StreamDedup::default();
        assert_eq!(d.accept(100, ms(0)), Verdict::New);
        assert_eq!(d.accept(100, ms(1)), Verdict::Duplicate);
        assert_eq!(d.accept(101, ms(40)), Verdict::New);
        // Another server's copy, far away in sequence space, while the first flows.
        assert_eq!(d.accept(3_000_000_000, ms(50)), Verdict::OtherSource);
        assert_eq!(d.accept(102, ms(80)), Verdict::New);
        // The first goes silent: the other takes over, then the old one is the stranger.
        assert_eq!(d.accept(3_000_000_001, ms(80 + 149)), Verdict::OtherSource);
        assert_eq!(d.accept(3_000_000_002, ms(80 + 150)), Verdict::Switched);
        assert_eq!(d.accept(3_000_000_003, ms(240)), Verdict::New);
        assert_eq!(d.accept(103, ms(250)), Verdict::OtherSource);
        assert_eq!(d.accept(3_000_000_002, ms(260)), Verdict::Duplicate);
    }

    #[test]
    fn test_a_long_burst_of_loss_is_not_another_source() {
        let t0 = Instant::now();
        let mut d = StreamDedup::default();
        assert_eq!(d.accept(100, t0), Verdict::New);
        // 50,000 datagrams lost (a receiver overloaded, a link down briefly): same source.
        assert_eq!(d.accept(50_100, t0), Verdict::New);
        assert_eq!(d.accept(50_101, t0), Verdict::New);
    }

    #[test]
    fn test_duplicates_and_reordering() {
        let mut w = SeqWindow::new();
        assert!(w.insert(10));
        assert!(!w.insert(10));
        assert!(w.insert(12));
        assert!(w.insert(11));
        assert!(!w.insert(11));
        assert!(!w.insert(12));
    }

    #[test]
    fn test_wraparound() {
        let mut w = SeqWindow::new();
        assert!(w.insert(u32::MAX - 1));
        assert!(w.insert(u32::MAX));
        assert!(w.insert(0));
        assert!(!w.insert(u32::MAX));
        assert!(w.insert(1));
    }

    #[test]
    fn test_far_jump_resets() {
        let mut w = SeqWindow::new();
        for s in 0..100 {
            assert!(w.insert(s));
        }
        assert!(w.insert(5000));
        assert!(w.insert(3)); // a restarted source is accepted again
        assert!(!w.insert(3));
    }
}
