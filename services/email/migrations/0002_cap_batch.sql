-- Daily-cap slots for a whole claimed batch in one round trip.
--
-- Same rules as taking them one at a time: a delivery that already holds a
-- slot (a resend after a crash or a retry) keeps it and is not counted again;
-- a new delivery takes a slot only while the counter is under the cap; a
-- delivery refused by the cap leaves no slot behind. Three statements, not
-- one query: a statement cannot see rows inserted by a sibling CTE, and the
-- refused deliveries' slots must be removed after the counters answered.
-- Replicas racing for the last slots are serialised by PostgreSQL on the
-- counter row (the upsert locks it), exactly as with one delivery at a time.
-- How many slots the last upsert of a row granted (read by take_cap_slots only).
alter table email.daily_counts add column last_grant integer not null default 0;

create function email.take_cap_slots(
    p_account  text[],
    p_delivery bigint[],
    p_address  text[],
    p_topic    text[],
    p_cap      integer
) returns table (delivery_id bigint)
language plpgsql volatile as $fn$
#variable_conflict use_column
declare
    today       date := (now() at time zone 'utc')::date;
    first_ids   bigint[];
    granted_ids bigint[];
begin
    -- The counter is a soft limit: after a database crash at worst the last
    -- few milliseconds of slots are forgotten (a few emails past the cap), so
    -- this transaction's commit need not wait for the WAL flush.
    perform set_config('synchronous_commit', 'off', true);

    -- Which deliveries take a slot for the first time (the primary key decides, under races too).
    with fresh as (
        insert into email.cap_slots as s (account_id, delivery_id, day)
        select i.account_id, i.delivery_id, today
        from unnest(p_account, p_delivery) as i(account_id, delivery_id)
        order by i.account_id, i.delivery_id
        on conflict do nothing
        returning s.delivery_id
    )
    select coalesce(array_agg(f.delivery_id), '{}') into first_ids from fresh f;

    -- One upsert per (account, address, topic): add as many as fit under the cap
    -- and remember how many that was (every SET expression reads the old row).
    -- Within a key, the lowest delivery ids get the granted slots.
    with batch as (
        select i.account_id, i.delivery_id, lower(i.address) as address, i.topic
        from unnest(p_account, p_delivery, p_address, p_topic) as i(account_id, delivery_id, address, topic)
        where i.delivery_id = any(first_ids)
    ), wanted as (
        select b.account_id, b.address, b.topic, count(*)::integer as n
        from batch b group by b.account_id, b.address, b.topic
    ), counted as (
        insert into email.daily_counts as c (account_id, address, topic, day, sent, last_grant)
        select w.account_id, w.address, w.topic, today, least(p_cap, w.n), least(p_cap, w.n)
        from wanted w
        order by w.account_id, w.address, w.topic  -- one lock order for every replica: no deadlocks
        on conflict (account_id, address, topic, day) do update
            set sent = greatest(c.sent, least(p_cap, c.sent + excluded.sent)),
                last_grant = greatest(0, least(p_cap, c.sent + excluded.sent) - c.sent)
        returning c.account_id, c.address, c.topic, c.last_grant
    ), ranked as (
        select b.account_id, b.address, b.topic, b.delivery_id,
               row_number() over (partition by b.account_id, b.address, b.topic order by b.delivery_id) as rn
        from batch b
    )
    select coalesce(array_agg(r.delivery_id), '{}') into granted_ids
    from ranked r join counted k using (account_id, address, topic)
    where r.rn <= k.last_grant;

    -- Refused by the cap: undo the slot so the record shows only real sends.
    delete from email.cap_slots s
    using unnest(p_account, p_delivery) as i(account_id, delivery_id)
    where i.delivery_id = any(first_ids) and not i.delivery_id = any(granted_ids)
      and s.account_id = i.account_id and s.delivery_id = i.delivery_id;

    return query
        select i.delivery_id from unnest(p_delivery) as i(delivery_id)
        where not i.delivery_id = any(first_ids) or i.delivery_id = any(granted_ids);
end
$fn$;
