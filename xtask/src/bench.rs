//! `cargo xtask bench`: the relay's data path against a minimal batched relay written
//! here, on loopback, in one run (ratios, not absolute figures, are what to compare:
//! these machines are noisy).
//!
//! Setup: a bootstrapper and one real `ott-node` (release build) as the relay; this
//! process plays the server (its control plane is a real `ott_tree::Node`, so the relay
//! sees a normal overlay neighbour) and the subscribers (client joins). The baseline is
//! a thread here: `recvmmsg`, then `sendmmsg` to every subscriber, nothing else.
//!
//! The overlay runs with a key (a fresh one per run, removed afterwards), as deployed:
//! this process tags the server's media and seals its control messages, and the relay
//! checks every tag. `--no-key` measures the overlay without one; `--bin-dir` measures
//! programs built elsewhere (an older commit, for a before/after comparison).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use ott_apps::batch::{offload, send_batch, send_batch_with, RecvBatch};
use ott_apps::keying::Keying;
use ott_proto::auth::{media_digests_many, OverlayKey};
use ott_proto::{flags, MediaHeader, MediaKind, Message, StreamInfo};
use ott_testkit::{http_get, wait_for};
use ott_tree::{Event, Node, NodeConfig, Role};

/// `--seconds`: a positive time of at most a day, and long enough to count packets in
/// (`--seconds 0` printed a ratio of 0.00 and succeeded).
fn parse_measure_secs(s: &str) -> Result<f64, String> {
    let d = ott_apps::args::parse_secs(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!(
            "{s} seconds: too short to measure, give at least 0.1"
        ));
    }
    Ok(d.as_secs_f64())
}

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Seconds of each throughput measurement (0.1 to 86400).
    #[arg(long, default_value_t = 3.0, value_parser = parse_measure_secs)]
    seconds: f64,
    /// Use the debug build of the programs (faster to build, slower to run).
    #[arg(long)]
    debug: bool,
    /// Run the overlay without a key (no tags on its datagrams).
    #[arg(long)]
    no_key: bool,
    /// Use the programs in this directory instead of building them (e.g. a copy of an
    /// older build, to compare).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<std::path::PathBuf>,
    /// Run the relay with UDP GSO/GRO turned off (`OTT_NO_OFFLOAD`), to compare.
    #[arg(long)]
    no_offload: bool,
    /// Pass `--fanout-threads N` to the relay (how many threads send a round to many
    /// subscribers; 1: the forwarding thread alone). Without it, the relay's default.
    #[arg(long, value_name = "N")]
    fanout_threads: Option<u16>,
}

const NET: u8 = 99;
const PAYLOAD: usize = 1316;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, NET, 0, last)
}

struct Procs(Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The relay under test and the way to read its counters and CPU time.
struct Relay {
    data: SocketAddr,
    status: SocketAddr,
    pid: u32,
}

impl Relay {
    fn packets_out(&self) -> anyhow::Result<u64> {
        // A loaded machine sometimes cuts the status answer short: ask again.
        let mut last = anyhow::anyhow!("no answer");
        for _ in 0..5 {
            match http_get(self.status, "/status").and_then(|body| {
                let v: serde_json::Value = serde_json::from_str(&body)?;
                v["counters"]["packets_out"]
                    .as_u64()
                    .context("no packets_out counter")
            }) {
                Ok(n) => return Ok(n),
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(last)
    }
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        proc_cpu(&format!("/proc/{}/stat", self.pid))
    }
}

/// utime + stime of a /proc stat file, seconds.
#[allow(unsafe_code)] // sysconf(_SC_CLK_TCK): std has no way to read the tick rate.
fn proc_cpu(path: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let after = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad stat file")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks / hz)
}

#[allow(unsafe_code)] // gettid: std has no way to read the kernel thread id.
fn thread_cpu_path() -> String {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    format!("/proc/self/task/{tid}/stat")
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    let root = crate::project_root();
    eprintln!(
        "building the programs ({})…",
        if args.debug { "debug" } else { "release" }
    );
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => crate::build_binaries(!args.debug)?,
    };
    let work = root.join("target").join("bench");
    std::fs::create_dir_all(&work)?;
    // One key per run, removed on every way out.
    let key_file = KeyFile(work.join("overlay.key"));
    let key = if args.no_key {
        None
    } else {
        ott_apps::keying::write_key_file(&key_file.0)?;
        Some(ott_apps::keying::load_key_file(&key_file.0)?)
    };
    let key_args: Vec<String> = if args.no_key {
        Vec::new()
    } else {
        vec!["--key-file".into(), key_file.0.display().to_string()]
    };
    let topo = work.join("bench.toml");
    std::fs::write(
        &topo,
        format!(
            "name = \"bench\"\nbootstrapper = \"s1\"\n\n[[node]]\nid = \"s1\"\nrole = \"server\"\naddress = \"{}\"\n\n[[node]]\nid = \"r1\"\nrole = \"pop\"\naddress = \"{}\"\n\n[[link]]\nends = [\"s1\", \"r1\"]\n",
            ip(1),
            ip(2)
        ),
    )?;
    let boot = SocketAddr::new(IpAddr::V4(ip(254)), 7070);
    let status = SocketAddr::new(IpAddr::V4(ip(2)), 7080);
    let log = |name: &str| -> anyhow::Result<Stdio> {
        Ok(Stdio::from(std::fs::File::create(work.join(name))?))
    };
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new(bin_dir.join("ott-bootstrap"))
            .args([
                "--topology",
                &topo.display().to_string(),
                "--listen",
                &boot.to_string(),
            ])
            .args(&key_args)
            .stdout(log("bootstrap.log")?)
            .stderr(log("bootstrap.err")?)
            .spawn()
            .context("cannot start ott-bootstrap")?,
    );
    let relay_proc = Command::new(bin_dir.join("ott-node"))
        .args([
            "--id",
            "r1",
            "--bootstrap",
            &boot.to_string(),
            "--status",
            &status.to_string(),
        ])
        .args(&key_args)
        .args(
            args.fanout_threads
                .iter()
                .flat_map(|n| ["--fanout-threads".to_string(), n.to_string()]),
        )
        .env("RUST_LOG", "warn")
        .envs(args.no_offload.then_some(("OTT_NO_OFFLOAD", "1")))
        .stdout(log("r1.log")?)
        .stderr(log("r1.err")?)
        .spawn()
        .context("cannot start ott-node")?;
    let relay = Relay {
        data: SocketAddr::new(IpAddr::V4(ip(2)), ott_overlay::DATA_PORT),
        status,
        pid: relay_proc.id(),
    };
    procs.0.push(relay_proc);

    // The server's control plane: a real tree node, driven here.
    let stream = StreamInfo::new("bench", MediaKind::Ts, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let forwarding: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let server_ctrl = ott_apps::net::bind_udp(SocketAddr::new(
        IpAddr::V4(ip(1)),
        ott_overlay::CONTROL_PORT,
    ))?;
    let server_data =
        ott_apps::net::bind_udp(SocketAddr::new(IpAddr::V4(ip(1)), ott_overlay::DATA_PORT))?;
    let ctrl_thread = spawn_server_control(
        server_ctrl,
        key.clone(),
        stream.clone(),
        forwarding.clone(),
        stop.clone(),
    )?;
    let key = key.as_ref();

    // Subscribers: client joins at the relay, refreshed.
    let subs: Vec<UdpSocket> = (0..100u8)
        .map(|i| {
            ott_apps::net::bind_udp(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, NET, 1, i + 1)),
                0,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let sub_addrs: Vec<SocketAddr> = subs
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<_, _>>()?;
    let joined = Arc::new(AtomicU64::new(0));
    let join_thread = spawn_joiner(
        subs.iter()
            .map(|s| s.try_clone())
            .collect::<Result<_, _>>()?,
        SocketAddr::new(IpAddr::V4(ip(2)), ott_overlay::CONTROL_PORT),
        stream.id,
        joined.clone(),
        stop.clone(),
    )?;

    let mut rows: Vec<Row> = Vec::new();
    for n in [1usize, 10, 100] {
        joined.store(n as u64, Ordering::SeqCst);
        wait_for(
            Duration::from_secs(20),
            "the relay forwards to every subscriber",
            || {
                relay_children(&relay, &stream.name) == Some(n)
                    && forwarding.lock().map(|f| !f.is_empty()).unwrap_or(false)
            },
        )?;
        let ours = measure_ours(&relay, &server_data, key, args.seconds)?;
        let base = measure_baseline(&sub_addrs[..n], key, args.seconds)?;
        rows.push(Row {
            subscribers: n,
            ours,
            base,
        });
    }
    let prototype = match measure_prototype(sub_addrs[0], args.seconds) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("prototype-style relay not measured: {e:#}");
            None
        }
    };
    joined.store(1, Ordering::SeqCst);
    wait_for(Duration::from_secs(20), "one subscriber left", || {
        relay_children(&relay, &stream.name) == Some(1)
    })?;
    // On a loaded machine the paced latency run may lose datagrams: report that instead
    // of losing the throughput table.
    let lat = measure_latency(&relay, &server_data, key, &subs[0]).map_err(|e| format!("{e:#}"));

    // The relay's sender threads, counted while it runs (its helpers start at the
    // first round to many subscribers, so the 100-subscriber row has started them).
    let helpers = threads_named(relay.pid, "data-send-");
    stop.store(true, Ordering::SeqCst);
    let _ = join_thread.join();
    let _ = ctrl_thread.join();
    drop(procs);
    let o = offload();
    let offloads = if args.no_offload {
        "off (--no-offload)".to_string()
    } else {
        format!(
            "GSO {}, GRO {} (kernel probe; the baseline uses neither)",
            if o.gso { "on" } else { "unavailable" },
            if o.gro { "on" } else { "unavailable" }
        )
    };
    let fanout = format!(
        "{} sender thread{} for large rounds ({}; {} cores here)",
        helpers + 1,
        if helpers == 0 { "" } else { "s" },
        match args.fanout_threads {
            Some(n) => format!("--fanout-threads {n}"),
            None => "the relay's default".to_string(),
        },
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    );
    print_table(&rows, &lat, prototype, !args.no_key, &offloads, &fanout);
    Ok(())
}

/// How many threads of process `pid` have a name starting with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// The run's key file, removed when the run ends however it ends.
struct KeyFile(std::path::PathBuf);

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn relay_children(relay: &Relay, stream: &str) -> Option<usize> {
    let body = http_get(relay.status, "/status").ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["streams"][stream]["children"].as_array().map(Vec::len)
}

fn spawn_server_control(
    sock: UdpSocket,
    key: Option<OverlayKey>,
    stream: StreamInfo,
    forwarding: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<thread::JoinHandle<()>> {
    sock.set_read_timeout(Some(Duration::from_millis(10)))?;
    let relay_ctrl = SocketAddr::new(IpAddr::V4(ip(2)), ott_overlay::CONTROL_PORT);
    let keying = Keying::new(key, "s1", [relay_ctrl.ip()], false);
    let mut sender = keying.sealer("ctrl", ott_apps::node_runtime::incarnation());
    let mut gate = keying.gate();
    Ok(thread::spawn(move || {
        let now = Instant::now();
        let mut node = Node::new(
            NodeConfig::new("s1", Role::Server, ott_overlay::DATA_PORT),
            vec![("r1".to_string(), relay_ctrl)],
            now,
            now,
        );
        node.set_catalogue(now, vec![stream]);
        let mut buf = [0u8; 65536];
        while !stop.load(Ordering::SeqCst) {
            while let Some(t) = node.poll_transmit() {
                if let Ok(b) = sender.encode(t.to, &t.msg) {
                    let _ = sock.send_to(&b, t.to);
                }
            }
            while let Some(ev) = node.poll_event() {
                if let Event::Forwarding { children, .. } = ev {
                    if let Ok(mut f) = forwarding.lock() {
                        *f = children;
                    }
                }
            }
            if let Ok((len, from)) = sock.recv_from(&mut buf) {
                if let Ok(msg) = gate.open(Some(from), &buf[..len]) {
                    node.handle(Instant::now(), from, msg);
                }
            }
            if node.poll_timeout().is_some_and(|t| t <= Instant::now()) {
                node.handle_timeout(Instant::now());
            }
        }
    }))
}

fn spawn_joiner(
    subs: Vec<UdpSocket>,
    relay_ctrl: SocketAddr,
    stream: u32,
    active: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<thread::JoinHandle<()>> {
    // The clones share the sockets' settings: a short timeout (the latency measurement
    // sets its own on the first one later).
    for s in &subs {
        s.set_read_timeout(Some(Duration::from_millis(1)))?;
    }
    Ok(thread::spawn(move || {
        // The PoP admits a viewer once it echoes the cookie sent to its data socket.
        let mut cookies: Vec<Option<u64>> = vec![None; subs.len()];
        let mut buf = [0u8; 2048];
        // A cookie lasts 30 to 60 s from the PoP's start, longer than a bench run
        // after the first Join.
        while !stop.load(Ordering::SeqCst) {
            let n = active.load(Ordering::SeqCst) as usize;
            for (i, s) in subs.iter().enumerate() {
                // Take the control messages at the head of the queue (the first
                // subscriber's media is read by the latency measurement).
                let mut budget = 256;
                while (i == 0 || cookies[i].is_none()) && budget > 0 {
                    budget -= 1;
                    let Ok((len, _)) = s.peek_from(&mut buf) else {
                        break;
                    };
                    if buf[..len].starts_with(&ott_proto::MAGIC) && i == 0 {
                        break;
                    }
                    let Ok((len, _)) = s.recv_from(&mut buf) else {
                        break;
                    };
                    if let Ok(Message::Cookie { cookie, .. }) = ott_proto::decode(&buf[..len]) {
                        cookies[i] = Some(cookie);
                    }
                }
                let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
                let msg = match (i < n, cookies[i]) {
                    (true, Some(cookie)) => Message::ViewerJoin {
                        stream,
                        data_port: port,
                        cookie,
                    },
                    (true, None) => Message::Join {
                        stream,
                        data_port: port,
                        from: None,
                    },
                    (false, Some(cookie)) => Message::ViewerLeave {
                        stream,
                        data_port: port,
                        cookie,
                    },
                    (false, None) => continue,
                };
                if let Ok(b) = ott_proto::encode(&msg) {
                    let _ = s.send_to(&b, relay_ctrl);
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
    }))
}

fn datagram(seq: u32, stamp_ns: u64, key: Option<&OverlayKey>) -> Vec<u8> {
    let h = MediaHeader {
        flags: flags::KEYFRAME,
        stream: ott_proto::stream_id_for("bench"),
        seq,
        frame: seq,
        frag_index: 0,
        frag_count: 1,
        timestamp: seq,
    };
    let mut d = h.to_bytes().to_vec();
    d.extend_from_slice(&stamp_ns.to_be_bytes());
    d.resize(ott_proto::HEADER_LEN + PAYLOAD, 0x47);
    if let Some(k) = key {
        k.seal_media(&mut d);
    }
    d
}

/// Blast datagrams at `to` from `sock` for `secs`, 64 per system call; returns datagrams offered.
/// Sequence numbers go on across every run of the benchmark, as a live stream's do: a
/// relay drops a datagram whose number it has seen as a duplicate.
static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);

fn next_seqs(n: u32) -> u32 {
    NEXT_SEQ.fetch_add(n, Ordering::Relaxed)
}

fn blast(sock: &UdpSocket, to: SocketAddr, key: Option<&OverlayKey>, secs: f64) -> u64 {
    let start = Instant::now();
    let mut offered = 0u64;
    let mut digests = Vec::with_capacity(64);
    while start.elapsed().as_secs_f64() < secs {
        let seq = next_seqs(64);
        let mut batch: Vec<Vec<u8>> = (0..64)
            .map(|i| datagram(seq.wrapping_add(i), 0, None))
            .collect();
        // Tagged as a batch (the digests side by side), so that the generator's own
        // tagging does not cap the rate it offers a keyed relay.
        if let Some(k) = key {
            let bodies: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
            media_digests_many(&bodies, &mut digests);
            for (d, digest) in batch.iter_mut().zip(&digests) {
                d.extend_from_slice(&k.media_tag_of(digest));
            }
        }
        let items: Vec<(&[u8], SocketAddr)> = batch.iter().map(|d| (d.as_slice(), to)).collect();
        offered += send_batch(sock, &items).sent as u64;
    }
    offered
}

#[derive(Debug, Clone, Copy, Default)]
struct Throughput {
    pps: f64,
    mbit: f64,
    cpu_s_per_gb: f64,
}

fn measure_ours(
    relay: &Relay,
    gen: &UdpSocket,
    key: Option<&OverlayKey>,
    secs: f64,
) -> anyhow::Result<Throughput> {
    let (p0, c0, t0) = (relay.packets_out()?, relay.cpu_seconds()?, Instant::now());
    blast(gen, relay.data, key, secs);
    // Let the relay drain its socket buffer before reading its counters.
    thread::sleep(Duration::from_millis(200));
    let (p1, c1, dt) = (
        relay.packets_out()?,
        relay.cpu_seconds()?,
        t0.elapsed().as_secs_f64(),
    );
    Ok(throughput(p1 - p0, c1 - c0, dt))
}

fn throughput(packets: u64, cpu: f64, secs: f64) -> Throughput {
    let bytes = packets as f64 * (ott_proto::HEADER_LEN + PAYLOAD) as f64;
    Throughput {
        pps: packets as f64 / secs,
        mbit: bytes * 8.0 / secs / 1e6,
        cpu_s_per_gb: if bytes > 0.0 {
            cpu / (bytes / 1e9)
        } else {
            0.0
        },
    }
}

/// The minimal relay: one thread, recvmmsg then sendmmsg to every subscriber.
fn spawn_baseline(
    subs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(SocketAddr, thread::JoinHandle<(u64, f64)>)> {
    let sock = ott_apps::net::bind_udp(SocketAddr::new(IpAddr::V4(ip(3)), 0))?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let addr = sock.local_addr()?;
    let h = thread::spawn(move || {
        let cpu_path = thread_cpu_path();
        // Plain on purpose: no GRO, no GSO (the socket calls of a minimal batched relay).
        let mut batch = RecvBatch::new(64);
        let mut sent = 0u64;
        let cpu0 = proc_cpu(&cpu_path).unwrap_or(0.0);
        while !stop.load(Ordering::SeqCst) {
            if batch.recv(&sock).is_err() {
                continue;
            }
            let mut items: Vec<(&[u8], SocketAddr)> = Vec::with_capacity(batch.len() * subs.len());
            for i in 0..batch.len() {
                if let Some((d, _)) = batch.get(i) {
                    for s in &subs {
                        items.push((d, *s));
                    }
                }
            }
            sent += send_batch_with(&sock, &items, false).sent as u64;
        }
        (sent, proc_cpu(&cpu_path).unwrap_or(0.0) - cpu0)
    });
    Ok((addr, h))
}

/// The baseline forwards what it gets; it is offered the same (tagged) datagrams.
fn measure_baseline(
    subs: &[SocketAddr],
    key: Option<&OverlayKey>,
    secs: f64,
) -> anyhow::Result<Throughput> {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, h) = spawn_baseline(subs.to_vec(), stop.clone())?;
    let gen = ott_apps::net::bind_udp(SocketAddr::new(IpAddr::V4(ip(4)), 0))?;
    let t0 = Instant::now();
    blast(&gen, addr, key, secs);
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let dt = t0.elapsed().as_secs_f64();
    let (sent, cpu) = h
        .join()
        .map_err(|_| anyhow::anyhow!("baseline relay panicked"))?;
    Ok(throughput(sent, cpu, dt))
}

/// A relay written the way the reference prototype was: Python, one datagram per call,
/// `pickle.loads` of every packet and `pickle.dumps` for every subscriber.
const PROTOTYPE_RELAY: &str = r#"
import pickle, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 0))
print(sock.getsockname()[1], flush=True)
subs = [(h, int(p)) for h, p in (a.rsplit(':', 1) for a in sys.argv[2:])]
n = 0
while True:
    data, addr = sock.recvfrom(65535)
    if data == b'STOP':
        print(n, flush=True)
        break
    packet = pickle.loads(data)
    for s in subs:
        sock.sendto(pickle.dumps(packet), s)
        n += 1
"#;

fn measure_prototype(sub: SocketAddr, secs: f64) -> anyhow::Result<Throughput> {
    use std::io::BufRead;
    let packet = Command::new("python3")
        .args([
            "-c",
            "import pickle,sys; sys.stdout.buffer.write(pickle.dumps({'stream': 'bench', 'seq': 1, 'frame': 1, 'data': b'G' * 1316}))",
        ])
        .output()
        .context("python3 is needed for the prototype-style relay")?
        .stdout;
    let mut child = Command::new("python3")
        .args(["-c", PROTOTYPE_RELAY, &ip(5).to_string(), &sub.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start python3")?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let stat = format!("/proc/{}/stat", child.id());
    // Killed on every way out of this function.
    let _guard = Procs(vec![child]);
    let port: u16 = lines
        .next()
        .context("the prototype relay printed nothing")??
        .trim()
        .parse()?;
    let relay = SocketAddr::new(IpAddr::V4(ip(5)), port);
    let gen = ott_apps::net::bind_udp(SocketAddr::new(IpAddr::V4(ip(6)), 0))?;
    let (c0, t0) = (proc_cpu(&stat)?, Instant::now());
    while t0.elapsed().as_secs_f64() < secs {
        let items: Vec<(&[u8], SocketAddr)> = (0..64).map(|_| (packet.as_slice(), relay)).collect();
        send_batch(&gen, &items);
    }
    thread::sleep(Duration::from_millis(200));
    let (c1, dt) = (proc_cpu(&stat)?, t0.elapsed().as_secs_f64());
    let reader = thread::spawn(move || lines.next().and_then(Result::ok));
    // The STOP may wait behind a full socket buffer: repeat it until the relay answers.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reader.is_finished() && Instant::now() < deadline {
        gen.send_to(b"STOP", relay)?;
        thread::sleep(Duration::from_millis(100));
    }
    if !reader.is_finished() {
        anyhow::bail!("the prototype relay did not report its count");
    }
    let forwarded: u64 = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?
        .context("the prototype relay did not report its count")?
        .trim()
        .parse()?;
    Ok(throughput(forwarded, c1 - c0, dt))
}

#[derive(Debug, Default)]
struct Latency {
    direct: (f64, f64),
    ours: (f64, f64),
    base: (f64, f64),
}

/// Send at 20 Mbit/s for 2 s, stamping each datagram; the subscriber measures one-way delay.
fn paced_latency(
    gen: &UdpSocket,
    key: Option<&OverlayKey>,
    to: SocketAddr,
    sub: &UdpSocket,
    epoch: Instant,
) -> anyhow::Result<(f64, f64)> {
    let rate_pps = 20e6 / 8.0 / (ott_proto::HEADER_LEN + PAYLOAD) as f64;
    let count = (rate_pps * 2.0) as u32;
    let sub = sub.try_clone()?;
    sub.set_read_timeout(Some(Duration::from_millis(300)))?;
    // Drain anything queued from earlier runs.
    let mut buf = [0u8; 2048];
    while sub.recv_from(&mut buf).is_ok() {}
    let rx = thread::spawn(move || {
        let mut lat = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok((len, _)) = sub.recv_from(&mut buf) {
            let now = epoch.elapsed().as_nanos() as u64;
            let at = ott_proto::HEADER_LEN;
            if len >= at + 8 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[at..at + 8]);
                lat.push(now.saturating_sub(u64::from_be_bytes(b)) as f64 / 1e6);
            }
        }
        lat
    });
    let start = Instant::now();
    for i in 0..count {
        let due = start + Duration::from_secs_f64(f64::from(i) / rate_pps);
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let d = datagram(next_seqs(1), epoch.elapsed().as_nanos() as u64, key);
        let _ = gen.send_to(&d, to);
    }
    let mut lat = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    if lat.len() < count as usize / 2 {
        anyhow::bail!(
            "only {} of {count} datagrams arrived in the latency run",
            lat.len()
        );
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    Ok((pct(0.5), pct(0.99)))
}

/// Three rounds of (direct, ours, baseline), so that warm-up and passing noise hit every
/// path alike; each path reports the median of its rounds.
fn measure_latency(
    relay: &Relay,
    gen: &UdpSocket,
    key: Option<&OverlayKey>,
    sub: &UdpSocket,
) -> anyhow::Result<Latency> {
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (base_addr, h) = spawn_baseline(vec![sub.local_addr()?], stop.clone())?;
    let mut runs: [Vec<(f64, f64)>; 3] = Default::default();
    let mut result = Ok(());
    for _ in 0..3 {
        for (i, to) in [sub.local_addr()?, relay.data, base_addr]
            .into_iter()
            .enumerate()
        {
            match paced_latency(gen, key, to, sub, epoch) {
                Ok(r) => runs[i].push(r),
                Err(e) => result = Err(e),
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = h.join();
    result?;
    let median = |v: &mut Vec<(f64, f64)>| {
        let mut p50: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut p99: Vec<f64> = v.iter().map(|x| x.1).collect();
        p50.sort_by(f64::total_cmp);
        p99.sort_by(f64::total_cmp);
        (p50[p50.len() / 2], p99[p99.len() / 2])
    };
    let [mut d, mut o, mut b] = runs;
    Ok(Latency {
        direct: median(&mut d),
        ours: median(&mut o),
        base: median(&mut b),
    })
}

struct Row {
    subscribers: usize,
    ours: Throughput,
    base: Throughput,
}

fn print_table(
    rows: &[Row],
    lat: &Result<Latency, String>,
    prototype: Option<Throughput>,
    keyed: bool,
    offloads: &str,
    fanout: &str,
) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\nrelay forwarding on loopback, {PAYLOAD}-byte payloads (ours = ott-node, baseline = recvmmsg/sendmmsg loop)");
    let _ = writeln!(
        out,
        "overlay key: {}",
        if keyed {
            "yes (the relay checks a 16-byte tag on every datagram)"
        } else {
            "none"
        }
    );
    let _ = writeln!(
        out,
        "relay UDP offload: {offloads}; generator sends with send_batch (GSO when on)"
    );
    let _ = writeln!(out, "relay fan-out: {fanout}\n");
    let _ = writeln!(
        out,
        "{:<12} {:>12} {:>12} {:>10} {:>10} {:>12} {:>12} {:>8} {:>10}",
        "subscribers",
        "ours pkt/s",
        "base pkt/s",
        "ours Mb/s",
        "base Mb/s",
        "ours cpu/GB",
        "base cpu/GB",
        "ratio",
        "cpu ratio"
    );
    for r in rows {
        let ratio = if r.base.pps > 0.0 {
            r.ours.pps / r.base.pps
        } else {
            0.0
        };
        let cpu_ratio = if r.base.cpu_s_per_gb > 0.0 {
            r.ours.cpu_s_per_gb / r.base.cpu_s_per_gb
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "{:<12} {:>12.0} {:>12.0} {:>10.0} {:>10.0} {:>11.2}s {:>11.2}s {:>8.2} {:>10.2}",
            r.subscribers,
            r.ours.pps,
            r.base.pps,
            r.ours.mbit,
            r.base.mbit,
            r.ours.cpu_s_per_gb,
            r.base.cpu_s_per_gb,
            ratio,
            cpu_ratio
        );
    }
    let _ = writeln!(
        out,
        "\none-way latency at 20 Mbit/s, ms (p50 / p99); added per hop = via relay − direct"
    );
    match lat {
        Ok(lat) => print_latency(&mut out, lat),
        Err(e) => {
            let _ = writeln!(out, "not measured: {e}");
        }
    }
    let one = rows.iter().find(|r| r.subscribers == 1);
    if let (Some(p), Some(r)) = (prototype, one) {
        let _ = writeln!(
            out,
            "\nprototype-style relay (Python, pickle.loads/dumps per packet), 1 subscriber: {:.0} pkt/s; ours is {:.0}x that",
            p.pps,
            if p.pps > 0.0 { r.ours.pps / p.pps } else { 0.0 }
        );
    }
    let ratio = one
        .map(|r| {
            if r.base.pps > 0.0 {
                r.ours.pps / r.base.pps
            } else {
                0.0
            }
        })
        .unwrap_or(0.0);
    let _ = writeln!(out, "\nrelay throughput ratio: {ratio:.2}");
}

fn print_latency(out: &mut impl Write, lat: &Latency) {
    let _ = writeln!(
        out,
        "{:<10} {:>8.3} / {:.3}",
        "direct", lat.direct.0, lat.direct.1
    );
    let _ = writeln!(
        out,
        "{:<10} {:>8.3} / {:.3}   added {:.3} / {:.3}",
        "ours",
        lat.ours.0,
        lat.ours.1,
        lat.ours.0 - lat.direct.0,
        lat.ours.1 - lat.direct.1
    );
    let _ = writeln!(
        out,
        "{:<10} {:>8.3} / {:.3}   added {:.3} / {:.3}",
        "baseline",
        lat.base.0,
        lat.base.1,
        lat.base.0 - lat.direct.0,
        lat.base.1 - lat.direct.1
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measurement_is_long_enough_and_at_most_a_day() {
        assert_eq!(parse_measure_secs("3"), Ok(3.0));
        assert_eq!(parse_measure_secs("0.1"), Ok(0.1));
        for bad in ["0", "0.05", "-1", "nan", "inf", "1e9"] {
            assert!(parse_measure_secs(bad).is_err(), "{bad}");
        }
    }
}
