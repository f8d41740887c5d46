//! `ott-client`: picks the best PoP, joins a stream and writes or plays what it receives.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// The OTT viewer: gets the PoP list from the bootstrapper, probes every PoP, picks the
/// best, joins a stream and writes it (--output), plays it (--play), serves it to a
/// browser or player (--http) or lists the streams. Type a stream name and Enter on
/// standard input (or use the --http page) to switch stream while it runs; the new
/// stream starts at a keyframe and nothing of the old one follows.
#[derive(Parser, Debug)]
#[command(name = "ott-client", version)]
struct Args {
    /// Bootstrapper address.
    #[arg(long, default_value = "127.0.0.1:7070", value_parser = ott_apps::args::parse_addr, value_name = "ADDR")]
    bootstrap: SocketAddr,
    /// This client's id in the topology (gives it its own address); optional.
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// Stream to watch. Without it, on a terminal, the streams are listed and you are asked.
    #[arg(long, value_name = "NAME")]
    stream: Option<String>,
    /// Print the stream names, one a line, and exit.
    #[arg(long)]
    list: bool,
    /// Write the received elementary stream (JPEG frames, or TS bytes) to FILE, or - for stdout.
    #[arg(long, value_name = "FILE|-")]
    output: Option<PathBuf>,
    /// Pipe the stream into ffplay (when installed; a clear error otherwise).
    #[arg(long)]
    play: bool,
    /// Serve a page listing the streams with a player, and the stream itself
    /// (GET /stream: MJPEG as multipart/x-mixed-replace, MPEG-TS as video/mp2t, for
    /// ffplay, mpv or VLC), on this address, e.g. 127.0.0.1:8000.
    #[arg(long, value_name = "ADDR", value_parser = ott_apps::args::parse_addr)]
    http: Option<SocketAddr>,
    /// Exit cleanly after this many seconds and print a one-line summary (exit status 2
    /// when no frame arrived).
    #[arg(long, value_name = "SECS", alias = "duration", value_parser = ott_apps::args::parse_secs)]
    duration_secs: Option<Duration>,
    /// Serve GET /status (JSON) and /metrics (Prometheus) on this address.
    #[arg(long, value_parser = ott_apps::args::parse_addr, value_name = "ADDR")]
    status: Option<SocketAddr>,
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
    /// Playout latency budget in milliseconds: how long a frame may wait for lost
    /// datagrams to be resent before it is given up.
    #[arg(long, default_value_t = 300, value_name = "MS", alias = "latency", value_parser = clap::value_parser!(u64).range(0..=60_000))]
    latency_ms: u64,
    /// Do not ask the PoP to resend lost datagrams (loss recovery off; for comparisons).
    #[arg(long)]
    no_nack: bool,
    /// Receive the stream over this many paths (1 or 2). With 2 the client also joins
    /// a second PoP whose tree path from the server shares no relay with the first's
    /// (where the topology has one) and keeps the first copy of each datagram, so that
    /// losing one relay, PoP or link costs no frame.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=2))]
    paths: u8,
}

fn main() -> std::process::ExitCode {
    ott_apps::init_logging();
    let args = Args::parse();
    let opts = ott_apps::viewer::Options {
        bootstrap: args.bootstrap,
        id: args.id,
        stream: args.stream,
        list: args.list,
        output: args.output,
        play: args.play,
        http: args.http,
        duration: args.duration_secs,
        status: args.status,
        bootstrap_wait: Duration::from_secs(args.bootstrap_wait_secs),
        latency: Duration::from_millis(args.latency_ms),
        nack: !args.no_nack,
        paths: args.paths,
    };
    match ott_apps::viewer::run(opts) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ott-client: error: {}", ott_apps::args::error_line(&e));
            std::process::ExitCode::from(2)
        }
    }
}
