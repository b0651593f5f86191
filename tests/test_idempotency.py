"""Idempotent retries, as the contract's "Idempotent retries (v2)" promises them.

`POST /tasks` and `PATCH /tasks/{id}/complete` sent again with the same `Idempotency-Key`, method,
path and body get the first response again (with `Idempotent-Replayed: true`) and change nothing;
the same key for another request is a 422; keys are per user, checked for their form, forgotten
when they expire, and never remembered for a failed request. Under concurrency, and across two
instances sharing one database, exactly one request does the work: the others get its response or a
409, and the remembered keys always match the changes made, also when the database connection is
cut between the task and its key or around the commit (PostgreSQL, through a proxy the test cuts).

Every test runs against the real app over real HTTP, on SQLite and, when TEST_DATABASE_URL is set,
on PostgreSQL; the database is read directly only to check what is remembered.
"""

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, func, select, text, update
from sqlalchemy.engine import make_url

from housekeeping import clean_up
from idempotency import IDEMPOTENCY_LOCK_CLASS, Retryable, lock_key
from main import create_app
from models import IdempotencyKey, utc_now
from settings import Settings
from tests.conftest import FRONTEND_ORIGIN, make_settings
from tests.keys import JwksServer
from tests.tcp_proxy import TcpProxy
from tests.test_concurrency import describe, run_in_threads

if TYPE_CHECKING:
    from tests.conftest import LiveServer

Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]

keys = IdempotencyKey.__table__
TASK_NOT_FOUND = {"detail": "Task not found", "code": "task_not_found"}
# Headers a replay repeats from the first response.
REPEATED_HEADERS = ("content-type", "location", "etag", "cache-control")
RACERS = 20
RACE_ROUNDS = 6


def tasks_url(user_id: str, task_id: int | None = None, suffix: str = "") -> str:
    """The URL of a user's tasks, or of one of them."""
    return f"/api/{user_id}/tasks" + (f"/{task_id}" if task_id is not None else "") + suffix


def new_key() -> str:
    """A fresh Idempotency-Key, as a client would make one."""
    return str(uuid.uuid4())


def with_key(auth: Auth, user_id: str, key: str | bytes) -> dict[str, Any]:
    """The user's Authorization header and an Idempotency-Key."""
    return auth(user_id) | {"Idempotency-Key": key}


def json_of(response: httpx.Response, status_code: int) -> Any:
    """The JSON body of a response that must have `status_code`."""
    assert response.status_code == status_code, describe(response)
    return response.json()


def stored_tasks(client: httpx.Client, auth: Auth, user_id: str) -> list[dict[str, Any]]:
    """Every live task of the user, oldest first (fewer than 500 in these tests)."""
    response = client.get(tasks_url(user_id), params={"limit": 500, "order": "asc"}, headers=auth(user_id))
    assert response.status_code == 200, response.text
    assert int(response.headers["x-total-count"]) == len(response.json())
    return response.json()


def read_task(client: httpx.Client, auth: Auth, user_id: str, task_id: int) -> dict[str, Any]:
    """The task as stored now (it must be live)."""
    response = client.get(tasks_url(user_id, task_id), headers=auth(user_id))
    assert response.status_code == 200, response.text
    return response.json()


def remembered_keys(engine: Engine, user_id: str) -> int:
    """How many Idempotency-Keys the database remembers for the user."""
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(keys).where(keys.c.user_id == user_id)).scalar_one()


def assert_replay_of(replay: httpx.Response, first: httpx.Response) -> None:
    """`replay` is `first` again, marked as a replay: same status, body and headers that describe it."""
    assert "idempotent-replayed" not in first.headers
    assert replay.headers.get("idempotent-replayed") == "true", describe(replay)
    assert replay.status_code == first.status_code
    assert replay.content == first.content
    for name in REPEATED_HEADERS:
        assert replay.headers.get(name) == first.headers.get(name), name


def assert_reused(response: httpx.Response) -> None:
    """`response` is the 422 for a key sent again with another request."""
    assert response.status_code == 422, describe(response)
    assert response.json()["code"] == "idempotency_key_reused"
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert all({"loc", "msg", "type"} <= issue.keys() for issue in detail)
    assert "idempotent-replayed" not in response.headers


@pytest.fixture
def engine(server: "LiveServer") -> Engine:
    """The main test app's database engine, to look at what is remembered."""
    return server.app.state.database.engine


# --- A repeat gets the first response ------------------------------------------------------------


def test_a_repeated_create_gets_the_first_response_and_creates_nothing(
    client: httpx.Client, auth: Auth, user_id: str, engine: Engine
) -> None:
    headers = with_key(auth, user_id, new_key())
    body = {"title": "Buy milk", "tags": ["groceries"], "priority": "high"}
    first = client.post(tasks_url(user_id), json=body, headers=headers)
    assert first.status_code == 201, first.text
    assert first.headers["location"].endswith(tasks_url(user_id, first.json()["id"]))
    assert first.headers["etag"] == '"1"'

    for _ in range(3):
        assert_replay_of(client.post(tasks_url(user_id), json=body, headers=headers), first)
    assert stored_tasks(client, auth, user_id) == [first.json()]
    assert remembered_keys(engine, user_id) == 1


def test_a_create_replayed_after_the_task_changed_is_still_the_first_response_and_undoes_nothing(
    client: httpx.Client, auth: Auth, user_id: str
) -> None:
    headers = with_key(auth, user_id, new_key())
    first = client.post(tasks_url(user_id), json={"title": "Draft"}, headers=headers)
    task_id = first.json()["id"]
    changed = client.patch(tasks_url(user_id, task_id), json={"title": "Final"}, headers=auth(user_id)).json()

    assert_replay_of(client.post(tasks_url(user_id), json={"title": "Draft"}, headers=headers), first)
    assert stored_tasks(client, auth, user_id) == [changed]


def test_a_retried_toggle_does_not_toggle_twice(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    url = tasks_url(user_id, task["id"], "/complete")
    headers = with_key(auth, user_id, new_key())
    first = client.patch(url, headers=headers)
    assert first.status_code == 200, first.text
    assert (first.json()["completed"], first.json()["version"]) == (True, 2)
    assert first.headers["etag"] == '"2"'

    for _ in range(3):
        assert_replay_of(client.patch(url, headers=headers), first)
    assert read_task(client, auth, user_id, task["id"]) == first.json()

    # Toggled back without a key: a late retry of the first toggle still changes nothing.
    back = client.patch(url, headers=auth(user_id)).json()
    assert_replay_of(client.patch(url, headers=headers), first)
    assert read_task(client, auth, user_id, task["id"]) == back
    assert back["completed"] is False


def test_a_retried_set_completed_is_replayed(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    url = tasks_url(user_id, task["id"], "/complete")
    headers = with_key(auth, user_id, new_key())
    first = client.patch(url, json={"completed": True}, headers=headers)
    assert first.status_code == 200
    client.patch(url, json={"completed": False}, headers=auth(user_id))

    assert_replay_of(client.patch(url, json={"completed": True}, headers=headers), first)
    stored = read_task(client, auth, user_id, task["id"])
    assert (stored["completed"], stored["version"]) == (False, 3)


def test_a_response_is_remembered_for_the_configured_time(
    client: httpx.Client, auth: Auth, user_id: str, engine: Engine, settings: Settings
) -> None:
    before = utc_now()
    client.post(tasks_url(user_id), json={"title": "Remembered"}, headers=with_key(auth, user_id, new_key()))
    after = utc_now()
    with engine.connect() as connection:
        expires_at = connection.execute(select(keys.c.expires_at).where(keys.c.user_id == user_id)).scalar_one()
    ttl = timedelta(seconds=settings.idempotency_ttl_seconds)
    assert before + ttl <= expires_at <= after + ttl


def test_a_browser_may_read_that_a_response_was_replayed(client: httpx.Client, auth: Auth, user_id: str) -> None:
    headers = with_key(auth, user_id, new_key()) | {"Origin": FRONTEND_ORIGIN}
    client.post(tasks_url(user_id), json={"title": "From a browser"}, headers=headers)
    replay = client.post(tasks_url(user_id), json={"title": "From a browser"}, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["access-control-allow-origin"] == FRONTEND_ORIGIN
    exposed = {name.strip().lower() for name in replay.headers["access-control-expose-headers"].split(",")}
    assert {"idempotent-replayed", "etag", "location"} <= exposed


# --- A key sent again with another request ---------------------------------------------------------


def test_a_key_sent_again_with_another_body_is_422_and_creates_nothing(
    client: httpx.Client, auth: Auth, user_id: str
) -> None:
    headers = with_key(auth, user_id, new_key())
    first = client.post(tasks_url(user_id), json={"title": "First"}, headers=headers)
    for other_body in ({"title": "Second"}, {"title": "First", "priority": "high"}, {"title": "First "}):
        assert_reused(client.post(tasks_url(user_id), json=other_body, headers=headers))
    assert stored_tasks(client, auth, user_id) == [first.json()]


def test_a_key_sent_again_to_another_path_or_with_another_method_is_422_and_changes_nothing(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    key = new_key()
    created = client.post(tasks_url(user_id), json={"title": "Created"}, headers=with_key(auth, user_id, key))
    task_id = created.json()["id"]
    # The create's key on a toggle (another method and path).
    assert_reused(client.patch(tasks_url(user_id, task_id, "/complete"), headers=with_key(auth, user_id, key)))
    # A toggle's key on another task's toggle, and on the same toggle with a body.
    other = make_task(user_id, "Other")
    toggle_key = new_key()
    client.patch(tasks_url(user_id, task_id, "/complete"), headers=with_key(auth, user_id, toggle_key))
    assert_reused(
        client.patch(tasks_url(user_id, other["id"], "/complete"), headers=with_key(auth, user_id, toggle_key))
    )
    assert_reused(
        client.patch(
            tasks_url(user_id, task_id, "/complete"),
            json={"completed": False},
            headers=with_key(auth, user_id, toggle_key),
        )
    )

    assert read_task(client, auth, user_id, other["id"]) == other
    stored = read_task(client, auth, user_id, task_id)
    assert (stored["completed"], stored["version"]) == (True, 2)


def test_the_same_key_of_two_users_is_two_keys(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str
) -> None:
    key = new_key()
    mine = client.post(tasks_url(user_id), json={"title": "Mine"}, headers=with_key(auth, user_id, key))
    theirs = client.post(tasks_url(other_user_id), json={"title": "Theirs"}, headers=with_key(auth, other_user_id, key))
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert "idempotent-replayed" not in theirs.headers
    assert_replay_of(
        client.post(tasks_url(user_id), json={"title": "Mine"}, headers=with_key(auth, user_id, key)), mine
    )
    assert_replay_of(
        client.post(tasks_url(other_user_id), json={"title": "Theirs"}, headers=with_key(auth, other_user_id, key)),
        theirs,
    )
    assert stored_tasks(client, auth, user_id) == [mine.json()]
    assert stored_tasks(client, auth, other_user_id) == [theirs.json()]


# --- The key's form -------------------------------------------------------------------------------------

INVALID_KEYS = [
    pytest.param("", id="empty"),
    pytest.param("two words", id="space"),
    pytest.param("tab\there", id="tab"),
    pytest.param("k" * 256, id="256-characters"),
    pytest.param("clé".encode(), id="non-ascii-utf8"),
    pytest.param("clé".encode("latin-1"), id="non-ascii-latin1"),
]
VALID_KEYS = [
    pytest.param("k" * 255, id="255-characters"),
    pytest.param("!", id="exclamation"),
    pytest.param("~", id="tilde"),
    pytest.param("".join(chr(code) for code in range(0x21, 0x7F)), id="every-visible-ascii"),
    pytest.param(str(uuid.UUID(int=1)), id="uuid"),
]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_an_invalid_key_is_422_and_nothing_is_created_or_toggled(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, engine: Engine, key: str | bytes
) -> None:
    task = make_task(user_id)
    for method, url, body in (
        ("POST", tasks_url(user_id), {"title": "Not created"}),
        ("PATCH", tasks_url(user_id, task["id"], "/complete"), None),
    ):
        response = client.request(method, url, json=body, headers=with_key(auth, user_id, key))
        assert response.status_code == 422, describe(response)
        assert response.json()["code"] == "validation_error"
        assert any(issue["loc"] == ["header", "Idempotency-Key"] for issue in response.json()["detail"])
    assert stored_tasks(client, auth, user_id) == [task]
    assert remembered_keys(engine, user_id) == 0


@pytest.mark.parametrize("key", VALID_KEYS)
def test_a_key_of_visible_ascii_up_to_255_characters_is_accepted(
    client: httpx.Client, auth: Auth, user_id: str, key: str
) -> None:
    headers = with_key(auth, user_id, key)
    first = client.post(tasks_url(user_id), json={"title": "Keyed"}, headers=headers)
    assert first.status_code == 201, describe(first)
    assert_replay_of(client.post(tasks_url(user_id), json={"title": "Keyed"}, headers=headers), first)


# --- Failed requests are not remembered ---------------------------------------------------------------


def test_a_create_that_failed_is_not_remembered_and_its_key_works_afterwards(
    client: httpx.Client, auth: Auth, user_id: str, engine: Engine
) -> None:
    headers = with_key(auth, user_id, new_key())
    for invalid in ({"title": ""}, {"title": "x" * 201}, {"title": "Bad", "priority": None}, {"title": "NUL \x00"}):
        failed = client.post(tasks_url(user_id), json=invalid, headers=headers)
        assert failed.status_code == 422, describe(failed)
        assert failed.json()["code"] == "validation_error"
    assert remembered_keys(engine, user_id) == 0

    created = client.post(tasks_url(user_id), json={"title": "Valid"}, headers=headers)
    assert created.status_code == 201
    assert "idempotent-replayed" not in created.headers
    assert_replay_of(client.post(tasks_url(user_id), json={"title": "Valid"}, headers=headers), created)
    assert stored_tasks(client, auth, user_id) == [created.json()]


def test_a_toggle_that_failed_is_not_remembered_and_its_key_works_afterwards(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask, engine: Engine
) -> None:
    task = make_task(user_id)
    others = make_task(other_user_id)
    key = new_key()
    failures = [
        (tasks_url(user_id, 2_000_000_000, "/complete"), {}, 404),
        (tasks_url(user_id, others["id"], "/complete"), {}, 404),
        (tasks_url(user_id, task["id"], "/complete"), {"If-Match": '"7"'}, 412),
    ]
    for url, extra_headers, expected in failures:
        failed = client.patch(url, headers=with_key(auth, user_id, key) | extra_headers)
        assert failed.status_code == expected, describe(failed)
    assert remembered_keys(engine, user_id) == 0
    assert read_task(client, auth, user_id, task["id"]) == task
    assert read_task(client, auth, other_user_id, others["id"]) == others

    url = tasks_url(user_id, task["id"], "/complete")
    toggled = client.patch(url, headers=with_key(auth, user_id, key))
    assert toggled.status_code == 200
    assert "idempotent-replayed" not in toggled.headers
    assert toggled.json()["completed"] is True
    assert_replay_of(client.patch(url, headers=with_key(auth, user_id, key)), toggled)


def test_a_toggle_of_a_task_in_the_trash_is_404_and_not_remembered(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, engine: Engine
) -> None:
    task = make_task(user_id)
    client.delete(tasks_url(user_id, task["id"]), headers=auth(user_id))
    headers = with_key(auth, user_id, new_key())
    url = tasks_url(user_id, task["id"], "/complete")
    gone = client.patch(url, headers=headers)
    assert gone.status_code == 404 and gone.json() == TASK_NOT_FOUND

    client.post(f"/api/{user_id}/trash/{task['id']}/restore", headers=auth(user_id))
    toggled = client.patch(url, headers=headers)
    assert toggled.status_code == 200 and "idempotent-replayed" not in toggled.headers
    assert toggled.json()["completed"] is True
    assert remembered_keys(engine, user_id) == 1


def test_a_create_refused_by_the_quota_is_not_remembered(
    auth: Auth, user_id: str, database_url: str, jwks_server: JwksServer, serve: Callable[..., "LiveServer"]
) -> None:
    with (
        serve(create_app(make_settings(database_url, jwks_server, max_tasks_per_user=1))) as limited,
        httpx.Client(base_url=limited.url, timeout=30) as http,
    ):
        first = http.post(tasks_url(user_id), json={"title": "The one allowed"}, headers=auth(user_id))
        headers = with_key(auth, user_id, new_key())
        full = http.post(tasks_url(user_id), json={"title": "One too many"}, headers=headers)
        assert full.status_code == 409, describe(full)
        assert full.json()["code"] == "task_quota_exceeded"

        assert http.delete(tasks_url(user_id, first.json()["id"]), headers=auth(user_id)).status_code == 204
        created = http.post(tasks_url(user_id), json={"title": "One too many"}, headers=headers)
        assert created.status_code == 201, describe(created)
        assert "idempotent-replayed" not in created.headers


# --- Keys expire ------------------------------------------------------------------------------------------


def expire_keys(engine: Engine, user_id: str) -> None:
    """Make every key the user's remembered responses expired, as if their time had passed."""
    with engine.begin() as connection:
        connection.execute(
            update(keys).where(keys.c.user_id == user_id).values(expires_at=utc_now() - timedelta(seconds=1))
        )


def test_an_expired_key_makes_a_new_task_and_is_remembered_again(
    client: httpx.Client, auth: Auth, user_id: str, engine: Engine
) -> None:
    headers = with_key(auth, user_id, new_key())
    first = client.post(tasks_url(user_id), json={"title": "Again"}, headers=headers)
    expire_keys(engine, user_id)

    second = client.post(tasks_url(user_id), json={"title": "Again"}, headers=headers)
    assert second.status_code == 201
    assert "idempotent-replayed" not in second.headers
    assert second.json()["id"] != first.json()["id"]
    assert_replay_of(client.post(tasks_url(user_id), json={"title": "Again"}, headers=headers), second)
    assert [task["id"] for task in stored_tasks(client, auth, user_id)] == [first.json()["id"], second.json()["id"]]
    assert remembered_keys(engine, user_id) == 1


def test_an_expired_key_may_be_used_for_another_request(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, engine: Engine
) -> None:
    key = new_key()
    client.post(tasks_url(user_id), json={"title": "First use"}, headers=with_key(auth, user_id, key))
    expire_keys(engine, user_id)
    task = stored_tasks(client, auth, user_id)[0]

    toggled = client.patch(tasks_url(user_id, task["id"], "/complete"), headers=with_key(auth, user_id, key))
    assert toggled.status_code == 200, describe(toggled)
    assert "idempotent-replayed" not in toggled.headers
    assert toggled.json()["completed"] is True
    assert_reused(client.post(tasks_url(user_id), json={"title": "First use"}, headers=with_key(auth, user_id, key)))


def test_housekeeping_forgets_expired_keys_and_the_key_then_creates_anew(
    client: httpx.Client, auth: Auth, user_id: str, engine: Engine, settings: Settings
) -> None:
    headers = with_key(auth, user_id, new_key())
    first = client.post(tasks_url(user_id), json={"title": "Remembered a while"}, headers=headers)

    not_yet = utc_now() + timedelta(seconds=settings.idempotency_ttl_seconds - 60)
    clean_up(engine, settings.trash_retention_days, now=not_yet)
    assert remembered_keys(engine, user_id) == 1
    assert_replay_of(client.post(tasks_url(user_id), json={"title": "Remembered a while"}, headers=headers), first)

    past_it = utc_now() + timedelta(seconds=settings.idempotency_ttl_seconds + 60)
    assert clean_up(engine, settings.trash_retention_days, now=past_it)["idempotency_keys"] >= 1
    assert remembered_keys(engine, user_id) == 0
    again = client.post(tasks_url(user_id), json={"title": "Remembered a while"}, headers=headers)
    assert again.status_code == 201 and "idempotent-replayed" not in again.headers
    assert len(stored_tasks(client, auth, user_id)) == 2


# --- Concurrent repeats --------------------------------------------------------------------------------------


def assert_one_did_the_work(answers: list[httpx.Response], status_code: int) -> httpx.Response:
    """Of concurrent repeats, one answered first-hand and every other one replayed it or was a 409; that one."""
    done = [answer for answer in answers if answer.status_code == status_code]
    originals = [answer for answer in done if "idempotent-replayed" not in answer.headers]
    assert len(originals) == 1, [describe(answer) for answer in answers]
    for answer in done:
        if answer is not originals[0]:
            assert_replay_of(answer, originals[0])
    for answer in answers:
        if answer.status_code != status_code:
            assert answer.status_code == 409, describe(answer)
            assert answer.json()["code"] == "idempotency_key_in_use"
            assert int(answer.headers["retry-after"]) >= 1
    return originals[0]


def race_with_one_key(
    server: "LiveServer",
    auth: Auth,
    user_id: str,
    request: Callable[[int], tuple[str, str, dict[str, Any] | None]],
    other_server: "LiveServer | None" = None,
) -> list[list[httpx.Response]]:
    """RACERS clients send round `n`'s `request(n)` (method, path, body) together, with that round's key.

    With `other_server`, every other client sends to it instead: two instances sharing the database.
    """
    round_keys = [new_key() for _ in range(RACE_ROUNDS)]
    round_start = threading.Barrier(RACERS)

    def racer(index: int, http: httpx.Client) -> list[httpx.Response]:
        base = other_server.url if other_server is not None and index % 2 else server.url
        answers = []
        for number, key in enumerate(round_keys):
            method, path, body = request(number)
            round_start.wait(timeout=60)
            answers.append(http.request(method, base + path, json=body, headers=with_key(auth, user_id, key)))
        return answers

    by_racer = run_in_threads(server, RACERS, racer)
    return [[answers[number] for answers in by_racer] for number in range(RACE_ROUNDS)]


def assert_concurrent_creates_made_one_task_each(
    client: httpx.Client, auth: Auth, user_id: str, engine: Engine, rounds: list[list[httpx.Response]]
) -> None:
    """Each round of same-key creates made exactly one task, and exactly one key is remembered for each."""
    created = [assert_one_did_the_work(answers, 201).json() for answers in rounds]
    assert stored_tasks(client, auth, user_id) == created
    assert remembered_keys(engine, user_id) == len(created)


def test_concurrent_creates_with_one_key_make_one_task(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, engine: Engine
) -> None:
    rounds = race_with_one_key(
        server, auth, user_id, lambda number: ("POST", tasks_url(user_id), {"title": f"Round {number}"})
    )
    assert_concurrent_creates_made_one_task_each(client, auth, user_id, engine, rounds)


def test_concurrent_toggles_with_one_key_flip_the_task_once(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, make_task: MakeTask, engine: Engine
) -> None:
    task_ids = [make_task(user_id, f"Round {number}")["id"] for number in range(RACE_ROUNDS)]
    rounds = race_with_one_key(
        server, auth, user_id, lambda number: ("PATCH", tasks_url(user_id, task_ids[number], "/complete"), None)
    )
    for task_id, answers in zip(task_ids, rounds, strict=True):
        toggled = assert_one_did_the_work(answers, 200).json()
        assert (toggled["completed"], toggled["version"]) == (True, 2)
        assert read_task(client, auth, user_id, task_id) == toggled
    assert remembered_keys(engine, user_id) == RACE_ROUNDS


@pytest.fixture
def second_instance(
    database_url: str, jwks_server: JwksServer, serve: Callable[..., "LiveServer"]
) -> Iterator["LiveServer"]:
    """Another instance of the service on the same database, sharing nothing else with the main one."""
    with serve(create_app(make_settings(database_url, jwks_server))) as live:
        yield live


def test_two_instances_racing_one_key_make_one_task(
    client: httpx.Client,
    server: "LiveServer",
    second_instance: "LiveServer",
    auth: Auth,
    user_id: str,
    engine: Engine,
) -> None:
    rounds = race_with_one_key(
        server,
        auth,
        user_id,
        lambda number: ("POST", tasks_url(user_id), {"title": f"Round {number}"}),
        other_server=second_instance,
    )
    assert_concurrent_creates_made_one_task_each(client, auth, user_id, engine, rounds)


def test_two_instances_racing_one_toggle_key_flip_the_task_once(
    client: httpx.Client,
    server: "LiveServer",
    second_instance: "LiveServer",
    auth: Auth,
    user_id: str,
    make_task: MakeTask,
) -> None:
    task_ids = [make_task(user_id, f"Round {number}")["id"] for number in range(RACE_ROUNDS)]
    rounds = race_with_one_key(
        server,
        auth,
        user_id,
        lambda number: ("PATCH", tasks_url(user_id, task_ids[number], "/complete"), None),
        other_server=second_instance,
    )
    for task_id, answers in zip(task_ids, rounds, strict=True):
        toggled = assert_one_did_the_work(answers, 200).json()
        assert read_task(client, auth, user_id, task_id) == toggled
        assert toggled["version"] == 2


@pytest.mark.postgresql_only
def test_a_repeat_while_the_first_is_in_progress_is_409_with_retry_after(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, engine: Engine
) -> None:
    task = make_task(user_id)
    key = new_key()
    headers = with_key(auth, user_id, key)
    lock = {"lock_class": IDEMPOTENCY_LOCK_CLASS, "lock_key": lock_key(Retryable(user_id, key, ""))}
    # The test holds the key's claim (a session-level lock on the same advisory key), as the first
    # request does while it is being processed.
    with engine.connect() as connection:
        assert connection.execute(text("SELECT pg_try_advisory_lock(:lock_class, :lock_key)"), lock).scalar_one()
        try:
            busy = client.post(tasks_url(user_id), json={"title": "Wait"}, headers=headers)
            toggle = client.patch(tasks_url(user_id, task["id"], "/complete"), headers=headers)
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:lock_class, :lock_key)"), lock)
    for answer in (busy, toggle):
        assert answer.status_code == 409, describe(answer)
        assert answer.json()["code"] == "idempotency_key_in_use"
        assert int(answer.headers["retry-after"]) >= 1
    assert stored_tasks(client, auth, user_id) == [task]
    assert remembered_keys(engine, user_id) == 0

    created = client.post(tasks_url(user_id), json={"title": "Wait"}, headers=headers)
    assert created.status_code == 201 and "idempotent-replayed" not in created.headers


@pytest.mark.postgresql_only
def test_a_key_in_use_is_409_only_for_a_request_that_would_otherwise_succeed(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, engine: Engine
) -> None:
    """A toggle of a missing or trashed task is its 404, and one with a stale If-Match its 412, key in use or not."""
    task, trashed = make_task(user_id), make_task(user_id)
    assert client.delete(tasks_url(user_id, trashed["id"]), headers=auth(user_id)).status_code == 204
    key = new_key()
    headers = with_key(auth, user_id, key)
    lock = {"lock_class": IDEMPOTENCY_LOCK_CLASS, "lock_key": lock_key(Retryable(user_id, key, ""))}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT pg_try_advisory_lock(:lock_class, :lock_key)"), lock).scalar_one()
        try:
            missing = client.patch(tasks_url(user_id, 10**15, "/complete"), headers=headers)
            in_trash = client.patch(tasks_url(user_id, trashed["id"], "/complete"), headers=headers)
            stale = client.patch(tasks_url(user_id, task["id"], "/complete"), headers=headers | {"If-Match": '"7"'})
            current = client.patch(tasks_url(user_id, task["id"], "/complete"), headers=headers | {"If-Match": '"1"'})
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:lock_class, :lock_key)"), lock)
    assert json_of(missing, 404) == TASK_NOT_FOUND
    assert json_of(in_trash, 404) == TASK_NOT_FOUND
    assert json_of(stale, 412)["code"] == "precondition_failed" and stale.headers["etag"] == '"1"'
    assert json_of(current, 409)["code"] == "idempotency_key_in_use"
    assert stored_tasks(client, auth, user_id) == [task]


# --- Never a change without its key ---------------------------------------------------------------------------


@contextmanager
def refusing_keys_of(engine: Engine, user_id: str) -> Iterator[None]:
    """While the block runs, the database refuses to remember any key of `user_id` (the rest works as usual)."""
    name = f"refuse_keys_{uuid.uuid4().hex[:12]}"
    assert all(character.isalnum() or character == "-" for character in user_id)  # safe to write into the DDL
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(
                f"ALTER TABLE idempotency_keys ADD CONSTRAINT {name} CHECK (user_id <> '{user_id}') NOT VALID"
            )
        else:
            connection.exec_driver_sql(
                f"CREATE TRIGGER {name} BEFORE INSERT ON idempotency_keys WHEN NEW.user_id = '{user_id}' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
    try:
        yield
    finally:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"ALTER TABLE idempotency_keys DROP CONSTRAINT {name}")
            else:
                connection.exec_driver_sql(f"DROP TRIGGER {name}")


def test_a_create_whose_key_cannot_be_remembered_leaves_no_task(
    client: httpx.Client, auth: Auth, user_id: str, engine: Engine
) -> None:
    headers = with_key(auth, user_id, new_key())
    with refusing_keys_of(engine, user_id):
        failed = client.post(tasks_url(user_id), json={"title": "Half done?"}, headers=headers)
        assert failed.status_code == 500, describe(failed)
        assert stored_tasks(client, auth, user_id) == []
        # Without a key the same database takes the task: only the key was refused.
        plain = client.post(tasks_url(user_id), json={"title": "No key"}, headers=auth(user_id))
        assert plain.status_code == 201
    assert remembered_keys(engine, user_id) == 0

    created = client.post(tasks_url(user_id), json={"title": "Half done?"}, headers=headers)
    assert created.status_code == 201 and "idempotent-replayed" not in created.headers
    assert stored_tasks(client, auth, user_id) == [plain.json(), created.json()]
    assert remembered_keys(engine, user_id) == 1


def test_a_toggle_whose_key_cannot_be_remembered_leaves_the_task_as_it_was(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, engine: Engine
) -> None:
    task = make_task(user_id)
    url = tasks_url(user_id, task["id"], "/complete")
    headers = with_key(auth, user_id, new_key())
    with refusing_keys_of(engine, user_id):
        failed = client.patch(url, headers=headers)
        assert failed.status_code == 500, describe(failed)
        assert read_task(client, auth, user_id, task["id"]) == task

    toggled = client.patch(url, headers=headers)
    assert toggled.status_code == 200 and "idempotent-replayed" not in toggled.headers
    assert (toggled.json()["completed"], toggled.json()["version"]) == (True, 2)
    assert remembered_keys(engine, user_id) == 1


# --- The database connection cut at the worst moments ----------------------------------------------


def stored_counts(database_url: str, user_id: str) -> tuple[int, int]:
    """How many tasks and how many remembered keys the user has, read straight from the database."""
    engine = create_engine(make_url(database_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as connection:
            params = {"owner": user_id}
            tasks = connection.execute(text("SELECT count(*) FROM tasks WHERE user_id = :owner"), params).scalar_one()
            remembered = connection.execute(
                text("SELECT count(*) FROM idempotency_keys WHERE user_id = :owner"), params
            ).scalar_one()
            return tasks, remembered
    finally:
        engine.dispose()


@pytest.mark.postgresql_only
@pytest.mark.parametrize(
    ("statement", "after_sending"),
    [
        pytest.param(b"INSERT INTO idempotency_keys", False, id="before-the-key-is-written"),
        pytest.param(b"COMMIT", False, id="before-the-commit"),
        pytest.param(b"COMMIT", True, id="with-the-commit-sent-and-its-answer-lost"),
    ],
)
def test_a_connection_cut_mid_request_leaves_both_the_task_and_its_key_or_neither(
    database_url: str,
    jwks_server: JwksServer,
    serve: Callable[..., "LiveServer"],
    auth: Auth,
    user_id: str,
    statement: bytes,
    after_sending: bool,
) -> None:
    """The task is written before its key: a cut between them, or around the commit, never keeps one alone.

    The retry with the same key then ends with exactly one task: made now, or replayed if the commit went through.
    """
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    proxied_url = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    headers = with_key(auth, user_id, new_key())
    try:
        with (
            serve(create_app(make_settings(proxied_url, jwks_server))) as live,
            httpx.Client(base_url=live.url, timeout=30) as http,
        ):
            # The user's first task (and counter row) first, so the cut one takes the usual statements.
            assert http.post(tasks_url(user_id), json={"title": "Before"}, headers=auth(user_id)).status_code == 201
            proxy.cut_at(statement, after_sending=after_sending)
            cut = http.post(tasks_url(user_id), json={"title": "Cut"}, headers=headers)
            assert cut.status_code == 503, describe(cut)

            proxy.start()
            tasks, remembered = stored_counts(database_url, user_id)
            assert (tasks - 1, remembered) in {(0, 0), (1, 1)}, (tasks, remembered)
            if not after_sending:
                assert (tasks, remembered) == (1, 0)

            retry = http.post(tasks_url(user_id), json={"title": "Cut"}, headers=headers)
            for _ in range(20):  # the pool may hand out a connection the cut broke: it is replaced
                if retry.status_code != 503:
                    break
                retry = http.post(tasks_url(user_id), json={"title": "Cut"}, headers=headers)
            assert retry.status_code == 201, describe(retry)
            assert retry.headers.get("idempotent-replayed") == ("true" if remembered else None)
            assert stored_counts(database_url, user_id) == (2, 1)
    finally:
        proxy.stop()
