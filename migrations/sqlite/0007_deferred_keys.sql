-- Foreign keys checked at commit, and rebuilt tables to declare them so (SQLite cannot change
-- a constraint in place; the migration connection has foreign keys off, see 0002).
--
-- Why: inside a transaction, a statement that writes many rows and may fail half-way makes
-- SQLite copy every page it is about to change into a statement journal first, so that it
-- can undo just that statement. An immediate foreign key makes every multi-row insert such a
-- statement (and NOT NULL and CHECK do too, unless the statement says `OR FAIL`: the store's
-- bulk writes do). At ingest that journal was 45 % of all write calls. A deferred key is
-- counted during the statement and checked when the transaction commits: a violation still
-- fails the whole transaction and nothing of it is kept. PostgreSQL keeps its immediate keys:
-- it has no statement journal.
--
-- Same columns, in the same order, and the same indexes; only `DEFERRABLE INITIALLY
-- DEFERRED` is new. Child tables of `items` and `attempts` come with them: every table the
-- hot paths write many rows of at once.

CREATE TABLE items_new (
    id            INTEGER PRIMARY KEY,
    pipeline      TEXT NOT NULL,
    stage         TEXT NOT NULL,
    dedupe_key    BLOB NOT NULL,
    shape_id      INTEGER NOT NULL REFERENCES shapes (id) DEFERRABLE INITIALLY DEFERRED,
    body_bytes    INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'in_flight', 'succeeded', 'failed', 'exhausted')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    first_run_id  TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    regenerations INTEGER NOT NULL DEFAULT 0,
    UNIQUE (pipeline, stage, dedupe_key)
);
INSERT INTO items_new (id, pipeline, stage, dedupe_key, shape_id, body_bytes, input_tokens, state,
    attempts, last_error, first_run_id, created_at, updated_at, regenerations)
SELECT id, pipeline, stage, dedupe_key, shape_id, body_bytes, input_tokens, state,
    attempts, last_error, first_run_id, created_at, updated_at, regenerations
FROM items;
DROP TABLE items;
ALTER TABLE items_new RENAME TO items;
CREATE INDEX items_plannable ON items (pipeline, stage, id) WHERE state IN ('pending', 'failed');
CREATE INDEX items_exhausted ON items (pipeline, stage) WHERE state = 'exhausted';

CREATE TABLE item_bodies_new (
    item_id    INTEGER PRIMARY KEY REFERENCES items (id) DEFERRABLE INITIALLY DEFERRED,
    user_json  TEXT NOT NULL
);
INSERT INTO item_bodies_new (item_id, user_json) SELECT item_id, user_json FROM item_bodies;
DROP TABLE item_bodies;
ALTER TABLE item_bodies_new RENAME TO item_bodies;

CREATE TABLE item_results_new (
    item_id  INTEGER PRIMARY KEY REFERENCES items (id) DEFERRABLE INITIALLY DEFERRED,
    result   TEXT NOT NULL
);
INSERT INTO item_results_new (item_id, result) SELECT item_id, result FROM item_results;
DROP TABLE item_results;
ALTER TABLE item_results_new RENAME TO item_results;

CREATE TABLE records_new (
    run_id     TEXT NOT NULL REFERENCES runs (id) DEFERRABLE INITIALLY DEFERRED,
    line       INTEGER NOT NULL,
    record_id  TEXT NOT NULL,
    item_id    INTEGER NOT NULL REFERENCES items (id) DEFERRABLE INITIALLY DEFERRED,
    data       TEXT,
    PRIMARY KEY (run_id, line)
) WITHOUT ROWID;
INSERT INTO records_new (run_id, line, record_id, item_id, data)
SELECT run_id, line, record_id, item_id, data FROM records;
DROP TABLE records;
ALTER TABLE records_new RENAME TO records;

CREATE TABLE record_items_new (
    run_id   TEXT NOT NULL REFERENCES runs (id) DEFERRABLE INITIALLY DEFERRED,
    line     INTEGER NOT NULL,
    stage    TEXT NOT NULL,
    chunk    INTEGER NOT NULL,
    item_id  INTEGER REFERENCES items (id) DEFERRABLE INITIALLY DEFERRED,
    -- why the record has no item at this stage, when that is a failure (its template
    -- failed for the record, its text was empty); NULL with no item: skipped
    error    TEXT,
    PRIMARY KEY (run_id, line, stage, chunk)
) WITHOUT ROWID;
INSERT INTO record_items_new (run_id, line, stage, chunk, item_id, error)
SELECT run_id, line, stage, chunk, item_id, error FROM record_items;
DROP TABLE record_items;
ALTER TABLE record_items_new RENAME TO record_items;
CREATE INDEX record_items_by_item ON record_items (item_id);

CREATE TABLE item_parents_new (
    item_id    INTEGER NOT NULL REFERENCES items (id) DEFERRABLE INITIALLY DEFERRED,
    parent_id  INTEGER NOT NULL REFERENCES items (id) DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (item_id, parent_id)
) WITHOUT ROWID;
INSERT INTO item_parents_new (item_id, parent_id) SELECT item_id, parent_id FROM item_parents;
DROP TABLE item_parents;
ALTER TABLE item_parents_new RENAME TO item_parents;

CREATE TABLE attempts_new (
    id             INTEGER PRIMARY KEY,
    item_id        INTEGER NOT NULL REFERENCES items (id) DEFERRABLE INITIALLY DEFERRED,
    batch_id       TEXT NOT NULL REFERENCES batches (id) DEFERRABLE INITIALLY DEFERRED,
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
INSERT INTO attempts_new (id, item_id, batch_id, attempt_no, custom_id, state, verdict, error,
    finish_reason, model, created_at, dispatched_at, completed_at)
SELECT id, item_id, batch_id, attempt_no, custom_id, state, verdict, error,
    finish_reason, model, created_at, dispatched_at, completed_at
FROM attempts;
DROP TABLE attempts;
ALTER TABLE attempts_new RENAME TO attempts;
CREATE INDEX attempts_by_batch ON attempts (batch_id);

CREATE TABLE ledger_new (
    attempt_id           INTEGER PRIMARY KEY REFERENCES attempts (id) DEFERRABLE INITIALLY DEFERRED,
    custom_id            TEXT NOT NULL,
    batch_id             TEXT NOT NULL REFERENCES batches (id) DEFERRABLE INITIALLY DEFERRED,
    run_id               TEXT NOT NULL REFERENCES runs (id) DEFERRABLE INITIALLY DEFERRED,
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
INSERT INTO ledger_new (attempt_id, custom_id, batch_id, run_id, pipeline, stage, model,
    pricing_mode, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
    reasoning_tokens, cost_pico, standard_cost_pico, created_at)
SELECT attempt_id, custom_id, batch_id, run_id, pipeline, stage, model,
    pricing_mode, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
    reasoning_tokens, cost_pico, standard_cost_pico, created_at
FROM ledger;
DROP TABLE ledger;
ALTER TABLE ledger_new RENAME TO ledger;
CREATE INDEX ledger_by_batch ON ledger (batch_id);

CREATE TABLE quarantine_new (
    id      INTEGER PRIMARY KEY,
    run_id  TEXT NOT NULL REFERENCES runs (id) DEFERRABLE INITIALLY DEFERRED,
    source  TEXT NOT NULL,
    line    INTEGER NOT NULL,
    field   TEXT,
    reason  TEXT NOT NULL
);
INSERT INTO quarantine_new (id, run_id, source, line, field, reason)
SELECT id, run_id, source, line, field, reason FROM quarantine;
DROP TABLE quarantine;
ALTER TABLE quarantine_new RENAME TO quarantine;
CREATE INDEX quarantine_by_run ON quarantine (run_id, line);
