//! Batched UDP I/O for the data plane: many datagrams per system call with
//! `recvmmsg`/`sendmmsg` on Linux, one per call elsewhere.
//!
//! Where the kernel supports it, a run of datagrams of one size to one destination leaves
//! as one message with generic segmentation offload (`UDP_SEGMENT`): the kernel (or the
//! NIC) cuts it into ordinary datagrams of that size, so a receiver without offload reads
//! the same datagrams as before. On receive, generic receive offload (`UDP_GRO`) may hand
//! over several datagrams of one sender in one buffer with their segment size;
//! [`RecvBatch`] splits them again, so callers see one entry per datagram either way.
//! Support is probed once per process ([`offload`]); without it (or with the environment
//! variable `OTT_NO_OFFLOAD` set) both fall back to plain `sendmmsg`/`recvmmsg`.
//!
//! The only `unsafe` code of the project lives here: it builds the `mmsghdr` arrays and
//! control messages the calls take, pointing into buffers that outlive each call.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Largest datagram the receive buffers hold (a UDP payload can be larger; longer
/// datagrams are handed on empty, and then rejected by the header parser).
pub const BUF_LEN: usize = 2048;

/// Buffer for one GRO super-datagram: the largest UDP payload plus headroom.
const GRO_BUF_LEN: usize = 65536;

/// Most datagrams in one GSO message (the kernel's `UDP_MAX_SEGMENTS` is 64 before 6.x).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// Most payload bytes in one GSO message (below the 65,507-byte IPv4 UDP limit).
const MAX_GSO_BYTES: usize = 65_000;

/// Room for one control message with an `int` (`CMSG_SPACE(4)` is 24 on 64-bit Linux).
type ControlBuf = [u64; 8];

/// Which UDP offloads this kernel offers (see [`offload`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    /// Segmentation offload on send (`UDP_SEGMENT`, Linux 4.18).
    pub gso: bool,
    /// Receive offload (`UDP_GRO`, Linux 5.0).
    pub gro: bool,
}

static OFFLOAD: OnceLock<Offload> = OnceLock::new();
/// Set when a GSO send failed with `EIO` (a device without checksum offload): from then
/// on every send takes the plain path.
static GSO_BROKEN: AtomicBool = AtomicBool::new(false);

/// The offloads in use, probed once per process on a throwaway socket. The environment
/// variable `OTT_NO_OFFLOAD` (any value) turns both off, for comparison runs.
pub fn offload() -> Offload {
    let o = *OFFLOAD.get_or_init(|| {
        if std::env::var_os("OTT_NO_OFFLOAD").is_some() {
            Offload::default()
        } else {
            probe()
        }
    });
    Offload {
        gso: o.gso && !GSO_BROKEN.load(Ordering::Relaxed),
        gro: o.gro,
    }
}

/// Ask the kernel whether it knows the two socket options.
#[cfg(target_os = "linux")]
fn probe() -> Offload {
    let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
        return Offload::default();
    };
    Offload {
        // Segment size 0 means "no default segmentation": harmless, and refused with
        // ENOPROTOOPT by a kernel without GSO.
        gso: set_udp_opt(&sock, libc::UDP_SEGMENT, 0).is_ok(),
        gro: set_udp_opt(&sock, libc::UDP_GRO, 1).is_ok(),
    }
}

#[cfg(not(target_os = "linux"))]
fn probe() -> Offload {
    Offload::default()
}

#[cfg(target_os = "linux")]
fn set_udp_opt(sock: &UdpSocket, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `val` is a live c_int and the length given is its size; the kernel only
    // reads it.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Turn on UDP GRO for `sock`; whether the kernel accepted it.
pub fn enable_gro(sock: &UdpSocket) -> bool {
    #[cfg(target_os = "linux")]
    {
        set_udp_opt(sock, libc::UDP_GRO, 1).is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = sock;
        false
    }
}

/// Reusable buffers for receiving up to `n` datagrams (or GRO super-datagrams) per call.
pub struct RecvBatch {
    /// `slots` buffers of `slot_len` bytes, back to back.
    buf: Vec<u8>,
    slot_len: usize,
    slots: usize,
    /// The datagrams of the last call: offset in `buf`, length, sender.
    segs: Vec<(usize, usize, Option<SocketAddr>)>,
    gro: bool,
    coalesced: u64,
    #[cfg(target_os = "linux")]
    storage: Vec<libc::sockaddr_storage>,
    #[cfg(target_os = "linux")]
    control: Vec<ControlBuf>,
}

impl RecvBatch {
    /// Buffers for `n` datagrams (at least 1), without GRO.
    pub fn new(n: usize) -> Self {
        Self::with_slots(n, BUF_LEN, false)
    }

    /// Buffers for `n` messages, with UDP GRO turned on for `sock` if the kernel offers
    /// it ([`offload`]). Each buffer then holds a whole super-datagram (64 KiB; the pages
    /// are only touched as far as they are written).
    pub fn with_gro(n: usize, sock: &UdpSocket) -> Self {
        Self::with_offload(n, sock, offload().gro)
    }

    /// As [`RecvBatch::with_gro`], but `gro: false` forces the plain path.
    pub fn with_offload(n: usize, sock: &UdpSocket, gro: bool) -> Self {
        if gro && enable_gro(sock) {
            // A quarter of the messages: each can carry up to 64 datagrams, and a round
            // of a few thousand datagrams times every child is already a large fan-out.
            Self::with_slots(n / 4, GRO_BUF_LEN, true)
        } else {
            Self::new(n)
        }
    }

    fn with_slots(n: usize, slot_len: usize, gro: bool) -> Self {
        let n = n.max(1);
        Self {
            buf: vec![0u8; n * slot_len],
            slot_len,
            slots: n,
            segs: Vec::with_capacity(n),
            gro,
            coalesced: 0,
            #[cfg(target_os = "linux")]
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            storage: vec![unsafe { std::mem::zeroed() }; n],
            #[cfg(target_os = "linux")]
            control: vec![[0; 8]; n],
        }
    }

    /// Whether GRO is on for the socket this batch reads.
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// GRO super-datagrams split so far (each carried two datagrams or more).
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    /// Datagrams received by the last [`RecvBatch::recv`] (super-datagrams split).
    pub fn len(&self) -> usize {
        self.segs.len()
    }

    /// Whether the last call received nothing.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Datagram `i` of the last call and its sender (`None` for an unknown address family).
    pub fn get(&self, i: usize) -> Option<(&[u8], Option<SocketAddr>)> {
        let &(off, len, from) = self.segs.get(i)?;
        Some((self.buf.get(off..off + len)?, from))
    }

    /// Mutable access to datagram `i` of the last call (to set a flag before resending).
    pub fn get_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let &(off, len, _) = self.segs.get(i)?;
        self.buf.get_mut(off..off + len)
    }

    /// Record message `slot` of `len` bytes from `from`, split at `seg` bytes if GRO
    /// coalesced it. A datagram longer than [`BUF_LEN`] (or a truncated one) is not
    /// ours (ours fit 1472 bytes): it is handed on empty, so that the decoders count it
    /// as malformed instead of reading half of it.
    fn push_message(
        &mut self,
        slot: usize,
        len: usize,
        truncated: bool,
        seg: Option<usize>,
        from: Option<SocketAddr>,
    ) {
        let base = slot * self.slot_len;
        let len = len.min(self.slot_len);
        match seg {
            Some(seg) if seg > 0 && len > seg && !truncated => {
                self.coalesced += 1;
                let mut off = 0;
                while off < len {
                    let l = seg.min(len - off);
                    let l = if l > BUF_LEN { 0 } else { l };
                    self.segs.push((base + off, l, from));
                    off += seg;
                }
            }
            _ => {
                let l = if truncated || len > BUF_LEN { 0 } else { len };
                self.segs.push((base, l, from));
            }
        }
    }

    /// Receive at least one datagram (blocking, within the socket's read timeout) and
    /// as many more as are already queued, up to the batch size; returns the number of
    /// datagrams (GRO super-datagrams count as the datagrams they carry).
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.segs.clear();
        let n = self.slots;
        let slot_len = self.slot_len;
        let mut iovs: Vec<libc::iovec> = self
            .buf
            .chunks_exact_mut(slot_len)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: slot_len,
            })
            .collect();
        // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; n];
        for (((m, iov), st), ctl) in msgs
            .iter_mut()
            .zip(iovs.iter_mut())
            .zip(self.storage.iter_mut())
            .zip(self.control.iter_mut())
        {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (st as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            if self.gro {
                m.msg_hdr.msg_control = ctl.as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = std::mem::size_of::<ControlBuf>() as _;
            }
        }
        // SAFETY: every pointer in `msgs` points into `iovs`, `self.buf`, `self.storage`
        // and `self.control`, which live until after the call and are not moved during
        // it; the lengths given are those of the buffers.
        let r = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = r as usize;
        for (i, m) in msgs.iter().take(got).enumerate() {
            let truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let seg = if self.gro {
                gro_segment(&m.msg_hdr)
            } else {
                None
            };
            let from = sockaddr_to_std(&self.storage[i], m.msg_hdr.msg_namelen);
            self.push_message(i, m.msg_len as usize, truncated, seg, from);
        }
        Ok(self.segs.len())
    }

    /// Receive one datagram (platforms without `recvmmsg`).
    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        self.segs.clear();
        let (len, from) = sock.recv_from(&mut self.buf[..self.slot_len])?;
        self.push_message(0, len, false, None, Some(from));
        Ok(1)
    }
}

/// The segment size of a GRO super-datagram, from its `UDP_GRO` control message.
#[cfg(target_os = "linux")]
fn gro_segment(m: &libc::msghdr) -> Option<usize> {
    if m.msg_control.is_null() || m.msg_controllen < std::mem::size_of::<libc::cmsghdr>() as _ {
        return None;
    }
    // SAFETY: after recvmmsg, `msg_control`/`msg_controllen` describe the part of our
    // control buffer the kernel filled; CMSG_FIRSTHDR/CMSG_NXTHDR only return headers
    // inside it (or null), and the data read is the `int` the kernel put after the
    // UDP_GRO header (read unaligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|&s| s > 0);
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    None
}

#[cfg(target_os = "linux")]
fn sockaddr_to_std(st: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: the kernel filled `st` with a socket address of `len` bytes.
    let addr = unsafe { socket2::SockAddr::new(*st, len) };
    addr.as_socket()
}

/// Outcome of [`send_batch`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendOutcome {
    /// Datagrams the kernel accepted.
    pub sent: usize,
    /// Bytes of those datagrams.
    pub bytes: usize,
    /// Datagrams that failed (each failure skips only that datagram, or that GSO run).
    pub failed: usize,
    /// Messages that carried a GSO run of two datagrams or more.
    pub gso_runs: usize,
}

impl SendOutcome {
    /// Add the figures of another send to these.
    pub fn add(&mut self, o: SendOutcome) {
        self.sent += o.sent;
        self.bytes += o.bytes;
        self.failed += o.failed;
        self.gso_runs += o.gso_runs;
    }
}

/// One message of a send: `count` datagrams from position `first` of the send order,
/// cut at `seg` bytes (all but the last are `seg` bytes long; the last may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: usize,
    count: usize,
    seg: usize,
}

/// The send order (indices into `items`) and its runs. Without GSO: the given order,
/// one datagram per message. With GSO: grouped by destination (stable, so each
/// destination gets its datagrams in the given order), then cut into runs of one size.
#[cfg(test)]
fn plan_runs(
    items: &[(&[u8], SocketAddr)],
    gso: bool,
    order: &mut Vec<usize>,
    runs: &mut Vec<Run>,
) {
    plan_runs_in(items, gso, order, runs, &mut Grouping::default());
}

/// What [`plan_runs_in`] needs besides its results, kept between calls.
#[derive(Default)]
struct Grouping {
    ids: std::collections::HashMap<SocketAddr, usize>,
    dest: Vec<usize>,
    next: Vec<usize>,
}

/// [`plan_runs`] with its working memory in `g`.
fn plan_runs_in(
    items: &[(&[u8], SocketAddr)],
    gso: bool,
    order: &mut Vec<usize>,
    runs: &mut Vec<Run>,
    g: &mut Grouping,
) {
    order.clear();
    order.extend(0..items.len());
    runs.clear();
    if !gso {
        runs.extend((0..items.len()).map(|i| Run {
            first: i,
            count: 1,
            seg: items[i].0.len(),
        }));
        return;
    }
    // Counting sort by destination, in order of first appearance: linear in the
    // number of datagrams (a fan-out round can hold hundreds of thousands).
    let Grouping { ids, dest, next } = g;
    ids.clear();
    dest.clear();
    next.clear();
    let mut last: Option<(SocketAddr, usize)> = None;
    dest.extend(items.iter().map(|&(_, a)| match last {
        Some((l, id)) if l == a => id,
        _ => {
            let fresh = ids.len();
            let id = *ids.entry(a).or_insert(fresh);
            last = Some((a, id));
            id
        }
    }));
    next.resize(ids.len() + 1, 0);
    for &d in dest.iter() {
        next[d + 1] += 1;
    }
    for k in 1..next.len() {
        next[k] += next[k - 1];
    }
    for (i, &d) in dest.iter().enumerate() {
        order[next[d]] = i;
        next[d] += 1;
    }
    let mut k = 0;
    while k < order.len() {
        let (d0, to) = items[order[k]];
        let seg = d0.len();
        let mut count = 1;
        let mut bytes = seg;
        while seg > 0 && count < MAX_GSO_SEGMENTS {
            let Some(&next) = order.get(k + count) else {
                break;
            };
            let (d, a) = items[next];
            if a != to || d.is_empty() || d.len() > seg || bytes + d.len() > MAX_GSO_BYTES {
                break;
            }
            count += 1;
            bytes += d.len();
            if d.len() < seg {
                // A shorter datagram can only end a run.
                break;
            }
        }
        runs.push(Run {
            first: k,
            count,
            seg,
        });
        k += count;
    }
}

/// Send every `(datagram, destination)` pair, batching system calls, with GSO where the
/// kernel offers it ([`offload`]). Each destination receives its datagrams in the given
/// order (with GSO, datagrams to different destinations may be reordered among each
/// other). A failed datagram (unreachable, no buffer space, refused) is counted and
/// skipped: the others are still sent.
pub fn send_batch(sock: &UdpSocket, items: &[(&[u8], SocketAddr)]) -> SendOutcome {
    send_batch_with(sock, items, offload().gso)
}

/// As [`send_batch`], with GSO on or off as told (`false` forces the plain path). A GSO
/// message the kernel refuses is sent again as plain datagrams; if it was refused with
/// `EIO` (a device that cannot segment), GSO is off for the rest of the process.
#[cfg(target_os = "linux")]
pub fn send_batch_with(sock: &UdpSocket, items: &[(&[u8], SocketAddr)], gso: bool) -> SendOutcome {
    // The thread's buffers, taken for the call (a nested call for a refused GSO message
    // finds none and makes its own) and put back after: a fan-out round can hold many
    // thousand datagrams, whose arrays would otherwise be allocated and freed per call.
    let mut scratch = SEND_SCRATCH.with(|s| s.take()).unwrap_or_default();
    let out = send_batch_in(sock, items, gso, &mut scratch);
    SEND_SCRATCH.with(|s| s.set(Some(scratch)));
    out
}

/// The arrays of one [`send_batch_with`] call. Between calls the `iovec`s and headers
/// hold stale pointers, which nothing reads: every call clears and refills them.
#[cfg(target_os = "linux")]
#[derive(Default)]
struct SendScratch {
    order: Vec<usize>,
    runs: Vec<Run>,
    grouping: Grouping,
    addrs: Vec<socket2::SockAddr>,
    iovs: Vec<libc::iovec>,
    control: Vec<ControlBuf>,
    msgs: Vec<libc::mmsghdr>,
}

#[cfg(target_os = "linux")]
thread_local! {
    static SEND_SCRATCH: std::cell::Cell<Option<Box<SendScratch>>> =
        const { std::cell::Cell::new(None) };
}

#[cfg(target_os = "linux")]
fn send_batch_in(
    sock: &UdpSocket,
    items: &[(&[u8], SocketAddr)],
    gso: bool,
    scratch: &mut SendScratch,
) -> SendOutcome {
    use std::os::fd::AsRawFd;
    let mut out = SendOutcome::default();
    let SendScratch {
        order,
        runs,
        grouping,
        addrs,
        iovs,
        control,
        msgs,
    } = scratch;
    plan_runs_in(items, gso, order, runs, grouping);
    let (order, runs) = (&*order, &*runs);
    addrs.clear();
    addrs.extend(
        runs.iter()
            .map(|r| socket2::SockAddr::from(items[order[r.first]].1)),
    );
    iovs.clear();
    iovs.extend(order.iter().map(|&i| libc::iovec {
        iov_base: items[i].0.as_ptr() as *mut libc::c_void,
        iov_len: items[i].0.len(),
    }));
    // One control buffer per GSO message only (none on the plain path).
    control.clear();
    control.resize(runs.iter().filter(|r| r.count > 1).count(), [0; 8]);
    let mut ctls = control.iter_mut();
    msgs.clear();
    // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
    msgs.resize(runs.len(), unsafe { std::mem::zeroed() });
    let iov_base = iovs.as_mut_ptr();
    for ((m, r), a) in msgs.iter_mut().zip(runs.iter()).zip(addrs.iter()) {
        m.msg_hdr.msg_iov = iov_base.wrapping_add(r.first);
        m.msg_hdr.msg_iovlen = r.count as _;
        m.msg_hdr.msg_name = a.as_ptr() as *mut libc::c_void;
        m.msg_hdr.msg_namelen = a.len();
        if r.count > 1 {
            if let Some(ctl) = ctls.next() {
                set_segment(&mut m.msg_hdr, ctl, r.seg as u16);
            }
        }
    }
    let mut start = 0;
    while start < msgs.len() {
        let rest = &mut msgs[start..];
        let chunk = rest.len().min(1024);
        // SAFETY: the headers point into `iovs`, `addrs`, `control` and the caller's
        // datagrams, all alive and unmoved for the duration of the call; sendmmsg only
        // reads them.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                rest.as_mut_ptr(),
                chunk as libc::c_uint,
                0,
            )
        };
        if r <= 0 {
            // The first message of this chunk failed.
            let err = io::Error::last_os_error();
            let run = runs[start];
            if run.count > 1 {
                // The kernel refused the GSO message: send its datagrams plainly.
                if err.raw_os_error() == Some(libc::EIO) {
                    GSO_BROKEN.store(true, Ordering::Relaxed);
                }
                let plain: Vec<(&[u8], SocketAddr)> = order[run.first..run.first + run.count]
                    .iter()
                    .map(|&i| items[i])
                    .collect();
                out.add(send_batch_with(sock, &plain, false));
            } else {
                out.failed += 1;
            }
            start += 1;
            continue;
        }
        for run in &runs[start..start + r as usize] {
            out.sent += run.count;
            out.bytes += order[run.first..run.first + run.count]
                .iter()
                .map(|&i| items[i].0.len())
                .sum::<usize>();
            if run.count > 1 {
                out.gso_runs += 1;
            }
        }
        start += r as usize;
    }
    out
}

/// Attach a `UDP_SEGMENT` control message (segment size `seg`) to `m`, in `ctl`.
#[cfg(target_os = "linux")]
fn set_segment(m: &mut libc::msghdr, ctl: &mut ControlBuf, seg: u16) {
    m.msg_control = ctl.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    m.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
    // SAFETY: `msg_control` points to `ctl` (64 bytes, 8-aligned), longer than the
    // CMSG_SPACE(2) bytes announced, so CMSG_FIRSTHDR returns a non-null header inside
    // it; the header and the 2 data bytes written after it stay within `ctl`.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(m);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
    }
}

/// Send every pair, one system call each (platforms without `sendmmsg`).
#[cfg(not(target_os = "linux"))]
pub fn send_batch_with(sock: &UdpSocket, items: &[(&[u8], SocketAddr)], _gso: bool) -> SendOutcome {
    let mut out = SendOutcome::default();
    for (d, a) in items {
        match sock.send_to(d, a) {
            Ok(n) => {
                out.sent += 1;
                out.bytes += n;
            }
            Err(_) => out.failed += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn batch_round_trip_delivers_each_datagram_once_in_order() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("addr");
        let data: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let items: Vec<(&[u8], SocketAddr)> = data.iter().map(|d| (d.as_slice(), to)).collect();
        let out = send_batch(&tx, &items);
        assert_eq!(out.sent, 50);
        assert_eq!(out.failed, 0);
        let mut batch = RecvBatch::new(16);
        let mut got = Vec::new();
        while got.len() < 50 {
            batch.recv(&rx).expect("receive");
            for i in 0..batch.len() {
                let (d, from) = batch.get(i).expect("datagram");
                assert_eq!(from, Some(tx.local_addr().expect("addr")));
                got.push(d.to_vec());
            }
        }
        assert_eq!(got, data);
    }

    #[test]
    fn a_failing_destination_does_not_stop_the_others() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let good = rx.local_addr().expect("addr");
        // An IPv6 destination on an IPv4 socket always fails.
        let bad: SocketAddr = "[::1]:9".parse().expect("addr");
        let d = [7u8; 64];
        let items = [(&d[..], bad), (&d[..], good), (&d[..], bad), (&d[..], good)];
        let out = send_batch(&tx, &items);
        assert_eq!(out.sent, 2);
        assert_eq!(out.failed, 2);
        let mut batch = RecvBatch::new(8);
        let mut n = 0;
        while n < 2 {
            n += batch.recv(&rx).expect("both good datagrams arrive");
        }
        assert_eq!(n, 2);
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn runs_group_by_destination_keep_order_and_end_at_a_shorter_datagram() {
        let big = [1u8; 1000];
        let small = [2u8; 300];
        let (a, b) = (addr(1), addr(2));
        // Datagram-major order, as the forwarder queues them: d0→a, d0→b, d1→a, ...
        let items = [
            (&big[..], a),
            (&big[..], b),
            (&big[..], a),
            (&big[..], b),
            (&small[..], a),
            (&small[..], b),
            (&big[..], a),
        ];
        let (mut order, mut runs) = (Vec::new(), Vec::new());
        plan_runs(&items, true, &mut order, &mut runs);
        assert_eq!(order, vec![0, 2, 4, 6, 1, 3, 5]);
        let expect = [
            Run {
                first: 0,
                count: 3,
                seg: 1000,
            },
            Run {
                first: 3,
                count: 1,
                seg: 1000,
            },
            Run {
                first: 4,
                count: 3,
                seg: 1000,
            },
        ];
        assert_eq!(runs, expect);
        plan_runs(&items, false, &mut order, &mut runs);
        assert_eq!(order, (0..7).collect::<Vec<_>>());
        assert!(runs.iter().all(|r| r.count == 1));
    }

    #[test]
    fn runs_respect_the_segment_and_byte_limits() {
        let d = [0u8; 100];
        let items: Vec<(&[u8], SocketAddr)> = (0..150).map(|_| (&d[..], addr(1))).collect();
        let (mut order, mut runs) = (Vec::new(), Vec::new());
        plan_runs(&items, true, &mut order, &mut runs);
        let counts: Vec<usize> = runs.iter().map(|r| r.count).collect();
        assert_eq!(counts, vec![64, 64, 22]);
        let d = [0u8; 1400];
        let items: Vec<(&[u8], SocketAddr)> = (0..60).map(|_| (&d[..], addr(1))).collect();
        plan_runs(&items, true, &mut order, &mut runs);
        assert!(runs.iter().all(|r| r.count * 1400 <= MAX_GSO_BYTES));
        assert_eq!(runs.iter().map(|r| r.count).sum::<usize>(), 60);
    }

    /// Datagrams of two sizes to `to`: 40 of 1200 bytes then one of 333, numbered.
    fn numbered_run() -> Vec<Vec<u8>> {
        let mut data: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 1200]).collect();
        data.push(vec![40; 333]);
        data
    }

    #[test]
    fn a_gso_run_arrives_as_ordinary_datagrams_at_a_plain_socket() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("addr");
        let data = numbered_run();
        let items: Vec<(&[u8], SocketAddr)> = data.iter().map(|d| (d.as_slice(), to)).collect();
        let out = send_batch_with(&tx, &items, true);
        assert_eq!(out.sent, data.len());
        assert_eq!(out.failed, 0);
        assert_eq!(out.bytes, data.iter().map(Vec::len).sum::<usize>());
        if offload().gso {
            assert!(out.gso_runs >= 1, "GSO offered but not used: {out:?}");
        }
        // One recv_from per datagram: each arrives alone, with its own size.
        let mut buf = [0u8; 65536];
        for d in &data {
            let (n, from) = rx.recv_from(&mut buf).expect("datagram");
            assert_eq!(from, tx.local_addr().expect("addr"));
            assert_eq!(&buf[..n], d.as_slice());
        }
    }

    #[test]
    fn gro_receive_splits_super_datagrams_and_keeps_senders() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut batch = RecvBatch::with_offload(8, &rx, true);
        assert_eq!(batch.gro(), offload().gro);
        let to = rx.local_addr().expect("addr");
        let tx1 = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx2 = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let data1 = numbered_run();
        let data2: Vec<Vec<u8>> = (100..120u8).map(|i| vec![i; 900]).collect();
        let items1: Vec<(&[u8], SocketAddr)> = data1.iter().map(|d| (d.as_slice(), to)).collect();
        let items2: Vec<(&[u8], SocketAddr)> = data2.iter().map(|d| (d.as_slice(), to)).collect();
        assert_eq!(send_batch_with(&tx1, &items1, true).sent, data1.len());
        assert_eq!(send_batch_with(&tx2, &items2, true).sent, data2.len());
        let (a1, a2) = (
            tx1.local_addr().expect("addr"),
            tx2.local_addr().expect("addr"),
        );
        let (mut got1, mut got2) = (Vec::new(), Vec::new());
        while got1.len() + got2.len() < data1.len() + data2.len() {
            batch.recv(&rx).expect("receive");
            for i in 0..batch.len() {
                match batch.get(i).expect("datagram") {
                    (d, Some(a)) if a == a1 => got1.push(d.to_vec()),
                    (d, Some(a)) if a == a2 => got2.push(d.to_vec()),
                    (_, from) => panic!("datagram from {from:?}"),
                }
            }
        }
        assert_eq!(got1, data1);
        assert_eq!(got2, data2);
        if offload().gso && offload().gro {
            // Loopback hands a GSO message to a GRO socket whole.
            assert!(batch.coalesced() >= 2, "no super-datagram seen");
        }
    }

    #[test]
    fn split_marks_oversized_segments_empty() {
        let mut b = RecvBatch::with_slots(2, GRO_BUF_LEN, true);
        b.push_message(0, 5000, false, Some(2500), None);
        b.push_message(1, 2100, false, Some(1000), None);
        let lens: Vec<usize> = (0..b.len())
            .map(|i| b.get(i).map_or(9, |d| d.0.len()))
            .collect();
        assert_eq!(lens, vec![0, 0, 1000, 1000, 100]);
        assert_eq!(
            b.get(3)
                .map(|d| d.0.as_ptr() as usize - b.buf.as_ptr() as usize),
            Some(GRO_BUF_LEN + 1000)
        );
    }

    #[test]
    fn forced_plain_path_and_refused_gso_both_deliver_everything() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        // GRO forced off: each message is one datagram in a small buffer.
        let mut batch = RecvBatch::with_offload(64, &rx, false);
        assert!(!batch.gro());
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        // A socket without UDP checksums cannot use GSO: the kernel refuses every GSO
        // message (EINVAL), and the runs go again as plain datagrams.
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            const SO_NO_CHECK: libc::c_int = 11;
            let one: libc::c_int = 1;
            // SAFETY: `one` is a live c_int; the kernel reads sizeof(c_int) bytes.
            let r = unsafe {
                libc::setsockopt(
                    tx.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_NO_CHECK,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0);
        }
        let to = rx.local_addr().expect("addr");
        let data = numbered_run();
        let items: Vec<(&[u8], SocketAddr)> = data.iter().map(|d| (d.as_slice(), to)).collect();
        let refused = send_batch_with(&tx, &items, true);
        assert_eq!(
            (refused.sent, refused.failed, refused.gso_runs),
            (data.len(), 0, 0)
        );
        let plain = send_batch_with(&tx, &items, false);
        assert_eq!(
            (plain.sent, plain.failed, plain.gso_runs),
            (data.len(), 0, 0)
        );
        let mut got = Vec::new();
        while got.len() < 2 * data.len() {
            batch.recv(&rx).expect("receive");
            for i in 0..batch.len() {
                got.push(batch.get(i).expect("datagram").0.to_vec());
            }
        }
        assert_eq!(batch.coalesced(), 0);
        assert_eq!(&got[..data.len()], data.as_slice());
        assert_eq!(&got[data.len()..], data.as_slice());
    }
}
