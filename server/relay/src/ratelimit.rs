//! Token buckets on the caller's clock: one for all traffic from the mesh, and a fixed table
//! of buckets for meter addresses.
//!
//! The per-address table has a fixed number of slots, so its memory does not grow with the
//! number of meters (nor with the number of addresses a flooder forges). Each address has two
//! slots, chosen by a keyed hash of its IP address, each bucket holding half the address's
//! rate and burst; a datagram spends a token of the fuller of the two. An address alone in
//! its slots gets the whole rate; addresses sharing a slot share that bucket, so a flooding
//! address slows another meter only if *both* of the meter's slots are among the flooder's
//! two (about 4 in slots² for one flooder). The key is secret and random per run: a flooder
//! cannot choose addresses that collide with a given meter.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A rate: `per_sec` tokens a second, at most `burst` saved up. `per_sec` 0 means unlimited.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

impl Rate {
    pub const UNLIMITED: Rate = Rate {
        per_sec: 0.0,
        burst: 0.0,
    };

    pub fn is_unlimited(&self) -> bool {
        self.per_sec <= 0.0
    }
}

/// One bucket; time is milliseconds since the limiter's epoch (8 bytes a bucket).
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Tokens spent below `burst` (0 = full), so that a zeroed bucket is a full one.
    debt: f32,
    last_ms: u32,
}

impl Bucket {
    fn take(&mut self, rate: &Rate, now_ms: u32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = now_ms;
        let debt = (f64::from(self.debt) - elapsed * rate.per_sec).max(0.0);
        if debt + 1.0 > rate.burst {
            self.debt = debt as f32;
            return false;
        }
        self.debt = (debt + 1.0) as f32;
        true
    }
}

/// The limits of the mesh side.
#[derive(Debug)]
pub struct Limiter {
    epoch: Instant,
    per_address: Rate,
    global: Rate,
    slots: Vec<Bucket>,
    global_bucket: Bucket,
    key: [u8; 16],
}

/// Which limit refused a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    PerAddress,
    Global,
}

impl Limiter {
    /// `slots` is rounded up to a power of two (at least 1).
    pub fn new(now: Instant, per_address: Rate, global: Rate, slots: usize, key: [u8; 16]) -> Self {
        let n = slots.max(1).next_power_of_two();
        Limiter {
            epoch: now,
            per_address,
            global,
            slots: if per_address.is_unlimited() {
                Vec::new()
            } else {
                vec![Bucket::default(); n]
            },
            global_bucket: Bucket::default(),
            key,
        }
    }

    fn ms(&self, now: Instant) -> u32 {
        // Wraps after 49 days; a wrap only refills a bucket early.
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// The address's two slots.
    fn slots_of(&self, ip: IpAddr) -> (usize, usize) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.key.hash(&mut h);
        ip.hash(&mut h);
        let v = h.finish();
        let mask = self.slots.len().wrapping_sub(1);
        let a = (v as usize) & mask;
        let mut b = ((v >> 32) as usize) & mask;
        if b == a {
            b = (a + 1) & mask;
        }
        (a, b)
    }

    /// Spends a token of `ip`'s bucket and then of the global one.
    pub fn admit(&mut self, now: Instant, ip: IpAddr) -> Result<(), Refused> {
        let ms = self.ms(now);
        if !self.per_address.is_unlimited() {
            let (a, b) = self.slots_of(ip);
            let half = Rate {
                per_sec: self.per_address.per_sec / 2.0,
                burst: self.per_address.burst / 2.0,
            };
            let debt = |s: &Bucket| {
                f64::from(s.debt) - f64::from(ms.wrapping_sub(s.last_ms)) / 1000.0 * half.per_sec
            };
            let (first, second) = match (self.slots.get(a), self.slots.get(b)) {
                (Some(x), Some(y)) if debt(y) < debt(x) => (b, a),
                _ => (a, b),
            };
            let took = self.slots.get_mut(first).is_some_and(|s| s.take(&half, ms))
                || self
                    .slots
                    .get_mut(second)
                    .is_some_and(|s| s.take(&half, ms));
            if !took {
                return Err(Refused::PerAddress);
            }
        }
        if !self.global.is_unlimited() && !self.global_bucket.take(&self.global, ms) {
            return Err(Refused::Global);
        }
        Ok(())
    }

    /// Bytes the per-address table holds (constant).
    pub fn table_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Bucket>()
    }

    /// How long drained buckets take to refill completely.
    pub fn refill_time(&self) -> Duration {
        if self.per_address.is_unlimited() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.per_address.burst / self.per_address.per_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_address_burst_then_rate() {
        let t0 = Instant::now();
        let mut l = Limiter::new(
            t0,
            Rate {
                per_sec: 10.0,
                burst: 6.0,
            },
            Rate::UNLIMITED,
            1024,
            [1; 16],
        );
        for _ in 0..6 {
            assert!(l.admit(t0, ip("10.0.0.1")).is_ok());
        }
        assert_eq!(l.admit(t0, ip("10.0.0.1")), Err(Refused::PerAddress));
        // Another address has its own buckets (with this key, not in the same slots).
        let (a, b) = l.slots_of(ip("10.0.0.1"));
        let (c, d) = l.slots_of(ip("10.0.0.2"));
        assert!(a != c && a != d && b != c && b != d);
        assert!(l.admit(t0, ip("10.0.0.2")).is_ok());
        // 200 ms later: two tokens (10 a second).
        let t1 = t0 + Duration::from_millis(200);
        assert!(l.admit(t1, ip("10.0.0.1")).is_ok());
        assert!(l.admit(t1, ip("10.0.0.1")).is_ok());
        assert_eq!(l.admit(t1, ip("10.0.0.1")), Err(Refused::PerAddress));
        // Refilled after burst/rate.
        let t2 = t1 + l.refill_time() + Duration::from_millis(1);
        for _ in 0..6 {
            assert!(l.admit(t2, ip("10.0.0.1")).is_ok());
        }
        assert!(l.admit(t2, ip("10.0.0.1")).is_err());
    }

    #[test]
    fn global_limit() {
        let t0 = Instant::now();
        let mut l = Limiter::new(
            t0,
            Rate::UNLIMITED,
            Rate {
                per_sec: 100.0,
                burst: 3.0,
            },
            1,
            [0; 16],
        );
        for i in 0..3 {
            assert!(l.admit(t0, ip(&format!("10.0.0.{i}"))).is_ok());
        }
        assert_eq!(l.admit(t0, ip("10.0.0.9")), Err(Refused::Global));
        assert!(l
            .admit(t0 + Duration::from_millis(10), ip("10.0.0.9"))
            .is_ok());
        assert_eq!(l.table_bytes(), 0);
    }

    #[test]
    fn a_refused_address_does_not_spend_the_global_budget() {
        let t0 = Instant::now();
        let mut l = Limiter::new(
            t0,
            Rate {
                per_sec: 1.0,
                burst: 2.0,
            },
            Rate {
                per_sec: 1.0,
                burst: 10.0,
            },
            4096,
            [9; 16],
        );
        for _ in 0..1000 {
            let _ = l.admit(t0, ip("10.0.0.66"));
        }
        for i in 0..8 {
            assert!(l.admit(t0, ip(&format!("10.0.1.{i}"))).is_ok(), "{i}");
        }
    }

    #[test]
    fn memory_is_fixed() {
        let t0 = Instant::now();
        let mut l = Limiter::new(
            t0,
            Rate {
                per_sec: 1.0,
                burst: 2.0,
            },
            Rate::UNLIMITED,
            1000,
            [0; 16],
        );
        let before = l.table_bytes();
        assert_eq!(before, 1024 * 8);
        for i in 0..100_000u32 {
            let _ = l.admit(t0, IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(l.table_bytes(), before);
    }
}
