//! Certificate lifetimes the operator renews: `est-server dtls renew`.
//!
//! The DTLS server certificate (2 years by default) is renewed in place: a new key and a new
//! certificate from the issuing CA, with the same DNS names and IP addresses as the current
//! one (plus any given). A running server picks it up on SIGHUP (new handshakes; sessions in
//! progress keep the old one) or on restart.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;

use crate::config::Config;
use crate::datadir;

/// What `dtls renew` wrote.
#[derive(Debug)]
pub struct Renewed {
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub not_after: SystemTime,
}

/// The DNS names and IP addresses in a certificate's subjectAltName.
fn san_names(der: &[u8]) -> Result<(Vec<String>, Vec<IpAddr>)> {
    let cert = x509_cert::Certificate::from_der(der)?;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Some((_, san)) = cert.tbs_certificate.get::<SubjectAltName>()? {
        for n in san.0 {
            match n {
                GeneralName::DnsName(d) => dns.push(d.to_string()),
                GeneralName::IpAddress(o) => match o.as_bytes().len() {
                    4 => {
                        let b: [u8; 4] = o.as_bytes().try_into()?;
                        ips.push(IpAddr::from(b));
                    }
                    16 => {
                        let b: [u8; 16] = o.as_bytes().try_into()?;
                        ips.push(IpAddr::from(b));
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok((dns, ips))
}

/// Issue a new DTLS server certificate and key (validity `validity_days` from now, backdated
/// an hour), keeping the current certificate's names and adding `extra_names`; the key is
/// written first (0600), then the certificate, each replaced atomically.
pub fn renew_dtls_certificate(
    data_dir: &Path,
    config: &Config,
    extra_names: &[String],
    validity_days: u32,
    now: SystemTime,
) -> Result<Renewed> {
    let cert_path = datadir::resolve(data_dir, &config.pki.server_cert);
    let key_path = datadir::resolve(data_dir, &config.pki.server_key);
    let current = datadir::read_certs(&cert_path)?;
    let (mut dns, mut ips) = san_names(current.first().context("empty server certificate")?)?;
    for n in extra_names {
        match n.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !dns.contains(n) => dns.push(n.clone()),
            Err(_) => {}
        }
    }
    if dns.is_empty() && ips.is_empty() {
        dns.push("localhost".into());
    }
    let ca = crate::revocation::load_issuing_ca(data_dir, config)?;
    let not_before = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
    let (cert, key) = est_proto::ca::generate_server_cert(
        &ca,
        &dns,
        &ips,
        not_before,
        Duration::from_secs(u64::from(validity_days) * 86_400),
        &mut rand::rngs::OsRng,
    )
    .map_err(|e| anyhow::anyhow!("issuing the server certificate: {e}"))?;
    let key_tmp = key_path.with_extension("key.new");
    datadir::write_private(&key_tmp, datadir::key_pem(&key)?.as_bytes())?;
    std::fs::rename(&key_tmp, &key_path)
        .with_context(|| format!("replacing {}", key_path.display()))?;
    let cert_tmp = cert_path.with_extension("pem.new");
    std::fs::write(&cert_tmp, datadir::cert_pem(&cert)?)
        .with_context(|| format!("writing {}", cert_tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cert_tmp, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::rename(&cert_tmp, &cert_path)
        .with_context(|| format!("replacing {}", cert_path.display()))?;
    let parsed = x509_cert::Certificate::from_der(&cert)?;
    Ok(Renewed {
        dns_names: dns,
        ip_addresses: ips,
        not_after: parsed.tbs_certificate.validity.not_after.to_system_time(),
    })
}
