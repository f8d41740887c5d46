//! Frame pacing without drift, sans-IO.

use std::time::{Duration, Instant};

use crate::clip::{DEFAULT_FPS, MAX_FPS};

/// Lowest frame rate a [`Pacer`] runs at.
pub const MIN_FPS: f64 = 0.01;

/// Ticks per second of media timestamps.
pub const CLOCK_RATE: u64 = 90_000;

/// When each frame of a stream is due, and its 90 kHz timestamp.
///
/// Frame `n` is due at `start + n / fps`, computed from `n` each time, so rounding never
/// accumulates into drift. The caller reads the clock and sleeps; the pacer only does the
/// arithmetic.
#[derive(Debug, Clone)]
pub struct Pacer {
    fps: f64,
    start: Instant,
    /// Frames sent since `start`.
    n: u64,
    /// 90 kHz ticks already elapsed at `start` (the timestamp of frame 0 of this schedule).
    ts_base: u64,
}

impl Pacer {
    /// A schedule whose frame 0 is due at `start`, with timestamp 0. A rate that is not a
    /// finite positive number falls back to [`DEFAULT_FPS`]; others are clamped to
    /// `[MIN_FPS, MAX_FPS]`.
    pub fn new(fps: f64, start: Instant) -> Self {
        let fps = if fps.is_finite() && fps > 0.0 {
            fps.clamp(MIN_FPS, MAX_FPS)
        } else {
            DEFAULT_FPS
        };
        Self {
            fps,
            start,
            n: 0,
            ts_base: 0,
        }
    }

    /// The rate in use, frames per second.
    pub fn fps(&self) -> f64 {
        self.fps
    }

    /// When the next frame is due.
    pub fn next_due(&self) -> Instant {
        self.start + self.offset(self.n)
    }

    /// The 90 kHz timestamp of the next frame (wraps at 2³²).
    pub fn timestamp_90k(&self) -> u32 {
        // Truncation is the intended wraparound of the 32-bit media clock.
        (self.ts_base.wrapping_add(self.ticks(self.n))) as u32
    }

    /// Record that the next frame was sent.
    pub fn advance(&mut self) {
        self.n += 1;
    }

    /// If `now` is more than `max_lag` past the next frame's due time (the process
    /// stalled), restart the schedule so the next frame is due at `now` rather than
    /// sending the missed frames in a burst. Timestamps continue from where they were.
    pub fn catch_up(&mut self, now: Instant, max_lag: Duration) {
        if now.saturating_duration_since(self.next_due()) > max_lag {
            tracing::debug!(
                lag_ms = now.saturating_duration_since(self.next_due()).as_millis() as u64,
                "pacer restarts its schedule"
            );
            self.ts_base = self.ts_base.wrapping_add(self.ticks(self.n));
            self.n = 0;
            self.start = now;
        }
    }

    fn offset(&self, n: u64) -> Duration {
        // n / fps in whole nanoseconds; fps >= MIN_FPS keeps this far from overflow.
        Duration::from_nanos((n as f64 * 1e9 / self.fps).round() as u64)
    }

    fn ticks(&self, n: u64) -> u64 {
        (n as f64 * CLOCK_RATE as f64 / self.fps).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_no_drift_over_10000_frames() {
        let t0 = Instant::now();
        let fps = 30_000.0 / 1001.0; // 29.97
        let mut p = Pacer::new(fps, t0);
        for _ in 0..10_000 {
            p.advance();
        }
        // Exactly 10000 * 1001 / 30000 s = 333.666666... s.
        let exact_ns: u128 = 10_000 * 1001 * 1_000_000_000 / 30_000;
        let got = p.next_due().duration_since(t0).as_nanos();
        assert!(got.abs_diff(exact_ns) <= 1, "{got} vs {exact_ns}");
        // 90 kHz: 10000 frames * 3003 ticks.
        assert_eq!(p.timestamp_90k(), 10_000 * 3003);
    }

    #[test]
    fn test_schedule_and_timestamps() {
        let t0 = Instant::now();
        let mut p = Pacer::new(25.0, t0);
        assert_eq!((p.next_due(), p.timestamp_90k()), (t0, 0));
        p.advance();
        assert_eq!(p.next_due(), t0 + Duration::from_millis(40));
        assert_eq!(p.timestamp_90k(), 3600);
    }

    #[test]
    fn test_catch_up_restarts_without_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(25.0, t0);
        p.advance();
        let lag = Duration::from_millis(200);
        // Small lag: keep the schedule (the frames are sent back to back to catch up).
        p.catch_up(t0 + Duration::from_millis(100), lag);
        assert_eq!(p.next_due(), t0 + Duration::from_millis(40));
        // Stall of 5 s: restart at now, timestamps continue.
        let now = t0 + Duration::from_secs(5);
        p.catch_up(now, lag);
        assert_eq!(p.next_due(), now);
        assert_eq!(p.timestamp_90k(), 3600);
        p.advance();
        assert_eq!(p.next_due(), now + Duration::from_millis(40));
        assert_eq!(p.timestamp_90k(), 7200);
    }

    #[test]
    fn test_bad_rates() {
        let t0 = Instant::now();
        assert_eq!(Pacer::new(f64::NAN, t0).fps(), DEFAULT_FPS);
        assert_eq!(Pacer::new(-1.0, t0).fps(), DEFAULT_FPS);
        assert_eq!(Pacer::new(1e9, t0).fps(), MAX_FPS);
        assert_eq!(Pacer::new(1e-9, t0).fps(), MIN_FPS);
    }

    #[test]
    fn test_timestamp_wraps() {
        let t0 = Instant::now();
        let mut p = Pacer::new(25.0, t0);
        // 2^32 / 3600 = 1193046.47 frames: frame 1193047 wraps.
        for _ in 0..1_193_047 {
            p.advance();
        }
        assert_eq!(
            p.timestamp_90k(),
            (1_193_047u64 * 3600 - (1u64 << 32)) as u32
        );
    }
}
