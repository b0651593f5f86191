"""Print PostgreSQL's plan for every kind of list query the service sends, on 10,000 tasks for one user.

    python bench/explain.py [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]

It creates a scratch database migrated with the service's own migrations (so the triggers fill
`task_tags`, `task_counters` and every task's `change_seq`), fills it with 10,000 tasks for the user
under test (two tags of eight each, every priority, a quarter completed, two thirds with a due
date, 5% in the trash) among 40,000 of 400 other users, and runs EXPLAIN (ANALYZE, BUFFERS) on the
exact statements and parameters the routes send: the task list's kinds (`routes.tasks`), the trash
list, the tags list and the changes feed. Each statement runs once first, so the plans are of a warm
cache. A plan that reads the tasks table without an index is flagged. The database is dropped
afterwards.
"""

import argparse
import random
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Json
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from database import create_db_engine, migrate_database
from models import Priority
from routes.changes import FEED
from routes.tags import READ_TAGS
from routes.tasks import default_order, list_parameters, list_statements
from routes.trash import TRASH_PAGE
from schemas import TaskListQuery, TaskSort, TaskStatus

USER = "explained-user"
USER_TASKS = 10_000
OTHER_USERS, OTHER_TASKS = 400, 40_000
TAGS = ("work", "home", "errands", "health", "finance", "family", "study", "travel")
START = datetime(2026, 1, 1, tzinfo=UTC)
# (label, the list query as the route parses it)
CASES: list[tuple[str, TaskListQuery]] = [
    ("newest first (the default list)", TaskListQuery(limit=50)),
    ("pending, newest first", TaskListQuery(limit=50, status=TaskStatus.pending)),
    ("search", TaskListQuery(limit=50, q="milk")),
    ("one tag", TaskListQuery(limit=50, tag=["work"])),
    ("two tags", TaskListQuery(limit=50, tag=["work", "Home"])),
    (
        "one tag, pending, by title",
        TaskListQuery(limit=50, tag=["travel"], status=TaskStatus.pending, sort=TaskSort.title),
    ),
    ("priority high", TaskListQuery(limit=50, priority=[Priority.high])),
    ("priority high or medium", TaskListQuery(limit=50, priority=[Priority.high, Priority.medium])),
    (
        "due in March (due_after and due_before)",
        TaskListQuery(limit=50, due_after="2026-03-01T00:00:00Z", due_before="2026-04-01T00:00:00Z"),
    ),
    ("due after December 1", TaskListQuery(limit=50, due_after="2026-12-01T00:00:00Z")),
    ("sort=priority (most important first)", TaskListQuery(limit=50, sort=TaskSort.priority)),
    ("sort=completed_at (newest completion first)", TaskListQuery(limit=50, sort=TaskSort.completed_at)),
    ("sort=due_date, undated last", TaskListQuery(limit=50, sort=TaskSort.due_date)),
    ("sort=title", TaskListQuery(limit=50, sort=TaskSort.title)),
    ("a deep page (offset 5000)", TaskListQuery(limit=50, offset=5000)),
]


def task_row(owner: str, n: int) -> tuple[Any, ...]:
    """The n-th task of a user: varied title, tags, priority, completion, due date and trash."""
    created = START + timedelta(minutes=n)
    title = random.choice(["Buy milk", "Call Ana", "Write report", "Pay rent", "book flights"]) + f" {n}"
    first = random.randrange(len(TAGS))
    tags = [TAGS[first], TAGS[(first + random.randint(1, len(TAGS) - 1)) % len(TAGS)]]
    completed = random.random() < 0.25
    completed_at = created + timedelta(hours=random.randint(1, 500)) if completed else None
    due = START + timedelta(days=random.randint(0, 364), hours=12) if random.random() < 2 / 3 else None
    deleted = created + timedelta(days=1) if random.random() < 0.05 else None
    return (owner, title, None, completed, completed_at, random.randrange(4), Json(tags), due, created, deleted)


def seed(connection: psycopg.Connection) -> None:
    """USER_TASKS tasks for USER and OTHER_TASKS for OTHER_USERS others, through the triggers."""
    rows = [task_row(USER, n) for n in range(USER_TASKS)]
    rows += [task_row(f"user-{n % OTHER_USERS}", n) for n in range(OTHER_TASKS)]
    random.shuffle(rows)  # the user's rows spread over the table, as they would be
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO tasks (user_id, title, description, completed, completed_at, priority, tags, due_date,"
            " created_at, updated_at, deleted_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(*row[:9], row[8], row[9]) for row in rows],
        )
    connection.execute("VACUUM ANALYZE tasks, task_tags, task_counters, task_tombstones")


def driver_statement(connection: Connection, statement: Any, params: dict[str, Any]) -> tuple[str, Any]:
    """Run a statement as the service does and return the SQL and parameters the driver got."""
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, sql: str, parameters: Any, _context: Any, _many: bool) -> None:
        sent.append((sql, parameters))

    event.listen(connection, "before_cursor_execute", capture)
    try:
        connection.execute(statement, params).all()
    finally:
        event.remove(connection, "before_cursor_execute", capture)
    return sent[-1]


def explain(connection: Connection, label: str, statement: Any, params: dict[str, Any]) -> list[str]:
    """Print the plan of one statement; return the problems found in it (a sequential scan of tasks)."""
    sql, parameters = driver_statement(connection, statement, params)
    plan = [row[0] for row in connection.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", parameters)]
    shown = {k: v for k, v in params.items() if k not in ("owner_id",)}
    print(f"-- {label}: {shown}")
    print("\n".join(plan))
    print()
    return [f"{label}: {line.strip()}" for line in plan if "Seq Scan on tasks" in line]


def main() -> None:
    """Create, migrate, fill, explain, drop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    arguments = parser.parse_args()
    random.seed(20261207)
    name = f"explain_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(arguments.pg_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(arguments.pg_url).set(drivername="postgresql+psycopg", database=name)
    engine = create_db_engine(url)
    try:
        migrate_database(url)
        plain_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(plain_url, autocommit=True) as connection:
            seed(connection)
            counts = connection.execute(
                "SELECT count(*), count(*) FILTER (WHERE deleted_at IS NULL) FROM tasks WHERE user_id = %s", (USER,)
            ).fetchone()
            tag_rows = connection.execute("SELECT count(*) FROM task_tags WHERE user_id = %s", (USER,)).fetchone()
            last_change = connection.execute(
                "SELECT last_change FROM task_counters WHERE user_id = %s", (USER,)
            ).fetchone()
        assert counts and tag_rows and last_change
        print(
            f"-- {USER}: {counts[0]} tasks ({counts[1]} live), {tag_rows[0]} task_tags rows, last change"
            f" {last_change[0]}; {OTHER_TASKS} tasks of {OTHER_USERS} other users\n"
        )
        problems: list[str] = []
        with engine.connect() as connection:
            for label, query in CASES:
                tags = list({tag.lower(): tag for tag in query.tag or []}.values())
                order = query.order or default_order(query.sort)
                page, _ = list_statements(
                    query.status,
                    query.sort,
                    order,
                    bool(query.q),
                    bool(query.priority),
                    len(tags),
                    query.due_after is not None,
                    query.due_before is not None,
                )
                label = f"list, {label} (sort={query.sort.value} order={order.value})"
                problems += explain(connection, label, page, list_parameters(USER, query, tags))
            page_params = {"owner_id": USER, "limit": 50, "offset": 0}
            problems += explain(connection, "trash, newest deletion first", TRASH_PAGE, page_params)
            problems += explain(connection, "tags list (GET /tags)", READ_TAGS, {"owner_id": USER})
            full_sync = {"owner_id": USER, "since": 0, "limit": 101}
            problems += explain(connection, "changes feed, full sync (first page)", FEED[True], full_sync)
            recent = {"owner_id": USER, "since": last_change[0] - 50, "limit": 101}
            problems += explain(connection, "changes feed after a recent cursor", FEED[False], recent)
            oldest = {"owner_id": USER, "since": 0, "limit": 101}
            problems += explain(connection, "changes feed after the first cursor", FEED[False], oldest)
        print("-- summary")
        print("\n".join(f"SEQUENTIAL SCAN: {problem}" for problem in problems) or "every plan reads tasks by an index")
    finally:
        engine.dispose()
        with psycopg.connect(arguments.pg_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
