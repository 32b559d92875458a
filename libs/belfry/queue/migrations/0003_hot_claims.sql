-- Claims become HOT updates. PostgreSQL writes an update as a heap-only tuple
-- (the new row version on the same page, no index entry anywhere, the old
-- version pruned without a vacuum) only when no index refers to a column
-- whose value the update changes — index key, INCLUDE column or partial-index
-- predicate alike — and the page has room for the new version.
--
-- A claim changes state, attempts and the lease columns. Until now `state`
-- was in the predicates of four partial indexes and lease_expires_at in the
-- key of one, so every claim wrote a new version into every index.
--
-- From here, no index refers to a column a claim changes:
--
-- * deliveries_pending holds every delivery not yet finished (queued or
--   leased), keyed for the fair claim: the loose index scan over the accounts
--   of a channel, then each account's due rows oldest first; the TTL
--   (expires_at) is checked inside the index. A leased row keeps its entry:
--   the claim skips it by its state (it is at the head of its account's due
--   rows, and only as many rows are leased as the senders hold), rescue finds
--   expired leases among the channel's due rows.
-- * deliveries_dead is keyed on a stored generated column `dead`, whose value
--   a claim never changes (false before and after), instead of on `state`.
-- * deliveries_finished (finished_at, for retention) stays as it is.
--
-- A settle that finishes a delivery sets finished_at, so it leaves the
-- pending index and cannot be HOT; a claim, and a rescue that queues a lost
-- lease again, are. fillfactor 50 leaves each page half free when rows are
-- inserted, room for the claim's new versions of the rows the page holds
-- (one claim usually takes them all); once a claim commits, the versions it
-- replaced are pruned and the settle's versions find room on the page too.
--
-- Existing installations are migrated in place: adding the stored column
-- rewrites the table once (with the new fillfactor) under an exclusive lock,
-- then the new indexes are built and the old ones dropped. Rows keep their
-- state, lease and token, so deliveries in flight are claimed, settled and
-- rescued by the new code as before (see docs/deploy.md, Upgrades).
alter table queue.deliveries
    add column dead boolean generated always as (state = 'dead') stored,
    set (fillfactor = 50);

create index deliveries_pending on queue.deliveries (channel, account_id, available_at, expires_at)
    where finished_at is null;
create index deliveries_dead_letters on queue.deliveries (account_id, channel, delivery_id)
    where dead;

drop index queue.deliveries_claimable;
drop index queue.deliveries_fair;
drop index queue.deliveries_leased;
drop index queue.deliveries_dead;
