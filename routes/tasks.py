"""The task routes: every one acts only on the token's user's tasks."""

from functools import cache
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response, status
from pydantic import TypeAdapter
from sqlalchemy import Row, Select, and_, bindparam, delete, func, insert, not_, or_, select, update
from starlette.datastructures import URL

from auth import CurrentUserId
from database import SessionDep
from models import MAX_TASK_ID, Task, utc_now
from schemas import (
    ApiError,
    CompletionUpdate,
    SortOrder,
    TaskCreate,
    TaskListQuery,
    TaskPublic,
    TaskSort,
    TaskStatus,
    TaskUpdate,
    error_responses,
)

router = APIRouter(
    prefix="/api/{user_id}/tasks",
    tags=["tasks"],
    responses=error_responses(401, 403, 422, 503),
)

# Routes work on the table's rows, not ORM objects: a task is read only to be serialised, so there is
# nothing for the ORM to track. Statements are built once, with bound parameters, not per request.
tasks = Task.__table__
column = tasks.c
# Every statement returns the public fields, in TaskPublic's order (see `task_fields`).
TASK_FIELDS = tuple(TaskPublic.model_fields)
TASK_COLUMNS = tuple(column[name] for name in TASK_FIELDS)

# The one rule for every single-task statement: this id, and this user's.
IS_OWNED = and_(column.id == bindparam("task_id"), column.user_id == bindparam("owner_id"))
READ_TASK = select(*TASK_COLUMNS).where(IS_OWNED)
TOGGLE_TASK = (
    update(tasks)
    .where(IS_OWNED)
    .values(completed=not_(column.completed), updated_at=bindparam("now"))
    .returning(*TASK_COLUMNS)
)
SET_COMPLETED = (
    update(tasks)
    .where(IS_OWNED)
    .values(completed=bindparam("new_completed"), updated_at=bindparam("now"))
    .returning(*TASK_COLUMNS)
)
DELETE_TASK = delete(tasks).where(IS_OWNED).returning(column.id)
CREATE_TASK = insert(tasks).returning(*TASK_COLUMNS)

SORT_KEYS = {
    TaskSort.created: column.created_at,
    TaskSort.updated: column.updated_at,
    TaskSort.title: func.lower(column.title),
    TaskSort.due_date: column.due_date,
}
DEFAULT_ORDER = {
    TaskSort.created: SortOrder.desc,
    TaskSort.updated: SortOrder.desc,
    TaskSort.title: SortOrder.asc,
    TaskSort.due_date: SortOrder.asc,
}
TASK_NOT_FOUND = error_responses(404)
TASK_LIST = TypeAdapter(list[TaskPublic])
MAX_TASK_ID_DIGITS = len(str(MAX_TASK_ID))


def task_not_found() -> ApiError:
    """The one answer for a task that is missing or belongs to someone else."""
    return ApiError(404, "Task not found", "task_not_found")


async def get_owned_task(
    user_id: CurrentUserId,
    task_id: Annotated[str, Path(pattern=r"^-?[0-9]+$", description="The task's id (an integer)")],
) -> dict[str, object]:
    """The parameters of `IS_OWNED` for this user's task `task_id`; 404 at once for an id no task can have.

    The id is taken as digits, not parsed by pydantic, because an integer of any length (even past
    the 4300 digits Python parses by default) is a 404, not a 422; leading zeros do not count.
    """
    digits = task_id.lstrip("0")
    if task_id.startswith("-") or not digits or len(digits) > MAX_TASK_ID_DIGITS or int(digits) > MAX_TASK_ID:
        raise task_not_found()
    return {"task_id": int(digits), "owner_id": user_id}


OwnedTask = Annotated[dict[str, object], Depends(get_owned_task)]


def as_json(
    content: TaskPublic | list[TaskPublic], status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """The task(s) as a ready JSON response.

    Returning a Response spares FastAPI validating again the model the route just built, which for
    a sync route would also cost a second trip through the thread pool. The routes' `response_model`
    still documents the body.
    """
    body = content.model_dump_json() if isinstance(content, TaskPublic) else TASK_LIST.dump_json(content)
    return Response(body, status_code, headers, media_type="application/json")


def task_fields(row: Row) -> dict[str, Any]:
    """A task row's public fields by name.

    Pydantic reads a dict many times faster than a row's attributes, which matters on a page of 50.
    """
    return dict(zip(TASK_FIELDS, row, strict=False))  # a list row also carries its `total` last


def found(row: Row | None) -> TaskPublic:
    """The task a statement matched, or 404."""
    if row is None:
        raise task_not_found()
    return TaskPublic.model_validate(task_fields(row))


@cache
def list_statements(
    shown: TaskStatus, sort: TaskSort, order: SortOrder, searching: bool
) -> tuple[Select[Any], Select[Any]]:
    """The page and the count statements of one kind of list query, built once.

    Parameters: `owner_id`, `pattern` (when searching), `limit`, `offset`. The order is total: the
    sort key (tasks without a due date last), then the id, in the same direction.
    """
    conditions = [column.user_id == bindparam("owner_id")]
    if shown is not TaskStatus.all:
        conditions.append(column.completed.is_(shown is TaskStatus.completed))
    if searching:
        pattern = bindparam("pattern")
        conditions.append(or_(column.title.ilike(pattern, escape="\\"), column.description.ilike(pattern, escape="\\")))
    matches = and_(*conditions)
    key = SORT_KEYS[sort]
    primary = key.desc() if order is SortOrder.desc else key.asc()
    if sort is TaskSort.due_date:
        primary = primary.nulls_last()
    tiebreak = column.id.desc() if order is SortOrder.desc else column.id.asc()
    page = (
        select(*TASK_COLUMNS, func.count().over().label("total"))
        .where(matches)
        .order_by(primary, tiebreak)
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    return page, select(func.count()).select_from(tasks).where(matches)


def search_pattern(text: str) -> str:
    """A LIKE pattern matching `text` literally anywhere."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def user_url(request: Request, route_name: str, user_id: str, **path_params: object) -> URL:
    """The absolute URL of one of `user_id`'s routes, the user id percent-encoded (any Unicode, `?`, `#`, `%`)."""
    return request.url_for(route_name, user_id=quote(user_id, safe=""), **path_params)


def page_link_header(request: Request, route_name: str, user_id: str, query: TaskListQuery, total: int) -> str | None:
    """An RFC 8288 `Link` header with the next and previous pages, when there are any.

    The links keep the request's own query, with the page's `offset` and `limit` replaced.
    """
    links = []
    this_page = user_url(request, route_name, user_id).replace(query=request.url.query)
    if query.offset + query.limit < total:
        next_url = this_page.include_query_params(offset=query.offset + query.limit, limit=query.limit)
        links.append(f'<{next_url}>; rel="next"')
    if query.offset > 0:
        previous_offset = max(0, min(query.offset, total) - query.limit)
        previous_url = this_page.include_query_params(offset=previous_offset, limit=query.limit)
        links.append(f'<{previous_url}>; rel="prev"')
    return ", ".join(links) or None


@router.get(
    "",
    response_model=list[TaskPublic],
    summary="List the user's tasks",
    responses={
        200: {
            "headers": {
                "X-Total-Count": {
                    "description": "Matching tasks, ignoring limit/offset",
                    "schema": {"type": "integer"},
                },
                "Link": {
                    "description": 'RFC 8288 links to the rel="next" and rel="prev" pages',
                    "schema": {"type": "string"},
                },
            }
        }
    },
)
def list_tasks(
    user_id: CurrentUserId,
    query: Annotated[TaskListQuery, Query()],
    session: SessionDep,
    request: Request,
) -> Response:
    """One page of the user's tasks, with the total in `X-Total-Count`, in one query."""
    order = query.order or DEFAULT_ORDER[query.sort]
    page, count = list_statements(query.status, query.sort, order, bool(query.q))
    params = {"owner_id": user_id, "limit": query.limit, "offset": query.offset}
    if query.q:
        params["pattern"] = search_pattern(query.q)
    rows = session.exec(page, params=params).all()
    if rows:
        total = rows[0].total
    elif query.offset == 0:
        total = 0
    else:  # past the last page: the window count has no row to ride on
        total = session.exec(count, params=params).scalar_one()
    session.commit()
    headers = {"X-Total-Count": str(total)}
    if link := page_link_header(request, "list_tasks", user_id, query, total):
        headers["Link"] = link
    return as_json(TASK_LIST.validate_python([task_fields(row) for row in rows]), headers=headers)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskPublic,
    summary="Create a task",
    responses={
        201: {"headers": {"Location": {"description": "The new task's URL", "schema": {"type": "string"}}}},
        **error_responses(413),
    },
)
def create_task(
    user_id: CurrentUserId,
    new_task: TaskCreate,
    session: SessionDep,
    request: Request,
) -> Response:
    """Store a new task for the user; its URL is in `Location`."""
    now = utc_now()
    values = new_task.model_dump() | {"user_id": user_id, "created_at": now, "updated_at": now}
    task = found(session.exec(CREATE_TASK, params=values).one())
    session.commit()
    location = str(user_url(request, "read_task", user_id, task_id=task.id))
    return as_json(task, status.HTTP_201_CREATED, {"Location": location})


@router.get("/{task_id}", response_model=TaskPublic, summary="Get one task", responses=TASK_NOT_FOUND)
def read_task(owned: OwnedTask, session: SessionDep) -> Response:
    """The user's task."""
    row = session.exec(READ_TASK, params=owned).one_or_none()
    session.commit()
    return as_json(found(row))


def apply_changes(owned: OwnedTask, changes: TaskUpdate, session: SessionDep) -> Response:
    """Change only the fields sent, in one statement; `updated_at` moves only when something is sent."""
    values = changes.model_dump(exclude_unset=True)
    if not values:
        return read_task(owned, session)
    statement = update(tasks).where(IS_OWNED).values(**values, updated_at=utc_now()).returning(*TASK_COLUMNS)
    row = session.exec(statement, params=owned).one_or_none()
    session.commit()
    return as_json(found(row))


@router.put(
    "/{task_id}",
    response_model=TaskPublic,
    summary="Update a task (only the fields sent)",
    responses=error_responses(404, 413),
)
def replace_task(owned: OwnedTask, changes: TaskUpdate, session: SessionDep) -> Response:
    """Change the fields sent; the server-set fields never change."""
    return apply_changes(owned, changes, session)


@router.patch(
    "/{task_id}",
    response_model=TaskPublic,
    summary="Update a task (only the fields sent)",
    responses=error_responses(404, 413),
)
def patch_task(owned: OwnedTask, changes: TaskUpdate, session: SessionDep) -> Response:
    """Change the fields sent; the server-set fields never change."""
    return apply_changes(owned, changes, session)


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a task",
    responses=TASK_NOT_FOUND,
)
def delete_task(owned: OwnedTask, session: SessionDep) -> None:
    """Remove the user's task for good."""
    deleted = session.exec(DELETE_TASK, params=owned).one_or_none()
    session.commit()
    if deleted is None:
        raise task_not_found()


@router.patch(
    "/{task_id}/complete",
    response_model=TaskPublic,
    summary="Toggle a task's completion, or set it",
    responses=error_responses(404, 413),
)
def complete_task(
    owned: OwnedTask,
    session: SessionDep,
    completion: Annotated[CompletionUpdate | None, Body()] = None,
) -> Response:
    """Without a body, flip `completed` atomically in the database; with `{"completed": b}`, set it."""
    sent = completion.model_dump(exclude_unset=True) if completion else {}
    if "completed" in sent:
        row = session.exec(
            SET_COMPLETED, params=owned | {"new_completed": sent["completed"], "now": utc_now()}
        ).one_or_none()
    else:
        row = session.exec(TOGGLE_TASK, params=owned | {"now": utc_now()}).one_or_none()
    session.commit()
    return as_json(found(row))
