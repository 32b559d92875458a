-- Each user's unread count kept beside their feed's last id, so a push to a
-- tab, a ready frame and a phone's badge read one row instead of counting
-- the user's unread items every time (a user with thousands unread made
-- every fan-out read scan them all).
--
-- Statement-level triggers keep it: whatever writes gateway.feed (this
-- release, an older replica still running during a rolling upgrade, an
-- operator's erasure) moves the count with it, one update per user and
-- statement, in the writer's own transaction.
alter table gateway.feed_seq add column unread bigint not null default 0;

-- Unread = kept behind the bell, neither read nor archived (the rule of
-- gateway.unread_items).
create function gateway.feed_unread_delta() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        -- Every feed id comes from feed_seq, so the row exists; the upsert only guards a hand-made row.
        insert into gateway.feed_seq as s (account_id, user_id, last_id, unread)
        select account_id, user_id, max(id), count(*) from new_rows
        where in_feed and read_at is null and archived_at is null
        group by account_id, user_id order by account_id, user_id
        on conflict (account_id, user_id) do update set unread = s.unread + excluded.unread;
    elsif tg_op = 'UPDATE' then
        update gateway.feed_seq s set unread = s.unread + d.delta
        from (select n.account_id, n.user_id,
                     sum((n.in_feed and n.read_at is null and n.archived_at is null)::int
                         - (o.in_feed and o.read_at is null and o.archived_at is null)::int) as delta
              from new_rows n join old_rows o using (account_id, user_id, id)
              group by n.account_id, n.user_id) d
        where s.account_id = d.account_id and s.user_id = d.user_id and d.delta <> 0;
    else
        update gateway.feed_seq s set unread = s.unread - d.n
        from (select account_id, user_id, count(*) as n from old_rows
              where in_feed and read_at is null and archived_at is null
              group by account_id, user_id) d
        where s.account_id = d.account_id and s.user_id = d.user_id;
    end if;
    return null;
end
$$;

-- Transition tables allow one event per trigger: three triggers, one function.
create trigger feed_unread_insert after insert on gateway.feed
    referencing new table as new_rows for each statement execute function gateway.feed_unread_delta();
create trigger feed_unread_update after update on gateway.feed
    referencing old table as old_rows new table as new_rows for each statement execute function gateway.feed_unread_delta();
create trigger feed_unread_delete after delete on gateway.feed
    referencing old table as old_rows for each statement execute function gateway.feed_unread_delta();

-- Counted once. Creating the triggers locked gateway.feed against writers until this transaction
-- commits, so no write falls between this count and the triggers that move it from now on.
update gateway.feed_seq s set unread = c.n
from (select account_id, user_id, count(*) as n from gateway.feed
      where in_feed and read_at is null and archived_at is null group by account_id, user_id) c
where s.account_id = c.account_id and s.user_id = c.user_id;

-- The gateway's contract for other services (the mobile sender's badge), as gateway.unread_items is.
create view gateway.unread_counts as select account_id, user_id, unread from gateway.feed_seq;
