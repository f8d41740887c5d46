//! The run-time of `ott-node` and `ott-server`: bootstrap, sockets, threads, control loop.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use crossbeam_channel::Receiver;
use ott_bootstrap::{Assignment, Request};
use ott_overlay::LivenessConfig;
use ott_proto::auth::OverlayKey;
use ott_proto::StreamInfo;
use ott_tree::{Node, NodeConfig};

use crate::counters::Counters;
use crate::ctrlio::{spawn_receivers, LoopStatus};
use crate::datacmd::DataCmd;
use crate::driver::NodeLoop;
use crate::keying::Keying;
use crate::net::{bind_udp, ControlSockets};

/// Ask the bootstrapper who `id` is, retrying while it is not up yet or busy.
pub fn bootstrap(addr: SocketAddr, req: Request, wait: Duration) -> anyhow::Result<Assignment> {
    bootstrap_keyed(addr, req, None, wait)
}

/// [`bootstrap`] with the overlay key: the request is tagged and the answer checked.
pub fn bootstrap_keyed(
    addr: SocketAddr,
    req: Request,
    key: Option<&OverlayKey>,
    wait: Duration,
) -> anyhow::Result<Assignment> {
    let deadline = Instant::now() + wait;
    ott_bootstrap::request_until_keyed(addr, &req, key, deadline)
        .with_context(|| format!("bootstrapper at {addr}"))
}

/// A number that grows at each restart of a node: microseconds of the wall clock.
///
/// Only ever compared with earlier values from the same node, never across hosts.
pub fn incarnation() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

/// What runs the data socket: the relay forwarder, or the server's media source.
pub type DataPlane =
    Box<dyn FnOnce(UdpSocket, Arc<Counters>, Receiver<DataCmd>) -> std::io::Result<JoinHandle<()>>>;

/// Timing flags shared by `ott-node` and `ott-server`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct Tuning {
    /// Heartbeat period to each neighbour, ms.
    #[arg(long, default_value_t = Tuning::default().heartbeat_ms, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub heartbeat_ms: u64,
    /// A neighbour silent for this long is declared dead and routed around, ms: at
    /// least two heartbeat periods. Failover takes about this long; raise it on lossy
    /// or slow links.
    #[arg(long, default_value_t = Tuning::default().dead_after_ms, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub dead_after_ms: u64,
    /// State reports to the bootstrapper's dashboard.
    #[command(flatten)]
    pub report: crate::report::ReportArgs,
}

impl Default for Tuning {
    fn default() -> Self {
        let l = LivenessConfig::default();
        Self {
            heartbeat_ms: l.heartbeat_interval.as_millis() as u64,
            dead_after_ms: l.dead_after.as_millis() as u64,
            report: crate::report::ReportArgs::default(),
        }
    }
}

impl Tuning {
    /// Refuses timings that cannot work together: a dead-after shorter than two
    /// heartbeat periods declares a neighbour dead between two of its heartbeats, or
    /// after one lost datagram.
    pub fn check(&self) -> anyhow::Result<()> {
        let least = self.heartbeat_ms.saturating_mul(2);
        if self.dead_after_ms < least {
            anyhow::bail!(
                "--dead-after-ms {} is shorter than two heartbeat periods (--heartbeat-ms {}): \
                 neighbours would be declared dead between their heartbeats; give at least {}",
                self.dead_after_ms,
                self.heartbeat_ms,
                least
            );
        }
        Ok(())
    }

    /// The liveness configuration these flags give (clamped to sane values).
    pub fn liveness(&self) -> LivenessConfig {
        LivenessConfig::new(
            Duration::from_millis(self.heartbeat_ms),
            Duration::from_millis(self.dead_after_ms),
        )
    }
}

/// Bind the node's sockets, start its threads and run its control loop until a signal.
pub fn run(
    a: Assignment,
    status: Option<SocketAddr>,
    catalogue: Vec<StreamInfo>,
    data_plane: DataPlane,
) -> anyhow::Result<()> {
    run_with(a, status, catalogue, data_plane, Tuning::default())
}

/// [`run`] with explicit timings.
pub fn run_with(
    a: Assignment,
    status: Option<SocketAddr>,
    catalogue: Vec<StreamInfo>,
    data_plane: DataPlane,
    tuning: Tuning,
) -> anyhow::Result<()> {
    run_keyed(
        a,
        status,
        catalogue,
        data_plane,
        tuning,
        Keying::unkeyed(),
        None,
    )
}

/// [`run_with`] with the overlay key (the control loop seals what it sends to overlay
/// members and checks what it receives: `keying`, see [`crate::keying`]) and, on a PoP
/// with `http`, its HTTP edge on that address ([`crate::edge`]), started once the
/// node's sockets are bound.
pub fn run_keyed(
    a: Assignment,
    status: Option<SocketAddr>,
    catalogue: Vec<StreamInfo>,
    data_plane: DataPlane,
    tuning: Tuning,
    keying: Keying,
    http: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let shutdown = crate::signals::shutdown_channel();
    let counters = Arc::new(Counters::default());
    // Bound to one address, the node answers on each of its addresses; bound to the
    // wildcard, on every address of the host (see `ControlSockets`).
    let ctrl = ControlSockets::bind(a.bind_ctrl, &a.addresses).context("control socket")?;
    let data = bind_udp(a.bind_data).context("data socket")?;
    let data_port = data.local_addr()?.port();
    tracing::info!(id = %a.id, role = %a.role, ctrl = ?ctrl.local_addrs(), data = %a.bind_data,
        addresses = ?a.addresses, neighbours = a.neighbours.len(), "node starting");
    let (data_tx, data_rx) = crossbeam_channel::unbounded();
    let data_thread = data_plane(data, counters.clone(), data_rx).context("data plane thread")?;
    let rx = spawn_receivers(ctrl.try_clone_all()?, "ctrl-rx", counters.clone())?;
    let (status_tx, status_rx) = crossbeam_channel::bounded(16);
    let edge = match http {
        Some(addr) => Some(crate::edge::Edge::start(&a.id, a.bind_ctrl, addr)?.0),
        None => None,
    };
    if let Some(addr) = status {
        crate::status::serve(
            addr,
            crate::edge::with_edge(
                Arc::new(LoopStatus {
                    id: a.id.clone(),
                    queries: status_tx.clone(),
                    counters: counters.clone(),
                }),
                edge,
            ),
        )?;
    }
    crate::report::start(
        &a.id,
        a.bind_ctrl.ip(),
        tuning.report,
        status_tx.clone(),
        keying.key().map(|k| {
            let mut sealer = ott_proto::auth::ControlSealer::new(
                k.clone(),
                ott_proto::auth::sender_id(&a.id, "report"),
                incarnation(),
            );
            Box::new(move |d: Vec<u8>| sealer.seal(&d)) as crate::report::Seal
        }),
    );
    let now = Instant::now();
    let mut config = NodeConfig::new(a.id.clone(), a.role, data_port);
    config.incarnation = incarnation();
    let config_incarnation = config.incarnation;
    config.seed = config.incarnation;
    config.admission_secret =
        crate::keying::random_secret().context("random secret for viewers' cookies")?;
    config.liveness = tuning.liveness();
    // With the overlay key every message reaching the node passed its tag check, so a
    // neighbour's new incarnation can be believed at once.
    config.liveness.keyed = keying.key().is_some();
    // Each neighbour is known by every address the bootstrapper gave for it.
    let neighbours = a.neighbours.iter().map(|p| p.control_addrs()).collect();
    let mut node = Node::with_peers(config, neighbours, now, now);
    if !catalogue.is_empty() {
        node.set_catalogue(now, catalogue);
    }
    let result = NodeLoop {
        node,
        ctrl,
        rx,
        data: data_tx,
        counters,
        status: status_rx,
        shutdown,
        gate: keying.gate(),
        sender: keying.sealer("ctrl", config_incarnation),
    }
    .run();
    let _ = data_thread.join();
    result
}
