"""The database engine, the per-request session, and schema migrations."""

import contextlib
import logging
import os
import select
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from psycopg import pq
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel import Session

logger = logging.getLogger("todo.database")

CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_MS = 15_000
# How long past the statement timeout a silent server is waited for before its statement is cancelled,
# and how long after the cancel before its connection is cut.
STALL_MARGIN_SECONDS = 5
CANCEL_GRACE_SECONDS = 2
CANCEL_TIMEOUT_SECONDS = 2
SQLITE_BUSY_TIMEOUT_SECONDS = 30
# Neon suspends idle computes after 5 minutes; recycle connections well before that.
POOL_RECYCLE_SECONDS = 240
# FastAPI runs sync routes on AnyIO's thread pool (40 threads): one connection each at the most,
# all kept open, since opening one (a PostgreSQL backend, TLS, SET TIME ZONE) costs more than a request.
POOL_SIZE = 40
POOL_MAX_OVERFLOW = 0
POOL_TIMEOUT_SECONDS = 10
# A pooled connection back from its last use within this long is checked without a round trip.
PING_AFTER_IDLE_SECONDS = 10
# Any 64-bit key, the same in every worker and instance: serialises migrations between them.
SCHEMA_LOCK_KEY = 7_105_300_117
# A revision may rebuild an index on a large table: its statements get far longer than a request's.
MIGRATION_STATEMENT_TIMEOUT_MS = 10 * 60 * 1000
MIGRATIONS_DIRECTORY = Path(__file__).parent / "migrations"
# The revision describing the schema of databases made before migrations existed.
BASELINE_REVISION = "0001_baseline"


def _sqlite_lower(value: str | None) -> str | None:
    """Unicode-aware lower(), so SQLite folds case like PostgreSQL does (its own only knows ASCII)."""
    return value.lower() if isinstance(value, str) else value


def _configure_sqlite_connection(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    dbapi_connection.create_function("lower", 1, _sqlite_lower, deterministic=True)
    # WAL lets readers run beside the writer; busy_timeout makes writers wait for each other.
    dbapi_connection.execute("PRAGMA journal_mode=WAL")
    dbapi_connection.execute("PRAGMA foreign_keys=ON")


def _use_utc_session(dbapi_connection: Any, _record: Any) -> None:
    # Timestamps then come back in UTC whatever the server's default zone; PgBouncer (Neon's pooler)
    # re-applies a client's TimeZone on every server connection it lends, so this holds there too.
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
    dbapi_connection.commit()


@dataclass(slots=True)
class _Wait:
    """One connection waiting on the server: until when, its own socket (a duplicate descriptor), and
    whether the server was already asked to cancel its statement."""

    connection: Any
    deadline: float
    socket_fd: int
    cancel_requested: bool = False


def _request_cancel(dbapi_connection: Any) -> None:
    """Ask the server (through a pooler too) to cancel the connection's statement; give up quietly."""
    with contextlib.suppress(Exception):  # a silent server will not answer this either: the cut follows
        dbapi_connection.cancel_safe(timeout=CANCEL_TIMEOUT_SECONDS)


class StallWatchdog:
    """Ends a PostgreSQL statement that has waited on the server past its deadline: first it asks the
    server to cancel it, then, if the connection is still waiting a moment later, cuts its socket.

    `statement_timeout` ends slow statements on the server, but a pooler in transaction mode cannot
    carry it, and a server (or a pooler) that stops answering altogether cannot enforce it; without
    this, a worker would wait until TCP gives up, which takes hours. The cancel comes first so that
    a statement the client gave up on (a 503) is not applied later on the server; the cut turns a
    wait on a silent server into an error (a 503) all the same.

    A wait belongs to the thread that started it (a connection runs one statement at a time, in the
    thread that called it), so ending it needs nothing from the error or the driver. It holds a
    duplicate of the connection's socket descriptor: the descriptor number itself may be closed and
    reused by another connection meanwhile, but the duplicate still names the original socket, so a
    cut can only ever reach the connection that was waiting. And it cuts only while libpq reports
    that connection still busy with a query.
    """

    def __init__(self) -> None:
        self._waiting: dict[int, _Wait] = {}  # by thread id
        self._thread_of: dict[int, int] = {}  # id(connection) -> the thread whose wait it is
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, dbapi_connection: Any, seconds: float) -> None:
        """The calling thread's `dbapi_connection` now waits on the server, for `seconds` at the most."""
        wait = _Wait(dbapi_connection, time.monotonic() + seconds, os.dup(dbapi_connection.pgconn.socket))
        thread = threading.get_ident()
        with self._lock:
            replaced = self._waiting.pop(thread, None)
            if replaced is not None:
                self._thread_of.pop(id(replaced.connection), None)
            self._waiting[thread] = wait
            self._thread_of[id(dbapi_connection)] = thread
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="db-stall-watchdog", daemon=True)
                self._thread.start()
        if replaced is not None:
            os.close(replaced.socket_fd)

    def stop(self) -> None:
        """The calling thread's connection has its answer (or its error)."""
        with self._lock:
            wait = self._waiting.pop(threading.get_ident(), None)
            if wait is not None:
                self._thread_of.pop(id(wait.connection), None)
        if wait is not None:
            os.close(wait.socket_fd)

    def forget(self, dbapi_connection: Any) -> None:
        """Stop watching `dbapi_connection`, whichever thread started it (it is back in the pool)."""
        if id(dbapi_connection) not in self._thread_of:  # the usual case: its wait ended with its statement
            return
        with self._lock:
            thread = self._thread_of.pop(id(dbapi_connection), None)
            wait = self._waiting.pop(thread, None) if thread is not None else None
        if wait is not None:
            os.close(wait.socket_fd)

    def armed(self) -> int:
        """How many connections are being watched right now."""
        return len(self._waiting)

    @contextlib.contextmanager
    def watching(self, dbapi_connection: Any, seconds: float) -> Iterator[None]:
        """Watch `dbapi_connection` for the duration of the block."""
        self.start(dbapi_connection, seconds)
        try:
            yield
        finally:
            self.stop()

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._lock:
                overdue = [(thread, wait) for thread, wait in self._waiting.items() if now > wait.deadline]
                for thread, wait in overdue:
                    still_waiting = wait.connection.pgconn.transaction_status == pq.TransactionStatus.ACTIVE
                    if still_waiting and not wait.cancel_requested:
                        logger.warning("cancelling a database statement: no answer before its deadline")
                        wait.cancel_requested = True
                        wait.deadline = now + CANCEL_GRACE_SECONDS
                        threading.Thread(target=_request_cancel, args=(wait.connection,), daemon=True).start()
                        continue
                    del self._waiting[thread]
                    self._thread_of.pop(id(wait.connection), None)
                    with socket.socket(fileno=wait.socket_fd) as stalled:  # closes the duplicate afterwards
                        if still_waiting:
                            logger.warning("cutting a database connection: no answer to the cancel either")
                            with contextlib.suppress(OSError):
                                stalled.shutdown(socket.SHUT_RDWR)


stall_watchdog = StallWatchdog()


def _watch_for_stalls(engine: Engine, statement_deadline: float) -> None:
    """Put every statement of `engine` under the stall watchdog."""

    def before_execute(_conn: Any, cursor: Any, *_args: Any) -> None:
        stall_watchdog.start(cursor.connection, statement_deadline)

    def after_execute(*_args: Any) -> None:
        stall_watchdog.stop()

    def on_error(_context: Any) -> None:
        stall_watchdog.stop()

    def on_checkin(dbapi_connection: Any, _record: Any) -> None:
        stall_watchdog.forget(dbapi_connection)

    event.listen(engine, "before_cursor_execute", before_execute)
    event.listen(engine, "after_cursor_execute", after_execute)
    event.listen(engine, "handle_error", on_error)
    event.listen(engine, "checkin", on_checkin)


def has_unread_input(dbapi_connection: Any) -> bool:
    """True when an idle PostgreSQL connection has something to read, or no socket at all.

    Between statements the server sends nothing, so anything there is its farewell (a terminated
    backend, a restart, a suspended Neon compute) or the end of the stream: the connection is gone.
    """
    if dbapi_connection.closed:
        return True
    poller = select.poll()
    poller.register(dbapi_connection.pgconn.socket, select.POLLIN)
    return bool(poller.poll(0))


def _in_transaction(dbapi_connection: Any) -> bool:
    """Whether a connection is inside a transaction (PostgreSQL's or SQLite's)."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        return dbapi_connection.in_transaction
    return not dbapi_connection.closed and dbapi_connection.pgconn.transaction_status != pq.TransactionStatus.IDLE


def _never_pool_an_open_transaction(engine: Engine) -> None:
    """Roll back a transaction still open on a connection handed back to the pool.

    `transaction()` always ends what it began, so this should never act; but the pool does no reset
    on return (autocommit), and one leaked transaction would hold its locks and hand its uncommitted
    writes to the next request.
    """

    def on_checkin(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is not None and _in_transaction(dbapi_connection):
            logger.warning("a connection came back to the pool inside a transaction: rolling it back")
            with contextlib.suppress(Exception):  # a broken connection is replaced on its next checkout
                dbapi_connection.rollback()

    event.listen(engine, "checkin", on_checkin)


@contextlib.contextmanager
def transaction(session: Session) -> Iterator[Connection]:
    """Run the block's statements on the session's connection as one transaction, committed at its end.

    The engine runs in autocommit, where every statement is its own transaction; a change that takes
    several statements (a write and its idempotency record, a restore and its quota check) says so
    with this. On SQLite the transaction takes the write lock at once (`BEGIN IMMEDIATE`), so two
    writers queue instead of failing. Any error rolls it back, and nothing of it stays.
    """
    connection = session.connection()
    connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.dialect.name == "sqlite" else "BEGIN")
    try:
        yield connection
    except BaseException:
        # A connection that broke has lost its transaction with it (and may not be used again until
        # the session ends): the error it raised is the one to report, never a failed ROLLBACK.
        if not connection.invalidated:
            with contextlib.suppress(sa_exc.DBAPIError):
                connection.exec_driver_sql("ROLLBACK")
        raise
    connection.exec_driver_sql("COMMIT")


def _check_before_use(engine: Engine) -> None:
    """Pre-ping pooled connections, with a round trip only for those idle a while.

    A connection handed back moments ago (the usual case under load) is checked by looking at its
    socket, which costs no round trip; one idle for `PING_AFTER_IDLE_SECONDS` or more gets the
    dialect's ping, a round trip (under the stall watchdog), since a silent network drop leaves
    nothing to read. A dead connection invalidates the whole pool, as `pool_pre_ping` does: after
    a restart or a suspend, the other connections are gone too.
    """
    ping = engine.dialect.do_ping

    def on_checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["returned_at"] = time.monotonic()

    def on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        returned_at = record.info.get("returned_at")
        if returned_at is None:  # a new connection (reconnecting clears `info`)
            return
        if time.monotonic() - returned_at < PING_AFTER_IDLE_SECONDS:
            if has_unread_input(dbapi_connection):
                raise sa_exc.InvalidatePoolError("the server closed the connection")
            return
        try:
            with stall_watchdog.watching(dbapi_connection, CONNECT_TIMEOUT_SECONDS):
                ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise sa_exc.InvalidatePoolError("the connection failed its ping") from error

    event.listen(engine, "checkin", on_checkin)
    event.listen(engine, "checkout", on_checkout)


def create_db_engine(url: URL, statement_timeout_ms: int = STATEMENT_TIMEOUT_MS) -> Engine:
    """One engine for the process, tuned for the backend behind `url`.

    Most requests send one statement, so connections run in autocommit: no BEGIN, COMMIT or
    ROLLBACK round trips, and every statement is its own atomic transaction; `transaction()` groups
    the statements of the few changes that take more than one.
    """
    if url.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
            hide_parameters=True,  # statement parameters are users' text: never in a log or an error
        )
        event.listen(engine, "connect", _configure_sqlite_connection)
        _never_pool_an_open_transaction(engine)
        return engine

    # No server-side prepared statements: psycopg's bookkeeping for them costs more CPU here than
    # they save the server on these small statements, and Neon's pooler (PgBouncer in transaction
    # mode) could not keep them anyway.
    connect_args: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "prepare_threshold": None,
        "options": f"-c statement_timeout={statement_timeout_ms}",  # no statement may pin a worker
    }
    engine = create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        pool_reset_on_return=None,  # autocommit: no transaction is ever left to roll back
        pool_recycle=POOL_RECYCLE_SECONDS,
        pool_size=POOL_SIZE,
        max_overflow=POOL_MAX_OVERFLOW,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        connect_args=connect_args,
        hide_parameters=True,
    )
    _connect_through_poolers(engine)
    event.listen(engine, "connect", _use_utc_session)
    _watch_for_stalls(engine, statement_timeout_ms / 1000 + STALL_MARGIN_SECONDS)
    _check_before_use(engine)
    _never_pool_an_open_transaction(engine)
    return engine


def _connect_through_poolers(engine: Engine) -> None:
    """Connect without startup `options` once the server refuses them, as PgBouncer does (Neon's `-pooler` host).

    Behind such a pooler the per-connection `statement_timeout` cannot be set (a `SET` would stick to
    whichever server connection ran it); the stall watchdog still bounds every wait, and the
    README says how to set the timeout on the database role instead.
    """
    options_refused = False

    def connect(dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        nonlocal options_refused
        if options_refused:
            cparams.pop("options", None)
            return None  # the dialect connects with the parameters as changed here
        try:
            return dialect.connect(*cargs, **cparams)
        except psycopg.OperationalError as error:
            if "unsupported startup parameter" not in str(error):
                raise
        options_refused = True
        logger.warning("the database refuses startup options (a pooler?): connecting without statement_timeout")
        cparams.pop("options", None)
        return None

    event.listen(engine, "do_connect", connect)


@contextlib.contextmanager
def schema_lock(connection: Connection, lock_wait_ms: int = STATEMENT_TIMEOUT_MS) -> Iterator[None]:
    """One transaction that holds the schema lock: whoever migrates first, the others wait, then find nothing to do.

    On PostgreSQL it is an advisory lock that the transaction's own end releases, so it holds
    through a pooler in transaction mode too (a session lock and its unlock could run on different
    server connections there); waiting for it takes at most `lock_wait_ms` (`SET LOCAL`, which a
    pooler keeps within the transaction), and the revisions' own statements get
    `MIGRATION_STATEMENT_TIMEOUT_MS`. On SQLite, `BEGIN IMMEDIATE` takes the database's write lock.
    Both databases change their schema transactionally: a failed migration leaves nothing behind.
    """
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            connection.exec_driver_sql("ROLLBACK")
            raise
        connection.exec_driver_sql("COMMIT")
        return
    connection.execution_options(isolation_level="READ COMMITTED")  # this one connection leaves autocommit
    with connection.begin():
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(lock_wait_ms)}")
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {MIGRATION_STATEMENT_TIMEOUT_MS}")
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        yield


@contextlib.contextmanager
def locked_migration_connection(url: URL, lock_wait_ms: int = STATEMENT_TIMEOUT_MS) -> Iterator[Connection]:
    """A connection of its own to `url`, inside `schema_lock`, for migrating; closed afterwards."""
    engine = create_db_engine(url, MIGRATION_STATEMENT_TIMEOUT_MS)
    try:
        with engine.connect() as connection, schema_lock(connection, lock_wait_ms):
            yield connection
    finally:
        engine.dispose()


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for this repository's migrations, running on `connection` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIRECTORY))
    config.attributes["connection"] = connection
    return config


def migrate(connection: Connection) -> None:
    """Bring the schema on `connection` (inside `schema_lock`) to the newest revision.

    A database made before migrations existed (the tasks table, no revision recorded) is adopted:
    it is recorded at the baseline revision, which describes exactly that schema, then upgraded.
    """
    config = alembic_config(connection)
    if MigrationContext.configure(connection).get_current_revision() is None and inspect(connection).has_table("tasks"):
        logger.info("adopting a database made before migrations: recording it at revision %s", BASELINE_REVISION)
        command.stamp(config, BASELINE_REVISION)
    command.upgrade(config, "head")


def migrate_database(url: URL, lock_wait_ms: int = STATEMENT_TIMEOUT_MS) -> None:
    """Bring the database at `url` to the newest revision; safe when several processes do it at once."""
    with locked_migration_connection(url, lock_wait_ms) as connection:
        migrate(connection)


def database_is_reachable(engine: Engine) -> bool:
    """True when a trivial query succeeds."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:  # any failure here means "not usable", which is all /health reports
        logger.warning("database health check failed", exc_info=logger.isEnabledFor(logging.DEBUG))
        return False
    return True


class DatabaseUnavailableError(Exception):
    """The database cannot serve requests yet: its schema could not be brought up to date (answered 503)."""


class Database:
    """The app's engine, and whether its schema is known to be at the newest revision."""

    def __init__(
        self,
        url: URL,
        statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
        *,
        migration_url: URL | None = None,
        migrate_on_startup: bool = True,
    ) -> None:
        self.engine = create_db_engine(url, statement_timeout_ms)
        self.migration_url = migration_url or url
        self.statement_timeout_ms = statement_timeout_ms
        self.schema_ready = not migrate_on_startup  # otherwise the schema is someone else's job
        self._migrating = threading.Lock()

    def warn_if_schema_is_behind(self) -> None:
        """Log a warning when the schema is not at the newest revision (for MIGRATE_ON_STARTUP=false)."""
        try:
            with self.engine.connect() as connection:
                current = MigrationContext.configure(connection).get_current_revision()
        except sa_exc.SQLAlchemyError:
            return  # unreachable: requests will say so
        newest = ScriptDirectory.from_config(alembic_config()).get_current_head()
        if current != newest:
            logger.warning(
                "the database schema is at revision %s, the service needs %s: run `python -m migrations`",
                current or "none",
                newest,
            )

    def ensure_schema(self) -> None:
        """Migrate once; until that succeeds this raises DatabaseUnavailableError, and is retried.

        One thread tries at a time; requests that arrive meanwhile are answered at once instead of
        parking their threads behind it.
        """
        if self.schema_ready:
            return
        if not self._migrating.acquire(blocking=False):
            raise DatabaseUnavailableError("the schema is being migrated")
        try:
            if not self.schema_ready:
                started = time.perf_counter()
                migrate_database(self.migration_url, lock_wait_ms=self.statement_timeout_ms)
                logger.info("database schema up to date (%.0f ms)", (time.perf_counter() - started) * 1000)
                self.schema_ready = True
        except sa_exc.SQLAlchemyError as error:
            raise DatabaseUnavailableError(f"the schema cannot be migrated: {type(error).__name__}") from error
        finally:
            self._migrating.release()


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session on the app's engine for one request.

    Opening and closing it does no I/O: the session checks a connection out only when the route (in
    its worker thread) runs a statement, and routes end with `commit()`, which hands it back to the
    pool. So this runs on the event loop instead of costing two thread-pool hops per request.
    """
    database: Database = request.app.state.database
    if not database.schema_ready:
        await run_in_threadpool(database.ensure_schema)
    # Routes return what their statement returned: nothing is re-read after a commit.
    session = Session(database.engine, expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()  # a no-op unless the route failed midway (autocommit: nothing to roll back)


SessionDep = Annotated[Session, Depends(get_session)]
