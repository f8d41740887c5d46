//! `ott-node`: an overlay relay or PoP.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ott_bootstrap::Request;
use ott_overlay::Role;

/// An OTT overlay relay or Point of Presence. Its role, address and neighbours come from
/// the bootstrapper.
#[derive(Parser, Debug)]
#[command(name = "ott-node", version)]
struct Args {
    /// This node's id in the topology.
    #[arg(long)]
    id: String,
    /// Bootstrapper address.
    #[arg(long, default_value = "127.0.0.1:7070", value_name = "ADDR", value_parser = ott_apps::args::parse_addr)]
    bootstrap: SocketAddr,
    /// Serve GET /status (JSON) and /metrics (Prometheus) on this address.
    #[arg(long, value_name = "ADDR", value_parser = ott_apps::args::parse_addr)]
    status: Option<SocketAddr>,
    /// PoPs only: serve browsers and players on this address, e.g. 0.0.0.0:8080:
    /// / (the streams), /watch/NAME (a page that plays NAME), /hls/NAME/index.m3u8
    /// (HLS of MPEG-TS/H.264), /mjpeg/NAME, /ts/NAME. The PoP joins a stream when its
    /// first HTTP viewer comes and leaves it 8 s after the last one goes.
    #[arg(long, value_name = "ADDR", value_parser = ott_apps::args::parse_addr)]
    http: Option<SocketAddr>,
    /// Do not ask the parent to resend lost media datagrams (per-hop loss recovery off;
    /// for comparisons). Children's requests are still answered.
    #[arg(long)]
    no_nack: bool,
    /// Threads that send media when a batch goes to many children (8 or more): each
    /// child is always sent to by the same thread, so its stream keeps its order. 1
    /// sends everything from the forwarding thread. Default: the cores available, at
    /// most 4 (never more than the cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    fanout_threads: Option<u16>,
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
            eprintln!("ott-node: error: {}", ott_apps::args::error_line(&e));
            std::process::ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    args.tuning.check()?;
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
    if a.role == Role::Server {
        anyhow::bail!(
            "node {:?} is a server in the topology: run ott-server for it",
            a.id
        );
    }
    if args.http.is_some() && a.role != Role::Pop {
        anyhow::bail!(
            "--http serves viewers, which only a PoP has: node {:?} is a {} in the topology (give --http to a PoP's ott-node, or use ott-client --http)",
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
        Vec::new(),
        Box::new(move |sock, counters, cmds| {
            let config = ott_apps::dataplane::ForwarderConfig {
                nack: !args.no_nack,
                fanout_threads: args
                    .fanout_threads
                    .map_or_else(ott_apps::dataplane::fanout::default_threads, usize::from),
                ..ott_apps::dataplane::ForwarderConfig::default()
            };
            ott_apps::dataplane::spawn_forwarder_keyed(
                config,
                data_keying,
                ott_apps::node_runtime::incarnation(),
                sock,
                counters,
                cmds,
            )
        }),
        tuning,
        keying,
        args.http,
    )
}
