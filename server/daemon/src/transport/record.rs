//! Peeking at DTLS 1.2 record headers (RFC 6347 §4.1) and the plaintext handshake header
//! (§4.2.2), without decrypting anything. Used to route datagrams and to recognise flights.
//! Every read is bounds-checked; a datagram that does not split exactly into well-formed records
//! is rejected as a whole.

/// `ContentType` values (RFC 5246 §6.2.1).
pub(crate) const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub(crate) const CONTENT_ALERT: u8 = 21;
pub(crate) const CONTENT_HANDSHAKE: u8 = 22;
pub(crate) const CONTENT_APPLICATION_DATA: u8 = 23;

/// `HandshakeType` values (RFC 5246 §7.4, RFC 6347 §4.3.2).
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_SERVER_HELLO: u8 = 2;

/// type(1) version(2) epoch(2) sequence_number(6) length(2).
const RECORD_HEADER_LEN: usize = 13;
/// msg_type(1) length(3) message_seq(2) fragment_offset(3) fragment_length(3).
const HANDSHAKE_HEADER_LEN: usize = 12;
/// ProtocolVersion (2) + Random (32) at the start of ClientHello and ServerHello bodies.
const HELLO_RANDOM_END: usize = 2 + 32;

pub(crate) type ClientRandom = [u8; 32];

/// What the first record of a datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FirstRecord {
    /// An epoch-0 handshake record carrying (a fragment of) a ClientHello. `random` is known when
    /// the fragment starts at offset 0 and is long enough to hold it.
    ClientHello {
        random: Option<ClientRandom>,
    },
    /// An epoch-0 ServerHello (only our own outgoing datagrams).
    ServerHello {
        cipher_suite: Option<u16>,
    },
    /// Any other handshake record (at epoch >= 1 it is encrypted, so its type is unknown).
    OtherHandshake {
        epoch: u16,
    },
    ChangeCipherSpec,
    Alert,
    ApplicationData,
}

/// The parts of a datagram the demultiplexer needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Datagram {
    pub(crate) first: FirstRecord,
    /// Some record in the datagram is a ChangeCipherSpec.
    pub(crate) contains_change_cipher_spec: bool,
}

/// Why a datagram was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Malformed {
    Empty,
    TruncatedHeader,
    NotDtls,
    UnknownContentType,
    TruncatedRecord,
}

impl Datagram {
    /// The client retransmitting its flight 5 after we completed (RFC 6347 §4.2.4): a
    /// ChangeCipherSpec, an epoch-0 handshake record that is not a ClientHello, or any handshake
    /// record at epoch >= 1.
    pub(crate) fn is_flight_retransmission(&self) -> bool {
        matches!(
            self.first,
            FirstRecord::ChangeCipherSpec
                | FirstRecord::OtherHandshake { .. }
                | FirstRecord::ServerHello { .. }
        )
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let hi = *bytes.get(at)?;
    let lo = *bytes.get(at + 1)?;
    Some(u16::from_be_bytes([hi, lo]))
}

fn u24_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b0 = *bytes.get(at)?;
    let b1 = *bytes.get(at + 1)?;
    let b2 = *bytes.get(at + 2)?;
    Some(u32::from_be_bytes([0, b0, b1, b2]))
}

/// Split `datagram` into records and describe the first one.
pub(crate) fn parse_datagram(datagram: &[u8]) -> Result<Datagram, Malformed> {
    if datagram.is_empty() {
        return Err(Malformed::Empty);
    }
    let mut rest = datagram;
    let mut first = None;
    let mut contains_change_cipher_spec = false;
    while !rest.is_empty() {
        let header: &[u8; RECORD_HEADER_LEN] = rest
            .get(..RECORD_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(Malformed::TruncatedHeader)?;
        let content_type = header[0];
        // DTLS versions are 0xFEFF (1.0, allowed on ClientHello records) and 0xFEFD (1.2).
        if header[1] != 0xFE {
            return Err(Malformed::NotDtls);
        }
        let epoch = u16::from_be_bytes([header[3], header[4]]);
        let length = usize::from(u16::from_be_bytes([header[11], header[12]]));
        let end = RECORD_HEADER_LEN
            .checked_add(length)
            .ok_or(Malformed::TruncatedRecord)?;
        let fragment = rest
            .get(RECORD_HEADER_LEN..end)
            .ok_or(Malformed::TruncatedRecord)?;
        let kind = match content_type {
            CONTENT_CHANGE_CIPHER_SPEC => {
                contains_change_cipher_spec = true;
                FirstRecord::ChangeCipherSpec
            }
            CONTENT_ALERT => FirstRecord::Alert,
            CONTENT_HANDSHAKE => classify_handshake(epoch, fragment),
            CONTENT_APPLICATION_DATA => FirstRecord::ApplicationData,
            // tls12_cid (25, RFC 9146) is not supported by the engine; anything else is garbage.
            _ => return Err(Malformed::UnknownContentType),
        };
        if first.is_none() {
            first = Some(kind);
        }
        rest = rest.get(end..).ok_or(Malformed::TruncatedRecord)?;
    }
    let first = first.ok_or(Malformed::Empty)?;
    Ok(Datagram {
        first,
        contains_change_cipher_spec,
    })
}

fn classify_handshake(epoch: u16, fragment: &[u8]) -> FirstRecord {
    if epoch != 0 {
        return FirstRecord::OtherHandshake { epoch };
    }
    let Some(&msg_type) = fragment.first() else {
        return FirstRecord::OtherHandshake { epoch };
    };
    let starts_message = u24_at(fragment, 6) == Some(0);
    let body = fragment.get(HANDSHAKE_HEADER_LEN..).unwrap_or(&[]);
    match msg_type {
        HANDSHAKE_CLIENT_HELLO => {
            let random = if starts_message {
                body.get(2..HELLO_RANDOM_END)
                    .and_then(|r| ClientRandom::try_from(r).ok())
            } else {
                None
            };
            FirstRecord::ClientHello { random }
        }
        HANDSHAKE_SERVER_HELLO => {
            // session_id<0..32> follows the random, then the cipher suite.
            let cipher_suite = if starts_message {
                body.get(HELLO_RANDOM_END)
                    .and_then(|&sid_len| u16_at(body, HELLO_RANDOM_END + 1 + usize::from(sid_len)))
            } else {
                None
            };
            FirstRecord::ServerHello { cipher_suite }
        }
        _ => FirstRecord::OtherHandshake { epoch },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(content_type: u8, epoch: u16, fragment: &[u8]) -> Vec<u8> {
        let mut r = vec![content_type, 0xFE, 0xFD];
        r.extend_from_slice(&epoch.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0, 0, 7]);
        r.extend_from_slice(&u16::try_from(fragment.len()).expect("short").to_be_bytes());
        r.extend_from_slice(fragment);
        r
    }

    fn handshake(msg_type: u8, offset: u32, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).expect("short").to_be_bytes();
        let mut h = vec![msg_type, len[1], len[2], len[3], 0, 0];
        let off = offset.to_be_bytes();
        h.extend_from_slice(&[off[1], off[2], off[3], len[1], len[2], len[3]]);
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn client_hello_random_is_extracted() {
        let mut body = vec![0xFE, 0xFD];
        body.extend((0u8..32).collect::<Vec<_>>());
        body.extend_from_slice(&[0, 0]);
        let d = record(22, 0, &handshake(1, 0, &body));
        let parsed = parse_datagram(&d).expect("valid");
        let mut expected = [0u8; 32];
        for (i, b) in expected.iter_mut().enumerate() {
            *b = u8::try_from(i).expect("small");
        }
        assert_eq!(
            parsed.first,
            FirstRecord::ClientHello {
                random: Some(expected)
            }
        );
        assert!(!parsed.is_flight_retransmission());
    }

    #[test]
    fn client_hello_continuation_fragment_has_no_random() {
        let d = record(22, 0, &handshake(1, 100, &[1, 2, 3]));
        assert_eq!(
            parse_datagram(&d).expect("valid").first,
            FirstRecord::ClientHello { random: None }
        );
    }

    #[test]
    fn server_hello_cipher_suite_is_read() {
        let mut body = vec![0xFE, 0xFD];
        body.extend([9u8; 32]);
        body.push(2); // session id length
        body.extend_from_slice(&[0xAA, 0xBB]);
        body.extend_from_slice(&[0xC0, 0xAE, 0x00]);
        let d = record(22, 0, &handshake(2, 0, &body));
        assert_eq!(
            parse_datagram(&d).expect("valid").first,
            FirstRecord::ServerHello {
                cipher_suite: Some(0xC0AE)
            }
        );
    }

    #[test]
    fn flight_retransmission_triggers() {
        let ccs = record(20, 0, &[1]);
        let finished = record(22, 1, &[0u8; 40]);
        let mut both = ccs.clone();
        both.extend_from_slice(&finished);
        let parsed = parse_datagram(&both).expect("valid");
        assert_eq!(parsed.first, FirstRecord::ChangeCipherSpec);
        assert!(parsed.contains_change_cipher_spec);
        assert!(parsed.is_flight_retransmission());
        assert!(parse_datagram(&finished)
            .expect("valid")
            .is_flight_retransmission());
        let cert = record(22, 0, &handshake(11, 0, &[0u8; 20]));
        assert!(parse_datagram(&cert)
            .expect("valid")
            .is_flight_retransmission());
        let app = record(23, 1, &[0u8; 30]);
        assert!(!parse_datagram(&app)
            .expect("valid")
            .is_flight_retransmission());
    }

    #[test]
    fn malformed_datagrams_are_rejected() {
        assert_eq!(parse_datagram(&[]), Err(Malformed::Empty));
        assert_eq!(parse_datagram(&[22, 0xFE]), Err(Malformed::TruncatedHeader));
        let mut truncated = record(22, 0, &[0u8; 50]);
        truncated.truncate(30);
        assert_eq!(parse_datagram(&truncated), Err(Malformed::TruncatedRecord));
        let tls = {
            let mut r = record(22, 0, &[0u8; 5]);
            r[1] = 0x03;
            r
        };
        assert_eq!(parse_datagram(&tls), Err(Malformed::NotDtls));
        assert_eq!(
            parse_datagram(&record(99, 0, &[1])),
            Err(Malformed::UnknownContentType)
        );
        // A good record followed by trailing junk is rejected as a whole.
        let mut trailing = record(23, 1, &[0u8; 10]);
        trailing.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_datagram(&trailing), Err(Malformed::TruncatedHeader));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..300usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.to_be_bytes()[0]
                })
                .collect();
            let _ = parse_datagram(&bytes);
            let mut framed = record(22, 0, &bytes);
            framed.truncate(len);
            let _ = parse_datagram(&framed);
        }
    }
}
