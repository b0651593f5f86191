"""Idempotent retries: a request sent again with the same `Idempotency-Key` gets the first one's response.

The remembered response and the change it describes are written in one transaction, so there is
never a change without its key nor a key without its change, whatever fails in between. Keys are the
token's user's; a repeat while the first request is still being processed is a `409`.

On PostgreSQL the key is claimed with a transaction-scoped advisory lock that is only tried, never
waited for: the request holding it is the one in progress, and the lock ends with its transaction
(also through a pooler in transaction mode). On SQLite the transaction holds the database's write
lock from its start, so a repeat simply runs after the first has committed and finds its response.
"""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Header, Request, Response
from sqlalchemy import bindparam, insert, select, text, update
from sqlmodel import Session

from auth import CurrentUserId
from database import transaction
from models import IDEMPOTENCY_KEY_MAX_LENGTH, IdempotencyKey, utc_now
from schemas import ApiError

keys = IdempotencyKey.__table__
key_column = keys.c
IS_THIS_KEY = (key_column.user_id == bindparam("owner_id")) & (key_column.key == bindparam("idempotency_key"))
READ_KEY = select(
    key_column.fingerprint,
    key_column.status_code,
    key_column.body,
    key_column.location,
    key_column.etag,
    key_column.expires_at,
).where(IS_THIS_KEY)
RESPONSE_FIELDS = ("fingerprint", "status_code", "body", "location", "etag", "expires_at")
RESPONSE_VALUES = {name: bindparam(f"remembered_{name}") for name in RESPONSE_FIELDS}
REMEMBER_RESPONSE = insert(keys).values(
    user_id=bindparam("owner_id"), key=bindparam("idempotency_key"), **RESPONSE_VALUES
)
REPLACE_EXPIRED_RESPONSE = update(keys).where(IS_THIS_KEY).values(**RESPONSE_VALUES)
# Advisory locks in a class of their own (two 32-bit keys), apart from the schema lock's 64-bit key.
CLAIM_KEY = text("SELECT pg_try_advisory_xact_lock(:lock_class, :lock_key)")
IDEMPOTENCY_LOCK_CLASS = 1_768_186_721
KEY_PATTERN = rf"^[!-~]{{1,{IDEMPOTENCY_KEY_MAX_LENGTH}}}$"
REPLAYED = "Idempotent-Replayed"
RETRY_IN_USE_AFTER_SECONDS = 1

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=KEY_PATTERN,
        description="1-255 visible ASCII characters (a UUID is typical): a retry with the same key, method, "
        "path and body gets the first response again, with `Idempotent-Replayed: true`, and changes nothing",
    ),
]


@dataclass(frozen=True, slots=True)
class Retryable:
    """A request sent with an `Idempotency-Key`: whose, the key, and what the request was."""

    user_id: str
    key: str
    fingerprint: str  # of the method, path and body, byte for byte


async def retryable_request(
    request: Request, user_id: CurrentUserId, key: IdempotencyKeyHeader = None
) -> Retryable | None:
    """The request's `Idempotency-Key` and fingerprint, or None without the header (which costs nothing more)."""
    if key is None:
        return None
    body = await request.body()  # already read by FastAPI: this is its cached copy
    fingerprint = hashlib.sha256(b"\0".join([request.method.encode(), request.url.path.encode(), body])).hexdigest()
    return Retryable(user_id, key, fingerprint)


RetryableRequest = Annotated[Retryable | None, Depends(retryable_request)]


def key_in_use() -> ApiError:
    """The `409` for a repeat that arrives while the first request with its key is still being processed."""
    return ApiError(
        409,
        "A request with this Idempotency-Key is still being processed; retry shortly",
        "idempotency_key_in_use",
        headers={"Retry-After": str(RETRY_IN_USE_AFTER_SECONDS)},
    )


def key_reused() -> ApiError:
    """The `422` for a key sent again with another method, path or body (`detail` in the usual list form)."""
    issue = {
        "loc": ["header", "Idempotency-Key"],
        "msg": "This key was already used for a different request (method, path or body)",
        "type": "value_error",
    }
    return ApiError(422, [issue], "idempotency_key_reused")


def lock_key(retry: Retryable) -> int:
    """A 32-bit advisory lock key for the user's key (a collision only makes a repeat wait one retry)."""
    digest = hashlib.blake2b(f"{retry.user_id}\0{retry.key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def respond_once(
    session: Session,
    retry: Retryable | None,
    ttl_seconds: int,
    respond: Callable[[], Response],
    check: Callable[[], None] | None = None,
) -> Response:
    """`respond()`'s response, or, for a repeat of a request already answered with a 2xx, that answer again.

    `respond` makes the change and its response (raising an ApiError when it fails); with a key it
    runs inside one transaction with the record of its response, and a failure leaves neither.
    `check` raises the error the request would get without its key (a missing task, say): a `409`
    for a key in use goes only to a request that would otherwise succeed.
    """
    if retry is None:
        return respond()
    params = {"owner_id": retry.user_id, "idempotency_key": retry.key}
    with transaction(session):
        if session.bind.dialect.name == "postgresql":
            claimed = session.exec(
                CLAIM_KEY, params={"lock_class": IDEMPOTENCY_LOCK_CLASS, "lock_key": lock_key(retry)}
            ).scalar_one()
            if not claimed:
                if check is not None:
                    check()
                raise key_in_use()
        now = utc_now()
        remembered = session.exec(READ_KEY, params=params).one_or_none()
        if remembered is not None and remembered.expires_at > now:
            if remembered.fingerprint != retry.fingerprint:
                raise key_reused()
            return replay(remembered.status_code, remembered.body, remembered.location, remembered.etag)
        response = respond()
        if 200 <= response.status_code < 300:
            record = {
                "fingerprint": retry.fingerprint,
                "status_code": response.status_code,
                "body": bytes(response.body).decode(),
                "location": response.headers.get("location"),
                "etag": response.headers.get("etag"),
                "expires_at": now + timedelta(seconds=ttl_seconds),
            }
            statement = REPLACE_EXPIRED_RESPONSE if remembered is not None else REMEMBER_RESPONSE
            session.exec(statement, params=params | {f"remembered_{name}": value for name, value in record.items()})
    return response


def replay(status_code: int, body: str, location: str | None, etag: str | None) -> Response:
    """The remembered response, marked as a replay."""
    headers = {REPLAYED: "true"}
    if location:
        headers["Location"] = location
    if etag:
        headers["ETag"] = etag
    return Response(body, status_code, headers, media_type="application/json")
