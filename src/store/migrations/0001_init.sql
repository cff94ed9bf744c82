-- Triggers schema, version 1. Every primary key and index carries
-- organization_id, so the schema distributes unchanged on Citus
-- (distribution column organization_id).

CREATE TABLE organizations (
    organization_id uuid        NOT NULL,
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    tier            text        NOT NULL CHECK (tier IN ('free', 'pro', 'business', 'enterprise')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id)
);

-- Only the Argon2id PHC string of the secret is stored.
CREATE TABLE api_keys (
    organization_id uuid        NOT NULL REFERENCES organizations (organization_id),
    key_id          text        NOT NULL,
    secret_hash     text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- set by rotation: the key keeps working until then (grace period)
    expires_at      timestamptz,
    revoked_at      timestamptz,
    PRIMARY KEY (organization_id, key_id)
);
CREATE INDEX api_keys_by_key_id ON api_keys (key_id, organization_id);

CREATE TABLE webhooks (
    organization_id            uuid        NOT NULL REFERENCES organizations (organization_id),
    url                        text        NOT NULL,
    event_types                text[]      NOT NULL DEFAULT '{}',
    enabled                    boolean     NOT NULL DEFAULT true,
    secret                     text        NOT NULL,
    previous_secret            text,
    previous_secret_expires_at timestamptz,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id)
);

-- No foreign key to organizations: ingest writes whole batches by COPY and the
-- organization is already authenticated by then.
CREATE TABLE events (
    organization_id uuid        NOT NULL,
    id              uuid        NOT NULL,
    type            text        NOT NULL,
    source          text,
    payload         jsonb       NOT NULL,
    metadata        jsonb,
    dedup_id        text,
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed', 'dead_letter')),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    delivered_at    timestamptz,
    PRIMARY KEY (organization_id, id)
);
-- The inbox: oldest first within a status.
CREATE INDEX events_by_status ON events (organization_id, status, id);
-- Retries due, for the delivery core.
CREATE INDEX events_retry_due ON events (next_attempt_at, organization_id)
    WHERE status = 'failed';

-- dedup_id → first event id, for the 24 h duplicate window.
CREATE TABLE event_dedup (
    organization_id uuid        NOT NULL,
    dedup_id        text        NOT NULL,
    event_id        uuid        NOT NULL,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (organization_id, dedup_id)
);

CREATE TABLE delivery_attempts (
    organization_id uuid        NOT NULL,
    event_id        uuid        NOT NULL,
    attempt         integer     NOT NULL,
    attempted_at    timestamptz NOT NULL,
    status_code     integer,
    latency_ms      integer,
    error           text,
    PRIMARY KEY (organization_id, event_id, attempt)
);

-- Idempotency-Key records: the request's digest and the stored 2xx response.
CREATE TABLE idempotency_keys (
    organization_id uuid        NOT NULL,
    idempotency_key text        NOT NULL,
    request_digest  bytea       NOT NULL,
    status_code     integer,
    response_body   bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (organization_id, idempotency_key)
);
