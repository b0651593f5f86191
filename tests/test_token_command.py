"""The documented command that prints a token for trying the API with curl."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import jwt

from tests.conftest import SECRET

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_token_command(
    *arguments: str, secret: str | None = SECRET, cwd: Path = PROJECT_ROOT
) -> subprocess.CompletedProcess:
    """`python auth.py USER_ID`, as the README shows it."""
    environment = {key: value for key, value in os.environ.items() if key != "BETTER_AUTH_SECRET"}
    if secret is not None:
        environment["BETTER_AUTH_SECRET"] = secret
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "auth.py"), *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prints_a_token_the_service_accepts(client: httpx.Client, user_id: str, tmp_path: Path) -> None:
    result = run_token_command(user_id, "--minutes", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == user_id and claims["exp"] - claims["iat"] == 300
    response = client.get(f"/api/{user_id}/tasks", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


def test_without_a_secret_it_says_what_to_set(tmp_path: Path) -> None:
    result = run_token_command("alice", secret=None, cwd=tmp_path)
    assert result.returncode != 0
    assert "BETTER_AUTH_SECRET" in result.stderr and "Traceback" not in result.stderr


def test_its_tokens_are_refused_when_signed_with_another_secret(
    client: httpx.Client, user_id: str, tmp_path: Path, token_for: Callable
) -> None:
    result = run_token_command(user_id, secret="x" * 40, cwd=tmp_path)
    response = client.get(f"/api/{user_id}/tasks", headers={"Authorization": f"Bearer {result.stdout.strip()}"})
    assert response.status_code == 401
