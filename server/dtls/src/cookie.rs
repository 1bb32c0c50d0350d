//! Stateless HelloVerifyRequest cookies (RFC 6347 §4.2.1; brief §5).
//!
//! `cookie = HMAC-SHA256(secret, client address || client_params)` truncated to 16 bytes, with
//! the secret rotated periodically and the previous secret still accepted, so a cookie stays
//! valid for between one and two rotation intervals. 16 bytes (a 128-bit MAC, far beyond what a
//! blind spoofer can guess within a rotation interval) instead of the whole 32: the cookie
//! crosses a constrained link twice per handshake (HelloVerifyRequest and ClientHello), and 32 B
//! is also the most old clients accept.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ring::hmac;

/// Cookie length in bytes (HMAC-SHA256 output truncated).
pub const COOKIE_LEN: usize = 16;

/// Current and previous HMAC-SHA256 cookie keys, with the time the current one was made.
///
/// If the RNG ever fails, the affected key is left unset: cookies made with it verify against
/// nothing (fail closed: no handshake proceeds on a predictable key), and the next
/// [`CookieKeys::rotate_if_due`] tries again regardless of the interval.
pub struct CookieKeys {
    current: Option<hmac::Key>,
    previous: Option<hmac::Key>,
    created: Instant,
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

/// The MAC input: tag (4 / 6) || IP octets || port (BE) || client_params.
fn mac_input(client: &SocketAddr, client_params: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(1 + 16 + 2 + client_params.len());
    match client.ip() {
        IpAddr::V4(ip) => {
            msg.push(4);
            msg.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            msg.push(6);
            msg.extend_from_slice(&ip.octets());
        }
    }
    msg.extend_from_slice(&client.port().to_be_bytes());
    msg.extend_from_slice(client_params);
    msg
}

impl CookieKeys {
    pub fn new(rng: &dyn ring::rand::SecureRandom, now: Instant) -> Self {
        Self {
            current: fresh_key(rng),
            previous: None,
            created: now,
        }
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

    /// Cookie = HMAC-SHA256(current key, client address (tag byte 4/6, IP bytes, port)
    /// || client_params). `client_params` is what the caller extracts from the ClientHello:
    /// version, random, session_id, cipher_suites, compression_methods (not extensions).
    /// The first [`COOKIE_LEN`] bytes. All zeros (which never verifies) if the current key is
    /// unset.
    pub fn generate(&self, client: &SocketAddr, client_params: &[u8]) -> [u8; COOKIE_LEN] {
        let mut out = [0u8; COOKIE_LEN];
        if let Some(key) = &self.current {
            let tag = hmac::sign(key, &mac_input(client, client_params));
            for (d, s) in out.iter_mut().zip(tag.as_ref()) {
                *d = *s;
            }
        }
        out
    }

    /// Constant-time check against the current or the previous key.
    pub fn verify(&self, client: &SocketAddr, client_params: &[u8], cookie: &[u8]) -> bool {
        if cookie.len() != COOKIE_LEN {
            return false;
        }
        let msg = mac_input(client, client_params);
        [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .any(|key| {
                let tag = hmac::sign(key, &msg);
                let diff = tag
                    .as_ref()
                    .iter()
                    .zip(cookie)
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b));
                diff == 0
            })
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

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const PARAMS: &[u8] = b"\xfe\xfd client random, session id, suites, compression";

    #[test]
    fn generate_then_verify() {
        let rng = SystemRandom::new();
        let t0 = Instant::now();
        let keys = CookieKeys::new(&rng, t0);
        let a = addr("192.0.2.1:5684");
        let c = keys.generate(&a, PARAMS);
        assert_eq!(c.len(), COOKIE_LEN);
        assert_ne!(c, [0u8; COOKIE_LEN]);
        assert!(keys.verify(&a, PARAMS, &c));
        // deterministic for the same key and input
        assert_eq!(keys.generate(&a, PARAMS), c);
        // a second CookieKeys (other secret) refuses it
        let other = CookieKeys::new(&rng, t0);
        assert!(!other.verify(&a, PARAMS, &c));
    }

    #[test]
    fn different_address_port_params_or_cookie_refused() {
        let rng = SystemRandom::new();
        let keys = CookieKeys::new(&rng, Instant::now());
        let a = addr("192.0.2.1:5684");
        let c = keys.generate(&a, PARAMS);
        assert!(!keys.verify(&addr("192.0.2.2:5684"), PARAMS, &c));
        assert!(!keys.verify(&addr("192.0.2.1:5685"), PARAMS, &c));
        assert!(!keys.verify(&addr("[::ffff:192.0.2.1]:5684"), PARAMS, &c));
        assert!(!keys.verify(&a, b"other params", &c));
        assert!(!keys.verify(&a, b"", &c));
        let mut bad = c;
        bad[COOKIE_LEN - 1] ^= 1;
        assert!(!keys.verify(&a, PARAMS, &bad));
        assert!(!keys.verify(&a, PARAMS, &c[..COOKIE_LEN - 1]));
        let mut long = c.to_vec();
        long.push(0);
        assert!(!keys.verify(&a, PARAMS, &long));
        assert!(!keys.verify(&a, PARAMS, &[]));
        assert!(!keys.verify(&a, PARAMS, &[0u8; COOKIE_LEN]));
        // IPv6
        let v6 = addr("[2001:db8::1]:40000");
        let c6 = keys.generate(&v6, PARAMS);
        assert!(keys.verify(&v6, PARAMS, &c6));
        assert!(!keys.verify(&addr("[2001:db8::2]:40000"), PARAMS, &c6));
        assert_ne!(c6, c);
    }

    #[test]
    fn valid_after_one_rotation_invalid_after_two() {
        let rng = SystemRandom::new();
        let t0 = Instant::now();
        let interval = Duration::from_secs(60);
        let mut keys = CookieKeys::new(&rng, t0);
        let a = addr("198.51.100.7:1234");
        let c = keys.generate(&a, PARAMS);

        // not due yet
        assert!(!keys.rotate_if_due(&rng, t0 + Duration::from_secs(59), interval));
        assert!(keys.verify(&a, PARAMS, &c));
        // a `now` before `created` does not rotate (no panic either)
        assert!(!keys.rotate_if_due(&rng, t0, interval));

        // first rotation: the old cookie is accepted through the previous key
        assert!(keys.rotate_if_due(&rng, t0 + interval, interval));
        assert!(keys.verify(&a, PARAMS, &c));
        let c2 = keys.generate(&a, PARAMS);
        assert_ne!(c2, c, "new current key makes new cookies");
        assert!(keys.verify(&a, PARAMS, &c2));

        // rotation is measured from the last one
        assert!(!keys.rotate_if_due(&rng, t0 + interval + Duration::from_secs(30), interval));

        // second rotation: the first key is gone
        assert!(keys.rotate_if_due(&rng, t0 + 2 * interval, interval));
        assert!(!keys.verify(&a, PARAMS, &c));
        assert!(keys.verify(&a, PARAMS, &c2));
    }

    #[test]
    fn debug_prints_no_key_material() {
        let rng = SystemRandom::new();
        let keys = CookieKeys::new(&rng, Instant::now());
        let s = format!("{keys:?}");
        assert!(s.contains("current: true"), "{s}");
    }
}
