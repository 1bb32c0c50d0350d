//! The meter's credentials: IDevID fleets on disk, enrollment keys, PKCS#10 requests, and the checks
//! a meter runs on what the server returns.
//!
//! Fleet directory (written by `est-server factory mint --count N --out DIR`):
//!
//! ```text
//! DIR/fleet.json            {"manufacturer": "...", "devices": [{"serial", "cert", "key"}, ...]}
//! DIR/<serial>/idevid.pem   IDevID certificate (PEM; may be followed by intermediates)
//! DIR/<serial>/idevid.key   PKCS#8 P-256 private key (PEM)
//! DIR/manufacturer-ca.pem   the manufacturer CA
//! DIR/implicit-ta.pem       trust anchor(s) for the server's DTLS certificate (RFC 9148 §3 Implicit TA)
//! ```
//!
//! Without `fleet.json` the loader falls back to every sub-directory holding `idevid.pem` + `idevid.key`.

use std::fs;
use std::path::{Path, PathBuf};

use der::{Decode, Encode};
use p256::ecdsa::SigningKey;
use p256::pkcs8::EncodePrivateKey;
use rand::{CryptoRng, RngCore};
use serde::Deserialize;
use x509_cert::builder::{Builder, RequestBuilder};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::name::Name;
use x509_cert::Certificate;

/// Errors loading a fleet or building credentials.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The I/O error is the source (printed after the path by `{:#}` and error reports).
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("fleet directory {0} holds no devices (no fleet.json and no */idevid.pem)")]
    EmptyFleet(PathBuf),
    #[error("building the certificate request failed: {0}")]
    Csr(String),
    #[error("key error: {0}")]
    Key(String),
    #[error("explicit trust anchors: {0}")]
    TrustAnchors(String),
}

/// Why the meter rejected what the server returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("response is not a certificate: {0}")]
    Malformed(String),
    #[error("no certificate in the response")]
    Empty,
    #[error("the issued certificate carries a different public key than our CSR")]
    WrongPublicKey,
    #[error("the issued certificate does not chain to a CA from /crts: {0}")]
    Chain(String),
    #[error("the /crts response holds no CA certificate")]
    NoCaCerts,
}

/// One device's factory credentials.
#[derive(Clone)]
pub struct DeviceIdentity {
    pub serial: String,
    /// IDevID certificate chain, DER, leaf first.
    pub cert_chain_der: Vec<Vec<u8>>,
    /// PKCS#8 DER of the IDevID private key.
    pub key_pkcs8_der: Vec<u8>,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("serial", &self.serial)
            .field("chain_len", &self.cert_chain_der.len())
            .finish_non_exhaustive()
    }
}

/// A fleet of devices plus the meters' trust anchors.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub manufacturer: String,
    pub devices: Vec<DeviceIdentity>,
    /// The Implicit TA database (RFC 9148 §3): roots that verify the server's DTLS certificate.
    pub implicit_ta_der: Vec<Vec<u8>>,
}

#[derive(Deserialize)]
struct FleetJson {
    #[serde(default)]
    manufacturer: String,
    devices: Vec<FleetJsonDevice>,
}

#[derive(Deserialize)]
struct FleetJsonDevice {
    serial: String,
    #[serde(default)]
    cert: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// All PEM blocks with the given label (or any label if `None`), DER-decoded.
pub fn pem_blocks(
    path: &Path,
    bytes: &[u8],
    label: Option<&str>,
) -> Result<Vec<Vec<u8>>, PkiError> {
    let text = std::str::from_utf8(bytes).map_err(|_| PkiError::Format {
        path: path.to_path_buf(),
        reason: "not UTF-8 PEM".into(),
    })?;
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let Some(end_marker) = block.find("-----END ") else {
            break;
        };
        let after_end = &block[end_marker..];
        let end = after_end
            .find('\n')
            .map_or(block.len(), |i| end_marker + i + 1)
            .min(block.len());
        let pem = &block[..end];
        let (lbl, der) = der::pem::decode_vec(pem.as_bytes()).map_err(|e| PkiError::Format {
            path: path.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })?;
        if label.is_none_or(|l| l == lbl) {
            out.push(der);
        }
        rest = &block[end..];
    }
    Ok(out)
}

/// Loads the certificates of a PEM file (leaf first, as written).
pub fn load_cert_chain(path: &Path) -> Result<Vec<Vec<u8>>, PkiError> {
    let certs = pem_blocks(path, &read(path)?, Some("CERTIFICATE"))?;
    if certs.is_empty() {
        return Err(PkiError::Format {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    for c in &certs {
        Certificate::from_der(c).map_err(|e| PkiError::Format {
            path: path.to_path_buf(),
            reason: format!("bad certificate: {e}"),
        })?;
    }
    Ok(certs)
}

/// Loads a PKCS#8 private key (PEM `PRIVATE KEY`) and checks that it is a P-256 key.
pub fn load_pkcs8_key(path: &Path) -> Result<Vec<u8>, PkiError> {
    let keys = pem_blocks(path, &read(path)?, Some("PRIVATE KEY"))?;
    let key = keys.into_iter().next().ok_or_else(|| PkiError::Format {
        path: path.to_path_buf(),
        reason: "no PRIVATE KEY block (PKCS#8 expected)".into(),
    })?;
    use p256::pkcs8::DecodePrivateKey;
    SigningKey::from_pkcs8_der(&key).map_err(|e| PkiError::Format {
        path: path.to_path_buf(),
        reason: format!("not a P-256 PKCS#8 key: {e}"),
    })?;
    Ok(key)
}

/// Loads a fleet directory; at most `limit` devices (in fleet.json order, or sorted by directory name).
pub fn load_fleet(dir: &Path, limit: Option<usize>) -> Result<Fleet, PkiError> {
    let limit = limit.unwrap_or(usize::MAX);
    let json_path = dir.join("fleet.json");
    let mut devices = Vec::new();
    let mut manufacturer = String::new();
    if json_path.exists() {
        let fj: FleetJson =
            serde_json::from_slice(&read(&json_path)?).map_err(|e| PkiError::Format {
                path: json_path.clone(),
                reason: e.to_string(),
            })?;
        manufacturer = fj.manufacturer;
        for d in fj.devices.into_iter().take(limit) {
            let cert = dir.join(d.cert.unwrap_or_else(|| format!("{}/idevid.pem", d.serial)));
            let key = dir.join(d.key.unwrap_or_else(|| format!("{}/idevid.key", d.serial)));
            devices.push(DeviceIdentity {
                cert_chain_der: load_cert_chain(&cert)?,
                key_pkcs8_der: load_pkcs8_key(&key)?,
                serial: d.serial,
            });
        }
    } else {
        let mut subdirs: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|source| PkiError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("idevid.pem").exists() && p.join("idevid.key").exists())
            .collect();
        subdirs.sort();
        for sd in subdirs.into_iter().take(limit) {
            let serial = sd
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            devices.push(DeviceIdentity {
                cert_chain_der: load_cert_chain(&sd.join("idevid.pem"))?,
                key_pkcs8_der: load_pkcs8_key(&sd.join("idevid.key"))?,
                serial,
            });
        }
    }
    if devices.is_empty() {
        return Err(PkiError::EmptyFleet(dir.to_path_buf()));
    }
    let ta_path = dir.join("implicit-ta.pem");
    let implicit_ta_der = if ta_path.exists() {
        load_cert_chain(&ta_path)?
    } else {
        Vec::new()
    };
    Ok(Fleet {
        manufacturer,
        devices,
        implicit_ta_der,
    })
}

/// The meter's enrollment key pair.
#[derive(Clone)]
pub struct EnrollmentKey {
    key: KeyPair,
    /// DER SubjectPublicKeyInfo of the key (compared with the issued certificate).
    pub spki_der: Vec<u8>,
}

#[derive(Clone)]
enum KeyPair {
    /// Drawn from the meter's seeded generator, signing with p256 (RFC 6979 deterministic
    /// signatures): the same seed gives the same key and the same CSR, byte for byte.
    Seeded(SigningKey),
    /// From the operating system's generator, generated and signing with ring: a few times
    /// cheaper than p256 (what the load generator uses), reproducible from nothing.
    System(std::sync::Arc<RingKey>),
}

/// A ring P-256 key pair, its PKCS#8 DER and its public key in p256's form (for the CSR
/// builder's SubjectPublicKeyInfo).
struct RingKey {
    pair: ring::signature::EcdsaKeyPair,
    pkcs8_der: Vec<u8>,
    verifying: p256::ecdsa::VerifyingKey,
}

impl std::fmt::Debug for EnrollmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrollmentKey(P-256)")
    }
}

impl EnrollmentKey {
    /// A fresh P-256 key from the meter's seeded generator (reproducible per run seed; simulation only).
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> EnrollmentKey {
        let signing_key = SigningKey::random(rng);
        let spki_der = spki_of(signing_key.verifying_key());
        EnrollmentKey {
            key: KeyPair::Seeded(signing_key),
            spki_der,
        }
    }

    /// A fresh P-256 key from the operating system's generator, made with ring (a fixed-base
    /// multiplication in ring's P-256 code rather than p256's); its CSR signatures are ring's
    /// too. Not reproducible: for load generation, where every enrollment pays for its key.
    pub fn generate_system() -> Result<EnrollmentKey, PkiError> {
        let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .map_err(|e| PkiError::Key(format!("generating a P-256 key: {e}")))?;
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
            .map_err(|e| PkiError::Key(format!("reading the generated key: {e}")))?;
        use ring::signature::KeyPair as _;
        let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(pair.public_key().as_ref())
            .map_err(|e| PkiError::Key(format!("the generated public key: {e}")))?;
        let spki_der = spki_of(&verifying);
        Ok(EnrollmentKey {
            key: KeyPair::System(std::sync::Arc::new(RingKey {
                pair,
                pkcs8_der: pkcs8.as_ref().to_vec(),
                verifying,
            })),
            spki_der,
        })
    }

    /// PKCS#8 DER of the key (for the DTLS client certificate after enrollment).
    pub fn pkcs8_der(&self) -> Result<Vec<u8>, PkiError> {
        match &self.key {
            KeyPair::Seeded(k) => Ok(k
                .to_pkcs8_der()
                .map_err(|e| PkiError::Key(e.to_string()))?
                .as_bytes()
                .to_vec()),
            KeyPair::System(r) => Ok(r.pkcs8_der.clone()),
        }
    }

    /// Builds and self-signs a PKCS#10 request for `subject` with this key.
    fn request(&self, subject: Name, sans: &[SubjectAltName]) -> Result<Vec<u8>, PkiError> {
        fn build<S>(signer: &S, subject: Name, sans: &[SubjectAltName]) -> Result<Vec<u8>, PkiError>
        where
            S: signature::Keypair
                + spki::DynSignatureAlgorithmIdentifier
                + signature::Signer<p256::ecdsa::DerSignature>,
            S::VerifyingKey: p256::pkcs8::EncodePublicKey,
        {
            let mut builder =
                RequestBuilder::new(subject, signer).map_err(|e| PkiError::Csr(e.to_string()))?;
            for san in sans {
                builder
                    .add_extension(san)
                    .map_err(|e| PkiError::Csr(e.to_string()))?;
            }
            let req = builder
                .build::<p256::ecdsa::DerSignature>()
                .map_err(|e| PkiError::Csr(e.to_string()))?;
            req.to_der().map_err(|e| PkiError::Csr(e.to_string()))
        }
        match &self.key {
            KeyPair::Seeded(k) => build(k, subject, sans),
            KeyPair::System(r) => build(&**r, subject, sans),
        }
    }
}

use p256::ecdsa::signature;

impl signature::Keypair for RingKey {
    type VerifyingKey = p256::ecdsa::VerifyingKey;
    fn verifying_key(&self) -> Self::VerifyingKey {
        self.verifying
    }
}

impl spki::DynSignatureAlgorithmIdentifier for RingKey {
    fn signature_algorithm_identifier(&self) -> spki::Result<spki::AlgorithmIdentifierOwned> {
        // RFC 5758 §3.2: ecdsa-with-SHA256, parameters absent.
        Ok(spki::AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc5912::ECDSA_WITH_SHA_256,
            parameters: None,
        })
    }
}

impl signature::Signer<p256::ecdsa::DerSignature> for RingKey {
    fn try_sign(&self, msg: &[u8]) -> Result<p256::ecdsa::DerSignature, signature::Error> {
        let rng = ring::rand::SystemRandom::new();
        let sig = self
            .pair
            .sign(&rng, msg)
            .map_err(|_| signature::Error::new())?;
        p256::ecdsa::DerSignature::from_bytes(sig.as_ref())
    }
}

fn spki_of(key: &p256::ecdsa::VerifyingKey) -> Vec<u8> {
    use p256::pkcs8::EncodePublicKey;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default()
}

/// The X.520 serialNumber (2.5.4.5) of a name, if present.
pub fn serial_number_of(name: &Name) -> Option<String> {
    for rdn in name.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == const_oid::db::rfc4519::SERIAL_NUMBER {
                if let Ok(s) = der::asn1::PrintableStringRef::try_from(&atv.value) {
                    return Some(s.to_string());
                }
                if let Ok(s) = der::asn1::Utf8StringRef::try_from(&atv.value) {
                    return Some(s.to_string());
                }
            }
        }
    }
    None
}

/// Builds the PKCS#10 request (RFC 2986) for /sen or /sren.
///
/// Subject: `serialNumber=<serial>` taken from the certificate the meter authenticates with (or the
/// fleet serial). If that certificate has a subjectAltName (the IEEE 802.1AR hardwareModuleName), it
/// is requested unchanged through an extensionRequest, as RFC 7030 §4.2.2 requires for re-enrollment.
pub fn build_csr(
    key: &EnrollmentKey,
    serial: &str,
    auth_cert_der: Option<&[u8]>,
) -> Result<Vec<u8>, PkiError> {
    let mut serial = serial.to_string();
    let mut san: Option<SubjectAltName> = None;
    if let Some(der) = auth_cert_der {
        let cert = Certificate::from_der(der).map_err(|e| PkiError::Csr(e.to_string()))?;
        if let Some(s) = serial_number_of(&cert.tbs_certificate.subject) {
            serial = s;
        }
        if let Some(exts) = &cert.tbs_certificate.extensions {
            for ext in exts {
                if ext.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME {
                    san = Some(
                        SubjectAltName::from_der(ext.extn_value.as_bytes())
                            .map_err(|e| PkiError::Csr(e.to_string()))?,
                    );
                }
            }
        }
    }
    // serialNumber is a PrintableString (X.520); reject characters it cannot carry.
    if serial.is_empty()
        || !serial
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " '()+,-./:=?".contains(c))
    {
        return Err(PkiError::Csr(format!(
            "serial `{serial}` is not a PrintableString"
        )));
    }
    let subject: Name = format!("serialNumber={serial}")
        .parse()
        .map_err(|e: der::Error| PkiError::Csr(e.to_string()))?;
    key.request(subject, san.as_slice())
}

/// Builds the PKCS#10 request for /sren: RFC 7030 §4.2.2 requires the Subject and subjectAltName
/// to be identical to those of the certificate being renewed, so both are copied from `current`.
pub fn build_renewal_csr(key: &EnrollmentKey, current_der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let cert = Certificate::from_der(current_der).map_err(|e| PkiError::Csr(e.to_string()))?;
    let mut sans = Vec::new();
    if let Some(exts) = &cert.tbs_certificate.extensions {
        for ext in exts {
            if ext.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME {
                sans.push(
                    SubjectAltName::from_der(ext.extn_value.as_bytes())
                        .map_err(|e| PkiError::Csr(e.to_string()))?,
                );
            }
        }
    }
    key.request(cert.tbs_certificate.subject, &sans)
}

/// Checks an ECDSA P-256/SHA-256 signature of `cert` with `issuer`'s public key (ring).
fn signed_by(cert: &Certificate, issuer: &Certificate) -> Result<(), String> {
    let tbs = cert
        .tbs_certificate
        .to_der()
        .map_err(|e| format!("re-encoding TBSCertificate: {e}"))?;
    let sig = cert
        .signature
        .as_bytes()
        .ok_or_else(|| "signature BIT STRING has unused bits".to_string())?;
    let key = issuer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| "issuer key BIT STRING has unused bits".to_string())?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(&tbs, sig)
        .map_err(|_| "bad signature".to_string())
}

/// Parses the CA certificates of a /crts response (already unwrapped to DER certificates).
pub fn parse_ca_certs(certs_der: &[Vec<u8>]) -> Result<Vec<Certificate>, VerifyError> {
    if certs_der.is_empty() {
        return Err(VerifyError::NoCaCerts);
    }
    certs_der
        .iter()
        .map(|d| Certificate::from_der(d).map_err(|e| VerifyError::Malformed(e.to_string())))
        .collect()
}

/// Verifies an issued certificate: it carries our public key and chains (signature by signature, up
/// to 4 levels) to a certificate from `/crts`. Returns the leaf DER.
///
/// `returned` are the certificates of the /sen or /sren response (leaf and perhaps intermediates).
/// The certificate the meter was issued, as [`verify_issued`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedLeaf {
    pub der: Vec<u8>,
    /// Its serialNumber, hex (lower case), read from the parse that verified it.
    pub serial_hex: String,
}

pub fn verify_issued(
    returned: &[Vec<u8>],
    our_spki_der: &[u8],
    ca_certs: &[Certificate],
) -> Result<IssuedLeaf, VerifyError> {
    if returned.is_empty() {
        return Err(VerifyError::Empty);
    }
    let parsed: Vec<(Vec<u8>, Certificate)> = returned
        .iter()
        .map(|d| {
            Certificate::from_der(d)
                .map(|c| (d.clone(), c))
                .map_err(|e| VerifyError::Malformed(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    // The leaf is the certificate with our key (a PKCS#7 SET has no order).
    let (leaf_der, leaf) = parsed
        .iter()
        .find(|(_, c)| {
            c.tbs_certificate
                .subject_public_key_info
                .to_der()
                .is_ok_and(|d| d == our_spki_der)
        })
        .ok_or(VerifyError::WrongPublicKey)?;
    if ca_certs.is_empty() {
        return Err(VerifyError::NoCaCerts);
    }
    let pool: Vec<&Certificate> = ca_certs
        .iter()
        .chain(parsed.iter().map(|(_, c)| c))
        .collect();
    let mut current = leaf;
    for _depth in 0..4 {
        let issuer_name = &current.tbs_certificate.issuer;
        // Formatted only on failure: a Name's Display looks every attribute up by OID.
        let mut last_err = None;
        let mut next = None;
        for cand in pool
            .iter()
            .filter(|c| &c.tbs_certificate.subject == issuer_name)
        {
            match signed_by(current, cand) {
                Ok(()) => {
                    next = Some(*cand);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let Some(issuer) = next else {
            return Err(VerifyError::Chain(
                last_err.unwrap_or_else(|| format!("no certificate named {issuer_name}")),
            ));
        };
        // Reached a certificate from /crts: trusted (the Explicit TA database, RFC 9148 §3).
        if ca_certs.iter().any(|c| c == issuer) {
            return Ok(IssuedLeaf {
                der: leaf_der.clone(),
                serial_hex: hex::encode(leaf.tbs_certificate.serial_number.as_bytes()),
            });
        }
        current = issuer;
    }
    Err(VerifyError::Chain("chain longer than 4".into()))
}

#[cfg(test)]
pub(crate) mod test_pki {
    //! A small rcgen PKI for unit tests (CA, server cert, device IDevIDs).
    #![allow(clippy::unwrap_used)]
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    pub(crate) struct TestCa {
        pub(crate) cert_der: Vec<u8>,
        pub(crate) params: CertificateParams,
        pub(crate) key: KeyPair,
    }

    pub(crate) fn ca(name: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.clone().self_signed(&key).unwrap();
        TestCa {
            cert_der: cert.der().to_vec(),
            params,
            key,
        }
    }

    /// Issues an end-entity certificate for the key `key` signed by `ca`.
    pub(crate) fn issue_for(ca: &TestCa, key: &super::EnrollmentKey, serial: &str) -> Vec<u8> {
        let issuer = ca.params.clone().self_signed(&ca.key).unwrap();
        let pk = KeyPair::try_from(key.pkcs8_der().unwrap()).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 5]), serial);
        params
            .signed_by(&pk, &issuer, &ca.key)
            .unwrap()
            .der()
            .to_vec()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn csr_carries_serial_and_own_key_and_verifies() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let key = EnrollmentKey::generate(&mut rng);
        let der = build_csr(&key, "SN000042", None).unwrap();
        let req = x509_cert::request::CertReq::from_der(&der).unwrap();
        assert_eq!(
            serial_number_of(&req.info.subject).as_deref(),
            Some("SN000042")
        );
        assert_eq!(req.info.public_key.to_der().unwrap(), key.spki_der);
        // Self-signature verifies with ring.
        let tbs = req.info.to_der().unwrap();
        let pk = req.info.public_key.subject_public_key.as_bytes().unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, pk)
            .verify(&tbs, req.signature.as_bytes().unwrap())
            .unwrap();
        // Reproducible from the seed.
        let mut rng2 = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        assert_eq!(EnrollmentKey::generate(&mut rng2).spki_der, key.spki_der);
        assert!(build_csr(&key, "bad\u{1}serial", None).is_err());
    }

    /// The server's check of a CSR: parse, the self-signature verifies, key and subject.
    fn server_reads(der: &[u8]) -> est_proto::ca::ParsedCsr {
        est_proto::ca::parse_and_verify_csr(der, 4096).unwrap()
    }

    #[test]
    fn system_keys_are_fresh_and_their_csrs_verify_like_seeded_ones() {
        let a = EnrollmentKey::generate_system().unwrap();
        let b = EnrollmentKey::generate_system().unwrap();
        assert_ne!(a.spki_der, b.spki_der, "every key is fresh");
        let der = build_csr(&a, "SN000043", None).unwrap();
        let req = x509_cert::request::CertReq::from_der(&der).unwrap();
        assert_eq!(
            serial_number_of(&req.info.subject).as_deref(),
            Some("SN000043")
        );
        assert_eq!(req.info.public_key.to_der().unwrap(), a.spki_der);
        assert_eq!(
            req.algorithm.oid,
            const_oid::db::rfc5912::ECDSA_WITH_SHA_256
        );
        assert_eq!(req.algorithm.parameters, None);
        let tbs = req.info.to_der().unwrap();
        let pk = req.info.public_key.subject_public_key.as_bytes().unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, pk)
            .verify(&tbs, req.signature.as_bytes().unwrap())
            .unwrap();
        server_reads(&der);
        // Same layout as the seeded key's request (only the key and signature differ).
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let seeded = EnrollmentKey::generate(&mut rng);
        let seeded_req =
            x509_cert::request::CertReq::from_der(&build_csr(&seeded, "SN000043", None).unwrap())
                .unwrap();
        assert_eq!(seeded_req.info.subject, req.info.subject);
        assert_eq!(seeded_req.info.attributes, req.info.attributes);
        assert_eq!(seeded_req.algorithm, req.algorithm);
        // Two requests of one key: two signatures (ring's are randomised), one key.
        let again = build_csr(&a, "SN000043", None).unwrap();
        assert_eq!(
            server_reads(&again).public_key.to_der().unwrap(),
            a.spki_der
        );
        assert_ne!(again, der, "a fresh signature per request");
        // The PKCS#8 document is ring's and reads back as the same key.
        let pkcs8 = a.pkcs8_der().unwrap();
        use ring::signature::KeyPair as _;
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &pkcs8,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        assert_eq!(
            &a.spki_der[a.spki_der.len() - 65..],
            pair.public_key().as_ref()
        );
        assert!(build_csr(&a, "bad\u{1}serial", None).is_err());
    }

    #[test]
    fn system_key_renewal_csr_copies_subject_and_san() {
        let ca = test_pki::ca("Test EST CA");
        let key = EnrollmentKey::generate_system().unwrap();
        let leaf = test_pki::issue_for(&ca, &key, "SN7");
        let der = build_renewal_csr(&key, &leaf).unwrap();
        let req = x509_cert::request::CertReq::from_der(&der).unwrap();
        let cert = Certificate::from_der(&leaf).unwrap();
        assert_eq!(req.info.subject, cert.tbs_certificate.subject);
        assert_eq!(req.info.public_key.to_der().unwrap(), key.spki_der);
        server_reads(&der);
        let ca_certs = parse_ca_certs(std::slice::from_ref(&ca.cert_der)).unwrap();
        assert_eq!(
            verify_issued(std::slice::from_ref(&leaf), &key.spki_der, &ca_certs)
                .unwrap()
                .der,
            leaf
        );
    }

    #[test]
    fn issued_certificate_verification() {
        let ca = test_pki::ca("Test EST CA");
        let other = test_pki::ca("Test EST CA"); // same name, other key
        let ca_certs = parse_ca_certs(std::slice::from_ref(&ca.cert_der)).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let key = EnrollmentKey::generate(&mut rng);
        let leaf = test_pki::issue_for(&ca, &key, "SN1");
        assert_eq!(
            verify_issued(std::slice::from_ref(&leaf), &key.spki_der, &ca_certs)
                .unwrap()
                .der,
            leaf
        );
        // Wrong key.
        let key2 = EnrollmentKey::generate(&mut rng);
        assert_eq!(
            verify_issued(std::slice::from_ref(&leaf), &key2.spki_der, &ca_certs),
            Err(VerifyError::WrongPublicKey)
        );
        // Signed by an impostor CA with the same name.
        let forged = test_pki::issue_for(&other, &key, "SN1");
        assert!(matches!(
            verify_issued(&[forged], &key.spki_der, &ca_certs),
            Err(VerifyError::Chain(_))
        ));
        assert_eq!(
            verify_issued(&[], &key.spki_der, &ca_certs),
            Err(VerifyError::Empty)
        );
        assert!(matches!(
            verify_issued(&[vec![0x30, 0x00]], &key.spki_der, &ca_certs),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn fleet_loading_from_directory() {
        let dir = tempfile::tempdir().unwrap();
        let ca = test_pki::ca("Manufacturer CA");
        let mut devices = Vec::new();
        for i in 0..3 {
            let serial = format!("SN{i:06}");
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i);
            let key = EnrollmentKey::generate(&mut rng);
            let cert = test_pki::issue_for(&ca, &key, &serial);
            let sd = dir.path().join(&serial);
            fs::create_dir_all(&sd).unwrap();
            let cert_pem =
                der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &cert).unwrap();
            fs::write(sd.join("idevid.pem"), cert_pem).unwrap();
            let key_pem = der::pem::encode_string(
                "PRIVATE KEY",
                der::pem::LineEnding::LF,
                &key.pkcs8_der().unwrap(),
            )
            .unwrap();
            fs::write(sd.join("idevid.key"), key_pem.as_bytes()).unwrap();
            devices.push(serde_json::json!({"serial": serial, "cert": format!("{serial}/idevid.pem"), "key": format!("{serial}/idevid.key")}));
        }
        let ta =
            der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &ca.cert_der).unwrap();
        fs::write(dir.path().join("implicit-ta.pem"), ta).unwrap();
        // Without fleet.json: directory scan.
        let f = load_fleet(dir.path(), None).unwrap();
        assert_eq!(f.devices.len(), 3);
        assert_eq!(f.devices[0].serial, "SN000000");
        assert_eq!(f.implicit_ta_der.len(), 1);
        // With fleet.json and a limit.
        fs::write(
            dir.path().join("fleet.json"),
            serde_json::json!({"manufacturer": "ACME", "devices": devices}).to_string(),
        )
        .unwrap();
        let f = load_fleet(dir.path(), Some(2)).unwrap();
        assert_eq!(f.manufacturer, "ACME");
        assert_eq!(f.devices.len(), 2);
        assert_eq!(f.devices[1].serial, "SN000001");
        // The CSR of a device copies the serialNumber of its IDevID.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let k = EnrollmentKey::generate(&mut rng);
        let csr = build_csr(&k, "ignored", Some(&f.devices[1].cert_chain_der[0])).unwrap();
        let req = x509_cert::request::CertReq::from_der(&csr).unwrap();
        assert_eq!(
            serial_number_of(&req.info.subject).as_deref(),
            Some("SN000001")
        );
        assert!(load_fleet(&dir.path().join("nope"), None).is_err());
    }
}
