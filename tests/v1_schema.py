"""The tasks table exactly as the first release declared it (its models.py), for building databases as
that release did: `create_all`, no migration history. Frozen: never change it to follow the models."""

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Index, Integer, MetaData, String, Table, func

v1_metadata = MetaData()

v1_tasks = Table(
    "tasks",
    v1_metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("user_id", String(), nullable=False),
    Column("title", String(200), nullable=False),
    Column("description", String(1000), nullable=True),
    Column("completed", Boolean(), nullable=False),
    Column("due_date", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_tasks_user_created", v1_tasks.c.user_id, v1_tasks.c.created_at, v1_tasks.c.id)
Index("ix_tasks_user_updated", v1_tasks.c.user_id, v1_tasks.c.updated_at, v1_tasks.c.id)
Index("ix_tasks_user_title", v1_tasks.c.user_id, func.lower(v1_tasks.c.title), v1_tasks.c.id)
Index("ix_tasks_user_due", v1_tasks.c.user_id, v1_tasks.c.due_date, v1_tasks.c.id)
