//! The per-identity session limit across engine shards.
//!
//! Each est-dtls endpoint enforces `max_sessions_per_identity` over its own sessions. With
//! `engine_shards` = N > 1 one device identity could then hold N times the limit (its sessions
//! from different source ports hash to different shards). The drivers share this registry:
//! every established session of an identity, in the order the drivers registered them. When a
//! new session pushes its identity over the limit, [`IdentityRegistry::established`] hands back
//! the oldest ones, whichever shard holds them; the new session's driver closes those on its
//! own shard at once and sends the others' shards a command (`Endpoint::supersede`, counted in
//! `sessions_superseded` like the engine's own replacement), which waits for room when that
//! shard's command queue is full (counted in `supersedes_deferred`; `Driver::register_identity`
//! in server.rs describes the moment the identity holds one session over its limit).
//!
//! Only the drivers of a sharded listener use it, at a session's start and end (never per
//! datagram); with one shard the engine's own limit is the whole story and no registry exists.

use std::collections::VecDeque;

use dashmap::DashMap;
use est_dtls::ConnectionHandle;

/// A session of some engine shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ShardSession {
    pub(crate) shard: usize,
    pub(crate) handle: ConnectionHandle,
}

/// Identity -> its established sessions, oldest first.
#[derive(Debug)]
pub(crate) struct IdentityRegistry {
    max_per_identity: usize,
    sessions: DashMap<Vec<u8>, VecDeque<ShardSession>>,
}

impl IdentityRegistry {
    /// A registry holding each identity to `max_per_identity` sessions (at least 1).
    pub(crate) fn new(max_per_identity: usize) -> Self {
        IdentityRegistry {
            max_per_identity: max_per_identity.max(1),
            sessions: DashMap::new(),
        }
    }

    /// Records a newly established session of `identity`. Returns the sessions it pushes over
    /// the limit, oldest first; they are no longer counted (the caller closes them).
    pub(crate) fn established(&self, identity: &[u8], session: ShardSession) -> Vec<ShardSession> {
        let mut entry = self.sessions.entry(identity.to_vec()).or_default();
        let queue = entry.value_mut();
        queue.retain(|s| *s != session);
        queue.push_back(session);
        let over = queue.len().saturating_sub(self.max_per_identity);
        queue.drain(..over).collect()
    }

    /// Forgets a session that ended (a no-op for one already handed back as superseded).
    pub(crate) fn closed(&self, identity: &[u8], session: ShardSession) {
        let now_empty = match self.sessions.get_mut(identity) {
            Some(mut queue) => {
                queue.retain(|s| *s != session);
                queue.is_empty()
            }
            None => false,
        };
        if now_empty {
            // Only if still empty: another shard may have registered one meanwhile.
            self.sessions.remove_if(identity, |_, q| q.is_empty());
        }
    }

    /// Sessions of `identity` counted now.
    #[cfg(test)]
    pub(crate) fn count(&self, identity: &[u8]) -> usize {
        self.sessions.get(identity).map_or(0, |q| q.len())
    }

    /// Identities with at least one session.
    #[cfg(test)]
    pub(crate) fn identities(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn s(shard: usize, h: u64) -> ShardSession {
        ShardSession {
            shard,
            handle: ConnectionHandle(h),
        }
    }

    #[test]
    fn the_oldest_sessions_go_whatever_their_shard() {
        let r = IdentityRegistry::new(2);
        assert!(r.established(b"meter-1", s(0, 1)).is_empty());
        assert!(r.established(b"meter-1", s(3, 1)).is_empty());
        assert_eq!(r.established(b"meter-1", s(1, 7)), vec![s(0, 1)]);
        assert_eq!(r.established(b"meter-1", s(0, 2)), vec![s(3, 1)]);
        assert_eq!(r.count(b"meter-1"), 2);
        // A session that ends on its own frees its place: the next one pushes nothing out.
        r.closed(b"meter-1", s(1, 7));
        assert_eq!(r.count(b"meter-1"), 1);
        assert!(r.established(b"meter-1", s(2, 9)).is_empty());
        assert_eq!(r.established(b"meter-1", s(2, 10)), vec![s(0, 2)]);
    }

    #[test]
    fn identities_do_not_limit_each_other() {
        let r = IdentityRegistry::new(1);
        for shard in 0..4 {
            assert!(r.established(&[shard as u8], s(shard, 1)).is_empty());
        }
        assert_eq!(r.identities(), 4);
        assert_eq!(r.established(&[0], s(2, 2)), vec![s(0, 1)]);
        assert_eq!(r.identities(), 4);
        for shard in 1..4 {
            assert_eq!(r.count(&[shard as u8]), 1);
        }
    }

    #[test]
    fn the_close_of_a_superseded_session_changes_nothing() {
        let r = IdentityRegistry::new(1);
        r.established(b"id", s(0, 1));
        assert_eq!(r.established(b"id", s(1, 1)), vec![s(0, 1)]);
        // Its shard reports the close later: the newer session stays counted.
        r.closed(b"id", s(0, 1));
        assert_eq!(r.count(b"id"), 1);
        // Closing the last one forgets the identity; an unknown identity is a no-op.
        r.closed(b"id", s(1, 1));
        assert_eq!(r.identities(), 0);
        r.closed(b"unknown", s(0, 5));
        assert_eq!(r.identities(), 0);
    }

    #[test]
    fn a_session_registered_twice_counts_once() {
        let r = IdentityRegistry::new(2);
        r.established(b"id", s(0, 1));
        assert!(r.established(b"id", s(0, 1)).is_empty());
        assert_eq!(r.count(b"id"), 1);
    }

    #[test]
    fn a_zero_limit_is_taken_as_one() {
        let r = IdentityRegistry::new(0);
        assert!(r.established(b"id", s(0, 1)).is_empty());
        assert_eq!(r.established(b"id", s(0, 2)), vec![s(0, 1)]);
    }

    #[test]
    fn concurrent_shards_never_leave_more_than_the_limit() {
        // Four threads (shards) register 500 sessions each of one identity at once; every
        // session is handed back as superseded exactly once, except the last `max` counted.
        let max = 3;
        let r = Arc::new(IdentityRegistry::new(max));
        let threads: Vec<_> = (0..4)
            .map(|shard| {
                let r = Arc::clone(&r);
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    for h in 0..500 {
                        out.extend(r.established(b"one", s(shard, h)));
                        assert!(r.count(b"one") <= max);
                    }
                    out
                })
            })
            .collect();
        let mut superseded: Vec<ShardSession> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(superseded.len(), 4 * 500 - max);
        superseded.sort_by_key(|x| (x.shard, x.handle));
        superseded.dedup();
        assert_eq!(superseded.len(), 4 * 500 - max);
        assert_eq!(r.count(b"one"), max);
    }
}
