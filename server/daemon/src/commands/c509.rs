//! `est-server c509 encode|decode`: DER <-> C509 for certificates and requests.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cli::C509Command;

pub(crate) fn run(cmd: C509Command) -> Result<()> {
    use cbor_schemas::{c509, cose};
    use std::io::Write;
    let emit = |bytes: &[u8], out: Option<PathBuf>, info: Option<String>| -> Result<()> {
        if let Some(o) = &out {
            // Certificates and requests are public: 0644 whatever the umask.
            est_server::datadir::write_public(o, bytes)?;
        }
        match info {
            Some(text) => println!("{text}"),
            None if out.is_none() => std::io::stdout().write_all(bytes)?,
            None => {}
        }
        Ok(())
    };
    match cmd {
        C509Command::Encode {
            file,
            out,
            cose: wrap,
            info,
        } => {
            let input = read_der_or_pem(&file)?;
            let (c509, what) = match c509::certificate_der_to_c509(&input) {
                Ok(cert) if wrap => (cose::cose_c509_chain(&[cert])?, "COSE_C509 certificate"),
                Ok(cert) => (cert, "C509Certificate (type 3)"),
                Err(cert_err) => match c509::csr_der_to_c509(&input) {
                    Ok(csr) => (csr, "C509CertificationRequest (type 3)"),
                    Err(csr_err) => bail!(
                        "{}: not convertible as a certificate ({cert_err}) nor as a PKCS#10 request ({csr_err})",
                        file.display()
                    ),
                },
            };
            let text = info.then(|| {
                let dump = c509::describe(&c509).unwrap_or_else(|e| format!("(dump failed: {e})"));
                format!(
                    "{what}: DER {} bytes -> C509 {} bytes ({:.0}%)\n{dump}",
                    input.len(),
                    c509.len(),
                    100.0 * c509.len() as f64 / input.len().max(1) as f64
                )
            });
            emit(&c509, out, text)
        }
        C509Command::Decode { file, out, info } => {
            let input =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let der = if let Ok(csr) = c509::C509Csr::decode(&input) {
                csr.to_der()?
            } else if let Ok(d) = c509::certificate_c509_to_der(&input) {
                d
            } else {
                let certs = cose::decode_cose_c509(&input).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not a C509 certificate, request or COSE_C509: {e}",
                        file.display()
                    )
                })?;
                let first = certs.first().context("empty COSE_C509")?;
                c509::certificate_c509_to_der(first)?
            };
            let text = info.then(|| {
                let dump = c509::describe(&input).unwrap_or_else(|e| format!("(dump failed: {e})"));
                format!(
                    "C509 {} bytes -> DER {} bytes\n{dump}",
                    input.len(),
                    der.len()
                )
            });
            emit(&der, out, text)
        }
    }
}

fn read_der_or_pem(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.first() == Some(&0x30) {
        return Ok(bytes);
    }
    let (_label, der) = der::pem::decode_vec(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: neither DER nor PEM: {e}", path.display()))?;
    Ok(der)
}
