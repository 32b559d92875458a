-- Suppression expiry (issue "Deliverability", section 2): soft-bounce entries
-- lapse BELFRY_EMAIL_SOFT_SUPPRESSION_SECONDS after they were last seen, and
-- an hourly job deletes the lapsed ones. This index keeps that delete to the
-- soft-bounce entries (hard bounces and complaints never lapse and are never read by it).
create index suppressions_soft_last_seen on email.suppressions (last_seen) where reason = 'soft bounces';
