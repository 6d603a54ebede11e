-- Nights after the first. Runs the table rebuilds SQLite needs to change a constraint (the
-- migration connection has foreign keys off, as SQLite's documented procedure requires; the
-- opener checks them afterwards):
-- * provider batch ids are unique per provider, not across providers;
-- * a run stopped by its budget has its own status, `budget`;
-- * per-run accounting: the records a run read (`records_valid`), its figures frozen once it
--   is over (`figures_json`: reports keep them after its record rows are pruned), which run
--   ingested each batch (`ingested_by_run`), and when a batch entered `creating`
--   (`creating_at`: the reconcile grace counts from there, across restarts).

CREATE TABLE runs_new (
    id                  TEXT PRIMARY KEY,
    pipeline            TEXT NOT NULL,
    stage               TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'budget', 'interrupted', 'detached', 'error')),
    pipeline_file       TEXT NOT NULL,
    source_path         TEXT NOT NULL,
    output_path         TEXT NOT NULL,
    provider            TEXT NOT NULL,
    model               TEXT NOT NULL,
    pricing_mode        TEXT NOT NULL,
    max_attempts        INTEGER NOT NULL,
    records_read        INTEGER NOT NULL DEFAULT 0,
    records_quarantined INTEGER NOT NULL DEFAULT 0,
    host                TEXT NOT NULL,
    pid                 INTEGER NOT NULL,
    started_at          INTEGER NOT NULL,
    finished_at         INTEGER,
    exit_code           INTEGER,
    message             TEXT,
    budget_pico         INTEGER,
    max_item_pico       INTEGER,
    plan_json           TEXT,
    worker_id           TEXT,
    -- valid records the run read (NULL until its ingest finished)
    records_valid       INTEGER,
    -- the run's figures once nothing of it is open any more (JSON)
    figures_json        TEXT
);
INSERT INTO runs_new (id, pipeline, stage, status, pipeline_file, source_path, output_path, provider,
    model, pricing_mode, max_attempts, records_read, records_quarantined, host, pid, started_at,
    finished_at, exit_code, message, budget_pico, max_item_pico, plan_json, worker_id)
SELECT id, pipeline, stage, status, pipeline_file, source_path, output_path, provider,
    model, pricing_mode, max_attempts, records_read, records_quarantined, host, pid, started_at,
    finished_at, exit_code, message, budget_pico, max_item_pico, plan_json, worker_id
FROM runs;
DROP TABLE runs;
ALTER TABLE runs_new RENAME TO runs;
CREATE INDEX runs_by_pipeline ON runs (pipeline, started_at);
CREATE INDEX runs_by_start ON runs (started_at);

CREATE TABLE batches_new (
    id                 TEXT PRIMARY KEY,
    run_id             TEXT NOT NULL REFERENCES runs (id),
    pipeline           TEXT NOT NULL,
    stage              TEXT NOT NULL,
    provider           TEXT NOT NULL,
    model              TEXT NOT NULL,
    pricing_mode       TEXT NOT NULL,
    mode               TEXT NOT NULL DEFAULT 'batch' CHECK (mode IN ('batch', 'online')),
    state              TEXT NOT NULL CHECK (state IN ('planned', 'built', 'uploading', 'uploaded', 'creating', 'submitted', 'ended', 'ingested')),
    request_count      INTEGER NOT NULL,
    reserved_pico      INTEGER NOT NULL DEFAULT 0,
    file_path          TEXT,
    file_sha256        TEXT,
    file_bytes         INTEGER,
    input_file_id      TEXT,
    provider_batch_id  TEXT,
    provider_status    TEXT,
    end_state          TEXT,
    output_file_id     TEXT,
    error_file_id      TEXT,
    provider_usage     TEXT,
    error              TEXT,
    created_at         INTEGER NOT NULL,
    submitted_at       INTEGER,
    ended_at           INTEGER,
    ingested_at        INTEGER,
    lease_owner        TEXT,
    lease_token        INTEGER NOT NULL DEFAULT 0,
    lease_expires_at   INTEGER,
    -- when the batch entered `creating` (the reconcile grace counts from here)
    creating_at        INTEGER,
    -- the run whose process ingested the batch (NULL: a worker, or not yet)
    ingested_by_run    TEXT,
    UNIQUE (provider, provider_batch_id)
);
INSERT INTO batches_new (id, run_id, pipeline, stage, provider, model, pricing_mode, mode, state,
    request_count, reserved_pico, file_path, file_sha256, file_bytes, input_file_id,
    provider_batch_id, provider_status, end_state, output_file_id, error_file_id, provider_usage,
    error, created_at, submitted_at, ended_at, ingested_at, lease_owner, lease_token,
    lease_expires_at, creating_at)
SELECT id, run_id, pipeline, stage, provider, model, pricing_mode, mode, state,
    request_count, reserved_pico, file_path, file_sha256, file_bytes, input_file_id,
    provider_batch_id, provider_status, end_state, output_file_id, error_file_id, provider_usage,
    error, created_at, submitted_at, ended_at, ingested_at, lease_owner, lease_token,
    lease_expires_at, CASE WHEN state = 'creating' THEN created_at END
FROM batches;
DROP TABLE batches;
ALTER TABLE batches_new RENAME TO batches;
CREATE INDEX batches_open ON batches (pipeline, stage, state) WHERE state <> 'ingested';
CREATE INDEX batches_by_run ON batches (run_id);
CREATE INDEX batches_by_lease ON batches (lease_owner) WHERE state <> 'ingested';
CREATE INDEX batches_by_collector ON batches (ingested_by_run) WHERE ingested_by_run IS NOT NULL;
