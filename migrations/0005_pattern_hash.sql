-- Every region carries a 128-bit hash of its activation pattern (two little-endian int64
-- lanes, see geomstore/engine/patterns.py). Patterns of large models are stored as the
-- hash alone (pattern is NULL) and recomputed on demand; regions stored before this
-- migration have a NULL hash.
ALTER TABLE regions ADD COLUMN pattern_hash BLOB;
