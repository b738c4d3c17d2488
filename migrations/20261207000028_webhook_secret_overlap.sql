-- Rotating a tenant's webhook secret keeps the old one for 24 h: deliveries carry a signature
-- with each (`v1=<new>,v1=<old>`), so receivers can switch to the new secret within a day
-- instead of the moment the operator rotates.
ALTER TABLE tenants ADD COLUMN webhook_secret_previous text,
    ADD COLUMN webhook_secret_previous_until timestamptz;
