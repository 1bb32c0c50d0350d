//! The datagram socket abstraction, so the same transport runs on tokio's UDP socket and on a
//! simulated one (turmoil in tests: wrap `turmoil::net::UdpSocket` in a newtype and implement
//! [`DatagramSocket`] for it).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use webrtc_util::conn::Conn;

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

/// A [`webrtc_util::conn::Conn`] "connected" to one remote address over a [`DatagramSocket`]:
/// sends go to `remote`, datagrams from any other source are discarded. This is what a client
/// (a meter, the simulator) hands to [`super::client::connect`].
pub struct SocketConn<S: DatagramSocket> {
    socket: Arc<S>,
    remote: SocketAddr,
}

impl<S: DatagramSocket> SocketConn<S> {
    pub fn new(socket: Arc<S>, remote: SocketAddr) -> Self {
        SocketConn { socket, remote }
    }

    pub fn socket(&self) -> &Arc<S> {
        &self.socket
    }
}

#[async_trait]
impl<S: DatagramSocket> Conn for SocketConn<S> {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "SocketConn is connected at construction".into(),
        ))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        loop {
            let (n, from) = self.socket.recv_from(buf).await?;
            if from == self.remote {
                return Ok(n);
            }
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let n = Conn::recv(self, buf).await?;
        Ok((n, self.remote))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.send_to(buf, self.remote).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.remote)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}
