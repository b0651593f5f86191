"""The stall watchdog: it cuts only a connection that is still waiting on the server, never one that has
its answer, failed, went back to the pool, or merely reuses a dead connection's descriptor number."""

import os
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

import database
from database import stall_watchdog
from tests.test_faults import libpq_url

pytestmark = pytest.mark.postgresql_only

# The watchdog looks every half second; waiting this long for it to act is generous.
WATCHDOG_ACTS_WITHIN_SECONDS = 10


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The service's engine with a 1 s statement timeout (so its watchdog deadline is 6 s)."""
    engine = database.create_db_engine(
        make_url(database_url).set(drivername="postgresql+psycopg"), statement_timeout_ms=1000
    )
    yield engine
    engine.dispose()


def terminate(database_url: str, pid: int) -> None:
    """End the server process `pid`, as an administrator or a failover would."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def run_and_fail(engine: Engine, statement: str) -> None:
    """Run `statement`, which must fail with a database error."""
    with pytest.raises(sa_exc.DBAPIError), engine.connect() as connection:
        connection.execute(text(statement))


def division_by_zero(engine: Engine, _database_url: str) -> None:
    run_and_fail(engine, "SELECT 1/0")


def syntax_error(engine: Engine, _database_url: str) -> None:
    run_and_fail(engine, "SELEKT 1")


def statement_timeout(engine: Engine, _database_url: str) -> None:
    run_and_fail(engine, "SELECT pg_sleep(5)")


def terminated_backend(engine: Engine, database_url: str) -> None:
    with engine.connect() as connection:
        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        terminate(database_url, pid)
        with pytest.raises(sa_exc.DBAPIError):
            connection.execute(text("SELECT 1"))


FAILURES: list[Callable[[Engine, str], None]] = [division_by_zero, syntax_error, statement_timeout, terminated_backend]


@pytest.mark.parametrize("fail", FAILURES, ids=lambda fail: fail.__name__)
def test_nothing_is_left_armed_after_a_failed_statement(
    engine: Engine, database_url: str, fail: Callable[[Engine, str], None]
) -> None:
    before = stall_watchdog.armed()
    fail(engine, database_url)
    assert stall_watchdog.armed() == before
    with engine.connect() as connection:  # and the pool goes on working
        assert connection.execute(text("SELECT 1")).scalar_one() == 1
    assert stall_watchdog.armed() == before


def test_nothing_is_left_armed_after_failures_in_many_threads(engine: Engine) -> None:
    before = stall_watchdog.armed()

    def fail_a_few_times() -> None:
        for _ in range(5):
            with pytest.raises(sa_exc.DBAPIError), engine.connect() as connection:
                connection.execute(text("SELECT 1/0"))

    threads = [threading.Thread(target=fail_a_few_times) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert stall_watchdog.armed() == before


def wait_until_disarmed(before: int) -> None:
    """Wait for the watchdog to act on every overdue wait."""
    deadline = time.monotonic() + WATCHDOG_ACTS_WITHIN_SECONDS
    while stall_watchdog.armed() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stall_watchdog.armed() == before


def test_a_dead_connections_reused_descriptor_is_never_cut(database_url: str) -> None:
    """An overdue wait for a connection whose backend was terminated and whose socket was closed must not
    reach the connection that got the same descriptor number afterwards."""
    before = stall_watchdog.armed()
    url = libpq_url(database_url)
    dead = psycopg.connect(url, autocommit=True)
    dead_fd = dead.pgconn.socket
    stall_watchdog.start(dead, 0.5)  # as if a statement on it had started, and never ended
    terminate(database_url, dead.info.backend_pid)
    dead.close()

    reused: psycopg.Connection | None = None
    spares: list[psycopg.Connection] = []
    try:
        for _ in range(20):  # the lowest free number is normally the one just freed
            candidate = psycopg.connect(url, autocommit=True)
            if candidate.pgconn.socket == dead_fd:
                reused = candidate
                break
            spares.append(candidate)
        assert reused is not None, "no new connection got the dead connection's descriptor number"
        wait_until_disarmed(before)
        assert reused.execute("SELECT 1").fetchone() == (1,)
    finally:
        stall_watchdog.stop()
        for connection in [*spares, *([reused] if reused else [])]:
            connection.close()


def test_an_overdue_connection_that_is_no_longer_waiting_is_not_cut(database_url: str) -> None:
    before = stall_watchdog.armed()
    with psycopg.connect(libpq_url(database_url), autocommit=True) as idle:
        stall_watchdog.start(idle, 0.5)  # armed, but the connection sends nothing: it waits for no one
        wait_until_disarmed(before)
        assert idle.execute("SELECT 1").fetchone() == (1,)


def test_a_connection_still_waiting_past_its_deadline_is_cut(database_url: str) -> None:
    """The watchdog's purpose: a wait that outlives its deadline ends in an error, not a hang."""
    before = stall_watchdog.armed()
    with psycopg.connect(libpq_url(database_url), autocommit=True) as waiting:
        stall_watchdog.start(waiting, 1)
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            waiting.execute("SELECT pg_sleep(60)")
        stall_watchdog.stop()
    assert time.monotonic() - started < 50
    assert stall_watchdog.armed() == before


def test_the_watchdog_holds_a_descriptor_only_while_a_statement_waits(engine: Engine) -> None:
    """Arming duplicates the socket's descriptor; ending the wait closes it again: none leak."""
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        with pytest.raises(sa_exc.DBAPIError), engine.connect() as connection:
            connection.execute(text("SELECT 1/0"))
    assert len(os.listdir("/proc/self/fd")) <= open_before + 2  # the pool may have opened a connection


@pytest.fixture
def probe_table(database_url: str) -> Iterator[str]:
    """A one-row table of this test's own: `(id 1, n 0)`."""
    name = f"watchdog_probe_{os.getpid()}_{threading.get_ident()}"
    with psycopg.connect(libpq_url(database_url), autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, n int NOT NULL)")
        admin.execute(f"INSERT INTO {name} VALUES (1, 0)")
    yield name
    with psycopg.connect(libpq_url(database_url), autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {name}")


def test_a_statement_given_up_on_is_cancelled_not_applied_later(database_url: str, probe_table: str) -> None:
    """Behind a pooler no statement_timeout holds: a write the client gave up on (its request got a 503) must
    not run once the lock it waited for is released, or a retrying client would apply it twice."""
    url = libpq_url(database_url)
    before = stall_watchdog.armed()
    with psycopg.connect(url) as locker, psycopg.connect(url, autocommit=True) as writer:
        locker.execute(f"SELECT n FROM {probe_table} WHERE id = 1 FOR UPDATE")  # holds the row, transaction open
        stall_watchdog.start(writer, 0.5)
        with pytest.raises(psycopg.OperationalError):
            writer.execute(f"UPDATE {probe_table} SET n = n + 1 WHERE id = 1")
        stall_watchdog.stop()
        locker.rollback()
    with psycopg.connect(url, autocommit=True) as reader:
        waiting = reader.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            (f"UPDATE {probe_table}%",),
        ).fetchone()
        assert waiting == (0,)
        assert reader.execute(f"SELECT n FROM {probe_table} WHERE id = 1").fetchone() == (0,)
    assert stall_watchdog.armed() == before
