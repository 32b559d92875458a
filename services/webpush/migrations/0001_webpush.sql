create schema webpush;

-- One row per browser push subscription. A browser's endpoint is unique
-- within an account: when another user signs in on the same browser and
-- subscribes, the row moves to that user.
create table webpush.subscriptions (
    account_id text not null,
    user_id text not null,
    subscription_id uuid not null,
    endpoint text not null,
    p256dh text not null,
    auth text not null,
    label text not null default '',
    created_at timestamptz not null default now(),
    last_success_at timestamptz,
    primary key (account_id, user_id, subscription_id),
    unique (account_id, endpoint)
);
