//! `ott-node`: an overlay relay or PoP.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ott_bootstrap::Request;
use ott_overlay::Role;

/// An OTT overlay relay or Point of Presence. Its role, address and neighbours come from
/// the bootstrapper.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// This node's id in the topology.
    #[arg(long)]
    id: String,
    /// Bootstrapper address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    bootstrap: SocketAddr,
    /// Serve GET /status (JSON) and /metrics (Prometheus) on this address.
    #[arg(long)]
    status: Option<SocketAddr>,
    /// Do not ask the parent to resend lost media datagrams (per-hop loss recovery off;
    /// for comparisons). Children's requests are still answered.
    #[arg(long)]
    no_nack: bool,
    /// How long to keep asking the bootstrapper while it is not up yet or busy, in
    /// seconds (an unknown id fails at once).
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
            eprintln!("ott-node: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let req = Request::Node {
        id: args.id.clone(),
    };
    let a = ott_apps::overlay::bootstrap(
        args.bootstrap,
        req,
        Duration::from_secs(args.bootstrap_wait),
    )?;
    if a.role == Role::Server {
        anyhow::bail!(
            "node {:?} is a server in the topology: run ott-server for it",
            a.id
        );
    }
    let tuning = ott_apps::overlay::Tuning {
        report: args.tuning.report.or_bootstrapper(args.bootstrap),
        ..args.tuning
    };
    ott_apps::overlay::run_with(
        a,
        args.status,
        Vec::new(),
        Box::new(move |sock, counters, cmds| {
            let config = ott_apps::dataplane::ForwarderConfig {
                nack: !args.no_nack,
            };
            ott_apps::dataplane::spawn_forwarder_with(config, sock, counters, cmds)
        }),
        tuning,
    )
}
