-- nightshift state store (SQLite). Times are unix milliseconds; money is whole pico-dollars.
-- Items are keyed by (pipeline, stage, dedupe_key) from the first migration, so stages can be
-- added without reshaping anything.

CREATE TABLE runs (
    id                  TEXT PRIMARY KEY,
    pipeline            TEXT NOT NULL,
    stage               TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted', 'detached', 'error')),
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
    -- the spending cap of the run and the per-item cap, in pico-dollars (NULL: none)
    budget_pico         INTEGER,
    max_item_pico       INTEGER,
    -- the plan the run started from (JSON), for `reconcile`
    plan_json           TEXT,
    -- the process running it (a row of `workers`)
    worker_id           TEXT
);
CREATE INDEX runs_by_pipeline ON runs (pipeline, started_at);
CREATE INDEX runs_by_start ON runs (started_at);

CREATE TABLE quarantine (
    id      INTEGER PRIMARY KEY,
    run_id  TEXT NOT NULL REFERENCES runs (id),
    source  TEXT NOT NULL,
    line    INTEGER NOT NULL,
    field   TEXT,
    reason  TEXT NOT NULL
);
CREATE INDEX quarantine_by_run ON quarantine (run_id, line);

-- The fixed part of a request body around the user message (see src/dedupe.rs).
CREATE TABLE shapes (
    id      INTEGER PRIMARY KEY,
    sha256  BLOB NOT NULL UNIQUE,
    prefix  TEXT NOT NULL,
    suffix  TEXT NOT NULL
);

CREATE TABLE items (
    id            INTEGER PRIMARY KEY,
    pipeline      TEXT NOT NULL,
    stage         TEXT NOT NULL,
    dedupe_key    BLOB NOT NULL,
    shape_id      INTEGER NOT NULL REFERENCES shapes (id),
    user_json     TEXT NOT NULL,
    body_bytes    INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'in_flight', 'succeeded', 'failed', 'exhausted')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    result        TEXT,
    last_error    TEXT,
    first_run_id  TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    UNIQUE (pipeline, stage, dedupe_key)
);
CREATE INDEX items_plannable ON items (pipeline, stage, id) WHERE state IN ('pending', 'failed');

-- One row per source record per run; many records may share one item.
CREATE TABLE records (
    run_id     TEXT NOT NULL REFERENCES runs (id),
    line       INTEGER NOT NULL,
    record_id  TEXT NOT NULL,
    item_id    INTEGER NOT NULL REFERENCES items (id),
    PRIMARY KEY (run_id, line)
) WITHOUT ROWID;

-- One provider batch job. The local id is created before anything is sent and travels to
-- the provider (file name, metadata, custom_id prefix).
CREATE TABLE batches (
    id                 TEXT PRIMARY KEY,
    run_id             TEXT NOT NULL REFERENCES runs (id),
    pipeline           TEXT NOT NULL,
    stage              TEXT NOT NULL,
    provider           TEXT NOT NULL,
    model              TEXT NOT NULL,
    pricing_mode       TEXT NOT NULL,
    -- batch: a provider batch job; online: real-time calls made by the runner itself
    mode               TEXT NOT NULL DEFAULT 'batch' CHECK (mode IN ('batch', 'online')),
    state              TEXT NOT NULL CHECK (state IN ('planned', 'built', 'uploading', 'uploaded', 'creating', 'submitted', 'ended', 'ingested')),
    request_count      INTEGER NOT NULL,
    -- worst-case cost reserved against the run's budget when planned
    reserved_pico      INTEGER NOT NULL DEFAULT 0,
    file_path          TEXT,
    file_sha256        TEXT,
    file_bytes         INTEGER,
    input_file_id      TEXT,
    provider_batch_id  TEXT UNIQUE,
    provider_status    TEXT,
    -- how the provider job ended: completed | failed | expired | cancelled | lost
    end_state          TEXT,
    output_file_id     TEXT,
    error_file_id      TEXT,
    provider_usage     TEXT,
    error              TEXT,
    created_at         INTEGER NOT NULL,
    submitted_at       INTEGER,
    ended_at           INTEGER,
    ingested_at        INTEGER,
    -- the worker holding the batch; every write names the token it claimed it under
    lease_owner        TEXT,
    lease_token        INTEGER NOT NULL DEFAULT 0,
    lease_expires_at   INTEGER
);
CREATE INDEX batches_open ON batches (pipeline, stage, state) WHERE state <> 'ingested';
CREATE INDEX batches_by_run ON batches (run_id);

-- One submission of one item inside one batch.
CREATE TABLE attempts (
    id             INTEGER PRIMARY KEY,
    item_id        INTEGER NOT NULL REFERENCES items (id),
    batch_id       TEXT NOT NULL REFERENCES batches (id),
    attempt_no     INTEGER NOT NULL,
    custom_id      TEXT NOT NULL UNIQUE,
    state          TEXT NOT NULL CHECK (state IN ('in_flight', 'succeeded', 'failed')),
    verdict        TEXT,
    error          TEXT,
    finish_reason  TEXT,
    model          TEXT,
    created_at     INTEGER NOT NULL,
    -- online mode: set (committed) before the request is sent
    dispatched_at  INTEGER,
    completed_at   INTEGER,
    UNIQUE (item_id, attempt_no)
);
CREATE INDEX attempts_by_batch ON attempts (batch_id);

-- What each attempt cost, written in the same transaction as its result; one row per
-- attempt (hence per custom_id), so applying a result file twice changes nothing.
CREATE TABLE ledger (
    attempt_id           INTEGER PRIMARY KEY REFERENCES attempts (id),
    custom_id            TEXT NOT NULL,
    batch_id             TEXT NOT NULL REFERENCES batches (id),
    run_id               TEXT NOT NULL REFERENCES runs (id),
    pipeline             TEXT NOT NULL,
    stage                TEXT NOT NULL,
    model                TEXT NOT NULL,
    pricing_mode         TEXT NOT NULL,
    input_tokens         INTEGER NOT NULL,
    cached_input_tokens  INTEGER NOT NULL,
    cache_write_tokens   INTEGER NOT NULL,
    output_tokens        INTEGER NOT NULL,
    reasoning_tokens     INTEGER NOT NULL,
    cost_pico            INTEGER NOT NULL,
    standard_cost_pico   INTEGER NOT NULL,
    created_at           INTEGER NOT NULL
);
CREATE INDEX ledger_by_batch ON ledger (batch_id);

-- What the provider says it billed per batch, when it says so (the simulator's bill).
CREATE TABLE provider_bills (
    provider_batch_id    TEXT PRIMARY KEY,
    requests             INTEGER NOT NULL,
    input_tokens         INTEGER NOT NULL,
    cached_input_tokens  INTEGER NOT NULL,
    cache_write_tokens   INTEGER NOT NULL,
    output_tokens        INTEGER NOT NULL,
    reasoning_tokens     INTEGER NOT NULL,
    cost_pico            INTEGER NOT NULL,
    source               TEXT NOT NULL,
    recorded_at          INTEGER NOT NULL
);

-- Things that should not happen but did: duplicate result lines, unknown custom_ids, ...
CREATE TABLE anomalies (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT,
    batch_id    TEXT,
    kind        TEXT NOT NULL,
    custom_id   TEXT,
    detail      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX anomalies_by_batch ON anomalies (batch_id);

-- Processes working on the store (`run`, `worker`), kept alive by their heartbeat.
CREATE TABLE workers (
    id            TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('run', 'worker', 'cancel')),
    pipelines     TEXT NOT NULL,
    started_at    INTEGER NOT NULL,
    heartbeat_at  INTEGER NOT NULL,
    stopped_at    INTEGER
);
CREATE INDEX workers_by_heartbeat ON workers (heartbeat_at);
CREATE INDEX batches_by_lease ON batches (lease_owner) WHERE state <> 'ingested';
