-- Fair claims: the claim walks the accounts that have due work with a loose
-- index scan (one index probe per account, however many rows each holds), then
-- takes a share from each, so one account's burst cannot starve another's.
create index deliveries_fair on queue.deliveries (channel, account_id, available_at)
    where state = 'queued';

-- Retention keeps the table small (finished rows are purged on a schedule);
-- vacuum it early so the dead tuples every claim and settle leave behind do
-- not pile up in the claim indexes.
alter table queue.deliveries set (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
