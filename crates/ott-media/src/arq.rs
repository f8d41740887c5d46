//! Per-hop loss recovery: a bounded retransmission buffer for the sender side and a gap
//! tracker that schedules NACKs on the receiver side. Sans-IO: time is a parameter.
//!
//! Sequence numbers are the media header's per-stream `seq` (u32, wrapping). Both sides
//! work on a 64-bit "unwrapped" sequence relative to the newest seen, so wrap-around is
//! invisible to them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ott_proto::NackRange;

/// How far below the oldest datagram seen a start-up reordering may reach.
const START_REORDER: u64 = 64;

/// Most fragments of a frame still to come that [`GapTracker::on_fragment`] waits for
/// as the frame's tail.
pub const MAX_TAIL: u64 = 256;

/// The newest datagrams of one stream, by sequence number, to answer NACKs, each with
/// when it was kept (so that a new child can be sent the stream's recent past,
/// [`RetransmitBuffer::recent`]).
///
/// Holds at most `capacity` datagrams; inserting beyond that forgets the oldest. Memory
/// is bounded by `capacity` × the largest datagram.
#[derive(Debug)]
pub struct RetransmitBuffer {
    slots: Vec<Option<Slot>>,
    /// Newest sequence number inserted (serial-number order).
    newest: Option<u32>,
}

#[derive(Debug, Clone)]
struct Slot {
    seq: u32,
    at: Instant,
    datagram: Bytes,
}

impl RetransmitBuffer {
    /// A buffer of `capacity` datagrams (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: vec![None; capacity.max(1)],
            newest: None,
        }
    }

    fn slot(&self, seq: u32) -> Option<&Slot> {
        let n = self.slots.len();
        match self.slots.get(seq as usize % n) {
            Some(Some(s)) if s.seq == seq => Some(s),
            _ => None,
        }
    }

    /// Remember datagram `seq`, received (or made) at `at`.
    pub fn insert(&mut self, seq: u32, at: Instant, datagram: Bytes) {
        let n = self.slots.len();
        if let Some(slot) = self.slots.get_mut(seq as usize % n) {
            *slot = Some(Slot { seq, at, datagram });
        }
        if self.newest.is_none_or(|w| ott_proto::older(w, seq)) {
            self.newest = Some(seq);
        }
    }

    /// Datagram `seq`, if still held.
    pub fn get(&self, seq: u32) -> Option<&Bytes> {
        self.slot(seq).map(|s| &s.datagram)
    }

    /// The stream's recent past: the sequence numbers held, oldest first, from the
    /// newest back to the first one kept before `since` (not included), at most `limit`
    /// of them. Numbers lost on the way in are skipped.
    pub fn recent(&self, since: Instant, limit: usize) -> Vec<u32> {
        let Some(newest) = self.newest else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for back in 0..self.slots.len() as u32 {
            if out.len() >= limit {
                break;
            }
            let seq = newest.wrapping_sub(back);
            match self.slot(seq) {
                Some(s) if s.at < since => break,
                Some(_) => out.push(seq),
                None => {}
            }
        }
        out.reverse();
        out
    }

    /// How many datagrams it can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

/// When and how often a receiver asks for missing datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NackConfig {
    /// Wait this long after a gap appears before the first NACK, so that mere
    /// reordering does not cause one.
    pub reorder_delay: Duration,
    /// Time between NACKs for the same datagram (about one RTT of the hop).
    pub retry_interval: Duration,
    /// Most NACKs for one datagram.
    pub max_retries: u32,
    /// A datagram missing for longer than this is given up (the latency budget).
    pub give_up_after: Duration,
    /// Most missing datagrams tracked at once; beyond that the oldest are given up.
    pub max_missing: usize,
    /// Most ranges in one NACK message.
    pub max_ranges: usize,
}

impl Default for NackConfig {
    fn default() -> Self {
        Self {
            reorder_delay: Duration::from_millis(5),
            retry_interval: Duration::from_millis(30),
            max_retries: 8,
            give_up_after: Duration::from_millis(300),
            max_missing: 1024,
            max_ranges: 64,
        }
    }
}

/// Counters of a [`GapTracker`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NackStats {
    /// NACK messages produced.
    pub nacks: u64,
    /// Sequence numbers asked for (a number asked twice counts twice).
    pub requested: u64,
    /// Missing datagrams that arrived later (recovered or reordered).
    pub recovered: u64,
    /// Missing datagrams given up (retries exhausted, too old, or too many missing).
    pub given_up: u64,
}

/// A run of consecutive missing sequence numbers, all noticed at once.
#[derive(Debug, Clone, Copy)]
struct Gap {
    len: u64,
    since: Instant,
    next: Instant,
    tries: u32,
}

/// Receiver side of one stream from one upstream: finds gaps in the sequence numbers
/// and says when to NACK which of them.
///
/// Missing datagrams are kept as runs, so a burst costs one entry, not one per datagram:
/// an overloaded receiver that loses much does not spend more on bookkeeping.
///
/// Drive it with [`GapTracker::on_datagram`] for each datagram received, then
/// [`GapTracker::poll_nack`] until it returns `None`, and call again at
/// [`GapTracker::poll_timeout`].
#[derive(Debug)]
pub struct GapTracker {
    config: NackConfig,
    /// Newest sequence number seen, unwrapped.
    newest: Option<u64>,
    /// Oldest sequence number seen, unwrapped: datagrams reordered at start-up may arrive
    /// below it, revealing gaps there too.
    oldest: Option<u64>,
    /// Runs of missing numbers by their first number; they never overlap.
    gaps: BTreeMap<u64, Gap>,
    /// Missing numbers in all runs.
    count: u64,
    /// No entry needs attention before this instant: polls before it cost nothing.
    wake: Option<Instant>,
    /// The newest frame is not complete: its last fragment's number (unwrapped), and
    /// when the rest of it counts as missing if nothing newer came
    /// ([`GapTracker::on_fragment`]).
    tail: Option<(u64, Instant)>,
    stats: NackStats,
}

impl GapTracker {
    /// A tracker that has seen nothing yet.
    pub fn new(config: NackConfig) -> Self {
        Self {
            config,
            newest: None,
            oldest: None,
            gaps: BTreeMap::new(),
            count: 0,
            wake: None,
            tail: None,
            stats: NackStats::default(),
        }
    }

    /// Forget everything (a new upstream or a new stream).
    pub fn reset(&mut self) {
        self.newest = None;
        self.oldest = None;
        self.gaps.clear();
        self.count = 0;
        self.wake = None;
        self.tail = None;
    }

    /// The counters.
    pub fn stats(&self) -> NackStats {
        self.stats
    }

    /// Number of datagrams currently missing.
    pub fn missing(&self) -> usize {
        usize::try_from(self.count).unwrap_or(usize::MAX)
    }

    fn unwrap_seq(&self, seq: u32) -> u64 {
        let Some(newest) = self.newest else {
            return u64::from(seq) + (1 << 32);
        };
        let delta = seq.wrapping_sub(newest as u32) as i32;
        newest.saturating_add_signed(i64::from(delta))
    }

    /// Note datagram `seq` (a retransmission too). Returns whether it filled a gap.
    pub fn on_datagram(&mut self, now: Instant, seq: u32) -> bool {
        let s = self.unwrap_seq(seq);
        let (Some(newest), Some(oldest)) = (self.newest, self.oldest) else {
            self.newest = Some(s);
            self.oldest = Some(s);
            return false;
        };
        if s > newest {
            self.add_missing(now, newest + 1, s);
            self.newest = Some(s);
            self.tail = None;
            return false;
        }
        if s < oldest {
            // Reordered at start-up: what lies between it and the oldest seen is missing.
            if oldest - s <= START_REORDER {
                self.add_missing(now, s + 1, oldest);
            }
            self.oldest = Some(s);
            return false;
        }
        let filled = self.fill(s);
        if filled {
            self.stats.recovered += 1;
        }
        filled
    }

    /// Note datagram `seq`, fragment `frag_index` of `frag_count` of its frame (a
    /// retransmission too). Returns whether it filled a gap.
    ///
    /// Besides what [`GapTracker::on_datagram`] does, a frame whose last fragments are
    /// lost is noticed without waiting for the next frame: the fragments of a frame are
    /// sent together with consecutive numbers, so when the newest datagram is not its
    /// frame's last and nothing newer comes within the reorder delay, the rest of the
    /// frame counts as missing and is NACKed. A frame's tail is NACKed up to a
    /// frame interval sooner at each hop; fragment counts above [`MAX_TAIL`] are not
    /// trusted for this (the next frame then reveals the loss, as before).
    pub fn on_fragment(
        &mut self,
        now: Instant,
        seq: u32,
        frag_index: u16,
        frag_count: u16,
    ) -> bool {
        let filled = self.on_datagram(now, seq);
        let s = self.unwrap_seq(seq);
        if self.newest == Some(s) {
            let left = u64::from(frag_count.saturating_sub(1).saturating_sub(frag_index));
            self.tail = None;
            if left > 0 && left <= MAX_TAIL {
                let due = now + self.config.reorder_delay;
                self.tail = Some((s + left, due));
                self.wake = Some(self.wake.map_or(due, |w| w.min(due)));
            }
        }
        filled
    }

    /// The tail of the newest frame is overdue: mark it missing, to be NACKed now.
    fn tail_due(&mut self, now: Instant) {
        let Some((last, due)) = self.tail else {
            return;
        };
        if due > now {
            return;
        }
        self.tail = None;
        let Some(newest) = self.newest.filter(|n| last > *n) else {
            return;
        };
        self.add_missing(now, newest + 1, last + 1);
        self.newest = Some(last);
        // Already waited for: asked at once.
        if let Some(g) = self.gaps.get_mut(&(newest + 1)) {
            g.next = now;
        }
    }

    /// A downstream node asked for `seq`, which is older than anything this tracker has
    /// seen (this node joined the stream after it passed): mark `seq` up to the oldest
    /// seen as missing so that it is NACKed upstream in turn, and reaches the asker
    /// with the other children when it comes back. This is how a node that moved to a
    /// new parent recovers what it missed while the parent it lost was dying, even when
    /// the new parent took the stream only now. Returns whether anything was marked:
    /// nothing is for a number not older than the oldest seen (then it was received,
    /// or is missing already), nor for one over `max_missing` below it.
    pub fn want_older(&mut self, now: Instant, seq: u32) -> bool {
        let Some(oldest) = self.oldest else {
            return false;
        };
        let s = self.unwrap_seq(seq);
        if s >= oldest || oldest - s > self.config.max_missing as u64 {
            return false;
        }
        self.add_missing(now, s, oldest);
        self.oldest = Some(s);
        true
    }

    /// Remove `s` from the run holding it, if any, splitting the run.
    fn fill(&mut self, s: u64) -> bool {
        let Some((&start, &gap)) = self.gaps.range(..=s).next_back() else {
            return false;
        };
        if s >= start + gap.len {
            return false;
        }
        self.gaps.remove(&start);
        if s > start {
            self.gaps.insert(
                start,
                Gap {
                    len: s - start,
                    ..gap
                },
            );
        }
        if s + 1 < start + gap.len {
            self.gaps.insert(
                s + 1,
                Gap {
                    len: start + gap.len - s - 1,
                    ..gap
                },
            );
        }
        self.count -= 1;
        true
    }

    /// Mark `from..to` missing, within the bounds of the configuration.
    fn add_missing(&mut self, now: Instant, from: u64, to: u64) {
        if to <= from {
            return;
        }
        let len = to - from;
        if len > self.config.max_missing as u64 {
            // A burst longer than we can track, or a source that jumped: give up what was missing.
            self.stats.given_up += self.count;
            self.gaps.clear();
            self.count = 0;
            return;
        }
        let next = now + self.config.reorder_delay;
        self.wake = Some(self.wake.map_or(next, |w| w.min(next)));
        self.gaps.insert(
            from,
            Gap {
                len,
                since: now,
                next,
                tries: 0,
            },
        );
        self.count += len;
        // Keep at most max_missing numbers: give up the oldest.
        let max = self.config.max_missing as u64;
        while self.count > max {
            let excess = self.count - max;
            let Some((start, gap)) = self.gaps.pop_first() else {
                break;
            };
            if gap.len > excess {
                self.gaps.insert(
                    start + excess,
                    Gap {
                        len: gap.len - excess,
                        ..gap
                    },
                );
                self.count -= excess;
                self.stats.given_up += excess;
            } else {
                self.count -= gap.len;
                self.stats.given_up += gap.len;
            }
        }
    }

    /// The sequence numbers to NACK now, as ranges, or `None` if none is due.
    pub fn poll_nack(&mut self, now: Instant) -> Option<Vec<NackRange>> {
        self.poll_nack_again(now).map(|(ranges, _)| ranges)
    }

    /// [`GapTracker::poll_nack`], and whether any range is asked for again (its last
    /// NACK or the answer was lost: the hop is losing). A caller sends such a NACK
    /// twice, so that one loss more of the NACK or of the retransmission does not cost
    /// another retry interval: on a hop that loses a sixth of each way, a retry then
    /// fails about one time in ten instead of one in three.
    pub fn poll_nack_again(&mut self, now: Instant) -> Option<(Vec<NackRange>, bool)> {
        if self.wake.is_none_or(|w| w > now) {
            return None;
        }
        self.tail_due(now);
        self.expire(now);
        let mut ranges: Vec<NackRange> = Vec::new();
        let retry = self.config.retry_interval;
        let mut again = false;
        for (&start, gap) in self.gaps.iter_mut() {
            if gap.next > now {
                continue;
            }
            if ranges.len() >= self.config.max_ranges {
                break;
            }
            again |= gap.tries > 0;
            gap.tries += 1;
            gap.next = now + retry;
            self.stats.requested += gap.len;
            let mut first = start;
            let mut left = gap.len;
            while left > 0 {
                let n = left.min(u64::from(u16::MAX));
                ranges.push(NackRange {
                    first: first as u32,
                    count: n as u16,
                });
                first += n;
                left -= n;
            }
        }
        self.wake = self.earliest();
        if ranges.is_empty() {
            return None;
        }
        self.stats.nacks += 1;
        Some((ranges, again))
    }

    /// Give up runs older than the budget, and those whose last NACK went unanswered for
    /// a whole retry interval.
    fn expire(&mut self, now: Instant) {
        let (give_up, max) = (self.config.give_up_after, self.config.max_retries);
        let mut dropped = 0;
        self.gaps.retain(|_, g| {
            let young = now.saturating_duration_since(g.since) < give_up;
            let may_retry = g.tries < max || g.next > now;
            let keep = young && may_retry;
            if !keep {
                dropped += g.len;
            }
            keep
        });
        self.count -= dropped;
        self.stats.given_up += dropped;
    }

    /// When [`GapTracker::poll_nack`] next has something to say (or a run expires).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.wake
    }

    fn earliest(&self) -> Option<Instant> {
        let tail = self.tail.map(|(_, due)| due);
        self.gaps
            .values()
            .map(|g| g.next.min(g.since + self.config.give_up_after))
            .chain(tail)
            .min()
    }
}

/// Expand NACK ranges into sequence numbers, at most `limit` of them (a bound on the
/// work one NACK can cause).
pub fn nacked_seqs(ranges: &[NackRange], limit: usize) -> impl Iterator<Item = u32> + '_ {
    ranges
        .iter()
        .flat_map(|r| (0..u32::from(r.count)).map(move |i| r.first.wrapping_add(i)))
        .take(limit)
}
