//! The report of an emulation run: what each client saw, and how the tree moved.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// What one client received.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct ClientReport {
    /// The client node it ran on.
    pub(crate) id: String,
    /// The stream it asked for first.
    pub(crate) stream: String,
    /// Streams it was switched to, in order.
    pub(crate) switched_to: Vec<String>,
    /// The PoP in use at the end.
    pub(crate) pop: Option<String>,
    /// Whole frames written to its output.
    pub(crate) frames_received: u64,
    /// Frames byte-identical to a frame of a source clip.
    pub(crate) frames_intact: u64,
    /// Frames the source sent from the first to the last frame written (from the
    /// written frames' positions in their clip; every clip frame is distinct).
    pub(crate) frames_expected: u64,
    /// `frames_intact` / `frames_expected`, percent (100 with nothing expected).
    pub(crate) intact_pct: f64,
    /// Frames the client's playout buffer gave up incomplete (its `incomplete=`).
    pub(crate) incomplete: u64,
    /// NACK messages the client sent its PoP (its `nacks=`).
    pub(crate) nacks: u64,
    /// Every gap between frames over 200 ms, in ms, in order.
    pub(crate) stalls_ms: Vec<u64>,
    /// Longest gap between two frames, ms (0 with fewer than two frames).
    pub(crate) longest_stall_ms: u64,
    /// PoP changes after its first choice.
    pub(crate) pop_switches: u64,
    /// The client's own summary line, or why there is none.
    pub(crate) summary: String,
    /// The last warning or error line of its log (level and message).
    pub(crate) last_warning: Option<String>,
    /// From the client's start to its first frame (the `first frame` line of its log),
    /// ms: bootstrap, PoP choice and join.
    pub(crate) first_frame_after_ms: Option<u64>,
    /// From the last frame it wrote to its stop, ms (by when its output file was last
    /// written): a stream that died before the end shows here, as it is no gap between
    /// two frames.
    pub(crate) silent_at_end_ms: Option<u64>,
    /// How far its last frame was behind the source at its stop, ms, reckoned from the
    /// frames the source sent after its first frame: the end-to-end delay at the end,
    /// plus any silence. Grows with the queues of a starved machine while frames keep
    /// coming, so it is reported, not judged.
    pub(crate) behind_at_end_ms: Option<u64>,
}

/// When a client ran, by the wall clock its log is stamped with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ClientTimes {
    pub(crate) started: SystemTime,
    pub(crate) stopped: Option<SystemTime>,
}

/// The time at the start of a log line (`2026-12-02T17:24:14.855626Z ...`, UTC).
pub(crate) fn log_time(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.splitn(3, ':');
    let h: i64 = t.next()?.parse().ok()?;
    let min: i64 = t.next()?.parse().ok()?;
    let sec: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || !(0.0..61.0).contains(&sec) {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = (days * 86_400 + h * 3600 + min * 60) as f64 + sec;
    (secs >= 0.0).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs))
}

/// `a - b` in ms, 0 if `a` is earlier.
fn ms_between(a: SystemTime, b: SystemTime) -> u64 {
    a.duration_since(b).map_or(0, |d| d.as_millis() as u64)
}

/// A node's parent changed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct ParentChange {
    /// Milliseconds after the scenario started (when the tree had formed).
    pub(crate) t_ms: u64,
    pub(crate) node: String,
    pub(crate) from: Option<String>,
    pub(crate) to: Option<String>,
}

/// A scenario event as it ran (client starts are left out).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct EventRecord {
    /// Milliseconds after the scenario started.
    pub(crate) t_ms: u64,
    /// What it did (and what it chose, for `kill_active_relay`).
    pub(crate) what: String,
}

/// Frame counters of one emulated link: index 0 is `ends[0]` → `ends[1]`, 1 the reverse.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct LinkReport {
    pub(crate) ends: [String; 2],
    pub(crate) delivered: [u64; 2],
    /// Dropped by the random loss.
    pub(crate) lost: [u64; 2],
    /// Dropped while the link was down.
    pub(crate) down: [u64; 2],
    /// Dropped because the queue was full (rate).
    pub(crate) overflow: [u64; 2],
}

/// The whole report (`--report FILE` writes it as JSON).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) topology: String,
    pub(crate) scenario: String,
    pub(crate) description: String,
    pub(crate) duration_s: f64,
    /// Loss recovery (NACKs) was on; off, every node and client ran with `--no-nack`.
    pub(crate) recovery: bool,
    pub(crate) run: String,
    /// Logs and client outputs of the run.
    pub(crate) work_dir: String,
    /// Each overlay node's parent when the scenario started.
    pub(crate) initial_parents: BTreeMap<String, Option<String>>,
    pub(crate) clients: Vec<ClientReport>,
    pub(crate) parent_changes: Vec<ParentChange>,
    /// The scenario's events as they ran.
    pub(crate) events: Vec<EventRecord>,
    /// Frames each emulated link carried and dropped.
    pub(crate) links: Vec<LinkReport>,
    /// Every process the run started (all gone once the run returns).
    #[serde(skip)]
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) pids: Vec<u32>,
}

impl Report {
    /// Parent changes per overlay node per minute and PoP switches per viewer per
    /// minute over the run (issue 11's stillness figures).
    pub(crate) fn rates(&self) -> String {
        let minutes = (self.duration_s / 60.0).max(1e-9);
        let nodes = self.initial_parents.len().max(1) as f64;
        let mut per_node: BTreeMap<&str, u64> = BTreeMap::new();
        for c in &self.parent_changes {
            *per_node.entry(c.node.as_str()).or_default() += 1;
        }
        let max_node = per_node.values().copied().max().unwrap_or(0) as f64 / minutes;
        let mean_node = self.parent_changes.len() as f64 / nodes / minutes;
        let switches: Vec<f64> = self
            .clients
            .iter()
            .map(|c| c.pop_switches as f64 / minutes)
            .collect();
        let mean_sw = switches.iter().sum::<f64>() / switches.len().max(1) as f64;
        let max_sw = switches.iter().copied().fold(0.0, f64::max);
        format!(
            "per minute: parent changes per node {mean_node:.2} mean, {max_node:.2} max; PoP switches per viewer {mean_sw:.2} mean, {max_sw:.2} max"
        )
    }

    /// Pretty JSON.
    pub(crate) fn json(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// The human-readable report.
    pub(crate) fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\nscenario {} on {} ({} s){}",
            self.scenario,
            self.topology,
            self.duration_s,
            if self.description.is_empty() {
                String::new()
            } else {
                format!(": {}", self.description)
            }
        );
        let _ = writeln!(
            o,
            "loss recovery: {}",
            if self.recovery {
                "on"
            } else {
                "off (--no-nack)"
            }
        );
        let _ = writeln!(
            o,
            "\n{:<8} {:<10} {:<5} {:>7} {:>7} {:>8} {:>8} {:>6} {:>6} {:>12} {:>5}  stalls (ms)",
            "client",
            "stream",
            "pop",
            "frames",
            "intact",
            "expected",
            "intact%",
            "nacks",
            "stalls",
            "longest_ms",
            "pop↔"
        );
        for c in &self.clients {
            let stalls: Vec<String> = c.stalls_ms.iter().map(u64::to_string).collect();
            let _ = writeln!(
                o,
                "{:<8} {:<10} {:<5} {:>7} {:>7} {:>8} {:>8.2} {:>6} {:>6} {:>12} {:>5}  {}",
                c.id,
                c.stream,
                c.pop.as_deref().unwrap_or("-"),
                c.frames_received,
                c.frames_intact,
                c.frames_expected,
                c.intact_pct,
                c.nacks,
                c.stalls_ms.len(),
                c.longest_stall_ms,
                c.pop_switches,
                if stalls.is_empty() {
                    "-".into()
                } else {
                    stalls.join(" ")
                }
            );
        }
        if !self.events.is_empty() {
            let _ = writeln!(o, "\nevents:");
            for e in &self.events {
                let _ = writeln!(o, "  t={:>6} ms  {}", e.t_ms, e.what);
            }
        }
        let tree: Vec<String> = self
            .initial_parents
            .iter()
            .map(|(n, p)| format!("{n}←{}", p.as_deref().unwrap_or("-")))
            .collect();
        let _ = writeln!(o, "\ntree at start: {}", tree.join(" "));
        if self.parent_changes.is_empty() {
            let _ = writeln!(o, "parent changes: none");
        } else {
            let _ = writeln!(o, "parent changes:");
            for c in &self.parent_changes {
                let _ = writeln!(
                    o,
                    "  t={:>6} ms  {:<5} {} → {}",
                    c.t_ms,
                    c.node,
                    c.from.as_deref().unwrap_or("none"),
                    c.to.as_deref().unwrap_or("none")
                );
            }
        }
        let _ = writeln!(o, "{}", self.rates());
        let dropped: Vec<String> = self
            .links
            .iter()
            .filter(|l| {
                l.lost
                    .iter()
                    .chain(&l.down)
                    .chain(&l.overflow)
                    .any(|&x| x > 0)
            })
            .map(|l| {
                format!(
                    "{}-{} lost {}/{} down {}/{} overflow {}/{}",
                    l.ends[0],
                    l.ends[1],
                    l.lost[0],
                    l.lost[1],
                    l.down[0],
                    l.down[1],
                    l.overflow[0],
                    l.overflow[1]
                )
            })
            .collect();
        if !dropped.is_empty() {
            let _ = writeln!(o, "links that dropped frames (each direction):");
            for d in dropped {
                let _ = writeln!(o, "  {d}");
            }
        }
        let _ = writeln!(o, "\nlogs and outputs: {}", self.work_dir);
        o
    }
}

/// `part` of `whole` in percent; 100 when nothing was expected.
pub(crate) fn share_pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Where each frame of the source clips sits: clip and position.
pub(crate) struct ClipIndex<'a> {
    at: HashMap<&'a [u8], (usize, usize)>,
    lens: Vec<usize>,
}

impl<'a> ClipIndex<'a> {
    pub(crate) fn new(clips: &'a [ott_media::Clip]) -> Self {
        let mut at = HashMap::new();
        for (c, clip) in clips.iter().enumerate() {
            for (i, f) in clip.frames.iter().enumerate() {
                at.entry(f.as_ref()).or_insert((c, i));
            }
        }
        Self {
            at,
            lens: clips.iter().map(|c| c.frames.len()).collect(),
        }
    }

    /// Clip and position of an intact frame.
    pub(crate) fn position(&self, frame: &[u8]) -> Option<(usize, usize)> {
        self.at.get(frame).copied()
    }

    /// Frames the sources sent from the first to the last of `written`: within a run of
    /// frames of one clip, each frame counts the positions it advanced from the previous
    /// one (clips loop); a frame of another clip (a switch) starts a new run. Frames that
    /// match no clip add nothing: the next intact frame's advance covers their place.
    pub(crate) fn frames_expected(&self, written: &[&[u8]]) -> u64 {
        let mut prev: Option<(usize, usize)> = None;
        let mut expected = 0u64;
        for f in written {
            let Some((c, i)) = self.position(f) else {
                continue;
            };
            let len = self.lens.get(c).copied().unwrap_or(1).max(1);
            expected += match prev {
                // Never 0: a frame is not written twice, so the same position again
                // is at most one frame (a duplicate) rather than a whole loop missed.
                Some((pc, pi)) if pc == c => ((i + len - pi) % len).max(1) as u64,
                _ => 1,
            };
            prev = Some((c, i));
        }
        expected
    }
}

/// Two runs of one scenario side by side: with loss recovery (`on`) and without (`off`).
pub(crate) fn compare(on: &Report, off: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "scenario {} on {}: loss recovery on vs off",
        on.scenario, on.topology
    );
    let _ = writeln!(
        o,
        "{:<8} {:<10} | {:>16} {:>8} {:>6} {:>10} | {:>16} {:>8} {:>6} {:>10}",
        "client",
        "stream",
        "on intact/exp",
        "intact%",
        "stalls",
        "longest_ms",
        "off intact/exp",
        "intact%",
        "stalls",
        "longest_ms"
    );
    for a in &on.clients {
        let cell = |c: Option<&ClientReport>| match c {
            Some(c) => format!(
                "{:>16} {:>8.2} {:>6} {:>10}",
                format!("{}/{}", c.frames_intact, c.frames_expected),
                c.intact_pct,
                c.stalls_ms.len(),
                c.longest_stall_ms
            ),
            None => format!("{:>16} {:>8} {:>6} {:>10}", "-", "-", "-", "-"),
        };
        let b = off.clients.iter().find(|b| b.id == a.id);
        let _ = writeln!(
            o,
            "{:<8} {:<10} | {} | {}",
            a.id,
            a.stream,
            cell(Some(a)),
            cell(b)
        );
    }
    o
}

/// The `key=value` pairs of a client's summary line.
fn summary_value<'a>(summary: &'a str, key: &str) -> Option<&'a str> {
    summary
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Gap lengths of the `stall` lines in a client log (`... stall gap_ms=523`).
pub(crate) fn stalls_from_log(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(" stall"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("gap_ms="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

/// The last `WARN` or `ERROR` line of a log, from its level on.
pub(crate) fn last_warning(log: &str) -> Option<String> {
    log.lines().rev().find_map(|l| {
        let at = l.find(" WARN ").or_else(|| l.find(" ERROR "))?;
        Some(l[at + 1..].trim().to_string())
    })
}

/// The files one client wrote.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientFiles<'a> {
    /// What it received (`--output`).
    pub(crate) output: &'a Path,
    /// Its standard output (the summary line).
    pub(crate) stdout: &'a Path,
    /// Its log.
    pub(crate) log: &'a Path,
}

/// Reads one client's files into its report line.
pub(crate) fn client_report(
    id: &str,
    stream: &str,
    switches: &[String],
    files: ClientFiles<'_>,
    clips: &[ott_media::Clip],
    times: ClientTimes,
) -> ClientReport {
    let ClientFiles {
        output,
        stdout,
        log,
    } = files;
    let out = std::fs::read_to_string(stdout).unwrap_or_default();
    let summary = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("summary: "))
        .map(String::from);
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    let data = std::fs::read(output).unwrap_or_default();
    let index = ClipIndex::new(clips);
    let written: Vec<&[u8]> = match ott_media::mjpeg::split_frames(&data) {
        Ok(ranges) => ranges.into_iter().filter_map(|r| data.get(r)).collect(),
        Err(_) => Vec::new(),
    };
    let received = written.len() as u64;
    let intact = written
        .iter()
        .filter(|f| index.position(f).is_some())
        .count() as u64;
    let expected = index.frames_expected(&written);
    // The last `first frame` line: a stream switch starts the count again, but the
    // expected frames span every stream watched, so take the first one.
    let first_frame = log_text
        .lines()
        .find(|l| l.contains(" first frame"))
        .and_then(log_time);
    let fps = clips
        .iter()
        .find(|c| c.name == stream)
        .map_or(25.0, |c| c.fps)
        .max(1.0);
    let behind_at_end_ms = match (first_frame, times.stopped) {
        (Some(first), Some(stopped)) if expected > 0 => {
            let last = first + Duration::from_secs_f64((expected - 1) as f64 / fps);
            Some(ms_between(stopped, last))
        }
        _ => None,
    };
    // The viewer flushes every frame as it writes it, so the file's modification time
    // is when the last one came.
    let last_written = std::fs::metadata(output)
        .and_then(|m| m.modified())
        .ok()
        .filter(|_| received > 0);
    let silent_at_end_ms = match (last_written, times.stopped) {
        (Some(last), Some(stopped)) => Some(ms_between(stopped, last)),
        _ => None,
    };
    let s = summary.as_deref().unwrap_or("");
    let num = |k: &str| {
        summary_value(s, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ClientReport {
        id: id.to_string(),
        stream: stream.to_string(),
        switched_to: switches.to_vec(),
        pop: summary_value(s, "pop")
            .filter(|p| *p != "-")
            .map(String::from),
        frames_received: received,
        frames_intact: intact,
        frames_expected: expected,
        intact_pct: share_pct(intact, expected),
        incomplete: num("incomplete"),
        nacks: num("nacks"),
        stalls_ms: stalls_from_log(&log_text),
        longest_stall_ms: num("longest_gap_ms"),
        pop_switches: num("pop_switches"),
        summary: summary.unwrap_or_else(|| {
            let tail: Vec<&str> = log_text.lines().rev().take(3).collect();
            format!("no summary; log ends: {}", tail.join(" | "))
        }),
        last_warning: last_warning(&log_text),
        first_frame_after_ms: first_frame.map(|at| ms_between(at, times.started)),
        silent_at_end_ms,
        behind_at_end_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(name: &str, n: usize) -> ott_media::Clip {
        ott_media::Clip {
            name: name.into(),
            kind: ott_proto::MediaKind::Mjpeg,
            fps: 25.0,
            frames: (0..n)
                .map(|i| format!("{name}-{i}").into_bytes().into())
                .collect(),
            ts: None,
        }
    }

    #[test]
    fn expected_frames_count_the_positions_the_source_advanced() {
        let clips = [clip("a", 10), clip("b", 4)];
        let index = ClipIndex::new(&clips);
        let f = |c: usize, i: usize| clips[c].frames[i].as_ref();
        // a: 2, 3, (4 and 5 lost), 6, a corrupt frame, 8, then the loop wraps: 9, 1;
        // then a switch to b: 0, 1.
        let written = [
            f(0, 2),
            f(0, 3),
            f(0, 6),
            b"garbage".as_ref(),
            f(0, 8),
            f(0, 9),
            f(0, 1),
            f(1, 0),
            f(1, 1),
        ];
        // a: 2..=9 is 8 frames, 0 and 1 after the wrap are 2 more; b: 2.
        assert_eq!(index.frames_expected(&written), 12);
        assert_eq!(index.position(b"garbage"), None);
        assert_eq!(index.frames_expected(&[]), 0);
        assert!((share_pct(6, 12) - 50.0).abs() < 1e-9);
        assert!((share_pct(0, 0) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn log_times_are_read_as_utc() {
        let t = log_time("2026-12-02T17:24:14.855626Z  INFO first frame").expect("a time");
        let since = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970");
        // 2026-12-02 is day 20,789 since 1970-01-01.
        let want = 20_789.0 * 86_400.0 + 17.0 * 3600.0 + 24.0 * 60.0 + 14.855626;
        assert!((since.as_secs_f64() - want).abs() < 1e-3, "{since:?}");
        let leap = log_time("2024-02-29T00:00:00Z x").expect("leap day");
        let next = log_time("2024-03-01T00:00:00Z x").expect("next day");
        assert_eq!(
            next.duration_since(leap).ok(),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(log_time("summary: frames=3"), None);
        assert_eq!(log_time("2024-13-01T00:00:00Z x"), None);
    }

    #[test]
    fn the_start_is_read_from_the_log_the_silent_end_from_the_output_and_the_lag_from_the_frames() {
        let dir = std::env::temp_dir().join(format!("ott-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // The first 50 frames of a shipped clip (2 s at 25 fps), one after the other.
        let clips: Vec<ott_media::Clip> =
            ott_media::load_dir(&crate::project_root().join("videos"))
                .expect("the shipped clips")
                .into_iter()
                .filter(|c| c.kind == ott_proto::MediaKind::Mjpeg)
                .collect();
        let a = clips.first().expect("an MJPEG clip");
        assert_eq!(a.fps, 25.0);
        let out: Vec<u8> = a.frames.iter().take(50).flat_map(|f| f.to_vec()).collect();
        std::fs::write(dir.join("c.mjpeg"), &out).expect("output");
        let at = |s: &str| log_time(&format!("{s}Z")).expect("time");
        // Written up to 5.5 s: the 50 frames came late, not at 25 fps from 1.5 s.
        std::fs::File::options()
            .write(true)
            .open(dir.join("c.mjpeg"))
            .and_then(|f| f.set_modified(at("2026-12-02T10:00:05.500000")))
            .expect("output's time");
        std::fs::write(
            dir.join("c.log"),
            "2026-12-02T10:00:01.000000Z  INFO client starting\n\
             2026-12-02T10:00:01.500000Z  INFO first frame stream=a\n",
        )
        .expect("log");
        std::fs::write(dir.join("c.stdout"), "summary: frames=50\n").expect("stdout");
        let times = ClientTimes {
            started: at("2026-12-02T10:00:00.000000"),
            // At 25 fps from 1.5 s the last frame would have come at 1.5 + 49/25 =
            // 3.46 s; stopped at 6 s.
            stopped: Some(at("2026-12-02T10:00:06.000000")),
        };
        let r = client_report(
            "c",
            &a.name,
            &[],
            ClientFiles {
                output: &dir.join("c.mjpeg"),
                stdout: &dir.join("c.stdout"),
                log: &dir.join("c.log"),
            },
            &clips,
            times,
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!((r.frames_received, r.frames_expected), (50, 50), "{r:?}");
        assert_eq!(r.first_frame_after_ms, Some(1500));
        assert_eq!(r.behind_at_end_ms, Some(2540));
        assert_eq!(r.silent_at_end_ms, Some(500));
    }

    #[test]
    fn stalls_are_read_from_the_client_log() {
        let log = "2025-01-01T00:00:00Z  INFO stall gap_ms=523\n\
                   2025-01-01T00:00:01Z  INFO joined stream\n\
                   2025-01-01T00:00:02Z  INFO stall gap_ms=210\n";
        assert_eq!(stalls_from_log(log), vec![523, 210]);
        assert_eq!(last_warning(log), None);
        let log = "2026-12-02T17:16:48Z  INFO client starting\n\
                   2026-12-02T17:16:49Z  WARN no usable pop\n\
                   2026-12-02T17:16:49Z  WARN no usable PoP at the moment\n\
                   2026-12-02T17:16:56Z  INFO interrupted\n";
        assert_eq!(
            last_warning(log).as_deref(),
            Some("WARN no usable PoP at the moment")
        );
    }

    #[test]
    fn the_json_has_the_fields_the_issue_names() {
        let r = Report {
            topology: "seed".into(),
            scenario: "x".into(),
            description: String::new(),
            duration_s: 1.0,
            recovery: true,
            run: "1x0".into(),
            work_dir: "/tmp".into(),
            initial_parents: BTreeMap::new(),
            clients: vec![ClientReport {
                id: "n16".into(),
                stream: "bars".into(),
                switched_to: vec![],
                pop: Some("n5".into()),
                frames_received: 10,
                frames_intact: 10,
                frames_expected: 10,
                intact_pct: 100.0,
                incomplete: 0,
                nacks: 0,
                stalls_ms: vec![],
                longest_stall_ms: 40,
                pop_switches: 0,
                summary: String::new(),
                last_warning: None,
                first_frame_after_ms: Some(40),
                silent_at_end_ms: Some(30),
                behind_at_end_ms: Some(30),
            }],
            parent_changes: vec![ParentChange {
                t_ms: 5,
                node: "n7".into(),
                from: Some("n8".into()),
                to: Some("n9".into()),
            }],
            events: vec![EventRecord {
                t_ms: 6000,
                what: "kill n12".into(),
            }],
            links: vec![],
            pids: vec![],
        };
        let v: serde_json::Value = serde_json::from_str(&r.json().expect("json")).expect("parses");
        let c = &v["clients"][0];
        for k in [
            "id",
            "stream",
            "frames_received",
            "frames_intact",
            "longest_stall_ms",
            "pop_switches",
        ] {
            assert!(!c[k].is_null(), "clients[].{k}");
        }
        let p = &v["parent_changes"][0];
        for k in ["t_ms", "node", "from", "to"] {
            assert!(!p[k].is_null(), "parent_changes[].{k}");
        }
        assert!(r.text().contains("n7    n8 → n9"));
        assert_eq!(v["events"][0]["what"], "kill n12");
        assert!(r.text().contains("t=  6000 ms  kill n12"));
        // One change in one second at one node (of none known: counted as one), one
        // viewer without switches.
        assert_eq!(
            r.rates(),
            "per minute: parent changes per node 60.00 mean, 60.00 max; PoP switches per viewer 0.00 mean, 0.00 max"
        );
    }
}
