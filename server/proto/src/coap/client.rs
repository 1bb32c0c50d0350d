//! Client side of the CoAP message layer, used by the device simulator: one server peer,
//! one outstanding exchange (NSTART = 1, RFC 7252 §4.7), CON requests with retransmission
//! (§4.2), Block1 sending and Block2 retrieval (RFC 7959).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};

use super::wire::{self, BlockOpt};
use super::{block_size, CoapConfig, ConfigError, Request, Response};

/// How many times a transfer is restarted on a 4.13 size hint before the 4.13 is delivered.
const MAX_RESTARTS: u32 = 3;
/// How many separate-response Message IDs are remembered to re-ACK duplicates.
const ACKED_SEPARATE_MEMORY: usize = 16;

/// Client configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientConfig {
    /// Transmission parameters (ack_timeout, ack_random_factor, max_retransmit,
    /// exchange_lifetime as the wait for a separate response). The server-only limits in
    /// it are not used by the client.
    pub coap: CoapConfig,
    /// SZX for request bodies larger than one block (6 = 1024 B).
    pub block1_szx: u8,
    /// Block2 SZX to ask for in the first request (early negotiation, RFC 7959 §2.4,
    /// RFC 9148 App. B.2); `None` lets the server choose.
    pub block2_szx: Option<u8>,
    /// Cap on a reassembled response body.
    pub max_response_body_bytes: usize,
    /// Token length of our requests, 0..=8 bytes (random, fresh per request). RFC 7252
    /// §5.3.1: a client making requests one at a time may use short or even empty tokens, and
    /// over DTLS the token need not resist guessing; on a mesh every byte is airtime.
    pub token_len: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            coap: CoapConfig::default(),
            block1_szx: 6,
            block2_szx: None,
            max_response_body_bytes: 64 * 1024,
            token_len: 4,
        }
    }
}

impl ClientConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.coap.validate()?;
        if self.block1_szx > 6 {
            return Err(ConfigError::Szx {
                name: "block1_szx",
                value: self.block1_szx,
            });
        }
        if let Some(s) = self.block2_szx.filter(|&s| s > 6) {
            return Err(ConfigError::Szx {
                name: "block2_szx",
                value: s,
            });
        }
        if self.max_response_body_bytes == 0 {
            return Err(ConfigError::MaxResponseBody(0));
        }
        if self.token_len > 8 {
            return Err(ConfigError::TokenLength(self.token_len));
        }
        Ok(())
    }
}

/// Why an exchange failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ClientError {
    #[error("a request is already outstanding (NSTART = 1)")]
    Busy,
    #[error("invalid client configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("request cannot be encoded: {0}")]
    Encode(&'static str),
    #[error("no response after MAX_RETRANSMIT retransmissions (or no separate response within EXCHANGE_LIFETIME)")]
    Timeout,
    #[error("the server rejected the request with RST")]
    Reset,
    #[error("response body larger than {0} bytes")]
    ResponseTooLarge(usize),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

/// Outcome of a request started with [`Client::start`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The final response, with the Block2 body reassembled. Any code, including 4.xx and
    /// 5.03 + Max-Age (the caller decides when to retry).
    Response(Response),
    Failed(ClientError),
}

// ClientError holds ConfigError, which holds an f64; equality is still reflexive for the
// values we produce (the f64 is a rejected config value and never NaN in practice).
impl Eq for ClientError {}

/// Client counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub requests_started: u64,
    pub responses: u64,
    pub failures: u64,
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub datagrams_received: u64,
    pub bytes_received: u64,
    /// CON retransmissions after a timeout.
    pub retransmissions: u64,
    /// Block1 requests sent (first transmissions only).
    pub block1_sent: u64,
    /// Block2 response blocks received (including the first).
    pub block2_received: u64,
    pub empty_acks_received: u64,
    pub separate_responses: u64,
    /// Transfers restarted on a 4.13 SZX hint.
    pub restarts: u64,
    /// Datagrams that matched nothing (stale, unrelated or malformed).
    pub ignored: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum FlightState {
    /// CON sent, waiting for ACK or RST (RFC 7252 §4.2).
    AwaitingAck,
    /// Empty ACK received, waiting for the separate response (§5.2.2).
    AwaitingSeparate,
}

#[derive(Debug)]
struct Flight {
    mid: u16,
    token: Vec<u8>,
    bytes: Vec<u8>,
    retransmissions: u32,
    timeout: Duration,
    deadline: Instant,
    state: FlightState,
}

#[derive(Debug)]
enum Phase {
    /// Sending the request body. `block1_szx` is `None` for a single-message request;
    /// `offset` is where the block in flight starts.
    Sending {
        block1_szx: Option<u8>,
        offset: usize,
    },
    /// Retrieving the remaining Block2 blocks of `head`.
    Fetching {
        head: Response,
        etag: Option<Vec<u8>>,
        szx: u8,
    },
}

#[derive(Debug)]
struct Exchange {
    request: Request,
    phase: Phase,
    flight: Option<Flight>,
    restarts: u32,
}

/// Parsed response fields the client looks at.
struct Answer {
    code: ResponseType,
    content_format: Option<u16>,
    max_age: Option<u32>,
    etag: Option<Vec<u8>>,
    block1: Option<BlockOpt>,
    block2: Option<BlockOpt>,
    size2: Option<u32>,
    payload: Vec<u8>,
}

impl Answer {
    fn read(packet: &Packet) -> Self {
        let code = match packet.header.code {
            MessageClass::Response(r) => r,
            _ => ResponseType::UnKnown,
        };
        let uint = |o: CoapOption, max: usize| wire::uint_option(packet, o, max).ok().flatten();
        let block = |o: CoapOption| {
            wire::single_option(packet, o, 0, 3)
                .ok()
                .flatten()
                .and_then(BlockOpt::decode)
                .filter(|b| b.szx < 7)
        };
        Self {
            code,
            content_format: uint(CoapOption::ContentFormat, 2).and_then(|v| u16::try_from(v).ok()),
            max_age: uint(CoapOption::MaxAge, 4),
            etag: packet.get_first_option(CoapOption::ETag).cloned(),
            block1: block(CoapOption::Block1),
            block2: block(CoapOption::Block2),
            size2: uint(CoapOption::Size2, 4),
            payload: packet.payload.clone(),
        }
    }

    fn into_response(self) -> Response {
        Response {
            code: self.code,
            content_format: self.content_format,
            max_age: self.max_age,
            payload: self.payload,
        }
    }
}

/// CoAP client for one server peer (sans-IO).
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    rng: StdRng,
    next_mid: u16,
    exchange: Option<Exchange>,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<ClientEvent>,
    acked_separate: VecDeque<u16>,
    stats: ClientStats,
}

impl Client {
    /// `seed` drives the initial Message ID (RFC 7252 §4.4), tokens and timeout jitter.
    pub fn new(config: ClientConfig, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let next_mid = rng.gen();
        Self {
            config,
            rng,
            next_mid,
            exchange: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            acked_separate: VecDeque::new(),
            stats: ClientStats::default(),
        }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Whether a request is outstanding.
    pub fn is_busy(&self) -> bool {
        self.exchange.is_some()
    }

    /// Starts a request; fails if one is outstanding (NSTART = 1, RFC 7252 §4.7).
    pub fn start(&mut self, now: Instant, request: Request) -> Result<(), ClientError> {
        if self.exchange.is_some() {
            return Err(ClientError::Busy);
        }
        self.config.validate()?;
        if request
            .path
            .iter()
            .chain(&request.query)
            .any(|s| s.len() > 255)
        {
            return Err(ClientError::Encode(
                "Uri-Path/Uri-Query segment longer than 255 bytes",
            ));
        }
        let block1_szx = (request.payload.len() > block_size(self.config.block1_szx))
            .then_some(self.config.block1_szx);
        self.exchange = Some(Exchange {
            request,
            phase: Phase::Sending {
                block1_szx,
                offset: 0,
            },
            flight: None,
            restarts: 0,
        });
        self.stats.requests_started += 1;
        self.send_next(now);
        Ok(())
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// Whether [`Self::poll_transmit`] has a datagram waiting.
    pub fn has_pending_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// When [`Self::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.exchange.as_ref()?.flight.as_ref().map(|f| f.deadline)
    }

    /// Retransmits the CON in flight with a doubled timeout (RFC 7252 §4.2), or fails the
    /// exchange with [`ClientError::Timeout`] once MAX_RETRANSMIT is reached.
    pub fn handle_timeout(&mut self, now: Instant) {
        let max_retransmit = self.config.coap.max_retransmit;
        let Some(flight) = self.exchange.as_mut().and_then(|e| e.flight.as_mut()) else {
            return;
        };
        if now < flight.deadline {
            return;
        }
        if flight.state == FlightState::AwaitingAck && flight.retransmissions < max_retransmit {
            flight.retransmissions += 1;
            flight.timeout = flight.timeout.checked_mul(2).unwrap_or(flight.timeout);
            flight.deadline = now.checked_add(flight.timeout).unwrap_or(now);
            let bytes = flight.bytes.clone();
            self.stats.retransmissions += 1;
            self.queue(bytes);
        } else {
            self.fail(ClientError::Timeout);
        }
    }

    /// Processes a datagram from the server.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += datagram.len() as u64;
        let (header, packet) = match wire::parse(datagram) {
            Ok(p) => p,
            Err(wire::Malformed::Format(h)) if h.mtype == MessageType::Confirmable => {
                // RFC 7252 §4.2: reject a malformed CON.
                self.stats.ignored += 1;
                self.queue(wire::empty(MessageType::Reset, h.mid));
                return;
            }
            Err(_) => {
                self.stats.ignored += 1;
                return;
            }
        };
        let is_response = matches!(packet.header.code, MessageClass::Response(_))
            || matches!(packet.header.code, MessageClass::Reserved(c) if (2..=5).contains(&(c >> 5)));
        match header.mtype {
            MessageType::Acknowledgement | MessageType::Reset => {
                let Some(flight) = self.exchange.as_mut().and_then(|e| e.flight.as_mut()) else {
                    self.stats.ignored += 1;
                    return;
                };
                // RFC 7252 §4.2: ACK/RST match the CON by Message ID.
                if flight.mid != header.mid || flight.state != FlightState::AwaitingAck {
                    self.stats.ignored += 1;
                    return;
                }
                if header.mtype == MessageType::Reset {
                    self.fail(ClientError::Reset);
                    return;
                }
                if packet.header.code == MessageClass::Empty {
                    // §5.2.2: empty ACK; the response follows separately.
                    flight.state = FlightState::AwaitingSeparate;
                    flight.deadline = now
                        .checked_add(self.config.coap.exchange_lifetime)
                        .unwrap_or(now);
                    self.stats.empty_acks_received += 1;
                    return;
                }
                // §5.3.2: a piggybacked response must also match the token.
                if !is_response || packet.get_token() != flight.token.as_slice() {
                    self.stats.ignored += 1;
                    return;
                }
                if let Some(n) = unrecognised_critical(&packet) {
                    // §5.4.1: the response is rejected; we end the exchange rather than
                    // retransmit into the same answer.
                    tracing::debug!(option = n, "response with unrecognised critical option");
                    return self.fail(ClientError::Protocol(
                        "response carries an unrecognised critical option",
                    ));
                }
                self.on_response(now, Answer::read(&packet));
            }
            MessageType::Confirmable | MessageType::NonConfirmable => {
                let confirmable = header.mtype == MessageType::Confirmable;
                let matches = is_response
                    && self
                        .exchange
                        .as_ref()
                        .and_then(|e| e.flight.as_ref())
                        .is_some_and(|f| f.token.as_slice() == packet.get_token());
                if matches && unrecognised_critical(&packet).is_some() {
                    // §5.4.1: reject (RST for a CON) and end the exchange.
                    if confirmable {
                        self.queue(wire::empty(MessageType::Reset, header.mid));
                    }
                    self.fail(ClientError::Protocol(
                        "response carries an unrecognised critical option",
                    ));
                } else if matches {
                    // §5.2.2: a separate response (possibly before the empty ACK). ACK a CON.
                    if confirmable {
                        self.ack_separate(header.mid);
                    }
                    self.stats.separate_responses += 1;
                    self.on_response(now, Answer::read(&packet));
                } else if confirmable && self.acked_separate.contains(&header.mid) {
                    // A retransmitted separate response whose ACK was lost: ACK it again.
                    self.queue(wire::empty(MessageType::Acknowledgement, header.mid));
                } else if confirmable {
                    // §5.3.2 / §4.2: unexpected CON (unknown token, ping, request): RST.
                    self.stats.ignored += 1;
                    self.queue(wire::empty(MessageType::Reset, header.mid));
                } else {
                    self.stats.ignored += 1;
                }
            }
        }
    }

    /// Next outcome of a started request.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    fn ack_separate(&mut self, mid: u16) {
        self.queue(wire::empty(MessageType::Acknowledgement, mid));
        if self.acked_separate.len() >= ACKED_SEPARATE_MEMORY {
            self.acked_separate.pop_front();
        }
        self.acked_separate.push_back(mid);
    }

    fn on_response(&mut self, now: Instant, answer: Answer) {
        let Some(mut ex) = self.exchange.take() else {
            return;
        };
        ex.flight = None;
        match ex.phase {
            Phase::Sending { block1_szx, offset } => {
                let total = ex.request.payload.len();
                if answer.code == ResponseType::Continue {
                    // RFC 7959 §2.3: the server took a non-final block.
                    let Some(szx) = block1_szx else {
                        return self.fail(ClientError::Protocol(
                            "2.31 Continue to a request without Block1",
                        ));
                    };
                    let sent_end = offset.saturating_add(block_size(szx)).min(total);
                    if sent_end >= total {
                        return self.fail(ClientError::Protocol("2.31 Continue to the last block"));
                    }
                    // Control usage: continue with the server's smaller size (Figure 4).
                    let next_szx = answer.block1.map_or(szx, |b| b.szx.min(szx));
                    ex.phase = Phase::Sending {
                        block1_szx: Some(next_szx),
                        offset: sent_end,
                    };
                    self.exchange = Some(ex);
                    return self.send_next(now);
                }
                if answer.code == ResponseType::RequestEntityTooLarge && ex.restarts < MAX_RESTARTS
                {
                    // RFC 7959 §2.9.3: 4.13 with a smaller SZX in Block1 = use that size.
                    let current = block1_szx.unwrap_or(self.config.block1_szx);
                    let hint = answer
                        .block1
                        .map(|b| b.szx)
                        .filter(|&h| h < current || block1_szx.is_none());
                    if let Some(h) = hint {
                        ex.restarts += 1;
                        self.stats.restarts += 1;
                        ex.phase = Phase::Sending {
                            block1_szx: Some(h),
                            offset: 0,
                        };
                        self.exchange = Some(ex);
                        return self.send_next(now);
                    }
                }
                self.first_response(now, ex, answer);
            }
            Phase::Fetching { head, etag, szx } => {
                let mut head = head;
                let Some(b2) = answer.block2 else {
                    // An error instead of a block (e.g. 4.08: the server lost the body).
                    if answer.code.is_error() {
                        return self.deliver(answer.into_response());
                    }
                    return self.fail(ClientError::Protocol("Block2 continuation without Block2"));
                };
                // RFC 7959 §2.4: the block must continue where we are.
                if b2.offset() != head.payload.len() as u64 || b2.szx > szx {
                    return self.fail(ClientError::Protocol("unexpected Block2 block"));
                }
                if etag.is_some() && answer.etag != etag {
                    return self.fail(ClientError::Protocol(
                        "representation changed during Block2 transfer (ETag)",
                    ));
                }
                if b2.more && answer.payload.len() != b2.size() {
                    return self.fail(ClientError::Protocol("Block2 block shorter than its SZX"));
                }
                if head.payload.len().saturating_add(answer.payload.len())
                    > self.config.max_response_body_bytes
                {
                    return self.fail(ClientError::ResponseTooLarge(
                        self.config.max_response_body_bytes,
                    ));
                }
                head.payload.extend_from_slice(&answer.payload);
                self.stats.block2_received += 1;
                if !b2.more {
                    return self.deliver(head);
                }
                ex.phase = Phase::Fetching {
                    head,
                    etag,
                    szx: b2.szx,
                };
                self.exchange = Some(ex);
                self.send_next(now);
            }
        }
    }

    /// The final response to the request (after all Block1 blocks): deliver it, or start
    /// fetching Block2 blocks.
    fn first_response(&mut self, now: Instant, mut ex: Exchange, answer: Answer) {
        let max = self.config.max_response_body_bytes;
        match answer.block2 {
            Some(b2) if b2.more => {
                self.stats.block2_received += 1;
                if b2.num != 0 || answer.payload.len() != b2.size() {
                    return self.fail(ClientError::Protocol(
                        "first Block2 block is not NUM 0 of full size",
                    ));
                }
                if answer.size2.is_some_and(|s| u64::from(s) > max as u64)
                    || answer.payload.len() > max
                {
                    return self.fail(ClientError::ResponseTooLarge(max));
                }
                let etag = answer.etag.clone();
                ex.phase = Phase::Fetching {
                    head: answer.into_response(),
                    etag,
                    szx: b2.szx,
                };
                self.exchange = Some(ex);
                self.send_next(now);
            }
            _ => {
                if answer.block2.is_some() {
                    self.stats.block2_received += 1;
                }
                if answer.payload.len() > max {
                    return self.fail(ClientError::ResponseTooLarge(max));
                }
                self.deliver(answer.into_response());
            }
        }
    }

    fn deliver(&mut self, response: Response) {
        self.exchange = None;
        self.stats.responses += 1;
        self.events.push_back(ClientEvent::Response(response));
    }

    fn fail(&mut self, error: ClientError) {
        self.exchange = None;
        self.stats.failures += 1;
        self.events.push_back(ClientEvent::Failed(error));
    }

    fn queue(&mut self, bytes: Vec<u8>) {
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        self.transmit.push_back(bytes);
    }

    /// Builds and sends the next CON of the current exchange.
    fn send_next(&mut self, now: Instant) {
        let mid = self.next_mid;
        self.next_mid = self.next_mid.wrapping_add(1);
        let mut token_buf = [0u8; 8];
        let token = token_buf
            .get_mut(..self.config.token_len.min(8))
            .unwrap_or_default();
        self.rng.fill_bytes(token);
        let token: &[u8] = token;
        let early_block2 = self.config.block2_szx.map(|s| s.min(6));
        let Some(ex) = self.exchange.as_mut() else {
            return;
        };
        let r = &ex.request;
        let mut p = wire::packet(
            MessageType::Confirmable,
            MessageClass::Request(r.method.to_request_type()),
            mid,
            token,
        );
        for seg in &r.path {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        for q in &r.query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        if let Some(a) = r.accept {
            wire::set_u16(&mut p, CoapOption::Accept, a);
        }
        let mut block1_sent = false;
        match &ex.phase {
            Phase::Sending { block1_szx, offset } => {
                if let Some(cf) = r.content_format {
                    wire::set_u16(&mut p, CoapOption::ContentFormat, cf);
                }
                match block1_szx {
                    None => p.payload = r.payload.clone(),
                    Some(szx) => {
                        let size = block_size(*szx);
                        let total = r.payload.len();
                        let end = offset.saturating_add(size).min(total);
                        let num = u32::try_from(offset / size).unwrap_or(BlockOpt::MAX_NUM);
                        p.payload = r.payload.get(*offset..end).unwrap_or_default().to_vec();
                        wire::set_block(
                            &mut p,
                            CoapOption::Block1,
                            BlockOpt::new(num, end < total, *szx),
                        );
                        if *offset == 0 {
                            // RFC 7959 §4: Size1 announces the total body size.
                            wire::set_uint(
                                &mut p,
                                CoapOption::Size1,
                                u32::try_from(total).unwrap_or(u32::MAX),
                            );
                        }
                        block1_sent = true;
                    }
                }
                // Early negotiation (RFC 7959 §2.4, RFC 9148 App. B.2): ask for the
                // response block size in every request of the Block1 transfer, so the
                // server sees it with the first and with the last block.
                if let Some(s) = early_block2 {
                    wire::set_block(&mut p, CoapOption::Block2, BlockOpt::new(0, false, s));
                }
            }
            Phase::Fetching { head, szx, .. } => {
                // RFC 7959 §2.4 / §3.2 Figure 10: ask for the next block, no payload.
                let size = block_size(*szx);
                let num = u32::try_from(head.payload.len() / size).unwrap_or(BlockOpt::MAX_NUM);
                wire::set_block(&mut p, CoapOption::Block2, BlockOpt::new(num, false, *szx));
            }
        }
        let Some(bytes) = wire::encode(&p) else {
            return self.fail(ClientError::Encode(
                "coap-lite could not serialise the request",
            ));
        };
        // RFC 7252 §4.2: initial timeout random in [ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR].
        let factor = self.config.coap.ack_random_factor.max(1.0);
        let jitter = if factor > 1.0 {
            self.rng.gen_range(1.0..=factor)
        } else {
            1.0
        };
        let timeout =
            Duration::try_from_secs_f64(self.config.coap.ack_timeout.as_secs_f64() * jitter)
                .unwrap_or(self.config.coap.ack_timeout);
        ex.flight = Some(Flight {
            mid,
            token: token.to_vec(),
            bytes: bytes.clone(),
            retransmissions: 0,
            timeout,
            deadline: now.checked_add(timeout).unwrap_or(now),
            state: FlightState::AwaitingAck,
        });
        if block1_sent {
            self.stats.block1_sent += 1;
        }
        self.queue(bytes);
    }
}

/// The first critical (odd-numbered) option of a response that this client does not
/// process (RFC 7252 §5.4.1); only Block2 (23) and Block1 (27) are.
fn unrecognised_critical(packet: &Packet) -> Option<u16> {
    packet
        .options()
        .map(|(&n, _)| n)
        .find(|&n| n % 2 == 1 && n != 23 && n != 27)
}
