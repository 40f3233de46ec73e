-- Decision-boundary segments carry their unit normal (towards class_b), for sampling
-- points pushed off the boundary.
ALTER TABLE boundary ADD COLUMN normal_u0 DOUBLE;
ALTER TABLE boundary ADD COLUMN normal_u1 DOUBLE;
