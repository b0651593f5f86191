"""The changes feed: every task of the user changed after a cursor, in the order of the changes.

Why no change is ever skipped: every write of a task takes the next number of its user's counter
(`task_counters.last_change`) through a trigger, and holds the counter's row until it commits (on
SQLite, the database's one write lock). So a user's changes commit in the order of their numbers,
and whenever a reader sees the counter at N, every change numbered up to N has committed. A page
and the counter are read in one statement, from one snapshot: the page's cursor is its last
item's number, or the counter itself on the last page, and a change that commits later gets a
higher number, for a later page.
"""

import base64
import binascii
import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy import Select, bindparam, false, null, select, true, union_all

from auth import CurrentUserId
from database import SessionDep
from responses import as_json
from schemas import ApiError, ChangesPage, ChangesQuery, DeletedTask, FeedTask, error_responses
from store import TASK_COLUMNS, TASK_FIELDS, column, counters, tombstones

router = APIRouter(
    prefix="/api/{user_id}/changes", tags=["changes"], responses=error_responses(401, 403, 410, 422, 503)
)

SINCE = bindparam("since")
IS_USERS = column.user_id == bindparam("owner_id")
CHANGED_TASKS = select(*TASK_COLUMNS, column.deleted_at, column.change_seq, false().label("gone"))
# A tombstone has only an id: the other columns are NULL, typed by the tasks' branch of the union.
DELETED_TASKS = select(
    tombstones.c.task_id.label("id"),
    *(null().label(name) for name in TASK_FIELDS[1:]),
    null().label("deleted_at"),
    tombstones.c.change_seq,
    true().label("gone"),
).where(tombstones.c.user_id == bindparam("owner_id"), tombstones.c.change_seq > SINCE)
CURSOR_VERSION = "1"


def feed_statement(full_sync: bool) -> Select[Any]:
    """The counter (its `last_change` and `feed_horizon`) and one page of changes, in one statement.

    Parameters: `owner_id`, `since` and `limit` (one more than the page, to know if there is more).
    A full sync lists only live tasks; after a cursor, trashed tasks and tombstones too. The counter
    comes even when the page is empty, as one row whose change columns are NULL.
    """
    if full_sync:
        changes = CHANGED_TASKS.where(IS_USERS, column.deleted_at.is_(None), column.change_seq > SINCE)
    else:
        changes = union_all(CHANGED_TASKS.where(IS_USERS, column.change_seq > SINCE), DELETED_TASKS)
    page = changes.order_by("change_seq").limit(bindparam("limit")).subquery("page")
    me = select(bindparam("owner_id", type_=counters.c.user_id.type).label("user_id")).subquery("me")
    return (
        select(counters.c.last_change, counters.c.feed_horizon, *page.c)
        .select_from(me)
        .outerjoin(counters, counters.c.user_id == me.c.user_id)
        .outerjoin(page, true())
        .order_by(page.c.change_seq)
    )


FEED = {full_sync: feed_statement(full_sync) for full_sync in (False, True)}


def user_digest(user_id: str) -> str:
    """A short digest of the user id, which ties a cursor to its user."""
    return hashlib.blake2b(user_id.encode(), digest_size=6).hexdigest()


def make_cursor(user_id: str, change_seq: int) -> str:
    """An opaque cursor: the change number it stands after, for this user."""
    return base64.urlsafe_b64encode(f"{CURSOR_VERSION}:{change_seq}:{user_digest(user_id)}".encode()).decode()


def not_a_cursor(reason: str) -> RequestValidationError:
    """The `422` for a `since` that is not one of this user's cursors."""
    return RequestValidationError([{"loc": ("query", "since"), "msg": reason, "type": "value_error"}])


def cursor_position(user_id: str, cursor: str) -> int:
    """The change number a cursor stands after; 422 for anything that is not a cursor of this user's."""
    try:
        version, number, digest = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("ascii").split(":")
    except (UnicodeError, binascii.Error, ValueError):
        raise not_a_cursor("Not a cursor from this feed") from None
    if version != CURSOR_VERSION or not number.isdigit() or len(number) > 19:
        raise not_a_cursor("Not a cursor from this feed")
    if digest != user_digest(user_id):
        raise not_a_cursor("This cursor belongs to another user")
    return int(number)


def cursor_expired() -> ApiError:
    """The `410` for a cursor the feed cannot go on from: older than the oldest change still remembered
    (or, after a restore of the database, newer than its newest)."""
    return ApiError(
        410,
        "The server no longer remembers the changes after this cursor: sync again without since",
        "cursor_expired",
    )


def feed_item(row: Any) -> FeedTask | DeletedTask:
    """A change as the feed shows it: the task's current state, or that it was deleted for good."""
    if row.gone:
        return DeletedTask(id=row.id, deleted=True)
    fields = dict(zip(TASK_FIELDS, row[2:], strict=False))
    return FeedTask.model_validate(fields | {"deleted_at": row.deleted_at})


@router.get("", response_model=ChangesPage, summary="The user's task changes after a cursor")
def read_changes(user_id: CurrentUserId, query: Annotated[ChangesQuery, Query()], session: SessionDep) -> Response:
    """Without `since`, every live task (a full sync); with it, every task changed after it, each once,
    in the order of the changes. When `has_more`, ask again at once with the new `cursor`."""
    since = 0 if query.since is None else cursor_position(user_id, query.since)
    params = {"owner_id": user_id, "since": since, "limit": query.limit + 1}
    rows = session.exec(FEED[query.since is None], params=params).all()
    session.commit()
    last_change, horizon = rows[0].last_change or 0, rows[0].feed_horizon or 0
    if query.since is not None and not horizon <= since <= last_change:
        raise cursor_expired()
    changes = [row for row in rows if row.change_seq is not None]
    has_more = len(changes) > query.limit
    changes = changes[: query.limit]
    position = changes[-1].change_seq if has_more else last_change
    page = ChangesPage(
        changes=[feed_item(row) for row in changes], cursor=make_cursor(user_id, position), has_more=has_more
    )
    return as_json(page)
