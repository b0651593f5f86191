"""The service behind a real PgBouncer in transaction mode, as Neon's `-pooler` host runs it.

In transaction mode each transaction (or autocommit statement) may run on a different server
connection, and a few server connections serve many clients: session state (advisory locks,
prepared statements, SET) does not follow a client. PgBouncer also refuses the `options` startup
parameter. Every test here goes through tests/pgbouncer.py's PgBouncer (three server connections
per database) and needs a real PostgreSQL (TEST_DATABASE_URL); their SQLite runs are deselected.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url

import database
import models
from main import create_app
from tests.conftest import POSTGRES_SESSION_TIMEZONE, SECRET, free_port, make_settings, postgres_admin_url
from tests.keys import JwksServer
from tests.pgbouncer import DEFAULT_POOL_SIZE, PgBouncer
from tests.test_faults import (
    PROMPT_ANSWER_SECONDS,
    RECOVERY_SECONDS,
    assert_database_unavailable,
    impatient_app,
    libpq_url,
    serving,
    tasks_url,
    timed,
)

if TYPE_CHECKING:
    from tests.conftest import LiveServer

pytestmark = pytest.mark.postgresql_only

Auth = Callable[[str], dict[str, str]]
Serve = Callable[[FastAPI], "LiveServer"]

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4
# Generous: four workers importing the app at once on a loaded two-core machine.
START_UP_SECONDS = 60
# A worker gives up waiting for the schema lock after the statement timeout (15 s): once the first
# waits, the others must queue well before that.
ALL_QUEUED_SECONDS = database.STATEMENT_TIMEOUT_MS / 1000 - 3
STOP_SECONDS = 30
# More concurrent requests than PgBouncer has server connections, so clients must share them.
CONCURRENT_CLIENTS = 16
# psycopg prepares a statement on its fifth use on a connection (its default prepare_threshold):
# more rounds than that on each connection would expose prepared statements that do not follow it.
ROUNDS_PER_CLIENT = 8


# --- Helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FreshDatabase:
    """An empty database of its own, reached directly and through PgBouncer."""

    name: str
    direct_url: str
    pooled_url: str


@pytest.fixture
def fresh_database(database_url: str, pgbouncer: PgBouncer) -> Iterator[FreshDatabase]:
    """A new empty database (in the same non-UTC zone as the run's), dropped with its connections afterwards."""
    name = f"todo_pooler_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_url(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        admin.execute(f"ALTER DATABASE \"{name}\" SET timezone TO '{POSTGRES_SESSION_TIMEZONE}'")
    try:
        direct = make_url(database_url).set(database=name).render_as_string(hide_password=False)
        yield FreshDatabase(name=name, direct_url=direct, pooled_url=pgbouncer.url(name))
    finally:
        with psycopg.connect(postgres_admin_url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def advisory_locks(direct_url: str) -> list[tuple[Any, ...]]:
    """Advisory locks held or awaited in the database, read on a direct connection (not the pooler's)."""
    with psycopg.connect(libpq_url(direct_url), autocommit=True) as observer:
        return observer.execute(
            "SELECT classid, objid, pid, granted FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()


def table_exists(direct_url: str, table: str) -> bool:
    """True when the database has `table` in its public schema."""
    with psycopg.connect(libpq_url(direct_url), autocommit=True) as observer:
        row = observer.execute("SELECT to_regclass(%s) IS NOT NULL", (f"public.{table}",)).fetchone()
    return bool(row and row[0])


def index_names(direct_url: str, table: str) -> set[str]:
    """The names of the indexes the database has on `table`."""
    with psycopg.connect(libpq_url(direct_url), autocommit=True) as observer:
        rows = observer.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = %s", (table,)
        ).fetchall()
    return {name for (name,) in rows}


def lock_waiters(direct_url: str) -> int:
    """How many backends of the database wait on a lock right now."""
    with psycopg.connect(libpq_url(direct_url), autocommit=True) as observer:
        row = observer.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (make_url(direct_url).database,),
        ).fetchone()
    return row[0] if row else 0


def queued_for_the_schema(fresh_database: FreshDatabase, pgbouncer: PgBouncer) -> int:
    """Clients of the database waiting for the schema lock, or for a server connection behind those who do."""
    waiting_for_the_lock = sum(1 for *_, granted in advisory_locks(fresh_database.direct_url) if not granted)
    pools = [row for row in pgbouncer.show("POOLS") if row["database"] == fresh_database.name]
    return waiting_for_the_lock + sum(row["cl_waiting"] for row in pools)


def assert_unavailable_with_retry_after(response: httpx.Response) -> None:
    """The contract's 503 for an unusable database, telling the client when to try again."""
    assert_database_unavailable(response)
    retry_after = response.headers.get("Retry-After", "")
    assert retry_after.isdigit() and int(retry_after) >= 1, f"Retry-After: {retry_after!r}"


def parse_utc(value: str) -> datetime:
    """A date-time from the API, checked to be UTC with an explicit offset."""
    assert value.endswith(("Z", "+00:00")), f"{value!r} does not say it is UTC"
    parsed = datetime.fromisoformat(value)
    offset = parsed.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    return parsed


def exercise_one_task(http: httpx.Client, user_id: str, headers: dict[str, str], label: str) -> dict[str, Any]:
    """Create, list, read, rename, toggle and delete tasks of `user_id`, checking every answer.

    Returns the task that is kept (renamed and completed); a second one is created and deleted.
    """
    due_date = "2031-05-06T07:08:09Z"
    created = http.post(
        tasks_url(user_id), json={"title": label, "description": "Kept", "due_date": due_date}, headers=headers
    )
    assert created.status_code == 201, created.text
    task = created.json()
    assert created.headers["Location"].endswith(f"/api/{user_id}/tasks/{task['id']}")
    assert (task["title"], task["description"], task["completed"]) == (label, "Kept", False)
    assert parse_utc(task["due_date"]) == parse_utc(due_date)

    listed = http.get(tasks_url(user_id), headers=headers)
    assert listed.status_code == 200, listed.text
    assert [item["id"] for item in listed.json()] == [task["id"]]
    read = http.get(tasks_url(user_id, task["id"]), headers=headers)
    assert read.status_code == 200 and read.json() == task, read.text

    renamed = http.patch(tasks_url(user_id, task["id"]), json={"title": f"{label} renamed"}, headers=headers)
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["title"], renamed.json()["description"]) == (f"{label} renamed", "Kept")
    toggled = http.patch(tasks_url(user_id, task["id"], "/complete"), headers=headers)
    assert toggled.status_code == 200 and toggled.json()["completed"] is True, toggled.text

    doomed = http.post(tasks_url(user_id), json={"title": f"{label} doomed"}, headers=headers)
    assert doomed.status_code == 201, doomed.text
    deleted = http.delete(tasks_url(user_id, doomed.json()["id"]), headers=headers)
    assert deleted.status_code == 204 and deleted.content == b"", deleted.text
    remaining = http.get(tasks_url(user_id), headers=headers)
    assert remaining.status_code == 200 and remaining.json() == [toggled.json()], remaining.text
    return toggled.json()


class ServiceCommand:
    """Several uvicorn workers (`python -m uvicorn main:app --workers 4`) as a child process: each worker
    migrates at start-up, as under the production command.

    `start()` runs it; leaving the `with` block stops it. Its workers' output (stderr and stdout,
    shared by all) goes to a file, read with `output()`.
    """

    def __init__(self, database_url: str, log_directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url
        self.log_path = log_directory / f"uvicorn-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        """Everything the master and its workers wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, characters: int = 4000) -> str:
        """The end of `output()`, for a failure message."""
        return self.output()[-characters:]

    def __enter__(self) -> "ServiceCommand":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Run the command in the background."""
        service_environment = {"DATABASE_URL": self.database_url, "BETTER_AUTH_SECRET": SECRET, "LOG_LEVEL": "info"}
        command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            # A session of its own: if it will not stop, its whole group (master and workers) is killed.
            self._process = subprocess.Popen(
                [*command, "--workers", str(WORKERS)],
                cwd=REPO_ROOT,
                env=os.environ | service_environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def wait_until_serving(self, seconds: float = START_UP_SECONDS) -> None:
        """Every worker has finished its start-up, and the service says it is healthy."""
        assert self._process is not None
        deadline = time.monotonic() + seconds
        with httpx.Client(base_url=self.url, timeout=PROMPT_ANSWER_SECONDS) as http:
            while True:
                assert self._process.poll() is None, f"uvicorn exited ({self._process.returncode}):\n{self.tail()}"
                started = self.output().count("Application startup complete.")
                if started >= WORKERS:
                    try:
                        if http.get("/health").status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                assert time.monotonic() < deadline, (
                    f"{started} of {WORKERS} workers started, or not healthy, after {seconds} s:\n{self.tail()}"
                )
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, as a platform stops a service, and wait for master and workers to exit."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"uvicorn did not stop within {STOP_SECONDS} s of SIGTERM:\n{self.tail()}")


# --- Start-up -----------------------------------------------------------------------------------


def test_four_workers_starting_at_once_create_the_schema_leave_no_lock_and_start_again(
    fresh_database: FreshDatabase, pgbouncer: PgBouncer, auth: Auth, tmp_path: Path
) -> None:
    users = [f"user-{uuid.uuid4().hex}" for _ in range(6)]

    # The schema lock is held until every worker queues for it, so all four then race for it at once,
    # three on PgBouncer's server connections and the rest queued in PgBouncer for one of those.
    with ServiceCommand(fresh_database.pooled_url, tmp_path) as first:
        with psycopg.connect(libpq_url(fresh_database.direct_url)) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (database.SCHEMA_LOCK_KEY,))
            first.start()
            deadline = time.monotonic() + START_UP_SECONDS
            while (queued := queued_for_the_schema(fresh_database, pgbouncer)) < WORKERS:
                if queued and deadline - time.monotonic() > ALL_QUEUED_SECONDS:
                    deadline = time.monotonic() + ALL_QUEUED_SECONDS  # the first is waiting: the others now
                assert time.monotonic() < deadline, f"{queued} of {WORKERS} workers queued:\n{first.tail()}"
                time.sleep(0.05)
            holder.rollback()
        first.wait_until_serving()

        def traffic(user_id: str) -> dict[str, Any]:
            with httpx.Client(base_url=first.url, timeout=30) as http:
                return exercise_one_task(http, user_id, auth(user_id), f"Task of {user_id}")

        with ThreadPoolExecutor(max_workers=len(users)) as pool:
            kept = dict(zip(users, pool.map(traffic, users), strict=True))
        first.stop()
        first_output = first.output()

    assert first_output.count("Application startup complete.") == WORKERS
    for trouble in ("IntegrityError", "Traceback", "ProgrammingError"):
        assert trouble not in first_output, first_output
    assert table_exists(fresh_database.direct_url, "tasks")
    expected_indexes = {index.name for index in models.Task.__table__.indexes}  # type: ignore[attr-defined]
    assert expected_indexes and expected_indexes <= index_names(fresh_database.direct_url, "tasks")
    assert advisory_locks(fresh_database.direct_url) == []

    # A start-up lock left held (on a server connection PgBouncer keeps) would hang this one.
    with ServiceCommand(fresh_database.pooled_url, tmp_path) as again:
        again.start()
        again.wait_until_serving()
        with httpx.Client(base_url=again.url, timeout=30) as http:
            for user_id, task in kept.items():
                listed = http.get(tasks_url(user_id), headers=auth(user_id))
                assert listed.status_code == 200 and listed.json() == [task], listed.text
            created = http.post(tasks_url(users[0]), json={"title": "After the restart"}, headers=auth(users[0]))
            assert created.status_code == 201, created.text
        again.stop()
        again_output = again.output()
    assert "Traceback" not in again_output, again_output
    assert advisory_locks(fresh_database.direct_url) == []


def test_start_up_that_cannot_get_the_schema_lock_answers_503_with_retry_after_then_recovers(
    fresh_database: FreshDatabase, jwks_server: JwksServer, serve: Serve, auth: Auth, user_id: str
) -> None:
    headers = auth(user_id)
    with psycopg.connect(libpq_url(fresh_database.direct_url)) as holder:  # a transaction until rollback()
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (database.SCHEMA_LOCK_KEY,))
        app = impatient_app(fresh_database.pooled_url, jwks_server)
        with serving(serve, app) as live, httpx.Client(base_url=live.url, timeout=30) as http:
            attempts: list[Callable[[], httpx.Response]] = [
                lambda: http.get(tasks_url(user_id), headers=headers),
                lambda: http.post(tasks_url(user_id), json={"title": "Too early"}, headers=headers),
                lambda: http.get(tasks_url(user_id, 1), headers=headers),
            ]
            for attempt in attempts:
                response, seconds = timed(attempt)
                assert_unavailable_with_retry_after(response)
                assert seconds < PROMPT_ANSWER_SECONDS
            with ThreadPoolExecutor(max_workers=len(attempts)) as pool:  # at once, through few server connections
                for response, _ in pool.map(timed, attempts):
                    assert_unavailable_with_retry_after(response)
            assert not table_exists(fresh_database.direct_url, "tasks")  # nobody went round the lock

            holder.rollback()  # the lock goes with the transaction
            created = http.post(tasks_url(user_id), json={"title": "On time"}, headers=headers)
            assert created.status_code == 201, created.text
            listed = http.get(tasks_url(user_id), headers=headers)
            assert listed.status_code == 200 and listed.json() == [created.json()], listed.text

    assert table_exists(fresh_database.direct_url, "tasks")
    assert advisory_locks(fresh_database.direct_url) == []


# --- Sessions shared through few server connections ---------------------------------------------


def test_timestamps_through_the_pooler_are_utc_and_equal_to_what_was_stored(
    pgbouncer_url: str, database_url: str, pgbouncer: PgBouncer, jwks_server: JwksServer, serve: Serve, auth: Auth
) -> None:
    # The database's own zone is America/St_Johns (UTC-03:30 or -02:30): a server connection lent
    # without the client's UTC setting would show up as an offset or a shifted instant.
    offsets = ["Z", "+00:00", "-03:30", "+05:45", "-08:00", "+14:00"]
    sent_due_dates = {
        f"user-{uuid.uuid4().hex}": f"2030-{1 + number % 12:02d}-{1 + number:02d}T{number:02d}:15:30.123456"
        + offsets[number % len(offsets)]
        for number in range(CONCURRENT_CLIENTS)
    }
    start_together = threading.Barrier(CONCURRENT_CLIENTS)

    with serving(serve, create_app(make_settings(pgbouncer_url, jwks_server))) as live:

        def create_and_read(user_id: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
            headers = auth(user_id)
            with httpx.Client(base_url=live.url, timeout=30) as http:
                start_together.wait(timeout=30)
                created = http.post(
                    tasks_url(user_id), json={"title": "When", "due_date": sent_due_dates[user_id]}, headers=headers
                )
                assert created.status_code == 201, created.text
                read = http.get(tasks_url(user_id, created.json()["id"]), headers=headers)
                assert read.status_code == 200, read.text
                listed = http.get(tasks_url(user_id), headers=headers)
                assert listed.status_code == 200, listed.text
                return created.json(), read.json(), listed.json()

        with ThreadPoolExecutor(max_workers=CONCURRENT_CLIENTS) as pool:
            results = dict(zip(sent_due_dates, pool.map(create_and_read, sent_due_dates), strict=True))
        name = make_url(pgbouncer_url).database
        clients = [row for row in pgbouncer.show("CLIENTS") if row["database"] == name]
        servers = [row for row in pgbouncer.show("SERVERS") if row["database"] == name]
    assert len(clients) > pgbouncer.pool_size >= len(servers)  # many clients really shared few servers

    with psycopg.connect(libpq_url(database_url), autocommit=True) as direct:
        ids = [created["id"] for created, _, _ in results.values()]
        stored = {
            task_id: (created_at, updated_at, due_date)
            for task_id, created_at, updated_at, due_date in direct.execute(
                "SELECT id, created_at, updated_at, due_date FROM tasks WHERE id = ANY(%s)", (ids,)
            )
        }
    for user_id, (created, read, listed) in results.items():
        assert read == created and listed == [created]
        created_at, updated_at, due_date = stored[created["id"]]
        assert parse_utc(created["due_date"]) == datetime.fromisoformat(sent_due_dates[user_id]) == due_date
        assert parse_utc(created["created_at"]) == created_at
        assert parse_utc(created["updated_at"]) == updated_at
        assert abs((created_at - datetime.now(UTC)).total_seconds()) < RECOVERY_SECONDS  # now, not hours off


def test_many_concurrent_requests_of_every_kind_need_no_prepared_statement(
    pgbouncer_url: str, pgbouncer: PgBouncer, jwks_server: JwksServer, serve: Serve, auth: Auth
) -> None:
    log_before = len(pgbouncer.log())
    users = [f"user-{uuid.uuid4().hex}" for _ in range(CONCURRENT_CLIENTS // 2)]
    start_together = threading.Barrier(len(users))

    with serving(serve, create_app(make_settings(pgbouncer_url, jwks_server))) as live:

        def every_kind(user_id: str) -> list[httpx.Response]:
            headers = auth(user_id)
            answers: list[httpx.Response] = []
            with httpx.Client(base_url=live.url, timeout=30) as http:
                start_together.wait(timeout=30)
                for round_number in range(ROUNDS_PER_CLIENT):
                    created = http.post(tasks_url(user_id), json={"title": f"Round {round_number}"}, headers=headers)
                    answers.append(created)
                    if created.status_code != 201:
                        continue
                    task = tasks_url(user_id, created.json()["id"])
                    answers += [
                        http.get(tasks_url(user_id), params={"q": "round", "sort": "title"}, headers=headers),
                        http.get(task, headers=headers),
                        http.put(task, json={"description": f"Put {round_number}"}, headers=headers),
                        http.patch(task, json={"title": f"Patched {round_number}"}, headers=headers),
                        http.patch(f"{task}/complete", headers=headers),
                        http.get("/health"),
                    ]
                    if round_number % 2:
                        answers.append(http.delete(task, headers=headers))
            return answers

        with ThreadPoolExecutor(max_workers=len(users)) as pool:
            answers = [answer for answers in pool.map(every_kind, users) for answer in answers]

    failures = [answer for answer in answers if not answer.is_success]
    assert not failures, [f"{a.request.method} {a.request.url.path}: {a.status_code} {a.text}" for a in failures[:5]]
    assert len(answers) == len(users) * ROUNDS_PER_CLIENT * 7 + len(users) * (ROUNDS_PER_CLIENT // 2)
    assert "prepared statement" not in pgbouncer.log()[log_before:]


# --- Statements that wait too long --------------------------------------------------------------


def test_request_stuck_behind_a_row_lock_through_the_pooler_ends_in_503_and_frees_its_worker(
    pgbouncer_url: str, database_url: str, jwks_server: JwksServer, serve: Serve, auth: Auth, user_id: str
) -> None:
    headers = auth(user_id)
    with (
        serving(serve, impatient_app(pgbouncer_url, jwks_server)) as live,
        httpx.Client(base_url=live.url, timeout=30) as http,
    ):
        locked = http.post(tasks_url(user_id), json={"title": "Locked"}, headers=headers).json()
        free = http.post(tasks_url(user_id), json={"title": "Free"}, headers=headers).json()

        with psycopg.connect(libpq_url(database_url)) as locker:  # the row lock lasts until this transaction ends
            locker.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (locked["id"],))
            with ThreadPoolExecutor(max_workers=1) as pool, httpx.Client(base_url=live.url, timeout=30) as stuck:
                toggle_locked = tasks_url(user_id, locked["id"], "/complete")
                blocked = pool.submit(timed, lambda: stuck.patch(toggle_locked, headers=headers))
                deadline = time.monotonic() + PROMPT_ANSWER_SECONDS
                while lock_waiters(database_url) == 0 and not blocked.done():
                    assert time.monotonic() < deadline, "the PATCH never waited on the row lock"
                    time.sleep(0.02)
                # Meanwhile, the service goes on answering everything that does not need the locked row.
                meanwhile = [
                    http.get(tasks_url(user_id, free["id"]), headers=headers),
                    http.patch(tasks_url(user_id, free["id"], "/complete"), headers=headers),
                    http.get("/health"),
                ]
                response, seconds = blocked.result(timeout=PROMPT_ANSWER_SECONDS + 30)
            assert all(answer.is_success for answer in meanwhile), [answer.text for answer in meanwhile]
            assert_database_unavailable(response)
            assert seconds < PROMPT_ANSWER_SECONDS
            # The worker is free again: more requests than PgBouncer has server connections still succeed.
            free_url = tasks_url(user_id, free["id"])
            afterwards = [http.get(free_url, headers=headers) for _ in range(2 * DEFAULT_POOL_SIZE)]
            assert all(answer.status_code == 200 for answer in afterwards)
            locker.rollback()

        toggled = http.patch(tasks_url(user_id, locked["id"], "/complete"), headers=headers)
        assert toggled.status_code == 200, toggled.text
        listed = http.get(tasks_url(user_id), headers=headers)
        assert listed.status_code == 200 and {task["id"] for task in listed.json()} == {locked["id"], free["id"]}
