//! Helpers shared by the real-process test files (each test file is its own crate and
//! uses only some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ott_testkit::{Cluster, LaunchOptions};

/// Keeps at most one cluster of a test file running at a time, so timings stay
/// realistic on small machines.
pub(crate) static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where cargo put the four programs.
pub(crate) fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_ott-node"))
        .parent()
        .expect("binaries live in a directory")
        .to_path_buf()
}

/// A fresh scratch directory (an earlier run's is removed).
pub(crate) fn work_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Start `topology` on 127.`net`.x.y with extra `ott-server` flags and wait for the tree.
pub(crate) fn launch_with(
    name: &str,
    topology: &str,
    net: u8,
    server_args: Vec<String>,
) -> Cluster {
    let c = Cluster::start_with_server_args(
        LaunchOptions {
            bin_dir: bin_dir(),
            topology: root().join("topologies").join(topology),
            videos: root().join("videos"),
            net,
            work_dir: work_dir(name),
            log_filter: "info".into(),
        },
        server_args,
    )
    .expect("cluster starts");
    c.wait_converged(Duration::from_secs(30))
        .expect("tree forms");
    c
}

/// Start `topology` on 127.`net`.x.y and wait for the tree.
pub(crate) fn launch(name: &str, topology: &str, net: u8) -> Cluster {
    launch_with(name, topology, net, Vec::new())
}

/// The sample clips (at least two MJPEG ones come first).
pub(crate) fn clips() -> Vec<ott_media::Clip> {
    let clips = ott_media::load_dir(&root().join("videos")).expect("sample clips load");
    assert!(clips.len() >= 2, "need two sample clips");
    clips
}

/// A fresh output path: an earlier run's file is removed.
pub(crate) fn out_file(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.mjpeg"));
    let _ = std::fs::remove_file(&p);
    p
}
