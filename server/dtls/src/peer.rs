//! Who a connection talks to: a UDP address, or a meter behind a stateless join proxy
//! (draft-ietf-anima-constrained-join-proxy), known by the proxy's address and the opaque
//! JPY header the proxy gave its datagrams.
//!
//! The registrar "MUST treat the Header H as a single additional opaque identifier of all
//! packets associated to a UDP connection with a Pledge": (proxy address and port, header) is
//! one peer here, exactly as a UDP address is.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The address of a peer.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerAddr {
    /// A peer speaking UDP to us.
    Direct(SocketAddr),
    /// A peer behind a stateless join proxy at `proxy`: its datagrams come and go as JPY
    /// messages `[header, datagram]` on our JPY port.
    Relayed {
        proxy: SocketAddr,
        header: Arc<[u8]>,
    },
}

impl PeerAddr {
    pub fn relayed(proxy: SocketAddr, header: &[u8]) -> PeerAddr {
        PeerAddr::Relayed {
            proxy,
            header: Arc::from(header),
        }
    }

    /// The UDP address datagrams go to: the peer's, or its proxy's.
    pub fn socket_addr(&self) -> SocketAddr {
        match self {
            PeerAddr::Direct(a) => *a,
            PeerAddr::Relayed { proxy, .. } => *proxy,
        }
    }

    /// The source IP address the per-source limits count (the proxy's for a relayed peer).
    pub fn ip(&self) -> IpAddr {
        self.socket_addr().ip()
    }

    pub fn is_relayed(&self) -> bool {
        matches!(self, PeerAddr::Relayed { .. })
    }

    /// The JPY header of a relayed peer.
    pub fn header(&self) -> Option<&[u8]> {
        match self {
            PeerAddr::Direct(_) => None,
            PeerAddr::Relayed { header, .. } => Some(header),
        }
    }

    /// The proxy of a relayed peer.
    pub fn proxy(&self) -> Option<SocketAddr> {
        match self {
            PeerAddr::Direct(_) => None,
            PeerAddr::Relayed { proxy, .. } => Some(*proxy),
        }
    }

    /// Bytes the path adds to each of our datagrams, which the MTU must leave room for: the
    /// JPY header and CBOR for a relayed peer (38 for the draft's 32-byte header), else 0.
    pub fn path_overhead(&self) -> usize {
        match self {
            PeerAddr::Direct(_) => 0,
            PeerAddr::Relayed { header, .. } => {
                // The array head, the header's byte-string head and bytes, and the content's
                // byte-string head (3 bytes for any datagram up to 65,535 bytes).
                let head = match header.len() {
                    0..=23 => 1,
                    24..=255 => 2,
                    _ => 3,
                };
                1 + head + header.len() + 3
            }
        }
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> PeerAddr {
        PeerAddr::Direct(a)
    }
}

impl PartialEq<SocketAddr> for PeerAddr {
    fn eq(&self, other: &SocketAddr) -> bool {
        matches!(self, PeerAddr::Direct(a) if a == other)
    }
}

impl PartialEq<PeerAddr> for SocketAddr {
    fn eq(&self, other: &PeerAddr) -> bool {
        other == self
    }
}

impl fmt::Display for PeerAddr {
    /// `192.0.2.7:40001`, or `198.51.100.4:7634/jpy:0a1b2c3d4e5f` (the proxy, then the first
    /// six bytes of the header, enough to tell its meters apart in a log).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Direct(a) => write!(f, "{a}"),
            PeerAddr::Relayed { proxy, header } => {
                write!(f, "{proxy}/jpy:")?;
                for b in header.iter().take(6) {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Direct(a) => write!(f, "{a}"),
            PeerAddr::Relayed { proxy, header } => {
                write!(f, "{proxy}/jpy:")?;
                for b in header.iter() {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_peers_differ_by_header_and_proxy() {
        let p: SocketAddr = "192.0.2.1:7000".parse().unwrap();
        let a = PeerAddr::relayed(p, &[1, 2, 3]);
        let b = PeerAddr::relayed(p, &[1, 2, 4]);
        let c = PeerAddr::relayed("192.0.2.2:7000".parse().unwrap(), &[1, 2, 3]);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, PeerAddr::relayed(p, &[1, 2, 3]));
        assert_ne!(a, p);
        assert_eq!(PeerAddr::from(p), p);
        assert_eq!(a.socket_addr(), p);
        assert_eq!(a.to_string(), "192.0.2.1:7000/jpy:010203");
    }

    #[test]
    fn path_overhead_is_the_jpy_overhead() {
        let p: SocketAddr = "192.0.2.1:7000".parse().unwrap();
        assert_eq!(PeerAddr::from(p).path_overhead(), 0);
        // 32-byte header: 1 (array) + 2 + 32 + 3 = 38 (the draft's bound).
        assert_eq!(PeerAddr::relayed(p, &[0; 32]).path_overhead(), 38);
        assert_eq!(PeerAddr::relayed(p, &[0; 16]).path_overhead(), 21);
    }
}

/// An IP address prefix, `192.0.2.0/24`, `2001:db8::/32`, or one address (`192.0.2.7`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<IpPrefix, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} is over {max}"));
        }
        Ok(IpPrefix { addr, len })
    }

    /// Whether `ip` is inside (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<IpPrefix, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (
                a,
                Some(
                    l.parse::<u8>()
                        .map_err(|_| format!("{s:?}: bad prefix length"))?,
                ),
            ),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: not an IP address"))?;
        let len = len.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        IpPrefix::new(addr, len).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod prefix_tests {
    use super::*;

    #[test]
    fn prefixes() {
        let p: IpPrefix = "10.1.0.0/16".parse().unwrap();
        assert!(p.contains("10.1.200.3".parse().unwrap()));
        assert!(p.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!p.contains("10.2.0.1".parse().unwrap()));
        assert!(!p.contains("2001:db8::1".parse().unwrap()));
        let one: IpPrefix = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let v6: IpPrefix = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        let all: IpPrefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
        assert!("10.0.0/8".parse::<IpPrefix>().is_err());
        assert_eq!(p.to_string(), "10.1.0.0/16");
    }
}
