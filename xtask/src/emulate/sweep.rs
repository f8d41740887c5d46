//! `emulate --random SEED` and `--random-sweep K`: generated topologies
//! ([`super::random::generate`]) in namespaces with a viewer on every
//! client node, optional loss on every link and a relay killed halfway, and one line per
//! seed: viewers, frames intact (the worst viewer and all together), longest stall and a
//! verdict against SPEC §9 (every frame without faults, 99.9 % with loss or a kill).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{bail, Context};
use ott_overlay::Topology;
use serde::Serialize;

use super::random::{self, Shape};
use super::report::{ClientReport, Report};
use super::scenario::{Action, Scenario, ScenarioEvent};
use super::{run_scenario_with, RunOptions};

/// How long the viewers of a generated topology watch unless `--duration` says.
pub(crate) const RANDOM_DURATION_S: f64 = 20.0;
/// A stream that stops this long before its viewer does failed: it is no stall between
/// two frames, so the intact share alone would not show it.
const MAX_SILENT_AT_END_MS: u64 = 1000;
/// A viewer whose first frame took longer than this is named in the line's notes (under
/// loss, a lost TCP SYN to the bootstrapper costs 1 s, two cost 3 s).
const SLOW_START_MS: u64 = 2000;

/// Faults added to a run: loss on every link from the start, a relay killed halfway.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Faults {
    pub(crate) loss_pct: Option<f64>,
    pub(crate) kill_relay: bool,
}

impl Faults {
    /// SPEC §9: random topologies deliver every frame without faults, 99.9 % with 3 %
    /// loss and a relay killed.
    pub(crate) fn target_pct(&self) -> f64 {
        if self.loss_pct.is_some_and(|l| l > 0.0) || self.kill_relay {
            99.9
        } else {
            100.0
        }
    }

    /// Adds the faults to a scenario of a `--topology` run: the loss at t = 0 (and the
    /// viewers starting no earlier than 0.5 s), the kill halfway.
    pub(crate) fn add_to(&self, s: &mut Scenario) {
        if let Some(loss) = self.loss_pct {
            s.events.insert(
                0,
                ScenarioEvent {
                    at_s: 0.0,
                    action: Action::AllLinks {
                        delay_ms: None,
                        jitter_ms: None,
                        loss_pct: Some(loss),
                        rate_mbit: None,
                    },
                },
            );
            for c in &mut s.clients {
                c.start_s = c.start_s.max(0.5);
            }
        }
        if self.kill_relay {
            s.events.push(ScenarioEvent {
                at_s: s.duration_s / 2.0,
                action: Action::KillActiveRelay,
            });
        }
    }
}

/// One seed's line of a sweep.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Line {
    pub(crate) seed: u64,
    /// `dense` or `sparse`.
    pub(crate) shape: String,
    pub(crate) nodes: usize,
    pub(crate) viewers: usize,
    /// The worst viewer's frames intact / expected, percent.
    pub(crate) min_intact_pct: f64,
    /// Frames intact and expected over every viewer.
    pub(crate) intact: u64,
    pub(crate) expected: u64,
    pub(crate) longest_stall_ms: u64,
    /// The relay killed, `none` if the kill found no relay to kill, `-` without a kill.
    pub(crate) killed: String,
    /// `ok`, or why not.
    pub(crate) verdict: String,
    /// What is worth knowing but no failure (slow starts).
    pub(crate) notes: String,
    /// The generated topology, to replay with `--topology`.
    pub(crate) topology: String,
    /// Logs, outputs and report of the run.
    pub(crate) work_dir: String,
}

impl Line {
    pub(crate) fn header() -> String {
        format!(
            "{:>6} {:<6} {:>5} {:>7} {:>11} {:>17} {:>8} {:>10} {:<6} verdict",
            "seed",
            "shape",
            "nodes",
            "viewers",
            "min_intact%",
            "intact/expected",
            "total%",
            "longest_ms",
            "killed"
        )
    }

    pub(crate) fn text(&self) -> String {
        format!(
            "{:>6} {:<6} {:>5} {:>7} {:>11.2} {:>17} {:>8} {:>10} {:<6} {}",
            self.seed,
            self.shape,
            self.nodes,
            self.viewers,
            self.min_intact_pct,
            format!("{}/{}", self.intact, self.expected),
            if self.expected == 0 {
                "-".to_string()
            } else {
                format!(
                    "{:.2}",
                    super::report::share_pct(self.intact, self.expected)
                )
            },
            self.longest_stall_ms,
            self.killed,
            if self.notes.is_empty() {
                self.verdict.clone()
            } else {
                format!("{} ({})", self.verdict, self.notes)
            }
        )
    }

    pub(crate) fn ok(&self) -> bool {
        self.verdict == "ok"
    }

    /// The line of a seed whose run failed before any viewer could be measured.
    fn error(seed: u64, t: Option<&Topology>, path: &Path, e: &anyhow::Error) -> Self {
        Self {
            seed,
            shape: t.map_or("?", shape_of).to_string(),
            nodes: t.map_or(0, |t| t.nodes.len()),
            viewers: t.map_or(0, |t| t.clients().len()),
            min_intact_pct: 0.0,
            intact: 0,
            expected: 0,
            longest_stall_ms: 0,
            killed: "-".into(),
            verdict: format!("error: {e:#}"),
            notes: String::new(),
            topology: path.display().to_string(),
            work_dir: String::new(),
        }
    }
}

fn shape_of(t: &Topology) -> &'static str {
    if t.overlay.is_some() {
        "sparse"
    } else {
        "dense"
    }
}

/// What a run's viewers got against the target, and the line for it.
pub(crate) fn line_for(
    seed: u64,
    t: &Topology,
    r: &Report,
    target_pct: f64,
    topology: &Path,
) -> Line {
    let viewers = r.clients.len();
    let intact: u64 = r.clients.iter().map(|c| c.frames_intact).sum();
    let expected: u64 = r.clients.iter().map(|c| c.frames_expected).sum();
    // A viewer with nothing written has intact_pct 100 (nothing expected): count it as 0.
    let pct = |c: &ClientReport| {
        if c.frames_received == 0 {
            0.0
        } else {
            c.intact_pct
        }
    };
    let min_intact_pct = r.clients.iter().map(pct).fold(f64::INFINITY, f64::min);
    let longest_stall_ms = r
        .clients
        .iter()
        .map(|c| c.longest_stall_ms)
        .max()
        .unwrap_or(0);
    let mut problems: Vec<String> = Vec::new();
    if viewers == 0 {
        problems.push("no viewers".into());
    }
    // Viewers that received nothing, grouped by their cause.
    let mut nothing: Vec<(String, Vec<&str>)> = Vec::new();
    for c in r.clients.iter().filter(|c| c.frames_received == 0) {
        let why = c.last_warning.clone().unwrap_or_else(|| c.summary.clone());
        match nothing.iter_mut().find(|(w, _)| *w == why) {
            Some((_, ids)) => ids.push(&c.id),
            None => nothing.push((why, vec![&c.id])),
        }
    }
    for (why, ids) in &nothing {
        problems.push(format!("{} received nothing ({why})", ids.join(", ")));
    }
    for c in &r.clients {
        if c.frames_received == 0 {
            continue;
        } else if c.frames_intact < c.frames_received {
            problems.push(format!(
                "{} wrote {} damaged frames",
                c.id,
                c.frames_received - c.frames_intact
            ));
        } else if c.intact_pct < target_pct {
            problems.push(format!(
                "{} {:.2} % intact < {target_pct} %",
                c.id, c.intact_pct
            ));
        }
        if let Some(ms) = c.silent_at_end_ms.filter(|&ms| ms > MAX_SILENT_AT_END_MS) {
            problems.push(format!(
                "{} silent for the last {:.1} s",
                c.id,
                ms as f64 / 1000.0
            ));
        }
    }
    // Not failures, but worth seeing: viewers that took long to start.
    let notes: Vec<String> = r
        .clients
        .iter()
        .filter_map(|c| {
            let ms = c.first_frame_after_ms.filter(|&ms| ms > SLOW_START_MS)?;
            Some(format!(
                "{} first frame after {:.1} s",
                c.id,
                ms as f64 / 1000.0
            ))
        })
        .collect();
    let killed = r
        .events
        .iter()
        .find_map(|e| {
            e.what
                .split_once("kill the most active relay: ")
                .map(|(_, n)| {
                    n.strip_prefix("killed ")
                        .map_or_else(|| "none".to_string(), String::from)
                })
        })
        .unwrap_or_else(|| "-".into());
    Line {
        seed,
        shape: shape_of(t).into(),
        nodes: t.nodes.len(),
        viewers,
        min_intact_pct: if min_intact_pct.is_finite() {
            min_intact_pct
        } else {
            0.0
        },
        intact,
        expected,
        longest_stall_ms,
        killed,
        verdict: if problems.is_empty() {
            "ok".into()
        } else {
            problems.join("; ")
        },
        notes: notes.join("; "),
        topology: topology.display().to_string(),
        work_dir: r.work_dir.clone(),
    }
}

/// Generates the topology of `seed` into `opts.work_dir`, runs it with a viewer on every
/// client node for `opts.duration` (default [`RANDOM_DURATION_S`]) with `faults`, and
/// returns the report and the seed's line.
pub(crate) fn run_one(
    opts: &RunOptions,
    seed: u64,
    nodes: usize,
    shape: Shape,
    faults: Faults,
) -> anyhow::Result<(Report, Line)> {
    let path = random::write(&opts.work_dir, seed, nodes, shape)?;
    eprintln!("seed {seed}: topology written to {}", path.display());
    let t = Topology::load(&path)?;
    let clips = ott_media::load_dir(&opts.videos)?;
    // The report counts intact JPEG frames: the viewers watch the MJPEG streams.
    let mjpeg: Vec<String> = clips
        .iter()
        .filter(|c| c.kind == ott_proto::MediaKind::Mjpeg)
        .map(|c| c.name.clone())
        .collect();
    if mjpeg.is_empty() {
        bail!("no MJPEG clip in {}", opts.videos.display());
    }
    let duration = opts.duration.unwrap_or(RANDOM_DURATION_S);
    let run = RunOptions {
        topology: path.clone(),
        scenario: None,
        duration: Some(duration),
        ..opts.clone()
    };
    let report = run_scenario_with(&run, |t, _, s| {
        *s = Scenario::every_client(
            t,
            &mjpeg,
            duration,
            faults.loss_pct,
            faults.kill_relay.then_some(duration / 2.0),
        );
    })?;
    let line = line_for(seed, &t, &report, faults.target_pct(), &path);
    Ok((report, line))
}

/// Runs seeds `first..first + k` one after the other, printing each line as it
/// finishes and a summary at the end; fails if any seed failed.
pub(crate) fn sweep(
    opts: &RunOptions,
    first: u64,
    k: u64,
    nodes: usize,
    shape: Shape,
    faults: Faults,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    let duration = opts.duration.unwrap_or(RANDOM_DURATION_S);
    let mut head = format!(
        "random sweep: {k} seeds from {first}, {nodes} nodes, {duration} s each, loss {} %, {}, target {} % intact per viewer",
        faults.loss_pct.unwrap_or(0.0),
        if faults.kill_relay {
            "a relay killed halfway"
        } else {
            "no kill"
        },
        faults.target_pct()
    );
    if shape.clients_first {
        head.push_str(", PoPs' first link facing their clients");
    }
    println!("{head}\n{}", Line::header());
    let mut lines: Vec<Line> = Vec::new();
    for seed in first..first.saturating_add(k) {
        if opts.stop.load(Ordering::SeqCst) {
            break;
        }
        let line = match run_one(opts, seed, nodes, shape, faults) {
            Ok((_, line)) => line,
            Err(e) => {
                let path = topology_path(opts, seed, nodes, shape);
                let t = Topology::load(&path).ok();
                Line::error(seed, t.as_ref(), &path, &e)
            }
        };
        println!("{}", line.text());
        lines.push(line);
    }
    println!("{}", summary(&lines));
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&lines)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("lines written to {}", path.display());
    }
    let failed = lines.iter().filter(|l| !l.ok()).count();
    if failed > 0 {
        bail!("{failed} of {} seeds failed", lines.len());
    }
    if (lines.len() as u64) < k {
        bail!("interrupted after {} of {k} seeds", lines.len());
    }
    Ok(())
}

/// The end of a sweep: totals, the worst viewer and stall, and each failed seed with its
/// cause and topology file.
pub(crate) fn summary(lines: &[Line]) -> String {
    let mut o = String::new();
    let ok = lines.iter().filter(|l| l.ok()).count();
    let intact: u64 = lines.iter().map(|l| l.intact).sum();
    let expected: u64 = lines.iter().map(|l| l.expected).sum();
    let viewers: usize = lines.iter().map(|l| l.viewers).sum();
    let worst = lines
        .iter()
        .filter(|l| l.viewers > 0)
        .map(|l| l.min_intact_pct)
        .fold(f64::INFINITY, f64::min);
    let stall = lines.iter().map(|l| l.longest_stall_ms).max().unwrap_or(0);
    let _ = writeln!(
        o,
        "\n{ok} of {} seeds ok; {viewers} viewers; frames intact {intact}/{expected} ({:.3} %); worst viewer {}; longest stall {stall} ms",
        lines.len(),
        super::report::share_pct(intact, expected),
        if worst.is_finite() {
            format!("{worst:.2} %")
        } else {
            "-".into()
        }
    );
    for l in lines.iter().filter(|l| !l.ok()) {
        let _ = writeln!(o, "seed {} failed: {}", l.seed, l.verdict);
        let _ = writeln!(
            o,
            "  replay: sudo -E cargo xtask emulate --topology {}",
            l.topology
        );
        if !l.work_dir.is_empty() {
            let _ = writeln!(o, "  logs: {}", l.work_dir);
        }
    }
    o
}

/// Where `run_one` writes the topology of `seed`.
pub(crate) fn topology_path(opts: &RunOptions, seed: u64, nodes: usize, shape: Shape) -> PathBuf {
    opts.work_dir
        .join(format!("{}.toml", random::name(seed, nodes, shape)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::emulate::report::EventRecord;

    fn viewer(id: &str, received: u64, intact: u64, expected: u64, stall: u64) -> ClientReport {
        ClientReport {
            id: id.into(),
            stream: "bars".into(),
            switched_to: vec![],
            pop: Some("p1".into()),
            frames_received: received,
            frames_intact: intact,
            frames_expected: expected,
            intact_pct: super::super::report::share_pct(intact, expected),
            incomplete: 0,
            nacks: 0,
            stalls_ms: vec![],
            longest_stall_ms: stall,
            pop_switches: 0,
            summary: "pop=- frames=0".into(),
            last_warning: None,
            first_frame_after_ms: Some(100),
            silent_at_end_ms: Some(40),
            behind_at_end_ms: Some(40),
        }
    }

    fn report(clients: Vec<ClientReport>, events: Vec<EventRecord>) -> Report {
        Report {
            topology: "random-1-n16".into(),
            scenario: "every-client".into(),
            description: String::new(),
            duration_s: 20.0,
            recovery: true,
            run: "1x0".into(),
            work_dir: "/tmp/run".into(),
            initial_parents: BTreeMap::new(),
            clients,
            parent_changes: vec![],
            events,
            links: vec![],
            pids: vec![],
        }
    }

    fn topo() -> Topology {
        Topology::parse(&random::generate(1, 16), "t").expect("valid")
    }

    #[test]
    fn a_line_passes_only_when_every_viewer_got_every_frame() {
        let t = topo();
        let path = Path::new("/tmp/t.toml");
        let good = report(
            vec![
                viewer("c1", 500, 500, 500, 40),
                viewer("c2", 498, 498, 498, 80),
            ],
            vec![],
        );
        let l = line_for(1, &t, &good, 100.0, path);
        assert!(l.ok(), "{l:?}");
        assert_eq!(
            (l.viewers, l.intact, l.expected, l.longest_stall_ms),
            (2, 998, 998, 80)
        );
        assert_eq!(l.killed, "-");
        assert!(l.text().contains("998/998"));

        // One frame short of 100 %.
        let short = report(vec![viewer("c1", 499, 499, 500, 40)], vec![]);
        let l = line_for(1, &t, &short, 100.0, path);
        assert!(
            !l.ok() && l.verdict.contains("c1 99.80 % intact"),
            "{}",
            l.verdict
        );
        // ... which is fine against 99.9 %? No: 99.8 < 99.9.
        assert!(!line_for(1, &t, &short, 99.9, path).ok());
        let fine = report(vec![viewer("c1", 1999, 1999, 2000, 40)], vec![]);
        assert!(line_for(1, &t, &fine, 99.9, path).ok());

        // Nothing received: 0 %, not the 100 % of "nothing expected"; the cause is the
        // viewer's last warning, or its summary; viewers with one cause are grouped.
        let warned = |id: &str| {
            let mut v = viewer(id, 0, 0, 0, 0);
            v.last_warning = Some("WARN no usable pop".into());
            v
        };
        let none = report(
            vec![
                viewer("c1", 500, 500, 500, 0),
                viewer("c2", 0, 0, 0, 0),
                warned("c3"),
                warned("c4"),
            ],
            vec![],
        );
        let l = line_for(1, &t, &none, 100.0, path);
        assert_eq!(l.min_intact_pct, 0.0);
        assert_eq!(
            l.verdict,
            "c2 received nothing (pop=- frames=0); c3, c4 received nothing (WARN no usable pop)"
        );

        // Damaged frames, and a stream that died 3 s before the end.
        let mut died = viewer("c2", 100, 100, 100, 0);
        died.silent_at_end_ms = Some(3000);
        let bad = report(vec![viewer("c1", 500, 490, 500, 0), died], vec![]);
        let l = line_for(1, &t, &bad, 100.0, path);
        assert!(
            l.verdict.contains("c1 wrote 10 damaged frames"),
            "{}",
            l.verdict
        );
        assert!(
            l.verdict.contains("c2 silent for the last 3.0 s"),
            "{}",
            l.verdict
        );

        // A slow start is a note, not a failure.
        let mut slow = viewer("c1", 400, 400, 400, 0);
        slow.first_frame_after_ms = Some(5400);
        let l = line_for(1, &t, &report(vec![slow], vec![]), 100.0, path);
        assert!(l.ok(), "{l:?}");
        assert!(
            l.text().ends_with("ok (c1 first frame after 5.4 s)"),
            "{}",
            l.text()
        );
        assert!(!line_for(1, &t, &report(vec![], vec![]), 100.0, path).ok());
    }

    #[test]
    fn the_killed_relay_is_read_from_the_events() {
        let t = topo();
        let path = Path::new("/tmp/t.toml");
        let ev = |what: &str| EventRecord {
            t_ms: 10_000,
            what: what.into(),
        };
        let r = report(
            vec![viewer("c1", 500, 500, 500, 0)],
            vec![ev("kill the most active relay: killed r3")],
        );
        assert_eq!(line_for(1, &t, &r, 99.9, path).killed, "r3");
        let r = report(
            vec![viewer("c1", 500, 500, 500, 0)],
            vec![ev("kill the most active relay: no relay carries a stream whose loss the overlay survives: none killed")],
        );
        assert_eq!(line_for(1, &t, &r, 99.9, path).killed, "none");
    }

    #[test]
    fn faults_set_the_target_and_are_added_to_a_scenario() {
        assert_eq!(Faults::default().target_pct(), 100.0);
        let f = Faults {
            loss_pct: Some(3.0),
            kill_relay: true,
        };
        assert_eq!(f.target_pct(), 99.9);
        let t = Topology::load(&crate::project_root().join("topologies/seed.toml")).expect("seed");
        let mut s = Scenario::default_for(&t, &["a".into(), "b".into()]);
        s.duration_s = 12.0;
        f.add_to(&mut s);
        assert!(s.clients.iter().all(|c| c.start_s == 0.5));
        assert_eq!(
            s.events[0].action.link_change().and_then(|c| c.loss_pct),
            Some(3.0)
        );
        assert_eq!(
            (s.events[1].at_s, &s.events[1].action),
            (6.0, &Action::KillActiveRelay)
        );
    }

    #[test]
    fn the_summary_names_each_failed_seed_with_its_replay() {
        let t = topo();
        let path = Path::new("/tmp/random-2-n16.toml");
        let ok = line_for(
            1,
            &t,
            &report(vec![viewer("c1", 500, 500, 500, 30)], vec![]),
            100.0,
            path,
        );
        let bad = line_for(
            2,
            &t,
            &report(vec![viewer("c1", 0, 0, 0, 0)], vec![]),
            100.0,
            path,
        );
        let s = summary(&[ok, bad]);
        assert!(s.contains("1 of 2 seeds ok"), "{s}");
        assert!(s.contains("seed 2 failed: c1 received nothing"), "{s}");
        assert!(s.contains("--topology /tmp/random-2-n16.toml"), "{s}");
    }
}
