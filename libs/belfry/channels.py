"""The channels, named once: the queue, every service and the web app read them here.

A *preference channel* is a switch on the settings page and a value of the
API's ``belfry.api.common.v1.Channel`` enum. A *queue channel* is the
``channel`` of a row in ``queue.deliveries``, drained by one sender service.
Most preference channels have a queue channel of their own; the bell, the
pop-up and the in-tab browser notification ride on one "bell" delivery (its
flags say which), and the browser channel also has its own "browser"
delivery (web push). "batching" carries the dispatcher's handoff to the
batching service, and "dispatcher" the preferences service's change notices
to the dispatcher (published as events): handoffs, not deliveries to a user.

Adding a channel: see "Adding a channel" in docs/architecture.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from belfry.api.common.v1 import common_pb2


@dataclass(frozen=True)
class QueueChannel:
    """A queue channel: who drains it and how often a delivery is tried."""

    name: str
    sender: str  # the service that claims its deliveries
    max_attempts: int  # then the delivery is a dead letter


@dataclass(frozen=True)
class Channel:
    """A preference channel: what it is called in the API, the settings page and the queue."""

    name: str  # as preferences store it and the status record names it
    value: common_pb2.Channel.ValueType
    label: str  # its switch on the settings page
    tab: str  # the settings-page tab it is on (a key of TABS)
    queue: tuple[str, ...]  # the queue channels that carry it


# In the order a recipient's deliveries are made: the bell (live tabs) first.
# Email and webhooks face remote servers that recover slowly, so they get more
# attempts; the bell and batching are local and either work quickly or have a
# bug that retrying will not fix.
QUEUE: tuple[QueueChannel, ...] = (
    QueueChannel("bell", sender="gateway", max_attempts=5),
    QueueChannel("browser", sender="webpush", max_attempts=8),
    QueueChannel("email", sender="email", max_attempts=10),
    QueueChannel("mobile", sender="mobile", max_attempts=8),
    QueueChannel("other_apps", sender="webhooks", max_attempts=12),
    QueueChannel("batching", sender="batching", max_attempts=5),
    QueueChannel("dispatcher", sender="preferences", max_attempts=10),
)
# A "mobile" delivery of this topic carries no message: the gateway queues one when a user's read state
# changes, and the mobile sender sets the badge of the user's phones to their unread count.
MOBILE_BADGE_TOPIC = "belfry.badge"

# The settings page's tabs, in order: key → title.
TABS = {"email": "Email", "desktop": "Desktop", "other": "Other apps", "mobile": "Mobile app"}

# In enum order, which is the settings page's order.
PREFERENCE: tuple[Channel, ...] = (
    Channel("email", common_pb2.CHANNEL_EMAIL, "Email", "email", ("email",)),
    Channel("bell", common_pb2.CHANNEL_BELL, "Bell", "desktop", ("bell",)),
    Channel("popup", common_pb2.CHANNEL_POPUP, "Pop-up", "desktop", ("bell",)),
    Channel("browser", common_pb2.CHANNEL_BROWSER, "Browser", "desktop", ("bell", "browser")),
    Channel("other_apps", common_pb2.CHANNEL_OTHER_APPS, "Other apps", "other", ("other_apps",)),
    Channel("mobile", common_pb2.CHANNEL_MOBILE, "Mobile", "mobile", ("mobile",)),
)

NAMES: tuple[str, ...] = tuple(c.name for c in PREFERENCE)
QUEUE_NAMES: tuple[str, ...] = tuple(q.name for q in QUEUE)
MAX_ATTEMPTS: dict[str, int] = {q.name: q.max_attempts for q in QUEUE}
BY_NAME: dict[str, Channel] = {c.name: c for c in PREFERENCE}
BY_VALUE: dict[int, Channel] = {int(c.value): c for c in PREFERENCE}


@functools.cache
def queue_channels(on: frozenset[str]) -> tuple[str, ...]:
    """The queue channels that carry the preference channels ``on``, in delivery order."""
    carried = {q for name in on for q in BY_NAME[name].queue}
    return tuple(q for q in QUEUE_NAMES if q in carried)
