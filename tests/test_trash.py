"""The trash: a deleted task waits there to be restored or deleted for good, and is purged by the housekeeping
once it has been there longer than TRASH_RETENTION_DAYS.

Sections follow the contract's "Trash (v2)". Every test runs against the real app over real HTTP, on
SQLite and, when TEST_DATABASE_URL is set, on PostgreSQL.
"""

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import update

from housekeeping import clean_up
from main import create_app
from models import utc_now
from store import tasks
from tests.conftest import make_settings

if TYPE_CHECKING:
    from tests.conftest import LiveServer
    from tests.keys import JwksServer

Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]

TASK_NOT_FOUND = {"detail": "Task not found", "code": "task_not_found"}
RETENTION_DAYS = 30
# What a restore must bring back exactly as it was.
KEPT_FIELDS = ("id", "user_id", "title", "description", "completed", "completed_at", "priority", "tags", "due_date")


def tasks_url(user_id: str, task_id: int | str | None = None, suffix: str = "") -> str:
    """The URL of a user's tasks, or of one of them."""
    return f"/api/{user_id}/tasks" + (f"/{task_id}" if task_id is not None else "") + suffix


def trash_url(user_id: str, task_id: int | str | None = None, suffix: str = "") -> str:
    """The URL of a user's trash, or of one task in it."""
    return f"/api/{user_id}/trash" + (f"/{task_id}" if task_id is not None else "") + suffix


def json_of(response: httpx.Response, status: int) -> Any:
    """The JSON body of a response that must have `status`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def utc_instant(text: str) -> datetime:
    """A date-time the API returned, which must carry an explicit UTC offset."""
    assert text.endswith(("Z", "+00:00")), text
    value = datetime.fromisoformat(text)
    assert value.utcoffset() == timedelta(0)
    return value


def trash_task(client: httpx.Client, auth: Auth, user_id: str, task_id: int) -> None:
    """Move a task to the trash through the API."""
    response = client.delete(tasks_url(user_id, task_id), headers=auth(user_id))
    assert response.status_code == 204, response.text
    assert response.content == b""


def trash_of(client: httpx.Client, auth: Auth, user_id: str, **params: Any) -> list[dict[str, Any]]:
    """One page of the user's trash."""
    return json_of(client.get(trash_url(user_id), params=params, headers=auth(user_id)), 200)


def trash_ids(client: httpx.Client, auth: Auth, user_id: str) -> list[int]:
    """The ids in the user's trash, in the trash's order (fewer than 500 in these tests)."""
    return [task["id"] for task in trash_of(client, auth, user_id, limit=500)]


def live_ids(client: httpx.Client, auth: Auth, user_id: str) -> list[int]:
    """The ids of the user's live tasks, oldest first, checked against `X-Total-Count`."""
    response = client.get(
        tasks_url(user_id), params={"limit": 500, "sort": "created", "order": "asc"}, headers=auth(user_id)
    )
    tasks = json_of(response, 200)
    assert int(response.headers["x-total-count"]) == len(tasks)
    return [task["id"] for task in tasks]


def read_task(client: httpx.Client, auth: Auth, user_id: str, task_id: int) -> dict[str, Any]:
    """A live task, read through the API."""
    return json_of(client.get(tasks_url(user_id, task_id), headers=auth(user_id)), 200)


# --- Moving to the trash -----------------------------------------------------------------------------


def test_delete_moves_the_task_to_the_trash_with_deleted_at_a_new_version_and_updated_at(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, "Trash me", description="kept", priority="high", tags=["Work", "home"])
    before = utc_now()
    trash_task(client, auth, user_id, task["id"])
    after = utc_now()

    [trashed] = trash_of(client, auth, user_id)
    assert trashed["version"] == task["version"] + 1
    assert utc_instant(trashed["updated_at"]) > utc_instant(task["updated_at"])
    assert before <= utc_instant(trashed["deleted_at"]) <= after
    assert trashed["created_at"] == task["created_at"]
    assert {name: trashed[name] for name in KEPT_FIELDS} == {name: task[name] for name in KEPT_FIELDS}


def test_trashed_task_is_404_everywhere_under_tasks(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, "Gone from /tasks")
    kept = make_task(user_id, "Still live")
    trash_task(client, auth, user_id, task["id"])
    headers = auth(user_id)
    url = tasks_url(user_id, task["id"])

    attempts = [
        client.get(url, headers=headers),
        client.put(url, json={"title": "Changed"}, headers=headers),
        client.patch(url, json={"title": "Changed"}, headers=headers),
        client.patch(url + "/complete", headers=headers),
        client.patch(url + "/complete", json={"completed": True}, headers=headers),
        client.delete(url, headers=headers),
    ]
    for response in attempts:
        assert json_of(response, 404) == TASK_NOT_FOUND, response.request.method
    assert live_ids(client, auth, user_id) == [kept["id"]]
    [trashed] = trash_of(client, auth, user_id)
    assert trashed["version"] == task["version"] + 1  # none of the attempts changed it
    assert trashed["title"] == "Gone from /tasks"
    assert trashed["completed"] is False


def test_trash_lists_the_newest_deletion_first(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    first, second, third = (make_task(user_id, f"Task {number}")["id"] for number in range(3))
    for task_id in (second, third, first):
        trash_task(client, auth, user_id, task_id)

    trash = trash_of(client, auth, user_id)
    assert [task["id"] for task in trash] == [first, third, second]
    deleted_ats = [utc_instant(task["deleted_at"]) for task in trash]
    assert deleted_ats == sorted(deleted_ats, reverse=True)


def test_trash_pages_with_limit_offset_total_count_and_links(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task_ids = [make_task(user_id, f"Task {number}")["id"] for number in range(5)]
    for task_id in task_ids:
        trash_task(client, auth, user_id, task_id)
    newest_first = list(reversed(task_ids))

    first_page = client.get(trash_url(user_id), params={"limit": 2}, headers=auth(user_id))
    assert [task["id"] for task in json_of(first_page, 200)] == newest_first[:2]
    assert first_page.headers["x-total-count"] == "5"
    assert set(first_page.links) == {"next"}

    seen, url, pages = [], first_page.links["next"]["url"], 1
    while True:
        page = client.get(url, headers=auth(user_id))
        seen += [task["id"] for task in json_of(page, 200)]
        assert page.headers["x-total-count"] == "5"
        assert "prev" in page.links
        pages += 1
        if "next" not in page.links:
            break
        url = page.links["next"]["url"]
    assert pages == 3
    assert seen == newest_first[2:]

    middle = client.get(trash_url(user_id), params={"limit": 2, "offset": 2}, headers=auth(user_id))
    assert [task["id"] for task in json_of(middle, 200)] == newest_first[2:4]
    assert set(middle.links) == {"next", "prev"}
    past_the_end = client.get(trash_url(user_id), params={"offset": 10}, headers=auth(user_id))
    assert json_of(past_the_end, 200) == []
    assert past_the_end.headers["x-total-count"] == "5"


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 501}, {"offset": -1}, {"limit": "many"}])
def test_trash_with_invalid_paging_is_422(
    client: httpx.Client, auth: Auth, user_id: str, params: dict[str, Any]
) -> None:
    body = json_of(client.get(trash_url(user_id), params=params, headers=auth(user_id)), 422)
    assert isinstance(body["detail"], list)
    assert body["detail"][0]["loc"][0] == "query"


def test_trash_holds_only_the_users_own_tasks(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    mine = make_task(user_id, "Mine")["id"]
    theirs = make_task(other_user_id, "Theirs")["id"]
    trash_task(client, auth, user_id, mine)
    trash_task(client, auth, other_user_id, theirs)

    response = client.get(trash_url(user_id), headers=auth(user_id))
    assert [task["id"] for task in json_of(response, 200)] == [mine]
    assert response.headers["x-total-count"] == "1"
    assert trash_ids(client, auth, other_user_id) == [theirs]


def test_trash_answers_with_no_store_and_an_etag(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    trash_task(client, auth, user_id, make_task(user_id)["id"])
    response = client.get(trash_url(user_id), headers=auth(user_id))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    unchanged = client.get(trash_url(user_id), headers=auth(user_id) | {"If-None-Match": response.headers["etag"]})
    assert unchanged.status_code == 304
    assert unchanged.content == b""


# --- Restoring -----------------------------------------------------------------------------------------


def test_restore_brings_the_task_back_as_it_was_with_a_new_version(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(
        user_id,
        "Undo me",
        description="As it was",
        completed=True,
        priority="medium",
        tags=["Ärger", "errands"],
        due_date="2031-05-06T07:08:09Z",
    )
    trash_task(client, auth, user_id, task["id"])
    [trashed] = trash_of(client, auth, user_id)

    response = client.post(trash_url(user_id, task["id"], "/restore"), headers=auth(user_id))
    restored = json_of(response, 200)
    assert "deleted_at" not in restored
    assert restored["version"] == trashed["version"] + 1 == task["version"] + 2
    assert response.headers["etag"] == f'"{restored["version"]}"'
    assert utc_instant(restored["updated_at"]) > utc_instant(trashed["updated_at"])
    assert restored["created_at"] == task["created_at"]
    assert {name: restored[name] for name in KEPT_FIELDS} == {name: task[name] for name in KEPT_FIELDS}

    assert read_task(client, auth, user_id, task["id"]) == restored
    assert live_ids(client, auth, user_id) == [task["id"]]
    assert trash_ids(client, auth, user_id) == []


def test_restored_task_can_be_changed_and_trashed_again(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task_id = make_task(user_id, "Round trip")["id"]
    trash_task(client, auth, user_id, task_id)
    json_of(client.post(trash_url(user_id, task_id, "/restore"), headers=auth(user_id)), 200)

    changed = json_of(client.patch(tasks_url(user_id, task_id), json={"title": "Back"}, headers=auth(user_id)), 200)
    assert changed["title"] == "Back"
    assert changed["version"] == 4
    trash_task(client, auth, user_id, task_id)
    [trashed] = trash_of(client, auth, user_id)
    assert (trashed["id"], trashed["title"], trashed["version"]) == (task_id, "Back", 5)


def test_restoring_twice_is_404_the_second_time(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    trash_task(client, auth, user_id, task["id"])
    json_of(client.post(trash_url(user_id, task["id"], "/restore"), headers=auth(user_id)), 200)
    again = client.post(trash_url(user_id, task["id"], "/restore"), headers=auth(user_id))
    assert json_of(again, 404) == TASK_NOT_FOUND
    assert read_task(client, auth, user_id, task["id"])["version"] == task["version"] + 2


NOT_IN_THE_TRASH = ["live", "other_users_trashed", "missing", "huge"]


def id_not_in_the_trash(
    kind: str, client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> str:
    """An id that is not in `user_id`'s trash, of the given kind."""
    if kind == "live":
        return str(make_task(user_id, "Live")["id"])
    if kind == "other_users_trashed":
        task_id = make_task(other_user_id, "Theirs, trashed")["id"]
        trash_task(client, auth, other_user_id, task_id)
        return str(task_id)
    if kind == "missing":
        doomed = make_task(user_id, "Deleted for good")["id"]
        trash_task(client, auth, user_id, doomed)
        assert client.delete(trash_url(user_id, doomed), headers=auth(user_id)).status_code == 204
        return str(doomed)
    return "9" * 40


@pytest.mark.parametrize("kind", NOT_IN_THE_TRASH)
def test_restore_of_an_id_not_in_the_users_trash_is_404_and_changes_nothing(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask, kind: str
) -> None:
    task_id = id_not_in_the_trash(kind, client, auth, user_id, other_user_id, make_task)
    live_before = live_ids(client, auth, user_id)
    other_trash_before = trash_of(client, auth, other_user_id)

    response = client.post(trash_url(user_id, task_id, "/restore"), headers=auth(user_id))
    assert json_of(response, 404) == TASK_NOT_FOUND
    assert live_ids(client, auth, user_id) == live_before
    assert trash_of(client, auth, other_user_id) == other_trash_before
    if kind == "live":
        assert read_task(client, auth, user_id, int(task_id))["version"] == 1


@pytest.mark.parametrize("kind", NOT_IN_THE_TRASH)
def test_delete_for_good_of_an_id_not_in_the_users_trash_is_404_and_changes_nothing(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask, kind: str
) -> None:
    task_id = id_not_in_the_trash(kind, client, auth, user_id, other_user_id, make_task)
    live_before = live_ids(client, auth, user_id)
    other_trash_before = trash_of(client, auth, other_user_id)

    response = client.delete(trash_url(user_id, task_id), headers=auth(user_id))
    assert json_of(response, 404) == TASK_NOT_FOUND
    assert live_ids(client, auth, user_id) == live_before
    assert trash_of(client, auth, other_user_id) == other_trash_before
    if kind == "live":
        assert read_task(client, auth, user_id, int(task_id))["version"] == 1


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_trash_id_that_is_not_an_integer_is_422(client: httpx.Client, auth: Auth, user_id: str, method: str) -> None:
    url = trash_url(user_id, "abc", "/restore" if method == "POST" else "")
    body = json_of(client.request(method, url, headers=auth(user_id)), 422)
    assert body["detail"][0]["loc"][:2] == ["path", "task_id"]


# --- Deleting for good --------------------------------------------------------------------------------


def test_delete_for_good_removes_the_task_everywhere(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    doomed = make_task(user_id, "Doomed")["id"]
    kept = make_task(user_id, "Kept in the trash")["id"]
    for task_id in (doomed, kept):
        trash_task(client, auth, user_id, task_id)

    response = client.delete(trash_url(user_id, doomed), headers=auth(user_id))
    assert response.status_code == 204
    assert response.content == b""
    assert trash_ids(client, auth, user_id) == [kept]
    assert json_of(client.get(tasks_url(user_id, doomed), headers=auth(user_id)), 404) == TASK_NOT_FOUND
    assert json_of(client.post(trash_url(user_id, doomed, "/restore"), headers=auth(user_id)), 404) == TASK_NOT_FOUND
    assert json_of(client.delete(trash_url(user_id, doomed), headers=auth(user_id)), 404) == TASK_NOT_FOUND
    assert live_ids(client, auth, user_id) == []


def test_emptying_the_trash_deletes_only_this_users_trash(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    trashed = [make_task(user_id, f"Trashed {number}")["id"] for number in range(3)]
    live = make_task(user_id, "Live")["id"]
    theirs = make_task(other_user_id, "Their trash")["id"]
    their_live = make_task(other_user_id, "Their live task")["id"]
    for task_id in trashed:
        trash_task(client, auth, user_id, task_id)
    trash_task(client, auth, other_user_id, theirs)

    response = client.delete(trash_url(user_id), headers=auth(user_id))
    assert response.status_code == 204
    assert response.content == b""

    after = client.get(trash_url(user_id), headers=auth(user_id))
    assert json_of(after, 200) == []
    assert after.headers["x-total-count"] == "0"
    assert live_ids(client, auth, user_id) == [live]
    for task_id in trashed:
        restore = client.post(trash_url(user_id, task_id, "/restore"), headers=auth(user_id))
        assert json_of(restore, 404) == TASK_NOT_FOUND
    assert trash_ids(client, auth, other_user_id) == [theirs]
    assert live_ids(client, auth, other_user_id) == [their_live]


def test_emptying_an_empty_trash_is_204(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    live = make_task(user_id)["id"]
    response = client.delete(trash_url(user_id), headers=auth(user_id))
    assert response.status_code == 204
    assert live_ids(client, auth, user_id) == [live]


# --- Automatic purge ------------------------------------------------------------------------------------


def test_housekeeping_keeps_trash_younger_than_the_retention_and_purges_it_once_older(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    engine = server.app.state.database.engine
    trashed = [make_task(user_id, f"Trashed {number}")["id"] for number in range(2)]
    live = make_task(user_id, "Live")["id"]
    for task_id in trashed:
        trash_task(client, auth, user_id, task_id)
    now = utc_now()

    clean_up(engine, RETENTION_DAYS, now=now + timedelta(days=RETENTION_DAYS - 1))
    assert sorted(trash_ids(client, auth, user_id)) == trashed  # 29 days in the trash: kept

    removed = clean_up(engine, RETENTION_DAYS, now=now + timedelta(days=RETENTION_DAYS + 1))
    assert removed["tasks"] >= len(trashed)
    assert trash_ids(client, auth, user_id) == []
    assert live_ids(client, auth, user_id) == [live]
    assert read_task(client, auth, user_id, live)["version"] == 1
    for task_id in trashed:
        restore = client.post(trash_url(user_id, task_id, "/restore"), headers=auth(user_id))
        assert json_of(restore, 404) == TASK_NOT_FOUND


def test_one_housekeeping_round_purges_old_trash_and_keeps_recent_trash(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    engine = server.app.state.database.engine
    old, recent, live = (make_task(user_id, title)["id"] for title in ("Old", "Recent", "Live"))
    for task_id in (old, recent):
        trash_task(client, auth, user_id, task_id)
    # The old task went to the trash two days before the recent one (the database's own row, set directly).
    with engine.begin() as connection:
        connection.execute(update(tasks).where(tasks.c.id == old).values(deleted_at=utc_now() - timedelta(days=2)))

    clean_up(engine, RETENTION_DAYS, now=utc_now() + timedelta(days=RETENTION_DAYS - 1))
    assert trash_ids(client, auth, user_id) == [recent]
    assert live_ids(client, auth, user_id) == [live]


def test_the_service_keeps_house_by_itself_every_interval(
    serve: Callable[..., "LiveServer"],
    database_url: str,
    jwks_server: "JwksServer",
    auth: Auth,
    user_id: str,
) -> None:
    """No one calls `clean_up` here: the app's own background round purges trash older than the retention."""
    app = create_app(make_settings(database_url, jwks_server, trash_retention_days=1, housekeeping_interval_seconds=1))
    with serve(app) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        old, recent = (
            json_of(http.post(tasks_url(user_id), json={"title": t}, headers=auth(user_id)), 201)["id"]
            for t in ("Old", "Recent")
        )
        for task_id in (old, recent):
            assert http.delete(tasks_url(user_id, task_id), headers=auth(user_id)).status_code == 204
        with app.state.database.engine.begin() as connection:
            connection.execute(update(tasks).where(tasks.c.id == old).values(deleted_at=utc_now() - timedelta(days=2)))
        deadline = time.monotonic() + 60  # generous: a round runs every second
        while trash_ids(http, auth, user_id) != [recent] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert trash_ids(http, auth, user_id) == [recent]
