"""Service routes that need no token: the health check and the service's front door."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from database import Database, database_is_reachable
from schemas import ErrorResponse, HealthStatus, ServiceInfo
from settings import VERSION

router = APIRouter(tags=["service"])


class UnhealthyStatus(HealthStatus, ErrorResponse):
    """The body of a `503` from `GET /health`."""


@router.get(
    "/health",
    summary="Is the service and its database up?",
    responses={503: {"model": UnhealthyStatus, "description": "The database is unreachable"}},
)
def health(request: Request) -> HealthStatus:
    """`healthy` when the database answers a query; otherwise a 503 saying `unhealthy`."""
    database: Database = request.app.state.database
    if database_is_reachable(database.engine):
        return HealthStatus(status="healthy", database="ok")
    body = UnhealthyStatus(
        status="unhealthy",
        database="unreachable",
        detail="The database cannot be reached",
        code="database_unavailable",
    )
    return JSONResponse(body.model_dump(), status_code=503)  # type: ignore[return-value]


@router.get("/", summary="What this service is")
def service_info() -> ServiceInfo:
    """The service's name, version and where its documentation is."""
    return ServiceInfo(message="Todo API", version=VERSION, docs="/docs")
