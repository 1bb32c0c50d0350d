//! `est-server factory mint`: what a meter factory does, for demos, firmware tests and
//! the simulator. Each device gets a P-256 key and an IDevID signed by the demo
//! manufacturer CA, with its serial in the subject's serialNumber and in a
//! hardwareModuleName subjectAltName (IEEE 802.1AR, RFC 4108).
//!
//! ```text
//! OUT/fleet.json                   {"manufacturer": ..., "devices": [{"serial", "cert", "key", "chain"}]}
//! OUT/<serial>/idevid.pem          the IDevID
//! OUT/<serial>/idevid.key          its PKCS#8 key (0600)
//! OUT/<serial>/idevid-chain.pem    IDevID + manufacturer CA (for clients that send the chain)
//! OUT/manufacturer-ca.pem          the manufacturer CA
//! OUT/implicit-ta.pem              the CA that verifies the server's DTLS certificate
//! ```
//!
//! Serials are checked before anything is written ([`safefs::validate_serial`]: printable
//! ASCII, at most 64 bytes, no path separator, not `.` or `..`), so nothing lands outside
//! OUT. OUT (when created) is 0755, each device directory 0700, keys 0600, the rest 0644.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use est_proto::ca::{self, ObjectIdentifier};
use serde::Serialize;

use crate::datadir::{self, cert_pem, key_pem, resolve, write_private, write_public};
use crate::safefs;

/// hwType of the demo devices: the private-enterprise arc used by the RFC 9148 App. A.2
/// example (1.3.6.1.4.1.6175.10.1).
pub const DEMO_HW_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.6175.10.1");

#[derive(Serialize)]
struct FleetDevice {
    serial: String,
    cert: String,
    key: String,
    chain: String,
}

#[derive(Serialize)]
struct Fleet {
    manufacturer: String,
    hw_type: String,
    devices: Vec<FleetDevice>,
}

/// Mint IDevIDs for `serials` into `out`, signed by the data directory's manufacturer CA.
pub fn mint(
    data_dir: &Path,
    config: &crate::config::Config,
    serials: &[String],
    out: &Path,
    validity_years: Option<u32>,
    mut progress: impl FnMut(usize),
) -> Result<PathBuf> {
    let mfr_cert_path = resolve(
        data_dir,
        config
            .pki
            .manufacturer_cas
            .first()
            .context("no manufacturer CA configured")?,
    );
    let mfr_key_path = mfr_cert_path.with_extension("key");
    let maker = datadir::load_ca(&mfr_cert_path, &mfr_key_path).with_context(|| {
        format!(
            "the manufacturer CA key {} is needed to mint devices",
            mfr_key_path.display()
        )
    })?;
    // Every serial names a directory under `out`: check them all before writing anything.
    for serial in serials {
        safefs::validate_serial(serial)?;
    }
    let issuing_ca = datadir::read_certs(&resolve(data_dir, &config.pki.issuing_ca_cert))?;
    safefs::create_dir(out, safefs::PUBLIC_DIR)?;
    let now = SystemTime::now();
    let not_before = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
    // 802.1AR: an IDevID that should not expire carries 99991231235959Z.
    let not_after = match validity_years {
        Some(y) => not_before
            .checked_add(Duration::from_secs(u64::from(y) * 365 * 86_400))
            .context("validity overflows")?,
        None => ca::idevid_no_expiry(),
    };
    let mut rng = rand::rngs::OsRng;
    let maker_pem = cert_pem(maker.certificate_der())?;
    let mut devices = Vec::with_capacity(serials.len());
    for (i, serial) in serials.iter().enumerate() {
        let (cert, key) = ca::mint_idevid(
            &maker,
            serial,
            DEMO_HW_TYPE,
            not_before,
            not_after,
            &mut rng,
        )
        .map_err(|e| anyhow::anyhow!("minting {serial}: {e}"))?;
        let dir = out.join(serial);
        datadir::create_private_dir(&dir)?;
        let pem = cert_pem(&cert)?;
        write_public(&dir.join("idevid.pem"), pem.as_bytes())?;
        write_private(&dir.join("idevid.key"), key_pem(&key)?.as_bytes())?;
        write_public(
            &dir.join("idevid-chain.pem"),
            format!("{pem}{maker_pem}").as_bytes(),
        )?;
        devices.push(FleetDevice {
            serial: serial.clone(),
            cert: format!("{serial}/idevid.pem"),
            key: format!("{serial}/idevid.key"),
            chain: format!("{serial}/idevid-chain.pem"),
        });
        progress(i + 1);
    }
    write_public(&out.join("manufacturer-ca.pem"), maker_pem.as_bytes())?;
    let ta: String = issuing_ca
        .iter()
        .map(|c| cert_pem(c))
        .collect::<Result<Vec<_>>>()?
        .concat();
    write_public(&out.join("implicit-ta.pem"), ta.as_bytes())?;
    let fleet = Fleet {
        manufacturer: ca::organization(maker.subject()).unwrap_or_default(),
        hw_type: DEMO_HW_TYPE.to_string(),
        devices,
    };
    write_public(&out.join("fleet.json"), &serde_json::to_vec_pretty(&fleet)?)?;
    Ok(out.to_path_buf())
}

/// Serials `prefix` + zero-padded index, `start..start+count`.
pub fn serial_range(prefix: &str, start: u64, count: u64) -> Vec<String> {
    (start..start.saturating_add(count))
        .map(|i| format!("{prefix}{i:06}"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn serial_range_is_padded() {
        assert_eq!(
            super::serial_range("SN", 9, 2),
            vec!["SN000009", "SN000010"]
        );
    }
}
