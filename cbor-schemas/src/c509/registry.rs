//! The C509 registries this crate implements, from
//! draft-ietf-cose-cbor-encoded-cert-18 Section 8 (IANA Considerations). The
//! values were not re-checked against draft -20's tables (see docs/design.md,
//! "C509 draft -20"); the value range of every registry is
//! [`super::REGISTRY_MIN`]..=[`super::REGISTRY_MAX`].

use const_oid::ObjectIdentifier as Oid;

const fn oid(s: &str) -> Oid {
    Oid::new_unwrap(s)
}

/// How a registered RDN attribute is encoded in DER (Section 3.1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttrSyntax {
    /// DirectoryString: UTF8String (positive int) or PrintableString (negative int).
    Directory,
    /// Always IA5String (emailAddress, domainComponent): non-negative int.
    Ia5,
}

/// C509 RDN Attributes registry (Section 8.6): (value, OID, name, syntax).
pub(crate) const RDN_ATTRIBUTES: &[(i64, Oid, &str, AttrSyntax)] = &[
    (
        0,
        oid("1.2.840.113549.1.9.1"),
        "emailAddress",
        AttrSyntax::Ia5,
    ),
    (1, oid("2.5.4.3"), "commonName", AttrSyntax::Directory),
    (2, oid("2.5.4.4"), "surname", AttrSyntax::Directory),
    (3, oid("2.5.4.5"), "serialNumber", AttrSyntax::Directory),
    (4, oid("2.5.4.6"), "countryName", AttrSyntax::Directory),
    (5, oid("2.5.4.7"), "localityName", AttrSyntax::Directory),
    (
        6,
        oid("2.5.4.8"),
        "stateOrProvinceName",
        AttrSyntax::Directory,
    ),
    (7, oid("2.5.4.9"), "streetAddress", AttrSyntax::Directory),
    (
        8,
        oid("2.5.4.10"),
        "organizationName",
        AttrSyntax::Directory,
    ),
    (
        9,
        oid("2.5.4.11"),
        "organizationalUnitName",
        AttrSyntax::Directory,
    ),
    (10, oid("2.5.4.12"), "title", AttrSyntax::Directory),
    (
        11,
        oid("2.5.4.15"),
        "businessCategory",
        AttrSyntax::Directory,
    ),
    (12, oid("2.5.4.17"), "postalCode", AttrSyntax::Directory),
    (13, oid("2.5.4.42"), "givenName", AttrSyntax::Directory),
    (14, oid("2.5.4.43"), "initials", AttrSyntax::Directory),
    (
        15,
        oid("2.5.4.44"),
        "generationQualifier",
        AttrSyntax::Directory,
    ),
    (16, oid("2.5.4.46"), "dnQualifier", AttrSyntax::Directory),
    (17, oid("2.5.4.65"), "pseudonym", AttrSyntax::Directory),
    (
        18,
        oid("2.5.4.97"),
        "organizationIdentifier",
        AttrSyntax::Directory,
    ),
    (
        19,
        oid("1.3.6.1.4.1.311.60.2.1.1"),
        "jurisdictionLocality",
        AttrSyntax::Directory,
    ),
    (
        20,
        oid("1.3.6.1.4.1.311.60.2.1.2"),
        "jurisdictionStateOrProvince",
        AttrSyntax::Directory,
    ),
    (
        21,
        oid("1.3.6.1.4.1.311.60.2.1.3"),
        "jurisdictionCountry",
        AttrSyntax::Directory,
    ),
    (
        22,
        oid("0.9.2342.19200300.100.1.25"),
        "domainComponent",
        AttrSyntax::Ia5,
    ),
];

pub(crate) fn rdn_by_oid(o: &Oid) -> Option<(i64, &'static str, AttrSyntax)> {
    RDN_ATTRIBUTES
        .iter()
        .find(|(_, x, _, _)| x == o)
        .map(|(v, _, n, s)| (*v, *n, *s))
}

pub(crate) fn rdn_by_value(v: i64) -> Option<(Oid, &'static str, AttrSyntax)> {
    RDN_ATTRIBUTES
        .iter()
        .find(|(x, _, _, _)| *x == v)
        .map(|(_, o, n, s)| (*o, *n, *s))
}

/// Signature algorithms (Section 8.14) this crate converts: value, OID,
/// DER parameters (None = absent), r||s component size for ECDSA.
pub(crate) struct SigAlg {
    pub value: i64,
    pub oid: Oid,
    pub name: &'static str,
    /// Fixed ECDSA component sizes allowed (P-256, P-384, P-521 orders); empty for non-ECDSA.
    pub ecdsa: bool,
}

pub(crate) const SIG_ALGS: &[SigAlg] = &[
    SigAlg {
        value: 0,
        oid: oid("1.2.840.10045.4.3.2"),
        name: "ecdsa-with-SHA256",
        ecdsa: true,
    },
    SigAlg {
        value: 1,
        oid: oid("1.2.840.10045.4.3.3"),
        name: "ecdsa-with-SHA384",
        ecdsa: true,
    },
    SigAlg {
        value: 2,
        oid: oid("1.2.840.10045.4.3.4"),
        name: "ecdsa-with-SHA512",
        ecdsa: true,
    },
    SigAlg {
        value: 12,
        oid: oid("1.3.101.112"),
        name: "Ed25519",
        ecdsa: false,
    },
    SigAlg {
        value: 13,
        oid: oid("1.3.101.113"),
        name: "Ed448",
        ecdsa: false,
    },
];

pub(crate) fn sig_by_value(v: i64) -> Option<&'static SigAlg> {
    SIG_ALGS.iter().find(|a| a.value == v)
}

pub(crate) fn sig_by_oid(o: &Oid) -> Option<&'static SigAlg> {
    SIG_ALGS.iter().find(|a| &a.oid == o)
}

pub(crate) const ID_EC_PUBLIC_KEY: Oid = oid("1.2.840.10045.2.1");
pub(crate) const SECP256R1: Oid = oid("1.2.840.10045.3.1.7");
pub(crate) const SECP384R1: Oid = oid("1.3.132.0.34");
pub(crate) const SECP521R1: Oid = oid("1.3.132.0.35");
pub(crate) const RSA_ENCRYPTION: Oid = oid("1.2.840.113549.1.1.1");

/// Public key algorithms (Section 8.15): value, algorithm OID, namedCurve parameter.
pub(crate) const PK_ALGS: &[(i64, Oid, Option<Oid>, &str)] = &[
    (
        1,
        ID_EC_PUBLIC_KEY,
        Some(SECP256R1),
        "id-ecPublicKey secp256r1 (P-256)",
    ),
    (
        2,
        ID_EC_PUBLIC_KEY,
        Some(SECP384R1),
        "id-ecPublicKey secp384r1 (P-384)",
    ),
    (
        3,
        ID_EC_PUBLIC_KEY,
        Some(SECP521R1),
        "id-ecPublicKey secp521r1 (P-521)",
    ),
    (8, oid("1.3.101.110"), None, "X25519"),
    (9, oid("1.3.101.111"), None, "X448"),
    (12, oid("1.3.101.112"), None, "Ed25519"),
    (13, oid("1.3.101.113"), None, "Ed448"),
];

pub(crate) fn pk_by_value(v: i64) -> Option<(Oid, Option<Oid>, &'static str)> {
    PK_ALGS
        .iter()
        .find(|(x, _, _, _)| *x == v)
        .map(|(_, o, p, n)| (*o, *p, *n))
}

/// Extensions registry (Section 8.8): value, OID, name, implemented here.
pub(crate) const EXTENSIONS: &[(i64, Oid, &str, bool)] = &[
    (1, oid("2.5.29.14"), "subjectKeyIdentifier", true),
    (2, oid("2.5.29.15"), "keyUsage", true),
    (3, oid("2.5.29.17"), "subjectAltName", true),
    (4, oid("2.5.29.19"), "basicConstraints", true),
    (5, oid("2.5.29.31"), "cRLDistributionPoints", false),
    (6, oid("2.5.29.32"), "certificatePolicies", false),
    (7, oid("2.5.29.35"), "authorityKeyIdentifier", true),
    (8, oid("2.5.29.37"), "extKeyUsage", true),
    (9, oid("1.3.6.1.5.5.7.1.1"), "authorityInfoAccess", false),
    (24, oid("2.5.29.9"), "subjectDirectoryAttributes", false),
    (25, oid("2.5.29.18"), "issuerAltName", true),
    (26, oid("2.5.29.30"), "nameConstraints", false),
    (27, oid("2.5.29.33"), "policyMappings", false),
    (28, oid("2.5.29.36"), "policyConstraints", false),
    (29, oid("2.5.29.46"), "freshestCRL", false),
    (30, oid("2.5.29.54"), "inhibitAnyPolicy", true),
    (31, oid("1.3.6.1.5.5.7.1.11"), "subjectInfoAccess", false),
    (32, oid("1.3.6.1.5.5.7.1.7"), "id-pe-ipAddrBlocks", false),
    (
        33,
        oid("1.3.6.1.5.5.7.1.8"),
        "id-pe-autonomousSysIds",
        false,
    ),
    (
        34,
        oid("1.3.6.1.5.5.7.1.28"),
        "id-pe-ipAddrBlocks-v2",
        false,
    ),
    (
        35,
        oid("1.3.6.1.5.5.7.1.29"),
        "id-pe-autonomousSysIds-v2",
        false,
    ),
    (
        36,
        oid("1.3.6.1.5.5.7.48.1.5"),
        "id-pkix-ocsp-nocheck",
        true,
    ),
    (
        37,
        oid("1.3.6.1.4.1.11129.2.4.3"),
        "precertificateSigningCertificate",
        false,
    ),
    (38, oid("1.3.6.1.5.5.7.1.24"), "id-pe-tlsfeature", false),
];

pub(crate) fn ext_by_oid(o: &Oid) -> Option<(i64, &'static str, bool)> {
    EXTENSIONS
        .iter()
        .find(|(_, x, _, _)| x == o)
        .map(|(v, _, n, i)| (*v, *n, *i))
}

pub(crate) fn ext_by_value(v: i64) -> Option<(Oid, &'static str, bool)> {
    EXTENSIONS
        .iter()
        .find(|(x, _, _, _)| *x == v)
        .map(|(_, o, n, i)| (*o, *n, *i))
}

/// Extended Key Usages registry (Section 8.12).
pub(crate) const EKUS: &[(i64, Oid, &str)] = &[
    (0, oid("2.5.29.37.0"), "anyExtendedKeyUsage"),
    (1, oid("1.3.6.1.5.5.7.3.1"), "id-kp-serverAuth"),
    (2, oid("1.3.6.1.5.5.7.3.2"), "id-kp-clientAuth"),
    (3, oid("1.3.6.1.5.5.7.3.3"), "id-kp-codeSigning"),
    (4, oid("1.3.6.1.5.5.7.3.4"), "id-kp-emailProtection"),
    (8, oid("1.3.6.1.5.5.7.3.8"), "id-kp-timeStamping"),
    (9, oid("1.3.6.1.5.5.7.3.9"), "id-kp-OCSPSigning"),
    (10, oid("1.3.6.1.5.2.3.4"), "id-pkinit-KPClientAuth"),
    (11, oid("1.3.6.1.5.2.3.5"), "id-pkinit-KPKdc"),
    (12, oid("1.3.6.1.5.5.7.3.21"), "id-kp-secureShellClient"),
    (13, oid("1.3.6.1.5.5.7.3.22"), "id-kp-secureShellServer"),
    (14, oid("1.3.6.1.5.5.7.3.35"), "id-kp-bundleSecurity"),
    (15, oid("1.3.6.1.5.5.7.3.27"), "id-kp-cmcCA"),
    (16, oid("1.3.6.1.5.5.7.3.28"), "id-kp-cmcRA"),
    (17, oid("1.3.6.1.5.5.7.3.29"), "id-kp-cmcArchive"),
    (18, oid("1.3.6.1.5.5.7.3.32"), "id-kp-cmKGA"),
    (
        19,
        oid("1.3.6.1.4.1.11129.2.4.4"),
        "certificateTransparency",
    ),
    (20, oid("1.3.6.1.4.1.45605.1"), "id-kp-wisun-fan-device"),
];

pub(crate) fn eku_by_oid(o: &Oid) -> Option<i64> {
    EKUS.iter().find(|(_, x, _)| x == o).map(|(v, _, _)| *v)
}

pub(crate) fn eku_by_value(v: i64) -> Option<(Oid, &'static str)> {
    EKUS.iter()
        .find(|(x, _, _)| *x == v)
        .map(|(_, o, n)| (*o, *n))
}

/// otherName type-ids with their own General Names registry value (Section 8.13).
pub(crate) const ID_ON_HARDWARE_MODULE_NAME: Oid = oid("1.3.6.1.5.5.7.8.4");
pub(crate) const ID_ON_SMTP_UTF8_MAILBOX: Oid = oid("1.3.6.1.5.5.7.8.9");
pub(crate) const ID_ON_MAC_ADDRESS: Oid = oid("1.3.6.1.5.5.7.8.12");

/// C509 CR Attributes registry (Section 8.7).
pub(crate) const EXTENSION_REQUEST: Oid = oid("1.2.840.113549.1.9.14");
pub(crate) const CHALLENGE_PASSWORD: Oid = oid("1.2.840.113549.1.9.7");
pub(crate) const PRIVATE_KEY_POSSESSION: Oid = oid("1.3.6.1.4.1.22112.2.1");

/// Human name of a signature (`sig == true`) or public key algorithm value.
pub(crate) fn alg_name(v: i64, sig: bool) -> &'static str {
    if sig {
        sig_by_value(v).map(|s| s.name).unwrap_or("unregistered")
    } else {
        pk_by_value(v).map(|p| p.2).unwrap_or("unregistered")
    }
}
