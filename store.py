"""The SQL that several routers share: the task's public columns, the conditions every statement on one
task uses, the marks every change leaves, the quota, and rows turned into API models.

Statements are built once, with bound parameters, never per request. Routes work on rows, not ORM
objects: a task is read only to be serialised, so there is nothing for the ORM to track.
"""

from typing import Any

from sqlalchemy import Row, Select, and_, bindparam, case, func, insert, null, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Update
from sqlmodel import Session

from database import transaction
from models import MAX_TASK_ID, Task, TaskCounter, TaskTag, TaskTombstone, UTCDateTime
from schemas import ApiError, TaskPublic

tasks = Task.__table__
column = tasks.c
counters = TaskCounter.__table__
task_tags = TaskTag.__table__
tombstones = TaskTombstone.__table__

# Every statement that returns tasks returns the public fields, in TaskPublic's order (see `task_fields`).
TASK_FIELDS = tuple(TaskPublic.model_fields)
TASK_COLUMNS = tuple(column[name] for name in TASK_FIELDS)

IS_LIVE = column.deleted_at.is_(None)
IS_TRASHED = column.deleted_at.is_not(None)
# The one rule for every single-task statement: this id, and this user's (`task_id`, `owner_id`).
IS_OWNED = and_(column.id == bindparam("task_id"), column.user_id == bindparam("owner_id"))
IS_OWNED_AND_LIVE = and_(IS_OWNED, IS_LIVE)
# An `If-Match` precondition, in the write's own WHERE: compare and write are one atomic step.
VERSION_MATCHES = column.version.in_(bindparam("expected_versions", expanding=True))
NOW = bindparam("now", type_=UTCDateTime())
# What every change of a task sets: one more version (its ETag) and the time. The database's trigger
# on `version` also numbers the change for the changes feed.
CHANGE_MARKS = {"version": column.version + 1, "updated_at": NOW}
# `completed_at` follows `completed` in the same statement: set when a task becomes completed,
# kept when it already was, cleared when it becomes pending.
COMPLETED_AT_WHEN_COMPLETED = case((column.completed.is_(True), column.completed_at), else_=NOW)
COMPLETED_AT_WHEN_TOGGLED = case((column.completed.is_(True), null()), else_=NOW)

READ_TASK = select(*TASK_COLUMNS).where(IS_OWNED_AND_LIVE)
READ_VERSION = select(column.version).where(IS_OWNED_AND_LIVE)
# Quotas above every real count, when MAX_TASKS_PER_USER is 0 (no quota).
NO_QUOTA = 2**31 - 1
READ_LIVE_TASKS = select(counters.c.live_tasks).where(counters.c.user_id == bindparam("owner_id"))
COUNTER_FOR_NEW_USER = {
    dialect.name: dialect_insert(counters).values(user_id=bindparam("owner_id")).on_conflict_do_nothing()
    for dialect, dialect_insert in ((postgresql.dialect, postgresql.insert), (sqlite.dialect, sqlite.insert))
}
CREATED_FIELDS = ("user_id", "title", "description", "completed", "completed_at", "due_date", "priority", "tags")
# A new task, only while its owner is under the quota. FOR UPDATE (PostgreSQL) holds the owner's
# counter row and reads its newest count: of two creates racing for the last place, one waits and
# then finds the quota full. A user with no counter row yet gets none here (see `insert_task`).
CREATE_TASK = (
    insert(tasks)
    .from_select(
        [*CREATED_FIELDS, "created_at", "updated_at"],
        select(*(bindparam(name, type_=column[name].type) for name in CREATED_FIELDS), NOW, NOW)
        .where(counters.c.user_id == bindparam("owner_id"), counters.c.live_tasks < bindparam("quota"))
        .with_for_update(),
    )
    .returning(*TASK_COLUMNS)
)
MAX_TASK_ID_DIGITS = len(str(MAX_TASK_ID))


def task_not_found() -> ApiError:
    """The one answer for a task that is missing, in the trash (under /tasks) or someone else's."""
    return ApiError(404, "Task not found", "task_not_found")


def task_quota_exceeded(quota: int) -> ApiError:
    """The answer to a create or restore that would take the user past the quota."""
    return ApiError(409, f"You already have {quota} tasks, the most a user may keep", "task_quota_exceeded")


def task_fields(row: Row) -> dict[str, Any]:
    """A task row's public fields by name (a row may carry more columns after them).

    Pydantic reads a dict many times faster than a row's attributes, which matters on a page of 50.
    """
    return dict(zip(TASK_FIELDS, row, strict=False))


def found(row: Row | None) -> TaskPublic:
    """The task a statement matched, or 404."""
    if row is None:
        raise task_not_found()
    return TaskPublic.model_validate(task_fields(row))


def owned_task_params(user_id: str, task_id: str) -> dict[str, Any]:
    """The parameters of `IS_OWNED` for the user's task `task_id`; 404 at once for an id no task can have.

    The id is taken as digits, not parsed by pydantic, because an integer of any length (even past
    the 4300 digits Python parses by default) is a 404, not a 422; leading zeros do not count.
    """
    digits = task_id.lstrip("0")
    if task_id.startswith("-") or not digits or len(digits) > MAX_TASK_ID_DIGITS or int(digits) > MAX_TASK_ID:
        raise task_not_found()
    return {"task_id": int(digits), "owner_id": user_id}


def quota_value(max_tasks_per_user: int) -> int:
    """The quota to compare counts with: MAX_TASKS_PER_USER, where 0 means none."""
    return max_tasks_per_user or NO_QUOTA


def insert_task(session: Session, user_id: str, values: dict[str, Any], max_tasks_per_user: int) -> Row:
    """Insert a task for `user_id` in one statement (three for the user's very first); 409 past the quota."""
    params = values | {"user_id": user_id, "owner_id": user_id, "quota": quota_value(max_tasks_per_user)}
    row = session.exec(CREATE_TASK, params=params).one_or_none()
    if row is None:  # a user without a counter row yet, or one at the quota
        session.exec(COUNTER_FOR_NEW_USER[session.bind.dialect.name], params={"owner_id": user_id})
        row = session.exec(CREATE_TASK, params=params).one_or_none()
    if row is None:
        raise task_quota_exceeded(max_tasks_per_user)
    return row


def change_statement(values: dict[str, Any], conditional: bool, where: Any = IS_OWNED_AND_LIVE) -> Update:
    """An UPDATE of one task that sets `values` and the change marks and returns the task.

    `conditional`: only while its version is one of `expected_versions` (an `If-Match`).
    """
    condition = and_(where, VERSION_MATCHES) if conditional else where
    return update(tasks).where(condition).values(**values, **CHANGE_MARKS).returning(*TASK_COLUMNS)


def apply_change(
    session: Session, statement: Update, params: dict[str, Any], expected_versions: list[int] | None
) -> Row:
    """Run a change of one task; 404 when there is no such live task, 412 when `If-Match` did not match.

    The follow-up read runs only when nothing matched and an `If-Match` was sent, so the common case
    stays one statement.
    """
    if expected_versions is not None:
        params = params | {"expected_versions": expected_versions}
    row = session.exec(statement, params=params).one_or_none()
    if row is not None:
        return row
    if expected_versions is None:
        raise task_not_found()
    current = session.exec(READ_VERSION, params=params).scalar_one_or_none()
    if current is None:
        raise task_not_found()
    raise precondition_failed(current)


def precondition_failed(current_version: int) -> ApiError:
    """The `412` for an `If-Match` that did not match, with the task's current ETag."""
    return ApiError(
        412,
        "The task has changed since the ETag you sent (If-Match): nothing was changed",
        "precondition_failed",
        headers={"ETag": task_etag(current_version)},
    )


def task_etag(version: int) -> str:
    """A task's strong ETag: its version, quoted."""
    return f'"{version}"'


def restore_task(session: Session, params: dict[str, Any], max_tasks_per_user: int) -> Row:
    """Bring a task back from the trash, unless that would take its owner past the quota (409).

    The restore and the count it is checked against are one transaction: the restore's trigger holds
    the owner's counter row, so no concurrent create or restore can slip in between.
    """
    with transaction(session):
        row = session.exec(RESTORE_TASK, params=params).one_or_none()
        if row is None:
            raise task_not_found()
        live = session.exec(READ_LIVE_TASKS, params=params).scalar_one()
        if live > quota_value(max_tasks_per_user):
            raise task_quota_exceeded(max_tasks_per_user)
    return row


RESTORE_TASK = change_statement({"deleted_at": None}, conditional=False, where=and_(IS_OWNED, IS_TRASHED))


def page_statements(matches: Any, order_by: list[Any], columns: tuple[Any, ...]) -> tuple[Select[Any], Select[Any]]:
    """A page of `columns` of the tasks that `matches` with their total, and the count alone (for past the end).

    Parameters: the conditions' own, `limit` and `offset`. The window count brings the total in the
    same round trip as the page.
    """
    page = (
        select(*columns, func.count().over().label("total"))
        .where(matches)
        .order_by(*order_by)
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    return page, select(func.count()).select_from(tasks).where(matches)


def page_total(session: Session, rows: list[Row], count: Select[Any], params: dict[str, Any]) -> int:
    """The total of a page's query: from the window count, or, past the last page, from a count of its own."""
    if rows:
        return rows[0].total
    if params["offset"] == 0:
        return 0
    return session.exec(count, params=params).scalar_one()
