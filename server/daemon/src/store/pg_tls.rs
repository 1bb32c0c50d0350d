//! TLS from est-server to PostgreSQL (`[storage] url` with `sslmode`, `[storage] ca_file`).
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` and leaves the certificate check to
//! the TLS connector; libpq's `verify-ca` and `verify-full` are what a database on another
//! host needs. [`parse_url`] takes all five (libpq's meanings) and [`connector`] builds the
//! rustls connector (ring provider, tokio-postgres-rustls) that checks what the mode asks:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (tokio-postgres's default) | if the server offers it | as `require` |
//! | `require` | always | chained to `ca_file` if set (as libpq with a root certificate), else not checked (a warning at start) |
//! | `verify-ca` | always | chained to `ca_file` (required) |
//! | `verify-full` | always | chained to `ca_file` (required), and valid for the host of the URL |
//!
//! PostgreSQL does not offer TLS on a unix socket: `prefer` stays plain there, `require` and
//! the `verify-*` modes fail.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, RootCertStore};
use rustls::{ClientConfig, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`, all five values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether the mode checks the server's certificate against `ca_file` (which it needs).
    pub fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }
}

/// The connection string as tokio-postgres takes it, and the `sslmode` it asked for.
/// `verify-ca` and `verify-full` (which tokio-postgres does not parse) become `require` for
/// tokio-postgres, the check being the connector's.
pub fn parse_url(url: &str) -> Result<(tokio_postgres::Config, SslMode), String> {
    let mut text = url.to_owned();
    let mut verify = None;
    for (value, mode) in [
        ("verify-full", SslMode::VerifyFull),
        ("verify-ca", SslMode::VerifyCa),
    ] {
        let needle = format!("sslmode={value}");
        let mut from = 0;
        while let Some(at) = text[from..].find(&needle).map(|i| i + from) {
            let end = at + needle.len();
            let before_ok = at == 0
                || text[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c == '?' || c == '&' || c.is_whitespace());
            let after_ok = text[end..]
                .chars()
                .next()
                .is_none_or(|c| c == '&' || c.is_whitespace());
            if before_ok && after_ok {
                text.replace_range(at..end, "sslmode=require");
                verify = Some(mode);
                from = at;
            } else {
                from = end;
            }
        }
    }
    let config: tokio_postgres::Config = text.parse().map_err(|e| format!("{e}"))?;
    let mode = verify.unwrap_or(match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => SslMode::Disable,
        tokio_postgres::config::SslMode::Require => SslMode::Require,
        _ => SslMode::Prefer,
    });
    Ok((config, mode))
}

/// The trust anchors of `ca_file` (PEM, one or more certificates, or one DER certificate).
fn roots(ca_file: &Path) -> Result<RootCertStore, String> {
    let certs =
        crate::datadir::read_certs(ca_file).map_err(|e| format!("storage.ca_file: {e:#}"))?;
    let mut roots = RootCertStore::empty();
    for der in certs {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| format!("storage.ca_file {}: {e}", ca_file.display()))?;
    }
    Ok(roots)
}

/// The TLS connector for `mode`, or `None` for `disable`. `ca_file` is required by the
/// `verify-*` modes; with `prefer` or `require` it makes them check the chain as
/// `verify-ca` does.
pub fn connector(
    mode: SslMode,
    ca_file: Option<&Path>,
) -> Result<Option<MakeRustlsConnect>, String> {
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS to PostgreSQL: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (ca_file, mode) {
        (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(format!(
                "sslmode={} needs storage.ca_file (the CA that issued the PostgreSQL server's certificate)",
                mode.as_str()
            ))
        }
        (None, _) => Arc::new(Unverified { provider }),
        (Some(ca), _) => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
                    .build()
                    .map_err(|e| format!("storage.ca_file {}: {e}", ca.display()))?;
            if mode == SslMode::VerifyFull {
                webpki as Arc<dyn ServerCertVerifier>
            } else {
                Arc::new(ChainOnly { webpki }) as Arc<dyn ServerCertVerifier>
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(MakeRustlsConnect::new(config)))
}

/// `verify-ca` (and `require` with a CA file): the chain to the CA, whatever host names the
/// certificate carries. The chain is checked before the name (rustls's
/// `WebPkiServerVerifier`), so a name mismatch means the chain was good.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `require` or `prefer` without a CA file (libpq's meaning): encrypted, the server not
/// authenticated. The handshake's signatures are still checked (with the certificate's key).
#[derive(Debug)]
struct Unverified {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_sslmode_parses_in_both_forms() {
        for (mode, want) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let (cfg, got) = parse_url(&format!(
                "postgres://est@db.example:5433/est?sslmode={mode}&connect_timeout=3"
            ))
            .unwrap();
            assert_eq!(got, want, "{mode}");
            assert_eq!(cfg.get_ports(), [5433]);
            assert_eq!(cfg.get_dbname(), Some("est"));
            let (cfg, got) = parse_url(&format!(
                "host=db.example sslmode={mode} dbname=est user=est"
            ))
            .unwrap();
            assert_eq!(got, want, "{mode}");
            assert_eq!(cfg.get_user(), Some("est"));
            if want.verifies() {
                assert_eq!(
                    cfg.get_ssl_mode(),
                    tokio_postgres::config::SslMode::Require,
                    "{mode}: TLS required at the protocol level"
                );
            }
        }
        // No sslmode: tokio-postgres's default, prefer.
        assert_eq!(
            parse_url("host=/run/postgresql dbname=est").unwrap().1,
            SslMode::Prefer
        );
    }

    #[test]
    fn bad_sslmodes_are_refused() {
        for url in [
            "postgres://est@db/est?sslmode=verify",
            "postgres://est@db/est?sslmode=verify-fullx",
            "host=db sslmode=allow-all",
            "host=db xsslmode=verify-full",
        ] {
            assert!(parse_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn verify_modes_need_a_ca_file() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let err = connector(mode, None).err().unwrap();
            assert!(
                err.contains("storage.ca_file") && err.contains(mode.as_str()),
                "{err}"
            );
        }
        assert!(connector(SslMode::Disable, None).unwrap().is_none());
        assert!(connector(SslMode::Require, None).unwrap().is_some());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        let err = connector(SslMode::VerifyFull, Some(&missing))
            .err()
            .unwrap();
        assert!(err.contains("storage.ca_file"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = connector(SslMode::VerifyCa, Some(&junk)).err().unwrap();
        assert!(err.contains("storage.ca_file"), "{err}");
    }
}
