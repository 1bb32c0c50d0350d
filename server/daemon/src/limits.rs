//! The worst-case memory a configuration lets remote peers make the server hold: the formula of
//! docs/limits.md ("What they add up to"), in one place. docs/limits.md shows it for the
//! defaults (`est-server` on `Config::default()`: ~4.1 GiB); `tests/memory_bound.rs` drives a
//! server with scaled-down limits to them and holds its resident memory to this bound.
//!
//! Every term is a setting of the configuration or a constant named with its source. The bound
//! is deliberately loose where the parts overlap: `dtls.max_sessions` counts handshakes in
//! progress too, and both are counted in full here.

use crate::config::Config;

/// An idle established session: the engine's connection plus the session task, *measured*:
/// 10,000 held sessions, 119 MB RSS with the process's base included (11.2 kB each,
/// docs/benchmarks.md), 133.6 MB in the latest run (commit 0b07aed): 14 KiB keeps the larger.
pub const IDLE_SESSION_BYTES: u64 = 14 * 1024;

/// What one remembered or pending CoAP message adds to its payload: header, token, options.
pub const COAP_MESSAGE_OVERHEAD_BYTES: u64 = 100;

/// The Block2 body of one EST response a session holds while the meter fetches it (/crts,
/// /sen, /sren answers are a few hundred bytes to ~2 KiB; a large CRL is its own size).
pub const BLOCK2_BODY_BYTES: u64 = 2 * 1024;

/// Handshake messages one handshake reassembles at once: the next one and those after it up to
/// `MAX_MESSAGES_AHEAD` = 8 (server/dtls/src/reassembly.rs), each up to the engine's
/// `max_handshake_message_bytes` (16 KiB).
pub const HANDSHAKE_MESSAGES_BUFFERED: u64 = 8;

/// Records of the next epoch a handshake buffers early, before the peer's ChangeCipherSpec
/// (`est_dtls::MAX_FUTURE_RECORDS`, server/dtls/src/conn.rs): a peer past the cookie can fill
/// them at once, without keys.
pub const FUTURE_RECORDS: u64 = est_dtls::MAX_FUTURE_RECORDS as u64;
/// One buffered record of the next epoch: the largest record fragment the engine parses
/// (`est_dtls::wire::MAX_CIPHERTEXT_LEN`, 2^14 + 2048 = 18 KiB); its CID (`dtls.cid_length`)
/// is added per configuration.
pub const FUTURE_RECORD_BYTES: u64 = est_dtls::wire::MAX_CIPHERTEXT_LEN as u64;

/// The handshake transcript (every message so far, each under the same message limit) and the
/// handshake's keys and own flight.
pub const HANDSHAKE_TRANSCRIPT_BYTES: u64 = 64 * 1024;
pub const HANDSHAKE_KEYS_AND_FLIGHT_BYTES: u64 = 4 * 1024;

/// Server-wide, per enrollment in flight: the certificate and its audit row beside the CSR.
pub const ENROLLMENT_EXTRA_BYTES: u64 = 2 * 1024;

/// The largest datagram the driver reads from its socket (`RECV_BUFFER_BYTES`,
/// server/daemon/src/transport/server.rs): what one datagram in a shard's inbox can hold.
pub const MAX_DATAGRAM_BYTES: u64 = 65_536;

/// The worst case of a configuration, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBound {
    /// One established session at all its limits.
    pub per_session: u64,
    /// `dtls.max_sessions`.
    pub sessions: u64,
    /// One half-open handshake at all its limits.
    pub per_half_open: u64,
    /// `dtls.max_half_open_handshakes`.
    pub half_open: u64,
    /// Server-wide: enrollments in flight, the driver's command queues (datagrams to send) and,
    /// with `engine_shards` > 1, the shards' inboxes.
    pub server_wide: u64,
}

impl MemoryBound {
    /// The whole bound: sessions, half-open handshakes and the server-wide part.
    pub fn total(&self) -> u64 {
        self.per_session
            .saturating_mul(self.sessions)
            .saturating_add(self.per_half_open.saturating_mul(self.half_open))
            .saturating_add(self.server_wide)
    }
}

fn bytes(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The bound docs/limits.md derives, for `cfg`.
pub fn memory_bound(cfg: &Config) -> MemoryBound {
    let coap = &cfg.coap;
    let body = bytes(coap.max_request_body_bytes);
    // The largest block either way, plus its message's header and options.
    let block = 1u64 << (u32::from(coap.max_block1_szx.max(coap.max_block2_szx)) + 4);
    let message = block + COAP_MESSAGE_OVERHEAD_BYTES;
    let pending = bytes(coap.max_pending_requests);
    let per_session = IDLE_SESSION_BYTES
        // Block1 reassembly.
        + body
        // Requests being worked on, each holding its body.
        + pending.saturating_mul(body)
        // Duplicate detection: one remembered answer each.
        + bytes(coap.max_dedup_entries).saturating_mul(message)
        + BLOCK2_BODY_BYTES
        // Separate responses awaiting their ACK: bounded like the pending set.
        + pending.saturating_mul(message)
        // The driver's queue of the session.
        + bytes(cfg.dtls.session_queue_bytes);
    let max_message = u64::from(est_dtls::Limits::default().max_handshake_message_bytes);
    let per_half_open = HANDSHAKE_MESSAGES_BUFFERED * max_message
        // Early records of the next epoch, each with the CID it came under.
        + FUTURE_RECORDS * (FUTURE_RECORD_BYTES + bytes(cfg.dtls.cid_length))
        + HANDSHAKE_TRANSCRIPT_BYTES
        + HANDSHAKE_KEYS_AND_FLIGHT_BYTES;
    let d = &cfg.dtls;
    // Each engine shard has its share of every cap, rounded up.
    let shards = bytes(d.engine_shards.max(1));
    let shared_out = |cap: usize| bytes(cap).div_ceil(shards).saturating_mul(shards);
    let inboxes = if shards > 1 {
        shards
            .saturating_mul(bytes(d.shard_inbox_datagrams))
            .saturating_mul(MAX_DATAGRAM_BYTES)
    } else {
        0
    };
    let server_wide = bytes(cfg.est.max_concurrent_enrollments)
        .saturating_mul(bytes(cfg.est.max_csr_bytes) + ENROLLMENT_EXTRA_BYTES)
        .saturating_add(
            shards
                .saturating_mul(bytes(d.command_queue_len))
                .saturating_mul(bytes(d.mtu_bytes)),
        )
        .saturating_add(inboxes);
    MemoryBound {
        per_session,
        sessions: shared_out(d.max_sessions),
        per_half_open,
        half_open: shared_out(d.max_half_open_handshakes),
        server_wide,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const GIB: f64 = (1u64 << 30) as f64;

    #[test]
    fn the_defaults_give_the_figures_docs_limits_md_shows() {
        let b = memory_bound(&Config::default());
        // 14 + 16 + 4 x 16 + 64 x 1.1 + 2 + 4 x 1.1 + 32 KiB.
        assert_eq!(
            b.per_session,
            14 * KIB + 16 * KIB + 64 * KIB + 64 * 1124 + 2 * KIB + 4 * 1124 + 32 * KIB
        );
        assert!((195 * KIB..205 * KIB).contains(&b.per_session), "{b:?}");
        assert_eq!(
            b.per_half_open,
            8 * 16 * KIB + 4 * (18 * KIB + 4) + 64 * KIB + 4 * KIB
        );
        assert_eq!((b.sessions, b.half_open), (20_000, 1_024));
        assert_eq!(b.server_wide, 256 * 6 * KIB + 4096 * 1152);
        let total = b.total() as f64 / GIB;
        assert!((4.0..4.2).contains(&total), "{total} GiB");
    }

    #[test]
    fn every_setting_it_names_moves_it() {
        let base = memory_bound(&Config::default()).total();
        let mut c = Config::default();
        c.dtls.max_sessions /= 2;
        assert!(memory_bound(&c).total() < base);
        let mut c = Config::default();
        c.dtls.session_queue_bytes = 4 * KIB as usize;
        assert_eq!(
            memory_bound(&c).per_session + 28 * KIB,
            memory_bound(&Config::default()).per_session
        );
        let mut c = Config::default();
        c.coap.max_pending_requests = 1;
        c.coap.max_dedup_entries = 8;
        assert!(memory_bound(&c).per_session < 100 * KIB);
        // Pending requests: each holds up to a whole body and a separate response.
        let d = memory_bound(&Config::default());
        let block_message = 1024 + COAP_MESSAGE_OVERHEAD_BYTES;
        let mut c = Config::default();
        c.coap.max_pending_requests += 1;
        assert_eq!(
            memory_bound(&c).per_session - d.per_session,
            16 * KIB + block_message
        );
        // The body limit: Block1 reassembly plus each pending request's body.
        let mut c = Config::default();
        c.coap.max_request_body_bytes += 1024;
        assert_eq!(memory_bound(&c).per_session - d.per_session, (1 + 4) * KIB);
        // Early records of the next epoch carry the CID.
        let mut c = Config::default();
        c.dtls.cid_length = 8;
        assert_eq!(
            memory_bound(&c).per_half_open - d.per_half_open,
            FUTURE_RECORDS * 4
        );
        // Shards: caps rounded up to a multiple of the shards, and their inboxes.
        let mut c = Config::default();
        c.dtls.engine_shards = 3;
        let b = memory_bound(&c);
        assert_eq!((b.sessions, b.half_open), (20_001, 1_026));
        assert_eq!(
            b.server_wide,
            256 * 6 * KIB + 3 * 4096 * 1152 + 3 * 1024 * 65_536
        );
        let mut c = Config::default();
        c.dtls.max_half_open_handshakes = 1;
        assert_eq!(
            base - memory_bound(&c).total(),
            1023 * memory_bound(&c).per_half_open
        );
    }
}
