-- Finished deliveries indexed by account, then by when they finished:
-- producers follow their account's delivery outcomes as they happen
-- (DispatcherService.WatchStatus reads one account's outcomes since a
-- point in time), and retention walks the accounts that have finished rows,
-- deleting each one's old rows (belfry.queue.ops.purge). It replaces the
-- index on finished_at alone, so a settle that finishes a delivery writes
-- the same number of index entries as before.
--
-- Built in place without blocking the queue (CONCURRENTLY is not allowed
-- inside the migration's transaction, so this locks writes for as long as
-- the build takes: about 1 s per million finished rows on the test machine).
create index deliveries_finished_by_account on queue.deliveries (account_id, finished_at)
    where finished_at is not null;
drop index queue.deliveries_finished;
