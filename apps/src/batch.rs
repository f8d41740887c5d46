//! Batched UDP I/O for the data plane: many datagrams per system call with
//! `recvmmsg`/`sendmmsg` on Linux, one per call elsewhere.
//!
//! The only `unsafe` code of the project lives here: it builds the `mmsghdr` arrays the
//! two calls take, pointing into buffers that outlive each call.

use std::io;
use std::net::{SocketAddr, UdpSocket};

/// Largest datagram the receive buffers hold (a UDP payload can be larger; longer
/// datagrams are truncated by the kernel and then rejected by the header parser).
pub const BUF_LEN: usize = 2048;

/// Reusable buffers for receiving up to `n` datagrams per call.
pub struct RecvBatch {
    bufs: Vec<[u8; BUF_LEN]>,
    lens: Vec<usize>,
    addrs: Vec<Option<SocketAddr>>,
    count: usize,
    #[cfg(target_os = "linux")]
    storage: Vec<libc::sockaddr_storage>,
}

impl RecvBatch {
    /// Buffers for `n` datagrams (at least 1).
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        Self {
            bufs: vec![[0u8; BUF_LEN]; n],
            lens: vec![0; n],
            addrs: vec![None; n],
            count: 0,
            #[cfg(target_os = "linux")]
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            storage: vec![unsafe { std::mem::zeroed() }; n],
        }
    }

    /// Datagrams received by the last [`RecvBatch::recv`].
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the last call received nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagram `i` of the last call and its sender (`None` for an unknown address family).
    pub fn get(&self, i: usize) -> Option<(&[u8], Option<SocketAddr>)> {
        if i >= self.count {
            return None;
        }
        let len = *self.lens.get(i)?;
        Some((self.bufs.get(i)?.get(..len)?, *self.addrs.get(i)?))
    }

    /// Mutable access to datagram `i` of the last call (to set a flag before resending).
    pub fn get_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        if i >= self.count {
            return None;
        }
        let len = *self.lens.get(i)?;
        self.bufs.get_mut(i)?.get_mut(..len)
    }

    /// Receive at least one datagram (blocking, within the socket's read timeout) and
    /// as many more as are already queued, up to the batch size.
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let n = self.bufs.len();
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: BUF_LEN,
            })
            .collect();
        // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; n];
        for ((m, iov), st) in msgs
            .iter_mut()
            .zip(iovs.iter_mut())
            .zip(self.storage.iter_mut())
        {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (st as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: every pointer in `msgs` points into `iovs`, `self.bufs` and
        // `self.storage`, which live until after the call and are not moved during it;
        // the lengths given are those of the buffers.
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
            self.count = 0;
            return Err(io::Error::last_os_error());
        }
        let got = r as usize;
        for (i, m) in msgs.iter().take(got).enumerate() {
            // A truncated datagram is not ours (ours fit 1472 bytes): hand it on empty,
            // so that the decoders count it as malformed instead of reading half of it.
            let truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.lens[i] = if truncated {
                0
            } else {
                (m.msg_len as usize).min(BUF_LEN)
            };
            self.addrs[i] = sockaddr_to_std(&self.storage[i], m.msg_hdr.msg_namelen);
        }
        self.count = got;
        Ok(got)
    }

    /// Receive one datagram (platforms without `recvmmsg`).
    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        let (len, from) = sock.recv_from(&mut self.bufs[0])?;
        self.lens[0] = len.min(BUF_LEN);
        self.addrs[0] = Some(from);
        self.count = 1;
        Ok(1)
    }
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
    /// Datagrams that failed (each failure skips only that datagram).
    pub failed: usize,
}

/// Send every `(datagram, destination)` pair, batching system calls. A failed datagram
/// (unreachable, no buffer space, refused) is counted and skipped: the others are
/// still sent.
#[cfg(target_os = "linux")]
pub fn send_batch(sock: &UdpSocket, items: &[(&[u8], SocketAddr)]) -> SendOutcome {
    use std::os::fd::AsRawFd;
    let mut out = SendOutcome::default();
    let addrs: Vec<socket2::SockAddr> = items
        .iter()
        .map(|(_, a)| socket2::SockAddr::from(*a))
        .collect();
    let mut iovs: Vec<libc::iovec> = items
        .iter()
        .map(|(d, _)| libc::iovec {
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; items.len()];
    for ((m, iov), a) in msgs.iter_mut().zip(iovs.iter_mut()).zip(addrs.iter()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
        m.msg_hdr.msg_name = a.as_ptr() as *mut libc::c_void;
        m.msg_hdr.msg_namelen = a.len();
    }
    let mut start = 0;
    while start < msgs.len() {
        let rest = &mut msgs[start..];
        let chunk = rest.len().min(1024);
        // SAFETY: the headers point into `iovs`, `addrs` and the caller's datagrams, all
        // alive and unmoved for the duration of the call; sendmmsg only reads them.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                rest.as_mut_ptr(),
                chunk as libc::c_uint,
                0,
            )
        };
        if r <= 0 {
            // The first datagram of this chunk failed: count it, skip it, go on.
            out.failed += 1;
            start += 1;
            continue;
        }
        let r = r as usize;
        for (d, _) in &items[start..start + r] {
            out.bytes += d.len();
        }
        out.sent += r;
        start += r;
    }
    out
}

/// Send every pair, one system call each (platforms without `sendmmsg`).
#[cfg(not(target_os = "linux"))]
pub fn send_batch(sock: &UdpSocket, items: &[(&[u8], SocketAddr)]) -> SendOutcome {
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
}
