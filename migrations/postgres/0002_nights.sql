-- Nights after the first (see migrations/sqlite/0002_nights.sql for the why):
-- provider batch ids unique per provider; a `budget` run status; per-run accounting columns.

ALTER TABLE runs DROP CONSTRAINT IF EXISTS runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check
    CHECK (status IN ('running', 'completed', 'failed', 'budget', 'interrupted', 'detached', 'error'));
ALTER TABLE runs ADD COLUMN records_valid BIGINT;
ALTER TABLE runs ADD COLUMN figures_json TEXT;

ALTER TABLE batches DROP CONSTRAINT IF EXISTS batches_provider_batch_id_key;
ALTER TABLE batches ADD CONSTRAINT batches_provider_batch_id_key UNIQUE (provider, provider_batch_id);
ALTER TABLE batches ADD COLUMN creating_at BIGINT;
ALTER TABLE batches ADD COLUMN ingested_by_run TEXT;
UPDATE batches SET creating_at = created_at WHERE state = 'creating';
CREATE INDEX batches_by_collector ON batches (ingested_by_run) WHERE ingested_by_run IS NOT NULL;
