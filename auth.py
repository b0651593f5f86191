"""Bearer-token verification and the `get_current_user_id` dependency.

Two kinds of token are accepted, chosen by the header's `alg`: HS256 signed with
`BETTER_AUTH_SECRET` (when set), and Better Auth's JWT-plugin tokens (EdDSA, ES256, ES512,
RS256, PS256) verified with the public keys Better Auth publishes at its JWKS endpoint.
"""

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import jwt
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

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
CLOCK_LEEWAY_SECONDS = 30
MAX_TOKEN_LENGTH = 16_384
JWKS_FETCH_TIMEOUT_SECONDS = 5.0
# Fetches caused by an unknown `kid` happen at most this often, so bogus tokens cannot flood Better Auth.
JWKS_MIN_REFETCH_SECONDS = 10.0
# Cached keys are re-read after this long, so a key Better Auth removed stops working.
JWKS_MAX_AGE_SECONDS = 300.0
# Tokens already verified, remembered until they expire: a client sends the same token many times.
VERIFIED_TOKENS_KEPT = 4096

bearer_scheme = HTTPBearer(
    auto_error=False, description="A JWT from Better Auth, or HS256 signed with BETTER_AUTH_SECRET"
)


def unauthorized(detail: str, code: str = "invalid_token") -> ApiError:
    """A 401 that tells the client to authenticate with a bearer token."""
    return ApiError(401, detail, code, headers={"WWW-Authenticate": "Bearer"})


class KeySetUnavailableError(Exception):
    """The JWKS endpoint could not be read and no cached key fits the token."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A published public key and the token algorithms it may verify."""

    key: Any
    algorithms: frozenset[str]


def parse_jwks(document: Any) -> dict[str, SigningKey]:
    """The usable signing keys of a JWKS document, by `kid`; keys of unknown types are skipped."""
    keys: dict[str, SigningKey] = {}
    for jwk in document.get("keys", []) if isinstance(document, dict) else []:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or jwk.get("use", "sig") != "sig":
            continue
        curve = None if jwk.get("kty") == "RSA" else jwk.get("crv")
        algorithms = ALGORITHMS_BY_KEY_TYPE.get((jwk.get("kty"), curve), frozenset())
        if "alg" in jwk:
            algorithms &= {jwk["alg"]}
        if not algorithms:
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=next(iter(algorithms))).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            logger.warning("skipping an unreadable key in the JWKS (kid %s)", jwk["kid"][:64])
            continue
        keys[jwk["kid"]] = SigningKey(key=key, algorithms=algorithms)
    return keys


class JwksCache:
    """Better Auth's public keys, fetched on first need and cached for the process (thread-safe)."""

    def __init__(
        self,
        url: str,
        *,
        min_refetch_seconds: float = JWKS_MIN_REFETCH_SECONDS,
        max_age_seconds: float = JWKS_MAX_AGE_SECONDS,
        timeout_seconds: float = JWKS_FETCH_TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.min_refetch_seconds = min_refetch_seconds
        self.max_age_seconds = max_age_seconds
        self.timeout_seconds = timeout_seconds
        self._keys: dict[str, SigningKey] = {}
        self._fetched_at = float("-inf")  # when the keys above were read
        self._attempted_at = float("-inf")  # when a fetch was last tried, successful or not
        self._last_fetch_failed = False
        self._lock = threading.Lock()

    def cached(self, kid: str) -> SigningKey | None:
        """The key named `kid` if it is cached and fresh; never blocks."""
        if time.monotonic() - self._fetched_at > self.max_age_seconds:
            return None
        return self._keys.get(kid)

    def get(self, kid: str) -> SigningKey | None:
        """The key named `kid`, fetching the key set when needed (blocking); None if it has no such key.

        Raises KeySetUnavailableError when the key set cannot be read and no cached key fits.
        """
        with self._lock:
            now = time.monotonic()
            fresh = now - self._fetched_at <= self.max_age_seconds
            if fresh and kid in self._keys:
                return self._keys[kid]
            if now - self._attempted_at >= self.min_refetch_seconds:
                self._attempted_at = now
                try:
                    self._keys = self._fetch()
                    self._fetched_at = now
                    self._last_fetch_failed = False
                except KeySetUnavailableError:
                    self._last_fetch_failed = True
            if kid in self._keys:
                return self._keys[kid]  # possibly stale: better than failing while the key set is down
            if self._last_fetch_failed:
                raise KeySetUnavailableError(self.url)
            return None

    def _fetch(self) -> dict[str, SigningKey]:
        try:
            response = httpx.get(self.url, timeout=self.timeout_seconds, follow_redirects=False)
            response.raise_for_status()
            return parse_jwks(response.json())
        except (httpx.HTTPError, json.JSONDecodeError) as error:
            logger.warning("cannot read the key set at %s: %s", self.url, type(error).__name__)
            raise KeySetUnavailableError(self.url) from error


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """What a verified token proved: its user, until when, and with which published key (if any)."""

    user_id: str
    valid_until: float
    kid: str | None


class TokenVerifier:
    """Turns a bearer token into the id of the user it was issued to, or raises a 401.

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
        algorithm = header.get("alg")
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
                signing_key = await run_in_threadpool(self.jwks.get, kid)
            except KeySetUnavailableError:
                raise ApiError(
                    503,
                    "The signing keys cannot be fetched right now; try again shortly",
                    "signing_keys_unavailable",
                ) from None
        if signing_key is None or algorithm not in signing_key.algorithms:
            raise unauthorized("Token is signed with an unknown key")
        return signing_key


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
        return jwt.decode(
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


def _subject(claims: dict[str, Any]) -> str:
    subject = claims.get("sub") if "sub" in claims else claims.get("user_id")
    if not isinstance(subject, str) or not subject:
        raise unauthorized("Token has no user (sub)")
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
    if user_id != await token_user_id(request, credentials):
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
