-- The one read state of a notification for a user (shared by every channel:
-- the bell, the email's open link, a push that was opened), as the
-- dispatcher's status API reads it: the gateway's contract, as batching's
-- views are. Only items kept behind the bell carry a read state.
create view gateway.read_state as
select account_id, user_id, notification_id, read_at from gateway.feed where in_feed;

-- A producer follows its account's status changes as they happen
-- (DispatcherService.WatchStatus): what was read since a time. Marking read
-- writes one entry here; delivering to the feed writes none (unread rows
-- are not in it).
create index feed_read_by_time on gateway.feed (account_id, read_at) where read_at is not null and in_feed;
