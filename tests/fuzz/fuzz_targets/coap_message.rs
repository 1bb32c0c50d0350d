//! Fuzz target: a CoAP server session fed arbitrary datagrams.
//!
//! Input format: a sequence of `[len: u8][advance_ms: u8][datagram: len bytes]` records.
//! Invariants: no panic; every datagram the session emits (answers, separate responses and
//! their retransmissions) is a valid CoAP message;
//! Block1 reassembly, the dedup cache and the pending set stay within their limits.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use est_proto::coap::{CoapConfig, Incoming, Response, ResponseType, ServerSession};
use libfuzzer_sys::fuzz_target;

const MAX_BODY: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let config = CoapConfig {
        max_request_body_bytes: MAX_BODY,
        ..CoapConfig::default()
    };
    let max_dedup = config.max_dedup_entries;
    let max_pending = config.max_pending_requests;
    let mut session = ServerSession::new(Arc::new(config));
    let t0 = Instant::now();
    let mut now = t0;
    let mut rest = data;
    let mut answer_next = true;
    let mut requests = 0u32;
    while let [len, advance, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (datagram, next) = tail.split_at(len);
        rest = next;
        // Up to ~255 s per step so expiry (EXCHANGE_LIFETIME 247 s) is exercised.
        now += Duration::from_secs(u64::from(*advance));
        match session.handle_datagram(now, datagram) {
            Incoming::Send(bytes) => {
                assert!(coap_lite::Packet::from_bytes(&bytes).is_ok(), "emitted an invalid datagram");
            }
            Incoming::Request(id, request) => {
                assert!(request.payload.len() <= MAX_BODY);
                requests += 1;
                // Every third request takes the separate-response path (empty ACK first).
                if requests % 3 == 0 {
                    if let Some(ack) = session.acknowledge(now, id) {
                        assert_eq!(ack.len(), 4);
                    }
                }
                // Answer every other request (with a body that needs Block2), leave the rest
                // pending so the pending bound is exercised too.
                if answer_next {
                    let body = vec![0x5A; 3000];
                    for bytes in session.respond(now, id, Response::new(ResponseType::Content).with_payload(0, body)) {
                        assert!(coap_lite::Packet::from_bytes(&bytes).is_ok());
                    }
                }
                answer_next = !answer_next;
            }
            Incoming::Ignore => {}
        }
        if let Some(deadline) = session.poll_timeout() {
            if deadline <= now {
                session.handle_timeout(now);
            }
        }
        while let Some(bytes) = session.poll_transmit() {
            assert!(coap_lite::Packet::from_bytes(&bytes).is_ok());
        }
        let stats = session.stats();
        assert!(stats.reassembly_bytes <= MAX_BODY);
        assert!(stats.dedup_entries <= max_dedup);
        assert!(stats.pending_requests <= max_pending);
    }
});
