//! Where an enrollment's bytes and 802.15.4 frames go: every datagram a meter's link carries,
//! split by phase (each DTLS flight, each EST request and response, alerts), with the part
//! that is payload, CoAP header and options, or DTLS record overhead, and the part that was
//! a retransmission.
//!
//! A meter's [`Ledger`] sits beside its emulated link ([`crate::net::MeterLink`]): the link
//! records every datagram it is handed, in the same place it counts bytes and frames, so the
//! phase rows of a meter add up exactly to its link counters. The link sees only what is on
//! the wire; the record headers of a DTLS handshake are plaintext and say which flight a
//! datagram belongs to. Application data is encrypted, so the driver, which holds the
//! plaintext, annotates it: before each CoAP datagram it sends, which EST exchange it belongs
//! to, its length and payload length and whether the same bytes went out before
//! ([`Ledger::note_up`]); for each CoAP datagram it receives, the same ([`Ledger::note_down`]).
//!
//! Rules, in order (`dir` is up = meter to server, or down):
//! 1. A datagram whose first record is an epoch-0 handshake record belongs to the flight of its
//!    first message: ClientHello and HelloVerifyRequest to [`Phase::Hello`]; ServerHello,
//!    Certificate, ServerKeyExchange, CertificateRequest and ServerHelloDone down to
//!    [`Phase::ServerFlight`]; Certificate, ClientKeyExchange and CertificateVerify up to
//!    [`Phase::ClientFlight`]. A ChangeCipherSpec first: up the client flight, down
//!    [`Phase::FinalFlight`]. A plaintext alert: [`Phase::Alert`].
//! 2. Encrypted and sent up: the driver's next note says which EST exchange (or that it is the
//!    close_notify); without a note during a handshake it is the client's Finished.
//! 3. Encrypted and received down during a handshake: the server's Finished; after it,
//!    application data, resolved by the driver's next note in arrival order. A datagram lost
//!    on the link never reaches the driver: it takes the exchange and split of the first
//!    delivered datagram after it (the server resends the identical bytes). A datagram nobody
//!    read (a late duplicate after the session closed) counts as a retransmission of the last
//!    exchange's response, split as that response was.
//! 4. Retransmissions: a handshake datagram whose first record (message type, message_seq,
//!    fragment offset; or a ChangeCipherSpec) was already carried in this direction in this
//!    session; a CoAP datagram whose bytes the meter already sent (up), or whose Message ID the
//!    meter already received, or a copy sent after a lost one (down).
//!
//! Byte split of a row: handshake flights: payload = handshake message bodies (and the
//! ChangeCipherSpec byte, alert bytes), DTLS overhead = record headers (13 B, plus a CID),
//! handshake headers (12 B per fragment) and AEAD expansion (explicit nonce and tag; an
//! encrypted handshake record here is a Finished with 12 B of verify_data). EST rows: payload =
//! the CoAP payload, CoAP overhead = CoAP header, token, options and payload marker, DTLS
//! overhead = the datagram minus the CoAP message.

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::meter::EstExchange;

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dir {
    /// Meter to server.
    Up,
    /// Server to meter.
    Down,
}

/// The session a datagram belongs to: the IDevID enrollment (with its retries) or the
/// LDevID renewal.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    #[default]
    Enroll,
    Renew,
}

/// What a datagram carries. In JSON: `hello`, `server_flight`, `client_flight`,
/// `final_flight`, `alert`, `est_discover`, `est_crts`, `est_sen`, `est_sren`, `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// ClientHello, HelloVerifyRequest, ClientHello with the cookie (flights 1-3).
    Hello,
    /// ServerHello .. ServerHelloDone (flight 4).
    ServerFlight,
    /// Certificate, ClientKeyExchange, CertificateVerify, ChangeCipherSpec, Finished (flight 5).
    ClientFlight,
    /// The server's ChangeCipherSpec and Finished (flight 6).
    FinalFlight,
    /// Alerts (the meter's close_notify).
    Alert,
    /// An EST request (up) or response (down), by exchange.
    Est(EstExchange),
    /// Anything the rules do not place.
    Other,
}

impl Phase {
    /// A short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Hello => "DTLS CH, HVR, CH+cookie",
            Phase::ServerFlight => "DTLS server flight (SH..SHD)",
            Phase::ClientFlight => "DTLS client flight (Cert..Fin)",
            Phase::FinalFlight => "DTLS final flight (CCS, Fin)",
            Phase::Alert => "DTLS alert (close_notify)",
            Phase::Est(EstExchange::Discover) => "CoAP discovery",
            Phase::Est(EstExchange::CaCerts) => "EST /crts",
            Phase::Est(EstExchange::Enroll) => "EST /sen",
            Phase::Est(EstExchange::ReEnroll) => "EST /sren",
            Phase::Other => "other",
        }
    }

    /// The name used in JSON.
    pub fn key(self) -> &'static str {
        match self {
            Phase::Hello => "hello",
            Phase::ServerFlight => "server_flight",
            Phase::ClientFlight => "client_flight",
            Phase::FinalFlight => "final_flight",
            Phase::Alert => "alert",
            Phase::Est(EstExchange::Discover) => "est_discover",
            Phase::Est(EstExchange::CaCerts) => "est_crts",
            Phase::Est(EstExchange::Enroll) => "est_sen",
            Phase::Est(EstExchange::ReEnroll) => "est_sren",
            Phase::Other => "other",
        }
    }

    pub const ALL: [Phase; 10] = [
        Phase::Hello,
        Phase::ServerFlight,
        Phase::ClientFlight,
        Phase::FinalFlight,
        Phase::Alert,
        Phase::Est(EstExchange::Discover),
        Phase::Est(EstExchange::CaCerts),
        Phase::Est(EstExchange::Enroll),
        Phase::Est(EstExchange::ReEnroll),
        Phase::Other,
    ];

    /// Whether the phase is part of the DTLS handshake.
    pub fn is_handshake(self) -> bool {
        matches!(
            self,
            Phase::Hello | Phase::ServerFlight | Phase::ClientFlight | Phase::FinalFlight
        )
    }
}

impl Serialize for Phase {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.key())
    }
}

impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let k = String::deserialize(d)?;
        Phase::ALL
            .into_iter()
            .find(|p| p.key() == k)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown phase `{k}`")))
    }
}

/// Counters of one (stage, phase, direction) row. `bytes = payload + coap_overhead +
/// dtls_overhead`; the `retransmitted_*` counters are the part of the row that repeated
/// something already sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseCounters {
    pub datagrams: u64,
    pub bytes: u64,
    pub frames: u64,
    pub payload: u64,
    pub coap_overhead: u64,
    pub dtls_overhead: u64,
    pub retransmitted_datagrams: u64,
    pub retransmitted_bytes: u64,
    pub retransmitted_frames: u64,
    /// Lost on the link or dropped at its queue (included above).
    pub lost: u64,
}

impl std::ops::AddAssign for PhaseCounters {
    fn add_assign(&mut self, o: Self) {
        self.datagrams += o.datagrams;
        self.bytes += o.bytes;
        self.frames += o.frames;
        self.payload += o.payload;
        self.coap_overhead += o.coap_overhead;
        self.dtls_overhead += o.dtls_overhead;
        self.retransmitted_datagrams += o.retransmitted_datagrams;
        self.retransmitted_bytes += o.retransmitted_bytes;
        self.retransmitted_frames += o.retransmitted_frames;
        self.lost += o.lost;
    }
}

/// One row of a phase table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseRow {
    pub stage: Stage,
    pub phase: Phase,
    pub dir: Dir,
    #[serde(flatten)]
    pub counters: PhaseCounters,
}

/// Rows keyed by (stage, phase, direction), in that order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhaseTable {
    rows: BTreeMap<(Stage, Phase, Dir), PhaseCounters>,
}

impl PhaseTable {
    pub fn add(&mut self, stage: Stage, phase: Phase, dir: Dir, c: PhaseCounters) {
        *self.rows.entry((stage, phase, dir)).or_default() += c;
    }

    pub fn merge(&mut self, other: &PhaseTable) {
        for (&(s, p, d), &c) in &other.rows {
            self.add(s, p, d, c);
        }
    }

    pub fn rows(&self) -> Vec<PhaseRow> {
        self.rows
            .iter()
            .map(|(&(stage, phase, dir), &counters)| PhaseRow {
                stage,
                phase,
                dir,
                counters,
            })
            .collect()
    }

    pub fn from_rows(rows: &[PhaseRow]) -> PhaseTable {
        let mut t = PhaseTable::default();
        for r in rows {
            t.add(r.stage, r.phase, r.dir, r.counters);
        }
        t
    }

    pub fn get(&self, stage: Stage, phase: Phase, dir: Dir) -> PhaseCounters {
        self.rows
            .get(&(stage, phase, dir))
            .copied()
            .unwrap_or_default()
    }

    /// The sum of the rows matching `f`.
    pub fn total(&self, f: impl Fn(Stage, Phase, Dir) -> bool) -> PhaseCounters {
        let mut t = PhaseCounters::default();
        for (&(s, p, d), &c) in &self.rows {
            if f(s, p, d) {
                t += c;
            }
        }
        t
    }
}

impl Serialize for PhaseTable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.rows().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PhaseTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let rows = Vec::<PhaseRow>::deserialize(d)?;
        Ok(PhaseTable::from_rows(&rows))
    }
}

/// What the driver knows about a CoAP datagram it sends or receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoapNote {
    pub exchange: EstExchange,
    /// The CoAP message (the DTLS plaintext).
    pub coap_len: usize,
    /// Its payload.
    pub payload_len: usize,
    /// Up: the same bytes went out before in this session. Down: a copy of a message already
    /// received in this session.
    pub repeat: bool,
}

impl CoapNote {
    /// Reads the payload length of a CoAP datagram (RFC 7252 §3); an unreadable one counts
    /// as all payload.
    pub fn of(exchange: EstExchange, datagram: &[u8], repeat: bool) -> CoapNote {
        let payload_len = coap_lite::Packet::from_bytes(datagram)
            .map(|p| p.payload.len())
            .unwrap_or(datagram.len());
        CoapNote {
            exchange,
            coap_len: datagram.len(),
            payload_len,
            repeat,
        }
    }
}

/// An annotation of the next encrypted datagram the meter sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpNote {
    Coap(CoapNote),
    /// The close_notify alert.
    Close,
}

/// A down datagram of application data waiting for the driver to say what it was.
#[derive(Debug, Clone, Copy)]
struct PendingDown {
    ticket: u64,
    stage: Stage,
    bytes: u64,
    frames: u64,
    lost: bool,
}

/// The signature of a handshake datagram: what its first record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FlightSig {
    Handshake { msg_type: u8, seq: u16, offset: u32 },
    ChangeCipherSpec,
    Encrypted,
}

const RECORD_HEADER: usize = 13;
const HANDSHAKE_HEADER: usize = 12;
/// An encrypted handshake record in a DTLS 1.2 handshake is a Finished: 12 B of verify_data.
const FINISHED_BODY: u64 = 12;

/// The phase accounting of one meter. See the module documentation for the rules.
#[derive(Debug, Default)]
pub struct Ledger {
    table: PhaseTable,
    stage: Stage,
    handshaking: bool,
    seen: HashSet<(Dir, FlightSig)>,
    up_notes: VecDeque<UpNote>,
    /// Down application data not yet explained, in the order the link took it.
    pending: Vec<PendingDown>,
    /// Tickets of pending datagrams the meter received, in the order it received them.
    arrived: VecDeque<u64>,
    next_ticket: u64,
    /// The last explained response: exchange, DTLS overhead, CoAP overhead.
    last_down: Option<(EstExchange, u64, u64)>,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// A new DTLS session (handshake) starts for `stage`.
    pub fn begin_session(&mut self, stage: Stage) {
        self.flush_pending();
        self.stage = stage;
        self.handshaking = true;
        self.seen.clear();
        self.up_notes.clear();
    }

    /// The handshake of the current session completed (or failed).
    pub fn end_handshake(&mut self) {
        self.handshaking = false;
    }

    /// The next encrypted datagram the meter sends is this.
    pub fn note_up(&mut self, note: UpNote) {
        self.up_notes.push_back(note);
    }

    /// The pending down datagram with this ticket reached the meter.
    pub fn delivered(&mut self, ticket: u64) {
        // A datagram of a session already flushed is accounted for.
        if self.pending.iter().any(|p| p.ticket == ticket) {
            self.arrived.push_back(ticket);
        }
    }

    /// The meter read this CoAP datagram: it explains the oldest down datagram of
    /// application data that reached the meter, and the lost ones the link took before it.
    pub fn note_down(&mut self, note: CoapNote) {
        let Some(ticket) = self.arrived.pop_front() else {
            return;
        };
        let Some(pos) = self.pending.iter().position(|p| p.ticket == ticket) else {
            return;
        };
        let mut group: Vec<PendingDown> = Vec::new();
        let mut i = 0;
        self.pending.retain(|p| {
            let take = i == pos || (i < pos && p.lost);
            i += 1;
            if take {
                group.push(*p);
            }
            !take
        });
        let delivered_bytes = group.last().map_or(0, |p| p.bytes);
        let dtls = delivered_bytes.saturating_sub(u64::try_from(note.coap_len).unwrap_or(0));
        let coap_ovh = u64::try_from(note.coap_len.saturating_sub(note.payload_len)).unwrap_or(0);
        self.last_down = Some((note.exchange, dtls, coap_ovh));
        // The first of the group is the original unless the driver saw this message before;
        // the lost ones after it were copies of it (the server resends identical bytes).
        for (i, p) in group.into_iter().enumerate() {
            self.add_app(p, note.exchange, dtls, note, i > 0 || note.repeat);
        }
    }

    fn add_app(
        &mut self,
        p: PendingDown,
        exchange: EstExchange,
        dtls: u64,
        note: CoapNote,
        repeat: bool,
    ) {
        let dtls = dtls.min(p.bytes);
        let coap_ovh = u64::try_from(note.coap_len.saturating_sub(note.payload_len))
            .unwrap_or(0)
            .min(p.bytes - dtls);
        let c = PhaseCounters {
            datagrams: 1,
            bytes: p.bytes,
            frames: p.frames,
            payload: p.bytes - dtls - coap_ovh,
            coap_overhead: coap_ovh,
            dtls_overhead: dtls,
            lost: u64::from(p.lost),
            ..PhaseCounters::default()
        };
        self.table.add(
            p.stage,
            Phase::Est(exchange),
            Dir::Down,
            with_repeat(c, repeat),
        );
    }

    /// Down datagrams nobody explained: late copies of the last exchange's response.
    fn flush_pending(&mut self) {
        let (phase, dtls, coap) = match self.last_down {
            Some((ex, dtls, coap)) => (Phase::Est(ex), dtls, coap),
            None => (Phase::Other, 0, 0),
        };
        self.arrived.clear();
        for p in std::mem::take(&mut self.pending) {
            let dtls = dtls.min(p.bytes);
            let coap = coap.min(p.bytes - dtls);
            let c = PhaseCounters {
                datagrams: 1,
                bytes: p.bytes,
                frames: p.frames,
                payload: p.bytes - dtls - coap,
                coap_overhead: coap,
                dtls_overhead: dtls,
                lost: u64::from(p.lost),
                ..PhaseCounters::default()
            };
            self.table
                .add(p.stage, phase, Dir::Down, with_repeat(c, true));
        }
    }

    /// The link took this datagram in direction `dir`, in `frames` frames, and `lost` it (or
    /// dropped it at its queue). A delivered down datagram of application data gets a ticket
    /// to hand to [`Ledger::delivered`] when it reaches the meter.
    pub fn record(&mut self, dir: Dir, datagram: &[u8], frames: u32, lost: bool) -> Option<u64> {
        let bytes = u64::try_from(datagram.len()).unwrap_or(u64::MAX);
        let frames = u64::from(frames);
        let head = first_record(datagram);
        let (phase, sig) = match head {
            Some(h) if h.content_type == 22 && h.epoch == 0 => {
                let phase = match (dir, h.msg_type) {
                    (_, Some(1 | 3)) => Phase::Hello,
                    (Dir::Down, Some(2 | 11 | 12 | 13 | 14)) => Phase::ServerFlight,
                    (Dir::Up, Some(11 | 15 | 16)) => Phase::ClientFlight,
                    _ => Phase::Other,
                };
                let sig = FlightSig::Handshake {
                    msg_type: h.msg_type.unwrap_or(0),
                    seq: h.msg_seq,
                    offset: h.frag_offset,
                };
                (phase, Some(sig))
            }
            Some(h) if h.content_type == 20 => {
                let phase = match dir {
                    Dir::Up => Phase::ClientFlight,
                    Dir::Down => Phase::FinalFlight,
                };
                (phase, Some(FlightSig::ChangeCipherSpec))
            }
            Some(h) if h.content_type == 21 && h.epoch == 0 => (Phase::Alert, None),
            Some(_) => match dir {
                Dir::Up => match self.up_notes.pop_front() {
                    Some(UpNote::Coap(n)) => {
                        let dtls = bytes.saturating_sub(u64::try_from(n.coap_len).unwrap_or(0));
                        let coap_ovh = u64::try_from(n.coap_len.saturating_sub(n.payload_len))
                            .unwrap_or(0)
                            .min(bytes - dtls);
                        let c = PhaseCounters {
                            datagrams: 1,
                            bytes,
                            frames,
                            payload: bytes - dtls - coap_ovh,
                            coap_overhead: coap_ovh,
                            dtls_overhead: dtls,
                            lost: u64::from(lost),
                            ..PhaseCounters::default()
                        };
                        self.table.add(
                            self.stage,
                            Phase::Est(n.exchange),
                            Dir::Up,
                            with_repeat(c, n.repeat),
                        );
                        return None;
                    }
                    Some(UpNote::Close) => (Phase::Alert, None),
                    None if self.handshaking => (Phase::ClientFlight, Some(FlightSig::Encrypted)),
                    None => (Phase::Other, None),
                },
                Dir::Down if self.handshaking => (Phase::FinalFlight, Some(FlightSig::Encrypted)),
                Dir::Down if head.is_some_and(|h| h.content_type == 21) => (Phase::Alert, None),
                Dir::Down => {
                    let ticket = self.next_ticket;
                    self.next_ticket += 1;
                    self.pending.push(PendingDown {
                        ticket,
                        stage: self.stage,
                        bytes,
                        frames,
                        lost,
                    });
                    return (!lost).then_some(ticket);
                }
            },
            None => (Phase::Other, None),
        };
        let repeat = match sig {
            Some(s) => !self.seen.insert((dir, s)),
            None => false,
        };
        let (payload, dtls) = split_records(datagram, phase);
        let c = PhaseCounters {
            datagrams: 1,
            bytes,
            frames,
            payload,
            dtls_overhead: dtls,
            lost: u64::from(lost),
            ..PhaseCounters::default()
        };
        self.table
            .add(self.stage, phase, dir, with_repeat(c, repeat));
        None
    }

    /// The table so far, with unexplained down datagrams flushed into it.
    pub fn finish(&mut self) -> PhaseTable {
        self.flush_pending();
        self.table.clone()
    }
}

fn with_repeat(mut c: PhaseCounters, repeat: bool) -> PhaseCounters {
    if repeat {
        c.retransmitted_datagrams = c.datagrams;
        c.retransmitted_bytes = c.bytes;
        c.retransmitted_frames = c.frames;
    }
    c
}

#[derive(Debug, Clone, Copy)]
struct RecordHead {
    content_type: u8,
    epoch: u16,
    /// Epoch-0 handshake: the first message's type, message_seq and fragment_offset.
    msg_type: Option<u8>,
    msg_seq: u16,
    frag_offset: u32,
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
}

fn first_record(d: &[u8]) -> Option<RecordHead> {
    let content_type = *d.first()?;
    let epoch = u16::try_from(be(d.get(3..5)?)).ok()?;
    let (msg_type, msg_seq, frag_offset) = if content_type == 22 && epoch == 0 {
        let h = d.get(RECORD_HEADER..RECORD_HEADER + HANDSHAKE_HEADER);
        match h {
            Some(h) => (
                h.first().copied(),
                u16::try_from(be(h.get(4..6)?)).ok()?,
                u32::try_from(be(h.get(6..9)?)).ok()?,
            ),
            None => (None, 0, 0),
        }
    } else {
        (None, 0, 0)
    };
    Some(RecordHead {
        content_type,
        epoch,
        msg_type,
        msg_seq,
        frag_offset,
    })
}

/// (payload, DTLS overhead) of a datagram of DTLS records outside application data.
fn split_records(d: &[u8], phase: Phase) -> (u64, u64) {
    let total = u64::try_from(d.len()).unwrap_or(u64::MAX);
    let mut payload = 0u64;
    let mut rest = d;
    while rest.len() >= RECORD_HEADER {
        let ct = rest.first().copied().unwrap_or(0);
        let epoch = rest.get(3..5).map(be).unwrap_or(0);
        if ct == 25 {
            // tls12_cid: the CID length is not on the wire; such a record is the last one of
            // the datagram (a Finished, or an alert).
            payload += if phase == Phase::Alert {
                2
            } else {
                FINISHED_BODY
            };
            break;
        }
        let len = rest.get(11..13).map(be).unwrap_or(0);
        let len_us = usize::try_from(len).unwrap_or(usize::MAX);
        let Some(body) = rest.get(RECORD_HEADER..RECORD_HEADER.saturating_add(len_us)) else {
            break;
        };
        payload += match (ct, epoch) {
            (22, 0) => {
                // Handshake fragments: 12-byte header + fragment_length each.
                let mut b = body;
                let mut p = 0u64;
                while b.len() >= HANDSHAKE_HEADER {
                    let fl = b.get(9..12).map(be).unwrap_or(0);
                    p += fl;
                    let step = HANDSHAKE_HEADER.saturating_add(usize::try_from(fl).unwrap_or(0));
                    b = b.get(step..).unwrap_or_default();
                }
                p
            }
            (20, _) => len.min(1),
            (21, 0) => len.min(2),
            (21, _) => 2,
            (22, _) => FINISHED_BODY,
            _ => len,
        }
        .min(len);
        rest = rest
            .get(RECORD_HEADER.saturating_add(len_us)..)
            .unwrap_or_default();
    }
    let payload = payload.min(total);
    (payload, total - payload)
}

/// The phase table as text, per enrollment (every count divided by `enrolled`): one line per
/// (session, phase) with bytes up and down, frames, the byte split and the retransmitted part,
/// then the totals.
pub fn render(table: &PhaseTable, enrolled: u64) -> String {
    use std::fmt::Write;
    let n = enrolled.max(1) as f64;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "by phase, per enrollment              up B   down B  frames  payload  CoAP ovh  DTLS ovh  retx B  retx fr"
    );
    let mut keys: Vec<(Stage, Phase)> = table.rows.keys().map(|&(s, p, _)| (s, p)).collect();
    keys.dedup();
    let line = |o: &mut String, name: &str, up: PhaseCounters, down: PhaseCounters| {
        let mut both = up;
        both += down;
        let _ = writeln!(
            o,
            "  {name:<34}{:>7.0}{:>9.0}{:>8.1}{:>9.0}{:>10.0}{:>10.0}{:>8.0}{:>9.1}",
            up.bytes as f64 / n,
            down.bytes as f64 / n,
            both.frames as f64 / n,
            both.payload as f64 / n,
            both.coap_overhead as f64 / n,
            both.dtls_overhead as f64 / n,
            both.retransmitted_bytes as f64 / n,
            both.retransmitted_frames as f64 / n,
        );
    };
    let renewals = keys.iter().any(|(s, _)| *s == Stage::Renew);
    for (stage, phase) in keys {
        let name = match (renewals, stage) {
            (true, Stage::Renew) => format!("renew: {}", phase.label()),
            _ => phase.label().to_string(),
        };
        line(
            &mut o,
            &name,
            table.get(stage, phase, Dir::Up),
            table.get(stage, phase, Dir::Down),
        );
    }
    let hs = |d: Dir| table.total(|_, p, dd| dd == d && p.is_handshake());
    line(&mut o, "all handshake flights", hs(Dir::Up), hs(Dir::Down));
    let all = |d: Dir| table.total(|_, _, dd| dd == d);
    line(&mut o, "total", all(Dir::Up), all(Dir::Down));
    o
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn record(ct: u8, epoch: u16, body: &[u8]) -> Vec<u8> {
        let mut r = vec![ct, 0xFE, 0xFD];
        r.extend_from_slice(&epoch.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
        r.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    fn hs(t: u8, seq: u16, body_len: usize) -> Vec<u8> {
        let mut m = vec![t];
        let l = u32::try_from(body_len).unwrap().to_be_bytes();
        m.extend_from_slice(&l[1..]);
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0]);
        m.extend_from_slice(&l[1..]);
        m.extend(std::iter::repeat_n(0xAB, body_len));
        m
    }

    #[test]
    fn handshake_datagrams_go_to_their_flight_and_repeats_are_retransmissions() {
        let mut l = Ledger::new();
        l.begin_session(Stage::Enroll);
        let ch = record(22, 0, &hs(1, 0, 60));
        l.record(Dir::Up, &ch, 1, false);
        l.record(Dir::Down, &record(22, 0, &hs(3, 0, 35)), 1, false);
        // The server flight: ServerHello and Certificate packed in one datagram.
        let mut f4 = record(22, 0, &hs(2, 1, 50));
        f4.extend(record(22, 0, &hs(11, 2, 300)));
        l.record(Dir::Down, &f4, 5, false);
        // The client flight, sent twice (the second is a retransmission).
        let mut f5 = record(22, 0, &hs(11, 2, 200));
        f5.extend(record(20, 0, &[1]));
        f5.extend(record(22, 1, &[0u8; 40]));
        l.record(Dir::Up, &f5, 4, false);
        l.record(Dir::Up, &f5, 4, true);
        let mut f6 = record(20, 0, &[1]);
        f6.extend(record(22, 1, &[0u8; 40]));
        l.record(Dir::Down, &f6, 1, false);
        l.end_handshake();
        let t = l.finish();
        let hello_up = t.get(Stage::Enroll, Phase::Hello, Dir::Up);
        assert_eq!(hello_up.bytes, u64::try_from(ch.len()).unwrap());
        assert_eq!(hello_up.payload, 60);
        assert_eq!(hello_up.dtls_overhead, 25);
        let sf = t.get(Stage::Enroll, Phase::ServerFlight, Dir::Down);
        assert_eq!((sf.payload, sf.dtls_overhead, sf.frames), (350, 50, 5));
        let cf = t.get(Stage::Enroll, Phase::ClientFlight, Dir::Up);
        assert_eq!(cf.datagrams, 2);
        assert_eq!(cf.retransmitted_datagrams, 1);
        assert_eq!(cf.retransmitted_frames, 4);
        assert_eq!(cf.lost, 1);
        // Certificate body + CCS byte + Finished verify_data.
        assert_eq!(cf.payload, 2 * (200 + 1 + 12));
        let ff = t.get(Stage::Enroll, Phase::FinalFlight, Dir::Down);
        assert_eq!((ff.datagrams, ff.payload), (1, 13));
        let all = t.total(|_, _, _| true);
        assert_eq!(
            all.payload + all.coap_overhead + all.dtls_overhead,
            all.bytes
        );
    }

    #[test]
    fn application_data_is_placed_by_the_drivers_notes_lost_copies_included() {
        let mut l = Ledger::new();
        l.begin_session(Stage::Enroll);
        l.end_handshake();
        let note = |coap_len, payload_len, repeat| CoapNote {
            exchange: EstExchange::Enroll,
            coap_len,
            payload_len,
            repeat,
        };
        // Up: a request (lost), its retransmission (delivered).
        let req = record(23, 1, &[0u8; 136]);
        l.note_up(UpNote::Coap(note(120, 100, false)));
        l.record(Dir::Up, &req, 2, true);
        l.note_up(UpNote::Coap(note(120, 100, true)));
        l.record(Dir::Up, &req, 2, false);
        // Down: the response is lost once, then arrives; the driver reads it.
        let resp = record(23, 1, &[0u8; 316]);
        assert_eq!(l.record(Dir::Down, &resp, 4, true), None);
        let t = l.record(Dir::Down, &resp, 4, false).unwrap();
        l.delivered(t);
        l.note_down(note(300, 290, false));
        // A late duplicate that nobody reads.
        let late = l.record(Dir::Down, &resp, 4, false);
        assert!(late.is_some());
        l.note_up(UpNote::Close);
        l.record(Dir::Up, &record(21, 1, &[0u8; 18]), 1, false);
        let t = l.finish();
        let up = t.get(Stage::Enroll, Phase::Est(EstExchange::Enroll), Dir::Up);
        assert_eq!(
            (up.datagrams, up.retransmitted_datagrams, up.lost),
            (2, 1, 1)
        );
        assert_eq!(
            (up.payload, up.coap_overhead, up.dtls_overhead),
            (200, 40, 2 * 29)
        );
        let down = t.get(Stage::Enroll, Phase::Est(EstExchange::Enroll), Dir::Down);
        assert_eq!(down.datagrams, 3);
        assert_eq!(down.retransmitted_datagrams, 2);
        assert_eq!(down.payload, 3 * 290);
        assert_eq!(down.coap_overhead, 3 * 10);
        assert_eq!(down.dtls_overhead, 3 * 29);
        let alert = t.get(Stage::Enroll, Phase::Alert, Dir::Up);
        assert_eq!(
            (alert.datagrams, alert.payload, alert.dtls_overhead),
            (1, 2, 29)
        );
        // Two blocks of one response, the same length: neither repeats the other.
        for _ in 0..2 {
            let ticket = l.record(Dir::Down, &resp, 4, false).unwrap();
            l.delivered(ticket);
            l.note_down(CoapNote {
                exchange: EstExchange::CaCerts,
                ..note(300, 290, false)
            });
        }
        let crts = l
            .finish()
            .get(Stage::Enroll, Phase::Est(EstExchange::CaCerts), Dir::Down);
        assert_eq!((crts.datagrams, crts.retransmitted_datagrams), (2, 0));
    }
}
