"""Tasks get a priority, tags and completed_at; `task_tags` indexes the tags, kept in step by triggers.

Existing tasks get priority `none` (rank 0), no tags, and `completed_at` = `updated_at` where completed
(the last moment known to have changed them). A task's tags live in its own `tags` column (a JSON list
of the spellings, in order); `task_tags` holds one row per tag under its lower-cased key, for the tag
filter and the tags list. The database itself keeps it in step, with a trigger on every insert and
every change of `tags`, so no write can forget it and a write with tags stays one statement.

Revision ID: 0003_priority_and_tags
Revises: 0002_sqlite_autoincrement
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_priority_and_tags"
down_revision: str | None = "0002_sqlite_autoincrement"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TASK_ID_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# PostgreSQL: one function for both triggers. `lower` is the database's (Unicode-aware in a UTF-8
# locale); duplicate keys a case-folding difference could produce are kept once.
POSTGRESQL_TRIGGERS = [
    """
    CREATE FUNCTION tasks_index_tags() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' THEN
            DELETE FROM task_tags WHERE task_id = NEW.id;
        END IF;
        INSERT INTO task_tags (task_id, tag_key, user_id, name)
        SELECT NEW.id, lower(tag), NEW.user_id, tag FROM json_array_elements_text(NEW.tags) AS tag
        ON CONFLICT DO NOTHING;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER tasks_index_tags_on_insert AFTER INSERT ON tasks
    FOR EACH ROW WHEN (json_array_length(NEW.tags) > 0) EXECUTE FUNCTION tasks_index_tags()
    """,
    """
    CREATE TRIGGER tasks_index_tags_on_update AFTER UPDATE OF tags ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_index_tags()
    """,
]
# SQLite: `lower` is the service's own (registered on every connection: Unicode lower-casing).
SQLITE_TRIGGERS = [
    """
    CREATE TRIGGER tasks_index_tags_on_insert AFTER INSERT ON tasks WHEN NEW.tags <> '[]'
    BEGIN
        INSERT INTO task_tags (task_id, tag_key, user_id, name)
        SELECT NEW.id, lower(value), NEW.user_id, value FROM json_each(NEW.tags) WHERE true
        ON CONFLICT DO NOTHING;
    END
    """,
    """
    CREATE TRIGGER tasks_index_tags_on_update AFTER UPDATE OF tags ON tasks
    BEGIN
        DELETE FROM task_tags WHERE task_id = NEW.id;
        INSERT INTO task_tags (task_id, tag_key, user_id, name)
        SELECT NEW.id, lower(value), NEW.user_id, value FROM json_each(NEW.tags) WHERE true
        ON CONFLICT DO NOTHING;
    END
    """,
]
DROP_TRIGGERS = {
    "postgresql": [
        "DROP TRIGGER tasks_index_tags_on_update ON tasks",
        "DROP TRIGGER tasks_index_tags_on_insert ON tasks",
        "DROP FUNCTION tasks_index_tags()",
    ],
    "sqlite": ["DROP TRIGGER tasks_index_tags_on_update", "DROP TRIGGER tasks_index_tags_on_insert"],
}


def upgrade() -> None:
    op.add_column("tasks", sa.Column("priority", sa.SmallInteger(), server_default=sa.text("0"), nullable=False))
    op.add_column("tasks", sa.Column("tags", sa.JSON(), server_default="[]", nullable=False))
    op.add_column("tasks", sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE tasks SET completed_at = updated_at WHERE completed")
    op.create_index("ix_tasks_user_priority", "tasks", ["user_id", "priority", "id"])
    op.create_index("ix_tasks_user_completed_at", "tasks", ["user_id", "completed_at", "id"])
    op.create_table(
        "task_tags",
        sa.Column("task_id", TASK_ID_TYPE, nullable=False),
        sa.Column("tag_key", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", "tag_key", name=op.f("task_tags_pkey")),
    )
    op.create_index("ix_task_tags_user_key", "task_tags", ["user_id", "tag_key", "task_id"])
    dialect = op.get_bind().dialect.name
    for statement in POSTGRESQL_TRIGGERS if dialect == "postgresql" else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    for statement in DROP_TRIGGERS[op.get_bind().dialect.name]:
        op.execute(statement)
    op.drop_table("task_tags")  # its index goes with it
    op.drop_index("ix_tasks_user_completed_at", "tasks")
    op.drop_index("ix_tasks_user_priority", "tasks")
    for name in ("completed_at", "tags", "priority"):
        drop_task_column(name)


def drop_task_column(name: str) -> None:
    """Drop a column of `tasks` in place (SQLite 3.35+ can), never by rebuilding the table, which would lose its
    triggers and the `lower(title)` index."""
    op.execute(f"ALTER TABLE tasks DROP COLUMN {name}")
