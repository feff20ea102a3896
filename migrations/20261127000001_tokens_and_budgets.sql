-- Token limits per rate window and spend budgets per UTC period (contract v1.1, section 2).
-- A period's spend is not stored here: it is the sum of `usage_daily` from the period's first
-- day, which the usage sync keeps in the same transaction as the events (and `balance_used_nanos`
-- for a budget that never resets).
ALTER TABLE api_keys ADD COLUMN token_limit BIGINT CHECK (token_limit >= 1);
ALTER TABLE api_keys ADD COLUMN budget_nanos BIGINT CHECK (budget_nanos >= 0);
ALTER TABLE api_keys ADD COLUMN budget_period TEXT CHECK (budget_period IN ('day', 'week', 'month'));
