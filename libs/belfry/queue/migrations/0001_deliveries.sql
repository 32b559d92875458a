-- The durable delivery queue shared by every sender (owned by belfry.queue).
-- One row per (notification, user, channel). The account leads the key so
-- claims can be spread fairly across accounts and tenants stay apart.
create schema if not exists queue;

create table queue.deliveries (
    account_id      text        not null,
    delivery_id     bigint generated always as identity,
    notification_id uuid        not null,
    user_id         text        not null,
    channel         text        not null,   -- email | bell | browser | mobile | other_apps | batching
    topic           text        not null,
    state           text        not null default 'queued'
                    check (state in ('queued', 'leased', 'sent', 'failed', 'dead', 'expired', 'dropped')),
    available_at    timestamptz not null default now(),
    expires_at      timestamptz not null,
    attempts        integer     not null default 0,
    max_attempts    integer     not null default 8,
    lease_token     bigint,                 -- fencing token: bumps on every claim
    lease_expires_at timestamptz,
    leased_by       text,
    payload         jsonb       not null,
    errors          jsonb       not null default '[]'::jsonb,
    created_at      timestamptz not null default now(),
    finished_at     timestamptz,
    primary key (account_id, delivery_id),
    unique (account_id, notification_id, user_id, channel)
);

-- Hot path: what is claimable per channel. Finished rows fall out of it.
create index deliveries_claimable on queue.deliveries (channel, available_at)
    where state = 'queued';
create index deliveries_leased on queue.deliveries (channel, lease_expires_at)
    where state = 'leased';
create index deliveries_finished on queue.deliveries (finished_at)
    where finished_at is not null;
create index deliveries_dead on queue.deliveries (account_id, channel, delivery_id)
    where state = 'dead';

create sequence queue.lease_tokens;

-- Live app tabs, written by the websocket gateway, read by the web-push sender
-- (the browser channel goes by web push only when the user has no live tab).
create table queue.presence (
    account_id  text        not null,
    user_id     text        not null,
    connection  text        not null,
    replica     text        not null,
    expires_at  timestamptz not null,
    primary key (account_id, user_id, connection)
);
create index presence_expiry on queue.presence (expires_at);
