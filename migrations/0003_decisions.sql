-- Treaty: commit decisions kept inside PostgreSQL (`--decision-store shard`). A transaction's
-- decision is one row, keyed by its GID. The coordinator inserts `commit` inside the transaction's
-- decision branch, which then commits in one phase: that COMMIT is the decision. Anyone who must
-- conclude abort (a recovering coordinator, another instance, an operator) inserts `abort` on the
-- same key in a transaction of its own. The primary key lets exactly one of the two commit: an
-- insert that meets the other's uncommitted row waits for it, then fails or does nothing.
-- Commit rows are deleted in batches once every branch has committed; abort rows are rare (abort
-- is presumed) and are kept.
CREATE TABLE IF NOT EXISTS treaty.decisions (
    gid            text PRIMARY KEY,
    outcome        text NOT NULL CHECK (outcome IN ('commit', 'abort')),
    -- The coordinator instance whose transaction this is (the GID names it too): a restarted
    -- instance, or one taking over for it, lists its commit rows to finish them.
    coordinator_id text NOT NULL,
    -- The shards to send COMMIT PREPARED to (empty for an abort row).
    participants   text[] NOT NULL DEFAULT '{}',
    decided_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS decisions_commits_by_coordinator
    ON treaty.decisions (coordinator_id) WHERE outcome = 'commit';
