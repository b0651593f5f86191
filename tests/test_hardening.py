"""Regression tests for the HTTP-level hardening: user ids in URLs the service builds, ids never reused,
ids with leading zeros, log lines no client can forge, a 500 a browser can read, HEAD, Retry-After on
every 503, Cache-Control on a user's data, the headers CORS exposes, and no user content in the log.

Everything runs against the real service over HTTP, on SQLite and (with TEST_DATABASE_URL) PostgreSQL.
"""

import contextlib
import logging
import re
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from main import create_app
from tests.conftest import FRONTEND_ORIGIN, free_port, make_settings
from tests.keys import JwksServer
from tests.test_faults import impatient_app, libpq_url, serving

if TYPE_CHECKING:
    from tests.conftest import LiveServer

Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]
Serve = Callable[[FastAPI], "LiveServer"]

# User ids that are awkward in a URL: non-ASCII, URL delimiters, an escape that must not be decoded twice.
AWKWARD_SUBS = ["用户", "a?b", "a b", "a#b", "a%2Fb", "ä", "x;y", '"q"']
# Characters that may not appear as such in a URL (RFC 3986), besides non-ASCII and control characters.
UNSAFE_URL_CHARACTERS = frozenset(' "<>\\^`{|}#')
LINK_ENTRY = re.compile(r'<([^>]*)>\s*;\s*rel="([a-z]+)"')
# Percent-encoded path pieces that decode to line breaks, ESC or other control characters.
LOG_INJECTIONS = ["%0D%0A", "%0A", "%0D", "%1B[31m", "%E2%80%A8", "%C2%85", "%00", "%09"]
# Headers that differ between any two responses, whatever the method.
PER_RESPONSE_HEADERS = {"date", "x-request-id"}
INTERNAL_ERROR = {"detail": "Internal server error", "code": "internal_error"}
LOG_WAIT_SECONDS = 30


def tasks_path(user_id: str, suffix: str = "") -> str:
    """The path of a user's tasks (or below them), with the user id percent-encoded as a client must send it."""
    return f"/api/{quote(user_id, safe='')}/tasks{suffix}"


def raw_header(response: httpx.Response, name: str) -> bytes:
    """The one value of header `name` exactly as it came over the wire."""
    values = [value for key, value in response.headers.raw if key.lower() == name.encode()]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


def assert_ascii_percent_encoded_url(raw_url: bytes, expected_path: str) -> str:
    """`raw_url` is plain ASCII with nothing a URL may not contain, and its path decodes to `expected_path`."""
    assert raw_url.isascii(), raw_url
    url = raw_url.decode("ascii")
    assert not UNSAFE_URL_CHARACTERS & set(url), url
    assert all(" " < character < "\x7f" for character in url), url
    assert unquote(urlsplit(url).path) == expected_path, url
    return url


def page_links(response: httpx.Response) -> dict[str, str]:
    """The `Link` header's URLs by `rel`, each checked to be ASCII and percent-encoded (empty without one).

    Parsed here rather than by httpx, whose parser splits a URL at a `;` in it.
    """
    if "link" not in response.headers:
        return {}
    links = {rel: url.encode() for url, rel in LINK_ENTRY.findall(raw_header(response, "link").decode("latin-1"))}
    assert links, response.headers["link"]
    expected_path = unquote(response.request.url.raw_path.decode("ascii").split("?")[0])
    return {rel: assert_ascii_percent_encoded_url(url, expected_path) for rel, url in links.items()}


def awkward_user(sub: str) -> str:
    """A user id holding `sub`, unique to this test so its tasks are its own."""
    return f"{sub}-{uuid.uuid4().hex[:8]}"


# --- 1. User ids are percent-encoded in the URLs the service builds ---------------------------------


@pytest.mark.parametrize("sub", AWKWARD_SUBS)
def test_location_of_an_awkward_user_is_percent_encoded_and_reachable(
    client: httpx.Client, auth: Auth, sub: str
) -> None:
    user = awkward_user(sub)
    created = client.post(tasks_path(user), json={"title": "Reachable"}, headers=auth(user))
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["user_id"] == user
    location = assert_ascii_percent_encoded_url(raw_header(created, "location"), f"/api/{user}/tasks/{task['id']}")
    fetched = client.get(location, headers=auth(user))
    assert fetched.status_code == 200, fetched.text
    assert fetched.json() == task


@pytest.mark.parametrize("sub", AWKWARD_SUBS)
def test_page_links_of_an_awkward_user_are_percent_encoded_and_lead_to_the_other_pages(
    client: httpx.Client, auth: Auth, sub: str
) -> None:
    user = awkward_user(sub)
    for number in range(3):
        assert client.post(tasks_path(user), json={"title": f"Task {number}"}, headers=auth(user)).status_code == 201

    first = client.get(tasks_path(user), params={"limit": 1}, headers=auth(user))
    assert first.status_code == 200, first.text
    first_links = page_links(first)
    assert set(first_links) == {"next"}
    second = client.get(first_links["next"], headers=auth(user))
    assert second.status_code == 200, second.text
    second_links = page_links(second)
    assert set(second_links) == {"next", "prev"}
    third = client.get(second_links["next"], headers=auth(user))
    assert third.status_code == 200, third.text
    third_links = page_links(third)
    assert set(third_links) == {"prev"}
    back = client.get(third_links["prev"], headers=auth(user))
    assert back.status_code == 200, back.text
    back_to_first = client.get(second_links["prev"], headers=auth(user))
    assert back_to_first.status_code == 200, back_to_first.text

    pages = [first, second, third]
    assert [page.headers["x-total-count"] for page in [*pages, back, back_to_first]] == ["3"] * 5
    ids = [task["id"] for page in pages for task in page.json()]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert back.json() == second.json()
    assert back_to_first.json() == first.json()


SLASH_SUBS = ["a/b", "/leading", "trailing/"]
EVERY_ROUTE = [
    ("GET", "/tasks", None),
    ("POST", "/tasks", {"title": "Refused"}),
    ("GET", "/tasks/1", None),
    ("PUT", "/tasks/1", {"title": "Refused"}),
    ("PATCH", "/tasks/1", {"title": "Refused"}),
    ("DELETE", "/tasks/1", None),
    ("PATCH", "/tasks/1/complete", None),
]


@pytest.mark.parametrize("sub", SLASH_SUBS)
def test_a_token_whose_user_contains_a_slash_is_401_on_every_route(
    client: httpx.Client, token_for: Callable[..., str], sub: str
) -> None:
    headers = {"Authorization": f"Bearer {token_for(sub)}"}
    # No path can name this user: whatever user the path names, the token itself is refused, before any 403.
    for path_user in ("someone", quote(sub.replace("/", ""), safe="")):
        for method, suffix, body in EVERY_ROUTE:
            response = client.request(method, f"/api/{path_user}{suffix}", json=body, headers=headers)
            assert response.status_code == 401, f"{method} {suffix}: {response.status_code} {response.text}"
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "user" in response.json()["detail"].lower(), response.text


# --- 2. Ids are never reused -----------------------------------------------------------------------


def test_the_id_of_a_deleted_task_is_never_reused(client: httpx.Client, auth: Auth, user_id: str) -> None:
    headers = auth(user_id)
    deleted = client.post(tasks_path(user_id), json={"title": "Short-lived"}, headers=headers).json()
    assert client.delete(tasks_path(user_id, f"/{deleted['id']}"), headers=headers).status_code == 204
    kept = client.post(tasks_path(user_id), json={"title": "Kept"}, headers=headers).json()
    assert kept["id"] > deleted["id"]

    old = tasks_path(user_id, f"/{deleted['id']}")
    assert client.get(old, headers=headers).status_code == 404
    assert client.patch(old, json={"title": "Changed through a dead id"}, headers=headers).status_code == 404
    assert client.patch(f"{old}/complete", headers=headers).status_code == 404
    assert client.delete(old, headers=headers).status_code == 404
    still = client.get(tasks_path(user_id, f"/{kept['id']}"), headers=headers)
    assert still.status_code == 200 and still.json() == kept


# --- 3. Ids with leading zeros ---------------------------------------------------------------------


def test_an_id_with_leading_zeros_is_the_same_task(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    for spelled in (f"0000{task['id']}", str(task["id"]).zfill(25)):
        response = client.get(tasks_path(user_id, f"/{spelled}"), headers=auth(user_id))
        assert response.status_code == 200, f"{spelled}: {response.status_code} {response.text}"
        assert response.json() == task


@pytest.mark.parametrize("spelled", ["0" * 30, "-0", "-5", "9" * 5000], ids=["zeros", "minus-0", "minus-5", "5000"])
def test_an_id_no_task_can_have_is_404_however_it_is_spelled(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask, spelled: str
) -> None:
    make_task(user_id)
    response = client.get(tasks_path(user_id, f"/{spelled}"), headers=auth(user_id))
    assert response.status_code == 404, response.text
    assert response.json()["code"] == "task_not_found"


# --- 4. No forged log lines ------------------------------------------------------------------------


@contextlib.contextmanager
def captured_logs(*logger_names: str) -> Iterator[list[logging.LogRecord]]:
    """Every record of these loggers, at DEBUG, while the block runs; their levels are restored after."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    loggers = [logging.getLogger(name) for name in logger_names]
    previous_levels = [each.level for each in loggers]
    for each in loggers:
        each.addHandler(handler)
        each.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        for each, level in zip(loggers, previous_levels, strict=True):
            each.setLevel(level)
            each.removeHandler(handler)


def exception_text(record: logging.LogRecord) -> str:
    """The record's exception and stack as a formatter would write them ("" when it has none)."""
    parts = [record.exc_text or "", record.stack_info or ""]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(part for part in parts if part)


def line_breaking_characters(text: str) -> set[str]:
    """Characters in `text` that end a line (for `str.splitlines()` or a terminal) or are control characters."""
    return {character for character in text if unicodedata.category(character) in {"Cc", "Zl", "Zp"}}


def access_records(records: list[logging.LogRecord], request_id: str) -> list[logging.LogRecord]:
    """The access-log records of one request, waiting a while for the first (it is written after the response)."""
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while True:
        found = [r for r in list(records) if r.name == "todo.access" and request_id in r.getMessage()]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def test_control_characters_in_a_path_cannot_forge_log_lines(client: httpx.Client) -> None:
    # (text before the injection, text after it, the status routing gives): both texts must reach the log.
    shapes = [("/api/in", "jected/tasks", 401), ("/no", "where", 404)]
    with captured_logs("todo") as records:
        requests = []
        for injection in LOG_INJECTIONS:
            for before, after, status in shapes:
                path = f"{before}{injection}{after}"
                response = client.get(path)
                assert response.status_code == status, f"{path}: {response.status_code} {response.text}"
                sent = f"{before}{unquote(injection)}{after}"
                requests.append((path, sent, before, after, status, response.headers["x-request-id"]))
        lines = {request_id: access_records(records, request_id) for *_, request_id in requests}
        logged = list(records)

    for path, _sent, before, after, status, request_id in requests:
        assert len(lines[request_id]) == 1, f"{path}: {[r.getMessage() for r in lines[request_id]]}"
        message = lines[request_id][0].getMessage()
        assert not line_breaking_characters(message), f"{path}: {message!r}"
        assert str(status) in message.split(), f"{path}: {message!r}"
        assert before in message and after in message, f"{path}: {message!r}"
    for record in logged:
        message = record.getMessage()
        assert not line_breaking_characters(message), f"{record.name}: {message!r}"
        # A traceback is several lines by nature: none of the paths sent may be in it as sent.
        traceback = exception_text(record)
        assert not line_breaking_characters(traceback) - {"\n"}, f"{record.name}: {traceback!r}"
        assert not [sent for _path, sent, *_ in requests if sent in traceback], traceback


# --- 5. A 500 still carries CORS headers -----------------------------------------------------------


def test_a_500_carries_the_cors_headers_and_no_traceback(
    database_url: str, jwks_server: JwksServer, serve: Serve
) -> None:
    app = create_app(make_settings(database_url, jwks_server))

    def boom() -> None:
        """A route that crashes, standing in for any bug."""
        raise RuntimeError("internal detail that must stay inside")

    app.add_api_route("/api/{user_id}/boom", boom)
    with serve(app) as live:
        response = httpx.get(f"{live.url}/api/u/boom", headers={"Origin": FRONTEND_ORIGIN}, timeout=30)
    assert response.status_code == 500, response.text
    assert response.json() == INTERNAL_ERROR
    assert "Traceback" not in response.text and "internal detail" not in response.text
    assert response.headers["access-control-allow-origin"] == FRONTEND_ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


# --- 6. HEAD works wherever GET does ---------------------------------------------------------------


def assert_head_answers_like_get(client: httpx.Client, path: str, headers: dict[str, str]) -> httpx.Response:
    """HEAD on `path` has GET's status and headers (Content-Length that of GET's body) and no body."""
    got = client.get(path, headers=headers)
    head = client.head(path, headers=headers)
    assert head.status_code == got.status_code, f"HEAD {path}: {head.status_code} {head.headers}"
    assert head.content == b""
    assert head.headers["content-length"] == str(len(got.content))
    assert {k: v for k, v in head.headers.items() if k not in PER_RESPONSE_HEADERS} == {
        k: v for k, v in got.headers.items() if k not in PER_RESPONSE_HEADERS
    }
    return head


def test_head_answers_like_get_on_the_service_routes(client: httpx.Client) -> None:
    for path in ("/health", "/"):
        assert assert_head_answers_like_get(client, path, {}).status_code == 200


def test_head_answers_like_get_on_a_task_and_a_paged_list(
    client: httpx.Client, auth: Auth, user_id: str, make_task: MakeTask
) -> None:
    task = make_task(user_id)
    make_task(user_id)
    one = assert_head_answers_like_get(client, tasks_path(user_id, f"/{task['id']}"), auth(user_id))
    assert one.status_code == 200
    listed = assert_head_answers_like_get(client, f"{tasks_path(user_id)}?limit=1", auth(user_id))
    assert listed.status_code == 200
    assert listed.headers["x-total-count"] == "2"
    assert 'rel="next"' in listed.headers["link"]


def test_head_without_a_token_is_401_like_get(client: httpx.Client, user_id: str) -> None:
    for path in (tasks_path(user_id), tasks_path(user_id, "/1")):
        head = assert_head_answers_like_get(client, path, {})
        assert head.status_code == 401
        assert head.headers["www-authenticate"].startswith("Bearer")


def allowed(response: httpx.Response) -> set[str]:
    """The methods a 405's `Allow` header names."""
    assert response.status_code == 405, response.text
    return {method.strip() for method in response.headers["allow"].split(",")}


def test_head_where_there_is_no_get_is_405_naming_patch(client: httpx.Client, auth: Auth, user_id: str) -> None:
    methods = allowed(client.head(tasks_path(user_id, "/1/complete"), headers=auth(user_id)))
    assert "PATCH" in methods and not {"GET", "HEAD"} & methods


def test_allow_of_a_405_names_head_beside_get(client: httpx.Client, user_id: str) -> None:
    methods = allowed(client.put(tasks_path(user_id), json={"title": "Not here"}))
    assert {"GET", "HEAD", "POST"} <= methods and "PUT" not in methods


# --- 7. Retry-After on every 503 -------------------------------------------------------------------


def unreachable_database_url(database_kind: str, database_url: str, tmp_path: Path) -> str:
    """A URL of this run's kind of database at which nothing can be reached."""
    if database_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'no-such-directory' / 'todo.db'}"
    return make_url(database_url).set(host="127.0.0.1", port=free_port()).render_as_string(hide_password=False)


def assert_retry_after(response: httpx.Response) -> None:
    """A 503 that says when to try again: `Retry-After` in whole seconds, more than none."""
    assert response.status_code == 503, response.text
    retry_after = response.headers.get("retry-after", "")
    assert retry_after.isdigit() and int(retry_after) > 0, f"Retry-After: {retry_after!r}"


def test_every_503_for_an_unreachable_database_carries_retry_after(
    database_kind: str,
    database_url: str,
    jwks_server: JwksServer,
    serve: Serve,
    auth: Auth,
    user_id: str,
    tmp_path: Path,
) -> None:
    unreachable = unreachable_database_url(database_kind, database_url, tmp_path)
    with (
        serve(create_app(make_settings(unreachable, jwks_server))) as live,
        httpx.Client(base_url=live.url, timeout=30) as http,
    ):
        health = http.get("/health")
        assert_retry_after(health)
        assert health.json()["status"] == "unhealthy"
        listed = http.get(tasks_path(user_id), headers=auth(user_id))
        assert_retry_after(listed)
        assert listed.json()["code"] == "database_unavailable"
        created = http.post(tasks_path(user_id), json={"title": "Nowhere to go"}, headers=auth(user_id))
        assert_retry_after(created)


# --- 8. Cache-Control: no-store on a user's data ---------------------------------------------------


def assert_not_stored(response: httpx.Response, status: int = 200) -> None:
    """A successful response that no cache may keep."""
    assert response.status_code == status, response.text
    directives = {d.strip().lower() for d in response.headers.get("cache-control", "").split(",")}
    assert "no-store" in directives, f"{response.request.method} {response.request.url.path}: {directives}"


def test_every_response_with_a_users_tasks_is_no_store(client: httpx.Client, auth: Auth, user_id: str) -> None:
    headers = auth(user_id)
    created = client.post(tasks_path(user_id), json={"title": "Private"}, headers=headers)
    assert_not_stored(created, 201)
    task = tasks_path(user_id, f"/{created.json()['id']}")
    assert_not_stored(client.get(tasks_path(user_id), headers=headers))
    assert_not_stored(client.get(task, headers=headers))
    assert_not_stored(client.put(task, json={"title": "Still private"}, headers=headers))
    assert_not_stored(client.patch(task, json={"description": "Very"}, headers=headers))
    assert_not_stored(client.patch(f"{task}/complete", headers=headers))
    assert_not_stored(client.patch(f"{task}/complete", json={"completed": False}, headers=headers))


# --- 9. CORS exposes X-Request-ID and Retry-After --------------------------------------------------


def test_cors_exposes_request_id_and_retry_after_beside_the_paging_headers(
    client: httpx.Client, auth: Auth, user_id: str
) -> None:
    response = client.get(tasks_path(user_id), headers=auth(user_id) | {"Origin": FRONTEND_ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == FRONTEND_ORIGIN
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-total-count", "link", "location", "x-request-id", "retry-after"} <= exposed


# --- 10. No user content in the log ----------------------------------------------------------------


def everything_logged(record: logging.LogRecord) -> str:
    """All a handler could write of `record`: its message, its raw arguments, its exception and stack."""
    return "\n".join([record.getMessage(), repr(record.args), exception_text(record)])


@pytest.mark.postgresql_only
def test_a_refused_statement_puts_no_task_text_in_the_log(
    database_url: str, jwks_server: JwksServer, serve: Serve, auth: Auth, user_id: str
) -> None:
    marker = f"SECRET-TEXT-{uuid.uuid4()}"
    with (
        serving(serve, impatient_app(database_url, jwks_server)) as live,
        httpx.Client(base_url=live.url, timeout=30) as http,
        psycopg.connect(libpq_url(database_url)) as locker,
    ):
        # The service created its tables on start-up; hold them so its INSERT waits past its 1 s timeout.
        locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        try:
            with captured_logs("todo", "sqlalchemy") as records:
                response = http.post(
                    tasks_path(user_id),
                    json={"title": f"Title {marker}", "description": f"Description {marker}"},
                    headers=auth(user_id),
                )
                access = access_records(records, response.headers["x-request-id"])
                logged = list(records)
        finally:
            locker.rollback()
    assert response.status_code == 503, response.text
    # The capture was live: it holds the request's access line and the refused INSERT, logged at DEBUG.
    assert len(access) == 1
    assert any(record.getMessage().startswith("INSERT INTO tasks") for record in logged)
    leaks = [everything_logged(record) for record in logged if marker in everything_logged(record)]
    assert not leaks, leaks
