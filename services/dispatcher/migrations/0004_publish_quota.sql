-- Per-account publish quotas shared by every dispatcher replica: one token
-- bucket row per account (refilled at BELFRY_DISPATCHER_ACCOUNT_RATE up to
-- _BURST), spent by each publish call in one statement. last_grant is what
-- that statement granted, so the caller reads it back from the new row.
create table dispatcher.publish_quota (
    account_id text primary key,
    tokens     float8      not null,
    stamp      timestamptz not null,
    last_grant integer     not null default 0
) with (fillfactor = 70);  -- room on the page: every spend is a HOT update
