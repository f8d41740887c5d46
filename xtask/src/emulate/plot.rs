//! Plots of an emulation run, as standalone SVG files in the run's directory:
//! - `viewers.svg`: each viewer's received frame rate over time (frames per second over
//!   the last 0.5 s, from its `/status` polled every 100 ms), its stalls (no new frame
//!   for 200 ms or more) as red bands, its PoP moves as dashed lines, and the
//!   scenario's events as grey lines;
//! - `parents.svg`: every parent change over time, one row per overlay node, with the
//!   scenario's events.
//!
//! The renderers are pure functions of the samples; only [`spawn_viewer_poller`] does
//! I/O.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::report::ParentChange;

/// `--status` port of each client inside the emulation.
pub(crate) const VIEWER_STATUS_PORT: u16 = 7081;
/// How often a viewer's `/status` is read.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// A stretch without a new frame at least this long is a stall (the client's own
/// threshold).
const STALL_S: f64 = 0.2;
/// Window of the frame-rate estimate.
const RATE_WINDOW_S: f64 = 0.5;

/// One reading of a viewer's `/status`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ViewerSample {
    pub(crate) at: Instant,
    pub(crate) frames: u64,
    pub(crate) pop: Option<String>,
}

/// The readings of one viewer, shared with its poller thread.
pub(crate) type ViewerSamples = Arc<Mutex<Vec<ViewerSample>>>;

/// Read the viewer's `/status` at `VIEWER_STATUS_PORT` inside the namespace at
/// `ns_path` every 100 ms until `stop`, from a thread of its own.
pub(crate) fn spawn_viewer_poller(
    name: &str,
    ns_path: String,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(std::thread::JoinHandle<()>, ViewerSamples)> {
    let samples: ViewerSamples = Arc::new(Mutex::new(Vec::new()));
    let out = samples.clone();
    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), VIEWER_STATUS_PORT);
    let handle = std::thread::Builder::new()
        .name(format!("poll-viewer-{name}"))
        .spawn(move || {
            if super::netns::enter(&ns_path).is_err() {
                return;
            }
            while !stop.load(Ordering::SeqCst) {
                let at = Instant::now();
                if let Some(s) = read_viewer(addr, at) {
                    if let Ok(mut v) = out.lock() {
                        v.push(s);
                    }
                }
                std::thread::sleep(POLL_EVERY.saturating_sub(at.elapsed()));
            }
        })?;
    Ok((handle, samples))
}

fn read_viewer(addr: SocketAddr, at: Instant) -> Option<ViewerSample> {
    let body = ott_testkit::http_get(addr, "/status").ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let rec = &v["reception"];
    Some(ViewerSample {
        at,
        frames: rec["frames"].as_u64()?,
        pop: rec["pop"].as_str().map(str::to_owned),
    })
}

/// A viewer's readings as seconds from the scenario's start.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ViewerSeries {
    pub(crate) name: String,
    /// `(seconds, frames written so far, PoP in use)`, in time order.
    pub(crate) points: Vec<(f64, u64, Option<String>)>,
}

impl ViewerSeries {
    /// The series of `samples`, timed from `t0` (readings before `t0` are dropped).
    pub(crate) fn from_samples(name: &str, samples: &[ViewerSample], t0: Instant) -> Self {
        Self {
            name: name.to_owned(),
            points: samples
                .iter()
                .filter(|s| s.at >= t0)
                .map(|s| {
                    (
                        s.at.duration_since(t0).as_secs_f64(),
                        s.frames,
                        s.pop.clone(),
                    )
                })
                .collect(),
        }
    }

    /// Frames per second over the last [`RATE_WINDOW_S`] at each reading (from the
    /// first reading a full window after the start).
    pub(crate) fn rate(&self) -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        let mut j = 0;
        for (i, &(t, f, _)) in self.points.iter().enumerate() {
            while j + 1 < i && self.points[j + 1].0 <= t - RATE_WINDOW_S {
                j += 1;
            }
            let (t0, f0, _) = &self.points[j];
            if i > j && t - t0 >= RATE_WINDOW_S * 0.8 {
                out.push((t, f.saturating_sub(*f0) as f64 / (t - t0)));
            }
        }
        out
    }

    /// Stretches of at least [`STALL_S`] without a new frame, after the first frame:
    /// `(start, end)` in seconds.
    pub(crate) fn stalls(&self) -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        let mut last_new: Option<(f64, u64)> = None;
        for &(t, f, _) in &self.points {
            match last_new {
                Some((t_new, f_new)) if f > f_new => {
                    if t - t_new >= STALL_S {
                        out.push((t_new, t));
                    }
                    last_new = Some((t, f));
                }
                None if f > 0 => last_new = Some((t, f)),
                _ => {}
            }
        }
        // A stall that lasts to the end.
        if let (Some((t_new, _)), Some(&(t_end, _, _))) = (last_new, self.points.last()) {
            if t_end - t_new >= STALL_S {
                out.push((t_new, t_end));
            }
        }
        out
    }

    /// Each move to another PoP after the first: `(seconds, new PoP)`.
    pub(crate) fn pop_moves(&self) -> Vec<(f64, String)> {
        let mut out = Vec::new();
        let mut current: Option<&str> = None;
        for (t, _, pop) in &self.points {
            if let Some(p) = pop.as_deref() {
                if current.is_some_and(|c| c != p) {
                    out.push((*t, p.to_owned()));
                }
                current = Some(p);
            }
        }
        out
    }
}

/// Text for XML character data and attribute values.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

const WIDTH: f64 = 900.0;
const LEFT: f64 = 110.0;
const RIGHT: f64 = 20.0;

fn x_of(t: f64, duration: f64) -> f64 {
    LEFT + (t / duration.max(1e-3)).clamp(0.0, 1.0) * (WIDTH - LEFT - RIGHT)
}

fn time_axis(o: &mut String, y: f64, duration: f64) {
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]
        .into_iter()
        .find(|s| duration / s <= 12.0)
        .unwrap_or(600.0);
    let _ = writeln!(
        o,
        "<line x1=\"{LEFT}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#555\"/>",
        WIDTH - RIGHT
    );
    let mut t = 0.0;
    while t <= duration + 1e-9 {
        let x = x_of(t, duration);
        let _ = writeln!(
            o,
            "<line x1=\"{x:.1}\" y1=\"{y}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#555\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{t} s</text>",
            y + 4.0,
            y + 15.0
        );
        t += step;
    }
}

fn event_lines(o: &mut String, events: &[(f64, String)], duration: f64, top: f64, bottom: f64) {
    for (k, (t, what)) in events.iter().enumerate() {
        let x = x_of(*t, duration);
        let _ = writeln!(
            o,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#9e9e9e\" stroke-width=\"1\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#616161\">{}</text>",
            x + 2.0,
            top + 10.0 + 11.0 * (k % 3) as f64,
            xml(what)
        );
    }
}

fn svg_open(height: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n<text x=\"10\" y=\"18\" font-weight=\"bold\">{}</text>\n",
        xml(title)
    )
}

/// Each viewer's frame rate over time, one panel per viewer.
pub(crate) fn viewers_svg(
    viewers: &[ViewerSeries],
    events: &[(f64, String)],
    duration: f64,
    title: &str,
) -> String {
    const PANEL: f64 = 150.0;
    const TOP: f64 = 30.0;
    let height = TOP + PANEL * viewers.len().max(1) as f64 + 10.0;
    let mut o = svg_open(height, title);
    if viewers.is_empty() {
        o.push_str("<text x=\"10\" y=\"60\">no viewer was polled</text>\n");
    }
    for (k, v) in viewers.iter().enumerate() {
        let top = TOP + PANEL * k as f64 + 10.0;
        let bottom = top + PANEL - 45.0;
        let rate = v.rate();
        let peak = rate.iter().map(|r| r.1).fold(0.0f64, f64::max);
        let y_max = [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 100.0]
            .into_iter()
            .find(|m| *m >= peak * 1.1)
            .unwrap_or((peak * 1.1).ceil().max(1.0));
        let y_of = |fps: f64| bottom - (fps / y_max).clamp(0.0, 1.0) * (bottom - top);
        for (a, b) in v.stalls() {
            let (x1, x2) = (x_of(a, duration), x_of(b, duration));
            let _ = writeln!(
                o,
                "<rect class=\"stall\" x=\"{x1:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#ef5350\" fill-opacity=\"0.3\"/>",
                (x2 - x1).max(1.0),
                bottom - top
            );
        }
        event_lines(&mut o, events, duration, top, bottom);
        for (t, pop) in v.pop_moves() {
            let x = x_of(t, duration);
            let _ = writeln!(
                o,
                "<line class=\"pop-move\" x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#6a1b9a\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#6a1b9a\">→ {}</text>",
                x + 2.0,
                bottom - 4.0,
                xml(&pop)
            );
        }
        let pts: Vec<String> = rate
            .iter()
            .map(|(t, f)| format!("{:.1},{:.1}", x_of(*t, duration), y_of(*f)))
            .collect();
        if !pts.is_empty() {
            let _ = writeln!(
                o,
                "<polyline class=\"fps\" points=\"{}\" fill=\"none\" stroke=\"#1565c0\" stroke-width=\"1.5\"/>",
                pts.join(" ")
            );
        }
        for frac in [0.0, 0.5, 1.0] {
            let y = y_of(y_max * frac);
            let _ = writeln!(
                o,
                "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{LEFT}\" y2=\"{y:.1}\" stroke=\"#555\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{}</text>",
                LEFT - 4.0,
                LEFT - 6.0,
                y + 3.0,
                y_max * frac
            );
        }
        let stalls = v.stalls().len();
        let moves = v.pop_moves().len();
        let _ = writeln!(
            o,
            "<text x=\"10\" y=\"{:.1}\" font-weight=\"bold\">{}</text><text x=\"10\" y=\"{:.1}\" font-size=\"10\">frames/s</text><text x=\"10\" y=\"{:.1}\" font-size=\"10\">{stalls} stall{}, {moves} PoP move{}</text>",
            top + 12.0,
            xml(&v.name),
            top + 26.0,
            top + 40.0,
            if stalls == 1 { "" } else { "s" },
            if moves == 1 { "" } else { "s" },
        );
        time_axis(&mut o, bottom, duration);
    }
    o.push_str("</svg>\n");
    o
}

/// Parent changes over time: one row per node, a mark (labelled with the new parent)
/// at each change.
pub(crate) fn parents_svg(
    changes: &[ParentChange],
    nodes: &[String],
    events: &[(f64, String)],
    duration: f64,
    title: &str,
) -> String {
    const ROW: f64 = 22.0;
    const TOP: f64 = 50.0;
    let bottom = TOP + ROW * nodes.len().max(1) as f64;
    let mut o = svg_open(bottom + 30.0, title);
    let _ = writeln!(
        o,
        "<text x=\"10\" y=\"34\" font-size=\"11\">{} parent change{} after the tree formed</text>",
        changes.len(),
        if changes.len() == 1 { "" } else { "s" }
    );
    event_lines(&mut o, events, duration, TOP - 8.0, bottom);
    for (k, node) in nodes.iter().enumerate() {
        let y = TOP + ROW * k as f64 + ROW / 2.0;
        let _ = writeln!(
            o,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/>",
            LEFT - 6.0,
            y + 4.0,
            xml(node),
            WIDTH - RIGHT
        );
        // Labels of successive changes alternate above and below the row.
        for (i, c) in changes.iter().filter(|c| &c.node == node).enumerate() {
            let x = x_of(c.t_ms as f64 / 1000.0, duration);
            let label_y = if i % 2 == 0 { y - 4.0 } else { y + 12.0 };
            let to = c.to.as_deref().unwrap_or("none");
            let _ = writeln!(
                o,
                "<circle class=\"change\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">→ {}</text>",
                if c.to.is_some() { "#1565c0" } else { "#c62828" },
                x + 5.0,
                label_y,
                xml(to)
            );
        }
    }
    time_axis(&mut o, bottom, duration);
    o.push_str("</svg>\n");
    o
}

/// Write `viewers.svg` and `parents.svg` into `dir`; returns their paths.
pub(crate) fn write(
    dir: &Path,
    viewers: &[ViewerSeries],
    changes: &[ParentChange],
    nodes: &[String],
    events: &[(f64, String)],
    duration: f64,
    title: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    let files = [
        (
            dir.join("viewers.svg"),
            viewers_svg(viewers, events, duration, &format!("{title}: viewers")),
        ),
        (
            dir.join("parents.svg"),
            parents_svg(
                changes,
                nodes,
                events,
                duration,
                &format!("{title}: parent changes"),
            ),
        ),
    ];
    let mut out = Vec::new();
    for (path, text) in files {
        std::fs::write(&path, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 25 fps for 2 s, nothing for 0.5 s (a stall, and a move to p2), 25 fps again.
    fn series() -> ViewerSeries {
        let mut points = Vec::new();
        let mut frames = 0u64;
        for i in 0..50 {
            let t = f64::from(i) * 0.1;
            if !(2.0..2.5).contains(&t) {
                frames += if t > 0.0 { 2 } else { 0 };
            }
            let pop = if t < 2.4 { "p1" } else { "p2" };
            points.push((t, frames, Some(pop.to_string())));
        }
        ViewerSeries {
            name: "c1".into(),
            points,
        }
    }

    #[test]
    fn rate_stalls_and_moves_come_from_the_readings() {
        let s = series();
        let rate = s.rate();
        let at = |t: f64| {
            rate.iter()
                .find(|r| (r.0 - t).abs() < 1e-6)
                .map(|r| r.1)
                .expect("a rate at t")
        };
        assert!((at(1.5) - 20.0).abs() < 1e-6, "2 frames per 0.1 s");
        assert!(at(2.4) < 5.0, "the rate drops during the stall");
        let stalls = s.stalls();
        assert_eq!(stalls.len(), 1, "{stalls:?}");
        assert!((stalls[0].0 - 1.9).abs() < 1e-6 && (stalls[0].1 - 2.5).abs() < 1e-6);
        let moves = s.pop_moves();
        assert_eq!(moves.len(), 1);
        assert!((moves[0].0 - 2.4).abs() < 1e-6 && moves[0].1 == "p2");
    }

    #[test]
    fn viewers_plot_marks_stalls_moves_and_events() {
        let svg = viewers_svg(&[series()], &[(2.0, "kill <n10>".into())], 5.0, "seed & co");
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("class=\"stall\"").count(), 1);
        assert_eq!(svg.matches("class=\"pop-move\"").count(), 1);
        assert_eq!(svg.matches("class=\"fps\"").count(), 1);
        assert!(svg.contains("kill &lt;n10&gt;") && svg.contains("seed &amp; co"));
        assert!(svg.contains("1 stall, 1 PoP move"));
    }

    #[test]
    fn parents_plot_has_a_mark_per_change() {
        let changes = vec![
            ParentChange {
                t_ms: 1200,
                node: "n7".into(),
                from: Some("n8".into()),
                to: Some("n10".into()),
            },
            ParentChange {
                t_ms: 1300,
                node: "n5".into(),
                from: Some("n9".into()),
                to: None,
            },
        ];
        let nodes = vec!["n5".to_string(), "n7".to_string(), "n8".to_string()];
        let svg = parents_svg(&changes, &nodes, &[(1.0, "kill n8".into())], 10.0, "t");
        assert_eq!(svg.matches("class=\"change\"").count(), 2);
        assert!(svg.contains("2 parent changes"));
        assert!(svg.contains("→ none") && svg.contains("→ n10"));
    }
}
