create schema mobile;

-- A device token belongs to one app install; within an account it is
-- unique, so when another user signs in on the same phone the row moves.
create table mobile.devices (
    account_id text not null,
    user_id text not null,
    device_id uuid not null,
    platform text not null check (platform in ('android', 'ios')),
    token text not null,
    app_id text not null,
    label text not null default '',
    created_at timestamptz not null default now(),
    primary key (account_id, user_id, device_id),
    unique (account_id, platform, token)
);
