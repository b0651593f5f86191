"""Shared fixtures: a fresh database per run (SQLite always, PostgreSQL when TEST_DATABASE_URL is set),
the real app served by uvicorn over real HTTP, and real signed tokens."""

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import psycopg
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

# The app module reads the environment when imported: give it a harmless one first.
for variable in (
    "DATABASE_URL",
    "NEON_DATABASE_URL",
    "BETTER_AUTH_SECRET",
    "BETTER_AUTH_URL",
    "JWKS_URL",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "CORS_ORIGINS",
    "FRONTEND_URL",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "MIGRATE_ON_STARTUP",
    "DATABASE_MIGRATION_URL",
    "METRICS_ENABLED",
    "MAX_TASKS_PER_USER",
    "TRASH_RETENTION_DAYS",
    "IDEMPOTENCY_TTL_SECONDS",
    "HOUSEKEEPING_INTERVAL_SECONDS",
    "PROMETHEUS_MULTIPROC_DIR",
):
    os.environ.pop(variable, None)
os.environ["DATABASE_URL"] = "sqlite:///:memory:"

from main import create_app  # noqa: E402
from settings import Settings  # noqa: E402
from tests.keys import JwksServer, SigningKeyPair, better_auth_claims, new_key_pair  # noqa: E402

SECRET = "test-secret-that-is-long-enough-0123456789"
FRONTEND_ORIGIN = "http://localhost:3000"
DATABASES = ["sqlite"] + (["postgresql"] if os.environ.get("TEST_DATABASE_URL") else [])
# An unusual, non-whole-hour zone: PostgreSQL sessions answer in it, and the API must still say UTC.
POSTGRES_SESSION_TIMEZONE = "America/St_Johns"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql_only: runs only on the PostgreSQL database parameter")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out, rather than skip, the SQLite runs of tests that are about PostgreSQL alone."""
    kept, left_out = [], []
    for item in items:
        on_sqlite = getattr(item, "callspec", None) and item.callspec.params.get("database_url") == "sqlite"
        (left_out if on_sqlite and item.get_closest_marker("postgresql_only") else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_admin_url() -> str:
    """TEST_DATABASE_URL as psycopg takes it (a plain libpq URL)."""
    url = make_url(os.environ["TEST_DATABASE_URL"]).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session", params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, empty database for this run, removed afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'todo.db'}"
        return
    name = f"todo_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_url(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        admin.execute(f"ALTER DATABASE \"{name}\" SET timezone TO '{POSTGRES_SESSION_TIMEZONE}'")
    try:
        yield make_url(os.environ["TEST_DATABASE_URL"]).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(postgres_admin_url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def jwks_server() -> Iterator[JwksServer]:
    """A real JWKS endpoint standing in for Better Auth's, publishing one key per algorithm."""
    server = JwksServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def better_auth_keys(jwks_server: JwksServer) -> dict[str, SigningKeyPair]:
    """One published signing key for each algorithm Better Auth can use."""
    return {alg: jwks_server.add(new_key_pair(alg)) for alg in ("EdDSA", "ES256", "ES512", "RS256", "PS256")}


def make_settings(database_url: str, jwks_server: JwksServer, **overrides: Any) -> Settings:
    """Settings for a test app; only what is passed counts, never the environment or a `.env` file."""
    values: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "better_auth_secret": SECRET,
        "better_auth_url": jwks_server.base_url,
        "cors_origins": FRONTEND_ORIGIN,
        "log_level": "info",
        # Housekeeping's rounds would add statements to tests that count them: tests run rounds themselves.
        "housekeeping_interval_seconds": 86_400,
    } | overrides
    return Settings(_env_file=None, **values)


class LiveServer:
    """An app served by uvicorn on a real socket in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def serve() -> Callable[[FastAPI], LiveServer]:
    """Serve another app (own settings) over real HTTP: use as a context manager."""
    return LiveServer


@pytest.fixture(scope="session")
def settings(database_url: str, jwks_server: JwksServer, better_auth_keys: dict[str, SigningKeyPair]) -> Settings:
    """The settings of the main test app: HS256 enabled, Better Auth keys from the local JWKS server."""
    return make_settings(database_url, jwks_server)


@pytest.fixture(scope="session")
def server(settings: Settings) -> Iterator[LiveServer]:
    """The app under test, served over real HTTP for the whole run on this database."""
    with LiveServer(create_app(settings)) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    """An HTTP client for the app under test."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


@pytest.fixture
def test_client(settings: Settings) -> Iterator[TestClient]:
    """FastAPI's `TestClient` on a fresh app for this run's database: in-process, no socket, lifespan included.

    The way a project that embeds this service writes its own tests; see the README.
    """
    with TestClient(create_app(settings)) as in_process:
        yield in_process


@pytest.fixture
def token_for() -> Callable[..., str]:
    """`token_for(user_id, **claims)`: an HS256 token signed with the test secret, valid for an hour."""

    def sign(user_id: str | None, secret: str = SECRET, **claims: Any) -> str:
        now = int(time.time())
        payload = ({"sub": user_id} if user_id is not None else {}) | {"iat": now, "exp": now + 3600} | claims
        return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256")

    return sign


@pytest.fixture
def auth(token_for: Callable[..., str]) -> Callable[[str], dict[str, str]]:
    """`auth(user_id)`: the Authorization header of a valid token for that user."""
    return lambda user_id: {"Authorization": f"Bearer {token_for(user_id)}"}


@pytest.fixture
def jwks_token_for(jwks_server: JwksServer, better_auth_keys: dict[str, SigningKeyPair]) -> Callable[..., str]:
    """`jwks_token_for(user_id, alg="EdDSA", **claims)`: a token signed like Better Auth's JWT plugin."""

    def sign(user_id: str, alg: str = "EdDSA", **claims: Any) -> str:
        return better_auth_keys[alg].sign(better_auth_claims(user_id, jwks_server.base_url) | claims)

    return sign


@pytest.fixture
def user_id() -> str:
    """A user no other test uses, so tests need no clean-up between them."""
    return f"user-{uuid.uuid4().hex}"


@pytest.fixture
def other_user_id() -> str:
    """A second user, for tests of who may see what."""
    return f"other-{uuid.uuid4().hex}"


@pytest.fixture
def make_task(client: httpx.Client, auth: Callable[[str], dict[str, str]]) -> Callable[..., dict[str, Any]]:
    """`make_task(user_id, title=..., **fields)`: create a task through the API and return its JSON."""

    def create(owner: str, title: str = "A task", **fields: Any) -> dict[str, Any]:
        response = client.post(f"/api/{owner}/tasks", json={"title": title, **fields}, headers=auth(owner))
        assert response.status_code == 201, response.text
        return response.json()

    return create


@pytest.fixture
def database_kind(database_url: str) -> str:
    """`sqlite` or `postgresql`: the database this test runs on."""
    return make_url(database_url).get_backend_name()


# --- PgBouncer in transaction mode (Neon's `-pooler` host): tests/pgbouncer.py, tests/test_pooler.py ---

from tests.pgbouncer import PgBouncer, in_ci, pgbouncer_missing  # noqa: E402  (this block is kept apart)


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[PgBouncer]:
    """A real PgBouncer in transaction mode in front of TEST_DATABASE_URL's server, for the whole run.

    Without the binary this skips, except in CI (the CI variable set): there it fails, since CI must run it.
    """
    if "TEST_DATABASE_URL" not in os.environ:
        pytest.skip("PgBouncer needs a PostgreSQL server: set TEST_DATABASE_URL")
    if missing := pgbouncer_missing():
        if in_ci():
            pytest.fail(f"{missing}, and CI is set: the pooler tests must run in CI", pytrace=False)
        pytest.skip(f"{missing} (set CI=1 to make this a failure)")
    with PgBouncer(os.environ["TEST_DATABASE_URL"], free_port()) as running:
        yield running


@pytest.fixture(scope="session")
def pgbouncer_url(database_url: str, pgbouncer: PgBouncer) -> str:
    """This run's PostgreSQL test database, reached through PgBouncer (PostgreSQL parameter only)."""
    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.fail("pgbouncer_url is for PostgreSQL only: mark the test postgresql_only", pytrace=False)
    return pgbouncer.url(make_url(database_url).database or "")
