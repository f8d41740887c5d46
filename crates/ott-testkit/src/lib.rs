//! Test and demo support, not part of the product (`publish = false`): runs a whole
//! topology on loopback, the bootstrapper, every server, relay and PoP as real
//! processes, each on its own 127.x.y.z address, and checks what viewers received.
//! Used by `cargo xtask demo`, the other xtasks and the integration tests. Every process it starts is stopped when the [`Cluster`]
//! is dropped, also when a test fails.
//!
//! By default a run makes its own overlay key (32 random bytes in the work directory,
//! removed when the cluster stops) and gives it to the bootstrapper, every server, relay
//! and PoP; [`KeyMode::None`] runs without one.
#![deny(unsafe_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use ott_overlay::{AddressPlan, Role, Topology};

/// TCP port of each node's `--status` endpoint in a launched cluster.
pub const STATUS_PORT: u16 = 7080;
/// TCP port of the bootstrapper in a launched cluster.
pub const BOOTSTRAP_PORT: u16 = 7070;
/// TCP port of the bootstrapper's dashboard (`--http`) in a launched cluster.
pub const DASHBOARD_PORT: u16 = 7071;

/// How to launch a cluster.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Directory holding the four binaries.
    pub bin_dir: PathBuf,
    /// Topology file.
    pub topology: PathBuf,
    /// Clips for the servers.
    pub videos: PathBuf,
    /// Second octet of every address of this run: nodes get 127.`net`.x.y. Two runs with
    /// different values never collide.
    pub net: u8,
    /// Directory for the per-process logs and the rewritten topology.
    pub work_dir: PathBuf,
    /// `RUST_LOG` for the processes.
    pub log_filter: String,
}

/// Whether a launched overlay shares a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyMode {
    /// A fresh key for this run, given to every overlay program with `--key-file`.
    #[default]
    Generated,
    /// No key: the overlay runs unprotected (each program warns).
    None,
}

struct Proc {
    id: String,
    child: Child,
}

/// A running topology.
pub struct Cluster {
    procs: Vec<Proc>,
    clients: Vec<Proc>,
    /// The topology, with the loopback addresses of this run written in.
    pub topology: Topology,
    /// The bootstrapper's address.
    pub bootstrap: SocketAddr,
    opts: LaunchOptions,
    server_args: Vec<String>,
    key_file: Option<PathBuf>,
}

/// The binary `name` in `dir`.
pub fn bin(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

impl Cluster {
    /// Start the bootstrapper and every overlay node of the topology.
    pub fn start(opts: LaunchOptions) -> anyhow::Result<Self> {
        Self::start_with_server_args(opts, Vec::new())
    }

    /// [`Cluster::start`], passing `server_args` to every `ott-server` (for example
    /// `--live cam=udp://ADDR:PORT`).
    pub fn start_with_server_args(
        opts: LaunchOptions,
        server_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        Self::start_with(opts, server_args, KeyMode::Generated)
    }

    /// [`Cluster::start_with_server_args`] with the choice of an overlay key.
    pub fn start_with(
        opts: LaunchOptions,
        server_args: Vec<String>,
        key: KeyMode,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&opts.work_dir)
            .with_context(|| format!("cannot create {}", opts.work_dir.display()))?;
        // Validate first, so that errors name the user's file.
        Topology::load(&opts.topology)?;
        let text = std::fs::read_to_string(&opts.topology)
            .with_context(|| format!("cannot read {}", opts.topology.display()))?;
        let rewritten = ott_apps::loopback::with_loopback_addresses(&text, opts.net)?;
        let topo_path = opts.work_dir.join("topology.toml");
        std::fs::write(&topo_path, &rewritten)
            .with_context(|| format!("cannot write {}", topo_path.display()))?;
        let topology = Topology::load(&topo_path)?;
        let bootstrap = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, opts.net, 255, 254)),
            BOOTSTRAP_PORT,
        );
        let key_file = match key {
            KeyMode::Generated => {
                let path = opts.work_dir.join("overlay.key");
                ott_apps::keying::write_key_file(&path)?;
                Some(path)
            }
            KeyMode::None => None,
        };
        let mut cluster = Self {
            procs: Vec::new(),
            clients: Vec::new(),
            topology,
            bootstrap,
            opts,
            server_args,
            key_file,
        };
        let mut boot = cluster.command("ott-bootstrap", "bootstrap")?;
        boot.arg("--topology")
            .arg(&topo_path)
            .arg("--listen")
            .arg(bootstrap.to_string())
            .arg("--addresses")
            .arg("loopback")
            .arg("--http")
            .arg(SocketAddr::new(bootstrap.ip(), DASHBOARD_PORT).to_string());
        cluster.add_key_flag(&mut boot);
        let boot = boot.spawn().context("cannot start ott-bootstrap")?;
        cluster.procs.push(Proc {
            id: "bootstrap".into(),
            child: boot,
        });
        let ids: Vec<(String, Role)> = cluster
            .topology
            .nodes
            .iter()
            .filter(|n| n.role.is_overlay())
            .map(|n| (n.id.clone(), n.role))
            .collect();
        for (id, role) in ids {
            cluster.start_node(&id, role)?;
        }
        Ok(cluster)
    }

    /// The overlay key file of this run, if it has one.
    pub fn key_file(&self) -> Option<&Path> {
        self.key_file.as_deref()
    }

    /// Give `c` this run's `--key-file`, if the run has a key (for a program a test
    /// starts by hand).
    pub fn add_key_flag(&self, c: &mut Command) {
        if let Some(k) = &self.key_file {
            c.arg("--key-file").arg(k);
        }
    }

    fn command(&self, bin_name: &str, log_name: &str) -> anyhow::Result<Command> {
        let log = self.opts.work_dir.join(format!("{log_name}.log"));
        let f = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut c = Command::new(bin(&self.opts.bin_dir, bin_name));
        c.env("RUST_LOG", &self.opts.log_filter)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f);
        Ok(c)
    }

    /// Start (or restart) the overlay node `id`.
    pub fn start_node(&mut self, id: &str, role: Role) -> anyhow::Result<()> {
        let status = self
            .status_addr(id)
            .with_context(|| format!("node {id} has no address"))?;
        let mut c = match role {
            Role::Server => {
                let mut c = self.command("ott-server", id)?;
                c.arg("--videos")
                    .arg(&self.opts.videos)
                    .args(&self.server_args);
                c
            }
            _ => self.command("ott-node", id)?,
        };
        self.add_key_flag(&mut c);
        let child = c
            .arg("--id")
            .arg(id)
            .arg("--bootstrap")
            .arg(self.bootstrap.to_string())
            .arg("--status")
            .arg(status.to_string())
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        self.procs.push(Proc {
            id: id.to_string(),
            child,
        });
        Ok(())
    }

    /// The bootstrapper's dashboard (`/`, `/api/tree`).
    pub fn dashboard_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bootstrap.ip(), DASHBOARD_PORT)
    }

    /// The `--status` address of node `id`.
    pub fn status_addr(&self, id: &str) -> Option<SocketAddr> {
        let ip = self.topology.node_ip(id, AddressPlan::Loopback)?;
        Some(SocketAddr::new(IpAddr::V4(ip), STATUS_PORT))
    }

    /// `GET /status` of node `id`, parsed.
    pub fn status(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        let addr = self.status_addr(id).context("unknown node")?;
        let body = http_get(addr, "/status")?;
        serde_json::from_str(&body).with_context(|| format!("status of {id} is not JSON"))
    }

    /// Wait until every PoP reports a path to a server, or fail at the deadline.
    pub fn wait_converged(&self, wait: Duration) -> anyhow::Result<()> {
        let pops: Vec<String> = self.topology.pops().iter().map(|n| n.id.clone()).collect();
        wait_for(wait, "every PoP has a parent", || {
            pops.iter().all(|p| {
                self.status(p)
                    .map(|s| !s["parent"].is_null())
                    .unwrap_or(false)
            })
        })
    }

    /// Start a client. `args` are extra flags (e.g. `--stream x --duration 5 --output f`).
    /// Its standard input is piped: write stream names to it to switch.
    pub fn spawn_client(
        &mut self,
        name: &str,
        id: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<&mut Child> {
        let mut c = Command::new(bin(&self.opts.bin_dir, "ott-client"));
        let log = self.opts.work_dir.join(format!("{name}.log"));
        let out = self.opts.work_dir.join(format!("{name}.stdout"));
        c.env("RUST_LOG", &self.opts.log_filter)
            .arg("--bootstrap")
            .arg(self.bootstrap.to_string())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(File::create(&out)?)
            .stderr(File::create(&log)?);
        if let Some(id) = id {
            c.arg("--id").arg(id);
        }
        let child = c.spawn().context("cannot start ott-client")?;
        self.clients.push(Proc {
            id: name.to_string(),
            child,
        });
        let last = self.clients.len() - 1;
        Ok(&mut self.clients[last].child)
    }

    /// Write a line to client `name`'s standard input (a stream switch).
    pub fn client_say(&mut self, name: &str, line: &str) -> anyhow::Result<()> {
        let p = self
            .clients
            .iter_mut()
            .find(|p| p.id == name)
            .context("no such client")?;
        let stdin = p.child.stdin.as_mut().context("client has no stdin")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Wait for client `name` to exit; returns its summary line (standard output).
    pub fn wait_client(&mut self, name: &str, wait: Duration) -> anyhow::Result<String> {
        let i = self
            .clients
            .iter()
            .position(|p| p.id == name)
            .context("no such client")?;
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = self.clients[i].child.try_wait()? {
                let out =
                    std::fs::read_to_string(self.opts.work_dir.join(format!("{name}.stdout")))?;
                let err = std::fs::read_to_string(self.opts.work_dir.join(format!("{name}.log")))?;
                if !status.success() {
                    anyhow::bail!("client {name} failed ({status}): {}", tail(&err, 20));
                }
                return Ok(out);
            }
            if Instant::now() >= deadline {
                anyhow::bail!("client {name} did not exit within {} s", wait.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill node `id` with SIGKILL (a crash).
    pub fn kill_node(&mut self, id: &str) -> anyhow::Result<()> {
        let i = self
            .procs
            .iter()
            .position(|p| p.id == id)
            .with_context(|| format!("node {id} is not running"))?;
        let mut p = self.procs.remove(i);
        p.child.kill()?;
        p.child.wait()?;
        Ok(())
    }

    /// The log of process `name`.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.opts.work_dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Whether process `name` has exited.
    pub fn exited(&mut self, name: &str) -> bool {
        self.procs
            .iter_mut()
            .chain(self.clients.iter_mut())
            .find(|p| p.id == name)
            .is_none_or(|p| !matches!(p.child.try_wait(), Ok(None)))
    }

    /// Stop every process: SIGTERM, then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        let all: Vec<Proc> = self.clients.drain(..).chain(self.procs.drain(..)).collect();
        for p in &all {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(p.child.id().to_string())
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for mut p in all {
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        if let Some(k) = self.key_file.take() {
            let _ = std::fs::remove_file(k);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Poll `cond` every 50 ms until it holds, or fail naming `what` at the deadline.
pub fn wait_for(wait: Duration, what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "timed out after {} s waiting until {what}",
                wait.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.0 GET, for status endpoints on loopback.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        anyhow::bail!(
            "GET {path} at {addr}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_string())
}

/// How a received MJPEG file compares with the clip it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    /// Frames in the received file.
    pub frames: usize,
    /// Frames byte-identical to a frame of the source clip.
    pub intact: usize,
    /// Whether the intact frames follow the clip's order (allowing the loop and gaps).
    pub in_order: bool,
    /// Frames of the clip missing between the first and the last intact frame: the sum
    /// of the forward gaps between consecutive intact frames (the clip's frames are
    /// distinct; a gap of half the clip or more is not counted, it is out of order).
    pub missing: usize,
}

/// Compare a received MJPEG file with the source clip's frames.
///
/// A frame is intact when it equals some frame of the clip byte for byte; the order
/// check allows the clip to loop and frames to be missing, but never to go backwards
/// by less than a whole loop.
pub fn verify_mjpeg(received: &[u8], clip: &ott_media::Clip) -> anyhow::Result<Verification> {
    use std::collections::HashMap;
    let mut index: HashMap<&[u8], usize> = HashMap::new();
    for (i, f) in clip.frames.iter().enumerate() {
        index.entry(f.as_ref()).or_insert(i);
    }
    let ranges = ott_media::mjpeg::split_frames(received)
        .context("received file is not whole JPEG frames")?;
    let n = clip.frames.len().max(1);
    let mut v = Verification {
        frames: ranges.len(),
        intact: 0,
        in_order: true,
        missing: 0,
    };
    let mut last: Option<usize> = None;
    for r in ranges {
        let Some(&i) = index.get(&received[r]) else {
            continue;
        };
        v.intact += 1;
        if let Some(prev) = last {
            // Forward distance on the loop; going backwards shows as a long way round.
            let ahead = (i + n - prev) % n;
            if ahead == 0 || ahead > n / 2 {
                v.in_order = false;
            } else {
                v.missing += ahead - 1;
            }
        }
        last = Some(i);
    }
    Ok(v)
}

/// Parse the `key=value` summary line a client prints.
pub fn parse_summary(out: &str) -> std::collections::HashMap<String, String> {
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix("summary: "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_counts_the_frames_missing_between_intact_ones() {
        // Ten distinct minimal JPEGs (SOI, a one-byte comment, EOI).
        let frames: Vec<bytes::Bytes> = (0..10u8)
            .map(|i| bytes::Bytes::from(vec![0xFF, 0xD8, 0xFF, 0xFE, 0x00, 0x03, i, 0xFF, 0xD9]))
            .collect();
        let clip = ott_media::Clip {
            name: "t".into(),
            kind: ott_proto::MediaKind::Mjpeg,
            fps: 25.0,
            frames: frames.clone(),
            ts: None,
        };
        let file =
            |idx: &[usize]| -> Vec<u8> { idx.iter().flat_map(|&i| frames[i].to_vec()).collect() };
        // 7, 8, 9, 0, 1 (looped): nothing missing.
        let v = verify_mjpeg(&file(&[7, 8, 9, 0, 1]), &clip).expect("frames");
        assert_eq!((v.frames, v.intact, v.missing, v.in_order), (5, 5, 0, true));
        // 1, 2, 5, 6: frames 3 and 4 missing.
        let v = verify_mjpeg(&file(&[1, 2, 5, 6]), &clip).expect("frames");
        assert_eq!((v.missing, v.in_order), (2, true));
        // Backwards is out of order, not missing.
        let v = verify_mjpeg(&file(&[5, 4]), &clip).expect("frames");
        assert_eq!((v.missing, v.in_order), (0, false));
    }
}
