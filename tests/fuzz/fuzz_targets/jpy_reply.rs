//! est-relay's reply path: whatever arrives on the JPY socket from a registrar's address.
//! No panic; what the JPY decoder accepts re-encodes to a message with the same header and
//! content; a reply reaches a meter only through a header the relay sealed (the input is
//! also spliced in as the content behind a real header, and as a header itself).
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use est_relay::{jpy, Destination, MeterAddr, Relay, RelayConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(j) = jpy::decode(data, 64) {
        let again = jpy::encode(&j.header, &j.content);
        let k = jpy::decode(&again, 64).expect("re-encoded JPY decodes");
        assert_eq!(k, j);
    }
    let registrar: SocketAddr = "192.0.2.1:7634".parse().expect("addr");
    let t0 = Instant::now();
    let mut relay = Relay::new(
        RelayConfig {
            registrars: vec![registrar],
            ..RelayConfig::default()
        },
        t0,
    )
    .expect("relay");
    let meter = MeterAddr::new("10.0.0.1:40000".parse().expect("addr"), 0);
    // A ClientHello record, so that there is a real header to splice the input behind.
    let mut hello = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 13];
    hello.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    relay.handle_meter(t0, meter, &hello);
    let Some(t) = relay.poll_transmit() else {
        return;
    };
    let header = jpy::decode(&t.payload, 64).expect("our JPY").header.to_vec();

    // 1. The input as the whole reply.
    relay.handle_jpy(t0, registrar, data);
    if let Some(out) = relay.poll_transmit() {
        // Only a header we made opens: the input must carry it.
        assert_eq!(out.destination, Destination::Meter(meter));
        let j = jpy::decode(data, 64).expect("forwarded from a decodable reply");
        assert_eq!(&*j.header, &header[..]);
    }
    // 2. The input as content behind our header: forwarded unchanged.
    relay.handle_jpy(t0, registrar, &jpy::encode(&header, data));
    let out = relay.poll_transmit().expect("forwarded");
    assert_eq!(out.payload, data);
    // 3. The input as a header: opens only if it is ours.
    relay.handle_jpy(t0 + Duration::from_secs(1), registrar, &jpy::encode(data, &[1]));
    if relay.poll_transmit().is_some() {
        assert_eq!(data, &header[..]);
    }
    // 4. From elsewhere: never forwarded.
    relay.handle_jpy(t0, "192.0.2.9:7634".parse().expect("addr"), data);
    assert!(relay.poll_transmit().is_none());
});
