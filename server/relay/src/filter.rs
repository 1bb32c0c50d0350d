//! What the proxy forwards from the mesh: datagrams that look like DTLS 1.2 records.
//!
//! The proxy cannot decrypt anything; it checks the framing only (RFC 6347 §4.1 / RFC 9146):
//! the datagram is one or more whole records, each with a known content type, a DTLS version
//! (1.0 in a ClientHello's record layer, else 1.2) and a length that fits. A tls12_cid record
//! carries the CID between the sequence number and the length; the proxy does not know its
//! length (the registrar chose it), so a tls12_cid record must be the datagram's last and is
//! accepted when some CID length up to 32 makes the framing exact. Anything else (CoAP in
//! clear, a port scan, random bytes) is not relayed.

/// content types
const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const TLS12_CID: u8 = 25;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

const RECORD_HEADER_LEN: usize = 13;
/// RFC 9146: CIDs are at most 255 bytes; the registrars we relay to issue short ones.
const MAX_CID_LEN: usize = 32;

fn version_ok(v: [u8; 2]) -> bool {
    v == [0xfe, 0xfd] || v == [0xfe, 0xff]
}

/// Whether `datagram` is a sequence of whole DTLS 1.2 records.
pub fn looks_like_dtls(datagram: &[u8]) -> bool {
    let mut rest = datagram;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let Some(header) = rest.first_chunk::<RECORD_HEADER_LEN>() else {
            return false;
        };
        let ct = header[0];
        if !version_ok([header[1], header[2]]) {
            return false;
        }
        match ct {
            CHANGE_CIPHER_SPEC | ALERT | HANDSHAKE | APPLICATION_DATA => {
                let len = usize::from(u16::from_be_bytes([header[11], header[12]]));
                let Some(next) = rest.get(RECORD_HEADER_LEN + len..) else {
                    return false;
                };
                if len == 0 && ct != APPLICATION_DATA {
                    return false;
                }
                rest = next;
            }
            TLS12_CID => {
                // type(1) version(2) epoch(2) seq(6) cid(n) length(2) payload(length)
                return (1..=MAX_CID_LEN).any(|n| {
                    let at = 11 + n;
                    rest.get(at..)
                        .and_then(<[u8]>::first_chunk)
                        .is_some_and(|l| {
                            let len = usize::from(u16::from_be_bytes(*l));
                            len > 0 && rest.len() == at + 2 + len
                        })
                });
            }
            _ => return false,
        }
    }
    true
}

/// Whether the datagram starts a handshake: its first record is an epoch-0 ClientHello. The
/// registrar answers every one (a HelloVerifyRequest at least), so an unanswered ClientHello
/// is what tells the proxy that a registrar is down.
pub fn is_client_hello(datagram: &[u8]) -> bool {
    datagram
        .first_chunk::<{ RECORD_HEADER_LEN + 1 }>()
        .is_some_and(|h| {
            h[0] == HANDSHAKE
                && [h[3], h[4]] == [0, 0]
                && h[RECORD_HEADER_LEN] == HANDSHAKE_CLIENT_HELLO
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ct: u8, version: [u8; 2], payload: &[u8]) -> Vec<u8> {
        let mut r = vec![ct, version[0], version[1], 0, 0, 0, 0, 0, 0, 0, 1];
        r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    #[test]
    fn dtls_records_pass() {
        let hello = record(
            HANDSHAKE,
            [0xfe, 0xff],
            &[1, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3],
        );
        assert!(looks_like_dtls(&hello));
        assert!(is_client_hello(&hello));
        let mut flight = record(HANDSHAKE, [0xfe, 0xfd], &[16; 40]);
        flight.extend(record(CHANGE_CIPHER_SPEC, [0xfe, 0xfd], &[1]));
        flight.extend(record(HANDSHAKE, [0xfe, 0xfd], &[0; 40]));
        assert!(looks_like_dtls(&flight));
        assert!(!is_client_hello(&flight));
        assert!(looks_like_dtls(&record(
            APPLICATION_DATA,
            [0xfe, 0xfd],
            &[9; 100]
        )));
        assert!(looks_like_dtls(&record(ALERT, [0xfe, 0xfd], &[2, 40])));
        // tls12_cid with a 4-byte CID.
        let mut cid = vec![
            TLS12_CID, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 5, 0xa, 0xb, 0xc, 0xd,
        ];
        cid.extend_from_slice(&30u16.to_be_bytes());
        cid.extend_from_slice(&[7; 30]);
        assert!(looks_like_dtls(&cid));
    }

    #[test]
    fn other_datagrams_do_not() {
        // A CoAP GET /.well-known/core in clear.
        assert!(!looks_like_dtls(&[
            0x40, 0x01, 0x12, 0x34, 0xbb, b'.', b'w'
        ]));
        assert!(!looks_like_dtls(b""));
        assert!(!looks_like_dtls(b"GET / HTTP/1.1\r\n\r\n"));
        // Wrong version, truncated, trailing garbage, unknown type, empty handshake.
        assert!(!looks_like_dtls(&record(HANDSHAKE, [0x03, 0x03], &[1; 10])));
        let r = record(HANDSHAKE, [0xfe, 0xfd], &[1; 10]);
        assert!(!looks_like_dtls(&r[..r.len() - 1]));
        let mut t = r.clone();
        t.push(0);
        assert!(!looks_like_dtls(&t));
        assert!(!looks_like_dtls(&record(24, [0xfe, 0xfd], &[1; 10])));
        assert!(!looks_like_dtls(&record(HANDSHAKE, [0xfe, 0xfd], &[])));
        let mut cid = vec![TLS12_CID, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 5, 0xa];
        cid.extend_from_slice(&[0xff; 3]);
        assert!(!looks_like_dtls(&cid));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = looks_like_dtls(&bytes);
            let _ = is_client_hello(&bytes);
        }
    }
}
