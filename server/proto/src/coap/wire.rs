//! Edge parsing and building of CoAP messages on top of `coap-lite`.
//!
//! `coap_lite::Packet::from_bytes` checks lengths but not the version, the empty-message
//! rules or option value lengths; those checks live here so the server and client can
//! trust what they get.

use coap_lite::{
    block_handler::BlockValue,
    option_value::{OptionValueU16, OptionValueU32},
    CoapOption, MessageClass, MessageType, Packet,
};

/// A Block1/Block2 option value (RFC 7959 §2.2): `NUM << 4 | M << 3 | SZX`, 0-3 bytes.
///
/// `coap_lite::block_handler::BlockValue` stores NUM as `u16`, which cannot hold the 20-bit
/// NUM a 3-byte option carries; this type keeps the full range and converts to and from
/// `BlockValue` where it fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockOpt {
    pub num: u32,
    pub more: bool,
    /// 0..=7 as received; 7 is reserved (RFC 7959 §2.2) and rejected by the caller.
    pub szx: u8,
}

impl BlockOpt {
    /// Largest NUM a 3-byte option can carry.
    pub const MAX_NUM: u32 = (1 << 20) - 1;

    pub fn new(num: u32, more: bool, szx: u8) -> Self {
        Self {
            num: num.min(Self::MAX_NUM),
            more,
            szx: szx.min(7),
        }
    }

    /// Decodes an option value; `None` if longer than 3 bytes (RFC 7959 §2.1).
    pub fn decode(value: &[u8]) -> Option<Self> {
        if value.len() > 3 {
            return None;
        }
        let v = OptionValueU32::try_from(value.to_vec()).ok()?.0;
        Some(Self {
            num: v >> 4,
            more: v & 0x8 != 0,
            szx: (v & 0x7) as u8,
        })
    }

    /// Encodes with the shortest uint encoding (all-zero value = empty option).
    pub fn encode(self) -> Vec<u8> {
        let v = (self.num.min(Self::MAX_NUM) << 4)
            | (u32::from(self.more) << 3)
            | u32::from(self.szx & 7);
        OptionValueU32(v).into()
    }

    /// Block size in bytes (2^(SZX+4)); SZX 7 is reported as 2048 but never valid.
    pub fn size(self) -> usize {
        16usize << self.szx.min(7)
    }

    /// Byte offset of this block: NUM × size, in u64 so it cannot overflow.
    pub fn offset(self) -> u64 {
        u64::from(self.num) << (u32::from(self.szx.min(7)) + 4)
    }
}

impl From<BlockValue> for BlockOpt {
    fn from(b: BlockValue) -> Self {
        Self::new(u32::from(b.num), b.more, b.size_exponent)
    }
}

impl TryFrom<BlockOpt> for BlockValue {
    type Error = std::num::TryFromIntError;
    fn try_from(b: BlockOpt) -> Result<Self, Self::Error> {
        Ok(BlockValue {
            num: u16::try_from(b.num)?,
            more: b.more,
            size_exponent: b.szx,
        })
    }
}

/// The fixed 4-byte header, read without trusting anything else (RFC 7252 §3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RawHeader {
    pub version: u8,
    pub mtype: MessageType,
    pub token_len: u8,
    pub code: u8,
    pub mid: u16,
}

impl RawHeader {
    pub(crate) fn read(datagram: &[u8]) -> Option<Self> {
        let (b0, code, m0, m1) = match datagram {
            [a, b, c, d, ..] => (*a, *b, *c, *d),
            _ => return None,
        };
        let mtype = match (b0 >> 4) & 0x3 {
            0 => MessageType::Confirmable,
            1 => MessageType::NonConfirmable,
            2 => MessageType::Acknowledgement,
            _ => MessageType::Reset,
        };
        Some(Self {
            version: b0 >> 6,
            mtype,
            token_len: b0 & 0x0F,
            code,
            mid: u16::from_be_bytes([m0, m1]),
        })
    }
}

/// Why a datagram is not a valid CoAP message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Malformed {
    /// Shorter than 4 bytes or version != 1: silently ignored (RFC 7252 §3).
    Unreadable,
    /// Readable header, but a message format error (RFC 7252 §3, §4.1): a CON is rejected
    /// with RST, anything else ignored (§4.2, §4.3).
    Format(RawHeader),
}

/// Parses a datagram at the edge: version, TKL, option encoding, the empty-message rule
/// (§4.1: code 0.00 has no token, options or payload) and the payload-marker rule
/// (§3: a marker followed by a zero-length payload is a format error).
pub(crate) fn parse(datagram: &[u8]) -> Result<(RawHeader, Packet), Malformed> {
    let header = RawHeader::read(datagram).ok_or(Malformed::Unreadable)?;
    if header.version != 1 {
        return Err(Malformed::Unreadable);
    }
    if header.token_len > 8 {
        // TKL 9-15 are reserved (RFC 7252 §3; RFC 8974 extended tokens not supported).
        return Err(Malformed::Format(header));
    }
    if header.code == 0 && datagram.len() != 4 {
        return Err(Malformed::Format(header));
    }
    let packet = Packet::from_bytes(datagram).map_err(|_| Malformed::Format(header))?;
    if packet.payload.is_empty() && datagram.last() == Some(&0xFF) {
        // The 0xFF may belong to an option value; re-encoding tells whether a marker with
        // an empty payload was present (the option encoding is canonical).
        let re_encoded_len = packet.to_bytes_unlimited().map(|b| b.len()).unwrap_or(0);
        if re_encoded_len != datagram.len() {
            return Err(Malformed::Format(header));
        }
    }
    Ok((header, packet))
}

/// An option occurrence problem, answered 4.02 for critical options (RFC 7252 §5.4.1,
/// §5.4.3, §5.4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BadOption(pub u16);

/// Returns the single value of a non-repeatable option, or `Err` if the option repeats
/// (supernumerary occurrences of a critical option are unrecognised, §5.4.5) or its
/// length is outside `min..=max` (§5.4.3). For elective options the caller may ignore the
/// error; this function reports it either way.
pub(crate) fn single_option(
    packet: &Packet,
    option: CoapOption,
    min: usize,
    max: usize,
) -> Result<Option<&[u8]>, BadOption> {
    let number = u16::from(option);
    match packet.get_option(option) {
        None => Ok(None),
        Some(list) => {
            let mut iter = list.iter();
            let first = match iter.next() {
                None => return Ok(None),
                Some(v) => v,
            };
            if iter.next().is_some() && number % 2 == 1 {
                return Err(BadOption(number));
            }
            if first.len() < min || first.len() > max {
                return Err(BadOption(number));
            }
            Ok(Some(first.as_slice()))
        }
    }
}

/// A uint option of at most `max_len` bytes (RFC 7252 §3.2).
pub(crate) fn uint_option(
    packet: &Packet,
    option: CoapOption,
    max_len: usize,
) -> Result<Option<u32>, BadOption> {
    let number = u16::from(option);
    match single_option(packet, option, 0, max_len.min(4))? {
        None => Ok(None),
        Some(v) => OptionValueU32::try_from(v.to_vec())
            .map(|x| Some(x.0))
            .map_err(|_| BadOption(number)),
    }
}

/// All values of a repeatable string option, as UTF-8 (§3.2 "string"); `Err(())` on
/// invalid UTF-8 or a value longer than 255 bytes.
pub(crate) fn string_options(packet: &Packet, option: CoapOption) -> Result<Vec<String>, ()> {
    match packet.get_option(option) {
        None => Ok(Vec::new()),
        Some(list) => list
            .iter()
            .map(|v| {
                if v.len() > 255 {
                    return Err(());
                }
                String::from_utf8(v.clone()).map_err(|_| ())
            })
            .collect(),
    }
}

pub(crate) fn set_uint(packet: &mut Packet, option: CoapOption, value: u32) {
    packet.clear_option(option);
    packet.add_option(option, OptionValueU32(value).into());
}

pub(crate) fn set_u16(packet: &mut Packet, option: CoapOption, value: u16) {
    packet.clear_option(option);
    packet.add_option(option, OptionValueU16(value).into());
}

pub(crate) fn set_block(packet: &mut Packet, option: CoapOption, block: BlockOpt) {
    packet.clear_option(option);
    packet.add_option(option, block.encode());
}

/// Builds a packet with the given header fields.
pub(crate) fn packet(mtype: MessageType, code: MessageClass, mid: u16, token: &[u8]) -> Packet {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(mtype);
    p.header.code = code;
    p.header.message_id = mid;
    // Tokens built by this module are at most 8 bytes; longer ones are truncated rather
    // than hitting coap-lite's assertion on TKL.
    let token = token.get(..token.len().min(8)).unwrap_or_default();
    p.set_token(token.to_vec());
    p
}

/// Serialises without coap-lite's 1280-byte cap: callers keep payloads to one block.
pub(crate) fn encode(packet: &Packet) -> Option<Vec<u8>> {
    packet.to_bytes_unlimited().ok()
}

/// An empty message (code 0.00, no token): ACK or RST (RFC 7252 §4.2, §4.3).
pub(crate) fn empty(mtype: MessageType, mid: u16) -> Vec<u8> {
    let t: u8 = match mtype {
        MessageType::Confirmable => 0,
        MessageType::NonConfirmable => 1,
        MessageType::Acknowledgement => 2,
        MessageType::Reset => 3,
    };
    let [m0, m1] = mid.to_be_bytes();
    vec![0x40 | (t << 4), 0x00, m0, m1]
}
