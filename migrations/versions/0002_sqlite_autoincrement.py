"""Task ids are never reused on SQLite either: the tasks table gets AUTOINCREMENT.

Without it SQLite hands the id of a deleted highest task to the next one, so a delayed retry of the
old id reaches the new task. PostgreSQL's sequence never reuses an id: nothing to do there.
SQLite cannot alter a primary key in place; batch mode rebuilds the table, copying every row as it
is, and the index on `lower(title)` is made again (batch mode copies only indexes on plain columns).

Revision ID: 0002_sqlite_autoincrement
Revises: 0001_baseline
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_sqlite_autoincrement"
down_revision: str | None = "0001_baseline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def rebuild_tasks_table(autoincrement: bool) -> None:
    """Rebuild `tasks` on SQLite with or without AUTOINCREMENT, keeping its rows and all four indexes."""
    if op.get_bind().dialect.name != "sqlite":
        return
    op.drop_index("ix_tasks_user_title", "tasks")
    with op.batch_alter_table("tasks", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass
    op.create_index("ix_tasks_user_title", "tasks", ["user_id", sa.text("lower(title)"), "id"])


def upgrade() -> None:
    rebuild_tasks_table(autoincrement=True)


def downgrade() -> None:
    rebuild_tasks_table(autoincrement=False)
