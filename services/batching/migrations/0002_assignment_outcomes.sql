-- What became of each assignment handed to batching, and the merged
-- notifications themselves, readable by the dispatcher's status API.
--
-- Window items now stay in their window as the record: one row per handed-over
-- assignment (its source notification), 'in' while it will be sent, 'replaced'
-- when a newer assignment of the same object to the same user took its place
-- (the newer one carries the object; both go out in the window's notification),
-- 'withdrawn' when the object was assigned to someone else while the window
-- was open (it is never sent).
alter table batching.window_items
    add column notification_id uuid,
    add column state text not null default 'in' check (state in ('in', 'replaced', 'withdrawn')),
    add column left_at timestamptz;
-- Rows written before this migration: the source is the message's notification id.
update batching.window_items
set notification_id = case
    when message ->> 'notification_id' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
    then (message ->> 'notification_id')::uuid
    else gen_random_uuid()
end;
alter table batching.window_items alter column notification_id set not null;
alter table batching.window_items drop constraint window_items_pkey;
alter table batching.window_items add primary key (account_id, window_id, object_id, notification_id);
create index window_items_by_source on batching.window_items (account_id, notification_id);

-- What a closed window sent: the merged notification's title and link, and its
-- per-channel decisions at close ([{"c": channel, "s": state, "r": reason}],
-- the dispatcher's status format), so the merged notification has a record.
alter table batching.windows
    add column title    text,
    add column url      text,
    add column channels jsonb;
create index windows_by_notification on batching.windows (account_id, notification_id)
    where notification_id is not null;

-- The contract read by the dispatcher's status API (read only; batching alone
-- writes the tables behind these views). Changing batching's tables must keep
-- these columns and their meaning.
--
-- One row per assignment handed to batching, by source notification and user:
--   outcome 'held'      waiting in the open window until `at` (its closing time)
--           'merged'    went out in notification `merged_into` when the window closed at `at`
--                       (`merged_into` = the source itself when the window held nothing else)
--           'withdrawn' assigned to someone else inside the window at `at`: never sent
--           'dropped'   the window was dropped at `at` (`reason`: e.g. the user left the account)
create view batching.assignment_outcomes as
select i.account_id,
       i.notification_id,
       w.user_id,
       case
           when i.state = 'withdrawn' then 'withdrawn'
           when w.state = 'open' then 'held'
           when w.state = 'sent' then 'merged'
           else 'dropped'
       end as outcome,
       case
           when i.state = 'withdrawn' then i.left_at
           when w.state = 'open' then w.closes_at
           else w.closed_at
       end as at,
       case when i.state <> 'withdrawn' and w.state = 'sent' then w.notification_id end as merged_into,
       case
           when i.state = 'withdrawn' then 'withdrawn by reassignment'
           when w.state = 'open' or w.state = 'sent' then ''
           else coalesce(w.last_error, w.state)
       end as reason
from batching.window_items i
join batching.windows w on w.account_id = i.account_id and w.window_id = i.window_id;

-- One row per merged notification (a window that sent two or more assignments
-- as one): who got it, what it said, the channel decisions at close, and the
-- source notifications it merges, oldest first.
create view batching.merged_notifications as
select w.account_id,
       w.notification_id,
       w.user_id,
       w.topic,
       w.object_type,
       coalesce(w.title, '') as title,
       coalesce(w.url, '') as url,
       coalesce(w.channels, '[]'::jsonb) as channels,
       w.closed_at as merged_at,
       src.occurred_at,
       src.source_ids
from batching.windows w
cross join lateral (
    select max(i.assigned_at) as occurred_at,
           array_agg(i.notification_id order by i.assigned_at, i.notification_id) as source_ids
    from batching.window_items i
    where i.account_id = w.account_id and i.window_id = w.window_id and i.state <> 'withdrawn'
) src
where w.state = 'sent' and w.item_count > 1;
