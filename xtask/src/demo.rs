//! `cargo xtask demo`: the whole service on loopback, no root needed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ott_testkit::{parse_summary, verify_mjpeg, Cluster, KeyMode, LaunchOptions};

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// Topology to run.
    #[arg(long, default_value = "topologies/seed.toml")]
    topology: PathBuf,
    /// Directory of clips.
    #[arg(long, default_value = "videos")]
    videos: PathBuf,
    /// How long each client watches, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", alias = "duration",
          value_parser = clap::value_parser!(u64).range(1..=ott_apps::args::MAX_FLAG_SECS))]
    duration_secs: u64,
    /// Second octet of the loopback addresses used (127.N.x.y).
    #[arg(long, default_value_t = 77)]
    net: u8,
    /// Run the overlay without a key. By default the run makes one (32 random bytes in
    /// the work directory, removed at the end) and gives it to every overlay program.
    #[arg(long)]
    no_key: bool,
}

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<()> {
    let root = crate::project_root();
    let topology = root.join(&args.topology);
    let videos = root.join(&args.videos);
    // The demo checks frames byte for byte as JPEG: it plays the MJPEG clips.
    let clips: Vec<_> = ott_media::load_dir(&videos)?
        .into_iter()
        .filter(|c| c.ts.is_none())
        .collect();
    if clips.len() < 2 {
        anyhow::bail!("the demo needs two MJPEG clips in {}", videos.display());
    }
    eprintln!("building the programs…");
    let bin_dir = crate::build_binaries(false)?;
    let work_dir = root.join("target").join("demo");
    let _ = std::fs::remove_dir_all(&work_dir);
    eprintln!(
        "starting {} on loopback (127.{}.x.y)…",
        topology.display(),
        args.net
    );
    let key = if args.no_key {
        KeyMode::None
    } else {
        KeyMode::Generated
    };
    let mut cluster = Cluster::start_with(
        LaunchOptions {
            bin_dir,
            topology,
            videos,
            net: args.net,
            work_dir: work_dir.clone(),
            log_filter: "info".into(),
        },
        Vec::new(),
        key,
    )?;
    if let Some(k) = cluster.key_file() {
        eprintln!(
            "overlay key for this run: {} (removed at the end)",
            k.display()
        );
    }
    cluster
        .wait_converged(Duration::from_secs(30))
        .context("the tree did not form")?;
    eprintln!(
        "tree formed; two clients watch for {} s… (dashboard: http://{}/)",
        args.duration_secs,
        cluster.dashboard_addr()
    );
    let client_ids: Vec<Option<String>> = {
        let mut ids: Vec<Option<String>> = cluster
            .topology
            .clients()
            .iter()
            .map(|n| Some(n.id.clone()))
            .collect();
        ids.resize(2, None);
        ids
    };
    let duration = args.duration_secs.to_string();
    let mut rows = Vec::new();
    for (i, clip) in clips.iter().take(2).enumerate() {
        let name = format!("client{}", i + 1);
        let out = work_dir.join(format!("{name}.mjpeg"));
        let out_s = out.display().to_string();
        cluster.spawn_client(
            &name,
            client_ids[i].as_deref(),
            &[
                "--stream",
                &clip.name,
                "--duration-secs",
                &duration,
                "--output",
                &out_s,
            ],
        )?;
        rows.push((name, clip, out));
    }
    let mut failed = false;
    println!();
    println!(
        "{:<8} {:<8} {:<10} {:<5} {:>8} {:>7} {:>6} {:>7}",
        "client", "id", "stream", "pop", "frames", "intact", "fps", "stalls"
    );
    for (name, clip, out) in &rows {
        let summary = cluster.wait_client(name, Duration::from_secs(args.duration_secs + 30))?;
        let s = parse_summary(&summary);
        let data = std::fs::read(out).unwrap_or_default();
        let v = verify_mjpeg(&data, clip)?;
        let fps = v.frames as f64 / args.duration_secs as f64;
        let id = client_ids[rows.iter().position(|r| &r.0 == name).unwrap_or(0)]
            .clone()
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<8} {:<8} {:<10} {:<5} {:>8} {:>7} {:>6.1} {:>7}",
            name,
            id,
            clip.name,
            s.get("pop").map(String::as_str).unwrap_or("-"),
            v.frames,
            v.intact,
            fps,
            s.get("stalls").map(String::as_str).unwrap_or("-"),
        );
        if v.frames == 0 {
            failed = true;
        }
    }
    println!();
    println!("logs and received files: {}", work_dir.display());
    cluster.stop();
    if failed {
        anyhow::bail!("a client received nothing");
    }
    Ok(())
}
