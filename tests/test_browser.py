"""End to end in a real browser: the frontend's origin can use the API through CORS, any other origin cannot.

Headless Chromium (Debian's `chromium`, driven by `playwright-core` from tests/browser) opens
tests/browser/page.html, served by Python's http.server from two origins, and the page calls the
real app over real HTTP with `fetch()` and a Bearer token, just as the frontend does:

- from http://localhost:3000, the app's default allowed origin, the page creates a task with an
  `Idempotency-Key` and retries it, lists, toggles it under `If-Match`, is refused a stale update (412)
  and deletes it, and can read the exposed `Location`, `X-Total-Count`, `Link`, `ETag` and
  `Idempotent-Replayed` headers;
- from http://127.0.0.1:<port>, an origin the app does not allow, the preflight of the first request
  is refused, so `fetch()` fails with a TypeError and the POST is never sent.

Without /usr/bin/chromium or Node.js these tests are skipped, except when the CI environment
variable is set: then they fail, because CI must run them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from main import create_app
from tests.conftest import FRONTEND_ORIGIN, LiveServer, free_port, make_settings
from tests.keys import JwksServer
from tests.npm import ensure_node_modules

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
CHROMIUM_PATH = Path("/usr/bin/chromium")
FRONTEND_PORT = 3000  # FRONTEND_ORIGIN's port: the origin must be exactly http://localhost:3000
PAGE_TIMEOUT_MS = 60_000  # for the browser to start and the page to finish; generous for a slow CI machine
RUN_TIMEOUT = 120.0  # for the whole `node run.mjs` process


def in_ci() -> bool:
    """True when the CI environment variable is set (to anything but "", "0" or "false")."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false"}


def require(available: bool, missing: str) -> None:
    """Skip when something the browser test needs is missing, unless in CI: there, fail."""
    if available:
        return
    if in_ci():
        pytest.fail(f"{missing}, and CI is set: the browser test must run in CI", pytrace=False)
    pytest.skip(f"{missing} (set CI=1 to make this a failure)")


# --- The page's two origins -------------------------------------------------------------------


class QuietPageHandler(SimpleHTTPRequestHandler):
    """Serves tests/browser (page.html) without logging every request to stderr."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(BROWSER_DIR), **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class IPv6Server(ThreadingHTTPServer):
    """ThreadingHTTPServer on an IPv6 address."""

    address_family = socket.AF_INET6


def loopback_ipv6_available() -> bool:
    """True when this machine has an IPv6 loopback address (::1)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def serve_page(origin: str, port: int, hosts: tuple[str, ...]) -> Iterator[str]:
    """Serve tests/browser on `port` at each of `hosts` in background threads; yield `origin`.

    A port that is already taken fails the test with a message naming the origin, since the
    page's origin is the point of the test and cannot move elsewhere.
    """
    bound: list[ThreadingHTTPServer] = []
    running: list[ThreadingHTTPServer] = []
    try:
        for host in hosts:
            server_class = IPv6Server if ":" in host else ThreadingHTTPServer
            try:
                bound.append(server_class((host, port), QuietPageHandler))
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                pytest.fail(
                    f"cannot serve the test page at {origin}: port {port} is busy on {host} ({error.strerror}). "
                    f"The page must load from exactly {origin}; stop whatever listens there "
                    "(a frontend dev server?) and run again.",
                    pytrace=False,
                )
        for server in bound:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            running.append(server)
        yield origin
    finally:
        for server in running:  # shutdown() waits for serve_forever(), so only for servers that run one
            server.shutdown()
        for server in bound:
            server.server_close()


@pytest.fixture(scope="module")
def frontend_origin() -> Iterator[str]:
    """The page served from the allowed origin, http://localhost:3000.

    Served on both loopback addresses where there are two, so that "localhost" reaches this page
    (and not some other server on [::1]:3000) whichever address the browser tries first.
    """
    assert f"http://localhost:{FRONTEND_PORT}" == FRONTEND_ORIGIN
    hosts = ("127.0.0.1", "::1") if loopback_ipv6_available() else ("127.0.0.1",)
    with serve_page(FRONTEND_ORIGIN, FRONTEND_PORT, hosts) as origin:
        yield origin


@pytest.fixture(scope="module")
def foreign_origin() -> Iterator[str]:
    """The page served from an origin the app does not allow: http://127.0.0.1:<free port>."""
    port = free_port()
    with serve_page(f"http://127.0.0.1:{port}", port, ("127.0.0.1",)) as origin:
        yield origin


# --- The browser ------------------------------------------------------------------------------


@dataclass
class PageVisit:
    """What `run.mjs` reported for one visit: the page's summary, and the browser console around it."""

    result: dict[str, Any]
    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        """Each step the page got through, by name (create, list, secondPage, toggle, delete)."""
        return self.result["steps"]

    def explain(self) -> str:
        """Everything seen, for an assertion message."""
        seen = {"result": self.result, "console": self.console, "pageErrors": self.page_errors}
        return json.dumps(seen, indent=2)


def visit_page(origin: str, api: str, user_id: str, token: str) -> PageVisit:
    """Open page.html from `origin` in headless Chromium, pointed at `api` as `user_id` with `token`.

    The parameters go in the URL's fragment, so the token never reaches the page server.
    """
    url = f"{origin}/page.html#" + urlencode({"api": api, "user": user_id, "token": token})
    command = ["node", "run.mjs", url, str(PAGE_TIMEOUT_MS)]
    env = os.environ | {"CHROMIUM_PATH": str(CHROMIUM_PATH)}
    try:
        done = subprocess.run(
            command, cwd=BROWSER_DIR, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"node run.mjs did not finish within {RUN_TIMEOUT:.0f} s", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"node run.mjs failed ({done.returncode}):\n{done.stderr}{done.stdout}", pytrace=False)
    seen = json.loads(done.stdout)
    return PageVisit(seen["result"], seen["console"], seen["pageErrors"])


@pytest.fixture(scope="session")
def browser() -> Callable[[str, str, str, str], PageVisit]:
    """`browser(origin, api, user_id, token)`: visit the page; Chromium, Node.js and node_modules checked first."""
    require(CHROMIUM_PATH.is_file() and os.access(CHROMIUM_PATH, os.X_OK), f"{CHROMIUM_PATH} is not installed")
    require(all(shutil.which(tool) for tool in ("node", "npm")), "Node.js (node, npm) is not installed")
    try:
        ensure_node_modules(BROWSER_DIR)
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    return visit_page


# --- The app ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(database_url: str, jwks_server: JwksServer, serve: Callable[..., LiveServer]) -> Iterator[LiveServer]:
    """The real app with its default allowed origin (http://localhost:3000), over real HTTP."""
    with serve(create_app(make_settings(database_url, jwks_server))) as live:
        yield live


class AccessLog(logging.Handler):
    """Collects the app's access log lines as (method, path, status)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple) and len(record.args) >= 3:  # "%s %s %d ..." % (method, path, status, ...)
            method, path, status = record.args[:3]
            self.requests.append((str(method), str(path), int(status)))

    def to(self, path_prefix: str) -> list[tuple[str, str, int]]:
        """The requests seen under `path_prefix`."""
        return [request for request in self.requests if request[1].startswith(path_prefix)]


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    """What reached the app during the test, from its own access log ("todo.access")."""
    recorder = AccessLog()
    logger = logging.getLogger("todo.access")
    logger.addHandler(recorder)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)


def tasks_of(api: LiveServer, user_id: str, token: str) -> httpx.Response:
    """The user's task list, asked for from Python (no browser, no CORS)."""
    response = httpx.get(f"{api.url}/api/{user_id}/tasks", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response


# --- The tests --------------------------------------------------------------------------------


def test_the_frontend_origin_can_use_the_api(
    browser: Callable[[str, str, str, str], PageVisit],
    frontend_origin: str,
    api: LiveServer,
    user_id: str,
    token_for: Callable[..., str],
) -> None:
    """From http://localhost:3000: create (and its retry), list, a conditional toggle, a stale update and delete
    work, and the exposed headers are readable (Location, X-Total-Count, Link, ETag, Idempotent-Replayed)."""
    token = token_for(user_id)
    visit = browser(frontend_origin, api.url, user_id, token)
    steps, explain = visit.steps, visit.explain()

    assert visit.result["origin"] == FRONTEND_ORIGIN, explain
    assert visit.result["error"] is None, explain

    create = steps["create"]
    assert create["status"] == 201, explain
    assert create["location"] is not None, f"the page could not read Location:\n{explain}"
    assert create["location"].endswith(f"/api/{user_id}/tasks/{create['id']}"), explain
    assert create["etag"] == '"1"', f"the page could not read ETag:\n{explain}"
    assert create["replayed"] is None, explain

    retried = steps["retriedCreate"]
    assert retried["status"] == 201 and retried["id"] == create["id"], explain
    assert retried["replayed"] == "true", f"the page could not read Idempotent-Replayed:\n{explain}"

    listing = steps["list"]
    assert listing["status"] == 200, explain
    assert listing["totalCount"] == "1", f"the page could not read X-Total-Count, or it is wrong:\n{explain}"
    assert listing["count"] == 1, explain
    assert listing["json"][0]["id"] == create["id"], explain
    assert listing["link"] is None, explain  # a single page: nothing to link to

    second_page = steps["secondPage"]
    assert second_page["status"] == 200, explain
    assert second_page["json"] == [] and second_page["totalCount"] == "1", explain
    assert second_page["link"] is not None, f"the page could not read Link:\n{explain}"
    assert 'rel="prev"' in second_page["link"], explain

    assert steps["toggle"]["status"] == 200, explain
    assert steps["toggle"]["completed"] is True, explain
    assert steps["toggle"]["etag"] == '"2"', explain

    stale = steps["staleUpdate"]
    assert stale["status"] == 412, explain
    assert stale["etag"] == '"2"', f"the page could not read the current ETag of a 412:\n{explain}"
    assert stale["json"]["code"] == "precondition_failed", explain

    assert steps["delete"]["status"] == 204, explain
    assert steps["delete"]["bodyLength"] == 0, explain

    assert tasks_of(api, user_id, token).json() == [], "the task the page deleted is still there"
    trash = httpx.get(f"{api.url}/api/{user_id}/trash", headers={"Authorization": f"Bearer {token}"})
    assert [task["id"] for task in trash.json()] == [create["id"]], "the deleted task is not in the trash"


def test_another_origin_is_blocked_by_cors(
    browser: Callable[[str, str, str, str], PageVisit],
    foreign_origin: str,
    api: LiveServer,
    user_id: str,
    token_for: Callable[..., str],
    access_log: AccessLog,
) -> None:
    """From an origin the app does not allow, the preflight is refused: fetch() fails and no task is created."""
    token = token_for(user_id)
    visit = browser(foreign_origin, api.url, user_id, token)
    explain = visit.explain()

    assert visit.result["origin"] == foreign_origin != FRONTEND_ORIGIN, explain
    assert visit.steps == {}, f"a request from a foreign origin got an answer the page could read:\n{explain}"
    error = visit.result["error"]
    assert error is not None, explain
    assert (error["step"], error["name"], error["message"]) == ("create", "TypeError", "Failed to fetch"), explain
    assert any("CORS policy" in line for line in visit.console), f"Chromium gave no CORS reason:\n{explain}"

    # The browser did reach the app: it asked first (a JSON POST with a token is preflighted),
    # was refused, and so never sent the POST.
    tasks_path = f"/api/{user_id}/tasks"
    assert access_log.to(tasks_path) == [("OPTIONS", tasks_path, 400)], explain
    response = tasks_of(api, user_id, token)
    assert response.json() == [] and response.headers["X-Total-Count"] == "0", "the blocked page created a task"
