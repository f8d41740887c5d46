//! `cargo xtask`: project tasks that need more than cargo.
//!
//! - `demo`: the seed topology on loopback with two clients, and a table of what they got.
//! - `core-launch`: a topology as a CORE scenario (`.imn`, or XML for CORE 8+).
//! - `emulate`: a topology in network namespaces with emulated links and timed faults,
//!   or generated ones (`--random SEED`, `--random-sweep K`).
//! - `random-topology`: write a generated topology to a file.
//! - `bench`: the relay data path against a minimal batched relay.
//! - `sim`: a random overlay of N nodes, or a topology file's overlay, in the simulator:
//!   convergence, loops, failover.
//! - `tree`: the overlay's current trees from a bootstrapper's dashboard, as text, DOT or SVG.

#![deny(unsafe_code)]

mod bench;
mod core;
mod demo;
mod emulate;
mod sim;
mod tidy;
mod tree;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "OTT overlay project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a topology on loopback (no root needed) with a server, every relay and PoP,
    /// and two clients on two streams; print what each client received.
    Demo(demo::DemoArgs),
    /// Write a topology as a CORE scenario (.imn for CORE up to 7.5, --format xml for
    /// CORE 8 and later) that starts every program when the session starts.
    CoreLaunch(core::CoreArgs),
    /// Run a topology in Linux network namespaces (root) with emulated links, play a
    /// scenario's timed faults, and report what each client received.
    Emulate(emulate::EmulateArgs),
    /// Write a generated topology (the one `emulate --random SEED` runs) to a file, for
    /// `emulate --topology`, `core-launch --topology` or `sim --topology`.
    RandomTopology(emulate::random::RandomTopologyArgs),
    /// Measure the relay's forwarding (packets/s, Mbit/s, latency per hop, CPU per GB)
    /// against a minimal recvmmsg/sendmmsg relay, on loopback.
    Bench(bench::BenchArgs),
    /// Simulate a random overlay of N nodes (or a topology file's overlay with
    /// --topology), kill relays on viewers' stream paths (never servers or PoPs), print
    /// convergence time, loop checks, failover times and control traffic.
    Sim(sim::SimArgs),
    /// Print the overlay's current trees from a bootstrapper's dashboard
    /// (`ott-bootstrap --http ADDR`) as text, Graphviz DOT or SVG.
    Tree(tree::TreeArgs),
}

// The simulator allocates and frees a few small buffers per simulated datagram (tens of
// millions per run): glibc's malloc and free took about 12 % of a 10,000-node run, and
// `xtask sim --nodes 1000` needs 1.36 times less CPU with mimalloc (docs/performance.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Demo(a) => demo::run(a),
        Cmd::CoreLaunch(a) => core::run(a),
        Cmd::Emulate(a) => emulate::run(a),
        Cmd::RandomTopology(a) => emulate::random::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Sim(a) => sim::run(a),
        Cmd::Tree(a) => tree::run(a),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once, as the programs print theirs.
            eprintln!("xtask: error: {}", ott_apps::args::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(1)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Build the four programs and return the directory holding them.
pub(crate) fn build_binaries(release: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(project_root())
        .args(["build", "--quiet", "-p", "ott-apps", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status()?;
    if !status.success() {
        anyhow::bail!("building the programs failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"));
    Ok(target.join(if release { "release" } else { "debug" }))
}
