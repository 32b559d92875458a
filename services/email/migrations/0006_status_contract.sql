-- What the email service tells the dispatcher's status API (its contract,
-- as batching's views are): per email delivery, each bounce and complaint
-- learnt after the relay accepted it, oldest first by ``at``. Read only by
-- the status API; the table behind it stays the email service's own.
create view email.delivery_feedback as
select account_id, delivery_id, feedback_id, kind, status, detail, at from email.feedback;

-- A producer follows its account's status changes as they happen
-- (DispatcherService.WatchStatus): the bounces and complaints since a time.
create index feedback_by_time on email.feedback (account_id, at);
