-- Stages (see migrations/sqlite/0003_stages.sql for the why): the record's fields for the
-- stages after the first, record → items and item → parent items links, regenerations.

ALTER TABLE records ADD COLUMN data TEXT;

CREATE TABLE record_items (
    run_id   TEXT NOT NULL REFERENCES runs (id),
    line     BIGINT NOT NULL,
    stage    TEXT NOT NULL,
    chunk    BIGINT NOT NULL,
    item_id  BIGINT REFERENCES items (id),
    error    TEXT,
    PRIMARY KEY (run_id, line, stage, chunk)
);
CREATE INDEX record_items_by_item ON record_items (item_id);

CREATE TABLE item_parents (
    item_id    BIGINT NOT NULL REFERENCES items (id),
    parent_id  BIGINT NOT NULL REFERENCES items (id),
    PRIMARY KEY (item_id, parent_id)
);

ALTER TABLE items ADD COLUMN regenerations BIGINT NOT NULL DEFAULT 0;
