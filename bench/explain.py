"""Print PostgreSQL's plan for every kind of list query the service sends, on 5,000 tasks for one user.

    python bench/explain.py [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]

It creates a scratch database with the service's own tables and indexes (models.py), fills it with
5,000 tasks for the user under test among 50,000 of other users, and runs EXPLAIN ANALYZE on the
exact statements routes/tasks.py builds. The database is dropped afterwards.
"""

import argparse
import random
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from database import create_db_engine, migrate_database
from routes.tasks import list_statements, search_pattern
from schemas import SortOrder, TaskSort, TaskStatus

USER = "explained-user"
CASES = [
    ("newest first (the default list)", TaskStatus.all, TaskSort.created, SortOrder.desc, None),
    ("pending, newest first", TaskStatus.pending, TaskSort.created, SortOrder.desc, None),
    ("recently updated", TaskStatus.all, TaskSort.updated, SortOrder.desc, None),
    ("by title", TaskStatus.all, TaskSort.title, SortOrder.asc, None),
    ("by due date, undated last", TaskStatus.all, TaskSort.due_date, SortOrder.asc, None),
    ("search", TaskStatus.all, TaskSort.created, SortOrder.desc, "milk"),
]


def seed(connection: psycopg.Connection) -> None:
    """5,000 tasks for USER and 50,000 for 500 other users."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for n in range(55_000):
        owner = USER if n < 5_000 else f"user-{n % 500}"
        created = start + timedelta(minutes=n)
        due = created + timedelta(days=random.randint(1, 60)) if n % 3 else None
        title = random.choice(["Buy milk", "Call Ana", "Write report", "Pay rent", "book flights"]) + f" {n}"
        rows.append((owner, title, None, n % 4 == 0, due, created, created))
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO tasks (user_id, title, description, completed, due_date, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
    connection.execute("ANALYZE tasks")


def main() -> None:
    """Create, fill, explain, drop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    arguments = parser.parse_args()
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
        with engine.connect() as connection:
            for label, status, sort, order, q in CASES:
                page, _ = list_statements(status, sort, order, q is not None)
                params = {"owner_id": USER, "limit": 50, "offset": 0, "pattern": search_pattern(q or "")}
                sql = str(page.compile(dialect=engine.dialect))
                plan = connection.exec_driver_sql(f"EXPLAIN (ANALYZE, COSTS OFF, SUMMARY OFF) {sql}", params)
                print(f"-- {label}: status={status.value} sort={sort.value} order={order.value} q={q!r}")
                print("\n".join(row[0] for row in plan))
                print()
    finally:
        engine.dispose()
        with psycopg.connect(arguments.pg_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
