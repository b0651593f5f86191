"""A clean restart: SIGTERM to the production command (the Dockerfile's CMD, run as a child process on a
fresh PostgreSQL database) while requests are in flight, and while only idle keep-alive clients are.

The contract: the service stops accepting connections (gunicorn's master closes its listening socket
first, then each uvicorn worker its own), lets requests in flight finish (for at most gunicorn's
graceful_timeout), closes its database connections and exits 0; nothing it acknowledged is lost.
Requests are held in flight structurally, never by timing: those that need a task wait on a row lock
held from a direct connection (pg_stat_activity shows them waiting), and creates are sent with
`Expect: 100-continue`, so the uvicorn worker's `100 Continue` proves the app is waiting for a body the
client sends only after SIGTERM. Needs a real PostgreSQL (TEST_DATABASE_URL); the SQLite runs are
deselected.
"""

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_SESSION_TIMEZONE, postgres_admin_url
from tests.test_dockerfile import (
    ProductionService,
    assert_stopped_gracefully,
    graceful_shutdown_seconds,
    production_command,
)
from tests.test_faults import libpq_url, tasks_url

pytestmark = pytest.mark.postgresql_only

Auth = Callable[[str], dict[str, str]]

# Generous bounds: a slow machine passes, a hang does not.
PROMPT_SECONDS = 15
# How long after SIGTERM the port may still accept connections: the master closes its socket as soon as it
# handles the signal, and each worker its own as it starts draining; generous for a loaded machine.
STOP_ACCEPTING_SECONDS = 10
# Beyond the graceful bound: closing the pools and the processes exiting.
EXIT_MARGIN_SECONDS = 15
# Idle keep-alive connections must not hold the shutdown: far less than the graceful bound (25 s).
IDLE_EXIT_SECONDS = 10
IDLE_CLIENTS = 8
CREATES_IN_FLIGHT = 3


# --- Helpers ------------------------------------------------------------------------------------


@pytest.fixture
def fresh_database(database_url: str) -> Iterator[str]:
    """A new empty database (in the run's non-UTC zone) for one service; dropped with its connections afterwards."""
    name = f"todo_restart_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_url(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        admin.execute(f"ALTER DATABASE \"{name}\" SET timezone TO '{POSTGRES_SESSION_TIMEZONE}'")
    try:
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(postgres_admin_url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def observe(database_url: str, query: str, *parameters: Any) -> list[tuple[Any, ...]]:
    """Rows of `query`, run on a connection of its own that is closed properly afterwards."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as observer:
        return observer.execute(query, parameters).fetchall()


def lock_waiters(database_url: str) -> int:
    """How many backends of the database wait on a lock right now."""
    rows = observe(
        database_url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    return rows[0][0]


def wait_for_lock_waiters(database_url: str, expected: int) -> None:
    """Until `expected` statements wait on a lock (the requests are in flight, inside the database)."""
    deadline = time.monotonic() + PROMPT_SECONDS
    while (waiting := lock_waiters(database_url)) < expected:
        assert time.monotonic() < deadline, f"only {waiting} of {expected} requests reached the row lock"
        time.sleep(0.05)
    assert waiting == expected


def other_connections(database_url: str) -> list[tuple[Any, ...]]:
    """Every connection to the database but the one asking: the service's, once the test's own are closed."""
    return observe(
        database_url,
        "SELECT pid, application_name, state, query FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )


def assert_connections_closed_properly(database_url: str) -> None:
    """No connection to the database remains, and none ended by its client simply vanishing.

    A process that exits without closing its connections leaves the server an end of stream instead of
    a Terminate message; PostgreSQL (14+) counts those sessions as abandoned.
    """
    deadline = time.monotonic() + PROMPT_SECONDS
    while remaining := other_connections(database_url):  # a closed backend may take a moment to go
        assert time.monotonic() < deadline, f"connections left after the exit: {remaining}"
        time.sleep(0.1)
    [(abandoned,)] = observe(
        database_url, "SELECT sessions_abandoned FROM pg_stat_database WHERE datname = current_database()"
    )
    assert abandoned == 0, f"{abandoned} database sessions were dropped, not closed"


def wait_until_refused(port: int) -> int:
    """Connect until the port refuses; how many connections it still accepted (each closed at once) before."""
    deadline = time.monotonic() + STOP_ACCEPTING_SECONDS
    accepted = 0
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=PROMPT_SECONDS):
                accepted += 1
        except ConnectionRefusedError:
            return accepted
        assert time.monotonic() < deadline, (
            f"{STOP_ACCEPTING_SECONDS} s after SIGTERM the port still accepts connections ({accepted} so far)"
            " while requests are in flight: no worker will ever answer them, and they are reset when the"
            " master exits"
        )
        time.sleep(0.05)


def assert_refused(port: int) -> None:
    """Nothing listens on the port any more."""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=PROMPT_SECONDS).close()


@dataclass
class RawResponse:
    """A response read off a socket: status, headers (lower-case names) and JSON body."""

    status: int
    headers: dict[str, str]
    body: Any


class ContinuedCreate:
    """A create sent with `Expect: 100-continue`: its head now, its body when `finish()` is called.

    uvicorn sends `100 Continue` only when the app first asks for the body, so once it has arrived the
    request is in the app's hands: in flight, with its body still here.
    """

    def __init__(self, port: int, user_id: str, headers: dict[str, str], title: str) -> None:
        self.title = title
        self.body = json.dumps({"title": title}).encode()
        self.connection = socket.create_connection(("127.0.0.1", port), timeout=PROMPT_SECONDS)
        self.reader = self.connection.makefile("rb")
        head = (
            f"POST {tasks_url(user_id)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: {headers['Authorization']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(self.body)}\r\nExpect: 100-continue\r\n\r\n"
        )
        self.connection.sendall(head.encode())
        interim = self.reader.readline()
        assert interim == b"HTTP/1.1 100 Continue\r\n", interim
        assert self.reader.readline() == b"\r\n"

    def finish(self) -> RawResponse:
        """Send the body and read the whole answer; the connection must then be closed cleanly by the server."""
        self.connection.sendall(self.body)
        status_line = self.reader.readline().decode()
        headers: dict[str, str] = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.reader.read(int(headers["content-length"]))
        after = self.reader.read()  # b"" at a clean close; a reset raises
        self.reader.close()
        self.connection.close()
        assert after == b"", after
        return RawResponse(int(status_line.split()[1]), headers, json.loads(body))


def stored_task(database_url: str, task_id: int) -> tuple[Any, ...]:
    """A task's title, description and completed flag, read directly from the database."""
    rows = observe(database_url, "SELECT title, description, completed FROM tasks WHERE id = %s", task_id)
    assert rows, f"task {task_id} is not in the database"
    return rows[0]


# --- Tests --------------------------------------------------------------------------------------


def test_sigterm_finishes_requests_in_flight_refuses_new_connections_closes_the_pool_and_exits_0(
    fresh_database: str, auth: Auth, user_id: str, tmp_path: Path
) -> None:
    headers = auth(user_id)
    with ProductionService(fresh_database, tmp_path) as service:
        service.start()
        service.wait_until_serving()
        with httpx.Client(base_url=service.url, timeout=PROMPT_SECONDS) as http:
            created = http.post(tasks_url(user_id), json={"title": "Locked"}, headers=headers)
            assert created.status_code == 201, created.text
        locked_url = tasks_url(user_id, created.json()["id"])

        def send(method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
            with httpx.Client(base_url=service.url, timeout=graceful_shutdown_seconds(service.command) * 2) as one:
                return one.request(method, path, json=body, headers=headers)

        row_requests = {
            "rename": ("PATCH", locked_url, {"title": "Renamed while stopping"}),
            "describe": ("PUT", locked_url, {"description": "Described while stopping"}),
            "toggle": ("PATCH", f"{locked_url}/complete", None),
        }
        # The pool is left last: on a failure the lock goes first, so the requests it holds can end.
        with ThreadPoolExecutor(len(row_requests)) as pool, psycopg.connect(libpq_url(fresh_database)) as locker:
            locker.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (created.json()["id"],))
            in_flight: dict[str, Future[httpx.Response]] = {
                name: pool.submit(send, *request) for name, request in row_requests.items()
            }
            wait_for_lock_waiters(fresh_database, len(row_requests))
            creates = [
                ContinuedCreate(service.port, user_id, headers, f"Created while stopping {n}")
                for n in range(CREATES_IN_FLIGHT)
            ]

            service.terminate()
            signalled_at = time.monotonic()
            wait_until_refused(service.port)
            # Refused while every request that needs the row is still waiting for it: the service is draining.
            assert lock_waiters(fresh_database) == len(row_requests)
            assert not [name for name, answer in in_flight.items() if answer.done()]
            # The creates need no locked row: their bodies go now, and they are answered while the lock holds.
            answered_creates = [create.finish() for create in creates]
            time.sleep(1)  # no request may be given up on while the lock holds (the bound is far longer)
            assert lock_waiters(fresh_database) == len(row_requests)
            locker.rollback()
            answers = {name: answer.result(timeout=PROMPT_SECONDS) for name, answer in in_flight.items()}

        exit_code = service.wait(graceful_shutdown_seconds(service.command) + EXIT_MARGIN_SECONDS)
        stopped_after = time.monotonic() - signalled_at
        output = service.output()
        assert exit_code == 0, output[-4000:]
        assert stopped_after < graceful_shutdown_seconds(service.command) + EXIT_MARGIN_SECONDS
        assert_stopped_gracefully(output)
        assert_refused(service.port)

    # Every request in flight got its normal answer, told the client the connection closes, and was applied.
    for name, answer in answers.items():
        assert answer.status_code == 200, f"{name}: {answer.status_code} {answer.text}"
        assert answer.headers.get("connection") == "close", name
    assert answers["rename"].json()["title"] == "Renamed while stopping"
    assert answers["describe"].json()["description"] == "Described while stopping"
    assert answers["toggle"].json()["completed"] is True
    assert stored_task(fresh_database, created.json()["id"]) == (
        "Renamed while stopping",
        "Described while stopping",
        True,
    )
    for create, answer in zip(creates, answered_creates, strict=True):
        assert answer.status == 201, answer.body
        assert answer.headers.get("connection") == "close"
        assert answer.body["title"] == create.title
        assert answer.headers["location"].endswith(tasks_url(user_id, answer.body["id"]))
        assert stored_task(fresh_database, answer.body["id"]) == (create.title, None, False)
    assert_connections_closed_properly(fresh_database)


def test_sigterm_with_only_idle_keep_alive_clients_exits_0_promptly_closing_them_cleanly(
    fresh_database: str, tmp_path: Path
) -> None:
    with ProductionService(fresh_database, tmp_path) as service:
        service.start()
        service.wait_until_serving()
        idle = [HTTPConnection("127.0.0.1", service.port, timeout=PROMPT_SECONDS) for _ in range(IDLE_CLIENTS)]
        for connection in idle:
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200 and response.getheader("connection") != "close"
            response.read()  # the connection stays open, idle, for another request

        service.terminate()
        signalled_at = time.monotonic()
        exit_code = service.wait(IDLE_EXIT_SECONDS)
        stopped_after = time.monotonic() - signalled_at
        output = service.output()

    assert exit_code == 0, output[-4000:]
    assert stopped_after < IDLE_EXIT_SECONDS < graceful_shutdown_seconds(production_command())
    assert_stopped_gracefully(output)
    for connection in idle:
        assert connection.sock is not None
        assert connection.sock.recv(1) == b"", "an idle connection was reset, not closed"  # a reset raises
        connection.close()
    assert_refused(service.port)
    assert_connections_closed_properly(fresh_database)
