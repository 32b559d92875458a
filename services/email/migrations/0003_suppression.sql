-- Deliverability (issue 20): the suppression list and the bounce record.
-- Both are the email service's own tables; the account id leads every key.

-- Addresses the account no longer mails: a mailbox that does not exist
-- (5.1.x at RCPT, a hard bounce), a complaint, or too many soft bounces.
create table email.suppressions (
    account_id      text        not null,
    address         text        not null,   -- lower-cased recipient address
    reason          text        not null,   -- 'hard bounce' | 'complaint' | 'soft bounces'
    detail          text        not null,   -- the server's reply or the report's status and diagnostic
    source_delivery bigint,                 -- the delivery that taught us (null when unknown)
    first_seen      timestamptz not null default now(),
    last_seen       timestamptz not null default now(),
    primary key (account_id, address)
);

-- Every bounce and complaint the service learnt of, per delivery: the
-- delivery's deliverability timeline (its queue row says 'sent': the relay
-- accepted it; this says what the destination did afterwards).
create table email.feedback (
    account_id  text        not null,
    delivery_id bigint      not null,
    feedback_id bigint      generated always as identity,
    kind        text        not null,   -- 'hard bounce' | 'soft bounce' | 'complaint'
    address     text        not null,   -- lower-cased
    status      text        not null,   -- RFC 3464 Status (e.g. 5.1.1) or the ARF Feedback-Type
    detail      text        not null,   -- Diagnostic-Code, or the report's text
    at          timestamptz not null default now(),
    primary key (account_id, delivery_id, feedback_id)
);
-- Soft bounces are counted per address over a window.
create index feedback_address on email.feedback (account_id, address, at);
