//! Fuzz target: DTLS handshake fragments and message codecs (`est_dtls::wire`).
//!
//! Invariants:
//! * `parse_handshake_fragments` never panics; what it accepts keeps
//!   `fragment_offset + fragment_length <= length` and re-encodes to the input bytes;
//! * every message and extension parser never panics (cached_info and the abbreviated
//!   Certificate message of RFC 7924, RFC 7250's certificate types included); where one succeeds, `encode()` and a
//!   second parse give an equal value, and for the strict (canonical) encodings the encoded
//!   bytes are the input.
//!
//! The first input byte picks which parser gets the rest as a message body (all of them also
//! run on the whole input), so the fuzzer can specialise per message.
#![no_main]

use est_dtls::wire::{self, CertificateMsg, CertificateRequest, ClientHello, HelloVerifyRequest};
use est_dtls::wire::{ServerHello, ServerKeyExchange};
use libfuzzer_sys::fuzz_target;

fn fragment_bytes(f: &wire::HandshakeFragment<'_>) -> Vec<u8> {
    let mut out = vec![f.msg_type];
    out.extend_from_slice(&f.length.to_be_bytes()[1..]);
    out.extend_from_slice(&f.message_seq.to_be_bytes());
    out.extend_from_slice(&f.offset.to_be_bytes()[1..]);
    out.extend_from_slice(&(f.body.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(f.body);
    out
}

fn messages(body: &[u8]) {
    if let Ok(ch) = ClientHello::parse(body) {
        let enc = ch.encode();
        assert_eq!(ClientHello::parse(&enc).as_ref(), Ok(&ch));
        let _ = ch.cookie_params();
        for e in &ch.extensions {
            assert_eq!(ch.extension(e.typ), Some(e.data.as_slice()));
            extensions(&e.data);
        }
        // Only an empty extension block can be dropped by the re-encoding.
        if enc != body {
            assert!(ch.extensions.is_empty());
            assert_eq!(&body[..enc.len()], enc.as_slice());
            assert_eq!(&body[enc.len()..], &[0, 0]);
        }
    }
    if let Ok(sh) = ServerHello::parse(body) {
        let enc = sh.encode();
        assert_eq!(ServerHello::parse(&enc).as_ref(), Ok(&sh));
        if enc != body {
            assert!(sh.extensions.is_empty());
            assert_eq!(&body[enc.len()..], &[0, 0]);
        }
    }
    if let Ok(hvr) = HelloVerifyRequest::parse(body) {
        assert_eq!(hvr.encode(), body);
        assert_eq!(HelloVerifyRequest::parse(&hvr.encode()), Ok(hvr));
    }
    if let Ok(c) = CertificateMsg::parse(body, 8) {
        assert!(c.certificates.len() <= 8);
        assert_eq!(c.encode(), body);
        assert_eq!(CertificateMsg::parse(&c.encode(), 8), Ok(c));
    }
    if let Ok(ske) = ServerKeyExchange::parse(body) {
        assert_eq!(ske.encode(), body);
        assert_eq!(ServerKeyExchange::parse(&ske.encode()), Ok(ske));
    }
    if let Ok(cr) = CertificateRequest::parse(body) {
        assert_eq!(cr.encode(), body);
        assert_eq!(CertificateRequest::parse(&cr.encode()), Ok(cr));
    }
    if let Ok(p) = wire::parse_client_key_exchange(body) {
        assert_eq!(wire::client_key_exchange_body(&p), body);
    }
    if let Ok((scheme, sig)) = wire::parse_digitally_signed(body) {
        assert_eq!(wire::digitally_signed_body(scheme, &sig), body);
    }
    if let Ok(v) = wire::parse_finished(body) {
        assert_eq!(v.as_slice(), body);
    }
    // RFC 7924: the abbreviated Certificate message, never mistaken for a full one.
    if let Some(hash) = wire::parse_cached_certificate(body) {
        assert_eq!(wire::opaque8_body(hash), body);
        assert!(CertificateMsg::parse(body, 8).is_err());
    }
    extensions(body);
}

fn extensions(data: &[u8]) {
    if let Ok(g) = wire::parse_supported_groups(data) {
        assert!(!g.is_empty());
        assert_eq!(wire::supported_groups_body(&g), data);
    }
    if let Ok(s) = wire::parse_signature_algorithms(data) {
        assert!(!s.is_empty());
        assert_eq!(wire::signature_algorithms_body(&s), data);
    }
    if let Ok(f) = wire::parse_ec_point_formats(data) {
        assert!(!f.is_empty());
        assert_eq!(wire::opaque8_body(&f), data);
    }
    if let Ok(v) = wire::parse_opaque8(data) {
        assert_eq!(wire::opaque8_body(&v), data);
    }
    if let Ok(objects) = wire::parse_cached_info_client(data) {
        assert!(!objects.is_empty() && objects.len() <= wire::MAX_CACHED_OBJECTS);
        assert!(objects.iter().all(|o| !o.hash.is_empty()));
        assert_eq!(wire::cached_info_client_body(&objects), data);
    }
    if let Ok(types) = wire::parse_certificate_types(data) {
        assert!(!types.is_empty());
        assert_eq!(wire::certificate_types_body(&types), data);
    }
    if let Ok(t) = wire::parse_certificate_type(data) {
        assert_eq!(data, [t]);
    }
    if let Ok(types) = wire::parse_cached_info_server(data) {
        assert!(!types.is_empty());
        assert_eq!(wire::cached_info_server_body(&types), data);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(frags) = wire::parse_handshake_fragments(data) {
        let mut again = Vec::new();
        for f in &frags {
            assert!(u64::from(f.offset) + f.body.len() as u64 <= u64::from(f.length));
            again.extend(fragment_bytes(f));
            if f.is_complete() {
                assert_eq!(
                    wire::handshake_message(f.msg_type, f.message_seq, f.body),
                    fragment_bytes(f)
                );
                messages(f.body);
            }
        }
        assert_eq!(again, data);
    }
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    match pick % 4 {
        // A whole message, fragmented and put back together by the codec's own helpers.
        0 if !rest.is_empty() => {
            let msg = wire::handshake_message(rest[0], 7, &rest[1..]);
            let max = usize::from(pick / 4).max(1);
            let mut body = Vec::new();
            for frag in wire::fragment_handshake(&msg, max) {
                let parsed = wire::parse_handshake_fragments(&frag).expect("own fragment");
                assert_eq!(parsed.len(), 1);
                assert_eq!(parsed[0].offset as usize, body.len());
                assert!(parsed[0].body.len() <= max);
                body.extend_from_slice(parsed[0].body);
            }
            assert_eq!(body, &rest[1..]);
        }
        _ => messages(rest),
    }
});
