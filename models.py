"""Database tables.

Besides the tables the service writes, the database keeps two things in step by itself, with
triggers that the migrations create (see `migrations/versions/`), so that no write can forget them:

- `task_tags`, the index of every task's tags, from the task's own `tags` list;
- each user's change counter and live-task count in `task_counters`, the `change_seq` of every
  task written and a `task_tombstones` row for every task deleted for good (the changes feed).
"""

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, SmallInteger, String, func, text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

# Constraint and index names that migrations can rely on, set before any table (PostgreSQL's own
# names for primary keys, so databases made before migrations existed match).
SQLModel.metadata.naming_convention = {
    "pk": "%(table_name)s_pkey",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
}

# Task ids are 64-bit on PostgreSQL; on SQLite the column must stay INTEGER to be the rowid.
TASK_ID_TYPE = BigInteger().with_variant(Integer(), "sqlite")
MAX_TASK_ID = 2**63 - 1

TITLE_MAX_LENGTH = 200
DESCRIPTION_MAX_LENGTH = 1000
TAG_MAX_LENGTH = 50
MAX_TAGS_PER_TASK = 20
IDEMPOTENCY_KEY_MAX_LENGTH = 255


class Priority(StrEnum):
    """How important a task is, least first: the order `sort=priority` uses."""

    none = "none"
    low = "low"
    medium = "medium"
    high = "high"


PRIORITY_RANKS = {priority: rank for rank, priority in enumerate(Priority)}
PRIORITIES_BY_RANK = list(Priority)


def as_utc(value: datetime) -> datetime:
    """The same instant as an aware UTC datetime; a naive value is taken to be UTC already."""
    if value.tzinfo is UTC:  # the common case (PostgreSQL sessions run in UTC): nothing to do
        return value
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def utc_now() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp column that always stores UTC and always returns aware UTC datetimes.

    SQLite keeps no offset and PostgreSQL answers in the session's time zone; this is the one
    place where both are brought back to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


class PriorityRank(TypeDecorator[Priority]):
    """A priority stored as its rank (0 for `none` to 3 for `high`), so the database sorts it right."""

    impl = SmallInteger()
    cache_ok = True

    def process_bind_param(self, value: Priority | None, dialect: Dialect) -> int | None:
        return None if value is None else PRIORITY_RANKS[Priority(value)]

    def process_result_value(self, value: int | None, dialect: Dialect) -> Priority | None:
        return None if value is None else PRIORITIES_BY_RANK[value]


class Task(SQLModel, table=True):
    """One user's to-do item; in the trash while `deleted_at` is set."""

    __tablename__ = "tasks"
    # SQLite would otherwise hand a deleted highest id to the next task; PostgreSQL's sequence never reuses one.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, sa_type=TASK_ID_TYPE, primary_key=True)
    user_id: str = Field(nullable=False)
    title: str = Field(max_length=TITLE_MAX_LENGTH, nullable=False)
    description: str | None = Field(default=None, max_length=DESCRIPTION_MAX_LENGTH)
    completed: bool = Field(default=False, nullable=False)
    due_date: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime, nullable=False)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime, nullable=False)
    priority: Priority = Field(
        default=Priority.none, sa_column=Column(PriorityRank(), nullable=False, server_default=text("0"))
    )
    # The tags as sent (trimmed, first spelling of each kept), in order; `task_tags` indexes them.
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON(), nullable=False, server_default="[]"))
    completed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # One more on every change: the task's ETag.
    version: int = Field(default=1, sa_column=Column(Integer(), nullable=False, server_default=text("1")))
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # The user's change counter at the task's last change (set by the database's trigger).
    change_seq: int = Field(default=0, sa_column=Column(BigInteger(), nullable=False, server_default=text("0")))


# One index per list ordering, each led by the owner, so every list query reads one index range.
Index("ix_tasks_user_created", Task.user_id, Task.created_at, Task.id)
Index("ix_tasks_user_updated", Task.user_id, Task.updated_at, Task.id)
Index("ix_tasks_user_title", Task.user_id, func.lower(Task.title), Task.id)
Index("ix_tasks_user_due", Task.user_id, Task.due_date, Task.id)
Index("ix_tasks_user_priority", Task.user_id, Task.priority, Task.id)
Index("ix_tasks_user_completed_at", Task.user_id, Task.completed_at, Task.id)
# The changes feed reads a user's tasks in the order of their changes.
Index("ix_tasks_user_change", Task.user_id, Task.change_seq)
# Only trashed tasks: the trash list (newest deletion first) and the purge of old ones.
TRASHED = text("deleted_at IS NOT NULL")
Index("ix_tasks_user_trash", Task.user_id, Task.deleted_at, Task.id, postgresql_where=TRASHED, sqlite_where=TRASHED)


class TaskTag(SQLModel, table=True):
    """One tag of one task, by its case-insensitive key: what tag filters and the tags list read.

    Written only by the database's triggers, from `tasks.tags`; never by the service.
    """

    __tablename__ = "task_tags"

    task_id: int = Field(sa_type=TASK_ID_TYPE, primary_key=True)
    tag_key: str = Field(primary_key=True)  # the tag lower-cased by the database
    user_id: str = Field(nullable=False)
    name: str = Field(nullable=False)  # as spelled on this task


Index("ix_task_tags_user_key", TaskTag.user_id, TaskTag.tag_key, TaskTag.task_id)


class TaskCounter(SQLModel, table=True):
    """Per user: the last change number handed out, how many tasks are live, and the oldest cursor still good.

    Kept by the database's triggers in the same transaction as each change; its row lock orders the
    user's changes, so the changes feed can never skip one (see routes/changes.py).
    """

    __tablename__ = "task_counters"

    user_id: str = Field(primary_key=True)
    last_change: int = Field(default=0, sa_column=Column(BigInteger(), nullable=False, server_default=text("0")))
    live_tasks: int = Field(default=0, sa_column=Column(Integer(), nullable=False, server_default=text("0")))
    # Changes up to here have been forgotten (tombstones purged): an older cursor is expired.
    feed_horizon: int = Field(default=0, sa_column=Column(BigInteger(), nullable=False, server_default=text("0")))


class TaskTombstone(SQLModel, table=True):
    """A task deleted for good, for the changes feed; written by the database's trigger, purged after the retention."""

    __tablename__ = "task_tombstones"

    user_id: str = Field(primary_key=True)
    change_seq: int = Field(sa_type=BigInteger, primary_key=True)
    task_id: int = Field(sa_type=TASK_ID_TYPE, nullable=False)
    deleted_at: datetime = Field(sa_type=UTCDateTime, nullable=False, index=True)


class IdempotencyKey(SQLModel, table=True):
    """The remembered response to a request sent with an `Idempotency-Key`, until it expires."""

    __tablename__ = "idempotency_keys"

    user_id: str = Field(primary_key=True)
    key: str = Field(sa_type=String(IDEMPOTENCY_KEY_MAX_LENGTH), primary_key=True)
    fingerprint: str = Field(sa_type=String(64), nullable=False)  # of the method, path and body
    status_code: int = Field(nullable=False)
    body: str = Field(nullable=False)
    location: str | None = None
    etag: str | None = None
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False, index=True)
