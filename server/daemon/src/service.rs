//! The driver: DTLS sessions in, the sans-IO core per session, datagrams and commits out.
//!
//! One tokio task per DTLS session owns that session's [`EstSession`] (CoAP dedup and
//! block-wise state, the EST resources) and does what it asks: sends the datagrams of
//! [`EstSession::poll_transmit`], runs its timer, and hands each [`Event::Commit`] to the
//! store, whose writer thread groups commits into one fsync and sends each result back to
//! the task on a channel, where [`EstSession::complete_commit`] resumes the request. No thread
//! waits for the writer: the task serves its session's other datagrams (a retransmission, the
//! timer of a slow commit's empty ACK) meanwhile. The walk of one /sen through these functions
//! is in docs/architecture.md.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use est_proto::coap::CoapConfig;
use est_proto::est::EstService;
use est_proto::policy::{Policy, VerifiedChain};
use est_proto::session::{CommitId, EstSession, Event, Peer};
use est_proto::store::{CommitResult, Store};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{ConfigError, DtlsSection};
use crate::datadir::Loaded;
use crate::store::SqliteStore;
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
}

/// A server that is running; dropping it does not stop it, call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub local_addr: SocketAddr,
    pub listener: Arc<DtlsListener>,
    pub store: Arc<SqliteStore>,
    pub counters: Arc<ServiceCounters>,
    stop: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl RunningServer {
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
        ..DtlsServerConfig::default()
    })
}

/// The handshake alert a policy refusal maps to.
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
    let cfg = &loaded.config;
    let store = Arc::new(
        SqliteStore::open(&loaded.database, cfg.storage.max_batch)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", loaded.database.display()))?,
    );
    let policy = Policy::new(
        cfg.policy_config(),
        &loaded.manufacturer_cas,
        loaded.issuing_ca.certificate_der(),
    )
    .map_err(|e| anyhow::anyhow!("trust anchors: {e}"))?;
    let coap_cfg = Arc::new(cfg.coap_config());
    let est_cfg = cfg.est_config();
    let store_dyn: Arc<dyn est_proto::store::Store> = store.clone();
    let est = Arc::new(
        EstService::new(est_cfg, loaded.issuing_ca, policy, store_dyn)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    // The client chain is validated once, at the handshake, by the policy (rustls-webpki against
    // the manufacturer CAs and our CA), which records the anchor class for /sen vs /sren.
    let verifier_est = est.clone();
    let client_chain_verifier: ClientChainVerifier = Arc::new(move |chain: &[Vec<u8>]| {
        let policy = verifier_est.policy();
        let verified = policy
            .verify_peer_chain(chain, SystemTime::now())
            .map_err(cert_error)?;
        // The per-identity session limit counts sessions per device serial.
        let identity = est_proto::policy::device_id_of(chain)
            .map(String::into_bytes)
            .unwrap_or_default();
        Ok(VerifiedClient {
            identity,
            verification: Arc::new(verified) as PeerVerification,
        })
    });
    let dtls = DtlsServerConfig {
        certificate_chain_der: loaded.server_chain.clone(),
        private_key_pkcs8_der: loaded.server_key_pkcs8.clone(),
        // The policy's verifier holds the anchors (manufacturer CAs and our issuing CA).
        client_chain_verifier: Some(client_chain_verifier),
        ..dtls_server_config(&cfg.dtls)?
    };
    let addr = listen.unwrap_or(cfg.server.listen);
    let listener = Arc::new(
        DtlsListener::bind_udp(addr, dtls)
            .await
            .with_context(|| format!("binding UDP {addr}"))?,
    );
    let local_addr = listener.local_addr()?;
    let counters = Arc::new(ServiceCounters::default());
    let (stop, stop_rx) = watch::channel(false);
    if cfg.server.metrics_log_interval_secs > 0 {
        tokio::spawn(metrics_loop(
            listener.clone(),
            est.clone(),
            store.clone(),
            counters.clone(),
            Duration::from_secs(cfg.server.metrics_log_interval_secs),
            stop_rx.clone(),
        ));
    }
    let accept_task = tokio::spawn(accept_loop(
        listener.clone(),
        est,
        coap_cfg,
        counters.clone(),
        stop_rx,
    ));
    Ok(RunningServer {
        local_addr,
        listener,
        store,
        counters,
        stop,
        accept_task,
    })
}

/// One structured log line of every counter, periodically: what an operator graphs.
async fn metrics_loop(
    listener: Arc<DtlsListener>,
    est: Arc<EstService>,
    store: Arc<SqliteStore>,
    counters: Arc<ServiceCounters>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
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
            c509_client_certificates = t.c509_client_certificates,
            requests = counters.requests.load(Ordering::Relaxed),
            commits = counters.commits.load(Ordering::Relaxed),
            slow_commit_acks = counters.slow_commit_acks.load(Ordering::Relaxed),
            issued = e.issued,
            replayed = e.replayed,
            refused = e.refused,
            overloaded_503 = e.overloaded,
            store_unavailable_503 = e.store_unavailable,
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
    counters: Arc<ServiceCounters>,
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
                tokio::spawn(serve_session(
                    session,
                    est.clone(),
                    coap_cfg.clone(),
                    counters.clone(),
                ));
            }
            Err(e) => {
                tracing::info!(error = %e, "listener stopped");
                return;
            }
        }
    }
}

/// The monotonic clock of the CoAP/EST timers: tokio's, as the transport driver's, so that
/// both follow a paused or simulated clock together.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// One session's task: feeds the session's datagrams, timer and commit results to its
/// [`EstSession`], and performs what it asks.
async fn serve_session(
    session: DtlsSession,
    est: Arc<EstService>,
    coap_cfg: Arc<CoapConfig>,
    counters: Arc<ServiceCounters>,
) {
    // Commits go to the store the service reads from (SQLite: its writer thread).
    let store: Arc<dyn Store> = Arc::clone(est.store());
    let verified: Option<Arc<VerifiedChain>> = session
        .peer_verification()
        .and_then(|v| Arc::clone(v).downcast::<VerifiedChain>().ok());
    let peer = Peer {
        address: session.peer_addr().to_string(),
        chain: session.peer_certificates().to_vec(),
        verified,
    };
    tracing::debug!(peer = %peer.address, suite = ?session.cipher_suite(), "session established");
    // rand's ThreadRng: a ChaCha CSPRNG seeded from the OS seeds the session's own CSPRNG
    // (message IDs, certificate serial numbers, server-generated keys).
    let mut core = EstSession::new(est, coap_cfg, peer, &mut rand::thread_rng());
    // Commit results from the store's writer thread. Unbounded, but it holds at most one
    // result per commit this session asked for, each holding an admission (its ticket until
    // the result is sent): bounded by `[est] max_concurrent_enrollments`.
    let (results_tx, mut results) = mpsc::unbounded_channel::<(CommitId, CommitResult)>();
    let mut seen = core.stats();
    'serve: loop {
        while let Some(d) = core.poll_transmit() {
            if session.send(&d).await.is_err() {
                break 'serve;
            }
        }
        while let Some(event) = core.poll_event() {
            match event {
                Event::Commit { id, commit, ticket } => {
                    let tx = results_tx.clone();
                    store.submit_commit(
                        commit,
                        Box::new(move |result| {
                            // Durable (or failed): the admission may go.
                            drop(ticket);
                            // The session may have ended meanwhile; the commit stands.
                            let _ = tx.send((id, result));
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
        let deadline = core.poll_timeout();
        tokio::select! {
            // The datagram comes as its own buffer: an idle session holds none (10,000 held
            // sessions with an 8 KiB buffer each were 80 MB).
            r = session.recv_datagram() => match r {
                Ok(datagram) => core.handle_datagram(now(), SystemTime::now(), &datagram),
                Err(e) => {
                    tracing::debug!(peer = %core.peer().address, reason = %e, "session ended");
                    break;
                }
            },
            Some((id, result)) = results.recv() => core.complete_commit(now(), id, result),
            _ = sleep_until_std(deadline) => core.handle_timeout(now()),
        }
    }
    session.close().await;
}

async fn sleep_until_std(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
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
