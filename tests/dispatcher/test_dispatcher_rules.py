"""The recipient rules as pure functions."""

from __future__ import annotations

import datetime as dt

from services.dispatcher import rules
from services.dispatcher.model import Event, ObjectRef


def ev(topic: str = "deals.stage_changed", **kw: object) -> Event:
    base: dict[str, object] = {
        "account_id": "a",
        "topic": topic,
        "occurred_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "idempotency_key": "k",
        "body_hash": b"",
        "actor_user_id": "actor",
        "source": "ui",
    }
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


def reasons(verdicts: list[rules.Verdict]) -> dict[str, str]:
    return {v.user_id: v.reason for v in verdicts}


def test_candidates_union_owner_custom_explicit_mentions_without_duplicates() -> None:
    e = ev(
        recipient_user_ids=("x",),
        owner_user_ids=("o1", "x"),
        custom_property_user_ids=("c1",),
        mentioned_user_ids=("m1", "o1"),
        object=ObjectRef(owner_user_id="o0"),
    )
    assert rules.candidates(e) == ["x", "o0", "o1", "c1", "m1"]


def test_self_action_is_suppressed() -> None:
    e = ev(recipient_user_ids=("actor", "b"))
    assert reasons(rules.decide(e, visited=(), team_primary=None)) == {"actor": rules.SELF_ACTION, "b": ""}


def test_self_mention_is_suppressed() -> None:
    e = ev("contacts.mentioned", mentioned_user_ids=("actor", "b"), activity_id="note-1")
    assert reasons(rules.decide(e, visited=(), team_primary=None))["actor"] == rules.SELF_ACTION


def test_api_created_tasks_and_activities_never_notify() -> None:
    task = ev("tasks.task_due", source="api", recipient_user_ids=("b",))
    note = ev("contacts.mentioned", source="api", mentioned_user_ids=("b",), activity_id="n")
    ui_task = ev("tasks.task_due", source="ui", recipient_user_ids=("b",))
    api_deal = ev("deals.stage_changed", source="api", recipient_user_ids=("b",))
    assert reasons(rules.decide(task, visited=(), team_primary=None)) == {"b": rules.API_CREATED}
    assert reasons(rules.decide(note, visited=(), team_primary=None)) == {"b": rules.API_CREATED}
    assert reasons(rules.decide(ui_task, visited=(), team_primary=None)) == {"b": ""}
    assert reasons(rules.decide(api_deal, visited=(), team_primary=None)) == {"b": ""}


def test_quotes_notify_the_owner_only() -> None:
    e = ev("quotes.paid", recipient_user_ids=("b",), object=ObjectRef(owner_user_id="owner"))
    assert reasons(rules.decide(e, visited=(), team_primary=None)) == {"b": rules.NOT_QUOTE_OWNER, "owner": ""}


def test_conversations_need_an_inbox_visit() -> None:
    e = ev("conversations.reply", recipient_user_ids=("b", "c"))
    assert reasons(rules.decide(e, visited={"c"}, team_primary=None)) == {"b": rules.INBOX_NOT_VISITED, "c": ""}


def test_unassigned_team_conversation_goes_to_primary_members_only() -> None:
    e = ev("conversations.unassigned_new", team_id="t", unassigned=True, recipient_user_ids=("sec",))
    verdicts = rules.decide(e, visited={"p1", "p2", "sec"}, team_primary=["p1", "p2"])
    assert reasons(verdicts) == {"p1": "", "p2": "", "sec": rules.NOT_PRIMARY_MEMBER}


def test_first_mention_only() -> None:
    e = ev("contacts.mentioned", mentioned_user_ids=("b", "c"), recipient_user_ids=("c",), activity_id="n1")
    verdicts = rules.decide(e, visited=(), team_primary=None)
    assert [v.mention_only for v in verdicts] == [False, True]  # c is also a recipient; b only mentioned
    after = rules.first_mentions(verdicts, first=set())
    assert reasons(after) == {"c": "", "b": rules.NOT_FIRST_MENTION}
    assert reasons(rules.first_mentions(verdicts, first={"b"})) == {"c": "", "b": ""}


def test_mentions_without_activity_are_not_subject_to_first_mention() -> None:
    e = ev("contacts.mentioned", mentioned_user_ids=("b",))
    verdicts = rules.decide(e, visited=(), team_primary=None)
    assert not verdicts[0].mention_only


def test_website_visits_are_email_only_and_task_events_feed_digests() -> None:
    assert rules.email_only("website_visits.contact_visited")
    assert not rules.email_only("deals.deal_assigned")
    assert rules.feeds_digest("tasks.task_due", "")
    assert rules.feeds_digest("workflows.needs_review", "")
    assert not rules.feeds_digest("tasks.weekly_digest", "digest")
    assert not rules.feeds_digest("deals.deal_assigned", "assignment")
