"""PostgreSQL failing under a live service: killed connections, refused and silent connections, stalled
statements. The answer is a 503 at worst, never a 500 and never a hang; the service recovers by itself;
and nothing it acknowledged with a 2xx is lost or changed.

Builds on tests/test_database.py (the database gone, then back). Every test here needs a real
PostgreSQL (TEST_DATABASE_URL); their SQLite runs are deselected.
"""

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

import database
from main import create_app
from tests.conftest import make_settings
from tests.keys import JwksServer
from tests.tcp_proxy import TcpProxy

if TYPE_CHECKING:
    from tests.conftest import LiveServer

pytestmark = pytest.mark.postgresql_only

Auth = Callable[[str], dict[str, str]]
Serve = Callable[[FastAPI], "LiveServer"]

# Generous bounds: a slow machine passes, a hang does not.
PROMPT_ANSWER_SECONDS = 15
RECOVERY_SECONDS = 60
# The app's statement timeout is 15 s; tests that wait on it use 1 s instead.
SHORT_STATEMENT_TIMEOUT_MS = 1000
TASK_PAGE_SIZE = 500


def libpq_url(database_url: str) -> str:
    """The test database's URL as psycopg takes it."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def terminate_backends(database_url: str) -> int:
    """Kill every other connection to the test database, as a failover or an admin would; how many died."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (make_url(database_url).database,),
        ).fetchall()
    return sum(1 for (terminated,) in rows if terminated)


def tasks_url(user_id: str, task_id: int | None = None, suffix: str = "") -> str:
    """The URL of a user's tasks, or of one of them."""
    return f"/api/{user_id}/tasks" + (f"/{task_id}" if task_id is not None else "") + suffix


def stored_tasks(http: httpx.Client, user_id: str, headers: dict[str, str]) -> dict[int, dict[str, Any]]:
    """Every task the service has for the user, by id, read page by page."""
    tasks: dict[int, dict[str, Any]] = {}
    while True:
        params = {"sort": "created", "order": "asc", "limit": TASK_PAGE_SIZE, "offset": len(tasks)}
        response = http.get(tasks_url(user_id), params=params, headers=headers)
        assert response.status_code == 200, response.text
        tasks |= {task["id"]: task for task in response.json()}
        if len(response.json()) < TASK_PAGE_SIZE:
            return tasks


def assert_database_unavailable(response: httpx.Response) -> None:
    """The contract's 503 for a database that cannot be reached."""
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"


def assert_success_or_unavailable(response: httpx.Response) -> None:
    """A 2xx, or the contract's 503 for an unreachable database: never a 500."""
    if response.status_code == 503:
        assert_database_unavailable(response)
    else:
        assert response.is_success, f"{response.request.method} {response.request.url.path}: {response.text}"


def wait_until_healthy(http: httpx.Client) -> None:
    """Poll /health until the service says it is healthy again, by itself."""
    deadline = time.monotonic() + RECOVERY_SECONDS
    while (health := http.get("/health")).status_code != 200:
        assert time.monotonic() < deadline, f"no recovery within {RECOVERY_SECONDS} s: {health.text}"
        time.sleep(0.2)
    assert health.json() == {"status": "healthy", "database": "ok"}


def timed(send: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    """The response to `send()` and how many seconds it took."""
    started = time.monotonic()
    response = send()
    return response, time.monotonic() - started


@dataclass
class TaskLedger:
    """What the service acknowledged, and what it may or may not have applied.

    A 2xx is a promise: the task is stored exactly as returned. A 503 is not a refusal: a statement
    can commit and its backend be killed before the reply goes out, so after a 503 a create may or
    may not exist and a toggle may or may not have flipped. A task's last acknowledged state is
    therefore checked exactly only when no later request on it ended in a 503; after one, only the
    fields that no request here changes are checked, until a later 2xx tells the state again.
    """

    acknowledged: dict[int, dict[str, Any]] = field(default_factory=dict)
    uncertain: set[int] = field(default_factory=set)
    maybe_created: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_create(self, title: str, response: httpx.Response) -> None:
        """Note a create's answer: the task it acknowledged, or a title that may exist."""
        with self.lock:
            if response.status_code == 201:
                self.acknowledged[response.json()["id"]] = response.json()
            elif response.status_code == 503:
                self.maybe_created.add(title)

    def record_change(self, task_id: int, response: httpx.Response) -> None:
        """Note a change's answer: the task's new state, or that its state is now unknown."""
        with self.lock:
            if response.status_code == 200:
                self.acknowledged[task_id] = response.json()
                self.uncertain.discard(task_id)
            elif response.status_code == 503:
                self.uncertain.add(task_id)

    def assert_stored(self, stored: dict[int, dict[str, Any]]) -> None:
        """Every acknowledged task is stored as acknowledged; any other task is one a 503 left in doubt."""
        assert self.acknowledged.keys() <= stored.keys(), "acknowledged tasks were lost"
        for task_id, expected in self.acknowledged.items():
            if task_id in self.uncertain:
                unchanged = expected.keys() - {"completed", "updated_at"}
                assert {k: stored[task_id][k] for k in unchanged} == {k: expected[k] for k in unchanged}
            else:
                assert stored[task_id] == expected
        extra_titles = [stored[task_id]["title"] for task_id in stored.keys() - self.acknowledged.keys()]
        assert len(set(extra_titles)) == len(extra_titles)
        assert set(extra_titles) <= self.maybe_created


class SilentListener:
    """Accepts TCP connections on a port and never says a word: a database host that hangs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._listener = socket.socket()
        self._accepted: list[socket.socket] = []

    def __enter__(self) -> "SilentListener":
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):  # shutdown wakes the thread blocked in accept()
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for connection in self._accepted:
            connection.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self._accepted.append(self._listener.accept()[0])


def proxied(database_url: str, proxy: TcpProxy) -> str:
    """The database URL, reached through `proxy` (started here)."""
    proxy.start()
    return make_url(database_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def impatient_app(database_url: str, jwks_server: JwksServer) -> FastAPI:
    """The app, with statements that give up after 1 s instead of the default 15 s."""
    settings = make_settings(database_url, jwks_server)
    app = create_app(settings)
    app.state.database = database.Database(settings.database, statement_timeout_ms=SHORT_STATEMENT_TIMEOUT_MS)
    return app


@contextlib.contextmanager
def serving(serve: Serve, app: FastAPI) -> Iterator["LiveServer"]:
    """Serve `app`; afterwards close its engine's connections (the lifespan closes only the engine
    create_app built, not one a test put in its place)."""
    try:
        with serve(app) as live:
            yield live
    finally:
        app.state.database.engine.dispose()


@pytest.fixture
def service(database_url: str, jwks_server: JwksServer, serve: Serve) -> Iterator["LiveServer"]:
    """A service of its own on this run's PostgreSQL database."""
    with serve(create_app(make_settings(database_url, jwks_server))) as live:
        yield live


@pytest.fixture
def proxied_service(
    database_url: str, jwks_server: JwksServer, serve: Serve
) -> Iterator[tuple["LiveServer", TcpProxy]]:
    """A service that reaches PostgreSQL through a proxy the test can cut."""
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        with serve(create_app(make_settings(proxied(database_url, proxy), jwks_server))) as live:
            yield live, proxy
    finally:
        proxy.stop()


# --- Pooled connections checked before use -----------------------------------------------------------


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The service's engine on the test database."""
    engine = database.create_db_engine(make_url(database_url).set(drivername="postgresql+psycopg"))
    yield engine
    engine.dispose()


def backend_pid(engine: Engine) -> int:
    """The server process behind the pool's connection (used one at a time, the pool keeps just one)."""
    with engine.connect() as connection:
        return connection.execute(text("SELECT pg_backend_pid()")).scalar_one()


def last_statement(database_url: str, pid: int) -> str | None:
    """What the backend `pid` ran last, as the server reports it; None once the backend is gone."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as admin:
        row = admin.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row[0] if row else None


def test_a_connection_back_from_use_moments_ago_is_checked_without_a_round_trip(
    engine: Engine, database_url: str
) -> None:
    pid = backend_pid(engine)
    with engine.connect():
        assert last_statement(database_url, pid) == "SELECT pg_backend_pid()"


def test_a_connection_idle_a_while_is_pinged_before_use(
    engine: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = backend_pid(engine)
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0)
    with engine.connect():
        assert last_statement(database_url, pid) != "SELECT pg_backend_pid()"  # the ping came after it


def test_a_pooled_connection_whose_server_went_away_is_replaced_before_use(engine: Engine, database_url: str) -> None:
    pid = backend_pid(engine)
    assert terminate_backends(database_url) >= 1
    deadline = time.monotonic() + PROMPT_ANSWER_SECONDS
    while last_statement(database_url, pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # the backend says goodbye on the socket before it exits
    assert backend_pid(engine) != pid  # no error: the dead connection never reached a statement


def test_an_idle_connection_that_fails_its_ping_is_replaced_before_use(
    engine: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = backend_pid(engine)
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0)
    assert terminate_backends(database_url) >= 1
    deadline = time.monotonic() + PROMPT_ANSWER_SECONDS
    while last_statement(database_url, pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend_pid(engine) != pid  # the failed ping cost a reconnect, not an error


# --- Connections killed under the service -----------------------------------------------------------

KILL_ROUNDS = 3
REQUESTS_AFTER_A_KILL = 9
# The pool replaces a dead pooled connection before use; only a request already on its way
# when the backend died may fail, so the service must be fine again after the first couple.
REQUESTS_ALLOWED_TO_FAIL_AFTER_A_KILL = 2


def test_killed_connections_are_503_at_worst_and_the_service_recovers_at_once(
    service: "LiveServer", database_url: str, auth: Auth, user_id: str
) -> None:
    headers = auth(user_id)
    ledger = TaskLedger()
    with httpx.Client(base_url=service.url, timeout=30) as http:
        for number in range(5):
            title = f"Before the kill {number}"
            ledger.record_create(title, http.post(tasks_url(user_id), json={"title": title}, headers=headers))
        first_id = min(ledger.acknowledged)
        ledger.record_change(first_id, http.patch(tasks_url(user_id, first_id, "/complete"), headers=headers))
        assert len(ledger.acknowledged) == 5 and not ledger.uncertain and not ledger.maybe_created

        for kill in range(KILL_ROUNDS):
            assert terminate_backends(database_url) > 0  # the service's pooled connections, at least
            answers = []
            for step in range(REQUESTS_AFTER_A_KILL):
                if step % 3 == 0:
                    answer = http.get(tasks_url(user_id), headers=headers)
                elif step % 3 == 1:
                    answer = http.get(tasks_url(user_id, first_id), headers=headers)
                else:
                    title = f"After kill {kill} step {step}"
                    answer = http.post(tasks_url(user_id), json={"title": title}, headers=headers)
                    ledger.record_create(title, answer)
                assert_success_or_unavailable(answer)
                answers.append(answer)
            statuses = [answer.status_code for answer in answers]
            assert all(200 <= status < 300 for status in statuses[REQUESTS_ALLOWED_TO_FAIL_AFTER_A_KILL:]), statuses

        ledger.assert_stored(stored_tasks(http, user_id, headers))


KILLS_DURING_WRITES = 5
SECONDS_BETWEEN_KILLS = 0.3
WRITER_THREADS = 4
MAX_WRITES_PER_WRITER = 300
WRITES_AFTER_THE_LAST_KILL = 10


def test_backends_killed_during_concurrent_writes_lose_no_acknowledged_write(
    service: "LiveServer", database_url: str, auth: Auth, user_id: str
) -> None:
    headers = auth(user_id)
    ledger = TaskLedger()
    writers_ready = threading.Barrier(WRITER_THREADS + 1)
    kills_done = threading.Event()

    def write(writer: int) -> list[httpx.Response]:
        """Create and toggle this writer's own tasks until a few writes after the last kill."""
        own: list[int] = []
        answers: list[httpx.Response] = []
        with httpx.Client(base_url=service.url, timeout=30) as http:
            writers_ready.wait(timeout=30)
            writes_after_kills = 0
            for step in range(MAX_WRITES_PER_WRITER):
                if kills_done.is_set():
                    writes_after_kills += 1
                    if writes_after_kills > WRITES_AFTER_THE_LAST_KILL:
                        break
                if not own or step % 3 == 0:
                    title = f"Writer {writer} step {step}"
                    answer = http.post(tasks_url(user_id), json={"title": title}, headers=headers)
                    ledger.record_create(title, answer)
                    if answer.status_code == 201:
                        own.append(answer.json()["id"])
                else:
                    task_id = own[(step * 7) % len(own)]
                    answer = http.patch(tasks_url(user_id, task_id, "/complete"), headers=headers)
                    ledger.record_change(task_id, answer)
                answers.append(answer)
        return answers

    killed = []
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as pool:
        writers = [pool.submit(write, writer) for writer in range(WRITER_THREADS)]
        try:
            writers_ready.wait(timeout=30)
            for _ in range(KILLS_DURING_WRITES):
                time.sleep(SECONDS_BETWEEN_KILLS)
                killed.append(terminate_backends(database_url))
        finally:
            kills_done.set()
        answers_by_writer = [writer.result() for writer in writers]

    assert sum(killed) > 0
    for answers in answers_by_writer:
        for answer in answers:
            assert_success_or_unavailable(answer)
        assert all(answer.is_success for answer in answers[-WRITES_AFTER_THE_LAST_KILL // 2 :])  # recovered
    with httpx.Client(base_url=service.url, timeout=30) as http:
        ledger.assert_stored(stored_tasks(http, user_id, headers))


# --- The database refusing connections, or accepting and never answering ---------------------------


def test_refused_connections_are_prompt_503s_and_the_service_recovers_by_itself(
    proxied_service: tuple["LiveServer", TcpProxy], auth: Auth, user_id: str
) -> None:
    live, proxy = proxied_service
    headers = auth(user_id)
    ledger = TaskLedger()
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for number in range(3):
            title = f"Kept {number}"
            ledger.record_create(title, http.post(tasks_url(user_id), json={"title": title}, headers=headers))
        task_id = min(ledger.acknowledged)
        ledger.record_change(task_id, http.patch(tasks_url(user_id, task_id, "/complete"), headers=headers))
        acknowledged = stored_tasks(http, user_id, headers)
        assert len(acknowledged) == 3

        proxy.stop()
        attempts: list[Callable[[], httpx.Response]] = [
            lambda: http.get(tasks_url(user_id), headers=headers),
            lambda: http.get(tasks_url(user_id, task_id), headers=headers),
            lambda: http.post(tasks_url(user_id), json={"title": "While down"}, headers=headers),
            lambda: http.patch(tasks_url(user_id, task_id, "/complete"), headers=headers),
            lambda: http.put(tasks_url(user_id, task_id), json={"title": "Renamed while down"}, headers=headers),
            lambda: http.delete(tasks_url(user_id, task_id), headers=headers),
        ]
        for attempt in attempts:
            response, seconds = timed(attempt)
            assert_database_unavailable(response)
            assert seconds < PROMPT_ANSWER_SECONDS
        health, seconds = timed(lambda: http.get("/health"))
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert seconds < PROMPT_ANSWER_SECONDS

        proxy.start()
        wait_until_healthy(http)
        # Refused connections reach no database: nothing tried while down was applied, nothing acknowledged lost.
        assert stored_tasks(http, user_id, headers) == acknowledged
        assert http.post(tasks_url(user_id), json={"title": "After"}, headers=headers).status_code == 201


def test_database_that_accepts_but_never_answers_is_503_within_the_connect_timeout(
    proxied_service: tuple["LiveServer", TcpProxy], auth: Auth, user_id: str
) -> None:
    live, proxy = proxied_service
    headers = auth(user_id)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        task = http.post(tasks_url(user_id), json={"title": "Kept"}, headers=headers).json()
    attempts: list[Callable[[httpx.Client], httpx.Response]] = [
        lambda http: http.get(tasks_url(user_id), headers=headers),
        lambda http: http.post(tasks_url(user_id), json={"title": "Into the void"}, headers=headers),
        lambda http: http.patch(tasks_url(user_id, task["id"], "/complete"), headers=headers),
        lambda http: http.get("/health"),
    ]

    def attempt(send: Callable[[httpx.Client], httpx.Response]) -> tuple[httpx.Response, float]:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            return timed(lambda: send(http))

    proxy.stop()
    with SilentListener(proxy.port), ThreadPoolExecutor(max_workers=len(attempts)) as pool:
        results = list(pool.map(attempt, attempts))
    for response, seconds in results:
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "database_unavailable"
        assert seconds < PROMPT_ANSWER_SECONDS
    assert results[-1][0].json()["status"] == "unhealthy"

    proxy.start()
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wait_until_healthy(http)
        assert list(stored_tasks(http, user_id, headers).values()) == [task]


# --- Statements that run too long -------------------------------------------------------------------


def test_statement_stuck_behind_a_lock_ends_in_503_and_frees_the_worker(
    database_url: str,
    jwks_server: JwksServer,
    serve: Serve,
    auth: Auth,
    user_id: str,
) -> None:
    headers = auth(user_id)
    with (
        serving(serve, impatient_app(database_url, jwks_server)) as live,
        httpx.Client(base_url=live.url, timeout=30) as http,
    ):
        task = http.post(tasks_url(user_id), json={"title": "Kept"}, headers=headers).json()
        attempts: list[Callable[[], httpx.Response]] = [
            lambda: http.get(tasks_url(user_id), headers=headers),
            lambda: http.get(tasks_url(user_id, task["id"]), headers=headers),
            lambda: http.post(tasks_url(user_id), json={"title": "Blocked"}, headers=headers),
            lambda: http.patch(tasks_url(user_id, task["id"], "/complete"), headers=headers),
        ]
        with psycopg.connect(libpq_url(database_url)) as locker:  # the lock lasts until this transaction ends
            locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            for attempt in attempts:
                response, seconds = timed(attempt)
                assert_database_unavailable(response)
                assert seconds < PROMPT_ANSWER_SECONDS
            with psycopg.connect(libpq_url(database_url), autocommit=True) as observer:
                waiting = observer.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                    (make_url(database_url).database,),
                ).fetchone()
            assert waiting == (0,)  # the timed-out statements were cancelled, not left queued on the lock
            assert http.get("/health").status_code == 200  # and the service still answers meanwhile
            locker.rollback()

        assert list(stored_tasks(http, user_id, headers).values()) == [task]  # timed-out writes were not applied
        toggled = http.patch(tasks_url(user_id, task["id"], "/complete"), headers=headers)
        assert toggled.status_code == 200 and toggled.json()["completed"] is not task["completed"]


@pytest.fixture
def stalling_proxy(database_url: str) -> Iterator[TcpProxy]:
    """A proxy in front of this run's PostgreSQL that the test can make go silent."""
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    yield proxy
    proxy.stop()


def test_database_that_stops_answering_on_open_connections_is_503_not_a_hang(
    database_url: str,
    stalling_proxy: TcpProxy,
    jwks_server: JwksServer,
    serve: Serve,
    auth: Auth,
    user_id: str,
) -> None:
    # The statement timeout is the database's own: a host that stops answering never enforces it,
    # so only a limit on the app's side can turn this into a 503.
    headers = auth(user_id)
    app = impatient_app(proxied(database_url, stalling_proxy), jwks_server)
    with serving(serve, app) as live, httpx.Client(base_url=live.url, timeout=PROMPT_ANSWER_SECONDS) as http:
        try:
            assert http.post(tasks_url(user_id), json={"title": "Kept"}, headers=headers).status_code == 201
            stalling_proxy.stalled.set()  # the pooled connection stays open; nothing comes back on it
            try:
                response = http.get(tasks_url(user_id), headers=headers)
            except httpx.TimeoutException:
                pytest.fail(f"no answer within {PROMPT_ANSWER_SECONDS} s: the worker hangs on a silent connection")
            assert_database_unavailable(response)
        finally:
            stalling_proxy.stop()  # before the server stops: frees a worker still waiting on the stalled connection
