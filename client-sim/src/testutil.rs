//! Test helpers: a scripted in-memory EST responder built on the real issuing code of est-proto.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use est_proto::ca::{self, IssueParams, IssuingCa, RingP256Signer};
use est_proto::coap::{Method, Request, Response, ResponseType};
use est_proto::est::{CF_LINK_FORMAT, CF_PKCS10, CF_PKCS7_CERTS_ONLY, CF_PKIX_CERT};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::pki::DeviceIdentity;

pub(crate) struct FakeEst {
    pub(crate) ca: IssuingCa,
    pub(crate) ca_der: Vec<u8>,
    pub(crate) manufacturer: IssuingCa,
    manufacturer_der: Vec<u8>,
    /// Certificates issued so far (DER).
    pub(crate) issued: Vec<Vec<u8>>,
    /// Answer this many /sen requests with 5.03 + Max-Age `busy_max_age` first.
    pub(crate) busy_first: u32,
    pub(crate) busy_max_age: u32,
    /// Answer /sen with this code instead of issuing.
    pub(crate) reject_sen: Option<ResponseType>,
    /// Issue for a different key than the CSR's (a broken or malicious server).
    pub(crate) wrong_key: bool,
    /// Requests seen: (method, path joined with '/').
    pub(crate) log: Vec<(Method, String)>,
    /// CSR payloads of /sen requests, in order.
    pub(crate) csrs: Vec<Vec<u8>>,
    rng: ChaCha8Rng,
}

fn now_wall() -> SystemTime {
    SystemTime::now() - Duration::from_secs(3600)
}

impl FakeEst {
    pub(crate) fn new(seed: u64) -> FakeEst {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (ca_der, ca_key) = ca::generate_root_ca(
            "Test EST CA",
            "Test Utility",
            now_wall(),
            Duration::from_secs(86_400 * 365),
            &mut rng,
        )
        .unwrap();
        let ca = IssuingCa::new(
            ca_der.clone(),
            Box::new(RingP256Signer::from_pkcs8_der(&ca_key).unwrap()),
        )
        .unwrap();
        let (m_der, m_key) = ca::generate_root_ca(
            "Test Manufacturer CA",
            "ACME Meters",
            now_wall(),
            Duration::from_secs(86_400 * 365),
            &mut rng,
        )
        .unwrap();
        let manufacturer = IssuingCa::new(
            m_der.clone(),
            Box::new(RingP256Signer::from_pkcs8_der(&m_key).unwrap()),
        )
        .unwrap();
        FakeEst {
            ca,
            ca_der,
            manufacturer,
            manufacturer_der: m_der,
            issued: Vec::new(),
            busy_first: 0,
            busy_max_age: 5,
            reject_sen: None,
            wrong_key: false,
            log: Vec::new(),
            csrs: Vec::new(),
            rng,
        }
    }

    pub(crate) fn manufacturer_cert_der(&self) -> Vec<u8> {
        self.manufacturer_der.clone()
    }

    /// A device identity minted by the manufacturer CA (IEEE 802.1AR-style IDevID).
    pub(crate) fn device(&mut self, serial: &str) -> DeviceIdentity {
        let (cert, key) = ca::mint_idevid(
            &self.manufacturer,
            serial,
            const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.55555.1.1"),
            now_wall(),
            now_wall() + Duration::from_secs(86_400 * 365),
            &mut self.rng,
        )
        .unwrap();
        DeviceIdentity {
            serial: serial.to_string(),
            cert_chain_der: vec![cert],
            key_pkcs8_der: key,
        }
    }

    pub(crate) fn handle(&mut self, req: &Request) -> Response {
        let path = req.path.join("/");
        self.log.push((req.method, path.clone()));
        match (req.method, path.as_str()) {
            (Method::Get, ".well-known/core") => Response::new(ResponseType::Content).with_payload(
                CF_LINK_FORMAT,
                b"</est/crts>;rt=\"ace.est.crts\";ct=\"281 287\",</est/sen>;rt=\"ace.est.sen\";ct=\"281 287\",</est/sren>;rt=\"ace.est.sren\";ct=\"281 287\"".to_vec(),
            ),
            (Method::Get, ".well-known/est/crts" | "est/crts") => {
                if req.accept == Some(CF_PKIX_CERT) {
                    Response::new(ResponseType::Content).with_payload(CF_PKIX_CERT, self.ca_der.clone())
                } else {
                    Response::new(ResponseType::Content).with_payload(
                        CF_PKCS7_CERTS_ONLY,
                        ca::certs_only(&[&self.ca_der]).unwrap(),
                    )
                }
            }
            (Method::Post, ".well-known/est/sen" | "est/sen" | ".well-known/est/sren" | "est/sren") => {
                self.csrs.push(req.payload.clone());
                if self.busy_first > 0 {
                    self.busy_first -= 1;
                    let mut r = Response::new(ResponseType::ServiceUnavailable);
                    r.max_age = Some(self.busy_max_age);
                    return r;
                }
                if let Some(code) = self.reject_sen {
                    return Response::new(code);
                }
                if req.content_format != Some(CF_PKCS10) {
                    return Response::new(ResponseType::UnsupportedContentFormat);
                }
                let Ok(csr) = ca::parse_and_verify_csr(&req.payload, 4096) else {
                    return Response::new(ResponseType::BadRequest);
                };
                let mut public_key = csr.public_key.clone();
                if self.wrong_key {
                    let other = ca::generate_p256_pkcs8(&mut self.rng).unwrap();
                    let s = RingP256Signer::from_pkcs8_der(&other).unwrap();
                    use der::Decode;
                    public_key =
                        spki::SubjectPublicKeyInfoOwned::from_der(ca::Signer::public_key_spki_der(&s))
                            .unwrap();
                }
                // Like a real CA, issue under a subject of our own making (O + serialNumber), so
                // that a /sren request must copy it from the LDevID (RFC 7030 §4.2.2).
                let serial = ca::serial_number_attr(&csr.subject).unwrap_or_default();
                let subject = ca::name_from_attrs(&[
                    (ca::oid::AT_ORGANIZATION_NAME, "Test Utility"),
                    (ca::oid::AT_SERIAL_NUMBER, serial.as_str()),
                ])
                .unwrap();
                let mut params = IssueParams::new(
                    subject,
                    public_key,
                    ca::random_serial(&mut self.rng),
                    now_wall(),
                    now_wall() + Duration::from_secs(86_400 * 30),
                );
                params.hardware_module = csr.hardware_module.clone();
                let cert = self.ca.issue(&params).unwrap();
                self.issued.push(cert.clone());
                if req.accept == Some(CF_PKIX_CERT) {
                    Response::new(ResponseType::Changed).with_payload(CF_PKIX_CERT, cert)
                } else {
                    Response::new(ResponseType::Changed)
                        .with_payload(CF_PKCS7_CERTS_ONLY, ca::certs_only(&[&cert]).unwrap())
                }
            }
            _ => Response::new(ResponseType::NotFound),
        }
    }
}

/// An in-process EST-coaps server for runtime tests: webrtc-dtls's stock listener (CCM_8, client
/// certificates verified against the manufacturer CA and the EST CA), est-proto's CoAP server
/// session, and [`FakeEst`] behind it. Lossless links only (the stock listener accepts serially and
/// does not resend its final flight).
pub(crate) mod server {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use est_proto::coap::{CoapConfig, ServerSession};
    use rand::SeedableRng;
    use webrtc_dtls::cipher_suite::CipherSuiteId;
    use webrtc_dtls::config::{ClientAuthType, Config, ExtendedMasterSecretType};
    use webrtc_dtls::crypto::{Certificate, CryptoPrivateKey};
    use webrtc_util::conn::Listener;

    use super::FakeEst;

    pub(crate) struct TestServer {
        pub(crate) addr: SocketAddr,
        /// The root that verifies the server certificate (the meters' Implicit TA).
        pub(crate) trust_anchor_der: Vec<u8>,
        pub(crate) est: Arc<Mutex<FakeEst>>,
    }

    pub(crate) async fn spawn(est: FakeEst) -> TestServer {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(77);
        let (server_cert, server_key) = est_proto::ca::generate_server_cert(
            &est.ca,
            &["localhost".to_string()],
            &["127.0.0.1".parse().unwrap()],
            super::now_wall(),
            Duration::from_secs(86_400),
            &mut rng,
        )
        .unwrap();
        let kp = rcgen::KeyPair::try_from(server_key.as_slice()).unwrap();
        let mut client_cas = rustls::RootCertStore::empty();
        client_cas.add(est.manufacturer_cert_der().into()).unwrap();
        client_cas.add(est.ca_der.clone().into()).unwrap();
        let config = Config {
            certificates: vec![Certificate {
                certificate: vec![server_cert.into()],
                private_key: CryptoPrivateKey::from_key_pair(&kp).unwrap(),
            }],
            cipher_suites: vec![CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Ccm_8],
            extended_master_secret: ExtendedMasterSecretType::Require,
            client_auth: ClientAuthType::RequireAndVerifyClientCert,
            client_cas,
            mtu: 1152,
            ..Config::default()
        };
        let trust_anchor_der = est.ca_der.clone();
        let listener = webrtc_dtls::listener::listen("127.0.0.1:0", config)
            .await
            .unwrap();
        let addr = listener.addr().await.unwrap();
        let est = Arc::new(Mutex::new(est));
        let est2 = est.clone();
        tokio::spawn(async move {
            loop {
                // webrtc-dtls's listener runs each handshake inside accept(): a failed one (a
                // client that gave up, a test's refused credential) is an error for that client
                // only, and the server goes on; only a closed listener ends the loop.
                let conn = match listener.accept().await {
                    Ok((conn, _)) => conn,
                    Err(
                        webrtc_util::Error::ErrClosedListener
                        | webrtc_util::Error::ErrClosedListenerAcceptCh,
                    ) => break,
                    Err(_) => continue,
                };
                let est = est2.clone();
                tokio::spawn(async move {
                    let mut session = ServerSession::new(Arc::new(CoapConfig::default()));
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = conn.recv(&mut buf).await {
                        if let Some((id, req)) = session.handle_datagram(Instant::now(), &buf[..n])
                        {
                            let resp = est.lock().unwrap().handle(&req);
                            session.respond(Instant::now(), id, resp);
                        }
                        while let Some(d) = session.poll_transmit() {
                            if conn.send(&d).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        TestServer {
            addr,
            trust_anchor_der,
            est,
        }
    }
}
