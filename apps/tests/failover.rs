//! Failover with the real programs on loopback (issue 3): a relay on the active path
//! killed with SIGKILL mid-stream, a viewer's PoP killed, and the server feeding a
//! viewer killed while a second server offers the same clip. Each test uses its own
//! 127.4N.x.y range; a lock keeps one cluster at a time so timings stay realistic.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ott_overlay::Role;
use ott_testkit::{parse_summary, verify_mjpeg, wait_for, Cluster};

/// The PoP serving a viewer of `stream` (a `client@` child in its status), if any.
fn pop_of(c: &Cluster, stream: &str) -> Option<String> {
    c.topology.pops().iter().map(|n| n.id.clone()).find(|p| {
        c.status(p).is_ok_and(|s| {
            s["streams"][stream]["children"]
                .as_array()
                .is_some_and(|ch| {
                    ch.iter()
                        .any(|x| x.as_str().is_some_and(|x| x.starts_with("client@")))
                })
        })
    })
}

/// The path from the server to `node`, from its status.
fn path_of(c: &Cluster, node: &str) -> Vec<String> {
    c.status(node)
        .ok()
        .and_then(|s| {
            s["path"].as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn role(c: &Cluster, id: &str) -> Option<Role> {
    c.topology.node(id).map(|n| n.role)
}

/// Start a viewer of `clip` writing to a fresh file; returns the file.
fn watch(c: &mut Cluster, name: &str, clip: &str, secs: u32) -> PathBuf {
    let out = out_file(name);
    let out_s = out.display().to_string();
    let d = secs.to_string();
    c.spawn_client(
        name,
        None,
        &["--stream", clip, "--duration", &d, "--output", &out_s],
    )
    .expect("client starts");
    out
}

fn wait_flowing(out: &Path) {
    wait_for(Duration::from_secs(20), "the stream flows", || {
        std::fs::metadata(out)
            .map(|m| m.len() > 60_000)
            .unwrap_or(false)
    })
    .expect("stream flows");
}

/// Wait for a viewer, check its output is whole source frames, return its summary.
fn finish(
    c: &mut Cluster,
    name: &str,
    clip: &ott_media::Clip,
    out: &Path,
) -> BTreeMap<String, String> {
    let summary = c
        .wait_client(name, Duration::from_secs(60))
        .expect("client ends cleanly");
    let data = std::fs::read(out).expect("output written");
    let v = verify_mjpeg(&data, clip).expect("output is whole JPEG frames");
    assert!(v.frames > 0, "{name} received nothing: {summary}");
    assert_eq!(
        v.intact, v.frames,
        "{name}: every frame is a source frame: {summary}"
    );
    parse_summary(&summary).into_iter().collect()
}

fn num(s: &BTreeMap<String, String>, k: &str) -> u64 {
    s.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("summary has no {k}: {s:?}"))
}

#[test]
fn kill_9_a_relay_on_the_active_path_both_clients_resume_within_a_second() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let mut c = launch("failover-relay", "seed.toml", 40);
    let outs: Vec<(String, &ott_media::Clip, PathBuf)> = clips
        .iter()
        .take(2)
        .enumerate()
        .map(|(i, clip)| {
            let name = format!("v{i}");
            let out = watch(&mut c, &name, &clip.name, 14);
            (name, clip, out)
        })
        .collect();
    for (_, _, out) in &outs {
        wait_flowing(out);
    }
    // The relays on the viewers' paths; kill the one most of them go through.
    let mut count: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (_, clip, _) in &outs {
        let pop = pop_of(&c, &clip.name).expect("a PoP serves the viewer");
        for (depth, n) in path_of(&c, &pop).into_iter().enumerate() {
            if role(&c, &n) == Some(Role::Relay) {
                let e = count.entry(n).or_insert((0, depth));
                e.0 += 1;
            }
        }
    }
    let victim = count
        .iter()
        .max_by_key(|(_, (n, depth))| (*n, std::cmp::Reverse(*depth)))
        .map(|(id, _)| id.clone())
        .expect("a relay on the active path");
    c.kill_node(&victim).expect("kill -9");
    for (name, clip, out) in &outs {
        let s = finish(&mut c, name, clip, out);
        let gap = num(&s, "longest_packet_gap_ms");
        eprintln!("killed {victim}: {name} outage (longest packet gap) {gap} ms, summary {s:?}");
        assert!(
            gap < 1000,
            "{name} went {gap} ms without media after {victim} died"
        );
        // Still playing at the clip rate overall (about 14 s at 25 fps, less the start).
        assert!(num(&s, "frames") > 200, "{name}: {s:?}");
    }
}

#[test]
fn a_client_whose_pop_is_killed_moves_to_another_pop_and_keeps_playing() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let clip = &clips[0];
    let mut c = launch("failover-pop", "seed.toml", 41);
    let out = watch(&mut c, "v", &clip.name, 12);
    wait_flowing(&out);
    let pop = pop_of(&c, &clip.name).expect("a PoP serves the viewer");
    c.kill_node(&pop).expect("kill -9");
    let s = finish(&mut c, "v", clip, &out);
    let gap = num(&s, "longest_packet_gap_ms");
    eprintln!("killed PoP {pop}: outage (longest packet gap) {gap} ms, summary {s:?}");
    assert!(num(&s, "pop_switches") >= 1, "moved PoP: {s:?}");
    assert_ne!(s.get("pop").map(String::as_str), Some(pop.as_str()));
    assert!(gap < 1000, "went {gap} ms without media after {pop} died");
    assert!(num(&s, "frames") > 150, "{s:?}");
}

#[test]
fn two_servers_kill_the_one_feeding_the_viewer_it_keeps_playing_from_the_other() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let clip = &clips[0];
    let mut c = launch("failover-two-servers", "two-servers.toml", 42);
    let out = watch(&mut c, "v", &clip.name, 12);
    wait_flowing(&out);
    let pop = pop_of(&c, &clip.name).expect("a PoP serves the viewer");
    let server = path_of(&c, &pop)
        .first()
        .cloned()
        .expect("the PoP has a path");
    assert_eq!(role(&c, &server), Some(Role::Server));
    c.kill_node(&server).expect("kill -9");
    let s = finish(&mut c, "v", clip, &out);
    let gap = num(&s, "longest_packet_gap_ms");
    eprintln!("killed server {server}: outage (longest packet gap) {gap} ms, summary {s:?}");
    assert!(
        gap < 1000,
        "went {gap} ms without media after {server} died"
    );
    assert!(num(&s, "source_switches") >= 1, "{s:?}");
    assert!(num(&s, "frames") > 150, "{s:?}");
}
