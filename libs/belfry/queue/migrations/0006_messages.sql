-- The rendered message is stored once per notification and recipient, not
-- once per channel. Every channel's delivery of one notification to one user
-- carries the same message (belfry.delivery builds them from it) plus a few
-- fields of its own (the bell's flags, its sound); the message — about 1 KiB
-- of JSON — was written into each delivery row, then again by every settle
-- that finishes the delivery (a settle is not a HOT update, so PostgreSQL
-- writes the whole new row version to the WAL), and it spread the table over
-- more pages, each of which costs a full-page image after every checkpoint.
--
-- From here, queue.messages holds the message once, keyed as the deliveries
-- are (account first); a delivery's payload keeps only its own fields, and a
-- claim gives a sender the two merged, the delivery's fields winning. A
-- delivery with no message row (written before this migration, or enqueued
-- whole: batching handoffs, digests made by hand, notices) carries its whole
-- payload as before, so rows in flight are claimed unchanged.
--
-- Retention removes a message with the last delivery that refers to it.
create table queue.messages (
    account_id      text        not null,
    notification_id uuid        not null,
    user_id         text        not null,
    message         jsonb       not null,
    primary key (account_id, notification_id, user_id)
);
alter table queue.messages set (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);

-- Each delivery as a sender sees it (the message merged with the delivery's
-- own fields): for people and for SQL that reads what was sent (the bounce
-- receiver, the tests). The queue's own statements read the tables.
create view queue.whole_deliveries as
select d.account_id, d.delivery_id, d.notification_id, d.user_id, d.channel, d.topic, d.state,
       d.available_at, d.expires_at, d.attempts, d.max_attempts, d.lease_token, d.lease_expires_at,
       d.leased_by, coalesce(m.message, '{}'::jsonb) || d.payload as payload, d.errors, d.created_at,
       d.finished_at, d.dead, d.trace_id
from queue.deliveries d
left join queue.messages m
       on m.account_id = d.account_id and m.notification_id = d.notification_id and m.user_id = d.user_id;
