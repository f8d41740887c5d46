//! Socket setup.

use std::net::{SocketAddr, UdpSocket};

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
