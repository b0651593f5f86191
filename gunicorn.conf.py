"""Gunicorn's settings for the production command, `gunicorn main:app --config gunicorn.conf.py` (the
Dockerfile's CMD). The command line wins over this file (`--bind 127.0.0.1:9000`, say).

Gunicorn's master process binds the port and keeps `workers` uvicorn workers running (restarting any that
dies). On SIGTERM it closes its listening socket first, so new connections are refused rather than left
unanswered, then lets the workers finish their requests for at most `graceful_timeout`, and exits 0.
The master also runs the hooks below: its own log format, and the metrics directory the workers share.
"""

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from settings import load_settings

# The service's settings (environment and .env), read by the master before any worker starts: a bad one
# stops the command with the one line naming it; left to the workers, each would fail at boot and be
# restarted by the master, forever.
service_settings = load_settings()

# --- Serving --------------------------------------------------------------------------------------

# Every interface, port 8000 (the image's EXPOSE).
bind = "0.0.0.0:8000"
# One worker per core is a good start; each keeps a pool of up to 40 database connections (README,
# "Running in production"). WEB_CONCURRENCY, the variable platforms set, overrides it.
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
# uvicorn's own worker class for gunicorn, maintained by uvicorn's authors: each worker is a uvicorn server.
worker_class = "uvicorn_worker.UvicornWorker"
# Idle keep-alive connections are closed after 5 s, uvicorn's default and what the service always had.
# Behind a load balancer that reuses connections, make it longer than the balancer's idle timeout.
keepalive = 5
# The X-Forwarded-For/-Proto headers are believed from any address, so `Location` and `Link` carry the
# public scheme and host behind a load balancer. Restrict it to your proxies' addresses when you can
# (a client that reaches the service directly could otherwise claim any address and scheme).
forwarded_allow_ips = "*"

# --- Stopping -------------------------------------------------------------------------------------

# After SIGTERM, requests in flight may finish for 25 s; then the master kills what is left and exits.
# 25 s outlasts the longest statement (15 s statement_timeout; on a pooler the stall watchdog's
# 15 + 5 + 2 s) and stays under the 30 s most platforms wait before SIGKILL.
graceful_timeout = 25
# A worker whose event loop has not reported for 60 s is killed and replaced. Requests run in threads and
# never hold the loop; only a worker's start-up does (importing, connecting for up to 5 s, waiting up to
# 15 s for another worker's migration lock): 60 s covers that on a loaded machine. A migration longer than
# that belongs in its own deploy step (`python -m migrations`, MIGRATE_ON_STARTUP=false).
timeout = 60
# The heartbeat file (made by mkstemp, unlinked at once) lives in memory, as gunicorn's documentation advises
# in containers: on a disk-backed file system each heartbeat's write can block the worker.
MEMORY_FILE_SYSTEM = "/dev/shm"  # noqa: S108
worker_tmp_dir = MEMORY_FILE_SYSTEM if os.path.isdir(MEMORY_FILE_SYSTEM) else None
# No control socket (gunicornc): nothing here uses it, and it would be a second way to stop the service.
control_socket_disable = True

# --- Logging --------------------------------------------------------------------------------------

# No gunicorn access log: the service writes its own line per request (middleware.py).
accesslog = None


def json_logging_config() -> dict[str, Any]:
    """gunicorn's loggers as one JSON object per line on stderr, in logs.JsonFormatter's shape.

    Its records (the master's, and a worker's own few) get a handler of their own that does not pass them
    on: in a worker, logs.configure_logging puts the service's JSON handler at the root, and a record
    handled by both would be written twice.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        # "class", not "()": dictConfig pops "()" from the dict it is given, and a reload would reuse it.
        "formatters": {"json": {"class": "logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": []},  # each worker installs its own (logs.configure_logging)
        "loggers": {
            "gunicorn.error": {"handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"handlers": [], "propagate": False},  # unused: accesslog is None
        },
    }


# LOG_FORMAT=json: the master's records are JSON too; text: gunicorn's own lines, beside the service's.
logconfig_dict = json_logging_config() if service_settings.log_format == "json" else {}

# --- Metrics --------------------------------------------------------------------------------------


def on_starting(server: Any) -> None:
    """Before the workers start: give them one fresh Prometheus multiprocess directory, when metrics are on.

    Workers inherit PROMETHEUS_MULTIPROC_DIR, so every worker writes its values where any scrape reads
    them all. Unset, the directory is named after this master (metrics.supervisor_identity), so it is new
    for every start, and a later start removes it once this master is gone. One the operator sets is used
    as it is (they empty it at each deploy, as prometheus-client requires).
    """
    if not service_settings.metrics_enabled:
        return
    import metrics  # here: the master needs it only when metrics are on

    configured = os.environ.get(metrics.MULTIPROCESS_DIRECTORY_VARIABLE)
    if configured:
        directory = Path(configured)
    else:
        identity = metrics.supervisor_identity(os.getpid())
        directory = Path(tempfile.gettempdir()) / f"{metrics.DIRECTORY_PREFIX}{identity}"
    metrics.prepare_directory(directory)
    os.environ[metrics.MULTIPROCESS_DIRECTORY_VARIABLE] = str(directory)
    server.log.info("metrics of every worker shared in %s", directory)


def child_exit(server: Any, worker: Any) -> None:
    """A worker has exited, however it ended: drop its live gauges (requests in flight, pool use).

    A worker that stops cleanly drops them itself; one that was killed cannot, and the sums would keep
    counting its last values.
    """
    if not service_settings.metrics_enabled:
        return
    from prometheus_client import multiprocess

    import metrics

    directory = os.environ[metrics.MULTIPROCESS_DIRECTORY_VARIABLE]  # set by on_starting
    with contextlib.suppress(FileNotFoundError):  # the worker, or a scrape, may be removing them too
        multiprocess.mark_process_dead(worker.pid, directory)
