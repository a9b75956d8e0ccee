-- Treaty: the commit row is inserted inside every transaction's decision branch, so whatever
-- PostgreSQL does per insert is on the commit path. Measured per insert (docs/performance.md,
-- session 23): the CHECK on `outcome` (its expression read and compiled again by every INSERT)
-- and the partial index on coordinator_id (its predicate compiled and evaluated, one more
-- B-tree entry, and one more to clean after the row is deleted) cost together 15-30 us of
-- PostgreSQL CPU per commit row, a sixth to a fifth of its insert. Neither earns it:
-- - every reader checks `outcome` and refuses a value other than 'commit' or 'abort'
--   (`participant/src/decisions.rs`), and only Treaty writes the table, with literal values;
-- - the rows are deleted in batches once every branch finished, so the table stays small, and
--   listing one coordinator's rows (at a restart, or to take over for an instance that died)
--   reads it whole at about the same cost as through an index that nearly every row matches
--   when one or a few coordinators run. The key on `gid`, which decides exactly once, stays.
ALTER TABLE treaty.decisions DROP CONSTRAINT IF EXISTS decisions_outcome_check;
DROP INDEX IF EXISTS treaty.decisions_commits_by_coordinator;
