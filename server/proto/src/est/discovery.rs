//! `GET /.well-known/core`: CoRE Link Format discovery (RFC 6690, RFC 9148 §4.1), and, for a
//! registrar of stateless join proxies, its JPY endpoint (draft-ietf-anima-constrained-join-
//! proxy, "Stateless Case": `<jpy://[address]:port>;rt=brski.rjp`).

use super::{EstConfig, CF_CSRATTRS, CF_MULTIPART_CORE, CF_PKCS7_CERTS_ONLY, CF_PKIX_CERT};

struct Link {
    href: String,
    rt: &'static str,
    ct: Vec<u16>,
}

/// The link-format document, filtered by the request's Uri-Query (RFC 6690 §4.1:
/// `attr=value` matches exactly, `attr=prefix*` by prefix; unknown attributes match
/// nothing). Only `href`, `rt` and `ct` are link attributes here.
pub(crate) fn links(cfg: &EstConfig, server_keygen: bool, query: &[String]) -> Vec<u8> {
    let certs = vec![
        CF_PKCS7_CERTS_ONLY,
        CF_PKIX_CERT,
        cfg.c509_cert_content_format,
        cfg.cose_c509_content_format,
    ];
    let mut all = vec![
        Link {
            href: "/.well-known/est/crts".into(),
            rt: "ace.est.crts",
            ct: certs.clone(),
        },
        Link {
            href: "/.well-known/est/sen".into(),
            rt: "ace.est.sen",
            ct: certs.clone(),
        },
        Link {
            href: "/.well-known/est/sren".into(),
            rt: "ace.est.sren",
            ct: certs,
        },
        Link {
            href: "/.well-known/est/att".into(),
            rt: "ace.est.att",
            ct: vec![CF_CSRATTRS],
        },
    ];
    if server_keygen {
        all.push(Link {
            href: "/.well-known/est/skg".into(),
            rt: "ace.est.skg",
            ct: vec![CF_MULTIPART_CORE],
        });
        all.push(Link {
            href: "/.well-known/est/skc".into(),
            rt: "ace.est.skc",
            ct: vec![CF_MULTIPART_CORE],
        });
    }
    if let Some(uri) = &cfg.jpy_uri {
        all.push(Link {
            href: uri.clone(),
            rt: "brski.rjp",
            ct: Vec::new(),
        });
    }
    let selected: Vec<String> = all
        .iter()
        .filter(|l| query.iter().all(|q| matches(l, q)))
        .map(render)
        .collect();
    selected.join(",").into_bytes()
}

fn render(l: &Link) -> String {
    let ct: Vec<String> = l.ct.iter().map(u16::to_string).collect();
    match ct.as_slice() {
        // As the draft writes it: `<jpy://[2001:db8:0:abcd::52]:7634>;rt=brski.rjp`.
        [] => format!("<{}>;rt={}", l.href, l.rt),
        [one] => format!("<{}>;rt=\"{}\";ct={}", l.href, l.rt, one),
        _ => format!("<{}>;rt=\"{}\";ct=\"{}\"", l.href, l.rt, ct.join(" ")),
    }
}

fn matches(l: &Link, query: &str) -> bool {
    let (attr, pattern) = match query.split_once('=') {
        Some((a, p)) => (a, p),
        None => (query, ""),
    };
    let values: Vec<String> = match attr {
        "href" => vec![l.href.clone()],
        "rt" => vec![l.rt.to_string()],
        "ct" => l.ct.iter().map(u16::to_string).collect(),
        _ => return false,
    };
    values.iter().any(|v| match pattern.strip_suffix('*') {
        Some(prefix) => v.starts_with(prefix),
        None => v == pattern,
    })
}
