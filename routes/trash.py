"""The trash: tasks deleted under /tasks wait here to be restored, or deleted for good (by hand, or by the
housekeeping once they are older than TRASH_RETENTION_DAYS)."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import TypeAdapter
from sqlalchemy import and_, bindparam, delete, select

from auth import CurrentUserId
from database import SessionDep, transaction
from models import utc_now
from responses import NOT_MODIFIED, PAGE_HEADERS, IfNoneMatch, list_response, paging_headers, task_response
from routes.tasks import OwnedTask
from schemas import PageQuery, TaskPublic, TrashedTask, error_responses
from settings import AppSettings
from store import (
    IS_OWNED,
    IS_TRASHED,
    TASK_COLUMNS,
    column,
    found,
    page_statements,
    page_total,
    restore_task,
    task_not_found,
    tasks,
)

router = APIRouter(prefix="/api/{user_id}/trash", tags=["trash"], responses=error_responses(401, 403, 422, 503))

IS_USERS_TRASH = and_(column.user_id == bindparam("owner_id"), IS_TRASHED)
TRASH_PAGE, TRASH_COUNT = page_statements(
    IS_USERS_TRASH, [column.deleted_at.desc(), column.id.desc()], (*TASK_COLUMNS, column.deleted_at)
)
TRASH_LIST = TypeAdapter(list[TrashedTask])
DELETE_FOR_GOOD = delete(tasks).where(IS_OWNED, IS_TRASHED).returning(column.id)
# Emptying the trash first locks its tasks in id order (PostgreSQL), then deletes exactly those: every
# write holds its task's row before its user's change counter, and so does this, so the two never deadlock.
LOCK_TRASH = select(column.id).where(IS_USERS_TRASH).order_by(column.id).with_for_update()
DELETE_LOCKED = delete(tasks).where(IS_USERS_TRASH, column.id.in_(bindparam("task_ids", expanding=True)))
DELETE_BATCH = 500


@router.get(
    "",
    response_model=list[TrashedTask],
    summary="List the tasks in the trash, newest deletion first",
    responses={200: {"headers": PAGE_HEADERS}, **NOT_MODIFIED},
)
def list_trash(
    user_id: CurrentUserId,
    query: Annotated[PageQuery, Query()],
    session: SessionDep,
    request: Request,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """One page of the user's trash, each task with its `deleted_at`; the total in `X-Total-Count`."""
    params = {"owner_id": user_id, "limit": query.limit, "offset": query.offset}
    rows = session.exec(TRASH_PAGE, params=params).all()
    total = page_total(session, rows, TRASH_COUNT, params)
    session.commit()
    body = TRASH_LIST.dump_json(TRASH_LIST.validate_python([row._mapping for row in rows]))
    return list_response(body, paging_headers(request, "list_trash", user_id, query, total), if_none_match)


@router.post(
    "/{task_id}/restore",
    response_model=TaskPublic,
    summary="Bring a task back from the trash",
    responses=error_responses(404, 409),
)
def restore(owned: OwnedTask, session: SessionDep, settings: AppSettings) -> Response:
    """The task, back among the live tasks as it was; `409` if the user already holds the most tasks allowed."""
    task = found(restore_task(session, owned | {"now": utc_now()}, settings.max_tasks_per_user))
    session.commit()
    return task_response(task)


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a task in the trash for good",
    responses=error_responses(404),
)
def delete_for_good(owned: OwnedTask, session: SessionDep) -> None:
    """Delete the task for good; only a task in the trash can be (else 404)."""
    deleted = session.exec(DELETE_FOR_GOOD, params=owned).one_or_none()
    session.commit()
    if deleted is None:
        raise task_not_found()


@router.delete("", status_code=status.HTTP_204_NO_CONTENT, response_class=Response, summary="Empty the trash")
def empty_trash(user_id: CurrentUserId, session: SessionDep) -> None:
    """Delete every task in the user's trash for good, in one transaction."""
    with transaction(session):
        trashed = session.exec(LOCK_TRASH, params={"owner_id": user_id}).scalars().all()
        for start in range(0, len(trashed), DELETE_BATCH):
            batch = list(trashed[start : start + DELETE_BATCH])
            session.exec(DELETE_LOCKED, params={"owner_id": user_id, "task_ids": batch})
    session.commit()
