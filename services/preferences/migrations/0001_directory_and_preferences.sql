-- The preferences service owns the directory (accounts, users, teams) and
-- every preference: user choices and settings, account defaults, role
-- profiles and the audit log. Every key leads with the account id.
create schema if not exists preferences;

create table preferences.accounts (
    account_id text primary key,
    name text not null default '',
    tier text not null check (tier in ('starter', 'professional', 'enterprise')),
    -- Bumped by every change of defaults or profiles: readers caching
    -- account-level data compare it instead of trusting a timer.
    defaults_version bigint not null default 1,
    updated_at timestamptz not null default now()
);

create table preferences.users (
    account_id text not null references preferences.accounts (account_id),
    user_id text not null,
    email text not null,
    display_name text not null default '',
    locale text not null default 'en',
    time_zone text not null default 'UTC',
    permission_set text not null default '',
    tool_access text[] not null default '{}',
    super_admin boolean not null default false,
    active boolean not null default true,
    updated_at timestamptz not null default now(),
    primary key (account_id, user_id)
);

create table preferences.teams (
    account_id text not null references preferences.accounts (account_id),
    team_id text not null,
    name text not null default '',
    primary key (account_id, team_id)
);

create table preferences.team_members (
    account_id text not null,
    team_id text not null,
    user_id text not null,
    is_primary boolean not null,
    primary key (account_id, team_id, user_id),
    foreign key (account_id, team_id) references preferences.teams (account_id, team_id) on delete cascade
);

-- One row per user who changed anything; absent = every setting at its default.
create table preferences.user_settings (
    account_id text not null,
    user_id text not null,
    version bigint not null default 1,
    channels_off text[] not null default '{}',  -- master switches that are off
    red_dot boolean not null default true,
    default_sound text not null default '',     -- '' = the product's default sound
    muted boolean not null default false,
    quiet_enabled boolean not null default false,
    quiet_days smallint[] not null default '{}',
    quiet_start time not null default '22:00',
    quiet_end time not null default '07:00',
    updated_at timestamptz not null default now(),
    primary key (account_id, user_id),
    foreign key (account_id, user_id) references preferences.users (account_id, user_id)
);

create table preferences.user_choices (
    account_id text not null,
    user_id text not null,
    topic text not null,
    channel text not null,
    enabled boolean not null,
    primary key (account_id, user_id, topic, channel)
);
-- EffectiveBatch reads one topic for many users of one account.
create index user_choices_by_topic on preferences.user_choices (account_id, topic, user_id);

create table preferences.user_topic_sounds (
    account_id text not null,
    user_id text not null,
    topic text not null,
    sound text not null,
    primary key (account_id, user_id, topic)
);

create table preferences.account_defaults (
    account_id text not null references preferences.accounts (account_id),
    topic text not null,
    channel text not null,
    enabled boolean not null,
    primary key (account_id, topic, channel)
);

create table preferences.role_profiles (
    account_id text not null references preferences.accounts (account_id),
    permission_set text not null,
    version bigint not null default 1,
    primary key (account_id, permission_set)
);

create table preferences.role_profile_choices (
    account_id text not null,
    permission_set text not null,
    topic text not null,
    channel text not null,
    enabled boolean not null,
    primary key (account_id, permission_set, topic, channel),
    foreign key (account_id, permission_set) references preferences.role_profiles (account_id, permission_set) on delete cascade
);

create table preferences.audit_log (
    account_id text not null,
    id bigint generated always as identity,
    at timestamptz not null default now(),
    actor_user_id text not null,
    user_id text not null,  -- '' for account-level changes
    via text not null check (via in ('user', 'admin_default', 'role_profile', 'api')),
    what text not null,
    old_value jsonb not null,
    new_value jsonb not null,
    primary key (account_id, id)
);
create index audit_log_by_user on preferences.audit_log (account_id, user_id, id desc);
