"""The Todo API: the FastAPI app, its middleware, error handlers and start-up."""

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from auth import TokenVerifier, bearer_scheme, get_current_user_id, without_credentials
from database import Database, DatabaseUnavailableError
from housekeeping import housekeeping
from logs import configure_logging
from middleware import (
    MAX_BODY_BYTES,
    BodySizeLimitMiddleware,
    HeadAsGetMiddleware,
    InternalErrorMiddleware,
    JSONErrorCORSMiddleware,
    RequestContextMiddleware,
)
from routes import changes, health, tags, tasks, trash
from schemas import ApiError
from settings import VERSION, Settings, load_settings

logger = logging.getLogger("todo")

CODES_BY_STATUS = {
    400: "bad_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    422: "validation_error",
    503: "service_unavailable",
}
ROUTE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


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
    """Every method some route accepts at this path, HEAD wherever GET (Starlette's `Allow` names only the
    first route's)."""
    allowed = [
        method
        for method in ROUTE_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in request.app.routes)
    ]
    return ["GET", "HEAD", *allowed[1:]] if allowed[:1] == ["GET"] else allowed


async def validation_error_handler(request: Request, error: RequestValidationError) -> Response:
    """A 422 with FastAPI's usual `loc`/`msg`/`type` list; the input is not echoed back."""
    issues = [{"loc": list(issue["loc"]), "msg": issue["msg"], "type": issue["type"]} for issue in error.errors()]
    if any(issue["type"] == "json_invalid" for issue in issues) and (response := await auth_error_first(request)):
        return response
    return error_response(422, issues, "validation_error")


async def database_unavailable_handler(request: Request, error: Exception) -> Response:
    """The database is down or too slow: 503 (with `Retry-After`), and the service carries on."""
    cause = error.__cause__ if isinstance(error, DatabaseUnavailableError) and error.__cause__ else error
    logger.warning("database unavailable: %s", type(cause).__name__)
    return error_response(503, "The database is unavailable; try again shortly", "database_unavailable")


async def unstorable_value_handler(request: Request, error: Exception) -> Response:
    """A value the database refused to store: the client's to fix, so 422."""
    logger.info("database refused a value: %s", type(error).__name__)
    issue = {"loc": ["body"], "msg": "The database cannot store this value", "type": "value_error"}
    return error_response(422, [issue], "validation_error")


def create_app(settings: Settings) -> FastAPI:
    """Assemble the service for `settings`: database, token verification, middleware, handlers, routes."""
    configure_logging(settings.log_level, settings.log_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "starting: database %s, Better Auth keys from %s, HS256 %s",
            settings.database.render_as_string(hide_password=True),
            without_credentials(settings.jwks_endpoint),
            "enabled" if settings.better_auth_secret else "disabled",
        )
        if not settings.migrate_on_startup:
            app.state.database.warn_if_schema_is_behind()
        try:
            app.state.database.ensure_schema()
        except DatabaseUnavailableError as error:
            logger.warning("database not ready at start-up (%s); it will be migrated when it is back", error)
        async with housekeeping(
            app.state.database.engine, settings.trash_retention_days, settings.housekeeping_interval_seconds
        ):
            yield
        app.state.database.engine.dispose()

    app = FastAPI(
        title="Todo API",
        version=VERSION,
        description="Each user's tasks, behind Better Auth tokens. The full reference is docs/api.md.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.database = Database(
        settings.database,
        migration_url=settings.migration_database,
        migrate_on_startup=settings.migrate_on_startup,
    )
    app.state.token_verifier = TokenVerifier(settings)

    # Added innermost first: a request passes RequestContext, CORS, InternalError, HeadAsGet, BodySizeLimit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(InternalErrorMiddleware)  # inside CORS: a 500 carries the CORS headers too
    allow_any_origin = "*" in settings.allowed_origins
    app.add_middleware(
        JSONErrorCORSMiddleware,
        allow_origins=["*"] if allow_any_origin else settings.allowed_origins,
        allow_credentials=not allow_any_origin,  # a wildcard origin never goes with credentials
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "If-Match", "If-None-Match", "Idempotency-Key"],
        expose_headers=[
            "X-Total-Count",
            "Link",
            "Location",
            "ETag",
            "Retry-After",
            "Idempotent-Replayed",
            "X-Request-ID",
        ],
        max_age=600,
    )
    app.add_middleware(RequestContextMiddleware)
    if settings.metrics_enabled:  # last, so outermost: it times everything; when off, nothing of it runs
        from metrics import install_metrics

        install_metrics(app, app.state.database.engine)

    app.add_exception_handler(StarletteHTTPException, http_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # type: ignore[arg-type]
    for unavailable in (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, DatabaseUnavailableError):
        app.add_exception_handler(unavailable, database_unavailable_handler)
    app.add_exception_handler(sa_exc.DataError, unstorable_value_handler)

    app.include_router(tasks.router)  # first: routes are matched in order, and these take the traffic
    app.include_router(tags.router)
    app.include_router(trash.router)
    app.include_router(changes.router)
    app.include_router(health.router)
    return app


app = create_app(load_settings())
# What exists now (modules, routes, schemas, prebuilt statements) lives as long as the process: the
# garbage collector need not walk it again on every full collection.
gc.freeze()
