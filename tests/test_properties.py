"""Property-based tests of the contract, over real HTTP on every test database.

Hypothesis generates the inputs; each property is one promise of the API (docs/api.md):

- any text the contract accepts comes back exactly as sent (the title trimmed);
- paging through any list, under any sort, order and combination of filters (status, search,
  priority, tags, due-date range), returns every matching task exactly once, in the order of one
  big page, with `X-Total-Count` right;
- whatever two users do, neither ever sees or touches the other's tasks.

Function-scoped fixtures are not reset between Hypothesis examples, so every example works on
fresh user ids of its own instead of the `user_id` fixture.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

import httpx
import hypothesis.core
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from hypothesis.vendor.pretty import RepresentationPrinter

Auth = Callable[[str], dict[str, str]]
Task = dict[str, Any]

PROPERTY_SETTINGS = settings(
    deadline=None,
    database=None,  # no `.hypothesis/` left behind; every run explores afresh
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Examples per property and database; each example makes a handful to a few dozen requests.
TEXT_EXAMPLES = 100
PAGING_EXAMPLES = 40
ISOLATION_RUNS = 20
ISOLATION_STEPS = 25

TITLE_MAX_LENGTH = 200
DESCRIPTION_MAX_LENGTH = 1000
LIST_ALL = {"limit": 500}
DEFAULT_ORDER = {
    "created": "desc",
    "updated": "desc",
    "title": "asc",
    "due_date": "asc",
    "priority": "desc",
    "completed_at": "desc",
}
SORT_FIELDS = {
    "created": "created_at",
    "updated": "updated_at",
    "title": "title",
    "due_date": "due_date",
    "priority": "priority",
    "completed_at": "completed_at",
}
PRIORITIES = ["none", "low", "medium", "high"]  # least first: the order `sort=priority` uses

# Unicode's White_Space characters: the "surrounding white space" trimmed from a title. Python's
# str.strip() also strips U+001C-U+001F (information separators, not White_Space); the API keeps
# them, as Unicode, JavaScript's trim() and pydantic do, so they are not trimmed here either.
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
# Characters worth more than their share of examples: combining marks, joiners, emoji, astral
# planes, bidi controls, the BOM, quotes, the characters LIKE treats specially, separators.
INTERESTING_CHARACTERS = (
    "\u0301\u0308\u20dd\u200d\u200b\ufeff\u202e\u2066\u00e9\u00c9\u00df\u0130\u03a3\u03c2"
    "\U0001f468\U0001f469\U0001f467\U0001f600\U0001f1e8\U0001f1e6\U0001d518\U00020000\U0010fffd"
    "'\"`\\%_;\x1c\x1d\x1e\x1f\x01\x7f\ufffd\uffff"
)


@pytest.fixture(autouse=True)
def readable_failing_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let Hypothesis print the inputs of a failing example again.

    The schemathesis pytest plugin swaps Hypothesis's printer for one that prints nothing (for
    speed, in the whole session), which would leave a failure here as `title=,` and no more.
    """
    monkeypatch.setattr(hypothesis.core, "RepresentationPrinter", RepresentationPrinter)


def trimmed(title: str) -> str:
    """The title as the contract stores it: surrounding white space removed."""
    return title.strip(WHITE_SPACE)


# Any character a database can store: everything but NUL and lone surrogates, all planes.
storable_characters = st.one_of(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    st.sampled_from(INTERESTING_CHARACTERS + WHITE_SPACE),
)
white_space = st.text(alphabet=st.sampled_from(WHITE_SPACE), max_size=4)


@st.composite
def titles(draw: st.DrawFn) -> str:
    """A title the contract accepts: 1-200 characters once trimmed, maybe with white space around."""
    core = draw(st.text(alphabet=storable_characters, min_size=1, max_size=TITLE_MAX_LENGTH).filter(trimmed))
    return draw(white_space) + core + draw(white_space)


descriptions = st.none() | st.text(alphabet=storable_characters, max_size=DESCRIPTION_MAX_LENGTH)


def tasks_url(user_id: str) -> str:
    """The collection URL of a user's tasks."""
    return f"/api/{user_id}/tasks"


def task_url(user_id: str, task_id: int) -> str:
    """The URL of one of a user's tasks."""
    return f"/api/{user_id}/tasks/{task_id}"


def new_user() -> str:
    """A user id no other example or test has used."""
    return f"prop-{uuid.uuid4().hex}"


def json_of(response: httpx.Response, status: int) -> Any:
    """The JSON body of a response that must have `status`."""
    assert response.status_code == status, f"{response.request.method} {response.request.url}: {response.text}"
    return response.json()


def instant(value: str | None) -> datetime | None:
    """A date-time as the API returns it, or as a client sends it (no offset meaning UTC), as an instant."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def timestamp(value: str) -> datetime:
    """A server-set date-time the API returned, as an instant."""
    parsed = instant(value)
    assert parsed is not None
    return parsed


def list_all(
    client: httpx.Client, auth: Auth, user_id: str, params: list[tuple[str, str]] | None = None, **query: Any
) -> tuple[list[Task], int]:
    """Every task of the user matching the query (`params`, which may repeat a name, and `query`) in one page,
    and the response's X-Total-Count."""
    all_params = [*(params or []), *query.items(), *LIST_ALL.items()]
    response = client.get(tasks_url(user_id), params=all_params, headers=auth(user_id))
    return json_of(response, 200), int(response.headers["X-Total-Count"])


# --- (a) Text round-trips exactly ---------------------------------------------------------------


@settings(PROPERTY_SETTINGS, max_examples=TEXT_EXAMPLES)
@given(title=titles(), description=descriptions, new_title=titles(), new_description=descriptions)
@example(
    title=" \u3000" + "\U0001f600" * TITLE_MAX_LENGTH + "\n",
    description="\U00020000" * 1000,
    new_title="e\u0301",
    new_description="",
)
@example(title="\x1ctitle\x1f", description=" keep my spaces ", new_title="\ufeffbom\ufeff", new_description=None)
def test_any_text_the_contract_accepts_round_trips_exactly(
    client: httpx.Client, auth: Auth, title: str, description: str | None, new_title: str, new_description: str | None
) -> None:
    """Created and then updated, the title comes back trimmed and the description exactly, everywhere."""
    user = new_user()

    created = json_of(
        client.post(tasks_url(user), json={"title": title, "description": description}, headers=auth(user)), 201
    )
    assert (created["title"], created["description"]) == (trimmed(title), description)
    assert json_of(client.get(task_url(user, created["id"]), headers=auth(user)), 200) == created

    changes = {"title": new_title, "description": new_description}
    updated = json_of(client.patch(task_url(user, created["id"]), json=changes, headers=auth(user)), 200)
    assert (updated["title"], updated["description"]) == (trimmed(new_title), new_description)
    assert list_all(client, auth, user)[0] == [updated]


# --- (b) Paging returns every matching task once, in order -------------------------------------

# Duplicates, case variants (ASCII and not), digits, and titles that only differ by a space.
TITLE_POOL = ["apple", "Apple", "APPLE", "apple pie", "applepie", "Banana", "banana", "éclair", "Éclair", "ÉCLAIR"]
TITLE_POOL += ["Ωmega", "ωmega", "10 eggs", "2 eggs", "zebra", "_under", "%percent"]
# No due date (the likeliest), and instants written in different ways that are equal.
DUE_DATE_POOL = [None, None, None, "2026-05-01T12:00:00Z", "2026-05-01T14:00:00+02:00", "2026-05-01T12:00:00"]
DUE_DATE_POOL += ["2025-12-31T23:30:00-01:00", "2026-01-01T00:30:00Z", "2030-01-01T00:00:00Z"]
# Bounds of a due-date range: often exactly a due date above (written another way), or a hair past one.
DUE_BOUND_POOL = ["2026-05-01T12:00:00Z", "2026-05-01T12:00:00", "2026-05-01T12:00:00.000001+00:00"]
DUE_BOUND_POOL += ["2026-01-01T01:30:00+01:00", "2025-01-01T00:00:00Z", "2030-01-01T00:00:00"]

# Searches: plain, in another case, non-ASCII, LIKE's own wildcards, a space, nothing.
SEARCH_POOL = [None, "apple", "APP", "éCL", "ΩM", "%", "_", " ", "eggs", ""]
# Tags: case variants of one tag (ASCII and not), spaces and commas inside, padding that is trimmed.
TAG_POOL = ["work", "Work", "WORK", "home", "Ärger", "ärger", "two words", "a,b", " q2 "]
TAG_FILTER_POOL = ["work", "wOrK", "HOME", "ÄRGER", "ärger", "Two Words", "a,b", "q2", "absent"]

task_bodies = st.fixed_dictionaries(
    {
        "title": st.sampled_from(TITLE_POOL),
        "completed": st.booleans(),
        "due_date": st.sampled_from(DUE_DATE_POOL),
        "priority": st.sampled_from(PRIORITIES),
        "tags": st.lists(st.sampled_from(TAG_POOL), max_size=4),
    }
)
# What is done to a task after its creation: its title sent again (it moves in the "updated" order),
# or its completion toggled (it gets, or loses, a completed_at later than its creation).
task_touches = st.tuples(st.integers(min_value=0, max_value=11), st.sampled_from(["resend", "toggle"]))


def tag_key(tag: str) -> str:
    """What makes two spellings one tag, for the pools above."""
    return tag.strip().lower()


@dataclass(frozen=True)
class ListQuery:
    """One way to ask for a list: filters and an order (each maybe left to its default)."""

    sort: str | None
    order: str | None
    status: str | None
    q: str | None
    priority: tuple[str, ...] = ()
    tag: tuple[str, ...] = ()
    due_after: str | None = None
    due_before: str | None = None

    def params(self) -> list[tuple[str, str]]:
        """The query parameters, without the ones left to their defaults; `priority` and `tag` repeated."""
        return [
            (name, value)
            for name, values in vars(self).items()
            for value in (values if isinstance(values, tuple) else [values])
            if value is not None
        ]

    def matches(self, task: Task) -> bool:
        """Whether the filters keep this task (the pools are such that `lower()` is what ignoring case means)."""
        status_matches = self.status in (None, "all") or task["completed"] == (self.status == "completed")
        text = f"{task['title']}\n{task['description'] or ''}".lower()
        priority_matches = not self.priority or task["priority"] in self.priority
        tags_match = {tag_key(tag) for tag in self.tag} <= {tag_key(tag) for tag in task["tags"]}
        due = instant(task["due_date"])
        after, before = instant(self.due_after), instant(self.due_before)
        due_matches = (after is None and before is None) or (
            due is not None and (after is None or after <= due) and (before is None or due < before)
        )
        return status_matches and (self.q or "").lower() in text and priority_matches and tags_match and due_matches

    @property
    def descending(self) -> bool:
        """Whether the order is descending, once defaults are applied."""
        return (self.order or DEFAULT_ORDER[self.sort or "created"]) == "desc"


def now_and_then(strategy: st.SearchStrategy[Any], absent: Any) -> st.SearchStrategy[Any]:
    """`strategy` about one time in four, else `absent`: filters together would otherwise leave nothing to page."""
    return st.one_of(st.just(absent), st.just(absent), st.just(absent), strategy)


list_queries = st.builds(
    ListQuery,
    sort=st.sampled_from([None, *SORT_FIELDS]),
    order=st.sampled_from([None, "asc", "desc"]),
    status=st.sampled_from([None, "all", "pending", "completed"]),
    q=now_and_then(st.sampled_from(SEARCH_POOL), None),
    priority=now_and_then(st.lists(st.sampled_from(PRIORITIES), min_size=1, max_size=3).map(tuple), ()),
    tag=now_and_then(st.lists(st.sampled_from(TAG_FILTER_POOL), min_size=1, max_size=2).map(tuple), ()),
    due_after=now_and_then(st.sampled_from(DUE_BOUND_POOL), None),
    due_before=now_and_then(st.sampled_from(DUE_BOUND_POOL), None),
)


def sort_value(task: Task, sort: str) -> Any:
    """The value a task is sorted by (other than by title); None for a task without one (it comes last)."""
    if sort == "priority":
        return PRIORITIES.index(task["priority"])
    return instant(task[SORT_FIELDS[sort]])


def assert_in_contract_order(tasks: list[Task], query: ListQuery) -> None:
    """Check the order the contract promises, in terms that hold whatever the database's collation.

    By the sort key in the query's direction, ties broken by id in the same direction, tasks
    without a due date (or a completed_at) last, and titles equal but for case next to each other.
    """
    sort = query.sort or "created"
    ascending = not query.descending
    if sort == "title":
        folded = [task["title"].lower() for task in tasks]
        for title in set(folded):
            positions = [n for n, value in enumerate(folded) if value == title]
            assert positions == list(range(positions[0], positions[-1] + 1)), f"{title!r} split up: {folded}"
    for before, after in pairwise(tasks):
        context = f"{before} then {after}, for {query}"
        if sort == "title":
            tied = before["title"].lower() == after["title"].lower()
        else:
            first, second = sort_value(before, sort), sort_value(after, sort)
            assert first is not None or second is None, f"a task without a {sort} came first: {context}"
            if first is not None and second is not None:
                assert (first <= second) if ascending else (first >= second), f"out of order: {context}"
            tied = first == second
        if tied:
            assert (before["id"] < after["id"]) == ascending, f"tie not broken by id: {context}"


# A sample that every run checks besides the generated ones: each priority, case variants of tags,
# due dates on and off the bounds, completions at creation and later, each new sort both ways.
SAMPLE_BODIES = [
    {"title": "apple", "completed": n % 3 == 0, "due_date": DUE_DATE_POOL[n % len(DUE_DATE_POOL)]}
    | {"priority": PRIORITIES[n % 4], "tags": [TAG_POOL[n % len(TAG_POOL)], TAG_POOL[(n * 5) % len(TAG_POOL)]]}
    for n in range(12)
]
SAMPLE_TOUCHES = [(1, "toggle"), (0, "toggle"), (4, "toggle"), (2, "resend"), (3, "toggle")]
SAMPLE_QUERIES = [
    (ListQuery(sort="completed_at", order=None, status=None, q=None), 5),
    (ListQuery(sort="completed_at", order="asc", status=None, q=None, tag=("work",)), 2),
    (ListQuery(sort="priority", order=None, status="pending", q=None, priority=("high", "none")), 3),
    (ListQuery(sort="priority", order="asc", status=None, q="APP", due_after="2026-01-01T00:30:00Z"), 4),
    (ListQuery(sort="due_date", order="desc", status=None, q=None, due_before="2026-05-01T12:00:00.000001+00:00"), 1),
]


@settings(PROPERTY_SETTINGS, max_examples=PAGING_EXAMPLES)
@given(
    bodies=st.lists(task_bodies, min_size=1, max_size=12),
    touches=st.lists(task_touches, max_size=5),
    queries=st.lists(st.tuples(list_queries, st.integers(min_value=1, max_value=13)), min_size=1, max_size=4),
)
@example(bodies=SAMPLE_BODIES, touches=SAMPLE_TOUCHES, queries=SAMPLE_QUERIES)
def test_paging_returns_every_matching_task_once_in_the_big_pages_order(
    client: httpx.Client,
    auth: Auth,
    bodies: list[dict[str, Any]],
    touches: list[tuple[int, str]],
    queries: list[tuple[ListQuery, int]],
) -> None:
    """Pages of any size, concatenated, are the one big page of every match; each has the total and the links."""
    user = new_user()
    created = [json_of(client.post(tasks_url(user), json=body, headers=auth(user)), 201) for body in bodies]
    for index, touch in touches:
        if index < len(created):
            task = created[index]
            if touch == "resend":
                response = client.patch(task_url(user, task["id"]), json={"title": task["title"]}, headers=auth(user))
            else:
                response = client.patch(task_url(user, task["id"]) + "/complete", headers=auth(user))
            created[index] = json_of(response, 200)

    for query, page_size in queries:
        big_page, total = list_all(client, auth, user, query.params())
        expected = {task["id"]: task for task in created if query.matches(task)}
        assert total == len(big_page) == len(expected)
        assert {task["id"]: task for task in big_page} == expected
        assert_in_contract_order(big_page, query)

        limit = min(page_size, len(created) + 1)
        paged: list[Task] = []
        for offset in range(0, total + limit, limit):  # one page past the end, too
            params = [*query.params(), ("limit", str(limit)), ("offset", str(offset))]
            response = client.get(tasks_url(user), params=params, headers=auth(user))
            page = json_of(response, 200)
            assert page == big_page[offset : offset + limit], params
            assert response.headers["X-Total-Count"] == str(total), params
            links = response.headers.get("Link", "")
            assert ('rel="next"' in links) == (offset + limit < total), (params, links)
            assert ('rel="prev"' in links) == (offset > 0), (params, links)
            paged += page
        assert paged == big_page


# --- (c) Two users never see or touch each other's tasks ----------------------------------------

ALICE, BOB = "alice", "bob"
actors = st.sampled_from([ALICE, BOB])
small_titles = st.text(alphabet=st.sampled_from("abcAB É🎉 "), min_size=1, max_size=8).filter(trimmed)
task_changes = st.fixed_dictionaries(
    {},
    optional={
        "title": small_titles,
        "description": st.none() | st.text(alphabet=st.sampled_from("xyz é"), max_size=8),
        "completed": st.booleans(),
        "due_date": st.sampled_from(DUE_DATE_POOL),
    },
)
# The body of PATCH …/complete: none (toggle), an empty object (toggle), or a value to set.
completions = st.sampled_from([None, {}, {"completed": True}, {"completed": False}])
# Bodies for requests that must be refused before their body is looked at.
any_bodies = st.sampled_from([None, {"title": "Mine now"}, {"title": ""}, {"completed": "maybe"}])


@dataclass(frozen=True)
class TaskRef:
    """A task id and who created it (for the steps Hypothesis prints); the task may have been deleted since."""

    owner: str
    id: int


def client_fields(task: Task) -> Task:
    """The fields a client sets, the due date as an instant, and the id."""
    return {
        "id": task["id"],
        "title": task["title"],
        "description": task["description"],
        "completed": task["completed"],
        "due_date": instant(task["due_date"]),
    }


def assert_task_not_found(response: httpx.Response) -> None:
    """The one 404 for a task that is missing or someone else's."""
    assert json_of(response, 404) == {"detail": "Task not found", "code": "task_not_found"}


def assert_forbidden(response: httpx.Response) -> None:
    """The 403 for a path whose user is not the token's."""
    assert json_of(response, 403)["code"] == "forbidden"


class TwoUsers(RuleBasedStateMachine):
    """Alice and Bob create, update, toggle, delete, read and list; a model says what each must see.

    Each request is sent with the actor's own token. Through their own path, the actor reaches
    only their own tasks: the other's task is a 404 like a missing one, and is left unchanged.
    Through the other's path, everything is a 403, whatever the body. After every step, each
    user's list is exactly their tasks in the model.
    """

    # Set by the test: the HTTP client, and `auth(user_id)` giving a valid token's headers.
    client: httpx.Client
    auth: Auth

    tasks = Bundle("tasks")
    # Tasks from the bundle, or ids nobody here created (another test's task, or none at all).
    any_task = st.one_of(tasks, st.integers(min_value=1, max_value=2**63 - 1).map(lambda n: TaskRef("nobody", n)))

    def __init__(self) -> None:
        super().__init__()
        self.users = {ALICE: new_user(), BOB: new_user()}
        self.model: dict[str, dict[int, Task]] = {ALICE: {}, BOB: {}}

    def send(self, actor: str, method: str, url: str, body: Any = None) -> httpx.Response:
        """`actor` sends a request with their own token (and a JSON body unless `body` is None)."""
        json_body = {} if body is None else {"json": body}
        return self.client.request(method, url, headers=self.auth(self.users[actor]), **json_body)

    def own_task_url(self, actor: str, ref: TaskRef, suffix: str = "") -> str:
        """The URL of task `ref.id` under the actor's own path."""
        return task_url(self.users[actor], ref.id) + suffix

    def check_change(self, actor: str, ref: TaskRef, response: httpx.Response, sent: dict[str, Any]) -> None:
        """A change to the actor's task: exactly `sent` applied if it is theirs, else a 404 and no change."""
        if ref.id not in self.model[actor]:
            assert_task_not_found(response)
            return
        before = self.model[actor][ref.id]
        task = json_of(response, 200)
        assert client_fields(task) == client_fields(before | sent), (task, before, sent)
        assert task["created_at"] == before["created_at"]
        assert timestamp(task["updated_at"]) >= timestamp(before["updated_at"])
        self.model[actor][ref.id] = task

    @rule(target=tasks, actor=actors, title=small_titles, fields=task_changes)
    def create(self, actor: str, title: str, fields: dict[str, Any]) -> TaskRef:
        task = json_of(self.send(actor, "POST", tasks_url(self.users[actor]), fields | {"title": title}), 201)
        expected = {"description": None, "completed": False, "due_date": None} | fields | {"title": trimmed(title)}
        assert client_fields(task) == client_fields({"id": task["id"], **expected})
        assert task["user_id"] == self.users[actor]
        self.model[actor][task["id"]] = task
        return TaskRef(actor, task["id"])

    @rule(actor=actors, ref=any_task, method=st.sampled_from(["PUT", "PATCH"]), changes=task_changes)
    def update(self, actor: str, ref: TaskRef, method: str, changes: dict[str, Any]) -> None:
        response = self.send(actor, method, self.own_task_url(actor, ref), changes)
        sent = changes | ({"title": trimmed(changes["title"])} if "title" in changes else {})
        self.check_change(actor, ref, response, sent)

    @rule(actor=actors, ref=any_task, body=completions)
    def complete(self, actor: str, ref: TaskRef, body: dict[str, bool] | None) -> None:
        response = self.send(actor, "PATCH", self.own_task_url(actor, ref, "/complete"), body)
        task = self.model[actor].get(ref.id)
        completed = (body or {}).get("completed", task is not None and not task["completed"])
        self.check_change(actor, ref, response, {"completed": completed})

    @rule(actor=actors, ref=any_task)
    def delete(self, actor: str, ref: TaskRef) -> None:
        response = self.send(actor, "DELETE", self.own_task_url(actor, ref))
        if ref.id not in self.model[actor]:
            assert_task_not_found(response)
            return
        assert response.status_code == 204, response.text
        assert response.content == b""
        del self.model[actor][ref.id]

    @rule(actor=actors, ref=any_task)
    def read(self, actor: str, ref: TaskRef) -> None:
        response = self.send(actor, "GET", self.own_task_url(actor, ref))
        if ref.id not in self.model[actor]:
            assert_task_not_found(response)
        else:
            assert json_of(response, 200) == self.model[actor][ref.id]

    @rule(
        actor=actors,
        ref=any_task,
        method=st.sampled_from(["GET", "PUT", "PATCH", "DELETE", "PATCH /complete"]),
        body=any_bodies,
    )
    def use_a_task_through_the_other_users_path(self, actor: str, ref: TaskRef, method: str, body: Any) -> None:
        other = BOB if actor == ALICE else ALICE
        method, _, suffix = method.partition(" ")
        assert_forbidden(self.send(actor, method, task_url(self.users[other], ref.id) + suffix, body))

    @rule(actor=actors, method=st.sampled_from(["GET", "POST"]), body=any_bodies)
    def use_the_other_users_list(self, actor: str, method: str, body: Any) -> None:
        other = BOB if actor == ALICE else ALICE
        assert_forbidden(self.send(actor, method, tasks_url(self.users[other]), body))

    @invariant()
    def each_user_lists_exactly_their_own_tasks(self) -> None:
        for name, user in self.users.items():
            listed, total = list_all(self.client, self.auth, user)
            assert total == len(listed)
            assert {task["id"]: task for task in listed} == self.model[name]


def test_two_users_never_see_or_touch_each_others_tasks(client: httpx.Client, auth: Auth) -> None:
    """Any sequence of operations by two users keeps each one's tasks their own."""
    TwoUsers.client = client
    TwoUsers.auth = staticmethod(auth)  # a plain function, not a method of the machine
    run_state_machine_as_test(
        TwoUsers,
        settings=settings(PROPERTY_SETTINGS, max_examples=ISOLATION_RUNS, stateful_step_count=ISOLATION_STEPS),
    )
