//! Arrival patterns and per-meter seeds: the part of a fleet run that one run seed decides.
//!
//! A [`Schedule`] lists, for every meter, its start offset from the beginning of the run, the seed of
//! its own random streams (key generation, CoAP Message IDs and tokens, link loss and jitter) and the
//! link it sits behind. It is a pure function of `(FleetPlan, seed)`, so a run can be reproduced,
//! recorded ([`crate::recording`]) and replayed against another server.

use std::str::FromStr;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::link::LinkParams;

/// How meters arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Arrival {
    /// Every meter starts at t = 0 (the fleet coming back after an outage).
    Burst,
    /// Start times spread linearly over `over`: meter i of n starts at `over * i / n`.
    Ramp { over: Duration },
    /// A Poisson process: exponential inter-arrival times with mean `1 / rate_per_s`.
    Poisson { rate_per_s: f64 },
}

/// Error parsing an `--arrival` value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArrivalSpecError {
    #[error("unknown arrival pattern `{0}` (expected burst, ramp:DURATION such as ramp:60s, or poisson:RATE per second such as poisson:50)")]
    Unknown(String),
    #[error("bad arrival parameter `{0}`: {1}")]
    Bad(String, &'static str),
}

impl FromStr for Arrival {
    type Err = ArrivalSpecError;

    /// `burst`, `ramp` (over 60 s), `ramp:30s`, `ramp:500ms`, `poisson` (100/s), `poisson:25.5`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, arg) = match s.split_once([':', '=']) {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (s.trim(), None),
        };
        match name {
            "burst" => Ok(Arrival::Burst),
            "ramp" => {
                let over = match arg {
                    None => Duration::from_secs(60),
                    Some(a) => parse_secs(a)?,
                };
                Ok(Arrival::Ramp { over })
            }
            "poisson" => {
                let rate = match arg {
                    None => 100.0,
                    Some(a) => a
                        .trim_end_matches("/s")
                        .parse::<f64>()
                        .map_err(|_| ArrivalSpecError::Bad(a.to_string(), "not a number"))?,
                };
                if !rate.is_finite() || rate <= 0.0 || rate > 1e6 {
                    return Err(ArrivalSpecError::Bad(
                        rate.to_string(),
                        "rate must be in (0, 1e6] per second",
                    ));
                }
                Ok(Arrival::Poisson { rate_per_s: rate })
            }
            other => Err(ArrivalSpecError::Unknown(other.to_string())),
        }
    }
}

fn parse_secs(a: &str) -> Result<Duration, ArrivalSpecError> {
    let (num, scale) = if let Some(n) = a.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = a.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = a.strip_suffix('m') {
        (n, 60.0)
    } else {
        (a, 1.0)
    };
    let x: f64 = num
        .parse()
        .map_err(|_| ArrivalSpecError::Bad(a.to_string(), "not a duration (e.g. 30s)"))?;
    let secs = x * scale;
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(ArrivalSpecError::Bad(a.to_string(), "must be 0 s to 1 day"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// SplitMix64 finaliser: decorrelates nearby seeds (run seed, meter index).
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of meter `index` in a run with seed `run_seed`.
pub fn meter_seed(run_seed: u64, index: u64) -> u64 {
    mix64(mix64(run_seed) ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// Start offsets of `n` meters for an arrival pattern, from the run seed. Sorted, non-decreasing.
pub fn arrival_offsets(arrival: Arrival, n: usize, run_seed: u64) -> Vec<Duration> {
    match arrival {
        Arrival::Burst => vec![Duration::ZERO; n],
        Arrival::Ramp { over } => {
            let n_u32 = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
            (0..n)
                .map(|i| {
                    let i = u32::try_from(i).unwrap_or(u32::MAX);
                    over.mul_f64(f64::from(i) / f64::from(n_u32))
                })
                .collect()
        }
        Arrival::Poisson { rate_per_s } => {
            let mut rng = ChaCha8Rng::seed_from_u64(mix64(run_seed ^ 0x706f_6973_736f_6e00));
            let mut t = 0.0f64;
            (0..n)
                .map(|_| {
                    // Inverse-CDF sampling of Exp(rate): -ln(1 - U) / rate, U in [0, 1).
                    let u: f64 = rng.gen();
                    t += -(1.0 - u).ln() / rate_per_s;
                    Duration::from_secs_f64(t)
                })
                .collect()
        }
    }
}

/// What one run seed decides about one meter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeterPlan {
    pub index: u64,
    /// Device serial number (from the fleet directory, or minted).
    pub serial: String,
    /// Start offset from the beginning of the run, in microseconds.
    pub start_us: u64,
    pub seed: u64,
    /// Mesh hops drawn for this meter; its link latency and jitter are the base values times this.
    pub hops: u32,
    /// The meter's own link (after the hop draw).
    pub link: LinkParams,
    /// Index of the DCU the meter sits behind, if DCUs are simulated.
    pub dcu: Option<u64>,
}

impl MeterPlan {
    pub fn start(&self) -> Duration {
        Duration::from_micros(self.start_us)
    }
}

/// Inputs of a schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetPlan {
    pub arrival: Arrival,
    pub link: LinkParams,
    /// Hops are drawn uniformly in `1..=max_hops` per meter (1 = every meter one hop).
    pub max_hops: u32,
    /// Meters per DCU; `None` = meters talk to the server directly.
    pub meters_per_dcu: Option<u64>,
}

/// Builds the per-meter plans for `serials` (meter i gets `serials[i]`).
pub fn build_schedule(plan: &FleetPlan, serials: &[String], run_seed: u64) -> Vec<MeterPlan> {
    let offsets = arrival_offsets(plan.arrival, serials.len(), run_seed);
    serials
        .iter()
        .zip(offsets)
        .enumerate()
        .map(|(i, (serial, off))| {
            let index = u64::try_from(i).unwrap_or(u64::MAX);
            let seed = meter_seed(run_seed, index);
            let mut draw = ChaCha8Rng::seed_from_u64(mix64(seed ^ 0x686f_7073));
            let hops = draw.gen_range(1..=plan.max_hops.max(1));
            let mut link = plan.link.clone();
            link.latency *= hops;
            link.jitter *= hops;
            MeterPlan {
                index,
                serial: serial.clone(),
                start_us: u64::try_from(off.as_micros()).unwrap_or(u64::MAX),
                seed,
                hops,
                link,
                dcu: plan.meters_per_dcu.map(|k| index / k.max(1)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn burst_starts_everyone_at_zero() {
        let o = arrival_offsets(Arrival::Burst, 1000, 7);
        assert_eq!(o.len(), 1000);
        assert!(o.iter().all(|d| d.is_zero()));
    }

    #[test]
    fn ramp_is_linear() {
        let o = arrival_offsets(
            Arrival::Ramp {
                over: Duration::from_secs(10),
            },
            100,
            7,
        );
        assert_eq!(o[0], Duration::ZERO);
        assert_eq!(o[50], Duration::from_secs(5));
        assert_eq!(o[99], Duration::from_millis(9900));
        assert!(o
            .windows(2)
            .all(|w| w[1] - w[0] == Duration::from_millis(100)));
    }

    #[test]
    fn poisson_is_reproducible_and_has_the_right_rate() {
        let a = arrival_offsets(Arrival::Poisson { rate_per_s: 50.0 }, 10_000, 7);
        let b = arrival_offsets(Arrival::Poisson { rate_per_s: 50.0 }, 10_000, 7);
        let c = arrival_offsets(Arrival::Poisson { rate_per_s: 50.0 }, 10_000, 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        // 10,000 arrivals at 50/s take ~200 s (sd of the sum = sqrt(n)/rate = 2 s).
        let total = a.last().unwrap().as_secs_f64();
        assert!((192.0..208.0).contains(&total), "total {total}");
        // Exponential gaps: mean 20 ms, and about e^-1 = 36.8% of gaps exceed the mean.
        let gaps: Vec<f64> = std::iter::once(a[0].as_secs_f64())
            .chain(a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()))
            .collect();
        let above = gaps.iter().filter(|g| **g > 0.02).count() as f64 / gaps.len() as f64;
        assert!((0.34..0.40).contains(&above), "fraction above mean {above}");
    }

    #[test]
    fn meter_seeds_differ_and_are_stable() {
        assert_eq!(meter_seed(7, 0), meter_seed(7, 0));
        let seeds: std::collections::HashSet<u64> = (0..10_000).map(|i| meter_seed(7, i)).collect();
        assert_eq!(seeds.len(), 10_000);
        assert_ne!(meter_seed(7, 1), meter_seed(8, 1));
    }

    #[test]
    fn schedule_assigns_dcus_and_hops_reproducibly() {
        let plan = FleetPlan {
            arrival: Arrival::Ramp {
                over: Duration::from_secs(1),
            },
            link: LinkParams::profile(crate::link::LinkProfile::Wisun),
            max_hops: 4,
            meters_per_dcu: Some(10),
        };
        let serials: Vec<String> = (0..35).map(|i| format!("SN{i:06}")).collect();
        let a = build_schedule(&plan, &serials, 3);
        let b = build_schedule(&plan, &serials, 3);
        assert_eq!(a, b);
        assert_eq!(a[9].dcu, Some(0));
        assert_eq!(a[10].dcu, Some(1));
        assert_eq!(a[34].dcu, Some(3));
        assert!(a.iter().all(|m| (1..=4).contains(&m.hops)));
        assert!(a.iter().any(|m| m.hops > 1));
        let m = &a[5];
        assert_eq!(m.link.latency, plan.link.latency * m.hops);
    }

    #[test]
    fn arrival_parsing() {
        assert_eq!("burst".parse::<Arrival>().unwrap(), Arrival::Burst);
        assert_eq!(
            "ramp:30s".parse::<Arrival>().unwrap(),
            Arrival::Ramp {
                over: Duration::from_secs(30)
            }
        );
        assert_eq!(
            "poisson:25".parse::<Arrival>().unwrap(),
            Arrival::Poisson { rate_per_s: 25.0 }
        );
        assert!("poisson:-1".parse::<Arrival>().is_err());
        assert!("storm".parse::<Arrival>().is_err());
    }
}
