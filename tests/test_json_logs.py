"""LOG_FORMAT=json: one JSON object per line for every log record (uvicorn's own, the service's, tracebacks
inside their record), with the request fields on each request's record; never a token, a secret or a user's
text; nothing a client sends starts a line. LOG_FORMAT=text keeps today's lines.

The JSON tests run the production command (`python -m uvicorn main:app`) in a subprocess and read every line
it writes; a crash (which the real app has no way to cause) is served in-process from an app with a failing
route, its log handler's stream captured.
"""

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from logs import HANDLER_NAME, TRACEBACK_INDENT, configure_logging
from main import create_app
from tests.conftest import SECRET, free_port, make_settings
from tests.keys import JwksServer

if TYPE_CHECKING:
    from tests.conftest import LiveServer

Serve = Callable[[FastAPI], "LiveServer"]
TokenFor = Callable[..., str]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_COMMAND = [sys.executable, "-m", "uvicorn", "main:app"]
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
# A JSON log line a client would like to slip in, and the characters that could start it on a line of its own.
FORGED_RECORD = '{"time": "2026-01-01T00:00:00.000+00:00", "level": "INFO", "logger": "forged", "message": "x"}'
FORGED_TEXT_LINE = "2026-01-01 00:00:00,000 INFO todo.access: GET /forged 200 0.1ms request_id=forged"
STARTUP_SECONDS = 60
LOG_WAIT_SECONDS = 30


class ServiceProcess:
    """`python -m uvicorn main:app` as production starts it, in a subprocess whose stdout and stderr go to files."""

    def __init__(self, environment: dict[str, str], directory: Path, name: str) -> None:
        self.environment = environment
        self.directory = directory
        self.stderr_path = directory / f"{name}.stderr"
        self.stdout_path = directory / f"{name}.stdout"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "ServiceProcess":
        clean = {key: value for key, value in os.environ.items() if key in {"PATH", "HOME", "LANG", "SYSTEMROOT"}}
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [*PRODUCTION_COMMAND, "--app-dir", str(PROJECT_ROOT), "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.directory,  # no .env here: only `environment` configures the service
                env=clean | self.environment,
                stdout=stdout,
                stderr=stderr,
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                httpx.get(f"{self.url}/health", timeout=5)
                return self
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the service did not start:\n{self.stderr_path.read_text()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, as a platform stops it, then wait for the process to end."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STARTUP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def parse_json_lines(data: bytes) -> list[dict[str, Any]]:
    """Every line of `data` as a JSON object, failing on the first line that is not one."""
    text = data.decode("ascii")  # ensure_ascii: any other byte is a failure here
    assert text.endswith("\n"), text[-200:]
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text), "a control character other than the line ends"
    records = []
    for line in text.split("\n")[:-1]:
        record = json.loads(line)
        assert isinstance(record, dict), line
        records.append(record)
    return records


def assert_base_fields(record: dict[str, Any]) -> None:
    """The fields every record has: `time` (ISO 8601 in UTC, with its offset), `level`, `logger`, `message`."""
    moment = datetime.fromisoformat(record["time"])
    assert "T" in record["time"] and moment.utcoffset() == timedelta(0), record
    assert record["level"] in LEVELS, record
    assert isinstance(record["logger"], str) and record["logger"], record
    assert isinstance(record["message"], str), record


def raw_websocket_handshake(url: str, target: str) -> bytes:
    """The status line uvicorn answers a WebSocket handshake for `target` with."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        return connection.recv(4096).split(b"\r\n", 1)[0]


@pytest.fixture
def service_database_url(database_url: str, tmp_path: Path) -> str:
    """A database for the subprocess: a SQLite file of its own, or this run's PostgreSQL database."""
    if make_url(database_url).get_backend_name() == "sqlite":
        return f"sqlite:///{tmp_path / 'todo.db'}"
    return database_url


def test_every_line_is_one_json_record_across_a_restart(
    service_database_url: str, tmp_path: Path, token_for: TokenFor, user_id: str, other_user_id: str
) -> None:
    environment = {"LOG_FORMAT": "json", "DATABASE_URL": service_database_url, "BETTER_AUTH_SECRET": SECRET}
    marker = f"MARKER-{uuid.uuid4().hex}"
    token = token_for(user_id)
    forged_token = token_for(user_id, secret="another-secret-that-is-long-enough-0123456789")
    query_token = token_for(user_id, purpose="query")
    valid = {"Authorization": f"Bearer {token}"}
    injected_path = (
        f"/api/{user_id}/tasks/%0D%0A{quote(FORGED_RECORD, safe='')}%E2%80%A8{quote(FORGED_RECORD, safe='')}%7F"
    )
    tasks, one_task = "/api/{user_id}/tasks", "/api/{user_id}/tasks/{task_id}"
    # request id -> (method, route, path, status, user_id) its record must carry
    expected: dict[str, tuple[str, str | None, str, int, str | None]] = {}

    def send(http: httpx.Client, method: str, path: str, route: str | None, status: int, **options: Any) -> Any:
        response = http.request(method, path, **options)
        assert response.status_code == status, response.text
        verified_user = user_id if options.get("headers") is valid and status != 401 else None
        expected[response.headers["x-request-id"]] = (method, route, unquote(path), status, verified_user)
        return response.json() if response.content else None

    forged = {"Authorization": f"Bearer {forged_token}"}
    with ServiceProcess(environment, tmp_path, "first") as service, httpx.Client(base_url=service.url) as http:
        task = send(http, "POST", f"/api/{user_id}/tasks", tasks, 201, json={"title": marker}, headers=valid)
        task_path = f"/api/{user_id}/tasks/{task['id']}"
        send(http, "GET", task_path, one_task, 200, headers=valid)
        send(http, "HEAD", f"/api/{user_id}/tasks", tasks, 200, headers=valid)
        send(http, "GET", f"/api/{user_id}/tasks", tasks, 401, headers=forged)
        send(http, "GET", f"/api/{other_user_id}/tasks", tasks, 403, headers=valid)
        send(http, "GET", "/nowhere", None, 404)
        send(http, "POST", f"/api/{user_id}/tasks", tasks, 422, json={"description": marker}, headers=valid)
        send(http, "GET", injected_path, one_task, 422, headers=valid)
        handshake = raw_websocket_handshake(service.url, f"/api/{user_id}/tasks?token={query_token}")
        assert handshake.startswith(b"HTTP/1.1 403"), handshake

    with ServiceProcess(environment, tmp_path, "second") as service, httpx.Client(base_url=service.url) as http:
        assert [each["title"] for each in send(http, "GET", f"/api/{user_id}/tasks", tasks, 200, headers=valid)] == [
            marker
        ]
        send(http, "DELETE", task_path, one_task, 204, headers=valid)

    runs = {}
    for name in ("first", "second"):
        data = (tmp_path / f"{name}.stderr").read_bytes()
        assert (tmp_path / f"{name}.stdout").read_bytes() == b""
        for leak in (token, forged_token, query_token, SECRET, marker):
            assert leak.encode() not in data, leak
        for signed in (token, forged_token, query_token):
            assert signed.rsplit(".", 1)[1].encode() not in data
        runs[name] = parse_json_lines(data)
        for record in runs[name]:
            assert_base_fields(record)
        uvicorn_messages = [record["message"] for record in runs[name] if record["logger"] == "uvicorn.error"]
        for message in ("Started server process", "Application startup complete.", "Finished server process"):
            assert any(each.startswith(message) for each in uvicorn_messages), (message, uvicorn_messages)
        assert any(record["logger"] == "todo" and record["message"].startswith("starting:") for record in runs[name])
    records = runs["first"] + runs["second"]

    for request_id, (method, route, path, status, verified_user) in expected.items():
        found = [each for each in records if each["logger"] == "todo.access" and each.get("request_id") == request_id]
        assert len(found) == 1, (request_id, found)
        record = found[0]
        assert (record["method"], record["route"], record["path"], record["status"]) == (method, route, path, status)
        assert record.get("user_id") == verified_user, record
        assert isinstance(record["duration_ms"], int | float) and record["duration_ms"] >= 0, record
        assert record["level"] == "INFO"
    # The path's line breaks, U+2028 and DEL came back as the characters sent, inside one record.
    assert not [record for record in records if record["logger"] == "forged"]
    handshakes = [record["message"] for record in records if "WebSocket" in record["message"]]
    assert handshakes and all(f"/api/{user_id}/tasks" in each and "?" not in each for each in handshakes), handshakes


def installed_handler() -> logging.StreamHandler:  # type: ignore[type-arg]
    """The one handler the last logging configuration (create_app's) installed."""
    handlers = [
        handler
        for owner in (logging.getLogger(), logging.getLogger("todo"))
        for handler in owner.handlers
        if handler.get_name() == HANDLER_NAME
    ]
    assert len(handlers) == 1 and isinstance(handlers[0], logging.StreamHandler), handlers
    return handlers[0]


@pytest.fixture
def captured_log() -> Iterator[Callable[[], io.StringIO]]:
    """`captured_log()`: what the installed handler writes, from now on.

    Afterwards the process is back to the default text configuration, for the tests that follow.
    """

    def capture() -> io.StringIO:
        stream = io.StringIO()
        installed_handler().setStream(stream)
        return stream

    yield capture
    configure_logging("info", "text")


def wait_for_text(stream: io.StringIO, text: str) -> str:
    """Everything written to `stream`, once it holds `text` (an access line is written just after its response)."""
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while text not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    return stream.getvalue()


def crashing_app(database_url: str, jwks_server: JwksServer, log_format: str, crash_message: str) -> FastAPI:
    """The service with one more route, which crashes with `crash_message`: the real routes have no such bug."""
    app = create_app(make_settings(database_url, jwks_server, log_format=log_format))

    def crash() -> None:
        """Stands in for any bug."""
        raise RuntimeError(crash_message)

    app.add_api_route("/crash", crash)
    return app


def test_a_traceback_stays_inside_its_json_record(
    database_url: str, jwks_server: JwksServer, serve: Serve, captured_log: Callable[[], io.StringIO]
) -> None:
    crash_message = f"bad input\n{FORGED_RECORD}\u2028{FORGED_RECORD}\r\x7f"
    app = crashing_app(database_url, jwks_server, "json", crash_message)
    stream = captured_log()
    with serve(app) as live:
        response = httpx.get(f"{live.url}/crash", timeout=30)
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    records = parse_json_lines(wait_for_text(stream, f'"request_id": "{request_id}"').encode())
    for record in records:
        assert_base_fields(record)
    crashes = [record for record in records if "exc_info" in record]
    assert len(crashes) == 1, records
    assert crashes[0]["level"] == "ERROR" and crashes[0]["logger"] == "todo", crashes
    assert crashes[0]["exc_info"].startswith("Traceback (most recent call last):\n")
    assert crashes[0]["exc_info"].endswith(f"RuntimeError: {crash_message}")
    assert not [record for record in records if record["logger"] == "forged"]
    access = [record for record in records if record.get("request_id") == request_id]
    assert [(each["route"], each["status"], each["user_id"]) for each in access] == [("/crash", 500, None)]


def test_text_access_line_is_unchanged(
    database_url: str,
    jwks_server: JwksServer,
    serve: Serve,
    captured_log: Callable[[], io.StringIO],
    token_for: TokenFor,
    user_id: str,
) -> None:
    app = create_app(make_settings(database_url, jwks_server, log_format="text"))
    stream = captured_log()
    with serve(app) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        listed = http.get(f"/api/{user_id}/tasks", headers={"Authorization": f"Bearer {token_for(user_id)}"})
        injected = http.get("/no%0D%0Awhere%E2%80%A8")
    lines = wait_for_text(stream, injected.headers["x-request-id"]).splitlines()
    today = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO todo\.access: "
    for response, logged_path in ((listed, f"/api/{user_id}/tasks"), (injected, r"/no\x0d\x0awhere\u2028")):
        request_id = response.headers["x-request-id"]
        line = today + re.escape(f"GET {logged_path} {response.status_code} ") + r"\d+\.\dms request_id=" + request_id
        assert [each for each in lines if re.fullmatch(line, each)], (line, lines)


def test_a_text_traceback_is_indented_under_its_record(
    database_url: str, jwks_server: JwksServer, serve: Serve, captured_log: Callable[[], io.StringIO]
) -> None:
    crash_message = f"bad input\n{FORGED_TEXT_LINE}\u2028{FORGED_TEXT_LINE}\r{FORGED_TEXT_LINE}"
    app = crashing_app(database_url, jwks_server, "text", crash_message)
    stream = captured_log()
    with serve(app) as live:
        response = httpx.get(f"{live.url}/crash", timeout=30)
    assert response.status_code == 500
    text = wait_for_text(stream, response.headers["x-request-id"])
    assert "\u2028" not in text and "\r" not in text
    record_start = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
    margin = [line for line in text.splitlines() if not line.startswith(TRACEBACK_INDENT)]
    assert all(record_start.match(line) for line in margin), margin
    assert [line for line in margin if "forged" in line] == []
    assert f"{TRACEBACK_INDENT}{FORGED_TEXT_LINE}\\u2028{FORGED_TEXT_LINE}\\x0d{FORGED_TEXT_LINE}" in text.splitlines()


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_any_message_is_one_line(log_format: str, captured_log: Callable[[], io.StringIO]) -> None:
    # No log call passes a client's text today (the access line escapes its path): this holds for the next one.
    # The records go to the installed handler alone: pytest's own handlers fail a test on a malformed call.
    configure_logging("info", log_format)  # type: ignore[arg-type]
    stream = captured_log()
    client_text = f"one\r\n{FORGED_RECORD}\u2028{FORGED_TEXT_LINE}\x85\x1b[2J"
    make_record = logging.getLogger("todo.test").makeRecord
    for message, arguments in (("a client's text: %s", (client_text,)), ("%s and %s, one argument too few", ("a",))):
        installed_handler().handle(make_record("todo.test", logging.WARNING, "", 0, message, arguments, None))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    if log_format == "json":
        records = parse_json_lines(stream.getvalue().encode())
        assert records[0]["message"] == f"a client's text: {client_text}"
        assert records[1]["message"].startswith("%s and %s, one argument too few")
    else:
        start = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING todo\.test: "
        assert all(re.match(start, line) for line in lines), lines
        assert lines[0].endswith(f"one\\x0d\\x0a{FORGED_RECORD}\\u2028{FORGED_TEXT_LINE}\\x85\\x1b[2J"), lines
