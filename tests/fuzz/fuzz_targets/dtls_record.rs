//! Fuzz target: the DTLS record layer's codec (`est_dtls::wire`).
//!
//! Invariants, for each of a few CID lengths (0: CID records are refused; 1, 4, 8):
//! * `Records` never panics and stops at the first malformed record;
//! * every record it yields re-encodes with `push_record` to exactly the bytes it came from
//!   (records are contiguous from the start of the datagram);
//! * `peek_first_record` agrees with the first parsed record;
//! * `split_inner_plaintext` never panics, and what it returns re-encodes (with
//!   `inner_plaintext`) to the fragment less its zero padding;
//! * `parse_alert` round-trips.
#![no_main]

use est_dtls::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for cid_len in [0usize, 1, 4, 8] {
        let mut consumed = 0usize;
        let mut first = None;
        for rec in wire::Records::new(data, cid_len) {
            let Ok(rec) = rec else {
                break;
            };
            if first.is_none() {
                first = Some((rec.content_type, rec.epoch, rec.cid.to_vec()));
            }
            let mut out = Vec::new();
            rec.push_with(&mut out, rec.fragment);
            assert_eq!(
                data.get(consumed..consumed + out.len()),
                Some(out.as_slice()),
                "record does not re-encode to its bytes (cid_len {cid_len})"
            );
            consumed += out.len();
            assert!(rec.fragment.len() <= wire::MAX_CIPHERTEXT_LEN);
            assert_eq!(
                rec.cid.len(),
                if rec.content_type == wire::content_type::TLS12_CID {
                    cid_len
                } else {
                    0
                }
            );

            if let Ok((ct, content)) = wire::split_inner_plaintext(rec.fragment.to_vec()) {
                assert_ne!(ct, 0);
                let inner = wire::inner_plaintext(ct, &content);
                assert!(rec.fragment.starts_with(&inner));
                assert!(rec.fragment[inner.len()..].iter().all(|b| *b == 0));
            } else {
                assert!(rec.fragment.iter().all(|b| *b == 0));
            }
            if let Ok((level, desc)) = wire::parse_alert(rec.fragment) {
                assert_eq!(rec.fragment, [level, desc]);
            }
        }
        if let Some((ct, epoch, cid)) = first {
            let peek = wire::peek_first_record(data, cid_len);
            assert_eq!(peek, Some((ct, epoch, cid.as_slice())));
        }
        if consumed == data.len() && !data.is_empty() {
            // A datagram of well-formed records only: every record was yielded.
            assert!(wire::Records::new(data, cid_len).all(|r| r.is_ok()));
        }
    }
    // Arbitrary bytes as an inner plaintext (what decryption of a CID record yields).
    let _ = wire::split_inner_plaintext(data.to_vec());
    let _ = wire::parse_record(data, 0);
});
