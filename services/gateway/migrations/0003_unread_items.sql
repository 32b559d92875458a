-- The user's unread bell items, as the mobile service reads them for the
-- badge of its pushes (the gateway's contract, as gateway.read_state is):
-- the count the bell shows is the count the app icon shows.
create view gateway.unread_items as
select account_id, user_id, notification_id from gateway.feed
where in_feed and read_at is null and archived_at is null;
