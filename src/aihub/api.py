"""Every product's router, included once."""

from __future__ import annotations

from fastapi import FastAPI

from aihub.byok import router as byok
from aihub.challenges import router as challenges
from aihub.chats import router as chats
from aihub.core import health
from aihub.ideas import router as ideas
from aihub.images import router as images
from aihub.playground import router as playground
from aihub.storage import router as storage
from aihub.usage import router as usage
from aihub.users import router as users


def include_routers(app: FastAPI) -> None:
    app.include_router(health.router)
    app.include_router(users.router)
    app.include_router(ideas.router)
    app.include_router(challenges.router)
    app.include_router(images.router)
    app.include_router(chats.router)
    app.include_router(storage.router)
    app.include_router(byok.router)
    app.include_router(usage.router)
    app.include_router(users.webhooks_router)
    app.include_router(playground.router)
