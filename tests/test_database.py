"""The database going away is a 503, the service recovers by itself, and time is always UTC."""

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from main import create_app
from tests.conftest import free_port, make_settings
from tests.keys import JwksServer
from tests.tcp_proxy import TcpProxy


def wait_for_status(http: httpx.Client, path: str, status: int, headers: dict | None = None) -> httpx.Response:
    """Poll `path` until it answers `status` (generous deadline: the machine may be slow)."""
    deadline = time.monotonic() + 60
    while True:
        response = http.get(path, headers=headers)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def assert_database_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"


@pytest.fixture
def unreachable_database_url(database_kind: str, tmp_path: Path) -> str:
    """A URL of this run's kind of database where no database can be reached."""
    if database_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'missing-dir' / 'todo.db'}"
    return f"postgresql://postgres@127.0.0.1:{free_port()}/todo"


def test_unreachable_database_is_503_and_health_unhealthy(
    unreachable_database_url: str, jwks_server: JwksServer, serve: Callable, auth: Callable, user_id: str
) -> None:
    app = create_app(make_settings(unreachable_database_url, jwks_server))
    with serve(app) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json() | {"detail": "", "code": ""} == {
            "status": "unhealthy",
            "database": "unreachable",
            "detail": "",
            "code": "",
        }
        assert_database_unavailable(http.get(f"/api/{user_id}/tasks", headers=auth(user_id)))
        assert_database_unavailable(http.post(f"/api/{user_id}/tasks", json={"title": "t"}, headers=auth(user_id)))
        assert http.get("/").status_code == 200  # the service itself stays up


def test_sqlite_service_recovers_when_the_file_can_be_opened(
    tmp_path: Path, jwks_server: JwksServer, serve: Callable, auth: Callable, user_id: str
) -> None:
    folder = tmp_path / "data"
    app = create_app(make_settings(f"sqlite:///{folder / 'todo.db'}", jwks_server))
    with serve(app) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        assert http.get("/health").status_code == 503
        folder.mkdir()
        assert wait_for_status(http, "/health", 200).json() == {"status": "healthy", "database": "ok"}
        created = http.post(f"/api/{user_id}/tasks", json={"title": "after"}, headers=auth(user_id))
        assert created.status_code == 201, created.text


@pytest.fixture
def postgres_behind_proxy(database_url: str) -> Iterator[tuple[str, TcpProxy]]:
    """This run's PostgreSQL database, reached through a proxy the test can cut."""
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy
    proxy.stop()


@pytest.mark.postgresql_only
def test_postgres_going_away_is_503_and_the_service_recovers(
    postgres_behind_proxy: tuple[str, TcpProxy], jwks_server: JwksServer, serve: Callable, auth: Callable, user_id: str
) -> None:
    proxied_url, proxy = postgres_behind_proxy
    headers = auth(user_id)
    with serve(create_app(make_settings(proxied_url, jwks_server))) as live, httpx.Client(base_url=live.url) as http:
        task = http.post(f"/api/{user_id}/tasks", json={"title": "kept"}, headers=headers).json()

        proxy.stop()
        assert_database_unavailable(http.get(f"/api/{user_id}/tasks", headers=headers))
        assert http.get("/health").json()["status"] == "unhealthy"

        proxy.start()
        assert wait_for_status(http, "/health", 200).json()["status"] == "healthy"
        listed = http.get(f"/api/{user_id}/tasks", headers=headers)
        assert listed.status_code == 200
        assert listed.json() == [task]


def test_timestamps_come_back_in_utc_with_an_offset(client: httpx.Client, make_task: Callable, user_id: str) -> None:
    task = make_task(user_id, due_date="2026-12-01T12:00:00-03:30")
    assert task["due_date"] in {"2026-12-01T15:30:00Z", "2026-12-01T15:30:00+00:00"}
    for field in ("due_date", "created_at", "updated_at"):
        parsed = datetime.fromisoformat(task[field].replace("Z", "+00:00"))
        assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    created = datetime.fromisoformat(task["created_at"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - created).total_seconds()) < 3600


def test_stored_timestamps_read_back_identically(
    client: httpx.Client, make_task: Callable, auth: Callable, user_id: str
) -> None:
    task = make_task(user_id, due_date="2027-03-28T01:30:00.123456")
    again = client.get(f"/api/{user_id}/tasks/{task['id']}", headers=auth(user_id)).json()
    assert again == task
    assert again["due_date"].startswith("2027-03-28T01:30:00.123456")
