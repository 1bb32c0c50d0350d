//! TLS from est-server to PostgreSQL, over the real path: a throwaway cluster with `ssl = on`
//! and a server certificate made here (rcgen), listening on TCP 127.0.0.1.
//!
//! - `sslmode=verify-full` with `[storage] ca_file` naming the CA that issued the server's
//!   certificate: the node starts, its pooled connections are TLS (`pg_stat_ssl`), and a
//!   meter enrolls (libcoap over DTLS), its certificate in the database;
//! - with a CA that did not issue it, the node refuses to start, the error naming TLS;
//! - `verify-full` with a certificate for another host name is refused, `verify-ca` (the
//!   chain only) accepts it;
//! - `require` without a CA file is encrypted (not authenticated), `sslmode=disable` still
//!   works and is plain; `require` against a server without TLS is refused.
#![allow(clippy::unwrap_used)]
#![allow(clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use est_test_tools::pg::{PgOptions, PgTls, TestPostgres};
use est_tests::*;

/// A CA and a server certificate it issued for `names` (DNS names or IP addresses), PEM.
struct Pki {
    ca_pem: String,
    server: PgTls,
}

fn pki(ca_name: &str, names: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut srv = CertificateParams::default();
    srv.distinguished_name
        .push(DnType::CommonName, "PostgreSQL test server");
    srv.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*n).try_into().unwrap()),
        })
        .collect();
    let srv_cert = srv.signed_by(&key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server: PgTls {
            cert_pem: srv_cert.pem(),
            key_pem: key.serialize_pem(),
        },
    }
}

fn tls_cluster(test: &str, server: &PgTls) -> Option<TestPostgres> {
    TestPostgres::start_with_or_skip(
        test,
        PgOptions {
            tcp: true,
            tls: Some(server.clone()),
            ..PgOptions::default()
        },
    )
}

/// The est-server connections to `db`, as "ssl-or-not" per connection.
fn est_connections(pg: &TestPostgres, db: &str) -> Vec<bool> {
    pg.psql(
        "postgres",
        &format!(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'est-server' AND a.datname = '{db}'"
        ),
    )
    .unwrap()
    .lines()
    .map(|l| l == "t")
    .collect()
}

/// A node on `db` with `url_tail` appended to the TCP URL and `ca_file` written from `ca`.
async fn node(
    pg: &TestPostgres,
    db: &str,
    url_tail: &str,
    ca: Option<&str>,
) -> anyhow::Result<TestServer> {
    pg.create_database(db).unwrap();
    let url = format!("{}{url_tail}", pg.tcp_url(db).unwrap());
    let ca = ca.map(str::to_owned);
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("pg-ca.pem");
    if let Some(ca) = &ca {
        std::fs::write(&ca_path, ca).unwrap();
    }
    let r = TestServer::start(move |c| {
        c.storage.backend = "postgres".into();
        c.storage.url = url;
        c.storage.pool_size = 2;
        c.storage.timeout_ms = 3000;
        if ca.is_some() {
            c.storage.ca_file = ca_path;
        }
    })
    .await;
    drop(dir);
    r
}

/// One meter enrolls through `srv` (libcoap, DTLS), its certificate checked by openssl.
async fn enroll(srv: &TestServer, serial: &str) {
    let fleet = srv.mint(&[serial]).unwrap();
    let dev = fleet.join(serial);
    let work = srv.dir.path().join(format!("work-{serial}"));
    std::fs::create_dir_all(&work).unwrap();
    let (_key, csr) = openssl_csr(&work, "meter", &format!("/serialNumber={serial}")).unwrap();
    let creds = Creds {
        cert: &dev.join("idevid-chain.pem"),
        key: &dev.join("idevid.key"),
        trust: &fleet.join("implicit-ta.pem"),
    };
    let der = work.join("ldevid.der");
    let run = post_csr(Libcoap::Gnutls, &creds, &srv.url("sen"), &csr, &der)
        .await
        .unwrap();
    assert!(
        run.payload
            .as_ref()
            .is_some_and(|p| p.first() == Some(&0x30)),
        "{run:?}"
    );
    openssl_verify(&srv.ca_pem(), &der_to_pem(&der).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn est_server_reaches_postgres_over_verified_tls() {
    if !require_tools() {
        return;
    }
    let good = pki("PostgreSQL test CA", &["localhost", "127.0.0.1"]);
    let Some(pg) = tls_cluster(
        "est_server_reaches_postgres_over_verified_tls",
        &good.server,
    ) else {
        return;
    };

    // verify-full with the right CA: starts, TLS on every connection, a meter enrolls.
    let srv = node(&pg, "full", "?sslmode=verify-full", Some(&good.ca_pem))
        .await
        .expect("verify-full with the server's CA");
    enroll(&srv, "SNTLS0001").await;
    let conns = est_connections(&pg, "full");
    assert!(
        !conns.is_empty() && conns.iter().all(|tls| *tls),
        "{conns:?}"
    );
    assert_eq!(
        pg.psql(
            "full",
            "SELECT device_id || ' ' || status FROM certificates"
        )
        .unwrap(),
        "SNTLS0001 active"
    );
    srv.stop().await;

    // Another CA: refused at start, and the error says TLS.
    let other = pki("Some other CA", &["localhost", "127.0.0.1"]);
    let err = node(&pg, "wrongca", "?sslmode=verify-full", Some(&other.ca_pem))
        .await
        .err()
        .expect("a server certificate from another CA must be refused");
    let text = format!("{err:#}");
    eprintln!("refused as it must be: {text}");
    assert!(
        text.contains("TLS") && text.contains("verify-full") && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(est_connections(&pg, "wrongca").is_empty());

    // verify-ca with the right CA also starts.
    let srv = node(&pg, "ca", "?sslmode=verify-ca", Some(&good.ca_pem))
        .await
        .expect("verify-ca");
    assert!(est_connections(&pg, "ca").iter().all(|tls| *tls));
    srv.stop().await;

    // require without a CA file: encrypted.
    let srv = node(&pg, "require", "?sslmode=require", None)
        .await
        .expect("require");
    let conns = est_connections(&pg, "require");
    assert!(
        !conns.is_empty() && conns.iter().all(|tls| *tls),
        "{conns:?}"
    );
    srv.stop().await;

    // disable: still works, in the clear.
    let srv = node(&pg, "plain", "?sslmode=disable", None)
        .await
        .expect("sslmode=disable");
    enroll(&srv, "SNPLAIN01").await;
    let conns = est_connections(&pg, "plain");
    assert!(
        !conns.is_empty() && conns.iter().all(|tls| !*tls),
        "{conns:?}"
    );
    srv.stop().await;
}

/// The host name check of verify-full, which verify-ca leaves out; and `require` against a
/// server without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name_and_require_needs_tls() {
    let elsewhere = pki("PostgreSQL test CA", &["db.example"]);
    let Some(pg) = tls_cluster(
        "verify_full_checks_the_host_name_and_require_needs_tls",
        &elsewhere.server,
    ) else {
        return;
    };
    let err = node(&pg, "full", "?sslmode=verify-full", Some(&elsewhere.ca_pem))
        .await
        .err()
        .expect("a certificate for db.example must not do for 127.0.0.1");
    let text = format!("{err:#}");
    eprintln!("refused as it must be: {text}");
    assert!(
        text.contains("TLS") && text.contains("not valid for name"),
        "{text}"
    );
    let srv = node(&pg, "ca", "?sslmode=verify-ca", Some(&elsewhere.ca_pem))
        .await
        .expect("verify-ca checks the chain only");
    assert!(est_connections(&pg, "ca").iter().all(|tls| *tls));
    srv.stop().await;
    drop(pg);

    // A server without TLS: require is refused, prefer falls back to plain.
    let Some(plain) = TestPostgres::start_with_or_skip(
        "verify_full_checks_the_host_name_and_require_needs_tls",
        PgOptions {
            tcp: true,
            ..PgOptions::default()
        },
    ) else {
        return;
    };
    let err = node(&plain, "req", "?sslmode=require", None)
        .await
        .err()
        .expect("require against a server without TLS");
    let text = format!("{err:#}");
    eprintln!("refused as it must be: {text}");
    assert!(text.contains("does not support TLS"), "{text}");
    let srv = node(&plain, "prefer", "?sslmode=prefer", None)
        .await
        .expect("prefer");
    assert!(est_connections(&plain, "prefer").iter().all(|tls| !*tls));
    srv.stop().await;
}
