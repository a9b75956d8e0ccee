//! Integration-style tests of the decision log: replay, damage, group commit, compaction, crashes.
