//! The store contract: one suite of cases, run against every backend (SQLite, and PostgreSQL
//! on a throwaway cluster from est-test-tools), so that what the EST core and the operator
//! commands rely on holds the same on both.
//!
//! Covered: certificates round-trip; the request digest that makes a retry idempotent;
//! supersession (one active certificate per device) and the re-enrollment that lost a race;
//! audit rows; the device allowlist; the queries of `certs list`, `certs show` and `audit`;
//! durability across close and reopen; concurrent commits (grouped, all durable) and
//! concurrent commits for one device; revocation (once, audited, the generation, the CRL's
//! entries), device blocks, the commit-time refusal after a block or revocation, the
//! per-device issuance window, cRLNumbers and the latest CRL; DLMS certificate slots (two
//! active side by side, supersession and idempotent retries per slot, the /sren race per slot);
//! the certificate profile recorded with each certificate (what /sren keeps).
//!
//! PostgreSQL only (what SQLite cannot have): two stores on one database standing for two
//! nodes (cross-node idempotency, the /sren race; a revocation or block on one node seen by
//! the other, cRLNumbers never handed out twice, blocks racing issuances, DLMS slots racing
//! across nodes), the schema migrations (a version 1 database brought up to date, and the
//! previous release's issuance function still right after it), and an outage of the database
//! (errors, never a false "committed", then recovery).

#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use est_proto::store::{
    commit_and_wait, AuditEvent, BlockOutcome, CertStatus, Commit, CommitOutcome, CommitResult,
    CrlRecord, DeviceBlock, IssuanceKind, IssuanceWindow, IssuedCert, Revocation, RevocationReason,
    RevokeOutcome, RevokedEntry, Store, StoreError,
};
use est_server::store::postgres::{PgSettings, PgStore, MIGRATIONS};
use est_server::store::{ServerStore, SqliteStore};
use est_test_tools::pg::TestPostgres;

/// A store under test and how to open it again (a restart of the node).
struct Fixture {
    store: Arc<dyn ServerStore>,
    reopen: Box<dyn Fn() -> Arc<dyn ServerStore>>,
}

type Case = (&'static str, fn(&mut Fixture));

const CASES: &[Case] = &[
    (
        "an issued certificate reads back whole",
        issued_certificate_reads_back,
    ),
    (
        "a retried request gets the first certificate",
        retried_request_is_idempotent,
    ),
    (
        "a new request supersedes the device's certificate",
        supersession,
    ),
    (
        "a re-enrollment whose certificate was superseded meanwhile is refused",
        reenroll_race_outcomes,
    ),
    ("audit rows, newest first", audit_rows),
    ("the device allowlist", allowlist),
    ("certs list and certs show", list_and_show),
    (
        "everything survives close and reopen; a closed store refuses",
        durable_across_reopen,
    ),
    ("concurrent commits are all durable", concurrent_commits),
    (
        "concurrent commits for one device leave one active certificate",
        one_device_races,
    ),
    (
        "revoke: once, audited, generation bumped, listed for the CRL",
        revocation,
    ),
    (
        "block a device: its certificates revoked unless kept, blocklist",
        device_blocks,
    ),
    (
        "an issuance after a block or a revocation is refused at commit",
        commit_refused_after_block_or_revocation,
    ),
    (
        "issued_since counts a device's issuances",
        issued_since_window,
    ),
    (
        "cRLNumbers grow; the latest CRL is kept; all survive reopen",
        crl_numbers_and_records,
    ),
    (
        "DLMS slots: both active, a renewal supersedes only its slot, a retry per slot",
        slots_side_by_side,
    ),
    ("DLMS slots: the /sren race within one slot", slot_races),
    (
        "the certificate profile is recorded, read back by every lookup, survives reopen",
        profiles_recorded,
    ),
];

fn cert(serial: &str, device: &str, digest: u8, issued_at: i64) -> IssuedCert {
    IssuedCert {
        serial_hex: serial.into(),
        device_id: device.into(),
        subject: format!("CN={device},serialNumber={device}"),
        der: vec![0x30, 0x03, 0x02, 0x01, digest],
        request_digest: [digest; 32],
        not_before_unix: 1_700_000_000,
        not_after_unix: 1_800_000_000,
        issued_at_unix: issued_at,
        status: CertStatus::Active,
        kind: IssuanceKind::Enroll,
        replaces_serial_hex: None,
        slot: String::new(),
        profile: String::new(),
    }
}

fn renewal(serial: &str, replaces: &str, device: &str, digest: u8, issued_at: i64) -> IssuedCert {
    IssuedCert {
        kind: IssuanceKind::Reenroll,
        replaces_serial_hex: Some(replaces.into()),
        ..cert(serial, device, digest, issued_at)
    }
}

/// A DLMS meter's certificate in `slot` (the signing or key-agreement one).
fn in_slot(c: IssuedCert, slot: &str) -> IssuedCert {
    IssuedCert {
        slot: slot.into(),
        ..c
    }
}

const SIGNING: &str = "dlms-signing";
const KEY_AGREEMENT: &str = "dlms-key-agreement";

/// The active certificates of `device`, as (slot, serial), sorted.
fn active_slots(s: &dyn ServerStore, device: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = s
        .list_certificates(100_000)
        .expect("list")
        .into_iter()
        .filter(|c| c.device_id == device && c.status == CertStatus::Active)
        .map(|c| (c.slot, c.serial_hex))
        .collect();
    v.sort();
    v
}

fn audit(device: &str, op: &str, outcome: &str, at: i64) -> AuditEvent {
    AuditEvent {
        at_unix: at,
        peer: "127.0.0.1:40001".into(),
        relay: None,
        device_id: device.into(),
        operation: op.into(),
        outcome: outcome.into(),
        code: if outcome == "refused" { "4.03" } else { "2.04" }.into(),
        detail: format!("{op} {outcome}"),
    }
}

fn issue(s: &dyn ServerStore, c: IssuedCert) -> CommitResult {
    let a = audit(&c.device_id, "sen", "issued", c.issued_at_unix);
    commit_and_wait(
        s,
        Commit::Issuance {
            cert: Box::new(c),
            audit: a,
        },
    )
}

fn committed(r: CommitResult) {
    assert_eq!(r.expect("commit"), CommitOutcome::Committed);
}

fn status(s: &dyn ServerStore, serial: &str) -> CertStatus {
    s.find_by_serial(serial)
        .expect("read")
        .unwrap_or_else(|| panic!("{serial} not stored"))
        .status
}

fn active_of(s: &dyn ServerStore, device: &str) -> Vec<String> {
    s.list_certificates(100_000)
        .expect("list")
        .into_iter()
        .filter(|c| c.device_id == device && c.status == CertStatus::Active)
        .map(|c| c.serial_hex)
        .collect()
}

// ---- the cases ----

fn issued_certificate_reads_back(f: &mut Fixture) {
    let s = f.store.as_ref();
    let c = cert("0a01", "SN1", 1, 100);
    committed(issue(s, c.clone()));
    assert_eq!(s.find_by_serial("0a01").unwrap(), Some(c.clone()));
    assert_eq!(s.find_by_request("SN1", &[1; 32]).unwrap(), Some(c.clone()));
    assert_eq!(s.find_by_request("SN1", &[2; 32]).unwrap(), None);
    assert_eq!(s.find_by_request("SN2", &[1; 32]).unwrap(), None);
    assert_eq!(s.find_by_serial("0a02").unwrap(), None);
    assert_eq!(s.count_certificates().unwrap(), 1);
    // The issuance's audit row is part of the same commit.
    let a = s.recent_audit(10).unwrap();
    assert_eq!(a, vec![audit("SN1", "sen", "issued", 100)]);
    // ... with the relay an issuance came through, and the next one without (a relayed
    // commit leaves nothing behind for the next).
    let relayed = cert("0a03", "SN3", 3, 102);
    let relayed_audit = AuditEvent {
        relay: Some("[2001:db8::7]:7634".into()),
        ..audit("SN3", "sen", "issued", 102)
    };
    committed(commit_and_wait(
        s,
        Commit::Issuance {
            cert: Box::new(relayed),
            audit: relayed_audit.clone(),
        },
    ));
    committed(issue(s, cert("0a04", "SN4", 4, 103)));
    let a = s.recent_audit(2).unwrap();
    assert_eq!(a, vec![audit("SN4", "sen", "issued", 103), relayed_audit]);
    // Every kind round-trips.
    for (i, kind) in [IssuanceKind::Reenroll, IssuanceKind::ServerKeygen]
        .into_iter()
        .enumerate()
    {
        let c = IssuedCert {
            kind,
            replaces_serial_hex: Some("ffff".into()),
            ..cert(&format!("0b0{i}"), &format!("K{i}"), 9, 101)
        };
        committed(issue(s, c.clone()));
        assert_eq!(s.find_by_serial(&c.serial_hex).unwrap(), Some(c));
    }
}

fn retried_request_is_idempotent(f: &mut Fixture) {
    let s = f.store.as_ref();
    committed(issue(s, cert("01", "SN1", 1, 100)));
    // Same device, same request (a retry that raced the first): the first certificate comes
    // back and nothing is written, audit included.
    match issue(s, cert("02", "SN1", 1, 101)).unwrap() {
        CommitOutcome::AlreadyIssued(c) => assert_eq!(c, cert("01", "SN1", 1, 100)),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.find_by_serial("02").unwrap(), None);
    assert_eq!(s.count_certificates().unwrap(), 1);
    assert_eq!(s.recent_audit(10).unwrap().len(), 1);
    // The digest is unique per device, not globally.
    committed(issue(s, cert("03", "SN2", 1, 102)));
    assert_eq!(status(s, "01"), CertStatus::Active);
    assert_eq!(status(s, "03"), CertStatus::Active);
    // A retry of an older request is still answered from the store after a newer one.
    committed(issue(s, cert("04", "SN1", 4, 103)));
    match issue(s, cert("05", "SN1", 1, 104)).unwrap() {
        CommitOutcome::AlreadyIssued(c) => {
            assert_eq!(c.serial_hex, "01");
            assert_eq!(c.status, CertStatus::Superseded);
        }
        other => panic!("{other:?}"),
    }
}

fn supersession(f: &mut Fixture) {
    let s = f.store.as_ref();
    committed(issue(s, cert("01", "SN1", 1, 100)));
    committed(issue(s, cert("02", "SN2", 2, 100)));
    committed(issue(s, cert("03", "SN1", 3, 101)));
    assert_eq!(status(s, "01"), CertStatus::Superseded);
    assert_eq!(status(s, "03"), CertStatus::Active);
    assert_eq!(
        status(s, "02"),
        CertStatus::Active,
        "another device untouched"
    );
    // A re-enrollment replacing the active certificate supersedes it.
    committed(issue(s, renewal("04", "03", "SN1", 4, 102)));
    assert_eq!(status(s, "03"), CertStatus::Superseded);
    let c = s.find_by_serial("04").unwrap().unwrap();
    assert_eq!(c.status, CertStatus::Active);
    assert_eq!(c.kind, IssuanceKind::Reenroll);
    assert_eq!(c.replaces_serial_hex.as_deref(), Some("03"));
    assert_eq!(active_of(s, "SN1"), ["04"]);
    assert_eq!(active_of(s, "SN2"), ["02"]);
}

fn reenroll_race_outcomes(f: &mut Fixture) {
    let s = f.store.as_ref();
    committed(issue(s, cert("01", "SN1", 1, 100)));
    // Two re-enrollments authenticated by 01 (two sessions, or two nodes): the first wins.
    committed(issue(s, renewal("02", "01", "SN1", 2, 101)));
    // The loser with another CSR: refused, nothing written.
    assert_eq!(
        issue(s, renewal("03", "01", "SN1", 3, 102)).unwrap(),
        CommitOutcome::ReplacedNotActive(CertStatus::Superseded)
    );
    assert_eq!(s.find_by_serial("03").unwrap(), None);
    // The loser with the same CSR (the same meter retrying elsewhere): the same certificate.
    match issue(s, renewal("04", "01", "SN1", 2, 103)).unwrap() {
        CommitOutcome::AlreadyIssued(c) => assert_eq!(c.serial_hex, "02"),
        other => panic!("{other:?}"),
    }
    assert_eq!(active_of(s, "SN1"), ["02"]);
    assert_eq!(s.count_certificates().unwrap(), 2);
}

fn audit_rows(f: &mut Fixture) {
    let s = f.store.as_ref();
    let rows: Vec<AuditEvent> = (0..5)
        .map(|i| {
            audit(
                &format!("SN{i}"),
                "sren",
                if i % 2 == 0 { "refused" } else { "replayed" },
                200 + i,
            )
        })
        .collect();
    for a in &rows {
        committed(commit_and_wait(s, Commit::Audit(a.clone())));
    }
    // An audit row with text that needs escaping survives as is.
    let odd = AuditEvent {
        detail: "quote ' backslash \\ percent % unicode ü".into(),
        peer: "[::1]:5684".into(),
        // The join proxy an attempt came through (issue #12) is kept too.
        relay: Some("192.0.2.7:7634".into()),
        ..audit("", "sen", "refused", 300)
    };
    committed(commit_and_wait(s, Commit::Audit(odd.clone())));
    let got = s.recent_audit(3).unwrap();
    assert_eq!(got, vec![odd, rows[4].clone(), rows[3].clone()]);
    assert_eq!(s.recent_audit(100).unwrap().len(), 6);
    assert_eq!(
        s.count_certificates().unwrap(),
        0,
        "audit rows are not certificates"
    );
}

fn allowlist(f: &mut Fixture) {
    let s = f.store.as_ref();
    assert!(!s.device_allowed("SN1").unwrap());
    let ids: Vec<String> = ["SN1", "SN2", "SN1"].map(String::from).to_vec();
    assert_eq!(s.import_devices(&ids, 1).unwrap(), 2);
    assert_eq!(
        s.import_devices(&["SN2".into(), "SN3".into()], 2).unwrap(),
        1
    );
    assert!(s.device_allowed("SN1").unwrap());
    assert!(s.device_allowed("SN3").unwrap());
    assert!(!s.device_allowed("SN4").unwrap());
    assert!(
        !s.device_allowed("sn1").unwrap(),
        "serials are case-sensitive"
    );
}

fn list_and_show(f: &mut Fixture) {
    let s = f.store.as_ref();
    committed(issue(s, cert("aa01", "SN1", 1, 100)));
    committed(issue(s, cert("aa02", "SN2", 2, 300)));
    committed(issue(s, cert("ab03", "SN3", 3, 200)));
    committed(issue(s, cert("ac04", "SN4", 4, 300))); // ties aa02: inserted later, listed first
    let list: Vec<String> = s
        .list_certificates(10)
        .unwrap()
        .into_iter()
        .map(|c| c.serial_hex)
        .collect();
    assert_eq!(list, ["ac04", "aa02", "ab03", "aa01"]);
    assert_eq!(s.list_certificates(2).unwrap().len(), 2);
    let serials = |p: &str| -> Vec<String> {
        let mut v: Vec<String> = s
            .find_by_serial_prefix(p)
            .unwrap()
            .into_iter()
            .map(|c| c.serial_hex)
            .collect();
        v.sort();
        v
    };
    assert_eq!(serials("ab"), ["ab03"]);
    assert_eq!(serials("AB0"), ["ab03"], "prefixes are case-insensitive");
    assert_eq!(serials("aa"), ["aa01", "aa02"]);
    assert_eq!(serials("a"), ["aa01", "aa02", "ab03", "ac04"]);
    assert_eq!(serials("ac04"), ["ac04"]);
    assert!(serials("b").is_empty());
    // LIKE wildcards in the argument are dropped, not matched: "a_" is the prefix "a".
    assert_eq!(serials("_ab"), ["ab03"]);
    assert_eq!(serials("a%c"), ["ac04"]);
    let shown = s.find_by_serial_prefix("ab").unwrap().remove(0);
    assert_eq!(shown, cert("ab03", "SN3", 3, 200));
}

fn durable_across_reopen(f: &mut Fixture) {
    committed(issue(f.store.as_ref(), cert("01", "SN1", 1, 100)));
    committed(issue(f.store.as_ref(), cert("02", "SN1", 2, 101)));
    committed(commit_and_wait(
        f.store.as_ref(),
        Commit::Audit(audit("SN9", "sen", "refused", 102)),
    ));
    f.store.import_devices(&["SN1".into()], 1).unwrap();
    f.store.close();
    // A closed store refuses a commit at once, with an error (never "committed").
    assert!(matches!(
        commit_and_wait(
            f.store.as_ref(),
            Commit::Audit(audit("SN9", "sen", "refused", 103))
        ),
        Err(StoreError::Backend(_))
    ));
    f.store = (f.reopen)();
    let s = f.store.as_ref();
    assert_eq!(s.count_certificates().unwrap(), 2);
    assert_eq!(status(s, "01"), CertStatus::Superseded);
    assert_eq!(status(s, "02"), CertStatus::Active);
    assert_eq!(
        s.find_by_request("SN1", &[2; 32])
            .unwrap()
            .unwrap()
            .serial_hex,
        "02"
    );
    assert_eq!(s.recent_audit(10).unwrap().len(), 3);
    assert!(s.device_allowed("SN1").unwrap());
    committed(issue(s, cert("03", "SN2", 3, 104)));
}

fn concurrent_commits(f: &mut Fixture) {
    let s = f.store.clone();
    let before = s.writer_stats();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let dev = format!("SN{t}-{i}");
                    committed(issue(
                        s.as_ref(),
                        cert(&format!("{t:02x}{i:04x}"), &dev, 7, 100),
                    ));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(s.count_certificates().unwrap(), 400);
    let st = s.writer_stats();
    let ops = st.operations - before.operations;
    let txs = st.transactions - before.transactions;
    assert_eq!(ops, 400, "{st:?}");
    assert!(txs >= 1 && txs <= ops, "{st:?}");
    eprintln!(
        "  {}: 400 commits from 8 threads in {txs} transactions",
        s.backend_name()
    );
}

fn one_device_races(f: &mut Fixture) {
    let s = f.store.clone();
    // 16 concurrent first enrollments of one device, each with its own CSR: all commit (the
    // later supersede the earlier), one stays active.
    let threads: Vec<_> = (0..16u8)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || issue(s.as_ref(), cert(&format!("d{i:02x}"), "SNX", i, 100)))
        })
        .collect();
    for t in threads {
        committed(t.join().expect("thread"));
    }
    assert_eq!(active_of(s.as_ref(), "SNX").len(), 1);
    // 16 concurrent copies of one request: one certificate, every answer is that one.
    let threads: Vec<_> = (0..16u8)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                issue(s.as_ref(), cert(&format!("e{i:02x}"), "SNY", 0x55, 100))
            })
        })
        .collect();
    let mut winners = 0;
    let mut serials = std::collections::BTreeSet::new();
    for t in threads {
        match t.join().expect("thread").expect("commit") {
            CommitOutcome::Committed => winners += 1,
            CommitOutcome::AlreadyIssued(c) => {
                serials.insert(c.serial_hex);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(winners, 1);
    let active = active_of(s.as_ref(), "SNY");
    assert_eq!(active.len(), 1);
    assert!(
        serials.iter().all(|x| *x == active[0]),
        "{serials:?} vs {active:?}"
    );
    // 16 concurrent re-enrollments replacing the same certificate, different CSRs: one wins,
    // the others are refused.
    let current = active[0].clone();
    let threads: Vec<_> = (0..16u8)
        .map(|i| {
            let s = s.clone();
            let current = current.clone();
            std::thread::spawn(move || {
                issue(
                    s.as_ref(),
                    renewal(&format!("f{i:02x}"), &current, "SNY", 0x60 + i, 101),
                )
            })
        })
        .collect();
    let outcomes: Vec<CommitOutcome> = threads
        .into_iter()
        .map(|t| t.join().expect("thread").expect("commit"))
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == CommitOutcome::Committed)
            .count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == CommitOutcome::ReplacedNotActive(CertStatus::Superseded))
            .count(),
        15
    );
    assert_eq!(active_of(s.as_ref(), "SNY").len(), 1);
}

fn revocation_of(serial: &str, reason: RevocationReason, at: i64) -> Revocation {
    Revocation {
        serial_hex: serial.into(),
        reason,
        revoked_at_unix: at,
        audit: AuditEvent {
            detail: format!("revoked {serial}"),
            ..audit("", "revoke", "revoked", at)
        },
    }
}

fn block_of(device: &str, keep_certs: bool, at: i64) -> DeviceBlock {
    DeviceBlock {
        device_id: device.into(),
        reason: RevocationReason::CessationOfOperation,
        at_unix: at,
        keep_certs,
        audit: audit(device, "block", "blocked", at),
    }
}

fn crl(number: u64, generation: u64, at: i64) -> CrlRecord {
    CrlRecord {
        number,
        this_update_unix: at,
        next_update_unix: at + 86_400,
        generation,
        der: vec![0x30, 0x01, number as u8],
    }
}

fn revocation(f: &mut Fixture) {
    let s = f.store.as_ref();
    assert_eq!(s.revocation_generation().unwrap(), 0);
    assert!(s.revoked_certificates().unwrap().is_empty());
    committed(issue(s, cert("01", "SN1", 1, 100)));
    committed(issue(s, cert("02", "SN2", 2, 100)));
    committed(issue(s, cert("03", "SN1", 3, 101)));
    assert_eq!(
        s.revoke(&revocation_of("ff", RevocationReason::KeyCompromise, 200))
            .unwrap(),
        RevokeOutcome::NotFound
    );
    assert_eq!(s.revocation_generation().unwrap(), 0, "nothing revoked");
    // The certificate as it was before comes back.
    assert_eq!(
        s.revoke(&revocation_of("02", RevocationReason::KeyCompromise, 200))
            .unwrap(),
        RevokeOutcome::Revoked(cert("02", "SN2", 2, 100))
    );
    assert_eq!(status(s, "02"), CertStatus::Revoked);
    assert_eq!(s.revocation_generation().unwrap(), 1);
    // A superseded certificate can be revoked too.
    match s
        .revoke(&revocation_of("01", RevocationReason::Unspecified, 199))
        .unwrap()
    {
        RevokeOutcome::Revoked(c) => assert_eq!(c.status, CertStatus::Superseded),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.revocation_generation().unwrap(), 2);
    // Twice: nothing changes, no audit row, no generation.
    let audits = s.recent_audit(100).unwrap().len();
    match s
        .revoke(&revocation_of("02", RevocationReason::Superseded, 300))
        .unwrap()
    {
        RevokeOutcome::AlreadyRevoked(c) => assert_eq!(c.status, CertStatus::Revoked),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.recent_audit(100).unwrap().len(), audits);
    assert_eq!(s.revocation_generation().unwrap(), 2);
    // The CRL's entries: oldest revocation first, with the first revocation's date and reason.
    assert_eq!(
        s.revoked_certificates().unwrap(),
        vec![
            RevokedEntry {
                serial_hex: "01".into(),
                revoked_at_unix: 199,
                reason: RevocationReason::Unspecified,
            },
            RevokedEntry {
                serial_hex: "02".into(),
                revoked_at_unix: 200,
                reason: RevocationReason::KeyCompromise,
            },
        ]
    );
    let a = s.recent_audit(1).unwrap();
    assert_eq!(
        (a[0].operation.as_str(), a[0].detail.as_str()),
        ("revoke", "revoked 01")
    );
    // Every reason round-trips.
    for (i, reason) in RevocationReason::ALL.into_iter().enumerate() {
        let serial = format!("1{i:02}");
        committed(issue(s, cert(&serial, &format!("R{i}"), 9, 400)));
        let at = 400 + i64::try_from(i).unwrap();
        assert!(matches!(
            s.revoke(&revocation_of(&serial, reason, at)).unwrap(),
            RevokeOutcome::Revoked(_)
        ));
    }
    let entries = s.revoked_certificates().unwrap();
    assert_eq!(entries.len(), 2 + RevocationReason::ALL.len());
    let reasons: Vec<RevocationReason> = entries[2..].iter().map(|e| e.reason).collect();
    assert_eq!(reasons, RevocationReason::ALL);
    assert_eq!(
        s.revocation_generation().unwrap(),
        2 + RevocationReason::ALL.len() as u64
    );
    assert_eq!(status(s, "03"), CertStatus::Active, "others untouched");
}

fn device_blocks(f: &mut Fixture) {
    let s = f.store.as_ref();
    committed(issue(s, cert("01", "SN1", 1, 100)));
    committed(issue(s, cert("02", "SN1", 2, 101)));
    committed(issue(s, cert("03", "SN2", 3, 100)));
    committed(issue(s, cert("04", "SN3", 4, 100)));
    assert!(!s.device_blocked("SN1").unwrap());
    // The active certificate is revoked (the superseded one stays as it is).
    assert_eq!(
        s.block_device(&block_of("SN1", false, 200)).unwrap(),
        BlockOutcome {
            newly_blocked: true,
            revoked_serials: vec!["02".into()],
        }
    );
    assert!(s.device_blocked("SN1").unwrap());
    assert!(!s.device_blocked("SN2").unwrap());
    assert_eq!(status(s, "01"), CertStatus::Superseded);
    assert_eq!(status(s, "02"), CertStatus::Revoked);
    assert_eq!(
        s.revoked_certificates().unwrap(),
        vec![RevokedEntry {
            serial_hex: "02".into(),
            revoked_at_unix: 200,
            reason: RevocationReason::CessationOfOperation,
        }]
    );
    assert_eq!(s.revocation_generation().unwrap(), 1);
    assert_eq!(s.recent_audit(1).unwrap()[0].operation, "block");
    // keep_certs: blocked, certificates untouched.
    assert_eq!(
        s.block_device(&block_of("SN3", true, 201)).unwrap(),
        BlockOutcome {
            newly_blocked: true,
            revoked_serials: vec![],
        }
    );
    assert_eq!(status(s, "04"), CertStatus::Active);
    // Blocking again: not new, audited, the generation still moves.
    assert_eq!(
        s.block_device(&block_of("SN1", false, 202)).unwrap(),
        BlockOutcome {
            newly_blocked: false,
            revoked_serials: vec![],
        }
    );
    assert_eq!(s.revocation_generation().unwrap(), 3);
    // A device the store never issued to can be blocked ahead of its first enrollment.
    assert!(
        s.block_device(&block_of("SN0", false, 203))
            .unwrap()
            .newly_blocked
    );
    assert_eq!(s.blocked_devices().unwrap(), ["SN0", "SN1", "SN3"]);
    assert_eq!(status(s, "03"), CertStatus::Active);
}

fn commit_refused_after_block_or_revocation(f: &mut Fixture) {
    let s = f.store.as_ref();
    committed(issue(s, cert("01", "SN1", 1, 100)));
    committed(issue(s, cert("02", "SN2", 2, 100)));
    // The certificate a /sren authenticated with was revoked between decision and commit.
    s.revoke(&revocation_of("01", RevocationReason::KeyCompromise, 150))
        .unwrap();
    match issue(s, renewal("03", "01", "SN1", 3, 151)).unwrap() {
        CommitOutcome::Refused(why) => assert!(why.contains("revoked"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.find_by_serial("03").unwrap(), None);
    // A /sen with the IDevID (no replaced certificate) is not refused by that revocation.
    committed(issue(s, cert("04", "SN1", 4, 152)));
    // A blocked device: refused whatever it sends, nothing written.
    s.block_device(&block_of("SN2", true, 160)).unwrap();
    let audits = s.recent_audit(100).unwrap().len();
    for c in [
        cert("05", "SN2", 5, 161),
        renewal("06", "02", "SN2", 6, 162),
    ] {
        match issue(s, c).unwrap() {
            CommitOutcome::Refused(why) => assert!(why.contains("blocked"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(s.recent_audit(100).unwrap().len(), audits);
    assert_eq!(active_of(s, "SN2"), ["02"], "keep_certs kept it");
    // A retry of a request committed before the block still gets its certificate.
    match issue(s, cert("07", "SN2", 2, 163)).unwrap() {
        CommitOutcome::AlreadyIssued(c) => assert_eq!(c.serial_hex, "02"),
        other => panic!("{other:?}"),
    }
    // Refusal audit rows still go in.
    committed(commit_and_wait(
        s,
        Commit::Audit(audit("SN2", "sen", "refused", 164)),
    ));
    assert_eq!(s.recent_audit(1).unwrap()[0].outcome, "refused");
}

fn issued_since_window(f: &mut Fixture) {
    let s = f.store.as_ref();
    assert_eq!(
        s.issued_since("SN1", 0).unwrap(),
        IssuanceWindow {
            count: 0,
            oldest_unix: None
        }
    );
    committed(issue(s, cert("01", "SN1", 1, 100)));
    committed(issue(s, cert("02", "SN1", 2, 150)));
    committed(issue(s, renewal("03", "02", "SN1", 3, 200)));
    committed(issue(s, cert("04", "SN2", 4, 175)));
    // Every kind counts, superseded ones included; the bound is inclusive.
    assert_eq!(
        s.issued_since("SN1", 100).unwrap(),
        IssuanceWindow {
            count: 3,
            oldest_unix: Some(100)
        }
    );
    assert_eq!(
        s.issued_since("SN1", 101).unwrap(),
        IssuanceWindow {
            count: 2,
            oldest_unix: Some(150)
        }
    );
    assert_eq!(s.issued_since("SN1", 201).unwrap().count, 0);
    assert_eq!(
        s.issued_since("SN2", 0).unwrap(),
        IssuanceWindow {
            count: 1,
            oldest_unix: Some(175)
        }
    );
    // Revoked certificates still count (the limit is on issuance, not on what is valid).
    s.revoke(&revocation_of("03", RevocationReason::KeyCompromise, 250))
        .unwrap();
    assert_eq!(s.issued_since("SN1", 0).unwrap().count, 3);
}

fn crl_numbers_and_records(f: &mut Fixture) {
    let s = f.store.as_ref();
    assert_eq!(s.latest_crl().unwrap(), None);
    assert_eq!(s.next_crl_number().unwrap(), 1);
    assert_eq!(s.next_crl_number().unwrap(), 2);
    assert!(s.save_crl(&crl(2, 0, 100)).unwrap());
    assert_eq!(s.latest_crl().unwrap(), Some(crl(2, 0, 100)));
    // An older or equal number (a slower signer) is not kept.
    assert!(!s.save_crl(&crl(1, 0, 101)).unwrap());
    assert!(!s.save_crl(&crl(2, 5, 102)).unwrap());
    assert_eq!(s.latest_crl().unwrap(), Some(crl(2, 0, 100)));
    let n = s.next_crl_number().unwrap();
    assert_eq!(n, 3);
    assert!(s.save_crl(&crl(n, 1, 103)).unwrap());
    committed(issue(s, cert("01", "SN1", 1, 100)));
    s.revoke(&revocation_of("01", RevocationReason::KeyCompromise, 104))
        .unwrap();
    s.block_device(&block_of("SN9", false, 105)).unwrap();
    // A node restart: numbers, generation, CRL, revocations and blocks are all still there.
    f.store.close();
    f.store = (f.reopen)();
    let s = f.store.as_ref();
    assert_eq!(s.latest_crl().unwrap(), Some(crl(3, 1, 103)));
    assert_eq!(s.next_crl_number().unwrap(), 4);
    assert_eq!(s.revocation_generation().unwrap(), 2);
    assert_eq!(status(s, "01"), CertStatus::Revoked);
    assert_eq!(s.revoked_certificates().unwrap().len(), 1);
    assert_eq!(s.blocked_devices().unwrap(), ["SN9"]);
}

fn pair(slot: &str, serial: &str) -> (String, String) {
    (slot.to_owned(), serial.to_owned())
}

fn with_profile(c: IssuedCert, profile: &str) -> IssuedCert {
    IssuedCert {
        profile: profile.into(),
        ..c
    }
}

fn profiles_recorded(f: &mut Fixture) {
    let s = f.store.as_ref();
    // A meter enrolled under "vendor-a" and one under the built-in profile ("").
    committed(issue(
        s,
        with_profile(cert("6a01", "PA1", 1, 100), "vendor-a"),
    ));
    committed(issue(s, cert("6b01", "PB1", 2, 100)));
    let a = s.find_by_serial("6a01").unwrap().expect("stored");
    assert_eq!(a.profile, "vendor-a");
    assert_eq!(
        s.find_by_serial("6b01").unwrap().expect("stored").profile,
        ""
    );
    // Every lookup reads it: by request (a retry), certs show (prefix), certs list.
    assert_eq!(
        s.find_by_request("PA1", &[1; 32])
            .unwrap()
            .expect("stored")
            .profile,
        "vendor-a"
    );
    assert_eq!(
        s.find_by_serial_prefix("6a0").unwrap()[0].profile,
        "vendor-a"
    );
    assert!(s
        .list_certificates(100)
        .unwrap()
        .iter()
        .any(|c| c.serial_hex == "6a01" && c.profile == "vendor-a"));
    // The renewal records the profile it was issued under (what /sren kept), its own row.
    committed(issue(
        s,
        with_profile(renewal("6a02", "6a01", "PA1", 3, 101), "vendor-a"),
    ));
    assert_eq!(status(s, "6a01"), CertStatus::Superseded);
    assert_eq!(
        s.find_by_serial("6a02").unwrap().unwrap().profile,
        "vendor-a"
    );
    // A retry answered from the store carries the first certificate's profile.
    match issue(
        s,
        with_profile(renewal("6a99", "6a01", "PA1", 3, 102), "other"),
    )
    .unwrap()
    {
        CommitOutcome::AlreadyIssued(c) => {
            assert_eq!(
                (c.serial_hex.as_str(), c.profile.as_str()),
                ("6a02", "vendor-a")
            );
        }
        other => panic!("{other:?}"),
    }
    // Refused at commit (the replaced certificate was revoked): nothing recorded.
    s.revoke(&revocation_of("6a02", RevocationReason::KeyCompromise, 103))
        .unwrap();
    assert!(matches!(
        issue(
            s,
            with_profile(renewal("6a03", "6a02", "PA1", 4, 104), "vendor-a")
        )
        .unwrap(),
        CommitOutcome::Refused(_)
    ));
    assert!(s.find_by_serial("6a03").unwrap().is_none());
    // Durable.
    f.store.close();
    f.store = (f.reopen)();
    let s = f.store.as_ref();
    assert_eq!(
        s.find_by_serial("6a02").unwrap().unwrap().profile,
        "vendor-a"
    );
    assert_eq!(s.find_by_serial("6b01").unwrap().unwrap().profile, "");
}

fn slots_side_by_side(f: &mut Fixture) {
    let s = f.store.as_ref();
    // A DLMS meter's signing and key-agreement certificates, and an LDevID beside them.
    committed(issue(s, in_slot(cert("5a01", "DL1", 1, 100), SIGNING)));
    committed(issue(
        s,
        in_slot(cert("5b01", "DL1", 2, 100), KEY_AGREEMENT),
    ));
    committed(issue(s, cert("5c01", "DL1", 3, 100)));
    assert_eq!(
        active_slots(s, "DL1"),
        [
            pair("", "5c01"),
            pair(KEY_AGREEMENT, "5b01"),
            pair(SIGNING, "5a01")
        ]
    );
    // The slot reads back.
    let ka = s.find_by_serial("5b01").unwrap().expect("stored");
    assert_eq!(ka.slot, KEY_AGREEMENT);
    assert_eq!(
        s.find_by_request("DL1", &[1; 32])
            .unwrap()
            .expect("stored")
            .slot,
        SIGNING
    );
    // Re-enrolling the signing certificate supersedes it and nothing else.
    committed(issue(
        s,
        in_slot(renewal("5a02", "5a01", "DL1", 4, 101), SIGNING),
    ));
    assert_eq!(status(s, "5a01"), CertStatus::Superseded);
    assert_eq!(
        active_slots(s, "DL1"),
        [
            pair("", "5c01"),
            pair(KEY_AGREEMENT, "5b01"),
            pair(SIGNING, "5a02")
        ]
    );
    // A first enrollment in a slot (no renewal) supersedes that slot's certificate only.
    committed(issue(
        s,
        in_slot(cert("5b02", "DL1", 5, 102), KEY_AGREEMENT),
    ));
    assert_eq!(status(s, "5b01"), CertStatus::Superseded);
    assert_eq!(status(s, "5a02"), CertStatus::Active);
    assert_eq!(status(s, "5c01"), CertStatus::Active);
    // A retry per slot (the same CSR again, under a fresh serial) gets that slot's
    // certificate back, and writes nothing.
    let before = s.count_certificates().unwrap();
    match issue(s, in_slot(renewal("5a99", "5a01", "DL1", 4, 103), SIGNING)).unwrap() {
        CommitOutcome::AlreadyIssued(c) => {
            assert_eq!((c.serial_hex.as_str(), c.slot.as_str()), ("5a02", SIGNING));
        }
        other => panic!("{other:?}"),
    }
    match issue(s, in_slot(cert("5b99", "DL1", 5, 103), KEY_AGREEMENT)).unwrap() {
        CommitOutcome::AlreadyIssued(c) => {
            assert_eq!(
                (c.serial_hex.as_str(), c.slot.as_str()),
                ("5b02", KEY_AGREEMENT)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.count_certificates().unwrap(), before);
    // Another device's slots are its own.
    committed(issue(s, in_slot(cert("6a01", "DL2", 1, 104), SIGNING)));
    assert_eq!(status(s, "5a02"), CertStatus::Active);
    // The slots survive a restart.
    f.store.close();
    f.store = (f.reopen)();
    let s = f.store.as_ref();
    assert_eq!(
        active_slots(s, "DL1"),
        [
            pair("", "5c01"),
            pair(KEY_AGREEMENT, "5b02"),
            pair(SIGNING, "5a02")
        ]
    );
    // Blocking the device revokes every slot's certificate.
    let out = s.block_device(&block_of("DL1", false, 200)).unwrap();
    let mut revoked = out.revoked_serials;
    revoked.sort();
    assert_eq!(revoked, ["5a02", "5b02", "5c01"]);
    assert!(active_slots(s, "DL1").is_empty());
}

fn slot_races(f: &mut Fixture) {
    let s = f.store.clone();
    committed(issue(
        s.as_ref(),
        in_slot(cert("7a01", "DL3", 1, 100), SIGNING),
    ));
    committed(issue(
        s.as_ref(),
        in_slot(cert("7b01", "DL3", 2, 100), KEY_AGREEMENT),
    ));
    // 16 concurrent re-enrollments of each slot, each replacing that slot's certificate with
    // its own CSR: one wins per slot, the others are refused, and the other slot is untouched.
    let threads: Vec<_> = (0..32u8)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let (slot, replaces) = if i % 2 == 0 {
                    (SIGNING, "7a01")
                } else {
                    (KEY_AGREEMENT, "7b01")
                };
                let c = renewal(&format!("7c{i:02x}"), replaces, "DL3", 0x40 + i, 101);
                (slot, issue(s.as_ref(), in_slot(c, slot)))
            })
        })
        .collect();
    let mut won = std::collections::BTreeMap::new();
    let mut refused = 0;
    for t in threads {
        let (slot, r) = t.join().expect("thread");
        match r.expect("commit") {
            CommitOutcome::Committed => *won.entry(slot).or_insert(0) += 1,
            CommitOutcome::ReplacedNotActive(CertStatus::Superseded) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        won,
        [(KEY_AGREEMENT, 1), (SIGNING, 1)].into_iter().collect(),
        "one winner per slot"
    );
    assert_eq!(refused, 30);
    let active = active_slots(s.as_ref(), "DL3");
    assert_eq!(
        active
            .iter()
            .map(|(slot, _)| slot.as_str())
            .collect::<Vec<_>>(),
        [KEY_AGREEMENT, SIGNING],
        "{active:?}"
    );
    // 16 concurrent copies of one request per slot: one certificate per slot, every answer
    // is that slot's certificate.
    let current: Vec<(String, String)> = active.clone();
    let threads: Vec<_> = (0..32u8)
        .map(|i| {
            let s = s.clone();
            let (slot, replaces) = current[usize::from(i % 2)].clone();
            std::thread::spawn(move || {
                let digest = 0x90 + i % 2;
                let c = renewal(&format!("7d{i:02x}"), &replaces, "DL3", digest, 102);
                (slot.clone(), issue(s.as_ref(), in_slot(c, &slot)))
            })
        })
        .collect();
    let mut serials: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    let mut winners = 0;
    for t in threads {
        let (slot, r) = t.join().expect("thread");
        match r.expect("commit") {
            CommitOutcome::Committed => winners += 1,
            CommitOutcome::AlreadyIssued(c) => {
                assert_eq!(c.slot, slot);
                serials.entry(slot).or_default().insert(c.serial_hex);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(winners, 2);
    let active = active_slots(s.as_ref(), "DL3");
    assert_eq!(active.len(), 2, "{active:?}");
    for (slot, serial) in &active {
        let answered = serials.get(slot).cloned().unwrap_or_default();
        assert!(
            answered.iter().all(|x| x == serial),
            "{slot}: {answered:?} vs {serial}"
        );
    }
}

// ---- the backends ----

fn run_cases(backend: &str, mut fixture: impl FnMut(usize) -> Fixture) {
    for (i, (name, case)) in CASES.iter().enumerate() {
        eprintln!("{backend}: {name}");
        let mut f = fixture(i);
        case(&mut f);
        f.store.close();
    }
}

#[test]
fn sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    run_cases("sqlite", |i| {
        let path = root.join(format!("case{i}.sqlite3"));
        let open = move || -> Arc<dyn ServerStore> {
            Arc::new(SqliteStore::open(&path, 64).expect("open sqlite"))
        };
        Fixture {
            store: open(),
            reopen: Box::new(open),
        }
    });
}

fn pg_open(url: &str) -> Arc<PgStore> {
    let settings = PgSettings {
        pool_size: 8,
        max_batch: 64,
        timeout: Duration::from_secs(5),
        ..PgSettings::new(url)
    };
    Arc::new(PgStore::open(&settings).unwrap_or_else(|e| panic!("open postgres: {e}")))
}

#[test]
fn postgres_store_keeps_the_contract() {
    let Some(pg) = TestPostgres::start_or_skip("postgres_store_keeps_the_contract") else {
        return;
    };
    run_cases("postgres", |i| {
        let url = pg
            .create_database(&format!("case{i}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let open = move || -> Arc<dyn ServerStore> { pg_open(&url) };
        Fixture {
            store: open(),
            reopen: Box::new(open),
        }
    });
}

/// Two stores on one database are two nodes: a retry on the other node gets the first
/// node's certificate, a re-enrollment on B supersedes A's certificate, and two nodes racing
/// the same device's /sren leave one active certificate (the loser: the same certificate for
/// the same CSR, a refusal for another).
#[test]
fn postgres_two_nodes_on_one_database() {
    let Some(pg) = TestPostgres::start_or_skip("postgres_two_nodes_on_one_database") else {
        return;
    };
    let url = pg
        .create_database("nodes")
        .unwrap_or_else(|e| panic!("{e}"));
    // Both nodes start together: the migrations are applied once.
    let (a, b) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| pg_open(&url));
        let hb = sc.spawn(|| pg_open(&url));
        (ha.join().expect("a"), hb.join().expect("b"))
    });
    assert_eq!(
        a.schema_versions().unwrap(),
        MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>()
    );

    // Idempotent retry across nodes.
    committed(issue(a.as_ref(), cert("a001", "SN1", 1, 100)));
    assert_eq!(
        b.find_by_request("SN1", &[1; 32])
            .unwrap()
            .unwrap()
            .serial_hex,
        "a001"
    );
    match issue(b.as_ref(), cert("b001", "SN1", 1, 101)).unwrap() {
        CommitOutcome::AlreadyIssued(c) => assert_eq!(c.serial_hex, "a001"),
        other => panic!("{other:?}"),
    }
    // Re-enrollment on B supersedes A's certificate.
    committed(issue(b.as_ref(), renewal("b002", "a001", "SN1", 2, 102)));
    assert_eq!(status(a.as_ref(), "a001"), CertStatus::Superseded);
    assert_eq!(active_of(a.as_ref(), "SN1"), ["b002"]);

    // Races: many devices, each re-enrolled on both nodes at once.
    let devices = 60;
    for d in 0..devices {
        committed(issue(
            a.as_ref(),
            cert(&format!("r{d:04}"), &format!("R{d}"), 1, 200),
        ));
    }
    let race = |same_csr: bool| -> (usize, usize, usize) {
        let (mut won, mut same, mut refused) = (0, 0, 0);
        let barrier = Arc::new(std::sync::Barrier::new(2));
        for d in 0..devices {
            let dev = format!("R{d}");
            let old = active_of(a.as_ref(), &dev).remove(0);
            let outcomes: Vec<CommitOutcome> = std::thread::scope(|sc| {
                let hs: Vec<_> = [(a.clone(), 0u8), (b.clone(), 1u8)]
                    .into_iter()
                    .map(|(node, n)| {
                        let (dev, old, barrier) = (dev.clone(), old.clone(), barrier.clone());
                        sc.spawn(move || {
                            let digest = if same_csr { 0x70 } else { 0x80 + n };
                            let serial = format!("{old}-{}{n}", if same_csr { "s" } else { "d" });
                            barrier.wait();
                            issue(node.as_ref(), renewal(&serial, &old, &dev, digest, 300))
                                .expect("commit")
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("node")).collect()
            });
            let active = active_of(b.as_ref(), &dev);
            assert_eq!(active.len(), 1, "{dev}: {active:?} after {outcomes:?}");
            for o in outcomes {
                match o {
                    CommitOutcome::Committed => won += 1,
                    CommitOutcome::AlreadyIssued(c) => {
                        assert_eq!(c.serial_hex, active[0]);
                        same += 1;
                    }
                    CommitOutcome::ReplacedNotActive(CertStatus::Superseded) => refused += 1,
                    other => panic!("{other:?}"),
                }
            }
        }
        (won, same, refused)
    };
    let (won, same, refused) = race(true);
    assert_eq!((won, same, refused), (devices, devices, 0));
    let (won, same, refused) = race(false);
    assert_eq!((won, same, refused), (devices, 0, devices));
    a.close();
    b.close();
}

/// The database goes away: reads and commits fail within the timeout (never a false
/// "committed"), and the store serves again once it is back, without a restart.
#[test]
fn postgres_outage_fails_commits_then_recovers() {
    let Some(mut pg) = TestPostgres::start_or_skip("postgres_outage_fails_commits_then_recovers")
    else {
        return;
    };
    let url = pg
        .create_database("outage")
        .unwrap_or_else(|e| panic!("{e}"));
    let s = Arc::new(
        PgStore::open(&PgSettings {
            pool_size: 4,
            timeout: Duration::from_millis(1500),
            ..PgSettings::new(&url)
        })
        .unwrap_or_else(|e| panic!("{e}")),
    );
    committed(issue(s.as_ref(), cert("01", "SN1", 1, 100)));
    pg.stop(true);
    let t = Instant::now();
    assert!(matches!(
        s.find_by_serial("01"),
        Err(StoreError::Backend(_))
    ));
    assert!(matches!(
        issue(s.as_ref(), cert("02", "SN2", 2, 101)),
        Err(StoreError::Backend(_))
    ));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    pg.restart().unwrap_or_else(|e| panic!("{e}"));
    // The pool replaces its dead connections.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match issue(s.as_ref(), cert("02", "SN2", 2, 101)) {
            Ok(o) => {
                assert_eq!(o, CommitOutcome::Committed);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    }
    assert_eq!(s.count_certificates().unwrap(), 2);
    assert_eq!(status(s.as_ref(), "01"), CertStatus::Active);
    // Reopening (a node restart) applies no migration twice.
    s.close();
    let again = pg_open(&url);
    assert_eq!(again.schema_versions().unwrap().len(), MIGRATIONS.len());
    assert_eq!(again.count_certificates().unwrap(), 2);
}

/// Revocation across nodes: a revocation or block made through node A (or the CLI, a third
/// store) is what node B reads, and B's commit of a re-enrollment authenticated by the
/// revoked certificate is refused; cRLNumbers allocated on both nodes at once are never
/// the same; blocks racing issuances of the same devices on the other node never leave a
/// blocked device with an active certificate.
#[test]
fn postgres_revocation_across_nodes() {
    let Some(pg) = TestPostgres::start_or_skip("postgres_revocation_across_nodes") else {
        return;
    };
    let url = pg
        .create_database("revocation")
        .unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (pg_open(&url), pg_open(&url));

    committed(issue(a.as_ref(), cert("a001", "SN1", 1, 100)));
    assert_eq!(b.revocation_generation().unwrap(), 0);
    assert!(matches!(
        a.revoke(&revocation_of("a001", RevocationReason::KeyCompromise, 110))
            .unwrap(),
        RevokeOutcome::Revoked(_)
    ));
    // B sees it at once: the generation it polls, the CRL entries, the status.
    assert_eq!(b.revocation_generation().unwrap(), 1);
    assert_eq!(
        b.revoked_certificates().unwrap(),
        a.revoked_certificates().unwrap()
    );
    assert_eq!(status(b.as_ref(), "a001"), CertStatus::Revoked);
    match issue(b.as_ref(), renewal("b001", "a001", "SN1", 2, 111)).unwrap() {
        CommitOutcome::Refused(why) => assert!(why.contains("revoked"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The same revocation through B: already done.
    assert!(matches!(
        b.revoke(&revocation_of("a001", RevocationReason::Superseded, 112))
            .unwrap(),
        RevokeOutcome::AlreadyRevoked(_)
    ));
    assert_eq!(a.revocation_generation().unwrap(), 1);
    // A block through B; A refuses the device's next enrollment at commit.
    b.block_device(&block_of("SN2", false, 120)).unwrap();
    assert!(a.device_blocked("SN2").unwrap());
    assert_eq!(a.revocation_generation().unwrap(), 2);
    match issue(a.as_ref(), cert("a002", "SN2", 3, 121)).unwrap() {
        CommitOutcome::Refused(why) => assert!(why.contains("blocked"), "{why}"),
        other => panic!("{other:?}"),
    }

    // cRLNumbers from two nodes and a CLI at once: every one distinct, no gap.
    let cli = pg_open(&url);
    let per_node = 40;
    let mut numbers: Vec<u64> = std::thread::scope(|sc| {
        let hs: Vec<_> = [a.clone(), b.clone(), cli.clone()]
            .into_iter()
            .map(|node| {
                sc.spawn(move || {
                    (0..per_node)
                        .map(|_| node.next_crl_number().expect("cRLNumber"))
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("node"))
            .collect()
    });
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=3 * per_node).collect::<Vec<u64>>());
    // Saving at once: the highest number is the one kept.
    let kept: Vec<bool> = std::thread::scope(|sc| {
        let hs: Vec<_> = [(a.clone(), 119u64), (b.clone(), 120), (cli.clone(), 118)]
            .into_iter()
            .map(|(node, n)| sc.spawn(move || node.save_crl(&crl(n, 2, 130)).expect("save")))
            .collect();
        hs.into_iter().map(|h| h.join().expect("node")).collect()
    });
    assert!(kept[1], "the highest number is always kept");
    assert_eq!(a.latest_crl().unwrap().map(|c| c.number), Some(120));
    assert!(!cli.save_crl(&crl(119, 2, 131)).unwrap());
    cli.close();

    // Blocks on A racing issuances on B, device by device.
    let devices = 40;
    for d in 0..devices {
        committed(issue(
            b.as_ref(),
            cert(&format!("k{d:04}"), &format!("K{d}"), 1, 200),
        ));
    }
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let (mut issued_first, mut refused) = (0, 0);
    for d in 0..devices {
        let dev = format!("K{d}");
        let (block, outcome) = std::thread::scope(|sc| {
            let (a, b2, dev2, barrier2) = (a.clone(), b.clone(), dev.clone(), barrier.clone());
            let hb = sc.spawn(move || {
                barrier2.wait();
                issue(
                    b2.as_ref(),
                    renewal(&format!("k{d:04}-r"), &format!("k{d:04}"), &dev2, 2, 300),
                )
                .expect("commit")
            });
            let barrier = barrier.clone();
            let ha = sc.spawn(move || {
                barrier.wait();
                a.block_device(&block_of(&dev, false, 300)).expect("block")
            });
            (ha.join().expect("a"), hb.join().expect("b"))
        });
        assert!(
            active_of(a.as_ref(), &format!("K{d}")).is_empty(),
            "K{d}: blocked with an active certificate ({block:?}, {outcome:?})"
        );
        match outcome {
            // The issuance committed first: the block revoked the new certificate.
            CommitOutcome::Committed => {
                assert_eq!(block.revoked_serials, [format!("k{d:04}-r")]);
                issued_first += 1;
            }
            // The block first: it revoked the old one, the issuance was refused.
            CommitOutcome::Refused(why) => {
                assert!(why.contains("blocked"), "{why}");
                assert_eq!(block.revoked_serials, [format!("k{d:04}")]);
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    eprintln!("block races: issuance first {issued_first}, block first {refused}");
    assert_eq!(issued_first + refused, devices);
    a.close();
    b.close();
}

/// DLMS slots on two nodes: both nodes re-enroll both slots of one device at once (four
/// re-enrollments, other CSRs): per slot one wins and the other is refused, and the device
/// ends with exactly one active certificate in each slot; a retry on the other node gets
/// that slot's certificate.
#[test]
fn postgres_slots_across_two_nodes() {
    let Some(pg) = TestPostgres::start_or_skip("postgres_slots_across_two_nodes") else {
        return;
    };
    let url = pg
        .create_database("slots")
        .unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (pg_open(&url), pg_open(&url));
    for d in 0..20u8 {
        let dev = format!("DLX{d}");
        let (sign, ka) = (format!("{d:02x}51"), format!("{d:02x}4b"));
        committed(issue(
            a.as_ref(),
            in_slot(cert(&sign, &dev, 1, 100), SIGNING),
        ));
        committed(issue(
            b.as_ref(),
            in_slot(cert(&ka, &dev, 2, 100), KEY_AGREEMENT),
        ));
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let outcomes: Vec<(&str, CommitOutcome)> = std::thread::scope(|sc| {
            let hs: Vec<_> = [
                (a.clone(), SIGNING, sign.clone(), 0u8),
                (b.clone(), SIGNING, sign.clone(), 1),
                (a.clone(), KEY_AGREEMENT, ka.clone(), 2),
                (b.clone(), KEY_AGREEMENT, ka.clone(), 3),
            ]
            .into_iter()
            .map(|(node, slot, old, n)| {
                let (dev, barrier) = (dev.clone(), barrier.clone());
                sc.spawn(move || {
                    let c = renewal(&format!("{old}{n:02x}"), &old, &dev, 0x20 + n, 101);
                    barrier.wait();
                    (
                        slot,
                        issue(node.as_ref(), in_slot(c, slot)).expect("commit"),
                    )
                })
            })
            .collect();
            hs.into_iter().map(|h| h.join().expect("node")).collect()
        });
        for slot in [SIGNING, KEY_AGREEMENT] {
            let mine: Vec<&CommitOutcome> = outcomes
                .iter()
                .filter(|(s, _)| *s == slot)
                .map(|(_, o)| o)
                .collect();
            assert_eq!(
                mine.iter()
                    .filter(|o| ***o == CommitOutcome::Committed)
                    .count(),
                1,
                "{dev} {slot}: {mine:?}"
            );
            assert_eq!(
                mine.iter()
                    .filter(|o| ***o == CommitOutcome::ReplacedNotActive(CertStatus::Superseded))
                    .count(),
                1,
                "{dev} {slot}: {mine:?}"
            );
        }
        let active = active_slots(b.as_ref(), &dev);
        assert_eq!(
            active.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
            [KEY_AGREEMENT, SIGNING],
            "{dev}: {active:?}"
        );
        // The winner's meter retries on the other node: the same certificate.
        let (_, winner) = &active[1];
        let won = a.find_by_serial(winner).unwrap().expect("stored");
        let retry = IssuedCert {
            serial_hex: format!("{winner}ff"),
            ..won.clone()
        };
        for node in [&a, &b] {
            match issue(node.as_ref(), retry.clone()).unwrap() {
                CommitOutcome::AlreadyIssued(c) => assert_eq!(c, won),
                other => panic!("{other:?}"),
            }
        }
    }
    a.close();
    b.close();
}

/// A database a node of the previous release created (schema version 1, with a
/// certificate) is brought to the current schema at open, its data intact and revocable.
#[test]
fn postgres_migrates_a_version_1_database() {
    let Some(pg) = TestPostgres::start_or_skip("postgres_migrates_a_version_1_database") else {
        return;
    };
    let url = pg.create_database("v1").unwrap_or_else(|e| panic!("{e}"));
    let v1 = &MIGRATIONS[0];
    assert_eq!(v1.version, 1);
    pg.psql(
        "v1",
        &format!(
            "BEGIN;
             CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());
             {}
             INSERT INTO schema_migrations (version, name) VALUES (1, 'v1');
             SELECT est_issue('0101', 'OLD', 'CN=OLD', '\\x3000', decode(repeat('07', 32), 'hex'),
                 1, 2, 100, 'active', 'enroll', NULL,
                 100, 'peer', 'OLD', 'sen', 'issued', '2.04', '');
             COMMIT;",
            v1.sql
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let s = pg_open(&url);
    assert_eq!(
        s.schema_versions().unwrap(),
        MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>()
    );
    let old = s.find_by_serial("0101").unwrap().expect("kept");
    assert_eq!(
        (
            old.device_id.as_str(),
            old.status,
            old.slot.as_str(),
            old.profile.as_str()
        ),
        ("OLD", CertStatus::Active, "", "")
    );
    // A node of the previous release (est_issue_relayed, no slot) during a rolling upgrade:
    // its certificate goes to slot "", superseding that slot only, its relay audited.
    committed(issue(
        s.as_ref(),
        in_slot(cert("0103", "OLD", 9, 150), SIGNING),
    ));
    assert_eq!(
        pg.psql(
            "v1",
            "SELECT est_issue_relayed('0104', 'OLD', 'CN=OLD', '\\x3000', decode(repeat('0a', 32), 'hex'),
                 1, 2, 151, 'active', 'reenroll', '0101',
                 151, 'peer', 'OLD', 'sren', 'issued', '2.04', '', '[2001:db8::1]:7634')"
        )
        .unwrap(),
        "committed"
    );
    assert_eq!(status(s.as_ref(), "0101"), CertStatus::Superseded);
    assert_eq!(
        active_slots(s.as_ref(), "OLD"),
        [pair("", "0104"), pair(SIGNING, "0103")]
    );
    assert_eq!(
        s.recent_audit(1).unwrap()[0].relay.as_deref(),
        Some("[2001:db8::1]:7634")
    );
    // Migration 4's est_issue_slot (the release before profiles, during a rolling upgrade)
    // still issues, recording no profile; this release's issuance records its profile.
    assert_eq!(
        pg.psql(
            "v1",
            "SELECT est_issue_slot('0105', 'SLOT', 'CN=SLOT', '\\x3000', decode(repeat('0b', 32), 'hex'),
                 1, 2, 152, 'active', 'enroll', NULL, '',
                 152, 'peer', 'SLOT', 'sen', 'issued', '2.04', '', '')"
        )
        .unwrap(),
        "committed"
    );
    assert_eq!(s.find_by_serial("0105").unwrap().unwrap().profile, "");
    committed(issue(
        s.as_ref(),
        IssuedCert {
            profile: "vendor-a".into(),
            ..cert("0106", "PROF", 12, 153)
        },
    ));
    assert_eq!(
        s.find_by_serial("0106").unwrap().unwrap().profile,
        "vendor-a"
    );
    assert_eq!(s.revocation_generation().unwrap(), 0);
    assert_eq!(s.next_crl_number().unwrap(), 1);
    assert!(matches!(
        s.revoke(&revocation_of("0101", RevocationReason::KeyCompromise, 200))
            .unwrap(),
        RevokeOutcome::Revoked(_)
    ));
    assert_eq!(s.revoked_certificates().unwrap().len(), 1);
    // The replaced est_issue refuses a blocked device.
    s.block_device(&block_of("NEW", true, 201)).unwrap();
    assert!(matches!(
        issue(s.as_ref(), cert("0102", "NEW", 8, 202)).unwrap(),
        CommitOutcome::Refused(_)
    ));
    s.close();
}
