//! Redundant delivery with the real programs on loopback (issue 11): a viewer running
//! `ott-client --paths 2` receives its stream through two PoPs whose tree paths share no
//! relay; SIGKILL of the relay on its first path costs it no frame.

mod common;

use std::time::Duration;

use common::*;
use ott_overlay::Role;
use ott_testkit::{http_get, parse_summary, verify_mjpeg, wait_for};

/// The viewer's `/status`, parsed.
fn status(addr: std::net::SocketAddr) -> Option<serde_json::Value> {
    http_get(addr, "/status")
        .ok()
        .and_then(|b| serde_json::from_str(&b).ok())
}

/// The node ids of path `i` of the viewer's status.
fn path(s: &serde_json::Value, i: usize) -> Vec<String> {
    s["paths"][i]["path"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_relay_killed_under_two_paths_costs_the_viewer_no_frame() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let clip = &clips[0];
    let mut c = launch("paths-kill-relay", "twin-paths.toml", 43);
    let out = out_file("paths-kill-relay");
    let out_s = out.display().to_string();
    let status_addr: std::net::SocketAddr = "127.43.254.1:9400".parse().expect("literal");
    let status_s = status_addr.to_string();
    c.spawn_client(
        "v",
        None,
        &[
            "--stream",
            &clip.name,
            "--duration",
            "14",
            "--output",
            &out_s,
            "--paths",
            "2",
            "--status",
            &status_s,
        ],
    )
    .expect("client starts");
    // Both paths joined, admitted and disjoint, and the stream flowing.
    let mut last = serde_json::Value::Null;
    let ready = wait_for(Duration::from_secs(20), "two disjoint paths", || {
        let Some(s) = status(status_addr) else {
            return false;
        };
        let paths = s["paths"].as_array().cloned().unwrap_or_default();
        let ok = paths.len() == 2
            && paths.iter().all(|p| p["admitted"] == true)
            && s["disjoint"] == true
            && std::fs::metadata(&out)
                .map(|m| m.len() > 60_000)
                .unwrap_or(false);
        last = s;
        ok
    });
    assert!(ready.is_ok(), "{:#}", last);
    let first = path(&last, 0);
    let victim = first
        .iter()
        .find(|n| c.topology.node(n).map(|n| n.role) == Some(Role::Relay))
        .cloned()
        .unwrap_or_else(|| panic!("a relay on the first path {first:?}"));
    c.kill_node(&victim).expect("kill -9");
    let summary = c
        .wait_client("v", Duration::from_secs(60))
        .expect("client ends cleanly");
    let s = parse_summary(&summary);
    let data = std::fs::read(&out).expect("output written");
    let v = verify_mjpeg(&data, clip).expect("whole JPEG frames");
    eprintln!("killed {victim} on path {first:?}: {v:?}, summary {summary}");
    assert_eq!(v.intact, v.frames, "every frame is a source frame");
    assert!(v.in_order, "{v:?}");
    assert!(v.frames > 200, "{v:?}");
    assert_eq!(
        v.missing, 0,
        "no frame lost when {victim} died: {v:?} {summary}"
    );
    let gap: u64 = s
        .get("longest_gap_ms")
        .and_then(|g| g.parse().ok())
        .expect("summary has longest_gap_ms");
    assert!(gap < 200, "a {gap} ms stall");
}
