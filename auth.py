"""Bearer-token verification and the `get_current_user_id` dependency.

Two kinds of token are accepted, chosen by the header's `alg`: HS256 signed with
`BETTER_AUTH_SECRET` (when set), and Better Auth's JWT-plugin tokens (EdDSA, ES256, ES512,
RS256, PS256) verified with the public keys Better Auth publishes at its JWKS endpoint.

Everything here runs on the event loop and never blocks it: the key set is fetched with an async
client, one fetch at a time, bounded in time and size, and requests that need it wait for that
fetch as coroutines, holding no worker thread.
"""

import asyncio
import json
import logging
import math
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import jwt
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

import metrics
from schemas import ApiError, storable_text
from settings import Settings

logger = logging.getLogger("todo.auth")

JWKS_ALGORITHMS = frozenset({"EdDSA", "ES256", "ES512", "RS256", "PS256"})
# Which token algorithms a published key may verify, by its type and curve.
ALGORITHMS_BY_KEY_TYPE: dict[tuple[str, str | None], frozenset[str]] = {
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
    ("OKP", "Ed448"): frozenset({"EdDSA"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("RSA", None): frozenset({"RS256", "PS256"}),
}
# The `typ` header values that name a JWT (RFC 7515 §4.1.9: compared case-insensitively, "application/" optional).
JWT_TYPES = frozenset({"jwt", "application/jwt"})
CLOCK_LEEWAY_SECONDS = 30
MAX_TOKEN_LENGTH = 16_384
# The whole fetch of the key set (connect, headers and body) must end within this: a server that trickles
# bytes cannot hold it longer, since httpx's own timeout bounds each read, not the whole exchange.
JWKS_FETCH_TIMEOUT_SECONDS = 5.0
# A key set larger than this is not read to the end, and counts as unreadable (Better Auth's is a few KiB).
JWKS_MAX_BYTES = 256 * 1024
# Fetches caused by an unknown `kid` happen at most this often, so bogus tokens cannot flood Better Auth.
JWKS_MIN_REFETCH_SECONDS = 10.0
# Cached keys are re-read after this long, so a key Better Auth removed stops working.
JWKS_MAX_AGE_SECONDS = 300.0
# While the key set cannot be read, cached keys stay usable for this long after the last successful read.
JWKS_MAX_STALE_SECONDS = 3600.0
# Key ids read from the key set, remembered so that a removed key (401) is told apart from one not seen yet (503).
# Only published kids are remembered, never a token's, so made-up kids cannot grow it.
PUBLISHED_KIDS_KEPT = 1024
# Longer key ids are not Better Auth's (it uses short random ids): such keys are skipped, not remembered.
MAX_KID_LENGTH = 256
# Tokens already verified, remembered until they expire: a client sends the same token many times.
VERIFIED_TOKENS_KEPT = 4096

bearer_scheme = HTTPBearer(
    auto_error=False, description="A JWT from Better Auth, or HS256 signed with BETTER_AUTH_SECRET"
)


def unauthorized(detail: str, code: str = "invalid_token") -> ApiError:
    """A 401 that tells the client to authenticate with a bearer token."""
    return ApiError(401, detail, code, headers={"WWW-Authenticate": "Bearer"})


class KeySetUnavailableError(Exception):
    """The key set cannot answer for a token's key right now: the caller should retry after `retry_after` seconds.

    Either the key set could not be read (and no cached key fits), or the token names a key id never seen in
    any key set while a fresh fetch is held back by the refetch limit.
    """

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class UnreadableKeySetError(Exception):
    """One fetch of the key set failed: unreachable, an error status, too big, too slow or not a JWKS document."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A published public key and the token algorithms it may verify."""

    key: Any
    algorithms: frozenset[str]


def _text_or_none(jwk: dict[str, Any], member: str) -> str | None:
    """The JWK member if it is text, None if absent; raises TypeError for any other JSON value."""
    value = jwk.get(member)
    if value is not None and not isinstance(value, str):
        raise TypeError(member)
    return value


def published_kids(document: Any) -> list[str]:
    """Every key id a JWKS document lists (usable keys or not), in order; nothing for a malformed document."""
    jwks = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(jwks, list):
        return []
    return [
        jwk["kid"]
        for jwk in jwks
        if isinstance(jwk, dict) and isinstance(jwk.get("kid"), str) and len(jwk["kid"]) <= MAX_KID_LENGTH
    ]


def parse_jwks(document: Any) -> dict[str, SigningKey]:
    """The usable signing keys of a JWKS document, by `kid`; a key that is unusable or malformed is skipped."""
    keys: dict[str, SigningKey] = {}
    jwks = document.get("keys") if isinstance(document, dict) else None
    for jwk in jwks if isinstance(jwks, list) else []:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or jwk.get("use", "sig") != "sig":
            continue
        kid: str = jwk["kid"]
        if len(kid) > MAX_KID_LENGTH:
            continue
        try:
            key_type, curve, published_alg = (_text_or_none(jwk, member) for member in ("kty", "crv", "alg"))
        except TypeError as not_text:
            logger.warning("skipping a key in the JWKS whose %s is not text (kid %.64r)", not_text, kid)
            continue
        algorithms = ALGORITHMS_BY_KEY_TYPE.get((key_type or "", None if key_type == "RSA" else curve), frozenset())
        if "alg" in jwk:
            algorithms &= {published_alg}
        if not algorithms:
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=next(iter(algorithms))).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            logger.warning("skipping an unreadable key in the JWKS (kid %.64r)", kid)
            continue
        keys[kid] = SigningKey(key=key, algorithms=algorithms)
    return keys


class JwksCache:
    """Better Auth's public keys, fetched on first need and cached for the process.

    Used from the event loop only. At most one fetch runs at a time; whoever needs the key set while it
    runs awaits that fetch (bounded by its deadline) instead of starting another or blocking a thread.
    """

    def __init__(
        self,
        url: str,
        *,
        min_refetch_seconds: float = JWKS_MIN_REFETCH_SECONDS,
        max_age_seconds: float = JWKS_MAX_AGE_SECONDS,
        max_stale_seconds: float = JWKS_MAX_STALE_SECONDS,
        timeout_seconds: float = JWKS_FETCH_TIMEOUT_SECONDS,
        max_bytes: int = JWKS_MAX_BYTES,
        published_kids_kept: int = PUBLISHED_KIDS_KEPT,
    ) -> None:
        self.url = url
        self.min_refetch_seconds = min_refetch_seconds
        self.max_age_seconds = max_age_seconds
        self.max_stale_seconds = max_stale_seconds
        self.timeout_seconds = timeout_seconds
        self.max_bytes = max_bytes
        self.published_kids_kept = published_kids_kept
        self._keys: dict[str, SigningKey] = {}
        self._fetched_at = float("-inf")  # when the keys above were read
        self._attempted_at = float("-inf")  # when a fetch last started, successful or not
        self._last_fetch_failed = False
        self._published_kids: OrderedDict[str, None] = OrderedDict()  # least recently published first
        self._fetch: asyncio.Task[None] | None = None
        self._tls: ssl.SSLContext | None = None  # made once: building one per fetch costs the loop ~25 ms

    def cached(self, kid: str) -> SigningKey | None:
        """The key named `kid` if it is cached and fresh; never blocks, never fetches."""
        if time.monotonic() - self._fetched_at > self.max_age_seconds:
            return None
        return self._keys.get(kid)

    async def get(self, kid: str) -> SigningKey | None:
        """The key named `kid`, fetching the key set when it is due; None if the key set has no such key.

        Raises KeySetUnavailableError when the key set cannot be read and no cached key fits, or when `kid`
        was never published and a fetch is held back by the refetch limit.
        """
        fresh = self.cached(kid)
        if fresh is not None:
            return fresh
        fetch = self._fetch_in_flight()
        if fetch is None and self._seconds_until_refetch() == 0:
            fetch = self._start_fetch()
        if fetch is not None:
            # Shielded: a waiter that goes away (its client hung up) must not cancel everyone's fetch.
            await asyncio.shield(fetch)
        key = self._keys.get(kid)
        usable = key is not None and time.monotonic() - self._fetched_at <= max(
            self.max_stale_seconds, self.max_age_seconds
        )
        if usable:
            return key  # possibly stale: better than failing while the key set is down, for a while
        if self._last_fetch_failed or key is not None:
            raise KeySetUnavailableError(
                "The signing keys cannot be fetched right now; try again shortly", self.retry_after()
            )
        if fetch is None and kid not in self._published_kids:
            # Maybe a key published after our last read (a rotation): the client should retry, not sign out.
            raise KeySetUnavailableError(
                "The token's signing key is not known yet; try again shortly", self.retry_after()
            )
        return None

    def retry_after(self) -> int:
        """Whole seconds until the key set may be fetched again; at least 1."""
        return max(1, math.ceil(self._seconds_until_refetch()))

    def _seconds_until_refetch(self) -> float:
        return max(0.0, self._attempted_at + self.min_refetch_seconds - time.monotonic())

    def _fetch_in_flight(self) -> "asyncio.Task[None] | None":
        fetch = self._fetch
        # A fetch started on another event loop (tests run one per call) can never be awaited from this one.
        if fetch is None or fetch.done() or fetch.get_loop() is not asyncio.get_running_loop():
            return None
        return fetch

    def _start_fetch(self) -> "asyncio.Task[None]":
        self._attempted_at = time.monotonic()
        self._fetch = asyncio.get_running_loop().create_task(self._refresh(), name="jwks-fetch")
        return self._fetch

    async def _refresh(self) -> None:
        """Read the key set once and keep what it says; a failure keeps the keys read before."""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                document = await self._read()
        except (UnreadableKeySetError, TimeoutError, httpx.HTTPError, OSError) as error:
            reason = str(error) if isinstance(error, UnreadableKeySetError) else type(error).__name__
            logger.warning("cannot read the key set at %s: %s", without_credentials(self.url), reason)
            self._last_fetch_failed = True
            metrics.count_key_set_fetch("failure")
            return
        self._keys = parse_jwks(document)
        self._fetched_at = time.monotonic()
        self._last_fetch_failed = False
        metrics.count_key_set_fetch("success")
        for kid in published_kids(document):
            self._published_kids[kid] = None
            self._published_kids.move_to_end(kid)
        while len(self._published_kids) > self.published_kids_kept:
            self._published_kids.popitem(last=False)

    async def _read(self) -> dict[str, Any]:
        """The key set's JSON document, read as a stream and abandoned once it passes `max_bytes`."""
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        async with (
            httpx.AsyncClient(timeout=self.timeout_seconds, follow_redirects=False, verify=self._tls) as client,
            client.stream("GET", self.url, headers={"Accept": "application/json"}) as response,
        ):
            response.raise_for_status()
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise UnreadableKeySetError(f"it declares {declared} bytes, over {self.max_bytes}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_bytes:
                    raise UnreadableKeySetError(f"it is over {self.max_bytes} bytes")
        try:
            document = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise UnreadableKeySetError("it is not JSON text in UTF-8") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise UnreadableKeySetError("it is not a JWKS document (an object with a list of keys)")
        return document


def without_credentials(url: str) -> str:
    """`url` fit for a log line: any user name and password left out."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """What a verified token proved: its user, until when, and with which published key (if any)."""

    user_id: str
    valid_until: float
    kid: str | None


class TokenVerifier:
    """Turns a bearer token into the id of the user it was issued to, or raises a 401 (503: keys out of reach).

    A token that passed once is remembered until its `exp` (plus the leeway), so a client's next
    requests cost a dictionary lookup instead of a signature check; a JWKS token is remembered only
    while its key is still published.
    """

    def __init__(self, settings: Settings, jwks: JwksCache | None = None) -> None:
        secret = settings.better_auth_secret
        self.shared_secret = secret.get_secret_value() if secret else None
        self.jwks = jwks or JwksCache(settings.jwks_endpoint)
        self.jwks_issuer = _with_and_without_slash(settings.expected_issuer)
        self.jwks_audience = _with_and_without_slash(settings.expected_audience)
        self.hs256_issuer = settings.jwt_issuer
        self.hs256_audience = settings.jwt_audience
        self._verified: dict[str, VerifiedToken] = {}  # used from the event loop only

    async def user_id(self, token: str) -> str:
        """The verified token's user (`sub`, else `user_id`)."""
        known = self._verified.get(token)
        if known is not None:
            if time.time() <= known.valid_until and (known.kid is None or self.jwks.cached(known.kid)):
                return known.user_id
            del self._verified[token]
        if len(token) > MAX_TOKEN_LENGTH:
            raise unauthorized("Invalid authentication token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthorized("Invalid authentication token") from None
        algorithm = _checked_header(header)
        kid = None
        if algorithm == "HS256" and self.shared_secret:
            claims = _decode(
                token,
                self.shared_secret,
                algorithm,
                issuer=self.hs256_issuer,
                audience=self.hs256_audience,
            )
        elif algorithm in JWKS_ALGORITHMS:
            kid = header.get("kid")
            signing_key = await self._signing_key(kid, algorithm)
            claims = _decode(token, signing_key.key, algorithm, issuer=self.jwks_issuer, audience=self.jwks_audience)
        else:
            raise unauthorized("Unsupported token algorithm")
        user_id = _subject(claims)
        self._remember(token, VerifiedToken(user_id, claims["exp"] + CLOCK_LEEWAY_SECONDS, kid))
        return user_id

    def _remember(self, token: str, verified: VerifiedToken) -> None:
        if len(self._verified) >= VERIFIED_TOKENS_KEPT:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[token] = verified

    async def _signing_key(self, kid: Any, algorithm: str) -> SigningKey:
        if not isinstance(kid, str) or not kid:
            raise unauthorized("Token has no key id (kid)")
        signing_key = self.jwks.cached(kid)
        if signing_key is None:
            try:
                signing_key = await self.jwks.get(kid)
            except KeySetUnavailableError as unavailable:
                raise ApiError(
                    503,
                    unavailable.detail,
                    "signing_keys_unavailable",
                    headers={"Retry-After": str(unavailable.retry_after)},
                ) from None
        if signing_key is None or algorithm not in signing_key.algorithms:
            raise unauthorized("Token is signed with an unknown key")
        return signing_key


def _checked_header(header: dict[str, Any]) -> str:
    """The header's `alg`, once every header member we read is of the right kind; else a 401."""
    algorithm = header.get("alg")
    if not isinstance(algorithm, str):
        raise unauthorized("Unsupported token algorithm")
    for member in ("kid", "typ", "cty"):
        if member in header and not isinstance(header[member], str):
            raise unauthorized(f"Token header's '{member}' must be text")
    if "typ" in header and header["typ"].lower() not in JWT_TYPES:
        raise unauthorized("Token is not a JWT (typ)")
    if "cty" in header and header["cty"].lower() in JWT_TYPES:
        raise unauthorized("Nested tokens are not accepted (cty)")
    return algorithm


def _with_and_without_slash(url: str) -> list[str]:
    return [url.rstrip("/"), url.rstrip("/") + "/"] if url.startswith("http") else [url]


def _decode(
    token: str,
    key: Any,
    algorithm: str,
    *,
    issuer: str | list[str] | None,
    audience: str | list[str] | None,
) -> dict[str, Any]:
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            issuer=issuer,
            audience=audience,
            leeway=CLOCK_LEEWAY_SECONDS,
            options={"require": ["exp"], "verify_aud": audience is not None},
        )
    except jwt.ExpiredSignatureError:
        raise unauthorized("Token has expired", "token_expired") from None
    except jwt.ImmatureSignatureError:
        raise unauthorized("Token is not valid yet", "token_not_yet_valid") from None
    except jwt.MissingRequiredClaimError as error:
        raise unauthorized(f"Token has no '{error.claim}' claim") from None
    except jwt.InvalidIssuerError:
        raise unauthorized("Token has the wrong issuer") from None
    except jwt.InvalidAudienceError:
        raise unauthorized("Token has the wrong audience") from None
    except jwt.PyJWTError:
        raise unauthorized("Invalid authentication token") from None
    # PyJWT takes any value int() takes (the text "1999999999", true); the standard says a JSON number.
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise unauthorized(f"Token's '{name}' claim must be a number")
    return claims


def _subject(claims: dict[str, Any]) -> str:
    subject = claims.get("sub") if "sub" in claims else claims.get("user_id")
    if not isinstance(subject, str) or not subject:
        raise unauthorized("Token has no user (sub)")
    if "/" in subject:  # it would name another path than the user's own under /api/{user_id}/...
        raise unauthorized("Token's user (sub) must not contain '/'")
    try:
        return storable_text(subject)
    except ValueError:
        raise unauthorized("Token has no valid user (sub)") from None


async def token_user_id(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The user the request's bearer token was issued to; 401 when there is no valid token."""
    if credentials is None:
        raise unauthorized("Not authenticated", "not_authenticated")
    verifier: TokenVerifier = request.app.state.token_verifier
    return await verifier.user_id(credentials.credentials)


async def get_current_user_id(
    request: Request,
    user_id: Annotated[str, Path(description="The user whose tasks these are: must be the token's user")],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> str:
    """The path's user, once the token proves the caller is that user (401, then 403)."""
    verified_user_id = await token_user_id(request, credentials)
    request.state.user_id = verified_user_id  # the access log's `user_id`: a 403 too says who tried
    if user_id != verified_user_id:
        raise ApiError(403, "You can only access your own tasks", "forbidden")
    return user_id


CurrentUserId = Annotated[str, Depends(get_current_user_id)]


def mint_token(user_id: str, secret: str, minutes: int = 60) -> str:
    """An HS256 token for `user_id`, valid for `minutes`, as the shared-secret route accepts."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + minutes * 60}, secret, algorithm="HS256")


if __name__ == "__main__":
    import argparse

    from settings import load_settings

    parser = argparse.ArgumentParser(description="Print an HS256 token for trying the API with curl.")
    parser.add_argument("user_id", help="the user the token is for (its `sub`)")
    parser.add_argument("--minutes", type=int, default=60, help="how long the token is valid (default 60)")
    arguments = parser.parse_args()
    configured = load_settings().better_auth_secret
    if configured is None:
        raise SystemExit("BETTER_AUTH_SECRET is not set: put it in .env (at least 32 characters) first")
    print(mint_token(arguments.user_id, configured.get_secret_value(), arguments.minutes))
