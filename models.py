"""Database tables."""

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, func
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


class Task(SQLModel, table=True):
    """One user's to-do item."""

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


# One index per list ordering, each led by the owner, so every list query reads one index range.
Index("ix_tasks_user_created", Task.user_id, Task.created_at, Task.id)
Index("ix_tasks_user_updated", Task.user_id, Task.updated_at, Task.id)
Index("ix_tasks_user_title", Task.user_id, func.lower(Task.title), Task.id)
Index("ix_tasks_user_due", Task.user_id, Task.due_date, Task.id)
