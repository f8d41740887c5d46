//! Shared plumbing of the four OTT overlay programs.
//!
//! The protocol lives in the sans-IO crates (`ott-tree`, `ott-overlay`, `ott-media`,
//! `ott-proto`); this crate owns what they deliberately leave out: sockets, threads,
//! the clock, signals, the `--status` HTTP endpoint, and the placing of a topology on
//! loopback. The launcher that runs a whole topology for the demo and the integration
//! tests is in the `ott-testkit` crate.
#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod args;
// `sendmmsg`/`recvmmsg`/GSO have no safe wrapper in std or socket2: raw libc calls.
#[allow(unsafe_code)]
pub mod batch;
pub mod counters;
pub mod ctrlio;
pub mod dashboard;
pub mod datacmd;
pub mod dataplane;
pub mod dedup;
pub mod driver;
pub mod edge;
pub mod http;
pub mod httpd;
pub mod keying;
pub mod live;
pub mod loopback;
pub mod net;
pub mod node_runtime;
// `IP_PKTINFO` (the local address a datagram came to) needs `recvmsg`/`sendmsg` with
// control messages, which neither std nor socket2 wrap: raw libc calls.
#[allow(unsafe_code)]
pub mod pktinfo;
pub mod progress;
pub mod report;
pub mod signals;
pub mod source;
pub mod status;
pub mod viewer;

/// Install the `tracing` subscriber: `RUST_LOG` if set, else `info`, to standard error,
/// with colours only when standard error is a terminal (a log file gets plain text).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
