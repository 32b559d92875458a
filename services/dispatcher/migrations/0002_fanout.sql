-- Accept lean, fan out behind: a producer's call writes the event (on its
-- notification row, with its idempotency key) and one row in the fan-out
-- backlog, nothing else. Fan-out workers claim backlog rows, expand the
-- recipients, ask preferences, render, and write the recipient records and
-- the deliveries; the backlog row goes in the same transaction, so a crash
-- anywhere leaves it to be fanned out again, exactly once.
--
-- Existing installations: every notification written before this migration
-- was fanned out when it was accepted, so the backlog starts empty and the
-- new column stays null on old rows.
alter table dispatcher.notifications add column event jsonb;

create table dispatcher.fanout (
    account_id      text        not null,
    notification_id uuid        not null,
    accepted_at     timestamptz not null default now(),
    -- not before this time (a retry after preferences was unreachable; 'infinity' = failed for good)
    not_before      timestamptz not null default now(),
    -- recipients already fanned out, in user id order (a large audience goes in chunks)
    position        integer     not null default 0,
    attempts        integer     not null default 0,
    error           text,
    primary key (account_id, notification_id)
);
-- Fair claims walk the accounts with due work (one probe per account), oldest first within each.
create index fanout_due on dispatcher.fanout (account_id, not_before);
create index fanout_age on dispatcher.fanout (accepted_at) where not_before < 'infinity';
-- Rows come and go quickly: vacuum the backlog early so it stays a few pages.
alter table dispatcher.fanout set (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
