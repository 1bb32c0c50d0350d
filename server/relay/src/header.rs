//! The JPY header: the meter's address, port and interface, sealed under a proxy-local key.
//!
//! The draft leaves the header's contents to the proxy ("JPY Message Security"): a generic
//! stateless proxy SHOULD encrypt and integrity-protect it with a key known only to itself,
//! MUST silently drop a reply whose header fails, and MAY change the key periodically
//! (RECOMMENDED infrequently, e.g. every 24 h).
//!
//! The header must be the *same* for every datagram of one meter: the registrar tells its
//! DTLS peers apart by (proxy address and port, header), so a header that changed per packet
//! would make every datagram a new peer. Sealing is therefore deterministic, and the cipher is
//! one built for that: **AES-128-GCM-SIV** (RFC 8452, RustCrypto `aes-gcm-siv`), whose
//! security under a repeated nonce is that equal inputs give equal outputs and nothing more.
//! (The draft's security section suggests AES-CCM with a sequence number and a replay window,
//! after RFC 8974; a per-packet sequence number would change the header per packet and break
//! the registrar's 5-tuple, and CCM under a repeated nonce leaks the keystream. Replay of a
//! reply is the DTLS record layer's job at the meter, as the draft's own example argues.)
//!
//! ```text
//! header = generation (1 byte) || AES-128-GCM-SIV(key[generation], nonce, aad, plaintext)
//!   nonce     = "jpy1" || generation || 0^7
//!   aad       = "est-relay jpy header" || registrar address (family, IP, port)
//!   plaintext = interface (1) || port (2, BE) || address
//!     address = IPv4 (4) | IPv6 link-local fe80::/64: scope id (4, BE) || IID (8) | IPv6 (16)
//! ```
//!
//! Sizes: IPv4 meter 24 bytes, IPv6 link-local meter 32 bytes (the draft's SHOULD), other
//! IPv6 36 bytes (a pledge per the draft only has a link-local address; over the SHOULD, the
//! JPY overhead is then 42 bytes). The registrar address in the AAD binds a header to the
//! registrar it was sent to: replayed from another registrar's address it fails.
//!
//! Keys: the current one seals; the current and the previous one open. Rotation makes a new
//! current key and keeps the old current one as previous, so a header stays valid for one to
//! two rotation intervals. A header of an older generation is a replay of something old:
//! dropped ([`OpenError::StaleKey`]). A meter whose session spans a rotation gets a new
//! header, i.e. becomes a new peer at the registrar (with a DTLS Connection ID its session
//! survives that, as it survives a NAT rebinding).

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

use aes_gcm_siv::aead::{AeadInPlace, KeyInit};
use aes_gcm_siv::{Aes128GcmSiv, Nonce};
use ring::rand::SecureRandom;

/// AES-GCM-SIV tag length.
const TAG_LEN: usize = 16;
/// The longest header we make (an IPv6 meter that is not link-local).
pub const MAX_HEADER_LEN: usize = 1 + 19 + TAG_LEN;
/// The longest header of a meter the draft expects (IPv6 link-local, IPv4).
pub const DRAFT_HEADER_LEN: usize = 32;

const AAD_LABEL: &[u8] = b"est-relay jpy header";
/// The longest additional data: the label, the family byte, an IPv6 address and a port.
const AAD_MAX_LEN: usize = AAD_LABEL.len() + 1 + 16 + 2;

/// A meter as the proxy sees it: its address and port, and the proxy interface it came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MeterAddr {
    pub addr: SocketAddr,
    /// The proxy's index for the interface (the driver's listening socket).
    pub interface: u8,
}

impl MeterAddr {
    pub fn new(addr: SocketAddr, interface: u8) -> MeterAddr {
        MeterAddr { addr, interface }
    }
}

impl std::fmt::Display for MeterAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%if{}", self.addr, self.interface)
    }
}

/// A sealed header, kept on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SealedHeader {
    bytes: [u8; MAX_HEADER_LEN],
    len: u8,
}

impl std::ops::Deref for SealedHeader {
    type Target = [u8];
    #[allow(
        clippy::indexing_slicing,
        reason = "`len` is set only by `HeaderKeys::seal`, to 1 + (7, 15 or 19) + TAG_LEN <= MAX_HEADER_LEN"
    )]
    fn deref(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for SealedHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedHeader(")?;
        for b in self.iter() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// Why a header did not open. Every case is a silent drop (the draft: MUST silently discard).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not a length we make.
    #[error("malformed header")]
    Malformed,
    /// Sealed under a key older than the previous one (or never ours).
    #[error("header of an expired key generation")]
    StaleKey,
    /// Tampered with, forged, or sent back from another registrar than it was made for.
    #[error("header failed authentication")]
    AuthFailed,
}

struct Key {
    generation: u8,
    cipher: Aes128GcmSiv,
}

impl Key {
    fn generate(generation: u8, rng: &dyn SecureRandom) -> Option<Key> {
        let mut k = [0u8; 16];
        rng.fill(&mut k).ok()?;
        let cipher = Aes128GcmSiv::new_from_slice(&k).ok()?;
        Some(Key { generation, cipher })
    }

    fn nonce(&self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(b"jpy1");
        n[4] = self.generation;
        n
    }
}

/// The additional data binding a header to `registrar`, written into `a`: the label, the
/// address family (4 or 6), the address and the port.
fn aad(registrar: SocketAddr, a: &mut [u8; AAD_MAX_LEN]) -> &[u8] {
    const L: usize = AAD_LABEL.len();
    a[..L].copy_from_slice(AAD_LABEL);
    let port = registrar.port().to_be_bytes();
    match registrar.ip() {
        IpAddr::V4(ip) => {
            a[L] = 4;
            a[L + 1..L + 5].copy_from_slice(&ip.octets());
            a[L + 5..L + 7].copy_from_slice(&port);
            &a[..L + 7]
        }
        IpAddr::V6(ip) => {
            a[L] = 6;
            a[L + 1..L + 17].copy_from_slice(&ip.octets());
            a[L + 17..L + 19].copy_from_slice(&port);
            &a[..L + 19]
        }
    }
}

fn is_link_local_v6(ip: &Ipv6Addr) -> bool {
    ip.segments()[..4] == [0xfe80, 0, 0, 0]
}

/// The plaintext of `meter` into `out`, returning its length.
fn encode_plaintext(meter: &MeterAddr, out: &mut [u8; 19]) -> usize {
    out[0] = meter.interface;
    out[1..3].copy_from_slice(&meter.addr.port().to_be_bytes());
    match meter.addr {
        SocketAddr::V4(a) => {
            out[3..7].copy_from_slice(&a.ip().octets());
            7
        }
        SocketAddr::V6(a) if is_link_local_v6(a.ip()) => {
            out[3..7].copy_from_slice(&a.scope_id().to_be_bytes());
            out[7..15].copy_from_slice(&a.ip().octets()[8..]);
            15
        }
        SocketAddr::V6(a) => {
            out[3..19].copy_from_slice(&a.ip().octets());
            19
        }
    }
}

fn decode_plaintext(p: &[u8]) -> Option<MeterAddr> {
    let interface = *p.first()?;
    let port = u16::from_be_bytes([*p.get(1)?, *p.get(2)?]);
    let addr = match p.len() {
        7 => {
            let o: [u8; 4] = p.get(3..7)?.try_into().ok()?;
            SocketAddr::V4(SocketAddrV4::new(o.into(), port))
        }
        15 => {
            let scope = u32::from_be_bytes(p.get(3..7)?.try_into().ok()?);
            let mut o = [0u8; 16];
            o[0] = 0xfe;
            o[1] = 0x80;
            o[8..].copy_from_slice(p.get(7..15)?);
            SocketAddr::V6(SocketAddrV6::new(o.into(), port, 0, scope))
        }
        19 => {
            let o: [u8; 16] = p.get(3..19)?.try_into().ok()?;
            SocketAddr::V6(SocketAddrV6::new(o.into(), port, 0, 0))
        }
        _ => return None,
    };
    Some(MeterAddr { addr, interface })
}

/// The proxy's header keys: current and previous, rotated on the caller's clock.
pub struct HeaderKeys {
    current: Option<Key>,
    previous: Option<Key>,
    next_generation: u8,
    rotated_at: Instant,
    interval: Duration,
    rotations: u64,
}

impl std::fmt::Debug for HeaderKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderKeys")
            .field("current", &self.current.as_ref().map(|k| k.generation))
            .field("previous", &self.previous.as_ref().map(|k| k.generation))
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl HeaderKeys {
    /// A fresh key (generation chosen at random, so that headers of an earlier run of the
    /// proxy are unlikely to name a current generation) rotated every `interval`.
    pub fn new(rng: &dyn SecureRandom, now: Instant, interval: Duration) -> HeaderKeys {
        let mut g = [0u8; 1];
        let _ = rng.fill(&mut g);
        let mut keys = HeaderKeys {
            current: None,
            previous: None,
            next_generation: g[0],
            rotated_at: now,
            interval,
            rotations: 0,
        };
        keys.current = keys.fresh(rng);
        keys
    }

    fn fresh(&mut self, rng: &dyn SecureRandom) -> Option<Key> {
        let k = Key::generate(self.next_generation, rng);
        if k.is_none() {
            tracing::error!(
                "RNG failure making a JPY header key: relaying stops until the next rotation"
            );
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        k
    }

    /// When the next rotation is due.
    pub fn next_rotation(&self) -> Instant {
        self.rotated_at + self.interval
    }

    /// Rotations so far.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// The current key's generation (the header's first byte).
    pub fn current_generation(&self) -> Option<u8> {
        self.current.as_ref().map(|k| k.generation)
    }

    /// Rotates if the interval has passed (or a key is missing after an RNG failure).
    pub fn rotate_if_due(&mut self, rng: &dyn SecureRandom, now: Instant) -> bool {
        if now < self.next_rotation() && self.current.is_some() {
            return false;
        }
        self.rotate(rng, now);
        true
    }

    /// A new current key; the current one becomes the previous one, the previous is forgotten.
    pub fn rotate(&mut self, rng: &dyn SecureRandom, now: Instant) {
        let fresh = self.fresh(rng);
        self.previous = std::mem::replace(&mut self.current, fresh);
        self.rotated_at = now;
        self.rotations += 1;
    }

    /// Seals `meter`'s header for datagrams sent to `registrar`. `None` only without a key
    /// (after an RNG failure).
    pub fn seal(&self, meter: &MeterAddr, registrar: SocketAddr) -> Option<SealedHeader> {
        let key = self.current.as_ref()?;
        let mut plain = [0u8; 19];
        let n = encode_plaintext(meter, &mut plain);
        // [generation | ciphertext (n) | tag], n being 7, 15 or 19: every split below fits.
        let mut bytes = [0; MAX_HEADER_LEN];
        bytes[0] = key.generation;
        let (ciphertext, after) = bytes[1..].split_at_mut_checked(n)?;
        ciphertext.copy_from_slice(plain.get(..n)?);
        let mut a = [0u8; AAD_MAX_LEN];
        let tag = key
            .cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(&key.nonce()),
                aad(registrar, &mut a),
                ciphertext,
            )
            .ok()?;
        after.get_mut(..TAG_LEN)?.copy_from_slice(&tag);
        Some(SealedHeader {
            bytes,
            len: (1 + n + TAG_LEN) as u8,
        })
    }

    /// Opens a header that came back from `registrar`.
    pub fn open(&self, header: &[u8], registrar: SocketAddr) -> Result<MeterAddr, OpenError> {
        let (&generation, sealed) = header.split_first().ok_or(OpenError::Malformed)?;
        let n = sealed
            .len()
            .checked_sub(TAG_LEN)
            .filter(|n| matches!(n, 7 | 15 | 19))
            .ok_or(OpenError::Malformed)?;
        let key = [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find(|k| k.generation == generation)
            .ok_or(OpenError::StaleKey)?;
        // n is 7, 15 or 19 and the rest is the tag: every split below fits.
        let (ciphertext, tag) = sealed.split_at_checked(n).ok_or(OpenError::Malformed)?;
        let mut buf = [0u8; 19];
        let plain = buf.get_mut(..n).ok_or(OpenError::Malformed)?;
        plain.copy_from_slice(ciphertext);
        let mut a = [0u8; AAD_MAX_LEN];
        key.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&key.nonce()),
                aad(registrar, &mut a),
                plain,
                aes_gcm_siv::Tag::from_slice(tag),
            )
            .map_err(|_| OpenError::AuthFailed)?;
        decode_plaintext(plain).ok_or(OpenError::AuthFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn reg() -> SocketAddr {
        "192.0.2.1:7634".parse().unwrap()
    }

    fn meters() -> Vec<MeterAddr> {
        vec![
            MeterAddr::new("10.0.0.7:40000".parse().unwrap(), 0),
            MeterAddr::new("[fe80::1234:5678]:45965".parse().unwrap(), 3),
            MeterAddr::new(
                SocketAddr::V6(SocketAddrV6::new(
                    "fe80::a:b:c:d".parse().unwrap(),
                    5683,
                    0,
                    7,
                )),
                1,
            ),
            MeterAddr::new("[2001:db8::1]:1".parse().unwrap(), 255),
        ]
    }

    #[test]
    fn seal_open_round_trip_and_sizes() {
        let rng = SystemRandom::new();
        let keys = HeaderKeys::new(&rng, Instant::now(), Duration::from_secs(86_400));
        for m in meters() {
            let h = keys.seal(&m, reg()).unwrap();
            assert_eq!(keys.open(&h, reg()).unwrap(), m);
            // Deterministic: the registrar sees one header per meter.
            assert_eq!(keys.seal(&m, reg()).unwrap(), h);
            let want = match m.addr {
                SocketAddr::V4(_) => 24,
                SocketAddr::V6(a) if is_link_local_v6(a.ip()) => 32,
                SocketAddr::V6(_) => 36,
            };
            assert_eq!(h.len(), want, "{m}");
        }
    }

    #[test]
    fn headers_of_draft_meters_fit_in_32_bytes() {
        let rng = SystemRandom::new();
        let keys = HeaderKeys::new(&rng, Instant::now(), Duration::from_secs(60));
        for m in meters()
            .into_iter()
            .filter(|m| !matches!(m.addr, SocketAddr::V6(a) if !is_link_local_v6(a.ip())))
        {
            assert!(keys.seal(&m, reg()).unwrap().len() <= DRAFT_HEADER_LEN);
        }
    }

    #[test]
    fn different_meters_get_different_headers() {
        let rng = SystemRandom::new();
        let keys = HeaderKeys::new(&rng, Instant::now(), Duration::from_secs(60));
        let a = MeterAddr::new("10.0.0.7:40000".parse().unwrap(), 0);
        let b = MeterAddr::new("10.0.0.7:40001".parse().unwrap(), 0);
        let c = MeterAddr::new("10.0.0.7:40000".parse().unwrap(), 1);
        let (ha, hb, hc) = (
            keys.seal(&a, reg()).unwrap(),
            keys.seal(&b, reg()).unwrap(),
            keys.seal(&c, reg()).unwrap(),
        );
        assert_ne!(ha, hb);
        assert_ne!(ha, hc);
    }

    #[test]
    fn every_single_bit_flip_fails() {
        let rng = SystemRandom::new();
        let keys = HeaderKeys::new(&rng, Instant::now(), Duration::from_secs(60));
        for m in meters() {
            let h = keys.seal(&m, reg()).unwrap();
            for i in 0..h.len() * 8 {
                let mut t = h.to_vec();
                t[i / 8] ^= 1 << (i % 8);
                let e = keys.open(&t, reg()).unwrap_err();
                if i < 8 {
                    assert_eq!(e, OpenError::StaleKey);
                } else {
                    assert_eq!(e, OpenError::AuthFailed);
                }
            }
            assert_eq!(
                keys.open(&h[..h.len() - 1], reg()),
                Err(OpenError::Malformed)
            );
            assert_eq!(keys.open(&[], reg()), Err(OpenError::Malformed));
        }
    }

    #[test]
    fn a_header_is_bound_to_its_registrar() {
        let rng = SystemRandom::new();
        let keys = HeaderKeys::new(&rng, Instant::now(), Duration::from_secs(60));
        let m = meters()[0];
        let h = keys.seal(&m, reg()).unwrap();
        let other: SocketAddr = "192.0.2.1:7635".parse().unwrap();
        assert_eq!(keys.open(&h, other), Err(OpenError::AuthFailed));
    }

    #[test]
    fn rotation_keeps_the_previous_key_and_drops_the_one_before() {
        let rng = SystemRandom::new();
        let t0 = Instant::now();
        let day = Duration::from_secs(86_400);
        let mut keys = HeaderKeys::new(&rng, t0, day);
        let m = meters()[1];
        let h0 = keys.seal(&m, reg()).unwrap();
        assert!(!keys.rotate_if_due(&rng, t0 + day - Duration::from_secs(1)));
        assert!(keys.rotate_if_due(&rng, t0 + day));
        let h1 = keys.seal(&m, reg()).unwrap();
        assert_ne!(h0, h1, "a new key makes a new header");
        assert_eq!(
            keys.open(&h0, reg()).unwrap(),
            m,
            "previous key still accepted"
        );
        assert_eq!(keys.open(&h1, reg()).unwrap(), m);
        assert!(keys.rotate_if_due(&rng, t0 + 2 * day));
        assert_eq!(keys.open(&h0, reg()), Err(OpenError::StaleKey));
        assert_eq!(keys.open(&h1, reg()).unwrap(), m);
        assert_eq!(keys.rotations(), 2);
    }

    #[test]
    fn another_proxy_instance_cannot_open() {
        let rng = SystemRandom::new();
        let a = HeaderKeys::new(&rng, Instant::now(), Duration::from_secs(60));
        let mut b = HeaderKeys::new(&rng, Instant::now(), Duration::from_secs(60));
        let m = meters()[0];
        let h = a.seal(&m, reg()).unwrap();
        // Force b onto the same generation number: the key still differs.
        while b.current_generation() != a.current_generation() {
            b.rotate(&rng, Instant::now());
        }
        assert_eq!(b.open(&h, reg()), Err(OpenError::AuthFailed));
    }
}
