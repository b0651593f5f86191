"""Listing a user's tasks, as the contract's "Listing" section promises it.

Filtering (`status`, `q`), ordering (`sort`, `order`: total and stable, ties broken by id, titles
case-insensitive, tasks without a due date last), paging (`limit`, `offset`) with `X-Total-Count`
and an RFC 8288 `Link` header, and 422 for unknown values. Every test runs on SQLite and, when
TEST_DATABASE_URL is set, on PostgreSQL.
"""

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]
Task = dict[str, Any]

DEFAULT_ORDER = {"created": "desc", "updated": "desc", "title": "asc", "due_date": "asc"}
SORT_FIELDS = {"created": "created_at", "updated": "updated_at", "title": "title", "due_date": "due_date"}
# One link-value of an RFC 8288 header: `<uri>` and its parameters, up to the next top-level comma.
LINK_VALUE = re.compile(r'\s*<(?P<uri>[^>]*)>(?P<params>(?:\s*;\s*[^;,=\s]+\s*=\s*(?:"[^"]*"|[^;,\s]+))*)\s*(?:,|$)')
LINK_REL = re.compile(r';\s*rel\s*=\s*(?:"(?P<quoted>[^"]*)"|(?P<bare>[^;,\s]+))')

# Titles that tie case-insensitively, due dates that tie as instants (written with different
# offsets), tasks without a due date, and a mix of completed and pending tasks.
VARIED_TASKS: list[dict[str, Any]] = [
    {"title": "cherry", "due_date": "2026-05-01T12:00:00Z"},
    {"title": "Banana", "description": "with walnuts", "completed": True},
    {"title": "apple", "due_date": "2026-05-01T14:00:00+02:00"},
    {"title": "Same", "due_date": "2026-03-01T00:00:00", "completed": True},
    {"title": "same", "description": "lower case"},
    {"title": "SAME", "due_date": "2026-03-01T00:00:00Z"},
    {"title": "date", "due_date": "2025-12-31T23:30:00-01:00"},
    {"title": "zucchini", "due_date": "2027-01-01T00:00:00Z", "completed": True},
    {"title": "10 eggs"},
    {"title": "Fig", "due_date": "2026-01-01T00:30:00Z", "completed": True},
    {"title": "grape", "completed": True},
    {"title": "egg", "due_date": "2026-05-01T12:00:00Z"},
    {"title": "Honeydew", "due_date": "2026-02-14T08:00:00-03:30"},
]
# Touched after creation, in this order, so that "updated" orders differently from "created".
TOUCHED_AFTERWARDS = [3, 0, 11, 6]


def tasks_url(user_id: str) -> str:
    """The collection URL of a user's tasks."""
    return f"/api/{user_id}/tasks"


def json_of(response: httpx.Response, status: int) -> Any:
    """The JSON body of a response that must have `status`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def fetch(client: httpx.Client, auth: Auth, user_id: str, **params: Any) -> httpx.Response:
    """GET the user's task list with these query parameters."""
    return client.get(tasks_url(user_id), params=params, headers=auth(user_id))


def page_of(response: httpx.Response) -> list[Task]:
    """The tasks of a successful list response, checking it is a JSON array with a total."""
    tasks = json_of(response, 200)
    assert isinstance(tasks, list)
    assert int(response.headers["X-Total-Count"]) >= len(tasks)
    return tasks


def ids(tasks: list[Task]) -> list[int]:
    """The ids of tasks, in their order."""
    return [task["id"] for task in tasks]


def titles(tasks: list[Task]) -> list[str]:
    """The titles of tasks, in their order."""
    return [task["title"] for task in tasks]


def total_count(response: httpx.Response) -> int:
    """The `X-Total-Count` header as a number."""
    value = response.headers["X-Total-Count"]
    assert value.isdigit(), value
    return int(value)


def parse_link_header(response: httpx.Response) -> dict[str, str]:
    """The `Link` header as {rel: absolute URL}; {} when there is none. Fails on a malformed header."""
    header = response.headers.get("Link")
    if header is None:
        return {}
    links: dict[str, str] = {}
    position = 0
    while position < len(header):
        match = LINK_VALUE.match(header, position)
        assert match and match.end() > position, f"malformed Link header: {header!r}"
        rel = LINK_REL.search(match["params"])
        assert rel, f"link without rel: {match.group(0)!r}"
        for name in (rel["quoted"] or rel["bare"]).split():
            assert name not in links, f"rel {name!r} given twice: {header!r}"
            links[name] = urljoin(str(response.url), match["uri"])
        position = match.end()
    return links


def query_of(url: str) -> dict[str, str]:
    """The query parameters of a URL, each given once."""
    parsed = parse_qs(urlsplit(url).query, keep_blank_values=True)
    assert all(len(values) == 1 for values in parsed.values()), url
    return {name: values[0] for name, values in parsed.items()}


def utc_instant(value: str) -> datetime:
    """Parse a date-time the API returned, checking it is UTC with an explicit offset."""
    assert value.endswith(("Z", "+00:00")), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


def sort_key(task: Task, sort: str) -> Any:
    """What the contract orders tasks by for `sort`; None for a task without a due date."""
    value = task[SORT_FIELDS[sort]]
    if sort == "title":
        return value.lower()
    return None if value is None else utc_instant(value)


def expected_order(tasks: list[Task], sort: str, order: str | None = None) -> list[int]:
    """The ids of `tasks` in the contract's order: by the sort key, ties by id in the same direction,
    tasks without a due date last whatever the direction."""
    descending = (order or DEFAULT_ORDER[sort]) == "desc"
    keyed = [task for task in tasks if sort_key(task, sort) is not None]
    unkeyed = [task for task in tasks if sort_key(task, sort) is None]
    ordered = sorted(keyed, key=lambda task: (sort_key(task, sort), task["id"]), reverse=descending)
    ordered += sorted(unkeyed, key=lambda task: task["id"], reverse=descending)
    return ids(ordered)


def everything(client: httpx.Client, auth: Auth, user_id: str, **params: Any) -> list[Task]:
    """Every matching task on one big page."""
    response = fetch(client, auth, user_id, limit=500, **params)
    tasks = page_of(response)
    assert total_count(response) == len(tasks)
    assert "Link" not in response.headers
    return tasks


@pytest.fixture
def varied_tasks(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> list[Task]:
    """VARIED_TASKS for `user_id`, some touched after creation; their state as the API now reports it."""
    created = [make_task(user_id, **fields) for fields in VARIED_TASKS]
    for index in TOUCHED_AFTERWARDS:
        url = f"{tasks_url(user_id)}/{created[index]['id']}"
        assert client.patch(url, json={"description": f"touched {index}"}, headers=auth(user_id)).status_code == 200
    return everything(client, auth, user_id)


# --- What is listed ----------------------------------------------------------------------------


def test_list_is_a_json_array_of_only_the_users_tasks(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str, make_task: MakeTask
) -> None:
    mine = [make_task(user_id, "Mine 1"), make_task(user_id, "Mine 2", completed=True)]
    make_task(other_user_id, "Theirs 1")
    make_task(other_user_id, "Mine 3 lookalike")

    response = fetch(client, auth, user_id)

    tasks = page_of(response)
    assert sorted(ids(tasks)) == sorted(ids(mine))
    assert all(task["user_id"] == user_id for task in tasks)
    assert sorted(tasks, key=lambda task: task["id"]) == sorted(mine, key=lambda task: task["id"])
    assert total_count(response) == 2


def test_list_of_a_user_without_tasks_is_empty(client: httpx.Client, auth: Auth, user_id: str) -> None:
    response = fetch(client, auth, user_id)

    assert page_of(response) == []
    assert total_count(response) == 0
    assert "Link" not in response.headers


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({}, id="no-filter"),
        pytest.param({"status": "pending"}, id="pending"),
        pytest.param({"status": "completed"}, id="completed"),
        pytest.param({"q": "task"}, id="search"),
        pytest.param({"sort": "title", "limit": 1}, id="paged"),
    ],
)
def test_other_users_tasks_never_appear(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    other_user_id: str,
    make_task: MakeTask,
    params: dict[str, Any],
) -> None:
    for completed in (False, True):
        make_task(other_user_id, "A task of theirs", completed=completed)
    make_task(user_id, "The other task", completed=True)
    make_task(user_id, "My task")

    response = fetch(client, auth, user_id, **params)

    assert all(task["user_id"] == user_id for task in page_of(response))
    expected_total = 1 if "status" in params else 2
    assert total_count(response) == expected_total


@pytest.mark.parametrize(
    ("status", "expected_titles"),
    [
        pytest.param(None, {"Open 1", "Open 2", "Done 1", "Done 2"}, id="default-is-all"),
        pytest.param("all", {"Open 1", "Open 2", "Done 1", "Done 2"}, id="all"),
        pytest.param("pending", {"Open 1", "Open 2"}, id="pending"),
        pytest.param("completed", {"Done 1", "Done 2"}, id="completed"),
    ],
)
def test_status_filters_the_list(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    make_task: MakeTask,
    status: str | None,
    expected_titles: set[str],
) -> None:
    make_task(user_id, "Open 1")
    make_task(user_id, "Done 1", completed=True)
    make_task(user_id, "Open 2")
    make_task(user_id, "Done 2", completed=True)

    response = fetch(client, auth, user_id, **({"status": status} if status else {}))

    tasks = page_of(response)
    assert set(titles(tasks)) == expected_titles
    assert len(tasks) == len(expected_titles)
    assert total_count(response) == len(expected_titles)


def test_status_follows_completion_changes(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    task = make_task(user_id, "Flip me")
    assert client.patch(f"{tasks_url(user_id)}/{task['id']}/complete", headers=auth(user_id)).status_code == 200

    assert ids(page_of(fetch(client, auth, user_id, status="completed"))) == [task["id"]]
    assert page_of(fetch(client, auth, user_id, status="pending")) == []


def test_total_count_ignores_limit_and_offset(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    for number in range(5):
        make_task(user_id, f"Task {number}", completed=number % 2 == 0)

    first = fetch(client, auth, user_id, limit=2)
    middle = fetch(client, auth, user_id, limit=2, offset=2)
    filtered = fetch(client, auth, user_id, status="completed", limit=1, offset=1)

    assert (len(page_of(first)), total_count(first)) == (2, 5)
    assert (len(page_of(middle)), total_count(middle)) == (2, 5)
    assert (len(page_of(filtered)), total_count(filtered)) == (1, 3)


def test_default_limit_is_100_and_500_is_allowed(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    for number in range(101):
        make_task(user_id, f"Task {number:03}")

    default = fetch(client, auth, user_id)
    largest = fetch(client, auth, user_id, limit=500)

    assert len(page_of(default)) == 100
    assert total_count(default) == 101
    assert "next" in parse_link_header(default)
    assert len(page_of(largest)) == 101
    assert total_count(largest) == 101
    assert "Link" not in largest.headers


# --- Search ------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", ["milk", "MILK", "MiLk", "il"])
def test_q_matches_inside_title_or_description_case_insensitively(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, q: str
) -> None:
    in_title = make_task(user_id, "Buy Milk")
    in_description = make_task(user_id, "Shopping", description="oat MILK and bread")
    make_task(user_id, "Bread", description="whole grain")

    response = fetch(client, auth, user_id, q=q)

    assert sorted(ids(page_of(response))) == sorted([in_title["id"], in_description["id"]])
    assert total_count(response) == 2


@pytest.mark.parametrize("field", ["title", "description"])
@pytest.mark.parametrize(
    ("q", "stored"),
    [
        pytest.param("ÉCOLE", "l'école du soir", id="upper-accent-finds-lower"),
        pytest.param("école", "L'ÉCOLE DU SOIR", id="lower-accent-finds-upper"),
        pytest.param("ÜBER", "über alles", id="umlaut"),
        pytest.param("ЖУРНАЛ", "мой журнал", id="cyrillic"),
        pytest.param("ÑANDÚ", "el ñandú corre", id="tilde-and-acute"),
    ],
)
def test_q_matches_non_ascii_text_case_insensitively(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, field: str, q: str, stored: str
) -> None:
    fields = {"title": stored} if field == "title" else {"title": "Plain", "description": stored}
    match = make_task(user_id, **fields)
    make_task(user_id, "Unrelated", description="nothing to see")

    response = fetch(client, auth, user_id, q=q)

    assert ids(page_of(response)) == [match["id"]]
    assert total_count(response) == 1


@pytest.mark.parametrize(
    ("q", "matching", "not_matching"),
    [
        pytest.param("50%", ["50% off", "now 50%"], ["500 items", "50 percent", "5%0"], id="percent"),
        pytest.param("%", ["100%"], ["no percent sign"], id="percent-alone"),
        pytest.param("a_b", ["a_b", "xa_by"], ["axb", "ab", "a-b"], id="underscore"),
        pytest.param("_", ["snake_case"], ["no underscore"], id="underscore-alone"),
        pytest.param("C:\\temp", ["C:\\temp\\file"], ["C:temp", "C:/temp", "C:\\\\temp"], id="backslash"),
        pytest.param("\\", ["back\\slash"], ["forward/slash", "plain"], id="backslash-alone"),
        pytest.param("\\%", ["odd \\% text"], ["odd % text", "odd \\ text"], id="backslash-percent"),
        pytest.param("it's", ["it's done"], ["its done"], id="quote"),
        pytest.param("'; DROP", ["x'; DROP TABLE tasks; --"], ["DROP"], id="sql-looking"),
    ],
)
def test_q_wildcards_and_escapes_match_literally(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    make_task: MakeTask,
    q: str,
    matching: list[str],
    not_matching: list[str],
) -> None:
    expected = [make_task(user_id, title)["id"] for title in matching]
    for title in not_matching:
        make_task(user_id, "Decoy", description=title)

    response = fetch(client, auth, user_id, q=q)

    assert sorted(ids(page_of(response))) == sorted(expected)
    assert total_count(response) == len(expected)


def test_empty_q_matches_everything(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    made = [make_task(user_id, "One"), make_task(user_id, "Two", description="desc")]

    response = fetch(client, auth, user_id, q="")

    assert sorted(ids(page_of(response))) == sorted(ids(made))
    assert total_count(response) == 2


def test_q_combines_with_status(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    done = make_task(user_id, "Report draft", completed=True)
    make_task(user_id, "Report final")
    make_task(user_id, "Other", completed=True)

    response = fetch(client, auth, user_id, q="report", status="completed")

    assert ids(page_of(response)) == [done["id"]]
    assert total_count(response) == 1


# --- Order -------------------------------------------------------------------------------------


def test_default_order_is_newest_created_first(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    made = [make_task(user_id, title) for title in ("First", "Second", "Third")]

    assert ids(page_of(fetch(client, auth, user_id))) == ids(made)[::-1]
    assert ids(page_of(fetch(client, auth, user_id, sort="created"))) == ids(made)[::-1]
    assert ids(page_of(fetch(client, auth, user_id, sort="created", order="asc"))) == ids(made)


def test_sort_updated_puts_the_latest_change_first(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    first, second, third = (make_task(user_id, title) for title in ("First", "Second", "Third"))
    assert client.patch(f"{tasks_url(user_id)}/{first['id']}", json={"title": "1st"}, headers=auth(user_id)).is_success

    assert ids(page_of(fetch(client, auth, user_id, sort="updated"))) == [first["id"], third["id"], second["id"]]
    assert ids(page_of(fetch(client, auth, user_id, sort="updated", order="asc"))) == [
        second["id"],
        third["id"],
        first["id"],
    ]


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        pytest.param(None, ["apple", "Banana", "cherry"], id="default-asc"),
        pytest.param("asc", ["apple", "Banana", "cherry"], id="asc"),
        pytest.param("desc", ["cherry", "Banana", "apple"], id="desc"),
    ],
)
def test_title_sorts_case_insensitively(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, order: str | None, expected: list[str]
) -> None:
    for title in ("cherry", "Banana", "apple"):
        make_task(user_id, title)

    response = fetch(client, auth, user_id, sort="title", **({"order": order} if order else {}))

    assert titles(page_of(response)) == expected


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_equal_titles_break_ties_by_id(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, order: str
) -> None:
    made = [make_task(user_id, title) for title in ("same", "SAME", "Same", "same")]
    made_ids = ids(made)

    response = fetch(client, auth, user_id, sort="title", order=order)

    assert ids(page_of(response)) == (sorted(made_ids) if order == "asc" else sorted(made_ids, reverse=True))


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_equal_due_dates_break_ties_by_id(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, order: str
) -> None:
    # One instant, written three ways.
    due_dates = [
        "2026-05-01T12:00:00Z",
        "2026-05-01T17:30:00+05:30",
        "2026-05-01T12:00:00",
        "2026-05-01T08:30:00-03:30",
    ]
    made_ids = ids([make_task(user_id, f"Task {n}", due_date=due) for n, due in enumerate(due_dates)])

    response = fetch(client, auth, user_id, sort="due_date", order=order)

    assert ids(page_of(response)) == (sorted(made_ids) if order == "asc" else sorted(made_ids, reverse=True))


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        pytest.param(None, ["early", "middle", "late", "none 1", "none 2"], id="default-asc"),
        pytest.param("asc", ["early", "middle", "late", "none 1", "none 2"], id="asc"),
        pytest.param("desc", ["late", "middle", "early", "none 2", "none 1"], id="desc"),
    ],
)
def test_tasks_without_due_date_come_last(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, order: str | None, expected: list[str]
) -> None:
    make_task(user_id, "none 1")
    make_task(user_id, "late", due_date="2027-01-01T00:00:00Z")
    make_task(user_id, "early", due_date="2025-01-01T00:00:00Z")
    make_task(user_id, "none 2", due_date=None)
    make_task(user_id, "middle", due_date="2026-01-01T00:00:00Z")

    response = fetch(client, auth, user_id, sort="due_date", **({"order": order} if order else {}))

    assert titles(page_of(response)) == expected


def test_due_date_sorts_by_instant_not_by_local_time(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    # Written later on the clock face, but earlier in UTC.
    earlier = make_task(user_id, "earlier", due_date="2026-01-01T10:00:00+05:00")  # 05:00Z
    later = make_task(user_id, "later", due_date="2026-01-01T06:00:00Z")
    latest = make_task(user_id, "latest", due_date="2026-01-01T04:00:00-03:30")  # 07:30Z

    response = fetch(client, auth, user_id, sort="due_date")

    assert ids(page_of(response)) == [earlier["id"], later["id"], latest["id"]]


@pytest.mark.parametrize("sort", ["created", "updated", "title", "due_date"])
@pytest.mark.parametrize("order", [None, "asc", "desc"])
def test_every_sort_and_order_gives_the_contract_order(
    client: httpx.Client, auth: Auth, user_id: str, varied_tasks: list[Task], sort: str, order: str | None
) -> None:
    params = {"sort": sort} | ({"order": order} if order else {})

    response = fetch(client, auth, user_id, **params)

    assert ids(page_of(response)) == expected_order(varied_tasks, sort, order)
    assert total_count(response) == len(VARIED_TASKS)


# --- Invalid queries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"status": "done"},
        {"status": "ALL"},
        {"status": ""},
        {"sort": "importance"},
        {"sort": "id"},
        {"sort": ""},
        {"order": "up"},
        {"order": "DESC"},
        {"limit": 0},
        {"limit": 501},
        {"limit": -1},
        {"limit": "abc"},
        {"limit": "1.5"},
        {"limit": 10**30},
        {"offset": -1},
        {"offset": "abc"},
        {"offset": "2.5"},
        {"q": "nul\x00"},
    ],
    ids=lambda params: "&".join(f"{name}={value!r}" for name, value in params.items()),
)
def test_unknown_query_value_is_422(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, params: dict[str, Any]
) -> None:
    make_task(user_id, "Exists")

    response = fetch(client, auth, user_id, **params)

    body = json_of(response, 422)
    assert body["code"] == "validation_error"
    assert isinstance(body["detail"], list)
    assert body["detail"]
    for issue in body["detail"]:
        assert {"loc", "msg", "type"} <= set(issue)
    assert any(issue["loc"][:1] == ["query"] and issue["loc"][-1] in params for issue in body["detail"]), body


@pytest.mark.parametrize("params", [{"limit": 1}, {"limit": 500}, {"offset": 0}, {"order": "asc"}, {"order": "desc"}])
def test_boundary_query_values_are_accepted(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, params: dict[str, Any]
) -> None:
    make_task(user_id, "Exists")

    response = fetch(client, auth, user_id, **params)

    assert len(page_of(response)) == 1
    assert total_count(response) == 1


# --- Paging ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": 1}, id="limit-1-default"),
        pytest.param({"limit": 2, "sort": "title"}, id="limit-2-title"),
        pytest.param({"limit": 3, "sort": "due_date", "order": "desc"}, id="limit-3-due-desc"),
        pytest.param({"limit": 4, "sort": "updated", "order": "asc"}, id="limit-4-updated-asc"),
        pytest.param({"limit": 5, "sort": "title", "order": "desc"}, id="limit-5-title-desc"),
        pytest.param({"limit": 2, "sort": "due_date", "status": "pending"}, id="limit-2-due-pending"),
        pytest.param({"limit": 3, "sort": "created", "order": "asc", "q": "e"}, id="limit-3-created-search"),
        pytest.param({"limit": 6, "sort": "due_date", "order": "asc"}, id="limit-6-due-asc"),
    ],
)
def test_walking_pages_by_offset_returns_every_task_once_in_order(
    client: httpx.Client, auth: Auth, user_id: str, varied_tasks: list[Task], params: dict[str, Any]
) -> None:
    filters = {name: value for name, value in params.items() if name != "limit"}
    one_page = ids(everything(client, auth, user_id, **filters))
    assert one_page
    limit = params["limit"]

    walked: list[int] = []
    for offset in range(0, len(one_page) + limit, limit):
        response = fetch(client, auth, user_id, offset=offset, **params)
        page = ids(page_of(response))
        assert total_count(response) == len(one_page)
        assert len(page) == min(limit, max(0, len(one_page) - offset))
        walked += page

    assert walked == one_page


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": 1}, id="limit-1-default"),
        pytest.param({"limit": 2, "sort": "title"}, id="limit-2-title"),
        pytest.param({"limit": 3, "sort": "due_date", "order": "desc"}, id="limit-3-due-desc"),
        pytest.param({"limit": 4, "sort": "updated", "order": "asc", "status": "all"}, id="limit-4-updated-asc"),
        pytest.param({"limit": 2, "sort": "title", "order": "desc", "status": "completed"}, id="limit-2-completed"),
        pytest.param({"limit": 2, "q": "a", "sort": "due_date"}, id="limit-2-search"),
    ],
)
def test_following_next_links_returns_every_task_once_in_order(
    client: httpx.Client, auth: Auth, user_id: str, varied_tasks: list[Task], params: dict[str, Any]
) -> None:
    filters = {name: value for name, value in params.items() if name != "limit"}
    one_page = ids(everything(client, auth, user_id, **filters))
    pages_expected = -(-len(one_page) // params["limit"])

    response = fetch(client, auth, user_id, **params)
    walked = ids(page_of(response))
    pages = 1
    while "next" in (links := parse_link_header(response)):
        assert pages < pages_expected, "a next link past the last page"
        response = client.get(links["next"], headers=auth(user_id))
        walked += ids(page_of(response))
        assert total_count(response) == len(one_page)
        pages += 1

    assert walked == one_page
    assert pages == pages_expected


def test_following_prev_links_walks_back_to_the_first_page(
    client: httpx.Client, auth: Auth, user_id: str, varied_tasks: list[Task]
) -> None:
    one_page = ids(everything(client, auth, user_id, sort="title"))
    last_offset = (len(one_page) - 1) // 3 * 3

    response = fetch(client, auth, user_id, sort="title", limit=3, offset=last_offset)
    pages = [ids(page_of(response))]
    while "prev" in (links := parse_link_header(response)):
        assert len(pages) <= len(one_page), "prev links never reach the first page"
        response = client.get(links["prev"], headers=auth(user_id))
        pages.insert(0, ids(page_of(response)))

    assert query_of(str(response.url)).get("offset", "0") == "0"
    assert [task_id for page in pages for task_id in page] == one_page


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"limit": 3}, id="limit-equals-total"),
        pytest.param({"limit": 500, "sort": "title"}, id="limit-above-total"),
        pytest.param({"status": "completed", "limit": 1}, id="filtered-to-one"),
    ],
)
def test_no_link_header_when_everything_fits_on_one_page(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, params: dict[str, Any]
) -> None:
    make_task(user_id, "One")
    make_task(user_id, "Two")
    make_task(user_id, "Three", completed=True)

    response = fetch(client, auth, user_id, **params)

    assert page_of(response)
    assert "Link" not in response.headers


def test_first_page_links_next_with_the_same_query(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    # Characters that must survive being put back into a URL.
    q = "50% & more=#1"
    for number in range(5):
        make_task(user_id, f"Item {number}: {q}")
    make_task(user_id, "Unrelated")
    params = {"status": "pending", "sort": "title", "order": "desc", "q": q, "limit": 2}

    response = fetch(client, auth, user_id, **params)

    links = parse_link_header(response)
    assert set(links) == {"next"}
    next_url = links["next"]
    assert urlsplit(next_url).path == tasks_url(user_id)
    assert query_of(next_url) == {name: str(value) for name, value in params.items()} | {"offset": "2"}
    next_page = client.get(next_url, headers=auth(user_id))
    assert titles(page_of(next_page)) == [f"Item {number}: {q}" for number in (2, 1)]
    assert total_count(next_page) == 5


def test_middle_page_links_both_ways(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    for number in range(7):
        make_task(user_id, f"Item {number}")
    params = {"sort": "title", "limit": 2}

    response = fetch(client, auth, user_id, offset=2, **params)

    assert titles(page_of(response)) == ["Item 2", "Item 3"]
    links = parse_link_header(response)
    assert set(links) == {"next", "prev"}
    assert query_of(links["next"]) == {"sort": "title", "limit": "2", "offset": "4"}
    prev_query = query_of(links["prev"])
    assert prev_query.pop("offset", "0") == "0"
    assert prev_query == {"sort": "title", "limit": "2"}
    assert titles(page_of(client.get(links["next"], headers=auth(user_id)))) == ["Item 4", "Item 5"]
    assert titles(page_of(client.get(links["prev"], headers=auth(user_id)))) == ["Item 0", "Item 1"]


def test_last_page_links_prev_but_not_next(client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask) -> None:
    for number in range(5):
        make_task(user_id, f"Item {number}")

    response = fetch(client, auth, user_id, sort="title", limit=2, offset=4)

    assert titles(page_of(response)) == ["Item 4"]
    assert total_count(response) == 5
    links = parse_link_header(response)
    assert set(links) == {"prev"}
    assert titles(page_of(client.get(links["prev"], headers=auth(user_id)))) == ["Item 2", "Item 3"]


def test_page_ending_exactly_at_the_total_has_no_next(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    for number in range(4):
        make_task(user_id, f"Item {number}")

    response = fetch(client, auth, user_id, sort="title", limit=2, offset=2)

    assert titles(page_of(response)) == ["Item 2", "Item 3"]
    assert set(parse_link_header(response)) == {"prev"}


@pytest.mark.parametrize("offset", [3, 4, 50, 2**63 - 1])
def test_offset_past_the_end_is_empty_with_the_right_total(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, offset: int
) -> None:
    for number in range(3):
        make_task(user_id, f"Item {number}", completed=number == 0)

    response = fetch(client, auth, user_id, limit=2, offset=offset)
    filtered = fetch(client, auth, user_id, status="pending", limit=2, offset=offset)

    assert page_of(response) == []
    assert total_count(response) == 3
    assert "next" not in parse_link_header(response)
    assert page_of(filtered) == []
    assert total_count(filtered) == 2
