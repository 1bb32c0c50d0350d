//! Stateless HelloVerifyRequest cookies (RFC 6347 §4.2.1; brief §5).
//!
//! `cookie = t || HMAC-SHA256(secret, t || client address || client_params)[..12]`, 16 bytes,
//! with `t` the time the cookie was made (milliseconds, 32 bits, wrapping) and the secret rotated
//! periodically, the previous secret still accepted, so a cookie stays valid for between one
//! and two rotation intervals.
//!
//! * 16 bytes instead of a whole 32-byte HMAC: the cookie crosses a constrained link twice per
//!   handshake (HelloVerifyRequest and ClientHello). A 96-bit MAC is far beyond what a blind
//!   spoofer can guess within a rotation interval.
//! * `t` (authenticated) tells the server, when the cookie comes back, how long the
//!   HelloVerifyRequest / ClientHello round trip took: the first RTT sample of the path, for
//!   free and without state (the server's first retransmission timer is set from it).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ring::hmac;

use crate::peer::PeerAddr;

/// Cookie length in bytes: a 4-byte time and a 12-byte truncated HMAC-SHA256.
pub const COOKIE_LEN: usize = 16;
const TIME_LEN: usize = 4;

/// Current and previous HMAC-SHA256 cookie keys, with the time the current one was made.
///
/// If the RNG ever fails, the affected key is left unset: cookies made with it verify against
/// nothing (fail closed: no handshake proceeds on a predictable key), and the next
/// [`CookieKeys::rotate_if_due`] tries again regardless of the interval.
pub struct CookieKeys {
    current: Option<hmac::Key>,
    previous: Option<hmac::Key>,
    created: Instant,
    /// The zero of the cookies' time field.
    origin: Instant,
}

fn fresh_key(rng: &dyn ring::rand::SecureRandom) -> Option<hmac::Key> {
    match hmac::Key::generate(hmac::HMAC_SHA256, rng) {
        Ok(k) => Some(k),
        Err(_) => {
            tracing::error!(
                "RNG failure while making a cookie key; cookies disabled until the next rotation"
            );
            None
        }
    }
}

fn push_addr(msg: &mut Vec<u8>, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            msg.push(4);
            msg.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            msg.push(6);
            msg.extend_from_slice(&ip.octets());
        }
    }
    msg.extend_from_slice(&a.port().to_be_bytes());
}

/// The MAC input: time || tag (4 / 6) || IP octets || port (BE) || client_params; for a meter
/// behind a join proxy: time || 'J' || the proxy's address as above || header length (BE u16)
/// || header || client_params (the cookie proves the whole (proxy, header) pair, the meter's
/// address).
fn mac_input(time: &[u8], client: &PeerAddr, client_params: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(TIME_LEN + 1 + 16 + 2 + client_params.len() + 40);
    msg.extend_from_slice(time);
    match client {
        PeerAddr::Direct(a) => push_addr(&mut msg, a),
        PeerAddr::Relayed { proxy, header } => {
            msg.push(b'J');
            push_addr(&mut msg, proxy);
            msg.extend_from_slice(&(header.len() as u16).to_be_bytes());
            msg.extend_from_slice(header);
        }
    }
    msg.extend_from_slice(client_params);
    msg
}

impl CookieKeys {
    pub fn new(rng: &dyn ring::rand::SecureRandom, now: Instant) -> Self {
        Self {
            current: fresh_key(rng),
            previous: None,
            created: now,
            origin: now,
        }
    }

    /// Milliseconds since `origin`, wrapping at 2^32 (49.7 days; only differences are used).
    fn millis(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.origin).as_millis() as u32
    }

    /// Rotate when `now - created >= interval` (or the current key is unset): previous =
    /// current, current = fresh random key. Returns true if rotated.
    pub fn rotate_if_due(
        &mut self,
        rng: &dyn ring::rand::SecureRandom,
        now: Instant,
        interval: Duration,
    ) -> bool {
        if self.current.is_some() && now.saturating_duration_since(self.created) < interval {
            return false;
        }
        self.previous = self.current.take();
        self.current = fresh_key(rng);
        self.created = now;
        true
    }

    /// Cookie made at `now`: time (4 bytes) || HMAC-SHA256(current key, time || client
    /// address (tag byte 4/6, IP bytes, port) || client_params)[..12]. `client_params` is what
    /// the caller extracts from the ClientHello: version, random, session_id, cipher_suites,
    /// compression_methods (not extensions). A zero MAC (which never verifies) if the current
    /// key is unset.
    pub fn generate(
        &self,
        now: Instant,
        client: &PeerAddr,
        client_params: &[u8],
    ) -> [u8; COOKIE_LEN] {
        let mut out = [0u8; COOKIE_LEN];
        let time = self.millis(now).to_be_bytes();
        let (t, mac) = out.split_at_mut(TIME_LEN);
        t.copy_from_slice(&time);
        if let Some(key) = &self.current {
            let tag = hmac::sign(key, &mac_input(&time, client, client_params));
            for (d, s) in mac.iter_mut().zip(tag.as_ref()) {
                *d = *s;
            }
        }
        out
    }

    /// Checks a cookie (constant-time) against the current or the previous key; `Some(age)`,
    /// the time since it was made (the round trip it travelled), if it verifies.
    pub fn verify(
        &self,
        now: Instant,
        client: &PeerAddr,
        client_params: &[u8],
        cookie: &[u8],
    ) -> Option<Duration> {
        if cookie.len() != COOKIE_LEN {
            return None;
        }
        let (time, mac) = cookie.split_first_chunk::<TIME_LEN>()?;
        let msg = mac_input(time, client, client_params);
        let valid = [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .any(|key| {
                let tag = hmac::sign(key, &msg);
                let diff = tag
                    .as_ref()
                    .iter()
                    .zip(mac)
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b));
                diff == 0
            });
        let made = u32::from_be_bytes(*time);
        valid.then(|| Duration::from_millis(u64::from(self.millis(now).wrapping_sub(made))))
    }
}

impl fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CookieKeys")
            .field("current", &self.current.is_some())
            .field("previous", &self.previous.is_some())
            .field("created", &self.created)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn addr(s: &str) -> PeerAddr {
        PeerAddr::Direct(s.parse().unwrap())
    }

    const PARAMS: &[u8] = b"\xfe\xfd client random, session id, suites, compression";

    #[test]
    fn generate_then_verify() {
        let rng = SystemRandom::new();
        let t0 = Instant::now();
        let keys = CookieKeys::new(&rng, t0);
        let a = addr("192.0.2.1:5684");
        let c = keys.generate(t0, &a, PARAMS);
        assert_eq!(c.len(), COOKIE_LEN);
        assert_ne!(c, [0u8; COOKIE_LEN]);
        assert!(keys.verify(t0, &a, PARAMS, &c).is_some());
        // deterministic for the same key and input
        assert_eq!(keys.generate(t0, &a, PARAMS), c);
        // a second CookieKeys (other secret) refuses it
        let other = CookieKeys::new(&rng, t0);
        assert!(other.verify(t0, &a, PARAMS, &c).is_none());
    }

    #[test]
    fn different_address_port_params_or_cookie_refused() {
        let rng = SystemRandom::new();
        let t0 = Instant::now();
        let keys = CookieKeys::new(&rng, t0);
        let a = addr("192.0.2.1:5684");
        let c = keys.generate(t0, &a, PARAMS);
        assert!(keys
            .verify(t0, &addr("192.0.2.2:5684"), PARAMS, &c)
            .is_none());
        assert!(keys
            .verify(t0, &addr("192.0.2.1:5685"), PARAMS, &c)
            .is_none());
        assert!(keys
            .verify(t0, &addr("[::ffff:192.0.2.1]:5684"), PARAMS, &c)
            .is_none());
        assert!(keys.verify(t0, &a, b"other params", &c).is_none());
        assert!(keys.verify(t0, &a, b"", &c).is_none());
        let mut bad = c;
        bad[COOKIE_LEN - 1] ^= 1;
        assert!(keys.verify(t0, &a, PARAMS, &bad).is_none());
        assert!(keys.verify(t0, &a, PARAMS, &c[..COOKIE_LEN - 1]).is_none());
        let mut long = c.to_vec();
        long.push(0);
        assert!(keys.verify(t0, &a, PARAMS, &long).is_none());
        assert!(keys.verify(t0, &a, PARAMS, &[]).is_none());
        assert!(keys.verify(t0, &a, PARAMS, &[0u8; COOKIE_LEN]).is_none());
        // IPv6
        let v6 = addr("[2001:db8::1]:40000");
        let c6 = keys.generate(t0, &v6, PARAMS);
        assert!(keys.verify(t0, &v6, PARAMS, &c6).is_some());
        assert!(keys
            .verify(t0, &addr("[2001:db8::2]:40000"), PARAMS, &c6)
            .is_none());
        assert_ne!(c6, c);
    }

    #[test]
    fn relayed_meters_get_cookies_of_their_own() {
        let rng = SystemRandom::new();
        let t0 = Instant::now();
        let keys = CookieKeys::new(&rng, t0);
        let proxy: SocketAddr = "192.0.2.9:7000".parse().unwrap();
        let a = PeerAddr::relayed(proxy, &[1; 24]);
        let c = keys.generate(t0, &a, PARAMS);
        assert!(keys.verify(t0, &a, PARAMS, &c).is_some());
        // Another meter of the same proxy, the proxy itself, another proxy: refused.
        let refused = |p: PeerAddr| keys.verify(t0, &p, PARAMS, &c).is_none();
        assert!(refused(PeerAddr::relayed(proxy, &[2; 24])));
        assert!(refused(PeerAddr::Direct(proxy)));
        let other: SocketAddr = "192.0.2.9:7001".parse().unwrap();
        assert!(refused(PeerAddr::relayed(other, &[1; 24])));
    }

    #[test]
    fn a_cookie_tells_its_age_and_its_time_cannot_be_changed() {
        let rng = SystemRandom::new();
        let t0 = Instant::now();
        let keys = CookieKeys::new(&rng, t0);
        let a = addr("192.0.2.9:5684");
        let made = t0 + Duration::from_millis(1_500);
        let c = keys.generate(made, &a, PARAMS);
        let back = made + Duration::from_millis(730);
        assert_eq!(
            keys.verify(back, &a, PARAMS, &c),
            Some(Duration::from_millis(730))
        );
        // A client claiming an older cookie (to inflate the server's timer) breaks the MAC.
        let mut older = c;
        older[TIME_LEN - 1] ^= 0x40;
        assert!(keys.verify(back, &a, PARAMS, &older).is_none());
    }

    #[test]
    fn valid_after_one_rotation_invalid_after_two() {
        let rng = SystemRandom::new();
        let t0 = Instant::now();
        let interval = Duration::from_secs(60);
        let mut keys = CookieKeys::new(&rng, t0);
        let a = addr("198.51.100.7:1234");
        let c = keys.generate(t0, &a, PARAMS);

        // not due yet
        assert!(!keys.rotate_if_due(&rng, t0 + Duration::from_secs(59), interval));
        assert!(keys.verify(t0, &a, PARAMS, &c).is_some());
        // a `now` before `created` does not rotate (no panic either)
        assert!(!keys.rotate_if_due(&rng, t0, interval));

        // first rotation: the old cookie is accepted through the previous key
        assert!(keys.rotate_if_due(&rng, t0 + interval, interval));
        assert!(keys.verify(t0, &a, PARAMS, &c).is_some());
        let c2 = keys.generate(t0, &a, PARAMS);
        assert_ne!(c2, c, "new current key makes new cookies");
        assert!(keys.verify(t0, &a, PARAMS, &c2).is_some());

        // rotation is measured from the last one
        assert!(!keys.rotate_if_due(&rng, t0 + interval + Duration::from_secs(30), interval));

        // second rotation: the first key is gone
        assert!(keys.rotate_if_due(&rng, t0 + 2 * interval, interval));
        assert!(keys.verify(t0, &a, PARAMS, &c).is_none());
        assert!(keys.verify(t0, &a, PARAMS, &c2).is_some());
    }

    #[test]
    fn debug_prints_no_key_material() {
        let rng = SystemRandom::new();
        let keys = CookieKeys::new(&rng, Instant::now());
        let s = format!("{keys:?}");
        assert!(s.contains("current: true"), "{s}");
    }
}
