"""Every product's router, included once."""

from __future__ import annotations

from fastapi import FastAPI

from aihub.core import health
from aihub.ideas import router as ideas
from aihub.users import router as users


def include_routers(app: FastAPI) -> None:
    app.include_router(health.router)
    app.include_router(users.router)
    app.include_router(ideas.router)
