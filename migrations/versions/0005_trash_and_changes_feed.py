"""The trash (`deleted_at`) and the changes feed: per-user change counters, each task's `change_seq`, tombstones.

Every insert, every change (a write that moves `version`) and every delete of a task takes the next
number of its user's counter in `task_counters`, in the same statement, through a trigger: the
counter's row lock orders each user's commits, so the numbers a reader sees committed never have a
gap that a later commit fills (see routes/changes.py). A task deleted for good leaves a tombstone
with its number. The counter row also keeps how many of the user's tasks are live (the quota).

Existing tasks are numbered 1, 2, ... per user in id order; every user gets a counter row.

Revision ID: 0005_trash_and_changes_feed
Revises: 0004_version_and_idempotency
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_trash_and_changes_feed"
down_revision: str | None = "0004_version_and_idempotency"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TASK_ID_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# PostgreSQL: the BEFORE trigger hands the row its number (after the row lock, so a user's writes
# queue on the counter in one order: task row, then counter); the AFTER DELETE trigger writes the tombstone.
POSTGRESQL_TRIGGERS = [
    """
    CREATE FUNCTION tasks_count_change() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        live_change integer := 0;
        number bigint;
    BEGIN
        IF TG_OP = 'INSERT' THEN
            live_change := CASE WHEN NEW.deleted_at IS NULL THEN 1 ELSE 0 END;
        ELSIF TG_OP = 'UPDATE' THEN
            live_change := (CASE WHEN NEW.deleted_at IS NULL THEN 1 ELSE 0 END)
                         - (CASE WHEN OLD.deleted_at IS NULL THEN 1 ELSE 0 END);
        ELSE
            live_change := CASE WHEN OLD.deleted_at IS NULL THEN -1 ELSE 0 END;
        END IF;
        INSERT INTO task_counters AS counter (user_id, last_change, live_tasks, feed_horizon)
        VALUES (COALESCE(NEW.user_id, OLD.user_id), 1, live_change, 0)
        ON CONFLICT (user_id) DO UPDATE
            SET last_change = counter.last_change + 1, live_tasks = counter.live_tasks + live_change
        RETURNING last_change INTO number;
        IF TG_OP = 'DELETE' THEN
            INSERT INTO task_tombstones (user_id, change_seq, task_id, deleted_at)
            VALUES (OLD.user_id, number, OLD.id, now());
            DELETE FROM task_tags WHERE task_id = OLD.id;
            RETURN NULL;
        END IF;
        NEW.change_seq := number;
        RETURN NEW;
    END
    $$
    """,
    """
    CREATE TRIGGER tasks_count_change BEFORE INSERT OR UPDATE OF version ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_count_change()
    """,
    """
    CREATE TRIGGER tasks_count_removal AFTER DELETE ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_count_change()
    """,
]
# SQLite runs one writer at a time, so AFTER triggers that number the row just written are enough.
SQLITE_COUNT = """
    INSERT INTO task_counters (user_id, last_change, live_tasks, feed_horizon) VALUES ({owner}, 1, {live_change}, 0)
    ON CONFLICT (user_id) DO UPDATE SET last_change = last_change + 1, live_tasks = live_tasks + {live_change};
"""
SQLITE_NUMBER_ROW = (
    "UPDATE tasks SET change_seq = (SELECT last_change FROM task_counters WHERE user_id = NEW.user_id)"
    " WHERE id = NEW.id;"
)
SQLITE_TRIGGERS = [
    f"""
    CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks
    BEGIN
        {SQLITE_COUNT.format(owner="NEW.user_id", live_change="(NEW.deleted_at IS NULL)")}
        {SQLITE_NUMBER_ROW}
    END
    """,
    f"""
    CREATE TRIGGER tasks_count_change AFTER UPDATE OF version ON tasks
    BEGIN
        {SQLITE_COUNT.format(owner="NEW.user_id", live_change="(NEW.deleted_at IS NULL) - (OLD.deleted_at IS NULL)")}
        {SQLITE_NUMBER_ROW}
    END
    """,
    f"""
    CREATE TRIGGER tasks_count_removal AFTER DELETE ON tasks
    BEGIN
        {SQLITE_COUNT.format(owner="OLD.user_id", live_change="-(OLD.deleted_at IS NULL)")}
        INSERT INTO task_tombstones (user_id, change_seq, task_id, deleted_at)
        SELECT OLD.user_id, last_change, OLD.id, strftime('%Y-%m-%d %H:%M:%f000', 'now')
        FROM task_counters WHERE user_id = OLD.user_id;
        DELETE FROM task_tags WHERE task_id = OLD.id;
    END
    """,
]
DROP_TRIGGERS = {
    "postgresql": [
        "DROP TRIGGER tasks_count_removal ON tasks",
        "DROP TRIGGER tasks_count_change ON tasks",
        "DROP FUNCTION tasks_count_change()",
    ],
    "sqlite": [
        "DROP TRIGGER tasks_count_removal",
        "DROP TRIGGER tasks_count_change",
        "DROP TRIGGER tasks_count_insert",
    ],
}
TRASHED = sa.text("deleted_at IS NOT NULL")


def upgrade() -> None:
    op.add_column("tasks", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("tasks", sa.Column("change_seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
    op.execute(
        "UPDATE tasks SET change_seq = numbered.n FROM"
        " (SELECT id, row_number() OVER (PARTITION BY user_id ORDER BY id) AS n FROM tasks) AS numbered"
        " WHERE tasks.id = numbered.id"
    )
    op.create_index("ix_tasks_user_change", "tasks", ["user_id", "change_seq"])
    op.create_index(
        "ix_tasks_user_trash",
        "tasks",
        ["user_id", "deleted_at", "id"],
        postgresql_where=TRASHED,
        sqlite_where=TRASHED,
    )
    op.create_table(
        "task_counters",
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("last_change", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("live_tasks", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("feed_horizon", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("task_counters_pkey")),
    )
    op.execute(
        "INSERT INTO task_counters (user_id, last_change, live_tasks, feed_horizon)"
        " SELECT user_id, count(*), count(*), 0 FROM tasks GROUP BY user_id"
    )
    op.create_table(
        "task_tombstones",
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("change_seq", sa.BigInteger(), nullable=False),
        sa.Column("task_id", TASK_ID_TYPE, nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "change_seq", name=op.f("task_tombstones_pkey")),
    )
    op.create_index("ix_task_tombstones_deleted_at", "task_tombstones", ["deleted_at"])
    dialect = op.get_bind().dialect.name
    for statement in POSTGRESQL_TRIGGERS if dialect == "postgresql" else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    """Back to tasks without a trash: tasks in the trash are deleted for good (the older schema cannot hold them)."""
    for statement in DROP_TRIGGERS[op.get_bind().dialect.name]:
        op.execute(statement)
    op.execute("DELETE FROM task_tags WHERE task_id IN (SELECT id FROM tasks WHERE deleted_at IS NOT NULL)")
    op.execute("DELETE FROM tasks WHERE deleted_at IS NOT NULL")
    op.drop_table("task_tombstones")
    op.drop_table("task_counters")
    op.drop_index("ix_tasks_user_trash", "tasks")
    op.drop_index("ix_tasks_user_change", "tasks")
    for name in ("change_seq", "deleted_at"):
        op.execute(f"ALTER TABLE tasks DROP COLUMN {name}")  # in place: a SQLite rebuild would lose triggers
