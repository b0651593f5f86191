"""The reference app's routes on the service's fixed stack, for the benchmark's `floor` target.

The same hand-written SQL, PyJWT check and stdlib JSON as `reference_app.py`, but served the way the
service must be built: FastAPI with plain `def` routes (run in FastAPI's thread pool) and one
synchronous SQLModel `Session` per request, on the service's own engine (`create_db_engine`). No
validation, no dependencies, no middleware.

It measures what the stack itself costs before any of the contract's work: whatever the service
does, it cannot be faster than this. Run: ``uvicorn bench.stack_floor_app:app`` from the repository
root, with ``DATABASE_URL`` and ``BETTER_AUTH_SECRET`` set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request, Response
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session

from bench.reference_app import (
    COLUMNS,
    LIVE,
    SCHEMA,
    TOTAL,
    UPDATABLE,
    HTTPError,
    authorize,
    clean_tags,
    conninfo_from_env,
    json_response,
    on_http_error,
    priority_rank,
    task_json,
)
from database import create_db_engine
from settings import normalize_database_url

# The service's own engine: the same pool, driver settings and connection checks.
engine = create_db_engine(normalize_database_url(conninfo_from_env()))


# Statements are built once, as the service's are.
# One page and one count for the plain list, one each for the tag filter (`tags`: the lower-cased keys).
LIST_PAGE, TAGGED_PAGE = (
    text(
        f"SELECT {COLUMNS}, count(*) OVER () FROM tasks WHERE user_id = :user AND {LIVE}{tagged} "
        "ORDER BY created_at DESC, id DESC LIMIT :limit OFFSET :offset"
    )
    for tagged in ("", " AND tag_keys @> :tags")
)
COUNT, TAGGED_COUNT = (
    text(f"SELECT count(*) FROM tasks WHERE user_id = :user AND {LIVE}{tagged}")
    for tagged in ("", " AND tag_keys @> :tags")
)
INSERT = text(
    "INSERT INTO tasks (user_id, title, description, completed, completed_at, priority, tags, tag_keys, due_date) "
    "VALUES (:user, :title, :description, :completed, CASE WHEN :completed THEN now() END, :priority, :tags,"
    f" :tag_keys, :due_date) RETURNING {COLUMNS}"
)
READ = text(f"SELECT {COLUMNS} FROM tasks WHERE id = :id AND user_id = :user AND {LIVE}")
TRASH = text(
    "UPDATE tasks SET deleted_at = now(), version = version + 1, updated_at = now()"
    f" WHERE id = :id AND user_id = :user AND {LIVE} RETURNING id"
)
SET_COMPLETED_AT = "completed_at = CASE WHEN NOT :completed THEN NULL WHEN completed THEN completed_at ELSE now() END"
SET_COMPLETED, TOGGLE = (
    text(
        f"UPDATE tasks SET {change}, version = version + 1, updated_at = now()"
        f" WHERE id = :id AND user_id = :user AND {LIVE} RETURNING {COLUMNS}"
    )
    for change in (
        f"completed = :completed, {SET_COMPLETED_AT}",
        "completed = NOT completed, completed_at = CASE WHEN completed THEN NULL ELSE now() END",
    )
)
SELECT_ONE = text("SELECT 1")


def one_row(statement: Any, params: dict[str, Any]) -> Any:
    """Run one statement in a per-request SQLModel session; its first row, or None."""
    with Session(engine) as session:
        row = session.exec(statement, params=params).first()  # type: ignore[call-overload]
        session.commit()
    return row


def found(row: Any, status: int = 200) -> Response:
    """The task as JSON with its ETag, or 404."""
    if row is None:
        raise HTTPError(404, "Task not found", "task_not_found")
    return json_response(task_json(row), status, {"ETag": f'"{row[11]}"'})


JsonObject = Annotated[dict[str, Any] | None, Body()]


async def on_db_error(_: Request, error: Exception) -> Response:
    """503 when the database is unreachable, 422 for data it refused."""
    if isinstance(error, OperationalError):
        return json_response({"detail": "Database unavailable", "code": "db_unavailable"}, 503)
    return json_response({"detail": "Invalid data", "code": "validation_error"}, 422)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    """Create the table (serialised across workers by an advisory lock)."""
    with engine.connect() as connection:  # autocommit: a session-level lock, not a transaction's
        connection.exec_driver_sql("SELECT pg_advisory_lock(742113)")
        try:
            connection.exec_driver_sql(SCHEMA)
        finally:
            connection.exec_driver_sql("SELECT pg_advisory_unlock(742113)")
    yield
    engine.dispose()


app = FastAPI(
    openapi_url=None,
    lifespan=lifespan,
    exception_handlers={HTTPError: on_http_error, DBAPIError: on_db_error},
)


@app.get("/health")
def health() -> Response:
    """200 when the database answers."""
    try:
        one_row(SELECT_ONE, {})
    except OperationalError:
        return json_response({"status": "unhealthy", "database": "unreachable"}, 503)
    return json_response({"status": "healthy", "database": "ok"})


@app.get("/api/{user_id}/tasks")
def list_tasks(request: Request, limit: int = 100, offset: int = 0) -> Response:
    """Live tasks newest first, `tag` (repeatable: all of them), with `X-Total-Count`."""
    user = authorize(request)
    tag_keys = [tag.strip().lower() for tag in request.query_params.getlist("tag")]
    page, count = (TAGGED_PAGE, TAGGED_COUNT) if tag_keys else (LIST_PAGE, COUNT)
    params = {"user": user, "tags": tag_keys}
    with Session(engine) as session:
        rows = session.exec(page, params=params | {"limit": limit, "offset": offset}).all()  # type: ignore[call-overload]
        total = rows[0][TOTAL] if rows else session.exec(count, params=params).scalar_one()  # type: ignore[call-overload]
        session.commit()
    return json_response([task_json(row) for row in rows], headers={"X-Total-Count": str(total)})


@app.post("/api/{user_id}/tasks")
def create_task(request: Request, data: JsonObject = None) -> Response:
    """201 with the task and `Location`."""
    user = authorize(request)
    data = data or {}
    title = data.get("title")
    if not isinstance(title, str) or not 1 <= len(title.strip()) <= 200:
        raise HTTPError(422, "title must be 1-200 characters", "validation_error")
    tags, tag_keys = clean_tags(data.get("tags", []))
    row = one_row(
        INSERT,
        {
            "user": user,
            "title": title.strip(),
            "description": data.get("description"),
            "completed": bool(data.get("completed", False)),
            "priority": priority_rank(data.get("priority", "none")),
            "tags": tags,
            "tag_keys": tag_keys,
            "due_date": data.get("due_date"),
        },
    )
    response = found(row, 201)
    response.headers["Location"] = f"/api/{user}/tasks/{row[0]}"
    return response


@app.get("/api/{user_id}/tasks/{task_id}")
def get_task(request: Request, task_id: int) -> Response:
    """One task."""
    user = authorize(request)
    return found(one_row(READ, {"id": task_id, "user": user}))


@app.api_route("/api/{user_id}/tasks/{task_id}", methods=["PUT", "PATCH"])
def update_task(request: Request, task_id: int, data: JsonObject = None) -> Response:
    """Only the fields sent change."""
    user = authorize(request)
    data = data or {}
    fields = [name for name in UPDATABLE if name in data]
    params = {name: data[name] for name in fields} | {"id": task_id, "user": user}
    assignments = [f"{name} = :{name}" for name in fields]
    if "completed" in data:
        assignments.append(SET_COMPLETED_AT)
    if "priority" in data:
        assignments.append("priority = :priority")
        params["priority"] = priority_rank(data["priority"])
    if "tags" in data:
        assignments.append("tags = :tags, tag_keys = :tag_keys")
        params["tags"], params["tag_keys"] = clean_tags(data["tags"])
    statement = READ
    if assignments:
        statement = text(
            f"UPDATE tasks SET {', '.join(assignments)}, version = version + 1, updated_at = now()"
            f" WHERE id = :id AND user_id = :user AND {LIVE} RETURNING {COLUMNS}"
        )
    return found(one_row(statement, params))


@app.delete("/api/{user_id}/tasks/{task_id}")
def delete_task(request: Request, task_id: int) -> Response:
    """To the trash: 204, or 404."""
    user = authorize(request)
    if one_row(TRASH, {"id": task_id, "user": user}) is None:
        raise HTTPError(404, "Task not found", "task_not_found")
    return Response(status_code=204)


@app.patch("/api/{user_id}/tasks/{task_id}/complete")
def complete_task(request: Request, task_id: int, data: JsonObject = None) -> Response:
    """Toggle, or set `completed` when sent."""
    user = authorize(request)
    data = data or {}
    if "completed" in data:
        return found(one_row(SET_COMPLETED, {"id": task_id, "user": user, "completed": bool(data["completed"])}))
    return found(one_row(TOGGLE, {"id": task_id, "user": user}))
