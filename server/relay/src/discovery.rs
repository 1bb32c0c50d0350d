//! The meters' discovery of the join port (draft "Pledge Discovers Join Proxy"):
//! `GET coap://[ff02::fd]/.well-known/core?brski-jp=*` answered, in clear CoAP, with
//! `<>;brski-jp=<join port>` (Content-Format 40).

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

/// CoAP Content-Format application/link-format.
const LINK_FORMAT: u8 = 40;

/// Whether the datagram could be CoAP (version 1 in the first two bits); DTLS records start
/// with a content type of 20..=25, which is version 0.
pub fn looks_like_coap(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b >> 6 == 1)
}

/// Whether one Uri-Query item selects the `brski-jp` link (RFC 6690 §4.1: `attr=value`
/// exactly, `attr=prefix*` by prefix; an attribute the link lacks matches nothing).
fn query_matches(q: &str, port: u16) -> bool {
    let (attr, pattern) = q.split_once('=').unwrap_or((q, ""));
    if attr != "brski-jp" {
        return false;
    }
    let value = port.to_string();
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern.is_empty() || pattern == value,
    }
}

/// The answer to a CoAP request from a meter, if it deserves one: 2.05 with the link for a
/// GET of `/.well-known/core` (empty when the query filters the link out), 4.04 or 4.05 to a
/// confirmable request for anything else; nothing for responses, empty messages and
/// non-confirmable requests elsewhere.
pub fn answer(datagram: &[u8], join_port: u16) -> Option<Vec<u8>> {
    let req = Packet::from_bytes(datagram).ok()?;
    let confirmable = match req.header.get_type() {
        MessageType::Confirmable => true,
        MessageType::NonConfirmable => false,
        _ => return None,
    };
    let MessageClass::Request(method) = req.header.code else {
        return None;
    };
    let path: Vec<String> = req
        .get_option(CoapOption::UriPath)
        .map(|l| {
            l.iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let is_core = path == [".well-known", "core"];
    let (code, payload) = if !is_core {
        if !confirmable {
            return None;
        }
        (ResponseType::NotFound, Vec::new())
    } else if method != RequestType::Get {
        if !confirmable {
            return None;
        }
        (ResponseType::MethodNotAllowed, Vec::new())
    } else {
        let all_match = req
            .get_option(CoapOption::UriQuery)
            .map(|l| {
                l.iter()
                    .all(|q| query_matches(&String::from_utf8_lossy(q), join_port))
            })
            .unwrap_or(true);
        let body = if all_match {
            format!("<>;brski-jp={join_port}").into_bytes()
        } else {
            Vec::new()
        };
        (ResponseType::Content, body)
    };
    let mut resp = Packet::new();
    resp.header.set_version(1);
    resp.header.set_type(if confirmable {
        MessageType::Acknowledgement
    } else {
        MessageType::NonConfirmable
    });
    resp.header.code = MessageClass::Response(code);
    resp.header.message_id = req.header.message_id;
    resp.set_token(req.get_token().to_vec());
    if code == ResponseType::Content {
        resp.add_option(CoapOption::ContentFormat, vec![LINK_FORMAT]);
    }
    resp.payload = payload;
    resp.to_bytes().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &[&str], queries: &[&str], t: MessageType) -> Vec<u8> {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(t);
        p.header.code = MessageClass::Request(RequestType::Get);
        p.header.message_id = 0x1234;
        p.set_token(vec![1, 2]);
        for s in path {
            p.add_option(CoapOption::UriPath, s.as_bytes().to_vec());
        }
        for q in queries {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        p.to_bytes().unwrap()
    }

    fn parse(b: &[u8]) -> Packet {
        Packet::from_bytes(b).unwrap()
    }

    #[test]
    fn brski_jp_query_gets_the_join_port() {
        let req = get(
            &[".well-known", "core"],
            &["brski-jp=*"],
            MessageType::Confirmable,
        );
        assert!(looks_like_coap(&req));
        let r = parse(&answer(&req, 57101).unwrap());
        assert_eq!(r.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(r.header.code, MessageClass::Response(ResponseType::Content));
        assert_eq!(r.header.message_id, 0x1234);
        assert_eq!(r.get_token(), &[1, 2]);
        assert_eq!(
            r.get_first_option(CoapOption::ContentFormat),
            Some(&vec![40u8])
        );
        assert_eq!(r.payload, b"<>;brski-jp=57101");
        // Multicast requests are usually NON: answered NON.
        let req = get(
            &[".well-known", "core"],
            &["brski-jp=*"],
            MessageType::NonConfirmable,
        );
        let r = parse(&answer(&req, 5685).unwrap());
        assert_eq!(r.header.get_type(), MessageType::NonConfirmable);
        assert_eq!(r.payload, b"<>;brski-jp=5685");
        // No query: every link; exact value.
        let req = get(&[".well-known", "core"], &[], MessageType::Confirmable);
        assert_eq!(parse(&answer(&req, 1).unwrap()).payload, b"<>;brski-jp=1");
        let req = get(
            &[".well-known", "core"],
            &["brski-jp=57101"],
            MessageType::Confirmable,
        );
        assert_eq!(
            parse(&answer(&req, 57101).unwrap()).payload,
            b"<>;brski-jp=57101"
        );
    }

    #[test]
    fn other_queries_and_paths() {
        let req = get(
            &[".well-known", "core"],
            &["rt=brski.rjp"],
            MessageType::Confirmable,
        );
        let r = parse(&answer(&req, 57101).unwrap());
        assert_eq!(r.header.code, MessageClass::Response(ResponseType::Content));
        assert!(r.payload.is_empty());
        let req = get(&["est"], &[], MessageType::Confirmable);
        let r = parse(&answer(&req, 57101).unwrap());
        assert_eq!(
            r.header.code,
            MessageClass::Response(ResponseType::NotFound)
        );
        assert!(answer(&get(&["est"], &[], MessageType::NonConfirmable), 1).is_none());
        assert!(answer(&[0x16, 0xfe, 0xfd], 1).is_none());
        assert!(!looks_like_coap(&[0x16, 0xfe, 0xfd]));
    }
}
