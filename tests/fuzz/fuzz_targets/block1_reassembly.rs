//! Fuzz target: structured sequences of Block1 requests against one server session.
//!
//! Each 5-byte step encodes one CON POST carrying Block1:
//!   byte 0: NUM (0..=63)
//!   byte 1: flags — bit0 M, bit1 reuse the previous Message ID (retransmission),
//!           bit2 switch Content-Format, bit3 switch target path, bit4 add Size1,
//!           bit5 payload exactly one block (else length from bytes 3-4)
//!   byte 2: SZX (0..=7; 7 is reserved and must give 4.00)
//!   bytes 3-4: payload length (mod 1100)
//! Invariants: no panic; reassembly never exceeds the cap; a reassembled body handed to
//! the application equals the in-order concatenation the reference model predicts.
#![no_main]

use std::sync::Arc;
use std::time::Instant;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use est_proto::coap::{BlockOpt, CoapConfig, Response, ServerSession};
use libfuzzer_sys::fuzz_target;

const MAX_BODY: usize = 1500;

fn payload(step: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i + step * 31) as u8).collect()
}

fuzz_target!(|data: &[u8]| {
    let config = CoapConfig {
        max_request_body_bytes: MAX_BODY,
        ..CoapConfig::default()
    };
    let mut session = ServerSession::new(Arc::new(config));
    let now = Instant::now();
    let mut mid: u16 = 0;
    let mut cf: u16 = 286;
    let mut path = "sen";
    // Reference model of the reassembly the server should hold: (path, cf, body).
    let mut model: Option<(&str, u16, Vec<u8>)> = None;
    for (step, chunk) in data.chunks_exact(5).enumerate() {
        let [num, flags, szx, l0, l1] = [chunk[0], chunk[1], chunk[2], chunk[3], chunk[4]];
        let num = u32::from(num % 64);
        let more = flags & 1 != 0;
        let retransmit = flags & 2 != 0 && step > 0;
        if flags & 4 != 0 {
            cf = if cf == 286 { 60 } else { 286 };
        }
        if flags & 8 != 0 {
            path = if path == "sen" { "sren" } else { "sen" };
        }
        let szx = szx % 8;
        let size = 16usize << szx.min(6);
        let len = if flags & 32 != 0 { size } else { usize::from(u16::from_be_bytes([l0, l1])) % 1100 };
        if !retransmit {
            mid = mid.wrapping_add(1);
        }
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = mid;
        p.set_token(vec![1, 2]);
        p.add_option(CoapOption::UriPath, b"est".to_vec());
        p.add_option(CoapOption::UriPath, path.as_bytes().to_vec());
        p.add_option(CoapOption::ContentFormat, cf.to_be_bytes().to_vec());
        p.add_option(CoapOption::Block1, BlockOpt::new(num, more, szx).encode());
        if flags & 16 != 0 {
            p.add_option(CoapOption::Size1, 4000u32.to_be_bytes().to_vec());
        }
        p.payload = payload(step, len);
        let Ok(bytes) = p.to_bytes_unlimited() else { continue };

        // Predict (only for fresh Message IDs; a retransmission is answered from the cache).
        let offset = u64::from(num) * size as u64;
        let mut expected_body = None;
        let mut expect_continue = false;
        if !retransmit && szx != 7 {
            // (SZX 7 is answered 4.00 before any Block1 processing and leaves the state alone.)
            let valid_shape = flags & 16 == 0 && (if more { len == size } else { len <= size });
            if !valid_shape {
                model = None;
            } else {
                if num == 0 {
                    model = Some((path, cf, Vec::new()));
                }
                match model.as_mut() {
                    Some((mp, mcf, body))
                        if *mp == path && *mcf == cf && offset == body.len() as u64 && body.len() + len <= MAX_BODY =>
                    {
                        body.extend_from_slice(&p.payload);
                        if more {
                            expect_continue = true;
                        } else {
                            expected_body = model.take().map(|m| m.2);
                        }
                    }
                    _ => model = None,
                }
            }
        }

        let request = session.handle_datagram(now, &bytes);
        let answer = session.poll_transmit();
        assert!(session.poll_transmit().is_none(), "one answer per datagram at most");
        match (request, answer) {
            (Some(_), Some(_)) => panic!("a request and an answer from one datagram"),
            (Some((id, request)), None) => {
                assert!(!retransmit, "a retransmission must not reach the application");
                assert_eq!(Some(&request.payload), expected_body.as_ref(), "reassembled body differs from the model");
                session.respond(now, id, Response::new(ResponseType::Changed));
                let _ = session.poll_transmit();
            }
            (None, Some(answer)) => {
                let answer = Packet::from_bytes(&answer).expect("valid answer");
                if !retransmit {
                    assert!(expected_body.is_none(), "a complete body was not delivered");
                    let is_continue = answer.header.code == MessageClass::Response(ResponseType::Continue);
                    assert_eq!(is_continue, expect_continue, "2.31 exactly while a transfer continues");
                }
            }
            (None, None) => assert!(retransmit, "a fresh CON must be answered"),
        }
        let held = session.stats().reassembly_bytes;
        assert!(held <= MAX_BODY);
        if !retransmit {
            assert_eq!(held, model.as_ref().map_or(0, |m| m.2.len()), "held bytes differ from the model");
        }
    }
});
