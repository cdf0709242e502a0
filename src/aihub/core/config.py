"""Settings: one object read from the environment and `.env`, validated at start-up.

Variable names are the original apps' own where they had one (`OPENAI_API_KEY`, `CLERK_JWKS_URL`,
`DATABASE_URL`, ...), so an original `.env` works unchanged.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit

from fastapi import Depends, Request
from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    from aihub.storage.gcs import ServiceAccount

CommaList = Annotated[list[str], NoDecode]


def _unlimited_is_none(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() in ("", "unlimited", "none"):
        return None
    return value


QuotaSetting = Annotated[Annotated[int, Field(ge=0)] | None, BeforeValidator(_unlimited_is_none)]

MAX_SIGNED_URL_SECONDS = 7 * 24 * 3600
"""The longest GCS and S3 let a signed link live."""

DEFAULT_CORS_ORIGINS = ["http://localhost:3000", "http://localhost:5173", "http://localhost:5174"]
PROVIDER_NAMES = ("openai", "gemini", "replicate", "offline")


class ConfigError(Exception):
    """Configuration that cannot work; the message is one line per problem."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, validate_by_name=True
    )

    # Server
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(
        default=1, ge=1, le=64, validation_alias=AliasChoices("WORKERS", "WEB_CONCURRENCY")
    )
    data_dir: Path = Path("data")
    public_base_url: str | None = None
    cors_origins: CommaList = Field(default_factory=lambda: list(DEFAULT_CORS_ORIGINS))
    max_request_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_request_header_bytes: int = Field(default=32_768, ge=1024)
    """A request's head (its request line and headers) larger than this gets 431 (414 when its
    target alone is): a proxy's usual limit (nginx takes 4 lines of 8 KiB), so that a client's
    cookies and tokens fit, and a client cannot make the server keep headers without end."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    sse_keepalive_seconds: float = Field(default=15.0, gt=0)
    shutdown_grace_seconds: int = Field(default=7, ge=0, le=3600)
    """How long a stopping server lets requests finish before it ends them (and stores what
    they produced, ~1-3 s more): under `docker stop`'s 10 s, or the orchestrator's own."""
    metrics_token: SecretStr | None = None
    """When set, `GET /metrics` wants `Authorization: Bearer <token>`."""

    # Scale-out and rate limits
    redis_url: str | None = None
    trusted_proxies: CommaList = Field(default_factory=list)

    # Database
    database_url: str | None = None
    database_pool_size: int = Field(default=10, ge=1)
    database_echo: bool = False

    # Auth: Clerk
    clerk_jwks_url: str | None = None
    clerk_issuer: str | None = None
    clerk_jwt_key: str | None = None
    clerk_secret_key: SecretStr | None = None
    clerk_webhook_secret: SecretStr | None = None
    clerk_authorized_parties: CommaList = Field(default_factory=list)
    clerk_jwks_cooldown_seconds: float = Field(default=30.0, ge=0)
    clerk_jwks_timeout_seconds: float = Field(default=5.0, gt=0)
    clerk_jwks_max_age_seconds: float = Field(default=3600.0, gt=0)

    # Auth: local accounts and aihub's own tokens
    auth_jwt_private_key: SecretStr | None = None
    auth_token_ttl_seconds: int = Field(default=12 * 3600, ge=60)
    auth_allow_registration: bool | None = None
    jwt_leeway_seconds: int = Field(default=5, ge=0, le=120)
    auth_user_cache_seconds: float = Field(default=30.0, ge=0)

    # Providers
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    gemini_api_key: SecretStr | None = None
    gemini_base_url: str | None = None
    replicate_api_token: SecretStr | None = None
    replicate_base_url: str | None = None
    provider_timeout_seconds: float = Field(default=60.0, gt=0)
    provider_max_retries: int = Field(default=2, ge=0, le=10)
    offline_token_delay_ms: int = Field(default=20, ge=0, le=5000)

    # Products
    ideas_model: str = "openai:gpt-5-nano"
    ideas_prompt: str = (
        "Come up with a new business idea for AI Agents. Format your answer in Markdown, "
        "with headings, sub-headings and bullet points."
    )
    ideas_required_plan: str | None = None
    ideas_resume_seconds: float = Field(default=30.0, ge=0, le=600)
    """How long an idea goes on being written after its client left, for the client to come
    back (`Last-Event-ID`) and get the rest; 0: the provider is stopped at once."""
    challenges_model: str = "openai:gpt-4o-mini"
    challenges_temperature: float | None = Field(default=0.7, ge=0, le=2)
    challenges_fallback: bool = True
    challenges_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    """The longest a challenge's generation may take, its repair included (the provider's
    timeout bounds each read only, and a provider may trickle its answer)."""

    images_model: str = Field(
        default="replicate:black-forest-labs/flux-schnell",
        validation_alias=AliasChoices("IMAGES_MODEL", "IMAGE_GEN_MODEL"),
    )
    images_max_per_job: int = Field(default=8, ge=1, le=100)
    images_max_jobs_in_flight: int = Field(default=4, ge=1, le=1000)
    images_concurrency: int = Field(default=10, ge=1, le=1000)
    images_timeout_seconds: float = Field(default=120.0, gt=0)
    images_max_retries: int = Field(default=2, ge=0, le=10)
    images_worker: bool = True
    images_heartbeat_seconds: float = Field(default=5.0, gt=0)
    images_stale_seconds: float = Field(default=30.0, gt=0)
    images_poll_seconds: float = Field(default=5.0, gt=0)
    images_stream_requires_auth: bool = False
    images_stream_token_seconds: int = Field(default=3600, ge=10)

    chat_model: str = "gemini:gemini-2.5-flash"
    chat_summary_model: str | None = None
    """The chain that writes chats' rolling summaries (a smaller model does); None: `chat_model`."""
    chat_system_prompt: str | None = None
    chat_system_prompt_file: Path | None = None
    chat_context_tokens: int = Field(default=6000, ge=500)
    chat_summary_after_tokens: int = Field(default=3500, ge=200)
    chat_summary_min_messages: int = Field(default=10, ge=2)
    chat_keep_recent_messages: int = Field(default=5, ge=1)
    chat_summary_tokens: int = Field(default=400, ge=50)
    chat_max_message_chars: int = Field(default=20_000, ge=1)
    chat_max_media_parts: int = Field(default=20, ge=0, le=100)

    # Uploads
    upload_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    upload_allowed_types: CommaList = Field(
        default_factory=lambda: [
            "image/*",
            "audio/*",
            "video/*",
            "application/pdf",
            "text/plain",
            "text/markdown",
            "text/csv",
            "text/html",
            "application/json",
        ]
    )
    upload_url_ttl_seconds: int = Field(default=900, ge=10)
    upload_orphan_hours: float = Field(default=24.0, gt=0)
    gemini_inline_max_bytes: int = Field(default=4 * 1024 * 1024, ge=0)

    # Storage: `local` unless STORAGE_BACKEND says otherwise, or GCS_BUCKET_NAME is set (the
    # chats seed's variable), which alone chooses `gcs`.
    storage_backend: Literal["local", "gcs", "s3"] = "local"
    storage_signing_key: SecretStr | None = None
    storage_url_ttl_seconds: int = Field(default=3600, ge=10)
    gcs_bucket_name: str | None = None
    gcs_credentials_json: SecretStr | None = None
    google_application_credentials: Path | None = None
    gcs_base_url: str | None = None
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_session_token: SecretStr | None = None
    s3_force_path_style: bool | None = None
    _gcs_service_account: ServiceAccount | None = PrivateAttr(default=None)

    byok_enabled: bool = True
    byok_base_url: str | None = None
    """Where callers' own keys go: OpenAI's API unless set. Not `OPENAI_BASE_URL`, which may name
    a server that checks no keys (Ollama), and would make the route an open relay to it."""
    byok_allowed_models: CommaList = Field(
        default_factory=lambda: ["gpt-4.1-mini", "gpt-4o-mini", "gpt-3.5-turbo"]
    )
    byok_max_history: int = Field(default=50, ge=0, le=1000)
    byok_max_message_chars: int = Field(default=10_000, ge=1, le=1_000_000)
    byok_rate_limit: str | None = "30/minute"
    auth_rate_limit: str | None = "20/minute"
    """Local accounts' login and registration, per client address (each costs a bcrypt hash)."""

    # Quotas: a new user starts with `*_INITIAL_QUOTA` (default: the daily one); every 24 hours
    # the balance is topped up to at least `*_DAILY_QUOTA`. "unlimited" (or empty) turns it off.
    challenges_daily_quota: QuotaSetting = 10
    challenges_initial_quota: QuotaSetting = 50
    ideas_daily_quota: QuotaSetting = 20
    ideas_initial_quota: QuotaSetting = None
    images_daily_quota: QuotaSetting = 50
    images_initial_quota: QuotaSetting = None
    chats_daily_quota: QuotaSetting = 200
    chats_initial_quota: QuotaSetting = None

    @field_validator("upload_allowed_types", mode="before")
    @classmethod
    def _split_types(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip().lower() for item in value.split(",") if item.strip()]
        return value

    @field_validator("byok_allowed_models", "trusted_proxies", mode="before")
    @classmethod
    def _split_plain_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        from aihub.core.ratelimit import parse_networks

        parse_networks(value)
        return value

    @field_validator("byok_rate_limit", "auth_rate_limit", mode="before")
    @classmethod
    def _rate_limit(cls, value: object) -> object:
        value = _unlimited_is_none(value)
        if isinstance(value, str):
            from aihub.core.ratelimit import RateLimit

            RateLimit.parse(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("cors_origins", "clerk_authorized_parties", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip().rstrip("/") for item in value.split(",") if item.strip()]
        return value

    @field_validator(
        "database_url",
        "clerk_jwks_url",
        "clerk_issuer",
        "clerk_jwt_key",
        "openai_base_url",
        "byok_base_url",
        "gemini_base_url",
        "replicate_base_url",
        "public_base_url",
        "ideas_required_plan",
        "redis_url",
        "gcs_bucket_name",
        "gcs_credentials_json",
        "google_application_credentials",
        "gcs_base_url",
        "s3_bucket",
        "s3_endpoint_url",
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3_session_token",
        "s3_force_path_style",
        "chat_summary_model",
        "chat_system_prompt_file",
        "challenges_temperature",
        "auth_allow_registration",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(
        "clerk_jwks_url",
        "clerk_issuer",
        "openai_base_url",
        "byok_base_url",
        "gemini_base_url",
        "replicate_base_url",
        "public_base_url",
        "gcs_base_url",
        "s3_endpoint_url",
    )
    @classmethod
    def _absolute_http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not _is_absolute_http_url(value):
            raise ValueError("must be an absolute http:// or https:// URL")
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            make_url(value)
        except (ValueError, ArgumentError):  # never echo the URL: it may hold a password
            raise ValueError("not a valid database URL") from None
        for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://"):
            if value.startswith(prefix):
                value = "postgresql+asyncpg://" + value.removeprefix(prefix)
        if value.startswith("postgresql+asyncpg://"):
            return _asyncpg_query(value)
        if value.startswith("sqlite:///"):
            return "sqlite+aiosqlite:///" + value.removeprefix("sqlite:///")
        if not value.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("must be a postgresql:// or sqlite:/// URL")
        return value

    @field_validator("clerk_webhook_secret")
    @classmethod
    def _svix_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        from aihub.users.webhooks import decode_secret

        decode_secret(value.get_secret_value())
        return value

    @field_validator(
        "ideas_model", "challenges_model", "images_model", "chat_model", "chat_summary_model"
    )
    @classmethod
    def _model_chain(cls, value: str | None) -> str | None:
        if value is not None:
            parse_model_chain(value)
        return value

    @model_validator(mode="after")
    def _cors_without_wildcard(self) -> Settings:
        if "*" in self.cors_origins:
            raise ValueError("CORS_ORIGINS may not contain '*': aihub sends credentials")
        for origin in self.cors_origins:
            # A browser's Origin always has its scheme: `localhost:3000` could never match.
            if not _is_absolute_http_url(origin) or urlsplit(origin).path:
                raise ValueError(
                    f"CORS_ORIGINS: {origin!r} is not an origin like http://localhost:3000"
                )
        return self

    @model_validator(mode="after")
    def _heartbeat_within_stale(self) -> Settings:
        if self.images_stale_seconds < 2 * self.images_heartbeat_seconds:
            raise ValueError(
                "IMAGES_STALE_SECONDS must be at least twice IMAGES_HEARTBEAT_SECONDS, or a live "
                "worker's jobs would be taken from it"
            )
        return self

    @model_validator(mode="after")
    def _storage(self) -> Settings:
        implicit = "storage_backend" not in self.model_fields_set
        if implicit and self.gcs_bucket_name:
            self.storage_backend = "gcs"
        problems: list[str] = []
        if self.storage_backend == "gcs":
            problems = self._gcs_problems(chosen_by_bucket_name=implicit)
        elif self.storage_backend == "s3":
            problems = self._s3_problems()
        if self.storage_backend != "local":
            for name in ("storage_url_ttl_seconds", "upload_url_ttl_seconds"):
                if getattr(self, name) > MAX_SIGNED_URL_SECONDS:
                    problems.append(
                        f"{name.upper()}: at most {MAX_SIGNED_URL_SECONDS} (7 days) with "
                        f"STORAGE_BACKEND={self.storage_backend}: longer links cannot be signed"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _gcs_problems(self, *, chosen_by_bucket_name: bool) -> list[str]:
        """What stops GCS from working; reads and checks the service-account key."""
        problems = (
            [] if self.gcs_bucket_name else ["GCS_BUCKET_NAME: required with STORAGE_BACKEND=gcs"]
        )
        try:
            self._gcs_service_account = self._read_gcs_key(chosen_by_bucket_name)
        except ValueError as exc:
            problems.append(str(exc))
        return problems

    def _read_gcs_key(self, chosen_by_bucket_name: bool) -> ServiceAccount:
        """The key from GCS_CREDENTIALS_JSON, else from the file GOOGLE_APPLICATION_CREDENTIALS
        names; a `ValueError` names the variable and the problem, never the key."""
        from aihub.storage.gcs import ServiceAccount

        name, path = "GCS_CREDENTIALS_JSON", self.google_application_credentials
        if self.gcs_credentials_json is not None:
            text = self.gcs_credentials_json.get_secret_value()
        elif path is not None:
            name = "GOOGLE_APPLICATION_CREDENTIALS"
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or "not a UTF-8 text file"
                raise ValueError(f"{name}: cannot read {path}: {reason}") from None
        else:
            chosen = (
                " (chosen because GCS_BUCKET_NAME is set; STORAGE_BACKEND=local keeps files on "
                "disk)"
                if chosen_by_bucket_name
                else ""
            )
            raise ValueError(
                "GOOGLE_APPLICATION_CREDENTIALS or GCS_CREDENTIALS_JSON: a service-account key is "
                f"required with STORAGE_BACKEND=gcs{chosen}"
            )
        try:
            return ServiceAccount.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None

    def _s3_problems(self) -> list[str]:
        required = {
            "S3_BUCKET": self.s3_bucket,
            "S3_REGION": self.s3_region.strip(),
            "S3_ACCESS_KEY_ID": self.s3_access_key_id,
            "S3_SECRET_ACCESS_KEY": self.s3_secret_access_key,
        }
        return [
            f"{name}: required with STORAGE_BACKEND=s3" for name, v in required.items() if not v
        ]

    @property
    def gcs_service_account(self) -> ServiceAccount | None:
        """The GCS key, read and checked at start-up (None unless STORAGE_BACKEND is gcs)."""
        return self._gcs_service_account

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'aihub.db').as_posix()}"

    @property
    def is_embedded(self) -> bool:
        """True for the zero-configuration default: SQLite, no Clerk and no provider credentials.

        Only then is registration open by default (`AUTH_ALLOW_REGISTRATION` unset): an install
        holding a provider key must not let strangers sign up and spend it.
        """
        return (
            self.resolved_database_url.startswith("sqlite")
            and not self.clerk_configured
            and not self.provider_credentials_configured
        )

    @property
    def provider_credentials_configured(self) -> bool:
        return bool(self.openai_api_key or self.gemini_api_key or self.replicate_api_token)

    @property
    def clerk_configured(self) -> bool:
        return bool(self.clerk_jwks_url or self.clerk_jwt_key)

    @property
    def registration_open(self) -> bool:
        if self.auth_allow_registration is None:
            return self.is_embedded
        return self.auth_allow_registration


_LIBPQ_TO_ASYNCPG = {"sslmode": "ssl", "connect_timeout": "timeout"}
"""The query parameters hosted PostgreSQL services put in their URLs, as asyncpg names them
(it takes libpq's `sslmode` values as `ssl`)."""
_ASYNCPG_PARAMETERS = frozenset(
    {"ssl", "timeout", "command_timeout", "statement_cache_size", "prepared_statement_cache_size"}
)


def _asyncpg_query(value: str) -> str:
    """`value` with its libpq query parameters renamed for asyncpg; a ValueError naming any
    parameter asyncpg cannot take (rather than a TypeError from the driver at start-up)."""
    url = make_url(value)
    query = {_LIBPQ_TO_ASYNCPG.get(name, name): given for name, given in url.query.items()}
    if unknown := sorted(set(query) - _ASYNCPG_PARAMETERS):
        raise ValueError(
            f"the query parameter {unknown[0]!r} is not supported"
            f" (supported: sslmode or ssl, connect_timeout or timeout, command_timeout)"
        )
    if query == dict(url.query):
        return value
    return url.set(query=query).render_as_string(hide_password=False)


def _is_absolute_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return (
            parts.scheme.lower() in ("http", "https")
            and bool(parts.hostname)
            and (parts.port is None or parts.port > 0)
        )
    except ValueError:  # an unparsable port or IPv6 address
        return False


def parse_model_chain(spec: str) -> list[tuple[str, str]]:
    """`"openai:gpt-5-nano,offline:demo"` -> `[("openai", "gpt-5-nano"), ("offline", "demo")]`."""
    chain: list[tuple[str, str]] = []
    for item in spec.split(","):
        provider, sep, model = item.strip().partition(":")
        if not sep or not model.strip():
            raise ValueError(f"{item.strip()!r} is not of the form provider:model")
        if provider not in PROVIDER_NAMES:
            raise ValueError(f"unknown provider {provider!r} (one of {', '.join(PROVIDER_NAMES)})")
        chain.append((provider, model.strip()))
    return chain


def load_settings(**overrides: object) -> Settings:
    """Read settings, turning validation errors into one readable line per problem."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        raise ConfigError("\n".join(_problem(error) for error in errors)) from None


def _problem(error: ErrorDetails) -> str:
    """`"CLERK_JWKS_URL: must be ..."`, naming the variable (every name it goes by)."""
    message = error["msg"]
    if error["type"] == "value_error":  # our own validators: drop pydantic's "Value error, "
        message = str(error.get("ctx", {}).get("error", message))
    if not error["loc"]:
        return message
    names = [str(error["loc"][0])]
    field = Settings.model_fields.get(names[0].lower())
    if field is not None and isinstance(field.validation_alias, AliasChoices):
        names = [str(choice) for choice in field.validation_alias.choices]
    return f"{' or '.join(name.upper() for name in names)}: {message}"


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]
