-- Follows and mutes of records and threads, per user. The dispatcher owns
-- them because fan-out reads them for every event addressed to followers.
-- `following = false` with a row present remembers an explicit unfollow, so
-- an automatic follow (owner, comment, mention, assignment) does not come back.
create table dispatcher.follows (
    account_id  text        not null,
    object_type text        not null,
    object_id   text        not null,
    user_id     text        not null,
    following   boolean     not null,
    muted       boolean     not null default false,
    source      text        not null,   -- explicit | owner | comment | mention | assigned
    updated_at  timestamptz not null default now(),
    primary key (account_id, object_type, object_id, user_id)
);
-- A user's follows, paged by object (a user following 100,000 records reads one index range per page).
create index follows_by_user on dispatcher.follows (account_id, user_id, object_type, object_id);
