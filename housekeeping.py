"""Housekeeping: the periodic clean-up that keeps the database to what the contract promises to remember.

Every HOUSEKEEPING_INTERVAL_SECONDS each worker tries to run one round; on PostgreSQL an advisory
lock that is only tried lets one worker (of every instance) do it while the others skip that round.
A round deletes for good the tasks in the trash longer than TRASH_RETENTION_DAYS, forgets the
tombstones of the changes feed that are as old (raising each user's `feed_horizon` first, so an
older cursor is a 410 rather than a feed with a hole), and drops expired idempotency keys.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, select, text, update
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from database import DatabaseUnavailableError, transaction
from models import IdempotencyKey, UTCDateTime, utc_now
from store import column, counters, tasks, tombstones

logger = logging.getLogger("todo.housekeeping")

HOUSEKEEPING_LOCK_KEY = 7_105_300_118  # next to the schema lock's key
CLAIM_ROUND = text("SELECT pg_try_advisory_xact_lock(:key)")
BATCH = 500
CUTOFF = bindparam("cutoff", type_=UTCDateTime())
idempotency_keys = IdempotencyKey.__table__

# Locked first, then deleted, like every write: a task's row before its user's counter. SKIP LOCKED
# leaves a task that someone is restoring right now for the next round.
OLD_TRASH = (
    select(column.id)
    .where(column.deleted_at < CUTOFF)
    .order_by(column.id)
    .limit(BATCH)
    .with_for_update(skip_locked=True)
)
DELETE_OLD_TRASH = delete(tasks).where(column.id.in_(bindparam("task_ids", expanding=True)), column.deleted_at < CUTOFF)
OLD_TOMBSTONES = tombstones.c.deleted_at < CUTOFF
RAISE_FEED_HORIZONS = (
    update(counters)
    .where(counters.c.user_id.in_(select(tombstones.c.user_id).where(OLD_TOMBSTONES)))
    .values(
        feed_horizon=select(func.max(tombstones.c.change_seq))
        .where(tombstones.c.user_id == counters.c.user_id, OLD_TOMBSTONES)
        .scalar_subquery()
    )
)
DELETE_OLD_TOMBSTONES = delete(tombstones).where(OLD_TOMBSTONES)
DELETE_EXPIRED_KEYS = delete(idempotency_keys).where(
    idempotency_keys.c.expires_at <= bindparam("now", type_=UTCDateTime())
)


def claim_round(session: Session) -> bool:
    """Whether this worker runs this round (on PostgreSQL, only one at a time; call inside a transaction)."""
    if session.bind.dialect.name != "postgresql":
        return True
    return bool(session.exec(CLAIM_ROUND, params={"key": HOUSEKEEPING_LOCK_KEY}).scalar_one())


def clean_up(engine: Engine, trash_retention_days: int, now: datetime | None = None) -> dict[str, int]:
    """One round of housekeeping at `now` (default: the current time); how many rows of each kind it removed."""
    now = now or utc_now()
    cutoff = now - timedelta(days=trash_retention_days)
    removed = {"tasks": 0, "tombstones": 0, "idempotency_keys": 0}
    with Session(engine) as session:
        while True:  # the trash, a batch per transaction so no user waits long on a counter
            with transaction(session):
                if not claim_round(session):
                    return removed
                task_ids = list(session.exec(OLD_TRASH, params={"cutoff": cutoff}).scalars())
                if task_ids:
                    session.exec(DELETE_OLD_TRASH, params={"cutoff": cutoff, "task_ids": task_ids})
            removed["tasks"] += len(task_ids)
            if len(task_ids) < BATCH:
                break
        with transaction(session):
            if not claim_round(session):
                return removed
            session.exec(RAISE_FEED_HORIZONS, params={"cutoff": cutoff})
            removed["tombstones"] = session.exec(DELETE_OLD_TOMBSTONES, params={"cutoff": cutoff}).rowcount
            removed["idempotency_keys"] = session.exec(DELETE_EXPIRED_KEYS, params={"now": now}).rowcount
    return removed


async def keep_house(engine: Engine, trash_retention_days: int, interval_seconds: float) -> None:
    """Run a round of housekeeping every `interval_seconds` (the first one interval after start), until cancelled."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            removed = await run_in_threadpool(clean_up, engine, trash_retention_days)
            if any(removed.values()):
                logger.info(
                    "housekeeping removed %d tasks from the trash, %d tombstones, %d idempotency keys",
                    removed["tasks"],
                    removed["tombstones"],
                    removed["idempotency_keys"],
                )
        except (DatabaseUnavailableError, OSError) as error:
            logger.warning("housekeeping skipped, the database is unavailable: %s", type(error).__name__)
        except Exception:  # a round that failed is tried again next time; the service carries on
            logger.exception("housekeeping round failed")


@contextlib.asynccontextmanager
async def housekeeping(engine: Engine, trash_retention_days: int, interval_seconds: float) -> AsyncIterator[None]:
    """Keep house in the background while the block runs."""
    task = asyncio.create_task(keep_house(engine, trash_retention_days, interval_seconds))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
