//! rustls-webpki (through rustls' `WebPkiClientVerifier` / `WebPkiServerVerifier`, the verifiers a
//! rustls-based DTLS/TLS stack uses) accepts what the `ca` module mints and issues: the IDevID a
//! factory mints, the LDevID the server issues (direct and through a subordinate CA) and the
//! DTLS server certificate; and refuses them in the wrong role, at the wrong time or under the
//! wrong root.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use est_proto::ca::{self, oid, HardwareModuleName, IssueParams, IssuingCa, ObjectIdentifier};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

const NOW: u64 = 1_790_000_000;
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn at(secs: u64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(secs))
}

fn hw_type() -> ObjectIdentifier {
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6715.10.1")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(certs: &[&[u8]]) -> Arc<RootCertStore> {
    let mut store = RootCertStore::empty();
    for c in certs {
        store.add(CertificateDer::from(c.to_vec())).unwrap();
    }
    Arc::new(store)
}

fn client_verifier(root: &[u8]) -> Arc<dyn ClientCertVerifier> {
    WebPkiClientVerifier::builder_with_provider(roots(&[root]), provider())
        .build()
        .unwrap()
}

fn server_verifier(root: &[u8]) -> Arc<WebPkiServerVerifier> {
    WebPkiServerVerifier::builder_with_provider(roots(&[root]), provider())
        .build()
        .unwrap()
}

fn new_ca(
    rng: &mut ChaCha20Rng,
    cn: &str,
    not_before: SystemTime,
    validity: Duration,
) -> IssuingCa {
    let (cert, key) =
        ca::generate_root_ca(cn, "Example Meters", not_before, validity, rng).unwrap();
    IssuingCa::new(
        cert,
        Box::new(ca::RingP256Signer::from_pkcs8_der(&key).unwrap()),
    )
    .unwrap()
}

#[test]
fn webpki_accepts_minted_idevid_with_no_expiry() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let forever = ca::idevid_no_expiry().duration_since(t0()).unwrap();
    let maker = new_ca(&mut rng, "Meter Factory CA", t0(), forever);
    let (idev, _) = ca::mint_idevid(
        &maker,
        "SN0001",
        hw_type(),
        t0(),
        ca::idevid_no_expiry(),
        &mut rng,
    )
    .unwrap();
    let v = client_verifier(maker.certificate_der());
    v.verify_client_cert(&CertificateDer::from(idev.clone()), &[], at(NOW + 60))
        .unwrap();
    // Still valid far in the future (notAfter 99991231235959Z).
    v.verify_client_cert(
        &CertificateDer::from(idev.clone()),
        &[],
        at(NOW + 100 * YEAR.as_secs()),
    )
    .unwrap();
    // Not before its notBefore.
    assert!(v
        .verify_client_cert(&CertificateDer::from(idev.clone()), &[], at(NOW - 1))
        .is_err());
    // Not under another root.
    let other = new_ca(&mut rng, "Other CA", t0(), YEAR);
    assert!(client_verifier(other.certificate_der())
        .verify_client_cert(&CertificateDer::from(idev), &[], at(NOW + 60))
        .is_err());
}

#[test]
fn webpki_accepts_issued_ldevid_direct_and_through_sub_ca() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let root = new_ca(&mut rng, "EST Root", t0(), 10 * YEAR);
    let (sub_cert, sub_key) = ca::generate_sub_ca(
        &root,
        "EST Issuing CA",
        "Example Meters",
        t0(),
        5 * YEAR,
        &mut rng,
    )
    .unwrap();
    let sub = IssuingCa::new(
        sub_cert,
        Box::new(ca::RingP256Signer::from_pkcs8_der(&sub_key).unwrap()),
    )
    .unwrap();

    // The meter: its key, a CSR with a hardwareModuleName, parsed and verified by the server.
    let device =
        ca::RingP256Signer::from_pkcs8_der(&ca::generate_p256_pkcs8(&mut rng).unwrap()).unwrap();
    let subject = ca::name_from_attrs(&[
        (oid::AT_COMMON_NAME, "meter-1"),
        (oid::AT_SERIAL_NUMBER, "SN1"),
    ])
    .unwrap();
    let hmn = HardwareModuleName::new(hw_type(), b"SN1").unwrap();
    let csr = ca::parse_and_verify_csr(
        &ca::build_csr(&device, &subject, Some(&hmn), None).unwrap(),
        4096,
    )
    .unwrap();

    let v = client_verifier(root.certificate_der());
    for issuer in [&root, &sub] {
        let mut params = IssueParams::new(
            csr.subject.clone(),
            csr.public_key.clone(),
            ca::random_serial(&mut rng),
            t0(),
            t0() + YEAR,
        );
        params.hardware_module = csr.hardware_module.clone();
        let ldev = CertificateDer::from(issuer.issue(&params).unwrap());
        let chain: Vec<CertificateDer<'static>> = if std::ptr::eq(issuer, &sub) {
            vec![CertificateDer::from(sub.certificate_der().to_vec())]
        } else {
            Vec::new()
        };
        v.verify_client_cert(&ldev, &chain, at(NOW + 60)).unwrap();
        // Expired one second after notAfter.
        assert!(v
            .verify_client_cert(&ldev, &chain, at(NOW + YEAR.as_secs() + 1))
            .is_err());
        // An LDevID is a client certificate, not a server one (EKU clientAuth only).
        let sv = server_verifier(root.certificate_der());
        let name = ServerName::try_from("meter-1").unwrap();
        assert!(sv
            .verify_server_cert(&ldev, &chain, &name, &[], at(NOW + 60))
            .is_err());
    }
}

#[test]
fn webpki_accepts_server_cert_for_dns_and_ip_but_not_as_client() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let root = new_ca(&mut rng, "EST Root", t0(), 10 * YEAR);
    let (srv, _) = ca::generate_server_cert(
        &root,
        &["est.example.net".to_string(), "localhost".to_string()],
        &["127.0.0.1".parse().unwrap()],
        t0(),
        YEAR,
        &mut rng,
    )
    .unwrap();
    let srv = CertificateDer::from(srv);
    let sv = server_verifier(root.certificate_der());
    for name in ["est.example.net", "localhost", "127.0.0.1"] {
        let name = ServerName::try_from(name).unwrap();
        sv.verify_server_cert(&srv, &[], &name, &[], at(NOW + 60))
            .unwrap();
    }
    let wrong = ServerName::try_from("other.example.net").unwrap();
    assert!(sv
        .verify_server_cert(&srv, &[], &wrong, &[], at(NOW + 60))
        .is_err());
    assert!(client_verifier(root.certificate_der())
        .verify_client_cert(&srv, &[], at(NOW + 60))
        .is_err());
}

#[test]
fn webpki_and_ldevid_without_eku() {
    // `extended_key_usage_client_auth = false` omits extKeyUsage; webpki treats a certificate
    // without extKeyUsage as usable for any purpose, so it is still a valid client certificate.
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let root = new_ca(&mut rng, "EST Root", t0(), 10 * YEAR);
    let device =
        ca::RingP256Signer::from_pkcs8_der(&ca::generate_p256_pkcs8(&mut rng).unwrap()).unwrap();
    let spki = <ca::SubjectPublicKeyInfoOwned as der::Decode>::from_der(
        ca::Signer::public_key_spki_der(&device),
    )
    .unwrap();
    let subject = ca::name_from_attrs(&[(oid::AT_COMMON_NAME, "meter-2")]).unwrap();
    let mut params = IssueParams::new(
        subject,
        spki,
        ca::random_serial(&mut rng),
        t0(),
        t0() + YEAR,
    );
    params.extended_key_usage_client_auth = false;
    let ldev = CertificateDer::from(root.issue(&params).unwrap());
    client_verifier(root.certificate_der())
        .verify_client_cert(&ldev, &[], at(NOW + 60))
        .unwrap();
}
