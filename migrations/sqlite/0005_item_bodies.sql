-- An item's prompt and answer move out of its row: the items row is read by every count and
-- rewritten at every step of the item (planned, sent, answered), and with ~1.5 KB of prompt
-- and answer inline each of those touched fifteen times the bytes the step needs. The prompt
-- is written once at ingest and read to build a batch file; the answer is written when an
-- attempt succeeds and read for the results file.
CREATE TABLE item_bodies (
    item_id    INTEGER PRIMARY KEY REFERENCES items (id),
    user_json  TEXT NOT NULL
);
CREATE TABLE item_results (
    item_id  INTEGER PRIMARY KEY REFERENCES items (id),
    result   TEXT NOT NULL
);
INSERT INTO item_bodies (item_id, user_json) SELECT id, user_json FROM items;
INSERT INTO item_results (item_id, result) SELECT id, result FROM items WHERE result IS NOT NULL;
ALTER TABLE items DROP COLUMN user_json;
ALTER TABLE items DROP COLUMN result;
