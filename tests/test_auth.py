"""Identity and tokens, as the contract states them: who may call, as whom, and in what order we say no.

Everything runs for real: the live app over HTTP, tokens signed with real keys, Better Auth's key
set served by a real local JWKS endpoint. The key-set cache is also tested on its own (`JwksCache`,
`TokenVerifier`) against a JWKS endpoint each test starts and stops itself.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from auth import CLOCK_LEEWAY_SECONDS, JwksCache, SigningKey, TokenVerifier
from main import create_app
from schemas import ApiError
from settings import Settings
from tests.conftest import SECRET, LiveServer, make_settings
from tests.keys import (
    JWKS_ALGORITHMS,
    JwksServer,
    SigningKeyPair,
    better_auth_claims,
    generate_private_key,
    new_key_pair,
)

TokenFor = Callable[..., str]
Auth = Callable[[str], dict[str, str]]
MakeTask = Callable[..., dict[str, Any]]
Serve = Callable[..., LiveServer]

# The contract allows a clock leeway of at most this much; anything further off must be refused.
MAX_LEEWAY_SECONDS = 60
# Well inside any sensible leeway: a clock this far off is skew, not a bad token.
SMALL_SKEW_SECONDS = 5
# How long to wait for something that should happen soon, on a shared, slow machine.
DEADLINE_SECONDS = 60.0
ANOTHER_SECRET = "another-secret-that-is-also-long-enough-987654"
CUSTOM_ISSUER = "issuer-x"
CUSTOM_AUDIENCE = "aud-y"
SNAKE_CASE = re.compile(r"[a-z]+(_[a-z]+)*")


# --- helpers -----------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    """The Authorization header carrying `token`."""
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes | str) -> str:
    """Unpadded base64url, as JWS segments are written."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def handmade_token(header: dict[str, Any], claims: dict[str, Any] | bytes, signature: bytes = b"") -> str:
    """A compact JWS written by hand, so that no library refuses to produce it."""
    payload = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    return f"{b64url(json.dumps(header))}.{b64url(payload)}.{b64url(signature)}"


def hmac_sha256_token(key: bytes, claims: dict[str, Any] | bytes, **header: Any) -> str:
    """An HS256 token signed by hand with `key` (PyJWT rightly refuses public keys as HMAC secrets)."""
    unsigned = handmade_token({"alg": "HS256", "typ": "JWT", **header}, claims).rsplit(".", 1)[0]
    signature = hmac.new(key, unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{b64url(signature)}"


def hs256_token(claims: dict[str, Any], secret: str = SECRET) -> str:
    """An HS256 token with exactly `claims`, plus `iat`/`exp` (an hour) unless given."""
    now = int(time.time())
    return jwt.encode({"iat": now, "exp": now + 3600} | claims, secret, algorithm="HS256")


def better_auth_token(
    key: SigningKeyPair,
    user: str,
    issuer: str,
    *,
    without: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    """A token shaped like Better Auth's, signed by `key`, with `claims` changed and `without` left out."""
    payload = better_auth_claims(user, issuer) | claims
    for name in without:
        payload.pop(name)
    return key.sign(payload)


def tasks_path(user: str) -> str:
    """The collection of `user`'s tasks."""
    return f"/api/{user}/tasks"


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """`response` is a JSON error of `status` in the contract's `{detail, code}` shape; returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"detail", "code"}
    assert SNAKE_CASE.fullmatch(body["code"]), body
    if code is not None:
        assert body["code"] == code, body
    if status == 422:
        assert isinstance(body["detail"], list) and body["detail"], body
        assert all({"loc", "msg", "type"} <= set(issue) for issue in body["detail"]), body
    else:
        assert isinstance(body["detail"], str) and body["detail"].strip(), body
    return body


def assert_unauthorized(response: httpx.Response, token: str | None = None, code: str | None = "invalid_token") -> None:
    """A 401 that asks for a bearer token and does not echo the token it was given."""
    assert_error(response, 401, code)
    assert response.headers.get("www-authenticate", "").split(" ")[0] == "Bearer", response.headers
    if token:
        assert token not in response.text
        assert token not in str(response.headers)


def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE_SECONDS) -> bool:
    """Poll `condition` until it holds or `timeout` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# --- missing and malformed tokens -------------------------------------------------------------

ROUTES = [
    pytest.param("GET", "", None, id="list"),
    pytest.param("POST", "", {"title": "A task"}, id="create"),
    pytest.param("GET", "/1", None, id="read"),
    pytest.param("PUT", "/1", {"title": "A task"}, id="put"),
    pytest.param("PATCH", "/1", {"title": "A task"}, id="patch"),
    pytest.param("DELETE", "/1", None, id="delete"),
    pytest.param("PATCH", "/1/complete", None, id="complete"),
]


@pytest.mark.parametrize(("method", "suffix", "body"), ROUTES)
def test_every_task_route_without_authorization_is_401(
    client: httpx.Client, user_id: str, method: str, suffix: str, body: dict[str, Any] | None
) -> None:
    response = client.request(method, tasks_path(user_id) + suffix, json=body)
    assert_unauthorized(response, code="not_authenticated")


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(lambda token: "Basic dXNlcjpwYXNzd29yZA==", id="basic"),
        pytest.param(lambda token: f"Token {token}", id="valid token under another scheme"),
        pytest.param(lambda token: token, id="valid token without a scheme"),
        pytest.param(lambda token: "Bearer", id="bearer without a token"),
    ],
)
def test_authorization_that_is_not_a_bearer_token_is_401(
    client: httpx.Client, token_for: TokenFor, user_id: str, authorization: Callable[[str], str]
) -> None:
    token = token_for(user_id)
    response = client.get(tasks_path(user_id), headers={"Authorization": authorization(token)})
    assert_unauthorized(response, token, code="not_authenticated")


def _payload_of(token: str) -> str:
    return token.split(".")[1]


# Each turns a valid token for the right user into a malformed one.
MALFORMED = {
    "garbage": lambda valid: "not-a-jwt",
    "two segments": lambda valid: valid.rsplit(".", 1)[0],
    "four segments": lambda valid: valid + ".e30",
    "empty segments": lambda valid: "..",
    "header not base64": lambda valid: "!!!" + valid[valid.index(".") :],
    "payload not base64": lambda valid: valid.split(".")[0] + ".@@@." + valid.split(".")[2],
    "signature not base64": lambda valid: valid.rsplit(".", 1)[0] + ".***",
    "header not JSON": lambda valid: b64url("not json") + valid[valid.index(".") :],
    "header a JSON array": lambda valid: b64url("[]") + valid[valid.index(".") :],
    "header without alg": lambda valid: b64url('{"typ":"JWT"}') + valid[valid.index(".") :],
    "signed payload not JSON": lambda valid: hmac_sha256_token(SECRET.encode(), b"not json"),
    "signed payload a JSON array": lambda valid: hmac_sha256_token(SECRET.encode(), b'["sub"]'),
}


@pytest.mark.parametrize("malformation", MALFORMED)
def test_malformed_token_is_401(client: httpx.Client, token_for: TokenFor, user_id: str, malformation: str) -> None:
    token = MALFORMED[malformation](token_for(user_id))
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token)


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda sign, me, other: sign(me, secret=ANOTHER_SECRET), id="signed with another secret"),
        pytest.param(
            lambda sign, me, other: sign(other).replace(_payload_of(sign(other)), _payload_of(sign(me))),
            id="another user's token with my payload",
        ),
        pytest.param(lambda sign, me, other: sign(me).rsplit(".", 1)[0] + ".", id="signature stripped"),
        pytest.param(
            lambda sign, me, other: sign(me).rsplit(".", 1)[0] + "." + sign(other).rsplit(".", 1)[1],
            id="another token's signature",
        ),
    ],
)
def test_badly_signed_token_is_401(
    client: httpx.Client, token_for: TokenFor, user_id: str, other_user_id: str, forge: Callable[..., str]
) -> None:
    token = forge(token_for, user_id, other_user_id)
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token)


# --- time claims ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        pytest.param(lambda now: {"exp": now - MAX_LEEWAY_SECONDS - 1}, "token_expired", id="expired beyond leeway"),
        pytest.param(lambda now: {"exp": now - 86_400}, "token_expired", id="expired yesterday"),
        pytest.param(lambda now: {"exp": None}, "invalid_token", id="exp missing"),
        pytest.param(lambda now: {"exp": "tomorrow"}, "invalid_token", id="exp not a number"),
        pytest.param(lambda now: {"nbf": now + 600}, "token_not_yet_valid", id="nbf in the future"),
        pytest.param(lambda now: {"nbf": "soon"}, "invalid_token", id="nbf not a number"),
        pytest.param(lambda now: {"iat": now + 600}, "token_not_yet_valid", id="iat in the future"),
        pytest.param(lambda now: {"iat": "now"}, "invalid_token", id="iat not a number"),
    ],
)
def test_token_outside_its_validity_period_is_401(
    client: httpx.Client,
    token_for: TokenFor,
    user_id: str,
    claims: Callable[[int], dict[str, Any]],
    code: str,
) -> None:
    token = token_for(user_id, **claims(int(time.time())))
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token, code)


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param(lambda now: {"exp": now - SMALL_SKEW_SECONDS}, id="expired a few seconds ago"),
        pytest.param(lambda now: {"nbf": now + SMALL_SKEW_SECONDS}, id="valid in a few seconds"),
        pytest.param(lambda now: {"iat": now + SMALL_SKEW_SECONDS}, id="issued a few seconds ahead"),
    ],
)
def test_token_within_the_clock_leeway_is_accepted(
    client: httpx.Client, token_for: TokenFor, user_id: str, claims: Callable[[int], dict[str, Any]]
) -> None:
    token = token_for(user_id, **claims(int(time.time())))
    response = client.get(tasks_path(user_id), headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json() == []


# --- algorithms -------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_unsigned_alg_none_token_is_401(
    client: httpx.Client, jwks_server: JwksServer, better_auth_keys: dict[str, SigningKeyPair], user_id: str, alg: str
) -> None:
    claims = better_auth_claims(user_id, jwks_server.base_url)
    for token in (
        handmade_token({"alg": alg, "typ": "JWT"}, claims),
        handmade_token({"alg": alg, "typ": "JWT", "kid": better_auth_keys["EdDSA"].kid}, claims),
    ):
        assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token)


def published_key_material(key: SigningKeyPair, form: str) -> bytes:
    """The bytes of `key`'s public half that an attacker can read from the key set, in `form`."""
    public_key = key.private_key.public_key()
    if form == "PEM":
        return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if form == "PEM PKCS1":
        return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    if form == "JWK":
        return json.dumps(key.public_jwk).encode()
    raise AssertionError(form)


@pytest.mark.parametrize(
    ("alg", "form"),
    [("RS256", "PEM"), ("RS256", "PEM PKCS1"), ("RS256", "JWK"), ("EdDSA", "PEM"), ("ES256", "PEM"), ("EdDSA", "JWK")],
)
def test_hs256_token_signed_with_a_published_public_key_is_401(
    client: httpx.Client,
    jwks_server: JwksServer,
    better_auth_keys: dict[str, SigningKeyPair],
    user_id: str,
    alg: str,
    form: str,
) -> None:
    """Algorithm confusion: the public key, readable by anyone, used as an HMAC secret."""
    key = better_auth_keys[alg]
    token = hmac_sha256_token(
        published_key_material(key, form), better_auth_claims(user_id, jwks_server.base_url), kid=key.kid
    )
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # the app's own secret, on purpose
@pytest.mark.parametrize(
    "sign",
    [
        pytest.param(lambda keys, claims: jwt.encode(claims, SECRET, algorithm="HS384"), id="HS384"),
        pytest.param(lambda keys, claims: jwt.encode(claims, SECRET, algorithm="HS512"), id="HS512"),
        *(
            pytest.param(
                lambda keys, claims, alg=alg: jwt.encode(
                    claims, keys["RS256"].private_key, algorithm=alg, headers={"kid": keys["RS256"].kid}
                ),
                id=f"{alg} with the published RSA key",
            )
            for alg in ("RS384", "RS512", "PS384", "PS512")
        ),
        pytest.param(
            lambda keys, claims: jwt.encode(
                claims, ec.generate_private_key(ec.SECP384R1()), algorithm="ES384", headers={"kid": keys["ES256"].kid}
            ),
            id="ES384",
        ),
    ],
)
def test_algorithm_outside_the_allowed_set_is_401(
    client: httpx.Client,
    jwks_server: JwksServer,
    better_auth_keys: dict[str, SigningKeyPair],
    user_id: str,
    sign: Callable[[dict[str, SigningKeyPair], dict[str, Any]], str],
) -> None:
    token = sign(better_auth_keys, better_auth_claims(user_id, jwks_server.base_url))
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token)


# --- the user: sub, user_id -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "path_user"),
    [
        pytest.param({}, None, id="no sub and no user_id"),
        pytest.param({"sub": ""}, None, id="sub empty"),
        pytest.param({"sub": 123}, "123", id="sub a number"),
        pytest.param({"sub": True}, "True", id="sub a boolean"),
        pytest.param({"sub": ["someone"]}, "someone", id="sub a list"),
        pytest.param({"sub": {"id": "someone"}}, "someone", id="sub an object"),
        pytest.param({"sub": None}, "None", id="sub null"),
        pytest.param({"user_id": ""}, None, id="user_id empty"),
        pytest.param({"user_id": 123}, "123", id="user_id a number"),
    ],
)
def test_token_without_a_valid_user_is_401(
    client: httpx.Client, user_id: str, claims: dict[str, Any], path_user: str | None
) -> None:
    """Checked on the path the token would claim, so that coercing the claim to text would be caught."""
    token = hs256_token(claims)
    response = client.get(tasks_path(path_user or user_id), headers=bearer(token))
    assert_unauthorized(response, token)


def test_user_id_claim_is_the_user_when_sub_is_absent(client: httpx.Client, user_id: str) -> None:
    headers = bearer(hs256_token({"user_id": user_id}))
    created = client.post(tasks_path(user_id), json={"title": "Mine"}, headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["user_id"] == user_id
    listed = client.get(tasks_path(user_id), headers=headers)
    assert listed.status_code == 200, listed.text
    assert [task["id"] for task in listed.json()] == [created.json()["id"]]


def test_sub_wins_over_user_id(client: httpx.Client, user_id: str, other_user_id: str) -> None:
    headers = bearer(hs256_token({"sub": user_id, "user_id": other_user_id}))
    assert_error(client.get(tasks_path(other_user_id), headers=headers), 403, "forbidden")
    assert client.get(tasks_path(user_id), headers=headers).status_code == 200


@pytest.mark.parametrize(
    "token_kind",
    ["garbage", "bad signature", "expired", "alg none", "sub missing"],
)
def test_error_never_contains_the_token(
    client: httpx.Client, token_for: TokenFor, user_id: str, token_kind: str
) -> None:
    valid = token_for(user_id)
    token = {
        "garbage": "x" * 40 + ".garbage-segment-that-is-long",
        "bad signature": token_for(user_id, secret=ANOTHER_SECRET),
        "expired": token_for(user_id, exp=int(time.time()) - 3600),
        "alg none": handmade_token({"alg": "none"}, jwt.decode(valid, options={"verify_signature": False})),
        "sub missing": token_for(None),
    }[token_kind]
    response = client.get(tasks_path(user_id), headers=bearer(token))
    assert_unauthorized(response, token, code=None)
    for segment in filter(None, token.split(".")):
        assert segment not in response.text
        assert segment not in str(response.headers)


# --- whose data: 403, and the token decides -----------------------------------------------------


@pytest.mark.parametrize(("method", "suffix", "body"), ROUTES)
def test_other_users_path_is_403(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    other_user_id: str,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
) -> None:
    response = client.request(method, tasks_path(other_user_id) + suffix, json=body, headers=auth(user_id))
    assert_error(response, 403, "forbidden")


@pytest.mark.parametrize(
    "path_user",
    [
        pytest.param(str.upper, id="upper case"),
        pytest.param(lambda user: user + "%20", id="trailing space"),
        pytest.param(lambda user: user[:-1], id="prefix"),
        pytest.param(lambda user: user + "x", id="longer"),
    ],
)
def test_path_user_that_only_resembles_the_token_user_is_403(
    client: httpx.Client, auth: Auth, user_id: str, path_user: Callable[[str], str]
) -> None:
    response = client.get(tasks_path(path_user(user_id)), headers=auth(user_id))
    assert_error(response, 403, "forbidden")


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        pytest.param("PUT", "", {"title": "Hijacked", "completed": True}, id="put"),
        pytest.param("PATCH", "", {"title": "Hijacked"}, id="patch"),
        pytest.param("PATCH", "/complete", None, id="complete"),
        pytest.param("DELETE", "", None, id="delete"),
    ],
)
def test_refused_change_to_other_users_task_leaves_it_untouched(
    client: httpx.Client,
    auth: Auth,
    make_task: MakeTask,
    user_id: str,
    other_user_id: str,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
) -> None:
    theirs = make_task(other_user_id, "Theirs")
    path = f"{tasks_path(other_user_id)}/{theirs['id']}"
    assert_error(client.request(method, path + suffix, json=body, headers=auth(user_id)), 403, "forbidden")
    after = client.get(path, headers=auth(other_user_id))
    assert after.status_code == 200, after.text
    assert after.json() == theirs


def test_other_users_task_id_under_own_path_is_404(
    client: httpx.Client, auth: Auth, make_task: MakeTask, user_id: str, other_user_id: str
) -> None:
    theirs = make_task(other_user_id, "Theirs")
    response = client.get(f"{tasks_path(user_id)}/{theirs['id']}", headers=auth(user_id))
    assert_error(response, 404, "task_not_found")


def test_user_id_in_the_body_is_ignored_on_create(
    client: httpx.Client, auth: Auth, user_id: str, other_user_id: str
) -> None:
    response = client.post(tasks_path(user_id), json={"title": "Mine", "user_id": other_user_id}, headers=auth(user_id))
    assert response.status_code == 201, response.text
    assert response.json()["user_id"] == user_id
    assert f"/api/{user_id}/tasks/" in response.headers["location"]
    assert client.get(tasks_path(other_user_id), headers=auth(other_user_id)).json() == []
    assert [task["id"] for task in client.get(tasks_path(user_id), headers=auth(user_id)).json()] == [
        response.json()["id"]
    ]


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_user_id_in_the_body_is_ignored_on_update(
    client: httpx.Client, auth: Auth, make_task: MakeTask, user_id: str, other_user_id: str, method: str
) -> None:
    task = make_task(user_id, "Mine")
    path = f"{tasks_path(user_id)}/{task['id']}"
    response = client.request(
        method, path, json={"title": "Still mine", "user_id": other_user_id}, headers=auth(user_id)
    )
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user_id
    assert response.json()["title"] == "Still mine"
    assert client.get(tasks_path(other_user_id), headers=auth(other_user_id)).json() == []


# --- order of checks: 401, then 403, then the body and the task --------------------------------

MALFORMED_JSON = b'{"title": "unterminated'
NOT_UTF8 = b'{"title": "\xff\xfe"}'

# (method, path after the user's tasks, raw JSON body, the answer once the caller may act)
BODY_AND_TASK_ERRORS = [
    pytest.param("POST", "", MALFORMED_JSON, 422, id="create with malformed JSON"),
    pytest.param("POST", "", NOT_UTF8, 422, id="create with a body that is not UTF-8"),
    pytest.param("POST", "", b'{"title": ""}', 422, id="create an invalid task"),
    pytest.param("PUT", "/not-a-number", MALFORMED_JSON, 422, id="put a non-integer id with malformed JSON"),
    pytest.param("PATCH", "/not-a-number", b'{"title": null}', 422, id="patch a non-integer id with a null title"),
    pytest.param("PATCH", "/1/complete", MALFORMED_JSON, 422, id="complete with malformed JSON"),
    pytest.param("PATCH", "/not-a-number/complete", None, 422, id="complete a non-integer id"),
    pytest.param("GET", "/not-a-number", None, 422, id="read a non-integer id"),
    pytest.param("GET", "/999999999", None, 404, id="read a missing task"),
    pytest.param("DELETE", "/999999999", None, 404, id="delete a missing task"),
    pytest.param("PUT", "/999999999", b'{"title": "Valid"}', 404, id="put a missing task"),
    pytest.param("GET", "?status=bogus", None, 422, id="list with an invalid query"),
]


def send(client: httpx.Client, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> httpx.Response:
    """`method path` with `body` sent as raw JSON bytes."""
    if body is not None:
        headers = headers | {"Content-Type": "application/json"}
    return client.request(method, path, content=body, headers=headers)


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(lambda sign, user: {}, id="no token"),
        pytest.param(lambda sign, user: bearer("not-a-jwt"), id="garbage token"),
        pytest.param(lambda sign, user: bearer(sign(user, exp=int(time.time()) - 3600)), id="expired token"),
    ],
)
@pytest.mark.parametrize(("method", "suffix", "body", "later_status"), BODY_AND_TASK_ERRORS)
def test_bad_token_is_401_before_the_path_user_body_or_task(
    client: httpx.Client,
    token_for: TokenFor,
    user_id: str,
    other_user_id: str,
    authorization: Callable[[TokenFor, str], dict[str, str]],
    method: str,
    suffix: str,
    body: bytes | None,
    later_status: int,
) -> None:
    """Another user's path, a bad body and a bad or missing task id: the token is still what is reported."""
    response = send(client, method, tasks_path(other_user_id) + suffix, body, authorization(token_for, user_id))
    assert_unauthorized(response, code=None)


@pytest.mark.parametrize(("method", "suffix", "body", "later_status"), BODY_AND_TASK_ERRORS)
def test_other_users_path_is_403_before_the_body_or_task(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    other_user_id: str,
    method: str,
    suffix: str,
    body: bytes | None,
    later_status: int,
) -> None:
    response = send(client, method, tasks_path(other_user_id) + suffix, body, auth(user_id))
    assert_error(response, 403, "forbidden")


@pytest.mark.parametrize(("method", "suffix", "body", "later_status"), BODY_AND_TASK_ERRORS)
def test_body_and_task_errors_come_once_the_caller_may_act(
    client: httpx.Client,
    auth: Auth,
    user_id: str,
    method: str,
    suffix: str,
    body: bytes | None,
    later_status: int,
) -> None:
    response = send(client, method, tasks_path(user_id) + suffix, body, auth(user_id))
    assert_error(response, later_status, "validation_error" if later_status == 422 else "task_not_found")


# --- Better Auth tokens (JWKS) ----------------------------------------------------------------


@pytest.mark.parametrize("alg", JWKS_ALGORITHMS)
def test_better_auth_token_works_end_to_end(
    client: httpx.Client, jwks_token_for: TokenFor, user_id: str, alg: str
) -> None:
    headers = bearer(jwks_token_for(user_id, alg))
    created = client.post(tasks_path(user_id), json={"title": f"Signed with {alg}"}, headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["user_id"] == user_id
    listed = client.get(tasks_path(user_id), headers=headers)
    assert listed.status_code == 200, listed.text
    assert [task["title"] for task in listed.json()] == [f"Signed with {alg}"]


@pytest.mark.parametrize(
    ("without", "claims"),
    [
        pytest.param((), {"iss": "http://evil.example"}, id="wrong iss"),
        pytest.param((), {"aud": "http://evil.example"}, id="wrong aud"),
        pytest.param((), {"aud": ["http://evil.example"]}, id="wrong aud in a list"),
        pytest.param(("iss",), {}, id="iss missing"),
        pytest.param(("aud",), {}, id="aud missing"),
        pytest.param(("iss", "aud"), {}, id="iss and aud missing"),
        pytest.param(("exp",), {}, id="exp missing"),
        pytest.param((), {"exp": int(time.time()) - 3600}, id="expired"),
        pytest.param((), {"sub": ""}, id="sub empty"),
    ],
)
@pytest.mark.parametrize("alg", ["EdDSA", "RS256"])
def test_better_auth_token_with_bad_claims_is_401(
    client: httpx.Client,
    jwks_server: JwksServer,
    better_auth_keys: dict[str, SigningKeyPair],
    user_id: str,
    alg: str,
    without: tuple[str, ...],
    claims: dict[str, Any],
) -> None:
    token = better_auth_token(better_auth_keys[alg], user_id, jwks_server.base_url, without=without, **claims)
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token, code=None)


def test_better_auth_token_with_audience_as_a_one_element_list_is_accepted(
    client: httpx.Client, jwks_server: JwksServer, jwks_token_for: TokenFor, user_id: str
) -> None:
    token = jwks_token_for(user_id, aud=[jwks_server.base_url])
    response = client.get(tasks_path(user_id), headers=bearer(token))
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def refetching_server(
    database_url: str, jwks_server: JwksServer, better_auth_keys: dict[str, SigningKeyPair], serve: Serve
) -> Iterator[LiveServer]:
    """The app with no refetch limit: every never-seen key id is looked up in a fresh key set.

    With the limit, a never-seen key id between fetches is a 503 (the key may be newly published); this
    app shows what the key set itself says of such a key.
    """
    settings = make_settings(database_url, jwks_server)
    app = create_app(settings)
    app.state.token_verifier = TokenVerifier(settings, JwksCache(jwks_server.jwks_url, min_refetch_seconds=0))
    with serve(app) as live:
        yield live


@pytest.mark.parametrize("alg", JWKS_ALGORITHMS)
def test_better_auth_token_signed_by_a_key_outside_the_key_set_is_401(
    refetching_server: LiveServer, jwks_server: JwksServer, user_id: str, alg: str
) -> None:
    stranger = new_key_pair(alg)  # never published
    token = stranger.sign(better_auth_claims(user_id, jwks_server.base_url))
    with httpx.Client(base_url=refetching_server.url, timeout=30) as client:
        assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token)


@pytest.mark.parametrize("alg", JWKS_ALGORITHMS)
def test_better_auth_token_naming_a_published_kid_but_signed_by_another_key_is_401(
    client: httpx.Client, jwks_server: JwksServer, better_auth_keys: dict[str, SigningKeyPair], user_id: str, alg: str
) -> None:
    impostor = SigningKeyPair(alg, better_auth_keys[alg].kid, generate_private_key(alg))
    token = impostor.sign(better_auth_claims(user_id, jwks_server.base_url))
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token)


@pytest.mark.parametrize(
    ("header_alg", "kid_of"),
    [
        ("ES256", "EdDSA"),
        ("EdDSA", "ES256"),
        ("ES512", "ES256"),
        ("ES256", "ES512"),
        ("RS256", "ES256"),
        ("EdDSA", "RS256"),
    ],
)
def test_better_auth_token_whose_alg_does_not_fit_the_named_key_is_401(
    client: httpx.Client,
    jwks_server: JwksServer,
    better_auth_keys: dict[str, SigningKeyPair],
    user_id: str,
    header_alg: str,
    kid_of: str,
) -> None:
    mismatched = SigningKeyPair(header_alg, better_auth_keys[kid_of].kid, generate_private_key(header_alg))
    token = mismatched.sign(better_auth_claims(user_id, jwks_server.base_url))
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token)


@pytest.mark.parametrize("alg", JWKS_ALGORITHMS)
def test_better_auth_token_without_kid_is_401(
    client: httpx.Client, jwks_server: JwksServer, better_auth_keys: dict[str, SigningKeyPair], user_id: str, alg: str
) -> None:
    claims = better_auth_claims(user_id, jwks_server.base_url)
    token = jwt.encode(claims, better_auth_keys[alg].private_key, algorithm=alg)
    assert "kid" not in jwt.get_unverified_header(token)
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token)


# --- JWT_ISSUER / JWT_AUDIENCE, and no BETTER_AUTH_SECRET ----------------------------------------


@pytest.fixture(scope="module")
def custom_claims_server(
    database_url: str, jwks_server: JwksServer, better_auth_keys: dict[str, SigningKeyPair], serve: Serve
) -> Iterator[LiveServer]:
    """The app with `JWT_ISSUER` and `JWT_AUDIENCE` set."""
    settings = make_settings(database_url, jwks_server, jwt_issuer=CUSTOM_ISSUER, jwt_audience=CUSTOM_AUDIENCE)
    with serve(create_app(settings)) as live:
        yield live


@pytest.fixture
def custom_claims_client(custom_claims_server: LiveServer) -> Iterator[httpx.Client]:
    """A client of the app with `JWT_ISSUER` and `JWT_AUDIENCE` set."""
    with httpx.Client(base_url=custom_claims_server.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def no_secret_server(
    database_url: str, jwks_server: JwksServer, better_auth_keys: dict[str, SigningKeyPair], serve: Serve
) -> Iterator[LiveServer]:
    """The app without `BETTER_AUTH_SECRET`."""
    with serve(create_app(make_settings(database_url, jwks_server, better_auth_secret=None))) as live:
        yield live


@pytest.fixture
def no_secret_client(no_secret_server: LiveServer) -> Iterator[httpx.Client]:
    """A client of the app without `BETTER_AUTH_SECRET`."""
    with httpx.Client(base_url=no_secret_server.url, timeout=30) as http:
        yield http


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_configured_issuer_and_audience_are_required_of_better_auth_tokens(
    custom_claims_client: httpx.Client, jwks_token_for: TokenFor, user_id: str, alg: str
) -> None:
    token = jwks_token_for(user_id, alg, iss=CUSTOM_ISSUER, aud=CUSTOM_AUDIENCE)
    response = custom_claims_client.get(tasks_path(user_id), headers=bearer(token))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({}, id="both default"),
        pytest.param({"iss": CUSTOM_ISSUER}, id="default aud"),
        pytest.param({"aud": CUSTOM_AUDIENCE}, id="default iss"),
    ],
)
def test_configured_issuer_and_audience_replace_the_default(
    custom_claims_client: httpx.Client, jwks_token_for: TokenFor, user_id: str, claims: dict[str, str]
) -> None:
    token = jwks_token_for(user_id, **claims)
    assert_unauthorized(custom_claims_client.get(tasks_path(user_id), headers=bearer(token)), token)


def test_configured_issuer_and_audience_accept_matching_hs256_token(
    custom_claims_client: httpx.Client, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id, iss=CUSTOM_ISSUER, aud=CUSTOM_AUDIENCE)
    response = custom_claims_client.get(tasks_path(user_id), headers=bearer(token))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({}, id="iss and aud missing"),
        pytest.param({"aud": CUSTOM_AUDIENCE}, id="iss missing"),
        pytest.param({"iss": CUSTOM_ISSUER}, id="aud missing"),
        pytest.param({"iss": "someone-else", "aud": CUSTOM_AUDIENCE}, id="wrong iss"),
        pytest.param({"iss": CUSTOM_ISSUER, "aud": "something-else"}, id="wrong aud"),
    ],
)
def test_configured_issuer_and_audience_are_checked_on_hs256_tokens(
    custom_claims_client: httpx.Client, token_for: TokenFor, user_id: str, claims: dict[str, str]
) -> None:
    token = token_for(user_id, **claims)
    assert_unauthorized(custom_claims_client.get(tasks_path(user_id), headers=bearer(token)), token)


def test_hs256_token_issuer_and_audience_are_not_checked_by_default(
    client: httpx.Client, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id, iss="https://anyone.example", aud="anything")
    response = client.get(tasks_path(user_id), headers=bearer(token))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "sign",
    [
        pytest.param(lambda user, keys, issuer: hs256_token({"sub": user}), id="signed with the test secret"),
        pytest.param(
            lambda user, keys, issuer: hmac_sha256_token(
                published_key_material(keys["RS256"], "PEM"), better_auth_claims(user, issuer), kid=keys["RS256"].kid
            ),
            id="signed with a published public key",
        ),
    ],
)
def test_without_secret_hs256_tokens_are_401(
    no_secret_client: httpx.Client,
    jwks_server: JwksServer,
    better_auth_keys: dict[str, SigningKeyPair],
    user_id: str,
    sign: Callable[[str, dict[str, SigningKeyPair], str], str],
) -> None:
    token = sign(user_id, better_auth_keys, jwks_server.base_url)
    assert_unauthorized(no_secret_client.get(tasks_path(user_id), headers=bearer(token)), token)


def test_without_secret_better_auth_tokens_still_work(
    no_secret_client: httpx.Client, jwks_token_for: TokenFor, user_id: str
) -> None:
    response = no_secret_client.get(tasks_path(user_id), headers=bearer(jwks_token_for(user_id)))
    assert response.status_code == 200, response.text


# --- the key set: fetched on need, cached, rotated, rate limited, unavailable -----------------------


@pytest.fixture
def key_set() -> Iterator[JwksServer]:
    """A JWKS endpoint of this test's own, publishing one Ed25519 key; stopped afterwards."""
    server = JwksServer()
    server.add(new_key_pair("EdDSA"))
    server.start()
    yield server
    server.stop()


def verifier_for(server: JwksServer, **cache_options: float) -> TokenVerifier:
    """A token verifier for Better Auth at `server`, its key cache tuned by `cache_options`."""
    settings: Settings = make_settings("sqlite:///:memory:", server)
    return TokenVerifier(settings, JwksCache(server.jwks_url, **cache_options))


def verify(verifier: TokenVerifier, token: str) -> str:
    """The user `verifier` finds in `token` (raises `ApiError` when it refuses it)."""
    return asyncio.run(verifier.user_id(token))


def refusal(verifier: TokenVerifier, token: str) -> ApiError:
    """The error `verifier` refuses `token` with."""
    with pytest.raises(ApiError) as raised:
        verify(verifier, token)
    return raised.value


def accepts(verifier: TokenVerifier, token: str) -> bool:
    """Whether `verifier` accepts `token`; a refusal must be a 401."""
    try:
        verify(verifier, token)
    except ApiError as error:
        assert error.status_code == 401, (error.status_code, error.detail)
        return False
    return True


def signed_by(key: SigningKeyPair, server: JwksServer, user: str) -> str:
    """A Better Auth token for `user`, signed by `key`, for the Better Auth at `server`."""
    return key.sign(better_auth_claims(user, server.base_url))


def stop_key_set(server: JwksServer) -> None:
    """Take the key set down: connections are refused."""
    server.stop()


def restart_key_set(server: JwksServer) -> None:
    """Bring a stopped key set back."""
    server.start()


def fail_key_set(server: JwksServer) -> None:
    """Make the key set answer 503."""
    server.status = 503


def heal_key_set(server: JwksServer) -> None:
    """Make the key set answer normally again."""
    server.status = 200


OUTAGES = [
    pytest.param(stop_key_set, restart_key_set, id="key set down"),
    pytest.param(fail_key_set, heal_key_set, id="key set answering 503"),
]


def test_keys_are_fetched_on_first_need_then_cached(key_set: JwksServer, user_id: str) -> None:
    verifier = verifier_for(key_set, min_refetch_seconds=3600, max_age_seconds=3600)
    assert key_set.requests == 0
    for _ in range(5):
        assert verify(verifier, signed_by(key_set.keys[0], key_set, user_id)) == user_id
    assert key_set.requests == 1


def test_hs256_tokens_never_fetch_the_key_set(key_set: JwksServer, token_for: TokenFor, user_id: str) -> None:
    verifier = verifier_for(key_set)
    assert verify(verifier, token_for(user_id)) == user_id
    assert key_set.requests == 0


def accepted_or_asked_to_retry(verifier: TokenVerifier, token: str) -> bool:
    """Whether `verifier` accepts `token`; a refusal must be a 503 with `Retry-After`, never a sign-out (401)."""
    try:
        verify(verifier, token)
    except ApiError as error:
        assert (error.status_code, error.code) == (503, "signing_keys_unavailable"), (error.status_code, error.detail)
        assert int((error.headers or {})["Retry-After"]) >= 1
        return False
    return True


def test_newly_published_key_is_accepted_after_a_refetch(key_set: JwksServer, user_id: str) -> None:
    verifier = verifier_for(key_set, min_refetch_seconds=0.2, max_age_seconds=3600)
    assert verify(verifier, signed_by(key_set.keys[0], key_set, user_id)) == user_id
    rotated = key_set.add(new_key_pair("ES256"))
    token = signed_by(rotated, key_set, user_id)
    assert wait_until(lambda: accepted_or_asked_to_retry(verifier, token))
    assert key_set.requests == 2
    assert verify(verifier, signed_by(key_set.keys[0], key_set, user_id)) == user_id


def test_removed_key_stops_working_after_the_cache_max_age(key_set: JwksServer, user_id: str) -> None:
    verifier = verifier_for(key_set, min_refetch_seconds=0.05, max_age_seconds=0.5)
    retired = key_set.keys[0]
    token = signed_by(retired, key_set, user_id)
    assert verify(verifier, token) == user_id
    key_set.add(new_key_pair("EdDSA"))
    key_set.remove(retired)
    assert wait_until(lambda: not accepts(verifier, token))
    error = refusal(verifier, token)
    assert (error.status_code, error.code) == (401, "invalid_token")
    assert error.headers == {"WWW-Authenticate": "Bearer"}


def test_a_token_accepted_once_is_still_refused_once_it_expires(
    key_set: JwksServer, token_for: TokenFor, user_id: str
) -> None:
    """Verified tokens are remembered, but never past their `exp` (plus the clock leeway)."""
    verifier = verifier_for(key_set)
    nearly_expired = token_for(user_id, exp=int(time.time()) - CLOCK_LEEWAY_SECONDS + 2)
    assert verify(verifier, nearly_expired) == user_id  # within the leeway: accepted, and remembered
    assert wait_until(lambda: not accepts(verifier, nearly_expired))
    error = refusal(verifier, nearly_expired)
    assert (error.status_code, error.code) == (401, "token_expired")


def test_unknown_kids_fetch_at_most_once_per_refetch_interval(key_set: JwksServer, user_id: str) -> None:
    verifier = verifier_for(key_set, min_refetch_seconds=3600, max_age_seconds=3600)
    published = key_set.keys[0]
    for attempt in range(50):
        bogus = SigningKeyPair("EdDSA", uuid.uuid4().hex, published.private_key)  # the real key under a made-up kid
        error = refusal(verifier, signed_by(bogus, key_set, user_id))
        if attempt == 0:  # looked up in the key set, which does not have it
            assert error.status_code == 401
        else:  # never seen, and the refetch limit holds back a fresh look: retry later, do not sign out
            assert (error.status_code, error.code) == (503, "signing_keys_unavailable")
            assert 1 <= int((error.headers or {})["Retry-After"]) <= 3600
    assert key_set.requests == 1
    assert verify(verifier, signed_by(published, key_set, user_id)) == user_id
    assert key_set.requests == 1


@pytest.mark.parametrize(("take_down", "bring_back"), OUTAGES)
def test_unreachable_key_set_without_a_cached_key_is_503(
    key_set: JwksServer, user_id: str, take_down: Callable[[JwksServer], None], bring_back: Callable[[JwksServer], None]
) -> None:
    verifier = verifier_for(key_set, min_refetch_seconds=0, max_age_seconds=3600)
    take_down(key_set)
    error = refusal(verifier, signed_by(key_set.keys[0], key_set, user_id))
    assert (error.status_code, error.code) == (503, "signing_keys_unavailable")


@pytest.mark.parametrize(("take_down", "bring_back"), OUTAGES)
def test_cached_keys_keep_working_while_the_key_set_is_unreachable(
    key_set: JwksServer, user_id: str, take_down: Callable[[JwksServer], None], bring_back: Callable[[JwksServer], None]
) -> None:
    """With a max age of 0 every use wants a fresh copy, so the outage is felt at once."""
    verifier = verifier_for(key_set, min_refetch_seconds=0, max_age_seconds=0)
    token = signed_by(key_set.keys[0], key_set, user_id)
    assert verify(verifier, token) == user_id
    take_down(key_set)
    assert verify(verifier, token) == user_id
    unknown = refusal(verifier, signed_by(new_key_pair("EdDSA"), key_set, user_id))
    assert (unknown.status_code, unknown.code) == (503, "signing_keys_unavailable")


def rsa_key_without_alg() -> SigningKeyPair:
    """An RSA key published without `alg`, as a key set may list it."""
    return new_key_pair("RS256", publish_alg=False)


@pytest.mark.parametrize(
    ("publish", "token_alg", "accepted"),
    [
        pytest.param(rsa_key_without_alg, "RS256", True, id="RSA key without alg: RS256"),
        pytest.param(rsa_key_without_alg, "PS256", True, id="RSA key without alg: PS256"),
        *(
            pytest.param(rsa_key_without_alg, alg, False, id=f"RSA key without alg: {alg}")
            for alg in ("RS384", "RS512", "PS384", "PS512")
        ),
        pytest.param(lambda: new_key_pair("RS256"), "PS256", False, id="RSA key published for RS256: PS256"),
        pytest.param(
            lambda: SigningKeyPair("RS384", uuid.uuid4().hex, generate_private_key("RS256")),
            "RS384",
            False,
            id="RSA key published for RS384",
        ),
        pytest.param(
            lambda: SigningKeyPair("ES384", uuid.uuid4().hex, ec.generate_private_key(ec.SECP384R1())),
            "ES384",
            False,
            id="P-384 key published for ES384",
        ),
    ],
)
def test_published_key_verifies_only_the_allowed_algorithms(
    key_set: JwksServer, user_id: str, publish: Callable[[], SigningKeyPair], token_alg: str, accepted: bool
) -> None:
    """Whatever the key set publishes, only EdDSA, ES256, ES512, RS256 and PS256 tokens get through."""
    key = key_set.add(publish())
    claims = better_auth_claims(user_id, key_set.base_url)
    token = jwt.encode(claims, key.private_key, algorithm=token_alg, headers={"kid": key.kid})
    verifier = verifier_for(key_set)
    if accepted:
        assert verify(verifier, token) == user_id
    else:
        error = refusal(verifier, token)
        assert (error.status_code, error.code) == (401, "invalid_token")


def test_concurrent_first_requests_fetch_the_key_set_once(key_set: JwksServer) -> None:
    cache = JwksCache(key_set.jwks_url, min_refetch_seconds=0, max_age_seconds=3600)
    kid = key_set.keys[0].kid

    async def first_requests() -> list[SigningKey | None]:
        return await asyncio.wait_for(asyncio.gather(*(cache.get(kid) for _ in range(20))), DEADLINE_SECONDS)

    found = asyncio.run(first_requests())
    assert len(found) == 20
    assert all(key is not None and key is found[0] for key in found)
    assert key_set.requests == 1


@pytest.mark.parametrize(("take_down", "bring_back"), OUTAGES)
def test_unreachable_key_set_is_503_and_the_service_recovers(
    database_url: str,
    serve: Serve,
    key_set: JwksServer,
    auth: Auth,
    user_id: str,
    take_down: Callable[[JwksServer], None],
    bring_back: Callable[[JwksServer], None],
) -> None:
    settings = make_settings(database_url, key_set)
    app = create_app(settings)
    app.state.token_verifier = TokenVerifier(settings, JwksCache(key_set.jwks_url, min_refetch_seconds=0.2))
    token = signed_by(key_set.keys[0], key_set, user_id)
    take_down(key_set)
    with serve(app) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        refused = http.get(tasks_path(user_id), headers=bearer(token))
        assert_error(refused, 503, "signing_keys_unavailable")
        assert token not in refused.text
        assert http.get("/health").status_code == 200
        assert http.get(tasks_path(user_id), headers=auth(user_id)).status_code == 200  # HS256 needs no key set

        bring_back(key_set)
        assert wait_until(lambda: http.get(tasks_path(user_id), headers=bearer(token)).status_code == 200)
        created = http.post(tasks_path(user_id), json={"title": "Back"}, headers=bearer(token))
        assert created.status_code == 201, created.text
