from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr
from starlette.responses import Response

from aihub import __version__
from aihub.core.config import Settings
from aihub.core.db import Sessions, ping
from aihub.core.errors import Unauthorized, error_responses
from aihub.providers.routing import ImageChain, ModelChain

router = APIRouter(tags=["health"])


@router.head("/api/health", include_in_schema=False)
@router.get("/api/health", summary="Liveness, and which provider serves each product")
async def health(request: Request) -> dict[str, Any]:
    chains: dict[str, ModelChain | ImageChain] = {
        **request.app.state.chains,
        "images": request.app.state.image_chain,
    }
    products = {product: _describe(chain) for product, chain in chains.items()}
    if (summaries := request.app.state.chat_summary_chain) is not chains["chats"]:
        products["chats"]["summaries"] = _describe(summaries)  # CHAT_SUMMARY_MODEL
    return {
        "status": "ok",
        "version": __version__,
        "products": products | {"byok": _byok(request.app.state.settings)},
    }


def _describe(chain: ModelChain | ImageChain) -> dict[str, Any]:
    return {
        "provider": chain.primary.provider.name,
        "model": chain.primary.model,
        "chain": chain.label,
        "configured": chain.configured,
        "offline": chain.primary.provider.name == "offline",
    }


def _byok(settings: Settings) -> dict[str, Any]:
    """Bring-your-own-key chat: OpenAI (or `BYOK_BASE_URL`) with each caller's key."""
    if not settings.byok_enabled:
        return {"enabled": False}
    return {
        "enabled": True,
        "provider": "openai",
        "model": settings.byok_allowed_models[0],
        "models": settings.byok_allowed_models,
        "keys": "caller",
        "offline": False,
    }


@router.get(
    "/api/ready",
    summary="Readiness: the database answers",
    responses=error_responses({503: "The database does not answer"}),
)
async def ready(sessions: Sessions) -> dict[str, str]:
    await ping(sessions)
    return {"status": "ready", "database": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics, to anyone, or with `METRICS_TOKEN` set only to a scraper sending it."""
    token: SecretStr | None = request.app.state.settings.metrics_token
    if token is not None:
        expected = f"Bearer {token.get_secret_value()}".encode()
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, expected):
            raise Unauthorized("GET /metrics wants the METRICS_TOKEN as a bearer token")
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
