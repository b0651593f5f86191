"""One log line per request, with a request id the response also carries; never a token or secret."""

import logging
import re
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import SECRET

ACCESS_LINE = re.compile(r"^(GET|POST|PUT|PATCH|DELETE|OPTIONS) (\S+) (\d{3}) (\d+\.\d)ms request_id=(\S+)$")


@pytest.fixture
def service_log() -> Iterator[list[logging.LogRecord]]:
    """Every record the service logs while the test runs."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    logger = logging.getLogger("todo")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG)
    yield records
    logger.setLevel(previous_level)
    logger.removeHandler(handler)


def access_lines(
    records: list[logging.LogRecord], at_least: int = 1, request_id: str | None = None
) -> list[re.Match[str]]:
    """The parsed access-log lines among `records` (of one request, if given), waiting for `at_least` of them.

    A line is written once its response has gone out, so it may land just after the client reads it.
    """
    deadline = time.monotonic() + 30
    while True:
        lines = [
            m
            for r in list(records)
            if r.name == "todo.access" and (m := ACCESS_LINE.match(r.getMessage())) and request_id in (None, m.group(5))
        ]
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def test_each_request_logs_one_line_with_its_request_id(
    client: httpx.Client, auth: Callable, user_id: str, service_log: list[logging.LogRecord]
) -> None:
    response = client.get(f"/api/{user_id}/tasks", params={"q": "private"}, headers=auth(user_id))
    lines = access_lines(service_log, request_id=response.headers["x-request-id"])
    assert len(lines) == 1
    method, path, status, _duration, _request_id = lines[0].groups()
    assert (method, path, status) == ("GET", f"/api/{user_id}/tasks", "200")


def test_every_response_has_a_request_id_even_errors(client: httpx.Client) -> None:
    ids = {client.get(path).headers["x-request-id"] for path in ("/health", "/nowhere", "/api/u/tasks")}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_a_sane_incoming_request_id_is_kept(client: httpx.Client) -> None:
    assert client.get("/health", headers={"X-Request-ID": "trace-abc.123"}).headers["x-request-id"] == "trace-abc.123"


def test_an_unsafe_incoming_request_id_is_replaced(client: httpx.Client) -> None:
    response = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 100})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_tokens_and_secrets_never_reach_the_log(
    client: httpx.Client, token_for: Callable, user_id: str, service_log: list[logging.LogRecord]
) -> None:
    good = token_for(user_id)
    expired = token_for(user_id, exp=1)
    forged = token_for(user_id, secret="another-secret-that-is-long-enough-012345")
    for token in (good, expired, forged, "not.a.token"):
        client.get(f"/api/{user_id}/tasks", headers={"Authorization": f"Bearer {token}"})
        client.post(f"/api/{user_id}/tasks", content=b"{bad json", headers={"Authorization": f"Bearer {token}"})
    assert len(access_lines(service_log, at_least=8)) >= 8
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in service_log)
    for token in (good, expired, forged):
        assert token not in logged and token.split(".")[2] not in logged
    assert SECRET not in logged
