//! Emulation runs in real namespaces. They need root: without it they skip with a
//! message, except in CI (`CI` set), where they must run.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::report::Report;
use super::*;

/// Longest stall allowed when a relay on the active path is killed (SPEC §9: under 1 s).
/// With 100 ms heartbeats and dead after 400 ms, three runs measured 744-753 ms for the
/// clients whose path crossed the killed relay (docs/performance.md).
const KILL_STALL_BOUND_MS: u64 = 1000;

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the emulation tests as root"
    );
    eprintln!("skipping: emulation needs root (network namespaces, TAP devices); run the tests as root to include it");
    false
}

fn run(topology: &str, scenario: &str) -> Report {
    run_with(topology, scenario, None, true)
}

/// Runs a scenario, maybe shortened to `duration` seconds, with or without loss recovery.
fn run_with(topology: &str, scenario: &str, duration: Option<f64>, recovery: bool) -> Report {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let root = crate::project_root();
    let bin_dir = crate::build_binaries(false).expect("programs build");
    let opts = RunOptions {
        topology: root.join(topology),
        scenario: Some(root.join(scenario)),
        duration,
        videos: root.join("videos"),
        bin_dir,
        work_dir: root.join("target").join("emulate-tests"),
        stop: Arc::new(AtomicBool::new(false)),
        recovery,
        paths: 1,
    };
    let report = run_scenario(&opts).expect("the emulation runs");
    eprintln!("{}", report.text());
    nothing_left(&report);
    report
}

/// No namespace of the run and no process it started is left.
fn nothing_left(r: &Report) {
    let prefix = format!("{}{}-", netns::PREFIX, r.run);
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(!r.pids.is_empty());
    for pid in &r.pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} is still there"
        );
    }
    // The TAP devices lived in the namespaces: none ever reached the host.
    let host = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(
        !host.contains(&prefix),
        "a device of the run is in the host namespace"
    );
}

fn client<'a>(r: &'a Report, id: &str) -> &'a super::report::ClientReport {
    r.clients
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no client {id}"))
}

/// Frames a client must have received: 70 % of 25 fps over the run.
fn enough(r: &Report) -> u64 {
    (r.duration_s * 25.0 * 0.7) as u64
}

#[test]
fn seed_baseline_two_clients_behind_different_routers_receive_intact_streams() {
    if !can_run() {
        return;
    }
    let r = run(
        "topologies/seed.toml",
        "topologies/scenarios/seed-baseline.toml",
    );
    for id in ["n16", "n18"] {
        let c = client(&r, id);
        assert!(c.frames_received >= enough(&r), "{id}: {c:?}");
        assert_eq!(c.frames_intact, c.frames_received, "{id}: {c:?}");
    }
}

#[test]
fn seed_kill_relay_on_the_active_path_costs_a_short_stall() {
    if !can_run() {
        return;
    }
    let r = run(
        "topologies/seed.toml",
        "topologies/scenarios/seed-kill-relay.toml",
    );
    // n12 carried the tree: its children moved.
    assert!(
        r.parent_changes
            .iter()
            .any(|c| c.from.as_deref() == Some("n12")),
        "{:?}",
        r.parent_changes
    );
    for id in ["n16", "n18"] {
        let c = client(&r, id);
        assert!(c.frames_received >= enough(&r), "{id}: {c:?}");
        assert_eq!(c.frames_intact, c.frames_received, "{id}: {c:?}");
        assert!(
            c.longest_stall_ms < KILL_STALL_BOUND_MS,
            "{id}: longest stall {} ms",
            c.longest_stall_ms
        );
    }
}

#[test]
fn seed_delay_raised_on_the_active_path_moves_the_tree() {
    if !can_run() {
        return;
    }
    let r = run(
        "topologies/seed.toml",
        "topologies/scenarios/seed-delay.toml",
    );
    // n7's parent at `t_ms`: its parent when the tree had formed, then its changes.
    let parent_at = |t_ms: u64| {
        r.parent_changes
            .iter()
            .filter(|c| c.node == "n7" && c.t_ms <= t_ms)
            .fold(r.initial_parents.get("n7").cloned().flatten(), |_, c| {
                c.to.clone()
            })
    };
    // Before the delay rose (t = 4 s), n7 may sit on any uplink: n8 or n9 when RTTs are
    // measured cleanly, n10 when a loaded machine's scheduling noise made the fast
    // uplinks look slower at start. Within 2 s of both fast uplinks going to 40 ms it
    // must be on n10, and stay there.
    for t in [6_000, 9_000, 13_000] {
        assert_eq!(
            parent_at(t).as_deref(),
            Some("n10"),
            "n7's parent at {t} ms: {:?}",
            r.parent_changes
        );
    }
    for id in ["n16", "n18"] {
        let c = client(&r, id);
        assert!(c.frames_received >= enough(&r), "{id}: {c:?}");
        assert_eq!(c.frames_intact, c.frames_received, "{id}: {c:?}");
    }
}

#[test]
fn sparse_overlay_delivers_intact_streams_over_multi_hop_overlay_links() {
    if !can_run() {
        return;
    }
    let root = crate::project_root();
    let t = Topology::load(&root.join("topologies/sparse.toml")).expect("sparse");
    let pairs = t.overlay.clone().expect("explicit overlay");
    assert!(pairs.iter().all(|p| t.link_between(&p[0], &p[1]).is_none()));
    let routers = t.with_role(Role::Router).len();
    let overlay = t.nodes.iter().filter(|n| n.role.is_overlay()).count();
    assert!(routers > overlay);
    let r = run(
        "topologies/sparse.toml",
        "topologies/scenarios/sparse-baseline.toml",
    );
    for id in ["c1", "c2"] {
        let c = client(&r, id);
        assert!(c.frames_received >= enough(&r), "{id}: {c:?}");
        assert_eq!(c.frames_intact, c.frames_received, "{id}: {c:?}");
    }
}

#[test]
fn a_crashed_runs_namespaces_are_removed_by_the_next_run() {
    if !can_run() {
        return;
    }
    // Not beside a running emulation: adding and removing namespaces while its links
    // carry media is churn it need not see (a 21 s stall of a run once coincided).
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // A pid that is not running: the "crashed" emulator.
    let dead = (100_000..4_000_000u32)
        .step_by(7919)
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid");
    let ns = format!("{}{dead}x0-zz", netns::PREFIX);
    netns::ip(&["netns", "add", &ns]).expect("namespace");
    // Someone else's namespace that merely looks similar is left alone.
    let other = format!("{}probe-{dead}", netns::PREFIX);
    netns::ip(&["netns", "add", &other]).expect("namespace");
    let removed = netns::cleanup_stale();
    let still = netns::list();
    netns::destroy(&other);
    assert!(removed.contains(&ns), "{removed:?}");
    assert!(!still.contains(&ns));
    assert!(
        still.contains(&other),
        "a name that is not ours was removed"
    );
}

/// Frames intact against frames the sources sent, over all clients, percent (0 when
/// nothing arrived).
fn intact_share(r: &Report) -> f64 {
    let intact: u64 = r.clients.iter().map(|c| c.frames_intact).sum();
    let expected: u64 = r.clients.iter().map(|c| c.frames_expected).sum();
    if expected == 0 {
        0.0
    } else {
        intact as f64 * 100.0 / expected as f64
    }
}

#[test]
fn seed_loss5_recovery_delivers_what_the_lossy_links_destroy_without_it() {
    if !can_run() {
        return;
    }
    // 5 % loss on every link: 7 lossy links between the server and each client. The
    // same 10 s with and without NACKs; the bounds are far from both measured sides
    // (about 100 % and 15-35 %, see docs/performance.md) so that a loaded machine does
    // not flip them.
    let scenario = "topologies/scenarios/seed-loss5.toml";
    let on = run_with("topologies/seed.toml", scenario, Some(10.0), true);
    let off = run_with("topologies/seed.toml", scenario, Some(10.0), false);
    assert!(on.recovery && !off.recovery);
    for c in &on.clients {
        // A stream was watched (2 s of it at least). Not more: under 5 % loss on the
        // six or so links to the bootstrapper, lost SYNs delayed one viewer's start by
        // 6 s of the 10 (88 frames, every one intact; a CI run of 2026-12-04). The
        // share intact below is what this test is about.
        assert!(c.frames_received >= 50, "{}: {c:?}", c.id);
        // Never a damaged frame: incomplete frames are dropped, not written.
        assert_eq!(c.frames_intact, c.frames_received, "{}: {c:?}", c.id);
        assert!(c.nacks > 0, "{}: {c:?}", c.id);
    }
    for c in &off.clients {
        assert_eq!(c.frames_intact, c.frames_received, "{}: {c:?}", c.id);
        assert_eq!(c.nacks, 0, "{}: {c:?}", c.id);
    }
    let (on_pct, off_pct) = (intact_share(&on), intact_share(&off));
    eprintln!("intact with recovery {on_pct:.2} %, without {off_pct:.2} %");
    assert!(on_pct >= 97.0, "with recovery only {on_pct:.2} % intact");
    assert!(
        off_pct <= 80.0,
        "without recovery {off_pct:.2} % intact: is the loss applied?"
    );
}

/// Longest stall allowed on a generated topology with 3 % loss on every link when the
/// busiest relay is killed: looser than [`KILL_STALL_BOUND_MS`] because lost control
/// messages delay the detection and the new parent's offer.
const RANDOM_KILL_STALL_BOUND_MS: u64 = 2500;

/// Runs the generated topology of `seed` with a viewer on every client, as `emulate
/// --random` does.
fn run_random(
    seed: u64,
    nodes: usize,
    shape: random::Shape,
    faults: sweep::Faults,
    duration: f64,
) -> (Report, sweep::Line) {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let root = crate::project_root();
    let opts = RunOptions {
        topology: PathBuf::new(),
        scenario: None,
        duration: Some(duration),
        videos: root.join("videos"),
        bin_dir: crate::build_binaries(false).expect("programs build"),
        work_dir: root.join("target").join("emulate-tests"),
        stop: Arc::new(AtomicBool::new(false)),
        recovery: true,
        paths: 1,
    };
    let (report, line) = sweep::run_one(&opts, seed, nodes, shape, faults)
        .unwrap_or_else(|e| panic!("seed {seed}: the emulation runs: {e:#}"));
    eprintln!(
        "{}\n{}\n{}",
        report.text(),
        sweep::Line::header(),
        line.text()
    );
    nothing_left(&report);
    (report, line)
}

/// Whether some viewer of the generated topology has no PoP that answers from the
/// address the viewer knows it by.
fn bitten(seed: u64, nodes: usize) -> bool {
    let t = Topology::parse(&random::generate(seed, nodes), "generated").expect("valid");
    !random::viewers_without_a_pop_answering_from_its_known_address(&t).is_empty()
}

/// Every viewer started within `start_ms`, received intact frames only, and kept
/// receiving to the end.
fn every_viewer_got_intact_frames(r: &Report, line: &sweep::Line, start_ms: u64) {
    assert!(!r.clients.is_empty());
    assert_eq!(line.viewers, r.clients.len());
    for c in &r.clients {
        let what = format!("seed {}: {}: {c:?}", line.seed, c.id);
        assert!(c.frames_received >= 50, "{what}");
        assert_eq!(c.frames_intact, c.frames_received, "{what}");
        assert!(
            c.first_frame_after_ms.is_some_and(|ms| ms < start_ms),
            "{what}"
        );
        assert!(c.silent_at_end_ms.is_some_and(|ms| ms < 1000), "{what}");
    }
}

/// Issue 15: random topologies, PoPs' links in any order, a dense one, a sparse one
/// across routers and a small one, each with a viewer that no PoP answers from the
/// address the viewer knows it by. Waits for nodes that answer from the address they
/// were asked on: until then these viewers get no frame.
#[test]
fn random_topologies_deliver_intact_frames_to_every_viewer() {
    if !can_run() {
        return;
    }
    let dense = (1..)
        .find(|&s| !random::is_sparse(s, 14) && bitten(s, 14))
        .expect("a dense seed");
    let sparse = (1..)
        .find(|&s| random::is_sparse(s, 16) && bitten(s, 16))
        .expect("a sparse seed");
    let small = (100..).find(|&s| bitten(s, 10)).expect("a small seed");
    for (seed, nodes) in [(dense, 14), (sparse, 16), (small, 10)] {
        let (r, line) = run_random(
            seed,
            nodes,
            random::Shape::default(),
            sweep::Faults::default(),
            8.0,
        );
        every_viewer_got_intact_frames(&r, &line, 3000);
        assert!(r.clients.iter().all(|c| c.frames_received >= enough(&r)));
        assert!(line.ok(), "{}", line.text());
    }
}

/// Random topologies whose PoPs are known by the address that faces their clients (the
/// ones today's nodes handle), with 3 % loss on every link and the busiest relay killed
/// halfway: viewers keep receiving, intact, after a bounded stall.
#[test]
fn random_topologies_with_client_facing_pops_survive_loss_and_a_killed_relay() {
    if !can_run() {
        return;
    }
    let dense = (1..).find(|&s| !random::is_sparse(s, 14)).expect("dense");
    let sparse = (1..).find(|&s| random::is_sparse(s, 16)).expect("sparse");
    let faults = sweep::Faults {
        loss_pct: Some(3.0),
        kill_relay: true,
    };
    let shape = random::Shape {
        clients_first: true,
    };
    for (seed, nodes) in [(dense, 14), (sparse, 16)] {
        let (r, line) = run_random(seed, nodes, shape, faults, 12.0);
        // A lost TCP SYN to the bootstrapper costs 1 s, two cost 3 s, three 7 s; with
        // 3 % loss on each of the 4-8 links a SYN and its answer cross, an attempt fails
        // about one time in five, so two in a row (3 s, plus the probes, catalogue and
        // admission under the same loss: 6.8 s seen in CI) are not rare. 10 s allows
        // three.
        every_viewer_got_intact_frames(&r, &line, 10_000);
        // The loss was on every link, and the kill ran halfway.
        // 3 % of 500 frames: a busy link that lost none would not have been lossy.
        let busy = r
            .links
            .iter()
            .filter(|l| l.delivered.iter().sum::<u64>() >= 500);
        assert!(busy.clone().count() > 0);
        for l in busy {
            assert!(l.lost.iter().sum::<u64>() > 0, "seed {seed}: {l:?}");
        }
        let kill = r
            .events
            .iter()
            .find(|e| e.what.starts_with("kill the most active relay"))
            .expect("the kill ran");
        assert!((5500..7500).contains(&kill.t_ms), "{kill:?}");
        if let Some((_, relay)) = kill.what.split_once(": killed ") {
            let t = Topology::load(Path::new(&line.topology)).expect("topology");
            assert_eq!(t.node(relay).map(|n| n.role), Some(Role::Relay), "{kill:?}");
        }
        // Playing again after the kill: one path per viewer, so the failover is a stall
        // (measured 0.4-1.2 s under this loss; SPEC §9 wants under 1 s without loss).
        for c in &r.clients {
            assert!(
                c.longest_stall_ms < RANDOM_KILL_STALL_BOUND_MS,
                "seed {seed}: {c:?}"
            );
        }
    }
}

/// Flags out of range are refused before anything is built or any namespace made (no
/// root needed to see it): a negative, infinite or NaN `--duration` panicked in
/// `Duration::from_secs_f64` after the tree had formed.
#[test]
fn senseless_flags_are_refused_before_anything_starts() {
    #[derive(clap::Parser)]
    struct Line {
        #[command(flatten)]
        emulate: EmulateArgs,
    }
    for (flags, said) in [
        (
            &["--random", "1", "--duration=-1"][..],
            "--duration -1: a positive number of seconds",
        ),
        (
            &["--random", "1", "--duration", "nan"],
            "--duration NaN: a positive number of seconds",
        ),
        (
            &["--random", "1", "--duration", "inf"],
            "--duration inf: a positive number of seconds",
        ),
        (
            &["--random", "1", "--duration", "0"],
            "--duration 0: a positive number of seconds",
        ),
        (
            &["--random", "1", "--loss", "150"],
            "--loss 150: a percentage from 0 to 100",
        ),
        (
            &["--random-sweep", "0"],
            "--random-sweep 0: sweep at least one seed",
        ),
    ] {
        let line = <Line as clap::Parser>::try_parse_from(
            std::iter::once("emulate").chain(flags.iter().copied()),
        )
        .unwrap_or_else(|e| panic!("{flags:?} parses: {e}"));
        let e = super::run(line.emulate).expect_err(said);
        assert!(e.to_string().contains(said), "{flags:?}: {e:#}");
    }
}
