-- The one read state of a notification for a user (shared by every channel:
-- the bell, the email's open link, a push that was opened), as the
-- dispatcher's status API reads it: the gateway's contract, as batching's
-- views are. Only items kept behind the bell carry a read state.
create view gateway.read_state as
select account_id, user_id, notification_id, read_at from gateway.feed where in_feed;
