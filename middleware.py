"""The service's ASGI middleware: request ids, the access log and the headers every response of a kind
carries; the 1 MiB body limit; HEAD answered as GET; a crash answered as a bare 500; CORS."""

import json
import logging
import random
import re
import time
from collections.abc import Sequence
from typing import Any

from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from logs import escape_client_text

logger = logging.getLogger("todo")
access_logger = logging.getLogger("todo.access")

MAX_BODY_BYTES = 1024 * 1024
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
INTERNAL_ERROR = {"detail": "Internal server error", "code": "internal_error"}
# How long a client should wait before retrying a 503 that says nothing more precise.
RETRY_AFTER_SECONDS = 1
USER_DATA_PREFIX = "/api/"

def new_request_id() -> str:
    """32 random hex digits: unique enough to find one request in the logs, without a system call.

    Request ids are not secrets, so they need not come from the operating system's generator, as
    `uuid4()` does at the cost of a system call per request.
    """
    return f"{random.getrandbits(128):032x}"


def error_body(detail: Any, code: str) -> bytes:
    """The JSON bytes of an error in the contract's shape."""
    return json.dumps({"detail": detail, "code": code}, separators=(",", ":")).encode()


async def send_json(send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete JSON response straight from middleware."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Gives each request an id (`X-Request-ID`), logs one line for it, and adds the headers a kind of
    response always carries: `Retry-After` on a 503, `Cache-Control: no-store` on a user's data.

    The line has the method, path (control characters escaped), status, duration and request id, and the
    record carries them as fields too, with the route's template and the verified user (for LOG_FORMAT=json);
    never headers, the query string or a body, so no token or secret can reach the log.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"").decode("latin-1")
        request_id = incoming if REQUEST_ID_PATTERN.fullmatch(incoming) else new_request_id()
        added_headers = [(b"x-request-id", request_id.encode())]
        if scope["path"].startswith(USER_DATA_PREFIX):
            added_headers.append((b"cache-control", b"no-store"))
        status = 500
        started = False
        # One dict shared by every copy of the scope: get_current_user_id leaves the verified user in it.
        request_state = scope.setdefault("state", {})
        start = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = [*message.get("headers", []), *added_headers]
                if status == 503 and not any(name.lower() == b"retry-after" for name, _ in headers):
                    headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:  # the last resort: InternalErrorMiddleware answers crashes inside the app
            logger.exception("unhandled error in request %s", request_id)
            status = 500
            if not started:
                await send_json(send, 500, error_body(**INTERNAL_ERROR), added_headers)
        finally:
            if access_logger.isEnabledFor(logging.INFO):  # off (LOG_LEVEL=warning): no work at all
                duration_ms = (time.perf_counter() - start) * 1000
                route = scope.get("route")  # set by the router once a route matched
                access_logger.info(
                    "%s %s %d %.1fms request_id=%s",
                    scope["method"],
                    escape_client_text(scope["path"]),
                    status,
                    duration_ms,
                    request_id,
                    extra={
                        "method": scope["method"],
                        "route": getattr(route, "path", None),
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(duration_ms, 1),
                        "request_id": request_id,
                        "user_id": request_state.get("user_id"),
                    },
                )


class InternalErrorMiddleware:
    """Turns an unhandled error in the app into the contract's bare 500, inside CORS so a browser can read it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking_start)
        except Exception:
            if started:
                raise  # too late for an answer of our own: the outer middleware logs it
            logger.exception("unhandled error in a request")
            await send_json(send, 500, error_body(**INTERNAL_ERROR))


class HeadAsGetMiddleware:
    """Answers `HEAD` wherever `GET` works: the GET response's status and headers, without its body.

    FastAPI routes accept only the methods they declare, and load balancers probe with HEAD.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        get_scope = {**scope, "method": "GET"}
        try:
            await self.app(get_scope, receive, send_without_body)
        finally:  # the router recorded its route in the copy: the access log reads it from the original
            if "route" in get_scope:
                scope["route"] = get_scope["route"]


class BodyTooLargeError(Exception):
    """The request body grew past the limit while it was being read."""


class BodySizeLimitMiddleware:
    """Answers 413 for a body over the limit: at once from `Content-Length`, else as soon as it is exceeded."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.too_large_body = error_body(f"Request body is larger than {max_bytes} bytes", "payload_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_json(send, 413, self.too_large_body, [(b"connection", b"close")])
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLargeError
            return message

        async def send_unless_exceeded(message: Message) -> None:
            nonlocal started
            if exceeded:  # whatever the app made of the cut-off body, the answer is 413
                if message["type"] == "http.response.start":
                    started = True
                    await send_json(send, 413, self.too_large_body, [(b"connection", b"close")])
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, send_unless_exceeded)
        except BodyTooLargeError:
            if not started:
                await send_json(send, 413, self.too_large_body, [(b"connection", b"close")])


class JSONErrorCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, with its rejected preflight answered in the contract's error shape."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in {"content-length", "content-type"}}
        detail = "CORS preflight rejected: " + bytes(response.body).decode()
        return JSONResponse({"detail": detail, "code": "cors_rejected"}, response.status_code, headers=headers)
