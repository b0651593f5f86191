"""The Todo API: the FastAPI app, its middleware, error handlers and start-up."""

import gc
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth import TokenVerifier, bearer_scheme, get_current_user_id
from database import Database
from routes import health, tasks
from schemas import ApiError
from settings import VERSION, Settings, load_settings

logger = logging.getLogger("todo")
access_logger = logging.getLogger("todo.access")

MAX_BODY_BYTES = 1024 * 1024
CODES_BY_STATUS = {
    400: "bad_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "validation_error",
    503: "service_unavailable",
}
ROUTE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
INTERNAL_ERROR = {"detail": "Internal server error", "code": "internal_error"}


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
    """Gives each request an id (`X-Request-ID`), logs one line for it, and turns a crash into a bare 500.

    The line has the method, path, status, duration and request id; never headers, the query
    string or a body, so no token or secret can reach the log.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"").decode("latin-1")
        request_id = incoming if REQUEST_ID_PATTERN.fullmatch(incoming) else new_request_id()
        id_header = (b"x-request-id", request_id.encode())
        status = 500
        started = False
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in request %s", request_id)
            status = 500
            if not started:
                await send_json(send, 500, error_body(**INTERNAL_ERROR), [id_header])
        finally:
            duration_ms = (time.perf_counter() - start) * 1000
            access_logger.info(
                "%s %s %d %.1fms request_id=%s", scope["method"], scope["path"], status, duration_ms, request_id
            )


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


def error_response(status_code: int, detail: Any, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response in the contract's `{detail, code}` shape."""
    return JSONResponse({"detail": detail, "code": code}, status_code=status_code, headers=headers)


async def auth_error_first(request: Request) -> Response | None:
    """The 401/403 a user route would give, for errors FastAPI finds before it checks the token.

    FastAPI parses a JSON body before it runs any dependency; the contract ranks a bad token
    above a bad body, so such a body error is answered as the token check would answer.
    """
    if "user_id" not in request.path_params:
        return None
    try:
        await get_current_user_id(request, request.path_params["user_id"], await bearer_scheme(request))
    except ApiError as error:
        return error_response(error.status_code, error.detail, error.code, error.headers)
    return None


async def http_error_handler(request: Request, error: StarletteHTTPException) -> Response:
    """Every HTTP error (ours, FastAPI's, Starlette's) as `{detail, code}`, headers kept."""
    if error.status_code == 400:  # FastAPI's "error parsing the body": for the contract, an invalid body
        return await auth_error_first(request) or error_response(
            422,
            [{"loc": ["body"], "msg": "The body is not valid JSON text", "type": "json_invalid"}],
            "validation_error",
        )
    code = error.code if isinstance(error, ApiError) else CODES_BY_STATUS.get(error.status_code, "http_error")
    headers = error.headers
    if error.status_code == 405:
        headers = {"Allow": ", ".join(allowed_methods(request))}
    return error_response(error.status_code, error.detail, code, headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route accepts at this path (Starlette's `Allow` names only the first route's)."""
    return [
        method
        for method in ROUTE_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in request.app.routes)
    ]


async def validation_error_handler(request: Request, error: RequestValidationError) -> Response:
    """A 422 with FastAPI's usual `loc`/`msg`/`type` list; the input is not echoed back."""
    issues = [{"loc": list(issue["loc"]), "msg": issue["msg"], "type": issue["type"]} for issue in error.errors()]
    if any(issue["type"] == "json_invalid" for issue in issues) and (response := await auth_error_first(request)):
        return response
    return error_response(422, issues, "validation_error")


async def database_unavailable_handler(request: Request, error: Exception) -> Response:
    """The database is down or too slow: 503, and the service carries on."""
    logger.warning("database unavailable: %s", type(error).__name__)
    return error_response(503, "The database is unavailable; try again shortly", "database_unavailable")


async def unstorable_value_handler(request: Request, error: Exception) -> Response:
    """A value the database refused to store: the client's to fix, so 422."""
    logger.info("database refused a value: %s", type(error).__name__)
    issue = {"loc": ["body"], "msg": "The database cannot store this value", "type": "value_error"}
    return error_response(422, [issue], "validation_error")


def configure_logging(level: str) -> None:
    """Send the service's logs to stderr at `level`; uvicorn's access log gives way to ours."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True


def create_app(settings: Settings) -> FastAPI:
    """Assemble the service for `settings`: database, token verification, middleware, handlers, routes."""
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "starting: database %s, Better Auth keys from %s, HS256 %s",
            settings.database.render_as_string(hide_password=True),
            settings.jwks_endpoint,
            "enabled" if settings.better_auth_secret else "disabled",
        )
        try:
            app.state.database.ensure_tables()
        except sa_exc.SQLAlchemyError as error:
            logger.warning(
                "database unreachable at start-up (%s); tables will be created when it is back", type(error).__name__
            )
        yield
        app.state.database.engine.dispose()

    app = FastAPI(
        title="Todo API",
        version=VERSION,
        description="Each user's tasks, behind Better Auth tokens. See the contract in the README.",
        lifespan=lifespan,
    )
    app.state.database = Database(settings.database)
    app.state.token_verifier = TokenVerifier(settings)

    app.add_middleware(BodySizeLimitMiddleware)
    allow_any_origin = "*" in settings.allowed_origins
    app.add_middleware(
        JSONErrorCORSMiddleware,
        allow_origins=["*"] if allow_any_origin else settings.allowed_origins,
        allow_credentials=not allow_any_origin,  # a wildcard origin never goes with credentials
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["X-Total-Count", "Link", "Location"],
        max_age=600,
    )
    app.add_middleware(RequestContextMiddleware)

    app.add_exception_handler(StarletteHTTPException, http_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # type: ignore[arg-type]
    for unavailable in (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError):
        app.add_exception_handler(unavailable, database_unavailable_handler)
    app.add_exception_handler(sa_exc.DataError, unstorable_value_handler)

    app.include_router(tasks.router)  # first: routes are matched in order, and these take the traffic
    app.include_router(health.router)
    return app


app = create_app(load_settings())
# What exists now (modules, routes, schemas, prebuilt statements) lives as long as the process: the
# garbage collector need not walk it again on every full collection.
gc.freeze()
