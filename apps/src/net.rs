//! Socket setup.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};

/// Receive and send buffer size asked of the kernel for every UDP socket.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Bind a UDP socket at `addr` with large buffers. The error names the address, so an
/// "address already in use" says which program and which address collided.
pub fn bind_udp(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))
        .context("cannot create a UDP socket")?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.bind(&addr.into())
        .with_context(|| format!("cannot bind UDP {addr}"))?;
    Ok(sock.into())
}

/// The control sockets of an overlay node, on one port.
///
/// Bound to the wildcard address (the links plan, a multi-homed host), it is one socket
/// with `IP_PKTINFO` on: each datagram says which of the host's addresses it was sent to
/// ([`crate::pktinfo`]), and an answer can leave from that address. Bound to a specific
/// address, it is one socket per address of the node (a node with several `addresses`
/// on one host, as on loopback), and an answer leaves from the socket the request came
/// in on. Either way, a message the node starts itself (heartbeat, announcement, `Join`)
/// leaves from the default: the kernel's choice on the wildcard socket, the first
/// address otherwise (where the node's data socket is bound, so that media sent back to
/// a `Join`'s source arrives).
#[derive(Debug)]
pub struct ControlSockets {
    /// Each socket and the address it is bound to; the first is the default.
    socks: Vec<(UdpSocket, IpAddr)>,
    wildcard: bool,
}

impl ControlSockets {
    /// Bind `primary`; when its address is specific, bind its port on each of `others`
    /// too (duplicates and the wildcard are skipped). The errors name the address.
    pub fn bind(primary: SocketAddr, others: &[IpAddr]) -> anyhow::Result<Self> {
        let first = bind_udp(primary)?;
        let wildcard = primary.ip().is_unspecified();
        if wildcard {
            crate::pktinfo::enable(&first)
                .with_context(|| format!("cannot enable IP_PKTINFO on {primary}"))?;
        }
        // Port 0 (a test) gives an ephemeral port: the other addresses take the same.
        let port = first.local_addr().map_or(primary.port(), |a| a.port());
        let mut socks = vec![(first, primary.ip())];
        if !wildcard {
            for &ip in others {
                if ip.is_unspecified() || socks.iter().any(|(_, bound)| *bound == ip) {
                    continue;
                }
                let sock = bind_udp(SocketAddr::new(ip, port))?;
                socks.push((sock, ip));
            }
        }
        Ok(Self { socks, wildcard })
    }

    /// The address of every socket, the default first (with the port the kernel gave).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.socks
            .iter()
            .filter_map(|(s, _)| s.local_addr().ok())
            .collect()
    }

    /// A clone of every socket, for receiver threads.
    pub fn try_clone_all(&self) -> std::io::Result<Vec<UdpSocket>> {
        self.socks.iter().map(|(s, _)| s.try_clone()).collect()
    }

    /// Send `buf` to `to`, from the local address `from` when given (an answer leaves
    /// from the address its request was sent to), else from the default.
    pub fn send(&self, buf: &[u8], to: SocketAddr, from: Option<IpAddr>) -> std::io::Result<usize> {
        let Some((default, _)) = self.socks.first() else {
            return Err(std::io::Error::other("no control socket"));
        };
        match from {
            Some(ip) if self.wildcard => crate::pktinfo::send_from(default, buf, to, ip)
                // E.g. the request was sent to a broadcast address: let the kernel choose.
                .or_else(|_| default.send_to(buf, to)),
            Some(ip) => {
                let sock = self
                    .socks
                    .iter()
                    .find(|(_, bound)| *bound == ip)
                    .map_or(default, |(s, _)| s);
                sock.send_to(buf, to)
            }
            None => default.send_to(buf, to),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_socket_per_specific_address_answers_from_its_own() {
        let a: IpAddr = "127.0.0.1".parse().expect("literal");
        let b: IpAddr = "127.0.0.3".parse().expect("literal");
        let socks = ControlSockets::bind(SocketAddr::new(a, 0), &[a, b]).expect("bind both");
        let port = socks.local_addrs()[0].port();
        assert_eq!(
            socks.local_addrs(),
            vec![SocketAddr::new(a, port), SocketAddr::new(b, port)]
        );
        let peer = UdpSocket::bind("127.0.0.1:0").expect("bind");
        peer.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let to = peer.local_addr().expect("addr");
        let mut buf = [0u8; 16];
        for (from, expect) in [(Some(b), b), (Some(a), a), (None, a)] {
            socks.send(b"x", to, from).expect("send");
            let (_, src) = peer.recv_from(&mut buf).expect("arrives");
            assert_eq!(src, SocketAddr::new(expect, port));
        }
    }
}
