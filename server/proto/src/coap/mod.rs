//! Sans-IO CoAP messaging: RFC 7252 message layer and RFC 7959 block-wise transfer.
//!
//! ```text
//!   server/daemon (DTLS, sockets, timers)        client-sim (meters)
//!          |  plaintext datagrams + now                 |  plaintext datagrams + now
//!   coap::ServerSession (one per DTLS session)   coap::Client (one per server peer)
//!          |  Request / Response                        |  Request / ClientEvent
//!   est:: resources (EST-coaps, RFC 9148)         meter state machine
//! ```
//!
//! This module holds no sockets, clocks or threads. Every entry point takes `now: Instant`;
//! randomness (the initial Message ID, tokens, the ACK_RANDOM_FACTOR jitter) comes from a
//! seed, so every behaviour can be tested on virtual time and replayed. The wire codec is
//! `coap-lite` ([`coap_lite::Packet`]); this module adds what coap-lite lacks: message
//! deduplication, CON retransmission, token/Message-ID matching, atomic Block1 reassembly
//! with limits, Block2 slicing with a per-session cache, and the error answers RFC 7252 and
//! RFC 7959 prescribe.
//!
//! # Server ([`ServerSession`])
//!
//! * CON requests get piggybacked ACKs (same Message ID and token); NON requests get NON
//!   responses (fresh Message ID, same token). An application that needs time calls
//!   [`ServerSession::acknowledge`] (empty ACK, RFC 7252 §5.2.2, RFC 9148 §5.7 "short
//!   delay"); its response then goes out as a separate CON, retransmitted through
//!   [`ServerSession::handle_timeout`] / [`ServerSession::poll_transmit`] until ACKed. For
//!   long delays the application answers 5.03 + Max-Age (RFC 9148 §5.7 "long delay").
//! * Deduplication (RFC 7252 §4.5) by Message ID within one session (= one peer endpoint):
//!   a duplicate CON gets the identical bytes of the earlier answer, a duplicate NON is
//!   ignored, a duplicate that arrives before the application answered is ignored. The
//!   cache holds at most [`CoapConfig::max_dedup_entries`] entries (oldest answered entry
//!   evicted first) and entries expire after EXCHANGE_LIFETIME (CON) / NON_LIFETIME (NON).
//! * Block1 (RFC 7959 §2.3, §2.5) is reassembled atomically, one transfer per session at a
//!   time, keyed by the request target (method, Uri-Host, Uri-Port, Uri-Path, Uri-Query) —
//!   not by token, because clients may change the token between blocks and RFC 9175
//!   Request-Tag is not implemented. Blocks must arrive in order from NUM 0; anything else
//!   is answered 4.08. The body is capped at [`CoapConfig::max_request_body_bytes`] (4.13
//!   with Size1 = the cap). State expires EXCHANGE_LIFETIME after the last block.
//! * Block2 (RFC 7959 §2.4): responses larger than the negotiated block size are sliced;
//!   the remaining body is cached (one body per session) and later blocks are served
//!   without calling the application. If the cache is gone, a safe method (GET, FETCH) is
//!   handed to the application again and sliced at the requested block, while an unsafe
//!   method (POST, PUT, ...) is answered 4.08: re-running an EST enrollment to produce a
//!   later block could issue a second certificate.
//! * Sliced responses carry an ETag (the first 8 bytes of SHA-256 of the whole body) so a
//!   client can detect a change of representation between blocks.
//!
//! # Client ([`Client`])
//!
//! One outstanding exchange at a time (NSTART = 1), CON requests, retransmission with
//! exponential back-off (RFC 7252 §4.2), Block1 sending with server-driven size reduction,
//! early Block2 negotiation, Block2 retrieval with a body cap, separate responses
//! (empty ACK, then a CON response that the client ACKs; RFC 7252 §5.2.2).
//!
//! # Limits
//!
//! Everything a peer can make a session hold is bounded: dedup entries, pending requests,
//! reassembly bytes (one transfer), one Block2 body. Nothing on network input panics: all
//! option values are length-checked before use, integer conversions are checked.
//! Not implemented: Observe, OSCORE, RFC 9175 Request-Tag/Echo, RFC 8974 extended tokens,
//! congestion control beyond NSTART = 1.

mod client;
mod server;
mod wire;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use client::{Client, ClientConfig, ClientError, ClientEvent, ClientStats};
pub use coap_lite::ResponseType;
pub use server::{ServerSession, SessionStats};
pub use wire::BlockOpt;

/// Transmission parameters and per-session limits (RFC 7252 §4.8 defaults; units in names).
#[derive(Clone, Debug, PartialEq)]
pub struct CoapConfig {
    /// ACK_TIMEOUT: initial retransmission timeout (RFC 7252 §4.8: 2 s).
    pub ack_timeout: Duration,
    /// ACK_RANDOM_FACTOR: the initial timeout is drawn from
    /// `[ack_timeout, ack_timeout * ack_random_factor]` (RFC 7252 §4.8: 1.5; MUST NOT be < 1.0).
    pub ack_random_factor: f64,
    /// MAX_RETRANSMIT (RFC 7252 §4.8: 4).
    pub max_retransmit: u32,
    /// EXCHANGE_LIFETIME: how long a CON Message ID is remembered (RFC 7252 §4.8.2: 247 s).
    pub exchange_lifetime: Duration,
    /// NON_LIFETIME: how long a NON Message ID is remembered (RFC 7252 §4.8.2: 145 s).
    pub non_lifetime: Duration,
    /// Block1 reassembly cap; a larger body (or a Size1 announcing one) gets 4.13 with
    /// Size1 = this value (RFC 7959 §2.9.3, RFC 7252 §5.10.9). Default 16 KiB.
    pub max_request_body_bytes: usize,
    /// Bound on the duplicate-detection cache of one session. Default 64.
    pub max_dedup_entries: usize,
    /// Bound on requests handed to the application and not yet answered. Over it, new
    /// requests get 5.03 + Max-Age. Must be smaller than `max_dedup_entries`. Default 4.
    pub max_pending_requests: usize,
    /// Largest SZX used for response blocks (6 = 1024 B); a client may ask for smaller.
    pub max_block2_szx: u8,
    /// Largest SZX we let clients use for Block1 (control usage in 2.31). Default 6.
    pub max_block1_szx: u8,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(2),
            ack_random_factor: 1.5,
            max_retransmit: 4,
            exchange_lifetime: Duration::from_secs(247),
            non_lifetime: Duration::from_secs(145),
            max_request_body_bytes: 16 * 1024,
            max_dedup_entries: 64,
            max_pending_requests: 4,
            max_block2_szx: 6,
            max_block1_szx: 6,
        }
    }
}

/// A rejected [`CoapConfig`] or [`ClientConfig`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("ack_random_factor must be a finite number >= 1.0 (RFC 7252 §4.8), got {0}")]
    AckRandomFactor(f64),
    #[error("ack_timeout must be between 1 ms and 60 s, got {0:?}")]
    AckTimeout(Duration),
    #[error("max_retransmit must be at most 20, got {0}")]
    MaxRetransmit(u32),
    #[error("{name} must be between 1 s and 1 day, got {value:?}")]
    Lifetime { name: &'static str, value: Duration },
    #[error("{name} must be an SZX between 0 and 6 (16..1024 bytes; 7 is reserved by RFC 7959 §2.2), got {value}")]
    Szx { name: &'static str, value: u8 },
    #[error("max_request_body_bytes must be between 1 and 2^32-1, got {0}")]
    MaxRequestBody(usize),
    #[error("max_response_body_bytes must be at least 1, got {0}")]
    MaxResponseBody(usize),
    #[error("token_len must be at most 8 bytes (RFC 7252 §5.3.1), got {0}")]
    TokenLength(usize),
    #[error("max_dedup_entries ({dedup}) must be larger than max_pending_requests ({pending}), and the latter at least 1")]
    CacheBounds { dedup: usize, pending: usize },
}

impl CoapConfig {
    /// Checks the RFC 7252 constraints and the internal consistency of the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.ack_random_factor.is_finite() || self.ack_random_factor < 1.0 {
            return Err(ConfigError::AckRandomFactor(self.ack_random_factor));
        }
        if self.ack_timeout < Duration::from_millis(1) || self.ack_timeout > Duration::from_secs(60)
        {
            return Err(ConfigError::AckTimeout(self.ack_timeout));
        }
        if self.max_retransmit > 20 {
            return Err(ConfigError::MaxRetransmit(self.max_retransmit));
        }
        for (name, value) in [
            ("exchange_lifetime", self.exchange_lifetime),
            ("non_lifetime", self.non_lifetime),
        ] {
            if value < Duration::from_secs(1) || value > Duration::from_secs(86_400) {
                return Err(ConfigError::Lifetime { name, value });
            }
        }
        // RFC 7252 §4.8.1: derived values must follow changed parameters; a dedup or
        // Block2 cache shorter than a peer's retransmission span re-runs requests.
        if self.exchange_lifetime < self.max_transmit_span() {
            return Err(ConfigError::Lifetime {
                name: "exchange_lifetime (shorter than MAX_TRANSMIT_SPAN)",
                value: self.exchange_lifetime,
            });
        }
        for (name, value) in [
            ("max_block2_szx", self.max_block2_szx),
            ("max_block1_szx", self.max_block1_szx),
        ] {
            if value > 6 {
                return Err(ConfigError::Szx { name, value });
            }
        }
        if self.max_request_body_bytes == 0 || u32::try_from(self.max_request_body_bytes).is_err() {
            return Err(ConfigError::MaxRequestBody(self.max_request_body_bytes));
        }
        if self.max_pending_requests == 0 || self.max_dedup_entries <= self.max_pending_requests {
            return Err(ConfigError::CacheBounds {
                dedup: self.max_dedup_entries,
                pending: self.max_pending_requests,
            });
        }
        Ok(())
    }

    /// EXCHANGE_LIFETIME derived from the other parameters (RFC 7252 §4.8.2):
    /// MAX_TRANSMIT_SPAN + 2 × MAX_LATENCY (100 s) + PROCESSING_DELAY (= ACK_TIMEOUT).
    /// Use it when changing `max_retransmit` or `ack_timeout` (247 s with the defaults).
    pub fn derived_exchange_lifetime(&self) -> Duration {
        self.max_transmit_span()
            .saturating_add(Duration::from_secs(200))
            .saturating_add(self.ack_timeout)
    }

    /// MAX_TRANSMIT_SPAN = ACK_TIMEOUT × (2^MAX_RETRANSMIT − 1) × ACK_RANDOM_FACTOR (RFC 7252 §4.8.2).
    pub fn max_transmit_span(&self) -> Duration {
        let factor = f64::from((1u32 << self.max_retransmit.min(20)) - 1) * self.ack_random_factor;
        Duration::try_from_secs_f64(self.ack_timeout.as_secs_f64() * factor)
            .unwrap_or(Duration::MAX)
    }
}

/// Request method codes (RFC 7252 §12.1.1, RFC 8132 for FETCH/PATCH/iPATCH).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
    Fetch,
    Patch,
    IPatch,
}

impl Method {
    /// Safe methods may be re-run to regenerate a representation (RFC 7252 §5.1, RFC 8132 §2).
    pub fn is_safe(self) -> bool {
        matches!(self, Method::Get | Method::Fetch)
    }

    pub(crate) fn to_request_type(self) -> coap_lite::RequestType {
        use coap_lite::RequestType as R;
        match self {
            Method::Get => R::Get,
            Method::Post => R::Post,
            Method::Put => R::Put,
            Method::Delete => R::Delete,
            Method::Fetch => R::Fetch,
            Method::Patch => R::Patch,
            Method::IPatch => R::IPatch,
        }
    }

    pub(crate) fn from_request_type(r: coap_lite::RequestType) -> Option<Self> {
        use coap_lite::RequestType as R;
        Some(match r {
            R::Get => Method::Get,
            R::Post => Method::Post,
            R::Put => Method::Put,
            R::Delete => Method::Delete,
            R::Fetch => Method::Fetch,
            R::Patch => Method::Patch,
            R::IPatch => Method::IPatch,
            R::UnKnown => return None,
        })
    }
}

/// A complete (reassembled) CoAP request as the application sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// Uri-Path segments, in order.
    pub path: Vec<String>,
    /// Uri-Query arguments, in order.
    pub query: Vec<String>,
    pub content_format: Option<u16>,
    pub accept: Option<u16>,
    pub payload: Vec<u8>,
}

impl Request {
    /// A request with no options and no payload; `path` is split on `/`.
    pub fn new(method: Method, path: &str) -> Self {
        Self {
            method,
            path: path
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            query: Vec::new(),
            content_format: None,
            accept: None,
            payload: Vec::new(),
        }
    }

    /// Sets the payload and its Content-Format.
    pub fn with_payload(mut self, content_format: u16, payload: Vec<u8>) -> Self {
        self.content_format = Some(content_format);
        self.payload = payload;
        self
    }

    /// Sets the Accept option.
    pub fn with_accept(mut self, accept: u16) -> Self {
        self.accept = Some(accept);
        self
    }

    /// Adds a Uri-Query argument.
    pub fn with_query(mut self, arg: &str) -> Self {
        self.query.push(arg.to_owned());
        self
    }

    /// The path joined with `/` (for logs and routing tables).
    pub fn path_string(&self) -> String {
        self.path.join("/")
    }
}

/// A complete response body and its metadata; block-wise slicing is done by this layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub code: ResponseType,
    pub content_format: Option<u16>,
    /// Max-Age in seconds (RFC 7252 §5.10.5); with 5.03 it means "retry after" (§5.9.3.4).
    pub max_age: Option<u32>,
    pub payload: Vec<u8>,
}

// `coap_lite::ResponseType` only derives `PartialEq`, but its equality is total.
impl Eq for Response {}

impl Response {
    /// A response with the given code, no options and no payload.
    pub fn new(code: ResponseType) -> Self {
        Self {
            code,
            content_format: None,
            max_age: None,
            payload: Vec::new(),
        }
    }

    /// Sets the payload and its Content-Format.
    pub fn with_payload(mut self, content_format: u16, payload: Vec<u8>) -> Self {
        self.content_format = Some(content_format);
        self.payload = payload;
        self
    }

    /// Sets Max-Age (seconds).
    pub fn with_max_age(mut self, seconds: u32) -> Self {
        self.max_age = Some(seconds);
        self
    }

    /// An error response with a diagnostic payload: UTF-8 text without Content-Format
    /// (RFC 7252 §5.5.2).
    pub fn diagnostic(code: ResponseType, text: &str) -> Self {
        Self {
            code,
            content_format: None,
            max_age: None,
            payload: text.as_bytes().to_vec(),
        }
    }

    /// 5.03 Service Unavailable with Max-Age = seconds to wait before retrying
    /// (RFC 7252 §5.9.3.4, RFC 9148 §5.7).
    pub fn retry_after(seconds: u32) -> Self {
        Self::new(ResponseType::ServiceUnavailable).with_max_age(seconds)
    }
}

/// Handle of a request handed to the application by [`ServerSession::handle_datagram`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

impl RequestId {
    /// The session-local sequence number (for logs).
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Block size in bytes for an SZX (RFC 7959 §2.2: 2^(SZX+4)); SZX is clamped to 0..=6.
pub fn block_size(szx: u8) -> usize {
    16usize << szx.min(6)
}
