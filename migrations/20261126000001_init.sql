-- Keys: found by key_hash (SHA-256 hex), recoverable from key_sealed (AES-256-GCM, key id as AAD).
-- Money is integer nano-USD. `version` increases on every admin write; the Redis copy of a key
-- carries the version it was built from, and `pushed_version` records what Redis has acknowledged,
-- so a write that reached Postgres but not Redis (a crash in between) is found and re-pushed.
CREATE TABLE api_keys (
    id                    UUID PRIMARY KEY,
    user_id               TEXT NOT NULL,
    name                  TEXT NOT NULL,
    key_hash              TEXT NOT NULL,
    key_sealed            BYTEA NOT NULL,
    key_display           TEXT NOT NULL,
    allowed_providers     TEXT[],
    allowed_api_formats   TEXT[],
    allowed_models        TEXT[],
    rate_limit            INTEGER CHECK (rate_limit >= 1),
    concurrent_limit      INTEGER CHECK (concurrent_limit >= 1),
    expires_at            TIMESTAMPTZ,
    is_standalone         BOOLEAN NOT NULL DEFAULT FALSE,
    current_balance_nanos BIGINT,
    balance_used_nanos    BIGINT NOT NULL DEFAULT 0,
    auto_delete_on_expiry BOOLEAN,
    is_active             BOOLEAN NOT NULL DEFAULT TRUE,
    version               BIGINT NOT NULL DEFAULT 1,
    pushed_version        BIGINT NOT NULL DEFAULT 0,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at          TIMESTAMPTZ
);
CREATE UNIQUE INDEX api_keys_key_hash ON api_keys (key_hash);
CREATE INDEX api_keys_user ON api_keys (user_id, created_at DESC) WHERE NOT is_standalone;
CREATE INDEX api_keys_standalone ON api_keys (created_at DESC) WHERE is_standalone;
CREATE INDEX api_keys_expiring ON api_keys (expires_at) WHERE is_active AND expires_at IS NOT NULL;
CREATE INDEX api_keys_unpushed ON api_keys (id) WHERE pushed_version < version;

-- Every balance adjustment, for audit. Rows are never updated or deleted.
CREATE TABLE balance_ledger (
    id                  BIGSERIAL PRIMARY KEY,
    key_id              UUID NOT NULL,
    amount_nanos        BIGINT NOT NULL,
    balance_after_nanos BIGINT NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX balance_ledger_key ON balance_ledger (key_id, id);

-- One row per settlement. event_id is the lease id: inserting the same event twice is a no-op,
-- which is what makes the stream-to-Postgres pipeline exactly-once. No foreign key on purpose:
-- usage outlives a physically deleted key, and an event may arrive after its key is gone.
CREATE TABLE usage_events (
    event_id         TEXT PRIMARY KEY,
    key_id           UUID,
    user_id          TEXT NOT NULL,
    provider         TEXT NOT NULL,
    api_format       TEXT NOT NULL,
    model            TEXT NOT NULL,
    input_tokens     BIGINT NOT NULL,
    output_tokens    BIGINT NOT NULL,
    total_tokens     BIGINT NOT NULL,
    cost_nanos       BIGINT NOT NULL,
    response_time_ms BIGINT,
    status_code      INTEGER,
    lease_expired    BOOLEAN NOT NULL,
    admitted_at      TIMESTAMPTZ NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX usage_events_key_time ON usage_events (key_id, created_at);

-- Per key and UTC day, maintained in the same statement that inserts the events, so stats over
-- any number of rows read a few rows per day.
CREATE TABLE usage_daily (
    key_id              UUID NOT NULL,
    day                 DATE NOT NULL,
    requests            BIGINT NOT NULL,
    tokens              BIGINT NOT NULL,
    cost_nanos          BIGINT NOT NULL,
    response_time_sum   BIGINT NOT NULL,
    response_time_count BIGINT NOT NULL,
    PRIMARY KEY (key_id, day)
);
