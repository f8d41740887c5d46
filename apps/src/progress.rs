//! `ott-client`'s live status line, like ffmpeg's `frame= fps=`: rewritten in place
//! on standard error twice a second when standard error is a terminal, never written
//! to a pipe or a file. The frame rate it measures is also the client's `fps` in
//! `/status` and `ott_viewer_fps` in `/metrics`, terminal or not.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often the line is rewritten and the frame rate measured.
pub const PERIOD: Duration = Duration::from_millis(500);

/// What the line shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot<'a> {
    /// Whole frames written so far.
    pub frames: u64,
    /// Bytes of those frames.
    pub bytes: u64,
    /// Stalls so far.
    pub stalls: u64,
    /// The stream watched.
    pub stream: Option<&'a str>,
    /// The PoP in use.
    pub pop: Option<&'a str>,
}

/// The status line's state: the measured frame rate and whether a line is on screen.
#[derive(Debug, Clone)]
pub struct Progress {
    print: bool,
    started: Instant,
    last: Option<(Instant, u64)>,
    fps: f64,
    width: usize,
}

impl Default for Progress {
    /// Measures the frame rate, prints nothing.
    fn default() -> Self {
        Self::new(false, Instant::now())
    }
}

/// The client's hook: measure `rec`'s frame rate into `rec.fps` and rewrite the line.
pub fn tick(rec: &mut crate::viewer::Reception, now: Instant) {
    let s = Snapshot {
        frames: rec.frames,
        bytes: rec.bytes,
        stalls: rec.stalls,
        stream: rec.stream.as_deref(),
        pop: rec.pop.as_deref(),
    };
    rec.progress.update(now, &s);
    rec.fps = rec.progress.fps();
}

/// What to tell a viewer who has no usable PoP: whether the PoPs answer at all (then
/// no server is reachable through them) or not.
pub fn no_pop_hint(status: &ott_tree::client::ClientStatus) -> &'static str {
    if status
        .pops
        .iter()
        .any(|p| p.rtt_ms.is_some() && p.loss < 1.0)
    {
        "PoPs answer but no server is reachable: is ott-server running?"
    } else {
        "no PoP answers: are the PoPs' ott-node running?"
    }
}

impl Progress {
    /// A status line printed only when `print` is true.
    pub fn new(print: bool, now: Instant) -> Self {
        Self {
            print,
            started: now,
            last: None,
            fps: 0.0,
            width: 0,
        }
    }

    /// A status line printed when standard error is a terminal.
    pub fn on_terminal(now: Instant) -> Self {
        Self::new(std::io::stderr().is_terminal(), now)
    }

    /// Frames a second over the last [`PERIOD`] or so.
    pub fn fps(&self) -> f64 {
        self.fps
    }

    /// Measure, and rewrite the line if [`PERIOD`] has passed since the last time.
    /// Cheap otherwise: call it as often as you like.
    pub fn update(&mut self, now: Instant, s: &Snapshot<'_>) {
        let Some((at, frames)) = self.last else {
            self.last = Some((now, s.frames));
            return;
        };
        let dt = now.saturating_duration_since(at);
        if dt < PERIOD {
            return;
        }
        self.fps = s.frames.saturating_sub(frames) as f64 / dt.as_secs_f64();
        self.last = Some((now, s.frames));
        if self.print {
            let line = self.line(now, s);
            // Pad over a longer previous line rather than send an escape sequence.
            let pad = self.width.saturating_sub(line.chars().count());
            self.width = line.chars().count();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{line}{}", " ".repeat(pad));
            let _ = err.flush();
        }
    }

    /// The text of the line at `now`.
    pub fn line(&self, now: Instant, s: &Snapshot<'_>) -> String {
        let t = now.saturating_duration_since(self.started).as_secs_f64();
        let (m, sec) = ((t / 60.0).floor(), t % 60.0);
        format!(
            "frame={:>6} fps={:>5.1} stalls={} size={:>7}kB time={:02}:{:04.1} pop={} stream={}",
            s.frames,
            self.fps,
            s.stalls,
            s.bytes / 1024,
            m as u64,
            sec,
            s.pop.unwrap_or("-"),
            s.stream.unwrap_or("-"),
        )
    }

    /// End the line (so that what follows starts on a fresh one), if one was printed.
    pub fn finish(&mut self) {
        if self.print && self.width > 0 {
            eprintln!();
            self.width = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fps_measured_per_period_and_line_text() {
        let t0 = Instant::now();
        let mut p = Progress::new(false, t0);
        let mut s = Snapshot {
            frames: 0,
            bytes: 0,
            stalls: 1,
            stream: Some("news"),
            pop: Some("n9"),
        };
        p.update(t0, &s);
        s.frames = 10;
        p.update(t0 + Duration::from_millis(100), &s);
        assert_eq!(p.fps(), 0.0, "not measured before a period");
        s.frames = 25;
        s.bytes = 10 * 1024;
        p.update(t0 + Duration::from_secs(1), &s);
        assert!((p.fps() - 25.0).abs() < 1e-9, "{}", p.fps());
        let line = p.line(t0 + Duration::from_secs(61), &s);
        assert_eq!(
            line,
            "frame=    25 fps= 25.0 stalls=1 size=     10kB time=01:01.0 pop=n9 stream=news"
        );
        s.frames = 25;
        p.update(t0 + Duration::from_secs(2), &s);
        assert_eq!(p.fps(), 0.0, "nothing new: 0 fps");
    }
}
