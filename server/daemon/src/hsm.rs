//! The issuing CAs' private keys in an HSM, through PKCS#11 ([`cryptoki`]).
//!
//! A key never leaves the token: it is generated there (`CKA_SENSITIVE`, not
//! `CKA_EXTRACTABLE`) by `est-server init --hsm-*` (the P-256 CA) or `est-server ca
//! create-p384 --hsm-key-label` (the P-384 CA of `[ca_p384]`), or an existing key pair is
//! used, found by its label. Every certificate a CA issues (LDevIDs, the server's DTLS
//! certificate) and every CRL is signed with `CKM_ECDSA` over a digest computed here
//! (SHA-256 for the P-256 key, SHA-384 for the P-384 one); the token's raw `r || s` is
//! re-encoded as the DER `ECDSA-Sig-Value` X.509 needs.
//!
//! The user PIN comes from a file (mode 0600) or from an environment variable, never from the
//! configuration itself. Signing uses a small pool of sessions (`[hsm] sessions`), so
//! concurrent enrollments do not queue on one session; PKCS#11 logins are per application,
//! so one login serves them all.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use est_proto::ca::{CaError, Curve, ObjectIdentifier, Signer};
use p256::pkcs8::EncodePublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha384};

use crate::config::ConfigError;

/// DER of the secp256r1 (P-256) OID: `CKA_EC_PARAMS` of the P-256 CA key.
const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the secp384r1 (P-384) OID: `CKA_EC_PARAMS` of the P-384 CA key.
const P384_EC_PARAMS: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// `CKA_EC_PARAMS` (the namedCurve OID, DER) of a key on `curve`.
fn ec_params(curve: Curve) -> &'static [u8] {
    match curve {
        Curve::P256 => &P256_EC_PARAMS,
        Curve::P384 => &P384_EC_PARAMS,
    }
}

/// `[hsm]` of est-server.toml.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HsmSection {
    pub enabled: bool,
    pub module: PathBuf,
    pub token_label: String,
    pub key_label: String,
    pub pin_file: PathBuf,
    pub pin_env: String,
    pub sessions: usize,
}

impl Default for HsmSection {
    fn default() -> Self {
        Self {
            enabled: false,
            module: PathBuf::new(),
            token_label: String::new(),
            key_label: "est-issuing-ca".into(),
            pin_file: PathBuf::new(),
            pin_env: "EST_HSM_PIN".into(),
            sessions: 4,
        }
    }
}

impl HsmSection {
    /// Checks made when the configuration is loaded.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, message: &str| ConfigError::Invalid {
            field,
            message: message.into(),
        };
        if !self.enabled {
            return Ok(());
        }
        if self.module.as_os_str().is_empty() {
            return Err(invalid("hsm.module", "the PKCS#11 module path is needed"));
        }
        if self.token_label.is_empty() || self.token_label.len() > 32 {
            return Err(invalid(
                "hsm.token_label",
                "a token label of 1 to 32 bytes (PKCS#11 CK_TOKEN_INFO) is needed",
            ));
        }
        if self.key_label.is_empty() {
            return Err(invalid("hsm.key_label", "a key label is needed"));
        }
        if self.pin_file.as_os_str().is_empty() && self.pin_env.is_empty() {
            return Err(invalid(
                "hsm.pin_file",
                "give pin_file or pin_env: the PIN is never written in the configuration",
            ));
        }
        if !(1..=64).contains(&self.sessions) {
            return Err(invalid("hsm.sessions", "must be within 1..=64"));
        }
        Ok(())
    }

    /// The user PIN: from `pin_file` (relative to `data_dir`; it must be readable by the owner
    /// only) if set, else from the environment variable `pin_env`.
    pub fn read_pin(&self, data_dir: &Path) -> anyhow::Result<AuthPin> {
        if !self.pin_file.as_os_str().is_empty() {
            let path = crate::datadir::resolve(data_dir, &self.pin_file);
            crate::safefs::check_key_permissions(&path, false)?;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("reading the HSM PIN file {}: {e}", path.display()))?;
            let pin = text.trim_end_matches(['\r', '\n']);
            if pin.is_empty() {
                anyhow::bail!("the HSM PIN file {} is empty", path.display());
            }
            return Ok(AuthPin::from(pin.to_owned()));
        }
        match std::env::var(&self.pin_env) {
            Ok(pin) if !pin.is_empty() => Ok(AuthPin::from(pin)),
            _ => anyhow::bail!(
                "the HSM PIN is not set: put it in the environment variable {} or in a file named by hsm.pin_file",
                self.pin_env
            ),
        }
    }
}

/// What went wrong talking to the token. Never carries the PIN.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    #[error("loading the PKCS#11 module {module}: {source}")]
    Module { module: PathBuf, source: CkError },
    #[error(
        "no token labelled {0:?} (is it initialised? `softhsm2-util --show-slots` lists them)"
    )]
    NoToken(String),
    #[error("logging in to token {token:?}: {source}")]
    Login { token: String, source: CkError },
    #[error("no EC private key labelled {label:?} on token {token:?}")]
    NoKey { token: String, label: String },
    #[error("{count} private keys labelled {label:?} on token {token:?}; labels must be unique")]
    AmbiguousKey {
        token: String,
        label: String,
        count: usize,
    },
    #[error("the key {label:?} is not a {expected} key (CKA_EC_PARAMS)")]
    WrongCurve {
        label: String,
        expected: &'static str,
    },
    #[error("the public key {label:?}: {message}")]
    PublicKey { label: String, message: String },
    #[error("PKCS#11 {operation}: {source}")]
    Call {
        operation: &'static str,
        source: CkError,
    },
}

fn call(operation: &'static str) -> impl FnOnce(CkError) -> HsmError {
    move |source| HsmError::Call { operation, source }
}

/// Where the key is and how to log in.
pub struct HsmKeyRef<'a> {
    pub module: &'a Path,
    pub token_label: &'a str,
    pub key_label: &'a str,
    pub pin: &'a AuthPin,
    pub sessions: usize,
    /// The key's curve: P-256 (the `[hsm]` key) or P-384 (the `[ca_p384]` key).
    pub curve: Curve,
}

/// An ECDSA P-256 or P-384 signer whose private key stays on a PKCS#11 token.
pub struct Pkcs11Signer {
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    key: ObjectHandle,
    curve: Curve,
    spki_der: Vec<u8>,
    label: String,
    // Kept last: the sessions close before the library is finalised.
    _context: Pkcs11,
}

impl std::fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("label", &self.label)
            .field("curve", &self.curve)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// Whether [`Pkcs11Signer::open_or_generate`] found the key or made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    Existing,
    Generated,
}

impl Pkcs11Signer {
    /// Use the key pair labelled `key_label` on the token.
    pub fn open(key: &HsmKeyRef<'_>) -> Result<Self, HsmError> {
        Self::open_inner(key, false).map(|(s, _)| s)
    }

    /// Use the key pair labelled `key_label`, generating it on the token first if there is none.
    pub fn open_or_generate(key: &HsmKeyRef<'_>) -> Result<(Self, KeyOrigin), HsmError> {
        Self::open_inner(key, true)
    }

    fn open_inner(key: &HsmKeyRef<'_>, generate: bool) -> Result<(Self, KeyOrigin), HsmError> {
        let context = Pkcs11::new(key.module).map_err(|source| HsmError::Module {
            module: key.module.to_path_buf(),
            source,
        })?;
        match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(source) => {
                return Err(HsmError::Module {
                    module: key.module.to_path_buf(),
                    source,
                })
            }
        }
        let slot = find_token(&context, key.token_label)?;
        let first = context
            .open_rw_session(slot)
            .map_err(call("C_OpenSession"))?;
        match first.login(UserType::User, Some(key.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(source) => {
                return Err(HsmError::Login {
                    token: key.token_label.into(),
                    source,
                })
            }
        }
        let (private, origin) = match find_one(&first, ObjectClass::PRIVATE_KEY, key)? {
            Some(h) => (h, KeyOrigin::Existing),
            None if generate => (
                generate_key(&first, key.key_label, key.curve)?,
                KeyOrigin::Generated,
            ),
            None => {
                return Err(HsmError::NoKey {
                    token: key.token_label.into(),
                    label: key.key_label.into(),
                })
            }
        };
        let spki_der = public_key_spki(&first, key)?;
        let mut sessions = vec![Mutex::new(first)];
        for _ in 1..key.sessions.max(1) {
            let s = context
                .open_rw_session(slot)
                .map_err(call("C_OpenSession"))?;
            sessions.push(Mutex::new(s));
        }
        Ok((
            Self {
                sessions,
                next: AtomicUsize::new(0),
                key: private,
                curve: key.curve,
                spki_der,
                label: key.key_label.into(),
                _context: context,
            },
            origin,
        ))
    }

    fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>, CkError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed) % self.sessions.len().max(1);
        // The rotation from our turn: sessions[start..], then sessions[..start].
        let (before, ours) = self.sessions.split_at_checked(start).unwrap_or_default();
        let mut rotation = ours.iter().chain(before);
        // A free session if there is one; else wait for ours in the rotation.
        for m in rotation.clone() {
            if let Ok(s) = m.try_lock() {
                return s.sign(&Mechanism::Ecdsa, self.key, digest);
            }
        }
        // `open_inner` opens at least one session; a signer without one cannot sign.
        let s = rotation
            .next()
            .ok_or(CkError::InvalidValue)?
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.sign(&Mechanism::Ecdsa, self.key, digest)
    }
}

impl Signer for Pkcs11Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CaError> {
        // The hash matched to the curve (RFC 5480 §4): the CA's signature algorithm.
        let digest = match self.curve {
            Curve::P256 => Sha256::digest(message).to_vec(),
            Curve::P384 => Sha384::digest(message).to_vec(),
        };
        let raw = self.sign_digest(&digest).map_err(|e| {
            tracing::error!(key = %self.label, error = %e, "HSM signature failed");
            CaError::SigningFailed
        })?;
        raw_to_der(self.curve, &raw).ok_or_else(|| {
            tracing::error!(key = %self.label, len = raw.len(), "HSM returned a malformed ECDSA signature");
            CaError::SigningFailed
        })
    }

    fn public_key_spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    fn signature_algorithm(&self) -> ObjectIdentifier {
        self.curve.signature_algorithm()
    }
}

/// CKM_ECDSA's `r || s` (each the size of the curve's order) as the DER `ECDSA-Sig-Value`
/// RFC 5480 wants; `None` for a wrong length or an out-of-range scalar.
fn raw_to_der(curve: Curve, raw: &[u8]) -> Option<Vec<u8>> {
    match curve {
        Curve::P256 => p256::ecdsa::Signature::from_slice(raw)
            .ok()
            .map(|s| s.to_der().as_bytes().to_vec()),
        Curve::P384 => p384::ecdsa::Signature::from_slice(raw)
            .ok()
            .map(|s| s.to_der().as_bytes().to_vec()),
    }
}

fn find_token(context: &Pkcs11, label: &str) -> Result<Slot, HsmError> {
    for slot in context
        .get_slots_with_token()
        .map_err(call("C_GetSlotList"))?
    {
        let info = context
            .get_token_info(slot)
            .map_err(call("C_GetTokenInfo"))?;
        if info.label().trim_end() == label {
            return Ok(slot);
        }
    }
    Err(HsmError::NoToken(label.into()))
}

fn find_one(
    session: &Session,
    class: ObjectClass,
    key: &HsmKeyRef<'_>,
) -> Result<Option<ObjectHandle>, HsmError> {
    let found = session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::KeyType(KeyType::EC),
            Attribute::Label(key.key_label.as_bytes().to_vec()),
        ])
        .map_err(call("C_FindObjects"))?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        more => Err(HsmError::AmbiguousKey {
            token: key.token_label.into(),
            label: key.key_label.into(),
            count: more.len(),
        }),
    }
}

/// A key pair on `curve` on the token: the private half sensitive, never extractable, sign
/// only.
fn generate_key(session: &Session, label: &str, curve: Curve) -> Result<ObjectHandle, HsmError> {
    let id: Vec<u8> = Sha256::digest(label.as_bytes())
        .into_iter()
        .take(8)
        .collect();
    let public = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(ec_params(curve).to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id),
    ];
    let (_, private) = session
        .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .map_err(call("C_GenerateKeyPair"))?;
    Ok(private)
}

/// The SubjectPublicKeyInfo of the pair's public key object (`CKA_EC_POINT`).
fn public_key_spki(session: &Session, key: &HsmKeyRef<'_>) -> Result<Vec<u8>, HsmError> {
    let bad = |message: &str| HsmError::PublicKey {
        label: key.key_label.into(),
        message: message.into(),
    };
    let handle = find_one(session, ObjectClass::PUBLIC_KEY, key)?
        .ok_or_else(|| bad("no public key object with this label on the token"))?;
    let attrs = session
        .get_attributes(handle, &[AttributeType::EcParams, AttributeType::EcPoint])
        .map_err(call("C_GetAttributeValue"))?;
    let mut point = None;
    for a in attrs {
        match a {
            Attribute::EcParams(p) if p != ec_params(key.curve) => {
                return Err(HsmError::WrongCurve {
                    label: key.key_label.into(),
                    expected: key.curve.name(),
                })
            }
            Attribute::EcPoint(p) => point = Some(p),
            _ => {}
        }
    }
    let point = point.ok_or_else(|| bad("no CKA_EC_POINT"))?;
    // PKCS#11 says CKA_EC_POINT is the DER OCTET STRING of the point; some tokens give the
    // bare point.
    let len = key.curve.uncompressed_point_len();
    let sec1 = match point.as_slice() {
        [0x04, l, rest @ ..] if usize::from(*l) == len && rest.len() == len => rest,
        bare => bare,
    };
    let der = match key.curve {
        Curve::P256 => p256::PublicKey::from_sec1_bytes(sec1)
            .map_err(|_| bad("not a P-256 point"))?
            .to_public_key_der(),
        Curve::P384 => p384::PublicKey::from_sec1_bytes(sec1)
            .map_err(|_| bad("not a P-384 point"))?
            .to_public_key_der(),
    };
    der.map(|d| d.as_bytes().to_vec())
        .map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The token's raw signatures become DER the curve's verifier accepts; a wrong length or
    /// a zero scalar is refused, never passed on.
    #[test]
    fn raw_signatures_to_der() {
        use p384::ecdsa::signature::hazmat::PrehashSigner;
        let key = p384::ecdsa::SigningKey::from_slice(&[7u8; 48]).unwrap();
        let digest = Sha384::digest(b"tbs");
        let sig: p384::ecdsa::Signature = key.sign_prehash(&digest).unwrap();
        let der = raw_to_der(Curve::P384, &sig.to_bytes()).unwrap();
        assert_eq!(der, sig.to_der().as_bytes());
        // P-384's r || s is 96 bytes: not a P-256 signature, and a short one is refused.
        assert!(raw_to_der(Curve::P256, &sig.to_bytes()).is_none());
        assert!(raw_to_der(Curve::P384, &sig.to_bytes()[..95]).is_none());
        assert!(raw_to_der(Curve::P384, &[0u8; 96]).is_none());
        assert_eq!(ec_params(Curve::P384), P384_EC_PARAMS);
        assert_eq!(
            der::Encode::to_der(&Curve::P384.oid()).unwrap(),
            P384_EC_PARAMS
        );
        assert_eq!(
            der::Encode::to_der(&Curve::P256.oid()).unwrap(),
            P256_EC_PARAMS
        );
    }
}
