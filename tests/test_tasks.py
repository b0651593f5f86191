"""One task at a time, as the contract promises it: create, read, update, delete, complete.

Sections follow docs/api.md ("The task object", "Routes", and the 404/422 rows of "Errors").
Every test runs against the real app over real HTTP, on SQLite and, when TEST_DATABASE_URL is
set, on PostgreSQL (whose session time zone is deliberately not UTC).
"""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

if TYPE_CHECKING:
    from tests.conftest import LiveServer

Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]

TASK_FIELDS = {
    "id",
    "user_id",
    "title",
    "description",
    "completed",
    "completed_at",
    "priority",
    "tags",
    "due_date",
    "created_at",
    "updated_at",
    "version",
}
DATE_TIME_FIELDS = {"due_date", "created_at", "updated_at", "completed_at"}
# What a change moves by itself, besides the fields it sends.
CHANGE_MARKS = ("updated_at", "version", "completed_at")
TASK_NOT_FOUND = {"detail": "Task not found", "code": "task_not_found"}
UPDATE_METHODS = ["PUT", "PATCH"]

# Text that must come back exactly as sent, on every database.
EXACT_TEXTS = [
    pytest.param("Café naïve façade ß Ünïcödé", id="latin-accents"),
    pytest.param("日本語のタスク 中文 한국어", id="cjk"),
    pytest.param("Party 🎉 family 👨‍👩‍👧 flag 🇨🇦 math \U0001d518\U0001d52b\U0001d526", id="emoji-and-astral"),
    pytest.param("e\u0301 combining, zero\u200bwidth, \ufeffbom", id="combining-and-invisible"),
    pytest.param("He said \"hi\" and 'bye' and `tick`", id="quotes"),
    pytest.param("C:\\path\\to\\file and \\n is not a newline \\", id="backslashes"),
    pytest.param("'; DROP TABLE tasks; --", id="sql-injection"),
    pytest.param("Robert'); DELETE FROM tasks WHERE ('1'='1", id="sql-injection-2"),
    pytest.param("100% done_not _ %% %s {0} $1 ?", id="percent-underscore-placeholders"),
    pytest.param("line one\nline two\r\nline three\ttabbed", id="newlines-and-tabs"),
    pytest.param("שלום עולם مرحبا بالعالم", id="rtl"),
    pytest.param("\u202eRTL override\u202c and \u2028line separator", id="bidi-controls"),
    pytest.param("<script>alert('x')</script> &amp; {\"json\": [1]}", id="markup"),
]


def tasks_url(user_id: str) -> str:
    """The collection URL of a user's tasks."""
    return f"/api/{user_id}/tasks"


def task_url(user_id: str, task_id: int | str) -> str:
    """The URL of one of a user's tasks."""
    return f"/api/{user_id}/tasks/{task_id}"


def json_of(response: httpx.Response, status: int) -> Any:
    """The JSON body of a response that must have `status`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def assert_validation_error(response: httpx.Response) -> list[dict[str, Any]]:
    """Check a 422 in the contract's shape and return its list of issues."""
    body = json_of(response, 422)
    assert body["code"] == "validation_error"
    assert isinstance(body["detail"], list)
    assert body["detail"]
    for issue in body["detail"]:
        assert isinstance(issue["loc"], list)
        assert isinstance(issue["msg"], str)
        assert issue["msg"]
        assert isinstance(issue["type"], str)
    return body["detail"]


def assert_not_found(response: httpx.Response) -> None:
    """Check the one 404 a missing or foreign task gets."""
    assert json_of(response, 404) == TASK_NOT_FOUND


def utc_instant(value: str) -> datetime:
    """Parse a date-time the API returned, checking it is UTC with an explicit offset."""
    assert value.endswith(("Z", "+00:00")), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


def assert_task_shape(task: dict[str, Any], user_id: str) -> None:
    """Check a task has exactly the contract's fields, typed as promised, every date-time in UTC."""
    assert set(task) == TASK_FIELDS
    assert isinstance(task["id"], int)
    assert not isinstance(task["id"], bool)
    assert task["user_id"] == user_id
    assert isinstance(task["title"], str)
    assert task["description"] is None or isinstance(task["description"], str)
    assert isinstance(task["completed"], bool)
    assert (task["completed_at"] is not None) == task["completed"]
    assert task["priority"] in {"none", "low", "medium", "high"}
    assert isinstance(task["tags"], list) and all(isinstance(tag, str) for tag in task["tags"])
    assert isinstance(task["version"], int) and task["version"] >= 1
    for field in ("created_at", "updated_at"):
        utc_instant(task[field])
    if task["completed_at"] is not None:
        utc_instant(task["completed_at"])
    if task["due_date"] is not None:
        utc_instant(task["due_date"])


def comparable(task: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """A task with its date-times as instants (`Z` and `+00:00` are the same), without the fields `ignore`."""
    return {
        field: utc_instant(value) if field in DATE_TIME_FIELDS and value is not None else value
        for field, value in task.items()
        if field not in ignore
    }


def get_task(client: httpx.Client, auth: Auth, user_id: str, task_id: int) -> dict[str, Any]:
    """The task as its owner reads it now (200)."""
    return json_of(client.get(task_url(user_id, task_id), headers=auth(user_id)), 200)


def list_tasks(client: httpx.Client, auth: Auth, user_id: str) -> list[dict[str, Any]]:
    """All of a user's tasks (one page is enough for the handful these tests create)."""
    return json_of(client.get(tasks_url(user_id), headers=auth(user_id)), 200)


def assert_no_tasks(client: httpx.Client, auth: Auth, user_id: str) -> None:
    """Check that nothing was stored for the user."""
    response = client.get(tasks_url(user_id), headers=auth(user_id))
    assert json_of(response, 200) == []
    assert response.headers["X-Total-Count"] == "0"


def post_raw_json(client: httpx.Client, auth: Auth, user_id: str, text: str) -> httpx.Response:
    """POST `text` as the body verbatim, declared as JSON."""
    headers = auth(user_id) | {"Content-Type": "application/json"}
    return client.post(tasks_url(user_id), content=text.encode("utf-8", "surrogatepass"), headers=headers)


# --- POST /api/{user_id}/tasks ---------------------------------------------------------------


def test_create_returns_201_and_the_task_with_defaults(client: httpx.Client, auth: Auth, user_id: str) -> None:
    response = client.post(tasks_url(user_id), json={"title": "Buy milk"}, headers=auth(user_id))

    task = json_of(response, 201)
    assert_task_shape(task, user_id)
    assert task["title"] == "Buy milk"
    assert task["description"] is None
    assert task["completed"] is False
    assert task["due_date"] is None
    assert task["created_at"] == task["updated_at"]


def test_create_stores_every_field_sent(client: httpx.Client, auth: Auth, user_id: str) -> None:
    body = {"title": "Pay rent", "description": "Before the 1st", "completed": True, "due_date": "2026-12-01T17:00:00Z"}

    task = json_of(client.post(tasks_url(user_id), json=body, headers=auth(user_id)), 201)

    assert_task_shape(task, user_id)
    assert {field: task[field] for field in body} == body


def test_create_location_header_points_at_the_new_task(client: httpx.Client, auth: Auth, user_id: str) -> None:
    response = client.post(tasks_url(user_id), json={"title": "Find me"}, headers=auth(user_id))
    task = json_of(response, 201)

    location = urljoin(str(response.url), response.headers["Location"])
    assert urlsplit(location).path == task_url(user_id, task["id"])
    assert json_of(client.get(location, headers=auth(user_id)), 200) == task


def test_create_ignores_server_set_fields(client: httpx.Client, auth: Auth, user_id: str, other_user_id: str) -> None:
    body = {
        "title": "Sneaky",
        "id": 987_654_321,
        "user_id": other_user_id,
        "created_at": "2000-01-01T00:00:00Z",
        "updated_at": "2000-01-02T00:00:00Z",
    }

    task = json_of(client.post(tasks_url(user_id), json=body, headers=auth(user_id)), 201)

    assert task["id"] != body["id"]
    assert task["user_id"] == user_id
    assert utc_instant(task["created_at"]).year > 2000
    assert task["updated_at"] == task["created_at"]
    assert_no_tasks(client, auth, other_user_id)
    assert [t["id"] for t in list_tasks(client, auth, user_id)] == [task["id"]]


def test_create_trims_the_title(client: httpx.Client, auth: Auth, user_id: str) -> None:
    task = json_of(client.post(tasks_url(user_id), json={"title": " \t Buy milk \n "}, headers=auth(user_id)), 201)

    assert task["title"] == "Buy milk"
    assert get_task(client, auth, user_id, task["id"])["title"] == "Buy milk"


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        pytest.param("x" * 200, "x" * 200, id="200-ascii"),
        pytest.param("  " + "y" * 200 + "  ", "y" * 200, id="200-after-trimming"),
        pytest.param("é" * 200, "é" * 200, id="200-two-byte-characters"),
        pytest.param("😀" * 200, "😀" * 200, id="200-emoji"),
        pytest.param("z", "z", id="1-character"),
    ],
)
def test_title_of_1_to_200_characters_is_accepted(
    client: httpx.Client, auth: Auth, user_id: str, sent: str, stored: str
) -> None:
    task = json_of(client.post(tasks_url(user_id), json={"title": sent}, headers=auth(user_id)), 201)

    assert task["title"] == stored
    assert get_task(client, auth, user_id, task["id"])["title"] == stored


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"title": "x" * 201}, id="201-characters"),
        pytest.param({"title": "😀" * 201}, id="201-emoji"),
        pytest.param({"title": ""}, id="empty"),
        pytest.param({"title": "   "}, id="blank"),
        pytest.param({"title": "\t\n "}, id="white-space-only"),
        pytest.param({}, id="missing"),
        pytest.param({"description": "no title"}, id="missing-with-other-fields"),
        pytest.param({"title": None}, id="null"),
        pytest.param({"title": 42}, id="number"),
        pytest.param({"title": True}, id="boolean"),
        pytest.param({"title": ["a list"]}, id="list"),
        pytest.param({"title": {"text": "an object"}}, id="object"),
    ],
)
def test_invalid_title_is_422_and_nothing_is_stored(
    client: httpx.Client, auth: Auth, user_id: str, body: dict[str, Any]
) -> None:
    issues = assert_validation_error(client.post(tasks_url(user_id), json=body, headers=auth(user_id)))

    assert any(issue["loc"][-1] == "title" for issue in issues), issues
    assert_no_tasks(client, auth, user_id)


@pytest.mark.parametrize(
    "description",
    [
        pytest.param("d" * 1000, id="1000-ascii"),
        pytest.param("😀" * 1000, id="1000-emoji"),
        pytest.param("", id="empty"),
        pytest.param("  padded, not trimmed \n", id="white-space-kept"),
        pytest.param(None, id="null"),
    ],
)
def test_description_up_to_1000_characters_or_null_is_accepted(
    client: httpx.Client, auth: Auth, user_id: str, description: str | None
) -> None:
    body = {"title": "With description", "description": description}

    task = json_of(client.post(tasks_url(user_id), json=body, headers=auth(user_id)), 201)

    assert task["description"] == description
    assert get_task(client, auth, user_id, task["id"])["description"] == description


@pytest.mark.parametrize(
    "description",
    [
        pytest.param("d" * 1001, id="1001-characters"),
        pytest.param("😀" * 1001, id="1001-emoji"),
        pytest.param(7, id="number"),
        pytest.param(["a"], id="list"),
    ],
)
def test_invalid_description_is_422_and_nothing_is_stored(
    client: httpx.Client, auth: Auth, user_id: str, description: Any
) -> None:
    body = {"title": "Bad description", "description": description}

    issues = assert_validation_error(client.post(tasks_url(user_id), json=body, headers=auth(user_id)))

    assert any("description" in issue["loc"] for issue in issues), issues
    assert_no_tasks(client, auth, user_id)


@pytest.mark.parametrize(
    "completed",
    [pytest.param("maybe", id="word"), pytest.param(None, id="null"), pytest.param([True], id="list")],
)
def test_invalid_completed_is_422_and_nothing_is_stored(
    client: httpx.Client, auth: Auth, user_id: str, completed: Any
) -> None:
    body = {"title": "Bad completed", "completed": completed}

    issues = assert_validation_error(client.post(tasks_url(user_id), json=body, headers=auth(user_id)))

    assert any("completed" in issue["loc"] for issue in issues), issues
    assert_no_tasks(client, auth, user_id)


@pytest.mark.parametrize(
    ("sent", "returned"),
    [
        pytest.param("2026-12-01T17:00:00+05:30", "2026-12-01T11:30:00", id="positive-offset"),
        pytest.param("2026-12-01T17:00:00-03:30", "2026-12-01T20:30:00", id="negative-half-hour-offset"),
        pytest.param("2026-12-31T22:00:00-05:00", "2027-01-01T03:00:00", id="offset-crosses-the-year"),
        pytest.param("2026-12-01T17:00:00Z", "2026-12-01T17:00:00", id="zulu"),
        pytest.param("2026-12-01T17:00:00+00:00", "2026-12-01T17:00:00", id="zero-offset"),
        pytest.param("2026-12-01T17:00:00", "2026-12-01T17:00:00", id="no-offset-is-utc"),
        pytest.param("2026-07-01T09:15:30.123456", "2026-07-01T09:15:30.123456", id="no-offset-microseconds"),
        pytest.param("2026-12-01T17:00:00.5+01:00", "2026-12-01T16:00:00.5", id="fraction-with-offset"),
    ],
)
def test_due_date_is_returned_in_utc(client: httpx.Client, auth: Auth, user_id: str, sent: str, returned: str) -> None:
    expected = datetime.fromisoformat(returned + "+00:00")

    task = json_of(client.post(tasks_url(user_id), json={"title": "Due", "due_date": sent}, headers=auth(user_id)), 201)

    assert utc_instant(task["due_date"]) == expected
    assert utc_instant(get_task(client, auth, user_id, task["id"])["due_date"]) == expected
    assert utc_instant(list_tasks(client, auth, user_id)[0]["due_date"]) == expected


@pytest.mark.parametrize(
    "due_date",
    [
        pytest.param("0001-01-01T00:00:00Z", id="first-instant"),
        pytest.param("1800-06-15T12:00:00Z", id="before-standard-time"),
        pytest.param("9999-12-31T23:59:59.999999Z", id="last-instant"),
    ],
)
def test_due_date_at_the_edges_of_the_calendar_round_trips(
    client: httpx.Client, auth: Auth, user_id: str, due_date: str
) -> None:
    expected = datetime.fromisoformat(due_date)

    task = json_of(
        client.post(tasks_url(user_id), json={"title": "Far", "due_date": due_date}, headers=auth(user_id)), 201
    )

    assert utc_instant(task["due_date"]) == expected
    assert utc_instant(get_task(client, auth, user_id, task["id"])["due_date"]) == expected
    assert [utc_instant(t["due_date"]) for t in list_tasks(client, auth, user_id)] == [expected]


@pytest.mark.parametrize("due_date", ["0001-01-01T00:00:00Z", "0001-01-01T00:00:00", "9999-12-31T23:59:59.999999Z"])
def test_a_due_date_at_the_edge_never_leaves_the_list_unreadable(
    client: httpx.Client, auth: Auth, user_id: str, due_date: str
) -> None:
    created = client.post(tasks_url(user_id), json={"title": "Edge", "due_date": due_date}, headers=auth(user_id))

    response = client.get(tasks_url(user_id), headers=auth(user_id))
    listed = json_of(response, 200)
    # Accepted, it must be listed; refused, it must not have been stored.
    expected = [created.json()] if created.status_code == 201 else []
    assert listed == expected, created.text
    assert response.headers["X-Total-Count"] == str(len(expected))


def test_due_date_null_is_allowed(client: httpx.Client, auth: Auth, user_id: str) -> None:
    task = json_of(
        client.post(tasks_url(user_id), json={"title": "Someday", "due_date": None}, headers=auth(user_id)), 201
    )

    assert task["due_date"] is None
    assert get_task(client, auth, user_id, task["id"])["due_date"] is None


@pytest.mark.parametrize(
    "due_date",
    [
        pytest.param("tomorrow", id="word"),
        pytest.param("", id="empty"),
        pytest.param("2026-13-01T00:00:00Z", id="month-13"),
        pytest.param("2026-02-30T00:00:00Z", id="february-30"),
        pytest.param("2026-12-01T25:00:00Z", id="hour-25"),
        pytest.param("2026-12-01T17:00:00+25:00", id="offset-too-large"),
        pytest.param("9999-12-31T23:00:00-05:00", id="past-year-9999-in-utc"),
        pytest.param("0001-01-01T00:00:00+05:00", id="before-year-1-in-utc"),
        pytest.param(["2026-12-01"], id="list"),
    ],
)
def test_invalid_due_date_is_422_and_nothing_is_stored(
    client: httpx.Client, auth: Auth, user_id: str, due_date: Any
) -> None:
    body = {"title": "Bad due date", "due_date": due_date}

    issues = assert_validation_error(client.post(tasks_url(user_id), json=body, headers=auth(user_id)))

    assert any("due_date" in issue["loc"] for issue in issues), issues
    assert_no_tasks(client, auth, user_id)


def test_every_returned_date_time_is_utc_with_an_offset(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    created = make_task(user_id, "Dated", due_date="2026-03-08T01:30:00-03:30")
    task_path = task_url(user_id, created["id"])
    answers = [
        created,
        get_task(client, auth, user_id, created["id"]),
        *list_tasks(client, auth, user_id),
        json_of(client.patch(task_path, json={"title": "Dated again"}, headers=auth(user_id)), 200),
        json_of(client.put(task_path, json={"description": "d"}, headers=auth(user_id)), 200),
        json_of(client.patch(task_path + "/complete", headers=auth(user_id)), 200),
    ]

    for task in answers:
        assert_task_shape(task, user_id)
        assert utc_instant(task["due_date"]) == datetime.fromisoformat("2026-03-08T05:00:00+00:00")


@pytest.mark.parametrize("text", EXACT_TEXTS)
def test_text_round_trips_exactly(client: httpx.Client, auth: Auth, user_id: str, text: str) -> None:
    body = {"title": text, "description": text}

    task = json_of(client.post(tasks_url(user_id), json=body, headers=auth(user_id)), 201)

    assert (task["title"], task["description"]) == (text, text)
    stored = get_task(client, auth, user_id, task["id"])
    assert (stored["title"], stored["description"]) == (text, text)
    assert [(t["title"], t["description"]) for t in list_tasks(client, auth, user_id)] == [(text, text)]


@pytest.mark.parametrize("field", ["title", "description"])
@pytest.mark.parametrize("text", [pytest.param("nul\x00inside", id="inside"), pytest.param("\x00", id="alone")])
def test_nul_character_is_422_with_a_useful_detail(
    client: httpx.Client, auth: Auth, user_id: str, field: str, text: str
) -> None:
    body = {"title": "Fine title", field: text}

    issues = assert_validation_error(client.post(tasks_url(user_id), json=body, headers=auth(user_id)))

    about_field = [issue for issue in issues if field in issue["loc"]]
    assert about_field, issues
    assert any("NUL" in issue["msg"] or "null character" in issue["msg"].lower() for issue in about_field), issues
    assert_no_tasks(client, auth, user_id)


@pytest.mark.parametrize(
    "raw_body",
    [
        pytest.param('{"title": "\\ud800"}', id="title-high-surrogate"),
        pytest.param('{"title": "a\\udc00b"}', id="title-low-surrogate"),
        pytest.param('{"title": "ok", "description": "\\ud83d"}', id="description-half-emoji"),
    ],
)
def test_lone_surrogate_is_422(client: httpx.Client, auth: Auth, user_id: str, raw_body: str) -> None:
    assert_validation_error(post_raw_json(client, auth, user_id, raw_body))
    assert_no_tasks(client, auth, user_id)


def test_escaped_surrogate_pair_is_one_character(client: httpx.Client, auth: Auth, user_id: str) -> None:
    response = post_raw_json(client, auth, user_id, '{"title": "\\ud83d\\ude00"}')

    assert json_of(response, 201)["title"] == "😀"


@pytest.mark.parametrize(
    "raw_body",
    [
        pytest.param('{"title": "unterminated', id="unterminated-string"),
        pytest.param('{"title": "x",}', id="trailing-comma"),
        pytest.param("{'title': 'single quotes'}", id="single-quotes"),
        pytest.param("not json at all", id="plain-text"),
        pytest.param("", id="empty"),
    ],
)
def test_malformed_json_is_422(client: httpx.Client, auth: Auth, user_id: str, raw_body: str) -> None:
    assert_validation_error(post_raw_json(client, auth, user_id, raw_body))
    assert_no_tasks(client, auth, user_id)


@pytest.mark.parametrize(
    "raw_body",
    [
        pytest.param('[{"title": "in an array"}]', id="array"),
        pytest.param("[]", id="empty-array"),
        pytest.param('"a string"', id="string"),
        pytest.param("42", id="number"),
        pytest.param("null", id="null"),
    ],
)
def test_json_body_that_is_not_an_object_is_422(client: httpx.Client, auth: Auth, user_id: str, raw_body: str) -> None:
    assert_validation_error(post_raw_json(client, auth, user_id, raw_body))
    assert_no_tasks(client, auth, user_id)


# --- GET /api/{user_id}/tasks/{id} -----------------------------------------------------------


def test_get_returns_the_task(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    created = make_task(user_id, "Read me", description="Details", due_date="2026-05-01T08:00:00Z")

    task = get_task(client, auth, user_id, created["id"])

    assert_task_shape(task, user_id)
    assert task == created


def test_other_users_task_is_404_like_a_missing_one(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    theirs = make_task(other_user_id, "Private")
    mine = make_task(user_id, "Mine")
    missing_id = max(theirs["id"], mine["id"]) + 10_000

    assert_not_found(client.get(task_url(user_id, theirs["id"]), headers=auth(user_id)))
    assert_not_found(client.get(task_url(user_id, missing_id), headers=auth(user_id)))


@pytest.mark.parametrize("task_id", ["abc", "1.5", "1e3", "one", "0x10"])
def test_non_integer_id_is_422(client: httpx.Client, auth: Auth, user_id: str, task_id: str) -> None:
    issues = assert_validation_error(client.get(task_url(user_id, task_id), headers=auth(user_id)))

    assert any(issue["loc"][0] == "path" for issue in issues), issues


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        pytest.param("GET", "", None, id="get"),
        pytest.param("PUT", "", {"title": "x"}, id="put"),
        pytest.param("PATCH", "", {"title": "x"}, id="patch"),
        pytest.param("DELETE", "", None, id="delete"),
        pytest.param("PATCH", "/complete", None, id="complete"),
    ],
)
@pytest.mark.parametrize("task_id", [0, -1, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1])
def test_integer_id_without_a_task_is_404_however_large(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    make_task: MakeTask,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
    task_id: int,
) -> None:
    make_task(user_id, "Exists")

    response = client.request(method, task_url(user_id, task_id) + suffix, json=body, headers=auth(user_id))

    assert_not_found(response)


# --- PUT and PATCH /api/{user_id}/tasks/{id} -------------------------------------------------


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({"title": "  Renamed  "}, {"title": "Renamed"}, id="title"),
        pytest.param({"description": "New notes"}, {"description": "New notes"}, id="description"),
        pytest.param({"completed": True}, {"completed": True}, id="completed"),
        pytest.param({"due_date": "2027-01-01T12:00:00+01:00"}, {"due_date": "2027-01-01T11:00:00Z"}, id="due_date"),
        pytest.param(
            {"title": "All", "description": "of", "completed": True, "due_date": "2027-02-02T00:00:00"},
            {"title": "All", "description": "of", "completed": True, "due_date": "2027-02-02T00:00:00Z"},
            id="everything",
        ),
    ],
)
def test_update_changes_only_the_fields_sent(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    make_task: MakeTask,
    method: str,
    changes: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    original = make_task(user_id, "Original", description="Old notes", due_date="2026-06-01T09:00:00Z")

    response = client.request(method, task_url(user_id, original["id"]), json=changes, headers=auth(user_id))

    updated = json_of(response, 200)
    assert_task_shape(updated, user_id)
    assert comparable(updated, ignore=CHANGE_MARKS) == comparable(original | expected, ignore=CHANGE_MARKS)
    assert updated["version"] == original["version"] + 1
    assert get_task(client, auth, user_id, original["id"]) == updated


@pytest.mark.parametrize("method", UPDATE_METHODS)
def test_update_moves_updated_at_but_never_created_at(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str
) -> None:
    original = make_task(user_id, "Timestamps")

    updated = json_of(
        client.request(method, task_url(user_id, original["id"]), json={"title": "Changed"}, headers=auth(user_id)),
        200,
    )

    assert updated["created_at"] == original["created_at"]
    assert utc_instant(updated["updated_at"]) > utc_instant(original["updated_at"])
    again = json_of(
        client.request(method, task_url(user_id, original["id"]), json={"completed": True}, headers=auth(user_id)),
        200,
    )
    assert again["created_at"] == original["created_at"]
    assert utc_instant(again["updated_at"]) > utc_instant(updated["updated_at"])


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize("field", ["title", "completed"])
def test_update_with_null_title_or_completed_is_422_and_nothing_changes(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str, field: str
) -> None:
    original = make_task(user_id, "Keep me", description="Also me")

    response = client.request(
        method, task_url(user_id, original["id"]), json={field: None, "description": "changed"}, headers=auth(user_id)
    )

    issues = assert_validation_error(response)
    assert any(field in issue["loc"] for issue in issues), issues
    assert get_task(client, auth, user_id, original["id"]) == original


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize("field", ["description", "due_date"])
def test_update_with_null_description_or_due_date_clears_it(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str, field: str
) -> None:
    original = make_task(user_id, "Clear one", description="Notes", due_date="2026-06-01T09:00:00Z")

    updated = json_of(
        client.request(method, task_url(user_id, original["id"]), json={field: None}, headers=auth(user_id)), 200
    )

    assert updated[field] is None
    kept = "due_date" if field == "description" else "description"
    assert updated[kept] == original[kept]
    assert updated["title"] == original["title"]
    assert get_task(client, auth, user_id, original["id"])[field] is None


@pytest.mark.parametrize("method", UPDATE_METHODS)
def test_update_ignores_server_set_fields(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask, method: str
) -> None:
    original = make_task(user_id, "Send me back")
    # A client that edits the whole object and sends it back, server-set fields and all.
    edited = original | {
        "title": "Sent back",
        "id": original["id"] + 1000,
        "user_id": other_user_id,
        "created_at": "2000-01-01T00:00:00Z",
        "updated_at": "2000-01-01T00:00:00Z",
    }

    updated = json_of(
        client.request(method, task_url(user_id, original["id"]), json=edited, headers=auth(user_id)), 200
    )

    assert updated["id"] == original["id"]
    assert updated["user_id"] == user_id
    assert updated["title"] == "Sent back"
    assert updated["created_at"] == original["created_at"]
    assert utc_instant(updated["updated_at"]) > utc_instant(original["updated_at"])
    assert get_task(client, auth, user_id, original["id"]) == updated
    assert_no_tasks(client, auth, other_user_id)


@pytest.mark.parametrize("method", UPDATE_METHODS)
def test_update_with_empty_object_changes_nothing(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str
) -> None:
    original = make_task(user_id, "Untouched", description="Same", due_date="2026-06-01T09:00:00Z")

    response = client.request(method, task_url(user_id, original["id"]), json={}, headers=auth(user_id))

    assert json_of(response, 200) == original
    assert get_task(client, auth, user_id, original["id"]) == original


@pytest.mark.parametrize("method", UPDATE_METHODS)
def test_update_other_users_task_is_404_and_it_is_unchanged(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask, method: str
) -> None:
    theirs = make_task(other_user_id, "Not yours")

    response = client.request(
        method, task_url(user_id, theirs["id"]), json={"title": "Hijacked", "completed": True}, headers=auth(user_id)
    )

    assert_not_found(response)
    assert get_task(client, auth, other_user_id, theirs["id"]) == theirs


@pytest.mark.parametrize("method", UPDATE_METHODS)
def test_update_missing_task_is_404(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str
) -> None:
    task = make_task(user_id, "Soon gone")
    assert client.delete(task_url(user_id, task["id"]), headers=auth(user_id)).status_code == 204

    response = client.request(method, task_url(user_id, task["id"]), json={"title": "Ghost"}, headers=auth(user_id))

    assert_not_found(response)
    assert_no_tasks(client, auth, user_id)


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"title": ""}, id="empty-title"),
        pytest.param({"title": "   "}, id="blank-title"),
        pytest.param({"title": "x" * 201}, id="long-title"),
        pytest.param({"title": 5}, id="number-title"),
        pytest.param({"title": "nul\x00"}, id="nul-title"),
        pytest.param({"description": "d" * 1001}, id="long-description"),
        pytest.param({"description": "nul\x00"}, id="nul-description"),
        pytest.param({"completed": "maybe"}, id="word-completed"),
        pytest.param({"due_date": "next week"}, id="word-due-date"),
        pytest.param({"due_date": "9999-12-31T23:00:00-05:00"}, id="out-of-range-due-date"),
        pytest.param({"title": "Valid", "due_date": "nope"}, id="valid-and-invalid-together"),
    ],
)
def test_update_with_invalid_value_is_422_and_the_task_is_unchanged(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str, changes: dict[str, Any]
) -> None:
    original = make_task(user_id, "Stable", description="Stable notes", due_date="2026-06-01T09:00:00Z")

    response = client.request(method, task_url(user_id, original["id"]), json=changes, headers=auth(user_id))

    assert_validation_error(response)
    assert get_task(client, auth, user_id, original["id"]) == original


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize(
    "raw_body",
    [
        pytest.param('{"title": "\\ud800"}', id="lone-surrogate"),
        pytest.param('{"title": ', id="malformed"),
        pytest.param('["title"]', id="array"),
        pytest.param('"title"', id="string"),
    ],
)
def test_update_with_unusable_body_is_422_and_the_task_is_unchanged(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str, raw_body: str
) -> None:
    original = make_task(user_id, "Stable")
    headers = auth(user_id) | {"Content-Type": "application/json"}

    response = client.request(
        method, task_url(user_id, original["id"]), content=raw_body.encode("utf-8", "surrogatepass"), headers=headers
    )

    assert_validation_error(response)
    assert get_task(client, auth, user_id, original["id"]) == original


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize("text", EXACT_TEXTS)
def test_update_text_round_trips_exactly(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, method: str, text: str
) -> None:
    original = make_task(user_id, "Plain")

    updated = json_of(
        client.request(
            method, task_url(user_id, original["id"]), json={"title": text, "description": text}, headers=auth(user_id)
        ),
        200,
    )

    assert (updated["title"], updated["description"]) == (text, text)
    stored = get_task(client, auth, user_id, original["id"])
    assert (stored["title"], stored["description"]) == (text, text)


# --- DELETE /api/{user_id}/tasks/{id} --------------------------------------------------------


def test_delete_is_204_with_an_empty_body_and_the_task_is_gone(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, "Delete me")
    kept = make_task(user_id, "Keep me")

    response = client.delete(task_url(user_id, task["id"]), headers=auth(user_id))

    assert response.status_code == 204
    assert response.content == b""
    assert_not_found(client.get(task_url(user_id, task["id"]), headers=auth(user_id)))
    assert list_tasks(client, auth, user_id) == [kept]


def test_delete_twice_is_404(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    task = make_task(user_id, "Once")
    assert client.delete(task_url(user_id, task["id"]), headers=auth(user_id)).status_code == 204

    assert_not_found(client.delete(task_url(user_id, task["id"]), headers=auth(user_id)))


def test_delete_other_users_task_is_404_and_it_still_exists(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    theirs = make_task(other_user_id, "Not yours to delete")

    assert_not_found(client.delete(task_url(user_id, theirs["id"]), headers=auth(user_id)))

    assert get_task(client, auth, other_user_id, theirs["id"]) == theirs


# --- PATCH /api/{user_id}/tasks/{id}/complete ------------------------------------------------


def complete(
    client: httpx.Client, auth: Auth, user_id: str, task_id: int, body: Any = None, raw_body: str | None = None
) -> httpx.Response:
    """PATCH the task's `/complete` route: no body, `body` as JSON, or `raw_body` verbatim as JSON."""
    url = task_url(user_id, task_id) + "/complete"
    if raw_body is not None:
        headers = auth(user_id) | {"Content-Type": "application/json"}
        return client.patch(url, content=raw_body.encode(), headers=headers)
    return client.patch(url, json=body, headers=auth(user_id))


def test_complete_without_body_toggles(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    task = make_task(user_id, "Flip")

    first = json_of(complete(client, auth, user_id, task["id"]), 200)
    second = json_of(complete(client, auth, user_id, task["id"]), 200)

    assert first["completed"] is True
    assert second["completed"] is False
    assert_task_shape(second, user_id)
    assert {k: second[k] for k in ("id", "title", "created_at")} == {k: task[k] for k in ("id", "title", "created_at")}
    assert get_task(client, auth, user_id, task["id"]) == second


def test_complete_with_empty_object_toggles(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, "Flip")

    assert json_of(complete(client, auth, user_id, task["id"], {}), 200)["completed"] is True
    assert json_of(complete(client, auth, user_id, task["id"], {}), 200)["completed"] is False


def test_complete_true_sets_it_and_stays_set(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, "Done")

    assert json_of(complete(client, auth, user_id, task["id"], {"completed": True}), 200)["completed"] is True
    assert json_of(complete(client, auth, user_id, task["id"], {"completed": True}), 200)["completed"] is True
    assert get_task(client, auth, user_id, task["id"])["completed"] is True


def test_complete_false_sets_it_and_stays_set(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id, "Undone", completed=True)

    assert json_of(complete(client, auth, user_id, task["id"], {"completed": False}), 200)["completed"] is False
    assert json_of(complete(client, auth, user_id, task["id"], {"completed": False}), 200)["completed"] is False
    assert get_task(client, auth, user_id, task["id"])["completed"] is False


@pytest.mark.parametrize("body", [pytest.param(None, id="toggle"), pytest.param({"completed": True}, id="set")])
def test_complete_moves_updated_at_but_never_created_at(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, body: dict[str, bool] | None
) -> None:
    task = make_task(user_id, "Stamp")

    completed = json_of(complete(client, auth, user_id, task["id"], body), 200)

    assert completed["created_at"] == task["created_at"]
    assert utc_instant(completed["updated_at"]) > utc_instant(task["updated_at"])


@pytest.mark.parametrize("body", [pytest.param(None, id="toggle"), pytest.param({"completed": True}, id="set")])
def test_complete_other_users_task_is_404_and_it_is_unchanged(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    other_user_id: str,
    make_task: MakeTask,
    body: dict[str, bool] | None,
) -> None:
    theirs = make_task(other_user_id, "Not yours to finish")

    assert_not_found(complete(client, auth, user_id, theirs["id"], body))

    assert get_task(client, auth, other_user_id, theirs["id"]) == theirs


def test_complete_missing_task_is_404(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    task = make_task(user_id, "Gone")
    assert client.delete(task_url(user_id, task["id"]), headers=auth(user_id)).status_code == 204

    assert_not_found(complete(client, auth, user_id, task["id"]))


@pytest.mark.parametrize(
    "raw_body",
    [
        pytest.param('{"completed": "maybe"}', id="word"),
        pytest.param('{"completed": [true]}', id="list"),
        pytest.param('{"completed": ', id="malformed"),
        pytest.param("[true]", id="array"),
    ],
)
def test_complete_with_invalid_body_is_422_and_the_task_is_unchanged(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, raw_body: str
) -> None:
    task = make_task(user_id, "Stable")

    response = complete(client, auth, user_id, task["id"], raw_body=raw_body)

    assert_validation_error(response)
    assert get_task(client, auth, user_id, task["id"]) == task


# --- Concurrency -----------------------------------------------------------------------------

CONCURRENT_REQUESTS = 20


def run_concurrently(
    server: "LiveServer", request: Callable[[httpx.Client], httpx.Response], count: int = CONCURRENT_REQUESTS
) -> list[httpx.Response]:
    """Send `request` from `count` threads at once, each with its own connection, and return the answers."""
    start_together = threading.Barrier(count)

    def worker() -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as own_client:
            start_together.wait(timeout=60)
            return request(own_client)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(worker) for _ in range(count)]
        return [future.result() for future in futures]


@pytest.mark.parametrize("toggles", [CONCURRENT_REQUESTS, CONCURRENT_REQUESTS + 1])
def test_concurrent_toggles_each_flip_the_task_once(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, server: "LiveServer", toggles: int
) -> None:
    task = make_task(user_id, "Contended")
    headers = auth(user_id)

    responses = run_concurrently(
        server, lambda http: http.patch(task_url(user_id, task["id"]) + "/complete", headers=headers), toggles
    )

    assert [response.status_code for response in responses] == [200] * toggles
    for response in responses:
        assert_task_shape(response.json(), user_id)
    # Each answer shows the state its own flip produced: the flips alternate, so the answers split evenly.
    answered_true = sum(response.json()["completed"] for response in responses)
    assert answered_true == (toggles + (not task["completed"])) // 2
    # An even number of flips leaves it where it started; an odd number, the other way.
    expected = task["completed"] if toggles % 2 == 0 else not task["completed"]
    assert get_task(client, auth, user_id, task["id"])["completed"] is expected


def test_concurrent_creates_get_distinct_ids(
    client: httpx.Client, auth: Auth, user_id: str, server: "LiveServer"
) -> None:
    headers = auth(user_id)
    counter = iter(range(CONCURRENT_REQUESTS))
    counter_lock = threading.Lock()

    def create(http: httpx.Client) -> httpx.Response:
        with counter_lock:
            number = next(counter)
        return http.post(tasks_url(user_id), json={"title": f"Task {number}"}, headers=headers)

    responses = run_concurrently(server, create)

    assert [response.status_code for response in responses] == [201] * CONCURRENT_REQUESTS
    created = [response.json() for response in responses]
    assert len({task["id"] for task in created}) == CONCURRENT_REQUESTS
    assert sorted(task["title"] for task in created) == sorted(f"Task {n}" for n in range(CONCURRENT_REQUESTS))
    listed = list_tasks(client, auth, user_id)
    assert sorted(task["id"] for task in listed) == sorted(task["id"] for task in created)
