"""Links in events: a path of the app or an http(s) URL, never a link a browser reads as another host."""

from __future__ import annotations

import grpc
import pytest

from tests.dispatcher.conftest import Mesh, event, publish, refused, seed


@pytest.mark.parametrize(
    "url", ["//evil.example/login", "/\\evil.example/login", "/\t/evil.example", "\\\\evil.example"]
)
async def test_a_url_naming_another_host_is_not_an_app_path(mesh: Mesh, account_id: str, url: str) -> None:
    # A browser reads each of these as a link to evil.example (issue 17, section 5).
    await seed(mesh, account_id)
    ev = event(account_id, recipient_user_ids=["ana"])
    ev.object.url = url
    error = await refused(publish(mesh, ev))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event.object.url" in (error.details() or "")
    assert (
        await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id) == 0
    )


async def test_paths_and_absolute_urls_are_accepted(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    for url in ("/deals/1?tab=notes#top", "https://app.example/deals/2", "http://intranet.example/x", ""):
        ev = event(account_id, recipient_user_ids=["ana"])
        ev.object.url = url
        assert (await publish(mesh, ev)).notification_id, url
