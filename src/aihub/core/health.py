from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import JSONResponse

from aihub import __version__
from aihub.core.db import Sessions
from aihub.providers.routing import ModelChain

router = APIRouter(tags=["health"])


@router.get("/api/health", summary="Liveness, and which provider serves each product")
async def health(request: Request) -> dict[str, Any]:
    chains: dict[str, ModelChain] = request.app.state.chains
    configured: dict[str, str] = request.app.state.configured_chains
    return {
        "status": "ok",
        "version": __version__,
        "products": {
            product: {
                "provider": chain.primary.provider.name,
                "model": chain.primary.model,
                "chain": chain.label,
                "configured": configured.get(product),
                "offline": chain.primary.provider.name == "offline",
            }
            for product, chain in chains.items()
        },
    }


@router.get(
    "/api/ready",
    summary="Readiness: the database answers",
    responses={503: {"description": "The database does not answer"}},
)
async def ready(sessions: Sessions) -> JSONResponse:
    try:
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        return JSONResponse(
            {
                "status": "unavailable",
                "error": "database_unavailable",
                "detail": type(exc).__name__,
            },
            status_code=503,
        )
    return JSONResponse({"status": "ready", "database": "ok"})
