"""Schema migrations: a new database is migrated on start-up, a database made by the first release (its
`create_all`, no history) is adopted with every task intact, every revision downgrades, and the models
and the newest revision agree. On SQLite and PostgreSQL."""

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import jwt
import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, insert, inspect, select, text
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

import database
from main import create_app
from tests.conftest import SECRET, free_port, make_settings, postgres_admin_url
from tests.keys import JwksServer
from tests.v1_schema import v1_metadata, v1_tasks

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tests.conftest import LiveServer

Serve = Callable[["FastAPI"], "LiveServer"]
REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ScriptDirectory.from_config(database.alembic_config())
HEAD = SCRIPTS.get_current_head()
REVISIONS = [script.revision for script in reversed(list(SCRIPTS.walk_revisions()))]  # oldest first
V1_INDEXES = {"ix_tasks_user_created", "ix_tasks_user_updated", "ix_tasks_user_title", "ix_tasks_user_due"}
# Each index as the database itself describes it; SQLite's reflection skips expression indexes, so ask it directly.
INDEX_DEFINITIONS = {
    "sqlite": "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tasks' AND sql IS NOT NULL",
    "postgresql": "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'tasks' AND indexname LIKE 'ix_%'",
}


@pytest.fixture
def new_database_url(database_kind: str, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """`new_database_url()`: a database of this run's kind with nothing in it, dropped after the test."""
    made: list[str] = []

    def make() -> str:
        name = f"todo_migrations_{uuid.uuid4().hex[:12]}"
        if database_kind == "sqlite":
            return f"sqlite:///{tmp_path / name}.db"
        with psycopg.connect(postgres_admin_url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        url = make_url(postgres_admin_url()).set(drivername="postgresql+psycopg", database=name)
        return url.render_as_string(hide_password=False)

    yield make
    if made:
        with psycopg.connect(postgres_admin_url(), autocommit=True) as admin:
            for name in made:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_database_url(new_database_url: Callable[[], str]) -> str:
    """A database of this run's kind with nothing in it, for this test alone."""
    return new_database_url()


@pytest.fixture
def engine(empty_database_url: str) -> Iterator[Engine]:
    """A plain engine on the empty database, for building and inspecting it from outside the service."""
    engine = create_engine(empty_database_url)
    yield engine
    engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is recorded at."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def v1_rows(count: int) -> list[dict[str, Any]]:
    """Tasks as the first release stored them: every kind of value, for two users."""
    base = datetime(2026, 11, 1, 9, 30, 12, 123456, tzinfo=UTC)
    return [
        {
            "user_id": "alice" if n % 3 else "用户 b?",
            "title": f"Task {n} «ünïcode» '; DROP TABLE tasks; --",
            "description": None if n % 2 else f"description {n}\nwith a second line",
            "completed": n % 4 == 0,
            "due_date": None if n % 5 == 0 else base + timedelta(days=n, minutes=n),
            "created_at": base + timedelta(seconds=n),
            "updated_at": base + timedelta(seconds=n, milliseconds=n),
        }
        for n in range(1, count + 1)
    ]


def build_v1_database(engine: Engine, count: int = 30) -> list[dict[str, Any]]:
    """A database exactly as the first release made it, holding `count` tasks; returns them as stored."""
    v1_metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(insert(v1_tasks), v1_rows(count))
        return [dict(row._mapping) for row in connection.execute(select(v1_tasks).order_by(v1_tasks.c.id))]


def stored_tasks(engine: Engine) -> list[dict[str, Any]]:
    """Every task in the database, by id, with the first release's columns."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(*(text(c.name) for c in v1_tasks.c)).select_from(text("tasks")).order_by(text("id"))
        )
        return [_as_utc(dict(zip([c.name for c in v1_tasks.c], row, strict=True))) for row in rows]


def _as_utc(task: dict[str, Any]) -> dict[str, Any]:
    """SQLite keeps no offset: its naive timestamps are UTC."""
    for key in ("due_date", "created_at", "updated_at"):
        value = task[key]
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value is not None:
            task[key] = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    task["completed"] = bool(task["completed"])
    return task


def migrate_with_alembic(engine: Engine, action: Callable[..., None], revision: str) -> None:
    """Run an Alembic command on `engine`'s database under the service's schema lock."""
    with engine.connect() as connection, database.schema_lock(connection):
        action(database.alembic_config(connection), revision)


def test_a_new_database_is_migrated_to_the_newest_revision_on_start_up(
    empty_database_url: str, engine: Engine, jwks_server: JwksServer, serve: Serve
) -> None:
    with serve(create_app(make_settings(empty_database_url, jwks_server))) as live:
        assert httpx.get(f"{live.url}/health").status_code == 200
    assert current_revision(engine) == HEAD
    assert inspect(engine).has_table("tasks")


def test_a_database_made_by_the_first_release_is_adopted_with_every_task_intact(
    empty_database_url: str,
    engine: Engine,
    jwks_server: JwksServer,
    serve: Serve,
    token_for: Callable[..., str],
) -> None:
    before = [_as_utc(task) for task in build_v1_database(engine)]
    assert current_revision(engine) is None

    with (
        serve(create_app(make_settings(empty_database_url, jwks_server))) as live,
        httpx.Client(base_url=live.url, timeout=30) as http,
    ):
        assert current_revision(engine) == HEAD
        assert stored_tasks(engine) == before
        for user in {task["user_id"] for task in before}:
            listed = http.get(
                f"/api/{quote(user, safe='')}/tasks",
                params={"sort": "created", "order": "asc"},
                headers={"Authorization": f"Bearer {token_for(user)}"},
            )
            assert listed.status_code == 200, listed.text
            mine = [task for task in before if task["user_id"] == user]
            assert [task["id"] for task in listed.json()] == [task["id"] for task in mine]
            assert [task["title"] for task in listed.json()] == [task["title"] for task in mine]
            # The v2 fields, with the defaults the contract gives v1 tasks.
            for task, old in zip(listed.json(), mine, strict=True):
                assert (task["priority"], task["tags"], task["version"]) == ("none", [], 1)
                assert task["completed_at"] == (task["updated_at"] if old["completed"] else None)
            # The changes feed and the quota count them: each user's counter was built from their tasks.
            feed = http.get(
                f"/api/{quote(user, safe='')}/changes",
                params={"limit": 500},
                headers={"Authorization": f"Bearer {token_for(user)}"},
            )
            assert feed.status_code == 200, feed.text
            assert sorted(change["id"] for change in feed.json()["changes"]) == [task["id"] for task in mine]
        with engine.connect() as connection:
            counted = dict(connection.execute(text("SELECT user_id, live_tasks FROM task_counters")).all())
        assert counted == {user: sum(task["user_id"] == user for task in before) for user in counted}
        assert set(counted) == {task["user_id"] for task in before}

        # A new task never takes the id of a deleted one (the adopted table is rebuilt with AUTOINCREMENT on SQLite).
        newest = max(before, key=lambda task: task["id"])
        owner_path = f"/api/{quote(newest['user_id'], safe='')}/tasks"
        owner = {"Authorization": f"Bearer {token_for(newest['user_id'])}"}
        assert http.delete(f"{owner_path}/{newest['id']}", headers=owner).status_code == 204  # to the trash
        trash_path = f"/api/{quote(newest['user_id'], safe='')}/trash/{newest['id']}"
        assert http.delete(trash_path, headers=owner).status_code == 204  # and for good
        created = http.post(owner_path, json={"title": "after adoption"}, headers=owner)
        assert created.status_code == 201, created.text
        assert created.json()["id"] > newest["id"]


def test_starting_again_on_an_up_to_date_database_changes_nothing(
    empty_database_url: str, engine: Engine, jwks_server: JwksServer, serve: Serve
) -> None:
    build_v1_database(engine, count=5)
    for _ in range(2):
        with serve(create_app(make_settings(empty_database_url, jwks_server))):
            pass
    assert current_revision(engine) == HEAD
    assert len(stored_tasks(engine)) == 5


def test_every_revision_downgrades_and_upgrades_again_keeping_the_tasks(engine: Engine) -> None:
    migrate_with_alembic(engine, command.upgrade, REVISIONS[0])
    with engine.begin() as connection:
        connection.execute(insert(v1_tasks), v1_rows(12))
    before = stored_tasks(engine)
    indexes_at = {REVISIONS[0]: index_definitions(engine)}
    assert set(indexes_at[REVISIONS[0]]) == V1_INDEXES

    for revision in REVISIONS[1:]:  # up, one revision at a time
        migrate_with_alembic(engine, command.upgrade, revision)
        assert current_revision(engine) == revision
        assert stored_tasks(engine) == before
        indexes_at[revision] = index_definitions(engine)
    for revision in reversed(REVISIONS[:-1]):  # down to the baseline, one at a time: each as it was on the way up
        migrate_with_alembic(engine, command.downgrade, revision)
        assert current_revision(engine) == revision
        assert stored_tasks(engine) == before
        assert index_definitions(engine) == indexes_at[revision]
    migrate_with_alembic(engine, command.upgrade, "head")
    assert current_revision(engine) == HEAD
    assert stored_tasks(engine) == before

    migrate_with_alembic(engine, command.downgrade, "base")
    assert not inspect(engine).has_table("tasks")
    migrate_with_alembic(engine, command.upgrade, "head")
    assert current_revision(engine) == HEAD


def index_definitions(engine: Engine) -> dict[str, str]:
    """Each index of the tasks table, by name, as the database describes it (white space normalised)."""
    with engine.connect() as connection:
        rows = connection.execute(text(INDEX_DEFINITIONS[engine.dialect.name]))
        return {name: " ".join(definition.split()) for name, definition in rows}


def columns(engine: Engine) -> list[tuple[str, str, bool]]:
    """The tasks table's columns: name, type, nullable."""
    return [(c["name"], str(c["type"]), c["nullable"]) for c in inspect(engine).get_columns("tasks")]


# SQLite cannot reflect expression indexes, and says so: this test compares them from the DDL instead.
@pytest.mark.filterwarnings("ignore:.*expression-based index")
def test_the_models_and_the_newest_revision_agree(engine: Engine, new_database_url: Callable[[], str]) -> None:
    """No drift: Alembic finds nothing to change, and a database made from the models matches the migrated one
    column for column and index for index (expression indexes included, which autogenerate cannot see on SQLite)."""
    migrate_with_alembic(engine, command.upgrade, "head")
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), SQLModel.metadata) == []
    from_models = create_engine(new_database_url())
    try:
        SQLModel.metadata.create_all(from_models)
        assert index_definitions(from_models) == index_definitions(engine)
        assert columns(from_models) == columns(engine)
    finally:
        from_models.dispose()


def test_without_migrate_on_start_up_the_schema_is_left_alone_and_its_lag_is_logged(
    empty_database_url: str, engine: Engine, jwks_server: JwksServer, serve: Serve
) -> None:
    records: list[logging.LogRecord] = []
    collector = logging.Handler()
    collector.emit = records.append  # type: ignore[method-assign]
    database_logger = logging.getLogger("todo.database")
    database_logger.addHandler(collector)
    try:
        settings = make_settings(empty_database_url, jwks_server, MIGRATE_ON_STARTUP="false")
        with serve(create_app(settings)) as live:
            assert httpx.get(f"{live.url}/health").status_code == 200
    finally:
        database_logger.removeHandler(collector)
    assert not inspect(engine).has_table("tasks")
    assert current_revision(engine) is None
    warnings = [record.getMessage() for record in records if record.levelno == logging.WARNING]
    assert any(f"at revision none, the service needs {HEAD}" in message for message in warnings), warnings


WORKERS = 4
START_UP_SECONDS = 90  # four workers importing the app at once on a loaded two-core machine


def test_several_workers_starting_at_once_migrate_once_and_all_serve(
    empty_database_url: str, engine: Engine, tmp_path: Path
) -> None:
    """The production shape: `--workers 4` on a new database; one migrates, the others wait and find nothing to do."""
    port = free_port()
    log = tmp_path / "workers.log"
    environment = os.environ | {"DATABASE_URL": empty_database_url, "BETTER_AUTH_SECRET": SECRET, "LOG_LEVEL": "info"}
    command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as output:
        service = subprocess.Popen(
            [*command, "--workers", str(WORKERS)], cwd=REPO_ROOT, env=environment, stdout=output, stderr=output
        )
        try:
            deadline = time.monotonic() + START_UP_SECONDS
            while log.read_text().count("Application startup complete") < WORKERS:
                assert service.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            token = {"Authorization": f"Bearer {sign_hs256('alice')}"}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                for number in range(8):
                    created = http.post("/api/alice/tasks", json={"title": f"task {number}"}, headers=token)
                    assert created.status_code == 201, created.text
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)
    output_text = log.read_text()
    assert output_text.count("database schema up to date") == WORKERS
    for trouble in ("Traceback", "IntegrityError", "already exists", "ERROR"):
        assert trouble not in output_text, output_text
    assert current_revision(engine) == HEAD
    assert len(stored_tasks(engine)) == 8


def sign_hs256(user: str) -> str:
    """A token for `user` signed with the test secret."""
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")
