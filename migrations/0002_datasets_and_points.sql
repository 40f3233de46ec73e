-- Data sets of points projected onto slices (train / test / random point sets).
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id VARCHAR, name VARCHAR, slice_id VARCHAR, n_points BIGINT, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS points (
    dataset_id VARCHAR, point_id BIGINT, u0 DOUBLE, u1 DOUBLE, geometry GEOMETRY,
    distance DOUBLE, label BIGINT, split VARCHAR
);
