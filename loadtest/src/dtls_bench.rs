//! Deterministic regression benchmark of the DTLS engine (est-dtls): full handshakes between
//! its client mode and an [`Endpoint`] in memory, counted in instructions under valgrind
//! callgrind, per side, so that a change to the engine shows up independent of machine noise.
//!
//! One iteration (what a loadtest meter's session is, minus the EST core and the sockets):
//! * a meter's IDevID (minted by a manufacturer CA, P-256) connects: ClientHello, the
//!   stateless cookie exchange, the full handshake with client authentication, RFC 7627
//!   extended master secret and the server's preferred suite (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8);
//! * the server checks the client chain the way est-server does: the policy's rustls-webpki
//!   path validation (`Policy::verify_peer_chain_with_leaf`), its parse of the leaf handed to
//!   the engine;
//! * one application datagram each way, sized as an enrollment's POST /sen (CSR) and its
//!   answer (certs-only);
//! * close_notify from the meter.
//!
//! The server's side is every call into the endpoint (`dtls_server_*`); the meter's is every
//! call into its client (`dtls_client_*`). `--callgrind` runs this binary under valgrind twice,
//! collecting one side each time.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use est_dtls::{
    CertError, ChainVerifier, Client, ClientConfig, ConnEvent, Endpoint, Event, ServerConfig,
    SigningKey, Verified,
};
use est_proto::ca;
use est_proto::policy::{Policy, PolicyConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::core_bench::{parse_callgrind_total, BenchCas};

/// Bytes of the meter's application datagram (a POST /sen with its CSR, about what the
/// loadtest's meters send) and of the server's answer (certs-only with one certificate).
const REQUEST_BYTES: usize = 420;
const RESPONSE_BYTES: usize = 640;
/// Datagrams exchanged before a handshake is declared stuck.
const MAX_ROUNDS: usize = 64;

fn server_addr() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 5684))
}

fn meter_addr(i: usize) -> SocketAddr {
    let port = 40_000 + u16::try_from(i % 20_000).unwrap_or(0);
    SocketAddr::from(([10, 1, 0, 1], port))
}

/// Server and meters, set up once (outside what is counted).
pub(crate) struct DtlsBench {
    server: Endpoint,
    meters: Vec<Arc<ClientConfig>>,
    now: Instant,
}

impl DtlsBench {
    /// A manufacturer CA, `n` meters with their IDevIDs, the issuing CA and the server's
    /// certificate (issued by it); seeded.
    pub(crate) fn new(n: usize, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let cas = BenchCas::new(&mut rng)?;
        // The server's certificate: an IDevID-shaped end-entity certificate of the issuing CA
        // (the engine reads only its key; the meters' verifier below compares it).
        let (server_cert, server_key) = cas.mint(&cas.issuing, "BENCHSERVER", &mut rng)?;

        // The meters' check of the server: exactly our server's chain.
        let expected = vec![server_cert.clone(), cas.ca_cert.clone()];
        let server_verifier: ChainVerifier = Arc::new(move |chain: &[Vec<u8>]| {
            if chain == expected.as_slice() {
                Ok(Verified {
                    identity: Vec::new(),
                    context: None,
                    leaf: None,
                })
            } else {
                Err(CertError::UnknownCa("not the bench server".into()))
            }
        });
        let mut meters = Vec::with_capacity(n);
        for i in 0..n {
            let serial = format!("BENCH{i:06}");
            let (cert, key) = cas.mint(&cas.maker, &serial, &mut rng)?;
            let key = SigningKey::from_pkcs8(&key).map_err(|e| anyhow::anyhow!("{e}"))?;
            meters.push(Arc::new(ClientConfig::new(
                vec![cert],
                Arc::new(key),
                server_verifier.clone(),
            )));
        }

        // est-server's check of the meters: the policy's path validation, the leaf handed over.
        let policy = Arc::new(Policy::new(
            PolicyConfig::default(),
            std::slice::from_ref(&cas.mfr_cert),
            &cas.ca_cert,
        )?);
        let client_verifier: ChainVerifier = Arc::new(move |chain: &[Vec<u8>]| {
            let (verified, leaf) = policy
                .verify_peer_chain_with_leaf(chain, SystemTime::now())
                .map_err(|e| CertError::BadCertificate(e.to_string()))?;
            let identity = ca::serial_number_attr(&leaf.tbs_certificate.subject)
                .map(String::into_bytes)
                .unwrap_or_default();
            Ok(Verified {
                identity,
                context: Some(Arc::new(verified)),
                leaf: Some(Arc::new(leaf)),
            })
        });
        let key = SigningKey::from_pkcs8(&server_key).map_err(|e| anyhow::anyhow!("{e}"))?;
        let config = ServerConfig::new(
            vec![server_cert, cas.ca_cert.clone()],
            Arc::new(key),
            client_verifier,
        );
        let now = Instant::now();
        let server = Endpoint::new(Arc::new(config), now).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self {
            server,
            meters,
            now,
        })
    }

    /// Runs one session per prepared meter; fails if any does not complete.
    pub(crate) fn run_all(&mut self) -> Result<()> {
        for i in 0..self.meters.len() {
            session_once(self, i)?;
        }
        Ok(())
    }
}

/// Everything the endpoint does with one datagram from a meter.
#[inline(never)]
fn dtls_server_step(
    server: &mut Endpoint,
    now: Instant,
    from: SocketAddr,
    datagram: &[u8],
    out: &mut Vec<Vec<u8>>,
    events: &mut Vec<Event>,
) {
    server.handle(now, from, datagram);
    while let Some(t) = server.poll_transmit() {
        out.push(t.payload);
    }
    while let Some(e) = server.poll_event() {
        events.push(e);
    }
}

/// The endpoint sealing one application datagram to a session.
#[inline(never)]
fn dtls_server_send(
    server: &mut Endpoint,
    now: Instant,
    h: est_dtls::ConnectionHandle,
    data: &[u8],
    out: &mut Vec<Vec<u8>>,
) -> Result<()> {
    server
        .send(now, h, data)
        .map_err(|e| anyhow::anyhow!("server send: {e}"))?;
    while let Some(t) = server.poll_transmit() {
        out.push(t.payload);
    }
    Ok(())
}

#[inline(never)]
fn dtls_client_connect(now: Instant, config: &Arc<ClientConfig>) -> Result<Client> {
    Client::connect(now, server_addr(), Arc::clone(config)).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Everything the meter's client does with one datagram from the server (or, with `None`,
/// what it has queued), and what it then sends.
#[inline(never)]
fn dtls_client_step(
    client: &mut Client,
    now: Instant,
    datagram: Option<&[u8]>,
    out: &mut Vec<Vec<u8>>,
    events: &mut Vec<ConnEvent>,
) {
    if let Some(d) = datagram {
        client.handle_datagram(now, server_addr(), d);
    }
    while let Some(d) = client.poll_transmit() {
        out.push(d);
    }
    while let Some(e) = client.poll_event() {
        events.push(e);
    }
}

#[inline(never)]
fn dtls_client_send(client: &mut Client, now: Instant, data: &[u8]) -> Result<()> {
    client
        .send(now, data)
        .map_err(|e| anyhow::anyhow!("client send: {e}"))
}

#[inline(never)]
fn dtls_client_close(client: &mut Client) {
    client.close();
}

/// What is in flight between the meter and the server during one session, and what each
/// side reported.
#[derive(Default)]
struct Wire {
    to_server: Vec<Vec<u8>>,
    server_events: Vec<Event>,
    client_events: Vec<ConnEvent>,
}

/// Delivers datagrams both ways until neither side has anything to send.
fn pump(bench: &mut DtlsBench, client: &mut Client, from: SocketAddr, w: &mut Wire) -> Result<()> {
    let mut to_client = Vec::new();
    for _ in 0..MAX_ROUNDS {
        dtls_client_step(
            client,
            bench.now,
            None,
            &mut w.to_server,
            &mut w.client_events,
        );
        if w.to_server.is_empty() && to_client.is_empty() {
            return Ok(());
        }
        for d in std::mem::take(&mut w.to_server) {
            dtls_server_step(
                &mut bench.server,
                bench.now,
                from,
                &d,
                &mut to_client,
                &mut w.server_events,
            );
        }
        for d in std::mem::take(&mut to_client) {
            dtls_client_step(
                client,
                bench.now,
                Some(&d),
                &mut w.to_server,
                &mut w.client_events,
            );
        }
    }
    bail!("the exchange did not settle in {MAX_ROUNDS} rounds")
}

/// One meter's session (see the module docs).
pub(crate) fn session_once(bench: &mut DtlsBench, i: usize) -> Result<()> {
    let config = bench.meters.get(i).context("no such meter")?.clone();
    let from = meter_addr(i);
    bench.now += Duration::from_millis(10);
    let mut client = dtls_client_connect(bench.now, &config)?;
    let mut w = Wire::default();
    pump(bench, &mut client, from, &mut w)?;
    let h = match w.server_events.as_slice() {
        [Event::Connected(h)] => *h,
        other => bail!("meter {i}: the handshake ended in {other:?}"),
    };
    if !client.is_established() {
        bail!("meter {i}: the client did not finish its handshake");
    }
    w.server_events.clear();
    w.client_events.clear();

    dtls_client_send(&mut client, bench.now, &[0x42; REQUEST_BYTES])?;
    pump(bench, &mut client, from, &mut w)?;
    match w.server_events.as_slice() {
        [Event::Data(got, d)] if *got == h && d.len() == REQUEST_BYTES => {}
        other => bail!("meter {i}: the server got {other:?} for the request"),
    }
    w.server_events.clear();
    let mut to_client = Vec::new();
    dtls_server_send(
        &mut bench.server,
        bench.now,
        h,
        &[0x24; RESPONSE_BYTES],
        &mut to_client,
    )?;
    for d in to_client {
        dtls_client_step(
            &mut client,
            bench.now,
            Some(&d),
            &mut w.to_server,
            &mut w.client_events,
        );
    }
    match w.client_events.as_slice() {
        [ConnEvent::Data(d)] if d.len() == RESPONSE_BYTES => {}
        other => bail!("meter {i}: the client got {other:?} for the response"),
    }

    dtls_client_close(&mut client);
    pump(bench, &mut client, from, &mut w)?;
    match w.server_events.as_slice() {
        [Event::Closed(got, _)] if *got == h => Ok(()),
        other => bail!("meter {i}: the server saw {other:?} after close_notify"),
    }
}

/// Runs `iterations` sessions natively; microseconds per session (both sides).
pub(crate) fn run_native(iterations: usize) -> Result<f64> {
    let mut b = DtlsBench::new(iterations, 0xd715)?;
    let t = Instant::now();
    b.run_all()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / iterations.max(1) as f64)
}

/// Instructions per session of each side, counted by callgrind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct DtlsCounts {
    pub server: u64,
    pub client: u64,
}

/// Runs `exe dtls-bench --iterations N` under callgrind twice: the server's calls, then the
/// client's.
pub(crate) fn run_callgrind(exe: &Path, iterations: u64, out_dir: &Path) -> Result<DtlsCounts> {
    let mut counts = [0u64; 2];
    for (side, count) in ["server", "client"].iter().zip(counts.iter_mut()) {
        let out_file = out_dir.join(format!("callgrind.dtls-{side}.out"));
        let args = vec![
            "--tool=callgrind".to_string(),
            format!("--toggle-collect=*dtls_{side}_*"),
            format!("--callgrind-out-file={}", out_file.display()),
            exe.display().to_string(),
            "dtls-bench".to_string(),
            "--iterations".to_string(),
            iterations.to_string(),
        ];
        let out = Command::new("valgrind")
            .args(&args)
            .output()
            .context("running valgrind (is it installed?)")?;
        if !out.status.success() {
            bail!(
                "valgrind {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = std::fs::read_to_string(&out_file)
            .with_context(|| format!("reading {}", out_file.display()))?;
        let total = parse_callgrind_total(&text).context("no summary line")?;
        if total == 0 {
            bail!("callgrind counted nothing in dtls_{side}_* (symbols not found?)");
        }
        *count = total / iterations.max(1);
    }
    Ok(DtlsCounts {
        server: counts[0],
        client: counts[1],
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::core_bench::BENCH_HW;
    use est_proto::ca::{IssuingCa, RingP256Signer};

    #[test]
    fn sessions_complete_and_a_stranger_is_refused() {
        let mut b = DtlsBench::new(3, 7).unwrap();
        b.run_all().unwrap();
        // The same meters again: new handshakes on the same endpoint.
        session_once(&mut b, 1).unwrap();
        assert!(session_once(&mut b, 3).is_err());
        // A meter whose IDevID no configured manufacturer issued gets no session.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let wall = SystemTime::now() - Duration::from_secs(60);
        let day = Duration::from_secs(86_400);
        let (cert, key) =
            ca::generate_root_ca("Other Maker", "Other", wall, day, &mut rng).unwrap();
        let other = IssuingCa::new(
            cert,
            Box::new(RingP256Signer::from_pkcs8_der(&key).unwrap()),
        )
        .unwrap();
        let (cert, key) =
            ca::mint_idevid(&other, "STRANGER", BENCH_HW, wall, wall + day, &mut rng).unwrap();
        b.meters[0] = Arc::new(ClientConfig::new(
            vec![cert],
            Arc::new(SigningKey::from_pkcs8(&key).unwrap()),
            b.meters[1].server_verifier.clone(),
        ));
        let err = session_once(&mut b, 0).unwrap_err().to_string();
        assert!(err.contains("handshake ended"), "{err}");
    }
}
