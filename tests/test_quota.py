"""The task quota: a user holds at most MAX_TASKS_PER_USER live tasks; a create or restore beyond it is a `409`
(`task_quota_exceeded`), the trash does not count, concurrent creates never overshoot, and `0` means no quota.

Sections follow the contract's "Fair use (v2)" and "Trash (v2)". The quota is small (3) on an app of its own,
served over real HTTP, on SQLite and, when TEST_DATABASE_URL is set, on PostgreSQL.
"""

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import bindparam, text

from main import create_app
from models import UTCDateTime, utc_now
from tests.conftest import make_settings

if TYPE_CHECKING:
    from tests.conftest import LiveServer
    from tests.keys import JwksServer

Auth = Callable[[str], dict[str, str]]

QUOTA = 3
DEFAULT_QUOTA = 10_000
QUOTA_EXCEEDED = "task_quota_exceeded"
RACERS = 20
# Tasks for one user, numbered 1 to :count, in one statement (both databases take a recursive WITH before INSERT).
BULK_CREATE = text(
    "WITH RECURSIVE numbers(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM numbers WHERE n < :count)"
    " INSERT INTO tasks (user_id, title, completed, created_at, updated_at)"
    " SELECT :owner, 'Bulk ' || CAST(n AS VARCHAR(10)), false, :now, :now FROM numbers"
).bindparams(bindparam("now", type_=UTCDateTime()))


def tasks_url(user_id: str, task_id: int | None = None) -> str:
    """The URL of a user's tasks, or of one of them."""
    return f"/api/{user_id}/tasks" + (f"/{task_id}" if task_id is not None else "")


def trash_url(user_id: str, task_id: int | None = None, suffix: str = "") -> str:
    """The URL of a user's trash, or of one task in it."""
    return f"/api/{user_id}/trash" + (f"/{task_id}" if task_id is not None else "") + suffix


def json_of(response: httpx.Response, status: int) -> Any:
    """The JSON body of a response that must have `status`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def assert_quota_exceeded(response: httpx.Response) -> None:
    """The answer to a create or restore past the quota."""
    body = json_of(response, 409)
    assert body["code"] == QUOTA_EXCEEDED
    assert isinstance(body["detail"], str) and body["detail"]


def serve_with(
    serve: Callable[..., "LiveServer"], database_url: str, jwks_server: "JwksServer", max_tasks_per_user: int
) -> Iterator["LiveServer"]:
    """An app with MAX_TASKS_PER_USER set, served over real HTTP."""
    settings = make_settings(database_url, jwks_server, max_tasks_per_user=max_tasks_per_user)
    with serve(create_app(settings)) as live:
        yield live


@pytest.fixture(scope="module")
def quota_server(
    serve: Callable[..., "LiveServer"], database_url: str, jwks_server: "JwksServer"
) -> Iterator["LiveServer"]:
    """The app with a quota of QUOTA live tasks per user."""
    yield from serve_with(serve, database_url, jwks_server, QUOTA)


@pytest.fixture(scope="module")
def unlimited_server(
    serve: Callable[..., "LiveServer"], database_url: str, jwks_server: "JwksServer"
) -> Iterator["LiveServer"]:
    """The app with MAX_TASKS_PER_USER=0: no quota."""
    yield from serve_with(serve, database_url, jwks_server, 0)


@pytest.fixture
def quota_client(quota_server: "LiveServer") -> Iterator[httpx.Client]:
    """An HTTP client for the app with the quota."""
    with httpx.Client(base_url=quota_server.url, timeout=30) as http:
        yield http


def create(client: httpx.Client, auth: Auth, user_id: str, title: str = "A task") -> httpx.Response:
    """Send a create of one task."""
    return client.post(tasks_url(user_id), json={"title": title}, headers=auth(user_id))


def created(client: httpx.Client, auth: Auth, user_id: str, title: str = "A task") -> int:
    """Create a task that must be accepted; its id."""
    return json_of(create(client, auth, user_id, title), 201)["id"]


def trash(client: httpx.Client, auth: Auth, user_id: str, task_id: int) -> None:
    """Move a task to the trash."""
    assert client.delete(tasks_url(user_id, task_id), headers=auth(user_id)).status_code == 204


def live_ids(client: httpx.Client, auth: Auth, user_id: str) -> list[int]:
    """The ids of the user's live tasks, lowest first, checked against `X-Total-Count`."""
    response = client.get(tasks_url(user_id), params={"limit": 500}, headers=auth(user_id))
    ids = sorted(task["id"] for task in json_of(response, 200))
    assert int(response.headers["x-total-count"]) == len(ids)
    return ids


def trash_of(client: httpx.Client, auth: Auth, user_id: str) -> list[dict[str, Any]]:
    """The user's trash."""
    return json_of(client.get(trash_url(user_id), params={"limit": 500}, headers=auth(user_id)), 200)


def in_threads(server: "LiveServer", count: int, work: Callable[[int, httpx.Client], httpx.Response]) -> list[int]:
    """`work(index, client)` in `count` threads started together, each with its own connection; the statuses."""
    start_together = threading.Barrier(count)

    def worker(index: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            start_together.wait(timeout=60)
            response = work(index, http)
            if response.status_code == 409:
                assert_quota_exceeded(response)
            return response

    with ThreadPoolExecutor(max_workers=count) as pool:
        return [response.status_code for response in pool.map(worker, range(count))]


# --- One at a time ---------------------------------------------------------------------------------------


def test_create_beyond_the_quota_is_409_and_creates_nothing(
    quota_client: httpx.Client, auth: Auth, user_id: str
) -> None:
    task_ids = [created(quota_client, auth, user_id, f"Task {number}") for number in range(QUOTA)]

    assert_quota_exceeded(create(quota_client, auth, user_id, "One too many"))
    assert_quota_exceeded(create(quota_client, auth, user_id, "Still too many"))
    assert live_ids(quota_client, auth, user_id) == task_ids
    assert trash_of(quota_client, auth, user_id) == []


def test_trashing_a_task_frees_a_place(quota_client: httpx.Client, auth: Auth, user_id: str) -> None:
    first, *others = (created(quota_client, auth, user_id, f"Task {number}") for number in range(QUOTA))
    trash(quota_client, auth, user_id, first)

    replacement = created(quota_client, auth, user_id, "In the freed place")
    assert_quota_exceeded(create(quota_client, auth, user_id, "No place left"))
    assert live_ids(quota_client, auth, user_id) == [*others, replacement]
    assert [task["id"] for task in trash_of(quota_client, auth, user_id)] == [first]


def test_tasks_in_the_trash_do_not_count(quota_client: httpx.Client, auth: Auth, user_id: str) -> None:
    trashed = [created(quota_client, auth, user_id, f"Old {number}") for number in range(QUOTA)]
    for task_id in trashed:
        trash(quota_client, auth, user_id, task_id)

    fresh = [created(quota_client, auth, user_id, f"New {number}") for number in range(QUOTA)]
    assert_quota_exceeded(create(quota_client, auth, user_id))
    assert live_ids(quota_client, auth, user_id) == fresh
    assert len(trash_of(quota_client, auth, user_id)) == QUOTA


def test_restore_when_full_is_409_and_the_task_stays_in_the_trash(
    quota_client: httpx.Client, auth: Auth, user_id: str
) -> None:
    trashed = created(quota_client, auth, user_id, "Waiting in the trash")
    trash(quota_client, auth, user_id, trashed)
    live = [created(quota_client, auth, user_id, f"Live {number}") for number in range(QUOTA)]
    [before] = trash_of(quota_client, auth, user_id)

    assert_quota_exceeded(quota_client.post(trash_url(user_id, trashed, "/restore"), headers=auth(user_id)))
    assert trash_of(quota_client, auth, user_id) == [before]  # unchanged: same version, same deleted_at
    assert live_ids(quota_client, auth, user_id) == live

    trash(quota_client, auth, user_id, live[0])
    restore = quota_client.post(trash_url(user_id, trashed, "/restore"), headers=auth(user_id))
    assert json_of(restore, 200)["version"] == before["version"] + 1
    assert live_ids(quota_client, auth, user_id) == [trashed, *live[1:]]


def test_deleting_for_good_a_task_in_the_trash_frees_no_place_it_did_not_hold(
    quota_client: httpx.Client, auth: Auth, user_id: str
) -> None:
    trashed = created(quota_client, auth, user_id, "Trashed")
    trash(quota_client, auth, user_id, trashed)
    live = [created(quota_client, auth, user_id, f"Live {number}") for number in range(QUOTA)]

    assert quota_client.delete(trash_url(user_id, trashed), headers=auth(user_id)).status_code == 204
    assert_quota_exceeded(create(quota_client, auth, user_id))
    assert live_ids(quota_client, auth, user_id) == live


def test_quota_is_per_user(quota_client: httpx.Client, auth: Auth, user_id: str, other_user_id: str) -> None:
    for number in range(QUOTA):
        created(quota_client, auth, user_id, f"Mine {number}")
    assert_quota_exceeded(create(quota_client, auth, user_id))

    theirs = [created(quota_client, auth, other_user_id, f"Theirs {number}") for number in range(QUOTA)]
    assert_quota_exceeded(create(quota_client, auth, other_user_id))
    assert live_ids(quota_client, auth, other_user_id) == theirs
    assert len(live_ids(quota_client, auth, user_id)) == QUOTA


# --- Concurrently ---------------------------------------------------------------------------------------------


def test_concurrent_creates_for_the_last_two_places_let_exactly_two_in(
    quota_server: "LiveServer", quota_client: httpx.Client, auth: Auth, user_id: str
) -> None:
    created(quota_client, auth, user_id, "Already there")
    headers = auth(user_id)

    statuses = in_threads(
        quota_server,
        RACERS,
        lambda index, http: http.post(tasks_url(user_id), json={"title": f"Racer {index}"}, headers=headers),
    )
    assert sorted(statuses) == [201] * (QUOTA - 1) + [409] * (RACERS - QUOTA + 1)
    assert len(live_ids(quota_client, auth, user_id)) == QUOTA


def test_concurrent_first_creates_of_a_new_user_let_exactly_the_quota_in(
    quota_server: "LiveServer", quota_client: httpx.Client, auth: Auth, user_id: str
) -> None:
    headers = auth(user_id)
    statuses = in_threads(
        quota_server,
        RACERS,
        lambda index, http: http.post(tasks_url(user_id), json={"title": f"Racer {index}"}, headers=headers),
    )
    assert sorted(statuses) == [201] * QUOTA + [409] * (RACERS - QUOTA)
    assert len(live_ids(quota_client, auth, user_id)) == QUOTA


def test_concurrent_creates_and_restores_for_the_last_place_let_exactly_one_in(
    quota_server: "LiveServer", quota_client: httpx.Client, auth: Auth, user_id: str
) -> None:
    trashed = []
    for number in range(RACERS // 2):
        trashed.append(created(quota_client, auth, user_id, f"Trashed {number}"))
        trash(quota_client, auth, user_id, trashed[-1])
    for number in range(QUOTA - 1):
        created(quota_client, auth, user_id, f"Live {number}")
    headers = auth(user_id)

    def create_or_restore(index: int, http: httpx.Client) -> httpx.Response:
        if index % 2:
            return http.post(trash_url(user_id, trashed[index // 2], "/restore"), headers=headers)
        return http.post(tasks_url(user_id), json={"title": f"Racer {index}"}, headers=headers)

    statuses = in_threads(quota_server, RACERS, create_or_restore)
    successes = [status for status in statuses if status in (200, 201)]
    assert len(successes) == 1, statuses
    assert sorted(set(statuses) - {200, 201}) == [409]
    assert len(live_ids(quota_client, auth, user_id)) == QUOTA
    restored = 1 if successes == [200] else 0
    assert len(trash_of(quota_client, auth, user_id)) == len(trashed) - restored


# --- No quota ------------------------------------------------------------------------------------------------


def test_max_tasks_per_user_zero_means_no_quota(
    unlimited_server: "LiveServer", client: httpx.Client, auth: Auth, user_id: str
) -> None:
    # The user already holds the default quota's worth of live tasks (written straight to the database).
    with unlimited_server.app.state.database.engine.begin() as connection:
        connection.execute(BULK_CREATE, {"owner": user_id, "count": DEFAULT_QUOTA, "now": utc_now()})

    # The main app, with the default quota, refuses another; the one with MAX_TASKS_PER_USER=0 does not.
    assert_quota_exceeded(create(client, auth, user_id, "Past the default quota"))
    with httpx.Client(base_url=unlimited_server.url, timeout=30) as unlimited:
        beyond = [created(unlimited, auth, user_id, f"Beyond {number}") for number in range(QUOTA + 2)]
        response = unlimited.get(tasks_url(user_id), params={"limit": 1}, headers=auth(user_id))
    assert json_of(response, 200)[0]["id"] == beyond[-1]
    assert response.headers["x-total-count"] == str(DEFAULT_QUOTA + QUOTA + 2)
