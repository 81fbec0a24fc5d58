"""The operator page (filled in below)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from bot.server import Runtime


def page_routes(runtime: Runtime) -> list[BaseRoute]:
    """The operator page's routes."""
    return []
