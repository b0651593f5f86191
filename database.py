"""The database engine, the per-request session, and table creation."""

import contextlib
import logging
import os
import select
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel import Session, SQLModel

import models  # noqa: F401  (registers the tables on SQLModel.metadata)

logger = logging.getLogger("todo.database")

CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_MS = 15_000
# How long past the statement timeout a silent server is waited for before its connection is cut.
STALL_MARGIN_SECONDS = 5
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
# Any 64-bit key, the same in every worker: serialises table creation between workers.
SCHEMA_LOCK_KEY = 7_105_300_117


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


class StallWatchdog:
    """Cuts a PostgreSQL connection that has waited on the server past its deadline.

    `statement_timeout` ends slow statements on the server, but a server (or a pooler in front of
    it) that stops answering altogether cannot enforce it; without this, a worker would wait until
    TCP gives up, which takes hours. Cutting the socket turns the wait into an error (a 503).
    """

    def __init__(self) -> None:
        self._waiting: dict[int, tuple[float, int]] = {}  # id(connection) -> (deadline, socket)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, dbapi_connection: Any, seconds: float) -> None:
        """`dbapi_connection` now waits on the server, for `seconds` at the most."""
        with self._lock:
            self._waiting[id(dbapi_connection)] = (time.monotonic() + seconds, dbapi_connection.pgconn.socket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="db-stall-watchdog", daemon=True)
                self._thread.start()

    def stop(self, dbapi_connection: Any) -> None:
        """`dbapi_connection` has its answer (or its error)."""
        with self._lock:
            self._waiting.pop(id(dbapi_connection), None)

    @contextlib.contextmanager
    def watching(self, dbapi_connection: Any, seconds: float) -> Iterator[None]:
        """Watch `dbapi_connection` for the duration of the block."""
        self.start(dbapi_connection, seconds)
        try:
            yield
        finally:
            self.stop(dbapi_connection)

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._lock:
                for key, (deadline, fd) in list(self._waiting.items()):
                    if now > deadline:
                        del self._waiting[key]
                        logger.warning("cutting a database connection: no answer before its deadline")
                        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as stalled:
                            stalled.shutdown(socket.SHUT_RDWR)


stall_watchdog = StallWatchdog()


def _watch_for_stalls(engine: Engine, statement_deadline: float) -> None:
    """Put every statement of `engine` under the stall watchdog."""

    def before_execute(_conn: Any, cursor: Any, *_args: Any) -> None:
        stall_watchdog.start(cursor.connection, statement_deadline)

    def after_execute(_conn: Any, cursor: Any, *_args: Any) -> None:
        stall_watchdog.stop(cursor.connection)

    def on_error(context: Any) -> None:
        cursor = getattr(context, "cursor", None)  # unset for errors outside a statement
        if cursor is not None:
            stall_watchdog.stop(cursor.connection)

    event.listen(engine, "before_cursor_execute", before_execute)
    event.listen(engine, "after_cursor_execute", after_execute)
    event.listen(engine, "handle_error", on_error)


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

    Every route sends one statement, so connections run in autocommit: no BEGIN, COMMIT or
    ROLLBACK round trips, and every statement is its own atomic transaction.
    """
    if url.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        )
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine

    # No server-side prepared statements: psycopg's bookkeeping for them costs more CPU here than
    # they save the server on these small statements, and Neon's pooler (PgBouncer in transaction
    # mode) could not keep them anyway.
    connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, "prepare_threshold": None}
    if "-pooler" not in (url.host or ""):
        # The pooler cannot pass startup options on; elsewhere, no statement may pin a worker.
        connect_args["options"] = f"-c statement_timeout={statement_timeout_ms}"
    engine = create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        pool_reset_on_return=None,  # autocommit: no transaction is ever left to roll back
        pool_recycle=POOL_RECYCLE_SECONDS,
        pool_size=POOL_SIZE,
        max_overflow=POOL_MAX_OVERFLOW,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        connect_args=connect_args,
    )
    event.listen(engine, "connect", _use_utc_session)
    _watch_for_stalls(engine, statement_timeout_ms / 1000 + STALL_MARGIN_SECONDS)
    _check_before_use(engine)
    return engine


def create_tables(engine: Engine) -> None:
    """Create missing tables and indexes; safe when several workers start at once."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        try:
            SQLModel.metadata.create_all(connection)
        finally:
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})


def database_is_reachable(engine: Engine) -> bool:
    """True when a trivial query succeeds."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:  # any failure here means "not usable", which is all /health reports
        logger.warning("database health check failed", exc_info=logger.isEnabledFor(logging.DEBUG))
        return False
    return True


class Database:
    """The app's engine, and whether its tables are known to exist yet."""

    def __init__(self, url: URL, statement_timeout_ms: int = STATEMENT_TIMEOUT_MS) -> None:
        self.engine = create_db_engine(url, statement_timeout_ms)
        self.tables_ready = False

    def ensure_tables(self) -> None:
        """Create the tables once; until the database is reachable this raises, and is retried."""
        if not self.tables_ready:
            create_tables(self.engine)
            self.tables_ready = True


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session on the app's engine for one request.

    Opening and closing it does no I/O: the session checks a connection out only when the route (in
    its worker thread) runs a statement, and routes end with `commit()`, which hands it back to the
    pool. So this runs on the event loop instead of costing two thread-pool hops per request.
    """
    database: Database = request.app.state.database
    if not database.tables_ready:
        await run_in_threadpool(database.ensure_tables)
    # Routes return what their statement returned: nothing is re-read after a commit.
    session = Session(database.engine, expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()  # a no-op unless the route failed midway (autocommit: nothing to roll back)


SessionDep = Annotated[Session, Depends(get_session)]
