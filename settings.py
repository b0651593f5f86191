"""Service configuration, read once from the environment and a `.env` file."""

from functools import cached_property
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

VERSION = "1.0.0"
DEFAULT_FRONTEND = "http://localhost:3000"
MIN_SECRET_LENGTH = 32

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
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("must be an absolute http:// or https:// URL")
    return value


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

    @field_validator("better_auth_url", "jwks_url", "frontend_url")
    @classmethod
    def _check_http_url(cls, value: str | None) -> str | None:
        return _http_url(value) if value else None

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

    @field_validator("log_level", mode="before")
    @classmethod
    def _lowercase_level(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @cached_property
    def database(self) -> URL:
        """The database URL, with PostgreSQL mapped onto psycopg 3."""
        return normalize_database_url(self.database_url)

    @cached_property
    def jwks_endpoint(self) -> str:
        """Where Better Auth publishes its public keys."""
        return self.jwks_url or f"{self.better_auth_url}/api/auth/jwks"

    @cached_property
    def expected_issuer(self) -> str:
        """The `iss` a JWKS-signed token must carry."""
        return self.jwt_issuer or self.better_auth_url

    @cached_property
    def expected_audience(self) -> str:
        """The `aud` a JWKS-signed token must carry."""
        return self.jwt_audience or self.better_auth_url

    @cached_property
    def allowed_origins(self) -> list[str]:
        """Browser origins allowed by CORS, in order and without repeats."""
        origins = [*self.cors_origins, *([self.frontend_url] if self.frontend_url else [])]
        return list(dict.fromkeys(origins)) or [DEFAULT_FRONTEND]


def load_settings() -> Settings:
    """Read the settings, or stop start-up with one line naming the bad variable."""
    try:
        return Settings()
    except ValidationError as error:
        first = error.errors(include_input=False, include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        name = ENV_NAMES.get(field, field.upper())
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigurationError(f"Invalid configuration: {name}: {message}") from None
