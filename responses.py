"""HTTP responses the routers share: JSON serialised once, ETags and conditional requests, paging headers,
and the URLs of a user's resources."""

import hashlib
import re
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Header, Request, Response
from pydantic import BaseModel, TypeAdapter
from starlette.datastructures import URL

from schemas import PageQuery, TaskPublic
from store import task_etag

TASK_LIST = TypeAdapter(list[TaskPublic])
# If-Match / If-None-Match: a comma-separated list whose members are `*` or entity tags, weak or strong.
LIST_MEMBER = re.compile(r'\s*((?:W/)?"[^"]*"|[^,]*?)\s*(?:,|$)')
ENTITY_TAG = re.compile(r'\*|(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"')
# A task's strong ETag exactly as `task_etag` spells it: ASCII digits, no leading zero (`"02"` is not `"2"`).
VERSION_TAG = re.compile(r'"(0|[1-9][0-9]{0,9})"')

IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description="Change the task only if its current ETag is one of these (strong comparison), or `*`: "
        "otherwise 412 and nothing changes",
    ),
]
IfNoneMatch = Annotated[
    str | None,
    Header(
        alias="If-None-Match",
        description="304 without a body when the current ETag is one of these (weak comparison), or `*`",
    ),
]
ETAG_HEADER = {"ETag": {"description": "The resource's current entity tag", "schema": {"type": "string"}}}
NOT_MODIFIED = {304: {"description": "Not modified: If-None-Match matched (no body)", "headers": ETAG_HEADER}}


def entity_tags(header: str) -> list[str]:
    """The members of an If-Match / If-None-Match header; a member that is not an entity tag is left out."""
    members, position = [], 0
    while position < len(header):
        member = LIST_MEMBER.match(header, position)
        if member is None or member.end() == position:
            break
        members.append(member.group(1))
        position = member.end()
    return [member for member in members if ENTITY_TAG.fullmatch(member)]


def expected_versions(if_match: str | None) -> list[int] | None:
    """The task versions an `If-Match` accepts, or None when it sets no condition (absent, or `*`).

    Strong comparison: a weak tag (`W/"3"`), or anything that is not one of our tags, matches nothing.
    """
    if if_match is None:
        return None
    tags = entity_tags(if_match)
    if "*" in tags:
        return None
    return [int(version.group(1)) for tag in tags if (version := VERSION_TAG.fullmatch(tag))]


def none_match(if_none_match: str | None, etag: str) -> bool:
    """Whether `If-None-Match` matches `etag` (weak comparison; `*` matches any current resource)."""
    if if_none_match is None:
        return False
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in entity_tags(if_none_match))


def not_modified(etag: str) -> Response:
    """A `304`: the client's copy is current."""
    return Response(status_code=304, headers={"ETag": etag})


def as_json(content: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A model as a ready JSON response.

    Returning a Response spares FastAPI validating again the model the route just built, which for
    a sync route would also cost a second trip through the thread pool. The routes' `response_model`
    still documents the body.
    """
    return Response(content.model_dump_json(), status_code, headers, media_type="application/json")


def task_response(
    task: TaskPublic, status_code: int = 200, headers: dict[str, str] | None = None, if_none_match: str | None = None
) -> Response:
    """One task as JSON with its ETag; a `304` when `If-None-Match` already names it."""
    etag = task_etag(task.version)
    if none_match(if_none_match, etag):
        return not_modified(etag)
    return as_json(task, status_code, {"ETag": etag, **(headers or {})})


def list_response(body: bytes, headers: dict[str, str], if_none_match: str | None) -> Response:
    """A list as JSON, with a strong ETag of its whole content (the items and the paging headers)."""
    digest = hashlib.blake2b(body, digest_size=16)
    for name in sorted(headers):
        digest.update(f"\n{name}: {headers[name]}".encode())
    etag = f'"{digest.hexdigest()}"'
    if none_match(if_none_match, etag):
        return not_modified(etag)
    return Response(body, 200, headers | {"ETag": etag}, media_type="application/json")


def user_url(request: Request, route_name: str, user_id: str, **path_params: object) -> URL:
    """The absolute URL of one of `user_id`'s routes, the user id percent-encoded (any Unicode, `?`, `#`, `%`)."""
    return request.url_for(route_name, user_id=quote(user_id, safe=""), **path_params)


def paging_headers(request: Request, route_name: str, user_id: str, query: PageQuery, total: int) -> dict[str, str]:
    """`X-Total-Count`, and an RFC 8288 `Link` with the next and previous pages when there are any.

    The links keep the request's own query, with the page's `offset` and `limit` replaced.
    """
    headers = {"X-Total-Count": str(total)}
    links = []
    this_page = user_url(request, route_name, user_id).replace(query=request.url.query)
    if query.offset + query.limit < total:
        next_url = this_page.include_query_params(offset=query.offset + query.limit, limit=query.limit)
        links.append(f'<{next_url}>; rel="next"')
    if query.offset > 0:
        previous_offset = max(0, min(query.offset, total) - query.limit)
        previous_url = this_page.include_query_params(offset=previous_offset, limit=query.limit)
        links.append(f'<{previous_url}>; rel="prev"')
    if links:
        headers["Link"] = ", ".join(links)
    return headers


PAGE_HEADERS: dict[str, Any] = {
    "X-Total-Count": {"description": "Matching items, ignoring limit/offset", "schema": {"type": "integer"}},
    "Link": {"description": 'RFC 8288 links to the rel="next" and rel="prev" pages', "schema": {"type": "string"}},
    **ETAG_HEADER,
}
