-- The dispatcher's record: every accepted notification, the decision for each
-- recipient (rule outcome and per-channel preference decisions), the facts
-- the recipient rules remember (first mentions, inbox visits).
create schema if not exists dispatcher;

-- One row per accepted event. The idempotency key lives on the row it
-- produced and is cleared after 24 hours (then the key may be reused).
create table dispatcher.notifications (
    account_id      text        not null,
    notification_id uuid        not null,
    idempotency_key text,
    body_hash       bytea       not null,   -- SHA-256 of the event without its key
    topic           text        not null,
    occurred_at     timestamptz not null,
    accepted_at     timestamptz not null default now(),
    actor_user_id   text        not null default '',
    actor_source    smallint    not null default 0,
    object          jsonb       not null,   -- type, id, display_name, url, owner_user_id
    primary key (account_id, notification_id)
);
create unique index notifications_idempotency on dispatcher.notifications (account_id, idempotency_key)
    where idempotency_key is not null;
create index notifications_key_age on dispatcher.notifications (accepted_at)
    where idempotency_key is not null;
create index notifications_age on dispatcher.notifications (accepted_at);

-- One row per (notification, candidate recipient): the rule outcome and, when
-- the rules let the user through, each preference channel's decision as
-- [{"c": channel, "s": state, "r": reason}] (compact: this is the hot path).
create table dispatcher.recipients (
    account_id      text        not null,
    notification_id uuid        not null,
    user_id         text        not null,
    accepted_at     timestamptz not null default now(),
    state           text        not null,   -- accepted | suppressed
    reason          text        not null default '',
    channels        jsonb       not null default '[]'::jsonb,
    held_until      timestamptz,
    primary key (account_id, notification_id, user_id)
);
create index recipients_by_user on dispatcher.recipients (account_id, user_id, accepted_at desc, notification_id desc);

-- First-mention rule: who has already been mentioned in an activity.
create table dispatcher.mentions (
    account_id    text        not null,
    activity_id   text        not null,
    user_id       text        not null,
    notification_id uuid      not null,
    mentioned_at  timestamptz not null default now(),
    primary key (account_id, activity_id, user_id)
);
create index mentions_age on dispatcher.mentions (mentioned_at);

-- Conversations rule: users who have visited the conversations inbox.
create table dispatcher.inbox_visits (
    account_id       text        not null,
    user_id          text        not null,
    first_visited_at timestamptz not null default now(),
    primary key (account_id, user_id)
);
