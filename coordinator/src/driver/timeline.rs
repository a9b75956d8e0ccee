//! A bounded record of when a transaction, and each of its branches, entered each phase: what the
//! web console's timeline shows. The machine keeps only its current phases (and when it began,
//! decided and finished); this remembers the changes, noted by the driver after each step.
//!
//! Kept small and cheap because it runs on every event: comparing a few phases, and an allocation
//! only when a phase changes. At most [`MAX_MARKS`] marks per transaction; past that the oldest are
//! dropped (and counted), so a transaction re-driven for days cannot grow it. A mark is 24
//! bytes and a three-shard two-phase commit makes about twenty, so the 10,000 finished
//! transactions the table keeps for `GetTransaction` hold about 5 MB of marks.

use std::collections::VecDeque;

use crate::protocol::{BranchPhase, Phase, Transaction};

/// Marks kept per transaction (a three-shard two-phase commit makes about twenty).
pub const MAX_MARKS: usize = 64;

/// What changed phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Transaction(Phase),
    /// The branch at this index of the machine's `branches()` (which only ever grow at the end),
    /// so no shard name is copied on the event path.
    Branch {
        index: usize,
        phase: BranchPhase,
    },
}

/// One phase change and when the driver saw it (the clock's ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseMark {
    pub subject: Subject,
    pub at_ms: u64,
}

#[derive(Debug, Default)]
pub struct Timeline {
    marks: VecDeque<PhaseMark>,
    dropped: u64,
    last_phase: Option<Phase>,
    last_branches: Vec<BranchPhase>,
}

impl Timeline {
    /// Notes every phase of `machine` that differs from the last one seen.
    pub(super) fn observe(&mut self, machine: &Transaction, now_ms: u64) {
        let phase = machine.phase();
        if self.last_phase != Some(phase) {
            self.last_phase = Some(phase);
            self.push(Subject::Transaction(phase), now_ms);
        }
        for (index, branch) in machine.branches().iter().enumerate() {
            match self.last_branches.get_mut(index) {
                Some(last) if *last == branch.phase => {}
                Some(last) => {
                    *last = branch.phase;
                    self.push(
                        Subject::Branch {
                            index,
                            phase: branch.phase,
                        },
                        now_ms,
                    );
                }
                None => {
                    self.last_branches.push(branch.phase);
                    self.push(
                        Subject::Branch {
                            index,
                            phase: branch.phase,
                        },
                        now_ms,
                    );
                }
            }
        }
    }

    fn push(&mut self, subject: Subject, at_ms: u64) {
        if self.marks.len() == MAX_MARKS {
            self.marks.pop_front();
            self.dropped += 1;
        }
        self.marks.push_back(PhaseMark { subject, at_ms });
    }

    /// The marks kept, oldest first.
    pub fn marks(&self) -> Vec<PhaseMark> {
        self.marks.iter().copied().collect()
    }

    /// Marks dropped to stay within [`MAX_MARKS`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Event, Protocol, Timeouts};
    use treaty_types::ShardName;

    fn machine() -> Transaction {
        let timeouts = Timeouts {
            transaction_ms: 60_000,
            idle_ms: 30_000,
            vote_ms: 10_000,
        };
        Transaction::begin(7, Protocol::TwoPhase, timeouts, 100)
    }

    #[test]
    fn only_changes_are_marked() {
        let mut txn = machine();
        let mut timeline = Timeline::default();
        timeline.observe(&txn, 100);
        timeline.observe(&txn, 110);
        assert_eq!(
            timeline.marks(),
            vec![PhaseMark {
                subject: Subject::Transaction(Phase::Active),
                at_ms: 100
            }]
        );
        let shard = ShardName::new("s0").unwrap();
        txn.step(Event::Enlist { shard }, 120).unwrap();
        timeline.observe(&txn, 120);
        timeline.observe(&txn, 130);
        assert_eq!(timeline.marks().len(), 2);
        assert_eq!(
            timeline.marks()[1].subject,
            Subject::Branch {
                index: 0,
                phase: txn.branches()[0].phase
            }
        );
    }

    #[test]
    fn the_oldest_marks_are_dropped_past_the_bound() {
        let txn = machine();
        let mut timeline = Timeline::default();
        for at in 0..(MAX_MARKS as u64 + 5) {
            // Forget the last phase so that every observation is a change.
            timeline.last_phase = None;
            timeline.observe(&txn, at);
        }
        assert_eq!(timeline.marks().len(), MAX_MARKS);
        assert_eq!(timeline.dropped(), 5);
        assert_eq!(timeline.marks()[0].at_ms, 5);
    }
}
