//! `GET /.well-known/core`: CoRE Link Format discovery (RFC 6690, RFC 9148 §4.1).

use super::{EstConfig, CF_CSRATTRS, CF_MULTIPART_CORE, CF_PKCS7_CERTS_ONLY, CF_PKIX_CERT};

struct Link {
    href: &'static str,
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
    ];
    let mut all = vec![
        Link {
            href: "/.well-known/est/crts",
            rt: "ace.est.crts",
            ct: certs.clone(),
        },
        Link {
            href: "/.well-known/est/sen",
            rt: "ace.est.sen",
            ct: certs.clone(),
        },
        Link {
            href: "/.well-known/est/sren",
            rt: "ace.est.sren",
            ct: certs,
        },
        Link {
            href: "/.well-known/est/att",
            rt: "ace.est.att",
            ct: vec![CF_CSRATTRS],
        },
    ];
    if server_keygen {
        all.push(Link {
            href: "/.well-known/est/skg",
            rt: "ace.est.skg",
            ct: vec![CF_MULTIPART_CORE],
        });
        all.push(Link {
            href: "/.well-known/est/skc",
            rt: "ace.est.skc",
            ct: vec![CF_MULTIPART_CORE],
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
    if ct.len() == 1 {
        format!("<{}>;rt=\"{}\";ct={}", l.href, l.rt, ct[0])
    } else {
        format!("<{}>;rt=\"{}\";ct=\"{}\"", l.href, l.rt, ct.join(" "))
    }
}

fn matches(l: &Link, query: &str) -> bool {
    let (attr, pattern) = match query.split_once('=') {
        Some((a, p)) => (a, p),
        None => (query, ""),
    };
    let values: Vec<String> = match attr {
        "href" => vec![l.href.to_string()],
        "rt" => vec![l.rt.to_string()],
        "ct" => l.ct.iter().map(u16::to_string).collect(),
        _ => return false,
    };
    values.iter().any(|v| match pattern.strip_suffix('*') {
        Some(prefix) => v.starts_with(prefix),
        None => v == pattern,
    })
}
