"""Lean SQL: each route sends the statements it needs and no more; authentication sends none."""

import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from tests.conftest import LiveServer


class StatementLog:
    """The SQL statements the live server's engine sends, as they are sent."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self._lock = threading.Lock()

    def record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        with self._lock:
            self.statements.append(statement)

    def during(self, request: Callable[[], httpx.Response]) -> tuple[httpx.Response, list[str]]:
        """Run `request` and return its response with the statements sent meanwhile."""
        with self._lock:
            self.statements.clear()
        response = request()
        with self._lock:
            return response, list(self.statements)


@pytest.fixture
def sql(server: LiveServer) -> Iterator[StatementLog]:
    """Records every statement the app under test sends while the test runs."""
    log = StatementLog()
    engine = server.app.state.database.engine
    event.listen(engine, "before_cursor_execute", log.record)
    yield log
    event.remove(engine, "before_cursor_execute", log.record)


@pytest.fixture
def seeded(make_task: Callable, user_id: str) -> list[dict]:
    """Three tasks of the test user."""
    return [make_task(user_id, f"Task {n}") for n in range(3)]


def test_list_page_and_total_come_in_one_statement(
    client: httpx.Client, auth: Callable, user_id: str, seeded: list[dict], sql: StatementLog
) -> None:
    response, statements = sql.during(lambda: client.get(f"/api/{user_id}/tasks?limit=2", headers=auth(user_id)))
    assert response.status_code == 200 and response.headers["x-total-count"] == "3"
    assert len(statements) == 1, statements


def test_list_past_the_last_page_needs_a_second_statement_for_the_total(
    client: httpx.Client, auth: Callable, user_id: str, seeded: list[dict], sql: StatementLog
) -> None:
    response, statements = sql.during(lambda: client.get(f"/api/{user_id}/tasks?offset=10", headers=auth(user_id)))
    assert response.json() == [] and response.headers["x-total-count"] == "3"
    assert len(statements) == 2, statements


@pytest.mark.parametrize(
    ("method", "suffix", "body", "status"),
    [
        ("GET", "", None, 200),
        ("PUT", "", {"title": "Renamed"}, 200),
        ("PATCH", "", {"completed": True}, 200),
        ("PATCH", "/complete", None, 200),
        ("PATCH", "/complete", {"completed": False}, 200),
        ("PATCH", "", {"tags": ["one", "two", "three", "four"], "priority": "high"}, 200),
        ("PATCH", "", {"tags": []}, 200),
        ("DELETE", "", None, 204),
    ],
)
def test_one_task_routes_send_one_statement(
    client: httpx.Client,
    auth: Callable,
    user_id: str,
    seeded: list[dict],
    sql: StatementLog,
    method: str,
    suffix: str,
    body: dict | None,
    status: int,
) -> None:
    url = f"/api/{user_id}/tasks/{seeded[0]['id']}{suffix}"
    response, statements = sql.during(lambda: client.request(method, url, json=body, headers=auth(user_id)))
    assert response.status_code == status, response.text
    assert len(statements) == 1, statements


def test_missing_task_costs_one_statement(
    client: httpx.Client, auth: Callable, user_id: str, sql: StatementLog
) -> None:
    response, statements = sql.during(
        lambda: client.patch(f"/api/{user_id}/tasks/999999/complete", headers=auth(user_id))
    )
    assert response.status_code == 404
    assert len(statements) == 1, statements


def test_create_sends_one_statement_even_with_tags(
    client: httpx.Client, auth: Callable, user_id: str, seeded: list[dict], sql: StatementLog
) -> None:
    """The triggers index the tags inside the insert itself: never one statement per tag."""
    tags = [f"tag {n}" for n in range(20)]
    response, statements = sql.during(
        lambda: client.post(f"/api/{user_id}/tasks", json={"title": "New", "tags": tags}, headers=auth(user_id))
    )
    assert response.status_code == 201
    assert len(statements) == 1, statements


def test_a_users_first_create_also_makes_their_counter(
    client: httpx.Client, auth: Callable, user_id: str, sql: StatementLog
) -> None:
    """The insert finds no counter row to check the quota against: it makes one and inserts again."""
    response, statements = sql.during(
        lambda: client.post(f"/api/{user_id}/tasks", json={"title": "First", "tags": ["a", "b"]}, headers=auth(user_id))
    )
    assert response.status_code == 201
    assert len(statements) == 3, statements


@pytest.mark.parametrize(
    ("params", "statement_count"),
    [
        ({"tag": "Tag 1"}, 1),
        ({"tag": ["Tag 1", "tag 2"], "priority": ["high", "low"], "sort": "priority"}, 1),
        ({"due_after": "2026-01-01T00:00:00Z", "due_before": "2027-01-01T00:00:00Z", "sort": "completed_at"}, 1),
    ],
)
def test_filtered_lists_send_one_statement(
    client: httpx.Client,
    auth: Callable,
    user_id: str,
    seeded: list[dict],
    sql: StatementLog,
    params: dict,
    statement_count: int,
) -> None:
    client.patch(f"/api/{user_id}/tasks/{seeded[0]['id']}", json={"tags": ["tag 1"]}, headers=auth(user_id))
    response, statements = sql.during(lambda: client.get(f"/api/{user_id}/tasks", params=params, headers=auth(user_id)))
    assert response.status_code == 200, response.text
    assert len(statements) == statement_count, statements


@pytest.mark.parametrize(
    ("path", "statement_count"),
    [("/tags", 1), ("/trash", 1), ("/changes", 1), ("/changes?limit=1", 1)],
)
def test_v2_reads_send_one_statement(
    client: httpx.Client,
    auth: Callable,
    user_id: str,
    seeded: list[dict],
    sql: StatementLog,
    path: str,
    statement_count: int,
) -> None:
    client.delete(f"/api/{user_id}/tasks/{seeded[0]['id']}", headers=auth(user_id))
    response, statements = sql.during(lambda: client.get(f"/api/{user_id}{path}", headers=auth(user_id)))
    assert response.status_code == 200, response.text
    assert len(statements) == statement_count, statements


def test_trash_routes_send_what_they_need(
    client: httpx.Client, auth: Callable, user_id: str, seeded: list[dict], sql: StatementLog
) -> None:
    """Delete for good: one statement. Restore: the restore and the quota check, in one transaction."""
    headers = auth(user_id)
    for task in seeded:
        assert client.delete(f"/api/{user_id}/tasks/{task['id']}", headers=headers).status_code == 204
    response, statements = sql.during(
        lambda: client.post(f"/api/{user_id}/trash/{seeded[0]['id']}/restore", headers=headers)
    )
    assert response.status_code == 200
    assert [statement.split()[0] for statement in statements] == ["BEGIN", "UPDATE", "SELECT", "COMMIT"], statements
    response, statements = sql.during(lambda: client.delete(f"/api/{user_id}/trash/{seeded[1]['id']}", headers=headers))
    assert response.status_code == 204
    assert len(statements) == 1, statements
    response, statements = sql.during(lambda: client.delete(f"/api/{user_id}/trash", headers=headers))
    assert response.status_code == 204
    assert [statement.split()[0] for statement in statements] == ["BEGIN", "SELECT", "DELETE", "COMMIT"], statements


def test_conditional_writes_send_one_statement_when_they_match(
    client: httpx.Client, auth: Callable, user_id: str, seeded: list[dict], sql: StatementLog
) -> None:
    url = f"/api/{user_id}/tasks/{seeded[0]['id']}"
    headers = auth(user_id) | {"If-Match": f'"{seeded[0]["version"]}"'}
    response, statements = sql.during(lambda: client.patch(url, json={"title": "Matched"}, headers=headers))
    assert response.status_code == 200
    assert len(statements) == 1, statements
    response, statements = sql.during(lambda: client.patch(url, json={"title": "Stale"}, headers=headers))
    assert response.status_code == 412
    assert len(statements) == 2, statements  # the write that matched nothing, then the version for the ETag


def test_an_idempotent_create_records_its_key_in_the_same_transaction(
    client: httpx.Client, auth: Callable, user_id: str, seeded: list[dict], sql: StatementLog, database_kind: str
) -> None:
    headers = auth(user_id) | {"Idempotency-Key": "budget-1"}
    create = lambda: client.post(f"/api/{user_id}/tasks", json={"title": "Once"}, headers=headers)  # noqa: E731
    response, statements = sql.during(create)
    assert response.status_code == 201
    claim = ["SELECT"] if database_kind == "postgresql" else []  # the advisory lock
    expected = ["BEGIN", *claim, "SELECT", "INSERT", "INSERT", "COMMIT"]
    assert [statement.split()[0] for statement in statements] == expected, statements
    response, statements = sql.during(create)
    assert response.headers["idempotent-replayed"] == "true"
    assert [statement.split()[0] for statement in statements] == ["BEGIN", *claim, "SELECT", "COMMIT"], statements


@pytest.mark.parametrize(
    ("headers_for", "status"),
    [
        (lambda auth, user, other: {}, 401),
        (lambda auth, user, other: {"Authorization": "Bearer not-a-token"}, 401),
        (lambda auth, user, other: auth(other), 403),
    ],
)
def test_refused_requests_send_no_sql(
    client: httpx.Client,
    auth: Callable,
    user_id: str,
    other_user_id: str,
    sql: StatementLog,
    headers_for: Callable,
    status: int,
) -> None:
    headers = headers_for(auth, user_id, other_user_id)
    response, statements = sql.during(lambda: client.get(f"/api/{user_id}/tasks", headers=headers))
    assert response.status_code == status
    assert statements == []


def test_invalid_requests_send_no_sql(client: httpx.Client, auth: Callable, user_id: str, sql: StatementLog) -> None:
    response, statements = sql.during(lambda: client.get(f"/api/{user_id}/tasks?limit=0", headers=auth(user_id)))
    assert response.status_code == 422
    assert statements == []
