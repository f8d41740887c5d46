//! The looped sample TS clip, as the server sends it, decodes with ffmpeg without an error.
//!
//! Needs ffmpeg/ffprobe; without them the test says so and passes, unless `CI` is set.
// Tests may read the clock (an origin for fake time) and files (samples).
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;

use ott_media::{Clip, ClipSource};

fn tool(name: &str) -> bool {
    let ok = Command::new(name)
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required in CI (CI is set) but could not be run"
        );
        eprintln!("SKIPPED: {name} is not installed (install ffmpeg to run this check)");
    }
    ok
}

fn videos() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../videos")
}

#[test]
fn looped_ts_clip_decodes_without_errors_and_keeps_every_frame() {
    if !(tool("ffmpeg") && tool("ffprobe")) {
        return;
    }
    let clip = Clip::load(&videos().join("testcard.ts")).expect("sample clip loads");
    let n = clip.frames.len();
    let mut src = ClipSource::new(clip);
    let mut out = Vec::new();
    // Two and a half plays: two loop points.
    for _ in 0..(5 * n / 2) {
        out.extend_from_slice(&src.next_timed().data);
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("looped.ts");
    std::fs::write(&path, &out).expect("write looped stream");
    let decode = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&path)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    let errors = String::from_utf8_lossy(&decode.stderr);
    assert!(
        decode.status.success() && errors.trim().is_empty(),
        "ffmpeg: {errors}"
    );
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(&path)
        .output()
        .expect("ffprobe runs");
    // ffprobe prints the stream once per program and once alone: take the first.
    let frames: usize = String::from_utf8_lossy(&probe.stdout)
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .parse()
        .expect("ffprobe prints a frame count");
    assert_eq!(frames, 5 * n / 2, "every frame of every loop decodes");
}
