"""What the handlers find in the application (aiohttp app keys), set by
:func:`kubetask.api.server.make_app`."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.control.leadership import Leadership
from kubetask.settings import Settings

SESSIONS: web.AppKey[async_sessionmaker[AsyncSession]] = web.AppKey("sessions", async_sessionmaker)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
LEADERSHIP: web.AppKey[Leadership] = web.AppKey("leadership", Leadership)
