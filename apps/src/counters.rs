//! Traffic counters shared between a program's threads, and their Prometheus rendering.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one program, updated lock-free by any thread.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received (control and media).
    pub packets_in: AtomicU64,
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Datagrams sent.
    pub packets_out: AtomicU64,
    /// Bytes sent.
    pub bytes_out: AtomicU64,
    /// Datagrams dropped on purpose (no route, duplicate, late, stale stream).
    pub dropped: AtomicU64,
    /// Datagrams that failed to decode.
    pub malformed: AtomicU64,
    /// Datagrams retransmitted.
    pub retransmitted: AtomicU64,
    /// Sends that failed (unreachable, no buffer space, refused); forwarding goes on.
    pub send_errors: AtomicU64,
    /// Media datagrams dropped as duplicates (same stream and sequence number).
    pub duplicates: AtomicU64,
    /// Datagrams refused by the overlay key check (bad or missing tag, replayed
    /// counter), dropped before decoding.
    pub auth_failed: AtomicU64,
    /// Viewer: media datagrams without a valid session tag of a PoP it was admitted
    /// at, dropped unwritten.
    pub unauthenticated: AtomicU64,
    /// Forwarder: media datagrams of a stream not in the forwarding table, dropped
    /// without allocating any state.
    pub unrouted: AtomicU64,
    /// Forwarder: routes refused because the stream cap was reached.
    pub stream_cap: AtomicU64,
    /// Forwarder: retransmissions not sent because the child's byte budget was spent
    /// (also NACKed sequence numbers past the per-NACK cap).
    pub resend_budget: AtomicU64,
    /// Answers not sent to an address that was not admitted because they were bigger
    /// than its request (no reflection amplification; requests are padded).
    pub answer_too_big: AtomicU64,
    /// Data plane: another source's media dropped while the current one flows (also
    /// in `dropped`).
    pub other_source: AtomicU64,
    /// Data plane: children cut from a route at the per-stream or per-address cap.
    pub child_cap: AtomicU64,
    /// Data plane: NACKs ignored (not from a current child of a routed stream; also in
    /// `dropped`).
    pub nacks_refused: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// See [`Counters::packets_in`].
    pub packets_in: u64,
    /// See [`Counters::bytes_in`].
    pub bytes_in: u64,
    /// See [`Counters::packets_out`].
    pub packets_out: u64,
    /// See [`Counters::bytes_out`].
    pub bytes_out: u64,
    /// See [`Counters::dropped`].
    pub dropped: u64,
    /// See [`Counters::malformed`].
    pub malformed: u64,
    /// See [`Counters::retransmitted`].
    pub retransmitted: u64,
    /// See [`Counters::send_errors`].
    pub send_errors: u64,
    /// See [`Counters::duplicates`].
    pub duplicates: u64,
    /// See [`Counters::auth_failed`].
    pub auth_failed: u64,
    /// See [`Counters::unauthenticated`].
    pub unauthenticated: u64,
    /// See [`Counters::unrouted`].
    pub unrouted: u64,
    /// See [`Counters::stream_cap`].
    pub stream_cap: u64,
    /// See [`Counters::resend_budget`].
    pub resend_budget: u64,
    /// See [`Counters::answer_too_big`].
    pub answer_too_big: u64,
    /// Server: live input bytes dropped because the input queue was at its byte cap
    /// ([`crate::live::LIVE_QUEUE_BYTES`], for the whole process).
    pub live_input_dropped: u64,
    /// See [`Counters::other_source`].
    pub other_source: u64,
    /// See [`Counters::child_cap`].
    pub child_cap: u64,
    /// See [`Counters::nacks_refused`].
    pub nacks_refused: u64,
}

/// Add `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// Count one received datagram of `len` bytes.
    pub fn rx(&self, len: usize) {
        add(&self.packets_in, 1);
        add(&self.bytes_in, len as u64);
    }

    /// Count one sent datagram of `len` bytes.
    pub fn tx(&self, len: usize) {
        add(&self.packets_out, 1);
        add(&self.bytes_out, len as u64);
    }

    /// Copy every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            packets_in: g(&self.packets_in),
            bytes_in: g(&self.bytes_in),
            packets_out: g(&self.packets_out),
            bytes_out: g(&self.bytes_out),
            dropped: g(&self.dropped),
            malformed: g(&self.malformed),
            retransmitted: g(&self.retransmitted),
            send_errors: g(&self.send_errors),
            duplicates: g(&self.duplicates),
            auth_failed: g(&self.auth_failed),
            unauthenticated: g(&self.unauthenticated),
            unrouted: g(&self.unrouted),
            stream_cap: g(&self.stream_cap),
            resend_budget: g(&self.resend_budget),
            answer_too_big: g(&self.answer_too_big),
            live_input_dropped: crate::live::dropped_bytes(),
            other_source: g(&self.other_source),
            child_cap: g(&self.child_cap),
            nacks_refused: g(&self.nacks_refused),
        }
    }
}

impl CounterSnapshot {
    /// Render as Prometheus text exposition format, labelled with the node id.
    pub fn to_prometheus(&self, id: &str) -> String {
        let rows: [(&str, &str, u64); 19] = [
            ("packets_in", "Datagrams received", self.packets_in),
            ("bytes_in", "Bytes received", self.bytes_in),
            ("packets_out", "Datagrams sent", self.packets_out),
            ("bytes_out", "Bytes sent", self.bytes_out),
            ("dropped", "Datagrams dropped on purpose", self.dropped),
            (
                "malformed",
                "Datagrams that failed to decode",
                self.malformed,
            ),
            (
                "retransmitted",
                "Datagrams retransmitted",
                self.retransmitted,
            ),
            ("send_errors", "Failed sends", self.send_errors),
            (
                "duplicates",
                "Duplicate media datagrams dropped",
                self.duplicates,
            ),
            (
                "auth_failed",
                "Datagrams refused by the overlay key check",
                self.auth_failed,
            ),
            (
                "unauthenticated",
                "Media datagrams without a valid viewer session tag, not written",
                self.unauthenticated,
            ),
            (
                "unrouted",
                "Media datagrams of a stream not in the forwarding table",
                self.unrouted,
            ),
            (
                "stream_cap",
                "Routes refused at the stream cap",
                self.stream_cap,
            ),
            (
                "resend_budget",
                "Retransmissions refused by the per-child byte budget or NACK cap",
                self.resend_budget,
            ),
            (
                "answer_too_big",
                "Answers to an unadmitted address not sent, bigger than the request",
                self.answer_too_big,
            ),
            (
                "live_input_dropped",
                "Live input bytes dropped at the input queue's byte cap",
                self.live_input_dropped,
            ),
            (
                "other_source",
                "Media of another source dropped while the current one flows",
                self.other_source,
            ),
            (
                "child_cap",
                "Children cut from a route at the per-stream or per-address cap",
                self.child_cap,
            ),
            (
                "nacks_refused",
                "NACKs ignored: not from a current child of a routed stream",
                self.nacks_refused,
            ),
        ];
        let id = crate::status::label_value(id);
        let mut out = String::new();
        for (name, help, v) in rows {
            out.push_str(&format!(
                "# HELP ott_{name}_total {help}.\n# TYPE ott_{name}_total counter\nott_{name}_total{{node=\"{id}\"}} {v}\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_prometheus_format() {
        let c = Counters::default();
        c.rx(100);
        c.tx(40);
        let text = c.snapshot().to_prometheus("n\"1");
        assert!(text.contains("ott_packets_in_total{node=\"n\\\"1\"} 1\n"));
        assert!(text.contains("ott_bytes_out_total{node=\"n\\\"1\"} 40\n"));
        assert!(text.contains("# TYPE ott_malformed_total counter"));
    }
}
