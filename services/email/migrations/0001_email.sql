-- The email sender's own tables: the daily cap (per account, recipient
-- address, topic and UTC day). The account id leads every key.
create schema if not exists email;

-- How many emails of a topic each address received on a UTC day.
create table email.daily_counts (
    account_id text    not null,
    address    text    not null,   -- lower-cased recipient address
    topic      text    not null,
    day        date    not null,
    sent       integer not null,
    primary key (account_id, address, topic, day)
);

-- Which deliveries already took a slot, so a delivery sent again after a
-- crash (same Message-ID) is not counted twice.
create table email.cap_slots (
    account_id  text   not null,
    delivery_id bigint not null,
    day         date   not null,
    primary key (account_id, delivery_id)
);
create index cap_slots_day on email.cap_slots (day);
create index daily_counts_day on email.daily_counts (day);
