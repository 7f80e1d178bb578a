"""``/demo``: a small store page that personalizes itself (the embedded demo only).

The page loads Segment's real analytics.js (analytics-next), vendored into
the package from the npm registry at build time (setup.py), never from a CDN:
its settings are given inline (``cdnSettings``) and the chunks it loads later
come from this server (``cdnURL``, served under /analytics-next/bundles/).
Its page views go to the tracking API here, and it polls its own membership
of ``high_intent_pricing`` to show or hide an offer.

The visitor is signed in as a free-plan demo person (``?user=`` picks
another). The page's audience is made on the first visit if it does not
exist, with the window ``qualify serve --demo-window`` sets.
"""

from __future__ import annotations

import asyncio

import html
import json
import logging
import re
from pathlib import Path

from aiohttp import web

from ...demo import DEMO_AUDIENCE, demo_audience
from ...domain.errors import AudienceExists
from .edge import HttpEdge

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
VENDOR = STATIC / "vendor"
_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.js$")
_ANALYTICS_MISSING = "// analytics.js was not vendored at build time (npm missing): reinstall with npm on PATH\n"


class DemoPage:
    def __init__(self, edge: HttpEdge):
        self.edge = edge
        self.audience_ready = False
        self.template = (STATIC / "demo.html").read_text(encoding="utf-8")

    async def _ensure_audience(self) -> None:
        if self.audience_ready:
            return
        window = self.edge.demo_window
        try:
            await self.edge.audiences.create(DEMO_AUDIENCE, "High intent pricing",
                                             f"viewed /pricing 3+ times in {window:g}s, on the free plan",
                                             demo_audience(window))
            log.info("/demo: audience %s made (window %gs)", DEMO_AUDIENCE, window)
        except AudienceExists:
            pass
        for _ in range(1000):  # its backfill (people with realtime state, then the warehouse's): milliseconds
            if (await self.edge.audiences.get(DEMO_AUDIENCE)).backfill is None:
                break
            await asyncio.sleep(0.01)
        self.audience_ready = True

    def _visitor(self) -> str:
        """The first demo person on the free plan (the audience needs it), by their stored plan."""
        keys = [f"user-{i}" for i in range(1, 201)]
        plans = self.edge.reads.records.field_values("customers", keys, ("plan",))
        return next((k for k in keys if plans.get(k, {}).get("plan") == "free"), "user-1")

    async def page(self, request: web.Request) -> web.Response:
        await self._ensure_audience()
        user = request.query.get("user") or self._visitor()
        config = {"user": user, "audience": DEMO_AUDIENCE, "collection": "customers", "window": self.edge.demo_window}
        body = self.template.replace("{{CONFIG}}", json.dumps(config).replace("</", "<\\/"))
        body = body.replace("{{USER}}", html.escape(user))
        return web.Response(text=body, content_type="text/html")

    async def script(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not _FILE.match(name):
            raise web.HTTPNotFound()
        path = VENDOR / name
        if not path.is_file():
            if name == "index.js":
                return web.Response(text=_ANALYTICS_MISSING, content_type="application/javascript")
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type="application/javascript",
                            headers={"Cache-Control": "public, max-age=3600"})


def add_routes(app: web.Application, edge: HttpEdge) -> None:
    d = DemoPage(edge)
    app.router.add_get("/demo", d.page, name="demo")
    app.router.add_get("/demo/static/{name}", d.script, name="demo.static")
    app.router.add_get("/analytics-next/bundles/{name}", d.script, name="demo.bundles")
    app.router.add_get("/favicon.ico", lambda request: web.Response(status=204), name="demo.favicon")
