"""The task routes: every one acts only on the token's user's tasks."""

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response, status
from sqlalchemy import ColumnElement, and_, delete, func, not_, or_, update
from sqlmodel import select

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

SORT_KEYS = {
    TaskSort.created: Task.created_at,
    TaskSort.updated: Task.updated_at,
    TaskSort.title: func.lower(Task.title),
    TaskSort.due_date: Task.due_date,
}
DEFAULT_ORDER = {
    TaskSort.created: SortOrder.desc,
    TaskSort.updated: SortOrder.desc,
    TaskSort.title: SortOrder.asc,
    TaskSort.due_date: SortOrder.asc,
}
TASK_NOT_FOUND = error_responses(404)
MAX_TASK_ID_DIGITS = len(str(MAX_TASK_ID))


def task_not_found() -> ApiError:
    """The one answer for a task that is missing or belongs to someone else."""
    return ApiError(404, "Task not found", "task_not_found")


def get_owned_task_filter(
    user_id: CurrentUserId,
    task_id: Annotated[str, Path(pattern=r"^-?[0-9]+$", description="The task's id (an integer)")],
) -> ColumnElement[bool]:
    """A filter matching exactly this user's task `task_id`; 404 at once for an id no task can have.

    The id is taken as digits, not parsed by pydantic, because an integer of any length (even past
    the 4300 digits Python parses by default) is a 404, not a 422.
    """
    if len(task_id) > MAX_TASK_ID_DIGITS or not 1 <= int(task_id) <= MAX_TASK_ID:
        raise task_not_found()
    return and_(Task.id == int(task_id), Task.user_id == user_id)


OwnedTaskFilter = Annotated[ColumnElement[bool], Depends(get_owned_task_filter)]


def found(task: Task | None) -> Task:
    """The task a statement matched, or 404."""
    if task is None:
        raise task_not_found()
    return task


def list_filter(user_id: str, query: TaskListQuery) -> ColumnElement[bool]:
    """The tasks a list query matches."""
    conditions = [Task.user_id == user_id]
    if query.status is not TaskStatus.all:
        conditions.append(Task.completed.is_(query.status is TaskStatus.completed))
    if query.q:
        pattern = "%" + query.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        conditions.append(or_(Task.title.ilike(pattern, escape="\\"), Task.description.ilike(pattern, escape="\\")))
    return and_(*conditions)


def list_order(query: TaskListQuery) -> list[ColumnElement[object]]:
    """A total order: the sort key (tasks without a due date last), then the id, same direction."""
    descending = (query.order or DEFAULT_ORDER[query.sort]) is SortOrder.desc
    key = SORT_KEYS[query.sort]
    primary = key.desc() if descending else key.asc()
    if query.sort is TaskSort.due_date:
        primary = primary.nulls_last()
    return [primary, Task.id.desc() if descending else Task.id.asc()]


def page_link_header(request: Request, query: TaskListQuery, total: int) -> str | None:
    """An RFC 8288 `Link` header with the next and previous pages, when there are any."""
    links = []
    if query.offset + query.limit < total:
        next_url = request.url.include_query_params(offset=query.offset + query.limit, limit=query.limit)
        links.append(f'<{next_url}>; rel="next"')
    if query.offset > 0:
        previous_offset = max(0, min(query.offset, total) - query.limit)
        previous_url = request.url.include_query_params(offset=previous_offset, limit=query.limit)
        links.append(f'<{previous_url}>; rel="prev"')
    return ", ".join(links) or None


@router.get(
    "",
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
    response: Response,
) -> list[TaskPublic]:
    """One page of the user's tasks, with the total in `X-Total-Count`, in one query."""
    matches = list_filter(user_id, query)
    statement = (
        select(Task, func.count().over().label("total"))
        .where(matches)
        .order_by(*list_order(query))
        .limit(query.limit)
        .offset(query.offset)
    )
    rows = session.exec(statement).all()
    if rows:
        total = rows[0].total
    elif query.offset == 0:
        total = 0
    else:  # past the last page: the window count has no row to ride on
        total = session.exec(select(func.count()).select_from(Task).where(matches)).one()
    response.headers["X-Total-Count"] = str(total)
    if link := page_link_header(request, query, total):
        response.headers["Link"] = link
    return [TaskPublic.model_validate(row.Task) for row in rows]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
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
    response: Response,
) -> TaskPublic:
    """Store a new task for the user; its URL is in `Location`."""
    now = utc_now()
    task = Task(**new_task.model_dump(), user_id=user_id, created_at=now, updated_at=now)
    session.add(task)
    session.commit()
    response.headers["Location"] = str(request.url_for("read_task", user_id=user_id, task_id=task.id))
    return TaskPublic.model_validate(task)


@router.get("/{task_id}", summary="Get one task", responses=TASK_NOT_FOUND)
def read_task(is_owned: OwnedTaskFilter, session: SessionDep) -> TaskPublic:
    """The user's task."""
    return TaskPublic.model_validate(found(session.exec(select(Task).where(is_owned)).first()))


def apply_changes(is_owned: ColumnElement[bool], changes: TaskUpdate, session: SessionDep) -> TaskPublic:
    """Change only the fields sent, in one statement; `updated_at` moves only when something is sent."""
    values = changes.model_dump(exclude_unset=True)
    if not values:
        return read_task(is_owned, session)
    statement = update(Task).where(is_owned).values(**values, updated_at=utc_now()).returning(Task)
    task = found(session.exec(statement).scalar_one_or_none())
    session.commit()
    return TaskPublic.model_validate(task)


@router.put("/{task_id}", summary="Update a task (only the fields sent)", responses=error_responses(404, 413))
def replace_task(is_owned: OwnedTaskFilter, changes: TaskUpdate, session: SessionDep) -> TaskPublic:
    """Change the fields sent; the server-set fields never change."""
    return apply_changes(is_owned, changes, session)


@router.patch("/{task_id}", summary="Update a task (only the fields sent)", responses=error_responses(404, 413))
def patch_task(is_owned: OwnedTaskFilter, changes: TaskUpdate, session: SessionDep) -> TaskPublic:
    """Change the fields sent; the server-set fields never change."""
    return apply_changes(is_owned, changes, session)


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a task",
    responses=TASK_NOT_FOUND,
)
def delete_task(is_owned: OwnedTaskFilter, session: SessionDep) -> None:
    """Remove the user's task for good."""
    found(session.exec(delete(Task).where(is_owned).returning(Task.id)).scalar_one_or_none())
    session.commit()


@router.patch(
    "/{task_id}/complete",
    summary="Toggle a task's completion, or set it",
    responses=error_responses(404, 413),
)
def complete_task(
    is_owned: OwnedTaskFilter,
    session: SessionDep,
    completion: Annotated[CompletionUpdate | None, Body()] = None,
) -> TaskPublic:
    """Without a body, flip `completed` atomically in the database; with `{"completed": b}`, set it."""
    sent = completion.model_dump(exclude_unset=True) if completion else {}
    new_value = sent.get("completed", not_(Task.completed))
    statement = update(Task).where(is_owned).values(completed=new_value, updated_at=utc_now()).returning(Task)
    task = found(session.exec(statement).scalar_one_or_none())
    session.commit()
    return TaskPublic.model_validate(task)
