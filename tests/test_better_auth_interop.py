"""Interop: tokens from a real Better Auth server (JWT plugin) against the real service."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest

from auth import JWKS_MIN_REFETCH_SECONDS
from tests.better_auth_server import BetterAuthServer, free_port, node_available, run_better_auth

APP_DIR = Path(__file__).resolve().parents[1]
START_TIMEOUT = 90.0
# Requests with a foreign kid, each after the Retry-After of the last: the refetch limit lets one through soon.
FOREIGN_KID_ATTEMPTS = 5
HTTP_TIMEOUT = 30.0
PASSWORD = "correct horse battery staple"
_ISSUED: list[str] = []  # every token handed out, to look for in the service's log
# Variables that would change how the service checks tokens or where it keeps data.
_SCRUBBED = ("BETTER_AUTH_SECRET", "JWKS_URL", "JWT_ISSUER", "JWT_AUDIENCE", "NEON_DATABASE_URL")


@dataclass
class User:
    """A signed-up Better Auth user and its JWT."""

    id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def tasks(self) -> str:
        return f"/api/{self.id}/tasks"


def _new_user(ba: BetterAuthServer) -> User:
    tag = uuid.uuid4().hex[:12]
    try:
        user_id, token = ba.sign_up_and_get_token(f"user-{tag}@example.com", PASSWORD, f"User {tag}")
    except (RuntimeError, httpx.HTTPError, KeyError, ValueError) as exc:
        pytest.fail(f"Better Auth sign-up/token failed: {exc}")
    _ISSUED.append(token)
    return User(user_id, token)


@pytest.fixture(scope="module", params=["EdDSA", "RS256"])
def ba(request: pytest.FixtureRequest) -> Iterator[BetterAuthServer]:
    """A Better Auth server signing with the parametrized alg."""
    if not node_available():
        pytest.skip("Node.js is not installed")
    try:
        with run_better_auth(request.param) as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def service_log(ba: BetterAuthServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the service started for `ba` writes its output (in its own tmp dir)."""
    return tmp_path_factory.mktemp(f"interop-{ba.alg}") / "uvicorn.log"


@pytest.fixture(scope="module")
def api(ba: BetterAuthServer, service_log: Path) -> Iterator[httpx.Client]:
    """The real service (uvicorn main:app) trusting `ba`, as an httpx client."""
    tmp = service_log.parent
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env |= {
        "DATABASE_URL": f"sqlite:///{tmp / 'todo.db'}",
        "BETTER_AUTH_URL": ba.base_url,
        "LOG_LEVEL": "debug",
    }
    cmd = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)]
    with service_log.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=APP_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT) as client:
            deadline = time.monotonic() + START_TIMEOUT
            last = "no answer"
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"service exited with {proc.returncode}:\n{service_log.read_text()[-4000:]}")
                try:
                    resp = client.get("/health")
                    if resp.status_code == 200:
                        break
                    last = f"{resp.status_code} {resp.text}"
                except httpx.TransportError as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"GET /health not 200 within {START_TIMEOUT:.0f} s ({last}):\n{service_log.read_text()[-4000:]}"
                    )
                time.sleep(0.2)
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def foreign(ba: BetterAuthServer) -> Iterator[BetterAuthServer]:
    """An independent Better Auth (own keys, same alg) that claims to be `ba` (same iss/aud)."""
    try:
        with run_better_auth(ba.alg, base_url=ba.base_url) as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc))


def _check(resp: httpx.Response, status: int) -> dict | list | None:
    """Assert the status (showing the request and response otherwise); return the JSON body."""
    req = resp.request
    assert resp.status_code == status, (
        f"{req.method} {req.url.path} -> {resp.status_code} {resp.text!r}, expected {status}"
    )
    return resp.json() if resp.content else None


def _assert_error(resp: httpx.Response, status: int) -> dict:
    body = _check(resp, status)
    assert isinstance(body, dict) and "detail" in body and isinstance(body.get("code"), str), body
    return body


def _assert_utc(value: str) -> None:
    assert value.endswith(("Z", "+00:00")), f"date-time without a UTC offset: {value!r}"


def test_token_header_and_claims(ba: BetterAuthServer) -> None:
    """A real token: {alg, kid} header, sub, iss == aud == base URL, 15 min lifetime; verifiable."""
    user = _new_user(ba)
    header = jwt.get_unverified_header(user.token)
    claims = jwt.decode(user.token, options={"verify_signature": False})
    print(f"\n[{ba.alg}] JOSE header: {header}\n[{ba.alg}] claims: {claims}")
    assert header == {"alg": ba.alg, "kid": header.get("kid")} and header["kid"], header
    assert isinstance(claims.get("sub"), str) and claims["sub"] == user.id, claims
    assert claims["iss"] == claims["aud"] == ba.base_url, claims
    assert claims["exp"] - claims["iat"] == 900, claims
    keys = ba.jwks()["keys"]
    assert header["kid"] in {k["kid"] for k in keys}, keys
    signing_key = jwt.PyJWKClient(f"{ba.url}/api/auth/jwks").get_signing_key_from_jwt(user.token)
    jwt.decode(user.token, signing_key, algorithms=[ba.alg], issuer=ba.base_url, audience=ba.base_url)


def test_task_lifecycle(api: httpx.Client, ba: BetterAuthServer) -> None:
    """Create, list, read, PUT, PATCH, toggle, delete, then 404, all with a real token."""
    user = _new_user(ba)
    h = user.headers
    resp = api.post(user.tasks, headers=h, json={"title": "  Buy milk ", "due_date": "2026-12-01T17:00:00Z"})
    created = _check(resp, 201)
    task_id = created["id"]
    assert resp.headers.get("location", "").endswith(f"{user.tasks}/{task_id}"), dict(resp.headers)

    resp = api.get(user.tasks, headers=h)
    listed = _check(resp, 200)
    assert resp.headers.get("x-total-count") == "1", dict(resp.headers)
    assert [t["id"] for t in listed] == [task_id]
    assert created["title"] == "Buy milk" and created["user_id"] == user.id, created
    assert created["description"] is None and created["completed"] is False, created
    for key in ("due_date", "created_at", "updated_at"):
        _assert_utc(created[key])

    one = _check(api.get(f"{user.tasks}/{task_id}", headers=h), 200)
    assert one == created

    put = _check(api.put(f"{user.tasks}/{task_id}", headers=h, json={"title": "Buy oat milk"}), 200)
    assert put["title"] == "Buy oat milk" and put["due_date"] == created["due_date"], put
    assert put["created_at"] == created["created_at"], put

    body = {"description": "2 litres", "due_date": None}
    patched = _check(api.patch(f"{user.tasks}/{task_id}", headers=h, json=body), 200)
    assert patched["description"] == "2 litres" and patched["due_date"] is None, patched
    assert patched["title"] == "Buy oat milk", patched

    toggled = _check(api.patch(f"{user.tasks}/{task_id}/complete", headers=h), 200)
    assert toggled["completed"] is True, toggled
    toggled = _check(api.patch(f"{user.tasks}/{task_id}/complete", headers=h), 200)
    assert toggled["completed"] is False, toggled
    toggled = _check(api.patch(f"{user.tasks}/{task_id}/complete", headers=h, json={"completed": True}), 200)
    assert toggled["completed"] is True, toggled

    deleted = api.delete(f"{user.tasks}/{task_id}", headers=h)
    _check(deleted, 204)
    assert deleted.content == b""
    _assert_error(api.get(f"{user.tasks}/{task_id}", headers=h), 404)
    empty = api.get(user.tasks, headers=h)
    assert _check(empty, 200) == [] and empty.headers.get("x-total-count") == "0"


def test_users_are_isolated(api: httpx.Client, ba: BetterAuthServer) -> None:
    """Another user's task id is a 404; another user's path is a 403."""
    alice, bob = _new_user(ba), _new_user(ba)
    assert alice.id != bob.id
    task = _check(api.post(alice.tasks, headers=alice.headers, json={"title": "Alice's secret"}), 201)
    bobs = _check(api.post(bob.tasks, headers=bob.headers, json={"title": "Bob's own"}), 201)

    listed = _check(api.get(bob.tasks, headers=bob.headers), 200)
    assert [t["id"] for t in listed] == [bobs["id"]], listed
    theirs = f"{bob.tasks}/{task['id']}"
    _assert_error(api.get(theirs, headers=bob.headers), 404)
    _assert_error(api.put(theirs, headers=bob.headers, json={"title": "pwned"}), 404)
    _assert_error(api.patch(theirs, headers=bob.headers, json={"title": "pwned"}), 404)
    _assert_error(api.patch(f"{theirs}/complete", headers=bob.headers), 404)
    _assert_error(api.delete(theirs, headers=bob.headers), 404)

    _assert_error(api.get(alice.tasks, headers=bob.headers), 403)
    _assert_error(api.post(alice.tasks, headers=bob.headers, json={"title": "pwned"}), 403)
    _assert_error(api.get(f"{alice.tasks}/{task['id']}", headers=bob.headers), 403)
    _assert_error(api.delete(f"{alice.tasks}/{task['id']}", headers=bob.headers), 403)

    assert _check(api.get(f"{alice.tasks}/{task['id']}", headers=alice.headers), 200) == task


def test_foreign_instance_token_is_rejected(api: httpx.Client, ba: BetterAuthServer, foreign: BetterAuthServer) -> None:
    """A token from another Better Auth (other keys, same alg, same iss/aud) is a 401."""
    intruder = _new_user(foreign)
    claims = jwt.decode(intruder.token, options={"verify_signature": False})
    assert jwt.get_unverified_header(intruder.token)["alg"] == ba.alg
    assert claims["iss"] == claims["aud"] == ba.base_url, claims
    foreign_kid = jwt.get_unverified_header(intruder.token)["kid"]
    assert foreign_kid not in {k["kid"] for k in ba.jwks()["keys"]}
    # A kid never seen is looked up once the refetch limit allows, and is then a 401; until then it is a 503 with
    # Retry-After (it could be a newly published key). A client retrying as told gets the 401, never a 200.
    for _ in range(FOREIGN_KID_ATTEMPTS):
        resp = api.get(intruder.tasks, headers=intruder.headers)
        assert intruder.token not in resp.text, resp.text
        if resp.status_code != 503:
            break
        body = _assert_error(resp, 503)
        assert body["code"] == "signing_keys_unavailable", body
        retry_after = int(resp.headers.get("retry-after", "0"))
        assert 1 <= retry_after <= JWKS_MIN_REFETCH_SECONDS, dict(resp.headers)
        time.sleep(retry_after)
    _assert_error(resp, 401)
    assert resp.headers.get("www-authenticate", "").startswith("Bearer"), dict(resp.headers)
    again = api.get(intruder.tasks, headers=intruder.headers)  # still refused: 401, or 503 until the next fetch
    assert again.status_code in {401, 503} and intruder.token not in again.text, again.text
    user = _new_user(ba)  # the genuine issuer still works afterwards
    _check(api.get(user.tasks, headers=user.headers), 200)


def test_tokens_not_logged(api: httpx.Client, service_log: Path) -> None:
    """No token handed to the service shows up in its output, even at LOG_LEVEL=debug."""
    _check(api.get("/health"), 200)
    text = service_log.read_text(errors="replace")
    assert text, "the service wrote no log at all"
    leaked = [t[:16] + "..." for t in _ISSUED if t in text or t.split(".")[2] in text]
    assert not leaked, f"tokens in the service log: {leaked}"
