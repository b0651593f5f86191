"""Configuration: zero-setup defaults, Neon URLs as pasted, and bad values stopping start-up in one line."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from settings import Settings, normalize_database_url
from tests.conftest import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NEON_QUERY = "sslmode=require&channel_binding=require"


def settings_from(**environment: str) -> Settings:
    """Settings read from exactly these environment variables (no `.env`)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environment)
    try:
        return Settings(_env_file=None)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_defaults_need_no_configuration() -> None:
    settings = settings_from()
    assert settings.database.render_as_string() == "sqlite:///./todo.db"
    assert settings.better_auth_secret is None
    assert settings.jwks_endpoint == "http://localhost:3000/api/auth/jwks"
    assert settings.expected_issuer == settings.expected_audience == "http://localhost:3000"
    assert settings.allowed_origins == ["http://localhost:3000"]
    assert settings.log_level == "info"


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"])
def test_neon_urls_work_as_pasted(scheme: str) -> None:
    url = normalize_database_url(
        f"{scheme}://alex:pw@ep-cool-1234-pooler.eu-central-1.aws.neon.tech/neondb?{NEON_QUERY}"
    )
    assert url.drivername == "postgresql+psycopg"
    assert url.query == {"sslmode": "require", "channel_binding": "require"}
    assert (url.username, url.password, url.database) == ("alex", "pw", "neondb")


def test_neon_database_url_is_an_alias() -> None:
    settings = settings_from(NEON_DATABASE_URL="postgres://u:p@host/db")
    assert settings.database.drivername == "postgresql+psycopg"


def test_better_auth_url_drives_the_jwks_url_issuer_and_audience() -> None:
    settings = settings_from(BETTER_AUTH_URL="https://app.example.com/")
    assert settings.jwks_endpoint == "https://app.example.com/api/auth/jwks"
    assert settings.expected_issuer == settings.expected_audience == "https://app.example.com"


def test_jwks_url_issuer_and_audience_can_be_overridden() -> None:
    settings = settings_from(JWKS_URL="https://keys.example/jwks", JWT_ISSUER="iss-x", JWT_AUDIENCE="aud-y")
    assert (settings.jwks_endpoint, settings.expected_issuer, settings.expected_audience) == (
        "https://keys.example/jwks",
        "iss-x",
        "aud-y",
    )


def test_cors_origins_are_comma_separated_and_joined_with_frontend_url() -> None:
    settings = settings_from(CORS_ORIGINS="https://a.example, https://b.example/", FRONTEND_URL="https://c.example")
    assert settings.allowed_origins == ["https://a.example", "https://b.example", "https://c.example"]


def test_frontend_url_must_be_an_origin() -> None:
    assert settings_from(FRONTEND_URL="https://app.example.com/").allowed_origins == ["https://app.example.com"]
    with pytest.raises(ValidationError, match="not an origin"):
        settings_from(FRONTEND_URL="https://app.example.com/dashboard")


def test_log_level_is_case_insensitive() -> None:
    assert settings_from(LOG_LEVEL="WARNING").log_level == "warning"


def test_settings_repr_hides_secret_and_database_password() -> None:
    settings = settings_from(DATABASE_URL="postgresql://u:hunter2hunter2@h/db", BETTER_AUTH_SECRET="s" * 40)
    assert "hunter2hunter2" not in repr(settings) and "s" * 40 not in repr(settings)


def start_service(environment: dict[str, str], cwd: Path, port: int) -> subprocess.Popen[str]:
    """`uvicorn main:app` as a user starts it, in `cwd`, with only `environment` configured."""
    clean = {key: value for key, value in os.environ.items() if key in {"PATH", "HOME", "LANG", "SYSTEMROOT"}}
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(PROJECT_ROOT), "main:app", "--port", str(port)],
        cwd=cwd,
        env=clean | environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BETTER_AUTH_SECRET", "too-short-secret"),
        ("DATABASE_URL", "mysql://root:hunter2hunter2@db/todo"),
        ("DATABASE_URL", "not a url"),
        ("LOG_LEVEL", "loud"),
        ("BETTER_AUTH_URL", "localhost:3000"),
        ("CORS_ORIGINS", "https://a.example/path"),
    ],
)
def test_bad_value_stops_start_up_with_one_line_naming_the_variable(variable: str, value: str, tmp_path: Path) -> None:
    process = start_service({variable: value}, tmp_path, free_port())
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(f"Invalid configuration: {variable}: "), lines
    assert "Traceback" not in stderr
    assert "hunter2hunter2" not in stderr and "too-short-secret" not in stderr


def test_first_command_starts_with_no_configuration(tmp_path: Path) -> None:
    port = free_port()
    process = start_service({}, tmp_path, port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
                time.sleep(0.2)
        assert health.json() == {"status": "healthy", "database": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/docs").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()["info"]["title"] == "Todo API"
        assert (tmp_path / "todo.db").exists()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_database_password_never_reaches_the_log(tmp_path: Path) -> None:
    port = free_port()
    password = "hunter2-database-password"
    url = f"postgresql://todo:{password}@127.0.0.1:{free_port()}/todo"  # nothing listens: errors get logged
    process = start_service({"DATABASE_URL": url, "LOG_LEVEL": "debug"}, tmp_path, port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 503
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        process.terminate()
        stdout, stderr = process.communicate(timeout=30)
    assert "starting: database postgresql+psycopg://todo:***@" in stderr
    assert password not in stdout + stderr


NEON_POOLED = "postgresql://alex:pw@ep-cool-darkness-123456-pooler.eu-central-1.aws.neon.tech/neondb?sslmode=require"


def test_migrations_use_the_direct_host_of_a_neon_pooled_url() -> None:
    migration = settings_from(DATABASE_URL=NEON_POOLED).migration_database
    assert migration.host == "ep-cool-darkness-123456.eu-central-1.aws.neon.tech"
    assert migration.render_as_string(hide_password=False).endswith("/neondb?sslmode=require")
    assert migration.password == "pw"


def test_database_migration_url_wins_over_the_derived_direct_host() -> None:
    settings = settings_from(DATABASE_URL=NEON_POOLED, DATABASE_MIGRATION_URL="postgres://admin:x@db.example.com/neondb")
    assert settings.migration_database.host == "db.example.com"
    assert settings.migration_database.drivername == "postgresql+psycopg"


def test_migrations_run_on_database_url_when_it_is_not_a_pooled_neon_url() -> None:
    assert settings_from(DATABASE_URL="postgresql://u@db.example.com/todo").migration_database.host == "db.example.com"
    assert settings_from().migration_database.render_as_string() == "sqlite:///./todo.db"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LOG_FORMAT", "xml"), ("MIGRATE_ON_STARTUP", "maybe"), ("METRICS_ENABLED", "2"), ("DATABASE_MIGRATION_URL", "x")],
)
def test_a_bad_operations_setting_stops_start_up_naming_it(variable: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import main"],
        cwd=PROJECT_ROOT,
        env={"PATH": os.environ["PATH"], variable: value, "DATABASE_URL": "sqlite:///:memory:"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"Invalid configuration: {variable}:"), result.stderr
