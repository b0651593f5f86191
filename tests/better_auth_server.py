"""Run a real Better Auth server (tests/better_auth/server.mjs) for interop tests."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.npm import ensure_node_modules

APP_DIR = Path(__file__).resolve().parent / "better_auth"
READY_TIMEOUT = 60.0
HTTP_TIMEOUT = 30.0


def node_available() -> bool:
    """True when both `node` and `npm` are on PATH."""
    return shutil.which("node") is not None and shutil.which("npm") is not None


@dataclass
class BetterAuthServer:
    """A running Better Auth instance: `url` is where it listens, `base_url` its issuer."""

    alg: str
    url: str
    base_url: str
    output: list[str] = field(default_factory=list)

    def sign_up_and_get_token(self, email: str, password: str, name: str) -> tuple[str, str]:
        """Sign up by email, then trade the session cookie for a JWT: (user_id, jwt)."""
        headers = {"Origin": self.base_url}
        with httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT, headers=headers) as client:
            resp = client.post(
                "/api/auth/sign-up/email",
                json={"email": email, "password": password, "name": name},
            )
            if resp.status_code != 200:
                raise RuntimeError(f"sign-up failed: {resp.status_code} {resp.text}")
            user_id = resp.json()["user"]["id"]
            if not client.cookies:
                raise RuntimeError(f"sign-up set no session cookie: {resp.headers}")
            resp = client.get("/api/auth/token")  # the session cookie authenticates this
            if resp.status_code != 200:
                raise RuntimeError(f"/api/auth/token failed: {resp.status_code} {resp.text}")
            return user_id, resp.json()["token"]

    def jwks(self) -> dict:
        """The server's public key set."""
        resp = httpx.get(f"{self.url}/api/auth/jwks", timeout=HTTP_TIMEOUT)
        resp.raise_for_status()
        return resp.json()


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def run_better_auth(alg: str = "EdDSA", base_url: str | None = None) -> Iterator[BetterAuthServer]:
    """Start `node server.mjs` on a free port; `base_url` overrides its issuer/audience URL."""
    ensure_node_modules(APP_DIR)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PORT": str(port),
        "BASE_URL": base_url or url,
        "SECRET": secrets.token_urlsafe(48),
        "JWT_ALG": alg,
        "BETTER_AUTH_TELEMETRY": "0",
    }
    proc = subprocess.Popen(
        ["node", "server.mjs"],
        cwd=APP_DIR,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = BetterAuthServer(alg=alg, url=url, base_url=base_url or url)
    ready = threading.Event()

    def drain() -> None:  # keep reading so the pipe never fills up
        assert proc.stdout is not None
        for line in proc.stdout:
            server.output.append(line.rstrip("\n"))
            if line.strip() == f"READY {port}":
                ready.set()
        ready.set()  # EOF: the process exited

    threading.Thread(target=drain, daemon=True).start()
    try:
        if not ready.wait(READY_TIMEOUT) or proc.poll() is not None:
            raise RuntimeError(
                f"Better Auth ({alg}) not ready within {READY_TIMEOUT:.0f} s "
                f"(exit code {proc.poll()}):\n" + "\n".join(server.output[-40:])
            )
        yield server
    finally:
        _stop(proc)
