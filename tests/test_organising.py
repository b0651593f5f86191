"""Organising tasks (v2): `priority`, `tags`, `completed_at` and `version` on the task, the list's
`priority`, `tag` and `due_after`/`due_before` filters and `priority`/`completed_at` sorts, and
`GET /api/{user_id}/tags`.

Sections follow docs/api.md ("The task object", "Listing tasks", "Tags"). Every test runs against the
real app over real HTTP, on SQLite and, when TEST_DATABASE_URL is set, on PostgreSQL.
"""

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, update

from database import create_db_engine
from models import Task
from settings import normalize_database_url

Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]

PRIORITIES = ["none", "low", "medium", "high"]
UPDATE_METHODS = ["PUT", "PATCH"]
TAG_MAX_LENGTH = 50
MAX_TAGS = 20


def tasks_url(user_id: str) -> str:
    """The collection URL of a user's tasks."""
    return f"/api/{user_id}/tasks"


def task_url(user_id: str, task_id: int) -> str:
    """The URL of one of a user's tasks."""
    return f"/api/{user_id}/tasks/{task_id}"


def tags_url(user_id: str) -> str:
    """The URL of a user's tags list."""
    return f"/api/{user_id}/tags"


def json_of(response: httpx.Response, status: int) -> Any:
    """The JSON body of a response that must have `status`."""
    assert response.status_code == status, f"{response.request.method} {response.request.url}: {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def assert_validation_error(response: httpx.Response) -> list[dict[str, Any]]:
    """Check a 422 in the contract's shape and return its list of issues."""
    body = json_of(response, 422)
    assert body["code"] == "validation_error", body
    assert isinstance(body["detail"], list) and body["detail"], body
    assert all({"loc", "msg", "type"} <= set(issue) for issue in body["detail"]), body
    return body["detail"]


def instant(value: str | None) -> datetime | None:
    """A date-time the API returned, as an aware instant."""
    return None if value is None else datetime.fromisoformat(value)


def listed_ids(client: httpx.Client, auth: Auth, user_id: str, params: Any = None) -> list[int]:
    """The ids of the user's tasks one big page lists for `params`, checked against `X-Total-Count`."""
    query = [*(params.items() if isinstance(params, dict) else params or []), ("limit", 500)]
    response = client.get(tasks_url(user_id), params=query, headers=auth(user_id))
    tasks = json_of(response, 200)
    assert response.headers["X-Total-Count"] == str(len(tasks)), (params, response.headers)
    return [task["id"] for task in tasks]


def read(client: httpx.Client, auth: Auth, user_id: str, task_id: int) -> dict[str, Any]:
    """The task as `GET` returns it now."""
    return json_of(client.get(task_url(user_id, task_id), headers=auth(user_id)), 200)


def tag_counts(client: httpx.Client, auth: Auth, user_id: str) -> list[tuple[str, int]]:
    """`GET /tags` as `(name, count)` pairs, in the order returned."""
    return [(tag["name"], tag["count"]) for tag in json_of(client.get(tags_url(user_id), headers=auth(user_id)), 200)]


def send_update(client: httpx.Client, auth: Auth, user_id: str, task_id: int, method: str, body: Any) -> httpx.Response:
    """A `PUT` or `PATCH` of the user's task with a JSON body."""
    return client.request(method, task_url(user_id, task_id), json=body, headers=auth(user_id))


def toggle(client: httpx.Client, auth: Auth, user_id: str, task_id: int, body: Any = None) -> dict[str, Any]:
    """`PATCH …/complete`: without a body a toggle, with `{"completed": b}` a set; returns the task."""
    json_body = {} if body is None else {"json": body}
    return json_of(client.patch(task_url(user_id, task_id) + "/complete", headers=auth(user_id), **json_body), 200)


@pytest.fixture
def database_engine(database_url: str) -> Iterator[Engine]:
    """An engine on the test database, for the few states the API cannot produce (equal creation times)."""
    engine = create_db_engine(normalize_database_url(database_url))
    yield engine
    engine.dispose()


# --- priority ------------------------------------------------------------------------------------


def test_priority_defaults_to_none(make_task: MakeTask, user_id: str) -> None:
    assert make_task(user_id)["priority"] == "none"


@pytest.mark.parametrize("priority", PRIORITIES)
def test_every_priority_is_stored_on_create_and_update(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, priority: str
) -> None:
    created = make_task(user_id, priority=priority)
    assert created["priority"] == priority
    assert read(client, auth, user_id, created["id"])["priority"] == priority
    other = make_task(user_id, priority="low" if priority != "low" else "high")
    for method in UPDATE_METHODS:
        updated = json_of(send_update(client, auth, user_id, other["id"], method, {"priority": priority}), 200)
        assert updated["priority"] == priority
        assert read(client, auth, user_id, other["id"]) == updated


@pytest.mark.parametrize("value", [None, "urgent", "High", "", 3, ["high"]], ids=repr)
def test_null_or_unknown_priority_is_422_on_create_and_nothing_is_stored(
    client: httpx.Client, auth: Auth, user_id: str, value: Any
) -> None:
    response = client.post(tasks_url(user_id), json={"title": "T", "priority": value}, headers=auth(user_id))
    assert any(issue["loc"][-1] == "priority" for issue in assert_validation_error(response))
    assert listed_ids(client, auth, user_id) == []


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize("value", [None, "urgent", 0], ids=repr)
def test_null_or_unknown_priority_is_422_on_update_and_the_task_is_unchanged(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str, value: Any
) -> None:
    task = make_task(user_id, priority="medium")
    assert_validation_error(send_update(client, auth, user_id, task["id"], method, {"priority": value}))
    assert read(client, auth, user_id, task["id"]) == task


# --- tags ----------------------------------------------------------------------------------------


def test_tags_default_to_an_empty_list(make_task: MakeTask, user_id: str) -> None:
    assert make_task(user_id)["tags"] == []


def test_tags_are_trimmed_and_kept_in_the_order_sent(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, tags=["  zeta ", "\talpha\n", "Mid dle", "beta"])
    assert task["tags"] == ["zeta", "alpha", "Mid dle", "beta"]
    assert read(client, auth, user_id, task["id"])["tags"] == task["tags"]


def test_a_tag_of_50_characters_after_trimming_is_accepted(make_task: MakeTask, user_id: str) -> None:
    longest = "t" * TAG_MAX_LENGTH
    assert make_task(user_id, tags=[f"   {longest}  ", "x"])["tags"] == [longest, "x"]


INVALID_TAGS = [
    pytest.param("t" * (TAG_MAX_LENGTH + 1), id="51-characters"),
    pytest.param("   ", id="only-spaces"),
    pytest.param("", id="empty"),
    pytest.param("nul\x00inside", id="nul"),
    pytest.param(None, id="null-element"),
    pytest.param(7, id="number"),
]


@pytest.mark.parametrize("tag", INVALID_TAGS)
def test_an_invalid_tag_is_422_on_create_and_nothing_is_stored(
    client: httpx.Client, auth: Auth, user_id: str, tag: Any
) -> None:
    body = {"title": "T", "tags": ["fine", tag]}
    issues = assert_validation_error(client.post(tasks_url(user_id), json=body, headers=auth(user_id)))
    assert all("tags" in issue["loc"] for issue in issues), issues
    assert listed_ids(client, auth, user_id) == []
    assert tag_counts(client, auth, user_id) == []


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize("tag", INVALID_TAGS)
def test_an_invalid_tag_is_422_on_update_and_the_task_is_unchanged(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str, tag: Any
) -> None:
    task = make_task(user_id, tags=["keep"])
    assert_validation_error(send_update(client, auth, user_id, task["id"], method, {"tags": ["new", tag]}))
    assert read(client, auth, user_id, task["id"]) == task
    assert tag_counts(client, auth, user_id) == [("keep", 1)]


def test_twenty_distinct_tags_are_accepted(make_task: MakeTask, user_id: str) -> None:
    tags = [f"tag {n:02}" for n in range(MAX_TAGS)]
    assert make_task(user_id, tags=tags)["tags"] == tags


@pytest.mark.parametrize("method", ["POST", *UPDATE_METHODS])
def test_twenty_one_distinct_tags_are_422(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str
) -> None:
    tags = [f"tag {n:02}" for n in range(MAX_TAGS + 1)]
    if method == "POST":
        assert_validation_error(
            client.post(tasks_url(user_id), json={"title": "T", "tags": tags}, headers=auth(user_id))
        )
        assert listed_ids(client, auth, user_id) == []
    else:
        task = make_task(user_id, tags=["keep"])
        assert_validation_error(send_update(client, auth, user_id, task["id"], method, {"tags": tags}))
        assert read(client, auth, user_id, task["id"]) == task


def test_case_insensitive_repeats_do_not_count_towards_the_limit(make_task: MakeTask, user_id: str) -> None:
    """25 entries that are 20 tags once case is ignored: accepted, each tag once, first spelling, in order."""
    distinct = [f"Tag{n}" for n in range(MAX_TAGS)]
    repeats = ["TAG3", "tag0", " tag9 ", "tAg7", "tag3"]  # of tags already sent
    task = make_task(user_id, tags=distinct[:10] + repeats + distinct[10:])
    assert task["tags"] == distinct


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (["Work", "work"], ["Work"]),
        (["work", "WORK", "Work", "home"], ["work", "home"]),
        (["Ärger", "ärger", "ÄRGER"], ["Ärger"]),
        (["ΣΟΦΊΑ", "σοφία"], ["ΣΟΦΊΑ"]),
        ([" spaced", "spaced "], ["spaced"]),
    ],
    ids=["ascii", "ascii-three-ways", "umlaut", "greek", "trimmed-equal"],
)
def test_case_variants_of_one_tag_keep_only_the_first_spelling(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, sent: list[str], kept: list[str]
) -> None:
    task = make_task(user_id, tags=sent)
    assert task["tags"] == kept
    assert tag_counts(client, auth, user_id) == [(tag, 1) for tag in sorted(kept, key=str.lower)]


def test_tags_may_hold_commas_spaces_quotes_and_any_unicode(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    tags = ["a, b", "two words", "日本語", "🎉 party", "'; DROP TABLE task_tags; --", "100%_off", "e\u0301"]
    task = make_task(user_id, tags=tags)
    assert task["tags"] == tags
    assert read(client, auth, user_id, task["id"])["tags"] == tags
    for tag in tags:
        assert listed_ids(client, auth, user_id, {"tag": tag}) == [task["id"]], tag


@pytest.mark.parametrize("method", UPDATE_METHODS)
def test_an_empty_list_clears_the_tags(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str
) -> None:
    task = make_task(user_id, tags=["a", "b"])
    updated = json_of(send_update(client, auth, user_id, task["id"], method, {"tags": []}), 200)
    assert updated["tags"] == []
    assert read(client, auth, user_id, task["id"])["tags"] == []
    assert listed_ids(client, auth, user_id, {"tag": "a"}) == []
    assert tag_counts(client, auth, user_id) == []


def test_null_tags_is_422_on_create(client: httpx.Client, auth: Auth, user_id: str) -> None:
    response = client.post(tasks_url(user_id), json={"title": "T", "tags": None}, headers=auth(user_id))
    assert_validation_error(response)
    assert listed_ids(client, auth, user_id) == []


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize("value", [None, "work", {"work": True}], ids=["null", "a-string", "an-object"])
def test_null_or_non_list_tags_is_422_on_update_and_the_task_is_unchanged(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str, value: Any
) -> None:
    task = make_task(user_id, tags=["keep"])
    assert_validation_error(send_update(client, auth, user_id, task["id"], method, {"tags": value}))
    assert read(client, auth, user_id, task["id"]) == task


@pytest.mark.parametrize("method", UPDATE_METHODS)
def test_an_update_without_tags_leaves_them(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str
) -> None:
    task = make_task(user_id, tags=["Keep", "these"])
    updated = json_of(send_update(client, auth, user_id, task["id"], method, {"title": "New", "priority": "low"}), 200)
    assert updated["tags"] == ["Keep", "these"]
    toggle(client, auth, user_id, task["id"])
    assert read(client, auth, user_id, task["id"])["tags"] == ["Keep", "these"]
    assert listed_ids(client, auth, user_id, {"tag": "keep"}) == [task["id"]]


def test_put_replaces_the_tag_set_and_the_tag_filter_follows(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    """A v1-style client sends the whole task back with PUT: its tags become exactly the ones sent."""
    task = make_task(user_id, title="Plan", tags=["old", "shared"])
    whole = read(client, auth, user_id, task["id"]) | {"tags": ["Shared", "new"]}
    updated = json_of(send_update(client, auth, user_id, task["id"], "PUT", whole), 200)
    assert updated["tags"] == ["Shared", "new"]
    assert listed_ids(client, auth, user_id, {"tag": "old"}) == []
    assert listed_ids(client, auth, user_id, {"tag": "new"}) == [task["id"]]
    assert listed_ids(client, auth, user_id, {"tag": "shared"}) == [task["id"]]
    assert tag_counts(client, auth, user_id) == [("new", 1), ("Shared", 1)]


# --- completed_at and version --------------------------------------------------------------------


def test_completed_at_is_null_while_pending(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    assert task["completed_at"] is None
    assert read(client, auth, user_id, task["id"])["completed_at"] is None


def test_a_task_created_completed_has_completed_at(make_task: MakeTask, user_id: str) -> None:
    before = datetime.now(UTC)
    task = make_task(user_id, completed=True)
    completed_at = instant(task["completed_at"])
    assert completed_at is not None
    assert completed_at == instant(task["created_at"])
    assert before - timedelta(seconds=5) <= completed_at <= datetime.now(UTC) + timedelta(seconds=5)
    assert task["completed_at"].endswith(("Z", "+00:00"))


@pytest.mark.parametrize("method", UPDATE_METHODS)
def test_updating_completed_to_true_sets_completed_at_and_to_false_clears_it(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str
) -> None:
    task = make_task(user_id)
    done = json_of(send_update(client, auth, user_id, task["id"], method, {"completed": True}), 200)
    assert done["completed_at"] is not None
    assert instant(done["completed_at"]) == instant(done["updated_at"])
    assert read(client, auth, user_id, task["id"]) == done
    reopened = json_of(send_update(client, auth, user_id, task["id"], method, {"completed": False}), 200)
    assert reopened["completed_at"] is None
    assert read(client, auth, user_id, task["id"])["completed_at"] is None


def test_toggling_sets_completed_at_and_toggling_back_clears_it(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    done = toggle(client, auth, user_id, task["id"])
    assert done["completed"] is True
    assert done["completed_at"] is not None
    assert instant(done["completed_at"]) == instant(done["updated_at"])
    reopened = toggle(client, auth, user_id, task["id"])
    assert (reopened["completed"], reopened["completed_at"]) == (False, None)
    done_again = toggle(client, auth, user_id, task["id"])
    assert instant(done_again["completed_at"]) == instant(done_again["updated_at"])
    assert instant(done_again["completed_at"]) > instant(done["completed_at"])  # type: ignore[operator]


def test_setting_completed_through_complete_sets_and_clears_completed_at(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    done = toggle(client, auth, user_id, task["id"], {"completed": True})
    assert done["completed_at"] is not None
    assert instant(done["completed_at"]) == instant(done["updated_at"])
    reopened = toggle(client, auth, user_id, task["id"], {"completed": False})
    assert reopened["completed_at"] is None
    assert read(client, auth, user_id, task["id"])["completed_at"] is None


@pytest.mark.parametrize("how", ["PUT", "PATCH", "complete"])
def test_setting_completed_to_the_value_it_has_leaves_completed_at_alone(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, how: str
) -> None:
    """The field is still sent, so `updated_at` and `version` move; `completed_at` does not."""

    def set_completed(task_id: int, value: bool) -> dict[str, Any]:
        if how == "complete":
            return toggle(client, auth, user_id, task_id, {"completed": value})
        return json_of(send_update(client, auth, user_id, task_id, how, {"completed": value}), 200)

    done = make_task(user_id, completed=True)
    again = set_completed(done["id"], True)
    assert again["completed_at"] == done["completed_at"]
    assert instant(again["updated_at"]) > instant(done["updated_at"])  # type: ignore[operator]
    assert again["version"] == done["version"] + 1

    pending = make_task(user_id)
    still = set_completed(pending["id"], False)
    assert still["completed_at"] is None
    assert still["version"] == pending["version"] + 1


@pytest.mark.parametrize("method", ["POST", *UPDATE_METHODS])
def test_client_sent_completed_at_and_version_are_ignored(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str
) -> None:
    forged = {"completed_at": "2001-01-01T00:00:00Z", "version": 99, "title": "Forged"}
    if method == "POST":
        task = json_of(client.post(tasks_url(user_id), json=forged, headers=auth(user_id)), 201)
        assert (task["completed_at"], task["version"]) == (None, 1)
        done = json_of(client.post(tasks_url(user_id), json=forged | {"completed": True}, headers=auth(user_id)), 201)
        assert (instant(done["completed_at"]), done["version"]) == (instant(done["created_at"]), 1)
        return
    task = make_task(user_id)
    updated = json_of(send_update(client, auth, user_id, task["id"], method, forged), 200)
    assert (updated["title"], updated["completed_at"], updated["version"]) == ("Forged", None, 2)
    done = json_of(send_update(client, auth, user_id, task["id"], method, forged | {"completed": True}), 200)
    assert (instant(done["completed_at"]), done["version"]) == (instant(done["updated_at"]), 3)
    assert read(client, auth, user_id, task["id"]) == done


def test_version_is_1_on_create_and_one_more_exactly_when_updated_at_moves(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, title="Counted", tags=["a"])
    assert task["version"] == 1
    assert task["updated_at"] == task["created_at"]
    restore_url = f"/api/{user_id}/trash/{task['id']}/restore"
    steps: list[tuple[str, Callable[[], Any], bool]] = [
        ("PATCH a field", lambda: send_update(client, auth, user_id, task["id"], "PATCH", {"priority": "high"}), True),
        (
            "PUT the same values",
            lambda: send_update(client, auth, user_id, task["id"], "PUT", {"title": "Counted"}),
            True,
        ),
        ("PATCH the same tags", lambda: send_update(client, auth, user_id, task["id"], "PATCH", {"tags": ["a"]}), True),
        ("PATCH nothing", lambda: send_update(client, auth, user_id, task["id"], "PATCH", {}), False),
        ("PUT nothing", lambda: send_update(client, auth, user_id, task["id"], "PUT", {}), False),
        ("GET", lambda: client.get(task_url(user_id, task["id"]), headers=auth(user_id)), False),
        ("toggle", lambda: toggle(client, auth, user_id, task["id"]), True),
        ("set completed", lambda: toggle(client, auth, user_id, task["id"], {"completed": False}), True),
        ("trash", lambda: client.delete(task_url(user_id, task["id"]), headers=auth(user_id)), True),
        ("restore", lambda: json_of(client.post(restore_url, headers=auth(user_id)), 200), True),
        ("list", lambda: client.get(tasks_url(user_id), headers=auth(user_id)), False),
    ]

    def current() -> dict[str, Any]:
        """The task as it is now, among the live tasks or in the trash."""
        response = client.get(task_url(user_id, task["id"]), headers=auth(user_id))
        if response.status_code == 200:
            return response.json()
        trash = json_of(client.get(f"/api/{user_id}/trash", headers=auth(user_id)), 200)
        return next(trashed for trashed in trash if trashed["id"] == task["id"])

    before = task
    for name, step, moves in steps:
        step()
        after = current()
        assert after["version"] == before["version"] + (1 if moves else 0), name
        assert (after["updated_at"] != before["updated_at"]) == moves, name
        if moves:
            assert instant(after["updated_at"]) > instant(before["updated_at"]), name  # type: ignore[operator]
        assert after["created_at"] == task["created_at"], name
        before = after
    assert before["version"] == 1 + sum(moves for _, _, moves in steps)


# --- filters -------------------------------------------------------------------------------------


def test_priority_filter_keeps_tasks_with_any_of_the_priorities_given(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    by_priority = {priority: make_task(user_id, priority=priority)["id"] for priority in PRIORITIES}
    extra_high = make_task(user_id, priority="high")["id"]
    assert listed_ids(client, auth, user_id, {"priority": "high"}) == [extra_high, by_priority["high"]]
    assert listed_ids(client, auth, user_id, {"priority": "none"}) == [by_priority["none"]]
    assert listed_ids(client, auth, user_id, [("priority", "low"), ("priority", "medium")]) == [
        by_priority["medium"],
        by_priority["low"],
    ]
    everything = [("priority", priority) for priority in PRIORITIES]
    assert sorted(listed_ids(client, auth, user_id, everything)) == sorted([*by_priority.values(), extra_high])
    assert listed_ids(client, auth, user_id, [("priority", "high"), ("priority", "high")]) == [
        extra_high,
        by_priority["high"],
    ]


def test_tag_filter_keeps_tasks_carrying_every_tag_given_case_insensitively(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    work = make_task(user_id, tags=["Work"])["id"]
    work_urgent = make_task(user_id, tags=["urgent", "work"])["id"]
    urgent = make_task(user_id, tags=["URGENT", "home"])["id"]
    make_task(user_id)  # no tags at all
    assert listed_ids(client, auth, user_id, {"tag": "work"}) == [work_urgent, work]
    assert listed_ids(client, auth, user_id, {"tag": "WORK"}) == [work_urgent, work]
    assert listed_ids(client, auth, user_id, {"tag": "Urgent"}) == [urgent, work_urgent]
    assert listed_ids(client, auth, user_id, [("tag", "work"), ("tag", "urgent")]) == [work_urgent]
    assert listed_ids(client, auth, user_id, [("tag", "work"), ("tag", "WoRk")]) == [work_urgent, work]
    assert listed_ids(client, auth, user_id, [("tag", "work"), ("tag", "home")]) == []
    assert listed_ids(client, auth, user_id, {"tag": "wor"}) == []  # a whole tag, not a part of one
    assert listed_ids(client, auth, user_id, {"tag": "  work "}) == [work_urgent, work]  # trimmed like a tag


def test_tag_filter_folds_case_beyond_ascii(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    upper = make_task(user_id, tags=["Ärger"])["id"]
    lower = make_task(user_id, tags=["ärger"])["id"]
    greek = make_task(user_id, tags=["ΣΟΦΊΑ"])["id"]
    for spelling in ("ärger", "ÄRGER", "Ärger"):
        assert listed_ids(client, auth, user_id, {"tag": spelling}) == [lower, upper], spelling
    assert listed_ids(client, auth, user_id, {"tag": "σοφία"}) == [greek]
    assert listed_ids(client, auth, user_id, {"tag": "arger"}) == []


def test_tag_filter_sees_only_the_users_own_tasks(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    mine = make_task(user_id, tags=["shared"])["id"]
    make_task(other_user_id, tags=["shared"])
    assert listed_ids(client, auth, user_id, {"tag": "shared"}) == [mine]


# Instants around 2026-05-01T12:00:00Z, written in different ways.
AT_NOON = "2026-05-01T12:00:00Z"
JUST_BEFORE_NOON = "2026-05-01T13:59:59.999999+02:00"  # 11:59:59.999999Z
NEXT_DAY = "2026-05-02T00:00:00Z"


@pytest.fixture
def due_tasks(make_task: MakeTask, user_id: str) -> dict[str, int]:
    """Tasks due just before noon, at noon, the next day, and one without a due date; their ids by name."""
    return {
        "before": make_task(user_id, due_date=JUST_BEFORE_NOON)["id"],
        "noon": make_task(user_id, due_date=AT_NOON)["id"],
        "next_day": make_task(user_id, due_date=NEXT_DAY)["id"],
        "undated": make_task(user_id)["id"],
    }


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"due_after": AT_NOON}, ["noon", "next_day"]),
        ({"due_before": AT_NOON}, ["before"]),
        ({"due_after": AT_NOON, "due_before": NEXT_DAY}, ["noon"]),
        ({"due_after": JUST_BEFORE_NOON, "due_before": "2026-05-02T00:00:00.000001Z"}, ["before", "noon", "next_day"]),
        ({"due_after": "2026-05-01T14:00:00+02:00"}, ["noon", "next_day"]),
        ({"due_after": "2026-05-01T12:00:00"}, ["noon", "next_day"]),  # no offset: UTC
        ({"due_before": "2026-05-01T12:00:00.000001"}, ["before", "noon"]),  # no offset: UTC
        ({"due_before": "2026-05-01T09:30:00-02:30"}, ["before"]),  # 12:00Z, written in St. John's time
        ({"due_after": "2026-05-01T09:30:00-02:30"}, ["noon", "next_day"]),
        ({"due_after": "2000-01-01T00:00:00Z"}, ["before", "noon", "next_day"]),
        ({"due_before": "2100-01-01T00:00:00Z"}, ["before", "noon", "next_day"]),
        ({"due_after": NEXT_DAY, "due_before": AT_NOON}, []),
        ({"due_after": AT_NOON, "due_before": AT_NOON}, []),
    ],
    ids=repr,
)
def test_due_range_is_after_inclusive_before_exclusive_and_leaves_out_undated_tasks(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    due_tasks: dict[str, int],
    params: dict[str, str],
    expected: list[str],
) -> None:
    assert listed_ids(client, auth, user_id, params | {"sort": "due_date"}) == [due_tasks[name] for name in expected]


def test_filters_combine_with_status_search_sorts_and_paging(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    """Every filter at once keeps exactly the tasks each would keep; sorted and paged, with the right total."""
    in_range = "2026-06-15T09:00:00Z"
    matching = [
        make_task(user_id, title="Report A", priority="high", tags=["Work", "q2"], due_date=in_range, completed=False),
        make_task(user_id, title="report B", priority="medium", tags=["q2", "work"], due_date="2026-06-01T00:00:00Z"),
        make_task(
            user_id, title="Report C", priority="high", tags=["WORK", "Q2", "x"], due_date="2026-06-30T23:59:59Z"
        ),
        make_task(user_id, title="The report", priority="medium", tags=["work", "q2"], due_date=in_range),
    ]
    near_misses = [
        make_task(user_id, title="Report D", priority="low", tags=["work", "q2"], due_date=in_range),  # priority
        make_task(user_id, title="Report E", priority="high", tags=["work"], due_date=in_range),  # one tag missing
        make_task(user_id, title="Report F", priority="high", tags=["work", "q2"], due_date="2026-07-01T00:00:00Z"),
        make_task(user_id, title="Report G", priority="high", tags=["work", "q2"]),  # no due date
        make_task(user_id, title="Memo", priority="high", tags=["work", "q2"], due_date=in_range),  # search
        make_task(user_id, title="Report H", priority="high", tags=["work", "q2"], due_date=in_range, completed=True),
    ]
    assert len(near_misses) == 6
    params = [
        ("status", "pending"),
        ("q", "REPORT"),
        ("priority", "high"),
        ("priority", "medium"),
        ("tag", "work"),
        ("tag", "q2"),
        ("due_after", "2026-06-01T00:00:00"),
        ("due_before", "2026-07-01T00:00:00Z"),
        ("sort", "priority"),
    ]
    a, b, c, d = (task["id"] for task in matching)
    expected = [c, a, d, b]  # high before medium, ties by id descending
    assert listed_ids(client, auth, user_id, params) == expected
    assert listed_ids(client, auth, user_id, [*params, ("order", "asc")]) == [b, d, a, c]
    assert listed_ids(client, auth, user_id, [*params[:-1], ("sort", "title")]) == [a, b, c, d]

    pages: list[int] = []
    for offset in range(0, 6, 3):
        response = client.get(
            tasks_url(user_id), params=[*params, ("limit", 3), ("offset", offset)], headers=auth(user_id)
        )
        pages += [task["id"] for task in json_of(response, 200)]
        assert response.headers["X-Total-Count"] == "4"
        links = response.headers.get("Link", "")
        assert ('rel="next"' in links) == (offset == 0), links
        assert ('rel="prev"' in links) == (offset > 0), links
    assert pages == expected

    next_link = client.get(tasks_url(user_id), params=[*params, ("limit", 3)], headers=auth(user_id)).links["next"]
    followed = client.get(next_link["url"], headers=auth(user_id))
    assert [task["id"] for task in json_of(followed, 200)] == expected[3:]


@pytest.mark.parametrize(
    "params",
    [
        [("priority", "urgent")],
        [("priority", "")],
        [("priority", "3")],
        [("priority", "high"), ("priority", "urgent")],
        [("due_after", "yesterday")],
        [("due_after", "")],
        [("due_before", "2026-13-01T00:00:00Z")],
        [("due_before", "1700000000")],
        [("tag", "")],
        [("tag", "   ")],
        [("tag", "t" * (TAG_MAX_LENGTH + 1))],
        [("tag", "nul\x00")],
        [("tag", f"tag {n}") for n in range(MAX_TAGS + 1)],
        [("sort", "importance")],
        [("sort", "completed")],
    ],
    ids=lambda params: repr(params)[:60],
)
def test_bad_filter_or_sort_values_are_422(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, params: list[tuple[str, str]]
) -> None:
    make_task(user_id, tags=["tag 1"], priority="high", due_date=AT_NOON)
    response = client.get(tasks_url(user_id), params=params, headers=auth(user_id))
    names = {name for name, _ in params}
    for issue in assert_validation_error(response):
        assert issue["loc"][0] == "query" and issue["loc"][1] in names, issue


def test_twenty_tags_in_a_filter_are_accepted(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    tags = [f"tag {n}" for n in range(MAX_TAGS)]
    task = make_task(user_id, tags=tags)["id"]
    make_task(user_id, tags=tags[:-1])
    assert listed_ids(client, auth, user_id, [("tag", tag.upper()) for tag in tags]) == [task]


# --- sorts ---------------------------------------------------------------------------------------


def test_priority_sort_is_high_to_none_by_default_with_ties_by_id_in_the_same_direction(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    ids = [make_task(user_id, priority=p)["id"] for p in ["low", "high", "none", "high", "medium", "none", "low"]]
    low_1, high_1, none_1, high_2, medium, none_2, low_2 = ids
    descending = [high_2, high_1, medium, low_2, low_1, none_2, none_1]
    assert listed_ids(client, auth, user_id, {"sort": "priority"}) == descending
    assert listed_ids(client, auth, user_id, {"sort": "priority", "order": "desc"}) == descending
    assert listed_ids(client, auth, user_id, {"sort": "priority", "order": "asc"}) == descending[::-1]


def test_priority_sort_follows_priority_changes(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    first, second = make_task(user_id, priority="high")["id"], make_task(user_id, priority="low")["id"]
    assert listed_ids(client, auth, user_id, {"sort": "priority"}) == [first, second]
    json_of(send_update(client, auth, user_id, first, "PATCH", {"priority": "none"}), 200)
    assert listed_ids(client, auth, user_id, {"sort": "priority"}) == [second, first]


def test_completed_at_sort_is_latest_first_by_default_with_pending_tasks_last_either_way(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    t0 = make_task(user_id)["id"]
    t1 = make_task(user_id, completed=True)["id"]
    t2 = make_task(user_id)["id"]
    t3 = make_task(user_id)["id"]
    t4 = make_task(user_id)["id"]
    toggle(client, auth, user_id, t3)
    toggle(client, auth, user_id, t0)  # completed last, though created first
    # Completed t1, then t3, then t0; t2 and t4 pending (ties, broken by id in the sort's direction).
    assert listed_ids(client, auth, user_id, {"sort": "completed_at"}) == [t0, t3, t1, t4, t2]
    assert listed_ids(client, auth, user_id, {"sort": "completed_at", "order": "desc"}) == [t0, t3, t1, t4, t2]
    assert listed_ids(client, auth, user_id, {"sort": "completed_at", "order": "asc"}) == [t1, t3, t0, t2, t4]

    toggle(client, auth, user_id, t3)  # reopened: among the pending again
    assert listed_ids(client, auth, user_id, {"sort": "completed_at"}) == [t0, t1, t4, t3, t2]
    assert listed_ids(client, auth, user_id, {"sort": "completed_at", "order": "asc"}) == [t1, t0, t2, t3, t4]
    completed_only = {"sort": "completed_at", "status": "completed"}
    assert listed_ids(client, auth, user_id, completed_only) == [t0, t1]
    pending_only = {"sort": "completed_at", "status": "pending", "order": "asc"}
    assert listed_ids(client, auth, user_id, pending_only) == [t2, t3, t4]


def test_completed_at_sort_pages_cover_every_task_once(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    ids = [make_task(user_id, completed=n % 3 == 0)["id"] for n in range(7)]
    for order in ("asc", "desc"):
        big_page = listed_ids(client, auth, user_id, {"sort": "completed_at", "order": order})
        assert sorted(big_page) == ids
        paged: list[int] = []
        for offset in range(0, 8, 2):
            params = {"sort": "completed_at", "order": order, "limit": 2, "offset": offset}
            response = client.get(tasks_url(user_id), params=params, headers=auth(user_id))
            assert response.headers["X-Total-Count"] == "7"
            paged += [task["id"] for task in json_of(response, 200)]
        assert paged == big_page


# --- GET /tags -----------------------------------------------------------------------------------


def test_tags_of_a_user_without_tasks_is_an_empty_list(client: httpx.Client, auth: Auth, user_id: str) -> None:
    response = client.get(tags_url(user_id), headers=auth(user_id))
    assert json_of(response, 200) == []
    assert response.headers["Cache-Control"] == "no-store"


def test_tags_are_counted_most_used_first_then_by_name_ignoring_case(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    make_task(user_id, tags=["home", "Beta", "alpha"])
    make_task(user_id, tags=["home", "errands"])
    make_task(user_id, tags=["errands", "HOME", "zeta"])
    make_task(user_id, tags=["Delta"])
    make_task(user_id)
    assert tag_counts(client, auth, user_id) == [
        ("home", 3),
        ("errands", 2),
        ("alpha", 1),
        ("Beta", 1),
        ("Delta", 1),
        ("zeta", 1),
    ]


def test_tags_count_spellings_that_differ_by_case_as_one_tag_beyond_ascii(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    make_task(user_id, tags=["Ärger"])
    make_task(user_id, tags=["ärger", "ÉTÉ"])
    make_task(user_id, tags=["ÄRGER", "été"])
    assert tag_counts(client, auth, user_id) == [("Ärger", 3), ("ÉTÉ", 2)]


def test_tags_are_spelled_as_on_the_oldest_live_task(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    oldest = make_task(user_id, tags=["work"])["id"]
    middle = make_task(user_id, tags=["Work"])["id"]
    make_task(user_id, tags=["WORK"])
    assert tag_counts(client, auth, user_id) == [("work", 3)]
    # A change to the oldest task keeps it the oldest (creation time counts, not the last change).
    json_of(send_update(client, auth, user_id, middle, "PATCH", {"title": "changed", "tags": ["Work", "x"]}), 200)
    assert tag_counts(client, auth, user_id) == [("work", 3), ("x", 1)]
    assert client.delete(task_url(user_id, oldest), headers=auth(user_id)).status_code == 204
    assert tag_counts(client, auth, user_id) == [("Work", 2), ("x", 1)]


def test_tags_spelling_ties_on_creation_time_go_to_the_lowest_id(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, database_engine: Engine
) -> None:
    """Creation times are set directly in the database: the API itself never gives two tasks the same one."""
    first = make_task(user_id, tags=["Spelled"])["id"]
    second = make_task(user_id, tags=["SPELLED"])["id"]
    tasks = Task.__table__
    with database_engine.begin() as connection:
        earlier = datetime(2020, 1, 1, tzinfo=UTC)
        connection.execute(update(tasks).where(tasks.c.id == second).values(created_at=earlier))
        connection.execute(update(tasks).where(tasks.c.id == first).values(created_at=earlier + timedelta(seconds=1)))
    assert tag_counts(client, auth, user_id) == [("SPELLED", 2)]  # the earlier creation, though the higher id
    with database_engine.begin() as connection:
        connection.execute(update(tasks).where(tasks.c.id == first).values(created_at=earlier))
    assert tag_counts(client, auth, user_id) == [("Spelled", 2)]  # same creation time: the lower id


def test_a_trashed_tasks_tags_leave_the_counts_and_come_back_on_restore(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    make_task(user_id, tags=["shared"])
    trashed = make_task(user_id, tags=["Shared", "only-here"])["id"]
    assert tag_counts(client, auth, user_id) == [("shared", 2), ("only-here", 1)]
    assert client.delete(task_url(user_id, trashed), headers=auth(user_id)).status_code == 204
    assert tag_counts(client, auth, user_id) == [("shared", 1)]
    assert listed_ids(client, auth, user_id, {"tag": "only-here"}) == []
    restored = json_of(client.post(f"/api/{user_id}/trash/{trashed}/restore", headers=auth(user_id)), 200)
    assert restored["tags"] == ["Shared", "only-here"]
    assert tag_counts(client, auth, user_id) == [("shared", 2), ("only-here", 1)]
    assert listed_ids(client, auth, user_id, {"tag": "only-here"}) == [trashed]


def test_a_task_deleted_for_good_takes_its_tags_with_it(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, tags=["gone"])["id"]
    assert client.delete(task_url(user_id, task), headers=auth(user_id)).status_code == 204
    assert client.delete(f"/api/{user_id}/trash/{task}", headers=auth(user_id)).status_code == 204
    assert tag_counts(client, auth, user_id) == []


def test_a_tag_removed_from_a_task_leaves_the_counts(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    first = make_task(user_id, tags=["keep", "drop"])["id"]
    second = make_task(user_id, tags=["drop"])["id"]
    assert tag_counts(client, auth, user_id) == [("drop", 2), ("keep", 1)]
    json_of(send_update(client, auth, user_id, first, "PATCH", {"tags": ["keep"]}), 200)
    assert tag_counts(client, auth, user_id) == [("drop", 1), ("keep", 1)]
    json_of(send_update(client, auth, user_id, second, "PATCH", {"tags": ["DROP"]}), 200)  # respelled
    assert tag_counts(client, auth, user_id) == [("DROP", 1), ("keep", 1)]
    json_of(send_update(client, auth, user_id, second, "PATCH", {"tags": []}), 200)
    assert tag_counts(client, auth, user_id) == [("keep", 1)]


def test_tags_never_include_another_users_tags(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    make_task(user_id, tags=["Mine", "both"])
    make_task(other_user_id, tags=["theirs", "BOTH"])
    make_task(other_user_id, tags=["both"])
    assert tag_counts(client, auth, user_id) == [("both", 1), ("Mine", 1)]
    assert tag_counts(client, auth, other_user_id) == [("BOTH", 2), ("theirs", 1)]


def test_tags_without_a_token_is_401(client: httpx.Client, user_id: str) -> None:
    response = client.get(tags_url(user_id))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert set(response.json()) == {"detail", "code"}


def test_another_users_tags_are_403(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    make_task(other_user_id, tags=["secret"])
    response = client.get(tags_url(other_user_id), headers=auth(user_id))
    assert json_of(response, 403)["code"] == "forbidden"
    assert "secret" not in response.text


def test_tags_have_an_etag_and_if_none_match_gives_304_until_they_change(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, tags=["one"])["id"]
    first = client.get(tags_url(user_id), headers=auth(user_id))
    etag = first.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        unchanged = client.get(tags_url(user_id), headers=auth(user_id) | {"If-None-Match": sent})
        assert unchanged.status_code == 304, sent
        assert unchanged.content == b""
        assert unchanged.headers["ETag"] == etag
    assert client.get(tags_url(user_id), headers=auth(user_id) | {"If-None-Match": '"other"'}).status_code == 200

    json_of(send_update(client, auth, user_id, task, "PATCH", {"tags": ["one", "two"]}), 200)
    changed = client.get(tags_url(user_id), headers=auth(user_id) | {"If-None-Match": etag})
    assert json_of(changed, 200) == [{"name": "one", "count": 1}, {"name": "two", "count": 1}]
    assert changed.headers["ETag"] != etag


def test_tags_answer_head_like_get(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    make_task(user_id, tags=["one"])
    got = client.get(tags_url(user_id), headers=auth(user_id))
    head = client.head(tags_url(user_id), headers=auth(user_id))
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["ETag"] == got.headers["ETag"]
