-- A balance adjustment may carry the caller's Idempotency-Key: a retry of a call whose answer
-- was lost (a timeout, a crash after the commit) then finds its first application instead of
-- applying the amount twice.
ALTER TABLE balance_ledger ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX balance_ledger_idempotency ON balance_ledger (key_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
