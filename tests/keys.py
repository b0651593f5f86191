"""Real signing keys and a real JWKS endpoint for tests: tokens signed as Better Auth signs them."""

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

JWKS_ALGORITHMS = ("EdDSA", "ES256", "ES512", "RS256", "PS256")


def generate_private_key(algorithm: str) -> Any:
    """A fresh private key of the kind `algorithm` signs with."""
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ES512":
        return ec.generate_private_key(ec.SECP521R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class SigningKeyPair:
    """A private key, its `kid`, and the public JWK a JWKS endpoint publishes for it."""

    algorithm: str
    kid: str
    private_key: Any
    publish_alg: bool = True

    @property
    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK, as Better Auth's /api/auth/jwks lists it."""
        jwk = jwt.get_algorithm_by_name(self.algorithm).to_jwk(self.private_key.public_key(), as_dict=True)
        jwk["kid"] = self.kid
        if self.publish_alg:
            jwk["alg"] = self.algorithm
        return jwk

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        """A token with `claims`, its header `{alg, kid}` as Better Auth writes it."""
        return jwt.encode(
            claims, self.private_key, algorithm=self.algorithm, headers={"kid": self.kid, **(headers or {})}
        )


def new_key_pair(algorithm: str, publish_alg: bool = True) -> SigningKeyPair:
    """A new key pair with a random `kid`."""
    return SigningKeyPair(algorithm, uuid.uuid4().hex, generate_private_key(algorithm), publish_alg)


def better_auth_claims(
    user_id: str, issuer: str, audience: str | None = None, lifetime: int = 900, **extra: Any
) -> dict[str, Any]:
    """Claims shaped like a Better Auth JWT-plugin token."""
    now = int(time.time())
    return {"sub": user_id, "iss": issuer, "aud": audience or issuer, "iat": now, "exp": now + lifetime, **extra}


class JwksServer:
    """A real HTTP server publishing a JWKS document that tests can change, take down and bring back."""

    def __init__(self) -> None:
        self.keys: list[SigningKeyPair] = []
        self.requests = 0
        self.status = 200
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """The base URL, standing in for Better Auth's (`BETTER_AUTH_URL`)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        """Where the keys are published, as Better Auth publishes them."""
        return f"{self.base_url}/api/auth/jwks"

    def add(self, key: SigningKeyPair) -> SigningKeyPair:
        """Publish `key`."""
        self.keys.append(key)
        return key

    def remove(self, key: SigningKeyPair) -> None:
        """Stop publishing `key`."""
        self.keys.remove(key)

    def start(self) -> None:
        """Listen (again, on the same port once it has one)."""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                body = json.dumps({"keys": [key.public_jwk for key in owner.keys]}).encode()
                ok = self.path == "/api/auth/jwks" and owner.status == 200
                self.send_response(200 if ok else owner.status if self.path == "/api/auth/jwks" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop listening: connections are refused until `start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
