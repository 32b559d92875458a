-- A per-account change counter, bumped in the transaction of every write that
-- can change an effective answer (directory, user preferences, defaults,
-- profiles). Replicas cache EffectiveBatch inputs per account and compare this
-- one row on every read, so no answer is ever staler than the last write that
-- returned — on any replica — and no timer is trusted.
alter table preferences.accounts add column change_seq bigint not null default 0;
