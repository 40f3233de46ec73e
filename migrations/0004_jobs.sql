-- The compute queue: one row per job (a checkpoint x slice to partition), claimed by
-- workers with an UPDATE in a transaction (a concurrent claim of the same snapshot fails
-- to commit and is retried). Heartbeats are appended to their own table so that they
-- never conflict with claims.
CREATE TABLE IF NOT EXISTS jobs (
    job_id VARCHAR, model VARCHAR, checkpoint VARCHAR, step BIGINT, spec VARCHAR,
    status VARCHAR, attempts INTEGER, worker VARCHAR, token VARCHAR,
    claimed_at TIMESTAMP, finished_at TIMESTAMP, error VARCHAR, partition_id VARCHAR,
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS job_heartbeats (token VARCHAR, beat_at TIMESTAMP);
