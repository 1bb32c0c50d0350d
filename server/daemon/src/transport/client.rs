//! DTLS client for tests and the device simulator: webrtc-dtls over any `Conn`, with an attempt
//! timeout and whole-handshake retries. The webrtc-dtls client retransmits its current flight
//! every `flight_interval` forever and never gives up on its own; a meter must instead start over
//! from a fresh session (new client random) after a while, and give up at an overall deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use webrtc_dtls::config::{ClientAuthType, Config, ExtendedMasterSecretType};
use webrtc_dtls::conn::DTLSConn;
use webrtc_util::conn::Conn;

use super::{
    dtls_cipher_suites, ensure_crypto_provider, load_certificate, root_store, CipherSuiteName,
    TransportError,
};

/// Client configuration.
#[derive(Clone)]
pub struct DtlsClientConfig {
    /// Our chain, DER, leaf first. Empty: no client certificate (the server will refuse us).
    pub certificate_chain_der: Vec<Vec<u8>>,
    /// PKCS#8 DER, ECDSA P-256. Ignored when `certificate_chain_der` is empty.
    pub private_key_pkcs8_der: Vec<u8>,
    /// Trust anchors for the server's certificate (RFC 9148 §3: the implicit TA database).
    pub server_trust_anchors_der: Vec<Vec<u8>>,
    /// Checked against the server certificate's SAN (DNS name or IP address).
    pub server_name: String,
    /// Offered in this order; the server takes the first it supports.
    pub cipher_suites: Vec<CipherSuiteName>,
    pub mtu_bytes: usize,
    /// Fixed retransmission interval of the engine.
    pub flight_interval: Duration,
    /// One handshake attempt; after it a fresh attempt starts.
    pub attempt_timeout: Duration,
    /// All attempts together.
    pub overall_timeout: Duration,
    pub extended_master_secret_required: bool,
}

impl Default for DtlsClientConfig {
    fn default() -> Self {
        DtlsClientConfig {
            certificate_chain_der: Vec::new(),
            private_key_pkcs8_der: Vec::new(),
            server_trust_anchors_der: Vec::new(),
            server_name: String::new(),
            cipher_suites: vec![CipherSuiteName::Ccm8],
            mtu_bytes: 1152,
            flight_interval: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(30),
            overall_timeout: Duration::from_secs(120),
            extended_master_secret_required: true,
        }
    }
}

impl std::fmt::Debug for DtlsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsClientConfig")
            .field("certificate_chain_len", &self.certificate_chain_der.len())
            .field(
                "server_trust_anchors_len",
                &self.server_trust_anchors_der.len(),
            )
            .field("server_name", &self.server_name)
            .field("cipher_suites", &self.cipher_suites)
            .field("mtu_bytes", &self.mtu_bytes)
            .field("flight_interval", &self.flight_interval)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("overall_timeout", &self.overall_timeout)
            .finish()
    }
}

/// A completed client handshake.
pub struct ClientConnection {
    pub conn: Arc<DTLSConn>,
    /// Handshake attempts used (1 = the first one completed).
    pub attempts: u32,
}

/// Build the webrtc-dtls client `Config` (done once per [`connect`]; exposed for callers that
/// connect many times with one configuration).
pub fn build_config(cfg: &DtlsClientConfig) -> Result<Config, TransportError> {
    ensure_crypto_provider();
    if cfg.attempt_timeout.is_zero() || cfg.overall_timeout.is_zero() {
        return Err(TransportError::Config(
            "attempt_timeout and overall_timeout must not be zero".into(),
        ));
    }
    let certificates = if cfg.certificate_chain_der.is_empty() {
        Vec::new()
    } else {
        vec![load_certificate(
            &cfg.certificate_chain_der,
            &cfg.private_key_pkcs8_der,
        )?]
    };
    Ok(Config {
        certificates,
        cipher_suites: dtls_cipher_suites(&cfg.cipher_suites)?,
        client_auth: ClientAuthType::NoClientCert,
        roots_cas: root_store(&cfg.server_trust_anchors_der, "server_trust_anchors_der")?,
        server_name: cfg.server_name.clone(),
        extended_master_secret: if cfg.extended_master_secret_required {
            ExtendedMasterSecretType::Require
        } else {
            ExtendedMasterSecretType::Request
        },
        flight_interval: cfg.flight_interval,
        mtu: cfg.mtu_bytes,
        ..Config::default()
    })
}

/// Handshake as a client over `conn`; see [`connect_with_config`].
pub async fn connect(
    conn: Arc<dyn Conn + Send + Sync>,
    cfg: &DtlsClientConfig,
) -> Result<Arc<DTLSConn>, TransportError> {
    connect_detailed(conn, cfg).await.map(|c| c.conn)
}

/// Like [`connect`], also reporting the attempts used.
pub async fn connect_detailed(
    conn: Arc<dyn Conn + Send + Sync>,
    cfg: &DtlsClientConfig,
) -> Result<ClientConnection, TransportError> {
    let config = build_config(cfg)?;
    connect_with_config(conn, &config, cfg.attempt_timeout, cfg.overall_timeout).await
}

/// Handshake attempts of at most `attempt_timeout` each, from a fresh session each time, until
/// one completes or `overall_timeout` has passed. A handshake that *fails* (alert, certificate
/// rejected) is not retried: that answer is definite.
pub async fn connect_with_config(
    conn: Arc<dyn Conn + Send + Sync>,
    config: &Config,
    attempt_timeout: Duration,
    overall_timeout: Duration,
) -> Result<ClientConnection, TransportError> {
    let deadline = Instant::now() + overall_timeout;
    let mut attempts: u32 = 0;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(TransportError::HandshakeTimeout(overall_timeout));
        }
        attempts = attempts.saturating_add(1);
        let budget = attempt_timeout.min(remaining);
        match tokio::time::timeout(
            budget,
            DTLSConn::new(Arc::clone(&conn), config.clone(), true, None),
        )
        .await
        {
            Ok(Ok(dtls)) => {
                return Ok(ClientConnection {
                    conn: Arc::new(dtls),
                    attempts,
                })
            }
            Ok(Err(e)) => return Err(TransportError::Handshake(e.to_string())),
            Err(_) => {
                tracing::debug!(attempts, "DTLS client attempt timed out; starting over");
            }
        }
    }
}
