//! The peer: libcoap 4.3's `coap-server-openssl` with certificate-based DTLS, serving its
//! default resources (including `/.well-known/core`) on loopback.
//!
//! It presents our data directory's DTLS certificate (so the meters' Implicit TA verifies it as
//! it verifies est-server) and trusts the manufacturer CA that signed the meters' IDevIDs
//! (`-R`, a trust store: libcoap's `-C` would also be sent to clients as the CA list). libcoap
//! serves plain CoAP on `-p PORT` and coaps on PORT+1.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};

use crate::server::{command_pinned, ChildServer};

/// The program we compare against.
pub const LIBCOAP_SERVER: &str = "coap-server-openssl";

/// Starts `coap-server-openssl` on 127.0.0.1:`port` (coaps on `port + 1`).
pub fn start_libcoap(
    bin: &Path,
    port: u16,
    cert_pem: &Path,
    key_pem: &Path,
    trust_pem: &Path,
    log: &Path,
    cpus: Option<&str>,
) -> Result<ChildServer> {
    let mut cmd = command_pinned(bin, cpus);
    cmd.args(["-A", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("-c")
        .arg(cert_pem)
        .arg("-j")
        .arg(key_pem)
        .arg("-R")
        .arg(trust_pem)
        .args(["-v", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::fs::File::create(log).context("libcoap log")?,
        ))
        .stderr(Stdio::from(
            std::fs::File::options()
                .append(true)
                .open(log)
                .context("libcoap log")?,
        ));
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let coaps_port = port.checked_add(1).context("port + 1 overflows")?;
    Ok(ChildServer {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], coaps_port)),
        name: "libcoap coap-server-openssl 4.3".into(),
    })
}

/// The command line, for the report.
pub fn describe(port: u16) -> String {
    format!(
        "{LIBCOAP_SERVER} -A 127.0.0.1 -p {port} -c DATA/dtls/server.pem -j DATA/dtls/server.key -R DATA/manufacturers/demo-manufacturer-ca.pem -v 3"
    )
}
