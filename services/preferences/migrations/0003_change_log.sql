-- Which user each change of the account's counter was about ('' = the whole
-- account: tier, defaults, profiles). A replica whose cache is a few changes
-- behind forgets only those users instead of reloading everyone; the log
-- keeps the account's last 1,000 changes (older caches reload in full).
create table preferences.changes (
    account_id text not null,
    seq bigint not null,
    user_id text not null,
    primary key (account_id, seq)
);
