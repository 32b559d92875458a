-- The trace id of the call that published a delivery's event (W3C Trace
-- Context: 16 bytes, held in a uuid, the cheapest nullable 16-byte type), so a
-- sender's log line of the delivery's outcome names the trace an operator
-- follows. Nullable without a default: adding it rewrites nothing (a
-- catalogue change only), rows written before it and rows no call produced
-- (digests, notices) keep null, and no index refers to it, so claims stay HOT.
alter table queue.deliveries add column trace_id uuid;
