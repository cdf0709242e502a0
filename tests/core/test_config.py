"""Settings: a bad value fails at start-up in one line naming its variable; safe defaults."""

from __future__ import annotations

import pytest

from aihub.core.config import ConfigError, Settings, load_settings


def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    """Settings read from these environment variables only (never a developer's `.env`)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(_env_file=None)


def config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from(monkeypatch, **env)
    return str(caught.value)


# --- invalid values --------------------------------------------------------------------------

URL_VARIABLES = [
    "CLERK_JWKS_URL",
    "OPENAI_BASE_URL",
    "GEMINI_BASE_URL",
    "REPLICATE_BASE_URL",
    "PUBLIC_BASE_URL",
]


@pytest.mark.parametrize("name", URL_VARIABLES)
@pytest.mark.parametrize(
    "value", ["notaurl", "localhost:8080", "ftp://example.com/x", "https://", "http://[::1"]
)
def test_url_settings_must_be_absolute_http_urls(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    message = config_error(monkeypatch, **{name: value})
    assert message == f"{name}: must be an absolute http:// or https:// URL"


@pytest.mark.parametrize("name", URL_VARIABLES)
def test_url_settings_accept_http_and_https_and_treat_blank_as_unset(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    field = name.lower()
    ollama = settings_from(monkeypatch, **{name: " http://localhost:11434/v1 "})
    assert getattr(ollama, field) == "http://localhost:11434/v1"
    secure = settings_from(monkeypatch, **{name: "https://api.example.com"})
    assert getattr(secure, field) == "https://api.example.com"
    assert getattr(settings_from(monkeypatch, **{name: "  "}), field) is None


def test_unparsable_database_url_is_named_without_echoing_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = config_error(monkeypatch, DATABASE_URL="postgresql://aihub:s3cret-pw@db:port/aihub")
    assert message == "DATABASE_URL: not a valid database URL"
    assert "s3cret-pw" not in message


def test_one_line_per_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(monkeypatch, OPENAI_BASE_URL="notaurl", PORT="0")
    assert sorted(message.splitlines()) == [
        "OPENAI_BASE_URL: must be an absolute http:// or https:// URL",
        "PORT: Input should be greater than or equal to 1",
    ]


# --- workers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["WORKERS", "WEB_CONCURRENCY"])
def test_workers_from_either_variable(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    assert settings_from(monkeypatch, **{name: "3"}).workers == 3
    assert "WORKERS or WEB_CONCURRENCY" in config_error(monkeypatch, **{name: "0"})


def test_workers_wins_over_web_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from(monkeypatch, WEB_CONCURRENCY="2", WORKERS="4").workers == 4


def test_workers_by_field_name() -> None:
    assert Settings(_env_file=None, workers=2).workers == 2


# --- registration default --------------------------------------------------------------------


def test_registration_is_open_in_the_pure_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(monkeypatch)
    assert settings.is_embedded
    assert settings.registration_open


@pytest.mark.parametrize(
    "env",
    [
        {"OPENAI_API_KEY": "sk-test-0000000000"},
        {"GEMINI_API_KEY": "AIzaTest0000000000000000000000"},
        {"REPLICATE_API_TOKEN": "r8_Test0000000000"},
        {"CLERK_JWKS_URL": "https://example.clerk.accounts.dev/.well-known/jwks.json"},
        {"DATABASE_URL": "postgresql://aihub@db.example.com/aihub"},
    ],
    ids=["openai", "gemini", "replicate", "clerk", "postgresql"],
)
def test_registration_is_closed_by_default_beyond_the_embedded_default(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    settings = settings_from(monkeypatch, **env)
    assert not settings.is_embedded
    assert not settings.registration_open


def test_blank_provider_key_keeps_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # Compose files often pass `OPENAI_API_KEY=${OPENAI_API_KEY:-}`; the provider stays offline.
    assert settings_from(monkeypatch, OPENAI_API_KEY="").registration_open


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OPENAI_API_KEY": "sk-test-0000000000", "AUTH_ALLOW_REGISTRATION": "true"}, True),
        ({"AUTH_ALLOW_REGISTRATION": "false"}, False),
    ],
    ids=["opened-with-a-key", "closed-when-embedded"],
)
def test_auth_allow_registration_overrides_the_default(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: bool
) -> None:
    assert settings_from(monkeypatch, **env).registration_open is expected


@pytest.mark.parametrize(
    ("given", "resolved"),
    [
        (
            "postgresql://u:p@db.example.com:5432/app?sslmode=require",
            "postgresql+asyncpg://u:p@db.example.com:5432/app?ssl=require",
        ),
        (
            "postgres://u@db/app?sslmode=verify-full&connect_timeout=5",
            "postgresql+asyncpg://u@db/app?ssl=verify-full&timeout=5",
        ),
        ("postgresql+asyncpg://u@db/app?ssl=disable", "postgresql+asyncpg://u@db/app?ssl=disable"),
    ],
)
def test_hosted_postgresql_urls_are_taken_as_given(
    monkeypatch: pytest.MonkeyPatch, given: str, resolved: str
) -> None:
    settings = settings_from(monkeypatch, DATABASE_URL=given)
    assert settings.resolved_database_url == resolved


def test_a_libpq_parameter_asyncpg_cannot_take_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(
        monkeypatch, DATABASE_URL="postgresql://u:secret@db/app?application_name=aihub"
    )
    assert "DATABASE_URL" in message
    assert "'application_name' is not supported" in message
    assert "secret" not in message


def test_a_database_url_that_is_not_one_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "DATABASE_URL: not a valid database URL" in config_error(
        monkeypatch, DATABASE_URL="notaurl"
    )


@pytest.mark.parametrize("origin", ["localhost:3000", "http://localhost:3000/app", "example.com"])
def test_a_cors_origin_without_its_scheme_is_refused(
    monkeypatch: pytest.MonkeyPatch, origin: str
) -> None:
    message = config_error(monkeypatch, CORS_ORIGINS=f"http://localhost:5173,{origin}")
    assert f"{origin!r} is not an origin like http://localhost:3000" in message
