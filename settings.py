"""Service configuration, read once from the environment and a `.env` file."""

import ipaddress
from functools import cached_property
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from fastapi import Depends, Request
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

VERSION = "1.0.0"
DEFAULT_FRONTEND = "http://localhost:3000"
MIN_SECRET_LENGTH = 32
# Better Auth serves its routes under this path of its base URL.
BETTER_AUTH_API_PATH = "/api/auth"
DEFAULT_PORTS = {"http": 80, "https": 443}

# Neon names a compute's pooled host by adding this to the first label of its direct host.
NEON_POOLER_SUFFIX = "-pooler"
# Every spelling of PostgreSQL that Neon, Heroku or an older project may paste, mapped to psycopg 3.
POSTGRES_DRIVER_ALIASES = {"postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"}

# Names shown in start-up errors: the variable a user sets, not the Python field.
ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "better_auth_secret": "BETTER_AUTH_SECRET",
    "better_auth_url": "BETTER_AUTH_URL",
    "jwks_url": "JWKS_URL",
    "jwt_issuer": "JWT_ISSUER",
    "jwt_audience": "JWT_AUDIENCE",
    "cors_origins": "CORS_ORIGINS",
    "frontend_url": "FRONTEND_URL",
    "log_level": "LOG_LEVEL",
    "log_format": "LOG_FORMAT",
    "migrate_on_startup": "MIGRATE_ON_STARTUP",
    "database_migration_url": "DATABASE_MIGRATION_URL",
    "metrics_enabled": "METRICS_ENABLED",
    "max_tasks_per_user": "MAX_TASKS_PER_USER",
    "trash_retention_days": "TRASH_RETENTION_DAYS",
    "idempotency_ttl_seconds": "IDEMPOTENCY_TTL_SECONDS",
    "housekeeping_interval_seconds": "HOUSEKEEPING_INTERVAL_SECONDS",
}


class ConfigurationError(SystemExit):
    """A bad setting: exits start-up with one line naming the variable."""


def normalize_database_url(raw: str) -> URL:
    """Parse a database URL, mapping every PostgreSQL spelling onto the psycopg 3 driver."""
    try:
        url = make_url(raw.strip())
    except (ArgumentError, ValueError) as error:
        raise ValueError("not a valid database URL (expected e.g. postgresql://user:pass@host/db)") from error
    if url.drivername in POSTGRES_DRIVER_ALIASES:
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in {"postgresql", "sqlite"}:
        raise ValueError("only PostgreSQL and SQLite URLs are supported")
    return url


def _http_url(value: str) -> str:
    """An absolute http(s) URL without a trailing slash."""
    value = value.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    try:
        parts.port  # noqa: B018 -- parsing the port is the check
    except ValueError:
        raise ValueError("has a port that is not a number from 0 to 65535") from None
    return value


def url_origin(url: str) -> str:
    """The origin of an absolute http(s) URL, as `new URL(url).origin` gives it (lower case, no default port)."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    host = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets
    port = parts.port
    return f"{scheme}://{host}" if port in {None, DEFAULT_PORTS.get(scheme)} else f"{scheme}://{host}:{port}"


def is_loopback_host(host: str | None) -> bool:
    """Whether `host` (as `urlsplit(...).hostname` gives it) is this machine: `localhost`, 127.0.0.0/8 or ::1."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_set_url_problem(url: str) -> str | None:
    """Why keys must not be fetched from `url` (plain http to another machine), or None when it is fine."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "https" or is_loopback_host(parts.hostname):
        return None
    # The host, never the whole URL: a URL may carry a password.
    return (
        f"the key set would be fetched over plain http from {parts.hostname}; use https "
        "(plain http is allowed only from this machine: localhost, 127.0.0.0/8, [::1])"
    )


def _origin(value: str) -> str:
    """A browser origin (scheme://host[:port]) or the wildcard."""
    value = value.strip().rstrip("/")
    if value == "*":
        return value
    parts = urlsplit(_http_url(value))
    if parts.path or parts.query or parts.fragment:
        raise ValueError(f"{value!r} is not an origin (scheme://host[:port], no path)")
    return value


class Settings(BaseSettings):
    """Everything the service reads from its environment; see `.env.example`."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: str = Field(
        default="sqlite:///./todo.db",
        repr=False,  # it may hold a password
        validation_alias=AliasChoices("DATABASE_URL", "NEON_DATABASE_URL"),
    )
    better_auth_secret: SecretStr | None = None
    better_auth_url: str = DEFAULT_FRONTEND
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    cors_origins: Annotated[list[str], NoDecode] = []
    frontend_url: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    migrate_on_startup: bool = True
    database_migration_url: str | None = Field(default=None, repr=False)  # it may hold a password
    metrics_enabled: bool = False
    max_tasks_per_user: int = Field(default=10_000, ge=0)  # 0: no quota
    trash_retention_days: int = Field(default=30, ge=1)
    idempotency_ttl_seconds: int = Field(default=86_400, ge=1)
    housekeeping_interval_seconds: int = Field(default=600, ge=1)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        normalize_database_url(value)
        return value.strip()

    @field_validator("better_auth_secret", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("better_auth_secret")
    @classmethod
    def _check_secret_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters long")
        return value

    @field_validator("better_auth_url", "jwks_url")
    @classmethod
    def _check_http_url(cls, value: str | None) -> str | None:
        return _http_url(value) if value else None

    @field_validator("frontend_url")
    @classmethod
    def _check_frontend_origin(cls, value: str | None) -> str | None:
        return _origin(value) if value else None  # a browser sends an origin: a path could never match

    @field_validator("better_auth_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or a fragment (it is a base URL)")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _check_key_set_url(cls, value: str | None) -> str | None:
        problem = key_set_url_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _check_derived_key_set_url(self) -> Self:
        # Only a key-set URL derived from BETTER_AUTH_URL is checked here: JWKS_URL, when set, is checked
        # on its own, and then BETTER_AUTH_URL only names the issuer, so it may be any URL.
        problem = None if self.jwks_url else key_set_url_problem(self.jwks_endpoint)
        if problem:
            raise ValueError(f"{ENV_NAMES['better_auth_url']}: {problem}")
        return self

    @field_validator("jwt_issuer", "jwt_audience", mode="before")
    @classmethod
    def _empty_claim_is_unset(cls, value: object) -> object:
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [_origin(item) for item in value.split(",") if item.strip()]
        return value

    @field_validator("database_migration_url", mode="before")
    @classmethod
    def _check_migration_url(cls, value: object) -> object:
        if isinstance(value, str) and value.strip():
            normalize_database_url(value)
            return value.strip()
        return None if value == "" else value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase_level(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @cached_property
    def database(self) -> URL:
        """The database URL, with PostgreSQL mapped onto psycopg 3."""
        return normalize_database_url(self.database_url)

    @cached_property
    def jwks_endpoint(self) -> str:
        """Where Better Auth publishes its public keys: under its API path, which BETTER_AUTH_URL may already name."""
        if self.jwks_url:
            return self.jwks_url
        if urlsplit(self.better_auth_url).path.endswith(BETTER_AUTH_API_PATH):
            return f"{self.better_auth_url}/jwks"
        return f"{self.better_auth_url}{BETTER_AUTH_API_PATH}/jwks"

    @cached_property
    def better_auth_origin(self) -> str:
        """The origin of BETTER_AUTH_URL: Better Auth signs its tokens' `iss` and `aud` with it, never with a path."""
        return url_origin(self.better_auth_url)

    @cached_property
    def expected_issuer(self) -> str:
        """The `iss` a JWKS-signed token must carry."""
        return self.jwt_issuer or self.better_auth_origin

    @cached_property
    def expected_audience(self) -> str:
        """The `aud` a JWKS-signed token must carry."""
        return self.jwt_audience or self.better_auth_origin

    @cached_property
    def migration_database(self) -> URL:
        """Where migrations run: DATABASE_MIGRATION_URL, else a Neon `-pooler` URL's direct host, else DATABASE_URL.

        Migrations take a lock that a pooler in transaction mode cannot be trusted to keep for them.
        """
        if self.database_migration_url:
            return normalize_database_url(self.database_migration_url)
        host = self.database.host or ""
        first_label, dot, rest = host.partition(".")
        if first_label.endswith(NEON_POOLER_SUFFIX) and dot:
            return self.database.set(host=first_label.removesuffix(NEON_POOLER_SUFFIX) + dot + rest)
        return self.database

    @cached_property
    def allowed_origins(self) -> list[str]:
        """Browser origins allowed by CORS, in order and without repeats."""
        origins = [*self.cors_origins, *([self.frontend_url] if self.frontend_url else [])]
        return list(dict.fromkeys(origins)) or [DEFAULT_FRONTEND]


def app_settings(request: Request) -> Settings:
    """The running app's settings."""
    return request.app.state.settings


AppSettings = Annotated[Settings, Depends(app_settings)]


def load_settings() -> Settings:
    """Read the settings, or stop start-up with one line naming the bad variable."""
    try:
        return Settings()
    except ValidationError as error:
        first = error.errors(include_input=False, include_url=False)[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["loc"]:
            field = str(first["loc"][0])
            message = f"{ENV_NAMES.get(field, field.upper())}: {message}"
        # else: a check of several settings together, whose message starts with the variable it blames
        raise ConfigurationError(f"Invalid configuration: {message}") from None
