create schema webhooks;

-- A user's connected endpoints. The signing secret is stored encrypted
-- (AES-256-GCM under the service's key, bound to the row by its ids).
create table webhooks.endpoints (
    account_id text not null,
    user_id text not null,
    webhook_id uuid not null,
    url text not null,
    label text not null default '',
    slack boolean not null,
    secret_ciphertext bytea not null,
    disabled_at timestamptz,
    disabled_reason text not null default '',
    created_at timestamptz not null default now(),
    primary key (account_id, user_id, webhook_id),
    unique (account_id, user_id, url)
);
