//! Wire formats: DTLS 1.2 records (RFC 6347 §4.1, RFC 9146 §4), handshake fragments
//! (RFC 6347 §4.2.2-4.2.3) and the handshake messages of an ECDHE_ECDSA handshake with mutual
//! certificate authentication (RFC 5246 §7.4, RFC 8422 §5).
//!
//! Parse once at the edge: every decoder checks every length against the bytes present and
//! rejects trailing bytes, so nothing after a successful parse can index out of bounds. The
//! encoders are the exact inverse of the decoders (round-trip tests below and in the fuzz
//! targets).

use thiserror::Error;

/// DTLS 1.2 on the wire (RFC 6347 §4.1: `{254, 253}`).
pub const DTLS_1_2: [u8; 2] = [0xFE, 0xFD];
/// DTLS 1.0, which clients may put in the ClientHello's record and servers in the
/// HelloVerifyRequest (RFC 6347 §4.2.1).
pub const DTLS_1_0: [u8; 2] = [0xFE, 0xFF];
/// type(1) version(2) epoch(2) sequence_number(6) length(2).
pub const RECORD_HEADER_LEN: usize = 13;
/// msg_type(1) length(3) message_seq(2) fragment_offset(3) fragment_length(3).
pub const HANDSHAKE_HEADER_LEN: usize = 12;
/// The largest record plaintext (RFC 5246 §6.2.1: 2^14).
pub const MAX_PLAINTEXT_LEN: usize = 1 << 14;
/// The largest record fragment we accept (TLSCiphertext: 2^14 + 2048).
pub const MAX_CIPHERTEXT_LEN: usize = MAX_PLAINTEXT_LEN + 2048;

/// Record content types (RFC 5246 §6.2.1, RFC 9146 §4).
pub mod content_type {
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
    pub const TLS12_CID: u8 = 25;
}

/// Handshake message types (RFC 5246 §7.4, RFC 6347 §4.3.2).
pub mod handshake_type {
    pub const HELLO_REQUEST: u8 = 0;
    pub const CLIENT_HELLO: u8 = 1;
    pub const SERVER_HELLO: u8 = 2;
    pub const HELLO_VERIFY_REQUEST: u8 = 3;
    pub const CERTIFICATE: u8 = 11;
    pub const SERVER_KEY_EXCHANGE: u8 = 12;
    pub const CERTIFICATE_REQUEST: u8 = 13;
    pub const SERVER_HELLO_DONE: u8 = 14;
    pub const CERTIFICATE_VERIFY: u8 = 15;
    pub const CLIENT_KEY_EXCHANGE: u8 = 16;
    pub const FINISHED: u8 = 20;
}

/// Extension types we read or write.
pub mod extension_type {
    pub const MAX_FRAGMENT_LENGTH: u16 = 1;
    pub const SUPPORTED_GROUPS: u16 = 10;
    pub const EC_POINT_FORMATS: u16 = 11;
    pub const SIGNATURE_ALGORITHMS: u16 = 13;
    pub const USE_SRTP: u16 = 14;
    pub const CLIENT_CERTIFICATE_TYPE: u16 = 19;
    pub const SERVER_CERTIFICATE_TYPE: u16 = 20;
    pub const ENCRYPT_THEN_MAC: u16 = 22;
    pub const EXTENDED_MASTER_SECRET: u16 = 23;
    /// RFC 7924.
    pub const CACHED_INFO: u16 = 25;
    pub const SESSION_TICKET: u16 = 35;
    /// RFC 9146 (53 and 254 are pre-RFC code points with another AAD: not accepted as CID).
    pub const CONNECTION_ID: u16 = 54;
    pub const RENEGOTIATION_INFO: u16 = 0xFF01;
}

/// TLS_EMPTY_RENEGOTIATION_INFO_SCSV (RFC 5746 §3.3).
pub const EMPTY_RENEGOTIATION_INFO_SCSV: u16 = 0x00FF;
/// ECCurveType named_curve (RFC 8422 §5.4).
pub const CURVE_TYPE_NAMED: u8 = 3;
/// ClientCertificateType ecdsa_sign (RFC 8422 §5.5).
pub const CERT_TYPE_ECDSA_SIGN: u8 = 64;

/// Why bytes did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("truncated")]
    Truncated,
    #[error("trailing bytes")]
    TrailingBytes,
    #[error("invalid {0}")]
    Invalid(&'static str),
    #[error("{0} too large")]
    TooLarge(&'static str),
}

/// A bounds-checked reader over a byte slice.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = self.take(1)?;
        Ok(b.first().copied().unwrap_or(0))
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(b.iter().fold(0u16, |acc, &x| (acc << 8) | u16::from(x)))
    }

    pub fn u24(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(3)?;
        Ok(b.iter().fold(0u32, |acc, &x| (acc << 8) | u32::from(x)))
    }

    pub fn u48(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(6)?;
        Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// An opaque vector with a 1-byte length prefix.
    pub fn vec8(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// An opaque vector with a 2-byte length prefix.
    pub fn vec16(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// An opaque vector with a 3-byte length prefix.
    pub fn vec24(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u24()?;
        self.take(n as usize)
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

fn push_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn push_u24(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes()[1..]);
}

fn push_u48(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes()[2..]);
}

fn push_vec8(out: &mut Vec<u8>, data: &[u8]) {
    debug_assert!(data.len() <= 0xFF);
    out.push(data.len() as u8);
    out.extend_from_slice(data);
}

fn push_vec16(out: &mut Vec<u8>, data: &[u8]) {
    debug_assert!(data.len() <= 0xFFFF);
    push_u16(out, data.len() as u16);
    out.extend_from_slice(data);
}

fn push_vec24(out: &mut Vec<u8>, data: &[u8]) {
    debug_assert!(data.len() <= 0xFF_FFFF);
    push_u24(out, data.len() as u32);
    out.extend_from_slice(data);
}

/// A bare list of u16 values (the inside of a length-prefixed vector).
pub fn parse_u16_list(data: &[u8]) -> Result<Vec<u16>, DecodeError> {
    u16_list(data, "u16 list")
}

fn u16_list(data: &[u8], what: &'static str) -> Result<Vec<u16>, DecodeError> {
    if !data.len().is_multiple_of(2) {
        return Err(DecodeError::Invalid(what));
    }
    let mut r = Reader::new(data);
    let mut out = Vec::with_capacity(data.len() / 2);
    while !r.is_empty() {
        out.push(r.u16()?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

/// One record of a datagram, borrowed. For a `tls12_cid` record, `cid` is the connection ID
/// (whose length is not on the wire: the receiver knows it, RFC 9146 §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub content_type: u8,
    pub version: [u8; 2],
    pub epoch: u16,
    pub seq: u64,
    pub cid: &'a [u8],
    pub fragment: &'a [u8],
}

impl Record<'_> {
    /// Appends this record's header (content type, version, epoch, sequence number, CID) with
    /// `fragment` as its body, which may differ from the parsed one: how tests re-encode a
    /// record they altered, and the fuzz target checks that parsing round-trips.
    pub fn push_with(&self, out: &mut Vec<u8>, fragment: &[u8]) {
        push_record(
            out,
            self.content_type,
            self.version,
            self.epoch,
            self.seq,
            self.cid,
            fragment,
        );
    }
}

/// Splits a datagram into records (RFC 6347 §4.1.1: several may share a datagram, none spans
/// two). `cid_len` is the length of the connection IDs this side issues; `tls12_cid` records
/// are refused when it is 0. Stops at the first malformed record.
pub struct Records<'a> {
    rest: &'a [u8],
    cid_len: usize,
}

impl<'a> Records<'a> {
    pub fn new(datagram: &'a [u8], cid_len: usize) -> Self {
        Records {
            rest: datagram,
            cid_len,
        }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match parse_record(self.rest, self.cid_len) {
            Ok((rec, rest)) => {
                self.rest = rest;
                Some(Ok(rec))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

/// Parses one record at the start of `buf`; returns it and what follows.
pub fn parse_record(buf: &[u8], cid_len: usize) -> Result<(Record<'_>, &[u8]), DecodeError> {
    let mut r = Reader::new(buf);
    let content_type = r.u8()?;
    let version = r.array::<2>()?;
    // Lenient on the minor version (OpenSSL and Mbed TLS ignore it), strict on the major.
    if version[0] != 0xFE {
        return Err(DecodeError::Invalid("record version"));
    }
    let epoch = r.u16()?;
    let seq = r.u48()?;
    let cid = if content_type == content_type::TLS12_CID {
        if cid_len == 0 {
            return Err(DecodeError::Invalid(
                "tls12_cid record without a negotiated CID",
            ));
        }
        r.take(cid_len)?
    } else {
        &[]
    };
    let len = usize::from(r.u16()?);
    if len > MAX_CIPHERTEXT_LEN {
        return Err(DecodeError::TooLarge("record"));
    }
    let fragment = r.take(len)?;
    match content_type {
        content_type::CHANGE_CIPHER_SPEC
        | content_type::ALERT
        | content_type::HANDSHAKE
        | content_type::APPLICATION_DATA
        | content_type::TLS12_CID => {}
        _ => return Err(DecodeError::Invalid("content type")),
    }
    Ok((
        Record {
            content_type,
            version,
            epoch,
            seq,
            cid,
            fragment,
        },
        r.rest(),
    ))
}

/// Peeks at the first record's content type, epoch and, for `tls12_cid`, the CID bytes,
/// without validating the rest (used to route a datagram).
pub fn peek_first_record(datagram: &[u8], cid_len: usize) -> Option<(u8, u16, &[u8])> {
    let ct = *datagram.first()?;
    let epoch = u16::from_be_bytes([*datagram.get(3)?, *datagram.get(4)?]);
    let cid = if ct == content_type::TLS12_CID {
        datagram.get(11..11 + cid_len)?
    } else {
        &[]
    };
    Some((ct, epoch, cid))
}

/// Appends a record: header (with `cid` for a `tls12_cid` record) and payload.
pub fn push_record(
    out: &mut Vec<u8>,
    content_type: u8,
    version: [u8; 2],
    epoch: u16,
    seq: u64,
    cid: &[u8],
    payload: &[u8],
) {
    out.push(content_type);
    out.extend_from_slice(&version);
    push_u16(out, epoch);
    push_u48(out, seq);
    out.extend_from_slice(cid);
    debug_assert!(payload.len() <= 0xFFFF);
    push_u16(out, payload.len() as u16);
    out.extend_from_slice(payload);
}

/// RFC 9146 §4 DTLSInnerPlaintext: content, real type, no padding.
pub fn inner_plaintext(content_type: u8, content: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(content.len() + 1);
    v.extend_from_slice(content);
    v.push(content_type);
    v
}

/// Splits a DTLSInnerPlaintext: strips the zero padding; the last non-zero byte is the type.
pub fn split_inner_plaintext(mut inner: Vec<u8>) -> Result<(u8, Vec<u8>), DecodeError> {
    while inner.last() == Some(&0) {
        inner.pop();
    }
    let ct = inner.pop().ok_or(DecodeError::Invalid("inner plaintext"))?;
    Ok((ct, inner))
}

// ---------------------------------------------------------------------------------------------
// Handshake fragments
// ---------------------------------------------------------------------------------------------

/// One handshake fragment (RFC 6347 §4.2.2), borrowed from a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeFragment<'a> {
    pub msg_type: u8,
    /// The whole message's length.
    pub length: u32,
    pub message_seq: u16,
    pub offset: u32,
    pub body: &'a [u8],
}

impl HandshakeFragment<'_> {
    /// Whether this fragment is the whole message.
    pub fn is_complete(&self) -> bool {
        self.offset == 0 && self.body.len() as u64 == u64::from(self.length)
    }
}

/// Parses every handshake fragment of a record's plaintext; strict on
/// `fragment_offset + fragment_length <= length` (tinydtls#73).
pub fn parse_handshake_fragments(
    plaintext: &[u8],
) -> Result<Vec<HandshakeFragment<'_>>, DecodeError> {
    let mut r = Reader::new(plaintext);
    let mut out = Vec::new();
    while !r.is_empty() {
        let msg_type = r.u8()?;
        let length = r.u24()?;
        let message_seq = r.u16()?;
        let offset = r.u24()?;
        let frag_len = r.u24()?;
        if u64::from(offset) + u64::from(frag_len) > u64::from(length) {
            return Err(DecodeError::Invalid("handshake fragment range"));
        }
        let body = r.take(frag_len as usize)?;
        out.push(HandshakeFragment {
            msg_type,
            length,
            message_seq,
            offset,
            body,
        });
    }
    Ok(out)
}

/// A whole handshake message with its 12-byte header as if unfragmented: the form that goes
/// into the transcript (RFC 6347 §4.2.6).
pub fn handshake_message(msg_type: u8, message_seq: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HANDSHAKE_HEADER_LEN + body.len());
    push_handshake_header(
        &mut out,
        msg_type,
        body.len() as u32,
        message_seq,
        0,
        body.len() as u32,
    );
    out.extend_from_slice(body);
    out
}

fn push_handshake_header(
    out: &mut Vec<u8>,
    msg_type: u8,
    length: u32,
    message_seq: u16,
    offset: u32,
    frag_len: u32,
) {
    out.push(msg_type);
    push_u24(out, length);
    push_u16(out, message_seq);
    push_u24(out, offset);
    push_u24(out, frag_len);
}

/// Splits a whole handshake message (header + body, as from [`handshake_message`]) into
/// fragments whose bodies are at most `max_body` bytes each (at least 1).
pub fn fragment_handshake(message: &[u8], max_body: usize) -> Vec<Vec<u8>> {
    let max_body = max_body.max(1);
    let (header, body) = message.split_at(HANDSHAKE_HEADER_LEN.min(message.len()));
    let msg_type = header.first().copied().unwrap_or(0);
    let message_seq = header
        .get(4..6)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_be_bytes)
        .unwrap_or(0);
    if body.len() <= max_body {
        return vec![message.to_vec()];
    }
    body.chunks(max_body)
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = Vec::with_capacity(HANDSHAKE_HEADER_LEN + chunk.len());
            push_handshake_header(
                &mut f,
                msg_type,
                body.len() as u32,
                message_seq,
                (i * max_body) as u32,
                chunk.len() as u32,
            );
            f.extend_from_slice(chunk);
            f
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------------------------

/// Alert levels and descriptions (RFC 5246 §7.2).
pub mod alert {
    pub const WARNING: u8 = 1;
    pub const FATAL: u8 = 2;

    pub const CLOSE_NOTIFY: u8 = 0;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const BAD_RECORD_MAC: u8 = 20;
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const HANDSHAKE_FAILURE: u8 = 40;
    pub const BAD_CERTIFICATE: u8 = 42;
    pub const UNSUPPORTED_CERTIFICATE: u8 = 43;
    pub const CERTIFICATE_REVOKED: u8 = 44;
    pub const CERTIFICATE_EXPIRED: u8 = 45;
    pub const CERTIFICATE_UNKNOWN: u8 = 46;
    pub const ILLEGAL_PARAMETER: u8 = 47;
    pub const UNKNOWN_CA: u8 = 48;
    pub const ACCESS_DENIED: u8 = 49;
    pub const DECODE_ERROR: u8 = 50;
    pub const DECRYPT_ERROR: u8 = 51;
    pub const PROTOCOL_VERSION: u8 = 70;
    pub const INSUFFICIENT_SECURITY: u8 = 71;
    pub const INTERNAL_ERROR: u8 = 80;
    pub const NO_RENEGOTIATION: u8 = 100;
    pub const UNSUPPORTED_EXTENSION: u8 = 110;
}

/// Parses an alert record's plaintext: (level, description).
pub fn parse_alert(plaintext: &[u8]) -> Result<(u8, u8), DecodeError> {
    let mut r = Reader::new(plaintext);
    let level = r.u8()?;
    let desc = r.u8()?;
    r.finish()?;
    Ok((level, desc))
}

// ---------------------------------------------------------------------------------------------
// Extensions
// ---------------------------------------------------------------------------------------------

/// An extension as sent: type and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    pub typ: u16,
    pub data: Vec<u8>,
}

fn parse_extensions(r: &mut Reader<'_>) -> Result<Vec<Extension>, DecodeError> {
    // "extensions<0..2^16-1>" is optional at the end of the hello (RFC 5246 §7.4.1.2).
    if r.is_empty() {
        return Ok(Vec::new());
    }
    let block = r.vec16()?;
    let mut er = Reader::new(block);
    let mut out: Vec<Extension> = Vec::new();
    while !er.is_empty() {
        let typ = er.u16()?;
        let data = er.vec16()?;
        // "There MUST NOT be more than one extension of the same type" (RFC 5246 §7.4.1.4).
        if out.iter().any(|e| e.typ == typ) {
            return Err(DecodeError::Invalid("duplicate extension"));
        }
        if out.len() >= 64 {
            return Err(DecodeError::TooLarge("extension list"));
        }
        out.push(Extension {
            typ,
            data: data.to_vec(),
        });
    }
    Ok(out)
}

fn push_extensions(out: &mut Vec<u8>, exts: &[Extension]) {
    if exts.is_empty() {
        return;
    }
    let mut block = Vec::new();
    for e in exts {
        push_u16(&mut block, e.typ);
        push_vec16(&mut block, &e.data);
    }
    push_vec16(out, &block);
}

/// Finds an extension by type.
pub fn find_extension(exts: &[Extension], typ: u16) -> Option<&[u8]> {
    exts.iter()
        .find(|e| e.typ == typ)
        .map(|e| e.data.as_slice())
}

/// supported_groups body: `named_curve_list<2..2^16-1>`.
pub fn parse_supported_groups(data: &[u8]) -> Result<Vec<u16>, DecodeError> {
    let mut r = Reader::new(data);
    let list = r.vec16()?;
    r.finish()?;
    if list.is_empty() {
        return Err(DecodeError::Invalid("supported_groups"));
    }
    u16_list(list, "supported_groups")
}

pub fn supported_groups_body(groups: &[u16]) -> Vec<u8> {
    let mut list = Vec::new();
    for g in groups {
        push_u16(&mut list, *g);
    }
    let mut out = Vec::new();
    push_vec16(&mut out, &list);
    out
}

/// signature_algorithms body: `supported_signature_algorithms<2..2^16-2>`.
pub fn parse_signature_algorithms(data: &[u8]) -> Result<Vec<u16>, DecodeError> {
    let mut r = Reader::new(data);
    let list = r.vec16()?;
    r.finish()?;
    if list.is_empty() {
        return Err(DecodeError::Invalid("signature_algorithms"));
    }
    u16_list(list, "signature_algorithms")
}

pub fn signature_algorithms_body(schemes: &[u16]) -> Vec<u8> {
    supported_groups_body(schemes)
}

/// ec_point_formats body: `ec_point_format_list<1..2^8-1>`.
pub fn parse_ec_point_formats(data: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut r = Reader::new(data);
    let list = r.vec8()?;
    r.finish()?;
    if list.is_empty() {
        return Err(DecodeError::Invalid("ec_point_formats"));
    }
    Ok(list.to_vec())
}

/// An opaque<0..255> body (connection_id, renegotiation_info).
pub fn parse_opaque8(data: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut r = Reader::new(data);
    let v = r.vec8()?;
    r.finish()?;
    Ok(v.to_vec())
}

pub fn opaque8_body(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 1);
    push_vec8(&mut out, v);
    out
}

// ---------------------------------------------------------------------------------------------
// Handshake messages
// ---------------------------------------------------------------------------------------------

/// ClientHello (RFC 5246 §7.4.1.2 with RFC 6347's cookie).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    pub client_version: [u8; 2],
    pub random: [u8; 32],
    pub session_id: Vec<u8>,
    pub cookie: Vec<u8>,
    pub cipher_suites: Vec<u16>,
    pub compression_methods: Vec<u8>,
    pub extensions: Vec<Extension>,
}

impl ClientHello {
    pub fn parse(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let client_version = r.array::<2>()?;
        let random = r.array::<32>()?;
        let session_id = r.vec8()?;
        if session_id.len() > 32 {
            return Err(DecodeError::Invalid("session_id"));
        }
        let cookie = r.vec8()?;
        let suites = r.vec16()?;
        if suites.is_empty() {
            return Err(DecodeError::Invalid("cipher_suites"));
        }
        let cipher_suites = u16_list(suites, "cipher_suites")?;
        let compression_methods = r.vec8()?;
        if compression_methods.is_empty() {
            return Err(DecodeError::Invalid("compression_methods"));
        }
        let extensions = parse_extensions(&mut r)?;
        r.finish()?;
        Ok(ClientHello {
            client_version,
            random,
            session_id: session_id.to_vec(),
            cookie: cookie.to_vec(),
            cipher_suites,
            compression_methods: compression_methods.to_vec(),
            extensions,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&self.client_version);
        out.extend_from_slice(&self.random);
        push_vec8(&mut out, &self.session_id);
        push_vec8(&mut out, &self.cookie);
        let mut suites = Vec::new();
        for s in &self.cipher_suites {
            push_u16(&mut suites, *s);
        }
        push_vec16(&mut out, &suites);
        push_vec8(&mut out, &self.compression_methods);
        push_extensions(&mut out, &self.extensions);
        out
    }

    /// The parameters a stateless cookie is bound to (RFC 6347 §4.2.1: version, random,
    /// session_id, cipher_suites, compression_method; extensions are left out, as DTLS 1.3
    /// clients may change them between the two ClientHellos).
    pub fn cookie_params(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80);
        out.extend_from_slice(&self.client_version);
        out.extend_from_slice(&self.random);
        push_vec8(&mut out, &self.session_id);
        for s in &self.cipher_suites {
            push_u16(&mut out, *s);
        }
        push_vec8(&mut out, &self.compression_methods);
        out
    }

    pub fn extension(&self, typ: u16) -> Option<&[u8]> {
        find_extension(&self.extensions, typ)
    }
}

/// HelloVerifyRequest (RFC 6347 §4.2.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloVerifyRequest {
    pub server_version: [u8; 2],
    pub cookie: Vec<u8>,
}

impl HelloVerifyRequest {
    pub fn parse(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let server_version = r.array::<2>()?;
        let cookie = r.vec8()?;
        r.finish()?;
        Ok(HelloVerifyRequest {
            server_version,
            cookie: cookie.to_vec(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + self.cookie.len());
        out.extend_from_slice(&self.server_version);
        push_vec8(&mut out, &self.cookie);
        out
    }
}

/// ServerHello (RFC 5246 §7.4.1.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerHello {
    pub server_version: [u8; 2],
    pub random: [u8; 32],
    pub session_id: Vec<u8>,
    pub cipher_suite: u16,
    pub compression_method: u8,
    pub extensions: Vec<Extension>,
}

impl ServerHello {
    pub fn parse(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let server_version = r.array::<2>()?;
        let random = r.array::<32>()?;
        let session_id = r.vec8()?;
        if session_id.len() > 32 {
            return Err(DecodeError::Invalid("session_id"));
        }
        let cipher_suite = r.u16()?;
        let compression_method = r.u8()?;
        let extensions = parse_extensions(&mut r)?;
        r.finish()?;
        Ok(ServerHello {
            server_version,
            random,
            session_id: session_id.to_vec(),
            cipher_suite,
            compression_method,
            extensions,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80);
        out.extend_from_slice(&self.server_version);
        out.extend_from_slice(&self.random);
        push_vec8(&mut out, &self.session_id);
        push_u16(&mut out, self.cipher_suite);
        out.push(self.compression_method);
        push_extensions(&mut out, &self.extensions);
        out
    }

    pub fn extension(&self, typ: u16) -> Option<&[u8]> {
        find_extension(&self.extensions, typ)
    }
}

// ---------------------------------------------------------------------------------------------
// Certificate types (RFC 7250)
// ---------------------------------------------------------------------------------------------

/// CertificateType values (TLS Certificate Types registry).
pub mod certificate_type {
    pub const X509: u8 = 0;
    pub const RAW_PUBLIC_KEY: u8 = 2;
    /// "C509 Certificate" (draft-ietf-cose-cbor-encoded-cert, TBD5, unassigned): our default
    /// for it, the first value of the registry's Private Use range (224-255).
    pub const C509_PRIVATE_USE_DEFAULT: u8 = 224;
}

/// A ClientHello's client_certificate_type / server_certificate_type body (RFC 7250 §3):
/// `CertificateType types<1..2^8-1>`, in preference order.
pub fn parse_certificate_types(data: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut r = Reader::new(data);
    let list = r.vec8()?;
    r.finish()?;
    if list.is_empty() {
        return Err(DecodeError::Invalid("certificate types"));
    }
    Ok(list.to_vec())
}

pub fn certificate_types_body(types: &[u8]) -> Vec<u8> {
    opaque8_body(types)
}

/// A ServerHello's client_certificate_type / server_certificate_type body: one CertificateType.
pub fn parse_certificate_type(data: &[u8]) -> Result<u8, DecodeError> {
    match data {
        [t] => Ok(*t),
        _ => Err(DecodeError::Invalid("certificate type")),
    }
}

// ---------------------------------------------------------------------------------------------
// Cached information (RFC 7924)
// ---------------------------------------------------------------------------------------------

/// CachedInformationType (RFC 7924 §3, §8.2).
pub mod cached_info_type {
    /// The server's Certificate message.
    pub const CERT: u8 = 1;
    /// The CertificateRequest message.
    pub const CERT_REQ: u8 = 2;
}

/// Most cached objects a ClientHello may name (bounds the server's comparisons).
pub const MAX_CACHED_OBJECTS: usize = 16;

/// A client's CachedObject: a type and the fingerprint of what it holds (RFC 7924 §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedObject {
    pub typ: u8,
    pub hash: Vec<u8>,
}

/// The client's cached_info body: `CachedObject cached_info<1..2^16-1>`, each `type(1) ‖
/// opaque hash_value<1..255>`.
pub fn parse_cached_info_client(data: &[u8]) -> Result<Vec<CachedObject>, DecodeError> {
    let mut r = Reader::new(data);
    let list = r.vec16()?;
    r.finish()?;
    if list.is_empty() {
        return Err(DecodeError::Invalid("cached_info"));
    }
    let mut lr = Reader::new(list);
    let mut out = Vec::new();
    while !lr.is_empty() {
        let typ = lr.u8()?;
        let hash = lr.vec8()?;
        if hash.is_empty() {
            return Err(DecodeError::Invalid("cached_info hash_value"));
        }
        if out.len() >= MAX_CACHED_OBJECTS {
            return Err(DecodeError::TooLarge("cached_info"));
        }
        out.push(CachedObject {
            typ,
            hash: hash.to_vec(),
        });
    }
    Ok(out)
}

pub fn cached_info_client_body(objects: &[CachedObject]) -> Vec<u8> {
    let mut list = Vec::new();
    for o in objects {
        list.push(o.typ);
        push_vec8(&mut list, &o.hash);
    }
    let mut out = Vec::with_capacity(list.len() + 2);
    push_vec16(&mut out, &list);
    out
}

/// The server's cached_info body: the types it will abbreviate, `CachedObject
/// cached_info<1..2^16-1>` with a server CachedObject being its type alone.
pub fn parse_cached_info_server(data: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut r = Reader::new(data);
    let list = r.vec16()?;
    r.finish()?;
    if list.is_empty() {
        return Err(DecodeError::Invalid("cached_info"));
    }
    Ok(list.to_vec())
}

pub fn cached_info_server_body(types: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(types.len() + 2);
    push_vec16(&mut out, types);
    out
}

/// The Certificate message of a handshake where the client's cached copy is current
/// (RFC 7924 §4.1, Figure 1): `opaque hash_value<1..255>`. `None` when `body` is not of that
/// form (a full Certificate message starts with a 3-byte list length and cannot be: its first
/// byte would be the hash length and 0).
pub fn parse_cached_certificate(body: &[u8]) -> Option<&[u8]> {
    let (&len, hash) = body.split_first()?;
    (len > 0 && hash.len() == usize::from(len)).then_some(hash)
}

/// Certificate (RFC 5246 §7.4.2): DER certificates, sender's first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateMsg {
    pub certificates: Vec<Vec<u8>>,
}

impl CertificateMsg {
    /// At most `max_certs` certificates are accepted.
    pub fn parse(body: &[u8], max_certs: usize) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let list = r.vec24()?;
        r.finish()?;
        let mut lr = Reader::new(list);
        let mut certificates = Vec::new();
        while !lr.is_empty() {
            let cert = lr.vec24()?;
            if cert.is_empty() {
                return Err(DecodeError::Invalid("empty certificate"));
            }
            if certificates.len() >= max_certs {
                return Err(DecodeError::TooLarge("certificate chain"));
            }
            certificates.push(cert.to_vec());
        }
        Ok(CertificateMsg { certificates })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut list = Vec::new();
        for c in &self.certificates {
            push_vec24(&mut list, c);
        }
        let mut out = Vec::with_capacity(list.len() + 3);
        push_vec24(&mut out, &list);
        out
    }
}

/// ServerKeyExchange for ECDHE_ECDSA (RFC 8422 §5.4): named curve, point, signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerKeyExchange {
    pub named_group: u16,
    pub public: Vec<u8>,
    pub signature_scheme: u16,
    pub signature: Vec<u8>,
}

impl ServerKeyExchange {
    pub fn parse(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        if r.u8()? != CURVE_TYPE_NAMED {
            return Err(DecodeError::Invalid("curve type"));
        }
        let named_group = r.u16()?;
        let public = r.vec8()?;
        if public.is_empty() {
            return Err(DecodeError::Invalid("ECDH point"));
        }
        let signature_scheme = r.u16()?;
        let signature = r.vec16()?;
        r.finish()?;
        Ok(ServerKeyExchange {
            named_group,
            public: public.to_vec(),
            signature_scheme,
            signature: signature.to_vec(),
        })
    }

    /// ServerECDHParams as signed: curve_type, named curve, point.
    pub fn params(named_group: u16, public: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + public.len());
        out.push(CURVE_TYPE_NAMED);
        push_u16(&mut out, named_group);
        push_vec8(&mut out, public);
        out
    }

    /// The bytes the signature covers: client random, server random, params (RFC 8422 §5.4).
    pub fn signed_data(
        client_random: &[u8; 32],
        server_random: &[u8; 32],
        params: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + params.len());
        out.extend_from_slice(client_random);
        out.extend_from_slice(server_random);
        out.extend_from_slice(params);
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Self::params(self.named_group, &self.public);
        push_u16(&mut out, self.signature_scheme);
        push_vec16(&mut out, &self.signature);
        out
    }
}

/// CertificateRequest (RFC 5246 §7.4.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRequest {
    pub certificate_types: Vec<u8>,
    pub signature_schemes: Vec<u16>,
    pub authorities: Vec<Vec<u8>>,
}

impl CertificateRequest {
    pub fn parse(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let types = r.vec8()?;
        if types.is_empty() {
            return Err(DecodeError::Invalid("certificate_types"));
        }
        let algs = r.vec16()?;
        let signature_schemes = u16_list(algs, "supported_signature_algorithms")?;
        let cas = r.vec16()?;
        r.finish()?;
        let mut cr = Reader::new(cas);
        let mut authorities = Vec::new();
        while !cr.is_empty() {
            let dn = cr.vec16()?;
            if dn.is_empty() {
                return Err(DecodeError::Invalid("distinguished name"));
            }
            authorities.push(dn.to_vec());
        }
        Ok(CertificateRequest {
            certificate_types: types.to_vec(),
            signature_schemes,
            authorities,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        push_vec8(&mut out, &self.certificate_types);
        let mut algs = Vec::new();
        for s in &self.signature_schemes {
            push_u16(&mut algs, *s);
        }
        push_vec16(&mut out, &algs);
        let mut cas = Vec::new();
        for dn in &self.authorities {
            push_vec16(&mut cas, dn);
        }
        push_vec16(&mut out, &cas);
        out
    }
}

/// ClientKeyExchange for ECDHE (RFC 8422 §5.7): the client's point.
pub fn parse_client_key_exchange(body: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut r = Reader::new(body);
    let point = r.vec8()?;
    r.finish()?;
    if point.is_empty() {
        return Err(DecodeError::Invalid("ECDH point"));
    }
    Ok(point.to_vec())
}

pub fn client_key_exchange_body(public: &[u8]) -> Vec<u8> {
    opaque8_body(public)
}

/// CertificateVerify / DigitallySigned (RFC 5246 §4.7): scheme and signature.
pub fn parse_digitally_signed(body: &[u8]) -> Result<(u16, Vec<u8>), DecodeError> {
    let mut r = Reader::new(body);
    let scheme = r.u16()?;
    let sig = r.vec16()?;
    r.finish()?;
    Ok((scheme, sig.to_vec()))
}

pub fn digitally_signed_body(scheme: u16, signature: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + signature.len());
    push_u16(&mut out, scheme);
    push_vec16(&mut out, signature);
    out
}

/// Finished: 12 bytes of verify_data for every suite here.
pub fn parse_finished(body: &[u8]) -> Result<[u8; 12], DecodeError> {
    let mut r = Reader::new(body);
    let v = r.array::<12>()?;
    r.finish()?;
    Ok(v)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "unit tests: a panic is the test failing"
)]
mod tests {
    use super::*;

    fn sample_client_hello() -> ClientHello {
        ClientHello {
            client_version: DTLS_1_2,
            random: [7; 32],
            session_id: vec![],
            cookie: vec![1, 2, 3],
            cipher_suites: vec![0xC0AE, 0xC02B],
            compression_methods: vec![0],
            extensions: vec![
                Extension {
                    typ: extension_type::SUPPORTED_GROUPS,
                    data: supported_groups_body(&[23, 29]),
                },
                Extension {
                    typ: extension_type::EXTENDED_MASTER_SECRET,
                    data: vec![],
                },
            ],
        }
    }

    #[test]
    fn certificate_type_bodies() {
        let b = certificate_types_body(&[224, 0]);
        assert_eq!(b, [2, 224, 0]);
        assert_eq!(parse_certificate_types(&b).unwrap(), [224, 0]);
        assert!(parse_certificate_types(&[0]).is_err());
        assert!(parse_certificate_types(&[2, 0]).is_err());
        assert!(parse_certificate_types(&[1, 0, 0]).is_err());
        assert_eq!(parse_certificate_type(&[224]), Ok(224));
        assert!(parse_certificate_type(&[]).is_err());
        assert!(parse_certificate_type(&[0, 224]).is_err());
    }

    #[test]
    fn cached_info_bodies_round_trip_and_malformed_ones_are_refused() {
        let objs = vec![
            CachedObject {
                typ: cached_info_type::CERT,
                hash: vec![0xAB; 32],
            },
            CachedObject {
                typ: 224,
                hash: vec![1],
            },
        ];
        let body = cached_info_client_body(&objs);
        assert_eq!(&body[..5], &[0, 37, 1, 32, 0xAB]);
        assert_eq!(parse_cached_info_client(&body).unwrap(), objs);
        // Empty list, empty hash, truncated hash, trailing bytes, too many objects.
        for bad in [
            vec![0, 0],
            vec![0, 2, 1, 0],
            vec![0, 3, 1, 5, 0],
            vec![0, 2, 1, 1],
            [cached_info_client_body(&objs), vec![0]].concat(),
        ] {
            assert!(parse_cached_info_client(&bad).is_err(), "{bad:?}");
        }
        let many: Vec<CachedObject> = (0..=MAX_CACHED_OBJECTS)
            .map(|i| CachedObject {
                typ: 1,
                hash: vec![i as u8],
            })
            .collect();
        assert_eq!(
            parse_cached_info_client(&cached_info_client_body(&many)),
            Err(DecodeError::TooLarge("cached_info"))
        );
        let sb = cached_info_server_body(&[cached_info_type::CERT]);
        assert_eq!(sb, [0, 1, 1]);
        assert_eq!(parse_cached_info_server(&sb).unwrap(), [1]);
        assert!(parse_cached_info_server(&[0, 0]).is_err());
        assert!(parse_cached_info_server(&[0, 2, 1]).is_err());
        // The abbreviated Certificate message, told apart from a full one.
        let mut abbreviated = vec![32];
        abbreviated.extend([7u8; 32]);
        assert_eq!(parse_cached_certificate(&abbreviated), Some(&[7u8; 32][..]));
        let full = CertificateMsg {
            certificates: vec![vec![0x30; 40]],
        }
        .encode();
        assert_eq!(parse_cached_certificate(&full), None);
        assert_eq!(parse_cached_certificate(&[]), None);
        assert_eq!(parse_cached_certificate(&[0]), None);
        assert_eq!(parse_cached_certificate(&[3, 1, 2]), None);
    }

    #[test]
    fn client_hello_round_trips_and_rejects_trailing_bytes() {
        let ch = sample_client_hello();
        let b = ch.encode();
        assert_eq!(ClientHello::parse(&b).unwrap(), ch);
        let mut t = b.clone();
        t.push(0);
        assert_eq!(ClientHello::parse(&t), Err(DecodeError::TrailingBytes));
        // Every prefix fails, except the one that ends where the (optional) extensions begin.
        for n in 0..b.len() {
            if let Ok(p) = ClientHello::parse(&b[..n]) {
                assert!(p.extensions.is_empty(), "prefix {n} parsed with extensions");
            }
        }
    }

    #[test]
    fn duplicate_extensions_are_refused() {
        let mut ch = sample_client_hello();
        ch.extensions.push(Extension {
            typ: extension_type::EXTENDED_MASTER_SECRET,
            data: vec![],
        });
        assert_eq!(
            ClientHello::parse(&ch.encode()),
            Err(DecodeError::Invalid("duplicate extension"))
        );
    }

    #[test]
    fn records_split_and_cid_records_need_a_cid_length() {
        let mut d = Vec::new();
        push_record(&mut d, content_type::HANDSHAKE, DTLS_1_2, 0, 5, &[], b"abc");
        push_record(
            &mut d,
            content_type::TLS12_CID,
            DTLS_1_2,
            1,
            0x0102_0304_0506,
            &[9, 9],
            b"xy",
        );
        let recs: Vec<_> = Records::new(&d, 2).collect::<Result<_, _>>().unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].seq, 5);
        assert_eq!(recs[0].fragment, b"abc");
        assert_eq!(recs[1].cid, &[9, 9]);
        assert_eq!(recs[1].seq, 0x0102_0304_0506);
        assert_eq!(recs[1].fragment, b"xy");
        assert!(Records::new(&d, 0).nth(1).unwrap().is_err());
        assert_eq!(peek_first_record(&d[16..], 2), Some((25, 1, &[9u8, 9][..])));
        // a truncated record
        assert!(parse_record(&d[..15], 0).is_err());
        // an unknown content type
        let mut bad = d.clone();
        bad[0] = 99;
        assert!(parse_record(&bad, 0).is_err());
    }

    #[test]
    fn fragments_reassemble_in_range_and_overflow_is_refused() {
        let msg = handshake_message(handshake_type::CERTIFICATE, 3, &[0xAA; 100]);
        let frags = fragment_handshake(&msg, 30);
        assert_eq!(frags.len(), 4);
        let mut body = Vec::new();
        for f in &frags {
            let parsed = parse_handshake_fragments(f).unwrap();
            assert_eq!(parsed.len(), 1);
            assert_eq!(parsed[0].length, 100);
            assert_eq!(parsed[0].message_seq, 3);
            assert_eq!(parsed[0].offset as usize, body.len());
            body.extend_from_slice(parsed[0].body);
        }
        assert_eq!(body, vec![0xAA; 100]);
        // offset + len beyond length
        let mut bad = frags[3].clone();
        bad[8] = 0xFF;
        assert!(parse_handshake_fragments(&bad).is_err());
    }

    #[test]
    fn inner_plaintext_strips_padding() {
        let mut inner = inner_plaintext(23, b"hi");
        inner.extend_from_slice(&[0, 0, 0]);
        assert_eq!(split_inner_plaintext(inner).unwrap(), (23, b"hi".to_vec()));
        assert!(split_inner_plaintext(vec![0, 0]).is_err());
    }

    #[test]
    fn server_messages_round_trip() {
        let sh = ServerHello {
            server_version: DTLS_1_2,
            random: [3; 32],
            session_id: vec![1; 32],
            cipher_suite: 0xC0AE,
            compression_method: 0,
            extensions: vec![Extension {
                typ: extension_type::CONNECTION_ID,
                data: opaque8_body(&[1, 2, 3, 4]),
            }],
        };
        assert_eq!(ServerHello::parse(&sh.encode()).unwrap(), sh);
        let cert = CertificateMsg {
            certificates: vec![vec![1, 2, 3], vec![4]],
        };
        assert_eq!(CertificateMsg::parse(&cert.encode(), 4).unwrap(), cert);
        assert!(CertificateMsg::parse(&cert.encode(), 1).is_err());
        let ske = ServerKeyExchange {
            named_group: 23,
            public: vec![4; 65],
            signature_scheme: 0x0403,
            signature: vec![0x30; 70],
        };
        assert_eq!(ServerKeyExchange::parse(&ske.encode()).unwrap(), ske);
        let cr = CertificateRequest {
            certificate_types: vec![CERT_TYPE_ECDSA_SIGN],
            signature_schemes: vec![0x0403, 0x0503],
            authorities: vec![vec![0x30, 0]],
        };
        assert_eq!(CertificateRequest::parse(&cr.encode()).unwrap(), cr);
        let hvr = HelloVerifyRequest {
            server_version: DTLS_1_0,
            cookie: vec![5; 32],
        };
        assert_eq!(HelloVerifyRequest::parse(&hvr.encode()).unwrap(), hvr);
        assert_eq!(
            parse_digitally_signed(&digitally_signed_body(0x0403, &[1, 2])).unwrap(),
            (0x0403, vec![1, 2])
        );
        assert_eq!(
            parse_client_key_exchange(&client_key_exchange_body(&[4; 65])).unwrap(),
            vec![4; 65]
        );
        assert!(parse_finished(&[0; 11]).is_err());
        assert!(parse_finished(&[0; 13]).is_err());
    }
}
