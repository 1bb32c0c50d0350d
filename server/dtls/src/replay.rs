//! Anti-replay window (RFC 6347 §4.1.2.6; brief §1): a 64-record sliding bitmap, one per epoch.
//!
//! Use: `check(seq)` before decrypting (cheap reject of duplicates and records left of the
//! window), `update(seq)` only after the record authenticated ("The receive window is updated
//! only if the MAC verification succeeds").

/// Window size in records (the RFC's preferred default).
pub const WINDOW_SIZE: u64 = 64;

/// 64-bit anti-replay window. Bit `i` of `bitmap` marks `highest - i` as seen.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    highest: Option<u64>,
    bitmap: u64,
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self::default()
    }

    /// `false` if `seq` is left of the window or already seen; `true` if it may be new (right of
    /// the highest seen, or inside the window and unmarked).
    pub fn check(&self, seq: u64) -> bool {
        let Some(top) = self.highest else {
            return true;
        };
        if seq > top {
            return true;
        }
        let back = top - seq;
        if back >= WINDOW_SIZE {
            return false;
        }
        self.bitmap & (1u64 << back) == 0
    }

    /// Mark `seq` as received. Call only after the record authenticated.
    pub fn update(&mut self, seq: u64) {
        match self.highest {
            None => {
                self.highest = Some(seq);
                self.bitmap = 1;
            }
            Some(top) if seq > top => {
                let shift = seq - top;
                self.bitmap = if shift >= WINDOW_SIZE {
                    1
                } else {
                    (self.bitmap << shift) | 1
                };
                self.highest = Some(seq);
            }
            Some(top) => {
                let back = top - seq;
                if back < WINDOW_SIZE {
                    self.bitmap |= 1u64 << back;
                }
            }
        }
    }

    /// Highest sequence number marked so far.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_window_accepts_anything() {
        let w = ReplayWindow::new();
        assert!(w.check(0));
        assert!(w.check(u64::MAX));
        assert_eq!(w.highest(), None);
    }

    #[test]
    fn duplicates_refused() {
        let mut w = ReplayWindow::new();
        for s in [0, 1, 2, 5, 3] {
            assert!(w.check(s));
            w.update(s);
            assert!(!w.check(s), "seq {s} accepted twice");
        }
        assert!(w.check(4));
        assert!(!w.check(0));
        assert_eq!(w.highest(), Some(5));
    }

    #[test]
    fn window_edges_63_and_64() {
        let mut w = ReplayWindow::new();
        w.update(100);
        // 100 - 63 = 37 is the left edge (inside), 36 is outside.
        assert!(w.check(37));
        assert!(!w.check(36));
        w.update(37);
        assert!(!w.check(37));
        // Starting at 0: 63 back is still in the window, 64 back is not.
        let mut w = ReplayWindow::new();
        w.update(0);
        w.update(63);
        assert!(!w.check(0), "seq 0 is 63 back and marked");
        assert!(w.check(1));
        w.update(64);
        assert!(!w.check(0), "seq 0 now 64 back: left of the window");
        assert!(w.check(1), "seq 1 is 63 back and unmarked");
        assert!(!w.check(63));
        assert!(!w.check(64));
    }

    #[test]
    fn old_records_left_of_window_refused() {
        let mut w = ReplayWindow::new();
        w.update(1000);
        assert!(!w.check(0));
        assert!(!w.check(1000 - WINDOW_SIZE));
        assert!(w.check(1000 - WINDOW_SIZE + 1));
        // update with an old seq changes nothing
        let before = (w.highest(), w.bitmap);
        w.update(5);
        assert_eq!((w.highest(), w.bitmap), before);
    }

    #[test]
    fn far_right_jumps_reset_the_bitmap() {
        let mut w = ReplayWindow::new();
        for s in 0..64 {
            w.update(s);
        }
        assert_eq!(w.bitmap, u64::MAX);
        // jump by exactly 64: the old top (63) falls out
        w.update(127);
        assert_eq!(w.bitmap, 1);
        assert!(w.check(64) && w.check(126));
        assert!(!w.check(63));
        // huge jump
        w.update(1 << 47);
        assert_eq!(w.highest(), Some(1 << 47));
        assert!(!w.check(127));
        assert!(w.check((1 << 47) - 1));
        // jump by 63 keeps the old top at the left edge
        let mut w = ReplayWindow::new();
        w.update(10);
        w.update(73);
        assert!(!w.check(10));
        assert!(w.check(11));
        // at u64::MAX nothing overflows
        w.update(u64::MAX);
        assert!(!w.check(u64::MAX));
        assert!(w.check(u64::MAX - 1));
    }

    #[test]
    fn check_never_changes_state() {
        // The engine calls check() before decrypting and update() only after the record
        // authenticated: a forged record that passes check() but fails the AEAD must leave the
        // window as it was, so the genuine record with that number is still accepted.
        let mut w = ReplayWindow::new();
        w.update(10);
        let snapshot = w.clone();
        assert!(w.check(11));
        assert!(w.check(200));
        assert!(w.check(9));
        assert_eq!(
            (w.highest(), w.bitmap),
            (snapshot.highest(), snapshot.bitmap)
        );
        // forged seq 200 failed authentication: no update; genuine 11 and 9 still fine
        w.update(11);
        w.update(9);
        assert_eq!(w.highest(), Some(11));
        assert!(w.check(12) && !w.check(11) && !w.check(9));
    }
}
