-- What `nightshift gc` (and a run, after ingesting a batch) deleted of a batch's leftovers:
-- its files at the provider (input, output, error), its provider batch where the provider
-- keeps one (Anthropic), the objects of its output folder (Bedrock). One row per thing
-- deleted, so a gc stopped half-way (or failing on some) goes on where it was and never
-- deletes twice; `batches.cleaned_at` is set once nothing of the batch is left to delete.
CREATE TABLE batch_cleanup (
    batch_id    TEXT NOT NULL REFERENCES batches (id),
    -- input | output | error | batch | object
    kind        TEXT NOT NULL,
    -- the provider's id, or an s3:// URI
    target      TEXT NOT NULL,
    deleted_at  BIGINT NOT NULL,
    PRIMARY KEY (batch_id, kind, target)
);
ALTER TABLE batches ADD COLUMN cleaned_at BIGINT;
CREATE INDEX batches_to_clean ON batches (pipeline, ingested_at) WHERE state = 'ingested' AND cleaned_at IS NULL;
