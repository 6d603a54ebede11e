-- Items that failed for good, by pipeline and stage: each run looks for those a raised
-- `max_attempts` revives, and without this index that look-up reads every item of the stage.
CREATE INDEX items_exhausted ON items (pipeline, stage) WHERE state = 'exhausted';
