-- The batching service: assignment windows, digest facts and digest runs.
-- Every table leads with the account id; times are written by the service's
-- clock (injectable in tests), never by now(), so windows and digests follow it.
create schema if not exists batching;

-- Deliveries of the "batching" queue channel already applied: a redelivery
-- after a crash between commit and settle changes nothing.
create table batching.received (
    account_id  text        not null,
    delivery_id bigint      not null,
    received_at timestamptz not null,
    primary key (account_id, delivery_id)
);
create index received_age on batching.received (received_at);

-- One window per (user, object type) while open; closed windows stay as the record.
create table batching.windows (
    account_id      text        not null,
    window_id       uuid        not null,
    user_id         text        not null,
    object_type     text        not null,
    topic           text        not null,
    opened_at       timestamptz not null,
    closes_at       timestamptz not null,
    state           text        not null default 'open'
                    check (state in ('open', 'sent', 'empty', 'dropped')),
    lease_token     bigint,
    lease_by        text,
    lease_until     timestamptz,
    attempts        integer     not null default 0,
    last_error      text,
    closed_at       timestamptz,
    closed_by       text,
    notification_id uuid,
    item_count      integer,
    primary key (account_id, window_id)
);
create unique index windows_open_one on batching.windows (account_id, user_id, object_type) where state = 'open';
create index windows_due on batching.windows (closes_at) where state = 'open';
create index windows_closed on batching.windows (closed_at) where state <> 'open';

-- The assignments inside a window (an undone assignment is deleted from it).
create table batching.window_items (
    account_id  text        not null,
    window_id   uuid        not null,
    object_id   text        not null,
    delivery_id bigint      not null,
    assigned_at timestamptz not null,
    expires_at  timestamptz not null,
    channels    text[]      not null,
    message     jsonb       not null,
    primary key (account_id, window_id, object_id),
    foreign key (account_id, window_id) references batching.windows on delete cascade
);

-- The latest assignee of each object: an older assignment that arrives late
-- (deliveries are handled concurrently) cannot undo a newer one.
create table batching.assignees (
    account_id  text        not null,
    object_type text        not null,
    object_id   text        not null,
    user_id     text        not null,
    assigned_at timestamptz not null,
    primary key (account_id, object_type, object_id)
);

create sequence batching.lease_tokens;

-- Tasks as the weekly digest needs them: the latest fact about each task wins.
create table batching.tasks (
    account_id   text        not null,
    task_id      text        not null,
    user_id      text        not null,
    display_name text        not null,
    url          text        not null,
    due_at       timestamptz,
    is_open      boolean     not null,
    updated_at   timestamptz not null,
    primary key (account_id, task_id)
);
create index tasks_by_user on batching.tasks (account_id, user_id) where is_open;

-- Workflow enrolment changes for the Friday digest (kept a few weeks).
create table batching.workflow_changes (
    account_id    text        not null,
    user_id       text        not null,
    delivery_id   bigint      not null,
    workflow_id   text        not null,
    workflow_name text        not null,
    change        text        not null,
    display_name  text        not null,
    url           text        not null,
    occurred_at   timestamptz not null,
    primary key (account_id, user_id, delivery_id)
);
create index workflow_changes_age on batching.workflow_changes (occurred_at);

-- Users who may get a digest, with the next instant it fires for them.
-- next_fire_at null: not scheduled yet (the user's time zone is not known).
create table batching.digest_subjects (
    account_id   text        not null,
    user_id      text        not null,
    digest       text        not null check (digest in ('tasks', 'workflows')),
    time_zone    text,
    period       text,          -- the local date of the next fire: the exactly-once key
    next_fire_at timestamptz,
    last_fired_at timestamptz,
    lease_token  bigint,
    lease_by     text,
    lease_until  timestamptz,
    attempts     integer     not null default 0,
    last_error   text,
    primary key (account_id, user_id, digest)
);
create index digest_subjects_due on batching.digest_subjects (next_fire_at nulls first);

-- One row per (user, digest, local date): inserted in the transaction that
-- enqueues the email, so a period can never fire twice (DST, replicas, retries).
create table batching.digest_runs (
    account_id      text        not null,
    user_id         text        not null,
    digest          text        not null,
    period          text        not null,
    fired_at        timestamptz not null,
    outcome         text        not null check (outcome in ('sent', 'nothing', 'opted_out', 'unknown_user')),
    notification_id uuid,
    item_count      integer     not null default 0,
    fired_by        text        not null,
    primary key (account_id, user_id, digest, period)
);
