"""Schema-driven fuzzing: schemathesis against the live server's own `/openapi.json`.

For each database, schemathesis loads the document the running server publishes and, for
every operation in it, sends generated requests over real HTTP (its coverage phase's boundary
values, then Hypothesis-generated positive and negative cases). Every response must be no 5xx,
with a documented status code, a body matching the documented schema, the documented content
type and the documented headers.

Requests carry a valid HS256 token for one test user, and the path's `user_id` is mostly that
user's (sometimes another user's or a generated one, which must be a documented 403). The user
has seeded tasks, and `task_id` is often one of them, so the routes on existing tasks are
reached and not only their 404s. Afterwards the test checks that every operation in the document
succeeded at least once and met its 401, 403 and 404; run with `-rP` to see the cases per operation.

The last test pins down, deterministically, what schemathesis' `negative_data_rejection` check
finds when it is switched on: bodies the document calls invalid that the service accepts.
"""

import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis.strategies as st
import pytest
import schemathesis
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.generation.meta import TestPhase
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from auth import mint_token
from tests.conftest import SECRET, LiveServer

# Generated cases per operation in the fuzzing phase (positive and negative mixed), on each database;
# the coverage phase adds its own fixed cases (boundary values, missing token, unexpected methods).
FUZZ_EXAMPLES_PER_OPERATION = 150
SEEDED_TASKS = 12
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    response_headers_conformance,
]


@dataclass
class FuzzTarget:
    """The user the fuzzer acts as, its token, and the tasks seeded for it.

    `DELETE` gets tasks of its own, so deleting cannot leave the other operations only 404s, and the
    trash's routes get tasks in the trash (restoring and deleting for good take them out of it).
    """

    user_id: str
    token: str
    task_ids: list[int]
    deletable_task_ids: list[int]
    trashed_task_ids: list[int]
    other_user_id: str = field(default_factory=lambda: f"fuzz-other-{uuid.uuid4().hex}")

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header of the user's token."""
        return {"Authorization": f"Bearer {self.token}"}

    def aim_at_trash(self, case: Case, client: httpx.Client) -> None:
        """Point a trash route aimed at a seeded trashed task at a freshly trashed one instead.

        Restoring, deleting for good and emptying the trash all take tasks out of it: without new
        ones, those routes would soon meet only 404s.
        """
        path = case.path_parameters or {}
        if (
            not case.operation.path.startswith("/api/{user_id}/trash/")
            or path.get("task_id") not in self.trashed_task_ids
        ):
            return
        task_id = seed_tasks(client, self.user_id, self.headers, 1)[0]
        assert client.delete(f"/api/{self.user_id}/tasks/{task_id}", headers=self.headers).status_code == 204
        path["task_id"] = task_id

    def seeded_ids(self, method: str, path: str) -> list[int]:
        """The seeded tasks an operation with this method and path may aim at."""
        if path.startswith("/api/{user_id}/trash"):
            return self.trashed_task_ids
        return self.deletable_task_ids if method.upper() == "DELETE" else self.task_ids


@dataclass
class FuzzLog:
    """What the fuzzer sent and got back, per operation: enough to prove every operation was reached."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)

    def record(self, case: Case, status: int) -> None:
        """Count one exchange."""
        self.statuses[(case.operation.label, status)] += 1

    def cases(self, operation: str | None = None) -> int:
        """How many cases were sent, for one operation or in all."""
        return sum(n for (label, _), n in self.statuses.items() if operation in (None, label))

    def saw(self, operation: str, statuses: range | set[int]) -> bool:
        """Whether the operation answered at least once with one of `statuses`."""
        return any(label == operation and status in statuses for label, status in self.statuses)

    def summary(self, database: str) -> str:
        """A readable table: cases per operation and the statuses they got."""
        lines = [f"schemathesis on {database}: {self.cases()} cases"]
        for operation in sorted({label for label, _ in self.statuses}):
            counts = ", ".join(
                f"{status}x{n}" for (label, status), n in sorted(self.statuses.items()) if label == operation
            )
            lines.append(f"  {operation}: {self.cases(operation)} cases ({counts})")
        return "\n".join(lines)


def seed_tasks(client: httpx.Client, user: str, headers: dict[str, str], count: int) -> list[int]:
    """Create `count` varied tasks for the user through the API; their ids."""
    ids = []
    for n in range(count):
        body: dict[str, Any] = {"title": f"Seeded task {n}", "completed": n % 3 == 0}
        if n % 2:
            body["description"] = f"Description {n}"
        if n % 4 == 1:
            body["due_date"] = f"2030-01-{n + 1:02d}T12:00:00Z"
        if n % 3 == 1:
            body |= {"priority": "high", "tags": ["Work", f"tag {n}"]}
        response = client.post(f"/api/{user}/tasks", json=body, headers=headers)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


@pytest.fixture
def fuzz_target(client: httpx.Client) -> FuzzTarget:
    """A fresh user with a token and seeded tasks."""
    user = f"fuzz-{uuid.uuid4().hex}"
    token = mint_token(user, SECRET)
    headers = {"Authorization": f"Bearer {token}"}
    trashed = seed_tasks(client, user, headers, SEEDED_TASKS)
    for task_id in trashed:
        assert client.delete(f"/api/{user}/tasks/{task_id}", headers=headers).status_code == 204
    return FuzzTarget(
        user_id=user,
        token=token,
        task_ids=seed_tasks(client, user, headers, SEEDED_TASKS),
        deletable_task_ids=seed_tasks(client, user, headers, SEEDED_TASKS),
        trashed_task_ids=trashed,
    )


def aimed_path_parameters(target: FuzzTarget) -> Callable[[Any, dict[str, Any] | None], st.SearchStrategy]:
    """A `flatmap_path_parameters` hook: mostly the token's user and often a seeded task.

    A generated `user_id` is kept in one case of ten and another real user's in one of ten (both
    403); an integer `task_id` is replaced by a seeded task's half of the time. A `task_id` that
    negative testing made a non-integer is left alone, so its 422 is still exercised.
    """

    def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> st.SearchStrategy:
        if not path_parameters:
            return st.just(path_parameters)
        choices: dict[str, st.SearchStrategy] = {name: st.just(value) for name, value in path_parameters.items()}
        if "user_id" in path_parameters:
            users = [target.user_id] * 8 + [target.other_user_id, path_parameters["user_id"]]
            choices["user_id"] = st.sampled_from(users)
        task_id = path_parameters.get("task_id")
        if isinstance(task_id, int) and not isinstance(task_id, bool):
            seeded = target.seeded_ids(context.operation.method, context.operation.path)
            choices["task_id"] = st.one_of(st.just(task_id), st.sampled_from(seeded))
        return st.fixed_dictionaries(choices)

    return flatmap_path_parameters


def aimed_coverage_case(target: FuzzTarget) -> Callable[[Any, Case], Case]:
    """A `map_case` hook for the coverage phase's fixed cases: the token's user, unless `user_id` is under test.

    Without it every coverage case would carry a made-up user and stop at the 403, never
    reaching the query, body and `task_id` boundaries it is meant to probe.
    """

    def map_case(context: Any, case: Case) -> Case:
        meta = case.meta
        if meta is None or meta.phase.name is not TestPhase.COVERAGE or case.path_parameters is None:
            return case
        probed = getattr(meta.phase.data, "parameter", None)
        if "user_id" in case.path_parameters and probed != "user_id":
            case.path_parameters["user_id"] = target.user_id
        if "task_id" in case.path_parameters and probed != "task_id":
            case.path_parameters["task_id"] = target.seeded_ids(case.operation.method, case.operation.path)[0]
        return case

    return map_case


@pytest.fixture
def api_schema(server: LiveServer, fuzz_target: FuzzTarget) -> schemathesis.BaseSchema:
    """The server's own OpenAPI document, loaded over HTTP, set up to act as the fuzz user."""
    config = schemathesis.Config.from_dict(
        {
            "headers": fuzz_target.headers,
            # No example database: a run leaves no files behind and does not depend on earlier runs.
            "generation": {"max-examples": FUZZ_EXAMPLES_PER_OPERATION, "database": "none"},
            # A busy 2-core machine must not turn slow generation into a failure.
            "suppress-health-check": ["too_slow", "filter_too_much"],
        }
    )
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
    schema.hook("flatmap_path_parameters")(aimed_path_parameters(fuzz_target))
    schema.hook("map_case")(aimed_coverage_case(fuzz_target))
    return schema


@pytest.fixture
def fuzz_log(database_kind: str, api_schema: schemathesis.BaseSchema) -> Iterator[FuzzLog]:
    """Records every exchange; afterwards prints a summary and checks every operation was really reached.

    Each operation must have succeeded at least once, and met a missing token (401) if it needs
    one, another user's path (403) if it has a user, and a missing task (404) if it has a task.
    """
    log = FuzzLog()
    yield log
    summary = log.summary(database_kind)
    print(summary)
    for result in api_schema.get_all_operations():
        operation = result.ok()
        label = operation.label
        assert log.saw(label, range(200, 300)), f"{label} never succeeded\n{summary}"
        if operation.definition.raw.get("security"):
            assert log.saw(label, {401}), f"{label} never met a missing token\n{summary}"
        if "{user_id}" in operation.path:
            assert log.saw(label, {403}), f"{label} never met another user's path\n{summary}"
        if "{task_id}" in operation.path:
            assert log.saw(label, {404}), f"{label} never met a missing task\n{summary}"


@pytest.fixture
def schemathesis_node_id_shim(request: pytest.FixtureRequest) -> None:
    """Give the test item the `_nodeid` attribute schemathesis' fixture-loaded schemas still read.

    pytest 9.2 stores a node's id elsewhere, and schemathesis 4.32's `from_fixture` reads and
    rewrites `node._nodeid` (only to label each operation in reports); without this it fails
    before sending a request.
    """
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@pytest.mark.usefixtures("schemathesis_node_id_shim")
def test_every_operation_conforms_to_its_openapi_document(
    case: Case, fuzz_log: FuzzLog, fuzz_target: FuzzTarget, client: httpx.Client
) -> None:
    """No 5xx; status, body, content type and headers as the served document says."""
    fuzz_target.aim_at_trash(case, client)
    response = case.call_and_validate(checks=CHECKS)
    fuzz_log.record(case, response.status_code)


# --- Found by fuzzing with negative_data_rejection ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("due_date", 0, id="due-date-as-a-number"),
        pytest.param("due_date", "1700000000", id="due-date-as-digits"),
        pytest.param("completed", "yes", id="completed-as-a-word"),
        pytest.param("completed", 1, id="completed-as-a-number"),
    ],
)
def test_a_due_date_that_is_not_iso_text_or_a_completed_that_is_not_boolean_is_422(
    client: httpx.Client, auth: Callable[[str], dict[str, str]], user_id: str, name: str, value: Any
) -> None:
    """`due_date` is an ISO 8601 date-time string and `completed` a JSON boolean, in the contract and the document.

    schemathesis' `negative_data_rejection` check (ST201) finds these accepted: pydantic's lax mode
    reads a number as a Unix timestamp and "yes" or 1 as true, and the task is stored (201).
    """
    response = client.post(f"/api/{user_id}/tasks", json={"title": "Typed", name: value}, headers=auth(user_id))

    assert response.status_code == 422, response.text
    assert client.get(f"/api/{user_id}/tasks", headers=auth(user_id)).json() == []
