//! The datagram socket abstraction, so the same transport runs on tokio's UDP socket and on a
//! simulated one (turmoil in tests: wrap `turmoil::net::UdpSocket` in a newtype and implement
//! [`DatagramSocket`] for it).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;

/// An unconnected datagram socket.
#[async_trait]
pub trait DatagramSocket: Send + Sync + 'static {
    /// Receive one datagram; a datagram longer than `buf` is truncated (UDP semantics).
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
    /// Send one datagram to `target`.
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize>;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

#[async_trait]
impl DatagramSocket for tokio::net::UdpSocket {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        tokio::net::UdpSocket::recv_from(self, buf).await
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        tokio::net::UdpSocket::send_to(self, buf, target).await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::UdpSocket::local_addr(self)
    }
}

#[async_trait]
impl<S: DatagramSocket + ?Sized> DatagramSocket for Arc<S> {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        (**self).recv_from(buf).await
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        (**self).send_to(buf, target).await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        (**self).local_addr()
    }
}
