//! `ott-server`: the root of the overlay; streams every clip of a directory and live inputs.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ott_bootstrap::Request;
use ott_overlay::Role;

/// The OTT streaming server: streams every clip in --videos as a stream named after the
/// file's stem (news.mjpeg → news, match.ts → match), looped and paced at the clip's own
/// rate (MJPEG: its .fps sidecar; MPEG-TS: its PCR), and every --live input.
#[derive(Parser, Debug)]
#[command(name = "ott-server", version, after_help = LIVE_HELP)]
struct Args {
    /// This server's id in the topology.
    #[arg(long)]
    id: String,
    /// Bootstrapper address.
    #[arg(long, default_value = "127.0.0.1:7070", value_parser = ott_apps::args::parse_addr, value_name = "ADDR")]
    bootstrap: SocketAddr,
    /// Directory of clips (.mjpeg with an optional NAME.fps sidecar, .ts).
    #[arg(long, required_unless_present = "live", value_name = "DIR")]
    videos: Option<PathBuf>,
    /// A live input: NAME[:ts|:mjpeg]=udp://ADDR:PORT or NAME[:ts|:mjpeg]=stdin
    /// (MPEG-TS unless :mjpeg is given). Repeat for several.
    #[arg(long, value_name = "NAME[:KIND]=SOURCE")]
    live: Vec<ott_apps::live::LiveSpec>,
    /// Serve GET /status (JSON) and /metrics (Prometheus) on this address.
    #[arg(long, value_parser = ott_apps::args::parse_addr, value_name = "ADDR")]
    status: Option<SocketAddr>,
    /// The overlay's shared key: a file of at least 32 random bytes (e.g.
    /// `head -c 32 /dev/urandom > overlay.key`), the same for every server, relay, PoP
    /// and the bootstrapper. Without it the overlay's datagrams carry no tags (a warning).
    #[arg(long, value_name = "FILE")]
    key_file: Option<std::path::PathBuf>,
    /// How long to keep asking the bootstrapper while it is not up yet or busy, in
    /// seconds (an unknown id fails at once).
    #[arg(
        long,
        default_value_t = 30,
        value_name = "SECS",
        alias = "bootstrap-wait",
        value_parser = clap::value_parser!(u64).range(0..=ott_apps::args::MAX_FLAG_SECS)
    )]
    bootstrap_wait_secs: u64,
    #[command(flatten)]
    tuning: ott_apps::node_runtime::Tuning,
}

fn main() -> std::process::ExitCode {
    ott_apps::init_logging();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ott-server: error: {}", ott_apps::args::error_line(&e));
            std::process::ExitCode::from(2)
        }
    }
}

const LIVE_HELP: &str = "Live input examples:
  ott-server --id s1 --videos videos --live cam=udp://127.0.0.1:5000
  ffmpeg -re -i in.mp4 -c:v libx264 -g 50 -f mpegts udp://127.0.0.1:5000
  ffmpeg -re -i in.mp4 -c:v mjpeg -f mjpeg - | ott-server --id s1 --live desk:mjpeg=stdin";

fn run(args: Args) -> anyhow::Result<()> {
    use ott_apps::source::Input;
    args.tuning.check()?;
    // Check the clips before anything else: a bad directory is the user's first mistake.
    let clips = match &args.videos {
        Some(dir) => ott_media::load_dir(dir)?,
        None => Vec::new(),
    };
    let mut catalogue: Vec<_> = clips.iter().map(|c| c.info()).collect();
    for c in &clips {
        tracing::info!(stream = %c.name, kind = ?c.kind, fps = c.fps, frames = c.frames.len(), "clip loaded");
    }
    for l in &args.live {
        if catalogue.iter().any(|c| c.name == l.name) {
            anyhow::bail!("live input {:?} has the name of another stream", l.name);
        }
        catalogue.push(l.info());
    }
    let (live_tx, live_rx) = crossbeam_channel::bounded(256);
    ott_apps::live::spawn_readers(&args.live, &live_tx)?;
    drop(live_tx);
    let mut inputs: Vec<Input> = clips.into_iter().map(Input::Clip).collect();
    inputs.extend(args.live.iter().map(|l| Input::Live {
        name: l.name.clone(),
        kind: l.kind,
    }));
    let req = Request::Node {
        id: args.id.clone(),
    };
    let key = ott_apps::keying::key_from_flag(args.key_file.as_deref())?;
    let a = ott_apps::node_runtime::bootstrap_keyed(
        args.bootstrap,
        req,
        key.as_ref(),
        Duration::from_secs(args.bootstrap_wait_secs),
    )?;
    let keying = ott_apps::keying::Keying::for_node(key, &a);
    let data_keying = keying.clone();
    if a.role != Role::Server {
        anyhow::bail!(
            "node {:?} is a {} in the topology, not a server: run ott-node for it",
            a.id,
            a.role
        );
    }
    let tuning = ott_apps::node_runtime::Tuning {
        report: args.tuning.report.or_bootstrapper(args.bootstrap),
        ..args.tuning
    };
    ott_apps::node_runtime::run_keyed(
        a,
        args.status,
        catalogue,
        Box::new(move |sock, counters, cmds| {
            ott_apps::source::spawn_source_keyed(inputs, live_rx, data_keying, sock, counters, cmds)
        }),
        tuning,
        keying,
        None,
    )
}
