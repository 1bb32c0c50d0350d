//! Duplicate detection (RFC 7252 §4.5) for one session: by Message ID, bounded, each entry
//! expiring after EXCHANGE_LIFETIME (CON) or NON_LIFETIME (NON).

use std::collections::VecDeque;
use std::time::Instant;

#[derive(Debug)]
pub(super) enum DedupState {
    /// Handed to the application; a duplicate is ignored because the answer is coming.
    Pending,
    /// The exact bytes sent in answer (replayed for a duplicate CON).
    Answered(Vec<u8>),
    /// Nothing was sent (rejected NON); duplicates are ignored.
    Silent,
}

#[derive(Debug)]
struct DedupEntry {
    mid: u16,
    expires: Instant,
    state: DedupState,
}

/// The Message IDs seen recently and what was answered to each.
#[derive(Debug, Default)]
pub(super) struct DedupCache {
    entries: VecDeque<DedupEntry>,
}

impl DedupCache {
    /// What was done with Message ID `mid`, if it is remembered.
    pub(super) fn get(&self, mid: u16) -> Option<&DedupState> {
        self.entries.iter().find(|e| e.mid == mid).map(|e| &e.state)
    }

    /// Replaces the state of a remembered Message ID (nothing if it is not remembered).
    pub(super) fn set(&mut self, mid: u16, state: DedupState) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.mid == mid) {
            entry.state = state;
        }
    }

    /// Remembers `mid` until `expires`, holding at most `bound` entries; returns how many were
    /// evicted to make room.
    pub(super) fn remember(
        &mut self,
        mid: u16,
        expires: Instant,
        state: DedupState,
        bound: usize,
    ) -> u64 {
        let mut evicted = 0;
        while self.entries.len() >= bound {
            // Evict the oldest entry that is not waiting for the application.
            let idx = self
                .entries
                .iter()
                .position(|e| !matches!(e.state, DedupState::Pending))
                .unwrap_or(0);
            self.entries.remove(idx);
            evicted += 1;
        }
        self.entries.push_back(DedupEntry {
            mid,
            expires,
            state,
        });
        evicted
    }

    pub(super) fn expire(&mut self, now: Instant) {
        self.entries.retain(|e| e.expires > now);
    }

    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.expires).min()
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of the answers held for replay.
    pub(super) fn bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| match &e.state {
                DedupState::Answered(b) => b.len(),
                _ => 0,
            })
            .sum()
    }
}
