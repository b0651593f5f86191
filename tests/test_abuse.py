"""Abusive requests: lying and endless bodies, absurdly nested JSON, huge URLs and headers, floods of
bad tokens and of unknown signing keys. Each gets a 4xx (a key id never seen, while the key set may not
be fetched again yet, a 503 to retry), never a 500 or a hang; the service keeps answering, its memory
stays flat, and Better Auth's key endpoint is not hammered.

The live server runs in this process, so its memory is this process's resident set (VmRSS).
Requests the HTTP client refuses to build (a URL over 64 KiB) are written on a raw socket.
"""

import base64
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import FastAPI

from auth import JWKS_MIN_REFETCH_SECONDS
from main import MAX_BODY_BYTES, create_app
from settings import Settings
from tests.keys import JwksServer, better_auth_claims, new_key_pair

if TYPE_CHECKING:
    from tests.conftest import LiveServer

Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]

MIB = 1024 * 1024
PROMPT_ANSWER_SECONDS = 15  # generous: a slow machine passes, a hang does not
SOCKET_TIMEOUT_SECONDS = 30


def resident_memory() -> int:
    """This process's resident set in bytes: the live server's memory, since it runs in a thread here."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def tasks_url(user_id: str, task_id: int | str | None = None, suffix: str = "") -> str:
    """The URL of a user's tasks, or of one of them."""
    return f"/api/{user_id}/tasks" + (f"/{task_id}" if task_id is not None else "") + suffix


@dataclass(frozen=True)
class RawResponse:
    """One HTTP/1.1 response as it came off the wire."""

    status: int
    headers: dict[str, str]
    body: bytes

    def is_contract_error(self) -> bool:
        """Whether the body is the contract's JSON error (`detail` and `code`)."""
        if not self.headers.get("content-type", "").startswith("application/json"):
            return False
        body = json.loads(self.body)
        return isinstance(body, dict) and {"detail", "code"} <= body.keys()


def parse_responses(data: bytes) -> list[RawResponse]:
    """Every complete response in `data` (uvicorn gives each a Content-Length)."""
    responses = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
        length = int(headers.get("content-length", "0"))
        responses.append(RawResponse(int(status_line.split()[1]), headers, rest[:length]))
        data = rest[length:]
    return responses


def exchange_raw(port: int, request: bytes) -> list[RawResponse]:
    """Write `request` on a fresh connection and read until the server closes it: its responses, in order.

    The server may answer and close before it has read everything; what it answered still counts.
    """
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECONDS) as connection:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                received += chunk
    return parse_responses(received)


def raw_request(method: str, target: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """An HTTP/1.1 request written by hand, `Content-Length` included unless given in `headers`."""
    all_headers = {"Host": "127.0.0.1", "Connection": "close"} | headers
    if body and "Content-Length" not in headers:
        all_headers["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in all_headers.items())
    return (head + "\r\n").encode("latin-1") + body


def assert_still_serving(client: httpx.Client) -> None:
    """The service still answers, and its database is fine."""
    health = client.get("/health")
    assert health.status_code == 200, health.text


# --- Bodies ---------------------------------------------------------------------------------------

EXCESS_BYTES = 2 * MIB


@pytest.mark.parametrize(
    ("declared_body", "declared_status"),
    [
        pytest.param(b'{"title": "', 422, id="declared-part-is-invalid-json"),
        pytest.param(b'{"title":"Declared"}', 201, id="declared-part-is-a-whole-task"),
    ],
)
def test_content_length_shorter_than_the_body_is_never_5xx_and_the_excess_never_joins_the_body(
    client: httpx.Client,
    server: "LiveServer",
    auth: Auth,
    user_id: str,
    declared_body: bytes,
    declared_status: int,
) -> None:
    headers = auth(user_id) | {"Content-Type": "application/json", "Content-Length": str(len(declared_body))}
    request = raw_request("POST", tasks_url(user_id), headers, declared_body + b"x" * EXCESS_BYTES)

    responses = exchange_raw(server.port, request)

    # The declared bytes are the whole body; the excess is a second, malformed request, which
    # uvicorn answers with its own plain-text 400 before closing the connection. Which answers
    # the client gets depends on timing: the declared request's, the 400, or both. The client
    # lied about its body, so any of these is fair; a 5xx is not, nor is an excess byte stored.
    statuses = [response.status for response in responses]
    assert statuses and set(statuses) <= {declared_status, 400}, responses
    assert_still_serving(client)
    titles = [task["title"] for task in client.get(tasks_url(user_id), headers=auth(user_id)).json()]
    assert set(titles) <= {"Declared"}


ENDLESS_BODY_BYTES = 50 * MIB
CHUNK = b"x" * 65536
# What may be sent before the refusal arrives: the limit, plus what the two kernels' socket buffers hold.
MAX_BYTES_SENT_BEFORE_REFUSAL = 16 * MIB
MAX_MEMORY_GROWTH = 25 * MIB


def test_endless_chunked_body_is_refused_with_413_before_it_is_read(
    client: httpx.Client, auth: Auth, user_id: str
) -> None:
    sent = 0

    def endless_body() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"title": "'
        while sent < ENDLESS_BODY_BYTES:
            sent += len(CHUNK)
            yield CHUNK
        yield b'"}'

    assert_still_serving(client)
    memory_before = resident_memory()
    started = time.monotonic()
    response = client.post(
        tasks_url(user_id), content=endless_body(), headers=auth(user_id) | {"Content-Type": "application/json"}
    )

    assert "content-length" not in response.request.headers  # chunked: the size is never announced
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "payload_too_large"
    assert time.monotonic() - started < PROMPT_ANSWER_SECONDS
    assert sent < MAX_BYTES_SENT_BEFORE_REFUSAL, f"the server read {sent / MIB:.1f} MiB before refusing"
    assert resident_memory() - memory_before < MAX_MEMORY_GROWTH
    assert_still_serving(client)


# --- Deeply nested JSON ---------------------------------------------------------------------------

NESTING_DEPTHS = [500, 100_000]


def nested_list(field: str, depth: int) -> bytes:
    """`[[[...]]]`, `depth` deep, as the whole body."""
    return b"[" * depth + b"]" * depth


def nested_field(field: str, depth: int) -> bytes:
    """`{"<field>": {"a": {"a": ...}}}`, `depth` deep."""
    return b'{"' + field.encode() + b'": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


@pytest.mark.parametrize("depth", NESTING_DEPTHS)
@pytest.mark.parametrize("nest", [nested_list, nested_field])
@pytest.mark.parametrize(
    ("method", "suffix", "field"),
    [("POST", "", "title"), ("PUT", "/{id}", "title"), ("PATCH", "/{id}/complete", "completed")],
)
def test_deeply_nested_json_is_422_promptly(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    make_task: MakeTask,
    method: str,
    suffix: str,
    field: str,
    nest: Callable[[str, int], bytes],
    depth: int,
) -> None:
    task = make_task(user_id, "Untouched")
    body = nest(field, depth)
    assert len(body) < MAX_BODY_BYTES
    url = tasks_url(user_id) + suffix.format(id=task["id"])

    started = time.monotonic()
    response = client.request(method, url, content=body, headers=auth(user_id) | {"Content-Type": "application/json"})

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    assert time.monotonic() - started < PROMPT_ANSWER_SECONDS
    assert client.get(tasks_url(user_id), headers=auth(user_id)).json() == [task]


# --- Huge URLs and headers ------------------------------------------------------------------------

KB = 1000
# uvicorn's HTTP parser (httptools) refuses a request line of 64 KiB or more with its own plain-text 400.
LONG_TARGETS = {
    "q-of-100-KB": lambda user: tasks_url(user) + "?q=" + "a" * (100 * KB),
    "url-of-1-MB": lambda user: tasks_url(user) + "?q=" + "a" * (1000 * KB),
    "user-id-of-100-KB": lambda user: tasks_url("u" * (100 * KB)),
    "task-id-of-100-KB-digits": lambda user: tasks_url(user, "9" * (100 * KB)),
    "task-id-of-100-KB-letters": lambda user: tasks_url(user, "x" * (100 * KB)),
}


@pytest.mark.parametrize("target", LONG_TARGETS.values(), ids=LONG_TARGETS.keys())
def test_request_target_of_100_kb_or_more_is_4xx_and_the_service_keeps_answering(
    client: httpx.Client, server: "LiveServer", auth: Auth, user_id: str, target: Callable[[str], str]
) -> None:
    request = raw_request("GET", target(user_id), auth(user_id))

    started = time.monotonic()
    responses = exchange_raw(server.port, request)

    assert [response.status for response in responses] and 400 <= responses[0].status < 500, responses
    assert time.monotonic() - started < PROMPT_ANSWER_SECONDS
    assert_still_serving(client)


# Just under uvicorn's limit, the request reaches the app, which answers as the contract says.
TARGETS_UNDER_THE_LIMIT = {
    "q-of-60-KB": (lambda user: tasks_url(user) + "?q=" + "a" * (60 * KB), 422, "validation_error"),
    "user-id-of-60-KB": (lambda user: tasks_url("u" * (60 * KB)), 403, "forbidden"),
    "task-id-of-60-KB-letters": (lambda user: tasks_url(user, "x" * (60 * KB)), 422, "validation_error"),
}


@pytest.mark.parametrize(
    ("target", "status", "code"), TARGETS_UNDER_THE_LIMIT.values(), ids=TARGETS_UNDER_THE_LIMIT.keys()
)
def test_long_request_target_within_the_servers_limit_gets_the_contracts_answer(
    server: "LiveServer", auth: Auth, user_id: str, target: Callable[[str], str], status: int, code: str
) -> None:
    [response] = exchange_raw(server.port, raw_request("GET", target(user_id), auth(user_id)))

    assert response.status == status, response
    assert response.is_contract_error()
    assert json.loads(response.body)["code"] == code


@pytest.mark.parametrize("digits", [4300, 4301, 60 * KB])
def test_task_id_of_thousands_of_digits_is_404_however_large(
    server: "LiveServer", auth: Auth, user_id: str, digits: int
) -> None:
    # The API reference (docs/api.md): an integer with no task behind it, however large, is a 404.
    [response] = exchange_raw(server.port, raw_request("GET", tasks_url(user_id, "9" * digits), auth(user_id)))

    assert response.status == 404, response
    assert json.loads(response.body) == {"detail": "Task not found", "code": "task_not_found"}


def test_authorization_header_of_a_megabyte_is_401(client: httpx.Client, user_id: str) -> None:
    response = client.get(tasks_url(user_id), headers={"Authorization": "Bearer " + "a" * (1000 * KB)})

    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["code"] == "invalid_token"
    assert "aaaa" not in response.text  # the token is never echoed
    assert_still_serving(client)


def test_unrelated_header_of_a_megabyte_is_not_a_5xx(client: httpx.Client, auth: Auth, user_id: str) -> None:
    response = client.get(tasks_url(user_id), headers=auth(user_id) | {"X-Padding": "p" * (1000 * KB)})

    assert response.status_code < 500, response.text
    assert_still_serving(client)


# --- Floods ---------------------------------------------------------------------------------------

BAD_TOKEN_REQUESTS = 3000
BAD_TOKEN_CLIENTS = 4
WARM_UP_REQUESTS = 400
MAX_MEMORY_GROWTH_AFTER_FLOOD = 20 * MIB


def unsigned_token(user_id: str) -> str:
    """A token with `alg: none`, which the contract never accepts."""

    def encode(part: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()

    return f"{encode({'alg': 'none', 'typ': 'JWT'})}.{encode({'sub': user_id, 'exp': int(time.time()) + 600})}."


@dataclass(frozen=True)
class Refusal:
    """What a 401 carried that the contract cares about (kept instead of the response, which is large)."""

    status: int
    www_authenticate: str | None
    code: str | None

    @classmethod
    def of(cls, response: httpx.Response) -> "Refusal":
        """The parts of `response` that matter here."""
        is_json = response.headers.get("content-type", "").startswith("application/json")
        code = response.json().get("code") if is_json else None
        return cls(response.status_code, response.headers.get("www-authenticate"), code)


def send_concurrently(
    server: "LiveServer", clients: int, requests: int, send: Callable[[httpx.Client, int], httpx.Response]
) -> list[Refusal]:
    """`requests` requests `send(client, number)`, shared among `clients` keep-alive connections in threads."""

    def one_client(first: int) -> list[Refusal]:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            return [Refusal.of(send(http, number)) for number in range(first, requests, clients)]

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return [refusal for refusals in pool.map(one_client, range(clients)) for refusal in refusals]


def test_thousands_of_bad_tokens_are_401_and_memory_stays_flat(
    server: "LiveServer", token_for: Callable[..., str], user_id: str
) -> None:
    now = int(time.time())
    bad_tokens = [
        "not-a-jwt",
        "a.b.c",
        token_for(user_id, secret="a-different-secret-that-is-long-enough-000"),
        token_for(user_id, exp=now - 3600, iat=now - 7200),
        unsigned_token(user_id),
    ]

    def send(http: httpx.Client, number: int) -> httpx.Response:
        token = bad_tokens[number % len(bad_tokens)]
        return http.get(tasks_url(user_id), headers={"Authorization": f"Bearer {token}"})

    send_concurrently(server, BAD_TOKEN_CLIENTS, WARM_UP_REQUESTS, send)  # settle caches and allocator pools
    memory_before = resident_memory()
    refusals = send_concurrently(server, BAD_TOKEN_CLIENTS, BAD_TOKEN_REQUESTS, send)
    memory_growth = resident_memory() - memory_before

    assert len(refusals) == BAD_TOKEN_REQUESTS
    assert {refusal.status for refusal in refusals} == {401}
    assert {refusal.www_authenticate for refusal in refusals} == {"Bearer"}
    assert {refusal.code for refusal in refusals} == {"invalid_token", "token_expired"}
    assert memory_growth < MAX_MEMORY_GROWTH_AFTER_FLOOD, f"grew by {memory_growth / MIB:.1f} MiB"


UNKNOWN_KID_REQUESTS = 300
UNKNOWN_KID_CLIENTS = 3
# The first unknown kid fetches the key set; later ones may fetch again once per refetch interval.
KEY_SET_FETCHES_ALLOWED = 2


@pytest.fixture
def fresh_service(settings: Settings, serve: Callable[[FastAPI], "LiveServer"]) -> Iterator["LiveServer"]:
    """A service of its own, whose key cache starts empty and has never fetched."""
    with serve(create_app(settings)) as live:
        yield live


def test_unknown_key_ids_are_refused_and_the_key_set_is_fetched_only_a_few_times(
    fresh_service: "LiveServer", jwks_server: JwksServer, user_id: str
) -> None:
    unpublished = new_key_pair("EdDSA")
    claims = better_auth_claims(user_id, jwks_server.base_url)
    tokens = [unpublished.sign(claims, headers={"kid": uuid.uuid4().hex}) for _ in range(UNKNOWN_KID_REQUESTS)]
    fetches_before = jwks_server.requests

    def send(http: httpx.Client, number: int) -> httpx.Response:
        return http.get(tasks_url(user_id), headers={"Authorization": f"Bearer {tokens[number]}"})

    started = time.monotonic()
    refusals = send_concurrently(fresh_service, UNKNOWN_KID_CLIENTS, UNKNOWN_KID_REQUESTS, send)
    elapsed = time.monotonic() - started
    fetches = jwks_server.requests - fetches_before

    # Looked up in a fresh key set and not there: 401. Never seen while the refetch limit holds: 503, retry later.
    looked_up, retry_later = Refusal(401, "Bearer", "invalid_token"), Refusal(503, None, "signing_keys_unavailable")
    assert set(refusals) <= {looked_up, retry_later} and looked_up in refusals, set(refusals)
    assert 1 <= fetches <= KEY_SET_FETCHES_ALLOWED + int(elapsed / JWKS_MIN_REFETCH_SECONDS), (fetches, elapsed)
