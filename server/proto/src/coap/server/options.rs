//! Validation of a request's options (RFC 7252 §5.4, §5.10; RFC 7959 §2.1, §4), and the
//! request target that identifies "the same request" across the blocks of a transfer.

use coap_lite::{CoapOption, Packet};

use super::super::wire::{self, BadOption, BlockOpt};
use super::super::{Method, Request};

/// What identifies "the same request" across the blocks of a transfer: the target
/// resource and the options that select its representation (RFC 7959 §2.5). Block1,
/// Block2, Size1, Size2 and Content-Format are not part of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) method: Method,
    pub(super) host: Option<Vec<u8>>,
    pub(super) port: Option<u32>,
    pub(super) path: Vec<String>,
    pub(super) query: Vec<String>,
    pub(super) accept: Option<u16>,
}

pub(super) enum OptionError {
    Bad(u16),
    Proxy,
    NotUtf8,
}

impl From<BadOption> for OptionError {
    fn from(b: BadOption) -> Self {
        OptionError::Bad(b.0)
    }
}

/// The options of a request, validated (RFC 7252 §5.4, §5.10; RFC 7959 §2.1, §4).
#[derive(Clone, Debug)]
pub(super) struct RequestOptions {
    pub(super) host: Option<Vec<u8>>,
    pub(super) port: Option<u32>,
    pub(super) path: Vec<String>,
    pub(super) query: Vec<String>,
    pub(super) content_format: Option<u16>,
    pub(super) accept: Option<u16>,
    pub(super) block1: Option<BlockOpt>,
    pub(super) block2: Option<BlockOpt>,
    pub(super) size1: Option<u32>,
    pub(super) size2: Option<u32>,
}

impl RequestOptions {
    pub(super) fn parse(packet: &Packet) -> Result<Self, OptionError> {
        for (&number, _) in packet.options() {
            match number {
                // Processed here.
                3 | 7 | 11 | 12 | 15 | 17 | 23 | 27 | 28 | 60 => {}
                // Proxy-Uri, Proxy-Scheme: we are not a proxy (§5.7.2 -> 5.05).
                35 | 39 => return Err(OptionError::Proxy),
                // Critical and not processed (If-Match 1, If-None-Match 5, OSCORE 9, and
                // any unknown odd number): §5.4.1.
                n if n % 2 == 1 => return Err(OptionError::Bad(n)),
                // Elective options are ignored (§5.4.1).
                _ => {}
            }
        }
        let host = wire::single_option(packet, CoapOption::UriHost, 1, 255)?.map(<[u8]>::to_vec);
        let port = wire::uint_option(packet, CoapOption::UriPort, 2)?;
        let accept =
            wire::uint_option(packet, CoapOption::Accept, 2)?.and_then(|v| u16::try_from(v).ok());
        let block_of = |option: CoapOption| -> Result<Option<BlockOpt>, OptionError> {
            match wire::single_option(packet, option, 0, 3)? {
                None => Ok(None),
                Some(v) => BlockOpt::decode(v)
                    .map(Some)
                    .ok_or(OptionError::Bad(u16::from(option))),
            }
        };
        let block1 = block_of(CoapOption::Block1)?;
        let block2 = block_of(CoapOption::Block2)?;
        // Elective options with a bad length or repeated are ignored (§5.4.3, §5.4.5);
        // for a repeated elective option the first occurrence counts.
        let first_uint = |option: CoapOption, max_len: usize| -> Option<u32> {
            let v = packet.get_first_option(option)?;
            if v.len() > max_len {
                return None;
            }
            coap_lite::option_value::OptionValueU32::try_from(v.clone())
                .ok()
                .map(|x| x.0)
        };
        let content_format =
            first_uint(CoapOption::ContentFormat, 2).and_then(|v| u16::try_from(v).ok());
        let size1 = first_uint(CoapOption::Size1, 4);
        let size2 = first_uint(CoapOption::Size2, 4);
        let path =
            wire::string_options(packet, CoapOption::UriPath).map_err(|()| OptionError::NotUtf8)?;
        let query = wire::string_options(packet, CoapOption::UriQuery)
            .map_err(|()| OptionError::NotUtf8)?;
        Ok(Self {
            host,
            port,
            path,
            query,
            content_format,
            accept,
            block1,
            block2,
            size1,
            size2,
        })
    }

    pub(super) fn into_request(self, method: Method, payload: Vec<u8>) -> Request {
        Request {
            method,
            path: self.path,
            query: self.query,
            content_format: self.content_format,
            accept: self.accept,
            payload,
        }
    }
}
