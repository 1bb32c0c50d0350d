//! Shared helpers for the transport tests: a test PKI made with rcgen (P-256), config builders
//! (the device side is client-sim's webrtc-dtls client), and a turmoil UDP socket adapter.
#![allow(dead_code)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use client_sim::dtls::{self, DtlsClientConfig, Retried};
use client_sim::meter::{Credential, FailureReason};
use est_server::transport::{CipherSuiteName, DatagramSocket, DtlsServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use webrtc_util::conn::Conn;

/// A certificate with its key, DER.
#[derive(Clone)]
pub(crate) struct Issued {
    pub(crate) cert_der: Vec<u8>,
    pub(crate) key_pkcs8_der: Vec<u8>,
}

/// Root CA -> server leaf (SAN localhost, 127.0.0.1; serverAuth);
/// root CA -> device sub-CA (pathlen 0) -> device leaf (clientAuth), sent as [leaf, sub-CA];
/// an unrelated "rogue" root -> rogue device leaf.
#[derive(Clone)]
pub(crate) struct TestPki {
    pub(crate) root_der: Vec<u8>,
    pub(crate) server: Issued,
    pub(crate) device_sub_ca_der: Vec<u8>,
    pub(crate) device: Issued,
    pub(crate) rogue_root_der: Vec<u8>,
    pub(crate) rogue_device: Issued,
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key")
}

fn ca_params(cn: &str, constraint: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(constraint);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn leaf_params(cn: &str, sans: Vec<String>, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::new(sans).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params
}

impl TestPki {
    pub(crate) fn generate() -> Self {
        let root_key = p256();
        let root = ca_params("Test Root CA", BasicConstraints::Unconstrained)
            .self_signed(&root_key)
            .expect("root");

        let server_key = p256();
        let server = leaf_params(
            "localhost",
            vec!["localhost".into(), "127.0.0.1".into(), "server".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
        .signed_by(&server_key, &root, &root_key)
        .expect("server cert");

        let sub_key = p256();
        let sub = ca_params("Test Device Sub-CA", BasicConstraints::Constrained(0))
            .signed_by(&sub_key, &root, &root_key)
            .expect("sub-CA");

        let device_key = p256();
        let device = leaf_params(
            "meter-0001",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
        .signed_by(&device_key, &sub, &sub_key)
        .expect("device cert");

        let rogue_root_key = p256();
        let rogue_root = ca_params("Rogue Root CA", BasicConstraints::Unconstrained)
            .self_signed(&rogue_root_key)
            .expect("rogue root");
        let rogue_key = p256();
        let rogue = leaf_params(
            "meter-rogue",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
        .signed_by(&rogue_key, &rogue_root, &rogue_root_key)
        .expect("rogue device cert");

        TestPki {
            root_der: root.der().to_vec(),
            server: Issued {
                cert_der: server.der().to_vec(),
                key_pkcs8_der: server_key.serialize_der(),
            },
            device_sub_ca_der: sub.der().to_vec(),
            device: Issued {
                cert_der: device.der().to_vec(),
                key_pkcs8_der: device_key.serialize_der(),
            },
            rogue_root_der: rogue_root.der().to_vec(),
            rogue_device: Issued {
                cert_der: rogue.der().to_vec(),
                key_pkcs8_der: rogue_key.serialize_der(),
            },
        }
    }

    pub(crate) fn server_config(&self) -> DtlsServerConfig {
        DtlsServerConfig {
            certificate_chain_der: vec![self.server.cert_der.clone()],
            private_key_pkcs8_der: self.server.key_pkcs8_der.clone(),
            client_trust_anchors_der: vec![self.root_der.clone()],
            cipher_suites: vec![CipherSuiteName::Ccm8],
            // Every test meter presents the same device certificate.
            max_sessions_per_identity: 10_000,
            ..DtlsServerConfig::default()
        }
    }

    /// The good device, sending [leaf, sub-CA], offering CCM_8 only.
    pub(crate) fn device_config(&self, server_name: &str) -> Device {
        Device {
            dtls: DtlsClientConfig {
                trust_anchors_der: vec![self.root_der.clone()],
                server_name: server_name.to_string(),
                flight_interval: Duration::from_secs(1),
                handshake_timeout: Duration::from_secs(10),
                ..DtlsClientConfig::default()
            },
            cred: Credential {
                chain_der: vec![self.device.cert_der.clone(), self.device_sub_ca_der.clone()],
                key_pkcs8_der: self.device.key_pkcs8_der.clone(),
            },
            overall_timeout: Duration::from_secs(20),
        }
    }
}

/// A test device: client-sim's webrtc-dtls client settings (`dtls.handshake_timeout` bounds one
/// attempt), its credential, and the deadline of all attempts together.
#[derive(Clone, Debug)]
pub(crate) struct Device {
    pub(crate) dtls: DtlsClientConfig,
    pub(crate) cred: Credential,
    pub(crate) overall_timeout: Duration,
}

impl Device {
    /// Handshakes over `conn` with [`dtls::connect_retrying`].
    pub(crate) async fn connect(
        &self,
        conn: Arc<dyn Conn + Send + Sync>,
    ) -> Result<Retried, FailureReason> {
        dtls::connect_retrying(conn, &self.dtls, &self.cred, self.overall_timeout).await
    }

    /// One attempt and the whole of the handshake bounded by `timeout`.
    pub(crate) fn with_timeout(mut self, timeout: Duration) -> Self {
        self.dtls.handshake_timeout = timeout;
        self.overall_timeout = timeout;
        self
    }
}

/// turmoil's simulated UDP socket as a [`DatagramSocket`].
pub(crate) struct SimUdp(pub(crate) turmoil::net::UdpSocket);

#[async_trait]
impl DatagramSocket for SimUdp {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.0.recv_from(buf).await
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        self.0.send_to(buf, target).await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// p-th percentile (0..=100) of sorted durations, nearest rank.
pub(crate) fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A [`webrtc_util::conn::Conn`] "connected" to one remote address over a [`DatagramSocket`]:
/// sends go to `remote`, datagrams from any other source are discarded: what the tests hand to
/// client-sim's webrtc-dtls client, over a real or a turmoil socket.
pub(crate) struct SocketConn<S: DatagramSocket> {
    socket: Arc<S>,
    remote: SocketAddr,
}

impl<S: DatagramSocket> SocketConn<S> {
    pub(crate) fn new(socket: Arc<S>, remote: SocketAddr) -> Self {
        SocketConn { socket, remote }
    }

    pub(crate) fn socket(&self) -> &Arc<S> {
        &self.socket
    }
}

#[async_trait]
impl<S: DatagramSocket> Conn for SocketConn<S> {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "SocketConn is connected at construction".into(),
        ))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        loop {
            let (n, from) = self.socket.recv_from(buf).await?;
            if from == self.remote {
                return Ok(n);
            }
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let n = Conn::recv(self, buf).await?;
        Ok((n, self.remote))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.send_to(buf, self.remote).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.remote)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}
