"""The task routes: every one acts only on the token's user's live tasks (those in the trash are a 404 here)."""

from functools import cache
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response, status
from sqlalchemy import Select, and_, bindparam, func, not_, or_, select

from auth import CurrentUserId
from database import SessionDep
from idempotency import REPLAYED, RetryableRequest, respond_once
from models import UTCDateTime, utc_now
from responses import (
    ETAG_HEADER,
    NOT_MODIFIED,
    PAGE_HEADERS,
    TASK_LIST,
    IfMatch,
    IfNoneMatch,
    expected_versions,
    list_response,
    paging_headers,
    task_response,
    user_url,
)
from schemas import (
    CompletionUpdate,
    SortOrder,
    TaskCreate,
    TaskListQuery,
    TaskPublic,
    TaskSort,
    TaskStatus,
    TaskUpdate,
    error_responses,
    tag_key,
)
from settings import AppSettings
from store import (
    COMPLETED_AT_WHEN_COMPLETED,
    COMPLETED_AT_WHEN_TOGGLED,
    IS_LIVE,
    NOW,
    READ_TASK,
    READ_VERSION,
    TASK_COLUMNS,
    apply_change,
    change_statement,
    column,
    found,
    insert_task,
    owned_task_params,
    page_statements,
    page_total,
    precondition_failed,
    task_fields,
    task_not_found,
    task_tags,
)

router = APIRouter(
    prefix="/api/{user_id}/tasks",
    tags=["tasks"],
    responses=error_responses(401, 403, 422, 503),
)

SORT_KEYS = {
    TaskSort.created: column.created_at,
    TaskSort.updated: column.updated_at,
    TaskSort.title: func.lower(column.title),
    TaskSort.due_date: column.due_date,
    TaskSort.priority: column.priority,
    TaskSort.completed_at: column.completed_at,
}
ASCENDING_BY_DEFAULT = {TaskSort.title, TaskSort.due_date}
# Tasks without a value for these come last in either direction.
NULLS_LAST = {TaskSort.due_date, TaskSort.completed_at}
TOGGLE_TASK = {
    conditional: change_statement(
        {"completed": not_(column.completed), "completed_at": COMPLETED_AT_WHEN_TOGGLED}, conditional
    )
    for conditional in (False, True)
}
SET_COMPLETED = {
    (completed, conditional): change_statement(
        {"completed": completed, "completed_at": COMPLETED_AT_WHEN_COMPLETED if completed else None}, conditional
    )
    for completed in (False, True)
    for conditional in (False, True)
}
TRASH_TASK = {conditional: change_statement({"deleted_at": NOW}, conditional) for conditional in (False, True)}
TASK_HEADERS = {200: {"headers": ETAG_HEADER}}
CHANGE_RESPONSES = TASK_HEADERS | error_responses(404, 412, 413)
RETRYABLE_RESPONSES = {
    "headers": ETAG_HEADER
    | {REPLAYED: {"description": "`true` when this is a remembered response, replayed", "schema": {"type": "string"}}}
}


def default_order(sort: TaskSort) -> SortOrder:
    """The direction a sort takes when `order` is not given."""
    return SortOrder.asc if sort in ASCENDING_BY_DEFAULT else SortOrder.desc


async def get_owned_task(
    user_id: CurrentUserId,
    task_id: Annotated[str, Path(pattern=r"^-?[0-9]+$", description="The task's id (an integer)")],
) -> dict[str, object]:
    """The parameters that name this user's task `task_id` in a statement; 404 at once for an id no task can have."""
    return owned_task_params(user_id, task_id)


OwnedTask = Annotated[dict[str, object], Depends(get_owned_task)]


def carries_tag(number: int) -> Any:
    """The condition that a task carries the tag in parameter `tag_{number}`, by the tags' index."""
    return column.id.in_(
        select(task_tags.c.task_id).where(
            task_tags.c.user_id == bindparam("owner_id"),
            task_tags.c.tag_key == func.lower(bindparam(f"tag_{number}")),
        )
    )


@cache
def list_statements(
    shown: TaskStatus,
    sort: TaskSort,
    order: SortOrder,
    searching: bool,
    by_priority: bool,
    tag_count: int,
    due_after: bool,
    due_before: bool,
) -> tuple[Select[Any], Select[Any]]:
    """The page and the count statements of one kind of list query, built once.

    Parameters: `owner_id`, and as the kind needs `pattern`, `priorities`, `tag_0`..., `due_after`,
    `due_before`; then `limit`, `offset`. The order is total: the sort key (tasks without a due date or
    a completion last), then the id, in the same direction.
    """
    conditions = [column.user_id == bindparam("owner_id"), IS_LIVE]
    if shown is not TaskStatus.all:
        conditions.append(column.completed.is_(shown is TaskStatus.completed))
    if searching:
        pattern = bindparam("pattern")
        conditions.append(or_(column.title.ilike(pattern, escape="\\"), column.description.ilike(pattern, escape="\\")))
    if by_priority:
        conditions.append(column.priority.in_(bindparam("priorities", expanding=True)))
    conditions.extend(carries_tag(number) for number in range(tag_count))
    if due_after:
        conditions.append(column.due_date >= bindparam("due_after", type_=UTCDateTime()))
    if due_before:
        conditions.append(column.due_date < bindparam("due_before", type_=UTCDateTime()))
    key = SORT_KEYS[sort]
    primary = key.desc() if order is SortOrder.desc else key.asc()
    if sort in NULLS_LAST:
        primary = primary.nulls_last()
    tiebreak = column.id.desc() if order is SortOrder.desc else column.id.asc()
    return page_statements(and_(*conditions), [primary, tiebreak], TASK_COLUMNS)


def search_pattern(text: str) -> str:
    """A LIKE pattern matching `text` literally anywhere."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def list_parameters(user_id: str, query: TaskListQuery, tags: list[str]) -> dict[str, Any]:
    """The statement parameters of a list query."""
    params: dict[str, Any] = {"owner_id": user_id, "limit": query.limit, "offset": query.offset}
    if query.q:
        params["pattern"] = search_pattern(query.q)
    if query.priority:
        params["priorities"] = query.priority
    params.update({f"tag_{number}": tag for number, tag in enumerate(tags)})
    if query.due_after:
        params["due_after"] = query.due_after
    if query.due_before:
        params["due_before"] = query.due_before
    return params


@router.get(
    "",
    response_model=list[TaskPublic],
    summary="List the user's tasks",
    responses={200: {"headers": PAGE_HEADERS}, **NOT_MODIFIED},
)
def list_tasks(
    user_id: CurrentUserId,
    query: Annotated[TaskListQuery, Query()],
    session: SessionDep,
    request: Request,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """One page of the user's tasks, with the total in `X-Total-Count`, in one query."""
    tags = list({tag_key(tag): tag for tag in query.tag or []}.values())  # each tag once, case-insensitively
    page, count = list_statements(
        query.status,
        query.sort,
        query.order or default_order(query.sort),
        bool(query.q),
        bool(query.priority),
        len(tags),
        query.due_after is not None,
        query.due_before is not None,
    )
    params = list_parameters(user_id, query, tags)
    rows = session.exec(page, params=params).all()
    total = page_total(session, rows, count, params)
    session.commit()
    body = TASK_LIST.dump_json(TASK_LIST.validate_python([task_fields(row) for row in rows]))
    return list_response(body, paging_headers(request, "list_tasks", user_id, query, total), if_none_match)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskPublic,
    summary="Create a task",
    responses={
        201: {
            "headers": RETRYABLE_RESPONSES["headers"]
            | {"Location": {"description": "The new task's URL", "schema": {"type": "string"}}}
        },
        **error_responses(409, 413),
    },
)
def create_task(
    user_id: CurrentUserId,
    new_task: TaskCreate,
    session: SessionDep,
    request: Request,
    settings: AppSettings,
    retry: RetryableRequest,
) -> Response:
    """Store a new task for the user; its URL is in `Location`. Safe to retry with an `Idempotency-Key`."""

    def create() -> Response:
        now = utc_now()
        values = new_task.model_dump() | {"completed_at": now if new_task.completed else None, "now": now}
        task = found(insert_task(session, user_id, values, settings.max_tasks_per_user))
        location = str(user_url(request, "read_task", user_id, task_id=task.id))
        return task_response(task, status.HTTP_201_CREATED, {"Location": location})

    response = respond_once(session, retry, settings.idempotency_ttl_seconds, create)
    session.commit()
    return response


@router.get(
    "/{task_id}",
    response_model=TaskPublic,
    summary="Get one task",
    responses=TASK_HEADERS | NOT_MODIFIED | error_responses(404),
)
def read_task(owned: OwnedTask, session: SessionDep, if_none_match: IfNoneMatch = None) -> Response:
    """The user's task, with its ETag; `304` when `If-None-Match` already names it."""
    row = session.exec(READ_TASK, params=owned).one_or_none()
    session.commit()
    return task_response(found(row), if_none_match=if_none_match)


def apply_changes(owned: OwnedTask, changes: TaskUpdate, session: SessionDep, if_match: str | None) -> Response:
    """Change only the fields sent, in one statement; the change marks move only when something is sent."""
    values: dict[str, Any] = changes.model_dump(exclude_unset=True)
    versions = expected_versions(if_match)
    if not values:  # nothing to change: the task as it is, still under its precondition
        task = found(session.exec(READ_TASK, params=owned).one_or_none())
        session.commit()
        if versions is not None and task.version not in versions:
            raise precondition_failed(task.version)
        return task_response(task)
    if "completed" in values:
        values["completed_at"] = COMPLETED_AT_WHEN_COMPLETED if values["completed"] else None
    statement = change_statement(values, conditional=versions is not None)
    row = apply_change(session, statement, owned | {"now": utc_now()}, versions)
    session.commit()
    return task_response(found(row))


@router.put(
    "/{task_id}", response_model=TaskPublic, summary="Update a task (only the fields sent)", responses=CHANGE_RESPONSES
)
def replace_task(owned: OwnedTask, changes: TaskUpdate, session: SessionDep, if_match: IfMatch = None) -> Response:
    """Change the fields sent; the server-set fields never change."""
    return apply_changes(owned, changes, session, if_match)


@router.patch(
    "/{task_id}", response_model=TaskPublic, summary="Update a task (only the fields sent)", responses=CHANGE_RESPONSES
)
def patch_task(owned: OwnedTask, changes: TaskUpdate, session: SessionDep, if_match: IfMatch = None) -> Response:
    """Change the fields sent; the server-set fields never change."""
    return apply_changes(owned, changes, session, if_match)


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Move a task to the trash",
    responses=error_responses(404, 412),
)
def delete_task(owned: OwnedTask, session: SessionDep, if_match: IfMatch = None) -> None:
    """Move the user's task to the trash, from where it can be restored (`POST /trash/{id}/restore`)."""
    versions = expected_versions(if_match)
    apply_change(session, TRASH_TASK[versions is not None], owned | {"now": utc_now()}, versions)
    session.commit()


@router.patch(
    "/{task_id}/complete",
    response_model=TaskPublic,
    summary="Toggle a task's completion, or set it",
    responses={200: RETRYABLE_RESPONSES, **error_responses(404, 409, 412, 413)},
)
def complete_task(
    owned: OwnedTask,
    session: SessionDep,
    settings: AppSettings,
    retry: RetryableRequest,
    completion: Annotated[CompletionUpdate | None, Body()] = None,
    if_match: IfMatch = None,
) -> Response:
    """Without a body, flip `completed` atomically in the database; with `{"completed": b}`, set it.

    Safe to retry with an `Idempotency-Key`: a retried toggle does not toggle twice.
    """
    sent = completion.model_dump(exclude_unset=True) if completion else {}
    versions = expected_versions(if_match)
    conditional = versions is not None
    statement = SET_COMPLETED[sent["completed"], conditional] if "completed" in sent else TOGGLE_TASK[conditional]

    def complete() -> Response:
        return task_response(found(apply_change(session, statement, owned | {"now": utc_now()}, versions)))

    def would_complete() -> None:
        """The 404 or 412 this toggle would get, for a repeat that finds its key in use."""
        current = session.exec(READ_VERSION, params=owned).scalar_one_or_none()
        if current is None:
            raise task_not_found()
        if versions is not None and current not in versions:
            raise precondition_failed(current)

    response = respond_once(session, retry, settings.idempotency_ttl_seconds, complete, would_complete)
    session.commit()
    return response
