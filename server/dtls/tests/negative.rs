//! Negative tests in the style of tlsfuzzer: a client (with `danger_faults`) or an on-path
//! filter breaks one rule; the test checks the fatal alert that goes on the wire (or that the
//! record was dropped silently), the refusal counter, that nothing panicked, and that the
//! endpoint still serves a well-behaved client afterwards.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic is the test failing"
)]

mod support;

use std::time::Duration;

use est_dtls::wire::{
    self, alert, content_type as ct, extension_type as ext, handshake_type as hs, ClientHello,
    Extension, ServerHello, DTLS_1_2,
};
use est_dtls::{
    CipherSuite, CloseReason, ConnEvent, Error, Event, NamedGroup, RefusalReason, Transmit,
};
use support::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The plaintext (epoch 0) alerts of a datagram: (level, description).
fn plain_alerts(d: &[u8]) -> Vec<(u8, u8)> {
    wire::Records::new(d, 0)
        .filter_map(Result::ok)
        .filter(|r| r.content_type == ct::ALERT && r.epoch == 0)
        .filter_map(|r| wire::parse_alert(r.fragment).ok())
        .collect()
}

/// Plaintext alerts the server sent over the network, with the client they went to.
fn server_alerts(net: &Net) -> Vec<(usize, (u8, u8))> {
    net.log
        .iter()
        .filter(|(to_server, _, _)| !to_server)
        .flat_map(|(_, i, d)| plain_alerts(d).into_iter().map(move |a| (*i, a)))
        .collect()
}

/// Plaintext alerts client `i` sent.
fn client_alerts(net: &Net, i: usize) -> Vec<(u8, u8)> {
    net.log
        .iter()
        .filter(|(to_server, c, _)| *to_server && *c == i)
        .flat_map(|(_, _, d)| plain_alerts(d))
        .collect()
}

fn alerts_in(transmits: &[Transmit]) -> Vec<(u8, u8)> {
    transmits
        .iter()
        .flat_map(|t| plain_alerts(&t.payload))
        .collect()
}

/// The errors of the server's failed handshakes, in order.
fn server_failures(net: &Net) -> Vec<Error> {
    net.server_events
        .iter()
        .filter_map(|e| match e {
            Event::Closed(_, CloseReason::HandshakeFailed(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn client_failure(net: &Net, i: usize) -> Option<Error> {
    net.client_events[i].iter().find_map(|e| match e {
        ConnEvent::Closed(CloseReason::HandshakeFailed(e)) => Some(e.clone()),
        _ => None,
    })
}

/// Whole plaintext handshake messages of a datagram: (msg_type, message_seq, body).
fn plain_handshakes(d: &[u8]) -> Vec<(u8, u16, Vec<u8>)> {
    wire::Records::new(d, 0)
        .filter_map(Result::ok)
        .filter(|r| r.content_type == ct::HANDSHAKE && r.epoch == 0)
        .flat_map(|r| wire::parse_handshake_fragments(r.fragment).unwrap_or_default())
        .filter(|f| f.is_complete())
        .map(|f| (f.msg_type, f.message_seq, f.body.to_vec()))
        .collect()
}

/// The ServerHello the server sent to client `i`.
fn server_hello_to(net: &Net, i: usize) -> ServerHello {
    net.log
        .iter()
        .filter(|(to_server, c, _)| !to_server && *c == i)
        .flat_map(|(_, _, d)| plain_handshakes(d))
        .find(|(t, _, _)| *t == hs::SERVER_HELLO)
        .map(|(_, _, b)| ServerHello::parse(&b).unwrap())
        .expect("no ServerHello sent")
}

/// Re-encodes a datagram record by record, letting `f` rewrite the body of each whole
/// plaintext handshake message (message_seq and record sequence numbers are kept).
fn rewrite_plain_handshakes(d: &[u8], mut f: impl FnMut(u8, &mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    for rec in wire::Records::new(d, 0) {
        let rec = rec.unwrap();
        let mut payload = rec.fragment.to_vec();
        if rec.content_type == ct::HANDSHAKE && rec.epoch == 0 {
            let frags = wire::parse_handshake_fragments(rec.fragment).unwrap();
            payload.clear();
            for fr in frags {
                assert!(fr.is_complete(), "test assumes unfragmented messages");
                let mut body = fr.body.to_vec();
                f(fr.msg_type, &mut body);
                payload.extend(wire::handshake_message(fr.msg_type, fr.message_seq, &body));
            }
        }
        rec.push_with(&mut out, &payload);
    }
    out
}

/// A plaintext record.
fn plain_record(content: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::push_record(&mut out, content, DTLS_1_2, 0, seq, &[], payload);
    out
}

/// One raw handshake fragment header + body (fields as given, not checked).
fn raw_fragment(msg_type: u8, length: u32, seq: u16, offset: u32, body: &[u8]) -> Vec<u8> {
    raw_fragment_len(msg_type, length, seq, offset, body.len() as u32, body)
}

fn raw_fragment_len(
    msg_type: u8,
    length: u32,
    seq: u16,
    offset: u32,
    frag_len: u32,
    body: &[u8],
) -> Vec<u8> {
    let mut out = vec![msg_type];
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes()[1..]);
    out.extend_from_slice(&frag_len.to_be_bytes()[1..]);
    out.extend_from_slice(body);
    out
}

/// Drives client `i`'s cookie exchange by hand: ClientHello, HelloVerifyRequest, ClientHello
/// with the cookie. Returns the server's flight 4, not delivered.
fn admit(net: &mut Net, i: usize) -> Vec<Transmit> {
    let from = net.client_addrs[i];
    let ch1 = net.clients[i].poll_transmit().unwrap();
    net.inject(from, &ch1);
    let hvr = net.take_server_transmits().remove(0);
    let now = net.now;
    net.clients[i].handle_datagram(now, addr(SERVER), &hvr.payload);
    let ch2 = net.clients[i].poll_transmit().unwrap();
    net.inject(from, &ch2);
    assert_eq!(net.server.gauges().half_open, 1, "CH2 admitted");
    net.take_server_transmits()
}

/// Hands datagrams from the server to client `i` directly.
fn deliver_to_client(net: &mut Net, i: usize, transmits: &[Transmit]) {
    let now = net.now;
    for t in transmits {
        net.clients[i].handle_datagram(now, addr(SERVER), &t.payload);
    }
}

/// A well-behaved client (credentials `cred` of the PKI) completes a handshake and exchanges
/// data, and no handshake is left half open.
fn assert_still_serves(net: &mut Net, pki: &Pki, cred: usize) {
    let i = net.add_client(pki.client_config(cred));
    net.client_addrs[i] = std::net::SocketAddr::from(([10, 200, 0, i as u8 + 1], 7000));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(i), "a well-behaved client is refused");
    let h = net.handle_of_client(i).unwrap();
    let now = net.now;
    net.clients[i].send(now, b"ping").unwrap();
    net.server.send(now, h, b"pong").unwrap();
    net.run_for(Duration::from_millis(50));
    assert!(net.server_data().contains(&b"ping".to_vec()));
    assert!(net.client_events[i].contains(&ConnEvent::Data(b"pong".to_vec())));
    assert_eq!(net.server.gauges().half_open, 0);
}

/// Client `i` sends `data` and the server receives it, and the other way round.
fn assert_session_works(net: &mut Net, i: usize, data: &[u8]) {
    let h = net.handle_of_client(i).unwrap();
    let before = net.server_data().len();
    let now = net.now;
    net.clients[i].send(now, data).unwrap();
    net.server.send(now, h, data).unwrap();
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.server_data()[before..], [data.to_vec()]);
    assert!(net.client_events[i].contains(&ConnEvent::Data(data.to_vec())));
}

fn refused(net: &Net, r: RefusalReason) -> u64 {
    net.server.metrics().refused(r)
}

// ---------------------------------------------------------------------------------------------
// Finished and CertificateVerify
// ---------------------------------------------------------------------------------------------

#[test]
fn a_tampered_finished_gets_decrypt_error() {
    let pki = Pki::new(2);
    let mut net = Net::new(pki.server_config(), 21, 0.0);
    let mut cc = pki.client_config(0);
    cc.danger_faults.corrupt_finished = true;
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(0));
    // The record around the Finished authenticated; the verify_data did not: the server has no
    // write keys in use yet, so its alert is plaintext.
    assert_eq!(
        server_alerts(&net),
        vec![(0, (alert::FATAL, alert::DECRYPT_ERROR))]
    );
    assert_eq!(server_failures(&net), vec![Error::BadFinished]);
    assert_eq!(refused(&net, RefusalReason::BadSignatureOrFinished), 1);
    assert_eq!(net.server.metrics().refused_total(), 1);
    assert_eq!(net.server.metrics().records_bad_mac, 0);
    assert_eq!(
        client_failure(&net, 0),
        Some(Error::PeerAlert(alert::DECRYPT_ERROR))
    );
    assert_eq!(net.server.gauges().established, 0);
    assert_still_serves(&mut net, &pki, 1);
}

#[test]
fn a_certificate_verify_over_the_wrong_transcript_gets_decrypt_error() {
    let pki = Pki::new(2);
    let mut net = Net::new(pki.server_config(), 22, 0.0);
    let mut cc = pki.client_config(0);
    cc.danger_faults.sign_wrong_transcript = true;
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(0));
    assert_eq!(
        server_alerts(&net),
        vec![(0, (alert::FATAL, alert::DECRYPT_ERROR))]
    );
    assert_eq!(server_failures(&net), vec![Error::BadSignature]);
    assert_eq!(refused(&net, RefusalReason::BadSignatureOrFinished), 1);
    assert_eq!(net.server.metrics().ecdsa_verifies, 1);
    assert!(net.clients[0].is_closed());
    assert_still_serves(&mut net, &pki, 1);
}

/// A verifier that parsed the leaf hands it to the engine (`Verified::leaf`), which then takes
/// the CertificateVerify's key and the keyUsage check from that parse instead of parsing the
/// leaf again: with the leaf it was given, a meter connects and a keyAgreement-only
/// certificate is still refused; handed another certificate than the one sent (a broken
/// verifier), the CertificateVerify is checked against that one's key and fails.
#[test]
fn the_leaf_a_verifier_hands_back_is_the_one_the_engine_checks() {
    use der::Decode;
    use rcgen::KeyUsagePurpose as K;
    use std::sync::Arc;
    let pki = Pki::new(2);
    let handed: Arc<std::sync::Mutex<Vec<Arc<x509_cert::Certificate>>>> = Arc::default();
    let handing_back = |substitute: Option<Vec<u8>>| -> est_dtls::ChainVerifier {
        let ca = pki.ca_der.clone();
        let handed = handed.clone();
        Arc::new(move |chain: &[Vec<u8>]| {
            if chain.get(1) != Some(&ca) {
                return Err(est_dtls::CertError::UnknownCa("not our CA".into()));
            }
            let leaf = substitute.as_ref().unwrap_or(&chain[0]);
            let leaf = Arc::new(x509_cert::Certificate::from_der(leaf).unwrap());
            handed.lock().unwrap().push(leaf.clone());
            Ok(est_dtls::Verified {
                identity: chain[0].clone(),
                context: None,
                leaf: Some(leaf),
            })
        })
    };
    let with_verifier = |v: est_dtls::ChainVerifier| {
        let mut c = pki.server_config();
        c.client_verifier = v;
        c
    };

    let mut net = Net::new(with_verifier(handing_back(None)), 72, 0.0);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    assert_eq!(net.server.metrics().ecdsa_verifies, 1);
    // The engine used the parsed leaf and dropped it: the session does not keep it.
    assert!(handed
        .lock()
        .unwrap()
        .iter()
        .all(|l| Arc::strong_count(l) == 1));
    let agreement_only = pki.client_with_key_usages("ka-only", vec![K::KeyAgreement]);
    let c = net.add_client(pki.config_for(&agreement_only));
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(c));
    assert!(
        matches!(server_failures(&net).as_slice(), [Error::BadCertificate(m)] if m.contains("digitalSignature")),
        "{:?}",
        server_failures(&net)
    );

    let other = pki.clients[1].chain[0].clone();
    let mut net = Net::new(with_verifier(handing_back(Some(other))), 73, 0.0);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(0));
    assert_eq!(
        server_alerts(&net),
        vec![(0, (alert::FATAL, alert::DECRYPT_ERROR))]
    );
    assert_eq!(server_failures(&net), vec![Error::BadSignature]);
}

// ---------------------------------------------------------------------------------------------
// ECDHE public keys
// ---------------------------------------------------------------------------------------------

#[test]
fn client_ecdhe_keys_on_the_wrong_curve_or_off_the_curve_get_illegal_parameter() {
    let rng = ring::rand::SystemRandom::new();
    let p384 = est_dtls::crypto::EphemeralKey::generate(NamedGroup::Secp384r1, &rng).unwrap();
    let x25519 = est_dtls::crypto::EphemeralKey::generate(NamedGroup::X25519, &rng).unwrap();
    let p256 = est_dtls::crypto::EphemeralKey::generate(NamedGroup::Secp256r1, &rng).unwrap();
    let mut off_curve = p256.public_key().to_vec();
    off_curve[64] ^= 1; // y no longer matches x
    let mut compressed = vec![0x02 | (p256.public_key()[64] & 1)];
    compressed.extend_from_slice(&p256.public_key()[1..33]);
    let mut infinity_padded = vec![0x04];
    infinity_padded.extend_from_slice(&[0; 64]);
    // (negotiated group, point sent)
    let cases: Vec<(NamedGroup, Vec<u8>, &str)> = vec![
        (
            NamedGroup::Secp256r1,
            p384.public_key().to_vec(),
            "P-384 point for P-256",
        ),
        (
            NamedGroup::Secp256r1,
            x25519.public_key().to_vec(),
            "X25519 key for P-256",
        ),
        (NamedGroup::Secp256r1, off_curve, "point not on P-256"),
        (NamedGroup::Secp256r1, compressed, "compressed point"),
        (NamedGroup::Secp256r1, infinity_padded, "(0, 0)"),
        (NamedGroup::Secp256r1, vec![0x00], "point at infinity"),
        (
            NamedGroup::X25519,
            vec![0; 32],
            "X25519 zero point (all-zero secret)",
        ),
        (
            NamedGroup::X25519,
            p256.public_key().to_vec(),
            "P-256 point for X25519",
        ),
    ];
    let pki = Pki::new(cases.len() + 1);
    let mut net = Net::new(pki.server_config(), 23, 0.0);
    for (i, (group, point, what)) in cases.iter().enumerate() {
        let mut cc = pki.client_config(i);
        cc.groups = vec![*group];
        cc.danger_faults.client_point = Some(point.clone());
        net.add_client(cc);
        net.run_for(Duration::from_secs(5));
        assert!(!net.client_connected(i), "{what}: accepted");
        let alerts: Vec<_> = server_alerts(&net)
            .into_iter()
            .filter(|(c, _)| *c == i)
            .map(|(_, a)| a)
            .collect();
        assert_eq!(
            alerts,
            vec![(alert::FATAL, alert::ILLEGAL_PARAMETER)],
            "{what}"
        );
        assert_eq!(
            server_failures(&net).last(),
            Some(&Error::BadPublicKey),
            "{what}"
        );
        assert!(net.clients[i].is_closed(), "{what}");
    }
    assert_eq!(
        refused(&net, RefusalReason::BadSignatureOrFinished),
        cases.len() as u64
    );
    assert_still_serves(&mut net, &pki, cases.len());
}

// ---------------------------------------------------------------------------------------------
// Record layer: replays, epochs, early ChangeCipherSpec
// ---------------------------------------------------------------------------------------------

#[test]
fn replayed_old_epoch_and_unknown_epoch_records_are_dropped_silently() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 24, 0.0);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    assert_session_works(&mut net, 0, b"first");
    let from = client_addr(0);
    let now = net.now;
    net.clients[0].send(now, b"once").unwrap();
    let rec = net.clients[0].poll_transmit().unwrap();
    assert_eq!(rec[0], ct::APPLICATION_DATA);
    net.inject(from, &rec);
    let m0 = net.server.metrics().clone();
    // 1. The same record again, and again.
    net.inject(from, &rec);
    net.inject(from, &rec);
    assert_eq!(
        net.server.metrics().records_replayed,
        m0.records_replayed + 2
    );
    // 2. The same ciphertext claiming epoch 2, epoch 0xFFFF (unknown) and a fresh sequence
    //    number: dropped before any decryption.
    for epoch in [2u16, 0xFFFF] {
        let mut r = rec.clone();
        r[3..5].copy_from_slice(&epoch.to_be_bytes());
        r[10] = r[10].wrapping_add(7);
        net.inject(from, &r);
    }
    assert_eq!(net.server.metrics().records_dropped, m0.records_dropped + 2);
    // 3. Old epoch: plaintext application data, a forged fatal alert, a handshake record with
    //    a broken fragment, the client's own ClientKeyExchange flight again (its final flight
    //    is no longer kept: application data showed the client has it).
    net.inject(
        from,
        &plain_record(ct::APPLICATION_DATA, 100, b"plaintext!"),
    );
    net.inject(
        from,
        &plain_record(ct::ALERT, 101, &[alert::FATAL, alert::HANDSHAKE_FAILURE]),
    );
    net.inject(
        from,
        &plain_record(
            ct::HANDSHAKE,
            102,
            &raw_fragment_len(hs::FINISHED, 12, 9, 10, 12, &[0; 12]),
        ),
    );
    let flight5 = net
        .log
        .iter()
        .find(|(to_server, i, d)| {
            *to_server
                && *i == 0
                && plain_handshakes(d)
                    .iter()
                    .any(|(t, _, _)| *t == hs::CLIENT_KEY_EXCHANGE)
        })
        .map(|(_, _, d)| d.clone())
        .unwrap();
    net.inject(from, &flight5);
    // 4. A ChangeCipherSpec in the established epoch.
    net.inject(from, &plain_record(ct::CHANGE_CIPHER_SPEC, 103, &[1]));
    assert!(
        net.take_server_transmits().is_empty(),
        "the server answered a record it should have dropped"
    );
    assert_eq!(net.server_data().last().unwrap(), b"once");
    assert_eq!(net.server_data().len(), 2);
    assert_eq!(net.server.gauges().established, 1);
    assert!(server_failures(&net).is_empty());
    assert!(!net
        .server_events
        .iter()
        .any(|e| matches!(e, Event::Closed(..))));
    // The session lives on, in both directions.
    assert_session_works(&mut net, 0, b"still here");

    // The client's replay window too: a server record delivered twice is delivered once.
    let h = net.handle_of_client(0).unwrap();
    let now = net.now;
    net.server.send(now, h, b"to the meter").unwrap();
    let t = net.take_server_transmits().remove(0);
    net.clients[0].handle_datagram(now, addr(SERVER), &t.payload);
    net.clients[0].handle_datagram(now, addr(SERVER), &t.payload);
    let got = std::iter::from_fn(|| net.clients[0].poll_event())
        .filter(|e| *e == ConnEvent::Data(b"to the meter".to_vec()))
        .count();
    assert_eq!(got, 1);
    assert_eq!(net.clients[0].metrics().records_replayed, 1);
}

#[test]
fn records_for_an_unknown_connection_id_are_dropped_silently() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 25, 0.0);
    let mut cc = pki.client_config(0);
    cc.connection_id = Some(Vec::new());
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    let now = net.now;
    net.clients[0].send(now, b"cid").unwrap();
    let rec = net.clients[0].poll_transmit().unwrap();
    assert_eq!(rec[0], ct::TLS12_CID);
    let dropped = net.server.metrics().dropped_unknown_peer;
    let mut other = rec.clone();
    other[11] ^= 0xFF; // first CID byte
    net.inject(addr("10.66.0.1:1"), &other);
    net.inject(client_addr(0), &other);
    assert_eq!(net.server.metrics().dropped_unknown_peer, dropped + 2);
    // A truncated CID record.
    net.inject(client_addr(0), &rec[..13]);
    assert!(net.take_server_transmits().is_empty());
    net.inject(client_addr(0), &rec);
    assert_eq!(net.server_data(), vec![b"cid".to_vec()]);
    assert_session_works(&mut net, 0, b"and on");
}

#[test]
fn a_change_cipher_spec_before_keys_is_dropped_and_the_handshake_completes() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 26, 0.0);
    net.add_client(pki.client_config(0));
    let from = client_addr(0);
    // Before any state for the address: nothing to drop it from, nothing sent.
    net.inject(from, &plain_record(ct::CHANGE_CIPHER_SPEC, 0, &[1]));
    assert!(net.take_server_transmits().is_empty());
    let flight4 = admit(&mut net, 0);
    let m0 = net.server.metrics().clone();
    // The server awaits the client's Certificate: a CCS now is early.
    net.inject(from, &plain_record(ct::CHANGE_CIPHER_SPEC, 2, &[1]));
    // A malformed CCS, and one claiming epoch 1 (buffered for the future epoch, then fails
    // authentication when that epoch starts).
    net.inject(from, &plain_record(ct::CHANGE_CIPHER_SPEC, 3, &[1, 1]));
    let mut e1 = Vec::new();
    wire::push_record(&mut e1, ct::CHANGE_CIPHER_SPEC, DTLS_1_2, 1, 0, &[], &[1]);
    net.inject(from, &e1);
    assert!(net.take_server_transmits().is_empty(), "silent drop");
    assert_eq!(net.server.metrics().records_dropped, m0.records_dropped + 1);
    assert_eq!(
        net.server.metrics().records_malformed,
        m0.records_malformed + 1
    );
    // The client, awaiting the ServerHello, gets an early CCS too.
    let now = net.now;
    net.clients[0].handle_datagram(
        now,
        addr(SERVER),
        &plain_record(ct::CHANGE_CIPHER_SPEC, 1, &[1]),
    );
    assert!(net.clients[0].poll_transmit().is_none());
    assert!(!net.clients[0].is_closed());
    deliver_to_client(&mut net, 0, &flight4);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0), "handshake did not complete");
    assert_eq!(net.server.metrics().handshakes_completed, 1);
    assert_eq!(net.server.metrics().refused_total(), 0);
    assert!(server_alerts(&net).is_empty());
    assert_session_works(&mut net, 0, b"after early CCS");
}

#[test]
fn early_records_of_the_next_epoch_are_held_to_their_cap() {
    // A peer past the cookie sends many records of epoch 1 of the largest size before any
    // ChangeCipherSpec: the handshake keeps at most MAX_FUTURE_RECORDS of them (what
    // est-server's memory bound counts per half-open handshake) and drops the rest. When the
    // epoch starts, each kept record is opened and fails authentication: the count of bad
    // MACs is the count kept. The handshake completes regardless.
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 27, 0.0);
    net.add_client(pki.client_config(0));
    let from = client_addr(0);
    let flight4 = admit(&mut net, 0);
    let m0 = net.server.metrics().clone();
    let sent = 3 * est_dtls::MAX_FUTURE_RECORDS;
    for k in 0..sent {
        let mut rec = Vec::new();
        let body = vec![0xAB; wire::MAX_CIPHERTEXT_LEN];
        wire::push_record(
            &mut rec,
            ct::APPLICATION_DATA,
            DTLS_1_2,
            1,
            100 + k as u64,
            &[],
            &body,
        );
        net.inject(from, &rec);
    }
    assert!(net.take_server_transmits().is_empty(), "silent");
    assert_eq!(net.server.metrics().records_bad_mac, m0.records_bad_mac);
    // One record over the size limit is not a record at all.
    let mut too_large = Vec::new();
    let body = vec![0xAB; wire::MAX_CIPHERTEXT_LEN + 1];
    wire::push_record(
        &mut too_large,
        ct::APPLICATION_DATA,
        DTLS_1_2,
        1,
        99,
        &[],
        &body,
    );
    net.inject(from, &too_large);
    assert_eq!(
        net.server.metrics().records_malformed,
        m0.records_malformed + 1
    );
    deliver_to_client(&mut net, 0, &flight4);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0), "handshake did not complete");
    assert_eq!(
        net.server.metrics().records_bad_mac,
        m0.records_bad_mac + est_dtls::MAX_FUTURE_RECORDS as u64,
        "exactly the cap was kept"
    );
    assert_session_works(&mut net, 0, b"after early records");
}

// ---------------------------------------------------------------------------------------------
// Handshake fragments
// ---------------------------------------------------------------------------------------------

/// Splits every epoch-0 handshake message other than the ClientHello into three overlapping
/// fragments, sent in their own datagrams out of order; other records go on unchanged, in
/// order, after them.
fn overlapping(d: Vec<u8>, rewritten: &mut usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = Vec::new();
    for rec in wire::Records::new(&d, 0) {
        let rec = rec.unwrap();
        let frags = if rec.content_type == ct::HANDSHAKE && rec.epoch == 0 {
            wire::parse_handshake_fragments(rec.fragment).unwrap()
        } else {
            Vec::new()
        };
        if frags.is_empty() || frags.iter().any(|f| f.msg_type == hs::CLIENT_HELLO) {
            rec.push_with(&mut rest, rec.fragment);
            continue;
        }
        for f in frags {
            assert!(f.is_complete());
            let l = f.body.len();
            if l < 8 {
                // Too short to split: sent twice instead.
                for _ in 0..2 {
                    let b = raw_fragment(f.msg_type, f.length, f.message_seq, 0, f.body);
                    out.push(plain_record(ct::HANDSHAKE, rec.seq, &b));
                }
                continue;
            }
            *rewritten += 1;
            for (s, e) in [(l / 4, l / 2), (l / 3, l), (0, 2 * l / 3 + 1)] {
                let b = raw_fragment(f.msg_type, f.length, f.message_seq, s as u32, &f.body[s..e]);
                out.push(plain_record(ct::HANDSHAKE, rec.seq, &b));
            }
        }
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

#[test]
fn overlapping_out_of_order_fragments_reassemble() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 27, 0.0);
    net.add_client(pki.client_config(0));
    let rewritten = std::rc::Rc::new(std::cell::Cell::new(0usize));
    let r = rewritten.clone();
    // Both directions: the server's flight 4 and the client's flight 5.
    net.filter = Some(Box::new(move |_to_server, _i, d| {
        let mut n = r.get();
        let out = overlapping(d, &mut n);
        r.set(n);
        out
    }));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    assert_eq!(net.server.metrics().handshakes_completed, 1);
    // ServerHello, Certificate, SKE, CertificateRequest; Certificate, CKE, CertificateVerify
    // (ServerHelloDone is empty).
    assert!(rewritten.get() >= 7, "only {} rewritten", rewritten.get());
    assert_eq!(net.server.metrics().refused_total(), 0);
    assert_eq!(net.server.metrics().flights_retransmitted, 0);
    net.filter = None;
    assert_session_works(&mut net, 0, b"reassembled");
}

#[test]
fn a_fragment_claiming_a_message_over_the_limit_gets_decode_error() {
    let pki = Pki::new(2);
    let sc = pki.server_config();
    let max = sc.limits.max_handshake_message_bytes;
    let mut net = Net::new(sc, 28, 0.0);
    net.add_client(pki.client_config(0));
    admit(&mut net, 0);
    // The next message the server expects is the client's Certificate (message_seq 2).
    let frag = raw_fragment(hs::CERTIFICATE, max + 1, 2, 0, &[0x30; 100]);
    net.inject(client_addr(0), &plain_record(ct::HANDSHAKE, 2, &frag));
    let out = net.take_server_transmits();
    assert_eq!(
        alerts_in(&out),
        vec![(alert::FATAL, alert::DECODE_ERROR)],
        "{out:?}"
    );
    assert!(matches!(
        server_failures(&net).as_slice(),
        [Error::Decode(wire::DecodeError::TooLarge(_))]
    ));
    assert_eq!(refused(&net, RefusalReason::Decode), 1);
    assert_eq!(net.server.gauges().half_open, 0);
    // A second client whose real certificate message exceeds a small limit: same answer.
    let mut sc = pki.server_config();
    sc.limits.max_handshake_message_bytes = 256;
    let mut small = Net::new(sc, 29, 0.0);
    small.add_client(pki.client_config(0));
    small.run_for(Duration::from_secs(5));
    assert!(!small.client_connected(0));
    assert_eq!(
        server_alerts(&small),
        vec![(0, (alert::FATAL, alert::DECODE_ERROR))]
    );
    assert_eq!(small.server.metrics().refused(RefusalReason::Decode), 1);
    assert!(small.clients[0].is_closed());
    // The refused client goes away (it would otherwise retransmit its ClientHello).
    net.clients[0].close();
    assert_still_serves(&mut net, &pki, 1);
}

#[test]
fn fragments_of_one_message_that_disagree_on_its_length_get_decode_error() {
    let pki = Pki::new(2);
    let mut net = Net::new(pki.server_config(), 30, 0.0);
    net.add_client(pki.client_config(0));
    admit(&mut net, 0);
    let mut d = plain_record(
        ct::HANDSHAKE,
        2,
        &raw_fragment(hs::CERTIFICATE, 500, 2, 0, &[1; 100]),
    );
    d.extend(plain_record(
        ct::HANDSHAKE,
        3,
        &raw_fragment(hs::CERTIFICATE, 600, 2, 100, &[1; 100]),
    ));
    net.inject(client_addr(0), &d);
    let out = net.take_server_transmits();
    assert_eq!(alerts_in(&out), vec![(alert::FATAL, alert::DECODE_ERROR)]);
    assert_eq!(refused(&net, RefusalReason::Decode), 1);
    // The refused client goes away (it would otherwise retransmit its ClientHello).
    net.clients[0].close();
    assert_still_serves(&mut net, &pki, 1);
}

#[test]
fn a_fragment_past_its_message_end_is_dropped_and_the_handshake_completes() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 31, 0.0);
    net.add_client(pki.client_config(0));
    let flight4 = admit(&mut net, 0);
    let malformed = net.server.metrics().records_malformed;
    // offset + fragment_length > length (tinydtls#73), and a fragment_length longer than the
    // bytes present.
    for frag in [
        raw_fragment(hs::CERTIFICATE, 100, 2, 90, &[0; 20]),
        raw_fragment(hs::CERTIFICATE, 100, 2, 0xFF_FFFF, &[0; 1]),
        raw_fragment_len(hs::CERTIFICATE, 100, 2, 0, 100, &[0; 10]),
    ] {
        net.inject(client_addr(0), &plain_record(ct::HANDSHAKE, 2, &frag));
    }
    assert!(net.take_server_transmits().is_empty(), "silent drop");
    assert_eq!(net.server.metrics().records_malformed, malformed + 3);
    assert_eq!(net.server.gauges().half_open, 1);
    deliver_to_client(&mut net, 0, &flight4);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    assert_eq!(net.server.metrics().refused_total(), 0);
}

// ---------------------------------------------------------------------------------------------
// Cookies
// ---------------------------------------------------------------------------------------------

#[test]
fn a_tampered_or_transplanted_cookie_gets_a_new_hello_verify_request() {
    // (A cookie replayed from another address is in engine.rs.)
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 32, 0.0);
    net.add_client(pki.client_config(0));
    let from = client_addr(0);
    let ch1 = net.clients[0].poll_transmit().unwrap();
    net.inject(from, &ch1);
    let hvr = net.take_server_transmits().remove(0);
    let now = net.now;
    net.clients[0].handle_datagram(now, addr(SERVER), &hvr.payload);
    let ch2 = net.clients[0].poll_transmit().unwrap();
    type Mutation = Box<dyn Fn(&mut ClientHello)>;
    let variants: Vec<(&str, Mutation)> = vec![
        ("cookie bit flipped", Box::new(|ch| ch.cookie[5] ^= 1)),
        (
            "cookie truncated",
            Box::new(|ch| ch.cookie.truncate(ch.cookie.len() - 4)),
        ),
        (
            "another random",
            Box::new(|ch: &mut ClientHello| ch.random[0] ^= 1),
        ),
        (
            "another suite list",
            Box::new(|ch: &mut ClientHello| ch.cipher_suites.reverse()),
        ),
    ];
    for (k, (what, f)) in variants.iter().enumerate() {
        let d = rewrite_plain_handshakes(&ch2, |t, body| {
            assert_eq!(t, hs::CLIENT_HELLO);
            let mut ch = ClientHello::parse(body).unwrap();
            f(&mut ch);
            *body = ch.encode();
        });
        net.inject(from, &d);
        let out = net.take_server_transmits();
        assert_eq!(out.len(), 1, "{what}");
        assert_eq!(out[0].payload[13], hs::HELLO_VERIFY_REQUEST, "{what}");
        assert_eq!(
            net.server.metrics().refused(RefusalReason::BadCookie),
            k as u64 + 1
        );
        assert_eq!(net.server.gauges().half_open, 0, "{what}");
    }
    // The genuine one is admitted and the handshake completes.
    net.inject(from, &ch2);
    let flight4 = net.take_server_transmits();
    deliver_to_client(&mut net, 0, &flight4);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
}

// ---------------------------------------------------------------------------------------------
// Renegotiation
// ---------------------------------------------------------------------------------------------

#[test]
fn a_renegotiating_client_hello_gets_a_warning_and_the_session_survives() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 33, 0.0);
    net.add_client(pki.client_config(0));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    let ch = ClientHello {
        client_version: DTLS_1_2,
        random: [9; 32],
        session_id: Vec::new(),
        cookie: Vec::new(),
        cipher_suites: vec![CipherSuite::Aes128Ccm8.code()],
        compression_methods: vec![0],
        extensions: vec![Extension {
            typ: ext::RENEGOTIATION_INFO,
            data: wire::opaque8_body(&[0xAA; 12]),
        }],
    };
    let msg = wire::handshake_message(hs::CLIENT_HELLO, 5, &ch.encode());
    let log_start = net.log.len();
    net.clients[0]
        .danger_send_record(ct::HANDSHAKE, &msg)
        .unwrap();
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.server.metrics().renegotiations_refused, 1);
    // One answer: a protected alert record (CCM_8 with no CID: the record type is in the
    // clear, the 2-byte alert is sealed with an 8-byte explicit nonce and an 8-byte tag).
    let answers: Vec<_> = net.log[log_start..]
        .iter()
        .filter(|(to_server, _, _)| !to_server)
        .map(|(_, _, d)| d.clone())
        .collect();
    assert_eq!(answers.len(), 1, "{answers:?}");
    let recs: Vec<_> = wire::Records::new(&answers[0], 0)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].content_type, ct::ALERT);
    assert_eq!(recs[0].epoch, 1);
    assert_eq!(recs[0].fragment.len(), 8 + 2 + 8);
    // A warning: the session survives on both sides.
    assert!(!net.clients[0].is_closed());
    assert_eq!(net.server.gauges().established, 1);
    assert!(server_failures(&net).is_empty());
    assert_session_works(&mut net, 0, b"after renegotiation attempt");
    // A HelloRequest-shaped message is refused the same way.
    net.clients[0]
        .danger_send_record(
            ct::HANDSHAKE,
            &wire::handshake_message(hs::HELLO_REQUEST, 6, &[]),
        )
        .unwrap();
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.server.metrics().renegotiations_refused, 2);
    assert_session_works(&mut net, 0, b"still");
}

// ---------------------------------------------------------------------------------------------
// Negotiation: EMS, suites, compression, version, ServerHello extensions
// ---------------------------------------------------------------------------------------------

#[test]
fn no_extended_master_secret_while_the_server_requires_it_gets_handshake_failure() {
    let pki = Pki::new(2);
    let mut net = Net::new(pki.server_config(), 34, 0.0);
    let mut cc = pki.client_config(0);
    cc.danger_faults.omit_ems = true;
    cc.require_extended_master_secret = false;
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(0));
    assert_eq!(
        server_alerts(&net),
        vec![(0, (alert::FATAL, alert::HANDSHAKE_FAILURE))]
    );
    assert_eq!(refused(&net, RefusalReason::NoExtendedMasterSecret), 1);
    assert_eq!(net.server.metrics().refused_total(), 1);
    assert_eq!(
        client_failure(&net, 0),
        Some(Error::PeerAlert(alert::HANDSHAKE_FAILURE))
    );
    assert_eq!(net.server.gauges().half_open, 0);
    assert_still_serves(&mut net, &pki, 1);
}

#[test]
fn without_the_ems_requirement_a_handshake_completes_without_ems() {
    let pki = Pki::new(2);
    let mut sc = pki.server_config();
    sc.require_extended_master_secret = false;
    let mut net = Net::new(sc, 35, 0.0);
    // A legacy client: no EMS offered, none required.
    let mut cc = pki.client_config(0);
    cc.danger_faults.omit_ems = true;
    cc.require_extended_master_secret = false;
    net.add_client(cc);
    // A current client against the same lenient server: EMS is still used.
    net.add_client(pki.client_config(1));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0) && net.client_connected(1));
    assert_eq!(
        server_hello_to(&net, 0).extension(ext::EXTENDED_MASTER_SECRET),
        None
    );
    assert_eq!(
        server_hello_to(&net, 1).extension(ext::EXTENDED_MASTER_SECRET),
        Some(&[][..])
    );
    // Both derived the same keys (the classic master secret for client 0).
    assert_session_works(&mut net, 0, b"legacy");
    assert_session_works(&mut net, 1, b"ems");
    assert_eq!(net.server.metrics().refused_total(), 0);
}

#[test]
fn a_client_that_requires_ems_refuses_a_server_hello_without_it() {
    let pki = Pki::new(3);
    let mut sc = pki.server_config();
    sc.require_extended_master_secret = false;
    let mut net = Net::new(sc, 36, 0.0);
    // (a) The client did not offer EMS (so the server did not echo it) but requires it.
    let mut cc = pki.client_config(0);
    cc.danger_faults.omit_ems = true;
    net.add_client(cc);
    // (b) The client offered EMS; a middlebox strips it from the ServerHello.
    net.add_client(pki.client_config(1));
    net.filter = Some(Box::new(|to_server, i, d| {
        if to_server || i != 1 {
            return vec![d];
        }
        vec![rewrite_plain_handshakes(&d, |t, body| {
            if t == hs::SERVER_HELLO {
                let mut sh = ServerHello::parse(body).unwrap();
                sh.extensions
                    .retain(|e| e.typ != ext::EXTENDED_MASTER_SECRET);
                *body = sh.encode();
            }
        })]
    }));
    net.run_for(Duration::from_secs(5));
    for i in 0..2 {
        assert!(!net.client_connected(i));
        assert_eq!(client_failure(&net, i), Some(Error::NoExtendedMasterSecret));
        assert_eq!(
            client_alerts(&net, i),
            vec![(alert::FATAL, alert::HANDSHAKE_FAILURE)]
        );
        assert_eq!(
            net.clients[i]
                .metrics()
                .refused(RefusalReason::NoExtendedMasterSecret),
            1
        );
    }
    // The server saw the clients' fatal alerts and let both handshakes go.
    assert_eq!(refused(&net, RefusalReason::PeerAlert), 2);
    assert_eq!(
        server_failures(&net),
        vec![Error::PeerAlert(alert::HANDSHAKE_FAILURE); 2]
    );
    assert_eq!(net.server.gauges().half_open, 0);
    net.filter = None;
    assert_still_serves(&mut net, &pki, 2);
}

/// Runs one client against the server and checks the server's stateless refusal.
fn refused_at_hello(
    net: &mut Net,
    i: usize,
    cc: est_dtls::ClientConfig,
    want_alert: u8,
    want_reason: RefusalReason,
) {
    let before = refused(net, want_reason);
    let idx = net.add_client(cc);
    assert_eq!(idx, i);
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(i));
    let alerts: Vec<_> = server_alerts(net)
        .into_iter()
        .filter(|(c, _)| *c == i)
        .map(|(_, a)| a)
        .collect();
    assert_eq!(alerts, vec![(alert::FATAL, want_alert)]);
    assert_eq!(refused(net, want_reason), before + 1);
    assert_eq!(
        client_failure(net, i),
        Some(Error::PeerAlert(want_alert)),
        "the client saw the alert"
    );
    assert_eq!(net.server.gauges().half_open, 0);
}

#[test]
fn no_common_suite_compression_without_null_and_dtls_1_0_are_refused() {
    let pki = Pki::new(6);
    let mut sc = pki.server_config();
    sc.cipher_suites = vec![CipherSuite::Aes256Gcm, CipherSuite::Aes128Gcm];
    sc.groups = vec![NamedGroup::Secp256r1, NamedGroup::X25519];
    let mut net = Net::new(sc, 37, 0.0);
    // No common cipher suite.
    let mut cc = pki.client_config(0);
    cc.cipher_suites = vec![CipherSuite::Aes128Ccm8];
    refused_at_hello(
        &mut net,
        0,
        cc,
        alert::HANDSHAKE_FAILURE,
        RefusalReason::NoCommonSuite,
    );
    // No common group (counted with the suites).
    let mut cc = pki.client_config(1);
    cc.groups = vec![NamedGroup::Secp384r1];
    refused_at_hello(
        &mut net,
        1,
        cc,
        alert::HANDSHAKE_FAILURE,
        RefusalReason::NoCommonSuite,
    );
    // Compression methods without null.
    let mut cc = pki.client_config(2);
    cc.danger_faults.compression_methods = Some(vec![1]);
    refused_at_hello(
        &mut net,
        2,
        cc,
        alert::ILLEGAL_PARAMETER,
        RefusalReason::Decode,
    );
    // DTLS 1.0 only.
    let mut cc = pki.client_config(3);
    cc.danger_faults.client_version = Some(wire::DTLS_1_0);
    refused_at_hello(
        &mut net,
        3,
        cc,
        alert::PROTOCOL_VERSION,
        RefusalReason::Other,
    );
    // Null among others is fine, and so is a version above 1.2 (negotiated down to 1.2).
    let mut cc = pki.client_config(4);
    cc.danger_faults.compression_methods = Some(vec![1, 0]);
    cc.danger_faults.client_version = Some([0xFE, 0xFC]); // DTLS 1.3's code point
    let i = net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(i));
    assert_eq!(server_hello_to(&net, i).server_version, DTLS_1_2);
    assert_eq!(server_hello_to(&net, i).compression_method, 0);
    assert_still_serves(&mut net, &pki, 5);
}

#[test]
fn a_server_hello_with_an_extension_not_offered_is_refused_by_the_client() {
    let pki = Pki::new(3);
    let mut net = Net::new(pki.server_config(), 38, 0.0);
    // (a) connection_id, which this client did not offer; (b) an unknown extension.
    for i in 0..2 {
        net.add_client(pki.client_config(i));
    }
    net.filter = Some(Box::new(|to_server, i, d| {
        if to_server || i > 1 {
            return vec![d];
        }
        let typ = [ext::CONNECTION_ID, 0x7A7A][i];
        vec![rewrite_plain_handshakes(&d, |t, body| {
            if t == hs::SERVER_HELLO {
                let mut sh = ServerHello::parse(body).unwrap();
                sh.extensions.push(Extension {
                    typ,
                    data: wire::opaque8_body(&[1, 2, 3, 4]),
                });
                *body = sh.encode();
            }
        })]
    }));
    net.run_for(Duration::from_secs(5));
    for i in 0..2 {
        assert!(!net.client_connected(i));
        assert!(net.clients[i].is_closed());
        // RFC 5246 §7.4.1.4: "it MUST abort the handshake with an unsupported_extension
        // fatal alert".
        assert!(
            matches!(
                client_failure(&net, i),
                Some(Error::UnsupportedExtension(_))
            ),
            "{:?}",
            client_failure(&net, i)
        );
        assert_eq!(
            client_alerts(&net, i),
            vec![(alert::FATAL, alert::UNSUPPORTED_EXTENSION)]
        );
    }
    assert_eq!(refused(&net, RefusalReason::PeerAlert), 2);
    assert_eq!(net.server.gauges().half_open, 0);
    net.filter = None;
    assert_still_serves(&mut net, &pki, 2);
}

// ---------------------------------------------------------------------------------------------
// Lost final flight
// ---------------------------------------------------------------------------------------------

#[test]
fn a_repeated_flight_5_gets_the_final_flight_again_and_the_client_completes() {
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 39, 0.0);
    net.add_client(pki.client_config(0));
    let dropped = std::rc::Rc::new(std::cell::Cell::new(0usize));
    let dr = dropped.clone();
    // The first copy of the server's flight 6 (the datagram carrying its ChangeCipherSpec) is
    // lost.
    net.filter = Some(Box::new(move |to_server, _i, d| {
        let has_ccs = wire::Records::new(&d, 0)
            .filter_map(Result::ok)
            .any(|r| r.content_type == ct::CHANGE_CIPHER_SPEC);
        if !to_server && has_ccs && dr.get() == 0 {
            dr.set(1);
            return Vec::new();
        }
        vec![d]
    }));
    net.run_for(Duration::from_millis(500));
    assert_eq!(dropped.get(), 1);
    assert_eq!(
        net.server.metrics().handshakes_completed,
        1,
        "server done after flight 5"
    );
    assert!(!net.client_connected(0), "the client lost flight 6");
    // The client's retransmission timer fires (1 s): flight 5 again; the server answers with
    // its final flight, without a timer of its own.
    net.run_for(Duration::from_secs(2));
    assert!(net.client_connected(0));
    assert_eq!(net.server.metrics().flights_resent_on_repeat, 1);
    assert_eq!(net.server.metrics().handshakes_completed, 1);
    assert_eq!(net.clients[0].metrics().flights_retransmitted, 1);
    assert_eq!(net.server.metrics().refused_total(), 0);
    // Both copies of flight 6 are ChangeCipherSpec (epoch 0) + Finished (epoch 1, sealed),
    // the second with fresh record sequence numbers.
    let copies: Vec<Vec<(u8, u16, u64)>> = net
        .log
        .iter()
        .filter(|(to_server, _, _)| !to_server)
        .map(|(_, _, d)| {
            wire::Records::new(d, 0)
                .map(|r| r.unwrap())
                .map(|r| (r.content_type, r.epoch, r.seq))
                .collect::<Vec<_>>()
        })
        .filter(|recs| recs.iter().any(|r| r.0 == ct::CHANGE_CIPHER_SPEC))
        .collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    for c in &copies {
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].0, c[0].1), (ct::CHANGE_CIPHER_SPEC, 0));
        assert_eq!((c[1].0, c[1].1), (ct::HANDSHAKE, 1));
    }
    assert!(copies[1][0].2 > copies[0][0].2 && copies[1][1].2 > copies[0][1].2);
    assert_session_works(&mut net, 0, b"after a lost flight 6");
}

// ---------------------------------------------------------------------------------------------
// Admission bookkeeping across a Connection ID address change
// ---------------------------------------------------------------------------------------------

#[test]
fn a_meter_that_restarts_after_its_session_moved_to_another_ip_is_admitted() {
    // The session is counted under the IP it was admitted from; after a NAT rebinding to
    // another IP (RFC 9146) the meter reboots there. The per-IP check for the new handshake must
    // not subtract the old session from the new IP's count (it underflowed: a panic in debug
    // builds, a refusal in release builds).
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 40, 0.0);
    let mut cc = pki.client_config(0);
    cc.connection_id = Some(Vec::new());
    net.add_client(cc.clone());
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    let first = net.handle_of_client(0).unwrap();
    let moved = addr("10.99.0.1:5000");
    net.client_addrs[0] = moved;
    let now = net.now;
    net.clients[0].send(now, b"from the new IP").unwrap();
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.server.connection(first).unwrap().peer(), moved);
    // The meter reboots behind the new address.
    let now = net.now;
    net.clients[0] = est_dtls::Client::connect(now, addr(SERVER), std::sync::Arc::new(cc)).unwrap();
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0), "the restarted meter was refused");
    assert!(
        net.server.connection(first).is_none(),
        "old session replaced"
    );
    assert_eq!(net.server.metrics().sessions_replaced, 1);
    assert_eq!(net.server.gauges().established, 1);
    assert_eq!(net.server.gauges().half_open, 0);
    assert_session_works(&mut net, 0, b"after the restart");
}

#[test]
fn a_finished_from_a_new_address_moves_the_handshake_without_an_address_event() {
    // NAT rebinding between the client's flight 5 records: the handshake messages come from
    // the old address, the Finished (a tls12_cid record) from a new one. The authenticated
    // Finished moves the connection (flight 6 goes to the new address), but the driver hears
    // of the connection first through Connected, with its address then: no AddressChanged for
    // a handle it has never seen (the fuzz target dtls_endpoint found one).
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 41, 0.0);
    let mut cc = pki.client_config(0);
    cc.connection_id = Some(Vec::new());
    net.add_client(cc);
    let flight4 = admit(&mut net, 0);
    deliver_to_client(&mut net, 0, &flight4);
    let flight5 = net.clients[0].poll_transmit().unwrap();
    assert!(
        net.clients[0].poll_transmit().is_none(),
        "flight 5 in one datagram"
    );
    let (mut plain, mut protected) = (Vec::new(), Vec::new());
    for rec in wire::Records::new(&flight5, 4) {
        let rec = rec.unwrap();
        let out = if rec.content_type == ct::TLS12_CID {
            &mut protected
        } else {
            &mut plain
        };
        rec.push_with(out, rec.fragment);
    }
    assert!(!protected.is_empty(), "the Finished travels as tls12_cid");
    net.inject(client_addr(0), &plain);
    assert!(net.take_server_transmits().is_empty());
    let moved = addr("10.77.0.1:6000");
    net.inject(moved, &protected);
    let flight6 = net.take_server_transmits();
    assert!(!flight6.is_empty());
    assert!(flight6.iter().all(|t| t.destination == moved));
    let connected: Vec<_> = net
        .server_events
        .iter()
        .filter(|e| !matches!(e, Event::Data(..)))
        .collect();
    assert!(
        matches!(connected.as_slice(), [Event::Connected(_)]),
        "{connected:?}"
    );
    let Event::Connected(h) = connected[0] else {
        unreachable!()
    };
    assert_eq!(net.server.connection(*h).unwrap().peer(), moved);
    net.client_addrs[0] = moved;
    deliver_to_client(&mut net, 0, &flight6);
    assert!(net.client_connected(0));
    assert_session_works(&mut net, 0, b"after moving mid-handshake");
    assert_eq!(net.server.gauges().half_open, 0);
    assert_eq!(net.server.gauges().established, 1);
}

// ---------------------------------------------------------------------------------------------
// Cached information (RFC 7924)
// ---------------------------------------------------------------------------------------------

/// Bytes the server sent to client `i`.
fn bytes_to_client(net: &Net, i: usize) -> usize {
    net.log
        .iter()
        .filter(|(to_server, c, _)| !to_server && *c == i)
        .map(|(_, _, d)| d.len())
        .sum()
}

/// The Certificate message body the server sent to client `i`.
fn certificate_to(net: &Net, i: usize) -> Vec<u8> {
    net.log
        .iter()
        .filter(|(to_server, c, _)| !to_server && *c == i)
        .flat_map(|(_, _, d)| plain_handshakes(d))
        .find(|(t, _, _)| *t == hs::CERTIFICATE)
        .map(|(_, _, b)| b)
        .expect("no Certificate sent")
}

fn fingerprint_of(chain: &[Vec<u8>]) -> [u8; 32] {
    est_dtls::crypto::certificate_fingerprint(
        &wire::CertificateMsg {
            certificates: chain.to_vec(),
        }
        .encode(),
    )
}

#[test]
fn a_client_holding_the_server_certificate_gets_its_fingerprint_instead() {
    let pki = Pki::new(2);
    let mut net = Net::new(pki.server_config(), 51, 0.0);
    // Client 0 holds the server's chain (and an older one); client 1 holds nothing.
    let mut cc = pki.client_config(0);
    let old = pki.extra_client("old-server").chain;
    cc.cached_server_chains = vec![old, pki.server.chain.clone()];
    net.add_client(cc);
    net.add_client(pki.client_config(1));
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0) && net.client_connected(1));
    assert_eq!(net.server.metrics().cached_info_hits, 1);
    // RFC 7924 §4.1: the ServerHello says 'cert', the Certificate message is the fingerprint.
    let sh = server_hello_to(&net, 0);
    assert_eq!(sh.extension(ext::CACHED_INFO), Some(&[0u8, 1, 1][..]));
    let fp = fingerprint_of(&pki.server.chain);
    assert_eq!(certificate_to(&net, 0), wire::opaque8_body(&fp));
    assert_eq!(server_hello_to(&net, 1).extension(ext::CACHED_INFO), None);
    // The client validated and holds the chain it had cached.
    assert_eq!(
        net.clients[0].connection().peer_certificates(),
        pki.server.chain.as_slice()
    );
    // The server's flights shrank by the chain, less the 33-byte fingerprint and the 7-byte
    // extension (give or take the 1-2 bytes by which two DER ECDSA signatures can differ).
    let chain_len: usize = pki.server.chain.iter().map(|c| c.len() + 3).sum::<usize>() + 3;
    let saved = bytes_to_client(&net, 1) - bytes_to_client(&net, 0);
    assert!(
        saved.abs_diff(chain_len - 33 - 7) <= 2,
        "saved {saved} of {chain_len}"
    );
    assert_session_works(&mut net, 0, b"cached");
}

#[test]
fn a_stale_fingerprint_or_a_server_without_cached_info_sends_the_full_certificate() {
    let pki = Pki::new(2);
    let mut net = Net::new(pki.server_config(), 52, 0.0);
    let mut cc = pki.client_config(0);
    cc.cached_server_chains = vec![pki.extra_client("retired-server").chain];
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    assert_eq!(net.server.metrics().cached_info_hits, 0);
    assert_eq!(server_hello_to(&net, 0).extension(ext::CACHED_INFO), None);
    let full = wire::CertificateMsg {
        certificates: pki.server.chain.clone(),
    }
    .encode();
    assert_eq!(certificate_to(&net, 0), full);
    assert_eq!(
        net.clients[0].connection().peer_certificates(),
        pki.server.chain.as_slice()
    );

    // A server with cached_info off ignores a current fingerprint.
    let mut sc = pki.server_config();
    sc.cached_info = false;
    let mut net = Net::new(sc, 53, 0.0);
    let mut cc = pki.client_config(1);
    cc.cached_server_chains = vec![pki.server.chain.clone()];
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    assert_eq!(net.server.metrics().cached_info_hits, 0);
    assert_eq!(certificate_to(&net, 0), full);
}

#[test]
fn a_malformed_cached_info_extension_gets_decode_error() {
    let bad: [&[u8]; 4] = [
        &[0, 0],             // an empty list
        &[0, 2, 1, 0],       // an empty hash_value
        &[0, 4, 1, 32, 1],   // a hash_value cut short
        &[0, 3, 1, 1, 7, 9], // trailing bytes
    ];
    let pki = Pki::new(bad.len() + 1);
    let mut net = Net::new(pki.server_config(), 54, 0.0);
    for (i, body) in bad.iter().enumerate() {
        let mut cc = pki.client_config(i);
        cc.cached_server_chains = vec![pki.server.chain.clone()];
        net.add_client(cc);
        let body = body.to_vec();
        // The ClientHello with the cookie carries the broken extension (extensions are not
        // bound to the cookie).
        net.filter = Some(Box::new(move |to_server, c, d| {
            if !to_server || c != i {
                return vec![d];
            }
            vec![rewrite_plain_handshakes(&d, |t, b| {
                if t == hs::CLIENT_HELLO {
                    let mut ch = ClientHello::parse(b).unwrap();
                    if ch.cookie.is_empty() {
                        return;
                    }
                    for e in &mut ch.extensions {
                        if e.typ == ext::CACHED_INFO {
                            e.data = body.clone();
                        }
                    }
                    *b = ch.encode();
                }
            })]
        }));
        let before = refused(&net, RefusalReason::Decode);
        net.run_for(Duration::from_secs(5));
        assert!(!net.client_connected(i), "{i}");
        let alerts: Vec<_> = server_alerts(&net)
            .into_iter()
            .filter(|(c, _)| *c == i)
            .map(|(_, a)| a)
            .collect();
        assert_eq!(alerts, vec![(alert::FATAL, alert::DECODE_ERROR)], "{i}");
        assert_eq!(refused(&net, RefusalReason::Decode), before + 1);
        assert_eq!(
            client_failure(&net, i),
            Some(Error::PeerAlert(alert::DECODE_ERROR))
        );
    }
    net.filter = None;
    assert_eq!(net.server.gauges().half_open, 0);
    assert_still_serves(&mut net, &pki, bad.len());
}

#[test]
fn a_fingerprint_the_client_does_not_hold_or_a_type_it_did_not_offer_is_refused() {
    let pki = Pki::new(4);
    let mut net = Net::new(pki.server_config(), 55, 0.0);
    for i in 0..3 {
        let mut cc = pki.client_config(i);
        cc.cached_server_chains = vec![pki.server.chain.clone()];
        net.add_client(cc);
    }
    // (0) the Certificate names another fingerprint; (1) the ServerHello says cert_req, which
    // the client did not offer; (2) a client that offered nothing gets cached_info: below.
    net.filter = Some(Box::new(|to_server, i, d| {
        if to_server || i > 1 {
            return vec![d];
        }
        vec![rewrite_plain_handshakes(&d, |t, body| match (i, t) {
            (0, hs::CERTIFICATE) => body[5] ^= 0x01,
            (1, hs::SERVER_HELLO) => {
                let mut sh = ServerHello::parse(body).unwrap();
                for e in &mut sh.extensions {
                    if e.typ == ext::CACHED_INFO {
                        e.data = wire::cached_info_server_body(&[
                            wire::cached_info_type::CERT,
                            wire::cached_info_type::CERT_REQ,
                        ]);
                    }
                }
                *body = sh.encode();
            }
            _ => {}
        })]
    }));
    net.run_for(Duration::from_secs(5));
    for i in 0..2 {
        assert!(!net.client_connected(i));
        assert!(
            matches!(client_failure(&net, i), Some(Error::IllegalParameter(_))),
            "{i}: {:?}",
            client_failure(&net, i)
        );
        assert_eq!(
            client_alerts(&net, i),
            vec![(alert::FATAL, alert::ILLEGAL_PARAMETER)]
        );
    }
    assert!(net.client_connected(2));
    // A ServerHello with cached_info to a client that offered none.
    net.add_client(pki.client_config(3));
    net.filter = Some(Box::new(|to_server, i, d| {
        if to_server || i != 3 {
            return vec![d];
        }
        vec![rewrite_plain_handshakes(&d, |t, body| {
            if t == hs::SERVER_HELLO {
                let mut sh = ServerHello::parse(body).unwrap();
                sh.extensions.push(Extension {
                    typ: ext::CACHED_INFO,
                    data: wire::cached_info_server_body(&[wire::cached_info_type::CERT]),
                });
                *body = sh.encode();
            }
        })]
    }));
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(3));
    assert_eq!(
        client_failure(&net, 3),
        Some(Error::UnsupportedExtension(ext::CACHED_INFO))
    );
    assert_eq!(net.server.gauges().half_open, 0);
}

// ---------------------------------------------------------------------------------------------
// Certificate types (RFC 7250): C509
// ---------------------------------------------------------------------------------------------

/// A stand-in for the C509 re-encoding (the real one, from cbor-schemas, is exercised by
/// est-server's and client-sim's tests): a marker byte in front of the DER.
fn toy_codec() -> est_dtls::C509Codec {
    const MARK: u8 = 0xC5;
    est_dtls::C509Codec {
        type_code: wire::certificate_type::C509_PRIVATE_USE_DEFAULT,
        to_der: std::sync::Arc::new(|c: &[u8]| match c.split_first() {
            Some((&MARK, der)) => Ok(der.to_vec()),
            _ => Err("not a toy C509 certificate".into()),
        }),
        from_der: std::sync::Arc::new(|d: &[u8]| Ok([&[MARK][..], d].concat())),
    }
}

/// The certificates of the Certificate message client `i` sent (`to_server`) or received.
fn certificates_seen(net: &Net, i: usize, to_server: bool) -> Vec<Vec<u8>> {
    net.log
        .iter()
        .filter(|(t, c, _)| *t == to_server && *c == i)
        .flat_map(|(_, _, d)| plain_handshakes(d))
        .find(|(t, _, _)| *t == hs::CERTIFICATE)
        .map(|(_, _, b)| wire::CertificateMsg::parse(&b, 8).unwrap().certificates)
        .expect("no Certificate")
}

#[test]
fn c509_certificates_are_negotiated_both_ways_and_verified_as_der() {
    let c509 = wire::certificate_type::C509_PRIVATE_USE_DEFAULT;
    let pki = Pki::new(3);
    let mut sc = pki.server_config();
    sc.c509 = Some(toy_codec());
    let mut net = Net::new(sc, 56, 0.0);
    // (0) offers C509; (1) offers nothing; (2) offers C509 and holds the server chain.
    let mut cc = pki.client_config(0);
    cc.c509 = Some(toy_codec());
    net.add_client(cc);
    net.add_client(pki.client_config(1));
    let mut cc = pki.client_config(2);
    cc.c509 = Some(toy_codec());
    cc.lean_hello = true;
    cc.cached_server_chains = vec![pki.server.chain.clone()];
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    for i in 0..3 {
        assert!(net.client_connected(i), "{i}");
    }
    let sh = server_hello_to(&net, 0);
    assert_eq!(
        sh.extension(ext::CLIENT_CERTIFICATE_TYPE),
        Some(&[c509][..])
    );
    assert_eq!(
        sh.extension(ext::SERVER_CERTIFICATE_TYPE),
        Some(&[c509][..])
    );
    // On the wire: C509 entries; to the verifiers and the application: the DER.
    assert!(certificates_seen(&net, 0, true)
        .iter()
        .all(|c| c[0] == 0xC5));
    assert!(certificates_seen(&net, 0, false)
        .iter()
        .all(|c| c[0] == 0xC5));
    let h = net.handle_of_client(0).unwrap();
    assert_eq!(
        net.server.connection(h).unwrap().peer_certificates(),
        pki.clients[0].chain.as_slice()
    );
    assert_eq!(
        net.clients[0].connection().peer_certificates(),
        pki.server.chain.as_slice()
    );
    // No offer, no extension, X.509.
    let sh = server_hello_to(&net, 1);
    assert_eq!(sh.extension(ext::CLIENT_CERTIFICATE_TYPE), None);
    assert_eq!(certificates_seen(&net, 1, true), pki.clients[1].chain);
    // cached_info names the C509 form of the chain the client holds.
    assert_eq!(net.server.metrics().cached_info_hits, 1);
    assert_eq!(
        server_hello_to(&net, 2).extension(ext::CLIENT_CERTIFICATE_TYPE),
        Some(&[c509][..])
    );
    assert_session_works(&mut net, 2, b"c509 both ways");

    // A server without C509 answers X.509 to a client that offers both.
    let mut net = Net::new(pki.server_config(), 57, 0.0);
    let mut cc = pki.client_config(0);
    cc.c509 = Some(toy_codec());
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(net.client_connected(0));
    let sh = server_hello_to(&net, 0);
    assert_eq!(sh.extension(ext::CLIENT_CERTIFICATE_TYPE), Some(&[0u8][..]));
    assert_eq!(sh.extension(ext::SERVER_CERTIFICATE_TYPE), Some(&[0u8][..]));
    assert_eq!(certificates_seen(&net, 0, true), pki.clients[0].chain);
    assert_eq!(certificates_seen(&net, 0, false), pki.server.chain);
}

#[test]
fn no_common_certificate_type_a_type_not_offered_or_a_c509_that_does_not_convert_is_refused() {
    let pki = Pki::new(4);
    let c509 = wire::certificate_type::C509_PRIVATE_USE_DEFAULT;
    // (0) offers C509 only to a server without C509: unsupported_certificate.
    let mut net = Net::new(pki.server_config(), 58, 0.0);
    let mut cc = pki.client_config(0);
    cc.c509 = Some(toy_codec());
    net.add_client(cc);
    net.filter = Some(Box::new(move |to_server, _, d| {
        if !to_server {
            return vec![d];
        }
        vec![rewrite_plain_handshakes(&d, |t, b| {
            if t == hs::CLIENT_HELLO {
                let mut ch = ClientHello::parse(b).unwrap();
                for e in &mut ch.extensions {
                    if e.typ == ext::CLIENT_CERTIFICATE_TYPE {
                        e.data = wire::certificate_types_body(&[c509]);
                    }
                }
                *b = ch.encode();
            }
        })]
    }));
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(0));
    let alerts: Vec<_> = server_alerts(&net).into_iter().map(|(_, a)| a).collect();
    assert_eq!(alerts, vec![(alert::FATAL, alert::UNSUPPORTED_CERTIFICATE)]);
    assert_eq!(refused(&net, RefusalReason::BadCertificate), 1);

    // (1) the ServerHello names a type the client did not offer: illegal_parameter.
    let mut sc = pki.server_config();
    sc.c509 = Some(toy_codec());
    let mut net = Net::new(sc, 59, 0.0);
    let mut cc = pki.client_config(1);
    cc.c509 = Some(toy_codec());
    net.add_client(cc);
    net.filter = Some(Box::new(|to_server, _, d| {
        if to_server {
            return vec![d];
        }
        vec![rewrite_plain_handshakes(&d, |t, b| {
            if t == hs::SERVER_HELLO {
                let mut sh = ServerHello::parse(b).unwrap();
                for e in &mut sh.extensions {
                    if e.typ == ext::SERVER_CERTIFICATE_TYPE {
                        e.data = vec![wire::certificate_type::RAW_PUBLIC_KEY];
                    }
                }
                *b = sh.encode();
            }
        })]
    }));
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(0));
    assert!(
        matches!(client_failure(&net, 0), Some(Error::IllegalParameter(_))),
        "{:?}",
        client_failure(&net, 0)
    );

    // (2) a client whose C509 certificate does not convert back to DER: bad_certificate.
    let mut sc = pki.server_config();
    sc.c509 = Some(toy_codec());
    let mut net = Net::new(sc, 60, 0.0);
    let mut cc = pki.client_config(2);
    let mut broken = toy_codec();
    broken.from_der = std::sync::Arc::new(|d: &[u8]| Ok([&[0x00][..], d].concat()));
    cc.c509 = Some(broken);
    net.add_client(cc);
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(0));
    let alerts: Vec<_> = server_alerts(&net).into_iter().map(|(_, a)| a).collect();
    assert_eq!(alerts, vec![(alert::FATAL, alert::BAD_CERTIFICATE)]);
    assert_eq!(net.server.gauges().half_open, 0);
    assert_still_serves(&mut net, &pki, 3);
}

/// A client certificate whose keyUsage does not allow digitalSignature cannot sign the
/// handshake (RFC 5246 §7.4.8, RFC 5280 §4.2.1.3): bad_certificate, before its
/// CertificateVerify is looked at; one with digitalSignature, or without keyUsage, is admitted.
#[test]
fn a_client_certificate_without_digital_signature_in_its_key_usage_is_refused() {
    use rcgen::KeyUsagePurpose as K;
    let pki = Pki::new(1);
    let mut net = Net::new(pki.server_config(), 71, 0.0);
    let agreement_only = pki.client_with_key_usages("ka-only", vec![K::KeyAgreement]);
    net.add_client(pki.config_for(&agreement_only));
    net.run_for(Duration::from_secs(5));
    assert!(!net.client_connected(0));
    let alerts: Vec<_> = server_alerts(&net).into_iter().map(|(_, a)| a).collect();
    assert_eq!(alerts, vec![(alert::FATAL, alert::BAD_CERTIFICATE)]);
    assert!(
        matches!(server_failures(&net).as_slice(), [Error::BadCertificate(m)] if m.contains("digitalSignature")),
        "{:?}",
        server_failures(&net)
    );
    assert_eq!(refused(&net, RefusalReason::BadCertificate), 1);
    assert_eq!(net.server.gauges().half_open, 0);

    for (i, usages) in [
        vec![K::DigitalSignature, K::KeyAgreement],
        vec![K::DigitalSignature],
        Vec::new(),
    ]
    .into_iter()
    .enumerate()
    {
        let cred = pki.client_with_key_usages(&format!("ok-{i}"), usages);
        let c = net.add_client(pki.config_for(&cred));
        net.run_for(Duration::from_secs(5));
        assert!(net.client_connected(c), "client {i}");
    }
}
