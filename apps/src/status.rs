//! The `--status` HTTP endpoint: `GET /status` (JSON) and `GET /metrics` (Prometheus),
//! served by [`crate::httpd`] within its default [`Limits`]. `/metrics` has the
//! program's counters, then the per-node, per-route, per-neighbour, per-stream and
//! per-viewer series drawn from the `/status` document ([`status_metrics`]), then the
//! counters of the HTTP servers of the program (`ott_http_*_total{server="..."}`).
//!
//! Every label value goes through [`label_value`] (escaped as the text format wants,
//! cut to [`MAX_LABEL_CHARS`]), and every family has at most [`MAX_SERIES`] series, so
//! names from the network can neither break the format nor grow it without bound.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::httpd::{self, HttpResponse, HttpStats, Limits, Router};

/// What the endpoint serves; called on a connection thread for each request.
pub trait StatusSource: Send + Sync + 'static {
    /// The JSON document of `GET /status`.
    fn status(&self) -> serde_json::Value;
    /// The Prometheus text of `GET /metrics`.
    fn metrics(&self) -> String;
    /// Other HTTP servers of the program whose counters `/metrics` shows too.
    fn http_stats(&self) -> Vec<Arc<HttpStats>> {
        Vec::new()
    }
}

/// Start the HTTP endpoint on `addr` in background threads. Returns the bound address
/// (useful with port 0).
pub fn serve(addr: SocketAddr, source: Arc<dyn StatusSource>) -> anyhow::Result<SocketAddr> {
    let server = serve_with(addr, source, Limits::default())?;
    let bound = server.local_addr();
    tracing::info!(%bound, "status endpoint listening");
    Ok(bound)
}

/// [`serve`] within `limits`, returning the server (its counters, and a way to stop it).
pub fn serve_with(
    addr: SocketAddr,
    source: Arc<dyn StatusSource>,
    limits: Limits,
) -> anyhow::Result<httpd::Server> {
    let stats = Arc::new(HttpStats::new("status"));
    httpd::serve(addr, router(source, stats.clone()), limits, stats)
}

fn router(source: Arc<dyn StatusSource>, stats: Arc<HttpStats>) -> Router {
    let for_status = source.clone();
    Router::new()
        .get("/status", move |_| {
            let body =
                serde_json::to_string_pretty(&for_status.status()).unwrap_or_else(|_| "{}".into());
            HttpResponse::new(200, "application/json", body).into()
        })
        .get("/metrics", move |_| {
            let mut text = source.metrics();
            text.push_str(&status_metrics(&source.status()));
            let others = source.http_stats();
            let mut servers: Vec<&HttpStats> = vec![&stats];
            servers.extend(others.iter().map(|s| s.as_ref()));
            text.push_str(&httpd::prometheus(&servers));
            HttpResponse::new(200, "text/plain; version=0.0.4", text).into()
        })
}

/// Most series in one metric family of [`status_metrics`]; more are left out (and a
/// comment line says how many).
pub const MAX_SERIES: usize = 256;
/// Longest label value, in characters; longer values are cut.
pub const MAX_LABEL_CHARS: usize = 64;

/// `v` as a label value of the Prometheus text format (without the quotes): backslash,
/// double quote and line feed escaped, cut to [`MAX_LABEL_CHARS`] characters.
pub fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len().min(MAX_LABEL_CHARS) + 2);
    for c in v.chars().take(MAX_LABEL_CHARS) {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One metric family of the text format, filled sample by sample.
#[derive(Debug, Clone)]
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<String>,
    seen: std::collections::HashSet<String>,
    left_out: usize,
}

impl Family {
    /// A counter (its name ends in `_total`).
    pub fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, "counter")
    }

    /// A gauge.
    pub fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, "gauge")
    }

    fn new(name: &'static str, help: &'static str, kind: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
            seen: std::collections::HashSet::new(),
            left_out: 0,
        }
    }

    /// Add a sample; label values are escaped here. Past [`MAX_SERIES`] samples, or
    /// when its labels (as cut) are those of an earlier sample, it is only counted.
    pub fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label_value(v)))
            .collect();
        let key = labels.join(",");
        if self.samples.len() >= MAX_SERIES || self.seen.contains(&key) {
            self.left_out += 1;
            return;
        }
        self.seen.insert(key);
        // `{}` of an f64 is a valid sample value: `3`, `0.25`, `NaN`, `inf`.
        let value = if value.is_infinite() {
            if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
        } else {
            format!("{value}")
        };
        self.samples
            .push(format!("{}{{{}}} {value}\n", self.name, labels.join(",")));
    }

    /// Append the family (nothing if it has no sample).
    pub fn render(&self, out: &mut String) {
        if self.samples.is_empty() {
            return;
        }
        out.push_str(&format!(
            "# HELP {} {}.\n# TYPE {} {}\n",
            self.name, self.help, self.name, self.kind
        ));
        for s in &self.samples {
            out.push_str(s);
        }
        if self.left_out > 0 {
            out.push_str(&format!("# {} more series left out\n", self.left_out));
        }
    }
}

fn num(v: &serde_json::Value) -> Option<f64> {
    v.as_f64()
}

fn ms_to_s(v: &serde_json::Value) -> Option<f64> {
    v.as_f64().map(|ms| ms / 1000.0)
}

fn render_all(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        f.render(&mut out);
    }
    out
}

/// The series drawn from a program's `/status` document: a viewer's (role `client`) or
/// an overlay node's. Fields the document lacks give no series.
pub fn status_metrics(status: &serde_json::Value) -> String {
    if status["role"] == "client" {
        viewer_metrics(status)
    } else if status["id"].is_string() {
        node_metrics(status)
    } else {
        String::new()
    }
}

fn node_metrics(st: &serde_json::Value) -> String {
    let node = st["id"].as_str().unwrap_or_default();
    let n = [("node", node)];
    let mut info = Family::gauge("ott_node_info", "The node and its role (always 1)");
    info.add(
        &[("node", node), ("role", st["role"].as_str().unwrap_or("?"))],
        1.0,
    );
    let mut has_route = Family::gauge(
        "ott_node_route_up",
        "1 if the node has a route to a server (a server always does)",
    );
    let routed = st["role"] == "server" || !st["parent"].is_null();
    has_route.add(&n, if routed { 1.0 } else { 0.0 });
    let mut hops = Family::gauge("ott_node_hops", "Hops from the node's best server");
    let mut latency = Family::gauge(
        "ott_node_latency_seconds",
        "Accumulated one-way latency from the node's best server",
    );
    if let Some(h) = num(&st["hops"]) {
        hops.add(&n, h);
    }
    if let Some(l) = ms_to_s(&st["latency_ms"]) {
        latency.add(&n, l);
    }
    let mut route_hops = Family::gauge("ott_route_hops", "Hops from each known server");
    let mut route_latency = Family::gauge(
        "ott_route_latency_seconds",
        "Accumulated one-way latency from each known server",
    );
    for r in st["servers"].as_array().into_iter().flatten() {
        let server = r["server"].as_str().unwrap_or_default();
        let l = [("node", node), ("server", server)];
        if let Some(h) = num(&r["hops"]) {
            route_hops.add(&l, h);
        }
        if let Some(v) = ms_to_s(&r["latency_ms"]) {
            route_latency.add(&l, v);
        }
    }
    let mut nb_up = Family::gauge(
        "ott_neighbour_up",
        "1 if the overlay neighbour answers heartbeats",
    );
    let mut nb_rtt = Family::gauge(
        "ott_neighbour_rtt_seconds",
        "Smoothed heartbeat round-trip time to the overlay neighbour",
    );
    let mut nb_loss = Family::gauge(
        "ott_neighbour_loss_ratio",
        "Fraction of the last 50 heartbeats to the overlay neighbour not acknowledged",
    );
    let mut nb_sent = Family::counter(
        "ott_neighbour_heartbeats_sent_total",
        "Heartbeats sent to the overlay neighbour",
    );
    let mut nb_acked = Family::counter(
        "ott_neighbour_heartbeats_acked_total",
        "Heartbeats to the overlay neighbour that it acknowledged",
    );
    for nb in st["neighbours"].as_array().into_iter().flatten() {
        let id = nb["id"].as_str().unwrap_or_default();
        let l = [("node", node), ("neighbour", id)];
        nb_up.add(&l, if nb["alive"] == true { 1.0 } else { 0.0 });
        if let Some(v) = ms_to_s(&nb["rtt_ms"]) {
            nb_rtt.add(&l, v);
        }
        if let Some(v) = num(&nb["loss"]) {
            nb_loss.add(&l, v);
        }
        if let Some(v) = num(&nb["heartbeats_sent"]) {
            nb_sent.add(&l, v);
        }
        if let Some(v) = num(&nb["heartbeats_acked"]) {
            nb_acked.add(&l, v);
        }
    }
    let mut receiving = Family::gauge(
        "ott_stream_receiving",
        "1 if the node receives the stream from a parent (0 at its server or when idle)",
    );
    let mut children = Family::gauge(
        "ott_stream_children",
        "Overlay nodes the node forwards the stream to",
    );
    let mut viewers = Family::gauge("ott_stream_viewers", "Viewers the node sends the stream to");
    let traffic_rows: [(&str, &'static str, &'static str); 12] = [
        (
            "packets_in",
            "ott_stream_datagrams_received_total",
            "Media datagrams of the stream received (duplicates included)",
        ),
        (
            "packets_out",
            "ott_stream_datagrams_sent_total",
            "Media datagrams of the stream sent to children and viewers",
        ),
        (
            "duplicates",
            "ott_stream_duplicates_total",
            "Duplicate media datagrams of the stream dropped",
        ),
        (
            "nacks_sent",
            "ott_stream_nacks_sent_total",
            "NACKs for the stream sent upstream",
        ),
        (
            "retransmitted",
            "ott_stream_retransmitted_total",
            "Datagrams of the stream resent answering children's NACKs",
        ),
        (
            "given_up",
            "ott_stream_lost_total",
            "Missing datagrams of the stream given up (not recovered in time)",
        ),
        (
            "bytes_in",
            "ott_stream_bytes_received_total",
            "Bytes of media datagrams of the stream received",
        ),
        (
            "frames_in",
            "ott_stream_frames_received_total",
            "Frames of the stream received (first fragments)",
        ),
        (
            "other_source",
            "ott_stream_other_source_total",
            "Datagrams of another source of the stream dropped (source lock)",
        ),
        (
            "nacks_received",
            "ott_stream_nacks_received_total",
            "NACKs for the stream received from children",
        ),
        (
            "nacks_answered",
            "ott_stream_nacks_answered_total",
            "NACKs from children answered with a retransmission",
        ),
        (
            "nacks_relayed",
            "ott_stream_nacks_relayed_total",
            "Children's NACKs for datagrams from before the node had the stream, passed upstream",
        ),
    ];
    let mut traffic: Vec<Family> = traffic_rows
        .iter()
        .map(|(_, name, help)| Family::counter(name, help))
        .collect();
    let mut node_viewers = std::collections::BTreeSet::new();
    for (name, s) in st["streams"].as_object().into_iter().flatten() {
        let l = [("node", node), ("stream", name.as_str())];
        receiving.add(&l, if s["upstream"].is_null() { 0.0 } else { 1.0 });
        let (mut nodes, mut clients) = (0u32, 0u32);
        for c in s["children"].as_array().into_iter().flatten() {
            match c.as_str().and_then(|c| c.strip_prefix("client@")) {
                Some(addr) => {
                    clients += 1;
                    if node_viewers.len() < MAX_SERIES {
                        node_viewers.insert(addr.to_owned());
                    }
                }
                None => nodes += 1,
            }
        }
        children.add(&l, f64::from(nodes));
        viewers.add(&l, f64::from(clients));
        for ((key, _, _), fam) in traffic_rows.iter().zip(traffic.iter_mut()) {
            if let Some(v) = num(&s["traffic"][key]) {
                fam.add(&l, v);
            }
        }
    }
    let mut total_viewers = Family::gauge("ott_node_viewers", "Viewers attached to the node");
    total_viewers.add(&n, node_viewers.len() as f64);
    // Drops by reason: the program's counters, then the tree's own (`tree_stats`).
    let mut drops = Family::counter(
        "ott_drops_total",
        "Datagrams or messages dropped, by reason",
    );
    for (key, reason) in [
        ("malformed", "malformed"),
        ("duplicates", "duplicate"),
        ("send_errors", "send_error"),
        ("auth_failed", "auth_failed"),
        ("dropped", "policy"),
        ("unrouted", "unrouted"),
        ("stream_cap", "stream_cap"),
        ("resend_budget", "resend_budget"),
    ] {
        if let Some(v) = num(&st["counters"][key]) {
            drops.add(&[("node", node), ("reason", reason)], v);
        }
    }
    for (key, reason) in [
        ("malformed", "bad_message"),
        ("unknown_sender", "unknown_sender"),
        ("ignored", "ignored"),
        ("seq_too_far", "seq_too_far"),
    ] {
        if let Some(v) = num(&st["tree_stats"][key]) {
            drops.add(&[("node", node), ("reason", reason)], v);
        }
    }
    // The neighbour table's refusals, where the program reports them (`liveness`).
    for (key, reason) in [
        ("unknown_sender", "unknown_neighbour"),
        ("refused_incarnation", "refused_incarnation"),
    ] {
        if let Some(v) = num(&st["liveness"][key]) {
            drops.add(&[("node", node), ("reason", reason)], v);
        }
    }
    let mut parent_changes = Family::counter(
        "ott_parent_changes_total",
        "Parent changes of the node, all servers together (failovers included)",
    );
    if let Some(v) = num(&st["tree_stats"]["parent_changes"]) {
        parent_changes.add(&n, v);
    }
    let mut failovers = Family::counter(
        "ott_failovers_total",
        "Parent changes away from a parent declared dead, to another parent",
    );
    if let Some(v) = num(&st["tree_stats"]["failovers"]) {
        failovers.add(&n, v);
    }
    let mut routes_lost = Family::counter(
        "ott_routes_lost_total",
        "Routes to a server lost (the parent went and no other neighbour offered one)",
    );
    if let Some(v) = num(&st["tree_stats"]["routes_lost"]) {
        routes_lost.add(&n, v);
    }
    // Admission of viewers (PoPs): cookies, then each ViewerJoin by its result.
    let mut cookies = Family::counter(
        "ott_admission_cookies_sent_total",
        "Return-routability cookies sent to viewers",
    );
    if let Some(v) = num(&st["tree_stats"]["cookies_out"]) {
        cookies.add(&n, v);
    }
    let mut joins = Family::counter(
        "ott_admission_joins_total",
        "Viewer joins, by result (admitted, bad_cookie, not_pop, stream_full, ip_full)",
    );
    for (key, result) in [
        ("viewer_joins", "admitted"),
        ("bad_cookie", "bad_cookie"),
        ("viewer_not_pop", "not_pop"),
        ("viewer_cap_stream", "stream_full"),
        ("viewer_cap_ip", "ip_full"),
    ] {
        if let Some(v) = num(&st["tree_stats"][key]) {
            joins.add(&[("node", node), ("result", result)], v);
        }
    }
    let mut families = vec![
        info,
        has_route,
        hops,
        latency,
        route_hops,
        route_latency,
        nb_up,
        nb_rtt,
        nb_loss,
        nb_sent,
        nb_acked,
        receiving,
        children,
        viewers,
        total_viewers,
    ];
    families.extend(traffic);
    families.extend([
        drops,
        parent_changes,
        failovers,
        routes_lost,
        cookies,
        joins,
    ]);
    render_all(&families)
}

fn viewer_metrics(st: &serde_json::Value) -> String {
    let client = st["id"].as_str().unwrap_or("client");
    let c = [("client", client)];
    let rec = &st["reception"];
    let rows: [(&str, &'static str, &'static str); 7] = [
        ("frames", "ott_viewer_frames_total", "Whole frames written"),
        (
            "bytes",
            "ott_viewer_bytes_total",
            "Bytes of whole frames written",
        ),
        (
            "stalls",
            "ott_viewer_stalls_total",
            "Gaps between frames longer than a stall",
        ),
        (
            "pop_switches",
            "ott_viewer_pop_switches_total",
            "PoP changes after the first choice",
        ),
        (
            "stream_switches",
            "ott_viewer_stream_switches_total",
            "Stream switches",
        ),
        (
            "incomplete",
            "ott_viewer_incomplete_frames_total",
            "Incomplete frames dropped",
        ),
        (
            "nacks",
            "ott_viewer_nacks_sent_total",
            "NACKs sent to the PoP",
        ),
    ];
    let mut families: Vec<Family> = Vec::new();
    for (key, name, help) in rows {
        let mut f = Family::counter(name, help);
        if let Some(v) = num(&rec[key]) {
            f.add(&c, v);
        }
        families.push(f);
    }
    let mut gap = Family::gauge(
        "ott_viewer_longest_gap_seconds",
        "Longest gap between two frames written",
    );
    if let Some(v) = ms_to_s(&rec["longest_gap_ms"]) {
        gap.add(&c, v);
    }
    let mut first = Family::gauge(
        "ott_viewer_first_frame_seconds",
        "From the last stream selection to the first frame written",
    );
    if let Some(v) = ms_to_s(&rec["first_frame_ms"]) {
        first.add(&c, v);
    }
    let mut watching = Family::gauge(
        "ott_viewer_watching",
        "The stream watched and the PoP in use (always 1)",
    );
    let stream = rec["stream"].as_str().or(st["stream"].as_str());
    let pop = rec["pop"].as_str().or(st["pop"].as_str());
    if let (Some(stream), Some(pop)) = (stream, pop) {
        watching.add(&[("client", client), ("stream", stream), ("pop", pop)], 1.0);
    }
    let mut pop_rtt = Family::gauge(
        "ott_viewer_pop_rtt_seconds",
        "Smoothed probe round-trip time to each PoP",
    );
    let mut pop_loss = Family::gauge(
        "ott_viewer_pop_loss_ratio",
        "Fraction of recent probes to each PoP that were lost",
    );
    let mut pop_usable = Family::gauge(
        "ott_viewer_pop_usable",
        "1 if the viewer would attach to the PoP",
    );
    for p in st["pops"].as_array().into_iter().flatten() {
        let l = [
            ("client", client),
            ("pop", p["id"].as_str().unwrap_or_default()),
        ];
        if let Some(v) = ms_to_s(&p["rtt_ms"]) {
            pop_rtt.add(&l, v);
        }
        if let Some(v) = num(&p["loss"]) {
            pop_loss.add(&l, v);
        }
        pop_usable.add(&l, if p["usable"] == true { 1.0 } else { 0.0 });
    }
    let mut fps = Family::gauge(
        "ott_viewer_fps",
        "Frames written a second, over the last half second",
    );
    if let Some(v) = num(&rec["fps"]) {
        fps.add(&c, v);
    }
    families.extend([fps, gap, first, watching, pop_rtt, pop_loss, pop_usable]);
    render_all(&families)
}

/// One sample of a parsed exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels in order, values unescaped.
    pub labels: Labels,
    /// Value.
    pub value: f64,
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

/// Labels of a sample, in order.
type Labels = Vec<(String, String)>;

fn parse_labels(mut s: &str, line: usize) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = s
            .find('=')
            .ok_or(format!("line {line}: label without '='"))?;
        let name = s[..eq].trim();
        if !is_name(name, false) {
            return Err(format!("line {line}: bad label name {name:?}"));
        }
        let mut rest = s[eq + 1..]
            .strip_prefix('"')
            .ok_or(format!("line {line}: label value not quoted"))?
            .chars();
        let mut value = String::new();
        loop {
            match rest.next() {
                None => return Err(format!("line {line}: unterminated label value")),
                Some('"') => break,
                Some('\\') => match rest.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("line {line}: bad escape \\{other:?}")),
                },
                Some(c) => value.push(c),
            }
        }
        labels.push((name.to_owned(), value));
        s = rest.as_str().trim_start();
        if let Some(r) = s.strip_prefix(',') {
            s = r;
        } else if !s.starts_with('}') {
            return Err(format!("line {line}: expected ',' or '}}' after a label"));
        }
    }
}

/// Parse Prometheus text exposition format (version 0.0.4) strictly: metric and label
/// names, quoted label values with their three escapes, sample values, `# HELP` and
/// `# TYPE` lines (one of each at most per family, `TYPE` before the family's samples),
/// each family's samples together, counters named `*_total`, no series twice. For
/// tests of every `/metrics`; the error names the line.
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    use std::collections::{HashMap, HashSet};
    let mut samples: Vec<Sample> = Vec::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if let Some(c) = raw.strip_prefix('#') {
            let mut words = c.trim_start().splitn(3, ' ');
            match words.next() {
                Some("HELP") => {
                    let name = words.next().unwrap_or_default();
                    if !is_name(name, true) || !helps.insert(name.to_owned()) {
                        return Err(format!("line {line}: bad or repeated HELP for {name:?}"));
                    }
                }
                Some("TYPE") => {
                    let name = words.next().unwrap_or_default();
                    let kind = words.next().unwrap_or_default().trim();
                    if !is_name(name, true)
                        || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                    {
                        return Err(format!("line {line}: bad TYPE line"));
                    }
                    if types.insert(name.to_owned(), kind.to_owned()).is_some()
                        || samples.iter().any(|s| s.name == name)
                    {
                        return Err(format!("line {line}: TYPE of {name} repeated or late"));
                    }
                    if kind == "counter" && !name.ends_with("_total") {
                        return Err(format!("line {line}: counter {name} not named *_total"));
                    }
                }
                _ => {}
            }
            continue;
        }
        let end = raw
            .find(['{', ' '])
            .ok_or(format!("line {line}: a sample without a value"))?;
        let name = &raw[..end];
        if !is_name(name, true) {
            return Err(format!("line {line}: bad metric name {name:?}"));
        }
        let (labels, rest) = match raw[end..].strip_prefix('{') {
            Some(r) => parse_labels(r, line)?,
            None => (Vec::new(), &raw[end..]),
        };
        let mut parts = rest.split_whitespace();
        let value = match parts.next() {
            Some("+Inf") => f64::INFINITY,
            Some("-Inf") => f64::NEG_INFINITY,
            Some(v) => v
                .parse::<f64>()
                .map_err(|_| format!("line {line}: bad value {v:?}"))?,
            None => return Err(format!("line {line}: no value")),
        };
        if let Some(ts) = parts.next() {
            ts.parse::<i64>()
                .map_err(|_| format!("line {line}: bad timestamp"))?;
        }
        if parts.next().is_some() {
            return Err(format!("line {line}: trailing text"));
        }
        if name != current {
            if !current.is_empty() {
                finished.insert(std::mem::take(&mut current));
            }
            if finished.contains(name) {
                return Err(format!("line {line}: samples of {name} are not together"));
            }
            current = name.to_owned();
        }
        let key = format!("{name}{labels:?}");
        if !series.insert(key) {
            return Err(format!("line {line}: series repeated"));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ott_tree::{NeighbourStatus, NodeStatus, RouteStatus, StreamStatus};

    const EVIL: &str = "evil\"} 1\n# TYPE x counter\nx{a=\"\\";

    fn node_status() -> serde_json::Value {
        let st = NodeStatus {
            id: "p1".into(),
            role: "pop".into(),
            parent: Some("r1".into()),
            path: vec!["s1".into(), "r1".into(), "p1".into()],
            latency_ms: Some(2.5),
            hops: Some(2),
            neighbours: vec![NeighbourStatus {
                id: "r1".into(),
                alive: true,
                rtt_ms: Some(0.5),
            }],
            streams: [
                (
                    "news".to_string(),
                    StreamStatus {
                        id: 1,
                        upstream: Some("r1".into()),
                        children: vec!["client@127.0.0.1:5000".into(), "p2".into()],
                    },
                ),
                (
                    EVIL.to_string(),
                    StreamStatus {
                        id: 2,
                        upstream: None,
                        children: vec![],
                    },
                ),
            ]
            .into_iter()
            .collect(),
            servers: vec![RouteStatus {
                server: "s1".into(),
                parent: Some("r1".into()),
                path: vec![],
                latency_ms: Some(2.5),
                hops: Some(2),
            }],
        };
        let mut v = serde_json::to_value(st).expect("serializes");
        v["counters"] = serde_json::to_value(crate::counters::CounterSnapshot {
            malformed: 3,
            ..Default::default()
        })
        .expect("serializes");
        v["tree_stats"] = serde_json::json!({"parent_changes": 4, "unknown_sender": 1,
            "failovers": 2, "routes_lost": 1, "cookies_out": 7, "viewer_joins": 5, "bad_cookie": 3});
        v["neighbours"][0]["loss"] = serde_json::json!(0.04);
        v["neighbours"][0]["heartbeats_sent"] = serde_json::json!(100);
        v["neighbours"][0]["heartbeats_acked"] = serde_json::json!(96);
        v["streams"]["news"]["traffic"] = serde_json::json!({"packets_in": 100, "packets_out": 200, "nacks_sent": 2, "given_up": 0});
        v
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn test_node_series_parse_and_carry_the_status() {
        let text = status_metrics(&node_status());
        let s = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let news = [("node", "p1"), ("stream", "news")];
        assert_eq!(value(&s, "ott_stream_viewers", &news), Some(1.0));
        assert_eq!(value(&s, "ott_stream_children", &news), Some(1.0));
        assert_eq!(value(&s, "ott_stream_receiving", &news), Some(1.0));
        assert_eq!(
            value(&s, "ott_stream_datagrams_sent_total", &news),
            Some(200.0)
        );
        assert_eq!(value(&s, "ott_stream_nacks_sent_total", &news), Some(2.0));
        let r1 = [("node", "p1"), ("neighbour", "r1")];
        assert_eq!(value(&s, "ott_neighbour_up", &r1), Some(1.0));
        assert_eq!(value(&s, "ott_neighbour_rtt_seconds", &r1), Some(0.0005));
        assert_eq!(value(&s, "ott_neighbour_loss_ratio", &r1), Some(0.04));
        assert_eq!(
            value(&s, "ott_neighbour_heartbeats_sent_total", &r1),
            Some(100.0)
        );
        assert_eq!(
            value(&s, "ott_neighbour_heartbeats_acked_total", &r1),
            Some(96.0)
        );
        let p1 = [("node", "p1")];
        assert_eq!(value(&s, "ott_failovers_total", &p1), Some(2.0));
        assert_eq!(value(&s, "ott_routes_lost_total", &p1), Some(1.0));
        assert_eq!(
            value(&s, "ott_admission_cookies_sent_total", &p1),
            Some(7.0)
        );
        let joins = |r| value(&s, "ott_admission_joins_total", &[("result", r)]);
        assert_eq!(joins("admitted"), Some(5.0));
        assert_eq!(joins("bad_cookie"), Some(3.0));
        assert_eq!(
            value(&s, "ott_node_latency_seconds", &[("node", "p1")]),
            Some(0.0025)
        );
        assert_eq!(value(&s, "ott_route_hops", &[("server", "s1")]), Some(2.0));
        assert_eq!(value(&s, "ott_node_viewers", &[("node", "p1")]), Some(1.0));
        assert_eq!(
            value(&s, "ott_parent_changes_total", &[("node", "p1")]),
            Some(4.0)
        );
        assert_eq!(
            value(&s, "ott_drops_total", &[("reason", "malformed")]),
            Some(3.0)
        );
        assert_eq!(
            value(&s, "ott_drops_total", &[("reason", "unknown_sender")]),
            Some(1.0)
        );
        // The hostile stream name is one label value, unescaped back to what it was.
        assert_eq!(
            value(&s, "ott_stream_receiving", &[("stream", EVIL)]),
            Some(0.0),
            "{text}"
        );
        assert!(!s.iter().any(|x| x.name == "x"), "no forged family");
    }

    #[test]
    fn test_series_per_family_are_capped() {
        let mut st = node_status();
        let streams: serde_json::Map<String, serde_json::Value> = (0..MAX_SERIES + 50)
            .map(|i| {
                (
                    format!("s{i}-{}", "x".repeat(100)),
                    serde_json::json!({"upstream": null, "children": []}),
                )
            })
            .collect();
        st["streams"] = streams.into();
        let text = status_metrics(&st);
        let s = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}"));
        let n = s
            .iter()
            .filter(|x| x.name == "ott_stream_receiving")
            .count();
        assert_eq!(n, MAX_SERIES);
        assert!(text.contains("# 50 more series left out\n"));
        // Long names are cut, so the cut names of two streams may coincide: the second
        // is left out rather than repeating a series.
        let mut st = node_status();
        let long = "y".repeat(MAX_LABEL_CHARS);
        st["streams"] = serde_json::json!({
            format!("{long}-a"): {"upstream": null, "children": []},
            format!("{long}-b"): {"upstream": null, "children": []},
        });
        let text2 = status_metrics(&st);
        let s2 = parse_exposition(&text2).unwrap_or_else(|e| panic!("{e}\n{text2}"));
        assert_eq!(
            s2.iter()
                .filter(|x| x.name == "ott_stream_receiving")
                .count(),
            1
        );
        assert!(s
            .iter()
            .filter(|x| x.name == "ott_stream_receiving")
            .all(|x| x.labels[1].1.chars().count() == MAX_LABEL_CHARS));
    }

    #[test]
    fn test_viewer_series() {
        let st = serde_json::json!({
            "role": "client",
            "pop": "p1",
            "stream": "news",
            "pops": [{"id": "p1", "rtt_ms": 1.5, "loss": 0.25, "usable": true},
                     {"id": "p2", "rtt_ms": null, "loss": 1.0, "usable": false}],
            "reception": {"stream": "news", "pop": "p1", "frames": 250, "bytes": 1000,
                          "stalls": 1, "longest_gap_ms": 300, "pop_switches": 0,
                          "stream_switches": 0, "incomplete": 0, "nacks": 5,
                          "first_frame_ms": 40, "fps": 24.5},
        });
        let text = status_metrics(&st);
        let s = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            value(&s, "ott_viewer_frames_total", &[("client", "client")]),
            Some(250.0)
        );
        assert_eq!(value(&s, "ott_viewer_stalls_total", &[]), Some(1.0));
        assert_eq!(
            value(
                &s,
                "ott_viewer_watching",
                &[("stream", "news"), ("pop", "p1")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "ott_viewer_pop_loss_ratio", &[("pop", "p1")]),
            Some(0.25)
        );
        assert_eq!(
            value(&s, "ott_viewer_pop_usable", &[("pop", "p2")]),
            Some(0.0)
        );
        assert_eq!(
            value(&s, "ott_viewer_pop_rtt_seconds", &[("pop", "p2")]),
            None
        );
        assert_eq!(value(&s, "ott_viewer_longest_gap_seconds", &[]), Some(0.3));
        assert_eq!(
            value(&s, "ott_viewer_fps", &[("client", "client")]),
            Some(24.5)
        );
    }

    #[test]
    fn test_parser_refuses_what_prometheus_refuses() {
        for bad in [
            "a{b=\"c} 1\n",
            "a{b=c} 1\n",
            "a{b=\"\\x\"} 1\n",
            "1a 1\n",
            "a one\n",
            "a 1\nb 1\na 2\n",
            "a 1\na 1\n",
            "# TYPE a counter\na 1\n",
            "# TYPE a_total counter\n# TYPE a_total counter\n",
            "a 1\n# TYPE a gauge\n",
        ] {
            assert!(parse_exposition(bad).is_err(), "{bad:?} accepted");
        }
        let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\\n\"} 1.5e3\nb NaN\nc +Inf 1700000000\n";
        let s = parse_exposition(ok).expect("valid");
        assert_eq!(s[0].labels[0].1, "q\"\\\n");
        assert_eq!(s[0].value, 1500.0);
    }
}
