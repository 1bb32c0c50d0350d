//! Every kind of certificate this project issues converts to C509 (type 3) and back to
//! the exact DER: the issuing CA, the server's DTLS certificate, a minted IDevID, and an
//! LDevID issued over the real enrollment path (see interop_libcoap for the latter).
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use est_server::datadir;
use est_tests::TestServer;

fn round_trip(name: &str, der: &[u8]) -> usize {
    let c509 = cbor_schemas::c509::certificate_der_to_c509(der)
        .unwrap_or_else(|e| panic!("{name}: DER -> C509 failed: {e}"));
    // Draft -20: the CBOR array C509Certificate (application/cose-c509-cert+cbor).
    assert_eq!(c509[0], 0x8b, "{name}: C509Certificate is an array of 11");
    let back = cbor_schemas::c509::certificate_c509_to_der(&c509).unwrap();
    assert_eq!(back, der, "{name}: C509 -> DER is not the exact input");
    // And inside COSE_C509 (application/cose-c509+cbor), `bytes .cbor C509Certificate`.
    let cose = cbor_schemas::cose::cose_c509_chain(std::slice::from_ref(&c509)).unwrap();
    cbor_schemas::schema::check_cose_c509(&cose).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        cbor_schemas::cose::decode_cose_c509(&cose).unwrap(),
        vec![c509.clone()]
    );
    assert!(
        c509.len() < der.len(),
        "{name}: {} >= {}",
        c509.len(),
        der.len()
    );
    c509.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_certificate_we_issue_round_trips_through_c509() {
    let srv = TestServer::start(|_| {}).await.unwrap();
    let fleet = srv.mint(&["SNPROFILE"]).unwrap();
    let d = &srv.data_dir;
    for (name, path) in [
        ("issuing CA", d.join("ca/issuing-ca.pem")),
        ("server DTLS certificate", d.join("dtls/server.pem")),
        (
            "manufacturer CA",
            d.join("manufacturers/demo-manufacturer-ca.pem"),
        ),
        ("IDevID", fleet.join("SNPROFILE/idevid.pem")),
    ] {
        let der = datadir::read_certs(&path).unwrap().remove(0);
        let n = round_trip(name, &der);
        println!("{name}: DER {} -> C509 {n}", der.len());
    }
    srv.stop().await;
}
