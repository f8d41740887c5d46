//! `IP_PKTINFO` for UDP sockets bound to the wildcard address `0.0.0.0`: which of the
//! host's addresses each datagram was sent to, and sending an answer from that address.
//!
//! A node with several interfaces (every PoP and relay of the links plan, a multi-homed
//! host) binds its control socket to `0.0.0.0` and is reached at any of its addresses.
//! Without help the kernel gives each reply the source address of the interface the
//! route to the asker leaves by, which need not be the address the asker sent to; the
//! asker then sees an answer from an address it never wrote to. With `IP_PKTINFO` on,
//! `recvmsg` returns the datagram's destination address in an ancillary message, and
//! `sendmsg` with an `in_pktinfo` whose `ipi_spec_dst` is that address sends from it.
//!
//! Like [`crate::batch`], this module holds `unsafe` libc calls (the standard library
//! has neither `recvmsg` nor `sendmsg`); each call only points into buffers that live
//! across it. IPv4 only: IPv6 sockets fall back to plain `recv_from`/`send_to`, as do
//! platforms other than Linux.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};

/// Ask the kernel to report the destination address of every datagram `sock` receives
/// ([`recv`]). Harmless on a socket bound to a specific address.
#[cfg(target_os = "linux")]
pub fn enable(sock: &UdpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: `on` lives across the call and its size is given; setsockopt only reads it.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// No `IP_PKTINFO` here: [`recv`] reports no destination.
#[cfg(not(target_os = "linux"))]
pub fn enable(_sock: &UdpSocket) -> io::Result<()> {
    Ok(())
}

/// Room for one `in_pktinfo` control message, aligned like a `cmsghdr`.
#[cfg(target_os = "linux")]
type ControlBuf = [u64; 8];

/// Receive one datagram (blocking, within the socket's read timeout): its length, its
/// sender, and the local address it was sent to when [`enable`] was called (`None`
/// otherwise). A datagram longer than `buf` is reported with length 0, so that decoders
/// count it as malformed instead of reading half of it.
#[cfg(target_os = "linux")]
pub fn recv(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_storage and msghdr are plain old data; all-zero is a valid value.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control: ControlBuf = [0; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of::<ControlBuf>() as _;
    // SAFETY: every pointer in `msg` points into `name`, `iov` (hence `buf`) and
    // `control`, which outlive the call; the lengths given are theirs.
    let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `name` with an address of `msg_namelen` bytes.
    let from = unsafe { socket2::SockAddr::new(name, msg.msg_namelen) }
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "sender is not IP"))?;
    let len = if msg.msg_flags & libc::MSG_TRUNC != 0 {
        0
    } else {
        (r as usize).min(buf.len())
    };
    let mut local = None;
    // SAFETY: `msg` describes `control` as filled by the kernel (`msg_controllen` was
    // updated to the bytes written); the CMSG_* functions walk it within those bounds,
    // and an IP_PKTINFO message's data is one `in_pktinfo`, read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>());
                // `ipi_addr` is the header's destination, the address the sender wrote to.
                let dst = std::net::Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                local = Some(IpAddr::V4(dst));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((len, from, local))
}

/// Receive one datagram; no destination address on this platform.
#[cfg(not(target_os = "linux"))]
pub fn recv(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    let (len, from) = sock.recv_from(buf)?;
    Ok((len, from, None))
}

/// Send `buf` to `to` with `from` as its source address (one of this host's addresses;
/// the socket may be bound to `0.0.0.0`). An IPv6 `to` or `from` is sent with
/// `send_to`, the kernel choosing the source.
#[cfg(target_os = "linux")]
pub fn send_from(sock: &UdpSocket, buf: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let (SocketAddr::V4(_), IpAddr::V4(src)) = (to, from) else {
        return sock.send_to(buf, to);
    };
    let dest = socket2::SockAddr::from(to);
    let mut control: ControlBuf = [0; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = dest.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = dest.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) };
    msg.msg_controllen = space as _;
    // SAFETY: `control` is larger than `space` bytes and aligned for a cmsghdr, so
    // CMSG_FIRSTHDR returns a header inside it and its data has room for one
    // `in_pktinfo`, written unaligned.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return sock.send_to(buf, to);
        }
        (*cmsg).cmsg_level = libc::IPPROTO_IP;
        (*cmsg).cmsg_type = libc::IP_PKTINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(src).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>(), info);
    }
    // SAFETY: every pointer in `msg` points into `dest`, `iov` (hence `buf`) and
    // `control`, alive and unmoved during the call; sendmsg only reads them.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Send `buf` to `to`; the kernel chooses the source on this platform.
#[cfg(not(target_os = "linux"))]
pub fn send_from(sock: &UdpSocket, buf: &[u8], to: SocketAddr, _from: IpAddr) -> io::Result<usize> {
    sock.send_to(buf, to)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A wildcard socket on an ephemeral port (no clash with anything else), reached
    /// at two loopback addresses: each datagram says which, and each answer leaves
    /// from the address it was sent to.
    #[test]
    fn answers_leave_from_the_address_asked() {
        let server = UdpSocket::bind("0.0.0.0:0").expect("bind");
        enable(&server).expect("IP_PKTINFO");
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let port = server.local_addr().expect("addr").port();
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        for asked in ["127.0.0.1", "127.0.0.2", "127.77.0.9"] {
            let asked: IpAddr = asked.parse().expect("literal");
            let dest = SocketAddr::new(asked, port);
            client.send_to(b"ping", dest).expect("send");
            let (len, from, local) = recv(&server, &mut buf).expect("receive");
            assert_eq!(&buf[..len], b"ping");
            assert_eq!(from, client.local_addr().expect("addr"));
            assert_eq!(local, Some(asked));
            send_from(&server, b"pong", from, asked).expect("answer");
            let (len, answered_from) = client.recv_from(&mut buf).expect("answer arrives");
            assert_eq!(&buf[..len], b"pong");
            // The kernel alone would answer from 127.0.0.1 each time.
            assert_eq!(answered_from, dest);
        }
    }

    #[test]
    fn oversized_datagrams_are_reported_empty() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        enable(&server).expect("IP_PKTINFO");
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        client
            .send_to(&[1u8; 100], server.local_addr().expect("addr"))
            .expect("send");
        let mut small = [0u8; 10];
        let (len, _, local) = recv(&server, &mut small).expect("receive");
        assert_eq!(len, 0);
        assert_eq!(local, Some(IpAddr::from([127, 0, 0, 1])));
    }
}
