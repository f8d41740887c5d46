//! `ott-server`: the root of the overlay; streams every clip of a directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ott_bootstrap::Request;
use ott_overlay::Role;

/// The OTT streaming server: streams every clip in --videos as a stream named after the
/// file's stem (news.mjpeg → news), looped and paced at the clip's own rate.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// This server's id in the topology.
    #[arg(long)]
    id: String,
    /// Bootstrapper address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    bootstrap: SocketAddr,
    /// Directory of clips (.mjpeg, with an optional NAME.fps sidecar).
    #[arg(long)]
    videos: PathBuf,
    /// Serve GET /status (JSON) and /metrics (Prometheus) on this address.
    #[arg(long)]
    status: Option<SocketAddr>,
    /// How long to wait for the bootstrapper to answer, in seconds.
    #[arg(long, default_value_t = 30)]
    bootstrap_wait: u64,
    #[command(flatten)]
    tuning: ott_apps::overlay::Tuning,
}

fn main() -> std::process::ExitCode {
    ott_apps::init_logging();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ott-server: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Check the clips before anything else: a bad directory is the user's first mistake.
    let clips = ott_media::load_dir(&args.videos)?;
    let catalogue: Vec<_> = clips.iter().map(|c| c.info()).collect();
    for c in &clips {
        tracing::info!(stream = %c.name, fps = c.fps, frames = c.frames.len(), "clip loaded");
    }
    let req = Request::Node {
        id: args.id.clone(),
    };
    let a = ott_apps::overlay::bootstrap(
        args.bootstrap,
        req,
        Duration::from_secs(args.bootstrap_wait),
    )?;
    if a.role != Role::Server {
        anyhow::bail!(
            "node {:?} is a {} in the topology, not a server: run ott-node for it",
            a.id,
            a.role
        );
    }
    ott_apps::overlay::run_with(
        a,
        args.status,
        catalogue,
        Box::new(move |sock, counters, cmds| {
            ott_apps::source::spawn_source(clips, sock, counters, cmds)
        }),
        args.tuning,
    )
}
