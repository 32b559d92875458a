-- The oldest due delivery of a channel, and how many are due, in one index
-- probe per channel: the dispatcher's backpressure (every second) and the
-- queue gauges ask this. Migration 0003 dropped deliveries_claimable, which
-- answered it, and left those queries reading every row of the table: 2.3 s
-- per backpressure refresh with a million rows kept for retention (measured
-- under bench/e2e_sustained.py with pg_stat_statements).
--
-- A claim changes neither available_at nor finished_at, so claims stay HOT
-- updates (see 0003). The statements that use it say `finished_at is null`.
create index deliveries_due on queue.deliveries (channel, available_at)
    where finished_at is null;
