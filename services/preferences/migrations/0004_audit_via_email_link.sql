-- The one-click unsubscribe link is audited as what it is, 'email-link'. Rows
-- written as 'api' came from the same RPC (Unsubscribe, the link's only
-- caller), so they are renamed and 'api' is no longer a way in.
alter table preferences.audit_log drop constraint audit_log_via_check;
update preferences.audit_log set via = 'email-link' where via = 'api';
alter table preferences.audit_log
    add constraint audit_log_via_check check (via in ('user', 'admin_default', 'role_profile', 'email-link'));
