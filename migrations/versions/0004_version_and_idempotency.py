"""Tasks get a version (their ETag; existing tasks start at 1); `idempotency_keys` remembers responses.

Revision ID: 0004_version_and_idempotency
Revises: 0003_priority_and_tags
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_version_and_idempotency"
down_revision: str | None = "0003_priority_and_tags"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False))
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("body", sa.String(), nullable=False),
        sa.Column("location", sa.String(), nullable=True),
        sa.Column("etag", sa.String(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "key", name=op.f("idempotency_keys_pkey")),
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_table("idempotency_keys")  # its index goes with it
    op.execute("ALTER TABLE tasks DROP COLUMN version")  # in place: a SQLite rebuild would lose triggers and indexes
