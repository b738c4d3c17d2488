-- no-transaction
-- Webhook deliveries are claimed a few per tenant at a time (a tenant whose receiver is down
-- must not hold back every other tenant's deliveries): each tenant's due ones in order.
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_deliveries_tenant_due
    ON webhook_deliveries (tenant_id, next_attempt_at) WHERE state = 'pending';
