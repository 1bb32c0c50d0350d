//! The driver: DTLS sessions in, the sans-IO core per session, datagrams and commits out.
//!
//! One tokio task per DTLS session owns that session's [`EstSession`] (CoAP dedup and
//! block-wise state, the EST resources) and does what it asks: sends the datagrams of
//! [`EstSession::poll_transmit`], runs its timer, and hands each [`Event::Commit`] to the
//! store (SQLite: its writer thread; PostgreSQL: its writer tasks), which groups commits into
//! one transaction and sends each result back to the task on a channel, where [`EstSession::complete_commit`] resumes the request. No thread
//! waits for the writer: the task serves its session's other datagrams (a retransmission, the
//! timer of a slow commit's empty ACK) meanwhile. The walk of one /sen through these functions
//! is in docs/architecture.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use est_proto::coap::CoapConfig;
use est_proto::est::EstService;
use est_proto::policy::{Policy, VerifiedChain};
use est_proto::session::{CommitId, EstSession, Event, Peer};
// The monotonic clock of the CoAP/EST timers is tokio's, as the transport driver's, so that
// both follow a paused or simulated clock together.
use est_proto::store::{unix_seconds, AuditEvent, Commit, CommitResult, Store, UtcDateTime};
use est_relay::tokio_clock::{now, sleep_until};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError, DtlsSection, RelaySection};
use crate::datadir::{self, Loaded};
use crate::metrics::MetricsSources;
use crate::revocation::{self, RevocationView};
use crate::store::ServerStore;
use crate::transport::{
    CertError, ClientChainVerifier, DtlsListener, DtlsServerConfig, DtlsSession, PeerVerification,
    VerifiedClient,
};

/// Counters of the EST driver.
#[derive(Default, Debug)]
pub struct ServiceCounters {
    pub sessions_accepted: AtomicU64,
    /// Complete requests the sessions served.
    pub requests: AtomicU64,
    /// Commits the sessions asked for (issuances and audit rows).
    pub commits: AtomicU64,
    /// Requests acknowledged with an empty ACK because their commit was slow.
    pub slow_commit_acks: AtomicU64,
    /// The CoAP layer's counters and gauges, summed over every session.
    pub coap: crate::metrics::CoapAggregate,
}

/// The wall clock of certificate validity, CRL times and audit rows: the system clock plus
/// an offset that is zero unless a test moves it (to see the CA expire without waiting
/// years). The CoAP and DTLS timers use tokio's monotonic clock, not this.
#[derive(Debug, Default)]
pub struct WallClock {
    offset_secs: AtomicI64,
}

impl WallClock {
    pub fn now(&self) -> SystemTime {
        let o = self.offset_secs.load(Ordering::Relaxed);
        let n = SystemTime::now();
        let d = Duration::from_secs(o.unsigned_abs());
        if o >= 0 {
            n.checked_add(d).unwrap_or(n)
        } else {
            n.checked_sub(d).unwrap_or(n)
        }
    }

    /// Run `secs` seconds ahead of the system clock (behind when negative).
    pub fn set_offset_secs(&self, secs: i64) {
        self.offset_secs.store(secs, Ordering::Relaxed);
    }
}

/// Whole days from `now` to `until` (negative once past).
pub fn days_left(until: SystemTime, now: SystemTime) -> i64 {
    (unix_seconds(until) - unix_seconds(now)).div_euclid(86_400)
}

/// The notAfter of a DER certificate.
fn not_after_of(der: &[u8]) -> Result<SystemTime> {
    let c = <x509_cert::Certificate as der::Decode>::from_der(der)?;
    Ok(c.tbs_certificate.validity.not_after.to_system_time())
}

/// Ends of validity the server watches: the issuing CAs' (P-256, and P-384 when
/// `[ca_p384]` is enabled) and the DTLS certificate's (which SIGHUP may replace).
#[derive(Debug)]
pub struct Lifetimes {
    pub ca_not_after: SystemTime,
    /// The P-384 issuing CA's notAfter, when there is one.
    pub ca_p384_not_after: Option<SystemTime>,
    pub dtls_not_after: Mutex<SystemTime>,
    pub warn_days: u32,
}

impl Lifetimes {
    /// (days left on the CA, days left on the DTLS certificate) at `now`.
    pub fn days_left(&self, now: SystemTime) -> (i64, i64) {
        let dtls = *self
            .dtls_not_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (days_left(self.ca_not_after, now), days_left(dtls, now))
    }

    /// Days left on the P-384 issuing CA at `now`, when there is one.
    pub fn p384_days_left(&self, now: SystemTime) -> Option<i64> {
        self.ca_p384_not_after.map(|t| days_left(t, now))
    }

    /// Whether any watched certificate is inside the warning window at `now`.
    pub fn any_within_warning(&self, now: SystemTime) -> bool {
        let (ca, dtls) = self.days_left(now);
        let warn = i64::from(self.warn_days);
        ca < warn || dtls < warn || self.p384_days_left(now).is_some_and(|d| d < warn)
    }

    /// Log the days left on both, as a warning inside the warning window.
    pub fn log(&self, now: SystemTime) {
        let (ca, dtls) = self.days_left(now);
        let warn = i64::from(self.warn_days);
        let rfc = |t: SystemTime| UtcDateTime::from_unix_seconds(unix_seconds(t)).rfc3339();
        let dtls_at = *self
            .dtls_not_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ca < warn {
            tracing::warn!(days_left = ca, not_after = %rfc(self.ca_not_after), "the issuing CA certificate expires soon: renew it (enrollments are answered 5.03 once it has expired)");
        } else {
            tracing::info!(days_left = ca, not_after = %rfc(self.ca_not_after), "issuing CA certificate");
        }
        if let (Some(at), Some(p384)) = (self.ca_p384_not_after, self.p384_days_left(now)) {
            if p384 < warn {
                tracing::warn!(days_left = p384, not_after = %rfc(at), "the P-384 issuing CA certificate expires soon: renew it (its enrollments are answered 5.03 once it has expired)");
            } else {
                tracing::info!(days_left = p384, not_after = %rfc(at), "P-384 issuing CA certificate");
            }
        }
        if dtls < 0 {
            tracing::error!(days_left = dtls, not_after = %rfc(dtls_at), "the DTLS server certificate has expired: meters will refuse the handshake; run `est-server dtls renew` and send SIGHUP");
        } else if dtls < warn {
            tracing::warn!(days_left = dtls, not_after = %rfc(dtls_at), "the DTLS server certificate expires soon: run `est-server dtls renew` and send SIGHUP");
        } else {
            tracing::info!(days_left = dtls, not_after = %rfc(dtls_at), "DTLS server certificate");
        }
    }
}

/// A server that is running; dropping it does not stop it, call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub local_addr: SocketAddr,
    /// The JPY port for stateless join proxies (`[relay] jpy_listen`), if any.
    pub jpy_addr: Option<SocketAddr>,
    pub listener: Arc<DtlsListener>,
    pub store: Arc<dyn ServerStore>,
    pub counters: Arc<ServiceCounters>,
    /// The EST core (CA, policy, counters, the CRL being served).
    pub est: Arc<EstService>,
    /// What the handshake checks revocations against.
    pub revocation: Arc<RevocationView>,
    /// The wall clock every validity decision uses (tests move it).
    pub clock: Arc<WallClock>,
    pub lifetimes: Arc<Lifetimes>,
    /// Where `/metrics` listens (`[metrics] listen`), if it does.
    pub metrics_addr: Option<SocketAddr>,
    config: Config,
    data_dir: PathBuf,
    manufacturer_cas: Vec<Vec<u8>>,
    stop: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl RunningServer {
    /// What SIGHUP does: re-read the DTLS server certificate and key (after `est-server dtls
    /// renew`; new handshakes use them), the manufacturer CRLs and the revocations in the
    /// store, and re-issue the CRL if it is due.
    pub async fn reload(&self) -> Result<()> {
        let pki = &self.config.pki;
        let chain = datadir::read_certs(&datadir::resolve(&self.data_dir, &pki.server_cert))?;
        let key = datadir::read_key(&datadir::resolve(&self.data_dir, &pki.server_key))?;
        let dtls_not_after = not_after_of(chain.first().context("empty server certificate file")?)?;
        self.listener.set_credentials(chain, &key).await?;
        *self
            .lifetimes
            .dtls_not_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = dtls_not_after;
        let crls = revocation::load_manufacturer_crls(
            &self.data_dir,
            &self.config,
            &self.manufacturer_cas,
            self.clock.now(),
        )?;
        self.revocation.set_manufacturer_crls(&crls);
        let (est, store, view, cfg, dir, now) = (
            self.est.clone(),
            self.store.clone(),
            self.revocation.clone(),
            self.config.revocation.clone(),
            self.data_dir.clone(),
            self.clock.now(),
        );
        tokio::task::spawn_blocking(move || {
            view.reload(store.as_ref())?;
            revocation_tick(&est, store.as_ref(), &view, &cfg, &dir, now)
        })
        .await??;
        self.lifetimes.log(self.clock.now());
        tracing::info!("reloaded: DTLS certificate, manufacturer CRLs, revocations");
        Ok(())
    }

    /// Re-read the revocations now (what the poll does every `poll_interval_secs`).
    pub async fn poll_revocations(&self) -> Result<()> {
        let (est, store, view, cfg, dir, now) = (
            self.est.clone(),
            self.store.clone(),
            self.revocation.clone(),
            self.config.revocation.clone(),
            self.data_dir.clone(),
            self.clock.now(),
        );
        tokio::task::spawn_blocking(move || {
            revocation_tick(&est, store.as_ref(), &view, &cfg, &dir, now)
        })
        .await?
    }

    /// Stop accepting, close the listener and the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.listener.shutdown().await;
        let _ = self.accept_task.await;
        self.store.close();
    }
}

/// The transport's settings from `[dtls]`, without credentials and verifier (the caller adds
/// them). Every `[dtls]` field is mapped here, and only here.
pub fn dtls_server_config(d: &DtlsSection) -> Result<DtlsServerConfig, ConfigError> {
    Ok(DtlsServerConfig {
        cipher_suites: d.cipher_suite_names()?,
        mtu_bytes: d.mtu_bytes,
        flight_interval: Duration::from_millis(d.flight_interval_ms),
        retransmit_max: Duration::from_millis(d.retransmit_max_ms),
        handshake_timeout: Duration::from_secs(d.handshake_timeout_secs),
        handshake_stall_timeout: Duration::from_secs(d.handshake_stall_timeout_secs),
        idle_timeout: Duration::from_secs(d.idle_timeout_secs),
        max_half_open_handshakes: d.max_half_open_handshakes,
        max_half_open_per_ip: d.max_half_open_per_ip,
        max_sessions: d.max_sessions,
        max_sessions_per_identity: d.max_sessions_per_identity,
        max_sessions_per_ip: d.max_sessions_per_ip,
        session_limit_exempt_ips: d.session_limit_exempt_ips.clone(),
        extended_master_secret_required: d.extended_master_secret_required,
        answer_use_srtp: d.answer_use_srtp,
        send_chain: d.send_chain,
        cached_info: d.cached_info,
        c509_certificate_type: (d.c509_certificate_type != 0).then_some(d.c509_certificate_type),
        final_flight_retention: Duration::from_secs(d.final_flight_retention_secs),
        cookie_rotation_interval: Duration::from_secs(d.cookie_rotation_secs),
        cid_length: d.cid_length,
        cid_prefix: d.cid_prefix()?,
        max_log_lines_per_sec: d.max_log_lines_per_sec,
        socket_receive_buffer_bytes: d.socket_receive_buffer_bytes,
        engine_shards: d.engine_shards,
        // No more sessions than the cap can wait to be accepted.
        accept_queue_sessions: d.accept_queue_sessions.min(d.max_sessions),
        session_queue_datagrams: d.session_queue_datagrams,
        session_queue_bytes: d.session_queue_bytes,
        command_queue_len: d.command_queue_len,
        shard_inbox_datagrams: d.shard_inbox_datagrams,
        ..DtlsServerConfig::default()
    })
}

/// The transport's settings from `[relay]`, added to `dtls`. Every `[relay]` field the
/// transport uses is mapped here, and only here.
pub fn with_relay(
    dtls: DtlsServerConfig,
    r: &RelaySection,
) -> Result<DtlsServerConfig, ConfigError> {
    Ok(DtlsServerConfig {
        jpy_allowed_proxies: r.allowed_prefixes()?,
        jpy_max_header_bytes: r.max_header_bytes,
        max_half_open_per_relay: r.max_half_open_per_relay,
        max_sessions_per_relay: r.max_sessions_per_relay,
        ..dtls
    })
}

/// The largest block size exponent (RFC 7959) whose blocks fit a session's datagrams, with
/// room for the CoAP header, token and options: a meter behind a join proxy has less room
/// (its datagrams carry the JPY header too).
fn fit_block_szx(max_szx: u8, max_datagram: usize) -> u8 {
    /// Header (4), token (up to 8), the options of a block response (Content-Format 3,
    /// Block1 or Block2 4 each, Size2 3, ...) and the payload marker, with room to spare.
    const COAP_HEADROOM: usize = 40;
    let mut szx = max_szx.min(6);
    while szx > 0 && est_proto::coap::block_size(szx) + COAP_HEADROOM > max_datagram {
        szx -= 1;
    }
    szx
}

/// The handshake alert a policy refusal maps to.
/// One revocation poll: reload the handshake checks if the store's revocation generation
/// moved, publish a CRL if one is due, and serve the latest CRL at the CoAP resource.
pub fn revocation_tick(
    est: &EstService,
    store: &dyn Store,
    view: &RevocationView,
    cfg: &crate::config::RevocationSection,
    data_dir: &std::path::Path,
    now: SystemTime,
) -> Result<()> {
    let generation = store.revocation_generation()?;
    if generation != view.generation() {
        let g = view.reload(store)?;
        tracing::info!(
            generation = g,
            "revocations reloaded for the handshake checks"
        );
    }
    let mut latest = store.latest_crl()?;
    if revocation::crl_due(latest.as_ref(), generation, now) {
        revocation::publish_crl(
            revocation::CrlSigners {
                main: est.ca(),
                p384: p384_ca(est),
            },
            store,
            cfg,
            data_dir,
            now,
        )?;
        latest = store.latest_crl()?;
    }
    if let Some(c) = latest {
        if est.crl().is_none_or(|served| *served != c.der) {
            est.set_crl(c.der);
        }
    }
    if let Some(p384) = p384_ca(est) {
        // Its CRL lives in its file (written by whichever process signed last); one that is
        // missing or not signed by this CA is signed now.
        let file = crate::datadir::resolve(data_dir, &cfg.crl_p384_file());
        let current = std::fs::read(&file)
            .ok()
            .filter(|der| est_proto::ca::verify_crl(der, p384.certificate_der()).is_ok());
        let der = match current {
            Some(der) => der,
            None => {
                revocation::publish_crl(
                    revocation::CrlSigners {
                        main: est.ca(),
                        p384: Some(p384),
                    },
                    store,
                    cfg,
                    data_dir,
                    now,
                )?;
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?
            }
        };
        if est.crl_p384().is_none_or(|served| *served != der) {
            est.set_crl_p384(der);
        }
    }
    Ok(())
}

/// The P-384 issuing CA beside the main one, if any.
fn p384_ca(est: &EstService) -> Option<&est_proto::ca::IssuingCa> {
    est.issuing_cas()
        .skip(1)
        .find(|c| c.curve() == Some(est_proto::ca::Curve::P384))
}

fn cert_error(e: est_proto::policy::PolicyError) -> CertError {
    use est_proto::policy::PolicyError as P;
    let text = e.to_string();
    match e {
        P::UntrustedIssuer(_) => CertError::UnknownCa(text),
        P::Expired | P::NotYetValid => CertError::Expired(text),
        P::NotAllowlisted => CertError::AccessDenied(text),
        _ => CertError::BadCertificate(text),
    }
}

/// Build the core and the transport from a loaded data directory, bind, and serve.
pub async fn start(loaded: Loaded, listen: Option<SocketAddr>) -> Result<RunningServer> {
    let clock = Arc::new(WallClock::default());
    let now = clock.now();
    let mut loaded = loaded;
    // An issuing CA outside its validity cannot issue anything: say so now, not as 5.00
    // answers later.
    if let Err(why) = loaded.issuing_ca.check_validity(now) {
        anyhow::bail!(
            "refusing to start: {why}. The issuing CA ({}, {}) must be renewed, or the system clock corrected.",
            loaded.config.pki.issuing_ca_cert.display(),
            loaded.issuing_ca.subject()
        );
    }
    let lifetimes = Arc::new(Lifetimes {
        ca_not_after: loaded.issuing_ca.not_after(),
        ca_p384_not_after: loaded.issuing_ca_p384.as_ref().map(|c| c.not_after()),
        dtls_not_after: Mutex::new(not_after_of(
            loaded
                .server_chain
                .first()
                .context("empty server certificate file")?,
        )?),
        warn_days: loaded.config.server.certificate_warn_days,
    });
    lifetimes.log(now);
    loaded
        .issuing_ca
        .set_crl_distribution_points(&loaded.config.revocation.distribution_points)
        .map_err(|e| anyhow::anyhow!("revocation.distribution_points: {e}"))?;
    let manufacturer_crls = revocation::load_manufacturer_crls(
        &loaded.data_dir,
        &loaded.config,
        &loaded.manufacturer_cas,
        now,
    )?;
    let config = loaded.config.clone();
    let data_dir = loaded.data_dir.clone();
    let manufacturer_cas = loaded.manufacturer_cas.clone();
    let cfg = &loaded.config;
    let store = crate::store::open_configured(&cfg.storage, &loaded.data_dir).map_err(|e| {
        if cfg.storage.is_postgres() {
            anyhow::anyhow!("opening the PostgreSQL store: {e}")
        } else {
            anyhow::anyhow!("opening {}: {e}", loaded.database.display())
        }
    })?;
    let mut policy_cfg = cfg.policy_config();
    policy_cfg.profiles =
        crate::profiles_config::build(cfg, &loaded.data_dir, &loaded.manufacturer_cas)
            .context("[[profiles]]")?;
    let policy = Policy::new(
        policy_cfg,
        &loaded.manufacturer_cas,
        loaded.issuing_ca.certificate_der(),
    )
    .map_err(|e| anyhow::anyhow!("trust anchors: {e}"))?;
    let coap_cfg = Arc::new(cfg.coap_config());
    let mut est_cfg = cfg.est_config();
    let addr = listen.unwrap_or(cfg.server.listen);
    // The sockets first: the JPY port's address is announced by discovery.
    let dtls_socket = tokio::net::UdpSocket::bind(addr)
        .await
        .with_context(|| format!("binding UDP {addr}"))?;
    let jpy_socket = match cfg.relay.jpy_listen {
        Some(a) => {
            let s = tokio::net::UdpSocket::bind(a)
                .await
                .with_context(|| format!("binding the JPY port, UDP {a}"))?;
            let bound = s.local_addr()?;
            est_cfg.jpy_uri = cfg.relay.announced_uri(bound);
            if est_cfg.jpy_uri.is_none() {
                tracing::warn!(jpy = %bound, "the JPY port is bound to an unspecified address: set [relay] jpy_uri to announce it");
            }
            Some(s)
        }
        None => None,
    };
    let store_dyn: Arc<dyn est_proto::store::Store> = store.clone();
    let mut est_service = EstService::new(est_cfg, loaded.issuing_ca, policy, store_dyn)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(mut p384) = loaded.issuing_ca_p384 {
        if let Err(why) = p384.check_validity(now) {
            anyhow::bail!("refusing to start: the P-384 issuing CA: {why}");
        }
        // Its certificates point at its own CRL.
        p384.set_crl_distribution_points(&config.revocation.distribution_points_p384)
            .map_err(|e| anyhow::anyhow!("revocation.distribution_points_p384: {e}"))?;
        est_service
            .add_issuing_ca(p384)
            .map_err(|e| anyhow::anyhow!("the P-384 issuing CA: {e}"))?;
    }
    let est = Arc::new(est_service);
    // Revocations: the handshake checks, and a current CRL before the first meter arrives.
    let view = Arc::new(RevocationView::default());
    view.set_manufacturer_crls(&manufacturer_crls);
    view.reload(store.as_ref())?;
    if let Err(e) = revocation_tick(&est, store.as_ref(), &view, &cfg.revocation, &data_dir, now) {
        // Enrollment goes on; the poll tries again every poll_interval_secs.
        tracing::error!(error = %format!("{e:#}"), "could not publish the CRL at start");
    }
    // The client chain is validated once, at the handshake, by the policy (rustls-webpki against
    // the manufacturer CAs and our CA), which records the anchor class for /sen vs /sren.
    // Then the revocation checks: a revoked LDevID, a blocked device, an IDevID on its
    // manufacturer's CRL never completes the handshake.
    let verifier_est = est.clone();
    let verifier_view = view.clone();
    let verifier_store = store.clone();
    let verifier_clock = clock.clone();
    let audit_per_sec = cfg.revocation.max_handshake_audit_per_sec;
    let client_chain_verifier: ClientChainVerifier = Arc::new(move |chain: &[Vec<u8>]| {
        let policy = verifier_est.policy();
        let now = verifier_clock.now();
        let (verified, leaf) = policy
            .verify_peer_chain_with_leaf(chain, now)
            .map_err(cert_error)?;
        if let Err(refusal) = verifier_view.check(chain, &leaf, verified.class()) {
            let (alert, error) = match &refusal {
                revocation::HandshakeRefusal::Blocked { .. } => {
                    ("alert 49", CertError::AccessDenied(refusal.to_string()))
                }
                _ => ("alert 44", CertError::Revoked(refusal.to_string())),
            };
            if verifier_view.audit_allowed(audit_per_sec) {
                tracing::warn!(device = %refusal.device(), reason = refusal.reason(), "handshake refused: {refusal}");
                let audit = AuditEvent {
                    at_unix: unix_seconds(now),
                    peer: String::new(),
                    relay: None,
                    device_id: refusal.device().to_string(),
                    operation: "handshake".into(),
                    outcome: "refused".into(),
                    code: alert.into(),
                    detail: refusal.to_string(),
                };
                verifier_store.submit_commit(
                    Commit::Audit(audit),
                    Box::new(|r| {
                        if let Err(e) = r {
                            tracing::error!(error = %e, "could not record a handshake refusal");
                        }
                    }),
                );
            }
            return Err(error);
        }
        // The per-identity session limit counts sessions per device serial.
        let identity = est_proto::ca::serial_number_attr(&leaf.tbs_certificate.subject)
            .map(String::into_bytes)
            .unwrap_or_default();
        // The leaf, parsed once by the policy, is handed to the engine (which does not keep
        // it with the session).
        Ok(VerifiedClient {
            identity,
            verification: Arc::new(verified) as PeerVerification,
            leaf: Some(Arc::new(leaf)),
        })
    });
    let dtls = DtlsServerConfig {
        certificate_chain_der: loaded.server_chain.clone(),
        private_key_pkcs8_der: loaded.server_key_pkcs8.clone(),
        // The policy's verifier holds the anchors (manufacturer CAs and our issuing CA).
        client_chain_verifier: Some(client_chain_verifier),
        ..with_relay(dtls_server_config(&cfg.dtls)?, &cfg.relay)?
    };
    for s in std::iter::once(&dtls_socket).chain(jpy_socket.as_ref()) {
        if dtls.socket_receive_buffer_bytes > 0 {
            // Best effort: the kernel may cap it (net.core.rmem_max) without an error.
            let _ =
                socket2::SockRef::from(s).set_recv_buffer_size(dtls.socket_receive_buffer_bytes);
        }
    }
    let listener = Arc::new(
        DtlsListener::bind_with_jpy(dtls_socket, jpy_socket, dtls)
            .await
            .with_context(|| format!("serving UDP {addr}"))?,
    );
    let local_addr = listener.local_addr()?;
    let jpy_addr = listener.jpy_addr().transpose()?;
    if let Some(j) = jpy_addr {
        tracing::info!(jpy = %j, proxies = ?cfg.relay.allowed_proxies, "JPY port for stateless join proxies");
    }
    let counters = Arc::new(ServiceCounters::default());
    let (stop, stop_rx) = watch::channel(false);
    let sources = MetricsSources {
        listener: listener.clone(),
        est: est.clone(),
        store: store.clone(),
        counters: counters.clone(),
        revocation: view.clone(),
        lifetimes: lifetimes.clone(),
        clock: clock.clone(),
    };
    let metrics_addr = match cfg.metrics.listen_addr()? {
        Some(addr) => {
            let l = crate::metrics::bind(addr)
                .await
                .with_context(|| format!("binding [metrics] listen {addr} (TCP)"))?;
            let bound = l.local_addr()?;
            tracing::info!(addr = %bound, "Prometheus metrics at http://{bound}/metrics");
            tokio::spawn(crate::metrics::serve(l, sources.clone(), stop_rx.clone()));
            Some(bound)
        }
        None => None,
    };
    if cfg.server.metrics_log_interval_secs > 0 {
        tokio::spawn(metrics_loop(
            sources,
            Duration::from_secs(cfg.server.metrics_log_interval_secs),
            stop_rx.clone(),
        ));
    }
    tokio::spawn(revocation_loop(
        est.clone(),
        store.clone(),
        view.clone(),
        cfg.revocation.clone(),
        data_dir.clone(),
        clock.clone(),
        stop_rx.clone(),
    ));
    let relays: Arc<[est_dtls::IpPrefix]> = cfg.relay.allowed_prefixes()?.into();
    let accept_task = tokio::spawn(accept_loop(
        listener.clone(),
        est.clone(),
        coap_cfg,
        relays,
        counters.clone(),
        clock.clone(),
        stop_rx,
    ));
    Ok(RunningServer {
        local_addr,
        jpy_addr,
        listener,
        store,
        counters,
        est,
        revocation: view,
        clock,
        lifetimes,
        metrics_addr,
        config,
        data_dir,
        manufacturer_cas,
        stop,
        accept_task,
    })
}

/// Every [revocation] poll_interval_secs: [`revocation_tick`] (off the async threads: it
/// reads the store and may sign).
async fn revocation_loop(
    est: Arc<EstService>,
    store: Arc<dyn ServerStore>,
    view: Arc<RevocationView>,
    cfg: crate::config::RevocationSection,
    data_dir: PathBuf,
    clock: Arc<WallClock>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.poll_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (est, store, view, cfg, dir, now) = (
            est.clone(),
            store.clone(),
            view.clone(),
            cfg.clone(),
            data_dir.clone(),
            clock.now(),
        );
        let r = tokio::task::spawn_blocking(move || {
            revocation_tick(&est, store.as_ref(), &view, &cfg, &dir, now)
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "revocation poll failed"),
            Err(e) => tracing::error!(error = %e, "revocation poll panicked"),
        }
    }
}

/// One structured log line of every counter, periodically: what an operator graphs.
async fn metrics_loop(src: MetricsSources, every: Duration, mut stop: watch::Receiver<bool>) {
    let MetricsSources {
        listener,
        est,
        store,
        counters,
        revocation,
        lifetimes,
        clock,
    } = src;
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let t = listener.metrics();
        let e = est.counters();
        let w = store.writer_stats();
        let (ca_days_left, dtls_days_left) = lifetimes.days_left(clock.now());
        let ca_p384_days_left = lifetimes.p384_days_left(clock.now());
        if lifetimes.any_within_warning(clock.now()) {
            lifetimes.log(clock.now());
        }
        tracing::info!(
            target: "metrics",
            handshakes_started = t.handshakes_started,
            handshakes_completed = t.handshakes_completed,
            handshakes_failed = t.handshakes_failed,
            handshakes_timed_out = t.handshakes_timed_out,
            handshakes_abandoned = t.handshakes_abandoned,
            half_open_now = t.half_open_now,
            sessions_now = t.sessions_now,
            hello_verify_sent = t.hello_verify_sent,
            bad_cookies = t.bad_cookies,
            refused_bad_certificate = t.refused_bad_certificate,
            refused_unknown_ca = t.refused_unknown_ca,
            refused_no_common_suite = t.refused_no_common_suite,
            refused_no_ems = t.refused_no_ems,
            refused_decode_error = t.refused_decode_error,
            refused_bad_signature_or_finished = t.refused_bad_signature_or_finished,
            refused_peer_alert = t.refused_peer_alert,
            refused_other = t.refused_other,
            refused_over_limit = t.dropped_over_limit,
            sessions_replaced = t.sessions_replaced,
            sessions_superseded = t.sessions_superseded,
            supersedes_deferred = t.supersedes_deferred,
            close_commands_dropped = t.close_commands_dropped,
            sessions_dropped_accept_queue_full = t.sessions_dropped_accept_queue_full,
            sessions_idle_closed = t.sessions_idle_closed,
            peer_address_changes = t.peer_address_changes,
            records_bad_mac = t.records_bad_mac,
            dropped_duplicates = t.dropped_duplicates,
            dropped_garbage = t.dropped_garbage,
            dropped_unknown_peer = t.dropped_unknown_peer,
            dropped_queue_full = t.dropped_queue_full,
            final_flight_resends = t.final_flight_resends,
            log_lines_suppressed = t.log_lines_suppressed,
            peer_certificates_received = t.peer_certificates_received,
            cached_info_hits = t.cached_info_hits,
            jpy_received = t.jpy_received,
            jpy_dropped_not_allowed = t.jpy_dropped_not_allowed,
            jpy_dropped_malformed = t.jpy_dropped_malformed,
            relayed_datagrams = t.relayed_datagrams,
            c509_client_certificates = t.c509_client_certificates,
            requests = counters.requests.load(Ordering::Relaxed),
            commits = counters.commits.load(Ordering::Relaxed),
            slow_commit_acks = counters.slow_commit_acks.load(Ordering::Relaxed),
            issued = e.issued,
            replayed = e.replayed,
            refused = e.refused,
            overloaded_503 = e.overloaded,
            store_unavailable_503 = e.store_unavailable,
            rate_limited_503 = e.rate_limited,
            ca_unavailable_503 = e.ca_unavailable,
            refused_revoked_or_blocked = e.refused_revoked,
            handshakes_refused_revoked = revocation.refused_revoked.load(Ordering::Relaxed),
            handshakes_refused_blocked = revocation.refused_blocked.load(Ordering::Relaxed),
            handshakes_refused_manufacturer_crl = revocation.refused_manufacturer_revoked.load(Ordering::Relaxed),
            revocation_generation = revocation.generation(),
            ca_days_left,
            ca_p384_days_left = ?ca_p384_days_left,
            dtls_days_left,
            enrollments_in_flight = est.in_flight(),
            // operations / transactions = the group-commit factor (fsyncs saved).
            store_transactions = w.transactions,
            store_operations = w.operations,
            "metrics"
        );
    }
}

async fn accept_loop(
    listener: Arc<DtlsListener>,
    est: Arc<EstService>,
    coap_cfg: Arc<CoapConfig>,
    relays: Arc<[est_dtls::IpPrefix]>,
    counters: Arc<ServiceCounters>,
    clock: Arc<WallClock>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let session = tokio::select! {
            s = listener.accept() => s,
            _ = stop.wait_for(|s| *s) => return,
        };
        match session {
            Ok(session) => {
                counters.sessions_accepted.fetch_add(1, Ordering::Relaxed);
                let relay = relay_of(&session.peer(), &relays);
                tokio::spawn(serve_session(
                    session,
                    est.clone(),
                    coap_cfg.clone(),
                    relay,
                    counters.clone(),
                    clock.clone(),
                ));
            }
            Err(e) => {
                tracing::info!(error = %e, "listener stopped");
                return;
            }
        }
    }
}

/// The relay a session came through, for the audit trail: the proxy of a stateless relay's
/// meter (JPY), or the address of a stateful relay (a source in `[relay] allowed_proxies`
/// speaking coaps directly: each of its meters has a port of its own).
fn relay_of(peer: &est_dtls::PeerAddr, relays: &[est_dtls::IpPrefix]) -> Option<String> {
    match peer.proxy() {
        Some(proxy) => Some(proxy.to_string()),
        None if relays.iter().any(|p| p.contains(peer.ip())) => {
            Some(format!("{} (stateful)", peer.ip()))
        }
        None => None,
    }
}

/// One session's task: feeds the session's datagrams, timer and commit results to its
/// [`EstSession`], and performs what it asks.
async fn serve_session(
    session: DtlsSession,
    est: Arc<EstService>,
    coap_cfg: Arc<CoapConfig>,
    relay: Option<String>,
    counters: Arc<ServiceCounters>,
    clock: Arc<WallClock>,
) {
    // Commits go to the store the service reads from (SQLite: its writer thread).
    let store: Arc<dyn Store> = Arc::clone(est.store());
    let verified: Option<Arc<VerifiedChain>> = session
        .peer_verification()
        .and_then(|v| Arc::clone(v).downcast::<VerifiedChain>().ok());
    let peer_addr = session.peer();
    let peer = Peer {
        address: peer_addr.to_string(),
        relay,
        chain: session.peer_certificates_shared(),
        verified,
    };
    // Blocks that fit this session's datagrams (smaller behind a join proxy).
    let coap_cfg = {
        let max = session.max_datagram();
        let (b2, b1) = (
            fit_block_szx(coap_cfg.max_block2_szx, max),
            fit_block_szx(coap_cfg.max_block1_szx, max),
        );
        if (b2, b1) == (coap_cfg.max_block2_szx, coap_cfg.max_block1_szx) {
            coap_cfg
        } else {
            Arc::new(est_proto::coap::CoapConfig {
                max_block2_szx: b2,
                max_block1_szx: b1,
                ..(*coap_cfg).clone()
            })
        }
    };
    tracing::debug!(peer = %peer.address, suite = ?session.cipher_suite(), "session established");
    // rand's ThreadRng: a ChaCha CSPRNG seeded from the OS seeds the session's own CSPRNG
    // (message IDs, certificate serial numbers, server-generated keys).
    let mut core = EstSession::new(est, coap_cfg, peer, &mut rand::thread_rng());
    // Commit results from the store's writer thread. Unbounded, but it holds at most one
    // result per commit this session asked for, each holding an admission (its ticket until
    // the result is sent): bounded by `[est] max_concurrent_enrollments`. Made at the first
    // commit, and its results boxed: a tokio channel allocates a block of 32 slots when it is
    // made, which for unboxed results was ~8 kB in every session, enrolling or not.
    let mut results: Option<CommitResults> = None;
    let mut seen = core.stats();
    let mut coap_seen = est_proto::coap::SessionStats::default();
    'serve: loop {
        while let Some(d) = core.poll_transmit() {
            if session.send(&d).await.is_err() {
                break 'serve;
            }
        }
        while let Some(event) = core.poll_event() {
            match event {
                Event::Commit { id, commit, ticket } => {
                    let tx = results
                        .get_or_insert_with(mpsc::unbounded_channel)
                        .0
                        .clone();
                    store.submit_commit(
                        commit,
                        Box::new(move |result| {
                            // Durable (or failed): the admission may go.
                            drop(ticket);
                            // The session may have ended meanwhile; the commit stands.
                            let _ = tx.send((id, Box::new(result)));
                        }),
                    );
                }
            }
        }
        let stats = core.stats();
        counters
            .requests
            .fetch_add(stats.requests - seen.requests, Ordering::Relaxed);
        counters.commits.fetch_add(
            stats.commits_requested - seen.commits_requested,
            Ordering::Relaxed,
        );
        counters.slow_commit_acks.fetch_add(
            stats.slow_commit_acks - seen.slow_commit_acks,
            Ordering::Relaxed,
        );
        seen = stats;
        let coap = core.coap_stats();
        counters.coap.update(&coap_seen, &coap);
        coap_seen = coap;
        let deadline = core.poll_timeout();
        tokio::select! {
            // The datagram comes as its own buffer: an idle session holds none (10,000 held
            // sessions with an 8 KiB buffer each were 80 MB).
            r = session.recv_datagram() => match r {
                Ok(datagram) => core.handle_datagram(now(), clock.now(), &datagram),
                Err(e) => {
                    tracing::debug!(peer = %core.peer().address, reason = %e, "session ended");
                    break;
                }
            },
            Some((id, result)) = recv_commit_result(&mut results) => {
                core.complete_commit(now(), id, *result)
            }
            _ = sleep_until(deadline) => core.handle_timeout(now()),
        }
    }
    counters.coap.end(&coap_seen);
    session.close().await;
}

/// A session's channel of commit results: (sender kept for the next commit, receiver).
type CommitResults = (
    mpsc::UnboundedSender<(CommitId, Box<CommitResult>)>,
    mpsc::UnboundedReceiver<(CommitId, Box<CommitResult>)>,
);

/// The next commit result, or never while the session has asked for no commit.
async fn recv_commit_result(
    results: &mut Option<CommitResults>,
) -> Option<(CommitId, Box<CommitResult>)> {
    match results {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::transport::{build_engine_config, CipherSuiteName};

    fn credentials() -> (Vec<Vec<u8>>, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (vec![cert.der().to_vec()], key.serialize_der())
    }

    #[test]
    fn the_p384_ca_enters_the_warning_window() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        let mut l = Lifetimes {
            ca_not_after: now + 400 * day,
            ca_p384_not_after: None,
            dtls_not_after: Mutex::new(now + 400 * day),
            warn_days: 30,
        };
        assert_eq!(l.p384_days_left(now), None);
        assert!(!l.any_within_warning(now));
        l.ca_p384_not_after = Some(now + 10 * day);
        assert_eq!(l.p384_days_left(now), Some(10));
        assert!(l.any_within_warning(now));
        l.ca_p384_not_after = Some(now + 100 * day);
        assert!(!l.any_within_warning(now));
    }

    #[test]
    fn blocks_fit_the_sessions_datagrams() {
        // 1152-byte MTU, CCM_8, a 4-byte CID: 1,118 bytes of plaintext direct, 1,080 behind a
        // relay with a 32-byte header: 1024-byte blocks either way.
        assert_eq!(fit_block_szx(6, 1118), 6);
        assert_eq!(fit_block_szx(6, 1080), 6);
        // A small MTU behind a relay: the next size down.
        assert_eq!(fit_block_szx(6, 1000), 5);
        assert_eq!(fit_block_szx(6, 300), 4);
        assert_eq!(fit_block_szx(6, 295), 3);
        assert_eq!(fit_block_szx(2, 2000), 2);
        assert_eq!(fit_block_szx(6, 10), 0);
    }

    /// `[relay]` reaches the transport.
    #[test]
    fn relay_settings_reach_the_engine() {
        let cfg = Config::parse(
            "[relay]\njpy_listen = \"127.0.0.1:0\"\nallowed_proxies = [\"10.0.0.0/8\"]\nmax_header_bytes = 40\nmax_half_open_per_relay = 77\nmax_sessions_per_relay = 888\n",
            std::path::Path::new("x"),
        )
        .unwrap();
        let (chain, key) = credentials();
        let dtls = with_relay(
            DtlsServerConfig {
                certificate_chain_der: chain.clone(),
                private_key_pkcs8_der: key,
                client_trust_anchors_der: chain,
                ..dtls_server_config(&cfg.dtls).unwrap()
            },
            &cfg.relay,
        )
        .unwrap();
        assert_eq!(dtls.jpy_max_header_bytes, 40);
        let e = build_engine_config(&dtls).unwrap();
        assert_eq!(e.limits.max_half_open_per_relay, 77);
        assert_eq!(e.limits.max_sessions_per_relay, 888);
        assert_eq!(e.limits.relay_prefixes.len(), 1);
        assert!(e.limits.relay_prefixes[0].contains("10.1.2.3".parse().unwrap()));
    }

    /// The documented defaults are the transport's defaults, field by field.
    #[test]
    fn default_dtls_section_maps_to_the_transport_defaults() {
        let got = dtls_server_config(&DtlsSection::default()).unwrap();
        let want = DtlsServerConfig::default();
        assert_eq!(got.cipher_suites, want.cipher_suites);
        assert_eq!(got.mtu_bytes, want.mtu_bytes);
        assert_eq!(got.flight_interval, want.flight_interval);
        assert_eq!(got.retransmit_max, want.retransmit_max);
        assert_eq!(got.handshake_timeout, want.handshake_timeout);
        assert_eq!(got.handshake_stall_timeout, want.handshake_stall_timeout);
        assert_eq!(got.idle_timeout, want.idle_timeout);
        assert_eq!(got.max_half_open_handshakes, want.max_half_open_handshakes);
        assert_eq!(got.max_half_open_per_ip, want.max_half_open_per_ip);
        assert_eq!(got.max_sessions, want.max_sessions);
        assert_eq!(
            got.max_sessions_per_identity,
            want.max_sessions_per_identity
        );
        assert_eq!(got.max_sessions_per_ip, want.max_sessions_per_ip);
        assert_eq!(got.session_limit_exempt_ips, want.session_limit_exempt_ips);
        assert_eq!(
            got.extended_master_secret_required,
            want.extended_master_secret_required
        );
        assert_eq!(got.answer_use_srtp, want.answer_use_srtp);
        assert_eq!(got.final_flight_retention, want.final_flight_retention);
        assert_eq!(got.cookie_rotation_interval, want.cookie_rotation_interval);
        assert_eq!(got.cid_length, want.cid_length);
        assert_eq!(got.cid_prefix, want.cid_prefix);
        assert_eq!(got.max_log_lines_per_sec, want.max_log_lines_per_sec);
    }

    /// Every `[dtls]` setting reaches the engine's configuration.
    #[test]
    fn every_dtls_setting_reaches_the_engine() {
        let cfg = Config::parse(
            r#"[dtls]
cipher_suites = ["gcm256", "ccm8"]
mtu_bytes = 900
flight_interval_ms = 700
retransmit_max_ms = 9000
handshake_timeout_secs = 25
handshake_stall_timeout_secs = 7
idle_timeout_secs = 300
max_half_open_handshakes = 50
max_half_open_per_ip = 5
max_sessions = 600
max_sessions_per_identity = 2
max_sessions_per_ip = 300
session_limit_exempt_ips = ["192.0.2.7"]
cookie_rotation_secs = 30
cid_length = 6
cid_prefix_hex = "beef"
max_log_lines_per_sec = 3
final_flight_retention_secs = 100
extended_master_secret_required = false
answer_use_srtp = true
"#,
            std::path::Path::new("x"),
        )
        .unwrap();
        let (chain, key) = credentials();
        let dtls = DtlsServerConfig {
            certificate_chain_der: chain.clone(),
            private_key_pkcs8_der: key,
            client_trust_anchors_der: chain,
            ..dtls_server_config(&cfg.dtls).unwrap()
        };
        let e = build_engine_config(&dtls).unwrap();
        assert_eq!(
            e.cipher_suites,
            [
                CipherSuiteName::Gcm256.to_engine(),
                CipherSuiteName::Ccm8.to_engine()
            ]
        );
        assert_eq!(e.mtu_bytes, 900);
        assert_eq!(e.retransmit.initial, Duration::from_millis(700));
        assert_eq!(e.retransmit.max, Duration::from_millis(9000));
        assert_eq!(e.handshake_timeout, Duration::from_secs(25));
        assert_eq!(e.handshake_stall_timeout, Duration::from_secs(7));
        assert_eq!(e.idle_timeout, Duration::from_secs(300));
        assert_eq!(e.limits.max_half_open, 50);
        assert_eq!(e.limits.max_half_open_per_ip, 5);
        assert_eq!(e.limits.max_sessions, 600);
        assert_eq!(e.limits.max_sessions_per_identity, 2);
        assert_eq!(e.limits.max_sessions_per_ip, 300);
        assert_eq!(
            e.limits.exempt_ips,
            ["192.0.2.7".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(e.cookie_rotation_interval, Duration::from_secs(30));
        assert_eq!(e.cid_length, 6);
        assert_eq!(e.cid_prefix, [0xbe, 0xef]);
        assert_eq!(e.limits.max_log_lines_per_sec, 3);
        assert_eq!(e.final_flight_retention, Duration::from_secs(100));
        assert!(!e.require_extended_master_secret);
        assert!(e.answer_use_srtp);
    }
}
