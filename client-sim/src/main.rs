//! `client-sim`: a fleet of virtual smart meters enrolling over EST-coaps (RFC 9148) through emulated
//! narrowband links. See `client-sim --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;

use client_sim::driver::DriverConfig;
use client_sim::dtls::{DtlsBackend, DtlsClientConfig};
use client_sim::fleet::{render_summary, run_fleet, FleetConfig};
use client_sim::link::LinkParams;
use client_sim::meter::{CertFormat, CrtsMode, MeterConfig};
use client_sim::pki::{self, DeviceIdentity, Fleet};
use client_sim::recording::{Recording, RECORD_VERSION};
use client_sim::schedule::{build_schedule, Arrival, FleetPlan};
use est_proto::coap::{ClientConfig, CoapConfig};

fn parse_duration(s: &str) -> Result<Duration, String> {
    client_sim::cli::parse_duration(s, Duration::from_secs(86_400))
}

/// `auto` (None) or a fixed duration.
#[derive(Debug, Clone, Copy)]
struct AutoDuration(Option<Duration>);

fn parse_auto_duration(s: &str) -> Result<AutoDuration, String> {
    if s == "auto" {
        Ok(AutoDuration(None))
    } else {
        parse_duration(s).map(|d| AutoDuration(Some(d)))
    }
}

fn parse_block_size(s: &str) -> Result<u8, String> {
    let n: usize = s.parse().map_err(|_| format!("`{s}`: not a number"))?;
    (0u8..=6).find(|szx| (16usize << szx) == n).ok_or_else(|| {
        format!("`{s}`: block size must be 16, 32, 64, 128, 256, 512 or 1024 (RFC 7959 §2.2)")
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CertEncoding {
    /// DER X.509 (RFC 9148).
    Der,
    /// C509 (draft-ietf-cose-cbor-encoded-cert-20): requests as C509 (CF 65004), the
    /// enrolled certificate as application/cose-c509-cert+cbor (CF 65003), /crts as
    /// application/cose-c509+cbor (COSE_C509, CF 65015); compare bytes per enrollment with
    /// `der`.
    C509,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AcceptFormat {
    /// application/pkcs7-mime; smime-type=certs-only (Content-Format 281, the default).
    Pkcs7,
    /// application/pkix-cert (Content-Format 287).
    Pkix,
}

/// Thousands of virtual smart meters enrolling over EST-coaps (RFC 9148) through emulated narrowband links.
///
/// Each meter has its own IDevID, generates an enrollment key, runs a real DTLS 1.2 handshake
/// (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8, client certificate) and a CoAP client with RFC 7252
/// reliability and RFC 7959 block-wise transfer, then /crts and /sen (optionally discovery first and
/// /sren after), and verifies what it receives. Datagrams pass through a per-meter link emulator
/// (latency, jitter, independent or Gilbert-Elliott loss, rate limit with serialization delay, 802.15.4
/// frame accounting) and optionally a DCU's shared, rate-limited backhaul.
///
/// Link profiles (`--link NAME`, per direction):
///   lan       1 ms, no jitter, no loss, unlimited rate
///   wisun     150 ms, jitter 100 ms, 50 kbit/s, Gilbert-Elliott G->B 0.02 B->G 0.3 loss-in-bad 0.6 (~3.7% mean), queue 16 KiB
///   plc       400 ms, jitter 200 ms, 20 kbit/s, GE G->B 0.05 B->G 0.3 loss-in-bad 0.5 loss-in-good 0.01 (~8% mean), queue 8 KiB
///   cellular  80 ms, jitter 40 ms, 200 kbit/s, 1% independent loss, queue 64 KiB
/// Or `key=value,...` on top of a profile: `plc,loss=0.1` or `loss=0.2,latency=400ms,jitter=100ms,rate=50kbps`
/// (keys: profile, loss, ge=P_GB/P_BG/LOSS_BAD[/LOSS_GOOD], latency, jitter, rate [bps|kbps|mbps|unlimited], queue [bytes]).
///
/// Frame accounting: 127-byte 802.15.4 frames, 25 B MAC header+FCS, 10 B 6LoWPAN IPHC+UDP NHC once per
/// datagram, RFC 4944 fragmentation (FRAG1 4 B, FRAGN 5 B, 8-byte offsets): 92 B of UDP payload fit one
/// frame. The rate limit serializes on-air bytes (payload + all those headers).
///
/// Exit status: 0 when every meter enrolled (and renewed, with --renew); 1 otherwise, after printing the
/// failures by reason; 2 on bad arguments or unreadable inputs.
#[derive(Debug, Parser)]
#[command(name = "client-sim", version, verbatim_doc_comment)]
struct Cli {
    /// EST-coaps server address (DTLS over UDP), or several separated by commas (nodes of one
    /// service): meter i starts on server i mod N, and each new session after a failed one
    /// (a handshake or CoAP timeout, a 5.xx) goes to the next server, so meters fail over
    /// from a node that is down.
    #[arg(long, default_value = "127.0.0.1:5684", value_delimiter = ',', num_args = 1..)]
    server: Vec<SocketAddr>,
    /// Name checked against the server certificate's subjectAltName.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Fleet directory from `est-server factory mint` (fleet.json, <serial>/idevid.pem|key, implicit-ta.pem).
    #[arg(long, required_unless_present = "replay")]
    fleet: Option<PathBuf>,
    /// Trust anchor(s) for the server's DTLS certificate (PEM); default FLEET/implicit-ta.pem.
    #[arg(long)]
    trust_anchor: Option<PathBuf>,
    /// Mint this many IDevIDs in-process with --manufacturer-ca-cert/--manufacturer-ca-key instead of
    /// reading them from the fleet directory (the fleet directory still provides implicit-ta.pem).
    #[arg(long, requires_all = ["manufacturer_ca_cert", "manufacturer_ca_key"])]
    mint: Option<usize>,
    /// Manufacturer CA certificate (PEM) for --mint.
    #[arg(long)]
    manufacturer_ca_cert: Option<PathBuf>,
    /// Manufacturer CA private key (PKCS#8 PEM) for --mint.
    #[arg(long)]
    manufacturer_ca_key: Option<PathBuf>,
    /// Number of meters (default: every device of the fleet).
    #[arg(long)]
    meters: Option<usize>,
    /// Meters in flight at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Arrival pattern: burst | ramp[:DURATION] (default 60s) | poisson[:RATE per second] (default 100).
    #[arg(long, default_value = "burst")]
    arrival: Arrival,
    /// Meter link: a profile (lan, wisun, plc, cellular) or key=value list (see above).
    #[arg(long, default_value = "lan")]
    link: LinkParams,
    /// Mesh hops per meter drawn uniformly in 1..=N; latency and jitter scale with hops.
    #[arg(long, default_value_t = 1)]
    max_hops: u32,
    /// Group meters behind DCUs of K meters each; their traffic also crosses the DCU's shared backhaul.
    #[arg(long)]
    meters_per_dcu: Option<u64>,
    /// The DCU backhaul link (shared by its meters, FIFO, rate-limited).
    #[arg(
        long,
        default_value = "latency=30ms,jitter=10ms,rate=256kbps,queue=65536"
    )]
    dcu_link: LinkParams,
    /// How each DCU carries its meters' traffic: router (the meters' datagrams cross the
    /// backhaul as they are), relay-stateless (est-relay's core in each DCU wraps each datagram
    /// as a JPY message to --jpy-server: +24..38 bytes per datagram) or relay-stateful
    /// (est-relay's core opens a UDP circuit per meter to --server). The relays keep the
    /// defaults of est-relay's configuration, except that the mesh as a whole is not rate
    /// limited and the circuit caps are sized for the DCU's meters. Needs --meters-per-dcu.
    #[arg(
        long,
        value_enum,
        default_value = "router",
        requires = "meters_per_dcu"
    )]
    dcu_mode: client_sim::net::DcuMode,
    /// The server's JPY port (est-server's [relay] jpy_listen), for --dcu-mode relay-stateless.
    #[arg(long)]
    jpy_server: Option<SocketAddr>,
    /// Run seed: decides arrivals, per-meter seeds (keys, CoAP IDs, link draws).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the machine-readable summary (and per-meter outcomes) to FILE.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the schedule (start times, link draws, seeds) and outcomes to FILE.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Re-run the schedule of a recording (its seed, arrivals, links, DCUs) against --server.
    #[arg(long, conflicts_with_all = ["arrival", "link", "seed", "max_hops", "meters_per_dcu", "dcu_link", "dcu_mode"])]
    replay: Option<PathBuf>,
    /// Certificate encoding: of the EST requests and responses, and with --dtls-backend
    /// native of the DTLS handshake's certificates too (c509: offered with RFC 7250's
    /// certificate types, X.509 as the fallback).
    #[arg(long, value_enum, default_value = "der")]
    format: CertEncoding,
    /// CoAP token length of the meters' requests, 0..=8 bytes (RFC 7252 §5.3.1 allows short
    /// ones for requests made one at a time; over DTLS they need not resist guessing).
    #[arg(long, default_value_t = 4)]
    coap_token_bytes: usize,
    /// End sessions without close_notify (--dtls-backend native): the server closes them at
    /// its idle timeout. One datagram less per session.
    #[arg(long)]
    no_close_notify: bool,
    /// The TLS certificate type number for C509 in the handshake (the draft's TBD5 is
    /// unassigned; est-server's `dtls.c509_certificate_type`, a Private Use value); 0 keeps
    /// the handshake's certificates X.509 with --format c509.
    #[arg(long, default_value_t = 224)]
    c509_cert_type: u8,
    /// Response format requested with Accept.
    #[arg(long, value_enum, default_value = "pkcs7")]
    accept: AcceptFormat,
    /// Start with resource discovery (GET /.well-known/core?rt=ace.est*).
    #[arg(long)]
    discovery: bool,
    /// After enrolling, re-enroll (/sren) authenticated with the new LDevID.
    #[arg(long)]
    renew: bool,
    /// CoAP ACK_TIMEOUT (RFC 7252 §4.8): `auto` derives it per meter from its path (1.5 x the
    /// worst-case round trip of a block-sized request and response, 2..20 s; the RFC's 2 s on
    /// fast links), or a duration such as 2s. Retransmissions double it (RFC 7252 §4.2).
    #[arg(long, default_value = "auto", value_parser = parse_auto_duration)]
    ack_timeout: AutoDuration,
    /// CoAP ACK_RANDOM_FACTOR.
    #[arg(long, default_value_t = 1.5)]
    ack_random_factor: f64,
    /// CoAP MAX_RETRANSMIT.
    #[arg(long, default_value_t = 4)]
    max_retransmit: u32,
    /// Block1 and Block2 size in bytes (16..1024); Block2 is negotiated early (RFC 9148 App. B.2).
    #[arg(long, default_value = "1024", value_parser = parse_block_size)]
    block_size: u8,
    /// Sessions per meter before a retryable failure (handshake, CoAP timeout, 5.xx) is final.
    #[arg(long, default_value_t = 4)]
    attempts: u32,
    /// Backoff before a new session: doubles per attempt, plus up to 50% jitter.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    retry_backoff: Duration,
    /// 5.03 + Max-Age answers honoured per meter before giving up.
    #[arg(long, default_value_t = 8)]
    max_busy_retries: u32,
    /// Cap on one Max-Age wait.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    max_retry_after: Duration,
    /// Give up on one DTLS handshake attempt after this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// DTLS flight retransmission interval: webrtc-dtls's fixed interval (no backoff in that
    /// library), dimpl's initial timer (doubled on each expiry); `auto` derives it per meter from
    /// its path (1.5 x worst-case RTT of a full flight, 2..20 s, and a handshake timeout of at
    /// least 8 intervals), or a duration such as 2s.
    #[arg(long, default_value = "auto", value_parser = parse_auto_duration)]
    dtls_flight_interval: AutoDuration,
    /// DTLS MTU: handshake messages are fragmented to this size.
    #[arg(long, default_value_t = 1152)]
    dtls_mtu: usize,
    /// The meters' DTLS client library: native (the default) is our own engine's client mode
    /// (est-dtls): CCM_8, exponential back-off from --dtls-flight-interval, small
    /// ClientHellos, Connection ID with --dtls-connection-id, RFC 7924 cached_info with
    /// --cached-info, C509 certificates with --format c509. webrtc (webrtc-dtls; a fixed
    /// retransmission interval, no back-off), openssl (system OpenSSL 3; retransmits on
    /// OpenSSL's own 1 s doubling timer, so --dtls-flight-interval does not apply to it) or
    /// dimpl (sans-IO, ring crypto; negotiates TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 instead
    /// of CCM_8 and sends the leaf certificate only). openssl and dimpl are in the build only
    /// with the cargo features openssl-backend and dimpl-backend.
    #[arg(long, value_enum, default_value_t = DtlsBackend::Native)]
    dtls_backend: DtlsBackend,
    /// Offer a DTLS Connection ID (RFC 9146; --dtls-backend native): sessions survive a
    /// change of the meter's source address.
    #[arg(long)]
    dtls_connection_id: bool,
    /// RFC 7924 cached_info (--dtls-backend native): a meter that holds the server's
    /// certificate (from --server-cert, or the one it received in its previous handshake)
    /// names it by its SHA-256 fingerprint, and the server sends the fingerprint instead.
    #[arg(long)]
    cached_info: bool,
    /// The server's certificate chain (PEM, as the server sends it) every meter holds from
    /// provisioning, for --cached-info.
    #[arg(long)]
    server_cert: Option<PathBuf>,
    /// Certificates (PEM) appended to every meter's IDevID in its DTLS Certificate message,
    /// as meters that send their chain do (e.g. the fleet's manufacturer-ca.pem); by default
    /// a meter sends its IDevID alone.
    #[arg(long)]
    idevid_chain: Option<PathBuf>,
    /// When meters ask /crts for their Explicit TA database: always (every session, before
    /// /sen and /sren), once (the first enrollment; kept, so retries and renewals skip it) or
    /// never (held already: --explicit-ta, default the Implicit TA database).
    #[arg(long, value_enum, default_value = "once")]
    crts: CrtsMode,
    /// The Explicit TA database (PEM) meters hold with --crts never.
    #[arg(long)]
    explicit_ta: Option<PathBuf>,
    /// NAT rebinding: once per meter, right after its first EST request goes out, its
    /// datagrams start leaving from a new source port. With --dtls-connection-id (native
    /// backend) the session carries on; without, the server no longer knows the meter and it
    /// needs a new handshake (counted in the summary's handshakes and session retries).
    #[arg(long)]
    nat_rebind: bool,
    /// EST root path (without discovery).
    #[arg(long, default_value = "/.well-known/est")]
    est_root: String,
    /// Local address for the meters' sockets.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// `A,B,...` as given to --server.
fn servers_text(servers: &[SocketAddr]) -> String {
    servers
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn mint_fleet(cli: &Cli, n: usize, seed: u64) -> Result<Vec<DeviceIdentity>> {
    use est_proto::ca::{IssuingCa, RingP256Signer};
    use rand::SeedableRng;
    let (Some(cert), Some(key)) = (&cli.manufacturer_ca_cert, &cli.manufacturer_ca_key) else {
        bail!("--mint needs --manufacturer-ca-cert and --manufacturer-ca-key");
    };
    let cert_der = pki::load_cert_chain(cert)?
        .into_iter()
        .next()
        .context("manufacturer CA certificate")?;
    let key_der = pki::load_pkcs8_key(key)?;
    let signer = RingP256Signer::from_pkcs8_der(&key_der).context("manufacturer CA key")?;
    let ca = IssuingCa::new(cert_der, Box::new(signer)).context("manufacturer CA")?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x6d696e74);
    let now = SystemTime::now() - Duration::from_secs(3600);
    let hw_type = est_proto::ca::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.55555.1.1");
    (0..n)
        .map(|i| {
            let serial = format!("SIM{i:07}");
            let (cert, key) = est_proto::ca::mint_idevid(
                &ca,
                &serial,
                hw_type,
                now,
                now + Duration::from_secs(86_400 * 365 * 20),
                &mut rng,
            )
            .with_context(|| format!("minting {serial}"))?;
            Ok(DeviceIdentity {
                serial,
                cert_chain_der: vec![cert],
                key_pkcs8_der: key,
            })
        })
        .collect()
}

async fn run(cli: Cli) -> Result<bool> {
    let replay = match &cli.replay {
        Some(p) => Some(Recording::read(p)?),
        None => None,
    };
    // Devices.
    let fleet: Option<Fleet> = match (&cli.fleet, cli.mint) {
        (Some(dir), None) => Some(pki::load_fleet(dir, cli.meters)?),
        _ => None,
    };
    let mut devices: Vec<DeviceIdentity> = match (&fleet, cli.mint) {
        (Some(f), _) => f.devices.clone(),
        (None, Some(n)) => mint_fleet(&cli, cli.meters.unwrap_or(n).min(n), cli.seed)?,
        (None, None) => bail!("--fleet DIR (or --mint N with a manufacturer CA) is required"),
    };
    if let Some(p) = &cli.idevid_chain {
        let extra = pki::load_cert_chain(p)?;
        for d in &mut devices {
            d.cert_chain_der.extend(extra.iter().cloned());
        }
    }
    // Trust anchors.
    let ta = match (&cli.trust_anchor, &fleet, &cli.fleet) {
        (Some(p), _, _) => pki::load_cert_chain(p)?,
        (None, Some(f), _) if !f.implicit_ta_der.is_empty() => f.implicit_ta_der.clone(),
        (None, _, Some(dir)) if dir.join("implicit-ta.pem").exists() => {
            pki::load_cert_chain(&dir.join("implicit-ta.pem"))?
        }
        _ => bail!("no trust anchor for the server: give --trust-anchor FILE or put implicit-ta.pem in the fleet directory"),
    };

    // Schedule: recorded, or from the seed.
    let (plans, rec_base) = match replay {
        Some(rec) => {
            // Match recorded serials to devices.
            let by_serial: std::collections::HashMap<&str, &DeviceIdentity> =
                devices.iter().map(|d| (d.serial.as_str(), d)).collect();
            let mut ordered = Vec::with_capacity(rec.meters.len());
            for m in &rec.meters {
                let d = by_serial
                    .get(m.serial.as_str())
                    .with_context(|| format!("recorded meter {} is not in the fleet", m.serial))?;
                ordered.push((*d).clone());
            }
            devices = ordered;
            (rec.meters.clone(), rec)
        }
        None => {
            if let Some(n) = cli.meters {
                if n > devices.len() {
                    bail!(
                        "--meters {n} but the fleet has only {} devices",
                        devices.len()
                    );
                }
                devices.truncate(n);
            }
            let plan = FleetPlan {
                arrival: cli.arrival,
                link: cli.link.clone(),
                max_hops: cli.max_hops.max(1),
                meters_per_dcu: cli.meters_per_dcu,
            };
            let serials: Vec<String> = devices.iter().map(|d| d.serial.clone()).collect();
            let plans = build_schedule(&plan, &serials, cli.seed);
            let rec = Recording {
                version: RECORD_VERSION,
                seed: cli.seed,
                arrival: cli.arrival,
                link: cli.link.clone(),
                max_hops: plan.max_hops,
                meters_per_dcu: cli.meters_per_dcu,
                dcu_link: cli.dcu_link.clone(),
                dcu_mode: cli.dcu_mode,
                server: servers_text(&cli.server),
                meters: Vec::new(),
                outcomes: Vec::new(),
                summary: None,
            };
            (plans, rec)
        }
    };

    if rec_base.dcu_mode == client_sim::net::DcuMode::RelayStateless && cli.jpy_server.is_none() {
        bail!("--dcu-mode relay-stateless needs --jpy-server (est-server's [relay] jpy_listen)");
    }
    let coap = ClientConfig {
        coap: CoapConfig {
            ack_timeout: cli.ack_timeout.0.unwrap_or(Duration::from_secs(2)),
            ack_random_factor: cli.ack_random_factor,
            max_retransmit: cli.max_retransmit,
            ..CoapConfig::default()
        },
        block1_szx: cli.block_size,
        block2_szx: Some(cli.block_size),
        max_response_body_bytes: 64 * 1024,
        token_len: cli.coap_token_bytes,
    };
    coap.validate().context("CoAP parameters")?;
    let Some((&server, failover)) = cli.server.split_first() else {
        bail!("--server: no address");
    };
    let cfg = FleetConfig {
        concurrency: cli.concurrency.max(1),
        driver: DriverConfig {
            server,
            failover: failover.to_vec(),
            bind: cli.bind,
            dtls: DtlsClientConfig {
                trust_anchors_der: ta.clone(),
                server_name: cli.server_name.clone(),
                mtu: cli.dtls_mtu,
                flight_interval: cli.dtls_flight_interval.0.unwrap_or(Duration::from_secs(2)),
                flight_interval_auto: cli.dtls_flight_interval.0.is_none(),
                handshake_timeout: cli.handshake_timeout,
                danger_skip_server_verification: false,
                backend: cli.dtls_backend,
                connection_id: cli.dtls_connection_id,
                cached_info: cli.cached_info,
                c509_certificate_type: (cli.format == CertEncoding::C509
                    && cli.c509_cert_type != 0)
                    .then_some(cli.c509_cert_type),
                close_notify: !cli.no_close_notify,
                server_chain_der: match &cli.server_cert {
                    Some(p) => pki::load_cert_chain(p)?,
                    None => Vec::new(),
                },
                ..DtlsClientConfig::default()
            },
            coap,
            ack_timeout_auto: cli.ack_timeout.0.is_none(),
            nat_rebind: cli.nat_rebind,
        },
        meter: MeterConfig {
            discovery: cli.discovery,
            renew: cli.renew,
            accept: match (cli.format, cli.accept) {
                (CertEncoding::C509, _) => CertFormat::C509,
                (_, AcceptFormat::Pkcs7) => CertFormat::Pkcs7,
                (_, AcceptFormat::Pkix) => CertFormat::PkixCert,
            },
            c509_requests: cli.format == CertEncoding::C509,
            max_attempts: cli.attempts.max(1),
            retry_backoff: cli.retry_backoff,
            max_busy_retries: cli.max_busy_retries,
            max_retry_after: cli.max_retry_after,
            est_root: cli.est_root.clone(),
            crts: cli.crts,
            explicit_ta_der: match (&cli.explicit_ta, cli.crts) {
                (Some(p), _) => pki::load_cert_chain(p)?,
                (None, CrtsMode::Never) => ta.clone(),
                (None, _) => Vec::new(),
            },
            key_source: client_sim::meter::KeySource::Seeded,
        },
        dcu_link: rec_base.dcu_link.clone(),
        dcu_mode: rec_base.dcu_mode,
        jpy_server: cli.jpy_server,
        progress: !cli.no_progress,
    };
    eprintln!(
        "client-sim: {} meters -> coaps://{} (seed {}, arrival {:?}, link {}, concurrency {}{})",
        plans.len(),
        servers_text(&cli.server),
        rec_base.seed,
        rec_base.arrival,
        rec_base.link,
        cfg.concurrency,
        rec_base
            .meters_per_dcu
            .map(|k| format!(", {k} meters per DCU over {}", rec_base.dcu_link))
            .unwrap_or_default()
    );
    let result = run_fleet(plans.clone(), devices, cfg, rec_base.seed).await;
    print!("{}", render_summary(&result.summary));
    let all_ok = result.summary.enrolled == result.summary.meters
        && (!cli.renew || result.summary.renewed == result.summary.meters);

    let seed = rec_base.seed;
    if let Some(path) = &cli.json {
        let doc = serde_json::json!({
            "seed": rec_base.seed,
            "server": servers_text(&cli.server),
            "summary": result.summary,
            "meters": result.outcomes,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &cli.record {
        let rec = Recording {
            meters: plans,
            outcomes: result.outcomes.clone(),
            summary: Some(result.summary.clone()),
            server: servers_text(&cli.server),
            ..rec_base
        };
        rec.write(path)?;
    }
    if !all_ok {
        eprintln!(
            "client-sim: {} of {} meters did not enroll (seed {}); failures by reason:",
            result.summary.failed, result.summary.meters, seed
        );
        for (reason, n) in &result.summary.failures_by_reason {
            eprintln!("  {reason}: {n}");
        }
    }
    Ok(all_ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.dtls_backend.ensure_compiled_in() {
        eprintln!("client-sim: {e}");
        return ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLIENT_SIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("client-sim: tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("client-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}
