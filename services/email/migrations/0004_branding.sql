-- Per-account branding (issue "Deliverability", 4): the sending identity
-- (From name and address, Reply-To) and the look (logo URL, accent colour,
-- footer) of every email of the account. One row per account, set by its
-- super admins through Deliverability.SetBranding; an empty column means
-- Belfry's default, and an account without a row gets the defaults.
-- Values are checked by the servicer before they are stored (and the
-- colour and logo again when a message is composed).
create table email.branding (
    account_id   text        primary key,
    from_name    text        not null default '',
    from_address text        not null default '',
    reply_to     text        not null default '',
    logo_url     text        not null default '',
    accent_color text        not null default '',
    footer       text        not null default '',
    updated_by   text        not null,              -- the super admin's user id
    updated_at   timestamptz not null default now()
);
