"""The tags list: every tag on the user's live tasks, with how many carry it."""

from fastapi import APIRouter, Response
from pydantic import TypeAdapter
from sqlalchemy import bindparam, func, select

from auth import CurrentUserId
from database import SessionDep
from responses import ETAG_HEADER, NOT_MODIFIED, IfNoneMatch, list_response
from schemas import TagCount, error_responses
from store import IS_LIVE, column, task_tags, tasks

router = APIRouter(prefix="/api/{user_id}/tags", tags=["tags"], responses=error_responses(401, 403, 422, 503))

TAG_COUNTS = TypeAdapter(list[TagCount])
# One row per tag key: its spelling on the oldest live task that carries it, and how many live tasks do.
USES = (
    select(
        task_tags.c.tag_key,
        task_tags.c.name,
        func.count().over(partition_by=task_tags.c.tag_key).label("uses"),
        func.row_number()
        .over(partition_by=task_tags.c.tag_key, order_by=(column.created_at, column.id))
        .label("age_rank"),
    )
    .join(tasks, column.id == task_tags.c.task_id)
    # The owner on both sides, so both tables are read by their user's index range.
    .where(task_tags.c.user_id == bindparam("owner_id"), column.user_id == bindparam("owner_id"), IS_LIVE)
    .subquery("uses")
)
READ_TAGS = select(USES.c.tag_key, USES.c.name, USES.c.uses).where(USES.c.age_rank == 1)


@router.get(
    "",
    response_model=list[TagCount],
    summary="List the tags on the user's live tasks, most used first",
    responses={200: {"headers": ETAG_HEADER}, **NOT_MODIFIED},
)
def list_tags(user_id: CurrentUserId, session: SessionDep, if_none_match: IfNoneMatch = None) -> Response:
    """Every tag on the user's live tasks with its count, most used first, then by name case-insensitively.

    The order is applied here rather than in SQL so that it is the same code-point order on every database.
    """
    rows = session.exec(READ_TAGS, params={"owner_id": user_id}).all()
    session.commit()
    ordered = sorted(rows, key=lambda row: (-row.uses, row.tag_key))
    body = TAG_COUNTS.dump_json([TagCount(name=row.name, count=row.uses) for row in ordered])
    return list_response(body, {}, if_none_match)
