"""Request and response models, and the error type every route raises."""

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from fastapi import HTTPException
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StringConstraints

from models import (
    DESCRIPTION_MAX_LENGTH,
    MAX_TAGS_PER_TASK,
    MAX_TASK_ID,
    TAG_MAX_LENGTH,
    TITLE_MAX_LENGTH,
    Priority,
    as_utc,
)


def storable_text(value: str) -> str:
    """Reject text that a database cannot store: NUL characters and lone surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL (U+0000) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


ISO_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def iso_date_time_text(value: object) -> object:
    """Only ISO 8601 date-time text is a date-time here: not a number, a timestamp string or a bare date."""
    if value is not None and not (isinstance(value, str) and ISO_DATE_TIME.match(value)):
        raise ValueError("must be an ISO 8601 date-time such as 2026-12-01T17:00:00Z")
    return value


def utc_datetime(value: datetime) -> datetime:
    """Bring a date-time to UTC; one without an offset is taken as UTC."""
    try:
        return as_utc(value)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=TITLE_MAX_LENGTH),
    AfterValidator(storable_text),
]
Description = Annotated[str, StringConstraints(max_length=DESCRIPTION_MAX_LENGTH), AfterValidator(storable_text)]
UTCDateTime = Annotated[datetime, BeforeValidator(iso_date_time_text), AfterValidator(utc_datetime)]
SearchText = Annotated[str, StringConstraints(max_length=DESCRIPTION_MAX_LENGTH), AfterValidator(storable_text)]
Tag = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=TAG_MAX_LENGTH),
    AfterValidator(storable_text),
]


def tag_key(tag: str) -> str:
    """What makes two spellings one tag: Unicode lower-casing (`Ärger` and `ärger` are one tag)."""
    return tag.lower()


def distinct_tags(tags: list[str]) -> list[str]:
    """The tags in the order sent, each spelled as first sent, later case-insensitive repeats dropped."""
    first_spellings: dict[str, str] = {}
    for tag in tags:
        first_spellings.setdefault(tag_key(tag), tag)
    if len(first_spellings) > MAX_TAGS_PER_TASK:
        raise ValueError(f"must hold at most {MAX_TAGS_PER_TASK} distinct tags")
    return list(first_spellings.values())


TAGS_DESCRIPTION = (
    f"At most {MAX_TAGS_PER_TASK} tags once case-insensitive repeats are dropped (the first spelling is kept); "
    f"each trimmed, 1-{TAG_MAX_LENGTH} characters"
)
Tags = Annotated[list[Tag], AfterValidator(distinct_tags)]


def _optional_not_null(schema: dict[str, Any]) -> None:
    """Document a field that may be left out but not sent as null."""
    schema.pop("default", None)


class TaskCreate(BaseModel):
    """The body of `POST /tasks`. Server-set fields sent along are ignored."""

    title: Title
    description: Description | None = None
    completed: StrictBool = False
    due_date: UTCDateTime | None = None
    priority: Priority = Priority.none
    tags: Tags = Field(default_factory=list, description=TAGS_DESCRIPTION)


class TaskUpdate(BaseModel):
    """The body of `PUT`/`PATCH`: only the fields sent change; `title`, `completed`, `priority`, `tags` never null."""

    # The None defaults are never validated, so "left out" stays distinct from an explicit null (a 422).
    title: Title = Field(default=None, json_schema_extra=_optional_not_null)  # type: ignore[assignment]
    description: Description | None = None
    completed: StrictBool = Field(default=None, json_schema_extra=_optional_not_null)  # type: ignore[assignment]
    due_date: UTCDateTime | None = None
    priority: Priority = Field(default=None, json_schema_extra=_optional_not_null)  # type: ignore[assignment]
    tags: Tags = Field(  # type: ignore[assignment]
        default=None, description=TAGS_DESCRIPTION + "; `[]` clears them", json_schema_extra=_optional_not_null
    )


class CompletionUpdate(BaseModel):
    """The optional body of `PATCH .../complete`: without `completed`, the task is toggled."""

    completed: StrictBool = Field(default=None, json_schema_extra=_optional_not_null)  # type: ignore[assignment]


class TaskPublic(BaseModel):
    """A task as the API returns it; every date-time is UTC with an explicit offset."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    user_id: str
    title: str
    description: str | None
    completed: bool
    completed_at: datetime | None = Field(description="When the task was last completed; null while it is pending")
    priority: Priority
    tags: list[str]
    due_date: datetime | None
    created_at: datetime
    updated_at: datetime
    version: int = Field(description="One more on every change; the task's ETag is this number in quotes")


class TrashedTask(TaskPublic):
    """A task in the trash, with when it was put there."""

    deleted_at: datetime


class FeedTask(TaskPublic):
    """A task's current state in the changes feed: `deleted_at` is set while it is in the trash."""

    deleted_at: datetime | None


class DeletedTask(BaseModel):
    """A task deleted for good, in the changes feed."""

    id: int
    deleted: Literal[True]


class ChangesPage(BaseModel):
    """One page of the changes feed."""

    changes: list[FeedTask | DeletedTask] = Field(description="In the order of the changes, each task once")
    cursor: str = Field(description="Opaque: send it back as `since` for the changes after this page")
    has_more: bool = Field(description="When true, ask again at once with the new cursor")


class TagCount(BaseModel):
    """A tag on the user's live tasks and on how many of them."""

    name: str = Field(description="Spelled as on the oldest task that carries it")
    count: int


class TaskStatus(StrEnum):
    """Which tasks a list shows."""

    all = "all"
    pending = "pending"
    completed = "completed"


class TaskSort(StrEnum):
    """What a list is ordered by."""

    created = "created"
    updated = "updated"
    title = "title"
    due_date = "due_date"
    priority = "priority"
    completed_at = "completed_at"


class SortOrder(StrEnum):
    """The direction of a list's order."""

    asc = "asc"
    desc = "desc"


class HealthStatus(BaseModel):
    """The body of `GET /health`."""

    status: Literal["healthy", "unhealthy"]
    database: Literal["ok", "unreachable"]


class ServiceInfo(BaseModel):
    """The body of `GET /`."""

    message: str
    version: str
    docs: str


class ErrorResponse(BaseModel):
    """Every error but a validation error: a human-readable `detail` and a stable `code`."""

    detail: str
    code: str


class ValidationIssue(BaseModel):
    """One problem with the request, as FastAPI reports it."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """A `422`: FastAPI's usual list of issues, and the code `validation_error` (or `idempotency_key_reused`
    for an `Idempotency-Key` sent again with a different request)."""

    detail: list[ValidationIssue]
    code: Literal["validation_error", "idempotency_key_reused"]


class ApiError(HTTPException):
    """An HTTP error with a stable `code`; raised by routes and dependencies, rendered in `main.py`.

    `detail` is a sentence, or for a `422` the usual list of `{loc, msg, type}` issues.
    """

    def __init__(
        self, status_code: int, detail: str | list[dict[str, Any]], code: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.code = code


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses, each with its error model."""
    descriptions = {
        401: "Missing, malformed, expired or badly signed token",
        403: "The path's user is not the token's user",
        404: "No such task for this user",
        409: "The Idempotency-Key's first request is still being processed, or the task quota is full",
        410: "The cursor is older than the oldest change the server remembers: sync again without `since`",
        412: "If-Match did not match the task's current ETag: nothing was changed",
        413: "Request body over 1 MiB",
        422: "Invalid query, path, header or body",
        503: "Database or signing keys unreachable",
    }
    challenge = {"WWW-Authenticate": {"description": "Always `Bearer`", "schema": {"type": "string"}}}
    return {
        code: {
            "model": ValidationErrorResponse if code == 422 else ErrorResponse,
            "description": descriptions[code],
        }
        | ({"headers": challenge} if code == 401 else {})
        for code in status_codes
    }


class PageQuery(BaseModel):
    """Paging by `limit` and `offset`."""

    limit: int = Field(default=100, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=MAX_TASK_ID)


class TaskListQuery(PageQuery):
    """The query of `GET /tasks`: filter, order and page."""

    status: TaskStatus = TaskStatus.all
    sort: TaskSort = TaskSort.created
    order: SortOrder | None = Field(
        default=None, description="Default: asc for title and due_date, desc for the others"
    )
    q: SearchText | None = Field(default=None, description="Case-insensitive text inside the title or description")
    priority: list[Priority] | None = Field(default=None, description="Repeatable: tasks with any of these")
    tag: list[Tag] | None = Field(
        default=None,
        max_length=MAX_TAGS_PER_TASK,
        description=f"Repeatable (at most {MAX_TAGS_PER_TASK}): tasks carrying every one of these, case-insensitively",
    )
    due_after: UTCDateTime | None = Field(default=None, description="Tasks due at or after this (no offset: UTC)")
    due_before: UTCDateTime | None = Field(default=None, description="Tasks due before this (no offset: UTC)")


class ChangesQuery(BaseModel):
    """The query of `GET /changes`."""

    since: str | None = Field(default=None, max_length=200, description="A cursor from an earlier page")
    limit: int = Field(default=100, ge=1, le=500)
