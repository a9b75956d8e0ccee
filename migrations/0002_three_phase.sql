-- Treaty participant, three-phase commit: what a branch must remember across a participant restart
-- while it is prepared. Written outside the branch (the branch's own rows are invisible until it
-- commits): inserted before PREPARE TRANSACTION, updated before a pre-commit or a termination
-- answer is acknowledged, deleted once the branch is committed or rolled back.
CREATE TABLE IF NOT EXISTS treaty.three_phase (
    gid                  text PRIMARY KEY,
    -- Every participant of the transaction and the address it is reached at (same order).
    shards               text[] NOT NULL,
    urls                 text[] NOT NULL,
    pre_committed        boolean NOT NULL DEFAULT false,
    -- The highest ballot promised: round, then the coordinator's incarnation or a participant's name.
    promised_round       bigint NOT NULL DEFAULT 0,
    promised_incarnation bigint,
    promised_participant text,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
