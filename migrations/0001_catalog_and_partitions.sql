-- The catalog (models, checkpoints, slices) and the partitions with their geometry.
-- DuckLake has no primary keys: ids are content hashes computed by geomstore.
CREATE TABLE IF NOT EXISTS models (
    model_id VARCHAR, name VARCHAR, summary VARCHAR, input_shape VARCHAR,
    n_outputs INTEGER, n_units BIGINT, units_per_layer VARCHAR, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS checkpoints (
    checkpoint_id VARCHAR, model_id VARCHAR, name VARCHAR, step BIGINT, source VARCHAR,
    sha256 VARCHAR, metrics VARCHAR, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS slices (
    slice_id VARCHAR, name VARCHAR, dim INTEGER, input_shape VARCHAR, origin DOUBLE[],
    basis DOUBLE[], domain GEOMETRY, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS partitions (
    partition_id VARCHAR, checkpoint_id VARCHAR, slice_id VARCHAR, engine_version VARCHAR,
    settings VARCHAR, n_regions BIGINT, n_edges BIGINT, n_boundary BIGINT, device VARCHAR,
    seconds DOUBLE, verified BOOLEAN, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS regions (
    partition_id VARCHAR, region_id BIGINT, geometry GEOMETRY, area DOUBLE,
    centroid_u0 DOUBLE, centroid_u1 DOUBLE, n_vertices INTEGER, pattern BLOB,
    A DOUBLE[], c DOUBLE[], label INTEGER, slope_norm DOUBLE
);
CREATE TABLE IF NOT EXISTS edges (
    partition_id VARCHAR, edge_id BIGINT, geometry GEOMETRY, u0_a DOUBLE, u1_a DOUBLE,
    u0_b DOUBLE, u1_b DOUBLE, length DOUBLE, region_left BIGINT, region_right BIGINT,
    layer BIGINT, neuron BIGINT, unit BIGINT, border_side BIGINT
);
CREATE TABLE IF NOT EXISTS boundary (
    partition_id VARCHAR, geometry GEOMETRY, u0_a DOUBLE, u1_a DOUBLE, u0_b DOUBLE,
    u1_b DOUBLE, length DOUBLE, region_id BIGINT, class_a BIGINT, class_b BIGINT, level DOUBLE
);
