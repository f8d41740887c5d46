//! Datagrams with a forged source address, and a capture of the UDP datagrams on the
//! host, through raw IPv4 sockets (root only: `CAP_NET_RAW`). Used by the attack suite
//! to play an outsider who can send from any address and replay what it saw.
#![allow(dead_code)]

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Whether this process may open raw sockets (it runs as root).
pub(crate) fn can_spoof() -> bool {
    Socket::new(
        Domain::IPV4,
        Type::from(libc::SOCK_RAW),
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .is_ok()
}

/// A raw socket that sends UDP datagrams with any source address.
pub(crate) struct Spoofer {
    sock: Socket,
}

impl Spoofer {
    /// Open the raw socket (`IPPROTO_RAW`: we write the IP header ourselves).
    pub(crate) fn new() -> std::io::Result<Self> {
        let sock = Socket::new(
            Domain::IPV4,
            Type::from(libc::SOCK_RAW),
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        Ok(Self { sock })
    }

    /// Send `payload` from `src` to `dst` as one UDP datagram.
    pub(crate) fn send(
        &self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let udp_len = 8 + payload.len();
        let total = 20 + udp_len;
        let mut p = Vec::with_capacity(total);
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        p.extend_from_slice(&src.ip().octets());
        p.extend_from_slice(&dst.ip().octets());
        let sum = checksum(&p);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(&src.port().to_be_bytes());
        p.extend_from_slice(&dst.port().to_be_bytes());
        p.extend_from_slice(&(udp_len as u16).to_be_bytes());
        // A zero UDP checksum means "none" in IPv4.
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let to = SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
        self.sock.send_to(&p, &to).map(|_| ())
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// One captured UDP datagram.
#[derive(Debug, Clone)]
pub(crate) struct Captured {
    pub(crate) src: SocketAddrV4,
    pub(crate) dst: SocketAddrV4,
    pub(crate) payload: Vec<u8>,
}

/// Every UDP datagram delivered on this host for `time` whose destination passes `keep`.
pub(crate) fn capture(
    time: Duration,
    keep: impl Fn(&SocketAddrV4) -> bool,
) -> std::io::Result<Vec<Captured>> {
    let sock = Socket::new(
        Domain::IPV4,
        Type::from(libc::SOCK_RAW),
        Some(Protocol::UDP),
    )?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let _ = sock.set_recv_buffer_size(8 << 20);
    let deadline = Instant::now() + time;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        let n = match (&sock).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        let Some(d) = parse(buf.get(..n).unwrap_or(&[])) else {
            continue;
        };
        if keep(&d.dst) {
            out.push(d);
        }
    }
    Ok(out)
}

fn parse(p: &[u8]) -> Option<Captured> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    let ip = |o: usize| -> Option<Ipv4Addr> {
        let b: [u8; 4] = p.get(o..o + 4)?.try_into().ok()?;
        Some(Ipv4Addr::from(b))
    };
    let port = |o: usize| -> Option<u16> { Some(u16::from_be_bytes([*p.get(o)?, *p.get(o + 1)?])) };
    let (src, dst) = (ip(12)?, ip(16)?);
    let udp_len = usize::from(port(ihl + 4)?);
    Some(Captured {
        src: SocketAddrV4::new(src, port(ihl)?),
        dst: SocketAddrV4::new(dst, port(ihl + 2)?),
        payload: p.get(ihl + 8..ihl + udp_len.max(8))?.to_vec(),
    })
}
