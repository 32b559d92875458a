-- The gateway's feed: every bell item of a user, numbered per user so a tab
-- that reconnects can ask for exactly what it missed. The account id leads
-- every key.
create schema if not exists gateway;

-- The last feed id handed out per user (row-locked while an item is added,
-- so ids commit in the order they are numbered).
create table gateway.feed_seq (
    account_id text   not null,
    user_id    text   not null,
    last_id    bigint not null,
    primary key (account_id, user_id)
);

create table gateway.feed (
    account_id      text        not null,
    user_id         text        not null,
    id              bigint      not null,   -- increasing per user
    notification_id uuid        not null,
    topic           text        not null,
    title           text        not null,
    body            text        not null,
    url             text        not null,
    items           jsonb       not null default '[]',  -- objects behind a merged notification
    in_feed         boolean     not null,   -- false: pop-up/browser only, not kept behind the bell
    popup           boolean     not null,
    browser         boolean     not null,
    sound           text        not null,
    created_at      timestamptz not null default now(),
    seen_at         timestamptz,
    read_at         timestamptz,
    archived_at     timestamptz,
    primary key (account_id, user_id, id),
    -- A redelivered queue row (lease lost after the insert) never adds a second item.
    unique (account_id, user_id, notification_id)
);

-- Unread counts scan only unread feed rows.
create index feed_unread on gateway.feed (account_id, user_id) where in_feed and read_at is null and archived_at is null;
