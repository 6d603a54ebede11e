-- Stages: a record may cause many items (a chunk stage, the stages after the first).
-- * `records.data`: the record's fields (JSON), kept for a multi-stage pipeline only: the
--   stages after the first render from them and from earlier results, whenever those succeed;
-- * `record_items`: record → every item it caused, by stage and chunk (a multi-stage pipeline
--   only; a one-stage one keeps its single link in `records.item_id`). `item_id` NULL: the
--   stage does not run for the record (not in its sample, `when` false) or, with `error`,
--   cannot (its template failed for it);
-- * `item_parents`: item → the items whose results it was rendered from;
-- * `items.regenerations`: how many times a failed review sent the item again.

ALTER TABLE records ADD COLUMN data TEXT;

CREATE TABLE record_items (
    run_id   TEXT NOT NULL REFERENCES runs (id),
    line     INTEGER NOT NULL,
    stage    TEXT NOT NULL,
    chunk    INTEGER NOT NULL,
    item_id  INTEGER REFERENCES items (id),
    -- why the record has no item at this stage, when that is a failure (its template
    -- failed for the record, its text was empty); NULL with no item: skipped
    error    TEXT,
    PRIMARY KEY (run_id, line, stage, chunk)
) WITHOUT ROWID;
CREATE INDEX record_items_by_item ON record_items (item_id);

CREATE TABLE item_parents (
    item_id    INTEGER NOT NULL REFERENCES items (id),
    parent_id  INTEGER NOT NULL REFERENCES items (id),
    PRIMARY KEY (item_id, parent_id)
) WITHOUT ROWID;

ALTER TABLE items ADD COLUMN regenerations INTEGER NOT NULL DEFAULT 0;
