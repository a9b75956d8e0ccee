-- Treaty participant: one marker row per branch that was prepared. The row is inserted inside the
-- branch right before PREPARE TRANSACTION, so it commits or rolls back with the branch: after the
-- fact, "row present" means the branch committed. Rows are deleted once the coordinator no longer
-- tracks the transaction.
CREATE SCHEMA IF NOT EXISTS treaty;

CREATE TABLE IF NOT EXISTS treaty.branches (
    gid            text PRIMARY KEY,
    coordinator_id text NOT NULL,
    txid           bigint NOT NULL,
    prepared_at    timestamptz NOT NULL DEFAULT now()
);

-- Marker cleanup scans the oldest rows first.
CREATE INDEX IF NOT EXISTS branches_prepared_at ON treaty.branches (prepared_at);
