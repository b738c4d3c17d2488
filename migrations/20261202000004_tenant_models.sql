-- Which model aliases a tenant may use (NULL: every configured model). Entries are aliases,
-- `provider/model` names, or prefixes ending in `*` (e.g. `mock-*`, `openai/*`).
ALTER TABLE tenants ADD COLUMN allowed_models text[];
