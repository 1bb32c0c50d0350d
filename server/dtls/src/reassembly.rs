//! Handshake message reassembly (RFC 6347 §4.2.2-4.2.3): fragments may come in any order,
//! overlap, repeat, or belong to messages ahead of the next expected one. Everything a peer can
//! make us buffer here is bounded: message length, messages ahead, ranges per message.

use crate::wire::{DecodeError, HandshakeFragment};

/// How many messages beyond the next expected one are buffered (a flight has at most five).
const MAX_MESSAGES_AHEAD: u16 = 8;
/// Distinct byte ranges tracked per message before it is refused (pathological fragmentation).
const MAX_RANGES: usize = 64;

/// What became of an inserted fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// Part of the next expected message or one shortly after it: kept.
    Buffered,
    /// Belongs to a message already delivered: the peer is retransmitting its previous flight.
    Old,
    /// Too far ahead: dropped.
    TooFarAhead,
}

#[derive(Debug)]
struct Partial {
    seq: u16,
    msg_type: u8,
    body: Vec<u8>,
    /// Received byte ranges, sorted and merged: [start, end).
    ranges: Vec<(u32, u32)>,
}

impl Partial {
    fn complete(&self) -> bool {
        matches!(self.ranges.as_slice(), [(0, end)] if *end as usize == self.body.len())
            || self.body.is_empty()
    }

    fn add_range(&mut self, start: u32, end: u32) -> Result<(), DecodeError> {
        if start == end {
            return Ok(());
        }
        self.ranges.push((start, end));
        self.ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        if merged.len() > MAX_RANGES {
            return Err(DecodeError::TooLarge("handshake fragment count"));
        }
        self.ranges = merged;
        Ok(())
    }
}

/// Reassembles one direction's handshake messages and delivers them in message_seq order.
#[derive(Debug)]
pub(crate) struct Reassembler {
    next_seq: u16,
    max_message_len: u32,
    pending: Vec<Partial>,
}

impl Reassembler {
    /// `next_seq` is the first message_seq expected; messages longer than `max_message_len`
    /// are refused.
    pub(crate) fn new(next_seq: u16, max_message_len: u32) -> Self {
        Reassembler {
            next_seq,
            max_message_len,
            pending: Vec::new(),
        }
    }

    /// The message_seq of the next message to deliver.
    #[cfg(test)]
    pub(crate) fn next_seq(&self) -> u16 {
        self.next_seq
    }

    /// Takes a fragment in. Errors are protocol violations (inconsistent type or length, too
    /// large); the caller decides whether they are fatal.
    pub(crate) fn insert(&mut self, frag: &HandshakeFragment<'_>) -> Result<Inserted, DecodeError> {
        if frag.message_seq < self.next_seq {
            return Ok(Inserted::Old);
        }
        if frag.message_seq - self.next_seq >= MAX_MESSAGES_AHEAD {
            return Ok(Inserted::TooFarAhead);
        }
        if frag.length > self.max_message_len {
            return Err(DecodeError::TooLarge("handshake message"));
        }
        let idx = match self.pending.iter().position(|p| p.seq == frag.message_seq) {
            Some(i) => i,
            None => {
                self.pending.push(Partial {
                    seq: frag.message_seq,
                    msg_type: frag.msg_type,
                    body: vec![0; frag.length as usize],
                    ranges: Vec::new(),
                });
                self.pending.len() - 1
            }
        };
        let Some(p) = self.pending.get_mut(idx) else {
            return Err(DecodeError::Invalid("reassembly state"));
        };
        if p.msg_type != frag.msg_type || p.body.len() != frag.length as usize {
            return Err(DecodeError::Invalid("fragment of another message"));
        }
        let start = frag.offset as usize;
        let end = start + frag.body.len();
        // parse_handshake_fragments guarantees end <= length; checked again, never trusted.
        let Some(dst) = p.body.get_mut(start..end) else {
            return Err(DecodeError::Invalid("handshake fragment range"));
        };
        dst.copy_from_slice(frag.body);
        p.add_range(start as u32, end as u32)?;
        Ok(Inserted::Buffered)
    }

    /// The next complete message in order: (msg_type, message_seq, body).
    pub(crate) fn pop(&mut self) -> Option<(u8, u16, Vec<u8>)> {
        let idx = self
            .pending
            .iter()
            .position(|p| p.seq == self.next_seq && p.complete())?;
        let p = self.pending.swap_remove(idx);
        self.next_seq = self.next_seq.wrapping_add(1);
        Some((p.msg_type, p.seq, p.body))
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "unit tests: a panic is the test failing"
)]
mod tests {
    use super::*;
    use crate::wire::{fragment_handshake, handshake_message, parse_handshake_fragments};

    fn frags(msg_type: u8, seq: u16, body: &[u8], max: usize) -> Vec<Vec<u8>> {
        fragment_handshake(&handshake_message(msg_type, seq, body), max)
    }

    #[test]
    fn out_of_order_overlapping_and_duplicate_fragments_reassemble() {
        let body: Vec<u8> = (0..=255u8).collect();
        let fs = frags(11, 2, &body, 40);
        let mut r = Reassembler::new(2, 4096);
        for i in [3usize, 0, 6, 3, 1, 5, 2, 4] {
            let parsed = parse_handshake_fragments(&fs[i]).unwrap();
            assert_eq!(r.insert(&parsed[0]).unwrap(), Inserted::Buffered);
            if i != 4 {
                assert!(r.pop().is_none() || i == 4);
            }
        }
        // an overlapping fragment covering 10..90
        let overlap = HandshakeFragment {
            msg_type: 11,
            length: 256,
            message_seq: 2,
            offset: 10,
            body: &body[10..90],
        };
        r.insert(&overlap).unwrap();
        assert_eq!(r.pop(), Some((11, 2, body.clone())));
        assert_eq!(r.next_seq(), 3);
        let again = parse_handshake_fragments(&fs[0]).unwrap();
        assert_eq!(r.insert(&again[0]).unwrap(), Inserted::Old);
    }

    #[test]
    fn messages_are_delivered_in_sequence_order() {
        let mut r = Reassembler::new(0, 100);
        let b = handshake_message(16, 1, b"second");
        let a = handshake_message(11, 0, b"first");
        r.insert(&parse_handshake_fragments(&b).unwrap()[0])
            .unwrap();
        assert!(r.pop().is_none());
        r.insert(&parse_handshake_fragments(&a).unwrap()[0])
            .unwrap();
        assert_eq!(r.pop().unwrap().2, b"first");
        assert_eq!(r.pop().unwrap().2, b"second");
        assert!(r.pop().is_none());
    }

    #[test]
    fn limits_hold() {
        let mut r = Reassembler::new(0, 100);
        let big = HandshakeFragment {
            msg_type: 11,
            length: 101,
            message_seq: 0,
            offset: 0,
            body: &[],
        };
        assert!(r.insert(&big).is_err());
        let far = HandshakeFragment {
            msg_type: 11,
            length: 1,
            message_seq: 9,
            offset: 0,
            body: &[1],
        };
        assert_eq!(r.insert(&far).unwrap(), Inserted::TooFarAhead);
        // a fragment claiming another type for a buffered message_seq
        let a = HandshakeFragment {
            msg_type: 11,
            length: 10,
            message_seq: 0,
            offset: 0,
            body: &[1, 2],
        };
        let b = HandshakeFragment { msg_type: 12, ..a };
        r.insert(&a).unwrap();
        assert!(r.insert(&b).is_err());
        // pathological fragmentation: one-byte fragments with gaps
        let mut r = Reassembler::new(0, 1000);
        let data = [0u8; 1000];
        let mut failed = false;
        for i in 0..200u32 {
            let f = HandshakeFragment {
                msg_type: 11,
                length: 1000,
                message_seq: 0,
                offset: i * 4,
                body: &data[..1],
            };
            if r.insert(&f).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "range count limit not enforced");
    }

    #[test]
    fn empty_messages_complete_at_once() {
        let mut r = Reassembler::new(4, 100);
        let m = handshake_message(14, 4, b"");
        r.insert(&parse_handshake_fragments(&m).unwrap()[0])
            .unwrap();
        assert_eq!(r.pop(), Some((14, 4, vec![])));
    }
}
