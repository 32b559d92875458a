-- The VAPID public key (base64url) each subscription is bound to: push services
-- accept a push only when it is signed with the key the browser subscribed with,
-- so while keys rotate every subscription is signed with its own. '' marks rows
-- from before this column; the service stamps them with its key at its first
-- start without other keys (that is, before any rotation).
alter table webpush.subscriptions add column vapid_key text not null default '';
