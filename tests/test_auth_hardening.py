"""Token verification under attack and breakage: stalled or hostile key servers, odd token headers and claims,
key rotation, stale keys, and the key-set URL itself.

Everything is real: the app served over HTTP, tokens signed with real keys, and key servers on real sockets
that hang, trickle, or send too much or nonsense (tests/key_servers.py).
"""

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from auth import JWKS_MAX_BYTES, JWKS_MAX_STALE_SECONDS, JwksCache, TokenVerifier
from main import create_app
from schemas import ApiError
from settings import Settings
from tests.conftest import SECRET, LiveServer, free_port, make_settings
from tests.key_servers import BodyKeyServer, HangingKeyServer, RawKeyServer, TricklingKeyServer
from tests.keys import JwksServer, SigningKeyPair, better_auth_claims, new_key_pair
from tests.test_auth import (
    DEADLINE_SECONDS,
    assert_error,
    assert_unauthorized,
    b64url,
    bearer,
    refusal,
    tasks_path,
    verify,
    wait_until,
)
from tests.test_config import settings_from, start_service

TokenFor = Callable[..., str]
Auth = Callable[[str], dict[str, str]]
Serve = Callable[..., LiveServer]

MIB = 1024 * 1024
FLOOD_SIZE = 60
# Far beyond any test: with it, a fetch ends only when the test releases the key server (or a cap stops it).
STALLED_FETCH_SECONDS = 600.0
# A valid request must be answered within this while the flood waits (it takes milliseconds when nothing stalls).
VALID_REQUEST_SECONDS = 10.0
# The refetch limit of the tests that need to act inside one refetch interval: generous for a few local requests.
REFETCH_WINDOW_SECONDS = 3.0


# --- helpers -----------------------------------------------------------------------------------


def settings_for(base_url: str) -> Settings:
    """Settings trusting the Better Auth at `base_url`, HS256 enabled (nothing read from the environment)."""
    return Settings(
        _env_file=None, DATABASE_URL="sqlite:///:memory:", better_auth_secret=SECRET, better_auth_url=base_url
    )


def verifier_at(server: RawKeyServer | JwksServer, **cache_options: Any) -> TokenVerifier:
    """A token verifier for the Better Auth at `server`, its key cache tuned by `cache_options`."""
    settings = settings_for(server.base_url)
    return TokenVerifier(settings, JwksCache(settings.jwks_endpoint, **cache_options))


def app_trusting(
    database_url: str, jwks_server: JwksServer, key_server: RawKeyServer | JwksServer, **cache_options: Any
) -> FastAPI:
    """The app, trusting the Better Auth at `key_server`, its key cache tuned by `cache_options`."""
    settings = make_settings(database_url, jwks_server, better_auth_url=key_server.base_url)
    app = create_app(settings)
    app.state.token_verifier = TokenVerifier(settings, JwksCache(settings.jwks_endpoint, **cache_options))
    return app


def unknown_kid_token(user: str, issuer: str) -> str:
    """A Better Auth-shaped token naming a key id nobody published."""
    return new_key_pair("EdDSA").sign(better_auth_claims(user, issuer))


def document_of(*keys: SigningKeyPair | dict[str, Any] | Any) -> bytes:
    """A JWKS document listing `keys` (key pairs by their public JWK, anything else as it is)."""
    listed = [key.public_jwk if isinstance(key, SigningKeyPair) else key for key in keys]
    return json.dumps({"keys": listed}).encode()


def signed_token(header: dict[str, Any], claims: dict[str, Any], key: SigningKeyPair | None = None) -> str:
    """A compact JWS with exactly `header`, signed with `key` (its own algorithm), else HS256 with the test secret."""
    unsigned = f"{b64url(json.dumps(header))}.{b64url(json.dumps(claims))}".encode()
    if key is None:
        signature = jwt.get_algorithm_by_name("HS256").sign(unsigned, SECRET.encode())
    else:
        algorithm = jwt.get_algorithm_by_name(key.algorithm)
        signature = algorithm.sign(unsigned, algorithm.prepare_key(key.private_key))
    return f"{unsigned.decode()}.{b64url(signature)}"


def hs256_claims(user: str, **claims: Any) -> dict[str, Any]:
    """Claims of a valid HS256 token for `user` (an hour), with `claims` changed."""
    now = int(time.time())
    return {"sub": user, "iat": now, "exp": now + 3600} | claims


def assert_retry_later(error: ApiError | httpx.Response) -> int:
    """A 503 `signing_keys_unavailable` with `Retry-After` in whole seconds (at least 1); returns those seconds."""
    if isinstance(error, ApiError):
        assert (error.status_code, error.code) == (503, "signing_keys_unavailable"), (error.status_code, error.detail)
        retry_after = (error.headers or {}).get("Retry-After", "")
    else:
        assert_error(error, 503, "signing_keys_unavailable")
        retry_after = error.headers.get("Retry-After", "")
    assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
    return int(retry_after)


def status_of(verifier: TokenVerifier, token: str) -> int:
    """200 when `verifier` accepts `token`, else the status it refuses it with."""
    try:
        verify(verifier, token)
    except ApiError as error:
        return error.status_code
    return 200


# --- a stalled key server never stalls the service ---------------------------------------------


class RequestCounter:
    """How many HTTP requests have entered an app (counted on its event loop)."""

    def __init__(self) -> None:
        self.entered = 0


class CountRequests:
    """ASGI middleware counting requests as they enter, so a test knows they are all inside the app."""

    def __init__(self, app: ASGIApp, counter: RequestCounter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count, then pass the request on."""
        if scope["type"] == "http":
            self.counter.entered += 1
        await self.app(scope, receive, send)


STALLED_KEY_SERVERS = [
    pytest.param(HangingKeyServer, id="hangs"),
    pytest.param(lambda: TricklingKeyServer("headers"), id="trickles its headers"),
    pytest.param(lambda: TricklingKeyServer("body"), id="trickles its body"),
]


@pytest.mark.parametrize("stalled", STALLED_KEY_SERVERS)
def test_valid_token_is_served_while_a_flood_of_unknown_kids_waits_on_a_stalled_key_server(
    database_url: str,
    jwks_server: JwksServer,
    serve: Serve,
    auth: Auth,
    user_id: str,
    other_user_id: str,
    stalled: Callable[[], RawKeyServer],
) -> None:
    """The flood waits on one fetch as coroutines, holding no worker thread, so other requests go on."""
    with stalled() as key_server:
        app = app_trusting(database_url, jwks_server, key_server, timeout_seconds=STALLED_FETCH_SECONDS)
        inside = RequestCounter()
        app.add_middleware(CountRequests, counter=inside)
        flood_tokens = [unknown_kid_token(user_id, key_server.base_url) for _ in range(FLOOD_SIZE)]
        with serve(app) as live, ThreadPoolExecutor(FLOOD_SIZE) as senders:
            url = live.url + tasks_path(user_id)
            try:
                flood = [
                    senders.submit(httpx.get, url, headers=bearer(token), timeout=DEADLINE_SECONDS)
                    for token in flood_tokens
                ]
                assert wait_until(lambda: inside.entered >= FLOOD_SIZE and key_server.connections >= 1)

                valid = httpx.get(
                    live.url + tasks_path(other_user_id), headers=auth(other_user_id), timeout=VALID_REQUEST_SECONDS
                )
                assert valid.status_code == 200, valid.text
                assert not any(request.done() for request in flood)  # all still waiting on the stalled fetch
                assert key_server.connections == 1  # one fetch for the whole flood
            finally:
                key_server.release()
            answers = [request.result(timeout=DEADLINE_SECONDS) for request in flood]
    for answer in answers:
        assert_retry_later(answer)
    assert key_server.connections == 1


@pytest.mark.parametrize("during", ["headers", "body"])
def test_a_key_server_that_trickles_forever_is_given_up_on_at_the_fetch_deadline(
    database_url: str, jwks_server: JwksServer, serve: Serve, user_id: str, during: str
) -> None:
    """With the service's own settings: the whole fetch has a deadline, not each read."""
    with TricklingKeyServer(during) as key_server:
        settings = make_settings(database_url, jwks_server, better_auth_url=key_server.base_url)
        with serve(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=DEADLINE_SECONDS) as http:
            token = unknown_kid_token(user_id, key_server.base_url)
            assert_retry_later(http.get(tasks_path(user_id), headers=bearer(token)))
        assert wait_until(key_server.hung_up.is_set)  # the service let go, while the server trickled on
        assert not key_server.released.is_set()


# --- the size cap ------------------------------------------------------------------------------

OVERSIZED = [
    pytest.param({"Content-Type": "application/json", "Content-Length": str(10 * MIB)}, [b'{"keys": ['], id="declared"),
    pytest.param(
        {"Content-Type": "application/json"}, [b'{"keys": [' + b" " * JWKS_MAX_BYTES], id="sent without a length"
    ),
]


@pytest.mark.parametrize(("headers", "body"), OVERSIZED)
def test_oversized_key_set_is_refused_without_reading_it_to_the_end(
    database_url: str,
    jwks_server: JwksServer,
    serve: Serve,
    user_id: str,
    headers: dict[str, str],
    body: list[bytes],
) -> None:
    """The server sends no more than shown, then holds on: only the size cap can end the fetch in time."""
    with BodyKeyServer(body, headers, then_hang=True) as key_server:
        app = app_trusting(database_url, jwks_server, key_server, timeout_seconds=STALLED_FETCH_SECONDS)
        with serve(app) as live, httpx.Client(base_url=live.url, timeout=DEADLINE_SECONDS) as http:
            token = unknown_kid_token(user_id, key_server.base_url)
            assert_retry_later(http.get(tasks_path(user_id), headers=bearer(token)))
        assert wait_until(key_server.hung_up.is_set)


@pytest.mark.parametrize("declared", [True, False], ids=["with Content-Length", "without Content-Length"])
@pytest.mark.parametrize(("size", "readable"), [(JWKS_MAX_BYTES, True), (JWKS_MAX_BYTES + 1, False)])
def test_key_set_size_cap_is_exact(user_id: str, declared: bool, size: int, readable: bool) -> None:
    key = new_key_pair("EdDSA")
    document = document_of(key)
    body = document + b" " * (size - len(document))  # JSON allows trailing whitespace
    headers = {"Content-Type": "application/json"} | ({"Content-Length": str(size)} if declared else {})
    with BodyKeyServer([body], headers) as key_server:
        verifier = verifier_at(key_server)
        token = key.sign(better_auth_claims(user_id, key_server.base_url))
        if readable:
            assert verify(verifier, token) == user_id
        else:
            assert_retry_later(refusal(verifier, token))


# --- odd token headers and claims --------------------------------------------------------------


def published_kid(keys: dict[str, SigningKeyPair]) -> str:
    """The kid of the published Ed25519 key."""
    return keys["EdDSA"].kid


# (header, sign with the published Ed25519 key rather than the shared secret)
ODD_HEADERS = [
    pytest.param(lambda kid: {"alg": ["HS256"]}, False, id="alg a list"),
    pytest.param(lambda kid: {"alg": {"name": "HS256"}}, False, id="alg an object"),
    pytest.param(lambda kid: {"alg": 256}, False, id="alg a number"),
    pytest.param(lambda kid: {"alg": True}, False, id="alg a boolean"),
    pytest.param(lambda kid: {"alg": None}, False, id="alg null"),
    pytest.param(lambda kid: {"alg": ["EdDSA"], "kid": kid}, True, id="alg a list with a published kid"),
    pytest.param(lambda kid: {"alg": {"EdDSA": 1}, "kid": kid}, True, id="alg an object with a published kid"),
    pytest.param(lambda kid: {"alg": "EdDSA", "kid": 12}, True, id="kid a number"),
    pytest.param(lambda kid: {"alg": "EdDSA", "kid": [kid]}, True, id="kid a list"),
    pytest.param(lambda kid: {"alg": "EdDSA", "kid": {"kid": kid}}, True, id="kid an object"),
    pytest.param(lambda kid: {"alg": "HS256", "kid": ["k"]}, False, id="HS256 with kid a list"),
    pytest.param(lambda kid: {"alg": "HS256", "typ": ["JWT"]}, False, id="typ a list"),
    pytest.param(lambda kid: {"alg": "HS256", "typ": {"JWT": True}}, False, id="typ an object"),
    pytest.param(lambda kid: {"alg": "HS256", "typ": 1}, False, id="typ a number"),
    pytest.param(lambda kid: {"alg": "HS256", "typ": "logout+jwt"}, False, id="typ another kind of token"),
    pytest.param(lambda kid: {"alg": "EdDSA", "kid": kid, "typ": "dpop+jwt"}, True, id="EdDSA, typ another kind"),
    pytest.param(lambda kid: {"alg": "HS256", "cty": "JWT"}, False, id="cty a nested token"),
    pytest.param(lambda kid: {"alg": "HS256", "cty": 5}, False, id="cty a number"),
]


@pytest.mark.parametrize(("header", "published_key"), ODD_HEADERS)
def test_token_with_an_odd_header_value_is_401(
    client: httpx.Client,
    jwks_server: JwksServer,
    better_auth_keys: dict[str, SigningKeyPair],
    user_id: str,
    header: Callable[[str], dict[str, Any]],
    published_key: bool,
) -> None:
    key = better_auth_keys["EdDSA"] if published_key else None
    token = signed_token(
        header(published_kid(better_auth_keys)), better_auth_claims(user_id, jwks_server.base_url), key
    )
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token, code=None)


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "application/jwt"])
def test_token_typed_as_a_jwt_or_untyped_is_accepted(client: httpx.Client, user_id: str, typ: str | None) -> None:
    header = {"alg": "HS256"} | ({"typ": typ} if typ else {})
    response = client.get(tasks_path(user_id), headers=bearer(signed_token(header, hs256_claims(user_id))))
    assert response.status_code == 200, response.text


ODD_TIME_CLAIMS = [
    pytest.param(lambda now: {"exp": str(now + 3600)}, id="exp a numeric string"),
    pytest.param(lambda now: {"exp": "1999999999"}, id="exp a numeric string far ahead"),
    pytest.param(lambda now: {"exp": [now + 3600]}, id="exp a list"),
    pytest.param(lambda now: {"exp": {"at": now + 3600}}, id="exp an object"),
    pytest.param(lambda now: {"nbf": True}, id="nbf a boolean"),
    pytest.param(lambda now: {"nbf": str(now - 60)}, id="nbf a numeric string"),
    pytest.param(lambda now: {"nbf": [now - 60]}, id="nbf a list"),
    pytest.param(lambda now: {"iat": True}, id="iat a boolean"),
    pytest.param(lambda now: {"iat": str(now - 60)}, id="iat a numeric string"),
    pytest.param(lambda now: {"iat": {"at": now - 60}}, id="iat an object"),
]


@pytest.mark.parametrize("alg", ["HS256", "EdDSA"])
@pytest.mark.parametrize("claims", ODD_TIME_CLAIMS)
def test_time_claim_that_is_not_a_json_number_is_401(
    client: httpx.Client,
    jwks_server: JwksServer,
    better_auth_keys: dict[str, SigningKeyPair],
    user_id: str,
    claims: Callable[[int], dict[str, Any]],
    alg: str,
) -> None:
    changed = claims(int(time.time()))
    if alg == "HS256":
        token = signed_token({"alg": "HS256", "typ": "JWT"}, hs256_claims(user_id, **changed))
    else:
        token = better_auth_keys["EdDSA"].sign(better_auth_claims(user_id, jwks_server.base_url) | changed)
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token, code=None)


def test_time_claims_may_be_fractional_numbers(client: httpx.Client, user_id: str) -> None:
    now = time.time()
    claims = hs256_claims(user_id, exp=now + 3600.5, nbf=now - 10.25, iat=now - 10.25)
    response = client.get(tasks_path(user_id), headers=bearer(signed_token({"alg": "HS256"}, claims)))
    assert response.status_code == 200, response.text


# --- the user: no '/' in it ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param(lambda user: {"sub": f"{user}/tasks"}, id="sub with a slash"),
        pytest.param(lambda user: {"sub": "/"}, id="sub a slash"),
        pytest.param(lambda user: {"sub": None, "user_id": f"{user}/x"}, id="user_id with a slash"),
    ],
)
def test_user_containing_a_slash_is_401(
    client: httpx.Client, user_id: str, claims: Callable[[str], dict[str, Any]]
) -> None:
    payload = {name: value for name, value in hs256_claims(user_id, **claims(user_id)).items() if value is not None}
    token = signed_token({"alg": "HS256", "typ": "JWT"}, payload)
    response = client.get(tasks_path(user_id), headers=bearer(token))
    assert_unauthorized(response, token)
    assert "'/'" in response.json()["detail"]


def test_better_auth_user_containing_a_slash_is_401(
    client: httpx.Client, jwks_server: JwksServer, better_auth_keys: dict[str, SigningKeyPair], user_id: str
) -> None:
    token = better_auth_keys["EdDSA"].sign(better_auth_claims(f"{user_id}/x", jwks_server.base_url))
    assert_unauthorized(client.get(tasks_path(user_id), headers=bearer(token)), token)


@pytest.mark.parametrize("user", ["a b", "100%", "%2F", "..", "?x=1#y", "ü-ñ-日本", "back\\slash", "user@example.com"])
def test_any_other_user_text_is_the_user(user: str) -> None:
    verifier = TokenVerifier(settings_for("http://127.0.0.1:1"))
    assert verify(verifier, signed_token({"alg": "HS256"}, hs256_claims(user))) == user


# --- a key set with bad keys, or that cannot be read -------------------------------------------


def malformations() -> dict[str, Callable[[dict[str, Any]], Any]]:
    """Each turns a real public JWK into one a key set might list by mistake or malice."""
    return {
        "kty a list": lambda jwk: jwk | {"kty": ["OKP"]},
        "kty an object": lambda jwk: jwk | {"kty": {"OKP": True}},
        "kty a number": lambda jwk: jwk | {"kty": 1},
        "crv a list": lambda jwk: jwk | {"crv": ["Ed25519"]},
        "crv an object": lambda jwk: jwk | {"crv": {}},
        "alg a list": lambda jwk: jwk | {"alg": ["EdDSA"]},
        "alg an object": lambda jwk: jwk | {"alg": {"EdDSA": 1}},
        "alg a number": lambda jwk: jwk | {"alg": 7},
        "use a list": lambda jwk: jwk | {"use": ["sig"]},
        "x a number": lambda jwk: jwk | {"x": 12},
        "x a list": lambda jwk: jwk | {"x": [jwk["x"]]},
        "x not base64": lambda jwk: jwk | {"x": "***"},
        "kid a number": lambda jwk: jwk | {"kid": 5},
        "kid too long": lambda jwk: jwk | {"kid": "k" * 10_000},
        "key a string": lambda jwk: "key",
        "key a number": lambda jwk: 5,
        "key null": lambda jwk: None,
        "key a list": lambda jwk: [jwk],
    }


@pytest.mark.parametrize("malformation", malformations())
def test_a_malformed_key_is_skipped_and_the_good_ones_kept(user_id: str, malformation: str) -> None:
    good, spoiled = new_key_pair("EdDSA"), new_key_pair("EdDSA")
    bad_jwk = malformations()[malformation](spoiled.public_jwk)
    with BodyKeyServer([document_of(bad_jwk, good, bad_jwk)]) as key_server:
        verifier = verifier_at(key_server, min_refetch_seconds=0)
        assert verify(verifier, good.sign(better_auth_claims(user_id, key_server.base_url))) == user_id
        if isinstance(bad_jwk, dict) and isinstance(bad_jwk.get("kid"), str):
            named = jwt.encode(
                better_auth_claims(user_id, key_server.base_url),
                spoiled.private_key,
                algorithm="EdDSA",
                headers={"kid": bad_jwk["kid"]},
            )
            error = refusal(verifier, named)
            assert (error.status_code, error.code) == (401, "invalid_token")


UNREADABLE_KEY_SETS = [
    pytest.param(b'{"keys": [], "note": "caf\xe9"}', id="not UTF-8"),
    pytest.param('{"keys": []}'.encode("utf-16"), id="UTF-16"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested too deep"),
    pytest.param(b'{"keys": 5}', id="keys a number"),
    pytest.param(b'{"keys": {"kid": "k"}}', id="keys an object"),
    pytest.param(b"[]", id="a list"),
    pytest.param(b'"keys"', id="a string"),
    pytest.param(b'{"keys": [', id="cut short"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("unreadable", UNREADABLE_KEY_SETS)
def test_unreadable_key_set_is_an_outage(user_id: str, unreadable: bytes) -> None:
    """Cached keys keep working through it; a token no cached key fits is a 503 to retry, not a 401."""
    key = new_key_pair("EdDSA")
    with BodyKeyServer([document_of(key)]) as key_server:
        verifier = verifier_at(key_server, min_refetch_seconds=0, max_age_seconds=0)
        token = key.sign(better_auth_claims(user_id, key_server.base_url))
        assert verify(verifier, token) == user_id
        key_server.body = [unreadable]
        fetches = key_server.connections
        assert verify(verifier, token) == user_id
        assert key_server.connections > fetches  # the unreadable key set was fetched, and kept nothing out
        assert_retry_later(refusal(verifier, unknown_kid_token(user_id, key_server.base_url)))


# --- stale keys: an hour at most ----------------------------------------------------------------


@pytest.fixture
def key_set() -> Iterator[JwksServer]:
    """A JWKS endpoint of this test's own, publishing one Ed25519 key; stopped afterwards."""
    server = JwksServer()
    server.add(new_key_pair("EdDSA"))
    server.start()
    yield server
    server.stop()


def test_cached_keys_stop_working_once_too_stale(key_set: JwksServer, user_id: str) -> None:
    verifier = verifier_at(key_set, min_refetch_seconds=0, max_age_seconds=0, max_stale_seconds=0.5)
    token = key_set.keys[0].sign(better_auth_claims(user_id, key_set.base_url))
    assert verify(verifier, token) == user_id
    key_set.stop()
    assert wait_until(lambda: status_of(verifier, token) == 503)
    assert_retry_later(refusal(verifier, token))
    key_set.start()
    assert wait_until(lambda: status_of(verifier, token) == 200)


def test_stale_keys_are_used_for_at_most_an_hour_by_default(key_set: JwksServer) -> None:
    assert JwksCache(key_set.jwks_url).max_stale_seconds == JWKS_MAX_STALE_SECONDS <= 3600


# --- key rotation: never-seen kids are 503 between fetches, removed ones 401 ---------------------


def test_never_seen_kid_while_refetch_is_held_back_is_503_with_retry_after(
    database_url: str, jwks_server: JwksServer, serve: Serve, key_set: JwksServer, user_id: str
) -> None:
    app = app_trusting(database_url, jwks_server, key_set, min_refetch_seconds=3600)
    published = key_set.keys[0].sign(better_auth_claims(user_id, key_set.base_url))
    with serve(app) as live, httpx.Client(base_url=live.url, timeout=DEADLINE_SECONDS) as http:
        assert http.get(tasks_path(user_id), headers=bearer(published)).status_code == 200
        never_seen = unknown_kid_token(user_id, key_set.base_url)
        response = http.get(tasks_path(user_id), headers=bearer(never_seen))
        assert assert_retry_later(response) <= 3600
        assert never_seen not in response.text
    assert key_set.requests == 1


def fetch_again(verifier: TokenVerifier, server: JwksServer) -> None:
    """Wait until the refetch limit lets a never-seen kid be looked up, and let one be: the key set is read again."""
    probe = unknown_kid_token("probe", server.base_url)
    assert wait_until(lambda: status_of(verifier, probe) == 401)


def test_kid_that_was_published_and_removed_is_401_between_fetches(key_set: JwksServer, user_id: str) -> None:
    retired, kept = key_set.keys[0], key_set.add(new_key_pair("EdDSA"))
    verifier = verifier_at(key_set, min_refetch_seconds=REFETCH_WINDOW_SECONDS, max_age_seconds=3600)
    assert verify(verifier, kept.sign(better_auth_claims(user_id, key_set.base_url))) == user_id
    key_set.remove(retired)
    fetch_again(verifier, key_set)
    assert key_set.requests == 2

    error = refusal(verifier, retired.sign(better_auth_claims(user_id, key_set.base_url)))
    assert (error.status_code, error.code, error.headers) == (401, "invalid_token", {"WWW-Authenticate": "Bearer"})
    assert_retry_later(refusal(verifier, unknown_kid_token(user_id, key_set.base_url)))  # still inside the interval
    assert key_set.requests == 2  # so the 401 came from memory, without a fresh look


@pytest.mark.parametrize(("kept", "retired_status"), [(3, 503), (4, 401)])
def test_published_kids_remembered_are_bounded(
    key_set: JwksServer, user_id: str, kept: int, retired_status: int
) -> None:
    """Only published kids are remembered, the most recent `kept`: made-up kids never are."""
    retired = key_set.keys[0]
    verifier = verifier_at(
        key_set, min_refetch_seconds=REFETCH_WINDOW_SECONDS, max_age_seconds=3600, published_kids_kept=kept
    )
    assert verify(verifier, retired.sign(better_auth_claims(user_id, key_set.base_url))) == user_id
    key_set.remove(retired)
    for _ in range(3):
        key_set.add(new_key_pair("EdDSA"))
    fetch_again(verifier, key_set)  # polls with one made-up kid: were it remembered, the polls would end at once
    assert key_set.requests == 2
    token = retired.sign(better_auth_claims(user_id, key_set.base_url))
    assert status_of(verifier, token) == retired_status
    assert key_set.requests == 2


def test_key_rotation_does_not_sign_users_out(
    database_url: str, jwks_server: JwksServer, serve: Serve, key_set: JwksServer, user_id: str
) -> None:
    """A client that honours Retry-After gets in with a token from a newly published key; it never sees a 401."""
    app = app_trusting(database_url, jwks_server, key_set, min_refetch_seconds=REFETCH_WINDOW_SECONDS)
    with serve(app) as live, httpx.Client(base_url=live.url, timeout=DEADLINE_SECONDS) as http:
        first = key_set.keys[0].sign(better_auth_claims(user_id, key_set.base_url))
        assert http.get(tasks_path(user_id), headers=bearer(first)).status_code == 200
        rotated = key_set.add(new_key_pair("EdDSA")).sign(better_auth_claims(user_id, key_set.base_url))
        for _ in range(10):
            response = http.get(tasks_path(user_id), headers=bearer(rotated))
            if response.status_code == 200:
                break
            time.sleep(assert_retry_later(response))
        assert response.status_code == 200, response.text


# --- BETTER_AUTH_URL with a path, and where keys may come from ----------------------------------


@pytest.mark.parametrize(
    ("better_auth_url", "key_set_url", "origin"),
    [
        ("https://app.example.com", "https://app.example.com/api/auth/jwks", "https://app.example.com"),
        ("https://app.example.com/app", "https://app.example.com/app/api/auth/jwks", "https://app.example.com"),
        ("https://app.example.com/api/auth", "https://app.example.com/api/auth/jwks", "https://app.example.com"),
        (
            "https://app.example.com/app/api/auth/",
            "https://app.example.com/app/api/auth/jwks",
            "https://app.example.com",
        ),
        ("https://App.Example.COM:443/x", "https://App.Example.COM:443/x/api/auth/jwks", "https://app.example.com"),
        (
            "https://app.example.com:8443/x",
            "https://app.example.com:8443/x/api/auth/jwks",
            "https://app.example.com:8443",
        ),
        ("http://localhost:3000/app", "http://localhost:3000/app/api/auth/jwks", "http://localhost:3000"),
        ("http://[::1]:3000/api/auth", "http://[::1]:3000/api/auth/jwks", "http://[::1]:3000"),
    ],
)
def test_better_auth_url_path_sets_the_key_set_url_and_its_origin_the_issuer(
    better_auth_url: str, key_set_url: str, origin: str
) -> None:
    settings = settings_from(BETTER_AUTH_URL=better_auth_url)
    assert (settings.jwks_endpoint, settings.expected_issuer, settings.expected_audience) == (
        key_set_url,
        origin,
        origin,
    )


def test_jwt_issuer_and_audience_still_override_the_origin() -> None:
    settings = settings_from(BETTER_AUTH_URL="https://app.example.com/app", JWT_ISSUER="iss-x", JWT_AUDIENCE="aud-y")
    assert (settings.expected_issuer, settings.expected_audience) == ("iss-x", "aud-y")


@pytest.mark.parametrize(
    ("path", "key_set_path"),
    [("/app", "/app/api/auth/jwks"), ("/api/auth", "/api/auth/jwks"), ("/app/api/auth", "/app/api/auth/jwks")],
)
def test_better_auth_under_a_path_signs_with_its_origin(user_id: str, path: str, key_set_path: str) -> None:
    key = new_key_pair("EdDSA")
    with BodyKeyServer([document_of(key)]) as key_server:
        verifier = TokenVerifier(settings_for(key_server.base_url + path))
        assert verify(verifier, key.sign(better_auth_claims(user_id, key_server.base_url))) == user_id
        assert key_server.request_paths == [key_set_path]
        with_path = key.sign(better_auth_claims(user_id, key_server.base_url + path))
        assert (refusal(verifier, with_path).status_code, refusal(verifier, with_path).code) == (401, "invalid_token")


@pytest.mark.parametrize(
    ("environment", "key_set_url"),
    [
        ({"BETTER_AUTH_URL": "https://app.example.com"}, "https://app.example.com/api/auth/jwks"),
        ({"BETTER_AUTH_URL": "http://localhost:3000"}, "http://localhost:3000/api/auth/jwks"),
        ({"BETTER_AUTH_URL": "http://LOCALHOST:3000/app"}, "http://LOCALHOST:3000/app/api/auth/jwks"),
        ({"BETTER_AUTH_URL": "http://127.0.0.1:3000"}, "http://127.0.0.1:3000/api/auth/jwks"),
        ({"BETTER_AUTH_URL": "http://127.20.30.40"}, "http://127.20.30.40/api/auth/jwks"),
        ({"BETTER_AUTH_URL": "http://[::1]:3000"}, "http://[::1]:3000/api/auth/jwks"),
        ({"JWKS_URL": "https://keys.example.com/jwks"}, "https://keys.example.com/jwks"),
        ({"JWKS_URL": "http://127.0.0.1:4000/jwks"}, "http://127.0.0.1:4000/jwks"),
        (
            {"BETTER_AUTH_URL": "http://app.example.com", "JWKS_URL": "https://app.example.com/api/auth/jwks"},
            "https://app.example.com/api/auth/jwks",
        ),
    ],
)
def test_key_set_over_https_or_from_this_machine_is_allowed(environment: dict[str, str], key_set_url: str) -> None:
    assert settings_from(**environment).jwks_endpoint == key_set_url


@pytest.mark.parametrize(
    ("variable", "environment"),
    [
        pytest.param("JWKS_URL", {"JWKS_URL": "http://keys.example.com/jwks"}, id="JWKS_URL over http"),
        pytest.param("BETTER_AUTH_URL", {"BETTER_AUTH_URL": "http://app.example.com"}, id="BETTER_AUTH_URL over http"),
        pytest.param(
            "BETTER_AUTH_URL",
            {"BETTER_AUTH_URL": "http://192.168.1.20:3000/api/auth"},
            id="BETTER_AUTH_URL over http to the local network",
        ),
        pytest.param(
            "BETTER_AUTH_URL", {"BETTER_AUTH_URL": "http://localhost.example.com"}, id="a domain that starts localhost"
        ),
        pytest.param(
            "JWKS_URL", {"JWKS_URL": "http://user:hunter2hunter2@10.1.2.3/jwks"}, id="with a password, never shown"
        ),
        pytest.param(
            "BETTER_AUTH_URL",
            {"BETTER_AUTH_URL": "https://app.example.com/?tenant=1"},
            id="BETTER_AUTH_URL with a query",
        ),
    ],
)
def test_refused_key_set_url_stops_start_up_with_one_line(
    variable: str, environment: dict[str, str], tmp_path: Path
) -> None:
    process = start_service(environment, tmp_path, free_port())
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(f"Invalid configuration: {variable}: "), lines
    assert "Traceback" not in stderr
    assert "hunter2hunter2" not in stdout + stderr


# --- the cache on its own: one fetch in flight, awaited by everyone who needs it ---------------------


def test_coroutines_needing_the_key_set_during_a_fetch_share_it(user_id: str) -> None:
    key = new_key_pair("EdDSA")
    with BodyKeyServer([document_of(key)]) as key_server:
        verifier = verifier_at(key_server, min_refetch_seconds=0)
        tokens = [key.sign(better_auth_claims(f"{user_id}-{n}", key_server.base_url)) for n in range(20)]

        async def all_at_once() -> list[str]:
            return await asyncio.wait_for(asyncio.gather(*(verifier.user_id(t) for t in tokens)), DEADLINE_SECONDS)

        assert asyncio.run(all_at_once()) == [f"{user_id}-{n}" for n in range(20)]
        assert key_server.connections == 1


def test_unknown_kid_is_looked_up_once_a_refetch_is_due(key_set: JwksServer, user_id: str) -> None:
    """The first never-seen kid is looked up (and is 401 when the key set lacks it)."""
    verifier = verifier_at(key_set, min_refetch_seconds=3600)
    error = refusal(verifier, unknown_kid_token(user_id, key_set.base_url))
    assert (error.status_code, error.code) == (401, "invalid_token")
    assert key_set.requests == 1
