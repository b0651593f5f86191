"""Prometheus metrics, served at `GET /metrics` when METRICS_ENABLED=true.

Built on prometheus-client, the Prometheus project's own Python client. Nothing of it is imported, and
no middleware is added, unless metrics are enabled; `count_key_set_fetch` and `count_rate_limit_refusal`
are then no-ops, so other modules may call them unconditionally.

Several workers use the library's multiprocess mode: each worker writes its values to files in the
directory PROMETHEUS_MULTIPROC_DIR names, and a scrape, whichever worker answers it, sums them all. The
production command's master (gunicorn.conf.py) makes that directory before it starts the workers:
`<temp dir>/todo-metrics-<master pid>-<master start time>`, new for every start (a later master that
reuses the pid gets a fresh one), removing those of masters that are gone; and it drops the live gauges
of a worker that exits. An operator may set the variable instead (and then empties the directory at each
deploy, as prometheus-client requires). A process without it (plain `uvicorn main:app`) keeps its values
in memory.
"""

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

METRICS_PATH = "/metrics"
MULTIPROCESS_DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
DIRECTORY_PREFIX = "todo-metrics-"
# The Prometheus text format that `generate_latest` writes (the one every Prometheus version reads).
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
# The label of requests no route answered (unknown paths, CORS preflights, bodies refused before routing):
# a raw path would let any client add series at will.
UNMATCHED_ROUTE = "unmatched"
# Any other method (a client may send any token) is counted as `other`, for the same reason.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
# Seconds; most requests take 5-500 ms, and anything past 5 s is an incident whatever its exact length.
LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
KEY_SET_FETCH_RESULTS = ("success", "failure")
RATE_LIMIT_SCOPES = ("user", "address")
# How often each worker writes down its connection pool's use, for scrapes answered by another worker.
POOL_SAMPLE_SECONDS = 1.0


def process_start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from Linux's /proc), or None if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def supervisor_identity(pid: int) -> str:
    """A name for process `pid` that a later process reusing the pid does not share (where /proc tells)."""
    started = process_start_time(pid)
    return f"{pid}-{started}" if started else str(pid)


def multiprocess_directory() -> Path | None:
    """Where this process shares its metrics with its sibling workers, or None when it runs alone."""
    configured = os.environ.get(MULTIPROCESS_DIRECTORY_VARIABLE)
    return Path(configured) if configured else None


def remove_directories_of_dead_supervisors(temp_dir: Path) -> None:
    """Remove the metrics directories that earlier, finished supervisors left in `temp_dir`."""
    for directory in temp_dir.glob(f"{DIRECTORY_PREFIX}*-*"):
        pid, _, started = directory.name.removeprefix(DIRECTORY_PREFIX).partition("-")
        if pid.isdigit() and process_start_time(int(pid)) != started:
            shutil.rmtree(directory, ignore_errors=True)  # a sibling worker may be removing it too


def prepare_directory(directory: Path) -> None:
    """Create `directory` for this user alone if it is missing; refuse one that another user owns."""
    derived = directory.name.startswith(DIRECTORY_PREFIX) and directory.parent == Path(tempfile.gettempdir())
    if derived:
        remove_directories_of_dead_supervisors(directory.parent)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if derived and directory.stat().st_uid != os.getuid():
        # In a shared temp dir another user could have made it first, to read or forge our values.
        raise RuntimeError(f"{directory} belongs to another user: set {MULTIPROCESS_DIRECTORY_VARIABLE}")


class ServiceMetrics:
    """Every metric family of the service, made once per process, and how to scrape them."""

    def __init__(self, directory: Path | None) -> None:
        # Imported here, after PROMETHEUS_MULTIPROC_DIR is set: the library reads it on import.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

        self.directory = directory
        # Single process: the metrics live in this registry. Several: they live in files, which the
        # collector reads; the metric objects themselves then belong to no registry.
        self.registry = CollectorRegistry()
        owner: CollectorRegistry | None = self.registry
        if directory is not None:
            multiprocess.MultiProcessCollector(self.registry, path=str(directory))
            owner = None
        labels = ("route", "method", "status")
        self.requests = Counter(
            "todo_http_requests",
            "HTTP requests answered, by route template, method and status.",
            labels,
            registry=owner,
        )
        self.durations = Histogram(
            "todo_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route template, method and status.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=owner,
        )
        self.in_flight: Gauge = Gauge(
            "todo_http_requests_in_flight",
            "Requests being answered now (including the scrape reading this).",
            registry=owner,
            multiprocess_mode="livesum",
        )
        self.pool_checked_out: Gauge = Gauge(
            "todo_db_pool_checked_out",
            "Database connections in use (checked out of the pool), summed over the live workers.",
            registry=owner,
            multiprocess_mode="livesum",
        )
        self.pool_size: Gauge = Gauge(
            "todo_db_pool_size",
            "Database connections the pools keep open at the most, summed over the live workers.",
            registry=owner,
            multiprocess_mode="livesum",
        )
        key_set_fetches = Counter(
            "todo_key_set_fetches",
            "Fetches of Better Auth's key set (JWKS), by result: success or failure.",
            ("result",),
            registry=owner,
        )
        rate_limit_refusals = Counter(
            "todo_rate_limit_refusals",
            "Requests refused by the rate limits (429), by the limit's scope: user or address.",
            ("scope",),
            registry=owner,
        )
        # Every known label value made now: the series exist at 0 before the first event.
        self.key_set_fetches = {result: key_set_fetches.labels(result) for result in KEY_SET_FETCH_RESULTS}
        self.rate_limit_refusals = {scope: rate_limit_refusals.labels(scope) for scope in RATE_LIMIT_SCOPES}
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        series = self._series.get((route, method, status))
        if series is None:  # once per route, method and status: all of them known, few in number
            labels = (route, method, str(status))
            series = self._series[route, method, status] = (
                self.requests.labels(*labels),
                self.durations.labels(*labels),
            )
        series[0].inc()
        series[1].observe(seconds)

    def scrape(self) -> bytes:
        """Every metric in the Prometheus text format, summed over the workers."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


_service_metrics: ServiceMetrics | None = None
_enabling = threading.Lock()


def enable_metrics() -> ServiceMetrics:
    """The process's metrics, made on first call (with the multiprocess directory, when a worker)."""
    global _service_metrics  # one set of metrics per process, as the library keeps its values
    with _enabling:
        if _service_metrics is None:
            directory = multiprocess_directory()
            if directory is not None:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # the master made it, or the operator
            _service_metrics = ServiceMetrics(directory)
    return _service_metrics


def count_key_set_fetch(result: str) -> None:
    """Count one fetch of the key set, `success` or `failure`; nothing unless metrics are enabled."""
    if _service_metrics is not None:
        _service_metrics.key_set_fetches[result].inc()


def count_rate_limit_refusal(scope: str) -> None:
    """Count one request refused by a rate limit of `scope` (`user`, `address`); nothing unless enabled."""
    if _service_metrics is not None:
        _service_metrics.rate_limit_refusals[scope].inc()


class PoolGauges:
    """Writes an engine's pool size and connections in use to the pool gauges.

    Read when a scrape is answered, and, with several workers, also every `POOL_SAMPLE_SECONDS` by a
    thread of each worker: a scrape reaches one worker, and cannot read the others' pools.
    """

    def __init__(self, engine: Engine, service_metrics: ServiceMetrics) -> None:
        self.engine = engine
        self.metrics = service_metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> None:
        """Write the pool's current size and use (a QueuePool's; other pools are not measured)."""
        pool = self.engine.pool  # read each time: `dispose()` replaces it
        if isinstance(pool, QueuePool):
            self.metrics.pool_size.set(pool.size())
            self.metrics.pool_checked_out.set(pool.checkedout())

    def start(self) -> None:
        """Publish now, and keep publishing in the background when other workers read these gauges."""
        self.publish()
        if self.metrics.directory is not None and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="metrics-pool-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop publishing in the background."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _sample(self) -> None:
        while not self._stop.wait(POOL_SAMPLE_SECONDS):
            self.publish()


class MetricsMiddleware:
    """Counts and times every HTTP request, labelled by the template of the route that answered it.

    Added outermost, so it times everything the service does for a request, refusals by other
    middleware included. The router records the route it chose in the request's scope, which this
    middleware shares (HeadAsGetMiddleware copies the route back from its GET copy of the scope).
    """

    def __init__(self, app: ASGIApp, service_metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = service_metrics
        self.in_flight = service_metrics.in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets when the app fails before it answers

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            seconds = time.perf_counter() - start
            self.in_flight.dec()
            method = scope["method"] if scope["method"] in KNOWN_METHODS else OTHER_METHOD
            route = scope.get("route")  # its `path` is the template, e.g. /api/{user_id}/tasks/{task_id}
            self.metrics.observe_request(route.path if route is not None else UNMATCHED_ROUTE, method, status, seconds)


def metrics_endpoint(service_metrics: ServiceMetrics, pool_gauges: PoolGauges) -> Callable[[], Response]:
    """The `GET /metrics` route's function."""

    def read_metrics() -> Response:
        """Every metric of the service, in the Prometheus text format."""
        pool_gauges.publish()  # this worker's pool as it is now; the others' as last sampled
        return Response(service_metrics.scrape(), media_type=TEXT_FORMAT)

    return read_metrics


def install_metrics(app: FastAPI, engine: Engine) -> None:
    """Measure every request of `app` and serve `GET /metrics` (no token, not in the OpenAPI document).

    Call it after adding every other middleware: the last one added is the outermost. It also wraps
    the app's lifespan, to sample the pool while the app runs and, at shutdown, to remove this
    worker's live gauges (requests in flight, pool use) from the shared directory.
    """
    service_metrics = enable_metrics()
    pool_gauges = PoolGauges(engine, service_metrics)
    app.add_middleware(MetricsMiddleware, service_metrics=service_metrics)
    app.add_api_route(
        METRICS_PATH,
        metrics_endpoint(service_metrics, pool_gauges),
        methods=["GET"],
        include_in_schema=False,
    )
    app_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan_with_metrics(running_app: FastAPI) -> AsyncIterator[Any]:
        async with app_lifespan(running_app) as state:
            pool_gauges.start()
            try:
                yield state
            finally:
                pool_gauges.stop()
        if service_metrics.directory is not None:
            from prometheus_client import multiprocess

            with contextlib.suppress(FileNotFoundError):  # an operator may have emptied it already
                multiprocess.mark_process_dead(os.getpid(), str(service_metrics.directory))

    app.router.lifespan_context = lifespan_with_metrics
