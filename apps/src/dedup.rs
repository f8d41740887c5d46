//! Duplicate suppression by sequence number, for make-before-break switches.

/// Remembers which of the last [`SeqWindow::SIZE`] sequence numbers were seen.
///
/// Sequence numbers wrap (serial-number arithmetic). A number far behind the newest
/// (a restarted source) resets the window instead of being dropped for ever.
#[derive(Debug, Clone)]
pub struct SeqWindow {
    newest: Option<u32>,
    bits: [u64; Self::WORDS],
}

impl Default for SeqWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl SeqWindow {
    const WORDS: usize = 16;
    /// How many sequence numbers back duplicates are detected.
    pub const SIZE: u32 = (Self::WORDS * 64) as u32;

    /// An empty window.
    pub fn new() -> Self {
        Self {
            newest: None,
            bits: [0; Self::WORDS],
        }
    }

    fn bit(&mut self, seq: u32) -> (usize, u64) {
        let i = (seq % Self::SIZE) as usize;
        (i / 64, 1u64 << (i % 64))
    }

    /// Record `seq`; returns `false` when it was already seen (a duplicate).
    pub fn insert(&mut self, seq: u32) -> bool {
        let Some(newest) = self.newest else {
            self.reset_at(seq);
            return true;
        };
        let ahead = seq.wrapping_sub(newest);
        if ahead == 0 {
            return false;
        }
        if ahead < 0x8000_0000 {
            if ahead >= Self::SIZE {
                self.reset_at(seq);
                return true;
            }
            // Clear the slots we skip over, then mark seq.
            for s in 1..=ahead {
                let (w, m) = self.bit(newest.wrapping_add(s));
                self.bits[w] &= !m;
            }
            let (w, m) = self.bit(seq);
            self.bits[w] |= m;
            self.newest = Some(seq);
            return true;
        }
        let behind = newest.wrapping_sub(seq);
        if behind >= Self::SIZE {
            // Far behind: the source restarted; start over.
            self.reset_at(seq);
            return true;
        }
        let (w, m) = self.bit(seq);
        if self.bits[w] & m != 0 {
            return false;
        }
        self.bits[w] |= m;
        true
    }

    fn reset_at(&mut self, seq: u32) {
        self.bits = [0; Self::WORDS];
        let (w, m) = self.bit(seq);
        self.bits[w] |= m;
        self.newest = Some(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_duplicates_and_reordering() {
        let mut w = SeqWindow::new();
        assert!(w.insert(10));
        assert!(!w.insert(10));
        assert!(w.insert(12));
        assert!(w.insert(11));
        assert!(!w.insert(11));
        assert!(!w.insert(12));
    }

    #[test]
    fn test_wraparound() {
        let mut w = SeqWindow::new();
        assert!(w.insert(u32::MAX - 1));
        assert!(w.insert(u32::MAX));
        assert!(w.insert(0));
        assert!(!w.insert(u32::MAX));
        assert!(w.insert(1));
    }

    #[test]
    fn test_far_jump_resets() {
        let mut w = SeqWindow::new();
        for s in 0..100 {
            assert!(w.insert(s));
        }
        assert!(w.insert(5000));
        assert!(w.insert(3)); // a restarted source is accepted again
        assert!(!w.insert(3));
    }
}
