//! Prometheus `/metrics` (`[metrics] listen`, off by default): every counter and gauge of the
//! transport, the CoAP sessions (summed over all sessions, live and ended), the EST outcomes
//! by reason, the store writer, enrollments in flight, handshake refusals by reason, and the
//! days left on the CA and DTLS certificates, in the OpenMetrics text format of
//! `prometheus-client`.
//!
//! The values are read at scrape time from the same sources as the `metrics` log line (which
//! stays: the endpoint is off by default), through a `prometheus_client` [`Collector`]; the
//! HTTP side is a minimal HTTP/1.1 responder on tokio (GET /metrics, one request per
//! connection), so that no web framework comes in for one read-only resource.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use est_proto::coap::SessionStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::revocation::RevocationView;
use crate::service::{Lifetimes, ServiceCounters, WallClock};
use crate::store::ServerStore;
use crate::transport::DtlsListener;

/// The CoAP layer's counters (and gauges) summed over every session of the server: each
/// session task adds what changed since it last looked, and takes its gauges back when it
/// ends.
#[derive(Debug, Default)]
pub struct CoapAggregate {
    counters: [AtomicU64; COAP_COUNTERS.len()],
    gauges: [AtomicI64; COAP_GAUGES.len()],
}

/// (name, help) of the summed CoAP counters, in [`coap_counter_values`] order.
pub const COAP_COUNTERS: [(&str, &str); 19] = [
    ("datagrams_received", "CoAP datagrams received"),
    ("malformed", "datagrams that were not valid CoAP"),
    ("requests_received", "new (non-duplicate) requests parsed"),
    ("requests_delivered", "complete requests handed to EST"),
    (
        "duplicates_answered",
        "duplicate CON requests answered from the cache",
    ),
    (
        "duplicates_ignored",
        "duplicates ignored (NON, or answer pending)",
    ),
    ("dedup_evictions", "duplicate-cache entries evicted"),
    ("pings", "CoAP pings"),
    ("resets_sent", "RST sent"),
    ("resets_received", "RST received"),
    ("block1_received", "Block1 blocks received"),
    ("continues_sent", "2.31 Continue sent"),
    (
        "block2_served_from_cache",
        "Block2 blocks served from the body cache",
    ),
    ("layer_errors", "error responses made by the CoAP layer"),
    ("shed", "requests refused with 5.03: too many pending"),
    ("empty_acks_sent", "empty ACKs for slow answers"),
    ("separate_acked", "separate responses acknowledged"),
    ("retransmissions", "separate responses retransmitted"),
    ("separate_given_up", "separate responses abandoned"),
];

/// (name, help) of the summed CoAP gauges, in [`coap_gauge_values`] order.
pub const COAP_GAUGES: [(&str, &str); 5] = [
    ("reassembly_bytes", "bytes held by Block1 reassembly"),
    ("block2_cache_bytes", "bytes held by Block2 body caches"),
    ("dedup_entries", "entries in the duplicate-detection caches"),
    ("dedup_bytes", "bytes in the duplicate-detection caches"),
    (
        "pending_requests",
        "requests handed to EST and not yet answered",
    ),
];

fn coap_counter_values(s: &SessionStats) -> [u64; COAP_COUNTERS.len()] {
    [
        s.datagrams_received,
        s.malformed,
        s.requests_received,
        s.requests_delivered,
        s.duplicates_answered,
        s.duplicates_ignored,
        s.dedup_evictions,
        s.pings,
        s.resets_sent,
        s.resets_received,
        s.block1_received,
        s.continues_sent,
        s.block2_served_from_cache,
        s.layer_errors,
        s.shed,
        s.empty_acks_sent,
        s.separate_acked,
        s.retransmissions,
        s.separate_given_up,
    ]
}

fn coap_gauge_values(s: &SessionStats) -> [i64; COAP_GAUGES.len()] {
    let g = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
    [
        g(s.reassembly_bytes),
        g(s.block2_cache_bytes),
        g(s.dedup_entries),
        g(s.dedup_bytes),
        g(s.pending_requests),
    ]
}

impl CoapAggregate {
    /// Add what changed between `before` and `now` (one session's stats).
    pub fn update(&self, before: &SessionStats, now: &SessionStats) {
        let (b, n) = (coap_counter_values(before), coap_counter_values(now));
        for ((a, b), n) in self.counters.iter().zip(b).zip(n) {
            if n > b {
                a.fetch_add(n - b, Ordering::Relaxed);
            }
        }
        let (b, n) = (coap_gauge_values(before), coap_gauge_values(now));
        for ((a, b), n) in self.gauges.iter().zip(b).zip(n) {
            if n != b {
                a.fetch_add(n - b, Ordering::Relaxed);
            }
        }
    }

    /// A session ended: its gauges leave the sums (its counters stay).
    pub fn end(&self, last: &SessionStats) {
        for (a, v) in self.gauges.iter().zip(coap_gauge_values(last)) {
            a.fetch_sub(v, Ordering::Relaxed);
        }
    }

    pub fn counters(&self) -> [u64; COAP_COUNTERS.len()] {
        std::array::from_fn(|i| {
            self.counters
                .get(i)
                .map_or(0, |a| a.load(Ordering::Relaxed))
        })
    }

    pub fn gauges(&self) -> [i64; COAP_GAUGES.len()] {
        std::array::from_fn(|i| self.gauges.get(i).map_or(0, |a| a.load(Ordering::Relaxed)))
    }
}

/// Everything the metrics (the log line and `/metrics`) read.
#[derive(Clone)]
pub struct MetricsSources {
    pub listener: Arc<DtlsListener>,
    pub est: Arc<est_proto::est::EstService>,
    pub store: Arc<dyn ServerStore>,
    pub counters: Arc<ServiceCounters>,
    pub revocation: Arc<RevocationView>,
    pub lifetimes: Arc<Lifetimes>,
    pub clock: Arc<WallClock>,
}

impl std::fmt::Debug for MetricsSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSources").finish_non_exhaustive()
    }
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

/// One counter family with one label.
fn labelled(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&'static str, u64)],
) -> std::fmt::Result {
    let mut fam = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, v) in values {
        let labels = [(label, *value)];
        let m = fam.encode_family(&labels)?;
        ConstCounter::new(*v).encode(m)?;
    }
    Ok(())
}

impl Collector for MetricsSources {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let t = self.listener.metrics();
        let e = self.est.counters();
        let w = self.store.writer_stats();
        let r = &self.revocation;
        let enc = &mut enc;
        // The transport (est-dtls endpoint and its driver).
        for (name, help, v) in [
            (
                "est_dtls_handshakes_started",
                "handshakes admitted past the cookie exchange",
                t.handshakes_started,
            ),
            (
                "est_dtls_handshakes_completed",
                "handshakes completed",
                t.handshakes_completed,
            ),
            (
                "est_dtls_handshakes_failed",
                "handshakes refused or failed past the cookie",
                t.handshakes_failed,
            ),
            (
                "est_dtls_handshakes_timed_out",
                "handshakes timed out",
                t.handshakes_timed_out,
            ),
            (
                "est_dtls_handshakes_abandoned",
                "half-open handshakes that gave way at the cap",
                t.handshakes_abandoned,
            ),
            (
                "est_dtls_sessions_replaced",
                "sessions replaced by a new handshake from the same address",
                t.sessions_replaced,
            ),
            (
                "est_dtls_sessions_idle_closed",
                "sessions closed for idleness",
                t.sessions_idle_closed,
            ),
            (
                "est_dtls_sessions_superseded",
                "sessions closed by the per-identity limit",
                t.sessions_superseded,
            ),
            (
                "est_dtls_final_flight_resends",
                "final flights resent on a repeated client flight",
                t.final_flight_resends,
            ),
            (
                "est_dtls_dropped_garbage",
                "malformed records and ClientHellos dropped",
                t.dropped_garbage,
            ),
            (
                "est_dtls_dropped_unknown_peer",
                "records for no known session dropped",
                t.dropped_unknown_peer,
            ),
            (
                "est_dtls_dropped_duplicates",
                "replayed records dropped",
                t.dropped_duplicates,
            ),
            (
                "est_dtls_dropped_queue_full",
                "datagrams dropped on a full session queue or engine shard inbox (dtls.session_queue_*, dtls.shard_inbox_datagrams)",
                t.dropped_queue_full,
            ),
            (
                "est_dtls_sessions_dropped_accept_queue_full",
                "sessions closed after their handshake on a full accept queue (dtls.accept_queue_sessions)",
                t.sessions_dropped_accept_queue_full,
            ),
            (
                "est_dtls_close_commands_dropped",
                "close requests lost on a full driver command queue (dtls.command_queue_len)",
                t.close_commands_dropped,
            ),
            (
                "est_dtls_supersedes_deferred",
                "per-identity supersedes that waited for room on another engine shard's full command queue (dtls.command_queue_len)",
                t.supersedes_deferred,
            ),
            ("est_dtls_socket_errors", "socket errors", t.socket_errors),
            (
                "est_dtls_hello_verify_sent",
                "HelloVerifyRequests sent (stateless cookies)",
                t.hello_verify_sent,
            ),
            (
                "est_dtls_records_bad_mac",
                "records that failed authentication",
                t.records_bad_mac,
            ),
            (
                "est_dtls_peer_address_changes",
                "sessions that moved to a new address (Connection ID)",
                t.peer_address_changes,
            ),
            (
                "est_dtls_log_lines_suppressed",
                "peer log lines over the rate limit",
                t.log_lines_suppressed,
            ),
        ] {
            counter(enc, name, help, v)?;
        }
        for (name, help, v) in [
            (
                "est_dtls_half_open",
                "handshakes in progress past the cookie",
                t.half_open_now,
            ),
            ("est_dtls_sessions", "established sessions", t.sessions_now),
            (
                "est_dtls_tracked_addresses",
                "connections the endpoint holds state for",
                t.tracked_addresses_now,
            ),
            (
                "est_dtls_tombstones",
                "always 0 (kept for the metrics line's shape)",
                t.tombstones_now,
            ),
        ] {
            gauge(enc, name, help, i64::try_from(v).unwrap_or(i64::MAX))?;
        }
        // Handshake refusals by reason: the engine's, then the revocation checks' (which the
        // engine counts under bad_certificate).
        labelled(
            enc,
            "est_handshake_refusals",
            "handshakes refused, by reason (revoked, blocked and manufacturer_revoked are also counted in bad_certificate)",
            "reason",
            &[
                ("bad_certificate", t.refused_bad_certificate),
                ("unknown_ca", t.refused_unknown_ca),
                ("no_common_suite", t.refused_no_common_suite),
                ("no_extended_master_secret", t.refused_no_ems),
                ("decode_error", t.refused_decode_error),
                ("bad_signature_or_finished", t.refused_bad_signature_or_finished),
                ("peer_alert", t.refused_peer_alert),
                ("other", t.refused_other),
                ("over_limit", t.dropped_over_limit),
                ("bad_cookie", t.bad_cookies),
                ("timeout", t.handshakes_timed_out),
                ("revoked", r.refused_revoked.load(Ordering::Relaxed)),
                ("blocked", r.refused_blocked.load(Ordering::Relaxed)),
                ("manufacturer_revoked", r.refused_manufacturer_revoked.load(Ordering::Relaxed)),
            ],
        )?;
        counter(
            enc,
            "est_handshake_refusal_audit_suppressed",
            "handshake refusals not written to the audit trail (rate limit)",
            r.audit_suppressed.load(Ordering::Relaxed),
        )?;
        // The CoAP sessions, summed.
        for ((name, help), v) in COAP_COUNTERS.iter().zip(self.counters.coap.counters()) {
            counter(enc, &format!("est_coap_{name}"), help, v)?;
        }
        for ((name, help), v) in COAP_GAUGES.iter().zip(self.counters.coap.gauges()) {
            gauge(enc, &format!("est_coap_{name}"), help, v)?;
        }
        counter(
            enc,
            "est_sessions_accepted",
            "DTLS sessions handed to the EST driver",
            self.counters.sessions_accepted.load(Ordering::Relaxed),
        )?;
        counter(
            enc,
            "est_requests",
            "complete requests served",
            self.counters.requests.load(Ordering::Relaxed),
        )?;
        counter(
            enc,
            "est_commits",
            "commits asked for (issuances and audit rows)",
            self.counters.commits.load(Ordering::Relaxed),
        )?;
        counter(
            enc,
            "est_slow_commit_acks",
            "requests acknowledged with an empty ACK because their commit was slow",
            self.counters.slow_commit_acks.load(Ordering::Relaxed),
        )?;
        // EST outcomes.
        labelled(
            enc,
            "est_enrollments",
            "enrollment outcomes (sen, sren, skg, skc)",
            "outcome",
            &[
                ("issued", e.issued),
                ("replayed", e.replayed),
                ("refused", e.refused),
                ("overloaded", e.overloaded),
                ("store_unavailable", e.store_unavailable),
                ("rate_limited", e.rate_limited),
                ("ca_unavailable", e.ca_unavailable),
            ],
        )?;
        let by_code: Vec<(&'static str, u64)> = est_proto::est::REFUSAL_CODES
            .iter()
            .copied()
            .zip(e.refusals_by_code)
            .collect();
        labelled(
            enc,
            "est_enrollment_refusals",
            "audited enrollment refusals, by the code answered",
            "code",
            &by_code,
        )?;
        counter(
            enc,
            "est_enrollment_refusals_revoked",
            "enrollments refused because the device is blocked or its certificate revoked",
            e.refused_revoked,
        )?;
        gauge(
            enc,
            "est_enrollments_in_flight",
            "enrollments admitted and not yet answered",
            i64::try_from(self.est.in_flight()).unwrap_or(i64::MAX),
        )?;
        // The store writer: operations / transactions is the group-commit factor.
        counter(
            enc,
            "est_store_transactions",
            "store transactions committed (one fsync each)",
            w.transactions,
        )?;
        counter(
            enc,
            "est_store_operations",
            "operations in them",
            w.operations,
        )?;
        // Revocation and lifetimes.
        gauge(
            enc,
            "est_revocation_generation",
            "the store's revocation generation the handshake checks reflect",
            i64::try_from(r.generation()).unwrap_or(i64::MAX),
        )?;
        let (ca_days, dtls_days) = self.lifetimes.days_left(self.clock.now());
        gauge(
            enc,
            "est_ca_certificate_days_left",
            "days left on the issuing CA certificate",
            ca_days,
        )?;
        if let Some(p384_days) = self.lifetimes.p384_days_left(self.clock.now()) {
            gauge(
                enc,
                "est_ca_p384_certificate_days_left",
                "days left on the P-384 issuing CA certificate ([ca_p384])",
                p384_days,
            )?;
        }
        gauge(
            enc,
            "est_dtls_certificate_days_left",
            "days left on the DTLS server certificate",
            dtls_days,
        )?;
        Ok(())
    }
}

/// The exposition of `sources` (OpenMetrics text, ending with `# EOF`).
pub fn render(sources: &MetricsSources) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(sources.clone()));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "encoding metrics");
    }
    out
}

/// Serve `GET /metrics` on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: MetricsSources,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((mut stream, _)) = conn else {
            continue;
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(10), async {
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                // The request head only (a scrape has no body); 8 KiB at most.
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                }
                let head = String::from_utf8_lossy(&buf);
                let mut parts = head.split_whitespace();
                let (method, path) = (parts.next(), parts.next());
                let (status, ctype, body) = match (method, path) {
                    (Some("GET"), Some(p)) if p == "/metrics" || p.starts_with("/metrics?") => (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        render(&sources),
                    ),
                    (Some("GET"), _) => ("404 Not Found", "text/plain", "try /metrics\n".into()),
                    _ => (
                        "405 Method Not Allowed",
                        "text/plain",
                        "GET /metrics\n".into(),
                    ),
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(reply.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
            if let Ok(Err(e)) = r {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

/// Bind `[metrics] listen`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
