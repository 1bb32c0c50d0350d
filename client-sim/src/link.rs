//! Link emulator: a sans-IO model of one direction of a constrained link.
//!
//! A [`LinkDirection`] decides, for each datagram handed to it at virtual time `now`, whether the
//! datagram is lost and, if not, when it arrives at the far end. It models, in this order:
//!
//! 1. **Serialization and queueing.** The link transmits one datagram at a time at `rate_bps`. A
//!    datagram starts when the link is free (`max(now, busy_until)`), so datagrams queue behind
//!    earlier ones (FIFO), and takes `air_bytes * 8 / rate` seconds. A drop-tail buffer limit
//!    (`max_queue_bytes`) discards datagrams that would wait behind more than that many bytes.
//! 2. **Loss.** Independent (Bernoulli) loss, or the bursty Gilbert-Elliott two-state model. A lost
//!    datagram still occupies the link (it was sent; nobody received it).
//! 3. **Propagation.** One-way `latency` plus a uniform jitter in `[0, jitter]`. Jitter can reorder
//!    datagrams, as on real multi-hop meshes.
//!
//! Frame accounting (802.15.4 / 6LoWPAN, see [`FrameModel`]) counts the 127-byte frames a
//! datagram needs; the on-air byte count (payload + per-frame headers) is what the rate limit
//! serializes.
//!
//! All randomness comes from a seeded [`ChaCha8Rng`], and time is an input, so every decision is
//! reproducible from `(params, seed, sequence of (now, len))`. The tokio runtime wrapper lives in
//! [`crate::net`].

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// IEEE 802.15.4 / 6LoWPAN framing assumptions used to count frames and on-air bytes.
///
/// Defaults (documented in the crate README and `--help`):
/// * `frame_bytes` 127: the 802.15.4-2006 aMaxPHYPacketSize (PSDU).
/// * `mac_overhead_bytes` 25: MAC header with 16-bit PAN ID, 64-bit source and short destination
///   address, frame control, sequence number, plus the 2-byte FCS (RFC 4944 §1 assumes 25 B
///   of MAC overhead, leaving 102 B of MAC payload; 21 B with short addresses both ends).
/// * `compressed_header_bytes` 10: 6LoWPAN IPHC (RFC 6282) with a link-local/context-compressed
///   IPv6 header (~4-6 B) and UDP NHC with compressed ports and elided checksum (~4 B). It is
///   carried once per datagram, in the first frame.
/// * `frag1_header_bytes` 4 and `fragn_header_bytes` 5: RFC 4944 §5.3 fragmentation headers. A
///   datagram that does not fit one frame is fragmented; every fragment except the last carries a
///   multiple of 8 bytes of the (compressed) IPv6 packet.
///
/// * `relay_header_bytes` 0: bytes a relay adds to every datagram on the mesh (its header in
///   front of the UDP payload, e.g. 38 B for a relayed meter, `--link ...,relay=38`); they
///   take room in the frames like payload does.
///
/// So an unfragmented datagram may carry up to 102 - 10 = **92 B of UDP payload** in one frame.
/// A DTLS record of a 64-byte CoAP block (64 + ~12 CoAP + 29 DTLS/CCM_8 = ~105 B) needs two frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameModel {
    pub frame_bytes: u32,
    pub mac_overhead_bytes: u32,
    pub compressed_header_bytes: u32,
    pub frag1_header_bytes: u32,
    pub fragn_header_bytes: u32,
    #[serde(default)]
    pub relay_header_bytes: u32,
}

impl Default for FrameModel {
    fn default() -> Self {
        FrameModel {
            frame_bytes: 127,
            mac_overhead_bytes: 25,
            compressed_header_bytes: 10,
            frag1_header_bytes: 4,
            fragn_header_bytes: 5,
            relay_header_bytes: 0,
        }
    }
}

impl FrameModel {
    /// MAC payload per frame (127 - 25 = 102 B with the defaults).
    pub fn mac_payload(&self) -> u32 {
        self.frame_bytes.saturating_sub(self.mac_overhead_bytes)
    }

    /// UDP payload bytes that fit in a single unfragmented frame (92 B with the defaults, 54 B
    /// behind a 38-byte relay header).
    pub fn single_frame_payload(&self) -> u32 {
        self.mac_payload()
            .saturating_sub(self.compressed_header_bytes)
            .saturating_sub(self.relay_header_bytes)
    }

    /// Number of 802.15.4 frames needed for a UDP datagram of `udp_payload` bytes.
    ///
    /// RFC 4944 §5.3: the first fragment carries FRAG1 (4 B) + the compressed header + data, later
    /// fragments FRAGN (5 B) + data; fragment data (except the last) is a multiple of 8 bytes.
    pub fn frames(&self, udp_payload: usize) -> u32 {
        let len = u64::try_from(udp_payload)
            .unwrap_or(u64::MAX)
            .saturating_add(u64::from(self.relay_header_bytes));
        let mac = u64::from(self.mac_payload());
        let hdr = u64::from(self.compressed_header_bytes);
        if len + hdr <= mac {
            return 1;
        }
        // First fragment: the compressed header and as much data as fits, rounded down so that the
        // (header + data) is a multiple of 8 (the offset unit of FRAGN).
        let first_room = mac.saturating_sub(u64::from(self.frag1_header_bytes));
        let first_unit = (first_room / 8) * 8;
        let first_data = first_unit.saturating_sub(hdr);
        let remaining = len.saturating_sub(first_data);
        let next_room = mac.saturating_sub(u64::from(self.fragn_header_bytes));
        let next_unit = (next_room / 8) * 8;
        if next_unit == 0 {
            return u32::MAX;
        }
        // Later fragments; the last one may carry less than a multiple of 8.
        let frames = 1 + remaining.div_ceil(next_unit);
        u32::try_from(frames).unwrap_or(u32::MAX)
    }

    /// Bytes on the air for a UDP datagram: payload + compressed header + per-frame MAC and
    /// fragmentation headers. This is what the link's rate limit serializes.
    pub fn air_bytes(&self, udp_payload: usize) -> u64 {
        let len = u64::try_from(udp_payload)
            .unwrap_or(u64::MAX)
            .saturating_add(u64::from(self.relay_header_bytes));
        let frames = u64::from(self.frames(udp_payload));
        let frag = if frames > 1 {
            u64::from(self.frag1_header_bytes) + (frames - 1) * u64::from(self.fragn_header_bytes)
        } else {
            0
        };
        len + u64::from(self.compressed_header_bytes)
            + frames * u64::from(self.mac_overhead_bytes)
            + frag
    }
}

/// Loss model of one link direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LossModel {
    /// No loss.
    #[default]
    None,
    /// Each datagram is lost independently with probability `p`.
    Independent { p: f64 },
    /// Gilbert-Elliott: a two-state Markov chain evaluated once per datagram. In state Good the
    /// datagram is lost with `loss_good`, in Bad with `loss_bad`; before each datagram the chain
    /// moves Good->Bad with `p_good_to_bad` and Bad->Good with `p_bad_to_good`. Mean burst length
    /// in Bad is `1 / p_bad_to_good` datagrams; the stationary loss rate is
    /// `(r*loss_good + p*loss_bad) / (p + r)` with p = G->B, r = B->G.
    GilbertElliott {
        p_good_to_bad: f64,
        p_bad_to_good: f64,
        loss_good: f64,
        loss_bad: f64,
    },
}

impl LossModel {
    /// The long-run fraction of datagrams lost.
    pub fn mean_loss(&self) -> f64 {
        match *self {
            LossModel::None => 0.0,
            LossModel::Independent { p } => p,
            LossModel::GilbertElliott {
                p_good_to_bad: p,
                p_bad_to_good: r,
                loss_good,
                loss_bad,
            } => {
                if p + r <= 0.0 {
                    loss_good
                } else {
                    (r * loss_good + p * loss_bad) / (p + r)
                }
            }
        }
    }
}

/// Parameters of one link (both directions use the same parameters, with independent RNG streams).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkParams {
    /// One-way propagation latency (per direction).
    pub latency: Duration,
    /// Uniform extra delay in `[0, jitter]` added per datagram.
    pub jitter: Duration,
    pub loss: LossModel,
    /// Serialization rate in bit/s of on-air bytes; `None` = unlimited (no serialization delay).
    pub rate_bps: Option<u64>,
    /// Drop-tail buffer: a datagram that would wait behind more than this many on-air bytes is
    /// dropped. `None` = unbounded.
    pub max_queue_bytes: Option<u64>,
    pub frames: FrameModel,
    /// Draw loss per 802.15.4 frame instead of per datagram: a fragmented datagram is lost when
    /// any of its frames is (RFC 4944 fragments are not retransmitted one by one). `--link
    /// ...,lossper=frame`.
    #[serde(default)]
    pub loss_per_frame: bool,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams::profile(LinkProfile::Lan)
    }
}

/// Named link profiles. The numbers are order-of-magnitude figures for each technology, chosen so
/// that the simulated enrollments show the behaviour seen in the field; they are not measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkProfile {
    /// Loopback-like: 1 ms, no jitter, no loss, unlimited rate.
    Lan,
    /// Wi-SUN FAN mesh, a few hops: 150 ms one-way, 100 ms jitter, 50 kbit/s PHY (the FSK
    /// 50 kbit/s mode), Gilbert-Elliott loss ~4% mean in bursts (G->B 0.02, B->G 0.3, loss in Bad 0.6).
    Wisun,
    /// Narrowband G3/PRIME power-line: 400 ms one-way, 200 ms jitter, 20 kbit/s, bursty loss ~9%
    /// mean (impulsive noise: G->B 0.05, B->G 0.3, loss in Bad 0.5, loss in Good 0.01).
    Plc,
    /// LTE-M / NB-IoT class cellular: 80 ms one-way, 40 ms jitter, 200 kbit/s, 1% independent loss.
    Cellular,
}

impl LinkProfile {
    pub const ALL: [LinkProfile; 4] = [
        LinkProfile::Lan,
        LinkProfile::Wisun,
        LinkProfile::Plc,
        LinkProfile::Cellular,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            LinkProfile::Lan => "lan",
            LinkProfile::Wisun => "wisun",
            LinkProfile::Plc => "plc",
            LinkProfile::Cellular => "cellular",
        }
    }
}

impl LinkParams {
    pub fn profile(p: LinkProfile) -> LinkParams {
        let frames = FrameModel::default();
        match p {
            LinkProfile::Lan => LinkParams {
                latency: Duration::from_millis(1),
                jitter: Duration::ZERO,
                loss: LossModel::None,
                rate_bps: None,
                max_queue_bytes: None,
                frames,
                loss_per_frame: false,
            },
            LinkProfile::Wisun => LinkParams {
                latency: Duration::from_millis(150),
                jitter: Duration::from_millis(100),
                loss: LossModel::GilbertElliott {
                    p_good_to_bad: 0.02,
                    p_bad_to_good: 0.3,
                    loss_good: 0.0,
                    loss_bad: 0.6,
                },
                rate_bps: Some(50_000),
                max_queue_bytes: Some(16 * 1024),
                frames,
                loss_per_frame: false,
            },
            LinkProfile::Plc => LinkParams {
                latency: Duration::from_millis(400),
                jitter: Duration::from_millis(200),
                loss: LossModel::GilbertElliott {
                    p_good_to_bad: 0.05,
                    p_bad_to_good: 0.3,
                    loss_good: 0.01,
                    loss_bad: 0.5,
                },
                rate_bps: Some(20_000),
                max_queue_bytes: Some(8 * 1024),
                frames,
                loss_per_frame: false,
            },
            LinkProfile::Cellular => LinkParams {
                latency: Duration::from_millis(80),
                jitter: Duration::from_millis(40),
                loss: LossModel::Independent { p: 0.01 },
                rate_bps: Some(200_000),
                max_queue_bytes: Some(64 * 1024),
                frames,
                loss_per_frame: false,
            },
        }
    }

    /// Serialization time of `air_bytes` at the configured rate (rounded up to whole nanoseconds).
    pub fn serialization_delay(&self, air_bytes: u64) -> Duration {
        match self.rate_bps {
            None | Some(0) => Duration::ZERO,
            Some(rate) => {
                let bits = u128::from(air_bytes) * 8 * 1_000_000_000;
                let nanos = bits.div_ceil(u128::from(rate));
                Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            }
        }
    }
}

/// Error parsing a `--link` specification.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LinkSpecError {
    #[error("unknown link profile or key `{0}` (profiles: lan, wisun, plc, cellular; keys: profile, loss, ge, lossper, relay, latency, jitter, rate, queue)")]
    UnknownKey(String),
    #[error("bad value `{value}` for `{key}`: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: &'static str,
    },
}

fn parse_duration(key: &str, v: &str) -> Result<Duration, LinkSpecError> {
    let bad = |reason| LinkSpecError::BadValue {
        key: key.to_string(),
        value: v.to_string(),
        reason,
    };
    let (num, mult_ns) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1_000_000.0)
    } else if let Some(n) = v.strip_suffix("us") {
        (n, 1_000.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1_000_000_000.0)
    } else {
        return Err(bad("expected a unit: s, ms or us (e.g. 400ms)"));
    };
    let x: f64 = num.trim().parse().map_err(|_| bad("not a number"))?;
    if !(0.0..=3600.0 * 1e9).contains(&(x * mult_ns)) || !x.is_finite() {
        return Err(bad("out of range (0 to 1 h)"));
    }
    Ok(Duration::from_nanos((x * mult_ns).round() as u64))
}

fn parse_prob(key: &str, v: &str) -> Result<f64, LinkSpecError> {
    let p: f64 = v.trim().parse().map_err(|_| LinkSpecError::BadValue {
        key: key.to_string(),
        value: v.to_string(),
        reason: "not a number",
    })?;
    if !(0.0..=1.0).contains(&p) {
        return Err(LinkSpecError::BadValue {
            key: key.to_string(),
            value: v.to_string(),
            reason: "a probability must be in [0, 1]",
        });
    }
    Ok(p)
}

fn parse_rate(key: &str, v: &str) -> Result<Option<u64>, LinkSpecError> {
    let bad = |reason| LinkSpecError::BadValue {
        key: key.to_string(),
        value: v.to_string(),
        reason,
    };
    if v == "unlimited" || v == "0" {
        return Ok(None);
    }
    let lower = v.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("mbps") {
        (n.to_string(), 1_000_000.0)
    } else if let Some(n) = lower.strip_suffix("kbps") {
        (n.to_string(), 1_000.0)
    } else if let Some(n) = lower.strip_suffix("bps") {
        (n.to_string(), 1.0)
    } else {
        return Err(bad("expected bps, kbps or mbps (e.g. 50kbps)"));
    };
    let x: f64 = num.trim().parse().map_err(|_| bad("not a number"))?;
    let bps = x * mult;
    if !bps.is_finite() || !(1.0..=1e12).contains(&bps) {
        return Err(bad("out of range (1 bps to 1 Tbps)"));
    }
    Ok(Some(bps.round() as u64))
}

impl FromStr for LinkParams {
    type Err = LinkSpecError;

    /// Parses `wisun`, or `key=value,...` with keys `profile` (base profile, default lan), `loss`
    /// (independent probability), `ge=P_GB/P_BG/LOSS_BAD[/LOSS_GOOD]`, `latency`, `jitter`
    /// (durations with unit s/ms/us), `rate` (bps/kbps/mbps or `unlimited`), `queue` (bytes).
    /// Example: `loss=0.2,latency=400ms,jitter=100ms,rate=50kbps`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(p) = LinkProfile::ALL.iter().find(|p| p.name() == s) {
            return Ok(LinkParams::profile(*p));
        }
        let mut params = LinkParams::profile(LinkProfile::Lan);
        // A profile given first (as `profile=wisun` or a bare name) is the base the keys modify.
        for (i, part) in s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            let Some((key, value)) = part.split_once('=') else {
                if i == 0 {
                    if let Some(p) = LinkProfile::ALL.iter().find(|p| p.name() == part) {
                        params = LinkParams::profile(*p);
                        continue;
                    }
                }
                return Err(LinkSpecError::UnknownKey(part.to_string()));
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "profile" => {
                    let p = LinkProfile::ALL
                        .iter()
                        .find(|p| p.name() == value)
                        .ok_or_else(|| LinkSpecError::UnknownKey(value.to_string()))?;
                    params = LinkParams::profile(*p);
                }
                "loss" => {
                    let p = parse_prob(key, value)?;
                    params.loss = if p == 0.0 {
                        LossModel::None
                    } else {
                        LossModel::Independent { p }
                    };
                }
                "ge" => {
                    let parts: Vec<&str> = value.split('/').collect();
                    if !(3..=4).contains(&parts.len()) {
                        return Err(LinkSpecError::BadValue {
                            key: key.to_string(),
                            value: value.to_string(),
                            reason: "expected P_GOOD_TO_BAD/P_BAD_TO_GOOD/LOSS_BAD[/LOSS_GOOD]",
                        });
                    }
                    let get = |i: usize| -> Result<f64, LinkSpecError> {
                        parts.get(i).map_or(Ok(0.0), |v| parse_prob(key, v))
                    };
                    params.loss = LossModel::GilbertElliott {
                        p_good_to_bad: get(0)?,
                        p_bad_to_good: get(1)?,
                        loss_bad: get(2)?,
                        loss_good: get(3)?,
                    };
                }
                "lossper" => {
                    params.loss_per_frame = match value {
                        "frame" => true,
                        "datagram" => false,
                        _ => {
                            return Err(LinkSpecError::BadValue {
                                key: key.to_string(),
                                value: value.to_string(),
                                reason: "expected `frame` or `datagram`",
                            })
                        }
                    }
                }
                "relay" => {
                    params.frames.relay_header_bytes =
                        value.parse().map_err(|_| LinkSpecError::BadValue {
                            key: key.to_string(),
                            value: value.to_string(),
                            reason: "expected the relay header's size in bytes",
                        })?
                }
                "latency" => params.latency = parse_duration(key, value)?,
                "jitter" => params.jitter = parse_duration(key, value)?,
                "rate" => params.rate_bps = parse_rate(key, value)?,
                "queue" => {
                    params.max_queue_bytes = if value == "unlimited" {
                        None
                    } else {
                        Some(value.parse().map_err(|_| LinkSpecError::BadValue {
                            key: key.to_string(),
                            value: value.to_string(),
                            reason: "expected a byte count or `unlimited`",
                        })?)
                    }
                }
                other => return Err(LinkSpecError::UnknownKey(other.to_string())),
            }
        }
        Ok(params)
    }
}

impl fmt::Display for LinkParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "latency={}ms,jitter={}ms",
            self.latency.as_millis(),
            self.jitter.as_millis()
        )?;
        match self.loss {
            LossModel::None => {}
            LossModel::Independent { p } => write!(f, ",loss={p}")?,
            LossModel::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_good,
                loss_bad,
            } => write!(
                f,
                ",ge={p_good_to_bad}/{p_bad_to_good}/{loss_bad}/{loss_good}"
            )?,
        }
        match self.rate_bps {
            Some(r) => write!(f, ",rate={r}bps")?,
            None => write!(f, ",rate=unlimited")?,
        }
        if let Some(q) = self.max_queue_bytes {
            write!(f, ",queue={q}")?;
        }
        if self.loss_per_frame {
            write!(f, ",lossper=frame")?;
        }
        if self.frames.relay_header_bytes > 0 {
            write!(f, ",relay={}", self.frames.relay_header_bytes)?;
        }
        Ok(())
    }
}

/// What happened to a datagram submitted to a link direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Arrives at the far end at this instant.
    Deliver { at: Instant },
    /// Lost on the air (after occupying the link until `busy_until`).
    Lost,
    /// Dropped at the tail of a full transmit queue.
    QueueFull,
}

/// Counters of one link direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCounters {
    pub datagrams: u64,
    pub bytes: u64,
    pub frames: u64,
    pub air_bytes: u64,
    pub lost: u64,
    pub queue_drops: u64,
}

impl std::ops::AddAssign for LinkCounters {
    fn add_assign(&mut self, o: Self) {
        self.datagrams += o.datagrams;
        self.bytes += o.bytes;
        self.frames += o.frames;
        self.air_bytes += o.air_bytes;
        self.lost += o.lost;
        self.queue_drops += o.queue_drops;
    }
}

/// One direction of an emulated link (sans-IO: time is an input, randomness is seeded).
#[derive(Debug, Clone)]
pub struct LinkDirection {
    params: LinkParams,
    rng: ChaCha8Rng,
    /// Gilbert-Elliott state: true = Bad.
    ge_bad: bool,
    /// When the transmitter becomes free (end of serialization of the last datagram).
    busy_until: Option<Instant>,
    counters: LinkCounters,
}

impl LinkDirection {
    pub fn new(params: LinkParams, seed: u64) -> LinkDirection {
        LinkDirection {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            ge_bad: false,
            busy_until: None,
            counters: LinkCounters::default(),
        }
    }

    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    pub fn counters(&self) -> LinkCounters {
        self.counters
    }

    /// On-air bytes waiting (or being serialized) at `now`.
    pub fn queued_air_bytes(&self, now: Instant) -> u64 {
        match (self.busy_until, self.params.rate_bps) {
            (Some(b), Some(rate)) if b > now && rate > 0 => {
                let secs = (b - now).as_secs_f64();
                (secs * rate as f64 / 8.0).ceil() as u64
            }
            _ => 0,
        }
    }

    /// Whether the next datagram is lost, advancing the Gilbert-Elliott chain.
    fn draw_loss(&mut self) -> bool {
        match self.params.loss {
            LossModel::None => false,
            LossModel::Independent { p } => self.rng.gen_bool(p),
            LossModel::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_good,
                loss_bad,
            } => {
                let flip = if self.ge_bad {
                    p_bad_to_good
                } else {
                    p_good_to_bad
                };
                if self.rng.gen_bool(flip) {
                    self.ge_bad = !self.ge_bad;
                }
                let p = if self.ge_bad { loss_bad } else { loss_good };
                self.rng.gen_bool(p)
            }
        }
    }

    /// Hands a UDP datagram of `len` bytes to the link at `now`.
    pub fn submit(&mut self, now: Instant, len: usize) -> Verdict {
        let frames = self.params.frames.frames(len);
        let air = self.params.frames.air_bytes(len);
        self.counters.datagrams += 1;
        self.counters.bytes += u64::try_from(len).unwrap_or(u64::MAX);
        self.counters.frames += u64::from(frames);
        self.counters.air_bytes += air;

        if let Some(limit) = self.params.max_queue_bytes {
            if self.queued_air_bytes(now) + air > limit {
                self.counters.queue_drops += 1;
                return Verdict::QueueFull;
            }
        }
        let start = match self.busy_until {
            Some(b) if b > now => b,
            _ => now,
        };
        let done = start + self.params.serialization_delay(air);
        self.busy_until = Some(done);

        // Draw loss and jitter for every datagram, in a fixed order, so that the random stream
        // does not depend on outcomes (per frame: one draw for each of its frames).
        let lost = if self.params.loss_per_frame {
            (0..frames).fold(false, |lost, _| self.draw_loss() | lost)
        } else {
            self.draw_loss()
        };
        let jitter = if self.params.jitter.is_zero() {
            Duration::ZERO
        } else {
            let j = u64::try_from(self.params.jitter.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(self.rng.gen_range(0..=j))
        };
        if lost {
            self.counters.lost += 1;
            return Verdict::Lost;
        }
        Verdict::Deliver {
            at: done + self.params.latency + jitter,
        }
    }
}

/// A duplex link: independent up (meter -> server) and down directions with the same parameters.
#[derive(Debug, Clone)]
pub struct Link {
    pub up: LinkDirection,
    pub down: LinkDirection,
}

impl Link {
    pub fn new(params: LinkParams, seed: u64) -> Link {
        Link {
            up: LinkDirection::new(params.clone(), seed ^ 0x7570_7570_7570_7570),
            down: LinkDirection::new(params, seed ^ 0x646f_776e_646f_776e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lossless(rate: Option<u64>) -> LinkParams {
        LinkParams {
            latency: Duration::from_millis(100),
            jitter: Duration::ZERO,
            loss: LossModel::None,
            rate_bps: rate,
            max_queue_bytes: None,
            frames: FrameModel::default(),
            loss_per_frame: false,
        }
    }

    #[test]
    fn frame_counting_follows_rfc4944_fragmentation() {
        let m = FrameModel::default();
        assert_eq!(m.mac_payload(), 102);
        assert_eq!(m.single_frame_payload(), 92);
        assert_eq!(m.frames(0), 1);
        assert_eq!(m.frames(92), 1);
        // 93 B no longer fits: FRAG1 carries 96 B (98 rounded down to 8) of which 10 header,
        // so 86 B data; FRAGN carries 96 B (97 rounded down).
        assert_eq!(m.frames(93), 2);
        assert_eq!(m.frames(86 + 96), 2);
        assert_eq!(m.frames(86 + 96 + 1), 3);
        // A 1,152-byte CoAP-sized datagram: ceil((1152-86)/96) + 1 = 13 frames.
        assert_eq!(m.frames(1152), 13);
        // On-air bytes: payload + header + 25 B MAC per frame + fragmentation headers.
        assert_eq!(m.air_bytes(50), 50 + 10 + 25);
        assert_eq!(m.air_bytes(100), 100 + 10 + 2 * 25 + 4 + 5);
    }

    #[test]
    fn a_relay_header_takes_room_in_the_frames() {
        let m = FrameModel {
            relay_header_bytes: 38,
            ..FrameModel::default()
        };
        assert_eq!(m.single_frame_payload(), 54);
        assert_eq!(m.frames(54), 1);
        assert_eq!(m.frames(55), 2);
        assert_eq!(m.frames(1152), FrameModel::default().frames(1152 + 38));
        assert_eq!(m.air_bytes(50), 50 + 38 + 10 + 25);
        let p: LinkParams = "wisun,relay=38,lossper=frame".parse().unwrap();
        assert_eq!(p.frames.relay_header_bytes, 38);
        assert!(p.loss_per_frame);
        let again: LinkParams = p.to_string().parse().unwrap();
        assert_eq!((again.frames, again.loss_per_frame), (p.frames, true));
        assert!("lossper=packet".parse::<LinkParams>().is_err());
        assert!("relay=x".parse::<LinkParams>().is_err());
    }

    #[test]
    fn loss_per_frame_loses_fragmented_datagrams_more_often() {
        let mut params = lossless(None);
        params.loss = LossModel::Independent { p: 0.1 };
        params.loss_per_frame = true;
        let t0 = Instant::now();
        let mut d = LinkDirection::new(params.clone(), 21);
        // One frame: 10%; 13 frames (1152 B): 1 - 0.9^13 = 74.6%.
        let small = (0..5000)
            .filter(|_| d.submit(t0, 50) == Verdict::Lost)
            .count();
        let big = (0..5000)
            .filter(|_| d.submit(t0, 1152) == Verdict::Lost)
            .count();
        assert!((400..=600).contains(&small), "{small}");
        assert!((3550..=3900).contains(&big), "{big}");
        params.loss_per_frame = false;
        let mut d = LinkDirection::new(params, 21);
        let big = (0..5000)
            .filter(|_| d.submit(t0, 1152) == Verdict::Lost)
            .count();
        assert!((400..=600).contains(&big), "per datagram: {big}");
    }

    #[test]
    fn serialization_delay_is_exact_and_queues_fifo() {
        let params = lossless(Some(50_000));
        let t0 = Instant::now();
        let mut d = LinkDirection::new(params.clone(), 1);
        // 50 B datagram -> 85 on-air bytes = 680 bits at 50 kbit/s = 13.6 ms.
        assert_eq!(
            params.serialization_delay(85),
            Duration::from_micros(13_600)
        );
        let v1 = d.submit(t0, 50);
        assert_eq!(
            v1,
            Verdict::Deliver {
                at: t0 + Duration::from_micros(13_600) + Duration::from_millis(100)
            }
        );
        // A second datagram at the same instant waits for the first one.
        let v2 = d.submit(t0, 50);
        assert_eq!(
            v2,
            Verdict::Deliver {
                at: t0 + Duration::from_micros(27_200) + Duration::from_millis(100)
            }
        );
        // After the link went idle there is no queueing.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            d.submit(later, 50),
            Verdict::Deliver {
                at: later + Duration::from_micros(13_600) + Duration::from_millis(100)
            }
        );
        // Unlimited rate: only latency.
        let mut u = LinkDirection::new(lossless(None), 1);
        assert_eq!(
            u.submit(t0, 1000),
            Verdict::Deliver {
                at: t0 + Duration::from_millis(100)
            }
        );
    }

    #[test]
    fn drop_tail_queue_limit() {
        let mut params = lossless(Some(8_000)); // 1 byte per ms
        params.max_queue_bytes = Some(200);
        let t0 = Instant::now();
        let mut d = LinkDirection::new(params, 3);
        // 50 B -> 85 air bytes each: the first two fit (170), the third would make 255 > 200.
        assert!(matches!(d.submit(t0, 50), Verdict::Deliver { .. }));
        assert!(matches!(d.submit(t0, 50), Verdict::Deliver { .. }));
        assert_eq!(d.submit(t0, 50), Verdict::QueueFull);
        assert_eq!(d.counters().queue_drops, 1);
        // After 100 ms, 100 bytes have drained: 70 queued + 85 fits.
        assert!(matches!(
            d.submit(t0 + Duration::from_millis(100), 50),
            Verdict::Deliver { .. }
        ));
    }

    #[test]
    fn independent_loss_rate_matches_configuration() {
        let mut params = lossless(None);
        params.loss = LossModel::Independent { p: 0.2 };
        let t0 = Instant::now();
        let mut d = LinkDirection::new(params, 7);
        let lost = (0..10_000)
            .filter(|_| d.submit(t0, 40) == Verdict::Lost)
            .count();
        // Binomial(10000, 0.2): sd = 40; accept +-4 sd.
        assert!((1840..=2160).contains(&lost), "lost {lost} of 10000");
        assert_eq!(d.counters().lost, lost as u64);
        // Same seed -> same decisions.
        let mut a = LinkDirection::new(d.params().clone(), 99);
        let mut b = LinkDirection::new(d.params().clone(), 99);
        let va: Vec<_> = (0..1000).map(|_| a.submit(t0, 40)).collect();
        let vb: Vec<_> = (0..1000).map(|_| b.submit(t0, 40)).collect();
        assert_eq!(va, vb);
    }

    /// Mean length of runs of consecutive losses.
    fn mean_burst(losses: &[bool]) -> f64 {
        let mut bursts = 0u32;
        let mut lost = 0u32;
        let mut prev = false;
        for &l in losses {
            if l {
                lost += 1;
                if !prev {
                    bursts += 1;
                }
            }
            prev = l;
        }
        f64::from(lost) / f64::from(bursts.max(1))
    }

    #[test]
    fn gilbert_elliott_is_bursty_with_the_stationary_mean() {
        let ge = LossModel::GilbertElliott {
            p_good_to_bad: 0.05,
            p_bad_to_good: 0.2,
            loss_good: 0.0,
            loss_bad: 1.0,
        };
        assert!((ge.mean_loss() - 0.2).abs() < 1e-12);
        let mut params = lossless(None);
        params.loss = ge;
        let t0 = Instant::now();
        let mut d = LinkDirection::new(params.clone(), 11);
        let ge_losses: Vec<bool> = (0..20_000)
            .map(|_| d.submit(t0, 40) == Verdict::Lost)
            .collect();
        let rate = ge_losses.iter().filter(|l| **l).count() as f64 / 20_000.0;
        assert!((rate - 0.2).abs() < 0.03, "GE loss rate {rate}");
        // Bad state lasts 1/0.2 = 5 datagrams on average, all lost.
        let ge_burst = mean_burst(&ge_losses);
        assert!((4.0..6.0).contains(&ge_burst), "GE mean burst {ge_burst}");

        // Independent loss at the same mean: bursts of ~1/(1-0.2) = 1.25.
        params.loss = LossModel::Independent { p: 0.2 };
        let mut i = LinkDirection::new(params, 11);
        let ind_losses: Vec<bool> = (0..20_000)
            .map(|_| i.submit(t0, 40) == Verdict::Lost)
            .collect();
        let ind_burst = mean_burst(&ind_losses);
        assert!(
            (1.1..1.4).contains(&ind_burst),
            "independent burst {ind_burst}"
        );
    }

    #[test]
    fn jitter_stays_within_bounds_and_is_seeded() {
        let mut params = lossless(None);
        params.jitter = Duration::from_millis(50);
        let t0 = Instant::now();
        let mut d = LinkDirection::new(params.clone(), 5);
        let mut min = Duration::MAX;
        let mut max = Duration::ZERO;
        for _ in 0..2000 {
            let Verdict::Deliver { at } = d.submit(t0, 10) else {
                panic!("no loss configured")
            };
            let delay = at - t0;
            min = min.min(delay);
            max = max.max(delay);
        }
        assert!(min >= Duration::from_millis(100));
        assert!(max <= Duration::from_millis(150));
        assert!(
            max - min > Duration::from_millis(45),
            "jitter spread {:?}",
            max - min
        );
    }

    #[test]
    fn link_spec_parsing() {
        let p: LinkParams = "loss=0.2,latency=400ms,jitter=100ms,rate=50kbps"
            .parse()
            .unwrap();
        assert_eq!(p.loss, LossModel::Independent { p: 0.2 });
        assert_eq!(p.latency, Duration::from_millis(400));
        assert_eq!(p.jitter, Duration::from_millis(100));
        assert_eq!(p.rate_bps, Some(50_000));
        let w: LinkParams = "wisun".parse().unwrap();
        assert_eq!(w, LinkParams::profile(LinkProfile::Wisun));
        let w2: LinkParams = "plc,loss=0.1".parse().unwrap();
        assert_eq!(w2.latency, Duration::from_millis(400));
        assert_eq!(w2.loss, LossModel::Independent { p: 0.1 });
        let g: LinkParams = "ge=0.01/0.3/0.8".parse().unwrap();
        assert!(matches!(g.loss, LossModel::GilbertElliott { loss_bad, .. } if loss_bad == 0.8));
        assert!("loss=2".parse::<LinkParams>().is_err());
        assert!("latency=5".parse::<LinkParams>().is_err());
        assert!("bogus=1".parse::<LinkParams>().is_err());
        // Display round-trips.
        let again: LinkParams = p.to_string().parse().unwrap();
        assert_eq!(again.loss, p.loss);
        assert_eq!(again.rate_bps, p.rate_bps);
    }
}
