//! `ott-bootstrap`: tells each overlay node its role, address and neighbours.
#![deny(unsafe_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ott_overlay::{AddressPlan, Topology};

/// The OTT overlay bootstrapper: answers each node with its role, listen address,
/// overlay neighbours and the list of PoPs, from a topology file.
#[derive(Parser, Debug)]
#[command(name = "ott-bootstrap", version)]
struct Args {
    /// Topology file (TOML).
    #[arg(long, value_name = "FILE")]
    topology: PathBuf,
    /// TCP address to listen on [default: 127.0.0.1:7070, or 127.N.255.254:7070 with
    /// --net N].
    #[arg(long, value_parser = ott_apps::args::parse_addr, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Give every node of the topology an address in 127.N.0.0/16 (as `cargo xtask demo
    /// --net N`), so that two topologies run side by side on one host: node i gets
    /// 127.N.(i / 250).(i % 250 + 1), and the bootstrapper listens on 127.N.255.254:7070
    /// unless --listen is given. Loopback plan only.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..))]
    net: Option<u8>,
    /// Address plan: `loopback` (127.x.y.z per node) or `links` (10.0.<link>.1/.2).
    #[arg(long, default_value = "loopback", value_name = "loopback|links")]
    addresses: AddressPlan,
    /// The overlay's shared key: a file of at least 32 random bytes (e.g.
    /// `head -c 32 /dev/urandom > overlay.key`), the same for every server, relay, PoP
    /// and the bootstrapper. With it, a node's request must be tagged with the key
    /// (viewers, who hold none, still get the PoP list); without it, a warning.
    #[arg(long, value_name = "FILE")]
    key_file: Option<std::path::PathBuf>,
    /// Serve the live dashboard on this address: `/` (the overlay and its trees),
    /// `/api/tree` (JSON), `/metrics`. Nodes' state reports are then received over UDP
    /// on the --listen address.
    #[arg(long, value_name = "ADDR", value_parser = ott_apps::args::parse_addr)]
    http: Option<SocketAddr>,
}

fn main() -> std::process::ExitCode {
    ott_apps::init_logging();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ott-bootstrap: error: {}", ott_apps::args::error_line(&e));
            std::process::ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let topology = Topology::load(&args.topology)?;
    let listen = match (args.listen, args.net) {
        (Some(a), _) => a,
        (None, Some(n)) => SocketAddr::from(([127, n, 255, 254], 7070)),
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 7070)),
    };
    let topology = match args.net {
        Some(_) if args.addresses != AddressPlan::Loopback => {
            anyhow::bail!(
                "--net places nodes on loopback: it does not go with --addresses {}",
                args.addresses
            )
        }
        Some(n) => {
            let text = std::fs::read_to_string(&args.topology)
                .with_context(|| format!("cannot read {}", args.topology.display()))?;
            let placed = ott_apps::loopback::with_loopback_addresses(&text, n)?;
            Topology::parse(&placed, &args.topology.display().to_string())?
        }
        None => topology,
    };
    let key = ott_apps::keying::key_from_flag(args.key_file.as_deref())?;
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {}", listen))?;
    let stop = Arc::new(AtomicBool::new(false));
    let signals = ott_apps::signals::shutdown_channel();
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        if signals.recv().is_ok() {
            stop2.store(true, Ordering::SeqCst);
        }
    });
    let mut service = ott_bootstrap::Service::new(topology.clone(), args.addresses);
    if let Some(k) = key.clone() {
        service = service.with_key(k);
    }
    let service = Arc::new(service);
    if let Some(http) = args.http {
        let udp = std::net::UdpSocket::bind(listen)
            .with_context(|| format!("cannot receive state reports on UDP {}", listen))?;
        let table = ott_apps::dashboard::Table::new(&topology, args.addresses, Default::default());
        // With the overlay key, a report counts only when its tag and counter verify.
        let opener = key.clone().map(|k| {
            let mut guard = ott_proto::auth::ReplayGuard::new(k);
            Box::new(move |_from: std::net::SocketAddr, d: &[u8]| {
                guard
                    .open(d)
                    .map(|o| o.envelope.to_vec())
                    .map_err(|e| e.to_string())
            }) as ott_apps::dashboard::Opener
        });
        let svc = service.clone();
        let extra: ott_apps::dashboard::ExtraMetrics =
            Box::new(move || ott_apps::dashboard::bootstrap_metrics(&svc.stats()));
        ott_apps::dashboard::serve_with(http, udp, table, opener, Some(extra))?;
    }
    service.serve(listener, stop)?;
    tracing::info!("bootstrapper stopped");
    Ok(())
}
