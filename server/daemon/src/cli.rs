//! The command line: clap types of every subcommand (what each command does is in
//! [`crate::commands`] and [`crate::run`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use est_proto::store::RevocationReason;
use est_server::datadir;

/// A CRLReason (RFC 5280 §5.3.1) by name or code.
fn parse_reason(s: &str) -> Result<RevocationReason, String> {
    RevocationReason::parse(s).ok_or_else(|| {
        let names: Vec<&str> = RevocationReason::ALL.iter().map(|r| r.name()).collect();
        format!(
            "unknown reason {s:?}; one of {} (or its code)",
            names.join(", ")
        )
    })
}

/// EST-coaps (RFC 9148) enrollment server for smart meters and other field devices.
///
/// Meters authenticate over DTLS 1.2 with their manufacturer certificate (IDevID) and
/// receive an operational certificate (LDevID) at coaps://HOST:5684/.well-known/est/sen;
/// they re-enroll at /sren with it. Run without arguments to start a working server on
/// built-in defaults: it creates ./est-data (CA, demo manufacturer CA, DTLS certificate,
/// documented est-server.toml, SQLite store) on first start.
#[derive(Parser, Debug)]
#[command(name = "est-server", version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) common: Common,
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct Common {
    /// Data directory holding keys, certificates, est-server.toml and the store.
    #[arg(long, global = true, env = "EST_DATA_DIR", default_value = datadir::DEFAULT_DATA_DIR)]
    pub(crate) data_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create the data directory: issuing CA, demo manufacturer CA, DTLS certificate,
    /// est-server.toml and the store. Keeps an existing one untouched.
    Init {
        /// Extra DNS names or IP addresses for the server's DTLS certificate
        /// (localhost, 127.0.0.1 and ::1 are always included). Repeatable.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        #[command(flatten)]
        hsm: HsmInitArgs,
        #[command(flatten)]
        storage: StorageInitArgs,
    },
    /// Run the server (initialising the data directory first if it does not exist).
    Run(RunArgs),
    /// Meter factory tools: mint IDevIDs signed by the demo manufacturer CA.
    #[command(subcommand)]
    Factory(FactoryCommand),
    /// Inspect and revoke issued certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Manage devices: the allowlist (policy.require_device_allowlist), decommissioning.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// The CRL of the issuing CA (written to the data directory, served over CoAP).
    #[command(subcommand)]
    Crl(CrlCommand),
    /// The server's DTLS certificate.
    #[command(subcommand)]
    Dtls(DtlsCommand),
    /// C509 tools for meter vendors: convert certificates and CSRs between DER and C509
    /// (draft-ietf-cose-cbor-encoded-cert, type 3: lossless re-encoding).
    #[command(subcommand)]
    C509(C509Command),
    /// Issuing CAs beside the main one.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Show the most recent audit events (every enrollment attempt, allowed or refused).
    Audit {
        /// How many events to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

/// `init --storage-*`: the store on PostgreSQL instead of a SQLite file in the data directory.
#[derive(Args, Debug, Default)]
pub(crate) struct StorageInitArgs {
    /// Keep the store on PostgreSQL ([storage] backend = "postgres"): the connection string,
    /// a URL (postgres://est:SECRET@db.example:5432/est?sslmode=verify-full) or libpq
    /// key=value pairs. The database is reached and its schema created before anything is
    /// written; no SQLite file is created, and est-server.toml is written 0600.
    #[arg(long)]
    pub(crate) storage_url: Option<String>,
    /// The CA certificate (PEM or DER) of the PostgreSQL server, for sslmode=verify-ca or
    /// verify-full ([storage] ca_file; recorded by its absolute path).
    #[arg(long, requires = "storage_url")]
    pub(crate) storage_ca_file: Option<PathBuf>,
}

/// `init --hsm-*`: the issuing CA's key on a PKCS#11 token.
#[derive(Args, Debug, Default)]
pub(crate) struct HsmInitArgs {
    /// Keep the issuing CA's key on a PKCS#11 token (HSM): the module to load, e.g.
    /// /usr/lib/softhsm/libsofthsm2.so. The key labelled --hsm-key-label is used, or
    /// generated on the token (P-256, sensitive, never extractable) if there is none.
    #[arg(long, requires = "hsm_token")]
    pub(crate) hsm_module: Option<PathBuf>,
    /// Label of the token holding the key.
    #[arg(long, requires = "hsm_module")]
    pub(crate) hsm_token: Option<String>,
    /// Label (CKA_LABEL) of the CA key pair on the token.
    #[arg(long, default_value = "est-issuing-ca")]
    pub(crate) hsm_key_label: String,
    /// File holding the token's user PIN (mode 0600); recorded in the configuration as
    /// hsm.pin_file. Without it the PIN is read from the variable named by --hsm-pin-env.
    #[arg(long)]
    pub(crate) hsm_pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN (when no --hsm-pin-file).
    #[arg(long, default_value = "EST_HSM_PIN")]
    pub(crate) hsm_pin_env: String,
    /// PKCS#11 sessions kept open for signing.
    #[arg(long, default_value_t = 4)]
    pub(crate) hsm_sessions: usize,
}

#[derive(Args, Debug, Default)]
pub(crate) struct RunArgs {
    /// Configuration file (default: <data-dir>/est-server.toml).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// UDP address to listen on, overriding server.listen (e.g. 127.0.0.1:5684).
    #[arg(long)]
    pub(crate) listen: Option<SocketAddr>,
    /// Start even if the CA or DTLS private key can be read by group or others (logged as
    /// a warning). Without it, such a key stops the server with the chmod that fixes it.
    #[arg(long)]
    pub(crate) allow_insecure_key_permissions: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum FactoryCommand {
    /// Mint IDevID certificates and keys as a meter factory would.
    ///
    /// Writes OUT/<serial>/idevid.pem, idevid.key (0600), idevid-chain.pem, plus
    /// OUT/fleet.json, OUT/manufacturer-ca.pem and OUT/implicit-ta.pem (the trust anchor
    /// for the server's DTLS certificate). The output of `--count N` is what
    /// `client-sim --fleet OUT` reads.
    Mint {
        /// Serial number of a single device (goes into subject serialNumber and the
        /// hardwareModuleName SAN).
        #[arg(long, conflicts_with = "count")]
        serial: Option<String>,
        /// Mint a fleet of N devices with serials <prefix><000001..>.
        #[arg(long)]
        count: Option<u64>,
        /// Serial prefix for --count.
        #[arg(long, default_value = "SN")]
        prefix: String,
        /// First index for --count.
        #[arg(long, default_value_t = 1)]
        start: u64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// IDevID validity in years; default: no expiry (99991231235959Z, IEEE 802.1AR).
        #[arg(long)]
        validity_years: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum CertsCommand {
    /// List issued certificates, newest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one certificate (by serial or unique serial prefix) as PEM with its record.
    Show { serial: String },
    /// Revoke a certificate (by serial or unique serial prefix): a revoked LDevID cannot
    /// re-enroll and is refused at the DTLS handshake; a new CRL listing it is published
    /// (a running server picks the revocation up within [revocation] poll_interval_secs).
    Revoke {
        serial: String,
        /// RFC 5280 reason: unspecified, keyCompromise, cACompromise, affiliationChanged,
        /// superseded, cessationOfOperation, certificateHold, privilegeWithdrawn,
        /// aACompromise (or the code, e.g. 1).
        #[arg(long, default_value = "unspecified", value_parser = parse_reason)]
        reason: RevocationReason,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum CrlCommand {
    /// Sign and write a new CRL now (the server also re-issues it on every revocation and
    /// when half its validity has passed).
    Publish,
    /// Show the latest CRL: number, dates, entries, and where it is written.
    Show,
}

#[derive(Subcommand, Debug)]
pub(crate) enum DtlsCommand {
    /// Issue a new DTLS server certificate and key from the issuing CA, with the current
    /// certificate's names (plus --server-name ones). A running server uses it for new
    /// handshakes after SIGHUP (kill -HUP PID), or after a restart.
    Renew {
        /// Extra DNS names or IP addresses. Repeatable.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Validity of the new certificate, in days.
        #[arg(long, default_value_t = 730)]
        validity_days: u32,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum C509Command {
    /// DER (or PEM) certificate or PKCS#10 request -> C509 type 3 (draft-ietf-cose-cbor-
    /// encoded-cert-20). A certificate becomes the CBOR array C509Certificate
    /// (application/cose-c509-cert+cbor; COSE_C509 with --cose), a request the
    /// C509CertificationRequest array. Raw bytes go to stdout unless --out is given.
    Encode {
        file: PathBuf,
        /// Write the C509 bytes here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Wrap a certificate as COSE_C509 (what application/cose-c509+cbor carries).
        #[arg(long)]
        cose: bool,
        /// Print a readable dump with sizes (DER vs C509) instead of raw bytes on stdout.
        #[arg(long)]
        info: bool,
    },
    /// C509 certificate (C509Certificate or COSE_C509) or C509 request -> the exact DER it
    /// was re-encoded from (type 3 only: a natively signed type 2 has no DER form). Draft
    /// -18's unwrapped ~C509Certificate is refused.
    Decode {
        file: PathBuf,
        /// Write the DER bytes here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print a readable dump with sizes instead of raw bytes on stdout.
        #[arg(long)]
        info: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum DevicesCommand {
    /// Import device serials (one per line; blank lines and # comments ignored).
    Import { file: PathBuf },
    /// Decommission a device (e.g. stolen or removed): its /sen and /sren are refused from
    /// now on, and its handshakes too; its active certificates are revoked (and a new CRL
    /// published) unless --keep-certs.
    Block {
        /// The device's serial number (its IDevID's subject serialNumber).
        serial: String,
        /// Do not revoke its certificates; only refuse future enrollments.
        #[arg(long)]
        keep_certs: bool,
        /// RFC 5280 reason its certificates are revoked with.
        #[arg(long, default_value = "cessationOfOperation", value_parser = parse_reason)]
        reason: RevocationReason,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create the P-384 issuing CA ([ca_p384] cert and key, a self-signed root signed
    /// ecdsa-with-SHA384) and set [ca_p384] enabled = true in the data directory's
    /// configuration. P-384 CSRs (DLMS/COSEM security suite 2) are then issued by it, after
    /// a restart. Refuses to overwrite an existing key or certificate.
    CreateP384 {
        /// Put the CA's key on the PKCS#11 token of [hsm] (which must be enabled) instead of
        /// a key file: the P-384 key pair with this label is used, or generated there, and
        /// [ca_p384] hsm_key_label is set. The PIN is read as [hsm] says (pin_file or
        /// pin_env), never written to the configuration.
        #[arg(long)]
        hsm_key_label: Option<String>,
    },
}
