//! The client program's runtime: bootstrap, PoP choice, reception, output.

use std::fs::File;
use std::io::{BufRead, IsTerminal, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{select, Receiver};
use ott_bootstrap::Request;
use ott_datapath::{Config as DataConfig, DataPath, DataPathEvent, Drop as DropReason, Payload};
use ott_media::{Frame, PlayoutBuffer, PlayoutConfig};
use ott_proto::{flags, MediaKind, Message, StreamInfo, HEADER_LEN};
use ott_tree::client::{Client, ClientConfig, ClientEvent};
use serde::Serialize;

use crate::counters::{add, Counters};
use crate::ctrlio::{send_msg, spawn_receiver, Datagram, StatusQuery};
use crate::http::Hub;

/// A gap between two frames longer than this counts as a stall.
pub const STALL: Duration = Duration::from_millis(200);

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bootstrapper address.
    pub bootstrap: SocketAddr,
    /// Client id in the topology, if any.
    pub id: Option<String>,
    /// Stream to watch.
    pub stream: Option<String>,
    /// Only list the streams.
    pub list: bool,
    /// Output file, `-` for stdout.
    pub output: Option<PathBuf>,
    /// Pipe into ffplay.
    pub play: bool,
    /// Serve the page and the stream over HTTP on this address.
    pub http: Option<SocketAddr>,
    /// Run for this long, then print a summary.
    pub duration: Option<Duration>,
    /// `--status` address.
    pub status: Option<SocketAddr>,
    /// How long to wait for the bootstrapper.
    pub bootstrap_wait: Duration,
    /// Playout latency budget: how long a frame may wait for lost datagrams.
    pub latency: Duration,
    /// Ask the PoP to resend lost datagrams.
    pub nack: bool,
    /// Paths to receive the stream over, 1 or 2 ([`ClientConfig::paths`]).
    pub paths: u8,
}

/// Reception statistics of a run, printed as the summary line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Reception {
    /// Stream being watched.
    pub stream: Option<String>,
    /// PoP in use.
    pub pop: Option<String>,
    /// Whole frames written.
    pub frames: u64,
    /// Bytes of whole frames written.
    pub bytes: u64,
    /// Gaps between frames longer than [`STALL`].
    pub stalls: u64,
    /// Longest gap between two frames, ms.
    pub longest_gap_ms: u64,
    /// PoP changes after the first choice.
    pub pop_switches: u64,
    /// Stream switches.
    pub stream_switches: u64,
    /// Incomplete frames dropped.
    pub incomplete: u64,
    /// Media datagrams of another stream dropped.
    pub stale: u64,
    /// Longest gap between two media datagrams of the watched stream, by their arrival
    /// timestamps, ms (the outage a failover caused, at the packet level).
    pub longest_packet_gap_ms: u64,
    /// Times the stream's copy moved to another server (sequence space).
    pub source_switches: u64,
    /// Frames dropped while waiting for a keyframe (after a start or a switch).
    pub skipped_to_key: u64,
    /// From the last stream selection to the first frame written, ms.
    pub first_frame_ms: Option<u64>,
    /// From the last stream selection to the first keyframe that arrived live (not
    /// replayed from the PoP's cache), ms: the start time without instant start.
    pub first_live_key_ms: Option<u64>,
    /// NACK messages sent to the PoP.
    pub nacks: u64,
    /// Frames a second lately (measured by the status line, [`crate::progress`]).
    pub fps: f64,
    /// The live status line on a terminal.
    #[serde(skip)]
    pub progress: crate::progress::Progress,
}

impl Reception {
    /// The one-line summary: `key=value` pairs.
    pub fn summary(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-3);
        format!(
            "summary: stream={} pop={} frames={} bytes={} fps={:.1} stalls={} longest_gap_ms={} pop_switches={} stream_switches={} incomplete={} longest_packet_gap_ms={} source_switches={} first_frame_ms={} first_live_key_ms={} nacks={}",
            self.stream.as_deref().unwrap_or("-"),
            self.pop.as_deref().unwrap_or("-"),
            self.frames,
            self.bytes,
            self.frames as f64 / secs,
            self.stalls,
            self.longest_gap_ms,
            self.pop_switches,
            self.stream_switches,
            self.incomplete,
            self.longest_packet_gap_ms,
            self.source_switches,
            opt_ms(self.first_frame_ms),
            opt_ms(self.first_live_key_ms),
            self.nacks,
        )
    }
}

fn opt_ms(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

struct Sinks {
    writers: Vec<(String, Box<dyn Write + Send>)>,
    player: Option<Child>,
    kind: MediaKind,
}

impl Sinks {
    fn write_frame(&mut self, data: &[u8]) -> anyhow::Result<()> {
        for (name, w) in &mut self.writers {
            // Flush each frame at once, so a reader tailing the file sees it.
            w.write_all(data)
                .and_then(|()| w.flush())
                .with_context(|| format!("cannot write to {name}"))?;
        }
        Ok(())
    }
}

fn open_sinks(opts: &Options, kind: MediaKind) -> anyhow::Result<Sinks> {
    let mut sinks = Sinks {
        writers: Vec::new(),
        player: None,
        kind,
    };
    if let Some(path) = &opts.output {
        if path.as_os_str() == "-" {
            sinks
                .writers
                .push(("standard output".into(), Box::new(std::io::stdout())));
        } else {
            let f = File::create(path)
                .with_context(|| format!("cannot create output file {}", path.display()))?;
            sinks
                .writers
                .push((path.display().to_string(), Box::new(f)));
        }
    }
    if opts.play {
        let format = match kind {
            MediaKind::Mjpeg => "mjpeg",
            MediaKind::Ts => "mpegts",
        };
        let mut child = Command::new("ffplay")
            .args(["-loglevel", "error", "-autoexit", "-f", format, "-i", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("{FFPLAY_MISSING} ({e})"))?;
        let stdin = child.stdin.take().context("ffplay has no standard input")?;
        sinks.writers.push(("ffplay".into(), Box::new(stdin)));
        sinks.player = Some(child);
    }
    Ok(sinks)
}

const FFPLAY_MISSING: &str = "--play needs ffplay, which could not be started: install it (Debian: apt-get install ffmpeg), or use --output - | your-player, or --http ADDR";

/// Whether ffplay can be run.
fn ffplay_available() -> bool {
    Command::new("ffplay")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Viewer {
    client: Client,
    sock: UdpSocket,
    counters: Arc<Counters>,
    playout: PlayoutBuffer,
    /// The data-plane core: session tags, duplicates and source lock, gaps and NACKs
    /// to where the stream comes from (the PoP's data socket).
    data: DataPath,
    last_packet: Option<Instant>,
    watching: Option<StreamInfo>,
    sinks: Option<Sinks>,
    rec: Reception,
    last_frame: Option<Instant>,
    opts: Options,
    first_pop: bool,
    hub: Option<Arc<Hub>>,
    /// Drop frames until a keyframe (start or switch): a TS stream starts decodable.
    waiting_key: bool,
    selected_at: Option<Instant>,
}

/// The data-plane core of a viewer: media only with a session tag, NACKs given up after
/// the latency budget, nothing kept for retransmission (a viewer forwards nothing).
fn viewer_data(opts: &Options) -> DataPath {
    DataPath::for_viewer(DataConfig::viewer(opts.nack, opts.latency))
}

/// Run the client until its duration ends, a signal arrives, or an error.
pub fn run(opts: Options) -> anyhow::Result<()> {
    if opts.play && !ffplay_available() {
        anyhow::bail!("{FFPLAY_MISSING}");
    }
    let req = Request::Client {
        id: opts.id.clone(),
    };
    let a = crate::node_runtime::bootstrap(opts.bootstrap, req, opts.bootstrap_wait)?;
    if a.pops.is_empty() {
        anyhow::bail!("the bootstrapper knows no PoP in topology {}", a.topology);
    }
    let sock = crate::net::bind_udp(a.bind_ctrl).context("client socket")?;
    let local = sock.local_addr()?;
    tracing::info!(%local, pops = a.pops.len(), "client starting");
    let counters = Arc::new(Counters::default());
    let rx = spawn_receiver(sock.try_clone()?, "client-rx", counters.clone())?;
    let shutdown = crate::signals::shutdown_channel();
    let epoch = Instant::now();
    let config = ClientConfig {
        seed: crate::node_runtime::incarnation(),
        paths: opts.paths,
        ..ClientConfig::default()
    };
    // A PoP is known by every address the bootstrapper gave for it: it may answer from
    // another than the one the client sends to.
    let pops = a.pops.iter().map(|p| p.control_addrs()).collect();
    let client = Client::with_pops(config, pops, local.port(), epoch, epoch);
    let mut v = Viewer {
        client,
        sock,
        counters,
        playout: PlayoutBuffer::new(PlayoutConfig {
            budget: opts.latency,
            ..PlayoutConfig::default()
        }),
        data: viewer_data(&opts),
        last_packet: None,
        watching: None,
        sinks: None,
        rec: Reception::default(),
        last_frame: None,
        opts: opts.clone(),
        first_pop: true,
        hub: None,
        waiting_key: true,
        selected_at: None,
    };
    if opts.list {
        let streams = v.wait_catalogue(&rx, Duration::from_secs(10))?;
        for s in streams {
            println!("{}", s.name);
        }
        return Ok(());
    }
    let stream = match &opts.stream {
        Some(s) => s.clone(),
        None if std::io::stdin().is_terminal() => {
            let streams = v.wait_catalogue(&rx, Duration::from_secs(10))?;
            ask_stream(&streams)?
        }
        None => anyhow::bail!("no --stream given and standard input is not a terminal (use --list to see the streams)"),
    };
    v.client.select_stream(Instant::now(), &stream);
    let (switch_tx, lines) = crossbeam_channel::bounded(16);
    spawn_stdin_lines(switch_tx.clone());
    if let Some(addr) = opts.http {
        let hub = Arc::new(Hub::new());
        hub.set_catalogue(v.client.catalogue());
        crate::http::serve(addr, hub.clone(), switch_tx)?;
        v.hub = Some(hub);
    }
    let (status_tx, status_rx) = crossbeam_channel::bounded::<StatusQuery>(16);
    if let Some(addr) = opts.status {
        crate::status::serve(
            addr,
            crate::http::with_hub(
                Arc::new(crate::ctrlio::LoopStatus {
                    id: opts.id.clone().unwrap_or_else(|| "client".into()),
                    queries: status_tx,
                    counters: v.counters.clone(),
                }),
                v.hub.clone(),
            ),
        )?;
    }
    let started = Instant::now();
    v.rec.progress = crate::progress::Progress::on_terminal(started);
    let end = opts.duration.map(|d| started + d);
    let result = v.main_loop(&rx, &lines, &shutdown, &status_rx, end);
    v.client.shutdown(Instant::now());
    v.drain_transmits();
    if let Some(mut sinks) = v.sinks.take() {
        sinks.writers.clear();
        if let Some(mut p) = sinks.player.take() {
            let _ = p.wait();
        }
    }
    v.rec.progress.finish();
    result?;
    let line = v.rec.summary(started.elapsed());
    if opts.output.as_deref().is_some_and(|p| p.as_os_str() == "-") {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    if v.rec.frames == 0 {
        anyhow::bail!(
            "received no frame of {stream:?} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Run a viewer inside another program (the PoP's HTTP edge): attach to the one PoP
/// `pop` (its id and control address) from a socket bound at `bind`, watch `stream` (or
/// only keep the catalogue, with `None`), and write what arrives into `hub`, until `stop`
/// fires or its sender is dropped. `status` queries get the same JSON as a client's
/// `/status`. Nothing is printed; the PoP is left on return.
pub fn run_embedded(
    pop: (String, SocketAddr),
    bind: SocketAddr,
    stream: Option<String>,
    hub: Arc<Hub>,
    stop: &Receiver<()>,
    status: &Receiver<StatusQuery>,
) -> anyhow::Result<()> {
    let sock = crate::net::bind_udp(bind).context("viewer socket")?;
    let local = sock.local_addr()?;
    let counters = Arc::new(Counters::default());
    let rx = spawn_receiver(sock.try_clone()?, "edge-rx", counters.clone())?;
    let epoch = Instant::now();
    let config = ClientConfig {
        seed: crate::node_runtime::incarnation(),
        ..ClientConfig::default()
    };
    let opts = Options {
        bootstrap: pop.1,
        id: None,
        stream: stream.clone(),
        list: false,
        output: None,
        play: false,
        http: None,
        duration: None,
        status: None,
        bootstrap_wait: Duration::ZERO,
        latency: Duration::from_millis(300),
        nack: true,
        paths: 1,
    };
    let client = Client::new(config, vec![pop], local.port(), epoch, epoch);
    let mut v = Viewer {
        client,
        sock,
        counters,
        playout: PlayoutBuffer::new(PlayoutConfig {
            budget: opts.latency,
            ..PlayoutConfig::default()
        }),
        data: viewer_data(&opts),
        last_packet: None,
        watching: None,
        sinks: None,
        rec: Reception::default(),
        last_frame: None,
        opts,
        first_pop: true,
        hub: Some(hub),
        waiting_key: true,
        selected_at: None,
    };
    if let Some(name) = &stream {
        v.client.select_stream(Instant::now(), name);
    }
    let (_no_lines, lines) = crossbeam_channel::bounded(1);
    let result = v.main_loop(&rx, &lines, stop, status, None);
    v.client.shutdown(Instant::now());
    v.drain_transmits();
    // The receiver thread blocks in recv: drop its channel, then wake it so it ends.
    drop(rx);
    let mut wake = local;
    if wake.ip().is_unspecified() {
        wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let _ = v.sock.send_to(&[0], wake);
    result
}

fn ask_stream(streams: &[StreamInfo]) -> anyhow::Result<String> {
    eprintln!("Streams:");
    for (i, s) in streams.iter().enumerate() {
        eprintln!("  {}) {}", i + 1, s.name);
    }
    eprint!("Which one (name or number)? ");
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the stream choice")?;
    let answer = line.trim();
    if let Ok(n) = answer.parse::<usize>() {
        if let Some(s) = n.checked_sub(1).and_then(|i| streams.get(i)) {
            return Ok(s.name.clone());
        }
    }
    if answer.is_empty() {
        anyhow::bail!("no stream chosen");
    }
    Ok(answer.to_string())
}

/// Each line of standard input, trimmed, as a stream-switch request on `tx`.
fn spawn_stdin_lines(tx: crossbeam_channel::Sender<String>) {
    let _ = thread::Builder::new().name("stdin".into()).spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            let name = line.trim().to_string();
            if !name.is_empty() && tx.send(name).is_err() {
                return;
            }
        }
    });
}

impl Viewer {
    fn drain_transmits(&mut self) {
        while let Some(t) = self.client.poll_transmit() {
            send_msg(&self.sock, &self.counters, t.to, &t.msg);
        }
    }

    fn wait_catalogue(
        &mut self,
        rx: &Receiver<Datagram>,
        wait: Duration,
    ) -> anyhow::Result<Vec<StreamInfo>> {
        let deadline = Instant::now() + wait;
        loop {
            self.drain_transmits();
            while let Some(ev) = self.client.poll_event() {
                match ev {
                    ClientEvent::Catalogue(streams) if !streams.is_empty() => return Ok(streams),
                    ClientEvent::NoPop => {
                        tracing::warn!("{}", crate::progress::no_pop_hint(&self.client.status()))
                    }
                    _ => {}
                }
            }
            let timer = self.client.poll_timeout().unwrap_or(deadline).min(deadline);
            select! {
                recv(rx) -> d => {
                    let d = d.map_err(|_| anyhow::anyhow!("receiver stopped"))?;
                    self.on_datagram(d)?;
                }
                recv(crossbeam_channel::at(timer)) -> _ => {
                    let now = Instant::now();
                    if now >= deadline {
                        anyhow::bail!("no PoP answered with a stream list within {} s", wait.as_secs());
                    }
                    self.client.handle_timeout(now);
                }
            }
        }
    }

    fn main_loop(
        &mut self,
        rx: &Receiver<Datagram>,
        lines: &Receiver<String>,
        shutdown: &Receiver<()>,
        status: &Receiver<StatusQuery>,
        end: Option<Instant>,
    ) -> anyhow::Result<()> {
        let end_rx = end
            .map(crossbeam_channel::at)
            .unwrap_or_else(crossbeam_channel::never);
        loop {
            crate::progress::tick(&mut self.rec, Instant::now());
            self.drain_transmits();
            while let Some(ev) = self.client.poll_event() {
                self.on_event(ev)?;
            }
            let timer = [
                self.client.poll_timeout(),
                self.playout.poll_timeout(),
                self.data.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(crossbeam_channel::at)
            .unwrap_or_else(crossbeam_channel::never);
            select! {
                recv(rx) -> d => {
                    let d = d.map_err(|_| anyhow::anyhow!("receiver stopped"))?;
                    self.on_datagram(d)?;
                }
                recv(timer) -> _ => {
                    let now = Instant::now();
                    if self.client.poll_timeout().is_some_and(|t| t <= now) {
                        self.client.handle_timeout(now);
                    }
                    self.recover(now)?;
                }
                recv(lines) -> l => {
                    if let Ok(name) = l {
                        tracing::info!(stream = %name, "switching stream");
                        self.client.select_stream(Instant::now(), &name);
                    }
                }
                recv(status) -> q => {
                    if let Ok(reply) = q {
                        let mut v = serde_json::to_value(self.client.status()).unwrap_or_default();
                        if let Some(o) = v.as_object_mut() {
                            o.insert("role".into(), "client".into());
                            o.insert("reception".into(), serde_json::to_value(&self.rec).unwrap_or_default());
                            o.insert("counters".into(), serde_json::to_value(self.counters.snapshot()).unwrap_or_default());
                        }
                        let _ = reply.send(v);
                    }
                }
                recv(shutdown) -> _ => { tracing::info!("interrupted"); return Ok(()); }
                recv(end_rx) -> _ => return Ok(()),
            }
        }
    }

    fn on_event(&mut self, ev: ClientEvent) -> anyhow::Result<()> {
        match ev {
            ClientEvent::PopChanged { old, new } => {
                tracing::debug!(?old, %new, "PoP chosen");
                if !self.first_pop {
                    self.rec.pop_switches += 1;
                }
                self.first_pop = false;
                if let Some(hub) = &self.hub {
                    hub.set_pop(&new);
                }
                self.rec.pop = Some(new);
            }
            ClientEvent::Catalogue(streams) => {
                tracing::debug!(streams = streams.len(), "catalogue");
                if let Some(hub) = &self.hub {
                    hub.set_catalogue(&streams);
                }
            }
            ClientEvent::Watching(info) => {
                tracing::debug!(stream = %info.name, "watching");
                if self.watching.is_some() {
                    self.rec.stream_switches += 1;
                }
                if self
                    .sinks
                    .as_ref()
                    .is_some_and(|s| s.kind != info.kind && s.player.is_some())
                {
                    // ffplay was started for the other format: restart it.
                    if let Some(mut old) = self.sinks.take() {
                        old.writers.clear();
                        if let Some(mut p) = old.player.take() {
                            let _ = p.kill();
                            let _ = p.wait();
                        }
                    }
                }
                if self.sinks.is_none() {
                    self.sinks = Some(open_sinks(&self.opts, info.kind)?);
                }
                // Nothing of the old stream may be written after this point, and the
                // new one is written from a keyframe on.
                self.playout.reset();
                if let Some(old) = &self.watching {
                    self.data.remove_stream(old.id);
                }
                self.data.pin_stream(info.id);
                self.last_packet = None;
                self.waiting_key = true;
                self.selected_at = Some(Instant::now());
                self.rec.first_frame_ms = None;
                self.rec.first_live_key_ms = None;
                if let Some(hub) = &self.hub {
                    hub.set_watching(&info);
                }
                self.rec.stream = Some(info.name.clone());
                self.watching = Some(info);
            }
            ClientEvent::UnknownStream(name) => {
                if self.watching.is_none() {
                    let names: Vec<String> = self
                        .client
                        .catalogue()
                        .iter()
                        .map(|s| s.name.clone())
                        .collect();
                    anyhow::bail!("no stream named {name:?} (streams: {})", names.join(", "));
                }
                eprintln!("ott-client: no stream named {name:?}; still watching the current one");
            }
            ClientEvent::NoPop => {
                tracing::warn!("{}", crate::progress::no_pop_hint(&self.client.status()))
            }
            ClientEvent::Refused(reason) => tracing::warn!(%reason, "PoP refused a request"),
            ClientEvent::Session { pop, key } => {
                tracing::debug!(%pop, "admitted: session key received");
                self.data.add_session(key);
            }
        }
        Ok(())
    }

    fn on_datagram(&mut self, d: Datagram) -> anyhow::Result<()> {
        if ott_datapath::is_media(&d.bytes) {
            return self.on_media(&d);
        }
        match ott_proto::decode(&d.bytes) {
            Ok(msg) => self.client.handle(d.at, d.from, msg),
            Err(e) => {
                add(&self.counters.malformed, 1);
                tracing::debug!(from = %d.from, error = %e, "dropping undecodable datagram");
            }
        }
        Ok(())
    }

    fn on_media(&mut self, d: &Datagram) -> anyhow::Result<()> {
        // Nothing a PoP did not send to us is ever written: the core checks the session
        // tag first, then takes only the stream watched, once, from one source.
        let accepted = match self.data.handle_media(d.at, Some(d.from), &d.bytes, 0) {
            Ok(a) => a,
            Err(DropReason::Auth) => {
                add(&self.counters.unauthenticated, 1);
                tracing::debug!(from = %d.from, "media datagram without a valid session tag");
                return Ok(());
            }
            Err(DropReason::Malformed) => {
                add(&self.counters.malformed, 1);
                tracing::debug!(from = %d.from, "malformed media datagram");
                return Ok(());
            }
            Err(DropReason::Unrouted) => {
                if self.watching.is_some() {
                    self.rec.stale += 1;
                }
                add(&self.counters.dropped, 1);
                return Ok(());
            }
            Err(DropReason::Duplicate) => {
                add(&self.counters.duplicates, 1);
                return Ok(());
            }
            Err(DropReason::OtherSource) => {
                add(&self.counters.dropped, 1);
                return Ok(());
            }
        };
        while let Some(ev) = self.data.poll_event() {
            if let DataPathEvent::SourceSwitched { .. } = ev {
                // Another server's copy: its frame numbers are unrelated to the old ones.
                tracing::info!(stream = %self.rec.stream.as_deref().unwrap_or("?"), "stream source changed");
                self.playout.reset();
                self.rec.source_switches += 1;
                // A TS copy from another server continues from its next keyframe.
                self.waiting_key = true;
            }
        }
        self.client.media_received(d.at);
        if let Some(last) = self.last_packet {
            let gap = d.at.saturating_duration_since(last).as_millis() as u64;
            self.rec.longest_packet_gap_ms = self.rec.longest_packet_gap_ms.max(gap);
        }
        self.last_packet = Some(d.at);
        let body = d.bytes.get(HEADER_LEN..accepted.len).unwrap_or_default();
        self.playout.push(d.at, &accepted.header, body);
        self.recover(d.at.max(Instant::now()))
    }

    /// Play what the playout buffer releases, and NACK what is missing.
    fn recover(&mut self, now: Instant) -> anyhow::Result<()> {
        let before = self.playout.stats().incomplete_dropped;
        while let Some(frame) = self.playout.poll_frame(now) {
            self.on_frame(frame)?;
        }
        self.rec.incomplete += self.playout.stats().incomplete_dropped - before;
        self.data.handle_timeout(now);
        let data_port = self.sock.local_addr().map(|a| a.port()).unwrap_or(0);
        while let Some(t) = self.data.poll_transmit() {
            // A viewer forwards nothing: what the core queues are its NACKs.
            if let Payload::Nack { stream, ranges } = t.payload {
                self.rec.nacks += 1;
                send_msg(
                    &self.sock,
                    &self.counters,
                    t.to,
                    &Message::Nack {
                        stream,
                        data_port,
                        ranges,
                    },
                );
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: Frame) -> anyhow::Result<()> {
        let Some(watching) = &self.watching else {
            return Ok(());
        };
        let now = Instant::now();
        let since =
            |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t).as_millis() as u64);
        let key = frame.flags & flags::KEYFRAME != 0;
        if key && frame.flags & flags::CACHED == 0 && self.rec.first_live_key_ms.is_none() {
            self.rec.first_live_key_ms = since(self.selected_at);
        }
        if self.waiting_key && !key {
            self.rec.skipped_to_key += 1;
            return Ok(());
        }
        if self.waiting_key {
            self.waiting_key = false;
            self.rec.first_frame_ms = since(self.selected_at);
            tracing::info!(stream = %watching.name, first_frame_ms = self.rec.first_frame_ms.unwrap_or_default(),
                cached = frame.flags & flags::CACHED != 0, "first frame");
        }
        if let Some(last) = self.last_frame {
            let gap = now.duration_since(last);
            if gap > STALL {
                self.rec.stalls += 1;
                tracing::info!(gap_ms = gap.as_millis() as u64, "stall");
            }
            self.rec.longest_gap_ms = self.rec.longest_gap_ms.max(gap.as_millis() as u64);
        }
        self.last_frame = Some(now);
        self.rec.frames += 1;
        self.rec.bytes += frame.data.len() as u64;
        if let Some(sinks) = &mut self.sinks {
            sinks.write_frame(&frame.data)?;
        }
        if let Some(hub) = &self.hub {
            hub.frame(&frame.data, key);
        }
        Ok(())
    }
}
