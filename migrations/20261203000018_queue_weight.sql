-- A tenant's share of each queue relative to others (NULL: 1); see shared/queue/src/fair.rs.
ALTER TABLE tenants ADD COLUMN queue_weight integer CHECK (queue_weight BETWEEN 1 AND 1000);
