"""Alembic's entry point: runs the revisions in migrations/versions against the service's database.

The service (start-up, `make migrate`) hands in a connection that already holds the schema lock
(`database.schema_lock`); Alembic's own command line gets one here, under the same lock.
"""

from alembic import context
from sqlalchemy import Connection
from sqlmodel import SQLModel

import database
import models  # noqa: F401  (registers the tables on SQLModel.metadata)


def run_migrations(connection: Connection) -> None:
    """Run the pending revisions on `connection`, in the transaction it is already in."""
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        render_as_batch=True,  # SQLite alters a table by rebuilding it: Alembic's batch mode does that
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("Offline (--sql) migrations are not supported: run them against a database.")

given_connection = context.config.attributes.get("connection")
if given_connection is not None:
    run_migrations(given_connection)
else:
    from settings import load_settings

    with database.locked_migration_connection(load_settings().migration_database) as connection:
        run_migrations(connection)
