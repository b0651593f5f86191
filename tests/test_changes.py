"""The changes feed: a full sync, then every change after a cursor, each task once, as its current state; and
its central promise, raced for real: a client that follows the feed while others write ends with exactly the
user's live tasks.

Sections follow the contract's "Changes feed (v2)". Every test runs against the real app over real HTTP, on
SQLite and, when TEST_DATABASE_URL is set, on PostgreSQL.
"""

import base64
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from housekeeping import clean_up
from main import create_app
from models import utc_now
from tests.conftest import make_settings

if TYPE_CHECKING:
    from tests.conftest import LiveServer
    from tests.keys import JwksServer

Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]
Change = dict[str, Any]

RETENTION_DAYS = 30
CURSOR_EXPIRED = "cursor_expired"


def tasks_url(user_id: str, task_id: int | None = None, suffix: str = "") -> str:
    """The URL of a user's tasks, or of one of them."""
    return f"/api/{user_id}/tasks" + (f"/{task_id}" if task_id is not None else "") + suffix


def trash_url(user_id: str, task_id: int | None = None, suffix: str = "") -> str:
    """The URL of a user's trash, or of one task in it."""
    return f"/api/{user_id}/trash" + (f"/{task_id}" if task_id is not None else "") + suffix


def changes_url(user_id: str) -> str:
    """The URL of a user's changes feed."""
    return f"/api/{user_id}/changes"


def json_of(response: httpx.Response, status: int) -> Any:
    """The JSON body of a response that must have `status`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def feed_page(
    client: httpx.Client, headers: dict[str, str], user_id: str, since: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    """One page of the feed (a full sync without `since`), checked for its shape and for each task once."""
    params = {name: value for name, value in (("since", since), ("limit", limit)) if value is not None}
    page = json_of(client.get(changes_url(user_id), params=params, headers=headers), 200)
    assert set(page) == {"changes", "cursor", "has_more"}
    assert isinstance(page["cursor"], str) and page["cursor"]
    assert isinstance(page["has_more"], bool)
    ids = [change["id"] for change in page["changes"]]
    assert len(ids) == len(set(ids)), ids
    return page


def whole_feed(
    client: httpx.Client, headers: dict[str, str], user_id: str, since: str | None = None, limit: int | None = None
) -> tuple[list[Change], str, int]:
    """Every change after `since` (or a full sync), page after page: the changes, the last cursor, the pages read."""
    changes, pages = [], 0
    while True:
        page = feed_page(client, headers, user_id, since, limit)
        changes += page["changes"]
        since, pages = page["cursor"], pages + 1
        if not page["has_more"]:
            return changes, since, pages


def live_tasks(client: httpx.Client, headers: dict[str, str], user_id: str) -> dict[int, dict[str, Any]]:
    """The user's live tasks by id, from GET /tasks (fewer than 500 in these tests)."""
    response = client.get(tasks_url(user_id), params={"limit": 500}, headers=headers)
    tasks = json_of(response, 200)
    assert int(response.headers["x-total-count"]) == len(tasks) < 500
    return {task["id"]: task for task in tasks}


def as_live_change(task: dict[str, Any]) -> Change:
    """A live task as the feed shows it."""
    return task | {"deleted_at": None}


def is_gone(change: Change) -> bool:
    """Whether a change takes the task out of a local copy: in the trash, or deleted for good."""
    return change.get("deleted") is True or change.get("deleted_at") is not None


def apply_changes(local: dict[int, dict[str, Any]], changes: list[Change]) -> None:
    """Apply a page of changes to a local copy of the live tasks, as an offline-first client does."""
    for change in changes:
        if is_gone(change):
            local.pop(change["id"], None)
        else:
            local[change["id"]] = {name: value for name, value in change.items() if name != "deleted_at"}


# --- Full sync ----------------------------------------------------------------------------------------


def test_full_sync_lists_every_live_task_and_no_trashed_one(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    headers = auth(user_id)
    kept = [make_task(user_id, f"Live {number}", tags=["sync"])["id"] for number in range(3)]
    trashed = make_task(user_id, "Trashed")["id"]
    doomed = make_task(user_id, "Deleted for good")["id"]
    make_task(other_user_id, "Someone else's")
    assert client.delete(tasks_url(user_id, trashed), headers=headers).status_code == 204
    assert client.delete(tasks_url(user_id, doomed), headers=headers).status_code == 204
    assert client.delete(trash_url(user_id, doomed), headers=headers).status_code == 204

    page = feed_page(client, headers, user_id)
    assert page["has_more"] is False
    current = live_tasks(client, headers, user_id)
    assert sorted(current) == kept
    assert page["changes"] == [as_live_change(current[task_id]) for task_id in kept]
    assert client.get(changes_url(user_id), headers=headers).headers["cache-control"] == "no-store"


def test_full_sync_of_a_user_without_tasks_is_empty_and_its_cursor_works(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    headers = auth(user_id)
    page = feed_page(client, headers, user_id)
    assert (page["changes"], page["has_more"]) == ([], False)

    created = make_task(user_id, "First ever")
    after = feed_page(client, headers, user_id, since=page["cursor"])
    assert after["changes"] == [as_live_change(created)]


# --- After a cursor -----------------------------------------------------------------------------------


def test_feed_after_a_cursor_has_every_kind_of_change_once_in_order_as_current_state(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    headers = auth(user_id)
    untouched, updated, toggled, trashed, restored, doomed, busy = (
        make_task(user_id, title)["id"]
        for title in ("Untouched", "Updated", "Toggled", "Trashed", "Restored", "Doomed", "Busy")
    )
    cursor = feed_page(client, headers, user_id)["cursor"]

    created = make_task(user_id, "Created")["id"]
    assert client.patch(tasks_url(user_id, updated), json={"title": "Renamed"}, headers=headers).status_code == 200
    assert client.patch(tasks_url(user_id, busy), json={"priority": "low"}, headers=headers).status_code == 200
    assert client.patch(tasks_url(user_id, toggled, "/complete"), headers=headers).status_code == 200
    assert client.delete(tasks_url(user_id, trashed), headers=headers).status_code == 204
    assert client.delete(tasks_url(user_id, restored), headers=headers).status_code == 204
    assert client.put(tasks_url(user_id, busy), json={"tags": ["two"]}, headers=headers).status_code == 200
    assert client.post(trash_url(user_id, restored, "/restore"), headers=headers).status_code == 200
    assert client.delete(tasks_url(user_id, doomed), headers=headers).status_code == 204
    assert client.delete(trash_url(user_id, doomed), headers=headers).status_code == 204
    assert client.patch(tasks_url(user_id, busy, "/complete"), headers=headers).status_code == 200

    page = feed_page(client, headers, user_id, since=cursor)
    assert page["has_more"] is False
    current = live_tasks(client, headers, user_id)
    [in_trash] = json_of(client.get(trash_url(user_id), headers=headers), 200)
    assert in_trash["id"] == trashed
    assert page["changes"] == [
        as_live_change(current[created]),
        as_live_change(current[updated]),
        as_live_change(current[toggled]),
        in_trash,  # with its deleted_at
        as_live_change(current[restored]),
        {"id": doomed, "deleted": True},
        as_live_change(current[busy]),  # changed three times, there once, as it is now
    ]
    assert untouched not in {change["id"] for change in page["changes"]}
    assert current[busy]["version"] == 4
    assert current[updated]["title"] == "Renamed"
    assert current[toggled]["completed"] is True


def test_feed_with_nothing_new_is_empty_and_its_cursor_stays_usable(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    headers = auth(user_id)
    make_task(user_id, "Already synced")
    cursor = feed_page(client, headers, user_id)["cursor"]

    quiet = feed_page(client, headers, user_id, since=cursor)
    assert (quiet["changes"], quiet["has_more"]) == ([], False)
    again = feed_page(client, headers, user_id, since=quiet["cursor"])
    assert (again["changes"], again["has_more"]) == ([], False)

    later = make_task(user_id, "Later")
    assert feed_page(client, headers, user_id, since=quiet["cursor"])["changes"] == [as_live_change(later)]


def test_feed_shows_only_the_users_own_changes(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    headers = auth(user_id)
    cursor = feed_page(client, headers, user_id)["cursor"]
    theirs = make_task(other_user_id, "Theirs")["id"]
    assert client.delete(tasks_url(other_user_id, theirs), headers=auth(other_user_id)).status_code == 204
    mine = make_task(user_id, "Mine")

    assert feed_page(client, headers, user_id, since=cursor)["changes"] == [as_live_change(mine)]
    assert [change["id"] for change in feed_page(client, headers, user_id)["changes"]] == [mine["id"]]


# --- Paging ---------------------------------------------------------------------------------------------


def test_full_sync_pages_with_limit_and_has_more(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    headers = auth(user_id)
    task_ids = [make_task(user_id, f"Task {number}")["id"] for number in range(7)]

    pages = []
    since = None
    while True:
        page = feed_page(client, headers, user_id, since=since, limit=3)
        pages.append(page)
        since = page["cursor"]
        if not page["has_more"]:
            break
    assert [len(page["changes"]) for page in pages] == [3, 3, 1]
    assert [page["has_more"] for page in pages] == [True, True, False]
    assert [change["id"] for page in pages for change in page["changes"]] == task_ids


def test_feed_after_a_cursor_pages_with_limit_and_ends_when_exactly_a_page_is_left(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    headers = auth(user_id)
    task_ids = [make_task(user_id, f"Task {number}")["id"] for number in range(6)]
    cursor = feed_page(client, headers, user_id)["cursor"]
    for task_id in reversed(task_ids):
        assert client.patch(tasks_url(user_id, task_id, "/complete"), headers=headers).status_code == 200

    first = feed_page(client, headers, user_id, since=cursor, limit=3)
    assert first["has_more"] is True
    second = feed_page(client, headers, user_id, since=first["cursor"], limit=3)
    assert second["has_more"] is False
    ids = [change["id"] for change in first["changes"] + second["changes"]]
    assert ids == list(reversed(task_ids))
    assert all(change["completed"] is True for change in first["changes"] + second["changes"])
    assert feed_page(client, headers, user_id, since=second["cursor"])["changes"] == []


@pytest.mark.parametrize("limit", ["0", "501", "-1", "many", "1.5"])
def test_limit_out_of_range_is_422(client: httpx.Client, auth: Auth, user_id: str, limit: str) -> None:
    response = client.get(changes_url(user_id), params={"limit": limit}, headers=auth(user_id))
    body = json_of(response, 422)
    assert body["code"] == "validation_error"
    assert body["detail"][0]["loc"] == ["query", "limit"]


def test_limit_at_its_bounds_is_accepted(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    headers = auth(user_id)
    first, second = make_task(user_id, "One")["id"], make_task(user_id, "Two")["id"]
    assert [change["id"] for change in feed_page(client, headers, user_id, limit=1)["changes"]] == [first]
    assert [change["id"] for change in feed_page(client, headers, user_id, limit=500)["changes"]] == [first, second]


# --- Cursors ---------------------------------------------------------------------------------------------


def test_another_users_cursor_is_422_with_a_detail_list(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    make_task(other_user_id, "Theirs")
    their_cursor = feed_page(client, auth(other_user_id), other_user_id)["cursor"]

    response = client.get(changes_url(user_id), params={"since": their_cursor}, headers=auth(user_id))
    body = json_of(response, 422)
    assert body["code"] == "validation_error"
    assert isinstance(body["detail"], list)
    assert body["detail"][0]["loc"] == ["query", "since"]
    assert isinstance(body["detail"][0]["msg"], str)


def encoded(text: str) -> str:
    """`text` in URL-safe base64, the way a cursor might look."""
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "since",
    [
        pytest.param("garbage", id="word"),
        pytest.param("", id="empty"),
        pytest.param("!!!***", id="not-base64"),
        pytest.param(encoded("hello"), id="base64-of-text"),
        pytest.param(encoded("1:-5:abcdef"), id="negative-number"),
        pytest.param(encoded("1:" + "9" * 30 + ":abcdef"), id="huge-number"),
        pytest.param(encoded("\udcff".encode("utf-8", "surrogatepass").decode("latin-1")), id="non-ascii"),
        pytest.param("x" * 201, id="too-long"),
    ],
)
def test_something_that_is_not_a_cursor_is_422(client: httpx.Client, auth: Auth, user_id: str, since: str) -> None:
    response = client.get(changes_url(user_id), params={"since": since}, headers=auth(user_id))
    body = json_of(response, 422)
    assert body["code"] == "validation_error"
    assert body["detail"][0]["loc"] == ["query", "since"]


def test_cursor_from_before_purged_tombstones_is_410_and_a_full_sync_still_works(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    headers = auth(user_id)
    kept = make_task(user_id, "Kept")
    doomed = make_task(user_id, "Deleted for good")["id"]
    old_cursor = feed_page(client, headers, user_id)["cursor"]
    assert client.delete(tasks_url(user_id, doomed), headers=headers).status_code == 204
    assert client.delete(trash_url(user_id, doomed), headers=headers).status_code == 204
    recent_cursor = feed_page(client, headers, user_id)["cursor"]
    assert feed_page(client, headers, user_id, since=old_cursor)["changes"] == [{"id": doomed, "deleted": True}]

    removed = clean_up(server.app.state.database.engine, RETENTION_DAYS, now=utc_now() + timedelta(days=31))
    assert removed["tombstones"] >= 1

    expired = client.get(changes_url(user_id), params={"since": old_cursor}, headers=headers)
    body = json_of(expired, 410)
    assert body["code"] == CURSOR_EXPIRED
    assert isinstance(body["detail"], str)
    # A cursor from after the forgotten change is still good, and a full sync starts afresh.
    assert feed_page(client, headers, user_id, since=recent_cursor)["changes"] == []
    full_sync = feed_page(client, headers, user_id)
    assert full_sync["changes"] == [as_live_change(kept)]
    later = make_task(user_id, "After the purge")
    assert feed_page(client, headers, user_id, since=full_sync["cursor"])["changes"] == [as_live_change(later)]


# --- Identity -----------------------------------------------------------------------------------------------


def test_feed_without_a_token_is_401(client: httpx.Client, user_id: str) -> None:
    response = client.get(changes_url(user_id))
    assert json_of(response, 401)["code"]
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_feed_of_another_users_path_is_403(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    make_task(other_user_id, "Theirs")
    response = client.get(changes_url(other_user_id), headers=auth(user_id))
    body = json_of(response, 403)
    assert "Theirs" not in response.text
    assert isinstance(body["detail"], str)


# --- The central promise, raced ------------------------------------------------------------------------------

WRITERS = 4
ROUNDS = 3
OPERATIONS_PER_ROUND = 30  # per writer
FOLLOWER_PAGE = 5  # small, so the follower pages while the writers write
SEED_TASKS = 3  # per writer, before the first round


@dataclass
class Writer:
    """One client writing to the user's tasks: it knows which of its own tasks are live and which trashed."""

    index: int
    http: httpx.Client
    user_id: str
    headers: dict[str, str]
    live: list[int] = field(default_factory=list)
    trashed: list[int] = field(default_factory=list)

    def create(self, title: str) -> None:
        response = self.http.post(tasks_url(self.user_id), json={"title": title}, headers=self.headers)
        self.live.append(json_of(response, 201)["id"])

    def operate(self, rng: random.Random, number: int) -> None:
        """One random write: create, update, toggle, trash, restore or delete for good."""
        kinds = ["create"] + (["update", "toggle", "trash"] if self.live else [])
        kinds += ["restore", "delete_for_good"] if self.trashed else []
        kind = rng.choice(kinds)
        if kind == "create":
            self.create(f"Writer {self.index} task {number}")
        elif kind == "update":
            fields = rng.choice([{"title": f"Renamed {number}"}, {"priority": "high"}, {"tags": [f"t{number}"]}])
            json_of(
                self.http.patch(tasks_url(self.user_id, rng.choice(self.live)), json=fields, headers=self.headers), 200
            )
        elif kind == "toggle":
            url = tasks_url(self.user_id, rng.choice(self.live), "/complete")
            json_of(self.http.patch(url, headers=self.headers), 200)
        elif kind == "trash":
            task_id = self.live.pop(rng.randrange(len(self.live)))
            assert self.http.delete(tasks_url(self.user_id, task_id), headers=self.headers).status_code == 204
            self.trashed.append(task_id)
        elif kind == "restore":
            task_id = self.trashed.pop(rng.randrange(len(self.trashed)))
            json_of(self.http.post(trash_url(self.user_id, task_id, "/restore"), headers=self.headers), 200)
            self.live.append(task_id)
        else:
            task_id = self.trashed.pop(rng.randrange(len(self.trashed)))
            assert self.http.delete(trash_url(self.user_id, task_id), headers=self.headers).status_code == 204


@dataclass
class Follower:
    """A client keeping a local copy of the live tasks by following the feed (from a full sync when no cursor)."""

    user_id: str
    headers: dict[str, str]
    cursor: str | None = None
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)
    pages_during_writes: int = 0

    def follow(self, http: httpx.Client, writes_over: threading.Event) -> None:
        """Follow the feed until the writers are done and a page read after that says there is no more."""
        while True:
            over = writes_over.is_set()  # before the request: a page read after this saw every write
            page = feed_page(http, self.headers, self.user_id, since=self.cursor, limit=FOLLOWER_PAGE)
            apply_changes(self.tasks, page["changes"])
            self.cursor = page["cursor"]
            if not over:
                self.pages_during_writes += 1
            elif not page["has_more"]:
                return


@pytest.fixture(scope="module")
def racing_server(
    serve: Callable[..., "LiveServer"], database_url: str, jwks_server: "JwksServer"
) -> Iterator["LiveServer"]:
    """An app of its own for the races, so their load and threads stay apart from the other tests."""
    with serve(create_app(make_settings(database_url, jwks_server))) as live:
        yield live


def race_round(
    round_number: int, writers: list[Writer], follower: Follower, follower_client: httpx.Client, start_midway: bool
) -> None:
    """One round: every writer makes OPERATIONS_PER_ROUND random writes while the follower follows the feed.

    `start_midway`: the follower starts only once the writers are halfway through the round.
    """
    writes_over, halfway = threading.Event(), threading.Event()
    done = iter(range(1, WRITERS * OPERATIONS_PER_ROUND + 1))  # next() on it is atomic under the GIL
    start_together = threading.Barrier(WRITERS + 1)

    def write(writer: Writer) -> None:
        rng = random.Random(f"{round_number}-{writer.index}")
        start_together.wait(timeout=60)
        for number in range(OPERATIONS_PER_ROUND):
            writer.operate(rng, round_number * OPERATIONS_PER_ROUND + number)
            if next(done) >= WRITERS * OPERATIONS_PER_ROUND // 2:
                halfway.set()

    def follow() -> None:
        start_together.wait(timeout=60)
        if start_midway:
            assert halfway.wait(timeout=60)
        follower.follow(follower_client, writes_over)

    with ThreadPoolExecutor(max_workers=WRITERS + 1) as pool:
        following = pool.submit(follow)
        writing = [pool.submit(write, writer) for writer in writers]
        for future in writing:
            future.result(timeout=120)
        writes_over.set()
        following.result(timeout=120)


def race(server: "LiveServer", user_id: str, headers: dict[str, str], start_midway: bool) -> list[Writer]:
    """ROUNDS rounds of WRITERS writers racing one follower; after each, its copy must equal the live tasks.

    `start_midway`: the follower begins (with a full sync) only once the writers are halfway through
    round 1; otherwise it syncs before the writes and follows from that cursor. Returns the writers.
    """
    clients = [httpx.Client(base_url=server.url, timeout=60) for _ in range(WRITERS + 1)]
    writers = [Writer(index, clients[index], user_id, headers) for index in range(WRITERS)]
    follower = Follower(user_id, headers)
    try:
        for writer in writers:
            for number in range(SEED_TASKS):
                writer.create(f"Writer {writer.index} seed {number}")
        if not start_midway:
            follower.follow(clients[WRITERS], already_over())
            assert len(follower.tasks) == WRITERS * SEED_TASKS
        for round_number in range(ROUNDS):
            race_round(round_number, writers, follower, clients[WRITERS], start_midway and round_number == 0)
            expected = live_tasks(clients[0], headers, user_id)
            assert follower.tasks == expected, f"round {round_number}"
            assert sorted(expected) == sorted(task_id for writer in writers for task_id in writer.live)
            trashed = json_of(clients[0].get(trash_url(user_id), params={"limit": 500}, headers=headers), 200)
            in_trash = sorted(task_id for writer in writers for task_id in writer.trashed)
            assert sorted(task["id"] for task in trashed) == in_trash
    finally:
        for http in clients:
            http.close()
    # It really followed while the writers wrote: a page read during every round.
    assert follower.pages_during_writes >= ROUNDS
    return writers


def already_over() -> threading.Event:
    """An event already set: for following the feed when nothing is being written."""
    event = threading.Event()
    event.set()
    return event


def test_follower_from_a_cursor_ends_with_exactly_the_live_tasks_while_writers_race(
    racing_server: "LiveServer", auth: Auth, user_id: str
) -> None:
    race(racing_server, user_id, auth(user_id), start_midway=False)


def test_follower_from_a_full_sync_mid_writes_ends_with_exactly_the_live_tasks(
    racing_server: "LiveServer", auth: Auth, user_id: str
) -> None:
    race(racing_server, user_id, auth(user_id), start_midway=True)
