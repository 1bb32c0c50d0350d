//! CPU cost of the CA part of an enrollment, single thread.
//!
//! Run: `cargo run --release -p est-proto --example ca_bench [seconds-per-item]`
//!
//! Prints, for each step, operations per second and microseconds per operation:
//! ring ECDSA P-256 sign and verify, CSR parse + proof-of-possession check, certificate issuance
//! (build TBS + sign + encode), certs-only CMS wrapping, and the whole pipeline a /sen request
//! costs the CA (parse+verify CSR, issue, wrap).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant, UNIX_EPOCH};

use est_proto::ca::{
    self, oid, HardwareModuleName, IssueParams, IssuingCa, ObjectIdentifier, Signer,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// CPU time this thread has run, from Linux `/proc/thread-self/schedstat` (first field, ns); on a
/// shared machine it is a fairer measure than wall-clock time. `None` elsewhere.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn bench(name: &str, budget: Duration, mut f: impl FnMut()) {
    // Warm up, then run for the budget.
    for _ in 0..100 {
        f();
    }
    let start = Instant::now();
    let cpu_start = thread_cpu_ns();
    let mut n: u64 = 0;
    while start.elapsed() < budget {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_us = match (cpu_start, thread_cpu_ns()) {
        (Some(a), Some(b)) => format!("{:>8.1}", (b.saturating_sub(a)) as f64 / 1e3 / n as f64),
        _ => "       -".to_string(),
    };
    println!(
        "{name:<44} {:>10.0} ops/s {:>8.1} µs/op wall {cpu_us} µs/op CPU",
        n as f64 / secs,
        secs * 1e6 / n as f64
    );
}

fn main() {
    let budget = Duration::from_secs_f64(
        std::env::args()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(1.0),
    );
    let t0 = UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    let year = Duration::from_secs(365 * 24 * 3600);
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (cert, key) = ca::generate_root_ca("Bench CA", "Example", t0, 10 * year, &mut rng).unwrap();
    let issuing = IssuingCa::new(
        cert,
        Box::new(ca::RingP256Signer::from_pkcs8_der(&key).unwrap()),
    )
    .unwrap();

    let device =
        ca::RingP256Signer::from_pkcs8_der(&ca::generate_p256_pkcs8(&mut rng).unwrap()).unwrap();
    let subject = ca::name_from_attrs(&[
        (oid::AT_ORGANIZATION_NAME, "Example Meters"),
        (oid::AT_COMMON_NAME, "meter-000001"),
        (oid::AT_SERIAL_NUMBER, "SN000001"),
    ])
    .unwrap();
    let hmn = HardwareModuleName::new(
        ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6715.10.1"),
        b"SN000001",
    )
    .unwrap();
    let csr_der = ca::build_csr(&device, &subject, Some(&hmn), Some("dGxzLXVuaXF1ZQ==")).unwrap();
    let csr = ca::parse_and_verify_csr(&csr_der, 4096).unwrap();
    let mut params = IssueParams::new(
        csr.subject.clone(),
        csr.public_key.clone(),
        ca::random_serial(&mut rng),
        t0,
        t0 + year,
    );
    params.hardware_module = csr.hardware_module.clone();
    let issued = issuing.issue(&params).unwrap();
    let p7 = ca::certs_only(&[&issued]).unwrap();
    println!(
        "sizes: CSR {} B, issued certificate {} B, certs-only {} B; {:.1} s per item",
        csr_der.len(),
        issued.len(),
        p7.len(),
        budget.as_secs_f64()
    );

    let msg = vec![0x5au8; 400];
    let sig = device.sign(&msg).unwrap();
    let point = device.public_key_sec1().to_vec();
    bench("ring ECDSA P-256 sign (400 B)", budget, || {
        black_box(device.sign(black_box(&msg)).unwrap());
    });
    bench("ring ECDSA P-256 verify (400 B)", budget, || {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &point)
            .verify(black_box(&msg), &sig)
            .unwrap();
    });
    bench("parse_and_verify_csr", budget, || {
        black_box(ca::parse_and_verify_csr(black_box(&csr_der), 4096).unwrap());
    });
    bench("IssuingCa::issue (incl. ECDSA sign)", budget, || {
        black_box(issuing.issue(black_box(&params)).unwrap());
    });
    bench("certs_only (1 cert)", budget, || {
        black_box(ca::certs_only(&[black_box(&issued)]).unwrap());
    });
    bench(
        "  part: x509 CertReq::from_der (CSR decode)",
        budget,
        || {
            black_box(
                <x509_cert::request::CertReq as der::Decode>::from_der(black_box(&csr_der))
                    .unwrap(),
            );
        },
    );
    let parsed_cert = <x509_cert::Certificate as der::Decode>::from_der(&issued).unwrap();
    bench("  part: x509 Certificate::from_der", budget, || {
        black_box(<x509_cert::Certificate as der::Decode>::from_der(black_box(&issued)).unwrap());
    });
    bench("  part: x509 Certificate::to_der", budget, || {
        black_box(der::Encode::to_der(black_box(&parsed_cert)).unwrap());
    });
    let mut serial_rng = ChaCha20Rng::seed_from_u64(2);
    bench("pipeline: CSR verify + issue + certs_only", budget, || {
        let csr = ca::parse_and_verify_csr(black_box(&csr_der), 4096).unwrap();
        let mut p = IssueParams::new(
            csr.subject,
            csr.public_key,
            ca::random_serial(&mut serial_rng),
            t0,
            t0 + year,
        );
        p.hardware_module = csr.hardware_module;
        let cert = issuing.issue(&p).unwrap();
        black_box(ca::certs_only(&[&cert]).unwrap());
    });
}
