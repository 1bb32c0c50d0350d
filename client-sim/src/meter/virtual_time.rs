//! The meter, the real sans-IO CoAP client and server session, and the link emulator, all on
//! virtual time: a whole enrollment over a lossy narrowband link, deterministic per seed. DTLS is
//! not modelled here (a session "connects" after a fixed delay).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use crate::link::{LinkDirection, LinkParams, Verdict};
use crate::testutil::FakeEst;
use est_proto::coap::{Client, ClientConfig, ClientEvent, CoapConfig, ServerSession};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Reverse<Instant>,
    seq: u64,
    to_server: bool,
    session: u64,
    data: Vec<u8>,
}

struct Run {
    enrolled: bool,
    end: Duration,
    retransmissions: u64,
    frames: u64,
    lost: u64,
}

fn run(seed: u64, link: &str, szx: u8) -> Run {
    let mut est = FakeEst::new(seed);
    let dev = est.device("SN200001");
    let cfg = MeterConfig {
        max_attempts: 8,
        retry_backoff: Duration::from_secs(5),
        ..MeterConfig::default()
    };
    let mut m = Meter::new(cfg, &dev, seed).unwrap();
    let params: LinkParams = link.parse().unwrap();
    let mut up = LinkDirection::new(params.clone(), seed ^ 1);
    let mut down = LinkDirection::new(params, seed ^ 2);
    let coap_cfg = ClientConfig {
        block1_szx: szx,
        block2_szx: Some(szx),
        ..ClientConfig::default()
    };
    let t0 = Instant::now();
    let mut now = t0;
    let mut heap: BinaryHeap<InFlight> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut session = 0u64;
    let mut client: Option<Client> = None;
    let mut server: Option<ServerSession> = None;
    let mut connect_at: Option<Instant> = None;
    let mut retransmissions = 0;
    m.start(now);
    for _ in 0..200_000 {
        while let Some(a) = m.poll_action() {
            match a {
                Action::Connect { .. } => {
                    session += 1;
                    // A full DTLS handshake on this link takes a few round trips.
                    connect_at = Some(now + Duration::from_secs(3));
                }
                Action::Send(r) => client.as_mut().unwrap().start(now, r).unwrap(),
                Action::Disconnect => {
                    if let Some(c) = client.take() {
                        retransmissions += c.stats().retransmissions;
                    }
                    server = None;
                }
            }
        }
        if m.is_done() {
            break;
        }
        if let Some(c) = client.as_mut() {
            while let Some(d) = c.poll_transmit() {
                if let Verdict::Deliver { at } = up.submit(now, d.len()) {
                    seq += 1;
                    heap.push(InFlight {
                        at: Reverse(at),
                        seq,
                        to_server: true,
                        session,
                        data: d,
                    });
                }
            }
            let mut any = false;
            while let Some(ev) = c.poll_event() {
                any = true;
                match ev {
                    ClientEvent::Response(r) => m.handle_response(now, r),
                    ClientEvent::Failed(e) => m.handle_request_failed(now, e),
                }
            }
            if any {
                continue;
            }
        }
        // Advance virtual time to the next event.
        let next = [
            heap.peek().map(|f| f.at.0),
            client.as_ref().and_then(Client::poll_timeout),
            m.poll_timeout(),
            connect_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("something to wait for");
        now = now.max(next);
        if connect_at.is_some_and(|t| t <= now) {
            connect_at = None;
            client = Some(Client::new(coap_cfg.clone(), seed ^ session));
            server = Some(ServerSession::new(Arc::new(CoapConfig::default())));
            m.handle_connected(now);
            continue;
        }
        while heap.peek().is_some_and(|f| f.at.0 <= now) {
            let f = heap.pop().unwrap();
            if f.session != session {
                continue;
            }
            if f.to_server {
                let Some(s) = server.as_mut() else { continue };
                if let Some((id, req)) = s.handle_datagram(now, &f.data) {
                    let resp = est.handle(&req);
                    s.respond(now, id, resp);
                }
                while let Some(d) = s.poll_transmit() {
                    if let Verdict::Deliver { at } = down.submit(now, d.len()) {
                        seq += 1;
                        heap.push(InFlight {
                            at: Reverse(at),
                            seq,
                            to_server: false,
                            session,
                            data: d,
                        });
                    }
                }
            } else if let Some(c) = client.as_mut() {
                c.handle_datagram(now, &f.data);
            }
        }
        if let Some(c) = client.as_mut() {
            c.handle_timeout(now);
        }
        m.handle_timeout(now);
    }
    let ldevid_issued = m
        .ldevid()
        .is_some_and(|l| est.issued.iter().any(|i| i == l));
    Run {
        enrolled: matches!(m.state(), MeterState::Enrolled) && ldevid_issued,
        end: now - t0,
        retransmissions,
        frames: up.counters().frames + down.counters().frames,
        lost: up.counters().lost + down.counters().lost,
    }
}

#[test]
fn enrolls_over_20_percent_loss_with_64_byte_blocks_deterministically() {
    let mut total_retx = 0;
    let mut total_lost = 0;
    for seed in 0..12 {
        let r = run(seed, "loss=0.2,latency=300ms,jitter=100ms,rate=50kbps", 2);
        assert!(r.enrolled, "seed {seed} did not enroll");
        total_retx += r.retransmissions;
        total_lost += r.lost;
        // Enrollment takes seconds to minutes of virtual time, not hours.
        assert!(r.end < Duration::from_secs(900), "seed {seed}: {:?}", r.end);
        assert!(r.frames > 40, "seed {seed}: {} frames", r.frames);
    }
    assert!(
        total_lost > 0 && total_retx > 0,
        "loss must have caused retransmissions"
    );
}

#[test]
fn same_seed_same_run() {
    let a = run(
        5,
        "ge=0.05/0.3/0.8,latency=200ms,jitter=50ms,rate=20kbps",
        4,
    );
    let b = run(
        5,
        "ge=0.05/0.3/0.8,latency=200ms,jitter=50ms,rate=20kbps",
        4,
    );
    assert!(a.enrolled && b.enrolled);
    assert_eq!(a.frames, b.frames);
    assert_eq!(a.lost, b.lost);
    assert_eq!(a.retransmissions, b.retransmissions);
}

#[test]
fn smaller_blocks_take_more_round_trips() {
    // 64-byte blocks keep every datagram within 2 frames; 1024-byte blocks fragment into ~12.
    let small = run(3, "latency=100ms", 2);
    let big = run(3, "latency=100ms", 6);
    assert!(small.enrolled && big.enrolled);
    assert!(small.end > big.end, "more round trips with small blocks");
}
