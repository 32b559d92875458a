"""Weekly task and Friday workflow digests through the real services, across DST changes."""

from __future__ import annotations

import datetime as dt

from belfry.handoff import DigestFact
from belfry.message import Message

from tests.batching.conftest import World

UTC = dt.UTC


def _fact(
    account_id: str, user_id: str, task_id: str, *, due: str = "", status: str = "open", at: dt.datetime
) -> DigestFact:
    return DigestFact(
        account_id=account_id,
        user_id=user_id,
        topic="tasks.task_assigned",
        object_type="task",
        object_id=task_id,
        display_name=f"Task {task_id}",
        url=f"https://app.example.test/tasks/{task_id}",
        occurred_at=at.isoformat(),
        data={"status": status, "due_at": due},
    )


def _change(account_id: str, user_id: str, workflow: str, change: str, at: dt.datetime) -> DigestFact:
    return DigestFact(
        account_id=account_id,
        user_id=user_id,
        topic="workflows.enrolment_changed",
        object_type="workflow",
        object_id=workflow,
        display_name=f"Workflow {workflow}",
        url=f"https://app.example.test/workflows/{workflow}",
        occurred_at=at.isoformat(),
        data={"change": change, "workflow_name": f"Workflow {workflow}", "record_name": "Ana Lopez"},
    )


async def _settle(world: World, account_id: str, at: dt.datetime) -> None:
    world.clock.set(at)
    await world.until(lambda: world.digests_settled(account_id), f"digests settled at {at}")


async def _runs(world: World, account_id: str) -> list[tuple[str, str, str, dt.datetime]]:
    rows = await world.pool.fetch(
        "select user_id, period, outcome, fired_at from batching.digest_runs where account_id = $1"
        " order by period, user_id",
        account_id,
    )
    return [(r["user_id"], r["period"], r["outcome"], r["fired_at"]) for r in rows]


async def test_weekly_task_digest_opt_in_content_and_nothing_to_report(world: World, tenant: str) -> None:
    world.clock.set(dt.datetime(2027, 3, 17, 12, 0, tzinfo=UTC))  # a Wednesday, before the DST change
    await world.start_replica()
    await world.prefs.opt_in(tenant, "ana", "tasks.weekly_digest")
    await world.prefs.opt_in(tenant, "cy", "tasks.weekly_digest")
    now = world.clock.now()
    for fact in (
        _fact(tenant, "ana", "t1", due="2027-03-20T09:00:00+00:00", at=now),
        _fact(tenant, "ana", "t2", due="2027-04-10", at=now),
        _fact(tenant, "ana", "t3", status="completed", at=now),
        _fact(tenant, "bob", "t4", at=now),  # bob never opted in
        _fact(tenant, "cy", "t5", at=now),
        _fact(tenant, "cy", "t5", status="completed", at=now + dt.timedelta(seconds=1)),  # nothing left to report
    ):
        await world.handoff(tenant, fact.user_id, fact)
    await world.until(lambda: world.handled(tenant), "facts applied")
    await _settle(world, tenant, now)
    nxt = await world.pool.fetchval(
        "select next_fire_at from batching.digest_subjects where account_id = $1 and user_id = 'ana'", tenant
    )
    assert nxt == dt.datetime(2027, 3, 22, 7, 0, tzinfo=UTC)  # Monday 08:00 in Paris, winter time

    await _settle(world, tenant, dt.datetime(2027, 3, 22, 6, 59, tzinfo=UTC))
    assert await world.deliveries(tenant) == []
    await _settle(world, tenant, dt.datetime(2027, 3, 22, 7, 0, tzinfo=UTC))
    rows = await world.deliveries(tenant)
    assert [(r["user_id"], r["channel"], r["topic"]) for r in rows] == [("ana", "email", "tasks.weekly_digest")]
    message = Message.from_json(rows[0]["payload"])
    assert message.title == "Your tasks: 2 open, 1 overdue"
    assert [i.id for i in message.items] == ["t1", "t2"]
    assert message.recipient_email == "ana@example.test"
    assert [(u, o) for u, _, o, _ in await _runs(world, tenant)] == [
        ("ana", "sent"),
        ("bob", "opted_out"),
        ("cy", "nothing"),
    ]


async def test_task_digest_fires_once_a_week_across_the_spring_change(world: World, tenant: str) -> None:
    world.clock.set(dt.datetime(2027, 3, 17, 12, 0, tzinfo=UTC))
    await world.start_replica()
    await world.start_replica()  # two replicas: each period still fires once
    await world.prefs.opt_in(tenant, "ana", "tasks.weekly_digest")
    await world.handoff(tenant, "ana", _fact(tenant, "ana", "t1", at=world.clock.now()))
    await world.until(lambda: world.handled(tenant), "fact applied")
    # Walk the clock through three Mondays around the change of 28 March 2027 (CET → CEST).
    steps = [
        dt.datetime(2027, 3, 17, 12, 0, tzinfo=UTC),
        dt.datetime(2027, 3, 22, 7, 0, tzinfo=UTC),  # 08:00 CET
        dt.datetime(2027, 3, 22, 8, 0, tzinfo=UTC),
        dt.datetime(2027, 3, 28, 1, 30, tzinfo=UTC),  # the change itself
        dt.datetime(2027, 3, 29, 5, 59, tzinfo=UTC),
        dt.datetime(2027, 3, 29, 6, 0, tzinfo=UTC),  # 08:00 CEST
        dt.datetime(2027, 3, 29, 7, 0, tzinfo=UTC),  # 08:00 as it would have been in winter
        dt.datetime(2027, 4, 5, 6, 0, tzinfo=UTC),
        dt.datetime(2027, 4, 5, 12, 0, tzinfo=UTC),
    ]
    for at in steps:
        await _settle(world, tenant, at)
    runs = await _runs(world, tenant)
    assert [(p, f) for _, p, _, f in runs] == [
        ("2027-03-22", dt.datetime(2027, 3, 22, 7, 0, tzinfo=UTC)),
        ("2027-03-29", dt.datetime(2027, 3, 29, 6, 0, tzinfo=UTC)),
        ("2027-04-05", dt.datetime(2027, 4, 5, 6, 0, tzinfo=UTC)),
    ]
    emails = await world.deliveries(tenant, channel="email")
    assert len(emails) == 3
    assert len({r["notification_id"] for r in emails}) == 3


async def test_a_folded_and_a_skipped_local_time_each_fire_once(world: World, tenant: str) -> None:
    # Sunday 02:30 in Paris happens twice on 31 October 2027 and never on 28 March 2027.
    world.clock.set(dt.datetime(2027, 3, 24, 12, 0, tzinfo=UTC))
    await world.start_replica(BELFRY_BATCHING_TASK_DIGEST_AT="sun 02:30")
    await world.prefs.opt_in(tenant, "ana", "tasks.weekly_digest")
    await world.handoff(tenant, "ana", _fact(tenant, "ana", "t1", at=world.clock.now()))
    await world.until(lambda: world.handled(tenant), "fact applied")
    for at in (
        dt.datetime(2027, 3, 24, 12, 0, tzinfo=UTC),
        dt.datetime(2027, 3, 28, 0, 59, tzinfo=UTC),  # 01:59 CET
        dt.datetime(2027, 3, 28, 1, 30, tzinfo=UTC),  # 03:30 CEST: the gap's 02:30, an hour on
        dt.datetime(2027, 3, 28, 2, 30, tzinfo=UTC),
        dt.datetime(2027, 10, 27, 12, 0, tzinfo=UTC),  # skip ahead: missed weeks are not replayed
        dt.datetime(2027, 10, 31, 0, 30, tzinfo=UTC),  # first 02:30 (CEST)
        dt.datetime(2027, 10, 31, 1, 30, tzinfo=UTC),  # second 02:30 (CET)
        dt.datetime(2027, 10, 31, 5, 0, tzinfo=UTC),
    ):
        await _settle(world, tenant, at)
    periods = [(p, f) for _, p, _, f in await _runs(world, tenant)]
    assert periods == [
        ("2027-03-28", dt.datetime(2027, 3, 28, 1, 30, tzinfo=UTC)),
        ("2027-04-04", dt.datetime(2027, 10, 27, 12, 0, tzinfo=UTC)),  # the overdue period, fired late, once
        ("2027-10-31", dt.datetime(2027, 10, 31, 0, 30, tzinfo=UTC)),
    ]


async def test_friday_workflow_digest_reports_the_weeks_changes_once(world: World, tenant: str) -> None:
    world.clock.set(dt.datetime(2027, 5, 3, 9, 0, tzinfo=UTC))  # a Monday
    await world.start_replica()
    await world.prefs.user(tenant, "ana", locale="fr")
    await world.prefs.opt_in(tenant, "ana", "workflows.friday_digest")
    now = world.clock.now()
    for n, (workflow, change) in enumerate(
        [("onboarding", "enrolled"), ("onboarding", "enrolled"), ("onboarding", "unenrolled"), ("renewal", "enrolled")]
    ):
        fact = _change(tenant, "ana", workflow, change, now + dt.timedelta(hours=n))
        await world.handoff(tenant, "ana", fact)
    await world.until(lambda: world.handled(tenant), "facts applied")
    await _settle(world, tenant, now)
    await _settle(world, tenant, dt.datetime(2027, 5, 7, 14, 0, tzinfo=UTC))  # Friday 16:00 CEST
    emails = [Message.from_json(r["payload"]) for r in await world.deliveries(tenant, channel="email")]
    assert len(emails) == 1
    assert emails[0].title == "4 changement(s) d'inscription dans vos workflows cette semaine"
    assert [i.display_name for i in emails[0].items] == [
        "Workflow onboarding: 2 inscrits, 1 désinscrits",
        "Workflow renewal: 1 inscrits",
    ]
    # The next Friday has nothing new: no email.
    await _settle(world, tenant, dt.datetime(2027, 5, 14, 14, 0, tzinfo=UTC))
    assert len(await world.deliveries(tenant, channel="email")) == 1
    assert [o for _, _, o, _ in await _runs(world, tenant)] == ["sent", "nothing"]


async def test_a_mention_in_a_task_note_does_not_move_the_task(world: World, tenant: str) -> None:
    world.clock.set(dt.datetime(2027, 6, 2, 12, 0, tzinfo=UTC))  # a Wednesday
    await world.start_replica()
    now = world.clock.now()
    await world.handoff(tenant, "ana", _fact(tenant, "ana", "t1", at=now))
    mention = DigestFact(
        account_id=tenant,
        user_id="bob",
        topic="tasks.mentioned",
        object_type="task",
        object_id="t1",
        display_name="Task t1",
        url="https://app.example.test/tasks/t1",
        occurred_at=(now + dt.timedelta(minutes=1)).isoformat(),
        data={},
    )
    await world.handoff(tenant, "bob", mention)
    await world.until(lambda: world.handled(tenant), "facts applied")
    owner = await world.pool.fetchval(
        "select user_id from batching.tasks where account_id = $1 and task_id = 't1'", tenant
    )
    assert owner == "ana"


async def test_a_digest_due_in_quiet_hours_is_held_until_they_end(world: World, tenant: str) -> None:
    world.clock.set(dt.datetime(2027, 6, 2, 12, 0, tzinfo=UTC))  # a Wednesday
    await world.start_replica()
    await world.prefs.opt_in(tenant, "ana", "tasks.weekly_digest")
    await world.prefs.quiet_hours(tenant, "ana", "07:00", "09:00")
    await world.handoff(tenant, "ana", _fact(tenant, "ana", "t1", at=world.clock.now()))
    await world.until(lambda: world.handled(tenant), "fact applied")
    await _settle(world, tenant, world.clock.now())
    await _settle(world, tenant, dt.datetime(2027, 6, 7, 6, 0, tzinfo=UTC))  # Monday 08:00 CEST
    [row] = await world.deliveries(tenant, channel="email")
    assert row["available_at"] == dt.datetime(2027, 6, 7, 7, 0, tzinfo=UTC)  # 09:00 CEST, the end of quiet hours
